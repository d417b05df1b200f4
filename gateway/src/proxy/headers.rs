//! Header hygiene for requests going upstream and responses coming back.

use std::net::IpAddr;

use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, COOKIE, FORWARDED, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, SET_COOKIE, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};

use pbxgate_policies::Policy;

use super::Outgoing;

/// Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 9] = [
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
    // One pass over the names, remembering which of these are present.
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Names listed in `Connection` beyond the usual "keep-alive" or "close":
    // rare, so only they cost an allocation.
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.eq_ignore_ascii_case("close") && !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h.as_str()))
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    for name in named {
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
    let mut kept = String::new();
    let mut values = 0;
    for pair in headers.get_all(COOKIE).iter().inspect(|_| values += 1).filter_map(|v| v.to_str().ok()) {
        for cookie in pair.split(';').map(str::trim).filter(|c| !c.is_empty() && !is_gateway_cookie(c)) {
            if !kept.is_empty() {
                kept.push_str("; ");
            }
            kept.push_str(cookie);
        }
    }
    if values == 0 {
        return;
    }
    headers.remove(COOKIE);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::try_from(kept) {
            headers.insert(COOKIE, value);
        }
    }
}

fn is_gateway_cookie(pair: &str) -> bool {
    let name = pair.split_once('=').map_or(pair, |(n, _)| n).trim();
    name.as_bytes().get(..14).is_some_and(|prefix| prefix.eq_ignore_ascii_case(b"__host-pbxgate"))
}

/// The PBX may set its own cookies, never the gateway's: one it could plant
/// or clear would be a session fixed or ended from behind the gateway.
/// Returns whether any was removed.
pub fn strip_gateway_set_cookies(headers: &mut HeaderMap) -> bool {
    let sets_ours = |v: &HeaderValue| v.to_str().is_ok_and(is_gateway_cookie);
    if !headers.get_all(SET_COOKIE).iter().any(sets_ours) {
        return false;
    }
    let kept: Vec<HeaderValue> =
        headers.get_all(SET_COOKIE).iter().filter(|v| !sets_ours(v)).cloned().collect();
    headers.remove(SET_COOKIE);
    for value in kept {
        headers.append(SET_COOKIE, value);
    }
    true
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
pub fn set_forwarded(headers: &mut HeaderMap, out: &Outgoing<'_>, host: Option<&HeaderValue>) {
    let trusted_peer = out.trusted_peer;
    let xff = match trusted_peer {
        true => {
            let previous: Vec<&str> =
                headers.get_all(&X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
            match previous.is_empty() {
                true => out.peer_value.clone(),
                false => HeaderValue::from_str(&format!("{}, {}", previous.join(", "), out.peer))
                    .unwrap_or_else(|_| out.peer_value.clone()),
            }
        }
        false => out.peer_value.clone(),
    };
    let keep_proto = trusted_peer && headers.contains_key(&X_FORWARDED_PROTO);
    let keep_host = trusted_peer && headers.contains_key(&X_FORWARDED_HOST);
    if !trusted_peer {
        headers.remove(FORWARDED);
    }
    headers.insert(X_FORWARDED_FOR, xff);
    if !keep_proto {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(out.proto));
    }
    if !keep_host {
        match host {
            Some(host) => headers.insert(X_FORWARDED_HOST, host.clone()),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
    let real_ip = if out.client == out.peer { out.peer_value.clone() } else { ip_value(out.client) };
    headers.insert(X_REAL_IP, real_ip);
}

/// An address as a header value (always valid text, so no error path).
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_string()).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
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

        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("close"));
        h.append("connection", HeaderValue::from_static(" Upgrade ,x-a,,x-b"));
        for name in ["upgrade", "keep-alive", "x-a", "x-b", "x-c", "proxy-authorization"] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), ["x-c"]);
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
        let out = Outgoing {
            worker: 0,
            peer: ip("8.8.8.8"),
            peer_value: ip_value(ip("8.8.8.8")),
            trusted_peer: false,
            client: ip("8.8.8.8"),
            proto: "https",
            host: "a.example",
            path: "/",
            identity: None,
            sockets: None,
        };
        set_forwarded(&mut h, &out, Some(&HeaderValue::from_static("a.example")));
        assert_eq!(h.get("x-forwarded-for").unwrap(), "8.8.8.8");
    }
}
