//! Who is asking: sessions and remember tokens, and the ways in (passkeys,
//! emailed links, passwords where allowed), with the pages and JSON API under
//! `/.pbxgate/`.

pub(crate) mod admin;
pub mod assertion;
pub mod basic;
pub mod cookies;
pub mod mail;
pub mod pages;
pub mod passkeys;
pub mod passwords;
pub mod regulate;
pub(crate) mod routes;
pub mod sockets;
pub(crate) mod unlock;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::store::{now_ms, HistoryEvent, Secret, SecretHash, Session, StoreError, UserFlags};
use crate::State;

/// A signed-in person, for this request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub session: SecretHash,
    pub record: Arc<Session>,
}

impl Principal {
    /// The user the session belongs to.
    pub fn user(&self) -> &str {
        &self.record.user
    }
}

/// The outcome of looking at a request's cookies.
#[derive(Debug, Default)]
pub struct Identity {
    pub principal: Option<Principal>,
    /// Cookies to set on the response (a session made from a remember token).
    pub set_cookies: Vec<HeaderValue>,
}

/// A session made within this long counts as a fresh sign-in (passkey
/// registration, password change).
pub const RECENT_AUTH: Duration = Duration::from_secs(5 * 60);

/// Session cookie first; else a remember token silently makes a new session.
/// A user the policy no longer names is nobody. Store errors propagate: the
/// caller fails closed. `now`: Unix milliseconds.
pub(crate) async fn identify(
    state: &State,
    headers: &HeaderMap,
    client_ip: IpAddr,
    user_agent: &str,
    now: u64,
) -> Result<Identity, StoreError> {
    identify_on(state, &state.policy.load(), headers, None, client_ip, user_agent, now).await
}

/// [`identify`] for a request of a connection that remembers the session
/// cookie it sent last (`last`), so a cookie sent again is not hashed again.
/// `policy`: the one the request is decided on.
pub(crate) async fn identify_on(
    state: &State,
    policy: &pbxgate_policies::Policy,
    headers: &HeaderMap,
    last: Option<&cookies::LastSession>,
    client_ip: IpAddr,
    user_agent: &str,
    now: u64,
) -> Result<Identity, StoreError> {
    if let Some(hash) = cookies::read_session_hash(headers, last) {
        if let Some(record) = state.store.current_session(&hash, now).await? {
            if policy.user(&record.user).is_some() {
                return Ok(Identity {
                    principal: Some(Principal { session: hash, record }),
                    set_cookies: Vec::new(),
                });
            }
        }
    }
    match cookies::read(headers, cookies::REMEMBER) {
        // Boxed: rare, and its future would otherwise be part of every request's.
        Some(remember) => Box::pin(remembered(state, remember, client_ip, user_agent, now)).await,
        None => Ok(Identity::default()),
    }
}

/// A new session from a remember token, when it is still good.
async fn remembered(
    state: &State,
    remember: Secret,
    client_ip: IpAddr,
    user_agent: &str,
    now: u64,
) -> Result<Identity, StoreError> {
    let token_hash = remember.hash();
    let Some(token) = state.store.token(&token_hash, now).await? else {
        return Ok(Identity { principal: None, set_cookies: vec![cookies::clear(cookies::REMEMBER)] });
    };
    let policy = state.policy.load();
    let Some(user) = policy.user(&token.user) else {
        return Ok(Identity::default());
    };
    if user.role == pbxgate_policies::Role::Api {
        return Ok(Identity::default());
    }
    let s = &state.config.session;
    let ip = client_ip.to_string();
    let (secret, record) =
        state.store.create_session(&user.name, &ip, "remember", s.idle_timeout, s.max_lifetime, now).await?;
    state.store.record_token_use(&token_hash, &ip, user_agent, now).await?;
    state.metrics.login("remember", true);
    tracing::info!(target: "pbxgate::audit", user = %user.name, client = %ip, token = token_hash.short_id(),
        "new session from remember token");
    Ok(Identity {
        principal: Some(Principal { session: secret.hash(), record: Arc::new(record) }),
        set_cookies: vec![cookies::set(cookies::SESSION, &secret, s.max_lifetime)],
    })
}

/// After a successful sign-in: a fresh session (never the old id) and a
/// remember token, recorded in the history. Returns the cookies to set.
pub(crate) async fn establish(
    state: &State,
    user: &str,
    method: &str,
    client_ip: IpAddr,
    user_agent: &str,
    previous: Option<&Secret>,
) -> Result<Vec<HeaderValue>, StoreError> {
    let now = now_ms();
    let s = &state.config.session;
    let ip = client_ip.to_string();
    if let Some(old) = previous {
        state.store.delete_session(&old.hash()).await?;
    }
    let (session, _) =
        state.store.create_session(user, &ip, method, s.idle_timeout, s.max_lifetime, now).await?;
    if method != "passkey" && must_register_passkey(state, user, method).await? {
        state.store.update_session(&session.hash(), now, |s| s.must_register_passkey = true).await?;
    }
    let mut set = vec![cookies::set(cookies::SESSION, &session, s.max_lifetime)];
    if !s.login_token_ttl.is_zero() {
        let (token, _) = state.store.create_token(user, &ip, user_agent, s.login_token_ttl, now).await?;
        set.push(cookies::set(cookies::REMEMBER, &token, s.login_token_ttl));
    }
    let mut flags = state.store.flags(user).await?;
    flags.last_login_ms = Some(now);
    state.store.set_flags(user, &UserFlags { v: 1, ..flags }).await?;
    record(state, user, method, "success", client_ip, user_agent).await;
    tracing::info!(target: "pbxgate::audit", %user, %method, client = %ip, session = session.hash().short_id(), "signed in");
    Ok(set)
}

/// Whether a person signing in without a passkey must create one before
/// anything else: enforced for the user or role (`require_passkey`), asked by
/// an admin (onboarding), or after a one-time admin password.
async fn must_register_passkey(state: &State, user: &str, method: &str) -> Result<bool, StoreError> {
    let required = method == "one_time_password"
        || {
            let policy = state.policy.load();
            policy.user(user).is_some_and(|u| policy.requires_passkey(u))
        }
        || state.store.flags(user).await?.onboarding_required;
    Ok(required && state.store.passkey_count(user).await? == 0)
}

/// Arms the one-time admin password (command line or
/// `bootstrap.one_time_password_file`). Only its hash is stored.
pub(crate) async fn arm_bootstrap(
    config: &crate::Config,
    store: &crate::store::Store,
) -> Result<(), crate::Error> {
    let b = &config.bootstrap;
    let (Some(admin), Some(password)) = (&b.admin, &b.one_time_password) else {
        return Ok(());
    };
    let Some(user) = config.policy.user(admin).filter(|u| u.role == pbxgate_policies::Role::Admin) else {
        return Err(crate::Error::Auth(format!("{admin} is not an admin in the policy file")));
    };
    if b.only_until_first_credential {
        for a in config.policy.users.iter().filter(|u| u.role == pbxgate_policies::Role::Admin) {
            if store.passkey_count(&a.name).await? > 0 || store.password_hash(&a.name).await?.is_some() {
                tracing::info!("an admin credential exists: bootstrap.one_time_password_file is ignored");
                return Ok(());
            }
        }
    }
    let key = Secret::derive(&format!("{}\n{password}", user.name));
    store.put_once(crate::store::OneTime::AdminPassword, &key, user.name.as_bytes(), BOOTSTRAP_TTL).await?;
    tracing::warn!(target: "pbxgate::audit", user = %user.name, "one-time admin password armed: it works once, then a passkey must be created");
    Ok(())
}

const BOOTSTRAP_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Takes the one-time admin password, when `password` is it.
pub(crate) async fn take_bootstrap(state: &State, user: &str, password: &str) -> Result<bool, StoreError> {
    let key = Secret::derive(&format!("{user}\n{password}"));
    Ok(state.store.take_once(crate::store::OneTime::AdminPassword, &key).await?.is_some())
}

/// Makes a one-time link (sign-in or invite) for `user`, stores only its
/// hash, and emails it.
pub async fn mail_link(
    store: &crate::store::Store,
    mailer: &mail::Mailer,
    config: &crate::Config,
    user: &pbxgate_policies::User,
    kind: mail::LinkKind,
    origin: &str,
    rd: &str,
) -> Result<(), String> {
    let Some(email) = &user.email else {
        return Err("the account has no email address".into());
    };
    let (one_time, ttl) = match kind {
        mail::LinkKind::SignIn => (crate::store::OneTime::MagicLink, config.links.ttl),
        mail::LinkKind::Invite => (crate::store::OneTime::Invite, config.links.invite_ttl),
    };
    let token = Secret::generate();
    let value = serde_json::json!({"user": user.name, "rd": rd}).to_string();
    store.put_once(one_time, &token, value.as_bytes(), ttl).await.map_err(|e| e.to_string())?;
    let link = format!("{origin}/.pbxgate/link?token={}", token.expose());
    mailer.send_link(kind, email, &user.name, &config.webauthn.rp_name, &link, ttl).await?;
    tracing::info!(target: "pbxgate::audit", user = %user.name, link = token.hash().short_id(), kind = ?kind, "link sent");
    Ok(())
}

/// Appends to the login history; a failure to record is logged, not fatal.
pub(crate) async fn record(
    state: &State,
    user: &str,
    method: &str,
    result: &str,
    ip: IpAddr,
    user_agent: &str,
) {
    state.metrics.login(method, result == "success");
    let event = HistoryEvent {
        v: 1,
        id: String::new(),
        user: user.to_string(),
        time_ms: now_ms(),
        method: method.to_string(),
        result: result.to_string(),
        ip: ip.to_string(),
        user_agent: user_agent.chars().take(256).collect(),
    };
    if let Err(e) = state.store.append_history(&event, state.config.history.retention, now_ms()).await {
        tracing::warn!(error = %e, "could not record login history");
    }
}

/// The origin a state-changing request comes from, when it is one of ours:
/// `public_url`, a `webauthn.origins` entry, or the request's own origin.
/// Without a usable `Origin` (absent, or `null`, which browsers send from
/// pages with `Referrer-Policy: no-referrer`), only `Sec-Fetch-Site:
/// same-origin` passes: scripts cannot set it, and cross-site requests carry
/// another value.
pub(crate) fn checked_origin(state: &State, headers: &HeaderMap, proto: &str, host: &str) -> Option<String> {
    let own = format!("{proto}://{host}");
    match headers.get(http::header::ORIGIN).and_then(|v| v.to_str().ok()).filter(|o| *o != "null") {
        Some(origin) => {
            let origin = origin.trim_end_matches('/');
            let allowed = origin == state.config.public_url.origin
                || state.config.webauthn.origins.iter().any(|o| o == origin)
                || origin.eq_ignore_ascii_case(&own);
            allowed.then(|| origin.to_string())
        }
        None => headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "same-origin")
            .then_some(own),
    }
}

/// The return path, when it is a same-origin relative path; otherwise `/`.
/// Refuses `//host`, `/\host`, schemes, control characters and the same
/// tricks percent-encoded (once or twice).
pub fn safe_rd(rd: &str) -> String {
    fn bad(text: &str) -> bool {
        !text.starts_with('/')
            || text.starts_with("//")
            || text.starts_with("/\\")
            || text.contains('\\')
            || text.chars().any(|c| c.is_control() || c == ' ')
    }
    let once = percent_decode(rd);
    let twice = percent_decode(&once);
    if rd.is_empty() || rd.len() > 2048 || bad(rd) || bad(&once) || bad(&twice) {
        return "/".to_string();
    }
    rd.to_string()
}

pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex =
            bytes.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok());
        match (bytes[i], hex) {
            (b'+', _) => out.push(b' '),
            (b'%', Some(v)) => {
                out.push(v);
                i += 2;
            }
            (b, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::safe_rd;

    #[test]
    fn return_paths() {
        for ok in ["/", "/admin/", "/calls?day=mon&x=%2F", "/.pbxgate/account"] {
            assert_eq!(safe_rd(ok), ok);
        }
        for bad in [
            "//evil.example",
            "/\\evil.example",
            "https://evil.example",
            "evil.example",
            "%2F%2Fevil.example",
            "/%5Cevil.example",
            "%252F%252Fevil.example",
            "/%252F%252Fevil.example",
            "/\tx",
            "",
        ] {
            assert_eq!(safe_rd(bad), "/", "{bad:?}");
        }
    }
}
