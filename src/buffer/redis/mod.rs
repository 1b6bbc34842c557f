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

mod conn;

use futures::future::BoxFuture;
use futures::StreamExt;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::{
    condition_of, key_of, op_of, tuple_of, Claim, DeadLetter, Finished, JobEnd, KeyUsage, Outcome,
    Pending, Pushed, Relevant, Replayed, Store, StoreEvent, Take, Taken,
};
use crate::error::{Error, Kind, Result};
use crate::model::{Dep, RelName};
use crate::tuple::{Condition, Op, TupleKey};
pub(crate) use conn::{Conn, Target};

const SCRIPT: &str = include_str!("store.lua");
/// Most ops one push script call carries.
const PUSH_BATCH: usize = 512;

/// The Redis store.
pub(crate) struct RedisStore {
    conn: Conn,
    target: Target,
    /// `PUBLISH`, or `SPUBLISH` on a cluster (messages stay in the shard).
    publish: &'static str,
    script: redis::Script,
    prefix: String,
    /// This instance's name as a writer (`app:...` or `worker:...`).
    writer: String,
    lease: Duration,
    /// When the lease was last renewed (ms since the epoch).
    renewed: Arc<AtomicU64>,
    watch: Arc<Watch>,
    pushes: mpsc::Sender<PushRequest>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// Most keys the store holds (`buffer.capacity`).
    capacity: usize,
}

/// What this process knows that a Redis which lost data would not, to
/// prove the loss (see `heartbeat` in store.lua).
#[derive(Default)]
struct Watch {
    /// The store's epoch in Redis as last seen; empty before the first look.
    epoch: std::sync::Mutex<String>,
    /// The highest sequence number this process acknowledged under `epoch`.
    acked: AtomicU64,
    /// Dropped connections and epoch changes seen. Part of every
    /// generation: a connection that dropped may come back to a replica
    /// promoted without the last writes, where a rolled-back generation
    /// counter must not re-validate an answer cached before them.
    resets: AtomicU64,
    /// A connection dropped, and no heartbeat has succeeded since.
    dropped: std::sync::atomic::AtomicBool,
    /// Until when (ms since the epoch) checks fail closed after a dropped
    /// connection came back: long enough for every live process to run a
    /// heartbeat, and so to record a loss of what *it* acknowledged, which
    /// this process cannot see.
    quiet_until: AtomicU64,
    /// Wakes the heartbeat task at once.
    wake: tokio::sync::Notify,
}

impl Watch {
    fn epoch(&self) -> String {
        self.epoch.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Takes what a heartbeat found; `lost_now` when it recorded a loss.
    fn saw(&self, epoch: &str, seq: u64, lost_now: bool) {
        let Ok(mut known) = self.epoch.lock() else {
            return;
        };
        if *known != epoch || lost_now {
            // A new epoch: what was acknowledged before is accounted for
            // (reported as lost, or by whoever moved the store on).
            *known = epoch.to_owned();
            self.acked.store(seq, Ordering::Relaxed);
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How a push batch waits for replicas (`redis.wait_replicas`).
#[derive(Clone, Copy)]
struct Replication {
    replicas: u32,
    timeout: Duration,
    fail: bool,
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
    redis_kind(&e).caused_by(e)
}

fn redis_kind(e: &redis::RedisError) -> Error {
    let transient = e.is_io_error()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_cluster_error();
    let text = e.to_string();
    if text.contains("OOM") && text.contains("maxmemory") {
        return Error::new(Kind::Redis {
            detail: "Redis is full (its maxmemory is reached) and refuses writes: nothing was buffered; raise maxmemory, or let the flush drain it (`fga-wb status` shows what fga-wb holds)".into(),
            transient: true,
        });
    }
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

fn bytes(v: &Value) -> Result<Vec<u8>> {
    match v {
        Value::BulkString(b) => Ok(b.clone()),
        other => text(other).map(String::into_bytes),
    }
}

fn count(v: &[Value], i: usize) -> Result<u64> {
    Ok(v.get(i).map_or(Ok(0), int)?.max(0) as u64)
}

/// The arguments of one command of the script library: its name, then the
/// publish command (`PUBLISH`, or `SPUBLISH` on a cluster), then its own.
struct Args(Vec<Vec<u8>>);

impl Args {
    fn new(command: &str, publish: &str) -> Args {
        let mut a = Args(Vec::with_capacity(16));
        a.push(command).push(publish);
        a
    }

    fn push(&mut self, v: impl redis::ToRedisArgs) -> &mut Self {
        self.0.extend(v.to_redis_args());
        self
    }
}

/// Invokes one command of the script library.
async fn invoke(conn: &Conn, script: &redis::Script, prefix: &str, args: &Args) -> Result<Value> {
    let mut inv = script.prepare_invoke();
    inv.key(prefix);
    for a in &args.0 {
        inv.arg(a);
    }
    let mut conn = conn.clone();
    inv.invoke_async(&mut conn).await.map_err(redis_error)
}

impl RedisStore {
    /// Connects to Redis (one node or a cluster) as a writer of kind
    /// `kind` (`app` or `worker`), and fails with a clear error if it
    /// cannot or if the server does not run Lua scripts.
    pub async fn connect(
        config: &crate::config::RedisConfig,
        store_id: &str,
        capacity: usize,
        kind: &str,
    ) -> Result<RedisStore> {
        let lease = config.writer_lease;
        let target = Target::parse(&config.url)?;
        let watch = Arc::new(Watch::default());
        let on_disconnect: conn::OnDisconnect = {
            let watch = watch.clone();
            Arc::new(move || {
                watch.dropped.store(true, Ordering::Relaxed);
                watch.resets.fetch_add(1, Ordering::Relaxed);
                watch.wake.notify_one();
            })
        };
        let mut conn = conn::connect(&target, on_disconnect.clone()).await?;
        conn::check_server(&mut conn, &target).await?;
        // Pushes go on a connection of their own: their batches are
        // pipelined, a WAIT after one covers exactly the pushes before it,
        // and nothing else waits behind them.
        let push_conn = conn::connect(&target, on_disconnect).await?;
        let publish = if target.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        // The braces make every key of one store hash to one cluster slot.
        let prefix = format!("{}:{{{store_id}}}", config.key_prefix);
        let script = redis::Script::new(SCRIPT);
        let writer = unique_name(kind);
        let renewed = Arc::new(AtomicU64::new(0));
        // Register before anything is taken, so a take never finds its own
        // writer without a lease. Data that is not fga-wb's under the prefix
        // fails every call with a clear error, not the connect.
        let beat = Heartbeat {
            conn: conn.clone(),
            script: script.clone(),
            prefix: prefix.clone(),
            publish,
            writer: writer.clone(),
            lease,
            renewed: renewed.clone(),
            watch: watch.clone(),
        };
        if let Err(e) = beat.once().await {
            tracing::warn!(error = %e, "cannot take a Redis lease; retrying");
        }
        let heartbeat = tokio::spawn(beat.run());
        let (pushes, rx) = mpsc::channel(4 * PUSH_BATCH);
        let pusher = Pusher {
            conn: push_conn,
            script: script.clone(),
            prefix: prefix.clone(),
            publish,
            capacity,
            watch: watch.clone(),
            replication: (config.wait_replicas > 0).then_some(Replication {
                replicas: config.wait_replicas,
                timeout: config.wait_timeout,
                fail: config.fewer_replicas == crate::config::FewerReplicas::Fail,
            }),
        };
        tokio::spawn(pusher.run(rx));
        Ok(RedisStore {
            conn,
            target,
            publish,
            script,
            prefix,
            writer,
            lease,
            renewed,
            watch,
            pushes,
            heartbeat,
            capacity,
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
        let mut a = Args::new("take", self.publish);
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
        let mut a = Args::new("finish", self.publish);
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
                Outcome::Dead {
                    reason,
                    code,
                    transient,
                } => (
                    if *transient { "D" } else { "d" },
                    reason.as_str(),
                    code.as_deref().unwrap_or_default(),
                ),
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
        user: &str,
        limit: usize,
    ) -> Result<Relevant> {
        // A model with no relations at all still means "only these".
        if rels.is_some_and(<[Dep]>::is_empty) {
            return Ok(Relevant {
                revokes: 0,
                grants: Some(Vec::new()),
                written_ago: None,
            });
        }
        let mut a = Args::new("relevant", self.publish);
        a.push(limit).push(object).push(user);
        match rels {
            None => {
                a.push(0);
            }
            Some(r) => {
                a.push(r.len());
                for d in r {
                    let scope: u8 = match (d.same_object, d.user_bound) {
                        (false, _) => 0,
                        (true, false) => 1,
                        (true, true) => 2,
                    };
                    a.push(&d.rel).push(scope);
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
                written_ago: None,
            });
        }
        let written_ago = match v.get(2).map(int).transpose()? {
            Some(ms) if ms >= 0 => Some(Duration::from_millis(ms as u64)),
            _ => None,
        };
        let mut list = Vec::with_capacity(grants);
        for c in v[3.min(v.len())..].chunks_exact(2) {
            list.push(tuple_of(&text(&c[0])?, condition_of(&text(&c[1])?)));
        }
        Ok(Relevant {
            revokes,
            grants: Some(list),
            written_ago,
        })
    }

    async fn latest_now(&self, tuple: &TupleKey) -> Result<Option<(Op, bool)>> {
        let mut a = Args::new("latest", self.publish);
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

    /// How many keys and bytes the store holds in Redis, by category
    /// (`pending`, `dead`, `queue`, `meta`, `legacy`), scanned in steps.
    pub async fn usage(&self) -> Result<Vec<KeyUsage>> {
        let mut out: Vec<KeyUsage> = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let mut a = Args::new("usage", self.publish);
            a.push(&cursor);
            let v = items(self.call(&a).await?)?;
            cursor = text(v.first().unwrap_or(&Value::Nil))?;
            for c in v[1.min(v.len())..].chunks_exact(3) {
                let category = text(&c[0])?;
                let (keys, bytes) = (int(&c[1])?.max(0) as u64, int(&c[2])?.max(0) as u64);
                match out.iter_mut().find(|u| u.category == category) {
                    Some(u) => {
                        u.keys += keys;
                        u.bytes += bytes;
                    }
                    None => out.push(KeyUsage {
                        category,
                        keys,
                        bytes,
                    }),
                }
            }
            if cursor == "0" || cursor.is_empty() {
                out.sort_by(|a, b| a.category.cmp(&b.category));
                return Ok(out);
            }
        }
    }

    /// Whether Redis keeps what it acknowledged across a restart: `None`
    /// when it does (AOF on), a warning when it does not or cannot say.
    pub async fn persistence_warning(&self) -> Option<String> {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<std::collections::HashMap<String, String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .query_async(&mut conn)
            .await;
        match r {
            Ok(m) if m.get("appendonly").is_some_and(|v| v == "yes") => None,
            Ok(_) => Some(
                "Redis runs without AOF (appendonly no): a Redis restart loses acknowledged ops (detected, see `fga-wb loss`); set appendonly yes".into(),
            ),
            Err(e) => Some(format!(
                "cannot read Redis's appendonly setting ({e}); make sure AOF is on"
            )),
        }
    }

    /// Deletes what versions before fga-wb kept jobs in its own keys left
    /// (apalis job keys under the store's prefix); returns how many.
    pub async fn sweep_legacy(&self) -> Result<u64> {
        let mut deleted = 0;
        let mut cursor = "0".to_owned();
        loop {
            let mut a = Args::new("sweep", self.publish);
            a.push(&cursor);
            let v = items(self.call(&a).await?)?;
            cursor = text(v.first().unwrap_or(&Value::Nil))?;
            deleted += v.get(1).map_or(Ok(0), int)?.max(0) as u64;
            if cursor == "0" || cursor.is_empty() {
                return Ok(deleted);
            }
        }
    }

    async fn read_pending(&self) -> Result<Pending> {
        let mut a = Args::new("pending", self.publish);
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
        let mut a = Args::new("clear", self.publish);
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

    /// The dead letters (with `remove`: those with `ids`, or all, removed
    /// in one script call), each marked superseded or not.
    async fn dead_now(&self, ids: Option<&[u64]>, remove: bool) -> Result<Vec<DeadLetter>> {
        let key = format!("{}:dead", self.prefix);
        let raw: Vec<(Vec<u8>, Vec<u8>)> = if remove {
            let mut a = Args::new("dlqdrop", self.publish);
            match ids {
                None => a.push("*"),
                Some([]) => return Ok(Vec::new()),
                Some(ids) => a.push(ids),
            };
            items(self.call(&a).await?)?
                .chunks_exact(2)
                .map(|p| Ok((bytes(&p[0])?, bytes(&p[1])?)))
                .collect::<Result<_>>()?
        } else {
            let mut conn = self.conn.clone();
            redis::cmd("HGETALL")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?
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
        out.sort_by_key(|d| d.id);
        if !remove {
            for part in out.chunks_mut(1000) {
                let mut a = Args::new("deadstate", self.publish);
                for d in part.iter() {
                    a.push(key_of(&d.tuple)).push(d.id);
                }
                let flags = items(self.call(&a).await?)?;
                for (d, f) in part.iter_mut().zip(&flags) {
                    d.superseded = int(f)? != 0;
                }
            }
        }
        Ok(out)
    }

    /// See [`Store::replay_dead_letters`]: in steps of a few hundred
    /// letters, each step one script call.
    async fn replay_now(&self, ids: Option<&[u64]>, only_transient: bool) -> Result<Replayed> {
        let ids: Vec<u64> = match ids {
            Some(ids) => ids.to_vec(),
            None => {
                let mut conn = self.conn.clone();
                let mut all: Vec<u64> = redis::cmd("HKEYS")
                    .arg(format!("{}:dead", self.prefix))
                    .query_async::<Vec<String>>(&mut conn)
                    .await
                    .map_err(redis_error)?
                    .iter()
                    .filter_map(|id| id.parse().ok())
                    .collect();
                all.sort_unstable();
                all
            }
        };
        let mut r = Replayed::default();
        for (n, part) in ids.chunks(REPLAY_STEP).enumerate() {
            let mut a = Args::new("replay", self.publish);
            a.push(now_ms())
                .push(self.capacity)
                .push(u8::from(only_transient))
                .push(part);
            let v = items(self.call(&a).await?)?;
            r.replayed += count(&v, 0)? as usize;
            r.superseded += count(&v, 1)? as usize;
            for p in v.get(3..).unwrap_or_default().chunks_exact(2) {
                r.tuples
                    .push(tuple_of(&text(&p[0])?, condition_of(&text(&p[1])?)));
            }
            let kept = count(&v, 2)? as usize;
            if kept > 0 {
                r.kept = kept + ids.len().saturating_sub((n + 1) * REPLAY_STEP);
                break;
            }
        }
        Ok(r)
    }

    /// Hands ops this writer took to a new job; returns the job's id, or
    /// `None` if none of them was still this writer's.
    pub async fn enqueue(
        &self,
        store_id: &str,
        model_id: Option<&str>,
        ops: &[Taken],
    ) -> Result<Option<u64>> {
        let mut a = Args::new("enqueue", self.publish);
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
        let mut a = Args::new("fetch", self.publish);
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
        let mut a = Args::new("badjob", self.publish);
        a.push(now_ms()).push(id);
        Ok(int(&self.call(&a).await?)?.max(0) as u64)
    }

    /// Jobs by state and the workers alive.
    pub async fn queue_counts(&self) -> Result<QueueCounts> {
        let mut a = Args::new("queue", self.publish);
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

    /// Runs a heartbeat now (it also looks for lost data).
    async fn beat(&self) -> Result<bool> {
        Heartbeat {
            conn: self.conn.clone(),
            script: self.script.clone(),
            prefix: self.prefix.clone(),
            publish: self.publish,
            writer: self.writer.clone(),
            lease: self.lease,
            renewed: self.renewed.clone(),
            watch: self.watch.clone(),
        }
        .once()
        .await
    }

    /// Fails closed while a dropped connection is not known to be back, and
    /// for a while after (see `Watch::quiet_until`).
    fn after_reconnect(&self) -> Result<()> {
        let until = self.watch.quiet_until.load(Ordering::Relaxed);
        let now = now_ms();
        let left = if self.watch.dropped.load(Ordering::Relaxed) {
            self.watch.wake.notify_one();
            self.lease.as_millis() as u64 / 3 + QUIET_MARGIN_MS
        } else {
            until.saturating_sub(now)
        };
        if left > 0 {
            return Err(Error::new(Kind::Reconnecting {
                left: Duration::from_millis(left),
            }));
        }
        Ok(())
    }

    /// The open loss record, as text for people.
    async fn loss_now(&self) -> Result<Option<String>> {
        let v = items(self.call(&Args::new("loss", self.publish)).await?)?;
        if v.len() < 4 {
            return Ok(None);
        }
        let at: u64 = text(&v[0])?.parse().unwrap_or(0);
        let when = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(at));
        let more = int(&v[3]).unwrap_or(0);
        let mut s = format!("at {when}, seen by {}: {}", text(&v[1])?, text(&v[2])?);
        if more > 0 {
            s.push_str(&format!(" (and {more} more times since)"));
        }
        Ok(Some(s))
    }

    async fn loss_error(&self) -> Error {
        let detail = match self.loss_now().await {
            Ok(Some(s)) => s,
            Ok(None) => "a loss was detected; see `fga-wb status`".into(),
            Err(e) => format!("a loss was detected ({e})"),
        };
        Error::new(Kind::BufferLost { detail })
    }

    /// How long a write may take from now and still end within this
    /// writer's lease (less a margin for the clocks and the finish).
    pub fn write_budget(&self) -> Duration {
        let renewed = self.renewed.load(Ordering::Relaxed);
        let lease_end = renewed + self.lease.as_millis() as u64;
        Duration::from_millis(lease_end.saturating_sub(now_ms() + LEASE_MARGIN_MS))
    }
}

/// Where dropped connections and new epochs enter a generation: far above
/// any sum of change counters.
const RESETS_SHIFT: u32 = 40;

/// Added to a third of the lease for the quiet time after a reconnect:
/// another process's heartbeat may take a round trip and a retry.
const QUIET_MARGIN_MS: u64 = 1000;

/// Kept free at the end of a lease: a write must be answered and finished
/// before the lease could end.
const LEASE_MARGIN_MS: u64 = 1000;

/// The task that renews a writer's lease and watches for lost data.
struct Heartbeat {
    conn: Conn,
    script: redis::Script,
    prefix: String,
    publish: &'static str,
    writer: String,
    lease: Duration,
    renewed: Arc<AtomicU64>,
    watch: Arc<Watch>,
}

impl Heartbeat {
    /// Renews the lease and compares what this process acknowledged with
    /// what Redis holds. Returns whether a loss record is open.
    async fn once(&self) -> Result<bool> {
        let at = now_ms();
        let epoch = self.watch.epoch();
        let acked = self.watch.acked.load(Ordering::Relaxed);
        let mut a = Args::new("heartbeat", self.publish);
        a.push(at)
            .push(&self.writer)
            .push(self.lease.as_millis() as u64)
            .push(&epoch)
            .push(acked);
        let dropped = self.watch.dropped.swap(false, Ordering::Relaxed);
        let v = match invoke(&self.conn, &self.script, &self.prefix, &a).await {
            Ok(v) => items(v)?,
            Err(e) => {
                self.watch.dropped.fetch_or(dropped, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.renewed.store(at, Ordering::Relaxed);
        if dropped {
            let quiet = self.lease.as_millis() as u64 / 3 + QUIET_MARGIN_MS;
            self.watch
                .quiet_until
                .store(now_ms() + quiet, Ordering::Relaxed);
        }
        if v.first().map_or(Ok(1), int)? == 0 {
            tracing::error!(
                writer = %self.writer,
                "this process's Redis lease had ended (it was paused or cut off from Redis for longer than redis.writer_lease): \
                 the ops it was writing were handed to other writers"
            );
        }
        let now_epoch = text(v.get(1).unwrap_or(&Value::Nil))?;
        let seq = v.get(2).map_or(Ok(0), int)?.max(0) as u64;
        let open = v.get(3).map_or(Ok(0), int)? == 1;
        let lost_now = v.get(4).map_or(Ok(0), int)? == 1;
        if lost_now {
            tracing::error!(
                prefix = %self.prefix,
                acked,
                seq,
                "Redis lost acknowledged ops (this process had acknowledged up to sequence number {acked}; Redis now holds {seq}): \
                 checks fail closed until an operator runs `fga-wb loss --ack`"
            );
            metrics::counter!("fga_wb_redis_losses_total").increment(1);
        }
        self.watch.saw(&now_epoch, seq, lost_now);
        Ok(open)
    }

    /// Renews the lease a third of the way through, and at once when a
    /// connection dropped, until the store is dropped.
    async fn run(self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.lease / 3) => {}
                _ = self.watch.wake.notified() => {}
            }
            if let Err(e) = self.once().await {
                tracing::warn!(error = %e, "cannot renew the Redis lease; retrying");
                // A dropped connection wakes this task again at once; do
                // not spin while Redis is away.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
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
    #[serde(default)]
    transient: bool,
}

/// Letters one replay script call handles: Redis is not held up long.
const REPLAY_STEP: usize = 500;

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
        transient: d.transient,
        superseded: false,
    })
}

/// Sends pushes to Redis: concurrent ones are collected into script calls,
/// up to `PUSH_PIPELINE` of them in flight at once, so Redis has the next
/// batch while the replies of the last are handed out. (One caller's ops
/// never share a batch or race: each waits for its acknowledgement before
/// its next op.)
struct Pusher {
    conn: Conn,
    script: redis::Script,
    prefix: String,
    publish: &'static str,
    capacity: usize,
    watch: Arc<Watch>,
    replication: Option<Replication>,
}

impl Pusher {
    async fn run(self, mut rx: mpsc::Receiver<PushRequest>) {
        let this = Arc::new(self);
        let mut running = futures::stream::FuturesUnordered::new();
        let mut open = true;
        // How many ops the last call carried: callers woken by its replies
        // come back within microseconds, so the next call waits a moment for
        // about as many.
        let mut last = 1;
        loop {
            // Another call goes out while one is in flight only when enough
            // ops wait for it: small calls cost Redis more per op than a
            // short wait costs the callers.
            let room = running.is_empty()
                || (running.len() < PUSH_PIPELINE && rx.len() >= PUSH_PIPELINE_MIN);
            tokio::select! {
                batch = collect(&mut rx, last), if open && room => {
                    if batch.is_empty() {
                        open = false;
                        continue;
                    }
                    last = batch.len();
                    running.push(this.clone().send(batch));
                }
                Some(()) = running.next(), if !running.is_empty() => {}
                else => return,
            }
        }
    }

    /// One script call (and its WAIT); answers every caller in `batch`.
    async fn send(self: Arc<Self>, batch: Vec<PushRequest>) {
        let mut inv = self.script.prepare_invoke();
        inv.key(&self.prefix)
            .arg("push")
            .arg(self.publish)
            .arg(now_ms())
            .arg(self.capacity)
            .arg(batch.len());
        for p in &batch {
            inv.arg(&p.key).arg(op_code(p.op)).arg(&p.condition);
        }
        let result = match self.replication {
            None => {
                let mut conn = self.conn.clone();
                match inv.invoke_async::<Value>(&mut conn).await {
                    Ok(v) => items(v).map(|v| (v, None)),
                    Err(e) => Err(redis_error(e)),
                }
            }
            Some(r) => self.invoke_and_wait(&inv, r).await,
        };
        let (v, replicas) = match result {
            Ok((v, replicas)) if v.len() == batch.len() * 2 + 2 => (v, replicas),
            Ok((v, _)) => {
                let e = corrupt(format!("push returned {} items", v.len()));
                return answer_all(batch, &e);
            }
            Err(e) => return answer_all(batch, &e),
        };
        let pending = int(&v[v.len() - 2]).unwrap_or(0).max(0) as usize;
        let corrupt = int(&v[v.len() - 1]).unwrap_or(0);
        if corrupt > 0 {
            tracing::warn!(count = corrupt, prefix = %self.prefix, "replaced corrupt pending entries in Redis");
        }
        let seqs: Vec<i64> = (0..batch.len())
            .map(|i| int(&v[2 * i]).unwrap_or(-1))
            .collect();
        self.note_acked(&seqs);
        let short = match (self.replication, replicas) {
            (Some(r), Some(got)) if got < r.replicas => {
                metrics::counter!("fga_wb_redis_under_replicated_total").increment(1);
                warn_under_replicated(r, got);
                r.fail.then_some(Error::new(Kind::UnderReplicated {
                    wanted: r.replicas,
                    got,
                    timeout: r.timeout,
                }))
            }
            _ => None,
        };
        for (i, p) in batch.into_iter().enumerate() {
            let reply = if seqs[i] < 0 {
                Err(Error::new(Kind::BufferFull {
                    capacity: self.capacity,
                    waited: None,
                }))
            } else if let Some(e) = &short {
                Err(e.clone())
            } else {
                Ok(Pushed {
                    coalesced: int(&v[2 * i + 1]).unwrap_or(0) == 1,
                    pending,
                })
            };
            let _ = p.reply.send(reply);
        }
    }

    /// The push script and `WAIT` in one pipeline on this connection, so
    /// the WAIT covers exactly the pushes sent before it.
    async fn invoke_and_wait(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        r: Replication,
    ) -> Result<(Vec<Value>, Option<u32>)> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(inv)
            .cmd("WAIT")
            .arg(r.replicas)
            .arg(r.timeout.as_millis() as u64);
        let mut conn = self.conn.clone();
        let mut reply: redis::RedisResult<(Value, u32)> = pipe.query_async(&mut conn).await;
        if matches!(&reply, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            // A pipeline does not load a script by itself; the push did
            // not run, so sending it again is safe.
            inv.load_async(&mut conn).await.map_err(redis_error)?;
            reply = pipe.query_async(&mut conn).await;
        }
        let (v, got) = reply.map_err(redis_error)?;
        Ok((items(v)?, Some(got)))
    }

    /// Remembers the highest sequence number acknowledged; one at or below
    /// it means Redis went back (see `Watch`): look at once.
    fn note_acked(&self, seqs: &[i64]) {
        let Some(max) = seqs.iter().copied().filter(|s| *s > 0).max() else {
            return;
        };
        let min = seqs.iter().copied().filter(|s| *s > 0).min().unwrap_or(max);
        let before = self.watch.acked.fetch_max(max as u64, Ordering::Relaxed);
        if (min as u64) <= before {
            self.watch.wake.notify_one();
        }
    }
}

fn answer_all(batch: Vec<PushRequest>, e: &Error) {
    for p in batch {
        let _ = p.reply.send(Err(e.clone()));
    }
}

/// Logs pushes that fewer replicas than asked confirmed, at most every 10 s.
fn warn_under_replicated(r: Replication, got: u32) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ms();
    let last = LAST.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            wanted = r.replicas,
            got,
            timeout = ?r.timeout,
            "Redis replicas did not confirm pushes within redis.wait_timeout: those ops are on the primary only until they do (fga_wb_redis_under_replicated_total counts such batches)"
        );
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
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Relevant>> {
        Box::pin(self.relevant_now(rels, object, user, limit))
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
        Box::pin(self.read_pending())
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

    fn replay_dead_letters<'a>(
        &'a self,
        ids: Option<&'a [u64]>,
        only_transient: bool,
    ) -> BoxFuture<'a, Result<Replayed>> {
        Box::pin(self.replay_now(ids, only_transient))
    }

    fn shared(&self) -> bool {
        true
    }

    fn write_budget(&self) -> Option<Duration> {
        Some(self.write_budget())
    }

    fn blocked_up_to(&self, up_to: u64) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let mut a = Args::new("blocked", self.publish);
            a.push(up_to);
            Ok(int(&self.call(&a).await?)?.max(0) as u64)
        })
    }

    fn release(&self, hand_back: bool) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.heartbeat.abort();
            if hand_back {
                let mut a = Args::new("release", self.publish);
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
            if rels.is_some_and(<[RelName]>::is_empty) {
                return Ok(self.watch.resets.load(Ordering::Relaxed) << RESETS_SHIFT);
            }
            // Twice at most: the second time after the heartbeat has looked
            // at what the first read found odd.
            for _ in 0..2 {
                let acked = self.watch.acked.load(Ordering::Relaxed);
                let known = self.watch.epoch();
                let resets = self.watch.resets.load(Ordering::Relaxed);
                let mut a = Args::new("gen", self.publish);
                match rels {
                    Some(r) => a.push(r.len()).push(r),
                    None => a.push(0),
                };
                let v = items(self.call(&a).await?)?;
                self.after_reconnect()?;
                let epoch = text(v.first().unwrap_or(&Value::Nil))?;
                let seq = v.get(1).map_or(Ok(0), int)?.max(0) as u64;
                if v.get(2).map_or(Ok(0), int)? == 1 {
                    return Err(self.loss_error().await);
                }
                if (!known.is_empty() && epoch != known) || seq < acked {
                    // Lost data, or another process moved the store to a
                    // new epoch: the heartbeat tells which.
                    self.beat().await?;
                    continue;
                }
                let sum = v[3.min(v.len())..]
                    .iter()
                    .map(|g| int(g).map(|g| g as u64))
                    .try_fold(0u64, |acc, g| g.map(|g| acc.wrapping_add(g)))?;
                return Ok(sum.wrapping_add(resets << RESETS_SHIFT));
            }
            Err(self.loss_error().await)
        })
    }

    fn loss(&self) -> BoxFuture<'_, Result<Option<String>>> {
        Box::pin(self.loss_now())
    }

    fn acknowledge_loss<'a>(&'a self, by: &'a str) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut a = Args::new("ackloss", self.publish);
            a.push(now_ms()).push(by);
            Ok(int(&self.call(&a).await?)? == 1)
        })
    }

    fn events(
        &self,
    ) -> Option<BoxFuture<'static, Result<futures::stream::BoxStream<'static, StoreEvent>>>> {
        let target = self.target.clone();
        let channel = format!("{}:events", self.prefix);
        Some(Box::pin(async move {
            let stream = conn::subscribe(&target, &channel).await?;
            Ok(stream
                .map(|payload| match payload.as_str() {
                    "finished" => StoreEvent::Finished,
                    "jobs" => StoreEvent::Jobs,
                    _ => StoreEvent::All,
                })
                .boxed())
        }))
    }
}
