//! The pages people see: a typed view per page, rendered by the templates
//! under `gateway/templates/` (which escape every value). They work without
//! JavaScript where they can (links, passwords, logout); `pbxgate.js` adds
//! passkeys. No external resources; the CSP allows only our own files.

use http::{Response, StatusCode};
use serde::Serialize;

use crate::error::encode_rd;
use crate::ui::{i18n, Lang, Ui};
use crate::Body;

/// A notice above a form: an error or an information, or none (an empty
/// one the script fills in).
#[derive(Serialize, Default)]
pub struct Notice {
    pub notice: Option<String>,
    pub notice_kind: &'static str,
}

impl Notice {
    pub fn error(text: String) -> Self {
        Self { notice: Some(text), notice_kind: "error" }
    }
    pub fn info(text: String) -> Self {
        Self { notice: Some(text), notice_kind: "info" }
    }
}

pub struct LoginView<'a> {
    pub rd: &'a str,
    pub login: &'a str,
    /// A message key, shown as an error.
    pub error: Option<&'a str>,
    pub passwords: bool,
}

#[derive(Serialize)]
struct LanguageLink {
    code: &'static str,
    name: &'static str,
    href: String,
    current: bool,
}

pub fn login(ui: &Ui, lang: Lang, view: &LoginView<'_>, status: StatusCode) -> Response<Body> {
    #[derive(Serialize)]
    struct View<'a> {
        rd: &'a str,
        login: &'a str,
        #[serde(flatten)]
        notice: Notice,
        passwords: bool,
        password_open: bool,
        languages: Vec<LanguageLink>,
    }
    let languages = Lang::ALL
        .into_iter()
        .map(|l| LanguageLink {
            code: l.code(),
            name: l.native_name(),
            href: format!("/.pbxgate/login?lang={}&rd={}", l.code(), encode_rd(view.rd)),
            current: l == lang,
        })
        .collect();
    let v = View {
        rd: view.rd,
        login: view.login,
        notice: view.error.map(|key| Notice::error(ui.text(lang, key, &[]))).unwrap_or_default(),
        passwords: view.passwords,
        password_open: view.error.is_some() && !view.login.is_empty(),
        languages,
    };
    ui.page(lang, status, "login.html", "login", &ui.text(lang, "login.title", &[]), &v)
}

pub fn link_sent(ui: &Ui, lang: Lang, valid_for: std::time::Duration) -> Response<Body> {
    #[derive(Serialize)]
    struct View {
        valid_for: String,
    }
    let v = View { valid_for: i18n::duration(lang, valid_for) };
    ui.page(lang, StatusCode::OK, "link-sent.html", "link-sent", &ui.text(lang, "link_sent.title", &[]), &v)
}

/// The landing page of an emailed link. Opening it changes nothing (mail
/// scanners open links); the form posts the token, by script or by hand.
pub fn link_landing(ui: &Ui, lang: Lang, token: &str) -> Response<Body> {
    #[derive(Serialize)]
    struct View<'a> {
        token: &'a str,
    }
    ui.page(lang, StatusCode::OK, "link.html", "link", &ui.text(lang, "login.title", &[]), &View { token })
}

pub fn link_failed(ui: &Ui, lang: Lang) -> Response<Body> {
    let title = ui.text(lang, "link_failed.title", &[]);
    ui.page(lang, StatusCode::BAD_REQUEST, "link-failed.html", "link-failed", &title, &serde_json::json!({}))
}

pub fn passkey_offer(ui: &Ui, lang: Lang, rd: &str, required: bool) -> Response<Body> {
    #[derive(Serialize)]
    struct View<'a> {
        rd: &'a str,
        required: bool,
        #[serde(flatten)]
        notice: Notice,
    }
    let v = View { rd, required, notice: Notice::default() };
    ui.page(
        lang,
        StatusCode::OK,
        "passkey-offer.html",
        "passkey-offer",
        &ui.text(lang, "offer.title", &[]),
        &v,
    )
}

#[derive(Serialize)]
pub struct PasskeyItem {
    pub id: String,
    pub name: String,
    pub created: String,
    pub used: String,
}

#[derive(Serialize)]
pub struct SessionItem {
    pub current: bool,
    pub created: String,
    pub seen: String,
    pub ip: String,
}

#[derive(Serialize)]
pub struct AccountView {
    pub user: String,
    pub passkeys: Vec<PasskeyItem>,
    pub sessions: Vec<SessionItem>,
    #[serde(flatten)]
    pub notice: Notice,
}

pub fn account(ui: &Ui, lang: Lang, view: &AccountView) -> Response<Body> {
    ui.page(lang, StatusCode::OK, "account.html", "account", &ui.text(lang, "account.title", &[]), view)
}

pub fn logout_form(ui: &Ui, lang: Lang) -> Response<Body> {
    ui.page(
        lang,
        StatusCode::OK,
        "logout.html",
        "logout",
        &ui.text(lang, "logout.title", &[]),
        &serde_json::json!({}),
    )
}

pub fn logged_out(ui: &Ui, lang: Lang, everywhere: bool) -> Response<Body> {
    let title = ui.text(lang, "logged_out.title", &[]);
    ui.page(
        lang,
        StatusCode::OK,
        "logged-out.html",
        "logged-out",
        &title,
        &serde_json::json!({ "everywhere": everywhere }),
    )
}

/// A moment for the command line and logs, the same in every language:
/// "2026-11-21 10:05 UTC".
pub fn when(ms: Option<u64>) -> String {
    let Some(ms) = ms else { return "never".into() };
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = i18n::civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, (rem % 3600) / 60)
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
