//! The flusher: a pump that keeps OpenFGA busy with Write requests (or, in
//! queue mode, pushes jobs) for as long as something is due.
//!
//! One background task owns the decision of *what* to write and *when*.
//! Triggers raise a target sequence number: everything acknowledged up to it
//! is due. They are: the batch size reached, the oldest op reaching
//! `flush.interval`, revokes (at once, unless `eager_revokes` is off),
//! `flush()` and shutdown. While something is due, the pump keeps up to its
//! concurrency limit of requests in flight, starting the next as soon as one
//! ends: there is no pause between rounds.
//!
//! Ops are taken from the store in windows of several chunks and sorted by
//! key before chunks are cut, so each request touches a narrow range of the
//! server's index, and two writers of the same tuples lock them in the same
//! order (OpenFGA's SQL datastores lock rows in key order).
//!
//! A request that fails transiently is retried alone, with backoff, while the
//! others go on; after `flush.request_retries` the chunk's ops go back to
//! pending and the pump pauses new requests (exponential backoff, never
//! sooner than `Retry-After`). A permanent input error is bisected down to
//! the bad tuples. Refused credentials or an unknown store stop flushing
//! until an explicit `flush()`.
//!
//! With `flush.adaptive_parallelism`, the concurrency limit follows the
//! server: it grows while round trips stay near the fastest seen (a remote
//! server, many idle workers) and shrinks when requests queue up at the
//! server or it pushes back (429, 5xx, timeouts).

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use crate::buffer::{Claim, Finished, Outcome, Store, Take, Taken};
use crate::cache::CheckCache;
use crate::config::FlushConfig;
use crate::error::{Error, Kind};
use crate::openfga::{Client, WriteRequest};
use crate::status::{count, FlushReport, Stats};
use crate::tuple::Op;

/// Where a flush in queue mode hands its chunks. The real one is the Redis
/// store's job queue; the test doubles record them.
pub(crate) trait JobSink: Send + Sync + 'static {
    /// Hands taken ops to a new job, which holds them from then on.
    fn enqueue<'a>(
        &'a self,
        store_id: &'a str,
        model_id: Option<&'a str>,
        ops: &'a [Taken],
    ) -> BoxFuture<'a, crate::error::Result<()>>;
}

/// The sink used by a handle in queue mode.
pub(crate) type Sink = Arc<dyn JobSink>;

/// The id of the authorization model writes (and checks) go out with. A
/// handle that follows the store's latest model replaces it when a newer
/// one is published (`WriteBehind::refresh_model`).
#[derive(Debug, Default)]
pub(crate) struct ModelId(std::sync::RwLock<Option<String>>);

impl ModelId {
    pub fn new(id: Option<String>) -> Self {
        ModelId(std::sync::RwLock::new(id))
    }

    pub fn get(&self) -> Option<String> {
        // A plain value: sound even if a writer panicked.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, id: Option<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = id;
    }
}

/// Everything a flush needs. Shared by the handle and the flusher task.
pub(crate) struct Engine {
    pub store: Arc<dyn Store>,
    pub client: Client,
    /// The client Write requests go through: in a handle, a fork of
    /// `client` with its own connections, for the flusher's own runtime.
    pub writer: Client,
    pub store_id: String,
    pub model_id: ModelId,
    pub cfg: FlushConfig,
    pub cache: Arc<CheckCache>,
    pub stats: Arc<Stats>,
    /// Bumped after every batch of outcomes: checks waiting for a revoke
    /// and callers waiting for room watch it.
    pub changed: watch::Sender<u64>,
    /// Queue mode: where jobs go. `None`: write inline.
    pub sink: Option<Sink>,
    /// Set by a check waiting for a pending revoke: flush revokes now, even
    /// with `eager_revokes` off.
    pub revoke_wanted: AtomicBool,
    /// Set by a caller blocked on a full buffer, or by a check waiting for
    /// a pending grant with a condition: flush now, whatever the batch size
    /// and interval say.
    pub flush_wanted: AtomicBool,
    /// The pump's current concurrency limit, for `status`.
    pub parallel: AtomicUsize,
    /// The pump has nothing in flight and waits: a new op may need to wake
    /// it (see [`Engine::nudge`]).
    pub sleeping: AtomicBool,
    /// The pump waits with a timer set (the interval of the oldest op).
    pub timer_armed: AtomicBool,
    /// Wakes the pump.
    pub wake: Arc<Notify>,
    /// Another process finished writes (shared stores): ops that waited
    /// behind them may be ready now.
    pub others_finished: AtomicBool,
    /// Shutdown's deadline: no request is retried past it (its ops go back
    /// to pending instead, rather than stay in flight).
    pub retry_deadline: std::sync::Mutex<Option<Instant>>,
    /// The server's tuples-per-Write limit, when it refused a request for
    /// being above it (its `--max-tuples-per-write` is lower than
    /// `flush.max_tuples_per_write`); 0 until then.
    pub tuple_limit: AtomicUsize,
}

impl Engine {
    /// The runtime for one OpenFGA store: what a handle and a queue worker
    /// both run on. `writer` sends the Write requests (a handle forks its
    /// client so the flusher's runtime has its own connections); `sink`
    /// makes it queue jobs instead of writing.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        store: Arc<dyn Store>,
        client: Client,
        writer: Client,
        store_id: String,
        model_id: Option<String>,
        cfg: FlushConfig,
        cache: Arc<CheckCache>,
        sink: Option<Sink>,
    ) -> Engine {
        Engine {
            store,
            client,
            writer,
            store_id,
            model_id: ModelId::new(model_id),
            cfg,
            cache,
            stats: Default::default(),
            changed: watch::channel(0).0,
            sink,
            flush_wanted: Default::default(),
            revoke_wanted: Default::default(),
            parallel: Default::default(),
            sleeping: Default::default(),
            timer_armed: Default::default(),
            wake: Arc::new(Notify::new()),
            others_finished: Default::default(),
            retry_deadline: Default::default(),
            tuple_limit: Default::default(),
        }
    }

    /// Most ops one Write carries: the configured size, or the server's
    /// limit once it told us a lower one.
    pub fn max_tuples(&self) -> usize {
        match self.tuple_limit.load(Ordering::Relaxed) {
            0 => self.cfg.max_tuples_per_write,
            l => l.min(self.cfg.max_tuples_per_write),
        }
    }

    /// Learns the server's limit from a refusal such as "The number of
    /// write operations exceeds the allowed limit of 10"; returns it.
    fn learn_limit(&self, e: &Error) -> Option<usize> {
        if e.code() != Some("exceeded_entity_limit") {
            return None;
        }
        let limit: usize = e
            .server_message()?
            .rsplit("allowed limit of ")
            .next()?
            .trim()
            .trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .ok()
            .filter(|l| *l > 0)?;
        if self.tuple_limit.swap(limit, Ordering::Relaxed) != limit {
            tracing::warn!(
                limit,
                configured = self.cfg.max_tuples_per_write,
                "OpenFGA takes at most {limit} tuples per Write (its --max-tuples-per-write); writing at most that many from now on (set flush.max_tuples_per_write to match)"
            );
        }
        Some(limit)
    }
}

/// Why a chunk stopped before all its ops were applied.
pub(crate) enum Stop {
    /// Retry later (5xx, timeout, connection, 429, conflicts).
    Transient(Error),
    /// Do not retry until someone acts (bad credentials, unknown store).
    Halt(Error),
}

impl Stop {
    pub(crate) fn error(&self) -> &Error {
        match self {
            Stop::Transient(e) | Stop::Halt(e) => e,
        }
    }
}

/// The outcome of one chunk, bisection and retries included.
pub(crate) struct ChunkResult {
    pub outcomes: Vec<(Taken, Outcome)>,
    pub requests: u64,
    /// Ops handed to the job queue.
    pub queued: u64,
    pub stop: Option<Stop>,
    /// Round trips of successful full-size requests, for the concurrency
    /// limit.
    pub rtts: Vec<Duration>,
    /// The server pushed back (429, 5xx, timeout): lower the limit.
    pub congested: bool,
    /// What the store did with the outcomes (set by the pump's chunk
    /// future, which finishes its own ops).
    pub finished: Option<Result<Finished, Error>>,
}

impl ChunkResult {
    fn new(capacity: usize) -> Self {
        ChunkResult {
            outcomes: Vec::with_capacity(capacity),
            requests: 0,
            queued: 0,
            stop: None,
            rtts: Vec::new(),
            congested: false,
            finished: None,
        }
    }
}

/// How often one request is tried again at once (with a short jittered
/// backoff) before its chunk gives up.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QuickRetries {
    /// After a transient failure (5xx, timeout, 429, connection).
    pub transient: u32,
    /// After a write conflict (409: a concurrent writer of the same
    /// tuples), which clears as soon as the other transaction ends.
    pub conflicts: u32,
}

/// Conflicts are retried at least this often: two writers of the same new
/// tuples on PostgreSQL meet them constantly.
const CONFLICT_RETRIES: u32 = 5;

/// A request to the flusher task.
pub(crate) enum Command {
    /// Flush everything acknowledged so far and report.
    Flush(oneshot::Sender<FlushReport>),
    /// Flush everything until `deadline`, report (and whether writes were
    /// cut off in flight), and stop the task.
    Shutdown {
        deadline: Instant,
        reply: oneshot::Sender<(FlushReport, bool)>,
    },
}

impl Engine {
    /// Called after an op is acknowledged, with the pending count after it:
    /// wakes a sleeping pump when the op makes something due at once (a
    /// revoke, a full batch) or when the pump has no timer set. At most one
    /// wake per pump iteration, so callers granting flat out never make the
    /// pump spin, and a busy pump is never woken (its running requests
    /// bring it back).
    pub(crate) fn nudge(&self, revoke: bool, pending: usize) {
        if !self.sleeping.load(Ordering::Relaxed) {
            return;
        }
        let due = (revoke && self.cfg.eager_revokes)
            || pending >= self.cfg.batch_size
            || !self.timer_armed.load(Ordering::Relaxed);
        if due && self.sleeping.swap(false, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// Wakes the pump now (a check waiting for a revoke, a caller waiting
    /// for room, a dead letter replayed).
    pub(crate) fn wake_now(&self) {
        self.sleeping.store(false, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Remembers a flush for `status`, here and, for a shared store, for
    /// every process.
    pub(crate) async fn record(&self, report: &FlushReport) {
        self.stats.record_flush(report);
        if let Some(last) = self.stats.last_flush() {
            if let Ok(json) = serde_json::to_string(&last) {
                let _ = self.store.set_note("last_flush", json).await;
            }
        }
        let stopped = self.stats.stopped().unwrap_or_default();
        let _ = self.store.set_note("stopped", stopped).await;
    }

    pub(crate) fn account(&self, f: &Finished, report: &mut FlushReport) {
        report.applied += f.applied;
        report.dead_lettered += f.dead;
        report.retried += f.requeued;
        count!(self.stats, applied, "fga_wb_ops_applied_total", f.applied);
        count!(
            self.stats,
            dead_lettered,
            "fga_wb_ops_dead_lettered_total",
            f.dead
        );
        count!(
            self.stats,
            coalesced,
            "fga_wb_ops_coalesced_total",
            f.superseded
        );
        self.changed.send_modify(|v| *v += 1);
    }

    /// Writes one chunk, or in queue mode hands it to one job.
    async fn send_chunk(self: Arc<Self>, ops: Vec<Taken>) -> ChunkResult {
        let Some(sink) = &self.sink else {
            let retries = QuickRetries {
                transient: self.cfg.request_retries,
                conflicts: self.cfg.request_retries.max(CONFLICT_RETRIES),
            };
            return self.write_chunk_as(None, None, ops, retries).await;
        };
        let mut result = ChunkResult::new(0);
        let model_id = self.model_id.get();
        match sink
            .enqueue(&self.store_id, model_id.as_deref(), &ops)
            .await
        {
            // The job holds the ops now, through all its retries; the worker
            // finishes them.
            Ok(()) => result.queued = ops.len() as u64,
            Err(e) => {
                result.outcomes = ops.into_iter().map(|t| (t, Outcome::Retry)).collect();
                result.stop = Some(Stop::Transient(e));
            }
        }
        result
    }

    /// Writes one chunk (for a queue worker: a job's, with the claims it
    /// got for its ops and under the job's `model`); on a permanent input
    /// error, splits it in halves until the bad ops are alone, so the good
    /// ones are applied. A request that fails transiently is tried again as
    /// `retries` allows.
    pub(crate) async fn write_chunk_as(
        &self,
        claims: Option<Vec<Claim>>,
        model: Option<&str>,
        ops: Vec<Taken>,
        retries: QuickRetries,
    ) -> ChunkResult {
        let mut result = ChunkResult::new(ops.len());
        let ops = match claims {
            Some(claims) => keep_claimed(ops, claims, &mut result),
            // Taken ops are this writer's.
            None => ops,
        };
        let full = self.max_tuples();
        let mut todo = vec![ops];
        while let Some(part) = todo.pop() {
            if result.stop.is_some() {
                result
                    .outcomes
                    .extend(part.into_iter().map(|t| (t, Outcome::Retry)));
                continue;
            }
            let started = Instant::now();
            match self
                .write_retrying(&part, model, retries, &mut result)
                .await
            {
                Ok(()) => {
                    metrics::counter!("fga_wb_write_requests_total", "outcome" => "ok")
                        .increment(1);
                    if part.len() * 2 >= full {
                        result.rtts.push(started.elapsed());
                    }
                    result
                        .outcomes
                        .extend(part.into_iter().map(|t| (t, Outcome::Applied)));
                }
                Err(e)
                    if part.len() > 1 && self.learn_limit(&e).is_some_and(|l| l < part.len()) =>
                {
                    // Over the server's limit: the same ops in requests it
                    // takes, not a bisection hunting for a bad tuple.
                    let limit = self.max_tuples();
                    let mut rest = part;
                    while rest.len() > limit {
                        let tail = rest.split_off(limit);
                        todo.push(std::mem::replace(&mut rest, tail));
                    }
                    todo.push(rest);
                }
                Err(e) if e.is_invalid_input() && part.len() > 1 => {
                    metrics::counter!("fga_wb_write_requests_total", "outcome" => "bisected")
                        .increment(1);
                    let mut left = part;
                    let right = left.split_off(left.len() / 2);
                    todo.push(right);
                    todo.push(left);
                }
                Err(e)
                    if e.is_condition_conflict()
                        && matches!(part.as_slice(), [t] if t.op == Op::Grant) =>
                {
                    // A grant again with another condition means "replace".
                    for t in part {
                        let outcome = self
                            .replace_condition(&t, model, retries, &mut result)
                            .await;
                        result.outcomes.push((t, outcome));
                    }
                }
                Err(e) if e.is_invalid_input() => {
                    metrics::counter!("fga_wb_write_requests_total", "outcome" => "rejected")
                        .increment(1);
                    for t in part {
                        tracing::warn!(tuple = %t.tuple, op = ?t.op, error = %e, "dead-lettered");
                        let reason = e
                            .server_message()
                            .map_or_else(|| e.to_string(), str::to_owned);
                        let code = e.code().map(str::to_owned);
                        result.outcomes.push((
                            t,
                            Outcome::Dead {
                                reason,
                                code,
                                transient: false,
                            },
                        ));
                    }
                }
                Err(e) => {
                    metrics::counter!("fga_wb_write_requests_total", "outcome" => "failed")
                        .increment(1);
                    tracing::warn!(error = %e, tuples = part.len(), "write failed; ops stay pending");
                    result
                        .outcomes
                        .extend(part.into_iter().map(|t| (t, Outcome::Retry)));
                    result.stop = Some(if e.is_auth() || e.is_not_found() {
                        Stop::Halt(e)
                    } else {
                        Stop::Transient(e)
                    });
                }
            }
        }
        result
    }

    /// Writes a grant over the same tuple held with another condition (or
    /// condition context): OpenFGA will not overwrite it, nor take a delete
    /// and a write of one tuple in one request, so the old tuple is deleted
    /// first and the new one written next. In between the tuple is absent,
    /// so access is never wider than either version; the op stays in flight
    /// throughout, so checks see the new version and no newer op on the
    /// tuple is written before it.
    async fn replace_condition(
        &self,
        t: &Taken,
        model: Option<&str>,
        retries: QuickRetries,
        result: &mut ChunkResult,
    ) -> Outcome {
        let delete = Taken {
            op: Op::Revoke,
            ..t.clone()
        };
        let written = match self
            .write_retrying(std::slice::from_ref(&delete), model, retries, result)
            .await
        {
            Ok(()) => {
                self.write_retrying(std::slice::from_ref(t), model, retries, result)
                    .await
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(()) => {
                tracing::info!(tuple = %t.tuple, "replaced the tuple's condition (delete, then write)");
                Outcome::Applied
            }
            Err(e) if e.is_invalid_input() => {
                tracing::warn!(tuple = %t.tuple, error = %e, "dead-lettered");
                let reason = e
                    .server_message()
                    .map_or_else(|| e.to_string(), str::to_owned);
                Outcome::Dead {
                    reason,
                    code: e.code().map(str::to_owned),
                    transient: false,
                }
            }
            Err(e) => {
                // Written again later: by then the old tuple may be gone,
                // and a plain write does it.
                tracing::warn!(tuple = %t.tuple, error = %e, "replacing the tuple's condition failed; the grant stays pending");
                if result.stop.is_none() {
                    result.stop = Some(if e.is_auth() || e.is_not_found() {
                        Stop::Halt(e)
                    } else {
                        Stop::Transient(e)
                    });
                }
                Outcome::Retry
            }
        }
    }

    /// One Write of `ops`, sent again on a transient failure as `retries`
    /// allows, with jittered backoff (never sooner than `Retry-After`).
    async fn write_retrying(
        &self,
        ops: &[Taken],
        model: Option<&str>,
        retries: QuickRetries,
        result: &mut ChunkResult,
    ) -> Result<(), Error> {
        let mut backoff = quick_backoff(&self.cfg);
        let mut tries = 0u32;
        loop {
            result.requests += 1;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let e = match self.write(ops, model).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            let conflict = e.status() == Some(409);
            if e.is_transient() {
                // Every request that failed transiently; its ops are sent
                // again (now, or after the pause).
                count!(self.stats, retries, "fga_wb_write_retries_total", 1);
                if !conflict {
                    result.congested = true;
                }
            }
            let allowed = e.is_transient()
                && tries
                    < if conflict {
                        retries.conflicts
                    } else {
                        retries.transient
                    };
            if !allowed {
                return Err(e);
            }
            tries += 1;
            let wait = backoff.next().unwrap_or(self.cfg.retry_max_backoff);
            let wait = e.retry_after().map_or(wait, |r| r.max(wait));
            let deadline = *self
                .retry_deadline
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if deadline.is_some_and(|d| Instant::now() + wait >= d) {
                return Err(e);
            }
            tracing::debug!(error = %e, retry_in = ?wait, "write failed; retrying the request");
            tokio::time::sleep(wait).await;
        }
    }

    async fn write(&self, ops: &[Taken], model: Option<&str>) -> Result<(), Error> {
        let mut writes = Vec::new();
        let mut deletes = Vec::new();
        for t in ops {
            match t.op {
                Op::Grant => writes.push(t.tuple.clone()),
                Op::Revoke => deletes.push(t.tuple.clone()),
            }
        }
        let mut req = WriteRequest::idempotent(writes, deletes);
        req.authorization_model_id = model.map(str::to_owned).or_else(|| self.model_id.get());
        // A write must end within this writer's hold on its ops (shared
        // stores), or another writer could write a newer op first.
        let budget = self.store.write_budget();
        if budget.is_some_and(|b| b < Duration::from_millis(500)) {
            return Err(Error::new(Kind::Busy(
                "this process's Redis lease is about to end; not starting a write".into(),
            )));
        }
        self.writer.write_within(&self.store_id, &req, budget).await
    }
}

/// The ops a queue worker may write: the claimed ones. Stale ones (a newer
/// op replaced them) finish without a write; busy ones (a writer presumed
/// dead still holds the key) stay with their job for a moment.
fn keep_claimed(ops: Vec<Taken>, claims: Vec<Claim>, result: &mut ChunkResult) -> Vec<Taken> {
    let mut mine = Vec::with_capacity(ops.len());
    let mut claims = claims.into_iter();
    for t in ops {
        match claims.next() {
            Some(Claim::Claimed) => mine.push(t),
            // Finishing a superseded op drops it.
            Some(Claim::Stale) => result.outcomes.push((t, Outcome::Stale)),
            Some(Claim::Busy) | None => result.outcomes.push((t, Outcome::Busy)),
        }
    }
    mine
}

fn quick_backoff(cfg: &FlushConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(cfg.retry_initial_backoff.min(Duration::from_millis(50)))
        .with_max_delay(cfg.retry_max_backoff.min(Duration::from_secs(2)))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

fn pause_backoff(cfg: &FlushConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(cfg.retry_initial_backoff)
        .with_max_delay(cfg.retry_max_backoff)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The concurrency limit. It starts at `start` (8, or less if that is the
/// maximum) and grows, Vegas-style, while round trips stay near the fastest
/// seen, up to `max`; queueing at the server stops the growth and brings it
/// back towards `start`, never below. Only push-back (429, 5xx, timeouts)
/// halves it, down to `min`, and it climbs back from there.
struct Limit {
    current: f64,
    start: f64,
    min: f64,
    max: f64,
    adaptive: bool,
    /// The fastest round trip of the current and the previous window.
    base_rtt: Option<Duration>,
    window_min: Option<Duration>,
    samples: u32,
    /// No second decrease until this: one per round trip.
    calm_until: Option<Instant>,
}

/// Requests queued at the server below which the limit grows, and above
/// which it shrinks.
const QUEUE_LOW: f64 = 2.0;
const QUEUE_HIGH: f64 = 5.0;
/// Samples per window of the fastest round trip: the base follows a server
/// that got slower (a bigger store) within about this many requests.
const RTT_WINDOW: u32 = 200;

impl Limit {
    fn new(cfg: &FlushConfig) -> Limit {
        let max = cfg.max_parallel_requests.max(1) as f64;
        let min = cfg
            .min_parallel_requests
            .clamp(1, cfg.max_parallel_requests.max(1)) as f64;
        let adaptive = cfg.adaptive_parallelism && min < max;
        let start = if adaptive { max.min(8.0).max(min) } else { max };
        Limit {
            current: start,
            start,
            min,
            max,
            adaptive,
            base_rtt: None,
            window_min: None,
            samples: 0,
            calm_until: None,
        }
    }

    fn get(&self) -> usize {
        self.current as usize
    }

    fn observe(&mut self, rtts: &[Duration], congested: bool) {
        if !self.adaptive {
            return;
        }
        let now = Instant::now();
        if congested {
            if self.calm_until.is_none_or(|c| now >= c) {
                self.current = (self.current / 2.0).max(self.min);
                self.calm_until =
                    Some(now + self.base_rtt.unwrap_or(Duration::from_millis(100)) * 2);
            }
            return;
        }
        for &rtt in rtts {
            self.window_min = Some(self.window_min.map_or(rtt, |m| m.min(rtt)));
            self.samples += 1;
            if self.samples >= RTT_WINDOW {
                self.base_rtt = self.window_min.take();
                self.samples = 0;
            }
            let base = match (self.base_rtt, self.window_min) {
                (Some(b), Some(w)) => b.min(w),
                (b, w) => b.or(w).unwrap_or(rtt),
            };
            let queued = self.current * (1.0 - base.as_secs_f64() / rtt.as_secs_f64().max(1e-9));
            let step = 1.0 / self.current;
            if queued < QUEUE_LOW || self.current < self.start {
                self.current = (self.current + step).min(self.max);
            } else if queued > QUEUE_HIGH && self.current > self.start {
                self.current = (self.current - step).max(self.start);
            }
        }
    }
}

/// A `flush()` (or shutdown) waiting for everything acknowledged up to
/// `up_to` to be written.
struct Waiter {
    up_to: u64,
    reply: oneshot::Sender<FlushReport>,
    /// The pump's totals when it started.
    start: FlushReport,
    started: Instant,
}

/// A running chunk's result and the lowest `first` among its ops.
type Running = FuturesUnordered<BoxFuture<'static, (ChunkResult, u64)>>;

/// The flusher task's state.
struct Pump {
    engine: Arc<Engine>,
    automatic: bool,
    running: Running,
    /// `first` of each running chunk's oldest op (a multiset).
    running_firsts: BTreeMap<u64, usize>,
    /// Taken ops sorted by key, not yet sent.
    staged: VecDeque<Taken>,
    /// The next window being taken, while the staged ops are sent.
    taking: Option<BoxFuture<'static, Window>>,
    /// The tail of an object held back for the next window, where more of
    /// its ops are due: merged with them, it fills whole chunks.
    carry: Vec<Taken>,
    /// How many times each staged op (by seq) was held back: at most
    /// `MAX_CARRIES`, so a lone partial group waits a few windows at most.
    carried: std::collections::HashMap<u64, u8>,
    /// Everything with `first <= target` is due; revokes up to
    /// `revoke_target` too.
    target: u64,
    revoke_target: u64,
    /// Windows are taken by sequence range: the end of the last one.
    cursor: u64,
    /// Ops up to the waiters' targets that wait behind another writer.
    blocked: u64,
    /// A take found nothing due up to this target: don't ask again until
    /// something changes.
    exhausted: Option<u64>,
    revokes_exhausted: Option<u64>,
    waiters: Vec<Waiter>,
    /// What the pump did since it started.
    totals: FlushReport,
    /// When the triggers were last looked at, and whether something asks
    /// to look again now (a wake, a command, a timer).
    planned_at: Option<Instant>,
    replan: bool,
    due: Option<Instant>,
    limit: Limit,
    /// After a chunk gave up on a transient error: no new request before this.
    paused_until: Option<Instant>,
    backoff: ExponentialBackoff,
    /// An error seen since the last report to a waiter, for its report.
    last_error: Option<String>,
    /// Requests, ops applied and dead-lettered since the last record.
    unrecorded: FlushReport,
    shutdown: Option<Instant>,
}

impl Pump {
    fn new(engine: Arc<Engine>, automatic: bool) -> Pump {
        let limit = Limit::new(&engine.cfg);
        let backoff = pause_backoff(&engine.cfg);
        engine.parallel.store(limit.get(), Ordering::Relaxed);
        Pump {
            engine,
            automatic,
            running: FuturesUnordered::new(),
            running_firsts: BTreeMap::new(),
            staged: VecDeque::new(),
            taking: None,
            carry: Vec::new(),
            carried: Default::default(),
            target: 0,
            revoke_target: 0,
            cursor: 0,
            blocked: 0,
            exhausted: None,
            revokes_exhausted: None,
            waiters: Vec::new(),
            totals: FlushReport::default(),
            planned_at: None,
            replan: true,
            due: None,
            limit,
            paused_until: None,
            backoff,
            last_error: None,
            unrecorded: FlushReport::default(),
            shutdown: None,
        }
    }

    /// Looks at the triggers when it may matter: while requests run and
    /// the target is not reached, at most every `PLAN_EVERY` (for the Redis
    /// store each look is a round trip).
    async fn maybe_plan(&mut self) -> Option<Instant> {
        let busy = !self.running.is_empty() && self.exhausted != Some(self.target);
        let recent = self.planned_at.is_some_and(|t| t.elapsed() < PLAN_EVERY);
        if self.replan || !busy || !recent {
            self.replan = false;
            self.planned_at = Some(Instant::now());
            self.due = self.plan().await;
        }
        self.due
    }

    /// Raises the targets as the triggers say; returns when to look again.
    async fn plan(&mut self) -> Option<Instant> {
        let engine = self.engine.clone();
        let e = &engine;
        let cfg = &e.cfg;
        let now = Instant::now();
        let explicit = self.explicit();
        if !explicit && (!self.automatic || e.stats.stopped().is_some()) {
            // Only an explicit flush() tries again after an auth failure.
            return None;
        }
        let pending = match e.store.pending().await {
            Ok(p) => p,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the pending ops");
                return Some(now + cfg.interval.max(Duration::from_millis(100)));
            }
        };
        let last = || async {
            match e.store.last_seq().await {
                Ok(s) => Some(s),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the sequence number");
                    None
                }
            }
        };
        let mut next = None;
        if pending.total == 0 {
            // Ops held by jobs or by other processes come back here if their
            // holder dies; look again now and then.
            if pending.in_flight > 0 && e.store.shared() && self.running.is_empty() {
                next = Some(now + cfg.interval.max(Duration::from_secs(1)));
            }
        } else if !self.automatic {
            // Only what flush() and shutdown asked for (their targets are
            // raised below and by the command).
        } else if pending.total >= cfg.batch_size
            || e.flush_wanted.load(Ordering::Relaxed)
            || pending.oldest_age.is_some_and(|a| a >= cfg.interval)
        {
            if let Some(s) = last().await {
                self.raise(s);
            }
        } else if let Some(age) = pending.oldest_age {
            next = Some(now + cfg.interval.saturating_sub(age));
        }
        if self.automatic
            && pending.deletes > 0
            && (cfg.eager_revokes || e.revoke_wanted.load(Ordering::Relaxed))
        {
            if let Some(s) = last().await {
                if s > self.revoke_target {
                    self.revoke_target = s;
                    self.revokes_exhausted = None;
                }
            }
        }
        e.flush_wanted.store(false, Ordering::Relaxed);
        e.revoke_wanted.store(false, Ordering::Relaxed);
        if e.others_finished.swap(false, Ordering::Relaxed) {
            self.exhausted = None;
            self.revokes_exhausted = None;
        }
        for w in &self.waiters {
            if w.up_to > self.target {
                self.target = w.up_to;
                self.exhausted = None;
            }
        }
        // A flush() also waits for its ops that wait behind other writers'
        // writes; their end wakes the pump (pub/sub), and so does this poll.
        self.blocked = 0;
        if let Some(up_to) = self.waiters.iter().map(|w| w.up_to).max() {
            match e.store.blocked_up_to(up_to).await {
                Ok(n) => self.blocked = n,
                Err(err) => tracing::warn!(error = %err, "cannot count blocked ops"),
            }
            if self.blocked > 0 {
                next =
                    Some(next.map_or(now + BLOCKED_POLL, |n: Instant| n.min(now + BLOCKED_POLL)));
                // Writes of other processes end within their timeout and a
                // dead writer's within its lease: a flush does not wait
                // longer than that.
                let (late, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
                    .into_iter()
                    .partition(|w| w.started.elapsed() > BLOCKED_WAIT);
                self.waiters = waiting;
                for w in late {
                    let mut r = self.report_since(&w);
                    r.error = Some(format!(
                        "{} ops still wait behind writes by other processes after {BLOCKED_WAIT:?}; they are written when those end",
                        self.blocked
                    ));
                    let _ = w.reply.send(r);
                }
            }
        }
        match (next, self.paused_until) {
            (n, Some(p)) if p > now => Some(n.map_or(p, |n| n.min(p))),
            (n, _) => n,
        }
    }

    fn raise(&mut self, to: u64) {
        if to > self.target {
            self.target = to;
            self.exhausted = None;
        }
    }

    fn paused(&self) -> bool {
        self.paused_until.is_some_and(|p| Instant::now() < p)
    }

    /// Someone asked: `flush()` or shutdown.
    fn explicit(&self) -> bool {
        !self.waiters.is_empty() || self.shutdown.is_some()
    }

    /// Whether new requests may start: not paused after a failure, and not
    /// stopped by refused credentials (unless someone asked).
    fn may_write(&self) -> bool {
        let past_deadline = self.shutdown.is_some_and(|d| Instant::now() >= d);
        !self.paused()
            && !past_deadline
            && (self.explicit() || self.engine.stats.stopped().is_none())
    }

    /// Starts chunks while the limit allows and something is due.
    async fn fill(&mut self) {
        let chunk = self.engine.max_tuples();
        while self.running.len() < self.limit.get() && self.may_write() {
            let revokes_due =
                self.revoke_target > 0 && self.revokes_exhausted != Some(self.revoke_target);
            // Revokes behind a window of grants go ahead of it in a chunk of
            // their own: a check may be waiting for them.
            if revokes_due && (!self.staged.is_empty() || self.exhausted == Some(self.target)) {
                match self.take(chunk, Take::Revokes, self.revoke_target).await {
                    Some(ops) if !ops.is_empty() => {
                        self.start(ops);
                        continue;
                    }
                    Some(_) => self.revokes_exhausted = Some(self.revoke_target),
                    None => return,
                }
            }
            // The next window is taken while this one's chunks go out.
            let due = self.target > 0 && self.exhausted != Some(self.target);
            if due && self.taking.is_none() && self.staged.len() < chunk * self.limit.get() {
                self.taking = Some(Box::pin(take_window(
                    self.engine.clone(),
                    self.cursor,
                    self.target,
                    chunk * WINDOW_CHUNKS,
                )));
            }
            if self.staged.is_empty() {
                if self.taking.is_some() {
                    return;
                }
                if revokes_due {
                    match self
                        .take(chunk * WINDOW_CHUNKS, Take::Revokes, self.revoke_target)
                        .await
                    {
                        Some(ops) if ops.is_empty() => {
                            self.revokes_exhausted = Some(self.revoke_target);
                            return;
                        }
                        Some(ops) => self.stage(ops),
                        None => return,
                    }
                } else if !self.carry.is_empty() {
                    self.stage(Vec::new());
                } else {
                    return;
                }
            }
            let n = self.next_cut(chunk);
            if self.should_carry(n, chunk) {
                self.carry.extend(self.staged.drain(..n));
                continue;
            }
            let ops: Vec<Taken> = self.staged.drain(..n).collect();
            self.start(ops);
        }
    }

    /// Whether to hold back the next `n` staged ops for the next window:
    /// they are a partial chunk of one object, the last of it staged, more
    /// windows are due (so more of the object may come), and they were not
    /// held back `MAX_CARRIES` times already.
    fn should_carry(&self, n: usize, chunk: usize) -> bool {
        if n >= chunk || n < (chunk / 4).max(1) || self.cursor >= self.target {
            return false;
        }
        let object = &self.staged[0].tuple.object;
        let whole = self.staged.get(n).is_none_or(|t| &t.tuple.object != object);
        // Never a revoke: a check may be waiting for it.
        let fresh = self.staged.range(..n).all(|t| {
            t.op == Op::Grant && self.carried.get(&t.seq).is_none_or(|&n| n < MAX_CARRIES)
        });
        whole && fresh
    }

    /// How many staged ops the next chunk takes: one object's ops where it
    /// has enough of them, small objects together. OpenFGA on PostgreSQL
    /// writes a chunk of one object (or of many objects with one tuple
    /// each) several times faster than one mixing a few objects with many
    /// tuples each (its row-constructor lookup then scans), so a chunk
    /// never straddles a large group.
    fn next_cut(&self, chunk: usize) -> usize {
        let run_at = |from: usize| {
            let object = &self.staged[from].tuple.object;
            self.staged
                .range(from..)
                .take(chunk)
                .take_while(|t| &t.tuple.object == object)
                .count()
        };
        let big = (chunk / 4).max(1);
        let first = run_at(0);
        if first >= big {
            return first;
        }
        let mut n = first;
        while n < self.staged.len() && n < chunk {
            let g = run_at(n);
            if g >= big || n + g > chunk {
                break;
            }
            n += g;
        }
        n
    }

    /// A window was taken.
    fn taken(&mut self, w: Window) {
        self.taking = None;
        self.cursor = self.cursor.max(w.cursor);
        match w.result {
            Ok(ops) if ops.is_empty() => {
                if w.cursor >= w.target && w.target >= self.target {
                    self.exhausted = Some(w.target);
                }
            }
            Ok(ops) => self.stage(ops),
            Err(e) => {
                tracing::warn!(error = %e, "cannot take pending ops");
                self.give_up(Stop::Transient(e));
            }
        }
    }

    fn stage(&mut self, mut ops: Vec<Taken>) {
        let before = std::mem::take(&mut self.carried);
        self.carried = self
            .carry
            .iter()
            .map(|t| (t.seq, before.get(&t.seq).copied().unwrap_or(0) + 1))
            .collect();
        ops.append(&mut self.carry);
        // Key order: see the module docs.
        ops.sort_unstable_by(|a, b| {
            (&a.tuple.object, &a.tuple.relation, &a.tuple.user).cmp(&(
                &b.tuple.object,
                &b.tuple.relation,
                &b.tuple.user,
            ))
        });
        self.staged.extend(ops);
    }

    /// Takes ops from the store; `None` after an error (logged, paused).
    async fn take(&mut self, max: usize, what: Take, up_to: u64) -> Option<Vec<Taken>> {
        match self.engine.store.take(max, what, up_to).await {
            Ok(ops) => Some(ops),
            Err(e) => {
                tracing::warn!(error = %e, "cannot take pending ops");
                self.give_up(Stop::Transient(e));
                None
            }
        }
    }

    fn start(&mut self, ops: Vec<Taken>) {
        let first = ops.iter().map(|t| t.first).min().unwrap_or(0);
        *self.running_firsts.entry(first).or_default() += 1;
        let engine = self.engine.clone();
        let span = tracing::debug_span!("fga_wb.chunk", ops = ops.len());
        self.running.push(Box::pin(
            async move {
                let mut result = engine.clone().send_chunk(ops).await;
                // Finished here, not in the pump: chunks end concurrently,
                // and the pump goes on starting others meanwhile.
                for (t, o) in &result.outcomes {
                    if matches!(o, Outcome::Dead { .. }) {
                        // Its grant may have been in cached answers as a
                        // contextual tuple; OpenFGA will never have it.
                        engine.cache.invalidate_for(&t.tuple);
                    }
                }
                let outcomes = std::mem::take(&mut result.outcomes);
                if !outcomes.is_empty() {
                    result.finished = Some(engine.store.finish(outcomes, None).await);
                }
                (result, first)
            }
            .instrument(span),
        ));
    }

    /// Records a finished chunk.
    fn done(&mut self, result: ChunkResult, first: u64) {
        if let Some(n) = self.running_firsts.get_mut(&first) {
            *n -= 1;
            if *n == 0 {
                self.running_firsts.remove(&first);
            }
        }
        let e = self.engine.clone();
        self.limit.observe(&result.rtts, result.congested);
        e.parallel.store(self.limit.get(), Ordering::Relaxed);
        let mut report = FlushReport {
            requests: result.requests,
            queued: result.queued,
            ..Default::default()
        };
        let mut stop = result.stop;
        match result.finished {
            Some(Ok(f)) => e.account(&f, &mut report),
            Some(Err(err)) => {
                tracing::error!(error = %err, "could not record flush outcomes");
                stop.get_or_insert(Stop::Transient(err));
            }
            None => {}
        }
        // Something finished: keys it held may be ready again.
        self.exhausted = None;
        self.revokes_exhausted = None;
        self.totals.absorb(&report);
        let error = self.unrecorded.error.take();
        self.unrecorded.absorb(&report);
        self.unrecorded.error = error;
        match stop {
            Some(stop) => self.give_up(stop),
            None if report.requests > 0 || report.queued > 0 => {
                self.backoff = pause_backoff(&e.cfg);
                if e.stats.stopped().is_some() {
                    e.stats.set_stopped(None);
                }
            }
            None => {}
        }
    }

    /// A chunk stopped on an error: pause new requests (or stop flushing),
    /// and answer the waiters with it.
    fn give_up(&mut self, stop: Stop) {
        let e = &self.engine;
        let msg = stop.error().to_string();
        match &stop {
            Stop::Halt(err) => {
                tracing::error!(error = %err, "flushing stopped; pending ops are kept");
                e.stats.set_stopped(Some(err.clone()));
                self.paused_until = None;
            }
            Stop::Transient(err) => {
                metrics::counter!("fga_wb_flush_pauses_total").increment(1);
                let wait = self.backoff.next().unwrap_or(e.cfg.retry_max_backoff);
                let wait = err.retry_after().map_or(wait, |r| r.max(wait));
                let wait = match self.shutdown {
                    // Shutdown spends its deadline writing: short pauses.
                    Some(_) => wait.min(Duration::from_millis(200)),
                    None => wait,
                };
                self.paused_until = Some(Instant::now() + wait);
            }
        }
        self.last_error = Some(msg.clone());
        self.unrecorded.error = Some(msg);
        // The ops of a failed chunk are pending again: a flush() of them
        // cannot complete now, so it reports the error.
        let halted = matches!(stop, Stop::Halt(_));
        let waiters: Vec<Waiter> = if halted || self.shutdown.is_none() {
            std::mem::take(&mut self.waiters)
        } else {
            Vec::new()
        };
        for w in waiters {
            self.answer(w);
        }
        if halted {
            self.shutdown = self.shutdown.map(|_| Instant::now());
        }
    }

    fn report_since(&self, w: &Waiter) -> FlushReport {
        let t = &self.totals;
        let s = &w.start;
        FlushReport {
            applied: t.applied - s.applied,
            coalesced: 0,
            dead_lettered: t.dead_lettered - s.dead_lettered,
            retried: t.retried - s.retried,
            requests: t.requests - s.requests,
            queued: t.queued - s.queued,
            duration: w.started.elapsed(),
            error: None,
        }
    }

    fn answer(&self, w: Waiter) {
        let mut r = self.report_since(&w);
        r.coalesced = self.engine.stats.take_coalesced();
        r.error.clone_from(&self.last_error);
        let _ = w.reply.send(r);
    }

    /// Whether everything acknowledged up to `up_to` is written.
    fn reached(&self, up_to: u64) -> bool {
        // Sequence numbers start at 1: up to 0 is nothing.
        let ready_done =
            up_to == 0 || (self.exhausted.is_some_and(|t| t >= up_to) && self.blocked == 0);
        let none_running =
            self.running_firsts.keys().next().is_none_or(|&f| f > up_to) && self.taking.is_none();
        let none_staged = self
            .staged
            .iter()
            .chain(&self.carry)
            .all(|t| t.first > up_to);
        ready_done && none_running && none_staged
    }

    /// Answers the waiters whose flush is complete.
    fn settle(&mut self) {
        let (done, wait): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| self.reached(w.up_to));
        self.waiters = wait;
        for w in done {
            // Everything it wanted is written: an error seen on the way was
            // recovered from.
            self.last_error = None;
            self.answer(w);
        }
    }

    async fn add_waiter(&mut self, reply: oneshot::Sender<FlushReport>) {
        let up_to = match self.engine.store.last_seq().await {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(FlushReport {
                    error: Some(e.to_string()),
                    ..Default::default()
                });
                return;
            }
        };
        // An explicit flush resumes flushing after an auth failure and
        // retries at once after a transient one.
        self.paused_until = None;
        self.engine.stats.set_stopped(None);
        self.last_error = None;
        self.waiters.push(Waiter {
            up_to,
            reply,
            start: self.totals.clone(),
            started: Instant::now(),
        });
        self.raise(up_to);
    }

    /// Records the work since the last record for `status` (at most a few
    /// times a second, and when idle).
    async fn record(&mut self) {
        if self.unrecorded == FlushReport::default() {
            return;
        }
        let mut r = std::mem::take(&mut self.unrecorded);
        r.coalesced = 0;
        if let Ok(p) = self.engine.store.pending().await {
            metrics::gauge!("fga_wb_pending_ops").set(p.total as f64);
            metrics::gauge!("fga_wb_oldest_pending_seconds")
                .set(p.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
        }
        self.engine.record(&r).await;
    }

    /// Gives staged ops back to the store (shutdown).
    async fn unstage(&mut self) {
        if self.staged.is_empty() {
            return;
        }
        let back: Vec<(Taken, Outcome)> =
            self.staged.drain(..).map(|t| (t, Outcome::Retry)).collect();
        if let Err(e) = self.engine.store.finish(back, None).await {
            tracing::warn!(error = %e, "could not give staged ops back");
        }
    }
}

/// What a window take brought back.
struct Window {
    result: crate::Result<Vec<Taken>>,
    /// The end of the sequence range taken.
    cursor: u64,
    /// The target it was taken for.
    target: u64,
}

/// The oldest due ops, about `window` of them: those acknowledged in the
/// `window` sequence numbers after `cursor` (and any older ones ready
/// again), up to `target`. Taking by sequence range rather than per shard
/// keeps a caller's consecutive ops together.
async fn take_window(engine: Arc<Engine>, mut cursor: u64, target: u64, window: usize) -> Window {
    let mut out = Vec::new();
    loop {
        let bound = target.min(cursor.saturating_add(window as u64));
        match engine
            .store
            .take(window - out.len(), Take::All, bound)
            .await
        {
            Ok(ops) => out.extend(ops),
            Err(e) => {
                return Window {
                    result: Err(e),
                    cursor,
                    target,
                }
            }
        }
        cursor = cursor.max(bound);
        if out.len() * 2 >= window || bound >= target {
            return Window {
                result: Ok(out),
                cursor,
                target,
            };
        }
    }
}

/// Chunks per window sorted by key before cutting: large enough that the
/// ops of one object from many interleaved callers fill whole chunks.
const WINDOW_CHUNKS: usize = 32;
/// Windows a partial group may be held back for.
const MAX_CARRIES: u8 = 3;
/// While requests run, the triggers are looked at this often at most.
const PLAN_EVERY: Duration = Duration::from_millis(20);
/// Longest a flush() waits for ops blocked behind other writers' writes.
const BLOCKED_WAIT: Duration = Duration::from_secs(30);
/// How often a waiting flush() looks at ops blocked behind other writers.
const BLOCKED_POLL: Duration = Duration::from_millis(200);
/// How long shutdown waits past its deadline for requests already running.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(250);
/// How often the pump records its work for `status` while busy.
const RECORD_EVERY: Duration = Duration::from_millis(250);

/// The background task: plans, keeps requests in flight, answers
/// `flush()`, until `stop` turns true or a shutdown command completes.
/// Without `automatic`, only `flush()` and shutdown trigger writes.
pub(crate) async fn run(
    engine: Arc<Engine>,
    mut commands: mpsc::Receiver<Command>,
    mut stop: watch::Receiver<bool>,
    automatic: bool,
) {
    let wake = engine.wake.clone();
    let mut pump = Pump::new(engine, automatic);
    let mut shutdown_reply: Option<oneshot::Sender<(FlushReport, bool)>> = None;
    let mut shutdown_start = FlushReport::default();
    let mut shutdown_began: Option<Instant> = None;
    let mut last_record = Instant::now();
    loop {
        // Set before looking, so an op acknowledged from here on wakes us
        // (Notify keeps the permit if we are not waiting yet).
        let idle = pump.running.is_empty();
        pump.engine.sleeping.store(idle, Ordering::Release);
        let due = pump.maybe_plan().await;
        pump.engine
            .timer_armed
            .store(due.is_some(), Ordering::Release);
        pump.fill().await;
        if !pump.running.is_empty() {
            pump.engine.sleeping.store(false, Ordering::Release);
        }
        pump.settle();
        if last_record.elapsed() >= RECORD_EVERY || pump.running.is_empty() {
            pump.record().await;
            last_record = Instant::now();
        }
        if let Some(deadline) = pump.shutdown {
            let idle = pump.running.is_empty() && pump.reached(pump.target);
            let halted = pump.engine.stats.stopped().is_some();
            // Past the deadline nothing new starts; requests still running
            // get a moment to finish (their ops are then pending or applied,
            // not in flight), and are abandoned after it.
            let now = Instant::now();
            let over =
                now >= deadline && (pump.running.is_empty() || now >= deadline + SHUTDOWN_GRACE);
            if idle || halted || over {
                pump.unstage().await;
                pump.record().await;
                let mut r = pump.totals.clone();
                r.applied -= shutdown_start.applied;
                r.dead_lettered -= shutdown_start.dead_lettered;
                r.retried -= shutdown_start.retried;
                r.requests -= shutdown_start.requests;
                r.queued -= shutdown_start.queued;
                r.duration = shutdown_began.map_or(Duration::ZERO, |t| t.elapsed());
                // An error only when something is left: a failure that was
                // retried away is not the shutdown's result.
                r.error = if idle {
                    None
                } else {
                    pump.engine
                        .stats
                        .stopped()
                        .or(pump.last_error.clone())
                        .or_else(|| {
                            Some("the shutdown deadline passed with ops not yet written".into())
                        })
                };
                let cut_off = !pump.running.is_empty() || pump.taking.is_some();
                if let Some(reply) = shutdown_reply.take() {
                    let _ = reply.send((r, cut_off));
                }
                return;
            }
        }
        let shutdown_at = pump.shutdown.map(|d| {
            if Instant::now() < d {
                d
            } else {
                d + SHUTDOWN_GRACE
            }
        });
        let wake_at = match (due, shutdown_at) {
            (Some(d), Some(s)) => Some(d.min(s)),
            (d, s) => d.or(s),
        };
        tokio::select! {
            biased;
            _ = stop.changed() => {
                pump.unstage().await;
                return;
            }
            Some((result, first)) = pump.running.next(), if !pump.running.is_empty() => {
                pump.done(result, first);
            }
            w = next_window(&mut pump.taking), if pump.taking.is_some() => {
                pump.taken(w);
            }
            cmd = commands.recv() => match cmd {
                None => {
                    pump.unstage().await;
                    return;
                }
                Some(Command::Flush(reply)) => {
                    pump.replan = true;
                    pump.add_waiter(reply).await;
                }
                Some(Command::Shutdown { deadline, reply }) => {
                    pump.replan = true;
                    pump.shutdown = Some(deadline);
                    *pump
                        .engine
                        .retry_deadline
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(deadline);
                    pump.paused_until = None;
                    pump.last_error = None;
                    shutdown_start = pump.totals.clone();
                    shutdown_began = Some(Instant::now());
                    shutdown_reply = Some(reply);
                    if let Ok(s) = pump.engine.store.last_seq().await {
                        pump.raise(s);
                        pump.revoke_target = pump.revoke_target.max(s);
                    }
                }
            },
            _ = wake.notified() => pump.replan = true,
            _ = sleep_until(wake_at), if wake_at.is_some() => pump.replan = true,
        }
    }
}

/// The flusher's thread: the pump runs on a runtime of its own, so callers
/// granting flat out on the application's runtime (a memory-store grant
/// never waits) cannot starve it, and it never adds to their latency.
pub(crate) struct FlusherThread {
    done: oneshot::Receiver<()>,
}

impl FlusherThread {
    pub(crate) fn spawn(
        engine: Arc<Engine>,
        commands: mpsc::Receiver<Command>,
        stop: watch::Receiver<bool>,
        automatic: bool,
    ) -> crate::Result<FlusherThread> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::internal(format!("cannot start the flusher's runtime: {e}")))?;
        let (tx, done) = oneshot::channel();
        // Its logs and spans go where the builder's did.
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        std::thread::Builder::new()
            .name("fga-wb-flusher".into())
            .spawn(move || {
                tracing::dispatcher::with_default(&dispatch, || {
                    runtime.block_on(run(engine, commands, stop, automatic));
                });
                let _ = tx.send(());
            })
            .map_err(|e| Error::internal(format!("cannot start the flusher's thread: {e}")))?;
        Ok(FlusherThread { done })
    }

    /// Waits until the flusher has stopped (after a shutdown command or
    /// `stop`), at most `limit`.
    pub(crate) async fn join(self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.done).await;
    }
}

/// Runs a pump until one `flush()` is answered (unit tests drive an engine
/// without a handle).
#[cfg(test)]
pub(crate) async fn flush_once(engine: Arc<Engine>) -> FlushReport {
    let (tx, rx) = mpsc::channel(1);
    let (_stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run(engine, rx, stop, false));
    let (reply, answer) = oneshot::channel();
    let _ = tx.send(Command::Flush(reply)).await;
    let report = answer.await.unwrap_or_default();
    task.abort();
    report
}

async fn next_window(taking: &mut Option<BoxFuture<'static, Window>>) -> Window {
    match taking {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
