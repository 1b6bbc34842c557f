//! The Redis store: pending ops shared by every process of an application,
//! durable before `grant`/`revoke` return.
//!
//! All state changes run in one Lua library (`redis.lua`), so concurrent
//! processes coalesce correctly. Concurrent pushes from one process are
//! batched into one script call by a small actor task: each caller is
//! answered only after the script that stored its op has returned.
//!
//! Unlike the memory store, a newer op on a key that is being written does
//! not wait: it becomes ready at once, and whoever writes it first must
//! *claim* the key. A claim succeeds only for the newest op of a key and only
//! while no other writer holds the key, so an older op never lands after a
//! newer one, across processes, workers and retries.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::StreamExt;
use redis::aio::ConnectionManager;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::{
    key_of, tuple_of, Claim, DeadLetter, Finished, Outcome, Pending, Pushed, Relevant, Store,
    StoreEvent, Take, Taken,
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
    owner: String,
    lease: Duration,
    lock_ttl: Duration,
    pushes: mpsc::Sender<PushRequest>,
}

struct PushRequest {
    key: String,
    op: Op,
    condition: String,
    reply: oneshot::Sender<Result<Pushed>>,
}

/// How long a taken op stays owned by its taker, and a write lock by its
/// writer, before another process may take over.
pub(crate) struct Leases {
    /// A taken op goes back to ready after this (the taker died).
    pub take: Duration,
    /// A write lock is free after this; longer than any one Write request.
    pub lock: Duration,
}

impl Leases {
    /// Leases long enough for the configured request timeout: a flush may
    /// send a chunk up to ~8 times while bisecting.
    pub fn for_config(config: &crate::Config) -> Leases {
        let request = config.openfga.request_timeout;
        // In queue mode the flusher extends the lease to the job's
        // (`job_lease`) once the job is pushed; a crash before that returns
        // the ops within this lease.
        let take = match config.flush.mode {
            // Bisection may send a chunk ~8 times.
            crate::config::Mode::Inline => (request * 10).max(Duration::from_secs(60)),
            // Only until the job is pushed: one Redis call.
            crate::config::Mode::Queue => Duration::from_secs(15),
        };
        Leases {
            take,
            lock: request * 2 + Duration::from_secs(5),
        }
    }
}

/// How long ops handed to a job stay owned by it before another flush may
/// enqueue them again: the whole retry schedule twice, plus ten minutes for
/// a worker to notice a dead one.
pub(crate) fn job_lease(config: &crate::Config) -> Duration {
    let schedule: Duration = config.queue.retry_schedule.iter().sum();
    schedule * 2 + Duration::from_secs(600)
}

fn op_code(op: Op) -> &'static str {
    match op {
        Op::Grant => "g",
        Op::Revoke => "r",
    }
}

fn op_of(code: &str) -> Option<Op> {
    match code {
        "g" => Some(Op::Grant),
        "r" => Some(Op::Revoke),
        _ => None,
    }
}

/// A name no other store instance (in any process) uses: the lock owner.
pub(crate) fn unique_owner() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    format!("{host}-{}-{}-{n}", std::process::id(), now_ms())
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
    Error::new(Kind::Redis {
        detail: e.to_string(),
        transient,
    })
}

fn corrupt(what: impl Into<String>) -> Error {
    Error::new(Kind::Redis {
        detail: format!("unexpected data under fga-wb's keys: {}", what.into()),
        transient: false,
    })
}

fn condition_of(s: &str) -> Option<Condition> {
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

impl RedisStore {
    /// Connects to Redis, and fails with a clear error if it cannot.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        store_id: &str,
        capacity: usize,
        leases: Leases,
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
            owner: unique_owner(),
            lease: leases.take,
            lock_ttl: leases.lock,
            pushes,
        })
    }

    async fn call(&self, args: Vec<String>) -> Result<Value> {
        let mut inv = self.script.prepare_invoke();
        inv.key(&self.prefix);
        for a in args {
            inv.arg(a);
        }
        let mut conn = self.conn.clone();
        inv.invoke_async(&mut conn).await.map_err(redis_error)
    }

    async fn take_now(&self, max: usize, what: Take, up_to: u64) -> Result<Vec<Taken>> {
        let kinds = match what {
            Take::Revokes => "r",
            Take::All => "rg",
        };
        let v = items(
            self.call(vec![
                "take".into(),
                now_ms().to_string(),
                max.to_string(),
                kinds.into(),
                up_to.to_string(),
                (self.lease.as_millis() as u64).to_string(),
            ])
            .await?,
        )?;
        let corrupt = v.first().map_or(Ok(0), int)?;
        if corrupt > 0 {
            tracing::warn!(count = corrupt, prefix = %self.prefix, "dropped corrupt pending entries (unreadable, not written by fga-wb) from the ready queues");
        }
        let mut out = Vec::with_capacity(v.len() / 5);
        for c in v[1.min(v.len())..].chunks_exact(5) {
            let key = text(&c[0])?;
            let seq = int(&c[1])? as u64;
            let Some(op) = op_of(&text(&c[2])?) else {
                tracing::warn!(%key, "skipping an op of unknown kind in Redis");
                continue;
            };
            out.push(Taken {
                tuple: tuple_of(&key, condition_of(&text(&c[3])?)),
                op,
                seq,
                first: int(&c[4])? as u64,
                attempts: 0,
            });
        }
        Ok(out)
    }

    /// Ends ops with their outcomes, and releases their write locks.
    async fn finish_now(&self, done: Vec<(Taken, Outcome)>) -> Result<Finished> {
        let mut args = vec![
            "finish".into(),
            now_ms().to_string(),
            self.owner.clone(),
            done.len().to_string(),
        ];
        for (t, o) in &done {
            let (code, arg, err_code) = match o {
                Outcome::Applied => ("a", String::new(), String::new()),
                Outcome::Dead { reason, code } => {
                    ("d", reason.clone(), code.clone().unwrap_or_default())
                }
                Outcome::Retry | Outcome::Stale | Outcome::Busy => {
                    ("r", String::new(), String::new())
                }
                Outcome::Keep(lease) => {
                    ("k", (lease.as_millis() as u64).to_string(), String::new())
                }
            };
            args.extend([
                key_of(&t.tuple),
                t.seq.to_string(),
                code.into(),
                arg,
                err_code,
                (t.attempts + 1).to_string(),
                op_code(t.op).into(),
            ]);
        }
        let v = items(self.call(args).await?)?;
        let n = |i: usize| v.get(i).map_or(Ok(0), int).map(|x| x.max(0) as u64);
        Ok(Finished {
            applied: n(0)?,
            dead: n(1)?,
            requeued: n(2)?,
            superseded: n(3)?,
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
        let mut args = vec!["relevant".into(), limit.to_string(), object.to_owned()];
        match rels {
            None => args.push("0".into()),
            Some(r) => {
                args.push(r.len().to_string());
                for d in r {
                    args.push(d.rel.clone());
                    args.push(if d.same_object { "1" } else { "0" }.into());
                }
            }
        }
        let v = items(self.call(args).await?)?;
        let revokes = v.first().map_or(Ok(0), int)?.max(0) as usize;
        let grants = v.get(1).map_or(Ok(0), int)?.max(0) as usize;
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
        let mut conn = self.conn.clone();
        let raw: Option<String> = redis::cmd("HGET")
            .arg(format!("{}:ops", self.prefix))
            .arg(key_of(tuple))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let Some(raw) = raw else {
            return Ok(None);
        };
        // seq|first|since|op|state|cond
        let mut parts = raw.splitn(6, '|');
        let op = parts.nth(3).and_then(op_of);
        let cond = parts.nth(1).unwrap_or_default();
        match op {
            Some(op) => Ok(Some((op, !cond.is_empty()))),
            None => {
                tracing::warn!(tuple = %tuple, "ignoring a corrupt pending entry in Redis");
                Ok(None)
            }
        }
    }

    async fn pending_now(&self) -> Result<Pending> {
        let v = items(
            self.call(vec!["pending".into(), now_ms().to_string()])
                .await?,
        )?;
        let n = |i: usize| v.get(i).map_or(Ok(0), int);
        let (writes, deletes, taken, oldest) = (n(0)?, n(1)?, n(2)?, n(3)?);
        let (writes, deletes) = (writes.max(0) as usize, deletes.max(0) as usize);
        Ok(Pending {
            writes,
            deletes,
            total: writes + deletes,
            in_flight: taken.max(0) as usize,
            oldest_age: (oldest >= 0)
                .then(|| Duration::from_millis(now_ms().saturating_sub(oldest as u64))),
        })
    }

    async fn clear_now(&self) -> Result<Vec<(TupleKey, Op)>> {
        let v = items(self.call(vec!["clear".into()]).await?)?;
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

    /// Write locks for `ops`; see the module docs.
    async fn claim_now(&self, ops: &[Taken]) -> Result<Vec<Claim>> {
        let mut args = vec![
            "claim".into(),
            now_ms().to_string(),
            self.owner.clone(),
            (self.lock_ttl.as_millis() as u64).to_string(),
            ops.len().to_string(),
        ];
        for t in ops {
            args.push(key_of(&t.tuple));
            args.push(t.seq.to_string());
        }
        let v = items(self.call(args).await?)?;
        v.iter()
            .map(|x| {
                Ok(match int(x)? {
                    1 => Claim::Claimed,
                    2 => Claim::Busy,
                    _ => Claim::Stale,
                })
            })
            .collect()
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

/// Collects concurrent pushes into one script call.
async fn push_batches(
    conn: ConnectionManager,
    script: redis::Script,
    prefix: String,
    capacity: usize,
    mut rx: mpsc::Receiver<PushRequest>,
) {
    let mut batch = Vec::with_capacity(PUSH_BATCH);
    while rx.recv_many(&mut batch, PUSH_BATCH).await > 0 {
        let mut inv = script.prepare_invoke();
        inv.key(&prefix)
            .arg("push")
            .arg(now_ms())
            .arg(capacity)
            .arg(batch.len());
        for p in &batch {
            inv.arg(&p.key).arg(op_code(p.op)).arg(&p.condition);
        }
        let mut c = conn.clone();
        let result: Result<Vec<Value>> = match inv.invoke_async::<Value>(&mut c).await {
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
                for (i, p) in batch.drain(..).enumerate() {
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
                for p in batch.drain(..) {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
            Err(e) => {
                for p in batch.drain(..) {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

impl Store for RedisStore {
    fn push<'a>(&'a self, tuple: &'a TupleKey, op: Op) -> BoxFuture<'a, Result<Pushed>> {
        Box::pin(async move {
            let condition = match &tuple.condition {
                Some(c) => serde_json::to_string(c)
                    .map_err(|e| Error::invalid_argument(format!("condition: {e}")))?,
                None => String::new(),
            };
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

    fn claim<'a>(&'a self, ops: &'a [Taken]) -> BoxFuture<'a, Result<Vec<Claim>>> {
        Box::pin(self.claim_now(ops))
    }

    fn finish(&self, done: Vec<(Taken, Outcome)>) -> BoxFuture<'_, Result<Finished>> {
        Box::pin(self.finish_now(done))
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
            let v: Option<u64> = redis::cmd("GET")
                .arg(format!("{}:seq", self.prefix))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            Ok(v.unwrap_or(0))
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
                    _ => StoreEvent::All,
                }
            });
            Ok(stream.boxed())
        }))
    }
}
