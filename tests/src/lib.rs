//! Test kit: real servers and clients on loopback, ephemeral ports only.
//!
//! - [`Upstream`]: a PBX stand-in (echo, streaming, slow and websocket routes);
//! - [`TestGateway`]: pbxgate in-process, from a TOML text;
//! - [`GatewayProcess`]: the real `pbxgate` binary as a child process;
//! - [`client`]: HTTP/1.1 and HTTP/2 over TCP or TLS with the TLS knobs tests need.

// A test kit: failing loudly, with a message, is its job.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod browser;
pub mod client;
pub mod process;
pub mod redis;
pub mod smtp;
pub mod upstream;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

pub use process::GatewayProcess;
pub use upstream::Upstream;

use figment::providers::{Format, Toml};
use figment::Figment;
use pbxgate::config::Config;
use tokio::sync::oneshot;

/// A fresh directory under the target's tmp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pbxgate-test-{}-{}-{label}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, contents).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A policy for tests: `localhost` and `a.test`/`b.test`, a public echo area,
/// a user area, an admin area, a network-only area.
pub const TEST_POLICY: &str = r#"
domains = ["localhost", "a.test", "b.test"]
drop_user_agents = ["friendly-scanner", "sipvicious", "SIP Call"]
trusted_proxies = []

[[route]]
path = "/private/"
access = "user"

[[route]]
path = "/admin/"
access = "admin"
step_up = "15m"

[[route]]
path = "/provisioning/"
access = "network"
networks = ["10.0.0.0/8"]

[[route]]
path = "/"
access = "public"

[[user]]
name = "100"
role = "admin"
"#;

/// Writes a gateway configuration (self-signed TLS, all listeners on port 0)
/// and its policy into `dir`.
pub fn write_config(dir: &TempDir, upstream: &str, policy: &str) -> PathBuf {
    dir.write("policy.toml", policy);
    dir.write(
        "gateway.toml",
        format!(
            r#"
policy_file = "policy.toml"
public_url = "https://localhost:8443"
[listen]
https = "127.0.0.1:0"
http = "127.0.0.1:0"
admin = "127.0.0.1:0"
shutdown_timeout = "10s"
[upstream]
url = "{upstream}"
connect_timeout = "2s"
timeout = "5s"
[store]
url = "embedded://store.db"
[tls]
self_signed = true
"#
        ),
    )
}

/// pbxgate running in this process.
pub struct TestGateway {
    pub addrs: pbxgate::Addrs,
    pub store: pbxgate::store::Store,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), pbxgate::Error>>>,
    dir: TempDir,
}

impl TestGateway {
    /// `overrides` is TOML merged over the base configuration of [`write_config`].
    pub async fn start(upstream: &str, policy: &str, overrides: &str) -> Self {
        let dir = TempDir::new("gw");
        let path = write_config(&dir, upstream, policy);
        let figment = Figment::new().merge(Toml::file_exact(&path)).merge(Toml::string(overrides));
        let config =
            Config::from_figment(&path, figment).unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        Self::from_config(config, dir).await
    }

    pub async fn from_config(config: Config, dir: TempDir) -> Self {
        let gateway = pbxgate::Gateway::bind(config).await.expect("bind gateway");
        let addrs = gateway.addrs().clone();
        let store = gateway.store();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(gateway.serve(async move {
            let _ = rx.await;
        }));
        Self { addrs, store, shutdown: Some(tx), task: Some(task), dir }
    }

    pub fn https(&self) -> std::net::SocketAddr {
        self.addrs.https.expect("https listener")
    }

    /// Replaces the policy file; the gateway notices within its poll (2 s).
    pub fn write_policy(&self, policy: &str) {
        self.dir.write("policy.toml", policy);
    }

    pub fn http(&self) -> std::net::SocketAddr {
        self.addrs.http.expect("http listener")
    }

    /// Starts a graceful shutdown; the returned handle completes when it is done.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<Result<(), pbxgate::Error>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.take().expect("gateway task")
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// A certificate and key (PEM) for these names, self-signed.
pub fn certificate(names: &[&str]) -> (String, String, Vec<u8>) {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let certified = rcgen::generate_simple_self_signed(names).expect("rcgen");
    (certified.cert.pem(), certified.signing_key.serialize_pem(), certified.cert.der().to_vec())
}
