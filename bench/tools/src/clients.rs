//! The clients wrk cannot be: software passkeys registered and signing in
//! through the JSON API, as a browser's would, and the sessions they start.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};

/// One client's keep-alive HTTP/1.1 connection to the gateway, as a
/// browser's would be; its requests go one after another.
struct Gateway {
    sender: SendRequest<Full<Bytes>>,
    origin: String,
}

impl Gateway {
    async fn connect(addr: &str, origin: &str) -> Self {
        // Nagle left on, as hyper-util's client (the tools' earlier one)
        // leaves it; each request goes out in one write either way.
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("gateway reachable");
        let (sender, connection) = http1::handshake(TokioIo::new(tcp)).await.unwrap();
        tokio::spawn(connection);
        Self { sender, origin: origin.to_string() }
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: &str,
        cookie: Option<&str>,
    ) -> (StatusCode, Value, Vec<String>) {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("origin", &self.origin)
            .header("content-type", "application/json");
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let request = request.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        self.sender.ready().await.expect("connection open");
        let response = self.sender.send_request(request).await.expect("gateway answers");
        let status = response.status();
        let cookies = response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok()?.split(';').next().map(str::to_string))
            .collect();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), cookies)
    }

    async fn post(
        &mut self,
        path: &str,
        body: &Value,
        cookie: Option<&str>,
    ) -> (StatusCode, Value, Vec<String>) {
        self.send(Method::POST, path, &body.to_string(), cookie).await
    }
}

/// A session for `user`, signed in with its password (`BENCH_PASSWORD`).
async fn password_session(gateway: &mut Gateway, user: &str) -> String {
    let password = std::env::var("BENCH_PASSWORD").expect("BENCH_PASSWORD");
    let (status, body, cookies) = gateway
        .post("/.pbxgate/api/password/login", &json!({"login": user, "password": password}), None)
        .await;
    assert_eq!(status, 200, "password sign-in for {user}: {body}");
    session_cookie(&cookies)
}

fn session_cookie(cookies: &[String]) -> String {
    cookies.iter().find(|c| c.starts_with("__Host-pbxgate=")).expect("a session cookie").clone()
}

/// A software passkey for `user`, registered through the API.
async fn register(gateway: &mut Gateway, user: &str) -> SoftPasskey {
    let cookie = password_session(gateway, user).await;
    let (status, start, _) =
        gateway.post("/.pbxgate/api/passkey/register/start", &json!({}), Some(&cookie)).await;
    assert_eq!(status, 200, "register/start for {user}: {start}");
    // The software token cannot keep resident keys; signing in names the account first.
    let mut options = start.clone();
    options["publicKey"]["authenticatorSelection"]["residentKey"] = "discouraged".into();
    options["publicKey"]["authenticatorSelection"]["requireResidentKey"] = false.into();
    let options: CreationChallengeResponse = serde_json::from_value(options).unwrap();
    let mut passkey = SoftPasskey::new(true);
    let credential = passkey.do_registration(Url::parse(&gateway.origin).unwrap(), options).unwrap();
    let finish = json!({"ceremony": start["ceremony"], "credential": credential, "name": "bench"});
    let (status, body, _) =
        gateway.post("/.pbxgate/api/passkey/register/finish", &finish, Some(&cookie)).await;
    assert_eq!(status, 200, "register/finish for {user}: {body}");
    passkey
}

/// Signs in once: the two API calls, the authenticator's signature between
/// them. The new session's cookie.
async fn login(gateway: &mut Gateway, passkey: &mut SoftPasskey, user: &str) -> String {
    let (status, start, _) =
        gateway.post("/.pbxgate/api/passkey/login/start", &json!({"login": user}), None).await;
    assert_eq!(status, 200, "login/start: {start}");
    let options: RequestChallengeResponse = serde_json::from_value(start.clone()).unwrap();
    let credential = passkey.do_authentication(Url::parse(&gateway.origin).unwrap(), options).unwrap();
    let finish = json!({"ceremony": start["ceremony"], "credential": credential});
    let (status, body, cookies) = gateway.post("/.pbxgate/api/passkey/login/finish", &finish, None).await;
    assert_eq!(status, 200, "login/finish: {body}");
    session_cookie(&cookies)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

/// The clients: for each account, a connection and a registered passkey.
async fn clients(addr: &str, origin: &str, users: usize) -> Vec<(Gateway, String, SoftPasskey)> {
    let mut clients = Vec::new();
    for i in 0..users {
        let user = format!("bench-{i}");
        let mut gateway = Gateway::connect(addr, origin).await;
        let passkey = register(&mut gateway, &user).await;
        clients.push((gateway, user, passkey));
    }
    clients
}

pub(crate) async fn passkeys(addr: &str, origin: &str, users: usize, seconds: u64) {
    let keys = clients(addr, origin, users).await;
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for (mut gateway, user, mut passkey) in keys {
        clients.spawn(async move {
            let mut took = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                login(&mut gateway, &mut passkey, &user).await;
                took.push(t.elapsed());
            }
            took
        });
    }
    let mut took: Vec<Duration> = clients.join_all().await.into_iter().flatten().collect();
    let elapsed = started.elapsed().as_secs_f64();
    took.sort();
    println!(
        "passkey logins: {} in {elapsed:.1}s, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms ({users} clients)",
        took.len(),
        took.len() as f64 / elapsed,
        percentile(&took, 0.5),
        percentile(&took, 0.99),
    );
}

pub(crate) async fn sessions(addr: &str, origin: &str, users: usize, count: usize) {
    let keys = clients(addr, origin, users).await;
    let mut clients = tokio::task::JoinSet::new();
    for (i, (mut gateway, user, mut passkey)) in keys.into_iter().enumerate() {
        // `count` split among the clients, the first ones taking the remainder.
        let share = count / users + usize::from(i < count % users);
        clients.spawn(async move {
            for _ in 0..share {
                let cookie = login(&mut gateway, &mut passkey, &user).await;
                let (status, _, _) = gateway.send(Method::GET, "/", "", Some(&cookie)).await;
                assert_eq!(status, 200, "request with a new session");
            }
        });
    }
    clients.join_all().await;
    println!("{count} sessions live");
}
