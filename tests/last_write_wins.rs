//! Last write wins per tuple: a slow write racing a newer op on its key, and
//! random ops under slow and failing writes, end in each tuple's last
//! acknowledged state (ARCHITECTURE.md, promise 5).
//!
//! Tests marked "real server" run against the OpenFGA that `scripts/test`
//! starts; the others put wiremock in its place, replaying responses captured
//! from the real server (`wiremock-fixtures/`), for what a healthy server
//! cannot be made to do on demand.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fga_wb::{Op, WriteBehind};
use serde_json::Value;
use support::mock::*;
use support::{assert_accounted, eventually, fixture, touched, Rng};
use wiremock::Request;

/// Sequence (wiremock): a grant's Write is held in flight (the mock answers
/// it after 2 s) while a revoke of the same key is acknowledged. The revoke
/// is not sent alongside or before the held grant; once the grant's request
/// ends, the revoke goes out, so the last request touching the key is a
/// delete: the final state is revoked. Nothing is left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_racing_an_in_flight_grant_ends_revoked() {
    let server = mock_openfga().await;
    let held = fixture("write-ok")
        .response()
        .set_delay(Duration::from_secs(2));
    let mut arrivals = reporting_write(&server, held, Some(1)).await;
    write_mock()
        .respond_with(fixture("write-ok").response())
        .mount(&server)
        .await;

    let wb = manual_handle(&server).await;
    let key = "document:1#editor@user:anne";
    wb.grant("user:anne", "editor", "document:1").await.unwrap();
    let flushing = flush_until_a_write_arrives(&wb, &mut arrivals).await;

    wb.revoke("user:anne", "editor", "document:1")
        .await
        .unwrap();
    let p = wb.pending().await.unwrap();
    assert_eq!(
        (p.in_flight, p.deletes),
        (1, 1),
        "the scenario: the grant is still in flight when the revoke is acknowledged: {p:?}"
    );

    let first = flushing.await.unwrap().unwrap();
    assert_eq!(first.applied, 1, "{first:?}");
    // The revoke may already be out through the eager revoke flush; this
    // flush waits for it (flushes never overlap) or sends it.
    wb.flush().await.unwrap();
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 0), "{p:?}");

    let bodies = write_bodies(&server).await;
    let on_key: Vec<Op> = bodies
        .iter()
        .flat_map(touched)
        .filter(|(k, _)| k == key)
        .map(|(_, op)| op)
        .collect();
    assert_eq!(
        on_key,
        [Op::Grant, Op::Revoke],
        "requests touching {key}, in order: {bodies:#?}"
    );
    for b in &bodies {
        let keys: Vec<_> = touched(b).into_iter().map(|(k, _)| k).collect();
        let distinct: BTreeSet<_> = keys.iter().collect();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "a key twice in one request: {b}"
        );
    }
    let t = wb.status().await.unwrap().totals;
    assert_eq!((t.applied, t.dead_lettered), (2, 0), "{t:?}");
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// One Write as the mock saw it: what it carried and whether it answered OK.
#[derive(Debug)]
struct Seen {
    body: Value,
    ok: bool,
}

/// Sequence, randomised (wiremock): 1000 grants and revokes on 12 keys in
/// random order while a background flusher runs with tiny batches,
/// several requests in parallel, every write slowed down, and every 5th
/// write failing with a transient 503. Replaying the writes that succeeded,
/// in the order the server received them, gives exactly the last op per key:
/// a slow or retried write never overwrites a newer op. No request carries a
/// key twice; nothing is lost or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn last_op_wins_under_slow_and_failing_writes() {
    let server = mock_openfga().await;
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let ok = fixture("write-ok")
        .response()
        .set_delay(Duration::from_millis(15));
    let unavailable = fixture("unavailable-503").response();
    let log = seen.clone();
    write_mock()
        .respond_with(move |r: &Request| {
            let mut log = log.lock().unwrap();
            let fail = log.len() % 5 == 4;
            log.push(Seen {
                body: serde_json::from_slice(&r.body).unwrap(),
                ok: !fail,
            });
            if fail {
                unavailable.clone()
            } else {
                ok.clone()
            }
        })
        .mount(&server)
        .await;

    let mut cfg = mock_config(&server);
    cfg.flush.batch_size = 3;
    cfg.flush.interval = Duration::from_millis(5);
    cfg.flush.max_tuples_per_write = 2;
    cfg.flush.max_parallel_requests = 4;
    cfg.flush.retry_initial_backoff = Duration::from_millis(2);
    cfg.flush.retry_max_backoff = Duration::from_millis(20);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();

    let mut rng = Rng::from_env_or_random();
    let users = ["user:anne", "user:bob", "user:carl", "user:dana"];
    let objects = ["document:1", "document:2", "document:3"];
    let mut last: BTreeMap<String, Op> = BTreeMap::new();
    for _ in 0..1000 {
        let u = *rng.pick(&users);
        let o = *rng.pick(&objects);
        let op = if rng.below(2) == 0 {
            Op::Grant
        } else {
            Op::Revoke
        };
        match op {
            Op::Grant => wb.grant(u, "viewer", o).await.unwrap(),
            Op::Revoke => wb.revoke(u, "viewer", o).await.unwrap(),
        }
        last.insert(format!("{o}#viewer@{u}"), op);
        // Jitter, so ops land before, during and after writes of their key.
        match rng.below(4) {
            0 => tokio::time::sleep(Duration::from_millis(rng.below(20) as u64)).await,
            1 => tokio::task::yield_now().await,
            _ => {}
        }
    }
    eventually("everything flushed", Duration::from_secs(60), || async {
        let _ = wb.flush().await;
        let p = wb.pending().await.unwrap();
        p.total + p.in_flight == 0
    })
    .await;

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    eprintln!(
        "{} writes, {} failed; totals {:?}",
        seen.len(),
        seen.iter().filter(|s| !s.ok).count(),
        wb.status().await.unwrap().totals
    );
    assert!(
        seen.iter().any(|s| !s.ok),
        "the scenario: some writes failed"
    );
    let mut state: BTreeSet<String> = BTreeSet::new();
    let mut last_sent: BTreeMap<String, Op> = BTreeMap::new();
    for s in &seen {
        let keys = touched(&s.body);
        let distinct: BTreeSet<_> = keys.iter().map(|(k, _)| k).collect();
        assert_eq!(
            distinct.len(),
            keys.len(),
            "a key twice in one request: {s:?}"
        );
        if !s.ok {
            continue;
        }
        for (k, op) in keys {
            match op {
                Op::Grant => state.insert(k.clone()),
                Op::Revoke => state.remove(&k),
            };
            last_sent.insert(k, op);
        }
    }
    let expected: BTreeSet<String> = last
        .iter()
        .filter(|(_, op)| **op == Op::Grant)
        .map(|(k, _)| k.clone())
        .collect();
    assert_eq!(
        state, expected,
        "the state the successful writes leave equals the last op per key"
    );
    for (k, op) in &last {
        // Every key's last op is sent, even a revoke of a key that was never
        // granted (on_missing: ignore makes that harmless).
        assert_eq!(last_sent.get(k), Some(op), "last successful write of {k}");
    }
    let st = wb.status().await.unwrap();
    assert_eq!(st.totals.dead_lettered, 0);
    assert!(st.totals.retries > 0, "{:?}", st.totals);
    assert!(wb.dead_letters().await.unwrap().is_empty());
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}
