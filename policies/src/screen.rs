//! Screening: the cheap first look that drops scanners and unknown hosts before
//! anything else runs. It only ever denies.

use crate::policy::{contains, Policy};
use crate::Facts;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    Continue,
    /// Close the connection without a single response byte.
    Drop(DropReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The User-Agent contains `drop_user_agents[index]`.
    ScannerUserAgent { index: usize },
    /// The Host is not one of `domains`, and the client may not use other hosts.
    UnknownHost,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScannerUserAgent { .. } => "scanner_user_agent",
            Self::UnknownHost => "unknown_host",
        }
    }
}

pub fn screen(policy: &Policy, facts: &Facts<'_>) -> Screen {
    if let Some(ua) = facts.user_agent {
        if let Some(index) =
            policy.drop_user_agents.iter().position(|needle| contains_ignore_case(ua, needle))
        {
            return Screen::Drop(DropReason::ScannerUserAgent { index });
        }
    }
    if !policy.is_known_host(facts.host) && !contains(&policy.allow_unknown_host_networks, facts.client_ip) {
        return Screen::Drop(DropReason::UnknownHost);
    }
    Screen::Continue
}

/// `needle` is already lower case; no allocation on the request path.
fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), needle.as_bytes());
    n.len() <= h.len() && h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}
