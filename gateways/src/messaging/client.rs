//! The messaging client library: an agent that holds its own keys, seals for the recipient's
//! current keys, and verifies the sender's signature before it opens anything. Other agents'
//! keys are trusted only along endorsements from the signing key pinned at first contact
//! ([`creto_domain::messaging::trust`]), not because the directory lists them.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use creto_gateways::messaging::client::AgentClient;
//! let mut alice = AgentClient::connect("http://127.0.0.1:50054", "", "default", "alice").await?;
//! let mut bob = AgentClient::connect("http://127.0.0.1:50054", "", "default", "bob").await?;
//! alice.register().await?;
//! bob.register().await?;
//! alice.send("bob", b"hello").await?;
//! let mut inbox = bob.receive(0).await?;
//! let message = inbox.message().await?.expect("one message");
//! let opened = bob.open(&message).await?;
//! bob.ack(message.cursor).await?;
//! assert_eq!(opened.plaintext, b"hello");
//! # Ok(()) }
//! ```
use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::Utc;
use creto_domain::messaging::{
    self as domain, keys, trust, EncryptionKeyPair, EnvelopeError, Opened, SealParams,
    SigningKeyPair,
};
use creto_schemas::messaging::v1 as pb;
use creto_schemas::messaging::v1::messaging_service_client::MessagingServiceClient;
use creto_schemas::messaging::v1::{KeyPurpose, KeyStatus};

use super::replay_guard::Seen;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Adds the bearer token to every call; with no token (a server without authentication)
/// nothing is added.
#[derive(Clone)]
pub struct Token(Option<crate::auth::Bearer>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        match &mut self.0 {
            Some(bearer) => bearer.call(request),
            None => Ok(request),
        }
    }
}

pub type Rpc = MessagingServiceClient<InterceptedService<Channel, Token>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Rpc(#[from] Status),
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The directory lists keys for an agent that its pinned signing key did not vouch for.
    #[error("{0}")]
    Untrusted(String),
}

pub struct AgentClient {
    pub tenant: String,
    pub agent_id: String,
    pub signing: SigningKeyPair,
    /// Every encryption key this agent holds, newest last (older ones open messages sealed
    /// during a rotation overlap).
    pub encryption: Vec<EncryptionKeyPair>,
    /// Default life of a message.
    pub ttl: Duration,
    rpc: Rpc,
    /// Last sequence used per recipient.
    sequences: HashMap<String, u64>,
    /// Senders' verifying keys by (agent, key id).
    verifying: HashMap<(String, String), SenderKey>,
    /// Per agent, the public half of the signing key this client trusts its keys from: the
    /// root of the agent's chain when this client first looked (trust on first use). Keep it
    /// with the agent's own keys to carry the trust across restarts.
    pub pins: HashMap<String, Vec<u8>>,
    /// Whether to seal to agents that never registered a signing key, with the encryption keys
    /// the directory lists for them (nothing vouches for those). Off by default.
    pub trust_unsigned_agents: bool,
    /// Per agent, the last listing checked, the root it was checked from, and what it trusted.
    chains: HashMap<String, ChainCheck>,
    /// What this client opened and acknowledged, to refuse replays itself.
    seen: Seen,
}

/// A listing of an agent's keys, the pinned root it was checked from, and the keys it trusted.
type ChainCheck = (Vec<pb::AgentKey>, Vec<u8>, HashSet<trust::TrustedKey>);

/// A sender's signing key as the directory showed it, looked up again after
/// [`SENDER_KEY_TTL`] (a revocation reaches this client within it).
#[derive(Clone, Copy)]
struct SenderKey {
    key: ed25519_dalek::VerifyingKey,
    /// When it stopped signing: revoked, or its rotation overlap over.
    not_after: Option<chrono::DateTime<Utc>>,
    fetched: std::time::Instant,
}

/// How long a sender's key status is taken from the cache.
pub const SENDER_KEY_TTL: Duration = Duration::from_secs(30);

/// `stored_at` is the log server's clock, a key's end the gateway's: a message accepted just
/// before the end may be stamped a little after it.
const CLOCK_TOLERANCE: chrono::Duration = chrono::Duration::seconds(2);

impl AgentClient {
    /// Connects with fresh keys (`<agent>-sig-1`, `<agent>-enc-1`); `token` may be empty for a
    /// server without authentication.
    pub async fn connect(
        url: &str,
        token: &str,
        tenant: &str,
        agent_id: &str,
    ) -> Result<Self, ClientError> {
        let channel = Channel::from_shared(url.to_string())
            .map_err(|e| ClientError::Connect(e.to_string()))?
            .connect()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        Ok(Self::with_rpc(
            MessagingServiceClient::with_interceptor(
                channel,
                Token((!token.is_empty()).then(|| crate::auth::Bearer::new(token))),
            )
            .max_decoding_message_size(1024 * 1024),
            tenant,
            agent_id,
        ))
    }

    /// The same agent (keys, sequences) on a new connection, e.g. after a gateway restart.
    pub async fn reconnect(self, url: &str, token: &str) -> Result<Self, ClientError> {
        let fresh = Self::connect(url, token, &self.tenant, &self.agent_id).await?;
        Ok(AgentClient {
            rpc: fresh.rpc,
            ..self
        })
    }

    pub fn with_rpc(rpc: Rpc, tenant: &str, agent_id: &str) -> Self {
        AgentClient {
            tenant: tenant.to_string(),
            agent_id: agent_id.to_string(),
            signing: SigningKeyPair::generate(format!("{agent_id}-sig-1")),
            encryption: vec![EncryptionKeyPair::generate(format!("{agent_id}-enc-1"))],
            ttl: Duration::from_secs(3600),
            rpc,
            sequences: HashMap::new(),
            verifying: HashMap::new(),
            pins: HashMap::new(),
            trust_unsigned_agents: false,
            chains: HashMap::new(),
            seen: Seen::default(),
        }
    }

    pub fn rpc(&mut self) -> &mut Rpc {
        &mut self.rpc
    }

    /// Registers the signing key (with its proof of possession) and the newest encryption key,
    /// endorsed by it.
    pub async fn register(&mut self) -> Result<(), ClientError> {
        let signing = pb::RegisterKeyRequest {
            agent_id: self.agent_id.clone(),
            key_id: self.signing.key_id.clone(),
            purpose: KeyPurpose::Signing as i32,
            public_key: self.signing.public().to_vec(),
            proof: self.signing.proof(&self.tenant, &self.agent_id),
            ..Default::default()
        };
        self.rpc.register_key(signing).await?;
        let newest = self.encryption.last().expect("an encryption key");
        let request = self.endorsed(
            &newest.key_id,
            KeyPurpose::Encryption,
            newest.public(),
            None,
        );
        self.rpc.register_key(request).await?;
        Ok(())
    }

    /// Rotates the encryption key: the new key is registered, endorsed by the signing key; the
    /// old one stays valid (and held here) for `overlap`.
    pub async fn rotate_encryption(
        &mut self,
        key_id: &str,
        overlap: Duration,
    ) -> Result<(), ClientError> {
        let key = EncryptionKeyPair::generate(key_id);
        let request = self.endorsed(key_id, KeyPurpose::Encryption, key.public(), Some(overlap));
        self.rpc.register_key(request).await?;
        self.encryption.push(key);
        Ok(())
    }

    /// Rotates the signing key: the current one endorses the next, which signs from then on;
    /// the current one stays valid for `overlap` (messages it signed still verify).
    pub async fn rotate_signing(
        &mut self,
        key_id: &str,
        overlap: Duration,
    ) -> Result<(), ClientError> {
        let next = SigningKeyPair::generate(key_id);
        let mut request = self.endorsed(key_id, KeyPurpose::Signing, next.public(), Some(overlap));
        request.proof = next.proof(&self.tenant, &self.agent_id);
        self.rpc.register_key(request).await?;
        self.signing = next;
        Ok(())
    }

    /// A registration of this agent's new key, endorsed by its current signing key.
    fn endorsed(
        &self,
        key_id: &str,
        purpose: KeyPurpose,
        public: [u8; 32],
        overlap: Option<Duration>,
    ) -> pb::RegisterKeyRequest {
        pb::RegisterKeyRequest {
            agent_id: self.agent_id.clone(),
            key_id: key_id.to_string(),
            purpose: purpose as i32,
            public_key: public.to_vec(),
            overlap: overlap.map(|d| d.try_into().expect("overlap fits")),
            proof: Vec::new(),
            endorsed_by: self.signing.key_id.clone(),
            endorsement: self.signing.endorse(
                &self.tenant,
                &self.agent_id,
                key_id,
                purpose,
                &public,
            ),
        }
    }

    /// `agent`'s keys as the directory lists them (retired and revoked ones too, for the
    /// chains), and the ids this client trusts: `None` for an agent without a signing key,
    /// which has nothing to vouch for its keys.
    async fn listed_keys(
        &mut self,
        agent: &str,
    ) -> Result<(Vec<pb::AgentKey>, Option<HashSet<trust::TrustedKey>>), ClientError> {
        let keys = self
            .rpc
            .lookup_keys(pb::LookupKeysRequest {
                agent_id: agent.to_string(),
                include_inactive: true,
            })
            .await?
            .into_inner()
            .keys;
        let root = match self.pins.get(agent) {
            Some(root) => root.clone(),
            None => match trust::chain_root(&keys) {
                Some(root) => self.pins.entry(agent.to_string()).or_insert(root).clone(),
                // Signing keys, none of which can be a root: the listing is not a chain.
                None if keys.iter().any(|k| k.purpose == KeyPurpose::Signing as i32) => {
                    return Err(ClientError::Untrusted(format!(
                        "the directory lists signing keys for agent {agent:?} but none that begins a chain of endorsements: it cannot be checked"
                    )))
                }
                // No signing key at all: nothing can vouch for its keys, so they are used
                // only when the caller said so.
                None if self.trust_unsigned_agents => return Ok((keys, None)),
                None => {
                    return Err(ClientError::Untrusted(format!(
                        "agent {agent:?} has no signing key to vouch for its keys; set trust_unsigned_agents to seal to such agents as the directory lists them"
                    )))
                }
            },
        };
        // The chain's signatures are checked once per listing: `send` looks keys up for every
        // message, and the listing rarely changes.
        if let Some((listed, pinned, trusted)) = self.chains.get(agent) {
            if *listed == keys && *pinned == root {
                let trusted = trusted.clone();
                return Ok((keys, Some(trusted)));
            }
        }
        let trusted =
            trust::trusted(&self.tenant, agent, &root, &keys).map_err(ClientError::Untrusted)?;
        self.chains
            .insert(agent.to_string(), (keys.clone(), root, trusted.clone()));
        Ok((keys, Some(trusted)))
    }

    fn untrusted(&self, agent: &str, what: &str) -> ClientError {
        ClientError::Untrusted(format!(
            "{what} of agent {agent:?} is not vouched for by the signing key this client pinned for it: \
             the directory lists keys that may not be {agent}'s own; if {agent} really started over, \
             check its new keys out of band, then call trust_anew({agent:?})"
        ))
    }

    /// Forgets the signing key pinned for `agent`, so the next look pins the root of its
    /// current chain: after its new keys were confirmed out of band.
    pub fn trust_anew(&mut self, agent: &str) {
        self.pins.remove(agent);
        self.chains.remove(agent);
        self.verifying.retain(|(a, _), _| a != agent);
    }

    /// The recipient's usable encryption keys that this client trusts, from the directory.
    pub async fn recipient_keys(
        &mut self,
        to: &str,
    ) -> Result<Vec<(String, Vec<u8>)>, ClientError> {
        let (keys, trusted) = self.listed_keys(to).await?;
        let usable = |k: &pb::AgentKey| {
            k.purpose == KeyPurpose::Encryption as i32
                && matches!(
                    KeyStatus::try_from(k.status),
                    Ok(KeyStatus::Active | KeyStatus::Rotating)
                )
        };
        let trusted_keys: Vec<(String, Vec<u8>)> = keys
            .iter()
            .filter(|k| usable(k))
            .filter(|k| trusted.as_ref().is_none_or(|t| trust::is_trusted(t, k)))
            .map(|k| (k.key_id.clone(), k.public_key.clone()))
            .collect();
        if trusted_keys.is_empty() && keys.iter().any(usable) {
            return Err(self.untrusted(to, "every usable encryption key"));
        }
        Ok(trusted_keys)
    }

    /// The next sequence for `to`: strictly increasing, and seeded from the clock in
    /// microseconds so a restarted agent without stored counters still moves forward.
    pub fn next_sequence(&mut self, to: &str) -> u64 {
        let clock = Utc::now().timestamp_micros().max(1) as u64;
        let next = self
            .sequences
            .get(to)
            .map_or(clock, |last| (last + 1).max(clock));
        self.sequences.insert(to.to_string(), next);
        next
    }

    /// Seals `plaintext` for `to`'s given keys, with a new message id and sequence.
    pub fn seal(
        &mut self,
        to: &str,
        recipient_keys: &[(String, Vec<u8>)],
        plaintext: &[u8],
    ) -> Result<pb::Envelope, ClientError> {
        let sequence = self.next_sequence(to);
        let message_id = uuid::Uuid::now_v7().to_string();
        Ok(domain::seal(
            &SealParams {
                tenant: &self.tenant,
                sender_agent_id: &self.agent_id,
                signing_key: &self.signing,
                recipient_agent_id: to,
                recipient_keys,
                message_id: &message_id,
                sequence,
                created_at: Utc::now(),
                ttl: self.ttl,
                content_type: "application/octet-stream",
            },
            plaintext,
        )?)
    }

    /// Looks up `to`'s keys, seals and sends.
    pub async fn send(
        &mut self,
        to: &str,
        plaintext: &[u8],
    ) -> Result<pb::SendResponse, ClientError> {
        let keys = self.recipient_keys(to).await?;
        let envelope = self.seal(to, &keys, plaintext)?;
        self.send_envelope(envelope).await
    }

    pub async fn send_envelope(
        &mut self,
        envelope: pb::Envelope,
    ) -> Result<pb::SendResponse, ClientError> {
        Ok(self
            .rpc
            .send(pb::SendRequest {
                envelope: Some(envelope),
            })
            .await?
            .into_inner())
    }

    /// Sends several envelopes in one call (at most 1,000): one answer per envelope, in order,
    /// each what Send would have answered.
    pub async fn send_batch(
        &mut self,
        envelopes: Vec<pb::Envelope>,
    ) -> Result<Vec<Result<pb::SendResponse, Status>>, ClientError> {
        Ok(self
            .rpc
            .send_batch(pb::SendBatchRequest { envelopes })
            .await?
            .into_inner()
            .results
            .into_iter()
            .map(|r| match r.code {
                0 => Ok(pb::SendResponse {
                    cursor: r.cursor,
                    duplicate: r.duplicate,
                }),
                code => Err(Status::new(tonic::Code::from(code), r.message)),
            })
            .collect())
    }

    /// This agent's messages after `after_cursor` (0: after the last acknowledged one).
    pub async fn receive(
        &mut self,
        after_cursor: u64,
    ) -> Result<Streaming<pb::ReceivedMessage>, ClientError> {
        Ok(self
            .rpc
            .receive(pb::ReceiveRequest {
                agent_id: self.agent_id.clone(),
                after_cursor,
                ack_wait: None,
            })
            .await?
            .into_inner())
    }

    /// The sender's verifying key for the envelope's key id (from the directory, cached).
    async fn sender_key(&mut self, agent: &str, key_id: &str) -> Result<SenderKey, ClientError> {
        let cache_key = (agent.to_string(), key_id.to_string());
        if let Some(k) = self
            .verifying
            .get(&cache_key)
            .filter(|k| k.fetched.elapsed() < SENDER_KEY_TTL)
        {
            return Ok(*k);
        }
        let (keys, trusted) = self.listed_keys(agent).await?;
        let found = keys
            .into_iter()
            .find(|k| k.key_id == key_id && k.purpose == KeyPurpose::Signing as i32)
            .ok_or_else(|| {
                Status::not_found(format!("sender {agent} has no signing key {key_id}"))
            })?;
        if !trusted.is_some_and(|t| trust::is_trusted(&t, &found)) {
            return Err(self.untrusted(agent, &format!("signing key {key_id:?}")));
        }
        let time = domain::envelope::time_of;
        let not_after = match (time(&found.revoked_at), time(&found.valid_until)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let key = SenderKey {
            key: keys::verifying_key(&found.public_key)?,
            not_after,
            fetched: std::time::Instant::now(),
        };
        self.verifying.insert(cache_key, key);
        Ok(key)
    }

    /// Forgets the senders' keys looked up so far: the next message of each is checked
    /// against the directory (after news of a compromised key, say).
    pub fn forget_sender_keys(&mut self) {
        self.verifying.clear();
    }

    /// Verifies the sender's signature, then decrypts with this agent's keys. A message the
    /// server stored after the sender's key was revoked (or retired) is refused: whatever
    /// signed it then may not be the sender.
    pub async fn open(&mut self, message: &pb::ReceivedMessage) -> Result<Opened, ClientError> {
        let envelope = message
            .envelope
            .as_ref()
            .ok_or_else(|| EnvelopeError::Malformed("no envelope".into()))?;
        let header = domain::envelope::header(envelope)?;
        // Signed for another tenant's agent of the same name: not a message to this one.
        if header.tenant != self.tenant {
            return Err(ClientError::Envelope(EnvelopeError::Invalid(format!(
                "sealed in tenant {:?}, not {:?}",
                header.tenant, self.tenant
            ))));
        }
        let key = self
            .sender_key(&header.sender_agent_id, &header.sender_key_id)
            .await?;
        if let Some(not_after) = key.not_after {
            // Without the time it was stored, a message signed after the key stopped cannot
            // be told apart: refused, not let through.
            let invalid = |why: String| Err(ClientError::Envelope(EnvelopeError::Invalid(why)));
            match domain::envelope::time_of(&message.stored_at) {
                None => {
                    return invalid(format!(
                        "signed with {}'s key {}, which stopped signing at {not_after}, and the server gave no time it was stored",
                        header.sender_agent_id, header.sender_key_id
                    ))
                }
                Some(stored) if stored >= not_after + CLOCK_TOLERANCE => {
                    return invalid(format!(
                        "signed with {}'s key {}, which stopped signing at {not_after} before the message was stored at {stored}",
                        header.sender_agent_id, header.sender_key_id
                    ))
                }
                Some(_) => {}
            }
        }
        let opened = domain::open(
            envelope,
            &key.key,
            &self.agent_id,
            &self.encryption,
            Utc::now(),
        )?;
        // Checked here too, not left to the server: a server that hands out again a message
        // this client acknowledged, or another one under an opened sequence, is caught.
        let h = &opened.header;
        self.seen
            .check(&h.sender_agent_id, h.sequence, &h.message_id)
            .map_err(|why| ClientError::Envelope(EnvelopeError::Invalid(why)))?;
        self.seen.opened(
            message.cursor,
            &h.sender_agent_id,
            h.sequence,
            &h.message_id,
        );
        Ok(opened)
    }

    pub async fn ack(&mut self, through_cursor: u64) -> Result<u64, ClientError> {
        let acked = self
            .rpc
            .ack(pb::AckRequest {
                agent_id: self.agent_id.clone(),
                through_cursor,
            })
            .await?
            .into_inner()
            .acked_through;
        // What this client asked to acknowledge, not what the server answers: a server that
        // answered less would keep acknowledged messages open to replay.
        self.seen.acked_through(through_cursor);
        Ok(acked)
    }
}
