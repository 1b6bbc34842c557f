//! The Redis store: pending ops shared by every process of an application,
//! durable before `grant`/`revoke` return, and the queue of write jobs.
//!
//! All state changes run in one Lua library (`redis.lua`), so concurrent
//! processes coalesce correctly. Concurrent pushes from one process are
//! batched into one script call by a small actor task: each caller is
//! answered only after the script that stored its op has returned.
//!
//! Every store instance is a *writer* with a lease that a background task
//! renews (`redis.writer_lease`, a third of it at a time). What a writer takes
//! is being written by it; a newer op on such a key waits behind that write
//! (it is never overtaken by the older op). When a writer dies, its lease
//! ends within `writer_lease`, and the next take, fetch or status by anyone
//! hands what it held back: ops to the ready queue, jobs to the job queue. A
//! write never outlives its writer's lease: its timeout is cut to what is
//! left of the lease.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::{
    key_of, tuple_of, Claim, DeadLetter, Finished, JobEnd, Outcome, Pending, Pushed, Relevant,
    Store, StoreEvent, Take, Taken,
};
use crate::error::{Error, Kind, Result};
use crate::model::{Dep, RelName};
use crate::openfga::redact_url;
use crate::tuple::{Condition, Op, TupleKey};

const SCRIPT: &str = include_str!("redis.lua");
/// Most ops one push script call carries.
const PUSH_BATCH: usize = 512;

/// The Redis store.
pub(crate) struct RedisStore {
    conn: ConnectionManager,
    client: redis::Client,
    script: redis::Script,
    prefix: String,
    /// This instance's name as a writer (`app:...` or `worker:...`).
    writer: String,
    lease: Duration,
    /// When the lease was last renewed (ms since the epoch).
    renewed: Arc<AtomicU64>,
    pushes: mpsc::Sender<PushRequest>,
    heartbeat: tokio::task::JoinHandle<()>,
}

struct PushRequest {
    key: String,
    op: Op,
    condition: String,
    reply: oneshot::Sender<Result<Pushed>>,
}

/// A store's queue: jobs by state, and the workers alive.
#[derive(Clone, Debug, Default)]
pub(crate) struct QueueCounts {
    pub due: u64,
    pub running: u64,
    pub scheduled: u64,
    pub workers: Vec<String>,
}

fn op_code(op: Op) -> &'static str {
    match op {
        Op::Grant => "g",
        Op::Revoke => "r",
    }
}

pub(crate) fn op_of(code: &str) -> Option<Op> {
    match code {
        "g" => Some(Op::Grant),
        "r" => Some(Op::Revoke),
        _ => None,
    }
}

/// A name no other writer (in any process, on any host) uses.
pub(crate) fn unique_name(kind: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let host: String = std::env::var("HOSTNAME")
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.'))
        .collect();
    format!("{kind}:{host}-{}-{}-{n}", std::process::id(), now_ms())
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A Redis failure as a crate error: connection problems are transient.
pub(crate) fn redis_error(e: redis::RedisError) -> Error {
    let transient = e.is_io_error()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_cluster_error();
    let text = e.to_string();
    let detail = if text.contains("WRONGTYPE") || text.contains("not an integer") {
        format!(
            "a key under fga-wb's prefix holds data fga-wb did not write ({text}); the call did not complete and an op it carried was not buffered: remove that key, or use another redis.key_prefix"
        )
    } else {
        text
    };
    Error::new(Kind::Redis { detail, transient })
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::new(Kind::Redis {
        detail: format!("unexpected data under fga-wb's keys: {}", what.into()),
        transient: false,
    })
}

pub(crate) fn condition_of(s: &str) -> Option<Condition> {
    if s.is_empty() {
        return None;
    }
    match serde_json::from_str(s) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %e, "ignoring an unreadable tuple condition in Redis");
            None
        }
    }
}

fn condition_text(c: &Option<Condition>) -> Result<String> {
    match c {
        Some(c) => serde_json::to_string(c)
            .map_err(|e| Error::internal(format!("cannot encode a condition: {e}"))),
        None => Ok(String::new()),
    }
}

/// Reads a script reply as a flat list of strings and integers.
fn items(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::Array(items) => Ok(items),
        Value::Nil => Ok(Vec::new()),
        other => Err(corrupt(format!("script returned {other:?}"))),
    }
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Int(i) => Ok(*i),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| corrupt("a number expected")),
        other => Err(corrupt(format!("a number expected, found {other:?}"))),
    }
}

fn text(v: &Value) -> Result<String> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Ok(s.clone()),
        Value::Int(i) => Ok(i.to_string()),
        Value::Nil => Ok(String::new()),
        other => Err(corrupt(format!("a string expected, found {other:?}"))),
    }
}

fn count(v: &[Value], i: usize) -> Result<u64> {
    Ok(v.get(i).map_or(Ok(0), int)?.max(0) as u64)
}

/// The arguments of one command of the script library: its name, then the
/// publish command (`PUBLISH`, or `SPUBLISH` on a cluster), then its own.
struct Args(Vec<Vec<u8>>);

impl Args {
    fn new(command: &str) -> Args {
        let mut a = Args(Vec::with_capacity(16));
        a.push(command).push("PUBLISH");
        a
    }

    fn push(&mut self, v: impl redis::ToRedisArgs) -> &mut Self {
        self.0.extend(v.to_redis_args());
        self
    }
}

/// Invokes one command of the script library.
async fn invoke(
    conn: &ConnectionManager,
    script: &redis::Script,
    prefix: &str,
    args: &Args,
) -> Result<Value> {
    let mut inv = script.prepare_invoke();
    inv.key(prefix);
    for a in &args.0 {
        inv.arg(a);
    }
    let mut conn = conn.clone();
    inv.invoke_async(&mut conn).await.map_err(redis_error)
}

impl RedisStore {
    /// Connects to Redis as a writer of kind `kind` (`app` or `worker`),
    /// and fails with a clear error if it cannot.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        store_id: &str,
        capacity: usize,
        lease: Duration,
        kind: &str,
    ) -> Result<RedisStore> {
        let client = redis::Client::open(url).map_err(|e| {
            Error::config(format!(
                "redis.url {:?} is not a Redis URL ({e})",
                redact_url(url)
            ))
        })?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let conn = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|e| {
                Error::new(Kind::Redis {
                    detail: format!("cannot connect to {}: {e}", redact_url(url)),
                    transient: true,
                })
            })?;
        // The braces make every key of one store hash to one cluster slot.
        let prefix = format!("{key_prefix}:{{{store_id}}}");
        let script = redis::Script::new(SCRIPT);
        let writer = unique_name(kind);
        let renewed = Arc::new(AtomicU64::new(0));
        // Register before anything is taken, so a take never finds its own
        // writer without a lease. Data that is not fga-wb's under the prefix
        // fails every call with a clear error, not the connect.
        match heartbeat_once(&conn, &script, &prefix, &writer, lease).await {
            Ok(first) => renewed.store(first, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "cannot take a Redis lease; retrying"),
        }
        let heartbeat = tokio::spawn(heartbeats(
            conn.clone(),
            script.clone(),
            prefix.clone(),
            writer.clone(),
            lease,
            renewed.clone(),
        ));
        let (pushes, rx) = mpsc::channel(4 * PUSH_BATCH);
        tokio::spawn(push_batches(
            conn.clone(),
            script.clone(),
            prefix.clone(),
            capacity,
            rx,
        ));
        Ok(RedisStore {
            conn,
            client,
            script,
            prefix,
            writer,
            lease,
            renewed,
            pushes,
            heartbeat,
        })
    }

    async fn call(&self, args: &Args) -> Result<Value> {
        invoke(&self.conn, &self.script, &self.prefix, args).await
    }

    /// This store's writer name.
    pub fn writer(&self) -> &str {
        &self.writer
    }

    async fn take_now(&self, max: usize, what: Take, up_to: u64) -> Result<Vec<Taken>> {
        let kinds = match what {
            Take::Revokes => "r",
            Take::All => "rg",
        };
        let mut a = Args::new("take");
        a.push(now_ms())
            .push(max)
            .push(kinds)
            .push(up_to)
            .push(&self.writer)
            .push(self.lease.as_millis() as u64);
        let v = items(self.call(&a).await?)?;
        self.renewed.store(now_ms(), Ordering::Relaxed);
        let corrupt = v.first().map_or(Ok(0), int)?;
        if corrupt > 0 {
            tracing::warn!(count = corrupt, prefix = %self.prefix, "dropped corrupt pending entries (unreadable, not written by fga-wb)");
        }
        let mut out = Vec::with_capacity(v.len() / 5);
        for c in v[1.min(v.len())..].chunks_exact(5) {
            let key = text(&c[0])?;
            let Some(op) = op_of(&text(&c[2])?) else {
                tracing::warn!(%key, "skipping an op of unknown kind in Redis");
                continue;
            };
            out.push(Taken {
                tuple: tuple_of(&key, condition_of(&text(&c[3])?)),
                op,
                seq: int(&c[1])? as u64,
                first: int(&c[4])? as u64,
                attempts: 0,
            });
        }
        Ok(out)
    }

    /// Ends ops with their outcomes; with `job`, also ends or reschedules it.
    async fn finish_now(
        &self,
        done: Vec<(Taken, Outcome)>,
        job: Option<&JobEnd>,
    ) -> Result<Finished> {
        let (job_id, action, due, json) = match job {
            None => (String::new(), "", 0, String::new()),
            Some(JobEnd::Done { id }) => (id.clone(), "done", 0, String::new()),
            Some(JobEnd::Retry { id, due_ms, json }) => {
                (id.clone(), "retry", *due_ms, json.clone())
            }
        };
        let mut a = Args::new("finish");
        a.push(now_ms())
            .push(&self.writer)
            .push(job_id)
            .push(action)
            .push(due)
            .push(json)
            .push(done.len());
        for (t, o) in &done {
            let (code, reason, err_code) = match o {
                Outcome::Applied => ("a", "", ""),
                Outcome::Dead { reason, code } => {
                    ("d", reason.as_str(), code.as_deref().unwrap_or_default())
                }
                Outcome::Retry => ("r", "", ""),
                Outcome::Stale => ("s", "", ""),
                Outcome::Busy => ("n", "", ""),
                Outcome::Keep => ("k", "", ""),
            };
            a.push(key_of(&t.tuple))
                .push(t.seq)
                .push(code)
                .push(reason)
                .push(err_code)
                .push(t.attempts + 1);
        }
        let v = items(self.call(&a).await?)?;
        Ok(Finished {
            applied: count(&v, 0)?,
            dead: count(&v, 1)?,
            requeued: count(&v, 2)?,
            superseded: count(&v, 3)?,
        })
    }

    async fn relevant_now(
        &self,
        rels: Option<&[Dep]>,
        object: &str,
        limit: usize,
    ) -> Result<Relevant> {
        // A model with no relations at all still means "only these".
        if rels.is_some_and(<[Dep]>::is_empty) {
            return Ok(Relevant {
                revokes: 0,
                grants: Some(Vec::new()),
            });
        }
        let mut a = Args::new("relevant");
        a.push(limit).push(object);
        match rels {
            None => {
                a.push(0);
            }
            Some(r) => {
                a.push(r.len());
                for d in r {
                    a.push(&d.rel).push(u8::from(d.same_object));
                }
            }
        }
        let v = items(self.call(&a).await?)?;
        let revokes = count(&v, 0)? as usize;
        let grants = count(&v, 1)? as usize;
        if revokes > 0 || grants > limit {
            return Ok(Relevant {
                revokes,
                grants: None,
            });
        }
        let mut list = Vec::with_capacity(grants);
        for c in v[2.min(v.len())..].chunks_exact(2) {
            list.push(tuple_of(&text(&c[0])?, condition_of(&text(&c[1])?)));
        }
        Ok(Relevant {
            revokes,
            grants: Some(list),
        })
    }

    async fn latest_now(&self, tuple: &TupleKey) -> Result<Option<(Op, bool)>> {
        let mut a = Args::new("latest");
        a.push(key_of(tuple));
        let v = items(self.call(&a).await?)?;
        let Some(first) = v.first() else {
            return Ok(None);
        };
        match op_of(&text(first)?) {
            Some(op) => Ok(Some((
                op,
                !text(v.get(1).unwrap_or(&Value::Nil))?.is_empty(),
            ))),
            None => {
                tracing::warn!(tuple = %tuple, "ignoring a corrupt pending entry in Redis");
                Ok(None)
            }
        }
    }

    async fn pending_now(&self) -> Result<Pending> {
        let mut a = Args::new("pending");
        a.push(now_ms());
        let v = items(self.call(&a).await?)?;
        let n = |i: usize| v.get(i).map_or(Ok(0), int);
        let (writes, deletes) = (n(0)?.max(0) as usize, n(1)?.max(0) as usize);
        let oldest = n(3)?;
        let reclaimed = n(5)?;
        if reclaimed > 0 {
            tracing::warn!(
                ops = reclaimed,
                "took back ops from a writer whose lease ended (a process or worker died)"
            );
        }
        Ok(Pending {
            writes,
            deletes,
            total: writes + deletes,
            in_flight: (n(2)?.max(0) + n(4)?.max(0)) as usize,
            oldest_age: (oldest >= 0)
                .then(|| Duration::from_millis(now_ms().saturating_sub(oldest as u64))),
        })
    }

    async fn clear_now(&self) -> Result<Vec<(TupleKey, Op)>> {
        let mut a = Args::new("clear");
        a.push(now_ms());
        let v = items(self.call(&a).await?)?;
        let mut out = Vec::with_capacity(v.len() / 3);
        for c in v.chunks_exact(3) {
            if let Some(op) = op_of(&text(&c[1])?) {
                out.push((tuple_of(&text(&c[0])?, condition_of(&text(&c[2])?)), op));
            }
        }
        Ok(out)
    }

    async fn dead_now(&self, ids: Option<&[u64]>, remove: bool) -> Result<Vec<DeadLetter>> {
        let key = format!("{}:dead", self.prefix);
        let mut conn = self.conn.clone();
        let raw: Vec<(Vec<u8>, Vec<u8>)> = match ids {
            None => redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?,
            Some([]) => Vec::new(),
            Some(ids) => {
                let vals: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
                    .arg(&key)
                    .arg(ids)
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                ids.iter()
                    .zip(vals)
                    .filter_map(|(id, v)| v.map(|v| (id.to_string().into_bytes(), v)))
                    .collect()
            }
        };
        let mut out = Vec::with_capacity(raw.len());
        for (id, json) in &raw {
            match std::str::from_utf8(json).ok().and_then(parse_dead) {
                Some(d) => out.push(d),
                None => tracing::warn!(
                    id = %String::from_utf8_lossy(id),
                    key = %key,
                    "skipping an unreadable dead letter (purge removes it)"
                ),
            }
        }
        if remove && !raw.is_empty() {
            let fields: Vec<&Vec<u8>> = raw.iter().map(|(id, _)| id).collect();
            let _: i64 = redis::cmd("HDEL")
                .arg(&key)
                .arg(fields)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
        }
        out.sort_by_key(|d| d.id);
        Ok(out)
    }

    /// Hands ops this writer took to a new job; returns the job's id, or
    /// `None` if none of them was still this writer's.
    pub async fn enqueue(
        &self,
        store_id: &str,
        model_id: Option<&str>,
        ops: &[Taken],
    ) -> Result<Option<u64>> {
        let mut a = Args::new("enqueue");
        a.push(now_ms())
            .push(&self.writer)
            .push(store_id)
            .push(model_id.unwrap_or_default())
            .push(ops.len());
        for t in ops {
            a.push(key_of(&t.tuple)).push(t.seq);
        }
        let id = int(&self.call(&a).await?)?;
        Ok((id > 0).then_some(id as u64))
    }

    /// Up to `max` due jobs for this worker (as stored: JSON), each with
    /// the claims it got for its ops, in order.
    pub async fn fetch_jobs(&self, max: usize) -> Result<Vec<(String, Vec<Claim>)>> {
        let mut a = Args::new("fetch");
        a.push(now_ms())
            .push(&self.writer)
            .push(self.lease.as_millis() as u64)
            .push(max);
        let v = items(self.call(&a).await?)?;
        self.renewed.store(now_ms(), Ordering::Relaxed);
        let bad = v.first().map_or(Ok(0), int)?;
        if bad > 0 {
            tracing::error!(jobs = bad, "set aside queued jobs that do not decode (not written by fga-wb, or corrupted); the ops they held are pending again");
            let _ = self
                .set_note(
                    "last_bad_job",
                    format!(
                        "{bad} jobs did not decode; set aside in :badjobs, their ops pending again"
                    ),
                )
                .await;
        }
        v[1.min(v.len())..]
            .chunks_exact(2)
            .map(|c| {
                let claims = text(&c[1])?
                    .bytes()
                    .map(|b| match b {
                        b'1' => Claim::Claimed,
                        b'2' => Claim::Busy,
                        _ => Claim::Stale,
                    })
                    .collect();
                Ok((text(&c[0])?, claims))
            })
            .collect()
    }

    /// Sets aside a job that does not decode; the ops it held are pending
    /// again. Returns how many.
    pub async fn drop_bad_job(&self, id: &str) -> Result<u64> {
        let mut a = Args::new("badjob");
        a.push(now_ms()).push(id);
        Ok(int(&self.call(&a).await?)?.max(0) as u64)
    }

    /// Jobs by state and the workers alive.
    pub async fn queue_counts(&self) -> Result<QueueCounts> {
        let mut a = Args::new("queue");
        a.push(now_ms());
        let v = items(self.call(&a).await?)?;
        Ok(QueueCounts {
            due: count(&v, 0)?,
            running: count(&v, 1)?,
            scheduled: count(&v, 2)?,
            workers: v[3.min(v.len())..]
                .iter()
                .map(text)
                .collect::<Result<_>>()?,
        })
    }

    /// How long a write may take from now and still end within this
    /// writer's lease (less a margin for the clocks and the finish).
    pub fn write_budget(&self) -> Duration {
        let renewed = self.renewed.load(Ordering::Relaxed);
        let lease_end = renewed + self.lease.as_millis() as u64;
        Duration::from_millis(lease_end.saturating_sub(now_ms() + LEASE_MARGIN_MS))
    }
}

/// Kept free at the end of a lease: a write must be answered and finished
/// before the lease could end.
const LEASE_MARGIN_MS: u64 = 1000;

async fn heartbeat_once(
    conn: &ConnectionManager,
    script: &redis::Script,
    prefix: &str,
    writer: &str,
    lease: Duration,
) -> Result<u64> {
    let at = now_ms();
    let mut a = Args::new("heartbeat");
    a.push(at).push(writer).push(lease.as_millis() as u64);
    let v = invoke(conn, script, prefix, &a).await?;
    if int(&v)? == 0 {
        tracing::error!(
            writer,
            "this process's Redis lease had ended (it was paused or cut off from Redis for longer than redis.writer_lease): \
             the ops it was writing were handed to other writers"
        );
    }
    Ok(at)
}

/// Renews the lease a third of the way through, until the store is dropped.
async fn heartbeats(
    conn: ConnectionManager,
    script: redis::Script,
    prefix: String,
    writer: String,
    lease: Duration,
    renewed: Arc<AtomicU64>,
) {
    loop {
        tokio::time::sleep(lease / 3).await;
        match heartbeat_once(&conn, &script, &prefix, &writer, lease).await {
            Ok(at) => renewed.store(at, Ordering::Relaxed),
            Err(e) => tracing::warn!(error = %e, "cannot renew the Redis lease; retrying"),
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

#[derive(serde::Deserialize)]
struct StoredDead {
    id: u64,
    key: String,
    op: String,
    seq: u64,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    attempts: u32,
    #[serde(default)]
    dead_at: u64,
    #[serde(default)]
    cond: String,
}

fn parse_dead(json: &str) -> Option<DeadLetter> {
    let d: StoredDead = serde_json::from_str(json).ok()?;
    let tuple = tuple_of(&d.key, condition_of(&d.cond));
    tuple.validate().ok()?;
    Some(DeadLetter {
        id: d.id,
        tuple,
        op: op_of(&d.op)?,
        seq: d.seq,
        reason: d.reason,
        code: (!d.code.is_empty()).then_some(d.code),
        attempts: d.attempts,
        dead_at: UNIX_EPOCH + Duration::from_secs(d.dead_at),
    })
}

/// Collects concurrent pushes into script calls, up to `PUSH_PIPELINE` of
/// them in flight at once, so Redis has the next batch while the replies of
/// the last are handed out. (One caller's ops never share a batch or race:
/// each waits for its acknowledgement before its next op.)
async fn push_batches(
    conn: ConnectionManager,
    script: redis::Script,
    prefix: String,
    capacity: usize,
    mut rx: mpsc::Receiver<PushRequest>,
) {
    let mut running = futures::stream::FuturesUnordered::new();
    let mut open = true;
    // How many ops the last call carried: callers woken by its replies
    // come back within microseconds, so the next call waits a moment for
    // about as many.
    let mut last = 1;
    loop {
        // Another call goes out while one is in flight only when enough
        // ops wait for it: small calls cost Redis more per op than a short
        // wait costs the callers.
        let room =
            running.is_empty() || (running.len() < PUSH_PIPELINE && rx.len() >= PUSH_PIPELINE_MIN);
        tokio::select! {
            batch = collect(&mut rx, last), if open && room => {
                if batch.is_empty() {
                    open = false;
                    continue;
                }
                last = batch.len();
                running.push(push_batch(conn.clone(), script.clone(), prefix.clone(), capacity, batch));
            }
            Some(()) = running.next(), if !running.is_empty() => {}
            else => return,
        }
    }
}

/// The next batch: what is waiting, and for up to `PUSH_LINGER` more, until
/// there are `want` (or `PUSH_BATCH`). Empty when the channel closed.
async fn collect(rx: &mut mpsc::Receiver<PushRequest>, want: usize) -> Vec<PushRequest> {
    let mut batch = Vec::with_capacity(PUSH_BATCH);
    if rx.recv_many(&mut batch, PUSH_BATCH).await == 0 {
        return batch;
    }
    let until = tokio::time::Instant::now() + PUSH_LINGER;
    while batch.len() < want.min(PUSH_BATCH) {
        let room = PUSH_BATCH - batch.len();
        match tokio::time::timeout_at(until, rx.recv_many(&mut batch, room)).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    batch
}

/// Longest a push waits for others to share its script call.
const PUSH_LINGER: Duration = Duration::from_micros(200);

/// Most push script calls one store has in flight at once.
const PUSH_PIPELINE: usize = 4;
/// Ops waiting that justify a second push call in flight.
const PUSH_PIPELINE_MIN: usize = 32;

async fn push_batch(
    mut conn: ConnectionManager,
    script: redis::Script,
    prefix: String,
    capacity: usize,
    batch: Vec<PushRequest>,
) {
    let mut inv = script.prepare_invoke();
    inv.key(&prefix)
        .arg("push")
        .arg("PUBLISH")
        .arg(now_ms())
        .arg(capacity)
        .arg(batch.len());
    for p in &batch {
        inv.arg(&p.key).arg(op_code(p.op)).arg(&p.condition);
    }
    let result: Result<Vec<Value>> = match inv.invoke_async::<Value>(&mut conn).await {
        Ok(v) => items(v),
        Err(e) => Err(redis_error(e)),
    };
    match result {
        Ok(v) if v.len() == batch.len() * 2 + 2 => {
            let pending = int(&v[v.len() - 2]).unwrap_or(0).max(0) as usize;
            let corrupt = int(&v[v.len() - 1]).unwrap_or(0);
            if corrupt > 0 {
                tracing::warn!(count = corrupt, prefix = %prefix, "replaced corrupt pending entries in Redis");
            }
            for (i, p) in batch.into_iter().enumerate() {
                let seq = int(&v[2 * i]).unwrap_or(-1);
                let reply = if seq < 0 {
                    Err(Error::new(Kind::BufferFull {
                        capacity,
                        waited: None,
                    }))
                } else {
                    Ok(Pushed {
                        coalesced: int(&v[2 * i + 1]).unwrap_or(0) == 1,
                        pending,
                    })
                };
                let _ = p.reply.send(reply);
            }
        }
        Ok(v) => {
            let e = corrupt(format!("push returned {} items", v.len()));
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

impl Store for RedisStore {
    fn push<'a>(&'a self, tuple: &'a TupleKey, op: Op) -> BoxFuture<'a, Result<Pushed>> {
        Box::pin(async move {
            let condition = condition_text(&tuple.condition)?;
            let (reply, rx) = oneshot::channel();
            self.pushes
                .send(PushRequest {
                    key: key_of(tuple),
                    op,
                    condition,
                    reply,
                })
                .await
                .map_err(|_| Error::new(Kind::Shutdown))?;
            rx.await.map_err(|_| Error::new(Kind::Shutdown))?
        })
    }

    fn take(&self, max: usize, what: Take, up_to: u64) -> BoxFuture<'_, Result<Vec<Taken>>> {
        Box::pin(self.take_now(max, what, up_to))
    }

    fn finish<'a>(
        &'a self,
        done: Vec<(Taken, Outcome)>,
        job: Option<&'a JobEnd>,
    ) -> BoxFuture<'a, Result<Finished>> {
        Box::pin(self.finish_now(done, job))
    }

    fn relevant<'a>(
        &'a self,
        rels: Option<&'a [Dep]>,
        object: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Relevant>> {
        Box::pin(self.relevant_now(rels, object, limit))
    }

    fn latest<'a>(&'a self, tuple: &'a TupleKey) -> BoxFuture<'a, Result<Option<(Op, bool)>>> {
        Box::pin(self.latest_now(tuple))
    }

    fn last_seq(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let v: Option<String> = redis::cmd("GET")
                .arg(format!("{}:seq", self.prefix))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            match v {
                None => Ok(0),
                Some(s) => s.parse().map_err(|_| {
                    corrupt(format!(
                        "{}:seq holds {:?}, not a number; it was not written by fga-wb",
                        self.prefix,
                        s.chars().take(40).collect::<String>()
                    ))
                }),
            }
        })
    }

    fn pending(&self) -> BoxFuture<'_, Result<Pending>> {
        Box::pin(self.pending_now())
    }

    fn pending_now(&self) -> Option<Pending> {
        None
    }

    fn clear(&self) -> BoxFuture<'_, Result<Vec<(TupleKey, Op)>>> {
        Box::pin(self.clear_now())
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>>> {
        Box::pin(self.dead_now(None, false))
    }

    fn remove_dead_letters<'a>(
        &'a self,
        ids: Option<&'a [u64]>,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>>> {
        Box::pin(self.dead_now(ids, true))
    }

    fn shared(&self) -> bool {
        true
    }

    fn write_budget(&self) -> Option<Duration> {
        Some(self.write_budget())
    }

    fn blocked_up_to(&self, up_to: u64) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let mut a = Args::new("blocked");
            a.push(up_to);
            Ok(int(&self.call(&a).await?)?.max(0) as u64)
        })
    }

    fn release(&self, hand_back: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.heartbeat.abort();
            if hand_back {
                let mut a = Args::new("release");
                a.push(now_ms()).push(&self.writer);
                self.call(&a).await?;
            }
            Ok(())
        })
    }

    fn shared_stats(&self) -> BoxFuture<'_, Result<std::collections::HashMap<String, String>>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("HGETALL")
                .arg(format!("{}:stats", self.prefix))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)
        })
    }

    fn set_note(&self, name: &'static str, value: String) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("HSET")
                .arg(format!("{}:stats", self.prefix))
                .arg(name)
                .arg(value)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(())
        })
    }

    fn generation<'a>(&'a self, rels: Option<&'a [RelName]>) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let key = format!("{}:gen", self.prefix);
            let mut cmd = redis::cmd("HMGET");
            cmd.arg(&key);
            match rels {
                Some([]) => return Ok(0),
                Some(r) => cmd.arg(r),
                None => cmd.arg("*"),
            };
            let vals: Vec<Option<u64>> = cmd.query_async(&mut conn).await.map_err(redis_error)?;
            Ok(vals.into_iter().flatten().fold(0u64, u64::wrapping_add))
        })
    }

    fn events(
        &self,
    ) -> Option<BoxFuture<'static, Result<futures::stream::BoxStream<'static, StoreEvent>>>> {
        let client = self.client.clone();
        let channel = format!("{}:events", self.prefix);
        Some(Box::pin(async move {
            let mut ps = client.get_async_pubsub().await.map_err(redis_error)?;
            ps.subscribe(&channel).await.map_err(redis_error)?;
            let stream = ps.into_on_message().map(|msg| {
                let payload: String = msg.get_payload().unwrap_or_default();
                match payload.split_once(' ') {
                    Some(("op", rel)) => StoreEvent::Changed(rel.to_owned()),
                    _ if payload == "finished" => StoreEvent::Finished,
                    _ if payload == "jobs" => StoreEvent::Jobs,
                    _ => StoreEvent::All,
                }
            });
            Ok(stream.boxed())
        }))
    }
}
