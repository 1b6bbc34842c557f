//! The in-process store: pending ops in shards, each behind its own mutex.
//!
//! A key's shard is chosen by its object, so every op on one object is in
//! one shard: a check reads its object's ops from one shard, and callers
//! granting on different objects rarely wait for each other. A check that
//! depends on other objects' tuples locks every shard it reads at once, so
//! it sees one moment (it lists at most a check's contextual tuples). Every
//! operation holds a shard's lock for a short, bounded time (a push is a few
//! map operations; a take moves a bounded number of ops and builds the
//! tuples after unlocking), so acknowledgement latency stays flat while a
//! flush runs.
//!
//! Ready ops wait in per-relation queues ordered by `first`, the sequence
//! number of the op that made the key pending: coalescing keeps a key's
//! place, so a hot key is not starved, and a flush can stop exactly at the
//! ops acknowledged before it started. Sequence numbers come from one atomic
//! counter, bumped under the shard's lock, so a take that reads the counter
//! and then locks a shard sees every op numbered below it.
//!
//! Memory per pending op is kept small on purpose (one shared key string, a
//! 40-byte slot, one queue entry), because the buffer may hold a million ops.

use std::collections::{btree_map, BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures::future::{self, BoxFuture};

use super::{
    counts_for, key_of, tuple_of, DeadLetter, Finished, Outcome, Pending, Purged, Pushed, Relevant,
    Replayed, Store, Take, Taken, Unfinished,
};
use crate::error::{Error, Kind, Result};
use crate::model::Dep;
use crate::tuple::{Condition, Op, TupleKey};

/// Shards of the store: enough that two calling threads rarely meet (with
/// 16, two callers each granting on one object shared a shard one time in
/// 16, and the one that waited parked on the mutex).
const SHARDS: usize = 64;

/// Ops a take or a finish handles per hold of a shard's lock, so a caller
/// pushing to that shard never waits for a whole Write's worth of map
/// updates (a flush's chunks are in key order: one chunk is often one shard).
const PER_HOLD: usize = 16;

/// The memory store.
pub(crate) struct MemoryStore {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a shard from an object; fixed per store.
    hasher: std::collections::hash_map::RandomState,
    capacity: usize,
    /// The last sequence number handed out.
    seq: AtomicU64,
    /// Distinct keys held (pending or in flight): what capacity bounds.
    keys: AtomicUsize,
    /// Pending (not in flight) ops, by kind: `[grants, revokes]`.
    pending: [AtomicUsize; 2],
    in_flight: AtomicUsize,
    /// Where the next take starts, so no shard is always last.
    next_shard: AtomicUsize,
    epoch: Instant,
    dead: Mutex<DeadLetters>,
    /// Most letters kept (`buffer.dead_letter_capacity`): the oldest go
    /// first, so the set never grows without bound.
    letter_capacity: usize,
    /// Set by `close` (shutdown): no push changes anything after it.
    closed: AtomicBool,
    /// Keys with dead letters: while 0, applying an op needs no look at them.
    dead_keys: AtomicUsize,
    written: super::written::Written,
}

#[derive(Default)]
struct DeadLetters {
    /// By id: in the order they died.
    letters: BTreeMap<u64, DeadLetter>,
    next_id: u64,
    /// The keys that have letters.
    keys: HashMap<String, KeyLetters>,
}

/// One key's letters.
struct KeyLetters {
    /// The id of its newest letter, or 0 once a newer op on the key was
    /// applied or cleared: a letter is current (replayable) only while this
    /// names it and the key has no op buffered. Removing the newest letter
    /// leaves its id here, so the older ones stay superseded.
    newest: u64,
    /// How many letters the key has: at 0 it needs no watching.
    count: usize,
}

impl DeadLetters {
    fn add(&mut self, letter: DeadLetter) {
        let k = self
            .keys
            .entry(key_of(&letter.tuple))
            .or_insert(KeyLetters {
                newest: 0,
                count: 0,
            });
        k.newest = letter.id;
        k.count += 1;
        self.letters.insert(letter.id, letter);
    }

    /// A newer op on `key` was cleared: its letters are stale, but for a
    /// revoke's that died of transient causes (as in the Redis store: the op
    /// dropped may never have reached OpenFGA, which may still hold what
    /// that revoke revokes).
    fn supersede_cleared(&mut self, key: &str, seq: u64) {
        let owed = self
            .keys
            .get(key)
            .and_then(|k| self.letters.get(&k.newest))
            .is_some_and(|d| d.transient && d.op == Op::Revoke);
        if !owed {
            self.supersede(key, seq);
        }
    }

    /// The op `seq` on `key` ended (applied, cleared): letters of older ops
    /// are stale. A revoke owed again when a newer grant died (see
    /// `finish_now`) is older than that grant's letter, which stays.
    fn supersede(&mut self, key: &str, seq: u64) {
        let Some(k) = self.keys.get_mut(key) else {
            return;
        };
        if self.letters.get(&k.newest).is_none_or(|d| d.seq <= seq) {
            k.newest = 0;
        }
    }

    /// The letter to drop at capacity: the oldest, sparing letters of
    /// transient deaths while there is another (`unfinished` counts them;
    /// this store writes none today, as its checks never look at letters).
    fn oldest_to_evict(&self) -> Option<u64> {
        let mut ids = self.letters.values();
        ids.clone()
            .find(|d| !d.transient)
            .or_else(|| ids.next())
            .map(|d| d.id)
    }

    /// Whether letter `d` (of `key`, whose newest op buffered is
    /// `buffered`) is superseded: an op newer than it is buffered, or one
    /// ended. An older op buffered (a revoke owed before it, see
    /// `finish_now`) leaves it current.
    fn superseded(&self, key: &str, d: &DeadLetter, buffered: Option<u64>) -> bool {
        buffered.is_some_and(|s| s > d.seq) || !self.is_newest(key, d.id)
    }

    /// Whether letter `id` is the newest of `key`, with no newer op ended.
    fn is_newest(&self, key: &str, id: u64) -> bool {
        self.keys.get(key).is_some_and(|k| k.newest == id)
    }

    fn remove(&mut self, id: u64) -> Option<DeadLetter> {
        let d = self.letters.remove(&id)?;
        let key = key_of(&d.tuple);
        if let Some(k) = self.keys.get_mut(&key) {
            k.count -= 1;
            if k.count == 0 {
                self.keys.remove(&key);
            }
        }
        Some(d)
    }
}

/// The ops of the objects that hash to one shard.
#[derive(Default)]
struct Shard {
    parts: Vec<Part>,
    /// object type -> relation -> index in `parts`.
    part_of: crate::NameMap<String, crate::NameMap<String, usize>>,
}

/// Parts a shard keeps before a new `type#relation` takes the place of an
/// empty one. Revokes are not checked against the model, so relation names
/// taken from input would otherwise add a part each for good, and every
/// take, count and clear walks a shard's parts under its lock.
const PARTS_KEPT: usize = 256;

/// The ops of one `type#relation` in one shard.
#[derive(Default)]
struct Part {
    /// Ordered, so the keys of one object (`object#relation@...`) are one
    /// range: a check reads just its object's ops.
    slots: BTreeMap<Arc<str>, Slot>,
    /// Keys whose pending op can be taken now, by kind (`[grants, revokes]`),
    /// ordered by the pending op's `first`.
    ready: [BTreeMap<u64, Arc<str>>; 2],
    /// Ops pending or in flight, by kind: `[grants, revokes]`.
    ops: [usize; 2],
}

#[derive(Default)]
struct Slot {
    pending: Option<Entry>,
    /// Boxed: few slots are in flight at once, and this keeps every slot small.
    in_flight: Option<Box<Entry>>,
}

#[derive(Clone)]
struct Entry {
    seq: u64,
    /// The seq of the op that made the key pending: its place in the queue.
    first: u64,
    condition: Option<Box<Condition>>,
    /// When the key got a pending op, in centiseconds after the store's epoch.
    since: u32,
    attempts: u16,
    op: Op,
    owes: Owes,
}

/// Whether a grant owes a revoke of its tuple: pushed over a revoke that
/// is not known to have reached OpenFGA, should OpenFGA refuse the grant
/// for good, that revoke is still owed, or the tuple it revoked would stay
/// (see `finish_now`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owes {
    No,
    /// Pushed over a pending revoke (or a grant that owed one).
    Yes,
    /// Pushed while a revoke (or a grant that owed one) was being written:
    /// owed unless that write lands (see `finish_now`).
    UnlessItLands,
}

impl Owes {
    /// What a grant pushed on a key whose newest op is `pending` (else
    /// `in_flight`) owes.
    fn of_grant(pending: Option<&Entry>, in_flight: Option<&Entry>) -> Owes {
        match (pending, in_flight) {
            (Some(p), _) if p.op == Op::Revoke => Owes::Yes,
            (Some(p), _) => p.owes,
            (None, Some(f)) if f.op == Op::Revoke || f.owes != Owes::No => Owes::UnlessItLands,
            _ => Owes::No,
        }
    }
}

fn kind(op: Op) -> usize {
    match op {
        Op::Grant => 0,
        Op::Revoke => 1,
    }
}

impl Shard {
    /// Whether an op on `t` (whose key is `key`) is buffered, pending or in
    /// flight.
    fn holds(&self, t: &TupleKey, key: &str) -> bool {
        self.part(t.object_type(), &t.relation)
            .is_some_and(|p| self.parts[p].slots.contains_key(key))
    }

    /// The seq of the newest op buffered on `t` (key `key`): pending, else
    /// in flight.
    fn newest_seq(&self, t: &TupleKey, key: &str) -> Option<u64> {
        let p = self.part(t.object_type(), &t.relation)?;
        let slot = self.parts[p].slots.get(key)?;
        slot.pending
            .as_ref()
            .or(slot.in_flight.as_deref())
            .map(|e| e.seq)
    }

    fn part(&self, object_type: &str, relation: &str) -> Option<usize> {
        self.part_of.get(object_type)?.get(relation).copied()
    }

    fn part_index(&mut self, object_type: &str, relation: &str) -> usize {
        if let Some(i) = self.part(object_type, relation) {
            return i;
        }
        let empty = (self.parts.len() >= PARTS_KEPT)
            .then(|| self.parts.iter().position(|p| p.slots.is_empty()))
            .flatten();
        let i = match empty {
            Some(i) => {
                // Its old name goes; the index stays (see `take_from`).
                self.part_of.retain(|_, rels| {
                    rels.retain(|_, p| *p != i);
                    !rels.is_empty()
                });
                self.parts[i] = Part::default();
                i
            }
            None => {
                self.parts.push(Part::default());
                self.parts.len() - 1
            }
        };
        self.part_of
            .entry(object_type.to_owned())
            .or_default()
            .insert(relation.to_owned(), i);
        i
    }
}

/// What a take moves out of a shard, turned into a [`Taken`] after unlocking.
struct Moved {
    key: Arc<str>,
    condition: Option<Condition>,
    seq: u64,
    first: u64,
    op: Op,
}

impl MemoryStore {
    #[cfg(test)]
    pub fn new(capacity: usize) -> Self {
        Self::keeping_letters(
            capacity,
            crate::config::BufferConfig::default().dead_letter_capacity,
        )
    }

    pub fn keeping_letters(capacity: usize, letter_capacity: usize) -> Self {
        MemoryStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            hasher: Default::default(),
            capacity,
            seq: AtomicU64::new(0),
            keys: AtomicUsize::new(0),
            pending: [AtomicUsize::new(0), AtomicUsize::new(0)],
            in_flight: AtomicUsize::new(0),
            next_shard: AtomicUsize::new(0),
            epoch: Instant::now(),
            dead: Mutex::new(DeadLetters {
                next_id: 1,
                ..Default::default()
            }),
            letter_capacity: letter_capacity.max(1),
            closed: AtomicBool::new(false),
            dead_keys: AtomicUsize::new(0),
            written: Default::default(),
        }
    }

    fn shard_of(&self, object: &str) -> usize {
        let mut h = self.hasher.build_hasher();
        h.write(object.as_bytes());
        (h.finish() % SHARDS as u64) as usize
    }

    /// Every `(type, relation)` with ops pending or in flight, of
    /// `object_type` only if given, across the shards.
    fn relations_with_ops(
        &self,
        object_type: Option<&str>,
    ) -> std::collections::BTreeSet<(String, String)> {
        let mut names = std::collections::BTreeSet::new();
        for s in 0..SHARDS {
            relations_in(&self.lock(s), object_type, &mut names);
        }
        names
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Shard> {
        // Every update below keeps the maps consistent before it can panic
        // (nothing in them panics on input), so a poisoned lock still guards
        // sound data: keep serving rather than fail every later call.
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    fn dead(&self) -> MutexGuard<'_, DeadLetters> {
        self.dead.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Centiseconds since the epoch, wrapping every 497 days (ages are
    /// differences, right for ops younger than that): saturating, every op
    /// of a process up that long looked as old as the process.
    fn now_cs(&self) -> u32 {
        (self.epoch.elapsed().as_millis() / 10) as u32
    }

    fn pending_total(&self) -> usize {
        self.pending[0].load(Ordering::Relaxed) + self.pending[1].load(Ordering::Relaxed)
    }

    fn push_now(&self, tuple: &TupleKey, op: Op) -> Result<Pushed> {
        let mut shard = self.lock(self.shard_of(&tuple.object));
        self.push_locked(&mut shard, tuple, op, None)
    }

    /// Pushes with the tuple's shard locked. A new key's op takes `place`
    /// (an older op's place in line and when it became pending) if given,
    /// else its own seq and now.
    fn push_locked(
        &self,
        shard: &mut Shard,
        tuple: &TupleKey,
        op: Op,
        place: Option<(u64, u32)>,
    ) -> Result<Pushed> {
        // Under the shard lock, before anything changes: a push refused
        // here merged into no acknowledged op (see `close`).
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::new(Kind::Shutdown));
        }
        let key = shared_key(tuple);
        let condition = tuple.condition.clone().map(Box::new);
        let now = self.now_cs();
        let part_no = shard.part_index(tuple.object_type(), &tuple.relation);
        let part = &mut shard.parts[part_no];
        // One search of the ordered map, whether the key is new or not.
        let (coalesced, seq) = match part.slots.entry(key) {
            btree_map::Entry::Vacant(v) => {
                if self.keys.fetch_add(1, Ordering::Relaxed) >= self.capacity {
                    self.keys.fetch_sub(1, Ordering::Relaxed);
                    return Err(Error::new(Kind::BufferFull {
                        capacity: self.capacity,
                        waited: None,
                        stopped: None,
                    }));
                }
                // Numbered under the shard's lock: see the module docs.
                let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
                let (first, since) = place.filter(|p| p.0 < seq).unwrap_or((seq, now));
                part.ready[kind(op)].insert(first, v.key().clone());
                v.insert(Slot {
                    pending: Some(Entry {
                        seq,
                        first,
                        condition,
                        since,
                        attempts: 0,
                        op,
                        owes: Owes::No,
                    }),
                    in_flight: None,
                });
                (false, seq)
            }
            btree_map::Entry::Occupied(mut o) => {
                let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
                let k = o.key().clone();
                let slot = o.get_mut();
                let blocked = slot.in_flight.is_some();
                let owes = match op {
                    Op::Grant => Owes::of_grant(slot.pending.as_ref(), slot.in_flight.as_deref()),
                    Op::Revoke => Owes::No,
                };
                let (first, since, coalesced) = match slot.pending.take() {
                    Some(old) => {
                        part.ops[kind(old.op)] -= 1;
                        self.pending[kind(old.op)].fetch_sub(1, Ordering::Relaxed);
                        if !blocked {
                            part.ready[kind(old.op)].remove(&old.first);
                        }
                        (old.first, old.since, true)
                    }
                    None => (seq, now, false),
                };
                slot.pending = Some(Entry {
                    seq,
                    first,
                    condition,
                    since,
                    attempts: 0,
                    op,
                    owes,
                });
                if !blocked {
                    part.ready[kind(op)].insert(first, k);
                }
                (coalesced, seq)
            }
        };
        part.ops[kind(op)] += 1;
        self.pending[kind(op)].fetch_add(1, Ordering::Relaxed);
        Ok(Pushed {
            coalesced,
            pending: self.pending_total(),
            seq,
        })
    }

    /// Moves up to `max` ready ops of kind `k` with `first <= up_to` out of
    /// one shard, [`PER_HOLD`] at a time.
    fn take_from(&self, shard: usize, k: usize, max: usize, up_to: u64, out: &mut Vec<Moved>) {
        let mut moved = 0;
        // Parts are only ever appended, or an empty one named anew in its
        // place, so an index stays good across holds.
        let mut part_no = 0;
        loop {
            let mut g = self.lock(shard);
            let mut held = 0;
            let moved_before = moved;
            while held < PER_HOLD && moved < max {
                let Some(part) = g.parts.get_mut(part_no) else {
                    break;
                };
                // Ops that became pending after the flush started wait
                // for the next one, so a flush always ends.
                let Some(entry) = part.ready[k].first_entry().filter(|e| *e.key() <= up_to) else {
                    part_no += 1;
                    continue;
                };
                held += 1;
                let key = entry.remove();
                let Some(slot) = part.slots.get_mut(&key) else {
                    continue;
                };
                let Some(e) = slot.pending.take() else {
                    continue;
                };
                out.push(Moved {
                    key,
                    condition: e.condition.as_deref().cloned(),
                    seq: e.seq,
                    first: e.first,
                    op: e.op,
                });
                slot.in_flight = Some(Box::new(e));
                moved += 1;
            }
            // Under the lock, in flight first: a count read under every
            // shard's lock (see `pending_counts`) never misses these ops.
            let here = moved - moved_before;
            self.in_flight.fetch_add(here, Ordering::Relaxed);
            self.pending[k].fetch_sub(here, Ordering::Relaxed);
            drop(g);
            if held < PER_HOLD || moved >= max {
                break;
            }
        }
    }

    fn take_now(&self, max: usize, what: Take, up_to: u64) -> Vec<Taken> {
        let kinds: &[Op] = match what {
            Take::Revokes => &[Op::Revoke],
            Take::All => &[Op::Revoke, Op::Grant],
        };
        let start = self.next_shard.fetch_add(1, Ordering::Relaxed);
        let mut moved = Vec::with_capacity(max.min(4096));
        for &op in kinds {
            let k = kind(op);
            // Passes over the shards, an even share from each, until `max`
            // or nothing is left: locks are held for a bounded time, and no
            // shard is drained before the others get a turn.
            loop {
                let before = moved.len();
                let share = (max - moved.len()).div_ceil(SHARDS);
                for i in 0..SHARDS {
                    let room = (max - moved.len()).min(share);
                    if room == 0 {
                        break;
                    }
                    self.take_from((start + i) % SHARDS, k, room, up_to, &mut moved);
                }
                if moved.len() == before || moved.len() >= max {
                    break;
                }
            }
        }
        moved
            .into_iter()
            .map(|m| Taken {
                tuple: tuple_of(&m.key, m.condition),
                op: m.op,
                seq: m.seq,
                first: m.first,
                attempts: 0,
                term: 0,
            })
            .collect()
    }

    fn finish_now(&self, done: Vec<(Taken, Outcome)>) -> Finished {
        // Before the ops leave the in-flight set: see written.rs.
        self.written.note(
            done.iter()
                .filter(|(_, o)| matches!(o, Outcome::Applied))
                .map(|(t, _)| &t.tuple),
        );
        let mut f = Finished::default();
        let mut by_shard: Vec<Vec<(String, Taken, Outcome)>> =
            (0..SHARDS).map(|_| Vec::new()).collect();
        for (t, o) in done {
            by_shard[self.shard_of(&t.tuple.object)].push((key_of(&t.tuple), t, o));
        }
        for (shard, items) in by_shard.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let mut items = items.into_iter().peekable();
            while items.peek().is_some() {
                let mut g = self.lock(shard);
                for (key, taken, outcome) in items.by_ref().take(PER_HOLD) {
                    let Some(part_no) = g.part(taken.tuple.object_type(), &taken.tuple.relation)
                    else {
                        continue;
                    };
                    let part = &mut g.parts[part_no];
                    // One search for the stored key (the ready queue shares
                    // it) and its slot.
                    let one = (Bound::Included(key.as_str()), Bound::Included(key.as_str()));
                    let Some((k, slot)) = part.slots.range_mut::<str, _>(one).next() else {
                        continue;
                    };
                    let k = k.clone();
                    match &slot.in_flight {
                        Some(e) if e.seq == taken.seq => {}
                        // Not the op we sent: leave the slot alone.
                        _ => continue,
                    }
                    if matches!(outcome, Outcome::Keep) {
                        // Still owned by whoever holds it (a queued job).
                        continue;
                    }
                    let Some(entry) = slot.in_flight.take() else {
                        continue;
                    };
                    let entry = *entry;
                    part.ops[kind(entry.op)] -= 1;
                    self.in_flight.fetch_sub(1, Ordering::Relaxed);
                    let superseded = slot.pending.is_some();
                    // A grant pushed while this op was written owes what it
                    // owed unless its write landed.
                    if let Some(p) = slot
                        .pending
                        .as_mut()
                        .filter(|p| p.owes == Owes::UnlessItLands)
                    {
                        p.owes = match outcome {
                            Outcome::Applied => Owes::No,
                            _ => Owes::Yes,
                        };
                    }
                    match outcome {
                        Outcome::Applied => {
                            f.applied += 1;
                            if self.dead_keys.load(Ordering::Relaxed) > 0 {
                                self.dead().supersede(&key, entry.seq);
                            }
                        }
                        _ if superseded => f.superseded += 1,
                        Outcome::Dead {
                            reason,
                            code,
                            transient,
                        } => {
                            f.dead += 1;
                            // A grant refused for good that owes a revoke
                            // leaves the revoke pending again, in the grant's
                            // place in line: with every acknowledged op
                            // applied in order, the tuple is gone. The letter
                            // is numbered after it, so the revoke's write
                            // leaves the letter current (replayable).
                            let mut letter_seq = entry.seq;
                            if !transient && entry.op == Op::Grant && entry.owes != Owes::No {
                                let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
                                slot.pending = Some(Entry {
                                    seq,
                                    first: entry.first,
                                    condition: None,
                                    since: entry.since,
                                    attempts: 0,
                                    op: Op::Revoke,
                                    owes: Owes::No,
                                });
                                part.ops[kind(Op::Revoke)] += 1;
                                self.pending[kind(Op::Revoke)].fetch_add(1, Ordering::Relaxed);
                                f.repended += 1;
                                letter_seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
                            }
                            // Under the shard lock, so a replay never sees the
                            // key free before its newest letter exists.
                            let mut d = self.dead();
                            let id = d.next_id;
                            d.next_id += 1;
                            d.add(DeadLetter {
                                id,
                                tuple: taken.tuple,
                                op: entry.op,
                                seq: letter_seq,
                                first: entry.first,
                                reason,
                                code,
                                attempts: u32::from(entry.attempts) + 1,
                                dead_at: SystemTime::now(),
                                transient,
                                superseded: false,
                                place: Some((entry.first, entry.since)),
                            });
                            while d.letters.len() > self.letter_capacity {
                                let Some(oldest) = d.oldest_to_evict() else {
                                    break;
                                };
                                d.remove(oldest);
                                f.evicted += 1;
                            }
                            self.dead_keys.store(d.keys.len(), Ordering::Relaxed);
                        }
                        Outcome::Retry | Outcome::Stale | Outcome::Busy | Outcome::Keep => {
                            f.requeued += 1;
                            part.ops[kind(entry.op)] += 1;
                            self.pending[kind(entry.op)].fetch_add(1, Ordering::Relaxed);
                            slot.pending = Some(Entry {
                                attempts: entry.attempts.saturating_add(1),
                                ..entry
                            });
                        }
                    }
                    match &slot.pending {
                        // Unblocked, or requeued: ready again, in its old place.
                        Some(p) => {
                            part.ready[kind(p.op)].insert(p.first, k);
                        }
                        None => {
                            part.slots.remove(&k);
                            self.keys.fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }
        f
    }

    fn replay_now(&self, ids: Option<&[u64]>, only_transient: bool) -> Result<Replayed> {
        let chosen: Vec<DeadLetter> = self
            .dead()
            .letters
            .values()
            .filter(|d| ids.is_none_or(|ids| ids.contains(&d.id)))
            .filter(|d| !only_transient || d.transient)
            .cloned()
            .collect();
        let mut r = Replayed::default();
        for (i, d) in chosen.iter().enumerate() {
            let key = key_of(&d.tuple);
            let mut shard = self.lock(self.shard_of(&d.tuple.object));
            let buffered = shard.newest_seq(&d.tuple, &key);
            let mut dead = self.dead();
            if !dead.letters.contains_key(&d.id) {
                continue; // purged meanwhile
            }
            if dead.superseded(&key, d, buffered) {
                dead.remove(d.id);
                r.superseded += 1;
            } else if buffered.is_some() {
                // Behind a revoke owed before it (see `finish_now`): it
                // stays, replayable once that is written.
                r.waiting += 1;
            } else {
                // Back in line where its op was, pending since it was: to
                // `unfinished` it is the op acknowledged then, not a new
                // one, and the oldest pending op's age stays true.
                match self.push_locked(&mut shard, &d.tuple, d.op, d.place) {
                    Ok(_) => {
                        dead.remove(d.id);
                        r.replayed += 1;
                        r.tuples.push(d.tuple.clone());
                    }
                    Err(e) if e.is_buffer_full() => {
                        r.kept = chosen.len() - i;
                        break;
                    }
                    Err(e) => return Err(e),
                }
            }
            self.dead_keys.store(dead.keys.len(), Ordering::Relaxed);
        }
        Ok(r)
    }

    fn dead_now(&self) -> Vec<DeadLetter> {
        let letters: Vec<DeadLetter> = self.dead().letters.values().cloned().collect();
        letters
            .into_iter()
            .map(|mut d| {
                let key = key_of(&d.tuple);
                let shard = self.lock(self.shard_of(&d.tuple.object));
                d.superseded = self
                    .dead()
                    .superseded(&key, &d, shard.newest_seq(&d.tuple, &key));
                d
            })
            .collect()
    }

    fn relevant_now(
        &self,
        rels: Option<&[Dep]>,
        object: &str,
        user: &str,
        limit: usize,
    ) -> Relevant {
        let mut r = self.relevant_ops(rels, object, user, limit);
        // After the ops: see written.rs.
        r.written_ago = self.written.since(rels, object);
        r
    }

    fn relevant_ops(
        &self,
        rels: Option<&[Dep]>,
        object: &str,
        user: &str,
        limit: usize,
    ) -> Relevant {
        let prefix = format!("{object}#");
        let home = self.shard_of(object);
        // (shard, type, relation, same object, user-bound) for every part
        // to read.
        let mut wanted: Vec<(usize, &str, &str, bool, bool)> = Vec::new();
        // Every shard read at once, in ascending order (as `unfinished_now`
        // takes them): read one at a time, a check overlapping a revoke of
        // one tuple and then a grant of another in a later shard saw the
        // first before its revoke and the second after its grant, a state
        // that never existed, and with an intersection in the model such a
        // state can allow what every real one denies. With no dependencies
        // known, the relations to read are listed under the same locks.
        let mut held: Vec<Option<MutexGuard<'_, Shard>>> = Vec::new();
        let all: Vec<(String, String)>;
        let deps: Vec<(&str, &str, bool, bool)> = match rels {
            Some(rels) => rels
                .iter()
                .filter_map(|d| {
                    let (ty, r) = d.rel.split_once('#')?;
                    Some((ty, r, d.same_object, d.user_bound))
                })
                .collect(),
            None => {
                held = (0..SHARDS).map(|s| Some(self.lock(s))).collect();
                let mut names = std::collections::BTreeSet::new();
                for g in held.iter().flatten() {
                    relations_in(g, None, &mut names);
                }
                all = names.into_iter().collect();
                all.iter()
                    .map(|(t, r)| (t.as_str(), r.as_str(), false, false))
                    .collect()
            }
        };
        for (ty, r, same, bound) in deps {
            if same {
                wanted.push((home, ty, r, true, bound));
            } else {
                wanted.extend((0..SHARDS).map(|s| (s, ty, r, false, false)));
            }
        }
        if held.is_empty() {
            held = (0..SHARDS)
                .map(|s| wanted.iter().any(|w| w.0 == s).then(|| self.lock(s)))
                .collect();
        }
        let (mut revokes, mut grants) = (0, 0);
        for &(s, ty, r, same, bound) in &wanted {
            let Some(g) = held[s].as_deref() else {
                continue;
            };
            let Some(p) = g.part(ty, r).map(|i| &g.parts[i]) else {
                continue;
            };
            if same {
                for (key, slot) in slots_of(p, &prefix, true) {
                    if bound && !counts_for(key, user) {
                        continue;
                    }
                    for e in slot.pending.iter().chain(slot.in_flight.as_deref()) {
                        match e.op {
                            Op::Grant => grants += 1,
                            Op::Revoke => revokes += 1,
                        }
                    }
                }
            } else {
                grants += p.ops[0];
                revokes += p.ops[1];
            }
        }
        if revokes > 0 || grants > limit {
            return Relevant {
                revokes,
                grants: None,
                unreadable: 0,
                written_ago: None,
                dead_in_doubt: 0,
            };
        }
        let mut out = Vec::with_capacity(grants);
        for &(s, ty, r, same, bound) in &wanted {
            let Some(g) = held[s].as_deref() else {
                continue;
            };
            let Some(p) = g.part(ty, r).map(|i| &g.parts[i]) else {
                continue;
            };
            for (key, slot) in slots_of(p, &prefix, same) {
                if bound && !counts_for(key, user) {
                    continue;
                }
                // The newest op on the key is the one that counts.
                let newest = slot.pending.as_ref().or(slot.in_flight.as_deref());
                if let Some(e) = newest.filter(|e| e.op == Op::Grant) {
                    out.push(tuple_of(key, e.condition.as_deref().cloned()));
                }
            }
        }
        // No more than counted: the shards did not change between the two.
        Relevant {
            revokes,
            grants: Some(out),
            unreadable: 0,
            written_ago: None,
            dead_in_doubt: 0,
        }
    }

    fn latest_now(&self, tuple: &TupleKey) -> Option<(Op, bool)> {
        self.newest_entry(tuple, |e| (e.op, e.condition.is_some()))
    }

    /// `f` of the newest op on `tuple`'s key (pending, else in flight), if
    /// it has one, read under its shard's lock.
    fn newest_entry<R>(&self, tuple: &TupleKey, f: impl FnOnce(&Entry) -> R) -> Option<R> {
        let g = self.lock(self.shard_of(&tuple.object));
        let part = g.part(tuple.object_type(), &tuple.relation)?;
        let slot = g.parts[part].slots.get(key_of(tuple).as_str())?;
        slot.pending.as_ref().or(slot.in_flight.as_deref()).map(f)
    }

    fn pending_counts(&self) -> Pending {
        // An op moves between the counts (pending, in flight) under its
        // shard's lock, so a read while one moves may miss it. A sum of 0
        // is read again under every lock: an application polling for
        // 0 + 0 before it exits read that while a take was under way, and
        // lost the op. Other reads take no lock: this runs at every look
        // of the flusher, and callers pushing do not wait for it.
        let read = || {
            (
                self.pending[0].load(Ordering::Relaxed),
                self.pending[1].load(Ordering::Relaxed),
                self.in_flight.load(Ordering::Relaxed),
            )
        };
        let mut counts = read();
        if counts.0 + counts.1 + counts.2 == 0 {
            let _all: Vec<_> = (0..SHARDS).map(|s| self.lock(s)).collect();
            counts = read();
        }
        let (writes, deletes, in_flight) = counts;
        // The oldest ready op is first in one of the queues. Ops blocked
        // behind an in-flight op on their key are not ready and not counted.
        // The largest age, in centiseconds.
        let mut oldest: Option<u32> = None;
        if writes + deletes > 0 {
            for s in 0..SHARDS {
                let g = self.lock(s);
                // Read under the lock its ops are stamped under: none is
                // newer (one stamped after a read before it would be
                // 497 days old).
                let now = self.now_cs();
                for p in &g.parts {
                    for q in &p.ready {
                        let since = q
                            .first_key_value()
                            .and_then(|(_, k)| p.slots.get(k))
                            .and_then(|s| s.pending.as_ref())
                            .map(|e| now.wrapping_sub(e.since));
                        oldest = match (oldest, since) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            (a, b) => a.or(b),
                        };
                    }
                }
            }
        }
        Pending {
            writes,
            deletes,
            total: writes + deletes,
            in_flight,
            oldest_age: oldest.map(|cs| Duration::from_millis(u64::from(cs) * 10)),
        }
    }

    /// Every shard's lock, then the letters': an op moving between them
    /// (dying, replayed) is seen on one side. Locks are taken in the order
    /// every other path takes them (a shard, then the letters).
    fn unfinished_now(&self, up_to: u64) -> Unfinished {
        let shards: Vec<_> = (0..SHARDS).map(|s| self.lock(s)).collect();
        let mut u = Unfinished::default();
        for g in &shards {
            for p in &g.parts {
                for slot in p.slots.values() {
                    // By place in line, as the Redis store counts; an op in
                    // flight with a newer one behind it by its own seq (the
                    // newer op supersedes it), as Redis knows only that.
                    let in_flight = slot
                        .in_flight
                        .as_deref()
                        .is_some_and(|e| match slot.pending {
                            Some(_) => e.seq <= up_to,
                            None => e.first <= up_to,
                        });
                    if in_flight || slot.pending.as_ref().is_some_and(|e| e.first <= up_to) {
                        u.ops += 1;
                    }
                }
            }
        }
        // As the Redis store counts: letters once no op is left.
        if u.ops > 0 {
            return u;
        }
        let dead = self.dead();
        for d in dead.letters.values() {
            let key = key_of(&d.tuple);
            if d.transient
                && d.first <= up_to
                && dead.is_newest(&key, d.id)
                && !shards[self.shard_of(&d.tuple.object)].holds(&d.tuple, &key)
            {
                u.transient_letters += 1;
            }
        }
        u
    }

    fn clear_now(&self, up_to: u64) -> Vec<(TupleKey, Op)> {
        let mut dropped = Vec::new();
        // Every shard at once, in ascending order (as checks take them):
        // shard by shard, a check between two could see a revoke dropped
        // and a grant in a later shard still pending, a state that never
        // existed (`allowed` through a folder whose parent link was
        // revoked, where before and after the clear it is not).
        let mut shards: Vec<_> = (0..SHARDS).map(|s| self.lock(s)).collect();
        for g in &mut shards {
            for part in &mut g.parts {
                let mut gone = 0;
                let mut counts = [0usize; 2];
                let watch = self.dead_keys.load(Ordering::Relaxed) > 0;
                let ready = &mut part.ready;
                part.slots.retain(|key, slot| {
                    // An op waiting behind a write of its tuple in progress
                    // is kept, as the Redis store keeps it (there its entry
                    // is what keeps a newer op from being written first):
                    // it is written after that write.
                    let behind = slot.in_flight.is_some();
                    if let Some(e) = slot.pending.take_if(|e| e.seq <= up_to && !behind) {
                        if watch {
                            self.dead().supersede_cleared(key, e.seq);
                        }
                        let queue = &mut ready[kind(e.op)];
                        if queue.get(&e.first).is_some_and(|k| k == key) {
                            queue.remove(&e.first);
                        }
                        counts[kind(e.op)] += 1;
                        dropped.push((tuple_of(key, e.condition.map(|c| *c)), e.op));
                    }
                    let keep = slot.in_flight.is_some() || slot.pending.is_some();
                    gone += usize::from(!keep);
                    keep
                });
                for (k, n) in counts.into_iter().enumerate() {
                    part.ops[k] -= n;
                    self.pending[k].fetch_sub(n, Ordering::Relaxed);
                }
                self.keys.fetch_sub(gone, Ordering::Relaxed);
            }
        }
        // A dropped op may have been written already, its Write's outcome
        // unknown then (pending again after the hold): what OpenFGA caches
        // may predate that write, and nothing else will say so to checks.
        // Under the shard locks, as checks read ops, then this.
        self.written.note(dropped.iter().map(|(t, _)| t));
        drop(shards);
        dropped
    }

    #[cfg(test)]
    fn last(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

/// Adds the `(type, relation)`s with ops in `g` (of `object_type`, if
/// given) to `names`.
fn relations_in(
    g: &Shard,
    object_type: Option<&str>,
    names: &mut std::collections::BTreeSet<(String, String)>,
) {
    for (ty, rels) in &g.part_of {
        if object_type.is_some_and(|t| t != ty.as_str()) {
            continue;
        }
        for (r, &i) in rels {
            if g.parts[i].ops.iter().any(|&n| n > 0) {
                names.insert((ty.clone(), r.clone()));
            }
        }
    }
}

/// The slots that can matter to a check: one object's (all its keys start
/// with `prefix`) for a same-object dependency, all of the part's otherwise.
fn slots_of<'a>(
    p: &'a Part,
    prefix: &'a str,
    same_object: bool,
) -> Box<dyn Iterator<Item = (&'a Arc<str>, &'a Slot)> + 'a> {
    if same_object {
        Box::new(
            p.slots
                .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
                .take_while(move |(k, _)| k.starts_with(prefix)),
        )
    } else {
        Box::new(p.slots.iter())
    }
}

thread_local! {
    /// Where a pushed key is built before its one copy into an `Arc`.
    static KEY: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// `t`'s key in an `Arc`, with one allocation (not a `String` and a copy).
fn shared_key(t: &TupleKey) -> Arc<str> {
    KEY.with_borrow_mut(|k| {
        k.clear();
        super::write_key(k, t);
        Arc::from(k.as_str())
    })
}

impl Store for MemoryStore {
    fn push<'a>(&'a self, tuple: &'a TupleKey, op: Op) -> BoxFuture<'a, Result<Pushed>> {
        Box::pin(future::ready(self.push_now(tuple, op)))
    }

    fn push_at_once(&self, tuple: &TupleKey, op: Op) -> Option<Result<Pushed>> {
        Some(self.push_now(tuple, op))
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Every push that found the store open has ended once each shard
        // was free: its op is in before the shutdown reads what to drain.
        for s in 0..SHARDS {
            drop(self.lock(s));
        }
    }

    fn take(&self, max: usize, what: Take, up_to: u64) -> BoxFuture<'_, Result<Vec<Taken>>> {
        Box::pin(future::ready(Ok(self.take_now(max, what, up_to))))
    }

    fn finish<'a>(
        &'a self,
        done: Vec<(Taken, Outcome)>,
        _job: Option<&'a super::JobEnd>,
    ) -> BoxFuture<'a, Result<Finished>> {
        Box::pin(future::ready(Ok(self.finish_now(done))))
    }

    fn relevant<'a>(
        &'a self,
        rels: Option<&'a [Dep]>,
        object: &'a str,
        user: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Relevant>> {
        Box::pin(future::ready(Ok(
            self.relevant_now(rels, object, user, limit)
        )))
    }

    fn latest<'a>(&'a self, tuple: &'a TupleKey) -> BoxFuture<'a, Result<Option<(Op, bool)>>> {
        Box::pin(future::ready(Ok(self.latest_now(tuple))))
    }

    fn note_landed<'a>(&'a self, tuples: &'a [TupleKey]) -> BoxFuture<'a, Result<()>> {
        self.written.note(tuples);
        Box::pin(future::ready(Ok(())))
    }

    fn owes_revoke<'a>(&'a self, tuple: &'a TupleKey) -> BoxFuture<'a, Result<bool>> {
        // A revoke newest: the grant died since and pended it again, or the
        // application revoked since; OpenFGA holds the tuple until it is
        // written, either way.
        let owes = self.newest_entry(tuple, |e| e.op == Op::Revoke || e.owes != Owes::No);
        Box::pin(future::ready(Ok(owes == Some(true))))
    }

    fn relations_buffered<'a>(
        &'a self,
        object_type: &'a str,
    ) -> BoxFuture<'a, Result<Vec<String>>> {
        let rels = self.relations_with_ops(Some(object_type));
        Box::pin(future::ready(Ok(rels
            .into_iter()
            .map(|(_, r)| r)
            .collect())))
    }

    fn last_seq(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(future::ready(Ok(self.seq.load(Ordering::Acquire))))
    }

    fn unfinished(&self, up_to: u64) -> BoxFuture<'_, Result<Unfinished>> {
        Box::pin(future::ready(Ok(self.unfinished_now(up_to))))
    }

    fn pending_up_to(&self, up_to: u64) -> BoxFuture<'_, Result<bool>> {
        // Each shard under its lock, both kinds at once (a fold moves an
        // op between them and keeps its place). An op waiting behind one
        // in flight is in neither: it is newer than that op, whose request
        // the caller is still running.
        let pending = (0..SHARDS).any(|s| {
            self.lock(s).parts.iter().any(|p| {
                p.ready
                    .iter()
                    .any(|r| r.first_key_value().is_some_and(|(f, _)| *f <= up_to))
            })
        });
        Box::pin(future::ready(Ok(pending)))
    }

    fn pending(&self) -> BoxFuture<'_, Result<Pending>> {
        Box::pin(future::ready(Ok(self.pending_counts())))
    }

    fn pending_now(&self) -> Option<Pending> {
        Some(self.pending_counts())
    }

    fn clear(&self, up_to: Option<u64>) -> BoxFuture<'_, Result<Vec<(TupleKey, Op)>>> {
        Box::pin(future::ready(Ok(self.clear_now(up_to.unwrap_or(u64::MAX)))))
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>>> {
        Box::pin(future::ready(Ok(self.dead_now())))
    }

    fn dead_count(&self) -> BoxFuture<'_, Result<usize>> {
        Box::pin(future::ready(Ok(self.dead().letters.len())))
    }

    fn newest_letter_id(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(future::ready(Ok(self.dead().next_id - 1)))
    }

    fn replay_dead_letters<'a>(
        &'a self,
        ids: Option<&'a [u64]>,
        only_transient: bool,
    ) -> BoxFuture<'a, Result<Replayed>> {
        Box::pin(future::ready(self.replay_now(ids, only_transient)))
    }

    fn remove_dead_letters<'a>(
        &'a self,
        ids: Option<&'a [u64]>,
        up_to: Option<u64>,
    ) -> BoxFuture<'a, Result<Purged>> {
        // Its letters owe nothing: ops are never given up here (they stay
        // pending through transient failures), and a grant refused for
        // good left the revoke it owed pending when it died.
        let mut g = self.dead();
        let removed = match (ids, up_to) {
            (None, Some(up_to)) => {
                let old: Vec<u64> = g
                    .letters
                    .keys()
                    .copied()
                    .filter(|&id| id <= up_to)
                    .collect();
                old.into_iter().filter_map(|id| g.remove(id)).count()
            }
            (None, None) => {
                g.keys.clear();
                std::mem::take(&mut g.letters).len()
            }
            (Some(ids), _) => ids.iter().filter_map(|&id| g.remove(id)).count(),
        };
        self.dead_keys.store(g.keys.len(), Ordering::Relaxed);
        drop(g);
        Box::pin(future::ready(Ok(Purged {
            removed,
            repended: 0,
        })))
    }
}

#[cfg(test)]
mod tests;
