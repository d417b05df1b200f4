//! Logging: `tracing` to stderr, pretty or JSON. Targets: `pbxgate::access`
//! (one line per request), `pbxgate::audit` (security events), `pbxgate` (the rest).
//! `RUST_LOG` filters as usual (default `info`).
//!
//! Access lines written on a worker thread are gathered in that thread's
//! buffer and written together (as nginx's `access_log ... buffer= flush=`
//! does): when it holds 32 KiB, or at the latest half a second later from the
//! worker's tick, and when the worker stops. Everything else goes straight out.

use std::cell::{Cell, RefCell};
use std::io::{IsTerminal, Write};

use tracing::Metadata;
use tracing_subscriber::fmt::writer::{EitherWriter, MakeWriter};
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

const ACCESS: &str = "pbxgate::access";
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
        .with_writer(LogWriter)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    // Already initialised (tests, or a second call): keep the first.
    let _ = result;
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

/// Stderr, with access lines buffered on worker threads.
struct LogWriter;

/// Appends one formatted event (the formatter writes each in one call).
struct Buffered;

impl Write for Buffered {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let full = BUFFER.with(|buffer| {
            let mut buffer = buffer.borrow_mut();
            buffer.extend_from_slice(bytes);
            buffer.len() >= FLUSH_AT
        });
        if full {
            flush_access_log();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = EitherWriter<Buffered, std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        EitherWriter::B(std::io::stderr())
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        if meta.target() == ACCESS && BUFFERING.with(Cell::get) {
            EitherWriter::A(Buffered)
        } else {
            EitherWriter::B(std::io::stderr())
        }
    }
}
