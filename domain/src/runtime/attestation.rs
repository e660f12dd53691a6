//! Attestation: an Ed25519-signed statement of what a sandbox is, which anyone holding the
//! runtime's public key can check without asking the platform.
//!
//! The statement is JSON with a fixed field order (serde's struct order), and the signature is
//! over a context string followed by exactly those bytes, so a verifier checks the bytes it
//! was given and parses them only after the signature holds.
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Signed before the statement, so a signature made for something else never verifies here.
pub const CONTEXT: &[u8] = b"creto-runtime-attestation/v1";
pub const ALGORITHM: &str = "ed25519";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub memory_mb: u64,
    pub pids: u32,
    pub cpu_millis: u32,
    /// The writable layer's size; 0 in a statement about a sandbox created before disks were
    /// limited (and absent from statements issued before then).
    #[serde(default)]
    pub disk_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    pub version: u32,
    pub sandbox_id: String,
    pub tenant: String,
    pub backend: String,
    pub node: String,
    pub template: String,
    /// Hex SHA-256 of the template (see the runtime's template module for what it covers).
    pub template_digest: String,
    pub limits: Limits,
    /// Hex SHA-256 of the canonical egress allowlist at the time of the statement.
    pub egress_policy_digest: String,
    pub created_at: String,
    pub issued_at: String,
    /// The sandbox's last event sequence the statement describes.
    pub version_seen: u64,
    /// Its state then (`STATE_READY`, `STATE_TERMINATED`, …): a statement about a sandbox that
    /// no longer runs says so. Empty in statements issued before it was stated.
    #[serde(default)]
    pub state: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AttestationError {
    #[error("the public key is not a valid Ed25519 key")]
    BadKey,
    #[error("the signature is not 64 bytes")]
    BadSignatureLength,
    #[error("the signature does not match the statement and key")]
    Mismatch,
    #[error("the statement is not valid JSON of the expected shape: {0}")]
    Malformed(String),
}

/// A short, stable name for a public key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    hex(&Sha256::digest(key.as_bytes())[..8])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn signed_bytes(statement: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + statement.len());
    m.extend_from_slice(CONTEXT);
    m.extend_from_slice(statement);
    m
}

/// The statement's bytes and their signature.
pub fn sign(statement: &Statement, key: &SigningKey) -> (Vec<u8>, Vec<u8>) {
    let bytes = serde_json::to_vec(statement).expect("a statement always serializes");
    let signature = key.sign(&signed_bytes(&bytes));
    (bytes, signature.to_bytes().to_vec())
}

/// Checks the signature over `statement` with `public_key`, then parses it.
pub fn verify(
    statement: &[u8],
    signature: &[u8],
    public_key: &[u8],
) -> Result<Statement, AttestationError> {
    let key: [u8; 32] = public_key
        .try_into()
        .map_err(|_| AttestationError::BadKey)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| AttestationError::BadKey)?;
    let signature: [u8; 64] = signature
        .try_into()
        .map_err(|_| AttestationError::BadSignatureLength)?;
    key.verify(&signed_bytes(statement), &Signature::from_bytes(&signature))
        .map_err(|_| AttestationError::Mismatch)?;
    serde_json::from_slice(statement).map_err(|e| AttestationError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn statement() -> Statement {
        Statement {
            version: 1,
            sandbox_id: "sb-1".into(),
            tenant: "t1".into(),
            backend: "bwrap".into(),
            node: "n1".into(),
            template: "base".into(),
            template_digest: "00".repeat(32),
            limits: Limits {
                memory_mb: 256,
                pids: 64,
                cpu_millis: 1000,
                disk_mb: 1024,
            },
            egress_policy_digest: "11".repeat(32),
            created_at: "2026-11-27T00:00:00Z".into(),
            issued_at: "2026-11-27T00:00:01Z".into(),
            version_seen: 3,
            state: "STATE_READY".into(),
        }
    }

    #[test]
    fn a_signed_statement_verifies_and_a_changed_one_does_not() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let public = key.verifying_key().to_bytes();
        let (bytes, sig) = sign(&statement(), &key);
        assert_eq!(verify(&bytes, &sig, &public).unwrap(), statement());

        let mut forged = bytes.clone();
        let at = forged.iter().position(|b| *b == b'6').unwrap();
        forged[at] = b'9';
        assert_eq!(
            verify(&forged, &sig, &public),
            Err(AttestationError::Mismatch)
        );

        let other = SigningKey::from_bytes(&[8; 32]).verifying_key().to_bytes();
        assert_eq!(
            verify(&bytes, &sig, &other),
            Err(AttestationError::Mismatch)
        );
        assert_eq!(
            verify(&bytes, &sig[..10], &public),
            Err(AttestationError::BadSignatureLength)
        );
        assert_eq!(key_id(&key.verifying_key()).len(), 16);
    }

    #[test]
    fn a_statement_issued_before_disks_were_limited_still_verifies() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut old = serde_json::to_value(statement()).unwrap();
        old["limits"].as_object_mut().unwrap().remove("disk_mb");
        let bytes = serde_json::to_vec(&old).unwrap();
        let sig = key.sign(&signed_bytes(&bytes)).to_bytes();
        let parsed = verify(&bytes, &sig, &key.verifying_key().to_bytes()).unwrap();
        assert_eq!(parsed.limits.disk_mb, 0);
    }
}
