//! The Linux backend: bubblewrap, network namespaces, cgroups and a seccomp filter.
//!
//! A sandbox is
//! - a network namespace `creto-<instance>-<id>` owned by the host (see `netns.rs`), whose only
//!   way out is the egress proxy ([`super::egress_proxy`]);
//! - cgroups `<parent>/<instance>/<id>` limiting memory (with no swap beyond it), pids and CPU;
//! - a writable layer `<root>/sandboxes/<id>/{home,tmp}` owned by the sandbox's host uid;
//! - and, per exec, one bubblewrap process.
//!
//! Each exec forks a child that, before executing `bwrap` (async-signal-safe calls on file
//! descriptors prepared before the fork), writes itself into the exec's cgroups, enters the
//! sandbox's network namespace, sets `PR_SET_NO_NEW_PRIVS` and drops to the unprivileged host
//! uid/gid (65534 by default, no supplementary groups). So `bwrap` runs unprivileged (Debian's
//! bwrap is not setuid; it relies on unprivileged user namespaces) and creates a user namespace
//! mapping the sandbox's uid 1000 to that host uid, plus pid, mount, ipc, uts and cgroup
//! namespaces; it does not create a network namespace, so the one it runs in stays owned by the
//! host's user namespace and nothing in the sandbox can change its firewall. Inside: the
//! template read-only, the writable layer at `/home/sandbox` and `/tmp`, a fresh `/proc` and
//! `/dev`, the rest of `/` read-only, `--new-session`, `--die-with-parent`, a cleared
//! environment, and the seccomp filter ([`super::seccomp`]).
//!
//! When the host disables unprivileged user namespaces (`kernel.unprivileged_userns_clone=0`,
//! or AppArmor's `kernel.apparmor_restrict_unprivileged_userns=1`), a non-setuid bwrap cannot
//! create its user namespace as an unprivileged uid. The backend then runs bwrap as root (still
//! with no new privileges and the seccomp filter), with `--uid 1000`: the sandbox's uid maps to
//! host root, so files it writes are root's on the host and host files in its view are checked
//! against root's ownership (it still has no capabilities outside its namespaces). That is
//! weaker, hence only a fallback, logged at start.
//!
//! bwrap is started from the calling tokio worker thread with `--die-with-parent`, which is
//! `PR_SET_PDEATHSIG`, tied to that thread: call `exec` from async tasks (whose worker threads
//! live as long as the runtime), not from a `spawn_blocking` thread that may exit while the
//! command runs. bwrap's own options reach it through a file descriptor (`--args`), so the
//! sandbox's pid 1 shows `bwrap --args N -- <command>` and no host paths.
//!
//! Joining the cgroups costs one cgroup migration per exec; on cgroup v1 that waits for an RCU
//! grace period (`cgroup_threadgroup_rwsem`), about 10 ms on this kind of machine, which is most
//! of the difference between an exec and a bare `bwrap true`.
//!
//! Processes do not survive their exec: bubblewrap's pid 1 ends with the command, and the
//! kernel kills the rest of the pid namespace. A timeout SIGKILLs every process in the exec's
//! cgroup (repeating until it is empty). State persists in the writable layer.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use creto_domain::runtime::egress::EgressPolicy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::cgroup::{Counters, ExecCgroup};
use super::host::{HostCommon, HostSandbox, KILL_WAIT};
use super::layer;
use super::template::{Template, TemplateMount};
use super::{
    find_program, BackendConfig, BackendError, EgressAttempt, ExecChunk, ExecOutcome, ExecRequest,
    IsolationBackend, Sandbox, SandboxSpec,
};

/// The uid and gid a sandbox sees itself as.
pub const SANDBOX_UID: u32 = 1000;

const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// The bubblewrap backend.
pub struct BwrapBackend {
    common: Arc<HostCommon>,
    bwrap: PathBuf,
    seccomp: Arc<Vec<u8>>,
    /// Run bwrap as root (see the module documentation).
    privileged: bool,
}

fn read_sysctl(p: &str) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

/// Whether an unprivileged process may create a user namespace here.
fn unprivileged_userns_allowed() -> bool {
    read_sysctl("/proc/sys/kernel/unprivileged_userns_clone").as_deref() != Some("0")
        && read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref()
            != Some("1")
}

/// Every directory above `p` must be searchable by others (the sandbox uid).
fn check_searchable(p: &Path) -> Result<(), BackendError> {
    use std::os::unix::fs::PermissionsExt as _;
    for dir in p.ancestors().skip(1) {
        let Ok(meta) = fs::metadata(dir) else {
            continue;
        };
        if meta.permissions().mode() & 0o001 == 0 {
            return Err(BackendError::Unavailable(format!(
                "{} is not reachable by the sandbox uid: {} has mode {:o}; choose a runtime root \
                 and templates under directories others may enter (/var/lib, /srv, /tmp)",
                p.display(),
                dir.display(),
                meta.permissions().mode() & 0o7777
            )));
        }
    }
    Ok(())
}

impl BwrapBackend {
    /// Checks the machine (root, bwrap, nft or iptables, cgroups, user namespaces), takes the
    /// root's lock (one process per root), compiles the seccomp filter and loads templates.
    pub fn new(config: BackendConfig) -> Result<BwrapBackend, BackendError> {
        config.validate()?;
        let bwrap = find_program(&config.bwrap_path).ok_or_else(|| {
            BackendError::Unavailable(format!(
                "{} not found; install bubblewrap (apt-get install bubblewrap)",
                config.bwrap_path.display()
            ))
        })?;
        if read_sysctl("/proc/sys/user/max_user_namespaces").as_deref() == Some("0") {
            return Err(BackendError::Unavailable(
                "user namespaces are disabled (user.max_user_namespaces = 0)".into(),
            ));
        }
        let privileged = !unprivileged_userns_allowed();
        if privileged {
            tracing::warn!(
                "unprivileged user namespaces are disabled: bwrap runs as root and sandbox \
                 files belong to host root (weaker isolation)"
            );
        }
        let seccomp = Arc::new(super::seccomp::compile()?.to_bytes());
        let common = Arc::new(HostCommon::new(config, "bwrap")?);
        if !privileged {
            // Unprivileged bwrap resolves every bind source as the sandbox uid: the runtime's
            // directories and the templates' sources must be reachable (searchable) by it.
            for d in [
                common.config.root.clone(),
                common.sandboxes_dir.clone(),
                common.config.root.join("templates"),
                common.config.root.join("templates/base"),
            ] {
                fs::set_permissions(&d, fs::Permissions::from_mode(0o711))
                    .map_err(BackendError::io(format!("chmod {}", d.display())))?;
            }
            check_searchable(&common.config.root)?;
            for t in common.templates.values() {
                for m in &t.mounts {
                    if let TemplateMount::RoBind { src, .. } = m {
                        check_searchable(src)?;
                    }
                }
            }
        }
        Ok(BwrapBackend {
            common,
            bwrap,
            seccomp,
            privileged,
        })
    }

    /// 1 or 2.
    pub fn cgroup_version(&self) -> u8 {
        self.common.cgroups.version()
    }

    /// The `bwrap` binary this backend runs.
    pub fn bwrap_path(&self) -> &Path {
        &self.bwrap
    }
}

#[async_trait]
impl IsolationBackend for BwrapBackend {
    fn name(&self) -> &'static str {
        "bwrap"
    }

    fn template(&self, name: &str) -> Option<Arc<Template>> {
        self.common.templates.get(name).cloned()
    }

    async fn prepare(
        &self,
        spec: SandboxSpec,
        egress_tx: mpsc::UnboundedSender<EgressAttempt>,
    ) -> Result<Arc<dyn Sandbox>, BackendError> {
        let owner = if self.privileged {
            (0, 0)
        } else {
            (
                self.common.config.sandbox_uid,
                self.common.config.sandbox_gid,
            )
        };
        let host = HostSandbox::prepare(&self.common, &spec, owner, egress_tx).await?;
        Ok(Arc::new(BwrapSandbox {
            host,
            bwrap: self.bwrap.clone(),
            seccomp: self.seccomp.clone(),
            drop_to: (!self.privileged).then_some((
                self.common.config.sandbox_uid,
                self.common.config.sandbox_gid,
            )),
            template: spec.template,
            env: spec.env,
        }))
    }

    async fn cleanup_orphans(&self) -> Result<usize, BackendError> {
        self.common.cleanup_orphans().await
    }
}

/// A bubblewrap sandbox.
pub struct BwrapSandbox {
    host: HostSandbox,
    bwrap: PathBuf,
    seccomp: Arc<Vec<u8>>,
    /// The host uid and gid bwrap runs as; `None` runs it as root (the fallback).
    drop_to: Option<(u32, u32)>,
    template: Arc<Template>,
    env: BTreeMap<String, String>,
}

impl BwrapSandbox {
    /// The network namespace's path (`/run/netns/creto-<instance>-<id>`).
    pub fn netns_path(&self) -> &Path {
        &self.host.netns.path
    }

    /// The writable layer's directory on the host.
    pub fn layer_dir(&self) -> &Path {
        &self.host.layer.dir
    }

    /// bwrap's options; they go through a file descriptor (`--args`), so the sandbox's pid 1
    /// shows `bwrap --args N -- <command>` and no host paths.
    fn bwrap_options(&self, req: &ExecRequest, seccomp_fd: i32, status_fd: i32) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::with_capacity(64);
        fn add<'a>(a: &mut Vec<OsString>, items: impl IntoIterator<Item = &'a str>) {
            a.extend(items.into_iter().map(OsString::from));
        }
        let uid = SANDBOX_UID.to_string();
        add(
            &mut a,
            [
                "--unshare-user",
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-cgroup-try",
                // As root (the fallback without user namespaces) bwrap keeps every capability
                // unless told otherwise.
                "--cap-drop",
                "ALL",
                "--new-session",
                "--die-with-parent",
                "--hostname",
                "sandbox",
                "--clearenv",
                "--uid",
                &uid,
                "--gid",
                &uid,
            ],
        );
        for m in &self.template.mounts {
            match m {
                TemplateMount::RoBind { src, dest } => {
                    a.push("--ro-bind".into());
                    a.push(src.into());
                    a.push(dest.into());
                }
                TemplateMount::Symlink { target, dest } => add(&mut a, ["--symlink", target, dest]),
            }
        }
        add(&mut a, ["--proc", "/proc", "--dev", "/dev"]);
        for (part, dest) in layer::PARTS {
            a.push("--bind".into());
            a.push(self.host.layer.dir.join(part).into());
            a.push(dest.into());
        }
        let (seccomp_fd, status_fd) = (seccomp_fd.to_string(), status_fd.to_string());
        add(
            &mut a,
            [
                "--remount-ro",
                "/",
                "--chdir",
                req.workdir.as_deref().unwrap_or("/home/sandbox"),
                "--seccomp",
                &seccomp_fd,
                "--json-status-fd",
                &status_fd,
            ],
        );
        let mut env: BTreeMap<&str, &str> = BTreeMap::from([
            (
                "PATH",
                "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            ),
            ("HOME", "/home/sandbox"),
            ("USER", "sandbox"),
            ("LOGNAME", "sandbox"),
            ("SHELL", "/bin/sh"),
            ("LANG", "C.UTF-8"),
            ("TMPDIR", "/tmp"),
        ]);
        for (k, v) in self.env.iter().chain(&req.env) {
            env.insert(k, v);
        }
        for (k, v) in env {
            add(&mut a, ["--setenv", k, v]);
        }
        a
    }
}

fn memfd_with(name: &std::ffi::CStr, data: &[u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is ours.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut f = fs::File::from(fd);
    std::io::Write::write_all(&mut f, data)?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
    Ok(OwnedFd::from(f))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into an array of two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads a stream into chunks until EOF, sending them while a receiver listens.
async fn pump(
    mut r: impl AsyncRead + Unpin,
    out: mpsc::Sender<ExecChunk>,
    wrap: fn(Bytes) -> ExecChunk,
    keep: usize,
) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = true;
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if kept.len() < keep {
                    kept.extend_from_slice(&buf[..n.min(keep - kept.len())]);
                }
                if open
                    && out
                        .send(wrap(Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                {
                    open = false; // receiver gone: keep draining so the command never blocks
                }
            }
        }
    }
    kept
}

#[async_trait]
impl Sandbox for BwrapSandbox {
    fn id(&self) -> &str {
        &self.host.id
    }

    async fn exec(
        &self,
        req: ExecRequest,
        out: mpsc::Sender<ExecChunk>,
    ) -> Result<ExecOutcome, BackendError> {
        req.validate()?;
        // Until the command is in the sandbox's cgroup (see HostSandbox::spawning).
        let spawning = self.host.spawning.read().unwrap_or_else(|e| e.into_inner());
        self.host.check_live()?;
        let n = self.host.exec_seq.fetch_add(1, Ordering::Relaxed);
        let exec_cg = self.host.cgroups.exec_group(n)?;
        let before = self.host.cgroups.counters();
        let seccomp = memfd_with(c"creto-seccomp", &self.seccomp)
            .map_err(BackendError::io("seccomp memfd"))?;
        let (status_r, status_w) = pipe().map_err(BackendError::io("status pipe"))?;
        let options = self.bwrap_options(&req, seccomp.as_raw_fd(), status_w.as_raw_fd());
        let mut packed = Vec::new();
        for o in &options {
            packed.extend_from_slice(o.as_encoded_bytes());
            packed.push(0);
        }
        let options_fd =
            memfd_with(c"creto-bwrap-args", &packed).map_err(BackendError::io("args memfd"))?;
        let options_arg = options_fd.as_raw_fd().to_string();

        // Everything the child touches between fork and exec is prepared here.
        let join_fds = exec_cg.join_fds();
        let netns_fd = self.host.netns.fd.as_raw_fd();
        let inherit = [
            seccomp.as_raw_fd(),
            status_w.as_raw_fd(),
            options_fd.as_raw_fd(),
        ];
        let drop_to = self.drop_to;

        let mut cmd = tokio::process::Command::new(&self.bwrap);
        cmd.args(["--args", &options_arg, "--"])
            .args(&req.argv)
            .env_clear()
            .stdin(if req.stdin.is_empty() {
                Stdio::null()
            } else {
                Stdio::piped()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // SAFETY: the closure only makes async-signal-safe system calls on values prepared
        // before the fork (no allocation, no locks).
        unsafe {
            cmd.pre_exec(move || {
                let fail = || Err(std::io::Error::last_os_error());
                for &fd in &join_fds {
                    if libc::write(fd, b"0".as_ptr() as *const libc::c_void, 1) != 1 {
                        return fail();
                    }
                }
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return fail();
                }
                for &fd in &inherit {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return fail();
                    }
                }
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return fail();
                }
                if let Some((uid, gid)) = drop_to {
                    if libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return fail();
                    }
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let spawned = cmd.spawn();
        drop(spawning);
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                exec_cg.kill(KILL_WAIT);
                exec_cg.remove();
                return Err(BackendError::Setup(format!(
                    "start {}: {e}",
                    self.bwrap.display()
                )));
            }
        };
        drop(status_w);
        drop(seccomp);
        drop(options_fd);

        if let Some(mut stdin) = child.stdin.take() {
            let data = req.stdin.clone();
            tokio::spawn(async move {
                let _ = stdin.write_all(&data).await;
                let _ = stdin.shutdown().await;
            });
        }
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let out_task = tokio::spawn(pump(stdout, out.clone(), ExecChunk::Stdout, 0));
        let err_task = tokio::spawn(pump(stderr, out, ExecChunk::Stderr, 4096));
        let status_task = tokio::spawn(async move {
            let mut s = Vec::new();
            if let Ok(mut r) = tokio::net::unix::pipe::Receiver::from_owned_fd(status_r) {
                let _ = r.read_to_end(&mut s).await;
            }
            s
        });

        let status = match tokio::time::timeout(req.timeout, child.wait()).await {
            Ok(s) => s,
            Err(_) => {
                let _ = child.start_kill();
                let cg = exec_cg;
                let cg = tokio::task::spawn_blocking(move || {
                    cg.kill(KILL_WAIT);
                    cg
                })
                .await
                .map_err(|e| BackendError::Setup(format!("kill task: {e}")))?;
                let s = child.wait().await;
                return self
                    .finish(
                        cg,
                        s,
                        started,
                        before,
                        true,
                        out_task,
                        err_task,
                        status_task,
                    )
                    .await;
            }
        };
        self.finish(
            exec_cg,
            status,
            started,
            before,
            false,
            out_task,
            err_task,
            status_task,
        )
        .await
    }

    fn set_egress(&self, policy: EgressPolicy) {
        self.host.proxy.set_policy(policy);
    }

    fn egress(&self) -> EgressPolicy {
        self.host.proxy.policy()
    }

    async fn checkpoint(&self) -> Result<Vec<u8>, BackendError> {
        self.host.checkpoint().await
    }

    async fn terminate(&self) -> Result<(), BackendError> {
        self.host.terminate().await
    }
}

impl BwrapSandbox {
    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        exec_cg: ExecCgroup,
        status: std::io::Result<std::process::ExitStatus>,
        started: Instant,
        before: Counters,
        timed_out: bool,
        out_task: tokio::task::JoinHandle<Vec<u8>>,
        err_task: tokio::task::JoinHandle<Vec<u8>>,
        status_task: tokio::task::JoinHandle<Vec<u8>>,
    ) -> Result<ExecOutcome, BackendError> {
        let duration = started.elapsed();
        // The command is gone; anything left of the exec is killed before the output is
        // awaited (a leftover holding the pipes would otherwise keep them open).
        let exec_cg = if exec_cg.is_empty() {
            exec_cg
        } else {
            tokio::task::spawn_blocking(move || {
                exec_cg.kill(KILL_WAIT);
                exec_cg
            })
            .await
            .map_err(|e| BackendError::Setup(format!("kill task: {e}")))?
        };
        // The status pipe on its own: behind stdout and stderr, which wait for the client
        // to read them, a slow reader made a command that ran and exited look never started.
        let drain = async {
            let _ = out_task.await;
            err_task.await.unwrap_or_default()
        };
        let (json, stderr) = tokio::join!(
            tokio::time::timeout(OUTPUT_DRAIN, status_task),
            tokio::time::timeout(OUTPUT_DRAIN, drain)
        );
        let json = json.ok().and_then(Result::ok).unwrap_or_default();
        let stderr = stderr.unwrap_or_default();
        let pids_refused = exec_cg.pids_refused();
        exec_cg.remove();
        let after = self.host.cgroups.counters();
        let status = status.map_err(BackendError::io("wait for bwrap"))?;
        let json = String::from_utf8_lossy(&json);
        if !json.contains("\"child-pid\"") && !timed_out {
            return Err(BackendError::Setup(format!(
                "bwrap did not start the command ({status}): {}",
                String::from_utf8_lossy(&stderr).trim()
            )));
        }
        let (exit_code, signal) = match (status.code(), status.signal()) {
            (_, Some(sig)) => (None, Some(sig)),
            (Some(c), None) if (129..=192).contains(&c) => (None, Some(c - 128)),
            (c, None) => (c, None),
        };
        Ok(ExecOutcome {
            exit_code,
            signal,
            timed_out,
            oom_killed: after.oom_kill > before.oom_kill,
            pids_limited: pids_refused > 0 || after.pids_max > before.pids_max,
            disk_full: super::disk::full(&self.host.layer.dir),
            duration,
        })
    }
}
