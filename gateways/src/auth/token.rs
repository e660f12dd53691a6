//! Bearer tokens: JWTs signed with HS256 by a rotating key ring.
//!
//! The ring is a TOML file (`ENABLEMENT_AUTH_KEYS`), re-read when it changes:
//!
//! ```toml
//! [[keys]]
//! kid = "2026-12"
//! secret = "<base64, at least 32 bytes>"   # the first key not `verify_only` signs
//! [[keys]]
//! kid = "2026-11"
//! secret = "..."
//! verify_only = true                       # still accepted while tokens signed with it live
//! ```
//!
//! Rotation: add a new key first, mark the old one `verify_only`, remove it once the tokens it
//! signed have expired. A token names its key in `kid`; a key removed from the ring stops
//! verifying at the next reload.
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{AuthMethod, Identity};

const ISSUER: &str = "creto-enablement";
const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub tenant: String,
    #[serde(default)]
    pub roles: Vec<String>,
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token has expired; mint a new one (`enablement token issue`)")]
    Expired,
    #[error(
        "the token was signed with key {0:?}, which is not in this server's key ring (removed, or from another ring); mint one with this server's ring"
    )]
    UnknownKey(String),
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("cannot issue the token: {0}")]
    NotIssued(String),
    #[error("key ring {path}: {detail}")]
    Ring { path: String, detail: String },
}

#[derive(Debug, Deserialize, Serialize, Clone)]
struct KeyEntry {
    kid: String,
    secret: String,
    #[serde(default)]
    verify_only: bool,
}

#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

struct Key {
    kid: String,
    secret: Vec<u8>,
    verify_only: bool,
}

struct Loaded {
    keys: Vec<Key>,
    modified: Option<SystemTime>,
    /// The version of the file last refused: read again at every check (a write may land
    /// within the same modification time), but reported once.
    refused: Option<Option<SystemTime>>,
}

/// The signing and verifying keys, reloaded from their file when it changes.
#[derive(Clone)]
pub struct KeyRing {
    path: Option<PathBuf>,
    loaded: Arc<RwLock<Loaded>>,
}

fn parse(path: &Path, text: &str) -> Result<Vec<Key>, TokenError> {
    let ring = |detail: String| TokenError::Ring {
        path: path.display().to_string(),
        detail,
    };
    // Where and what, never the error's own rendering: it quotes the offending line, which
    // here is a secret (and reload errors go to the logs).
    let file: KeyFile = toml::from_str(text).map_err(|e| {
        let at = e.span().map_or(String::new(), |span| {
            let before = &text[..span.start.min(text.len())];
            format!(" at line {}", before.matches('\n').count() + 1)
        });
        ring(format!("not valid TOML{at}: {}", e.message()))
    })?;
    let mut keys = Vec::new();
    for k in file.keys {
        let secret = base64::engine::general_purpose::STANDARD
            .decode(k.secret.trim())
            // Not the decoder's message: it quotes the offending character of the secret.
            .map_err(|_| ring(format!("key {:?}: secret is not base64", k.kid)))?;
        if secret.len() < MIN_SECRET_BYTES {
            return Err(ring(format!(
                "key {:?}: secret has {} bytes; use at least {MIN_SECRET_BYTES} (`enablement token keygen`)",
                k.kid,
                secret.len()
            )));
        }
        if k.kid.is_empty() || keys.iter().any(|x: &Key| x.kid == k.kid) {
            return Err(ring(format!(
                "key ids must be unique and non-empty ({:?})",
                k.kid
            )));
        }
        keys.push(Key {
            kid: k.kid,
            secret,
            verify_only: k.verify_only,
        });
    }
    if keys.is_empty() {
        return Err(ring(
            "no keys: add one with `enablement token keygen`".into(),
        ));
    }
    Ok(keys)
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// A new key entry as TOML text, for `enablement token keygen` and `enablement dev`.
pub fn keygen(kid: &str) -> String {
    use rand::RngCore;
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let entry = KeyFile {
        keys: vec![KeyEntry {
            kid: kid.to_string(),
            secret: base64::engine::general_purpose::STANDARD.encode(secret),
            verify_only: false,
        }],
    };
    toml::to_string(&entry).expect("key entry serializes")
}

/// The longest lifetime a token is issued with.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 86_400);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl KeyRing {
    /// Loads the ring from `path`; the error says what is wrong with the file.
    pub fn load(path: &Path) -> Result<KeyRing, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|e| TokenError::Ring {
            path: path.display().to_string(),
            detail: format!("cannot read it ({e}); create one with `enablement token keygen`"),
        })?;
        let keys = parse(path, &text)?;
        Ok(KeyRing {
            path: Some(path.to_path_buf()),
            loaded: Arc::new(RwLock::new(Loaded {
                keys,
                modified: modified(path),
                refused: None,
            })),
        })
    }

    /// Re-reads the file if it changed. A broken file keeps the previous keys (and says so).
    pub fn reload_if_changed(&self) -> Result<bool, TokenError> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let now = modified(path);
        if now == self.loaded.read().unwrap().modified {
            return Ok(false);
        }
        let keys = std::fs::read_to_string(path)
            .map_err(|e| TokenError::Ring {
                path: path.display().to_string(),
                detail: e.to_string(),
            })
            .and_then(|text| parse(path, &text));
        let mut loaded = self.loaded.write().unwrap();
        match keys {
            Ok(keys) => {
                *loaded = Loaded {
                    keys,
                    modified: now,
                    refused: None,
                };
                Ok(true)
            }
            Err(_) if loaded.refused == Some(now) => Ok(false),
            Err(e) => {
                loaded.refused = Some(now);
                Err(e)
            }
        }
    }

    /// Mints a token with the signing key.
    pub fn issue(
        &self,
        tenant: &str,
        subject: &str,
        roles: &[String],
        ttl: Duration,
    ) -> Result<String, TokenError> {
        super::check_tenant(tenant).map_err(TokenError::NotIssued)?;
        if subject.is_empty() {
            return Err(TokenError::NotIssued(
                "the subject must not be empty".into(),
            ));
        }
        creto_domain::text::check("subject", subject).map_err(TokenError::NotIssued)?;
        if ttl > MAX_TTL {
            return Err(TokenError::NotIssued(format!(
                "a lifetime of {} is past the limit of {} days: issue shorter-lived tokens and renew them (a leaked one stays valid for its whole lifetime)",
                humantime::format_duration(ttl),
                MAX_TTL.as_secs() / 86_400
            )));
        }
        let loaded = self.loaded.read().unwrap();
        let key = loaded
            .keys
            .iter()
            .find(|k| !k.verify_only)
            .ok_or_else(|| TokenError::Ring {
                path: self
                    .path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                detail: "every key is verify_only: none can sign".into(),
            })?;
        let iat = now_secs();
        let claims = Claims {
            sub: subject.to_string(),
            tenant: tenant.to_string(),
            roles: roles.to_vec(),
            iat,
            exp: iat + ttl.as_secs().max(1),
            iss: ISSUER.to_string(),
        };
        let header = Header {
            kid: Some(key.kid.clone()),
            ..Header::new(Algorithm::HS256)
        };
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&key.secret))
            .map_err(|e| TokenError::NotIssued(e.to_string()))
    }

    /// Verifies a token: signature by a trusted key, issuer, expiry (no leeway).
    pub fn verify(&self, token: &str) -> Result<Identity, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| {
            TokenError::Invalid(format!(
                "it is not a JWT as `enablement token issue` makes them ({e})"
            ))
        })?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| TokenError::Invalid("no key id (kid) in the header".into()))?;
        let loaded = self.loaded.read().unwrap();
        let key = loaded
            .keys
            .iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| TokenError::UnknownKey(kid.clone()))?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "iss"]);
        let data = jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(&key.secret),
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
            _ => TokenError::Invalid(e.to_string()),
        })?;
        let c = data.claims;
        super::check_tenant(&c.tenant).map_err(TokenError::Invalid)?;
        Ok(Identity {
            tenant: c.tenant,
            subject: c.sub,
            roles: c.roles,
            via: AuthMethod::Bearer,
        })
    }
}

impl super::reload::Reloadable for KeyRing {
    const WHAT: &'static str = "auth key ring";
    fn reload_if_changed(&self) -> Result<bool, String> {
        KeyRing::reload_if_changed(self).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_file(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("keys.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn issue_verify_expire_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = keygen("k1");
        let path = ring_file(dir.path(), &k1);
        let ring = KeyRing::load(&path).unwrap();
        let roles = vec!["reader".to_string()];
        let t1 = ring
            .issue("acme", "svc", &roles, Duration::from_secs(60))
            .unwrap();
        let who = ring.verify(&t1).unwrap();
        assert_eq!((who.tenant.as_str(), who.subject.as_str()), ("acme", "svc"));
        assert_eq!(who.roles, roles);
        // A subject is stored with what its caller records (an approval): nothing unstorable.
        let nul = ring.issue("acme", "svc\0", &roles, Duration::from_secs(60));
        assert!(matches!(nul, Err(TokenError::NotIssued(m)) if m.contains("NUL")));

        // Tampering breaks the signature.
        let mut forged = t1.clone();
        forged.pop();
        forged.push(if t1.ends_with('A') { 'B' } else { 'A' });
        assert!(matches!(ring.verify(&forged), Err(TokenError::Invalid(_))));

        // Expired: exp in the past.
        let expired = {
            let loaded = ring.loaded.read().unwrap();
            let claims = Claims {
                sub: "svc".into(),
                tenant: "acme".into(),
                roles: vec![],
                iat: now_secs() - 100,
                exp: now_secs() - 10,
                iss: ISSUER.into(),
            };
            let header = Header {
                kid: Some("k1".into()),
                ..Header::new(Algorithm::HS256)
            };
            jsonwebtoken::encode(
                &header,
                &claims,
                &EncodingKey::from_secret(&loaded.keys[0].secret),
            )
            .unwrap()
        };
        assert_eq!(ring.verify(&expired), Err(TokenError::Expired));

        // Rotation: k2 signs, k1 still verifies while verify_only, then is removed.
        let k2 = keygen("k2");
        let k1_old = k1.replace("verify_only = false", "verify_only = true");
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&path, format!("{k2}\n{k1_old}")).unwrap();
        bump_mtime(&path);
        assert!(ring.reload_if_changed().unwrap());
        let t2 = ring
            .issue("acme", "svc", &roles, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            jsonwebtoken::decode_header(&t2).unwrap().kid.as_deref(),
            Some("k2")
        );
        assert!(ring.verify(&t1).is_ok(), "old key still trusted");
        std::fs::write(&path, &k2).unwrap();
        bump_mtime(&path);
        assert!(ring.reload_if_changed().unwrap());
        assert_eq!(ring.verify(&t1), Err(TokenError::UnknownKey("k1".into())));
        assert!(ring.verify(&t2).is_ok());

        // A broken file is refused and the previous keys stay.
        std::fs::write(&path, "keys = 3").unwrap();
        bump_mtime(&path);
        assert!(ring.reload_if_changed().is_err());
        assert!(ring.verify(&t2).is_ok());
    }

    fn bump_mtime(path: &Path) {
        let f = std::fs::File::options().append(true).open(path).unwrap();
        let later = SystemTime::now() + Duration::from_secs(1);
        f.set_modified(later).unwrap();
    }

    #[test]
    fn weak_or_missing_keys_are_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let weak = ring_file(dir.path(), "[[keys]]\nkid = \"k\"\nsecret = \"c2hvcnQ=\"\n");
        let e = KeyRing::load(&weak).err().unwrap().to_string();
        assert!(e.contains("at least 32"), "{e}");
        let e = KeyRing::load(&dir.path().join("none.toml"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("enablement token keygen"), "{e}");
    }

    /// Refusals of a broken ring go to the logs at every reload: they say where the file is
    /// wrong, never what it holds there (a secret).
    #[test]
    fn a_broken_ring_is_refused_without_quoting_its_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "U2VjcmV0U2VjcmV0U2VjcmV0U2VjcmV0U2VjcmV0U2U";
        for text in [
            format!("[[keys]]\nkid = \"k\"\nsecret = \"{secret}\n"),
            format!("[[keys]]\nkid = \"k\"\nsecret = {secret}\n"),
            format!("[[keys]]\nkid = \"k\"\nsecret = \"{secret}-!\"\n"),
        ] {
            let path = ring_file(dir.path(), &text);
            let e = KeyRing::load(&path).err().unwrap().to_string();
            assert!(!e.contains("U2VjcmV0"), "{e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        let e = KeyRing::load(&ring_file(
            dir.path(),
            "[[keys]]\nkid = \"k\"\nsecret = \"a\n",
        ))
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("line 3"), "{e}");
    }
}
