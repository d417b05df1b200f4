//! Keep-alive HTTP/1.1 connections to the PBX, one pool per worker.
//!
//! A worker's requests take the connection it used last (a stack, no hashing:
//! there is one upstream), so the pool is touched only by its own thread and
//! its lock is never contended. A connection goes back when the response body
//! has been read to its end; one dropped part-way is closed with its task.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{Either, Empty, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// What a request sends upstream: the client's body, capped; or nothing, for
/// a bodiless request sent again.
pub type UpstreamBody = Either<Limited<Incoming>, Empty<Bytes>>;

/// A connection unused for this long may be one the PBX is closing just as
/// we write to it: a request that is safe to repeat is kept until it answers.
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

type Sender = SendRequest<UpstreamBody>;

/// How to open a new connection to the PBX.
pub struct Connector {
    host: String,
    port: u16,
    /// For an `https` upstream: the client configuration and the name to verify.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timeout: Duration,
}

/// Why no response came back.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be opened (refused, unresolvable, TLS, timeout).
    Connect(String),
    /// The connection broke or the PBX sent something that is not HTTP.
    Exchange(hyper::Error),
}

impl Connector {
    pub fn new(
        host: &str,
        port: u16,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> Result<Self, String> {
        // An IPv6 literal comes in brackets from the URL.
        let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let tls = match tls {
            Some(config) => {
                let name = ServerName::try_from(host.clone()).map_err(|e| format!("{host}: {e}"))?;
                Some((TlsConnector::from(config), name))
            }
            None => None,
        };
        Ok(Self { host, port, tls, timeout })
    }

    async fn connect(&self) -> Result<Sender, Failure> {
        let tcp = tokio::time::timeout(self.timeout, self.tcp())
            .await
            .map_err(|_| Failure::Connect(format!("no connection within {:?}", self.timeout)))?
            .map_err(Failure::Connect)?;
        match &self.tls {
            None => handshake(tcp).await,
            Some((connector, name)) => {
                let tls = tokio::time::timeout(self.timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| Failure::Connect(format!("no TLS handshake within {:?}", self.timeout)))?
                    .map_err(|e| Failure::Connect(format!("TLS: {e}")))?;
                handshake(tls).await
            }
        }
    }

    /// The first address that answers, in the order the resolver gave them.
    async fn tcp(&self) -> Result<TcpStream, String> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("{}: {e}", self.host))?
            .collect();
        let mut last = format!("{}: no address", self.host);
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    return Ok(tcp);
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }
}

/// Starts HTTP/1.1 on a fresh connection; the connection runs as its own task.
async fn handshake<T>(io: T) -> Result<Sender, Failure>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = http1::handshake(TokioIo::new(io)).await.map_err(Failure::Exchange)?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// One worker's idle connections, the most recently used last.
pub struct Pool {
    slots: Mutex<Slots>,
    max_idle: usize,
    idle_timeout: Duration,
}

#[derive(Default)]
struct Slots {
    idle: VecDeque<Idle>,
    /// Whether a sweeper task is running for this pool.
    sweeping: bool,
}

struct Idle {
    sender: Sender,
    since: Instant,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self { slots: Mutex::default(), max_idle, idle_timeout })
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends `request` on an idle connection, or a new one. A request that a
    /// pooled connection could not take (the PBX had closed it) goes on the
    /// next. One already written when the PBX closed the connection goes again
    /// only if it is safe to repeat (`GET`, `HEAD`, `OPTIONS` without a body)
    /// and the connection had been idle a while, as Go's HTTP client does.
    pub async fn send(
        self: &Arc<Self>,
        connector: &Connector,
        mut request: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, Sender), Failure> {
        while let Some((mut sender, idle_for)) = self.take() {
            let replay = if idle_for >= REPLAY_AFTER_IDLE { replayable(&request) } else { None };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, sender)),
                Err(mut e) => match (e.take_message(), replay) {
                    (Some(unsent), _) => request = unsent,
                    (None, Some(copy)) if closed_under_us(e.error()) => {
                        tracing::debug!(error = %e.error(), "idle upstream connection closed as it was used: sending again");
                        request = copy;
                    }
                    (None, _) => return Err(Failure::Exchange(e.into_error())),
                },
            }
        }
        // Boxed: a new connection is the rare case, and its future (resolver,
        // TLS handshake) would otherwise make every request's future large.
        let mut sender = Box::pin(connector.connect()).await?;
        let response = sender.send_request(request).await.map_err(Failure::Exchange)?;
        Ok((response, sender))
    }

    /// The most recently used live connection, and how long it was idle.
    fn take(&self) -> Option<(Sender, Duration)> {
        let mut slots = self.slots();
        while let Some(Idle { sender, since }) = slots.idle.pop_back() {
            let idle_for = since.elapsed();
            if !sender.is_closed() && idle_for < self.idle_timeout {
                return Some((sender, idle_for));
            }
        }
        None
    }

    fn put(self: &Arc<Self>, sender: Sender) {
        if sender.is_closed() || self.max_idle == 0 {
            return;
        }
        let mut slots = self.slots();
        if !slots.sweeping {
            slots.sweeping = self.sweep_later();
        }
        if slots.idle.len() >= self.max_idle {
            slots.idle.pop_front();
        }
        slots.idle.push_back(Idle { sender, since: Instant::now() });
    }

    /// Closes connections idle for longer than the timeout, even when no
    /// request comes to notice them. Runs while there is something idle;
    /// returns whether it was started.
    fn sweep_later(self: &Arc<Self>) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return false };
        let pool: Weak<Self> = Arc::downgrade(self);
        let period = self.idle_timeout;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(period / 2).await;
                let Some(pool) = pool.upgrade() else { return };
                let mut slots = pool.slots();
                slots.idle.retain(|i| !i.sender.is_closed() && i.since.elapsed() < period);
                if slots.idle.is_empty() {
                    slots.sweeping = false;
                    return;
                }
            }
        });
        true
    }
}

/// A copy of `request` to send again, when it has no body and repeating it
/// is harmless.
fn replayable(request: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    let safe = matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe || !request.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// The connection ended before any answer: the PBX closed it as we wrote.
fn closed_under_us(error: &hyper::Error) -> bool {
    use std::io::ErrorKind;
    let reset = std::error::Error::source(error)
        .and_then(|e| e.downcast_ref::<std::io::Error>())
        .is_some_and(|e| matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe));
    error.is_incomplete_message() || reset
}

/// A response body from the PBX that hands its connection back to the pool
/// once read to the end.
pub struct Pooled {
    body: Incoming,
    finished: bool,
    home: Option<(Sender, Arc<Pool>)>,
}

impl Pooled {
    /// `home`: where the connection goes when the body is done; `None` for a
    /// connection that is not to be reused (an upgraded one).
    pub fn new(body: Incoming, home: Option<(Sender, Arc<Pool>)>) -> Self {
        Self { body, finished: false, home }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.finished = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some((sender, pool)) = self.home.take() {
            if self.finished || self.body.is_end_stream() {
                pool.put(sender);
            }
        }
    }
}
