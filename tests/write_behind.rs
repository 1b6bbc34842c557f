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
