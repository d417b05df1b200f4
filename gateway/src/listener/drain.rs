//! Graceful shutdown of a listener's connections, with no shared lock on the
//! request path. hyper-util's watcher locks one mutex, shared by every
//! connection on every worker, each time a connection is polled (a few times
//! a request), which the bench measured as a clear cost. Here a poll only registers its waker in the
//! connection's own slot and reads a flag that changes once. A connection
//! counts from its accept, so a TLS handshake under way is waited for too.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::Notify;

use super::watchdog::{Close, Expiry};

/// A listener's open connections, to drain on shutdown.
#[derive(Clone, Default)]
pub(crate) struct Drain {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    draining: AtomicBool,
    next_id: AtomicU64,
    /// Each open connection's waker, to tell it that draining began.
    open: Mutex<HashMap<u64, Arc<AtomicWaker>>>,
    /// Notified whenever a connection ends while draining.
    ended: Notify,
}

impl Shared {
    fn open(&self) -> MutexGuard<'_, HashMap<u64, Arc<AtomicWaker>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drain {
    /// Counts a connection as open, from its accept until the ticket (or the
    /// [`Watched`] connection it becomes) is dropped: shutdown waits for it.
    pub(crate) fn ticket(&self) -> Ticket {
        let waker = Arc::new(AtomicWaker::new());
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared.open().insert(id, waker.clone());
        Ticket { shared: self.shared.clone(), id, waker }
    }

    /// Tells every connection, open or opening, to close after its request
    /// in flight, and waits until all have ended.
    pub(crate) async fn shutdown(self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        loop {
            let ended = self.shared.ended.notified();
            tokio::pin!(ended);
            // Registered before looking, so an end in between is not missed.
            ended.as_mut().enable();
            {
                let open = self.shared.open();
                if open.is_empty() {
                    return;
                }
                open.values().for_each(|waker| waker.wake());
            }
            ended.await;
        }
    }

    #[cfg(test)]
    fn open(&self) -> usize {
        self.shared.open().len()
    }
}

/// An open connection, not yet served (its TLS handshake under way).
pub(crate) struct Ticket {
    shared: Arc<Shared>,
    id: u64,
    waker: Arc<AtomicWaker>,
}

impl Ticket {
    /// Serves `conn` until it ends; once draining begins, or its `expiry`
    /// says so, it finishes the requests in flight and closes; it is
    /// dropped when its `expiry` says that.
    pub(crate) fn watch<C: GracefulConnection>(self, conn: C, expiry: Option<Expiry>) -> Watched<C> {
        Watched { conn: Box::pin(conn), ticket: self, told: false, registered: None, expiry }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.shared.open().remove(&self.id);
        // Only a drain waits for ends. Read after the removal: a drain that
        // began before it either saw this connection gone or is told here.
        if self.shared.draining.load(Ordering::SeqCst) {
            self.shared.ended.notify_waiters();
        }
    }
}

/// A connection being served, as [`Ticket::watch`] returns it.
pub(crate) struct Watched<C> {
    conn: Pin<Box<C>>,
    ticket: Ticket,
    /// Whether the connection was told to close.
    told: bool,
    /// The waker last registered in the ticket's slot: its task's, which
    /// does not change, so the slot is written once, not on every poll.
    registered: Option<std::task::Waker>,
    /// Its watchdog, which may close it before any drain.
    expiry: Option<Expiry>,
}

impl<C: GracefulConnection> Future for Watched<C> {
    type Output = C::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<C::Output> {
        let this = &mut *self;
        if !this.told {
            // Before reading the flag: a drain starting after the read wakes this waker.
            if !this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                this.ticket.waker.register(cx.waker());
                this.registered = Some(cx.waker().clone());
            }
            if this.ticket.shared.draining.load(Ordering::SeqCst) {
                this.told = true;
                this.conn.as_mut().graceful_shutdown();
            }
        }
        match this.expiry.as_mut().map(|expiry| expiry.poll_close(cx)) {
            Some(Poll::Ready(Close::Now)) => return Poll::Ready(Ok(())),
            Some(Poll::Ready(Close::Gracefully)) if !this.told => {
                this.told = true;
                this.conn.as_mut().graceful_shutdown();
            }
            _ => {}
        }
        this.conn.as_mut().poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto;

    use super::Drain;

    /// A connection with a request in flight gets its answer, then closes;
    /// shutdown waits for it, and an idle connection closes at once.
    #[tokio::test]
    async fn shutdown_lets_the_request_in_flight_finish() -> Result<(), Box<dyn std::error::Error>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let drain = Drain::default();
        let serving = drain.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let service = service_fn(|_| async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
                });
                let builder = auto::Builder::new(TokioExecutor::new());
                let conn = builder.serve_connection(TokioIo::new(tcp), service).into_owned();
                tokio::spawn(serving.ticket().watch(conn, None));
            }
        });
        let idle = tokio::net::TcpStream::connect(addr).await?;
        let busy = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(busy)).await?;
        tokio::spawn(conn);
        let request = http::Request::get("/").header("host", "x").body(Empty::<Bytes>::new())?;
        let response = tokio::spawn(sender.send_request(request));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(drain.open(), 2);

        let started = std::time::Instant::now();
        let left = drain.clone();
        tokio::time::timeout(Duration::from_secs(5), drain.shutdown()).await?;
        assert!(started.elapsed() >= Duration::from_millis(150), "waited for the request in flight");
        assert_eq!(left.open(), 0);
        let response = response.await??;
        assert_eq!(response.status(), 200);
        response.into_body().collect().await?;
        drop(idle);
        Ok(())
    }

    /// A connection accepted but not yet served (a TLS handshake under way)
    /// holds shutdown up until it is served and ends, or fails.
    #[tokio::test]
    async fn shutdown_waits_for_a_connection_in_its_handshake() -> Result<(), Box<dyn std::error::Error>> {
        let drain = Drain::default();
        let (handshaking, failing) = (drain.ticket(), drain.ticket());
        let shutdown = tokio::spawn(drain.clone().shutdown());
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(failing);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!shutdown.is_finished(), "one connection still in its handshake");

        // The handshake ends and the connection is served: told to close at
        // once (no request in flight), it ends, and so does shutdown.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (tcp, _) = listener.accept().await?;
        let service = service_fn(|_| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<Bytes>::new()))
        });
        let builder = auto::Builder::new(TokioExecutor::new());
        let conn = builder.serve_connection(TokioIo::new(tcp), service).into_owned();
        tokio::time::timeout(Duration::from_secs(5), handshaking.watch(conn, None)).await?.ok();
        tokio::time::timeout(Duration::from_secs(5), shutdown).await??;
        assert_eq!(drain.open(), 0);
        drop(client);
        Ok(())
    }
}
