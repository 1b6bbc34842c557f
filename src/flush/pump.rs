//! The pump: plans what is due, takes windows of ops sorted by key, keeps
//! requests in flight, and answers `flush()` waiters.

use super::*;

/// A `flush()` (or shutdown) waiting for everything acknowledged up to
/// `up_to` to be written.
pub(crate) struct Waiter {
    pub(crate) up_to: u64,
    pub(crate) reply: oneshot::Sender<FlushReport>,
    /// The pump's totals when it started.
    pub(crate) start: FlushReport,
    pub(crate) started: Instant,
}

/// What a running chunk holds: the lowest `first` among its ops, and (for a
/// shared store) its ops' keys, hashed (see `key_hash`), which a look for
/// strays leaves alone.
pub(crate) struct Held {
    pub(crate) first: u64,
    pub(crate) keys: Vec<u64>,
}

/// A tuple's key as its parts, in the order windows are sorted by.
fn key(t: &crate::tuple::TupleKey) -> (&str, &str, &str) {
    (&t.object, &t.relation, &t.user)
}

/// A key's hash, from its parts (`object`, `#`, `relation`, `@`, `user`):
/// no string built per op. Keys that collide are both taken as held, which
/// only leaves a stray for a later look.
fn key_hash(parts: &[&str]) -> u64 {
    use std::hash::Hasher;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        h.write(p.as_bytes());
    }
    h.finish()
}

fn tuple_hash(t: &crate::tuple::TupleKey) -> u64 {
    key_hash(&[&t.object, "#", &t.relation, "@", &t.user])
}

/// The hash of a key as stored (`key_of`): the object has no `#` and the
/// relation no `@`, so the first of each ends them.
fn member_hash(k: &str) -> Option<u64> {
    let (object, rest) = k.split_once('#')?;
    let (relation, user) = rest.split_once('@')?;
    Some(key_hash(&[object, "#", relation, "@", user]))
}

/// Adds one `k` to a multiset.
pub(crate) fn add_one<K: Ord>(set: &mut BTreeMap<K, usize>, k: K) {
    *set.entry(k).or_default() += 1;
}

/// Removes one `k` from a multiset.
pub(crate) fn remove_one<K: Ord>(set: &mut BTreeMap<K, usize>, k: K) {
    if let std::collections::btree_map::Entry::Occupied(mut n) = set.entry(k) {
        *n.get_mut() -= 1;
        if *n.get() == 0 {
            n.remove();
        }
    }
}

/// A running chunk's result, and what it held.
pub(crate) type Running = FuturesUnordered<BoxFuture<'static, (ChunkResult, Held)>>;

/// The flusher task's state.
pub(crate) struct Pump {
    pub(crate) engine: Arc<Engine>,
    pub(crate) automatic: bool,
    pub(crate) running: Running,
    /// Running chunks whose requests have not ended yet: the limit counts
    /// these, not chunks recording their outcomes in the store (a Redis
    /// round trip the server does not wait on).
    pub(crate) writing: Arc<AtomicUsize>,
    /// A chunk's requests ended: its slot is free for another.
    pub(crate) freed: Arc<Notify>,
    /// `first` of each running chunk's oldest op (a multiset).
    pub(crate) running_firsts: BTreeMap<u64, usize>,
    /// Keys of the running chunks' ops, hashed (a multiset: a key's chunk
    /// may end and the key be taken again before the pump hears of it).
    pub(crate) running_keys: BTreeMap<u64, usize>,
    /// The store's count of failed calls when last seen: a new one may
    /// have left strays, so waiters wait for a look after it.
    pub(crate) unsure_seen: u64,
    /// Taken ops sorted by key, not yet sent.
    pub(crate) staged: VecDeque<Taken>,
    /// The next window being taken, while the staged ops are sent.
    pub(crate) taking: Option<BoxFuture<'static, Window>>,
    /// The tail of an object held back for the next window, where more of
    /// its ops are due: merged with them, it fills whole chunks.
    pub(crate) carry: Vec<Taken>,
    /// How many times each staged op (by seq) was held back, and when it
    /// first was: at most `MAX_CARRIES` times within one flush, so a lone
    /// partial group waits a few windows at most (holding on its own, for
    /// at most `flush.interval` from the first time). Kept while the op is
    /// staged again, not only while held: windows are staged before the
    /// last one's tail is cut, and a count kept only for held ops started
    /// again at each, so an object sorting last was held for as long as
    /// the backlog lasted.
    pub(crate) carried: std::collections::HashMap<u64, (u8, Instant)>,
    /// Since when ops have been held back without a pause: while flushing
    /// on its own, the pump waits up to `flush.interval` from then for the
    /// next window rather than writing them as partial chunks.
    pub(crate) carry_since: Option<Instant>,
    /// Whether partial groups may be held back at all: only where held ops
    /// survive a crash (the Redis store). The memory store writes them at
    /// once, so what a crash loses stays as documented.
    pub(crate) may_carry: bool,
    /// The last flush the pump started on its own was for a full batch
    /// (not for age): while so, partial groups may wait for the next window.
    pub(crate) by_size: bool,
    /// Ops up to here are waited for (a caller blocked on a full buffer, a
    /// check on a grant): never held back.
    pub(crate) urgent: u64,
    /// Everything with `first <= target` is due; revokes up to
    /// `revoke_target` too.
    pub(crate) target: u64,
    pub(crate) revoke_target: u64,
    /// Windows are taken by sequence range: the end of the last one.
    pub(crate) cursor: u64,
    /// The last look found a full batch pending: callers are outpacing the
    /// writes, so each window also takes what arrived since (see
    /// `take_window`).
    pub(crate) backlog: bool,
    /// Ops up to the waiters' targets that wait behind another writer.
    pub(crate) blocked: u64,
    /// A take found nothing due up to this target: don't ask again until
    /// something changes.
    pub(crate) exhausted: Option<u64>,
    pub(crate) revokes_exhausted: Option<u64>,
    /// How many times `exhausted` was forgotten (something may have made
    /// ops ready), and that count when the window being taken began: a
    /// window that began before a change and comes back empty says
    /// nothing of what is due after it (its take may have run in Redis
    /// before a finish that made an op ready, both answered before the
    /// pump looked).
    pub(crate) changes: u64,
    pub(crate) taking_since: u64,
    /// When the store last told `settle_quiet` that ops are pending.
    pub(crate) quiet_looked: Option<Instant>,
    /// When overdue ops last made the pump look again despite `exhausted`.
    pub(crate) relooked: Option<Instant>,
    pub(crate) waiters: Vec<Waiter>,
    /// What the pump did since it started.
    pub(crate) totals: FlushReport,
    /// When the triggers were last looked at, and whether something asks
    /// to look again now (a wake, a command, a timer).
    pub(crate) planned_at: Option<Instant>,
    pub(crate) replan: bool,
    pub(crate) due: Option<Instant>,
    pub(crate) limit: Limit,
    /// After a chunk gave up on a transient error: no new request before this.
    pub(crate) paused_until: Option<Instant>,
    /// The end of a pause OpenFGA asked for (`Retry-After`): a flush()
    /// meanwhile is answered at once with the error, sending nothing (it
    /// cuts a backoff short, not this).
    pub(crate) asked_pause: Option<Instant>,
    /// With flushing stopped (refused credentials, unknown store): when to
    /// ask OpenFGA again by writing, unasked (an OAuth2 token, a key or a
    /// store fixed since may work by then).
    pub(crate) stop_look_at: Option<Instant>,
    /// Of `running`, the ops waiting out a request whose outcome is
    /// unknown (see `hold`): no requests, so neither a slot nor a reason
    /// to leave new ops unlooked at.
    pub(crate) holds: usize,
    pub(crate) backoff: ExponentialBackoff,
    /// An error seen since the last report to a waiter, for its report.
    pub(crate) last_error: Option<String>,
    /// Requests, ops applied and dead-lettered since the last record.
    pub(crate) unrecorded: FlushReport,
    /// The current pause is long and OpenFGA's doing: staged ops go back
    /// to pending meanwhile.
    pub(crate) park_while_paused: bool,
    /// When the first request since the last record started: the wall
    /// time a record covers (its requests' reports carry none).
    pub(crate) busy_since: Option<Instant>,
    /// When the store was last asked for what it names this writer as
    /// holding that the pump does not hold (see `give_back_strays`), when
    /// a look that got an answer began, when a look was last asked for (a
    /// flush(), shutdown, or a failed call), and when a call of this writer
    /// last failed (it may have left strays: every waiter then needs a
    /// look after it).
    pub(crate) strays_looked: Option<Instant>,
    pub(crate) strays_answered: Option<Instant>,
    pub(crate) strays_wanted: Option<Instant>,
    pub(crate) strays_unsure: Option<Instant>,
    pub(crate) shutdown: Option<Instant>,
}

impl Pump {
    pub(crate) fn new(engine: Arc<Engine>, automatic: bool) -> Pump {
        let limit = Limit::new(&engine.cfg);
        let backoff = pause_backoff(&engine.cfg);
        engine.parallel.store(limit.get(), Ordering::Relaxed);
        let may_carry = engine.store.shared();
        Pump {
            engine,
            automatic,
            running: FuturesUnordered::new(),
            writing: Arc::new(AtomicUsize::new(0)),
            freed: Arc::new(Notify::new()),
            running_firsts: BTreeMap::new(),
            running_keys: BTreeMap::new(),
            unsure_seen: 0,
            staged: VecDeque::new(),
            taking: None,
            carry: Vec::new(),
            carried: Default::default(),
            carry_since: None,
            urgent: 0,
            may_carry,
            by_size: false,
            target: 0,
            revoke_target: 0,
            cursor: 0,
            backlog: false,
            blocked: 0,
            exhausted: None,
            revokes_exhausted: None,
            changes: 0,
            taking_since: 0,
            quiet_looked: None,
            relooked: None,
            waiters: Vec::new(),
            totals: FlushReport::default(),
            planned_at: None,
            replan: true,
            due: None,
            limit,
            paused_until: None,
            asked_pause: None,
            stop_look_at: None,
            holds: 0,
            backoff,
            last_error: None,
            unrecorded: FlushReport::default(),
            busy_since: None,
            park_while_paused: false,
            strays_looked: None,
            strays_wanted: None,
            strays_unsure: None,
            strays_answered: None,
            shutdown: None,
        }
    }

    /// Looks at the triggers when it may matter: while requests run and
    /// the target is not reached, at most every `PLAN_EVERY` (for the Redis
    /// store each look is a round trip).
    pub(crate) async fn maybe_plan(&mut self) -> Option<Instant> {
        self.note_unsure();
        let busy = self.chunks_running() > 0 && self.exhausted != Some(self.target);
        let recent = self.planned_at.is_some_and(|t| t.elapsed() < PLAN_EVERY);
        if self.replan || !busy || !recent {
            self.replan = false;
            self.planned_at = Some(Instant::now());
            self.due = self.plan().await;
        }
        self.due
    }

    /// Raises the targets as the triggers say; returns when to look again.
    pub(crate) async fn plan(&mut self) -> Option<Instant> {
        let engine = self.engine.clone();
        let e = &engine;
        let cfg = &e.cfg;
        let now = Instant::now();
        let explicit = self.explicit();
        if !explicit && !self.automatic {
            return None;
        }
        if !explicit && e.stats.stopped().is_some() && !self.looking_past_stop() {
            // An explicit flush() tries again at once after an auth
            // failure; the pump itself at its look.
            return self.stop_look_at;
        }
        let pending = match e.store.pending().await {
            Ok(p) => {
                // At every look, not only after work of this process's: on
                // a shared store another process may have written it all
                // (or a clear dropped it), and a gauge left at its last
                // backlog would show one that is gone, to an alert too.
                publish_pending(&p);
                p
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the pending ops");
                // A flush() waits for a look, tried whatever Redis answers.
                self.give_back_strays().await;
                return Some(now + cfg.interval.max(Duration::from_millis(100)));
            }
        };
        // Taken once, before anything is judged by them: one set after
        // this (a check waiting for a grant, a caller waiting for room)
        // stays set for the look its wake brings. Cleared at the end of the
        // look instead, one set in between was dropped unseen, and the
        // check waited out its timeout.
        let flush_wanted = e.flush_wanted.swap(false, Ordering::Relaxed);
        let revoke_wanted = e.revoke_wanted.swap(false, Ordering::Relaxed);
        let last = || async {
            match e.store.last_seq().await {
                Ok(s) => Some(s),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the sequence number");
                    None
                }
            }
        };
        if pending.in_flight == 0 {
            // Nothing is held by anyone: nothing is stray.
            self.strays_looked = Some(now);
            self.strays_answered = Some(now);
        } else {
            self.give_back_strays().await;
        }
        let mut next = None;
        // A shutdown drains what this process acknowledged (its target was
        // set when it began): ops others acknowledge meanwhile are theirs
        // to flush, and chasing them can run the shutdown to its deadline.
        let automatic = self.automatic && self.shutdown.is_none();
        self.backlog = automatic && pending.total >= cfg.batch_size;
        if pending.total == 0 {
            // Ops held by jobs or by other processes come back here if their
            // holder dies; look again now and then.
            if pending.in_flight > 0 && e.store.shared() && self.chunks_running() == 0 {
                next = Some(now + cfg.interval.max(Duration::from_secs(1)));
            }
        } else if !automatic {
            // Only what flush() and shutdown asked for (their targets are
            // raised below and by the command).
        } else if pending.total >= cfg.batch_size
            || flush_wanted
            || pending.oldest_age.is_some_and(|a| a >= cfg.interval)
        {
            // Only a flush for a full batch may hold ops back for fuller
            // chunks: ops due by age go out as they are.
            self.by_size = pending.total >= cfg.batch_size
                && !flush_wanted
                && pending.oldest_age.is_none_or(|a| a < cfg.interval);
            if let Some(s) = last().await {
                self.raise(s);
            }
            // Overdue ops, yet this process found none ready: others may
            // have made some ready again without a word reaching it (a lost
            // subscription). It looks again, once an interval.
            if e.store.shared()
                && self.chunks_running() == 0
                && self.exhausted.is_some_and(|t| t >= self.target)
            {
                let again = self.relooked.map_or(now, |t| t + cfg.interval);
                if again <= now {
                    self.relooked = Some(now);
                    self.forget_exhausted();
                    self.revokes_exhausted = None;
                } else {
                    next = Some(again);
                }
            }
        } else if let Some(age) = pending.oldest_age {
            next = Some(now + cfg.interval.saturating_sub(age));
        }
        if automatic && pending.deletes > 0 && (cfg.eager_revokes || revoke_wanted) {
            if let Some(s) = last().await {
                if s > self.revoke_target {
                    self.revoke_target = s;
                    self.revokes_exhausted = None;
                }
            }
        }
        if flush_wanted || revoke_wanted {
            // A caller waits for room, or a check for a grant or a revoke
            // (which may wait behind a grant of its tuple held back):
            // nothing up to here is held back for a fuller chunk.
            if let Some(s) = last().await {
                self.urgent = self.urgent.max(s);
            }
        }
        if e.others_finished.swap(false, Ordering::Relaxed) {
            self.forget_exhausted();
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
                // Writes of other processes end within their timeout (or
                // their hold, when the outcome is unknown) and a dead
                // writer's a hold after its lease: a flush does not wait
                // longer than that (with the default lease).
                let blocked_wait = BLOCKED_WAIT + cfg.unknown_outcome_hold;
                let (late, waiting): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
                    .into_iter()
                    .partition(|w| w.started.elapsed() > blocked_wait);
                self.waiters = waiting;
                for w in late {
                    let mut r = self.report_since(&w);
                    r.error = Some(format!(
                        "{} ops still wait behind writes by other processes after {blocked_wait:?}; they are written when those end",
                        self.blocked
                    ));
                    let _ = w.reply.send(r);
                }
            }
        }
        if let Some(looked) = self.strays_looked {
            // A look failed and a shutdown (or a flush() since) waits for
            // one: try again then, whatever else wakes the pump.
            let failed = self.last_look_failed();
            // A take under way wakes the pump when it ends; the look
            // follows it.
            let waiting = self.shutdown.is_some() || !self.waiters.is_empty();
            if failed && waiting && self.taking.is_none() {
                let retry = (looked + STRAY_RETRY).max(now + Duration::from_millis(100));
                next = Some(next.map_or(retry, |n: Instant| n.min(retry)));
            }
        }
        match (next, self.paused_until) {
            (n, Some(p)) if p > now => Some(n.map_or(p, |n| n.min(p))),
            (n, _) => n,
        }
    }

    /// Whatever a shared store names this writer as holding that the pump
    /// does not hold (not staged, held back or in a running chunk, with no
    /// take under way) is stray: a take whose reply was lost, a finish that
    /// never got through. Given back to pending, it is written like any
    /// other op. Asked at most every `STRAY_EVERY`, and at the first chance
    /// after each `flush()` and shutdown, which wait for that look; after a
    /// look that failed, every `STRAY_RETRY`.
    async fn give_back_strays(&mut self) {
        let e = self.engine.clone();
        let due = self.strays_looked.is_none_or(|l| {
            l.elapsed() >= STRAY_EVERY
                || self.strays_wanted.is_some_and(|w| w > l)
                || (self.last_look_failed() && l.elapsed() >= STRAY_RETRY)
        });
        if !e.store.shared() || self.taking.is_some() || !due {
            return;
        }
        let start = Instant::now();
        self.strays_looked = Some(start);
        // Keys of holds that shutdown cut short stay held with no chunk
        // running (see `done`).
        let nothing = self.running.is_empty()
            && self.running_keys.is_empty()
            && self.staged.is_empty()
            && self.carry.is_empty();
        let staged: std::collections::HashSet<u64> = self
            .staged
            .iter()
            .chain(&self.carry)
            .map(|t| tuple_hash(&t.tuple))
            .collect();
        let running = &self.running_keys;
        // A member that is not a key a take of this writer made is not held.
        let held = |k: &str| {
            member_hash(k).is_some_and(|h| staged.contains(&h) || running.contains_key(&h))
        };
        let held: Option<&(dyn Fn(&str) -> bool + Sync)> = (!nothing).then_some(&held);
        let looked = e.store.give_back_strays(held).await;
        if looked.is_ok() {
            self.strays_answered = Some(start);
        }
        match looked {
            Ok((0, _)) => {}
            Ok((ops, _)) => {
                tracing::warn!(ops, "gave back ops Redis named this process as writing though it was not (a reply lost on the way); they are pending again");
                self.forget_exhausted();
                self.revokes_exhausted = None;
                self.replan = true;
            }
            // Not looked: what a lost reply left may still be out, so a
            // flush() waiting for the look reports that rather than
            // success (or waits for Redis). Shutdown tries until its
            // deadline; its release hands back whatever is left.
            Err(err) => {
                tracing::warn!(error = %err, "cannot look for ops this process holds in Redis without knowing");
                let msg = format!(
                    "cannot look in Redis for ops it names this process as writing after a reply was lost ({err}); they may not be written yet: they are, after the next look (flush again)"
                );
                // What a shutdown that ends without the look reports.
                self.last_error = Some(msg.clone());
                if self.shutdown.is_none() {
                    // Those that had their look before this one go on.
                    let (failed, wait): (Vec<Waiter>, Vec<Waiter>) =
                        std::mem::take(&mut self.waiters)
                            .into_iter()
                            .partition(|w| !self.strays_seen_since(w.started));
                    self.waiters = wait;
                    for w in failed {
                        let mut r = self.report_since(&w);
                        r.error = Some(msg.clone());
                        let _ = w.reply.send(r);
                    }
                }
            }
        }
    }

    /// Whether the last look for strays got no answer.
    fn last_look_failed(&self) -> bool {
        self.strays_looked
            .is_some_and(|l| self.strays_answered.is_none_or(|a| a < l))
    }

    /// A take or finish failed since the last time: it may have run with
    /// its reply lost, so a look for strays is wanted, at once.
    pub(crate) fn note_unsure(&mut self) {
        let unsure = self.engine.store.unsure_calls();
        if unsure != self.unsure_seen {
            self.unsure_seen = unsure;
            self.strays_wanted = Some(Instant::now());
            self.strays_unsure = self.strays_wanted;
            self.replan = true;
        }
    }

    /// Whether the store was asked for strays since `t`, and since the
    /// last call that may have left some (always, for a store no other
    /// process shares: it has none).
    pub(crate) fn strays_seen_since(&self, t: Instant) -> bool {
        !self.engine.store.shared()
            || self
                .strays_answered
                .is_some_and(|l| l >= t && self.strays_unsure.is_none_or(|u| l >= u))
    }

    pub(crate) fn raise(&mut self, to: u64) {
        if to > self.target {
            self.target = to;
            // Not a change (see `changes`): `exhausted` names its target.
            self.exhausted = None;
        }
    }

    pub(crate) fn paused(&self) -> bool {
        self.paused_until.is_some_and(|p| Instant::now() < p)
    }

    /// Someone asked: `flush()` or shutdown.
    pub(crate) fn explicit(&self) -> bool {
        !self.waiters.is_empty() || self.shutdown.is_some()
    }

    /// Whether new requests may start: not paused after a failure, and not
    /// stopped by refused credentials (unless someone asked).
    pub(crate) fn may_write(&self) -> bool {
        let past_deadline = self.shutdown.is_some_and(|d| Instant::now() >= d);
        !self.paused()
            && !past_deadline
            && (self.explicit()
                || self.engine.stats.stopped().is_none()
                || self.looking_past_stop())
    }

    /// Running chunks that are writing or recording what they wrote (not
    /// ops waiting out a hold).
    pub(crate) fn chunks_running(&self) -> usize {
        self.running.len() - self.holds
    }

    /// Flushing stopped, and it is time to ask OpenFGA again.
    fn looking_past_stop(&self) -> bool {
        self.stop_look_at.is_some_and(|t| Instant::now() >= t)
    }

    /// Starts chunks while the limit allows and something is due.
    pub(crate) async fn fill(&mut self) {
        self.hand_back_revoked();
        let chunk = self.engine.max_tuples();
        while self.slot_free() && self.may_write() {
            // Revokes behind a window of grants go ahead of it in a chunk of
            // their own: a check may be waiting for them.
            if self.revokes_due()
                && (!self.staged.is_empty() || self.exhausted == Some(self.target))
            {
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
            let ahead = chunk * self.limit.get() * TAKE_AHEAD_ROUNDS;
            if due && self.taking.is_none() && self.staged.len() < ahead {
                self.taking_since = self.changes;
                self.taking = Some(Box::pin(take_window(
                    self.engine.clone(),
                    self.cursor,
                    self.target,
                    chunk * WINDOW_CHUNKS,
                    self.backlog,
                )));
            }
            if self.staged.is_empty() {
                if self.taking.is_some() {
                    return;
                }
                // Looked at again: the take above may have found none (the
                // revoke waits behind a grant of its tuple held back, say),
                // and the held-back ops below are then what is due.
                if self.revokes_due() {
                    match self
                        .take(chunk * WINDOW_CHUNKS, Take::Revokes, self.revoke_target)
                        .await
                    {
                        Some(ops) if ops.is_empty() => {
                            self.revokes_exhausted = Some(self.revoke_target);
                        }
                        Some(ops) => self.stage(ops),
                        None => return,
                    }
                }
                if self.staged.is_empty() {
                    // Only held-back ops are left, if any: they wait while
                    // more of their objects may come with the next window
                    // (the ops arrive interleaved from many callers).
                    if self.carry.is_empty() || self.carry_deadline().is_some() {
                        return;
                    }
                    self.stage(Vec::new());
                }
            }
            let n = self.next_cut(chunk);
            if self.should_carry(n, chunk) {
                self.hold_back(n);
                continue;
            }
            let ops: Vec<Taken> = self.staged.drain(..n).collect();
            self.start(ops);
        }
    }

    /// Grants taken and not sent yet (staged or held back) of tuples
    /// revoked since: handed back, so the store drops them as superseded
    /// and the revokes, which waited behind them, are ready once that is
    /// done. Under a backlog a window holds thousands of ops and is sent in
    /// key order: such a revoke waited until its grant's turn came, and a
    /// check that needs it failed closed meanwhile. (Only this process's
    /// revokes are noted; another's waits behind the grant as before.)
    fn hand_back_revoked(&mut self) {
        let notes = self.engine.take_revoked();
        if notes.is_empty() {
            return;
        }
        // By key, the newest revoke noted: only grants older than it are
        // superseded (a grant pushed after it is the application's last
        // word, and would only go back to pending).
        let mut revoked: std::collections::HashMap<_, u64> = std::collections::HashMap::new();
        for (t, seq) in &notes {
            let newest = revoked.entry(key(t)).or_default();
            *newest = (*newest).max(*seq);
        }
        let is_revoked = |t: &Taken| {
            t.op == Op::Grant && revoked.get(&key(&t.tuple)).is_some_and(|&r| t.seq < r)
        };
        let (gone, staged): (VecDeque<Taken>, VecDeque<Taken>) = std::mem::take(&mut self.staged)
            .into_iter()
            .partition(is_revoked);
        self.staged = staged;
        let (gone_carried, carry): (Vec<Taken>, Vec<Taken>) = std::mem::take(&mut self.carry)
            .into_iter()
            .partition(is_revoked);
        self.carry = carry;
        let back: Vec<Taken> = gone.into_iter().chain(gone_carried).collect();
        // A window being taken may bring the grant of a revoke noted now:
        // looked for again once it is staged.
        if self.taking.is_some() {
            let matched: std::collections::HashSet<_> =
                back.iter().map(|t| key(&t.tuple)).collect();
            let unmatched = notes.iter().filter(|(r, _)| !matched.contains(&key(r)));
            self.engine.note_revokes(unmatched.cloned());
        }
        // See `done`, which makes the revokes takeable.
        self.give_back(back);
    }

    /// Gives taken ops back to the store as pending again, recorded as a
    /// chunk with no request, in `running`: a finish that Redis fails is
    /// repeated for a while (up to minutes), and the pump goes on
    /// meanwhile, answering shutdown and flushes and polling the Writes
    /// under way.
    fn give_back(&mut self, back: Vec<Taken>) {
        if back.is_empty() {
            return;
        }
        let held = self.track(&back);
        let engine = self.engine.clone();
        self.running.push(Box::pin(async move {
            let mut result = ChunkResult::new(0);
            result.given_back = true;
            result.outcomes = back.into_iter().map(|t| (t, Outcome::Retry)).collect();
            finish_chunk(&engine, &mut result).await;
            (result, held)
        }));
    }

    /// Revokes up to the revoke target may be ready, as far as the last
    /// take of them knows.
    fn revokes_due(&self) -> bool {
        self.revoke_target > 0 && self.revokes_exhausted != Some(self.revoke_target)
    }

    /// Whether another chunk may start: fewer than the limit are writing,
    /// and the chunks still recording their outcomes are not piling up (a
    /// slow store holds them back).
    fn slot_free(&self) -> bool {
        let limit = self.limit.get();
        // Holds need no slot, but each is a request that failed: past a
        // few rounds of them, new chunks wait too.
        self.writing.load(Ordering::Relaxed) < limit
            && self.chunks_running() < 2 * limit
            && self.holds < 2 * self.engine.cfg.max_parallel_requests
    }

    /// Whether to hold back the next `n` staged ops for the next window:
    /// they are a partial chunk of one object, the last of it staged, more
    /// of the object may come (more windows are due, or the pump flushes on
    /// its own and may wait for the next one), and they were not held back
    /// `MAX_CARRIES` times already (flushing on its own: for less than
    /// `flush.interval`, however many windows that is).
    pub(crate) fn should_carry(&self, n: usize, chunk: usize) -> bool {
        let hold = self.holding();
        // Small groups too (a caller's first ops on its next object, say):
        // cut now, next to a large group, each would be a request of a few
        // tuples, and the rest of its object a request of nearly a chunk.
        let more = self.cursor < self.target || hold;
        if n >= chunk || !more {
            return false;
        }
        let object = &self.staged[0].tuple.object;
        let whole = self.staged.get(n).is_none_or(|t| &t.tuple.object != object);
        let now = Instant::now();
        let interval = self.engine.cfg.interval;
        // Never a revoke or a grant with a condition (a check may be waiting
        // for it), nor an op a caller or a check waits for.
        let fresh = self.staged.range(..n).all(|t| {
            t.op == Op::Grant
                && t.tuple.condition.is_none()
                && t.first > self.urgent
                && self
                    .carried
                    .get(&t.seq)
                    .is_none_or(|&(n, since)| match hold {
                        true => now < since + interval,
                        false => n < MAX_CARRIES,
                    })
        });
        whole && fresh
    }

    /// Whether held-back ops may wait for a later window: only with a store
    /// that keeps them through a crash, while the pump flushes on its own
    /// for full batches (nobody waits on a `flush()` or shutdown, nothing is
    /// due by age) and writes.
    fn may_hold(&self) -> bool {
        self.automatic
            && self.may_carry
            && self.by_size
            && !self.explicit()
            && self.engine.stats.stopped().is_none()
    }

    /// Holds the next `n` staged ops back for the next window. Their first
    /// hold is remembered (see `carried`), and `carry_since` goes back to
    /// the earliest first hold of what is held: an op held before, staged
    /// again and held again waits for no new `flush.interval`.
    pub(crate) fn hold_back(&mut self, n: usize) {
        let now = Instant::now();
        let mut first = now;
        for t in self.staged.range(..n) {
            first = first.min(self.carried.entry(t.seq).or_insert((0, now)).1);
        }
        self.carry.extend(self.staged.drain(..n));
        self.carry_since = Some(self.carry_since.map_or(first, |s| s.min(first)));
    }

    /// Whether ops may be held back now: as `may_hold`, and for up to
    /// `flush.interval` since holding began, however many windows that
    /// spans (small ones, when the writes are quick); then they are written.
    fn holding(&self) -> bool {
        self.may_hold()
            && self
                .carry_since
                .is_none_or(|s| Instant::now() < s + self.engine.cfg.interval)
    }

    /// Until when held-back ops wait for the next window, if they do: at
    /// most `flush.interval` after they were first held back.
    pub(crate) fn carry_deadline(&self) -> Option<Instant> {
        let until = self.carry_since? + self.engine.cfg.interval;
        let waited_for = self.carry.iter().any(|t| t.first <= self.urgent);
        (self.holding() && !self.carry.is_empty() && !waited_for).then_some(until)
    }

    /// How many staged ops the next chunk takes: one object's ops where it
    /// has enough of them, small objects together. OpenFGA on PostgreSQL
    /// writes a chunk of one object (or of many objects with one tuple
    /// each) several times faster than one mixing a few objects with many
    /// tuples each (its row-constructor lookup then scans), so a chunk
    /// never straddles a large group.
    pub(crate) fn next_cut(&self, chunk: usize) -> usize {
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
            return self.within_bytes(first);
        }
        let mut n = first;
        while n < self.staged.len() && n < chunk {
            let g = run_at(n);
            if g >= big || n + g > chunk {
                break;
            }
            n += g;
        }
        self.within_bytes(n)
    }

    /// Of the next `n` staged ops, as many as fit in [`REQUEST_BYTES`], at least one: tuples
    /// with large condition contexts would make a request OpenFGA refuses
    /// for its size (it is split then, at the cost of a refused request).
    fn within_bytes(&self, n: usize) -> usize {
        let mut bytes = 0;
        for (i, t) in self.staged.range(..n).enumerate() {
            bytes += request_bytes(&t.tuple);
            if bytes > REQUEST_BYTES && i > 0 {
                return i;
            }
        }
        n
    }

    /// Something may have made ops ready: takes are worth asking again.
    pub(crate) fn forget_exhausted(&mut self) {
        self.exhausted = None;
        self.changes += 1;
    }

    /// A window was taken.
    pub(crate) fn taken(&mut self, w: Window) {
        self.taking = None;
        self.report_dead_on_take();
        self.raise(w.target);
        self.cursor = self.cursor.max(w.cursor);
        match w.result {
            Ok(ops) if ops.is_empty() => {
                if w.cursor >= w.target
                    && w.target >= self.target
                    && self.taking_since == self.changes
                {
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

    pub(crate) fn stage(&mut self, mut ops: Vec<Taken>) {
        let before = std::mem::take(&mut self.carried);
        // Held back before and not cut yet: staged still, or held again.
        if !before.is_empty() {
            for t in &self.staged {
                if let Some(&c) = before.get(&t.seq) {
                    self.carried.insert(t.seq, c);
                }
            }
        }
        let now = Instant::now();
        for t in &self.carry {
            let (n, since) = before.get(&t.seq).copied().unwrap_or((0, now));
            self.carried.insert(t.seq, (n.saturating_add(1), since));
        }
        ops.append(&mut self.carry);
        // Key order: see the module docs.
        ops.sort_unstable_by(|a, b| key(&a.tuple).cmp(&key(&b.tuple)));
        self.staged.extend(ops);
    }

    /// Takes ops from the store; `None` after an error (logged, paused).
    pub(crate) async fn take(&mut self, max: usize, what: Take, up_to: u64) -> Option<Vec<Taken>> {
        let taken = self.engine.store.take(max, what, up_to).await;
        self.report_dead_on_take();
        match taken {
            Ok(ops) => Some(ops),
            Err(e) => {
                tracing::warn!(error = %e, "cannot take pending ops");
                self.give_up(Stop::Transient(e));
                None
            }
        }
    }

    /// Notes `ops` as a running chunk's (see `running_firsts`,
    /// `running_keys`); `done` forgets them.
    fn track(&mut self, ops: &[Taken]) -> Held {
        let first = ops.iter().map(|t| t.first).min().unwrap_or(0);
        add_one(&mut self.running_firsts, first);
        let keys: Vec<u64> = match self.may_carry {
            true => ops.iter().map(|t| tuple_hash(&t.tuple)).collect(),
            false => Vec::new(),
        };
        for &k in &keys {
            add_one(&mut self.running_keys, k);
        }
        Held { first, keys }
    }

    pub(crate) fn start(&mut self, ops: Vec<Taken>) {
        self.busy_since.get_or_insert_with(Instant::now);
        let held = self.track(&ops);
        let engine = self.engine.clone();
        let (writing, freed) = (self.writing.clone(), self.freed.clone());
        writing.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("fga_wb.chunk", ops = ops.len());
        self.running.push(Box::pin(
            async move {
                let mut result = engine.clone().send_chunk(ops).await;
                writing.fetch_sub(1, Ordering::Relaxed);
                freed.notify_one();
                // Its ops wait out their hold in flight (see `done`); the
                // pump learns of the failure now.
                if result.unsure_at.is_none() {
                    finish_chunk(&engine, &mut result).await;
                }
                (result, held)
            }
            .instrument(span),
        ));
    }

    /// Keeps the ops of a chunk whose request's outcome is unknown in
    /// flight until it can no longer land (see [`Engine::wait_out`]), then
    /// finishes them: a chunk of its own in `running`, with no requests,
    /// holding the keys meanwhile.
    fn hold(&mut self, at: Instant, outcomes: Vec<(Taken, Outcome)>, held: Held) {
        let engine = self.engine.clone();
        self.holds += 1;
        self.running.push(Box::pin(async move {
            let held_to_end = engine.wait_out(at, outcomes.len()).await;
            let mut result = ChunkResult::new(0);
            result.held_out = true;
            // Cut short by shutdown, a shared store's ops stay in flight:
            // this writer's kept lease hands them on when the hold ends.
            if held_to_end || !engine.store.shared() {
                result.outcomes = outcomes;
                finish_chunk(&engine, &mut result).await;
            } else {
                result.left_in_flight = true;
            }
            (result, held)
        }));
    }

    /// Adds the ops takes dead-lettered as they took them to the flush's
    /// report (the store counted them in its totals already).
    fn report_dead_on_take(&mut self) {
        let dead = self.engine.store.dead_on_take();
        if dead > 0 {
            self.absorb(&FlushReport {
                dead_lettered: dead,
                ..Default::default()
            });
        }
    }

    /// Adds what a chunk or a take ended to the flush's totals and to what
    /// is yet to be recorded (whose error is the pump's own, kept).
    fn absorb(&mut self, report: &FlushReport) {
        self.totals.absorb(report);
        let error = self.unrecorded.error.take();
        self.unrecorded.absorb(report);
        self.unrecorded.error = error;
    }

    /// Records a finished chunk.
    pub(crate) fn done(&mut self, mut result: ChunkResult, held: Held) {
        let first = held.first;
        if result.held_out {
            self.holds -= 1;
        }
        match result.unsure_at.take() {
            Some(at) => {
                let outcomes = std::mem::take(&mut result.outcomes);
                self.hold(at, outcomes, held);
            }
            None if result.left_in_flight => {}
            None => {
                remove_one(&mut self.running_firsts, held.first);
                for k in held.keys {
                    remove_one(&mut self.running_keys, k);
                }
            }
        }
        let e = self.engine.clone();
        self.limit
            .observe(&result.rtts, result.landed, result.congested);
        e.parallel.store(self.limit.get(), Ordering::Relaxed);
        let mut report = FlushReport {
            requests: result.requests,
            queued: result.queued,
            ..Default::default()
        };
        let mut stop = result.stop;
        match result.finished {
            Some(Ok(f)) => {
                e.account(&f, &mut report);
                if result.given_back {
                    report.retried = 0;
                }
            }
            Some(Err(err)) => {
                tracing::error!(error = %err, "could not record flush outcomes");
                stop.get_or_insert(Stop::Transient(err));
            }
            None => {}
        }
        // Something finished: keys it held may be ready again.
        self.forget_exhausted();
        self.revokes_exhausted = None;
        self.absorb(&report);
        match stop {
            Some(stop) => self.give_up_from(stop, Some(first)),
            None if report.requests > 0 || report.queued > 0 => {
                self.backoff = pause_backoff(&e.cfg);
                if e.stats.stopped().is_some() {
                    e.stats.set_stopped(None);
                }
                self.stop_look_at = None;
            }
            None => {}
        }
    }

    /// A take failed: pause new requests, and answer every waiter with
    /// the error.
    pub(crate) fn give_up(&mut self, stop: Stop) {
        self.give_up_from(stop, None);
    }

    /// A chunk whose oldest op is `first` stopped on an error (None: not a
    /// chunk's): pause new requests (or stop flushing), and answer the
    /// waiters its ops are among with it. A `flush()` of only older ops
    /// goes on: another tuple's failure says nothing of them.
    pub(crate) fn give_up_from(&mut self, stop: Stop, first: Option<u64>) {
        let e = &self.engine;
        let msg = stop.error().to_string();
        match &stop {
            Stop::Halt(err) => {
                tracing::error!(error = %err, "flushing stopped; pending ops are kept");
                e.stats.set_stopped(Some(err.clone()));
                self.paused_until = None;
                self.asked_pause = None;
                // Never a loop of refused requests, whatever the setting.
                let look = e.cfg.retry_max_backoff.max(STOP_LOOK_MIN);
                self.stop_look_at = Some(Instant::now() + look);
            }
            Stop::Transient(err) => {
                let now = Instant::now();
                // One step of the backoff per pause: the chunks in flight
                // when OpenFGA went away fail within the pause the first
                // began, and with a step each, a two-second outage paused
                // flushing for up to a minute.
                let pausing = self.paused_until.filter(|&p| p > now);
                if pausing.is_none() {
                    metrics::counter!("fga_wb_flush_pauses_total").increment(1);
                }
                let wait = match pausing {
                    Some(p) => p - now,
                    None => self.backoff.next().unwrap_or(e.cfg.retry_max_backoff),
                };
                let wait = err.retry_after().map_or(wait, |r| r.max(wait));
                let wait = match self.shutdown {
                    // Shutdown spends its deadline writing: short pauses of
                    // its own, but never a shorter one than OpenFGA asked
                    // for (past the deadline, the shutdown ends with the
                    // ops left, as it would writing them).
                    Some(_) => err
                        .retry_after()
                        .unwrap_or(wait.min(Duration::from_millis(200))),
                    None => wait,
                };
                // The latest end any request was asked for: another chunk
                // (or Redis) failing without one does not cut it short.
                if let Some(r) = err.retry_after() {
                    let until = now + r;
                    self.asked_pause = Some(self.asked_pause.map_or(until, |p| p.max(until)));
                }
                let until = now + wait;
                self.paused_until = Some(match self.asked_pause {
                    Some(p) => until.max(p),
                    None => until,
                });
                // An outage of OpenFGA, not a blip (a single 429 pauses
                // for 100 ms), nor Redis's own failure (giving back would
                // wait on the Redis that just failed). A pause under way
                // that parks stays so.
                let long = PARK_AFTER.min(e.cfg.retry_max_backoff);
                self.park_while_paused = (wait >= long
                    || (pausing.is_some() && self.park_while_paused))
                    && !err.is_redis();
            }
        }
        self.last_error = Some(msg.clone());
        self.unrecorded.error = Some(msg);
        // The ops of a failed chunk are pending again: a flush() of them
        // cannot complete now, so it reports the error.
        let halted = matches!(stop, Stop::Halt(_));
        // No caller is held through a pause OpenFGA asked for (see
        // add_waiter).
        let asked = stop.error().retry_after().is_some();
        let waiters: Vec<Waiter> = match first {
            _ if halted => std::mem::take(&mut self.waiters),
            _ if self.shutdown.is_some() => Vec::new(),
            None => std::mem::take(&mut self.waiters),
            Some(_) if asked => std::mem::take(&mut self.waiters),
            Some(first) => {
                let (theirs, others) = std::mem::take(&mut self.waiters)
                    .into_iter()
                    .partition(|w| w.up_to >= first);
                self.waiters = others;
                theirs
            }
        };
        for w in waiters {
            self.answer(w);
        }
        if halted {
            self.shutdown = self.shutdown.map(|_| Instant::now());
        }
    }

    pub(crate) fn report_since(&self, w: &Waiter) -> FlushReport {
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

    pub(crate) fn answer(&self, w: Waiter) {
        let mut r = self.report_since(&w);
        r.coalesced = self.engine.stats.take_coalesced();
        r.error.clone_from(&self.last_error);
        let _ = w.reply.send(r);
    }

    /// Whether everything acknowledged up to `up_to` is written.
    pub(crate) fn reached(&self, up_to: u64) -> bool {
        // Sequence numbers start at 1: up to 0 is nothing.
        let ready_done =
            up_to == 0 || (self.exhausted.is_some_and(|t| t >= up_to) && self.blocked == 0);
        ready_done && self.only_store_left(up_to)
    }

    /// Answers the waiters whose ops this process is done with by asking
    /// the store, in one look, whether an op at or before their mark is
    /// still pending: while others keep more than a window due, no take at
    /// the whole target comes back empty (`exhausted`, what `reached`
    /// needs), and a `flush()` waited for the traffic to stop. Only with
    /// no take under way (ops it moves are in neither the store's pending
    /// sets nor the staged ones) and none of the waiter's ops staged,
    /// carried or running here: a chunk of them that ends may make ops
    /// pending again (its failed ones, or ones blocked behind it) before
    /// the pump hears of it.
    ///
    /// `now`: right after a window was taken; otherwise, after the store
    /// said "pending", not again within a `PLAN_EVERY` (ops blocked behind
    /// another process's write can keep that answer for long, and the
    /// loop turns at every chunk's end).
    pub(crate) async fn settle_quiet(&mut self, now: bool) {
        if !now && self.quiet_looked.is_some_and(|t| t.elapsed() < PLAN_EVERY) {
            return;
        }
        // A take whose reply was lost may have left ops taken here and
        // known nowhere: a waiter waits for the look for strays after it.
        self.note_unsure();
        let mut marks: Vec<u64> = self
            .waiters
            .iter()
            .filter(|w| self.strays_seen_since(w.started))
            .map(|w| w.up_to)
            .filter(|&u| self.only_store_left(u) && !self.reached(u))
            .collect();
        marks.sort_unstable();
        marks.dedup();
        let mut done_to = None;
        for up_to in marks {
            match self.engine.store.pending_up_to(up_to).await {
                Ok(false) => done_to = Some(up_to),
                Ok(true) => {
                    self.quiet_looked = Some(Instant::now());
                    break;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot look for pending ops; a later look decides");
                    break;
                }
            }
        }
        if let Some(done_to) = done_to {
            self.answer_done(|p, w| w.up_to <= done_to && p.only_store_left(w.up_to));
        }
    }

    /// No op up to `up_to` is being taken, staged, carried or written by
    /// this process.
    pub(crate) fn only_store_left(&self, up_to: u64) -> bool {
        self.taking.is_none()
            && self.running_firsts.keys().next().is_none_or(|&f| f > up_to)
            && self
                .staged
                .iter()
                .chain(&self.carry)
                .all(|t| t.first > up_to)
    }

    /// Answers the waiters whose flush is complete.
    pub(crate) fn settle(&mut self) {
        // A call that failed since the look: the task plans again at once.
        self.note_unsure();
        self.answer_done(|p, w| p.reached(w.up_to));
    }

    /// Answers the waiters `written` says are complete, once the look for
    /// strays after they began was answered.
    fn answer_done(&mut self, written: impl Fn(&Pump, &Waiter) -> bool) {
        let (done, wait): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| written(self, w) && self.strays_seen_since(w.started));
        self.waiters = wait;
        for w in done {
            // Everything it wanted is written: an error seen on the way was
            // recovered from.
            self.last_error = None;
            self.answer(w);
        }
    }

    pub(crate) async fn add_waiter(
        &mut self,
        reply: oneshot::Sender<FlushReport>,
        up_to: Option<u64>,
    ) {
        let up_to = match self.engine.store.last_seq().await {
            // Never past the newest op: nothing there to wait for.
            Ok(s) => up_to.map_or(s, |u| u.min(s)),
            Err(e) => {
                let _ = reply.send(FlushReport {
                    error: Some(e.to_string()),
                    ..Default::default()
                });
                return;
            }
        };
        // OpenFGA asked for a pause: no request before it ends, and no
        // caller held until then either (a grant making room, a check):
        // the flush answers at once with why.
        // Not once the ops are written (by others too), and not while
        // flushing is stopped: a flush() is how a fixed credential resumes.
        let now = Instant::now();
        let asked = self.asked_pause.filter(|p| {
            now < *p
                && self.shutdown.is_none()
                && self.engine.stats.halted().is_none()
                && !self.reached(up_to)
        });
        if let Some(until) = asked {
            let last = self.last_error.clone().unwrap_or_default();
            let _ = reply.send(FlushReport {
                error: Some(format!(
                    "{last}; OpenFGA asked for a pause (Retry-After): nothing is sent for {:.1?} more, and the ops stay pending",
                    until - now
                )),
                ..Default::default()
            });
            return;
        }
        self.try_again();
        self.strays_wanted = Some(Instant::now());
        self.waiters.push(Waiter {
            up_to,
            reply,
            start: self.totals.clone(),
            started: Instant::now(),
        });
        self.raise(up_to);
    }

    /// Someone asked (a flush or a shutdown): flushing resumes after an
    /// auth failure and retries at once after a transient one, and it
    /// looks at the store at least once: ops may be ready again below the
    /// target (another process's write given up, a queued job set aside)
    /// without a word to this process. Except within a pause OpenFGA asked
    /// for (Retry-After): nothing is sent before it ends, whoever asks.
    pub(crate) fn try_again(&mut self) {
        let now = Instant::now();
        self.paused_until = self.asked_pause.filter(|&p| p > now);
        self.engine.stats.set_stopped(None);
        self.last_error = None;
        self.forget_exhausted();
        self.revokes_exhausted = None;
    }

    /// Records the work since the last record for `status` (at most a few
    /// times a second, and when idle).
    pub(crate) async fn record(&mut self) {
        if self.unrecorded == FlushReport::default() {
            return;
        }
        let mut r = std::mem::take(&mut self.unrecorded);
        r.coalesced = 0;
        // Requests still running count towards the next record.
        let now = Instant::now();
        let since = match self.chunks_running() == 0 {
            true => self.busy_since.take(),
            false => self.busy_since.replace(now),
        };
        r.duration = since.map_or(Duration::ZERO, |t| now - t);
        if let Ok(p) = self.engine.store.pending().await {
            publish_pending(&p);
        }
        self.engine.record(&r).await;
    }

    /// Every op staged or held back, taken out of the pump.
    fn drain_staged(&mut self) -> Vec<Taken> {
        self.carry_since = None;
        self.staged.drain(..).chain(self.carry.drain(..)).collect()
    }

    /// With flushing stopped (refused credentials, unknown store) or paused
    /// for long after OpenFGA failed (see `park_while_paused`), and no
    /// explicit flush or shutdown waiting, ops staged for sending go back
    /// to pending, where status counts them and `clear` drops them, instead
    /// of waiting as in flight through the outage. The pump takes them
    /// again when it resumes.
    pub(crate) fn park_if_idle(&mut self) {
        let holding = !self.staged.is_empty() || !self.carry.is_empty();
        let stopped = self.engine.stats.stopped().is_some() && !self.looking_past_stop();
        let idle = stopped || (self.paused() && self.park_while_paused);
        if holding && idle && !self.explicit() {
            // In the background: Redis may be failing too.
            let back = self.drain_staged();
            self.give_back(back);
            self.forget_exhausted();
            self.revokes_exhausted = None;
        }
    }

    /// Whether stopping now cuts something off whose outcome is unknown:
    /// a Write under way (not a chunk recording its outcomes), or a take
    /// (see `Engine::release_lease`).
    pub(crate) fn cut_off(&self) -> bool {
        self.engine.writes_under_way() > 0 || self.taking.is_some()
    }

    /// Lets a take under way end (within [`TAKE_END_WAIT`]) and stages
    /// what it took, for `unstage` to give back: a stop then leaves
    /// nothing taken behind it. A take call Redis ran after the stop's
    /// release would hold its ops under a lease nothing renews, and they
    /// would come back only a hold after it ended, though never sent. One
    /// that does not end in time stays a cut-off take (see `cut_off`).
    pub(crate) async fn end_take(&mut self) {
        if self.taking.is_none() {
            return;
        }
        let ended =
            tokio::time::timeout(TAKE_END_WAIT, super::task::next_window(&mut self.taking)).await;
        if let Ok(w) = ended {
            self.taking = None;
            self.report_dead_on_take();
            match w.result {
                Ok(ops) => self.staged.extend(ops),
                Err(e) => tracing::warn!(error = %e, "a take under way at the stop failed"),
            }
        }
    }

    /// Stops at once (the handle is gone, or stopped): nothing is repeated
    /// any more, and staged ops go back to the store.
    pub(crate) async fn stop_now(&mut self) {
        self.engine
            .store
            .stop_retrying_at(std::time::Instant::now());
        self.unstage().await;
    }

    /// Gives staged ops back to the store (shutdown).
    pub(crate) async fn unstage(&mut self) {
        if self.staged.is_empty() && self.carry.is_empty() {
            return;
        }
        let back: Vec<(Taken, Outcome)> = self
            .drain_staged()
            .into_iter()
            .map(|t| (t, Outcome::Retry))
            .collect();
        match self.engine.store.finish(back, None).await {
            // Ops superseded meanwhile end here, and count as coalesced.
            Ok(f) => self.engine.account(&f, &mut FlushReport::default()),
            Err(e) => tracing::warn!(error = %e, "could not give staged ops back"),
        }
    }
}

/// What a window take brought back.
pub(crate) struct Window {
    pub(crate) result: crate::Result<Vec<Taken>>,
    /// The end of the sequence range taken.
    pub(crate) cursor: u64,
    /// The target it was taken for.
    pub(crate) target: u64,
}

/// The oldest due ops, about `window` of them: those acknowledged in the
/// `window` sequence numbers after `cursor` (and any older ones ready
/// again), up to `target`. Taking by sequence range rather than per shard
/// keeps a caller's consecutive ops together.
///
/// With a `backlog`, the target first moves up to the newest op: under a
/// stream of pushes the target set at the last look (every `PLAN_EVERY`
/// while writing) trails by a few hundred ops, and windows cut at it come
/// out small, so their chunks are partial and the server gets more,
/// smaller requests than the backlog needs.
pub(crate) async fn take_window(
    engine: Arc<Engine>,
    mut cursor: u64,
    mut target: u64,
    window: usize,
    backlog: bool,
) -> Window {
    if backlog {
        if let Ok(last) = engine.store.last_seq().await {
            target = target.max(last);
        }
    }
    let mut out: Vec<Taken> = Vec::new();
    let mut jumped = false;
    loop {
        let bound = target.min(cursor.saturating_add(window as u64));
        let empty = match engine
            .store
            .take(window - out.len(), Take::All, bound)
            .await
        {
            Ok(ops) => {
                let empty = ops.is_empty();
                out.extend(ops);
                empty
            }
            // What earlier takes moved to this writer is written, not
            // dropped (it would stay taken, by a live writer, for good):
            // the next take meets the error again if it lasts.
            Err(e) if !out.is_empty() => {
                tracing::warn!(error = %e, taken = out.len(), "cannot take more pending ops; writing those taken");
                return Window {
                    result: Ok(out),
                    cursor,
                    target,
                };
            }
            Err(e) => {
                return Window {
                    result: Err(e),
                    cursor,
                    target,
                }
            }
        };
        cursor = cursor.max(bound);
        if out.len() * 2 >= window || bound >= target {
            if jumped && out.len() >= window {
                // More is due: the walk goes on from the newest op taken.
                cursor = out
                    .iter()
                    .map(|t| t.first)
                    .max()
                    .map_or(cursor, |f| f.min(cursor));
            }
            return Window {
                result: Ok(out),
                cursor,
                target,
            };
        }
        if empty && engine.store.shared() {
            // Nothing in this range, and maybe in many after it: a shared
            // store's sequence numbers are store-wide, so a process that
            // starts (at 0) on a store that has seen a billion ops would
            // walk 80,000 empty ranges, a Redis call each, before its first
            // write. The rest comes up to the target in one take, oldest
            // first (a memory store's take, an even share of each shard's
            // oldest, needs the walk for that, and its numbers start with
            // its pump).
            jumped = true;
            cursor = cursor.max(target.saturating_sub(window as u64));
        }
    }
}

/// Chunks per window sorted by key before cutting: large enough that the
/// ops of one object from many interleaved callers fill whole chunks, and
/// that each of 16 callers granting their own key ranges brings 8 chunks of
/// neighbouring keys, so the requests in flight at once are neighbours too.
/// With 32, 100-tuple Writes of 16 separate ranges ran about 4% slower on
/// OpenFGA's SQLite datastore than the same Writes in key order.
pub(crate) const WINDOW_CHUNKS: usize = 128;
/// Rounds of requests (`limit` chunks each) still staged when the next
/// window is taken: from Redis a window is some 26 calls, which under load
/// took longer than one round, and the requests in flight fell to 7.7 of 8
/// on average.
pub(crate) const TAKE_AHEAD_ROUNDS: usize = 2;
/// Windows a partial group may be held back for within one flush.
pub(crate) const MAX_CARRIES: u8 = 3;
/// Pauses at least this long (or `flush.retry_max_backoff` when shorter)
/// give staged ops back to pending (see `park_if_idle`): by then the
/// backoff has grown past a blip's.
pub(crate) const PARK_AFTER: Duration = Duration::from_secs(1);
/// How often, at most, a flusher with no take under way, or a worker
/// fetching jobs, asks the store for what it names the writer as holding
/// that the writer does not hold (see `Pump::give_back_strays`), unless a
/// flush(), a shutdown or a failed call asks sooner.
pub(crate) const STRAY_EVERY: Duration = Duration::from_secs(5);
/// How soon a look for strays that failed is tried again.
pub(crate) const STRAY_RETRY: Duration = Duration::from_secs(1);
/// Most bytes of tuples one request carries, as JSON: OpenFGA's gRPC
/// limit is 616,448 bytes by default (a condition context may hold 32 KB),
/// with room for the encoding's differences and the request's own fields.
pub(crate) const REQUEST_BYTES: usize = 400_000;

/// About what `t` adds to a Write request's JSON.
fn request_bytes(t: &crate::tuple::TupleKey) -> usize {
    /// Counts what is written to it.
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0 += b.len();
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let keys = t.user.len() + t.relation.len() + t.object.len() + 40;
    let condition = t.condition.as_ref().map_or(0, |c| {
        let mut n = Count(0);
        let _ = c
            .context
            .as_ref()
            .map(|ctx| serde_json::to_writer(&mut n, ctx));
        // `,"condition":{"name":"","context":}`, the context `{}` if none.
        c.name.len() + n.0.max(2) + 35
    });
    keys + condition
}

/// Has the store record a chunk's outcomes. Done in the chunk's future,
/// not in the pump: chunks end concurrently, and the pump goes on
/// starting others meanwhile.
async fn finish_chunk(engine: &Engine, result: &mut ChunkResult) {
    let outcomes = std::mem::take(&mut result.outcomes);
    let dead: Vec<crate::tuple::TupleKey> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Dead { .. }))
        .map(|(t, _)| t.tuple.clone())
        .collect();
    if !outcomes.is_empty() {
        result.finished = Some(engine.store.finish(outcomes, None).await);
    }
    // A dead grant may have been in cached answers as a contextual tuple;
    // OpenFGA will never have it. After the finish, never before (see
    // cache.rs): a check between the two would cache its answer under the
    // new generation.
    for t in &dead {
        engine.cache.invalidate_for(t);
    }
}

/// While requests run, the triggers are looked at this often at most.
pub(crate) const PLAN_EVERY: Duration = Duration::from_millis(20);
/// How long a stop lets a take under way end (see `Pump::end_take`):
/// well within the second `close()` gives the flusher to answer.
const TAKE_END_WAIT: Duration = Duration::from_millis(300);
/// Shortest wait before a stopped flusher asks OpenFGA again.
const STOP_LOOK_MIN: Duration = Duration::from_secs(1);
/// Longest a flush() waits for ops blocked behind other writers' writes
/// (beyond `flush.unknown_outcome_hold`, which such a write may last).
pub(crate) const BLOCKED_WAIT: Duration = Duration::from_secs(30);
/// How often a waiting flush() looks at ops blocked behind other writers.
pub(crate) const BLOCKED_POLL: Duration = Duration::from_millis(200);
/// How long shutdown waits past its deadline for requests already running.
pub(crate) const SHUTDOWN_GRACE: Duration = Duration::from_millis(250);
/// How often the pump records its work for `status` while busy.
pub(crate) const RECORD_EVERY: Duration = Duration::from_millis(250);

/// The pending-ops gauges, from a look at the store.
pub(crate) fn publish_pending(p: &crate::buffer::Pending) {
    metrics::gauge!("fga_wb_pending_ops").set(p.total as f64);
    metrics::gauge!("fga_wb_in_flight_ops").set(p.in_flight as f64);
    metrics::gauge!("fga_wb_oldest_pending_seconds")
        .set(p.oldest_age.map_or(0.0, |a| a.as_secs_f64()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::memory::MemoryStore;
    use crate::buffer::{DeadLetter, JobEnd, Pending, Pushed, Relevant, Replayed, Unfinished};
    use crate::model::Dep;
    use crate::tuple::TupleKey;
    use std::sync::atomic::AtomicUsize;

    /// A staged op superseded before it was written, then handed back:
    /// it ends as coalesced, so the totals still add up. Before, the count
    /// was lost.
    #[tokio::test]
    async fn staged_ops_handed_back_count_what_was_superseded() {
        let e = engine();
        grant(&e, "document:1", 0, 2).await;
        let mut pump = Pump::new(e.clone(), false);
        pump.stage(e.store.take(10, Take::All, u64::MAX).await.unwrap());
        let t = TupleKey::new("user:u000", "viewer", "document:1").unwrap();
        e.store.push(&t, Op::Revoke).await.unwrap();
        pump.unstage().await;
        assert_eq!(e.stats.totals().coalesced, 1);
    }

    /// A chunk whose ops all went elsewhere sends nothing and counts as no
    /// request. Before, it counted as a Write that landed, and ended a stop
    /// on refused credentials.
    #[tokio::test]
    async fn a_chunk_with_nothing_left_to_write_is_no_request() {
        let e = Engine::for_tests(None);
        let retries = QuickRetries {
            transient: 0,
            conflicts: 0,
        };
        let r = e.write_chunk_as(None, None, Vec::new(), retries).await;
        assert_eq!(r.requests, 0);
        assert_eq!(e.writes_ok.load(Ordering::Relaxed), 0);
    }

    /// A memory store whose `take` number `fail_take` (counting from 1)
    /// fails, as a Redis call can. With `shared`, it plays a store others
    /// share: ops in `lost` were taken by a call whose reply was lost, and
    /// a look for strays gives back those the pump does not hold, noting
    /// which keys the pump said it held. The next `fail_looks` looks fail
    /// without running.
    struct Flaky {
        inner: MemoryStore,
        takes: AtomicUsize,
        fail_take: AtomicUsize,
        fail_looks: AtomicUsize,
        shared: bool,
        lost: std::sync::Mutex<Vec<Taken>>,
        looks: std::sync::Mutex<Vec<Option<Vec<String>>>>,
        looked: Notify,
        /// What `write_budget` answers.
        budget: Option<Duration>,
        /// Each finish waits for a permit (a Redis failing over).
        finish_gate: Option<Arc<tokio::sync::Semaphore>>,
    }

    impl Default for Flaky {
        fn default() -> Self {
            Flaky {
                inner: MemoryStore::new(1000),
                takes: AtomicUsize::new(0),
                fail_take: AtomicUsize::new(0),
                fail_looks: AtomicUsize::new(0),
                shared: false,
                lost: Default::default(),
                looks: Default::default(),
                looked: Notify::new(),
                budget: None,
                finish_gate: None,
            }
        }
    }

    fn flaky_engine() -> (Arc<Engine>, Arc<Flaky>) {
        flaky_engine_with(Flaky::default(), None)
    }

    fn flaky_engine_with(store: Flaky, sink: Option<Sink>) -> (Arc<Engine>, Arc<Flaky>) {
        let store = Arc::new(store);
        let mut e = Engine::for_tests(sink);
        e.store = store.clone();
        (Arc::new(e), store)
    }

    /// A store others share, flushing into a test queue, with `n` ops on
    /// `document:1` that a take whose reply was lost moved to this writer.
    async fn with_lost_take(e: Engine, n: usize) -> (Arc<Engine>, Arc<Flaky>) {
        let store = Arc::new(Flaky {
            shared: true,
            ..Default::default()
        });
        let mut e = e;
        e.store = store.clone();
        let e = Arc::new(e);
        grant(&e, "document:1", 0, n).await;
        let lost = e.store.take(n, Take::All, u64::MAX).await.unwrap();
        assert_eq!(lost.len(), n);
        store.lost.lock().unwrap().extend(lost);
        (e, store)
    }

    fn queue_engine() -> Engine {
        Engine::for_tests(Some(Arc::new(crate::queue::FakeQueue::default())))
    }

    fn failure() -> Error {
        Error::new(Kind::Redis {
            detail: "connection dropped".into(),
            transient: true,
        })
    }

    impl Store for Flaky {
        fn push<'a>(&'a self, tuple: &'a TupleKey, op: Op) -> BoxFuture<'a, Result<Pushed, Error>> {
            self.inner.push(tuple, op)
        }
        fn take(
            &self,
            max: usize,
            what: Take,
            up_to: u64,
        ) -> BoxFuture<'_, Result<Vec<Taken>, Error>> {
            let n = self.takes.fetch_add(1, Ordering::Relaxed) + 1;
            if n != self.fail_take.load(Ordering::Relaxed) {
                return self.inner.take(max, what, up_to);
            }
            Box::pin(async move {
                if self.shared {
                    // It ran, and its reply was lost.
                    let lost = self.inner.take(max, what, up_to).await?;
                    self.lost.lock().unwrap().extend(lost);
                }
                Err(failure())
            })
        }
        fn unsure_calls(&self) -> u64 {
            let fail = self.fail_take.load(Ordering::Relaxed);
            u64::from(fail != 0 && self.takes.load(Ordering::Relaxed) >= fail)
        }
        fn finish<'a>(
            &'a self,
            done: Vec<(Taken, Outcome)>,
            job: Option<&'a JobEnd>,
        ) -> BoxFuture<'a, Result<Finished, Error>> {
            let gate = self.finish_gate.clone();
            Box::pin(async move {
                if let Some(g) = gate {
                    let _permit = g.acquire().await;
                }
                self.inner.finish(done, job).await
            })
        }
        fn relevant<'a>(
            &'a self,
            rels: Option<&'a [Dep]>,
            object: &'a str,
            user: &'a str,
            limit: usize,
        ) -> BoxFuture<'a, Result<Relevant, Error>> {
            self.inner.relevant(rels, object, user, limit)
        }
        fn close(&self) {
            self.inner.close()
        }
        fn relations_buffered<'a>(
            &'a self,
            object_type: &'a str,
        ) -> BoxFuture<'a, Result<Vec<String>, Error>> {
            self.inner.relations_buffered(object_type)
        }
        fn latest<'a>(
            &'a self,
            tuple: &'a TupleKey,
        ) -> BoxFuture<'a, Result<Option<(Op, bool)>, Error>> {
            self.inner.latest(tuple)
        }
        fn owes_revoke<'a>(&'a self, tuple: &'a TupleKey) -> BoxFuture<'a, Result<bool, Error>> {
            self.inner.owes_revoke(tuple)
        }
        fn note_landed<'a>(&'a self, tuples: &'a [TupleKey]) -> BoxFuture<'a, Result<(), Error>> {
            self.inner.note_landed(tuples)
        }
        fn last_seq(&self) -> BoxFuture<'_, Result<u64, Error>> {
            self.inner.last_seq()
        }
        fn unfinished(&self, up_to: u64) -> BoxFuture<'_, Result<Unfinished, Error>> {
            self.inner.unfinished(up_to)
        }
        fn pending_up_to(&self, up_to: u64) -> BoxFuture<'_, Result<bool, Error>> {
            self.inner.pending_up_to(up_to)
        }
        fn pending(&self) -> BoxFuture<'_, Result<Pending, Error>> {
            self.inner.pending()
        }
        fn pending_now(&self) -> Option<Pending> {
            self.inner.pending_now()
        }
        fn clear(&self, up_to: Option<u64>) -> BoxFuture<'_, Result<Vec<(TupleKey, Op)>, Error>> {
            self.inner.clear(up_to)
        }
        fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>, Error>> {
            self.inner.dead_letters()
        }
        fn newest_letter_id(&self) -> BoxFuture<'_, Result<u64, Error>> {
            self.inner.newest_letter_id()
        }
        fn remove_dead_letters<'a>(
            &'a self,
            ids: Option<&'a [u64]>,
            up_to: Option<u64>,
        ) -> BoxFuture<'a, Result<crate::buffer::Purged, Error>> {
            self.inner.remove_dead_letters(ids, up_to)
        }
        fn replay_dead_letters<'a>(
            &'a self,
            ids: Option<&'a [u64]>,
            only_transient: bool,
        ) -> BoxFuture<'a, Result<Replayed, Error>> {
            self.inner.replay_dead_letters(ids, only_transient)
        }
        fn shared(&self) -> bool {
            self.shared
        }
        fn write_budget(&self) -> Option<Duration> {
            self.budget
        }
        fn give_back_strays<'a>(
            &'a self,
            held: Option<&'a (dyn Fn(&str) -> bool + Sync)>,
        ) -> BoxFuture<'a, Result<(u64, u64), Error>> {
            Box::pin(async move {
                let failing = self.fail_looks.load(Ordering::Relaxed);
                if failing > 0 {
                    self.fail_looks.store(failing - 1, Ordering::Relaxed);
                    return Err(failure());
                }
                let lost = std::mem::take(&mut *self.lost.lock().unwrap());
                let key = |t: &Taken| crate::buffer::key_of(&t.tuple);
                let (kept, back): (Vec<Taken>, Vec<Taken>) = lost
                    .into_iter()
                    .partition(|t| held.is_some_and(|h| h(&key(t))));
                let said_held = held.map(|h| {
                    let mut all: Vec<String> = (0..3)
                        .map(|i| format!("document:9#viewer@user:u{i:03}"))
                        .chain(kept.iter().chain(&back).map(key))
                        .filter(|k| h(k))
                        .collect();
                    all.sort();
                    all
                });
                self.looks.lock().unwrap().push(said_held);
                *self.lost.lock().unwrap() = kept;
                let n = back.len() as u64;
                let back = back.into_iter().map(|t| (t, Outcome::Retry)).collect();
                self.inner.finish(back, None).await?;
                self.looked.notify_one();
                Ok((n, 0))
            })
        }
    }

    /// A queue whose enqueues wait until the test opens it.
    struct Gate {
        entered: Notify,
        open: tokio::sync::Semaphore,
        queued: AtomicUsize,
    }

    impl JobSink for Gate {
        fn enqueue<'a>(
            &'a self,
            _store_id: &'a str,
            _model_id: Option<&'a str>,
            ops: &'a [Taken],
        ) -> BoxFuture<'a, crate::error::Result<()>> {
            Box::pin(async move {
                self.entered.notify_one();
                let _open = self.open.acquire().await;
                self.queued.fetch_add(ops.len(), Ordering::Relaxed);
                Ok(())
            })
        }
    }

    /// The pump's task on `e` (flushing only when asked), the channel that
    /// commands it, and its stop sender (kept while the task runs).
    fn run_pump(
        e: &Arc<Engine>,
    ) -> (
        mpsc::Sender<Command>,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    ) {
        let (commands, rx) = mpsc::channel(4);
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(super::super::task::run(e.clone(), rx, stop, false));
        (commands, stop_tx, task)
    }

    /// Shuts the pump's task on `e` down with `within` to go: its report,
    /// and the task.
    async fn shut_down(
        e: &Arc<Engine>,
        within: Duration,
    ) -> (FlushReport, tokio::task::JoinHandle<()>) {
        let (commands, _stop, task) = run_pump(e);
        let (reply, done) = oneshot::channel();
        let deadline = Instant::now() + within;
        commands
            .send(Command::Shutdown { deadline, reply })
            .await
            .unwrap();
        (done.await.unwrap().0, task)
    }

    /// A flush() whose one chunk (3 ops on `document:9`, a store others
    /// share) waits at a closed gate to the queue.
    struct AtGate {
        e: Arc<Engine>,
        store: Arc<Flaky>,
        gate: Arc<Gate>,
        commands: mpsc::Sender<Command>,
        first_done: oneshot::Receiver<FlushReport>,
        task: tokio::task::JoinHandle<()>,
        _stop: watch::Sender<bool>,
    }

    async fn flush_at_gate() -> AtGate {
        let gate = Arc::new(Gate {
            entered: Notify::new(),
            open: tokio::sync::Semaphore::new(0),
            queued: AtomicUsize::new(0),
        });
        let shared = Flaky {
            shared: true,
            ..Default::default()
        };
        let (e, store) = flaky_engine_with(shared, Some(gate.clone()));
        grant(&e, "document:9", 0, 3).await;
        let (commands, _stop, task) = run_pump(&e);
        let (first, first_done) = oneshot::channel();
        commands.send(Command::Flush(first, None)).await.unwrap();
        gate.entered.notified().await;
        AtGate {
            e,
            store,
            gate,
            commands,
            first_done,
            task,
            _stop,
        }
    }

    /// Ops a take whose reply was lost left with this writer, while a chunk
    /// of the pump is still being written: a flush() looks for strays at
    /// once, naming the running chunk's keys as held (they are not given
    /// back), and the strays are written within that flush. Before, the
    /// pump looked only while it held nothing, and a flush() could end
    /// before such a moment came, without them.
    #[tokio::test]
    async fn a_flush_gives_back_strays_while_a_chunk_runs() {
        let g = flush_at_gate().await;
        let (e, store, gate) = (&g.e, &g.store, &g.gate);

        // The chunk of document:9 waits at the queue; meanwhile a take
        // whose reply was lost moves 20 more ops to this writer.
        grant(e, "document:1", 0, 20).await;
        let lost = e.store.take(20, Take::All, u64::MAX).await.unwrap();
        assert_eq!(lost.len(), 20);
        store.lost.lock().unwrap().extend(lost);
        let (second, second_done) = oneshot::channel();
        g.commands.send(Command::Flush(second, None)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), store.looked.notified())
            .await
            .expect("a look for strays while the chunk runs");
        let running: Vec<String> = (0..3)
            .map(|i| format!("document:9#viewer@user:u{i:03}"))
            .collect();
        assert_eq!(*store.looks.lock().unwrap(), [Some(running)]);

        gate.open.add_permits(1000);
        g.first_done.await.unwrap();
        let report = second_done.await.unwrap();
        assert_eq!(report.error, None, "{report:?}");
        assert_eq!(gate.queued.load(Ordering::Relaxed), 23);
        let p = e.store.pending().await.unwrap();
        assert_eq!(p.total, 0, "{p:?}");
        g.task.abort();
    }

    /// A shutdown with a shared store drains what this process
    /// acknowledged, not what another writer acknowledged since: with its
    /// own chunk at the queue's gate, another writer's op arrives, and once
    /// the gate lets the chunk through the shutdown ends, without an error
    /// and without taking the other op.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_drains_its_own_ops_not_others_arriving() {
        let gate = Arc::new(Gate {
            entered: Notify::new(),
            open: tokio::sync::Semaphore::new(0),
            queued: AtomicUsize::new(0),
        });
        let store = Arc::new(Flaky {
            shared: true,
            ..Default::default()
        });
        let mut e = Engine::for_tests(Some(gate.clone()));
        e.cfg.batch_size = 1;
        e.store = store.clone();
        let e = Arc::new(e);
        grant(&e, "document:mine", 0, 1).await;
        let (commands, rx) = mpsc::channel(4);
        let (_stop, stop) = watch::channel(false);
        let task = tokio::spawn(super::super::task::run(e.clone(), rx, stop, true));
        let (reply, done) = oneshot::channel();
        let deadline = Instant::now() + Duration::from_secs(5);
        commands
            .send(Command::Shutdown { deadline, reply })
            .await
            .unwrap();
        gate.entered.notified().await;
        grant(&e, "document:theirs", 0, 1).await;
        gate.open.add_permits(1);
        let report = done.await.unwrap().0;
        assert_eq!(report.error, None, "{report:?}");
        assert_eq!(gate.queued.load(Ordering::Relaxed), 1);
        task.await.unwrap();
    }

    /// A shutdown whose look for strays fails tries the look again a
    /// second later (not at the next flush interval, an hour here), and
    /// ends with the ops a lost reply left written and no error.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_tries_a_failed_look_again() {
        let mut e = queue_engine();
        e.cfg.interval = Duration::from_secs(3600);
        let (e, store) = with_lost_take(e, 20).await;
        store.fail_looks.store(1, Ordering::Relaxed);

        let (report, task) = shut_down(&e, Duration::from_secs(30)).await;
        assert_eq!(report.error, None, "{report:?}");
        assert_eq!(report.queued, 20, "{report:?}");
        assert_eq!(store.looks.lock().unwrap().len(), 1, "one look answered");
        task.await.unwrap();
    }

    /// A shutdown whose looks for strays all fail says so when its
    /// deadline passes, rather than that ops are not yet written.
    #[tokio::test(start_paused = true)]
    async fn a_shutdown_without_a_look_says_why() {
        let (e, store) = with_lost_take(queue_engine(), 5).await;
        store.fail_looks.store(usize::MAX, Ordering::Relaxed);
        let (report, task) = shut_down(&e, Duration::from_secs(5)).await;
        let error = report.error.expect("the looks failed");
        assert!(error.contains("cannot look in Redis"), "{error}");
        task.await.unwrap();
    }

    /// A look that fails answers only the flush() calls waiting for it: a
    /// flush() whose own look succeeded before goes on and succeeds. Before,
    /// one failed look failed every flush() under way.
    #[tokio::test]
    async fn a_failed_look_fails_only_the_flushes_that_wait_for_it() {
        // Its look came before its chunk was taken: nothing was held.
        let g = flush_at_gate().await;
        let (store, gate) = (&g.store, &g.gate);

        store.fail_looks.store(1, Ordering::Relaxed);
        let (second, second_done) = oneshot::channel();
        g.commands.send(Command::Flush(second, None)).await.unwrap();
        let report = second_done.await.unwrap();
        let error = report.error.expect("the second flush's look failed");
        assert!(error.contains("cannot look in Redis"), "{error}");

        gate.open.add_permits(1000);
        let report = g.first_done.await.unwrap();
        assert_eq!(report.error, None, "{report:?}");
        assert_eq!(gate.queued.load(Ordering::Relaxed), 3);
        g.task.abort();
    }

    /// A key as Redis lists it hashes as the tuple it was made from, users
    /// with `#`, `@` or beyond ASCII and objects with `@` included: a held
    /// key is never taken for a stray.
    #[test]
    fn keys_hash_as_their_tuples() {
        for (u, r, o) in [
            ("user:anne", "viewer", "document:1"),
            ("group:eng#member", "viewer", "document:2"),
            ("user:anne@example.com", "editor", "folder:é"),
            ("user:*", "viewer", "document:3"),
            ("user:bob", "viewer", "document:a@b"),
        ] {
            let t = TupleKey::new(u, r, o).unwrap();
            let k = crate::buffer::key_of(&t);
            assert_eq!(member_hash(&k), Some(tuple_hash(&t)), "{k}");
        }
        assert_eq!(member_hash("not a key"), None);
    }

    /// A take of a flush fails after it ran (its reply lost) while earlier
    /// takes of its window got ops: the flush writes those, and does not
    /// report success before a look for strays after the failure gave the
    /// lost ops back and wrote them too. Before, it ended without them.
    #[tokio::test]
    async fn a_flush_waits_for_what_a_failed_take_of_its_own_left() {
        let queue = Arc::new(crate::queue::FakeQueue::default());
        let store = Arc::new(Flaky {
            shared: true,
            ..Default::default()
        });
        let mut e = Engine::for_tests(Some(queue.clone()));
        e.store = store.clone();
        // Windows of 128 ops (one-op chunks).
        e.cfg.max_tuples_per_write = 1;
        let e = Arc::new(e);
        grant(&e, "document:1", 0, 120).await;
        // 115 of them are being written by another process: the window's
        // first take finds few ready and takes again; that take fails.
        let busy = e.store.take(115, Take::All, u64::MAX).await.unwrap();
        assert_eq!(busy.len(), 115);
        grant(&e, "document:2", 0, 240).await;
        store.takes.store(0, Ordering::Relaxed);
        store.fail_take.store(2, Ordering::Relaxed);
        let report = super::super::flush_once(e.clone()).await;
        assert!(store.takes.load(Ordering::Relaxed) > 2, "the take failed");
        assert_eq!(report.queued, 245, "{report:?}");
        assert!(store.lost.lock().unwrap().is_empty());
        let p = e.store.pending().await.unwrap();
        assert_eq!((p.total, p.in_flight), (0, 360), "{p:?}");
    }

    /// A look for strays fails after a take whose reply was lost: the
    /// flush() reports that it could not look, not success, and the next
    /// flush() looks and writes the lost ops. Before, a failed look counted
    /// as done and the flush reported success with them still out.
    #[tokio::test]
    async fn a_flush_whose_look_for_strays_fails_says_so() {
        let (e, store) = with_lost_take(queue_engine(), 20).await;
        store.fail_looks.store(1, Ordering::Relaxed);

        let report = super::super::flush_once(e.clone()).await;
        let error = report.error.expect("a flush that could not look says so");
        assert!(error.contains("cannot look in Redis"), "{error}");
        assert_eq!(store.lost.lock().unwrap().len(), 20, "nothing looked");

        let report = super::super::flush_once(e.clone()).await;
        assert_eq!(report.error, None, "{report:?}");
        assert_eq!(report.queued, 20, "{report:?}");
        let p = e.store.pending().await.unwrap();
        assert_eq!(p.total, 0, "{p:?}");
    }

    /// A window's second take fails: what its first took is written, not
    /// dropped (it would stay taken by this live writer for good).
    #[tokio::test]
    async fn ops_taken_before_a_failed_take_are_kept() {
        let (e, store) = flaky_engine();
        grant(&e, "document:1", 0, 60).await;
        // 55 of the first 60 are being written: the window's first take,
        // up to seq 100, finds few ready and takes again.
        let busy = e.store.take(55, Take::All, u64::MAX).await.unwrap();
        assert_eq!(busy.len(), 55);
        grant(&e, "document:2", 0, 240).await;
        store.takes.store(0, Ordering::Relaxed);
        store.fail_take.store(2, Ordering::Relaxed);
        let w = take_window(e.clone(), 0, 300, 100, false).await;
        assert_eq!(
            store.takes.load(Ordering::Relaxed),
            2,
            "the window took twice"
        );
        let ops = w.result.expect("the ops the first take got");
        assert_eq!(ops.len(), 45);
        assert_eq!(w.cursor, 100, "the failed range is taken again next time");
    }

    /// An op acknowledged while an idle pump looks at what is due wakes
    /// it once the look armed no timer: the previous look's armed timer
    /// made the nudge skip the wake, and the op waited for the next one.
    /// Under an armed timer it does not (the timer covers it).
    #[test]
    fn an_op_acknowledged_while_the_pump_looks_wakes_it() {
        use futures::FutureExt;
        let e = engine();
        for armed_now in [false, true] {
            e.timer_armed.store(true, Ordering::Relaxed);
            e.looking(true);
            e.nudge(false, 1);
            e.looked(armed_now);
            let woken = e.wake.notified().now_or_never().is_some();
            assert_eq!(woken, !armed_now, "armed now: {armed_now}");
        }
    }

    /// Every chunk in flight when OpenFGA went away fails: together they
    /// pause flushing for one step of the backoff, not one step each. With
    /// a step each, eight failed chunks paused it for 12.8 s or more
    /// (jitter adds up to as much again), whatever the outage's length.
    #[tokio::test]
    async fn chunks_failing_in_one_pause_step_the_backoff_once() {
        let mut pump = Pump::new(engine(), true);
        for _ in 0..8 {
            let err = Error::new(Kind::Api(crate::error::ApiError {
                operation: "write",
                status: 503,
                code: String::new(),
                message: "unavailable".into(),
                retry_after: None,
            }));
            pump.give_up(Stop::Transient(err));
        }
        let left = pump.paused_until.expect("paused") - Instant::now();
        // The first step: retry_initial_backoff, jitter at most doubles it.
        let first = pump.engine.cfg.retry_initial_backoff * 2;
        assert!(
            left <= first,
            "paused for {left:?}, one step is at most {first:?}"
        );
    }

    fn engine_with(sink: Option<Sink>) -> Arc<Engine> {
        Arc::new(Engine::for_tests(sink))
    }

    fn engine() -> Arc<Engine> {
        engine_with(None)
    }

    /// Grants users `from..to` on `doc`.
    async fn grant(e: &Engine, doc: &str, from: usize, to: usize) {
        for i in from..to {
            let t = TupleKey::new(format!("user:u{i:03}"), "viewer", doc).unwrap();
            e.store.push(&t, Op::Grant).await.unwrap();
        }
    }

    /// Stages a small group (3 grants on `document:1`) before a large one
    /// (100 on `document:2`).
    async fn stage_small_beside_large(e: &Engine, pump: &mut Pump) {
        grant(e, "document:1", 0, 3).await;
        grant(e, "document:2", 0, 100).await;
        let ops = e.store.take(1000, Take::All, u64::MAX).await.unwrap();
        pump.stage(ops);
    }

    /// A Write this writer refuses to start (its lease about to end) is no
    /// request, nor a retry of one: before, each of its quick retries was
    /// counted as a request that failed.
    #[tokio::test]
    async fn a_write_refused_for_the_lease_is_no_request() {
        let (e, _) = flaky_engine_with(
            Flaky {
                budget: Some(Duration::from_millis(100)),
                ..Default::default()
            },
            None,
        );
        grant(&e, "document:1", 0, 3).await;
        let ops = e.store.take(3, Take::All, u64::MAX).await.unwrap();
        let r = e.clone().send_chunk(ops).await;
        assert_eq!(r.requests, 0);
        assert!(r.stop.as_ref().is_some_and(|s| s.error().is_busy()));
        assert_eq!(r.outcomes.len(), 3);
        assert!(r.outcomes.iter().all(|(_, o)| matches!(o, Outcome::Retry)));
        assert_eq!(e.stats.requests.load(Ordering::Relaxed), 0);
        assert_eq!(e.stats.retries.load(Ordering::Relaxed), 0);
    }

    /// Runs the pump's steps once: takes a window up to the newest op and
    /// queues what it cuts.
    async fn window(pump: &mut Pump) {
        let last = pump.engine.store.last_seq().await.unwrap();
        pump.raise(last);
        pump.fill().await;
        while let Some(w) = pump.taking.take() {
            let w = w.await;
            pump.taken(w);
            pump.fill().await;
        }
        while let Some((result, held)) = pump.running.next().await {
            pump.done(result, held);
        }
    }

    /// The ops of each job queued so far.
    fn job_sizes(queue: &crate::queue::FakeQueue) -> Vec<usize> {
        let pushed = queue.pushed.lock().unwrap();
        pushed.iter().map(|j| j.ops.len()).collect()
    }

    /// A pump flushing on its own that may hold groups back: as with the
    /// Redis store, after a look that found a full batch pending.
    fn holding_pump(e: &Arc<Engine>) -> Pump {
        let mut pump = Pump::new(e.clone(), true);
        pump.may_carry = true;
        pump.by_size = true;
        pump
    }

    /// Flushing on its own for full batches, the pump holds a partial group
    /// of one object back for the next window (ops from many callers arrive
    /// interleaved, and cut at once they make requests of a few dozen
    /// tuples), until it fills a chunk or `flush.interval` has passed since
    /// it was first held; ops due by age are never held.
    #[tokio::test]
    async fn on_its_own_the_pump_holds_partial_groups_for_the_next_window() {
        let queue = Arc::new(crate::queue::FakeQueue::default());
        let e = engine_with(Some(queue.clone()));
        let jobs = || job_sizes(&queue);
        grant(&e, "document:1", 0, 60).await;
        grant(&e, "document:2", 0, 60).await;
        let mut pump = holding_pump(&e);
        window(&mut pump).await;
        assert_eq!(jobs(), Vec::<usize>::new(), "both groups held back");
        assert_eq!(pump.carry.len(), 120);
        assert!(pump.carry_deadline().is_some());

        grant(&e, "document:1", 60, 100).await;
        window(&mut pump).await;
        assert_eq!(jobs(), [100], "document:1 filled a chunk");
        assert_eq!(pump.carry.len(), 60);

        // Held since longer than the interval: written as it is.
        pump.carry_since = Some(Instant::now() - e.cfg.interval);
        assert!(pump.carry_deadline().is_none());
        window(&mut pump).await;
        assert_eq!(jobs(), [100, 60]);
        assert!(pump.carry.is_empty());

        // Due by age, not for a full batch: written as it is at once.
        pump.by_size = false;
        grant(&e, "document:3", 0, 30).await;
        window(&mut pump).await;
        assert_eq!(jobs(), [100, 60, 30]);
    }

    /// A check waiting for a revoke releases the ops held back for a
    /// fuller chunk, as one waiting for a grant does: the revoke may wait
    /// behind a grant of its tuple held back, for up to `flush.interval`
    /// (set longer than `check.revoke_wait_timeout`, the check failed
    /// closed). Before, only a check waiting for a grant released them.
    #[tokio::test]
    async fn a_check_waiting_for_a_revoke_releases_held_back_ops() {
        let queue = Arc::new(crate::queue::FakeQueue::default());
        let e = engine_with(Some(queue.clone()));
        grant(&e, "document:1", 0, 60).await;
        let mut pump = holding_pump(&e);
        window(&mut pump).await;
        assert_eq!(pump.carry.len(), 60);
        let t = TupleKey::new("user:u000", "viewer", "document:1").unwrap();
        e.store.push(&t, Op::Revoke).await.unwrap();
        e.revoke_wanted.store(true, Ordering::Relaxed);
        pump.plan().await;
        window(&mut pump).await;
        assert!(pump.carry.is_empty(), "{} held back", pump.carry.len());
        assert_eq!(job_sizes(&queue).first(), Some(&60));
    }

    /// When writes are quick (queue mode: a job is queued in a moment),
    /// windows are small: a partial group is held across as many of them as
    /// come within `flush.interval`, not a fixed number, and then written,
    /// once, instead of being held again.
    #[tokio::test]
    async fn small_windows_hold_a_group_until_it_fills_or_the_interval_passes() {
        let queue = Arc::new(crate::queue::FakeQueue::default());
        let e = engine_with(Some(queue.clone()));
        let jobs = || job_sizes(&queue);
        let mut pump = holding_pump(&e);
        for step in 0..10 {
            grant(&e, "document:1", step * 10, step * 10 + 10).await;
            window(&mut pump).await;
        }
        assert!(10 > MAX_CARRIES as usize);
        assert_eq!(
            jobs(),
            [100],
            "held over ten windows until it filled a chunk"
        );
        assert!(pump.carry.is_empty());

        grant(&e, "document:2", 0, 10).await;
        window(&mut pump).await;
        assert_eq!(pump.carry.len(), 10);
        // Held for longer than the interval: written as it is, and the pump
        // goes on (it had held it again and again without end).
        pump.carry_since = Some(Instant::now() - e.cfg.interval);
        pump.stage(Vec::new());
        assert!(!pump.should_carry(pump.next_cut(100), 100));
        window(&mut pump).await;
        assert_eq!(jobs(), [100, 10]);
        assert!(pump.carry.is_empty());
    }

    /// Within one flush (not holding: a `flush()` waits), a partial group of
    /// any size waits for the flush's next window, where the rest of its
    /// object may come (many callers' first ops on their next objects): cut
    /// at once, it would be a request of a few tuples. At the flush's last
    /// window it is cut as it is.
    #[tokio::test]
    async fn within_a_flush_even_a_small_partial_group_waits_for_the_next_window() {
        let e = engine();
        let mut pump = Pump::new(e.clone(), false);
        stage_small_beside_large(&e, &mut pump).await;
        let n = pump.next_cut(100);
        assert_eq!(n, 3, "document:1's group alone: document:2's is large");
        (pump.cursor, pump.target) = (103, 10_000);
        assert!(
            pump.should_carry(n, 100),
            "more windows are due in this flush"
        );
        pump.cursor = pump.target;
        assert!(!pump.should_carry(n, 100), "the flush's last window");
    }

    /// Staged ops parked while flushing is stopped go back to the store in
    /// the background: with Redis failing too, giving them back is retried
    /// for up to two minutes, and the pump, waiting for it in its own loop,
    /// answered no shutdown or flush and polled no Write meanwhile.
    #[tokio::test]
    async fn parking_staged_ops_does_not_wait_for_the_store() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (e, _) = flaky_engine_with(
            Flaky {
                finish_gate: Some(gate.clone()),
                ..Default::default()
            },
            None,
        );
        grant(&e, "document:1", 0, 10).await;
        let mut pump = Pump::new(e.clone(), true);
        let ops = e.store.take(1000, Take::All, u64::MAX).await.unwrap();
        pump.stage(ops);
        e.stats
            .set_stopped(Some(Error::config("the store is not found")));
        pump.park_if_idle();
        assert!(pump.staged.is_empty() && pump.carry.is_empty());
        assert_eq!(pump.running.len(), 1, "given back in the background");
        gate.add_permits(1);
        let next = tokio::time::timeout(Duration::from_secs(10), pump.running.next());
        let (result, held) = next.await.expect("the give-back ends").unwrap();
        pump.done(result, held);
        assert_eq!(e.store.pending().await.unwrap().total, 10);
        assert_eq!(pump.totals.retried, 0, "never sent, so not retried");
    }

    /// A partial group held back keeps its count, and the time it was
    /// first held, while it is staged again and more windows are staged
    /// before it is cut (under a backlog the next window is taken while
    /// this one is sent): held `MAX_CARRIES` times within a flush, or for
    /// `flush.interval` flushing on its own, it is cut as it is. Before,
    /// only held ops kept a count, and the pump's own clock started again
    /// whenever none was held: a group sorting last in each window was
    /// held for as long as the backlog lasted.
    #[tokio::test]
    async fn a_group_held_back_again_and_again_is_cut_in_the_end() {
        let e = engine();
        let mut pump = Pump::new(e.clone(), false);
        stage_small_beside_large(&e, &mut pump).await;
        (pump.cursor, pump.target) = (103, 10_000);
        let hold_again = |pump: &mut Pump| {
            let n = pump.next_cut(100);
            assert_eq!(n, 3, "document:1's group");
            pump.hold_back(n);
            // The next window, with the group staged again after what is
            // staged; then another, staged before the group is cut.
            pump.stage(Vec::new());
            pump.stage(Vec::new());
            let n = pump.next_cut(100);
            if n == 100 {
                pump.staged.drain(..n);
            }
        };
        for round in 0..MAX_CARRIES {
            assert!(pump.should_carry(pump.next_cut(100), 100), "round {round}");
            hold_again(&mut pump);
        }
        assert!(
            !pump.should_carry(pump.next_cut(100), 100),
            "held {MAX_CARRIES} times: cut as it is"
        );

        // Flushing on its own: bounded by the time since it was first
        // held, whatever the pump's clock for held ops says.
        let e = engine();
        let mut pump = holding_pump(&e);
        stage_small_beside_large(&e, &mut pump).await;
        (pump.cursor, pump.target) = (103, 10_000);
        assert!(pump.holding());
        assert!(pump.should_carry(pump.next_cut(100), 100));
        hold_again(&mut pump);
        // First held half an interval ago, and held again now: the wait
        // for the next window ends half an interval from now.
        let half = e.cfg.interval / 2;
        for c in pump.carried.values_mut() {
            c.1 -= half;
        }
        pump.carry_since = None;
        assert!(pump.should_carry(pump.next_cut(100), 100));
        pump.hold_back(pump.next_cut(100));
        let deadline = pump.carry_deadline().expect("held for the next window");
        assert!(deadline <= Instant::now() + half, "{deadline:?}");
        pump.stage(Vec::new());
        let n = pump.next_cut(100);
        if n == 100 {
            pump.staged.drain(..n);
        }
        for c in pump.carried.values_mut() {
            c.1 -= half;
        }
        // None held now (all staged again): the pump's clock starts over.
        pump.carry_since = None;
        assert!(pump.holding());
        assert!(
            !pump.should_carry(pump.next_cut(100), 100),
            "first held an interval ago: cut as it is"
        );
    }

    /// A window whose take began before a chunk ended and comes back empty
    /// says nothing of what is due after that end: with the Redis store the
    /// chunk's finish may have run after the take, making an op ready
    /// (one blocked behind the chunk's write), with both answered before
    /// the pump looked. The pump does not take its target for done then,
    /// and a flush() waiting for that op is not answered. Before, the empty
    /// window marked the target exhausted, and the flush() was answered
    /// with the op still pending.
    #[tokio::test]
    async fn an_empty_window_taken_before_a_chunk_ended_says_nothing() {
        let e = engine();
        grant(&e, "document:1", 0, 1).await;
        let mut pump = Pump::new(e.clone(), false);
        pump.target = 1;
        // A take began (and, in Redis, ran before the op was ready) ...
        pump.taking_since = pump.changes;
        pump.taking = Some(Box::pin(async {
            Window {
                result: Ok(Vec::new()),
                cursor: 1,
                target: 1,
            }
        }));
        // ... then a chunk ended, and only then the take was answered.
        add_one(&mut pump.running_firsts, 1);
        pump.done(
            ChunkResult::new(0),
            Held {
                first: 1,
                keys: Vec::new(),
            },
        );
        let w = crate::flush::task::next_window(&mut pump.taking).await;
        pump.taken(w);
        assert_eq!(pump.exhausted, None);
        assert!(!pump.reached(1), "the op is still pending");
        // A window that began after the end says so.
        pump.fill().await;
        let w = crate::flush::task::next_window(&mut pump.taking).await;
        assert_eq!(w.result.as_ref().map(Vec::len).ok(), Some(1));
    }

    /// An empty window taken for a target it raised itself (under a
    /// backlog it takes up to the newest op) marks that target done: a
    /// raised target is no change that could have made ops ready. Else,
    /// under steady pushes, every empty window would be taken again at
    /// once.
    #[tokio::test]
    async fn an_empty_window_for_a_raised_target_marks_it_done() {
        let mut pump = Pump::new(engine(), false);
        pump.target = 1;
        pump.taking_since = pump.changes;
        pump.taking = Some(Box::pin(async {
            Window {
                result: Ok(Vec::new()),
                cursor: 5,
                target: 5,
            }
        }));
        let w = crate::flush::task::next_window(&mut pump.taking).await;
        pump.taken(w);
        assert_eq!(pump.exhausted, Some(5));
    }

    /// Grants with large condition contexts (30 KB each) are cut into
    /// requests under [`REQUEST_BYTES`], not 100 to a request that OpenFGA
    /// would refuse for its size; ordinary tuples still go 100 at a time.
    #[tokio::test]
    async fn chunks_stay_under_the_request_size() {
        let e = engine();
        let mut context = serde_json::Map::new();
        context.insert("cidr".into(), "1".repeat(30_000).into());
        for i in 0..100 {
            let t = TupleKey::new(format!("user:u{i}"), "viewer", "document:big")
                .unwrap()
                .with_condition("in_company_network", Some(context.clone()))
                .unwrap();
            e.store.push(&t, Op::Grant).await.unwrap();
        }
        grant(&e, "document:small", 0, 100).await;
        let mut pump = Pump::new(e.clone(), false);
        let ops = e.store.take(1000, Take::All, u64::MAX).await.unwrap();
        pump.stage(ops);
        let mut cuts = Vec::new();
        while !pump.staged.is_empty() {
            let n = pump.next_cut(100);
            let bytes: usize = pump
                .staged
                .range(..n)
                .map(|t| request_bytes(&t.tuple))
                .sum();
            assert!(n == 1 || bytes <= REQUEST_BYTES, "{n} ops, {bytes} bytes");
            cuts.push((pump.staged[0].tuple.object.clone(), n));
            pump.staged.drain(..n);
        }
        let big: Vec<usize> = cuts
            .iter()
            .filter(|(o, _)| o == "document:big")
            .map(|c| c.1)
            .collect();
        assert_eq!(big.iter().sum::<usize>(), 100);
        assert!(big.iter().all(|&n| n <= 13), "{cuts:?}");
        assert!(cuts.contains(&("document:small".into(), 100)), "{cuts:?}");
    }

    /// A window stops at its target, unless callers are outpacing the
    /// writes: then it takes what arrived after the target was set too,
    /// and reports the target it took up to.
    #[tokio::test]
    async fn a_window_under_a_backlog_takes_what_arrived_since_the_target() {
        let e = engine();
        grant(&e, "document:1", 0, 300).await;
        let w = take_window(e.clone(), 0, 100, 3200, false).await;
        let ops = w.result.unwrap();
        assert_eq!((ops.len(), w.target), (100, 100));
        assert!(ops.iter().all(|t| t.seq <= 100));

        let w = take_window(e.clone(), w.cursor, 100, 3200, true).await;
        let ops = w.result.unwrap();
        assert_eq!((ops.len(), w.target), (200, 300));
        assert!(ops.iter().all(|t| t.seq > 100));
    }

    /// Far behind the target (a process new to a shared store, whose
    /// sequence numbers count every op the store has seen), a window does
    /// not walk the empty ranges one call each: after the first empty one
    /// it takes the oldest ops up to the target. Before, this took 91
    /// calls (one per 10 sequence numbers); on a store that has seen a
    /// billion ops, 80,000.
    #[tokio::test]
    async fn a_window_far_behind_its_target_skips_the_empty_ranges() {
        let (e, store) = flaky_engine_with(
            Flaky {
                shared: true,
                ..Default::default()
            },
            None,
        );
        grant(&e, "document:1", 0, 1_000).await;
        // Taken long ago: the ops up to 900 are gone.
        let old = e.store.take(900, Take::All, 900).await.unwrap();
        assert_eq!(old.len(), 900);
        let before = store.takes.load(Ordering::Relaxed);
        let w = take_window(e.clone(), 0, 1_000, 10, false).await;
        let ops = w.result.unwrap();
        assert_eq!(ops.len(), 10);
        assert!(ops.iter().all(|t| t.seq > 900));
        // Taken up to its newest op: the next window goes on from there.
        let newest = ops.iter().map(|t| t.first).max().unwrap();
        assert_eq!(w.cursor, newest);
        let calls = store.takes.load(Ordering::Relaxed) - before;
        assert!(calls <= 2, "{calls} take calls");
    }

    /// A stop cuts off only a Write under way: once answered, a chunk
    /// (then recording its outcomes) has none, so a stop need not keep the
    /// writer's lease for it. A Write whose outcome is unknown keeps the
    /// lease to its hold's end from the moment that is seen (timed out, or
    /// its future dropped unanswered), before any chunk waits out a hold:
    /// a stop may come between the two.
    #[tokio::test]
    async fn only_a_write_under_way_is_cut_off_by_a_stop() {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        let write = || Mock::given(method("POST")).and(path("/stores/01STORE/write"));
        write()
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!({}))
                    // Long enough for the look below on a loaded machine.
                    .set_delay(Duration::from_secs(5)),
            )
            .up_to_n_times(1)
            .with_priority(1)
            .mount(&server)
            .await;
        write()
            .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(60)))
            .mount(&server)
            .await;
        let engine = |timeout| {
            let mut e = Engine::for_tests(None);
            e.writer = crate::openfga::Client::builder(server.uri())
                .timeout(timeout)
                .build()
                .unwrap();
            Arc::new(e)
        };
        let send = |e: &Arc<Engine>, from: usize| {
            let e = e.clone();
            tokio::spawn(async move {
                grant(&e, "document:1", from, from + 1).await;
                let ops = e.store.take(10, Take::All, u64::MAX).await.unwrap();
                let no_retries = QuickRetries {
                    transient: 0,
                    conflicts: 0,
                };
                e.write_chunk_as(None, None, ops, no_retries).await
            })
        };
        let requests = |n: usize| {
            let server = &server;
            let arrived = async move {
                while server.received_requests().await.unwrap_or_default().len() < n {
                    tokio::task::yield_now().await;
                }
            };
            async move {
                tokio::time::timeout(Duration::from_secs(30), arrived)
                    .await
                    .expect("the Write reached the mock")
            }
        };
        let hold = |e: &Engine| *e.holds_until.lock().unwrap();

        // Answered: under way until then, no hold.
        let e = engine(Duration::from_secs(30));
        let chunk = send(&e, 0);
        requests(1).await;
        assert_eq!(e.writes_under_way(), 1, "sent, not answered");
        let r = chunk.await.unwrap();
        assert!(r.unsure_at.is_none() && r.stop.is_none());
        assert_eq!(e.writes_under_way(), 0, "answered: recording is no Write");
        assert_eq!(hold(&e), None);

        // Dropped unanswered (a stop, a panic): a hold from then.
        let chunk = send(&e, 1);
        requests(2).await;
        assert_eq!(e.writes_under_way(), 1);
        let dropped = Instant::now();
        chunk.abort();
        assert!(chunk.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(e.writes_under_way(), 0);
        let until = hold(&e).expect("noted as it was dropped");
        assert!(until >= dropped + e.cfg.unknown_outcome_hold, "{until:?}");

        // Timed out: the outcome is unknown; a hold from the timeout, noted
        // as the chunk sees it, before any wait_out.
        let e = engine(Duration::from_millis(300));
        let sent = Instant::now();
        let r = send(&e, 2).await.unwrap();
        assert!(r.unsure_at.is_some(), "timed out: outcome unknown");
        assert_eq!(e.writes_under_way(), 0);
        let until = hold(&e).expect("noted at once");
        let earliest = sent + Duration::from_millis(300) + e.cfg.unknown_outcome_hold;
        assert!(until >= earliest, "{until:?} before {earliest:?}");
    }
}
