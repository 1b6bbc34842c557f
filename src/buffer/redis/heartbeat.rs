//! The writer lease and loss detection: the heartbeat that renews this
//! writer's lease, compares what it acknowledged with what Redis holds, and
//! records a loss.

use super::*;

impl RedisStore {
    /// Runs a heartbeat now (it also looks for lost data).
    pub(crate) async fn beat(&self) -> Result<bool> {
        Heartbeat {
            conn: self.conn.clone(),
            script: self.script.clone(),
            prefix: self.prefix.clone(),
            publish: self.publish,
            writer: self.writer.clone(),
            lease: self.lease,
            outcome_hold: self.outcome_hold,
            hold: self.hold.clone(),
            watch: self.watch.clone(),
        }
        .once()
        .await
    }

    /// Fails closed while a dropped connection is not known to be back, and
    /// for a while after (see `Watch::quiet_until`).
    pub(crate) fn after_reconnect(&self) -> Result<()> {
        // `dropped` first: the heartbeat sets the quiet time before it
        // clears `dropped`, so a check that finds it cleared finds the
        // quiet time too.
        let dropped = self.watch.dropped.load(Ordering::Acquire);
        let until = self.watch.quiet_until.load(Ordering::Acquire);
        let now = now_ms();
        let left = if dropped {
            self.watch.wake.notify_one();
            self.lease.as_millis() as u64 / 3 + QUIET_MARGIN_MS
        } else {
            until.saturating_sub(now)
        };
        if left > 0 {
            return Err(Error::new(Kind::Reconnecting {
                left: Duration::from_millis(left),
            }));
        }
        Ok(())
    }

    /// After a reconnect: fails closed until every other writer that was
    /// alive around then has run a heartbeat since, and so has compared what
    /// it acknowledged with what Redis holds. A failover to a lagging
    /// replica brings back older leases, so a writer that looks dead is
    /// waited for until two leases after the reconnect (see `confirmed` in
    /// store.lua); one that stopped cleanly is not.
    pub(crate) async fn confirm_others(&self) -> Result<()> {
        let since = self.watch.reconnected_at.load(Ordering::Relaxed);
        if since == 0 {
            return Ok(());
        }
        let now = now_ms();
        let mut a = Args::new("confirmed", self.publish);
        a.push(now)
            .push(since)
            .push(&self.writer)
            .push(self.lease.as_millis() as u64);
        let v = items(self.call(&a).await?)?;
        // The heartbeat that confirmed the last writer may also have
        // recorded a loss, after the caller read the loss flag: it must
        // not answer from what it read before.
        if count(&v, 2).unwrap_or(1) == 1 {
            return Err(self.loss_error().await);
        }
        if count(&v, 0)? == 0 {
            let _ = self.watch.reconnected_at.compare_exchange(
                since,
                0,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return Ok(());
        }
        let next_beat = self.lease.as_millis() as u64 / 3;
        let left = count(&v, 1)?.saturating_sub(now).min(next_beat).max(1);
        Err(Error::new(Kind::Reconnecting {
            left: Duration::from_millis(left),
        }))
    }

    /// The open loss record, as text for people.
    pub(crate) async fn loss_now(&self) -> Result<Option<String>> {
        loss_record(self.call(&Args::new("loss", self.publish)).await?)
    }

    /// Closes the open loss record; returns it, if one was open.
    pub(crate) async fn acknowledge_loss_now(&self, by: &str) -> Result<Option<String>> {
        let mut a = Args::new("ackloss", self.publish);
        a.push(now_ms()).push(by);
        loss_record(self.call(&a).await?)
    }

    pub(crate) async fn loss_error(&self) -> Error {
        let detail = match self.loss_now().await {
            Ok(Some(s)) => s,
            Ok(None) => "a loss was detected; see `fga-wb status`".into(),
            Err(e) => format!("a loss was detected ({e})"),
        };
        Error::new(Kind::BufferLost { detail })
    }

    /// `redis.writer_lease`.
    pub(crate) fn lease(&self) -> Duration {
        self.lease
    }

    /// How long a write may take from now and still end within this
    /// writer's lease (less a margin for the clocks and the finish).
    pub fn write_budget(&self) -> Duration {
        let renewed = self.hold.renewed_at();
        let lease_end = renewed + self.lease.as_millis() as u64;
        Duration::from_millis(lease_end.saturating_sub(now_ms() + LEASE_MARGIN_MS))
    }
}

/// This writer's hold on what it takes: when its lease was last renewed
/// and its term (see `renew` in store.lua). A writer that was paused, or cut
/// off from Redis, for longer than its lease may find what it held handed to
/// others; its next renewal brings a new term, and it must not write what
/// it took in an earlier one (a newer op on the key may have been written
/// since).
#[derive(Default)]
pub(crate) struct Hold {
    renewed: AtomicU64,
    term: AtomicU64,
}

impl Hold {
    /// A call sent at `at` (ms) renewed the lease and answered `term`. The
    /// term is stored first: whoever reads the renewal (the write budget)
    /// then reads the term that came with it.
    pub(crate) fn renewed(&self, at: u64, term: u64, writer: &str) {
        let before = self.term.fetch_max(term, Ordering::AcqRel);
        let last = self.renewed.fetch_max(at, Ordering::AcqRel);
        if term < before && at > last {
            // Terms only grow in Redis: it failed over to a replica that had
            // not received this writer's last term. What this writer takes
            // from now on carries that term and is not written (it is never
            // sure the ops are not another writer's): say so, loudly.
            tracing::error!(
                writer,
                term,
                held = before,
                "Redis answered an earlier term than this writer holds (a failover to a replica behind its writes, or data restored from an older copy): ops it takes from now on are not written; restart this process"
            );
            metrics::counter!("fga_wb_redis_term_regressed_total").increment(1);
        }
        if before != 0 && term > before {
            tracing::error!(
                writer,
                "this process's Redis lease had ended (it was paused or cut off from Redis for longer than redis.writer_lease), \
                 and the ops it was writing were handed to other writers: it does not write them"
            );
            metrics::counter!("fga_wb_redis_leases_lost_total").increment(1);
        }
    }

    /// When the lease was last renewed (ms since the epoch).
    pub(crate) fn renewed_at(&self) -> u64 {
        self.renewed.load(Ordering::Acquire)
    }

    /// The current term.
    pub(crate) fn term(&self) -> u64 {
        self.term.load(Ordering::Acquire)
    }
}

/// A loss record as the `loss` and `ackloss` scripts return it ({at, by,
/// reason, more}, or {} for none), for people.
fn loss_record(v: Value) -> Result<Option<String>> {
    let v = items(v)?;
    if v.len() < 4 {
        return Ok(None);
    }
    let at: u64 = text(&v[0])?.parse().unwrap_or(0);
    let when = humantime::format_rfc3339_seconds(stored_time(Duration::from_millis(at)));
    let more = int(&v[3]).unwrap_or(0);
    let mut s = format!("at {when}, seen by {}: {}", text(&v[1])?, text(&v[2])?);
    if more > 0 {
        s.push_str(&format!(" (and {more} more times since)"));
    }
    Ok(Some(s))
}

/// Where dropped connections and new epochs enter a generation: far above
/// any sum of change counters.
pub(crate) const RESETS_SHIFT: u32 = 40;

/// Added to a third of the lease for the quiet time after a reconnect:
/// another process's heartbeat may take a round trip and a retry.
pub(crate) const QUIET_MARGIN_MS: u64 = 1000;

/// Kept free at the end of a lease: a write must be answered and finished
/// before the lease could end.
pub(crate) const LEASE_MARGIN_MS: u64 = 1000;

/// Half the time Redis keeps a silent writer's heartbeat and count
/// (`BEATS_KEEP_MS` in store.lua): the rest covers clocks that differ
/// between processes.
const COUNT_KEPT_MS: u64 = 300_000;

/// The task that renews a writer's lease and watches for lost data.
pub(crate) struct Heartbeat {
    pub(crate) conn: Conn,
    pub(crate) script: redis::Script,
    pub(crate) prefix: String,
    pub(crate) publish: &'static str,
    pub(crate) writer: String,
    pub(crate) lease: Duration,
    pub(crate) outcome_hold: Duration,
    pub(crate) hold: Arc<Hold>,
    pub(crate) watch: Arc<Watch>,
}

impl Heartbeat {
    /// Renews the lease and compares what this process acknowledged with
    /// what Redis holds, in a second heartbeat when Redis asks for one.
    /// Returns whether a loss record is open.
    pub(crate) async fn once(&self) -> Result<bool> {
        let (open, recounting) = self.beat().await?;
        if !recounting {
            return Ok(open);
        }
        // Redis set its count of this writer's ops aside (it was behind):
        // counted again now, from reads after it did (see `heartbeat` in
        // store.lua); what both beats count is what runs in between.
        match self.beat().await {
            Ok((open, _)) => Ok(open),
            Err(e) => {
                // Tried again after the usual short wait, not a third of a
                // lease later.
                self.watch.wake.notify_one();
                Err(e)
            }
        }
    }

    /// One heartbeat: whether a loss record is open, and whether Redis set
    /// this writer's count aside to be counted again.
    async fn beat(&self) -> Result<(bool, bool)> {
        let _beat = self.watch.beat_lock.lock().await;
        if self.watch.released.load(Ordering::Acquire) {
            return Ok((false, false));
        }
        let at = now_ms();
        let epoch = self.watch.epoch();
        let acked = self.watch.acked.load(Ordering::Relaxed);
        // In this order: a reply counted in between is counted twice (a
        // count above the writer's only weakens the comparison), never
        // missed.
        let unanswered = self.watch.unanswered.load(Ordering::SeqCst);
        let pushed = self.watch.pushed.load(Ordering::SeqCst);
        let mut a = Args::new("heartbeat", self.publish);
        a.push(at)
            .push(&self.writer)
            .push(self.lease.as_millis() as u64)
            .push(&epoch)
            .push(acked)
            .push(self.hold.term())
            .push(self.outcome_hold.as_millis() as u64)
            .push(pushed)
            .push(u8::from(self.counted_in_redis(at)))
            .push(pushed.saturating_add(unanswered))
            .push(self.watch.beats_sent.fetch_add(1, Ordering::Relaxed) + 1);
        // Cleared only once the quiet time and the reconnect are recorded
        // (below): cleared before this call, it let a check through while
        // the call was under way, with neither set yet. A connection that
        // drops meanwhile adds to `resets` and keeps it set.
        let dropped = self.watch.dropped.load(Ordering::Acquire);
        let resets = self.watch.resets.load(Ordering::Acquire);
        let v = items(invoke(&self.conn, &self.script, &self.prefix, &a).await?)?;
        let term = v.get(5).map_or(Ok(0), int)?.max(0) as u64;
        self.hold.renewed(at, term, &self.writer);
        self.watch.beat_ok_at.store(at, Ordering::Release);
        if dropped {
            let quiet = self.lease.as_millis() as u64 / 3 + QUIET_MARGIN_MS;
            self.watch
                .quiet_until
                .store(now_ms() + quiet, Ordering::Release);
            self.watch
                .reconnected_at
                .store(at.max(1), Ordering::Release);
            if self.watch.resets.load(Ordering::Acquire) == resets {
                self.watch.dropped.store(false, Ordering::Release);
            }
        }
        if v.first().map_or(Ok(1), int)? == 0 {
            tracing::warn!(
                writer = %self.writer,
                "this process's Redis lease had ended (it was paused or cut off from Redis for longer than redis.writer_lease); \
                 renewed before another writer took over what it held"
            );
        }
        let now_epoch = text(v.get(1).unwrap_or(&Value::Nil))?;
        let seq = v.get(2).map_or(Ok(0), int)?.max(0) as u64;
        let open = v.get(3).map_or(Ok(0), int)? == 1;
        let lost_now = v.get(4).map_or(Ok(0), int)? == 1;
        if lost_now {
            tracing::error!(
                prefix = %self.prefix,
                acked,
                seq,
                "Redis lost acknowledged ops (this process had acknowledged up to sequence number {acked}; Redis now holds {seq}): \
                 checks fail closed until an operator runs `fga-wb loss --ack`"
            );
            metrics::counter!("fga_wb_redis_losses_total").increment(1);
        }
        self.watch.saw(&now_epoch, seq, lost_now);
        Ok((open, v.get(6).map_or(Ok(0), int)? == 1))
    }

    /// Whether Redis cannot have forgotten this writer's count of the ops
    /// its pushes accepted: its last heartbeat succeeded (or the store
    /// connected) well within the ten minutes after which another writer's
    /// heartbeat prunes it (see `heartbeat` in store.lua). A count missing
    /// then was lost with them.
    fn counted_in_redis(&self, now: u64) -> bool {
        let last = self.watch.beat_ok_at.load(Ordering::Acquire);
        now.saturating_sub(last) < COUNT_KEPT_MS
    }

    /// Renews the lease a third of the way through, and at once when a
    /// connection dropped, until the store is dropped, released, or its
    /// application's flusher has ended.
    pub(crate) async fn run(self) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.lease / 3) => {}
                _ = self.watch.wake.notified() => {}
            }
            if let Err(e) = self.once().await {
                tracing::warn!(error = %e, "cannot renew the Redis lease; retrying");
                // A dropped connection wakes this task again at once; do
                // not spin while Redis is away.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
