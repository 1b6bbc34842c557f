//! A pending grant OpenFGA refuses as a contextual tuple must not
//! fail the checks it is sent with. This happens during a model rollout:
//! processes sharing a Redis store run different models, and a grant one
//! of them buffered (valid under its model) is refused under the other's.
//! Checks go on without the refused grant where that cannot widen access,
//! and fail closed where it could take access away (under a `but not`).
#![cfg(feature = "redis")]

mod support;

use std::time::Duration;

use fga_wb::config::StoreKind;
use fga_wb::openfga::{CheckRequest, ListObjectsRequest, ListUsersRequest, WriteRequest};
use fga_wb::{TupleKey, WriteBehind};
use serde_json::{json, Value};
use support::{config_for, new_store_with, TestStore};

/// `viewer` and `blocked` take `user` and, when `wildcards`, `user:*`;
/// `can_view` is `viewer but not blocked`.
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
                "relations": {
                    "viewer": { "this": {} },
                    "blocked": { "this": {} },
                    "can_view": { "difference": {
                        "base": { "computedUserset": { "relation": "viewer" } },
                        "subtract": { "computedUserset": { "relation": "blocked" } }
                    } }
                },
                "metadata": { "relations": {
                    "viewer": { "directly_related_user_types": allowed.clone() },
                    "blocked": { "directly_related_user_types": allowed }
                } }
            }
        ]
    })
}

/// A handle on the shared Redis store, under `model_id`.
async fn handle(s: &TestStore, model_id: &str) -> WriteBehind {
    let mut c = config_for(s);
    c.openfga.model_id = model_id.to_owned();
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.flush.interval = Duration::from_secs(3600);
    c.check.revoke_wait_timeout = Duration::from_millis(300);
    WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .expect("handle")
}

fn wildcard(relation: &str, object: &str) -> TupleKey {
    TupleKey::new("user:*", relation, object).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grants_refused_under_the_checking_processs_model_fail_no_unrelated_check() {
    // The new model (no wildcards) is the store's latest; the old one is
    // still used by the process that buffered the grants.
    let s = new_store_with("refused-grants-new", &model(false)).await;
    let old_model = s
        .client
        .write_authorization_model(&s.store_id, &model(true))
        .await
        .unwrap();
    let new_model = s
        .client
        .write_authorization_model(&s.store_id, &model(false))
        .await
        .unwrap();
    let mut direct = WriteRequest::idempotent(
        vec![
            TupleKey::new("user:anne", "viewer", "document:1").unwrap(),
            TupleKey::new("user:anne", "viewer", "document:2").unwrap(),
        ],
        vec![],
    );
    direct.authorization_model_id = Some(new_model.clone());
    s.client.write(&s.store_id, &direct).await.unwrap();

    let old = handle(&s, &old_model).await;
    let new = handle(&s, &new_model).await;
    old.grant("user:*", "viewer", "document:1").await.unwrap();
    old.grant("user:*", "blocked", "document:2").await.unwrap();

    // The premise: under the new model OpenFGA refuses such a check.
    let mut raw = CheckRequest::new("user:anne", "viewer", "document:1");
    raw.authorization_model_id = Some(new_model.clone());
    raw.contextual_tuples.push(wildcard("viewer", "document:1"));
    let r = s.client.check(&s.store_id, &raw).await;
    assert!(
        matches!(&r, Err(e) if e.is_invalid_input()),
        "OpenFGA should refuse the wildcard under the new model: {r:?}"
    );

    // Without the refused grant nothing can widen: answers, not errors.
    for (user, relation, object, want) in [
        ("user:anne", "viewer", "document:1", true),
        ("user:bob", "viewer", "document:1", false),
        ("user:anne", "can_view", "document:1", true),
        ("user:bob", "can_view", "document:1", false),
    ] {
        let a = new.check(user, relation, object).await;
        assert!(
            matches!(a, Ok(x) if x == want),
            "{user} {relation} {object}: {a:?}"
        );
    }
    let batch = new
        .batch_check(&[
            CheckRequest::new("user:anne", "can_view", "document:1"),
            CheckRequest::new("user:bob", "viewer", "document:1"),
        ])
        .await
        .unwrap();
    assert!(
        matches!(batch.as_slice(), [Ok(true), Ok(false)]),
        "{batch:?}"
    );

    // Nor is the refused grant itself taken as access under the new model
    // (a pending unconditional grant of the checked tuple answered `true`
    // without asking whether the model admits it).
    let a = new.check("user:*", "viewer", "document:1").await;
    assert!(!matches!(a, Ok(true)), "{a:?}");
    // A refused `blocked` could take anne's access away: fail closed.
    let a = new.check("user:anne", "can_view", "document:2").await;
    match &a {
        Err(e) => assert!(e.is_stale_check(), "{e}"),
        Ok(x) => panic!("answered {x} past a refused pending block"),
    }
    // Lists too: answered without a refused grant that cannot take access
    // away, failing closed past one that can (they failed with the
    // server's refusal until the grants were dead-lettered).
    let viewer_of = ListObjectsRequest::new("user:anne", "viewer", "document");
    let listed = new.list_objects(&viewer_of).await.unwrap();
    assert_eq!(listed, ["document:1", "document:2"]);
    let users = ListUsersRequest::new("document:1", "viewer", "user");
    assert_eq!(new.list_users(&users).await.unwrap(), ["user:anne"]);
    let can_view = ListObjectsRequest::new("user:anne", "can_view", "document");
    let l = new.list_objects(&can_view).await;
    assert!(matches!(&l, Err(e) if e.is_stale_check()), "{l:?}");
    // The old process, under its own model, still answers with them.
    assert!(old.check("user:bob", "viewer", "document:1").await.unwrap());
    assert!(!old
        .check("user:anne", "can_view", "document:2")
        .await
        .unwrap());
}
