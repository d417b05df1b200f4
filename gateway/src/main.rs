//! The `pbxgate` command: parse arguments, load configuration, set up logging,
//! and hand over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pbxgate::config::Config;

/// An authentication gateway in front of a PBX web interface.
#[derive(Parser)]
#[command(name = "pbxgate", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (stops gracefully on SIGTERM or Ctrl-C).
    Serve {
        /// The gateway configuration (TOML). PBXGATE_* environment variables
        /// override its keys, e.g. PBXGATE_STORE__URL for [store] url.
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Check a configuration and its policy file, print every problem with its
    /// key path, and exit 2 if there is any (0 and a summary when valid).
    CheckConfig {
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(config),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{}: configuration is invalid", path.display());
        for e in &errors.0 {
            eprintln!("  error: {e}");
        }
        ExitCode::from(2)
    })
}

fn serve(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    pbxgate::telemetry::init(config.log.format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(pbxgate::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("pbxgate: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

fn check_config(path: PathBuf) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if config.listen.https.is_some() {
        if let Err(e) = pbxgate::tls::server_config(&config.tls, &config.policy) {
            eprintln!("{}: configuration is invalid\n  error: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    let p = &config.policy;
    let show = |a: Option<std::net::SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
    println!("{}: ok", path.display());
    println!(
        "  policy    {} ({} domains, {} routes, {} users)",
        config.policy_file.display(),
        p.domains.len(),
        p.routes.len(),
        p.users.len()
    );
    println!("  public    {}", config.public_url.origin);
    println!(
        "  listen    https {}, http {}, redirect_http {}, admin {}",
        show(config.listen.https),
        show(config.listen.http),
        show(config.listen.redirect_http),
        show(config.listen.admin)
    );
    println!("  upstream  {}", config.upstream.url);
    println!("  store     {}", redact(&config.store.url));
    ExitCode::SUCCESS
}

/// Hides a password in a URL (`redis://:secret@host` -> `redis://:***@host`).
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}
