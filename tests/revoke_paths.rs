//! Every way a grant and a revoke of one tuple can differ
//! (a condition, a wildcard user, a userset user, both) is granted and then
//! revoked through the handle, on the memory store, the Redis store and in
//! queue mode, against the real server with `models/conditions.fga`: the
//! revoke is accepted (OpenFGA deletes by user, relation and object), a
//! check right after it is never `true`, and once applied the tuple is gone
//! from OpenFGA. Also: a pending revoke holds up only the checks it can
//! change.
#![cfg(feature = "redis")]

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::openfga::{CheckRequest, Context, WriteRequest};
use fga_wb::{Config, TupleKey, WriteBehind};
use serde_json::json;
use support::{config_for, new_store_with, stored, TestStore, Worker};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Memory,
    Redis,
    Queue,
}

struct Env {
    s: TestStore,
    wb: WriteBehind,
    setup: Setup,
    _worker: Option<Worker>,
}

fn config(s: &TestStore, setup: Setup) -> Config {
    let mut c = config_for(s);
    if setup != Setup::Memory {
        c.buffer.store = StoreKind::Redis;
        c.redis.url = support::redis_url();
    }
    if setup == Setup::Queue {
        c.flush.mode = Mode::Queue;
        c.queue.heartbeat = Duration::from_secs(1);
        c.queue.poll_interval = Duration::from_millis(50);
    }
    // Grants wait for flush(); revokes are flushed at once (eager_revokes).
    c.flush.interval = Duration::from_secs(3600);
    c.flush.batch_size = 1_000_000;
    c.check.revoke_wait_timeout = Duration::from_secs(10);
    c
}

async fn env(name: &str, setup: Setup, automatic_flush: bool) -> Env {
    let s = new_store_with(
        &format!("{name}-{setup:?}"),
        &support::model("conditions.json"),
    )
    .await;
    let mut c = config(&s, setup);
    if !automatic_flush {
        // Nothing will write a pending revoke: a check it holds up fails soon.
        c.check.revoke_wait_timeout = Duration::from_millis(300);
    }
    let wb = WriteBehind::builder(c.clone())
        .automatic_flush(automatic_flush)
        .build()
        .await
        .expect("build the handle");
    let worker = (setup == Setup::Queue).then(|| Worker::start(c, 2));
    Env {
        s,
        wb,
        setup,
        _worker: worker,
    }
}

fn ctx(v: serde_json::Value) -> Option<Context> {
    match v {
        serde_json::Value::Object(m) => Some(m),
        _ => None,
    }
}

fn office() -> Option<Context> {
    ctx(json!({ "cidr": "192.168.0.0/24" }))
}

impl Env {
    /// Writes everything pending; in queue mode, waits for the worker.
    async fn apply(&self) {
        let r = self.wb.flush().await.expect("flush");
        assert!(r.error.is_none(), "{r:?}");
        if self.setup != Setup::Queue {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.wb.status().await.expect("status");
            let q = st.queue.as_ref().expect("queue mode");
            if st.pending.total + st.pending.in_flight == 0
                && q.pending + q.running + q.scheduled == 0
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not apply: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A grant that holds from the office network only.
    async fn grant_in_office(&self, user: &str, relation: &str, object: &str) {
        self.wb
            .grant_with_condition(user, relation, object, "in_company_network", office())
            .await
            .unwrap();
    }

    /// The handle's check, from an office address.
    async fn check(&self, user: &str, relation: &str, object: &str) -> fga_wb::Result<bool> {
        let mut r = CheckRequest::new(user, relation, object);
        r.context = ctx(json!({
            "user_ip": "192.168.0.10",
            "current_time": "2026-11-30T12:00:00Z",
        }));
        self.wb.check_request(&r).await
    }

    /// A check right after a revoke: never `true`.
    async fn denied(&self, user: &str, relation: &str, object: &str) {
        match self.check(user, relation, object).await {
            Ok(false) => {}
            Ok(true) => panic!("{user} {relation} {object}: allowed after the revoke"),
            Err(e) => panic!("{user} {relation} {object}: {e} (expected a clean false)"),
        }
    }
}

/// Grant with a condition, check, revoke, check at once, flush: gone.
async fn conditional_grant_then_revoke(setup: Setup) {
    let e = env("cond-revoke", setup, true).await;
    e.grant_in_office("user:anne", "viewer", "document:1").await;
    e.apply().await;
    assert_eq!(
        stored(&e.s).await,
        ["document:1#viewer@user:anne (when in_company_network)"]
    );
    assert!(e.check("user:anne", "viewer", "document:1").await.unwrap());

    e.wb.revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    e.denied("user:anne", "viewer", "document:1").await;
    e.apply().await;
    assert!(stored(&e.s).await.is_empty());

    // revoke_tuple with the condition on it: the same delete.
    e.grant_in_office("user:anne", "viewer", "document:1").await;
    e.apply().await;
    let t = TupleKey::new("user:anne", "viewer", "document:1")
        .unwrap()
        .with_condition("in_company_network", office())
        .unwrap();
    e.wb.revoke_tuple(t).await.unwrap();
    e.denied("user:anne", "viewer", "document:1").await;
    e.apply().await;
    assert!(stored(&e.s).await.is_empty());
}

/// Grant with a condition and revoke before any flush: coalesced into the
/// delete, also of the same tuple already in OpenFGA.
async fn conditional_grant_revoked_before_a_flush(setup: Setup) {
    let e = env("cond-coalesce", setup, true).await;
    e.grant_in_office("user:anne", "viewer", "document:1").await;
    e.wb.revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    e.denied("user:anne", "viewer", "document:1").await;
    e.apply().await;
    assert!(stored(&e.s).await.is_empty());

    // Already in OpenFGA with its condition, written by someone else.
    let t = TupleKey::new("user:bob", "viewer", "document:1")
        .unwrap()
        .with_condition("in_company_network", office())
        .unwrap();
    e.s.client
        .write(&e.s.store_id, &WriteRequest::idempotent(vec![t], vec![]))
        .await
        .unwrap();
    e.grant_in_office("user:bob", "viewer", "document:1").await;
    e.wb.revoke("user:bob", "viewer", "document:1")
        .await
        .unwrap();
    e.denied("user:bob", "viewer", "document:1").await;
    e.apply().await;
    assert!(stored(&e.s).await.is_empty());
}

/// The model: a relation that admits a userset only `with` a
/// condition.
async fn conditional_userset_policy(setup: Setup) {
    let e = env("cond-userset", setup, true).await;
    let (user, rel, obj) = (
        "organization:acme#member",
        "ip_based_access_policy",
        "organization:acme",
    );
    e.grant_in_office(user, rel, obj).await;
    e.wb.grant("user:anne", "member", "organization:acme")
        .await
        .unwrap();
    e.apply().await;
    assert!(e.check("user:anne", rel, obj).await.unwrap());

    e.wb.revoke(user, rel, obj).await.unwrap();
    e.denied("user:anne", rel, obj).await;
    e.apply().await;
    assert_eq!(
        stored(&e.s).await,
        ["organization:acme#member@user:anne"],
        "only the membership is left"
    );
}

/// Wildcards and usersets, with and without a condition.
async fn wildcard_and_userset_grants_then_revokes(setup: Setup) {
    let e = env("wild-userset", setup, true).await;
    e.wb.grant("user:carl", "member", "group:eng")
        .await
        .unwrap();
    e.wb.grant("user:*", "reader", "document:1").await.unwrap();
    e.wb.grant("group:eng#member", "reader", "document:2")
        .await
        .unwrap();
    e.grant_in_office("user:*", "viewer", "document:3").await;
    e.grant_in_office("group:eng#member", "viewer", "document:4")
        .await;
    e.apply().await;
    assert_eq!(stored(&e.s).await.len(), 5);
    for (user, rel, obj) in [
        ("user:bob", "reader", "document:1"),
        ("user:carl", "reader", "document:2"),
        ("user:bob", "viewer", "document:3"),
        ("user:carl", "viewer", "document:4"),
    ] {
        assert!(e.check(user, rel, obj).await.unwrap(), "{user} {rel} {obj}");
    }

    e.wb.revoke("user:*", "reader", "document:1").await.unwrap();
    e.denied("user:bob", "reader", "document:1").await;
    e.wb.revoke("group:eng#member", "reader", "document:2")
        .await
        .unwrap();
    e.denied("user:carl", "reader", "document:2").await;
    e.wb.revoke("user:*", "viewer", "document:3").await.unwrap();
    e.denied("user:bob", "viewer", "document:3").await;
    e.wb.revoke("group:eng#member", "viewer", "document:4")
        .await
        .unwrap();
    e.denied("user:carl", "viewer", "document:4").await;
    e.apply().await;
    assert_eq!(stored(&e.s).await, ["group:eng#member@user:carl"]);
}

/// A grant of a tuple OpenFGA holds with another condition context
/// replaces it (delete, then write); from the call on, no check answers by
/// the old, wider version.
async fn a_grant_with_another_condition_replaces_the_old_one(setup: Setup) {
    let e = env("cond-replace", setup, true).await;
    let noon = ctx(json!({ "current_time": "2026-11-30T12:00:00Z" }));
    let quarter_past_eleven = ctx(json!({ "current_time": "2026-11-30T11:15:00Z" }));
    let at = |when: &Option<Context>| {
        let mut r = CheckRequest::new("user:anne", "temp_viewer", "document:1");
        r.context = when.clone();
        r
    };
    let two_hours = ctx(json!({ "grant_time": "2026-11-30T11:00:00Z", "grant_duration": "2h" }));
    let half_hour = ctx(json!({ "grant_time": "2026-11-30T11:00:00Z", "grant_duration": "30m" }));
    e.wb.grant_with_condition(
        "user:anne",
        "temp_viewer",
        "document:1",
        "non_expired",
        two_hours,
    )
    .await
    .unwrap();
    e.apply().await;
    assert!(e.wb.check_request(&at(&noon)).await.unwrap());

    e.wb.grant_with_condition(
        "user:anne",
        "temp_viewer",
        "document:1",
        "non_expired",
        half_hour.clone(),
    )
    .await
    .unwrap();
    let a = e.wb.check_request(&at(&noon)).await;
    assert!(
        !matches!(a, Ok(true)),
        "answered by the old condition: {a:?}"
    );
    e.apply().await;
    let held =
        e.s.client
            .read_all(&e.s.store_id, &Default::default())
            .await
            .unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        held[0].condition.as_ref().and_then(|c| c.context.clone()),
        half_hour,
        "OpenFGA holds the new condition context"
    );
    assert!(!e.wb.check_request(&at(&noon)).await.unwrap());
    assert!(e.wb.check_request(&at(&quarter_past_eleven)).await.unwrap());
    let st = e.wb.status().await.unwrap();
    assert_eq!(st.dead_letters, 0, "replaced, not dead-lettered");
}

/// A pending revoke of bob's time-limited access does not hold up alice's
/// check on the same document; bob's own check fails closed.
async fn a_revoke_holds_up_only_the_checks_it_can_change(setup: Setup) {
    let e = env("narrow", setup, false).await;
    let grant_ctx = ctx(json!({ "grant_time": "2026-11-30T11:00:00Z", "grant_duration": "2h" }));
    for u in ["user:alice", "user:bob"] {
        e.wb.grant_with_condition(
            u,
            "temp_viewer",
            "document:1",
            "non_expired",
            grant_ctx.clone(),
        )
        .await
        .unwrap();
    }
    e.apply().await;
    // Not flushed (no automatic flush): bob's revoke stays pending.
    e.wb.revoke("user:bob", "temp_viewer", "document:1")
        .await
        .unwrap();
    let mut req = CheckRequest::new("user:bob", "can_view", "document:1");
    req.context = ctx(json!({ "current_time": "2026-11-30T12:00:00Z" }));
    // The handle holding the revoke, and (on Redis) another process's handle.
    let mut askers = vec![&e.wb];
    let other;
    if setup != Setup::Memory {
        let mut c = config(&e.s, setup);
        c.check.revoke_wait_timeout = Duration::from_millis(300);
        other = WriteBehind::builder(c)
            .automatic_flush(false)
            .build()
            .await
            .unwrap();
        askers.push(&other);
    }
    for wb in askers {
        match wb.check_request(&req).await {
            Err(err) => assert!(err.is_stale_check(), "{err}"),
            Ok(a) => panic!("bob's check answered {a} with his revoke pending"),
        }
    }
    req.user = "user:alice".into();
    assert!(
        e.wb.check_request(&req)
            .await
            .expect("alice's check does not wait for bob's revoke"),
        "alice keeps her access"
    );
    for (u, r) in [("user:alice", "temp_viewer"), ("user:alice", "can_view")] {
        let mut q = req.clone();
        q.user = u.into();
        q.relation = r.into();
        assert!(e.wb.check_request(&q).await.unwrap(), "{u} {r}");
    }
}

/// A check held up by a pending grant with a condition (OpenFGA may hold a
/// wider version) answers as soon as the grant is written: in queue mode by
/// the worker, whose write tells every process so. Otherwise the wait runs
/// into `check.revoke_wait_timeout` (10 s here) and the check fails.
async fn a_check_held_up_by_a_grant_with_a_condition_answers_once_it_is_written(setup: Setup) {
    let e = env("cond-wait", setup, true).await;
    e.grant_in_office("user:anne", "viewer", "document:1").await;
    let allowed = e
        .check("user:anne", "viewer", "document:1")
        .await
        .expect("answered once the grant is written");
    assert!(allowed, "anne's conditional grant applies from the office");
}

for_each_setup!(
    [memory => super::Setup::Memory, redis => super::Setup::Redis, queue => super::Setup::Queue]
    conditional_grant_then_revoke,
    conditional_grant_revoked_before_a_flush,
    conditional_userset_policy,
    wildcard_and_userset_grants_then_revokes,
    a_revoke_holds_up_only_the_checks_it_can_change,
    a_grant_with_another_condition_replaces_the_old_one,
    a_check_held_up_by_a_grant_with_a_condition_answers_once_it_is_written,
);
