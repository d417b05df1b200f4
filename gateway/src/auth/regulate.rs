//! Regulation: failed sign-ins and link requests are counted per account and
//! per client address in the store (so every gateway instance sees them);
//! past a limit the attempt is refused for a while, with a message that says
//! nothing about the account.

use std::net::IpAddr;
use std::time::Duration;

use crate::store::{Store, StoreError};

pub const WINDOW: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Wrong passwords, failed passkeys, unusable links.
    Failure,
    /// Sign-in link emails asked for.
    LinkRequest,
}

impl Kind {
    fn tag(self) -> &'static str {
        match self {
            Self::Failure => "fail",
            Self::LinkRequest => "link",
        }
    }

    /// (per account, per address) within [`WINDOW`].
    fn limits(self) -> (u64, u64) {
        match self {
            Self::Failure => (10, 50),
            Self::LinkRequest => (5, 30),
        }
    }
}

fn keys(kind: Kind, login: &str, ip: IpAddr) -> (String, String) {
    let login = login.trim().to_lowercase();
    (format!("{}:u:{login}", kind.tag()), format!("{}:ip:{ip}", kind.tag()))
}

/// Whether this login or address has used up its attempts.
pub async fn is_locked(store: &Store, kind: Kind, login: &str, ip: IpAddr) -> Result<bool, StoreError> {
    let (per_user, per_ip) = kind.limits();
    let (user_key, ip_key) = keys(kind, login, ip);
    Ok(store.hits(&user_key).await? >= per_user || store.hits(&ip_key).await? >= per_ip)
}

/// Counts one attempt against both the login and the address.
pub async fn count(store: &Store, kind: Kind, login: &str, ip: IpAddr) -> Result<(), StoreError> {
    let (user_key, ip_key) = keys(kind, login, ip);
    if !login.trim().is_empty() {
        store.hit(&user_key, WINDOW).await?;
    }
    store.hit(&ip_key, WINDOW).await?;
    Ok(())
}
