//! Logging: `tracing` to stderr, pretty or JSON. Targets: `pbxgate::access`
//! (one line per request), `pbxgate::audit` (security events), `pbxgate` (the rest).
//! `RUST_LOG` filters as usual (default `info`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

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
    let _ = result;
}
