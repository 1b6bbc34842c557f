//! The OpenFGA client end to end, against the real server that scripts/test
//! starts. Each test makes its own store.

mod support;

use fga_wb::openfga::{CheckRequest, Client, Consistency, ReadFilter, Secret, WriteRequest};
use fga_wb::TupleKey;
use support::new_store;

fn t(user: &str, relation: &str, object: &str) -> TupleKey {
    TupleKey::new(user, relation, object).unwrap()
}

/// A write is read back, and checks see it directly and through derived
/// relations (owner implies editor implies viewer).
#[tokio::test]
async fn write_then_read_back_and_check() {
    let s = new_store("client-write-read").await;
    let req = WriteRequest::idempotent(
        vec![
            t("user:anne", "owner", "document:1"),
            t("user:bob", "viewer", "document:1"),
        ],
        vec![],
    );
    s.client.write(&s.store_id, &req).await.unwrap();

    let filter = ReadFilter {
        object: Some("document:1".into()),
        ..Default::default()
    };
    let mut got: Vec<String> = s
        .client
        .read_all(&s.store_id, &filter)
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    got.sort();
    assert_eq!(
        got,
        ["document:1#owner@user:anne", "document:1#viewer@user:bob"]
    );

    for (user, rel, want) in [
        ("user:anne", "viewer", true),
        ("user:anne", "can_share", true),
        ("user:bob", "viewer", true),
        ("user:bob", "editor", false),
        ("user:carl", "viewer", false),
    ] {
        let mut c = CheckRequest::new(user, rel, "document:1");
        c.authorization_model_id = Some(s.model_id.clone());
        c.consistency = Consistency::HigherConsistency;
        assert_eq!(
            s.client.check(&s.store_id, &c).await.unwrap(),
            want,
            "{user} {rel}"
        );
    }
}

/// Re-writing an existing tuple and re-deleting a missing one succeed with the
/// "ignore" options, so a replayed Write is harmless.
#[tokio::test]
async fn idempotent_rewrite_and_redelete() {
    let s = new_store("client-idempotent").await;
    let tuple = t("user:anne", "viewer", "document:2");
    let write = WriteRequest::idempotent(vec![tuple.clone()], vec![]);
    s.client.write(&s.store_id, &write).await.unwrap();
    s.client.write(&s.store_id, &write).await.unwrap();

    let delete = WriteRequest::idempotent(vec![], vec![tuple.clone()]);
    s.client.write(&s.store_id, &delete).await.unwrap();
    s.client.write(&s.store_id, &delete).await.unwrap();

    // Without "ignore" the same replay is refused: the options really were sent.
    let strict = WriteRequest {
        deletes: vec![tuple],
        ..Default::default()
    };
    let e = s.client.write(&s.store_id, &strict).await.unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
}

/// Contextual tuples and a check context reach the server: a conditional grant
/// applies only while the condition holds.
#[tokio::test]
async fn check_with_contextual_tuples_and_condition_context() {
    let s = new_store("client-contextual").await;
    let mut c = CheckRequest::new("user:dan", "viewer", "document:3");
    assert!(!s.client.check(&s.store_id, &c).await.unwrap());

    c.contextual_tuples = vec![
        t("folder:f", "parent", "document:3"),
        t("user:dan", "editor", "folder:f"),
    ];
    assert!(s.client.check(&s.store_id, &c).await.unwrap());

    let mut ctx = serde_json::Map::new();
    ctx.insert("grant_time".into(), "2026-01-01T00:00:00Z".into());
    ctx.insert("grant_duration".into(), "1h".into());
    let conditional = t("user:eve", "viewer", "document:3")
        .with_condition("non_expired", Some(ctx))
        .unwrap();
    s.client
        .write(
            &s.store_id,
            &WriteRequest::idempotent(vec![conditional], vec![]),
        )
        .await
        .unwrap();
    let at = |time: &str| {
        let mut c = CheckRequest::new("user:eve", "viewer", "document:3");
        let mut ctx = serde_json::Map::new();
        ctx.insert("current_time".into(), time.into());
        c.context = Some(ctx);
        c
    };
    assert!(s
        .client
        .check(&s.store_id, &at("2026-01-01T00:30:00Z"))
        .await
        .unwrap());
    assert!(!s
        .client
        .check(&s.store_id, &at("2026-01-01T02:00:00Z"))
        .await
        .unwrap());
}

/// 120 checks go out as three BatchCheck requests (50 + 50 + 20) and every
/// answer comes back in order.
#[tokio::test]
async fn batch_check_splits_and_maps_answers_back() {
    let s = new_store("client-batch").await;
    let writes: Vec<TupleKey> = (0..60)
        .map(|i| t(&format!("user:u{i}"), "viewer", "document:b"))
        .collect();
    s.client
        .write(&s.store_id, &WriteRequest::idempotent(writes, vec![]))
        .await
        .unwrap();
    let checks: Vec<CheckRequest> = (0..120)
        .map(|i| CheckRequest::new(format!("user:u{i}"), "viewer", "document:b"))
        .collect();
    let answers = s
        .client
        .batch_check(
            &s.store_id,
            &checks,
            Some(&s.model_id),
            Consistency::HigherConsistency,
        )
        .await
        .unwrap();
    assert_eq!(answers.len(), 120);
    for (i, a) in answers.into_iter().enumerate() {
        assert_eq!(a.unwrap(), i < 60, "check {i}");
    }
}

/// A batch check with one malformed item answers the others and gives that
/// one an input error.
#[tokio::test]
async fn batch_check_reports_per_item_errors() {
    let s = new_store("client-batch-err").await;
    let checks = vec![
        CheckRequest::new("user:a", "viewer", "document:1"),
        CheckRequest::new("user:a", "no_such_relation", "document:1"),
    ];
    let answers = s
        .client
        .batch_check(&s.store_id, &checks, None, Consistency::Unspecified)
        .await
        .unwrap();
    assert!(!*answers[0].as_ref().unwrap());
    let e = answers[1].as_ref().unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
}

/// Read pages follow continuation tokens to the end.
#[tokio::test]
async fn read_pages_and_read_all() {
    let s = new_store("client-read").await;
    let writes: Vec<TupleKey> = (0..250)
        .map(|i| t(&format!("user:r{i}"), "viewer", "document:r"))
        .collect();
    for chunk in writes.chunks(100) {
        s.client
            .write(
                &s.store_id,
                &WriteRequest::idempotent(chunk.to_vec(), vec![]),
            )
            .await
            .unwrap();
    }
    let filter = ReadFilter {
        object: Some("document:r".into()),
        ..Default::default()
    };
    let page = s
        .client
        .read(&s.store_id, &filter, Some(7), None)
        .await
        .unwrap();
    assert_eq!(page.tuples.len(), 7);
    assert!(!page.continuation_token.is_empty());
    assert_eq!(
        s.client.read_all(&s.store_id, &filter).await.unwrap().len(),
        250
    );
    // The empty filter reads the whole store.
    let all = s
        .client
        .read_all(&s.store_id, &ReadFilter::default())
        .await
        .unwrap();
    assert_eq!(all.len(), 250);
}

/// Models: read one by id, read the latest; a store without a model has none.
#[tokio::test]
async fn authorization_models_read_one_and_latest() {
    let s = new_store("client-models").await;
    let m = s
        .client
        .read_authorization_model(&s.store_id, &s.model_id)
        .await
        .unwrap();
    assert_eq!(m.id, s.model_id);
    let types: Vec<&str> = m
        .type_definitions
        .iter()
        .map(|t| t.type_name.as_str())
        .collect();
    assert_eq!(types, ["user", "group", "folder", "document"]);
    assert!(m.conditions.contains_key("non_expired"));

    let latest = s
        .client
        .read_latest_authorization_model(&s.store_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.id, s.model_id);

    let empty = s.client.create_store("client-models-empty").await.unwrap();
    assert!(s
        .client
        .read_latest_authorization_model(&empty)
        .await
        .unwrap()
        .is_none());
}

/// The health endpoint answers SERVING.
#[tokio::test]
async fn health_is_serving() {
    support::client().health().await.unwrap();
}

/// A tuple with a condition and no context of its own, written again
/// with "ignore" (a retry after a lost answer, a replay, the application
/// granting it twice), is a no-op on OpenFGA on PostgreSQL too. Before, its
/// context went out as none, which the SQL datastores compare unequal to
/// the empty one they read back: a 409 "exists with a different
/// condition", which cost a bisection and a delete and rewrite of the
/// tuple. (OpenFGA's memory datastore never showed it.)
#[tokio::test]
async fn a_conditioned_tuple_without_context_written_again_is_a_no_op_on_postgres() {
    let s = support::new_store_on(
        support::Server::Caching,
        "client-condition-again",
        &support::documents_model(),
    )
    .await;
    let fay = t("user:fay", "viewer", "document:5")
        .with_condition("non_expired", None)
        .unwrap();
    let req = WriteRequest::idempotent(vec![fay], vec![]);
    s.client.write(&s.store_id, &req).await.unwrap();
    s.client.write(&s.store_id, &req).await.unwrap();
    let held = s
        .client
        .read_all(&s.store_id, &ReadFilter::default())
        .await
        .unwrap();
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(
        held[0].condition.as_ref().map(|c| c.name.as_str()),
        Some("non_expired")
    );
}

/// The real server's 401s and unknown store are classified, and the token is
/// never part of the message.
#[tokio::test]
async fn real_server_errors_are_classified() {
    let s = new_store("client-errors").await;
    let check = CheckRequest::new("user:a", "viewer", "document:1");

    let wrong = Client::builder(support::openfga_url())
        .api_token(Secret::new("wrong-token-value"))
        .build()
        .unwrap();
    let e = wrong.check(&s.store_id, &check).await.unwrap_err();
    assert!(e.is_auth(), "{e}");
    assert!(!e.to_string().contains("wrong-token-value"), "{e}");
    assert!(!format!("{e:?}").contains(&support::openfga_token()));

    let none = Client::builder(support::openfga_url()).build().unwrap();
    assert!(none.check(&s.store_id, &check).await.unwrap_err().is_auth());

    let e = s
        .client
        .check("01ARZ3NDEKTSV4RRFFQ69G5FAV", &check)
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e}");
    // Only the store's own read says it is missing: its models list empty.
    s.client.get_store(&s.store_id).await.unwrap();
    let e = s
        .client
        .get_store("01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await
        .unwrap_err();
    assert!(
        e.is_not_found() && e.code() == Some("store_id_not_found"),
        "{e}"
    );
    let models = s
        .client
        .read_latest_authorization_model("01ARZ3NDEKTSV4RRFFQ69G5FAV")
        .await
        .unwrap();
    assert!(models.is_none());

    let e = s
        .client
        .write(
            &s.store_id,
            &WriteRequest::idempotent(vec![t("user:a", "viewer", "planet:1")], vec![]),
        )
        .await
        .unwrap_err();
    assert!(e.is_invalid_input() && e.code().is_some(), "{e}");

    // A malformed model or store id (a quoted or lower-case FGA_MODEL_ID)
    // is about the request, not its tuples: never a reason to dead-letter.
    let one = || WriteRequest::idempotent(vec![t("user:a", "viewer", "document:1")], vec![]);
    let mut w = one();
    w.authorization_model_id = Some("01jlowercase00000000000000".into());
    let e = s.client.write(&s.store_id, &w).await.unwrap_err();
    assert!(e.is_not_found() && !e.is_invalid_input(), "{e}");
    let e = s.client.write("not-a-store-id", &one()).await.unwrap_err();
    assert!(e.is_not_found() && !e.is_invalid_input(), "{e}");
    let e = s
        .client
        .read_authorization_model(&s.store_id, "01jlowercase00000000000000")
        .await
        .unwrap_err();
    assert!(e.is_not_found() && !e.is_invalid_input(), "{e}");
}

/// A closed port is a connection error, which the flusher retries.
#[tokio::test]
async fn connection_refused_is_transient() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let c = Client::builder(format!("http://127.0.0.1:{port}"))
        .build()
        .unwrap();
    let e = c.health().await.unwrap_err();
    assert!(e.is_connect() && e.is_transient(), "{e}");
}
