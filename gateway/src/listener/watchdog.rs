//! What keeps a connection open: requests in flight. A connection with none
//! for `listen.header_read_timeout`, counted from its accept, is closed:
//! a socket that never sends, a TLS handshake never begun, an HTTP/2 preface
//! never sent, an HTTP/2 connection idle between requests. hyper's own
//! header-read timeout starts only at a request's first byte, and HTTP/2
//! has none.
//!
//! It also closes a connection whose client cancels many more requests than
//! it lets finish (HTTP/2 rapid reset, CVE-2023-44487): each cancelled
//! request may already have cost the PBX one, and h2's own limit counts
//! only the streams reset before they are accepted.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::timer::Sleep;

/// Requests a connection's clients may cancel beyond those they let finish.
const RESET_BUDGET: u64 = 100;
/// How long a connection told to close has to say so (an HTTP/2 GOAWAY)
/// before it is dropped, unless requests it took meanwhile are in flight.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the watchdog asks of its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// Finish what is in flight, take nothing new, then close.
    Gracefully,
    /// Be dropped.
    Now,
}

/// One connection's requests, shared by its request futures and its task.
#[derive(Debug)]
pub(crate) struct Activity {
    accepted: Instant,
    timeout: Duration,
    in_flight: AtomicUsize,
    /// When the last request in flight ended, in milliseconds from `accepted`.
    idle_since: AtomicU64,
    answered: AtomicU64,
    cancelled: AtomicU64,
    /// The connection's task, told when the budget is spent.
    task: AtomicWaker,
}

impl Activity {
    pub(crate) fn new(accepted: Instant, timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            accepted,
            timeout,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            task: AtomicWaker::new(),
        })
    }

    /// Counts a request in flight until the returned guard, and the response
    /// body it is moved into, are dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight { activity: self.clone(), answered: false }
    }

    fn over_budget(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst) > self.answered.load(Ordering::SeqCst) + RESET_BUDGET
    }

    /// When the connection is due to close if nothing starts meanwhile.
    fn due(&self, now: Instant) -> Instant {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return now + self.timeout;
        }
        let idle_since = Duration::from_millis(self.idle_since.load(Ordering::SeqCst));
        self.accepted + idle_since + self.timeout
    }

    /// The connection's watchdog, to poll from its task.
    pub(crate) fn expiry(self: Arc<Self>) -> Expiry {
        let sleep = Sleep::until(self.accepted + self.timeout);
        Expiry { activity: self, sleep, told: false }
    }
}

/// Watches one connection's [`Activity`].
#[derive(Debug)]
pub(crate) struct Expiry {
    activity: Arc<Activity>,
    sleep: Sleep,
    /// Whether the connection was told to close gracefully.
    told: bool,
}

impl Expiry {
    /// Ready with [`Close::Gracefully`] once the connection has been idle
    /// too long or has spent its reset budget; then, [`CLOSE_GRACE`] later
    /// and as often as it is polled after, with [`Close::Now`] while it is
    /// still idle or over budget (a client that does not read, say).
    pub(crate) fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<Close> {
        let activity = &*self.activity;
        activity.task.register(cx.waker());
        loop {
            if !self.told && activity.over_budget() {
                tracing::debug!("too many requests cancelled: closing the connection");
            } else {
                ready!(Pin::new(&mut self.sleep).poll(cx));
                let now = Instant::now();
                if self.told {
                    if activity.over_budget() || activity.in_flight.load(Ordering::SeqCst) == 0 {
                        return Poll::Ready(Close::Now);
                    }
                    self.sleep = Sleep::until(now + CLOSE_GRACE);
                    continue;
                }
                let due = activity.due(now);
                if due > now {
                    self.sleep = Sleep::until(due);
                    continue;
                }
            }
            self.told = true;
            self.sleep = Sleep::after(CLOSE_GRACE);
            // Registers the grace period's wake-up.
            let _ = Pin::new(&mut self.sleep).poll(cx);
            return Poll::Ready(Close::Gracefully);
        }
    }
}

/// A request in flight: its service future's, then its response body's.
#[derive(Debug)]
pub(crate) struct InFlight {
    activity: Arc<Activity>,
    answered: bool,
}

impl InFlight {
    /// The request has its response: dropped from now on, it is not a cancel.
    pub(crate) fn answered(&mut self) {
        self.answered = true;
        self.activity.answered.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        if !self.answered {
            activity.cancelled.fetch_add(1, Ordering::SeqCst);
            if activity.over_budget() {
                activity.task.wake();
            }
        }
        let since = u64::try_from(activity.accepted.elapsed().as_millis()).unwrap_or(u64::MAX);
        activity.idle_since.store(since, Ordering::SeqCst);
        activity.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted in flight until it is
/// sent or dropped.
#[derive(Debug)]
pub(crate) struct Tracked<B> {
    pub(crate) body: B,
    pub(crate) _in_flight: InFlight,
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;

    use super::*;

    #[tokio::test]
    async fn an_idle_connection_expires_from_its_accept_and_from_its_last_request() {
        let timeout = Duration::from_millis(200);
        let activity = Activity::new(Instant::now(), timeout);
        let started = Instant::now();
        let mut expiry = activity.clone().expiry();
        assert_eq!(poll_fn(|cx| expiry.poll_close(cx)).await, Close::Gracefully);
        assert!(started.elapsed() >= timeout);
        // Still idle after the grace period: dropped.
        assert_eq!(poll_fn(|cx| expiry.poll_close(cx)).await, Close::Now);
        assert!(started.elapsed() >= timeout + CLOSE_GRACE);

        let activity = Activity::new(Instant::now(), timeout);
        let mut request = activity.begin();
        let mut expiry = activity.clone().expiry();
        let expired = tokio::spawn(async move { poll_fn(|cx| expiry.poll_close(cx)).await });
        tokio::time::sleep(timeout * 2).await;
        assert!(!expired.is_finished(), "a request in flight keeps the connection open");
        request.answered();
        let answered = Instant::now();
        drop(request);
        assert_eq!(expired.await.ok(), Some(Close::Gracefully));
        assert!(answered.elapsed() >= timeout - Duration::from_millis(10));
    }

    #[tokio::test]
    async fn a_request_taken_while_closing_is_not_cut_off() {
        let activity = Activity::new(Instant::now(), Duration::from_millis(100));
        let mut expiry = activity.clone().expiry();
        assert_eq!(poll_fn(|cx| expiry.poll_close(cx)).await, Close::Gracefully);
        let request = activity.begin();
        let closing = tokio::spawn(async move { poll_fn(|cx| expiry.poll_close(cx)).await });
        tokio::time::sleep(CLOSE_GRACE * 2).await;
        assert!(!closing.is_finished(), "dropped with a request in flight");
        drop(request);
        assert_eq!(closing.await.ok(), Some(Close::Now));
    }

    #[tokio::test]
    async fn cancelled_requests_beyond_the_budget_close_the_connection() {
        let activity = Activity::new(Instant::now(), Duration::from_secs(60));
        for _ in 0..10 {
            activity.begin().answered();
        }
        for _ in 0..RESET_BUDGET + 10 {
            drop(activity.begin());
        }
        assert!(!activity.over_budget(), "answered requests earn cancels");
        drop(activity.begin());
        assert!(activity.over_budget());
        let mut expiry = activity.clone().expiry();
        let closing = tokio::time::timeout(Duration::from_secs(1), poll_fn(|cx| expiry.poll_close(cx))).await;
        assert_eq!(closing.ok(), Some(Close::Gracefully), "at once, long before the idle timeout");
        let _streams_in_flight = activity.begin();
        assert_eq!(poll_fn(|cx| expiry.poll_close(cx)).await, Close::Now);
    }
}
