//! HTTP Basic for API accounts (role `api`, `basic_auth = true`, limited to
//! networks): verified against the account's argon2id hash, then remembered
//! for a minute under a keyed hash of the credentials, so a script's steady
//! stream of requests does not pay argon2 each time.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
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
}

impl Default for BasicCache {
    fn default() -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &crate::store::secret::random::<32>()),
            verified: Mutex::new(HashMap::new()),
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
    if let Ok(verified) = cache.verified.lock() {
        if let Some((user, at)) = verified.get(&tag) {
            if at.elapsed() < CACHE_TTL && state.policy.load().user(user).is_some_and(|u| u.basic_auth) {
                return Ok(Basic::Verified(user.clone()));
            }
        }
    }
    if regulate::is_locked(&state.store, regulate::Kind::Failure, &login, client_ip).await? {
        return Ok(Basic::Regulated);
    }
    let account = state
        .policy
        .load()
        .user(&login)
        .filter(|u| u.role == Role::Api && u.basic_auth)
        .map(|u| u.name.clone());
    let hash = match &account {
        Some(user) => state.store.password_hash(user).await?,
        None => None,
    };
    if !passwords::verify(password, hash, &state.auth.dummy_hash, &state.metrics.password_verifications).await
    {
        regulate::count(&state.store, regulate::Kind::Failure, &login, client_ip).await?;
        tracing::info!(target: "pbxgate::audit", client = %client_ip, "Basic credentials refused");
        return Ok(Basic::Refused);
    }
    let Some(user) = account else { return Ok(Basic::Refused) };
    if let Ok(mut verified) = cache.verified.lock() {
        if verified.len() >= CACHE_MAX {
            verified.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        verified.insert(tag, (user.clone(), Instant::now()));
    }
    Ok(Basic::Verified(user))
}
