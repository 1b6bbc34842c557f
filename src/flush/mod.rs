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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
    /// Why the flusher stopped on a panic, if it did: the handle then
    /// fails every call that needs it with this (see `flusher_panicked`).
    pub failed: std::sync::OnceLock<Error>,
    /// The flusher's thread is done (as asked, or by a panic, `failed`
    /// noted by then).
    pub flusher_ended: watch::Sender<bool>,
    /// Tuples revoked since the pump last looked (up to `REVOKED_KEPT`): a
    /// grant of one taken and not sent yet goes back (see
    /// `Pump::hand_back_revoked`).
    revoked: std::sync::Mutex<Vec<(crate::tuple::TupleKey, u64)>>,
    /// The pump's current concurrency limit, for `status`.
    pub parallel: AtomicUsize,
    /// The pump has nothing in flight and waits: a new op may need to wake
    /// it (see [`Engine::nudge`]).
    pub sleeping: AtomicBool,
    /// The pump waits with a timer set (the interval of the oldest op).
    pub timer_armed: AtomicBool,
    /// An op arrived while the pump slept with a timer armed, and did not
    /// wake it.
    pub missed: AtomicBool,
    /// Wakes the pump.
    pub wake: Arc<Notify>,
    /// Another process finished writes (shared stores): ops that waited
    /// behind them may be ready now.
    pub others_finished: AtomicBool,
    /// Shutdown's deadline: no request is retried past it (its ops go back
    /// to pending instead, rather than stay in flight).
    pub retry_deadline: watch::Sender<Option<Instant>>,
    /// The server's tuples-per-Write limit, when it refused a request for
    /// being above it (its `--max-tuples-per-write` is lower than
    /// `flush.max_tuples_per_write`); 0 until then.
    pub tuple_limit: AtomicUsize,
    /// The end of the latest hold (see [`Engine::wait_out`]), noted when a
    /// Write's outcome is found unknown: with a shared store, a stop before
    /// it keeps this writer's lease to it, not released (a hold a stop cuts
    /// short leaves its ops in flight).
    pub holds_until: std::sync::Mutex<Option<Instant>>,
    /// Write requests sent and not answered yet: a stop with one under way
    /// cuts it off, and its outcome is unknown (see
    /// [`Engine::release_lease`]). A chunk only recording its outcomes in
    /// the store is not one.
    writes_under_way: AtomicUsize,
    /// Write requests that succeeded: a chunk that keeps failing while this
    /// moves fails for its own tuples (see `write_chunk_as`).
    writes_ok: AtomicU64,
    /// Ops whose Write alone failed lately: they go alone again, and
    /// inline on a shared store they are given up after the retry
    /// schedule (see [`lone`]).
    pub lone: lone::LoneFailures,
    /// How far the next split of ops whose split stopped may go (see
    /// [`split`]).
    split_rounds: split::SplitRounds,
}

/// One Write request under way, counted in `Engine::writes_under_way`
/// until it is answered. Dropped unanswered (its future cancelled: a stop,
/// a panic elsewhere in the flusher), its outcome is unknown: a hold from
/// then is noted before it stops counting, for the stop's release.
struct UnderWay<'a> {
    engine: &'a Engine,
    answered: bool,
}

impl<'a> UnderWay<'a> {
    fn start(engine: &'a Engine) -> UnderWay<'a> {
        engine.writes_under_way.fetch_add(1, Ordering::AcqRel);
        UnderWay {
            engine,
            answered: false,
        }
    }

    /// The request was answered (its outcome, if unknown, already noted).
    fn answered(mut self) {
        self.answered = true;
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let e = self.engine;
            e.note_hold(e.hold_end(Instant::now()));
        }
        self.engine.writes_under_way.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `fga_wb_ops_held`: ops kept in flight while a Write whose outcome is
/// unknown may still land (see [`Engine::wait_out`]).
struct HeldGauge(f64);

impl HeldGauge {
    fn add(ops: usize) -> HeldGauge {
        let n = ops as f64;
        metrics::gauge!("fga_wb_ops_held").increment(n);
        HeldGauge(n)
    }
}

impl Drop for HeldGauge {
    fn drop(&mut self) {
        metrics::gauge!("fga_wb_ops_held").decrement(self.0);
    }
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
            failed: Default::default(),
            flusher_ended: watch::Sender::new(false),
            revoked: Default::default(),
            revoke_wanted: Default::default(),
            parallel: Default::default(),
            sleeping: Default::default(),
            timer_armed: Default::default(),
            missed: Default::default(),
            wake: Arc::new(Notify::new()),
            others_finished: Default::default(),
            retry_deadline: watch::Sender::new(None),
            tuple_limit: Default::default(),
            holds_until: Default::default(),
            writes_under_way: Default::default(),
            writes_ok: Default::default(),
            lone: lone::LoneFailures::never(),
            split_rounds: Default::default(),
        }
    }

    /// For unit tests: a memory store of 1,000 ops, default settings, and
    /// a client of a server that never answers (port 9), so nothing is
    /// written unless `sink` takes the ops.
    #[cfg(test)]
    pub(crate) fn for_tests(sink: Option<Sink>) -> Engine {
        let client = Client::builder("http://127.0.0.1:9")
            .build()
            .expect("a client of a fixed local address builds");
        Engine::new(
            Arc::new(crate::buffer::memory::MemoryStore::new(1000)),
            client.clone(),
            client,
            "01STORE".into(),
            Some("01MODEL".into()),
            FlushConfig::default(),
            Arc::new(CheckCache::new(10, Duration::from_secs(1), None)),
            sink,
        )
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
    /// Do not retry until someone acts (bad credentials, unknown store,
    /// an address that is not OpenFGA's).
    Halt(Error),
}

impl Stop {
    /// The stop a request's failure `e` brings.
    pub(crate) fn of(e: Error) -> Stop {
        if e.stops_flushing() {
            Stop::Halt(e)
        } else {
            Stop::Transient(e)
        }
    }

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
    /// Successful requests, of any size.
    pub landed: usize,
    /// The server pushed back (429, 5xx, timeout): lower the limit.
    pub congested: bool,
    /// When the last request whose outcome is unknown (see
    /// [`Error::may_have_applied`]) ended.
    pub unsure_at: Option<Instant>,
    /// The ops waited out such a request (the pump's `hold`).
    pub held_out: bool,
    /// Shutdown cut that wait short and the ops stay in flight in a shared
    /// store, this writer's until its kept lease ends: their keys stay
    /// held, so no look for strays gives them back.
    pub left_in_flight: bool,
    /// What the store did with the outcomes (set by the pump's chunk
    /// future, which finishes its own ops).
    pub finished: Option<Result<Finished, Error>>,
    /// Ops given back unsent (see `Pump::give_back`): pending again, not
    /// retried.
    pub given_back: bool,
}

impl ChunkResult {
    pub(crate) fn new(capacity: usize) -> Self {
        ChunkResult {
            outcomes: Vec::with_capacity(capacity),
            requests: 0,
            queued: 0,
            stop: None,
            rtts: Vec::new(),
            landed: 0,
            congested: false,
            unsure_at: None,
            held_out: false,
            left_in_flight: false,
            finished: None,
            given_back: false,
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

/// Revokes noted for the pump at most between two of its looks.
const REVOKED_KEPT: usize = 1024;

/// A request to the flusher task.
pub(crate) enum Command {
    /// Flush everything acknowledged so far (or up to a sequence number)
    /// and report.
    Flush(oneshot::Sender<FlushReport>, Option<u64>),
    /// Flush everything until `deadline`, report (and whether writes were
    /// cut off in flight), and stop the task.
    Shutdown {
        deadline: Instant,
        reply: oneshot::Sender<(FlushReport, bool)>,
    },
    /// Stop at once, writing nothing more: staged ops go back to the
    /// store; the reply says whether a write or a take was cut off.
    Close(oneshot::Sender<bool>),
}

impl Engine {
    /// The flusher stopped on a panic (a bug): noted for `status`, and for
    /// the handle, which takes no more ops (nothing would write them) and
    /// says so instead of "shut down".
    pub(crate) fn flusher_panicked(&self) {
        self.failed.get_or_init(|| {
            let e = Error::new(Kind::FlusherStopped);
            self.stats.set_stopped(Some(e.clone()));
            e
        });
    }

    /// Notes revokes acknowledged (each tuple with its op's sequence
    /// number), for the pump (see `revoked`). Past `REVOKED_KEPT` unlooked
    /// at, a revoke is not noted: it waits behind its grant, as any op
    /// behind one in flight does.
    pub(crate) fn note_revokes(
        &self,
        tuples: impl IntoIterator<Item = (crate::tuple::TupleKey, u64)>,
    ) {
        let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
        let room = REVOKED_KEPT.saturating_sub(revoked.len());
        revoked.extend(tuples.into_iter().take(room));
    }

    /// The revokes noted since the last call.
    pub(crate) fn take_revoked(&self) -> Vec<(crate::tuple::TupleKey, u64)> {
        std::mem::take(&mut *self.revoked.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Called after an op is acknowledged, with the pending count after it:
    /// wakes a sleeping pump when the op makes something due at once (a
    /// revoke, a full batch) or when the pump has no timer set. At most one
    /// wake per pump iteration, so callers granting flat out never make the
    /// pump spin, and a busy pump is never woken (its running requests
    /// bring it back).
    pub(crate) fn nudge(&self, revoke: bool, pending: usize) {
        if !self.sleeping.load(Ordering::Acquire) {
            return;
        }
        let due = (revoke && self.cfg.eager_revokes) || pending >= self.cfg.batch_size || {
            // Due unless a timer is armed; but the timer may be the
            // previous look's (see `looked`). The op is noted first, then
            // the timer read, while `looked` writes the timer, then reads
            // the note: one of the two sees the other's write, so the op
            // is woken for here or there.
            self.missed.store(true, Ordering::SeqCst);
            std::sync::atomic::fence(Ordering::SeqCst);
            !self.timer_armed.load(Ordering::SeqCst)
        };
        if due && self.sleeping.swap(false, Ordering::AcqRel) {
            self.wake.notify_one();
        }
    }

    /// The pump is about to look at what is due (`idle`: with nothing in
    /// flight). Set before it looks, so an op acknowledged from here on
    /// wakes it (Notify keeps the permit if it is not waiting yet).
    pub(crate) fn looking(&self, idle: bool) {
        self.missed.store(false, Ordering::SeqCst);
        self.sleeping.store(idle, Ordering::Release);
    }

    /// The pump looked, and set a timer (`armed`) or none. An op that
    /// arrived while it looked was not woken for if the previous look's
    /// timer was armed; with none now, it would wait for the next op: wake
    /// the pump to look again.
    pub(crate) fn looked(&self, armed: bool) {
        self.timer_armed.store(armed, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if !armed && self.missed.swap(false, Ordering::SeqCst) {
            self.wake_now();
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
        let mut notes = vec![("stopped", self.stats.stopped().unwrap_or_default())];
        if let Some(json) = self
            .stats
            .last_flush()
            .and_then(|last| serde_json::to_string(&last).ok())
        {
            notes.push(("last_flush", json));
        }
        let _ = self.store.record_work(notes, report.requests).await;
    }

    /// Ends the stop `was` (as `stats.stopped()` gave it) unless another
    /// took its place meanwhile, and records that for `status` at once;
    /// returns whether it ended.
    pub(crate) async fn end_stop(&self, was: &str) -> bool {
        let ended = self.stats.end_stop(was);
        if ended {
            self.record_stop().await;
        }
        ended
    }

    /// Records this process's stop (or its end) for `status`, alone.
    pub(crate) async fn record_stop(&self) {
        let note = vec![("stopped", self.stats.stopped().unwrap_or_default())];
        let _ = self.store.record_work(note, 0).await;
    }

    /// Revokes pending again because the ops that owed them will never be
    /// written (`why`): acknowledged again, as a replay counts what it
    /// buffers.
    pub(crate) fn repended(&self, n: u64, why: &str) {
        count!(self.stats, acknowledged, "fga_wb_ops_acknowledged_total", n);
        tracing::warn!(count = n, "{why}");
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
        if f.repended > 0 {
            self.repended(
                f.repended,
                "ops refused for good had been pushed over revokes of their tuples that never reached OpenFGA: those revokes are pending again",
            );
        }
        if f.evicted > 0 {
            count!(
                self.stats,
                dead_letters_evicted,
                "fga_wb_dead_letters_evicted_total",
                f.evicted
            );
            tracing::warn!(
                count = f.evicted,
                "the dead letters are full (buffer.dead_letter_capacity): dropped the oldest; \
                 each was logged with the server's reason when it died"
            );
        }
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
        let ops = self.keep_held(ops, &mut result);
        if ops.is_empty() {
            return result;
        }
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
        let ops = self.keep_held(ops, &mut result);
        if ops.is_empty() {
            // Nothing sent is no Write: counted as one that landed, it
            // ended a stop on refused credentials (a job whose ops were all
            // superseded) and passed for a write landing in an outage.
            return result;
        }
        let full = self.max_tuples();
        let mut round_began = self.writes_ok.load(Ordering::Relaxed);
        // Parts that failed in a way that may lie with their tuples (see
        // below), a lone tuple's error, whether this chunk split such parts
        // yet, and the rounds of parts in which nothing landed it ran and
        // may run.
        let mut suspects: Vec<(Vec<Taken>, Error)> = Vec::new();
        let mut lone = None;
        let mut probed = false;
        let mut fruitless = 0;
        let mut allowed_rounds = None;
        let mut todo = self.alone_first(ops, retries);
        loop {
            while let Some((part, retries)) = todo.pop() {
                // Past shutdown's deadline nothing new starts, in a chunk
                // under way either (its halves, its parts): cut off in the
                // grace that follows, its outcome would be unknown, and
                // with the memory store the process would end with a Write
                // that may still land over a later process's newer op.
                // Not sent, so no attempt used (a worker's job keeps its
                // step): the kind a lease ending gives too.
                if self.stopped_at_deadline(&mut result) {
                    result
                        .outcomes
                        .extend(part.into_iter().map(|t| (t, Outcome::Retry)));
                    continue;
                }
                match self
                    .write_retrying(&part, model, retries, &mut result)
                    .await
                {
                    Ok(rtt) => {
                        result.landed += 1;
                        // The request that landed, not the retries' pauses
                        // before it: those are not the server's time.
                        if part.len() * 2 >= full {
                            result.rtts.push(rtt);
                        }
                        result
                            .outcomes
                            .extend(part.into_iter().map(|t| (t, Outcome::Applied)));
                    }
                    Err(e)
                        if part.len() > 1
                            && self.learn_limit(&e).is_some_and(|l| l < part.len()) =>
                    {
                        // Over the server's limit: the same ops in requests it
                        // takes, not a bisection hunting for a bad tuple.
                        let limit = self.max_tuples();
                        let mut rest = part;
                        while rest.len() > limit {
                            let tail = rest.split_off(limit);
                            todo.push((std::mem::replace(&mut rest, tail), retries));
                        }
                        todo.push((rest, retries));
                    }
                    Err(e) if e.is_invalid_input() && part.len() > 1 => {
                        bisect(&mut todo, part, retries);
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
                        for t in part {
                            tracing::warn!(tuple = %t.tuple, op = ?t.op, error = %e, "dead-lettered");
                            result.outcomes.push((t, dead_for(&e, "", false)));
                        }
                    }
                    Err(e) if e.may_lie_with_tuples() => suspects.push((part, e)),
                    Err(e) => {
                        pending_again(&mut result, part, &e);
                        result.stop = Some(Stop::of(e));
                    }
                }
            }
            if suspects.is_empty() {
                break;
            }
            // A Write that keeps failing with a 500 (or a proxy's code-less
            // 400) while other Writes land fails for its own tuples: split, as
            // for a refusal, so one bad tuple holds back only itself; it stays
            // pending, retried after a pause. Halves are sent once each (the
            // chunk had its quick retries), and a round of them in which no
            // Write landed anywhere ends the split: a server that starts
            // failing everything costs two more requests a chunk at first,
            // not a bisection, and counts as congested. Ops whose split ended
            // so may go a round further next time, up to four (see `split`):
            // two bad tuples, one in each half, held back all the others for
            // good.
            let landed = self.writes_ok.load(Ordering::Relaxed);
            let works = landed != round_began;
            round_began = landed;
            if !works {
                result.congested = true;
                if probed {
                    fruitless += 1;
                }
            }
            let seqs = || suspects.iter().flat_map(|(p, _)| p.iter().map(|t| t.seq));
            // Looked up once, for the ops that first failed so (the whole
            // chunk then): nothing to look up for a chunk that lands.
            let allowed = *allowed_rounds.get_or_insert_with(|| self.split_rounds.allowed(seqs()));
            if (!works && fruitless >= allowed) || result.stop.is_some() {
                if fruitless >= allowed {
                    self.split_rounds.stopped(seqs(), fruitless);
                }
                for (part, e) in suspects.drain(..) {
                    pending_again(&mut result, part, &e);
                    result.stop.get_or_insert(Stop::Transient(e));
                }
                break;
            }
            probed = true;
            let halves = QuickRetries {
                transient: 0,
                ..retries
            };
            for (part, e) in suspects.drain(..) {
                if part.len() > 1 {
                    bisect(&mut todo, part, halves);
                } else {
                    for t in part {
                        let outcome = self.lone_failure(&t, &e, landed, works);
                        // Given up: nothing to pause for.
                        if matches!(outcome, Outcome::Retry) {
                            lone.get_or_insert_with(|| e.clone());
                        }
                        result.outcomes.push((t, outcome));
                    }
                }
            }
        }
        if let Some(e) = lone {
            // Retried after the pump's pause, which successes keep short.
            result.stop.get_or_insert(Stop::Transient(e));
        }
        result
    }

    /// A chunk's parts: an op whose Write alone failed lately goes alone
    /// again, with one quick retry at most (a blip is ridden out; its
    /// pause is the pump's), and the rest together, sent first.
    fn alone_first(
        &self,
        ops: Vec<Taken>,
        retries: QuickRetries,
    ) -> Vec<(Vec<Taken>, QuickRetries)> {
        let alone = self
            .lone
            .failing_alone(ops.iter().map(|t| t.seq), Instant::now());
        if alone.is_empty() {
            return vec![(ops, retries)];
        }
        let (alone, rest): (Vec<Taken>, Vec<Taken>) =
            ops.into_iter().partition(|t| alone.contains(&t.seq));
        let once = QuickRetries {
            transient: retries.transient.min(1),
            ..retries
        };
        let mut parts: Vec<_> = alone.into_iter().map(|t| (vec![t], once)).collect();
        if !rest.is_empty() {
            parts.push((rest, retries));
        }
        parts
    }

    /// What becomes of an op whose Write alone failed (with `landed`
    /// Writes landed so far): pending again, or, inline, once it has
    /// failed so through the retry schedule, a transient dead letter.
    fn lone_failure(&self, t: &Taken, e: &Error, landed: u64, works: bool) -> Outcome {
        let Some(failing_for) = self.lone.failed(t.seq, landed, works, Instant::now()) else {
            tracing::warn!(tuple = %t.tuple, op = ?t.op, error = %e, "a write of this tuple alone failed; it stays pending");
            return Outcome::Retry;
        };
        tracing::warn!(tuple = %t.tuple, op = ?t.op, error = %e, ?failing_for, "a write of this tuple alone kept failing while others landed: dead-lettered (transient)");
        let why = format!(
            " (its Write alone failed for {failing_for:.0?} while other Writes landed: queue.retry_schedule)"
        );
        dead_for(e, &why, true)
    }

    /// Waits out a request whose outcome is unknown (see
    /// [`Error::may_have_applied`]) that ended `at`: it may still commit on
    /// the server until `flush.unknown_outcome_hold` has passed, and a newer
    /// op on one of its tuples written before then (a revoke, after a
    /// grant) would be undone by it. The caller keeps the ops in flight
    /// meanwhile: checks count them, a newer op on their tuples waits
    /// behind them, and in a shared store the keys stay this writer's,
    /// its lease kept in the store until the hold ends, so that they do not
    /// go to other writers even if this one stops or dies first.
    ///
    /// Cut short by shutdown's deadline, set before or during the wait:
    /// then it returns false. In a shared store the caller then leaves the
    /// ops in flight (the writer's lease, kept to the hold's end, noted in
    /// `holds_until` when the outcome was found unknown, hands them on
    /// then): ending them would hand them on at once.
    pub(crate) async fn wait_out(&self, at: Instant, ops: usize) -> bool {
        let until = self.hold_end(at);
        if until <= Instant::now() {
            return true;
        }
        metrics::counter!("fga_wb_write_unknown_outcomes_total").increment(1);
        tracing::warn!(
            ops,
            hold = ?self.cfg.unknown_outcome_hold,
            "a Write's outcome is unknown (it may still commit on the server); its ops stay in flight until it no longer can, so no newer op on them is written first"
        );
        // Until the hold ends, however it ends (a dropped future too).
        let _held = HeldGauge::add(ops);
        if let Err(e) = self.store.keep_lease_until(until.into_std()).await {
            // The lease still runs its usual length, renewed while this
            // handle flushes: only a stop or a crash within the hold would
            // hand the keys on early.
            tracing::warn!(error = %e, "could not keep this writer's lease to the end of the hold");
        }
        self.sleep_until_or_deadline(until).await
    }

    /// Sleeps until `until`, or until a stop's deadline (see
    /// `retry_deadline`; set before or during the sleep) if that comes
    /// first. Whether `until` came.
    async fn sleep_until_or_deadline(&self, until: Instant) -> bool {
        let mut deadline = self.retry_deadline.subscribe();
        loop {
            let end = deadline.borrow_and_update().map_or(until, |d| d.min(until));
            if end <= Instant::now() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(end) => break,
                changed = deadline.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep_until(end).await;
                        break;
                    }
                }
            }
        }
        Instant::now() >= until
    }

    /// Write requests sent and not answered yet.
    pub(crate) fn writes_under_way(&self) -> usize {
        self.writes_under_way.load(Ordering::Acquire)
    }

    /// When a Write whose outcome was found unknown at `at` can no longer
    /// land.
    fn hold_end(&self, at: Instant) -> Instant {
        at.checked_add(self.cfg.unknown_outcome_hold).unwrap_or(at)
    }

    /// A hold until `until` began: a stop before then keeps the lease.
    fn note_hold(&self, until: Instant) {
        let mut h = self.holds_until.lock().unwrap_or_else(|p| p.into_inner());
        *h = Some(h.map_or(until, |c| c.max(until)));
    }

    /// Ends this writer's lease at a stop: at once (what it holds goes to
    /// others) unless a Write request was cut off (`cut_off`: see
    /// `writes_under_way`) or a hold has not ended. A request cut off is one
    /// whose outcome is unknown, so the lease is then kept until it can no
    /// longer land (a hold from now), and a hold to its end; then left to
    /// end by itself.
    pub(crate) async fn release_lease(&self, cut_off: bool) {
        let held = *self.holds_until.lock().unwrap_or_else(|p| p.into_inner());
        // A request an application in queue mode cut off was Redis's (a
        // take, an enqueue): nothing of its can land on OpenFGA later.
        let cut_off = cut_off && self.sink.is_none();
        let now = Instant::now();
        let keep = match (cut_off, held) {
            // A hold from now: later than any hold cut short, which began
            // before now. With holds off, `now`: the lease is not
            // released, and ends by itself.
            (true, _) => Some(self.hold_end(now)),
            (false, Some(held)) if held > now => Some(held),
            // No hold, or it ended already: nothing can land any more.
            (false, _) => None,
        };
        let keep = keep.map(Instant::into_std);
        if let Err(e) = self.store.release(keep).await {
            tracing::warn!(error = %e, "could not release this writer's Redis lease; it ends by itself (a hold past it if it was writing)");
        }
    }

    /// The ops this writer still holds. Those handed to other writers while
    /// it was paused past its lease are not its to write (a newer op on the
    /// key may have been written since), nor to end: `Busy` (the store
    /// finishes any op it no longer holds as not its own, whatever the
    /// outcome).
    fn keep_held(&self, ops: Vec<Taken>, result: &mut ChunkResult) -> Vec<Taken> {
        let (held, gone): (Vec<Taken>, Vec<Taken>) =
            ops.into_iter().partition(|t| self.store.holds(t));
        result
            .outcomes
            .extend(gone.into_iter().map(|t| (t, Outcome::Busy)));
        held
    }

    /// Writes a grant over the same tuple held with another condition (or
    /// condition context): OpenFGA will not overwrite it, nor take a delete
    /// and a write of one tuple in one request, so the old tuple is deleted
    /// first and the new one written next. In between the tuple is absent
    /// (to other readers, access through a `but not` on its relation is
    /// wider then); the op stays in flight throughout, so checks through
    /// fga-wb see the new version and no newer op on the tuple is written
    /// before it.
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
        // Two more requests: neither starts past shutdown's deadline (a
        // grant cut off then could land after a later process's revoke).
        // The grant stays pending; the tuple as it is, or absent.
        if self.stopped_at_deadline(result) {
            return Outcome::Retry;
        }
        let before = result.unsure_at;
        let written = match self
            .write_retrying(std::slice::from_ref(&delete), model, retries, result)
            .await
        {
            Ok(_) => {
                // The old tuple is gone from OpenFGA whatever becomes of the
                // grant (refused for good, cut short, pending and then
                // cleared): its cached answers may still allow through it,
                // so checks on it ask for fresh ones for a while, as after
                // an applied op.
                if let Err(e) = self.store.note_landed(std::slice::from_ref(&t.tuple)).await {
                    tracing::warn!(tuple = %t.tuple, error = %e, "cannot record that the tuple's old version was deleted; checks on it may get OpenFGA's cached answers for up to its cache TTL");
                }
                // A delete that may still land would remove the grant
                // written after it.
                match result.unsure_at.filter(|_| result.unsure_at != before) {
                    // Cut short: the grant is not written (the chunk's own
                    // hold leaves it in flight, see `wait_out`).
                    Some(at) if !self.wait_out(at, 1).await => return Outcome::Retry,
                    _ if self.stopped_at_deadline(result) => return Outcome::Retry,
                    _ => {}
                }
                self.write_retrying(std::slice::from_ref(t), model, retries, result)
                    .await
            }
            Err(e) => Err(e),
        };
        match written {
            Ok(_) => {
                tracing::info!(tuple = %t.tuple, "replaced the tuple's condition (delete, then write)");
                Outcome::Applied
            }
            Err(e) if e.is_invalid_input() => {
                tracing::warn!(tuple = %t.tuple, error = %e, "dead-lettered");
                dead_for(&e, "", false)
            }
            Err(e) => {
                // Written again later: by then the old tuple may be gone,
                // and a plain write does it.
                tracing::warn!(tuple = %t.tuple, error = %e, "replacing the tuple's condition failed; the grant stays pending");
                if result.stop.is_none() {
                    result.stop = Some(Stop::of(e));
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
    ) -> Result<Duration, Error> {
        let mut backoff = quick_backoff(&self.cfg);
        // Each kind of failure has its own budget: conflicts first do not
        // leave a 503 after them without a retry.
        let (mut conflicts, mut transient) = (0u32, 0u32);
        loop {
            let under_way = UnderWay::start(self);
            let started = Instant::now();
            let e = match self.write(ops, model).await {
                Ok(()) => {
                    under_way.answered();
                    self.count_request(result, "ok");
                    self.writes_ok.fetch_add(1, Ordering::Relaxed);
                    return Ok(started.elapsed());
                }
                Err(e) => e,
            };
            // Never sent (this writer's lease, a token, a connection): no
            // request, nor a retry of one.
            let sent = !e.never_sent();
            if sent {
                let outcome = if e.is_invalid_input() {
                    "rejected"
                } else {
                    "failed"
                };
                self.count_request(result, outcome);
            }
            if e.may_have_applied() {
                // Noted at once, before it stops counting as under way: a
                // stop during the retries (before the chunk waits out its
                // hold) keeps the lease too.
                let at = Instant::now();
                result.unsure_at = Some(at);
                self.note_hold(self.hold_end(at));
            }
            under_way.answered();
            let conflict = e.status() == Some(409);
            if e.is_transient() && sent {
                // Every request that failed transiently; its ops are sent
                // again (now, or after the pause).
                count!(self.stats, retries, "fga_wb_write_retries_total", 1);
                // One bad tuple is not a busy server (see write_chunk_as),
                // nor is a request never sent.
                if !conflict && !e.may_lie_with_tuples() && e.reached_server() {
                    result.congested = true;
                }
            }
            let (tries, budget) = if conflict {
                (&mut conflicts, retries.conflicts)
            } else {
                (&mut transient, retries.transient)
            };
            if !e.is_transient() || *tries >= budget {
                return Err(e);
            }
            // Longer than a quick retry waits: the pump's pause waits
            // instead, with the ops pending again meanwhile (see
            // `park_if_idle`), not held in flight by a sleeping request.
            if e.retry_after().is_some_and(|r| r > QUICK_RETRY_MAX) {
                return Err(e);
            }
            *tries += 1;
            let wait = backoff.next().unwrap_or(self.cfg.retry_max_backoff);
            let wait = e.retry_after().map_or(wait, |r| r.max(wait));
            tracing::debug!(error = %e, retry_in = ?wait, "write failed; retrying the request unless a stop's deadline comes first");
            // Nothing starts past the deadline: the ops go back pending.
            if !self.sleep_until_or_deadline(Instant::now() + wait).await {
                return Err(e);
            }
        }
    }

    /// Counts a request sent, by how it ended: `ok`, `rejected` (OpenFGA
    /// refused its input) or `failed` (anything else: sent again, split,
    /// or left pending). The metric's outcomes add up to the requests sent.
    fn count_request(&self, result: &mut ChunkResult, outcome: &'static str) {
        result.requests += 1;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("fga_wb_write_requests_total", "outcome" => outcome).increment(1);
    }

    /// Whether the chunk stops here: it already has (its stop set), or,
    /// past shutdown's deadline, now (see `write_chunk_as`; its first
    /// request too: a chunk started before the deadline may first run
    /// after it).
    fn stopped_at_deadline(&self, result: &mut ChunkResult) -> bool {
        if result.stop.is_none() && self.past_deadline() {
            result.stop = Some(Stop::Transient(Error::new(Kind::Busy(
                "the stop's deadline passed; not starting another write".into(),
            ))));
        }
        result.stop.is_some()
    }

    /// A stop's deadline (see `retry_deadline`) has passed.
    fn past_deadline(&self) -> bool {
        self.retry_deadline
            .borrow()
            .is_some_and(|d| Instant::now() >= d)
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
        // After the budget: the renewal it comes from brought the term too.
        if !ops.iter().all(|t| self.store.holds(t)) {
            return Err(Error::new(Kind::Busy(
                "this process's Redis lease ended while it was paused, and what it was writing was handed to other writers; not writing it".into(),
            )));
        }
        self.writer.write_within(&self.store_id, &req, budget).await
    }
}

/// The outcome of an op dead-lettered for `e`: OpenFGA's own message (else
/// ours) with `more` after it, and OpenFGA's code.
fn dead_for(e: &Error, more: &str, transient: bool) -> Outcome {
    let message = e
        .server_message()
        .map_or_else(|| e.to_string(), str::to_owned);
    Outcome::Dead {
        reason: format!("{message}{more}"),
        code: e.code().map(str::to_owned),
        transient,
    }
}

/// Splits `part` in halves onto `todo`, the left one to be written first.
fn bisect(todo: &mut Vec<(Vec<Taken>, QuickRetries)>, mut part: Vec<Taken>, retries: QuickRetries) {
    metrics::counter!("fga_wb_write_splits_total").increment(1);
    let right = part.split_off(part.len() / 2);
    todo.push((right, retries));
    todo.push((part, retries));
}

/// A part whose Write failed, not for its input: its ops are pending again.
fn pending_again(result: &mut ChunkResult, part: Vec<Taken>, e: &Error) {
    tracing::warn!(error = %e, tuples = part.len(), "write failed; ops stay pending");
    result
        .outcomes
        .extend(part.into_iter().map(|t| (t, Outcome::Retry)));
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

/// The longest wait before a quick retry of one request.
const QUICK_RETRY_MAX: Duration = Duration::from_secs(2);

fn quick_backoff(cfg: &FlushConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(cfg.retry_initial_backoff.min(Duration::from_millis(50)))
        .with_max_delay(cfg.retry_max_backoff.min(QUICK_RETRY_MAX))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

mod limit;
mod lone;
mod pump;
mod split;
mod task;

use limit::*;
pub(crate) use lone::LoneFailures;
use pump::*;
#[cfg(feature = "redis")]
pub(crate) use pump::{add_one, publish_pending, remove_one, STRAY_EVERY};
pub(crate) use task::*;
