//! The name a sandbox's connection asks for in its first bytes: the server name (SNI) of a TLS
//! ClientHello, or the `Host` of an HTTP/1 request. A name rule admits an address because the
//! rule's name resolves to it; on a shared address (a CDN) the name asked for picks the site,
//! so the egress proxy checks that name against the rules too ([`super::egress_proxy`]).
use tls_parser::{
    parse_tls_client_hello_extensions, parse_tls_plaintext, SNIType, TlsExtension, TlsMessage,
    TlsMessageHandshake,
};

/// The most a connection's first bytes are read for a name: one whole TLS record (16 KiB and
/// its header), or an HTTP request head.
pub const CLAIM_BYTES: usize = 16 * 1024 + 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The name asked for, lowercased, without a trailing dot.
    Name(String),
    /// TLS whose server name cannot be read (none, fragmented, malformed): the site it reaches
    /// cannot be told.
    Unreadable,
    /// Another protocol, or TLS/HTTP that names no host (an address): nothing to check.
    Nothing,
    /// The bytes so far begin a ClientHello or a request head: read more.
    Incomplete,
}

/// What `first`, the first bytes a connection sent, asks for.
pub fn claimed_name(first: &[u8]) -> Claim {
    match first.first() {
        None => Claim::Incomplete,
        // A TLS handshake record.
        Some(0x16) => tls_server_name(first),
        Some(_) => {
            // Servers skip empty lines before a request line (RFC 9112, 2.2).
            let start = first.iter().position(|b| !matches!(b, b'\r' | b'\n'));
            match start.map(|s| &first[s..]) {
                None if first.len() < CLAIM_BYTES => Claim::Incomplete,
                Some(rest) if rest[0].is_ascii_alphabetic() => http_host(rest),
                _ => Claim::Nothing,
            }
        }
    }
}

fn tls_server_name(first: &[u8]) -> Claim {
    let Some(len) = first
        .get(3..5)
        .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
    else {
        return Claim::Incomplete;
    };
    if first.len() < 5 + len {
        return if 5 + len <= CLAIM_BYTES {
            Claim::Incomplete
        } else {
            Claim::Unreadable
        };
    }
    let Ok((_, record)) = parse_tls_plaintext(first) else {
        return Claim::Unreadable;
    };
    let hello = record.msg.iter().find_map(|m| match m {
        TlsMessage::Handshake(TlsMessageHandshake::ClientHello(h)) => Some(h),
        _ => None,
    });
    let Some(extensions) = hello.and_then(|h| h.ext) else {
        return Claim::Unreadable;
    };
    let Ok((_, extensions)) = parse_tls_client_hello_extensions(extensions) else {
        return Claim::Unreadable;
    };
    let name = extensions.iter().find_map(|e| match e {
        TlsExtension::SNI(names) => names
            .iter()
            .find(|(kind, _)| *kind == SNIType::HostName)
            .and_then(|(_, n)| std::str::from_utf8(n).ok()),
        _ => None,
    });
    name.map_or(Claim::Unreadable, name_claim)
}

/// A DNS name, as asked for; anything else (it is recorded with the decision) is unreadable.
fn name_claim(name: &str) -> Claim {
    let name = normalize(name);
    let valid = name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if valid {
        Claim::Name(name)
    } else {
        Claim::Unreadable
    }
}

/// An HTTP/1 request's name: its `Host`, or the authority of an absolute-form target. Once
/// the first line says HTTP/1, a head that is incomplete, malformed, too large or names two
/// hosts is unreadable (refused), not let through: the server would still route on it.
fn http_host(first: &[u8]) -> Claim {
    let Some(end) = first.iter().position(|b| *b == b'\n') else {
        let printable = first.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
        return if printable && first.len() < CLAIM_BYTES {
            Claim::Incomplete
        } else {
            Claim::Nothing
        };
    };
    let line = first[..end].strip_suffix(b"\r").unwrap_or(&first[..end]);
    if line.ends_with(b" HTTP/2.0") {
        // Cleartext HTTP/2 names its authority in compressed headers.
        return Claim::Unreadable;
    }
    if !(line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0")) {
        // Another protocol whose client speaks first in lines (an SSH banner, say); but a line
        // that names HTTP otherwise (`HTTP/1.2`, a trailing space) is one a lenient server
        // may still take as a request and route: refused, not let through unread.
        let names_http = line
            .windows(6)
            .any(|w| w[0].is_ascii_whitespace() && w[1..].eq_ignore_ascii_case(b"http/"));
        if names_http {
            return Claim::Unreadable;
        }
        return Claim::Nothing;
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(first) {
        Ok(httparse::Status::Partial) if first.len() < CLAIM_BYTES => Claim::Incomplete,
        Ok(httparse::Status::Partial) | Err(_) => Claim::Unreadable,
        Ok(httparse::Status::Complete(_)) => {
            let mut names = request
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"))
                .map(|h| std::str::from_utf8(h.value).ok().map(str::to_string))
                .collect::<Vec<_>>();
            // A target naming an address (a tunnel to it, or a forward proxy's absolute form)
            // reaches what no name rule can be checked against: refused.
            let is_address = |host: &str| {
                normalize(without_port(host))
                    .parse::<std::net::IpAddr>()
                    .is_ok()
            };
            // CONNECT host:port HTTP/1.1: the tunnel's far end is a name asked for too.
            if request
                .method
                .is_some_and(|m| m.eq_ignore_ascii_case("CONNECT"))
            {
                if request.path.is_some_and(is_address) {
                    return Claim::Unreadable;
                }
                names.push(request.path.map(str::to_string));
            }
            // GET http://host:port/path HTTP/1.1: the target's authority wins over Host.
            if let Some(target) = request.path {
                let lower = target.to_ascii_lowercase();
                if let Some(rest) = lower
                    .strip_prefix("http://")
                    .or_else(|| lower.strip_prefix("https://"))
                {
                    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
                    let host = authority.rsplit('@').next().unwrap_or_default();
                    if is_address(host) {
                        return Claim::Unreadable;
                    }
                    names.push(Some(host.to_string()));
                }
            }
            let mut hosts: Vec<String> = Vec::new();
            for name in names {
                let Some(name) = name else {
                    return Claim::Unreadable;
                };
                let host = normalize(without_port(&name));
                if !hosts.contains(&host) {
                    hosts.push(host);
                }
            }
            match hosts.as_slice() {
                [] => Claim::Nothing,
                [one] if one.is_empty() || one.parse::<std::net::IpAddr>().is_ok() => {
                    Claim::Nothing
                }
                [one] => name_claim(one),
                _ => Claim::Unreadable,
            }
        }
    }
}

/// `first` with its HTTP/1 request head asking the server to close the connection after
/// answering it (`Connection: close`, replacing the request's own `Connection`, `Keep-Alive`
/// and `Upgrade`), or `None` when `first` does not begin with a whole HTTP/1 request head.
///
/// Only a connection's first request is read for its name; a server honouring `close` must not
/// process any further request on it (RFC 9112, 9.6), so a later request on a kept-alive
/// connection cannot ask a shared address for another site. Body bytes and anything pipelined
/// after the head are kept as they are.
pub fn one_request_only(first: &[u8]) -> Option<Vec<u8>> {
    let start = first.iter().position(|b| !matches!(b, b'\r' | b'\n'))?;
    let request_bytes = &first[start..];
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(head_len)) = request.parse(request_bytes) else {
        return None;
    };
    if !matches!(request.version, Some(0 | 1)) {
        return None;
    }
    let head = &request_bytes[..head_len];
    let mut out = Vec::with_capacity(first.len() + 19);
    out.extend_from_slice(&first[..start]);
    // Lines of the head, each with its line end; the last is the empty line ending it.
    let mut lines = head.split_inclusive(|b| *b == b'\n');
    out.extend_from_slice(lines.next()?);
    for line in lines {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if content.is_empty() {
            out.extend_from_slice(b"Connection: close\r\n");
            out.extend_from_slice(line);
            break;
        }
        let name = content.split(|b| *b == b':').next().unwrap_or_default();
        let name = name.trim_ascii();
        let dropped = [&b"connection"[..], b"keep-alive", b"upgrade"];
        if !dropped.iter().any(|d| name.eq_ignore_ascii_case(d)) {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(&request_bytes[head_len..]);
    Some(out)
}

/// `host` of `host:port`; `[v6]:port` and bare `[v6]` become the address (which names nothing).
fn without_port(host: &str) -> &str {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::sync::Arc;

    /// A real ClientHello, as rustls sends it for `name`.
    pub fn client_hello(name: &str) -> Vec<u8> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let mut conn =
            rustls::ClientConnection::new(Arc::new(config), name.to_string().try_into().unwrap())
                .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn the_server_name_of_a_client_hello() {
        let hello = client_hello("API.Example.com");
        assert_eq!(claimed_name(&hello), Claim::Name("api.example.com".into()));
        // Arriving in pieces: more is needed, not a verdict.
        assert_eq!(claimed_name(&hello[..3]), Claim::Incomplete);
        assert_eq!(claimed_name(&hello[..hello.len() - 1]), Claim::Incomplete);
        // rustls sends no SNI for an address: TLS that names nothing readable.
        let to_address = client_hello("93.184.216.34");
        assert_eq!(claimed_name(&to_address), Claim::Unreadable);
        // Garbage in a handshake record.
        let mut broken = hello.clone();
        broken[5] = 0xFF;
        assert_eq!(claimed_name(&broken), Claim::Unreadable);
        // A record longer than any whole one read: cannot be read.
        assert_eq!(claimed_name(&[0x16, 3, 1, 0xFF, 0xFF]), Claim::Unreadable);
    }

    #[test]
    fn the_host_of_an_http_request() {
        let get = b"GET / HTTP/1.1\r\nhost: Evil.Example:8080\r\naccept: */*\r\n\r\n";
        assert_eq!(claimed_name(get), Claim::Name("evil.example".into()));
        assert_eq!(claimed_name(&get[..20]), Claim::Incomplete);
        assert_eq!(claimed_name(&get[..5]), Claim::Incomplete);
        let v6 = b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n";
        assert_eq!(claimed_name(v6), Claim::Nothing);
        let none = b"GET / HTTP/1.0\r\n\r\n";
        assert_eq!(claimed_name(none), Claim::Nothing);
        // Other protocols: nothing to check.
        assert_eq!(claimed_name(b"SSH-2.0-OpenSSH_9.6\r\n"), Claim::Nothing);
        assert_eq!(claimed_name(b"\x00\x01binary"), Claim::Nothing);
    }

    #[test]
    fn the_first_request_asks_the_server_to_close_after_it() {
        let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
        // Keep-alive asked for, a body, and a second request pipelined after it.
        let pipelined = b"\r\nPOST /a HTTP/1.1\r\nHost: api.vendor.com\r\nConnection: keep-alive, Upgrade\r\nkeep-alive: timeout=5\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\nHost: evil.example\r\n\r\n";
        assert_eq!(
            text(one_request_only(pipelined).unwrap()),
            "\r\nPOST /a HTTP/1.1\r\nHost: api.vendor.com\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhiGET / HTTP/1.1\r\nHost: evil.example\r\n\r\n"
        );
        // Bare LF line ends, and an HTTP/1.0 request with nothing to replace.
        assert_eq!(
            text(one_request_only(b"GET / HTTP/1.0\nHost: a.example\n\n").unwrap()),
            "GET / HTTP/1.0\nHost: a.example\nConnection: close\r\n\n"
        );
        // Not a whole HTTP/1 head: TLS, another protocol, a head still arriving.
        assert_eq!(one_request_only(&client_hello("api.vendor.com")), None);
        assert_eq!(one_request_only(b"SSH-2.0-OpenSSH_9.6\r\n"), None);
        assert_eq!(one_request_only(b"GET / HTTP/1.1\r\nHost: a"), None);
        assert_eq!(one_request_only(b""), None);
    }

    /// What a server would still route on is read, or refused: never let through unread.
    #[test]
    fn an_http_head_that_hides_its_host_is_unreadable() {
        let name = |s: &str| Claim::Name(s.into());
        // Empty lines before the request line.
        let lead = b"\r\n\r\nGET / HTTP/1.1\r\nHost: evil.example\r\n\r\n";
        assert_eq!(claimed_name(lead), name("evil.example"));
        assert_eq!(claimed_name(b"\r\n"), Claim::Incomplete);
        // An absolute-form target, alone or against the Host.
        let absolute = b"GET http://evil.example:80/x HTTP/1.1\r\nHost: evil.example\r\n\r\n";
        assert_eq!(claimed_name(absolute), name("evil.example"));
        let two = b"GET http://evil.example/ HTTP/1.1\r\nHost: api.vendor.com\r\n\r\n";
        assert_eq!(claimed_name(two), Claim::Unreadable);
        let twice = b"GET / HTTP/1.1\r\nHost: api.vendor.com\r\nHost: evil.example\r\n\r\n";
        assert_eq!(claimed_name(twice), Claim::Unreadable);
        // Past 64 headers, malformed, or cleartext HTTP/2.
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..70 {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"Host: evil.example\r\n\r\n");
        assert_eq!(claimed_name(&many), Claim::Unreadable);
        let bad = b"GET / HTTP/1.1\r\nHo st: evil.example\r\n\r\n";
        assert_eq!(claimed_name(bad), Claim::Unreadable);
        // A version a lenient server may still take: HTTP/1.2, a trailing space, a tab, case.
        for line in [
            "GET / HTTP/1.2",
            "GET / HTTP/1.1 ",
            "GET /\tHTTP/1.1",
            "GET / http/1.1",
        ] {
            let head = format!("{line}\r\nHost: evil.example\r\n\r\n");
            assert_eq!(claimed_name(head.as_bytes()), Claim::Unreadable, "{line}");
        }
        // A tunnel's far end is asked for as well as the Host.
        let tunnel = b"CONNECT evil.example:443 HTTP/1.1\r\nHost: api.vendor.com\r\n\r\n";
        assert_eq!(claimed_name(tunnel), Claim::Unreadable);
        let same = b"CONNECT api.vendor.com:443 HTTP/1.1\r\nHost: api.vendor.com\r\n\r\n";
        assert_eq!(claimed_name(same), name("api.vendor.com"));
        // ... and an address there cannot be checked against a name rule.
        let to_address = b"CONNECT 203.0.113.9:443 HTTP/1.1\r\n\r\n";
        assert_eq!(claimed_name(to_address), Claim::Unreadable);
        let absolute = b"GET http://203.0.113.9/ HTTP/1.1\r\nHost: api.vendor.com\r\n\r\n";
        assert_eq!(claimed_name(absolute), Claim::Unreadable);
        assert_eq!(
            claimed_name(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Claim::Unreadable
        );
        // Not a DNS name (it would be recorded with the decision).
        let long = format!("GET / HTTP/1.1\r\nHost: {}.com\r\n\r\n", "a".repeat(300));
        assert_eq!(claimed_name(long.as_bytes()), Claim::Unreadable);
        let odd = b"GET / HTTP/1.1\r\nHost: evil<script>\r\n\r\n";
        assert_eq!(claimed_name(odd), Claim::Unreadable);
        // A head larger than is read.
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.resize(CLAIM_BYTES + 10, b'a');
        assert_eq!(claimed_name(&huge), Claim::Unreadable);
    }
}
