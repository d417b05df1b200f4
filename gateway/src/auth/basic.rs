//! HTTP Basic for API accounts (role `api`, `basic_auth = true`, limited to
//! networks): verified against the account's argon2id hash, then remembered
//! for a minute under a keyed hash of the credentials, so a script's steady
//! stream of requests does not pay argon2 each time. A credential still in
//! use half-way through its minute is verified again in the background, so
//! a busy script never waits for argon2 once it is verified (all its
//! connections would otherwise stall together, once a minute).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use pbxgate_policies::Role;
use ring::hmac;

use super::{passwords, regulate};
use crate::store::StoreError;
use crate::State;

const CACHE_TTL: Duration = Duration::from_secs(60);
const REFRESH_AFTER: Duration = Duration::from_secs(30);
const CACHE_MAX: usize = 10_000;

pub struct BasicCache {
    key: hmac::Key,
    verified: Mutex<HashMap<Vec<u8>, (String, Instant)>>,
    /// One verification at a time per credential: a script opening 64
    /// connections at once (or a minute's entry running out under load) costs
    /// one argon2 run, not 64.
    in_flight: Mutex<HashMap<Vec<u8>, Arc<tokio::sync::Mutex<()>>>>,
}

impl Default for BasicCache {
    fn default() -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &crate::store::secret::random::<32>()),
            verified: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
        }
    }
}

/// What the cache holds for a credential.
#[derive(Debug, PartialEq)]
enum Cached {
    Fresh(String),
    /// Still good, and due to be verified again.
    Refresh(String),
    Miss,
}

impl BasicCache {
    /// What a credential is remembered under: a keyed hash, so the cache
    /// holds no password and nobody can guess their way to an entry.
    fn tag(&self, login: &str, password: &str) -> Vec<u8> {
        hmac::sign(&self.key, format!("{login}\0{password}").as_bytes()).as_ref().to_vec()
    }

    /// The credential's standing, for a user the policy still lets use Basic
    /// (a reload may have taken that away).
    fn cached(&self, tag: &[u8], state: &State) -> Cached {
        match self.lookup(tag, Instant::now()) {
            Cached::Fresh(user) | Cached::Refresh(user)
                if !state.policy.load().user(&user).is_some_and(|u| u.basic_auth) =>
            {
                Cached::Miss
            }
            cached => cached,
        }
    }

    fn lookup(&self, tag: &[u8], now: Instant) -> Cached {
        let Ok(verified) = self.verified.lock() else { return Cached::Miss };
        let Some((user, at)) = verified.get(tag) else { return Cached::Miss };
        match now.saturating_duration_since(*at) {
            age if age >= CACHE_TTL => Cached::Miss,
            age if age >= REFRESH_AFTER => Cached::Refresh(user.clone()),
            _ => Cached::Fresh(user.clone()),
        }
    }

    fn remember(&self, tag: &[u8], user: &str, at: Instant) {
        if let Ok(mut verified) = self.verified.lock() {
            if verified.len() >= CACHE_MAX {
                verified.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
            }
            verified.insert(tag.to_vec(), (user.to_string(), at));
        }
    }

    fn forget(&self, tag: &[u8]) {
        if let Ok(mut verified) = self.verified.lock() {
            verified.remove(tag);
        }
    }

    /// This credential's turn, taken now, or `None` when a verification of
    /// it is already under way.
    fn claim(&self, tag: &[u8]) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        self.turn(tag).try_lock_owned().ok()
    }

    /// This credential's turn to be verified (shared by concurrent requests).
    fn turn(&self, tag: &[u8]) -> Arc<tokio::sync::Mutex<()>> {
        match self.in_flight.lock() {
            Ok(mut in_flight) => in_flight.entry(tag.to_vec()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    fn done(&self, tag: &[u8]) {
        if let Ok(mut in_flight) = self.in_flight.lock() {
            in_flight.remove(tag);
        }
    }
}

#[derive(Debug)]
pub enum Basic {
    /// No Basic credentials in the request.
    Absent,
    Verified(String),
    Refused,
    Regulated,
}

/// `(user, password)` from an `Authorization: Basic` header.
pub fn credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// The SHA-256 (hex) of the raw `user:password`, as listed in a route's
/// `basic_credentials` (an API access list).
pub fn listed_form(headers: &HeaderMap) -> Option<String> {
    let (user, password) = credentials(headers)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, format!("{user}:{password}").as_bytes());
    Some(crate::store::secret::hex(digest.as_ref()))
}

pub(crate) async fn verify(
    state: &Arc<State>,
    headers: &HeaderMap,
    client_ip: IpAddr,
) -> Result<Basic, StoreError> {
    let Some((login, password)) = credentials(headers) else {
        return Ok(Basic::Absent);
    };
    let cache = &state.auth.basic;
    let tag = cache.tag(&login, &password);
    match cache.cached(&tag, state) {
        Cached::Fresh(user) => return Ok(Basic::Verified(user)),
        Cached::Refresh(user) => {
            verify_in_background(state, login, password, tag);
            return Ok(Basic::Verified(user));
        }
        Cached::Miss => {}
    }
    // Boxed: rare once verified, and its future would otherwise be part of
    // every request's.
    Box::pin(verify_in_turn(state, &login, password, client_ip, tag)).await
}

/// Verifies a cached credential again, unless that is under way already:
/// kept for another minute when it still holds, forgotten when it no longer
/// does (the client's next request then meets the refusal, counted as a
/// failure). On a store error the entry runs out as it would have.
fn verify_in_background(state: &Arc<State>, login: String, password: String, tag: Vec<u8>) {
    let Some(turn) = state.auth.basic.claim(&tag) else { return };
    let state = state.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let cache = &state.auth.basic;
        match password_holds(&state, &login, password).await {
            Ok(Ok(Some(user))) => cache.remember(&tag, &user, started),
            Ok(Ok(None)) => cache.forget(&tag),
            // Busy: the entry runs out as it would have.
            Ok(Err(passwords::Busy)) => {}
            Err(error) => tracing::debug!(%error, "re-verifying Basic credentials failed"),
        }
        cache.done(&tag);
        drop(turn);
    });
}

/// Verifies a credential the cache does not hold, one request per credential
/// at a time.
async fn verify_in_turn(
    state: &State,
    login: &str,
    password: String,
    client_ip: IpAddr,
    tag: Vec<u8>,
) -> Result<Basic, StoreError> {
    let cache = &state.auth.basic;
    let turn = cache.turn(&tag);
    let _turn = turn.lock().await;
    // Whoever went first may have verified it meanwhile.
    if let Cached::Fresh(user) | Cached::Refresh(user) = cache.cached(&tag, state) {
        return Ok(Basic::Verified(user));
    }
    let outcome = verify_uncached(state, login, password, client_ip, &tag).await;
    // Also on an error (`?` inside): the next request takes a fresh turn.
    cache.done(&tag);
    outcome
}

async fn verify_uncached(
    state: &State,
    login: &str,
    password: String,
    client_ip: IpAddr,
    tag: &[u8],
) -> Result<Basic, StoreError> {
    let cache = &state.auth.basic;
    let account = regulate::account(&state.policy.load(), login);
    if !regulate::attempt(&state.store, regulate::Kind::Failure, &account, client_ip).await? {
        return Ok(Basic::Regulated);
    }
    match password_holds(state, login, password).await? {
        Ok(Some(user)) => {
            regulate::succeeded(&state.store, &account).await?;
            cache.remember(tag, &user, Instant::now());
            Ok(Basic::Verified(user))
        }
        Ok(None) => {
            let known = state.policy.load().user(login).map(|u| u.name.clone());
            tracing::info!(target: "pbxgate::audit", user = known.as_deref().unwrap_or("-"), client = %client_ip,
                "Basic credentials refused");
            if let Some(user) = known {
                super::record(state, &user, "basic", "bad_credentials", client_ip, "").await;
            }
            Ok(Basic::Refused)
        }
        Err(passwords::Busy) => Ok(Basic::Regulated),
    }
}

/// The API account `login` names, when `password` is its password. An
/// unknown account takes as long (the same argon2 work).
async fn password_holds(
    state: &State,
    login: &str,
    password: String,
) -> Result<Result<Option<String>, passwords::Busy>, StoreError> {
    let account = state
        .policy
        .load()
        .user(login)
        .filter(|u| u.role == Role::Api && u.basic_auth)
        .map(|u| u.name.clone());
    let hash = match &account {
        Some(user) => state.store.password_hash(user).await?,
        None => None,
    };
    Ok(passwords::check(state, password, hash).await.map(|ok| account.filter(|_| ok)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ago(seconds: u64) -> Instant {
        Instant::now().checked_sub(Duration::from_secs(seconds)).unwrap_or_else(Instant::now)
    }

    #[test]
    fn a_credential_is_fresh_then_due_again_then_gone() {
        let cache = BasicCache::default();
        let now = Instant::now();
        assert_eq!(cache.lookup(b"tag", now), Cached::Miss);
        cache.remember(b"tag", "svc", ago(1));
        assert_eq!(cache.lookup(b"tag", now), Cached::Fresh("svc".into()));
        cache.remember(b"tag", "svc", ago(31));
        assert_eq!(cache.lookup(b"tag", now), Cached::Refresh("svc".into()), "verified again, still served");
        cache.remember(b"tag", "svc", ago(61));
        assert_eq!(cache.lookup(b"tag", now), Cached::Miss, "never served past its minute");
        assert_eq!(cache.lookup(b"other", now), Cached::Miss);
        cache.remember(b"tag", "svc", ago(1));
        cache.forget(b"tag");
        assert_eq!(cache.lookup(b"tag", now), Cached::Miss);
    }

    #[tokio::test]
    async fn one_verification_of_a_credential_at_a_time() {
        let cache = BasicCache::default();
        let taken = cache.claim(b"tag").expect("free");
        assert!(cache.claim(b"tag").is_none(), "a second background check waits for none");
        assert!(cache.claim(b"other").is_some(), "other credentials are their own");
        // A request that must verify inline waits for the background check.
        let turn = cache.turn(b"tag");
        assert!(turn.try_lock().is_err());
        drop(taken);
        assert!(turn.try_lock().is_ok());
        cache.done(b"tag");
        assert!(cache.claim(b"tag").is_some(), "free again once done");
    }

    /// The background check on a real gateway's state (embedded store): the
    /// entry is kept while the password holds, dropped once it changed, and
    /// the old password is then refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_due_credential_is_verified_again_in_the_background() {
        let dir = std::env::temp_dir().join(format!("pbxgate-basic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("policy.toml"),
            "domains = [\"localhost\"]\n[[route]]\npath = \"/\"\naccess = \"api\"\n\
             [[user]]\nname = \"svc\"\nrole = \"api\"\nbasic_auth = true\nnetworks = [\"127.0.0.1/32\"]\n",
        )
        .unwrap();
        let store = dir.join("store.db");
        let _ = std::fs::remove_file(&store);
        std::fs::write(
            dir.join("gateway.toml"),
            format!(
                "policy_file = \"policy.toml\"\n[listen]\nhttps = \"\"\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\
                 [store]\nurl = \"embedded://{}\"\n",
                store.display()
            ),
        )
        .unwrap();
        let config = crate::Config::load(&dir.join("gateway.toml")).unwrap();
        let state = crate::Gateway::bind(config).await.unwrap().state;
        let hash = |p: &str| passwords::hash(p.to_string());
        state.store.set_password_hash("svc", &hash("first secret 1").await.unwrap()).await.unwrap();
        let headers = |password: &str| {
            let mut headers = HeaderMap::new();
            let value = format!("Basic {}", STANDARD.encode(format!("svc:{password}")));
            headers.insert(AUTHORIZATION, value.parse().unwrap());
            headers
        };
        let client: IpAddr = [127, 0, 0, 1].into();
        let verifications =
            || state.metrics.password_verifications.load(std::sync::atomic::Ordering::Relaxed);
        let cache = &state.auth.basic;
        let tag = cache.tag("svc", "first secret 1");
        // Waits until no check of the credential is under way.
        let settled = || async {
            for _ in 0..500 {
                if cache.claim(&tag).is_some() {
                    cache.done(&tag);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("the background check never finished");
        };

        assert!(
            matches!(verify(&state, &headers("first secret 1"), client).await, Ok(Basic::Verified(u)) if u == "svc")
        );
        assert_eq!(verifications(), 1, "verified inline once");
        assert!(matches!(verify(&state, &headers("first secret 1"), client).await, Ok(Basic::Verified(_))));
        assert_eq!(verifications(), 1, "then served from the cache");

        // Half-way through its minute: served at once, verified again behind it.
        cache.remember(&tag, "svc", ago(31));
        assert!(matches!(verify(&state, &headers("first secret 1"), client).await, Ok(Basic::Verified(_))));
        settled().await;
        assert_eq!(verifications(), 2);
        assert_eq!(
            cache.lookup(&tag, Instant::now()),
            Cached::Fresh("svc".into()),
            "kept for another minute"
        );

        // The password changes: the next check drops the entry.
        state.store.set_password_hash("svc", &hash("second secret 2").await.unwrap()).await.unwrap();
        cache.remember(&tag, "svc", ago(31));
        assert!(
            matches!(verify(&state, &headers("first secret 1"), client).await, Ok(Basic::Verified(_))),
            "still inside its minute"
        );
        settled().await;
        assert_eq!(verifications(), 3);
        assert_eq!(cache.lookup(&tag, Instant::now()), Cached::Miss, "forgotten");
        assert!(matches!(verify(&state, &headers("first secret 1"), client).await, Ok(Basic::Refused)));
        assert!(matches!(verify(&state, &headers("second secret 2"), client).await, Ok(Basic::Verified(_))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
