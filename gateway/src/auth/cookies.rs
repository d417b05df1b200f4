//! The gateway's two cookies. `__Host-` pins them to this origin: Secure,
//! Path=/, no Domain. HttpOnly keeps scripts away; SameSite=Lax keeps them off
//! cross-site POSTs.

use std::sync::Mutex;
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

/// The hash of the session cookie's secret, when it looks like one of ours:
/// what the store is asked about.
pub fn read_session_hash(headers: &HeaderMap, last: Option<&LastSession>) -> Option<SecretHash> {
    let sent = value(headers, SESSION)?;
    match last {
        Some(last) => last.hash_of(sent),
        None => SecretHash::of_sent(sent),
    }
}

/// The session cookie a connection sent last, and its hash. A client sends
/// the same cookie on every request of a connection, and its SHA-256 was the
/// largest part of identifying it. Kept only while the connection lasts.
#[derive(Default)]
pub struct LastSession(Mutex<Option<([u8; 64], SecretHash)>>);

impl LastSession {
    fn hash_of(&self, sent: &[u8]) -> Option<SecretHash> {
        let sent: &[u8; 64] = sent.trim_ascii().try_into().ok()?;
        // `try_lock`: HTTP/2 requests of one connection may meet here; one
        // of them just hashes.
        if let Ok(Some((last, hash))) = self.0.try_lock().as_deref() {
            if same(last, sent) {
                return Some(*hash);
            }
        }
        let hash = SecretHash::of_sent(sent)?;
        if let Ok(mut last) = self.0.try_lock() {
            *last = Some((*sent, hash));
        }
        Some(hash)
    }
}

impl std::fmt::Debug for LastSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LastSession(..)")
    }
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &[u8; 64], b: &[u8; 64]) -> bool {
    a.iter().zip(b).fold(0, |differ, (x, y)| differ | (x ^ y)) == 0
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
pub(crate) fn pairs(value: &[u8]) -> impl Iterator<Item = &[u8]> {
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

/// The language picked on the sign-in page, for a year. A preference, not
/// a secret; named like the gateway's other cookies, so it never reaches
/// the PBX.
pub fn language(lang: crate::ui::Lang) -> HeaderValue {
    let value = format!(
        "{}={}; Secure; Path=/; SameSite=Lax; Max-Age=31536000",
        crate::ui::i18n::LANG_COOKIE,
        lang.code()
    );
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(""))
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
    fn a_connection_remembers_the_hash_of_the_session_cookie_it_sent_last() {
        use super::{read_session_hash, LastSession, SESSION};
        use crate::store::Secret;
        let last = LastSession::default();
        let (a, b) = (Secret::generate(), Secret::generate());
        for (secret, cookie) in [
            (&a, format!("{SESSION}={}", a.expose())),
            (&a, format!("x=1; {SESSION}={}", a.expose())),
            (&b, format!("{SESSION}={}", b.expose())),
            (&a, format!("{SESSION}={}", a.expose().to_ascii_uppercase())),
            (&a, format!("{SESSION}={}", a.expose())),
        ] {
            assert_eq!(read_session_hash(&headers(&[&cookie]), Some(&last)), Some(secret.hash()), "{cookie}");
            assert_eq!(read_session_hash(&headers(&[&cookie]), None), Some(secret.hash()), "{cookie}");
            assert_eq!(last.0.lock().unwrap().as_ref().map(|(_, hash)| *hash), Some(secret.hash()));
        }
        let bad = format!("{SESSION}={}", "g".repeat(64));
        assert_eq!(read_session_hash(&headers(&[&bad]), Some(&last)), None);
        assert_eq!(read_session_hash(&headers(&[]), Some(&last)), None);
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
