//! The flusher: takes pending ops in chunks, writes them to OpenFGA with
//! bounded parallelism, bisects permanent failures down to the bad tuples,
//! and retries transient ones with backoff.
//!
//! One background task owns the decision of *when* to flush: when the batch
//! is full, when the oldest op reaches `flush.interval`, at once when revokes
//! are pending, and when asked through `flush()`. Flushes never overlap, so
//! the store's in-flight set is only ever touched by one flush at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::Instrument;

use crate::buffer::{Claim, Finished, Outcome, Store, Take, Taken};
use crate::cache::CheckCache;
use crate::config::FlushConfig;
use crate::error::{Error, Kind};
use crate::openfga::{Client, WriteRequest};
use crate::queue::Sink;
use crate::status::{count, FlushReport, Stats};
use crate::tuple::Op;

/// Everything a flush needs. Shared by the handle and the flusher task.
pub(crate) struct Engine {
    pub store: Arc<dyn Store>,
    pub client: Client,
    pub store_id: String,
    pub model_id: Option<String>,
    pub cfg: FlushConfig,
    pub cache: Arc<CheckCache>,
    pub stats: Arc<Stats>,
    /// Bumped after every batch of outcomes: checks waiting for a revoke
    /// and callers waiting for room watch it.
    pub changed: watch::Sender<u64>,
    /// Queue mode: where jobs go. `None`: write inline.
    pub sink: Option<Sink>,
    /// How long ops pushed as a job stay owned by it (queue mode).
    pub job_lease: Duration,
    /// Set by a check waiting for a pending revoke: flush revokes now, even
    /// with `eager_revokes` off.
    pub revoke_wanted: AtomicBool,
    /// Set by a caller blocked on a full buffer: flush now, whatever the
    /// batch size and interval say.
    pub room_wanted: AtomicBool,
}

/// Why a chunk stopped before all its ops were tried.
pub(crate) enum Stop {
    /// Retry later (5xx, timeout, connection, 429).
    Transient(Error),
    /// Do not retry until someone acts (bad credentials, unknown store).
    Halt(Error),
}

/// The outcome of one chunk, bisection included.
pub(crate) struct ChunkResult {
    pub outcomes: Vec<(Taken, Outcome)>,
    pub requests: u64,
    /// Ops handed to the job queue.
    pub queued: u64,
    pub stop: Option<Stop>,
}

/// A request to the flusher task.
pub(crate) enum Command {
    /// Flush everything acknowledged so far and report.
    Flush(oneshot::Sender<FlushReport>),
}

impl Engine {
    /// Writes every ready op acknowledged up to now (`what` says which
    /// kinds), until done or stopped by an error.
    pub async fn drain(&self, what: Take) -> FlushReport {
        self.drain_with_hint(what).await.0
    }

    /// [`Engine::drain`], plus how long OpenFGA asked us to wait
    /// (`Retry-After`) if it stopped the flush.
    async fn drain_with_hint(&self, what: Take) -> (FlushReport, Option<Duration>) {
        self.room_wanted.store(false, Ordering::Relaxed);
        self.revoke_wanted.store(false, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let span = tracing::info_span!(
            "fga_wb.flush",
            applied = tracing::field::Empty,
            dead_lettered = tracing::field::Empty,
            requests = tracing::field::Empty
        );
        let mut report = FlushReport::default();
        let mut retry_after = None;
        async {
            let up_to = match self.store.last_seq().await {
                Ok(s) => s,
                Err(e) => {
                    report.error = Some(e.to_string());
                    return;
                }
            };
            let chunk_size = self.cfg.max_tuples_per_write;
            let mut running = FuturesUnordered::new();
            let mut exhausted = false;
            let mut stop: Option<Stop> = None;
            loop {
                while !exhausted && stop.is_none() && running.len() < self.cfg.max_parallel_requests
                {
                    match self.store.take(chunk_size, what, up_to).await {
                        Ok(chunk) if chunk.is_empty() => exhausted = true,
                        Ok(chunk) => running.push(self.send_chunk(chunk)),
                        Err(e) => stop = Some(Stop::Transient(e)),
                    }
                }
                let Some(result) = running.next().await else {
                    break;
                };
                report.requests += result.requests;
                report.queued += result.queued;
                for (t, o) in &result.outcomes {
                    if matches!(o, Outcome::Dead { .. }) {
                        // Its grant may have been in cached answers as a
                        // contextual tuple; OpenFGA will never have it.
                        self.cache.invalidate_for(&t.tuple);
                    }
                }
                if stop.is_none() {
                    stop = result.stop;
                }
                match self.store.finish(result.outcomes).await {
                    Ok(f) => self.account(&f, &mut report),
                    Err(e) => {
                        tracing::error!(error = %e, "could not record flush outcomes");
                        stop.get_or_insert(Stop::Transient(e));
                    }
                }
                // A finished chunk may have unblocked keys that were in flight.
                exhausted = false;
            }
            match stop {
                Some(Stop::Transient(e)) => {
                    retry_after = e.retry_after();
                    report.error = Some(e.to_string());
                }
                Some(Stop::Halt(e)) => {
                    tracing::error!(error = %e, "flushing stopped; pending ops are kept");
                    self.stats.set_stopped(Some(e.to_string()));
                    report.error = Some(e.to_string());
                }
                None if report.requests > 0 || report.queued > 0 => self.stats.set_stopped(None),
                None => {}
            }
        }
        .instrument(span.clone())
        .await;
        report.duration = started.elapsed();
        report.coalesced = self.stats.take_coalesced();
        span.record("applied", report.applied);
        span.record("dead_lettered", report.dead_lettered);
        span.record("requests", report.requests);
        count!(
            self.stats,
            requests,
            "fga_wb_write_requests_total",
            report.requests
        );
        if let Ok(p) = self.store.pending().await {
            metrics::gauge!("fga_wb_pending_ops").set(p.total as f64);
        }
        if report.requests > 0 || report.queued > 0 || report.error.is_some() {
            self.record(&report).await;
        }
        (report, retry_after)
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

    fn account(&self, f: &Finished, report: &mut FlushReport) {
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

    /// Writes one chunk, or in queue mode enqueues it as one job.
    async fn send_chunk(&self, ops: Vec<Taken>) -> ChunkResult {
        let Some(sink) = &self.sink else {
            return self.write_chunk(ops).await;
        };
        let job = crate::queue::job_for(&self.store_id, self.model_id.as_deref(), &ops);
        match sink.push(job, None).await {
            // The job owns the ops now, through all its retries; the worker
            // finishes them.
            Ok(()) => ChunkResult {
                queued: ops.len() as u64,
                outcomes: ops
                    .into_iter()
                    .map(|t| (t, Outcome::Keep(self.job_lease)))
                    .collect(),
                requests: 0,
                stop: None,
            },
            Err(e) => ChunkResult {
                outcomes: ops.into_iter().map(|t| (t, Outcome::Retry)).collect(),
                requests: 0,
                queued: 0,
                stop: Some(Stop::Transient(e)),
            },
        }
    }

    /// Writes one chunk; on a permanent input error, splits it in halves
    /// until the bad ops are alone, so the good ones are applied.
    pub(crate) async fn write_chunk(&self, ops: Vec<Taken>) -> ChunkResult {
        let mut result = ChunkResult {
            outcomes: Vec::with_capacity(ops.len()),
            requests: 0,
            queued: 0,
            stop: None,
        };
        let ops = match self.claim(ops, &mut result).await {
            Some(ops) => ops,
            None => return result,
        };
        let mut todo = vec![ops];
        while let Some(part) = todo.pop() {
            if result.stop.is_some() {
                result
                    .outcomes
                    .extend(part.into_iter().map(|t| (t, Outcome::Retry)));
                continue;
            }
            result.requests += 1;
            match self.write(&part).await {
                Ok(()) => {
                    metrics::counter!("fga_wb_write_requests_total", "outcome" => "ok")
                        .increment(1);
                    result
                        .outcomes
                        .extend(part.into_iter().map(|t| (t, Outcome::Applied)));
                }
                Err(e) if e.is_invalid_input() && part.len() > 1 => {
                    metrics::counter!("fga_wb_write_requests_total", "outcome" => "bisected")
                        .increment(1);
                    let mut left = part;
                    let right = left.split_off(left.len() / 2);
                    todo.push(right);
                    todo.push(left);
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
                        result.outcomes.push((t, Outcome::Dead { reason, code }));
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

    /// Keeps the ops this writer may write now; finishes stale ones without
    /// writing; puts busy ones back (another process is writing their key)
    /// and stops the flush so it retries after a pause.
    async fn claim(&self, ops: Vec<Taken>, result: &mut ChunkResult) -> Option<Vec<Taken>> {
        let claims = match self.store.claim(&ops).await {
            Ok(c) if c.len() == ops.len() => c,
            Ok(_) | Err(_) => {
                result
                    .outcomes
                    .extend(ops.into_iter().map(|t| (t, Outcome::Retry)));
                result.stop = Some(Stop::Transient(Error::new(Kind::Busy(
                    "could not claim tuples for writing".into(),
                ))));
                return None;
            }
        };
        let mut mine = Vec::with_capacity(ops.len());
        for (t, c) in ops.into_iter().zip(claims) {
            match c {
                Claim::Claimed => mine.push(t),
                // Finishing a superseded op drops it (it counts as coalesced).
                Claim::Stale => result.outcomes.push((t, Outcome::Stale)),
                Claim::Busy => {
                    result.outcomes.push((t, Outcome::Busy));
                    result
                        .stop
                        .get_or_insert(Stop::Transient(Error::new(Kind::Busy(
                            "another process is writing the same tuple".into(),
                        ))));
                }
            }
        }
        Some(mine)
    }

    async fn write(&self, ops: &[Taken]) -> Result<(), Error> {
        let mut writes = Vec::new();
        let mut deletes = Vec::new();
        for t in ops {
            match t.op {
                Op::Grant => writes.push(t.tuple.clone()),
                Op::Revoke => deletes.push(t.tuple.clone()),
            }
        }
        let mut req = WriteRequest::idempotent(writes, deletes);
        req.authorization_model_id.clone_from(&self.model_id);
        self.client.write(&self.store_id, &req).await
    }
}

fn backoff_builder(cfg: &FlushConfig) -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(cfg.retry_initial_backoff)
        .with_max_delay(cfg.retry_max_backoff)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Retry pacing between background flushes.
struct Pacing {
    cfg: FlushConfig,
    backoff: ExponentialBackoff,
    /// After a failed flush: not before this.
    retry_at: Option<Instant>,
    /// After a flush that found nothing it could take: don't spin on ops
    /// that someone else holds.
    idle_until: Option<Instant>,
}

impl Pacing {
    fn new(cfg: &FlushConfig) -> Self {
        Pacing {
            cfg: cfg.clone(),
            backoff: backoff_builder(cfg),
            retry_at: None,
            idle_until: None,
        }
    }

    async fn after(
        &mut self,
        engine: &Engine,
        report: &FlushReport,
        retry_after: Option<Duration>,
    ) {
        let now = Instant::now();
        if report.error.is_some() {
            count!(engine.stats, retries, "fga_wb_flush_retries_total", 1);
            let wait = self.backoff.next().unwrap_or(self.cfg.retry_max_backoff);
            // Never sooner than the server asked.
            self.retry_at = Some(now + retry_after.map_or(wait, |r| r.max(wait)));
        } else {
            self.backoff = backoff_builder(&self.cfg);
            self.retry_at = None;
        }
        // A flush that could take nothing although ops are pending (another
        // process holds them) pauses the size and revoke triggers for one
        // interval instead of spinning. Nothing pending: no pause, so the
        // next revoke goes out at once.
        let idle = report.requests == 0 && report.queued == 0 && report.error.is_none();
        let left = match engine.store.pending().await {
            Ok(p) => p.total,
            Err(_) => 0,
        };
        self.idle_until =
            (idle && left > 0).then(|| now + self.cfg.interval.max(Duration::from_millis(10)));
    }
}

/// The background task: waits for a trigger, flushes, repeats, until `stop`
/// turns true. Without `automatic`, only `flush()` triggers.
pub(crate) async fn run(
    engine: Arc<Engine>,
    mut commands: mpsc::Receiver<Command>,
    wake: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
    automatic: bool,
) {
    let mut pacing = Pacing::new(&engine.cfg);
    loop {
        let due = if automatic {
            next_due(&engine, &pacing).await
        } else {
            None
        };
        let (what, reply) = tokio::select! {
            biased;
            _ = stop.changed() => return,
            cmd = commands.recv() => match cmd {
                None => return,
                Some(Command::Flush(reply)) => (Take::All, Some(reply)),
            },
            _ = wake.notified() => continue,
            _ = sleep_until(due.map(|d| d.0)), if due.is_some() => {
                (due.map_or(Take::All, |d| d.1), None)
            }
        };
        let (report, hint) = engine.drain_with_hint(what).await;
        pacing.after(&engine, &report, hint).await;
        if let Some(reply) = reply {
            let _ = reply.send(report);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When the flusher should act next, and on what.
async fn next_due(engine: &Engine, pacing: &Pacing) -> Option<(Instant, Take)> {
    let cfg = &engine.cfg;
    let (retry_at, idle_until) = (pacing.retry_at, pacing.idle_until);
    if engine.stats.stopped().is_some() {
        // Only an explicit flush() tries again after an auth failure.
        return None;
    }
    if let Some(at) = retry_at {
        return Some((at, Take::All));
    }
    let pending = engine.store.pending().await.ok()?;
    if pending.total == 0 {
        // Ops held by jobs or by other processes come back here if their
        // holder dies (leases); look again now and then.
        return (pending.in_flight > 0 && engine.store.shared()).then(|| {
            (
                Instant::now() + cfg.interval.max(Duration::from_secs(1)),
                Take::All,
            )
        });
    }
    let now = Instant::now();
    let floor = |at: Instant| idle_until.map_or(at, |i| at.max(i));
    if pending.total >= cfg.batch_size || engine.room_wanted.load(Ordering::Relaxed) {
        return Some((floor(now), Take::All));
    }
    let age = pending.oldest_age.unwrap_or_default();
    let interval_due = now + cfg.interval.saturating_sub(age);
    if pending.deletes > 0 && (cfg.eager_revokes || engine.revoke_wanted.load(Ordering::Relaxed)) {
        return Some((floor(now), Take::Revokes));
    }
    Some((floor(interval_due), Take::All))
}
