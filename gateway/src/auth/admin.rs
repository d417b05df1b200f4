//! The gateway's own admin pages and JSON API (`/.pbxgate/admin`,
//! `/.pbxgate/api/admin/`): what tokens, passkeys and sessions exist, with
//! revoke and reset, and the login history. Admins only, unlocked, and from
//! their allowed networks.

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::routes::{
    api_error, authorized, bad_request, form, parse, read_body, see_other, unavailable, Ctx,
};
use super::{pages, Principal};
use crate::error::{encode_rd, escape, json, respond, Refusal};
use crate::store::{now_ms, StoreError, UserFlags};
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
                    None => api_error(StatusCode::NOT_FOUND, "not_found", "No such user."),
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
            (http::Method::GET, "/.pbxgate/admin") => users_page(state).await?,
            (http::Method::GET, "/.pbxgate/admin/user") => user_page(state, &query("name")).await?,
            (http::Method::GET, "/.pbxgate/admin/history") => history_page(state, &query("user")).await?,
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
                    false => api_error(
                        StatusCode::NOT_FOUND,
                        "not_found",
                        "Nothing to do: unknown user, token or passkey.",
                    ),
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

fn product(state: &State) -> String {
    state.product_name()
}

async fn users_page(state: &State) -> Result<Response<Body>, StoreError> {
    let list = users(state).await?;
    let mut rows = String::new();
    for u in list.as_array().into_iter().flatten() {
        let name = u["name"].as_str().unwrap_or_default();
        rows.push_str(&format!(
            "<tr><td><a href=\"/.pbxgate/admin/user?name={q}\">{n}</a></td><td>{role}</td><td>{email}</td><td>{keys}</td><td>{last}</td></tr>",
            q = encode_rd(name),
            n = escape(name),
            role = escape(u["role"].as_str().unwrap_or_default()),
            email = escape(u["email"].as_str().unwrap_or("")),
            keys = u["passkeys"],
            last = pages::when(u["last_login_ms"].as_u64()),
        ));
    }
    let body = format!(
        "<p><a href=\"/.pbxgate/admin/history\">Login history</a> · <a href=\"/.pbxgate/account\">Your account</a></p>\
         <table id=\"users\"><tr><th>User</th><th>Role</th><th>Email</th><th>Passkeys</th><th>Last sign-in</th></tr>{rows}</table>\
         <form method=\"post\" action=\"/.pbxgate/unlock/end\"><button type=\"submit\">Lock the admin pages now</button></form>"
    );
    Ok(pages::render(StatusCode::OK, &product(state), "admin", "Administration", &body))
}

fn button(user: &str, action: &str, id: &str, label: &str, extra: &str) -> String {
    format!(
        "<form method=\"post\" action=\"/.pbxgate/admin/action\" class=\"inline\">\
         <input type=\"hidden\" name=\"user\" value=\"{u}\"><input type=\"hidden\" name=\"action\" value=\"{a}\">\
         <input type=\"hidden\" name=\"id\" value=\"{i}\">{extra}<button type=\"submit\" data-action=\"{a}\" data-id=\"{i}\">{l}</button></form>",
        u = escape(user),
        a = escape(action),
        i = escape(id),
        l = escape(label),
    )
}

async fn user_page(state: &State, name: &str) -> Result<Response<Body>, StoreError> {
    let Some(d) = user_detail(state, name).await? else {
        return Ok(respond(&Refusal::NotFound, true));
    };
    let user = d["name"].as_str().unwrap_or_default().to_string();
    let mut tokens = String::new();
    for t in d["tokens"].as_array().into_iter().flatten() {
        let id = t["id"].as_str().unwrap_or_default();
        tokens.push_str(&format!(
            "<tr><td><code>{id}</code></td><td>{c}</td><td>{u}</td><td>{ip}</td><td>{ua}</td><td>{e}</td><td>{b}</td></tr>",
            id = escape(id),
            c = pages::when(t["created_ms"].as_u64()),
            u = pages::when(t["last_used_ms"].as_u64()),
            ip = escape(t["last_ip"].as_str().unwrap_or_default()),
            ua = escape(t["user_agent"].as_str().unwrap_or_default()),
            e = pages::when(t["expires_ms"].as_u64()),
            b = button(&user, "revoke-token", id, "Revoke", ""),
        ));
    }
    let mut keys = String::new();
    for k in d["passkeys"].as_array().into_iter().flatten() {
        let id = k["id"].as_str().unwrap_or_default();
        keys.push_str(&format!(
            "<tr><td>{n}</td><td>{c}</td><td>{u}</td><td>{b}</td></tr>",
            n = escape(k["name"].as_str().unwrap_or_default()),
            c = pages::when(k["created_ms"].as_u64()),
            u = pages::when(k["last_used_ms"].as_u64()),
            b = button(&user, "delete-passkey", id, "Delete", ""),
        ));
    }
    let onboarding = d["onboarding_required"].as_bool().unwrap_or(false);
    let body = format!(
        "<p><a href=\"/.pbxgate/admin\">All users</a> · <a href=\"/.pbxgate/admin/history?user={q}\">History</a></p>\
         <h2>Remember tokens</h2><table id=\"tokens\"><tr><th>Id</th><th>Created</th><th>Last used</th><th>Last IP</th><th>Browser</th><th>Expires</th><th></th></tr>{tokens}</table>\
         <h2>Passkeys</h2><table id=\"passkeys\"><tr><th>Name</th><th>Created</th><th>Last used</th><th></th></tr>{keys}</table>{reset}\
         <h2>Sessions</h2><p>{n} active. {revoke}</p>\
         <h2>Passkey setup</h2><p>{state_text} {toggle}</p>",
        q = encode_rd(&user),
        reset = button(&user, "reset-passkeys", "", "Reset all passkeys", ""),
        n = d["sessions"].as_array().map_or(0, Vec::len),
        revoke = button(&user, "revoke-sessions", "", "Sign out everywhere", ""),
        state_text = if onboarding { "Required at next sign-in." } else { "Not required." },
        toggle = button(
            &user,
            "set-onboarding",
            "",
            if onboarding { "Do not require" } else { "Require at next sign-in" },
            &format!("<input type=\"hidden\" name=\"required\" value=\"{}\">", if onboarding { "0" } else { "1" })
        ),
    );
    Ok(pages::render(StatusCode::OK, &product(state), "admin-user", &format!("User {user}"), &body))
}

async fn history_page(state: &State, user: &str) -> Result<Response<Body>, StoreError> {
    let events = history(state, Some(user).filter(|u| !u.is_empty()), 500).await?;
    let mut rows = String::new();
    for e in events.as_array().into_iter().flatten() {
        rows.push_str(&format!(
            "<tr><td>{t}</td><td>{u}</td><td>{m}</td><td>{r}</td><td>{ip}</td><td>{ua}</td></tr>",
            t = pages::when(e["time_ms"].as_u64()),
            u = escape(e["user"].as_str().unwrap_or_default()),
            m = escape(e["method"].as_str().unwrap_or_default()),
            r = escape(e["result"].as_str().unwrap_or_default()),
            ip = escape(e["ip"].as_str().unwrap_or_default()),
            ua = escape(e["user_agent"].as_str().unwrap_or_default()),
        ));
    }
    let body = format!(
        "<p><a href=\"/.pbxgate/admin\">All users</a></p><table id=\"history\"><tr><th>Time</th><th>User</th><th>Method</th>\
         <th>Result</th><th>Address</th><th>Browser</th></tr>{rows}</table>"
    );
    Ok(pages::render(StatusCode::OK, &product(state), "admin-history", "Login history", &body))
}
