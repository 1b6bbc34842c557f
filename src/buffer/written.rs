//! Writes applied recently, which OpenFGA may not show yet.
//!
//! OpenFGA's check query cache, its iterator caches, its cache controller and
//! a read replica all answer a default (`MINIMIZE_LATENCY`) request from
//! state older than a write it acknowledged, for up to their TTLs. Once an op
//! is applied it leaves the buffer, so nothing pending tells a check about it
//! any more: a check that can depend on a write applied within
//! `check.server_cache_ttl` asks for `HIGHER_CONSISTENCY` instead (see
//! `client.rs`). The memory store keeps those writes here; the Redis store
//! keeps the same in Redis (`store.lua`), so every process sees every
//! process's writes.
//!
//! Writes are noted before their ops leave the in-flight set, under the
//! same order a check reads in (ops first, then this): a check that no
//! longer sees an op pending or in flight sees its write here.
//!
//! A process knows nothing of the writes before it started: the one an
//! earlier life of it applied as it shut down (a revoke) may be younger
//! than the server's cached answers. So the start counts as a write to
//! every relation.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::model::Dep;
use crate::tuple::TupleKey;

/// How long a write is remembered: the longest `check.server_cache_ttl`.
pub(crate) const KEEP: Duration = crate::config::MAX_SERVER_CACHE_TTL;

/// Most objects remembered one by one (some 100 bytes each): past it, as
/// writes on distinct objects can outrun `KEEP`, the per-object record is
/// dropped and every object counts as written then (see `Inner::dropped`).
const MAX_OBJECTS: usize = 1 << 18;

/// Recently applied writes, by relation and by object.
pub(crate) struct Written {
    epoch: Instant,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// `type#relation` -> when a write on it was last applied (ms after the
    /// epoch).
    by_rel: HashMap<String, u64>,
    /// `object#relation` -> the same, per object.
    by_object: HashMap<String, u64>,
    /// When `by_object` was last dropped for being full: no
    /// object's write since `KEEP` before then can be told apart, so each
    /// counts as written then (towards fresh answers, never stale ones).
    dropped: Option<u64>,
    pruned_at: u64,
}

impl Default for Written {
    fn default() -> Self {
        Written {
            epoch: Instant::now(),
            inner: Mutex::default(),
        }
    }
}

impl Written {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Plain maps of numbers: sound even if a holder panicked.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that these tuples were just written.
    pub fn note<'a>(&self, tuples: impl IntoIterator<Item = &'a TupleKey>) {
        let now = self.now();
        let mut g = self.lock();
        for t in tuples {
            let rel = crate::model::rel_name(t.object_type(), &t.relation);
            g.by_rel.insert(rel, now);
            g.by_object
                .insert(format!("{}#{}", t.object, t.relation), now);
        }
        let keep = KEEP.as_millis() as u64;
        let full = g.by_object.len() > MAX_OBJECTS;
        if now.saturating_sub(g.pruned_at) > keep / 10 || full {
            g.pruned_at = now;
            g.by_object.retain(|_, at| now.saturating_sub(*at) < keep);
            // Revokes are not checked against the model: their relations
            // can be anything an application passes, each one kept.
            g.by_rel.retain(|_, at| now.saturating_sub(*at) < keep);
            // Full, and still more than half full once pruned: dropped, so
            // that a pass over the whole map for being full comes at most
            // once per half of it written.
            if full && g.by_object.len() > MAX_OBJECTS / 2 {
                g.by_object = HashMap::new();
                g.dropped = Some(now);
            }
        }
    }

    /// How long ago the newest write a check on `object` with dependencies
    /// `rels` (`None`: any relation) can depend on was applied, or this
    /// process started, if within [`KEEP`].
    pub fn since(&self, rels: Option<&[Dep]>, object: &str) -> Option<Duration> {
        let g = self.lock();
        let newest = match rels {
            None => g.by_rel.values().max().copied(),
            Some(rels) => rels
                .iter()
                .filter_map(|d| {
                    if d.same_object {
                        let relation = d.rel.split_once('#').map_or(d.rel.as_str(), |(_, r)| r);
                        let at = g.by_object.get(&format!("{object}#{relation}")).copied();
                        at.into_iter().chain(g.dropped).max()
                    } else {
                        g.by_rel.get(&d.rel).copied()
                    }
                })
                .max(),
        }
        // The epoch: this process's start.
        .unwrap_or(0);
        let ago = Duration::from_millis(self.now().saturating_sub(newest));
        (ago < KEEP).then_some(ago)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(rel: &str, same_object: bool) -> Dep {
        Dep {
            rel: rel.to_owned(),
            same_object,
            user_bound: false,
            may_deny: false,
        }
    }

    /// Started longer ago than writes are remembered.
    fn long_running() -> Written {
        let epoch = Instant::now().checked_sub(KEEP + Duration::from_secs(1));
        Written {
            epoch: epoch.unwrap_or_else(Instant::now),
            inner: Mutex::default(),
        }
    }

    #[test]
    fn the_start_counts_as_a_write_to_everything() {
        let w = Written::default();
        let any = [dep("document#viewer", false)];
        let same = [dep("document#viewer", true)];
        for rels in [None, Some(&any[..]), Some(&same[..])] {
            assert!(w.since(rels, "document:1").is_some_and(|a| a < KEEP));
        }
        assert_eq!(long_running().since(None, "document:1"), None);
    }

    #[test]
    fn a_write_counts_for_its_object_or_its_whole_relation() {
        let w = long_running();
        assert_eq!(w.since(None, "document:1"), None);
        let t = TupleKey::new("user:a", "viewer", "document:1").unwrap();
        w.note([&t]);
        let same = [dep("document#viewer", true)];
        let any = [dep("document#viewer", false)];
        assert!(w.since(Some(&same), "document:1").is_some());
        assert_eq!(w.since(Some(&same), "document:2"), None);
        assert!(w.since(Some(&any), "document:2").is_some());
        assert_eq!(
            w.since(Some(&[dep("document#editor", false)]), "document:1"),
            None
        );
        assert!(w.since(None, "folder:x").is_some());
    }

    /// Relations written long ago are let go (revokes on relations of any
    /// name, which the model does not check, kept one each for good).
    #[test]
    fn relations_written_long_ago_are_let_go() {
        let w = long_running();
        {
            let mut g = w.lock();
            for i in 0..100 {
                g.by_rel.insert(format!("document#old{i}"), 0);
            }
        }
        let t = TupleKey::new("user:a", "viewer", "document:1").unwrap();
        w.note([&t]);
        assert_eq!(w.lock().by_rel.len(), 1);
        assert!(w
            .since(Some(&[dep("document#viewer", false)]), "document:2")
            .is_some());
    }

    /// More distinct objects written than it keeps: the record stays
    /// bounded, and an object whose own write was dropped with it still
    /// counts as written recently (fresh answers, never stale ones).
    #[test]
    fn the_objects_kept_are_bounded_and_the_dropped_count_as_written() {
        let w = long_running();
        let first = TupleKey::new("user:a", "viewer", "document:first").unwrap();
        w.note([&first]);
        for i in 0..=MAX_OBJECTS {
            let t = TupleKey::new("user:a", "viewer", format!("document:{i}")).unwrap();
            w.note([&t]);
        }
        assert!(w.lock().by_object.len() <= MAX_OBJECTS);
        let same = [dep("document#viewer", true)];
        assert!(w.since(Some(&same), "document:first").is_some());
    }
}
