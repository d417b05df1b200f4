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

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::{HeaderMap, HeaderValue};

use crate::store::{now_ms, Conditions, HistoryEvent, Secret, SecretHash, Session, StoreError, UserFlags};
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

    /// The person as the policy sees them: with what their session says of
    /// how and when they proved who they are, and what is still required.
    pub fn conditions(&self) -> pbxgate_policies::Principal<'_> {
        let r = &self.record;
        pbxgate_policies::Principal {
            name: &r.user,
            unlocked: &r.unlocked,
            passkey_pending: r.must_register_passkey,
            authenticated_at: (r.authenticated_ms > 0).then_some(r.authenticated_ms / 1000),
        }
    }
}

/// The outcome of looking at a request's cookies.
#[derive(Debug, Default)]
pub struct Identity {
    pub principal: Option<Principal>,
    /// Cookies to set on the response (a session made from a remember token).
    pub set_cookies: Vec<HeaderValue>,
}

/// Requests of one browser that arrive together with only a remember token
/// share the session the first of them made, for this long.
const RENEWAL_SHARED_MS: u64 = 10_000;

/// The session each remember token made last, briefly (see
/// [`RENEWAL_SHARED_MS`]), and one renewal per token at a time.
#[derive(Default)]
pub struct Renewals(Mutex<HashMap<SecretHash, Arc<RenewalSlot>>>);

/// A token's last renewal: the session secret it made, and when.
type RenewalSlot = tokio::sync::Mutex<Option<(Secret, u64)>>;

impl Renewals {
    fn slot(&self, token: &SecretHash, now: u64) -> Arc<RenewalSlot> {
        let mut slots = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        // Only renewals under way or just made are kept.
        slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot
                    .try_lock()
                    .is_ok_and(|s| s.as_ref().is_some_and(|(_, at)| now < at + RENEWAL_SHARED_MS))
        });
        slots.entry(*token).or_default().clone()
    }
}

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

/// A new session from a remember token, when it is still good. The session
/// carries what is still required of the person and is no fresh sign-in.
/// Bounded: one renewal per token at a time, shared by the requests that
/// arrive together; the token's previous session ends; a token renewing
/// faster than a browser would is refused for a while.
async fn remembered(
    state: &State,
    remember: Secret,
    client_ip: IpAddr,
    user_agent: &str,
    now: u64,
) -> Result<Identity, StoreError> {
    let token_hash = remember.hash();
    let s = &state.config.session;
    let slot = state.auth.renewals.slot(&token_hash, now);
    let mut last = slot.lock().await;
    if let Some((secret, _)) = last.as_ref().filter(|(_, at)| now < at + RENEWAL_SHARED_MS) {
        let hash = secret.hash();
        let token_good = state.store.token(&token_hash, now).await?.is_some();
        if let (true, Some(record)) = (token_good, state.store.current_session(&hash, now).await?) {
            let set_cookies = vec![cookies::set(cookies::SESSION, secret, s.max_lifetime)];
            return Ok(Identity { principal: Some(Principal { session: hash, record }), set_cookies });
        }
    }
    let gone = || Identity { principal: None, set_cookies: vec![cookies::clear(cookies::REMEMBER)] };
    let Some(token) = state.store.token(&token_hash, now).await? else {
        return Ok(gone());
    };
    let user = {
        let policy = state.policy.load();
        let facts =
            pbxgate_policies::Facts { client_ip, host: "", method: "GET", path: "/", user_agent: None };
        match pbxgate_policies::sign_in(&policy, &token.user, pbxgate_policies::Proof::Remembered, &facts) {
            Ok(user) => user.name.clone(),
            Err(_) => return Ok(Identity::default()),
        }
    };
    let ip = client_ip.to_string();
    if !regulate::attempt(&state.store, regulate::Kind::Renewal, &token_hash.hex(), client_ip).await? {
        tracing::warn!(target: "pbxgate::audit", %user, client = %ip, token = token_hash.short_id(),
            "remember token refused: too many new sessions from it");
        return Ok(Identity::default());
    }
    let conditions =
        Conditions { fresh: false, passkey_pending: passkey_pending(state, &user, false).await? };
    let (secret, record) = state
        .store
        .start_session(&user, &ip, "remember", conditions, s.idle_timeout, s.max_lifetime, now)
        .await?;
    let hash = secret.hash();
    // The token is checked again now that the session exists: a sign-out
    // that revoked it meanwhile either sees this session or is seen here.
    if !state.store.record_token_use(&token_hash, &ip, user_agent, &hash, now).await? {
        state.store.delete_session(&hash).await?;
        return Ok(gone());
    }
    if let Some(previous) = token.session.as_deref().and_then(SecretHash::from_hex) {
        state.store.delete_session(&previous).await?;
    }
    state.metrics.login("remember", true);
    tracing::info!(target: "pbxgate::audit", %user, client = %ip, token = token_hash.short_id(),
        session = hash.short_id(), "new session from remember token");
    let set_cookies = vec![cookies::set(cookies::SESSION, &secret, s.max_lifetime)];
    *last = Some((secret, now));
    Ok(Identity { principal: Some(Principal { session: hash, record: Arc::new(record) }), set_cookies })
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
    let pending = method != "passkey" && passkey_pending(state, user, method == "one_time_password").await?;
    let conditions = Conditions { fresh: true, passkey_pending: pending };
    let (session, _) =
        state.store.start_session(user, &ip, method, conditions, s.idle_timeout, s.max_lifetime, now).await?;
    let mut set = vec![cookies::set(cookies::SESSION, &session, s.max_lifetime)];
    // No remember token while something is still required of the person.
    if !pending && !s.login_token_ttl.is_zero() {
        let (token, _) = state
            .store
            .create_token_for(&session.hash(), user, &ip, user_agent, s.login_token_ttl, now)
            .await?;
        set.push(cookies::set(cookies::REMEMBER, &token, s.login_token_ttl));
    }
    let account = regulate::account(&state.policy.load(), user);
    regulate::succeeded(&state.store, &account).await?;
    let mut flags = state.store.flags(user).await?;
    flags.last_login_ms = Some(now);
    state.store.set_flags(user, &UserFlags { v: 1, ..flags }).await?;
    record(state, user, method, "success", client_ip, user_agent).await;
    tracing::info!(target: "pbxgate::audit", %user, %method, client = %ip, session = session.hash().short_id(), "signed in");
    Ok(set)
}

/// Ends every remember token and session of `user` and closes their
/// websockets: tokens first, so a renewal in flight either finds its token
/// gone or made a session that ends here. Returns (sessions, tokens).
pub(crate) async fn sign_out_everywhere(
    state: &State,
    user: &str,
    now: u64,
) -> Result<(u64, u64), StoreError> {
    let tokens = state.store.revoke_tokens_of(user, now).await?;
    for (hash, _) in state.store.sessions_of(user, now).await? {
        state.auth.sockets.close(&hash);
    }
    let sessions = state.store.delete_sessions_of(user).await?;
    Ok((sessions, tokens))
}

/// A remember token for a person whose last requirement was just met in a
/// session a real ceremony made (none is issued while one is pending).
pub(crate) async fn remember_now(
    state: &State,
    p: &Principal,
    client_ip: IpAddr,
    user_agent: &str,
) -> Result<Option<HeaderValue>, StoreError> {
    let ttl = state.config.session.login_token_ttl;
    if ttl.is_zero() || p.record.authenticated_ms == 0 {
        return Ok(None);
    }
    let (token, _) = state
        .store
        .create_token_for(&p.session, p.user(), &client_ip.to_string(), user_agent, ttl, now_ms())
        .await?;
    Ok(Some(cookies::set(cookies::REMEMBER, &token, ttl)))
}

/// Whether a person signed in without a passkey must create one before
/// anything else: enforced for the user or role (`require_passkey`), asked by
/// an admin (onboarding), or after a one-time admin password.
async fn passkey_pending(state: &State, user: &str, one_time_password: bool) -> Result<bool, StoreError> {
    let required = one_time_password
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
    if b.only_until_first_credential && admin_credential_exists(&config.policy, store).await? {
        tracing::info!("an admin credential exists: bootstrap.one_time_password_file is ignored");
        return Ok(());
    }
    let key = Secret::derive(&format!("{}\n{password}", user.name));
    store.put_once(crate::store::OneTime::AdminPassword, &key, user.name.as_bytes(), BOOTSTRAP_TTL).await?;
    tracing::warn!(target: "pbxgate::audit", user = %user.name, "one-time admin password armed: it works once, then a passkey must be created");
    Ok(())
}

const BOOTSTRAP_TTL: Duration = Duration::from_secs(7 * 86_400);

/// Whether any admin of the policy has a passkey or a password.
async fn admin_credential_exists(
    policy: &pbxgate_policies::Policy,
    store: &crate::store::Store,
) -> Result<bool, StoreError> {
    for admin in policy.users.iter().filter(|u| u.role == pbxgate_policies::Role::Admin) {
        if store.passkey_count(&admin.name).await? > 0 || store.password_hash(&admin.name).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Takes the one-time admin password, when `password` is it. The one from
/// `[bootstrap]` is for the first admin's first sign-in only: once any admin
/// has a credential it is refused (and used up), whenever it was armed. The
/// one an operator arms on the command line (`--admin-username`) is for
/// recovering a locked-out admin, and holds regardless.
pub(crate) async fn take_bootstrap(state: &State, user: &str, password: &str) -> Result<bool, StoreError> {
    let key = Secret::derive(&format!("{user}\n{password}"));
    if state.store.take_once(crate::store::OneTime::AdminPassword, &key).await?.is_none() {
        return Ok(false);
    }
    let policy = state.policy.load_full();
    let first_only = state.config.bootstrap.only_until_first_credential;
    if first_only && admin_credential_exists(&policy, &state.store).await? {
        tracing::warn!(target: "pbxgate::audit", %user,
            "one-time admin password refused: an admin credential exists (it is used up)");
        return Ok(false);
    }
    Ok(true)
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
    let lang =
        user.language.as_deref().and_then(crate::ui::Lang::from_tag).unwrap_or(config.ui.default_language);
    mailer.send_link(kind, email, &user.name, lang, &link, ttl).await?;
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

/// The configured origin a state-changing request comes from: `public_url`
/// or a `webauthn.origins` entry, as written in the configuration (never
/// the client's spelling). Nothing the client sends makes another origin
/// acceptable. Without a usable `Origin` (absent, or `null`, which browsers
/// send from pages with `Referrer-Policy: no-referrer`), only
/// `Sec-Fetch-Site: same-origin` passes (scripts cannot set it, cross-site
/// requests carry another value): then the configured origin the request
/// was made to (`own`: its scheme and validated host), else `public_url`.
pub(crate) fn checked_origin<'c>(
    config: &'c crate::Config,
    headers: &HeaderMap,
    own: &str,
) -> Option<&'c str> {
    let mut configured = std::iter::once(config.public_url.origin.as_str())
        .chain(config.webauthn.origins.iter().map(String::as_str));
    match headers.get(http::header::ORIGIN).and_then(|v| v.to_str().ok()).filter(|o| *o != "null") {
        Some(origin) => {
            let origin = origin.strip_suffix('/').unwrap_or(origin);
            configured.find(|c| c.eq_ignore_ascii_case(origin))
        }
        None => {
            let same_origin = headers.get("sec-fetch-site").is_some_and(|v| v.as_bytes() == b"same-origin");
            same_origin.then(|| {
                configured.find(|c| c.eq_ignore_ascii_case(own)).unwrap_or(&config.public_url.origin)
            })
        }
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
