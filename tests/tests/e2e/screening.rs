use std::time::Duration;

use pbxgate_e2e::client::{https_get, tls_connect, TlsOptions};
use pbxgate_e2e::{TestGateway, Upstream, TEST_POLICY};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends a raw HTTP/1.1 request and returns every byte the server sent before closing.
async fn raw_exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, request: &str) -> Vec<u8> {
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the connection must be closed, not left hanging");
    received
}

fn request(host: &str, ua: &str) -> String {
    format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {ua}\r\nAccept: */*\r\n\r\n")
}

#[tokio::test]
async fn scanners_and_unknown_hosts_get_a_closed_connection_and_zero_bytes() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let cases = [
        ("localhost", "friendly-scanner"),
        ("localhost", "Mozilla/5.0 (sipvicious)"),
        ("localhost", "my SIP Call agent"),
        ("evil.example", "Mozilla/5.0"),
        ("127.0.0.1", "curl/8"),
    ];
    for (host, ua) in cases {
        let tcp = TcpStream::connect(gw.http()).await.expect("connect");
        let got = raw_exchange(tcp, &request(host, ua)).await;
        assert!(got.is_empty(), "plain http {host} {ua}: got {:?}", String::from_utf8_lossy(&got));
        let tls = tls_connect(gw.https(), &TlsOptions::default()).await.expect("TLS connect");
        let got = raw_exchange(tls, &request(host, ua)).await;
        assert!(got.is_empty(), "https {host} {ua}: got {:?}", String::from_utf8_lossy(&got));
    }
    // The same connection with a normal client gets an answer.
    let tcp = TcpStream::connect(gw.http()).await.expect("connect");
    let got = raw_exchange(
        tcp,
        &request("localhost", "Mozilla/5.0").replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got));
}

#[tokio::test]
async fn unknown_host_allowed_from_listed_networks() {
    let upstream = Upstream::start().await;
    let policy = TEST_POLICY.replace(
        "trusted_proxies = []",
        "trusted_proxies = []\nallow_unknown_host_networks = [\"127.0.0.0/8\"]",
    );
    let gw = TestGateway::start(&upstream.url(), &policy, "").await;
    let reply = https_get(gw.https(), "/x", &[("host", "192.0.2.1")]).await;
    assert_eq!(reply.status, 200);
    // ... but a scanner from there is still dropped: User-Agent rules only deny.
    let tcp = TcpStream::connect(gw.http()).await.expect("connect");
    assert!(raw_exchange(tcp, &request("localhost", "friendly-scanner")).await.is_empty());
}

#[tokio::test]
async fn redirect_listener_sends_known_hosts_to_https() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(
        &upstream.url(),
        TEST_POLICY,
        "[listen]\nhttps = \"127.0.0.1:0\"\nredirect_http = \"127.0.0.1:0\"\n",
    )
    .await;
    let addr = gw.addrs.redirect_http.expect("redirect listener");
    let reply = pbxgate_e2e::client::http_get(addr, "/private/x?y=1", &[]).await;
    assert_eq!(reply.status, 308);
    assert_eq!(reply.header("location"), Some("https://localhost:8443/private/x?y=1"));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    assert!(raw_exchange(tcp, &request("evil.example", "Mozilla/5.0")).await.is_empty());
}

/// Over HTTP/2 a screened request gets no response either: not a reset
/// stream (hyper's answer to a failed request), the connection just closes.
#[tokio::test]
async fn a_scanner_over_http2_gets_a_closed_connection_not_a_reset() {
    use pbxgate_e2e::client::{get, send_h2};
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let h2 = TlsOptions { alpn: &[b"h2"], ..TlsOptions::default() };

    let tls = tls_connect(gw.https(), &h2).await.expect("TLS connect");
    let request = get("https://localhost/", &[("user-agent", "Mozilla/5.0")]);
    assert_eq!(send_h2(tls, request).await.expect("a normal client is answered").status, 200);

    let tls = tls_connect(gw.https(), &h2).await.expect("TLS connect");
    let request = get("https://localhost/", &[("user-agent", "friendly-scanner")]);
    let sent = tokio::time::timeout(Duration::from_secs(5), send_h2(tls, request)).await;
    let error = sent.expect("closed, not left hanging").expect_err("no response");
    assert!(!format!("{error:?}").contains("Reset"), "the stream must not be reset: {error:?}");
}

/// Reads one HTTP/1.1 response with a `Content-Length` body; returns its head.
async fn read_response(stream: &mut TcpStream) -> String {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end]).to_string();
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .expect("content-length");
            if received.len() >= end + 4 + length {
                return head;
            }
        }
        let n = stream.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed mid-response");
        received.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn clients_slow_to_send_a_request_are_disconnected_after_the_header_read_timeout() {
    let upstream = Upstream::start().await;
    let gw =
        TestGateway::start(&upstream.url(), TEST_POLICY, "[listen]\nheader_read_timeout = \"600ms\"\n").await;
    let started = std::time::Instant::now();
    // Half a request head and then nothing, as slowloris does.
    let slow = TcpStream::connect(gw.http()).await.expect("connect");
    let slowloris = tokio::spawn(async move {
        let got = raw_exchange(slow, "GET / HTTP/1.1\r\nHost: loca").await;
        (got, started.elapsed())
    });
    // An idle connection after one answered request.
    let mut idle = TcpStream::connect(gw.http()).await.expect("connect");
    let request = "GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n";
    // The gateway starts waiting for the next head once it has answered,
    // which is before this side has read the answer: count from the request.
    let asked = std::time::Instant::now();
    idle.write_all(request.as_bytes()).await.expect("write");
    assert!(read_response(&mut idle).await.starts_with("HTTP/1.1 200"));
    let idle = tokio::spawn(async move {
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
        assert!(closed.is_ok_and(|r| r.is_ok()), "the idle connection was not closed");
        asked.elapsed()
    });
    // A connection asking every 200 ms stays open for longer than the timeout:
    // the time counts from its last answer.
    let mut busy = TcpStream::connect(gw.http()).await.expect("connect");
    for _ in 0..8 {
        busy.write_all(request.as_bytes()).await.expect("write");
        assert!(read_response(&mut busy).await.starts_with("HTTP/1.1 200"), "the busy connection was closed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(started.elapsed() > Duration::from_millis(1500));

    let (got, slow_for) = slowloris.await.expect("slowloris task");
    assert!(!String::from_utf8_lossy(&got).contains("200"), "{:?}", String::from_utf8_lossy(&got));
    assert!(slow_for >= Duration::from_millis(600), "closed after {slow_for:?}, before the timeout");
    assert!(slow_for < Duration::from_millis(1500), "closed after {slow_for:?}");
    let idle_for = idle.await.expect("idle task");
    assert!(idle_for >= Duration::from_millis(600), "idle connection closed after {idle_for:?}");
    assert!(idle_for < Duration::from_millis(1500), "idle connection closed after {idle_for:?}");
}
