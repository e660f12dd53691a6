//! How a replica's runtime is configured: environment variables (the README lists them), with
//! defaults that work on a developer's machine.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use creto_domain::runtime::egress::{platform_deny, EgressPolicy};
use creto_domain::runtime::sandbox::RuntimeLimits;
use ed25519_dalek::SigningKey;

use super::backend::{BackendConfig, BackendKind};

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where sandboxes keep their writable layers (and the attestation key when none is given).
    pub dir: PathBuf,
    /// `RUNTIME_NODE`: this replica's name in events; default the host name.
    pub node: String,
    /// `RUNTIME_BACKEND`: `bwrap` (default) or `runsc`.
    pub backend: String,
    /// `RUNTIME_TEMPLATES_DIR`: more templates, one `<name>/rootfs/` each, beside `base`.
    pub templates_dir: Option<PathBuf>,
    /// `RUNTIME_WARM_POOL`: `template=size,...`; default `base=2`.
    pub pool: BTreeMap<String, usize>,
    /// `RUNTIME_ATTESTATION_KEY`: a file with the Ed25519 seed, 64 hex characters. Every
    /// replica should share it so verifiers pin one key; default `<dir>/attestation.key`,
    /// created on first start.
    pub attestation_key: Option<PathBuf>,
    /// `RUNTIME_MAX_SANDBOXES_PER_TENANT` sets `max_live_per_tenant` (default 100);
    /// `RUNTIME_MEMORY_BUDGET_MB` sets `replica_memory_mb`, `RUNTIME_DISK_BUDGET_MB`
    /// `replica_disk_mb` (default none: no bound).
    pub limits: RuntimeLimits,
    /// `RUNTIME_EGRESS_DENY`: networks no sandbox reaches, comma-separated (`none`: no such
    /// list); default the host's and internal networks (`DEFAULT_PLATFORM_DENY`).
    pub egress_deny: EgressPolicy,
}

#[derive(Debug, thiserror::Error)]
#[error("runtime configuration: {0}")]
pub struct RuntimeConfigError(pub String);

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into())
}

/// `base=2,python=1` → {base: 2, python: 1}.
pub fn parse_pool(spec: &str) -> Result<BTreeMap<String, usize>, RuntimeConfigError> {
    let mut pool = BTreeMap::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, size) = part.split_once('=').ok_or_else(|| {
            RuntimeConfigError(format!(
                "RUNTIME_WARM_POOL entry {part:?}: write template=size, e.g. base=2"
            ))
        })?;
        let size: usize = size.trim().parse().map_err(|_| {
            RuntimeConfigError(format!(
                "RUNTIME_WARM_POOL entry {part:?}: the size is not a number"
            ))
        })?;
        if size > 256 {
            return Err(RuntimeConfigError(format!(
                "RUNTIME_WARM_POOL entry {part:?}: at most 256 warm sandboxes per template"
            )));
        }
        pool.insert(name.trim().to_string(), size);
    }
    Ok(pool)
}

/// A replica budget in MB from the environment: unset or `none` is no bound.
fn budget_mb(name: &str, what: &str) -> Result<Option<u64>, RuntimeConfigError> {
    match std::env::var(name).ok().filter(|v| !v.trim().is_empty()) {
        None => Ok(None),
        Some(v) if v.trim() == "none" => Ok(None),
        Some(v) => v
            .trim()
            .parse()
            .ok()
            .filter(|n| *n >= 16)
            .map(Some)
            .ok_or_else(|| {
                RuntimeConfigError(format!(
                    "{name} {v:?}: a number of MB, at least 16 ({what}), or none"
                ))
            }),
    }
}

impl RuntimeConfig {
    /// From the environment, with `dir` as the default home of the sandboxes.
    pub fn from_env(dir: &Path) -> Result<Self, RuntimeConfigError> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        Ok(RuntimeConfig {
            dir: var("RUNTIME_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| dir.to_path_buf()),
            node: var("RUNTIME_NODE").unwrap_or_else(host_name),
            backend: match var("RUNTIME_BACKEND").as_deref() {
                None | Some("bwrap") => "bwrap".into(),
                Some("runsc") => "runsc".into(),
                Some(other) => {
                    return Err(RuntimeConfigError(format!(
                        "RUNTIME_BACKEND {other:?}: choose bwrap or runsc"
                    )))
                }
            },
            templates_dir: var("RUNTIME_TEMPLATES_DIR").map(PathBuf::from),
            pool: parse_pool(&var("RUNTIME_WARM_POOL").unwrap_or_else(|| "base=2".into()))?,
            attestation_key: var("RUNTIME_ATTESTATION_KEY").map(PathBuf::from),
            limits: RuntimeLimits {
                max_live_per_tenant: match var("RUNTIME_MAX_SANDBOXES_PER_TENANT") {
                    None => RuntimeLimits::default().max_live_per_tenant,
                    Some(v) => v
                        .trim()
                        .parse()
                        .ok()
                        .filter(|n| (1..=100_000).contains(n))
                        .ok_or_else(|| {
                            RuntimeConfigError(format!(
                                "RUNTIME_MAX_SANDBOXES_PER_TENANT {v:?}: a number from 1 to 100000"
                            ))
                        })?,
                },
                replica_memory_mb: budget_mb(
                    "RUNTIME_MEMORY_BUDGET_MB",
                    "the replica's memory less the gateway's",
                )?,
                replica_disk_mb: budget_mb(
                    "RUNTIME_DISK_BUDGET_MB",
                    "the runtime volume's size less room for templates",
                )?,
                ..RuntimeLimits::default()
            },
            egress_deny: match var("RUNTIME_EGRESS_DENY") {
                None => super::backend::default_egress_deny(),
                Some(v) if v.trim() == "none" => EgressPolicy::default(),
                Some(v) => {
                    let networks: Vec<String> = v
                        .split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(str::to_string)
                        .collect();
                    platform_deny(&networks).map_err(|e| {
                        RuntimeConfigError(format!(
                            "RUNTIME_EGRESS_DENY: {e}; write comma-separated networks such as 10.0.0.0/8,[fc00::/7], or none"
                        ))
                    })?
                }
            },
        })
    }

    /// The isolation backend's settings. The instance name is derived from the directory, so
    /// a restarted process cleans up what its predecessor on the same directory left, and two
    /// processes on different directories never touch each other's sandboxes.
    pub fn backend_config(&self) -> BackendConfig {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.dir.as_os_str().as_encoded_bytes());
        BackendConfig {
            kind: if self.backend == "runsc" {
                BackendKind::Runsc
            } else {
                BackendKind::Bwrap
            },
            root: self.dir.clone(),
            instance: hex::encode(&digest[..4]),
            templates_dir: self.templates_dir.clone(),
            egress_deny: self.egress_deny.clone(),
            ..BackendConfig::default()
        }
    }

    /// The attestation key: read from its file, or created there (mode 0600) on first start.
    pub fn load_attestation_key(&self) -> Result<SigningKey, RuntimeConfigError> {
        let path = self
            .attestation_key
            .clone()
            .unwrap_or_else(|| self.dir.join("attestation.key"));
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let seed: [u8; 32] = hex::decode(text.trim())
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        RuntimeConfigError(format!(
                            "{} must hold an Ed25519 seed as 64 hex characters",
                            path.display()
                        ))
                    })?;
                Ok(SigningKey::from_bytes(&seed))
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && self.attestation_key.is_none() =>
            {
                let seed: [u8; 32] = rand::random();
                write_private(&path, &hex::encode(seed))?;
                Ok(SigningKey::from_bytes(&seed))
            }
            Err(e) => Err(RuntimeConfigError(format!(
                "cannot read {}: {e}",
                path.display()
            ))),
        }
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), RuntimeConfigError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err =
        |e: std::io::Error| RuntimeConfigError(format!("cannot write {}: {e}", path.display()));
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_specs_parse_or_say_what_is_wrong() {
        assert_eq!(
            parse_pool("base=2, python=1").unwrap(),
            BTreeMap::from([("base".to_string(), 2), ("python".to_string(), 1)])
        );
        assert!(parse_pool("").unwrap().is_empty());
        assert!(parse_pool("base")
            .unwrap_err()
            .to_string()
            .contains("template=size"));
        assert!(parse_pool("base=x").is_err());
    }

    #[test]
    fn the_attestation_key_is_created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = RuntimeConfig::from_env(dir.path()).unwrap();
        config.dir = dir.path().to_path_buf();
        config.attestation_key = None;
        let first = config.load_attestation_key().unwrap();
        let again = config.load_attestation_key().unwrap();
        assert_eq!(first.to_bytes(), again.to_bytes());
        std::fs::write(dir.path().join("attestation.key"), "nothex").unwrap();
        assert!(config.load_attestation_key().is_err());
    }
}
