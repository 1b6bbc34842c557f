//! Queue mode: a flush pushes apalis jobs to Redis and workers
//! apply them, retry them on the configured schedule, skip ops a newer op
//! superseded, dead-letter what never succeeds, and re-run the jobs of a
//! worker that died.
//!
//! Every test runs against the real Redis that `scripts/test` starts. The
//! OpenFGA side is the real server where it can show the outcome, and a
//! wiremock server where the scenario needs failures on demand (503s, a held
//! response); the mock records when each Write request arrived and what it
//! carried, so the tests can check retry spacings and request order.
//! Each OpenFGA store id has its own Redis keys and apalis queue, so every
//! test uses a store id of its own. The outage test (own OpenFGA, killed and
//! restarted) is in `tests/queue_outage.rs`.
#![cfg(feature = "redis")]

mod support;

use support::assert_accounted;
use support::{touched, Worker};

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::openfga::{Secret, WriteRequest};
use fga_wb::{Config, Op, TupleKey, WriteBehind};
use serde_json::Value;
use support::{config_for, fixture, new_store, stored};
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A random number, without a dependency on `rand`.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// A store id no other test (or earlier run) uses, shaped like OpenFGA's
/// ULIDs: it names this test's Redis keys and apalis queue.
fn unique_store_id() -> String {
    const CROCKFORD: &[u8] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let (mut a, mut b) = (random(), random());
    let mut id = String::from("01JQ");
    for i in 0..22 {
        let r = if i < 11 { &mut a } else { &mut b };
        id.push(CROCKFORD[(*r % 32) as usize] as char);
        *r /= 32;
    }
    id
}

/// Queue mode on the real Redis, with test-friendly timings: nothing is
/// flushed unless the test asks, workers heartbeat every second and poll
/// often, and a write that hangs gives up after `request_timeout`.
fn queue_mode(mut c: Config, schedule: &[u64]) -> Config {
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.flush.mode = Mode::Queue;
    c.flush.batch_size = 1_000_000;
    c.flush.interval = Duration::from_secs(3600);
    c.queue.retry_schedule = schedule.iter().map(|&s| Duration::from_secs(s)).collect();
    c.queue.heartbeat = Duration::from_secs(1);
    c.queue.poll_interval = Duration::from_millis(50);
    // One request per attempt, so a test counts attempts exactly.
    c.queue.request_retries = 0;
    c.openfga.request_timeout = Duration::from_secs(2);
    c.openfga.connect_timeout = Duration::from_millis(500);
    c
}

/// A config for a wiremock OpenFGA and a fresh store id, in queue mode.
fn mock_config(server: &MockServer, store_id: &str, schedule: &[u64]) -> Config {
    let mut c = Config::default();
    c.openfga.api_url = server.uri();
    c.openfga.api_token = Secret::new("mock-token");
    c.openfga.store_id = store_id.to_owned();
    queue_mode(c, schedule)
}

/// An application handle that only flushes when the test calls `flush()`
/// and does not read the model (a wiremock OpenFGA has none).
async fn app(config: Config) -> WriteBehind {
    WriteBehind::builder(config)
        .automatic_flush(false)
        .read_model(false)
        .build()
        .await
        .expect("build the application handle")
}

/// What a test watches while it waits: the application handle, and the
/// mock's Write log if there is one.
struct Watch<'a> {
    wb: &'a WriteBehind,
    writes: Option<&'a WriteLog>,
}

impl Watch<'_> {
    /// Waits for a condition no API call can await (another task's or
    /// process's progress), polling; after `limit`, fails the test with
    /// `what` and the state it saw.
    async fn until<F, Fut>(&self, what: &str, limit: Duration, mut cond: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        while !cond().await {
            if Instant::now() >= deadline {
                let status = self.wb.status().await;
                let writes = self.writes.map(WriteLog::requests);
                panic!(
                    "timed out after {limit:?} waiting for {what}\nstatus: {status:#?}\n\
                     write requests: {writes:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// True once nothing is pending or in flight and the queue holds no job
/// (due, running or scheduled): every op has reached its end.
async fn settled(wb: &WriteBehind) -> bool {
    let s = wb.status().await.expect("status");
    let q = s.queue.expect("queue mode reports the queue");
    s.pending.total + s.pending.in_flight == 0 && q.pending + q.running + q.scheduled == 0
}

/// One Write request as the mock saw it.
#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    /// (`object#relation@user`, op) for each tuple it carried.
    tuples: Vec<(String, Op)>,
}

/// A scripted OpenFGA Write endpoint: answers the n-th request (from 0)
/// with `script(n)`, and records when each arrived and what it carried.
#[derive(Clone)]
struct WriteLog {
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<dyn Fn(usize) -> ResponseTemplate + Send + Sync>,
}

impl WriteLog {
    async fn mount(
        server: &MockServer,
        store_id: &str,
        script: impl Fn(usize) -> ResponseTemplate + Send + Sync + 'static,
    ) -> WriteLog {
        let log = WriteLog {
            seen: Arc::default(),
            script: Arc::new(script),
        };
        Mock::given(method("POST"))
            .and(path(format!("/stores/{store_id}/write")))
            .respond_with(log.clone())
            .mount(server)
            .await;
        log
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Respond for WriteLog {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let mut seen = self.seen.lock().unwrap();
        let n = seen.len();
        seen.push(Seen {
            at: Instant::now(),
            tuples: touched(&body),
        });
        (self.script)(n)
    }
}

fn grant(key: &str) -> (String, Op) {
    (key.to_owned(), Op::Grant)
}

fn revoke(key: &str) -> (String, Op) {
    (key.to_owned(), Op::Revoke)
}

// ---------------------------------------------------------------------------
// End to end
// ---------------------------------------------------------------------------

/// End to end on the real OpenFGA: 250 grants and a few revokes (3 of them
/// cancelling pending grants, 5 removing tuples already in OpenFGA) go
/// through the handle; `flush()` only enqueues (`queued` counts every
/// pending op, nothing is written by the application) and leaves the ops in
/// flight; a worker, visible in `status().queue`, applies the jobs; then
/// OpenFGA holds exactly the last op per tuple, nothing is pending or
/// dead-lettered, and the store-wide totals (the worker's requests
/// included) add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_ops_are_applied_by_a_worker() {
    let s = new_store("queue-e2e").await;
    // Five tuples already in OpenFGA, to be revoked through the handle.
    let old: Vec<TupleKey> = (0..5)
        .map(|i| TupleKey::new(format!("user:old{i}"), "viewer", "document:e2e").unwrap())
        .collect();
    s.client
        .write(&s.store_id, &WriteRequest::idempotent(old.clone(), vec![]))
        .await
        .unwrap();

    let config = queue_mode(config_for(&s), &[1, 2, 3]);
    let wb = WriteBehind::builder(config.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let worker = Worker::start(config, 2);
    let w = Watch {
        wb: &wb,
        writes: None,
    };
    w.until(
        "the worker to show in status().queue",
        Duration::from_secs(10),
        || async { wb.status().await.unwrap().queue.unwrap().workers.len() == 1 },
    )
    .await;

    support::grant_spread(&wb, 0..250, 7).await;
    for i in [3, 50, 249] {
        wb.revoke(
            &format!("user:u{i}"),
            "viewer",
            &format!("document:d{}", i % 7),
        )
        .await
        .unwrap();
    }
    for t in &old {
        wb.revoke(&t.user, &t.relation, &t.object).await.unwrap();
    }
    let p = wb.pending().await.unwrap();
    assert_eq!((p.writes, p.deletes, p.total), (247, 8, 255), "{p:?}");

    let report = wb.flush().await.unwrap();
    assert_eq!(
        report.queued, 255,
        "one queued op per pending key: {report:?}"
    );
    assert_eq!(
        (report.requests, report.applied, report.error.as_deref()),
        (0, 0, None),
        "in queue mode the application writes nothing itself: {report:?}"
    );

    w.until(
        "the worker to apply every job",
        Duration::from_secs(20),
        || settled(&wb),
    )
    .await;
    let st = wb.status().await.unwrap();
    assert_eq!(st.queue.as_ref().unwrap().workers.len(), 1, "{st:?}");
    worker.stop().await;

    let mut expected: Vec<String> = (0..250)
        .filter(|i| ![3, 50, 249].contains(i))
        .map(|i| format!("document:d{}#viewer@user:u{i}", i % 7))
        .collect();
    expected.sort();
    assert_eq!(stored(&s).await, expected);

    let st = wb.status().await.unwrap();
    assert_eq!((st.pending.total, st.pending.in_flight), (0, 0), "{st:?}");
    assert_eq!(st.dead_letters, 0, "{st:?}");
    assert!(wb.dead_letters().await.unwrap().is_empty());
    let t = &st.totals;
    assert_eq!(
        (t.acknowledged, t.applied, t.coalesced, t.dead_lettered),
        (258, 255, 3, 0),
        "{t:?}"
    );
    // Store-wide too: the worker's Write requests (at most 100 tuples
    // each), though this process sent none.
    assert!((3..=255).contains(&t.requests), "{t:?}");
    assert_accounted(&wb).await;
}

/// On a Redis Cluster every key a worker touches sits in its
/// store's slot, so workers start and apply jobs for stores on every
/// primary (on a single node the same test runs, trivially spread).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_for_20_stores_spread_over_every_primary_apply_their_jobs() {
    let mut stores = Vec::new();
    let mut owners = std::collections::BTreeMap::new();
    let mut primaries = 1;
    while stores.len() < 20 || (owners.len() < primaries && stores.len() < 60) {
        let s = new_store(&format!("queue-spread-{}", stores.len())).await;
        let (owner, n) = support::redis_owner(&format!("fga-wb:{{{}}}", s.store_id)).await;
        primaries = n;
        *owners.entry(owner).or_insert(0) += 1;
        stores.push(s);
    }
    assert_eq!(owners.len(), primaries, "stores per primary: {owners:?}");
    eprintln!("{} stores, per primary: {owners:?}", stores.len());

    let mut running = Vec::new();
    for s in &stores {
        let config = queue_mode(config_for(s), &[1]);
        let wb = app(config.clone()).await;
        let worker = Worker::start(config, 2);
        for i in 0..10 {
            wb.grant(&format!("user:u{i}"), "viewer", "document:spread")
                .await
                .unwrap();
        }
        wb.revoke("user:u3", "viewer", "document:spread")
            .await
            .unwrap();
        assert_eq!(wb.flush().await.unwrap().queued, 10);
        running.push((s, wb, worker));
    }
    for (s, wb, worker) in running {
        let w = Watch {
            wb: &wb,
            writes: None,
        };
        w.until(
            "the store's worker to apply its jobs",
            Duration::from_secs(30),
            || settled(&wb),
        )
        .await;
        worker.stop().await;
        let expected: Vec<String> = (0..10)
            .filter(|i| *i != 3)
            .map(|i| format!("document:spread#viewer@user:u{i}"))
            .collect();
        assert_eq!(stored(s).await, expected, "store {}", s.store_id);
        assert_accounted(&wb).await;
    }
}

/// A worker on a wiremock OpenFGA that answers every Write 401, with
/// `schedule` (seconds) and `queue.replay_transient` = `look`, once
/// `status` reports its stop after its first job.
struct Refused {
    server: MockServer,
    wb: WriteBehind,
    writes: WriteLog,
    worker: Worker,
    store_id: String,
}

impl Refused {
    async fn start(schedule: &[u64], look: Duration) -> Refused {
        let server = MockServer::start().await;
        let store_id = unique_store_id();
        let writes = WriteLog::mount(&server, &store_id, |_| {
            fixture("auth-wrong-token").response()
        })
        .await;
        let mut config = mock_config(&server, &store_id, schedule);
        config.queue.replay_transient = look;
        let wb = app(config.clone()).await;
        let worker = Worker::start(config, 1);
        wb.grant("user:anne", "viewer", "document:1").await.unwrap();
        assert_eq!(wb.flush().await.unwrap().queued, 1);
        let w = Watch {
            wb: &wb,
            writes: Some(&writes),
        };
        let stopped = || async { wb.status().await.unwrap().flushing_stopped.is_some() };
        w.until(
            "the worker's stop in status",
            Duration::from_secs(20),
            stopped,
        )
        .await;
        Refused {
            server,
            wb,
            writes,
            worker,
            store_id,
        }
    }
}

/// A worker OpenFGA refuses (wiremock: every Write answers 401) reports
/// flushing as stopped in `status`, however often the application process
/// records its own work: each process notes its own stop. The one shared
/// note was overwritten within a second by the application's "not
/// stopped", so `status --check` and `flush --wait` missed the refusal.
/// Once the worker is gone, its note no longer shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_worker_shows_in_status_whatever_others_record() {
    let Refused {
        wb,
        writes,
        worker,
        store_id,
        ..
    } = Refused::start(&[1], Duration::from_secs(30)).await;
    let w = Watch {
        wb: &wb,
        writes: Some(&writes),
    };
    for i in 0..3 {
        wb.grant(&format!("user:u{i}"), "viewer", "document:2")
            .await
            .unwrap();
        assert_eq!(wb.flush().await.unwrap().queued, 1);
        let why = wb.status().await.unwrap().flushing_stopped;
        assert!(why.as_deref().is_some_and(|w| w.contains("401")), "{why:?}");
    }
    worker.stop().await;
    w.until(
        "the stop of a worker gone",
        Duration::from_secs(20),
        || async { wb.status().await.unwrap().flushing_stopped.is_none() },
    )
    .await;
    // Its note is gone with its lease: a process restarting in a loop
    // would otherwise add one per run.
    let mut c = support::redis_conn().await;
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("fga-wb:{{{store_id}}}:stats"))
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        !fields.iter().any(|f| f.starts_with("stopped")),
        "{fields:?}"
    );
}

/// A worker OpenFGA refused (a 401) fetches no more jobs while its stop
/// lasts: each would only be refused too. Before, it fetched every due job
/// and sent one refused Write each (a thousand queued jobs, a thousand
/// refused Writes a retry step).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_worker_fetches_no_jobs_while_stopped() {
    let Refused {
        wb, writes, worker, ..
    } = Refused::start(&[60], Duration::from_secs(30)).await;
    let w = Watch {
        wb: &wb,
        writes: Some(&writes),
    };
    for i in 0..5 {
        wb.grant("user:anne", "viewer", &format!("document:more{i}"))
            .await
            .unwrap();
        wb.flush().await.unwrap();
    }
    w.until("six jobs queued", Duration::from_secs(20), || async {
        let q = wb.status().await.unwrap().queue.unwrap();
        q.pending + q.running + q.scheduled >= 6
    })
    .await;
    // A second of polls (every 50 ms) in which none is fetched.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(writes.count(), 1, "a stopped worker ran refused jobs");
    worker.stop().await;
}

/// A worker OpenFGA refused once (a 401 on its Write) and that has no
/// job to run since (the refused job waits a minute for its retry) asks
/// OpenFGA again and ends its stop once OpenFGA answers (here: its store
/// read): `status` no longer reports flushing stopped, so `status --check`
/// and `fga-wb flush --wait` do not take the note for final. Before, the
/// note stayed until that worker completed a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_worker_ends_its_stop_once_openfga_answers() {
    let Refused {
        server,
        wb,
        writes,
        worker,
        store_id,
    } = Refused::start(&[60], Duration::from_millis(200)).await;
    let w = Watch {
        wb: &wb,
        writes: Some(&writes),
    };
    // OpenFGA takes the credentials again (what the worker's look reads:
    // the store itself).
    Mock::given(method("GET"))
        .and(path(format!("/stores/{store_id}")))
        .respond_with(support::fixture("get-store").response())
        .mount(&server)
        .await;
    w.until(
        "the idle worker's stop to end",
        Duration::from_secs(20),
        || async { wb.status().await.unwrap().flushing_stopped.is_none() },
    )
    .await;
    assert_eq!(writes.count(), 1, "the refused job has not run again");
    worker.stop().await;
}

/// More than 100 pending grants a list depends on, held by queued jobs no
/// worker runs yet: the flush the list makes first cannot write them, and
/// the error says to wait for the workers (it said "flush first", which
/// had just been done, with the count and limit of a check).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_grants_held_by_queued_jobs_say_to_wait_for_the_workers() {
    let s = new_store("queue-too-many").await;
    let wb = app(queue_mode(config_for(&s), &[1])).await;
    for i in 0..101 {
        wb.grant(&format!("user:u{i}"), "viewer", "document:1")
            .await
            .unwrap();
    }
    let users = fga_wb::openfga::ListUsersRequest::new("document:1", "viewer", "user");
    let e = wb.list_users(&users).await.unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("at least 101") && text.contains("flush --wait"),
        "{text}"
    );
}

// ---------------------------------------------------------------------------
// Retry schedule
// ---------------------------------------------------------------------------

/// What an always-failing job did: the Write requests the mock saw, and the
/// application handle to inspect the outcome with.
struct AlwaysFailing {
    seen: Vec<Seen>,
    wb: WriteBehind,
}

/// Retry schedule 1 s / 2 s / 3 s against a server that answers every Write
/// with 503: one grant is flushed into one job, a worker runs it until the
/// op is dead-lettered, and then a little longer in case a (wrong) fifth
/// attempt comes.
async fn always_failing_job() -> AlwaysFailing {
    let server = MockServer::start().await;
    let store_id = unique_store_id();
    let writes = WriteLog::mount(&server, &store_id, |_| {
        fixture("unavailable-503").response()
    })
    .await;
    let config = mock_config(&server, &store_id, &[1, 2, 3]);
    let wb = app(config.clone()).await;
    let w = Watch {
        wb: &wb,
        writes: Some(&writes),
    };
    let worker = Worker::start(config, 1);

    wb.grant("user:anne", "viewer", "document:retry")
        .await
        .unwrap();
    let report = wb.flush().await.unwrap();
    assert_eq!(report.queued, 1, "{report:?}");

    w.until(
        "the op to be dead-lettered",
        Duration::from_secs(20),
        || async { !wb.dead_letters().await.unwrap().is_empty() },
    )
    .await;
    // Nothing queued, scheduled or running: a (wrong) fifth attempt would
    // have run by then.
    w.until("the queue to settle", Duration::from_secs(20), || {
        settled(&wb)
    })
    .await;
    let seen = writes.requests();
    worker.stop().await;
    for r in &seen {
        assert_eq!(r.tuples, [grant("document:retry#viewer@user:anne")]);
    }
    AlwaysFailing { seen, wb }
}

/// Retry schedule 1 s / 2 s / 3 s, every Write answered 503: the job is
/// tried exactly 4 times (the first run and one retry per step), then its
/// op is dead-lettered with a reason saying it gave up after 4 attempts
/// with the server's error, an attempt count of 4, counted in
/// `totals.dead_lettered`, and nothing is left pending or queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_always_fails_is_tried_4_times_then_dead_lettered() {
    let AlwaysFailing { seen, wb } = always_failing_job().await;
    assert_eq!(
        seen.len(),
        4,
        "the first run and one retry per step: {seen:?}"
    );

    let dead = wb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d.tuple.to_string(), "document:retry#viewer@user:anne");
    assert_eq!(d.op, Op::Grant);
    assert!(
        d.reason.contains("gave up after 4 attempts"),
        "the reason says it gave up: {d:?}"
    );
    assert!(
        d.reason.contains("503") || d.reason.to_lowercase().contains("unavailable"),
        "the reason carries the server's error: {d:?}"
    );

    let st = wb.status().await.unwrap();
    assert_eq!(st.totals.dead_lettered, 1, "{st:?}");
    assert_eq!(st.dead_letters, 1, "{st:?}");
    assert!(settled(&wb).await, "{st:?}");
    assert_accounted(&wb).await;
    assert_eq!(d.attempts, 4, "attempts made, as the reason says: {d:?}");
}

/// A job pinned to a model the store lacks (an application started with
/// a mistyped `FGA_MODEL_ID` while OpenFGA was away, so it could not be
/// checked), on the real server: the job follows the retry schedule to a
/// dead letter that names OpenFGA's refusal, and the worker, whose store
/// answers, is not stopped. Before, the worker stopped, kept the ops and
/// tried the job again at the slowest step with its attempt unspent, for
/// good.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_pinned_to_a_model_the_store_lacks_is_dead_lettered() {
    let s = new_store("queue-missing-model").await;
    let (wb, worker) = pinned_job(queue_mode(config_for(&s), &[1])).await;
    let w = Watch {
        wb: &wb,
        writes: None,
    };
    w.until(
        "the op to be dead-lettered",
        Duration::from_secs(30),
        || async { !wb.dead_letters().await.unwrap().is_empty() },
    )
    .await;
    let dead = wb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(
        dead[0].code.as_deref(),
        Some("authorization_model_not_found"),
        "{dead:?}"
    );
    assert!(
        dead[0].reason.contains("gave up after 2 attempts"),
        "{dead:?}"
    );
    let st = wb.status().await.unwrap();
    assert_eq!(st.flushing_stopped, None, "{st:?}");
    assert!(settled(&wb).await, "{st:?}");
    assert_accounted(&wb).await;
    worker.stop().await;
}

/// The same job on a store that does not exist (the worker's
/// configuration is what is wrong): the worker stops, as for refused
/// credentials, and keeps the ops; nothing is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_on_a_store_that_does_not_exist_stops_the_worker_and_is_kept() {
    let mut config = queue_mode(Config::default(), &[1]);
    config.openfga.api_url = support::openfga_url();
    config.openfga.api_token = Secret::new(support::openfga_token());
    config.openfga.store_id = unique_store_id();
    let (wb, worker) = pinned_job(config).await;
    let w = Watch {
        wb: &wb,
        writes: None,
    };
    w.until("the worker to stop", Duration::from_secs(30), || async {
        wb.status().await.unwrap().flushing_stopped.is_some()
    })
    .await;
    assert!(wb.dead_letters().await.unwrap().is_empty());
    let st = wb.status().await.unwrap();
    assert_eq!(st.pending.in_flight, 1, "the job keeps the op: {st:?}");
    worker.stop().await;
}

/// An application pinned to a model id no store has, with OpenFGA not
/// asked about it (as when OpenFGA was away at its start), queues one
/// grant for a worker configured with `worker_config`.
async fn pinned_job(worker_config: Config) -> (WriteBehind, Worker) {
    let mut app_config = worker_config.clone();
    app_config.openfga.model_id = "01ARZ3NDEKTSV4RRFFQ69G5FAW".into();
    let wb = app(app_config).await;
    let worker = Worker::start(worker_config, 1);
    wb.grant("user:anne", "viewer", "document:pinned")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    (wb, worker)
}

/// Retry schedule 1 s / 2 s / 3 s, every Write answered 503: each retry
/// comes no sooner than its step after the failure before it (lower bounds
/// only: a retry may come up to a poll plus a second late, as apalis-redis
/// schedules in whole seconds, but never early).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_come_no_sooner_than_their_step() {
    let AlwaysFailing { seen, .. } = always_failing_job().await;
    assert_eq!(seen.len(), 4, "{seen:?}");
    let spacings: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    eprintln!("spacings between attempts: {spacings:?}");
    for (i, (spacing, step)) in spacings.iter().zip([1, 2, 3]).enumerate() {
        assert!(
            *spacing >= Duration::from_secs(step),
            "retry {} came {spacing:?} after the failure before it, sooner than the {step} s step \
             (all spacings: {spacings:?})",
            i + 1
        );
    }
}

/// One grant (`document:<object>#viewer@user:bob`) queued and run by a
/// worker (retry schedule 1 s / 2 s / 3 s) whose first `failures` Writes
/// get `failure`, the rest OK, until it is applied and the queue empty;
/// returns the handle and the Writes seen.
async fn one_grant_after_failures(
    object: &str,
    failures: usize,
    failure: impl Fn() -> ResponseTemplate + Send + Sync + 'static,
) -> (WriteBehind, Vec<Seen>) {
    let server = MockServer::start().await;
    let store_id = unique_store_id();
    let writes = WriteLog::mount(&server, &store_id, move |n| {
        if n < failures {
            failure()
        } else {
            fixture("write-ok").response()
        }
    })
    .await;
    let config = mock_config(&server, &store_id, &[1, 2, 3]);
    let wb = app(config.clone()).await;
    let w = Watch {
        wb: &wb,
        writes: Some(&writes),
    };
    let worker = Worker::start(config, 1);

    wb.grant("user:bob", "viewer", &format!("document:{object}"))
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);

    w.until("the op to be applied", Duration::from_secs(30), || async {
        wb.status().await.unwrap().totals.applied == 1
    })
    .await;
    w.until("the queue to empty", Duration::from_secs(5), || {
        settled(&wb)
    })
    .await;
    worker.stop().await;
    let seen = writes.requests();
    assert_eq!(
        seen.len(),
        failures + 1,
        "{failures} failures, then 200: {seen:?}"
    );
    (wb, seen)
}

/// A job that fails twice (503, 503) and then succeeds is applied exactly
/// once: three Write requests, no dead letter, nothing pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_that_fails_twice_then_succeeds_is_applied_once() {
    let (wb, seen) =
        one_grant_after_failures("twice", 2, || fixture("unavailable-503").response()).await;
    for r in &seen {
        assert_eq!(r.tuples, [grant("document:twice#viewer@user:bob")]);
    }
    assert!(wb.dead_letters().await.unwrap().is_empty());
    let st = wb.status().await.unwrap();
    assert_eq!((st.pending.total, st.pending.in_flight), (0, 0), "{st:?}");
    assert_eq!(
        (st.totals.applied, st.totals.dead_lettered),
        (1, 0),
        "{st:?}"
    );
    assert_accounted(&wb).await;
}

/// A job refused with 429 and `Retry-After: 4` runs again no sooner than 4 s
/// later, though its schedule's first step is 1 s (lower bound only).
/// Before, the schedule alone set the wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_waits_at_least_what_retry_after_asks() {
    let (_wb, seen) = one_grant_after_failures("later", 1, || {
        fixture("rate-limited-429")
            .response()
            .insert_header("retry-after", "4")
    })
    .await;
    let spacing = seen[1].at - seen[0].at;
    assert!(
        spacing >= Duration::from_secs(4),
        "the retry came {spacing:?} after the 429, sooner than its Retry-After of 4 s"
    );
}

/// A blip (two 500s in a row, as a busy database answers) is retried within
/// the job's run by the worker (`queue.request_retries`, default 3), not
/// after the first step of the retry schedule (30 s here, longer than the
/// test waits): three Write requests, the op applied, nothing dead-lettered
/// or left queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blip_is_retried_within_the_job_by_the_worker() {
    let server = MockServer::start().await;
    let store_id = unique_store_id();
    let writes = WriteLog::mount(&server, &store_id, |n| {
        if n < 2 {
            fixture("server-error-500").response()
        } else {
            fixture("write-ok").response()
        }
    })
    .await;
    let mut config = mock_config(&server, &store_id, &[30]);
    // The default, which queue_mode sets to 0 for the other tests.
    config.queue.request_retries = fga_wb::config::QueueConfig::default().request_retries;
    let wb = app(config.clone()).await;
    let w = Watch {
        wb: &wb,
        writes: Some(&writes),
    };
    let worker = Worker::start(config, 1);
    wb.grant("user:bob", "viewer", "document:blip")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    w.until("the op to be applied", Duration::from_secs(20), || async {
        wb.status().await.unwrap().totals.applied == 1
    })
    .await;
    w.until("the queue to empty", Duration::from_secs(5), || {
        settled(&wb)
    })
    .await;
    worker.stop().await;
    assert_eq!(writes.requests().len(), 3, "500, 500, then 200");
    assert!(wb.dead_letters().await.unwrap().is_empty());
    assert_accounted(&wb).await;
}

// ---------------------------------------------------------------------------
// Stale retry
// ---------------------------------------------------------------------------

const K: &str = "document:stale#viewer@user:carl";
const K2: &str = "document:stale#viewer@user:dora";

/// Stale retry (wiremock): a job with grant(k) and grant(k2) fails with 503
/// and is rescheduled 5 s later; meanwhile revoke(k) is acknowledged,
/// flushed and applied by the other worker slot. When the retry runs it
/// skips the superseded grant(k) and writes only k2: the last Write that
/// touches k is the delete, no grant of k comes after it, and the stale op
/// counts as coalesced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_never_brings_back_a_revoked_grant() {
    let server = MockServer::start().await;
    let store_id = unique_store_id();
    let writes = WriteLog::mount(&server, &store_id, |n| {
        if n == 0 {
            fixture("unavailable-503").response()
        } else {
            fixture("write-ok").response()
        }
    })
    .await;
    let config = mock_config(&server, &store_id, &[5]);
    let wb = app(config.clone()).await;
    let w = Watch {
        wb: &wb,
        writes: Some(&writes),
    };
    let worker = Worker::start(config, 2);

    wb.grant("user:carl", "viewer", "document:stale")
        .await
        .unwrap();
    wb.grant("user:dora", "viewer", "document:stale")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 2);
    w.until(
        "the first attempt to fail and its retry to be scheduled",
        Duration::from_secs(10),
        || async {
            // Not running any more (the worker finished it) and rescheduled.
            let q = wb.status().await.unwrap().queue.unwrap();
            writes.count() == 1 && q.running == 0 && q.pending == 0 && q.scheduled == 1
        },
    )
    .await;

    wb.revoke("user:carl", "viewer", "document:stale")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    w.until(
        "the revoke to be applied",
        Duration::from_secs(10),
        || async { wb.status().await.unwrap().totals.applied == 1 },
    )
    .await;
    assert_eq!(
        writes.count(),
        2,
        "the revoke was applied before the retry ran: {:?}",
        writes.requests()
    );
    let st = wb.status().await.unwrap();
    assert_eq!(
        st.queue.as_ref().map(|q| q.scheduled),
        Some(1),
        "the scenario: the revoke was applied while the retry waits: {st:?}"
    );

    // The retry, due 5 s after the failure.
    w.until("the retry to run", Duration::from_secs(15), || settled(&wb))
        .await;
    worker.stop().await;

    let seen = writes.requests();
    eprintln!("write requests: {seen:?}");
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[0].tuples, [grant(K), grant(K2)]);
    assert_eq!(seen[1].tuples, [revoke(K)]);
    assert_eq!(
        seen[2].tuples,
        [grant(K2)],
        "the retry writes k2 and skips the superseded grant of k"
    );
    let last_k = seen
        .iter()
        .rposition(|r| r.tuples.iter().any(|(t, _)| t == K))
        .unwrap();
    assert_eq!(seen[last_k].tuples, [revoke(K)], "{seen:?}");

    assert!(wb.dead_letters().await.unwrap().is_empty());
    let t = wb.status().await.unwrap().totals;
    assert_eq!(
        (t.acknowledged, t.applied, t.coalesced, t.dead_lettered),
        (3, 2, 1, 0),
        "grant(k) ends superseded by revoke(k): {t:?}"
    );
    assert_accounted(&wb).await;
}

/// Stale retry with the real OpenFGA holding the outcome: worker A, whose
/// OpenFGA answers 503, fails the job {grant(k), grant(k2)} and the retry is
/// scheduled; A stops. revoke(k) is acknowledged and flushed, and worker B,
/// on the real OpenFGA, applies it and later runs the retry: the real store
/// ends with k2 and without k.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_retry_leaves_the_real_store_revoked() {
    let s = new_store("queue-stale-real").await;
    let server = MockServer::start().await;
    let failing = WriteLog::mount(&server, &s.store_id, |_| {
        fixture("unavailable-503").response()
    })
    .await;
    let real = queue_mode(config_for(&s), &[5]);
    let mut down = real.clone();
    down.openfga.api_url = server.uri();

    let wb = WriteBehind::builder(real.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let w = Watch {
        wb: &wb,
        writes: Some(&failing),
    };
    wb.grant("user:carl", "viewer", "document:stale")
        .await
        .unwrap();
    wb.grant("user:dora", "viewer", "document:stale")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 2);

    let a = Worker::start(down, 1);
    w.until(
        "worker A's attempt to fail and the retry to be scheduled",
        Duration::from_secs(10),
        || async {
            let q = wb.status().await.unwrap().queue.unwrap();
            failing.count() == 1 && q.scheduled == 1 && q.running == 0
        },
    )
    .await;
    a.stop().await;

    wb.revoke("user:carl", "viewer", "document:stale")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    let b = Worker::start(real, 2);
    w.until(
        "worker B to apply the revoke",
        Duration::from_secs(10),
        || async { wb.status().await.unwrap().totals.applied == 1 },
    )
    .await;
    let st = wb.status().await.unwrap();
    assert_eq!(
        (failing.count(), st.queue.as_ref().map(|q| q.scheduled)),
        (1, Some(1)),
        "the scenario: the revoke was applied while the retry waits: {st:?}"
    );
    assert!(stored(&s).await.is_empty(), "k2 waits for the retry");

    w.until("the retry to run", Duration::from_secs(15), || settled(&wb))
        .await;
    b.stop().await;

    assert_eq!(
        stored(&s).await,
        [K2],
        "k stays revoked; the retry applied k2"
    );
    assert_eq!(failing.count(), 1);
    assert!(wb.dead_letters().await.unwrap().is_empty());
    let t = wb.status().await.unwrap().totals;
    assert_eq!(
        (t.acknowledged, t.applied, t.coalesced, t.dead_lettered),
        (3, 2, 1, 0),
        "{t:?}"
    );
    assert_accounted(&wb).await;
}

// ---------------------------------------------------------------------------
// One write per tuple at a time; each op accounted once
// ---------------------------------------------------------------------------

/// One worker with two job slots: while its Write of grant(k) is in flight
/// (the mock holds the response 2 s), revoke(k) is acknowledged and flushed
/// into a second job. The revoke must not be written while the grant's
/// Write is in flight (ARCHITECTURE.md: no two in-flight requests touch the same
/// tuple), or a grant the server applies late would overwrite the newer
/// revoke: the delete reaches OpenFGA only after the grant's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_worker_never_writes_a_tuple_twice_at_once() {
    let server = MockServer::start().await;
    let store_id = unique_store_id();
    let hold = Duration::from_secs(2);
    let writes = WriteLog::mount(&server, &store_id, move |n| {
        let ok = fixture("write-ok").response();
        if n == 0 {
            ok.set_delay(hold)
        } else {
            ok
        }
    })
    .await;
    let mut config = mock_config(&server, &store_id, &[1, 2, 3]);
    config.openfga.request_timeout = Duration::from_secs(5);
    let wb = app(config.clone()).await;
    let w = Watch {
        wb: &wb,
        writes: Some(&writes),
    };
    let worker = Worker::start(config, 2);

    wb.grant("user:carl", "viewer", "document:stale")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    w.until(
        "the grant's Write to arrive",
        Duration::from_secs(10),
        || async { writes.count() == 1 },
    )
    .await;
    wb.revoke("user:carl", "viewer", "document:stale")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);

    w.until("both jobs to finish", Duration::from_secs(15), || {
        settled(&wb)
    })
    .await;
    worker.stop().await;

    let seen = writes.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].tuples, [grant(K)]);
    assert_eq!(seen[1].tuples, [revoke(K)]);
    let gap = seen[1].at - seen[0].at;
    assert!(
        gap >= hold,
        "the delete of k was sent {gap:?} after the grant of k, while the grant's Write was \
         still in flight (its response came {hold:?} after it): a late-applied grant would \
         overwrite the revoke"
    );
    let t = wb.status().await.unwrap().totals;
    assert_eq!(
        (t.acknowledged, t.applied, t.dead_lettered),
        (2, 2, 0),
        "{t:?}"
    );
    assert_accounted(&wb).await;
}

/// A revoke acknowledged while a Write of the grant on the same tuple is in
/// flight and then fails (503): the grant's retry is skipped as stale and
/// the revoke applied. The superseded grant is counted coalesced once, so
/// acknowledged = applied + coalesced + dead-lettered + cleared (promise 4).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_op_superseded_during_a_failed_write_is_counted_once() {
    let server = MockServer::start().await;
    let store_id = unique_store_id();
    let writes = WriteLog::mount(&server, &store_id, |n| {
        if n == 0 {
            fixture("unavailable-503")
                .response()
                .set_delay(Duration::from_millis(1500))
        } else {
            fixture("write-ok").response()
        }
    })
    .await;
    let mut config = mock_config(&server, &store_id, &[2]);
    config.openfga.request_timeout = Duration::from_secs(5);
    let wb = app(config.clone()).await;
    let w = Watch {
        wb: &wb,
        writes: Some(&writes),
    };
    let worker = Worker::start(config, 1);

    wb.grant("user:carl", "viewer", "document:stale")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    w.until(
        "the grant's Write to arrive",
        Duration::from_secs(10),
        || async { writes.count() == 1 },
    )
    .await;
    // Acknowledged while the grant's Write is in flight.
    wb.revoke("user:carl", "viewer", "document:stale")
        .await
        .unwrap();
    w.until(
        "the grant's Write to fail and its retry to be scheduled",
        Duration::from_secs(10),
        || async {
            let q = wb.status().await.unwrap().queue.unwrap();
            q.running == 0 && q.pending + q.scheduled == 1
        },
    )
    .await;
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    w.until(
        "the revoke and the retry to finish",
        Duration::from_secs(15),
        || settled(&wb),
    )
    .await;
    worker.stop().await;

    let seen = writes.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].tuples, [grant(K)]);
    assert_eq!(
        seen[1].tuples,
        [revoke(K)],
        "the stale grant is never retried"
    );
    assert!(wb.dead_letters().await.unwrap().is_empty());
    let t = wb.status().await.unwrap().totals;
    assert_eq!(
        (t.acknowledged, t.applied, t.coalesced, t.dead_lettered),
        (2, 1, 1, 0),
        "the superseded grant is counted coalesced once: {t:?}"
    );
    assert_accounted(&wb).await;
}

// ---------------------------------------------------------------------------
// A worker killed mid-job
// ---------------------------------------------------------------------------

/// A `fga-wb worker` child process. Killed (SIGKILL) on drop, so a failed
/// test leaves no process behind; its log is printed if the test failed.
struct ChildWorker {
    child: tokio::process::Child,
    log: PathBuf,
}

impl ChildWorker {
    fn spawn(config: &Config, request_timeout: &str) -> ChildWorker {
        let log = std::env::temp_dir().join(format!(
            "fga-wb-queue-worker-{}-{:x}.log",
            std::process::id(),
            random()
        ));
        let file = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_fga-wb"))
            .args(["worker", "--concurrency", "1"])
            // Not the repository's config/fga-wb.toml: only what is set here.
            .current_dir(std::env::temp_dir())
            .env_remove("FGA_WB_CONFIG")
            .env("FGA_API_URL", &config.openfga.api_url)
            .env("FGA_API_TOKEN", config.openfga.api_token.expose())
            .env("FGA_STORE_ID", &config.openfga.store_id)
            .env("FGA_MODEL_ID", &config.openfga.model_id)
            .env("FGA_WB_BUFFER__STORE", "redis")
            .env("FGA_WB_FLUSH__MODE", "queue")
            .env("FGA_WB_REDIS__URL", &config.redis.url)
            .env("FGA_WB_QUEUE__RETRY_SCHEDULE", r#"["1s","2s","3s"]"#)
            .env("FGA_WB_QUEUE__HEARTBEAT", "1s")
            .env("FGA_WB_QUEUE__POLL_INTERVAL", "50ms")
            .env("FGA_WB_OPENFGA__REQUEST_TIMEOUT", request_timeout)
            // A killed worker's jobs come back a hold after its lease.
            .env("FGA_WB_FLUSH__UNKNOWN_OUTCOME_HOLD", "2s")
            .env("RUST_LOG", "warn,fga_wb=debug")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .expect("start fga-wb worker");
        ChildWorker { child, log }
    }

    /// SIGKILL, and wait until the process is gone.
    async fn kill(&mut self) {
        self.child.kill().await.expect("kill the worker");
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "--- fga-wb worker log ---\n{}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Ops an application acknowledged and never queued (it ended, or died,
/// before its flusher took them) are queued and applied by a worker on its
/// own once they are older than twice `flush.interval` (5 s at least): a
/// grant, and a revoke of a tuple OpenFGA holds. Before, they stayed
/// pending until an application process flushed them or an operator ran
/// `fga-wb flush`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_queues_what_no_application_took() {
    let s = new_store("queue-orphans").await;
    let old = TupleKey::new("user:old", "viewer", "document:orphan").unwrap();
    s.client
        .write(&s.store_id, &WriteRequest::idempotent(vec![old], vec![]))
        .await
        .unwrap();
    let mut config = queue_mode(config_for(&s), &[1, 2, 3]);
    config.flush.interval = Duration::from_secs(1);
    // Ten intervals and two leases, past which workers take pending ops
    // whatever runs, are past the wait below: the worker must see that no
    // application runs.
    config.redis.writer_lease = Duration::from_secs(60);
    let gone = app(config.clone()).await;
    gone.grant("user:anne", "viewer", "document:orphan")
        .await
        .unwrap();
    gone.revoke("user:old", "viewer", "document:orphan")
        .await
        .unwrap();
    assert_eq!(gone.pending().await.unwrap().total, 2);
    // Ends without queueing them: its flusher never ran. No application
    // process runs from here on (a live one would take them itself); a
    // handle that flushes only when told is none.
    gone.close().await.unwrap();
    let watcher = app(config.clone()).await;
    let worker = Worker::start(config.clone(), 2);
    let limit = Instant::now() + Duration::from_secs(60);
    while stored(&s).await != ["document:orphan#viewer@user:anne"] {
        assert!(
            Instant::now() < limit,
            "the worker did not write what no application took"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.stop().await;
    assert!(settled(&watcher).await);
}

/// A worker process is killed (SIGKILL) while its Write request is in
/// flight (the mock holds the response). The job runs again on another
/// worker once the dead worker's lease has ended and its hold after that
/// (2 s here: the killed Write might still land until then); it is applied to the real
/// OpenFGA, including the tuples the killed write may already have landed
/// (written here directly), with no duplicate error and no dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_of_a_killed_worker_runs_again_elsewhere() {
    let s = new_store("queue-kill-worker").await;
    let server = MockServer::start().await;
    // The killed worker's OpenFGA: holds every Write for 20 s.
    let held = WriteLog::mount(&server, &s.store_id, |_| {
        fixture("write-ok")
            .response()
            .set_delay(Duration::from_secs(20))
    })
    .await;
    let real = queue_mode(config_for(&s), &[1, 2, 3]);
    let wb = WriteBehind::builder(real.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let w = Watch {
        wb: &wb,
        writes: Some(&held),
    };
    let tuples: Vec<(String, String)> = (0..30)
        .map(|i| (format!("user:k{i}"), format!("document:kill{}", i % 3)))
        .collect();
    for (u, o) in &tuples {
        wb.grant(u, "viewer", o).await.unwrap();
    }
    assert_eq!(wb.flush().await.unwrap().queued, 30);

    let mut doomed_config = real.clone();
    doomed_config.openfga.api_url = server.uri();
    // Its request outlives the kill whatever the machine's pace.
    let mut doomed = ChildWorker::spawn(&doomed_config, "30s");
    w.until(
        "the worker process to send its Write",
        Duration::from_secs(20),
        || async { held.count() == 1 },
    )
    .await;
    let st = wb.status().await.unwrap();
    assert_eq!(st.queue.as_ref().unwrap().running, 1, "{st:?}");
    doomed.kill().await;
    assert_eq!(held.requests()[0].tuples.len(), 30);

    // The write may have landed before the crash: half of it did.
    let landed: Vec<TupleKey> = tuples
        .iter()
        .step_by(2)
        .map(|(u, o)| TupleKey::new(u.as_str(), "viewer", o.as_str()).unwrap())
        .collect();
    s.client
        .write(&s.store_id, &WriteRequest::idempotent(landed, vec![]))
        .await
        .unwrap();
    let st = wb.status().await.unwrap();
    assert_eq!(
        (st.pending.total, st.pending.in_flight),
        (0, 30),
        "the dead worker's job still owns the ops: {st:?}"
    );

    let survivor = Worker::start(real, 2);
    w.until(
        "the job to run again on the surviving worker",
        Duration::from_secs(30),
        || settled(&wb),
    )
    .await;
    survivor.stop().await;

    let mut expected: Vec<String> = tuples
        .iter()
        .map(|(u, o)| format!("{o}#viewer@{u}"))
        .collect();
    expected.sort();
    assert_eq!(stored(&s).await, expected);
    assert_eq!(held.count(), 1, "the re-run went to the surviving worker");
    assert!(
        wb.dead_letters().await.unwrap().is_empty(),
        "no duplicate (or other) errors"
    );
    let st = wb.status().await.unwrap();
    assert_eq!(
        (st.totals.applied, st.totals.dead_lettered),
        (30, 0),
        "{st:?}"
    );
    assert_accounted(&wb).await;
}

/// At most twice `queue.worker_concurrency` jobs wait out holds apart from
/// their slots: past that, a held job keeps its slot, and once every slot
/// holds one the worker fetches nothing more (in an outage it would
/// otherwise spend every queued job's retries). With one request slot (two
/// job slots) and every Write hanging, two jobs wait apart, two more in
/// their slots, and a fifth stays queued, not fetched, until the worker
/// stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_cap_held_jobs_keep_their_slots() {
    let h = Holding::start(|_| fixture("hung-write").response()).await;
    let (wb, writes) = (&h.wb, &h.writes);
    for i in 1..=4 {
        h.send(&format!("document:held-{i}"), i).await;
    }
    wb.grant("user:bob", "viewer", "document:fifth")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    // The worker is told of the new job at once, and polls every 50 ms:
    // sixty polls later, the fifth job is still queued and never sent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let st = wb.status().await.unwrap();
    let q = st.queue.as_ref().unwrap();
    assert_eq!((q.pending, q.running), (1, 4), "{st:?}");
    assert_eq!(writes.requests().len(), 4, "{:?}", writes.requests());
    assert_eq!(wb.pending().await.unwrap().in_flight, 5);
    h.worker.stop().await;
}

/// A worker with one request slot (two job slots) and an application
/// handle, against a mock whose Writes follow `script`; a request times
/// out after 300 ms, and its outcome is unknown for 10 minutes.
struct Holding {
    _server: MockServer,
    writes: WriteLog,
    wb: WriteBehind,
    worker: Worker,
}

impl Holding {
    async fn start(script: impl Fn(usize) -> ResponseTemplate + Send + Sync + 'static) -> Holding {
        let server = MockServer::start().await;
        let store_id = unique_store_id();
        let writes = WriteLog::mount(&server, &store_id, script).await;
        let mut config = mock_config(&server, &store_id, &[1, 2, 3]);
        config.openfga.request_timeout = Duration::from_millis(300);
        config.flush.unknown_outcome_hold = Duration::from_secs(600);
        config.flush.shutdown_deadline = Duration::from_secs(2);
        let wb = app(config.clone()).await;
        let worker = Worker::start(config, 1);
        Holding {
            _server: server,
            writes,
            wb,
            worker,
        }
    }

    /// Grants on `object`, queues its job and waits for its Write, the
    /// `n`th the mock sees.
    async fn send(&self, object: &str, n: usize) {
        self.wb.grant("user:bob", "viewer", object).await.unwrap();
        assert_eq!(self.wb.flush().await.unwrap().queued, 1);
        let w = Watch {
            wb: &self.wb,
            writes: Some(&self.writes),
        };
        w.until("the job's Write to arrive", Duration::from_secs(10), || {
            let sent = self.writes.requests().len();
            async move { sent == n }
        })
        .await;
    }
}

/// Jobs waiting out Writes whose outcome is unknown (wiremock: the first
/// two Writes hang past the 300 ms timeout; a server cannot be made to hang
/// on demand) do not keep the worker from running others: with one request
/// slot (two job slots), two held jobs and a 10-minute hold, a third job is
/// written at once. Before, each held job kept its job slot through the
/// hold, and the worker fetched nothing more until the holds ended. The
/// stop cuts the holds short and returns within its grace; the held jobs
/// stay this worker's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn held_jobs_leave_the_worker_free_for_others() {
    let h = Holding::start(|n| match n {
        0 | 1 => fixture("hung-write").response(),
        _ => fixture("write-ok").response(),
    })
    .await;
    let (wb, writes) = (&h.wb, &h.writes);
    let w = Watch {
        wb,
        writes: Some(writes),
    };
    h.send("document:held-1", 1).await;
    h.send("document:held-2", 2).await;
    wb.grant("user:bob", "viewer", "document:free")
        .await
        .unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    w.until(
        "the third job to be applied",
        Duration::from_secs(10),
        || async { wb.status().await.unwrap().totals.applied == 1 },
    )
    .await;
    let seen = writes.requests();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[2].tuples, [grant("document:free#viewer@user:bob")]);
    // The two held jobs' ops are still in flight.
    assert_eq!(wb.pending().await.unwrap().in_flight, 2);
    h.worker.stop().await;
}

/// Overflow `flush` in queue mode (real server and Redis, a worker
/// running): a flush only queues the ops, and queued ops keep their room
/// until the worker writes them, so the grant at capacity waits for that
/// (as `block` does) and is taken. Before, it failed as buffer-full every
/// time: the policy acted as `reject`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overflow_flush_in_queue_mode_waits_for_the_worker() {
    let s = new_store("queue-overflow-flush").await;
    let mut config = queue_mode(config_for(&s), &[1, 2, 3]);
    config.buffer.capacity = 10;
    config.buffer.overflow = fga_wb::config::Overflow::Flush;
    config.buffer.block_timeout = Duration::from_secs(20);
    let wb = WriteBehind::builder(config.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    for i in 0..10 {
        wb.grant(&format!("user:u{i}"), "viewer", "document:full")
            .await
            .unwrap();
    }
    let eleventh = tokio::spawn({
        let wb = wb.clone();
        async move { wb.grant("user:u10", "viewer", "document:full").await }
    });
    let w = Watch {
        wb: &wb,
        writes: None,
    };
    // Its flush queued the ten; only then does a worker run.
    w.until("the ten to be queued", Duration::from_secs(20), || async {
        wb.status().await.unwrap().queue.unwrap().pending > 0
    })
    .await;
    let worker = Worker::start(config, 2);
    eleventh
        .await
        .unwrap()
        .expect("the grant at capacity was taken");
    wb.flush().await.unwrap();
    w.until("all 11 to be written", Duration::from_secs(20), || async {
        stored(&s).await.len() == 11
    })
    .await;
    worker.stop().await;
    wb.shutdown().await.unwrap();
}
