//! OpenFGA's caches never bring back a revoked "allowed".
//!
//! Against the OpenFGA that `scripts/test` starts as production runs it: on
//! PostgreSQL, with the check query cache, both iterator caches and the
//! cache controller on, TTL 60 s. Another application instance asks OpenFGA
//! directly with the default consistency, which fills the server's caches;
//! then fga-wb revokes (or grants a `blocked`), and its checks, before and
//! after the write is applied, must never answer from those caches. Each
//! test also proves the server does serve stale answers, so it cannot pass
//! against a server without caches. (It asks before fga-wb does: a
//! `HIGHER_CONSISTENCY` answer is written back into the server's cache.)
#![cfg(feature = "redis")]

#[macro_use]
mod support;

use std::time::Duration;

use fga_wb::config::StoreKind;
use fga_wb::openfga::CheckRequest;
use fga_wb::{Config, WriteBehind};
use support::{config_for, documents_model, new_store_on, Server, TestStore};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Memory,
    Redis,
}

fn config(s: &TestStore, setup: Setup) -> Config {
    let mut c = config_for(s);
    if setup == Setup::Redis {
        c.buffer.store = StoreKind::Redis;
        c.redis.url = support::redis_url();
    }
    // Nothing is written until the test flushes (revokes too).
    c.flush.interval = Duration::from_secs(3600);
    c.flush.eager_revokes = false;
    c.check.revoke_wait_timeout = Duration::from_millis(300);
    c
}

async fn handle(s: &TestStore, setup: Setup) -> WriteBehind {
    WriteBehind::builder(config(s, setup))
        .automatic_flush(false)
        .build()
        .await
        .expect("build the handle")
}

async fn store(name: &str, setup: Setup) -> TestStore {
    new_store_on(
        Server::Caching,
        &format!("{name}-{setup:?}"),
        &documents_model(),
    )
    .await
}

/// What another application instance sees: OpenFGA's answer with the
/// default consistency (its caches).
async fn raw_check(s: &TestStore, user: &str, relation: &str, object: &str) -> bool {
    let mut req = CheckRequest::new(user, relation, object);
    req.authorization_model_id = Some(s.model_id.clone());
    s.client
        .check(&s.store_id, &req)
        .await
        .unwrap_or_else(|e| panic!("raw check: {e}"))
}

/// The handle's answer, where nothing is pending that could make it fail
/// closed: an error is a failure of the test, not a "not allowed".
async fn allowed(wb: &WriteBehind, user: &str, relation: &str, object: &str) -> bool {
    wb.check(user, relation, object)
        .await
        .unwrap_or_else(|e| panic!("check {user} {relation} {object}: {e}"))
}

async fn flush(wb: &WriteBehind) {
    let r = wb.flush().await.expect("flush");
    assert!(r.error.is_none(), "{r:?}");
}

/// A revoke, and a `blocked` grant, are never answered from the server's
/// cache: not while pending, not once applied, not by another process.
async fn revoked_access_never_returns_from_the_servers_cache(setup: Setup) {
    let s = store("cache-revoke", setup).await;
    let wb = handle(&s, setup).await;
    // Another process on the same Redis store (the memory store is per
    // handle: there the one handle is both).
    let other = match setup {
        Setup::Redis => Some(handle(&s, setup).await),
        Setup::Memory => None,
    };
    let mut stale_on_server = 0;
    for round in 0..5 {
        let doc = format!("document:r{round}");
        wb.grant("user:anne", "viewer", &doc).await.unwrap();
        flush(&wb).await;
        // Fill every cache: the server's (raw) and each handle's own.
        assert!(raw_check(&s, "user:anne", "viewer", &doc).await);
        assert!(raw_check(&s, "user:anne", "can_view", &doc).await);
        assert!(allowed(&wb, "user:anne", "viewer", &doc).await);
        if let Some(o) = &other {
            assert!(allowed(o, "user:anne", "viewer", &doc).await);
        }

        wb.revoke("user:anne", "viewer", &doc).await.unwrap();
        // Denied, or failed closed while the revoke is pending.
        let a = wb.check("user:anne", "viewer", &doc).await;
        assert!(!matches!(a, Ok(true)), "pending revoke: {a:?}");
        flush(&wb).await;
        // Before any handle asks: a fresh answer (HIGHER_CONSISTENCY) is
        // written back into the server's cache.
        if raw_check(&s, "user:anne", "viewer", &doc).await {
            stale_on_server += 1;
        }
        for (who, h) in std::iter::once(&wb).chain(other.as_ref()).enumerate() {
            // Nothing is pending now: an answer, not a fail-closed error.
            let a = h.check("user:anne", "viewer", &doc).await;
            assert!(
                matches!(a, Ok(false)),
                "round {round}: handle {who} answered {a:?} after the revoke was applied"
            );
            let batch = h
                .batch_check(&[
                    CheckRequest::new("user:anne", "viewer", &doc),
                    CheckRequest::new("user:anne", "can_view", &doc),
                ])
                .await
                .expect("batch check");
            assert!(
                batch.iter().all(|a| matches!(a, Ok(false))),
                "round {round}: handle {who}'s batch check: {batch:?}"
            );
        }

        // A grant that takes access away: `can_view` is `viewer but not
        // blocked`.
        let doc = format!("document:b{round}");
        wb.grant("user:bob", "viewer", &doc).await.unwrap();
        flush(&wb).await;
        assert!(raw_check(&s, "user:bob", "can_view", &doc).await);
        wb.grant("user:bob", "blocked", &doc).await.unwrap();
        flush(&wb).await;
        for h in std::iter::once(&wb).chain(other.as_ref()) {
            let a = h.check("user:bob", "can_view", &doc).await;
            assert!(
                matches!(a, Ok(false)),
                "round {round}: blocked, yet {a:?} (from the server's cache?)"
            );
        }
    }
    assert!(
        stale_on_server > 0,
        "the server never answered from its cache: this test needs OpenFGA with its caches on"
    );
}

/// Once applied, a grant is seen (the server cached "not allowed" before
/// it), and checks that cannot depend on a recent write keep using the
/// server's caches.
async fn applied_grants_are_seen_and_unrelated_checks_keep_the_cache(setup: Setup) {
    let s = store("cache-grant", setup).await;
    let wb = handle(&s, setup).await;
    assert!(!raw_check(&s, "user:carl", "viewer", "document:g").await);
    assert!(!allowed(&wb, "user:carl", "viewer", "document:g").await);
    wb.grant("user:carl", "viewer", "document:g").await.unwrap();
    flush(&wb).await;
    assert!(
        !raw_check(&s, "user:carl", "viewer", "document:g").await,
        "the server's cache should still say no: this test needs OpenFGA with its caches on"
    );
    assert!(allowed(&wb, "user:carl", "viewer", "document:g").await);

    let before = wb.status().await.unwrap().totals.higher_consistency;
    assert!(before > 0);
    // document#viewer depends on document:g only through the same object: a
    // check on another document has no recent write to fear, but for
    // `check.server_cache_ttl` after the start of a process on the memory
    // store (what was written before it; see the test below), or of a new
    // epoch of a Redis store (the marks of earlier writes may have gone
    // with Redis's data), every check counts one.
    assert!(!allowed(&wb, "user:carl", "viewer", "document:other").await);
    assert_eq!(
        wb.status().await.unwrap().totals.higher_consistency,
        before + 1
    );
}

/// A process on the memory store that starts right after another (a
/// restart) does not trust the server's caches: the one before may have
/// written a revoke as it shut down, younger than what they hold. The
/// Redis store knows every process's writes. Before, the new process
/// answered "allowed" from the server's cache.
#[tokio::test]
async fn a_restarted_process_never_answers_from_the_servers_cache() {
    let setup = Setup::Memory;
    let s = store("cache-restart", setup).await;
    let mut stale_on_server = 0;
    for round in 0..5 {
        let doc = format!("document:s{round}");
        let before = handle(&s, setup).await;
        before.grant("user:erin", "viewer", &doc).await.unwrap();
        flush(&before).await;
        assert!(raw_check(&s, "user:erin", "viewer", &doc).await);
        before.revoke("user:erin", "viewer", &doc).await.unwrap();
        before.shutdown().await.unwrap();
        if raw_check(&s, "user:erin", "viewer", &doc).await {
            stale_on_server += 1;
        }
        let after = handle(&s, setup).await;
        let a = after.check("user:erin", "viewer", &doc).await;
        assert!(
            matches!(a, Ok(false)),
            "round {round}: the restarted process answered {a:?}"
        );
        after.shutdown().await.unwrap();
    }
    assert!(
        stale_on_server > 0,
        "the server never answered from its cache: this test needs OpenFGA with its caches on"
    );
}

/// `check.always_higher_consistency` sends every check fresh, and keeps
/// no answer in fga-wb's own cache either: a revoke made by another writer
/// (the `fga` CLI here) is denied at the next check. Before, the memory
/// store answered `allowed` from its own cache for up to `cache.ttl`.
async fn always_higher_consistency_bypasses_the_cache_everywhere(setup: Setup) {
    let s = store("cache-always", setup).await;
    let mut c = config(&s, setup);
    c.check.always_higher_consistency = true;
    let wb = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    assert!(!allowed(&wb, "user:dan", "viewer", "document:a").await);
    assert_eq!(wb.status().await.unwrap().totals.higher_consistency, 1);
    support::write_to_openfga(&s, "user:dan", "viewer", "document:a").await;
    assert!(allowed(&wb, "user:dan", "viewer", "document:a").await);
    let dan = fga_wb::TupleKey::new("user:dan", "viewer", "document:a").unwrap();
    s.client
        .write(
            &s.store_id,
            &fga_wb::openfga::WriteRequest::idempotent(vec![], vec![dan]),
        )
        .await
        .unwrap();
    assert!(!allowed(&wb, "user:dan", "viewer", "document:a").await);
}

for_each_setup!(
    [memory => super::Setup::Memory, redis => super::Setup::Redis]
    revoked_access_never_returns_from_the_servers_cache,
    applied_grants_are_seen_and_unrelated_checks_keep_the_cache,
    always_higher_consistency_bypasses_the_cache_everywhere,
);

/// A time of the Redis store's last writes that no fga-wb wrote ("nan")
/// is read as "just now": checks after a revoke ask for fresh answers, not
/// the server's cache. Before, Lua read "nan" as a number that no
/// comparison moves, it reached Rust as a negative age, read as "no write
/// remembered", and the check answered "allowed" from the server's cache.
#[tokio::test]
async fn an_unreadable_time_of_the_last_writes_asks_for_fresh_answers() {
    let setup = Setup::Redis;
    let s = store("cache-written-nan", setup).await;
    let wb = handle(&s, setup).await;
    let written = format!("fga-wb:{{{}}}:written", s.store_id);
    let mut c = support::redis_conn().await;
    let mut stale_on_server = 0;
    for round in 0..5 {
        let doc = format!("document:n{round}");
        wb.grant("user:fay", "viewer", &doc).await.unwrap();
        flush(&wb).await;
        assert!(raw_check(&s, "user:fay", "viewer", &doc).await);
        wb.revoke("user:fay", "viewer", &doc).await.unwrap();
        flush(&wb).await;
        if raw_check(&s, "user:fay", "viewer", &doc).await {
            stale_on_server += 1;
        }
        let _: i64 = ::redis::cmd("HSET")
            .arg(&written)
            .arg("*")
            .arg("nan")
            .query_async(&mut c)
            .await
            .unwrap();
        let a = wb.check("user:fay", "viewer", &doc).await;
        assert!(
            matches!(a, Ok(false)),
            "round {round}: with the write time unreadable, {a:?}"
        );
    }
    assert!(
        stale_on_server > 0,
        "the server never answered from its cache: this test needs OpenFGA with its caches on"
    );
    wb.shutdown().await.unwrap();
}
