//! The sign-in pages and JSON API under `/.pbxgate/`.
//!
//! Every POST checks `Origin` first. Answers never say whether an account
//! exists; details go to the audit log. Store errors fail closed (503).

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, LOCATION, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use pbxgate_policies::{decide_endpoint, Endpoint, Facts, Proof, User, Verdict};
use serde::Deserialize;
use webauthn_rs::prelude::{PublicKeyCredential, RegisterPublicKeyCredential};

use super::mail::LinkKind;
use super::passkeys::PasskeyError;
use super::{cookies, establish, identify, pages, passwords, record, regulate, safe_rd, Principal};
pub(crate) use crate::error::api_error;
use crate::error::{empty, json, respond, Refusal};
use crate::store::{now_ms, OneTime, Secret, StoreError};
use crate::ui::Lang;
use crate::{Body, State};

const MAX_BODY: usize = 64 * 1024;

/// What the pipeline knows about the request.
pub(crate) struct Ctx<'a> {
    pub client_ip: IpAddr,
    /// The request's host, validated: lower case, without port.
    pub host: &'a str,
    /// The request's own origin (its scheme and validated host and port):
    /// only ever compared with the configured ones.
    pub origin: String,
    pub user_agent: String,
    pub browser: bool,
    /// The language the request asked for (picked on the sign-in page, or
    /// its `Accept-Language`); a known person's own comes first.
    pub lang: Lang,
    /// Cookies the answer must carry whatever it is (a session renewed from
    /// a remember token on the way).
    pub set_cookies: std::sync::Mutex<Vec<HeaderValue>>,
    /// The signed-in person the answer was for, for the access line.
    pub user: std::sync::OnceLock<String>,
}

impl Ctx<'_> {
    fn keep_cookies(&self, cookies: Vec<HeaderValue>) {
        if !cookies.is_empty() {
            self.set_cookies.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(cookies);
        }
    }
}

/// The signed-in person, when the policy lets them use `endpoint` from
/// here; otherwise the answer to send (sign in, unlock, create a passkey
/// first, prove who you are again, or no). `here`: the path and query, to
/// come back to.
pub(crate) async fn authorized(
    state: &State,
    ctx: &Ctx<'_>,
    headers: &http::HeaderMap,
    endpoint: Endpoint,
    here: &str,
    page: bool,
) -> Result<Principal, Response<Body>> {
    let now = now_ms();
    let identity = identify(state, headers, ctx.client_ip, &ctx.user_agent, now)
        .await
        .map_err(|e| unavailable(&e, page))?;
    ctx.keep_cookies(identity.set_cookies);
    let verdict = {
        let policy = state.policy.load();
        let facts =
            Facts { client_ip: ctx.client_ip, host: ctx.host, method: "", path: here, user_agent: None };
        let person = identity.principal.as_ref().map(Principal::conditions);
        decide_endpoint(&policy, endpoint, &facts, person.as_ref(), now / 1000)
    };
    let rd = here.to_string();
    let refusal = match (verdict, identity.principal) {
        (Verdict::Allow, Some(principal)) => {
            let _ = ctx.user.set(principal.user().to_string());
            return Ok(principal);
        }
        (Verdict::Allow | Verdict::Login, _) => Refusal::LoginRequired { rd },
        (Verdict::StepUp { .. }, _) => Refusal::StepUpRequired { rd },
        (Verdict::PasskeyFirst, _) => Refusal::PasskeyRequired { rd },
        (Verdict::Reauthenticate, _) => Refusal::Reauthenticate,
        (Verdict::Deny(reason), p) => {
            tracing::warn!(target: "pbxgate::audit", user = p.as_ref().map_or("-", |p| p.user()),
                client = %ctx.client_ip, ?endpoint, reason = reason.as_str(), "refused");
            Refusal::Forbidden
        }
    };
    Err(respond(&refusal, page))
}

pub(crate) fn unavailable(e: &StoreError, browser: bool) -> Response<Body> {
    static STORE_DOWN: crate::telemetry::Repeated = crate::telemetry::Repeated::new();
    if let Some(skipped) = STORE_DOWN.due(now_ms()) {
        tracing::error!(error = %e, skipped, "store unavailable: refusing sign-in (fail closed)");
    }
    respond(&Refusal::Unavailable, browser)
}

fn too_many(state: &State, ctx: &Ctx<'_>, json_api: bool) -> Response<Body> {
    let key = "error.too_many_attempts";
    if json_api {
        api_error(StatusCode::TOO_MANY_REQUESTS, "too_many_attempts", key)
    } else {
        let view =
            pages::LoginView { rd: "/", login: "", error: Some(key), passwords: state.passwords_possible() };
        pages::login(&state.ui, ctx.lang, &view, StatusCode::TOO_MANY_REQUESTS)
    }
}

pub(crate) fn see_other(location: &str, cookies: Vec<HeaderValue>) -> Response<Body> {
    let mut response = empty(StatusCode::SEE_OTHER);
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, value);
    }
    for c in cookies {
        response.headers_mut().append(SET_COOKIE, c);
    }
    response
}

fn with_cookies(mut response: Response<Body>, cookies: Vec<HeaderValue>) -> Response<Body> {
    for c in cookies {
        response.headers_mut().append(SET_COOKIE, c);
    }
    response
}

/// The gateway's own requests carry a few hundred bytes of form or JSON: one
/// still arriving after this long is holding a connection, not uploading.
const BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// The request's body: `None` when it is over [`MAX_BODY`] (at once when its
/// `Content-Length` says so), broken off, or not all there by [`BODY_DEADLINE`].
pub(crate) async fn read_body(request: Request<Incoming>) -> Option<Bytes> {
    if hyper::body::Body::size_hint(request.body()).lower() > MAX_BODY as u64 {
        return None;
    }
    let reading = Limited::new(request.into_body(), MAX_BODY).collect();
    let deadline = std::time::Instant::now() + BODY_DEADLINE;
    crate::timer::timeout_at(deadline, reading).await?.ok().map(|c| c.to_bytes())
}

pub(crate) fn form(body: &[u8]) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (!k.is_empty()).then(|| (super::percent_decode(k), super::percent_decode(v)))
        })
        .collect()
}

fn query(request: &Request<Incoming>, name: &str) -> String {
    crate::reserved::query_param(request.uri().query(), name).unwrap_or_default()
}

/// Whether `login` may sign in with `proof` from `ip`: the policy's
/// decision, with the account's entry when it may.
fn may_sign_in(state: &State, login: &str, proof: Proof, ip: IpAddr) -> Result<User, &'static str> {
    let policy = state.policy.load();
    let facts = Facts { client_ip: ip, host: "", method: "POST", path: "/", user_agent: None };
    pbxgate_policies::sign_in(&policy, login, proof, &facts).cloned().map_err(|refusal| refusal.as_str())
}

pub(crate) async fn handle(
    state: &Arc<State>,
    ctx: &Ctx<'_>,
    request: Request<Incoming>,
    path: &str,
) -> Response<Body> {
    let method = request.method().clone();
    if method != Method::GET && method != Method::HEAD && method != Method::POST {
        return api_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "api.method_not_allowed");
    }
    // Every state-changing request: from one of the configured origins.
    let origin = match method {
        Method::POST => match super::checked_origin(&state.config, request.headers(), &ctx.origin) {
            Some(origin) => Some(origin.to_string()),
            None => {
                tracing::warn!(target: "pbxgate::audit", client = %ctx.client_ip, %path, "POST refused: foreign or missing Origin");
                return api_error(StatusCode::FORBIDDEN, "bad_origin", "api.bad_origin");
            }
        },
        _ => None,
    };
    if path.starts_with("/.pbxgate/unlock") || path.starts_with("/.pbxgate/api/unlock/") {
        return super::unlock::handle(state, ctx, request, path).await;
    }
    if path.starts_with("/.pbxgate/admin") || path.starts_with("/.pbxgate/api/admin/") {
        return super::admin::handle(state, ctx, request, path).await;
    }
    if let Some(origin) = origin {
        return post(state, ctx, request, path, &origin).await;
    }
    let (ui, lang) = (&*state.ui, ctx.lang);
    match path {
        "/.pbxgate/login" => {
            let rd = safe_rd(&query(&request, "rd"));
            // The language picker: the choice is remembered in this browser.
            let picked = crate::reserved::query_param(request.uri().query(), "lang")
                .and_then(|tag| Lang::from_tag(&tag));
            let lang = picked.unwrap_or(lang);
            let lang_cookie = picked.map(super::cookies::language).into_iter();
            match identify(state, request.headers(), ctx.client_ip, &ctx.user_agent, now_ms()).await {
                Ok(identity) if identity.principal.is_some() => {
                    see_other(&rd, identity.set_cookies.into_iter().chain(lang_cookie).collect())
                }
                Ok(identity) => {
                    let view = pages::LoginView {
                        rd: &rd,
                        login: "",
                        error: None,
                        passwords: state.passwords_possible(),
                    };
                    let cookies = identity.set_cookies.into_iter().chain(lang_cookie).collect();
                    with_cookies(pages::login(ui, lang, &view, StatusCode::OK), cookies)
                }
                Err(e) => unavailable(&e, true),
            }
        }
        "/.pbxgate/link" => pages::link_landing(ui, lang, &query(&request, "token")),
        "/.pbxgate/logout" => pages::logout_form(ui, lang),
        "/.pbxgate/passkey-offer" | "/.pbxgate/account" => {
            let here = path.to_string();
            let principal =
                match authorized(state, ctx, request.headers(), Endpoint::Account, &here, true).await {
                    Ok(p) => p,
                    Err(answer) => return answer,
                };
            let lang = state.lang_of(principal.user(), lang);
            if here == "/.pbxgate/passkey-offer" {
                let required = principal.record.must_register_passkey;
                return pages::passkey_offer(ui, lang, &safe_rd(&query(&request, "rd")), required);
            }
            match account_view(state, &principal, lang).await {
                Ok(view) => pages::account(ui, lang, &view),
                Err(e) => unavailable(&e, true),
            }
        }
        "/.well-known/pbxgate/jwks.json" => match &state.auth.signer {
            Some(signer) => json(StatusCode::OK, signer.jwks()),
            None => respond(&Refusal::NotFound, false),
        },
        "/.pbxgate/api/passkeys" | "/.pbxgate/api/sessions" | "/.pbxgate/api/me" => {
            let principal =
                match authorized(state, ctx, request.headers(), Endpoint::Account, path, false).await {
                    Ok(p) => p,
                    Err(answer) => return answer,
                };
            match account_json(state, &principal, path).await {
                Ok(body) => json(StatusCode::OK, &body.to_string()),
                Err(e) => unavailable(&e, false),
            }
        }
        _ => respond(&Refusal::NotFound, ctx.browser),
    }
}

async fn account_view(state: &State, p: &Principal, lang: Lang) -> Result<pages::AccountView, StoreError> {
    let now = now_ms();
    let when = |ms| crate::ui::i18n::when(lang, ms);
    let passkeys = state
        .store
        .passkeys_of(p.user())
        .await?
        .into_iter()
        .map(|k| pages::PasskeyItem {
            id: k.cred_id,
            name: k.name,
            created: when(Some(k.created_ms)),
            used: when(k.last_used_ms),
        })
        .collect();
    let sessions = state
        .store
        .sessions_of(p.user(), now)
        .await?
        .into_iter()
        .map(|(hash, s)| pages::SessionItem {
            current: hash == p.session,
            created: when(Some(s.created_ms)),
            seen: when(Some(s.last_seen_ms)),
            ip: s.ip,
        })
        .collect();
    Ok(pages::AccountView {
        user: p.user().to_string(),
        passkeys,
        sessions,
        notice: pages::Notice::default(),
    })
}

async fn account_json(state: &State, p: &Principal, path: &str) -> Result<serde_json::Value, StoreError> {
    let now = now_ms();
    Ok(match path {
        "/.pbxgate/api/passkeys" => serde_json::json!(state
            .store
            .passkeys_of(p.user())
            .await?
            .into_iter()
            .map(|k| serde_json::json!({"id": k.cred_id, "name": k.name, "created_ms": k.created_ms, "last_used_ms": k.last_used_ms}))
            .collect::<Vec<_>>()),
        "/.pbxgate/api/sessions" => serde_json::json!(state
            .store
            .sessions_of(p.user(), now)
            .await?
            .into_iter()
            .map(|(hash, s)| serde_json::json!({
                "current": hash == p.session, "created_ms": s.created_ms, "last_seen_ms": s.last_seen_ms,
                "ip": s.ip, "method": s.method,
            }))
            .collect::<Vec<_>>()),
        _ => {
            let policy = state.policy.load();
            let user = policy.user(p.user());
            serde_json::json!({
                "user": p.user(),
                "email": user.and_then(|u| u.email.clone()),
                "role": user.map(|u| u.role.as_str()),
                "passkeys": state.store.passkey_count(p.user()).await?,
            })
        }
    })
}

#[derive(Deserialize)]
struct LoginStart {
    #[serde(default)]
    login: Option<String>,
}

#[derive(Deserialize)]
struct LoginFinish {
    ceremony: String,
    credential: PublicKeyCredential,
    #[serde(default)]
    rd: String,
}

#[derive(Deserialize)]
struct RegisterFinish {
    ceremony: String,
    credential: RegisterPublicKeyCredential,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct PasskeyAction {
    id: String,
    #[serde(default)]
    name: String,
}

#[derive(Deserialize)]
struct Credentials {
    #[serde(default)]
    login: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    rd: String,
}

#[derive(Deserialize)]
struct NewPassword {
    password: String,
}

#[derive(Deserialize, Default)]
struct Logout {
    #[serde(default)]
    everywhere: bool,
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Option<T> {
    serde_json::from_slice(body).ok()
}

pub(crate) fn bad_request() -> Response<Body> {
    api_error(StatusCode::BAD_REQUEST, "bad_request", "error.bad_request")
}

async fn post(
    state: &Arc<State>,
    ctx: &Ctx<'_>,
    request: Request<Incoming>,
    path: &str,
    origin: &str,
) -> Response<Body> {
    let headers = request.headers().clone();
    let is_json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    let Some(body) = read_body(request).await else {
        return api_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "api.request_too_large");
    };
    let person = |endpoint| authorized(state, ctx, &headers, endpoint, path, false);
    match path {
        "/.pbxgate/login/link" | "/.pbxgate/api/link/request" => {
            let (login, rd) = if is_json {
                match parse::<Credentials>(&body) {
                    Some(c) => (c.login, c.rd),
                    None => return bad_request(),
                }
            } else {
                let f = form(&body);
                (f.get("login").cloned().unwrap_or_default(), f.get("rd").cloned().unwrap_or_default())
            };
            match request_link(state, ctx, origin, &login, &safe_rd(&rd)).await {
                Ok(true) if is_json => json(
                    StatusCode::OK,
                    &serde_json::json!({"status": "sent", "message": state.ui.text(ctx.lang, "link_sent.short", &[])})
                        .to_string(),
                ),
                Ok(true) => pages::link_sent(&state.ui, ctx.lang, state.config.links.ttl),
                Ok(false) => too_many(state, ctx, is_json),
                Err(e) => unavailable(&e, !is_json),
            }
        }
        "/.pbxgate/link" => {
            let token = form(&body).get("token").cloned().unwrap_or_default();
            consume_link(state, ctx, &token, &headers).await
        }
        "/.pbxgate/login/password" | "/.pbxgate/api/password/login" => {
            let creds = if is_json {
                match parse::<Credentials>(&body) {
                    Some(c) => c,
                    None => return bad_request(),
                }
            } else {
                let f = form(&body);
                Credentials {
                    login: f.get("login").cloned().unwrap_or_default(),
                    password: f.get("password").cloned().unwrap_or_default(),
                    rd: f.get("rd").cloned().unwrap_or_default(),
                }
            };
            password_login(state, ctx, creds, is_json, &headers).await
        }
        "/.pbxgate/api/passkey/login/start" => {
            let Some(start) = parse::<LoginStart>(&body) else { return bad_request() };
            match regulate::attempt(&state.store, regulate::Kind::PasskeyStart, "", ctx.client_ip).await {
                Ok(true) => {}
                Ok(false) => return too_many(state, ctx, true),
                Err(e) => return unavailable(&e, false),
            }
            // A name typed first binds the ceremony to that account (whichever
            // passkey the device offers), and is never looked up here: the
            // answer is the same for every name.
            let expected = start.login.as_deref().map(str::trim).filter(|l| !l.is_empty()).map(|login| {
                let policy = state.policy.load();
                policy.user(login).map_or_else(|| regulate::account(&policy, login), |u| u.name.clone())
            });
            match state.auth.passkeys.start_login(&state.store, expected).await {
                Ok((ceremony, options)) => {
                    let mut answer = options;
                    answer["ceremony"] = ceremony.expose().into();
                    json(StatusCode::OK, &answer.to_string())
                }
                Err(PasskeyError::Store(e)) => unavailable(&e, false),
                Err(e) => {
                    tracing::warn!(error = %e, "passkey login could not start");
                    api_error(StatusCode::BAD_REQUEST, "passkey_failed", "api.passkey_start_failed")
                }
            }
        }
        "/.pbxgate/api/passkey/login/finish" => {
            let Some(finish) = parse::<LoginFinish>(&body) else { return bad_request() };
            passkey_login(state, ctx, finish, &headers).await
        }
        "/.pbxgate/api/passkey/register/start" | "/.pbxgate/api/passkey/register/finish" => {
            let principal = match person(Endpoint::PasskeyRegister).await {
                Ok(p) => p,
                Err(answer) => return answer,
            };
            if path.ends_with("/start") {
                let display = {
                    let policy = state.policy.load();
                    policy
                        .user(principal.user())
                        .and_then(|u| u.display_name.clone())
                        .unwrap_or_else(|| principal.user().to_string())
                };
                return match state
                    .auth
                    .passkeys
                    .start_registration(&state.store, principal.user(), &display)
                    .await
                {
                    Ok((ceremony, options)) => {
                        let mut answer = options;
                        answer["ceremony"] = ceremony.expose().into();
                        json(StatusCode::OK, &answer.to_string())
                    }
                    Err(e) => passkey_error(e),
                };
            }
            let Some(finish) = parse::<RegisterFinish>(&body) else { return bad_request() };
            let Some(ceremony) = Secret::parse(&finish.ceremony) else {
                return passkey_error(PasskeyError::Expired);
            };
            match state
                .auth
                .passkeys
                .finish_registration(
                    &state.store,
                    principal.user(),
                    &ceremony,
                    &finish.credential,
                    &finish.name,
                )
                .await
            {
                Ok(record) => {
                    if principal.record.must_register_passkey {
                        let met = state
                            .store
                            .update_session(&principal.session, now_ms(), |s| s.must_register_passkey = false)
                            .await;
                        let remember = match met {
                            Ok(true) => {
                                super::remember_now(state, &principal, ctx.client_ip, &ctx.user_agent).await
                            }
                            Ok(false) => Ok(None),
                            Err(e) => Err(e),
                        };
                        match remember {
                            Ok(cookie) => ctx.keep_cookies(cookie.into_iter().collect()),
                            Err(e) => return unavailable(&e, false),
                        }
                    }
                    if let Ok(mut flags) = state.store.flags(principal.user()).await {
                        if flags.onboarding_required {
                            flags.onboarding_required = false;
                            let _ = state.store.set_flags(principal.user(), &flags).await;
                        }
                    }
                    tracing::info!(target: "pbxgate::audit", user = %principal.user(), client = %ctx.client_ip,
                        passkey = %record.name, "passkey registered");
                    json(
                        StatusCode::OK,
                        &serde_json::json!({"id": record.cred_id, "name": record.name}).to_string(),
                    )
                }
                Err(e) => passkey_error(e),
            }
        }
        "/.pbxgate/api/passkeys/rename" | "/.pbxgate/api/passkeys/delete" => {
            let endpoint =
                if path.ends_with("/rename") { Endpoint::PasskeyRename } else { Endpoint::PasskeyDelete };
            let principal = match person(endpoint).await {
                Ok(p) => p,
                Err(answer) => return answer,
            };
            let Some(action) = parse::<PasskeyAction>(&body) else { return bad_request() };
            let done = if path.ends_with("/rename") {
                state.store.rename_passkey(principal.user(), &action.id, &action.name).await
            } else {
                state.store.delete_passkey(principal.user(), &action.id).await
            };
            match done {
                Ok(true) => {
                    tracing::info!(target: "pbxgate::audit", user = %principal.user(), client = %ctx.client_ip,
                        action = path.rsplit('/').next().unwrap_or(""), "passkey changed");
                    json(StatusCode::OK, "{\"status\":\"ok\"}")
                }
                Ok(false) => api_error(StatusCode::NOT_FOUND, "not_found", "api.no_such_passkey"),
                Err(e) => unavailable(&e, false),
            }
        }
        "/.pbxgate/api/password/set" => {
            let principal = match person(Endpoint::PasswordSet).await {
                Ok(p) => p,
                Err(answer) => return answer,
            };
            let allowed = state.config.passwords.users_may_set && {
                let policy = state.policy.load();
                policy.user(principal.user()).is_some_and(|u| u.password_login)
            };
            if !allowed {
                return api_error(StatusCode::FORBIDDEN, "not_allowed", "api.passwords_by_admin");
            }
            let Some(new) = parse::<NewPassword>(&body) else { return bad_request() };
            if let Err(weak) = passwords::check_new(&state.config.passwords, &new.password) {
                return weak.answer();
            }
            let hash = match passwords::hash(new.password).await {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(error = %e, "password hashing failed");
                    return respond(&Refusal::Unavailable, false);
                }
            };
            match state.store.set_password_hash(principal.user(), &hash).await {
                Ok(()) => {
                    tracing::info!(target: "pbxgate::audit", user = %principal.user(), client = %ctx.client_ip, "password changed by its owner");
                    json(StatusCode::OK, "{\"status\":\"ok\"}")
                }
                Err(e) => unavailable(&e, false),
            }
        }
        "/.pbxgate/logout" | "/.pbxgate/api/logout" => {
            let everywhere = if is_json {
                parse::<Logout>(&body).unwrap_or_default().everywhere
            } else {
                form(&body).get("everywhere").is_some_and(|v| !v.is_empty() && v != "0")
            };
            logout(state, ctx, &headers, everywhere, is_json).await
        }
        _ => respond(&Refusal::NotFound, !is_json && ctx.browser),
    }
}

fn passkey_error(e: PasskeyError) -> Response<Body> {
    match e {
        PasskeyError::Store(e) => unavailable(&e, false),
        PasskeyError::Expired => {
            api_error(StatusCode::BAD_REQUEST, "ceremony_expired", "api.ceremony_expired")
        }
        PasskeyError::Duplicate => api_error(StatusCode::CONFLICT, "duplicate", "api.duplicate_passkey"),
        PasskeyError::TooMany => {
            api_error(StatusCode::CONFLICT, "too_many_passkeys", "api.too_many_passkeys")
        }
        PasskeyError::Rejected(detail) | PasskeyError::Refused { detail, .. } => {
            tracing::info!(%detail, "passkey registration rejected");
            api_error(StatusCode::BAD_REQUEST, "passkey_failed", "api.passkey_rejected")
        }
    }
}

/// Starts a sign-in link for `login` in the background and answers at once,
/// the same for every login. Ok(false): regulated.
async fn request_link(
    state: &Arc<State>,
    ctx: &Ctx<'_>,
    origin: &str,
    login: &str,
    rd: &str,
) -> Result<bool, StoreError> {
    let login = login.trim().to_string();
    let account = regulate::account(&state.policy.load(), &login);
    if !regulate::attempt(&state.store, regulate::Kind::LinkRequest, &account, ctx.client_ip).await? {
        tracing::warn!(target: "pbxgate::audit", client = %ctx.client_ip, "link request regulated");
        return Ok(false);
    }
    let (state, origin, rd, ip) = (state.clone(), origin.to_string(), rd.to_string(), ctx.client_ip);
    // Whether the account exists must not show in the answer nor in its timing.
    tokio::spawn(async move {
        let user = match may_sign_in(&state, &login, Proof::Link, ip) {
            Ok(user) => user,
            Err(reason) => {
                tracing::info!(target: "pbxgate::audit", client = %ip, reason, "sign-in link not sent");
                return;
            }
        };
        if let Err(e) = send_link(&state, &user, LinkKind::SignIn, &origin, &rd).await {
            tracing::warn!(user = %user.name, error = %e, "sign-in link not sent");
        }
    });
    Ok(true)
}

/// Makes a one-time link for `user` and emails it.
pub(crate) async fn send_link(
    state: &State,
    user: &User,
    kind: LinkKind,
    origin: &str,
    rd: &str,
) -> Result<(), String> {
    super::mail_link(&state.store, &state.auth.mailer, &state.config, user, kind, origin, rd).await?;
    state.metrics.links_sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

async fn consume_link(
    state: &State,
    ctx: &Ctx<'_>,
    token: &str,
    headers: &http::HeaderMap,
) -> Response<Body> {
    let (ui, lang) = (&*state.ui, ctx.lang);
    match regulate::attempt(&state.store, regulate::Kind::Failure, "", ctx.client_ip).await {
        Ok(true) => {}
        Ok(false) => return too_many(state, ctx, false),
        Err(e) => return unavailable(&e, true),
    }
    let Some(token) = Secret::parse(token) else {
        return pages::link_failed(ui, lang);
    };
    let mut value = None;
    for kind in [OneTime::MagicLink, OneTime::Invite] {
        match state.store.take_once(kind, &token).await {
            Ok(Some(v)) => {
                value = Some((kind, v));
                break;
            }
            Ok(None) => {}
            Err(e) => return unavailable(&e, true),
        }
    }
    let Some((kind, value)) = value else {
        tracing::info!(target: "pbxgate::audit", client = %ctx.client_ip, link = token.hash().short_id(), "expired or used link");
        return pages::link_failed(ui, lang);
    };
    let value: serde_json::Value = serde_json::from_slice(&value).unwrap_or_default();
    let login = value["user"].as_str().unwrap_or_default().to_string();
    let rd = safe_rd(value["rd"].as_str().unwrap_or("/"));
    let method = if kind == OneTime::Invite { "invite" } else { "link" };
    let user = match may_sign_in(state, &login, Proof::Link, ctx.client_ip) {
        Ok(user) => user,
        Err(reason) => {
            tracing::warn!(target: "pbxgate::audit", user = %login, client = %ctx.client_ip, reason, "link sign-in refused");
            record(state, &login, method, reason, ctx.client_ip, &ctx.user_agent).await;
            return pages::link_failed(ui, lang);
        }
    };
    let previous = cookies::read(headers, cookies::SESSION);
    let cookies =
        match establish(state, &user.name, method, ctx.client_ip, &ctx.user_agent, previous.as_ref()).await {
            Ok(c) => c,
            Err(e) => return unavailable(&e, true),
        };
    let next = match state.store.passkey_count(&user.name).await {
        Ok(0) => format!("/.pbxgate/passkey-offer?rd={}", crate::error::encode_rd(&rd)),
        _ => rd,
    };
    see_other(&next, cookies)
}

async fn password_login(
    state: &State,
    ctx: &Ctx<'_>,
    creds: Credentials,
    is_json: bool,
    headers: &http::HeaderMap,
) -> Response<Body> {
    let login = creds.login.trim().to_string();
    let rd = safe_rd(&creds.rd);
    let account = regulate::account(&state.policy.load(), &login);
    match regulate::attempt(&state.store, regulate::Kind::Failure, &account, ctx.client_ip).await {
        Ok(true) => {}
        Ok(false) => return too_many(state, ctx, is_json),
        Err(e) => return unavailable(&e, !is_json),
    }
    let candidate = may_sign_in(state, &login, Proof::Password, ctx.client_ip).ok();
    let empty_refused = creds.password.is_empty() && !state.config.passwords.allow_empty;
    let hash = match &candidate {
        Some(user) if !empty_refused => match state.store.password_hash(&user.name).await {
            Ok(h) => h,
            Err(e) => return unavailable(&e, !is_json),
        },
        _ => None,
    };
    // Always one argon2 verification, so time tells nothing about the account.
    let verified = match passwords::check(state, creds.password.clone(), hash).await {
        Ok(verified) => verified,
        Err(passwords::Busy) => return respond(&Refusal::Busy, !is_json && ctx.browser),
    };
    // A one-time admin password (bootstrap) works once, for an admin, from
    // the admin's networks, whether or not password sign-in is on.
    let (candidate, verified, method) = if verified {
        (candidate, true, "password")
    } else {
        match may_sign_in(state, &login, Proof::OneTimePassword, ctx.client_ip) {
            Ok(admin) => match super::take_bootstrap(state, &admin.name, &creds.password).await {
                Ok(true) => (Some(admin), true, "one_time_password"),
                Ok(false) => (candidate, false, "password"),
                Err(e) => return unavailable(&e, !is_json),
            },
            _ => (candidate, false, "password"),
        }
    };
    let Some(user) = candidate.filter(|_| verified) else {
        let known = state.policy.load().user(&login).map(|u| u.name.clone());
        if let Some(name) = known {
            record(state, &name, "password", "bad_credentials", ctx.client_ip, &ctx.user_agent).await;
        }
        tracing::info!(target: "pbxgate::audit", client = %ctx.client_ip, "password sign-in failed");
        let key = "login.bad_credentials";
        return if is_json {
            api_error(StatusCode::UNAUTHORIZED, "bad_credentials", key)
        } else {
            let view = pages::LoginView { rd: &rd, login: &login, error: Some(key), passwords: true };
            pages::login(&state.ui, ctx.lang, &view, StatusCode::UNAUTHORIZED)
        };
    };
    let previous = cookies::read(headers, cookies::SESSION);
    match establish(state, &user.name, method, ctx.client_ip, &ctx.user_agent, previous.as_ref()).await {
        Ok(cookies) if is_json => {
            with_cookies(json(StatusCode::OK, &serde_json::json!({"redirect": rd}).to_string()), cookies)
        }
        Ok(cookies) => see_other(&rd, cookies),
        Err(e) => unavailable(&e, !is_json),
    }
}

async fn passkey_login(
    state: &State,
    ctx: &Ctx<'_>,
    finish: LoginFinish,
    headers: &http::HeaderMap,
) -> Response<Body> {
    match regulate::attempt(&state.store, regulate::Kind::Failure, "", ctx.client_ip).await {
        Ok(true) => {}
        Ok(false) => return too_many(state, ctx, true),
        Err(e) => return unavailable(&e, false),
    }
    let failed = |detail: String| async move {
        tracing::info!(target: "pbxgate::audit", client = %ctx.client_ip, %detail, "passkey sign-in failed");
        state.metrics.login("passkey", false);
        api_error(StatusCode::UNAUTHORIZED, "passkey_failed", "api.passkey_login_failed")
    };
    let Some(ceremony) = Secret::parse(&finish.ceremony) else {
        return failed("malformed ceremony id".into()).await;
    };
    let signed_in = match state.auth.passkeys.finish_login(&state.store, &ceremony, &finish.credential).await
    {
        Ok(s) => s,
        Err(PasskeyError::Store(e)) => return unavailable(&e, false),
        Err(PasskeyError::Refused { user, detail }) => {
            // The account is known once the passkey named it: counted there too.
            let account = regulate::account(&state.policy.load(), &user);
            let _ = regulate::failed_for(&state.store, &account).await;
            record(state, &user, "passkey", "refused", ctx.client_ip, &ctx.user_agent).await;
            tracing::info!(target: "pbxgate::audit", %user, client = %ctx.client_ip, %detail, "passkey refused");
            return failed(detail).await;
        }
        Err(e) => return failed(e.to_string()).await,
    };
    let account = regulate::account(&state.policy.load(), &signed_in.user);
    match regulate::account_locked(&state.store, &account).await {
        Ok(false) => {}
        Ok(true) => return too_many(state, ctx, true),
        Err(e) => return unavailable(&e, false),
    }
    let user = match may_sign_in(state, &signed_in.user, Proof::Passkey, ctx.client_ip) {
        Ok(user) => user,
        Err(reason) => {
            record(state, &signed_in.user, "passkey", reason, ctx.client_ip, &ctx.user_agent).await;
            return failed(format!("refused: {reason}")).await;
        }
    };
    let previous = cookies::read(headers, cookies::SESSION);
    match establish(state, &user.name, "passkey", ctx.client_ip, &ctx.user_agent, previous.as_ref()).await {
        Ok(cookies) => with_cookies(
            json(StatusCode::OK, &serde_json::json!({"redirect": safe_rd(&finish.rd)}).to_string()),
            cookies,
        ),
        Err(e) => unavailable(&e, false),
    }
}

async fn logout(
    state: &State,
    ctx: &Ctx<'_>,
    headers: &http::HeaderMap,
    everywhere: bool,
    is_json: bool,
) -> Response<Body> {
    let now = now_ms();
    let result: Result<(), StoreError> = async {
        let session = cookies::read(headers, cookies::SESSION).map(|s| s.hash());
        let token = match cookies::read(headers, cookies::REMEMBER) {
            Some(token) => state.store.token(&token.hash(), now).await?,
            None => None,
        };
        // The person is who the session says, or, once it has ended (idle),
        // who the remember token says: "everywhere" must not depend on it.
        let user = match &session {
            Some(hash) => state.store.session(hash, now).await?.map(|s| s.user),
            None => None,
        }
        .or_else(|| token.as_ref().map(|t| t.user.clone()));
        // Tokens first, then sessions: a request renewing from a token
        // meanwhile either finds it revoked or made a session ended below
        // (it checks the token again once its session exists).
        if let Some(t) = &token {
            state.store.revoke_token(&t.id).await?;
        }
        if let Some(hash) = &session {
            state.auth.sockets.close(hash);
            state.store.delete_session(hash).await?;
        }
        if let (true, Some(user)) = (everywhere, &user) {
            let (sessions, tokens) = super::sign_out_everywhere(state, user, now).await?;
            tracing::info!(target: "pbxgate::audit", %user, client = %ctx.client_ip, sessions, tokens, "signed out everywhere");
        } else if let Some(user) = &user {
            tracing::info!(target: "pbxgate::audit", %user, client = %ctx.client_ip, "signed out");
        }
        Ok(())
    }
    .await;
    if let Err(e) = result {
        return unavailable(&e, !is_json);
    }
    let clear = vec![cookies::clear(cookies::SESSION), cookies::clear(cookies::REMEMBER)];
    if is_json {
        with_cookies(json(StatusCode::OK, "{\"redirect\":\"/.pbxgate/login\"}"), clear)
    } else {
        with_cookies(pages::logged_out(&state.ui, ctx.lang, everywhere), clear)
    }
}
