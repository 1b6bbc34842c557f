//! Following a new authorization model, and queue workers writing
//! each job under the model its ops were accepted with.
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::WriteBehind;
use serde_json::{json, Value};
use support::{config_for, new_store_with, stored, TestStore, Worker};

/// `document#viewer` takes `user`, and `user:*` when `wildcards`.
fn model(wildcards: bool) -> Value {
    let mut allowed = vec![json!({ "type": "user" })];
    if wildcards {
        allowed.push(json!({ "type": "user", "wildcard": {} }));
    }
    json!({
        "schema_version": "1.1",
        "type_definitions": [
            { "type": "user" },
            {
                "type": "document",
                "relations": { "viewer": { "this": {} } },
                "metadata": { "relations": {
                    "viewer": { "directly_related_user_types": allowed }
                } }
            }
        ]
    })
}

async fn store(name: &str) -> TestStore {
    new_store_with(name, &model(true)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handle_following_the_latest_model_switches_on_refresh() {
    let s = store("model-refresh").await;
    let mut c = config_for(&s);
    c.openfga.model_id = String::new();
    c.openfga.model_refresh = Duration::ZERO;
    let wb = WriteBehind::builder(c).build().await.unwrap();
    assert_eq!(wb.model_id().as_deref(), Some(s.model_id.as_str()));
    wb.grant("user:*", "viewer", "document:1").await.unwrap();
    wb.flush().await.unwrap();
    assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());

    let newer = s
        .client
        .write_authorization_model(&s.store_id, &model(false))
        .await
        .unwrap();
    assert_eq!(wb.refresh_model().await.unwrap(), Some(newer.clone()));
    assert_eq!(wb.model_id(), Some(newer.clone()));
    // Validation follows the new model...
    let e = wb
        .grant("user:*", "viewer", "document:2")
        .await
        .unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    // ...and so do checks: under it the wildcard tuple no longer counts.
    assert!(!wb.check("user:anne", "viewer", "document:1").await.unwrap());
    // Refreshing again with nothing new changes nothing.
    assert_eq!(wb.refresh_model().await.unwrap(), Some(newer));
    // A revoke is not held to the model, as OpenFGA's deletes are not: the
    // wildcard tuple the old model admitted can still be deleted (before,
    // the revoke was refused and the tuple stayed).
    wb.revoke("user:*", "viewer", "document:1").await.unwrap();
    wb.flush().await.unwrap();
    assert!(support::stored(&s).await.is_empty());
}

/// The first model with `document#can_read` defined as `viewer`.
fn model_with_can_read() -> Value {
    let mut m = model(false);
    m["type_definitions"][1]["relations"]["can_read"] =
        json!({ "computedUserset": { "relation": "viewer" } });
    m
}

/// A relation the new model derives from another: a revoke of the other
/// makes a cached answer of it unusable, in either store. The cache's list
/// of what an op changes was the old model's, which had no `can_read`, so
/// the revoke of `viewer` left the cached `allowed` in place.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoke_under_a_new_model_drops_the_answers_it_derives() {
    for kind in [StoreKind::Memory, StoreKind::Redis] {
        let s = new_store_with("model-derived", &model(false)).await;
        let mut c = config_for(&s);
        c.openfga.model_id = String::new();
        c.openfga.model_refresh = Duration::ZERO;
        c.buffer.store = kind;
        c.redis.url = support::redis_url();
        let wb = WriteBehind::builder(c).build().await.unwrap();
        let newer = s
            .client
            .write_authorization_model(&s.store_id, &model_with_can_read())
            .await
            .unwrap();
        assert_eq!(wb.refresh_model().await.unwrap(), Some(newer));

        wb.grant("user:anne", "viewer", "document:1").await.unwrap();
        wb.flush().await.unwrap();
        assert!(wb
            .check("user:anne", "can_read", "document:1")
            .await
            .unwrap());
        // Cached now; the revoke must make it unusable.
        assert!(wb
            .check("user:anne", "can_read", "document:1")
            .await
            .unwrap());
        wb.revoke("user:anne", "viewer", "document:1")
            .await
            .unwrap();
        assert!(
            !wb.check("user:anne", "can_read", "document:1")
                .await
                .unwrap(),
            "{kind:?}: a cached answer survived the revoke it derives from"
        );
        wb.shutdown().await.unwrap();
    }
}

/// A list pinned by its caller to another model than the handle's: the
/// pending ops it depends on are the pinned model's to say. Here the
/// handle's model assigns `can_read` directly, the caller's derives it
/// from `viewer`, and a revoke of the viewer tuple OpenFGA holds is
/// pending: the list must not show the document.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_list_pinned_to_another_model_follows_that_models_dependencies() {
    let (wb, derived) = two_models("model-pinned-list").await;
    let mut req = fga_wb::openfga::ListObjectsRequest::new("user:anne", "can_read", "document");
    req.authorization_model_id = Some(derived);
    // The pinned model is asked: under the handle's, anne reads nothing.
    assert_eq!(wb.list_objects(&req).await.unwrap(), ["document:1"]);
    wb.revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    match wb.list_objects(&req).await {
        Ok(objects) => assert!(objects.is_empty(), "listed despite the revoke: {objects:?}"),
        Err(e) => assert!(e.is_stale_check(), "{e}"),
    }
}

/// A store whose handle follows a model that assigns `can_read` directly,
/// while a later model (its id returned) derives it from `viewer`; anne is
/// a viewer of document:1 in OpenFGA. The handle flushes only when told,
/// and fails a check after waiting 300 ms for a revoke.
async fn two_models(name: &str) -> (WriteBehind, String) {
    let mut direct = model(false);
    direct["type_definitions"][1]["relations"]["can_read"] = json!({ "this": {} });
    direct["type_definitions"][1]["metadata"]["relations"]["can_read"] =
        json!({ "directly_related_user_types": [{ "type": "user" }] });
    under_and_pinned(name, &direct).await
}

/// A handle following `handles` (the store's first model), the id of a
/// later model that derives `can_read` from `viewer`, and anne a viewer of
/// document:1 in OpenFGA, as `two_models` describes.
async fn under_and_pinned(name: &str, handles: &Value) -> (WriteBehind, String) {
    let s = new_store_with(name, handles).await;
    let derived = s
        .client
        .write_authorization_model(&s.store_id, &model_with_can_read())
        .await
        .unwrap();
    support::write_to_openfga(&s, "user:anne", "viewer", "document:1").await;
    let mut c = config_for(&s);
    c.check.revoke_wait_timeout = Duration::from_millis(300);
    let wb = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    (wb, derived)
}

/// A check pinned by its caller to another model than the handle's is
/// answered under that model, and the pending ops are judged by it: the
/// handle's model assigns `can_read` directly, the caller's derives it from
/// `viewer`. Before, the check went out under the handle's model (anne's
/// viewer tuple did not count), and with a pending revoke of that tuple the
/// pinned check would not have waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_check_pinned_to_another_model_is_answered_and_judged_by_it() {
    let (wb, derived) = two_models("model-pinned-check").await;
    let mut req = fga_wb::openfga::CheckRequest::new("user:anne", "can_read", "document:1");
    req.authorization_model_id = Some(derived);
    assert!(
        wb.check_request(&req).await.unwrap(),
        "under the pinned model"
    );
    assert!(!wb
        .check("user:anne", "can_read", "document:1")
        .await
        .unwrap());

    wb.revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    match wb.check_request(&req).await {
        Ok(allowed) => assert!(!allowed, "allowed despite the revoke"),
        Err(e) => assert!(e.is_stale_check(), "{e}"),
    }
}

/// A pending grant OpenFGA refuses as a contextual tuple is judged by the
/// model the check is answered with. The handle's model takes `user:*` as
/// a viewer and makes viewers lose `can_read`; the caller's pinned model
/// takes no wildcard and derives `can_read` from `viewer`. Under it the
/// refused wildcard grant cannot take anne's access away, so the check is
/// answered (before, the handle's model said it could, and the check
/// failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_grant_under_a_pinned_model_is_judged_by_it() {
    let mut excluding = model(true);
    excluding["type_definitions"][1]["relations"]["can_read"] = json!({
        "difference": {
            "base": { "this": {} },
            "subtract": { "computedUserset": { "relation": "viewer" } }
        }
    });
    excluding["type_definitions"][1]["metadata"]["relations"]["can_read"] =
        json!({ "directly_related_user_types": [{ "type": "user" }] });
    let (wb, derived) = under_and_pinned("model-pinned-refused", &excluding).await;
    wb.grant("user:*", "viewer", "document:1").await.unwrap();
    let mut req = fga_wb::openfga::CheckRequest::new("user:anne", "can_read", "document:1");
    req.authorization_model_id = Some(derived);
    assert!(wb.check_request(&req).await.unwrap());
    let answers = wb.batch_check(&[req]).await.unwrap();
    assert!(matches!(answers[..], [Ok(true)]), "{answers:?}");
}

/// An empty model id in a request pins nothing: the check and the list
/// are answered under the handle's model (an empty id was read as a model
/// to fetch, and the list failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_model_id_pins_nothing() {
    let (wb, _) = two_models("model-pinned-empty").await;
    let mut check = fga_wb::openfga::CheckRequest::new("user:anne", "viewer", "document:1");
    check.authorization_model_id = Some(String::new());
    assert!(wb.check_request(&check).await.unwrap());
    let mut list = fga_wb::openfga::ListObjectsRequest::new("user:anne", "viewer", "document");
    list.authorization_model_id = Some(String::new());
    assert_eq!(wb.list_objects(&list).await.unwrap(), ["document:1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handle_pinned_to_a_model_stays_on_it() {
    let s = store("model-pinned").await;
    let wb = WriteBehind::builder(config_for(&s)).build().await.unwrap();
    s.client
        .write_authorization_model(&s.store_id, &model(false))
        .await
        .unwrap();
    assert_eq!(wb.refresh_model().await.unwrap(), Some(s.model_id.clone()));
    wb.grant("user:*", "viewer", "document:1").await.unwrap();
    // Written under the pinned model, which allows it (the latest does not).
    wb.flush().await.unwrap();
    assert_eq!(stored(&s).await, ["document:1#viewer@user:*"]);
    assert!(wb.dead_letters().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_writes_each_job_under_the_model_its_ops_were_accepted_with() {
    let s = store("model-worker").await;
    // The process that accepts the grant is pinned to the model that allows
    // wildcards; by the time the worker runs, the store's latest does not.
    let mut c = config_for(&s);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.flush.mode = Mode::Queue;
    c.queue.poll_interval = Duration::from_millis(50);
    let wb = WriteBehind::builder(c.clone()).build().await.unwrap();
    wb.grant("user:*", "viewer", "document:1").await.unwrap();
    let r = wb.flush().await.unwrap();
    assert!(r.error.is_none(), "{r:?}");
    s.client
        .write_authorization_model(&s.store_id, &model(false))
        .await
        .unwrap();

    let mut worker_config = c;
    worker_config.openfga.model_id = String::new();
    let worker = Worker::start(worker_config, 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored(&s).await.is_empty() {
        let st = wb.status().await.unwrap();
        assert_eq!(st.dead_letters, 0, "the job was refused: {st:?}");
        assert!(
            Instant::now() < deadline,
            "the worker did not apply the job"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stored(&s).await, ["document:1#viewer@user:*"]);
    worker.stop().await;
}

/// A read with no relation filter counts a pending revoke on a relation
/// the handle's model no longer has: OpenFGA's Read returns what it holds
/// whatever the model says. Before, such a read returned the tuple the
/// application had revoked (the pending ops were looked for on the model's
/// relations only).
#[tokio::test]
async fn a_read_counts_a_pending_revoke_on_a_relation_the_model_dropped() {
    for store in [StoreKind::Memory, StoreKind::Redis] {
        read_with_a_pending_revoke_on_a_dropped_relation(store).await;
    }
}

async fn read_with_a_pending_revoke_on_a_dropped_relation(store: StoreKind) {
    let mut first = model(false);
    first["type_definitions"][1]["relations"]["legacy"] = json!({ "this": {} });
    first["type_definitions"][1]["metadata"]["relations"]["legacy"] =
        json!({ "directly_related_user_types": [{ "type": "user" }] });
    let s = new_store_with(&format!("read-dropped-{store:?}"), &first).await;
    support::write_to_openfga(&s, "user:anne", "legacy", "document:1").await;
    let newer = s
        .client
        .write_authorization_model(&s.store_id, &model(false))
        .await
        .unwrap();
    let mut c = config_for(&s);
    c.openfga.model_id = String::new();
    c.check.revoke_wait_timeout = Duration::from_millis(300);
    c.buffer.store = store;
    c.redis.url = support::redis_url();
    // Without validation, as a handle built before the change would have
    // taken it (or one that does not validate at all).
    let wb = WriteBehind::builder(c)
        .validate_against_model(false)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    assert_eq!(wb.model_id(), Some(newer));
    wb.revoke("user:anne", "legacy", "document:1")
        .await
        .unwrap();
    let filter = fga_wb::openfga::ReadFilter {
        object: Some("document:1".into()),
        ..Default::default()
    };
    match wb.read(&filter).await {
        Ok(held) => assert!(
            !held.iter().any(|t| t.relation == "legacy"),
            "{store:?}: a revoked tuple read back: {held:?}"
        ),
        Err(e) => assert!(e.is_stale_check(), "{store:?}: {e}"),
    }
    wb.clear().await.unwrap();
    wb.shutdown().await.unwrap();
}

/// Type restrictions with conditions, judged as OpenFGA judges them (the
/// user's kind against the restrictions whatever their conditions, then the
/// condition on its own): for each tuple, a grant is taken exactly when the
/// real server writes it. Before, fga-wb wanted one restriction matching
/// kind and condition at once, and refused `user:anne with cc` under
/// `[user, user:* with cc]` and a plain `group:x#member` under
/// `[group, group#member with cc]`, which OpenFGA writes.
#[tokio::test]
async fn conditions_on_type_restrictions_are_judged_as_openfga_judges_them() {
    let restriction = |t: &str, extra: Value| {
        let mut r = json!({ "type": t });
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    let m = json!({
        "schema_version": "1.1",
        "type_definitions": [
            { "type": "user" },
            { "type": "group", "relations": { "member": { "this": {} } },
              "metadata": { "relations": { "member": { "directly_related_user_types": [{ "type": "user" }] } } } },
            { "type": "document",
              "relations": { "viewer": { "this": {} }, "editor": { "this": {} } },
              "metadata": { "relations": {
                  "viewer": { "directly_related_user_types": [
                      restriction("user", json!({})),
                      restriction("user", json!({ "wildcard": {}, "condition": "cc" })),
                  ] },
                  "editor": { "directly_related_user_types": [
                      restriction("group", json!({})),
                      restriction("group", json!({ "relation": "member", "condition": "cc" })),
                  ] },
              } } }
        ],
        "conditions": { "cc": { "name": "cc", "expression": "x < 10",
            "parameters": { "x": { "type_name": "TYPE_NAME_INT" } } } }
    });
    let s = new_store_with("model-condition-restrictions", &m).await;
    let wb = WriteBehind::builder(config_for(&s))
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let cases = [
        ("user:anne", "viewer", Some("cc")),
        ("user:anne", "viewer", None),
        ("user:*", "viewer", Some("cc")),
        ("user:*", "viewer", None),
        ("group:x#member", "editor", None),
        ("group:x#member", "editor", Some("cc")),
        ("group:x", "editor", Some("cc")),
        ("group:x", "editor", None),
    ];
    for (i, (user, relation, condition)) in cases.into_iter().enumerate() {
        let object = format!("document:{i}");
        let mut t = fga_wb::TupleKey::new(user, relation, &object).unwrap();
        if let Some(c) = condition {
            t = t.with_condition(c, None).unwrap();
        }
        let ours = wb.grant_tuple(t.clone()).await;
        let req = fga_wb::openfga::WriteRequest::idempotent(vec![t], vec![]);
        let theirs = match s.client.write(&s.store_id, &req).await {
            Ok(()) => true,
            Err(e) if e.is_invalid_input() => false,
            Err(e) => panic!("the server failed: {e}"),
        };
        assert_eq!(
            ours.is_ok(),
            theirs,
            "{user} {relation} {condition:?}: {ours:?}"
        );
    }
    wb.clear().await.unwrap();

    // Read your writes with such a grant pending: OpenFGA writes a plain
    // group:x#member there and counts it, and its Check takes it as a
    // contextual tuple too: the pending grant answers as the written one.
    let wb = WriteBehind::builder(support::mock::manual_flush(config_for(&s)))
        .build()
        .await
        .unwrap();
    support::write_to_openfga(&s, "user:bob", "member", "group:x").await;
    wb.grant("group:x#member", "editor", "document:rw")
        .await
        .unwrap();
    let pending = wb.check("user:bob", "editor", "document:rw").await;
    wb.flush().await.unwrap();
    let req = fga_wb::openfga::CheckRequest::new("user:bob", "editor", "document:rw");
    let truth = s.client.check(&s.store_id, &req).await.unwrap();
    assert_eq!(
        pending.ok(),
        Some(truth),
        "answered while the grant was pending"
    );
    wb.shutdown().await.unwrap();
}
