//! Queue mode: a flush hands chunks of ops to jobs in Redis, and
//! `fga-wb worker` processes apply them.
//!
//! Jobs live in fga-wb's own keys, in the store's Redis slot, next to the ops
//! they hold (see `buffer/redis/store.lua`): enqueueing moves a chunk's ops
//! to a new job in the same script that records the job, so no op is ever
//! both pending and queued, or neither. A worker fetches a due job, claims
//! the ops the job still holds (a newer op on a key supersedes the job's),
//! writes them, and in one script finishes them and ends the job: it is
//! deleted when nothing is left, or rescheduled, to the millisecond, at the
//! next step of `queue.retry_schedule` (10 s, 30 s, 60 s by default) with
//! the ops that failed transiently. After the last step those ops are
//! dead-lettered. Nothing of a finished job stays in Redis.
//!
//! Workers are apalis workers (its worker loop, concurrency limit and
//! graceful stop) over a custom backend that fetches from these keys. A
//! worker holds a lease it renews; when it dies, the jobs it was running go
//! back to the queue and the keys it was writing are released within
//! `redis.writer_lease`.

#[cfg(feature = "redis")]
pub mod worker;

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::buffer::redis::RedisStore;
use crate::buffer::{key_of, op_of, stored_tuple, Taken};
use crate::error::{Error, Result};
use crate::flush::JobSink;
use crate::tuple::Op;

/// One job: up to `max_tuples_per_write` ops for one OpenFGA store, as it is
/// stored in Redis.
///
/// Fields only ever get added, with defaults, so jobs queued by an older
/// version still decode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The job's id in its store's queue.
    pub id: u64,
    /// The OpenFGA store.
    pub store_id: String,
    /// The model the ops were validated against; empty: the store's latest.
    #[serde(default)]
    pub model_id: String,
    /// The ops, each with the sequence number it had when acknowledged.
    pub ops: Vec<JobOp>,
    /// Retries before this run (0 on the first).
    #[serde(default)]
    pub attempt: u32,
    /// The last transient error, for the dead letter's reason.
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Job {
    /// A first run (attempt 0) of `ops` as job `id`.
    pub(crate) fn new(id: u64, store_id: &str, model_id: Option<&str>, ops: &[Taken]) -> Job {
        Job {
            id,
            store_id: store_id.to_owned(),
            model_id: model_id.unwrap_or_default().to_owned(),
            ops: ops.iter().map(JobOp::from).collect(),
            attempt: 0,
            last_error: None,
        }
    }
}

/// One op of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobOp {
    /// The tuple, `object#relation@user`.
    pub key: String,
    /// `g` (grant) or `r` (revoke).
    pub op: String,
    /// Its sequence number: a worker skips it if a newer op on the same
    /// tuple exists.
    pub seq: u64,
    /// The tuple's condition as JSON; empty: none.
    #[serde(default)]
    pub cond: String,
}

impl JobOp {
    /// The op as taken for writing on the job's `attempt`, by a worker in
    /// `term`; `None` for an op of an unknown kind (not written by fga-wb);
    /// with why its condition cannot be read, if it cannot (then it must
    /// not be written).
    pub(crate) fn taken(&self, attempt: u32, term: u64) -> Option<(Taken, Option<String>)> {
        let op = op_of(&self.op)?;
        let (tuple, unreadable) = stored_tuple(&self.key, &self.cond, op);
        let t = Taken {
            tuple,
            op,
            seq: self.seq,
            first: self.seq,
            attempts: attempt,
            term,
        };
        Some((t, unreadable))
    }
}

impl From<&Taken> for JobOp {
    fn from(t: &Taken) -> Self {
        JobOp {
            key: key_of(&t.tuple),
            op: match t.op {
                Op::Grant => "g".into(),
                Op::Revoke => "r".into(),
            },
            seq: t.seq,
            cond: t
                .tuple
                .condition
                .as_ref()
                .and_then(|c| serde_json::to_string(c).ok())
                .unwrap_or_default(),
        }
    }
}

/// The Redis store's job queue.
pub(crate) struct RedisJobs(pub Arc<RedisStore>);

impl JobSink for RedisJobs {
    fn enqueue<'a>(
        &'a self,
        store_id: &'a str,
        model_id: Option<&'a str>,
        ops: &'a [Taken],
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.0.enqueue(store_id, model_id, ops).await?;
            Ok(())
        })
    }
}

/// A queue in memory that records what was enqueued.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct FakeQueue {
    pub pushed: std::sync::Mutex<Vec<Job>>,
}

#[cfg(test)]
impl JobSink for FakeQueue {
    fn enqueue<'a>(
        &'a self,
        store_id: &'a str,
        model_id: Option<&'a str>,
        ops: &'a [Taken],
    ) -> BoxFuture<'a, Result<()>> {
        let mut pushed = self.pushed.lock().unwrap_or_else(|p| p.into_inner());
        let id = pushed.len() as u64 + 1;
        pushed.push(Job::new(id, store_id, model_id, ops));
        Box::pin(futures::future::ready(Ok(())))
    }
}

pub use crate::status::QueueStats;

/// Reads the queue's state from the Redis store.
pub(crate) async fn stats(store: &RedisStore) -> Result<QueueStats> {
    let q = store.queue_counts().await?;
    Ok(QueueStats {
        pending: q.due,
        running: q.running,
        scheduled: q.scheduled,
        workers: q.workers,
    })
}

/// A job as stored, or why it cannot be read.
pub(crate) fn decode(json: &str) -> std::result::Result<Job, Error> {
    serde_json::from_str(json)
        .map_err(|e| Error::internal(format!("a queued job does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flush::Engine;
    use crate::tuple::TupleKey;

    /// A flush in queue mode pushes one job per chunk of at most
    /// `max_tuples_per_write` ops, in key order, a large object's ops in
    /// chunks of their own, each op with its sequence number, and writes
    /// nothing itself.
    #[tokio::test]
    async fn flush_pushes_one_job_per_chunk() {
        let fake = Arc::new(FakeQueue::default());
        let e = Arc::new(Engine::for_tests(Some(fake.clone())));
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
        let sizes: Vec<usize> = pushed.iter().map(|j| j.ops.len()).collect();
        // One object's 240 grants fill their own chunks; the revoke on
        // another object is not mixed into them.
        assert_eq!(sizes, [100, 100, 40, 1]);
        assert!(pushed
            .iter()
            .all(|j| j.store_id == "01STORE" && j.model_id == "01MODEL" && j.attempt == 0));
        let keys: Vec<String> = pushed
            .iter()
            .flat_map(|j| j.ops.iter().map(|o| o.key.clone()))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "chunks are cut in key order");
        assert!(pushed.iter().any(|j| j.ops.iter().any(|o| o.op == "r")));
        let mut seqs: Vec<u64> = pushed
            .iter()
            .flat_map(|j| j.ops.iter().map(|o| o.seq))
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=241).collect::<Vec<_>>());
        // The jobs own the ops now: nothing is pending, all are in flight.
        let p = e.store.pending().await.unwrap();
        assert_eq!((p.total, p.in_flight), (0, 241));
    }
}
