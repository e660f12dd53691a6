//! The transparent egress proxy: one per sandbox, the only way out of its network namespace.
//!
//! The namespace's firewall redirects every TCP connection the sandbox opens (to anything but
//! its own loopback address) to the proxy's listener inside the namespace; the proxy reads the
//! original destination (`SO_ORIGINAL_DST`), decides it with [`EgressPolicy`] (the sandbox's
//! current policy: [`EgressProxy::set_policy`] swaps it for the next attempt), reports the
//! attempt, and either connects to the destination from the host's namespace and splices the
//! two connections, or resets the sandbox's connection at once. A connection addressed to the
//! proxy's own listener is refused.
//!
//! Names: the proxy also answers DNS on the sandbox's 127.0.0.1:53 (UDP), for names an egress
//! rule allows (exact or wildcard; other names get NXDOMAIN), resolving them on the host, and
//! remembers which name each answered address came from. A later connection to that address is
//! decided with that name ([`EgressPolicy::decide_named`]), which is how wildcard rules match.
//! Host rules are also checked by resolving the rule's name on the host (cached for
//! [`RESOLVE_TTL`]) and comparing addresses. Names are resolved absolute, never inside the
//! cluster ([`absolute_name`]).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use std::time::{Duration, Instant};

use creto_domain::runtime::egress::{Destination, EgressDecision, EgressPolicy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::claimed_name::{claimed_name, one_request_only, Claim, CLAIM_BYTES};
use super::EgressAttempt;

/// How long a host-side resolution of a rule's name is reused.
pub const RESOLVE_TTL: Duration = Duration::from_secs(5);
/// How long an address answered by the sandbox's DNS stays associated with its name.
pub const NAME_TTL: Duration = Duration::from_secs(600);
/// At most this many proxied connections per sandbox at once; more are reset.
pub const MAX_CONNECTIONS: usize = 512;

/// The proxied connections of a replica's sandboxes: all of them together, and one sandbox's
/// share.
#[derive(Clone)]
pub struct ConnectionBudget {
    pub replica: Arc<Semaphore>,
    pub per_sandbox: usize,
}

impl ConnectionBudget {
    /// `total` for the replica; a sandbox takes at most a quarter of it (at least 16, or all
    /// of a smaller total; at most [`MAX_CONNECTIONS`]): one holding idle keep-alives to an
    /// allowed host left the others none.
    pub fn new(total: usize) -> ConnectionBudget {
        ConnectionBudget {
            replica: Arc::new(Semaphore::new(total)),
            per_sandbox: (total / 4).max(total.min(16)).min(MAX_CONNECTIONS),
        }
    }
}
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection a name rule admitted is read for the name it asks for. TLS and HTTP
/// clients send at once; a protocol whose server speaks first waits this long, once.
const CLAIM_WAIT: Duration = Duration::from_secs(1);
const DNS_TTL_SECS: u32 = 30;

struct Shared {
    sandbox_id: String,
    policy: RwLock<Arc<EgressPolicy>>,
    /// The platform's deny list: checked after the policy, on the address connected to.
    deny: EgressPolicy,
    tx: mpsc::UnboundedSender<EgressAttempt>,
    /// Own listener addresses: a connection addressed to one of them is refused.
    own: Vec<SocketAddr>,
    /// Host-side resolutions: name → (addresses, when).
    resolved: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
    /// Addresses the sandbox's DNS answered: address → (name, when).
    names: Mutex<HashMap<IpAddr, (String, Instant)>>,
    slots: Arc<Semaphore>,
    /// Every sandbox's proxied connections together: their descriptors are the gateway's.
    replica: Arc<Semaphore>,
    /// This sandbox's host lookups at once ([`LOOKUPS_PER_SANDBOX`]).
    lookups: Arc<Semaphore>,
}

/// A running proxy; stops (with every spliced connection) when dropped.
pub struct EgressProxy {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl EgressProxy {
    /// Starts the proxy on listeners (and a DNS socket) created inside the sandbox's namespace.
    pub fn start(
        sandbox_id: String,
        listeners: Vec<std::net::TcpListener>,
        dns: Option<std::net::UdpSocket>,
        policy: EgressPolicy,
        deny: EgressPolicy,
        budget: ConnectionBudget,
        tx: mpsc::UnboundedSender<EgressAttempt>,
    ) -> io::Result<EgressProxy> {
        let mut own = Vec::new();
        let mut tokio_listeners = Vec::new();
        for l in listeners {
            l.set_nonblocking(true)?;
            own.push(l.local_addr()?);
            tokio_listeners.push(TcpListener::from_std(l)?);
        }
        let shared = Arc::new(Shared {
            sandbox_id,
            policy: RwLock::new(Arc::new(policy)),
            deny,
            tx,
            own,
            resolved: Mutex::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(budget.per_sandbox)),
            replica: budget.replica,
            lookups: Arc::new(Semaphore::new(LOOKUPS_PER_SANDBOX)),
        });
        let mut tasks = Vec::new();
        for l in tokio_listeners {
            tasks.push(tokio::spawn(accept_loop(l, shared.clone())));
        }
        if let Some(d) = dns {
            d.set_nonblocking(true)?;
            let d = UdpSocket::from_std(d)?;
            tasks.push(tokio::spawn(dns_loop(d, shared.clone())));
        }
        Ok(EgressProxy { shared, tasks })
    }

    pub fn set_policy(&self, policy: EgressPolicy) {
        *self
            .shared
            .policy
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    pub fn policy(&self) -> EgressPolicy {
        (**self.shared.policy.read().unwrap_or_else(|e| e.into_inner())).clone()
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    // Owned here: aborting this task drops the set, which aborts every spliced connection.
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
                    refuse_unproxied(stream, &shared, "the sandbox's proxied connections are all in use");
                    continue;
                };
                let Ok(replica_permit) = shared.replica.clone().try_acquire_owned() else {
                    refuse_unproxied(stream, &shared, "the replica's proxied connections are all in use");
                    continue;
                };
                let shared = shared.clone();
                conns.spawn(async move {
                    handle(stream, &shared).await;
                    drop((permit, replica_permit));
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

/// Resets a connection refused for want of a slot, recorded as a denied egress decision (the
/// decisions' budget summarizes a flood of them) so the sandbox's owner can see why it failed.
fn refuse_unproxied(stream: TcpStream, shared: &Shared, why: &str) {
    if let Ok(destination) = original_dst(&stream) {
        let _ = shared.tx.send(EgressAttempt {
            sandbox_id: shared.sandbox_id.clone(),
            destination,
            allowed: false,
            rule: Some(why.to_string()),
            host: None,
        });
    }
    reset(stream);
}

/// Closes with a RST, so the sandbox sees "connection reset" rather than a clean end.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a struct of the size passed. A zero linger time makes close
    // send a RST at once (it never blocks).
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(stream);
}

/// The destination the sandbox asked for, before the redirect.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    let local = stream.local_addr()?;
    // SAFETY: getsockopt into buffers of the size passed.
    unsafe {
        if local.is_ipv4() {
            let mut a: libc::sockaddr_in = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IP,
                libc::SO_ORIGINAL_DST,
                &mut a as *mut _ as *mut libc::c_void,
                &mut len,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        } else {
            let mut a: libc::sockaddr_in6 = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                libc::IP6T_SO_ORIGINAL_DST,
                &mut a as *mut _ as *mut libc::c_void,
                &mut len,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                0,
                0,
            )))
        }
    }
}

async fn handle(mut stream: TcpStream, shared: &Shared) {
    let dst = match original_dst(&stream) {
        Ok(d) => d,
        Err(_) => {
            // Not redirected (no conntrack entry): nothing to decide on.
            reset(stream);
            return;
        }
    };
    let (mut decision, mut host, by_network) = if shared.own.contains(&dst) {
        (
            EgressDecision {
                allowed: false,
                rule: None,
            },
            None,
            false,
        )
    } else {
        let (mut decision, host, by_network) = decide(shared, dst).await;
        if decision.allowed {
            // Allowed by the policy, refused by the platform: the rule says why.
            if let Some(why) = refused_by_platform(&shared.deny, dst) {
                decision = EgressDecision {
                    allowed: false,
                    rule: Some(why),
                };
            }
        }
        (decision, host, by_network)
    };
    // Admitted by a name rule: the name the connection itself asks for must be allowed too.
    let mut first = Vec::new();
    if decision.allowed && !by_network {
        let (read, claim) = read_claim(&mut stream).await;
        first = read;
        match claim {
            Claim::Name(name) => {
                if !decide_claimed(shared, dst, &name).await.allowed {
                    decision = EgressDecision {
                        allowed: false,
                        rule: Some(format!("asked for {name}, which no rule allows here")),
                    };
                }
                host = Some(name);
            }
            Claim::Unreadable => {
                decision = EgressDecision {
                    allowed: false,
                    rule: Some("TLS or HTTP without a readable name (SNI, Host)".into()),
                };
            }
            Claim::Nothing | Claim::Incomplete => {}
        }
    }
    let _ = shared.tx.send(EgressAttempt {
        sandbox_id: shared.sandbox_id.clone(),
        destination: dst,
        allowed: decision.allowed,
        rule: decision.rule.clone(),
        host: host.clone(),
    });
    if !decision.allowed {
        reset(stream);
        return;
    }
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(Ok(u)) => u,
        _ => {
            reset(stream);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let _ = stream.set_nodelay(true);
    // Only the first request of a name-rule connection is read for its name: HTTP/1 servers are
    // asked to close after answering it, so no later request can ask for another site.
    if !by_network {
        if let Some(one) = one_request_only(&first) {
            first = one;
        }
    }
    let (mut a, mut b) = (stream, upstream);
    if b.write_all(&first).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
}

/// Reads what the connection sends first until it tells the name it asks for, or cannot, for
/// at most [`CLAIM_WAIT`]: the bytes read (sent upstream first) and the claim.
async fn read_claim(stream: &mut TcpStream) -> (Vec<u8>, Claim) {
    let deadline = tokio::time::Instant::now() + CLAIM_WAIT;
    let mut first = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match claimed_name(&first) {
            Claim::Incomplete if first.len() < CLAIM_BYTES => {}
            Claim::Incomplete => return (first, Claim::Unreadable),
            claim => return (first, claim),
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => first.extend_from_slice(&chunk[..n]),
            // Silent (the server speaks first), closed or failed: decided on what came. A
            // ClientHello or request head begun and not finished in time hides its name.
            _ => {
                let claim = match claimed_name(&first) {
                    Claim::Incomplete if first.is_empty() => Claim::Nothing,
                    Claim::Incomplete => Claim::Unreadable,
                    claim => claim,
                };
                return (first, claim);
            }
        }
    }
}

/// The decision for a connection that asks for `name` itself ([`EgressPolicy::decide_claimed`]).
async fn decide_claimed(shared: &Shared, dst: SocketAddr, name: &str) -> EgressDecision {
    let policy = current_policy(shared);
    let ip = dst.ip().to_canonical();
    if !name_allowed(&policy, name) {
        return policy.decide_claimed(name, ip, dst.port(), |_| Vec::new());
    }
    let mut ips = resolve(shared, name).await;
    // Our DNS gave the sandbox this address for this name (rotating DNS, as in `decide`).
    let given = shared
        .names
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&ip)
        .is_some_and(|(n, at)| n == name && at.elapsed() < NAME_TTL);
    if given {
        ips.push(ip);
    }
    policy.decide_claimed(name, ip, dst.port(), |h| {
        if h == name {
            ips.clone()
        } else {
            Vec::new()
        }
    })
}

fn current_policy(shared: &Shared) -> Arc<EgressPolicy> {
    shared
        .policy
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Host lookups (`getaddrinfo`, a blocking call) running at once, for every sandbox of this
/// process together.
pub const MAX_HOST_LOOKUPS: usize = 32;
/// Host lookups one sandbox may have running at once, so that one asking for names that never
/// answer cannot hold every [`MAX_HOST_LOOKUPS`] slot.
pub const LOOKUPS_PER_SANDBOX: usize = 4;
static HOST_LOOKUPS: LazyLock<Arc<Semaphore>> =
    LazyLock::new(|| Arc::new(Semaphore::new(MAX_HOST_LOOKUPS)));

/// One host lookup on the blocking pool, holding the sandbox's permit and a [`HOST_LOOKUPS`]
/// one until the call itself returns. A caller that gives up (its timeout) does not end the
/// blocking call, so permits released on the caller's side would let sandboxes asking for
/// names that never answer fill tokio's blocking pool, which the runtime's checkpoints and
/// teardowns also need.
async fn host_lookup(sandbox: Arc<Semaphore>, host: String) -> Vec<IpAddr> {
    let Ok(own) = sandbox.acquire_owned().await else {
        return Vec::new();
    };
    let Ok(permit) = HOST_LOOKUPS.clone().acquire_owned().await else {
        return Vec::new();
    };
    tokio::task::spawn_blocking(move || {
        let _permits = (own, permit);
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), 0u16))
            .map(|addrs| addrs.map(|a| a.ip().to_canonical()).collect())
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// `host` as the host's resolver is asked for it: absolute (a trailing dot), so its search
/// domains never turn a sandbox's name into a cluster Service (Kubernetes tries
/// `nats.<ns>.svc.cluster.local` for `nats`, and the proxy connects from the runtime's pod).
/// None for a single label or a cluster-internal suffix: they name nothing public.
fn absolute_name(host: &str) -> Option<String> {
    const INTERNAL: [&str; 4] = ["local", "svc", "internal", "localhost"];
    let host = host.trim_end_matches('.');
    let last = host.rsplit('.').next().unwrap_or_default();
    if !host.contains('.') || INTERNAL.contains(&last) {
        return None;
    }
    Some(format!("{host}."))
}

/// Resolves `host` on the host, through the cache; nothing for names [`absolute_name`] refuses.
async fn resolve(shared: &Shared, host: &str) -> Vec<IpAddr> {
    let Some(absolute) = absolute_name(host) else {
        return Vec::new();
    };
    if let Some((ips, at)) = shared
        .resolved
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(host)
    {
        if at.elapsed() < RESOLVE_TTL {
            return ips.clone();
        }
    }
    let lookup = host_lookup(shared.lookups.clone(), absolute);
    let Ok(ips) = tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await else {
        // Not remembered: waiting for a slot, or for a slow resolver, says nothing of the name.
        return Vec::new();
    };
    let mut cache = shared.resolved.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() > 1024 {
        cache.retain(|_, (_, at)| at.elapsed() < RESOLVE_TTL);
    }
    cache.insert(host.to_string(), (ips.clone(), Instant::now()));
    ips
}

/// Why the platform refuses `dst` whatever the policy says: a network of its deny list, or
/// one of the host's own addresses (the proxy connects from the host, where a public address
/// reaches the node's own services: gateways, metrics, a node-local NATS).
fn refused_by_platform(deny: &EgressPolicy, dst: SocketAddr) -> Option<String> {
    let denied = deny.decide(dst.ip(), dst.port(), |_| Vec::new());
    if let Some(network) = denied.rule.filter(|_| denied.allowed) {
        return Some(format!("platform deny {network}"));
    }
    let ip = dst.ip().to_canonical();
    host_addresses()
        .contains(&ip)
        .then(|| format!("platform deny host address {ip}"))
}

/// The addresses of the host's interfaces, loopback aside (the deny list's `127.0.0.0/8` and
/// `::/127` govern it), read again every [`HOST_ADDRESSES_TTL`].
fn host_addresses() -> Vec<IpAddr> {
    static CACHE: Mutex<Option<(Vec<IpAddr>, Instant)>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((ips, at)) = cache.as_ref() {
        if at.elapsed() < HOST_ADDRESSES_TTL {
            return ips.clone();
        }
    }
    let ips = interface_addresses();
    *cache = Some((ips.clone(), Instant::now()));
    ips
}

const HOST_ADDRESSES_TTL: Duration = Duration::from_secs(30);

fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list that freeifaddrs releases below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        tracing::warn!(error = %io::Error::last_os_error(), "cannot list the host's addresses");
        return out;
    }
    let mut node = head;
    while !node.is_null() {
        // SAFETY: a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*node };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its real type.
            match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
                libc::AF_INET => {
                    // SAFETY: an AF_INET address is a sockaddr_in (s_addr in network order).
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    out.push(IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        node = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    out.retain(|ip| !ip.is_loopback());
    out
}

/// The decision for `dst`, the name our DNS gave the sandbox for its address, and whether a
/// network rule decided (no name involved).
async fn decide(shared: &Shared, dst: SocketAddr) -> (EgressDecision, Option<String>, bool) {
    let policy = current_policy(shared);
    let ip = dst.ip().to_canonical();
    let name = {
        let names = shared.names.lock().unwrap_or_else(|e| e.into_inner());
        names
            .get(&ip)
            .filter(|(_, at)| at.elapsed() < NAME_TTL)
            .map(|(n, _)| n.clone())
    };
    // A network rule needs no resolution.
    let by_net = policy.decide(ip, dst.port(), |_| Vec::new());
    if by_net.allowed {
        return (by_net, name, true);
    }
    // Resolve the names the decision may ask about, then decide synchronously.
    let mut table: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for rule in &policy.rules {
        if let Destination::Host(h) = &rule.destination {
            let admits = rule
                .ports
                .is_none_or(|(lo, hi)| lo <= dst.port() && dst.port() <= hi);
            if admits && !h.starts_with("*.") && !table.contains_key(h) {
                let ips = resolve(shared, h).await;
                table.insert(h.clone(), ips);
            }
        }
    }
    if let Some(n) = &name {
        // The address came from our own DNS answer for this name (the host's resolution
        // then), also when an exact rule names it: a name whose DNS rotates resolves to other
        // addresses since, and connections to the one the sandbox was given were refused.
        let ips = table.entry(n.clone()).or_default();
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let lookup = |h: &str| table.get(h).cloned().unwrap_or_default();
    let d = match &name {
        Some(n) => policy.decide_named(n, ip, dst.port(), lookup),
        None => policy.decide(ip, dst.port(), lookup),
    };
    (d, name, false)
}

/// Whether some host rule (any port) covers `name`.
fn name_allowed(policy: &EgressPolicy, name: &str) -> bool {
    policy.rules.iter().any(|r| match &r.destination {
        Destination::Host(h) => match h.strip_prefix("*.") {
            Some(suffix) => name.len() > suffix.len() + 1 && name.ends_with(&format!(".{suffix}")),
            None => h == name,
        },
        Destination::Net { .. } => false,
    })
}

async fn dns_loop(sock: UdpSocket, shared: Arc<Shared>) {
    let sock = Arc::new(sock);
    let mut buf = vec![0u8; 1500];
    let mut inflight = JoinSet::new();
    loop {
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let Ok((n, peer)) = r else { continue };
                let Some(q) = parse_query(&buf[..n]) else { continue };
                if inflight.len() >= 64 {
                    continue;
                }
                let (sock, shared) = (sock.clone(), shared.clone());
                inflight.spawn(async move {
                    let reply = answer(&shared, &q).await;
                    let _ = sock.send_to(&reply, peer).await;
                });
            }
            Some(_) = inflight.join_next(), if !inflight.is_empty() => {}
        }
    }
}

/// A DNS question (the first one of a query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Query {
    id: u16,
    rd: bool,
    /// The question section as received (name, type, class).
    question: Vec<u8>,
    name: String,
    qtype: u16,
    qclass: u16,
}

pub(crate) fn parse_query(msg: &[u8]) -> Option<Query> {
    if msg.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let qdcount = u16::from_be_bytes([msg[4], msg[5]]);
    // A query (QR=0), standard opcode, one question.
    if flags & 0x8000 != 0 || (flags >> 11) & 0xF != 0 || qdcount != 1 {
        return None;
    }
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *msg.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None; // compression is not used in questions
        }
        let label = msg.get(i..i + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?]);
    let qclass = u16::from_be_bytes([*msg.get(i + 2)?, *msg.get(i + 3)?]);
    Some(Query {
        id,
        rd: flags & 0x0100 != 0,
        question: msg[12..i + 4].to_vec(),
        name: labels.join("."),
        qtype,
        qclass,
    })
}

const QTYPE_A: u16 = 1;
const QTYPE_AAAA: u16 = 28;
const RCODE_NXDOMAIN: u16 = 3;
const RCODE_SERVFAIL: u16 = 2;

pub(crate) fn build_reply(q: &Query, rcode: u16, ips: &[IpAddr]) -> Vec<u8> {
    let answers: Vec<&IpAddr> = ips
        .iter()
        .filter(|ip| match q.qtype {
            QTYPE_A => ip.is_ipv4(),
            QTYPE_AAAA => ip.is_ipv6(),
            _ => false,
        })
        .take(16)
        .collect();
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(&q.id.to_be_bytes());
    let flags: u16 = 0x8000 | if q.rd { 0x0100 } else { 0 } | 0x0080 | rcode;
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&q.question);
    for ip in answers {
        out.extend_from_slice(&[0xC0, 0x0C]); // the question's name
        out.extend_from_slice(&q.qtype.to_be_bytes());
        out.extend_from_slice(&1u16.to_be_bytes());
        out.extend_from_slice(&DNS_TTL_SECS.to_be_bytes());
        match ip {
            IpAddr::V4(a) => {
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.extend_from_slice(&16u16.to_be_bytes());
                out.extend_from_slice(&a.octets());
            }
        }
    }
    out
}

async fn answer(shared: &Shared, q: &Query) -> Vec<u8> {
    let name = q.name.trim_end_matches('.').to_string();
    let policy = current_policy(shared);
    if q.qclass != 1 || !name_allowed(&policy, &name) {
        return build_reply(q, RCODE_NXDOMAIN, &[]);
    }
    if q.qtype != QTYPE_A && q.qtype != QTYPE_AAAA {
        return build_reply(q, 0, &[]);
    }
    let ips = resolve(shared, &name).await;
    if ips.is_empty() {
        return build_reply(q, RCODE_SERVFAIL, &[]);
    }
    {
        let mut names = shared.names.lock().unwrap_or_else(|e| e.into_inner());
        if names.len() > 4096 {
            names.retain(|_, (_, at)| at.elapsed() < NAME_TTL);
        }
        for ip in &ips {
            names.insert(*ip, (name.clone(), Instant::now()));
        }
    }
    build_reply(q, 0, &ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_sandbox_takes_at_most_a_quarter_of_the_replicas_connections() {
        let shares = [128, 100_000, 40, 2].map(|total| ConnectionBudget::new(total).per_sandbox);
        assert_eq!(shares, [32, MAX_CONNECTIONS, 16, 2]);
    }

    #[test]
    fn names_are_resolved_absolute_and_never_inside_the_cluster() {
        assert_eq!(absolute_name("pypi.org").as_deref(), Some("pypi.org."));
        assert_eq!(absolute_name("pypi.org.").as_deref(), Some("pypi.org."));
        for internal in [
            "nats",
            "localhost",
            "nats.default.svc",
            "nats.default.svc.cluster.local",
            "metadata.google.internal",
            "printer.local.",
        ] {
            assert_eq!(absolute_name(internal), None, "{internal}");
        }
    }

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            m.push(l.len() as u8);
            m.extend_from_slice(l.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn dns_questions_and_answers() {
        let q = parse_query(&query("API.Example.com", QTYPE_A)).unwrap();
        assert_eq!(q.name, "api.example.com");
        assert_eq!((q.id, q.qtype, q.rd), (0x1234, QTYPE_A, true));
        let r = build_reply(
            &q,
            0,
            &["192.0.2.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
        );
        // Header: response, RD, RA, NOERROR, one question, one (A) answer.
        assert_eq!(&r[..8], &[0x12, 0x34, 0x81, 0x80, 0, 1, 0, 1]);
        assert_eq!(&r[r.len() - 4..], &[192, 0, 2, 1]);
        let nx = build_reply(&q, RCODE_NXDOMAIN, &[]);
        assert_eq!(nx[3] & 0x0F, 3);
        assert!(parse_query(&[0; 5]).is_none());
    }

    #[test]
    fn names_allowed_by_rules() {
        let p = EgressPolicy::parse(&[
            "api.example.com:443".into(),
            "*.example.org".into(),
            "10.0.0.0/8".into(),
        ])
        .unwrap();
        assert!(name_allowed(&p, "api.example.com"));
        assert!(name_allowed(&p, "a.b.example.org"));
        assert!(!name_allowed(&p, "example.org"));
        assert!(!name_allowed(&p, "evil.com"));
    }

    #[test]
    fn the_hosts_own_addresses_are_refused_whatever_the_deny_list() {
        let own = interface_addresses();
        assert!(!own.is_empty(), "this host has a non-loopback address");
        let none = EgressPolicy::default();
        let why = refused_by_platform(&none, SocketAddr::new(own[0], 443)).unwrap();
        assert!(why.starts_with("platform deny host address"), "{why}");
        let elsewhere: IpAddr = "93.184.216.34".parse().unwrap();
        assert!(!own.contains(&elsewhere));
        assert_eq!(
            refused_by_platform(&none, SocketAddr::new(elsewhere, 443)),
            None
        );
        let loopback = SocketAddr::new("127.0.0.1".parse().unwrap(), 80);
        assert_eq!(
            refused_by_platform(&none, loopback),
            None,
            "the deny list's to say"
        );
    }

    /// A proxy's state with `rules`, the host resolving each name of `resolved` to its
    /// address, and our DNS having given the sandbox each address of `given` for its name.
    fn shared(rules: &[&str], resolved: &[(&str, IpAddr)], given: &[(IpAddr, &str)]) -> Shared {
        let (tx, _rx) = mpsc::unbounded_channel();
        let rules: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        Shared {
            sandbox_id: "sb".into(),
            policy: RwLock::new(Arc::new(EgressPolicy::parse(&rules).unwrap())),
            deny: EgressPolicy::default(),
            tx,
            own: Vec::new(),
            resolved: Mutex::new(
                resolved
                    .iter()
                    .map(|(n, ip)| (n.to_string(), (vec![*ip], Instant::now())))
                    .collect(),
            ),
            names: Mutex::new(
                given
                    .iter()
                    .map(|(ip, n)| (*ip, (n.to_string(), Instant::now())))
                    .collect(),
            ),
            slots: Arc::new(Semaphore::new(1)),
            replica: Arc::new(Semaphore::new(1)),
            lookups: Arc::new(Semaphore::new(LOOKUPS_PER_SANDBOX)),
        }
    }

    /// An exact-name rule admits the address the sandbox's DNS was given for the name, also
    /// once the host's resolution has moved on (rotating DNS).
    #[tokio::test]
    async fn an_exact_rule_admits_the_address_our_dns_gave_for_its_name() {
        let given: IpAddr = "93.184.216.34".parse().unwrap();
        let now_resolved: IpAddr = "93.184.216.35".parse().unwrap();
        let shared = shared(
            &["api.example.com:443"],
            &[("api.example.com", now_resolved)],
            &[(given, "api.example.com")],
        );
        let (decision, name, _) = decide(&shared, SocketAddr::new(given, 443)).await;
        assert!(decision.allowed, "{decision:?}");
        assert_eq!(name.as_deref(), Some("api.example.com"));
        let (other, _, _) = decide(
            &shared,
            SocketAddr::new("93.184.216.36".parse().unwrap(), 443),
        )
        .await;
        assert!(!other.allowed, "{other:?}");
    }

    /// On an address shared by many sites, the name a connection asks for must be allowed
    /// itself: one allowed name resolving there admitted every site behind it.
    #[tokio::test]
    async fn a_connection_asking_for_another_name_on_a_shared_address_is_refused() {
        let cdn: IpAddr = "104.16.0.1".parse().unwrap();
        let shared = shared(
            &["api.vendor.com:443"],
            &[("api.vendor.com", cdn), ("evil.example", cdn)],
            &[],
        );
        let dst = SocketAddr::new(cdn, 443);
        let (by_address, _, by_network) = decide(&shared, dst).await;
        assert!(by_address.allowed, "by address");
        assert!(!by_network);
        assert!(!decide_claimed(&shared, dst, "evil.example").await.allowed);
        assert!(decide_claimed(&shared, dst, "api.vendor.com").await.allowed);
    }

    /// The name is read from a ClientHello arriving in pieces, and every byte read is kept
    /// for upstream; a client that says nothing (the server speaks first) is waited for once.
    #[tokio::test]
    async fn the_claim_is_read_from_the_first_bytes_and_they_are_kept() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hello = super::super::claimed_name::tests::client_hello("api.vendor.com");
        let sent = hello.clone();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&sent[..10]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            c.write_all(&sent[10..]).await.unwrap();
            c
        });
        let (mut server, _) = listener.accept().await.unwrap();
        let (first, claim) = read_claim(&mut server).await;
        assert_eq!(claim, Claim::Name("api.vendor.com".into()));
        assert_eq!(first, hello);
        let _keep = client.await.unwrap();

        let silent = TcpStream::connect(addr).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let started = Instant::now();
        let (first, claim) = read_claim(&mut server).await;
        assert_eq!((first.len(), claim), (0, Claim::Nothing));
        assert!(started.elapsed() >= CLAIM_WAIT);
        drop(silent);
    }

    #[tokio::test]
    async fn host_lookups_wait_for_a_permit_held_until_the_call_returns() {
        let sandbox = Arc::new(Semaphore::new(LOOKUPS_PER_SANDBOX));
        let localhost = host_lookup(sandbox.clone(), "localhost".into()).await;
        assert!(localhost.iter().all(|ip| ip.is_loopback()) && !localhost.is_empty());
        assert_eq!(HOST_LOOKUPS.available_permits(), MAX_HOST_LOOKUPS);
        // Every permit taken (as by lookups that never answer): a new lookup waits.
        let held = HOST_LOOKUPS
            .clone()
            .acquire_many_owned(MAX_HOST_LOOKUPS as u32)
            .await
            .unwrap();
        let waiting = tokio::spawn(host_lookup(sandbox.clone(), "localhost".into()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "a lookup ran without a permit");
        drop(held);
        assert_eq!(waiting.await.unwrap(), localhost);
        // One sandbox's lookups past its own share wait too, with the process's slots free.
        let own = sandbox
            .clone()
            .acquire_many_owned(LOOKUPS_PER_SANDBOX as u32)
            .await
            .unwrap();
        let waiting = tokio::spawn(host_lookup(sandbox.clone(), "localhost".into()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "past the sandbox's share");
        let other = Arc::new(Semaphore::new(LOOKUPS_PER_SANDBOX));
        assert_eq!(host_lookup(other, "localhost".into()).await, localhost);
        drop(own);
        assert_eq!(waiting.await.unwrap(), localhost);
    }
}
