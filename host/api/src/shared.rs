//! What replicas of one host share in Redis (`div serve --redis redis://…`): a result cache for
//! models whose owner allows it, and the per-permit rate limits.
//!
//! **The cache.** An answer is stored under `div:result:v1:<sha256(fingerprint, route, input)>`,
//! where the fingerprint covers the model's manifest (every file's SHA-256) and its plugin, so
//! new weights or a new plugin never meet an old answer. The cache is read only after the gate
//! admitted the caller: it never answers anyone the model would not. A hit is charged like a
//! miss (the owner's price buys the answer, not the compute; `div_result_cache_total` shows the
//! hits), and skips the sandbox and the backend.
//!
//! **Rate limits.** A permit's requests are counted per second in `div:rate:<permit>:<second>`
//! (`INCR`, expiring after two seconds), so N replicas together allow the permit its rate, not N
//! times it.
//!
//! **Faults.** Redis is an accelerator, never the source of truth: a call that fails or takes
//! longer than [`CALL_TIMEOUT`] counts as a miss (the model runs) or falls back to the replica's
//! own rate bucket, and the connection is re-opened in the background.

use std::time::Duration;

use alloy::primitives::B256;
use redis::aio::ConnectionManager;

/// Longest a Redis call may take before it is treated as a miss.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(200);

/// A connection to the shared Redis.
#[derive(Clone)]
pub struct Shared {
    conn: ConnectionManager,
}

impl Shared {
    /// Connects to `url` (`redis://host:port/db`).
    pub async fn connect(url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let conn =
            tokio::time::timeout(Duration::from_secs(5), ConnectionManager::new(client)).await.map_err(
                |_| redis::RedisError::from((redis::ErrorKind::Io, "connecting to Redis timed out")),
            )??;
        Ok(Self { conn })
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
        let mut c = self.conn.clone();
        match tokio::time::timeout(CALL_TIMEOUT, cmd.query_async::<T>(&mut c)).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::debug!("redis: {e}");
                None
            }
            Err(_) => None,
        }
    }

    /// The cached answer under `key`; `Err(())` when Redis did not answer (a miss then).
    pub async fn get(&self, key: &B256) -> Result<Option<Vec<u8>>, ()> {
        self.run::<Option<Vec<u8>>>(redis::cmd("GET").arg(result_key(key))).await.ok_or(())
    }

    /// Keeps `value` under `key` for `ttl`.
    pub async fn put(&self, key: &B256, value: &[u8], ttl: Duration) {
        let secs = ttl.as_secs().max(1);
        let _ = self.run::<()>(redis::cmd("SET").arg(result_key(key)).arg(value).arg("EX").arg(secs)).await;
    }

    /// Counts one request of `permit` in this second; `Some(allowed)`, or `None` when Redis did
    /// not answer.
    pub async fn take_rate(&self, permit: B256, per_sec: u32) -> Option<bool> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
        self.take_rate_at(permit, per_sec, now).await
    }

    /// [`Shared::take_rate`] in the window of unix second `second`.
    pub async fn take_rate_at(&self, permit: B256, per_sec: u32, second: u64) -> Option<bool> {
        let key = format!("div:rate:{permit:x}:{second}");
        let mut pipe = redis::pipe();
        pipe.cmd("INCR").arg(&key).cmd("EXPIRE").arg(&key).arg(2).ignore();
        let mut c = self.conn.clone();
        let (count,): (u64,) = match tokio::time::timeout(CALL_TIMEOUT, pipe.query_async(&mut c)).await {
            Ok(Ok(v)) => v,
            _ => return None,
        };
        Some(count <= u64::from(per_sec))
    }
}

impl div_meter::SharedRate for Shared {
    fn take(
        &self,
        key: B256,
        per_sec: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<bool>> + Send + '_>> {
        Box::pin(self.take_rate(key, per_sec))
    }
}

fn result_key(key: &B256) -> String {
    format!("div:result:v1:{key:x}")
}

/// The cache key of an answer: the model's fingerprint, the route, and the input as the route
/// read it.
pub fn cache_key(fingerprint: &[u8; 32], route: &str, input: &[u8]) -> B256 {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(b"div result v1\0");
    h.update(fingerprint);
    h.update(route.as_bytes());
    h.update([0]);
    h.update(input);
    B256::from(<[u8; 32]>::from(h.finalize()))
}

/// Embedding vectors and their token count as the cache keeps them: `prompt_tokens`, rows, row
/// length (u32 little-endian each), then the floats.
pub fn encode_vectors(vectors: &[Vec<f32>], prompt_tokens: u32) -> Vec<u8> {
    let dims = vectors.first().map_or(0, Vec::len);
    let mut out = Vec::with_capacity(12 + vectors.len() * dims * 4);
    out.extend_from_slice(&prompt_tokens.to_le_bytes());
    out.extend_from_slice(&u32::try_from(vectors.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&u32::try_from(dims).unwrap_or(u32::MAX).to_le_bytes());
    for v in vectors {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// The inverse of [`encode_vectors`]; `None` for anything else (a damaged or foreign entry is a
/// miss).
pub fn decode_vectors(bytes: &[u8]) -> Option<(Vec<Vec<f32>>, u32)> {
    let word = |i: usize| bytes.get(i * 4..i * 4 + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
    let (tokens, rows, dims) = (word(0)?, word(1)? as usize, word(2)? as usize);
    let floats = bytes.get(12..)?;
    if floats.len() != rows.checked_mul(dims)?.checked_mul(4)? {
        return None;
    }
    let mut vectors = Vec::with_capacity(rows);
    for r in 0..rows {
        let row = &floats[r * dims * 4..(r + 1) * dims * 4];
        vectors.push(row.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
    }
    Some((vectors, tokens))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_round_trip_exactly_and_damage_is_a_miss() {
        let v = vec![vec![0.1f32, -2.5, f32::MIN_POSITIVE], vec![3.0, 4.0, 5.0]];
        let bytes = encode_vectors(&v, 7);
        assert_eq!(decode_vectors(&bytes), Some((v, 7)));
        assert_eq!(decode_vectors(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode_vectors(b"short"), None);
        assert_eq!(decode_vectors(&encode_vectors(&[], 0)), Some((vec![], 0)));
    }

    #[test]
    fn the_key_changes_with_the_model_the_route_and_the_input() {
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let k = cache_key(&a, "embeddings", b"hello");
        assert_eq!(k, cache_key(&a, "embeddings", b"hello"));
        assert_ne!(k, cache_key(&b, "embeddings", b"hello"), "another model or plugin");
        assert_ne!(k, cache_key(&a, "chat", b"hello"));
        assert_ne!(k, cache_key(&a, "embeddings", b"hello!"));
    }
}
