//! Sealing, verifying and opening envelopes, and the checks the server makes before it
//! stores one.
use std::time::Duration;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::ChaCha20Poly1305;
use chrono::{DateTime, Utc};
use creto_schemas::messaging::v1::{Envelope, EnvelopeHeader, KeyStanza, SignatureAlgorithm};
use ed25519_dalek::{Signature, VerifyingKey};
use hpke::aead::ChaCha20Poly1305 as HpkeChaCha;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use prost::Message;
use rand::RngCore;
use sha2::{Digest, Sha256};

use super::keys::{self, EncryptionKeyPair, SigningKeyPair};
use super::{suite, MessagingLimits};

const SIGNATURE_CONTEXT: &[u8] = b"creto-messaging/v1";
const WRAP_INFO: &[u8] = b"creto-messaging/v1 content key";
const COMMITMENT_CONTEXT: &[u8] = b"creto-messaging/v2 content key commitment";
/// The content key is fresh for every message and encrypts exactly one payload, so a fixed
/// nonce is safe (the same argument as age's payload key).
const PAYLOAD_NONCE: [u8; 12] = [0; 12];

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("envelope version {0} is not supported (this build speaks version 2)")]
    UnknownVersion(u32),
    #[error("unknown HPKE suite kem=0x{kem:04x} kdf=0x{kdf:04x} aead=0x{aead:04x}; supported: kem=0x0020 kdf=0x0001 aead=0x0003")]
    UnknownSuite { kem: u32, kdf: u32, aead: u32 },
    #[error("unknown signature algorithm {0}; supported: SIGNATURE_ALGORITHM_ED25519")]
    UnknownSignatureAlgorithm(i32),
    #[error("the signature does not verify with the sender's key: the envelope was altered or signed with another key")]
    BadSignature,
    #[error("the envelope carries no content key for key {0}")]
    NotForKey(String),
    #[error("the envelope is for agent {0}, not this one")]
    NotForAgent(String),
    #[error("decryption failed: the ciphertext or a key stanza was altered")]
    Decrypt,
    #[error("the message expired at {0}")]
    Expired(DateTime<Utc>),
    #[error("{0}")]
    Invalid(String),
}

impl EnvelopeError {
    /// Short reason for metrics labels and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            EnvelopeError::Malformed(_) | EnvelopeError::Invalid(_) => "invalid",
            EnvelopeError::UnknownVersion(_)
            | EnvelopeError::UnknownSuite { .. }
            | EnvelopeError::UnknownSignatureAlgorithm(_) => "unknown_suite",
            EnvelopeError::BadSignature => "bad_signature",
            EnvelopeError::NotForKey(_) | EnvelopeError::NotForAgent(_) => "not_for_recipient",
            EnvelopeError::Decrypt => "decrypt_failed",
            EnvelopeError::Expired(_) => "expired",
        }
    }
}

/// What a sender says about one message.
pub struct SealParams<'a> {
    pub tenant: &'a str,
    pub sender_agent_id: &'a str,
    pub signing_key: &'a SigningKeyPair,
    pub recipient_agent_id: &'a str,
    /// The recipient's current encryption keys: (key id, X25519 public key).
    pub recipient_keys: &'a [(String, Vec<u8>)],
    pub message_id: &'a str,
    pub sequence: u64,
    pub created_at: DateTime<Utc>,
    pub ttl: Duration,
    pub content_type: &'a str,
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

pub fn time_of(t: &Option<prost_types::Timestamp>) -> Option<DateTime<Utc>> {
    let t = t.as_ref()?;
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

/// What the signature covers: the header bytes, every stanza and the ciphertext.
fn signed_message(envelope: &Envelope) -> Vec<u8> {
    let mut stanzas = Sha256::new();
    for s in &envelope.stanzas {
        let bytes = s.encode_to_vec();
        stanzas.update((bytes.len() as u32).to_be_bytes());
        stanzas.update(&bytes);
    }
    let mut m = SIGNATURE_CONTEXT.to_vec();
    m.extend_from_slice(&Sha256::digest(&envelope.header));
    m.extend_from_slice(&stanzas.finalize());
    m.extend_from_slice(&Sha256::digest(&envelope.ciphertext));
    m
}

/// What the header commits the content key to (see the proto's `content_key_commitment`).
fn commitment(content_key: &[u8; 32]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(COMMITMENT_CONTEXT);
    h.update(content_key);
    h.finalize().to_vec()
}

/// Seals `plaintext` for the recipient's keys and signs the result.
pub fn seal(p: &SealParams<'_>, plaintext: &[u8]) -> Result<Envelope, EnvelopeError> {
    let mut content_key = [0u8; 32];
    rand::rng().fill_bytes(&mut content_key);
    seal_with(p, plaintext, &content_key, commitment(&content_key))
}

/// [`seal`] with a given content key and commitment (a test commits to another key).
fn seal_with(
    p: &SealParams<'_>,
    plaintext: &[u8],
    content_key: &[u8; 32],
    content_key_commitment: Vec<u8>,
) -> Result<Envelope, EnvelopeError> {
    if p.recipient_keys.is_empty() {
        return Err(EnvelopeError::Invalid(
            "the recipient has no encryption key to seal for".into(),
        ));
    }
    let created = p.created_at;
    let ttl = chrono::Duration::from_std(p.ttl)
        .map_err(|_| EnvelopeError::Invalid("ttl out of range".into()))?;
    let header = EnvelopeHeader {
        version: suite::VERSION,
        kem_id: suite::KEM_X25519_HKDF_SHA256,
        kdf_id: suite::KDF_HKDF_SHA256,
        aead_id: suite::AEAD_CHACHA20_POLY1305,
        signature_algorithm: SignatureAlgorithm::Ed25519 as i32,
        tenant: p.tenant.to_string(),
        sender_agent_id: p.sender_agent_id.to_string(),
        sender_key_id: p.signing_key.key_id.clone(),
        recipient_agent_id: p.recipient_agent_id.to_string(),
        recipient_key_ids: p.recipient_keys.iter().map(|(id, _)| id.clone()).collect(),
        message_id: p.message_id.to_string(),
        sequence: p.sequence,
        created_at: Some(timestamp(created)),
        expires_at: Some(timestamp(
            created
                .checked_add_signed(ttl)
                .ok_or_else(|| EnvelopeError::Invalid("ttl out of range".into()))?,
        )),
        content_type: p.content_type.to_string(),
        content_key_commitment,
    }
    .encode_to_vec();

    let mut rng = rand::rng();
    let ciphertext = ChaCha20Poly1305::new(content_key.into())
        .encrypt(
            &PAYLOAD_NONCE.into(),
            Payload {
                msg: plaintext,
                aad: &header,
            },
        )
        .map_err(|_| EnvelopeError::Invalid("payload encryption failed".into()))?;
    let mut stanzas = Vec::with_capacity(p.recipient_keys.len());
    for (key_id, public) in p.recipient_keys {
        let public = keys::x25519_public(public)?;
        let (encapsulated, wrapped) =
            hpke::single_shot_seal::<HpkeChaCha, HkdfSha256, X25519HkdfSha256, _>(
                &OpModeS::Base,
                &public,
                WRAP_INFO,
                content_key,
                &header,
                &mut rng,
            )
            .map_err(|e| EnvelopeError::Invalid(format!("HPKE seal failed: {e}")))?;
        stanzas.push(KeyStanza {
            key_id: key_id.clone(),
            encapsulated_key: encapsulated.to_bytes().to_vec(),
            wrapped_key: wrapped,
        });
    }
    let mut envelope = Envelope {
        header,
        stanzas,
        ciphertext,
        signature: Vec::new(),
    };
    sign(&mut envelope, p.signing_key);
    Ok(envelope)
}

/// (Re)signs an envelope as it is: what `seal` does last. Changing a signed envelope and
/// signing it again does not make it open (the header is the AEAD's associated data).
pub fn sign(envelope: &mut Envelope, key: &SigningKeyPair) {
    envelope.signature = key.sign(&signed_message(envelope));
}

/// Decodes the header and refuses unknown versions and algorithms; checks nothing else.
pub fn header(envelope: &Envelope) -> Result<EnvelopeHeader, EnvelopeError> {
    let header = EnvelopeHeader::decode(envelope.header.as_slice())
        .map_err(|e| EnvelopeError::Malformed(format!("header does not decode: {e}")))?;
    suite::check(&header)?;
    Ok(header)
}

/// Decodes the header of an envelope the server already stored, whatever its version: one
/// accepted by an earlier version stays deliverable (and expires) after an upgrade; the
/// recipient's client decides whether it opens.
pub fn stored_header(envelope: &Envelope) -> Result<EnvelopeHeader, EnvelopeError> {
    EnvelopeHeader::decode(envelope.header.as_slice())
        .map_err(|e| EnvelopeError::Malformed(format!("header does not decode: {e}")))
}

/// Decodes the header and verifies the signature with the sender's key.
pub fn verify(envelope: &Envelope, sender: &VerifyingKey) -> Result<EnvelopeHeader, EnvelopeError> {
    let header = header(envelope)?;
    let signature =
        Signature::from_slice(&envelope.signature).map_err(|_| EnvelopeError::BadSignature)?;
    sender
        .verify_strict(&signed_message(envelope), &signature)
        .map_err(|_| EnvelopeError::BadSignature)?;
    Ok(header)
}

/// A verified, decrypted message.
#[derive(Debug)]
pub struct Opened {
    pub header: EnvelopeHeader,
    pub plaintext: Vec<u8>,
}

/// Verifies, then opens with the first of `keys` the envelope was sealed for. Expired messages
/// are refused (`now` is the recipient's clock).
pub fn open(
    envelope: &Envelope,
    sender: &VerifyingKey,
    recipient_agent_id: &str,
    keys: &[EncryptionKeyPair],
    now: DateTime<Utc>,
) -> Result<Opened, EnvelopeError> {
    let header = verify(envelope, sender)?;
    if header.recipient_agent_id != recipient_agent_id {
        return Err(EnvelopeError::NotForAgent(header.recipient_agent_id));
    }
    if let Some(expires) = time_of(&header.expires_at) {
        if expires <= now {
            return Err(EnvelopeError::Expired(expires));
        }
    }
    let (stanza, key) = keys
        .iter()
        .find_map(|k| {
            envelope
                .stanzas
                .iter()
                .find(|s| s.key_id == k.key_id)
                .map(|s| (s, k))
        })
        .ok_or_else(|| {
            EnvelopeError::NotForKey(
                keys.iter()
                    .map(|k| k.key_id.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )
        })?;
    let encapsulated = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&stanza.encapsulated_key)
        .map_err(|_| EnvelopeError::Decrypt)?;
    let content_key = hpke::single_shot_open::<HpkeChaCha, HkdfSha256, X25519HkdfSha256>(
        &OpModeR::Base,
        &key.private,
        &encapsulated,
        WRAP_INFO,
        &stanza.wrapped_key,
        &envelope.header,
    )
    .map_err(|_| EnvelopeError::Decrypt)?;
    let content_key: [u8; 32] = content_key
        .as_slice()
        .try_into()
        .map_err(|_| EnvelopeError::Decrypt)?;
    // The key the signed header commits to, or another recipient key may open this envelope
    // to another plaintext.
    if commitment(&content_key) != header.content_key_commitment {
        return Err(EnvelopeError::Decrypt);
    }
    let plaintext = ChaCha20Poly1305::new(&content_key.into())
        .decrypt(
            &PAYLOAD_NONCE.into(),
            Payload {
                msg: &envelope.ciphertext,
                aad: &envelope.header,
            },
        )
        .map_err(|_| EnvelopeError::Decrypt)?;
    Ok(Opened { header, plaintext })
}

/// The server's checks on a header and its envelope that need no key directory: ids, sizes,
/// times and that the stanzas are exactly the header's recipient keys.
pub fn check_for_sending(
    envelope: &Envelope,
    header: &EnvelopeHeader,
    now: DateTime<Utc>,
    limits: &MessagingLimits,
) -> Result<(), EnvelopeError> {
    let invalid = |m: String| Err(EnvelopeError::Invalid(m));
    if envelope.header.len() > limits.max_header_bytes {
        return invalid(format!(
            "header of {} bytes exceeds the limit of {} bytes",
            envelope.header.len(),
            limits.max_header_bytes
        ));
    }
    for (what, id) in [
        ("sender", &header.sender_agent_id),
        ("recipient", &header.recipient_agent_id),
    ] {
        super::check_agent_id(id).or_else(|e| invalid(format!("{what}: {e}")))?;
    }
    super::check_key_id(&header.sender_key_id).or_else(invalid)?;
    super::check_message_id(&header.message_id).or_else(invalid)?;
    if header.sequence == 0 {
        return invalid("sequence starts at 1 for each sender and recipient".into());
    }
    let (Some(created), Some(expires)) = (time_of(&header.created_at), time_of(&header.expires_at))
    else {
        return invalid("created_at and expires_at are required".into());
    };
    let skew = chrono::Duration::from_std(limits.max_clock_skew).unwrap_or_default();
    if created > now + skew {
        return invalid(format!(
            "created_at {created} is in the future (more than {} s ahead of the server); check the sender's clock",
            limits.max_clock_skew.as_secs()
        ));
    }
    if expires <= now {
        return Err(EnvelopeError::Expired(expires));
    }
    let ttl = chrono::Duration::from_std(limits.max_ttl).unwrap_or_default();
    if expires - created > ttl || expires <= created {
        return invalid(format!(
            "expires_at must be after created_at and at most {} s later",
            limits.max_ttl.as_secs()
        ));
    }
    let ids = &header.recipient_key_ids;
    if ids.is_empty() || ids.len() > limits.max_recipient_keys {
        return invalid(format!(
            "a message is sealed for 1 to {} recipient keys, not {}",
            limits.max_recipient_keys,
            ids.len()
        ));
    }
    // One to one: the same ids on both sides, each once. A repeated id would let a stanza for a
    // key the header (and so the directory check) never names slip through.
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    if unique.len() != ids.len() {
        return invalid("recipient_key_ids names a key more than once".into());
    }
    let stanza_ids: std::collections::BTreeSet<&String> =
        envelope.stanzas.iter().map(|s| &s.key_id).collect();
    if envelope.stanzas.len() != ids.len() || stanza_ids != unique {
        return invalid("the key stanzas must match recipient_key_ids one to one".into());
    }
    if envelope
        .stanzas
        .iter()
        .any(|s| s.encapsulated_key.len() != 32)
    {
        return invalid("an X25519 encapsulated key is 32 bytes".into());
    }
    // A 32-byte content key and its 16-byte tag: anything longer is bytes past the size limit.
    if envelope.stanzas.iter().any(|s| s.wrapped_key.len() != 48) {
        return invalid("a wrapped key is 48 bytes (the content key and its tag)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Agent {
        signing: SigningKeyPair,
        encryption: EncryptionKeyPair,
    }

    fn agent(tag: &str) -> Agent {
        Agent {
            signing: SigningKeyPair::generate(format!("{tag}-sig")),
            encryption: EncryptionKeyPair::generate(format!("{tag}-enc")),
        }
    }

    /// What `a` says sealing message m-1 for agent b's `keys`.
    fn params<'a>(a: &'a Agent, keys: &'a [(String, Vec<u8>)]) -> SealParams<'a> {
        SealParams {
            tenant: "acme",
            sender_agent_id: "a",
            signing_key: &a.signing,
            recipient_agent_id: "b",
            recipient_keys: keys,
            message_id: "m-1",
            sequence: 1,
            created_at: Utc::now(),
            ttl: Duration::from_secs(60),
            content_type: "text/plain",
        }
    }

    fn sealed(a: &Agent, b: &Agent, plaintext: &[u8]) -> Envelope {
        let keys = [(b.encryption.key_id.clone(), b.encryption.public().to_vec())];
        seal(&params(a, &keys), plaintext).unwrap()
    }

    fn vk(a: &Agent) -> VerifyingKey {
        keys::verifying_key(&a.signing.public()).unwrap()
    }

    #[test]
    fn b_opens_what_a_sealed_and_nobody_else_can() {
        let (a, b, c) = (agent("a"), agent("b"), agent("c"));
        let env = sealed(&a, &b, b"launch at dawn");
        let opened = open(
            &env,
            &vk(&a),
            "b",
            std::slice::from_ref(&b.encryption),
            Utc::now(),
        )
        .unwrap();
        assert_eq!(opened.plaintext, b"launch at dawn");
        assert_eq!(opened.header.sequence, 1);
        // c has no stanza; c's key under b's key id does not decrypt.
        assert!(matches!(
            open(
                &env,
                &vk(&a),
                "b",
                std::slice::from_ref(&c.encryption),
                Utc::now()
            ),
            Err(EnvelopeError::NotForKey(_))
        ));
        let impostor = EncryptionKeyPair::from_seed(b.encryption.key_id.clone(), [7; 32]);
        assert_eq!(
            open(&env, &vk(&a), "b", &[impostor], Utc::now()).unwrap_err(),
            EnvelopeError::Decrypt
        );
        assert!(!env
            .ciphertext
            .windows(b"launch".len())
            .any(|w| w == b"launch"));
    }

    #[test]
    fn any_altered_byte_is_detected() {
        let (a, b) = (agent("a"), agent("b"));
        let env = sealed(&a, &b, b"payload");
        let key = vk(&a);
        let mut cases: Vec<Envelope> = Vec::new();
        for i in 0..env.header.len() {
            let mut e = env.clone();
            e.header[i] ^= 0x01;
            cases.push(e);
        }
        for i in 0..env.ciphertext.len() {
            let mut e = env.clone();
            e.ciphertext[i] ^= 0x80;
            cases.push(e);
        }
        for i in 0..env.stanzas[0].wrapped_key.len() {
            let mut e = env.clone();
            e.stanzas[0].wrapped_key[i] ^= 0x01;
            cases.push(e);
        }
        let mut e = env.clone();
        e.stanzas[0].encapsulated_key[0] ^= 0x01;
        cases.push(e);
        let mut e = env.clone();
        e.signature[10] ^= 0x01;
        cases.push(e);
        for e in cases {
            assert!(verify(&e, &key).is_err());
            assert!(open(
                &e,
                &key,
                "b",
                std::slice::from_ref(&b.encryption),
                Utc::now()
            )
            .is_err());
        }
        // Another sender's key does not verify.
        assert_eq!(
            verify(&env, &vk(&agent("x"))).unwrap_err(),
            EnvelopeError::BadSignature
        );
    }

    #[test]
    fn re_signed_header_changes_still_fail_to_open() {
        // Even the sender cannot change the header after sealing: it is the AEAD's
        // associated data.
        let (a, b) = (agent("a"), agent("b"));
        let mut env = sealed(&a, &b, b"payload");
        let mut h = EnvelopeHeader::decode(env.header.as_slice()).unwrap();
        h.sequence = 2;
        env.header = h.encode_to_vec();
        sign(&mut env, &a.signing);
        assert!(verify(&env, &vk(&a)).is_ok());
        assert_eq!(
            open(
                &env,
                &vk(&a),
                "b",
                std::slice::from_ref(&b.encryption),
                Utc::now()
            )
            .unwrap_err(),
            EnvelopeError::Decrypt
        );
    }

    #[test]
    fn unknown_algorithms_are_refused_not_guessed() {
        let (a, b) = (agent("a"), agent("b"));
        for change in [
            |h: &mut EnvelopeHeader| h.aead_id = 0x0001,
            |h: &mut EnvelopeHeader| h.kem_id = 0x0010,
            |h: &mut EnvelopeHeader| h.kdf_id = 0x0002,
            |h: &mut EnvelopeHeader| h.version = 1,
            |h: &mut EnvelopeHeader| h.version = 3,
            |h: &mut EnvelopeHeader| h.signature_algorithm = 9,
        ] {
            let mut env = sealed(&a, &b, b"payload");
            let mut h = EnvelopeHeader::decode(env.header.as_slice()).unwrap();
            change(&mut h);
            env.header = h.encode_to_vec();
            sign(&mut env, &a.signing);
            assert_eq!(verify(&env, &vk(&a)).unwrap_err().reason(), "unknown_suite");
        }
    }

    /// A stanza that unwraps another key than the header commits to is refused: without the
    /// commitment a sender could make one signed envelope open differently under each of the
    /// recipient's keys (two keys are live during a rotation).
    #[test]
    fn every_stanza_must_unwrap_the_key_the_header_commits_to() {
        let (a, b) = (agent("a"), agent("b"));
        let keys = [(b.encryption.key_id.clone(), b.encryption.public().to_vec())];
        let (key, other) = ([1u8; 32], [2u8; 32]);
        let own = std::slice::from_ref(&b.encryption);
        // Valid in every other way: signed, and the payload sealed with the key unwrapped.
        let env = seal_with(&params(&a, &keys), b"hidden", &key, commitment(&other)).unwrap();
        assert!(verify(&env, &vk(&a)).is_ok());
        let refused = open(&env, &vk(&a), "b", own, Utc::now()).unwrap_err();
        assert_eq!(refused, EnvelopeError::Decrypt);
        let env = seal_with(&params(&a, &keys), b"hidden", &key, commitment(&key)).unwrap();
        let opened = open(&env, &vk(&a), "b", own, Utc::now()).unwrap();
        assert_eq!(opened.plaintext, b"hidden");
        // A header without a commitment is malformed.
        let mut env = sealed(&a, &b, b"payload");
        let mut h = EnvelopeHeader::decode(env.header.as_slice()).unwrap();
        h.content_key_commitment.clear();
        h.version = 1;
        env.header = h.encode_to_vec();
        sign(&mut env, &a.signing);
        assert_eq!(verify(&env, &vk(&a)).unwrap_err().reason(), "unknown_suite");
        // Stored before the upgrade, the server still reads it (to deliver and expire it).
        assert_eq!(stored_header(&env).unwrap().version, 1);
    }

    #[test]
    fn rotation_overlap_seals_for_both_keys() {
        let (a, b) = (agent("a"), agent("b"));
        let new = EncryptionKeyPair::generate("b-enc-2");
        let keys = [
            (b.encryption.key_id.clone(), b.encryption.public().to_vec()),
            (new.key_id.clone(), new.public().to_vec()),
        ];
        let env = seal(
            &SealParams {
                tenant: "acme",
                sender_agent_id: "a",
                signing_key: &a.signing,
                recipient_agent_id: "b",
                recipient_keys: &keys,
                message_id: "m-2",
                sequence: 2,
                created_at: Utc::now(),
                ttl: Duration::from_secs(60),
                content_type: "",
            },
            b"both",
        )
        .unwrap();
        for k in [b.encryption.clone(), new] {
            assert_eq!(
                open(&env, &vk(&a), "b", &[k], Utc::now())
                    .unwrap()
                    .plaintext,
                b"both"
            );
        }
    }

    #[test]
    fn server_checks_times_ids_and_stanzas() {
        let (a, b) = (agent("a"), agent("b"));
        let env = sealed(&a, &b, b"x");
        let h = header(&env).unwrap();
        let limits = MessagingLimits::default();
        let now = Utc::now();
        assert!(check_for_sending(&env, &h, now, &limits).is_ok());
        assert!(matches!(
            check_for_sending(&env, &h, now + chrono::Duration::seconds(61), &limits),
            Err(EnvelopeError::Expired(_))
        ));
        assert!(
            check_for_sending(&env, &h, now - chrono::Duration::minutes(10), &limits).is_err(),
            "created too far in the future"
        );
        let mut no_stanza = env.clone();
        no_stanza.stanzas.clear();
        assert!(check_for_sending(&no_stanza, &h, now, &limits).is_err());
        let mut h0 = h.clone();
        h0.sequence = 0;
        assert!(check_for_sending(&env, &h0, now, &limits).is_err());
        let mut bad_id = h.clone();
        bad_id.recipient_agent_id = "b.>".into();
        assert!(check_for_sending(&env, &bad_id, now, &limits).is_err());
        // A key named twice in the header, with a second stanza for a key it never names.
        let mut twice = h.clone();
        twice.recipient_key_ids = vec![h.recipient_key_ids[0].clone(); 2];
        let mut smuggled = env.clone();
        let mut extra = smuggled.stanzas[0].clone();
        extra.key_id = "b-enc-revoked".into();
        smuggled.stanzas.push(extra);
        match check_for_sending(&smuggled, &twice, now, &limits) {
            Err(EnvelopeError::Invalid(m)) => assert!(m.contains("more than once"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
