//! `examples/axum.rs` as a team would run it: started against the real
//! OpenFGA, called over HTTP, stopped with SIGTERM; every grant it
//! acknowledged is in OpenFGA afterwards (its flush interval is an hour, so
//! only the shutdown's drain can have written them).

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{new_store, stored};

fn example_binary() -> PathBuf {
    // target/debug/deps/<this test> -> target/debug/examples/axum
    let exe = std::env::current_exe().expect("test binary path");
    let debug = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let bin = debug.join("examples").join("axum");
    assert!(
        bin.is_file(),
        "{} is missing: `cargo test` builds it; alone, run `cargo build --example axum` first",
        bin.display()
    );
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_axum_example_grants_checks_and_drains_on_sigterm() {
    let s = new_store("axum-example").await;
    let port = testenv::free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let child = tokio::process::Command::new(example_binary())
        .env_clear()
        .env("FGA_API_URL", support::openfga_url())
        .env("FGA_API_TOKEN", support::openfga_token())
        .env("FGA_STORE_ID", &s.store_id)
        .env("FGA_MODEL_ID", &s.model_id)
        .env("FGA_WB_FLUSH__INTERVAL", "1h")
        .env("FGA_WB_FLUSH__EAGER_REVOKES", "false")
        .env("FGA_WB_EXAMPLE_ADDR", format!("127.0.0.1:{port}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start examples/axum (built by cargo test)");

    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!(
            "{base}/check?user=user:x&relation=viewer&object=document:x"
        ))
        .send()
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the example did not start listening"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    for i in 0..20 {
        let r = http
            .post(format!("{base}/grant"))
            .json(&json!({ "user": format!("user:u{i}"), "relation": "viewer", "object": "document:1" }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    let r = http
        .post(format!("{base}/grant"))
        .json(&json!({ "user": "user:bad id", "relation": "viewer", "object": "document:1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "a bad tuple is the client's error");
    let check = |user: &str| {
        let url = format!("{base}/check?user={user}&relation=viewer&object=document:1");
        let http = http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    assert_eq!(check("user:u3").await["allowed"], true);
    assert_eq!(check("user:nobody").await["allowed"], false);
    let doc_at = |user: &'static str, id: &'static str| {
        let http = http.clone();
        let url = format!("{base}/documents/{id}");
        async move {
            http.get(url)
                .header("x-user", user)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    let doc = |user| doc_at(user, "1");
    assert_eq!(doc("user:u4").await, 200);
    // The id checked is the one served: `/documents/a%62c` is document
    // `abc`, whatever a grant of the literal `a%62c` allows.
    let r = http
        .post(format!("{base}/grant"))
        .json(&json!({ "user": "user:mallory", "relation": "viewer", "object": "document:a%62c" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(doc_at("user:mallory", "a%62c").await, 403);
    assert_eq!(doc("user:nobody").await, 403);
    let r = http
        .post(format!("{base}/revoke"))
        .json(&json!({ "user": "user:u0", "relation": "viewer", "object": "document:1" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(doc("user:u0").await, 403, "revoked at once");
    assert!(
        stored(&s).await.is_empty(),
        "nothing written before the shutdown"
    );

    let out = support::terminate(child, Duration::from_secs(30)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("0 left"), "{stdout}");
    let held = stored(&s).await;
    assert_eq!(held.len(), 20, "{held:?}");
    assert!(!held.contains(&"document:1#viewer@user:u0".to_string()));
}
