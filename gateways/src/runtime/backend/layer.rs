//! A sandbox's writable layer: `<root>/sandboxes/<id>/home` (the sandbox's `/home/sandbox`) and
//! `.../tmp` (its `/tmp`), owned by the sandbox's host uid, on a disk of its own (the sandbox's
//! disk limit, [`super::disk`], mounted on `<root>/sandboxes/<id>`); and its checkpoint archive.
//!
//! Both directions run as root on the host over content the sandbox controls, so both are
//! careful: packing walks the layer through directory file descriptors (`openat` with
//! `O_NOFOLLOW`; a sandbox swapping a directory for a symlink meanwhile cannot make it read a
//! host file), archives only directories, regular files and symlinks (as links), and bounds the
//! total size; unpacking happens into a fresh, empty layer before any sandbox process exists,
//! accepts only entries under `home/` and `tmp/` (directories, regular files, symlinks; no hard
//! links, devices or FIFOs), keeps the total under [`MAX_CHECKPOINT_BYTES`], then hands every
//! entry to the sandbox uid (`lchown`) without setuid or setgid bits.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

use super::disk::{self, DiskTools};
use super::{BackendError, MAX_CHECKPOINT_BYTES};

/// The parts of the layer, and where they appear in the sandbox.
pub(crate) const PARTS: [(&str, &str); 2] = [("home", "/home/sandbox"), ("tmp", "/tmp")];

#[derive(Debug)]
pub(crate) struct Layer {
    /// The mount point of the layer's disk ([`super::disk`]).
    pub dir: PathBuf,
    /// The disk's image file.
    pub image: PathBuf,
    /// `O_PATH` descriptors of `home` and `tmp`, opened before any sandbox process exists:
    /// checkpoints walk from them, never from a path the sandbox could have swapped.
    pub fds: Vec<OwnedFd>,
}

fn ck(msg: impl Into<String>) -> BackendError {
    BackendError::Checkpoint(msg.into())
}

fn open_flags(p: &Path, flags: i32) -> std::io::Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: open on a NUL-terminated path.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn openat(dir: &OwnedFd, name: &OsStr, flags: i32) -> std::io::Result<OwnedFd> {
    let c = CString::new(name.as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: openat relative to a directory fd we own.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn fstat(fd: &OwnedFd) -> std::io::Result<libc::stat> {
    // SAFETY: fstat into a zeroed struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(st)
    }
}

fn fstatat_nofollow(dir: &OwnedFd, name: &OsStr) -> std::io::Result<libc::stat> {
    let c = CString::new(name.as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: fstatat relative to a directory fd we own.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstatat(
            dir.as_raw_fd(),
            c.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(st)
    }
}

fn readlinkat(dir: &OwnedFd, name: &OsStr) -> std::io::Result<PathBuf> {
    let c = CString::new(name.as_bytes()).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: readlinkat into a buffer of the length passed.
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            c.as_ptr(),
            buf.as_mut_ptr() as *mut libc::c_char,
            buf.len(),
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(PathBuf::from(OsStr::from_bytes(&buf)))
}

fn chown_no_follow(p: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid))
}

impl Layer {
    /// Creates the layer on a disk of `disk_bytes` (replacing a stale one of the same id),
    /// unpacking `restore` into it. On failure, what was made is for [`remove`] to undo.
    pub fn create(
        (dir, image): (PathBuf, PathBuf),
        tools: &DiskTools,
        disk_bytes: u64,
        (uid, gid): (u32, u32),
        restore: Option<&[u8]>,
    ) -> Result<Layer, BackendError> {
        remove(&dir, &image)?;
        fs::create_dir(&dir).map_err(BackendError::io(format!("create {}", dir.display())))?;
        tools.attach(&image, &dir, disk_bytes)?;
        // Traversable (not listable): unprivileged bwrap resolves the bind sources as the
        // sandbox uid.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))
            .map_err(BackendError::io(format!("chmod {}", dir.display())))?;
        for (part, _) in PARTS {
            let p = dir.join(part);
            fs::create_dir(&p).map_err(BackendError::io(format!("create {}", p.display())))?;
        }
        if let Some(archive) = restore {
            unpack(&dir, archive).map_err(|e| {
                if disk::full(&dir) {
                    BackendError::InvalidSpec(format!(
                        "the checkpoint does not fit in the sandbox's disk of {} MiB: ask for a \
                         larger resources.disk_mb",
                        disk_bytes >> 20
                    ))
                } else {
                    e
                }
            })?;
        }
        for (part, _) in PARTS {
            hand_over(&dir.join(part), uid, gid)?;
        }
        fs::set_permissions(dir.join("home"), fs::Permissions::from_mode(0o755))
            .map_err(BackendError::io("chmod home"))?;
        fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))
            .map_err(BackendError::io("chmod tmp"))?;
        let mut fds = Vec::new();
        for (part, _) in PARTS {
            let p = dir.join(part);
            fds.push(
                open_flags(&p, libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
                    .map_err(BackendError::io(format!("open {}", p.display())))?,
            );
        }
        Ok(Layer { dir, image, fds })
    }

    /// The layer as tar.gz (see the module documentation).
    pub fn checkpoint(&self) -> Result<Vec<u8>, BackendError> {
        let gz = GzEncoder::new(Vec::new(), Compression::fast());
        let mut b = tar::Builder::new(gz);
        let mut budget = MAX_CHECKPOINT_BYTES;
        for ((part, _), fd) in PARTS.iter().zip(&self.fds) {
            let dirfd = openat(fd, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(|e| ck(format!("open {part}: {e}")))?;
            let st = fstat(&dirfd).map_err(|e| ck(format!("stat {part}: {e}")))?;
            append_dir(&mut b, Path::new(part), &st)?;
            walk(&mut b, dirfd, Path::new(part), &mut budget)?;
        }
        let gz = b
            .into_inner()
            .map_err(|e| ck(format!("finish archive: {e}")))?;
        let out = gz.finish().map_err(|e| ck(format!("compress: {e}")))?;
        if out.len() as u64 > MAX_CHECKPOINT_BYTES {
            return Err(ck(format!(
                "the archive is {} bytes; at most {MAX_CHECKPOINT_BYTES}",
                out.len()
            )));
        }
        Ok(out)
    }

    pub fn remove(&self) -> Result<(), BackendError> {
        remove(&self.dir, &self.image)
    }
}

/// Removes a layer: unmounts its disk, then removes the mount point and the image. Nothing
/// there is fine.
pub(crate) fn remove(dir: &Path, image: &Path) -> Result<(), BackendError> {
    disk::detach(dir)?;
    let gone = |r: std::io::Result<()>, what: &Path| match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(BackendError::io(format!("remove {}", what.display()))(e))
        }
        _ => Ok(()),
    };
    gone(fs::remove_dir_all(dir), dir)?;
    gone(fs::remove_file(image), image)
}

fn header_for(st: &libc::stat, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    // No setuid/setgid bits leave the sandbox.
    h.set_mode(st.st_mode & 0o1777);
    h.set_mtime(st.st_mtime.max(0) as u64);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_size(size);
    h
}

fn append_dir<W: Write>(
    b: &mut tar::Builder<W>,
    rel: &Path,
    st: &libc::stat,
) -> Result<(), BackendError> {
    let mut h = header_for(st, tar::EntryType::Directory, 0);
    b.append_data(&mut h, rel, std::io::empty())
        .map_err(|e| ck(format!("archive {}: {e}", rel.display())))
}

/// The deepest nesting of directories a checkpoint keeps, counted from `home` or `tmp`. The
/// sandbox chooses the nesting (one `mkdir; cd` loop makes tens of thousands of levels), and
/// the walk holds a descriptor per level.
pub(crate) const MAX_DEPTH: usize = 256;
/// The longest path in the layer a checkpoint keeps. The walk goes by descriptors, so it
/// reaches any length; a restore unpacks by path under the new layer's directory, and past
/// PATH_MAX (4096) it failed: a checkpoint taken fine that no restore could use.
pub(crate) const MAX_PATH_BYTES: usize = 3072;

/// A directory being walked: its descriptor, its path in the archive, the names left to visit.
struct Level {
    fd: OwnedFd,
    rel: PathBuf,
    names: std::vec::IntoIter<std::ffi::OsString>,
}

fn level(fd: OwnedFd, rel: PathBuf) -> Result<Level, BackendError> {
    let listing = format!("/proc/self/fd/{}", fd.as_raw_fd());
    let mut names: Vec<_> = fs::read_dir(&listing)
        .map_err(|e| ck(format!("list {}: {e}", rel.display())))?
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    names.sort();
    Ok(Level {
        fd,
        rel,
        names: names.into_iter(),
    })
}

/// Archives what is under `dirfd` (depth first, names in order) with a stack of its own, not
/// the thread's: however deep the sandbox nests, the walk ends with an error, never a stack
/// overflow of the host process.
fn walk<W: Write>(
    b: &mut tar::Builder<W>,
    dirfd: OwnedFd,
    rel: &Path,
    budget: &mut u64,
) -> Result<(), BackendError> {
    let mut stack = vec![level(dirfd, rel.to_path_buf())?];
    while let Some(at) = stack.last_mut() {
        let Some(name) = at.names.next() else {
            stack.pop();
            continue;
        };
        let path = at.rel.join(&name);
        if path.as_os_str().len() > MAX_PATH_BYTES {
            let shown: String = path.to_string_lossy().chars().take(60).collect();
            return Err(ck(format!(
                "a path in the layer is longer than {MAX_PATH_BYTES} bytes (at {shown}…); a \
                 checkpoint keeps paths up to {MAX_PATH_BYTES} bytes, or it could not be restored"
            )));
        }
        let Ok(st) = fstatat_nofollow(&at.fd, &name) else {
            continue; // removed meanwhile
        };
        match st.st_mode & libc::S_IFMT {
            libc::S_IFDIR => {
                let Ok(sub) = openat(
                    &at.fd,
                    &name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                ) else {
                    continue;
                };
                if stack.len() >= MAX_DEPTH {
                    let shown: String = path.to_string_lossy().chars().take(60).collect();
                    return Err(ck(format!(
                        "the layer nests directories deeper than {MAX_DEPTH} levels (at \
                         {shown}…); a checkpoint keeps at most {MAX_DEPTH}"
                    )));
                }
                append_dir(b, &path, &st)?;
                stack.push(level(sub, path)?);
            }
            libc::S_IFREG => {
                let Ok(fd) = openat(
                    &at.fd,
                    &name,
                    libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK,
                ) else {
                    continue;
                };
                let st = fstat(&fd).map_err(|e| ck(format!("stat {}: {e}", path.display())))?;
                if st.st_mode & libc::S_IFMT != libc::S_IFREG {
                    continue;
                }
                let size = st.st_size.max(0) as u64;
                if size > *budget {
                    return Err(ck(format!(
                        "the layer holds more than {MAX_CHECKPOINT_BYTES} bytes"
                    )));
                }
                *budget -= size;
                // Streamed, not read whole first (a file may be as big as the budget). The
                // sandbox may still be changing it: the archive holds the size the header
                // says, the file's bytes up to it, zeros if it shrank meanwhile.
                let data = fs::File::from(fd)
                    .take(size)
                    .chain(std::io::repeat(0))
                    .take(size);
                let mut h = header_for(&st, tar::EntryType::Regular, size);
                b.append_data(&mut h, &path, data)
                    .map_err(|e| ck(format!("archive {}: {e}", path.display())))?;
            }
            libc::S_IFLNK => {
                let Ok(target) = readlinkat(&at.fd, &name) else {
                    continue;
                };
                let mut h = header_for(&st, tar::EntryType::Symlink, 0);
                h.set_mode(0o777);
                b.append_link(&mut h, &path, &target)
                    .map_err(|e| ck(format!("archive {}: {e}", path.display())))?;
            }
            _ => {} // sockets, FIFOs: not part of a checkpoint
        }
    }
    Ok(())
}

/// Unpacks an archive from [`Layer::checkpoint`] into a fresh layer directory.
fn unpack(dir: &Path, archive: &[u8]) -> Result<(), BackendError> {
    let mut a = tar::Archive::new(GzDecoder::new(archive));
    a.set_preserve_permissions(true);
    a.set_preserve_ownerships(false);
    a.set_unpack_xattrs(false);
    a.set_overwrite(true);
    let mut total = 0u64;
    let entries = a
        .entries()
        .map_err(|e| ck(format!("restore: read archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| ck(format!("restore: read archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| ck(format!("restore: entry path: {e}")))?
            .into_owned();
        let mut comps = path.components();
        let top_ok = matches!(
            comps.next(),
            Some(std::path::Component::Normal(c)) if c == "home" || c == "tmp"
        );
        if !top_ok
            || !path
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        {
            return Err(ck(format!(
                "restore: entry {} is outside home/ and tmp/; not an archive from a checkpoint",
                path.display()
            )));
        }
        let kind = entry.header().entry_type();
        if !(kind.is_dir() || kind.is_file() || kind.is_symlink()) {
            return Err(ck(format!(
                "restore: entry {} is a {kind:?}; only directories, files and symlinks are restored",
                path.display()
            )));
        }
        total += entry.size();
        if total > MAX_CHECKPOINT_BYTES {
            return Err(ck(format!(
                "restore: the archive unpacks to more than {MAX_CHECKPOINT_BYTES} bytes"
            )));
        }
        entry.set_mask(0o6000); // clear setuid/setgid
        let unpacked = entry
            .unpack_in(dir)
            .map_err(|e| ck(format!("restore {}: {e}", path.display())))?;
        if !unpacked {
            return Err(ck(format!(
                "restore: entry {} escapes the layer",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Gives every entry under `p` (itself included) to the sandbox's uid and gid, without
/// following symlinks.
fn hand_over(p: &Path, uid: u32, gid: u32) -> Result<(), BackendError> {
    chown_no_follow(p, uid, gid).map_err(BackendError::io(format!("chown {}", p.display())))?;
    let meta =
        fs::symlink_metadata(p).map_err(BackendError::io(format!("stat {}", p.display())))?;
    if meta.is_dir() {
        for e in fs::read_dir(p).map_err(BackendError::io(format!("read {}", p.display())))? {
            let e = e.map_err(BackendError::io(format!("read {}", p.display())))?;
            hand_over(&e.path(), uid, gid)?;
        }
    } else if meta.is_file() && meta.mode() & 0o6000 != 0 {
        fs::set_permissions(p, fs::Permissions::from_mode(meta.mode() & 0o1777))
            .map_err(BackendError::io(format!("chmod {}", p.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer on a 64 MiB disk under `root` (mounting it needs root, as the backend does).
    fn create(root: &Path, name: &str, restore: Option<&[u8]>) -> Result<Layer, BackendError> {
        // SAFETY: plain getter.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "layers are mounted: run as root"
        );
        let tools = DiskTools::find().expect("mkfs.ext4, mount and loop devices");
        let paths = (root.join(name), root.join(format!("{name}.img")));
        Layer::create(paths, &tools, 64 << 20, (1000, 1000), restore)
    }

    #[test]
    fn checkpoint_round_trips_files_dirs_and_links() {
        let root = tempfile::tempdir().unwrap();
        let a = create(root.path(), "a", None).unwrap();
        fs::create_dir_all(a.dir.join("home/proj/src")).unwrap();
        fs::write(a.dir.join("home/proj/src/main.py"), b"print(1)\n").unwrap();
        fs::write(a.dir.join("tmp/scratch"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", a.dir.join("home/link")).unwrap();
        let archive = a.checkpoint().unwrap();
        let b = create(root.path(), "b", Some(&archive)).unwrap();
        assert_eq!(
            fs::read(b.dir.join("home/proj/src/main.py")).unwrap(),
            b"print(1)\n"
        );
        assert_eq!(fs::read(b.dir.join("tmp/scratch")).unwrap(), b"x");
        // The link is archived as a link, not as the host file it points at.
        assert_eq!(
            fs::read_link(b.dir.join("home/link")).unwrap(),
            Path::new("/etc/shadow")
        );
        a.remove().unwrap();
        assert!(!a.dir.exists() && !a.image.exists());
        b.remove().unwrap();
    }

    #[test]
    fn a_layer_is_a_disk_of_its_size() {
        let root = tempfile::tempdir().unwrap();
        let a = create(root.path(), "a", None).unwrap();
        let mut f = fs::File::create(a.dir.join("home/fill")).unwrap();
        let block = vec![1u8; 1 << 20];
        let e = (0..100).find_map(|_| f.write_all(&block).err()).unwrap();
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
        drop(f);
        assert!(disk::full(&a.dir));
        let written = fs::metadata(a.dir.join("home/fill")).unwrap().len();
        assert!(written > 50 << 20 && written <= 64 << 20, "{written}");
        // Sparse: the host holds about what was written, not more.
        let held = fs::metadata(&a.image).unwrap().blocks() * 512;
        assert!(held < 70 << 20, "{held}");

        // A checkpoint bigger than a disk does not fit in it, and says what to change.
        fs::remove_file(a.dir.join("home/fill")).unwrap();
        assert!(!disk::full(&a.dir));
        fs::write(a.dir.join("tmp/more"), vec![2u8; 16 << 20]).unwrap();
        let big = a.checkpoint().unwrap();
        let e = {
            let tools = DiskTools::find().unwrap();
            let paths = (root.path().join("b"), root.path().join("b.img"));
            Layer::create(paths, &tools, 16 << 20, (1000, 1000), Some(&big)).unwrap_err()
        };
        assert!(e.to_string().contains("resources.disk_mb"), "{e}");
        remove(&root.path().join("b"), &root.path().join("b.img")).unwrap();
        assert!(!root.path().join("b.img").exists());
        a.remove().unwrap();
    }

    #[test]
    fn restore_refuses_entries_outside_the_layer() {
        let mut b = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        b.append_data(&mut h, "etc/passwd", &b"x"[..]).unwrap();
        let archive = b.into_inner().unwrap().finish().unwrap();
        let root = tempfile::tempdir().unwrap();
        let e = create(root.path(), "c", Some(&archive)).unwrap_err();
        assert!(e.to_string().contains("outside home/ and tmp/"), "{e}");
        remove(&root.path().join("c"), &root.path().join("c.img")).unwrap();
    }
}
