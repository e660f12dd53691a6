//! Messaging: the sealed, signed envelope (client library and server checks) and the rules of
//! the agent key directory. Everything here is computation; the gateway does the I/O.
//!
//! A sender seals a payload for one recipient agent: a fresh content key encrypts the payload
//! (ChaCha20Poly1305, the header as associated data) and is wrapped with HPKE (RFC 9180, base
//! mode) for each of the recipient's current encryption keys, like age's per-recipient
//! stanzas; two keys during a rotation overlap. The sender signs the header and hashes of the
//! stanzas and the ciphertext with Ed25519. The server verifies the signature and the keys,
//! and never holds a private key. A recipient verifies before it opens.

pub mod directory;
pub mod envelope;
pub mod keys;
pub mod suite;
pub mod trust;

pub use envelope::{open, seal, verify, EnvelopeError, Opened, SealParams};
pub use keys::{EncryptionKeyPair, SigningKeyPair};

use std::time::Duration;

/// What the server accepts, so an envelope is refused before it is stored.
#[derive(Debug, Clone, Copy)]
pub struct MessagingLimits {
    pub max_ciphertext_bytes: usize,
    pub max_header_bytes: usize,
    /// Longest life a sender may give a message (expires_at - created_at).
    pub max_ttl: Duration,
    /// How far in the future `created_at` may be (sender clocks drift).
    pub max_clock_skew: Duration,
    /// Keys one message may be wrapped for (the recipient's, during rotations).
    pub max_recipient_keys: usize,
}

impl Default for MessagingLimits {
    fn default() -> Self {
        MessagingLimits {
            max_ciphertext_bytes: 256 * 1024,
            max_header_bytes: 4 * 1024,
            max_ttl: Duration::from_secs(7 * 24 * 3600),
            max_clock_skew: Duration::from_secs(5 * 60),
            max_recipient_keys: 4,
        }
    }
}

/// Agent and key ids become subject tokens and labels: letters, digits, `_`, `-` (and `.` in
/// key ids, which never enter a subject), at most 64 characters.
pub fn check_agent_id(id: &str) -> Result<(), String> {
    check_token(id, "agent id", false)
}

pub fn check_key_id(id: &str) -> Result<(), String> {
    check_token(id, "key id", true)
}

fn check_token(id: &str, what: &str, dots: bool) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || (dots && b == b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {id:?} must be 1 to 64 characters of letters, digits, '_' or '-'{}",
            if dots { " or '.'" } else { "" }
        ))
    }
}

/// Message ids: printable ASCII without spaces, at most 128 characters (a UUID fits).
pub fn check_message_id(id: &str) -> Result<(), String> {
    if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(format!(
            "message id {id:?} must be 1 to 128 printable ASCII characters without spaces"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_subject_safe() {
        assert!(check_agent_id("agent-7_b").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            assert!(check_agent_id(bad).is_err(), "{bad:?}");
        }
        assert!(check_key_id("sig-2026.11").is_ok());
        assert!(check_message_id("0193a1b2-7c3d").is_ok());
        assert!(check_message_id("has space").is_err());
    }
}
