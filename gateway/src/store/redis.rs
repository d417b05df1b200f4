//! The Redis backend: one Redis (`redis://`, `rediss://`) through an
//! auto-reconnecting connection manager, a Redis Cluster
//! (`redis+cluster://host:port,host:port`), or the master that Redis
//! Sentinels name (`redis+sentinel://host:port,host:port/name`, or
//! `rediss+sentinel://`). Every call
//! has a deadline, so a dead Redis gives a clear error instead of a hang; the
//! connection comes back by itself when Redis does, and after a failover the
//! sentinels are asked again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ClientTlsConfig, Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, TlsCertificates, TlsMode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tokio::sync::Mutex as AsyncMutex;

use super::kv::{Durability, Kv, Result};
use super::StoreError;

/// The longest any store call may take before it is reported as failed.
const DEADLINE: Duration = Duration::from_secs(2);

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

// Made once per process: the size difference costs nothing.
#[allow(clippy::large_enum_variant)]
enum Target {
    Single(redis::Client),
    Cluster(redis::cluster::ClusterClient),
    /// Asks the sentinels for the master whenever there is no connection.
    Sentinel(AsyncMutex<SentinelClient>),
}

/// TLS files for `rediss://`: the CA that signed Redis's certificate (else
/// the system's roots), and a client certificate for a Redis that asks for
/// one (`tls-auth-clients yes`, its default with TLS on).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    pub ca_file: Option<PathBuf>,
    /// Certificate chain and private key, PEM.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// How to reach Redis beyond what its URL says.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisOptions {
    pub tls: RedisTls,
    /// For `redis+sentinel://`: the sentinels' own credentials (their
    /// `requirepass`, or an ACL user); the URL's are the master's.
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

impl std::fmt::Debug for RedisOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisOptions")
            .field("tls", &self.tls)
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &self.sentinel_password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl RedisTls {
    /// `None` when nothing is configured: redis-rs then trusts the system's roots.
    fn certificates(&self) -> Result<Option<TlsCertificates>> {
        if self.ca_file.is_none() && self.client_cert.is_none() {
            return Ok(None);
        }
        // The path in the error, never the contents (the key is a secret).
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| StoreError::Config(format!("{}: {e}", path.display())))
        };
        let root_cert = match &self.ca_file {
            Some(path) => {
                let pem = read(path)?;
                // Else every connection would fail later, with a vaguer error.
                if CertificateDer::pem_slice_iter(&pem).next().is_none() {
                    return Err(StoreError::Config(format!("{}: no PEM certificate in it", path.display())));
                }
                Some(pem)
            }
            None => None,
        };
        let client_tls = match &self.client_cert {
            Some((cert, key)) => Some(ClientTlsConfig { client_cert: read(cert)?, client_key: read(key)? }),
            None => None,
        };
        Ok(Some(TlsCertificates { client_tls, root_cert }))
    }
}

pub struct RedisKv {
    target: Target,
    /// The connection in use, made on first use. A sentinel's master's is
    /// dropped on any failure, so the next call asks where the master is now.
    conn: std::sync::Mutex<Option<Conn>>,
    /// Held while connecting: concurrent first calls share one connection.
    connecting: AsyncMutex<()>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// `redis+cluster://[user:pass@]a:6379,b:6379` → node URLs sharing the credentials.
fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = if let Some(r) = url.strip_prefix("redis+cluster://") {
        ("redis", r)
    } else {
        ("rediss", url.strip_prefix("rediss+cluster://")?)
    };
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((auth, hosts)) => (format!("{auth}@"), hosts),
        None => (String::new(), rest),
    };
    let hosts = hosts.split('/').next().unwrap_or_default();
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{auth}{h}"))
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// `redis+sentinel://[user:pass@]a:26379,b:26379/name[/db]`: the sentinels to
/// ask for master `name`, and the database and credentials for that master
/// (the sentinels' own come from `options`). `rediss+sentinel://`: TLS to
/// the sentinels and the master, with `certificates` for both.
fn sentinel_client(
    url: &str,
    options: &RedisOptions,
    certificates: Option<TlsCertificates>,
) -> std::result::Result<SentinelClient, String> {
    let (scheme, rest) = match url.strip_prefix("redis+sentinel://") {
        Some(rest) => ("redis", rest),
        None => ("rediss", url.strip_prefix("rediss+sentinel://").ok_or("not a redis+sentinel:// URL")?),
    };
    let (auth, rest) = match rest.rsplit_once('@') {
        Some((auth, rest)) => (format!("{auth}@"), rest),
        None => (String::new(), rest),
    };
    let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (name, db) = path.split_once('/').unwrap_or((path, "0"));
    if name.is_empty() {
        return Err("name the master the sentinels watch: redis+sentinel://host:26379/mymaster".into());
    }
    let mut sentinels = Vec::new();
    for host in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        // A sentinel's port is 26379 unless given.
        let has_port =
            host.rsplit_once(':').is_some_and(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok());
        let host = if has_port { host.to_string() } else { format!("{host}:26379") };
        let info = format!("{scheme}://{host}").into_connection_info().map_err(|e| format!("{host}: {e}"))?;
        sentinels.push(info.addr().clone());
    }
    if sentinels.is_empty() {
        return Err("no sentinels in store.url".into());
    }
    // The master's database and credentials, decoded as redis:// URLs are.
    let master = format!("redis://{auth}localhost/{db}").into_connection_info().map_err(|e| e.to_string())?;
    let master = master.redis_settings();
    let mut builder = SentinelClientBuilder::new(sentinels, name, SentinelServerType::Master)
        .map_err(|e| e.to_string())?
        .set_client_to_redis_db(master.db());
    if let Some(user) = master.username() {
        builder = builder.set_client_to_redis_username(user);
    }
    if let Some(password) = master.password() {
        builder = builder.set_client_to_redis_password(password);
    }
    if let Some(user) = &options.sentinel_username {
        builder = builder.set_client_to_sentinel_username(user);
    }
    if let Some(password) = &options.sentinel_password {
        builder = builder.set_client_to_sentinel_password(password);
    }
    if scheme == "rediss" {
        builder = builder
            .set_client_to_redis_tls_mode(TlsMode::Secure)
            .set_client_to_sentinel_tls_mode(TlsMode::Secure);
        if let Some(certificates) = certificates {
            builder = builder
                .set_client_to_redis_certificates(certificates.clone())
                .set_client_to_sentinel_certificates(certificates);
        }
    }
    builder.build().map_err(|e| e.to_string())
}

/// Why a `redis+sentinel://` URL cannot be used, for the configuration's check.
pub(crate) fn check_sentinel_url(url: &str) -> std::result::Result<(), String> {
    sentinel_client(url, &RedisOptions::default(), None).map(drop)
}

impl RedisKv {
    /// Checks the URL now; connects on first use (and again after failures),
    /// so the gateway starts, and reports not-ready, while Redis is down.
    pub async fn connect(url: &str, options: &RedisOptions) -> Result<Self> {
        let config_error = |e: redis::RedisError| StoreError::Config(e.to_string());
        let certificates = options.tls.certificates()?;
        let target = if url.starts_with("redis+cluster://") || url.starts_with("rediss+cluster://") {
            let nodes = cluster_nodes(url)
                .ok_or_else(|| StoreError::Config("no cluster nodes in store.url".into()))?;
            let mut builder = redis::cluster::ClusterClient::builder(nodes)
                .connection_timeout(DEADLINE)
                .response_timeout(DEADLINE)
                .retries(2);
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            Target::Cluster(builder.build().map_err(config_error)?)
        } else if url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://") {
            let sentinels = sentinel_client(url, options, certificates).map_err(StoreError::Config)?;
            Target::Sentinel(AsyncMutex::new(sentinels))
        } else {
            let client = match certificates {
                Some(certificates) => redis::Client::build_with_tls(url, certificates),
                None => redis::Client::open(url),
            };
            Target::Single(client.map_err(config_error)?)
        };
        let kv = Self { target, conn: std::sync::Mutex::new(None), connecting: AsyncMutex::new(()) };
        if let Err(e) = kv.conn().await {
            tracing::warn!(error = %e, "Redis is not reachable yet; will keep trying");
        }
        Ok(kv)
    }

    fn current(&self) -> Option<Conn> {
        self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    async fn conn(&self) -> Result<Conn> {
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        let connecting = async {
            let _one_at_a_time = self.connecting.lock().await;
            if let Some(conn) = self.current() {
                return Ok(conn);
            }
            let single = |client: redis::Client| {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(DEADLINE))
                    .set_response_timeout(Some(DEADLINE))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_with_config(client, config)
            };
            let conn = match &self.target {
                Target::Single(client) => single(client.clone()).await.map(Conn::Single),
                Target::Cluster(client) => client.get_async_connection().await.map(Conn::Cluster),
                Target::Sentinel(sentinels) => {
                    // The client for the node the sentinels name, once it
                    // has confirmed that it is the master.
                    let master = sentinels.lock().await.async_get_client().await.map_err(unavailable)?;
                    single(master).await.map(Conn::Single)
                }
            }
            .map_err(unavailable)?;
            *self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(conn.clone());
            Ok(conn)
        };
        tokio::time::timeout(DEADLINE, connecting).await.unwrap_or(Err(StoreError::Timeout))
    }

    /// After a failed call: a sentinel's master may have failed over (or
    /// been demoted to a replica, which refuses writes), so ask again.
    fn failed(&self) {
        if let Target::Sentinel(_) = self.target {
            *self.conn.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        }
    }

    async fn run<T: FromRedisValue>(&self, cmd: &Cmd) -> Result<T> {
        let conn = self.conn().await?;
        let call = async move {
            match conn {
                Conn::Single(mut c) => cmd.query_async(&mut c).await,
                Conn::Cluster(mut c) => cmd.query_async(&mut c).await,
            }
        };
        self.outcome(tokio::time::timeout(DEADLINE, call).await)
    }

    fn outcome<T>(
        &self,
        result: std::result::Result<redis::RedisResult<T>, tokio::time::error::Elapsed>,
    ) -> Result<T> {
        let outcome = match result {
            Ok(result) => result.map_err(unavailable),
            Err(_) => Err(StoreError::Timeout),
        };
        if outcome.is_err() {
            self.failed();
        }
        outcome
    }

    async fn run_pipe<T: FromRedisValue>(&self, pipe: &Pipeline) -> Result<T> {
        let conn = self.conn().await?;
        let call = async move {
            match conn {
                Conn::Single(mut c) => pipe.query_async(&mut c).await,
                Conn::Cluster(mut c) => pipe.query_async(&mut c).await,
            }
        };
        self.outcome(tokio::time::timeout(DEADLINE, call).await)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl Kv for RedisKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.run(redis::cmd("GET").arg(key)).await
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>, _: Durability) -> Result<()> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value);
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(millis(ttl));
        }
        self.run::<()>(&cmd).await
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("NX");
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(millis(ttl));
        }
        Ok(self.run::<Option<String>>(&cmd).await?.is_some())
    }

    async fn set_if_unchanged(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
        _: Durability,
    ) -> Result<bool> {
        // One key, so a cluster runs it on the key's node.
        const SCRIPT: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
            redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end return 0";
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(SCRIPT).arg(1).arg(key).arg(expected).arg(value).arg(millis(ttl).max(1));
        Ok(self.run::<i64>(&cmd).await? == 1)
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.run(redis::cmd("GETDEL").arg(key)).await
    }

    async fn del(&self, keys: &[String]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        // One DEL per key: a cluster refuses multi-key commands (and
        // pipelines) across slots. One Redis gets them in one round trip.
        if let Target::Cluster(_) = self.target {
            let mut n = 0;
            for key in keys {
                n += self.run::<u64>(redis::cmd("DEL").arg(key)).await?;
            }
            return Ok(n);
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd("DEL").arg(key);
        }
        Ok(self.run_pipe::<Vec<u64>>(&pipe).await?.into_iter().sum())
    }

    async fn set_add(&self, key: &str, member: &str) -> Result<()> {
        self.run::<()>(redis::cmd("SADD").arg(key).arg(member)).await
    }

    async fn set_remove(&self, key: &str, members: &[String]) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        self.run::<()>(redis::cmd("SREM").arg(key).arg(members)).await
    }

    async fn set_members(&self, key: &str) -> Result<Vec<String>> {
        self.run(redis::cmd("SMEMBERS").arg(key)).await
    }

    async fn hash_put(&self, key: &str, field: &str, value: &[u8]) -> Result<()> {
        self.run::<()>(redis::cmd("HSET").arg(key).arg(field).arg(value)).await
    }

    async fn hash_get(&self, key: &str, field: &str) -> Result<Option<Vec<u8>>> {
        self.run(redis::cmd("HGET").arg(key).arg(field)).await
    }

    async fn hash_remove(&self, key: &str, field: &str) -> Result<bool> {
        Ok(self.run::<u64>(redis::cmd("HDEL").arg(key).arg(field)).await? > 0)
    }

    async fn hash_all(&self, key: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.run(redis::cmd("HGETALL").arg(key)).await
    }

    async fn hash_len(&self, key: &str) -> Result<u64> {
        self.run(redis::cmd("HLEN").arg(key)).await
    }

    async fn zset_add(&self, key: &str, score: u64, member: &str) -> Result<()> {
        self.run::<()>(redis::cmd("ZADD").arg(key).arg(score).arg(member)).await
    }

    async fn zset_newest(&self, key: &str, min: u64, limit: usize) -> Result<Vec<(String, u64)>> {
        self.run(
            redis::cmd("ZREVRANGEBYSCORE")
                .arg(key)
                .arg("+inf")
                .arg(min)
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit),
        )
        .await
    }

    async fn zset_trim(&self, key: &str, below: u64) -> Result<()> {
        self.run::<()>(redis::cmd("ZREMRANGEBYSCORE").arg(key).arg("-inf").arg(format!("({below}"))).await
    }

    async fn incr_window(&self, key: &str, window: Duration) -> Result<u64> {
        let mut pipe = redis::pipe();
        pipe.cmd("INCR").arg(key).cmd("PEXPIRE").arg(key).arg(millis(window)).arg("NX").ignore();
        let (count,): (u64,) = self.run_pipe(&pipe).await?;
        Ok(count)
    }

    async fn ping(&self) -> Result<()> {
        self.run::<String>(&redis::cmd("PING")).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::check_sentinel_url;

    #[test]
    fn sentinel_urls_name_sentinels_and_a_master() {
        assert_eq!(check_sentinel_url("redis+sentinel://10.0.0.1,10.0.0.2:26380/pbx"), Ok(()));
        assert_eq!(check_sentinel_url("redis+sentinel://:secret@[::1]:26379,s2/pbx/3"), Ok(()));
        let refused = |url: &str| check_sentinel_url(url).expect_err(url);
        assert!(refused("redis+sentinel://10.0.0.1:26379").contains("name the master"));
        assert!(refused("redis+sentinel://10.0.0.1:26379/").contains("name the master"));
        assert!(refused("redis+sentinel:///pbx").contains("no sentinels"));
        assert_eq!(check_sentinel_url("rediss+sentinel://s1:26379,s2:26379/pbx"), Ok(()));
        assert!(!refused("redis+sentinel://10.0.0.1/pbx/x").is_empty(), "a database is a number");
    }
}
