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
        Some(b) if b.is_ascii_uppercase() => http_host(first),
        Some(_) => Claim::Nothing,
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
    match name {
        Some(n) => Claim::Name(normalize(n)),
        None => Claim::Unreadable,
    }
}

fn http_host(first: &[u8]) -> Claim {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(first) {
        Ok(httparse::Status::Partial) if first.len() < CLAIM_BYTES => Claim::Incomplete,
        // Not HTTP after all (or a head past the limit, or past 64 headers): no name to check.
        Ok(httparse::Status::Partial) | Err(_) => Claim::Nothing,
        Ok(httparse::Status::Complete(_)) => {
            let host = request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("host"))
                .and_then(|h| std::str::from_utf8(h.value).ok());
            match host.map(without_port) {
                Some(h) if !h.is_empty() && h.parse::<std::net::IpAddr>().is_err() => {
                    Claim::Name(normalize(h))
                }
                _ => Claim::Nothing,
            }
        }
    }
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
        let v6 = b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n";
        assert_eq!(claimed_name(v6), Claim::Nothing);
        let none = b"GET / HTTP/1.0\r\n\r\n";
        assert_eq!(claimed_name(none), Claim::Nothing);
        // Other protocols: nothing to check.
        assert_eq!(claimed_name(b"SSH-2.0-OpenSSH_9.6\r\n"), Claim::Nothing);
        assert_eq!(claimed_name(b"\x00\x01binary"), Claim::Nothing);
    }
}
