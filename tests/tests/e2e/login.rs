//! Sign-in, end to end: a real Chromium with a virtual authenticator, a real
//! SMTP server, real pages; then the attacks, over plain HTTP clients.

use std::time::Duration;

use pbxgate_e2e::browser::Browser;
use pbxgate_e2e::client::{https_get, https_request, Reply};
use pbxgate_e2e::redis::free_port;
use pbxgate_e2e::smtp::SmtpServer;
use pbxgate_e2e::{TestGateway, Upstream};

pub const LOGIN_POLICY: &str = r#"
domains = ["localhost"]
drop_user_agents = ["friendly-scanner"]

[[route]]
path = "/admin/"
access = "admin"
step_up = "15m"

[[route]]
path = "/public/"
access = "public"

[[route]]
path = "/"
access = "user"

[[user]]
name = "100"
email = "alice@example.com"
display_name = "Alice"
role = "user"

[[user]]
name = "101"
email = "bob@example.com"
role = "user"
password_login = true

[[user]]
name = "102"
email = "carol@example.com"
role = "user"

[[user]]
name = "svc"
email = "svc@example.com"
role = "api"
networks = ["127.0.0.0/8"]
basic_auth = true
"#;

/// A gateway on a known port (passkeys are bound to the origin), with SMTP.
pub struct Rig {
    pub upstream: Upstream,
    pub smtp: SmtpServer,
    pub gw: TestGateway,
    pub port: u16,
}

impl Rig {
    pub async fn start(extra: &str) -> Self {
        let upstream = Upstream::start().await;
        let smtp = SmtpServer::start();
        let port = free_port(false);
        let overrides = format!(
            "public_url = \"https://localhost:{port}\"\n[listen]\nhttps = \"127.0.0.1:{port}\"\n\
             [email]\nsmtp_url = \"{}\"\nfrom = \"PBX <pbx@example.com>\"\n{extra}",
            smtp.url()
        );
        let gw = TestGateway::start(&upstream.url(), LOGIN_POLICY, &overrides).await;
        Self { upstream, smtp, gw, port }
    }

    pub fn origin(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub async fn post(&self, path: &str, body: &str, extra: &[(&str, &str)]) -> Reply {
        let origin = self.origin();
        let host = format!("localhost:{}", self.port);
        let mut headers = vec![("origin", origin.as_str()), ("host", host.as_str())];
        if body.starts_with('{') {
            headers.push(("content-type", "application/json"));
        } else {
            headers.push(("content-type", "application/x-www-form-urlencoded"));
        }
        headers.extend_from_slice(extra);
        https_request(self.gw.https(), "POST", path, &headers, body).await
    }

    pub async fn get(&self, path: &str, cookie: Option<&str>) -> Reply {
        let host = format!("localhost:{}", self.port);
        let mut headers = vec![("host", host.as_str()), ("accept", "application/json")];
        if let Some(c) = cookie {
            headers.push(("cookie", c));
        }
        https_get(self.gw.https(), path, &headers).await
    }

    /// Asks for a sign-in link and returns its token.
    pub async fn link_token(&self, login: &str, to: &str, rd: &str) -> String {
        let seen = self.smtp.count();
        let reply = self.post("/.pbxgate/login/link", &format!("login={login}&rd={rd}"), &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let email = self.smtp.wait_for(to, seen);
        let link = email.link();
        link.split("token=").nth(1).expect("token in link").to_string()
    }

    /// Signs in by link; returns the reply and a Cookie header with both cookies.
    pub async fn link_login(&self, login: &str, to: &str) -> (Reply, String) {
        let token = self.link_token(login, to, "/home").await;
        let reply = self.post("/.pbxgate/link", &format!("token={token}"), &[]).await;
        assert_eq!(reply.status, 303, "{}", reply.text());
        let session = reply.cookie("__Host-pbxgate").expect("session cookie");
        let remember = reply.cookie("__Host-pbxgate-remember").expect("remember cookie");
        (reply, format!("__Host-pbxgate={session}; __Host-pbxgate-remember={remember}"))
    }
}

/// The whole journey of a person, in a real browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_link_login_passkey_offer_logout_and_passkey_logins() {
    let rig = Rig::start("").await;
    let origin = rig.origin();
    let browser = Browser::start().await;

    // An unauthenticated browser is sent to the login page, keeping where it was going.
    browser.goto(&format!("{origin}/calls/today?view=list")).await;
    browser.wait_for_path("/.pbxgate/login").await;
    assert_eq!(browser.eval("document.getElementById('rd').value").await, "/calls/today?view=list");
    assert_eq!(browser.eval("document.getElementById('login').autocomplete").await, "username webauthn");

    // First login by emailed link.
    let seen = rig.smtp.count();
    browser.fill("#login", "alice@example.com").await;
    browser.click("#link-button").await;
    browser.wait_for_path("/.pbxgate/login/link").await;
    let text = browser.text().await;
    assert!(text.contains("If an account matches"), "{text}");
    let email = rig.smtp.wait_for("alice@example.com", seen);
    assert!(email.subject.contains("Sign in"), "{email:?}");
    assert!(email.html.contains("<a href="), "an HTML part too");
    let link = email.link();
    assert!(link.starts_with(&format!("{origin}/.pbxgate/link?token=")), "{link}");

    // The landing page posts the token by itself, then offers a passkey.
    browser.goto(&link).await;
    browser.wait_for_path("/.pbxgate/passkey-offer").await;
    browser.fill("#device", "Test laptop").await;
    browser.click("#register-button").await;
    browser.wait_for_path("/calls/today").await;
    let echo: serde_json::Value = serde_json::from_str(&browser.text().await).expect("upstream echo");
    assert_eq!(echo["headers"]["remote-user"][0], "100", "the PBX sees who it is");
    assert_eq!(echo["headers"]["remote-email"][0], "alice@example.com");
    assert_eq!(echo["path"], "/calls/today?view=list");
    assert!(echo["headers"].get("cookie").is_none_or(|c| !c.to_string().contains("pbxgate")));
    let creds = browser.credentials().await;
    assert_eq!(creds.len(), 1);
    assert!(creds[0].is_resident_credential, "a discoverable passkey");

    // The account page lists it.
    browser.goto(&format!("{origin}/.pbxgate/account")).await;
    browser.wait_for_path("/.pbxgate/account").await;
    assert!(browser.text().await.contains("Test laptop"));

    // Sign out: the PBX is out of reach again.
    browser.goto(&format!("{origin}/.pbxgate/logout")).await;
    browser.click("#logout-form button.primary").await;
    browser.wait_until("document.body.dataset.page === 'logged-out'", "signed-out page").await;
    browser.goto(&format!("{origin}/calls/today")).await;
    browser.wait_for_path("/.pbxgate/login").await;

    // Passkey login by button, no name typed (discoverable credential).
    browser.click("#passkey-button").await;
    browser.wait_for_path("/calls/today").await;
    let echo: serde_json::Value = serde_json::from_str(&browser.text().await).expect("upstream echo");
    assert_eq!(echo["headers"]["remote-user"][0], "100");

    // Sign out again; then passkey autofill (conditional UI) when the field is focused.
    browser.goto(&format!("{origin}/.pbxgate/logout")).await;
    browser.click("#logout-form button.primary").await;
    browser.wait_until("document.body.dataset.page === 'logged-out'", "signed-out page").await;
    browser.goto(&format!("{origin}/.pbxgate/login?rd=/after/autofill")).await;
    browser.wait_for_path("/.pbxgate/login").await;
    browser.eval("document.getElementById('login').focus(), true").await;
    browser.wait_for_path("/after/autofill").await;
    let echo: serde_json::Value = serde_json::from_str(&browser.text().await).expect("upstream echo");
    assert_eq!(echo["headers"]["remote-user"][0], "100");

    // Name first, then passkey.
    browser.goto(&format!("{origin}/.pbxgate/logout")).await;
    browser.click("#logout-form button.primary").await;
    browser.wait_until("document.body.dataset.page === 'logged-out'", "signed-out page").await;
    browser.goto(&format!("{origin}/.pbxgate/login?rd=/named")).await;
    browser.wait_for_path("/.pbxgate/login").await;
    browser.fill("#login", "100").await;
    browser.click("#passkey-button").await;
    browser.wait_for_path("/named").await;

    // Replaying a finished passkey ceremony gets nothing.
    let replay = browser
        .eval(
            r#"(async () => {
            const post = (u, b) => fetch(u, {method: 'POST', headers: {'content-type': 'application/json'}, body: JSON.stringify(b)});
            const start = await (await post('/.pbxgate/api/passkey/login/start', {})).json();
            const cred = await navigator.credentials.get({publicKey: PublicKeyCredential.parseRequestOptionsFromJSON(start.publicKey)});
            const body = {ceremony: start.ceremony, credential: cred.toJSON(), rd: '/'};
            const first = await post('/.pbxgate/api/passkey/login/finish', body);
            const second = await post('/.pbxgate/api/passkey/login/finish', body);
            return [first.status, second.status];
        })()"#,
        )
        .await;
    assert_eq!(replay, serde_json::json!([200, 401]), "the same ceremony works once");
    browser.close().await;
}
