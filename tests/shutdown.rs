//! Shutdown drains pending ops, and with OpenFGA down returns at its
//! deadline reporting what is left; a server's lower tuples-per-Write limit
//! is learned, not bisected.
//!
//! Tests marked "real server" run against the OpenFGA that `scripts/test`
//! starts; the others put wiremock in its place, replaying responses captured
//! from the real server (`wiremock-fixtures/`), for what a healthy server
//! cannot be made to do on demand.

mod support;

use std::time::Duration;

use fga_wb::WriteBehind;
use support::mock::*;
use support::{config_for, fixture, new_store, stored};

/// Shutdown (real server): 5000 pending grants are drained by `shutdown`
/// within its deadline; nothing is left and all are in OpenFGA. Afterwards
/// the handle refuses work with a shutdown error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_pending_ops() {
    let s = new_store("wb-shutdown").await;
    let mut cfg = manual_flush(config_for(&s));
    cfg.flush.shutdown_deadline = Duration::from_secs(60);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    for i in 0..5000 {
        wb.grant(
            &format!("user:u{i}"),
            "viewer",
            &format!("document:d{}", i % 50),
        )
        .await
        .unwrap();
    }
    assert_eq!(wb.pending().await.unwrap().total, 5000);
    let r = tokio::time::timeout(Duration::from_secs(120), wb.shutdown())
        .await
        .expect("shutdown returned")
        .unwrap();
    assert_eq!((r.left.total, r.left.in_flight), (0, 0), "{r:?}");
    assert_eq!(r.flushed.applied, 5000, "{r:?}");
    assert_eq!(r.flushed.error, None, "{r:?}");
    assert_eq!(stored(&s).await.len(), 5000);

    assert!(wb
        .grant("user:late", "viewer", "document:1")
        .await
        .unwrap_err()
        .is_shutdown());
    assert!(wb.flush().await.unwrap_err().is_shutdown());
    assert!(wb.shutdown().await.unwrap_err().is_shutdown());
}

/// Two shutdowns at once (a signal hook's and `main`'s): the second fails
/// as shut down only once the first has drained, so a caller that exits on
/// it does not cut the drain short. Before, it failed at once, with most of
/// the 2,000 grants not yet written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_shutdown_waits_for_the_first() {
    let s = new_store("wb-shutdown-twice").await;
    let mut cfg = manual_flush(config_for(&s));
    cfg.flush.shutdown_deadline = Duration::from_secs(60);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    support::grant_users(&wb, "document:twice", 0..2000).await;
    let one = async {
        let r = wb.shutdown().await;
        (r.is_ok(), stored(&s).await.len())
    };
    let two = async {
        // Second: after the first has begun.
        tokio::task::yield_now().await;
        let r = wb.shutdown().await;
        (r.is_ok(), stored(&s).await.len())
    };
    let (a, b) = tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(one, two) })
        .await
        .expect("both returned");
    let (ok, failed) = if a.0 { (a, b) } else { (b, a) };
    assert!(
        ok.0 && !failed.0,
        "one shutdown ran, one failed: {a:?} {b:?}"
    );
    assert_eq!(failed.1, 2000, "written when the second returned");
}

/// Shutdown with OpenFGA down, three ways: nothing listening (connection
/// refused), a server that always answers 503, and a server that never
/// answers (the write hangs longer than the deadline). Each time `shutdown`
/// returns around its 1 s deadline (a 20 s timeout guards against a hang)
/// and reports every op as left over (pending, or in flight for the hung
/// write), and nothing as applied or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_with_openfga_down_returns_and_reports_what_is_left() {
    const N: usize = 50;
    let unavailable = mock_openfga().await;
    write_mock()
        .respond_with(fixture("unavailable-503").response())
        .mount(&unavailable)
        .await;
    let hung = mock_openfga().await;
    write_mock()
        .respond_with(fixture("hung-write").response())
        .mount(&hung)
        .await;
    let mut hung_cfg = mock_config(&hung);
    hung_cfg.openfga.request_timeout = Duration::from_secs(30);

    for (name, cfg) in [
        ("closed port", closed_port_config()),
        ("503", mock_config(&unavailable)),
        ("hung", hung_cfg),
    ] {
        let mut cfg = manual_flush(cfg);
        cfg.flush.shutdown_deadline = Duration::from_secs(1);
        let wb = WriteBehind::builder(cfg).build().await.unwrap();
        for i in 0..N {
            wb.grant(&format!("user:u{i}"), "viewer", "document:1")
                .await
                .unwrap();
        }
        let before = wb.pending().await.unwrap();
        assert_eq!(before.total + before.in_flight, N, "{name}");
        let r = tokio::time::timeout(Duration::from_secs(20), wb.shutdown())
            .await
            .unwrap_or_else(|_| panic!("{name}: shutdown did not return"))
            .unwrap();
        assert_eq!(
            r.left.total + r.left.in_flight,
            N,
            "{name}: every op is reported as left: {r:?}"
        );
        if name != "hung" {
            assert_eq!(r.left.total, N, "{name}: {r:?}");
            assert!(r.flushed.error.is_some(), "{name}: {r:?}");
        }
        assert_eq!(
            (r.flushed.applied, r.flushed.dead_lettered),
            (0, 0),
            "{name}: {r:?}"
        );
        assert!(wb.dead_letters().await.unwrap().is_empty(), "{name}");
    }
}

/// A shutdown while ops wait out a Write whose outcome is unknown (it
/// timed out; `flush.unknown_outcome_hold` is 10 min here): the hold ends
/// at the shutdown's 1 s deadline, so `shutdown` returns (a 20 s timeout
/// guards against a hang) and reports the ops as left over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_short_a_hold_under_way() {
    let hung = mock_openfga().await;
    write_mock()
        .respond_with(fixture("hung-write").response())
        .mount(&hung)
        .await;
    let mut cfg = no_quick_retries(manual_flush(mock_config(&hung)));
    cfg.openfga.request_timeout = Duration::from_millis(300);
    cfg.flush.unknown_outcome_hold = Duration::from_secs(600);
    cfg.flush.shutdown_deadline = Duration::from_secs(1);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    // The flush reports the timeout at once; the op stays in flight.
    let r = wb.flush().await.unwrap();
    assert!(r.error.is_some(), "{r:?}");
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 1), "held in flight: {p:?}");
    let r = tokio::time::timeout(Duration::from_secs(20), wb.shutdown())
        .await
        .expect("shutdown did not return: the hold outlived its deadline")
        .unwrap();
    assert_eq!(r.left.total + r.left.in_flight, 1, "{r:?}");
    assert_eq!(r.flushed.applied, 0, "{r:?}");
}

/// Past shutdown's deadline a chunk under way starts no new request: its
/// Write of two tuples is refused (400) after the 1 s deadline, and its
/// halves are not sent (cut off in the grace that follows, their outcome
/// would be unknown, and with the memory store the process would end with
/// Writes that may still land). The two ops are left, and said to be.
/// Before, the halves went out after the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_under_way_starts_no_request_past_the_deadline() {
    let (server, wb) = answered_past_the_deadline("write-unknown-type").await;
    support::grant_users(&wb, "document:late", 0..2).await;
    shut_down_leaving(&wb, 2).await;
    let writes = write_bodies(&server).await;
    assert_eq!(
        writes.len(),
        1,
        "no half sent past the deadline: {writes:?}"
    );
}

/// A request waiting to go again (a 429 asked for 2 s) when shutdown
/// begins, with a 1 s deadline: it does not go, and the op is left pending
/// at once, not in flight until the grace after the deadline cuts it off.
/// Before, the wait went on past the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waiting_past_the_deadline_is_not_sent() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(
            fixture("rate-limited-429")
                .response()
                .insert_header("retry-after", "2"),
        )
        .mount(&server)
        .await;
    let mut cfg = manual_flush(mock_config(&server));
    cfg.flush.request_retries = 3;
    cfg.flush.shutdown_deadline = Duration::from_secs(1);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:erin", "viewer", "document:4").await.unwrap();
    let flushing = tokio::spawn({
        let wb = wb.clone();
        async move { wb.flush().await }
    });
    while write_bodies(&server).await.is_empty() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = tokio::time::timeout(Duration::from_secs(20), wb.shutdown())
        .await
        .expect("shutdown returns")
        .unwrap();
    assert_eq!((r.left.total, r.left.in_flight), (1, 0), "{r:?}");
    let _ = flushing.await;
    assert_eq!(write_bodies(&server).await.len(), 1);
}

/// A handle whose shutdown deadline is 1 s, flushing only when told, and a
/// mock whose Writes are answered with fixture `name` just after it.
async fn answered_past_the_deadline(name: &str) -> (wiremock::MockServer, WriteBehind) {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(
            fixture(name)
                .response()
                .set_delay(Duration::from_millis(1_020)),
        )
        .mount(&server)
        .await;
    let mut cfg = no_quick_retries(manual_flush(mock_config(&server)));
    cfg.flush.shutdown_deadline = Duration::from_secs(1);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    (server, wb)
}

/// Shuts `wb` down, which leaves `left` ops and says so.
async fn shut_down_leaving(wb: &WriteBehind, left: usize) {
    let r = tokio::time::timeout(Duration::from_secs(20), wb.shutdown())
        .await
        .expect("shutdown returns")
        .unwrap();
    assert_eq!(r.left.total + r.left.in_flight, left, "{r:?}");
}

/// A grant whose tuple OpenFGA holds with another condition is replaced
/// by a delete and a write, two more requests: past shutdown's deadline
/// neither starts (the grant, cut off in the grace that follows, could
/// land after a later process's revoke). The grant is left, and said to
/// be. Before, the delete and the grant went out after the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_replaced_starts_no_request_past_the_deadline() {
    let (server, wb) = answered_past_the_deadline("write-duplicate-different-condition").await;
    grant_with_another_condition(&wb).await;
    shut_down_leaving(&wb, 1).await;
    let writes = write_bodies(&server).await;
    assert_eq!(
        writes.len(),
        1,
        "no delete or grant sent past the deadline: {writes:?}"
    );
}

/// An OpenFGA started with a lower `--max-tuples-per-write` (10) than the
/// configured 100: the first refusal teaches the handle the server's limit,
/// the refused request goes out again as requests the server takes (no
/// bisection), later flushes cut chunks of 10, and status shows the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_lower_tuple_limit_is_learned_not_bisected() {
    let own = support::own_store(
        testenv::OpenFgaOptions {
            max_tuples_per_write: Some(10),
            ..Default::default()
        },
        "low-limit",
        &support::documents_model(),
    )
    .await;
    let wb = WriteBehind::builder(manual_flush(own.config.clone()))
        .build()
        .await
        .unwrap();
    for i in 0..100 {
        wb.grant(&format!("user:u{i}"), "viewer", "document:low")
            .await
            .unwrap();
    }
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.dead_lettered), (100, 0), "{r:?}");
    // One refused request of 100, then ten of 10.
    assert_eq!(r.requests, 11, "{r:?}");
    assert_eq!(wb.status().await.unwrap().write_limit, Some(10));
    for i in 0..50 {
        wb.grant(&format!("user:v{i}"), "viewer", "document:low")
            .await
            .unwrap();
    }
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.requests), (50, 5), "{r:?}");
    wb.shutdown().await.unwrap();
}

/// A `shutdown()` cut short (its future dropped by the application's own
/// timeout) and then the handle dropped: the memory store's ops it did not
/// write are counted and logged as lost, as a drop without shutdown is.
/// Before, the drop saw a shutdown begun and said nothing.
#[tokio::test]
async fn a_shutdown_cut_short_says_what_is_lost() {
    let (logs, _guard) = support::logs::Logs::start();
    let mut cfg = manual_flush(closed_port_config());
    cfg.flush.shutdown_deadline = Duration::from_secs(30);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    support::grant_users(&wb, "document:cut", 0..3).await;
    let cut = tokio::time::timeout(Duration::from_millis(300), wb.shutdown()).await;
    assert!(cut.is_err(), "the shutdown was not cut short: {cut:?}");
    drop(wb);
    let text = logs.text();
    assert!(
        text.contains("cut short: 3 acknowledged ops were not written"),
        "{text}"
    );
}

/// `close()` stops without writing (real server): on the memory store the
/// ops it held are lost, and it says how many, as dropping the handle
/// does; later calls fail with a shutdown error.
#[tokio::test]
async fn close_says_what_a_memory_store_loses() {
    let (logs, _guard) = support::logs::Logs::start();
    let s = new_store("close-memory").await;
    let wb = WriteBehind::builder(manual_flush(config_for(&s)))
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    support::grant_users(&wb, "document:closed", 0..3).await;
    wb.close().await.unwrap();
    let text = logs.text();
    assert!(
        text.contains("closed without shutdown(): 3 acknowledged ops were not written"),
        "{text}"
    );
    let e = wb
        .grant("user:a", "viewer", "document:1")
        .await
        .unwrap_err();
    assert!(e.is_shutdown(), "{e}");
    assert!(stored(&s).await.is_empty());
}

/// A grant waiting for room (memory store, capacity 1, overflow `block`)
/// when `shutdown()` begins: the shutdown closes the store before its
/// flush writes the op that filled the buffer (each Write takes 1 s here)
/// and makes room, so the waiting grant is refused untouched. It is never
/// answered `Ok` and left unwritten: it fails as shut down (or, had it got
/// in first, is written). Before, it returned `Ok` and was lost with the
/// process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_races_shutdown_is_not_acknowledged_and_lost() {
    let server = mock_openfga().await;
    let mut writes = reporting_write(
        &server,
        fixture("write-ok")
            .response()
            .set_delay(Duration::from_secs(1)),
        None,
    )
    .await;
    let mut cfg = manual_flush(mock_config(&server));
    cfg.buffer.capacity = 1;
    cfg.buffer.overflow = fga_wb::config::Overflow::Block;
    cfg.buffer.block_timeout = Duration::from_secs(30);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:first", "viewer", "document:1")
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let wb = wb.clone();
        async move { wb.grant("user:second", "viewer", "document:1").await }
    });
    // The wait for room asks for a flush: its Write is under way (1 s).
    writes.recv().await.expect("a Write of the first op");
    let r = wb.shutdown().await.unwrap();
    let second = waiting.await.unwrap();
    let bodies = write_bodies(&server).await;
    let written = bodies.iter().any(|b| b.to_string().contains("user:second"));
    match second {
        Ok(()) => assert!(written, "acknowledged, never written: {r:?}"),
        Err(e) => {
            assert!(e.is_shutdown(), "{e}");
            assert!(!written, "refused, yet written: {r:?}");
        }
    }
}

/// A `shutdown()` the application cut short, with the handle kept: once the
/// flusher has ended (at its deadline), nothing renews the writer's Redis
/// lease, so the op it left in flight (a Write cut off, its outcome
/// unknown) goes to another process after the lease and the hold, as a dead
/// process's would. Before, the heartbeat renewed the lease for as long as
/// the handle lived, and the op stayed in flight, its checks failing
/// closed.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_cut_short_with_the_handle_kept_lets_others_take_over() {
    let server = mock_openfga().await;
    first_write_then_ok(&server, fixture("hung-write").response()).await;
    let mut cfg = no_quick_retries(mock_config(&server));
    cfg.buffer.store = fga_wb::config::StoreKind::Redis;
    cfg.redis.url = support::redis_url();
    cfg.redis.key_prefix = format!("fga-wb-cut-kept-{}", std::process::id());
    cfg.redis.writer_lease = Duration::from_secs(2);
    cfg.openfga.request_timeout = Duration::from_millis(300);
    cfg.flush.shutdown_deadline = Duration::from_secs(1);
    let kept = WriteBehind::builder(cfg.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    kept.grant("user:anne", "viewer", "document:cut")
        .await
        .unwrap();
    let cut = tokio::time::timeout(Duration::from_millis(100), kept.shutdown()).await;
    assert!(cut.is_err(), "the shutdown was not cut short: {cut:?}");
    let other = WriteBehind::builder(cfg)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    support::eventually(
        "another process to write the op left in flight",
        Duration::from_secs(30),
        || async {
            let _ = other.flush().await;
            let p = other.pending().await.unwrap();
            (p.total, p.in_flight) == (0, 0)
        },
    )
    .await;
    assert_eq!(write_bodies(&server).await.len(), 2);
    other.shutdown().await.unwrap();
    drop(kept);
}

/// A shutdown with a window of thousands of ops taken and not sent yet (50
/// slow Writes of it ahead, one at a time) gives them back to the Redis
/// store: another handle finds them pending, none in flight. Before, a
/// call giving back more than about 4,000 ops failed in Redis ("too many
/// results to unpack"): the shutdown failed, and the ops stayed this
/// writer's until its lease ended.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_gives_a_window_of_thousands_of_ops_back_to_redis() {
    let (server, cfg) = slow_writes(Some("fga-wb-window-back")).await;
    let wb = WriteBehind::builder(cfg.clone()).build().await.unwrap();
    let flushing = window_under_way(&wb, &server).await;
    let report = wb.shutdown().await;
    assert!(report.is_ok(), "{report:?}");
    let _ = flushing.await;
    let written: usize = write_bodies(&server)
        .await
        .iter()
        .map(|b| support::touched(b).len())
        .sum();
    let other = WriteBehind::builder(cfg)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let p = other.pending().await.unwrap();
    assert!(written < 1000, "{written} written: the window was not left");
    // Given back: pending, not in flight, but for the ops of a Write the
    // deadline may have cut off under way (sent just before it, on a slow
    // machine; one at a time here), kept in flight while it may land.
    assert_eq!(p.total, 5000 - written, "{p:?}");
    assert!(p.in_flight <= 100, "{p:?}");
    other.clear().await.unwrap();
    other.shutdown().await.unwrap();
}

/// After `shutdown()`, the calls that change the buffer (clear, dead-letter
/// replay and purge) fail with the shutdown error, as grants do. Before,
/// they ran: a replay put letters back as pending ops with no flusher left
/// to write them (in memory: lost at exit), and answered `Ok`.
#[tokio::test]
async fn calls_that_change_the_buffer_fail_after_shutdown() {
    let server = mock_openfga().await;
    first_write_then_ok(&server, fixture("write-unknown-relation").response()).await;
    let wb = manual_handle(&server).await;
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    wb.flush().await.unwrap();
    assert_eq!(wb.dead_letters().await.unwrap().len(), 1);
    wb.shutdown().await.unwrap();
    let refused = [
        wb.clear().await.map(|_| ()),
        wb.replay_dead_letters(None).await.map(|_| ()),
        wb.purge_dead_letters(None).await.map(|_| ()),
        wb.purge_dead_letters_up_to(u64::MAX).await.map(|_| ()),
    ];
    for r in refused {
        assert!(matches!(&r, Err(e) if e.is_shutdown()), "{r:?}");
    }
    assert_eq!(wb.dead_letters().await.unwrap().len(), 1);
}
