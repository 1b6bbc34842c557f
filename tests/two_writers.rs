//! Two application processes writing overlapping tuples to
//! OpenFGA on PostgreSQL (which answers 409 to concurrent first inserts of
//! one tuple, and can deadlock two inserts in different orders), with
//! default settings. Every acknowledged op is applied before `shutdown()`
//! returns, and the counters say what a counting proxy saw.

mod support;

use std::collections::BTreeSet;

use fga_wb::openfga::ReadFilter;
use fga_wb::{ShutdownReport, Totals, WriteBehind};
use support::{config_for, documents_model, new_store_on, Server, TestStore};
use testenv::{DelayProxy, WriteCounts};

const N: usize = 3000;

fn tuple(i: usize) -> (String, String) {
    (format!("user:u{}", i % 50), format!("document:d{}", i / 50))
}

/// One application process: a memory-store handle, default settings but
/// for automatic flushing, talking to OpenFGA through its own counting
/// proxy.
async fn process(s: &TestStore) -> (WriteBehind, DelayProxy) {
    let upstream = s.server.url().trim_start_matches("http://").to_owned();
    let proxy = DelayProxy::start(&upstream, std::time::Duration::ZERO)
        .await
        .expect("proxy");
    let mut c = config_for(s);
    c.openfga.api_url = format!("http://{}", proxy.addr());
    // Flushed by the test, so both write the shared tuples at one moment.
    let wb = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .expect("handle");
    (wb, proxy)
}

/// Grants `ids` in that order, then revokes those in `revoked`.
async fn load(wb: WriteBehind, ids: Vec<usize>, revoked: Vec<usize>) {
    for i in ids {
        let (u, o) = tuple(i);
        wb.grant(&u, "viewer", &o).await.expect("grant");
    }
    for i in revoked {
        let (u, o) = tuple(i);
        wb.revoke(&u, "viewer", &o).await.expect("revoke");
    }
}

fn check_counts(who: &str, t: &Totals, report: &ShutdownReport, proxy: &WriteCounts) {
    eprintln!("{who}: {t:?}; proxy saw {proxy:?}; shutdown {report:?}");
    assert_eq!(
        report.left.total + report.left.in_flight,
        0,
        "{who}: left ops behind: {report:?}"
    );
    assert!(
        report.flushed.error.is_none(),
        "{who}: nothing was left, yet {report:?}"
    );
    assert!(!report.flushed.duration.is_zero(), "{who}: {report:?}");
    assert_eq!(
        t.acknowledged,
        t.applied + t.coalesced + t.dead_lettered + t.cleared,
        "{who}: totals do not add up: {t:?}"
    );
    assert_eq!(t.dead_lettered, 0, "{who}: {t:?}");
    assert_eq!(
        t.requests, proxy.sent,
        "{who}: Write requests sent: {t:?} vs {proxy:?}"
    );
    let ok = proxy.answered.get(&200).copied().unwrap_or(0);
    assert_eq!(
        t.retries,
        proxy.sent - ok,
        "{who}: every Write not answered 200 is a retry: {t:?} vs {proxy:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_with_overlapping_tuples_apply_everything_by_shutdown() {
    let s = new_store_on(Server::Caching, "two-writers", &documents_model()).await;
    let (a, proxy_a) = process(&s).await;
    let (b, proxy_b) = process(&s).await;
    // Both grant 0..N (A in order, B in reverse), and each a range of its
    // own; each revokes every 10th tuple of its own range.
    let a_ids: Vec<usize> = (0..N).chain(N..N + N / 2).collect();
    let b_ids: Vec<usize> = (0..N).rev().chain(N + N / 2..2 * N).collect();
    let a_revoked: Vec<usize> = (N..N + N / 2).step_by(10).collect();
    let b_revoked: Vec<usize> = (N + N / 2..2 * N).step_by(10).collect();
    let expected: BTreeSet<String> = (0..2 * N)
        .filter(|i| !a_revoked.contains(i) && !b_revoked.contains(i))
        .map(|i| {
            let (u, o) = tuple(i);
            format!("{o}#viewer@{u}")
        })
        .collect();
    tokio::join!(
        load(a.clone(), a_ids, Vec::new()),
        load(b.clone(), b_ids, Vec::new())
    );
    // Both write the shared half at once: PostgreSQL answers one of two
    // concurrent first inserts of a tuple with 409.
    let (fa, fb) = tokio::join!(a.flush(), b.flush());
    assert!(fa.is_ok() && fb.is_ok(), "{fa:?} {fb:?}");
    tokio::join!(
        load(a.clone(), Vec::new(), a_revoked),
        load(b.clone(), Vec::new(), b_revoked)
    );
    let before = (a.local_totals().applied, b.local_totals().applied);
    let (ra, rb) = tokio::join!(a.shutdown(), b.shutdown());
    let (ra, rb) = (ra.expect("shutdown a"), rb.expect("shutdown b"));
    // The shutdown report counts what the shutdown applied.
    assert_eq!(
        before.0 + ra.flushed.applied,
        a.local_totals().applied,
        "{ra:?}"
    );
    assert_eq!(
        before.1 + rb.flushed.applied,
        b.local_totals().applied,
        "{rb:?}"
    );

    let held: BTreeSet<String> = s
        .client
        .read_all(&s.store_id, &ReadFilter::default())
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(held.len(), expected.len(), "OpenFGA holds the wrong tuples");
    assert_eq!(held, expected);
    check_counts("a", &a.local_totals(), &ra, &proxy_a.write_counts());
    check_counts("b", &b.local_totals(), &rb, &proxy_b.write_counts());
}

/// Two processes with 15,000 disjoint grants each, automatic flushing on,
/// then `shutdown()` at once: everything is written. How long that takes
/// depends on the machine (about 9 s of the default 10 s deadline on a
/// quiet one, over 10 s on a slow CI runner), so the deadline here leaves
/// room for a slow machine and the duration is printed, not asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_with_disjoint_tuples_drain_at_shutdown() {
    let s = new_store_on(Server::Caching, "two-writers-disjoint", &documents_model()).await;
    let mut handles = Vec::new();
    for _ in 0..2 {
        let mut c = config_for(&s);
        c.flush.shutdown_deadline = std::time::Duration::from_secs(600);
        let wb = WriteBehind::builder(c).build().await.expect("handle");
        handles.push(wb);
    }
    let per = 15_000;
    tokio::join!(
        load(handles[0].clone(), (0..per).collect(), Vec::new()),
        load(handles[1].clone(), (per..2 * per).collect(), Vec::new())
    );
    let (ra, rb) = tokio::join!(handles[0].shutdown(), handles[1].shutdown());
    for (who, r) in [
        ("a", ra.expect("shutdown a")),
        ("b", rb.expect("shutdown b")),
    ] {
        eprintln!("{who}: shutdown {:?}", r.flushed.duration);
        assert_eq!(r.left.total + r.left.in_flight, 0, "{who}: {r:?}");
        assert!(r.flushed.error.is_none(), "{who}: {r:?}");
    }
    let held = s
        .client
        .read_all(&s.store_id, &ReadFilter::default())
        .await
        .unwrap();
    assert_eq!(held.len(), 2 * per);
}
