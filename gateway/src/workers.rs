//! One single-threaded runtime per core, serving connections handed out in
//! turn. A connection's requests, the upstream calls they make and the pooled
//! upstream connections they use all stay on one thread: no work stealing and
//! no cross-thread wake-ups on the hot path (measurably more requests per
//! second than one multi-threaded runtime; `bench/` measures it).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::time::MissedTickBehavior;

use crate::timer::{Wheel, TICK};

pub(crate) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` threads, each running its own current-thread runtime,
    /// under `SCHED_BATCH` when `batch` (see [`batch_scheduling`]).
    pub(crate) fn start(count: usize, batch: bool) -> io::Result<Self> {
        let mut workers =
            Self { handles: Vec::new(), next: AtomicUsize::new(0), stops: Vec::new(), threads: Vec::new() };
        for index in 0..count.max(1) {
            // Sockets and timers only: signals and child processes are the main runtime's.
            let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(runtime.handle().clone());
            workers.stops.push(stop);
            let thread =
                std::thread::Builder::new().name(format!("pbxgate-worker-{index}")).spawn(move || {
                    if batch {
                        batch_scheduling();
                    }
                    crate::telemetry::buffer_access_log_here();
                    let deadlines = Wheel::install();
                    // Serves whatever is spawned onto it until told to stop.
                    runtime.block_on(async {
                        tokio::select! {
                            _ = stopped => {}
                            _ = tick(deadlines) => {}
                        }
                    });
                    crate::telemetry::flush_access_log();
                })?;
            workers.threads.push(thread);
        }
        Ok(workers)
    }

    pub(crate) fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `task(worker)` on the next worker in turn.
    pub(crate) fn spawn<F, Fut>(&self, task: F)
    where
        F: FnOnce(usize) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[index].spawn(task(index));
    }

    /// Stops every worker; what still runs on them (a background e-mail, a
    /// spliced websocket) ends with them.
    pub(crate) async fn stop(self) {
        drop(self.stops);
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
    }
}

/// Puts this thread under `SCHED_BATCH`: when a packet wakes it, it no
/// longer preempts whatever runs on that core (the PBX, the client, the
/// kernel's other work) and runs at that task's next switch instead, finding
/// more requests ready per wake-up. Under load that means fewer context
/// switches per request and more requests per second under load; on an
/// idle core it still runs at once. Nice values are not
/// touched. Where the policy is already set (systemd's `CPUSchedulingPolicy=`)
/// or not allowed, the thread runs as it is.
#[cfg(target_os = "linux")]
fn batch_scheduling() {
    const SCHED_BATCH: &str = "3";
    // Field 41 of /proc/thread-self/stat is the policy, after the command
    // name (which may hold spaces, so counted from its closing parenthesis).
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let policy = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(38));
    if policy == Some(SCHED_BATCH) {
        return;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 names the calling thread; `param` is a valid
    // `sched_param` that lives across the call, which only reads it.
    #[allow(unsafe_code)]
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if result != 0 {
        let error = io::Error::last_os_error();
        tracing::info!(%error, "listen.worker_scheduling: SCHED_BATCH not allowed; workers keep the default policy");
    }
}

#[cfg(not(target_os = "linux"))]
fn batch_scheduling() {}

/// Every [`TICK`]: fires the worker's due deadlines ([`crate::timer`]);
/// twice a second: writes out its buffered access-log lines.
///
/// It also keeps a tokio timer near. Tokio wakes its own parked driver (an
/// eventfd write and one more epoll_wait) whenever a new timer is due before
/// every existing one; with a timer always less than a tick away, the tokio
/// timers still armed per connection (the TLS handshake's) never do that.
async fn tick(deadlines: Arc<Wheel>) {
    const FLUSH_EVERY: u64 = (500 / TICK.as_millis()) as u64; // ticks: half a second
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut ticks = 0u64;
    loop {
        tick.tick().await;
        deadlines.advance(Instant::now());
        ticks += 1;
        if ticks % FLUSH_EVERY == 0 {
            crate::telemetry::flush_access_log();
        }
    }
}
