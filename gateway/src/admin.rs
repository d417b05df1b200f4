//! The admin listener: `/metrics`, `/healthz`, `/readyz`. Bind it to loopback
//! or a management network; it has no authentication of its own.

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::error::{json, respond, Refusal};
use crate::{reserved, Body, State};

pub(crate) async fn handle<B>(state: &State, request: &Request<B>) -> Response<Body> {
    match request.uri().path() {
        "/healthz" => json(StatusCode::OK, "{\"status\":\"ok\"}"),
        "/readyz" => reserved::readiness(state).await,
        "/metrics" => {
            let mut response = Response::new(Either::Right(Full::new(Bytes::from(
                state.metrics.render_with_store(state.store.stats(), state.store.backend()),
            ))));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            response
        }
        _ => respond(&Refusal::NotFound, false),
    }
}
