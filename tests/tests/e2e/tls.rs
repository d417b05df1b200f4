use pbxgate_e2e::client::{
    connect_with, connector, get, negotiated_alpn, peer_certificate, send_h1, send_h2, tls_connect,
    TlsOptions, TLS12, TLS13,
};
use pbxgate_e2e::{certificate, TempDir, TestGateway, Upstream, TEST_POLICY};

#[tokio::test]
async fn tls12_refused_when_min_is_13() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(
        &upstream.url(),
        TEST_POLICY,
        "[tls]\nself_signed = true\nmin_version = \"1.3\"\n",
    )
    .await;
    let only12 = TlsOptions { versions: &[&TLS12], ..Default::default() };
    assert!(tls_connect(gw.https(), &only12).await.is_err(), "a TLS 1.2-only client must be refused");
    let ok = tls_connect(gw.https(), &TlsOptions::default()).await.expect("TLS 1.3 works");
    assert_eq!(ok.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
}

#[tokio::test]
async fn tls13_refused_when_max_is_12() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(
        &upstream.url(),
        TEST_POLICY,
        "[tls]\nself_signed = true\nmax_version = \"1.2\"\n",
    )
    .await;
    let only13 = TlsOptions { versions: &[&TLS13], ..Default::default() };
    assert!(tls_connect(gw.https(), &only13).await.is_err(), "a TLS 1.3-only client must be refused");
    let ok = tls_connect(gw.https(), &TlsOptions::default()).await.expect("TLS 1.2 works");
    assert_eq!(ok.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
}

#[tokio::test]
async fn sni_selects_the_certificate() {
    let upstream = Upstream::start().await;
    let dir = TempDir::new("certs");
    let (a_cert, a_key, a_der) = certificate(&["a.test"]);
    let (b_cert, b_key, b_der) = certificate(&["b.test"]);
    dir.write("a.crt", a_cert);
    dir.write("a.key", a_key);
    dir.write("b.crt", b_cert);
    dir.write("b.key", b_key);
    let d = dir.path().display();
    let tls = format!(
        "[tls]\nself_signed = false\n[[tls.certificates]]\ndomains = [\"a.test\"]\ncert = \"{d}/a.crt\"\nkey = \"{d}/a.key\"\n\
         [[tls.certificates]]\ndomains = [\"b.test\"]\ncert = \"{d}/b.crt\"\nkey = \"{d}/b.key\"\n"
    );
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, &tls).await;
    for (sni, want) in [("a.test", &a_der), ("b.test", &b_der)] {
        let stream =
            tls_connect(gw.https(), &TlsOptions { sni, ..Default::default() }).await.expect("connect");
        assert_eq!(peer_certificate(&stream).as_ref(), Some(want), "SNI {sni}");
    }
}

#[tokio::test]
async fn key_log_file_is_written() {
    let upstream = Upstream::start().await;
    let dir = TempDir::new("keylog");
    let log = dir.path().join("keys.log");
    let tls = format!("[tls]\nself_signed = true\nkey_log_file = \"{}\"\n", log.display());
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, &tls).await;
    let stream = tls_connect(gw.https(), &TlsOptions::default()).await.expect("connect");
    drop(stream);
    let text = std::fs::read_to_string(&log).expect("key log exists");
    let line = text
        .lines()
        .find(|l| l.starts_with("CLIENT_HANDSHAKE_TRAFFIC_SECRET "))
        .expect("TLS 1.3 secret line");
    let fields: Vec<&str> = line.split(' ').collect();
    assert_eq!(fields.len(), 3);
    assert_eq!(fields[1].len(), 64, "client random is 32 bytes in hex");
    assert!(fields[2].bytes().all(|b| b.is_ascii_hexdigit()));
}

#[tokio::test]
async fn h2_is_negotiated_by_alpn_and_proxies() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
    let stream = tls_connect(gw.https(), &TlsOptions { alpn, ..Default::default() }).await.expect("connect");
    assert_eq!(negotiated_alpn(&stream).as_deref(), Some(&b"h2"[..]));
    let request = http::Request::get("https://localhost/hello?x=1")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let reply = send_h2(stream, request).await.expect("h2 request");
    assert_eq!(reply.status, 200);
    let echo = reply.json();
    assert_eq!(echo["path"], "/hello?x=1");
    assert_eq!(echo["headers"]["host"][0], "localhost", "the upstream sees the name the client used");
    assert_eq!(echo["version"], "HTTP/1.1");
}

#[tokio::test]
async fn session_resumption_follows_ticket_lifetime() {
    let upstream = Upstream::start().await;
    for (lifetime, resumed) in [("1h", true), ("0s", false)] {
        let tls = format!("[tls]\nself_signed = true\nsession_ticket_lifetime = \"{lifetime}\"\n");
        let gw = TestGateway::start(&upstream.url(), TEST_POLICY, &tls).await;
        let connector = connector(&TlsOptions::default()).expect("connector");
        // A full exchange on the first connection, so the client reads the tickets.
        let first = connect_with(&connector, gw.https(), "localhost").await.expect("connect");
        let reply = send_h1(first, get("/", &[])).await.expect("request");
        assert_eq!(reply.status, 200);
        let second = connect_with(&connector, gw.https(), "localhost").await.expect("connect");
        let kind = second.get_ref().1.handshake_kind();
        assert_eq!(kind == Some(rustls::HandshakeKind::Resumed), resumed, "lifetime {lifetime}: {kind:?}");
    }
}

/// `tls.hsts_max_age`: every response on the TLS listener (proxied, the
/// gateway's pages, refusals) carries `Strict-Transport-Security`; none on
/// plain HTTP, and none unless configured.
#[tokio::test]
async fn hsts_on_the_tls_listener_only_when_configured() {
    use pbxgate_e2e::client::{http_get, https_get};
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "[tls]\nhsts_max_age = \"365d\"\n").await;
    for path in ["/x", "/.pbxgate/login", "/private/calls"] {
        let reply = https_get(gw.https(), path, &[]).await;
        assert_eq!(reply.header("strict-transport-security"), Some("max-age=31536000"), "{path}");
        let reply = http_get(gw.http(), path, &[]).await;
        assert_eq!(reply.header("strict-transport-security"), None, "{path} over plain HTTP");
    }
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    assert_eq!(
        https_get(gw.https(), "/x", &[]).await.header("strict-transport-security"),
        None,
        "off by default"
    );
}

/// `tls.self_signed`: one certificate, kept in the state directory and named
/// for the policy's domains, the same across restarts and reloads (a browser's
/// exception for it stays valid); other domains make a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_signed_certificate_is_kept_across_restarts_and_reloads() {
    use pbxgate_e2e::GatewayProcess;
    use std::os::unix::fs::PermissionsExt;
    let upstream = Upstream::start().await;
    let dir = TempDir::new("self-signed");
    let policy = TEST_POLICY.replace(
        "domains = [\"localhost\", \"a.test\", \"b.test\"]",
        "domains = [\"pbx.test\", \"localhost\", \"*.pbx.test\"]",
    );
    let config = pbxgate_e2e::write_config(&dir, &upstream.url(), &policy);
    let reloads =
        |gw: &GatewayProcess| gw.log_lines().iter().filter(|l| l.contains("policy reloaded")).count();
    let reload = |gw: &GatewayProcess| {
        let before = reloads(gw);
        gw.signal("HUP");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while reloads(gw) == before {
            assert!(std::time::Instant::now() < deadline, "no reload:\n{}", gw.log_lines().join("\n"));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let served = async |gw: &GatewayProcess| {
        let tls = tls_connect(gw.https.expect("https"), &TlsOptions::default()).await.expect("connect");
        peer_certificate(&tls).expect("a certificate")
    };

    let gw = GatewayProcess::start(&config, &[]);
    let first = served(&gw).await;
    let (_, cert) = x509_parser::parse_x509_certificate(&first).expect("x509");
    let cn = cert.subject().iter_common_name().next().and_then(|cn| cn.as_str().ok()).map(str::to_string);
    assert_eq!(cn.as_deref(), Some("pbx.test"), "the first domain");
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .expect("SAN")
        .expect("SAN")
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(sans, ["pbx.test", "localhost", "*.pbx.test"], "every domain, the wildcard too");
    let validity = cert.validity();
    let days = (validity.not_after.timestamp() - validity.not_before.timestamp()) / 86_400;
    assert!((360..=370).contains(&days), "about a year: {days} days");
    let key_mode =
        std::fs::metadata(dir.path().join("self-signed.key")).expect("kept key").permissions().mode();
    assert_eq!(key_mode & 0o777, 0o600, "the key is the service's alone");
    let kept = std::fs::read_to_string(dir.path().join("self-signed.crt")).expect("kept certificate");
    assert!(kept.starts_with("-----BEGIN CERTIFICATE-----"));

    // A reload with the same domains keeps it.
    reload(&gw);
    assert_eq!(served(&gw).await, first, "the same certificate after a reload");
    drop(gw);

    // A restart keeps it.
    let gw = GatewayProcess::start(&config, &[]);
    assert_eq!(served(&gw).await, first, "the same certificate after a restart");

    // Other domains: a new one, at the reload.
    dir.write("policy.toml", policy.replace("\"*.pbx.test\"]", "\"*.pbx.test\", \"pbx2.test\"]"));
    reload(&gw);
    let renamed = served(&gw).await;
    assert_ne!(renamed, first, "a new certificate for the new domains");
    let (_, cert) = x509_parser::parse_x509_certificate(&renamed).expect("x509");
    let names = format!("{:?}", cert.subject_alternative_name().expect("SAN").expect("SAN").value);
    assert!(names.contains("pbx2.test"), "{names}");
    drop(gw);
    let gw = GatewayProcess::start(&config, &[]);
    assert_eq!(served(&gw).await, renamed, "and that one is kept");
}
