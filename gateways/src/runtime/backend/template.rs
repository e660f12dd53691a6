//! Templates: the read-only file system a sandbox sees under its writable layer.
//!
//! - `base` (built in): a read-only view of the host's `/usr` (with `/bin`, `/sbin`, `/lib`,
//!   `/lib64`... as the host has them: symlinks into `usr/` on a merged-usr Debian), and the few
//!   `/etc` files programs need (the dynamic loader's cache and configuration, alternatives, TLS
//!   certificates, `nsswitch.conf`, the time zone, `protocols`, `services`, `os-release`...), plus
//!   small generated `passwd`, `group`, `hosts`, `hostname` and `resolv.conf` files. Those are
//!   copied at each start into `<root>/templates/base/etc/`, bound as `/etc` (one mount instead
//!   of one per file). Nothing from `/root`, `/home`, `/work`, `/var`, `/run`, `/srv`, `/opt`,
//!   `/mnt` or the rest of `/etc`.
//! - `<templates_dir>/<name>/rootfs/`: each top-level entry of the directory bound read-only at
//!   the same place (symlinks recreated), except `proc`, `dev`, `sys`, `tmp`, `home` and `run`,
//!   which the sandbox gets fresh.
//!
//! Every template has a SHA-256 digest (it goes into the attestation), computed once at load
//! over a canonical text: `creto-template v1`, the name and kind, then one line per mount (its
//! kind, destination and source or link target), then a tree digest of every bound source: for
//! each entry, sorted by path, its relative path, type, permission bits, size and the SHA-256 of
//! its content (or its link target for a symlink). For a rootfs template that covers the whole
//! file tree. For `base`, the tree digest covers the built `/etc` (copied and generated) but **not
//! `/usr` file by file** (hashing a distribution's `/usr` takes seconds to minutes); `/usr` is
//! represented by the host's package database (`/var/lib/dpkg/status`: every installed package
//! and version) and `/usr/lib/os-release`, so upgrading, installing or removing a package changes
//! the digest, but a file in `/usr` changed by hand does not. Use a rootfs template when the
//! digest must cover every byte.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::BackendError;

/// One piece of a template's file system.
#[derive(Debug, Clone)]
pub enum TemplateMount {
    /// Bind the host path `src` read-only at `dest`.
    RoBind { src: PathBuf, dest: String },
    /// A symbolic link at `dest` pointing at `target`.
    Symlink { target: String, dest: String },
}

impl TemplateMount {
    pub fn dest(&self) -> &str {
        match self {
            TemplateMount::RoBind { dest, .. } | TemplateMount::Symlink { dest, .. } => dest,
        }
    }
}

/// A read-only file system for sandboxes.
#[derive(Debug)]
pub struct Template {
    pub name: String,
    /// See the module documentation for what it covers.
    pub digest: [u8; 32],
    /// `base` or `rootfs`.
    pub kind: &'static str,
    /// In the order they are mounted.
    pub mounts: Vec<TemplateMount>,
}

impl Template {
    pub fn digest_hex(&self) -> String {
        hex::encode(self.digest)
    }
}

/// Names a template may have: `[a-z0-9._-]`, 1 to 64 characters, not starting with `.`.
pub fn validate_template_name(name: &str) -> Result<(), BackendError> {
    if name.is_empty()
        || name.len() > 64
        || name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    {
        return Err(BackendError::InvalidSpec(format!(
            "template name {name:?} must be 1 to 64 characters of [a-z0-9._-], not starting with '.'"
        )));
    }
    Ok(())
}

/// `/etc` entries of the host that the base template shows (when they exist).
const BASE_ETC: &[&str] = &[
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "alternatives",
    "ssl",
    "ca-certificates",
    "ca-certificates.conf",
    "nsswitch.conf",
    "localtime",
    "timezone",
    "protocols",
    "services",
    "os-release",
    "debian_version",
    "mime.types",
    "gai.conf",
    "host.conf",
    "inputrc",
    "bash.bashrc",
    "profile",
];

/// Top-level entries of a merged-usr (or not) host that lead into `/usr` content.
const BASE_TOP: &[&str] = &["bin", "sbin", "lib", "lib32", "lib64", "libx32"];

/// Generated `/etc` files of the base template (the sandbox user is uid/gid 1000).
pub const GENERATED_ETC: &[(&str, &str)] = &[
    (
        "passwd",
        "root:x:0:0:root:/root:/usr/sbin/nologin\n\
         sandbox:x:1000:1000:sandbox:/home/sandbox:/bin/bash\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
    ),
    ("group", "root:x:0:\nsandbox:x:1000:\nnogroup:x:65534:\n"),
    (
        "hosts",
        "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    ),
    ("hostname", "sandbox\n"),
    // The egress proxy answers DNS on the sandbox's loopback (names the policy allows only).
    (
        "resolv.conf",
        "nameserver 127.0.0.1\noptions timeout:2 attempts:2\n",
    ),
];

/// Directories the sandbox always gets fresh, never from a rootfs.
const FRESH_TOP: &[&str] = &["proc", "dev", "sys", "tmp", "home", "run"];

/// Builds the base template. Generated `/etc` files are written under `generated_dir`.
pub fn base(generated_dir: &Path) -> Result<Template, BackendError> {
    base_from(Path::new("/"), generated_dir)
}

/// The base template over a host root (`/`; another directory in tests).
pub(crate) fn base_from(host: &Path, generated_dir: &Path) -> Result<Template, BackendError> {
    let mut mounts = Vec::new();
    let mut spec = String::from("creto-template v1\nname base\nkind base\n");
    let mut trees = Sha256::new();

    let usr = host.join("usr");
    mounts.push(TemplateMount::RoBind {
        src: usr,
        dest: "/usr".into(),
    });
    spec.push_str("ro-bind /usr /usr\n");
    for extra in ["var/lib/dpkg/status", "usr/lib/os-release"] {
        let p = host.join(extra);
        if p.exists() {
            spec.push_str(&format!("identity /{extra}\n"));
            hash_tree(&p, Path::new(extra), &mut trees)?;
        } else {
            spec.push_str(&format!("identity /{extra} absent\n"));
        }
    }
    for top in BASE_TOP {
        let p = host.join(top);
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        let dest = format!("/{top}");
        if meta.file_type().is_symlink() {
            let target =
                fs::read_link(&p).map_err(BackendError::io(format!("readlink {}", p.display())))?;
            let target = target.to_string_lossy().into_owned();
            spec.push_str(&format!("symlink {dest} {target}\n"));
            mounts.push(TemplateMount::Symlink { target, dest });
        } else if meta.is_dir() {
            spec.push_str(&format!("ro-bind {dest} {dest}\n"));
            hash_tree(&p, Path::new(top), &mut trees)?;
            mounts.push(TemplateMount::RoBind { src: p, dest });
        }
    }
    // /etc: one directory built afresh at each start (copies of the host files above plus the
    // generated ones), bound once: a single mount rather than one per file.
    let staging = generated_dir.with_extension("new");
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)
        .map_err(BackendError::io(format!("create {}", staging.display())))?;
    for name in BASE_ETC {
        let p = host.join("etc").join(name);
        // Follow a symlink at the top (localtime, os-release): copy what it points at.
        let Ok(real) = fs::canonicalize(&p) else {
            continue;
        };
        copy_tree(&real, &staging.join(name))?;
    }
    for (name, content) in GENERATED_ETC {
        let p = staging.join(name);
        fs::write(&p, content).map_err(BackendError::io(format!("write {}", p.display())))?;
    }
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o755))
        .map_err(BackendError::io(format!("chmod {}", staging.display())))?;
    let _ = fs::remove_dir_all(generated_dir);
    fs::rename(&staging, generated_dir).map_err(BackendError::io(format!(
        "rename to {}",
        generated_dir.display()
    )))?;
    spec.push_str("ro-bind <generated> /etc\n");
    hash_tree(generated_dir, Path::new("etc"), &mut trees)?;
    mounts.push(TemplateMount::RoBind {
        src: generated_dir.to_path_buf(),
        dest: "/etc".into(),
    });
    Ok(finish("base", "base", spec, trees, mounts))
}

/// Copies a file, a symlink (as a link) or a directory tree; skips other kinds.
fn copy_tree(src: &Path, dst: &Path) -> Result<(), BackendError> {
    let meta =
        fs::symlink_metadata(src).map_err(BackendError::io(format!("stat {}", src.display())))?;
    // What the host keeps from other users (the keys under /etc/ssl/private) stays out: the
    // copy belongs to root, which in the privileged fallback is the sandbox's own uid.
    if !meta.file_type().is_symlink() && meta.mode() & 0o004 == 0 {
        return Ok(());
    }
    if meta.file_type().is_symlink() {
        let target =
            fs::read_link(src).map_err(BackendError::io(format!("readlink {}", src.display())))?;
        std::os::unix::fs::symlink(target, dst)
            .map_err(BackendError::io(format!("symlink {}", dst.display())))?;
    } else if meta.is_dir() {
        fs::create_dir(dst).map_err(BackendError::io(format!("create {}", dst.display())))?;
        for e in fs::read_dir(src).map_err(BackendError::io(format!("read {}", src.display())))? {
            let e = e.map_err(BackendError::io(format!("read {}", src.display())))?;
            copy_tree(&e.path(), &dst.join(e.file_name()))?;
        }
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o755))
            .map_err(BackendError::io(format!("chmod {}", dst.display())))?;
    } else if meta.is_file() {
        fs::copy(src, dst).map_err(BackendError::io(format!("copy {}", src.display())))?;
        fs::set_permissions(dst, fs::Permissions::from_mode(meta.mode() & 0o755))
            .map_err(BackendError::io(format!("chmod {}", dst.display())))?;
    }
    Ok(())
}

/// A template from `<dir>/rootfs/`, named `name`.
pub fn from_rootfs(name: &str, dir: &Path) -> Result<Template, BackendError> {
    validate_template_name(name)?;
    let rootfs = dir.join("rootfs");
    let mut entries: Vec<_> = fs::read_dir(&rootfs)
        .map_err(BackendError::io(format!(
            "read template {}",
            rootfs.display()
        )))?
        .collect::<Result<_, _>>()
        .map_err(BackendError::io(format!(
            "read template {}",
            rootfs.display()
        )))?;
    entries.sort_by_key(|e| e.file_name());
    let mut spec = format!("creto-template v1\nname {name}\nkind rootfs\n");
    let mut trees = Sha256::new();
    let mut mounts = Vec::new();
    for e in entries {
        let file_name = e.file_name();
        let Some(top) = file_name.to_str() else {
            return Err(BackendError::InvalidSpec(format!(
                "template {name}: top-level entry {file_name:?} is not UTF-8"
            )));
        };
        if FRESH_TOP.contains(&top) {
            continue;
        }
        let p = e.path();
        let meta =
            fs::symlink_metadata(&p).map_err(BackendError::io(format!("stat {}", p.display())))?;
        let dest = format!("/{top}");
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&p)
                .map_err(BackendError::io(format!("readlink {}", p.display())))?
                .to_string_lossy()
                .into_owned();
            spec.push_str(&format!("symlink {dest} {target}\n"));
            mounts.push(TemplateMount::Symlink { target, dest });
        } else if meta.is_dir() || meta.is_file() {
            spec.push_str(&format!("ro-bind {dest} {dest}\n"));
            hash_tree(&p, Path::new(top), &mut trees)?;
            mounts.push(TemplateMount::RoBind { src: p, dest });
        }
    }
    if mounts.is_empty() {
        return Err(BackendError::InvalidSpec(format!(
            "template {name}: {} is empty",
            rootfs.display()
        )));
    }
    Ok(finish(name, "rootfs", spec, trees, mounts))
}

/// Loads every `<dir>/<name>/rootfs/` template.
pub fn load_dir(dir: &Path) -> Result<Vec<Template>, BackendError> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(BackendError::io(format!(
            "read templates directory {}",
            dir.display()
        )))?
        .filter_map(Result::ok)
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let Some(name) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if e.path().join("rootfs").is_dir() {
            out.push(from_rootfs(&name, &e.path())?);
        }
    }
    Ok(out)
}

fn finish(
    name: &str,
    kind: &'static str,
    mut spec: String,
    trees: Sha256,
    mounts: Vec<TemplateMount>,
) -> Template {
    spec.push_str(&format!("trees {}\n", hex::encode(trees.finalize())));
    Template {
        name: name.to_string(),
        digest: Sha256::digest(spec.as_bytes()).into(),
        kind,
        mounts,
    }
}

/// Feeds every entry under `p` (itself included, named `rel`) into `h`, sorted by path, without
/// following symlinks below the top.
fn hash_tree(p: &Path, rel: &Path, h: &mut Sha256) -> Result<(), BackendError> {
    let meta =
        fs::symlink_metadata(p).map_err(BackendError::io(format!("stat {}", p.display())))?;
    let ft = meta.file_type();
    let mode = meta.mode() & 0o7777;
    let line = |kind: &str, extra: &str| {
        format!(
            "{}\0{kind}\0{mode:o}\0{}\0{extra}\n",
            rel.display(),
            meta.size()
        )
    };
    if ft.is_symlink() {
        let target =
            fs::read_link(p).map_err(BackendError::io(format!("readlink {}", p.display())))?;
        h.update(line("l", &target.to_string_lossy()).as_bytes());
    } else if ft.is_file() {
        let mut f = fs::File::open(p).map_err(BackendError::io(format!("open {}", p.display())))?;
        let mut fh = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(BackendError::io(format!("read {}", p.display())))?;
            if n == 0 {
                break;
            }
            fh.update(&buf[..n]);
        }
        h.update(line("f", &hex::encode(fh.finalize())).as_bytes());
    } else if ft.is_dir() {
        h.update(line("d", "").as_bytes());
        let mut names: Vec<_> = fs::read_dir(p)
            .map_err(BackendError::io(format!("read {}", p.display())))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for n in names {
            hash_tree(&p.join(&n), &rel.join(&n), h)?;
        }
    } else {
        h.update(line("o", "").as_bytes());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_host_keeps_from_others_is_not_copied() {
        let d = tempfile::tempdir().unwrap();
        let ssl = d.path().join("ssl");
        fs::create_dir_all(ssl.join("certs")).unwrap();
        fs::create_dir_all(ssl.join("private")).unwrap();
        fs::write(ssl.join("certs/ca.pem"), b"cert").unwrap();
        fs::write(ssl.join("private/host.key"), b"key").unwrap();
        fs::write(ssl.join("secret.cnf"), b"x").unwrap();
        fs::set_permissions(ssl.join("private"), fs::Permissions::from_mode(0o710)).unwrap();
        fs::set_permissions(ssl.join("secret.cnf"), fs::Permissions::from_mode(0o600)).unwrap();
        let out = d.path().join("copy");
        copy_tree(&ssl, &out).unwrap();
        assert_eq!(fs::read(out.join("certs/ca.pem")).unwrap(), b"cert");
        assert!(!out.join("private").exists());
        assert!(!out.join("secret.cnf").exists());
    }

    #[test]
    fn rootfs_digest_covers_content_and_skips_fresh_dirs() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("t1/rootfs");
        fs::create_dir_all(root.join("usr/bin")).unwrap();
        fs::create_dir_all(root.join("home/someone")).unwrap();
        fs::write(root.join("usr/bin/tool"), b"v1").unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        let a = from_rootfs("t1", &d.path().join("t1")).unwrap();
        let dests: Vec<_> = a.mounts.iter().map(|m| m.dest().to_string()).collect();
        assert_eq!(dests, ["/bin", "/usr"]);
        let again = from_rootfs("t1", &d.path().join("t1")).unwrap();
        assert_eq!(a.digest, again.digest);
        fs::write(root.join("usr/bin/tool"), b"v2").unwrap();
        let changed = from_rootfs("t1", &d.path().join("t1")).unwrap();
        assert_ne!(a.digest, changed.digest);
        // The home directory is not part of the template (the sandbox gets its own).
        fs::write(root.join("home/someone/x"), b"y").unwrap();
        assert_eq!(
            from_rootfs("t1", &d.path().join("t1")).unwrap().digest,
            changed.digest
        );
        assert_eq!(load_dir(d.path()).unwrap().len(), 1);
        assert!(validate_template_name("Bad").is_err());
    }

    #[test]
    fn base_template_is_stable_and_shows_no_private_host_paths() {
        let d = tempfile::tempdir().unwrap();
        let etc = d.path().join("etc");
        let a = base(&etc).unwrap();
        let b = base(&etc).unwrap();
        assert_eq!(a.digest, b.digest);
        for m in &a.mounts {
            let dest = m.dest();
            assert!(
                dest == "/usr" || dest == "/etc" || BASE_TOP.contains(&&dest[1..]),
                "{dest}"
            );
        }
        assert!(fs::read_to_string(etc.join("passwd"))
            .unwrap()
            .contains("sandbox:x:1000"));
        assert!(etc.join("ld.so.cache").exists());
        for private in ["shadow", "gshadow", "machine-id", "hostname-"] {
            assert!(!etc.join(private).exists(), "{private}");
        }
    }
}
