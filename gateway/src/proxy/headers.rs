//! Header hygiene for requests going upstream and responses coming back.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, COOKIE};

use pbxgate_policies::Policy;

/// Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// Names, folded (lower case, `_` and `.` as `-`), that a client must never
/// send upstream: the configured identity headers plus the defaults.
#[derive(Debug, Clone)]
pub struct Spoofable {
    folded: Vec<String>,
}

impl Spoofable {
    pub fn new<'a>(configured: impl Iterator<Item = &'a HeaderName>) -> Self {
        let defaults = ["remote-user", "remote-email", "remote-groups", "remote-name", "x-pbxgate-assertion"];
        let mut folded: Vec<String> = configured.map(|n| fold(n.as_str())).collect();
        folded.extend(defaults.iter().map(|d| d.to_string()));
        folded.sort();
        folded.dedup();
        Self { folded }
    }

    fn matches(&self, name: &HeaderName) -> bool {
        let name = name.as_str().as_bytes();
        self.folded
            .iter()
            .any(|f| f.len() == name.len() && f.bytes().zip(name).all(|(f, &n)| f == fold_byte(n)))
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

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Removes every spelling of the identity headers a client might try.
pub fn strip_identity(headers: &mut HeaderMap, spoofable: &Spoofable) {
    let doomed: Vec<HeaderName> = headers.keys().filter(|n| spoofable.matches(n)).cloned().collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// The gateway's own cookies stay with the gateway. Several `Cookie` headers
/// (HTTP/2 splits them) become one, as HTTP/1.1 upstreams expect.
pub fn strip_gateway_cookies(headers: &mut HeaderMap) {
    if !headers.contains_key(COOKIE) {
        return;
    }
    let kept: Vec<String> = headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !is_gateway_cookie(c))
        .map(str::to_string)
        .collect();
    headers.remove(COOKIE);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(COOKIE, value);
        }
    }
}

fn is_gateway_cookie(pair: &str) -> bool {
    let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
    name.len() >= 14 && name[..14].eq_ignore_ascii_case("__host-pbxgate")
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

/// Sets `X-Forwarded-For/-Proto/-Host` and `X-Real-IP`. What a client sent is
/// kept (and appended to) only when the peer is a trusted proxy.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    peer: IpAddr,
    trusted_peer: bool,
    client: IpAddr,
    proto: &str,
    host: &str,
) {
    let xff = if trusted_peer {
        let previous: Vec<&str> =
            headers.get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
        if previous.is_empty() {
            peer.to_string()
        } else {
            format!("{}, {peer}", previous.join(", "))
        }
    } else {
        peer.to_string()
    };
    let keep_proto = trusted_peer && headers.contains_key("x-forwarded-proto");
    let keep_host = trusted_peer && headers.contains_key("x-forwarded-host");
    if !trusted_peer {
        headers.remove("forwarded");
    }
    set(headers, "x-forwarded-for", &xff);
    if !keep_proto {
        set(headers, "x-forwarded-proto", proto);
    }
    if !keep_host {
        set(headers, "x-forwarded-host", host);
    }
    set(headers, "x-real-ip", &client.to_string());
}

fn set(headers: &mut HeaderMap, name: &'static str, value: &str) {
    match HeaderValue::from_str(value) {
        Ok(v) => {
            headers.insert(name, v);
        }
        Err(_) => {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_spellings_are_all_stripped() {
        let configured = [HeaderName::from_static("x-user")];
        let spoofable = Spoofable::new(configured.iter());
        let mut h = HeaderMap::new();
        for name in
            ["remote-user", "remote_user", "remote.user", "x_user", "x-pbxgate-assertion", "x_pbxgate_other"]
        {
            h.append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_static("admin"));
        }
        h.insert("remote-userx", HeaderValue::from_static("keep"));
        strip_identity(&mut h, &spoofable);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("remote-userx"));
    }

    #[test]
    fn hop_by_hop_and_connection_tokens() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn gateway_cookies_stay_here() {
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("a=1; __Host-pbxgate=secret"));
        h.append(COOKIE, HeaderValue::from_static("__Host-pbxgate-remember=x; b=2"));
        strip_gateway_cookies(&mut h);
        assert_eq!(h.get(COOKIE).unwrap(), "a=1; b=2");
        let mut h = HeaderMap::new();
        h.append(COOKIE, HeaderValue::from_static("__HOST-PBXGATE=s"));
        strip_gateway_cookies(&mut h);
        assert!(h.get(COOKIE).is_none());
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let policy = Policy::from_toml(
            "domains=[\"a.example\"]\ntrusted_proxies=[\"10.0.0.0/8\"]\n[[route]]\npath=\"/\"\naccess=\"public\"\n",
        )
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("6.6.6.6, 1.2.3.4, 10.0.0.2"));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &policy), ip("1.2.3.4"));
        assert_eq!(client_ip(ip("8.8.8.8"), &h, &policy), ip("8.8.8.8"));
        h.insert("x-forwarded-for", HeaderValue::from_static("garbage"));
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &policy), ip("10.0.0.1"));
        set_forwarded(&mut h, ip("8.8.8.8"), false, ip("8.8.8.8"), "https", "a.example");
        assert_eq!(h.get("x-forwarded-for").unwrap(), "8.8.8.8");
    }
}
