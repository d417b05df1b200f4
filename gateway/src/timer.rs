//! Coarse deadlines for the request path.
//!
//! Every request arms two deadlines tens of seconds out (hyper's header-read
//! timeout, armed for the connection's next request, and the upstream's
//! answer) and nearly always drops them long before they are due. On tokio's
//! timer wheel each costs registering under the driver's lock, clock reads
//! and a removal, a visible share of a request's work. Here a
//! deadline on a worker is a slot in that worker's list, which the worker's
//! tick checks every [`TICK`]: arming or dropping one is a short uncontended
//! lock. A deadline fires up to one tick late, never early. Off the workers
//! (the admin listener, tests) tokio's timer serves.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often a worker checks its deadlines: their precision.
pub const TICK: Duration = Duration::from_millis(100);

thread_local! {
    static WHEEL: RefCell<Option<Arc<Wheel>>> = const { RefCell::new(None) };
}

/// One worker's deadlines.
#[derive(Debug)]
pub struct Wheel {
    slots: Mutex<Slots>,
}

#[derive(Debug)]
struct Slots {
    /// When the last tick ran: what counts as now for this worker's deadlines.
    now: Instant,
    entries: Vec<Option<Entry>>,
    /// Indices of the `None`s in `entries`.
    free: Vec<usize>,
}

#[derive(Debug)]
struct Entry {
    deadline: Instant,
    /// Taken when the deadline passes: the sleeper is woken once.
    waker: Option<Waker>,
}

impl Wheel {
    /// Gives this thread its own deadlines, which [`Wheel::advance`] must
    /// then be called for every [`TICK`] (the worker's tick does).
    pub fn install() -> Arc<Wheel> {
        let now = Instant::now();
        let wheel =
            Arc::new(Wheel { slots: Mutex::new(Slots { now, entries: Vec::new(), free: Vec::new() }) });
        WHEEL.with(|w| *w.borrow_mut() = Some(wheel.clone()));
        wheel
    }

    fn slots(&self) -> MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Moves this worker's time to `now` and wakes what is due by then.
    pub fn advance(&self, now: Instant) {
        let mut due = Vec::new();
        {
            let mut slots = self.slots();
            slots.now = slots.now.max(now);
            let now = slots.now;
            for entry in slots.entries.iter_mut().flatten() {
                if entry.deadline <= now {
                    due.extend(entry.waker.take());
                }
            }
        }
        // Outside the lock: a waker may poll its sleeper at once.
        due.into_iter().for_each(Waker::wake);
    }

    /// How many deadlines are armed.
    #[cfg(test)]
    fn armed(&self) -> usize {
        let slots = self.slots();
        slots.entries.len() - slots.free.len()
    }
}

/// A future that completes at its deadline; hyper's [`hyper::rt::Sleep`] too.
#[derive(Debug)]
pub struct Sleep {
    deadline: Instant,
    clock: Clock,
}

#[derive(Debug)]
enum Clock {
    /// On a worker: a slot in its wheel once first polled.
    Coarse { wheel: Arc<Wheel>, slot: Option<usize> },
    /// Elsewhere.
    Tokio(Pin<Box<tokio::time::Sleep>>),
}

impl Sleep {
    pub fn until(deadline: Instant) -> Self {
        let clock = match WHEEL.with(|w| w.borrow().clone()) {
            Some(wheel) => Clock::Coarse { wheel, slot: None },
            None => Clock::Tokio(Box::pin(tokio::time::sleep_until(deadline.into()))),
        };
        Self { deadline, clock }
    }

    pub fn after(duration: Duration) -> Self {
        Self::until(Instant::now() + duration)
    }

    fn reset(&mut self, deadline: Instant) {
        self.deadline = deadline;
        match &mut self.clock {
            Clock::Coarse { wheel, slot: Some(slot) } => {
                if let Some(entry) = &mut wheel.slots().entries[*slot] {
                    entry.deadline = deadline;
                }
            }
            Clock::Coarse { slot: None, .. } => {}
            Clock::Tokio(sleep) => sleep.as_mut().reset(deadline.into()),
        }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let deadline = self.deadline;
        let (wheel, slot) = match &mut self.clock {
            Clock::Tokio(sleep) => return sleep.as_mut().poll(cx),
            Clock::Coarse { wheel, slot } => (wheel, slot),
        };
        let mut slots = wheel.slots();
        if deadline <= slots.now {
            return Poll::Ready(());
        }
        match *slot {
            Some(index) => {
                if let Some(Entry { waker: Some(waker), .. }) = &mut slots.entries[index] {
                    if !waker.will_wake(cx.waker()) {
                        waker.clone_from(cx.waker());
                    }
                } else {
                    slots.entries[index] = Some(Entry { deadline, waker: Some(cx.waker().clone()) });
                }
            }
            None => {
                let entry = Some(Entry { deadline, waker: Some(cx.waker().clone()) });
                *slot = Some(match slots.free.pop() {
                    Some(index) => {
                        slots.entries[index] = entry;
                        index
                    }
                    None => {
                        slots.entries.push(entry);
                        slots.entries.len() - 1
                    }
                });
            }
        }
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Clock::Coarse { wheel, slot: Some(index) } = &self.clock {
            let mut slots = wheel.slots();
            slots.entries[*index] = None;
            slots.free.push(*index);
        }
    }
}

impl hyper::rt::Sleep for Sleep {}

/// hyper's timer for the connections it serves.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timer;

impl hyper::rt::Timer for Timer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep::after(duration))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Sleep::until(deadline))
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn hyper::rt::Sleep>>, deadline: Instant) {
        match sleep.as_mut().downcast_mut_pin::<Sleep>() {
            Some(ours) => ours.get_mut().reset(deadline),
            None => *sleep = self.sleep_until(deadline),
        }
    }
}

/// `future`'s output, or `None` once `deadline` has passed.
pub async fn timeout_at<F: Future>(deadline: Instant, future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    let mut sleep = Sleep::until(deadline);
    poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        Pin::new(&mut sleep).poll(cx).map(|()| None)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(0.into()));
        (count.clone(), Waker::from(count))
    }

    fn woken(count: &Count) -> usize {
        count.0.load(std::sync::atomic::Ordering::SeqCst)
    }

    #[test]
    fn a_deadline_fires_at_the_first_tick_past_it_never_before() {
        let wheel = Wheel::install();
        let start = Instant::now();
        let (count, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut sleep = Sleep::until(start + Duration::from_secs(30));
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_pending());
        assert_eq!(wheel.armed(), 1);
        wheel.advance(start + Duration::from_millis(29_900));
        assert_eq!(woken(&count), 0);
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_pending());
        wheel.advance(start + Duration::from_secs(30));
        assert_eq!(woken(&count), 1);
        assert!(Pin::new(&mut sleep).poll(&mut cx).is_ready());
        // Woken once, not at every tick after.
        wheel.advance(start + Duration::from_secs(31));
        assert_eq!(woken(&count), 1);
        drop(sleep);
        assert_eq!(wheel.armed(), 0);
    }

    #[test]
    fn dropped_deadlines_free_their_slots_for_the_next() {
        let wheel = Wheel::install();
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        for _ in 0..100 {
            let mut sleep = Sleep::after(Duration::from_secs(30));
            assert!(Pin::new(&mut sleep).poll(&mut cx).is_pending());
        }
        assert_eq!(wheel.armed(), 0);
        assert_eq!(wheel.slots().entries.len(), 1, "one slot, reused");
    }

    #[test]
    fn a_reset_moves_the_deadline() {
        use hyper::rt::Timer as _;
        let wheel = Wheel::install();
        let start = Instant::now();
        let (count, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut sleep = Timer.sleep_until(start + Duration::from_secs(1));
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        Timer.reset(&mut sleep, start + Duration::from_secs(10));
        wheel.advance(start + Duration::from_secs(5));
        assert_eq!(woken(&count), 0);
        assert!(sleep.as_mut().poll(&mut cx).is_pending());
        wheel.advance(start + Duration::from_secs(10));
        assert_eq!(woken(&count), 1);
        assert!(sleep.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn timeout_at_gives_the_output_or_none_once_due() {
        let wheel = Wheel::install();
        let start = Instant::now();
        let (_, waker) = waker();
        let mut cx = Context::from_waker(&waker);
        let mut quick = pin!(timeout_at(start + Duration::from_secs(1), async { 7 }));
        assert_eq!(quick.as_mut().poll(&mut cx), Poll::Ready(Some(7)));
        let mut slow = pin!(timeout_at(start + Duration::from_secs(1), std::future::pending::<()>()));
        assert!(slow.as_mut().poll(&mut cx).is_pending());
        wheel.advance(start + Duration::from_secs(2));
        assert_eq!(slow.as_mut().poll(&mut cx), Poll::Ready(None));
    }

    /// Off the workers (this test's thread has no wheel, as the admin
    /// listener's has none) tokio keeps the time: nothing ticks a wheel here,
    /// so a deadline left to one would never fire.
    #[tokio::test]
    async fn off_the_workers_tokio_keeps_the_time() {
        use hyper::rt::Timer as _;
        let start = Instant::now();
        let due = tokio::time::timeout(Duration::from_secs(5), Sleep::after(Duration::from_millis(30))).await;
        assert!(due.is_ok(), "the deadline fired");
        assert!(start.elapsed() >= Duration::from_millis(30), "not before it");

        let mut sleep = Timer.sleep(Duration::from_secs(60));
        Timer.reset(&mut sleep, Instant::now() + Duration::from_millis(20));
        let reset = tokio::time::timeout(Duration::from_secs(5), sleep).await;
        assert!(reset.is_ok(), "a reset moved the deadline earlier");

        let started = Instant::now();
        let deadline = started + Duration::from_millis(20);
        assert_eq!(timeout_at(deadline, std::future::pending::<()>()).await, None);
        assert!(started.elapsed() >= Duration::from_millis(20));
    }
}
