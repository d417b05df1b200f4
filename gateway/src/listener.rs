//! Accept loops: TLS handshake (with a timeout), hyper auto h1/h2 with
//! upgrades, graceful shutdown, and closing a screened connection without a
//! single response byte.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

mod drain;
mod watchdog;

use crate::timer::Timer;
use crate::workers::Workers;
use crate::{admin, pipeline, State};
use watchdog::{Activity, Tracked};

/// What a listener serves.
#[derive(Clone)]
pub(crate) enum Kind {
    Https,
    Http,
    RedirectHttp,
    Admin,
}

impl Kind {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Http => "http",
            Self::RedirectHttp => "redirect_http",
            Self::Admin => "admin",
        }
    }
}

/// One client connection, as the pipeline sees it.
#[derive(Debug)]
pub struct Connection {
    pub peer: SocketAddr,
    /// `https` or `http`.
    pub proto: &'static str,
    /// `peer`'s address as a header value, made once.
    pub peer_value: http::HeaderValue,
    /// The worker serving it (and whose upstream connections it uses).
    pub worker: usize,
    /// The session cookie it sent last, hashed once.
    pub last_session: crate::auth::cookies::LastSession,
    dropped: AtomicBool,
}

impl Connection {
    fn new(peer: SocketAddr, proto: &'static str, worker: usize) -> Self {
        let peer_value = crate::proxy::headers::ip_value(peer.ip());
        let last_session = Default::default();
        Self { peer, proto, peer_value, worker, last_session, dropped: AtomicBool::new(false) }
    }

    /// Asks for this connection to be closed with no (further) response
    /// bytes: its socket refuses reads and writes from now on.
    pub fn drop_silently(&self) {
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// The service's error: hyper closes the connection instead of answering.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by screening")]
pub struct Dropped;

pub(crate) async fn serve(
    listener: TcpListener,
    kind: Kind,
    state: Arc<State>,
    workers: Option<Arc<Workers>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let drain = drain::Drain::default();
    let builder = Arc::new(http_builder(&state));
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let accepted = Instant::now();
        let _ = tcp.set_nodelay(true);
        // Moves to the worker's runtime: its reactor drives the socket from now on.
        let tcp = match tcp.into_std() {
            Ok(tcp) => tcp,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "accepted connection unusable");
                continue;
            }
        };
        let (kind, state, builder) = (kind.clone(), state.clone(), builder.clone());
        let ticket = drain.ticket();
        let task = move |worker| async move {
            let Ok(tcp) = tokio::net::TcpStream::from_std(tcp) else { return };
            let _active = state.metrics.connection_opened();
            let connection = |proto| Connection::new(peer, proto, worker);
            // The first request's head is due this long after the accept, a
            // TLS handshake included.
            let idle = state.config.listen.header_read_timeout;
            let activity = Activity::new(accepted, idle);
            let served = Served { state: state.clone(), builder, ticket, activity };
            match kind {
                Kind::Https => {
                    // The current certificates: a reload applies to the next handshake.
                    let Some(tls) = &state.tls else { return };
                    let acceptor = TlsAcceptor::from(tls.load_full());
                    let deadline = accepted + state.config.tls.handshake_timeout.min(idle);
                    match crate::timer::timeout_at(deadline, acceptor.accept(tcp)).await {
                        Some(Ok(tls)) => {
                            serve_connection(tls, connection("https"), Kind::Https, served).await
                        }
                        Some(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        None => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
                kind => serve_connection(tcp, connection("http"), kind, served).await,
            }
        };
        match &workers {
            Some(workers) => workers.spawn(task),
            // The admin listener stays on the main runtime, answering while workers are busy.
            None => drop(tokio::spawn(task(0))),
        }
    }
    drop(listener);
    let grace = state.config.listen.shutdown_timeout;
    if tokio::time::timeout(grace, drain.shutdown()).await.is_err() {
        tracing::warn!(?grace, "shutdown grace period over; closing remaining connections");
    }
}

fn http_builder(state: &State) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let max_header = state.config.limits.max_header_bytes;
    builder
        .http1()
        .timer(Timer)
        .header_read_timeout(state.config.listen.header_read_timeout)
        // A client done sending (half-closed) still gets its answer; and
        // hyper does not read the connection while a request is with the
        // PBX, which would otherwise copy its read buffer away from the
        // request's headers every time (a measurable share of the bench's throughput).
        // A client gone meanwhile is noticed when the answer is written.
        .half_close(true)
        .max_buf_size(max_header.max(8192));
    builder
        .http2()
        .timer(Timer)
        .max_header_list_size(u32::try_from(max_header).unwrap_or(u32::MAX))
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// What serves an accepted connection.
struct Served {
    state: Arc<State>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    ticket: drain::Ticket,
    activity: Arc<Activity>,
}

async fn serve_connection<IO>(io: IO, connection: Connection, kind: Kind, served: Served)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Served { state, builder, ticket, activity } = served;
    let peer = connection.peer;
    // One reference count per connection, cloned per request: the shared
    // state's own count would be written by every worker on every request.
    let serving = Arc::new(Serving { state, connection, kind });
    let io = Guarded { inner: Some(io), serving: serving.clone() };
    let requests = activity.clone();
    let service = service_fn(move |request: Request<Incoming>| {
        let serving = serving.clone();
        let mut in_flight = requests.begin();
        async move {
            let response = respond(&serving, request).await;
            in_flight.answered();
            response.map(|response| response.map(|body| Tracked { body, _in_flight: in_flight }))
        }
    });
    let http = builder.serve_connection_with_upgrades(TokioIo::new(io), service).into_owned();
    if let Err(e) = ticket.watch(http, Some(activity.expiry())).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

async fn respond(
    serving: &Serving,
    request: Request<Incoming>,
) -> Result<http::Response<crate::Body>, Dropped> {
    let Serving { state, connection: conn, kind } = serving;
    match kind {
        Kind::Admin => Ok(admin::handle(state, &request).await),
        Kind::RedirectHttp => pipeline::redirect_to_https(state, conn, &request).await,
        Kind::Http => pipeline::handle(state, conn, request).await,
        Kind::Https => {
            let mut response = pipeline::handle(state, conn, request).await;
            if let (Some(hsts), Ok(response)) = (&state.config.tls.hsts, &mut response) {
                response.headers_mut().insert(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone());
            }
            response
        }
    }
}

/// What a connection's requests are served with.
struct Serving {
    state: Arc<State>,
    connection: Connection,
    kind: Kind,
}

/// The connection's IO. When screening drops the connection, dropping this
/// closes it cleanly (TLS close_notify, then FIN) without writing a response.
struct Guarded<T: AsyncWrite + Unpin + Send + 'static> {
    inner: Option<T>,
    serving: Arc<Serving>,
}

impl<T: AsyncWrite + Unpin + Send + 'static> Drop for Guarded<T> {
    fn drop(&mut self) {
        if self.serving.connection.dropped.load(Ordering::SeqCst) {
            // No runtime means the worker is stopping: the socket just closes.
            if let (Some(mut io), Ok(runtime)) = (self.inner.take(), tokio::runtime::Handle::try_current()) {
                runtime.spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
                });
            }
        }
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.serving.connection.dropped.load(Ordering::Relaxed) {
            return Poll::Ready(Err(gone()));
        }
        match self.inner.as_mut() {
            Some(io) => Pin::new(io).poll_read(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Guarded<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.serving.connection.dropped.load(Ordering::Relaxed) {
            return Poll::Ready(Err(gone()));
        }
        match self.inner.as_mut() {
            Some(io) => Pin::new(io).poll_write(cx, buf),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.serving.connection.dropped.load(Ordering::Relaxed) {
            return Poll::Ready(Err(gone()));
        }
        match self.inner.as_mut() {
            Some(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            None => Poll::Ready(Err(gone())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(io) => Pin::new(io).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.inner.as_mut() {
            Some(io) => Pin::new(io).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

/// Binds every configured listener before anything is served, so a taken
/// port fails start-up instead of half-starting.
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::Error> {
    TcpListener::bind(addr).await.map_err(|source| crate::Error::Bind { addr, source })
}
