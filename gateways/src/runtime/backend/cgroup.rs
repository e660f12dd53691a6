//! Sandbox cgroups, v1 (one hierarchy per controller) or v2 (unified, when
//! `/sys/fs/cgroup/cgroup.controllers` exists).
//!
//! Layout, under `<parent>/<instance>/` in each hierarchy (`<parent>` is `creto` by default):
//! `<id>/` holds the sandbox's limits (memory, pids, CPU); each exec gets a child `<id>/x<n>/`
//! in the pids hierarchy (v1) or the unified one (v2), so a timeout kills that exec's processes
//! and nothing else. Memory and CPU (v1) are joined at `<id>/` directly.
//!
//! Counters: an OOM kill is `oom_kill` in `memory.oom_control` (v1) or `memory.events` (v2); a
//! fork refused at the pids limit is `max` in `pids.events`. Both are read before and after an
//! exec.

use std::fs;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{BackendError, ResourceLimits};

const CPU_PERIOD_US: u64 = 100_000;

#[derive(Clone, Debug)]
pub(crate) enum Hierarchy {
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: PathBuf,
        memsw: bool,
    },
    V2 {
        base: PathBuf,
    },
}

/// Where this instance's sandbox cgroups live.
#[derive(Clone, Debug)]
pub(crate) struct CgroupRoots {
    pub hierarchy: Hierarchy,
}

fn write_file(p: &Path, v: &str) -> Result<(), BackendError> {
    fs::write(p, v).map_err(BackendError::io(format!("write {v:?} to {}", p.display())))
}

fn mkdir_all(p: &Path) -> Result<(), BackendError> {
    fs::create_dir_all(p).map_err(BackendError::io(format!("create cgroup {}", p.display())))
}

/// Mount points of v1 controllers, from `/proc/self/mountinfo`.
fn v1_mount(controller: &str) -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in info.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post = post.split(' ');
        if post.next() != Some("cgroup") {
            continue;
        }
        let opts = post.nth(1).unwrap_or("");
        if opts.split(',').any(|o| o == controller) {
            return pre.split(' ').nth(4).map(PathBuf::from);
        }
    }
    None
}

impl CgroupRoots {
    /// Finds the hierarchies and creates `<parent>/<instance>/` in each.
    pub fn detect(parent: &Path, instance: &str) -> Result<CgroupRoots, BackendError> {
        let rel = parent.join(instance);
        let v2_root = Path::new("/sys/fs/cgroup");
        if v2_root.join("cgroup.controllers").exists() {
            let available =
                fs::read_to_string(v2_root.join("cgroup.controllers")).unwrap_or_default();
            for c in ["memory", "pids", "cpu"] {
                if !available.split_whitespace().any(|a| a == c) {
                    return Err(BackendError::Unavailable(format!(
                        "cgroup v2: the {c} controller is not available at /sys/fs/cgroup \
                         (cgroup.controllers: {available:?})"
                    )));
                }
            }
            // Enable the controllers along the path down to <parent>/<instance>, whose children
            // are the sandboxes (none of these directories holds processes).
            let mut dir = v2_root.to_path_buf();
            let mut components = vec![];
            components.extend(rel.components());
            for c in components {
                let ctl = dir.join("cgroup.subtree_control");
                let enabled = fs::read_to_string(&ctl).unwrap_or_default();
                for ctrl in ["memory", "pids", "cpu"] {
                    if !enabled.split_whitespace().any(|e| e == ctrl) {
                        fs::write(&ctl, format!("+{ctrl}")).map_err(|e| {
                            BackendError::Unavailable(format!(
                                "cgroup v2: cannot enable {ctrl} in {}: {e}; the runtime needs \
                                 a delegated cgroup (set cgroup_parent to one whose parent \
                                 enables memory, pids and cpu and holds no processes)",
                                ctl.display()
                            ))
                        })?;
                    }
                }
                dir.push(c);
                mkdir_all(&dir)?;
            }
            let ctl = dir.join("cgroup.subtree_control");
            for ctrl in ["memory", "pids", "cpu"] {
                let _ = fs::write(&ctl, format!("+{ctrl}"));
            }
            return Ok(CgroupRoots {
                hierarchy: Hierarchy::V2 { base: dir },
            });
        }
        let mount = |c: &str| {
            v1_mount(c).ok_or_else(|| {
                BackendError::Unavailable(format!(
                    "cgroup v1: the {c} controller is not mounted (see /proc/self/mountinfo)"
                ))
            })
        };
        let memory = mount("memory")?.join(&rel);
        let pids = mount("pids")?.join(&rel);
        let cpu = mount("cpu")?.join(&rel);
        for d in [&memory, &pids, &cpu] {
            mkdir_all(d)?;
        }
        let memsw = memory.join("memory.memsw.limit_in_bytes").exists();
        Ok(CgroupRoots {
            hierarchy: Hierarchy::V1 {
                memory,
                pids,
                cpu,
                memsw,
            },
        })
    }

    pub fn version(&self) -> u8 {
        match self.hierarchy {
            Hierarchy::V1 { .. } => 1,
            Hierarchy::V2 { .. } => 2,
        }
    }

    fn bases(&self) -> Vec<PathBuf> {
        match &self.hierarchy {
            Hierarchy::V1 {
                memory, pids, cpu, ..
            } => vec![memory.clone(), pids.clone(), cpu.clone()],
            Hierarchy::V2 { base } => vec![base.clone()],
        }
    }

    /// Creates `<id>/` with its limits.
    pub fn create(
        &self,
        id: &str,
        limits: &ResourceLimits,
    ) -> Result<SandboxCgroups, BackendError> {
        let quota = u64::from(limits.cpu_millis) * CPU_PERIOD_US / 1000;
        let cg = match &self.hierarchy {
            Hierarchy::V1 {
                memory,
                pids,
                cpu,
                memsw,
            } => {
                let cg = SandboxCgroups {
                    v2: false,
                    memory: memory.join(id),
                    pids: pids.join(id),
                    cpu: cpu.join(id),
                };
                for d in cg.dirs() {
                    fs::create_dir(&d)
                        .map_err(BackendError::io(format!("create cgroup {}", d.display())))?;
                }
                let mem = limits.memory_bytes.to_string();
                write_file(&cg.memory.join("memory.limit_in_bytes"), &mem)?;
                if *memsw {
                    // No swap beyond the memory limit: the limit is the limit.
                    write_file(&cg.memory.join("memory.memsw.limit_in_bytes"), &mem)?;
                }
                write_file(&cg.pids.join("pids.max"), &limits.pids.to_string())?;
                write_file(
                    &cg.cpu.join("cpu.cfs_period_us"),
                    &CPU_PERIOD_US.to_string(),
                )?;
                write_file(&cg.cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
                cg
            }
            Hierarchy::V2 { base } => {
                let d = base.join(id);
                fs::create_dir(&d)
                    .map_err(BackendError::io(format!("create cgroup {}", d.display())))?;
                let cg = SandboxCgroups {
                    v2: true,
                    memory: d.clone(),
                    pids: d.clone(),
                    cpu: d.clone(),
                };
                write_file(&d.join("memory.max"), &limits.memory_bytes.to_string())?;
                if d.join("memory.swap.max").exists() {
                    write_file(&d.join("memory.swap.max"), "0")?;
                }
                write_file(&d.join("pids.max"), &limits.pids.to_string())?;
                write_file(&d.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
                cg
            }
        };
        Ok(cg)
    }

    /// Removes the instance's own (empty) directories; a sandbox cgroup still there keeps them.
    pub fn remove_if_empty(&self) {
        for b in self.bases() {
            let _ = fs::remove_dir(b);
        }
    }

    /// Ids that have a cgroup under this instance.
    pub fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .bases()
            .iter()
            .flat_map(|b| fs::read_dir(b).into_iter().flatten().flatten())
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// The cgroups of `id` (whether or not they exist).
    pub fn of(&self, id: &str) -> SandboxCgroups {
        match &self.hierarchy {
            Hierarchy::V1 {
                memory, pids, cpu, ..
            } => SandboxCgroups {
                v2: false,
                memory: memory.join(id),
                pids: pids.join(id),
                cpu: cpu.join(id),
            },
            Hierarchy::V2 { base } => SandboxCgroups {
                v2: true,
                memory: base.join(id),
                pids: base.join(id),
                cpu: base.join(id),
            },
        }
    }
}

/// The counters compared before and after an exec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub oom_kill: u64,
    pub pids_max: u64,
}

fn read_key(p: &Path, key: &str) -> u64 {
    fs::read_to_string(p)
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok()).flatten()
            })
        })
        .unwrap_or(0)
}

#[derive(Clone, Debug)]
pub(crate) struct SandboxCgroups {
    v2: bool,
    memory: PathBuf,
    pids: PathBuf,
    cpu: PathBuf,
}

impl SandboxCgroups {
    fn dirs(&self) -> Vec<PathBuf> {
        if self.v2 {
            vec![self.memory.clone()]
        } else {
            vec![self.memory.clone(), self.pids.clone(), self.cpu.clone()]
        }
    }

    pub fn counters(&self) -> Counters {
        let oom_file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        Counters {
            oom_kill: read_key(&self.memory.join(oom_file), "oom_kill"),
            pids_max: read_key(&self.pids.join("pids.events"), "max"),
        }
    }

    /// Creates the exec's cgroup and opens the `cgroup.procs` files its process writes itself
    /// into (before it executes bubblewrap).
    pub fn exec_group(&self, n: u64) -> Result<ExecCgroup, BackendError> {
        let dir = self.pids.join(format!("x{n}"));
        fs::create_dir(&dir)
            .map_err(BackendError::io(format!("create cgroup {}", dir.display())))?;
        let mut join_dirs = vec![dir.clone()];
        if !self.v2 {
            join_dirs.push(self.memory.clone());
            join_dirs.push(self.cpu.clone());
        }
        let mut join = Vec::new();
        for d in join_dirs {
            let p = d.join("cgroup.procs");
            match fs::OpenOptions::new().write(true).open(&p) {
                Ok(f) => join.push(OwnedFd::from(f)),
                Err(e) => {
                    let _ = fs::remove_dir(&dir);
                    return Err(BackendError::io(format!("open {}", p.display()))(e));
                }
            }
        }
        Ok(ExecCgroup { dir, join })
    }

    /// Kills every process of the sandbox, waiting up to `wait` for them to be gone.
    pub fn kill_all(&self, wait: Duration) -> bool {
        let mut dirs = Vec::new();
        for d in self.dirs() {
            collect_dirs(&d, &mut dirs);
        }
        kill_until_empty(&dirs, wait)
    }

    /// Removes the sandbox's cgroups (after [`kill_all`](Self::kill_all)).
    pub fn remove(&self) -> Result<(), BackendError> {
        for d in self.dirs() {
            remove_tree(&d)?;
        }
        Ok(())
    }
}

fn collect_dirs(d: &Path, out: &mut Vec<PathBuf>) {
    if !d.is_dir() {
        return;
    }
    if let Ok(rd) = fs::read_dir(d) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
    out.push(d.to_path_buf());
}

fn remove_tree(d: &Path) -> Result<(), BackendError> {
    let mut dirs = Vec::new();
    collect_dirs(d, &mut dirs);
    // Children first (collect_dirs pushes a directory after its children).
    for dir in dirs {
        let mut tries = 0;
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if tries < 50 => {
                    // EBUSY while the last processes are reaped.
                    let _ = e;
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    return Err(BackendError::io(format!("remove cgroup {}", dir.display()))(e));
                }
            }
        }
    }
    Ok(())
}

fn procs(d: &Path) -> Vec<i32> {
    fs::read_to_string(d.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// SIGKILLs every process listed in the directories' `cgroup.procs` until they are empty (a
/// process forking meanwhile is caught on the next round). True when empty.
fn kill_until_empty(dirs: &[PathBuf], wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        let mut any = false;
        for d in dirs {
            // v2: one write kills the whole subtree (Linux 5.14+).
            let kill_file = d.join("cgroup.kill");
            if kill_file.exists() {
                let _ = fs::OpenOptions::new()
                    .write(true)
                    .open(&kill_file)
                    .and_then(|mut f| f.write_all(b"1"));
            }
            for pid in procs(d) {
                any = true;
                // SAFETY: plain syscall; a pid that already exited yields ESRCH.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if !any {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One exec's cgroup.
#[derive(Debug)]
pub(crate) struct ExecCgroup {
    dir: PathBuf,
    /// `cgroup.procs` files, opened for writing; the child writes "0" to each.
    join: Vec<OwnedFd>,
}

impl ExecCgroup {
    pub fn join_fds(&self) -> Vec<i32> {
        self.join.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Kills every process of the exec, up to `wait` for them to go.
    pub fn kill(&self, wait: Duration) -> bool {
        kill_until_empty(std::slice::from_ref(&self.dir), wait)
    }

    /// Forks this exec's processes had refused by the pids controller. On v1 (and in v2's
    /// `pids.events.local`) the refusal is counted in the forking cgroup, which is this one,
    /// fresh for the exec; v2's hierarchical `max` is counted at the limiting ancestor instead
    /// (see [`SandboxCgroups::counters`]).
    pub fn pids_refused(&self) -> u64 {
        read_key(&self.dir.join("pids.events"), "max")
            .max(read_key(&self.dir.join("pids.events.local"), "max"))
    }

    pub fn is_empty(&self) -> bool {
        procs(&self.dir).is_empty()
    }

    pub fn remove(self) {
        let _ = remove_tree(&self.dir);
    }
}
