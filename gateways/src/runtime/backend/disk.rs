//! A sandbox's disk: its writable layer is an ext4 filesystem of its own, in a sparse image
//! file mounted through a loop device. A sandbox writing past its limit gets "No space left on
//! device" instead of filling the host's filesystem, which holds the runtime root and often the
//! log and the databases too. The image is sparse: the host spends what the sandbox wrote, not
//! the limit. No journal: a sandbox does not outlive a host crash (a restarted replica fails its
//! sandboxes and removes their layers), so there is nothing to replay after one.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{find_program, BackendError};

/// The programs that make and mount a disk, found when the backend starts.
#[derive(Debug, Clone)]
pub(crate) struct DiskTools {
    mkfs: PathBuf,
    mount: PathBuf,
}

impl DiskTools {
    /// Finds `mkfs.ext4` and `mount` and checks that loop devices can be had; an error says
    /// what to install.
    pub fn find() -> Result<DiskTools, BackendError> {
        let need = |program: &str, package: &str| {
            find_program(Path::new(program)).ok_or_else(|| {
                BackendError::Unavailable(format!(
                    "{program} not found: install {package} (each sandbox's writable layer is a \
                     filesystem of its own, which is how its disk limit holds)"
                ))
            })
        };
        let tools = DiskTools {
            mkfs: need("mkfs.ext4", "e2fsprogs")?,
            mount: need("mount", "mount (util-linux)")?,
        };
        if !Path::new("/dev/loop-control").exists() {
            return Err(BackendError::Unavailable(
                "/dev/loop-control is missing: each sandbox's disk is an image on a loop device \
                 (load the loop module; in a container, give it the host's devices)"
                    .into(),
            ));
        }
        Ok(tools)
    }

    /// Makes `image`, `bytes` long and sparse, formats it and mounts it on `dir` (an empty
    /// directory), without `lost+found`.
    pub fn attach(&self, image: &Path, dir: &Path, bytes: u64) -> Result<(), BackendError> {
        let file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(image)
            .map_err(BackendError::io(format!("create {}", image.display())))?;
        file.set_len(bytes)
            .map_err(BackendError::io(format!("size {}", image.display())))?;
        drop(file);
        run(Command::new(&self.mkfs)
            .args(["-q", "-F", "-m", "0", "-O", "^has_journal"])
            .args(["-E", "lazy_itable_init=1,nodiscard"])
            .arg(image))?;
        run(Command::new(&self.mount)
            .args(["-t", "ext4", "-o", "loop,nosuid,nodev,noatime"])
            .arg(image)
            .arg(dir))?;
        fs::remove_dir(dir.join("lost+found")).map_err(BackendError::io(format!(
            "remove {}/lost+found",
            dir.display()
        )))
    }
}

fn run(cmd: &mut Command) -> Result<(), BackendError> {
    let out = cmd
        .output()
        .map_err(BackendError::io(format!("run {:?}", cmd.get_program())))?;
    if !out.status.success() {
        return Err(BackendError::Setup(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Unmounts whatever is mounted on `dir` (nothing: fine). Lazily: the sandbox's layer keeps
/// descriptors on it until it is dropped; the loop device goes when the last one closes.
pub(crate) fn detach(dir: &Path) -> Result<(), BackendError> {
    let c = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| BackendError::Setup(format!("{} holds a NUL", dir.display())))?;
    // A crashed process may have left more than one mount stacked on the directory.
    for _ in 0..8 {
        // SAFETY: umount2 on a NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                // Not a mount point, or not there.
                Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
                _ => Err(BackendError::io(format!("unmount {}", dir.display()))(e)),
            };
        }
    }
    Ok(())
}

/// The filesystem on `dir` is full: no inode left, or less space than a write can still get.
/// ext4 refuses writes with a little space still free (what it keeps for its own metadata
/// while blocks are allocated late), so "full" is under 1 MiB plus 0.1 % of the disk (for 64
/// MiB: 440 KiB stayed free when `dd` got "No space left on device").
pub(crate) fn full(dir: &Path) -> bool {
    let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statvfs into a zeroed struct.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return false;
        }
        st
    };
    let (avail, size) = (st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize);
    st.f_favail == 0 || avail < (1 << 20) + size / 1000
}
