//! An agent's key pairs, held by the agent (never by the server), the proof of possession that
//! comes with a signing key's registration, and the endorsement by which an agent's current
//! signing key vouches for its next keys.
use creto_schemas::messaging::v1::KeyPurpose;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, Serializable};
use rand::RngCore;

use super::EnvelopeError;

type X25519Private = <X25519HkdfSha256 as Kem>::PrivateKey;
pub(crate) type X25519Public = <X25519HkdfSha256 as Kem>::PublicKey;

const PROOF_CONTEXT: &[u8] = b"creto-messaging-key/v1";
const ENDORSE_CONTEXT: &[u8] = b"creto-messaging-endorse/v1";

fn random_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    rand::rng().fill_bytes(&mut seed);
    seed
}

/// Ed25519: signs envelopes.
#[derive(Clone)]
pub struct SigningKeyPair {
    pub key_id: String,
    key: SigningKey,
}

impl SigningKeyPair {
    pub fn generate(key_id: impl Into<String>) -> Self {
        Self::from_seed(key_id, random_seed())
    }

    /// From the 32-byte secret the agent stores.
    pub fn from_seed(key_id: impl Into<String>, seed: [u8; 32]) -> Self {
        SigningKeyPair {
            key_id: key_id.into(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.key.sign(message).to_bytes().to_vec()
    }

    /// Proof of possession for `RegisterKey`: this key signs who it is being registered for.
    pub fn proof(&self, tenant: &str, agent_id: &str) -> Vec<u8> {
        self.sign(&proof_message(
            tenant,
            agent_id,
            &self.key_id,
            &self.public(),
        ))
    }

    /// Endorsement for `RegisterKey`: this key, the agent's current signing key, vouches for
    /// the agent's new key `key_id` of `purpose`.
    pub fn endorse(
        &self,
        tenant: &str,
        agent_id: &str,
        key_id: &str,
        purpose: KeyPurpose,
        public: &[u8],
    ) -> Vec<u8> {
        self.sign(&endorsement_message(
            tenant, agent_id, key_id, purpose, public,
        ))
    }
}

/// X25519: receives content keys.
#[derive(Clone)]
pub struct EncryptionKeyPair {
    pub key_id: String,
    seed: [u8; 32],
    pub(crate) private: X25519Private,
    public: X25519Public,
}

impl EncryptionKeyPair {
    pub fn generate(key_id: impl Into<String>) -> Self {
        Self::from_seed(key_id, random_seed())
    }

    /// Derived from the 32-byte secret the agent stores (RFC 9180 DeriveKeyPair).
    pub fn from_seed(key_id: impl Into<String>, seed: [u8; 32]) -> Self {
        let (private, public) = X25519HkdfSha256::derive_keypair(&seed);
        EncryptionKeyPair {
            key_id: key_id.into(),
            seed,
            private,
            public,
        }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.seed
    }

    pub fn public(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(&self.public.to_bytes());
        out
    }
}

/// A 32-byte Ed25519 public key, or why it is not one.
pub fn verifying_key(bytes: &[u8]) -> Result<VerifyingKey, EnvelopeError> {
    let array: [u8; 32] = bytes.try_into().map_err(|_| {
        EnvelopeError::Malformed(format!(
            "an Ed25519 public key is 32 bytes, got {}",
            bytes.len()
        ))
    })?;
    VerifyingKey::from_bytes(&array)
        .map_err(|_| EnvelopeError::Malformed("not a valid Ed25519 public key".into()))
}

/// A 32-byte X25519 public key, or why it is not one.
pub(crate) fn x25519_public(bytes: &[u8]) -> Result<X25519Public, EnvelopeError> {
    if bytes.len() != 32 {
        return Err(EnvelopeError::Malformed(format!(
            "an X25519 public key is 32 bytes, got {}",
            bytes.len()
        )));
    }
    X25519Public::from_bytes(bytes)
        .map_err(|_| EnvelopeError::Malformed("not a valid X25519 public key".into()))
}

/// Checks a public key's bytes for its purpose (signing: Ed25519, encryption: X25519).
pub fn check_public_key(signing: bool, bytes: &[u8]) -> Result<(), EnvelopeError> {
    if signing {
        verifying_key(bytes).map(|_| ())
    } else {
        let public = x25519_public(bytes)?;
        // A low-order point (all zeros, say) gives every sender the all-zero shared secret,
        // which HPKE refuses: registered, it made every message to the agent fail to seal.
        X25519HkdfSha256::encap(&public, None, &mut rand::rng())
            .map(|_| ())
            .map_err(|_| {
                EnvelopeError::Malformed(
                    "a low-order X25519 key: no shared secret can be made with it; generate a new key pair".into(),
                )
            })
    }
}

fn proof_message(tenant: &str, agent_id: &str, key_id: &str, public: &[u8]) -> Vec<u8> {
    registration_message(PROOF_CONTEXT, [tenant, agent_id, key_id], &[], public)
}

fn endorsement_message(
    tenant: &str,
    agent_id: &str,
    key_id: &str,
    purpose: KeyPurpose,
    public: &[u8],
) -> Vec<u8> {
    let purpose = [purpose as i32 as u8];
    registration_message(
        ENDORSE_CONTEXT,
        [tenant, agent_id, key_id],
        &purpose,
        public,
    )
}

/// `context || tenant || 0 || agent_id || 0 || key_id || 0 || extra || public`: what a proof
/// of possession or an endorsement signs.
fn registration_message(context: &[u8], ids: [&str; 3], extra: &[u8], public: &[u8]) -> Vec<u8> {
    let mut m = context.to_vec();
    for part in ids {
        m.extend_from_slice(part.as_bytes());
        m.push(0);
    }
    m.extend_from_slice(extra);
    m.extend_from_slice(public);
    m
}

/// Checks that the signing key `endorser` (32 public bytes) vouched for the agent's key
/// `key_id` of `purpose` with this material.
pub fn verify_endorsement(
    endorser: &[u8],
    tenant: &str,
    agent_id: &str,
    key_id: &str,
    purpose: KeyPurpose,
    public: &[u8],
    endorsement: &[u8],
) -> Result<(), EnvelopeError> {
    let key = verifying_key(endorser)?;
    let signature = ed25519_dalek::Signature::from_slice(endorsement)
        .map_err(|_| EnvelopeError::BadSignature)?;
    key.verify_strict(
        &endorsement_message(tenant, agent_id, key_id, purpose, public),
        &signature,
    )
    .map_err(|_| EnvelopeError::BadSignature)
}

/// Checks that whoever registers a signing key holds its private half.
pub fn verify_proof(
    tenant: &str,
    agent_id: &str,
    key_id: &str,
    public: &[u8],
    proof: &[u8],
) -> Result<(), EnvelopeError> {
    let key = verifying_key(public)?;
    let signature =
        ed25519_dalek::Signature::from_slice(proof).map_err(|_| EnvelopeError::BadSignature)?;
    key.verify_strict(&proof_message(tenant, agent_id, key_id, public), &signature)
        .map_err(|_| EnvelopeError::BadSignature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_back_from_their_seeds() {
        let s = SigningKeyPair::generate("s1");
        assert_eq!(
            SigningKeyPair::from_seed("s1", s.seed()).public(),
            s.public()
        );
        let e = EncryptionKeyPair::generate("e1");
        assert_eq!(
            EncryptionKeyPair::from_seed("e1", e.seed()).public(),
            e.public()
        );
        assert_ne!(EncryptionKeyPair::generate("e2").public(), e.public());
    }

    #[test]
    fn proof_binds_tenant_agent_and_key_id() {
        let s = SigningKeyPair::generate("s1");
        let proof = s.proof("acme", "bot");
        assert!(verify_proof("acme", "bot", "s1", &s.public(), &proof).is_ok());
        assert!(verify_proof("other", "bot", "s1", &s.public(), &proof).is_err());
        assert!(verify_proof("acme", "bot2", "s1", &s.public(), &proof).is_err());
        assert!(verify_proof("acme", "bot", "s2", &s.public(), &proof).is_err());
        let stranger = SigningKeyPair::generate("s1");
        assert!(verify_proof("acme", "bot", "s1", &stranger.public(), &proof).is_err());
    }

    #[test]
    fn an_endorsement_binds_tenant_agent_key_id_purpose_and_material() {
        let current = SigningKeyPair::generate("s1");
        let next = EncryptionKeyPair::generate("e2").public();
        let e = current.endorse("acme", "bot", "e2", KeyPurpose::Encryption, &next);
        let check = |endorser: &[u8], tenant, agent, id, purpose, public: &[u8]| {
            verify_endorsement(endorser, tenant, agent, id, purpose, public, &e).is_ok()
        };
        let enc = KeyPurpose::Encryption;
        assert!(check(&current.public(), "acme", "bot", "e2", enc, &next));
        assert!(!check(&current.public(), "other", "bot", "e2", enc, &next));
        assert!(!check(&current.public(), "acme", "bot2", "e2", enc, &next));
        assert!(!check(&current.public(), "acme", "bot", "e3", enc, &next));
        assert!(!check(
            &current.public(),
            "acme",
            "bot",
            "e2",
            KeyPurpose::Signing,
            &next
        ));
        assert!(!check(
            &current.public(),
            "acme",
            "bot",
            "e2",
            enc,
            &[7; 32]
        ));
        let stranger = SigningKeyPair::generate("s1");
        assert!(!check(&stranger.public(), "acme", "bot", "e2", enc, &next));
    }

    #[test]
    fn public_keys_are_checked_for_their_purpose() {
        assert!(check_public_key(true, &[1u8; 31]).is_err());
        assert!(check_public_key(false, &[1u8; 33]).is_err());
        assert!(check_public_key(false, &EncryptionKeyPair::generate("e").public()).is_ok());
        // Low-order points: no sender could seal to them.
        let mut one = [0u8; 32];
        one[0] = 1;
        for low in [[0u8; 32], one] {
            let refused = check_public_key(false, &low).unwrap_err().to_string();
            assert!(refused.contains("low-order"), "{refused}");
        }
    }
}
