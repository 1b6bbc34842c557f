//! Queue mode with OpenFGA down: jobs that fail because OpenFGA is
//! unreachable are rescheduled on the retry schedule, and once it is back
//! everything is applied. This test runs its own OpenFGA (the `openfga`
//! binary `scripts/test` found) on a SQLite file, so that it can stop and
//! restart it without touching the shared test server.
#![cfg(feature = "redis")]

mod support;

use support::Worker;

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::openfga::Secret;
use fga_wb::{Config, WriteBehind};
use support::documents_model;
use support::own_openfga::OwnOpenFga;

/// Waits for a condition no API call can await, polling; after `limit`,
/// fails the test with `what` and the handle's status.
async fn eventually<F, Fut>(wb: &WriteBehind, what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        if Instant::now() >= deadline {
            let status = wb.status().await;
            panic!("timed out after {limit:?} waiting for {what}\nstatus: {status:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const N: usize = 500;
/// How long OpenFGA stays down: past the first three retry steps.
const DOWN: Duration = Duration::from_secs(6);

fn tuple(i: usize) -> (String, &'static str, String) {
    (
        format!("user:u{i}"),
        "viewer",
        format!("document:d{}", i % 37),
    )
}

/// Fails unless OpenFGA holds exactly the tuples `range` of [`tuple`].
async fn assert_openfga_holds(
    admin: &fga_wb::openfga::Client,
    store_id: &str,
    range: std::ops::Range<usize>,
    what: &str,
) {
    let in_openfga: BTreeSet<String> = admin
        .read_all(store_id, &Default::default())
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    let expected: BTreeSet<String> = range
        .map(|i| {
            let (u, r, o) = tuple(i);
            format!("{o}#{r}@{u}")
        })
        .collect();
    assert_eq!(in_openfga, expected, "OpenFGA should hold {what}");
}

/// Queue mode against `server`, flushed only by `flush()`.
fn queue_config(server: &OwnOpenFga, store_id: &str, model_id: String) -> Config {
    let mut c = Config::default();
    c.openfga.api_url = server.url();
    c.openfga.api_token = Secret::new(server.key.clone());
    c.openfga.store_id = store_id.to_owned();
    c.openfga.model_id = model_id;
    c.openfga.request_timeout = Duration::from_secs(2);
    c.openfga.connect_timeout = Duration::from_millis(500);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.flush.mode = Mode::Queue;
    c.flush.batch_size = 1_000_000;
    c.flush.interval = Duration::from_secs(3600);
    c.queue.heartbeat = Duration::from_secs(1);
    c.queue.poll_interval = Duration::from_millis(50);
    c
}

/// A store with the documents model on `server`, and the queue-mode config
/// for it (`tune` adjusts it) with a handle that flushes when told.
async fn queue_store(
    server: &OwnOpenFga,
    name: &str,
    tune: impl FnOnce(&mut Config),
) -> (String, Config, WriteBehind) {
    let admin = server.client();
    let store_id = admin.create_store(name).await.unwrap();
    let model_id = admin
        .write_authorization_model(&store_id, &documents_model())
        .await
        .unwrap();
    let mut c = queue_config(server, &store_id, model_id);
    tune(&mut c);
    let wb = WriteBehind::builder(c.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    (store_id, c, wb)
}

/// The operator's `fga-wb` on that store, in queue mode.
fn operator(server: &OwnOpenFga, store_id: &str, wb: &WriteBehind) -> support::cli::Cli {
    support::cli::Cli::at(
        support::cli::Where {
            api_url: server.url(),
            token: server.key.clone(),
            store_id: store_id.to_owned(),
            model_id: wb.model_id().unwrap_or_default(),
            redis_url: support::redis_url(),
        },
        "queue",
    )
}

/// OpenFGA down in queue mode (own OpenFGA on SQLite, retry schedule 1 s,
/// 2 s, 4 s, 8 s, 8 s): with OpenFGA killed, 500 grants are acknowledged and
/// flushed into 5 jobs; the worker's attempts fail and the jobs are
/// rescheduled, nothing dead-lettered. OpenFGA stays down ~6 s, then
/// restarts on the same port and datastore; the retries then apply
/// everything: OpenFGA holds exactly the 500 tuples, each op counted
/// applied once, no dead letters, nothing pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openfga_down_in_queue_mode_loses_nothing() {
    let mut server = OwnOpenFga::start().await;
    let admin = server.client();
    let (store_id, c, wb) = queue_store(&server, "wb-queue-outage", |c| {
        c.queue.retry_schedule = [1, 2, 4, 8, 8].map(Duration::from_secs).to_vec();
    })
    .await;
    let worker = Worker::start(c, 4);

    server.kill().await;
    let down_at = Instant::now();
    for i in 0..N {
        let (u, r, o) = tuple(i);
        wb.grant(&u, r, &o).await.unwrap();
    }
    let report = wb.flush().await.unwrap();
    assert_eq!(report.queued as usize, N, "{report:?}");

    eventually(
        &wb,
        "the worker's attempts to fail and be rescheduled",
        Duration::from_secs(DOWN.as_secs()),
        || async {
            let st = wb.status().await.unwrap();
            // No request leaves the process (nothing listens): an error,
            // nothing applied, and the jobs wait for their next try.
            st.last_flush.is_some_and(|l| {
                l.report.error.is_some() && l.report.requests == 0 && l.report.applied == 0
            }) && st.queue.is_some_and(|q| q.scheduled > 0)
        },
    )
    .await;
    // Stay down for the scenario's length, watching that nothing is lost
    // or dead-lettered meanwhile.
    while down_at.elapsed() < DOWN {
        let st = wb.status().await.unwrap();
        assert_eq!(st.totals.dead_lettered, 0, "{st:?}");
        assert_eq!(st.totals.applied, 0, "{st:?}");
        assert_eq!(st.pending.in_flight, N, "the jobs own the ops: {st:?}");
        assert_eq!(st.flushing_stopped, None, "an outage is transient: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let q = wb.status().await.unwrap().queue.unwrap();
    assert!(
        q.scheduled + q.pending + q.running > 0,
        "the jobs wait for their retries: {q:?}"
    );

    server.run().await;
    eprintln!("OpenFGA back after {:?}", down_at.elapsed());
    eventually(
        &wb,
        "every op to be applied",
        Duration::from_secs(30),
        || async {
            let st = wb.status().await.unwrap();
            let q = st.queue.unwrap();
            st.pending.total + st.pending.in_flight == 0 && q.pending + q.running + q.scheduled == 0
        },
    )
    .await;
    eprintln!("all applied {:?} after the outage began", down_at.elapsed());
    worker.stop().await;

    let st = wb.status().await.unwrap();
    assert_eq!(
        (
            st.totals.acknowledged as usize,
            st.totals.applied as usize,
            st.totals.dead_lettered
        ),
        (N, N, 0),
        "{st:?}"
    );
    assert!(wb.dead_letters().await.unwrap().is_empty());
    assert_openfga_holds(&admin, &store_id, 0..N, "every acknowledged tuple").await;
}

/// OpenFGA down for longer than the whole retry schedule (100 ms, 100 ms):
/// every op dies as a transient dead letter, and a revoke of one granted
/// tuple (dead too) supersedes its grant. `fga-wb flush --wait` does not
/// call that written: it waits for them, and gives up at its timeout
/// saying why. Nobody runs `dlq replay`: once OpenFGA is back, the worker
/// replays the transient letters by itself (`queue.replay_transient`,
/// 200 ms here) and queues them, dropping the superseded grant, and
/// `fga-wb flush --wait` ends once they are written: OpenFGA holds every
/// grant but the revoked one, nothing is pending or queued, no dead
/// letters, and the totals add up. Before, `flush --wait` exited 0 at once
/// with the letters not written, saying OpenFGA had refused them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_longer_than_the_retries_needs_no_person() {
    const M: usize = 40;
    let mut server = OwnOpenFga::start().await;
    let admin = server.client();
    let (store_id, c, wb) = queue_store(&server, "wb-queue-replay", |c| {
        c.queue.retry_schedule = vec![Duration::from_millis(100); 2];
        c.queue.request_retries = 0;
        c.queue.replay_transient = Duration::from_millis(200);
    })
    .await;
    let worker = Worker::start(c, 4);

    server.kill().await;
    for i in 0..M {
        let (u, r, o) = tuple(i);
        wb.grant(&u, r, &o).await.unwrap();
    }
    wb.flush().await.unwrap();
    let dead = |n: usize| {
        let wb = wb.clone();
        async move { wb.dead_letters().await.unwrap().len() == n }
    };
    eventually(&wb, "every grant to die", Duration::from_secs(30), || {
        dead(M)
    })
    .await;
    let (u, r, o) = tuple(0);
    wb.revoke(&u, r, &o).await.unwrap();
    wb.flush().await.unwrap();
    eventually(&wb, "the revoke to die", Duration::from_secs(30), || {
        dead(M + 1)
    })
    .await;
    let letters = wb.dead_letters().await.unwrap();
    assert!(letters.iter().all(|d| d.transient), "{letters:?}");
    let superseded: Vec<_> = letters.iter().filter(|d| d.superseded).collect();
    assert_eq!(superseded.len(), 1, "{letters:?}");
    assert_eq!(
        (superseded[0].tuple.user.as_str(), superseded[0].op),
        (u.as_str(), fga_wb::Op::Grant)
    );

    let mut cli = operator(&server, &store_id, &wb);
    cli.set("FGA_WB_QUEUE__REPLAY_TRANSIENT", "200ms");
    let r = cli.run(&["flush", "--wait", "--timeout", "2s"]).await;
    r.fails(
        1,
        &format!("{M} ops that died of transient failures wait in the dead-letter set"),
    );

    server.run().await;
    cli.run(&["flush", "--wait", "--timeout", "30s"]).await.ok();
    let st = wb.status().await.unwrap();
    let q = st.queue.unwrap();
    assert_eq!(st.dead_letters, 0);
    assert_eq!(st.pending.total + st.pending.in_flight, 0);
    assert_eq!(q.pending + q.running + q.scheduled, 0);
    worker.stop().await;

    assert_openfga_holds(&admin, &store_id, 1..M, "every grant but the revoked one").await;
    let t = wb.status().await.unwrap().totals;
    // M grants and a revoke, then M replays (M - 1 grants and the revoke).
    assert_eq!(
        (t.acknowledged, t.applied, t.dead_lettered),
        (2 * M as u64 + 1, M as u64, M as u64 + 1),
        "{t:?}"
    );
    assert_eq!(
        t.acknowledged,
        t.applied + t.coalesced + t.dead_lettered + t.cleared
    );
}

/// Workers that do not replay ops given up in an outage
/// (`queue.replay_transient = "0s"`) are judged by their setting, not by
/// the operator's: `fga-wb status --check`, with the default setting,
/// reports the letters nothing replays, and `fga-wb flush --wait` fails
/// saying so instead of waiting for replays. Before, both took the workers for replaying
/// them (their own setting said they would): `status --check` exited 0,
/// while the checks those ops could change failed closed for good, and
/// `flush --wait` waited for replays to its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_judges_replays_by_the_workers_setting() {
    let mut server = OwnOpenFga::start().await;
    let (store_id, c, wb) = queue_store(&server, "wb-queue-no-replay", |c| {
        c.queue.retry_schedule = vec![Duration::from_millis(100); 2];
        c.queue.request_retries = 0;
        c.queue.replay_transient = Duration::ZERO;
    })
    .await;
    let worker = Worker::start(c, 2);

    server.kill().await;
    let (u, r, o) = tuple(0);
    wb.grant(&u, r, &o).await.unwrap();
    wb.flush().await.unwrap();
    eventually(&wb, "the grant to die", Duration::from_secs(30), || {
        let wb = wb.clone();
        async move { wb.dead_letters().await.unwrap().len() == 1 }
    })
    .await;
    server.run().await;

    let cli = operator(&server, &store_id, &wb);
    let r = cli.run(&["status", "--check"]).await;
    r.fails(
        1,
        "1 ops given up in an outage are not written and nothing replays them",
    );
    let r = cli.run(&["flush", "--wait", "--timeout", "60s"]).await;
    r.fails(1, "no worker replays them");
    worker.stop().await;
}
