//! What operators and monitoring ask of a handle: status, health, dead
//! letters, clearing, Redis key usage and loss records.

use super::*;
use std::collections::HashSet;

/// Dead letters `health` reads at most (a look, not a scan of a backlog).
const HEALTH_LETTERS: usize = 10_000;

impl WriteBehind {
    /// Drops every pending op that is not already being written, logs them,
    /// and returns how many were dropped. An op waiting behind a write of
    /// its own tuple in progress is kept: it is written after that write.
    pub async fn clear(&self) -> Result<usize> {
        Ok(self.clear_ops().await?.len())
    }

    /// [`clear`](Self::clear), returning the ops it dropped: the record of
    /// what will not reach OpenFGA (`fga-wb clear` prints it).
    pub async fn clear_ops(&self) -> Result<Vec<(TupleKey, Op)>> {
        self.clear_bounded(None).await
    }

    /// [`clear_ops`](Self::clear_ops) of the ops acknowledged up to `seq`
    /// (a [`last_acknowledged`](Self::last_acknowledged)) only: those
    /// acknowledged since are kept, one folded into an older op's place
    /// in line too. `fga-wb clear` drops what there was
    /// when the operator was asked, not what arrived while they answered.
    pub async fn clear_ops_up_to(&self, seq: u64) -> Result<Vec<(TupleKey, Op)>> {
        self.clear_bounded(Some(seq)).await
    }

    async fn clear_bounded(&self, up_to: Option<u64>) -> Result<Vec<(TupleKey, Op)>> {
        let e = &self.inner.engine;
        // What changes the buffer is the handle's until it shuts down.
        self.ensure_open()?;
        let dropped = e.store.clear(up_to).await?;
        e.cache.invalidate_all();
        count!(
            e.stats,
            cleared,
            "fga_wb_ops_cleared_total",
            dropped.len() as u64
        );
        tracing::warn!(
            count = dropped.len(),
            "cleared pending ops; they will not reach OpenFGA"
        );
        const SHOWN: usize = 100;
        for (t, op) in dropped.iter().take(SHOWN) {
            tracing::info!(tuple = %t, ?op, "cleared");
        }
        if dropped.len() > SHOWN {
            tracing::info!("... and {} more cleared", dropped.len() - SHOWN);
        }
        e.changed.send_modify(|v| *v += 1);
        Ok(dropped)
    }

    /// Pending ops, dead letters, the last flush and totals. With the Redis
    /// store it also runs this process's heartbeat (a small write to
    /// Redis) before it reads the loss record, so a loss no heartbeat was
    /// woken for is found and recorded.
    pub async fn status(&self) -> Result<Status> {
        let e = &self.inner.engine;
        let config = &self.inner.config;
        let mut status = Status {
            store: config.buffer.store,
            mode: config.flush.mode,
            store_id: e.store_id.clone(),
            pending: e.store.pending().await?,
            dead_letters: e.store.dead_count().await?,
            flushing_stopped: e.stats.stopped(),
            workers_stopped: None,
            last_flush: e.stats.last_flush(),
            totals: e.stats.totals(),
            queue: match &self.inner.redis {
                Some(r) => {
                    let q = crate::queue::stats(r).await?;
                    // Shown to every handle once the store has a queue: an
                    // operator's CLI configured for inline mode would
                    // otherwise not see jobs waiting for a worker, and
                    // `flush --wait` would wait for them for good.
                    let used =
                        q.pending > 0 || q.running > 0 || q.scheduled > 0 || !q.workers.is_empty();
                    (config.flush.mode == Mode::Queue || used).then_some(q)
                }
                None => None,
            },
            loss: e.store.loss().await?,
            last_loss_acknowledged: None,
            write_limit: match e.tuple_limit.load(Ordering::Relaxed) {
                0 => None,
                l => Some(l),
            },
            // A scan of every key: asked for separately (`redis_key_usage`),
            // not by every caller that polls the status.
            redis_keys: None,
            live_apps: None,
            held_over: None,
        };
        status.merge_shared(&e.store.shared_stats().await?);
        Ok(status)
    }

    /// The sequence number of the newest op acknowledged so far: through
    /// this handle with the memory store; through any process sharing the
    /// store with the Redis store. With [`unfinished`](Self::unfinished),
    /// waits for what was acknowledged before a moment while ops keep
    /// arriving (`fga-wb flush --wait`).
    pub async fn last_acknowledged(&self) -> Result<u64> {
        self.inner.engine.store.last_seq().await
    }

    /// What is left of the ops acknowledged up to `seq` (from
    /// [`last_acknowledged`](Self::last_acknowledged)): ops pending, in
    /// flight or held by queued jobs, and ops that died of transient
    /// causes and may still be replayed. Ops acknowledged later are not
    /// counted (but one folded into a pending op from before keeps its
    /// place, and is counted in its stead), nor is an op that a newer one
    /// on its tuple superseded before it was sent (what the application
    /// said last is what gets written). One consistent look:
    /// an op moving on meanwhile (written, handed back by a crashed
    /// writer, replayed) is seen where it is.
    pub async fn unfinished(&self, seq: u64) -> Result<Unfinished> {
        self.inner.engine.store.unfinished(seq).await
    }

    /// Whether OpenFGA answers a read of the store's tuples (one, with
    /// `HIGHER_CONSISTENCY`: from its datastore) with this handle's
    /// credentials. Tells an outage from Writes that fail on their own
    /// (`fga-wb flush --wait`).
    pub async fn openfga_reads(&self) -> Result<()> {
        let e = &self.inner.engine;
        let any = crate::openfga::ReadFilter::default();
        e.client.read(&e.store_id, &any, Some(1), None).await?;
        Ok(())
    }

    /// Redis store: how many keys and bytes the store holds in Redis, by
    /// category (`pending`, `queue`, `dead`, `meta`, `legacy`); `None` for
    /// the memory store. Scans the store's keys (in steps), so it is for an
    /// operator's look, not a loop: `status()` leaves `redis_keys` empty.
    pub async fn redis_key_usage(&self) -> Result<Option<Vec<crate::buffer::KeyUsage>>> {
        match &self.inner.redis {
            Some(r) => Ok(Some(r.usage().await?)),
            None => Ok(None),
        }
    }

    /// What could keep acknowledged ops from reaching OpenFGA, for an
    /// operator's health check: OpenFGA unreachable or refusing the
    /// credentials, flushing stopped, an open Redis loss, pending ops no
    /// process flushes, queued jobs with no worker seen, ops given up in an
    /// outage with no worker seen to replay them, ops the workers left
    /// after `queue.replay_limit`, more than 10,000 dead letters with no
    /// worker seen (not read, so not known harmless) (problems); Redis
    /// without AOF, dead letters waiting, no authorization model read yet
    /// (warnings). Asks OpenFGA once, Redis a few times, and reads the dead
    /// letters only while there are at most 10,000.
    pub async fn health(&self) -> Result<Health> {
        let e = &self.inner.engine;
        let status = self.status().await?;
        let mut h = Health::default();
        match e.client.read_latest_authorization_model(&e.store_id).await {
            Ok(_) => {}
            Err(err) if err.is_auth() => h
                .problems
                .push(format!("OpenFGA refuses the credentials: {err}")),
            Err(err) => h.problems.push(format!("OpenFGA: {err}")),
        }
        if let Some(why) = &status.flushing_stopped {
            h.problems.push(format!("flushing is stopped: {why}"));
        }
        if let Some(loss) = &status.loss {
            h.problems.push(format!(
                "Redis lost acknowledged ops: {loss}; see `fga-wb loss`"
            ));
        }
        // This handle is an application flushing the store too, unless it
        // flushes only when told (`fga-wb status`) or its flusher died.
        let flushes = self.inner.automatic_flush
            && e.failed.get().is_none()
            && !self
                .inner
                .shut_down
                .load(std::sync::atomic::Ordering::Relaxed);
        if let Some(p) = nobody_flushes(&status, &self.inner.config, flushes) {
            h.problems.push(p);
        }
        if let Some(q) = &status.queue {
            if q.workers.is_empty() && (q.pending > 0 || q.scheduled > 0) {
                h.problems.push(format!(
                    "{} jobs wait and no worker was seen: start `fga-wb worker`",
                    q.pending.saturating_add(q.scheduled)
                ));
            }
        }
        if let Some(r) = &self.inner.redis {
            h.warnings.extend(r.persistence_warning().await);
        }
        if self.inner.read_model && self.inner.model.load().is_none() {
            h.warnings.push(
                "no authorization model read yet (OpenFGA was unreachable, or the store has none): grants and revokes are not validated and every pending op counts for every check; it is read again until it is".into(),
            );
        }
        if status.dead_letters > 0 {
            h.warnings.push(format!(
                "{} dead letters wait for a decision (`fga-wb dlq list`)",
                status.dead_letters
            ));
            // Ops given up in an outage are acknowledged ops OpenFGA lacks,
            // and the checks they could change towards allowed fail closed
            // meanwhile: only workers replay them by themselves. Told by
            // reading the letters, for as many as a look can afford.
            // Any live worker that replays (`queue.replay_transient`
            // not `"0s"`: its name says), as the workers were configured.
            let replayed = status
                .queue
                .as_ref()
                .is_some_and(crate::status::QueueStats::any_worker_replays);
            if replayed {
                // The workers replay them, but those they left for an
                // operator.
                let left = match &self.inner.redis {
                    Some(r) => r.left_letters().await,
                    None => Ok(0),
                };
                match left {
                    Ok(0) => {}
                    Ok(n) => h.problems.push(format!(
                        "{n} ops given up in an outage died again after the workers' replays while other writes landed (queue.replay_limit), and the workers left them for an operator: OpenFGA may answer their tuples as before them, so the checks it could wrongly allow fail closed until `fga-wb dlq replay` once their cause is fixed (`fga-wb dlq list` gives OpenFGA's reasons), or a purge"
                    )),
                    Err(e) => h
                        .warnings
                        .push(format!("could not count the dead letters left for an operator: {e}")),
                }
            } else if status.dead_letters > HEALTH_LETTERS {
                // Not read, so not known to be harmless: some may be
                // revokes given up in an outage, failing checks closed.
                h.problems.push(format!(
                    "more than {HEALTH_LETTERS} dead letters and nothing seen replaying them (only queue workers do): too many to read here to tell whether some were given up in an outage (their checks fail closed until `fga-wb dlq replay`); look with `fga-wb dlq list`"
                ));
            } else {
                match self.dead_letters().await {
                    Ok(letters) => {
                        let current = letters.iter().filter(|d| d.given_up_in_an_outage()).count();
                        if current > 0 {
                            h.problems.push(format!(
                                "{current} ops given up in an outage are not written and nothing replays them (only workers do: none was seen, or they run with queue.replay_transient = \"0s\"): OpenFGA may answer their tuples as before them, so the checks it could wrongly allow (a revoke's; a grant's that takes access away) fail closed until `fga-wb dlq replay` (or a purge)"
                            ));
                        }
                    }
                    Err(e) => h
                        .warnings
                        .push(format!("could not read the dead letters: {e}")),
                }
            }
        }
        Ok(h)
    }

    /// Redis store: deletes what older versions left under the store's
    /// prefix: the job keys of versions before fga-wb kept jobs in its own
    /// keys (finished jobs stayed there forever), and the claim lists of
    /// jobs that an older version's workers finished during an upgrade;
    /// returns how many. `fga-wb sweep` runs it.
    pub async fn sweep_legacy_keys(&self) -> Result<u64> {
        match &self.inner.redis {
            Some(r) => r.sweep_legacy().await,
            None => Ok(0),
        }
    }

    /// Closes the record of a Redis loss so checks answer again: for an
    /// operator, after re-applying what the application granted and revoked
    /// around the time of the loss (`status().loss` says when). `by` names
    /// who did it, for the record. Returns the record closed, read in the
    /// same step (a loss recorded since the operator last looked is in
    /// it, as "more times since"); None if no loss was open.
    pub async fn acknowledge_loss(&self, by: &str) -> Result<Option<String>> {
        let e = &self.inner.engine;
        let closed = e.store.acknowledge_loss(by).await?;
        e.cache.invalidate_all();
        Ok(closed)
    }

    /// The dead letters: ops OpenFGA refused (its reasons kept), and ops
    /// that died of transient causes (marked `transient`).
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.inner.engine.store.dead_letters().await
    }

    /// The id of the newest dead letter written (0: none), without loading
    /// the letters: those written later have higher ids (`fga-wb flush
    /// --wait` tells what died while it ran).
    pub async fn newest_dead_letter_id(&self) -> Result<u64> {
        self.inner.engine.store.newest_letter_id().await
    }

    /// Buffers dead letters again (those with `ids`, or all), each in its
    /// op's place in line and pending time (it is still the op
    /// acknowledged then: see [`unfinished`](Self::unfinished)), for
    /// after the model or the data was fixed, and flushes them (in queue
    /// mode: queues their jobs). They skip model validation: OpenFGA
    /// decides.
    ///
    /// A letter whose tuple got a newer op since it died (pending, applied
    /// or dead itself) is *superseded*: replaying it would undo what the
    /// application said last, so it is dropped instead, and counted. A
    /// letter leaves the dead letters only once its op is buffered again,
    /// so a full buffer loses nothing: the replay then fails with
    /// [`Error::is_buffer_full`] after flushing what it did replay. Unknown
    /// ids are an error, and nothing is replayed then. A flush afterwards
    /// that fails or cannot write them (refused credentials, an unknown
    /// store, OpenFGA unreachable) does not fail the replay: the error is
    /// in [`Replayed::flush_error`], and the replayed ops stay pending.
    pub async fn replay_dead_letters(&self, ids: Option<&[u64]>) -> Result<Replayed> {
        let e = &self.inner.engine;
        // What changes the buffer is the handle's until it shuts down; and
        // a letter replayed is an op to write, as a grant is.
        self.ensure_flushing()?;
        self.refuse_unknown_letters(ids, true).await?;
        // Letters written after this are the flush's (see below).
        let newest = e.store.newest_letter_id().await?;
        let mut r = e.store.replay_dead_letters(ids, false).await?;
        // A replayed letter is acknowledged again, like a grant or revoke.
        for t in &r.tuples {
            e.cache.invalidate_for(t);
        }
        count!(
            e.stats,
            acknowledged,
            "fga_wb_ops_acknowledged_total",
            r.replayed as u64
        );
        if r.replayed > 0 {
            // The letters are ops again, acknowledged and buffered: an
            // error here must not read as a replay that did not happen.
            let failed = match self.flush().await {
                Ok(report) => {
                    // Read whatever this flush counted: another process's
                    // flusher may have written (and lost) a replayed op.
                    r.dead_lettered = self.died_again(newest, &r.tuples, &report).await;
                    report.error
                }
                Err(e) => Some(e.to_string()),
            };
            if let Some(e) = &failed {
                tracing::warn!(error = %e, replayed = r.replayed, "the flush after replaying dead letters failed; they are pending");
            }
            r.flush_error = failed;
        }
        if r.kept > 0 {
            tracing::warn!(
                replayed = r.replayed,
                kept = r.kept,
                "the buffer is full: dead letters kept (nothing lost); make room and replay again"
            );
            return Err(Error::new(Kind::ReplayFilledBuffer {
                capacity: self.inner.config.buffer.capacity,
                replayed: r.replayed,
                superseded: r.superseded,
                kept: r.kept,
            }));
        }
        Ok(r)
    }

    /// How many of the `replayed` tuples were dead-lettered again by the
    /// time the flush after a replay (which writes other pending ops too)
    /// returned: letters newer than `newest`. The flush's whole count if
    /// the letters cannot be read.
    async fn died_again(&self, newest: u64, replayed: &[TupleKey], report: &FlushReport) -> u64 {
        let replayed: HashSet<String> = replayed.iter().map(key_of).collect();
        match self.inner.engine.store.dead_letters().await {
            Ok(letters) => letters
                .iter()
                .filter(|d| d.id > newest && replayed.contains(&key_of(&d.tuple)))
                .count() as u64,
            Err(_) => report.dead_lettered,
        }
    }

    /// Deletes dead letters (those with `ids`, or all); returns how many.
    /// Unknown ids are an error, and nothing is deleted then (a mistyped
    /// id read as "purged 0").
    pub async fn purge_dead_letters(&self, ids: Option<&[u64]>) -> Result<usize> {
        self.refuse_unknown_letters(ids, false).await?;
        self.remove_letters(ids, None).await
    }

    /// Deletes every dead letter numbered up to `up_to` (from
    /// [`newest_dead_letter_id`](Self::newest_dead_letter_id) when an
    /// operator was asked), sparing the ones written since: a revoke given
    /// up in an outage meanwhile keeps failing its checks closed until it
    /// is replayed. Returns how many were deleted.
    pub async fn purge_dead_letters_up_to(&self, up_to: u64) -> Result<usize> {
        self.remove_letters(None, Some(up_to)).await
    }

    /// Removes letters (see `Store::remove_dead_letters`), logging how many.
    /// Revokes that purged grants owed are pending again: flushed, as a
    /// replay flushes what it buffers.
    async fn remove_letters(&self, ids: Option<&[u64]>, up_to: Option<u64>) -> Result<usize> {
        let e = &self.inner.engine;
        // What changes the buffer is the handle's until it shuts down.
        self.ensure_open()?;
        let p = e.store.remove_dead_letters(ids, up_to).await?;
        if p.removed > 0 {
            tracing::warn!(
                count = p.removed,
                "purged dead letters: their ops will never be written"
            );
        }
        if p.repended > 0 {
            e.repended(
                p.repended as u64,
                "purged grants that were given up over a revoke that never reached OpenFGA: that revoke is pending again, so OpenFGA does not keep what the application revoked",
            );
            // A transient failure is a report's error, not an `Err`.
            let failed = match self.flush().await {
                Ok(r) => r.error,
                Err(err) => Some(err.to_string()),
            };
            if let Some(error) = failed {
                tracing::warn!(%error, "the flush after purging failed; the revokes are pending (checks on them fail closed) until a flush writes them");
            }
        }
        Ok(p.removed)
    }

    /// An error naming the `ids` that are no dead letter's; for a replay,
    /// also those of letters that cannot be read (a purge removes them).
    async fn refuse_unknown_letters(&self, ids: Option<&[u64]>, replay: bool) -> Result<()> {
        let Some(ids) = ids else {
            return Ok(());
        };
        let store = &self.inner.engine.store;
        // Unreadable letters too: the log line that skips one names its id
        // and says purging removes it.
        let known: HashSet<u64> = store.letter_ids().await?.into_iter().collect();
        let missing = |present: &HashSet<u64>| -> Vec<String> {
            ids.iter()
                .filter(|id| !present.contains(id))
                .map(ToString::to_string)
                .collect()
        };
        let unknown = missing(&known);
        if !unknown.is_empty() {
            return Err(Error::invalid_argument(format!(
                "no dead letter with id {}; `fga-wb dlq list` shows them{}",
                unknown.join(", "),
                match self.inner.redis {
                    None => " (the memory store drops its oldest letters past buffer.dead_letter_capacity)",
                    Some(_) => "",
                }
            )));
        }
        if !replay {
            return Ok(());
        }
        let readable: HashSet<u64> = store.dead_letters().await?.iter().map(|d| d.id).collect();
        let unread = missing(&readable);
        match unread.is_empty() {
            true => Ok(()),
            false => Err(Error::invalid_argument(format!(
                "dead letter {} cannot be read (it was not written by fga-wb), so nothing of it can be replayed; `fga-wb dlq purge {}` removes it",
                unread.join(", "),
                unread.join(" ")
            ))),
        }
    }
}

/// Pending ops in a shared store that have waited long while no
/// application process runs, nor (queue mode) a worker that queues them:
/// they stay in Redis, safe but unwritten. "Long" is
/// `buffer::unflushed_after`, as this process's configuration says. `flushes`: this
/// process is one (`live_apps` counts the others).
fn nobody_flushes(status: &crate::Status, config: &crate::Config, flushes: bool) -> Option<String> {
    let apps = status.live_apps?;
    let stale = crate::buffer::unflushed_after(config.flush.interval, config.redis.writer_lease);
    let waited = status.pending.oldest_age.filter(|a| *a > stale)?;
    (apps == 0 && !flushes).then(|| {
        format!(
            "{} pending ops, the oldest {}s old, and no application process runs to flush them, nor a worker to queue them (in queue mode): start one, or run `fga-wb flush`",
            status.pending.total,
            waited.as_secs()
        )
    })
}
