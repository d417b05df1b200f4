//! The primitives each backend provides. Everything the gateway stores is
//! built from these in `store.rs`, once, so both backends behave the same.

use std::time::Duration;

use async_trait::async_trait;

use super::StoreError;

pub type Result<T> = std::result::Result<T, StoreError>;

/// Whether a write must survive a crash (credentials) or may be lost in one
/// (a session's last-seen time). Redis decides this itself (AOF/RDB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Durability {
    Durable,
    Lazy,
}

/// Keys arrive fully prefixed. TTLs are per key; collections (sets, hashes,
/// sorted sets) have no TTL of their own and are cleaned by their owners.
#[async_trait]
pub trait Kv: Send + Sync {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>>;
    async fn set(&self, key: &str, value: &[u8], ttl: Option<Duration>, durability: Durability)
        -> Result<()>;
    /// Sets only if absent; true when this call created the key.
    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool>;
    /// Compare-and-set: writes `value` only while the key still holds
    /// `expected`; false when it changed or is gone (then nothing is written).
    async fn set_if_unchanged(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
        durability: Durability,
    ) -> Result<bool>;
    /// Gets and deletes in one atomic step: of many concurrent takers, one gets it.
    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Deletes keys; returns how many existed.
    async fn del(&self, keys: &[String]) -> Result<u64>;

    async fn set_add(&self, key: &str, member: &str) -> Result<()>;
    async fn set_remove(&self, key: &str, members: &[String]) -> Result<()>;
    async fn set_members(&self, key: &str) -> Result<Vec<String>>;

    async fn hash_put(&self, key: &str, field: &str, value: &[u8]) -> Result<()>;
    async fn hash_get(&self, key: &str, field: &str) -> Result<Option<Vec<u8>>>;
    /// Removes a field; true when it existed.
    async fn hash_remove(&self, key: &str, field: &str) -> Result<bool>;
    async fn hash_all(&self, key: &str) -> Result<Vec<(String, Vec<u8>)>>;
    async fn hash_len(&self, key: &str) -> Result<u64>;

    async fn zset_add(&self, key: &str, score: u64, member: &str) -> Result<()>;
    /// Members with `min <= score`, newest (highest score) first, at most `limit`.
    async fn zset_newest(&self, key: &str, min: u64, limit: usize) -> Result<Vec<(String, u64)>>;
    /// Removes members with `score < below`.
    async fn zset_trim(&self, key: &str, below: u64) -> Result<()>;

    /// Increments a counter that expires `window` after its first increment.
    async fn incr_window(&self, key: &str, window: Duration) -> Result<u64>;

    /// A cheap round trip, for readiness.
    async fn ping(&self) -> Result<()>;
}
