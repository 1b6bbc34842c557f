//! Test doubles for an application's own tests (feature `test-util`): a
//! fake OpenFGA that runs in the test process, and a fake job queue.
//!
//! The fake OpenFGA is a small HTTP server on loopback that speaks the part
//! of OpenFGA's API fga-wb uses, so the handle under test runs its real
//! code: model validation, buffering, coalescing, flushing, checks with
//! pending grants as contextual tuples. It holds tuples in memory and
//! answers a check `allowed` when the tuple itself is stored or sent as a
//! contextual tuple; anything else (derived relations, usersets,
//! conditions) is answered as scripted with [`FakeOpenFga::answer`], and
//! `false` otherwise. Reads refuse the filters OpenFGA refuses (it wants an
//! object type, and an object id or a user); ListObjects and ListUsers name
//! the objects and users of stored and contextual tuples of the relation
//! itself. Conditions are not kept: a flushed conditional tuple reads back
//! without its condition, and lists take it as unconditional. It is a
//! double for *your* code's use of fga-wb, not a model evaluator: test
//! authorization models against a real OpenFGA.
//!
//! ```
//! # async fn example() {
//! use fga_wb::testing::FakeOpenFga;
//!
//! let model = serde_json::json!({
//!     "schema_version": "1.1",
//!     "type_definitions": [
//!         { "type": "user" },
//!         { "type": "document", "relations": { "viewer": { "this": {} } },
//!           "metadata": { "relations": { "viewer": {
//!               "directly_related_user_types": [{ "type": "user" }] } } } }
//!     ]
//! });
//! let fga = FakeOpenFga::start(model).await.unwrap();
//! let wb = fga.write_behind().await.unwrap();
//!
//! // The code under test:
//! wb.grant("user:anne", "viewer", "document:plan").await.unwrap();
//! assert!(wb.check("user:anne", "viewer", "document:plan").await.unwrap());
//!
//! fga.assert_granted(&wb, "user:anne", "viewer", "document:plan").await;
//! fga.assert_checked("user:anne", "viewer", "document:plan");
//! fga_wb::testing::assert_nothing_pending(&wb).await;
//! # }
//! ```

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};

use crate::buffer::Taken;
use crate::config::{Config, StoreKind};
use crate::error::{Error, Result};
use crate::flush::JobSink;
use crate::flush::QuickRetries;
use crate::queue::Job;
use crate::status::FlushReport;
use crate::{TupleKey, WriteBehind};

const STORE_ID: &str = "01FAKESTORE0000000000000000";
const MODEL_ID: &str = "01FAKEMODEL0000000000000000";

/// `(user, relation, object)`.
type Key = (String, String, String);

#[derive(Default)]
struct State {
    model: Value,
    tuples: BTreeSet<Key>,
    answers: HashMap<Key, bool>,
    /// Checks the handles made (answered by the fake or not).
    checks: Vec<Key>,
    /// Checks that reached the fake.
    asked: Vec<Key>,
    writes: usize,
}

/// A fake OpenFGA in this process: see the [module docs](self).
pub struct FakeOpenFga {
    url: String,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOpenFga {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeOpenFga {
    /// Starts the fake on a free loopback port with `model` (an
    /// authorization model as JSON, as `fga model transform` prints it) as
    /// its store's only model. Must be called inside a Tokio runtime.
    pub async fn start(model: Value) -> Result<FakeOpenFga> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::internal(format!("the fake OpenFGA cannot listen: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::internal(format!("the fake OpenFGA has no address: {e}")))?;
        let mut model = model;
        if let Some(m) = model.as_object_mut() {
            m.insert("id".into(), json!(MODEL_ID));
        }
        let state = Arc::new(Mutex::new(State {
            model,
            ..Default::default()
        }));
        let served = state.clone();
        let server = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = served.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(serve(&state, req).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .await;
                });
            }
        });
        Ok(FakeOpenFga {
            url: format!("http://{addr}"),
            state,
            server,
        })
    }

    /// The fake's base URL.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// A config for a handle on the fake: memory store, inline mode, and no
    /// check cache (so every check the code makes reaches the fake and
    /// [`FakeOpenFga::assert_checked`] sees it).
    pub fn config(&self) -> Config {
        let mut c = Config::default();
        c.openfga.api_url = self.url.clone();
        c.openfga.store_id = STORE_ID.into();
        c.openfga.model_id = MODEL_ID.into();
        c.buffer.store = StoreKind::Memory;
        c.cache.capacity = 0;
        c
    }

    /// A handle on the fake, built from [`FakeOpenFga::config`]: one line
    /// in a test.
    pub async fn write_behind(&self) -> Result<WriteBehind> {
        WriteBehind::builder(self.config())
            .on_check(self.recorder())
            .build()
            .await
    }

    /// Records the checks a handle makes, whether or not they reach the
    /// fake (fga-wb answers some from its buffer).
    fn recorder(&self) -> crate::client::CheckHook {
        let state = self.state.clone();
        Arc::new(move |user: &str, relation: &str, object: &str| {
            lock(&state).checks.push(key(user, relation, object));
        })
    }

    /// A handle in queue mode whose flushes hand their chunks to `queue`
    /// as jobs instead of writing them: [`FakeQueue::run`] applies them.
    pub async fn write_behind_queued(&self, queue: &FakeQueue) -> Result<WriteBehind> {
        WriteBehind::builder(self.config())
            .job_sink(queue.inner.clone())
            .on_check(self.recorder())
            .build()
            .await
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Scripts the answer to checks of `user` `relation` `object` (a derived
    /// relation, say), whatever the tuples say.
    pub fn answer(&self, user: &str, relation: &str, object: &str, allowed: bool) {
        self.state()
            .answers
            .insert(key(user, relation, object), allowed);
    }

    /// Stores a tuple directly, as if written before the test.
    pub fn insert(&self, user: &str, relation: &str, object: &str) {
        self.state().tuples.insert(key(user, relation, object));
    }

    /// Every stored tuple.
    pub fn tuples(&self) -> Vec<TupleKey> {
        self.state()
            .tuples
            .iter()
            .filter_map(|(u, r, o)| TupleKey::new(u, r, o).ok())
            .collect()
    }

    /// Whether the tuple is stored.
    pub fn has(&self, user: &str, relation: &str, object: &str) -> bool {
        self.state().tuples.contains(&key(user, relation, object))
    }

    /// The checks the code made through handles built by this fake, in
    /// order, as `(user, relation, object)`: also those fga-wb answered
    /// without asking (a pending grant or revoke of the very tuple).
    pub fn checks(&self) -> Vec<(String, String, String)> {
        self.state().checks.clone()
    }

    /// The checks that reached the fake server, in order.
    pub fn checks_received(&self) -> Vec<(String, String, String)> {
        self.state().asked.clone()
    }

    /// Write requests received.
    pub fn writes(&self) -> usize {
        self.state().writes
    }

    /// Flushes `wb`, then panics unless the tuple is stored.
    pub async fn assert_granted(&self, wb: &WriteBehind, user: &str, relation: &str, object: &str) {
        flush(wb).await;
        assert!(
            self.has(user, relation, object),
            "{object}#{relation}@{user} was not granted; OpenFGA holds {:?}",
            self.tuples()
        );
    }

    /// Flushes `wb`, then panics if the tuple is stored.
    pub async fn assert_revoked(&self, wb: &WriteBehind, user: &str, relation: &str, object: &str) {
        flush(wb).await;
        assert!(
            !self.has(user, relation, object),
            "{object}#{relation}@{user} is still granted"
        );
    }

    /// Panics unless the code checked `user` `relation` `object`.
    pub fn assert_checked(&self, user: &str, relation: &str, object: &str) {
        let want = key(user, relation, object);
        let checks = self.checks();
        assert!(
            checks.contains(&want),
            "no check of {object}#{relation}@{user}; checks made: {checks:?}"
        );
    }
}

/// Panics unless `wb` holds nothing pending or in flight.
pub async fn assert_nothing_pending(wb: &WriteBehind) {
    let p = wb
        .pending()
        .await
        .unwrap_or_else(|e| panic!("pending(): {e}"));
    assert!(
        p.total + p.in_flight == 0,
        "ops are still pending: {p:?} (call flush() first?)"
    );
}

async fn flush(wb: &WriteBehind) {
    let r = wb.flush().await.unwrap_or_else(|e| panic!("flush(): {e}"));
    assert!(r.error.is_none(), "flush(): {r:?}");
}

/// A job queue in memory: a handle built with
/// [`FakeOpenFga::write_behind_queued`] hands it one job per chunk, as queue
/// mode hands jobs to Redis; [`FakeQueue::jobs`] shows them and
/// [`FakeQueue::run`] applies them with the worker's write path.
#[derive(Clone, Default)]
pub struct FakeQueue {
    inner: Arc<Recorder>,
}

#[derive(Default)]
struct Recorder {
    jobs: Mutex<Vec<(Job, Vec<Taken>)>>,
    next: std::sync::atomic::AtomicU64,
}

impl JobSink for Recorder {
    fn enqueue<'a>(
        &'a self,
        store_id: &'a str,
        model_id: Option<&'a str>,
        ops: &'a [Taken],
    ) -> futures::future::BoxFuture<'a, Result<()>> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let job = Job::new(id, store_id, model_id, ops);
        lock(&self.jobs).push((job, ops.to_vec()));
        Box::pin(futures::future::ready(Ok(())))
    }
}

impl FakeQueue {
    /// A new, empty queue.
    pub fn new() -> FakeQueue {
        FakeQueue::default()
    }

    /// The jobs waiting, oldest first.
    pub fn jobs(&self) -> Vec<Job> {
        lock(&self.inner.jobs)
            .iter()
            .map(|(j, _)| j.clone())
            .collect()
    }

    /// Applies every waiting job to OpenFGA through `wb` as a worker would
    /// (one Write per job, bad tuples bisected into the dead letters), and
    /// reports what happened. A job that fails transiently puts its ops
    /// back to pending.
    pub async fn run(&self, wb: &WriteBehind) -> Result<FlushReport> {
        let jobs = std::mem::take(&mut *lock(&self.inner.jobs));
        let e = wb.engine();
        let mut report = FlushReport::default();
        let retries = QuickRetries {
            transient: 0,
            conflicts: 0,
        };
        for (job, taken) in jobs {
            let model = (!job.model_id.is_empty()).then_some(job.model_id.as_str());
            let result = e.write_chunk_as(None, model, taken, retries).await;
            report.requests += result.requests;
            if let Some(stop) = &result.stop {
                report.error = Some(stop.error().to_string());
            }
            let finished = e.store.finish(result.outcomes, None).await?;
            e.account(&finished, &mut report);
        }
        e.changed.send_modify(|v| *v += 1);
        Ok(report)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn key(user: &str, relation: &str, object: &str) -> Key {
    (user.to_owned(), relation.to_owned(), object.to_owned())
}

/// `{"user", "relation", "object"}` as a key.
fn key_of(v: &Value) -> Option<Key> {
    Some(key(
        v.get("user")?.as_str()?,
        v.get("relation")?.as_str()?,
        v.get("object")?.as_str()?,
    ))
}

fn tuple_keys(v: Option<&Value>) -> Vec<Key> {
    keys_in(v.and_then(|v| v.get("tuple_keys")))
}

/// The tuples of a JSON list of them.
fn keys_in(list: Option<&Value>) -> Vec<Key> {
    list.and_then(Value::as_array)
        .map(|a| a.iter().filter_map(key_of).collect())
        .unwrap_or_default()
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn serve(state: &Mutex<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body: Value = match req.into_body().collect().await {
        Ok(b) => serde_json::from_slice(&b.to_bytes()).unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let mut s = lock(state);
    match (method, parts.as_slice()) {
        (Method::GET, ["stores", _, "authorization-models", _]) => {
            reply(StatusCode::OK, json!({ "authorization_model": s.model }))
        }
        (Method::GET, ["stores", _, "authorization-models"]) => reply(
            StatusCode::OK,
            json!({ "authorization_models": [s.model], "continuation_token": "" }),
        ),
        (Method::GET, ["stores", id]) => reply(StatusCode::OK, json!({ "id": id, "name": "fake" })),
        (Method::POST, ["stores", _, "write"]) => {
            s.writes += 1;
            for k in tuple_keys(body.get("deletes")) {
                s.tuples.remove(&k);
            }
            for k in tuple_keys(body.get("writes")) {
                s.tuples.insert(k);
            }
            reply(StatusCode::OK, json!({}))
        }
        (Method::POST, ["stores", _, "check"]) => {
            let Some(k) = body.get("tuple_key").and_then(key_of) else {
                return bad_request("tuple_key is required");
            };
            let extra = tuple_keys(body.get("contextual_tuples"));
            let allowed = decide(&mut s, k, &extra);
            reply(StatusCode::OK, json!({ "allowed": allowed }))
        }
        (Method::POST, ["stores", _, "batch-check"]) => {
            let mut result = serde_json::Map::new();
            for c in body
                .get("checks")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
            {
                let (Some(k), Some(id)) = (
                    c.get("tuple_key").and_then(key_of),
                    c.get("correlation_id").and_then(Value::as_str),
                ) else {
                    return bad_request("each check needs a tuple_key and a correlation_id");
                };
                let extra = tuple_keys(c.get("contextual_tuples"));
                let allowed = decide(&mut s, k, &extra);
                result.insert(id.to_owned(), json!({ "allowed": allowed }));
            }
            reply(StatusCode::OK, json!({ "result": result }))
        }
        (Method::POST, ["stores", _, "read"]) => {
            let filter = body.get("tuple_key").filter(|f| !f.is_null());
            let want = |field: &str| {
                filter
                    .and_then(|f| f.get(field))
                    .and_then(Value::as_str)
                    .filter(|w| !w.is_empty())
            };
            // OpenFGA reads every tuple without a filter; with one, it wants
            // an object type, and an object id or a user.
            if filter.is_some() {
                if let Some(bad) = malformed_read_filter(&want) {
                    return bad_request(&bad);
                }
                let (kind, id) = want("object")
                    .and_then(|o| o.split_once(':'))
                    .unwrap_or(("", ""));
                if kind.is_empty() || (id.is_empty() && want("user").is_none()) {
                    return bad_request(
                        "the 'tuple_key' field was provided but the object type field is required and both the object id and user cannot be empty",
                    );
                }
            }
            let tuples: Vec<Value> = s
                .tuples
                .iter()
                .filter(|(u, r, o)| {
                    want("user").is_none_or(|w| user_matches(w, u))
                        && want("relation").is_none_or(|w| w == r)
                        // `type:` reads the type's every object, as OpenFGA does;
                        // `type:id` that object alone.
                        && want("object")
                            .is_none_or(|w| w == o || (w.ends_with(':') && o.starts_with(w)))
                })
                .map(|(u, r, o)| json!({ "key": { "user": u, "relation": r, "object": o } }))
                .collect();
            reply(
                StatusCode::OK,
                json!({ "tuples": tuples, "continuation_token": "" }),
            )
        }
        (Method::POST, ["stores", _, "list-objects"]) => {
            let (Some(kind), Some(relation), Some(user)) = (
                body.get("type").and_then(Value::as_str),
                body.get("relation").and_then(Value::as_str),
                body.get("user").and_then(Value::as_str),
            ) else {
                return bad_request("type, relation and user are required");
            };
            let extra = tuple_keys(body.get("contextual_tuples"));
            let prefix = format!("{kind}:");
            let objects: BTreeSet<&String> = s
                .tuples
                .iter()
                .chain(&extra)
                .filter(|(u, r, o)| u == user && r == relation && o.starts_with(&prefix))
                .map(|(_, _, o)| o)
                .collect();
            reply(StatusCode::OK, json!({ "objects": objects }))
        }
        (Method::POST, ["stores", _, "list-users"]) => {
            let (Some(kind), Some(id), Some(relation), Some(filter)) = (
                body.pointer("/object/type").and_then(Value::as_str),
                body.pointer("/object/id").and_then(Value::as_str),
                body.get("relation").and_then(Value::as_str),
                body.pointer("/user_filters/0/type").and_then(Value::as_str),
            ) else {
                return bad_request("object, relation and user_filters are required");
            };
            let object = format!("{kind}:{id}");
            let userset = body
                .pointer("/user_filters/0/relation")
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty());
            // ListUsers takes its contextual tuples as a plain list.
            let extra = keys_in(body.get("contextual_tuples"));
            if let Some((code, message)) =
                unknown_in_model(&s.model, kind, relation, filter, userset)
            {
                return reply(
                    StatusCode::BAD_REQUEST,
                    json!({ "code": code, "message": message }),
                );
            }
            let mut users: BTreeSet<String> = s
                .tuples
                .iter()
                .chain(&extra)
                .filter(|(u, r, o)| *r == relation && *o == object && listed(filter, userset, u))
                .map(|(u, _, _)| u.clone())
                .collect();
            // As OpenFGA answers: the userset `object#relation` always has
            // `relation` on `object`.
            if kind == filter && userset == Some(relation) {
                users.insert(format!("{object}#{relation}"));
            }
            let users: Vec<Value> = users.iter().map(|u| listed_user(u)).collect();
            reply(StatusCode::OK, json!({ "users": users }))
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({ "code": "undefined_endpoint", "message": format!("the fake OpenFGA does not serve {path}") }),
        ),
    }
}

/// Whether a Read filter's user matches a tuple's: exactly, or, for a
/// user without an id (`group:#member`), every user of its type whatever
/// the relation, as OpenFGA's datastores match it.
fn user_matches(want: &str, user: &str) -> bool {
    match want.split_once(":#") {
        Some((kind, _)) => user.split_once(':').is_some_and(|(k, _)| k == kind),
        None => want == user,
    }
}

/// What OpenFGA's request validation says of a Read filter's fields, if
/// it refuses them: a user is `type:id` (or `type:#relation`, at most 512
/// bytes), a relation has no `:`, `#` or `@` (at most 50 characters), an
/// object has 2 to 256 characters; none holds whitespace as Go's regular
/// expressions know it (ASCII only: fga-wb takes other spaces in ids, as
/// OpenFGA does).
fn malformed_read_filter<'a>(want: &impl Fn(&str) -> Option<&'a str>) -> Option<String> {
    let spaced = |v: &str| v.contains(['\t', '\n', '\x0C', '\r', ' ']);
    let chars = |v: &str| v.chars().count();
    if let Some(u) = want("user") {
        let ok = u
            .split_once(':')
            .is_some_and(|(k, id)| !k.is_empty() && !id.is_empty());
        if !ok || u.len() > 512 || spaced(u) {
            return Some(format!("invalid ReadRequestTupleKey.User: {u:?}"));
        }
    }
    if let Some(r) = want("relation") {
        if chars(r) > 50 || spaced(r) || r.contains([':', '#', '@']) {
            return Some(format!("invalid ReadRequestTupleKey.Relation: {r:?}"));
        }
    }
    if let Some(o) = want("object") {
        if chars(o) < 2 || chars(o) > 256 || spaced(o) {
            return Some(format!("invalid ReadRequestTupleKey.Object: {o:?}"));
        }
    }
    None
}

/// OpenFGA's code and message for a ListUsers request naming a type or
/// relation its model lacks (the user filter's first), if it does.
fn unknown_in_model(
    model: &Value,
    kind: &str,
    relation: &str,
    filter: &str,
    userset: Option<&str>,
) -> Option<(&'static str, String)> {
    let relations = |t: &str| {
        model
            .get("type_definitions")?
            .as_array()?
            .iter()
            .find(|d| d.get("type").and_then(Value::as_str) == Some(t))
            .map(|d| d.get("relations").unwrap_or(&Value::Null))
    };
    let has = |t: &str, r: &str| relations(t).is_some_and(|rs| rs.get(r).is_some());
    let no_type = |t: &str| Some(("type_not_found", format!("type '{t}' not found")));
    let no_relation = |t: &str, r: &str| {
        Some((
            "relation_not_found",
            format!("relation '{t}#{r}' not found"),
        ))
    };
    if relations(filter).is_none() {
        return no_type(filter);
    }
    if let Some(r) = userset.filter(|r| !has(filter, r)) {
        return no_relation(filter, r);
    }
    if relations(kind).is_none() {
        return no_type(kind);
    }
    if !has(kind, relation) {
        return no_relation(kind, relation);
    }
    None
}

/// Whether a tuple's user is one ListUsers names for the filter `kind`
/// (with `userset`: a userset of that relation).
fn listed(kind: &str, userset: Option<&str>, user: &str) -> bool {
    let Some((k, rest)) = user.split_once(':') else {
        return false;
    };
    k == kind
        && match (userset, rest.rsplit_once('#')) {
            (Some(want), Some((_, r))) => r == want,
            (None, None) => true,
            _ => false,
        }
}

/// A user as ListUsers answers it: an object, a userset or a wildcard.
fn listed_user(user: &str) -> Value {
    let (kind, rest) = user.split_once(':').unwrap_or((user, ""));
    match rest.rsplit_once('#') {
        Some((id, relation)) => {
            json!({ "userset": { "type": kind, "id": id, "relation": relation } })
        }
        None if rest == "*" => json!({ "wildcard": { "type": kind } }),
        None => json!({ "object": { "type": kind, "id": rest } }),
    }
}

fn bad_request(message: &str) -> Response<Full<Bytes>> {
    reply(
        StatusCode::BAD_REQUEST,
        json!({ "code": "validation_error", "message": message }),
    )
}

/// A scripted answer, else whether the tuple is stored or contextual;
/// records the request.
fn decide(s: &mut State, k: Key, contextual: &[Key]) -> bool {
    s.asked.push(k.clone());
    if let Some(&a) = s.answers.get(&k) {
        return a;
    }
    s.tuples.contains(&k) || contextual.contains(&k)
}

/// A fake OpenFGA whose users can view documents, for unit tests.
#[cfg(test)]
pub(crate) async fn viewers() -> FakeOpenFga {
    FakeOpenFga::start(json!({
        "schema_version": "1.1",
        "type_definitions": [
            { "type": "user" },
            { "type": "document", "relations": { "viewer": { "this": {} } },
              "metadata": { "relations": { "viewer": {
                  "directly_related_user_types": [{ "type": "user" }] } } } }
        ]
    }))
    .await
    .expect("the fake OpenFGA starts")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Overflow;
    use std::time::Duration;

    /// A handle on a test queue, at a full buffer with overflow `flush`,
    /// waits for the queue's jobs to run, as queue mode waits for a worker
    /// (its jobs hold their ops' room until written). Before, it failed at
    /// once with "buffer full": the handle's configured mode, inline, took
    /// its flush for one that writes, after which no room would come.
    #[tokio::test]
    async fn a_full_buffer_on_a_test_queue_waits_for_its_jobs() {
        let fga = viewers().await;
        let queue = FakeQueue::new();
        let mut cfg = fga.config();
        cfg.buffer.capacity = 1;
        cfg.buffer.overflow = Overflow::Flush;
        cfg.buffer.block_timeout = Duration::from_secs(600);
        let wb = WriteBehind::builder(cfg)
            .job_sink(queue.inner.clone())
            .automatic_flush(false)
            .build()
            .await
            .unwrap();
        wb.grant("user:anne", "viewer", "document:1").await.unwrap();
        let second = tokio::spawn({
            let wb = wb.clone();
            async move { wb.grant("user:bob", "viewer", "document:1").await }
        });
        // The worker's part: run the jobs as they come.
        let ran = tokio::time::timeout(Duration::from_secs(60), async {
            while !second.is_finished() {
                if !queue.jobs().is_empty() {
                    queue.run(&wb).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(ran.is_ok(), "the second grant never returned");
        second.await.unwrap().unwrap();
        assert!(fga.has("user:anne", "viewer", "document:1"));
        wb.shutdown().await.unwrap();
    }
}
