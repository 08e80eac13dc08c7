//! KV on Redis: [`RedisKv`].
//!
//! Layout, per namespace `ns` (the `{ns}` hash tag keeps a namespace in one cluster slot):
//! - `lattice:kv:{<ns>}:e:<key>`: a hash with fields `v` (value), `m` (metadata, absent when
//!   none) and `x` (expiration in seconds, absent when none); with an expiration, the hash also
//!   carries Redis's own expiry (`PEXPIRE`, relative to the caller's clock), so Redis frees it
//!   by itself.
//! - `lattice:kv:{<ns>}:idx`: a sorted set of every key, all scores 0, so `ZRANGEBYLEX` walks
//!   keys in byte order (`SCAN` has no order).
//!
//! `put` and `delete` change the hash and the index in one `MULTI`/`EXEC`. `list` walks the
//! index and reads the hashes; an index member whose hash has expired or vanished is skipped and
//! removed (by a script that re-checks, so a concurrent `put` is never undone). Expiry is also
//! judged against the caller's `now`, so an injected clock is honoured.
//!
//! Signals across pods: [`RedisSignals`] publishes keys on one pub/sub channel.
//!
//! Every call is bounded by [`OPERATION_TIMEOUT`]; a Redis that is down answers `Unavailable`
//! within about [`CONNECT_TIMEOUT`], and the connection manager reconnects once it is back.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Value};

use crate::{BackendError, KvBackend, KvEntry, KvKey, SignalBus};

const BACKEND: &str = "redis";

/// How long one connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a command may wait for its answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound for one backend call, which may be several round trips (`list`).
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Index members read per round trip while listing.
const LIST_BATCH: usize = 128;

/// Removes an index member whose hash is gone, unless a `put` brought it back meanwhile.
const PRUNE_SCRIPT: &str = r"
for i, key in ipairs(KEYS) do
  if i > 1 and redis.call('EXISTS', key) == 0 then
    redis.call('ZREM', KEYS[1], ARGV[i - 1])
  end
end
return 0
";

#[derive(Clone)]
pub struct RedisKv {
    conn: ConnectionManager,
    prune: redis::Script,
}

impl std::fmt::Debug for RedisKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisKv").finish_non_exhaustive()
    }
}

fn unavailable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
    BackendError::unavailable(BACKEND, e)
}

async fn bounded<T>(fut: impl Future<Output = redis::RedisResult<T>>) -> Result<T, BackendError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, fut).await {
        Ok(r) => r.map_err(unavailable),
        Err(elapsed) => Err(unavailable(elapsed)),
    }
}

fn ns_tag(ns: &str) -> Vec<u8> {
    // `{` and `}` would change the hash tag; escape them so distinct namespaces stay distinct.
    let escaped = ns.replace('%', "%25").replace('{', "%7B").replace('}', "%7D");
    format!("lattice:kv:{{{escaped}}}").into_bytes()
}

fn entry_key(ns: &str, key: &str) -> Vec<u8> {
    let mut k = ns_tag(ns);
    k.extend_from_slice(b":e:");
    k.extend_from_slice(key.as_bytes());
    k
}

fn index_key(ns: &str) -> Vec<u8> {
    let mut k = ns_tag(ns);
    k.extend_from_slice(b":idx");
    k
}

fn parse_u64(v: Option<Vec<u8>>) -> Option<u64> {
    v.and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse().ok()))
}

fn parse_string(v: Option<Vec<u8>>) -> Option<String> {
    v.map(|b| String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

impl RedisKv {
    /// A backend for `url` (`redis://host:port/db`). Connects lazily: a Redis that is down makes
    /// calls fail with `Unavailable`, not this constructor.
    pub fn new(url: &str) -> Result<Self, BackendError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config).map_err(unavailable)?;
        Ok(Self { conn, prune: redis::Script::new(PRUNE_SCRIPT) })
    }
}

#[async_trait]
impl KvBackend for RedisKv {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn get(&self, ns: &str, key: &str, now: u64) -> Result<Option<KvEntry>, BackendError> {
        let mut conn = self.conn.clone();
        let (v, m, x): (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>) = bounded(
            redis::cmd("HMGET").arg(entry_key(ns, key)).arg("v").arg("m").arg("x").query_async(&mut conn),
        )
        .await?;
        let Some(value) = v else {
            return Ok(None);
        };
        let expiration = parse_u64(x);
        if expiration.is_some_and(|e| e <= now) {
            // Expired by the caller's clock; Redis removes it by its own.
            return Ok(None);
        }
        Ok(Some(KvEntry { value, metadata: parse_string(m), expiration }))
    }

    async fn put(&self, ns: &str, key: &str, entry: KvEntry, now: u64) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let hash = entry_key(ns, key);
        let mut fields: Vec<(&str, Vec<u8>)> = vec![("v", entry.value)];
        if let Some(m) = entry.metadata {
            fields.push(("m", m.into_bytes()));
        }
        if let Some(x) = entry.expiration {
            fields.push(("x", x.to_string().into_bytes()));
        }
        let mut pipe = redis::pipe();
        pipe.atomic().del(&hash).ignore().hset_multiple(&hash, &fields).ignore();
        if let Some(x) = entry.expiration {
            // Native expiry, relative to the caller's clock (which tests move by hand); reads
            // still judge expiry by the caller's `now`, so the two can never disagree visibly.
            let ttl_ms = x.saturating_sub(now).saturating_mul(1000).max(1);
            pipe.pexpire(&hash, i64::try_from(ttl_ms).unwrap_or(i64::MAX)).ignore();
        }
        pipe.zadd(index_key(ns), key.as_bytes(), 0).ignore();
        bounded(pipe.query_async::<()>(&mut conn)).await
    }

    async fn delete(&self, ns: &str, key: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        let mut pipe = redis::pipe();
        pipe.atomic().del(entry_key(ns, key)).ignore().zrem(index_key(ns), key.as_bytes()).ignore();
        bounded(pipe.query_async::<()>(&mut conn)).await
    }

    async fn list(
        &self,
        ns: &str,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
        now: u64,
    ) -> Result<Vec<KvKey>, BackendError> {
        let mut conn = self.conn.clone();
        let index = index_key(ns);
        // ZRANGEBYLEX bounds: `[x` inclusive, `(x` exclusive, `+` the end.
        let mut min: Vec<u8> = match start_after {
            Some(s) if s.as_bytes() >= prefix.as_bytes() => [b"(", s.as_bytes()].concat(),
            _ => [b"[", prefix.as_bytes()].concat(),
        };
        let max: Vec<u8> = match crate::sqlite::prefix_end(prefix.as_bytes()) {
            Some(end) => [b"(".as_slice(), &end].concat(),
            None => b"+".to_vec(),
        };
        let mut out = Vec::new();
        let work = async {
            while out.len() < limit {
                let batch = LIST_BATCH.max(limit - out.len());
                let members: Vec<Vec<u8>> = redis::cmd("ZRANGEBYLEX")
                    .arg(&index)
                    .arg(&min)
                    .arg(&max)
                    .arg("LIMIT")
                    .arg(0)
                    .arg(batch)
                    .query_async(&mut conn)
                    .await?;
                let Some(last) = members.last() else { break };
                min = [b"(", last.as_slice()].concat();
                let mut pipe = redis::pipe();
                for m in &members {
                    let key = String::from_utf8_lossy(m);
                    pipe.cmd("HMGET").arg(entry_key(ns, &key)).arg("v").arg("x").arg("m");
                }
                // `v` is read only to tell a live hash from a vanished one; HEXISTS would need
                // a second reply per member, and values are small next to a round trip.
                let replies: Vec<(Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>)> =
                    pipe.query_async(&mut conn).await?;
                let mut gone: Vec<&Vec<u8>> = Vec::new();
                for (m, (v, x, meta)) in members.iter().zip(replies) {
                    if v.is_none() {
                        gone.push(m);
                        continue;
                    }
                    let expiration = parse_u64(x);
                    if expiration.is_some_and(|e| e <= now) || out.len() >= limit {
                        continue;
                    }
                    out.push(KvKey {
                        name: String::from_utf8_lossy(m).into_owned(),
                        expiration,
                        metadata: parse_string(meta),
                    });
                }
                if !gone.is_empty() {
                    let mut inv = self.prune.prepare_invoke();
                    inv.key(&index);
                    for m in &gone {
                        inv.key(entry_key(ns, &String::from_utf8_lossy(m)));
                        inv.arg(m.as_slice());
                    }
                    let _: Value = inv.invoke_async(&mut conn).await?;
                }
                if members.len() < batch {
                    break;
                }
            }
            Ok(())
        };
        bounded(work).await?;
        Ok(out)
    }

    async fn ping(&self) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        bounded(async move { conn.ping::<String>().await.map(drop) }).await
    }
}

/// The pub/sub channel signals travel on.
pub const SIGNAL_CHANNEL: &str = "lattice:signals";
/// Wait before resubscribing after the subscription broke.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// Signals across pods over Redis pub/sub.
#[derive(Clone)]
pub struct RedisSignals {
    client: redis::Client,
    conn: ConnectionManager,
}

impl std::fmt::Debug for RedisSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSignals").finish_non_exhaustive()
    }
}

impl RedisSignals {
    pub fn new(url: &str) -> Result<Self, BackendError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config).map_err(unavailable)?;
        Ok(Self { client, conn })
    }
}

#[async_trait]
impl SignalBus for RedisSignals {
    fn name(&self) -> &'static str {
        BACKEND
    }

    async fn publish(&self, key: &str) -> Result<(), BackendError> {
        let mut conn = self.conn.clone();
        bounded(async move { conn.publish::<_, _, ()>(SIGNAL_CHANNEL, key).await }).await
    }

    fn subscribe(&self, deliver: std::sync::Arc<dyn Fn(&str) + Send + Sync>) {
        let client = self.client.clone();
        tokio::spawn(async move {
            use futures::StreamExt as _;
            loop {
                let subscribed = async {
                    let mut pubsub = tokio::time::timeout(CONNECT_TIMEOUT, client.get_async_pubsub())
                        .await
                        .map_err(|_| "timed out".to_string())?
                        .map_err(|e| e.to_string())?;
                    pubsub.subscribe(SIGNAL_CHANNEL).await.map_err(|e| e.to_string())?;
                    Ok::<_, String>(pubsub)
                }
                .await;
                match subscribed {
                    Ok(pubsub) => {
                        let mut messages = pubsub.into_on_message();
                        while let Some(msg) = messages.next().await {
                            if let Ok(key) = msg.get_payload::<String>() {
                                deliver(&key);
                            }
                        }
                        tracing::warn!("redis signal subscription ended; resubscribing");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot subscribe to redis signals; retrying"),
                }
                tokio::time::sleep(RESUBSCRIBE_DELAY).await;
            }
        });
    }
}
