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

use fga_wb::config::{Mode, StoreKind};
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

/// Real server (PostgreSQL, caches on), behind a proxy that delivers one
/// request late: a grant's Write is kept from OpenFGA for 3 s, fga-wb gives
/// up on it after 1 s, so its outcome is unknown, and the tuple is revoked
/// meanwhile. The held grant reaches OpenFGA and commits after fga-wb
/// gave up on it; the revoke goes out only once that can no longer happen
/// (`flush.unknown_outcome_hold`), so OpenFGA ends without the tuple and
/// the check says no. Before the hold, the revoke was written at once,
/// deleted nothing, and the late grant left the tuple in OpenFGA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_landing_late_never_outlives_a_newer_revoke() {
    late_grant_then_revoke("late-write", StoreKind::Memory, Mode::Inline).await;
}

/// The same on the Redis store: the held ops stay this writer's, so no
/// other writer writes the revoke either.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_landing_late_never_outlives_a_newer_revoke_on_redis() {
    late_grant_then_revoke("late-write-redis", StoreKind::Redis, Mode::Inline).await;
}

/// The same in queue mode: the worker keeps the job running through the
/// hold, so the revoke stays blocked behind it.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_landing_late_never_outlives_a_newer_revoke_in_queue_mode() {
    late_grant_then_revoke("late-write-queue", StoreKind::Redis, Mode::Queue).await;
}

/// The scenario above, on a store of its own named `name` (OpenFGA on
/// PostgreSQL with caches on), through a handle with `store` and `mode`.
async fn late_grant_then_revoke(name: &str, store: StoreKind, mode: Mode) {
    let (s, mut c, proxy) = late_setup(name, store, mode).await;
    c.openfga.api_url = proxy.url();
    c.openfga.request_timeout = Duration::from_secs(1);
    c.flush.unknown_outcome_hold = Duration::from_secs(6);
    #[cfg(feature = "redis")]
    let worker = (c.flush.mode == Mode::Queue).then(|| support::Worker::start(c.clone(), 2));
    let wb = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let flushing = grant_held_then_revoke(&wb, &proxy, Duration::from_secs(3)).await;
    flushing.await.unwrap().unwrap();
    // Queue mode: the flushes only enqueue; the worker writes.
    ends_revoked(&wb, &s, &proxy).await;
    wb.shutdown().await.unwrap();
    #[cfg(feature = "redis")]
    if let Some(w) = worker {
        w.stop().await;
    }
}

/// Real server (PostgreSQL, caches on), Redis store: as above, but the late
/// grant's writer stops within the hold (its shutdown deadline cuts the
/// hold short), and another process writes the revoke. The stopped
/// writer's lease is kept in Redis until the hold's end, longer than the
/// lease itself (3 s) and than the grant's delay (8 s), so the keys go to
/// the other process only then, and the revoke reaches OpenFGA after the
/// late grant. Before, the stop handed the keys on at once (and without
/// the kept lease they would go when its 3 s lease ended): the other
/// process wrote the revoke first, and the late grant left the tuple in
/// OpenFGA.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_landing_late_outlives_no_revoke_after_its_writer_stops() {
    late_grant_then_stop("late-stop", Mode::Inline, Stop::InHold).await;
}

/// The same in queue mode: the worker running the grant's job stops within
/// the hold, and another worker takes the jobs over.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_landing_late_outlives_no_revoke_after_its_worker_stops() {
    late_grant_then_stop("late-stop-queue", Mode::Queue, Stop::InHold).await;
}

/// The same, with the stop's deadline (1 s) passing while the grant's
/// Write is still under way (a 6 s lease leaves it 3–5 s): a Write cut
/// off is one whose outcome is unknown, so the stop keeps its lease as a
/// hold does (15 s; the grant lands at 12 s). Before, the lease ended by
/// itself 6 s after its last renewal, and the other process wrote the
/// revoke first.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_off_by_its_writers_stop_outlives_no_revoke() {
    late_grant_then_stop("late-cut", Mode::Inline, Stop::MidRequest).await;
}

/// The same in queue mode: the worker's grace (1 s) passes with the job's
/// Write under way.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_off_by_its_workers_stop_outlives_no_revoke() {
    late_grant_then_stop("late-cut-queue", Mode::Queue, Stop::MidRequest).await;
}

/// The same, with the worker embedded in an application that drops its
/// run future (a `select!` that took another branch) while the job's
/// Write is under way: what the worker spawned ends with it, its lease
/// with them, and another worker takes the job over once the Write can no
/// longer land. Before, the worker's replay task outlived the future and
/// kept the worker's lease renewed for good: the job stayed running under
/// a worker that no longer ran, and neither the grant nor the revoke
/// after it was written again.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_a_dropped_embedded_worker_outlives_no_revoke() {
    late_grant_then_stop("late-dropped-queue", Mode::Queue, Stop::Dropped).await;
}

/// When the first writer of `late_grant_then_stop` stops.
#[cfg(feature = "redis")]
#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// Within the hold that follows its Write's timeout.
    InHold,
    /// With its Write still under way.
    MidRequest,
    /// Its future dropped (a worker) with its Write under way.
    Dropped,
}

/// The scenario of the two tests above: the first writer (a process
/// inline, a worker in queue mode) writes through the delaying proxy and
/// stops within its hold; the second writes directly.
#[cfg(feature = "redis")]
async fn late_grant_then_stop(name: &str, mode: Mode, stop: Stop) {
    // Lease, the grant's delay, the hold, the stop's deadline, the
    // request timeout: the grant lands after the lease would have ended
    // and before the hold does.
    let (lease, delay, hold, deadline, timeout) = match stop {
        // The deadline is past the 5 s between looks for strays: the look
        // at the deadline must not give the held keys back either.
        Stop::InHold => (3, 8, 12, 6, 1),
        Stop::MidRequest | Stop::Dropped => (6, 12, 15, 1, 20),
    };
    let (s, mut direct, proxy) = late_setup(name, StoreKind::Redis, mode).await;
    direct.redis.writer_lease = Duration::from_secs(lease);
    direct.flush.shutdown_deadline = Duration::from_secs(deadline);
    direct.flush.unknown_outcome_hold = Duration::from_secs(hold);
    let mut delayed = direct.clone();
    delayed.openfga.api_url = proxy.url();
    delayed.openfga.request_timeout = Duration::from_secs(timeout);
    let first_worker = (mode == Mode::Queue).then(|| support::Worker::start(delayed.clone(), 2));
    let first = WriteBehind::builder(delayed)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let flushing = grant_held_then_revoke(&first, &proxy, Duration::from_secs(delay)).await;
    // The writer of the grant stops while its Write is held by the proxy.
    match first_worker {
        // Aborts the worker's task: its future is dropped.
        Some(w) if stop == Stop::Dropped => {
            drop(w);
            first.close().await.unwrap();
        }
        Some(w) => {
            w.stop().await;
            first.close().await.unwrap();
        }
        None => {
            first.shutdown().await.unwrap();
        }
    }
    let _ = flushing.await;
    let second_worker = (mode == Mode::Queue).then(|| support::Worker::start(direct.clone(), 2));
    let second = WriteBehind::builder(direct)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    ends_revoked(&second, &s, &proxy).await;
    second.shutdown().await.unwrap();
    if let Some(w) = second_worker {
        w.stop().await;
    }
}

/// For a late-write test: a store of its own named `name` (OpenFGA on
/// PostgreSQL with caches on), a config for it with `store` and `mode`
/// (straight to OpenFGA), and a holding proxy in front of that server.
async fn late_setup(
    name: &str,
    store: StoreKind,
    mode: Mode,
) -> (support::TestStore, fga_wb::Config, testenv::HoldProxy) {
    let s =
        support::new_store_on(support::Server::Caching, name, &support::documents_model()).await;
    let mut c = support::config_for(&s);
    c.buffer.store = store;
    if store == StoreKind::Redis {
        c.redis.url = support::redis_url();
    }
    c.flush.mode = mode;
    if mode == Mode::Queue {
        c.queue.poll_interval = Duration::from_millis(50);
    }
    let upstream = c.openfga.api_url.trim_start_matches("http://").to_owned();
    let proxy = testenv::HoldProxy::start(&upstream).await.unwrap();
    (s, c, proxy)
}

/// The tuple the late-write tests grant and revoke.
const LATE: (&str, &str, &str) = ("user:late", "viewer", "document:late");

/// Grants `LATE` through `wb`, has `proxy` keep its Write from OpenFGA for
/// `delay`, and revokes it once the Write is held. Returns the flush that
/// sent the grant.
async fn grant_held_then_revoke(
    wb: &WriteBehind,
    proxy: &testenv::HoldProxy,
    delay: Duration,
) -> tokio::task::JoinHandle<fga_wb::Result<fga_wb::FlushReport>> {
    grant_held(wb, proxy, delay).await;
    let flushing = {
        let wb = wb.clone();
        tokio::spawn(async move { wb.flush().await })
    };
    revoke_once_held(wb, proxy).await;
    flushing
}

/// Grants `LATE` through `wb`, and has `proxy` keep its Write from OpenFGA
/// for `delay`.
async fn grant_held(wb: &WriteBehind, proxy: &testenv::HoldProxy, delay: Duration) {
    let (user, relation, object) = LATE;
    proxy.hold_next(&[b"/write", user.as_bytes()], delay);
    wb.grant(user, relation, object).await.unwrap();
}

/// Revokes `LATE` through `wb` once `proxy` holds the grant's Write.
async fn revoke_once_held(wb: &WriteBehind, proxy: &testenv::HoldProxy) {
    let (user, relation, object) = LATE;
    assert_eq!(
        proxy.wait_held(1, Duration::from_secs(30)).await,
        1,
        "the grant's Write never reached the proxy"
    );
    wb.revoke(user, relation, object).await.unwrap();
}

/// Flushes `wb` until nothing is pending or in flight, then as
/// `late_grant_revoked`.
async fn ends_revoked(wb: &WriteBehind, s: &support::TestStore, proxy: &testenv::HoldProxy) {
    support::eventually(
        "nothing pending or in flight",
        Duration::from_secs(60),
        || async {
            let _ = wb.flush().await;
            let p = wb.pending().await.unwrap();
            (p.total, p.in_flight) == (0, 0)
        },
    )
    .await;
    late_grant_revoked(wb, s, proxy).await;
}

/// Waits for the held grant to reach OpenFGA, and asserts that OpenFGA
/// (bypassing its caches) and `wb` both answer `LATE` as revoked.
async fn late_grant_revoked(wb: &WriteBehind, s: &support::TestStore, proxy: &testenv::HoldProxy) {
    assert_eq!(
        proxy.wait_landed(1, Duration::from_secs(30)).await,
        1,
        "the held grant never reached OpenFGA"
    );
    let (user, relation, object) = LATE;
    let check = format!("{object}#{relation}@{user}");
    assert!(
        !support::ground_truth(s, &check).await,
        "OpenFGA holds the revoked tuple: the late grant landed after the revoke; it holds {:?}",
        support::stored(s).await
    );
    assert!(!wb.check(user, relation, object).await.unwrap());
}

/// Real server (PostgreSQL, caches on), queue mode, through the operator's
/// commands: an `fga-wb worker` process writes the grant through the
/// delaying proxy, its Write times out (unknown outcome), a retry writes
/// the grant, and the worker is SIGKILLed within the hold. The revoke,
/// acknowledged meanwhile, is written by a second `fga-wb worker` once
/// `fga-wb flush --wait` has waited for it: only after the hold's end
/// (12 s), since the killed worker's lease was kept in Redis that long
/// (and a hold more, since it died holding the job), so after the late
/// grant (8 s) and not at the end of the worker's own 3 s lease. Before, the second worker wrote the revoke about 3 s after the
/// kill, and the late grant left the tuple in OpenFGA.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_within_a_hold_leaves_its_keys_until_the_hold_ends() {
    killed_while_writing("late-kill", Mode::Queue, Kill::InHold).await;
}

/// The same with the worker SIGKILLed while its Write is still under way
/// (held by the proxy, before any timeout): nothing in the worker knew the
/// outcome was unknown. Redis keeps what a writer holds for its hold
/// (12 s) past the end of its lease (3 s) when the lease ends while it
/// was writing, so the revoke is written after the late grant (8 s).
/// Before, the second worker wrote it when the lease ended.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_its_write_under_way_leaves_its_keys_until_it_can_no_longer_land() {
    killed_while_writing("late-kill-mid", Mode::Queue, Kill::MidRequest).await;
}

/// The same inline: an `fga-wb flush` process writes the grant and is
/// SIGKILLed with its Write under way; an application process writes the
/// revoke, and `fga-wb flush --wait` waits for it.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_killed_with_its_write_under_way_leaves_its_keys_until_it_can_no_longer_land() {
    killed_while_writing("late-kill-inline", Mode::Inline, Kill::MidRequest).await;
}

/// When `killed_while_writing` kills the writer of the grant.
#[cfg(feature = "redis")]
#[derive(Clone, Copy, PartialEq)]
enum Kill {
    /// Within the hold that follows its Write's timeout (1 s).
    InHold,
    /// With its Write still under way.
    MidRequest,
}

/// The scenario of the three tests above: the grant is written by an
/// `fga-wb` process (a worker in queue mode, `fga-wb flush` inline) through
/// the delaying proxy (8 s), which is SIGKILLed; the revoke, acknowledged
/// meanwhile, is written straight to OpenFGA by a second worker (queue) or
/// application process (inline), and `fga-wb flush --wait` waits for it.
#[cfg(feature = "redis")]
async fn killed_while_writing(name: &str, mode: Mode, kill: Kill) {
    use support::cli::{Cli, Where};
    let server = support::Server::Caching;
    let (s, c, proxy) = late_setup(name, StoreKind::Redis, mode).await;
    let mode_name = match mode {
        Mode::Queue => "queue",
        _ => "inline",
    };
    let timeout = match kill {
        Kill::InHold => "1s",
        // Longer than the lease: the Write's own budget (what is left of
        // the lease) bounds it, and it is killed before either.
        Kill::MidRequest => "20s",
    };
    let cli = |api_url: String| {
        let mut cli = Cli::at(
            Where {
                api_url,
                token: server.token(),
                store_id: s.store_id.clone(),
                model_id: s.model_id.clone(),
                redis_url: support::redis_url(),
            },
            mode_name,
        );
        cli.set("FGA_WB_REDIS__WRITER_LEASE", "3s");
        cli.set("FGA_WB_OPENFGA__REQUEST_TIMEOUT", timeout);
        cli.set("FGA_WB_FLUSH__UNKNOWN_OUTCOME_HOLD", "12s");
        cli.set("FGA_WB_QUEUE__POLL_INTERVAL", "50ms");
        cli
    };
    let (delayed, direct) = (cli(proxy.url()), cli(server.url()));
    let spawn = |cli: &Cli, args: &[&str]| {
        cli.command(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn fga-wb {args:?}: {e}"))
    };
    let worker = ["worker", "--concurrency", "2"];
    let wb = WriteBehind::builder(c.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let (user, relation, object) = LATE;
    let (mut first, flushing) = match mode {
        Mode::Queue => {
            let first = spawn(&delayed, &worker);
            let flushing = grant_held_then_revoke(&wb, &proxy, Duration::from_secs(8)).await;
            (first, Some(flushing))
        }
        _ => {
            grant_held(&wb, &proxy, Duration::from_secs(8)).await;
            let first = spawn(&delayed, &["flush"]);
            revoke_once_held(&wb, &proxy).await;
            (first, None)
        }
    };
    if kill == Kill::InHold {
        // The retry after the timeout wrote the grant: the hold has begun.
        let check = format!("{object}#{relation}@{user}");
        support::eventually(
            "the retry to write the grant",
            Duration::from_secs(30),
            || support::ground_truth(&s, &check),
        )
        .await;
    }
    first.start_kill().expect("SIGKILL the grant's writer");
    first.wait().await.expect("the grant's writer ends");
    if kill == Kill::MidRequest {
        // Once its lease has ended, `status` says what is held and why.
        support::eventually(
            "status to show the killed writer held over",
            Duration::from_secs(30),
            || async {
                let j = direct.run(&["status", "--json"]).await.ok().json();
                j["held_over"]["writers"] == 1
            },
        )
        .await;
        let r = direct.run(&["status"]).await;
        assert!(
            r.ok().stdout.contains("1 writer(s) stopped while writing"),
            "{}",
            r.stdout
        );
    }
    let (mut second, app) = match mode {
        Mode::Queue => (Some(spawn(&direct, &worker)), None),
        _ => (None, Some(WriteBehind::builder(c).build().await.unwrap())),
    };
    direct
        .run(&["flush", "--wait", "--timeout", "50s"])
        .await
        .ok();
    late_grant_revoked(&wb, &s, &proxy).await;
    if let Some(mut second) = second.take() {
        second.start_kill().expect("SIGKILL the second worker");
        let _ = second.wait().await;
    }
    if let Some(app) = app {
        app.shutdown().await.unwrap();
    }
    if let Some(flushing) = flushing {
        let _ = flushing.await;
    }
    wb.shutdown().await.unwrap();
}
