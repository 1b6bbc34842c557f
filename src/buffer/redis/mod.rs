//! The Redis store: pending ops shared by every process of an application,
//! durable before `grant`/`revoke` return, and the queue of write jobs.
//!
//! All state changes run in one Lua library (`store.lua`), so concurrent
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

mod admin;
pub(crate) use admin::FetchedJob;
mod calls;
mod conn;
mod finish;
mod heartbeat;
mod pusher;

use futures::future::BoxFuture;
use futures::StreamExt;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::{
    condition_of, key_of, op_of, shown_condition, stored_tuple, tuple_of, unreadable_outcome,
    Claim, DeadLetter, Finished, JobEnd, KeyUsage, Outcome, Pending, Purged, Pushed, Relevant,
    Replayed, Store, StoreEvent, Take, Taken, Unfinished,
};
use crate::error::{Error, Kind, Result};
use crate::model::{Dep, RelName};
use crate::status::stored_time;
use crate::tuple::{Condition, Op, TupleKey};
pub(crate) use conn::{Conn, Target};
use heartbeat::*;
use pusher::*;

const SCRIPT: &str = include_str!("store.lua");
/// The check path's call, a script of its own (see its header).
const GEN_SCRIPT: &str = include_str!("gen.lua");
/// Most ops one push script call carries.
const PUSH_BATCH: usize = 512;
/// Most ops one take script call moves. A script call holds Redis for its
/// whole run (about 12 us per op taken on a slow core), and every caller's
/// push waits behind it: a flush window of 3,200 in one call held Redis for
/// 40 ms.
const TAKE_PER_CALL: usize = 500;
/// Most letters of transient deaths a read lists to find their relations
/// (see `relations_buffered`); past it the read fails closed.
const OWED_MAX: usize = 10_000;

/// The Redis store.
pub(crate) struct RedisStore {
    conn: Conn,
    target: Target,
    tls: conn::Tls,
    /// `PUBLISH`, or `SPUBLISH` on a cluster (messages stay in the shard).
    publish: &'static str,
    script: redis::Script,
    gen_script: redis::Script,
    prefix: String,
    /// This instance's name as a writer (`app:...` or `worker:...`).
    writer: String,
    lease: Duration,
    /// `flush.unknown_outcome_hold`: how long a Write of this writer's may
    /// still land after it stopped waiting. Redis keeps what it holds that
    /// long past its lease if it dies while writing (the script's reclaim).
    outcome_hold: Duration,
    /// When the lease was last renewed, and the term.
    hold: Arc<Hold>,
    watch: Arc<Watch>,
    pushes: mpsc::Sender<PushRequest>,
    heartbeat: tokio::task::JoinHandle<()>,
    /// Most keys the store holds (`buffer.capacity`).
    capacity: usize,
    finishes: finish::Finishes,
    /// Ops takes dead-lettered, not yet reported (see `Store::dead_on_take`).
    dead_on_take: AtomicU64,
    /// Takes and finishes that failed (see `Store::unsure_calls`).
    unsure: AtomicU64,
    /// Clear steps sent (each carries its number).
    clear_steps: AtomicU64,
    /// Held by a clear from its first step to its last.
    clearing: tokio::sync::Mutex<()>,
}

/// What this process knows that a Redis which lost data would not, to
/// prove the loss (see `heartbeat` in store.lua).
#[derive(Default)]
struct Watch {
    /// The store's epoch in Redis as last seen; empty before the first look.
    epoch: std::sync::Mutex<String>,
    /// The highest sequence number this process acknowledged under `epoch`.
    acked: AtomicU64,
    /// How many ops this process's pushes had accepted, in all. Redis
    /// counts the same per writer (`P:acks`) in each push's own script
    /// call, so a Redis that went back (a failover to a lagging replica, a
    /// restart from an older snapshot) holds less, whatever other writers
    /// pushed since: the sequence counter alone, which every push raises,
    /// can be back above `acked` before the heartbeat looks.
    pushed: AtomicU64,
    /// When (ms, this process's clock) a heartbeat last succeeded, or the
    /// store connected. Redis forgets a writer's count only once its last
    /// heartbeat there is ten minutes old, so a writer that ran one since
    /// (or none yet: nothing to forget) holds a count in Redis, and a Redis
    /// without it lost every op it counted.
    beat_ok_at: AtomicU64,
    /// How many ops are in push calls whose replies are not in yet (each
    /// call's, until `pushed` counts what it accepted). With `pushed`, what
    /// the writer may count: where Redis cannot vouch for its count (pruned,
    /// or set aside after it was found behind), the count starts again from
    /// this and what Redis counted since, so a reply still on its way does
    /// not make the next heartbeat record a loss.
    unanswered: AtomicU64,
    /// The lease was released (a clean stop deletes the writer's count in
    /// Redis): no heartbeat runs from then on, or it would take the count
    /// missing for a loss.
    released: std::sync::atomic::AtomicBool,
    /// The heartbeat was stopped (the application's flusher ended, or the
    /// store stops): a look at the loss record runs none of its own then,
    /// which would renew a lease being given up.
    beats_stopped: std::sync::atomic::AtomicBool,
    /// Held by a heartbeat's call, and by the release: a heartbeat under
    /// way when the store stops reaches Redis before the release, or not
    /// at all.
    beat_lock: tokio::sync::Mutex<()>,
    /// Heartbeats sent: each carries its number, so Redis knows one sent
    /// again (see `heartbeat` in store.lua).
    beats_sent: AtomicU64,
    /// Dropped connections and epoch changes seen. Part of every
    /// generation: a connection that dropped may come back to a replica
    /// promoted without the last writes, where a rolled-back generation
    /// counter must not re-validate an answer cached before them.
    resets: AtomicU64,
    /// A connection dropped, and no heartbeat has succeeded since.
    dropped: std::sync::atomic::AtomicBool,
    /// The replication id of the node that last answered a check; empty
    /// before the first. A new one is a failover or a restart.
    replid: std::sync::Mutex<String>,
    /// Until when (ms since the epoch) checks fail closed after a dropped
    /// connection came back: long enough for every live process to run a
    /// heartbeat, and so to record a loss of what *it* acknowledged, which
    /// this process cannot see.
    quiet_until: AtomicU64,
    /// When (ms, this process's clock) the heartbeat after a dropped
    /// connection ran; 0 once every other live writer has run one since.
    /// Until then checks fail closed too: a process whose heartbeat is late
    /// (a loaded machine, its own slow reconnect) has not yet compared what
    /// it acknowledged, so the quiet time alone is not proof.
    reconnected_at: AtomicU64,
    /// Wakes the heartbeat task at once.
    wake: tokio::sync::Notify,
}

impl Watch {
    /// A connection dropped, or a check met another node than before:
    /// checks fail closed until the heartbeat has looked (see
    /// `after_reconnect`), and no cached answer is valid any more.
    fn disconnected(&self) {
        // `resets` first: a heartbeat clears `dropped` only if `resets` did
        // not move during its call (see `Heartbeat::once`).
        self.resets.fetch_add(1, Ordering::AcqRel);
        self.dropped.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Remembers the replication id a check met; one that differs from the
    /// last (a failover or a restart behind a connection whose drop may not
    /// have been noticed yet) counts as a dropped connection.
    fn node_met(&self, replid: &str) {
        let Ok(mut known) = self.replid.lock() else {
            return;
        };
        if replid.is_empty() || *known == replid {
            return;
        }
        let changed = !known.is_empty();
        *known = replid.to_owned();
        if changed {
            // Under the lock: a check that meets the same new node next
            // must find the reset done, not "unchanged" with the old one.
            self.disconnected();
        }
    }

    fn epoch(&self) -> String {
        self.epoch.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Takes what a heartbeat found; `lost_now` when it recorded a loss.
    fn saw(&self, epoch: &str, seq: u64, lost_now: bool) {
        let Ok(mut known) = self.epoch.lock() else {
            return;
        };
        if known.is_empty() && !lost_now {
            // The first epoch seen: pushes acknowledged before it (or while
            // this heartbeat ran) count in it. Still a reset: answers cached
            // before it (a first heartbeat that failed) were not compared.
            *known = epoch.to_owned();
            self.acked.fetch_max(seq, Ordering::Relaxed);
            self.resets.fetch_add(1, Ordering::Relaxed);
        } else if *known != epoch || lost_now {
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
    // Random bits too: without HOSTNAME (systemd does not export it), two
    // hosts could start a writer with one pid in one millisecond, and two
    // writers under one name would share a lease and a term.
    let salt = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            & 0xffff_ffff
    };
    format!(
        "{kind}:{host}-{}-{}-{n}-{salt:08x}",
        std::process::id(),
        now_ms()
    )
}

/// The field of `P:stats` a writer notes why its flushing is stopped in,
/// followed by its name.
const STOPPED_NOTE: &str = "stopped:";

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `at`, on the clock leases are kept by (ms since the epoch).
fn ms_at(at: std::time::Instant) -> u64 {
    let left = at.saturating_duration_since(std::time::Instant::now());
    now_ms().saturating_add(left.as_millis() as u64)
}

/// A Redis failure as a crate error: connection problems are transient.
pub(crate) fn redis_error(e: redis::RedisError) -> Error {
    match quotes_arguments(&e.to_string()) {
        // Not kept as the source either, where a chain of errors is shown.
        Some(_) => redis_kind(&e),
        None => redis_kind(&e).caused_by(e),
    }
}

/// Redis's words for `e`, without the arguments an unknown command's
/// error quotes ("with args beginning with: ..."): a server or proxy that
/// does not know HELLO quoted the user and password its `AUTH` carried.
pub(crate) fn error_text(e: &redis::RedisError) -> String {
    let text = e.to_string();
    match quotes_arguments(&text) {
        Some(at) => format!("{}with its arguments not shown", &text[..at]),
        None => text,
    }
}

/// Where the arguments an error quotes begin, if it does.
fn quotes_arguments(text: &str) -> Option<usize> {
    text.find("with args beginning with")
}

/// A server that refused a command for now, before running it: loading its
/// data after a restart, running a long script, a replica cut off from its
/// primary or one that a failover just demoted, a cluster slot moving.
pub(crate) fn not_ready(e: &redis::RedisError) -> bool {
    matches!(
        e.code(),
        Some("LOADING" | "BUSY" | "MASTERDOWN" | "READONLY" | "TRYAGAIN" | "CLUSTERDOWN")
    )
}

fn redis_kind(e: &redis::RedisError) -> Error {
    let transient = e.is_io_error()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_cluster_error()
        || not_ready(e);
    let text = error_text(e);
    if text.contains("OOM") && text.contains("maxmemory") {
        return Error::new(Kind::Redis {
            detail: "Redis is full (its maxmemory is reached) and refuses writes: nothing was buffered; raise maxmemory: flushing needs Redis to take writes too, so it cannot drain it (`fga-wb status` shows what fga-wb holds)".into(),
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
    /// `kind` (`app`, `tool` or `worker`), and fails with a clear error if it
    /// cannot or if the server does not run Lua scripts.
    pub async fn connect(config: &crate::Config, kind: &str) -> Result<RedisStore> {
        let (store_id, capacity) = (&config.openfga.store_id, config.buffer.capacity);
        // An application in queue mode hands what it takes to jobs and
        // sends no Write of its own: nothing of its can land late.
        let outcome_hold = match (kind, config.flush.mode) {
            ("app" | "tool", crate::config::Mode::Queue) => Duration::ZERO,
            _ => config.flush.unknown_outcome_hold,
        };
        let config = &config.redis;
        let lease = config.writer_lease;
        let target = Target::parse(&config.url)?;
        let tls = conn::Tls::from_config(config, &target)?;
        let watch = Arc::new(Watch::default());
        watch.beat_ok_at.store(now_ms(), Ordering::Release);
        let on_disconnect: conn::OnDisconnect = {
            let watch = watch.clone();
            Arc::new(move || watch.disconnected())
        };
        let publish = if target.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        // The braces make every key of one store hash to one cluster slot.
        let prefix = format!("{}:{{{store_id}}}", config.key_prefix);
        let mut conn = conn::connect(&target, &tls, on_disconnect.clone()).await?;
        let uses = conn::Uses {
            prefix: &prefix,
            key_prefix: &config.key_prefix,
            publish,
        };
        conn::check_server(&mut conn, &target, &uses).await?;
        // Pushes go on a connection of their own: their batches are
        // pipelined, a WAIT after one covers exactly the pushes before it,
        // and nothing else waits behind them.
        let push_conn = conn::connect(&target, &tls, on_disconnect).await?;
        let script = redis::Script::new(SCRIPT);
        let writer = unique_name(kind);
        let hold = Arc::new(Hold::default());
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
            outcome_hold,
            hold: hold.clone(),
            watch: watch.clone(),
        };
        if let Err(e) = beat.once().await {
            tracing::warn!(error = %e, "cannot take a Redis lease; retrying");
        }
        let heartbeat = tokio::spawn(beat.run());
        let (pushes, rx) = mpsc::channel(4 * PUSH_BATCH);
        let pusher = Pusher {
            calls: matches!(push_conn, Conn::Cluster(_)).then(Default::default),
            conn: push_conn,
            script: script.clone(),
            prefix: prefix.clone(),
            publish,
            capacity,
            watch: watch.clone(),
            writer: writer.clone(),
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
            tls,
            publish,
            script,
            gen_script: redis::Script::new(GEN_SCRIPT),
            prefix,
            writer,
            lease,
            outcome_hold,
            hold,
            watch,
            pushes,
            heartbeat,
            capacity,
            finishes: Default::default(),
            dead_on_take: AtomicU64::new(0),
            unsure: AtomicU64::new(0),
            clear_steps: AtomicU64::new(0),
            clearing: Default::default(),
        })
    }

    async fn call(&self, args: &Args) -> Result<Value> {
        invoke(&self.conn, &self.script, &self.prefix, args).await
    }

    /// This store's writer name.
    pub fn writer(&self) -> &str {
        &self.writer
    }

    /// This writer's current term (see [`Store::holds`]).
    pub fn term(&self) -> u64 {
        self.hold.term()
    }

    async fn take_now(&self, max: usize, what: Take, up_to: u64) -> Result<Vec<Taken>> {
        let mut out = Vec::with_capacity(max.min(4096));
        while out.len() < max {
            let want = (max - out.len()).min(TAKE_PER_CALL);
            let some = self.take_some(want, what, up_to, &mut out).await;
            if some.is_err() {
                // It may have run, its reply lost: what it took is stray.
                self.unsure.fetch_add(1, Ordering::Relaxed);
            }
            match some {
                Ok(got) if got < want => break,
                Ok(_) => {}
                // What earlier calls took is this writer's to write now:
                // hand it on, and let the next call meet the error.
                Err(e) if !out.is_empty() => {
                    tracing::warn!(error = %e, taken = out.len(), "a take stopped part way");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// One call of a take: up to `max` ops into `out`; returns how many the
    /// store moved to this writer.
    async fn take_some(
        &self,
        max: usize,
        what: Take,
        up_to: u64,
        out: &mut Vec<Taken>,
    ) -> Result<usize> {
        let kinds = match what {
            Take::Revokes => "r",
            Take::All => "rg",
        };
        let now = now_ms();
        let mut a = Args::new("take", self.publish);
        a.push(now)
            .push(max)
            .push(kinds)
            .push(up_to)
            .push(&self.writer)
            .push(self.lease.as_millis() as u64)
            .push(self.hold.term())
            .push(self.outcome_hold.as_millis() as u64);
        let v = items(self.call(&a).await?)?;
        let corrupt = v.first().map_or(Ok(0), int)?;
        let term = v.get(1).map_or(Ok(0), int)?.max(0) as u64;
        self.hold.renewed(now, term, &self.writer);
        if corrupt > 0 {
            tracing::warn!(count = corrupt, prefix = %self.prefix, "dropped corrupt pending entries (unreadable, not written by fga-wb)");
        }
        let moved = v[2.min(v.len())..].chunks_exact(5);
        let got = moved.len();
        let mut unreadable = Vec::new();
        for c in moved {
            let key = text(&c[0])?;
            let Some(op) = op_of(&text(&c[2])?) else {
                tracing::warn!(%key, "skipping an op of unknown kind in Redis");
                continue;
            };
            let (tuple, bad) = stored_tuple(&key, &text(&c[3])?, op);
            let t = Taken {
                tuple,
                op,
                seq: int(&c[1])? as u64,
                first: int(&c[4])? as u64,
                attempts: 0,
                term,
            };
            match bad {
                None => out.push(t),
                Some(reason) => unreadable.push((t, unreadable_outcome(&key, reason))),
            }
        }
        if !unreadable.is_empty() {
            // Dead-lettered here, never sent: the operator sees the op and
            // the reason in the dead-letter set. Should Redis fail now,
            // they stay this writer's until its next look for strays gives
            // them back (see `give_back_strays`), and the flush reports
            // the error.
            // Once: a take runs where the flusher does not hear a stop.
            let f = self.finish_now(unreadable, None, Duration::ZERO).await?;
            metrics::counter!("fga_wb_ops_dead_lettered_total").increment(f.dead);
            self.dead_on_take.fetch_add(f.dead, Ordering::Relaxed);
        }
        Ok(got)
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
                unreadable: 0,
                written_ago: None,
                dead_in_doubt: 0,
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
                    let deny = if d.may_deny { 4 } else { 0 };
                    a.push(&d.rel).push(scope + deny);
                }
            }
        }
        let v = items(self.call(&a).await?)?;
        // Every answer of the script has these four: a shorter one read as
        // zeros would say nothing is pending, which errs towards allow.
        if v.len() < 4 {
            return Err(corrupt(format!("relevant returned {} items", v.len())));
        }
        // A negative count is none fga-wb made (data it did not write):
        // read as zero it would let a pending revoke through.
        let at = |i: usize| -> Result<usize> {
            let n = int(&v[i])?;
            usize::try_from(n).map_err(|_| corrupt(format!("relevant returned {n} for a count")))
        };
        let revokes = at(0)?;
        let grants = at(1)?;
        let dead_in_doubt = at(3)?;
        // Grants listed past the count (a counter that drifted low) are too
        // many to send with a check too.
        let listed = v.len().saturating_sub(4) / 2;
        if revokes > 0 || grants.max(listed) > limit || dead_in_doubt > 0 {
            return Ok(Relevant {
                revokes,
                grants: None,
                unreadable: 0,
                written_ago: None,
                dead_in_doubt,
            });
        }
        // -1: no write remembered; anything else below zero is not an age
        // the script makes: read as "just now" (fresh answers), as the
        // script reads what it cannot.
        let written_ago = match int(&v[2])? {
            -1 => None,
            ms => Some(Duration::from_millis(ms.max(0) as u64)),
        };
        let mut list = Vec::with_capacity(listed);
        let mut unreadable = 0;
        for c in v[4.min(v.len())..].chunks_exact(2) {
            let key = text(&c[0])?;
            match condition_of(&text(&c[1])?) {
                Ok(condition) => list.push(tuple_of(&key, condition)),
                // Neither "no condition" nor "no grant" is safe to assume:
                // the check waits for the flush to dead-letter it.
                Err(reason) => {
                    tracing::warn!(%key, error = %reason, "a check waits for a pending grant it cannot read to be dead-lettered");
                    unreadable += 1;
                }
            }
        }
        Ok(Relevant {
            revokes,
            grants: Some(list),
            unreadable,
            written_ago,
            dead_in_doubt: 0,
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
            in_flight: n(2)?.max(0).saturating_add(n(4)?.max(0)) as usize,
            oldest_age: (oldest >= 0)
                .then(|| Duration::from_millis(now_ms().saturating_sub(oldest as u64))),
        })
    }

    /// Clears in steps of a few hundred keys (one script call each), so a
    /// backlog of millions never holds Redis, and every other process's
    /// pushes and checks, for seconds; what was acknowledged after the
    /// first step is kept.
    async fn clear_now(&self, up_to: Option<u64>) -> Result<Vec<(TupleKey, Op)>> {
        // One clear at a time: Redis keeps the answer of this writer's
        // last step only, for the cluster client's repeat of it.
        let _one = self.clearing.lock().await;
        let mut up_to = up_to.map(|s| s.to_string()).unwrap_or_default();
        let (mut cursor, mut jobs) = ("0".to_owned(), String::new());
        let mut out: Vec<(TupleKey, Op)> = Vec::new();
        loop {
            let mut a = Args::new("clear", self.publish);
            // An id per step: the cluster client may send one again.
            let step = self.clear_steps.fetch_add(1, Ordering::Relaxed) + 1;
            a.push(now_ms())
                .push(&cursor)
                .push(&up_to)
                .push(&jobs)
                .push(&self.writer)
                .push(step);
            let v = match self.call(&a).await.and_then(items) {
                Ok(v) => v,
                Err(e) => {
                    // Earlier steps dropped these for good: their record
                    // is here or nowhere.
                    for (t, op) in &out {
                        tracing::warn!(tuple = %t, ?op, "cleared before the clear failed");
                    }
                    return Err(e);
                }
            };
            let [next, seq, job, cleared @ ..] = v.as_slice() else {
                return Err(corrupt(format!("clear returned {} items", v.len())));
            };
            for c in cleared.chunks_exact(3) {
                if let Some(op) = op_of(&text(&c[1])?) {
                    out.push((tuple_of(&text(&c[0])?, shown_condition(&text(&c[2])?)), op));
                }
            }
            (cursor, up_to, jobs) = (text(next)?, text(seq)?, text(job)?);
            if cursor == "0" {
                return Ok(out);
            }
        }
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop_beats();
    }
}

impl RedisStore {
    /// Stops the heartbeat, and the beats a look at the loss record runs.
    fn stop_beats(&self) {
        self.watch.beats_stopped.store(true, Ordering::Release);
        self.heartbeat.abort();
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
        Box::pin(self.finish_now(done, job, finish::RETRY_FOR))
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

    fn note_landed<'a>(&'a self, tuples: &'a [TupleKey]) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut a = Args::new("landed", self.publish);
            for t in tuples {
                a.push(key_of(t));
            }
            self.call(&a).await.map(drop)
        })
    }

    fn owes_revoke<'a>(&'a self, tuple: &'a TupleKey) -> BoxFuture<'a, Result<bool>> {
        Box::pin(async move {
            let mut a = Args::new("owes", self.publish);
            a.push(key_of(tuple));
            Ok(int(&self.call(&a).await?)? == 1)
        })
    }

    fn relations_buffered<'a>(
        &'a self,
        object_type: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            // "type#relation|g" (or "|r") -> ops of that kind whose latest
            // op it is (P:rel); and the keys (`object#relation@user`) of
            // this type's revokes (and grants with a condition) that died of
            // transient causes, which the read's look at the relation counts
            // as well (P:deadrev: a few at most).
            // The letters read before and after the ops: a replay (letter
            // to op) or a death (op to letter) in between is seen in one.
            let owed_cmd = |pipe: &mut redis::Pipeline| {
                pipe.cmd("ZRANGEBYLEX")
                    .arg(format!("{}:deadrev", self.prefix))
                    .arg(format!("[{object_type}:"))
                    .arg(format!("({object_type};"))
                    .arg("LIMIT")
                    .arg(0)
                    .arg(OWED_MAX + 1);
            };
            let mut pipe = redis::pipe();
            owed_cmd(&mut pipe);
            pipe.cmd("HGETALL").arg(format!("{}:rel", self.prefix));
            owed_cmd(&mut pipe);
            let (before, counts, after): (Vec<String>, Vec<(String, String)>, Vec<String>) =
                pipe.query_async(&mut conn).await.map_err(redis_error)?;
            if before.len().max(after.len()) > OWED_MAX {
                // Not all listed: the read cannot know which relations
                // to look at, and fails closed.
                return Err(Error::new(Kind::ReadInDoubt {
                    object_type: object_type.to_owned(),
                    letters: OWED_MAX,
                }));
            }
            let owed = before.into_iter().chain(after);
            let mut rels: Vec<String> = counts
                .into_iter()
                .filter(|(_, n)| n.parse::<i64>().map_or(true, |n| n > 0))
                .filter_map(|(f, _)| {
                    let (ty, rest) = f.split_once('#')?;
                    let (rel, _kind) = rest.rsplit_once('|')?;
                    (ty == object_type).then(|| rel.to_owned())
                })
                .collect();
            rels.extend(owed.filter_map(|k| {
                let (_, rest) = k.split_once('#')?;
                Some(rest.split_once('@')?.0.to_owned())
            }));
            rels.sort_unstable();
            rels.dedup();
            Ok(rels)
        })
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

    fn unfinished(&self, up_to: u64) -> BoxFuture<'_, Result<Unfinished>> {
        Box::pin(async move {
            let mut a = Args::new("unfinished", self.publish);
            a.push(up_to);
            match items(self.call(&a).await?)?.as_slice() {
                [ops, letters, left] => Ok(Unfinished {
                    ops: int(ops)?.max(0) as u64,
                    transient_letters: int(letters)?.max(0) as u64,
                    left_letters: int(left)?.max(0) as u64,
                }),
                other => Err(corrupt(format!("unfinished returned {other:?}"))),
            }
        })
    }

    fn pending(&self) -> BoxFuture<'_, Result<Pending>> {
        Box::pin(self.read_pending())
    }

    fn pending_now(&self) -> Option<Pending> {
        None
    }

    fn clear(&self, up_to: Option<u64>) -> BoxFuture<'_, Result<Vec<(TupleKey, Op)>>> {
        Box::pin(self.clear_now(up_to))
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>>> {
        Box::pin(self.dead_now())
    }

    fn dead_count(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            redis::cmd("HLEN")
                .arg(format!("{}:dead", self.prefix))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)
        })
    }

    fn newest_letter_id(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let key = format!("{}:deadseq", self.prefix);
            let mut conn = self.conn.clone();
            let v: Option<String> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            match v {
                None => Ok(0),
                Some(v) => v.parse().map_err(|_| {
                    corrupt(format!(
                        "Redis key {key} holds {v:.40}, expected a whole number; it was not written by fga-wb (remove it, or use another redis.key_prefix)"
                    ))
                }),
            }
        })
    }

    fn letter_ids(&self) -> BoxFuture<'_, Result<Vec<u64>>> {
        Box::pin(self.letter_ids_now())
    }

    fn remove_dead_letters<'a>(
        &'a self,
        ids: Option<&'a [u64]>,
        up_to: Option<u64>,
    ) -> BoxFuture<'a, Result<Purged>> {
        Box::pin(self.purge_now(ids, up_to))
    }

    fn replay_dead_letters<'a>(
        &'a self,
        ids: Option<&'a [u64]>,
        only_transient: bool,
    ) -> BoxFuture<'a, Result<Replayed>> {
        Box::pin(self.replay_now(ids, only_transient, 0))
    }

    fn shared(&self) -> bool {
        true
    }

    fn write_budget(&self) -> Option<Duration> {
        Some(self.write_budget())
    }

    fn holds(&self, t: &Taken) -> bool {
        t.term == self.hold.term()
    }

    fn unsure_calls(&self) -> u64 {
        // A dropped connection may have lost the answer of a call under
        // way, and the cluster client sends such a call again by itself: it
        // succeeds, though its first run may have taken ops too.
        self.unsure.load(Ordering::Relaxed) + self.watch.resets.load(Ordering::Acquire)
    }

    fn dead_on_take(&self) -> u64 {
        self.dead_on_take.swap(0, Ordering::Relaxed)
    }

    fn stop_retrying_at(&self, at: std::time::Instant) {
        self.finishes.stop_at(at);
    }

    fn pending_up_to(&self, up_to: u64) -> BoxFuture<'_, Result<bool>> {
        Box::pin(async move {
            let mut a = Args::new("pendingupto", self.publish);
            a.push(up_to);
            Ok(int(&self.call(&a).await?)? != 0)
        })
    }

    fn blocked_up_to(&self, up_to: u64) -> BoxFuture<'_, Result<u64>> {
        Box::pin(async move {
            let mut a = Args::new("blocked", self.publish);
            a.push(up_to);
            Ok(int(&self.call(&a).await?)?.max(0) as u64)
        })
    }

    fn release(&self, keep_until: Option<std::time::Instant>) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.watch.released.store(true, Ordering::Release);
            self.stop_beats();
            let _no_beat = self.watch.beat_lock.lock().await;
            let mut a = Args::new("release", self.publish);
            a.push(now_ms()).push(&self.writer);
            if let Some(until) = keep_until {
                a.push(ms_at(until));
            }
            self.call(&a).await?;
            Ok(())
        })
    }

    fn flusher_ended(&self) {
        self.stop_beats();
    }

    fn keep_lease_until(&self, until: std::time::Instant) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let mut a = Args::new("lease", self.publish);
            a.push(&self.writer).push(ms_at(until));
            self.call(&a).await?;
            Ok(())
        })
    }

    fn give_back_strays<'a>(
        &'a self,
        held: Option<&'a (dyn Fn(&str) -> bool + Sync)>,
    ) -> BoxFuture<'a, Result<(u64, u64)>> {
        Box::pin(async move {
            let mut a = Args::new("strays", self.publish);
            a.push(now_ms()).push(&self.writer);
            if let Some(held) = held {
                // Only the keys the caller does not hold: what it holds is
                // listed in the same set.
                let mut conn = self.conn.clone();
                let listed: Vec<String> = redis::cmd("SMEMBERS")
                    .arg(format!("{}:w:{}", self.prefix, self.writer))
                    .query_async(&mut conn)
                    .await
                    .map_err(redis_error)?;
                let strays: Vec<&String> = listed.iter().filter(|k| !held(k)).collect();
                if strays.is_empty() {
                    return Ok((0, 0));
                }
                a.push("keys");
                for k in strays {
                    a.push(k);
                }
            }
            let v = items(self.call(&a).await?)?;
            Ok((count(&v, 0)?, count(&v, 1)?))
        })
    }

    fn shared_stats(&self) -> BoxFuture<'_, Result<std::collections::HashMap<String, String>>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            type Stats = std::collections::HashMap<String, String>;
            type Owners = Vec<(String, f64)>;
            let (mut stats, owners, gone): (Stats, Owners, Vec<String>) = redis::pipe()
                .cmd("HGETALL")
                .arg(format!("{}:stats", self.prefix))
                .cmd("ZRANGEBYSCORE")
                .arg(format!("{}:owners", self.prefix))
                .arg(now_ms())
                .arg("+inf")
                .arg("WITHSCORES")
                .cmd("HKEYS")
                .arg(format!("{}:heldover", self.prefix))
                .query_async(&mut conn)
                .await
                .map_err(redis_error)?;
            // Writers whose lease ended while they wrote: Redis keeps what
            // they hold a while longer (to their lease's end, now), but they
            // are gone. A mark whose writer has no lease left is stale.
            let (held, owners): (Owners, Owners) =
                owners.into_iter().partition(|(w, _)| gone.contains(w));
            let live: Vec<String> = owners.into_iter().map(|(w, _)| w).collect();
            if !held.is_empty() {
                let until = held.iter().map(|(_, at)| *at).fold(0.0, f64::max);
                stats.insert(
                    super::HELD_OVER.into(),
                    format!("{}/{}", held.len(), until.max(0.0) as u64),
                );
            }
            // Each writer's own stop (see record_work), of those alive: one
            // process's note no longer overwrites another's, and a dead
            // process's is not shown.
            let mut stopped: Vec<(String, String)> = stats
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(STOPPED_NOTE)?.to_owned(), v.clone())))
                .collect();
            stats.retain(|k, _| !k.starts_with(STOPPED_NOTE));
            stopped.retain(|(writer, why)| !why.is_empty() && live.contains(writer));
            stopped.sort();
            let reported =
                |(writer, why): &(String, String)| format!("{why} (reported by {writer})");
            if let Some(w) = stopped.iter().find(|(w, _)| w.starts_with("worker:")) {
                stats.insert(super::WORKERS_STOPPED.into(), reported(w));
            }
            if let Some(w) = stopped.first() {
                stats.insert("stopped".into(), reported(w));
            }
            // Application processes alive besides this one: each flushes
            // the shared buffer by itself (not an operator's tool, nor a
            // handle that flushes only when told).
            let apps = live
                .iter()
                .filter(|w| w.starts_with("app:") && **w != self.writer)
                .count();
            stats.insert(super::LIVE_APPS.into(), apps.to_string());
            Ok(stats)
        })
    }

    fn record_work(
        &self,
        notes: Vec<(&'static str, String)>,
        requests: u64,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            let key = format!("{}:stats", self.prefix);
            let mut pipe = redis::pipe();
            // Whether flushing is stopped is each writer's own: under its
            // name, and gone once it is not (see shared_stats).
            let (stopped, notes): (Vec<_>, Vec<_>) =
                notes.into_iter().partition(|(name, _)| *name == "stopped");
            let mine = format!("{STOPPED_NOTE}{}", self.writer);
            if !stopped.is_empty() {
                // The one note all writers shared before (versions up to
                // 0.1): left stale, it would show for good.
                pipe.cmd("HDEL").arg(&key).arg("stopped").ignore();
            }
            match stopped.into_iter().next() {
                Some((_, why)) if !why.is_empty() => {
                    pipe.cmd("HSET").arg(&key).arg(&mine).arg(why).ignore();
                }
                Some(_) => {
                    pipe.cmd("HDEL").arg(&key).arg(&mine).ignore();
                }
                None => {}
            }
            if !notes.is_empty() {
                pipe.cmd("HSET").arg(&key);
                for (name, value) in &notes {
                    pipe.arg(*name).arg(value);
                }
                pipe.ignore();
            }
            if requests > 0 {
                pipe.cmd("HINCRBY")
                    .arg(&key)
                    .arg("requests")
                    .arg(requests)
                    .ignore();
            }
            let mut conn = self.conn.clone();
            pipe.query_async::<()>(&mut conn).await.map_err(redis_error)
        })
    }

    fn connection_mark(&self) -> u64 {
        self.watch.resets.load(Ordering::Acquire)
    }

    fn still_connected(&self, mark: u64) -> Result<()> {
        if self.watch.resets.load(Ordering::Acquire) != mark {
            // This check's reads may straddle a reconnect: the quiet time
            // after it says when checks resume.
            self.after_reconnect()?;
            return Err(Error::new(Kind::Reconnecting {
                left: Duration::ZERO,
            }));
        }
        Ok(())
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
                let v = items(invoke(&self.conn, &self.gen_script, &self.prefix, &a).await?)?;
                // Never shorter: one read as zeros would keep cached
                // answers past changes.
                if v.len() < 4 {
                    return Err(corrupt(format!("gen returned {} items", v.len())));
                }
                self.watch.node_met(&text(v.get(3).unwrap_or(&Value::Nil))?);
                self.after_reconnect()?;
                self.confirm_others().await?;
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
                let sum = v[4.min(v.len())..]
                    .iter()
                    .map(|g| int(g).map(|g| g as u64))
                    .try_fold(0u64, |acc, g| g.map(|g| acc.wrapping_add(g)))?;
                return Ok(sum.wrapping_add(resets << RESETS_SHIFT));
            }
            Err(self.loss_error().await)
        })
    }

    fn loss(&self) -> BoxFuture<'_, Result<Option<String>>> {
        Box::pin(async move {
            // What this process knows (the epoch, what it acknowledged) is
            // compared first: a look right after Redis lost its data (a
            // FLUSHALL wakes no heartbeat) finds the loss recorded, not a
            // store that looks empty, as if all had been written. Not once
            // the heartbeat has stopped (the flusher ended, a stop under
            // way): a look must not renew a lease being given up. The
            // heartbeat says whether a record is open, so it is read only
            // then (a heartbeat that found the lease released did not look).
            if !self.watch.beats_stopped.load(Ordering::Acquire)
                && !self.beat().await?
                && !self.watch.released.load(Ordering::Acquire)
            {
                return Ok(None);
            }
            self.loss_now().await
        })
    }

    fn acknowledge_loss<'a>(&'a self, by: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(self.acknowledge_loss_now(by))
    }

    fn events(
        &self,
    ) -> Option<BoxFuture<'static, Result<futures::stream::BoxStream<'static, StoreEvent>>>> {
        let (target, tls) = (self.target.clone(), self.tls.clone());
        let channel = format!("{}:events", self.prefix);
        Some(Box::pin(async move {
            let stream = conn::subscribe(&target, &tls, &channel).await?;
            Ok(stream
                .filter_map(|payload| {
                    futures::future::ready(match payload.as_str() {
                        "finished" => Some(StoreEvent::Finished),
                        "jobs" => Some(StoreEvent::Jobs),
                        // A process connecting tests that it may publish.
                        conn::PROBE => None,
                        _ => Some(StoreEvent::All),
                    })
                })
                .boxed())
        }))
    }
}
