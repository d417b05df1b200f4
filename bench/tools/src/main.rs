//! The benchmark's own programs (`bench/run`), for what wrk and nginx cannot
//! do. One binary, so the release build links (and LTO-compiles) one tool
//! instead of three.
//!
//! - `session-check LISTEN_ADDR REDIS_URL`: the forward-auth pattern's session
//!   check behind nginx `auth_request`.
//! - `passkeys GATEWAY ORIGIN USERS SECONDS`: signs in each of `USERS`
//!   accounts (`bench-0`, `bench-1`, …) with its password and registers a
//!   software passkey in that session, all through the JSON API, then signs
//!   them in with their passkeys over and over, one client per account, and
//!   prints logins per second with p50/p99 latency (start + finish).
//! - `sessions GATEWAY ORIGIN USERS COUNT`: the same clients make `COUNT`
//!   passkey sign-ins and send one request with each new session, so all are
//!   live in the gateway (for its memory footprint).
//!
//! GATEWAY is the plain-HTTP listener (`127.0.0.1:PORT`), ORIGIN the gateway's
//! public URL origin. The accounts' password is read from `BENCH_PASSWORD`.
//!
//! BENCH_PASSWORD=... target/pgo/release/bench-tools passkeys 127.0.0.1:8000 https://localhost:8443 16 5

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod clients;
mod session_check;

use std::future::Future;

use tokio::signal::unix::{signal, SignalKind};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        // A server under load: tokio's default multi-threaded runtime, as such a service runs.
        ["session-check", listen, redis_url] => {
            let runtime = tokio::runtime::Runtime::new().unwrap();
            // Until SIGTERM, as bench/run stops it: a clean exit, so the
            // optimized build's training run gets this tool's profile too.
            runtime.block_on(async {
                let mut stop = signal(SignalKind::terminate()).unwrap();
                tokio::select! {
                    () = session_check::serve(listen, redis_url) => {}
                    _ = stop.recv() => {}
                }
            });
        }
        ["passkeys", addr, origin, users, seconds] => {
            client(clients::passkeys(addr, origin, users.parse().unwrap(), seconds.parse().unwrap()))
        }
        ["sessions", addr, origin, users, count] => {
            client(clients::sessions(addr, origin, users.parse().unwrap(), count.parse().unwrap()))
        }
        _ => {
            eprintln!("usage: bench-tools session-check LISTEN_ADDR REDIS_URL");
            eprintln!("       bench-tools passkeys GATEWAY ORIGIN USERS SECONDS");
            eprintln!("       bench-tools sessions GATEWAY ORIGIN USERS COUNT");
            std::process::exit(2);
        }
    }
}

/// The clients run on one thread, leaving the gateway the machine's cores.
fn client(work: impl Future<Output = ()>) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(work);
}
