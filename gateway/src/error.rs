//! Errors at the crate boundary (start-up, listeners), and the one place where
//! a refused request becomes a status code and a body.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, SET_COOKIE, WWW_AUTHENTICATE};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::config::ConfigErrors;
use crate::ui::{Lang, Ui};
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

    /// The key of what a person reads (`error.<code>` in the catalogues).
    /// Constant: details go to the log, never to the client.
    pub fn message_key(&self) -> String {
        format!("error.{}", self.code())
    }
}

/// A refusal or API error whose words are filled in once the language of
/// the person is known (see [`localize`]): the response carries this until
/// then, with an English body (a program reading it before then still gets
/// words) or, for a page, none.
#[derive(Debug, Clone)]
pub struct Localize {
    code: &'static str,
    key: String,
    args: Vec<(&'static str, String)>,
    page: bool,
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
        _ if browser => {
            let mut response = empty(refusal.status());
            response.extensions_mut().insert(Localize {
                code: refusal.code(),
                key: refusal.message_key(),
                args: Vec::new(),
                page: true,
            });
            response
        }
        _ => {
            let mut response = api_error(refusal.status(), refusal.code(), &refusal.message_key());
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

/// The one JSON error shape, `{"error": code, "message": text}`; `key`
/// names the text in the catalogues.
pub fn api_error(status: StatusCode, code: &'static str, key: &str) -> Response<Body> {
    api_error_with(status, code, key, Vec::new())
}

/// [`api_error`] with placeholders in the text.
pub fn api_error_with(
    status: StatusCode,
    code: &'static str,
    key: &str,
    args: Vec<(&'static str, String)>,
) -> Response<Body> {
    let localize = Localize { code, key: key.to_string(), args, page: false };
    let mut response = json(status, &error_json(&localize, Lang::En));
    response.extensions_mut().insert(localize);
    response
}

fn error_json(l: &Localize, lang: Lang) -> String {
    let args: Vec<(&str, &str)> = l.args.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let message = crate::ui::i18n::messages().text(lang, &l.key, &args);
    serde_json::json!({"error": l.code, "message": message}).to_string()
}

/// Fills in the words of a refusal or API error (see [`Localize`]) in
/// `lang`: a page with the operator's brand, or the JSON message.
pub fn localize(mut response: Response<Body>, ui: &Ui, lang: Lang) -> Response<Body> {
    let Some(l) = response.extensions_mut().remove::<Localize>() else { return response };
    if l.page {
        let args: Vec<(&str, &str)> = l.args.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let message = ui.text(lang, &l.key, &args);
        let mut page = ui.error_page(lang, response.status(), l.code, &message);
        for (name, value) in response.headers() {
            if name == SET_COOKIE || name == WWW_AUTHENTICATE {
                page.headers_mut().append(name, value.clone());
            }
        }
        return page;
    }
    if lang == Lang::En {
        return response;
    }
    *response.body_mut() = Either::Right(Full::new(Bytes::from(error_json(&l, lang))));
    response.headers_mut().remove(CONTENT_LENGTH);
    response
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
