//! Prometheus counters kept in atomics: no locks and no allocation per request.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

const METHODS: [&str; 9] = [
    "passkey",
    "link",
    "invite",
    "password",
    "one_time_password",
    "remember",
    "unlock:passkey",
    "unlock:password",
    "other",
];
const DECISIONS: [&str; 7] = ["allow", "login", "step_up", "deny", "drop", "reserved", "bad_request"];
const CLASSES: [&str; 6] = ["0xx", "1xx", "2xx", "3xx", "4xx", "5xx"];
/// Upper bounds of the upstream latency histogram, in seconds.
const BUCKETS: [f64; 12] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Default)]
pub struct Metrics {
    requests: [[AtomicU64; CLASSES.len()]; DECISIONS.len()],
    latency_buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_micros: AtomicU64,
    connections: AtomicI64,
    /// argon2 verifications run (sign-ins, unlocks, Basic cache misses).
    pub password_verifications: AtomicU64,
    /// Sign-ins by method, [failures, successes].
    logins: [[AtomicU64; 2]; METHODS.len()],
    pub links_sent: AtomicU64,
}

/// Decrements the open-connection gauge when the connection ends.
pub struct ConnectionGuard<'a>(&'a AtomicI64);

impl Drop for ConnectionGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn request(&self, decision: &str, status: u16) {
        let d = DECISIONS.iter().position(|x| *x == decision).unwrap_or(0);
        let c = usize::from(status / 100).min(CLASSES.len() - 1);
        self.requests[d][c].fetch_add(1, Ordering::Relaxed);
    }

    pub fn login(&self, method: &str, success: bool) {
        let m = METHODS.iter().position(|x| *x == method).unwrap_or(METHODS.len() - 1);
        self.logins[m][usize::from(success)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn upstream_latency(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_micros
            .fetch_add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    pub fn connection_opened(&self) -> ConnectionGuard<'_> {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(&self.connections)
    }

    /// The store's figures follow the gateway's own.
    pub fn render_with_store(&self, store: &crate::store::StoreStats, backend: &str) -> String {
        let mut out = self.render();
        let calls = store.calls.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP pbxgate_store_calls_total Store operations.\n# TYPE pbxgate_store_calls_total counter"
        );
        let _ = writeln!(out, "pbxgate_store_calls_total{{backend=\"{backend}\"}} {calls}");
        let _ = writeln!(out, "# HELP pbxgate_store_errors_total Store operations that failed (unreachable, timed out).\n# TYPE pbxgate_store_errors_total counter");
        let _ = writeln!(
            out,
            "pbxgate_store_errors_total{{backend=\"{backend}\"}} {}",
            store.errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(out, "# HELP pbxgate_store_duration_seconds Store operation latency.\n# TYPE pbxgate_store_duration_seconds histogram");
        let mut cumulative = 0;
        for (i, bound) in crate::store::STORE_BUCKETS.iter().enumerate() {
            cumulative += store.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "pbxgate_store_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "pbxgate_store_duration_seconds_bucket{{le=\"+Inf\"}} {calls}");
        let _ = writeln!(
            out,
            "pbxgate_store_duration_seconds_sum {}",
            store.micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "pbxgate_store_duration_seconds_count {calls}");
        out
    }

    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ =
            writeln!(out, "# HELP pbxgate_build_info Build information.\n# TYPE pbxgate_build_info gauge");
        let _ = writeln!(out, "pbxgate_build_info{{version=\"{}\"}} 1", env!("CARGO_PKG_VERSION"));
        let _ = writeln!(
            out,
            "# HELP pbxgate_requests_total Requests by decision and status class.\n# TYPE pbxgate_requests_total counter"
        );
        for (d, decision) in DECISIONS.iter().enumerate() {
            for (c, class) in CLASSES.iter().enumerate() {
                let n = self.requests[d][c].load(Ordering::Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "pbxgate_requests_total{{decision=\"{decision}\",status=\"{class}\"}} {n}"
                    );
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP pbxgate_upstream_duration_seconds Time to the upstream's response headers.\n# TYPE pbxgate_upstream_duration_seconds histogram"
        );
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "pbxgate_upstream_duration_seconds_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let sum = self.latency_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "pbxgate_upstream_duration_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "pbxgate_upstream_duration_seconds_sum {sum}");
        let _ = writeln!(out, "pbxgate_upstream_duration_seconds_count {count}");
        let _ = writeln!(
            out,
            "# HELP pbxgate_open_connections Client connections open now.\n# TYPE pbxgate_open_connections gauge"
        );
        let _ = writeln!(out, "pbxgate_open_connections {}", self.connections.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP pbxgate_password_verifications_total argon2 verifications (sign-ins, unlocks, Basic cache misses).\n# TYPE pbxgate_password_verifications_total counter"
        );
        let verifications = self.password_verifications.load(Ordering::Relaxed);
        let _ = writeln!(out, "pbxgate_password_verifications_total {verifications}");
        let _ = writeln!(
            out,
            "# HELP pbxgate_logins_total Sign-ins by method and result.\n# TYPE pbxgate_logins_total counter"
        );
        for (m, method) in METHODS.iter().enumerate() {
            for (r, result) in ["failure", "success"].iter().enumerate() {
                let n = self.logins[m][r].load(Ordering::Relaxed);
                let _ = writeln!(out, "pbxgate_logins_total{{method=\"{method}\",result=\"{result}\"}} {n}");
            }
        }
        let _ = writeln!(out, "# HELP pbxgate_links_sent_total Sign-in and invite links emailed.\n# TYPE pbxgate_links_sent_total counter");
        let _ = writeln!(out, "pbxgate_links_sent_total {}", self.links_sent.load(Ordering::Relaxed));
        out
    }
}
