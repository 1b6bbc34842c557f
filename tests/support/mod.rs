//! Shared helpers for the integration tests: the real OpenFGA and Redis that
//! `scripts/test` starts, fresh stores, and wiremock fixtures captured from the
//! real server.
#![allow(dead_code, unused_macros)]

#[cfg(feature = "cli")]
pub mod cli;
pub mod logs;
pub mod mock;
pub mod own_openfga;

/// One multi-threaded `#[tokio::test]` per scenario and setup, in a module
/// per setup: `for_each_setup!([memory => Setup::Memory, redis =>
/// Setup::Redis] scenario_a, scenario_b)` makes `memory::scenario_a`, ...,
/// each calling `scenario_a(Setup::Memory).await`. Needs `#[macro_use] mod
/// support;`.
macro_rules! for_each_setup {
    ([$($module:ident => $setup:expr),* $(,)?] $($scenario:ident),* $(,)?) => {
        for_each_setup!(@all [$($scenario),*] $($module => $setup),*);
    };
    (@all $scenarios:tt $($module:ident => $setup:expr),*) => {
        $( for_each_setup!(@one $module, $setup, $scenarios); )*
    };
    (@one $module:ident, $setup:expr, [$($scenario:ident),*]) => {
        mod $module {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $scenario() { super::$scenario($setup).await })*
        }
    };
}

use std::path::PathBuf;
use std::time::Duration;

use fga_wb::openfga::{Client, Secret};
use serde_json::Value;

const HOW: &str = "run the tests with scripts/test, which installs and starts OpenFGA and Redis \
                   (or start them with scripts/servers and export what it prints)";

fn required_env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v,
        // Never a silent skip: a test that needs a server and has none fails.
        _ => panic!("{name} is not set: this test needs a real server; {HOW}"),
    }
}

/// The real OpenFGA's base URL.
pub fn openfga_url() -> String {
    required_env("FGA_WB_TEST_OPENFGA_URL")
}

/// The preshared key the real OpenFGA was started with.
pub fn openfga_token() -> String {
    required_env("FGA_WB_TEST_OPENFGA_TOKEN")
}

/// The real Redis's URL.
pub fn redis_url() -> String {
    required_env("FGA_WB_TEST_REDIS_URL")
}

/// Whether the test Redis is a Redis Cluster (`FGA_WB_TEST_REDIS_URL` names
/// its seed nodes, separated by commas).
pub fn redis_is_cluster() -> bool {
    redis_url().contains(',')
}

#[cfg(feature = "redis")]
/// A direct connection to the test Redis, one node or a cluster, for tests
/// that look at or tamper with fga-wb's keys.
#[derive(Clone)]
pub enum RedisConn {
    Node(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

#[cfg(feature = "redis")]
/// Connects to the test Redis.
pub async fn redis_conn() -> RedisConn {
    let url = redis_url();
    if redis_is_cluster() {
        let seeds: Vec<&str> = url.split(',').collect();
        let c = redis::cluster::ClusterClient::new(seeds)
            .expect("cluster client for the test Redis")
            .get_async_connection()
            .await
            .expect("connect to the test Redis Cluster");
        RedisConn::Cluster(c)
    } else {
        let c = redis::Client::open(url)
            .expect("client for the test Redis")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test Redis");
        RedisConn::Node(c)
    }
}

#[cfg(feature = "redis")]
impl redis::aio::ConnectionLike for RedisConn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            RedisConn::Node(c) => c.req_packed_command(cmd),
            RedisConn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            RedisConn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

#[cfg(feature = "redis")]
/// Which primary serves `key` (its port), and how many primaries there
/// are; on a single node, always (its port, 1).
pub async fn redis_owner(key: &str) -> (u16, usize) {
    let mut c = redis_conn().await;
    if !redis_is_cluster() {
        return (0, 1);
    }
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("CLUSTER KEYSLOT");
    let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(&mut c)
        .await
        .expect("CLUSTER SLOTS");
    let mut ports = std::collections::BTreeSet::new();
    let mut owner = None;
    for r in &ranges {
        let n = |i: usize| -> i64 { redis::from_redis_value_ref(&r[i]).expect("a number") };
        let node: Vec<redis::Value> = redis::from_redis_value_ref(&r[2]).expect("a node");
        let port: u16 = redis::from_redis_value_ref(&node[1]).expect("a port");
        ports.insert(port);
        if (n(0)..=n(1)).contains(&slot) {
            owner = Some(port);
        }
    }
    (owner.expect("every slot is served"), ports.len())
}

/// The `openfga` binary, for tests that run their own server.
pub fn openfga_bin() -> PathBuf {
    PathBuf::from(required_env("FGA_WB_TEST_OPENFGA_BIN"))
}

/// A client of the real OpenFGA with the right key.
pub fn client() -> Client {
    Server::Plain.client()
}

/// Which real OpenFGA a test uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// The shared one: memory datastore, caches off.
    Plain,
    /// OpenFGA on PostgreSQL with every cache on and a 60 s TTL, as
    /// production runs it (`openfga-pg` in `scripts/test`).
    Caching,
}

impl Server {
    pub fn url(self) -> String {
        match self {
            Server::Plain => openfga_url(),
            Server::Caching => required_env("FGA_WB_TEST_OPENFGA_PG_URL"),
        }
    }

    pub fn token(self) -> String {
        match self {
            Server::Plain => openfga_token(),
            Server::Caching => required_env("FGA_WB_TEST_OPENFGA_PG_TOKEN"),
        }
    }

    pub fn client(self) -> Client {
        Client::builder(self.url())
            .api_token(Secret::new(self.token()))
            .build()
            .expect("client for the test server")
    }
}

/// The test model: `models/documents.json`.
pub fn documents_model() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/documents.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("models/documents.json"))
        .expect("models/documents.json is JSON")
}

/// A fresh store with the documents model: every test gets its own, so tests
/// run in parallel without seeing each other's tuples.
pub struct TestStore {
    /// A client with the right key.
    pub client: Client,
    /// The new store's id.
    pub store_id: String,
    /// The documents model's id in it.
    pub model_id: String,
    /// The server it is on.
    pub server: Server,
}

/// Creates a store named after the test and writes the documents model to it.
pub async fn new_store(name: &str) -> TestStore {
    new_store_with(name, &documents_model()).await
}

/// A model from `models/`, by file name (`conditions.json`).
pub fn model(file: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(file);
    serde_json::from_str(&std::fs::read_to_string(&path).expect("a model file"))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Creates a store named after the test with `model`.
pub async fn new_store_with(name: &str, model: &Value) -> TestStore {
    new_store_on(Server::Plain, name, model).await
}

/// Creates a store named after the test with `model` on `server`.
pub async fn new_store_on(server: Server, name: &str, model: &Value) -> TestStore {
    let client = server.client();
    let store_id = client.create_store(name).await.expect("create store");
    let model_id = client
        .write_authorization_model(&store_id, model)
        .await
        .expect("write model");
    TestStore {
        client,
        store_id,
        model_id,
        server,
    }
}

/// A response body captured from the real server (or hand-written, where the
/// server cannot be made to send it), from `wiremock-fixtures/`.
pub struct Fixture {
    /// HTTP status.
    pub status: u16,
    /// Response headers.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Value,
    /// For a hung response: how long the mock delays.
    pub delay: Option<Duration>,
}

/// Loads `wiremock-fixtures/<name>.json`.
pub fn fixture(name: &str) -> Fixture {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("wiremock-fixtures")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; regenerate with scripts/capture-fixtures",
            path.display()
        )
    });
    let v: Value = serde_json::from_str(&text).expect("fixture is JSON");
    Fixture {
        status: v["status"].as_u64().expect("fixture status") as u16,
        headers: v["headers"]
            .as_object()
            .map(|h| {
                h.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        body: v["body"].clone(),
        delay: v["delay_ms"].as_u64().map(Duration::from_millis),
    }
}

impl Fixture {
    /// The captured model reads (`read-model`, `read-models`: the documents
    /// model) with the model given id `id`, the mock's, not the capture's.
    pub fn for_model(mut self, id: &str) -> Fixture {
        if let Some(m) = self.body.get_mut("authorization_model") {
            m["id"] = Value::from(id);
        }
        if let Some(models) = self
            .body
            .get_mut("authorization_models")
            .and_then(Value::as_array_mut)
        {
            for m in models {
                m["id"] = Value::from(id);
            }
        }
        self
    }

    /// A wiremock response that replays this fixture.
    pub fn response(&self) -> wiremock::ResponseTemplate {
        let mut r = wiremock::ResponseTemplate::new(self.status).set_body_json(&self.body);
        for (k, v) in &self.headers {
            r = r.insert_header(k.as_str(), v.as_str());
        }
        if let Some(d) = self.delay {
            r = r.set_delay(d);
        }
        r
    }
}

/// An OpenFGA of the test's own, a store on it and a config for that store.
pub struct OwnStore {
    /// Kept alive with the store; dropped, the server stops.
    pub server: testenv::OpenFga,
    pub client: Client,
    pub store_id: String,
    /// Pointing at the store and its model, otherwise the defaults.
    pub config: fga_wb::Config,
}

/// Starts an OpenFGA with `options` and creates a store named `name` with
/// `model` on it.
pub async fn own_store(options: testenv::OpenFgaOptions, name: &str, model: &Value) -> OwnStore {
    let server = testenv::OpenFga::start(options.clone())
        .await
        .unwrap_or_else(|e| panic!("start an OpenFGA with {options:?}: {e}"));
    let client = Client::builder(server.url())
        .api_token(Secret::new(server.token().to_owned()))
        .build()
        .expect("a client for the test's own OpenFGA");
    let store_id = client.create_store(name).await.expect("create store");
    let model_id = client
        .write_authorization_model(&store_id, model)
        .await
        .expect("write model");
    let mut config = fga_wb::Config::default();
    config.openfga.api_url = server.url();
    config.openfga.api_token = Secret::new(server.token().to_owned());
    config.openfga.store_id = store_id.clone();
    config.openfga.model_id = model_id;
    OwnStore {
        server,
        client,
        store_id,
        config,
    }
}

/// A config pointing at the real OpenFGA and `store`.
pub fn config_for(store: &TestStore) -> fga_wb::Config {
    let mut c = fga_wb::Config::default();
    c.openfga.api_url = store.server.url();
    c.openfga.api_token = Secret::new(store.server.token());
    c.openfga.store_id = store.store_id.clone();
    c.openfga.model_id = store.model_id.clone();
    c
}

/// Every tuple in the store, as sorted `object#relation@user` strings.
/// Grants `user:u<i>` viewer on `document:d<i % objects>` for every `i` in
/// `range`.
/// Grants users `u<i>` for `i` in `users` viewer on `doc`.
pub async fn grant_users(wb: &fga_wb::WriteBehind, doc: &str, users: std::ops::Range<usize>) {
    for i in users {
        wb.grant(&format!("user:u{i}"), "viewer", doc)
            .await
            .unwrap();
    }
}

pub async fn grant_spread(wb: &fga_wb::WriteBehind, range: std::ops::Range<usize>, objects: usize) {
    for i in range {
        wb.grant(
            &format!("user:u{i}"),
            "viewer",
            &format!("document:d{}", i % objects),
        )
        .await
        .unwrap();
    }
}

/// A loopback port where nothing listens (bound once, then let go).
pub fn closed_port() -> u16 {
    // Not a port the kernel hands out (`bind(0)`): a mock server of
    // another test could be listening on it by the time it is used.
    testenv::free_port().expect("a free loopback port")
}

/// Writes one tuple straight to OpenFGA, as another application would.
pub async fn write_to_openfga(store: &TestStore, user: &str, relation: &str, object: &str) {
    let t = fga_wb::TupleKey::new(user, relation, object).expect("a valid tuple");
    store
        .client
        .write(
            &store.store_id,
            &fga_wb::openfga::WriteRequest::idempotent(vec![t], vec![]),
        )
        .await
        .expect("write to OpenFGA");
}

pub async fn stored(store: &TestStore) -> Vec<String> {
    stored_in(&store.client, &store.store_id).await
}

/// Every tuple in `store_id` as `client` reads it, sorted.
pub async fn stored_in(client: &Client, store_id: &str) -> Vec<String> {
    let mut v: Vec<String> = client
        .read_all(store_id, &Default::default())
        .await
        .expect("read back")
        .iter()
        .map(ToString::to_string)
        .collect();
    v.sort();
    v
}

/// The tuples (`object#relation@user`) and ops one Write body carries.
pub fn touched(body: &serde_json::Value) -> Vec<(String, fga_wb::Op)> {
    let mut out = Vec::new();
    for (section, op) in [
        ("writes", fga_wb::Op::Grant),
        ("deletes", fga_wb::Op::Revoke),
    ] {
        if let Some(keys) = body[section]["tuple_keys"].as_array() {
            for k in keys {
                out.push((
                    format!(
                        "{}#{}@{}",
                        k["object"].as_str().unwrap_or_default(),
                        k["relation"].as_str().unwrap_or_default(),
                        k["user"].as_str().unwrap_or_default()
                    ),
                    op,
                ));
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(feature = "redis")]
/// An in-process `fga-wb worker`: `fga_wb::queue::worker::run` on a task,
/// stopped through its shutdown future. Dropping it (a failed test) aborts
/// the task.
pub struct Worker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<fga_wb::Result<()>>>,
}

#[cfg(feature = "redis")]
impl Worker {
    pub fn start(config: fga_wb::Config, concurrency: usize) -> Worker {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(fga_wb::queue::worker::run(config, concurrency, async {
            let _ = rx.await;
        }));
        Worker {
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Asks the worker to stop and waits until it has.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        match tokio::time::timeout(Duration::from_secs(20), task).await {
            Ok(r) => r.expect("worker task").expect("worker ended cleanly"),
            Err(_) => panic!("the worker did not stop within 20 s"),
        }
    }
}

#[cfg(feature = "redis")]
impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// `object#relation@user` into (user, relation, object). The user may
/// itself contain `#` (`group:eng#member`); the object never does, the
/// relation never has `@`.
pub fn parse(t: &str) -> (&str, &str, &str) {
    let (object, rest) = t.split_once('#').expect("object#relation@user");
    let (relation, user) = rest.split_once('@').expect("object#relation@user");
    (user, relation, object)
}

/// A valid tuple from `object#relation@user`.
pub fn tuple(t: &str) -> fga_wb::TupleKey {
    t.parse()
        .unwrap_or_else(|e| panic!("{t} is not a valid tuple: {e}"))
}

/// OpenFGA's own answer in `s` to `object#relation@user`, bypassing its caches.
pub async fn ground_truth(s: &TestStore, check: &str) -> bool {
    let (user, relation, object) = parse(check);
    let mut req = fga_wb::openfga::CheckRequest::new(user, relation, object);
    req.consistency = fga_wb::openfga::Consistency::HigherConsistency;
    req.authorization_model_id = Some(s.model_id.clone());
    s.client
        .check(&s.store_id, &req)
        .await
        .unwrap_or_else(|e| panic!("check {check} against OpenFGA: {e}"))
}

/// xorshift64*: deterministic, good enough to pick ops, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    /// Seeded from `FGA_WB_TEST_SEED`, or at random (the seed is printed so
    /// a failure can be replayed).
    pub fn from_env_or_random() -> Rng {
        use std::hash::{BuildHasher, Hasher};
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

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// Waits for a condition no API call can await (a background retry ending),
/// polling, and fails the test with `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: std::time::Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + limit;
    while !cond().await {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Every acknowledged op is accounted for exactly once (ARCHITECTURE.md, promise 4), once
/// nothing is pending or in flight.
pub async fn assert_accounted(wb: &fga_wb::WriteBehind) {
    let s = wb.status().await.unwrap();
    assert_eq!(s.pending.total + s.pending.in_flight, 0, "{:?}", s.pending);
    let t = &s.totals;
    assert_eq!(
        t.acknowledged,
        t.applied + t.coalesced + t.dead_lettered + t.cleared,
        "every acknowledged op ends applied, coalesced, dead-lettered or cleared: {t:?}"
    );
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: testenv::Signal) {
    if let Err(e) = testenv::signal(pid, sig) {
        panic!("{e}");
    }
}

/// Sends SIGTERM to `child` and collects its output; fails the test if it
/// has not ended `within` (a process that ignores the signal hangs its
/// operator's `kubectl delete` or CI job).
pub async fn terminate(
    child: tokio::process::Child,
    within: std::time::Duration,
) -> std::process::Output {
    let pid = child.id().expect("the child is running");
    signal(pid, testenv::Signal::Term);
    match tokio::time::timeout(within, child.wait_with_output()).await {
        Ok(out) => out.expect("its output"),
        Err(_) => panic!("process {pid} did not end within {within:?} of SIGTERM"),
    }
}
