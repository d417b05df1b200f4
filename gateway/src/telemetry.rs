//! Logging: `tracing` to stderr, pretty or JSON. Targets: `pbxgate::access`
//! (one line per request), `pbxgate::audit` (security events), `pbxgate` (the rest).
//! `RUST_LOG` filters as usual (default `info`).
//!
//! Access lines ([`log_access`]) are formatted by hand and, on a worker
//! thread, gathered in that thread's buffer and written together (as nginx's
//! `access_log ... buffer= flush=` does): when it holds 32 KiB, or at the
//! latest half a second later from the worker's tick, and when the worker
//! stops. Everything else goes straight out.

use std::cell::{Cell, RefCell};
use std::io::{IsTerminal, Write};

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

mod access;
mod repeated;
pub(crate) use access::{log as log_access, AccessLine};
pub use repeated::Repeated;

const FLUSH_AT: usize = 32 * 1024;

thread_local! {
    /// Set on worker threads, which flush their buffer on a timer.
    static BUFFERING: Cell<bool> = const { Cell::new(false) };
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    // Already initialised (tests, or a second call): keep the first.
    if result.is_ok() {
        access::set_json(matches!(format, LogFormat::Json));
    }
}

/// From now on this thread buffers its access lines; it must call
/// [`flush_access_log`] at least every second and before it ends.
pub(crate) fn buffer_access_log_here() {
    BUFFERING.with(|b| b.set(true));
}

/// Writes out this thread's buffered access lines.
pub(crate) fn flush_access_log() {
    BUFFER.with(|buffer| {
        let mut buffer = buffer.borrow_mut();
        if !buffer.is_empty() {
            // Logging must never take the gateway down: a failed write is dropped.
            let _ = std::io::stderr().write_all(&buffer);
            buffer.clear();
        }
    });
}

/// Hands `format` the buffer an access line goes to: the worker's batch, or
/// on other threads a line of its own, written at once.
fn write_access(format: impl FnOnce(&mut Vec<u8>)) {
    if BUFFERING.with(Cell::get) {
        let full = BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            format(&mut buffer);
            buffer.len() >= FLUSH_AT
        });
        if full {
            flush_access_log();
        }
    } else {
        let mut line = Vec::with_capacity(256);
        format(&mut line);
        let _ = std::io::stderr().write_all(&line);
    }
}
