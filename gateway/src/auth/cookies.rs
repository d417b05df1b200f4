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
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, value)| value)
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
