//! The algorithms an envelope may name. Crypto agility means a header says which suite it
//! used; it never means guessing: anything not listed here is refused.
use creto_schemas::messaging::v1::{EnvelopeHeader, SignatureAlgorithm};

use super::EnvelopeError;

pub const VERSION: u32 = 2;
/// RFC 9180 identifiers.
pub const KEM_X25519_HKDF_SHA256: u32 = 0x0020;
pub const KDF_HKDF_SHA256: u32 = 0x0001;
pub const AEAD_CHACHA20_POLY1305: u32 = 0x0003;

/// The one suite this version speaks.
pub const SUITE: (u32, u32, u32) = (
    KEM_X25519_HKDF_SHA256,
    KDF_HKDF_SHA256,
    AEAD_CHACHA20_POLY1305,
);

/// Name used in metrics (`messaging_encryption_duration_seconds{algorithm}`).
pub const ALGORITHM_LABEL: &str = "hpke-x25519-sha256-chacha20poly1305";

/// Refuses any version, suite or signature algorithm this build does not implement.
pub fn check(header: &EnvelopeHeader) -> Result<(), EnvelopeError> {
    if header.version != VERSION {
        return Err(EnvelopeError::UnknownVersion(header.version));
    }
    if (header.kem_id, header.kdf_id, header.aead_id) != SUITE {
        return Err(EnvelopeError::UnknownSuite {
            kem: header.kem_id,
            kdf: header.kdf_id,
            aead: header.aead_id,
        });
    }
    if header.signature_algorithm != SignatureAlgorithm::Ed25519 as i32 {
        return Err(EnvelopeError::UnknownSignatureAlgorithm(
            header.signature_algorithm,
        ));
    }
    if header.content_key_commitment.len() != 32 {
        return Err(EnvelopeError::Malformed(
            "content_key_commitment is 32 bytes".into(),
        ));
    }
    Ok(())
}
