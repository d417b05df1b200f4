//! The gateway's own admin pages and JSON API (`/.pbxgate/admin`,
//! `/.pbxgate/api/admin/`): what tokens, passkeys and sessions exist, with
//! revoke and reset, and the login history. Admins only, unlocked, and from
//! their allowed networks.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use super::routes::{
    api_error, authorized, bad_request, form, parse, read_body, see_other, unavailable, Ctx,
};
use super::Principal;
use crate::error::{encode_rd, json, respond, Refusal};
use crate::store::{now_ms, StoreError, UserFlags};
use crate::ui::{i18n, Lang};
use crate::{Body, State};
use pbxgate_policies::Endpoint;

pub(crate) async fn handle(
    state: &State,
    ctx: &Ctx<'_>,
    request: Request<Incoming>,
    path: &str,
) -> Response<Body> {
    let api = path.starts_with("/.pbxgate/api/");
    let here = match request.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let page = ctx.browser && !api;
    let admin = match authorized(state, ctx, request.headers(), Endpoint::Admin, &here, page).await {
        Ok(p) => p,
        Err(answer) => return answer,
    };
    let lang = state.lang_of(admin.user(), ctx.lang);
    let uri_query = request.uri().query().map(str::to_string);
    let query = |name: &str| crate::reserved::query_param(uri_query.as_deref(), name).unwrap_or_default();
    let result: Result<Response<Body>, StoreError> = async {
        Ok(match (request.method().clone(), path) {
            (http::Method::GET, "/.pbxgate/api/admin/users") => {
                json(StatusCode::OK, &users(state).await?.to_string())
            }
            (http::Method::GET, "/.pbxgate/api/admin/user") => {
                match user_detail(state, &query("name")).await? {
                    Some(v) => json(StatusCode::OK, &v.to_string()),
                    None => api_error(StatusCode::NOT_FOUND, "not_found", "api.no_such_user"),
                }
            }
            (http::Method::GET, "/.pbxgate/api/admin/history") => {
                let user = query("user");
                let limit = query("limit").parse().unwrap_or(200);
                json(
                    StatusCode::OK,
                    &history(state, Some(user.as_str()).filter(|u| !u.is_empty()), limit).await?.to_string(),
                )
            }
            (http::Method::GET, "/.pbxgate/admin") => users_page(state, lang).await?,
            (http::Method::GET, "/.pbxgate/admin/user") => user_page(state, lang, &query("name")).await?,
            (http::Method::GET, "/.pbxgate/admin/history") => {
                history_page(state, lang, &query("user")).await?
            }
            (http::Method::POST, "/.pbxgate/admin/action") => {
                let Some(body) = read_body(request).await else { return Ok(bad_request()) };
                let f = form(&body);
                let get = |k: &str| f.get(k).cloned().unwrap_or_default();
                let action = Action {
                    action: get("action"),
                    user: get("user"),
                    id: get("id"),
                    required: get("required") == "1",
                };
                act(state, &admin, ctx, &action).await?;
                see_other(&format!("/.pbxgate/admin/user?name={}", encode_rd(&action.user)), Vec::new())
            }
            (http::Method::POST, p) if p.starts_with("/.pbxgate/api/admin/") => {
                let Some(body) = read_body(request).await else { return Ok(bad_request()) };
                let Some(mut action) = parse::<Action>(&body) else { return Ok(bad_request()) };
                action.action = p.trim_start_matches("/.pbxgate/api/admin/").replace('/', "-");
                match act(state, &admin, ctx, &action).await? {
                    true => json(StatusCode::OK, "{\"status\":\"ok\"}"),
                    false => api_error(StatusCode::NOT_FOUND, "not_found", "api.nothing_to_do"),
                }
            }
            _ => respond(&Refusal::NotFound, ctx.browser && !api),
        })
    }
    .await;
    result.unwrap_or_else(|e| unavailable(&e, ctx.browser && !api))
}

#[derive(Deserialize, Default)]
struct Action {
    #[serde(default)]
    action: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    required: bool,
}

/// Carries out an admin action; false when there was nothing to act on.
async fn act(state: &State, admin: &Principal, ctx: &Ctx<'_>, a: &Action) -> Result<bool, StoreError> {
    let now = now_ms();
    let known = state.policy.load().user(&a.user).map(|u| u.name.clone());
    let done = match (a.action.as_str(), known) {
        ("tokens-revoke" | "revoke-token", _) => state.store.revoke_token(&a.id).await?.is_some(),
        ("sessions-revoke" | "revoke-sessions", Some(user)) => {
            super::sign_out_everywhere(state, &user, now).await?;
            true
        }
        ("passkeys-delete" | "delete-passkey", Some(user)) => {
            state.store.delete_passkey(&user, &a.id).await?
        }
        ("passkeys-reset" | "reset-passkeys", Some(user)) => {
            // A reset is for a lost or taken passkey: whatever it signed in ends too.
            state.store.delete_passkeys_of(&user).await?;
            super::sign_out_everywhere(state, &user, now).await?;
            let flags = state.store.flags(&user).await?;
            state.store.set_flags(&user, &UserFlags { onboarding_required: true, ..flags }).await?;
            true
        }
        ("onboarding" | "set-onboarding", Some(user)) => {
            let flags = state.store.flags(&user).await?;
            state.store.set_flags(&user, &UserFlags { onboarding_required: a.required, ..flags }).await?;
            true
        }
        _ => false,
    };
    tracing::info!(target: "pbxgate::audit", admin = %admin.user(), client = %ctx.client_ip, action = %a.action,
        user = %a.user, id = %a.id, done, "admin action");
    Ok(done)
}

async fn users(state: &State) -> Result<serde_json::Value, StoreError> {
    let policy = state.policy.load_full();
    let mut out = Vec::new();
    for u in &policy.users {
        let flags = state.store.flags(&u.name).await?;
        out.push(serde_json::json!({
            "name": u.name, "email": u.email, "display_name": u.display_name, "role": u.role.as_str(),
            "passkeys": state.store.passkey_count(&u.name).await?,
            "last_login_ms": flags.last_login_ms, "onboarding_required": flags.onboarding_required,
            "require_passkey": policy.requires_passkey(u),
        }));
    }
    Ok(serde_json::Value::Array(out))
}

async fn user_detail(state: &State, name: &str) -> Result<Option<serde_json::Value>, StoreError> {
    let Some(user) = state.policy.load().user(name).map(|u| u.name.clone()) else { return Ok(None) };
    let now = now_ms();
    let tokens: Vec<_> = state
        .store
        .tokens_of(&user, now)
        .await?
        .into_iter()
        .map(|(_, t)| {
            serde_json::json!({
                "id": t.id, "created_ms": t.created_ms, "last_used_ms": t.last_used_ms, "last_ip": t.last_ip,
                "user_agent": t.user_agent, "expires_ms": t.expires_ms,
            })
        })
        .collect();
    let passkeys: Vec<_> = state
        .store
        .passkeys_of(&user)
        .await?
        .into_iter()
        .map(|k| serde_json::json!({"id": k.cred_id, "name": k.name, "created_ms": k.created_ms, "last_used_ms": k.last_used_ms}))
        .collect();
    let sessions: Vec<_> = state
        .store
        .sessions_of(&user, now)
        .await?
        .into_iter()
        .map(|(_, s)| serde_json::json!({"created_ms": s.created_ms, "last_seen_ms": s.last_seen_ms, "ip": s.ip, "method": s.method}))
        .collect();
    let flags = state.store.flags(&user).await?;
    Ok(Some(serde_json::json!({
        "name": user, "tokens": tokens, "passkeys": passkeys, "sessions": sessions,
        "onboarding_required": flags.onboarding_required, "last_login_ms": flags.last_login_ms,
    })))
}

async fn history(state: &State, user: Option<&str>, limit: usize) -> Result<serde_json::Value, StoreError> {
    let events =
        state.store.history(user, state.config.history.retention, limit.min(10_000), now_ms()).await?;
    Ok(serde_json::to_value(events).unwrap_or_default())
}

#[derive(Serialize)]
struct UserRow {
    href: String,
    name: String,
    role: String,
    email: String,
    passkeys: u64,
    last_login: String,
}

async fn users_page(state: &State, lang: Lang) -> Result<Response<Body>, StoreError> {
    let list = users(state).await?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let users: Vec<UserRow> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|u| UserRow {
            href: format!("/.pbxgate/admin/user?name={}", encode_rd(u["name"].as_str().unwrap_or_default())),
            name: text(&u["name"]),
            role: text(&u["role"]),
            email: text(&u["email"]),
            passkeys: u["passkeys"].as_u64().unwrap_or(0),
            last_login: i18n::when(lang, u["last_login_ms"].as_u64()),
        })
        .collect();
    let title = state.ui.text(lang, "admin.title", &[]);
    #[derive(Serialize)]
    struct View {
        users: Vec<UserRow>,
    }
    Ok(state.ui.page(lang, StatusCode::OK, "admin.html", "admin", &title, &View { users }))
}

/// "Chrome on Linux", in the reader's language; the agent as sent when it
/// names no browser and system.
fn device(state: &State, lang: Lang, user_agent: &serde_json::Value) -> String {
    let agent = user_agent.as_str().unwrap_or_default();
    match crate::ui::device::describe(agent) {
        Some((browser, system)) => {
            state.ui.text(lang, "admin.device", &[("browser", browser), ("system", system)])
        }
        None => agent.to_string(),
    }
}

#[derive(Serialize)]
struct TokenRow {
    id: String,
    created: String,
    last_used: String,
    last_ip: String,
    user_agent: String,
    expires: String,
}

#[derive(Serialize)]
struct PasskeyRow {
    id: String,
    name: String,
    created: String,
    last_used: String,
}

#[derive(Serialize)]
struct UserView {
    user: String,
    history_href: String,
    tokens: Vec<TokenRow>,
    passkeys: Vec<PasskeyRow>,
    sessions: usize,
    onboarding: bool,
    /// Why the policy requires a passkey of this person, in words; empty
    /// when it does not.
    required_by: String,
}

/// "Required by the role admin" or "Required for this account", as the
/// policy says; empty when the policy leaves it to the admins.
fn required_by(state: &State, lang: Lang, name: &str) -> String {
    let policy = state.policy.load();
    let Some(user) = policy.user(name) else { return String::new() };
    if user.require_passkey {
        state.ui.text(lang, "admin.required_by_account", &[])
    } else if policy.role_settings(user.role).is_some_and(|r| r.require_passkey) {
        state.ui.text(lang, "admin.required_by_role", &[("role", user.role.as_str())])
    } else {
        String::new()
    }
}

async fn user_page(state: &State, lang: Lang, name: &str) -> Result<Response<Body>, StoreError> {
    let Some(d) = user_detail(state, name).await? else {
        return Ok(respond(&Refusal::NotFound, true));
    };
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let when = |v: &serde_json::Value| i18n::when(lang, v.as_u64());
    let user = text(&d["name"]);
    let tokens = d["tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| TokenRow {
            id: text(&t["id"]),
            created: when(&t["created_ms"]),
            last_used: when(&t["last_used_ms"]),
            last_ip: text(&t["last_ip"]),
            user_agent: device(state, lang, &t["user_agent"]),
            expires: when(&t["expires_ms"]),
        })
        .collect();
    let passkeys = d["passkeys"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|k| PasskeyRow {
            id: text(&k["id"]),
            name: text(&k["name"]),
            created: when(&k["created_ms"]),
            last_used: when(&k["last_used_ms"]),
        })
        .collect();
    let view = UserView {
        history_href: format!("/.pbxgate/admin/history?user={}", encode_rd(&user)),
        tokens,
        passkeys,
        sessions: d["sessions"].as_array().map_or(0, Vec::len),
        onboarding: d["onboarding_required"].as_bool().unwrap_or(false),
        required_by: required_by(state, lang, &user),
        user,
    };
    let title = state.ui.text(lang, "admin.user_title", &[("user", &view.user)]);
    Ok(state.ui.page(lang, StatusCode::OK, "admin-user.html", "admin-user", &title, &view))
}

#[derive(Serialize)]
struct EventRow {
    time: String,
    user: String,
    method: String,
    result: String,
    ip: String,
    user_agent: String,
}

async fn history_page(state: &State, lang: Lang, user: &str) -> Result<Response<Body>, StoreError> {
    let events = history(state, Some(user).filter(|u| !u.is_empty()), 500).await?;
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_string();
    let events: Vec<EventRow> = events
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| EventRow {
            time: i18n::when(lang, e["time_ms"].as_u64()),
            user: text(&e["user"]),
            method: text(&e["method"]),
            result: text(&e["result"]),
            ip: text(&e["ip"]),
            user_agent: device(state, lang, &e["user_agent"]),
        })
        .collect();
    #[derive(Serialize)]
    struct View {
        events: Vec<EventRow>,
    }
    let title = state.ui.text(lang, "admin.history_title", &[]);
    Ok(state.ui.page(lang, StatusCode::OK, "admin-history.html", "admin-history", &title, &View { events }))
}
