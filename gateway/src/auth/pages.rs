//! The pages people see. Plain server-rendered HTML that works without
//! JavaScript where it can (links, passwords, logout); `pbxgate.js` adds
//! passkeys. No external resources; the CSP allows only our own files.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{Either, Full};

use crate::error::escape;
use crate::reserved::page_headers;
use crate::Body;

/// A full page: `page` names it for the script (`<body data-page>`).
pub fn render(status: StatusCode, product: &str, page: &str, title: &str, body_html: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · {product}</title><link rel=\"stylesheet\" href=\"/.pbxgate/assets/pbxgate.css\">\
         <script src=\"/.pbxgate/assets/pbxgate.js\" defer></script></head>\
         <body data-page=\"{page}\"><main><p class=\"product\">{product}</p><h1>{title}</h1>{body_html}</main></body></html>",
        title = escape(title),
        product = escape(product),
        page = escape(page),
    );
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(html))));
    *response.status_mut() = status;
    page_headers(response.headers_mut());
    response
}

fn notice(message: Option<&str>, kind: &str) -> String {
    match message {
        Some(m) => format!("<p class=\"notice {kind}\" role=\"status\" id=\"status\">{}</p>", escape(m)),
        None => "<p class=\"notice\" role=\"status\" id=\"status\" hidden></p>".to_string(),
    }
}

pub struct LoginView<'a> {
    pub rd: &'a str,
    pub login: &'a str,
    pub error: Option<&'a str>,
    pub info: Option<&'a str>,
    pub passwords: bool,
}

pub fn login(product: &str, view: &LoginView<'_>, status: StatusCode) -> Response<Body> {
    let rd = escape(view.rd);
    let login = escape(view.login);
    let password = if view.passwords {
        format!(
            "<details class=\"password\"{open}><summary>Sign in with a password</summary>\
             <form method=\"post\" action=\"/.pbxgate/login/password\" id=\"password-form\">\
             <input type=\"hidden\" name=\"rd\" value=\"{rd}\">\
             <label>Name or email<input name=\"login\" value=\"{login}\" autocomplete=\"username\" required></label>\
             <label>Password<input type=\"password\" name=\"password\" autocomplete=\"current-password\"></label>\
             <button type=\"submit\">Sign in</button></form></details>",
            open = if view.error.is_some() && !view.login.is_empty() { " open" } else { "" },
        )
    } else {
        String::new()
    };
    let body = format!(
        "{status}\
         <form method=\"post\" action=\"/.pbxgate/login/link\" id=\"login-form\">\
         <input type=\"hidden\" name=\"rd\" value=\"{rd}\" id=\"rd\">\
         <label for=\"login\">Extension or email</label>\
         <input id=\"login\" name=\"login\" value=\"{login}\" autocomplete=\"username webauthn\" autocapitalize=\"none\" \
          spellcheck=\"false\" inputmode=\"email\">\
         <button type=\"button\" id=\"passkey-button\" class=\"primary\" hidden>Sign in with a passkey</button>\
         <button type=\"submit\" id=\"link-button\">Email me a sign-in link</button>\
         </form>{password}\
         <p class=\"muted\">New here, or lost your passkey? Ask for a sign-in link: it sets you up again.</p>",
        status = match (view.error, view.info) {
            (Some(e), _) => notice(Some(e), "error"),
            (None, Some(i)) => notice(Some(i), "info"),
            _ => notice(None, ""),
        },
    );
    render(status, product, "login", "Sign in", &body)
}

pub fn link_sent(product: &str, valid_minutes: u64) -> Response<Body> {
    let body = format!(
        "{}<p><a href=\"/.pbxgate/login\">Back to sign-in</a></p>",
        notice(
            Some(&format!(
                "If an account matches, we sent a sign-in link to its email address. The link works once, for {valid_minutes} minutes."
            )),
            "info"
        )
    );
    render(StatusCode::OK, product, "link-sent", "Check your email", &body)
}

/// The landing page of an emailed link. Opening it changes nothing (mail
/// scanners open links); the form posts the token, by script or by hand.
pub fn link_landing(product: &str, token: &str) -> Response<Body> {
    let body = format!(
        "<form method=\"post\" action=\"/.pbxgate/link\" id=\"link-form\">\
         <input type=\"hidden\" name=\"token\" value=\"{}\">\
         <p>Signing you in…</p><button type=\"submit\" class=\"primary\">Continue</button></form>",
        escape(token)
    );
    render(StatusCode::OK, product, "link", "Sign in", &body)
}

pub fn link_failed(product: &str) -> Response<Body> {
    let body = format!(
        "{}<p><a href=\"/.pbxgate/login\">Ask for a new link</a></p>",
        notice(Some("This link has expired or was already used."), "error")
    );
    render(StatusCode::BAD_REQUEST, product, "link-failed", "Link no longer valid", &body)
}

pub fn passkey_offer(product: &str, rd: &str, required: bool) -> Response<Body> {
    let rd = escape(rd);
    let (intro, not_now) = if required {
        (
            "<p>This account needs a passkey before you continue: your fingerprint, face or device PIN will be how you sign in.</p>",
            String::new(),
        )
    } else {
        (
            "<p>Next time, sign in with your fingerprint, face or device PIN instead of waiting for an email.</p>",
            format!("<p><a href=\"{rd}\" id=\"not-now\">Not now</a></p>"),
        )
    };
    let body = format!(
        "{intro}\
         {status}<form id=\"register-form\" data-rd=\"{rd}\">\
         <label for=\"device\">Name this device</label>\
         <input id=\"device\" name=\"name\" maxlength=\"64\" placeholder=\"e.g. Work laptop\">\
         <button type=\"submit\" class=\"primary\" id=\"register-button\">Create a passkey</button></form>{not_now}",
        status = notice(None, "")
    );
    render(StatusCode::OK, product, "passkey-offer", "Create a passkey", &body)
}

pub struct AccountView {
    pub user: String,
    pub passkeys: Vec<(String, String, String, String)>,
    pub sessions: Vec<(bool, String, String, String)>,
}

pub fn account(product: &str, view: &AccountView) -> Response<Body> {
    let mut keys = String::new();
    for (id, name, created, used) in &view.passkeys {
        keys.push_str(&format!(
            "<li data-id=\"{id}\"><b class=\"name\">{name}</b> <span class=\"muted\">created {created}, last used {used}</span> \
             <button type=\"button\" class=\"rename\">Rename</button> <button type=\"button\" class=\"delete\">Delete</button></li>",
            id = escape(id),
            name = escape(name),
            created = escape(created),
            used = escape(used),
        ));
    }
    if keys.is_empty() {
        keys.push_str("<li class=\"muted\">No passkeys yet.</li>");
    }
    let mut sessions = String::new();
    for (current, created, seen, ip) in &view.sessions {
        sessions.push_str(&format!(
            "<li>{}signed in {}, last active {}, from {}</li>",
            if *current { "<b>This browser</b>: " } else { "" },
            escape(created),
            escape(seen),
            escape(ip)
        ));
    }
    let body = format!(
        "<p>Signed in as <b id=\"account-user\">{user}</b>.</p>{status}\
         <h2>Passkeys</h2><ul id=\"passkeys\">{keys}</ul>\
         <form id=\"register-form\" data-rd=\"/.pbxgate/account\"><label for=\"device\">Add a passkey for this device</label>\
         <input id=\"device\" name=\"name\" maxlength=\"64\" placeholder=\"e.g. Phone\">\
         <button type=\"submit\" id=\"register-button\">Add passkey</button></form>\
         <h2>Sessions</h2><ul>{sessions}</ul>\
         <form method=\"post\" action=\"/.pbxgate/logout\"><button type=\"submit\">Sign out</button> \
         <button type=\"submit\" name=\"everywhere\" value=\"1\">Sign out everywhere</button></form>",
        user = escape(&view.user),
        status = notice(None, ""),
    );
    render(StatusCode::OK, product, "account", "Your account", &body)
}

pub fn logout_form(product: &str) -> Response<Body> {
    let body = "<form method=\"post\" action=\"/.pbxgate/logout\" id=\"logout-form\">\
         <button type=\"submit\" class=\"primary\">Sign out</button> \
         <button type=\"submit\" name=\"everywhere\" value=\"1\" id=\"logout-everywhere\">Sign out everywhere</button></form>";
    render(StatusCode::OK, product, "logout", "Sign out", body)
}

pub fn logged_out(product: &str, everywhere: bool) -> Response<Body> {
    let text = if everywhere { "You are signed out on every device." } else { "You are signed out." };
    let body = format!("{}<p><a href=\"/.pbxgate/login\">Sign in again</a></p>", notice(Some(text), "info"));
    render(StatusCode::OK, product, "logged-out", "Signed out", &body)
}

/// Human time for pages: "2026-11-21 10:05 UTC".
pub fn when(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "never".into() };
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, (rem % 3600) / 60)
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::when(Some(0)), "1970-01-01 00:00 UTC");
        assert_eq!(super::when(Some(1_795_000_000_000)), "2026-11-18 11:06 UTC");
        assert_eq!(super::when(None), "never");
    }
}
