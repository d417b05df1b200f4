//! Keep-alive HTTP/1.1 connections to the PBX, one pool per worker.
//!
//! A worker's requests take the connection it used last (a stack, no hashing:
//! there is one upstream), so the pool is touched only by its own thread and
//! its lock is never contended. A connection goes back when the response body
//! has been read to its end; one dropped part-way is closed. The exchange
//! itself runs in the request's task ([`super::http1`]).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, Response};
use http_body_util::Limited;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::http1::{self, Broken, Conn, Reader, Stream};

/// A connection unused for this long may be one the PBX is closing just as
/// we write to it: a request that is safe to repeat is kept until it answers.
const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

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
    Exchange(String),
    /// The client's body went over `limits.max_request_body`.
    TooLarge,
    /// The client's body broke off or was badly framed.
    ClientBody(String),
}

impl From<Broken> for Failure {
    fn from(broken: Broken) -> Self {
        match broken {
            Broken::TooLarge => Failure::TooLarge,
            Broken::ClientBody(error) => Failure::ClientBody(error),
            other => Failure::Exchange(other.to_string()),
        }
    }
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

    async fn connect(&self) -> Result<Conn, Failure> {
        let tcp = tokio::time::timeout(self.timeout, self.tcp())
            .await
            .map_err(|_| Failure::Connect(format!("no connection within {:?}", self.timeout)))?
            .map_err(Failure::Connect)?;
        let io = match &self.tls {
            None => Stream::Left(tcp),
            Some((connector, name)) => {
                let tls = tokio::time::timeout(self.timeout, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| Failure::Connect(format!("no TLS handshake within {:?}", self.timeout)))?
                    .map_err(|e| Failure::Connect(format!("TLS: {e}")))?;
                Stream::Right(Box::new(tls))
            }
        };
        Ok(Conn { io, read: BytesMut::new() })
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
    conn: Conn,
    since: Instant,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(Self { slots: Mutex::default(), max_idle, idle_timeout })
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends a request (its `head` as [`super::headers::write_request_head`]
    /// wrote it, then `body`, in chunks if `chunked`) on an idle connection,
    /// or a new one, and returns the response with its body still on the
    /// connection. A request a pooled connection could not take goes on the
    /// next. One already written when the PBX closed the connection goes
    /// again only if it is safe to repeat (`GET`, `HEAD`, `OPTIONS` without a
    /// body) and the connection had been idle a while, as Go's HTTP client
    /// does.
    pub async fn send(
        self: &Arc<Self>,
        connector: &Connector,
        head: &[u8],
        method: &Method,
        mut body: Option<Limited<Incoming>>,
        chunked: bool,
        now: Instant,
    ) -> Result<Response<Pooled>, Failure> {
        let safe = body.is_none() && matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        while let Some((mut conn, idle_for)) = self.take(now) {
            match http1::exchange(&mut conn, head, &mut body, chunked, method).await {
                Ok(answer) => return Ok(self.response(conn, answer)),
                Err(Broken::Unsent(error)) => {
                    tracing::debug!(%error, "idle upstream connection could not take the request: next one");
                }
                Err(Broken::Closed(error)) if safe && idle_for >= REPLAY_AFTER_IDLE => {
                    tracing::debug!(%error, "idle upstream connection closed as it was used: sending again");
                }
                Err(broken) => return Err(broken.into()),
            }
        }
        // Boxed: a new connection is the rare case, and its future (resolver,
        // TLS handshake) would otherwise make every request's future large.
        let mut conn = Box::pin(connector.connect()).await?;
        let answer = http1::exchange(&mut conn, head, &mut body, chunked, method).await?;
        Ok(self.response(conn, answer))
    }

    /// The response, its body read from `conn`; a connection with nothing
    /// more to read goes straight back.
    fn response(self: &Arc<Self>, conn: Conn, answer: http1::Head) -> Response<Pooled> {
        let reader = Reader::new(answer.framing);
        let home = answer.reusable.then(|| self.clone());
        let mut body = Pooled { conn: Some(conn), reader, home };
        if body.reader.is_done() {
            body.finish();
        }
        answer.response.map(|()| body)
    }

    /// The most recently used live connection, and how long it was idle by `now`.
    fn take(&self, now: Instant) -> Option<(Conn, Duration)> {
        let mut slots = self.slots();
        while let Some(Idle { conn, since }) = slots.idle.pop_back() {
            let idle_for = now.saturating_duration_since(since);
            if idle_for < self.idle_timeout && !conn.is_stale() {
                return Some((conn, idle_for));
            }
        }
        None
    }

    fn put(self: &Arc<Self>, conn: Conn) {
        if self.max_idle == 0 {
            return;
        }
        let mut slots = self.slots();
        if !slots.sweeping {
            slots.sweeping = self.sweep_later();
        }
        if slots.idle.len() >= self.max_idle {
            slots.idle.pop_front();
        }
        slots.idle.push_back(Idle { conn, since: Instant::now() });
    }

    /// Closes connections idle for longer than the timeout, or closed by the
    /// PBX, even when no request comes to notice them. Runs while there is
    /// something idle; returns whether it was started.
    fn sweep_later(self: &Arc<Self>) -> bool {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return false };
        let pool: Weak<Self> = Arc::downgrade(self);
        let period = self.idle_timeout;
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(period / 2).await;
                let Some(pool) = pool.upgrade() else { return };
                let mut slots = pool.slots();
                slots.idle.retain(|i| i.since.elapsed() < period && !i.conn.is_stale());
                if slots.idle.is_empty() {
                    slots.sweeping = false;
                    return;
                }
            }
        });
        true
    }
}

/// A response body from the PBX, read from its connection as the client
/// takes it; the connection goes back to the pool once the body is read to
/// its end, and is closed if it is dropped part-way.
pub struct Pooled {
    conn: Option<Conn>,
    reader: Reader,
    /// Where the connection goes when the body is done; `None` for one that
    /// is not to be reused.
    home: Option<Arc<Pool>>,
}

impl Pooled {
    /// The connection of a `101 Switching Protocols`, to splice.
    pub fn take_connection(&mut self) -> Option<Conn> {
        self.conn.take()
    }

    fn finish(&mut self) {
        let Some(pool) = self.home.take() else { return };
        // Bytes past the body's end: not a connection to trust again.
        if let Some(conn) = self.conn.take().filter(|c| c.read.is_empty()) {
            pool.put(conn);
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        let Some(conn) = this.conn.as_mut() else { return Poll::Ready(None) };
        let polled = std::task::ready!(this.reader.poll_data(conn, cx));
        match polled {
            Some(Ok(data)) => {
                if this.reader.is_done() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            None => {
                this.finish();
                Poll::Ready(None)
            }
            Some(Err(error)) => {
                this.conn = None;
                Poll::Ready(Some(Err(io::Error::other(error))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reader.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.reader.size_hint()
    }
}
