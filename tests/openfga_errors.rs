//! Error classification: the live server's refusals (each also checked
//! against its capture in `wiremock-fixtures/`, which the mocks replay), and,
//! with wiremock, what a live server cannot be made to send on demand (5xx,
//! 429, a hung answer, a garbage body). Also the OAuth2 token cache, against
//! a mocked token endpoint.

mod support;

use std::time::Duration;

use fga_wb::openfga::{CheckRequest, Client, Credentials, OAuth2, Secret, WriteRequest};
use fga_wb::{Error, TupleKey};
use support::{fixture, new_store};
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

fn t(user: &str, relation: &str, object: &str) -> TupleKey {
    TupleKey::new(user, relation, object).unwrap()
}

/// The error the live server gives `req`, checked against the capture
/// `name` (same status and code: the replayed fixtures stay true to the
/// server) and for the token it must not carry.
async fn live_error(client: &Client, store: &str, req: &WriteRequest, name: &str) -> Error {
    let e = client.write(store, req).await.unwrap_err();
    let f = fixture(name);
    assert_eq!(e.status(), Some(f.status), "{name}: {e}");
    assert_eq!(e.code(), f.body["code"].as_str(), "{name}: {e}");
    let token = support::openfga_token();
    assert!(
        !e.to_string().contains(&token) && !format!("{e:?}").contains(&token),
        "{name}: the token leaked into {e}"
    );
    e
}

/// A Write as the captures sent it: pinned to the model, without the
/// "ignore" options, so duplicates and missing deletes are refused.
fn strict(writes: Vec<TupleKey>, deletes: Vec<TupleKey>, model_id: &str) -> WriteRequest {
    WriteRequest {
        writes,
        deletes,
        authorization_model_id: Some(model_id.to_owned()),
        ..WriteRequest::default()
    }
}

/// Tuple-level 400s (and the 409 for a tuple that exists with another
/// condition, which no retry fixes), from the live server, are permanent
/// input errors carrying the server's code and message: these are what
/// bisection isolates.
#[tokio::test]
async fn invalid_input_is_permanent() {
    let s = new_store("invalid-input").await;
    let (client, store, model) = (&s.client, s.store_id.as_str(), s.model_id.as_str());
    let anne = t("user:anne", "viewer", "document:1");
    client
        .write(store, &strict(vec![anne.clone()], vec![], model))
        .await
        .unwrap();
    client
        .write(
            store,
            &strict(vec![t("user:fay", "viewer", "document:5")], vec![], model),
        )
        .await
        .unwrap();
    let mut context = serde_json::Map::new();
    context.insert("grant_time".into(), "2024-01-01T00:00:00Z".into());
    context.insert("grant_duration".into(), "1h".into());
    let fay_conditioned = t("user:fay", "viewer", "document:5")
        .with_condition("non_expired", Some(context))
        .unwrap();
    let many = (1..=101)
        .map(|i| t(&format!("user:u{i}"), "viewer", "document:many"))
        .collect();
    let carl = t("user:carl", "viewer", "document:2");
    let cases = [
        ("write-duplicate", strict(vec![anne], vec![], model)),
        (
            "delete-missing",
            strict(vec![], vec![t("user:zed", "viewer", "document:1")], model),
        ),
        (
            "write-unknown-type",
            strict(
                vec![t("user:anne", "viewer", "spreadsheet:1")],
                vec![],
                model,
            ),
        ),
        (
            "write-unknown-relation",
            strict(vec![t("user:anne", "reader", "document:1")], vec![], model),
        ),
        (
            "write-user-type-not-allowed",
            strict(vec![t("user:anne", "parent", "document:1")], vec![], model),
        ),
        (
            "write-duplicate-different-condition",
            WriteRequest {
                authorization_model_id: Some(model.to_owned()),
                ..WriteRequest::idempotent(vec![fay_conditioned], vec![])
            },
        ),
        ("write-too-many-tuples", strict(many, vec![], model)),
        (
            "write-same-key-twice",
            strict(vec![carl.clone(), carl], vec![], model),
        ),
    ];
    for (name, req) in cases {
        let e = live_error(client, store, &req, name).await;
        assert!(e.is_invalid_input(), "{name}: {e}");
        assert!(!e.is_transient() && !e.is_auth(), "{name}: {e}");
        let message = e.server_message().unwrap_or_default().to_owned();
        assert!(!message.is_empty(), "{name}: no server message in {e}");
        assert!(e.to_string().contains(&message), "{name}: {e}");
    }
}

/// 401s from the live server (missing and wrong token) are auth errors,
/// never input errors, so a bad token stops flushing instead of
/// dead-lettering everything.
#[tokio::test]
async fn refused_tokens_are_auth_errors() {
    let s = new_store("refused-tokens").await;
    let req = strict(
        vec![t("user:dan", "viewer", "document:3")],
        vec![],
        &s.model_id,
    );
    for (name, client) in [
        (
            "auth-missing-token",
            Client::builder(support::openfga_url()),
        ),
        (
            "auth-wrong-token",
            Client::builder(support::openfga_url()).api_token(Secret::new("wrong-token-value")),
        ),
    ] {
        let e = live_error(&client.build().unwrap(), &s.store_id, &req, name).await;
        assert!(e.is_auth(), "{name}: {e}");
        assert!(!e.is_invalid_input() && !e.is_transient(), "{name}: {e}");
        assert!(e.to_string().contains("FGA_API_TOKEN"), "{name}: {e}");
        assert!(!e.to_string().contains("wrong-token-value"), "{name}: {e}");
    }
}

/// An unknown store or model, on the live server, is "not found", not an
/// input error: bisecting it would dead-letter every op.
#[tokio::test]
async fn unknown_stores_and_models_are_not_found() {
    const MISSING_STORE: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    const MISSING_MODEL: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAW";
    let s = new_store("not-found").await;
    let dan = || vec![t("user:dan", "viewer", "document:3")];
    let pinned = strict(dan(), vec![], &s.model_id);
    let latest = WriteRequest {
        authorization_model_id: None,
        ..strict(dan(), vec![], &s.model_id)
    };
    for (name, req) in [
        ("store-not-found", pinned),
        ("store-not-found-no-model-id", latest),
    ] {
        let e = live_error(&s.client, MISSING_STORE, &req, name).await;
        assert!(e.is_not_found(), "{name}: {e}");
        assert!(!e.is_invalid_input() && !e.is_transient(), "{name}: {e}");
    }
    let mut check = CheckRequest::new("user:anne", "viewer", "document:1");
    check.authorization_model_id = Some(MISSING_MODEL.into());
    let e = s.client.check(&s.store_id, &check).await.unwrap_err();
    let f = fixture("model-not-found");
    assert_eq!(
        (e.status(), e.code()),
        (Some(f.status), f.body["code"].as_str()),
        "{e}"
    );
    assert!(e.is_not_found(), "{e}");
    assert!(!e.is_invalid_input() && !e.is_transient(), "{e}");
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

/// A server that never takes the connection (its accept queue full: a
/// firewall that drops packets does the same) is out of reach after
/// `connect_timeout`, and the error says so. It said "timed out after
/// 10s; raise openfga.request_timeout", which changes nothing.
#[tokio::test]
async fn a_connection_that_never_opens_names_the_connect_timeout() {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    // Never accepted: once its queue holds what it can, Linux drops the
    // next connections' SYNs, and their connects wait.
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        let one = tokio::net::TcpSocket::new_v4().unwrap();
        match tokio::time::timeout(Duration::from_secs(1), one.connect(addr)).await {
            Ok(Ok(stream)) => fillers.push(stream),
            Ok(Err(e)) => panic!("filling the accept queue: {e}"),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the accept queue never filled");
    }
    let client = Client::builder(format!("http://{addr}"))
        .timeout(Duration::from_secs(30))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let check = CheckRequest::new("user:a", "viewer", "document:1");
    let e = client.check(STORE, &check).await.unwrap_err();
    assert!(e.is_connect() && !e.is_timeout(), "{e}");
    assert!(e.is_transient(), "{e}");
    let text = e.to_string();
    assert!(text.contains("openfga.connect_timeout"), "{text}");
    assert!(!text.contains("request_timeout"), "{text}");
}

/// A token set in code that an HTTP header cannot carry is refused when
/// the client is built: reqwest refused every request with it, which read
/// as OpenFGA out of reach, retried for good. The token is never shown.
#[tokio::test]
async fn a_token_set_in_code_that_no_header_carries_is_refused() {
    let e = Client::builder("http://127.0.0.1:1")
        .api_token(Secret::new("tok-secret-1\n"))
        .build()
        .unwrap_err();
    assert!(e.is_config(), "{e}");
    assert!(e.to_string().contains("API token"), "{e}");
    assert!(!format!("{e} {e:?}").contains("tok-secret-1"), "{e}");
}

/// A token endpoint that hands out a token no header can carry is an
/// auth error naming it (it was "cannot reach OpenFGA", retried for good),
/// and a 408 from it is worth another try, as a 429 or a 5xx are.
#[tokio::test]
async fn a_token_endpoint_answer_no_header_carries_is_an_auth_error() {
    let e =
        check_with_token_answer(wiremock::ResponseTemplate::new(200).set_body_json(
            serde_json::json!({"access_token": "tok-secret-2\n", "expires_in": 300}),
        ))
        .await;
    assert!(e.is_auth() && !e.is_transient(), "{e}");
    assert!(e.to_string().contains("access_token"), "{e}");
    assert!(!format!("{e} {e:?}").contains("tok-secret-2"), "{e}");
    let e = check_with_token_answer(wiremock::ResponseTemplate::new(408)).await;
    assert!(e.is_transient() && !e.is_auth(), "{e}");
}

/// A 2xx with a JSON body that is not OpenFGA's is a clear decode error,
/// not a panic; one that is not JSON at all (a captive portal, a default
/// backend) is not OpenFGA's answer: flushing stops on it, nothing written
/// (it was taken for an unknown outcome, and every chunk held for good).
#[tokio::test]
async fn garbage_success_body_is_a_clear_error() {
    let server = MockServer::start().await;
    let (client, check, write) = check_and_write_answered(
        &server,
        wiremock::ResponseTemplate::new(200).set_body_raw("[1,", "application/json"),
        wiremock::ResponseTemplate::new(200).set_body_raw("<html>proxy</html>", "text/html"),
    )
    .await;
    assert!(check.to_string().contains("unexpected response"), "{check}");
    assert!(
        write.is_misdirected() && !write.may_have_applied(),
        "{write}"
    );
    assert!(write.to_string().contains("text/html"), "{write}");
    let req = WriteRequest::idempotent(vec![t("user:a", "viewer", "document:1")], vec![]);
    // OpenFGA's JSON under a proxy's wrong label is still its answer; an
    // unreadable body with no label at all is not.
    const OTHER: &str = "01JSTORE0000000000000000001";
    Mock::given(method("POST"))
        .and(path(format!("/stores/{OTHER}/check")))
        .respond_with(
            wiremock::ResponseTemplate::new(200).set_body_raw(r#"{"allowed":true}"#, "text/plain"),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/stores/{OTHER}/write")))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_bytes("<html>"))
        .mount(&server)
        .await;
    let allowed = client
        .check(OTHER, &CheckRequest::new("user:a", "viewer", "document:1"))
        .await
        .unwrap();
    assert!(allowed);
    let e = client.write(OTHER, &req).await.unwrap_err();
    assert!(e.is_misdirected() && !e.may_have_applied(), "{e}");
}

/// A success body past 32 MiB (OpenFGA's largest answers take well under
/// 1 MiB) is not read whole: a clear error, not an answer, whatever it
/// would have said; for a Write, one that may have applied (it is labelled
/// JSON: OpenFGA's answer, cut). Before, any body was read whole into
/// memory, and these were answered "allowed" and "written".
#[tokio::test]
async fn an_endless_success_body_is_not_read_whole() {
    let server = MockServer::start().await;
    let padding = "x".repeat(33 << 20);
    let (_, check, write) = check_and_write_answered(
        &server,
        wiremock::ResponseTemplate::new(200).set_body_raw(
            format!(r#"{{"allowed":true,"padding":"{padding}"}}"#),
            "application/json",
        ),
        wiremock::ResponseTemplate::new(200)
            .set_body_raw(format!(r#"{{"padding":"{padding}"}}"#), "application/json"),
    )
    .await;
    assert!(check.to_string().contains("over 32 MiB"), "{check}");
    assert!(write.to_string().contains("over 32 MiB"), "{write}");
    assert!(write.may_have_applied(), "{write}");
}

/// A client of `server`, where a check and a Write on `STORE` get `check`
/// and `write`, and the errors they end in.
async fn check_and_write_answered(
    server: &MockServer,
    check: wiremock::ResponseTemplate,
    write: wiremock::ResponseTemplate,
) -> (Client, fga_wb::Error, fga_wb::Error) {
    for (endpoint, answer) in [("check", check), ("write", write)] {
        Mock::given(method("POST"))
            .and(path(format!("/stores/{STORE}/{endpoint}")))
            .respond_with(answer)
            .mount(server)
            .await;
    }
    let client = Client::builder(server.uri()).build().unwrap();
    let check = client
        .check(STORE, &CheckRequest::new("user:a", "viewer", "document:1"))
        .await
        .unwrap_err();
    let req = WriteRequest::idempotent(vec![t("user:a", "viewer", "document:1")], vec![]);
    let write = client.write(STORE, &req).await.unwrap_err();
    (client, check, write)
}

/// OpenFGA never redirects: a redirect (an auth proxy's login page, http
/// to https) is not followed, and says where it led, without the
/// credentials it may carry. Followed, a 302 turned the Write into a GET
/// of the login page, whose HTML was taken for an unknown outcome; a 307
/// sent the body and its token on to wherever it pointed.
#[tokio::test]
async fn redirects_are_not_followed() {
    let server = MockServer::start().await;
    let elsewhere = MockServer::start().await;
    for (status, route) in [(302, "write"), (307, "check")] {
        Mock::given(method("POST"))
            .and(path(format!("/stores/{STORE}/{route}")))
            .respond_with(wiremock::ResponseTemplate::new(status).insert_header(
                "location",
                format!("http://sso:pw-sso@{}/login", elsewhere.address()),
            ))
            .mount(&server)
            .await;
    }
    Mock::given(wiremock::matchers::any())
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_string("{}"))
        .expect(0)
        .mount(&elsewhere)
        .await;
    let client = Client::builder(server.uri())
        .api_token(Secret::new("test-token-123"))
        .build()
        .unwrap();
    let req = WriteRequest::idempotent(vec![t("user:a", "viewer", "document:1")], vec![]);
    let e = client.write(STORE, &req).await.unwrap_err();
    assert!(
        e.is_misdirected() && !e.may_have_applied() && !e.is_transient(),
        "{e}"
    );
    assert!(e.to_string().contains("redirecting to http://***@"), "{e}");
    assert!(!e.to_string().contains("pw-sso"), "{e}");
    let e = client
        .check(STORE, &CheckRequest::new("user:a", "viewer", "document:1"))
        .await
        .unwrap_err();
    assert!(e.is_misdirected(), "{e}");
    elsewhere.verify().await;
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
    // The 4th check is refused; the token is dropped, fetched again and
    // refused again (this mock refuses every token from now on).
    let e = client.check(STORE, &check).await.unwrap_err();
    assert!(
        e.is_auth() && !e.to_string().contains("client-secret-xyz"),
        "{e}"
    );
    let _ = client.check(STORE, &check).await;
    // `expect(2)` on the token endpoint is verified when the server drops.
}

/// A mock whose token endpoint hands out `tok-1` once, then `tok-2` (each
/// expected once), and whose Writes with `tok-2` are OK (`writes` of them
/// expected).
async fn token_then_fresh_token(writes: u64) -> MockServer {
    let server = MockServer::start().await;
    for (token, first) in [("tok-1", true), ("tok-2", false)] {
        let mock = Mock::given(method("POST"))
            .and(path("/oauth/token"))
            .respond_with(wiremock::ResponseTemplate::new(200).set_body_json(
            serde_json::json!({"access_token": token, "expires_in": 3600, "token_type": "Bearer"}),
        ));
        match first {
            true => mock.up_to_n_times(1),
            false => mock,
        }
        .expect(1)
        .mount(&server)
        .await;
    }
    Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/write")))
        .and(header("authorization", "Bearer tok-2"))
        .respond_with(fixture("write-ok").response())
        .expect(writes)
        .mount(&server)
        .await;
    server
}

/// A token the server refuses before its time (the identity provider
/// revoked it, or rotated its keys) costs the request nothing: it is sent
/// again at once with a fresh token. Before, the request failed with an
/// auth error, which halts flushing, and only the next one fetched anew.
#[tokio::test]
async fn a_token_refused_early_is_replaced_within_the_request() {
    let server = token_then_fresh_token(2).await;
    Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/write")))
        .respond_with(fixture("auth-wrong-token").response())
        .expect(1)
        .mount(&server)
        .await;
    let client = oauth_client(&server, None);
    let req = WriteRequest::idempotent(vec![t("user:anne", "viewer", "document:1")], vec![]);
    client.write(STORE, &req).await.unwrap();
    client.write(STORE, &req).await.unwrap();
    // The `expect`s (one fetch of each token, one refusal) are verified as
    // the server drops.
}

/// The same with eight Writes in flight when the token is refused (a
/// worker's slots): every one is sent again with the fresh token, not
/// only the one that dropped it. The token endpoint is asked once more,
/// not once per Write.
#[tokio::test]
async fn writes_in_flight_when_a_token_is_refused_all_get_the_fresh_one() {
    let server = token_then_fresh_token(8).await;
    // Answered after the eight are all in flight with tok-1.
    Mock::given(method("POST"))
        .and(path(format!("/stores/{STORE}/write")))
        .respond_with(
            fixture("auth-wrong-token")
                .response()
                .set_delay(Duration::from_secs(1)),
        )
        .expect(8)
        .mount(&server)
        .await;
    let client = oauth_client(&server, None);
    let req = WriteRequest::idempotent(vec![t("user:anne", "viewer", "document:1")], vec![]);
    let answers = futures::future::join_all((0..8).map(|_| client.write(STORE, &req))).await;
    for a in answers {
        a.unwrap();
    }
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

/// A token response whose token comes as a JSON string (the object
/// encoded twice) is refused without the token in the error: serde's
/// words for a value of the wrong type quote the value, and the error
/// reaches the logs and `fga-wb status`.
#[tokio::test]
async fn a_token_response_encoded_twice_keeps_its_token_out_of_errors() {
    let twice =
        serde_json::to_string(r#"{"access_token":"eyJ-secret-token","expires_in":300}"#).unwrap();
    let answer = wiremock::ResponseTemplate::new(200).set_body_string(twice);
    let e = check_with_token_answer(answer).await;
    assert!(!e.to_string().contains("eyJ-secret-token"), "{e}");
    assert!(e.to_string().contains("wrong type"), "{e}");
    assert!(!e.is_transient(), "{e}");
}

/// A token response past 1 MiB (a token takes a few KiB) is not read
/// whole: the endpoint is not a token endpoint, an error naming the
/// setting, not worth retrying. Before, it was read whole, and its token
/// taken.
#[tokio::test]
async fn an_endless_token_response_is_not_read_whole() {
    let padding = "x".repeat(2 << 20);
    let endless = wiremock::ResponseTemplate::new(200).set_body_string(format!(
        r#"{{"access_token":"tok","token_type":"Bearer","expires_in":300,"padding":"{padding}"}}"#
    ));
    let e = check_with_token_answer(endless).await;
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("over 1 MiB"), "{e}");
    assert!(e.to_string().contains("token_url"), "{e}");
}

/// A token endpoint that refuses the client is an auth error naming the
/// setting to fix, without the secret.
#[tokio::test]
async fn oauth2_refusal_is_an_auth_error() {
    let e = check_with_token_answer(wiremock::ResponseTemplate::new(401)).await;
    assert!(e.is_auth(), "{e}");
    assert!(e.to_string().contains("client_secret") && !e.to_string().contains("xyz"));
}

/// Requests that queue behind a token fetch that fails share its failure
/// instead of each asking the token endpoint in turn: with an identity
/// provider that hangs until the timeout, the last of a hundred checks
/// waited a hundred timeouts. Before, the endpoint was asked ten times.
#[tokio::test]
async fn requests_behind_a_failed_token_fetch_share_its_failure() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/oauth/token"))
        .respond_with(wiremock::ResponseTemplate::new(503).set_delay(Duration::from_millis(300)))
        .expect(1)
        .mount(&server)
        .await;
    let client = oauth_client(&server, None);
    let check = CheckRequest::new("user:a", "viewer", "document:1");
    let errors = futures::future::join_all((0..10).map(|_| client.check(STORE, &check))).await;
    for e in errors {
        let e = e.unwrap_err();
        assert!(e.is_transient() && !e.is_auth(), "{e}");
    }
    // `expect(1)` on the token endpoint is verified as the server drops.
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

/// A token endpoint that redirects is not followed (a 307 sent the form,
/// client secret and all, on to wherever it pointed): the error says
/// where it points, so the setting can be fixed.
#[tokio::test]
async fn a_token_endpoint_redirect_is_not_followed() {
    let elsewhere = MockServer::start().await;
    Mock::given(wiremock::matchers::any())
        .respond_with(wiremock::ResponseTemplate::new(200))
        .expect(0)
        .mount(&elsewhere)
        .await;
    let to = format!("http://{}/oauth/token", elsewhere.address());
    let e = check_with_token_answer(
        wiremock::ResponseTemplate::new(307).insert_header("location", to.as_str()),
    )
    .await;
    assert!(e.is_auth(), "{e}");
    assert!(
        e.to_string().contains(&format!("redirecting to {to}")),
        "{e}"
    );
    elsewhere.verify().await;
}
