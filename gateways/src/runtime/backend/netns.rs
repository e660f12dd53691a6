//! A sandbox's network namespace, owned by the host's user namespace (so nothing inside the
//! sandbox can change its firewall), named `creto-<instance>-<id>` under `/run/netns` (so
//! `ip netns exec` reaches it for debugging).
//!
//! Inside: `lo` up, a default route (IPv4 and IPv6) through `lo`, and a firewall (one `nft -f -`,
//! or `iptables-restore` and `ip6tables-restore` when `nft` is missing) that redirects every TCP
//! connection not addressed to 127.0.0.1 / ::1 to the egress proxy's listener on port
//! [`PROXY_PORT`] and rejects any other traffic leaving the loopback addresses (UDP, ICMP...),
//! except DNS to the proxy's resolver on 127.0.0.1:53. The proxy's sockets are created here, in
//! the namespace, by a dedicated thread; sockets stay in the namespace they were created in, so
//! the proxy's tokio tasks accept from them while connecting out from the host's namespace.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::BackendError;

/// The egress proxy's port on the sandbox's loopback.
pub const PROXY_PORT: u16 = 15001;

pub(crate) const NETNS_DIR: &str = "/run/netns";

/// How to install the firewall rules.
#[derive(Clone, Debug)]
pub(crate) enum Firewall {
    Nft(PathBuf),
    Iptables { v4: PathBuf, v6: Option<PathBuf> },
}

impl Firewall {
    pub fn find() -> Option<Firewall> {
        if let Some(nft) = super::find_program(Path::new("nft")) {
            return Some(Firewall::Nft(nft));
        }
        let v4 = super::find_program(Path::new("iptables-restore"))?;
        let v6 = super::find_program(Path::new("ip6tables-restore"));
        Some(Firewall::Iptables { v4, v6 })
    }

    pub fn nft_ruleset() -> String {
        format!(
            "table inet creto {{\n\
             \tchain egress_nat {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tip daddr != 127.0.0.1 meta l4proto tcp redirect to :{PROXY_PORT}\n\
             \t\tip6 daddr != ::1 meta l4proto tcp redirect to :{PROXY_PORT}\n\
             \t}}\n\
             \tchain egress_filter {{\n\
             \t\ttype filter hook output priority 0; policy accept;\n\
             \t\tip daddr != 127.0.0.1 meta l4proto != tcp reject\n\
             \t\tip6 daddr != ::1 meta l4proto != tcp reject\n\
             \t}}\n\
             }}\n"
        )
    }

    fn iptables_ruleset(lo: &str) -> String {
        format!(
            "*nat\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT -p tcp ! -d {lo} -j REDIRECT --to-ports {PROXY_PORT}\n\
             COMMIT\n\
             *filter\n:OUTPUT ACCEPT [0:0]\n\
             -A OUTPUT ! -p tcp ! -d {lo} -j REJECT\n\
             COMMIT\n"
        )
    }

    /// Runs the tool; called on the thread that is in the namespace (children inherit it).
    fn install(&self) -> Result<(), String> {
        let runs: Vec<(PathBuf, Vec<&str>, String)> = match self {
            Firewall::Nft(nft) => vec![(nft.clone(), vec!["-f", "-"], Self::nft_ruleset())],
            Firewall::Iptables { v4, v6 } => {
                let mut r = vec![(v4.clone(), vec![], Self::iptables_ruleset("127.0.0.1"))];
                if let Some(v6) = v6 {
                    r.push((v6.clone(), vec![], Self::iptables_ruleset("::1")));
                }
                r
            }
        };
        for (prog, args, input) in runs {
            let mut child = Command::new(&prog)
                .args(args)
                .env_clear()
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("run {}: {e}", prog.display()))?;
            if let Some(mut stdin) = child.stdin.take() {
                stdin
                    .write_all(input.as_bytes())
                    .map_err(|e| format!("write rules to {}: {e}", prog.display()))?;
            }
            let out = child
                .wait_with_output()
                .map_err(|e| format!("wait for {}: {e}", prog.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} failed ({}): {}",
                    prog.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(())
    }
}

/// What the namespace thread hands back.
pub(crate) struct NetnsParts {
    pub netns: Netns,
    /// The proxy's TCP listeners: 127.0.0.1 and (when IPv6 is up) ::1, port [`PROXY_PORT`].
    pub listeners: Vec<TcpListener>,
    /// The resolver's socket, 127.0.0.1:53.
    pub dns: UdpSocket,
}

/// A named network namespace; removed by [`Netns::remove`].
#[derive(Debug)]
pub(crate) struct Netns {
    pub fd: OwnedFd,
    pub path: PathBuf,
}

fn errno_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("paths hold no NUL")
}

/// Brings `lo` up and routes every destination through it (IPv4 and, if present, IPv6).
fn setup_loopback() -> Result<bool, String> {
    // SAFETY: plain socket/ioctl calls on structs we own, sized as the kernel expects.
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(errno_err("socket"));
        }
        let s = OwnedFd::from_raw_fd(s);
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr) < 0 {
            return Err(errno_err("SIOCGIFFLAGS lo"));
        }
        ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr) < 0 {
            return Err(errno_err("SIOCSIFFLAGS lo up"));
        }

        let mut rt: RtEntry = std::mem::zeroed();
        let any = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: 0 },
            sin_zero: [0; 8],
        };
        std::ptr::copy_nonoverlapping(
            &any as *const _ as *const u8,
            &mut rt.rt_dst as *mut _ as *mut u8,
            std::mem::size_of::<libc::sockaddr_in>(),
        );
        std::ptr::copy_nonoverlapping(
            &any as *const _ as *const u8,
            &mut rt.rt_genmask as *mut _ as *mut u8,
            std::mem::size_of::<libc::sockaddr_in>(),
        );
        rt.rt_flags = libc::RTF_UP;
        let dev = c"lo";
        rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
        if libc::ioctl(s.as_raw_fd(), libc::SIOCADDRT, &rt) < 0 {
            return Err(errno_err("SIOCADDRT default dev lo"));
        }

        let s6 = libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s6 < 0 {
            // No IPv6 in this kernel: IPv4 only.
            return Ok(false);
        }
        let s6 = OwnedFd::from_raw_fd(s6);
        let mut rt6: In6Rtmsg = std::mem::zeroed();
        rt6.rtmsg_metric = 1;
        rt6.rtmsg_flags = libc::RTF_UP as u32;
        rt6.rtmsg_ifindex = libc::if_nametoindex(dev.as_ptr()) as libc::c_int;
        if libc::ioctl(s6.as_raw_fd(), libc::SIOCADDRT, &rt6) < 0 {
            // IPv6 disabled on lo: IPv4 only.
            return Ok(false);
        }
        Ok(true)
    }
}

/// `struct rtentry` (linux/route.h).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// `struct in6_rtmsg` (linux/ipv6_route.h).
#[repr(C)]
struct In6Rtmsg {
    rtmsg_dst: libc::in6_addr,
    rtmsg_src: libc::in6_addr,
    rtmsg_gateway: libc::in6_addr,
    rtmsg_type: u32,
    rtmsg_dst_len: u16,
    rtmsg_src_len: u16,
    rtmsg_metric: u32,
    rtmsg_info: libc::c_ulong,
    rtmsg_flags: u32,
    rtmsg_ifindex: libc::c_int,
}

/// Keeps `/run/netns` as iproute2 does: a mount point of its own, shared. Without it, the
/// first `ip netns add` (an operator's, or another tool's) bind-mounts the directory over
/// itself and hides the names made before under it, where they can be neither unmounted nor
/// removed by their path (EBUSY) until the host reboots.
fn share_run_dir() -> Result<(), String> {
    let dir = cstr(Path::new(NETNS_DIR));
    let mut bound = false;
    loop {
        // SAFETY: plain syscalls on NUL-terminated strings.
        let shared = unsafe {
            libc::mount(
                c"none".as_ptr(),
                dir.as_ptr(),
                std::ptr::null(),
                libc::MS_SHARED | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if shared == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        // EINVAL: not a mount point yet; make it one (once) and try again.
        if err.raw_os_error() != Some(libc::EINVAL) || bound {
            return Err(format!("make {NETNS_DIR} a shared mount: {err}"));
        }
        // SAFETY: as above.
        let r = unsafe {
            libc::mount(
                dir.as_ptr(),
                dir.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
        };
        if r != 0 {
            return Err(errno_err(&format!("bind {NETNS_DIR} onto itself")));
        }
        bound = true;
    }
}

/// Removes a namespace's name (unmount and unlink); the namespace itself goes when its last
/// user (fd, process, socket) does.
pub(crate) fn remove_name(path: &Path) -> Result<(), BackendError> {
    let c = cstr(path);
    // SAFETY: plain syscall on a NUL-terminated path.
    unsafe {
        libc::umount2(c.as_ptr(), libc::MNT_DETACH);
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(BackendError::io(format!("remove {}", path.display()))(e)),
    }
}

/// Names of this instance's namespaces under `/run/netns`: `(id, path)`.
pub(crate) fn list(instance: &str) -> Vec<(String, PathBuf)> {
    let prefix = format!("creto-{instance}-");
    fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let id = name.strip_prefix(&prefix)?.to_string();
            Some((id, e.path()))
        })
        .collect()
}

impl Netns {
    pub fn name(instance: &str, id: &str) -> String {
        format!("creto-{instance}-{id}")
    }

    /// Creates the namespace on a fresh thread (which exits afterwards, so no runtime thread is
    /// ever moved into it).
    pub fn create(
        name: String,
        firewall: Firewall,
    ) -> std::thread::JoinHandle<Result<NetnsParts, String>> {
        std::thread::Builder::new()
            .name("creto-netns".into())
            .spawn(move || Self::create_here(&name, &firewall))
            .expect("spawn a thread")
    }

    fn create_here(name: &str, firewall: &Firewall) -> Result<NetnsParts, String> {
        // SAFETY: unshare affects only this thread (CLONE_NEWNET is per thread).
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(errno_err("unshare(CLONE_NEWNET)"));
        }
        let fd = fs::File::open("/proc/thread-self/ns/net")
            .map_err(|e| format!("open /proc/thread-self/ns/net: {e}"))?;
        let fd = OwnedFd::from(fd);
        let path = Path::new(NETNS_DIR).join(name);
        let _ = fs::create_dir_all(NETNS_DIR);
        share_run_dir()?;
        if path.exists() {
            // A stale name of ours (a crashed process of this instance): reuse the name.
            remove_name(&path).map_err(|e| e.to_string())?;
        }
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| format!("create {}: {e}", path.display()))?;
        let netns = Netns { fd, path };
        let src = c"/proc/thread-self/ns/net";
        let dst = cstr(&netns.path);
        // SAFETY: bind mount of this thread's namespace file onto the empty file just made.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = errno_err(&format!("bind {}", netns.path.display()));
            let _ = fs::remove_file(&netns.path);
            return Err(e);
        }
        let built = (|| {
            let v6 = setup_loopback()?;
            let mut listeners = vec![TcpListener::bind((Ipv4Addr::LOCALHOST, PROXY_PORT))
                .map_err(|e| format!("bind 127.0.0.1:{PROXY_PORT}: {e}"))?];
            if v6 {
                if let Ok(l) =
                    TcpListener::bind(SocketAddr::from((Ipv6Addr::LOCALHOST, PROXY_PORT)))
                {
                    listeners.push(l);
                }
            }
            let dns = UdpSocket::bind((Ipv4Addr::LOCALHOST, 53))
                .map_err(|e| format!("bind 127.0.0.1:53: {e}"))?;
            firewall.install()?;
            Ok::<_, String>((listeners, dns))
        })();
        match built {
            Ok((listeners, dns)) => Ok(NetnsParts {
                netns,
                listeners,
                dns,
            }),
            Err(e) => {
                let _ = netns.remove();
                Err(e)
            }
        }
    }

    pub fn remove(&self) -> Result<(), BackendError> {
        remove_name(&self.path)
    }
}
