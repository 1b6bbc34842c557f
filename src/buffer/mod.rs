//! Pending ops: coalescing, sequence numbers, the in-flight set, dead letters.
//!
//! Every store keeps, per tuple key (`object#relation@user`), at most one
//! pending op and at most one in-flight op:
//!
//! * a new op on a key replaces its pending op (last write wins) and takes a
//!   new sequence number; the replaced op counts as coalesced;
//! * a key whose op is in flight is not taken again until that op finishes,
//!   so no two in-flight requests carry the same key, and a newer op is
//!   always written after an older one;
//! * when an in-flight op finishes, it is dropped if a newer op arrived in the
//!   meantime (the newer one is what counts), whatever the outcome.
//!
//! Ops are grouped by `type#relation` so that a check can ask cheaply how
//! many grants and revokes are pending on the relations it depends on.

pub(crate) mod memory;
#[cfg(feature = "redis")]
pub(crate) mod redis;
#[cfg(not(feature = "redis"))]
pub(crate) mod redis {
    //! Built without the `redis` feature: there is no Redis store, and this
    //! type has no values, so the handle's Redis paths compile to nothing.
    use super::KeyUsage;
    use crate::error::Result;

    pub(crate) enum RedisStore {}

    /// Jobs by state, as the Redis store counts them.
    pub(crate) struct QueueCounts {
        pub due: u64,
        pub running: u64,
        pub scheduled: u64,
        pub workers: Vec<String>,
    }

    impl RedisStore {
        pub async fn usage(&self) -> Result<Vec<KeyUsage>> {
            match *self {}
        }

        pub async fn persistence_warning(&self) -> Option<String> {
            match *self {}
        }

        pub async fn sweep_legacy(&self) -> Result<u64> {
            match *self {}
        }

        pub async fn enqueue(
            &self,
            _store_id: &str,
            _model_id: Option<&str>,
            _ops: &[super::Taken],
        ) -> Result<Option<u64>> {
            match *self {}
        }

        pub async fn queue_counts(&self) -> Result<QueueCounts> {
            match *self {}
        }

        pub async fn left_letters(&self) -> Result<u64> {
            match *self {}
        }
    }
}
pub(crate) mod written;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use serde::Serialize;

use crate::error::Result;
use crate::model::{Dep, RelName};
use crate::tuple::{Condition, Op, TupleKey};

/// An op taken for writing, with what is needed to finish it.
#[derive(Clone, Debug)]
pub(crate) struct Taken {
    pub tuple: TupleKey,
    pub op: Op,
    pub seq: u64,
    /// The seq of the op that made the key pending (coalescing keeps it):
    /// a flush of everything acknowledged up to `n` is done once no op with
    /// `first <= n` is ready or being written.
    pub first: u64,
    /// Write attempts made before this one (queue mode; the memory store
    /// counts its own).
    pub attempts: u32,
    /// The writer's term when it took the op (shared stores; see
    /// [`Store::holds`]).
    pub term: u64,
}

/// How a write attempt ended for one op.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// OpenFGA has it.
    Applied,
    /// OpenFGA refused it for good, or (`transient`) a queue worker gave
    /// up after its retry schedule: dead-letter it (unless superseded).
    Dead {
        reason: String,
        code: Option<String>,
        transient: bool,
    },
    /// Not applied; try again later (unless superseded).
    Retry,
    /// Not written: a newer op on the key replaced it.
    Stale,
    /// Not written: another writer holds the key; try again shortly.
    Busy,
    /// Not applied; its queued job keeps it and retries it later.
    Keep,
}

/// How a queue worker ends a job, with the outcomes of its ops.
#[derive(Clone, Debug)]
pub(crate) enum JobEnd {
    /// Nothing is left to do: remove the job. `term`: the worker's term when
    /// it fetched the job (a finish from a later term must not end a run
    /// of the job that term fetched).
    Done { id: String, term: u64 },
    /// The ops finished with [`Outcome::Keep`] run again at `due_ms`, in the
    /// job as `json` now says.
    Retry {
        id: String,
        term: u64,
        due_ms: u64,
        json: String,
    },
}

/// Whether an op may be written now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Yes: it is the key's newest op, and this writer holds the key.
    Claimed,
    /// No: a newer op on the key replaced it; finish it without writing.
    Stale,
    /// Not now: another writer is writing an older op of the key.
    Busy,
}

/// What another process did to the shared store.
#[derive(Clone, Debug)]
pub(crate) enum StoreEvent {
    /// Ops finished (applied, dead-lettered, or requeued).
    Finished,
    /// Jobs were queued (queue mode): workers may fetch.
    Jobs,
    /// Anything may have changed (e.g. a clear).
    All,
}

/// What `push` did.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pushed {
    /// Whether a pending op on the same key was replaced.
    pub coalesced: bool,
    /// Pending ops after the push, in flight excluded.
    pub pending: usize,
    /// The op's sequence number.
    pub seq: u64,
}

/// What `finish` did with a batch of outcomes.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Finished {
    pub applied: u64,
    pub dead: u64,
    pub requeued: u64,
    /// Dropped because a newer op on the same key arrived while in flight.
    pub superseded: u64,
    /// Revokes pending again because a newer grant on their tuple, pushed
    /// over them before they reached OpenFGA, was refused for good (and,
    /// in the Redis store, revokes that died of transient causes, owed
    /// again so). Acknowledged again, as a replay is.
    pub repended: u64,
    /// The oldest dead letters dropped to keep the memory store's set
    /// within `buffer.dead_letter_capacity`.
    pub evicted: u64,
}

/// Pending ops relevant to a check.
#[derive(Debug, Default)]
pub(crate) struct Relevant {
    /// Revokes pending or in flight on the relations asked about.
    pub revokes: usize,
    /// Grants pending or in flight on those relations, if at most `limit`.
    pub grants: Option<Vec<TupleKey>>,
    /// Of those grants, ones whose stored condition cannot be read (see
    /// [`condition_of`]), left out of `grants`: a check waits until the
    /// flush has dead-lettered them.
    pub unreadable: usize,
    /// How long ago the newest write the check can depend on was applied
    /// (see `written.rs`), if within `written::KEEP`.
    pub written_ago: Option<Duration>,
    /// Ops on those relations dead-lettered after transient failures
    /// (queue mode), current, that leave the check in doubt: a revoke
    /// (OpenFGA may still hold what it revokes), a grant with a condition
    /// or one that can take the access away (OpenFGA may lack it). No
    /// flush writes them until they are replayed.
    pub dead_in_doubt: usize,
}

/// Which ops `take` may return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Revokes only: the eager revoke flush.
    Revokes,
    /// Revokes first, then grants.
    All,
}

/// Counts of pending ops.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pending {
    /// Pending grants (tuples to write), in flight excluded.
    pub writes: usize,
    /// Pending revokes (tuples to delete), in flight excluded.
    pub deletes: usize,
    /// `writes + deletes`.
    pub total: usize,
    /// Ops being written right now.
    pub in_flight: usize,
    /// Age of the oldest pending op.
    #[serde(with = "opt_secs")]
    pub oldest_age: Option<Duration>,
}

/// What is not done yet of the ops acknowledged up to a sequence number
/// (see [`WriteBehind::unfinished`](crate::WriteBehind::unfinished)).
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unfinished {
    /// Ops still pending, being written or held by jobs. Zero only when
    /// none is; else exact for pending ops, and at least 1 where only ops
    /// in flight or queued are left (the Redis store's look ends at the
    /// first it finds), or while the Redis store indexes dead letters an
    /// older version wrote (2,000 a look).
    pub ops: u64,
    /// Ops that died of transient causes (OpenFGA unreachable, a queue
    /// job's retries spent) whose letters are still their tuples' latest:
    /// not written, and a replay may still write them. Counted once no op
    /// is left (0 until then); the Redis store may count some whose tuple
    /// has a newer op pending.
    pub transient_letters: u64,
    /// Of those, the letters queue workers left for an operator: each
    /// tuple died again after their replays `queue.replay_limit` times
    /// within an hour while other writes landed. No replay of the
    /// workers' writes them within that hour; an operator's does.
    pub left_letters: u64,
}

impl Unfinished {
    /// Nothing of them is left: each op was applied, dead-lettered for
    /// good (OpenFGA refused it), cleared, or superseded by a newer op on
    /// its tuple.
    pub fn is_done(&self) -> bool {
        self.ops == 0 && self.transient_letters == 0
    }
}

/// The entry of [`Store::shared_stats`] that counts the live application
/// processes other than the caller.
pub(crate) const LIVE_APPS: &str = "live_apps";
/// How long pending ops may wait in a shared store before nobody is taken
/// to flush them: `status --check` reports them then, and queue workers
/// take them whatever runs. Ten flush intervals, or two writer leases (a
/// crashed process's ops come back after one), whichever is longer.
pub(crate) fn unflushed_after(interval: Duration, lease: Duration) -> Duration {
    interval.saturating_mul(10).max(lease.saturating_mul(2))
}

/// The entry of [`Store::shared_stats`] that says why a live worker's
/// flushing is stopped (see `Status::workers_stopped`).
pub(crate) const WORKERS_STOPPED: &str = "workers_stopped";
/// The kind, in a queue worker's writer name, of one that does not replay
/// ops given up in an outage (`queue.replay_transient = "0s"`): its name
/// says so for as long as it lives, and `status --check` and `flush --wait`
/// judge by the workers' setting, not by their own.
pub(crate) const NOT_REPLAYING_WORKER: &str = "worker:no-replay";
/// The shared stat "writers held over/until (ms)" (see `Status::held_over`).
pub(crate) const HELD_OVER: &str = "held_over";

/// An op OpenFGA refused for good, kept with the server's reason.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Identifies the dead letter for replay and purge.
    pub id: u64,
    /// The tuple.
    pub tuple: TupleKey,
    /// Grant or revoke.
    pub op: Op,
    /// The op's sequence number; for a grant whose death left a revoke it
    /// owed pending again, one after that revoke's (so that revoke's
    /// write does not supersede the letter).
    pub seq: u64,
    /// The op's place in line: its own `seq`, or the older op's it was
    /// folded into or (replayed) put back in place of. A flush of what was
    /// acknowledged up to `n` ([`flush_up_to`](crate::WriteBehind::flush_up_to),
    /// `fga-wb flush --wait`) covered it when `first <= n`.
    pub first: u64,
    /// OpenFGA's message (or why fga-wb gave up).
    pub reason: String,
    /// OpenFGA's error code, if any.
    pub code: Option<String>,
    /// Write attempts made.
    pub attempts: u32,
    /// When it was dead-lettered.
    #[serde(with = "unix_secs")]
    pub dead_at: SystemTime,
    /// It died of a transient cause (OpenFGA unreachable or failing through
    /// a queue job's whole retry schedule, or, inline on the Redis store,
    /// its Write alone failing through as long while others landed), not
    /// because OpenFGA refused it: sent again unchanged, it may well be
    /// applied.
    pub transient: bool,
    /// A newer op on the same tuple was acknowledged since: replaying this
    /// letter would undo it, so a replay drops it instead.
    pub superseded: bool,
    /// The memory store's place in line of the op (its `first`) and when
    /// it became pending: a replay puts it back there (see
    /// `Store::unfinished`). The Redis store keeps these in the letter.
    #[serde(skip)]
    pub(crate) place: Option<(u64, u32)>,
}

impl DeadLetter {
    /// Its op was given up in an outage and is still its tuple's newest:
    /// an acknowledged op OpenFGA may not have, which a replay may still
    /// write (the checks a revoke's, or a grant's that takes access away,
    /// could change fail closed meanwhile).
    pub fn given_up_in_an_outage(&self) -> bool {
        self.transient && !self.superseded
    }
}

/// What a replay of dead letters did.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[non_exhaustive]
pub struct Replayed {
    /// Letters buffered again as new ops (flushed, or queued, by the replay).
    pub replayed: usize,
    /// Letters dropped because a newer op on their tuple was acknowledged
    /// after they died: that op is what the application wants now.
    pub superseded: usize,
    /// Letters kept because the buffer had no room for them.
    #[serde(skip)]
    pub kept: usize,
    /// Letters left as they are because an op on their tuple must be
    /// written first: a revoke given up in an outage, owed behind a newer
    /// op (written if that op is refused for good), or a grant behind the
    /// revoke it owed (replayable once that is written).
    pub waiting: usize,
    /// Letters a worker left as they are: their tuples died again after
    /// its replays `queue.replay_limit` times within an hour while other
    /// writes landed. For an operator's `fga-wb dlq replay` once their
    /// cause is fixed.
    pub left: usize,
    /// Replayed ops dead-lettered again by the time the flush after the
    /// replay returned: OpenFGA refused them again (their cause is not
    /// fixed). Always 0 in queue mode, where that flush only queues them
    /// for the workers. Counted from the letters: not one another
    /// process's flusher was still writing then (a shared store's flush
    /// does not wait for those), nor one the memory store evicted in the
    /// same flush (at `buffer.dead_letter_capacity`).
    pub dead_lettered: u64,
    /// The tuples replayed, for cached answers to drop.
    #[serde(skip)]
    pub tuples: Vec<TupleKey>,
    /// Why the flush after the replay failed or could not write them
    /// (refused credentials, an unknown store, OpenFGA unreachable), if it
    /// did: the replayed ops are pending like any
    /// acknowledged op, and written once flushing works again.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flush_error: Option<String>,
}

/// What a purge of dead letters did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Purged {
    /// Letters removed, unreadable ones included.
    pub(crate) removed: usize,
    /// Revokes that purged grants owed (a grant given up over a revoke
    /// that never reached OpenFGA), pending again: purging the grant must
    /// not leave OpenFGA holding what the application revoked before it.
    pub(crate) repended: usize,
}

/// Keys and bytes one category of a store's Redis keys takes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct KeyUsage {
    /// `pending` (ops and their indexes), `dead` (dead letters), `queue`
    /// (jobs), `meta` (counters, epochs, write marks) or `legacy` (job keys
    /// older versions left: `fga-wb sweep` removes them).
    pub category: String,
    /// Keys in the category.
    pub keys: u64,
    /// What Redis's MEMORY USAGE reports, summed.
    pub bytes: u64,
}

/// A pending-op store: the memory store, or the Redis store shared by
/// processes. Futures are boxed so the handle can hold `Arc<dyn Store>`.
pub(crate) trait Store: Send + Sync + 'static {
    /// Records an op; fails with `BufferFull` when a new key would exceed
    /// the capacity.
    fn push<'a>(&'a self, tuple: &'a TupleKey, op: Op) -> BoxFuture<'a, Result<Pushed>>;
    /// `push` without a future, where it needs no I/O (`None`: call
    /// `push`): a grant on the memory store then allocates no boxed future.
    fn push_at_once(&self, _tuple: &TupleKey, _op: Op) -> Option<Result<Pushed>> {
        None
    }
    /// Shutdown begins: later pushes are refused before they change
    /// anything, and every push under way has ended when this returns, so
    /// what the shutdown drains (up to the last sequence number, read after
    /// this) holds every op acknowledged. The memory store's ops end with
    /// the process; a shared store's outlive it, acknowledged or not, and
    /// it stays open.
    fn close(&self) {}
    /// Takes up to `max` ready ops with `seq <= up_to`, marking them in flight.
    fn take(&self, max: usize, what: Take, up_to: u64) -> BoxFuture<'_, Result<Vec<Taken>>>;
    /// Ends in-flight ops with their outcomes, and with `job`, the job. A
    /// shared store repeats a call that fails for a transient cause, once
    /// only in effect (see `redis::finish`), until `stop_retrying_at`.
    fn finish<'a>(
        &'a self,
        done: Vec<(Taken, Outcome)>,
        job: Option<&'a JobEnd>,
    ) -> BoxFuture<'a, Result<Finished>>;
    /// Pending work that can change a check of `user` on `object`: on the
    /// relations `rels` (`None`: every relation); for a same-object
    /// dependency only on `object` itself, and for a user-bound one only
    /// ops whose user can be `user` (see [`counts_for`]).
    fn relevant<'a>(
        &'a self,
        rels: Option<&'a [Dep]>,
        object: &'a str,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Relevant>>;
    /// The relations of `object_type` with ops pending or in flight, or
    /// with revokes (or grants with a condition) that died of transient
    /// causes, which checks still count; model or not: a read with no
    /// relation asked for counts them all.
    fn relations_buffered<'a>(&'a self, object_type: &'a str)
        -> BoxFuture<'a, Result<Vec<String>>>;
    /// The newest op on one key, pending or in flight, and whether it has a
    /// condition.
    fn latest<'a>(&'a self, tuple: &'a TupleKey) -> BoxFuture<'a, Result<Option<(Op, bool)>>>;
    /// Whether a revoke of one key is still to reach OpenFGA: the newest op
    /// is a revoke, or a grant that owes one (it was pushed over one not
    /// known to have reached OpenFGA: refused for good, it leaves that
    /// revoke pending again), or (Redis) a letter leaves one owed.
    fn owes_revoke<'a>(&'a self, tuple: &'a TupleKey) -> BoxFuture<'a, Result<bool>>;
    /// Records requests that changed these tuples in OpenFGA though their
    /// ops are not ending applied (a condition's replacement whose delete
    /// landed and whose write did not): checks on them ask for fresh
    /// answers for a while, as after an applied op (see written.rs).
    /// Called while the ops are still in flight.
    fn note_landed<'a>(&'a self, tuples: &'a [TupleKey]) -> BoxFuture<'a, Result<()>>;
    /// The highest sequence number handed out so far.
    fn last_seq(&self) -> BoxFuture<'_, Result<u64>>;
    /// What is left of the ops acknowledged up to seq `up_to`, in one
    /// consistent look (see [`Unfinished`]).
    fn unfinished(&self, up_to: u64) -> BoxFuture<'_, Result<Unfinished>>;
    /// Whether an op whose place in line (`first`) is at most `up_to` is
    /// pending (ready, or blocked behind a write), in one look: what a
    /// `flush()` up to it still waits for once none of its ops is being
    /// taken, staged or written by this process.
    fn pending_up_to(&self, up_to: u64) -> BoxFuture<'_, Result<bool>>;
    /// Counts of pending ops.
    fn pending(&self) -> BoxFuture<'_, Result<Pending>>;
    /// Pending ops, without waiting: `None` where that needs I/O.
    fn pending_now(&self) -> Option<Pending>;
    /// Drops every pending op that is not in flight and returns them:
    /// with `up_to`, only ops acknowledged up to that seq (an op
    /// acknowledged since is kept, even folded into an older one's place).
    /// An op waiting behind its tuple's op in flight is kept too.
    fn clear(&self, up_to: Option<u64>) -> BoxFuture<'_, Result<Vec<(TupleKey, Op)>>>;
    /// The dead letters.
    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>>>;
    /// How many dead letters there are (with any a shared store holds that
    /// cannot be read), without loading them: `status` asks it on every
    /// look, and a dead-letter set can be large after an outage.
    fn dead_count(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(async move { Ok(self.dead_letters().await?.len()) })
    }
    /// The store's dead-letter counter: the id of the newest letter written
    /// (0: none), gone or not. A letter with a higher id was written since
    /// (a Redis data loss restarts the counter far ahead, and reports the
    /// loss).
    fn newest_letter_id(&self) -> BoxFuture<'_, Result<u64>>;
    /// The ids of the dead letters, those a shared store holds that cannot
    /// be read included (a purge removes them too).
    fn letter_ids(&self) -> BoxFuture<'_, Result<Vec<u64>>> {
        Box::pin(async move {
            let letters = self.dead_letters().await?;
            Ok(letters.iter().map(|d| d.id).collect())
        })
    }
    /// Removes dead letters: those with the given ids, or all (with
    /// `up_to`, all but those numbered after it).
    fn remove_dead_letters<'a>(
        &'a self,
        ids: Option<&'a [u64]>,
        up_to: Option<u64>,
    ) -> BoxFuture<'a, Result<Purged>>;
    /// Buffers dead letters again as new ops (those with `ids`, or all; with
    /// `only_transient`, only those that died of transient causes), in one
    /// step per letter that also drops a superseded letter instead: one whose
    /// tuple has a newer op pending, applied or dead since. A letter leaves
    /// the dead letters only once its op is buffered; with the buffer full,
    /// the rest are kept.
    fn replay_dead_letters<'a>(
        &'a self,
        ids: Option<&'a [u64]>,
        only_transient: bool,
    ) -> BoxFuture<'a, Result<Replayed>>;
    /// Whether other processes share this store (their ops can change
    /// answers without this process seeing the op).
    fn shared(&self) -> bool {
        false
    }
    /// How long a write started now may take: what is left of this writer's
    /// lease, for stores where others take over what a writer held when its
    /// lease ends. `None`: no limit.
    fn write_budget(&self) -> Option<Duration> {
        None
    }
    /// Whether this writer still holds `t` (stores where others take over
    /// what a writer held when its lease ends): false once its lease ended
    /// and what it held was handed on, as a writer learns when it renews.
    /// Call after [`Store::write_budget`]: a budget from a renewal comes
    /// with what that renewal learnt.
    fn holds(&self, _t: &Taken) -> bool {
        true
    }
    /// How many take and finish calls failed, and connections dropped (or
    /// a failover or a new epoch seen), so far: each may have lost the
    /// reply of a call that ran (leaving strays: see `give_back_strays`).
    fn unsure_calls(&self) -> u64 {
        0
    }
    /// How many ops takes dead-lettered since the last call, without
    /// handing them out (unreadable in the store; the store counts them in
    /// its totals and the metric): a flush reports them.
    fn dead_on_take(&self) -> u64 {
        0
    }
    /// Calls that fail are not repeated after `at` (a shutdown's deadline):
    /// for stores whose `finish` repeats a failed call.
    fn stop_retrying_at(&self, _at: std::time::Instant) {}
    /// Pending ops with `first <= up_to` that wait behind another writer's
    /// write in progress (only shared stores have other writers).
    fn blocked_up_to(&self, _up_to: u64) -> BoxFuture<'_, Result<u64>> {
        Box::pin(futures::future::ready(Ok(0)))
    }
    /// Stops this writer's lease: without `keep_until` (a clean stop, no
    /// write left in flight) what it holds goes to others at once; with
    /// it, when the lease ends, kept to `keep_until` at least (a write cut
    /// off may still land before then).
    fn release(&self, _keep_until: Option<std::time::Instant>) -> BoxFuture<'_, Result<()>> {
        Box::pin(futures::future::ready(Ok(())))
    }
    /// The application's flusher has ended as asked (its shutdown or
    /// close ran, or the handle was dropped): the handle writes nothing
    /// more, so its lease is no longer renewed. It ends by itself then, as a dead process's
    /// does, if the release that normally follows never comes (a caller
    /// that cut `shutdown()` short and kept the handle).
    fn flusher_ended(&self) {}
    /// Keeps this writer's lease until `until` at least, for stores where
    /// others take over what a writer held when its lease ends: a Write
    /// whose outcome is unknown may still commit until then, and no other
    /// writer may write a newer op on its keys first, even when this one
    /// stops or dies meanwhile.
    fn keep_lease_until(&self, _until: std::time::Instant) -> BoxFuture<'_, Result<()>> {
        Box::pin(futures::future::ready(Ok(())))
    }
    /// Gives back what the store names this writer as holding that the
    /// caller does not hold: ops a take moved to it or jobs a fetch handed
    /// it whose reply was lost, ops whose finish never got through. Nothing
    /// else brings them back while the writer lives. `held` says which keys
    /// the caller holds (with no take or fetch of its own under way);
    /// `None`: it holds nothing at all, jobs included. Returns how many ops
    /// and jobs went back.
    fn give_back_strays<'a>(
        &'a self,
        _held: Option<&'a (dyn Fn(&str) -> bool + Sync)>,
    ) -> BoxFuture<'a, Result<(u64, u64)>> {
        Box::pin(futures::future::ready(Ok((0, 0))))
    }
    /// A number that changes whenever an op on one of `rels` (`None`: any)
    /// is acknowledged, dead-lettered or cleared, by any process. Only shared
    /// stores need it; cached answers are compared against it.
    fn generation<'a>(&'a self, _rels: Option<&'a [RelName]>) -> BoxFuture<'a, Result<u64>> {
        Box::pin(futures::future::ready(Ok(0)))
    }
    /// A mark that moves whenever the connection to a shared store dropped
    /// or met another node (always 0 for a private store). A check reads
    /// the store in several calls: one that began under a mark and ends
    /// under another may have read a store that lost ops after its guard.
    fn connection_mark(&self) -> u64 {
        0
    }
    /// Fails (closed) when the connection changed since `mark` was taken
    /// (see `connection_mark`), or is not yet known to be back.
    fn still_connected(&self, _mark: u64) -> Result<()> {
        Ok(())
    }
    /// An open record of lost data (Redis lost acknowledged ops), for
    /// people; while one is open, checks fail closed. The Redis store
    /// compares what this process knows with what Redis holds first (a
    /// heartbeat), recording a loss it finds.
    fn loss(&self) -> BoxFuture<'_, Result<Option<String>>> {
        Box::pin(futures::future::ready(Ok(None)))
    }
    /// Closes the loss record (an operator has dealt with the loss), and
    /// returns it as [`loss`](Self::loss) shows it; None if none was open.
    fn acknowledge_loss<'a>(&'a self, _by: &'a str) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(futures::future::ready(Ok(None)))
    }
    /// Store-wide counters and notes (`last_flush`, `stopped`) written by
    /// every process; empty for a store only this process sees.
    fn shared_stats(&self) -> BoxFuture<'_, Result<std::collections::HashMap<String, String>>> {
        Box::pin(futures::future::ready(Ok(Default::default())))
    }
    /// Records a note for other processes' `status` (see `shared_stats`).
    fn set_note(&self, name: &'static str, value: String) -> BoxFuture<'_, Result<()>> {
        self.record_work(vec![(name, value)], 0)
    }
    /// Records notes and adds Write requests sent to the store-wide count,
    /// in one round trip (see `shared_stats`).
    fn record_work(
        &self,
        _notes: Vec<(&'static str, String)>,
        _requests: u64,
    ) -> BoxFuture<'_, Result<()>> {
        Box::pin(futures::future::ready(Ok(())))
    }
    /// Changes made by other processes, for stores shared between them.
    #[allow(clippy::type_complexity)]
    fn events(
        &self,
    ) -> Option<BoxFuture<'static, Result<futures::stream::BoxStream<'static, StoreEvent>>>> {
        None
    }
}

/// The pending-op store the config asks for; for the Redis store, also the
/// store itself (its job queue serves queue mode). `automatic`: the
/// handle flushes by itself (an application); else only when told (an
/// operator's tool), and other processes do not count it as one that
/// takes what is pending.
pub(crate) async fn open_store(
    config: &crate::Config,
    #[cfg_attr(not(feature = "redis"), allow(unused_variables))] automatic: bool,
) -> Result<(Arc<dyn Store>, Option<Arc<redis::RedisStore>>)> {
    Ok(match config.buffer.store {
        crate::config::StoreKind::Memory => (
            Arc::new(memory::MemoryStore::keeping_letters(
                config.buffer.capacity,
                config.buffer.dead_letter_capacity,
            )),
            None,
        ),
        #[cfg(feature = "redis")]
        crate::config::StoreKind::Redis => {
            let kind = if automatic { "app" } else { "tool" };
            let r = Arc::new(open_redis(config, kind).await?);
            (r.clone(), Some(r))
        }
        #[cfg(not(feature = "redis"))]
        crate::config::StoreKind::Redis => return Err(crate::error::Error::config(
            "buffer.store = \"redis\" needs fga-wb built with its `redis` feature (on by default)",
        )),
    })
}

/// The Redis store for `config`, as a writer of `kind` (`app`, `tool`,
/// `worker`).
#[cfg(feature = "redis")]
pub(crate) async fn open_redis(config: &crate::Config, kind: &str) -> Result<redis::RedisStore> {
    redis::RedisStore::connect(config, kind).await
}

/// Whether an op on `key` can change a check of `user` through a
/// user-bound dependency (`Dep::user_bound`): its user is `user`, a
/// wildcard, or a userset (which may contain `user`).
pub(crate) fn counts_for(key: &str, user: &str) -> bool {
    let Some(u) = key
        .split_once('#')
        .and_then(|(_, rest)| rest.split_once('@'))
        .map(|(_, u)| u)
    else {
        return true;
    };
    u == user || u.ends_with(":*") || u.contains('#')
}

/// `object#relation@user`: the key ops are coalesced on.
/// An op from its one-letter code in Redis and in jobs (`g`, `r`).
pub(crate) fn op_of(code: &str) -> Option<Op> {
    match code {
        "g" => Some(Op::Grant),
        "r" => Some(Op::Revoke),
        _ => None,
    }
}

/// A condition from its stored JSON; empty: none.
///
/// Unreadable (not written by fga-wb): an error, never "no condition",
/// which would make a conditional grant unconditional.
pub(crate) fn condition_of(s: &str) -> std::result::Result<Option<Condition>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    serde_json::from_str(s).map(Some).map_err(|e| {
        format!("its condition as stored in Redis is not one fga-wb wrote ({e}); it was not written, lest it be written without its condition")
    })
}

/// The tuple of `key`'s op `op` with its stored condition `cond`, and why
/// that condition cannot be read, if it cannot (then the tuple has none,
/// and must not be written or checked as it stands). A revoke's is never
/// read: OpenFGA deletes a tuple by its key alone, and fga-wb stores none.
pub(crate) fn stored_tuple(key: &str, cond: &str, op: Op) -> (TupleKey, Option<String>) {
    if op == Op::Revoke {
        return (tuple_of(key, None), None);
    }
    match condition_of(cond) {
        Ok(c) => (tuple_of(key, c), None),
        Err(reason) => (tuple_of(key, None), Some(reason)),
    }
}

/// How an op whose stored condition cannot be read ends: dead-lettered
/// with `reason`, for good (writing it again cannot help).
pub(crate) fn unreadable_outcome(key: &str, reason: String) -> Outcome {
    tracing::warn!(%key, error = %reason, "dead-lettered");
    Outcome::Dead {
        reason,
        code: None,
        transient: false,
    }
}

/// [`condition_of`] where the condition is only shown (listings, reports):
/// an unreadable one is shown as none, and logged.
pub(crate) fn shown_condition(s: &str) -> Option<Condition> {
    condition_of(s).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "showing a tuple without its unreadable stored condition");
        None
    })
}

pub(crate) fn key_of(t: &TupleKey) -> String {
    let mut k = String::with_capacity(t.object.len() + t.relation.len() + t.user.len() + 2);
    write_key(&mut k, t);
    k
}

/// Appends `t`'s key to `k`.
pub(crate) fn write_key(k: &mut String, t: &TupleKey) {
    k.push_str(&t.object);
    k.push('#');
    k.push_str(&t.relation);
    k.push('@');
    k.push_str(&t.user);
}

/// The tuple a key names, with a condition. Keys are built by `key_of` from
/// validated tuples: the object has no `#` and the relation no `@`.
pub(crate) fn tuple_of(key: &str, condition: Option<Condition>) -> TupleKey {
    let (object, rest) = key.split_once('#').unwrap_or((key, ""));
    let (relation, user) = rest.split_once('@').unwrap_or((rest, ""));
    TupleKey {
        user: user.to_owned(),
        relation: relation.to_owned(),
        object: object.to_owned(),
        condition,
    }
}

mod opt_secs {
    use serde::Serializer;
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }
}

mod unix_secs {
    use serde::Serializer;
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }
}

#[cfg(test)]
mod tests {
    /// Built without Redis, asking for the Redis store is a configuration
    /// error that says which feature to turn on.
    #[cfg(not(feature = "redis"))]
    #[tokio::test]
    async fn the_redis_store_needs_the_redis_feature() {
        let mut c = crate::Config::default();
        c.buffer.store = crate::config::StoreKind::Redis;
        let e = super::open_store(&c, true).await.err().expect("an error");
        assert!(e.to_string().contains("`redis` feature"), "{e}");
    }
}
