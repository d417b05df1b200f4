//! pbxgate: an authentication gateway in front of a PBX web interface.
//!
//! `main.rs` parses the command line; everything else lives here so tests can
//! run a whole gateway in-process on `127.0.0.1:0`:
//!
//! ```no_run
//! # async fn example(config: pbxgate::config::Config) -> Result<(), pbxgate::Error> {
//! let gateway = pbxgate::Gateway::bind(config).await?;
//! println!("https on {:?}", gateway.addrs().https);
//! gateway.serve(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod admin;
pub mod auth;
pub mod config;
pub mod error;
pub mod listener;
pub mod metrics;
mod pipeline;
pub mod proxy;
mod reload;
mod reserved;
pub mod store;
pub mod telemetry;
mod timer;
pub mod tls;
pub mod ui;
mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{Either, Full};
use pbxgate_policies::Policy;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Config;
pub use error::Error;

/// Every response body: streamed from the upstream, or small and our own.
pub type Body = Either<proxy::Pooled, Full<Bytes>>;

/// What every request shares, built once at start-up.
pub(crate) struct State {
    pub config: Arc<Config>,
    pub policy: ArcSwap<Policy>,
    /// The TLS configuration, swapped when certificates are reloaded.
    pub tls: Option<ArcSwap<rustls::ServerConfig>>,
    pub upstream: proxy::Upstream,
    pub spoofable: proxy::Spoofable,
    pub identities: proxy::Identities,
    pub metrics: metrics::Metrics,
    pub store: store::Store,
    pub auth: Auth,
    /// Pages and emails: templates, messages, brand.
    pub ui: Arc<ui::Ui>,
}

/// Sign-in machinery, built once at start-up.
pub(crate) struct Auth {
    pub passkeys: auth::passkeys::Passkeys,
    pub mailer: auth::mail::Mailer,
    /// Signs the upstream assertion when `headers.assertion` is set.
    pub signer: Option<auth::assertion::Signer>,
    pub sockets: auth::sockets::Sockets,
    pub basic: auth::basic::BasicCache,
    pub renewals: auth::Renewals,
}

impl State {
    /// The language of `user` (the policy's `language`), else `fallback`
    /// (what the request asked for).
    fn lang_of(&self, user: &str, fallback: ui::Lang) -> ui::Lang {
        self.policy
            .load()
            .user(user)
            .and_then(|u| u.language.as_deref())
            .and_then(ui::Lang::from_tag)
            .unwrap_or(fallback)
    }

    /// The words of a refusal (see [`error::Localize`]) in the language of
    /// `user`, else the one the request asks for.
    fn page_words(
        &self,
        response: http::Response<Body>,
        headers: &http::HeaderMap,
        user: Option<&str>,
    ) -> http::Response<Body> {
        let asked = ui::i18n::negotiate(headers, self.ui.default_lang);
        let lang = user.map_or(asked, |u| self.lang_of(u, asked));
        error::localize(response, &self.ui, lang)
    }

    /// Whether any account may use a password (else the login page hides it).
    fn passwords_possible(&self) -> bool {
        self.policy.load().users.iter().any(|u| u.password_login)
    }

    /// Ready when the store answers: without it nobody can sign in.
    async fn is_ready(&self) -> bool {
        match self.store.ping().await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "not ready: store unreachable");
                false
            }
        }
    }
}

/// A template or logo that cannot be used stops start-up like a bad key.
fn ui_error(message: String) -> Error {
    let (path, message) = message.split_once(": ").unwrap_or(("ui", &message));
    Error::Config(config::ConfigErrors(vec![config::ConfigError {
        path: path.to_string(),
        message: message.to_string(),
    }]))
}

impl Auth {
    async fn new(config: &Config, store: &store::Store, ui: Arc<ui::Ui>) -> Result<Self, Error> {
        let signer = match &config.headers.assertion {
            Some(_) => {
                let audience = config.upstream.url.to_string();
                Some(
                    auth::assertion::Signer::load(
                        store,
                        &config.public_url.origin,
                        audience.trim_end_matches('/'),
                    )
                    .await?,
                )
            }
            None => None,
        };
        Ok(Self {
            passkeys: auth::passkeys::Passkeys::new(config).map_err(Error::Auth)?,
            mailer: auth::mail::Mailer::new(&config.email, ui).map_err(Error::Auth)?,
            signer,
            sockets: auth::sockets::Sockets::default(),
            basic: auth::basic::BasicCache::default(),
            renewals: auth::Renewals::default(),
        })
    }
}

/// The addresses actually bound (useful with port 0).
#[derive(Debug, Clone, Default)]
pub struct Addrs {
    pub https: Option<SocketAddr>,
    pub http: Option<SocketAddr>,
    pub redirect_http: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// A gateway whose sockets are bound but not yet served.
pub struct Gateway {
    state: Arc<State>,
    addrs: Addrs,
    listeners: Vec<(TcpListener, listener::Kind)>,
    /// `pbxgate user …` and friends beside the running gateway (embedded store).
    commands: Option<store::CommandSocket>,
}

impl Gateway {
    /// Checks the TLS material, builds the upstream client and binds every listener.
    pub async fn bind(config: Config) -> Result<Self, Error> {
        let tls = match config.listen.https {
            Some(_) => Some(tls::server_config(&config.tls, &config.policy)?),
            None => None,
        };
        let upstream =
            proxy::Upstream::new(&config.upstream, config.limits.max_request_body, config.listen.workers)?;
        let spoofable = proxy::Spoofable::new(config.headers.all());
        let store = store::Store::open_configured(&config).await?;
        store.watch_revocations();
        store.mark_in_use().await?;
        store.announce_running();
        tracing::info!(backend = store.backend(), "store opened");
        let commands = match store.serve_commands() {
            Some(Ok(socket)) => {
                tracing::info!(path = %socket.path().display(), "answering pbxgate commands on the store's socket");
                Some(socket)
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "no socket for pbxgate commands: stop the gateway to run them");
                None
            }
            None => None,
        };
        let ui = Arc::new(ui::Ui::from_config(&config).map_err(ui_error)?);
        let auth = Auth::new(&config, &store, ui.clone()).await?;
        auth::arm_bootstrap(&config, &store).await?;
        let mut addrs = Addrs::default();
        let mut listeners = Vec::new();
        let wanted = [
            (config.listen.https, tls.as_ref().map(|_| listener::Kind::Https)),
            (config.listen.http, Some(listener::Kind::Http)),
            (config.listen.redirect_http, Some(listener::Kind::RedirectHttp)),
            (config.listen.admin, Some(listener::Kind::Admin)),
        ];
        for (addr, kind) in wanted {
            let (Some(addr), Some(kind)) = (addr, kind) else { continue };
            let socket = listener::bind(addr).await?;
            let local = socket.local_addr().map_err(|source| Error::Bind { addr, source })?;
            let slot = match kind {
                listener::Kind::Https => &mut addrs.https,
                listener::Kind::Http => &mut addrs.http,
                listener::Kind::RedirectHttp => &mut addrs.redirect_http,
                listener::Kind::Admin => &mut addrs.admin,
            };
            *slot = Some(local);
            listeners.push((socket, kind));
        }
        let state = Arc::new(State {
            policy: ArcSwap::new(config.policy.clone()),
            tls: tls.map(ArcSwap::new),
            config: Arc::new(config),
            upstream,
            spoofable,
            identities: proxy::Identities::default(),
            metrics: metrics::Metrics::default(),
            store,
            auth,
            ui,
        });
        tokio::spawn(auth::sockets::watch(Arc::downgrade(&state)));
        Ok(Self { state, addrs, listeners, commands })
    }

    pub fn addrs(&self) -> &Addrs {
        &self.addrs
    }

    /// The gateway's store (for tools and tests that work beside it).
    pub fn store(&self) -> store::Store {
        self.state.store.clone()
    }

    /// Serves until `shutdown` resolves, then stops accepting and lets
    /// in-flight requests finish (up to `listen.shutdown_timeout`).
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let (tx, rx) = watch::channel(false);
        let listen = &self.state.config.listen;
        let workers = Arc::new(
            workers::Workers::start(listen.workers, listen.batch_scheduling).map_err(Error::Runtime)?,
        );
        tracing::info!(workers = workers.count(), "serving connections");
        let mut tasks = Vec::new();
        for (socket, kind) in self.listeners {
            if let Ok(addr) = socket.local_addr() {
                tracing::info!(%addr, listener = kind.name(), "listening");
            }
            let workers = (!matches!(kind, listener::Kind::Admin)).then(|| workers.clone());
            tasks.push(tokio::spawn(listener::serve(socket, kind, self.state.clone(), workers, rx.clone())));
        }
        let reloader = tokio::spawn(reload::watch(self.state.clone()));
        shutdown.await;
        reloader.abort();
        tracing::info!("shutting down: no new connections, finishing requests in flight");
        let _ = tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        if let Some(workers) = Arc::into_inner(workers) {
            workers.stop().await;
        }
        drop(self.commands);
        tracing::info!("stopped");
        Ok(())
    }
}

/// Binds and serves `config` until `shutdown` resolves.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
    Gateway::bind(config).await?.serve(shutdown).await
}
