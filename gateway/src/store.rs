//! Everything the gateway remembers: sessions, remember tokens, one-time
//! values, user handles, passkeys, password hashes, flags, login history,
//! rate-limit counters and revocations.
//!
//! Two backends (`embedded://` file, `redis://` / `redis+cluster://`) provide the
//! primitives of [`Kv`]; the logic here is written once on top of them. Records
//! are versioned JSON (`"v": 1`) so a later version reads what an earlier wrote.
//! Secrets are keyed by their SHA-256 only.

mod embedded;
mod kv;
mod observed;
mod redis;
mod remote;
pub mod secret;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use kv::{Durability, Kv};
pub use observed::{StoreStats, BUCKETS as STORE_BUCKETS};
pub(crate) use redis::check_sentinel_url;
pub use redis::{RedisOptions, RedisTls};
pub use remote::CommandSocket;
pub use secret::{Secret, SecretHash};

/// Store failures. Callers fail closed: no store, no login.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store timed out")]
    Timeout,
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    #[error("store configuration: {0}")]
    Config(String),
    /// The embedded store's file, held by another process.
    #[error("{0}: in use by another process")]
    Locked(String),
    /// A command would make a new store (see [`Store::open_for_command`]).
    #[error("{0}")]
    NotCreated(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// How long a gateway's "running" mark on Redis outlives its last renewal.
const ALIVE_TTL: Duration = Duration::from_secs(30);

/// A store opened for a command, and whether a running gateway uses it.
#[derive(Debug)]
pub struct Opened {
    pub store: Store,
    pub gateway_running: bool,
}

/// Milliseconds since the Unix epoch: the store's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A session's key lives until the session ends.
fn session_ttl(session: &Session, now: u64) -> Duration {
    Duration::from_millis(session.ends_ms().saturating_sub(now).max(1))
}

const VERSION: u32 = 1;

fn version() -> u32 {
    VERSION
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    #[serde(default = "version")]
    pub v: u32,
    pub user: String,
    pub created_ms: u64,
    pub last_seen_ms: u64,
    /// Idle timeout: the session ends this long after `last_seen_ms`.
    pub idle_ms: u64,
    /// Absolute cap: the session ends at this time whatever happens.
    pub expires_ms: u64,
    /// When the person last proved who they are in a ceremony (sign-in or
    /// unlock); 0 for a session a remember token made, until they do.
    pub authenticated_ms: u64,
    /// Open unlock windows: (scope, until, in Unix seconds), one per route
    /// (or the gateway's admin pages), each bounded by its own maximum.
    #[serde(default)]
    pub unlocked: Vec<(String, u64)>,
    /// The client address the session was made from.
    pub ip: String,
    #[serde(default)]
    pub method: String,
    /// Must register a passkey before reaching anything else.
    #[serde(default)]
    pub must_register_passkey: bool,
}

impl Session {
    /// When the session ends if nothing touches it.
    pub fn ends_ms(&self) -> u64 {
        self.last_seen_ms.saturating_add(self.idle_ms).min(self.expires_ms)
    }
}

/// What a new session starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conditions {
    /// Made by a ceremony just now (link, passkey, password), not by a
    /// remember token.
    pub fresh: bool,
    /// The person must create a passkey before anything else.
    pub passkey_pending: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberToken {
    #[serde(default = "version")]
    pub v: u32,
    /// Public id, for listing and revoking (not the secret).
    pub id: String,
    pub user: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub last_used_ms: Option<u64>,
    pub last_ip: String,
    pub user_agent: String,
    /// The session it made last (the hash, hex): it ends when the token
    /// makes another.
    #[serde(default)]
    pub session: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PasskeyRecord {
    #[serde(default = "version")]
    pub v: u32,
    /// The credential id (base64url, as WebAuthn gives it).
    pub cred_id: String,
    pub name: String,
    pub created_ms: u64,
    pub last_used_ms: Option<u64>,
    /// The webauthn-rs `Passkey`, serialised; opaque to the store.
    pub passkey: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserFlags {
    #[serde(default = "version")]
    pub v: u32,
    /// Must register a passkey before anything else (admin-set or enforced).
    #[serde(default)]
    pub onboarding_required: bool,
    #[serde(default)]
    pub last_login_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    #[serde(default = "version")]
    pub v: u32,
    /// Random, so two identical events stay two entries.
    #[serde(default)]
    pub id: String,
    pub user: String,
    pub time_ms: u64,
    /// `passkey`, `link`, `password`, `one_time_password`, `basic`, …
    pub method: String,
    /// `success` or a failure reason.
    pub result: String,
    pub ip: String,
    pub user_agent: String,
}

/// The kinds of one-time values: each its own key space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OneTime {
    MagicLink,
    Invite,
    Ceremony,
    AdminPassword,
}

impl OneTime {
    fn tag(self) -> &'static str {
        match self {
            Self::MagicLink => "link",
            Self::Invite => "invite",
            Self::Ceremony => "ceremony",
            Self::AdminPassword => "otp",
        }
    }
}

/// Something revoked that other gateway instances must forget from their caches.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Revocation {
    Session(SecretHash),
    Token(SecretHash),
    /// Every session and token of a user.
    User(String),
}

impl Revocation {
    fn encode(&self) -> String {
        match self {
            Self::Session(h) => format!("s:{h}"),
            Self::Token(h) => format!("t:{h}"),
            Self::User(u) => format!("u:{u}"),
        }
    }

    fn decode(text: &str) -> Option<Self> {
        let (kind, rest) = text.split_once(':')?;
        // Entries carry a random suffix (after '|') so repeats are distinct members.
        let rest = rest.rsplit_once('|').map_or(rest, |(r, _)| r);
        Some(match kind {
            "s" => Self::Session(SecretHash::from_hex(rest)?),
            "t" => Self::Token(SecretHash::from_hex(rest)?),
            "u" => Self::User(rest.to_string()),
            _ => return None,
        })
    }
}

/// Why a passkey could not be added.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddPasskeyError {
    #[error("this credential is already registered")]
    Duplicate,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How long revocations are kept for other instances to pick up.
const REVOCATION_WINDOW: Duration = Duration::from_secs(120);

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    kv: Arc<dyn Kv>,
    prefix: Arc<str>,
    backend: &'static str,
    stats: Arc<StoreStats>,
    cache: Arc<SessionCache>,
    /// The embedded store's file, when this process holds it.
    file: Option<Arc<std::path::Path>>,
}

/// Sessions read recently, so most requests cost no store round trip.
/// Entries live at most [`CACHE_TTL_MS`] (and a tenth of the idle timeout);
/// any write or delete here evicts them, and other instances' revocations
/// arrive through [`Store::watch_revocations`] within a second. Half-way
/// through an entry's life one request starts reading it again in the
/// background: the many requests of a busy session never all miss together.
#[derive(Default)]
struct SessionCache {
    entries: std::sync::Mutex<Entries>,
    /// Reads from the store under way, one per session: a page's burst of
    /// requests after a pause shares one read (and its outcome, an error too)
    /// instead of each going to the store.
    reading: std::sync::Mutex<std::collections::HashMap<SecretHash, Arc<SharedRead>, Prehashed>>,
}

type SharedRead = tokio::sync::OnceCell<Result<Option<Arc<Session>>>>;

#[derive(Default)]
struct Entries {
    map: std::collections::HashMap<SecretHash, Cached, Prehashed>,
    /// Counts evictions: a read from the store that began before one must
    /// not put back what was evicted while it was under way.
    evictions: u64,
}

struct Cached {
    session: Arc<Session>,
    fetched: u64,
    refreshing: bool,
}

/// What the cache holds for a session.
enum Lookup {
    Fresh(Arc<Session>),
    /// Still good, and due to be read again: the caller is the one to do it.
    Refresh(Arc<Session>),
    Miss,
}

/// The cache's keys are SHA-256 digests already: hashing them again
/// (SipHash) cost more than the rest of a cache hit. Their first eight bytes
/// are as good a hash, and nobody chooses them.
#[derive(Default, Clone, Copy)]
struct Prehashed;

impl std::hash::BuildHasher for Prehashed {
    type Hasher = PrehashedHasher;
    fn build_hasher(&self) -> PrehashedHasher {
        PrehashedHasher(0)
    }
}

struct PrehashedHasher(u64);

impl std::hash::Hasher for PrehashedHasher {
    fn write(&mut self, bytes: &[u8]) {
        // `SecretHash` hashes as one `u64` (below); other keys still work.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = word;
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

const CACHE_TTL_MS: u64 = 2_000;
const CACHE_MAX: usize = 100_000;
const REVOCATION_POLL: Duration = Duration::from_millis(250);

impl SessionCache {
    fn get(&self, hash: &SecretHash, now: u64) -> Lookup {
        let Ok(mut entries) = self.entries.lock() else { return Lookup::Miss };
        let Some(cached) = entries.map.get_mut(hash) else { return Lookup::Miss };
        let life = CACHE_TTL_MS.min(cached.session.idle_ms / 10);
        let age = now.saturating_sub(cached.fetched);
        if age >= life || cached.session.ends_ms() <= now {
            return Lookup::Miss;
        }
        if age >= life / 2 && !cached.refreshing {
            cached.refreshing = true;
            return Lookup::Refresh(cached.session.clone());
        }
        Lookup::Fresh(cached.session.clone())
    }

    /// The read under way for this session, or a new one to start.
    fn read_for(&self, hash: &SecretHash) -> Arc<SharedRead> {
        match self.reading.lock() {
            Ok(mut reading) => reading.entry(*hash).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    fn read_done(&self, hash: &SecretHash) {
        if let Ok(mut reading) = self.reading.lock() {
            reading.remove(hash);
        }
    }

    /// Where evictions stand before a read from the store, for [`Self::put`].
    fn evictions(&self) -> u64 {
        self.entries.lock().map_or(u64::MAX, |entries| entries.evictions)
    }

    /// Caches `session` as read from the store, unless something was evicted
    /// since the read began (`evictions`): it may have been this session.
    fn put(&self, hash: &SecretHash, session: &Arc<Session>, now: u64, evictions: u64) {
        let Ok(mut entries) = self.entries.lock() else { return };
        if entries.evictions != evictions {
            return;
        }
        if entries.map.len() >= CACHE_MAX {
            entries.map.retain(|_, cached| now.saturating_sub(cached.fetched) < CACHE_TTL_MS);
            if entries.map.len() >= CACHE_MAX {
                return;
            }
        }
        let cached = Cached { session: session.clone(), fetched: now, refreshing: false };
        entries.map.insert(*hash, cached);
    }

    fn evict(&self, hash: &SecretHash) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.evictions += 1;
            entries.map.remove(hash);
        }
    }

    fn evict_user(&self, user: &str) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.evictions += 1;
            entries.map.retain(|_, cached| cached.session.user != user);
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("backend", &self.backend).field("prefix", &self.prefix).finish()
    }
}

impl Store {
    /// Opens the backend named by `url`: `embedded://PATH`, `redis://…`,
    /// `rediss://…`, `redis+cluster://host:port,host:port` (or `rediss+cluster://`),
    /// `redis+sentinel://host:port,host:port/master-name`.
    /// A relative embedded path is relative to `base`.
    pub async fn open(url: &str, prefix: &str, base: &std::path::Path) -> Result<Self> {
        Self::open_with(url, prefix, base, &RedisOptions::default()).await
    }

    /// The store `config` names (`[store]`); a relative `embedded://` path is
    /// relative to `state_directory`.
    pub async fn open_configured(config: &crate::config::Config) -> Result<Self> {
        Self::open_with(
            &config.store.url,
            &config.store.key_prefix,
            &config.state_directory,
            &config.store.redis,
        )
        .await
    }

    /// The file of an `embedded://` store, resolved as [`Store::open_configured`] does.
    pub fn embedded_file(config: &crate::config::Config) -> Option<std::path::PathBuf> {
        let path = std::path::Path::new(config.store.url.strip_prefix("embedded://")?);
        Some(if path.is_absolute() { path.to_path_buf() } else { config.state_directory.join(path) })
    }

    /// [`Store::open_configured`] for a command (`pbxgate user …`): when a
    /// running gateway holds the embedded store, through that gateway.
    ///
    /// A store no gateway has ever used is refused unless `create`: a typo in
    /// the URL, or a configuration other than the service's, would otherwise
    /// make a new, empty store that no gateway reads. The [`Opened`] says
    /// whether a running gateway uses the store.
    pub async fn open_for_command(config: &crate::config::Config, create: bool) -> Result<Opened> {
        let shown = crate::config::redact(&config.store.url);
        if let Some(file) = Self::embedded_file(config) {
            if !file.exists() && !create {
                return Err(StoreError::NotCreated(format!(
                    "no store at {} (store.url {shown:?}, state_directory {}): no gateway has used it",
                    file.display(),
                    config.state_directory.display()
                )));
            }
        }
        let store = match Self::open_configured(config).await {
            Err(StoreError::Locked(file)) => {
                let socket = remote::socket_path(std::path::Path::new(&file));
                if !socket.exists() {
                    return Err(StoreError::Locked(file));
                }
                let store =
                    Self::through_gateway(std::path::Path::new(&file), &config.store.key_prefix).await?;
                return Ok(Opened { store, gateway_running: true });
            }
            opened => opened?,
        };
        if store.file.is_none() && !create && !store.in_use_marked().await? {
            return Err(StoreError::NotCreated(format!(
                "{shown} holds no pbxgate store under key_prefix {:?}: no gateway has used it",
                config.store.key_prefix
            )));
        }
        if create {
            store.mark_in_use().await?;
        }
        let gateway_running = store.file.is_none() && store.gateway_alive().await?;
        Ok(Opened { store, gateway_running })
    }

    /// Marks the store as one a gateway uses (kept for good) and, with Redis,
    /// keeps saying that this gateway is running while the process lives.
    pub async fn mark_in_use(&self) -> Result<()> {
        self.kv.set_nx(&self.key(&["store", "created"]), now_ms().to_string().as_bytes(), None).await?;
        Ok(())
    }

    async fn in_use_marked(&self) -> Result<bool> {
        Ok(self.kv.get(&self.key(&["store", "created"])).await?.is_some())
    }

    /// Tells `pbxgate` commands on Redis that a gateway runs on this store:
    /// a key that lives [`ALIVE_TTL`] and is renewed well before it ends.
    /// (The embedded store's lock says as much by itself.)
    pub fn announce_running(&self) {
        if self.file.is_some() || self.backend != "redis" {
            return;
        }
        // Ends with the gateway: it holds the only strong reference to its cache.
        let alive = Arc::downgrade(&self.cache);
        let store = Store { cache: Arc::new(SessionCache::default()), ..self.clone() };
        tokio::spawn(async move {
            let key = store.key(&["store", "alive"]);
            while alive.upgrade().is_some() {
                let _ = store.kv.set(&key, b"1", Some(ALIVE_TTL), Durability::Lazy).await;
                tokio::time::sleep(ALIVE_TTL / 3).await;
            }
        });
    }

    async fn gateway_alive(&self) -> Result<bool> {
        Ok(self.kv.get(&self.key(&["store", "alive"])).await?.is_some())
    }

    /// The embedded store in `file`, held by a running gateway, through the
    /// socket it answers on ([`Store::serve_commands`]).
    pub async fn through_gateway(file: &std::path::Path, prefix: &str) -> Result<Self> {
        let kv = Arc::new(remote::RemoteKv::new(remote::socket_path(file)));
        let store = Self::with_kv(kv, prefix, "embedded", None);
        store.ping().await?;
        Ok(store)
    }

    /// [`Store::open`], with `options` for a Redis URL (TLS files, the
    /// sentinels' credentials).
    pub async fn open_with(
        url: &str,
        prefix: &str,
        base: &std::path::Path,
        options: &RedisOptions,
    ) -> Result<Self> {
        if let Some(path) = url.strip_prefix("embedded://") {
            let path = std::path::Path::new(path);
            let path = if path.is_absolute() { path.to_path_buf() } else { base.join(path) };
            let kv = Arc::new(embedded::EmbeddedKv::open(&path).await?);
            Ok(Self::with_kv(kv, prefix, "embedded", Some(path.into())))
        } else {
            Ok(Self::with_kv(Arc::new(redis::RedisKv::connect(url, options).await?), prefix, "redis", None))
        }
    }

    fn with_kv(
        kv: Arc<dyn Kv>,
        prefix: &str,
        backend: &'static str,
        file: Option<Arc<std::path::Path>>,
    ) -> Self {
        let stats = Arc::new(StoreStats::default());
        let kv = Arc::new(observed::Observed { inner: kv, stats: stats.clone() });
        Self { kv, prefix: prefix.into(), backend, stats, cache: Arc::default(), file }
    }

    /// With the embedded store: answers `pbxgate` commands on a socket next
    /// to its file while this process holds it (see [`remote`]).
    pub fn serve_commands(&self) -> Option<std::io::Result<CommandSocket>> {
        let file = self.file.as_ref()?;
        Some(remote::listen(self.kv.clone(), remote::socket_path(file)))
    }

    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// Calls, failures and latency of this store, for `/metrics`.
    pub fn stats(&self) -> &StoreStats {
        &self.stats
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut key =
            String::with_capacity(self.prefix.len() + parts.iter().map(|p| p.len() + 1).sum::<usize>());
        key.push_str(&self.prefix);
        for (i, part) in parts.iter().enumerate() {
            if i > 0 {
                key.push(':');
            }
            key.push_str(part);
        }
        key
    }

    /// `hash`: a session's [`SecretHash`], hex (as the per-user index holds them).
    fn session_key(&self, hash: &str) -> String {
        self.key(&["s", hash])
    }

    /// Per-user keys share a Redis Cluster hash tag, so they live on one node.
    fn user_key(&self, kind: &str, user: &str) -> String {
        self.key(&[kind, &format!("{{{user}}}")])
    }

    pub async fn ping(&self) -> Result<()> {
        self.kv.ping().await
    }

    // ---- sessions -------------------------------------------------------

    /// Starts a session for a person who has just proved who they are, with
    /// nothing pending.
    pub async fn create_session(
        &self,
        user: &str,
        ip: &str,
        method: &str,
        idle: Duration,
        max_lifetime: Duration,
        now: u64,
    ) -> Result<(Secret, Session)> {
        let fresh = Conditions { fresh: true, passkey_pending: false };
        self.start_session(user, ip, method, fresh, idle, max_lifetime, now).await
    }

    /// Starts a session with its conditions set from the first write (no
    /// moment exists where it is live without them); the secret goes into
    /// the cookie, only its hash is stored.
    #[allow(clippy::too_many_arguments)]
    pub async fn start_session(
        &self,
        user: &str,
        ip: &str,
        method: &str,
        conditions: Conditions,
        idle: Duration,
        max_lifetime: Duration,
        now: u64,
    ) -> Result<(Secret, Session)> {
        let secret = Secret::generate();
        let hash = secret.hash();
        let session = Session {
            v: VERSION,
            user: user.to_string(),
            created_ms: now,
            last_seen_ms: now,
            idle_ms: ms(idle),
            expires_ms: now.saturating_add(ms(max_lifetime)),
            authenticated_ms: if conditions.fresh { now } else { 0 },
            unlocked: Vec::new(),
            ip: ip.to_string(),
            method: method.to_string(),
            must_register_passkey: conditions.passkey_pending,
        };
        let key = self.session_key(&hash.hex());
        self.kv.set(&key, &encode(&session)?, Some(session_ttl(&session, now)), Durability::Durable).await?;
        self.kv.set_add(&self.user_key("us", user), &hash.hex()).await?;
        Ok((secret, session))
    }

    /// The session for a request: from the in-process cache when fresh,
    /// else read (and its idle timeout slid) from the store. A cached session
    /// half-way through its time in the cache is read again in the
    /// background while this request goes on with it.
    pub async fn current_session(&self, hash: &SecretHash, now: u64) -> Result<Option<Arc<Session>>> {
        match self.cached_session(hash, now) {
            Some(session) => Ok(Some(session)),
            // Boxed: a miss is rare under load, and its future would
            // otherwise be part of (and copied with) every request's.
            None => Box::pin(self.read_shared(hash, now)).await,
        }
    }

    /// The session from the in-process cache, when fresh there.
    fn cached_session(&self, hash: &SecretHash, now: u64) -> Option<Arc<Session>> {
        match self.cache.get(hash, now) {
            Lookup::Fresh(session) => Some(session),
            Lookup::Refresh(session) => {
                let (store, hash) = (self.clone(), *hash);
                tokio::spawn(async move {
                    // On failure the entry runs out, and the next request
                    // meets the store's error itself (and fails closed).
                    if let Err(error) = store.read_session_into_cache(&hash, now_ms()).await {
                        tracing::debug!(%error, "session refresh failed");
                    }
                });
                Some(session)
            }
            Lookup::Miss => None,
        }
    }

    /// Reads the session from the store into the cache, one read shared by
    /// the requests that miss together.
    async fn read_shared(&self, hash: &SecretHash, now: u64) -> Result<Option<Arc<Session>>> {
        let read = self.cache.read_for(hash);
        let outcome = read
            .get_or_init(|| async {
                let outcome = self.read_session_into_cache(hash, now).await;
                // Requests from now on read afresh (those waiting share this).
                self.cache.read_done(hash);
                outcome
            })
            .await;
        outcome.clone()
    }

    async fn read_session_into_cache(&self, hash: &SecretHash, now: u64) -> Result<Option<Arc<Session>>> {
        let evictions = self.cache.evictions();
        let session = self.touch_session(hash, now).await?.map(Arc::new);
        match &session {
            Some(s) => self.cache.put(hash, s, now, evictions),
            None => self.cache.evict(hash),
        }
        Ok(session)
    }

    /// Forgets what other instances revoked, polling the store's revocation
    /// list until the store is dropped.
    pub fn watch_revocations(&self) {
        let cache = Arc::downgrade(&self.cache);
        let store = Store { cache: Arc::new(SessionCache::default()), ..self.clone() };
        tokio::spawn(async move {
            let mut since = now_ms();
            loop {
                tokio::time::sleep(REVOCATION_POLL).await;
                let Some(cache) = cache.upgrade() else { return };
                let now = now_ms();
                // Overlap a little: clocks of instances differ slightly.
                if let Ok(revoked) = store.revoked_since(since.saturating_sub(1_000)).await {
                    for (what, _) in revoked {
                        match what {
                            Revocation::Session(hash) => cache.evict(&hash),
                            Revocation::User(user) => cache.evict_user(&user),
                            Revocation::Token(_) => {}
                        }
                    }
                    since = now;
                }
            }
        });
    }

    /// Writes `session` over the record read as `stored`, only if that is
    /// still what the store holds: a sign-out or another change made in
    /// between wins (false), and nothing signed out comes back.
    async fn rewrite_session(
        &self,
        hash: &SecretHash,
        stored: &[u8],
        session: &Session,
        now: u64,
        d: Durability,
    ) -> Result<bool> {
        let key = self.session_key(&hash.hex());
        self.kv.set_if_unchanged(&key, stored, &encode(session)?, session_ttl(session, now), d).await
    }

    /// Reads a session without touching it.
    pub async fn session(&self, hash: &SecretHash, now: u64) -> Result<Option<Session>> {
        Ok(self.session_as_stored(hash, now).await?.map(|(session, _)| session))
    }

    /// A live session and its bytes as stored (what a rewrite compares with).
    async fn session_as_stored(&self, hash: &SecretHash, now: u64) -> Result<Option<(Session, Vec<u8>)>> {
        let Some(stored) = self.kv.get(&self.session_key(&hash.hex())).await? else { return Ok(None) };
        let session: Session = decode(&stored)?;
        Ok((session.ends_ms() > now).then_some((session, stored)))
    }

    /// Reads a live session and slides its idle timeout (never past the cap).
    /// The write is skipped while the last one is recent (a tenth of the idle
    /// timeout, at most 15 s): a busy page does not cost a store write per click.
    pub async fn touch_session(&self, hash: &SecretHash, now: u64) -> Result<Option<Session>> {
        let Some((mut session, stored)) = self.session_as_stored(hash, now).await? else {
            return Ok(None);
        };
        if now.saturating_sub(session.last_seen_ms) < (session.idle_ms / 10).min(15_000) {
            return Ok(Some(session));
        }
        session.last_seen_ms = now;
        // Not evicted from the cache: only the time seen changes, and the
        // caller caches what was written. Changed meanwhile: what is there now.
        match self.rewrite_session(hash, &stored, &session, now, Durability::Lazy).await? {
            true => Ok(Some(session)),
            false => self.session(hash, now).await,
        }
    }

    /// Records a fresh proof of identity and opens the unlock window of
    /// `scope` until `until` (Unix seconds); windows already over are dropped.
    pub async fn unlock(&self, hash: &SecretHash, scope: &str, until: u64, now: u64) -> Result<bool> {
        self.update_session(hash, now, |session| {
            session.unlocked.retain(|(s, end)| s != scope && *end > now / 1000);
            session.unlocked.push((scope.to_string(), until));
            session.authenticated_ms = now;
            session.last_seen_ms = now;
        })
        .await
    }

    /// Ends every unlock window of the session at once ("Lock now").
    pub async fn lock(&self, hash: &SecretHash, now: u64) -> Result<bool> {
        self.update_session(hash, now, |session| {
            session.unlocked.clear();
            session.last_seen_ms = now;
        })
        .await
    }

    /// Changes a live session's record; false when it is gone. The change is
    /// made again on what the store holds if that changed in between (a
    /// request sliding the idle timeout), so neither write is lost.
    pub async fn update_session(
        &self,
        hash: &SecretHash,
        now: u64,
        change: impl Fn(&mut Session),
    ) -> Result<bool> {
        for _ in 0..5 {
            let Some((mut session, stored)) = self.session_as_stored(hash, now).await? else {
                return Ok(false);
            };
            change(&mut session);
            let written = self.rewrite_session(hash, &stored, &session, now, Durability::Durable).await;
            // After the write: a read under way puts nothing back, the next one sees the change.
            self.cache.evict(hash);
            if written? {
                return Ok(true);
            }
        }
        Err(StoreError::Unavailable("session changed under every attempt to change it".into()))
    }

    pub async fn delete_session(&self, hash: &SecretHash) -> Result<bool> {
        let key = self.session_key(&hash.hex());
        let session: Option<Session> = decode_opt(self.kv.get(&key).await?)?;
        let deleted = self.kv.del(&[key]).await;
        // After the delete: a read under way meanwhile puts nothing back.
        self.cache.evict(hash);
        let existed = deleted? > 0;
        if let Some(s) = session {
            self.kv.set_remove(&self.user_key("us", &s.user), &[hash.hex()]).await?;
        }
        self.revoke(Revocation::Session(*hash)).await?;
        Ok(existed)
    }

    /// The user's live sessions (stale index entries are cleaned on the way).
    pub async fn sessions_of(&self, user: &str, now: u64) -> Result<Vec<(SecretHash, Session)>> {
        let index = self.user_key("us", user);
        let mut live = Vec::new();
        let mut stale = Vec::new();
        for member in self.kv.set_members(&index).await? {
            let Some(hash) = SecretHash::from_hex(&member) else {
                stale.push(member);
                continue;
            };
            match self.session(&hash, now).await? {
                Some(s) => live.push((hash, s)),
                None => stale.push(member),
            }
        }
        if !stale.is_empty() {
            self.kv.set_remove(&index, &stale).await?;
        }
        live.sort_by_key(|(_, x)| std::cmp::Reverse(x.created_ms));
        Ok(live)
    }

    /// Ends every session of a user; returns how many were live.
    pub async fn delete_sessions_of(&self, user: &str) -> Result<u64> {
        let index = self.user_key("us", user);
        let members = self.kv.set_members(&index).await?;
        let keys: Vec<String> = members.iter().map(|m| self.session_key(m)).collect();
        let deleted = if keys.is_empty() { Ok(0) } else { self.kv.del(&keys).await };
        // After the delete: a read under way meanwhile puts nothing back.
        self.cache.evict_user(user);
        let n = deleted?;
        self.kv.del(&[index]).await?;
        self.revoke(Revocation::User(user.to_string())).await?;
        Ok(n)
    }

    // ---- remember tokens -----------------------------------------------

    pub async fn create_token(
        &self,
        user: &str,
        ip: &str,
        user_agent: &str,
        ttl: Duration,
        now: u64,
    ) -> Result<(Secret, RememberToken)> {
        self.issue_token(user, ip, user_agent, ttl, None, now).await
    }

    /// A remember token issued beside `session` at a sign-in: revoking the
    /// token ends that session too.
    pub async fn create_token_for(
        &self,
        session: &SecretHash,
        user: &str,
        ip: &str,
        user_agent: &str,
        ttl: Duration,
        now: u64,
    ) -> Result<(Secret, RememberToken)> {
        self.issue_token(user, ip, user_agent, ttl, Some(session), now).await
    }

    async fn issue_token(
        &self,
        user: &str,
        ip: &str,
        user_agent: &str,
        ttl: Duration,
        session: Option<&SecretHash>,
        now: u64,
    ) -> Result<(Secret, RememberToken)> {
        let secret = Secret::generate();
        let hash = secret.hash();
        let token = RememberToken {
            v: VERSION,
            id: secret::hex(&secret::random::<8>()),
            user: user.to_string(),
            created_ms: now,
            expires_ms: now.saturating_add(ms(ttl)),
            last_used_ms: None,
            last_ip: ip.to_string(),
            user_agent: truncate(user_agent, 256),
            session: session.map(SecretHash::hex),
        };
        let ttl = Some(ttl.max(Duration::from_millis(1)));
        self.kv.set(&self.key(&["t", &hash.hex()]), &encode(&token)?, ttl, Durability::Durable).await?;
        self.kv.set(&self.key(&["tid", &token.id]), hash.hex().as_bytes(), ttl, Durability::Durable).await?;
        self.kv.set_add(&self.user_key("ut", user), &hash.hex()).await?;
        Ok((secret, token))
    }

    pub async fn token(&self, hash: &SecretHash, now: u64) -> Result<Option<RememberToken>> {
        let token: Option<RememberToken> = decode_opt(self.kv.get(&self.key(&["t", &hash.hex()])).await?)?;
        Ok(token.filter(|t| t.expires_ms > now))
    }

    /// Records that the token made `session` (the expiry stays fixed from
    /// creation). Written only over the record as read, so a revoked token
    /// never comes back: false when it is gone.
    pub async fn record_token_use(
        &self,
        hash: &SecretHash,
        ip: &str,
        user_agent: &str,
        session: &SecretHash,
        now: u64,
    ) -> Result<bool> {
        let key = self.key(&["t", &hash.hex()]);
        for _ in 0..5 {
            let Some(stored) = self.kv.get(&key).await? else { return Ok(false) };
            let mut token: RememberToken = decode(&stored)?;
            if token.expires_ms <= now {
                return Ok(false);
            }
            token.last_used_ms = Some(now);
            token.last_ip = ip.to_string();
            token.user_agent = truncate(user_agent, 256);
            token.session = Some(session.hex());
            let ttl = Duration::from_millis(token.expires_ms.saturating_sub(now).max(1));
            if self.kv.set_if_unchanged(&key, &stored, &encode(&token)?, ttl, Durability::Durable).await? {
                return Ok(true);
            }
        }
        Err(StoreError::Unavailable("token changed under every attempt to record its use".into()))
    }

    pub async fn tokens_of(&self, user: &str, now: u64) -> Result<Vec<(SecretHash, RememberToken)>> {
        let index = self.user_key("ut", user);
        let mut live = Vec::new();
        let mut stale = Vec::new();
        for member in self.kv.set_members(&index).await? {
            match SecretHash::from_hex(&member) {
                Some(hash) => match self.token(&hash, now).await? {
                    Some(t) => live.push((hash, t)),
                    None => stale.push(member),
                },
                None => stale.push(member),
            }
        }
        if !stale.is_empty() {
            self.kv.set_remove(&index, &stale).await?;
        }
        live.sort_by_key(|(_, x)| std::cmp::Reverse(x.created_ms));
        Ok(live)
    }

    /// Revokes a token by its public id, and ends the session it made last
    /// (a revoked laptop is signed out, not left in for the session's life);
    /// returns its owner when it existed.
    pub async fn revoke_token(&self, id: &str) -> Result<Option<String>> {
        let Some(hash) = self.kv.get(&self.key(&["tid", id])).await? else {
            return Ok(None);
        };
        let Some(hash) = SecretHash::from_hex(&String::from_utf8_lossy(&hash)) else {
            return Err(StoreError::Corrupt(format!("token index {id}")));
        };
        let token: Option<RememberToken> = decode_opt(self.kv.get(&self.key(&["t", &hash.hex()])).await?)?;
        self.kv.del(&[self.key(&["t", &hash.hex()]), self.key(&["tid", id])]).await?;
        if let Some(t) = &token {
            self.kv.set_remove(&self.user_key("ut", &t.user), &[hash.hex()]).await?;
        }
        self.revoke(Revocation::Token(hash)).await?;
        if let Some(session) =
            token.as_ref().and_then(|t| t.session.as_deref()).and_then(SecretHash::from_hex)
        {
            self.delete_session(&session).await?;
        }
        Ok(token.map(|t| t.user))
    }

    pub async fn revoke_tokens_of(&self, user: &str, now: u64) -> Result<u64> {
        let tokens = self.tokens_of(user, now).await?;
        let mut keys = Vec::with_capacity(tokens.len() * 2 + 1);
        for (hash, token) in &tokens {
            keys.push(self.key(&["t", &hash.hex()]));
            keys.push(self.key(&["tid", &token.id]));
        }
        keys.push(self.user_key("ut", user));
        self.kv.del(&keys).await?;
        self.revoke(Revocation::User(user.to_string())).await?;
        Ok(tokens.len() as u64)
    }

    // ---- one-time values -------------------------------------------------

    /// Stores `value` under the hash of `secret`, for `ttl`.
    pub async fn put_once(&self, kind: OneTime, secret: &Secret, value: &[u8], ttl: Duration) -> Result<()> {
        let key = self.key(&["once", kind.tag(), secret.hash().hex().as_str()]);
        self.kv.set(&key, value, Some(ttl.max(Duration::from_millis(1))), Durability::Durable).await
    }

    /// Takes the value exactly once: of any number of concurrent takers, one gets it.
    pub async fn take_once(&self, kind: OneTime, secret: &Secret) -> Result<Option<Vec<u8>>> {
        self.kv.take(&self.key(&["once", kind.tag(), secret.hash().hex().as_str()])).await
    }

    // ---- user handles ------------------------------------------------------

    /// The user's stable WebAuthn user handle (a UUID), made on first use.
    pub async fn user_handle(&self, user: &str) -> Result<String> {
        let key = self.key(&["uh", user]);
        if let Some(existing) = self.kv.get(&key).await? {
            return Ok(String::from_utf8_lossy(&existing).into_owned());
        }
        let fresh = secret::uuid_v4();
        if self.kv.set_nx(&key, fresh.as_bytes(), None).await? {
            self.kv.set(&self.key(&["hu", &fresh]), user.as_bytes(), None, Durability::Durable).await?;
            return Ok(fresh);
        }
        // Another request made it first: use theirs.
        let existing =
            self.kv.get(&key).await?.ok_or_else(|| StoreError::Corrupt(format!("user handle of {user}")))?;
        Ok(String::from_utf8_lossy(&existing).into_owned())
    }

    /// The user a handle belongs to (discoverable passkey login).
    pub async fn user_by_handle(&self, handle: &str) -> Result<Option<String>> {
        Ok(self.kv.get(&self.key(&["hu", handle])).await?.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    // ---- passkeys ----------------------------------------------------------

    /// Adds a passkey. A credential id is registered to one account only.
    pub async fn add_passkey(
        &self,
        user: &str,
        record: &PasskeyRecord,
    ) -> std::result::Result<(), AddPasskeyError> {
        let owner_key = self.key(&["cred", &record.cred_id]);
        if !self.kv.set_nx(&owner_key, user.as_bytes(), None).await? {
            return Err(AddPasskeyError::Duplicate);
        }
        if let Err(e) = self.kv.hash_put(&self.user_key("pk", user), &record.cred_id, &encode(record)?).await
        {
            let _ = self.kv.del(&[owner_key]).await;
            return Err(e.into());
        }
        Ok(())
    }

    pub async fn passkeys_of(&self, user: &str) -> Result<Vec<PasskeyRecord>> {
        let mut records = self
            .kv
            .hash_all(&self.user_key("pk", user))
            .await?
            .into_iter()
            .map(|(_, bytes)| decode::<PasskeyRecord>(&bytes))
            .collect::<Result<Vec<_>>>()?;
        records.sort_by_key(|r| r.created_ms);
        Ok(records)
    }

    pub async fn passkey(&self, user: &str, cred_id: &str) -> Result<Option<PasskeyRecord>> {
        decode_opt(self.kv.hash_get(&self.user_key("pk", user), cred_id).await?)
    }

    pub async fn passkey_owner(&self, cred_id: &str) -> Result<Option<String>> {
        Ok(self
            .kv
            .get(&self.key(&["cred", cred_id]))
            .await?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    pub async fn passkey_count(&self, user: &str) -> Result<u64> {
        self.kv.hash_len(&self.user_key("pk", user)).await
    }

    pub async fn rename_passkey(&self, user: &str, cred_id: &str, name: &str) -> Result<bool> {
        let Some(mut record) = self.passkey(user, cred_id).await? else {
            return Ok(false);
        };
        record.name = truncate(name.trim(), 64);
        self.kv.hash_put(&self.user_key("pk", user), cred_id, &encode(&record)?).await?;
        Ok(true)
    }

    /// After a login: the updated passkey (counter, backup state) and its last use.
    pub async fn update_passkey(
        &self,
        user: &str,
        cred_id: &str,
        passkey: Option<serde_json::Value>,
        now: u64,
    ) -> Result<bool> {
        let Some(mut record) = self.passkey(user, cred_id).await? else {
            return Ok(false);
        };
        if let Some(p) = passkey {
            record.passkey = p;
        }
        record.last_used_ms = Some(now);
        self.kv.hash_put(&self.user_key("pk", user), cred_id, &encode(&record)?).await?;
        Ok(true)
    }

    pub async fn delete_passkey(&self, user: &str, cred_id: &str) -> Result<bool> {
        let removed = self.kv.hash_remove(&self.user_key("pk", user), cred_id).await?;
        if removed {
            self.kv.del(&[self.key(&["cred", cred_id])]).await?;
        }
        Ok(removed)
    }

    pub async fn delete_passkeys_of(&self, user: &str) -> Result<u64> {
        let records = self.passkeys_of(user).await?;
        let mut keys: Vec<String> = records.iter().map(|r| self.key(&["cred", &r.cred_id])).collect();
        keys.push(self.user_key("pk", user));
        self.kv.del(&keys).await?;
        Ok(records.len() as u64)
    }

    // ---- passwords and flags ---------------------------------------------

    pub async fn set_password_hash(&self, user: &str, phc: &str) -> Result<()> {
        self.kv.set(&self.key(&["pw", user]), phc.as_bytes(), None, Durability::Durable).await
    }

    pub async fn password_hash(&self, user: &str) -> Result<Option<String>> {
        Ok(self.kv.get(&self.key(&["pw", user])).await?.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    pub async fn clear_password(&self, user: &str) -> Result<bool> {
        Ok(self.kv.del(&[self.key(&["pw", user])]).await? > 0)
    }

    pub async fn flags(&self, user: &str) -> Result<UserFlags> {
        Ok(decode_opt(self.kv.get(&self.key(&["flags", user])).await?)?.unwrap_or_default())
    }

    pub async fn set_flags(&self, user: &str, flags: &UserFlags) -> Result<()> {
        self.kv.set(&self.key(&["flags", user]), &encode(flags)?, None, Durability::Durable).await
    }

    // ---- login history ----------------------------------------------------

    /// Appends an event and drops those older than `retention`.
    pub async fn append_history(&self, event: &HistoryEvent, retention: Duration, now: u64) -> Result<()> {
        let mut event = event.clone();
        if event.id.is_empty() {
            event.id = secret::hex(&secret::random::<8>());
        }
        let key = self.key(&["history"]);
        let member = String::from_utf8(encode(&event)?).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        self.kv.zset_add(&key, event.time_ms, &member).await?;
        self.kv.zset_trim(&key, now.saturating_sub(ms(retention))).await
    }

    /// Newest first; only `user`'s when given; only within `retention`.
    pub async fn history(
        &self,
        user: Option<&str>,
        retention: Duration,
        limit: usize,
        now: u64,
    ) -> Result<Vec<HistoryEvent>> {
        let min = now.saturating_sub(ms(retention));
        let fetch = if user.is_some() { limit.saturating_mul(20).max(1000) } else { limit };
        let mut out = Vec::new();
        for (member, _) in self.kv.zset_newest(&self.key(&["history"]), min, fetch).await? {
            let event: HistoryEvent = decode(member.as_bytes())?;
            if user.is_none_or(|u| u == event.user) {
                out.push(event);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    // ---- shared gateway material ------------------------------------------

    /// A value all instances share (e.g. the assertion signing key): the first
    /// instance to ask makes it, everyone reads the same one.
    pub async fn get_or_init(&self, name: &str, make: impl FnOnce() -> Vec<u8>) -> Result<Vec<u8>> {
        let key = self.key(&["shared", name]);
        if let Some(existing) = self.kv.get(&key).await? {
            return Ok(existing);
        }
        self.kv.set_nx(&key, &make(), None).await?;
        self.kv.get(&key).await?.ok_or_else(|| StoreError::Corrupt(format!("shared value {name}")))
    }

    // ---- rate-limit counters ----------------------------------------------

    /// Counts one event for `key` within a window that starts at the first one.
    pub async fn hit(&self, key: &str, window: Duration) -> Result<u64> {
        self.kv.incr_window(&self.key(&["rl", key]), window).await
    }

    /// Starts `key`'s count again.
    pub async fn forget_hits(&self, key: &str) -> Result<()> {
        self.kv.del(&[self.key(&["rl", key])]).await.map(drop)
    }

    pub async fn hits(&self, key: &str) -> Result<u64> {
        Ok(self
            .kv
            .get(&self.key(&["rl", key]))
            .await?
            .and_then(|b| String::from_utf8_lossy(&b).trim().parse().ok())
            .unwrap_or(0))
    }

    // ---- revocations, for other instances' caches ------------------------

    async fn revoke(&self, what: Revocation) -> Result<()> {
        let now = now_ms();
        let key = self.key(&["revoked"]);
        let member = format!("{}|{}", what.encode(), secret::hex(&secret::random::<4>()));
        self.kv.zset_add(&key, now, &member).await?;
        self.kv.zset_trim(&key, now.saturating_sub(ms(REVOCATION_WINDOW))).await
    }

    /// Revocations at or after `since_ms` (any instance's), oldest last.
    pub async fn revoked_since(&self, since_ms: u64) -> Result<Vec<(Revocation, u64)>> {
        Ok(self
            .kv
            .zset_newest(&self.key(&["revoked"]), since_ms, 10_000)
            .await?
            .into_iter()
            .filter_map(|(m, t)| Revocation::decode(&m).map(|r| (r, t)))
            .collect())
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode_opt<T: DeserializeOwned>(bytes: Option<Vec<u8>>) -> Result<Option<T>> {
    bytes.map(|b| decode(&b)).transpose()
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(now: u64) -> Arc<Session> {
        Arc::new(Session {
            v: VERSION,
            user: "alice".into(),
            created_ms: now,
            last_seen_ms: now,
            idle_ms: 3_600_000,
            expires_ms: now + 43_200_000,
            authenticated_ms: now,
            unlocked: Vec::new(),
            ip: "192.0.2.1".into(),
            method: "passkey".into(),
            must_register_passkey: false,
        })
    }

    #[test]
    fn one_request_refreshes_a_cached_session_half_way_through_its_life() {
        let (cache, hash, now) = (SessionCache::default(), Secret::generate().hash(), 1_000_000);
        cache.put(&hash, &session(now), now, cache.evictions());
        assert!(matches!(cache.get(&hash, now + CACHE_TTL_MS / 2 - 1), Lookup::Fresh(_)));
        assert!(matches!(cache.get(&hash, now + CACHE_TTL_MS / 2), Lookup::Refresh(_)), "the first one");
        for _ in 0..3 {
            assert!(matches!(cache.get(&hash, now + CACHE_TTL_MS / 2 + 1), Lookup::Fresh(_)), "only one");
        }
        assert!(matches!(cache.get(&hash, now + CACHE_TTL_MS), Lookup::Miss), "never past its life");
        // The refresh lands: a new life, refreshed again half-way through it.
        let later = now + CACHE_TTL_MS / 2 + 5;
        cache.put(&hash, &session(now), later, cache.evictions());
        assert!(matches!(cache.get(&hash, now + CACHE_TTL_MS), Lookup::Fresh(_)));
        assert!(matches!(cache.get(&hash, later + CACHE_TTL_MS / 2), Lookup::Refresh(_)));
    }

    #[test]
    fn a_read_under_way_during_an_eviction_puts_nothing_back() {
        let (cache, hash, now) = (SessionCache::default(), Secret::generate().hash(), 1_000_000);
        let before_read = cache.evictions();
        cache.evict(&hash); // signed out while the store was being read
        cache.put(&hash, &session(now), now, before_read);
        assert!(matches!(cache.get(&hash, now), Lookup::Miss));
        let before_read = cache.evictions();
        cache.evict_user("alice");
        cache.put(&hash, &session(now), now, before_read);
        assert!(matches!(cache.get(&hash, now), Lookup::Miss));
        cache.put(&hash, &session(now), now, cache.evictions());
        assert!(matches!(cache.get(&hash, now), Lookup::Fresh(_)));
    }
}
