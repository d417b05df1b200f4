//! The gateway's two cookies. `__Host-` pins them to this origin: Secure,
//! Path=/, no Domain. HttpOnly keeps scripts away; SameSite=Lax keeps them off
//! cross-site POSTs.

use std::time::Duration;

use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};

use crate::store::{Secret, SecretHash};

pub const SESSION: &str = "__Host-pbxgate";
pub const REMEMBER: &str = "__Host-pbxgate-remember";

/// The value of cookie `name`, when it looks like one of our secrets.
pub fn read(headers: &HeaderMap, name: &str) -> Option<Secret> {
    value(headers, name).and_then(|v| std::str::from_utf8(v).ok()).and_then(Secret::parse)
}

/// The hash of cookie `name`'s secret, when it looks like one of ours: what
/// the store is asked about, with no copy of the secret made.
pub fn read_hash(headers: &HeaderMap, name: &str) -> Option<SecretHash> {
    value(headers, name).and_then(SecretHash::of_sent)
}

/// The first value sent for cookie `name`, as bytes: what our secrets are
/// made of (hex) is checked by the caller, so another cookie's odd bytes
/// hide nothing.
fn value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h [u8]> {
    headers.get_all(COOKIE).iter().find_map(|v| {
        pairs(v.as_bytes()).find_map(|pair| pair.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
    })
}

/// A `Cookie` header's `name=value` pairs, trimmed.
pub fn pairs(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let current = rest?;
        let (pair, next) = match memchr::memchr(b';', current) {
            Some(end) => (&current[..end], Some(&current[end + 1..])),
            None => (current, None),
        };
        rest = next;
        Some(pair.trim_ascii())
    })
}

pub fn set(name: &str, secret: &Secret, max_age: Duration) -> HeaderValue {
    let value = format!(
        "{name}={}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age={}",
        secret.expose(),
        max_age.as_secs()
    );
    // Hex and fixed attributes: always a valid header value.
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
}

pub fn clear(name: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("{name}=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0"))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use http::header::COOKIE;
    use http::HeaderMap;

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(COOKIE, v.parse().unwrap());
        }
        headers
    }

    #[test]
    fn a_cookie_is_found_by_its_exact_name_in_any_cookie_header() {
        use super::{value, REMEMBER, SESSION};
        let h =
            headers(&["__Host-pbxgate-remember=r; other=1", " __Host-pbxgate = no;__Host-pbxgate=a=b ; z=2"]);
        assert_eq!(value(&h, SESSION), Some(&b"a=b"[..]));
        assert_eq!(value(&h, REMEMBER), Some(&b"r"[..]));
        assert_eq!(value(&h, "z"), Some(&b"2"[..]));
        assert_eq!(value(&h, "other"), Some(&b"1"[..]));
        assert_eq!(value(&h, "__Host"), None);
        assert_eq!(value(&headers(&[SESSION]), SESSION), None);
        assert_eq!(value(&HeaderMap::new(), SESSION), None);
    }
}
