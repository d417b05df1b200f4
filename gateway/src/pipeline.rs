//! The request's path, top to bottom: facts, screen, reserved, identity,
//! decide, proxy, log.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{ACCEPT, HOST, LOCATION, SET_COOKIE, USER_AGENT};
use http::request::Parts;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use pbxgate_policies::{
    decide_on_route, lenient_reading_changes_route, normalize_path, parse_host, screen, Access, Facts, Host,
    HostError, Principal, Screen, Verdict,
};

use crate::auth::basic::Basic;
use crate::auth::routes::Ctx;
use crate::auth::{self, Identity};
use crate::error::{empty, respond, Refusal};
use crate::listener::{Connection, Dropped};
use crate::proxy::{headers, Outgoing};
use crate::telemetry::{self, AccessLine};
use crate::{reserved, Body, State};

/// Handles one request on the https or http listener.
pub(crate) async fn handle(
    state: &Arc<State>,
    conn: &Connection,
    request: Request<Incoming>,
) -> Result<Response<Body>, Dropped> {
    let policy = state.policy.load_full();
    // The head is kept here and lent on: what is borrowed from it (host,
    // path) lasts the whole request, with no copies.
    let (mut head, body) = request.into_parts();
    let upgrade = head.extensions.remove::<OnUpgrade>();
    let parts = &head;

    // 1. facts
    let peer = conn.peer.ip();
    let trusted_peer = policy.is_trusted_proxy(peer);
    let client_ip = headers::client_ip(peer, &parts.headers, &policy);
    let host_value = parts.headers.get(HOST);
    let method = &parts.method;
    let Ok(host) = request_host(&parts.uri, &parts.headers) else {
        let mut log = Log { state, method, host: "-", path: "-", client: client_ip, user: "-" };
        log.path = parts.uri.path();
        let response = respond(&Refusal::BadRequest, false);
        return Ok(log.write(response, None, "bad_request", "host"));
    };
    // What the PBX is told the host is: as validated, never as spelled.
    let authority = host.authority();
    let host = host.name;
    let normalized = normalize_path(parts.uri.path());
    let user_agent = parts.headers.get(USER_AGENT).and_then(|v| v.to_str().ok());
    let browser = is_browser(parts);
    let facts = Facts {
        client_ip,
        host: &host,
        method: method.as_str(),
        path: normalized.as_deref().unwrap_or(""),
        user_agent,
    };
    let mut log = Log { state, method, host: &host, path: "-", client: client_ip, user: "-" };

    // 2. screen
    if let Screen::Drop(reason) = screen(&policy, &facts) {
        state.metrics.request("drop", 0);
        let path = normalized.as_deref().unwrap_or("-");
        log.path = path;
        log.line(0, None, "drop", reason.as_str());
        drop(policy);
        return Err(drop_connection(conn));
    }
    let path: &str = match &normalized {
        Ok(path) => path,
        Err(e) => {
            let response = state.page_words(respond(&Refusal::BadRequest, browser), &parts.headers, None);
            return Ok(log.write(response, None, "bad_request", &e.to_string()));
        }
    };
    log.path = path;
    // A PBX that reads paths leniently (`;` parameters, case, trailing dots)
    // must not be served a path the policy decided under another rule.
    if lenient_reading_changes_route(&policy, path) {
        let response = respond(&Refusal::BadRequest, browser);
        return Ok(log.write(response, None, "bad_request", "lenient_path"));
    }
    let user_agent = user_agent.unwrap_or_default();

    // 3. the gateway's own endpoints
    if reserved::is_reserved(path) {
        // The handlers take the request whole: what the log needs is copied.
        let (host, path, method) = (host.to_string(), path.to_string(), method.clone());
        let ctx = Ctx {
            client_ip,
            host: &host,
            origin: format!("{}://{authority}", conn.proto),
            user_agent: user_agent.into(),
            browser,
            lang: crate::ui::i18n::negotiate(&head.headers, state.ui.default_lang),
            set_cookies: Default::default(),
            user: Default::default(),
        };
        let request = Request::from_parts(head, body);
        // Boxed: sign-in is rare next to proxying, and its large future would
        // otherwise be part of (and copied with) every request's.
        let response = Box::pin(reserved::handle(state, &ctx, request, &path)).await;
        let renewed = ctx.set_cookies.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        let response = with_cookies(response, renewed);
        let user = ctx.user.get().map_or("-", String::as_str);
        let lang = if user == "-" { ctx.lang } else { state.lang_of(user, ctx.lang) };
        let response = crate::error::localize(response, &state.ui, lang);
        let log = Log { state, method: &method, host: &host, path: &path, client: client_ip, user };
        return Ok(log.write(response, None, "reserved", "reserved"));
    }

    // 4. identity, where the route needs a person; no store, no entry.
    let route = policy.route_for(path);
    // One reading of the clock for the session's and the policy's times.
    let now_ms = crate::store::now_ms();
    let needs_person = route.is_some_and(|r| !matches!(r.access, Access::Public | Access::Network));
    let mut identity = Identity::default();
    let mut basic_user = None;
    // A credential from the route's API access list: allowed, with no identity.
    let mut listed_grant = false;
    if needs_person {
        let looked_up = async {
            let identity = auth::identify_on(
                state,
                &policy,
                &parts.headers,
                Some(&conn.last_session),
                client_ip,
                user_agent,
                now_ms,
            )
            .await?;
            let basic = match identity.principal {
                Some(_) => Basic::Absent,
                None => auth::basic::verify(state, &parts.headers, client_ip).await?,
            };
            Ok::<_, crate::store::StoreError>((identity, basic))
        };
        match looked_up.await {
            Ok((found, basic)) => {
                identity = found;
                let listed = route.is_some_and(|r| {
                    r.access == Access::Api
                        && auth::basic::listed_form(&parts.headers)
                            .is_some_and(|c| r.basic_credentials.contains(&c))
                });
                match basic {
                    Basic::Verified(user) => basic_user = Some(user),
                    // Vodia's API access list: a listed credential needs no account.
                    _ if listed => {}
                    Basic::Refused | Basic::Regulated => {
                        let regulated = matches!(basic, Basic::Regulated);
                        return Ok(log.write(basic_refused(regulated), None, "deny", "basic"));
                    }
                    Basic::Absent => {}
                }
                listed_grant = listed && identity.principal.is_none() && basic_user.is_none();
            }
            Err(e) => {
                static STORE_DOWN: telemetry::Repeated = telemetry::Repeated::new();
                if let Some(skipped) = STORE_DOWN.due(now_ms) {
                    tracing::error!(error = %e, skipped, "store unavailable: refusing (fail closed)");
                }
                let response =
                    state.page_words(respond(&Refusal::Unavailable, browser), &parts.headers, None);
                return Ok(log.write(response, None, "deny", "store_unavailable"));
            }
        }
    }
    let who = identity.principal.as_ref();
    log.user = who.map_or(basic_user.as_deref().unwrap_or("-"), |p| p.user());
    let now_secs = now_ms / 1000;
    let principal = match (who, &basic_user) {
        (Some(p), _) => Some(p.conditions()),
        (None, Some(user)) => Some(Principal::verified_now(user, now_secs)),
        (None, None) => None,
    };

    // 5. decide
    let decision = decide_on_route(&policy, route, &facts, principal.as_ref(), now_secs);
    let return_path = || match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let verdict = if listed_grant { Verdict::Allow } else { decision.verdict };
    let refusal = match verdict {
        Verdict::Allow => None,
        Verdict::Login => Some(Refusal::LoginRequired { rd: return_path() }),
        Verdict::StepUp { .. } => Some(Refusal::StepUpRequired { rd: return_path() }),
        Verdict::PasskeyFirst => Some(Refusal::PasskeyRequired { rd: return_path() }),
        Verdict::Reauthenticate => Some(Refusal::Reauthenticate),
        Verdict::Deny(reason) => {
            tracing::debug!(reason = reason.as_str(), "denied");
            Some(Refusal::Forbidden)
        }
    };
    let verdict = verdict_name(verdict);
    if let Some(refusal) = refusal {
        let response = state.page_words(respond(&refusal, browser), &parts.headers, who.map(|p| p.user()));
        let response = with_cookies(response, identity.set_cookies);
        return Ok(log.write(response, None, verdict, decision.rule.name()));
    }

    // 6. proxy, with the identity the upstream may trust
    let upstream_identity = match (principal.is_some(), decision.user) {
        (true, Some(user)) => Some(state.identities.for_user(
            &policy,
            user,
            &state.config.headers,
            state.auth.signer.as_ref(),
            now_secs,
        )),
        _ => None,
    };
    let out = Outgoing {
        worker: conn.worker,
        peer,
        peer_value: &conn.peer_value,
        trusted_peer,
        client: client_ip,
        proto: conn.proto,
        host: &authority,
        host_value,
        path,
        identity: upstream_identity,
        sockets: who.map(|p| (&state.auth.sockets, &p.session)),
        upgrade,
    };
    let upstream_started = Instant::now();
    let response = match state.upstream.forward(parts, body, out, &state.spoofable, upstream_started).await {
        Ok(response) => response,
        Err(refusal) => state.page_words(respond(&refusal, browser), &parts.headers, who.map(|p| p.user())),
    };
    let upstream_took = upstream_started.elapsed();
    state.metrics.upstream_latency(upstream_took);
    let response = with_cookies(response, identity.set_cookies);

    // 7. log
    Ok(log.write(response, Some(upstream_took), verdict, decision.rule.name()))
}

/// One access-log line, filled in along the request's path.
struct Log<'a> {
    state: &'a State,
    method: &'a Method,
    host: &'a str,
    path: &'a str,
    client: IpAddr,
    user: &'a str,
}

impl Log<'_> {
    /// Counts and logs the response on its way out.
    fn write(
        &self,
        response: Response<Body>,
        upstream: Option<Duration>,
        decision: &str,
        rule: &str,
    ) -> Response<Body> {
        let status = response.status().as_u16();
        self.state.metrics.request(decision, status);
        self.line(status, upstream, decision, rule);
        response
    }

    fn line(&self, status: u16, upstream: Option<Duration>, decision: &str, rule: &str) {
        let Self { method, host, path, client, user, .. } = *self;
        telemetry::log_access(&AccessLine {
            method: method.as_str(),
            host,
            path,
            status,
            upstream,
            decision,
            rule,
            user,
            client,
        });
    }
}

/// Wrong Basic credentials: 401 with a challenge (429 while regulated).
fn basic_refused(regulated: bool) -> Response<Body> {
    if regulated {
        return crate::error::json(
            StatusCode::TOO_MANY_REQUESTS,
            "{\"error\":\"too_many_attempts\",\"message\":\"Too many attempts. Please wait a few minutes.\"}",
        );
    }
    let mut response = crate::error::json(StatusCode::UNAUTHORIZED, "{\"error\":\"bad_credentials\"}");
    response
        .headers_mut()
        .insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"pbxgate\""));
    response
}

fn with_cookies(mut response: Response<Body>, cookies: Vec<HeaderValue>) -> Response<Body> {
    if cookies.is_empty() {
        return response;
    }
    for cookie in cookies {
        response.headers_mut().append(SET_COOKIE, cookie);
    }
    response
}

/// Closes the connection under this request without a response byte: from
/// now on its socket refuses writes, so the error hyper then meets (it would
/// answer HTTP/2 with RST_STREAM) ends the connection instead.
fn drop_connection(conn: &Connection) -> Dropped {
    conn.drop_silently();
    Dropped
}

/// The `redirect_http` listener: known hosts are sent to HTTPS, others dropped.
pub(crate) async fn redirect_to_https(
    state: &State,
    conn: &Connection,
    request: &Request<Incoming>,
) -> Result<Response<Body>, Dropped> {
    let policy = state.policy.load();
    let Ok(host) = request_host(request.uri(), request.headers()) else {
        drop(policy);
        return Err(drop_connection(conn));
    };
    let host = host.name;
    let facts = Facts {
        client_ip: headers::client_ip(conn.peer.ip(), request.headers(), &policy),
        host: &host,
        method: request.method().as_str(),
        path: request.uri().path(),
        user_agent: request.headers().get(USER_AGENT).and_then(|v| v.to_str().ok()),
    };
    if let Screen::Drop(_) = screen(&policy, &facts) {
        drop(policy);
        return Err(drop_connection(conn));
    }
    let port = match state.config.public_url.port {
        Some(p) if p != 443 => format!(":{p}"),
        _ => String::new(),
    };
    let host = if host.contains(':') { Cow::Owned(format!("[{host}]")) } else { host };
    let target =
        format!("https://{host}{port}{}", request.uri().path_and_query().map_or("/", |p| p.as_str()));
    let mut response = empty(StatusCode::PERMANENT_REDIRECT);
    if let Ok(value) = HeaderValue::from_str(&target) {
        response.headers_mut().insert(LOCATION, value);
    }
    Ok(response)
}

fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Allow => "allow",
        Verdict::Login => "login",
        Verdict::StepUp { .. } => "step_up",
        Verdict::PasskeyFirst => "passkey_required",
        Verdict::Reauthenticate => "reauthenticate",
        Verdict::Deny(_) => "deny",
    }
}

/// The host the client asked for (the HTTP/2 authority, else the Host
/// header), when it is a valid RFC 3986 host; refused before anything else
/// looks at it otherwise.
fn request_host<'r>(uri: &'r http::Uri, headers: &'r http::HeaderMap) -> Result<Host<'r>, HostError> {
    let raw = match uri.authority() {
        Some(authority) => authority.as_str(),
        None => match headers.get(HOST) {
            Some(value) => value.to_str().map_err(|_| HostError)?,
            None => "",
        },
    };
    parse_host(raw)
}

/// A person's browser navigating: they get pages and redirects, programs get JSON.
fn is_browser(request: &Parts) -> bool {
    matches!(request.method, Method::GET | Method::HEAD)
        && request
            .headers
            .get(ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| accept.contains("text/html"))
}
