//! Ops whose Write fails alone, again and again, while other Writes land.
//!
//! A tuple the server fails with a 500 every time (a datastore column
//! narrower than the API's limits, say) is split out of its chunk and
//! retried alone after each pause. A queue job gives such an op up after
//! `queue.retry_schedule` and dead-letters it as transient; inline, it was
//! retried for good: every retry a failed request, a pause, and an error
//! for the flushes it is in, and `fga-wb flush --wait` never ended. This
//! gives it the same budget inline: once it has failed alone for as long
//! as the schedule adds up to, and as many times as the schedule has
//! waits plus one, it is dead-lettered as transient (kept, replayable,
//! and a revoke among them fails its checks closed meanwhile). Only with
//! a shared store: the memory store's checks do not look at letters, so
//! there the op stays pending.
//!
//! A failure counts only if some Write landed since the op's last one: in
//! an outage every Write fails, and no op is given up for that.
//!
//! Every store remembers such ops, given up or not, so that a chunk they
//! are cut into again sends them alone (see `failing_alone`): mixed with
//! others, each retry cost the whole chunk its quick retries and a
//! bisection, and held up to 99 other ops behind it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// One op's failures alone so far.
struct Failing {
    since: Instant,
    /// Its latest failure.
    last: Instant,
    tries: u32,
    /// The count of landed Writes at its last counted failure.
    landed: Option<u64>,
    /// It failed alone while other Writes landed: its own tuple, not an
    /// outage (see `failing_alone`).
    while_others_landed: bool,
}

impl Failing {
    fn new(now: Instant) -> Failing {
        Failing {
            since: now,
            last: now,
            tries: 0,
            landed: None,
            while_others_landed: false,
        }
    }
}

pub(crate) struct LoneFailures {
    /// How long an op fails alone before it is given up; `None`: never (a
    /// queue worker, whose jobs keep their own schedule).
    give_up_after: Option<Duration>,
    /// How many counted failures it takes, too.
    tries: u32,
    /// By the op's seq: a newer op on the tuple starts afresh.
    ops: Mutex<HashMap<u64, Failing>>,
}

/// Entries kept at most; the oldest go first (only ops failing alone are
/// here, so this is reached only by a server failing many tuples alone).
const KEEP: usize = 10_000;

impl LoneFailures {
    /// Never gives an op up.
    pub(crate) fn never() -> LoneFailures {
        LoneFailures {
            give_up_after: None,
            tries: u32::MAX,
            ops: Mutex::new(HashMap::new()),
        }
    }

    /// Gives an op up after `schedule` (`queue.retry_schedule`): failing
    /// alone for its sum, `schedule.len() + 1` times.
    pub(crate) fn after(schedule: &[Duration]) -> LoneFailures {
        LoneFailures {
            give_up_after: Some(schedule.iter().sum()),
            tries: u32::try_from(schedule.len())
                .unwrap_or(u32::MAX)
                .saturating_add(1),
            ops: Mutex::new(HashMap::new()),
        }
    }

    /// Notes that the op `seq` failed alone, `landed` Writes having
    /// landed so far (`others_landed`: some during its chunk); returns how
    /// long it has failed if that is the end of its budget (it is
    /// forgotten then).
    pub(crate) fn failed(
        &self,
        seq: u64,
        landed: u64,
        others_landed: bool,
        now: Instant,
    ) -> Option<Duration> {
        let mut ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        let stale = self.stale();
        if ops.len() >= KEEP {
            ops.retain(|_, f| now.saturating_duration_since(f.last) < stale);
        }
        if ops.len() >= KEEP {
            if let Some(oldest) = ops.iter().min_by_key(|(_, f)| f.last).map(|(&s, _)| s) {
                ops.remove(&oldest);
            }
        }
        let f = ops.entry(seq).or_insert_with(|| Failing::new(now));
        if now.saturating_duration_since(f.last) >= stale {
            *f = Failing::new(now);
        }
        f.last = now;
        f.while_others_landed |= others_landed;
        if f.landed != Some(landed) {
            f.tries = f.tries.saturating_add(1);
            f.landed = Some(landed);
        }
        let give_up_after = self.give_up_after?;
        let failing_for = now.saturating_duration_since(f.since);
        if f.tries >= self.tries && failing_for >= give_up_after {
            ops.remove(&seq);
            return Some(failing_for);
        }
        None
    }

    /// Of `seqs`, the ops that failed alone lately while other Writes
    /// landed: they go alone again. (Ops split down to one in an outage
    /// are not singled out after it.) One look under the lock, and none at
    /// the ops while nothing is noted, as most of the time.
    pub(crate) fn failing_alone(
        &self,
        seqs: impl IntoIterator<Item = u64>,
        now: Instant,
    ) -> HashSet<u64> {
        let ops = self.ops.lock().unwrap_or_else(|p| p.into_inner());
        if ops.is_empty() {
            return HashSet::new();
        }
        let stale = self.stale();
        seqs.into_iter()
            .filter(|s| {
                ops.get(s).is_some_and(|f| {
                    f.while_others_landed && now.saturating_duration_since(f.last) < stale
                })
            })
            .collect()
    }

    /// Entries idle this long stopped failing (applied, superseded,
    /// cleared), or wait out an outage: they start afresh.
    fn stale(&self) -> Duration {
        let at_least = Duration::from_secs(60);
        self.give_up_after
            .map_or(at_least, |g| g.saturating_mul(2).max(at_least))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn alone(lone: &LoneFailures, seq: u64, now: Instant) -> bool {
        lone.failing_alone([seq], now).contains(&seq)
    }

    #[test]
    fn an_op_is_given_up_after_the_schedule_with_writes_landing_between() {
        let lone = LoneFailures::after(&[S, 2 * S]);
        let t0 = Instant::now();
        assert_eq!(lone.failed(7, 10, true, t0), None);
        assert_eq!(lone.failed(7, 11, true, t0 + S), None);
        // Three failures, but not yet for 3 s.
        assert_eq!(lone.failed(7, 12, true, t0 + 2 * S), None);
        assert_eq!(lone.failed(7, 13, true, t0 + 3 * S), Some(3 * S));
        // Forgotten once given up.
        assert_eq!(lone.failed(7, 14, true, t0 + 4 * S), None);
    }

    #[test]
    fn failures_with_no_write_landing_between_do_not_count() {
        let lone = LoneFailures::after(&[S]);
        let t0 = Instant::now();
        assert_eq!(lone.failed(1, 5, true, t0), None);
        // An outage: nothing lands, however long.
        for i in 1..10 {
            assert_eq!(lone.failed(1, 5, true, t0 + i * S), None);
        }
        assert_eq!(lone.failed(1, 6, true, t0 + 10 * S), Some(10 * S));
    }

    #[test]
    fn a_schedule_of_zeros_gives_up_after_its_tries() {
        let lone = LoneFailures::after(&[Duration::ZERO]);
        let t0 = Instant::now();
        assert_eq!(lone.failed(1, 1, true, t0), None);
        assert_eq!(lone.failed(1, 2, true, t0), Some(Duration::ZERO));
    }

    #[test]
    fn a_worker_never_gives_an_op_up_here() {
        let lone = LoneFailures::never();
        let t0 = Instant::now();
        for i in 0..10 {
            assert_eq!(lone.failed(1, i, true, t0 + i as u32 * 60 * S), None);
        }
        // But remembers it, to send it alone.
        assert!(alone(&lone, 1, t0 + 9 * 60 * S));
    }

    #[test]
    fn an_op_failing_alone_is_known_until_it_goes_quiet() {
        let lone = LoneFailures::after(&[S]);
        let t0 = Instant::now();
        assert!(!alone(&lone, 1, t0));
        // In an outage (nothing else landed): not singled out.
        assert_eq!(lone.failed(1, 1, false, t0), None);
        assert!(!alone(&lone, 1, t0));
        assert_eq!(lone.failed(1, 1, true, t0), None);
        assert!(alone(&lone, 1, t0 + 59 * S));
        assert!(!alone(&lone, 2, t0));
        assert!(!alone(&lone, 1, t0 + 60 * S));
    }

    #[test]
    fn an_op_failing_all_along_is_not_started_afresh() {
        let lone = LoneFailures::after(&[100 * S; 3]);
        let t0 = Instant::now();
        for (i, t) in [0, 250, 500].into_iter().enumerate() {
            assert_eq!(lone.failed(1, i as u64, true, t0 + t * S), None);
        }
        // 750 s after its first failure (past twice the schedule), but
        // 250 s after its last.
        assert_eq!(lone.failed(1, 3, true, t0 + 750 * S), Some(750 * S));
    }

    #[test]
    fn an_op_idle_for_long_starts_afresh() {
        let lone = LoneFailures::after(&[S]);
        let t0 = Instant::now();
        assert_eq!(lone.failed(1, 1, true, t0), None);
        assert_eq!(lone.failed(1, 2, true, t0 + 100 * S), None);
        assert_eq!(lone.failed(1, 3, true, t0 + 101 * S), Some(S));
    }
}
