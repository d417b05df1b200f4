//! The embedded backend: one redb file for a single gateway without Redis.
//!
//! Strings carry their expiry (8 bytes, Unix ms, 0 = none) in front of the
//! value; expiry is enforced on read and swept every few seconds. redb allows
//! one writer at a time, which makes take-once trivially atomic. Calls run on
//! tokio's blocking pool, never on the async threads.

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};

use super::kv::{Durability, Kv, Result};
use super::{now_ms, StoreError};

const STRINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("strings");
/// Set members and hash fields: (key, field) -> value (empty for sets).
const FIELDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("fields");
/// Sorted sets: (key, score, member) -> ().
const SCORED: TableDefinition<(&str, u64, &str), ()> = TableDefinition::new("scored");

const SWEEP_EVERY: Duration = Duration::from_secs(10);

pub struct EmbeddedKv {
    db: Arc<Database>,
    /// redb lets one writer in at a time: the others wait here, as tasks,
    /// rather than each holding a blocking thread (a burst of requests
    /// would otherwise start hundreds of threads).
    writer: tokio::sync::Semaphore,
    /// Readers run side by side, a bounded number at once.
    readers: tokio::sync::Semaphore,
}

/// Concurrent read transactions on the blocking pool.
const READERS: usize = 16;

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn expiry_of(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |t| now_ms().saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)).max(1))
}

fn frame(value: &[u8], expires: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&expires.to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// The value when it has not expired.
fn unframe(stored: &[u8], now: u64) -> Option<&[u8]> {
    let (expires, value) = stored.split_at_checked(8)?;
    let expires = u64::from_be_bytes(expires.try_into().ok()?);
    (expires == 0 || expires > now).then_some(value)
}

impl EmbeddedKv {
    pub async fn open(path: &Path) -> Result<Self> {
        let path = path.to_path_buf();
        let db = tokio::task::spawn_blocking(move || -> Result<Database> {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| unavailable(format!("{}: {e}", dir.display())))?;
            }
            // Sessions, tokens and credentials: for the gateway's user alone,
            // whatever the umask. redb takes an empty file as a new store.
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
            let db = Database::create(&path).map_err(|e| match e {
                redb::DatabaseError::DatabaseAlreadyOpen => StoreError::Locked(path.display().to_string()),
                e => unavailable(format!("{}: {e}", path.display())),
            })?;
            // Create the tables so that readers never meet a missing one.
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(STRINGS).map_err(unavailable)?;
            txn.open_table(FIELDS).map_err(unavailable)?;
            txn.open_table(SCORED).map_err(unavailable)?;
            txn.commit().map_err(unavailable)?;
            Ok(db)
        })
        .await
        .map_err(unavailable)??;
        let db = Arc::new(db);
        tokio::spawn(sweep(Arc::downgrade(&db)));
        Ok(Self { db, writer: tokio::sync::Semaphore::new(1), readers: tokio::sync::Semaphore::new(READERS) })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> std::result::Result<T, redb::Error> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        let _turn = self.readers.acquire().await.map_err(unavailable)?;
        tokio::task::spawn_blocking(move || {
            let txn = db.begin_read().map_err(unavailable)?;
            f(&txn).map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }

    async fn write<T: Send + 'static>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction) -> std::result::Result<T, redb::Error> + Send + 'static,
    ) -> Result<T> {
        let db = self.db.clone();
        let _turn = self.writer.acquire().await.map_err(unavailable)?;
        tokio::task::spawn_blocking(move || {
            let mut txn = db.begin_write().map_err(unavailable)?;
            if durability == Durability::Lazy {
                txn.set_durability(redb::Durability::None).map_err(unavailable)?;
            }
            let out = f(&txn).map_err(unavailable)?;
            txn.commit().map_err(unavailable)?;
            Ok(out)
        })
        .await
        .map_err(unavailable)?
    }
}

impl Drop for EmbeddedKv {
    fn drop(&mut self) {
        // Make lazy writes durable on a clean shutdown.
        if let Ok(txn) = self.db.begin_write() {
            let _ = txn.commit();
        }
    }
}

/// Drops expired strings; the durable commit also persists lazy writes.
async fn sweep(db: Weak<Database>) {
    loop {
        tokio::time::sleep(SWEEP_EVERY).await;
        let Some(db) = db.upgrade() else { return };
        let result = tokio::task::spawn_blocking(move || -> std::result::Result<(), redb::Error> {
            let now = now_ms();
            let txn = db.begin_write()?;
            txn.open_table(STRINGS)?.retain(|_, v| unframe(v, now).is_some())?;
            txn.commit()?;
            Ok(())
        })
        .await;
        if let Ok(Err(e)) = result {
            tracing::warn!(error = %e, "embedded store sweep failed");
        }
    }
}

fn get_live(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    now: u64,
) -> std::result::Result<Option<Vec<u8>>, redb::Error> {
    Ok(table.get(key)?.and_then(|g| unframe(g.value(), now).map(<[u8]>::to_vec)))
}

#[async_trait]
impl Kv for EmbeddedKv {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.read(move |txn| get_live(&txn.open_table(STRINGS)?, &key, now_ms())).await
    }

    async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        durability: Durability,
    ) -> Result<()> {
        let (key, stored) = (key.to_string(), frame(value, expiry_of(ttl)));
        self.write(durability, move |txn| {
            txn.open_table(STRINGS)?.insert(key.as_str(), stored.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        let (key, stored) = (key.to_string(), frame(value, expiry_of(ttl)));
        self.write(Durability::Durable, move |txn| {
            let mut table = txn.open_table(STRINGS)?;
            if get_live(&table, &key, now_ms())?.is_some() {
                return Ok(false);
            }
            table.insert(key.as_str(), stored.as_slice())?;
            Ok(true)
        })
        .await
    }

    async fn set_if_unchanged(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
        durability: Durability,
    ) -> Result<bool> {
        let (key, expected) = (key.to_string(), expected.to_vec());
        let stored = frame(value, expiry_of(Some(ttl)));
        self.write(durability, move |txn| {
            let mut table = txn.open_table(STRINGS)?;
            if get_live(&table, &key, now_ms())?.as_deref() != Some(expected.as_slice()) {
                return Ok(false);
            }
            table.insert(key.as_str(), stored.as_slice())?;
            Ok(true)
        })
        .await
    }

    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.write(Durability::Durable, move |txn| {
            let mut table = txn.open_table(STRINGS)?;
            let removed = table.remove(key.as_str())?.map(|g| g.value().to_vec());
            Ok(removed.and_then(|stored| unframe(&stored, now_ms()).map(<[u8]>::to_vec)))
        })
        .await
    }

    async fn del(&self, keys: &[String]) -> Result<u64> {
        let keys = keys.to_vec();
        self.write(Durability::Durable, move |txn| {
            let now = now_ms();
            let mut strings = txn.open_table(STRINGS)?;
            let mut fields = txn.open_table(FIELDS)?;
            let mut scored = txn.open_table(SCORED)?;
            let mut n = 0;
            for key in &keys {
                if let Some(g) = strings.remove(key.as_str())? {
                    n += u64::from(unframe(g.value(), now).is_some());
                }
                let before = fields.len()? + scored.len()?;
                fields.retain_in((key.as_str(), "")..=(key.as_str(), "\u{10FFFF}"), |_, _| false)?;
                scored
                    .retain_in((key.as_str(), 0, "")..=(key.as_str(), u64::MAX, "\u{10FFFF}"), |_, _| {
                        false
                    })?;
                n += u64::from(fields.len()? + scored.len()? < before);
            }
            Ok(n)
        })
        .await
    }

    async fn set_add(&self, key: &str, member: &str) -> Result<()> {
        self.hash_put(key, member, &[]).await
    }

    async fn set_remove(&self, key: &str, members: &[String]) -> Result<()> {
        let (key, members) = (key.to_string(), members.to_vec());
        self.write(Durability::Durable, move |txn| {
            let mut fields = txn.open_table(FIELDS)?;
            for m in &members {
                fields.remove((key.as_str(), m.as_str()))?;
            }
            Ok(())
        })
        .await
    }

    async fn set_members(&self, key: &str) -> Result<Vec<String>> {
        Ok(self.hash_all(key).await?.into_iter().map(|(m, _)| m).collect())
    }

    async fn hash_put(&self, key: &str, field: &str, value: &[u8]) -> Result<()> {
        let (key, field, value) = (key.to_string(), field.to_string(), value.to_vec());
        self.write(Durability::Durable, move |txn| {
            txn.open_table(FIELDS)?.insert((key.as_str(), field.as_str()), value.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn hash_get(&self, key: &str, field: &str) -> Result<Option<Vec<u8>>> {
        let (key, field) = (key.to_string(), field.to_string());
        self.read(move |txn| {
            Ok(txn.open_table(FIELDS)?.get((key.as_str(), field.as_str()))?.map(|g| g.value().to_vec()))
        })
        .await
    }

    async fn hash_remove(&self, key: &str, field: &str) -> Result<bool> {
        let (key, field) = (key.to_string(), field.to_string());
        self.write(Durability::Durable, move |txn| {
            Ok(txn.open_table(FIELDS)?.remove((key.as_str(), field.as_str()))?.is_some())
        })
        .await
    }

    async fn hash_all(&self, key: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let key = key.to_string();
        self.read(move |txn| {
            let table = txn.open_table(FIELDS)?;
            let mut out = Vec::new();
            for entry in table.range((key.as_str(), "")..=(key.as_str(), "\u{10FFFF}"))? {
                let (k, v) = entry?;
                out.push((k.value().1.to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn hash_len(&self, key: &str) -> Result<u64> {
        Ok(self.hash_all(key).await?.len() as u64)
    }

    async fn zset_add(&self, key: &str, score: u64, member: &str) -> Result<()> {
        let (key, member) = (key.to_string(), member.to_string());
        self.write(Durability::Durable, move |txn| {
            txn.open_table(SCORED)?.insert((key.as_str(), score, member.as_str()), ())?;
            Ok(())
        })
        .await
    }

    async fn zset_newest(&self, key: &str, min: u64, limit: usize) -> Result<Vec<(String, u64)>> {
        let key = key.to_string();
        self.read(move |txn| {
            let table = txn.open_table(SCORED)?;
            let mut out = Vec::new();
            for entry in table.range((key.as_str(), min, "")..=(key.as_str(), u64::MAX, "\u{10FFFF}"))?.rev()
            {
                let (k, _) = entry?;
                let (_, score, member) = k.value();
                out.push((member.to_string(), score));
                if out.len() >= limit {
                    break;
                }
            }
            Ok(out)
        })
        .await
    }

    async fn zset_trim(&self, key: &str, below: u64) -> Result<()> {
        let key = key.to_string();
        self.write(Durability::Durable, move |txn| {
            if below > 0 {
                txn.open_table(SCORED)?
                    .retain_in((key.as_str(), 0, "")..(key.as_str(), below, ""), |_, _| false)?;
            }
            Ok(())
        })
        .await
    }

    async fn incr_window(&self, key: &str, window: Duration) -> Result<u64> {
        let key = key.to_string();
        self.write(Durability::Lazy, move |txn| {
            let now = now_ms();
            let mut table = txn.open_table(STRINGS)?;
            let current = table.get(key.as_str())?.map(|g| g.value().to_vec());
            let (count, expires) = match current.as_deref().and_then(|s| unframe(s, now).map(|v| (s, v))) {
                Some((stored, value)) => {
                    let count = String::from_utf8_lossy(value).parse::<u64>().unwrap_or(0) + 1;
                    (count, u64::from_be_bytes(stored[..8].try_into().unwrap_or([0; 8])))
                }
                None => (1, expiry_of(Some(window))),
            };
            table.insert(key.as_str(), frame(count.to_string().as_bytes(), expires).as_slice())?;
            Ok(count)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.read(|txn| {
            txn.open_table(STRINGS)?;
            Ok(())
        })
        .await
    }
}
