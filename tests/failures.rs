//! How the write-behind layer behaves when things go wrong: poison tuples,
//! transient and auth failures, a slow write racing a newer op on its key,
//! a full buffer, `clear`, dead-letter replay and purge, and shutdown with
//! OpenFGA up or down (ARCHITECTURE.md promises 4, 5, 6 and 7).
//!
//! Tests marked "real server" run against the OpenFGA that `scripts/test`
//! starts; the others put wiremock in its place, replaying responses captured
//! from the real server (`wiremock-fixtures/`), for what a healthy server
//! cannot be made to do on demand (503, 429, 401, a held response). The
//! outage test, which runs its own OpenFGA, is in `tests/outage.rs`.

mod support;

use support::touched;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fga_wb::config::Overflow;
use fga_wb::openfga::Secret;
use fga_wb::{Config, Op, WriteBehind};
use serde_json::{json, Value};
use support::{config_for, documents_model, fixture, new_store, stored};
use tokio::sync::mpsc;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Store and model ids the mocked OpenFGA answers for.
const STORE: &str = "01JFAILSTORE00000000000000";
const MODEL: &str = "01JFAILMODEL00000000000000";

/// A config where nothing flushes unless the test asks (or a revoke is
/// pending: revokes are flushed eagerly whatever the config says).
fn manual_flush(mut c: Config) -> Config {
    c.flush.batch_size = 1_000_000;
    c.flush.interval = Duration::from_secs(3600);
    c
}

/// A config where a failed request is not sent again at once: its chunk
/// gives up, and the flusher retries after a pause.
fn no_quick_retries(mut c: Config) -> Config {
    c.flush.request_retries = 0;
    c
}

/// A wiremock OpenFGA that serves the documents model (read at build) and
/// nothing else yet; tests mount their own write mocks.
async fn mock_openfga() -> MockServer {
    let server = MockServer::start().await;
    mount_model(&server).await;
    server
}

async fn mount_model(server: &MockServer) {
    let mut model = documents_model();
    model["id"] = json!(MODEL);
    Mock::given(method("GET"))
        .and(path(format!(
            "/stores/{STORE}/authorization-models/{MODEL}"
        )))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "authorization_model": model
        })))
        .mount(server)
        .await;
}

/// A config pointing at the mocked OpenFGA, with fast retries.
fn mock_config(server: &MockServer) -> Config {
    let mut c = Config::default();
    c.openfga.api_url = server.uri();
    c.openfga.api_token = Secret::new("mock-token");
    c.openfga.store_id = STORE.into();
    c.openfga.model_id = MODEL.into();
    c.openfga.request_timeout = Duration::from_secs(5);
    c.flush.retry_initial_backoff = Duration::from_millis(10);
    c.flush.retry_max_backoff = Duration::from_millis(100);
    c
}

fn write_path() -> String {
    format!("/stores/{STORE}/write")
}

/// A mock of the Write endpoint.
fn write_mock() -> wiremock::MockBuilder {
    Mock::given(method("POST")).and(path(write_path()))
}

/// A config pointing at a loopback port where nothing listens.
fn closed_port_config() -> Config {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut c = Config::default();
    c.openfga.api_url = format!("http://127.0.0.1:{port}");
    c.openfga.api_token = Secret::new("nobody-listens");
    c.openfga.store_id = STORE.into();
    c.openfga.model_id = MODEL.into();
    c.openfga.connect_timeout = Duration::from_millis(500);
    c.openfga.request_timeout = Duration::from_secs(1);
    c.flush.retry_initial_backoff = Duration::from_millis(10);
    c.flush.retry_max_backoff = Duration::from_millis(100);
    c
}

/// The Write requests a mock server received, in order of arrival.
async fn write_bodies(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .expect("request recording is on")
        .iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path() == write_path())
        .map(|r| serde_json::from_slice(&r.body).expect("write body is JSON"))
        .collect()
}

/// Waits for a condition no API call can await (a background retry ending),
/// polling, and fails the test with `what` after `limit`.
async fn eventually<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every acknowledged op is accounted for exactly once (promise 4), once
/// nothing is pending or in flight.
async fn assert_accounted(wb: &WriteBehind) {
    let s = wb.status().await.unwrap();
    assert_eq!(s.pending.total + s.pending.in_flight, 0, "{:?}", s.pending);
    let t = &s.totals;
    assert_eq!(
        t.acknowledged,
        t.applied + t.coalesced + t.dead_lettered + t.cleared,
        "every acknowledged op ends applied, coalesced, dead-lettered or cleared: {t:?}"
    );
}

/// A small seeded PRNG (xorshift64*); the seed is printed so a failure can be
/// replayed with `FGA_WB_TEST_SEED`.
struct Rng(u64);

impl Rng {
    fn from_env_or_random() -> Self {
        let seed = std::env::var("FGA_WB_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(0);
                h.finish()
            })
            | 1;
        eprintln!("seed: FGA_WB_TEST_SEED={seed}");
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

// ---------------------------------------------------------------------------
// Poison (promise 6) and dead letters (promise 4)
// ---------------------------------------------------------------------------

/// The three tuples OpenFGA refuses for the documents model, and the text its
/// message contains for each.
const POISON: [(&str, &str, &str, &str); 3] = [
    (
        "user:anne",
        "viewer",
        "planet:earth",
        "type 'planet' not found",
    ),
    (
        "user:anne",
        "reader",
        "document:poison",
        "relation 'document#reader' not found",
    ),
    (
        "user:anne",
        "parent",
        "document:poison",
        "type 'user' is not an allowed type restriction",
    ),
];

/// Grants `n` tuples of which the three `POISON` ones sit at spread-out
/// positions (so they fall in different 100-tuple chunks); returns the
/// valid ones as `object#relation@user`.
async fn grant_with_poison(wb: &WriteBehind, n: usize) -> BTreeSet<String> {
    let at = [n / 10, n / 2, n - 3];
    let mut valid = BTreeSet::new();
    let mut poison = POISON.iter();
    for i in 0..n {
        if at.contains(&i) {
            let (u, r, o, _) = poison.next().unwrap();
            wb.grant(u, r, o).await.unwrap();
        } else {
            let (u, r, o) = (format!("user:u{i}"), "viewer", format!("document:d{i}"));
            wb.grant(&u, r, &o).await.unwrap();
            valid.insert(format!("{o}#{r}@{u}"));
        }
    }
    assert_eq!(valid.len(), n - 3);
    valid
}

/// Poison (real server): 250 grants of which 3 are refused by OpenFGA
/// (unknown type, unknown relation, user type not allowed; local model
/// validation off so they reach the server) → one flush applies the 247
/// valid ones, and exactly the 3 bad ones are dead-lettered, each with the
/// server's own message and code.
#[tokio::test]
async fn poison_tuples_are_isolated_and_the_rest_applied() {
    let s = new_store("wb-poison").await;
    let wb = WriteBehind::builder(manual_flush(config_for(&s)))
        .validate_against_model(false)
        .build()
        .await
        .unwrap();
    let valid = grant_with_poison(&wb, 250).await;

    let report = wb.flush().await.unwrap();
    assert_eq!(report.applied, 247, "{report:?}");
    assert_eq!(report.dead_lettered, 3, "{report:?}");
    assert_eq!(report.error, None, "{report:?}");
    // Three chunks of at most 100, plus the bisection of the three bad ones.
    assert!(report.requests > 3, "{report:?}");

    let in_openfga: BTreeSet<String> = stored(&s).await.into_iter().collect();
    assert_eq!(in_openfga, valid, "exactly the valid tuples are in OpenFGA");

    let dead = wb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 3, "{dead:#?}");
    for (u, r, o, message) in POISON {
        let d = dead
            .iter()
            .find(|d| d.tuple.user == u && d.tuple.relation == r && d.tuple.object == o)
            .unwrap_or_else(|| panic!("{o}#{r}@{u} is not dead-lettered: {dead:#?}"));
        assert!(
            d.reason.contains(message),
            "dead letter for {o}#{r}@{u} should carry the server's message {message:?}: {:?}",
            d.reason
        );
        assert_eq!(d.code.as_deref(), Some("validation_error"), "{d:?}");
        assert_eq!(d.op, Op::Grant);
        assert!(d.attempts >= 1, "{d:?}");
    }
    let ids: BTreeSet<u64> = dead.iter().map(|d| d.id).collect();
    assert_eq!(ids.len(), 3, "dead-letter ids are distinct");

    let st = wb.status().await.unwrap();
    assert_eq!(st.totals.dead_lettered, 3);
    assert_eq!(st.totals.applied, 247);
    assert_eq!(st.totals.acknowledged, 250);
    assert_eq!(st.dead_letters, 3);
    assert_eq!(st.flushing_stopped, None);
    assert_accounted(&wb).await;
    assert_eq!(wb.shutdown().await.unwrap().left.total, 0);
}

/// A replay that cannot buffer its ops (the buffer is full) keeps the
/// letters it could not replay: none is lost.
#[tokio::test]
async fn a_replay_that_cannot_buffer_keeps_its_letters() {
    let s = new_store("wb-dlq-full").await;
    let mut c = manual_flush(config_for(&s));
    c.buffer.capacity = 20;
    let wb = WriteBehind::builder(c)
        .validate_against_model(false)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    grant_with_poison(&wb, 20).await;
    wb.flush().await.unwrap();
    assert_eq!(wb.dead_letters().await.unwrap().len(), 3);
    for i in 0..20 {
        wb.grant(&format!("user:fill{i}"), "viewer", "document:full")
            .await
            .unwrap();
    }
    let e = wb.replay_dead_letters(None).await.unwrap_err();
    assert!(e.is_buffer_full(), "{e}");
    assert_eq!(wb.dead_letters().await.unwrap().len(), 3, "no letter lost");
    assert_eq!(wb.pending().await.unwrap().total, 20);
}

/// Dead letters (real server): after a poison flush, replaying one dead
/// letter unchanged sends it again and it is dead again (with a new id, the
/// others untouched); replaying all does the same for all; purging one and
/// then all empties the list, and nothing valid is disturbed.
#[tokio::test]
async fn dead_letters_replay_and_purge() {
    let s = new_store("wb-dlq").await;
    let wb = WriteBehind::builder(manual_flush(config_for(&s)))
        .validate_against_model(false)
        .build()
        .await
        .unwrap();
    let valid = grant_with_poison(&wb, 20).await;
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.dead_lettered), (17, 3), "{r:?}");
    let dead = wb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 3);

    // Replay one: buffered again and flushed at once, refused again.
    let one = dead[0].clone();
    assert_eq!(
        wb.replay_dead_letters(Some(&[one.id]))
            .await
            .unwrap()
            .replayed,
        1
    );
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 0, "the replay flushed: {p:?}");
    let dead2 = wb.dead_letters().await.unwrap();
    assert_eq!(dead2.len(), 3);
    let again = dead2
        .iter()
        .find(|d| d.tuple == one.tuple)
        .expect("the replayed tuple is dead again");
    assert_ne!(again.id, one.id, "a new dead letter, with a new id");
    assert_eq!(again.reason, one.reason);
    for d in &dead[1..] {
        assert!(dead2.iter().any(|x| x.id == d.id), "{d:?} untouched");
    }

    // Replay an unknown id: an error naming it, nothing replayed.
    let e = wb.replay_dead_letters(Some(&[999_999])).await.unwrap_err();
    assert!(
        e.is_invalid_input() && e.to_string().contains("999999"),
        "{e}"
    );
    assert_eq!(wb.dead_letters().await.unwrap().len(), 3);

    // Replay all: refused again, all of them.
    assert_eq!(wb.replay_dead_letters(None).await.unwrap().replayed, 3);
    assert_eq!(wb.dead_letters().await.unwrap().len(), 3);
    assert_eq!(wb.status().await.unwrap().totals.dead_lettered, 7);

    // Purge one, then all.
    let first = wb.dead_letters().await.unwrap()[0].id;
    assert_eq!(wb.purge_dead_letters(Some(&[first])).await.unwrap(), 1);
    assert_eq!(wb.dead_letters().await.unwrap().len(), 2);
    assert_eq!(wb.purge_dead_letters(None).await.unwrap(), 2);
    assert!(wb.dead_letters().await.unwrap().is_empty());
    assert_eq!(wb.status().await.unwrap().dead_letters, 0);
    assert_eq!(wb.purge_dead_letters(None).await.unwrap(), 0);

    let in_openfga: BTreeSet<String> = stored(&s).await.into_iter().collect();
    assert_eq!(in_openfga, valid);
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 0, "{p:?}");
    wb.shutdown().await.unwrap();
}

// ---------------------------------------------------------------------------
// Sequence (promise 5)
// ---------------------------------------------------------------------------

/// Sequence (wiremock): a grant's Write is held in flight (the mock answers
/// it after 2 s) while a revoke of the same key is acknowledged. The revoke
/// is not sent alongside or before the held grant; once the grant's request
/// ends, the revoke goes out, so the last request touching the key is a
/// delete: the final state is revoked. Nothing is left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_racing_an_in_flight_grant_ends_revoked() {
    let server = mock_openfga().await;
    let (arrived, mut arrivals) = mpsc::unbounded_channel::<()>();
    let held = fixture("write-ok")
        .response()
        .set_delay(Duration::from_secs(2));
    write_mock()
        .respond_with(move |_: &Request| {
            let _ = arrived.send(());
            held.clone()
        })
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    write_mock()
        .respond_with(fixture("write-ok").response())
        .mount(&server)
        .await;

    let wb = WriteBehind::builder(manual_flush(mock_config(&server)))
        .build()
        .await
        .unwrap();
    let key = "document:1#editor@user:anne";
    wb.grant("user:anne", "editor", "document:1").await.unwrap();
    let flushing = tokio::spawn({
        let wb = wb.clone();
        async move { wb.flush().await }
    });
    tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
        .await
        .expect("the grant's write reached the mock")
        .unwrap();

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
        let u = users[rng.below(users.len() as u64) as usize];
        let o = objects[rng.below(objects.len() as u64) as usize];
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
            0 => tokio::time::sleep(Duration::from_millis(rng.below(20))).await,
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

// ---------------------------------------------------------------------------
// Transient errors and auth errors (promise 6)
// ---------------------------------------------------------------------------

/// Transient retry (wiremock): the Write answers 503 twice, then OK, and no
/// request is retried at once (`flush.request_retries = 0`). The ops stay
/// pending through the failures, the background flusher retries with
/// backoff on its own, and they end applied: `totals.retries >= 2`, nothing
/// dead-lettered, flushing not stopped.
#[tokio::test]
async fn transient_503_is_retried_until_applied() {
    for failure in ["unavailable-503", "server-error-500"] {
        let server = mock_openfga().await;
        write_mock()
            .respond_with(fixture(failure).response())
            .up_to_n_times(2)
            .with_priority(1)
            .mount(&server)
            .await;
        write_mock()
            .respond_with(fixture("write-ok").response())
            .mount(&server)
            .await;
        let wb = WriteBehind::builder(no_quick_retries(manual_flush(mock_config(&server))))
            .build()
            .await
            .unwrap();
        for i in 0..10 {
            wb.grant(&format!("user:u{i}"), "viewer", "document:1")
                .await
                .unwrap();
        }
        let first = wb.flush().await.unwrap();
        assert!(first.error.is_some(), "{failure}: {first:?}");
        assert_eq!(first.applied, 0, "{failure}: {first:?}");
        assert_eq!(first.dead_lettered, 0, "{failure}: {first:?}");
        let p = wb.pending().await.unwrap();
        assert_eq!(p.total + p.in_flight, 10, "{failure}: kept pending: {p:?}");
        assert_eq!(wb.status().await.unwrap().flushing_stopped, None);

        // No more flush() calls: the flusher retries on its own.
        eventually(
            "the background retry to apply everything",
            Duration::from_secs(30),
            || async { wb.status().await.unwrap().totals.applied == 10 },
        )
        .await;
        let st = wb.status().await.unwrap();
        assert!(st.totals.retries >= 2, "{failure}: {:?}", st.totals);
        assert_eq!(st.totals.dead_lettered, 0, "{failure}");
        assert_eq!(st.flushing_stopped, None, "{failure}");
        assert!(wb.dead_letters().await.unwrap().is_empty(), "{failure}");
        assert_eq!(write_bodies(&server).await.len(), 3, "{failure}");
        assert_accounted(&wb).await;
        wb.shutdown().await.unwrap();
    }
}

/// A transient failure is retried alone, at once (wiremock): of three
/// requests in flight, the first answers 503 once. The other two are not
/// held back, the failed one is sent again after a short backoff, and the
/// one `flush()` comes back with all 300 applied, no error, exactly one
/// retry counted and four Write requests, each tuple in exactly one
/// accepted request.
#[tokio::test]
async fn a_transient_failure_is_retried_alone_and_the_flush_completes() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(fixture("unavailable-503").response())
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    write_mock()
        .respond_with(fixture("write-ok").response())
        .mount(&server)
        .await;
    let wb = WriteBehind::builder(manual_flush(mock_config(&server)))
        .build()
        .await
        .unwrap();
    for i in 0..300 {
        wb.grant(&format!("user:u{i:03}"), "viewer", "document:1")
            .await
            .unwrap();
    }
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.dead_lettered), (300, 0), "{r:?}");
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!(r.requests, 4, "{r:?}");
    let st = wb.status().await.unwrap();
    assert_eq!(
        (st.totals.retries, st.totals.requests),
        (1, 4),
        "{:?}",
        st.totals
    );
    let bodies = write_bodies(&server).await;
    assert_eq!(bodies.len(), 4);
    // The first request got the 503; the other three were accepted.
    let mut accepted: Vec<String> = bodies[1..]
        .iter()
        .flat_map(|b| touched(b).into_iter().map(|(t, _)| t))
        .collect();
    accepted.sort();
    let all: Vec<String> = (0..300)
        .map(|i| format!("document:1#viewer@user:u{i:03}"))
        .collect();
    assert_eq!(accepted, all);
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// A hung Write (wiremock answers after 30 s) times out at
/// `openfga.request_timeout` and is retried like any transient error; the
/// ops end applied once the server answers again.
#[tokio::test]
async fn timed_out_write_is_retried() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(fixture("hung-write").response())
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    write_mock()
        .respond_with(fixture("write-ok").response())
        .mount(&server)
        .await;
    let mut cfg = no_quick_retries(manual_flush(mock_config(&server)));
    cfg.openfga.request_timeout = Duration::from_millis(300);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let first = wb.flush().await.unwrap();
    assert!(first.error.is_some(), "{first:?}");
    eventually("the retry to apply", Duration::from_secs(30), || async {
        wb.status().await.unwrap().totals.applied == 1
    })
    .await;
    assert!(wb.dead_letters().await.unwrap().is_empty());
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// 429 (wiremock): rate limited once, with `Retry-After: 3`, then OK, with
/// no immediate retries. The op stays pending, is retried, and ends applied;
/// nothing is dead-lettered.
#[tokio::test]
async fn rate_limited_429_is_retried_until_applied() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(fixture("rate-limited-429").response())
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    write_mock()
        .respond_with(fixture("write-ok").response())
        .mount(&server)
        .await;
    let wb = WriteBehind::builder(no_quick_retries(manual_flush(mock_config(&server))))
        .build()
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let first = wb.flush().await.unwrap();
    assert!(
        first.error.as_deref().is_some_and(|e| e.contains("429")),
        "{first:?}"
    );
    assert_eq!(wb.status().await.unwrap().flushing_stopped, None);
    eventually("the retry to apply", Duration::from_secs(30), || async {
        wb.status().await.unwrap().totals.applied == 1
    })
    .await;
    let st = wb.status().await.unwrap();
    assert_eq!(st.totals.dead_lettered, 0);
    assert!(st.totals.retries >= 1, "{:?}", st.totals);
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// 429 with `Retry-After: 3` (wiremock): the background retry does not come
/// back before the server said it may. Only a lower bound is checked (an
/// implementation that honours the header can never be faster than it), with
/// a retry backoff of 10 ms that would otherwise retry at once.
#[tokio::test]
async fn rate_limited_429_retry_after_is_honoured() {
    let server = mock_openfga().await;
    let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let log = arrivals.clone();
    let limited = fixture("rate-limited-429");
    let retry_after: u64 = limited
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, v)| v.parse().ok())
        .expect("the 429 fixture has a Retry-After in seconds");
    let limited = limited.response();
    let ok = fixture("write-ok").response();
    write_mock()
        .respond_with(move |_: &Request| {
            let mut log = log.lock().unwrap();
            log.push(Instant::now());
            if log.len() == 1 {
                limited.clone()
            } else {
                ok.clone()
            }
        })
        .mount(&server)
        .await;
    let wb = WriteBehind::builder(no_quick_retries(manual_flush(mock_config(&server))))
        .build()
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let first = wb.flush().await.unwrap();
    assert!(first.error.is_some(), "{first:?}");
    eventually("the retry to apply", Duration::from_secs(30), || async {
        wb.status().await.unwrap().totals.applied == 1
    })
    .await;
    let arrivals = arrivals.lock().unwrap().clone();
    assert!(arrivals.len() >= 2);
    let gap = arrivals[1] - arrivals[0];
    assert!(
        gap >= Duration::from_secs(retry_after),
        "the retry came {gap:?} after a 429 that said Retry-After: {retry_after}"
    );
    wb.shutdown().await.unwrap();
}

/// Auth stop (wiremock): the Write answers 401 (and, in a second round,
/// 403). `flush()` fails with that error, `status().flushing_stopped` says why,
/// every op stays pending, nothing is dead-lettered, and the background
/// flusher does not keep hammering the server; a check held up by a pending
/// revoke fails with the same error. Once the server accepts the
/// credentials again, a manual `flush()` applies everything and clears
/// `flushing_stopped`.
#[tokio::test]
async fn auth_error_stops_flushing_until_a_manual_flush_succeeds() {
    let forbidden = || {
        ResponseTemplate::new(403).set_body_json(json!({
            "code": "forbidden",
            "message": "the principal is not allowed to write"
        }))
    };
    for (name, refusal) in [
        ("401", fixture("auth-wrong-token").response()),
        ("403", forbidden()),
    ] {
        let server = mock_openfga().await;
        write_mock().respond_with(refusal).mount(&server).await;
        let mut cfg = mock_config(&server);
        cfg.flush.interval = Duration::from_millis(20);
        cfg.check.revoke_wait_timeout = Duration::from_millis(200);
        let wb = WriteBehind::builder(cfg).build().await.unwrap();
        for i in 0..5 {
            wb.grant(&format!("user:u{i}"), "viewer", "document:1")
                .await
                .unwrap();
        }
        // flush() fails with the server's refusal: nothing can be written.
        let err = wb.flush().await.unwrap_err();
        assert!(err.is_auth(), "{name}: {err}");
        assert!(err.to_string().contains(name), "{name}: {err}");
        let st = wb.status().await.unwrap();
        let why = st.flushing_stopped.clone();
        assert!(
            why.as_deref().is_some_and(|w| w.contains(name)),
            "{name}: flushing_stopped = {why:?}"
        );
        assert_eq!(st.pending.total + st.pending.in_flight, 5, "{name}");
        assert_eq!(st.totals.dead_lettered, 0, "{name}");
        assert!(wb.dead_letters().await.unwrap().is_empty(), "{name}");

        // Stopped means stopped: new ops and the interval timer do not make
        // the flusher try again. (A negative check: it needs a wait.)
        let before = write_bodies(&server).await.len();
        wb.grant("user:late", "viewer", "document:1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            write_bodies(&server).await.len(),
            before,
            "{name}: no automatic retry while flushing is stopped"
        );
        assert_eq!(wb.pending().await.unwrap().total, 6, "{name}");
        // A check held up by a pending revoke reports the real cause.
        wb.revoke("user:u0", "viewer", "document:1").await.unwrap();
        let err = wb
            .check("user:u0", "viewer", "document:1")
            .await
            .unwrap_err();
        assert!(err.is_auth(), "{name}: {err}");

        // The credentials are fixed.
        server.reset().await;
        mount_model(&server).await;
        write_mock()
            .respond_with(fixture("write-ok").response())
            .mount(&server)
            .await;
        let r = wb.flush().await.unwrap();
        assert_eq!(r.error, None, "{name}: {r:?}");
        assert_eq!(r.applied, 6, "{name}: {r:?}");
        let st = wb.status().await.unwrap();
        assert_eq!(st.flushing_stopped, None, "{name}");
        assert_eq!(st.totals.dead_lettered, 0, "{name}");
        assert_accounted(&wb).await;
        wb.shutdown().await.unwrap();
    }
}

// ---------------------------------------------------------------------------
// Overflow (promise 7)
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Clear (promise 4)
// ---------------------------------------------------------------------------

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
    let (arrived, mut arrivals) = mpsc::unbounded_channel::<()>();
    let held = fixture("write-ok")
        .response()
        .set_delay(Duration::from_secs(1));
    write_mock()
        .respond_with(move |_: &Request| {
            let _ = arrived.send(());
            held.clone()
        })
        .mount(&server)
        .await;
    let wb = WriteBehind::builder(manual_flush(mock_config(&server)))
        .build()
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let flushing = tokio::spawn({
        let wb = wb.clone();
        async move { wb.flush().await }
    });
    tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
        .await
        .expect("the write reached the mock")
        .unwrap();
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

// ---------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------

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

/// An OpenFGA started with a lower `--max-tuples-per-write` (10) than the
/// configured 100: the first refusal teaches the handle the server's limit,
/// the refused request goes out again as requests the server takes (no
/// bisection), later flushes cut chunks of 10, and status shows the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_lower_tuple_limit_is_learned_not_bisected() {
    let server = testenv::OpenFga::start(testenv::OpenFgaOptions {
        max_tuples_per_write: Some(10),
        ..Default::default()
    })
    .await
    .expect("an OpenFGA with --max-tuples-per-write 10");
    let client = fga_wb::openfga::Client::builder(server.url())
        .api_token(Secret::new(server.token().to_owned()))
        .build()
        .unwrap();
    let store_id = client.create_store("low-limit").await.unwrap();
    let model_id = client
        .write_authorization_model(&store_id, &support::documents_model())
        .await
        .unwrap();
    let mut c = Config::default();
    c.openfga.api_url = server.url();
    c.openfga.api_token = Secret::new(server.token().to_owned());
    c.openfga.store_id = store_id.clone();
    c.openfga.model_id = model_id;
    let wb = WriteBehind::builder(manual_flush(c)).build().await.unwrap();
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
