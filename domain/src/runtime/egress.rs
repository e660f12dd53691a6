//! A sandbox's egress policy: which destinations its processes may open a connection to.
//!
//! The policy is an allowlist; an empty policy denies everything. Each rule names a
//! destination, either a DNS name (`api.example.com`, or `*.example.com` for every name under
//! `example.com` but not `example.com` itself) or an IP network (`10.0.0.0/8`, a single
//! address `127.0.0.2`, `2001:db8::/32`, `::1`), and optionally a port or a port range.
//!
//! Written forms accepted by [`EgressPolicy::parse`]:
//!
//! | rule | meaning |
//! |---|---|
//! | `api.example.com:443` | that name, port 443 |
//! | `api.example.com` | that name, any port |
//! | `*.example.com:443` | any name under `example.com`, port 443 |
//! | `10.0.0.0/8:80-90` | that IPv4 network, ports 80 to 90 |
//! | `127.0.0.2:8080` | that address, port 8080 |
//! | `[::1]:443` / `[2001:db8::/32]:443` | IPv6 address or network with a port |
//! | `::1` / `2001:db8::/32` | IPv6 address or network, any port |
//!
//! The canonical form ([`EgressPolicy::to_strings`]) lowercases names, drops a trailing dot,
//! clears the host bits of a network (`10.1.2.3/8` becomes `10.0.0.0/8`), writes a single
//! address without its prefix (`/32`, `/128`), writes a range `80-80` as `80` and the full range
//! `1-65535` as no port at all. [`EgressPolicy::parse`] of the canonical strings gives back the
//! same policy, and the lifecycle events store those strings.
//!
//! Deciding: a connection to `ip:port` is allowed when some rule's port range contains the port
//! and either its network contains the address, or its name resolves to that address (the
//! resolver is given by the caller: the decision itself does no I/O). A wildcard rule cannot be
//! resolved; it matches only through [`EgressPolicy::decide_named`], when the caller knows the
//! name the client asked for (TLS SNI, HTTP `Host`) and that name also resolves to the address,
//! so a client cannot claim an allowed name while connecting somewhere else. The decision does
//! not depend on the order of the rules: network rules are tried first, then name rules, each in
//! canonical sorted order, and the first rule that matches is reported.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The most rules one policy may hold.
pub const MAX_EGRESS_RULES: usize = 256;

const FORMS: &str = "write host:port, host:lo-hi, CIDR or [v6]:port";

/// Networks no sandbox reaches whatever its policy allows (`RUNTIME_EGRESS_DENY` replaces the
/// list): the proxy connects from the host's network namespace, where these are the host
/// itself (loopback, "this network"), the cloud's metadata service (link-local), the private
/// networks of the cluster and its services (RFC 1918, carrier-grade NAT, unique local) and
/// multicast. A policy naming a host that resolves into one of them does not reach it either.
pub const DEFAULT_PLATFORM_DENY: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/3",
    // Azure's WireServer (host agent and metadata), outside the link-local range.
    "168.63.129.16/32",
    "::/127",
    // NAT64 (well-known and local-use prefixes): the gateway translates to the IPv4 inside,
    // internal networks included, past the IPv4 entries above.
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// The platform's deny list from its text: networks only (`CIDR`, `[v6/prefix]`, with ports
/// if need be), no names: what it refuses must not depend on a resolver.
pub fn platform_deny(networks: &[String]) -> Result<EgressPolicy, String> {
    let policy = EgressPolicy::parse(networks).map_err(|e| e.to_string())?;
    networks_only(&policy)?;
    Ok(policy)
}

/// Refuses a deny list naming a host (however it was built: environment or config file).
pub fn networks_only(policy: &EgressPolicy) -> Result<(), String> {
    match policy
        .rules
        .iter()
        .find(|r| matches!(r.destination, Destination::Host(_)))
    {
        Some(r) => Err(format!(
            "{r} is a host name; the deny list holds networks only"
        )),
        None => Ok(()),
    }
}

/// A sandbox's egress allowlist. Empty denies every destination.
///
/// Serialized (serde) as the list of canonical rule strings, and validated when deserialized.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct EgressPolicy {
    pub rules: Vec<EgressRule>,
}

/// One allowed destination and port range.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EgressRule {
    pub destination: Destination,
    /// Inclusive port range; `None` allows any port.
    pub ports: Option<(u16, u16)>,
}

/// Where a rule allows connections to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Destination {
    /// A DNS name, lowercased and valid per RFC 1123, without a trailing dot; `*.example.com`
    /// stands for every name under `example.com`.
    Host(String),
    /// An IP network; `addr` has its host bits cleared.
    Net { addr: IpAddr, prefix: u8 },
}

/// The outcome of a policy check for one connection attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressDecision {
    pub allowed: bool,
    /// The canonical form of the rule that allowed the connection; `None` when denied.
    pub rule: Option<String>,
}

impl EgressDecision {
    fn deny() -> EgressDecision {
        EgressDecision {
            allowed: false,
            rule: None,
        }
    }
}

/// Why a written policy was refused. Rule numbers count from 1, in the order given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("too many egress rules: {count}; a policy holds at most {MAX_EGRESS_RULES}")]
    TooManyRules { count: usize },
    #[error("egress rule {index} {}: {reason}; {FORMS}", crate::text::shown(rule))]
    InvalidRule {
        /// 1-based position of the rule in the list given.
        index: usize,
        rule: String,
        reason: String,
    },
}

impl EgressPolicy {
    /// The policy that denies everything.
    pub fn deny_all() -> EgressPolicy {
        EgressPolicy::default()
    }

    /// Parses written rules (see the module documentation for the forms). Exact duplicates
    /// (after canonicalization) are kept once, at their first position.
    pub fn parse(rules: &[String]) -> Result<EgressPolicy, EgressError> {
        if rules.len() > MAX_EGRESS_RULES {
            return Err(EgressError::TooManyRules { count: rules.len() });
        }
        let mut out: Vec<EgressRule> = Vec::with_capacity(rules.len());
        for (i, text) in rules.iter().enumerate() {
            let rule = EgressRule::parse(text).map_err(|reason| EgressError::InvalidRule {
                index: i + 1,
                rule: text.clone(),
                reason,
            })?;
            if !out.contains(&rule) {
                out.push(rule);
            }
        }
        Ok(EgressPolicy { rules: out })
    }

    /// The canonical strings of the rules, in the policy's order.
    pub fn to_strings(&self) -> Vec<String> {
        self.rules.iter().map(EgressRule::to_string).collect()
    }

    /// SHA-256 over the canonical rules, sorted and deduplicated, each followed by `\n` (so the
    /// empty policy digests the empty string). The order the rules were written in does not
    /// change it: `printf '10.0.0.0/8\napi.example.com:443\n' | sha256sum` reproduces it.
    pub fn digest(&self) -> [u8; 32] {
        let canonical: BTreeSet<String> = self.rules.iter().map(EgressRule::to_string).collect();
        let mut hasher = Sha256::new();
        for rule in canonical {
            hasher.update(rule.as_bytes());
            hasher.update(b"\n");
        }
        hasher.finalize().into()
    }

    /// Decides a connection to `ip:port`. `resolve` gives the addresses of a name rule's host;
    /// it is called only for rules whose port range admits `port`, and only when no network
    /// rule already allows the connection. Wildcard rules never match here.
    pub fn decide(
        &self,
        ip: IpAddr,
        port: u16,
        resolve: impl Fn(&str) -> Vec<IpAddr>,
    ) -> EgressDecision {
        self.decide_inner(None, false, ip, port, &resolve)
    }

    /// Like [`decide`](Self::decide), when the caller also knows the name the client asked for
    /// (TLS SNI, HTTP `Host`). A name rule (exact, or a wildcard covering `name`) then matches
    /// if `name` resolves to `ip`; a name that does not resolve to the address matches nothing.
    pub fn decide_named(
        &self,
        name: &str,
        ip: IpAddr,
        port: u16,
        resolve: impl Fn(&str) -> Vec<IpAddr>,
    ) -> EgressDecision {
        self.decide_inner(Some(name), false, ip, port, &resolve)
    }

    /// Like [`decide_named`](Self::decide_named) for a name the connection itself asks for
    /// (its TLS server name, its HTTP `Host`): a name rule matches only when it covers that
    /// name. An address shared by many sites (a CDN) is not admitted for every site because
    /// one allowed name resolves to it.
    pub fn decide_claimed(
        &self,
        name: &str,
        ip: IpAddr,
        port: u16,
        resolve: impl Fn(&str) -> Vec<IpAddr>,
    ) -> EgressDecision {
        self.decide_inner(Some(name), true, ip, port, &resolve)
    }

    /// Whether some rule is a wildcard admitting `port`: only then can knowing the requested
    /// name (SNI) change a decision that [`decide`](Self::decide) denied.
    pub fn has_wildcard_for(&self, port: u16) -> bool {
        self.rules.iter().any(|r| {
            r.admits_port(port)
                && matches!(&r.destination, Destination::Host(h) if h.starts_with("*."))
        })
    }

    /// `claimed`: `name` is what the connection asks for, and only rules covering it match.
    fn decide_inner(
        &self,
        name: Option<&str>,
        claimed: bool,
        ip: IpAddr,
        port: u16,
        resolve: &dyn Fn(&str) -> Vec<IpAddr>,
    ) -> EgressDecision {
        let ip = ip.to_canonical();
        let mut candidates: Vec<(String, &EgressRule)> = self
            .rules
            .iter()
            .filter(|r| r.admits_port(port))
            .map(|r| (r.to_string(), r))
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        candidates.dedup_by(|a, b| a.0 == b.0);

        // Networks first: no resolution needed.
        for (text, rule) in &candidates {
            if let Destination::Net { addr, prefix } = rule.destination {
                if net_contains(addr, prefix, ip) {
                    return EgressDecision {
                        allowed: true,
                        rule: Some(text.clone()),
                    };
                }
            }
        }

        let name = name.map(normalize_name);
        let name_resolves = std::cell::OnceCell::new();
        for (text, rule) in &candidates {
            let Destination::Host(host) = &rule.destination else {
                continue;
            };
            let matched = if let Some(suffix) = host.strip_prefix("*.") {
                match &name {
                    Some(n) if n.len() > suffix.len() + 1 && n.ends_with(&format!(".{suffix}")) => {
                        *name_resolves.get_or_init(|| resolves_to(resolve, n, ip))
                    }
                    _ => false,
                }
            } else if name.as_deref() == Some(host.as_str()) {
                *name_resolves.get_or_init(|| resolves_to(resolve, host, ip))
            } else {
                !claimed && resolves_to(resolve, host, ip)
            };
            if matched {
                return EgressDecision {
                    allowed: true,
                    rule: Some(text.clone()),
                };
            }
        }
        EgressDecision::deny()
    }
}

fn resolves_to(resolve: &dyn Fn(&str) -> Vec<IpAddr>, host: &str, ip: IpAddr) -> bool {
    resolve(host).into_iter().any(|a| a.to_canonical() == ip)
}

fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TryFrom<Vec<String>> for EgressPolicy {
    type Error = EgressError;

    fn try_from(rules: Vec<String>) -> Result<Self, Self::Error> {
        EgressPolicy::parse(&rules)
    }
}

impl From<EgressPolicy> for Vec<String> {
    fn from(policy: EgressPolicy) -> Self {
        policy.to_strings()
    }
}

impl EgressRule {
    /// Parses one written rule; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<EgressRule, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("the rule is empty".into());
        }
        if t.len() > 300 {
            return Err(format!(
                "the rule is {} characters long; at most 300",
                t.len()
            ));
        }
        // [v6] or [v6/prefix], optionally followed by :ports
        if let Some(rest) = t.strip_prefix('[') {
            let Some(close) = rest.find(']') else {
                return Err("\"[\" without a closing \"]\"".into());
            };
            let inner = &rest[..close];
            let after = &rest[close + 1..];
            let ports = if after.is_empty() {
                None
            } else if let Some(p) = after.strip_prefix(':') {
                parse_ports(p)?
            } else {
                return Err(format!("unexpected {after:?} after \"]\""));
            };
            let destination = parse_net(inner)?;
            // Judged on what was written: an IPv4-mapped address comes back as IPv4.
            let written_v6 = inner
                .split('/')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
            if !written_v6 {
                return Err(format!(
                    "brackets are for IPv6 addresses; {inner:?} is not one"
                ));
            }
            return Ok(EgressRule { destination, ports });
        }
        // Several colons and no brackets: a bare IPv6 address or network, any port.
        if t.matches(':').count() > 1 {
            let destination = parse_net(t)
                .map_err(|e| format!("{e} (an IPv6 address with a port is written [addr]:port)"))?;
            return Ok(EgressRule {
                destination,
                ports: None,
            });
        }
        let (dest, ports) = match t.rsplit_once(':') {
            Some((d, p)) => (d, parse_ports(p)?),
            None => (t, None),
        };
        if dest.is_empty() {
            return Err("the destination before the port is empty".into());
        }
        let looks_numeric = dest
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '/');
        let destination = if dest.contains('/') || looks_numeric {
            let d = parse_net(dest)?;
            if !matches!(
                d,
                Destination::Net {
                    addr: IpAddr::V4(_),
                    ..
                }
            ) {
                return Err(format!("{dest:?} is not an IPv4 address or network"));
            }
            d
        } else {
            Destination::Host(parse_host(dest)?)
        };
        Ok(EgressRule { destination, ports })
    }

    fn admits_port(&self, port: u16) -> bool {
        match self.ports {
            None => true,
            Some((lo, hi)) => lo <= port && port <= hi,
        }
    }
}

impl fmt::Display for EgressRule {
    /// The canonical form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ports = match self.ports {
            None => String::new(),
            Some((lo, hi)) if lo == hi => format!(":{lo}"),
            Some((lo, hi)) => format!(":{lo}-{hi}"),
        };
        match &self.destination {
            Destination::Host(h) => write!(f, "{h}{ports}"),
            Destination::Net {
                addr: IpAddr::V4(a),
                prefix,
            } => {
                if *prefix == 32 {
                    write!(f, "{a}{ports}")
                } else {
                    write!(f, "{a}/{prefix}{ports}")
                }
            }
            Destination::Net {
                addr: IpAddr::V6(a),
                prefix,
            } => {
                let net = if *prefix == 128 {
                    a.to_string()
                } else {
                    format!("{a}/{prefix}")
                };
                if ports.is_empty() {
                    write!(f, "{net}")
                } else {
                    write!(f, "[{net}]{ports}")
                }
            }
        }
    }
}

fn parse_port(p: &str) -> Result<u16, String> {
    if p.is_empty() || !p.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("port {p:?} is not a number"));
    }
    match p.parse::<u32>() {
        Ok(n) if (1..=65535).contains(&n) => Ok(n as u16),
        _ => Err(format!("port {p} is not 1-65535")),
    }
}

/// `443`, `80-90`; the full range `1-65535` is the same as no port (`None`).
fn parse_ports(p: &str) -> Result<Option<(u16, u16)>, String> {
    let (lo, hi) = match p.split_once('-') {
        Some((lo, hi)) => (parse_port(lo)?, parse_port(hi)?),
        None => {
            let n = parse_port(p)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(format!(
            "port range {lo}-{hi} runs backwards; write {hi}-{lo}"
        ));
    }
    if (lo, hi) == (1, 65535) {
        return Ok(None);
    }
    Ok(Some((lo, hi)))
}

/// An address (a /32 or /128) or a CIDR network; host bits are cleared.
fn parse_net(s: &str) -> Result<Destination, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => match p.parse::<u8>() {
            Ok(n) if n <= max && p.chars().all(|c| c.is_ascii_digit()) => n,
            _ => return Err(format!("prefix length {p:?} is not 0-{max}")),
        },
    };
    // An IPv4-mapped network (`::ffff:169.254.0.0/112`) is the IPv4 network it maps: the
    // decision sees a mapped destination as IPv4, so kept as IPv6 it matched nothing (an
    // allow entry dead, a deny entry that never denied).
    let (addr, prefix) = match addr {
        IpAddr::V6(a) if prefix >= 96 => match a.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), prefix - 96),
            None => (addr, prefix),
        },
        _ => (addr, prefix),
    };
    Ok(Destination::Net {
        addr: mask(addr, prefix),
        prefix,
    })
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let m = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

fn net_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net, ip) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => mask(ip, prefix) == net,
        _ => false,
    }
}

/// RFC 1123 name, lowercased, trailing dot dropped; `*.` allowed as the whole first label when
/// at least two labels follow it.
fn parse_host(s: &str) -> Result<String, String> {
    let lower = s.strip_suffix('.').unwrap_or(s).to_ascii_lowercase();
    if lower.len() > 253 {
        return Err(format!(
            "the name is {} characters long; at most 253",
            lower.len()
        ));
    }
    let (wildcard, body) = match lower.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, lower.as_str()),
    };
    if body.contains('*') {
        return Err("\"*\" is only allowed as the whole first label, as in *.example.com".into());
    }
    let labels: Vec<&str> = body.split('.').collect();
    for label in &labels {
        if label.is_empty() {
            return Err(format!(
                "{s:?} has an empty label (\"..\" or a leading dot)"
            ));
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(format!(
                "label {label:?} may hold only letters, digits and \"-\""
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("label {label:?} starts or ends with \"-\""));
        }
    }
    if labels
        .last()
        .is_some_and(|l| l.chars().all(|c| c.is_ascii_digit()))
    {
        return Err(format!(
            "{s:?} is neither a valid IP address nor a DNS name"
        ));
    }
    if wildcard && labels.len() < 2 {
        return Err(format!(
            "{s:?} is too broad; a wildcard needs at least two labels after it (*.example.com)"
        ));
    }
    Ok(lower)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(rules: &[&str]) -> EgressPolicy {
        EgressPolicy::parse(&rules.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn err(rule: &str) -> String {
        EgressPolicy::parse(&["ok.example.com".to_string(), rule.to_string()])
            .unwrap_err()
            .to_string()
    }

    fn no_dns(_: &str) -> Vec<IpAddr> {
        Vec::new()
    }

    #[test]
    fn the_platform_deny_list_covers_the_host_and_internal_networks() {
        let text: Vec<String> = DEFAULT_PLATFORM_DENY
            .iter()
            .map(|s| s.to_string())
            .collect();
        let deny = platform_deny(&text).unwrap();
        for inside in [
            "127.0.0.2",
            "169.254.169.254",
            "10.96.0.10",
            "172.20.1.1",
            "192.168.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::ffff:127.0.0.1",
            "fd00::1",
            "fe80::1",
            "255.255.255.255",
            "168.63.129.16",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a00:1",
        ] {
            let ip: IpAddr = inside.parse().unwrap();
            assert!(deny.decide(ip, 80, no_dns).allowed, "{inside} not denied");
        }
        for outside in ["8.8.8.8", "172.32.0.1", "2606:4700::1111"] {
            let ip: IpAddr = outside.parse().unwrap();
            assert!(!deny.decide(ip, 443, no_dns).allowed, "{outside} denied");
        }
        assert!(platform_deny(&["metadata.internal".into()])
            .unwrap_err()
            .contains("networks only"));
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_every_written_form_to_its_canonical_string() {
        let cases = [
            ("api.example.com:443", "api.example.com:443"),
            ("API.Example.COM.", "api.example.com"),
            ("*.example.com:443", "*.example.com:443"),
            ("10.0.0.0/8:80-90", "10.0.0.0/8:80-90"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("127.0.0.2:8080", "127.0.0.2:8080"),
            ("127.0.0.2/32:8080-8080", "127.0.0.2:8080"),
            ("[::1]:443", "[::1]:443"),
            ("::1", "::1"),
            ("[::1]", "::1"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("[2001:db8:1::/32]:1-1024", "[2001:db8::/32]:1-1024"),
            ("example.com:1-65535", "example.com"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("localhost:22", "localhost:22"),
        ];
        for (input, canonical) in cases {
            assert_eq!(
                p(&[input]).to_strings(),
                vec![canonical.to_string()],
                "{input}"
            );
        }
    }

    #[test]
    fn refusals_say_which_rule_and_what_to_fix() {
        assert_eq!(
            err("foo..bar:99999"),
            "egress rule 2 \"foo..bar:99999\": port 99999 is not 1-65535; write host:port, \
             host:lo-hi, CIDR or [v6]:port"
        );
        assert!(err("foo..bar:80").contains("empty label"));
        assert!(err("10.0.0.0/33").contains("prefix length \"33\" is not 0-32"));
        assert!(err("example.com:90-80").contains("runs backwards"));
        assert!(err("example.com:0").contains("port 0 is not 1-65535"));
        assert!(err("example.com:http").contains("is not a number"));
        assert!(err("*.com").contains("too broad"));
        assert!(err("a.*.com").contains("first label"));
        assert!(err("ex_ample.com").contains("letters, digits"));
        assert!(err("-a.com").contains("starts or ends"));
        assert!(err("1.2.3.999").contains("not an IP address"));
        assert!(err("[10.0.0.1]:80").contains("brackets are for IPv6"));
        assert!(err("[::1:80").contains("closing"));
        assert!(err("2001:db8::1:443x").contains("[addr]:port"));
        assert!(err("").contains("empty"));
        assert!(err(":80").contains("empty"));
        let many: Vec<String> = (0..=MAX_EGRESS_RULES)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        assert_eq!(
            EgressPolicy::parse(&many).unwrap_err(),
            EgressError::TooManyRules { count: 257 }
        );
    }

    #[test]
    fn a_claimed_name_must_be_allowed_itself_on_a_shared_address() {
        let pol = p(&["api.vendor.com:443", "*.example.org:443", "10.0.0.0/8:443"]);
        let cdn = ip("104.16.0.1");
        let resolve = |_: &str| vec![cdn];
        // Asked for by address or by an unrelated DNS answer: the rule's name resolves here.
        assert!(pol.decide(cdn, 443, resolve).allowed);
        assert!(pol.decide_named("evil.com", cdn, 443, resolve).allowed);
        // Asked for in the connection itself: only names the rules cover.
        assert!(!pol.decide_claimed("evil.com", cdn, 443, resolve).allowed);
        let d = pol.decide_claimed("API.vendor.com.", cdn, 443, resolve);
        assert_eq!(d.rule.as_deref(), Some("api.vendor.com:443"));
        assert!(
            pol.decide_claimed("a.example.org", cdn, 443, resolve)
                .allowed
        );
        // A network rule admits its addresses whatever the name.
        assert!(
            pol.decide_claimed("evil.com", ip("10.1.2.3"), 443, |_| vec![])
                .allowed
        );
    }

    #[test]
    fn empty_policy_denies_everything() {
        let d = EgressPolicy::default().decide(ip("127.0.0.1"), 80, |_| vec![ip("127.0.0.1")]);
        assert_eq!(
            d,
            EgressDecision {
                allowed: false,
                rule: None
            }
        );
    }

    #[test]
    fn networks_and_ports() {
        let pol = p(&[
            "10.0.0.0/8:80-90",
            "127.0.0.2:8080",
            "[::1]:443",
            "2001:db8::/32",
        ]);
        let allow = |a: &str, port| pol.decide(ip(a), port, no_dns);
        assert_eq!(
            allow("10.9.9.9", 85).rule.as_deref(),
            Some("10.0.0.0/8:80-90")
        );
        assert!(!allow("10.9.9.9", 91).allowed);
        assert!(!allow("11.0.0.1", 80).allowed);
        assert!(allow("127.0.0.2", 8080).allowed);
        assert!(!allow("127.0.0.2", 8081).allowed);
        assert!(!allow("127.0.0.3", 8080).allowed);
        assert!(allow("::1", 443).allowed);
        assert!(!allow("::1", 80).allowed);
        assert!(allow("2001:db8:ffff::1", 1).allowed);
        // An IPv4-mapped IPv6 address is decided as the IPv4 address.
        assert!(allow("::ffff:10.1.1.1", 80).allowed);
        // And an IPv4-mapped network is the IPv4 network (it used to match nothing).
        let mapped = p(&["[::ffff:192.0.2.0]:443", "::ffff:198.51.100.0/120"]);
        assert!(mapped.decide(ip("192.0.2.0"), 443, no_dns).allowed);
        assert!(mapped.decide(ip("::ffff:198.51.100.7"), 80, no_dns).allowed);
        assert!(!mapped.decide(ip("198.51.101.7"), 80, no_dns).allowed);
    }

    #[test]
    fn names_match_through_the_resolver() {
        let pol = p(&["api.example.com:443", "*.example.org:443"]);
        let dns = |h: &str| match h {
            "api.example.com" => vec![ip("192.0.2.1")],
            "a.b.example.org" => vec![ip("192.0.2.7")],
            _ => vec![],
        };
        assert_eq!(
            pol.decide(ip("192.0.2.1"), 443, dns).rule.as_deref(),
            Some("api.example.com:443")
        );
        assert!(!pol.decide(ip("192.0.2.1"), 80, dns).allowed);
        assert!(!pol.decide(ip("192.0.2.2"), 443, dns).allowed);
        // A wildcard matches only with a known name, and that name must resolve to the address.
        assert!(!pol.decide(ip("192.0.2.7"), 443, dns).allowed);
        assert!(pol.has_wildcard_for(443) && !pol.has_wildcard_for(80));
        assert_eq!(
            pol.decide_named("A.B.Example.org.", ip("192.0.2.7"), 443, dns)
                .rule
                .as_deref(),
            Some("*.example.org:443")
        );
        assert!(
            !pol.decide_named("a.b.example.org", ip("192.0.2.8"), 443, dns)
                .allowed
        );
        assert!(
            !pol.decide_named("example.org", ip("192.0.2.7"), 443, dns)
                .allowed
        );
        // Claiming an allowed name while connecting elsewhere does not help.
        assert!(
            !pol.decide_named("api.example.com", ip("192.0.2.9"), 443, dns)
                .allowed
        );
    }

    #[test]
    fn resolver_is_not_called_when_a_network_allows() {
        let pol = p(&["a.example.com", "10.0.0.0/8"]);
        let d = pol.decide(ip("10.0.0.1"), 1, |h| panic!("resolved {h}"));
        assert_eq!(d.rule.as_deref(), Some("10.0.0.0/8"));
    }

    #[test]
    fn digest_ignores_order_and_duplicates() {
        let a = p(&["b.example.com:443", "10.0.0.0/8", "b.example.com:443"]);
        let b = p(&["10.1.0.0/8", "B.example.com.:443"]);
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), p(&["10.0.0.0/8"]).digest());
        // Documented construction: sorted canonical rules, each followed by a newline.
        let expected: [u8; 32] = Sha256::digest(b"10.0.0.0/8\nb.example.com:443\n").into();
        assert_eq!(a.digest(), expected);
        let empty: [u8; 32] = Sha256::digest(b"").into();
        assert_eq!(EgressPolicy::default().digest(), empty);
    }

    #[test]
    fn serde_uses_the_canonical_strings_and_validates() {
        let pol = p(&["10.1.2.3/8:80", "[::1]:443"]);
        let json = serde_json::to_string(&pol).unwrap();
        assert_eq!(json, r#"["10.0.0.0/8:80","[::1]:443"]"#);
        assert_eq!(serde_json::from_str::<EgressPolicy>(&json).unwrap(), pol);
        assert!(serde_json::from_str::<EgressPolicy>(r#"["x..y"]"#).is_err());
    }

    fn arb_rule() -> impl Strategy<Value = String> {
        let ports = prop_oneof![
            Just(String::new()),
            (1u16..=65535).prop_map(|p| format!(":{p}")),
            (1u16..=65535, 0u16..2000).prop_map(|(a, d)| format!(":{a}-{}", a.saturating_add(d))),
        ];
        let label = "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?";
        let host = prop_oneof![
            (label, "[a-z]{2,5}").prop_map(|(l, t)| format!("{l}.{t}")),
            (label, label, "[a-z]{2,5}").prop_map(|(a, b, t)| format!("*.{a}.{b}.{t}")),
        ];
        let v4 = (any::<u32>(), 0u8..=32).prop_map(|(a, p)| format!("{}/{p}", Ipv4Addr::from(a)));
        let v6 = (any::<u128>(), 0u8..=128).prop_map(|(a, p)| (Ipv6Addr::from(a), p));
        (
            prop_oneof![host, v4, v6.prop_map(|(a, p)| format!("[{a}/{p}]"))],
            ports,
        )
            .prop_map(|(d, p)| format!("{d}{p}"))
    }

    proptest! {
        #[test]
        fn parse_of_to_strings_is_identity(rules in prop::collection::vec(arb_rule(), 0..12)) {
            let pol = EgressPolicy::parse(&rules).unwrap();
            let again = EgressPolicy::parse(&pol.to_strings()).unwrap();
            prop_assert_eq!(&again, &pol);
            prop_assert_eq!(again.to_strings(), pol.to_strings());
        }

        #[test]
        fn decide_and_digest_do_not_depend_on_rule_order(
            rules in prop::collection::vec(arb_rule(), 0..12),
            shuffle in any::<u64>(),
            addr in any::<u32>(),
            near in any::<u8>(),
            port in 1u16..=65535,
        ) {
            let pol = EgressPolicy::parse(&rules).unwrap();
            let mut reordered = pol.clone();
            let n = reordered.rules.len();
            if n > 1 {
                let mut s = shuffle;
                for i in (1..n).rev() {
                    reordered.rules.swap(i, (s % (i as u64 + 1)) as usize);
                    s = s.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15;
                }
            }
            // Probe an address that often lands inside one of the networks.
            let probe = match pol.rules.get(near as usize % n.max(1)).map(|r| &r.destination) {
                Some(Destination::Net { addr: a, .. }) => *a,
                _ => IpAddr::V4(Ipv4Addr::from(addr)),
            };
            let dns = |h: &str| vec![IpAddr::V4(Ipv4Addr::from(h.len() as u32 * 7)), probe];
            prop_assert_eq!(pol.decide(probe, port, dns), reordered.decide(probe, port, dns));
            prop_assert_eq!(
                pol.decide_named("x.y.example.com", probe, port, dns),
                reordered.decide_named("x.y.example.com", probe, port, dns)
            );
            prop_assert_eq!(pol.digest(), reordered.digest());
        }
    }
}
