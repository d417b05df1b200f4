use std::process::Command;
use std::time::{Duration, Instant};

use pbxgate_e2e::client::{https_get, tls_connect, TlsOptions};
use pbxgate_e2e::process::binary;
use pbxgate_e2e::{write_config, GatewayProcess, TempDir, TestGateway, Upstream, TEST_POLICY};

#[tokio::test]
async fn shutdown_lets_a_slow_response_finish_and_refuses_new_connections() {
    let upstream = Upstream::start().await;
    let mut gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let https = gw.https();
    let slow = tokio::spawn(async move { https_get(https, "/slow?ms=1500", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = gw.shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(tls_connect(https, &TlsOptions::default()).await.is_err(), "no new connections while stopping");
    let reply = slow.await.expect("join");
    assert_eq!((reply.status.as_u16(), reply.text()), (200, "slow done".to_string()));
    tokio::time::timeout(Duration::from_secs(5), stopping)
        .await
        .expect("stops after the request")
        .expect("join")
        .expect("ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_response_lets_it_complete() {
    let upstream = Upstream::start().await;
    let dir = TempDir::new("sigterm");
    let config = write_config(&dir, &upstream.url(), TEST_POLICY);
    let mut gw = GatewayProcess::start(&config, &[]);
    let https = gw.https.expect("https");
    let slow = tokio::spawn(async move { https_get(https, "/slow?ms=1500", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.signal("TERM");
    let reply = slow.await.expect("join");
    assert_eq!((reply.status.as_u16(), reply.text()), (200, "slow done".to_string()));
    let status = tokio::task::spawn_blocking(move || {
        let s = gw.wait_exit(Duration::from_secs(10));
        (s, gw.log_lines())
    })
    .await
    .expect("join");
    assert!(
        status.0.is_some_and(|s| s.success()),
        "exit after SIGTERM: {:?}\n{}",
        status.0,
        status.1.join("\n")
    );
}

#[test]
fn check_config_names_bad_keys_and_exits_2() {
    let dir = TempDir::new("check");
    let config = write_config(&dir, "http://127.0.0.1:9", TEST_POLICY);

    let ok = Command::new(binary()).args(["check-config", "--config"]).arg(&config).output().expect("run");
    assert_eq!(ok.status.code(), Some(0), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok"));

    let bad = Command::new(binary())
        .args(["check-config", "--config"])
        .arg(&config)
        .env("PBXGATE_TLS__MIN_VERSION", "1.1")
        .env("PBXGATE_UPSTREAM__TIMEOUT", "soon")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{err}");
    assert!(err.contains("tls.min_version") && err.contains("(from PBXGATE_TLS__MIN_VERSION)"), "{err}");
    assert!(err.contains("upstream.timeout") && err.contains("(from PBXGATE_UPSTREAM__TIMEOUT)"), "{err}");

    // An extension number for a string key, unquoted as shells write it.
    let number = Command::new(binary())
        .args(["check-config", "--config"])
        .arg(&config)
        .env("PBXGATE_BOOTSTRAP__ADMIN", "100")
        .output()
        .expect("run");
    assert_eq!(number.status.code(), Some(0), "{}", String::from_utf8_lossy(&number.stderr));

    let unknown = Command::new(binary())
        .args(["check-config", "--config"])
        .arg(&config)
        .env("PBXGATE_TLS__MIN_VERSON", "1.3")
        .env("PBXGATE_UPSTREAM__TIMEOUT", "soon")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&unknown.stderr);
    assert_eq!(unknown.status.code(), Some(2), "{err}");
    assert!(err.contains("tls.min_verson: unknown key (from PBXGATE_TLS__MIN_VERSON)"), "{err}");
    assert!(err.contains("upstream.timeout"), "an unknown key hides no other problem: {err}");

    let bad_policy = TEST_POLICY.replace("networks = [\"10.0.0.0/8\"]", "networks = [\"10.0.0/8\"]");
    dir.write("policy.toml", bad_policy);
    let out = Command::new(binary()).args(["check-config", "--config"]).arg(&config).output().expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("route[2].networks[0]"), "{err}");
}

/// The example configuration, as is, in a copy of the checkout's layout: its
/// relative paths (the policy, `pbxgate-data/`) land in a temporary
/// directory, never in the checkout where a gateway started by hand may run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_config_runs_as_is_with_env_overrides() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = TempDir::new("example");
    std::fs::create_dir_all(dir.path().join("policies/examples")).unwrap();
    dir.write("policies/examples/pbx.toml", std::fs::read(root.join("policies/examples/pbx.toml")).unwrap());
    let config = dir.write("gateway.toml", std::fs::read(root.join("gateway.toml.example")).unwrap());
    let upstream = Upstream::start().await;
    let url = upstream.url();
    let started = Instant::now();
    let gw = GatewayProcess::start(
        &config,
        &[
            ("PBXGATE_LISTEN__HTTPS", "127.0.0.1:0"),
            ("PBXGATE_LISTEN__HTTP", "127.0.0.1:0"),
            ("PBXGATE_LISTEN__ADMIN", "127.0.0.1:0"),
            ("PBXGATE_UPSTREAM__URL", &url),
            ("PBXGATE_TLS__MIN_VERSION", "1.3"),
        ],
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let https = gw.https.expect("https");
    let only12 = TlsOptions { versions: &[&pbxgate_e2e::client::TLS12], ..Default::default() };
    assert!(tls_connect(https, &only12).await.is_err(), "min_version from the environment applies");
    let reply = https_get(https, "/", &[("accept", "text/html")]).await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), Some("/.pbxgate/login?rd=/"));
    let admin = gw.admin.expect("admin listener");
    let metrics = pbxgate_e2e::client::http_get(admin, "/metrics", &[]).await;
    assert!(
        metrics.text().contains("pbxgate_requests_total{decision=\"login\",status=\"3xx\"} 1"),
        "{}",
        metrics.text()
    );
    assert_eq!(pbxgate_e2e::client::http_get(admin, "/readyz", &[]).await.status, 200);
    assert!(dir.path().join("pbxgate-data/store.db").is_file(), "the store is in the copy's state directory");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_file_changes_reload_the_policy_and_a_broken_one_is_refused() {
    use http_body_util::{BodyExt, Full};
    let upstream = Upstream::start().await;
    let dir = TempDir::new("reload");
    let config = write_config(&dir, &upstream.url(), TEST_POLICY);
    let gw = GatewayProcess::start(&config, &[]);
    let https = gw.https.expect("https");
    // One keep-alive connection for the whole test: reloads do not drop it.
    let tls = tls_connect(https, &TlsOptions::default()).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let mut status_of = async |path: &str| {
        let request = http::Request::get(path)
            .header("host", "localhost")
            .body(Full::new(bytes::Bytes::new()))
            .unwrap();
        sender.ready().await.expect("same connection still open");
        let response = sender.send_request(request).await.expect("same connection still open");
        let status = response.status().as_u16();
        let _ = response.into_body().collect().await;
        status
    };
    assert_eq!(status_of("/private/new").await, 401);

    let with_route = TEST_POLICY.replacen(
        "[[route]]\npath = \"/private/\"",
        "[[route]]\npath = \"/private/new\"\naccess = \"public\"\n\n[[route]]\npath = \"/private/\"",
        1,
    );
    dir.write("policy.toml", &with_route);
    gw.signal("HUP");
    let mut applied = false;
    for _ in 0..30 {
        if status_of("/private/new").await == 200 {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(applied, "the new route applies after SIGHUP");
    assert_eq!(status_of("/private/other").await, 401);

    dir.write("policy.toml", format!("{with_route}\nnot_a_key = 1\n"));
    gw.signal("HUP");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(status_of("/private/new").await, 200, "the old policy stays in force");
    let log = gw.log_lines().join("\n");
    assert!(log.contains("reload refused") && log.contains("not_a_key"), "a clear log line: {log}");

    // A changed file is picked up without a signal too.
    dir.write("policy.toml", TEST_POLICY);
    let mut reverted = false;
    for _ in 0..50 {
        if status_of("/private/new").await == 401 {
            reverted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reverted, "a change of the policy file reloads it");
}

/// Worker threads run under `SCHED_BATCH` (fewer preemptions under load)
/// unless `listen.worker_scheduling = "normal"`; other threads are untouched.
#[test]
fn worker_threads_run_under_sched_batch_unless_configured_normal() {
    let dir = TempDir::new("sched");
    let config = write_config(&dir, "http://127.0.0.1:9", TEST_POLICY);
    // (thread name, scheduling policy) from /proc: policy is stat field 41.
    let threads = |gw: &GatewayProcess| -> Vec<(String, String)> {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", gw.child.id())).expect("proc tasks");
        tasks
            .filter_map(|task| {
                let path = task.ok()?.path();
                let name = std::fs::read_to_string(path.join("comm")).ok()?.trim().to_string();
                let stat = std::fs::read_to_string(path.join("stat")).ok()?;
                let policy = stat.rsplit_once(')')?.1.split_whitespace().nth(38)?.to_string();
                Some((name, policy))
            })
            .collect()
    };
    let settled = |gw: &GatewayProcess, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let all = threads(gw);
            let workers: Vec<_> = all.iter().filter(|(name, _)| name.starts_with("pbxgate-worker")).collect();
            if (!workers.is_empty() && workers.iter().all(|(_, p)| p == want)) || Instant::now() > deadline {
                return all;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    let gw = GatewayProcess::start(&config, &[("PBXGATE_LISTEN__WORKERS", "2")]);
    let all = settled(&gw, "3");
    let workers: Vec<_> = all.iter().filter(|(name, _)| name.starts_with("pbxgate-worker")).collect();
    assert_eq!(workers.len(), 2, "{all:?}");
    assert!(workers.iter().all(|(_, policy)| policy == "3"), "SCHED_BATCH is 3: {all:?}");
    assert!(all.iter().any(|(name, policy)| !name.starts_with("pbxgate-worker") && policy == "0"), "{all:?}");
    drop(gw);

    let normal = [("PBXGATE_LISTEN__WORKERS", "2"), ("PBXGATE_LISTEN__WORKER_SCHEDULING", "normal")];
    let gw = GatewayProcess::start(&config, &normal);
    let all = settled(&gw, "0");
    assert!(all.iter().all(|(_, policy)| policy == "0"), "SCHED_OTHER is 0: {all:?}");
}
