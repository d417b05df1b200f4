//! HTTP Basic for API accounts (role `api`, `basic_auth = true`, limited to
//! networks): verified against the account's argon2id hash, then remembered
//! for a minute under a keyed hash of the credentials, so a script's steady
//! stream of requests does not pay argon2 each time.

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

impl BasicCache {
    fn cached(&self, tag: &[u8], state: &State) -> Option<String> {
        let verified = self.verified.lock().ok()?;
        let (user, at) = verified.get(tag)?;
        (at.elapsed() < CACHE_TTL && state.policy.load().user(user).is_some_and(|u| u.basic_auth))
            .then(|| user.clone())
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
    state: &State,
    headers: &HeaderMap,
    client_ip: IpAddr,
) -> Result<Basic, StoreError> {
    let Some((login, password)) = credentials(headers) else {
        return Ok(Basic::Absent);
    };
    let cache = &state.auth.basic;
    let tag = hmac::sign(&cache.key, format!("{login}\0{password}").as_bytes()).as_ref().to_vec();
    if let Some(user) = cache.cached(&tag, state) {
        return Ok(Basic::Verified(user));
    }
    // Boxed: rare once verified, and its future would otherwise be part of
    // every request's.
    Box::pin(verify_in_turn(state, &login, password, client_ip, tag)).await
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
    if let Some(user) = cache.cached(&tag, state) {
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
    if regulate::is_locked(&state.store, regulate::Kind::Failure, login, client_ip).await? {
        return Ok(Basic::Regulated);
    }
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
    if !passwords::check(state, password, hash).await {
        regulate::count(&state.store, regulate::Kind::Failure, login, client_ip).await?;
        tracing::info!(target: "pbxgate::audit", client = %client_ip, "Basic credentials refused");
        return Ok(Basic::Refused);
    }
    let Some(user) = account else { return Ok(Basic::Refused) };
    if let Ok(mut verified) = cache.verified.lock() {
        if verified.len() >= CACHE_MAX {
            verified.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        verified.insert(tag.to_vec(), (user.clone(), Instant::now()));
    }
    Ok(Basic::Verified(user))
}
