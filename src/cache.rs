//! The check-answer cache, and how pending ops make its answers unusable.
//!
//! Each `type#relation` has a generation counter. Every op that could change
//! a relation's checks (as the model says) bumps that relation's generation
//! when it is acknowledged, and again if it is dead-lettered or cleared. A
//! cached answer remembers the generation it was computed under and is used
//! only while that generation is current.
//!
//! The order of steps makes this race-free: a check reads the generation
//! *before* it looks at pending ops or asks OpenFGA, and an op bumps the
//! generation *after* it is in the buffer. So an answer computed while an op
//! arrived is stored under a generation that is already stale. Without a
//! model every op bumps one global generation: correct, just broader.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::model::Model;
use crate::tuple::TupleKey;
use crate::NameMap;

/// The generations an answer was computed under: this process's, and the
/// shared store's (0 for the memory store).
pub(crate) type Generation = (u64, u64);

fn entry_key(key: &str, (local, shared): Generation, answer: bool) -> String {
    use std::fmt::Write;
    let mut k = String::with_capacity(key.len() + 48);
    k.push_str(key);
    let _ = write!(k, "|{local}|{shared}|{}", u8::from(answer));
    k
}

/// Cached check answers.
pub(crate) struct CheckCache {
    /// Answers, as keys: `tuple|generation|answer`. A hit is then a
    /// `contains_key`, which moka does not count as a read, so it never runs
    /// moka's housekeeping on the caller's thread (a `get` does, every 64th
    /// read, which set the p99 of a hit). Entries of old generations are
    /// never looked up again and leave by TTL or eviction.
    answers: moka::sync::Cache<String, ()>,
    /// Bumped by ops the model does not know, by `clear`, and for everything
    /// when there is no model.
    global: AtomicU64,
    /// The model's relations and what an op on each can change: replaced
    /// whole when the handle follows a new model.
    tables: ArcSwap<Tables>,
}

/// What the cache knows of one model.
struct Tables {
    /// Which model of this handle's, counting from 0: part of every
    /// generation read from these tables.
    epoch: u64,
    /// One generation per relation of the model.
    gens: Box<[AtomicU64]>,
    /// type -> relation -> its index in `gens`.
    index: ByRel<usize>,
    /// type -> relation -> the generations an op on it bumps: worked out
    /// once, so acknowledging an op builds no name and looks up no list.
    bumps: ByRel<Box<[usize]>>,
}

/// Something per `type#relation`, looked up by the two parts without
/// joining them.
type ByRel<T> = NameMap<String, NameMap<String, T>>;

fn by_rel<'a, T>(map: &'a ByRel<T>, object_type: &str, relation: &str) -> Option<&'a T> {
    map.get(object_type)?.get(relation)
}

/// A generation's bits below its tables' epoch. Generations read from
/// different tables never match (a check that read the old tables while
/// the handle switched models caches under the old epoch), as long as a
/// model sees fewer than 2^48 ops.
const EPOCH_SHIFT: u32 = 48;

impl Tables {
    fn new(model: Option<&Model>, epoch: u64) -> Tables {
        let mut index: ByRel<usize> = ByRel::default();
        let mut bumps: ByRel<Box<[usize]>> = ByRel::default();
        if let Some(m) = model {
            for (i, (ty, r)) in m
                .relation_names()
                .filter_map(|rel| rel.split_once('#'))
                .enumerate()
            {
                index
                    .entry(ty.to_owned())
                    .or_default()
                    .insert(r.to_owned(), i);
            }
            for rel in m.relation_names() {
                let (Some((ty, r)), Some(affected)) = (rel.split_once('#'), m.affects(rel)) else {
                    continue;
                };
                let gens = affected
                    .iter()
                    .filter_map(|a| a.split_once('#'))
                    .filter_map(|(aty, ar)| by_rel(&index, aty, ar).copied())
                    .collect();
                bumps
                    .entry(ty.to_owned())
                    .or_default()
                    .insert(r.to_owned(), gens);
            }
        }
        let count = index.values().map(NameMap::len).sum();
        Tables {
            epoch,
            gens: (0..count).map(|_| AtomicU64::new(0)).collect(),
            index,
            bumps,
        }
    }
}

impl CheckCache {
    pub fn new(capacity: u64, ttl: Duration, model: Option<Arc<Model>>) -> Self {
        CheckCache {
            answers: moka::sync::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            global: AtomicU64::new(0),
            tables: ArcSwap::from_pointee(Tables::new(model.as_deref(), 0)),
        }
    }

    /// Follows a new model: `swap` replaces the handle's model, and from
    /// then on what an op can change is the new model's to say (a relation
    /// that now derives from another must be bumped by ops on that one),
    /// and no answer cached before is used again (a new epoch). Read a
    /// check's generation before its model: a check that read the old
    /// epoch caches under it, whichever model it then used.
    ///
    /// While `swap` runs, neither model's tables can be trusted: the new
    /// one's would let a check read the new epoch and cache an answer the
    /// old model worked out; the old one's would let a revoke that only
    /// the new model connects to a relation (now derived from the revoked
    /// one) leave that relation's cached "allowed" current. So meanwhile
    /// every op bumps every answer, under an epoch of its own.
    pub fn switch_model(&self, model: Option<&Model>, swap: impl FnOnce()) {
        self.set_model(None);
        swap();
        self.set_model(model);
    }

    /// Replaces the tables with `model`'s, under a new epoch.
    fn set_model(&self, model: Option<&Model>) {
        // One step: two tables of one epoch would both count from zero,
        // and an answer cached under one before a revoke bumped it would
        // be valid again under the other.
        self.tables
            .rcu(|old| Arc::new(Tables::new(model, old.epoch + 1)));
    }

    /// The generation answers for `object_type#relation` are computed under.
    pub fn generation(&self, object_type: &str, relation: &str) -> u64 {
        // Both counters only grow, so their sum changes whenever either does.
        let t = self.tables.load();
        let local = by_rel(&t.index, object_type, relation)
            .and_then(|&i| t.gens.get(i))
            .map_or(0, |g| g.load(Ordering::Acquire));
        let count = self.global.load(Ordering::Acquire).wrapping_add(local);
        (t.epoch << EPOCH_SHIFT) | (count & ((1 << EPOCH_SHIFT) - 1))
    }

    /// A cached answer still valid under `generation`.
    pub fn get(&self, key: &str, generation: Generation) -> Option<bool> {
        let mut k = entry_key(key, generation, true);
        if self.answers.contains_key(k.as_str()) {
            return Some(true);
        }
        k.pop();
        k.push('0');
        self.answers.contains_key(k.as_str()).then_some(false)
    }

    /// Remembers an answer computed under `generation`.
    pub fn insert(&self, key: String, answer: bool, generation: Generation) {
        self.answers.insert(entry_key(&key, generation, answer), ());
    }

    /// Makes unusable every answer an op on `tuple` could change.
    pub fn invalidate_for(&self, tuple: &TupleKey) {
        self.invalidate(tuple.object_type(), &tuple.relation);
    }

    fn invalidate(&self, object_type: &str, relation: &str) {
        let t = self.tables.load();
        match by_rel(&t.bumps, object_type, relation) {
            Some(gens) => {
                for g in gens.iter().filter_map(|&i| t.gens.get(i)) {
                    g.fetch_add(1, Ordering::AcqRel);
                }
                // Tables replaced meanwhile (a model switch): these bumps
                // went to tables no check reads, while a check under the
                // new ones, working with the model it read, may have
                // cached an answer the op changes.
                if self.tables.load().epoch != t.epoch {
                    self.invalidate_all();
                }
            }
            None => self.invalidate_all(),
        }
    }

    /// Makes every cached answer unusable.
    pub fn invalidate_all(&self) {
        self.global.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openfga::AuthorizationModel;

    fn cache() -> CheckCache {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/documents.json");
        let m: AuthorizationModel =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        CheckCache::new(100, Duration::from_secs(60), Some(Arc::new(Model::new(&m))))
    }

    /// A model "m2" whose documents have `direct` users, and `derived`
    /// ones: whoever is `direct`.
    fn derived_model(direct: &str, derived: &str) -> AuthorizationModel {
        serde_json::from_value(serde_json::json!({
            "id": "m2",
            "schema_version": "1.1",
            "type_definitions": [
                { "type": "user" },
                { "type": "document", "relations": {
                    direct: { "this": {} },
                    derived: { "computedUserset": { "relation": direct } }
                }, "metadata": { "relations": {
                    direct: { "directly_related_user_types": [{ "type": "user" }] }
                } } }
            ]
        }))
        .unwrap()
    }

    #[test]
    fn an_op_invalidates_exactly_the_relations_it_can_change() {
        let c = cache();
        let viewer = c.generation("document", "viewer");
        let blocked = c.generation("document", "blocked");
        c.insert("k".into(), true, (viewer, 0));
        assert_eq!(c.get("k", (viewer, 0)), Some(true));
        // A folder viewer grant reaches document viewers through `parent`.
        c.invalidate_for(&TupleKey::new("user:a", "viewer", "folder:f").unwrap());
        let now = c.generation("document", "viewer");
        assert_ne!(now, viewer);
        assert_eq!(c.get("k", (now, 0)), None);
        assert_eq!(c.generation("document", "blocked"), blocked);
    }

    /// After a new model, ops bump what the new model says, and no
    /// generation from before comes round again.
    #[test]
    fn a_new_model_brings_its_own_bumps() {
        let c = cache();
        let viewer = TupleKey::new("user:a", "viewer", "document:d").unwrap();
        let mut seen = vec![c.generation("document", "viewer")];
        for _ in 0..5 {
            c.invalidate_for(&viewer);
            seen.push(c.generation("document", "viewer"));
        }
        let m = derived_model("viewer", "can_read");
        c.switch_model(Some(&Model::new(&m)), || {});
        for _ in 0..10 {
            let read = c.generation("document", "can_read");
            let now = c.generation("document", "viewer");
            assert!(!seen.contains(&now), "{now} came round again: {seen:?}");
            seen.push(now);
            c.invalidate_for(&viewer);
            assert_ne!(c.generation("document", "can_read"), read);
        }
    }

    /// A revoke acknowledged while the handle switches to a model in which
    /// document owners derive from `blocked`: under the old model `blocked`
    /// changes no owner, and an owner's cached "allowed" stayed current
    /// until the switch ended, so a check then was allowed after the
    /// revoke returned.
    #[test]
    fn an_op_while_the_model_switches_leaves_no_old_answer_current() {
        let c = cache();
        let m = derived_model("blocked", "owner");
        let blocked = TupleKey::new("user:a", "blocked", "document:d").unwrap();
        let owner = || c.generation("document", "owner");
        c.insert("before".into(), true, (owner(), 0));
        c.switch_model(Some(&Model::new(&m)), || {
            // A check that read the generation now, then the old model.
            let during = owner();
            c.insert("during".into(), true, (during, 0));
            c.invalidate_for(&blocked);
            for k in ["before", "during"] {
                assert_eq!(c.get(k, (owner(), 0)), None, "{k}");
            }
        });
        for k in ["before", "during"] {
            assert_eq!(c.get(k, (owner(), 0)), None, "{k}");
        }
    }

    /// Models switched from several threads at once each get an epoch of
    /// their own. Before, two could share one, both counting from zero: an
    /// answer cached under the first, whose relation a revoke then bumped,
    /// was valid again under the second.
    #[test]
    fn models_switched_at_once_never_share_an_epoch() {
        const THREADS: u64 = 4;
        const EACH: u64 = 2_000;
        let c = cache();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/documents.json");
        let m: AuthorizationModel =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let model = Model::new(&m);
        let start = std::sync::Barrier::new(THREADS as usize);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    start.wait();
                    for _ in 0..EACH {
                        c.set_model(Some(&model));
                    }
                });
            }
        });
        assert_eq!(
            c.generation("document", "viewer") >> EPOCH_SHIFT,
            THREADS * EACH
        );
    }

    #[test]
    fn unknown_relations_invalidate_everything() {
        let c = cache();
        let g = c.generation("document", "blocked");
        c.invalidate_for(&TupleKey::new("user:a", "nope", "planet:p").unwrap());
        assert_ne!(c.generation("document", "blocked"), g);
    }
}
