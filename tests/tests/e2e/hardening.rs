//! What an attacker tries against the connection and proxy layer: holding
//! connections open, resetting streams, smuggling requests past the gateway.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pbxgate_e2e::client::{client_config, connect_with, get, http_get, tls_connect, TlsOptions, TLS12};
use pbxgate_e2e::{TempDir, TestGateway, Upstream, TEST_POLICY};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A gateway whose connections may be idle for one second.
async fn impatient_gateway(upstream: &str) -> TestGateway {
    TestGateway::start(upstream, TEST_POLICY, "[listen]\nheader_read_timeout = \"1s\"\n").await
}

/// Waits for the server to close `stream`; how long that took from `since`.
async fn closed<S: AsyncRead + Unpin>(mut stream: S, since: Instant) -> Duration {
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the connection was left open");
    since.elapsed()
}

/// Closed after the one-second timeout, counted from `since`, with room for
/// a timer tick and a GOAWAY.
fn assert_within_timeout(what: &str, took: Duration) {
    assert!(took >= Duration::from_millis(900), "{what}: closed after {took:?}, before the timeout");
    assert!(took < Duration::from_millis(2500), "{what}: closed after {took:?}");
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_header_read_timeout_from_accept() {
    let upstream = Upstream::start().await;
    let gw = impatient_gateway(&upstream.url()).await;
    let h2 = TlsOptions { alpn: &[b"h2"], ..TlsOptions::default() };

    let plain_silent = async {
        let since = Instant::now();
        closed(TcpStream::connect(gw.http()).await.expect("connect"), since).await
    };
    let no_handshake = async {
        let since = Instant::now();
        closed(TcpStream::connect(gw.https()).await.expect("connect"), since).await
    };
    let no_preface = async {
        let since = Instant::now();
        closed(tls_connect(gw.https(), &h2).await.expect("TLS"), since).await
    };
    let h2_idle = async {
        let tls = tls_connect(gw.https(), &h2).await.expect("TLS");
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2");
        let conn = tokio::spawn(conn);
        let response = sender.send_request(get("https://localhost/x", &[])).await.expect("answered");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.expect("body");
        let since = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
        assert!(ended.is_ok(), "the idle HTTP/2 connection was left open");
        since.elapsed()
    };
    let (plain_silent, no_handshake, no_preface, h2_idle) =
        tokio::join!(plain_silent, no_handshake, no_preface, h2_idle);
    assert_within_timeout("plain, nothing sent", plain_silent);
    assert_within_timeout("TLS, no handshake", no_handshake);
    assert_within_timeout("TLS h2, no preface", no_preface);
    assert_within_timeout("h2 idle between requests", h2_idle);
}

/// A TLS 1.2 client asking to renegotiate (a ClientHello after the
/// handshake, encrypted under the connection's keys): rustls declines with a
/// warning and the client, waiting for a ServerHello, sends nothing more. The
/// connection is closed, not held open for the client.
#[tokio::test]
async fn a_tls12_renegotiation_attempt_ends_the_connection() {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM};
    use rustls::ConnectionTrafficSecrets;
    let upstream = Upstream::start().await;
    let gw = impatient_gateway(&upstream.url()).await;
    let mut config =
        client_config(&TlsOptions { versions: &[&TLS12], ..TlsOptions::default() }).expect("client config");
    config.enable_secret_extraction = true;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let (mut tcp, tls) = connect_with(&connector, gw.https(), "localhost").await.expect("TLS").into_inner();
    let since = Instant::now();
    let (seq, secrets) = tls.dangerous_extract_secrets().expect("secrets").tx;
    let (algorithm, key, iv) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
        _ => panic!("a cipher suite other than AES-GCM"),
    };
    // ClientHello: TLS 1.2, a random, no session id, one suite, no compression, no extensions.
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0xc0, 0x2b, 1, 0, 0, 0]);
    let mut hello = vec![1, 0, 0, u8::try_from(body.len()).expect("short")];
    hello.extend_from_slice(&body);
    // RFC 5288: the nonce is the salt and an explicit part sent in the record.
    let mut nonce = [0u8; 12];
    nonce.copy_from_slice(iv.as_ref());
    for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
        *n ^= s;
    }
    let mut aad = seq.to_be_bytes().to_vec();
    aad.extend_from_slice(&[22, 3, 3]);
    aad.extend_from_slice(&u16::try_from(hello.len()).expect("short").to_be_bytes());
    let sealer = LessSafeKey::new(UnboundKey::new(algorithm, key.as_ref()).expect("key"));
    let mut sealed = hello;
    sealer
        .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut sealed)
        .expect("seal");
    let mut record = vec![22, 3, 3];
    record.extend_from_slice(&u16::try_from(8 + sealed.len()).expect("short").to_be_bytes());
    record.extend_from_slice(&nonce[4..]);
    record.extend_from_slice(&sealed);
    tcp.write_all(&record).await.expect("renegotiation request");
    let took = closed(tcp, since).await;
    assert!(took < Duration::from_millis(2500), "closed after {took:?}");
}

/// Reads a response head off `stream` within `limit`.
async fn response_head(stream: &mut TcpStream, limit: Duration) -> String {
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let reading = async {
        while !received.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed without an answer");
            received.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(limit, reading).await.expect("an answer in time");
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn slow_bodies_to_the_gateways_own_endpoints_are_cut() {
    let upstream = Upstream::start().await;
    let gw = impatient_gateway(&upstream.url()).await;
    let post = |length: &str| {
        format!(
            "POST /.pbxgate/api/link/request HTTP/1.1\r\nHost: localhost\r\nOrigin: https://localhost:8443\r\n\
             Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
    };
    // Announced too large: refused before a byte of it is waited for.
    let mut huge = TcpStream::connect(gw.http()).await.expect("connect");
    huge.write_all(post("10000000000").as_bytes()).await.expect("write");
    let head = response_head(&mut huge, Duration::from_secs(2)).await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");

    // Small, but trickling: cut at the body's deadline, not held for ever.
    let mut slow = TcpStream::connect(gw.http()).await.expect("connect");
    slow.write_all(post("100").as_bytes()).await.expect("write");
    slow.write_all(b"{\"login\":").await.expect("write");
    let head = response_head(&mut slow, Duration::from_secs(15)).await;
    assert!(head.starts_with("HTTP/1.1 4"), "{head}");
}

/// An upstream that answers each request as soon as it has its head, then
/// closes the connection without reading the body.
async fn answers_early_and_closes() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let task = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut chunk).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&chunk[..n]),
                        _ => return,
                    }
                }
                let _ = tcp.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
            });
        }
    });
    (url, task)
}

#[tokio::test]
async fn an_h2_upload_answered_early_ends_its_stream() {
    let (url, _pbx) = answers_early_and_closes().await;
    let gw = impatient_gateway(&url).await;
    let h2 = TlsOptions { alpn: &[b"h2"], ..TlsOptions::default() };
    let tls = tls_connect(gw.https(), &h2).await.expect("TLS");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.expect("h2");
    tokio::spawn(conn);
    // 20 MB in 64 KB pieces, made as the connection takes them; the client
    // drops the body once its stream has ended.
    let mut left = 20 * 1024 * 1024 / (64 * 1024);
    let piece = Bytes::from(vec![b'u'; 64 * 1024]);
    let (dropped, body_gone) = tokio::sync::oneshot::channel::<()>();
    let body = StreamBody::new(futures_util::stream::poll_fn(move |_| {
        let _held = &dropped;
        std::task::Poll::Ready((left > 0).then(|| {
            left -= 1;
            Ok::<_, std::convert::Infallible>(Frame::data(piece.clone()))
        }))
    }));
    let request = Request::post("https://localhost/upload").body(body).expect("request");
    let exchange = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>((status, body))
    };
    let ended = tokio::time::timeout(Duration::from_secs(5), exchange).await;
    match ended.expect("the stream ended (answered or reset), not left hanging") {
        // The answer, or a 502 when the PBX's close (a reset, its upload
        // unread) discarded the answer before the gateway read it.
        Ok((status, body)) => assert!(
            (status.as_u16(), &body[..]) == (200, &b"ok"[..]) || status == 502,
            "{status} {}",
            String::from_utf8_lossy(&body)
        ),
        Err(e) => assert!(e.to_string().contains("reset") || e.is_canceled(), "{e:?}"),
    }
    let gone = tokio::time::timeout(Duration::from_secs(5), body_gone).await;
    assert!(gone.is_ok(), "the upload's stream is still open, the client waiting to send the rest");
}

/// A PBX that counts the requests it receives and answers each after a while.
struct CountingPbx {
    url: String,
    requests: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl CountingPbx {
    async fn start(delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        async move {
                            tokio::time::sleep(delay).await;
                            Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Empty::<
                                Bytes,
                            >::new(
                            )))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Self { url, requests, _task: task }
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// HTTP/2 rapid reset (CVE-2023-44487): streams opened and reset once the
/// gateway has sent them on. Each costs the PBX a request; the connection
/// is closed once its client has cancelled a bounded number of them.
#[tokio::test]
async fn rapid_resets_close_the_connection_after_a_bounded_number() {
    let pbx = CountingPbx::start(Duration::from_secs(10)).await;
    let gw = TestGateway::start(&pbx.url, TEST_POLICY, "[upstream]\ntimeout = \"30s\"\n").await;
    let tcp = TcpStream::connect(gw.http()).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn = tokio::spawn(conn);
    const ROUNDS: usize = 10;
    const STREAMS: usize = 100;
    let mut rounds = 0;
    'attack: for round in 1..=ROUNDS {
        let mut streams = Vec::new();
        for _ in 0..STREAMS {
            let Ok(mut ready) = client.clone().ready().await else { break 'attack };
            let request = Request::get("http://localhost/slow").body(()).expect("request");
            match ready.send_request(request, true) {
                Ok((response, stream)) => streams.push((response, stream)),
                Err(_) => break 'attack,
            }
        }
        // Reset once the PBX has them all, or the connection is gone.
        let started = Instant::now();
        while pbx.requests() < round * STREAMS && !conn.is_finished() {
            if started.elapsed() > Duration::from_secs(5) {
                break 'attack;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for (_, mut stream) in streams {
            stream.send_reset(h2::Reason::CANCEL);
        }
        rounds = round;
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(ended.is_ok(), "the connection is still open after {rounds} rounds of resets");
    assert!(rounds < ROUNDS, "all {ROUNDS} rounds of resets were taken");
    assert!(pbx.requests() <= 3 * STREAMS, "the PBX saw {} requests", pbx.requests());
}

#[tokio::test]
async fn tls12_session_ids_expire_with_the_session_ticket_lifetime() {
    use rustls::client::{Resumption, Tls12Resumption};
    let upstream = Upstream::start().await;
    let tls = "[tls]\nself_signed = true\nsession_ticket_lifetime = \"1s\"\n";
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, tls).await;
    let only12 = TlsOptions { versions: &[&TLS12], ..TlsOptions::default() };
    let mut config = client_config(&only12).expect("client config");
    config.resumption = Resumption::in_memory_sessions(16).tls12_resumption(Tls12Resumption::SessionIdOnly);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let handshake = || async {
        let stream = connect_with(&connector, gw.https(), "localhost").await.expect("TLS");
        stream.get_ref().1.handshake_kind()
    };
    assert_eq!(handshake().await, Some(rustls::HandshakeKind::Full));
    assert_eq!(handshake().await, Some(rustls::HandshakeKind::Resumed), "resumed by session id");
    // The lifetime is counted in whole seconds.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(handshake().await, Some(rustls::HandshakeKind::Full), "an expired session is not resumed");
}

#[tokio::test]
async fn the_key_log_and_the_embedded_store_are_private_to_the_gateways_user() {
    use std::os::unix::fs::PermissionsExt;
    let upstream = Upstream::start().await;
    let dir = TempDir::new("modes");
    let (keys, store) = (dir.path().join("keys.log"), dir.path().join("data/store.db"));
    let config = format!(
        "[tls]\nself_signed = true\nkey_log_file = \"{}\"\n[store]\nurl = \"embedded://{}\"\n",
        keys.display(),
        store.display()
    );
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, &config).await;
    drop(tls_connect(gw.https(), &TlsOptions::default()).await.expect("TLS"));
    for file in [&keys, &store] {
        let mode = std::fs::metadata(file).expect("created").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is mode {mode:o}", file.display());
    }
}

#[tokio::test]
async fn only_websocket_upgrades_reach_the_pbx() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    for protocol in ["h2c", "foo/1", "websocket, h2c"] {
        let asked = [
            ("connection", "Upgrade, HTTP2-Settings"),
            ("upgrade", protocol),
            ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
        ];
        let reply = http_get(gw.http(), "/x", &asked).await;
        assert_eq!(reply.status, 200, "{protocol}: {}", reply.text());
        let echo = reply.json();
        let headers = echo["headers"].as_object().expect("headers");
        for name in ["upgrade", "http2-settings", "connection"] {
            assert!(!headers.contains_key(name), "{protocol}: {name} reached the PBX: {headers:?}");
        }
    }
}

#[tokio::test]
async fn path_override_headers_never_reach_the_pbx() {
    let upstream = Upstream::start().await;
    let gw = TestGateway::start(&upstream.url(), TEST_POLICY, "").await;
    let spoofs = [
        ("X-Original-URL", "/admin/"),
        ("x_original_url", "/admin/"),
        ("X-Rewrite-URL", "/admin/"),
        ("x.rewrite.url", "/admin/"),
        ("X-Forwarded-Uri", "/admin/"),
        ("X_FORWARDED_URI", "/admin/"),
        ("X-Forwarded-Prefix", "/admin"),
        ("x.forwarded.prefix", "/admin"),
    ];
    let reply = http_get(gw.http(), "/x", &spoofs).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let echo = reply.json();
    for name in echo["headers"].as_object().expect("headers").keys() {
        let folded = name.to_ascii_lowercase().replace(['_', '.'], "-");
        assert!(
            !["x-original-url", "x-rewrite-url", "x-forwarded-uri", "x-forwarded-prefix"]
                .contains(&folded.as_str()),
            "{name} reached the PBX"
        );
    }
}

/// A PBX that answers each request with the bytes `script` gives for its
/// request line, and notes every request line it reads. Requests to it
/// have no body, so a head ends at the first empty line.
struct ScriptedPbx {
    url: String,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
    connections: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl ScriptedPbx {
    async fn start(script: fn(&str) -> &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (noted, counted) = (lines.clone(), connections.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                let noted = noted.clone();
                tokio::spawn(async move {
                    let mut pending = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
                            pending.drain(..end + 4);
                            let line = head.lines().next().unwrap_or_default().to_string();
                            noted.lock().expect("lines").push(line.clone());
                            if tcp.write_all(script(&line)).await.is_err() {
                                return;
                            }
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(n) if n > 0 => pending.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                });
            }
        });
        Self { url, lines, connections, _task: task }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().expect("lines").clone()
    }
}

/// Sends raw bytes and reads everything until the gateway closes (or 3 s).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(request).await.expect("write");
    let mut received = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), tcp.read_to_end(&mut received)).await;
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn h2c_upgrades_are_not_smuggled_to_the_pbx() {
    // A PBX that would switch to HTTP/2 on request: the gateway never asks it
    // to, and refuses a switch it did not ask for.
    let pbx = ScriptedPbx::start(|_| {
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    })
    .await;
    let gw = TestGateway::start(&pbx.url, TEST_POLICY, "").await;
    let request = b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings\r\n\
                    Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    let answer = raw(gw.http(), request).await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert!(!answer.contains("101"), "{answer}");
}

#[tokio::test]
async fn a_malicious_pbx_response_cannot_desynchronise_the_gateway() {
    let pbx = ScriptedPbx::start(|line| match line {
        // Both framings: read by its chunks, the connection not used again.
        "GET /both HTTP/1.1" => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        }
        // More than its length: the rest is not the next request's answer.
        "GET /extra HTTP/1.1" => {
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled"
        }
        "GET /two-lengths HTTP/1.1" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 8\r\n\r\nok",
        "GET /plus HTTP/1.1" => b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        "GET /signed-chunk HTTP/1.1" => {
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n"
        }
        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean",
    })
    .await;
    let gw = TestGateway::start(&pbx.url, TEST_POLICY, "[listen]\nworkers = 1\n").await;
    let addr = gw.http();
    let fetch = |path: &'static str| async move {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        match pbxgate_e2e::client::send_h1(tcp, get(path, &[])).await {
            Ok(reply) => (reply.status.as_u16(), reply.text()),
            Err(_) => (0, String::new()),
        }
    };
    assert_eq!(fetch("/both").await, (200, "hello".to_string()));
    assert_eq!(fetch("/next").await, (200, "clean".to_string()));
    assert_eq!(fetch("/extra").await, (200, "ok".to_string()));
    assert_eq!(fetch("/next").await, (200, "clean".to_string()), "the extra bytes were taken as an answer");
    assert_eq!(fetch("/two-lengths").await.0, 502);
    assert_eq!(fetch("/plus").await.0, 502);
    let (status, body) = fetch("/signed-chunk").await;
    assert!(body != "hello", "a signed chunk size was read: {status} {body}");
    assert_eq!(fetch("/next").await, (200, "clean".to_string()));
    let lines = pbx.lines();
    assert_eq!(lines.iter().filter(|l| l.starts_with("GET /next ")).count(), 3, "{lines:?}");
    assert!(pbx.connections.load(Ordering::SeqCst) >= 3, "suspect connections are not reused");
}

#[tokio::test]
async fn requests_framed_two_ways_never_smuggle_a_second_request() {
    let upstream = Upstream::start().await;
    let gw = impatient_gateway(&upstream.url()).await;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let cases = [
        // CL.TE: a front end reading the length would take the rest as body.
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}",
            5 + smuggled.len()
        ),
        // TE.CL: a back end reading the length would take the chunk as a request.
        format!(
            "POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
            smuggled.len()
        ),
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 48\r\n\r\nhello{smuggled}"),
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 48\r\nTransfer-Encoding: xchunked\r\n\r\n{smuggled}"),
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n{smuggled}"),
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: +5\r\n\r\nhello{smuggled}"),
        format!("POST /upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n{smuggled}"),
    ];
    for case in &cases {
        let answer = raw(gw.http(), case.as_bytes()).await;
        let statuses = answer.matches("HTTP/1.1 ").count();
        assert!(statuses <= 1, "more than one answer to one request:\n{case}\n---\n{answer}");
        assert!(!answer.contains("/smuggled"), "the smuggled request was answered:\n{case}\n---\n{answer}");
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 400") || answer.is_empty(),
            "{case}\n---\n{answer}"
        );
    }
}
