//! Forwarding to the PBX: pooled keep-alive connections, bodies streamed both
//! ways, websocket upgrades spliced through.

pub mod headers;
mod http1;
mod identity;
mod pool;

use std::borrow::Cow;
use std::future::Future;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::header::{HeaderValue, CONNECTION, CONTENT_LENGTH, LOCATION, UPGRADE};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Response, StatusCode, Uri, Version};
use http_body_util::{Either, Limited};
use hyper::body::{Body as _, Incoming};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::AsyncWriteExt;

use crate::config::Upstream as UpstreamConfig;
use crate::error::{Error, Refusal};
use crate::telemetry::Repeated;
use crate::Body;

pub use headers::Spoofable;
pub use identity::{Identities, UpstreamIdentity};
pub use pool::Pooled;
use pool::{Connector, Failure, Pool};

/// A request ready for the PBX.
struct Prepared {
    head: BytesMut,
    method: Method,
    body: Option<Limited<Incoming>>,
    chunked: bool,
    /// The protocol the client asked to switch to, and its side of the switch.
    upgrade: Option<HeaderValue>,
    client_upgrade: Option<OnUpgrade>,
}

/// The PBX: where it lives and a pool of connections to it per worker.
pub struct Upstream {
    /// A worker's requests use its own pool: the pooled connections' tasks
    /// then run on the same thread as the requests that use them.
    pools: Box<[Arc<Pool>]>,
    connector: Connector,
    /// Path prefix of `upstream.url` without its trailing slash ("" for none).
    base_path: String,
    /// `upstream.url`'s origin as the PBX may write it in a `Location`
    /// (`http://10.0.0.5:80` and `http://10.0.0.5`), lower case.
    own_origins: Vec<String>,
    timeout: Duration,
    max_body: usize,
}

/// What the pipeline learnt about the request that forwarding needs.
#[derive(Debug)]
pub struct Outgoing<'a> {
    /// The worker the request runs on (chooses the connection pool).
    pub worker: usize,
    pub peer: IpAddr,
    /// `peer` as a header value, made once per connection.
    pub peer_value: &'a HeaderValue,
    pub trusted_peer: bool,
    pub client: IpAddr,
    /// `https` or `http`: how the client reached us.
    pub proto: &'static str,
    /// The Host as the client sent it (with port).
    pub host: &'a str,
    /// The client's `Host` header, when it sent one.
    pub host_value: Option<&'a HeaderValue>,
    /// The normalised path: the upstream routes what the policy decided on.
    pub path: &'a str,
    /// Identity headers to send (after every client-sent copy is removed).
    pub identity: Option<UpstreamIdentity>,
    /// Where to register an upgraded connection, so it closes with its session.
    pub sockets: Option<(&'a crate::auth::sockets::Sockets, &'a crate::store::SecretHash)>,
    /// The client's side of a protocol switch, when it asked for one.
    pub upgrade: Option<OnUpgrade>,
}

impl Upstream {
    pub fn new(config: &UpstreamConfig, max_body: u64, workers: usize) -> Result<Self, Error> {
        let url = &config.url;
        let https = url.scheme_str() == Some("https");
        let host = url.host().ok_or_else(|| Error::Upstream("upstream.url has no host".into()))?;
        let default_port = if https { 443 } else { 80 };
        let port = url.port_u16().unwrap_or(default_port);
        let tls = https.then(|| upstream_tls(config)).transpose()?.map(Arc::new);
        let connector = Connector::new(host, port, tls, config.connect_timeout).map_err(Error::Upstream)?;
        let pool = || Pool::new(config.pool_max_idle_per_host, config.pool_idle_timeout);
        let scheme = if https { "https" } else { "http" };
        let host_lower = host.to_ascii_lowercase();
        let mut own_origins = vec![format!("{scheme}://{host_lower}:{port}")];
        if port == default_port {
            own_origins.push(format!("{scheme}://{host_lower}"));
        }
        Ok(Self {
            pools: (0..workers.max(1)).map(|_| pool()).collect(),
            connector,
            base_path: url.path().trim_end_matches('/').to_string(),
            own_origins,
            timeout: config.timeout,
            max_body: usize::try_from(max_body).unwrap_or(usize::MAX),
        })
    }

    /// Sends the request (`parts` and `body`) upstream and returns the
    /// upstream's response, or the refusal to answer with (502 unreachable,
    /// 504 too slow, 413 too large).
    ///
    /// Not an `async fn`: the request's head and `out` are only needed to
    /// write the PBX's head, and an `async fn` would keep them in its future,
    /// which is part of, and copied with, every request's.
    /// `now`: when the request goes, as the caller read the clock.
    pub fn forward<'a>(
        &'a self,
        parts: &Parts,
        body: Incoming,
        mut out: Outgoing<'a>,
        spoofable: &Spoofable,
        now: Instant,
    ) -> impl Future<Output = Result<Response<Body>, Refusal>> + 'a {
        let prepared = self.prepare(parts, body, &mut out, spoofable);
        let (worker, sockets) = (out.worker, out.sockets);
        async move {
            let Prepared { head, method, body, chunked, upgrade, client_upgrade } = prepared?;
            let pool = &self.pools[worker % self.pools.len()];
            let sending = pin!(pool.send(&self.connector, &head, &method, body, chunked, now));
            let mut response = match crate::timer::timeout_at(now + self.timeout, sending).await {
                None => return Err(Refusal::GatewayTimeout),
                Some(Err(failure)) => return Err(classify(failure)),
                Some(Ok(sent)) => sent,
            };

            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                let (Some(client_upgrade), Some(protocol)) = (client_upgrade, upgrade) else {
                    tracing::warn!("upstream switched protocols without being asked");
                    return Err(Refusal::BadGateway);
                };
                // The connection now belongs to the websocket: not back to the pool.
                let Some(upstream) = response.body_mut().take_connection() else {
                    return Err(Refusal::BadGateway);
                };
                let task = tokio::spawn(splice(client_upgrade, upstream));
                if let Some((sockets, session)) = sockets {
                    sockets.register(*session, task.abort_handle());
                }
                let headers = response.headers_mut();
                headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(UPGRADE, protocol);
                return Ok(response.map(Either::Left));
            }
            self.relocate(response.headers_mut());
            Ok(response.map(Either::Left))
        }
    }

    /// The request as it goes to the PBX: its head written, its body limited.
    fn prepare(
        &self,
        parts: &Parts,
        body: Incoming,
        out: &mut Outgoing<'_>,
        spoofable: &Spoofable,
    ) -> Result<Prepared, Refusal> {
        if parts
            .headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|len| len > self.max_body as u64)
        {
            return Err(Refusal::PayloadTooLarge);
        }
        let listed = headers::connection_tokens(&parts.headers);
        let upgrade = requested_upgrade(parts, &listed);
        let client_upgrade = upgrade.as_ref().and(out.upgrade.take());

        let target = self.upstream_target(&parts.uri, out.path)?;
        let has_body = !body.is_end_stream();
        let chunked = has_body && !parts.headers.contains_key(CONTENT_LENGTH);
        // HTTP/2 clients send :authority, not Host; the PBX sees the name the
        // client used (its own Host value when it says that: no copy).
        let made;
        let host = match out.host_value {
            Some(value) if value.as_bytes() == out.host.as_bytes() => Some(value),
            _ => {
                made = HeaderValue::from_str(out.host).ok();
                made.as_ref()
            }
        };
        let head = headers::RequestHead {
            method: &parts.method,
            target: &target,
            host,
            identity: out.identity.as_ref(),
            upgrade: upgrade.as_ref(),
            chunked,
            listed: &listed,
        };
        let mut encoded = BytesMut::new();
        headers::write_request_head(&mut encoded, &head, &parts.headers, out, spoofable);
        let body = has_body.then(|| Limited::new(body, self.max_body));
        Ok(Prepared { head: encoded, method: parts.method.clone(), body, chunked, upgrade, client_upgrade })
    }

    /// A redirect to the PBX's own address (`upstream.url`), which browsers
    /// cannot reach, becomes a path on the gateway, as nginx's
    /// `proxy_redirect default` does: `http://127.0.0.1:8080/pbx/x?y` with
    /// `upstream.url = "http://127.0.0.1:8080/pbx"` becomes `/x?y`.
    fn relocate(&self, headers: &mut http::HeaderMap) {
        let Some(location) = headers.get(LOCATION).and_then(|v| v.to_str().ok()) else { return };
        let Some(rest) = self.own_origins.iter().find_map(|origin| {
            let head = location.get(..origin.len())?;
            head.eq_ignore_ascii_case(origin).then(|| &location[origin.len()..])
        }) else {
            return;
        };
        let Some(rest) = rest.strip_prefix(self.base_path.as_str()) else { return };
        let path = match rest.as_bytes().first() {
            None => "/".to_string(),
            Some(b'?' | b'#') => format!("/{rest}"),
            // "//host" or "/\\host" would be another site to a browser: left as it was.
            Some(b'/') if !rest[1..].starts_with(['/', '\\']) => rest.to_string(),
            // Another port ("…:8080" + "0/") or host ("…1" + "0.0.0.2"): not the PBX.
            _ => return,
        };
        if let Ok(value) = HeaderValue::from_str(&path) {
            headers.insert(LOCATION, value);
        }
    }

    /// The request target sent upstream (origin form) for a request whose
    /// normalised path is `path`.
    fn upstream_target<'u>(&self, original: &'u Uri, path: &str) -> Result<Cow<'u, str>, Refusal> {
        match original.path_and_query() {
            // Already normal and nothing to prefix: sent as it came (no copy).
            Some(pq) if self.base_path.is_empty() && pq.path() == path => Ok(Cow::Borrowed(pq.as_str())),
            _ => {
                let query = original.query();
                let mut target = String::with_capacity(
                    self.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
                );
                target.push_str(&self.base_path);
                target.push_str(path);
                if let Some(q) = query {
                    target.push('?');
                    target.push_str(q);
                }
                // Only what a request line may carry.
                PathAndQuery::try_from(target.as_str()).map_err(|_| Refusal::BadRequest)?;
                Ok(Cow::Owned(target))
            }
        }
    }
}

/// The protocol an HTTP/1.1 client asks to switch to (`Connection: upgrade`,
/// among the names its `Connection` header `listed`): websocket alone. Any
/// other (h2c above all: HTTP/2 spoken straight to the PBX, past the
/// gateway's checks) is left out with the hop-by-hop headers, and the
/// request goes as a plain one.
fn requested_upgrade(request: &Parts, listed: &[&str]) -> Option<HeaderValue> {
    let wants =
        request.version == Version::HTTP_11 && listed.iter().any(|t| t.eq_ignore_ascii_case("upgrade"));
    let websocket = request.headers.get(UPGRADE).filter(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"));
    wants.then(|| websocket.cloned()).flatten()
}

/// Copies bytes both ways between the client and the upstream until either
/// closes, starting with what the upstream sent right after its `101`.
async fn splice(client: OnUpgrade, mut upstream: http1::Conn) {
    match client.await {
        Ok(client) => {
            let mut client = TokioIo::new(client);
            let early = std::mem::take(&mut upstream.read);
            let spliced = async {
                client.write_all(&early).await?;
                tokio::io::copy_bidirectional(&mut client, &mut upstream.io).await
            };
            if let Err(e) = spliced.await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

fn classify(failure: Failure) -> Refusal {
    match failure {
        Failure::Connect(error) => {
            static UNREACHABLE: Repeated = Repeated::new();
            if let Some(skipped) = UNREACHABLE.due(crate::store::now_ms()) {
                tracing::warn!(%error, skipped, "upstream unreachable");
            }
        }
        Failure::Exchange(error) => {
            static FAILED: Repeated = Repeated::new();
            if let Some(skipped) = FAILED.due(crate::store::now_ms()) {
                tracing::warn!(%error, skipped, "upstream request failed");
            }
        }
        Failure::TooLarge => return Refusal::PayloadTooLarge,
        // Not the PBX's fault: no warning about it, and a 400 in the access line.
        Failure::ClientBody(error) => {
            tracing::debug!(%error, "the client's request body broke off");
            return Refusal::BadRequest;
        }
    }
    Refusal::BadGateway
}

fn upstream_tls(config: &UpstreamConfig) -> Result<ClientConfig, Error> {
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Upstream(e.to_string()))?;
    let mut tls = if config.insecure_skip_verify {
        tracing::warn!("upstream.insecure_skip_verify is on: the upstream's certificate is NOT checked");
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(crate::tls::provider())))
            .with_no_client_auth()
    } else {
        builder.with_root_certificates(upstream_roots(config)?).with_no_client_auth()
    };
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

fn upstream_roots(config: &UpstreamConfig) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    if let Some(ca_file) = &config.ca_file {
        let certs = CertificateDer::pem_file_iter(ca_file)
            .and_then(|c| c.collect::<Result<Vec<_>, _>>())
            .map_err(|e| Error::Upstream(format!("{}: {e}", ca_file.display())))?;
        roots.add_parsable_certificates(certs);
    } else {
        let found = rustls_native_certs::load_native_certs();
        roots.add_parsable_certificates(found.certs);
    }
    Ok(roots)
}

/// For a PBX with a self-signed certificate, when the operator opts in.
/// Handshake signatures are still checked; the certificate is not.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The origin as the PBX may write it, with or without its default port
    /// (the e2e test covers a PBX on another port).
    #[test]
    fn locations_name_the_pbx_with_or_without_its_default_port() {
        let config = UpstreamConfig {
            url: Uri::from_static("http://PBX.example/pbx"),
            ca_file: None,
            insecure_skip_verify: false,
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(1),
            pool_max_idle_per_host: 1,
        };
        let upstream = Upstream::new(&config, 1024, 1).expect("upstream");
        for (location, expected) in [
            ("http://pbx.example/pbx/a?b", "/a?b"),
            ("http://pbx.example:80/pbx/a", "/a"),
            ("HTTP://PBX.EXAMPLE/pbx", "/"),
            ("http://pbx.example:8080/pbx/a", "http://pbx.example:8080/pbx/a"),
            ("https://pbx.example/pbx/a", "https://pbx.example/pbx/a"),
            ("http://pbx.example.evil/pbx/a", "http://pbx.example.evil/pbx/a"),
        ] {
            let mut headers = http::HeaderMap::new();
            headers.insert(LOCATION, HeaderValue::from_static(location));
            upstream.relocate(&mut headers);
            assert_eq!(headers[LOCATION], expected, "{location}");
        }
    }
}
