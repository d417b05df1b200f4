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
    value(headers, name).and_then(Secret::parse)
}

/// The hash of cookie `name`'s secret, when it looks like one of ours: what
/// the store is asked about, with no copy of the secret made.
pub fn read_hash(headers: &HeaderMap, name: &str) -> Option<SecretHash> {
    value(headers, name).and_then(SecretHash::of_sent)
}

fn value<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    // Visible ASCII only (`to_str`), so ASCII trimming is all there is to do.
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.split(';').find_map(|pair| pair.trim_ascii().strip_prefix(name)?.strip_prefix('=')))
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
        assert_eq!(value(&h, SESSION), Some("a=b"));
        assert_eq!(value(&h, REMEMBER), Some("r"));
        assert_eq!(value(&h, "z"), Some("2"));
        assert_eq!(value(&h, "other"), Some("1"));
        assert_eq!(value(&h, "__Host"), None);
        assert_eq!(value(&headers(&[SESSION]), SESSION), None);
        assert_eq!(value(&HeaderMap::new(), SESSION), None);
    }
}
