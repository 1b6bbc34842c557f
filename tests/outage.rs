//! Outage: OpenFGA dies in the middle of a flush and comes back. This test
//! runs its own OpenFGA (the `openfga` binary `scripts/test` found) on a
//! SQLite file, because the shared test server keeps its data in memory and
//! a restart would lose what was applied before the crash.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fga_wb::openfga::Secret;
use fga_wb::{Config, WriteBehind};
use support::documents_model;
use support::own_openfga::OwnOpenFga;

const N: usize = 20_000;
const DURING: usize = 200;

fn tuple(i: usize) -> (String, &'static str, String) {
    (
        format!("user:u{i}"),
        "viewer",
        format!("document:d{}", i % 997),
    )
}

/// Outage (own OpenFGA on SQLite): 20 000 grants are being flushed when
/// OpenFGA is killed (SIGKILL) with about a quarter of them applied and
/// requests in flight. While it
/// is down, more grants are acknowledged and the flusher keeps failing
/// transiently (no dead letters, flushing not stopped). After a restart on
/// the same port and datastore, flushing until nothing is pending applies
/// everything: every acknowledged tuple is in OpenFGA, none is lost, none is
/// dead-lettered (re-sending writes whose response was lost in the crash is
/// harmless: no duplicate errors), and each op is counted applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openfga_killed_mid_flush_then_restarted_loses_nothing() {
    let mut server = OwnOpenFga::start().await;
    let admin = server.client();
    let store_id = admin.create_store("wb-outage").await.unwrap();
    let model_id = admin
        .write_authorization_model(&store_id, &documents_model())
        .await
        .unwrap();

    let mut cfg = Config::default();
    cfg.openfga.api_url = server.url();
    cfg.openfga.api_token = Secret::new(server.key.clone());
    cfg.openfga.store_id = store_id.clone();
    cfg.openfga.model_id = model_id;
    cfg.openfga.request_timeout = Duration::from_secs(10);
    cfg.openfga.connect_timeout = Duration::from_secs(1);
    cfg.flush.batch_size = 1_000_000;
    cfg.flush.interval = Duration::from_secs(3600);
    cfg.flush.max_parallel_requests = 2;
    cfg.flush.retry_initial_backoff = Duration::from_millis(20);
    cfg.flush.retry_max_backoff = Duration::from_millis(500);
    cfg.flush.shutdown_deadline = Duration::from_secs(30);
    // The requests the kill cuts off may have committed: their ops wait
    // this out in flight before they are written again.
    cfg.flush.unknown_outcome_hold = Duration::from_secs(3);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();

    for i in 0..N {
        let (u, r, o) = tuple(i);
        wb.grant(&u, r, &o).await.unwrap();
    }
    assert_eq!(wb.pending().await.unwrap().total, N);

    let flushing = tokio::spawn({
        let wb = wb.clone();
        async move { wb.flush().await }
    });
    // Kill once a quarter is applied: the flush is then well under way,
    // with requests in flight whose responses the crash will cut off.
    let deadline = Instant::now() + Duration::from_secs(60);
    let applied_at_kill = loop {
        let applied = wb.status().await.unwrap().totals.applied;
        if applied as usize >= N / 4 {
            server.kill().await;
            break applied;
        }
        assert!(Instant::now() < deadline, "nothing applied within 60 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let interrupted = flushing.await.unwrap().unwrap();
    eprintln!("killed OpenFGA with {applied_at_kill} of {N} applied; the flush: {interrupted:?}");
    assert!(
        (applied_at_kill as usize) < N && (interrupted.applied as usize) < N,
        "the scenario: the kill came mid-flush (applied {applied_at_kill} then {})",
        interrupted.applied
    );
    assert!(
        interrupted.error.is_some(),
        "the flush reports the failure: {interrupted:?}"
    );
    let st = wb.status().await.unwrap();
    assert_eq!(
        st.pending.total + st.pending.in_flight + st.totals.applied as usize,
        N,
        "it keeps the ops it could not write (pending, or in flight while a cut-off request may still land): {st:?}"
    );

    // While down: acknowledged as usual, kept pending, nothing dead.
    for i in N..N + DURING {
        let (u, r, o) = tuple(i);
        wb.grant(&u, r, &o).await.unwrap();
    }
    let down = wb.flush().await.unwrap();
    assert!(down.error.is_some(), "{down:?}");
    assert_eq!(down.dead_lettered, 0, "{down:?}");
    let st = wb.status().await.unwrap();
    assert!(st.pending.total + st.pending.in_flight > DURING, "{st:?}");
    assert_eq!(st.totals.dead_lettered, 0, "{st:?}");
    assert_eq!(
        st.flushing_stopped, None,
        "a connection failure is transient, not a stop"
    );

    server.run().await;
    // Every op counted applied before the crash survived it. (Read the count
    // first: the background flusher is already retrying, so OpenFGA can only
    // hold more by the time it is read.)
    let applied = wb.status().await.unwrap().totals.applied as usize;
    let survived = admin
        .read_all(&store_id, &Default::default())
        .await
        .unwrap()
        .len();
    assert!(
        survived >= applied,
        "{applied} ops were counted applied but OpenFGA holds {survived} tuples"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = wb.flush().await.unwrap();
        assert_eq!(r.dead_lettered, 0, "{r:?}");
        let p = wb.pending().await.unwrap();
        if p.total + p.in_flight == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still pending after 120 s: {p:?}"
        );
    }

    let st = wb.status().await.unwrap();
    eprintln!("after the restart: {:?}", st.totals);
    assert_eq!(st.totals.acknowledged as usize, N + DURING, "{st:?}");
    assert_eq!(
        st.totals.applied as usize,
        N + DURING,
        "each op counted applied exactly once: {st:?}"
    );
    assert_eq!(st.totals.dead_lettered, 0, "{st:?}");
    assert_eq!(st.flushing_stopped, None);
    assert!(wb.dead_letters().await.unwrap().is_empty());

    let in_openfga: BTreeSet<String> = support::stored_in(&admin, &store_id)
        .await
        .into_iter()
        .collect();
    let expected: BTreeSet<String> = (0..N + DURING)
        .map(|i| {
            let (u, r, o) = tuple(i);
            format!("{o}#{r}@{u}")
        })
        .collect();
    let missing: Vec<_> = expected.difference(&in_openfga).take(10).collect();
    let extra: Vec<_> = in_openfga.difference(&expected).take(10).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "OpenFGA holds exactly the acknowledged tuples; missing (first 10): {missing:?}, extra: {extra:?}"
    );
    assert_eq!(in_openfga.len(), N + DURING);

    let r = wb.shutdown().await.unwrap();
    assert_eq!((r.left.total, r.left.in_flight), (0, 0), "{r:?}");
}

/// An application's own `health()` while it flushes, its Writes failing
/// (OpenFGA answers 503), does not say that no application runs to flush
/// the Redis store: it is one. Before, the count of live applications left
/// it out, and once its ops were two writer leases old its health said
/// "start one", a probe's cue to restart a healthy process.
#[cfg(feature = "redis")]
#[tokio::test]
async fn an_application_flushing_is_not_missing_from_its_own_health() {
    use support::mock::*;
    let server = mock_openfga().await;
    write_mock()
        .respond_with(support::fixture("unavailable-503").response())
        .mount(&server)
        .await;
    let mut c = mock_config(&server);
    c.buffer.store = fga_wb::config::StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.redis.key_prefix = format!("fga-wb-own-health-{}", std::process::id());
    c.redis.writer_lease = Duration::from_secs(2);
    c.flush.interval = Duration::from_millis(100);
    let wb = WriteBehind::builder(c).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    support::eventually(
        "the op to wait two leases",
        Duration::from_secs(30),
        || async {
            let p = wb.pending().await.unwrap();
            p.oldest_age.is_some_and(|a| a > Duration::from_secs(5))
        },
    )
    .await;
    let h = wb.health().await.unwrap();
    assert!(
        !h.problems
            .iter()
            .any(|p| p.contains("no application process runs")),
        "{:?}",
        h.problems
    );
    wb.clear().await.unwrap();
    wb.shutdown().await.unwrap();
}
