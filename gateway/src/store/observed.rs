//! Counts every store call, its failures and its latency, for `/metrics`,
//! whatever the backend.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::kv::{Durability, Kv, Result};

/// Upper bounds of the latency histogram, in seconds.
pub const BUCKETS: [f64; 8] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0];

#[derive(Debug, Default)]
pub struct StoreStats {
    pub calls: AtomicU64,
    pub errors: AtomicU64,
    pub micros: AtomicU64,
    pub buckets: [AtomicU64; BUCKETS.len()],
}

impl StoreStats {
    fn observe<T>(&self, started: Instant, result: &Result<T>) {
        let elapsed = started.elapsed();
        self.calls.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.micros.fetch_add(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
        if let Some(i) = BUCKETS.iter().position(|b| elapsed.as_secs_f64() <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

pub struct Observed {
    pub inner: Arc<dyn Kv>,
    pub stats: Arc<StoreStats>,
}

macro_rules! observed {
    ($self:ident, $call:expr) => {{
        let started = Instant::now();
        let result = $call.await;
        $self.stats.observe(started, &result);
        result
    }};
}

#[async_trait]
impl Kv for Observed {
    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        observed!(self, self.inner.get(key))
    }
    async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
        durability: Durability,
    ) -> Result<()> {
        observed!(self, self.inner.set(key, value, ttl, durability))
    }
    async fn set_nx(&self, key: &str, value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        observed!(self, self.inner.set_nx(key, value, ttl))
    }
    async fn set_if_unchanged(
        &self,
        key: &str,
        expected: &[u8],
        value: &[u8],
        ttl: Duration,
        durability: Durability,
    ) -> Result<bool> {
        observed!(self, self.inner.set_if_unchanged(key, expected, value, ttl, durability))
    }
    async fn take(&self, key: &str) -> Result<Option<Vec<u8>>> {
        observed!(self, self.inner.take(key))
    }
    async fn del(&self, keys: &[String]) -> Result<u64> {
        observed!(self, self.inner.del(keys))
    }
    async fn set_add(&self, key: &str, member: &str) -> Result<()> {
        observed!(self, self.inner.set_add(key, member))
    }
    async fn set_remove(&self, key: &str, members: &[String]) -> Result<()> {
        observed!(self, self.inner.set_remove(key, members))
    }
    async fn set_members(&self, key: &str) -> Result<Vec<String>> {
        observed!(self, self.inner.set_members(key))
    }
    async fn hash_put(&self, key: &str, field: &str, value: &[u8]) -> Result<()> {
        observed!(self, self.inner.hash_put(key, field, value))
    }
    async fn hash_get(&self, key: &str, field: &str) -> Result<Option<Vec<u8>>> {
        observed!(self, self.inner.hash_get(key, field))
    }
    async fn hash_remove(&self, key: &str, field: &str) -> Result<bool> {
        observed!(self, self.inner.hash_remove(key, field))
    }
    async fn hash_all(&self, key: &str) -> Result<Vec<(String, Vec<u8>)>> {
        observed!(self, self.inner.hash_all(key))
    }
    async fn hash_len(&self, key: &str) -> Result<u64> {
        observed!(self, self.inner.hash_len(key))
    }
    async fn zset_add(&self, key: &str, score: u64, member: &str) -> Result<()> {
        observed!(self, self.inner.zset_add(key, score, member))
    }
    async fn zset_newest(&self, key: &str, min: u64, limit: usize) -> Result<Vec<(String, u64)>> {
        observed!(self, self.inner.zset_newest(key, min, limit))
    }
    async fn zset_trim(&self, key: &str, below: u64) -> Result<()> {
        observed!(self, self.inner.zset_trim(key, below))
    }
    async fn incr_window(&self, key: &str, window: Duration) -> Result<u64> {
        observed!(self, self.inner.incr_window(key, window))
    }
    async fn ping(&self) -> Result<()> {
        observed!(self, self.inner.ping())
    }
}
