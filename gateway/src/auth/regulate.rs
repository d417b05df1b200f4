//! Regulation: attempts to prove who one is (passwords, one-time passwords,
//! Basic credentials, passkeys, links) and link requests are counted per
//! account and per client address in the store, so every gateway instance
//! sees them. An attempt is counted *before* it is checked: of any number
//! sent at once, no more than the limit are ever checked. Past a limit the
//! attempt is refused for a while, with a message that says nothing about
//! the account.

use std::net::IpAddr;
use std::time::Duration;

use pbxgate_policies::Policy;

use crate::store::{Store, StoreError};

pub const WINDOW: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Passwords, one-time passwords, Basic credentials, passkeys, links.
    Failure,
    /// Sign-in link emails asked for.
    LinkRequest,
    /// Passkey ceremonies started (per address only).
    PasskeyStart,
    /// Sessions made from one remember token (per token).
    Renewal,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Self::Failure => "fail",
            Self::LinkRequest => "link",
            Self::PasskeyStart => "pkstart",
            Self::Renewal => "renew",
        }
    }

    /// (per account, per address) within [`WINDOW`].
    fn limits(self) -> (u64, u64) {
        match self {
            Self::Failure => (10, 50),
            Self::LinkRequest => (5, 30),
            Self::PasskeyStart => (u64::MAX, 300),
            Self::Renewal => (30, u64::MAX),
        }
    }
}

/// The one bucket of an account, whichever way it is spelled: its name and
/// its email (in any case, with spaces around) are the same account. A login
/// no account has is counted as typed, folded the same way, so guessing
/// cannot tell the two apart.
pub fn account(policy: &Policy, login: &str) -> String {
    match policy.user(login) {
        Some(user) => format!("={}", user.name),
        None => format!("?{}", login.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()),
    }
}

fn keys(kind: Kind, account: &str, ip: IpAddr) -> (String, String) {
    (format!("{}:u:{account}", kind.tag()), format!("{}:ip:{}", kind.tag(), address(ip)))
}

/// The bucket of an address: an IPv4 address, or the /64 an IPv6 one is in
/// (one host usually holds a whole /64, and could otherwise take a new
/// address for every guess).
fn address(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        v4 => v4.to_string(),
    }
}

/// Takes one attempt for `account` (from [`account`]; empty when not yet
/// known) and the address. Ok(false): over a limit, so the attempt must not
/// be checked.
pub async fn attempt(store: &Store, kind: Kind, account: &str, ip: IpAddr) -> Result<bool, StoreError> {
    let (per_account, per_ip) = kind.limits();
    let (account_key, ip_key) = keys(kind, account, ip);
    let by_ip = match per_ip {
        u64::MAX => 0,
        _ => store.hit(&ip_key, WINDOW).await?,
    };
    let by_account = match account.is_empty() || per_account == u64::MAX {
        true => 0,
        false => store.hit(&account_key, WINDOW).await?,
    };
    Ok(by_ip <= per_ip && by_account <= per_account)
}

/// Counts a failure against an account once it is known (a passkey names
/// its account only once checked). Ok(false): the account is over its limit.
pub async fn failed_for(store: &Store, account: &str) -> Result<bool, StoreError> {
    let (per_account, _) = Kind::Failure.limits();
    let (account_key, _) = keys(Kind::Failure, account, IpAddr::from([0, 0, 0, 0]));
    Ok(store.hit(&account_key, WINDOW).await? <= per_account)
}

/// Whether the account is over its failure limit, without counting.
pub async fn account_locked(store: &Store, account: &str) -> Result<bool, StoreError> {
    let (per_account, _) = Kind::Failure.limits();
    let (account_key, _) = keys(Kind::Failure, account, IpAddr::from([0, 0, 0, 0]));
    Ok(store.hits(&account_key).await? >= per_account)
}

/// A proof that held: the account's attempts start again (the address's
/// do not), so a person who signs in often is never locked out by it.
pub async fn succeeded(store: &Store, account: &str) -> Result<(), StoreError> {
    let (account_key, _) = keys(Kind::Failure, account, IpAddr::from([0, 0, 0, 0]));
    store.forget_hits(&account_key).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bucket_per_account() {
        let policy = match Policy::from_toml(
            "domains = [\"a.example\"]\n[[user]]\nname = \"100\"\nemail = \"Alice@Example.com\"\n",
        ) {
            Ok(p) => p,
            Err(e) => panic!("{e:?}"),
        };
        for spelling in ["100", " 100 ", "alice@example.com", "ALICE@example.COM", "\talice@example.com "] {
            assert_eq!(account(&policy, spelling), "=100", "{spelling:?}");
        }
        assert_eq!(account(&policy, "  Nobody   Here "), "?nobody here");
        assert_ne!(account(&policy, "=100"), "=100", "a typed '=' cannot reach an account's bucket");
    }

    #[test]
    fn an_ipv6_host_is_one_bucket_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap_or(IpAddr::from([0; 16]));
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap_or(IpAddr::from([0; 16]));
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0; 16]));
        assert_eq!(address(a), address(b));
        assert_ne!(address(a), address(other));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap_or(IpAddr::from([0; 16]));
        assert_eq!(address(mapped), "192.0.2.7");
    }
}
