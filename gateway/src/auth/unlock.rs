//! Unlock windows (step-up): sections with `step_up = "<max>"` stay locked
//! until the person re-verifies, for a window they choose up to that max. The
//! window ends on time, or earlier when they lock again.

use std::net::IpAddr;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use webauthn_rs::prelude::PublicKeyCredential;

use super::passkeys::PasskeyError;
use super::routes::{api_error, authorized, bad_request, form, parse, see_other, unavailable, Ctx};
use super::{pages, passwords, regulate, safe_rd, Principal};
use crate::error::{json, respond, Refusal};
use crate::store::{now_ms, Secret};
use crate::ui::i18n;
use crate::{Body, State};
use pbxgate_policies::Endpoint;

const CHOICES_MIN: [u64; 8] = [5, 15, 30, 60, 120, 240, 480, 1440];

/// What unlocking for `rd` opens (the route it falls under, or the admin
/// pages) and the longest window that allows.
fn scope_for(state: &State, rd: &str) -> (String, Duration) {
    let path = rd.split('?').next().unwrap_or("/");
    let path = pbxgate_policies::normalize_path(path).map_or_else(|_| "/".to_string(), |p| p.into_owned());
    let policy = state.policy.load();
    let (scope, max) = pbxgate_policies::unlock_scope(&policy, &path);
    (scope.to_string(), max)
}

fn choices(max: Duration) -> Vec<u64> {
    let max_min = (max.as_secs() / 60).max(1);
    let mut out: Vec<u64> = CHOICES_MIN.iter().copied().filter(|m| *m < max_min).collect();
    out.push(max_min);
    out
}

#[derive(Serialize)]
struct Choice {
    minutes: u64,
    label: String,
    selected: bool,
}

#[derive(Serialize)]
struct UnlockView<'a> {
    rd: &'a str,
    unlocked_until: Option<String>,
    choices: Vec<Choice>,
    password: bool,
    #[serde(flatten)]
    notice: pages::Notice,
}

/// The unlock page; `error`: a message key.
pub(crate) fn page(
    state: &State,
    ctx: &Ctx<'_>,
    p: &Principal,
    rd: &str,
    error: Option<&str>,
) -> Response<Body> {
    let lang = state.lang_of(p.user(), ctx.lang);
    let (scope, max) = scope_for(state, rd);
    let now = now_ms() / 1000;
    let unlocked_until = p
        .record
        .unlocked
        .iter()
        .find(|(s, until)| *s == scope && *until > now)
        .map(|(_, until)| i18n::when(lang, Some(until * 1000)));
    let choices = choices(max)
        .into_iter()
        .map(|m| Choice {
            minutes: m,
            label: i18n::duration(lang, Duration::from_secs(m * 60)),
            selected: m == 5,
        })
        .collect();
    let view = UnlockView {
        rd,
        unlocked_until,
        choices,
        password: password_allowed(state, p, ctx.client_ip),
        notice: error.map(|key| pages::Notice::error(state.ui.text(lang, key, &[]))).unwrap_or_default(),
    };
    let title = state.ui.text(lang, "unlock.title", &[]);
    state.ui.page(lang, StatusCode::OK, "unlock.html", "unlock", &title, &view)
}

/// Whether the policy lets this person prove who they are with a password, from here.
fn password_allowed(state: &State, p: &Principal, ip: IpAddr) -> bool {
    let policy = state.policy.load();
    let facts =
        pbxgate_policies::Facts { client_ip: ip, host: "", method: "POST", path: "/", user_agent: None };
    pbxgate_policies::sign_in(&policy, p.user(), pbxgate_policies::Proof::Password, &facts).is_ok()
}

#[derive(Deserialize)]
struct Finish {
    ceremony: String,
    credential: PublicKeyCredential,
    minutes: u64,
    #[serde(default)]
    rd: String,
}

/// Opens the window of the section behind `rd`, clamped to what that
/// section allows. Returns its end in Unix milliseconds.
async fn unlock_for(
    state: &State,
    p: &Principal,
    rd: &str,
    minutes: u64,
    how: &str,
    ip: IpAddr,
) -> Result<u64, Box<Response<Body>>> {
    let (scope, max) = scope_for(state, rd);
    let window = Duration::from_secs(minutes.clamp(1, 24 * 60) * 60).min(max);
    let now = now_ms();
    let until = now / 1000 + window.as_secs();
    match state.store.unlock(&p.session, &scope, until, now).await {
        Ok(true) => {
            tracing::info!(target: "pbxgate::audit", user = %p.user(), client = %ip, method = how, %scope,
                minutes = window.as_secs() / 60, "unlocked");
            super::record(state, p.user(), &format!("unlock:{how}"), "success", ip, "").await;
            Ok(until * 1000)
        }
        Ok(false) => Err(Box::new(respond(&Refusal::LoginRequired { rd: rd.to_string() }, false))),
        Err(e) => Err(Box::new(unavailable(&e, false))),
    }
}

pub(crate) async fn handle(
    state: &State,
    ctx: &Ctx<'_>,
    request: Request<Incoming>,
    path: &str,
) -> Response<Body> {
    let rd_query = crate::reserved::query_param(request.uri().query(), "rd").unwrap_or_default();
    let here = match request.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let navigating = ctx.browser && request.method() == http::Method::GET;
    let p = match authorized(state, ctx, request.headers(), Endpoint::Unlock, &here, navigating).await {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    if request.method() == http::Method::GET {
        return page(state, ctx, &p, &safe_rd(&rd_query), None);
    }
    let Some(body) = super::routes::read_body(request).await else {
        return bad_request();
    };
    match path {
        "/.pbxgate/api/unlock/start" => {
            let has_keys = state.store.passkey_count(p.user()).await.unwrap_or(0) > 0;
            if !has_keys {
                return api_error(StatusCode::BAD_REQUEST, "no_passkey", "api.no_passkey");
            }
            match regulate::attempt(&state.store, regulate::Kind::PasskeyStart, "", ctx.client_ip).await {
                Ok(true) => {}
                Ok(false) => return respond(&Refusal::TooManyAttempts, false),
                Err(e) => return unavailable(&e, false),
            }
            match state.auth.passkeys.start_for(&state.store, p.user()).await {
                Ok((ceremony, mut options)) => {
                    options["ceremony"] = ceremony.expose().into();
                    json(StatusCode::OK, &options.to_string())
                }
                Err(PasskeyError::Store(e)) => unavailable(&e, false),
                Err(_) => api_error(StatusCode::BAD_REQUEST, "passkey_failed", "api.passkey_start_failed"),
            }
        }
        "/.pbxgate/api/unlock/finish" => {
            let Some(finish) = parse::<Finish>(&body) else { return bad_request() };
            let Some(ceremony) = Secret::parse(&finish.ceremony) else { return bad_request() };
            let account = regulate::account(&state.policy.load(), p.user());
            match regulate::attempt(&state.store, regulate::Kind::Failure, &account, ctx.client_ip).await {
                Ok(true) => {}
                Ok(false) => return respond(&Refusal::TooManyAttempts, false),
                Err(e) => return unavailable(&e, false),
            }
            let failed =
                || api_error(StatusCode::UNAUTHORIZED, "passkey_failed", "api.passkey_unlock_failed");
            match state.auth.passkeys.finish_login(&state.store, &ceremony, &finish.credential).await {
                Ok(signed) if signed.user == p.user() => {
                    if let Err(e) = regulate::succeeded(&state.store, &account).await {
                        return unavailable(&e, false);
                    }
                    let rd = safe_rd(&finish.rd);
                    match unlock_for(state, &p, &rd, finish.minutes, "passkey", ctx.client_ip).await {
                        Ok(until) => json(
                            StatusCode::OK,
                            &serde_json::json!({"redirect": rd, "until_ms": until}).to_string(),
                        ),
                        Err(r) => *r,
                    }
                }
                Ok(signed) => {
                    tracing::warn!(target: "pbxgate::audit", user = %p.user(), other = %signed.user, client = %ctx.client_ip,
                        "unlock refused: another account's passkey");
                    failed()
                }
                Err(PasskeyError::Store(e)) => unavailable(&e, false),
                Err(_) => failed(),
            }
        }
        "/.pbxgate/unlock/password" => {
            let f = form(&body);
            let rd = safe_rd(f.get("rd").map_or("/", String::as_str));
            let minutes = f.get("minutes").and_then(|m| m.parse().ok()).unwrap_or(5);
            let allowed = password_allowed(state, &p, ctx.client_ip);
            let account = regulate::account(&state.policy.load(), p.user());
            match regulate::attempt(&state.store, regulate::Kind::Failure, &account, ctx.client_ip).await {
                Ok(true) => {}
                Ok(false) => return page(state, ctx, &p, &rd, Some("error.too_many_attempts")),
                Err(e) => return unavailable(&e, true),
            }
            let hash = if allowed { state.store.password_hash(p.user()).await.ok().flatten() } else { None };
            let password = f.get("password").cloned().unwrap_or_default();
            let verified = match passwords::check(state, password, hash).await {
                Ok(verified) => verified,
                Err(passwords::Busy) => return respond(&Refusal::Busy, true),
            };
            if !verified {
                super::record(
                    state,
                    p.user(),
                    "unlock:password",
                    "bad_credentials",
                    ctx.client_ip,
                    &ctx.user_agent,
                )
                .await;
                return page(state, ctx, &p, &rd, Some("unlock.bad_password"));
            }
            if let Err(e) = regulate::succeeded(&state.store, &account).await {
                return unavailable(&e, true);
            }
            match unlock_for(state, &p, &rd, minutes, "password", ctx.client_ip).await {
                Ok(_) => see_other(&rd, Vec::new()),
                Err(r) => *r,
            }
        }
        "/.pbxgate/unlock/end" | "/.pbxgate/api/unlock/end" => {
            if let Err(e) = state.store.lock(&p.session, now_ms()).await {
                return unavailable(&e, ctx.browser);
            }
            tracing::info!(target: "pbxgate::audit", user = %p.user(), client = %ctx.client_ip, "locked again");
            if path.starts_with("/.pbxgate/api/") {
                json(StatusCode::OK, "{\"status\":\"locked\"}")
            } else {
                see_other("/.pbxgate/account", Vec::new())
            }
        }
        _ => respond(&Refusal::NotFound, ctx.browser),
    }
}
