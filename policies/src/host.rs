//! The host a request names (`Host` or `:authority`), checked against
//! RFC 3986 before anything else looks at it.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

/// A request's host, canonical: a lower-case DNS name without its trailing
/// dot, a dotted IPv4 address, or an IPv6 address (without brackets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host<'a> {
    pub name: Cow<'a, str>,
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the Host is not a host name, an IPv4 address or a bracketed IPv6 address with an optional port")]
pub struct HostError;

impl Host<'_> {
    /// As the PBX receives it: `name` or `name:port`, IPv6 in brackets.
    pub fn authority(&self) -> String {
        let name = match self.name.contains(':') {
            true => format!("[{}]", self.name),
            false => self.name.to_string(),
        };
        match self.port {
            Some(port) => format!("{name}:{port}"),
            None => name,
        }
    }
}

/// Parses `host [ ":" port ]`. DNS names only (letters, digits, `-` and `_`
/// in labels of 1 to 63 bytes): user info, percent-encoding, sub-delimiters,
/// spaces, paths and fragments are all refused, so no other part of a URL
/// can hide in it. An empty value is an empty name (screening drops it).
pub fn parse_host(raw: &str) -> Result<Host<'_>, HostError> {
    let (name, port) = match raw.strip_prefix('[') {
        Some(rest) => {
            let (inside, after) = rest.split_once(']').ok_or(HostError)?;
            let ip: Ipv6Addr = inside.parse().map_err(|_| HostError)?;
            let port = match after {
                "" => None,
                _ => port(after.strip_prefix(':').ok_or(HostError)?)?,
            };
            return Ok(Host { name: Cow::Owned(ip.to_string()), port });
        }
        None => match raw.rsplit_once(':') {
            Some((name, digits)) => (name, port(digits)?),
            None => (raw, None),
        },
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return match raw.is_empty() {
            true => Ok(Host { name: Cow::Borrowed(""), port: None }),
            false => Err(HostError),
        };
    }
    if name.len() > 253 || !name.split('.').all(label) {
        return Err(HostError);
    }
    // All digits and dots: an IPv4 address, or nothing.
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') && name.parse::<Ipv4Addr>().is_err() {
        return Err(HostError);
    }
    let name = match name.bytes().any(|b| b.is_ascii_uppercase()) {
        true => Cow::Owned(name.to_ascii_lowercase()),
        false => Cow::Borrowed(name),
    };
    Ok(Host { name, port })
}

fn label(label: &str) -> bool {
    (1..=63).contains(&label.len())
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// An empty port is allowed (`host:`), as RFC 3986 allows it.
fn port(digits: &str) -> Result<Option<u16>, HostError> {
    if digits.is_empty() {
        return Ok(None);
    }
    if digits.len() > 5 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HostError);
    }
    digits.parse().map(Some).map_err(|_| HostError)
}
