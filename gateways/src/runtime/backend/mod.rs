//! Isolation backends: where a sandbox's processes actually run.
//!
//! A backend prepares sandboxes ([`IsolationBackend::prepare`]); a sandbox runs commands
//! ([`Sandbox::exec`]), changes its egress policy while it runs, checkpoints its writable layer
//! and is terminated. Two backends implement the traits:
//!
//! - [`bwrap::BwrapBackend`], the Linux backend: bubblewrap in user, pid, mount, ipc, uts and
//!   cgroup namespaces, inside a network namespace of its own whose only way out is a transparent
//!   egress proxy on the host side, cgroup limits on memory, pids and CPU, a disk of its own
//!   for the writable layer, a seccomp filter, no new privileges, and an unprivileged host uid.
//! - [`runsc::RunscBackend`], gVisor, used when configured and `runsc` is installed.
//!
//! A Kata backend fits the same traits (a VM per sandbox, `exec` through its agent).
//!
//! **Processes do not survive their exec**: every [`Sandbox::exec`] runs in a fresh pid
//! namespace, and everything it started is killed when its command exits (or times out). State
//! persists in the writable layer (`/home/sandbox` and `/tmp`), which is also what
//! [`Sandbox::checkpoint`] captures and [`SandboxSpec::restore`] brings back.

pub mod bwrap;
mod cgroup;
mod claimed_name;
mod disk;
pub mod egress_proxy;
mod host;
mod layer;
mod netns;
pub mod runsc;
pub mod seccomp;
pub mod template;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use creto_domain::runtime::egress::EgressPolicy;
use serde::Deserialize;
use tokio::sync::mpsc;

pub use template::Template;

/// The most bytes a checkpoint archive may hold, compressed, and the most bytes a restore may
/// unpack.
pub const MAX_CHECKPOINT_BYTES: u64 = 1 << 30;

/// What to prepare.
#[derive(Clone, Debug)]
pub struct SandboxSpec {
    /// `[a-z0-9-]`, 1 to 36 characters (a UUID fits); names the network namespace, the cgroups
    /// and the layer directory, so it must be unique among the backend's live sandboxes.
    pub id: String,
    pub template: Arc<Template>,
    pub limits: ResourceLimits,
    /// Environment of every exec (an exec's own variables override these).
    pub env: BTreeMap<String, String>,
    pub egress: EgressPolicy,
    /// A checkpoint archive (from [`Sandbox::checkpoint`]) to unpack into the writable layer.
    pub restore: Option<Bytes>,
}

/// A sandbox's resource limits, enforced by cgroups (or by the backend's equivalent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourceLimits {
    /// Memory (resident plus swap) of all the sandbox's processes together.
    pub memory_bytes: u64,
    /// Processes and threads alive at once.
    pub pids: u32,
    /// CPU time per wall-clock second, in thousandths of a CPU (1000 = one full CPU).
    pub cpu_millis: u32,
    /// Size of the writable layer (`/home/sandbox` and `/tmp` together), a filesystem of its
    /// own ([`disk`]).
    pub disk_bytes: u64,
}

impl ResourceLimits {
    pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
    pub const MAX_MEMORY_BYTES: u64 = 64 << 30;
    pub const MIN_PIDS: u32 = 8;
    pub const MAX_PIDS: u32 = 32_768;
    pub const MIN_CPU_MILLIS: u32 = 10;
    pub const MAX_CPU_MILLIS: u32 = 64_000;
    pub const MIN_DISK_BYTES: u64 = 16 << 20;
    pub const MAX_DISK_BYTES: u64 = 1 << 40;

    /// Checks each limit against its bounds; the error names the field, the value and the range.
    pub fn validate(&self) -> Result<(), BackendError> {
        fn check<T: PartialOrd + std::fmt::Display>(
            field: &str,
            v: T,
            lo: T,
            hi: T,
            unit: &str,
        ) -> Result<(), BackendError> {
            if v < lo || v > hi {
                return Err(BackendError::InvalidSpec(format!(
                    "{field} {v} is outside {lo}..={hi}{unit}"
                )));
            }
            Ok(())
        }
        check(
            "memory_bytes",
            self.memory_bytes,
            Self::MIN_MEMORY_BYTES,
            Self::MAX_MEMORY_BYTES,
            " bytes (16 MiB to 64 GiB)",
        )?;
        check("pids", self.pids, Self::MIN_PIDS, Self::MAX_PIDS, "")?;
        check(
            "cpu_millis",
            self.cpu_millis,
            Self::MIN_CPU_MILLIS,
            Self::MAX_CPU_MILLIS,
            " (thousandths of a CPU; 1000 = one CPU)",
        )?;
        check(
            "disk_bytes",
            self.disk_bytes,
            Self::MIN_DISK_BYTES,
            Self::MAX_DISK_BYTES,
            " bytes (16 MiB to 1 TiB)",
        )
    }
}

impl Default for ResourceLimits {
    /// 512 MiB, 256 processes, one CPU, 1 GiB of disk.
    fn default() -> Self {
        ResourceLimits {
            memory_bytes: 512 << 20,
            pids: 256,
            cpu_millis: 1000,
            disk_bytes: 1 << 30,
        }
    }
}

/// One command to run in a sandbox.
#[derive(Clone, Debug)]
pub struct ExecRequest {
    /// The program (looked up on `PATH` inside the sandbox) and its arguments.
    pub argv: Vec<String>,
    /// Written to the command's standard input, which is then closed.
    pub stdin: Vec<u8>,
    /// Added to (and overriding) the sandbox's environment.
    pub env: BTreeMap<String, String>,
    /// Wall-clock limit from start; past it every process of the exec is killed.
    pub timeout: Duration,
    /// Absolute directory inside the sandbox; `/home/sandbox` when `None`.
    pub workdir: Option<String>,
}

impl ExecRequest {
    /// The longest timeout an exec may ask for.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

    /// `argv` with no stdin, no extra environment, a 60 s timeout.
    pub fn new(argv: impl IntoIterator<Item = impl Into<String>>) -> ExecRequest {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            stdin: Vec::new(),
            env: BTreeMap::new(),
            timeout: Duration::from_secs(60),
            workdir: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), BackendError> {
        let bad = |m: String| Err(BackendError::InvalidSpec(m));
        if self.argv.is_empty() || self.argv[0].is_empty() {
            return bad("argv is empty; give the program to run and its arguments".into());
        }
        if let Some(a) = self.argv.iter().find(|a| a.contains('\0')) {
            return bad(format!("argument {a:?} contains a NUL byte"));
        }
        validate_env(&self.env)?;
        if self.timeout.is_zero() || self.timeout > Self::MAX_TIMEOUT {
            return bad(format!("timeout {:?} is outside 1ms..=24h", self.timeout));
        }
        if let Some(w) = &self.workdir {
            if !w.starts_with('/') || w.contains('\0') {
                return bad(format!(
                    "workdir {w:?} must be an absolute path inside the sandbox"
                ));
            }
        }
        Ok(())
    }
}

pub(crate) fn validate_env(env: &BTreeMap<String, String>) -> Result<(), BackendError> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(BackendError::InvalidSpec(format!(
                "environment variable name {k:?} must be non-empty and hold no '=' or NUL"
            )));
        }
        if v.contains('\0') {
            return Err(BackendError::InvalidSpec(format!(
                "environment variable {k} holds a NUL byte"
            )));
        }
    }
    Ok(())
}

/// Output of a running exec, in the order it was read from each stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecChunk {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// How an exec ended.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ExecOutcome {
    /// The command's exit status; `None` when it was ended by a signal.
    pub exit_code: Option<i32>,
    /// The signal that ended the command. bubblewrap reports a command killed by signal N as
    /// status 128+N (like a shell does), so a status from 129 to 192 is reported as that signal.
    pub signal: Option<i32>,
    /// The exec ran past its timeout and was killed.
    pub timed_out: bool,
    /// The kernel's OOM killer killed a process of the sandbox during the exec (memory limit).
    pub oom_killed: bool,
    /// A fork or clone failed at the sandbox's pids limit during the exec.
    pub pids_limited: bool,
    /// The writable layer had no space or inode left when the command ended (its disk limit).
    pub disk_full: bool,
    pub duration: Duration,
}

/// One connection attempt from a sandbox, as the egress proxy decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressAttempt {
    pub sandbox_id: String,
    /// Where the sandbox tried to connect (the original destination).
    pub destination: SocketAddr,
    pub allowed: bool,
    /// The canonical rule that allowed it.
    pub rule: Option<String>,
    /// The name the sandbox resolved for this address through the sandbox's DNS, if any.
    pub host: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request is wrong; the message says what to change.
    #[error("{0}")]
    InvalidSpec(String),
    /// The backend cannot run on this machine or with this configuration.
    #[error("isolation backend unavailable: {0}")]
    Unavailable(String),
    #[error("a sandbox with id {0:?} already exists")]
    AlreadyExists(String),
    #[error("sandbox {0} is terminated")]
    Terminated(String),
    /// The sandbox could not be set up or the command could not be started.
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackendError {
        let context = context.into();
        move |source| BackendError::Io { context, source }
    }
}

/// A way to run sandboxes.
#[async_trait]
pub trait IsolationBackend: Send + Sync {
    /// `"bwrap"` or `"runsc"`: the `backend` label of the runtime metrics.
    fn name(&self) -> &'static str;

    /// Creates a sandbox ready to exec: namespaces, cgroups, writable layer (restored from
    /// `spec.restore` if given) and egress proxy. Every connection attempt of the sandbox is
    /// reported on `egress_tx`.
    async fn prepare(
        &self,
        spec: SandboxSpec,
        egress_tx: mpsc::UnboundedSender<EgressAttempt>,
    ) -> Result<Arc<dyn Sandbox>, BackendError>;

    /// Removes what sandboxes of this backend's instance left behind when a previous process
    /// died without terminating them (network namespaces, cgroups, layer directories), sparing
    /// the live sandboxes of this process. Returns how many sandboxes it cleaned.
    async fn cleanup_orphans(&self) -> Result<usize, BackendError>;

    /// Looks up a template by name (`base`, or one loaded from the templates directory).
    fn template(&self, name: &str) -> Option<Arc<Template>>;
}

/// A prepared sandbox.
#[async_trait]
pub trait Sandbox: Send + Sync {
    fn id(&self) -> &str;

    /// Runs one command to completion, streaming its output on `out` as it comes (a dropped
    /// receiver is fine: the output is then discarded). Several execs may run at once; each is
    /// killed on its own timeout, but they share the sandbox's limits and counters, so an OOM
    /// kill or pids-limit hit during two overlapping execs is reported by both.
    async fn exec(
        &self,
        req: ExecRequest,
        out: mpsc::Sender<ExecChunk>,
    ) -> Result<ExecOutcome, BackendError>;

    /// Replaces the egress policy; it decides the next connection attempt (connections already
    /// open stay open).
    fn set_egress(&self, policy: EgressPolicy);

    /// The current egress policy.
    fn egress(&self) -> EgressPolicy;

    /// The writable layer (`/home/sandbox` as `home/`, `/tmp` as `tmp/`) as a tar.gz archive:
    /// directories, regular files and symbolic links (sockets and FIFOs are left out).
    async fn checkpoint(&self) -> Result<Vec<u8>, BackendError>;

    /// Kills every process, removes the network namespace, cgroups and layer. Idempotent.
    async fn terminate(&self) -> Result<(), BackendError>;
}

/// Which backend to run, and its settings (`[runtime.backend]` in the config file).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// `bwrap` (default) or `runsc`.
    pub kind: BackendKind,
    /// Where layers, generated template files and checkpoints in progress live.
    pub root: PathBuf,
    /// Names this process's sandboxes on the host (`creto-<instance>-<id>` network namespaces,
    /// `creto/<instance>/<id>` cgroups): `[a-z0-9]`, 1 to 12 characters. Two processes on one
    /// host need different instances and roots.
    pub instance: String,
    /// The host uid and gid sandbox processes run as (the sandbox sees itself as uid 1000).
    pub sandbox_uid: u32,
    pub sandbox_gid: u32,
    /// Extra templates: `<templates_dir>/<name>/rootfs/`.
    pub templates_dir: Option<PathBuf>,
    /// The cgroup under which `<instance>/<id>` cgroups are made, relative to each hierarchy's
    /// root (v1: `/sys/fs/cgroup/<controller>/`, v2: `/sys/fs/cgroup/`). Default `creto`.
    pub cgroup_parent: PathBuf,
    /// The `bwrap` binary; looked up on `PATH` when relative.
    pub bwrap_path: PathBuf,
    /// The `runsc` binary; looked up on `PATH` when relative.
    pub runsc_path: PathBuf,
    /// gVisor platform: `systrap` (default), `ptrace` or `kvm`.
    pub runsc_platform: String,
    /// Networks the egress proxy never connects to, whatever a sandbox's policy allows
    /// (default [`DEFAULT_PLATFORM_DENY`](creto_domain::runtime::egress::DEFAULT_PLATFORM_DENY)).
    pub egress_deny: EgressPolicy,
    /// Proxied connections of every sandbox of this process together (each takes two of the
    /// gateway's descriptors). None: an eighth of the descriptor limit, so sandboxes together
    /// leave the gateway three quarters of it for gRPC, exec pipes and checkpoints.
    pub max_proxied_connections: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Bwrap,
    Runsc,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            kind: BackendKind::Bwrap,
            root: PathBuf::from("/var/lib/enablement/runtime"),
            instance: "default".into(),
            sandbox_uid: 65534,
            sandbox_gid: 65534,
            templates_dir: None,
            cgroup_parent: PathBuf::from("creto"),
            bwrap_path: PathBuf::from("bwrap"),
            runsc_path: PathBuf::from("runsc"),
            runsc_platform: "systrap".into(),
            egress_deny: default_egress_deny(),
            max_proxied_connections: None,
        }
    }
}

/// [`DEFAULT_PLATFORM_DENY`](creto_domain::runtime::egress::DEFAULT_PLATFORM_DENY) parsed.
pub fn default_egress_deny() -> EgressPolicy {
    default_egress_deny_except(&[])
}

/// The default deny list without the networks `except` names as written there.
pub fn default_egress_deny_except(except: &[&str]) -> EgressPolicy {
    let text: Vec<String> = creto_domain::runtime::egress::DEFAULT_PLATFORM_DENY
        .iter()
        .filter(|n| !except.contains(n))
        .map(|s| s.to_string())
        .collect();
    creto_domain::runtime::egress::platform_deny(&text).expect("the default deny list parses")
}

impl BackendConfig {
    pub(crate) fn validate(&self) -> Result<(), BackendError> {
        creto_domain::runtime::egress::networks_only(&self.egress_deny)
            .map_err(|e| BackendError::InvalidSpec(format!("egress_deny: {e}")))?;
        let i = &self.instance;
        if i.is_empty()
            || i.len() > 12
            || !i
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return Err(BackendError::InvalidSpec(format!(
                "runtime instance {i:?} must be 1 to 12 characters of [a-z0-9]"
            )));
        }
        if self.sandbox_uid == 0 || self.sandbox_gid == 0 {
            return Err(BackendError::InvalidSpec(
                "sandbox_uid and sandbox_gid must not be 0 (root)".into(),
            ));
        }
        if self.cgroup_parent.is_absolute()
            || self
                .cgroup_parent
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(BackendError::InvalidSpec(format!(
                "cgroup_parent {:?} must be a relative path without \"..\"",
                self.cgroup_parent
            )));
        }
        Ok(())
    }
}

/// Checks a sandbox id: `[a-z0-9-]`, 1 to 36 characters, not starting with `-`.
pub fn validate_sandbox_id(id: &str) -> Result<(), BackendError> {
    if id.is_empty()
        || id.len() > 36
        || id.starts_with('-')
        || !id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(BackendError::InvalidSpec(format!(
            "sandbox id {id:?} must be 1 to 36 characters of [a-z0-9-], not starting with '-'"
        )));
    }
    Ok(())
}

/// Finds a program: an absolute or relative-with-slash path as is, a bare name on `PATH`.
pub(crate) fn find_program(p: &Path) -> Option<PathBuf> {
    if p.components().count() > 1 {
        return p.is_file().then(|| p.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(p))
        .find(|c| c.is_file())
}

/// The backend the configuration asks for: `runsc` only when configured, and then an error if
/// `runsc` is not installed (no silent fallback to a weaker isolation).
pub fn select_backend(config: &BackendConfig) -> Result<Arc<dyn IsolationBackend>, BackendError> {
    config.validate()?;
    match config.kind {
        BackendKind::Bwrap => Ok(Arc::new(bwrap::BwrapBackend::new(config.clone())?)),
        BackendKind::Runsc => Ok(Arc::new(runsc::RunscBackend::new(config.clone())?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked_with_clear_messages() {
        ResourceLimits::default().validate().unwrap();
        let e = ResourceLimits {
            pids: 3,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert_eq!(e, "pids 3 is outside 8..=32768");
        let e = ResourceLimits {
            memory_bytes: 1,
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("memory_bytes 1 is outside"), "{e}");
    }

    #[test]
    fn ids_and_instances() {
        validate_sandbox_id("3f2b8c1e-0d6a-4e55-9a7b-1c2d3e4f5a6b").unwrap();
        for bad in ["", "-a", "A", "a_b", "a/b", &"a".repeat(37)] {
            assert!(validate_sandbox_id(bad).is_err(), "{bad}");
        }
        let mut c = BackendConfig::default();
        c.validate().unwrap();
        c.instance = "Prod".into();
        assert!(c.validate().is_err());
        c.instance = "p1".into();
        c.cgroup_parent = "../x".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn exec_requests_are_checked() {
        assert!(ExecRequest::new(Vec::<String>::new()).validate().is_err());
        let mut r = ExecRequest::new(["true"]);
        r.validate().unwrap();
        r.workdir = Some("rel".into());
        assert!(r.validate().is_err());
        r.workdir = None;
        r.env.insert("A=B".into(), "x".into());
        assert!(r.validate().is_err());
    }
}
