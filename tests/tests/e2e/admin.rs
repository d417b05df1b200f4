//! Admin controls: per-admin networks, unlock windows, enforced passkeys, API
//! accounts, the one-time admin password, and what admins can see and revoke.
//! Clients come from different loopback addresses (127.0.0.2, .3) so network
//! rules are exercised for real.

use std::time::Duration;

use base64::Engine;
use pbxgate_e2e::browser::Browser;

use crate::login::Rig;

/// sha256("legacy:secret"), for the API access list.
const LEGACY: &str = "3f6a0b3e2a0f4cfd1ff0e6b7a9f7f7e5b60f0d4f8bfe2a2b1b7f2f3c2e2d1c0b";

fn admin_policy() -> String {
    let legacy = sha256_hex("legacy:secret");
    format!(
        r#"
domains = ["localhost"]

[[route]]
path = "/admin/"
access = "admin"
step_up = "15m"

[[route]]
path = "/brief/"
access = "admin"
step_up = "3s"

[[route]]
path = "/api/"
access = "api"
networks = ["10.9.9.0/24"]
basic_credentials = ["{legacy}"]

[[route]]
path = "/provisioning/"
access = "network"
networks = ["127.0.0.3/32"]

[[route]]
path = "/"
access = "user"

[[user]]
name = "100"
email = "alice@example.com"
role = "admin"
networks = ["127.0.0.1/32"]
password_login = true

[[user]]
name = "101"
email = "bob@example.com"
password_login = true

[[user]]
name = "103"
email = "carol@example.com"
role = "admin"
require_passkey = true

[[user]]
name = "svc"
role = "api"
networks = ["127.0.0.2/32"]
basic_auth = true
"#
    )
}

fn sha256_hex(text: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}")))
}

const PASSWORD: &str = "Correct horse 42!";

/// argon2 verifications so far, from the gateway's metrics.
async fn argon2_runs(rig: &Rig) -> u64 {
    let text = pbxgate_e2e::client::http_get(rig.gw.addrs.admin.unwrap(), "/metrics", &[]).await.text();
    text.lines()
        .find_map(|l| l.strip_prefix("pbxgate_password_verifications_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("metric")
}

async fn with_passwords(rig: &Rig) {
    let hash = pbxgate::auth::passwords::hash(PASSWORD.into()).await.unwrap();
    for user in ["100", "101", "svc"] {
        rig.gw.store.set_password_hash(user, &hash).await.unwrap();
    }
}

/// Password sign-in; returns the session cookie header.
async fn sign_in(rig: &Rig, from: Option<&str>, user: &str) -> String {
    let body = format!("login={user}&password=Correct+horse+42%21&rd=/");
    let reply = rig.post_from(from, "/.pbxgate/login/password", &body, &[]).await;
    assert_eq!(reply.status, 303, "{user}: {}", reply.text());
    format!("__Host-pbxgate={}", reply.cookie("__Host-pbxgate").unwrap())
}

async fn unlock_with_password(rig: &Rig, cookie: &str, minutes: u64, rd: &str) {
    let body = format!("minutes={minutes}&password=Correct+horse+42%21&rd={}", pbxgate::error::encode_rd(rd));
    let reply = rig.post("/.pbxgate/unlock/password", &body, &[("cookie", cookie)]).await;
    assert_eq!(reply.status, 303, "{}", reply.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_is_held_to_their_networks() {
    let _ = LEGACY;
    let rig = Rig::start_with(&admin_policy(), "").await;
    with_passwords(&rig).await;
    // From a refused address: the generic answer, and an audit trail.
    let body = "login=100&password=Correct+horse+42%21&rd=/";
    let refused = rig.post_from(Some("127.0.0.2"), "/.pbxgate/login/password", body, &[]).await;
    assert_eq!(refused.status, 401);
    let wrong = rig
        .post_from(Some("127.0.0.2"), "/.pbxgate/login/password", "login=100&password=nope&rd=/", &[])
        .await;
    assert_eq!(refused.text(), wrong.text(), "nothing tells the network apart from a wrong password");
    // A link requested from the right place but opened from the wrong one is refused too.
    let token = rig.link_token("100", "alice@example.com", "/").await;
    let opened = rig.post_from(Some("127.0.0.2"), "/.pbxgate/link", &format!("token={token}"), &[]).await;
    assert_eq!(opened.status, 400);

    // From the allowed address it works; the same session used from elsewhere is refused.
    let cookie = sign_in(&rig, None, "100").await;
    assert_eq!(rig.get("/home", Some(&cookie)).await.status, 200);
    assert_eq!(
        rig.get_from(Some("127.0.0.2"), "/home", Some(&cookie), &[]).await.status,
        403,
        "a session moving address"
    );
    unlock_with_password(&rig, &cookie, 5, "/.pbxgate/admin").await;
    assert_eq!(rig.get("/.pbxgate/api/admin/users", Some(&cookie)).await.status, 200);
    assert_eq!(
        rig.get_from(Some("127.0.0.2"), "/.pbxgate/api/admin/users", Some(&cookie), &[]).await.status,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locked_sections_need_an_unlock_that_ends_on_time_or_early() {
    let rig = Rig::start_with(&admin_policy(), "").await;
    with_passwords(&rig).await;
    let cookie = sign_in(&rig, None, "100").await;
    let html = [("accept", "text/html")];
    let locked = rig.get_from(None, "/admin/settings", Some(&cookie), &html).await;
    assert_eq!(locked.status, 302);
    assert_eq!(locked.header("location"), Some("/.pbxgate/unlock?rd=/admin/settings"));
    let api = rig.get("/admin/settings", Some(&cookie)).await;
    assert_eq!(api.status, 403);
    assert_eq!(api.json()["error"], "step_up_required");

    unlock_with_password(&rig, &cookie, 5, "/admin/settings").await;
    let open = rig.get("/admin/settings", Some(&cookie)).await;
    assert_eq!(open.status, 200);
    assert_eq!(open.json()["headers"]["remote-groups"][0], "admin");
    // Lock again early.
    assert_eq!(rig.post("/.pbxgate/api/unlock/end", "{}", &[("cookie", &cookie)]).await.status, 200);
    assert_eq!(rig.get("/admin/settings", Some(&cookie)).await.status, 403);

    // A section whose longest window is 3 s: asking for more gets 3 s.
    unlock_with_password(&rig, &cookie, 60, "/brief/x").await;
    assert_eq!(rig.get("/brief/x", Some(&cookie)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(rig.get("/brief/x", Some(&cookie)).await.status, 403, "the window ended on time");

    // A user is not an admin, unlocked or not.
    let bob = sign_in(&rig, None, "101").await;
    assert_eq!(rig.get("/admin/settings", Some(&bob)).await.status, 403);
    assert_eq!(rig.get("/.pbxgate/api/admin/users", Some(&bob)).await.status, 403);
    assert_eq!(
        rig.post("/.pbxgate/api/admin/sessions/revoke", "{\"user\":\"100\"}", &[("cookie", &bob)])
            .await
            .status,
        403
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlock_with_a_passkey_in_the_browser_and_the_admin_pages() {
    let rig = Rig::start_with(&admin_policy(), "").await;
    let origin = rig.origin();
    let browser = Browser::start().await;
    // Carol is an admin who must have a passkey: after her link sign-in she reaches nothing else.
    browser.goto(&format!("{origin}/.pbxgate/login?rd=/admin/calls")).await;
    browser.wait_for_path("/.pbxgate/login").await;
    browser.fill("#login", "103").await;
    browser.click("#link-button").await;
    let link = rig.smtp.wait_for("carol@example.com", 0).link();
    browser.goto(&link).await;
    browser.wait_for_path("/.pbxgate/passkey-offer").await;
    assert_eq!(browser.eval("document.getElementById('not-now') === null").await, true, "no way around it");
    browser.goto(&format!("{origin}/other")).await;
    browser.wait_for_path("/.pbxgate/passkey-offer").await;
    browser.click("#register-button").await;
    browser.wait_for_path("/other").await;
    // Then the admin section asks for an unlock; she picks 5 minutes and uses her passkey.
    browser.goto(&format!("{origin}/admin/calls")).await;
    browser.wait_for_path("/.pbxgate/unlock").await;
    let options =
        browser.eval("Array.from(document.querySelectorAll('#minutes option')).map(o => o.value)").await;
    assert_eq!(options, serde_json::json!(["5", "15"]), "choices up to the section's 15 minutes");
    browser.eval("document.getElementById('minutes').value = '5', true").await;
    browser.click("#unlock-button").await;
    browser.wait_for_path("/admin/calls").await;
    let echo: serde_json::Value = serde_json::from_str(&browser.text().await).unwrap();
    assert_eq!(echo["headers"]["remote-user"][0], "103");

    // The gateway's own admin pages are a section of their own: the unlock
    // of /admin/ does not open them.
    browser.goto(&format!("{origin}/.pbxgate/admin")).await;
    browser.wait_for_path("/.pbxgate/unlock").await;
    browser.click("#unlock-button").await;
    // Users, then Carol's tokens and passkeys.
    browser.wait_for_path("/.pbxgate/admin").await;
    let text = browser.text().await;
    assert!(text.contains("alice@example.com") && text.contains("svc"), "{text}");
    browser.goto(&format!("{origin}/.pbxgate/admin/user?name=103")).await;
    browser.wait_for_path("/.pbxgate/admin/user").await;
    assert_eq!(browser.eval("document.querySelectorAll('#tokens tr').length").await, 2, "one remember token");
    // Destructive actions ask first; at phone width nothing spills off the screen.
    let confirmed = "Array.from(document.querySelectorAll('form[action=\"/.pbxgate/admin/action\"]')) \
                     .filter(f => !f.dataset.confirm).map(f => f.querySelector('[name=action]').value) \
                     .filter(a => a !== 'set-onboarding')";
    assert_eq!(browser.eval(confirmed).await, serde_json::json!([]), "revoke, delete and reset ask first");
    let destructive = "document.querySelectorAll('form[data-confirm]').length";
    assert!(browser.eval(destructive).await.as_u64().unwrap_or(0) >= 3, "token, passkey, reset, sessions");
    browser.width(390).await;
    for page in
        ["/.pbxgate/admin", "/.pbxgate/admin/user?name=103", "/.pbxgate/admin/history", "/.pbxgate/account"]
    {
        browser.goto(&format!("{origin}{page}")).await;
        browser.wait_until("document.readyState === 'complete'", page).await;
        assert!(!browser.overflows(390).await, "{page} is wider than a phone");
    }
    browser.width(1280).await;
    browser.goto(&format!("{origin}/.pbxgate/admin/user?name=103")).await;
    browser.wait_for_path("/.pbxgate/admin/user").await;
    assert_eq!(browser.eval("document.querySelectorAll('#passkeys tr').length").await, 2, "one passkey");
    // What the policy requires, said truthfully; devices in words.
    let required = browser.eval("document.getElementById('required-by').textContent").await;
    assert_eq!(required, "Required for this account by the policy.");
    let device =
        browser.eval("document.querySelector('#tokens tr:nth-child(2) td:nth-child(5)').textContent").await;
    assert_eq!(device, "Chrome on Linux");
    browser.goto(&format!("{origin}/.pbxgate/admin/history")).await;
    browser.wait_for_path("/.pbxgate/admin/history").await;
    assert!(browser.text().await.contains("unlock:passkey"));
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_accounts_use_basic_only_from_their_network_and_never_the_browser_routes() {
    let rig = Rig::start_with(&admin_policy(), "").await;
    with_passwords(&rig).await;
    let good = basic("svc", PASSWORD);
    let from = |ip: &'static str| Some(ip);
    let ok = rig.get_from(from("127.0.0.2"), "/api/calls", None, &[("authorization", &good)]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["headers"]["remote-user"][0], "svc");
    assert!(
        ok.json()["headers"].get("authorization").is_some(),
        "the PBX still sees the credentials it may need"
    );
    // Off its network.
    assert_eq!(
        rig.get_from(from("127.0.0.1"), "/api/calls", None, &[("authorization", &good)]).await.status,
        403
    );
    // Wrong password: 401 with a challenge.
    let wrong = rig
        .get_from(from("127.0.0.2"), "/api/calls", None, &[("authorization", &basic("svc", "nope"))])
        .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.header("www-authenticate").is_some_and(|w| w.starts_with("Basic")));
    // On a browser route.
    assert_eq!(rig.get_from(from("127.0.0.2"), "/home", None, &[("authorization", &good)]).await.status, 403);
    // The browser sign-in does not take API accounts.
    let pw = rig
        .post_from(
            from("127.0.0.2"),
            "/.pbxgate/api/password/login",
            &format!("{{\"login\":\"svc\",\"password\":\"{PASSWORD}\"}}"),
            &[],
        )
        .await;
    assert_eq!(pw.status, 401);
    // The legacy access list: a listed credential needs no account.
    let legacy =
        rig.get_from(None, "/api/calls", None, &[("authorization", &basic("legacy", "secret"))]).await;
    assert_eq!(legacy.status, 200);
    assert!(legacy.json()["headers"].get("remote-user").is_none(), "no identity for an access-list entry");

    // 1000 requests cost one argon2 verification, not a thousand.
    let host = format!("localhost:{}", rig.port);
    let before = argon2_runs(&rig).await;
    let started = std::time::Instant::now();
    let tls = pbxgate_e2e::client::tls_connect(rig.gw.https(), &Default::default()).await.unwrap();
    let _ = tls; // one connection per request below keeps the client simple
    for _ in 0..1000 {
        let r = rig
            .get_from(from("127.0.0.2"), "/api/calls", None, &[("authorization", &good), ("host", &host)])
            .await;
        assert_eq!(r.status, 200);
    }
    let spent = argon2_runs(&rig).await - before;
    eprintln!("1000 Basic requests in {:?}, {spent} argon2 verifications", started.elapsed());
    assert!(spent <= 1, "argon2 ran {spent} times for 1000 requests");
}

/// A script opening many connections at once with a credential not yet
/// verified: one argon2 run, the others wait for it and use its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_requests_with_one_credential_cost_one_argon2_run() {
    let rig = Rig::start_with(&admin_policy(), "").await;
    with_passwords(&rig).await;
    let before = argon2_runs(&rig).await;
    let good = basic("svc", PASSWORD);
    let headers = [("authorization", good.as_str())];
    let requests = (0..32).map(|_| rig.get_from(Some("127.0.0.2"), "/api/calls", None, &headers));
    for response in futures_util::future::join_all(requests).await {
        assert_eq!(response.status, 200, "{}", response.text());
    }
    assert_eq!(argon2_runs(&rig).await - before, 1, "32 requests at once, one verification");
    // A wrong password is never taken from the cache of a right one.
    let wrong =
        rig.get_from(Some("127.0.0.2"), "/api/calls", None, &[("authorization", &basic("svc", "no"))]).await;
    assert_eq!(wrong.status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_one_time_admin_password_works_once_then_a_passkey_is_required() {
    let dir = pbxgate_e2e::TempDir::new("otp");
    let file = dir.write("instance-id", "i-0123456789abcdef\n");
    let extra = format!("[bootstrap]\nadmin = \"100\"\none_time_password_file = \"{}\"\n", file.display());
    let rig = Rig::start_with(&admin_policy(), &extra).await;
    let body = "login=100&password=i-0123456789abcdef&rd=/calls";
    let first = rig.post("/.pbxgate/login/password", body, &[]).await;
    assert_eq!(first.status, 303, "{}", first.text());
    let cookie = format!("__Host-pbxgate={}", first.cookie("__Host-pbxgate").unwrap());
    let next = rig.get_from(None, "/calls", Some(&cookie), &[("accept", "text/html")]).await;
    assert_eq!(next.status, 302);
    assert_eq!(next.header("location"), Some("/.pbxgate/passkey-offer?rd=/calls"), "a passkey first");
    assert_eq!(rig.get("/calls", Some(&cookie)).await.json()["error"], "passkey_required");
    let again = rig.post("/.pbxgate/login/password", body, &[]).await;
    assert_eq!(again.status, 401, "used up");
    let history = rig
        .gw
        .store
        .history(Some("100"), Duration::from_secs(3600), 10, pbxgate::store::now_ms())
        .await
        .unwrap();
    assert!(history.iter().any(|e| e.method == "one_time_password" && e.result == "success"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_see_tokens_and_history_and_revocation_takes_effect_at_once() {
    let rig = Rig::start_with(&admin_policy(), "").await;
    with_passwords(&rig).await;
    // Bob signs in twice (two browsers) and fails once.
    let body = "login=101&password=Correct+horse+42%21&rd=/";
    let laptop = rig.post("/.pbxgate/login/password", body, &[]).await;
    let remember = format!("__Host-pbxgate-remember={}", laptop.cookie("__Host-pbxgate-remember").unwrap());
    let phone = sign_in(&rig, None, "101").await;
    rig.post("/.pbxgate/login/password", "login=101&password=nope&rd=/", &[]).await;

    let admin = sign_in(&rig, None, "100").await;
    unlock_with_password(&rig, &admin, 5, "/.pbxgate/admin").await;
    let users = rig.get("/.pbxgate/api/admin/users", Some(&admin)).await.json();
    let bob = users.as_array().unwrap().iter().find(|u| u["name"] == "101").unwrap().clone();
    assert_eq!(bob["role"], "user");
    assert!(bob["last_login_ms"].as_u64().is_some());
    let detail = rig.get("/.pbxgate/api/admin/user?name=101", Some(&admin)).await.json();
    let tokens = detail["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|t| t["last_ip"] == "127.0.0.1" && t["expires_ms"].as_u64().is_some()));

    // Revoke the laptop's remember token: it fails on the very next request.
    assert_eq!(rig.get("/home", Some(&remember)).await.status, 200);
    let detail = rig.get("/.pbxgate/api/admin/user?name=101", Some(&admin)).await.json();
    let tokens = detail["tokens"].as_array().unwrap();
    let laptop_token =
        tokens.iter().find(|t| t["last_used_ms"].as_u64().is_some()).expect("the token just used");
    let id = laptop_token["id"].as_str().unwrap();
    let r = rig
        .post("/.pbxgate/api/admin/tokens/revoke", &format!("{{\"id\":\"{id}\"}}"), &[("cookie", &admin)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(rig.get("/home", Some(&remember)).await.status, 401, "revoked at once");
    // The phone's token and session are another browser's: untouched.
    assert_eq!(rig.get("/home", Some(&phone)).await.status, 200);
    // Sign Bob out everywhere.
    let r =
        rig.post("/.pbxgate/api/admin/sessions/revoke", "{\"user\":\"101\"}", &[("cookie", &admin)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(rig.get("/home", Some(&phone)).await.status, 401);

    // The history shows successes and failures with method and address.
    let history = rig.get("/.pbxgate/api/admin/history?user=101", Some(&admin)).await.json();
    let events = history.as_array().unwrap();
    assert!(events
        .iter()
        .any(|e| e["result"] == "success" && e["method"] == "password" && e["ip"] == "127.0.0.1"));
    assert!(events.iter().any(|e| e["result"] == "bad_credentials"));
    // The metrics counted the sign-ins.
    let metrics = pbxgate_e2e::client::http_get(rig.gw.addrs.admin.unwrap(), "/metrics", &[]).await.text();
    let count = |series: &str| -> u64 {
        metrics.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0)
    };
    assert!(count("pbxgate_logins_total{method=\"password\",result=\"success\"}") >= 3, "{metrics}");
    assert!(count("pbxgate_logins_total{method=\"password\",result=\"failure\"}") >= 1, "{metrics}");
    // Device routes: phones fetch provisioning files from their network, no login.
    assert_eq!(rig.get_from(Some("127.0.0.3"), "/provisioning/0004f2.cfg", None, &[]).await.status, 200);
    assert_eq!(rig.get_from(Some("127.0.0.2"), "/provisioning/0004f2.cfg", None, &[]).await.status, 403);
}

/// The command line works beside a running gateway on Redis: list, revoke, history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_lists_and_revokes_beside_a_running_gateway() {
    let redis = pbxgate_e2e::redis::RedisServer::start();
    let rig = Rig::start_with(&admin_policy(), &format!("[store]\nurl = \"{}\"\n", redis.url())).await;
    with_passwords(&rig).await;
    let body = "login=101&password=Correct+horse+42%21&rd=/";
    let reply = rig.post("/.pbxgate/login/password", body, &[]).await;
    let remember = format!("__Host-pbxgate-remember={}", reply.cookie("__Host-pbxgate-remember").unwrap());
    rig.post("/.pbxgate/login/password", "login=101&password=nope&rd=/", &[]).await;

    let dir = pbxgate_e2e::TempDir::new("cli-redis");
    let config = pbxgate_e2e::write_config(&dir, &rig.upstream.url(), &admin_policy());
    let url = redis.url();
    let env = [("PBXGATE_STORE__URL", url.as_str())];
    let cli = |args: &[&str]| pbxgate_e2e::process::command(&config, &env, args, "");
    let (code, users) = cli(&["user", "list"]);
    assert_eq!(code, Some(0), "{users}");
    assert!(users.contains("101") && users.contains("svc") && users.contains("admin"), "{users}");
    let (code, history) = cli(&["history", "101"]);
    assert_eq!(code, Some(0));
    assert!(history.contains("success") && history.contains("bad_credentials"), "{history}");
    let (code, tokens) = cli(&["tokens", "list", "101"]);
    assert_eq!(code, Some(0));
    let id =
        tokens.lines().nth(1).and_then(|l| l.split_whitespace().next()).expect("a token line").to_string();
    assert_eq!(rig.get("/home", Some(&remember)).await.status, 200);
    let (code, out) = cli(&["tokens", "revoke", &id]);
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(
        rig.get("/home", Some(&remember)).await.status,
        401,
        "revoked from the command line, refused at once"
    );
    let (code, _) = cli(&["tokens", "revoke", &id]);
    assert_eq!(code, Some(3), "an unknown token is its own exit code");
    let (code, _) = cli(&["tokens", "list", "nobody"]);
    assert_eq!(code, Some(2));
}

/// With the embedded store the command line works beside a running gateway
/// too (through the socket next to the store's file, the gateway holding the
/// file), and on the file itself once the gateway has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_command_line_works_beside_a_running_gateway_on_the_embedded_store() {
    let upstream = pbxgate_e2e::Upstream::start().await;
    let dir = pbxgate_e2e::TempDir::new("cli-embedded");
    let config = pbxgate_e2e::write_config(&dir, &upstream.url(), &admin_policy());
    let port = pbxgate_e2e::redis::free_port(false);
    let (public, listen) = (format!("https://localhost:{port}"), format!("127.0.0.1:{port}"));
    let env = [("PBXGATE_PUBLIC_URL", public.as_str()), ("PBXGATE_LISTEN__HTTPS", listen.as_str())];
    let cli = |args: &[&str], stdin: &str| pbxgate_e2e::process::command(&config, &env, args, stdin);
    let mut gw = pbxgate_e2e::GatewayProcess::start(&config, &env);
    let socket = dir.path().join("store.db.sock");
    assert!(socket.exists(), "the gateway answers commands next to its store");

    let (code, out) = cli(&["user", "set-password", "101"], "Correct horse 42!\n");
    assert_eq!(code, Some(0), "set while the gateway runs: {out}");
    let https = gw.https.expect("https");
    let host = format!("localhost:{port}");
    let headers = [
        ("host", host.as_str()),
        ("origin", public.as_str()),
        ("content-type", "application/x-www-form-urlencoded"),
    ];
    let body = "login=101&password=Correct+horse+42%21&rd=/";
    let reply =
        pbxgate_e2e::client::https_request(https, "POST", "/.pbxgate/login/password", &headers, body).await;
    assert_eq!(reply.status, 303, "the gateway signs in with it: {}", reply.text());
    let remember = format!("__Host-pbxgate-remember={}", reply.cookie("__Host-pbxgate-remember").unwrap());

    let (code, users) = cli(&["user", "list"], "");
    assert_eq!(code, Some(0), "{users}");
    assert!(users.contains("101") && users.contains("1 active sessions"), "{users}");
    let (code, history) = cli(&["history", "101"], "");
    assert!(code == Some(0) && history.contains("success"), "{history}");
    let (code, tokens) = cli(&["tokens", "list", "101"], "");
    assert_eq!(code, Some(0), "{tokens}");
    let id = tokens.lines().nth(1).and_then(|l| l.split_whitespace().next()).expect("a token").to_string();
    let home = |cookie: String| {
        let host = host.clone();
        async move {
            pbxgate_e2e::client::https_get(https, "/home", &[("host", &host), ("cookie", &cookie)]).await
        }
    };
    assert_eq!(home(remember.clone()).await.status, 200);
    let (code, out) = cli(&["tokens", "revoke", &id], "");
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(home(remember).await.status, 401, "revoked from the command line, refused at once");

    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(15)).is_some_and(|s| s.success()));
    assert!(!socket.exists(), "removed when the gateway stops");
    let (code, users) = cli(&["user", "list"], "");
    assert_eq!(code, Some(0), "the file itself, once free: {users}");
}

/// Two gateways on one Redis (and on a Redis Cluster) share sessions; a
/// revocation on one is refused by the other at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_sessions_and_revocations_on_redis_and_on_a_cluster() {
    let redis = pbxgate_e2e::redis::RedisServer::start();
    let cluster = pbxgate_e2e::redis::RedisCluster::start();
    for url in [redis.url(), cluster.url()] {
        let store = format!("[store]\nurl = \"{url}\"\n");
        let a = Rig::start_with(&admin_policy(), &store).await;
        let b = pbxgate_e2e::TestGateway::start(&a.upstream.url(), &admin_policy(), &store).await;
        with_passwords(&a).await;
        let on_b = |cookie: String| {
            let https = b.https();
            async move {
                let status = pbxgate_e2e::client::https_get(
                    https,
                    "/home",
                    &[("cookie", &cookie), ("accept", "application/json")],
                )
                .await
                .status
                .as_u16();
                status
            }
        };
        // Signed in on A, used on B.
        let body = "login=101&password=Correct+horse+42%21&rd=/";
        let reply = a.post("/.pbxgate/login/password", body, &[]).await;
        let session = format!("__Host-pbxgate={}", reply.cookie("__Host-pbxgate").unwrap());
        let remember =
            format!("__Host-pbxgate-remember={}", reply.cookie("__Host-pbxgate-remember").unwrap());
        assert_eq!(on_b(session.clone()).await, 200, "{url}: a session made on A works on B");
        // A has it in its in-process cache now.
        assert_eq!(a.get("/home", Some(&session)).await.status, 200);
        // Signed out everywhere on B, refused on A within a second.
        let host = format!("localhost:{}", b.https().port());
        let out = pbxgate_e2e::client::https_request(
            b.https(),
            "POST",
            "/.pbxgate/api/logout",
            &[
                ("host", &host),
                // B's configured origin (public_url).
                ("origin", "https://localhost:8443"),
                ("content-type", "application/json"),
                ("cookie", &session),
            ],
            "{\"everywhere\":true}",
        )
        .await;
        assert_eq!(out.status, 200);
        let started = std::time::Instant::now();
        let mut refused = false;
        while started.elapsed() < Duration::from_secs(1) {
            if a.get("/home", Some(&session)).await.status == 401
                && a.get("/home", Some(&remember)).await.status == 401
            {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(refused, "{url}: A refuses the revoked session and token within 1 s");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_turn_passkey_onboarding_on_and_reset_passkeys() {
    let rig = Rig::start_with(&admin_policy(), "").await;
    with_passwords(&rig).await;
    let admin = sign_in(&rig, None, "100").await;
    unlock_with_password(&rig, &admin, 5, "/.pbxgate/admin").await;
    let on = rig
        .post("/.pbxgate/api/admin/onboarding", "{\"user\":\"101\",\"required\":true}", &[("cookie", &admin)])
        .await;
    assert_eq!(on.status, 200, "{}", on.text());
    // Bob's next sign-in reaches nothing but passkey creation.
    let bob = sign_in(&rig, None, "101").await;
    assert_eq!(rig.get("/home", Some(&bob)).await.json()["error"], "passkey_required");
    let off = rig
        .post(
            "/.pbxgate/api/admin/onboarding",
            "{\"user\":\"101\",\"required\":false}",
            &[("cookie", &admin)],
        )
        .await;
    assert_eq!(off.status, 200);
    let bob = sign_in(&rig, None, "101").await;
    assert_eq!(rig.get("/home", Some(&bob)).await.status, 200);
    // Reset: passkeys gone, setup required again.
    rig.gw
        .store
        .add_passkey(
            "101",
            &pbxgate::store::PasskeyRecord {
                v: 1,
                cred_id: "cred-bob".into(),
                name: "Laptop".into(),
                created_ms: 1,
                last_used_ms: None,
                passkey: serde_json::json!({}),
            },
        )
        .await
        .unwrap();
    let reset =
        rig.post("/.pbxgate/api/admin/passkeys/reset", "{\"user\":\"101\"}", &[("cookie", &admin)]).await;
    assert_eq!(reset.status, 200);
    assert_eq!(rig.gw.store.passkey_count("101").await.unwrap(), 0);
    assert!(rig.gw.store.flags("101").await.unwrap().onboarding_required);
    assert!(
        rig.gw.store.sessions_of("101", pbxgate::store::now_ms()).await.unwrap().is_empty(),
        "whatever a lost passkey signed in ends with the reset"
    );
    let unknown =
        rig.post("/.pbxgate/api/admin/passkeys/reset", "{\"user\":\"nobody\"}", &[("cookie", &admin)]).await;
    assert_eq!(unknown.status, 404);
}

/// `pbxgate serve --admin-username NAME --admin-password-file FILE`: a one-time
/// password for that admin, from the command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_flags_arm_a_one_time_admin_password() {
    let upstream = pbxgate_e2e::Upstream::start().await;
    let dir = pbxgate_e2e::TempDir::new("otp-flags");
    let config = pbxgate_e2e::write_config(&dir, &upstream.url(), &admin_policy());
    let file = dir.write("otp", "Sesame open 17\n");
    let file = file.to_str().unwrap();

    // Not an admin: refused at start.
    let out = std::process::Command::new(pbxgate_e2e::process::binary())
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--admin-username",
            "101",
            "--admin-password-file",
            file,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not an admin"));

    let gw = pbxgate_e2e::GatewayProcess::start_with_args(
        &config,
        &[],
        &["--admin-username", "100", "--admin-password-file", file],
    );
    let https = gw.https.unwrap();
    let login = || async {
        pbxgate_e2e::client::https_request(
            https,
            "POST",
            "/.pbxgate/login/password",
            &[("origin", "https://localhost:8443"), ("content-type", "application/x-www-form-urlencoded")],
            "login=100&password=Sesame+open+17&rd=/admin/",
        )
        .await
    };
    let first = login().await;
    assert_eq!(first.status, 303, "{}", first.text());
    assert_eq!(login().await.status, 401, "once only");
    let log = gw.log_lines().join("\n");
    assert!(
        log.contains("one-time admin password armed") && !log.contains("Sesame"),
        "armed, and never logged"
    );
}

/// Failed sign-ins of every kind reach the login history with the account,
/// the method and the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_of_every_kind_are_in_the_history() {
    let rig = Rig::start_with(&admin_policy(), "").await;
    with_passwords(&rig).await;
    let wrong = rig
        .get_from(Some("127.0.0.2"), "/api/calls", None, &[("authorization", &basic("svc", "nope"))])
        .await;
    assert_eq!(wrong.status, 401);
    let body = "login=bob@example.com&password=nope&rd=/";
    assert_eq!(rig.post("/.pbxgate/login/password", body, &[]).await.status, 401);
    let events =
        rig.gw.store.history(None, Duration::from_secs(3600), 50, pbxgate::store::now_ms()).await.unwrap();
    let has = |user: &str, method: &str, ip: &str| {
        events.iter().any(|e| e.user == user && e.method == method && e.result != "success" && e.ip == ip)
    };
    assert!(has("svc", "basic", "127.0.0.2"), "{events:?}");
    assert!(has("101", "password", "127.0.0.1"), "{events:?}");
}
