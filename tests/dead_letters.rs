//! Dead letters are never replayed over a newer op: a letter whose tuple got
//! a newer op after it died (applied, still pending, or dead itself) is
//! superseded, and a replay drops it instead (ARCHITECTURE.md, "Dead
//! letters"). Against the real OpenFGA, on the memory and the Redis store.
//!
//! OpenFGA refuses a write of a relation its model lacks, but (v1.18.1)
//! accepts a delete of it: so a grant of `approver` dies, and a later revoke
//! of the same tuple is applied.
#![cfg(feature = "redis")]

#[macro_use]
mod support;

use std::time::Duration;

use fga_wb::config::StoreKind;
use fga_wb::{Op, WriteBehind};
use support::{config_for, new_store, stored};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Memory,
    Redis,
}

async fn handle(name: &str, setup: Setup) -> (support::TestStore, WriteBehind) {
    let s = new_store(&format!("{name}-{setup:?}")).await;
    let mut c = config_for(&s);
    if setup == Setup::Redis {
        c.buffer.store = StoreKind::Redis;
        c.redis.url = support::redis_url();
    }
    c.flush.batch_size = 1_000_000;
    c.flush.interval = Duration::from_secs(3600);
    let wb = WriteBehind::builder(c)
        // `approver` is not in the model: OpenFGA is the one to refuse it.
        .validate_against_model(false)
        .automatic_flush(false)
        .build()
        .await
        .expect("build the handle");
    (s, wb)
}

/// user:a's grant dies and its later revoke is applied; user:b's grant dies
/// and nothing follows; user:c's grant dies and a revoke is pending. The
/// listing marks a's and c's letters superseded; a replay of all drops them
/// (c's pending revoke untouched) and sends b's again, which OpenFGA refuses
/// again (a new letter). OpenFGA never holds an approver tuple.
async fn a_replay_never_undoes_a_newer_op(setup: Setup) {
    let (s, wb) = handle("wb-dlq-superseded", setup).await;
    let doc = "document:report";
    for u in ["user:a", "user:b", "user:c"] {
        wb.grant(u, "approver", doc).await.unwrap();
    }
    let r = wb.flush().await.unwrap();
    assert_eq!(r.dead_lettered, 3, "{r:?}");
    wb.revoke("user:a", "approver", doc).await.unwrap();
    let r = wb.flush().await.unwrap();
    assert_eq!(
        (r.applied, r.dead_lettered),
        (1, 0),
        "OpenFGA takes the delete: {r:?}"
    );
    wb.revoke("user:c", "approver", doc).await.unwrap();

    let letters = wb.dead_letters().await.unwrap();
    let marks: Vec<(&str, Op, bool, bool)> = letters
        .iter()
        .map(|d| (d.tuple.user.as_str(), d.op, d.superseded, d.transient))
        .collect();
    assert_eq!(
        marks,
        [
            ("user:a", Op::Grant, true, false),
            ("user:b", Op::Grant, false, false),
            ("user:c", Op::Grant, true, false),
        ]
    );

    let r = wb.replay_dead_letters(None).await.unwrap();
    assert_eq!((r.replayed, r.superseded), (1, 2), "{r:?}");
    // The replay flushed: b refused again, c's revoke applied.
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 0, "{p:?}");
    let letters = wb.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (letters[0].tuple.user.as_str(), letters[0].superseded),
        ("user:b", false)
    );
    assert!(stored(&s).await.is_empty(), "no approver tuple was written");
    let t = wb.status().await.unwrap().totals;
    assert_eq!(
        t.acknowledged,
        t.applied + t.coalesced + t.dead_lettered + t.cleared,
        "every op accounted for: {t:?}"
    );
    wb.shutdown().await.unwrap();
}

/// A letter whose op dies again replaces the older one: the same grant
/// refused twice leaves two letters, only the newer is current, and
/// replaying the older by id drops it.
async fn the_newest_letter_of_a_tuple_is_the_current_one(setup: Setup) {
    let (_s, wb) = handle("wb-dlq-newest", setup).await;
    for _ in 0..2 {
        wb.grant("user:a", "approver", "document:x").await.unwrap();
        let r = wb.flush().await.unwrap();
        assert_eq!(r.dead_lettered, 1, "{r:?}");
    }
    let letters = wb.dead_letters().await.unwrap();
    let marks: Vec<bool> = letters.iter().map(|d| d.superseded).collect();
    assert_eq!(marks, [true, false], "{letters:?}");
    let r = wb
        .replay_dead_letters(Some(&[letters[0].id]))
        .await
        .unwrap();
    assert_eq!((r.replayed, r.superseded), (0, 1), "{r:?}");
    let left = wb.dead_letters().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, letters[1].id);
    wb.shutdown().await.unwrap();
}

/// A clear that drops a newer op of a tuple with a dead letter leaves the
/// letter superseded, as a write of that op would (the Redis script failed
/// with a Lua error here, after deleting queued jobs whose ops it then left
/// held by them).
async fn a_clear_of_a_newer_op_supersedes_the_letter(setup: Setup) {
    let (_s, wb) = handle("wb-dlq-clear", setup).await;
    wb.grant("user:a", "approver", "document:x").await.unwrap();
    let r = wb.flush().await.unwrap();
    assert_eq!(r.dead_lettered, 1, "{r:?}");
    wb.revoke("user:a", "approver", "document:x").await.unwrap();
    assert_eq!(wb.clear().await.unwrap(), 1);
    let letters = wb.dead_letters().await.unwrap();
    let marks: Vec<bool> = letters.iter().map(|d| d.superseded).collect();
    assert_eq!(marks, [true], "{letters:?}");
    let r = wb.replay_dead_letters(None).await.unwrap();
    assert_eq!((r.replayed, r.superseded), (0, 1), "{r:?}");
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 0, "{p:?}");
    wb.shutdown().await.unwrap();
}

for_each_setup!(
    [memory => super::Setup::Memory, redis => super::Setup::Redis]
    a_replay_never_undoes_a_newer_op,
    the_newest_letter_of_a_tuple_is_the_current_one,
    a_clear_of_a_newer_op_supersedes_the_letter,
);
