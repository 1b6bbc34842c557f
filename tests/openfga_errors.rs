//! Error classification, replayed with wiremock from bodies captured from the
//! real OpenFGA (`wiremock-fixtures/`, made by scripts/capture-fixtures), plus
//! the hand-written 5xx / 429 / hung responses a live server cannot be made to
//! send. Also the OAuth2 token cache, against a mocked token endpoint.

mod support;

use std::time::Duration;

use fga_wb::openfga::{CheckRequest, Client, Credentials, OAuth2, Secret, WriteRequest};
use fga_wb::{Error, TupleKey};
use support::fixture;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer};

const STORE: &str = "01JSTORE0000000000000000000";

/// A write against a mock that answers with fixture `name`.
async fn write_with(name: &str) -> Error {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/write")))
        .respond_with(fixture(name).response())
        .mount(&server)
        .await;
    let client = Client::builder(server.uri())
        .api_token(Secret::new("test-token-123"))
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let req = WriteRequest::idempotent(
        vec![TupleKey::new("user:anne", "viewer", "document:1").unwrap()],
        vec![],
    );
    let e = client.write(STORE, &req).await.unwrap_err();
    assert!(
        !e.to_string().contains("test-token-123") && !format!("{e:?}").contains("test-token-123"),
        "the token leaked into {e}"
    );
    e
}

/// Tuple-level 400s (and the 409 for a tuple that exists with another
/// condition, which no retry fixes) from the real server are permanent input errors, carrying
/// the server's code and message: these are what bisection isolates.
#[tokio::test]
async fn invalid_input_fixtures_are_permanent() {
    for (name, code) in [
        ("write-duplicate", "write_failed_due_to_invalid_input"),
        ("delete-missing", "write_failed_due_to_invalid_input"),
        ("write-unknown-type", "validation_error"),
        ("write-unknown-relation", "validation_error"),
        ("write-user-type-not-allowed", "validation_error"),
        ("write-too-many-tuples", "exceeded_entity_limit"),
        (
            "write-same-key-twice",
            "cannot_allow_duplicate_tuples_in_one_request",
        ),
        ("write-duplicate-different-condition", "Aborted"),
    ] {
        let e = write_with(name).await;
        assert!(e.is_invalid_input(), "{name}: {e}");
        assert!(!e.is_transient() && !e.is_auth(), "{name}: {e}");
        let status = fixture(name).status;
        assert_eq!(e.status(), Some(status), "{name}");
        assert_eq!(e.code(), Some(code), "{name}");
        let expected = fixture(name).body["message"].as_str().unwrap().to_owned();
        assert_eq!(e.server_message(), Some(expected.as_str()), "{name}");
        assert!(e.to_string().contains(&expected), "{name}: {e}");
    }
}

/// 401s (missing and wrong token) are auth errors, never input errors, so a
/// bad token stops flushing instead of dead-lettering everything.
#[tokio::test]
async fn auth_fixtures_are_auth_errors() {
    for name in ["auth-missing-token", "auth-wrong-token"] {
        let e = write_with(name).await;
        assert!(e.is_auth(), "{name}: {e}");
        assert!(!e.is_invalid_input() && !e.is_transient(), "{name}: {e}");
        assert!(e.to_string().contains("FGA_API_TOKEN"), "{name}: {e}");
    }
}

/// An unknown store or model is "not found", not an input error: bisecting it
/// would dead-letter every op.
#[tokio::test]
async fn not_found_fixtures_are_not_found() {
    for name in [
        "store-not-found",
        "model-not-found",
        "store-not-found-no-model-id",
        "store-not-found-get-store",
    ] {
        let e = write_with(name).await;
        assert!(e.is_not_found(), "{name}: {e}");
        assert!(!e.is_invalid_input() && !e.is_transient(), "{name}: {e}");
    }
}

/// 500 and 503 are transient.
#[tokio::test]
async fn server_errors_are_transient() {
    for (name, status) in [("server-error-500", 500), ("unavailable-503", 503)] {
        let e = write_with(name).await;
        assert!(e.is_transient(), "{name}: {e}");
        assert_eq!(e.status(), Some(status));
        assert!(!e.is_invalid_input());
    }
}

/// 429 is transient and exposes Retry-After.
#[tokio::test]
async fn rate_limit_is_transient_with_retry_after() {
    let e = write_with("rate-limited-429").await;
    assert!(e.is_transient(), "{e}");
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    assert!(e.to_string().contains("retry after 3s"), "{e}");
}

/// A response that never comes is a timeout, and transient.
#[tokio::test]
async fn hung_response_times_out_as_transient() {
    let e = write_with("hung-write").await;
    assert!(e.is_timeout() && e.is_transient(), "{e}");
}

/// A 2xx with a body that is not OpenFGA's is a clear decode error, not a panic.
#[tokio::test]
async fn garbage_success_body_is_a_clear_error() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_string("<html>proxy</html>"))
        .mount(&server)
        .await;
    let client = Client::builder(server.uri()).build().unwrap();
    let e = client
        .check(STORE, &CheckRequest::new("user:a", "viewer", "document:1"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unexpected response"), "{e}");
}

/// Every Read on `server` answers the captured page (with its token).
async fn mount_read_page(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/read")))
        .respond_with(fixture("read-page").response())
        .mount(server)
        .await;
}

/// A Read that hands back the token it was sent (a broken server or proxy)
/// ends with a clear error. Before, reading every page never ended, and
/// the tuples piled up.
#[tokio::test]
async fn a_read_whose_token_repeats_ends() {
    let server = MockServer::start().await;
    mount_read_page(&server).await;
    let client = Client::builder(server.uri()).build().unwrap();
    let all = fga_wb::openfga::ReadFilter::default();
    let read = tokio::time::timeout(Duration::from_secs(30), client.read_all(STORE, &all));
    let e = read.await.expect("the read ended").unwrap_err();
    assert!(
        e.to_string().contains("continuation token came back twice"),
        "{e}"
    );
}

/// Captured success bodies decode.
#[tokio::test]
async fn captured_success_bodies_decode() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/check")))
        .respond_with(fixture("check-allowed").response())
        .mount(&server)
        .await;
    mount_read_page(&server).await;
    let client = Client::builder(server.uri()).build().unwrap();
    assert!(client
        .check(
            STORE,
            &CheckRequest::new("user:anne", "viewer", "document:1")
        )
        .await
        .unwrap());
    let page = client
        .read(STORE, &Default::default(), Some(1), None)
        .await
        .unwrap();
    assert_eq!(page.tuples.len(), 1);
    assert!(!page.continuation_token.is_empty());
}

/// `/oauth/token` on `server` hands out `tok-1`, living `expires_in`
/// seconds, and expects to be asked `times` times.
async fn mount_token(server: &MockServer, expires_in: serde_json::Value, times: u64) {
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(
            serde_json::json!({"access_token": "tok-1", "expires_in": expires_in, "token_type": "Bearer"}),
        ))
        .expect(times)
        .mount(server)
        .await;
}

/// A client of `server` with client credentials, its token endpoint
/// `/oauth/token` on the same server.
fn oauth_client(server: &MockServer, audience: Option<&str>) -> Client {
    Client::builder(server.uri())
        .credentials(Credentials::ClientCredentials(OAuth2 {
            token_url: format!("{}/oauth/token", server.uri()),
            client_id: "id".into(),
            client_secret: Secret::new("client-secret-xyz"),
            audience: audience.map(str::to_owned),
            scopes: None,
        }))
        .build()
        .unwrap()
}

/// OAuth2 client credentials: the token is fetched once and reused while it
/// is fresh, sent as a bearer, and fetched again after a 401.
#[tokio::test]
async fn oauth2_token_is_cached_and_refreshed_after_401() {
    let server = MockServer::start().await;
    mount_token(&server, 3600.into(), 2).await;
    Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/check")))
        .and(header("authorization", "Bearer tok-1"))
        .respond_with(fixture("check-allowed").response())
        .up_to_n_times(3)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/check")))
        .respond_with(fixture("auth-wrong-token").response())
        .mount(&server)
        .await;
    let client = oauth_client(&server, Some("https://api.fga.example"));
    let check = CheckRequest::new("user:anne", "viewer", "document:1");
    for _ in 0..3 {
        assert!(client.check(STORE, &check).await.unwrap());
    }
    // The 4th check is refused; the token is dropped and fetched again next time.
    let e = client.check(STORE, &check).await.unwrap_err();
    assert!(
        e.is_auth() && !e.to_string().contains("client-secret-xyz"),
        "{e}"
    );
    let _ = client.check(STORE, &check).await;
    // `expect(2)` on the token endpoint is verified when the server drops.
}

/// A 401 that a new token does not cure (OpenFGA's wrong audience or
/// issuer, its access control) fetches a token again once, not for every
/// request. Before, each refused request dropped the token, and each next
/// one waited on the token endpoint.
#[tokio::test]
async fn refused_tokens_are_not_fetched_again_for_every_request() {
    let server = MockServer::start().await;
    mount_token(&server, 3600.into(), 2).await;
    Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/check")))
        .respond_with(fixture("auth-wrong-token").response())
        .mount(&server)
        .await;
    let client = oauth_client(&server, None);
    let check = CheckRequest::new("user:anne", "viewer", "document:1");
    for _ in 0..10 {
        assert!(client.check(STORE, &check).await.unwrap_err().is_auth());
    }
    // `expect(2)` on the token endpoint is verified as the server drops.
}

/// A token is reused within its life: one that claims to live longer than a
/// clock holds (kept at most a day), not a panic in the middle of every
/// call; and one that lives a minute, not fetched again for every request
/// (the refresh margin was a fixed minute, which left it no life at all).
/// Its life may come as a string, as some identity providers send it
/// (Azure AD's v1 endpoint): before, that response was unreadable, taken
/// for refused credentials, and nothing was ever written.
#[tokio::test]
async fn oauth2_tokens_are_reused_within_their_life() {
    for (expires_in, checks) in [
        (serde_json::json!(u64::MAX), 2),
        (serde_json::json!(60), 5),
        (serde_json::json!("3599"), 5),
    ] {
        let server = MockServer::start().await;
        mount_token(&server, expires_in, 1).await;
        Mock::given(method("POST"))
            .and(path(format!("/stores/{STORE}/check")))
            .and(header("authorization", "Bearer tok-1"))
            .respond_with(fixture("check-allowed").response())
            .mount(&server)
            .await;
        let client = oauth_client(&server, None);
        let check = CheckRequest::new("user:anne", "viewer", "document:1");
        for _ in 0..checks {
            assert!(client.check(STORE, &check).await.unwrap());
        }
        // `expect(1)` on the token endpoint is verified as the server drops.
    }
}

/// A token response cut off mid-body is worth another try: a transient
/// failure, not refused credentials (which stop flushing until an operator
/// looks). Before, any unreadable body was taken for refused credentials.
#[tokio::test]
async fn oauth2_token_response_cut_off_is_transient() {
    let cut_off = wiremock::ResponseTemplate::new(200).set_body_string("{\"access_token\":\"tok");
    let e = check_with_token_answer(cut_off).await;
    assert!(e.is_transient() && !e.is_auth(), "{e}");
}

/// A token endpoint that refuses the client is an auth error naming the
/// setting to fix, without the secret.
#[tokio::test]
async fn oauth2_refusal_is_an_auth_error() {
    let e = check_with_token_answer(wiremock::ResponseTemplate::new(401)).await;
    assert!(e.is_auth(), "{e}");
    assert!(e.to_string().contains("client_secret") && !e.to_string().contains("xyz"));
}

/// The error of a check whose token endpoint answers `answer`.
async fn check_with_token_answer(answer: wiremock::ResponseTemplate) -> fga_wb::Error {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(answer)
        .mount(&server)
        .await;
    let client = oauth_client(&server, None);
    client
        .check(STORE, &CheckRequest::new("user:a", "viewer", "document:1"))
        .await
        .unwrap_err()
}
