//! A wiremock OpenFGA for what a live server cannot be made to do on
//! demand (503, 429, a held response, a 401 for one request and not the
//! next: a live server refuses a wrong token every time, and the tests of
//! that run against it), with the documents model, and configs pointing at
//! it or at a closed port.

use std::time::Duration;

use fga_wb::openfga::Secret;
use fga_wb::Config;
use serde_json::Value;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// Store and model ids the mocked OpenFGA answers for.
pub const STORE: &str = "01JFAILSTORE00000000000000";
pub const MODEL: &str = "01JFAILMODEL00000000000000";

/// A config where nothing flushes unless the test asks (or a revoke is
/// pending: revokes are flushed eagerly whatever the config says).
pub fn manual_flush(mut c: Config) -> Config {
    c.flush.batch_size = 1_000_000;
    c.flush.interval = Duration::from_secs(3600);
    c
}

/// A config where a failed request is not sent again at once: its chunk
/// gives up, and the flusher retries after a pause.
pub fn no_quick_retries(mut c: Config) -> Config {
    c.flush.request_retries = 0;
    c
}

/// A wiremock OpenFGA that serves the documents model (read at build) and
/// nothing else yet; tests mount their own write mocks.
pub async fn mock_openfga() -> MockServer {
    let server = MockServer::start().await;
    mount_model(&server).await;
    server
}

pub async fn mount_model(server: &MockServer) {
    Mock::given(method("GET"))
        .and(path(format!(
            "/stores/{STORE}/authorization-models/{MODEL}"
        )))
        .respond_with(super::fixture("read-model").for_model(MODEL).response())
        .mount(server)
        .await;
}

/// A config for the mocked store at `url`, with fast retries.
fn config_at(url: String, token: &str) -> Config {
    let mut c = Config::default();
    c.openfga.api_url = url;
    c.openfga.api_token = Secret::new(token);
    c.openfga.store_id = STORE.into();
    c.openfga.model_id = MODEL.into();
    c.flush.retry_initial_backoff = Duration::from_millis(10);
    c.flush.retry_max_backoff = Duration::from_millis(100);
    c
}

/// A handle on the mocked OpenFGA that flushes only when told.
pub async fn manual_handle(server: &MockServer) -> fga_wb::WriteBehind {
    fga_wb::WriteBehind::builder(manual_flush(mock_config(server)))
        .build()
        .await
        .unwrap()
}

/// A config pointing at the mocked OpenFGA, with fast retries.
pub fn mock_config(server: &MockServer) -> Config {
    let mut c = config_at(server.uri(), "mock-token");
    c.openfga.request_timeout = Duration::from_secs(5);
    // A mock commits nothing late: a timed-out Write's hold (see
    // `last_write_wins.rs`, on the real server) need not last.
    c.flush.unknown_outcome_hold = Duration::from_secs(1);
    c
}

pub fn write_path() -> String {
    format!("/stores/{STORE}/write")
}

/// A mock of the Write endpoint.
pub fn write_mock() -> wiremock::MockBuilder {
    Mock::given(method("POST")).and(path(write_path()))
}

/// Write mocks: the first Write gets `first`, every later one OK.
pub async fn first_write_then_ok(server: &MockServer, first: ResponseTemplate) {
    writes_then_ok(server, [(first, 1)]).await;
}

/// Write mocks: the Writes get each answer in turn, as many times as it
/// says, then OK.
pub async fn writes_then_ok(
    server: &MockServer,
    answers: impl IntoIterator<Item = (ResponseTemplate, u64)>,
) {
    for (i, (answer, times)) in answers.into_iter().enumerate() {
        write_mock()
            .respond_with(answer)
            .up_to_n_times(times)
            .with_priority(u8::try_from(i + 1).expect("a few answers"))
            .mount(server)
            .await;
    }
    write_mock()
        .respond_with(super::fixture("write-ok").response())
        .mount(server)
        .await;
}

/// A Write mock that answers `response` (the first `times` Writes, ahead
/// of other Write mocks; `None`: every one) and reports each arrival, for
/// a test to act while the request is held.
pub async fn reporting_write(
    server: &MockServer,
    response: ResponseTemplate,
    times: Option<u64>,
) -> tokio::sync::mpsc::UnboundedReceiver<()> {
    let (arrived, arrivals) = tokio::sync::mpsc::unbounded_channel();
    let mut mock = write_mock()
        .respond_with(move |_: &wiremock::Request| {
            let _ = arrived.send(());
            response.clone()
        })
        .with_priority(1);
    if let Some(n) = times {
        mock = mock.up_to_n_times(n);
    }
    mock.mount(server).await;
    arrivals
}

/// Starts `wb.flush()` and returns once a Write of it reached the mock
/// (see [`reporting_write`]), with the flush still running.
pub async fn flush_until_a_write_arrives(
    wb: &fga_wb::WriteBehind,
    arrivals: &mut tokio::sync::mpsc::UnboundedReceiver<()>,
) -> tokio::task::JoinHandle<fga_wb::Result<fga_wb::FlushReport>> {
    let flushing = tokio::spawn({
        let wb = wb.clone();
        async move { wb.flush().await }
    });
    tokio::time::timeout(Duration::from_secs(10), arrivals.recv())
        .await
        .expect("a Write reached the mock")
        .expect("the mock is mounted");
    flushing
}

/// A config pointing at a loopback port where nothing listens.
pub fn closed_port_config() -> Config {
    let port = super::closed_port();
    let mut c = config_at(format!("http://127.0.0.1:{port}"), "nobody-listens");
    c.openfga.connect_timeout = Duration::from_millis(500);
    c.openfga.request_timeout = Duration::from_secs(1);
    c
}

/// The Write requests a mock server received, in order of arrival.
pub async fn write_bodies(server: &MockServer) -> Vec<Value> {
    server
        .received_requests()
        .await
        .expect("request recording is on")
        .iter()
        .filter(|r| r.method.as_str() == "POST" && r.url.path() == write_path())
        .map(|r| serde_json::from_slice(&r.body).expect("write body is JSON"))
        .collect()
}

/// A mocked OpenFGA whose Writes take 500 ms each, and a config for it
/// that writes one at a time and flushes only when told (revokes aside),
/// with the buffer in Redis under the key prefix `redis` names (`None`:
/// in memory).
pub async fn slow_writes(redis: Option<&str>) -> (MockServer, Config) {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(
            super::fixture("write-ok")
                .response()
                .set_delay(Duration::from_millis(500)),
        )
        .mount(&server)
        .await;
    let mut c = manual_flush(mock_config(&server));
    c.flush.max_parallel_requests = 1;
    c.flush.min_parallel_requests = 1;
    c.flush.shutdown_deadline = Duration::from_secs(1);
    if let Some(prefix) = redis {
        c.buffer.store = fga_wb::config::StoreKind::Redis;
        c.redis.url = super::redis_url();
        c.redis.key_prefix = format!("{prefix}-{}", std::process::id());
    }
    (server, c)
}

/// Grants `user:anne` viewer on `document:d0000` to `document:d4999`,
/// flushes them in the background, and returns once the first Write
/// arrived: the rest of the window (49 Writes, about 25 s on
/// `slow_writes`) is taken and not sent yet. One object each: no grant is
/// relevant to a check of another.
pub async fn window_under_way(
    wb: &fga_wb::WriteBehind,
    server: &MockServer,
) -> tokio::task::JoinHandle<fga_wb::Result<fga_wb::FlushReport>> {
    for i in 0..5000 {
        wb.grant("user:anne", "viewer", &format!("document:d{i:04}"))
            .await
            .unwrap();
    }
    let flushing = tokio::spawn({
        let wb = wb.clone();
        async move { wb.flush().await }
    });
    super::eventually(
        "the first Write of the window",
        Duration::from_secs(10),
        || async { !write_bodies(server).await.is_empty() },
    )
    .await;
    flushing
}

/// Grants fay viewer of document:5 under `non_expired` for an hour: the
/// grant `write-duplicate-different-condition` answers (OpenFGA held the
/// tuple with another context).
pub async fn grant_with_another_condition(wb: &fga_wb::WriteBehind) {
    let context = serde_json::json!({"grant_time": "2024-01-01T00:00:00Z", "grant_duration": "1h"});
    wb.grant_with_condition(
        "user:fay",
        "viewer",
        "document:5",
        "non_expired",
        Some(serde_json::from_value(context).unwrap()),
    )
    .await
    .unwrap();
}
