//! A full buffer applies the chosen overflow policy (reject, flush, block),
//! and `clear` drops pending ops, counts them, and leaves ops in flight alone
//! (ARCHITECTURE.md, promises 4 and 7).
//!
//! Tests marked "real server" run against the OpenFGA that `scripts/test`
//! starts; the others put wiremock in its place, replaying responses captured
//! from the real server (`wiremock-fixtures/`), for what a healthy server
//! cannot be made to do on demand.

mod support;

use std::time::Duration;

use fga_wb::config::Overflow;
use fga_wb::{Config, WriteBehind};
use support::mock::*;
use support::{assert_accounted, config_for, fixture, new_store, stored, touched};

fn with_capacity(mut c: Config, capacity: usize, overflow: Overflow) -> Config {
    c.buffer.capacity = capacity;
    c.buffer.overflow = overflow;
    c
}

async fn grant_n(wb: &WriteBehind, from: usize, to: usize) {
    for i in from..to {
        wb.grant(&format!("user:u{i}"), "viewer", "document:1")
            .await
            .unwrap();
    }
}

/// Overflow `reject` (real server): with capacity 10, the 11th distinct
/// grant fails at once with a buffer-full error that says what to do, and
/// nothing is buffered for it; ops on keys already pending are still
/// accepted (coalesced); once a flush makes room, new keys are accepted.
#[tokio::test]
async fn overflow_reject() {
    let s = new_store("wb-overflow-reject").await;
    let cfg = with_capacity(manual_flush(config_for(&s)), 10, Overflow::Reject);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    grant_n(&wb, 0, 10).await;
    let e = wb
        .grant("user:u10", "viewer", "document:1")
        .await
        .unwrap_err();
    assert!(e.is_buffer_full(), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("full") && msg.contains("buffer.capacity") && msg.contains("flush"),
        "the error says what to do: {msg}"
    );
    assert_eq!(wb.pending().await.unwrap().total, 10);

    // Same key: coalesced, no new room needed.
    wb.grant("user:u3", "viewer", "document:1").await.unwrap();
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total, 10, "{p:?}");
    assert_eq!(wb.status().await.unwrap().totals.coalesced, 1);

    let r = wb.flush().await.unwrap();
    assert_eq!(r.applied, 10, "{r:?}");
    wb.grant("user:u10", "viewer", "document:1").await.unwrap();
    wb.flush().await.unwrap();
    assert_eq!(stored(&s).await.len(), 11);
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// Overflow `flush` (real server): with capacity 10, the 11th distinct grant
/// flushes the 10 pending ops synchronously, then is accepted. With OpenFGA
/// down (a closed port) the synchronous flush cannot make room and the grant
/// fails with a buffer-full error instead of growing the buffer.
#[tokio::test]
async fn overflow_flush() {
    let s = new_store("wb-overflow-flush").await;
    let cfg = with_capacity(manual_flush(config_for(&s)), 10, Overflow::Flush);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    grant_n(&wb, 0, 10).await;
    assert!(stored(&s).await.is_empty());
    wb.grant("user:u10", "viewer", "document:1").await.unwrap();
    assert_eq!(
        stored(&s).await.len(),
        10,
        "the 10 pending ops were flushed before the 11th was accepted"
    );
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total, 1, "{p:?}");
    wb.flush().await.unwrap();
    assert_eq!(stored(&s).await.len(), 11);
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();

    // OpenFGA down.
    let cfg = with_capacity(manual_flush(closed_port_config()), 10, Overflow::Flush);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    grant_n(&wb, 0, 10).await;
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        wb.grant("user:u10", "viewer", "document:1"),
    )
    .await
    .expect("the grant returned")
    .unwrap_err();
    assert!(e.is_buffer_full(), "{e}");
    assert_eq!(wb.pending().await.unwrap().total, 10);
    wb.clear().await.unwrap();
}

/// Overflow `flush` with an OpenFGA that accepts connections and never
/// answers (a Write hung past the request timeout): the synchronous flush
/// is waited for up to `block_timeout`, then the grant fails as buffer-full.
/// Before, it waited for every request's timeout and retries and the
/// unknown outcome's hold: some 20 s here, a minute with the defaults.
#[tokio::test]
async fn overflow_flush_is_bounded_when_openfga_hangs() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(fixture("hung-write").response())
        .mount(&server)
        .await;
    let mut cfg = with_capacity(manual_flush(mock_config(&server)), 10, Overflow::Flush);
    cfg.buffer.block_timeout = Duration::from_millis(300);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    grant_n(&wb, 0, 10).await;
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        wb.grant("user:u10", "viewer", "document:1"),
    )
    .await
    .expect("the grant returned")
    .unwrap_err();
    assert!(e.is_buffer_full(), "{e}");
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 10, "{p:?}");
    wb.clear().await.unwrap();
}

/// Overflow `block` (real server): with capacity 10 and no flush due by size
/// or age (batch size and interval far away), the 11th distinct grant waits,
/// the full buffer gets flushed in the background, and the grant is
/// accepted within `block_timeout`.
#[tokio::test]
async fn overflow_block_waits_for_room() {
    let s = new_store("wb-overflow-block").await;
    let mut cfg = with_capacity(manual_flush(config_for(&s)), 10, Overflow::Block);
    cfg.buffer.block_timeout = Duration::from_secs(5);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    grant_n(&wb, 0, 10).await;
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        wb.grant("user:u10", "viewer", "document:1"),
    )
    .await
    .expect("the grant returned");
    assert!(
        r.is_ok(),
        "block should succeed once the buffer is flushed: {r:?}"
    );
    assert!(stored(&s).await.len() >= 10);
    wb.flush().await.unwrap();
    assert_eq!(stored(&s).await.len(), 11);
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// Overflow `block` with the batch size at the capacity (real server): the
/// usual configuration shape. The 11th grant waits for the size-triggered
/// background flush and is accepted.
#[tokio::test]
async fn overflow_block_with_size_trigger() {
    let s = new_store("wb-overflow-block-size").await;
    let mut cfg = with_capacity(manual_flush(config_for(&s)), 10, Overflow::Block);
    cfg.flush.batch_size = 10;
    cfg.buffer.block_timeout = Duration::from_secs(5);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    for i in 0..30 {
        tokio::time::timeout(
            Duration::from_secs(20),
            wb.grant(&format!("user:u{i}"), "viewer", "document:1"),
        )
        .await
        .expect("the grant returned")
        .unwrap();
    }
    wb.flush().await.unwrap();
    assert_eq!(stored(&s).await.len(), 30);
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// Overflow `block` with OpenFGA down (closed port): the 11th distinct grant
/// waits `block_timeout`, then fails with a buffer-full error that says how
/// long it waited; the buffer did not grow.
#[tokio::test]
async fn overflow_block_times_out_when_openfga_is_down() {
    let mut cfg = with_capacity(manual_flush(closed_port_config()), 10, Overflow::Block);
    cfg.buffer.block_timeout = Duration::from_millis(300);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    grant_n(&wb, 0, 10).await;
    let e = tokio::time::timeout(
        Duration::from_secs(20),
        wb.grant("user:u10", "viewer", "document:1"),
    )
    .await
    .expect("the grant returned")
    .unwrap_err();
    assert!(e.is_buffer_full(), "{e}");
    assert!(e.to_string().contains("waiting"), "{e}");
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 10, "{p:?}");
    wb.clear().await.unwrap();
}

/// A full buffer while flushing is stopped (OpenFGA refuses the token with
/// 401, so nothing can be written until that is fixed): overflow `block`'s
/// and `reject`'s errors name the stop instead of advising a larger
/// `buffer.capacity`. The ops already buffered stay.
#[tokio::test]
async fn a_full_buffer_says_flushing_is_stopped() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(fixture("auth-wrong-token").response())
        .mount(&server)
        .await;
    for overflow in [Overflow::Block, Overflow::Reject] {
        let mut cfg = with_capacity(manual_flush(mock_config(&server)), 2, overflow);
        cfg.buffer.block_timeout = Duration::from_millis(300);
        let wb = WriteBehind::builder(cfg).build().await.unwrap();
        grant_n(&wb, 0, 2).await;
        let stop = wb.flush().await.unwrap_err();
        assert!(stop.is_auth(), "{stop}");
        let e = tokio::time::timeout(
            Duration::from_secs(60),
            wb.grant("user:u2", "viewer", "document:1"),
        )
        .await
        .expect("the grant returned")
        .unwrap_err();
        assert!(e.is_buffer_full(), "{overflow:?}: {e}");
        let msg = e.to_string();
        assert!(
            msg.contains("flushing is stopped") && msg.contains(&stop.to_string()),
            "{overflow:?}: {msg}"
        );
        assert!(
            !msg.contains("raise buffer.capacity"),
            "{overflow:?}: {msg}"
        );
        let p = wb.pending().await.unwrap();
        assert_eq!(p.total + p.in_flight, 2, "{overflow:?}: {p:?}");
        wb.clear().await.unwrap();
    }
}

/// Clear (real server): `clear` drops every pending op, returns how many,
/// counts them in `totals.cleared`, and none of them reaches OpenFGA, not
/// even through a later flush.
#[tokio::test]
async fn clear_drops_pending_ops_and_counts_them() {
    let s = new_store("wb-clear").await;
    let wb = WriteBehind::builder(manual_flush(config_for(&s)))
        .build()
        .await
        .unwrap();
    grant_n(&wb, 0, 30).await;
    grant_n(&wb, 0, 5).await; // coalesced onto pending ops
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total, 30);

    assert_eq!(wb.clear().await.unwrap(), 30);
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 0), "{p:?}");
    let t = wb.status().await.unwrap().totals;
    assert_eq!(t.cleared, 30, "{t:?}");
    assert_eq!(t.coalesced, 5, "{t:?}");
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.requests), (0, 0), "{r:?}");
    assert!(stored(&s).await.is_empty(), "nothing reached OpenFGA");
    assert_eq!(wb.clear().await.unwrap(), 0);
    assert_accounted(&wb).await;
    let r = wb.shutdown().await.unwrap();
    assert_eq!(r.left.total, 0);
    assert!(stored(&s).await.is_empty());
}

/// Clear while a write is in flight (wiremock, the write held 1 s): the
/// in-flight op is not dropped (it may already be applied) and ends applied;
/// only the pending ops are cleared and counted, and never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_leaves_in_flight_ops_alone() {
    let server = mock_openfga().await;
    let held = fixture("write-ok")
        .response()
        .set_delay(Duration::from_secs(1));
    let mut arrivals = reporting_write(&server, held, None).await;
    let wb = manual_handle(&server).await;
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let flushing = flush_until_a_write_arrives(&wb, &mut arrivals).await;
    wb.grant("user:bob", "viewer", "document:1").await.unwrap();
    wb.grant("user:carl", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.clear().await.unwrap(), 2);
    let r = flushing.await.unwrap().unwrap();
    assert_eq!(r.applied, 1, "{r:?}");
    let r = wb.flush().await.unwrap();
    assert_eq!(r.requests, 0, "{r:?}");
    let sent: Vec<String> = write_bodies(&server)
        .await
        .iter()
        .flat_map(touched)
        .map(|(k, _)| k)
        .collect();
    assert_eq!(sent, ["document:1#viewer@user:anne"]);
    let t = wb.status().await.unwrap().totals;
    assert_eq!((t.applied, t.cleared), (1, 2), "{t:?}");
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}
