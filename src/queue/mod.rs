//! Queue mode: a flush pushes one apalis job per chunk of ops to Redis, and
//! `fga-wb worker` processes apply them.
//!
//! Retries are ours, not apalis-redis's (its Lua script would re-queue a
//! failed job up to 25 times at 1 s, 2 s, 3 s...): a handler never fails.
//! When a write fails transiently, the worker pushes a *new* job with the
//! ops that are still the newest on their keys, scheduled with `run_after`
//! at the next step of `queue.retry_schedule` (10 s, 30 s, 60 s by default),
//! and acknowledges the old one. A scheduled job lives in Redis, so it
//! survives a worker crash; a job whose worker dies mid-run is re-run by
//! apalis on another worker. After the last step the ops are dead-lettered
//! in fga-wb's own dead-letter hash, which nothing vacuums.

pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{TaskBuilder, TaskSink};
use apalis_redis::{ConnectionManager, RedisStorage};
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::buffer::redis::{now_ms, redis_error};
use crate::buffer::Taken;
use crate::config::Config;
use crate::error::{Error, Kind, Result};
use crate::tuple::{Op, TupleKey};

/// One job: up to `max_tuples_per_write` ops for one OpenFGA store.
///
/// Fields only ever get added, with defaults, so jobs queued by an older
/// version still decode (apalis stops a worker on a job it cannot decode).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The OpenFGA store.
    pub store_id: String,
    /// The model the ops were validated against, if pinned.
    #[serde(default)]
    pub model_id: Option<String>,
    /// The ops, each with the sequence number it had when acknowledged.
    pub ops: Vec<JobOp>,
    /// Retries before this run (0 on the first).
    #[serde(default)]
    pub attempt: u32,
    /// The last transient error, for the dead letter's reason.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// One op of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobOp {
    /// The tuple.
    pub tuple: TupleKey,
    /// Grant or revoke.
    pub op: Op,
    /// Its sequence number: a worker skips it if a newer op on the same
    /// tuple exists.
    pub seq: u64,
}

impl JobOp {
    /// The op as taken for writing on the job's `attempt`.
    pub(crate) fn taken(&self, attempt: u32) -> Taken {
        Taken {
            tuple: self.tuple.clone(),
            op: self.op,
            seq: self.seq,
            first: self.seq,
            attempts: attempt,
        }
    }
}

impl From<&Taken> for JobOp {
    fn from(t: &Taken) -> Self {
        JobOp {
            tuple: t.tuple.clone(),
            op: t.op,
            seq: t.seq,
        }
    }
}

/// Where jobs go. The real one is apalis-redis; [`FakeQueue`] records jobs
/// for unit tests.
pub(crate) trait JobSink: Send + Sync + 'static {
    /// Enqueues `job`, to run after `delay` (or as soon as possible).
    fn push(&self, job: Job, delay: Option<Duration>) -> BoxFuture<'_, Result<()>>;
}

/// The apalis queue name for a store: per OpenFGA store, in the store's
/// Redis hash slot.
pub(crate) fn queue_name(config: &Config) -> String {
    format!(
        "{}:{{{}}}:jobs:{}",
        config.redis.key_prefix, config.openfga.store_id, config.queue.name
    )
}

/// The apalis storage for `config`'s queue.
/// Jobs travel as plain JSON and are decoded by the handler: apalis stops a
/// worker on a payload it cannot decode, so a foreign or corrupt job must not
/// reach its decoder.
pub(crate) type Payload = serde_json::Value;

pub(crate) async fn storage(config: &Config) -> Result<RedisStorage<Payload, ConnectionManager>> {
    let conn = apalis_redis::connect(config.redis.url.as_str())
        .await
        .map_err(|e| {
            Error::new(Kind::Redis {
                detail: format!(
                    "cannot connect the job queue to {}: {e}",
                    crate::openfga::redact_url(&config.redis.url)
                ),
                transient: true,
            })
        })?;
    let cfg = apalis_redis::Config::default()
        .queue(queue_name(config))
        .heartbeat_interval(config.queue.heartbeat)
        .missed_heartbeats(3)
        // Fetch no more than the worker can start, so jobs are not parked
        // behind a busy worker.
        .batch_size(config.queue.worker_concurrency);
    Ok(RedisStorage::new(conn).with_config(cfg))
}

/// Pushes jobs to apalis-redis.
pub(crate) struct ApalisSink {
    storage: RedisStorage<Payload, ConnectionManager>,
}

impl ApalisSink {
    pub fn new(storage: RedisStorage<Payload, ConnectionManager>) -> Self {
        ApalisSink { storage }
    }
}

impl JobSink for ApalisSink {
    fn push(&self, job: Job, delay: Option<Duration>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut storage = self.storage.clone();
            let payload = serde_json::to_value(&job)
                .map_err(|e| Error::invalid_argument(format!("job: {e}")))?;
            let mut task = TaskBuilder::new(payload);
            if let Some(d) = delay {
                // apalis-redis keeps whole seconds and runs a job once the
                // current second reaches it: round up, never run early.
                let at = std::time::SystemTime::now() + d;
                let t = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                task = task.run_at_timestamp(t.as_secs() + u64::from(t.subsec_nanos() > 0));
            }
            storage.push_task(task.build()).await.map_err(|e| {
                Error::new(Kind::Redis {
                    detail: format!("cannot enqueue a write job: {e}"),
                    transient: true,
                })
            })
        })
    }
}

/// A queue in memory that records what was pushed.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct FakeQueue {
    pub pushed: std::sync::Mutex<Vec<(Job, Option<Duration>)>>,
}

#[cfg(test)]
impl JobSink for FakeQueue {
    fn push(&self, job: Job, delay: Option<Duration>) -> BoxFuture<'_, Result<()>> {
        self.pushed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((job, delay));
        Box::pin(futures::future::ready(Ok(())))
    }
}

/// Jobs by state, read with plain Redis commands (apalis-redis 1.0's own
/// stats calls fail on Redis 7).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct QueueStats {
    /// Jobs due to run now.
    pub pending: u64,
    /// Jobs a worker has fetched.
    pub running: u64,
    /// Jobs scheduled for later: retries waiting for their time.
    pub scheduled: u64,
    /// Workers that reported within the last three heartbeats.
    pub workers: Vec<String>,
}

/// Reads the queue's state.
pub async fn stats(config: &Config) -> Result<QueueStats> {
    let client = redis::Client::open(config.redis.url.as_str())
        .map_err(|e| Error::config(format!("redis.url: {e}")))?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(redis_error)?;
    let q = queue_name(config);
    let now = now_ms() / 1000;
    let active: u64 = redis::cmd("LLEN")
        .arg(format!("{q}:active"))
        .query_async(&mut c)
        .await
        .map_err(redis_error)?;
    let due: u64 = redis::cmd("ZCOUNT")
        .arg(format!("{q}:scheduled"))
        .arg("-inf")
        .arg(now)
        .query_async(&mut c)
        .await
        .map_err(redis_error)?;
    let later: u64 = redis::cmd("ZCOUNT")
        .arg(format!("{q}:scheduled"))
        .arg(format!("({now}"))
        .arg("+inf")
        .query_async(&mut c)
        .await
        .map_err(redis_error)?;
    let alive_since = now.saturating_sub(3 * config.queue.heartbeat.as_secs().max(1));
    let workers: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(format!("{q}:workers"))
        .arg(alive_since)
        .arg("+inf")
        .query_async(&mut c)
        .await
        .map_err(redis_error)?;
    let mut running = 0u64;
    for w in &workers {
        let n: u64 = redis::cmd("SCARD")
            .arg(format!("{q}:inflight:{w}"))
            .query_async(&mut c)
            .await
            .map_err(redis_error)?;
        running += n;
    }
    Ok(QueueStats {
        pending: active + due,
        running,
        scheduled: later,
        workers,
    })
}

/// Shared by the flusher: builds one job per chunk.
pub(crate) fn job_for(store_id: &str, model_id: Option<&str>, ops: &[Taken]) -> Job {
    Job {
        store_id: store_id.to_owned(),
        model_id: model_id.map(str::to_owned),
        ops: ops.iter().map(JobOp::from).collect(),
        attempt: 0,
        last_error: None,
    }
}

/// The sink used by a handle in queue mode.
pub(crate) type Sink = Arc<dyn JobSink>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::memory::MemoryStore;
    use crate::flush::Engine;

    fn engine(sink: Arc<FakeQueue>) -> Engine {
        let client = crate::openfga::Client::builder("http://127.0.0.1:9")
            .build()
            .unwrap();
        Engine {
            store: Arc::new(MemoryStore::new(1000)),
            client: client.clone(),
            writer: client,
            store_id: "01STORE".into(),
            model_id: Some("01MODEL".into()),
            cfg: crate::config::FlushConfig::default(),
            cache: Arc::new(crate::cache::CheckCache::new(
                10,
                Duration::from_secs(1),
                None,
            )),
            stats: Default::default(),
            changed: tokio::sync::watch::channel(0).0,
            sink: Some(sink),
            job_lease: Duration::from_secs(60),
            room_wanted: Default::default(),
            revoke_wanted: Default::default(),
            parallel: Default::default(),
            sleeping: Default::default(),
            timer_armed: Default::default(),
            wake: Default::default(),
            retry_deadline: Default::default(),
        }
    }

    /// A flush in queue mode pushes one job per chunk of at most
    /// `max_tuples_per_write` ops, in key order, a large object's ops in
    /// chunks of their own, each op with its sequence number, and writes
    /// nothing itself.
    #[tokio::test]
    async fn flush_pushes_one_job_per_chunk() {
        let fake = Arc::new(FakeQueue::default());
        let e = Arc::new(engine(fake.clone()));
        for i in 0..240 {
            let t = TupleKey::new(format!("user:u{i}"), "viewer", "document:1").unwrap();
            e.store.push(&t, Op::Grant).await.unwrap();
        }
        let r = TupleKey::new("user:u0", "viewer", "document:2").unwrap();
        e.store.push(&r, Op::Revoke).await.unwrap();

        let report = crate::flush::flush_once(e.clone()).await;
        assert_eq!(
            (report.queued, report.requests, report.applied),
            (241, 0, 0)
        );
        let pushed = fake.pushed.lock().unwrap().clone();
        let sizes: Vec<usize> = pushed.iter().map(|(j, _)| j.ops.len()).collect();
        // One object's 240 grants fill their own chunks; the revoke on
        // another object is not mixed into them.
        assert_eq!(sizes, [100, 100, 40, 1]);
        assert!(pushed.iter().all(|(j, delay)| j.store_id == "01STORE"
            && j.model_id.as_deref() == Some("01MODEL")
            && j.attempt == 0
            && delay.is_none()));
        let keys: Vec<String> = pushed
            .iter()
            .flat_map(|(j, _)| j.ops.iter().map(|o| o.tuple.to_string()))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "chunks are cut in key order");
        assert!(pushed
            .iter()
            .any(|(j, _)| j.ops.iter().any(|o| o.op == Op::Revoke)));
        let mut seqs: Vec<u64> = pushed
            .iter()
            .flat_map(|(j, _)| j.ops.iter().map(|o| o.seq))
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=241).collect::<Vec<_>>());
        // The jobs own the ops now: nothing is pending, all are in flight.
        let p = e.store.pending().await.unwrap();
        assert_eq!((p.total, p.in_flight), (0, 241));
    }
}
