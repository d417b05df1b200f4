//! Header hygiene for requests going upstream (their head written in one
//! pass) and responses coming back.

use std::net::IpAddr;

use bytes::BytesMut;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, COOKIE, FORWARDED, HOST, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use smallvec::SmallVec;

use pbxgate_policies::Policy;

use super::Outgoing;

/// Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
pub(super) const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Headers that IIS, Symfony, Spring, Traefik and others take as the
/// request's real path or its prefix: from a client they would route the PBX
/// somewhere other than the path the policy decided on.
const PATH_OVERRIDES: [&str; 4] =
    ["x-original-url", "x-rewrite-url", "x-forwarded-uri", "x-forwarded-prefix"];

/// Names, folded (lower case, `_` and `.` as `-`), that a client must never
/// send upstream: the configured identity headers, the default ones and the
/// path overrides.
#[derive(Debug, Clone)]
pub struct Spoofable {
    folded: Vec<String>,
    /// Bit n set: some folded name is n bytes long (most names are not, and
    /// are passed at once).
    lengths: u64,
}

impl Spoofable {
    pub fn new<'a>(configured: impl Iterator<Item = &'a HeaderName>) -> Self {
        let defaults = ["remote-user", "remote-email", "remote-groups", "remote-name", "x-pbxgate-assertion"];
        let mut folded: Vec<String> = configured.map(|n| fold(n.as_str())).collect();
        folded.extend(defaults.iter().chain(&PATH_OVERRIDES).map(|d| d.to_string()));
        folded.sort();
        folded.dedup();
        let lengths = folded.iter().filter(|f| f.len() < 64).fold(0, |bits, f| bits | 1 << f.len());
        Self { folded, lengths }
    }

    fn matches(&self, name: &HeaderName) -> bool {
        let name = name.as_str().as_bytes();
        let maybe = name.len() >= 64 || self.lengths & (1 << name.len()) != 0;
        (maybe
            && self
                .folded
                .iter()
                .any(|f| f.len() == name.len() && f.bytes().zip(name).all(|(f, &n)| f == fold_byte(n))))
            || starts_with_folded(name, b"x-pbxgate-")
    }
}

fn fold_byte(b: u8) -> u8 {
    match b {
        b'_' | b'.' => b'-',
        b => b.to_ascii_lowercase(),
    }
}

fn fold(name: &str) -> String {
    name.bytes().map(|b| char::from(fold_byte(b))).collect()
}

fn starts_with_folded(name: &[u8], prefix: &[u8]) -> bool {
    name.len() >= prefix.len() && name.iter().zip(prefix).all(|(&n, &p)| fold_byte(n) == p)
}

/// The request head the PBX is sent, apart from the client's own headers.
pub struct RequestHead<'a> {
    pub method: &'a http::Method,
    /// Origin form: path and query.
    pub target: &'a str,
    /// The Host to send (the name the client used).
    pub host: Option<&'a HeaderValue>,
    pub identity: Option<&'a super::UpstreamIdentity>,
    /// The protocol the client asked to switch to.
    pub upgrade: Option<&'a HeaderValue>,
    /// A body of unknown length, sent in chunks.
    pub chunked: bool,
    /// The names the client's `Connection` header lists ([`connection_tokens`]).
    pub listed: &'a [&'a str],
}

/// The names a `Connection` header lists: rare beyond "keep-alive" and "close".
pub(super) fn connection_tokens(headers: &HeaderMap) -> SmallVec<[&str; 4]> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Writes the request head for the PBX in one pass over the client's headers
/// (no header map is edited). Left out: hop-by-hop headers and those
/// `Connection` names, every spelling of the identity headers, the gateway's
/// cookies, and the client's Host, X-Real-IP and forwarding headers (the
/// latter kept, and appended to, only from a trusted proxy). Then written:
/// Host, X-Forwarded-For/-Proto/-Host, X-Real-IP, the identity, the client's
/// other cookies as one header (HTTP/2 splits them), the upgrade and the
/// body's framing.
pub fn write_request_head(
    buf: &mut BytesMut,
    head: &RequestHead<'_>,
    headers: &HeaderMap,
    out: &Outgoing<'_>,
    spoofable: &Spoofable,
) {
    let (trusted, listed) = (out.trusted_peer, head.listed);
    buf.reserve(256 + head.target.len() + headers.len() * 48);
    buf.extend_from_slice(head.method.as_str().as_bytes());
    buf.extend_from_slice(b" ");
    buf.extend_from_slice(head.target.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(host) = head.host {
        line(buf, HOST.as_str(), host.as_bytes());
    }
    let mut cookies = Vec::new();
    let mut forwarded_for = String::new();
    let (mut proto_kept, mut host_kept) = (false, false);
    for (name, value) in headers {
        if HOP_BY_HOP.contains(name)
            || listed.iter().any(|t| t.eq_ignore_ascii_case(name.as_str()))
            || spoofable.matches(name)
            || name == HOST
            || name == X_REAL_IP
        {
            continue;
        }
        if name == COOKIE {
            for cookie in crate::auth::cookies::pairs(value.as_bytes())
                .filter(|c| !c.is_empty() && !is_gateway_cookie(c))
            {
                if !cookies.is_empty() {
                    cookies.extend_from_slice(b"; ");
                }
                cookies.extend_from_slice(cookie);
            }
            continue;
        }
        if name == X_FORWARDED_FOR {
            if let (true, Ok(value)) = (trusted, value.to_str()) {
                forwarded_for.push_str(value);
                forwarded_for.push_str(", ");
            }
            continue;
        }
        if !trusted && (name == X_FORWARDED_PROTO || name == X_FORWARDED_HOST || name == FORWARDED) {
            continue;
        }
        proto_kept |= name == X_FORWARDED_PROTO;
        host_kept |= name == X_FORWARDED_HOST;
        line(buf, name.as_str(), value.as_bytes());
    }
    if forwarded_for.is_empty() {
        line(buf, X_FORWARDED_FOR.as_str(), out.peer_value.as_bytes());
    } else {
        forwarded_for.push_str(out.peer_value.to_str().unwrap_or_default());
        line(buf, X_FORWARDED_FOR.as_str(), forwarded_for.as_bytes());
    }
    if !proto_kept {
        line(buf, X_FORWARDED_PROTO.as_str(), out.proto.as_bytes());
    }
    if let (false, Some(host)) = (host_kept, head.host) {
        line(buf, X_FORWARDED_HOST.as_str(), host.as_bytes());
    }
    if out.client == out.peer {
        line(buf, X_REAL_IP.as_str(), out.peer_value.as_bytes());
    } else {
        line(buf, X_REAL_IP.as_str(), ip_value(out.client).as_bytes());
    }
    if let Some(identity) = head.identity {
        buf.extend_from_slice(identity.lines());
        if let Some((name, value)) = identity.assertion() {
            line(buf, name.as_str(), value.as_bytes());
        }
    }
    if !cookies.is_empty() {
        line(buf, COOKIE.as_str(), &cookies);
    }
    if let Some(protocol) = head.upgrade {
        line(buf, CONNECTION.as_str(), b"upgrade");
        line(buf, UPGRADE.as_str(), protocol.as_bytes());
    }
    if head.chunked {
        line(buf, TRANSFER_ENCODING.as_str(), b"chunked");
    }
    buf.extend_from_slice(b"\r\n");
}

pub(super) fn line(buf: &mut BytesMut, name: &str, value: &[u8]) {
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b": ");
    buf.extend_from_slice(value);
    buf.extend_from_slice(b"\r\n");
}

/// Whether a `Cookie` pair or a `Set-Cookie` value names one of the gateway's cookies.
pub(super) fn is_gateway_cookie(pair: &[u8]) -> bool {
    // The prefix holds no `=` or space: matching the pair's start is matching its name's.
    let start = pair.trim_ascii_start();
    start.get(..14).is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"__host-pbxgate"))
}

/// The client's address: the socket peer, unless the peer is a trusted proxy,
/// in which case the right-most address in `X-Forwarded-For` that is not
/// itself a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, policy: &Policy) -> IpAddr {
    if !policy.is_trusted_proxy(peer) {
        return peer;
    }
    let mut client = peer;
    let values: Vec<&str> =
        headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
    for entry in values.iter().rev().flat_map(|v| v.rsplit(',')) {
        let Some(ip) = parse_forwarded_ip(entry) else {
            break;
        };
        client = ip;
        if !policy.is_trusted_proxy(ip) {
            break;
        }
    }
    client
}

fn parse_forwarded_ip(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse()
        .ok()
        .or_else(|| entry.strip_prefix('[')?.split(']').next()?.parse().ok())
        .or_else(|| entry.rsplit_once(':')?.0.parse().ok())
}

/// An address as a header value (always valid text, so no error path).
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn outgoing(peer: &str, trusted_peer: bool, client: &str) -> Outgoing<'static> {
        Outgoing {
            worker: 0,
            peer: ip(peer),
            peer_value: Box::leak(Box::new(ip_value(ip(peer)))),
            trusted_peer,
            client: ip(client),
            proto: "https",
            host: "a.example",
            host_value: None,
            path: "/",
            identity: None,
            sockets: None,
            upgrade: None,
        }
    }

    /// The head written for a GET of `/x` from `out`, as text.
    fn head(headers: &HeaderMap, out: &Outgoing<'_>, spoofable: &Spoofable) -> String {
        let host = HeaderValue::from_static("a.example");
        let method = http::Method::GET;
        let listed = connection_tokens(headers);
        let head = RequestHead {
            method: &method,
            target: "/x?y",
            host: Some(&host),
            identity: None,
            upgrade: None,
            chunked: false,
            listed: &listed,
        };
        let mut buf = BytesMut::new();
        write_request_head(&mut buf, &head, headers, out, spoofable);
        String::from_utf8(buf.to_vec()).unwrap()
    }

    fn names(head: &str) -> Vec<&str> {
        head.lines().skip(1).filter_map(|l| l.split_once(": ")).map(|(n, _)| n).collect()
    }

    /// The header lines of a head.
    fn lines(head: &str) -> Vec<&str> {
        head.lines().skip(1).filter(|l| !l.is_empty()).collect()
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
        }
        h
    }

    /// `kept`, the client's headers that go through, between the Host and
    /// the forwarding headers the gateway writes.
    fn expected<'a>(kept: &[&'a str]) -> Vec<&'a str> {
        let mut names = vec!["host"];
        names.extend(kept);
        names.extend(["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip"]);
        names
    }

    #[test]
    fn heads_carry_the_target_the_headers_and_the_framing() {
        let out = outgoing("192.0.2.1", false, "192.0.2.1");
        let spoofable = Spoofable::new(std::iter::empty());
        let text = head(&map(&[("accept", "*/*"), ("host", "evil.example")]), &out, &spoofable);
        assert_eq!(
            text,
            "GET /x?y HTTP/1.1\r\nhost: a.example\r\naccept: */*\r\nx-forwarded-for: 192.0.2.1\r\n\
             x-forwarded-proto: https\r\nx-forwarded-host: a.example\r\nx-real-ip: 192.0.2.1\r\n\r\n"
        );
        let protocol = HeaderValue::from_static("websocket");
        let (method, mut buf) = (http::Method::POST, BytesMut::new());
        let upgrade = RequestHead {
            method: &method,
            target: "/ws",
            host: None,
            identity: None,
            upgrade: Some(&protocol),
            chunked: true,
            listed: &[],
        };
        write_request_head(&mut buf, &upgrade, &HeaderMap::new(), &out, &spoofable);
        let text = String::from_utf8(buf.to_vec()).unwrap();
        assert!(text.starts_with("POST /ws HTTP/1.1\r\nx-forwarded-for: "), "{text}");
        assert!(
            text.ends_with("connection: upgrade\r\nupgrade: websocket\r\ntransfer-encoding: chunked\r\n\r\n"),
            "{text}"
        );
        assert!(!text.contains("x-forwarded-host"), "no Host, no X-Forwarded-Host: {text}");
    }

    #[test]
    fn identity_spellings_are_all_stripped() {
        let configured = [HeaderName::from_static("x-user")];
        let spoofable = Spoofable::new(configured.iter());
        let mut pairs: Vec<(&str, &str)> =
            ["remote-user", "remote_user", "remote.user", "x_user", "x-pbxgate-assertion", "x_pbxgate_other"]
                .iter()
                .map(|n| (*n, "admin"))
                .collect();
        pairs.push(("remote-userx", "keep"));
        let text = head(&map(&pairs), &outgoing("192.0.2.1", true, "192.0.2.1"), &spoofable);
        assert_eq!(names(&text), expected(&["remote-userx"]), "{text}");
    }

    #[test]
    fn hop_by_hop_and_connection_tokens() {
        let out = outgoing("192.0.2.1", false, "192.0.2.1");
        let spoofable = Spoofable::new(std::iter::empty());
        let h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("accept", "*/*"),
        ]);
        assert_eq!(names(&head(&h, &out, &spoofable)), expected(&["accept"]));

        let mut pairs = vec![("connection", "close"), ("connection", " Upgrade ,x-a,,x-b")];
        for name in ["upgrade", "keep-alive", "x-a", "x-b", "x-c", "proxy-authorization", "transfer-encoding"]
        {
            pairs.push((name, "1"));
        }
        assert_eq!(names(&head(&map(&pairs), &out, &spoofable)), expected(&["x-c"]));
    }

    #[test]
    fn gateway_cookies_stay_here() {
        let out = outgoing("192.0.2.1", false, "192.0.2.1");
        let spoofable = Spoofable::new(std::iter::empty());
        let h =
            map(&[("cookie", "a=1; __Host-pbxgate=secret"), ("cookie", "__Host-pbxgate-remember=x; b=2")]);
        let text = head(&h, &out, &spoofable);
        assert!(text.contains("\r\ncookie: a=1; b=2\r\n"), "{text}");
        assert!(!text.contains("secret") && !text.contains("remember"), "{text}");
        let text = head(&map(&[("cookie", "__HOST-PBXGATE=s")]), &out, &spoofable);
        assert!(!text.contains("cookie"), "{text}");
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let policy = Policy::from_toml(
            "domains=[\"a.example\"]\ntrusted_proxies=[\"10.0.0.0/8\"]\n[[route]]\npath=\"/\"\naccess=\"public\"\n",
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6, 1.2.3.4, 10.0.0.2"));
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &policy), ip("1.2.3.4"));
        assert_eq!(client_ip(ip("8.8.8.8"), &h, &policy), ip("8.8.8.8"));
        h.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &policy), ip("10.0.0.1"));

        let spoofable = Spoofable::new(std::iter::empty());
        let sent = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "http"),
            ("x-forwarded-host", "b.example"),
            ("forwarded", "for=6.6.6.6"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        let untrusted = head(&sent, &outgoing("8.8.8.8", false, "8.8.8.8"), &spoofable);
        assert_eq!(
            lines(&untrusted),
            [
                "host: a.example",
                "x-forwarded-for: 8.8.8.8",
                "x-forwarded-proto: https",
                "x-forwarded-host: a.example",
                "x-real-ip: 8.8.8.8"
            ]
        );
        let trusted = head(&sent, &outgoing("10.0.0.1", true, "1.2.3.4"), &spoofable);
        assert_eq!(
            lines(&trusted),
            [
                "host: a.example",
                "x-forwarded-proto: http",
                "x-forwarded-host: b.example",
                "forwarded: for=6.6.6.6",
                "x-forwarded-for: 6.6.6.6, 1.2.3.4, 10.0.0.1",
                "x-real-ip: 1.2.3.4"
            ]
        );
    }
}
