//! Pages and emails: minijinja templates that escape HTML by default, one
//! typed view per page, the messages in the person's language and the
//! operator's brand around them.
//!
//! The templates are files under `gateway/templates/`, built into the
//! binary; `[ui] templates_dir` may hold an operator's versions of any of
//! them, by the same name, read and checked at start.

pub mod device;
pub mod i18n;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{Either, Full};
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, ErrorKind, State as TemplateState, UndefinedBehavior};
use serde::Serialize;

pub use i18n::Lang;

use crate::Body;

/// The built-in templates, by name.
const TEMPLATES: [(&str, &str); 18] = [
    ("base.html", include_str!("../templates/base.html")),
    ("notice.html", include_str!("../templates/notice.html")),
    ("login.html", include_str!("../templates/login.html")),
    ("link-sent.html", include_str!("../templates/link-sent.html")),
    ("link.html", include_str!("../templates/link.html")),
    ("link-failed.html", include_str!("../templates/link-failed.html")),
    ("passkey-offer.html", include_str!("../templates/passkey-offer.html")),
    ("account.html", include_str!("../templates/account.html")),
    ("logout.html", include_str!("../templates/logout.html")),
    ("logged-out.html", include_str!("../templates/logged-out.html")),
    ("unlock.html", include_str!("../templates/unlock.html")),
    ("admin.html", include_str!("../templates/admin.html")),
    ("admin-action.html", include_str!("../templates/admin-action.html")),
    ("admin-user.html", include_str!("../templates/admin-user.html")),
    ("admin-history.html", include_str!("../templates/admin-history.html")),
    ("error.html", include_str!("../templates/error.html")),
    ("email-link.txt", include_str!("../templates/email-link.txt")),
    ("email-link.html", include_str!("../templates/email-link.html")),
];

/// What the pages and emails say about whose service this is.
#[derive(Debug, Clone, Serialize)]
pub struct Brand {
    pub product: String,
    /// Same-origin path of the logo, when there is one.
    pub logo: Option<String>,
    /// The logo for emails: under the configured public URL.
    pub logo_url: Option<String>,
    /// `#rgb` or `#rrggbb`, checked when the configuration is read.
    pub accent: String,
    /// An email address or phone line for people who are stuck.
    pub support: Option<String>,
}

/// The neutral accent, the stylesheet's own.
pub const DEFAULT_ACCENT: &str = "#1f6feb";

/// Everything a page or email is rendered with, built once at start.
pub struct Ui {
    env: Environment<'static>,
    pub brand: Brand,
    pub default_lang: Lang,
    /// The stylesheet, with the operator's accent colour.
    pub css: Bytes,
    /// The logo file's bytes and kind.
    pub logo: Option<(Bytes, LogoKind)>,
}

/// The logo's file type, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogoKind {
    Svg,
    Png,
}

impl LogoKind {
    pub fn of(path: &Path) -> Option<Self> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "svg" => Some(Self::Svg),
            "png" => Some(Self::Png),
            _ => None,
        }
    }

    /// Where the gateway serves it.
    pub fn path(self) -> &'static str {
        match self {
            Self::Svg => "/.pbxgate/assets/logo.svg",
            Self::Png => "/.pbxgate/assets/logo.png",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Svg => "image/svg+xml",
            Self::Png => "image/png",
        }
    }
}

const CSS: &str = include_str!("../assets/pbxgate.css");

/// The largest logo the gateway serves: a logo, not a photo.
const MAX_LOGO_BYTES: u64 = 512 * 1024;

/// A page's frame: what the shell (`base.html`) needs, and the page's own view.
#[derive(Serialize)]
struct Frame<'a, V: Serialize> {
    lang: &'static str,
    dir: &'static str,
    page: &'a str,
    title: &'a str,
    brand: &'a Brand,
    #[serde(flatten)]
    view: &'a V,
}

impl Ui {
    /// The pages and emails as `[ui]` configures them (reads the logo and
    /// any operator templates now).
    pub fn from_config(config: &crate::Config) -> Result<Self, String> {
        let u = &config.ui;
        let logo = match &u.logo {
            Some(path) => {
                let kind = LogoKind::of(path)
                    .ok_or_else(|| format!("ui.logo: {}: not .svg or .png", path.display()))?;
                let size =
                    std::fs::metadata(path).map_err(|e| format!("ui.logo: {}: {e}", path.display()))?.len();
                if size > MAX_LOGO_BYTES {
                    return Err(format!("ui.logo: {}: larger than {MAX_LOGO_BYTES} bytes", path.display()));
                }
                let bytes = std::fs::read(path).map_err(|e| format!("ui.logo: {}: {e}", path.display()))?;
                Some((Bytes::from(bytes), kind))
            }
            None => None,
        };
        let accent = u.accent_color.clone().unwrap_or_else(|| DEFAULT_ACCENT.to_string());
        let brand = Brand {
            product: u.product_name.clone(),
            logo: logo.as_ref().map(|(_, kind)| kind.path().to_string()),
            logo_url: logo.as_ref().map(|(_, kind)| format!("{}{}", config.public_url.origin, kind.path())),
            accent,
            support: u.support.clone(),
        };
        let mut ui = Self::new(brand, u.default_language, u.templates_dir.as_deref())
            .map_err(|e| format!("ui.templates_dir: {e}"))?;
        ui.logo = logo;
        Ok(ui)
    }

    /// Compiles the templates (the built-in ones, then any of the same name
    /// in `templates_dir`). Errors name the template and what is wrong.
    pub fn new(brand: Brand, default_lang: Lang, templates_dir: Option<&Path>) -> Result<Self, String> {
        let mut env = Environment::new();
        // A misspelt variable in an operator's template is an error, not an empty string.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_function("t", translate);
        for (name, source) in TEMPLATES {
            let source = match templates_dir.map(|dir| dir.join(name)).filter(|p| p.is_file()) {
                Some(path) => {
                    std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?
                }
                None => source.to_string(),
            };
            env.add_template_owned(name, source).map_err(|e| format!("template {name}: {e}"))?;
        }
        // The accent is checked to be `#rgb`/`#rrggbb` when the configuration is read.
        let css = match brand.accent.as_str() {
            DEFAULT_ACCENT => Bytes::from_static(CSS.as_bytes()),
            accent => Bytes::from(format!("{CSS}:root {{ --accent: {accent}; }}\n")),
        };
        let ui = Self { env, brand, default_lang, css, logo: None };
        // Each template is rendered once now, so a broken one stops start-up
        // instead of a sign-in.
        ui.check().map_err(|e| format!("template: {e:#}"))?;
        Ok(ui)
    }

    /// The text of `key` in `lang`, placeholders filled.
    pub fn text(&self, lang: Lang, key: &str, args: &[(&str, &str)]) -> String {
        i18n::messages().text(lang, key, args)
    }

    /// Renders `template` with a view (a page's or an email's).
    pub fn render<V: Serialize>(
        &self,
        lang: Lang,
        template: &str,
        page: &str,
        title: &str,
        view: &V,
    ) -> Result<String, minijinja::Error> {
        let frame = Frame { lang: lang.code(), dir: lang.dir(), page, title, brand: &self.brand, view };
        self.env.get_template(template)?.render(Value::from(Serde(&frame)))
    }

    /// A whole page: `page` names it for the script (`<body data-page>`).
    pub fn page<V: Serialize>(
        &self,
        lang: Lang,
        status: StatusCode,
        template: &str,
        page: &str,
        title: &str,
        view: &V,
    ) -> Response<Body> {
        match self.render(lang, template, page, title, view) {
            Ok(html) => html_response(status, html),
            Err(e) => {
                tracing::error!(template, error = %e, "page could not be rendered");
                let mut response = crate::error::empty(StatusCode::INTERNAL_SERVER_ERROR);
                crate::reserved::page_headers(response.headers_mut());
                response
            }
        }
    }

    /// The page for a refusal: its title and message in `lang`.
    pub fn error_page(&self, lang: Lang, status: StatusCode, code: &str, message: &str) -> Response<Body> {
        let title = self.text(lang, &format!("error.{code}.title"), &[]);
        #[derive(Serialize)]
        struct View<'a> {
            message: &'a str,
        }
        self.page(lang, status, "error.html", "error", &title, &View { message })
    }

    /// Renders every template in every language with sample views.
    fn check(&self) -> Result<(), minijinja::Error> {
        for lang in Lang::ALL {
            for (name, page, view) in samples::all() {
                self.render(lang, name, page, "Title", &view)?;
            }
        }
        Ok(())
    }
}

fn html_response(status: StatusCode, html: String) -> Response<Body> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(html))));
    *response.status_mut() = status;
    crate::reserved::page_headers(response.headers_mut());
    response
}

/// `t("key", name=value, …)`: the message in the page's language. Its
/// output is text, escaped like any other value in an HTML template.
fn translate(state: &TemplateState, key: &str, kwargs: Kwargs) -> Result<String, minijinja::Error> {
    let lang = state
        .lookup("lang")
        .and_then(|v| v.as_str().and_then(Lang::from_tag))
        .ok_or_else(|| minijinja::Error::new(ErrorKind::InvalidOperation, "no page language"))?;
    let mut args: Vec<(String, String)> = Vec::new();
    for name in kwargs.args() {
        let value: Value = kwargs.get(name)?;
        args.push((name.to_string(), value.to_string()));
    }
    kwargs.assert_all_used()?;
    let borrowed: Vec<(&str, &str)> = args.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    if i18n::messages().raw(lang, key).is_none() && i18n::messages().raw(Lang::En, key).is_none() {
        return Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("no message {key:?}")));
    }
    Ok(i18n::messages().text(lang, key, &borrowed))
}

/// Views with every field filled, for the start-up check and the tests.
pub(crate) mod samples {
    use serde_json::json;

    pub fn all() -> Vec<(&'static str, &'static str, serde_json::Value)> {
        let languages = json!([{"code": "en", "name": "English", "href": "/.pbxgate/login?lang=en", "current": true},
            {"code": "de", "name": "Deutsch", "href": "/.pbxgate/login?lang=de", "current": false}]);
        vec![
            (
                "login.html",
                "login",
                json!({"rd": "/", "login": "100", "notice": "n", "notice_kind": "error",
                "passwords": true, "password_open": true, "languages": languages}),
            ),
            ("link-sent.html", "link-sent", json!({"valid_for": "15 minutes"})),
            ("link.html", "link", json!({"token": "t"})),
            ("link-failed.html", "link-failed", json!({})),
            ("passkey-offer.html", "passkey-offer", json!({"rd": "/", "required": false, "notice": null})),
            ("passkey-offer.html", "passkey-offer", json!({"rd": "/", "required": true, "notice": null})),
            (
                "account.html",
                "account",
                json!({"user": "100", "notice": null,
                "passkeys": [{"id": "i", "name": "n", "created": "c", "used": "u"}],
                "sessions": [{"current": true, "created": "c", "seen": "s", "ip": "127.0.0.1"}]}),
            ),
            (
                "account.html",
                "account",
                json!({"user": "100", "notice": null, "passkeys": [], "sessions": []}),
            ),
            ("logout.html", "logout", json!({})),
            ("logged-out.html", "logged-out", json!({"everywhere": true})),
            (
                "unlock.html",
                "unlock",
                json!({"rd": "/", "notice": "n", "notice_kind": "error", "unlocked_until": "u",
                "choices": [{"minutes": 5, "label": "5", "selected": true}], "password": true}),
            ),
            (
                "admin.html",
                "admin",
                json!({"users": [{"href": "/", "name": "n", "role": "r", "email": "e",
                "passkeys": 1, "last_login": "l"}]}),
            ),
            (
                "admin-user.html",
                "admin-user",
                json!({"history_href": "/", "user": "u", "sessions": 1, "onboarding": true, "required_by": "",
                "tokens": [{"id": "i", "created": "c", "last_used": "l", "last_ip": "ip", "user_agent": "ua", "expires": "e"}],
                "passkeys": [{"id": "i", "name": "n", "created": "c", "last_used": "l"}]}),
            ),
            (
                "admin-user.html",
                "admin-user",
                json!({"history_href": "/", "user": "u", "sessions": 0, "onboarding": false, "required_by": "r",
                "tokens": [], "passkeys": []}),
            ),
            (
                "admin-history.html",
                "admin-history",
                json!({"events": [{"time": "t", "user": "u", "method": "m",
                "result": "r", "ip": "ip", "user_agent": "ua"}]}),
            ),
            ("error.html", "error", json!({"message": "m"})),
            (
                "email-link.txt",
                "",
                json!({"subject": "s", "intro": "i", "user": "u", "valid_for": "v", "link": "https://x/"}),
            ),
            (
                "email-link.html",
                "",
                json!({"subject": "s", "intro": "i", "user": "u", "valid_for": "v", "link": "https://x/"}),
            ),
        ]
    }
}

impl std::fmt::Debug for Ui {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ui").field("brand", &self.brand).field("default_lang", &self.default_lang).finish()
    }
}

/// Shared by the state and the mailer.
pub type SharedUi = Arc<Ui>;

#[cfg(test)]
mod tests;
