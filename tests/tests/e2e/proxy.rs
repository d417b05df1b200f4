use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use pbxgate_e2e::client::{get, http_get, https_get, send_h1, tls_connect, TlsOptions};
use pbxgate_e2e::{certificate, write_config, GatewayProcess, TempDir, TestGateway, Upstream, TEST_POLICY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn identity_headers_and_gateway_cookies_never_reach_the_upstream() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let spoofs = [
        ("Remote-User", "100"),
        ("remote_user", "100"),
        ("REMOTE.USER", "100"),
        ("Remote-Email", "a@example.com"),
        ("remote_groups", "admin"),
        ("Remote.Name", "Alice"),
        ("X-Pbxgate-Assertion", "forged"),
        ("cookie", "theme=dark; __Host-pbxgate=stolen; __Host-pbxgate-remember=stolen2"),
    ];
    for reply in [https_get(gw.https(), "/x", &spoofs).await, http_get(gw.http(), "/x", &spoofs).await] {
        assert_eq!(reply.status, 200, "{}", reply.text());
        let echo = reply.json();
        let headers = echo["headers"].as_object().expect("headers");
        for name in headers.keys() {
            let folded = name.to_ascii_lowercase().replace(['_', '.'], "-");
            assert!(
                !folded.starts_with("remote-") && !folded.starts_with("x-pbxgate"),
                "{name} reached the upstream"
            );
        }
        assert_eq!(echo["headers"]["cookie"][0], "theme=dark", "only the application's cookies go upstream");
        assert!(
            reply.header("x-upstream-hop").is_none(),
            "headers named in the upstream's Connection are removed"
        );
    }
}

#[tokio::test]
async fn the_upstream_cannot_set_the_gateways_cookies() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    for reply in
        [https_get(gw.https(), "/set-cookies", &[]).await, http_get(gw.http(), "/set-cookies", &[]).await]
    {
        assert_eq!(reply.status, 200, "{}", reply.text());
        let set: Vec<&str> =
            reply.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).collect();
        assert_eq!(set, ["pbxlang=de; Path=/"], "only the PBX's own cookie reaches the browser");
    }
}

/// Redirects to the PBX's own address become paths on the gateway (nginx's
/// `proxy_redirect default`); any other stays as the PBX wrote it.
#[tokio::test]
async fn redirects_to_the_pbxs_own_address_become_the_gateways() {
    let upstream = Upstream::start().await;
    let own = upstream.url();
    let own_upper = own.to_ascii_uppercase();
    let port = upstream.addr.port();
    let gw = TestGateway::start(&own, TEST_POLICY, "").await;
    let cases = [
        (format!("{own}/landing?x=1"), "/landing?x=1".to_string()),
        (format!("{own_upper}/Landing"), "/Landing".into()),
        (own.clone(), "/".into()),
        (format!("{own}?next=1"), "/?next=1".into()),
        // Kept: another site once the origin is cut off, another port, another host.
        (format!("{own}//evil.example/x"), format!("{own}//evil.example/x")),
        (format!("{own}/\\evil.example/x"), format!("{own}/\\evil.example/x")),
        (format!("http://127.0.0.1:{port}0/x"), format!("http://127.0.0.1:{port}0/x")),
        ("https://pbx.example.com/x".into(), "https://pbx.example.com/x".into()),
        ("/already/relative".into(), "/already/relative".into()),
    ];
    for (to, expected) in cases {
        let reply = http_get(gw.http(), &format!("/redirect?to={to}"), &[]).await;
        assert_eq!(reply.status, 302, "{to}");
        assert_eq!(reply.header("location"), Some(expected.as_str()), "Location {to}");
    }

    // With a path in upstream.url, the path goes too; one outside it stays.
    let gw = TestGateway::start(&format!("{own}/pbx"), TEST_POLICY, "").await;
    for (to, expected) in [
        (format!("{own}/pbx/landing"), "/landing".to_string()),
        (format!("{own}/pbx"), "/".into()),
        (format!("{own}/pbxother"), format!("{own}/pbxother")),
        (format!("{own}/elsewhere"), format!("{own}/elsewhere")),
    ] {
        let reply = http_get(gw.http(), &format!("/redirect?to={to}"), &[]).await;
        assert_eq!(reply.header("location"), Some(expected.as_str()), "Location {to} under /pbx");
    }
}

#[tokio::test]
async fn forwarded_headers_are_set_and_spoofed_ones_replaced() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let reply = https_get(
        gw.https(),
        "/x",
        &[("x-forwarded-for", "6.6.6.6"), ("x-forwarded-host", "evil"), ("x-real-ip", "6.6.6.6")],
    )
    .await;
    let h = &reply.json()["headers"];
    assert_eq!(h["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "https");
    assert_eq!(h["x-forwarded-host"][0], "localhost");
    assert_eq!(h["x-real-ip"][0], "127.0.0.1");

    // From a trusted proxy, its X-Forwarded-For is believed and appended to.
    let trusting = TEST_POLICY.replace("trusted_proxies = []", "trusted_proxies = [\"127.0.0.0/8\"]");
    let gw = TestGateway::start(&upstream.url(), &trusting, "").await;
    let reply =
        http_get(gw.http(), "/x", &[("x-forwarded-for", "203.0.113.9"), ("x-forwarded-proto", "https")])
            .await;
    let h = &reply.json()["headers"];
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-real-ip"][0], "203.0.113.9");
    assert_eq!(h["x-forwarded-proto"][0], "https");
}

#[tokio::test]
async fn protected_paths_send_browsers_to_login_and_programs_get_401() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let browser = [("accept", "text/html,application/xhtml+xml")];
    let reply = https_get(gw.https(), "/private/calls?day=mon", &browser).await;
    assert_eq!(reply.status, 302);
    assert_eq!(reply.header("location"), Some("/.pbxgate/login?rd=/private/calls%3Fday%3Dmon"));
    let reply = https_get(gw.https(), "/private/calls", &[("accept", "application/json")]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.json()["error"], "login_required");
    // The login page answers (a placeholder until the login issue lands).
    let reply = https_get(gw.https(), "/.pbxgate/login?rd=/private/calls", &browser).await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-security-policy").is_some_and(|c| c.contains("default-src 'none'")));
    // Dot segments and encodings cannot walk around a rule.
    for sneaky in
        ["/public/../private/x", "//private/x", "/%70rivate/x", "/private/./x", "/x/%2e%2e/private/"]
    {
        let reply = https_get(gw.https(), sneaky, &[]).await;
        assert_eq!(reply.status, 401, "{sneaky}");
    }
    for refused in ["/private%2fx", "/a%5c..%5cprivate", "/a%00"] {
        let reply = https_get(gw.https(), refused, &[]).await;
        assert_eq!(reply.status, 400, "{refused}");
    }
    // Admin area: login first; network-only area: refused from outside.
    assert_eq!(https_get(gw.https(), "/admin/", &[]).await.status, 401);
    assert_eq!(https_get(gw.https(), "/provisioning/phone.cfg", &[]).await.status, 403);
    // The upstream receives the normalised path.
    assert_eq!(https_get(gw.https(), "/a/./b//c", &[]).await.json()["path"], "/a/b/c");
}

#[tokio::test]
async fn upstream_down_gives_502_and_slow_upstream_504() {
    // A port nobody listens on.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let gw = TestGateway::start(&format!("http://{unused}"), TEST_POLICY, "").await;
    let reply = https_get(gw.https(), "/x", &[]).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"], "bad_gateway");
    let reply = https_get(gw.https(), "/x", &[("accept", "text/html")]).await;
    assert_eq!(reply.status, 502);
    assert!(
        reply.text().contains("<html")
            && reply.header("content-type").is_some_and(|c| c.starts_with("text/html"))
    );

    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "[upstream]\ntimeout = \"300ms\"\n").await;
    let started = Instant::now();
    let reply = https_get(gw.https(), "/slow?ms=3000", &[]).await;
    assert_eq!(reply.status, 504);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(2), "504 after {waited:?}");
    assert_eq!(https_get(gw.https(), "/slow?ms=10", &[]).await.status, 200);
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_still_gets_the_answer() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let mut tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
    tcp.write_all(b"GET /slow?ms=200 HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("request");
    // Done sending (as `nc -N` or a shell script might): the answer still comes.
    tcp.shutdown().await.expect("half-close");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(read.is_ok() && reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.ends_with("slow done"), "{reply}");
}

#[tokio::test]
async fn limits_on_header_size_and_body_size() {
    let upstream = Upstream::start().await;
    let limits = "[limits]\nmax_header_size = \"8KiB\"\nmax_request_body = \"1KiB\"\n";
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, limits).await;
    let big = "x".repeat(20_000);
    let tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
    let status = send_h1(tcp, get("/x", &[("x-big", &big)])).await.map(|r| r.status.as_u16());
    assert!(matches!(status, Ok(431) | Err(_)), "oversized headers refused: {status:?}");

    let tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
    assert_eq!(send_h1(tcp, upload(4096)).await.expect("reply").status, 413);

    // Without Content-Length (chunked), the limit is enforced while streaming.
    let tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
    let request = Request::post("/upload").header("host", "localhost").body(chunks(4, 1024)).expect("req");
    let status = send_h1(tcp, request).await.map(|r| r.status.as_u16());
    assert!(matches!(status, Ok(413) | Err(_)), "{status:?}");

    let tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
    let reply = send_h1(tcp, upload(1000)).await.expect("reply");
    assert_eq!((reply.status.as_u16(), reply.text()), (200, "1000".to_string()));
}

#[tokio::test]
async fn a_badly_framed_request_body_is_the_clients_error_not_the_pbxs() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let mut tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
    // A good chunk, then a size that is not hexadecimal: found only once the
    // head has gone to the PBX and the body is streaming.
    let request =
        "POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\nzz\r\n";
    tcp.write_all(request.as_bytes()).await.expect("request");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(read.is_ok() && reply.starts_with("HTTP/1.1 400"), "400, not 502: {reply}");

    // The PBX connection the broken body was going to is not reused half-way.
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
        let reply = send_h1(tcp, upload(10)).await.expect("reply");
        assert_eq!((reply.status.as_u16(), reply.text()), (200, "10".to_string()));
    }
}

/// A POST of `size` bytes to the test upstream's `/upload`, which answers with the count.
fn upload(size: usize) -> Request<Full<Bytes>> {
    Request::post("/upload")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(vec![0u8; size])))
        .expect("req")
}

/// `count` chunks of `size` bytes, produced as they are sent.
fn chunks(
    count: usize,
    size: usize,
) -> StreamBody<impl futures_core::Stream<Item = Result<Frame<Bytes>, std::io::Error>>> {
    let chunk = Bytes::from(vec![b'u'; size]);
    let mut left = count;
    StreamBody::new(Stream(move || {
        (left > 0).then(|| {
            left -= 1;
            Ok(Frame::data(chunk.clone()))
        })
    }))
}

struct Stream<F>(F);

impl<F: FnMut() -> Option<Result<Frame<Bytes>, std::io::Error>> + Unpin> futures_core::Stream for Stream<F> {
    type Item = Result<Frame<Bytes>, std::io::Error>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready((self.0)())
    }
}

#[tokio::test]
async fn websocket_upgrade_echoes_through_the_gateway() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let mut tls = tls_connect(gw.https(), &TlsOptions::default()).await.expect("connect");
    tls.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tls.read(&mut byte).await.expect("read"), 1, "closed before the 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // A masked websocket text frame "hello", echoed byte for byte by the upstream.
    let frame = [0x81, 0x85, 1, 2, 3, 4, b'h' ^ 1, b'e' ^ 2, b'l' ^ 3, b'l' ^ 4, b'o' ^ 1];
    for _ in 0..3 {
        tls.write_all(&frame).await.expect("write frame");
        let mut echoed = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(echoed, frame);
    }
}

/// 100 MB up and 100 MB down through the real binary, whose peak memory must
/// stay far below the size of the transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_megabytes_stream_with_bounded_memory() {
    const SIZE: usize = 100 * 1024 * 1024;
    let upstream = Upstream::start().await;
    let dir = TempDir::new("stream");
    let config = write_config(&dir, &upstream.url(), TEST_POLICY);
    let gw = GatewayProcess::start(&config, &[]);
    let https = gw.https.expect("https");
    let before = gw.peak_rss();

    let tls = tls_connect(https, &TlsOptions::default()).await.expect("connect");
    let request =
        Request::post("/upload").header("host", "localhost").body(chunks(SIZE / 65536, 65536)).expect("req");
    let reply = send_h1(tls, request).await.expect("upload");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), SIZE.to_string(), "every byte arrived upstream");

    let tls = tls_connect(https, &TlsOptions::default()).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.expect("h1");
    tokio::spawn(conn);
    let response = sender.send_request(get(&format!("/download?bytes={SIZE}"), &[])).await.expect("download");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0usize;
    while let Some(frame) = body.frame().await {
        received += frame.expect("frame").data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(received, SIZE);

    let peak = gw.peak_rss();
    let grew = peak.saturating_sub(before);
    eprintln!("gateway peak RSS {} MiB before, {} MiB after 2 x 100 MiB", before >> 20, peak >> 20);
    assert!(grew < 40 * 1024 * 1024, "gateway peak RSS grew by {} MiB for a 100 MiB transfer", grew >> 20);
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "[listen]\nworkers = 1\n").await;
    for _ in 0..10 {
        assert_eq!(http_get(gw.http(), "/x", &[]).await.status, 200);
    }
    // A streamed (chunked) body read to its end hands the connection back too.
    let reply = http_get(gw.http(), "/download?bytes=300000", &[]).await;
    assert_eq!(reply.body.len(), 300_000);
    assert_eq!(http_get(gw.http(), "/x", &[]).await.status, 200);
    assert_eq!(upstream.connections(), 1, "one request after another: one upstream connection");

    // A response the client walks away from mid-body: its connection is dropped
    // (not handed back), and the next request gets a fresh one.
    let tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await.expect("h1");
    let conn = tokio::spawn(conn);
    let response = sender.send_request(get("/download?bytes=50000000", &[])).await.expect("download");
    let mut body = response.into_body();
    body.frame().await.expect("a first frame").expect("frame");
    drop((body, sender));
    conn.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(http_get(gw.http(), "/x", &[]).await.status, 200);
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn an_upstream_that_hangs_up_idle_connections_costs_no_request() {
    let pbx = BareUpstream::start(Mode::HangUp).await;
    let gw = TestGateway::start(&pbx.url(), TEST_POLICY, "[listen]\nworkers = 1\n").await;
    for i in 0..10 {
        let reply = http_get(gw.http(), "/x", &[]).await;
        assert_eq!((reply.status.as_u16(), reply.text()), (200, "ok".into()), "request {i}");
        if i % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(pbx.accepted.load(Ordering::SeqCst), 10, "each hung-up connection was replaced");
}

#[tokio::test]
async fn idle_upstream_connections_close_after_the_idle_timeout() {
    let pbx = BareUpstream::start(Mode::KeepAlive).await;
    let overrides = "[listen]\nworkers = 1\n[upstream]\npool_idle_timeout = \"300ms\"\n";
    let gw = TestGateway::start(&pbx.url(), TEST_POLICY, overrides).await;
    assert_eq!(http_get(gw.http(), "/x", &[]).await.status, 200);
    assert_eq!(http_get(gw.http(), "/x", &[]).await.status, 200);
    assert_eq!(pbx.accepted.load(Ordering::SeqCst), 1);
    let started = Instant::now();
    while pbx.closed_by_gateway.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < Duration::from_secs(3), "the idle connection is still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(started.elapsed() >= Duration::from_millis(200), "closed before it was idle for long");
}

#[tokio::test]
async fn a_safe_request_the_upstream_drops_on_an_idle_connection_is_sent_again() {
    let pbx = BareUpstream::start(Mode::CloseOnSecond).await;
    let gw = TestGateway::start(&pbx.url(), TEST_POLICY, "[listen]\nworkers = 1\n").await;
    assert_eq!(http_get(gw.http(), "/a", &[]).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The PBX reads this GET on the pooled connection and closes it unanswered.
    let reply = http_get(gw.http(), "/b", &[]).await;
    assert_eq!((reply.status.as_u16(), reply.text()), (200, "ok".into()));
    assert_eq!(pbx.requests(), ["GET /a", "GET /b", "GET /b"], "sent again on a new connection");
    assert_eq!(pbx.accepted.load(Ordering::SeqCst), 2);

    // A request with a body is not repeated: the PBX may have acted on it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
    let post =
        Request::post("/c").header("host", "localhost").body(Full::new(Bytes::from("x"))).expect("request");
    let reply = send_h1(tcp, post).await.expect("reply");
    assert_eq!(reply.status, 502);
    assert_eq!(pbx.requests().iter().filter(|r| *r == "POST /c").count(), 1);
}

#[tokio::test]
async fn an_answer_before_the_upload_ends_reaches_the_client_and_its_connection_is_closed() {
    // The PBX answers as soon as it has a request's head (a refusal, say),
    // before the client has sent all of its body.
    let pbx = BareUpstream::start(Mode::KeepAlive).await;
    let gw = TestGateway::start(&pbx.url(), TEST_POLICY, "[listen]\nworkers = 1\n").await;
    let mut tcp = tokio::net::TcpStream::connect(gw.http()).await.expect("connect");
    let head = "POST /upload HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\n";
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&[b'u'; 1000]).await.expect("first part of the body");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    while !answer.ends_with(b"\r\n\r\nok") {
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut chunk)).await;
        match read.expect("the answer came before the upload ended") {
            Ok(n) if n > 0 => answer.extend_from_slice(&chunk[..n]),
            other => panic!("connection ended before the answer: {other:?} {answer:?}"),
        }
    }
    assert!(answer.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&answer));
    drop(tcp);

    // The PBX is still waiting for the rest of that body: its connection
    // must not carry another request.
    let reply = http_get(gw.http(), "/x", &[]).await;
    assert_eq!((reply.status.as_u16(), reply.text()), (200, "ok".into()));
    assert_eq!(pbx.accepted.load(Ordering::SeqCst), 2, "a new upstream connection for the next request");
    let started = Instant::now();
    while pbx.closed_by_gateway.load(Ordering::SeqCst) == 0 {
        assert!(started.elapsed() < Duration::from_secs(3), "the half-sent connection is still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn https_upstream_is_verified_against_its_ca() {
    let (cert, key, _) = certificate(&["127.0.0.1"]);
    let upstream = Upstream::start_tls(&cert, &key).await;
    let dir = TempDir::new("pbx-ca");
    let ca = dir.write("pbx.pem", &cert);
    let trusted = format!("[listen]\nworkers = 1\n[upstream]\nca_file = \"{}\"\n", ca.display());
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, &trusted).await;
    for _ in 0..3 {
        let reply = https_get(gw.https(), "/over-tls?x=1", &[]).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json()["path"], "/over-tls?x=1");
    }
    assert_eq!(upstream.connections(), 1, "TLS connections to the PBX are kept alive too");

    // Not signed by anything the gateway trusts: refused, never forwarded.
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    assert_eq!(https_get(gw.https(), "/x", &[]).await.status, 502);
    // Unless the operator says the PBX's self-signed certificate is fine.
    let gw =
        TestGateway::start(&upstream.url(), TEST_POLICY, "[upstream]\ninsecure_skip_verify = true\n").await;
    assert_eq!(https_get(gw.https(), "/x", &[]).await.status, 200);
}

/// How [`BareUpstream`] treats its connections.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Answers every request and keeps the connection open.
    KeepAlive,
    /// Closes each connection right after answering, without saying so, as a
    /// PBX with a very short keep-alive does.
    HangUp,
    /// Answers the first request on a connection; reads the next and closes
    /// the connection without answering it (its close crossed our request).
    CloseOnSecond,
}

/// A bare HTTP/1.1 upstream answering "ok", counting the connections it
/// accepted and those the gateway closed, and noting each request line.
struct BareUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed_by_gateway: Arc<AtomicUsize>,
    requests: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl BareUpstream {
    async fn start(mode: Mode) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (accepted, closed_by_gateway) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let requests = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (counted, closed, noted) = (accepted.clone(), closed_by_gateway.clone(), requests.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let (closed, noted) = (closed.clone(), noted.clone());
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let mut answered = 0;
                    loop {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => {
                                closed.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                            Ok(n) => pending.extend_from_slice(&chunk[..n]),
                        }
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
                            let line = head.split(" HTTP/").next().unwrap_or_default().to_string();
                            noted.lock().expect("requests").push(line);
                            pending.drain(..end + 4);
                            if mode == Mode::CloseOnSecond && answered == 1 {
                                return;
                            }
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if tcp.write_all(answer).await.is_err() || mode == Mode::HangUp {
                                return;
                            }
                            answered += 1;
                        }
                    }
                });
            }
        });
        Self { addr, accepted, closed_by_gateway, requests, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("requests").clone()
    }
}

impl Drop for BareUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
