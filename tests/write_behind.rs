//! The handle end to end against the real OpenFGA: acknowledgement, read
//! your writes, flush, revoke.

mod support;

use std::time::Duration;

use fga_wb::WriteBehind;
use support::{config_for, new_store, stored};

/// Grants are visible to checks before any flush (derived `viewer` from
/// `editor` included), reach OpenFGA on flush, and a revoke is denied at once.
#[tokio::test]
async fn grant_check_flush_revoke() {
    let s = new_store("wb-basic").await;
    let mut cfg = config_for(&s);
    cfg.flush.interval = Duration::from_secs(3600);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();

    wb.grant("user:anne", "editor", "document:1").await.unwrap();
    wb.grant("user:bob", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.pending().await.unwrap().writes, 2);
    assert!(
        stored(&s).await.is_empty(),
        "nothing written before the flush"
    );
    assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());
    assert!(wb.check("user:bob", "viewer", "document:1").await.unwrap());
    assert!(!wb.check("user:bob", "editor", "document:1").await.unwrap());

    let report = wb.flush().await.unwrap();
    assert_eq!(report.applied, 2);
    assert_eq!(
        stored(&s).await,
        ["document:1#editor@user:anne", "document:1#viewer@user:bob"]
    );

    wb.revoke("user:anne", "editor", "document:1")
        .await
        .unwrap();
    assert!(!wb.check("user:anne", "viewer", "document:1").await.unwrap());
    assert_eq!(stored(&s).await, ["document:1#viewer@user:bob"]);
    let r = wb.shutdown().await.unwrap();
    assert_eq!(r.left.total, 0);
}

/// A revoke goes out at once even right after a flush that had nothing to
/// write (that flush must not pause the revoke trigger).
#[tokio::test]
async fn revoke_after_an_empty_flush_goes_out_at_once() {
    let s = new_store("wb-revoke-after-empty").await;
    let mut cfg = config_for(&s);
    cfg.flush.interval = Duration::from_secs(3600);
    cfg.check.revoke_wait_timeout = Duration::from_secs(30);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:9").await.unwrap();
    wb.flush().await.unwrap();
    wb.flush().await.unwrap();
    wb.revoke("user:anne", "viewer", "document:9")
        .await
        .unwrap();
    // The check waits for the revoke to land; with the trigger paused it
    // would wait the whole hour-long interval and fail closed.
    assert!(!wb.check("user:anne", "viewer", "document:9").await.unwrap());
    assert!(stored(&s).await.is_empty());
}

/// With `flush.eager_revokes` off, a revoke waits for the batch or interval
/// like a grant, until a check needs it: then it is flushed at once and the
/// check is denied.
#[tokio::test]
async fn lazy_revokes_are_flushed_when_a_check_needs_them() {
    let s = new_store("wb-lazy-revokes").await;
    let mut cfg = config_for(&s);
    cfg.flush.interval = Duration::from_secs(3600);
    cfg.flush.eager_revokes = false;
    cfg.check.revoke_wait_timeout = Duration::from_secs(30);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:7").await.unwrap();
    wb.flush().await.unwrap();
    wb.revoke("user:anne", "viewer", "document:7")
        .await
        .unwrap();
    assert_eq!(wb.pending().await.unwrap().deletes, 1);
    assert!(!wb.check("user:anne", "viewer", "document:7").await.unwrap());
    assert!(stored(&s).await.is_empty());
}

/// `flush_up_to` writes the ops acknowledged up to a sequence number and
/// leaves later ones pending for the flusher's own triggers; a later op
/// folded into a pending one from before keeps its place in line and is
/// written in its stead.
async fn flush_up_to_writes_what_came_before(cfg: fga_wb::Config, s: &support::TestStore) {
    let wb = WriteBehind::builder(cfg)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    wb.grant("user:a", "viewer", "document:m").await.unwrap();
    wb.grant("user:b", "viewer", "document:m").await.unwrap();
    let mark = wb.last_acknowledged().await.unwrap();
    wb.grant("user:c", "viewer", "document:m").await.unwrap();
    // Folded into the grant to user:b, acknowledged before the mark.
    wb.revoke("user:b", "viewer", "document:m").await.unwrap();

    let r = wb.flush_up_to(mark).await.unwrap();
    assert_eq!((r.applied, r.error.as_deref()), (2, None), "{r:?}");
    assert_eq!(stored(s).await, ["document:m#viewer@user:a"]);
    let left = wb.pending().await.unwrap();
    assert_eq!((left.writes, left.deletes), (1, 0), "{left:?}");

    assert_eq!(wb.flush().await.unwrap().applied, 1);
    assert_eq!(
        stored(s).await,
        ["document:m#viewer@user:a", "document:m#viewer@user:c"]
    );
    wb.shutdown().await.unwrap();
}

#[tokio::test]
async fn flush_up_to_writes_what_came_before_a_mark() {
    let s = new_store("wb-flush-up-to").await;
    flush_up_to_writes_what_came_before(config_for(&s), &s).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn flush_up_to_writes_what_came_before_a_mark_in_redis() {
    let s = new_store("wb-flush-up-to-redis").await;
    let mut cfg = config_for(&s);
    cfg.buffer.store = fga_wb::config::StoreKind::Redis;
    cfg.redis.url = support::redis_url();
    flush_up_to_writes_what_came_before(cfg, &s).await;
}
