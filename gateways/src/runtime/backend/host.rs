//! What every Linux backend sets up on the host for a sandbox, whatever runs its processes: the
//! network namespace with its firewall and egress proxy, the cgroups, the writable layer; and
//! the instance-wide state (the root's lock, live ids, templates, orphan cleanup).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::cgroup::{CgroupRoots, SandboxCgroups};
use super::disk::DiskTools;
use super::egress_proxy::EgressProxy;
use super::layer::{self, Layer};
use super::netns::{self, Firewall, Netns};
use super::template::{self, Template};
use super::{
    validate_env, validate_sandbox_id, BackendConfig, BackendError, EgressAttempt, SandboxSpec,
};

pub(crate) const KILL_WAIT: Duration = Duration::from_secs(2);

/// Instance-wide state shared by a backend and its sandboxes.
pub(crate) struct HostCommon {
    pub config: BackendConfig,
    pub firewall: Firewall,
    pub cgroups: CgroupRoots,
    pub templates: HashMap<String, Arc<Template>>,
    pub live: Mutex<HashSet<String>>,
    pub sandboxes_dir: PathBuf,
    /// The sandboxes' disk images (`<id>.img`), out of their reach.
    pub disks_dir: PathBuf,
    pub disk_tools: DiskTools,
    /// Proxied connections of every sandbox together ([`BackendConfig::max_proxied_connections`]).
    pub proxied: super::egress_proxy::ConnectionBudget,
    _lock: fs::File,
}

/// An eighth of the descriptor limit (two descriptors per connection: a quarter of them),
/// after raising the soft limit to the hard one: the usual soft 1024 gave the whole replica
/// 128 proxied connections.
fn proxied_connections_default() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct passed; setrlimit reads it.
    let soft = match unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } {
        0 => {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                limit.rlim_max
            } else {
                limit.rlim_cur
            }
        }
        _ => 1024,
    };
    (soft / 8).clamp(64, 65_536) as usize
}

impl HostCommon {
    /// Checks root, the firewall tool and cgroups, takes the root's lock (one process per
    /// root) and loads the templates.
    pub fn new(config: BackendConfig, backend: &str) -> Result<HostCommon, BackendError> {
        config.validate()?;
        // SAFETY: plain getter.
        if unsafe { libc::geteuid() } != 0 {
            return Err(BackendError::Unavailable(format!(
                "the {backend} backend runs as root: it creates network namespaces and cgroups \
                 (sandboxes themselves run unprivileged)"
            )));
        }
        let firewall = Firewall::find().ok_or_else(|| {
            BackendError::Unavailable(
                "neither nft nor iptables-restore found; install nftables or iptables".into(),
            )
        })?;
        fs::create_dir_all(&config.root).map_err(BackendError::io(format!(
            "create {}",
            config.root.display()
        )))?;
        let lock_path = config.root.join(".lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(BackendError::io(format!("open {}", lock_path.display())))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(BackendError::Unavailable(format!(
                "another process uses the runtime root {} (its lock {} is held)",
                config.root.display(),
                lock_path.display()
            )));
        }
        let sandboxes_dir = config.root.join("sandboxes");
        fs::create_dir_all(&sandboxes_dir).map_err(BackendError::io(format!(
            "create {}",
            sandboxes_dir.display()
        )))?;
        let disks_dir = config.root.join("disks");
        fs::create_dir_all(&disks_dir)
            .and_then(|()| fs::set_permissions(&disks_dir, fs::Permissions::from_mode(0o700)))
            .map_err(BackendError::io(format!("create {}", disks_dir.display())))?;
        let disk_tools = DiskTools::find()?;
        let cgroups = CgroupRoots::detect(&config.cgroup_parent, &config.instance)?;
        let mut templates = HashMap::new();
        let base = template::base(&config.root.join("templates/base/etc"))?;
        templates.insert(base.name.clone(), Arc::new(base));
        if let Some(dir) = &config.templates_dir {
            for t in template::load_dir(dir)? {
                templates.insert(t.name.clone(), Arc::new(t));
            }
        }
        let proxied = super::egress_proxy::ConnectionBudget::new(
            config
                .max_proxied_connections
                .unwrap_or_else(proxied_connections_default),
        );
        Ok(HostCommon {
            config,
            proxied,
            firewall,
            cgroups,
            templates,
            live: Mutex::new(HashSet::new()),
            sandboxes_dir,
            disks_dir,
            disk_tools,
            _lock: lock,
        })
    }

    /// Where sandbox `id`'s layer is mounted, and its disk image.
    fn layer_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        (
            self.sandboxes_dir.join(id),
            self.disks_dir.join(format!("{id}.img")),
        )
    }

    fn forget(&self, id: &str) {
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// See [`super::IsolationBackend::cleanup_orphans`].
    pub async fn cleanup_orphans(self: &Arc<Self>) -> Result<usize, BackendError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let live = me.live.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut cleaned = HashSet::new();
            for (id, path) in netns::list(&me.config.instance) {
                if !live.contains(&id) {
                    netns::remove_name(&path)?;
                    cleaned.insert(id);
                }
            }
            for id in me.cgroups.ids() {
                if !live.contains(&id) {
                    let cg = me.cgroups.of(&id);
                    cg.kill_all(KILL_WAIT);
                    cg.remove()?;
                    cleaned.insert(id);
                }
            }
            for e in fs::read_dir(&me.sandboxes_dir)
                .map_err(BackendError::io(format!(
                    "read {}",
                    me.sandboxes_dir.display()
                )))?
                .flatten()
            {
                let Some(id) = e.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                if !live.contains(&id) {
                    let (dir, image) = me.layer_paths(&id);
                    layer::remove(&dir, &image)?;
                    cleaned.insert(id);
                }
            }
            // Images whose mount point was already gone.
            for e in fs::read_dir(&me.disks_dir)
                .map_err(BackendError::io(format!("read {}", me.disks_dir.display())))?
                .flatten()
            {
                let name = e.file_name();
                let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".img")) else {
                    continue;
                };
                if !live.contains(id) {
                    let (dir, image) = me.layer_paths(id);
                    layer::remove(&dir, &image)?;
                    cleaned.insert(id.to_string());
                }
            }
            Ok(cleaned.len())
        })
        .await
        .map_err(|e| BackendError::Setup(format!("cleanup task: {e}")))?
    }
}

impl Drop for HostCommon {
    fn drop(&mut self) {
        // Every sandbox is gone (each holds this struct): tidy the instance's cgroup parents.
        self.cgroups.remove_if_empty();
    }
}

/// Removes an id from the live set when dropped (unless disarmed).
struct LiveGuard {
    common: Arc<HostCommon>,
    id: String,
    armed: bool,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        if self.armed {
            self.common.forget(&self.id);
        }
    }
}

/// A sandbox's host-side resources.
pub(crate) struct HostSandbox {
    pub id: String,
    pub common: Arc<HostCommon>,
    pub netns: Netns,
    pub cgroups: SandboxCgroups,
    pub layer: Layer,
    pub proxy: EgressProxy,
    pub terminated: AtomicBool,
    /// Held (read) by a bwrap exec from its liveness check until its command is spawned into
    /// the sandbox's cgroup, and (write) by terminate while it marks the sandbox ended: a
    /// command is either refused or in the cgroup when terminate kills it. (Checked apart, a
    /// command spawned just after the kill outlived its sandbox and kept its cgroup from
    /// removal.) runsc starts its container after its spawn returns: not covered there.
    pub spawning: std::sync::RwLock<()>,
    pub exec_seq: AtomicU64,
}

impl HostSandbox {
    /// Creates the namespace (on its own thread), the layer (owned by `owner`) and the cgroups
    /// concurrently, then starts the proxy; undoes everything on failure.
    pub async fn prepare(
        common: &Arc<HostCommon>,
        spec: &SandboxSpec,
        owner: (u32, u32),
        egress_tx: mpsc::UnboundedSender<EgressAttempt>,
    ) -> Result<HostSandbox, BackendError> {
        validate_sandbox_id(&spec.id)?;
        spec.limits.validate()?;
        validate_env(&spec.env)?;
        if !common
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(spec.id.clone())
        {
            return Err(BackendError::AlreadyExists(spec.id.clone()));
        }
        let mut guard = LiveGuard {
            common: common.clone(),
            id: spec.id.clone(),
            armed: true,
        };

        let ns_thread = Netns::create(
            Netns::name(&common.config.instance, &spec.id),
            common.firewall.clone(),
        );
        let (layer_dir, image) = common.layer_paths(&spec.id);
        let layer = {
            // Formatting and mounting the disk (and unpacking a checkpoint) block.
            let (paths, tools) = (
                (layer_dir.clone(), image.clone()),
                common.disk_tools.clone(),
            );
            let (disk, restore) = (spec.limits.disk_bytes, spec.restore.clone());
            tokio::task::spawn_blocking(move || {
                Layer::create(paths, &tools, disk, owner, restore.as_deref())
            })
            .await
            .unwrap_or_else(|e| Err(BackendError::Setup(format!("layer task: {e}"))))
        };
        let cgroups = {
            // A stale cgroup of the same id (from a crashed process) goes first.
            let stale = common.cgroups.of(&spec.id);
            stale.kill_all(KILL_WAIT);
            let _ = stale.remove();
            common.cgroups.create(&spec.id, &spec.limits)
        };
        let ns = tokio::task::spawn_blocking(move || ns_thread.join())
            .await
            .map_err(|e| BackendError::Setup(format!("netns task: {e}")))
            .and_then(|j| {
                j.map_err(|_| BackendError::Setup("the network namespace thread panicked".into()))
            })
            .and_then(|r| r.map_err(|e| BackendError::Setup(format!("network namespace: {e}"))));

        let undo = |l: &Result<Layer, BackendError>,
                    c: &Result<SandboxCgroups, BackendError>,
                    n: &Result<netns::NetnsParts, BackendError>| {
            let _ = layer::remove(&layer_dir, &image);
            if let Ok(c) = c {
                let _ = c.remove();
            }
            if let Ok(n) = n {
                let _ = n.netns.remove();
            }
            let _ = l;
        };
        if layer.is_err() || cgroups.is_err() || ns.is_err() {
            undo(&layer, &cgroups, &ns);
            return Err(match (layer, cgroups, ns) {
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => e,
                _ => unreachable!(),
            });
        }
        let (layer, cgroups, parts) = (layer?, cgroups?, ns?);
        let proxy = match EgressProxy::start(
            spec.id.clone(),
            parts.listeners,
            Some(parts.dns),
            spec.egress.clone(),
            common.config.egress_deny.clone(),
            common.proxied.clone(),
            egress_tx,
        ) {
            Ok(p) => p,
            Err(e) => {
                let _ = layer.remove();
                let _ = cgroups.remove();
                let _ = parts.netns.remove();
                return Err(BackendError::Setup(format!("egress proxy: {e}")));
            }
        };
        guard.armed = false;
        Ok(HostSandbox {
            id: spec.id.clone(),
            common: common.clone(),
            netns: parts.netns,
            cgroups,
            layer,
            proxy,
            terminated: AtomicBool::new(false),
            spawning: std::sync::RwLock::new(()),
            exec_seq: AtomicU64::new(0),
        })
    }

    pub fn check_live(&self) -> Result<(), BackendError> {
        if self.terminated.load(Ordering::SeqCst) {
            return Err(BackendError::Terminated(self.id.clone()));
        }
        Ok(())
    }

    pub async fn checkpoint(&self) -> Result<Vec<u8>, BackendError> {
        self.check_live()?;
        let fds: Vec<OwnedFd> = self
            .layer
            .fds
            .iter()
            .map(|f| f.try_clone())
            .collect::<Result<_, _>>()
            .map_err(BackendError::io("dup layer fd"))?;
        let view = Layer {
            dir: self.layer.dir.clone(),
            image: self.layer.image.clone(),
            fds,
        };
        tokio::task::spawn_blocking(move || view.checkpoint())
            .await
            .map_err(|e| BackendError::Checkpoint(format!("task: {e}")))?
    }

    /// Kills every process and removes cgroups, namespace name and layer. Idempotent.
    pub async fn terminate(&self) -> Result<(), BackendError> {
        let already = {
            let _no_spawn = self.spawning.write().unwrap_or_else(|e| e.into_inner());
            self.terminated.swap(true, Ordering::SeqCst)
        };
        if already {
            return Ok(());
        }
        let cgroups = self.cgroups.clone();
        let netns_path = self.netns.path.clone();
        let layer = (self.layer.dir.clone(), self.layer.image.clone());
        let result = tokio::task::spawn_blocking(move || teardown(&cgroups, &netns_path, &layer))
            .await
            .map_err(|e| BackendError::Setup(format!("terminate task: {e}")))?;
        self.common.forget(&self.id);
        result
    }
}

fn teardown(
    cgroups: &SandboxCgroups,
    netns_path: &Path,
    (layer_dir, image): &(PathBuf, PathBuf),
) -> Result<(), BackendError> {
    cgroups.kill_all(KILL_WAIT);
    let r1 = cgroups.remove();
    let r2 = netns::remove_name(netns_path);
    let r3 = layer::remove(layer_dir, image);
    r1.and(r2).and(r3)
}

impl Drop for HostSandbox {
    /// A sandbox dropped without being terminated is torn down here (best effort), so it does
    /// not wait for the next orphan cleanup.
    fn drop(&mut self) {
        if !self.terminated.swap(true, Ordering::SeqCst) {
            let layer = (self.layer.dir.clone(), self.layer.image.clone());
            if let Err(e) = teardown(&self.cgroups, &self.netns.path, &layer) {
                tracing::warn!(sandbox = %self.id, error = %e, "sandbox teardown on drop");
            }
            self.common.forget(&self.id);
        }
    }
}
