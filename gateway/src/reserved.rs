//! The gateway's own endpoints under `/.pbxgate/` and `/.well-known/pbxgate/`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;

use crate::auth::routes::{self, Ctx};
use crate::error::json;
use crate::{Body, State};

const JS: &str = include_str!("../assets/pbxgate.js");

pub(crate) fn is_reserved(path: &str) -> bool {
    path == "/.pbxgate" || path.starts_with("/.pbxgate/") || path.starts_with("/.well-known/pbxgate/")
}

pub(crate) async fn handle(
    state: &Arc<State>,
    ctx: &Ctx<'_>,
    request: Request<Incoming>,
    path: &str,
) -> Response<Body> {
    match path {
        "/.pbxgate/healthz" => json(StatusCode::OK, "{\"status\":\"ok\"}"),
        "/.pbxgate/readyz" => readiness(state).await,
        "/.pbxgate/assets/pbxgate.css" => asset(state.ui.css.clone(), "text/css; charset=utf-8"),
        "/.pbxgate/assets/pbxgate.js" => {
            asset(Bytes::from_static(JS.as_bytes()), "text/javascript; charset=utf-8")
        }
        "/.pbxgate/assets/logo.svg" | "/.pbxgate/assets/logo.png" => match &state.ui.logo {
            Some((bytes, kind)) if kind.path() == path => {
                let mut response = asset(bytes.clone(), kind.content_type());
                // An SVG opened on its own is a document: it may run nothing.
                response.headers_mut().insert(
                    "content-security-policy",
                    HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; sandbox"),
                );
                response
            }
            _ => crate::error::respond(&crate::error::Refusal::NotFound, ctx.browser),
        },
        _ => routes::handle(state, ctx, request, path).await,
    }
}

pub(crate) async fn readiness(state: &State) -> Response<Body> {
    if state.is_ready().await {
        json(StatusCode::OK, "{\"status\":\"ready\"}")
    } else {
        json(StatusCode::SERVICE_UNAVAILABLE, "{\"status\":\"unavailable\"}")
    }
}

fn asset(content: Bytes, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(content)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("public, max-age=3600"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    response
}

/// Headers every page of ours carries: a strict CSP, no framing, no caching.
pub(crate) fn page_headers(headers: &mut HeaderMap) {
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self'; connect-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
}

/// One query parameter, percent-decoded (`+` as space).
pub(crate) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (key == name).then(|| crate::auth::percent_decode(value))
    })
}
