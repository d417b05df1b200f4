//! Errors at the crate boundary (start-up, listeners), and the one place where
//! a refused request becomes a status code and a body.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::config::ConfigErrors;
use crate::Body;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("configuration:\n{0}")]
    Config(#[from] ConfigErrors),
    #[error("tls: {0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("upstream client: {0}")]
    Upstream(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("sign-in: {0}")]
    Auth(String),
    #[error("cannot start worker threads: {0}")]
    Runtime(std::io::Error),
}

/// Why the gateway answers a request itself instead of forwarding it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Not identified: login page for browsers (with the return path), 401 otherwise.
    LoginRequired {
        rd: String,
    },
    /// Identified but must unlock first.
    StepUpRequired {
        rd: String,
    },
    /// Must create a passkey before anything else (the passkey offer page).
    PasskeyRequired {
        rd: String,
    },
    /// Must prove who they are again in a ceremony (a remember token, or a
    /// sign-in too long ago, does not count).
    Reauthenticate,
    /// Too many attempts from this address or for this account.
    TooManyAttempts,
    /// Password checks are all busy: try again in a moment.
    Busy,
    Forbidden,
    NotFound,
    BadRequest,
    PayloadTooLarge,
    BadGateway,
    GatewayTimeout,
    Unavailable,
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::LoginRequired { .. } => StatusCode::UNAUTHORIZED,
            Self::StepUpRequired { .. }
            | Self::PasskeyRequired { .. }
            | Self::Reauthenticate
            | Self::Forbidden => StatusCode::FORBIDDEN,
            Self::TooManyAttempts => StatusCode::TOO_MANY_REQUESTS,
            Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BadGateway => StatusCode::BAD_GATEWAY,
            Self::GatewayTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The stable machine-readable code in JSON answers.
    pub fn code(&self) -> &'static str {
        match self {
            Self::LoginRequired { .. } => "login_required",
            Self::StepUpRequired { .. } => "step_up_required",
            Self::PasskeyRequired { .. } => "passkey_required",
            Self::Reauthenticate => "reauthenticate",
            Self::TooManyAttempts => "too_many_attempts",
            Self::Busy => "busy",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::BadRequest => "bad_request",
            Self::PayloadTooLarge => "payload_too_large",
            Self::BadGateway => "bad_gateway",
            Self::GatewayTimeout => "gateway_timeout",
            Self::Unavailable => "unavailable",
        }
    }

    /// What a person reads. Constant: details go to the log, never to the client.
    fn message(&self) -> &'static str {
        match self {
            Self::LoginRequired { .. } => "Please sign in.",
            Self::StepUpRequired { .. } => "Please unlock this section first.",
            Self::PasskeyRequired { .. } => "Create a passkey at /.pbxgate/passkey-offer first.",
            Self::Reauthenticate => "For your security, sign in again first.",
            Self::TooManyAttempts => "Too many attempts. Please wait a few minutes and try again.",
            Self::Busy => "The sign-in service is busy. Please try again in a moment.",
            Self::Forbidden => "You do not have access to this page.",
            Self::NotFound => "This page does not exist.",
            Self::BadRequest => "The request could not be understood.",
            Self::PayloadTooLarge => "The upload is larger than this gateway accepts.",
            Self::BadGateway => "The phone system is not reachable right now. Please try again shortly.",
            Self::GatewayTimeout => "The phone system took too long to answer. Please try again.",
            Self::Unavailable => "The sign-in service is unavailable right now. Please try again shortly.",
        }
    }
}

/// Maps a refusal to the response a browser (`browser = true`: a GET that
/// accepts HTML) or a program should see.
pub fn respond(refusal: &Refusal, browser: bool) -> Response<Body> {
    match refusal {
        Refusal::LoginRequired { rd } if browser => {
            redirect(&format!("/.pbxgate/login?rd={}", encode_rd(rd)))
        }
        Refusal::StepUpRequired { rd } if browser => {
            redirect(&format!("/.pbxgate/unlock?rd={}", encode_rd(rd)))
        }
        Refusal::PasskeyRequired { rd } if browser => {
            redirect(&format!("/.pbxgate/passkey-offer?rd={}", encode_rd(rd)))
        }
        _ if browser => html(refusal.status(), refusal.message()),
        _ => {
            let body = format!("{{\"error\":\"{}\",\"message\":\"{}\"}}", refusal.code(), refusal.message());
            let mut response = json(refusal.status(), &body);
            if refusal.status() == StatusCode::UNAUTHORIZED {
                // RFC 9110 asks a 401 to name a scheme; one browsers do not
                // prompt for (Basic would open a password dialog on every
                // script's request).
                response.headers_mut().insert(WWW_AUTHENTICATE, HeaderValue::from_static(SESSION_CHALLENGE));
            }
            response
        }
    }
}

/// The challenge of a 401 that asks for a session: sign in at the login page.
pub const SESSION_CHALLENGE: &str = "Session realm=\"pbxgate\", login=\"/.pbxgate/login\"";

fn redirect(location: &str) -> Response<Body> {
    let mut response = empty(StatusCode::FOUND);
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

pub fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = status;
    response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

pub fn json(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A small self-contained page (no external resources).
pub fn html(status: StatusCode, message: &str) -> Response<Body> {
    let body = crate::reserved::page(
        status.canonical_reason().unwrap_or("Error"),
        &format!("<p>{}</p>", escape(message)),
    );
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    crate::reserved::page_headers(response.headers_mut());
    response
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes the return path for a query parameter.
pub fn encode_rd(rd: &str) -> String {
    let mut out = String::with_capacity(rd.len() + 8);
    for b in rd.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
