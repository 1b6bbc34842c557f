//! An application's own tests, written as an application team writes them:
//! only fga-wb's public API and its `test-util` doubles, no OpenFGA server,
//! no Redis. The "application" is a tiny document service below; the tests
//! check what it granted, revoked and checked.

use fga_wb::testing::{assert_nothing_pending, FakeOpenFga, FakeQueue};
use fga_wb::WriteBehind;
use serde_json::{json, Value};

/// The application's model: documents with owners and viewers.
fn model() -> Value {
    let direct_users = json!({ "directly_related_user_types": [{ "type": "user" }] });
    json!({
        "schema_version": "1.1",
        "type_definitions": [
            { "type": "user" },
            {
                "type": "document",
                "relations": {
                    "owner": { "this": {} },
                    "viewer": { "union": { "child": [
                        { "this": {} },
                        { "computedUserset": { "relation": "owner" } }
                    ] } }
                },
                "metadata": { "relations": {
                    "owner": direct_users,
                    "viewer": direct_users
                } }
            }
        ]
    })
}

/// The code under test: sharing and unsharing a document, and reading it
/// only when allowed.
struct Documents {
    wb: WriteBehind,
}

impl Documents {
    async fn create(&self, owner: &str, doc: &str) -> fga_wb::Result<()> {
        self.wb
            .grant(
                &format!("user:{owner}"),
                "owner",
                &format!("document:{doc}"),
            )
            .await
    }

    async fn share(&self, doc: &str, with: &str) -> fga_wb::Result<()> {
        self.wb
            .grant(
                &format!("user:{with}"),
                "viewer",
                &format!("document:{doc}"),
            )
            .await
    }

    async fn unshare(&self, doc: &str, with: &str) -> fga_wb::Result<()> {
        self.wb
            .revoke(
                &format!("user:{with}"),
                "viewer",
                &format!("document:{doc}"),
            )
            .await
    }

    async fn read(&self, user: &str, doc: &str) -> fga_wb::Result<Option<String>> {
        let allowed = self
            .wb
            .check(
                &format!("user:{user}"),
                "viewer",
                &format!("document:{doc}"),
            )
            .await?;
        Ok(allowed.then(|| format!("contents of {doc}")))
    }
}

#[tokio::test]
async fn sharing_grants_and_unsharing_revokes() {
    let fga = FakeOpenFga::start(model()).await.unwrap();
    let docs = Documents {
        wb: fga.write_behind().await.unwrap(),
    };

    docs.create("anne", "plan").await.unwrap();
    docs.share("plan", "bob").await.unwrap();
    assert!(docs.read("bob", "plan").await.unwrap().is_some());
    fga.assert_granted(&docs.wb, "user:anne", "owner", "document:plan")
        .await;
    fga.assert_granted(&docs.wb, "user:bob", "viewer", "document:plan")
        .await;
    fga.assert_checked("user:bob", "viewer", "document:plan");

    docs.unshare("plan", "bob").await.unwrap();
    // Read-your-writes: the revoke counts at once.
    assert!(docs.read("bob", "plan").await.unwrap().is_none());
    fga.assert_revoked(&docs.wb, "user:bob", "viewer", "document:plan")
        .await;
    assert_nothing_pending(&docs.wb).await;
    docs.wb.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_derived_relation_is_answered_as_scripted() {
    let fga = FakeOpenFga::start(model()).await.unwrap();
    let docs = Documents {
        wb: fga.write_behind().await.unwrap(),
    };
    docs.create("anne", "plan").await.unwrap();
    // The fake does not evaluate the model: owners view because the test
    // says so, as a real OpenFGA would derive.
    assert!(docs.read("anne", "plan").await.unwrap().is_none());
    fga.answer("user:anne", "viewer", "document:plan", true);
    assert!(docs.read("anne", "plan").await.unwrap().is_some());
    docs.wb.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_input_is_refused_by_the_model_before_anything_is_sent() {
    let fga = FakeOpenFga::start(model()).await.unwrap();
    let docs = Documents {
        wb: fga.write_behind().await.unwrap(),
    };
    let e = docs
        .wb
        .grant("user:anne", "editor", "document:plan")
        .await
        .unwrap_err();
    assert!(e.is_invalid_input(), "{e}");
    docs.wb.flush().await.unwrap();
    assert_eq!(fga.writes(), 0);
    assert!(fga.tuples().is_empty());
    docs.wb.shutdown().await.unwrap();
}

#[tokio::test]
async fn queue_mode_jobs_are_recorded_and_run() {
    let fga = FakeOpenFga::start(model()).await.unwrap();
    let queue = FakeQueue::new();
    let docs = Documents {
        wb: fga.write_behind_queued(&queue).await.unwrap(),
    };
    for i in 0..150 {
        docs.share("plan", &format!("u{i}")).await.unwrap();
    }
    let r = docs.wb.flush().await.unwrap();
    assert_eq!(r.queued, 150, "{r:?}");
    let jobs = queue.jobs();
    assert_eq!(
        jobs.iter().map(|j| j.ops.len()).collect::<Vec<_>>(),
        [100, 50]
    );
    assert!(jobs[0].ops.iter().all(|o| o.op == "g"));
    assert!(
        fga.tuples().is_empty(),
        "nothing written until the jobs run"
    );

    let r = queue.run(&docs.wb).await.unwrap();
    assert_eq!((r.applied, r.requests), (150, 2), "{r:?}");
    assert!(queue.jobs().is_empty());
    assert!(fga.has("user:u149", "viewer", "document:plan"));
    assert_nothing_pending(&docs.wb).await;
    docs.wb.shutdown().await.unwrap();
}

/// The fake reads one object as OpenFGA does: `document:1` is not
/// `document:10` (it matched by prefix); `document:` reads every document.
#[tokio::test]
async fn the_fake_reads_an_object_exactly() {
    let fga = FakeOpenFga::start(model()).await.unwrap();
    let wb = fga.write_behind().await.unwrap();
    for doc in ["document:1", "document:10"] {
        wb.grant("user:anne", "viewer", doc).await.unwrap();
    }
    wb.flush().await.unwrap();
    let read = |object: &str| {
        let filter = fga_wb::openfga::ReadFilter {
            user: Some("user:anne".into()),
            relation: Some("viewer".into()),
            object: Some(object.into()),
        };
        let wb = wb.clone();
        async move { wb.read(&filter).await.unwrap().len() }
    };
    assert_eq!(read("document:1").await, 1);
    assert_eq!(read("document:").await, 2);
    wb.shutdown().await.unwrap();
}
