//! The in-process store: one mutex around plain maps.
//!
//! Every operation holds the lock for a short, bounded time (a push is a
//! few map operations; a take moves at most one Write's worth of ops), so
//! acknowledgement latency stays flat while a flush runs.
//!
//! Ready ops wait in per-relation queues ordered by `first`, the sequence
//! number of the op that made the key pending: coalescing keeps a key's
//! place, so a hot key is not starved, and a flush can stop exactly at the
//! ops acknowledged before it started.
//!
//! Memory per pending op is kept small on purpose (one shared key string, a
//! 40-byte slot, one queue entry), because the buffer may hold a million ops.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures::future::{self, BoxFuture};

use super::{
    key_of, tuple_of, DeadLetter, Finished, Outcome, Pending, Pushed, Relevant, Store, Take, Taken,
};
use crate::error::{Error, Kind, Result};
use crate::model::{rel_name, Dep, RelName};
use crate::tuple::{Condition, Op, TupleKey};

/// The memory store.
pub(crate) struct MemoryStore {
    inner: Mutex<Inner>,
    capacity: usize,
}

struct Inner {
    parts: Vec<Part>,
    /// `type#relation` to its index in `parts`.
    part_of: HashMap<RelName, usize>,
    seq: u64,
    /// Distinct keys held (pending or in flight): what capacity bounds.
    keys: usize,
    /// Pending (not in flight) ops, by kind: `[grants, revokes]`.
    pending: [usize; 2],
    in_flight: usize,
    epoch: Instant,
    dead: Vec<DeadLetter>,
    next_dead_id: u64,
}

/// The ops of one `type#relation`.
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
}

fn kind(op: Op) -> usize {
    match op {
        Op::Grant => 0,
        Op::Revoke => 1,
    }
}

impl MemoryStore {
    pub fn new(capacity: usize) -> Self {
        MemoryStore {
            inner: Mutex::new(Inner {
                parts: Vec::new(),
                part_of: HashMap::new(),
                seq: 0,
                keys: 0,
                pending: [0, 0],
                in_flight: 0,
                epoch: Instant::now(),
                dead: Vec::new(),
                next_dead_id: 1,
            }),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every update below keeps the maps consistent before it can panic
        // (nothing in them panics on input), so a poisoned lock still guards
        // sound data: keep serving rather than fail every later call.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_now(&self, tuple: &TupleKey, op: Op) -> Result<Pushed> {
        let key = key_of(tuple);
        let mut g = self.lock();
        let inner = &mut *g;
        let now = inner.now_cs();
        let part_no = inner.part_index(tuple.object_type(), &tuple.relation);
        let seq = inner.seq + 1;
        let condition = tuple.condition.clone().map(Box::new);
        let part = &mut inner.parts[part_no];

        let coalesced = match part.slots.get_key_value(key.as_str()) {
            None => {
                if inner.keys >= self.capacity {
                    return Err(Error::new(Kind::BufferFull {
                        capacity: self.capacity,
                        waited: None,
                    }));
                }
                let k: Arc<str> = Arc::from(key);
                part.ready[kind(op)].insert(seq, k.clone());
                let entry = Entry {
                    seq,
                    first: seq,
                    condition,
                    since: now,
                    attempts: 0,
                    op,
                };
                part.slots.insert(
                    k,
                    Slot {
                        pending: Some(entry),
                        in_flight: None,
                    },
                );
                inner.keys += 1;
                false
            }
            Some((k, _)) => {
                let k = k.clone();
                let Some(slot) = part.slots.get_mut(&k) else {
                    return Err(Error::invalid_argument("buffer key vanished"));
                };
                let blocked = slot.in_flight.is_some();
                let (first, since, coalesced) = match slot.pending.take() {
                    Some(old) => {
                        part.ops[kind(old.op)] -= 1;
                        inner.pending[kind(old.op)] -= 1;
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
                });
                if !blocked {
                    part.ready[kind(op)].insert(first, k);
                }
                coalesced
            }
        };
        inner.seq = seq;
        part.ops[kind(op)] += 1;
        inner.pending[kind(op)] += 1;
        Ok(Pushed {
            coalesced,
            pending: inner.pending[0] + inner.pending[1],
        })
    }

    fn take_now(&self, max: usize, what: Take, up_to: u64) -> Vec<Taken> {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut out = Vec::with_capacity(max.min(1024));
        let kinds: &[Op] = match what {
            Take::Revokes => &[Op::Revoke],
            Take::All => &[Op::Revoke, Op::Grant],
        };
        for &op in kinds {
            let k = kind(op);
            for part in &mut inner.parts {
                while out.len() < max {
                    // Ops that became pending after the flush started wait
                    // for the next one, so a flush always ends.
                    let Some(entry) = part.ready[k].first_entry() else {
                        break;
                    };
                    if *entry.key() > up_to {
                        break;
                    }
                    let key = entry.remove();
                    let Some(slot) = part.slots.get_mut(&key) else {
                        continue;
                    };
                    let Some(e) = slot.pending.take() else {
                        continue;
                    };
                    out.push(Taken {
                        tuple: tuple_of(&key, e.condition.as_deref().cloned()),
                        op,
                        seq: e.seq,
                        attempts: 0,
                    });
                    slot.in_flight = Some(Box::new(e));
                    inner.pending[k] -= 1;
                    inner.in_flight += 1;
                }
            }
        }
        out
    }

    fn finish_now(&self, done: Vec<(Taken, Outcome)>) -> Finished {
        let mut f = Finished::default();
        let mut g = self.lock();
        let inner = &mut *g;
        for (taken, outcome) in done {
            let key = key_of(&taken.tuple);
            let rel = rel_name(taken.tuple.object_type(), &taken.tuple.relation);
            let Some(&part_no) = inner.part_of.get(&rel) else {
                continue;
            };
            let part = &mut inner.parts[part_no];
            let Some(k) = part
                .slots
                .get_key_value(key.as_str())
                .map(|(k, _)| k.clone())
            else {
                continue;
            };
            let Some(slot) = part.slots.get_mut(&k) else {
                continue;
            };
            match &slot.in_flight {
                Some(e) if e.seq == taken.seq => {}
                // Not the op we sent: leave the slot alone.
                _ => continue,
            }
            if matches!(outcome, Outcome::Keep(_)) {
                // Still owned by whoever holds it (a queued job).
                continue;
            }
            let Some(entry) = slot.in_flight.take() else {
                continue;
            };
            let entry = *entry;
            part.ops[kind(entry.op)] -= 1;
            inner.in_flight -= 1;
            let superseded = slot.pending.is_some();
            match outcome {
                Outcome::Applied => f.applied += 1,
                _ if superseded => f.superseded += 1,
                Outcome::Dead { reason, code } => {
                    f.dead += 1;
                    inner.dead.push(DeadLetter {
                        id: inner.next_dead_id,
                        tuple: taken.tuple,
                        op: entry.op,
                        seq: entry.seq,
                        reason,
                        code,
                        attempts: u32::from(entry.attempts) + 1,
                        dead_at: SystemTime::now(),
                    });
                    inner.next_dead_id += 1;
                }
                Outcome::Retry | Outcome::Stale | Outcome::Busy | Outcome::Keep(_) => {
                    f.requeued += 1;
                    part.ops[kind(entry.op)] += 1;
                    inner.pending[kind(entry.op)] += 1;
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
                    inner.keys -= 1;
                }
            }
        }
        f
    }

    fn relevant_now(&self, rels: Option<&[Dep]>, object: &str, limit: usize) -> Relevant {
        let g = self.lock();
        let parts: Vec<(&Part, bool)> = match rels {
            None => g.parts.iter().map(|p| (p, false)).collect(),
            Some(rels) => rels
                .iter()
                .filter_map(|d| g.part_of.get(&d.rel).map(|&i| (&g.parts[i], d.same_object)))
                .collect(),
        };
        let prefix = format!("{object}#");
        let (mut revokes, mut grants) = (0, 0);
        for &(p, same) in &parts {
            if same {
                for (_, slot) in slots_of(p, &prefix, true) {
                    let ops = slot.pending.iter().chain(slot.in_flight.as_deref());
                    for e in ops {
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
            };
        }
        let mut out = Vec::with_capacity(grants);
        for &(p, same) in &parts {
            for (key, slot) in slots_of(p, &prefix, same) {
                // The newest op on the key is the one that counts.
                let newest = slot.pending.as_ref().or(slot.in_flight.as_deref());
                if let Some(e) = newest.filter(|e| e.op == Op::Grant) {
                    out.push(tuple_of(key, e.condition.as_deref().cloned()));
                }
            }
        }
        Relevant {
            revokes,
            grants: Some(out),
        }
    }

    fn latest_now(&self, tuple: &TupleKey) -> Option<(Op, bool)> {
        let g = self.lock();
        let part = g
            .part_of
            .get(&rel_name(tuple.object_type(), &tuple.relation))?;
        let slot = g.parts[*part].slots.get(key_of(tuple).as_str())?;
        slot.pending
            .as_ref()
            .or(slot.in_flight.as_deref())
            .map(|e| (e.op, e.condition.is_some()))
    }

    fn pending_counts(&self) -> Pending {
        let g = self.lock();
        let (writes, deletes) = (g.pending[0], g.pending[1]);
        // The oldest ready op is first in one of the queues. Ops blocked
        // behind an in-flight op on their key are not ready and not counted.
        let oldest = g
            .parts
            .iter()
            .flat_map(|p| {
                p.ready
                    .iter()
                    .filter_map(move |q| q.first_key_value().map(|(_, k)| (p, k)))
            })
            .filter_map(|(p, k)| {
                p.slots
                    .get(k)
                    .and_then(|s| s.pending.as_ref())
                    .map(|e| e.since)
            })
            .min();
        Pending {
            writes,
            deletes,
            total: writes + deletes,
            in_flight: g.in_flight,
            oldest_age: oldest.map(|cs| {
                g.epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(u64::from(cs) * 10))
            }),
        }
    }

    fn clear_now(&self) -> Vec<(TupleKey, Op)> {
        let mut g = self.lock();
        let inner = &mut *g;
        let mut dropped = Vec::new();
        for part in &mut inner.parts {
            for q in &mut part.ready {
                q.clear();
            }
            part.slots.retain(|key, slot| {
                if let Some(e) = slot.pending.take() {
                    part.ops[kind(e.op)] -= 1;
                    dropped.push((tuple_of(key, e.condition.map(|c| *c)), e.op));
                }
                slot.in_flight.is_some()
            });
        }
        inner.keys = inner.parts.iter().map(|p| p.slots.len()).sum();
        inner.pending = [0, 0];
        dropped
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

impl Inner {
    fn now_cs(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_millis() / 10).unwrap_or(u32::MAX)
    }

    fn part_index(&mut self, object_type: &str, relation: &str) -> usize {
        let name = rel_name(object_type, relation);
        if let Some(&i) = self.part_of.get(&name) {
            return i;
        }
        self.parts.push(Part::default());
        self.part_of.insert(name, self.parts.len() - 1);
        self.parts.len() - 1
    }
}

impl Store for MemoryStore {
    fn push<'a>(&'a self, tuple: &'a TupleKey, op: Op) -> BoxFuture<'a, Result<Pushed>> {
        Box::pin(future::ready(self.push_now(tuple, op)))
    }

    fn take(&self, max: usize, what: Take, up_to: u64) -> BoxFuture<'_, Result<Vec<Taken>>> {
        Box::pin(future::ready(Ok(self.take_now(max, what, up_to))))
    }

    fn finish(&self, done: Vec<(Taken, Outcome)>) -> BoxFuture<'_, Result<Finished>> {
        Box::pin(future::ready(Ok(self.finish_now(done))))
    }

    fn relevant<'a>(
        &'a self,
        rels: Option<&'a [Dep]>,
        object: &'a str,
        limit: usize,
    ) -> BoxFuture<'a, Result<Relevant>> {
        Box::pin(future::ready(Ok(self.relevant_now(rels, object, limit))))
    }

    fn latest<'a>(&'a self, tuple: &'a TupleKey) -> BoxFuture<'a, Result<Option<(Op, bool)>>> {
        Box::pin(future::ready(Ok(self.latest_now(tuple))))
    }

    fn last_seq(&self) -> BoxFuture<'_, Result<u64>> {
        Box::pin(future::ready(Ok(self.lock().seq)))
    }

    fn pending(&self) -> BoxFuture<'_, Result<Pending>> {
        Box::pin(future::ready(Ok(self.pending_counts())))
    }

    fn pending_now(&self) -> Option<Pending> {
        Some(self.pending_counts())
    }

    fn clear(&self) -> BoxFuture<'_, Result<Vec<(TupleKey, Op)>>> {
        Box::pin(future::ready(Ok(self.clear_now())))
    }

    fn dead_letters(&self) -> BoxFuture<'_, Result<Vec<DeadLetter>>> {
        Box::pin(future::ready(Ok(self.lock().dead.clone())))
    }

    fn remove_dead_letters<'a>(
        &'a self,
        ids: Option<&'a [u64]>,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>>> {
        let mut g = self.lock();
        let removed = match ids {
            None => std::mem::take(&mut g.dead),
            Some(ids) => {
                let (out, keep) = std::mem::take(&mut g.dead)
                    .into_iter()
                    .partition(|d| ids.contains(&d.id));
                g.dead = keep;
                out
            }
        };
        Box::pin(future::ready(Ok(removed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(user: &str, rel: &str, obj: &str) -> TupleKey {
        TupleKey::new(user, rel, obj).unwrap()
    }

    #[test]
    fn last_op_wins_and_counts_coalescing() {
        let s = MemoryStore::new(10);
        let k = t("user:a", "viewer", "document:1");
        assert!(!s.push_now(&k, Op::Grant).unwrap().coalesced);
        assert!(s.push_now(&k, Op::Revoke).unwrap().coalesced);
        let p = s.pending_counts();
        assert_eq!((p.writes, p.deletes, p.total), (0, 1, 1));
        let taken = s.take_now(10, Take::All, u64::MAX);
        assert_eq!(taken.len(), 1);
        assert_eq!(taken[0].op, Op::Revoke);
        assert_eq!(taken[0].seq, 2);
    }

    #[test]
    fn in_flight_keys_are_not_taken_twice_and_newer_ops_survive() {
        let s = MemoryStore::new(10);
        let k = t("user:a", "viewer", "document:1");
        s.push_now(&k, Op::Grant).unwrap();
        let first = s.take_now(10, Take::All, u64::MAX);
        s.push_now(&k, Op::Revoke).unwrap();
        assert!(
            s.take_now(10, Take::All, u64::MAX).is_empty(),
            "key is in flight"
        );
        // The grant's write succeeds late: the newer revoke stays pending.
        let f = s.finish_now(first.into_iter().map(|t| (t, Outcome::Applied)).collect());
        assert_eq!(f.applied, 1);
        let next = s.take_now(10, Take::All, u64::MAX);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].op, Op::Revoke);
    }

    #[test]
    fn a_failed_stale_op_is_dropped_not_retried() {
        let s = MemoryStore::new(10);
        let k = t("user:a", "viewer", "document:1");
        s.push_now(&k, Op::Grant).unwrap();
        let first = s.take_now(10, Take::All, u64::MAX);
        s.push_now(&k, Op::Revoke).unwrap();
        let f = s.finish_now(first.into_iter().map(|t| (t, Outcome::Retry)).collect());
        assert_eq!((f.requeued, f.superseded), (0, 1));
        let next = s.take_now(10, Take::All, u64::MAX);
        assert_eq!(next[0].op, Op::Revoke);
    }

    #[test]
    fn revokes_are_taken_first_and_capacity_is_bounded() {
        let s = MemoryStore::new(3);
        s.push_now(&t("user:a", "viewer", "document:1"), Op::Grant)
            .unwrap();
        s.push_now(&t("user:b", "viewer", "document:1"), Op::Grant)
            .unwrap();
        s.push_now(&t("user:c", "owner", "document:1"), Op::Revoke)
            .unwrap();
        let e = s
            .push_now(&t("user:d", "viewer", "document:1"), Op::Grant)
            .unwrap_err();
        assert!(e.is_buffer_full());
        // Coalescing onto an existing key needs no room.
        s.push_now(&t("user:a", "viewer", "document:1"), Op::Revoke)
            .unwrap();
        let revokes = s.take_now(10, Take::Revokes, u64::MAX);
        assert_eq!(revokes.len(), 2);
        assert!(revokes.iter().all(|t| t.op == Op::Revoke));
    }

    #[test]
    fn relevant_counts_in_flight_and_pending() {
        let s = MemoryStore::new(10);
        s.push_now(&t("user:a", "viewer", "document:1"), Op::Grant)
            .unwrap();
        s.push_now(&t("user:b", "blocked", "document:1"), Op::Revoke)
            .unwrap();
        let viewer = vec![Dep {
            rel: "document#viewer".to_string(),
            same_object: true,
        }];
        let r = s.relevant_now(Some(&viewer), "document:1", 100);
        assert_eq!(r.revokes, 0);
        assert_eq!(r.grants.unwrap().len(), 1);
        // Another document's grants don't matter to a same-object dependency.
        let r = s.relevant_now(Some(&viewer), "document:10", 100);
        assert_eq!(r.grants.unwrap().len(), 0);
        let _taken = s.take_now(10, Take::All, u64::MAX);
        let r = s.relevant_now(None, "document:1", 100);
        assert_eq!(r.revokes, 1, "an in-flight revoke still counts");
        assert!(r.grants.is_none());
    }

    #[test]
    fn a_flush_takes_only_ops_acknowledged_before_it_in_queue_order() {
        let s = MemoryStore::new(10);
        let a = t("user:a", "viewer", "document:1");
        s.push_now(&a, Op::Grant).unwrap();
        s.push_now(&t("user:b", "viewer", "document:1"), Op::Grant)
            .unwrap();
        let up_to = s.lock().seq;
        s.push_now(&t("user:c", "viewer", "document:1"), Op::Grant)
            .unwrap();
        // Coalescing after the flush started keeps the key's place.
        s.push_now(&a, Op::Revoke).unwrap();
        let taken = s.take_now(10, Take::All, up_to);
        let users: Vec<&str> = taken.iter().map(|t| t.tuple.user.as_str()).collect();
        assert_eq!(users, ["user:a", "user:b"]);
        assert_eq!(taken[0].op, Op::Revoke);
        assert!(s.pending_counts().oldest_age.is_some());
    }

    #[derive(Clone, Debug)]
    enum Step {
        Push(u8, bool),
        Take(u8),
        Finish(u8),
        Clear,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0u8..8, any::<bool>()).prop_map(|(k, g)| Step::Push(k, g)),
            2 => (1u8..5).prop_map(Step::Take),
            2 => (0u8..3).prop_map(Step::Finish),
            1 => Just(Step::Clear),
        ]
    }

    proptest! {
        /// Random pushes, takes, outcomes (applied, transient, permanent) and
        /// clears. Afterwards: every acknowledged op is accounted for exactly
        /// once (applied, dead-lettered, cleared or coalesced), and what was
        /// applied last per key is the last op acknowledged for it, unless that
        /// op was cleared or dead-lettered.
        #[test]
        fn every_op_is_accounted_for_and_last_write_wins(steps in proptest::collection::vec(step(), 1..200)) {
            let s = MemoryStore::new(1000);
            let mut in_flight: Vec<Taken> = Vec::new();
            let mut acked = 0u64;
            let (mut applied, mut dead, mut cleared, mut coalesced) = (0u64, 0u64, 0u64, 0u64);
            // What OpenFGA holds, per key, and the last op acknowledged per key.
            let mut server: HashMap<String, Op> = HashMap::new();
            let mut last: HashMap<String, (u64, Op)> = HashMap::new();
            let mut lost: std::collections::HashSet<(String, u64)> = Default::default();
            let mut drive = |steps: &[Step], in_flight: &mut Vec<Taken>, final_drain: bool| {
                for st in steps {
                    match st {
                        Step::Push(k, grant) => {
                            let op = if *grant { Op::Grant } else { Op::Revoke };
                            let tuple = t(&format!("user:{k}"), "viewer", "document:1");
                            let p = s.push_now(&tuple, op).unwrap();
                            acked += 1;
                            if p.coalesced { coalesced += 1; }
                            let seq = s.lock().seq;
                            last.insert(key_of(&tuple), (seq, op));
                        }
                        Step::Take(n) => in_flight.extend(s.take_now(usize::from(*n), Take::All, u64::MAX)),
                        Step::Finish(mode) => {
                            let done: Vec<(Taken, Outcome)> = in_flight.drain(..).map(|t| {
                                let o = match (*mode, final_drain) {
                                    (0, _) | (_, true) => Outcome::Applied,
                                    (1, _) => Outcome::Retry,
                                    _ => Outcome::Dead { reason: "bad".into(), code: None },
                                };
                                if matches!(o, Outcome::Applied) {
                                    server.insert(key_of(&t.tuple), t.op);
                                }
                                if matches!(o, Outcome::Dead { .. }) {
                                    lost.insert((key_of(&t.tuple), t.seq));
                                }
                                (t, o)
                            }).collect();
                            let f = s.finish_now(done);
                            applied += f.applied;
                            dead += f.dead;
                            coalesced += f.superseded;
                        }
                        Step::Clear => {
                            for (tuple, _) in s.clear_now() {
                                cleared += 1;
                                let key = key_of(&tuple);
                                let seq = last.get(&key).map_or(0, |l| l.0);
                                lost.insert((key, seq));
                            }
                        }
                    }
                }
            };
            drive(&steps, &mut in_flight, false);
            // Drain everything that is left, successfully.
            for _ in 0..100 {
                drive(&[Step::Take(100), Step::Finish(0)], &mut in_flight, true);
            }
            prop_assert_eq!(s.pending_counts().total + s.pending_counts().in_flight, 0);
            prop_assert_eq!(applied + dead + cleared + coalesced, acked);
            for (key, (seq, op)) in &last {
                if !lost.contains(&(key.clone(), *seq)) {
                    prop_assert_eq!(server.get(key), Some(op), "key {}", key);
                }
            }
        }
    }
}
