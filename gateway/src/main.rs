//! The `pbxgate` command: parse arguments, load configuration, set up logging,
//! and hand over to the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pbxgate::config::Config;

// Every request allocates a little (buffers, headers); mimalloc's per-thread
// free lists measure about a fifth cheaper than glibc's here (bench/).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Give this admin a one-time password (for a first start, or a lost
        /// admin): it works once, then the admin must create a passkey.
        #[arg(long, requires = "password_source")]
        admin_username: Option<String>,
        /// The one-time password, from the first line of this file.
        #[arg(long, group = "password_source")]
        admin_password_file: Option<PathBuf>,
        /// The one-time password itself. Visible to anyone who can list
        /// processes: prefer --admin-password-file.
        #[arg(long, group = "password_source")]
        admin_password: Option<String>,
    },
    /// Check a configuration and its policy file, print every problem with its
    /// key path, and exit 2 if there is any (0 and a summary when valid).
    CheckConfig {
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
    },
    /// Manage accounts (the accounts themselves are declared in the policy file).
    User {
        #[command(subcommand)]
        action: UserAction,
        #[arg(short, long, default_value = "gateway.toml", global = true)]
        config: PathBuf,
        /// Make the store if no gateway has used it yet (otherwise refused:
        /// a command on a new, empty store reaches no running gateway).
        #[arg(long, global = true)]
        create: bool,
    },
    /// Remember tokens ("stay signed in" cookies) that have been issued.
    Tokens {
        #[command(subcommand)]
        action: TokensAction,
        #[arg(short, long, default_value = "gateway.toml", global = true)]
        config: PathBuf,
        /// Make the store if no gateway has used it yet (otherwise refused:
        /// a command on a new, empty store reaches no running gateway).
        #[arg(long, global = true)]
        create: bool,
    },
    /// The sign-in history (successes and failures), newest first.
    History {
        /// Only this user's.
        name: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(short, long, default_value = "gateway.toml")]
        config: PathBuf,
        /// Make the store if no gateway has used it yet (otherwise refused:
        /// a command on a new, empty store reaches no running gateway).
        #[arg(long)]
        create: bool,
    },
}

#[derive(Subcommand)]
enum TokensAction {
    /// NAME's tokens: id, created, last used, last address, browser, expiry.
    List { name: String },
    /// Revoke the token with this id (from `tokens list`): it stops working at once.
    Revoke { id: String },
}

#[derive(Subcommand)]
enum UserAction {
    /// Email NAME a welcome link (valid for links.invite_ttl) to sign in and
    /// create a passkey. Also the way back in for someone who lost theirs.
    Invite { name: String },
    /// Set NAME's password, read from standard input (one line) or, on a
    /// terminal, from a prompt. Never pass a password as an argument.
    SetPassword { name: String },
    /// Every account of the policy, with role, passkeys and last sign-in.
    List,
    /// Delete all of NAME's passkeys; NAME must create one at next sign-in.
    ResetPasskeys { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { config, admin_username, admin_password_file, admin_password } => {
            let password = match (admin_password_file, admin_password) {
                (Some(file), _) => match std::fs::read_to_string(&file) {
                    Ok(text) => Some(text.lines().next().unwrap_or_default().trim().to_string()),
                    Err(e) => {
                        eprintln!("--admin-password-file {}: {e}", file.display());
                        return ExitCode::from(2);
                    }
                },
                (None, password) => password,
            };
            serve(config, admin_username.zip(password))
        }
        Command::CheckConfig { config } => check_config(config),
        Command::User { action: UserAction::List, config, create } => {
            with_store(config, create, |config, store| async move {
                let now = pbxgate::store::now_ms();
                println!("{:<16} {:<6} {:<28} {:>8}  last sign-in", "name", "role", "email", "passkeys");
                for u in &config.policy.users {
                    let keys = store.passkey_count(&u.name).await?;
                    let flags = store.flags(&u.name).await?;
                    let sessions = store.sessions_of(&u.name, now).await?.len();
                    println!(
                        "{:<16} {:<6} {:<28} {:>8}  {}{}",
                        u.name,
                        u.role.as_str(),
                        u.email.as_deref().unwrap_or("-"),
                        keys,
                        pbxgate::auth::pages::when(flags.last_login_ms),
                        if sessions > 0 { format!(" ({sessions} active sessions)") } else { String::new() }
                    );
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::User { action: UserAction::ResetPasskeys { name }, config, create } => {
            with_store(config, create, |config, store| async move {
                let Some(user) = config.policy.user(&name) else {
                    eprintln!("{name}: no such user");
                    return Ok(ExitCode::from(2));
                };
                let n = store.delete_passkeys_of(&user.name).await?;
                let flags = store.flags(&user.name).await?;
                store
                    .set_flags(&user.name, &pbxgate::store::UserFlags { onboarding_required: true, ..flags })
                    .await?;
                tracing::info!(target: "pbxgate::audit", user = %user.name, deleted = n, "passkeys reset from the command line");
                println!("deleted {n} passkeys of {}; a new one is required at next sign-in", user.name);
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::User { action, config, create } => user(action, config, create),
        Command::Tokens { action: TokensAction::List { name }, config, create } => {
            with_store(config, create, |config, store| async move {
                let Some(user) = config.policy.user(&name) else {
                    eprintln!("{name}: no such user");
                    return Ok(ExitCode::from(2));
                };
                println!(
                    "{:<16} {:<22} {:<22} {:<16} {:<22} browser",
                    "id", "created", "last used", "last address", "expires"
                );
                for (_, t) in store.tokens_of(&user.name, pbxgate::store::now_ms()).await? {
                    let w = pbxgate::auth::pages::when;
                    println!(
                        "{:<16} {:<22} {:<22} {:<16} {:<22} {}",
                        t.id,
                        w(Some(t.created_ms)),
                        w(t.last_used_ms),
                        t.last_ip,
                        w(Some(t.expires_ms)),
                        t.user_agent
                    );
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Tokens { action: TokensAction::Revoke { id }, config, create } => {
            with_store(config, create, |_, store| async move {
                match store.revoke_token(&id).await? {
                    Some(user) => {
                        tracing::info!(target: "pbxgate::audit", %user, token = %id, "token revoked from the command line");
                        println!("revoked token {id} of {user}");
                        Ok(ExitCode::SUCCESS)
                    }
                    None => {
                        eprintln!("no token {id}");
                        Ok(ExitCode::from(3))
                    }
                }
            })
        }
        Command::History { name, limit, config, create } => {
            with_store(config, create, |config, store| async move {
                let events = store
                    .history(name.as_deref(), config.history.retention, limit, pbxgate::store::now_ms())
                    .await?;
                for e in events {
                    println!(
                        "{}  {:<12} {:<20} {:<16} {:<16} {}",
                        pbxgate::auth::pages::when(Some(e.time_ms)),
                        e.user,
                        e.method,
                        e.result,
                        e.ip,
                        e.user_agent
                    );
                }
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

/// Loads the configuration, opens its store and runs `work` (exit 1 when the
/// store fails, 2 for a bad configuration).
fn with_store<F, Fut>(path: PathBuf, create: bool, work: F) -> ExitCode
where
    F: FnOnce(std::sync::Arc<Config>, pbxgate::store::Store) -> Fut,
    Fut: std::future::Future<Output = Result<ExitCode, pbxgate::store::StoreError>>,
{
    let config = match load(&path) {
        Ok(c) => std::sync::Arc::new(c),
        Err(code) => return code,
    };
    let Some(runtime) = current_thread_runtime() else { return ExitCode::FAILURE };
    runtime.block_on(async move {
        let store = match open_store(&config, &path, create).await {
            Ok(s) => s,
            Err(code) => return code,
        };
        match work(config, store).await {
            Ok(code) => code,
            Err(e) => {
                eprintln!("store error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// The store a command works on: the one the configuration names, through
/// the running gateway where it holds it. Says so when no gateway runs on
/// it, and refuses to make a new one unless `create`.
async fn open_store(config: &Config, path: &Path, create: bool) -> Result<pbxgate::store::Store, ExitCode> {
    use pbxgate::store::{Store, StoreError};
    let shown = || match Store::embedded_file(config) {
        Some(file) => file.display().to_string(),
        None => pbxgate::config::redact(&config.store.url),
    };
    match Store::open_for_command(config, create).await {
        Ok(opened) => {
            if !opened.gateway_running {
                eprintln!(
                    "note: no running gateway uses this store ({}); what this command changes applies when a gateway starts with {}",
                    shown(),
                    path.display()
                );
            }
            Ok(opened.store)
        }
        Err(StoreError::NotCreated(why)) => {
            eprintln!("refused: {why}.");
            eprintln!(
                "Check state_directory and [store] url in {} (the service's configuration, e.g. --config /etc/pbxgate/gateway.toml), \
                 or pass --create to make a new store there.",
                path.display()
            );
            Err(ExitCode::from(2))
        }
        Err(e) => {
            eprintln!("cannot open the store: {e}");
            if matches!(e, StoreError::Locked(_)) {
                eprintln!("(a running gateway answers commands on the socket next to it; this one has none)");
            }
            Err(ExitCode::FAILURE)
        }
    }
}

/// A single-threaded runtime: enough for a CLI command, and for `serve`'s
/// main thread (requests run on the worker threads).
fn current_thread_runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| eprintln!("cannot start the async runtime: {e}"))
        .ok()
}

fn user(action: UserAction, path: PathBuf, create: bool) -> ExitCode {
    let config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    pbxgate::telemetry::init(config.log.format);
    let Some(runtime) = current_thread_runtime() else { return ExitCode::FAILURE };
    let name = match &action {
        UserAction::Invite { name }
        | UserAction::SetPassword { name }
        | UserAction::ResetPasskeys { name } => name.clone(),
        UserAction::List => return ExitCode::from(2),
    };
    let Some(user) = config.policy.user(&name).cloned() else {
        eprintln!("{name}: no such user in {}", config.policy_file.display());
        return ExitCode::from(2);
    };
    let password = match action {
        UserAction::SetPassword { .. } => match read_new_password(&user.name) {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    runtime.block_on(async move {
        let store = match open_store(&config, &path, create).await {
            Ok(s) => s,
            Err(code) => return code,
        };
        match password {
            Some(password) => {
                if let Err(weak) = pbxgate::auth::passwords::check_new(&config.passwords, &password) {
                    eprintln!("{}", weak.text(pbxgate::ui::Lang::En));
                    return ExitCode::from(2);
                }
                let hash = match pbxgate::auth::passwords::hash(password).await {
                    Ok(h) => h,
                    Err(e) => {
                        eprintln!("hashing failed: {e}");
                        return ExitCode::FAILURE;
                    }
                };
                if let Err(e) = store.set_password_hash(&user.name, &hash).await {
                    eprintln!("cannot save the password: {e}");
                    return ExitCode::FAILURE;
                }
                tracing::info!(target: "pbxgate::audit", user = %user.name, "password set from the command line");
                println!("password set for {}", user.name);
                if !user.password_login && user.role != pbxgate_policies::Role::Api {
                    println!("note: password sign-in is off for {}: set password_login = true in the policy to use it", user.name);
                }
                ExitCode::SUCCESS
            }
            None => {
                let ui = match pbxgate::ui::Ui::from_config(&config) {
                    Ok(ui) => std::sync::Arc::new(ui),
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(2);
                    }
                };
                let mailer = match pbxgate::auth::mail::Mailer::new(&config.email, ui) {
                    Ok(m) => m,
                    Err(e) => {
                        eprintln!("{e}");
                        return ExitCode::from(2);
                    }
                };
                let kind = pbxgate::auth::mail::LinkKind::Invite;
                let origin = config.public_url.origin.clone();
                match pbxgate::auth::mail_link(&store, &mailer, &config, &user, kind, &origin, "/").await {
                    Ok(()) => {
                        println!("invite sent to {} ({})", user.name, user.email.as_deref().unwrap_or_default());
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("invite not sent: {e}");
                        ExitCode::FAILURE
                    }
                }
            }
        }
    })
}

/// One line from standard input, or (on a terminal) a prompt asked twice.
fn read_new_password(name: &str) -> Result<String, String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let first =
            rpassword::prompt_password(format!("New password for {name}: ")).map_err(|e| e.to_string())?;
        let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
        if first != again {
            return Err("the two passwords differ".into());
        }
        Ok(first)
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map_err(|e| e.to_string())?;
        Ok(line.trim_end_matches(['\n', '\r']).to_string())
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

fn serve(path: PathBuf, bootstrap: Option<(String, String)>) -> ExitCode {
    let mut config = match load(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some((admin, password)) = bootstrap {
        if password.is_empty() {
            eprintln!("the one-time admin password is empty");
            return ExitCode::from(2);
        }
        config.bootstrap = pbxgate::config::Bootstrap {
            admin: Some(admin),
            one_time_password: Some(password),
            only_until_first_credential: false,
        };
    }
    pbxgate::telemetry::init(config.log.format);
    // Accepting, the admin listener and the store's background work; requests
    // run on the worker threads (`listen.workers`).
    let Some(runtime) = current_thread_runtime() else { return ExitCode::FAILURE };
    match runtime.block_on(pbxgate::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: the log goes to stderr too.
            tracing::error!("pbxgate: {e}");
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
    if let Err(e) = pbxgate::ui::Ui::from_config(&config) {
        eprintln!("{}: configuration is invalid\n  error: {e}", path.display());
        return ExitCode::from(2);
    }
    if config.listen.https.is_some() {
        if let Err(e) = pbxgate::tls::check(&config.tls, &config.policy) {
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
    println!("  store     {}", pbxgate::config::redact(&config.store.url));
    ExitCode::SUCCESS
}
