//! One single-threaded runtime per core, serving connections handed out in
//! turn. A connection's requests, the upstream calls they make and the pooled
//! upstream connections they use all stay on one thread: no work stealing and
//! no cross-thread wake-ups on the hot path (about a fifth more requests per
//! second than one multi-threaded runtime on two cores, see `bench/`).

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub(crate) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` threads, each running its own current-thread runtime.
    pub(crate) fn start(count: usize) -> io::Result<Self> {
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
                    crate::telemetry::buffer_access_log_here();
                    // Serves whatever is spawned onto it until told to stop.
                    runtime.block_on(async {
                        tokio::select! {
                            _ = stopped => {}
                            _ = tick() => {}
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

/// Twice a second: writes out the worker's buffered access-log lines.
///
/// It also keeps a timer near. Every request arms timers (header read,
/// upstream timeout) tens of seconds out. Tokio wakes its own parked driver
/// (an eventfd write and one more epoll_wait) whenever a new timer is due
/// before every existing one; a timer always less than a second away means
/// that never happens on the request path.
async fn tick() {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        crate::telemetry::flush_access_log();
    }
}
