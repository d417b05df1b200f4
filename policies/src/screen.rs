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
        if let Some(index) = find_any_ignore_case(ua, &policy.drop_user_agents) {
            return Screen::Drop(DropReason::ScannerUserAgent { index });
        }
    }
    if !policy.is_known_host(facts.host) && !contains(&policy.allow_unknown_host_networks, facts.client_ip) {
        return Screen::Drop(DropReason::UnknownHost);
    }
    Screen::Continue
}

/// The first of `needles` (ASCII lower case already) that `haystack`
/// contains, ignoring ASCII case. Every browser request's User-Agent comes
/// here: it is lower-cased once (on the stack when short, as nearly all are)
/// and searched with memchr's vectorised substring search, where comparing
/// every window with every needle cost thousands of instructions.
pub(crate) fn find_any_ignore_case(haystack: &str, needles: &[String]) -> Option<usize> {
    if needles.is_empty() {
        return None;
    }
    let mut stack = [0u8; 512];
    let heap;
    let lower: &[u8] = match stack.get_mut(..haystack.len()) {
        Some(lower) => {
            for (l, b) in lower.iter_mut().zip(haystack.bytes()) {
                *l = b.to_ascii_lowercase();
            }
            lower
        }
        None => {
            heap = haystack.to_ascii_lowercase();
            heap.as_bytes()
        }
    };
    needles.iter().position(|needle| memchr::memmem::find(lower, needle.as_bytes()).is_some())
}
