//! Ending taken ops, once. A finish whose call fails is repeated: ops left
//! taken by a writer that goes on living would be neither written nor
//! handed to others until it stops. But the call may have run with only its
//! reply lost, and its ops may have been taken again since (it made them
//! ready), or its job run by another worker: a plain repeat would end those
//! too. So each call carries an id, Redis keeps its answer (`P:fin:<writer>`,
//! see `finish` in store.lua), and a repeat with the same id only reads it.

use std::sync::Mutex;
use std::time::Instant;

use super::calls::CallIds;
use super::*;

/// How long a failed finish is repeated: long enough to ride out a Redis
/// failover or restart, and well within the 10 min Redis keeps its answer.
pub(super) const RETRY_FOR: Duration = Duration::from_secs(120);
const FIRST_WAIT: Duration = Duration::from_millis(50);
const MAX_WAIT: Duration = Duration::from_secs(2);

/// This writer's finish calls, and when repeats end.
#[derive(Default)]
pub(crate) struct Finishes {
    ids: CallIds,
    /// No repeats after this (a shutdown's deadline, or a stop).
    stop_at: Mutex<Option<Instant>>,
}

impl Finishes {
    pub(crate) fn stop_at(&self, at: Instant) {
        let mut s = self.stop_at.lock().unwrap_or_else(|p| p.into_inner());
        *s = Some(s.map_or(at, |s| s.min(at)));
    }

    fn retry_until(&self, started: Instant, repeat_for: Duration) -> Instant {
        let until = started + repeat_for;
        let stop = *self.stop_at.lock().unwrap_or_else(|p| p.into_inner());
        stop.map_or(until, |s| s.min(until))
    }
}

impl RedisStore {
    /// Ends ops with their outcomes; with `job`, also ends or reschedules
    /// it. A call that fails for a transient cause is repeated, with the
    /// same id, for up to `repeat_for` (or until a shutdown's deadline).
    pub(super) async fn finish_now(
        &self,
        done: Vec<(Taken, Outcome)>,
        job: Option<&JobEnd>,
        repeat_for: Duration,
    ) -> Result<Finished> {
        let call = self.finishes.ids.open();
        // The term the call ends ops and its job in, fixed once: a repeat
        // after the writer's lease ended and it took or fetched again (in a
        // new term) must not end what it holds in that term. A job's is the
        // term it was fetched in.
        let term = match job {
            Some(JobEnd::Done { term, .. } | JobEnd::Retry { term, .. }) => *term,
            None => self.hold.term(),
        };
        let started = Instant::now();
        let mut wait = FIRST_WAIT;
        loop {
            let args = self.finish_args(&done, job, call.id, term);
            let e = match self.call(&args).await {
                Ok(v) => {
                    let v = items(v)?;
                    return Ok(Finished {
                        applied: count(&v, 0)?,
                        dead: count(&v, 1)?,
                        requeued: count(&v, 2)?,
                        superseded: count(&v, 3)?,
                        // Only when some are (and not from older versions).
                        repended: count(&v, 4).unwrap_or(0),
                        evicted: 0,
                    });
                }
                Err(e) => e,
            };
            if !e.is_transient()
                || Instant::now() + wait >= self.finishes.retry_until(started, repeat_for)
            {
                // Its ops may stay this writer's: stray.
                self.unsure
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(e);
            }
            tracing::warn!(error = %e, retry_in = ?wait, ops = done.len(), "could not record write outcomes; repeating");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_WAIT);
        }
    }

    fn finish_args(
        &self,
        done: &[(Taken, Outcome)],
        job: Option<&JobEnd>,
        call: u64,
        term: u64,
    ) -> Args {
        let (job_id, action, due, json) = match job {
            None => ("", "", 0, ""),
            Some(JobEnd::Done { id, .. }) => (id.as_str(), "done", 0, ""),
            Some(JobEnd::Retry {
                id, due_ms, json, ..
            }) => (id.as_str(), "retry", *due_ms, json.as_str()),
        };
        let mut a = Args::new("finish", self.publish);
        a.push(now_ms())
            .push(&self.writer)
            .push(job_id)
            .push(action)
            .push(due)
            .push(json)
            .push(done.len());
        for (t, o) in done {
            let (code, reason, err_code) = match o {
                // Handed to another writer while this one was paused: it is
                // not this writer's to end, whatever its write did, and the
                // key may be this writer's again in a new term.
                _ if t.term != term => ("n", "", ""),
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
                .push(t.attempts.saturating_add(1));
        }
        a.push(call).push(self.finishes.ids.oldest()).push(term);
        a
    }
}
