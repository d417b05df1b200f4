//! Real `redis-server` processes on loopback: single (restartable on the same
//! port and data directory), over TLS, a three-master cluster (with or
//! without TLS), and a master with a replica under a sentinel.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

pub fn redis_server_binary() -> &'static str {
    let found =
        Command::new("redis-server").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "redis-server is missing: install it with `apt-get install -y redis-server` (scripts/test does this)"
    );
    "redis-server"
}

/// A free loopback port whose cluster bus port (+10000) is free as well.
pub fn free_port(with_bus: bool) -> u16 {
    for _ in 0..200 {
        let Ok(listener) = TcpListener::bind("127.0.0.1:0") else { continue };
        let Ok(port) = listener.local_addr().map(|a| a.port()) else { continue };
        if !with_bus {
            return port;
        }
        if port <= 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair found");
}

/// Runs `redis-cli` against the Redis (or sentinel) on `port`; its output
/// when it succeeded.
fn cli(port: u16, tls_ca: Option<&Path>, password: Option<&str>, args: &[&str]) -> Option<String> {
    let mut command = Command::new("redis-cli");
    command.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    if let Some(ca) = tls_ca {
        command.arg("--tls").arg("--cacert").arg(ca);
    }
    if let Some(password) = password {
        // Not on the command line, where `ps` would show it.
        command.env("REDISCLI_AUTH", password);
    }
    let out = command.args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    /// Its certificate and key when it speaks only TLS (the certificate is
    /// self-signed: it is also the CA a client trusts).
    tls: Option<(PathBuf, PathBuf)>,
    child: Option<Child>,
    _tmp: Option<TempDir>,
}

impl RedisServer {
    /// A Redis with persistence (AOF) in its own directory.
    pub fn start() -> Self {
        let tmp = TempDir::new("redis");
        let mut server = Self::start_in(tmp.path(), free_port(false), &[]);
        server._tmp = Some(tmp);
        server
    }

    pub fn start_in(dir: &Path, port: u16, extra: &[&str]) -> Self {
        Self::spawned(dir, port, None, extra)
    }

    /// The same, speaking only TLS on `port` (a cluster's bus too), with
    /// `cert` and `key`; clients need no certificate.
    pub fn start_tls_in(dir: &Path, port: u16, cert_and_key: (PathBuf, PathBuf), extra: &[&str]) -> Self {
        Self::spawned(dir, port, Some(cert_and_key), extra)
    }

    fn spawned(dir: &Path, port: u16, tls: Option<(PathBuf, PathBuf)>, extra: &[&str]) -> Self {
        let mut server = Self {
            port,
            dir: dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            tls,
            child: None,
            _tmp: None,
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut command = Command::new(redis_server_binary());
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                // Self-signed: the nodes of a cluster trust each other by it.
                .arg("--tls-ca-cert-file")
                .arg(cert)
                .args(["--tls-auth-clients", "no", "--tls-cluster", "yes"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "yes"])
            .args(["--appendfsync", "always", "--protected-mode", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers_ping() {
            assert!(Instant::now() < deadline, "redis-server on port {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    fn answers_ping(&self) -> bool {
        self.cli(&["PING"]).is_some_and(|out| out.trim() == "PONG")
    }

    /// Runs `redis-cli` against this server (with its `--requirepass`, if
    /// it was given one); its output when it succeeded.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let password = self.extra.windows(2).find(|w| w[0] == "--requirepass").map(|w| w[1].as_str());
        cli(self.port, self.tls.as_ref().map(|(cert, _)| cert.as_path()), password, args)
    }

    /// Kills the server abruptly (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops it cleanly (SIGTERM: Redis writes its data and exits).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three masters, no replicas, slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// With TLS: the nodes' one self-signed certificate, the CA to trust.
    pub ca_file: Option<PathBuf>,
    _tmp: TempDir,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// The same cluster speaking only TLS, to clients and between nodes.
    pub fn start_tls() -> Self {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Self {
        const CLUSTER: [&str; 6] = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
        ];
        let tmp = TempDir::new("cluster");
        let tls = tls.then(|| {
            let (cert, key, _) = crate::certificate(&["127.0.0.1", "localhost"]);
            (tmp.write("redis.pem", cert), tmp.write("redis.key", key))
        });
        let mut nodes = Vec::new();
        for i in 0..3 {
            let dir = tmp.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir).expect("node dir");
            let port = free_port(true);
            nodes.push(match &tls {
                None => RedisServer::start_in(&dir, port, &CLUSTER),
                Some(files) => RedisServer::start_tls_in(&dir, port, files.clone(), &CLUSTER),
            });
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut create = Command::new("redis-cli");
        if let Some((cert, _)) = &tls {
            create.arg("--tls").arg("--cacert").arg(cert);
        }
        let out = create
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).is_some_and(|i| i.contains("cluster_state:ok")));
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "cluster did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { nodes, ca_file: tls.map(|(cert, _)| cert), _tmp: tmp }
    }

    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let scheme = if self.ca_file.is_some() { "rediss+cluster" } else { "redis+cluster" };
        format!("{scheme}://{}", hosts.join(","))
    }
}

/// A Redis that speaks only TLS, with a self-signed certificate for
/// 127.0.0.1 and `localhost` (`ca_file`, the client's trust anchor). With
/// `client_ca`, it asks every client for a certificate signed by that CA
/// (Redis's default when TLS is on); without, it asks for none.
pub struct TlsRedis {
    pub port: u16,
    pub ca_file: PathBuf,
    child: Child,
    _dir: TempDir,
}

impl TlsRedis {
    pub fn start(client_ca: Option<&Path>) -> Self {
        let dir = TempDir::new("redis-tls");
        let (cert, key, _) = crate::certificate(&["127.0.0.1", "localhost"]);
        let ca_file = dir.write("redis.pem", cert);
        let key_file = dir.write("redis.key", key);
        let port = free_port(false);
        let mut command = Command::new(redis_server_binary());
        command
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--tls-cert-file")
            .arg(&ca_file)
            .arg("--tls-key-file")
            .arg(&key_file);
        match client_ca {
            Some(client_ca) => {
                command.args(["--tls-auth-clients", "yes", "--tls-ca-cert-file"]).arg(client_ca)
            }
            None => command.args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server with TLS");
        // Listening is enough: a TLS PING would need the client's files.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server (TLS) on port {port} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { port, ca_file, child, _dir: dir }
    }

    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ACL user a password-protected sentinel also has; its password is the
/// sentinel's followed by `-` and this name.
pub const SENTINEL_USER: &str = "watcher";

/// A master with one replica, watched by one sentinel (quorum 1) that fails
/// over a second after the master stops answering; with TLS, all three speak
/// only TLS (one self-signed certificate, `ca_file`).
pub struct RedisSentinel {
    pub master: RedisServer,
    pub replica: RedisServer,
    /// The sentinel's port.
    pub port: u16,
    pub ca_file: Option<PathBuf>,
    /// The master's and replica's `requirepass`, and the sentinel's.
    passwords: Option<(String, String)>,
    child: Child,
    _tmp: TempDir,
}

impl RedisSentinel {
    pub const MASTER_NAME: &'static str = "pbx";

    pub fn start() -> Self {
        Self::start_with(false, None)
    }

    pub fn start_tls() -> Self {
        Self::start_with(true, None)
    }

    /// Every node asks for a password: `master`'s for the master and the
    /// replica, `sentinel`'s for the sentinel.
    pub fn start_with_passwords(master: &str, sentinel: &str) -> Self {
        Self::start_with(false, Some((master.to_string(), sentinel.to_string())))
    }

    fn start_with(tls: bool, passwords: Option<(String, String)>) -> Self {
        let tmp = TempDir::new("sentinel");
        let dir = |name: &str| {
            let dir = tmp.path().join(name);
            std::fs::create_dir_all(&dir).expect("node dir");
            dir
        };
        let files = tls.then(|| {
            let (cert, key, _) = crate::certificate(&["127.0.0.1", "localhost"]);
            (tmp.write("redis.pem", cert), tmp.write("redis.key", key))
        });
        let auth: Vec<&str> = match &passwords {
            Some((master, _)) => vec!["--requirepass", master, "--masterauth", master],
            None => Vec::new(),
        };
        let node = |name: &str, extra: &[&str]| match &files {
            None => RedisServer::start_in(&dir(name), free_port(false), &[extra, &auth].concat()),
            Some(files) => RedisServer::start_tls_in(
                &dir(name),
                free_port(false),
                files.clone(),
                &[extra, &auth, &["--tls-replication", "yes"]].concat(),
            ),
        };
        let master = node("master", &[]);
        let master_port = master.port.to_string();
        let replica = node("replica", &["--replicaof", "127.0.0.1", &master_port]);
        let port = free_port(false);
        let listen = match &files {
            None => format!("port {port}\n"),
            Some((cert, key)) => format!(
                "port 0\ntls-port {port}\ntls-cert-file {cert}\ntls-key-file {key}\ntls-ca-cert-file {cert}\n\
                 tls-auth-clients no\ntls-replication yes\n",
                cert = cert.display(),
                key = key.display()
            ),
        };
        let name = Self::MASTER_NAME;
        let auth = match &passwords {
            // And an ACL user, for clients that sign in with a name.
            Some((master, sentinel)) => format!(
                "sentinel auth-pass {name} {master}\nrequirepass {sentinel}\n\
                 user {SENTINEL_USER} on >{sentinel}-{SENTINEL_USER} +@all\n"
            ),
            None => String::new(),
        };
        // The sentinel rewrites its file as it learns: it must be its own.
        let conf = tmp.write(
            "sentinel.conf",
            format!(
                "{listen}bind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 10000\n{auth}",
                tmp.path().display(),
            ),
        );
        let child = Command::new(redis_server_binary())
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server --sentinel");
        let ca_file = files.map(|(cert, _)| cert);
        let sentinel = Self { master, replica, port, ca_file, passwords, child, _tmp: tmp };
        // Ready to fail over: the replica in sync, and the sentinel knowing it.
        let replica_port = format!("\n{}\n", sentinel.replica.port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let synced = sentinel
                .replica
                .cli(&["INFO", "replication"])
                .is_some_and(|i| i.contains("master_link_status:up"));
            let known = sentinel
                .cli(&["SENTINEL", "REPLICAS", Self::MASTER_NAME])
                .is_some_and(|r| r.contains(&replica_port));
            if synced && known {
                break;
            }
            assert!(Instant::now() < deadline, "sentinel did not see the replica (synced: {synced})");
            std::thread::sleep(Duration::from_millis(100));
        }
        sentinel
    }

    /// The store URL, with the master's password when it has one.
    pub fn url(&self) -> String {
        let scheme = if self.ca_file.is_some() { "rediss+sentinel" } else { "redis+sentinel" };
        let auth = self.passwords.as_ref().map(|(master, _)| format!(":{master}@")).unwrap_or_default();
        format!("{scheme}://{auth}127.0.0.1:{}/{}", self.port, Self::MASTER_NAME)
    }

    /// Runs `redis-cli` against the sentinel.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let password = self.passwords.as_ref().map(|(_, sentinel)| sentinel.as_str());
        cli(self.port, self.ca_file.as_deref(), password, args)
    }

    /// The master's port, as the sentinel names it now.
    pub fn master_port(&self) -> Option<u16> {
        let out = self.cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", Self::MASTER_NAME])?;
        out.lines().nth(1)?.trim().parse().ok()
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
