//! Counters, the last flush, and the status report built from them.
//!
//! Counters are kept here (for `status()`) and mirrored to the `metrics`
//! facade under Prometheus names, so an application that installs a metrics
//! exporter gets them with no further work:
//!
//! | metric | kind |
//! |---|---|
//! | `fga_wb_ops_acknowledged_total` | counter |
//! | `fga_wb_ops_applied_total` | counter |
//! | `fga_wb_ops_coalesced_total` | counter |
//! | `fga_wb_ops_dead_lettered_total` | counter |
//! | `fga_wb_dead_letters_evicted_total` (memory store: oldest letters dropped at `buffer.dead_letter_capacity`) | counter |
//! | `fga_wb_ops_cleared_total` | counter |
//! | `fga_wb_write_requests_total{outcome}` (each Write request sent, by how it ended: `ok`, `rejected` for its input, `failed` otherwise; they add up to `status`'s requests) | counter |
//! | `fga_wb_write_splits_total` (Writes split in halves to find the tuple OpenFGA refuses) | counter |
//! | `fga_wb_write_retries_total` | counter |
//! | `fga_wb_write_unknown_outcomes_total` (Writes whose outcome fga-wb cannot know) | counter |
//! | `fga_wb_cache_hits_total`, `fga_wb_cache_misses_total` | counter |
//! | `fga_wb_higher_consistency_total` (checks, lists and reads sent with `HIGHER_CONSISTENCY`) | counter |
//! | `fga_wb_read_waits_total` (checks, lists and reads that waited for a pending revoke, or a grant that may narrow access, to be written) | counter |
//! | `fga_wb_flush_pauses_total` (the flusher's pauses after a transient failure) | counter |
//! | `fga_wb_redis_losses_total`, `fga_wb_redis_leases_lost_total`, `fga_wb_redis_term_regressed_total`, `fga_wb_redis_under_replicated_total` (Redis store: see the README's "Monitor it") | counter |
//! | `fga_wb_pending_ops` (after every op, and at every look of the flusher; every 5 s in a worker) | gauge |
//! | `fga_wb_in_flight_ops` (ops being written, or held by queued jobs in queue mode: with no worker running, a backlog of jobs shows here, not in `fga_wb_pending_ops`; updated as `fga_wb_oldest_pending_seconds` is) | gauge |
//! | `fga_wb_oldest_pending_seconds` (at every look of the flusher; every 5 s in a worker) | gauge |
//! | `fga_wb_ops_held` (ops kept in flight while such a Write may still land: `flush.unknown_outcome_hold`) | gauge |
//! | `fga_wb_flush_duration_seconds` (the flusher's busy time, recorded at most every 250 ms while it writes; a worker's, one per job) | histogram |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::buffer::Pending;
use crate::config::{Mode, StoreKind};

/// What one flush did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
#[non_exhaustive]
pub struct FlushReport {
    /// Ops now in OpenFGA.
    pub applied: u64,
    /// Ops folded into a newer op on the same key since the previous report
    /// (they need no write of their own).
    pub coalesced: u64,
    /// Ops OpenFGA refused for good, now in the dead letters.
    pub dead_lettered: u64,
    /// Ops that failed transiently and are pending again.
    pub retried: u64,
    /// Write requests sent (bisection included).
    pub requests: u64,
    /// Queue mode: ops handed to workers as jobs.
    pub queued: u64,
    /// Wall time of the flush.
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Why the flush stopped early, if it did (ops stay pending).
    pub error: Option<String>,
}

impl FlushReport {
    pub(crate) fn absorb(&mut self, other: &FlushReport) {
        // Saturating: counts a finish call returns come from Redis, and
        // the pump's totals add them up for the process's life.
        self.applied = self.applied.saturating_add(other.applied);
        self.coalesced = self.coalesced.saturating_add(other.coalesced);
        self.dead_lettered = self.dead_lettered.saturating_add(other.dead_lettered);
        self.retried = self.retried.saturating_add(other.retried);
        self.requests = self.requests.saturating_add(other.requests);
        self.queued = self.queued.saturating_add(other.queued);
        self.duration = self.duration.saturating_add(other.duration);
        if other.error.is_some() {
            self.error.clone_from(&other.error);
        }
    }
}

/// The last flush and when it ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LastFlush {
    /// When it ended.
    #[serde(with = "unix")]
    pub at: SystemTime,
    /// What it did.
    pub report: FlushReport,
}

/// Totals since the handle was built.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct Totals {
    /// `grant`/`revoke` calls acknowledged.
    pub acknowledged: u64,
    /// Ops applied to OpenFGA.
    pub applied: u64,
    /// Ops folded into a newer op on the same key.
    pub coalesced: u64,
    /// Ops dead-lettered.
    pub dead_lettered: u64,
    /// Memory store: dead letters dropped, oldest first, to keep at most
    /// `buffer.dead_letter_capacity` (their ops count in `dead_lettered`).
    pub dead_letters_evicted: u64,
    /// Ops dropped by `clear`.
    pub cleared: u64,
    /// Write requests sent.
    pub requests: u64,
    /// Write requests that failed for a transient cause (each quick retry
    /// too; as `fga_wb_write_retries_total`): their ops were tried again.
    pub retries: u64,
    /// Checks answered from the cache or the pending overlay.
    pub cache_hits: u64,
    /// Checks that asked OpenFGA.
    pub cache_misses: u64,
    /// Checks, lists and reads sent with `HIGHER_CONSISTENCY`, because they
    /// could depend on a recent write (or `check.always_higher_consistency`).
    pub higher_consistency: u64,
    /// Checks, lists and reads that waited for a pending revoke (or a
    /// grant that may narrow access) to be written: contextual tuples
    /// cannot delete.
    pub read_waits: u64,
}

/// Everything `status()` reports.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// `memory` or `redis`.
    pub store: StoreKind,
    /// `inline` or `queue`.
    pub mode: Mode,
    /// The OpenFGA store written to.
    pub store_id: String,
    /// Pending ops.
    pub pending: Pending,
    /// Dead letters held, counted without loading them (with any the Redis
    /// store holds that cannot be read, which `dead_letters()` skips and
    /// purging removes).
    pub dead_letters: usize,
    /// Why flushing is stopped (bad credentials, unknown store, a panic),
    /// if it is: this process's, or with the Redis store any live
    /// process's or worker's.
    pub flushing_stopped: Option<String>,
    /// Redis store: why a live queue worker's flushing is stopped, if one's
    /// is (queued jobs wait for it).
    pub workers_stopped: Option<String>,
    /// The last flush.
    pub last_flush: Option<LastFlush>,
    /// Totals since start; with the Redis store, the acknowledged, applied,
    /// coalesced, dead-lettered, cleared and request counts are store-wide
    /// (every process and worker), the others this process's.
    pub totals: Totals,
    /// Queue mode: jobs by state and the workers seen.
    pub queue: Option<QueueStats>,
    /// An open record of Redis losing acknowledged ops: checks fail closed
    /// until an operator acknowledges it (`fga-wb loss --ack`).
    pub loss: Option<String>,
    /// When the last loss was acknowledged, and by whom.
    pub last_loss_acknowledged: Option<String>,
    /// Redis store: the keys and bytes the store holds, by category, when
    /// asked for (`WriteBehind::redis_key_usage`; `fga-wb status` does).
    pub redis_keys: Option<Vec<crate::buffer::KeyUsage>>,
    /// The server's tuples-per-Write limit, when this process learned one
    /// below `flush.max_tuples_per_write` (OpenFGA refused a request).
    pub write_limit: Option<usize>,
    /// Redis store: the application processes alive besides this one whose
    /// handles flush by themselves (not `fga-wb` commands, nor handles
    /// built with `automatic_flush(false)`; workers are not counted).
    pub live_apps: Option<usize>,
    /// Redis store: writers whose lease ended while they were writing (a
    /// crash): what they held stays in flight until a Write of theirs can
    /// no longer land, then goes to the others.
    pub held_over: Option<HeldOver>,
}

/// Writers whose lease ended while they were writing, and when the last of
/// them hands on what it held (`flush.unknown_outcome_hold` past its lease).
#[derive(Clone, Debug, Serialize, PartialEq)]
#[non_exhaustive]
pub struct HeldOver {
    /// How many.
    pub writers: usize,
    /// When the last of them hands on what it held.
    #[serde(serialize_with = "unix::serialize")]
    pub until: SystemTime,
}

impl Status {
    /// Overlays what every process of a shared store recorded.
    pub(crate) fn merge_shared(&mut self, shared: &std::collections::HashMap<String, String>) {
        let n = |k: &str| shared.get(k).and_then(|v| v.parse::<u64>().ok());
        let t = &mut self.totals;
        for (field, name) in [
            (&mut t.acknowledged, "acknowledged"),
            (&mut t.applied, "applied"),
            (&mut t.coalesced, "coalesced"),
            (&mut t.dead_lettered, "dead_lettered"),
            (&mut t.cleared, "cleared"),
            (&mut t.requests, "requests"),
        ] {
            if let Some(v) = n(name) {
                *field = v;
            }
        }
        if let Some(last) = shared
            .get("last_flush")
            .and_then(|j| serde_json::from_str::<LastFlush>(j).ok())
        {
            if self.last_flush.as_ref().is_none_or(|l| l.at < last.at) {
                self.last_flush = Some(last);
            }
        }
        if let Some(reason) = shared.get("stopped").filter(|r| !r.is_empty()) {
            self.flushing_stopped = Some(reason.clone());
        }
        self.workers_stopped = shared.get(crate::buffer::WORKERS_STOPPED).cloned();
        self.last_loss_acknowledged = shared.get("last_loss_acknowledged").cloned();
        self.live_apps = shared
            .get(crate::buffer::LIVE_APPS)
            .and_then(|v| v.parse().ok());
        self.held_over = shared
            .get(crate::buffer::HELD_OVER)
            .and_then(|v| v.split_once('/'))
            .and_then(|(n, until)| {
                Some(HeldOver {
                    writers: n.parse().ok()?,
                    until: stored_time(Duration::from_millis(until.parse().ok()?)),
                })
            });
    }
}

/// Live counters.
#[derive(Default)]
pub(crate) struct Stats {
    pub acknowledged: AtomicU64,
    pub applied: AtomicU64,
    pub coalesced: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub dead_letters_evicted: AtomicU64,
    pub cleared: AtomicU64,
    pub requests: AtomicU64,
    pub retries: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub higher_consistency: AtomicU64,
    pub read_waits: AtomicU64,
    /// `coalesced` at the last flush report, to report the difference.
    pub coalesced_reported: AtomicU64,
    pub last_flush: Mutex<Option<LastFlush>>,
    /// Why flushing stopped: the server refused the credentials or does
    /// not know the store.
    pub stopped: Mutex<Option<crate::error::Error>>,
}

/// Adds to a counter and its metric.
macro_rules! count {
    ($stats:expr, $field:ident, $metric:literal, $n:expr) => {{
        let n: u64 = $n;
        if n > 0 {
            $stats
                .$field
                .fetch_add(n, ::std::sync::atomic::Ordering::Relaxed);
            ::metrics::counter!($metric).increment(n);
        }
    }};
}
pub(crate) use count;

impl Stats {
    pub fn totals(&self) -> Totals {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            acknowledged: l(&self.acknowledged),
            applied: l(&self.applied),
            coalesced: l(&self.coalesced),
            dead_lettered: l(&self.dead_lettered),
            dead_letters_evicted: l(&self.dead_letters_evicted),
            cleared: l(&self.cleared),
            requests: l(&self.requests),
            retries: l(&self.retries),
            cache_hits: l(&self.cache_hits),
            cache_misses: l(&self.cache_misses),
            higher_consistency: l(&self.higher_consistency),
            read_waits: l(&self.read_waits),
        }
    }

    /// Coalesced ops since the last call.
    pub fn take_coalesced(&self) -> u64 {
        let now = self.coalesced.load(Ordering::Relaxed);
        now - self
            .coalesced_reported
            .swap(now, Ordering::Relaxed)
            .min(now)
    }

    pub fn stopped(&self) -> Option<String> {
        self.halted().map(|e| e.to_string())
    }

    /// The error that stopped flushing, if one did.
    pub fn halted(&self) -> Option<crate::error::Error> {
        self.stopped
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_stopped(&self, reason: Option<crate::error::Error>) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Ends the stop `was` (as `stopped()` gave it), unless another took
    /// its place meanwhile; returns whether it ended.
    pub fn end_stop(&self, was: &str) -> bool {
        let mut g = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let same = g.as_ref().is_some_and(|e| e.to_string() == was);
        if same {
            *g = None;
        }
        same
    }

    pub fn record_flush(&self, report: &FlushReport) {
        metrics::histogram!("fga_wb_flush_duration_seconds").record(report.duration.as_secs_f64());
        *self.last_flush.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastFlush {
            at: SystemTime::now(),
            report: report.clone(),
        });
    }

    pub fn last_flush(&self) -> Option<LastFlush> {
        self.last_flush
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

mod secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = <f64 as serde::Deserialize>::deserialize(d)?;
        Ok(Duration::try_from_secs_f64(v).unwrap_or_default())
    }
}

/// A time read from stored data, as its distance from the Unix epoch: the
/// epoch itself when it lies past what can be shown (RFC 3339 ends with the
/// year 9999) or held, so stored garbage never panics.
pub(crate) fn stored_time(since_epoch: Duration) -> SystemTime {
    /// 9999-12-31T23:59:59Z.
    const LAST: Duration = Duration::from_secs(253_402_300_799);
    if since_epoch > LAST {
        UNIX_EPOCH
    } else {
        UNIX_EPOCH + since_epoch
    }
}

mod unix {
    use serde::Serializer;
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(
            t.duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        )
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let v = <f64 as serde::Deserialize>::deserialize(d)?;
        Ok(super::stored_time(
            std::time::Duration::try_from_secs_f64(v).unwrap_or_default(),
        ))
    }
}

/// Jobs by state.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Jobs due to run now.
    pub pending: u64,
    /// Jobs a worker is running.
    pub running: u64,
    /// Jobs scheduled for later: retries waiting for their time.
    pub scheduled: u64,
    /// Workers whose lease is current. One that does not replay ops given
    /// up in an outage (`queue.replay_transient = "0s"`) is named
    /// `worker:no-replay:...`.
    pub workers: Vec<String>,
}

impl QueueStats {
    /// Whether a live worker replays ops given up in an outage, as the
    /// workers were configured (their names say), whatever the caller's
    /// configuration says.
    pub fn any_worker_replays(&self) -> bool {
        let not_replaying = |w: &String| {
            w.strip_prefix(crate::buffer::NOT_REPLAYING_WORKER)
                .is_some_and(|rest| rest.starts_with(':'))
        };
        self.workers.iter().any(|w| !not_replaying(w))
    }
}
