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
        Self::start_with(LOGIN_POLICY, extra).await
    }

    pub async fn start_with(policy: &str, extra: &str) -> Self {
        let upstream = Upstream::start().await;
        let smtp = SmtpServer::start();
        let port = free_port(false);
        let overrides = format!(
            "public_url = \"https://localhost:{port}\"\n[listen]\nhttps = \"127.0.0.1:{port}\"\n\
             [email]\nsmtp_url = \"{}\"\nfrom = \"PBX <pbx@example.com>\"\n{extra}",
            smtp.url()
        );
        let gw = TestGateway::start(&upstream.url(), policy, &overrides).await;
        Self { upstream, smtp, gw, port }
    }

    pub fn origin(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    pub async fn post(&self, path: &str, body: &str, extra: &[(&str, &str)]) -> Reply {
        self.post_from(None, path, body, extra).await
    }

    pub async fn post_from(
        &self,
        from: Option<&str>,
        path: &str,
        body: &str,
        extra: &[(&str, &str)],
    ) -> Reply {
        let origin = self.origin();
        let host = format!("localhost:{}", self.port);
        let mut headers = vec![("origin", origin.as_str()), ("host", host.as_str())];
        if body.starts_with('{') {
            headers.push(("content-type", "application/json"));
        } else {
            headers.push(("content-type", "application/x-www-form-urlencoded"));
        }
        headers.extend_from_slice(extra);
        let from = from.map(|ip| ip.parse().expect("ip"));
        pbxgate_e2e::client::https_request_from(from, self.gw.https(), "POST", path, &headers, body).await
    }

    pub async fn get(&self, path: &str, cookie: Option<&str>) -> Reply {
        self.get_from(None, path, cookie, &[]).await
    }

    pub async fn get_from(
        &self,
        from: Option<&str>,
        path: &str,
        cookie: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Reply {
        let host = format!("localhost:{}", self.port);
        let mut headers = vec![("host", host.as_str())];
        if !extra.iter().any(|(n, _)| n.eq_ignore_ascii_case("accept")) {
            headers.push(("accept", "application/json"));
        }
        if let Some(c) = cookie {
            headers.push(("cookie", c));
        }
        headers.extend_from_slice(extra);
        let from = from.map(|ip| ip.parse().expect("ip"));
        pbxgate_e2e::client::https_request_from(from, self.gw.https(), "GET", path, &headers, "").await
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

/// Signs out through the real page.
async fn sign_out(browser: &Browser, origin: &str) {
    browser.goto(&format!("{origin}/.pbxgate/logout")).await;
    browser.click("#logout-form button.primary").await;
    browser.wait_until("document.body.dataset.page === 'logged-out'", "signed-out page").await;
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
    sign_out(&browser, &origin).await;
    browser.goto(&format!("{origin}/calls/today")).await;
    browser.wait_for_path("/.pbxgate/login").await;

    // Passkey login by button, no name typed (discoverable credential).
    browser.click("#passkey-button").await;
    browser.wait_for_path("/calls/today").await;
    let echo: serde_json::Value = serde_json::from_str(&browser.text().await).expect("upstream echo");
    assert_eq!(echo["headers"]["remote-user"][0], "100");

    // Sign out again; then passkey autofill (conditional UI) when the field is focused.
    sign_out(&browser, &origin).await;
    browser.goto(&format!("{origin}/.pbxgate/login?rd=/after/autofill")).await;
    browser.wait_for_path("/.pbxgate/login").await;
    browser.eval("document.getElementById('login').focus(), true").await;
    browser.wait_for_path("/after/autofill").await;
    let echo: serde_json::Value = serde_json::from_str(&browser.text().await).expect("upstream echo");
    assert_eq!(echo["headers"]["remote-user"][0], "100");

    // Name first, then passkey.
    sign_out(&browser, &origin).await;
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

// ---- attacks and rules, over plain HTTP ------------------------------------

const ATTACKER_SESSION: &str =
    "__Host-pbxgate=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_signs_in_exactly_once_and_get_does_not_use_it() {
    let rig = Rig::start("").await;
    let token = rig.link_token("100", "alice@example.com", "/home").await;
    // Mail scanners open links: GET shows the page and changes nothing.
    for _ in 0..2 {
        let page = rig.get(&format!("/.pbxgate/link?token={token}"), None).await;
        assert_eq!(page.status, 200);
        assert!(page.header("set-cookie").is_none());
    }
    let first = rig.post("/.pbxgate/link", &format!("token={token}"), &[]).await;
    assert_eq!(first.status, 303);
    assert_eq!(first.header("location"), Some("/.pbxgate/passkey-offer?rd=/home"));
    let second = rig.post("/.pbxgate/link", &format!("token={token}"), &[]).await;
    assert_eq!(second.status, 400);
    assert!(second.cookie("__Host-pbxgate").is_none());

    // Ten at once: one session.
    let token = rig.link_token("100", "alice@example.com", "/").await;
    let rig = std::sync::Arc::new(rig);
    let tries: Vec<_> = (0..10)
        .map(|_| {
            let (rig, token) = (rig.clone(), token.clone());
            tokio::spawn(async move {
                rig.post("/.pbxgate/link", &format!("token={token}"), &[]).await.status.as_u16()
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tries {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 303).count(), 1, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_expires() {
    let rig = Rig::start("[links]\nttl = \"1s\"\n").await;
    let token = rig.link_token("100", "alice@example.com", "/").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rig.post("/.pbxgate/link", &format!("token={token}"), &[]).await.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_is_the_same_whether_the_account_exists_or_not() {
    let rig = Rig::start("").await;
    let known = rig.post("/.pbxgate/login/link", "login=100&rd=/", &[]).await;
    rig.smtp.wait_for("alice@example.com", 0);
    let before = rig.smtp.count();
    let unknown = rig.post("/.pbxgate/login/link", "login=999&rd=/", &[]).await;
    let api_account = rig.post("/.pbxgate/login/link", "login=svc&rd=/", &[]).await;
    assert_eq!(known.status, unknown.status);
    assert_eq!(known.text(), unknown.text());
    assert_eq!(known.text(), api_account.text());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(rig.smtp.count(), before, "no email for an unknown or API account");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_id_from_before_login_is_not_valid_after() {
    let rig = Rig::start("").await;
    let token = rig.link_token("100", "alice@example.com", "/").await;
    let reply = rig.post("/.pbxgate/link", &format!("token={token}"), &[("cookie", ATTACKER_SESSION)]).await;
    assert_eq!(reply.status, 303);
    let issued = reply.cookie("__Host-pbxgate").unwrap();
    assert!(!ATTACKER_SESSION.ends_with(&issued), "a fresh session id");
    assert_eq!(rig.get("/home", Some(ATTACKER_SESSION)).await.status, 401);
    let good = format!("__Host-pbxgate={issued}");
    assert_eq!(rig.get("/home", Some(&good)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn return_paths_to_other_sites_are_refused() {
    let rig = Rig::start("").await;
    rig.gw
        .store
        .set_password_hash("101", &pbxgate::auth::passwords::hash("Correct horse 42!".into()).await.unwrap())
        .await
        .unwrap();
    for rd in [
        "//evil.example",
        "/\\evil.example",
        "https://evil.example",
        "%2F%2Fevil.example",
        "/%2F%2Fevil.example",
        "/%5Cevil.example",
        "%252F%252Fevil.example",
        "javascript:alert(1)",
    ] {
        let encoded = pbxgate::error::encode_rd(rd);
        let reply = rig
            .post(
                "/.pbxgate/login/password",
                &format!("login=101&password=Correct+horse+42%21&rd={encoded}"),
                &[],
            )
            .await;
        assert_eq!(reply.status, 303, "{rd}: {}", reply.text());
        assert_eq!(reply.header("location"), Some("/"), "{rd}");
    }
    // Through an emailed link too.
    let token =
        rig.link_token("100", "alice@example.com", &pbxgate::error::encode_rd("//evil.example")).await;
    let reply = rig.post("/.pbxgate/link", &format!("token={token}"), &[]).await;
    assert_eq!(reply.header("location"), Some("/.pbxgate/passkey-offer?rd=/"));
    // And a good one survives.
    let reply = rig
        .post("/.pbxgate/login/password", "login=101&password=Correct+horse+42%21&rd=/calls%3Fday%3Dmon", &[])
        .await;
    assert_eq!(reply.header("location"), Some("/calls?day=mon"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_from_other_origins_are_refused() {
    let rig = Rig::start("").await;
    let host = format!("localhost:{}", rig.port);
    for path in
        ["/.pbxgate/login/link", "/.pbxgate/link", "/.pbxgate/logout", "/.pbxgate/api/passkey/login/start"]
    {
        for headers in [
            vec![("origin", "https://evil.example")],
            vec![("origin", "null"), ("sec-fetch-site", "cross-site")],
            vec![("sec-fetch-site", "cross-site")],
            vec![],
        ] {
            let mut h = headers.clone();
            h.push(("host", &host));
            h.push(("content-type", "application/json"));
            let reply = https_request(rig.gw.https(), "POST", path, &h, "{}").await;
            assert_eq!(reply.status, 403, "{path} {headers:?}");
        }
    }
    // A same-origin navigation from a no-referrer page (Origin: null) is fine.
    let reply = https_request(
        rig.gw.https(),
        "POST",
        "/.pbxgate/api/passkey/login/start",
        &[
            ("host", &host),
            ("origin", "null"),
            ("sec-fetch-site", "same-origin"),
            ("content-type", "application/json"),
        ],
        "{}",
    )
    .await;
    assert_eq!(reply.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_only_where_allowed_and_brute_force_is_locked_out() {
    let rig = Rig::start("").await;
    let hash = pbxgate::auth::passwords::hash("Correct horse 42!".into()).await.unwrap();
    rig.gw.store.set_password_hash("101", &hash).await.unwrap();
    rig.gw.store.set_password_hash("102", &hash).await.unwrap();
    let login = |who: &str, pw: &str| format!("{{\"login\":\"{who}\",\"password\":\"{pw}\",\"rd\":\"/x\"}}");

    let ok =
        rig.post("/.pbxgate/api/password/login", &login("bob@example.com", "Correct horse 42!"), &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert!(ok.cookie("__Host-pbxgate").is_some());
    // 102 has a hash but password sign-in is not enabled for the account.
    let refused = rig.post("/.pbxgate/api/password/login", &login("102", "Correct horse 42!"), &[]).await;
    let wrong = rig.post("/.pbxgate/api/password/login", &login("101", "nope"), &[]).await;
    let unknown = rig.post("/.pbxgate/api/password/login", &login("999", "nope"), &[]).await;
    for r in [&refused, &wrong, &unknown] {
        assert_eq!(r.status, 401);
        assert_eq!(r.text(), wrong.text(), "one answer for every failure");
    }
    // Keep guessing: locked, even with the right password, with a message that tells nothing.
    for _ in 0..10 {
        rig.post("/.pbxgate/api/password/login", &login("101", "guess"), &[]).await;
    }
    let locked = rig.post("/.pbxgate/api/password/login", &login("101", "Correct horse 42!"), &[]).await;
    assert_eq!(locked.status, 429);
    assert_eq!(locked.json()["error"], "too_many_attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sessions_renew_from_the_remember_token_until_it_expires() {
    let rig = Rig::start("[session]\nidle_timeout = \"1s\"\nlogin_token_ttl = \"4s\"\n").await;
    let (_, cookies) = rig.link_login("100", "alice@example.com").await;
    let first = rig.get("/home", Some(&cookies)).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.json()["headers"]["remote-user"][0], "100");

    tokio::time::sleep(Duration::from_millis(1600)).await;
    let session_only = cookies.split(';').next().unwrap().to_string();
    assert_eq!(rig.get("/home", Some(&session_only)).await.status, 401, "the session went idle");
    let renewed = rig.get("/home", Some(&cookies)).await;
    assert_eq!(renewed.status, 200, "the remember token made a new session silently");
    let fresh = renewed.cookie("__Host-pbxgate").expect("a new session cookie");
    assert!(!cookies.contains(&fresh));

    tokio::time::sleep(Duration::from_millis(3000)).await;
    let remember_only = cookies.split(';').nth(1).unwrap().trim().to_string();
    let expired = https_get(
        rig.gw.https(),
        "/home",
        &[("host", &format!("localhost:{}", rig.port)), ("accept", "text/html"), ("cookie", &remember_only)],
    )
    .await;
    assert_eq!(expired.status, 302, "after the remember token expires: the login page");
    assert_eq!(expired.header("location"), Some("/.pbxgate/login?rd=/home"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_out_everywhere_ends_every_session_token_and_websocket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rig = Rig::start("").await;
    let (_, laptop) = rig.link_login("100", "alice@example.com").await;
    let (_, phone) = rig.link_login("100", "alice@example.com").await;
    assert_eq!(rig.get("/home", Some(&phone)).await.status, 200);

    // The phone has a websocket open to the PBX.
    let mut ws = pbxgate_e2e::client::tls_connect(rig.gw.https(), &Default::default()).await.unwrap();
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost:{}\r\nCookie: {phone}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        rig.port
    );
    ws.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    ws.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");

    let out = rig.post("/.pbxgate/api/logout", "{\"everywhere\":true}", &[("cookie", &laptop)]).await;
    assert_eq!(out.status, 200);
    assert_eq!(out.cookie("__Host-pbxgate").as_deref(), Some(""), "cookies cleared");
    assert_eq!(rig.get("/home", Some(&laptop)).await.status, 401);
    assert_eq!(
        rig.get("/home", Some(&phone)).await.status,
        401,
        "the phone's session and token are gone too"
    );

    // The websocket opened under the phone's session is closed.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), ws.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the websocket must be closed after sign-out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_gets_a_signed_assertion_it_can_verify() {
    let rig = Rig::start("[headers]\nassertion = \"X-Pbxgate-Assertion\"\n").await;
    let (_, cookies) = rig.link_login("100", "alice@example.com").await;
    let echo = rig.get("/home", Some(&cookies)).await.json();
    let jwt = echo["headers"]["x-pbxgate-assertion"][0].as_str().expect("assertion header").to_string();
    let jwks = rig.get("/.well-known/pbxgate/jwks.json", None).await.json();
    let key = &jwks["keys"][0];
    let decoding =
        jsonwebtoken::DecodingKey::from_ec_components(key["x"].as_str().unwrap(), key["y"].as_str().unwrap())
            .unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&[rig.upstream.url()]);
    let claims =
        jsonwebtoken::decode::<serde_json::Value>(&jwt, &decoding, &validation).expect("valid signature");
    assert_eq!(claims.claims["sub"], "100");
    assert_eq!(claims.claims["email"], "alice@example.com");
    assert_eq!(claims.claims["role"], "user");
    assert_eq!(claims.header.kid.as_deref(), key["kid"].as_str());
    // A client cannot bring its own.
    let host = format!("localhost:{}", rig.port);
    let forged = https_get(
        rig.gw.https(),
        "/public/x",
        &[("host", &host), ("cookie", &cookies), ("x-pbxgate-assertion", "forged")],
    )
    .await
    .json();
    assert!(forged["headers"].get("x-pbxgate-assertion").is_none(), "{forged}");
}

/// Identity headers are made once per user and policy, and the assertion is
/// reused for half its life: a reload must still change what the PBX sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_follow_a_policy_reload() {
    use base64::Engine as _;
    let rig = Rig::start("[headers]\nassertion = \"X-Pbxgate-Assertion\"\n").await;
    let (_, cookies) = rig.link_login("100", "alice@example.com").await;
    let header =
        |echo: &serde_json::Value, name: &str| echo["headers"][name][0].as_str().unwrap_or("").to_string();
    let claims = |jwt: &str| {
        let payload = jwt.split('.').nth(1).unwrap_or_default();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("JWT payload");
        serde_json::from_slice::<serde_json::Value>(&bytes).expect("JWT claims")
    };
    let first = rig.get("/home", Some(&cookies)).await.json();
    let second = rig.get("/home", Some(&cookies)).await.json();
    assert_eq!(header(&first, "remote-email"), "alice@example.com");
    assert_eq!(header(&first, "remote-name"), "Alice");
    let jwt = header(&first, "x-pbxgate-assertion");
    assert_eq!(claims(&jwt)["email"], "alice@example.com");
    assert_eq!(header(&second, "x-pbxgate-assertion"), jwt, "reused within its half-life");

    let changed = LOGIN_POLICY.replacen("alice@example.com", "alice@pbx.example.org", 1).replacen(
        "display_name = \"Alice\"",
        "display_name = \"Alice Smith\"",
        1,
    );
    rig.gw.write_policy(&changed);
    let mut echo = serde_json::Value::Null;
    for _ in 0..60 {
        echo = rig.get("/home", Some(&cookies)).await.json();
        if header(&echo, "remote-email") == "alice@pbx.example.org" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        header(&echo, "remote-email"),
        "alice@pbx.example.org",
        "the reload reaches the headers: {echo}"
    );
    assert_eq!(header(&echo, "remote-name"), "Alice Smith");
    assert_eq!(header(&echo, "remote-user"), "100");
    let fresh = header(&echo, "x-pbxgate-assertion");
    assert_eq!(claims(&fresh)["email"], "alice@pbx.example.org", "a new assertion for the new policy");
}

/// Requests arriving together (a page's burst over HTTP/2) share one store
/// read of their session, and a busy session costs about one read a second:
/// half-way through its cache entry's life one request has it read again in
/// the background, so the entry never runs out under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_read_once_for_a_burst_and_about_once_a_second_when_busy() {
    use http_body_util::BodyExt as _;
    let redis = pbxgate_e2e::redis::RedisServer::start();
    let rig = Rig::start(&format!("[store]\nurl = \"{}\"\n", redis.url())).await;
    let (_, cookies) = rig.link_login("100", "alice@example.com").await;
    // Session reads are GETs (the revocation poll reads a sorted set).
    let gets = || {
        let stats = redis.cli(&["INFO", "commandstats"]).expect("redis-cli INFO");
        stats
            .lines()
            .find_map(|l| l.strip_prefix("cmdstat_get:calls=")?.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let options = pbxgate_e2e::client::TlsOptions { alpn: &[b"h2"], ..Default::default() };
    let tls = pbxgate_e2e::client::tls_connect(rig.gw.https(), &options).await.expect("TLS");
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2");
    tokio::spawn(connection);
    let host = format!("localhost:{}", rig.port);
    let burst = || {
        let requests = (0..32).map(|_| {
            let mut sender = sender.clone();
            let request = pbxgate_e2e::client::get(
                &format!("https://{host}/home"),
                &[("cookie", &cookies), ("accept", "application/json")],
            );
            async move {
                let response = sender.send_request(request).await.expect("response");
                let status = response.status();
                response.into_body().collect().await.expect("body");
                assert_eq!(status, 200);
            }
        });
        futures_util::future::join_all(requests)
    };

    let before = gets();
    burst().await;
    assert_eq!(gets() - before, 1, "32 requests together, nothing cached: one read");

    let before = gets();
    let started = std::time::Instant::now();
    let mut bursts = 0;
    while started.elapsed() < Duration::from_millis(3_500) {
        burst().await;
        bursts += 1;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reads = gets() - before;
    assert!((3..=5).contains(&reads), "{reads} session reads for {bursts} bursts of 32 in 3.5 s");
}

/// The first run of a newcomer: plain http://localhost (a secure context, so
/// passkeys and Secure cookies work without a trusted certificate).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_run_on_plain_http_localhost_reaches_a_working_login() {
    let upstream = Upstream::start().await;
    let smtp = SmtpServer::start();
    let port = free_port(false);
    let overrides = format!(
        "public_url = \"https://localhost:8443\"\n[listen]\nhttp = \"127.0.0.1:{port}\"\n\
         [webauthn]\norigins = [\"http://localhost:{port}\"]\n[email]\nsmtp_url = \"{}\"\n",
        smtp.url()
    );
    let gw = TestGateway::start(&upstream.url(), LOGIN_POLICY, &overrides).await;
    let origin = format!("http://localhost:{port}");
    let browser = Browser::start().await;
    browser.goto(&format!("{origin}/welcome")).await;
    browser.wait_for_path("/.pbxgate/login").await;
    browser.fill("#login", "100").await;
    browser.click("#link-button").await;
    let link = smtp.wait_for("alice@example.com", 0).link();
    assert!(link.starts_with(&origin), "the link points where the person is: {link}");
    browser.goto(&link).await;
    browser.wait_for_path("/.pbxgate/passkey-offer").await;
    browser.click("#register-button").await;
    browser.wait_for_path("/welcome").await;
    let echo: serde_json::Value = serde_json::from_str(&browser.text().await).expect("upstream echo");
    assert_eq!(echo["headers"]["remote-user"][0], "100");
    assert_eq!(browser.credentials().await.len(), 1);
    drop(gw);
    browser.close().await;
}

/// The command line (set-password, invite) and then a gateway process whose
/// every log line is searched for every secret handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_passwords_and_invites_and_no_secret_in_any_log_line() {
    let upstream = Upstream::start().await;
    let smtp = SmtpServer::start();
    let dir = pbxgate_e2e::TempDir::new("cli");
    let config = pbxgate_e2e::write_config(&dir, &upstream.url(), LOGIN_POLICY);
    let port = free_port(false);
    let (smtp_url, public, listen) =
        (smtp.url(), format!("https://localhost:{port}"), format!("127.0.0.1:{port}"));
    let env = [
        ("PBXGATE_EMAIL__SMTP_URL", smtp_url.as_str()),
        ("PBXGATE_PUBLIC_URL", public.as_str()),
        ("PBXGATE_LISTEN__HTTPS", listen.as_str()),
        ("RUST_LOG", "debug"),
    ];
    let cli = |args: &[&str], stdin: &str| pbxgate_e2e::process::command(&config, &env, args, stdin);
    let password = "Correct horse 42!";
    // Before the first start: no gateway has made the store yet.
    let (code, out) = cli(&["user", "set-password", "101"], &format!("{password}\n"));
    assert_eq!(code, Some(2), "a new store is made only when asked: {out}");
    assert!(out.contains("--create"), "{out}");
    let (code, out) = cli(&["user", "set-password", "101", "--create"], "abc\n");
    assert_eq!(code, Some(2), "a weak password is refused: {out}");
    let (code, out) = cli(&["user", "set-password", "101"], &format!("{password}\n"));
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains(password));
    let (code, out) = cli(&["user", "set-password", "nobody"], &format!("{password}\n"));
    assert_eq!(code, Some(2), "{out}");
    let (code, out) = cli(&["user", "invite", "100"], "");
    assert_eq!(code, Some(0), "{out}");
    let invite = smtp.wait_for("alice@example.com", 0);
    assert!(invite.subject.contains("Welcome"), "{invite:?}");
    assert!(invite.text.contains("72 hours"), "the invite says how long it works: {}", invite.text);
    let invite_link = invite.link();
    assert!(invite_link.starts_with(&public));
    let invite_token = invite_link.split("token=").nth(1).unwrap().to_string();

    let gw = pbxgate_e2e::GatewayProcess::start(&config, &env);
    let https = gw.https.expect("https");
    let host = format!("localhost:{port}");
    let post = |path: &'static str, body: String, cookie: Option<String>| {
        let (host, public) = (host.clone(), public.clone());
        async move {
            let mut h = vec![
                ("host", host.as_str()),
                ("origin", public.as_str()),
                ("content-type", "application/x-www-form-urlencoded"),
            ];
            let cookie = cookie.unwrap_or_default();
            if !cookie.is_empty() {
                h.push(("cookie", cookie.as_str()));
            }
            https_request(https, "POST", path, &h, &body).await
        }
    };
    let mut secrets = vec![invite_token.clone(), password.to_string()];

    // The invite signs in once.
    let reply = post("/.pbxgate/link", format!("token={invite_token}"), None).await;
    assert_eq!(reply.status, 303, "{}", reply.text());
    secrets.push(reply.cookie("__Host-pbxgate").unwrap());
    secrets.push(reply.cookie("__Host-pbxgate-remember").unwrap());

    // A password sign-in, with the password the command line set.
    let reply =
        post("/.pbxgate/login/password", "login=101&password=Correct+horse+42%21&rd=/".to_string(), None)
            .await;
    assert_eq!(reply.status, 303, "{}", reply.text());
    let session = reply.cookie("__Host-pbxgate").unwrap();
    secrets.push(session.clone());
    secrets.push(reply.cookie("__Host-pbxgate-remember").unwrap());
    let cookie = format!("__Host-pbxgate={session}");
    let page =
        https_get(https, "/home?secret=query-not-logged", &[("host", &host), ("cookie", &cookie)]).await;
    assert_eq!(page.json()["headers"]["remote-user"][0], "101");

    // A sign-in link, used.
    let seen = smtp.count();
    post("/.pbxgate/login/link", "login=100&rd=/".into(), None).await;
    let link = smtp.wait_for("alice@example.com", seen).link();
    let token = link.split("token=").nth(1).unwrap().to_string();
    let reply = post("/.pbxgate/link", format!("token={token}"), None).await;
    assert_eq!(reply.status, 303);
    secrets.push(token);
    secrets.push(reply.cookie("__Host-pbxgate").unwrap());
    post("/.pbxgate/logout", String::new(), Some(cookie)).await;

    // The last request's access line is there: so is every line before it.
    gw.wait_for_log(|l| l.contains("pbxgate::access") && l.contains("/.pbxgate/logout"));
    let lines = gw.log_lines();
    assert!(lines.len() > 10, "the gateway logged: {}", lines.len());
    assert!(lines.iter().any(|l| l.contains("pbxgate::audit")), "audit lines are there");
    for secret in &secrets {
        assert!(secret.len() >= 16);
        if let Some(line) = lines.iter().find(|l| l.contains(secret.as_str())) {
            panic!("a secret reached the log: {line}");
        }
    }
    assert!(!lines.iter().any(|l| l.contains("query-not-logged")), "queries are not logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_closes_when_its_session_expires() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rig = Rig::start("[session]\nidle_timeout = \"1s\"\nlogin_token_ttl = \"0s\"\n").await;
    let token = rig.link_token("100", "alice@example.com", "/").await;
    let reply = rig.post("/.pbxgate/link", &format!("token={token}"), &[]).await;
    let cookie = format!("__Host-pbxgate={}", reply.cookie("__Host-pbxgate").unwrap());
    let mut ws = pbxgate_e2e::client::tls_connect(rig.gw.https(), &Default::default()).await.unwrap();
    let upgrade = format!(
        "GET /ws HTTP/1.1\r\nHost: localhost:{}\r\nCookie: {cookie}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        rig.port
    );
    ws.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = vec![0u8; 12];
    ws.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 101");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(6), ws.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the websocket closes once its session has expired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_set_their_own_password_only_where_allowed() {
    for (may_set, want) in [(false, 403), (true, 200)] {
        let rig = Rig::start(&format!("[passwords]\nusers_may_set = {may_set}\n")).await;
        let (_, cookies) = rig.link_login("101", "bob@example.com").await;
        let weak =
            rig.post("/.pbxgate/api/password/set", "{\"password\":\"abc\"}", &[("cookie", &cookies)]).await;
        let strong = rig
            .post(
                "/.pbxgate/api/password/set",
                "{\"password\":\"Correct horse 42!\"}",
                &[("cookie", &cookies)],
            )
            .await;
        assert_eq!(strong.status, want, "users_may_set = {may_set}: {}", strong.text());
        if may_set {
            assert_eq!(weak.status, 400, "{}", weak.text());
            assert_eq!(weak.json()["error"], "weak_password");
            let login = "{\"login\":\"101\",\"password\":\"Correct horse 42!\"}";
            assert_eq!(rig.post("/.pbxgate/api/password/login", login, &[]).await.status, 200);
        }
    }
}

/// The ceremonies at the Rust level, through the JSON API, with a software
/// authenticator: registration, sign-in, counter update, replay refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ceremonies_with_a_software_authenticator() {
    use base64::Engine as _;
    use webauthn_authenticator_rs::softpasskey::SoftPasskey;
    use webauthn_authenticator_rs::WebauthnAuthenticator;
    use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};

    let rig = Rig::start("").await;
    let (_, cookies) = rig.link_login("100", "alice@example.com").await;
    let origin = Url::parse(&rig.origin()).unwrap();
    let mut authenticator = SoftPasskey::new(true);

    let start = rig.post("/.pbxgate/api/passkey/register/start", "{}", &[("cookie", &cookies)]).await;
    assert_eq!(start.status, 200, "{}", start.text());
    let start = start.json();
    assert_eq!(start["publicKey"]["authenticatorSelection"]["residentKey"], "required");
    // The software token cannot store resident keys (the browser test covers
    // discoverable credentials); the server's ceremony is the same either way.
    let mut for_soft_token = start.clone();
    for_soft_token["publicKey"]["authenticatorSelection"]["residentKey"] = "discouraged".into();
    for_soft_token["publicKey"]["authenticatorSelection"]["requireResidentKey"] = false.into();
    let options: CreationChallengeResponse = serde_json::from_value(for_soft_token).unwrap();
    let credential = authenticator.do_registration(origin.clone(), options).expect("software registration");
    let finish =
        serde_json::json!({"ceremony": start["ceremony"], "credential": credential, "name": "Soft key"});
    let done =
        rig.post("/.pbxgate/api/passkey/register/finish", &finish.to_string(), &[("cookie", &cookies)]).await;
    assert_eq!(done.status, 200, "{}", done.text());
    // The same registration again: the ceremony is gone.
    let again =
        rig.post("/.pbxgate/api/passkey/register/finish", &finish.to_string(), &[("cookie", &cookies)]).await;
    assert_eq!(again.json()["error"], "ceremony_expired");

    // Name first, then the passkey. The answer names no credential, for an
    // account with passkeys as for one without and for nobody at all.
    let cred_id = done.json()["id"].as_str().unwrap().to_string();
    let handle = rig.gw.store.user_handle("100").await.unwrap();
    let handle = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(webauthn_rs::prelude::Uuid::parse_str(&handle).unwrap().as_bytes());
    let rig = &rig;
    let start_for = |login: &'static str| async move {
        let body = serde_json::json!({ "login": login }).to_string();
        rig.post("/.pbxgate/api/passkey/login/start", &body, &[]).await.json()
    };
    let shape = |mut v: serde_json::Value| {
        v["ceremony"] = "".into();
        v["publicKey"]["challenge"] = "".into();
        v
    };
    let known = start_for("alice@example.com").await;
    assert_eq!(shape(known.clone()), shape(start_for("102").await), "without passkeys");
    assert_eq!(shape(known.clone()), shape(start_for("nobody@example.com").await), "no such account");
    assert!(known["publicKey"]["allowCredentials"].as_array().is_none_or(|c| c.is_empty()), "{known}");
    // The software token keeps no resident keys: the test names its
    // credential to it, and adds the user handle a resident key returns.
    let mut sign = |start: &serde_json::Value| {
        let mut options = start.clone();
        options["publicKey"]["allowCredentials"] = serde_json::json!([{"type": "public-key", "id": cred_id}]);
        let options: RequestChallengeResponse = serde_json::from_value(options).unwrap();
        let mut credential = serde_json::to_value(
            authenticator.do_authentication(origin.clone(), options).expect("software sign-in"),
        )
        .unwrap();
        credential["response"]["userHandle"] = handle.clone().into();
        credential
    };
    // Another name typed first: alice's passkey does not sign in as 102.
    let other = start_for("102").await;
    let body = serde_json::json!({"ceremony": other["ceremony"], "credential": sign(&other), "rd": "/"});
    let refused = rig.post("/.pbxgate/api/passkey/login/finish", &body.to_string(), &[]).await;
    assert_eq!(refused.status, 401, "{}", refused.text());
    assert!(refused.cookie("__Host-pbxgate").is_none());
    for round in 0..2 {
        let start = start_for("alice@example.com").await;
        let credential = sign(&start);
        let body =
            serde_json::json!({"ceremony": start["ceremony"], "credential": credential, "rd": "/after"})
                .to_string();
        let signed_in = rig.post("/.pbxgate/api/passkey/login/finish", &body, &[]).await;
        assert_eq!(signed_in.status, 200, "round {round}: {}", signed_in.text());
        assert_eq!(signed_in.json()["redirect"], "/after");
        let session = format!("__Host-pbxgate={}", signed_in.cookie("__Host-pbxgate").unwrap());
        assert_eq!(rig.get("/home", Some(&session)).await.json()["headers"]["remote-user"][0], "100");
        let replay = rig.post("/.pbxgate/api/passkey/login/finish", &body, &[]).await;
        assert_eq!(replay.status, 401, "a replayed response finds no ceremony");
    }
    let records = rig.gw.store.passkeys_of("100").await.unwrap();
    assert_eq!(records.len(), 1);
    assert!(records[0].last_used_ms.is_some(), "last use recorded");
    assert!(
        records[0].passkey["cred"]["counter"].as_u64().unwrap_or(0) > 0,
        "the counter was updated: {}",
        records[0].passkey
    );
}
