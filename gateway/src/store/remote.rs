//! Commands beside a running gateway with the embedded store. redb lets one
//! process hold the file, so the gateway serves the store's primitives
//! ([`Kv`]) on a Unix socket next to it (`store.db.sock`, owner only), and
//! `pbxgate user …`, `tokens …` and `history` go through that socket when
//! they find the file locked. Only the gateway's own user and root are
//! answered: the people who could open the file itself.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::kv::{Durability, Kv, Result};
use super::StoreError;

/// A call is a few keys and one value; anything larger is not a command's.
const MAX_CALL: u64 = 16 << 20;
/// How long a command waits for the gateway to answer one call.
const DEADLINE: Duration = Duration::from_secs(10);

/// Where the gateway holding `db` answers commands.
pub(crate) fn socket_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(".sock");
    PathBuf::from(name)
}

/// One [`Kv`] call on the wire (durations in milliseconds).
#[derive(Debug, Serialize, Deserialize)]
enum Call {
    Get { key: String },
    Set { key: String, value: Vec<u8>, ttl_ms: Option<u64>, durability: Durability },
    SetNx { key: String, value: Vec<u8>, ttl_ms: Option<u64> },
    SetIfUnchanged { key: String, expected: Vec<u8>, value: Vec<u8>, ttl_ms: u64, durability: Durability },
    Take { key: String },
    Del { keys: Vec<String> },
    SetAdd { key: String, member: String },
    SetRemove { key: String, members: Vec<String> },
    SetMembers { key: String },
    HashPut { key: String, field: String, value: Vec<u8> },
    HashGet { key: String, field: String },
    HashRemove { key: String, field: String },
    HashAll { key: String },
    HashLen { key: String },
    ZsetAdd { key: String, score: u64, member: String },
    ZsetNewest { key: String, min: u64, limit: usize },
    ZsetTrim { key: String, below: u64 },
    IncrWindow { key: String, window_ms: u64 },
    Ping,
}

#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Done,
    Flag(bool),
    Count(u64),
    Value(Option<Vec<u8>>),
    Members(Vec<String>),
    Fields(Vec<(String, Vec<u8>)>),
    Scored(Vec<(String, u64)>),
    Failed(String),
}

/// Whole milliseconds, rounded up: a TTL never shrinks to nothing on the way.
fn millis(d: Duration) -> u64 {
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if d.subsec_nanos() % 1_000_000 == 0 {
        ms
    } else {
        ms.saturating_add(1)
    }
}

// ---- the gateway's side -----------------------------------------------------

/// The socket while the gateway runs; dropping it stops answering and
/// removes the file.
#[derive(Debug)]
pub struct CommandSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl CommandSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CommandSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Answers commands for `kv` on `path`. The caller holds the store's lock,
/// so a socket file already there was left by a gateway that is gone.
pub(crate) fn listen(kv: Arc<dyn Kv>, path: PathBuf) -> std::io::Result<CommandSocket> {
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    // Made by this process, so owned by the user it runs as.
    let owner = std::fs::metadata(&path)?.uid();
    let task = tokio::spawn(accept(listener, kv, [owner, 0]));
    Ok(CommandSocket { path, task })
}

/// Answers connections from the users in `allowed` only.
async fn accept(listener: UnixListener, kv: Arc<dyn Kv>, allowed: [u32; 2]) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, most likely: let some close.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // The mode keeps others out; the peer's credentials make sure of it.
        let uid = stream.peer_cred().map(|c| c.uid());
        if !matches!(uid, Ok(uid) if allowed.contains(&uid)) {
            tracing::warn!(target: "pbxgate::audit", ?uid, "store command from another user refused");
            continue;
        }
        tokio::spawn(answer(stream, kv.clone()));
    }
}

async fn answer(stream: UnixStream, kv: Arc<dyn Kv>) {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    if BufReader::new(read.take(MAX_CALL)).read_until(b'\n', &mut line).await.is_err() {
        return;
    }
    let reply = match serde_json::from_slice::<Call>(&line) {
        Ok(call) => execute(kv.as_ref(), call).await.unwrap_or_else(|e| Reply::Failed(e.to_string())),
        Err(e) => Reply::Failed(format!("not a store call: {e}")),
    };
    let Ok(mut out) = serde_json::to_vec(&reply) else { return };
    out.push(b'\n');
    let _ = write.write_all(&out).await;
}

async fn execute(kv: &dyn Kv, call: Call) -> Result<Reply> {
    let ms = Duration::from_millis;
    Ok(match call {
        Call::Get { key } => Reply::Value(kv.get(&key).await?),
        Call::Set { key, value, ttl_ms, durability } => {
            kv.set(&key, &value, ttl_ms.map(ms), durability).await?;
            Reply::Done
        }
        Call::SetNx { key, value, ttl_ms } => Reply::Flag(kv.set_nx(&key, &value, ttl_ms.map(ms)).await?),
        Call::SetIfUnchanged { key, expected, value, ttl_ms, durability } => {
            Reply::Flag(kv.set_if_unchanged(&key, &expected, &value, ms(ttl_ms), durability).await?)
        }
        Call::Take { key } => Reply::Value(kv.take(&key).await?),
        Call::Del { keys } => Reply::Count(kv.del(&keys).await?),
        Call::SetAdd { key, member } => {
            kv.set_add(&key, &member).await?;
            Reply::Done
        }
        Call::SetRemove { key, members } => {
            kv.set_remove(&key, &members).await?;
            Reply::Done
        }
        Call::SetMembers { key } => Reply::Members(kv.set_members(&key).await?),
        Call::HashPut { key, field, value } => {
            kv.hash_put(&key, &field, &value).await?;
            Reply::Done
        }
        Call::HashGet { key, field } => Reply::Value(kv.hash_get(&key, &field).await?),
        Call::HashRemove { key, field } => Reply::Flag(kv.hash_remove(&key, &field).await?),
        Call::HashAll { key } => Reply::Fields(kv.hash_all(&key).await?),
        Call::HashLen { key } => Reply::Count(kv.hash_len(&key).await?),
        Call::ZsetAdd { key, score, member } => {
            kv.zset_add(&key, score, &member).await?;
            Reply::Done
        }
        Call::ZsetNewest { key, min, limit } => Reply::Scored(kv.zset_newest(&key, min, limit).await?),
        Call::ZsetTrim { key, below } => {
            kv.zset_trim(&key, below).await?;
            Reply::Done
        }
        Call::IncrWindow { key, window_ms } => Reply::Count(kv.incr_window(&key, ms(window_ms)).await?),
        Call::Ping => {
            kv.ping().await?;
            Reply::Done
        }
    })
}

// ---- the command's side -----------------------------------------------------

/// The store of the gateway answering on `path`, one connection per call.
pub(crate) struct RemoteKv {
    path: PathBuf,
}

fn unexpected() -> StoreError {
    StoreError::Unavailable("unexpected answer from the gateway".into())
}

impl RemoteKv {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self { path }
    }

    async fn call(&self, call: &Call) -> Result<Reply> {
        let failed = |e: std::io::Error| StoreError::Unavailable(format!("{}: {e}", self.path.display()));
        let exchange = async {
            let mut stream = UnixStream::connect(&self.path).await.map_err(failed)?;
            let mut line = serde_json::to_vec(call).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            line.push(b'\n');
            stream.write_all(&line).await.map_err(failed)?;
            let mut reply = Vec::new();
            BufReader::new(stream).read_until(b'\n', &mut reply).await.map_err(failed)?;
            // No answer at all: the gateway refused this user, or stopped.
            serde_json::from_slice::<Reply>(&reply).map_err(|_| unexpected())
        };
        match tokio::time::timeout(DEADLINE, exchange).await {
            Ok(Ok(Reply::Failed(e))) => Err(StoreError::Unavailable(format!("gateway: {e}"))),
            Ok(result) => result,
            Err(_) => Err(StoreError::Timeout),
        }
    }

    async fn done(&self, call: Call) -> Result<()> {
        match self.call(&call).await? {
            Reply::Done => Ok(()),
            _ => Err(unexpected()),
        }
    }

    async fn flag(&self, call: Call) -> Result<bool> {
        match self.call(&call).await? {
            Reply::Flag(flag) => Ok(flag),
            _ => Err(unexpected()),
        }
    }

    async fn count(&self, call: Call) -> Result<u64> {
        match self.call(&call).await? {
            Reply::Count(n) => Ok(n),
            _ => Err(unexpected()),
        }
    }

    async fn value(&self, call: Call) -> Result<Option<Vec<u8>>> {
        match self.call(&call).await? {
            Reply::Value(value) => Ok(value),
            _ => Err(unexpected()),
        }
    }
}

#[async_trait]
impl Kv for RemoteKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.value(Call::Get { key: key.into() }).await
    }

    async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        durability: Durability,
    ) -> Result<()> {
        let ttl_ms = ttl.map(millis);
        self.done(Call::Set { key: key.into(), value: value.into(), ttl_ms, durability }).await
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        self.flag(Call::SetNx { key: key.into(), value: value.into(), ttl_ms: ttl.map(millis) }).await
    }

    async fn set_if_unchanged(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
        durability: Durability,
    ) -> Result<bool> {
        let (expected, value, ttl_ms) = (expected.into(), value.into(), millis(ttl));
        self.flag(Call::SetIfUnchanged { key: key.into(), expected, value, ttl_ms, durability }).await
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.value(Call::Take { key: key.into() }).await
    }

    async fn del(&self, keys: &[String]) -> Result<u64> {
        self.count(Call::Del { keys: keys.to_vec() }).await
    }

    async fn set_add(&self, key: &str, member: &str) -> Result<()> {
        self.done(Call::SetAdd { key: key.into(), member: member.into() }).await
    }

    async fn set_remove(&self, key: &str, members: &[String]) -> Result<()> {
        self.done(Call::SetRemove { key: key.into(), members: members.to_vec() }).await
    }

    async fn set_members(&self, key: &str) -> Result<Vec<String>> {
        match self.call(&Call::SetMembers { key: key.into() }).await? {
            Reply::Members(members) => Ok(members),
            _ => Err(unexpected()),
        }
    }

    async fn hash_put(&self, key: &str, field: &str, value: &[u8]) -> Result<()> {
        self.done(Call::HashPut { key: key.into(), field: field.into(), value: value.into() }).await
    }

    async fn hash_get(&self, key: &str, field: &str) -> Result<Option<Vec<u8>>> {
        self.value(Call::HashGet { key: key.into(), field: field.into() }).await
    }

    async fn hash_remove(&self, key: &str, field: &str) -> Result<bool> {
        self.flag(Call::HashRemove { key: key.into(), field: field.into() }).await
    }

    async fn hash_all(&self, key: &str) -> Result<Vec<(String, Vec<u8>)>> {
        match self.call(&Call::HashAll { key: key.into() }).await? {
            Reply::Fields(fields) => Ok(fields),
            _ => Err(unexpected()),
        }
    }

    async fn hash_len(&self, key: &str) -> Result<u64> {
        self.count(Call::HashLen { key: key.into() }).await
    }

    async fn zset_add(&self, key: &str, score: u64, member: &str) -> Result<()> {
        self.done(Call::ZsetAdd { key: key.into(), score, member: member.into() }).await
    }

    async fn zset_newest(&self, key: &str, min: u64, limit: usize) -> Result<Vec<(String, u64)>> {
        match self.call(&Call::ZsetNewest { key: key.into(), min, limit }).await? {
            Reply::Scored(scored) => Ok(scored),
            _ => Err(unexpected()),
        }
    }

    async fn zset_trim(&self, key: &str, below: u64) -> Result<()> {
        self.done(Call::ZsetTrim { key: key.into(), below }).await
    }

    async fn incr_window(&self, key: &str, window: Duration) -> Result<u64> {
        self.count(Call::IncrWindow { key: key.into(), window_ms: millis(window) }).await
    }

    async fn ping(&self) -> Result<()> {
        self.done(Call::Ping).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::embedded::EmbeddedKv;

    #[tokio::test]
    async fn only_the_allowed_users_are_answered() {
        let dir = std::env::temp_dir().join(format!("pbxgate-remote-{}", std::process::id()));
        let kv: Arc<dyn Kv> = Arc::new(EmbeddedKv::open(&dir.join("store.db")).await.unwrap_or_else(|e| {
            unreachable!("open: {e}");
        }));
        kv.set("k", b"v", None, Durability::Durable).await.unwrap_or_default();
        for (allowed, answered) in [(true, true), (false, false)] {
            let path = dir.join(format!("{allowed}.sock"));
            let listener = UnixListener::bind(&path).unwrap_or_else(|e| unreachable!("bind: {e}"));
            let me = std::fs::metadata(&path).map(|m| m.uid()).unwrap_or_default();
            // Nobody real, and not root: as a stranger sees it.
            let users = if allowed { [me, me] } else { [u32::MAX - 1, u32::MAX - 1] };
            let task = tokio::spawn(accept(listener, kv.clone(), users));
            let got = RemoteKv::new(path).get("k").await;
            assert_eq!(got.is_ok(), answered, "{got:?}");
            if answered {
                assert_eq!(got, Ok(Some(b"v".to_vec())));
            }
            task.abort();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ttls_never_round_down_to_nothing() {
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_millis(1500)), 1500);
        assert_eq!(millis(Duration::ZERO), 0);
    }
}
