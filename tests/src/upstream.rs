//! A PBX stand-in. Routes:
//! - `/upload`: reads the body as a stream, answers with the byte count;
//! - `/download?bytes=N`: streams N bytes;
//! - `/slow?ms=N`: waits, then answers;
//! - `/ws`: `Upgrade: websocket` -> 101, then echoes every byte;
//! - `/set-cookies`: sets the gateway's two cookies and one of its own;
//! - `…/redirect?to=URL`: 302 to URL (the rest of the query, as it came);
//! - anything else: JSON `{"method","path","headers":{name:[values]}}`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub struct Upstream {
    pub addr: SocketAddr,
    tls: bool,
    /// Connections accepted so far.
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Self {
        Self::serve(None).await
    }

    /// The same over TLS with this certificate and key (PEM): an `https` PBX.
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> Self {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("certificate");
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(vec![cert], key)
                .expect("server config");
        Self::serve(Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn serve(tls: Option<TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let is_tls = tls.is_some();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                counter.fetch_add(1, Ordering::SeqCst);
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        None => serve_connection(tcp).await,
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve_connection(stream).await;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, tls: is_tls, accepted, task }
    }

    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    /// How many connections the upstream has accepted.
    pub fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

async fn serve_connection<IO: AsyncRead + AsyncWrite + Send + Unpin + 'static>(io: IO) {
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), service_fn(route))
        .await;
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn param(request: &Request<Incoming>, name: &str) -> Option<u64> {
    request.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

async fn route(mut request: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = request.uri().path().to_string();
    Ok(match path.as_str() {
        "/upload" => {
            let mut body = request.into_body();
            let mut total: u64 = 0;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => total += f.data_ref().map_or(0, |d| d.len() as u64),
                    Err(_) => return Ok(full(StatusCode::BAD_REQUEST, "body error")),
                }
            }
            full(StatusCode::OK, total.to_string())
        }
        "/download" => {
            let mut left = param(&request, "bytes").unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_stream(move || {
                if left == 0 {
                    return None;
                }
                let n = left.min(chunk.len() as u64) as usize;
                left -= n as u64;
                Some(chunk.slice(..n))
            });
            Response::new(StreamBody::new(stream).boxed())
        }
        p if p.ends_with("/redirect") => {
            // `?to=` the rest of the query, as the Location.
            let to = request.uri().query().and_then(|q| q.strip_prefix("to=")).unwrap_or("/");
            let mut r = full(StatusCode::FOUND, Bytes::new());
            r.headers_mut().insert("location", to.parse().expect("hv"));
            r
        }
        "/set-cookies" => {
            // A PBX page that sets the gateway's cookies (a flaw, or a trap).
            let mut r = full(StatusCode::OK, "cookies set");
            let cookies = [
                "__Host-pbxgate=planted; Path=/; Secure",
                "__HOST-PBXGATE-remember=x; Path=/",
                "pbxlang=de; Path=/",
            ];
            for cookie in cookies {
                r.headers_mut().append("set-cookie", cookie.parse().expect("hv"));
            }
            r
        }
        p if p.starts_with("/slow") => {
            tokio::time::sleep(Duration::from_millis(param(&request, "ms").unwrap_or(1000))).await;
            full(StatusCode::OK, "slow done")
        }
        "/ws" if request.headers().contains_key("upgrade") => {
            let on_upgrade = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let mut io = TokioIo::new(upgraded);
                    let (mut r, mut w) = tokio::io::split(&mut io);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
            });
            let mut r = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
            r.headers_mut().insert("upgrade", "websocket".parse().expect("hv"));
            r.headers_mut().insert("connection", "upgrade".parse().expect("hv"));
            r
        }
        _ => {
            let mut headers = serde_json::Map::new();
            for (name, value) in request.headers() {
                let entry = headers.entry(name.as_str()).or_insert_with(|| serde_json::Value::Array(vec![]));
                if let serde_json::Value::Array(values) = entry {
                    values.push(String::from_utf8_lossy(value.as_bytes()).into_owned().into());
                }
            }
            let body = serde_json::json!({
                "method": request.method().as_str(),
                "path": request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
                "version": format!("{:?}", request.version()),
                "headers": headers,
            });
            let mut r = full(StatusCode::OK, body.to_string());
            r.headers_mut().insert("content-type", "application/json".parse().expect("hv"));
            r.headers_mut().insert("connection", "x-upstream-hop".parse().expect("hv"));
            r.headers_mut().insert("x-upstream-hop", "must not reach the client".parse().expect("hv"));
            r
        }
    })
}

/// A stream of data frames from a closure, without pulling in futures-util.
fn futures_stream(
    next: impl FnMut() -> Option<Bytes> + Send + Sync + Unpin + 'static,
) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send + Sync + 'static {
    struct S<F>(F);
    impl<F: FnMut() -> Option<Bytes> + Unpin> futures_core::Stream for S<F> {
        type Item = Result<Frame<Bytes>, Infallible>;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Self::Item>> {
            std::task::Poll::Ready((self.0)().map(|b| Ok(Frame::data(b))))
        }
    }
    S(next)
}
