//! Keyed `Nats-Msg-Id`s for the platform's appends.
//!
//! JetStream deduplicates by `Nats-Msg-Id` across a whole stream, and producers publish on the
//! METERING stream with ids of their own choosing. With the platform's ids in the clear
//! (`<tenant>:<subscription>:<event id>` for a gRPC ingest, `invoice:…`, `void:…`), a producer
//! holding nothing but its own subject's credentials could publish one of them first: the
//! platform's write is then acknowledged as a duplicate and dropped (an event never billed, a
//! void or a plan attachment that silently does nothing). The adapter sends an HMAC of the id
//! instead, under a key kept in a stream of its own that producers' credentials cannot read;
//! every replica loads the same key, so a retry still carries the same `Nats-Msg-Id`.
use async_nats::jetstream::{self, stream};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::log::LogError;

/// The stream (and subject) holding the key: one message, never expiring.
pub const KEY_STREAM: &str = "ENABLEMENT_KEYS";
const KEY_SUBJECT: &str = "enablement.keys.msg-id";

#[derive(Clone)]
pub struct IdKey(Hmac<Sha256>);

impl IdKey {
    /// Loads the key, creating it when no replica has yet (the first writer wins; the others
    /// read what it wrote).
    /// `replicas`: as many as the platform's streams have (created with one, the key's only
    /// copy made every start fail while its server was down).
    pub async fn load(context: &jetstream::Context, replicas: usize) -> Result<IdKey, LogError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            LogError::Unavailable(format!(
                "cannot load the message-id key ({KEY_STREAM}): {e}"
            ))
        };
        let stream = context
            .get_or_create_stream(stream::Config {
                name: KEY_STREAM.into(),
                subjects: vec![KEY_SUBJECT.into()],
                description: Some(
                    "the key of the platform's Nats-Msg-Ids: never grant producers access".into(),
                ),
                max_messages_per_subject: 1,
                storage: stream::StorageType::File,
                num_replicas: replicas.max(1),
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(&e))?;
        for _ in 0..3 {
            match stream.get_last_raw_message_by_subject(KEY_SUBJECT).await {
                Ok(m) => return IdKey::from_bytes(&m.payload),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {}
                Err(e) => return Err(unavailable(&e)),
            }
            let key: [u8; 32] = rand::random();
            // Only if the subject is still empty: two replicas starting at once keep one key.
            let publish = jetstream::message::PublishMessage::build()
                .payload(key.to_vec().into())
                .expected_last_subject_sequence(0);
            match context.send_publish(KEY_SUBJECT, publish).await {
                Ok(ack) => match ack.await {
                    Ok(_) => return IdKey::from_bytes(&key),
                    Err(e) => tracing::debug!(error = %e, "another replica stored the key first"),
                },
                Err(e) => return Err(unavailable(&e)),
            }
        }
        Err(unavailable(&"the key could be neither stored nor read"))
    }

    fn from_bytes(key: &[u8]) -> Result<IdKey, LogError> {
        if key.len() < 32 {
            return Err(LogError::Other(format!(
                "the message-id key in {KEY_STREAM} is {} bytes, not 32",
                key.len()
            )));
        }
        Ok(IdKey(
            Hmac::new_from_slice(key).expect("HMAC takes keys of any length"),
        ))
    }

    /// The `Nats-Msg-Id` of the platform's event `id`: 128 bits of its HMAC, in hex.
    pub fn msg_id(&self, id: &str) -> String {
        let mut mac = self.0.clone();
        mac.update(id.as_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}
