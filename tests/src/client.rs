//! Clients for tests: HTTP/1.1 or HTTP/2, over plain TCP or TLS with the
//! version, SNI, ALPN and trust the test picks.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

pub use rustls::version::{TLS12, TLS13};

pub struct TlsOptions<'a> {
    pub sni: &'a str,
    pub versions: &'a [&'static SupportedProtocolVersion],
    pub alpn: &'a [&'a [u8]],
}

const BOTH: &[&SupportedProtocolVersion] = &[&TLS13, &TLS12];

impl Default for TlsOptions<'_> {
    fn default() -> Self {
        Self { sni: "localhost", versions: BOTH, alpn: &[b"http/1.1"] }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Connects with TLS, accepting any certificate (tests inspect it instead).
pub async fn tls_connect(
    addr: SocketAddr,
    options: &TlsOptions<'_>,
) -> std::io::Result<TlsStream<TcpStream>> {
    connect_with(&connector(options)?, addr, options.sni).await
}

/// A connector to reuse (it keeps session tickets for resumption).
pub fn connector(options: &TlsOptions<'_>) -> std::io::Result<TlsConnector> {
    Ok(TlsConnector::from(Arc::new(client_config(options)?)))
}

/// The configuration [`connector`] uses, for a test to adjust.
pub fn client_config(options: &TlsOptions<'_>) -> std::io::Result<ClientConfig> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(options.versions)
        .map_err(std::io::Error::other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider())))
        .with_no_client_auth();
    config.alpn_protocols = options.alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

pub async fn connect_with(
    connector: &TlsConnector,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    connector.connect(name, tcp).await
}

/// The leaf certificate the server presented.
pub fn peer_certificate(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.peer_certificates()?.first().map(|c| c.to_vec())
}

pub fn negotiated_alpn(stream: &TlsStream<TcpStream>) -> Option<Vec<u8>> {
    stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec)
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Sends one request over HTTP/1.1 on `io` and reads the whole reply.
pub async fn send_h1<IO, B>(io: IO, request: Request<B>) -> Result<Reply, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn.with_upgrades());
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply { status: parts.status, headers: parts.headers, body })
}

/// Sends one request over HTTP/2 on `io`.
pub async fn send_h2<IO>(io: IO, request: Request<Full<Bytes>>) -> Result<Reply, hyper::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply { status: parts.status, headers: parts.headers, body })
}

/// A GET built from `(name, value)` pairs; Host defaults to `localhost`.
pub fn get(path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut builder = Request::get(path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", "localhost");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(Bytes::new())).expect("request")
}

/// GET over TLS (HTTP/1.1, SNI localhost).
pub async fn https_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let tls = tls_connect(addr, &TlsOptions::default()).await.expect("TLS connect");
    send_h1(tls, get(path, headers)).await.expect("request")
}

/// GET over plain HTTP/1.1.
pub async fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    send_h1(tcp, get(path, headers)).await.expect("request")
}

#[derive(Debug)]
struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Any request over TLS (HTTP/1.1, SNI localhost), body given whole.
pub async fn https_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    https_request_from(None, addr, method, path, headers, body).await
}

/// As [`https_request`], from a chosen local address (127.0.0.2, …), so
/// network rules see different clients.
pub async fn https_request_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut builder = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        builder = builder.header("host", "localhost");
    }
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(Bytes::from(body.to_string()))).expect("request");
    let tcp = match from {
        Some(ip) => {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind(SocketAddr::new(ip, 0)).expect("bind local address");
            socket.connect(addr).await.expect("connect")
        }
        None => TcpStream::connect(addr).await.expect("connect"),
    };
    let name = ServerName::try_from("localhost".to_string()).expect("name");
    let tls = connector(&TlsOptions::default()).expect("connector").connect(name, tcp).await.expect("TLS");
    send_h1(tls, request).await.expect("request")
}

impl Reply {
    /// The value a `Set-Cookie` header gives cookie `name` (empty when cleared).
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.headers.get_all("set-cookie").iter().filter_map(|v| v.to_str().ok()).find_map(|c| {
            let (pair, _) = c.split_once(';').unwrap_or((c, ""));
            let (n, v) = pair.split_once('=')?;
            (n.trim() == name).then(|| v.trim().to_string())
        })
    }
}
