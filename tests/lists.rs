//! `list_objects`, `list_users` and `read` see every acknowledged grant
//! and revoke, as check does, on the memory and the Redis store. (The
//! differential test compares whole lists with an oracle under random ops.)
#![cfg(feature = "redis")]

#[macro_use]
mod support;

use std::time::Duration;

use fga_wb::config::StoreKind;
use fga_wb::openfga::{ListObjectsRequest, ListUsersRequest, ReadFilter};
use fga_wb::testing::FakeOpenFga;
use fga_wb::{TupleKey, WriteBehind};
use support::{config_for, new_store, TestStore};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    Memory,
    Redis,
}

async fn setup(name: &str, setup: Setup, automatic_flush: bool) -> (TestStore, WriteBehind) {
    let s = new_store(&format!("{name}-{setup:?}")).await;
    let mut c = config_for(&s);
    if setup == Setup::Redis {
        c.buffer.store = StoreKind::Redis;
        c.redis.url = support::redis_url();
    }
    c.flush.interval = Duration::from_secs(3600);
    c.check.revoke_wait_timeout = Duration::from_millis(300);
    let wb = WriteBehind::builder(c)
        .automatic_flush(automatic_flush)
        .build()
        .await
        .expect("handle");
    (s, wb)
}

fn keys(v: &[TupleKey]) -> Vec<String> {
    v.iter().map(ToString::to_string).collect()
}

async fn pending_grants_are_listed_and_read(setup_: Setup) {
    let (_s, wb) = setup("lists-grants", setup_, false).await;
    wb.grant("user:bob", "viewer", "document:2").await.unwrap();
    wb.flush().await.unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    wb.grant("user:anne", "owner", "document:3").await.unwrap();

    let objects = wb
        .list_objects(&ListObjectsRequest::new("user:anne", "viewer", "document"))
        .await
        .unwrap();
    // owner implies editor implies viewer.
    assert_eq!(objects, ["document:1", "document:3"]);
    let users = wb
        .list_users(&ListUsersRequest::new("document:1", "viewer", "user"))
        .await
        .unwrap();
    assert_eq!(users, ["user:anne"]);

    let all = wb.read(&ReadFilter::default()).await.unwrap();
    assert_eq!(
        keys(&all),
        [
            "document:1#viewer@user:anne",
            "document:2#viewer@user:bob",
            "document:3#owner@user:anne"
        ]
    );
    let anne = wb
        .read(&ReadFilter {
            user: Some("user:anne".into()),
            object: Some("document:".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        keys(&anne),
        ["document:1#viewer@user:anne", "document:3#owner@user:anne"]
    );
}

async fn a_pending_revoke_never_shows_in_a_list_or_read(setup_: Setup) {
    let (_s, wb) = setup("lists-revokes", setup_, false).await;
    wb.grant("user:bob", "viewer", "document:2").await.unwrap();
    wb.flush().await.unwrap();
    wb.revoke("user:bob", "viewer", "document:2").await.unwrap();
    // Nothing writes it (flushing is manual): every read path fails closed.
    let lo = wb
        .list_objects(&ListObjectsRequest::new("user:bob", "viewer", "document"))
        .await;
    assert!(matches!(&lo, Err(e) if e.is_stale_check()), "{lo:?}");
    let lu = wb
        .list_users(&ListUsersRequest::new("document:2", "viewer", "user"))
        .await;
    assert!(matches!(&lu, Err(e) if e.is_stale_check()), "{lu:?}");
    let rd = wb
        .read(&ReadFilter {
            object: Some("document:2".into()),
            ..Default::default()
        })
        .await;
    assert!(matches!(&rd, Err(e) if e.is_stale_check()), "{rd:?}");
    // An empty relation filters nothing, here too (the revoke was missed).
    let rd = wb
        .read(&ReadFilter {
            object: Some("document:2".into()),
            relation: Some(String::new()),
            ..Default::default()
        })
        .await;
    assert!(matches!(&rd, Err(e) if e.is_stale_check()), "{rd:?}");
    // Another document's users do not wait for it.
    let other = wb
        .list_users(&ListUsersRequest::new("document:9", "viewer", "user"))
        .await
        .unwrap();
    assert!(other.is_empty());

    wb.flush().await.unwrap();
    let lo = wb
        .list_objects(&ListObjectsRequest::new("user:bob", "viewer", "document"))
        .await
        .unwrap();
    assert!(lo.is_empty(), "{lo:?}");
    assert!(wb.read(&ReadFilter::default()).await.unwrap().is_empty());
}

/// A tuple OpenFGA deleted and wrote again while a read went through its
/// pages (a condition replaced by another process) comes on a later page
/// too: the read returns it once, as the later page has it. Before, it
/// was returned twice (wiremock: two pages, as OpenFGA orders them).
#[tokio::test]
async fn a_tuple_written_again_between_pages_is_read_once() {
    use support::mock::{manual_handle, mock_openfga, STORE};
    use wiremock::matchers::{body_partial_json, method, path};
    let server = mock_openfga().await;
    let page = |condition: serde_json::Value, token: &str| {
        wiremock::ResponseTemplate::new(200).set_body_json(serde_json::json!({
            "tuples": [{"key": {"user": "user:anne", "relation": "viewer",
                "object": "document:1", "condition": condition},
                "timestamp": "2026-11-22T02:22:16.055774471Z"}],
            "continuation_token": token,
        }))
    };
    let read = format!("/stores/{STORE}/read");
    wiremock::Mock::given(method("POST"))
        .and(path(read.as_str()))
        .and(body_partial_json(
            serde_json::json!({"continuation_token": "MXw="}),
        ))
        .respond_with(page(serde_json::Value::Null, ""))
        .with_priority(1)
        .mount(&server)
        .await;
    let old = serde_json::json!({"name": "non_expired", "context": {"grant_duration": "1h"}});
    wiremock::Mock::given(method("POST"))
        .and(path(read.as_str()))
        .respond_with(page(old, "MXw="))
        .mount(&server)
        .await;
    let wb = manual_handle(&server).await;
    let filter = ReadFilter {
        object: Some("document:".into()),
        ..Default::default()
    };
    let tuples = wb.read(&filter).await.unwrap();
    assert_eq!(tuples.len(), 1, "{tuples:?}");
    assert!(tuples[0].condition.is_none(), "{tuples:?}");
}

/// A Read filter's user without an id (`group:#member`) is, to OpenFGA's
/// datastores, every user of its type: pending grants of any such user
/// show, and a pending revoke of one holds the read, as OpenFGA's own
/// answer after the flush confirms. Before, the filter was taken for one
/// user named `group:#member`, and the pending grant was missing.
async fn a_user_filter_without_an_id_reads_every_user_of_its_type(setup_: Setup) {
    let (s, wb) = setup("lists-user-type", setup_, false).await;
    wb.grant("group:eng#member", "viewer", "document:1")
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    wb.flush().await.unwrap();
    wb.grant("group:x#member", "viewer", "document:1")
        .await
        .unwrap();
    let filter = ReadFilter {
        user: Some("group:#member".into()),
        object: Some("document:1".into()),
        ..Default::default()
    };
    assert_eq!(
        keys(&wb.read(&filter).await.unwrap()),
        [
            "document:1#viewer@group:eng#member",
            "document:1#viewer@group:x#member"
        ]
    );
    wb.revoke("group:eng#member", "viewer", "document:1")
        .await
        .unwrap();
    let rd = wb.read(&filter).await;
    assert!(matches!(&rd, Err(e) if e.is_stale_check()), "{rd:?}");
    wb.flush().await.unwrap();
    let expected = ["document:1#viewer@group:x#member"];
    assert_eq!(keys(&wb.read(&filter).await.unwrap()), expected);
    let held = s.client.read_all(&s.store_id, &filter).await.unwrap();
    assert_eq!(keys(&held), expected, "OpenFGA's own answer");
}

/// The fake OpenFGA of `fga_wb::testing` reads and lists users as the
/// real server does, with the real server as the oracle: the filter shapes
/// OpenFGA refuses are refused (an application's "what can this user
/// see" passed its tests on the fake, then failed with a 400), a userset
/// type (`group:#member`) reads every userset of its type, and ListUsers is
/// served (it was answered "not found", which reads as a wrong store id).
#[tokio::test]
async fn the_fake_reads_and_lists_users_as_openfga_does() {
    let s = new_store("lists-fake-oracle").await;
    let fake = FakeOpenFga::start(support::documents_model())
        .await
        .unwrap();
    let real = WriteBehind::builder(config_for(&s)).build().await.unwrap();
    let faked = fake.write_behind().await.unwrap();
    for wb in [&real, &faked] {
        for (u, r, o) in [
            ("user:anne", "viewer", "document:1"),
            ("group:eng#member", "viewer", "document:2"),
            ("user:*", "viewer", "document:3"),
            ("user:bob", "member", "group:eng"),
            ("group:x#member", "member", "group:eng"),
        ] {
            wb.grant(u, r, o).await.unwrap();
        }
        wb.flush().await.unwrap();
    }
    let filters = [
        (Some("user:anne"), None, None),
        (None, Some("viewer"), None),
        (None, None, Some("document:")),
        (None, None, Some("document")),
        (None, Some("viewer"), Some("document:")),
        (Some("user:anne"), Some("viewer"), None),
        (Some("user:anne"), None, Some("document:")),
        (None, None, Some("document:1")),
        (Some("group:#member"), None, Some("document:")),
        (Some("group:#member"), Some("viewer"), Some("document:2")),
        (Some("group:eng#member"), None, Some("document:")),
        (Some("user:#member"), None, Some("document:")),
        (Some("user:"), None, Some("document:")),
        (Some("user:anne"), Some("view#er"), Some("document:1")),
        (Some("user:anne"), None, Some("d")),
        // Spaces Go's patterns do not count, and lengths in characters.
        (Some("user:anne\u{a0}smith"), None, Some("document:")),
        (None, None, Some("document:文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文文")),
        (Some("user:anne"), Some("жжжжжжжжжжжжжжжжжжжжжжжжжж"), Some("document:1")),
    ];
    for (user, relation, object) in filters {
        let filter = ReadFilter {
            user: user.map(Into::into),
            relation: relation.map(Into::into),
            object: object.map(Into::into),
        };
        let sorted = |read: fga_wb::Result<Vec<TupleKey>>| {
            read.map(|t| {
                let mut k = keys(&t);
                k.sort();
                k
            })
        };
        same_answer(
            &format!("{filter:?}"),
            sorted(real.read(&filter).await),
            sorted(faked.read(&filter).await),
        );
    }
    // Pending grants go as contextual tuples.
    for wb in [&real, &faked] {
        wb.grant("user:carl", "member", "group:eng").await.unwrap();
    }
    for (object, relation, users) in [
        ("group:eng", "member", "user"),
        ("group:eng", "member", "group#member"),
        ("document:3", "viewer", "user"),
        ("group:eng", "no_such_relation", "user"),
        ("group:eng", "member", "no_such_type"),
    ] {
        let request = ListUsersRequest::new(object, relation, users);
        same_answer(
            &format!("{object} {relation} {users}"),
            real.list_users(&request).await,
            faked.list_users(&request).await,
        );
    }
    real.shutdown().await.unwrap();
    faked.shutdown().await.unwrap();
}

/// The fake's answer (`got`) is OpenFGA's (`want`): the same value, or
/// both refused as invalid input with the same code.
fn same_answer<T: PartialEq + std::fmt::Debug>(
    what: &str,
    want: fga_wb::Result<T>,
    got: fga_wb::Result<T>,
) {
    match (want, got) {
        (Ok(want), Ok(got)) => assert_eq!(got, want, "{what}"),
        (Err(want), Err(got)) => assert!(
            want.is_invalid_input() && got.is_invalid_input() && got.code() == want.code(),
            "{what}: OpenFGA {want}; the fake {got}"
        ),
        (want, got) => panic!("{what}: OpenFGA {want:?}; the fake {got:?}"),
    }
}

for_each_setup!(
    [memory => super::Setup::Memory, redis => super::Setup::Redis]
    pending_grants_are_listed_and_read,
    a_pending_revoke_never_shows_in_a_list_or_read,
    a_user_filter_without_an_id_reads_every_user_of_its_type,
);
