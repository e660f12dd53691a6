//! The gVisor backend: each exec runs in a fresh gVisor sandbox (`runsc run` of an OCI bundle),
//! so the command talks to gVisor's application kernel (the Sentry), not to the host kernel.
//! Used when configured (`kind = "runsc"`) and `runsc` is installed; it is never picked
//! silently, and a configured but missing `runsc` is an error (no fallback to a weaker backend).
//!
//! The host side is the same as the bubblewrap backend's (`host.rs`): the sandbox's network
//! namespace with its firewall and egress proxy, its cgroups, its writable layer. Each exec
//! writes a bundle (`config.json`, an OCI runtime spec) and runs
//! `runsc --root <root>/runsc/state --platform <platform> --network host run --bundle <dir> <cid>`:
//! - the spec joins the sandbox's network namespace by path, and `--network host` makes gVisor
//!   use that namespace's (host kernel) sockets, so the namespace's firewall redirects every
//!   connection to the egress proxy exactly as for bubblewrap. (gVisor's own netstack,
//!   `--network sandbox`, would need a veth pair with the proxy on its host side instead.)
//! - `cgroupsPath` is the sandbox's cgroup (`/<parent>/<instance>/<id>`), whose limits the host
//!   side already set, so OOM kills and pids-limit hits show in the same counters;
//! - the root is a read-only skeleton (the template's symlinks and mount points) with the
//!   template's binds read-only, the layer's `home` and `tmp` read-write, fresh `/proc`, `/dev`,
//!   `/sys`; the process runs as uid/gid 1000 with no capabilities and no new privileges.
//!
//! A timeout runs `runsc kill --all <cid> KILL`; every exec's container is deleted
//! (`runsc delete --force`) when it ends. Processes do not survive their exec here either.
//! gVisor applies no seccomp filter from the spec: the Sentry is the boundary, and it runs under
//! gVisor's own seccomp filter on the host.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use creto_domain::runtime::egress::EgressPolicy;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::bwrap::SANDBOX_UID;
use super::host::{HostCommon, HostSandbox};
use super::template::{Template, TemplateMount};
use super::{
    find_program, BackendConfig, BackendError, EgressAttempt, ExecChunk, ExecOutcome, ExecRequest,
    IsolationBackend, Sandbox, SandboxSpec,
};

const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// How `runsc` is invoked (global flags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunscCommand {
    pub runsc: PathBuf,
    /// runsc's state directory (`--root`).
    pub state_root: PathBuf,
    pub platform: String,
}

impl RunscCommand {
    fn global(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.state_root.display().to_string(),
            "--platform".into(),
            self.platform.clone(),
            "--network".into(),
            "host".into(),
        ]
    }

    /// `runsc ... run --bundle <bundle> <cid>`
    pub fn run_args(&self, bundle: &Path, cid: &str) -> Vec<String> {
        let mut a = self.global();
        a.extend([
            "run".into(),
            "--bundle".into(),
            bundle.display().to_string(),
            cid.into(),
        ]);
        a
    }

    /// `runsc ... kill --all <cid> KILL`
    pub fn kill_args(&self, cid: &str) -> Vec<String> {
        let mut a = self.global();
        a.extend(["kill".into(), "--all".into(), cid.into(), "KILL".into()]);
        a
    }

    /// `runsc ... delete --force <cid>`
    pub fn delete_args(&self, cid: &str) -> Vec<String> {
        let mut a = self.global();
        a.extend(["delete".into(), "--force".into(), cid.into()]);
        a
    }
}

/// What an exec's OCI spec is made of.
pub struct BundleSpec<'a> {
    pub argv: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub cwd: &'a str,
    /// The read-only skeleton holding the template's symlinks and mount points.
    pub root: &'a Path,
    pub template: &'a Template,
    /// The layer's `home` and `tmp` directories.
    pub home: &'a Path,
    pub tmp: &'a Path,
    pub netns: &'a Path,
    pub cgroups_path: &'a str,
}

/// The OCI runtime spec (`config.json`) of one exec.
pub fn oci_spec(b: &BundleSpec<'_>) -> serde_json::Value {
    let env: Vec<String> = b.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut mounts = vec![
        json!({"destination": "/proc", "type": "proc", "source": "proc"}),
        json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
               "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
        json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
               "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
        json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
               "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
        json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
               "options": ["nosuid", "noexec", "nodev", "ro"]}),
    ];
    for m in &b.template.mounts {
        if let TemplateMount::RoBind { src, dest, .. } = m {
            mounts.push(json!({"destination": dest, "type": "bind", "source": src,
                               "options": ["rbind", "ro", "nosuid", "nodev"]}));
        }
    }
    mounts.push(
        json!({"destination": "/home/sandbox", "type": "bind", "source": b.home,
                       "options": ["rbind", "rw", "nosuid", "nodev"]}),
    );
    mounts.push(
        json!({"destination": "/tmp", "type": "bind", "source": b.tmp,
                       "options": ["rbind", "rw", "nosuid", "nodev"]}),
    );
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID},
            "args": b.argv,
            "env": env,
            "cwd": b.cwd,
            "capabilities": {"bounding": [], "effective": [], "inheritable": [],
                             "permitted": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": b.root, "readonly": true},
        "hostname": "sandbox",
        "mounts": mounts,
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network", "path": b.netns}
            ],
            "cgroupsPath": b.cgroups_path
        }
    })
}

/// Builds each template's read-only skeleton root: its symlinks and its mount points.
fn skeleton(dir: &Path, t: &Template) -> Result<(), BackendError> {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).map_err(BackendError::io(format!("create {}", dir.display())))?;
    for d in ["proc", "dev", "sys", "tmp", "home/sandbox"] {
        fs::create_dir_all(dir.join(d)).map_err(BackendError::io("create skeleton"))?;
    }
    for m in &t.mounts {
        let dest = dir.join(m.dest().trim_start_matches('/'));
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(BackendError::io("create skeleton"))?;
        }
        match m {
            TemplateMount::Symlink { target, .. } => {
                std::os::unix::fs::symlink(target, &dest)
                    .map_err(BackendError::io(format!("symlink {}", dest.display())))?;
            }
            TemplateMount::RoBind { src, .. } => {
                let r = if src.is_dir() {
                    fs::create_dir_all(&dest)
                } else {
                    fs::write(&dest, b"")
                };
                r.map_err(BackendError::io(format!("create {}", dest.display())))?;
            }
        }
    }
    Ok(())
}

/// The gVisor backend.
pub struct RunscBackend {
    common: Arc<HostCommon>,
    cmd: RunscCommand,
    skeletons: PathBuf,
    bundles: PathBuf,
}

impl RunscBackend {
    /// Fails when `runsc` is not installed, before touching anything.
    pub fn new(config: BackendConfig) -> Result<RunscBackend, BackendError> {
        config.validate()?;
        let runsc = find_program(&config.runsc_path).ok_or_else(|| {
            BackendError::Unavailable(format!(
                "the runsc (gVisor) backend is configured but {} is not installed or not on \
                 PATH; install gVisor (https://gvisor.dev/docs/user_guide/install/) or set the \
                 runtime backend kind to \"bwrap\"",
                config.runsc_path.display()
            ))
        })?;
        if !["systrap", "ptrace", "kvm"].contains(&config.runsc_platform.as_str()) {
            return Err(BackendError::InvalidSpec(format!(
                "runsc_platform {:?} is not systrap, ptrace or kvm",
                config.runsc_platform
            )));
        }
        let state_root = config.root.join("runsc/state");
        let skeletons = config.root.join("runsc/rootfs");
        let bundles = config.root.join("runsc/bundles");
        let platform = config.runsc_platform.clone();
        let common = Arc::new(HostCommon::new(config, "runsc")?);
        for d in [&state_root, &skeletons, &bundles] {
            fs::create_dir_all(d).map_err(BackendError::io(format!("create {}", d.display())))?;
        }
        for t in common.templates.values() {
            skeleton(&skeletons.join(&t.name), t)?;
        }
        Ok(RunscBackend {
            common,
            cmd: RunscCommand {
                runsc,
                state_root,
                platform,
            },
            skeletons,
            bundles,
        })
    }
}

#[async_trait]
impl IsolationBackend for RunscBackend {
    fn name(&self) -> &'static str {
        "runsc"
    }

    fn template(&self, name: &str) -> Option<Arc<Template>> {
        self.common.templates.get(name).cloned()
    }

    async fn prepare(
        &self,
        spec: SandboxSpec,
        egress_tx: mpsc::UnboundedSender<EgressAttempt>,
    ) -> Result<Arc<dyn Sandbox>, BackendError> {
        if !self.common.templates.contains_key(&spec.template.name) {
            return Err(BackendError::InvalidSpec(format!(
                "template {:?} is not loaded by this backend",
                spec.template.name
            )));
        }
        // Inside gVisor the sandbox user is uid 1000 as the file server sees it.
        let host = HostSandbox::prepare(&self.common, &spec, (SANDBOX_UID, SANDBOX_UID), egress_tx)
            .await?;
        let c = &self.common.config;
        let cgroups_path = format!("/{}/{}/{}", c.cgroup_parent.display(), c.instance, spec.id);
        Ok(Arc::new(RunscSandbox {
            cmd: self.cmd.clone(),
            skeleton: self.skeletons.join(&spec.template.name),
            bundles: self.bundles.clone(),
            cgroups_path,
            running: Mutex::new(HashSet::new()),
            template: spec.template,
            env: spec.env,
            host,
        }))
    }

    async fn cleanup_orphans(&self) -> Result<usize, BackendError> {
        self.common.cleanup_orphans().await
    }
}

/// A gVisor sandbox.
pub struct RunscSandbox {
    host: HostSandbox,
    cmd: RunscCommand,
    skeleton: PathBuf,
    bundles: PathBuf,
    cgroups_path: String,
    running: Mutex<HashSet<String>>,
    template: Arc<Template>,
    env: BTreeMap<String, String>,
}

async fn run_quiet(cmd: &RunscCommand, args: Vec<String>) {
    let _ = tokio::process::Command::new(&cmd.runsc)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

async fn pump(
    mut r: impl AsyncRead + Unpin,
    out: mpsc::Sender<ExecChunk>,
    wrap: fn(Bytes) -> ExecChunk,
) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut open = true;
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 {
            break;
        }
        if open
            && out
                .send(wrap(Bytes::copy_from_slice(&buf[..n])))
                .await
                .is_err()
        {
            open = false;
        }
    }
}

#[async_trait]
impl Sandbox for RunscSandbox {
    fn id(&self) -> &str {
        &self.host.id
    }

    async fn exec(
        &self,
        req: ExecRequest,
        out: mpsc::Sender<ExecChunk>,
    ) -> Result<ExecOutcome, BackendError> {
        req.validate()?;
        self.host.check_live()?;
        let n = self.host.exec_seq.fetch_add(1, Ordering::Relaxed);
        let cid = format!(
            "creto-{}-{}-x{n}",
            self.host.common.config.instance, self.host.id
        );
        let bundle = self.bundles.join(&cid);
        let mut env: BTreeMap<String, String> = BTreeMap::from([
            ("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()),
            ("HOME".into(), "/home/sandbox".into()),
            ("USER".into(), "sandbox".into()),
            ("LANG".into(), "C.UTF-8".into()),
            ("TMPDIR".into(), "/tmp".into()),
        ]);
        env.extend(self.env.clone());
        env.extend(req.env.clone());
        let home = self.host.layer.dir.join("home");
        let tmp = self.host.layer.dir.join("tmp");
        let spec = oci_spec(&BundleSpec {
            argv: &req.argv,
            env: &env,
            cwd: req.workdir.as_deref().unwrap_or("/home/sandbox"),
            root: &self.skeleton,
            template: &self.template,
            home: &home,
            tmp: &tmp,
            netns: &self.host.netns.path,
            cgroups_path: &self.cgroups_path,
        });
        fs::create_dir_all(&bundle)
            .map_err(BackendError::io(format!("create {}", bundle.display())))?;
        fs::write(bundle.join("config.json"), spec.to_string())
            .map_err(BackendError::io("write config.json"))?;
        let before = self.host.cgroups.counters();
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&self.cmd.runsc)
            .args(self.cmd.run_args(&bundle, &cid))
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BackendError::Setup(format!("start {}: {e}", self.cmd.runsc.display())))?;
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cid.clone());
        if let Some(mut stdin) = child.stdin.take() {
            let data = req.stdin.clone();
            tokio::spawn(async move {
                let _ = stdin.write_all(&data).await;
                let _ = stdin.shutdown().await;
            });
        }
        let o = tokio::spawn(pump(
            child.stdout.take().expect("piped"),
            out.clone(),
            ExecChunk::Stdout,
        ));
        let e = tokio::spawn(pump(
            child.stderr.take().expect("piped"),
            out,
            ExecChunk::Stderr,
        ));
        let mut timed_out = false;
        let status = match tokio::time::timeout(req.timeout, child.wait()).await {
            Ok(s) => s,
            Err(_) => {
                timed_out = true;
                run_quiet(&self.cmd, self.cmd.kill_args(&cid)).await;
                let _ = child.start_kill();
                child.wait().await
            }
        };
        let duration = started.elapsed();
        let _ = tokio::time::timeout(OUTPUT_DRAIN, async {
            let _ = o.await;
            let _ = e.await;
        })
        .await;
        run_quiet(&self.cmd, self.cmd.delete_args(&cid)).await;
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&cid);
        let _ = fs::remove_dir_all(&bundle);
        let after = self.host.cgroups.counters();
        let status = status.map_err(BackendError::io("wait for runsc"))?;
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
            pids_limited: after.pids_max > before.pids_max,
            disk_full: super::disk::full(&self.host.layer.dir),
            duration,
        })
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
        let running: Vec<String> = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .collect();
        for cid in running {
            run_quiet(&self.cmd, self.cmd.kill_args(&cid)).await;
            run_quiet(&self.cmd, self.cmd.delete_args(&cid)).await;
        }
        self.host.terminate().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::backend::{select_backend, BackendKind};

    fn cmd() -> RunscCommand {
        RunscCommand {
            runsc: "/usr/local/bin/runsc".into(),
            state_root: "/var/lib/enablement/runtime/runsc/state".into(),
            platform: "systrap".into(),
        }
    }

    #[test]
    fn command_lines() {
        let c = cmd();
        let g = "--root /var/lib/enablement/runtime/runsc/state --platform systrap --network host";
        assert_eq!(
            c.run_args(Path::new("/b/creto-default-s1-x0"), "creto-default-s1-x0")
                .join(" "),
            format!("{g} run --bundle /b/creto-default-s1-x0 creto-default-s1-x0")
        );
        assert_eq!(
            c.kill_args("c1").join(" "),
            format!("{g} kill --all c1 KILL")
        );
        assert_eq!(
            c.delete_args("c1").join(" "),
            format!("{g} delete --force c1")
        );
    }

    #[test]
    fn the_spec_joins_the_sandbox_namespace_and_cgroup() {
        let t = Template {
            name: "base".into(),
            digest: [0; 32],
            kind: "base",
            mounts: vec![
                TemplateMount::RoBind {
                    src: "/usr".into(),
                    dest: "/usr".into(),
                },
                TemplateMount::Symlink {
                    target: "usr/bin".into(),
                    dest: "/bin".into(),
                },
            ],
        };
        let argv = vec!["python3".to_string(), "-c".into(), "print(1)".into()];
        let env = BTreeMap::from([("A".to_string(), "b".to_string())]);
        let s = oci_spec(&BundleSpec {
            argv: &argv,
            env: &env,
            cwd: "/home/sandbox",
            root: Path::new("/r/rootfs/base"),
            template: &t,
            home: Path::new("/r/sandboxes/s1/home"),
            tmp: Path::new("/r/sandboxes/s1/tmp"),
            netns: Path::new("/run/netns/creto-default-s1"),
            cgroups_path: "/creto/default/s1",
        });
        assert_eq!(s["process"]["args"], json!(argv));
        assert_eq!(s["process"]["env"], json!(["A=b"]));
        assert_eq!(s["process"]["user"]["uid"], json!(1000));
        assert_eq!(s["process"]["noNewPrivileges"], json!(true));
        assert_eq!(s["process"]["capabilities"]["bounding"], json!([]));
        assert_eq!(
            s["root"],
            json!({"path": "/r/rootfs/base", "readonly": true})
        );
        assert_eq!(s["linux"]["cgroupsPath"], json!("/creto/default/s1"));
        assert!(s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&json!({"type": "network", "path": "/run/netns/creto-default-s1"})));
        let mounts = s["mounts"].as_array().unwrap();
        let usr = mounts.iter().find(|m| m["destination"] == "/usr").unwrap();
        assert_eq!(usr["options"][1], "ro");
        let home = mounts
            .iter()
            .find(|m| m["destination"] == "/home/sandbox")
            .unwrap();
        assert_eq!(home["source"], "/r/sandboxes/s1/home");
        assert_eq!(home["options"][1], "rw");
    }

    #[test]
    fn a_configured_runsc_that_is_missing_is_an_error() {
        let config = BackendConfig {
            kind: BackendKind::Runsc,
            runsc_path: "/nonexistent/runsc".into(),
            ..BackendConfig::default()
        };
        let err = select_backend(&config)
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            err.contains(
                "runsc (gVisor) backend is configured but /nonexistent/runsc is not installed"
            ),
            "{err}"
        );
    }
}
