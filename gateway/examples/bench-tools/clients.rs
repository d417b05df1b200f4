//! The clients wrk cannot be: software passkeys signing in through the JSON
//! API, and sessions made in the store for the gateway's memory footprint.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pbxgate::store::{now_ms, Store};
use serde_json::{json, Value};
use webauthn_authenticator_rs::softpasskey::SoftPasskey;
use webauthn_authenticator_rs::WebauthnAuthenticator;
use webauthn_rs::prelude::{CreationChallengeResponse, RequestChallengeResponse, Url};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

struct Gateway {
    client: HttpClient,
    base: String,
    origin: String,
}

impl Gateway {
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: &str,
        cookie: Option<&str>,
    ) -> (StatusCode, Value, Vec<String>) {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("host", "localhost")
            .header("origin", &self.origin)
            .header("content-type", "application/json");
        if let Some(cookie) = cookie {
            request = request.header("cookie", cookie);
        }
        let request = request.body(Full::new(Bytes::from(body.to_string()))).unwrap();
        let response = self.client.request(request).await.expect("gateway reachable");
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

    async fn post(&self, path: &str, body: &Value, cookie: Option<&str>) -> (StatusCode, Value, Vec<String>) {
        self.send(Method::POST, path, &body.to_string(), cookie).await
    }
}

async fn session_cookie(store: &Store, user: &str) -> String {
    let day = Duration::from_secs(86_400);
    let (secret, _) = store.create_session(user, "127.0.0.1", "bench", day, day, now_ms()).await.unwrap();
    format!("__Host-pbxgate={}", secret.expose())
}

/// A software passkey for `user`, registered through the API.
async fn register(gateway: &Gateway, store: &Store, user: &str) -> SoftPasskey {
    let cookie = session_cookie(store, user).await;
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

/// Signs in once: the two API calls, the authenticator's signature between them.
async fn login(gateway: &Gateway, passkey: &mut SoftPasskey, user: &str) {
    let (status, start, _) =
        gateway.post("/.pbxgate/api/passkey/login/start", &json!({"login": user}), None).await;
    assert_eq!(status, 200, "login/start: {start}");
    let options: RequestChallengeResponse = serde_json::from_value(start.clone()).unwrap();
    let credential = passkey.do_authentication(Url::parse(&gateway.origin).unwrap(), options).unwrap();
    let finish = json!({"ceremony": start["ceremony"], "credential": credential});
    let (status, body, cookies) = gateway.post("/.pbxgate/api/passkey/login/finish", &finish, None).await;
    assert_eq!(status, 200, "login/finish: {body}");
    assert!(cookies.iter().any(|c| c.starts_with("__Host-pbxgate=")), "no session cookie");
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

pub(crate) async fn passkeys(addr: &str, origin: &str, store_url: &str, users: usize, seconds: u64) {
    let (store, gateway) = connect(addr, origin, store_url).await;
    let mut keys = Vec::new();
    for i in 0..users {
        let user = format!("bench-{i}");
        keys.push((user.clone(), register(&gateway, &store, &user).await));
    }
    let gateway = std::sync::Arc::new(gateway);
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for (user, mut passkey) in keys {
        let gateway = gateway.clone();
        clients.spawn(async move {
            let mut took = Vec::new();
            while Instant::now() < end {
                let t = Instant::now();
                login(&gateway, &mut passkey, &user).await;
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

pub(crate) async fn sessions(addr: &str, store_url: &str, count: usize) {
    let (store, gateway) = connect(addr, "", store_url).await;
    for _ in 0..count {
        let cookie = session_cookie(&store, "bench-0").await;
        let (status, _, _) = gateway.send(Method::GET, "/", "", Some(&cookie)).await;
        assert_eq!(status, 200, "request with a fresh session");
    }
    println!("{count} sessions live");
}

/// The gateway's store, opened beside it, and a client for its plain-HTTP listener.
async fn connect(addr: &str, origin: &str, store_url: &str) -> (Store, Gateway) {
    let store = Store::open(store_url, "pbxgate:", std::path::Path::new(".")).await.unwrap();
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    (store, Gateway { client, base: format!("http://{addr}"), origin: origin.to_string() })
}
