//! Transient failures (503, 429 with and without Retry-After, timeouts, a
//! slow model read) are retried or waited for alone while the rest of the flush goes on; refused credentials
//! stop flushing, keep every op and are reported (ARCHITECTURE.md,
//! promises 4 and 6).
//!
//! Tests marked "real server" run against the OpenFGA that `scripts/test`
//! starts; the others put wiremock in its place, replaying responses captured
//! from the real server (`wiremock-fixtures/`), for what a healthy server
//! cannot be made to do on demand.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fga_wb::WriteBehind;
use serde_json::json;
use support::mock::*;
use support::{assert_accounted, eventually, fixture, touched};
use wiremock::{Request, ResponseTemplate};

/// Transient retry (wiremock): the Write answers 503 twice, then OK, and no
/// request is retried at once (`flush.request_retries = 0`). The ops stay
/// pending through the failures, the background flusher retries with
/// backoff on its own, and they end applied: `totals.retries >= 2`, nothing
/// dead-lettered, flushing not stopped. The same for OpenFGA's 500
/// `unavailable` (its server, so not split either), for a 500, and for a 400
/// that did not come from OpenFGA (a proxy's page, a gateway's JSON
/// without OpenFGA's error code): it says nothing about the tuples. Before,
/// such a 400 dead-lettered every op as refused, a revoke's letter letting
/// checks answer from what OpenFGA still held. (A 500 or a proxy's 400 may
/// also lie with the tuples: the request is split, and its halves may land
/// in the first flush.)
#[tokio::test]
async fn transient_503_is_retried_until_applied() {
    let proxy_page = ResponseTemplate::new(400).set_body_string(
        "<html><body><h1>400 Bad Request</h1>The plain HTTP request was sent to HTTPS port</body></html>",
    );
    let gateway =
        ResponseTemplate::new(400).set_body_json(json!({ "message": "request validation failed" }));
    // OpenFGA's own answer when its gRPC server is stopping or out of
    // reach (gRPC Unavailable, which it maps to 500 `unavailable`): the
    // server, not the tuples, so not split.
    let openfga_unavailable = ResponseTemplate::new(500).set_body_json(json!({
        "code": "unavailable",
        "message": "connection error: desc = \"transport is closing\""
    }));
    for (failure, response) in [
        ("unavailable-503", fixture("unavailable-503").response()),
        ("OpenFGA's 500 unavailable", openfga_unavailable),
        ("server-error-500", fixture("server-error-500").response()),
        ("a proxy's 400 page", proxy_page),
        ("a gateway's 400", gateway),
    ] {
        let server = mock_openfga().await;
        writes_then_ok(&server, [(response, 2)]).await;
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
        assert_eq!(first.dead_lettered, 0, "{failure}: {first:?}");
        let p = wb.pending().await.unwrap();
        let server_side = failure.contains("unavailable");
        if server_side {
            assert!(first.error.is_some(), "{failure}: {first:?}");
            assert_eq!(first.applied, 0, "{failure}: {first:?}");
            assert_eq!(p.total + p.in_flight, 10, "{failure}: kept pending: {p:?}");
        } else {
            // May lie with the tuples: split in halves, sent once each, and
            // the half that lands shows the server works (see poison.rs).
            assert_eq!(
                first.applied as usize + p.total + p.in_flight,
                10,
                "{failure}: applied or kept pending: {first:?} {p:?}"
            );
        }
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
        if server_side {
            // Whole each time: two failures, then one that lands.
            assert_eq!(write_bodies(&server).await.len(), 3, "{failure}");
        }
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
    first_write_then_ok(&server, fixture("unavailable-503").response()).await;
    let wb = manual_handle(&server).await;
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
    first_write_then_ok(&server, fixture("hung-write").response()).await;
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

/// While a timed-out Write's ops wait out their hold (10 min here), the
/// flusher goes on with other ops: a grant due by age and an eager revoke
/// on other tuples are applied, with the held op still in flight. Before,
/// the hold kept the flusher from looking at new ops until it ended.
#[tokio::test]
async fn a_hold_does_not_hold_up_other_ops() {
    let server = mock_openfga().await;
    first_write_then_ok(&server, fixture("hung-write").response()).await;
    let mut cfg = no_quick_retries(mock_config(&server));
    cfg.openfga.request_timeout = Duration::from_millis(300);
    cfg.flush.interval = Duration::from_millis(50);
    cfg.flush.unknown_outcome_hold = Duration::from_secs(600);
    cfg.flush.shutdown_deadline = Duration::from_secs(1);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:held", "viewer", "document:1").await.unwrap();
    let held = || async {
        let p = wb.pending().await.unwrap();
        (p.total, p.in_flight) == (0, 1)
    };
    eventually(
        "the timed-out op to be held",
        Duration::from_secs(10),
        || async { held().await && write_bodies(&server).await.len() == 1 },
    )
    .await;
    // Past the flusher's look that found nothing else pending; watched
    // through the server alone from here (asking the handle wakes its
    // flusher).
    tokio::time::sleep(Duration::from_millis(200)).await;
    wb.grant("user:next", "viewer", "document:2").await.unwrap();
    eventually(
        "the grant to be written",
        Duration::from_secs(10),
        || async { write_bodies(&server).await.len() == 2 },
    )
    .await;
    wb.revoke("user:gone", "viewer", "document:3")
        .await
        .unwrap();
    eventually(
        "the revoke to be written",
        Duration::from_secs(10),
        || async { write_bodies(&server).await.len() == 3 },
    )
    .await;
    // The revoke's chunk records its outcome after its request ends.
    eventually("only the held op in flight", Duration::from_secs(10), held).await;
    wb.shutdown().await.unwrap();
}

/// 429 (wiremock): rate limited once, with `Retry-After: 3`, then OK, with
/// no immediate retries. The op stays pending, is retried, and ends applied;
/// nothing is dead-lettered.
#[tokio::test]
async fn rate_limited_429_is_retried_until_applied() {
    let server = mock_openfga().await;
    first_write_then_ok(&server, fixture("rate-limited-429").response()).await;
    let wb = anne_granted(&server).await;
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
    let limited = limited_once(&server).await;
    let wb = anne_granted(&server).await;
    let first = wb.flush().await.unwrap();
    assert!(first.error.is_some(), "{first:?}");
    eventually("the retry to apply", Duration::from_secs(30), || async {
        wb.status().await.unwrap().totals.applied == 1
    })
    .await;
    limited.assert_honoured();
    wb.shutdown().await.unwrap();
}

/// A flush during shutdown keeps a pause OpenFGA asked for (429 with
/// Retry-After): nothing goes out before it ends. Before, the shutdown kept
/// the pause, and a `flush()` meanwhile (or a check's, or a caller's waiting
/// for room) cleared it: the Write went out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_during_shutdown_keeps_the_pause_openfga_asked_for() {
    let server = mock_openfga().await;
    let limited = limited_once(&server).await;
    let wb = anne_granted(&server).await;
    let first = wb.flush().await.unwrap();
    assert!(first.error.is_some(), "{first:?}");
    let shutdown = tokio::spawn({
        let wb = wb.clone();
        async move { wb.shutdown().await }
    });
    // Until one lands in the shutdown: before it, each is answered at once
    // with the pause.
    while !shutdown.is_finished() {
        let _ = wb.flush().await;
        tokio::task::yield_now().await;
    }
    let r = shutdown.await.unwrap().unwrap();
    assert_eq!(r.flushed.applied, 1, "{r:?}");
    limited.assert_honoured();
}

/// The Writes a mock answered 429 first (the fixture's Retry-After), then
/// OK, with when each arrived.
struct LimitedOnce {
    arrivals: Arc<Mutex<Vec<Instant>>>,
    retry_after: u64,
}

impl LimitedOnce {
    /// The second Write came no sooner than the 429 said it may. Only a
    /// lower bound (an implementation that honours the header can never be
    /// faster than it), with a retry backoff of 10 ms that would otherwise
    /// retry at once.
    fn assert_honoured(&self) {
        let arrivals = self.arrivals.lock().unwrap().clone();
        assert!(arrivals.len() >= 2, "{arrivals:?}");
        let gap = arrivals[1] - arrivals[0];
        assert!(
            gap >= Duration::from_secs(self.retry_after),
            "the retry came {gap:?} after a 429 that said Retry-After: {}",
            self.retry_after
        );
    }
}

async fn limited_once(server: &wiremock::MockServer) -> LimitedOnce {
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
        .mount(server)
        .await;
    LimitedOnce {
        arrivals,
        retry_after,
    }
}

/// Auth stop (wiremock): the Write answers 401 (and, in later rounds, 403,
/// and a redirect, which is not OpenFGA's answer). `flush()` fails with that error, `status().flushing_stopped` says why,
/// every op stays pending, nothing is dead-lettered, and the background
/// flusher does not keep hammering the server; a check held up by a pending
/// revoke fails with the same error. Once the server accepts the
/// credentials again, a manual `flush()` applies everything and clears
/// `flushing_stopped`.
#[tokio::test]
async fn auth_error_stops_flushing_until_a_manual_flush_or_shutdown_succeeds() {
    let forbidden = || {
        ResponseTemplate::new(403).set_body_json(json!({
            "code": "forbidden",
            "message": "the principal is not allowed to write"
        }))
    };
    // An answer that is not OpenFGA's (a redirect: an auth proxy's login
    // page) is the address's to fix, as refused credentials are: it was
    // taken for an unknown outcome, and every chunk was held and sent again.
    let redirect =
        || ResponseTemplate::new(302).insert_header("location", "https://sso.example/login");
    for (name, refusal) in [
        ("401", fixture("auth-wrong-token").response()),
        ("403", forbidden()),
        ("302", redirect()),
    ] {
        let stopped = |e: &fga_wb::Error| match name {
            "302" => e.is_misdirected(),
            _ => e.is_auth(),
        };
        let server = mock_openfga().await;
        write_mock().respond_with(refusal).mount(&server).await;
        let mut cfg = mock_config(&server);
        cfg.flush.interval = Duration::from_millis(20);
        cfg.check.revoke_wait_timeout = Duration::from_millis(200);
        // The flusher's own next look: after the test.
        cfg.flush.retry_max_backoff = Duration::from_secs(600);
        let wb = WriteBehind::builder(cfg).build().await.unwrap();
        for i in 0..5 {
            wb.grant(&format!("user:u{i}"), "viewer", "document:1")
                .await
                .unwrap();
        }
        // flush() fails with the server's refusal: nothing can be written.
        let err = wb.flush().await.unwrap_err();
        assert!(stopped(&err), "{name}: {err}");
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
        // the flusher try again before its look (`flush.retry_max_backoff`).
        // (A negative check: it needs a wait.)
        let before = write_bodies(&server).await.len();
        wb.grant("user:late", "viewer", "document:1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            write_bodies(&server).await.len(),
            before,
            "{name}: no automatic retry while flushing is stopped"
        );
        let p = wb.pending().await.unwrap();
        assert_eq!(p.total + p.in_flight, 6, "{name}: every op kept: {p:?}");
        // A check held up by a pending revoke reports the real cause.
        wb.revoke("user:u0", "viewer", "document:1").await.unwrap();
        let err = wb
            .check("user:u0", "viewer", "document:1")
            .await
            .unwrap_err();
        assert!(stopped(&err), "{name}: {err}");

        // The credentials (or the address) are fixed.
        server.reset().await;
        mount_model(&server).await;
        write_mock()
            .respond_with(fixture("write-ok").response())
            .mount(&server)
            .await;
        if name == "403" {
            // A shutdown tries again too, as a flush does (it gave up at
            // once, and with the memory store the ops were lost).
            let r = wb.shutdown().await.unwrap();
            assert_eq!((r.flushed.applied, &r.flushed.error), (6, &None), "{r:?}");
            assert_eq!(r.left.total + r.left.in_flight, 0, "{r:?}");
            continue;
        }
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

/// Refused credentials fixed on the server's side (wiremock: the first
/// Write answers 401, the rest 200), an OAuth2 token that works again, or a
/// key rotated back: the stopped flusher asks OpenFGA again by itself after
/// `flush.retry_max_backoff`, applies the op without a `flush()`, and
/// clears `flushing_stopped`. Before, only a `flush()` or a restart did.
#[tokio::test]
async fn flushing_stopped_by_a_401_asks_again_by_itself() {
    let server = mock_openfga().await;
    first_write_then_ok(&server, fixture("auth-wrong-token").response()).await;
    let mut cfg = mock_config(&server);
    cfg.flush.interval = Duration::from_millis(20);
    // Long enough for the test to see the stop before the look ends it.
    cfg.flush.retry_max_backoff = Duration::from_secs(2);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    eventually(
        "flushing to stop on the 401",
        Duration::from_secs(10),
        || async { wb.status().await.unwrap().flushing_stopped.is_some() },
    )
    .await;
    eventually(
        "the op to be applied without a flush()",
        Duration::from_secs(10),
        || async { wb.status().await.unwrap().totals.applied == 1 },
    )
    .await;
    let st = wb.status().await.unwrap();
    assert_eq!(st.flushing_stopped, None, "{st:?}");
    assert_eq!(write_bodies(&server).await.len(), 2);
    wb.shutdown().await.unwrap();
}

/// A slow model read (wiremock): checks pinned at once to a model the
/// handle has not read yet wait for one read of it, instead of each
/// reading it (a burst of pinned checks was a burst of model reads).
#[tokio::test]
async fn checks_pinned_to_an_unread_model_read_it_once() {
    let read = fixture("read-model").for_model(PINNED).response();
    let (wb, server) = pinned_model_served_as(read, 1).await;
    let answers = eight_pinned_checks(&wb).await;
    assert!(answers.iter().all(|a| matches!(a, Ok(true))), "{answers:?}");
    server.verify().await;
}

/// The same read failing: the checks waiting for it share its failure
/// (each took its turn to read again, one timeout after another), and the
/// next check reads again.
#[tokio::test]
async fn checks_pinned_to_a_model_that_fails_to_read_share_the_failure() {
    let (wb, server) = pinned_model_served_as(fixture("model-not-found").response(), 2).await;
    let answers = eight_pinned_checks(&wb).await;
    assert!(answers.iter().all(Result::is_err), "{answers:?}");
    assert!(eight_pinned_checks(&wb).await[0].is_err());
    server.verify().await;
}

const PINNED: &str = "01JPINNEDMODEL000000000000";

/// A manual handle on a wiremock OpenFGA whose checks answer `allowed` and
/// which serves model `PINNED` as `read` (held 300 ms), expecting `reads`.
async fn pinned_model_served_as(
    read: ResponseTemplate,
    reads: u64,
) -> (WriteBehind, wiremock::MockServer) {
    let server = mock_openfga().await;
    wiremock::Mock::given(wiremock::matchers::method("GET"))
        .and(wiremock::matchers::path(format!(
            "/stores/{STORE}/authorization-models/{PINNED}"
        )))
        .respond_with(read.set_delay(Duration::from_millis(300)))
        .expect(reads)
        .mount(&server)
        .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path(format!("/stores/{STORE}/check")))
        .respond_with(fixture("check-allowed").response())
        .mount(&server)
        .await;
    (manual_handle(&server).await, server)
}

/// Eight checks at once, pinned to `PINNED`.
async fn eight_pinned_checks(wb: &WriteBehind) -> Vec<fga_wb::Result<bool>> {
    let mut req = fga_wb::openfga::CheckRequest::new("user:anne", "viewer", "document:1");
    req.authorization_model_id = Some(PINNED.into());
    futures::future::join_all((0..8).map(|_| wb.check_request(&req))).await
}

/// An outage (wiremock: every Write answers 503): the ops taken for the
/// next requests go back to pending while the flusher waits to retry, so
/// `status` shows them pending, not being written, and `clear` drops them
/// all. They stayed "in flight" through the outage, and a clear left them
/// to be written once OpenFGA was back.
#[tokio::test]
async fn an_outage_leaves_no_op_taken_while_the_flusher_waits() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(fixture("unavailable-503").response())
        .mount(&server)
        .await;
    let mut cfg = no_quick_retries(manual_flush(mock_config(&server)));
    cfg.flush.retry_initial_backoff = Duration::from_secs(60);
    cfg.flush.retry_max_backoff = Duration::from_secs(60);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    const N: usize = 5_000;
    for i in 0..N {
        wb.grant(&format!("user:u{i:05}"), "viewer", "document:1")
            .await
            .unwrap();
    }
    let r = wb.flush().await.unwrap();
    assert!(r.error.is_some(), "{r:?}");
    eventually("no op in flight", Duration::from_secs(10), || async {
        wb.pending().await.unwrap().in_flight == 0
    })
    .await;
    assert_eq!(wb.pending().await.unwrap().total, N);
    assert_eq!(wb.clear().await.unwrap(), N);
}

/// A 429 whose `Retry-After` is longer than a quick retry waits (60 s here,
/// with the default quick retries on): the flush returns with the error at
/// once, and the op is pending again (not held in flight by a sleeping
/// request) until the pump's pause ends. Before, each quick retry slept the
/// whole minute with the op in flight, and flush() did not return for
/// three minutes.
#[tokio::test]
async fn a_long_retry_after_does_not_hold_ops_in_flight() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(
            fixture("rate-limited-429")
                .response()
                .insert_header("Retry-After", "60"),
        )
        .mount(&server)
        .await;
    let wb = manual_handle(&server).await;
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(30), wb.flush())
        .await
        .expect("flush() returns, not after the quick retries' minutes")
        .unwrap();
    assert!(first.error.is_some(), "{first:?}");
    assert_eq!(write_bodies(&server).await.len(), 1);
    eventually(
        "the op to be pending again",
        Duration::from_secs(10),
        || async {
            let p = wb.pending().await.unwrap();
            (p.total, p.in_flight) == (1, 0)
        },
    )
    .await;
    assert_eq!(wb.status().await.unwrap().totals.dead_lettered, 0);
}

/// OpenFGA unreachable when the application starts (wiremock: the model
/// read answers 503), with the model id pinned: the handle starts without
/// the model and says so in `health()`, and once OpenFGA answers it reads
/// the model, on demand (`refresh_model()`) or on its own (every
/// `openfga.model_refresh`, 100 ms here); from then on grants are validated
/// against it. Before, a pinned model that failed to read at start was
/// never read again (`refresh_model()` saw its id and returned), and
/// nothing was validated for the handle's whole life.
#[tokio::test]
async fn a_pinned_model_unreadable_at_start_is_read_once_openfga_answers() {
    use wiremock::matchers::{method, path};
    let unread = |h: &fga_wb::Health| {
        h.warnings
            .iter()
            .any(|w| w.contains("no authorization model read yet"))
    };
    for on_demand in [true, false] {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(method("GET"))
            .and(path(format!(
                "/stores/{STORE}/authorization-models/{MODEL}"
            )))
            .respond_with(fixture("unavailable-503").response())
            .mount(&server)
            .await;
        let mut cfg = manual_flush(mock_config(&server));
        cfg.openfga.model_refresh = match on_demand {
            true => Duration::ZERO,
            false => Duration::from_millis(100),
        };
        let wb = WriteBehind::builder(cfg).build().await.unwrap();
        assert!(
            unread(&wb.health().await.unwrap()),
            "on demand: {on_demand}"
        );
        server.reset().await;
        mount_model(&server).await;
        if on_demand {
            assert_eq!(wb.refresh_model().await.unwrap().as_deref(), Some(MODEL));
        } else {
            eventually("the model read again", Duration::from_secs(10), || async {
                !unread(&wb.health().await.unwrap())
            })
            .await;
        }
        assert!(
            !unread(&wb.health().await.unwrap()),
            "on demand: {on_demand}"
        );
        let e = wb
            .grant("user:anne", "no_such_relation", "document:1")
            .await
            .unwrap_err();
        assert!(e.is_invalid_input(), "on demand: {on_demand}: {e}");
        wb.shutdown().await.unwrap();
    }
}

/// `flush()` called again during a pause OpenFGA asked for (every Write
/// answers 429 with `Retry-After: 30`) sends nothing and holds nobody: it
/// returns at once with the error, saying so, and the op stays pending.
/// Before, every call sent a Write at once, so a caller flushing in a loop
/// (`fga-wb flush --wait` looks every 250 ms) kept hitting a server that
/// asked it to wait.
#[tokio::test]
async fn flushing_again_during_a_retry_after_sends_nothing() {
    let server = mock_openfga().await;
    let writes = asking_for_a_pause(&server).await;
    let wb = anne_granted(&server).await;
    let r = wb.flush().await.unwrap();
    assert!(r.error.is_some(), "{r:?}");
    for _ in 0..3 {
        let r = wb.flush().await.unwrap();
        let e = r.error.unwrap_or_default();
        assert!(e.contains("Retry-After"), "{e}");
    }
    let mut writes = writes;
    let mut n = 0;
    while writes.try_recv().is_ok() {
        n += 1;
    }
    assert_eq!(n, 1, "one Write, then none until the pause ends");
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 1, "{p:?}");
}

/// A shutdown during a pause OpenFGA asked for (`Retry-After: 30`, past
/// the 1 s deadline) sends no more Writes, whether the pause began before
/// it (a flush met it) or during it: it ends at its deadline and reports
/// the op left. Before, shutdown cut every pause to 200 ms and ignored the
/// server's, sending a Write five times a second.
#[tokio::test]
async fn shutdown_keeps_a_pause_openfga_asked_for() {
    for flushed_first in [false, true] {
        let server = mock_openfga().await;
        let mut writes = asking_for_a_pause(&server).await;
        let mut c = no_quick_retries(manual_flush(mock_config(&server)));
        c.flush.shutdown_deadline = Duration::from_secs(1);
        let wb = WriteBehind::builder(c).build().await.unwrap();
        wb.grant("user:anne", "viewer", "document:1").await.unwrap();
        if flushed_first {
            assert!(wb.flush().await.unwrap().error.is_some());
        }
        let report = wb.shutdown().await.unwrap();
        assert_eq!(report.left.total + report.left.in_flight, 1, "{report:?}");
        let mut n = 0;
        while writes.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, 1, "flushed first: {flushed_first}: one Write, then none");
    }
}

/// Every Write answers 429 with `Retry-After: 30`; reports each arrival.
async fn asking_for_a_pause(
    server: &wiremock::MockServer,
) -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let pause = fixture("rate-limited-429")
        .response()
        .insert_header("Retry-After", "30");
    reporting_write(server, pause, None).await
}

/// A handle on the mocked `server` that flushes only when told and sends
/// no request twice, with anne's viewer grant on document:1 pending.
async fn anne_granted(server: &wiremock::MockServer) -> WriteBehind {
    let wb = WriteBehind::builder(no_quick_retries(manual_flush(mock_config(server))))
        .build()
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    wb
}

/// A check that more pending grants are relevant to than one request can
/// carry (200 group memberships) flushes once to make room, but waits for
/// that flush no longer than `check.revoke_wait_timeout` (300 ms here):
/// with every Write taking 3 s it fails, saying to flush first. Before, it
/// waited for the whole flush (in a shared store, everyone's backlog), and
/// answered 3 s later.
#[tokio::test]
async fn a_check_waits_for_room_no_longer_than_its_timeout() {
    use wiremock::matchers::{method, path};
    let server = mock_openfga().await;
    write_mock()
        .respond_with(
            fixture("write-ok")
                .response()
                .set_delay(Duration::from_secs(3)),
        )
        .mount(&server)
        .await;
    wiremock::Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/check")))
        .respond_with(fixture("check-allowed").response())
        .mount(&server)
        .await;
    let mut cfg = manual_flush(mock_config(&server));
    cfg.check.revoke_wait_timeout = Duration::from_millis(300);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    for i in 0..200 {
        wb.grant(&format!("user:u{i}"), "member", "group:eng")
            .await
            .unwrap();
    }
    let e = wb
        .check("user:anne", "viewer", "document:1")
        .await
        .expect_err("answered only after the Writes ended");
    assert!(e.to_string().contains("flush first"), "{e}");
}

/// A chunk failing does not end a `flush()` that waits only for older ops
/// (wiremock, one tuple a request): `flush_up_to` a mark before user:b's
/// grant waits for user:a's slow Write and returns with it applied and no
/// error, while user:b's request fails with a 503. Before, every waiting
/// flush was answered with the other chunk's error, user:a's op still in
/// flight.
#[tokio::test]
async fn another_chunks_failure_does_not_end_a_flush_of_older_ops() {
    let server = mock_openfga().await;
    write_mock()
        .and(wiremock::matchers::body_string_contains("user:b"))
        .respond_with(fixture("unavailable-503").response())
        .with_priority(1)
        .mount(&server)
        .await;
    write_mock()
        .respond_with(
            fixture("write-ok")
                .response()
                .set_delay(Duration::from_millis(500)),
        )
        .mount(&server)
        .await;
    let mut c = no_quick_retries(manual_flush(mock_config(&server)));
    c.flush.max_tuples_per_write = 1;
    let wb = WriteBehind::builder(c).build().await.unwrap();
    wb.grant("user:a", "viewer", "document:1").await.unwrap();
    let mark = wb.last_acknowledged().await.unwrap();
    wb.grant("user:b", "viewer", "document:2").await.unwrap();
    let older = tokio::spawn({
        let wb = wb.clone();
        async move { wb.flush_up_to(mark).await }
    });
    let all = wb.flush().await.unwrap();
    assert!(all.error.is_some(), "user:b's Write failed: {all:?}");
    let older = older.await.unwrap().unwrap();
    assert_eq!(
        (older.applied, older.error.as_deref()),
        (1, None),
        "{older:?}"
    );
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 1, "user:b's grant stays: {p:?}");
    wb.clear().await.unwrap();
}

/// A request's quick retries after write conflicts and after other
/// transient failures are counted apart (wiremock): three 409 conflicts of
/// concurrent inserts (OpenFGA's `Aborted`, retried), then a 503, then OK.
/// The 503 still has its retries (`flush.request_retries` = 3), and the one
/// flush applies the op. Before, the conflicts used them up, and the op
/// went back to pending with the 503 as the flush's error.
#[tokio::test]
async fn conflicts_do_not_use_up_the_retries_of_other_failures() {
    let server = mock_openfga().await;
    // The captured 409 of a tuple with another condition, as OpenFGA
    // words a conflict between concurrent first inserts instead.
    let conflict = ResponseTemplate::new(409).set_body_json(json!({
        "code": "Aborted",
        "message": "transactional write failed due to conflict"
    }));
    writes_then_ok(
        &server,
        [(conflict, 3), (fixture("unavailable-503").response(), 1)],
    )
    .await;
    let wb = manual_handle(&server).await;
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.requests), (1, 5), "{r:?}");
    assert_eq!(r.error, None, "{r:?}");
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// A Write that never left the process (nothing listens on OpenFGA's port:
/// no connection was made) is no request, nor a retry of one: the flush's
/// report and `status` count requests sent (the metric counts where they
/// do). Before, each attempt counted as a request that failed, and as a
/// retry.
#[tokio::test]
async fn a_write_never_sent_is_no_request() {
    let wb = WriteBehind::builder(manual_flush(closed_port_config()))
        .build()
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let r = wb.flush().await.unwrap();
    assert!(r.error.is_some(), "{r:?}");
    assert_eq!((r.applied, r.requests, r.retried), (0, 0, 1), "{r:?}");
    let t = wb.status().await.unwrap().totals;
    assert_eq!((t.requests, t.retries), (0, 0), "{t:?}");
    wb.close().await.unwrap();
}
