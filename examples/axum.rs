//! fga-wb inside a web service (axum): one `WriteBehind` in shared state,
//! routes that grant, revoke and check, a check as middleware in front of a
//! document route, and a graceful shutdown that drains through
//! `wb.shutdown()`.
//!
//! ```text
//! FGA_API_URL=http://127.0.0.1:8080 FGA_API_TOKEN=... FGA_STORE_ID=01J... \
//!     cargo run --example axum            # listens on FGA_WB_EXAMPLE_ADDR or 127.0.0.1:3000
//!
//! curl -X POST localhost:3000/grant  -H 'content-type: application/json' \
//!      -d '{"user":"user:anne","relation":"viewer","object":"document:1"}'
//! curl 'localhost:3000/check?user=user:anne&relation=viewer&object=document:1'
//! curl localhost:3000/documents/1 -H 'x-user: user:anne'      # 200, or 403
//! ```
//!
//! Errors fail closed: a check that errs answers 403 / `allowed: false`
//! with the reason, never "allowed".

use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use fga_wb::WriteBehind;
use serde::Deserialize;

#[derive(Deserialize)]
struct Tuple {
    user: String,
    relation: String,
    object: String,
}

/// A refused op says why, with the status a client can act on.
fn refused(e: fga_wb::Error) -> Response {
    let status = if e.is_invalid_input() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, e.to_string()).into_response()
}

async fn grant(State(wb): State<WriteBehind>, Json(t): Json<Tuple>) -> Response {
    match wb.grant(&t.user, &t.relation, &t.object).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refused(e),
    }
}

async fn revoke(State(wb): State<WriteBehind>, Json(t): Json<Tuple>) -> Response {
    match wb.revoke(&t.user, &t.relation, &t.object).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => refused(e),
    }
}

async fn check(State(wb): State<WriteBehind>, Query(t): Query<Tuple>) -> Response {
    match wb.check(&t.user, &t.relation, &t.object).await {
        Ok(allowed) => Json(serde_json::json!({ "allowed": allowed })).into_response(),
        Err(e) => {
            Json(serde_json::json!({ "allowed": false, "error": e.to_string() })).into_response()
        }
    }
}

/// Lets a request through only if its `x-user` can view the document.
/// The id comes from the route's own extractor, as the handler's does: the
/// raw path is still percent-encoded, and checking `a%62c` while serving
/// `abc` would let a grant on one document open another.
async fn can_view(
    State(wb): State<WriteBehind>,
    Path(id): Path<String>,
    req: Request,
    next: Next,
) -> Response {
    let user = req
        .headers()
        .get("x-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    match wb.check(&user, "viewer", &format!("document:{id}")).await {
        Ok(true) => next.run(req).await,
        Ok(false) => StatusCode::FORBIDDEN.into_response(),
        Err(e) => (StatusCode::FORBIDDEN, e.to_string()).into_response(),
    }
}

async fn document(Path(id): Path<String>) -> String {
    format!("document {id}\n")
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // fga-wb says what needs an operator (dead letters, flushing stopped,
    // refused credentials) through `tracing`: a service shows it.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = fga_wb::Config::load(None)?;
    let wb = WriteBehind::builder(config).build().await?;
    let app = Router::new()
        .route("/grant", post(grant))
        .route("/revoke", post(revoke))
        .route("/check", get(check))
        .route(
            "/documents/{id}",
            get(document).route_layer(middleware::from_fn_with_state(wb.clone(), can_view)),
        )
        .with_state(wb.clone());
    let addr = std::env::var("FGA_WB_EXAMPLE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    let (stopping, mut stop) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown_signal().await;
        let _ = stopping.send(true);
    });
    // Requests get 10 s to finish after the signal: one that hangs must
    // not keep what the others acknowledged from being drained (nor make
    // a SIGKILL, which loses the memory store's ops, the only way out).
    tokio::select! {
        served = server => served?,
        _ = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        } => eprintln!("requests still running 10 s after the signal: draining anyway"),
    }
    // Requests are done (or had their 10 s: the handle refuses what they
    // try from now on); what they acknowledged goes to OpenFGA now.
    let report = wb.shutdown().await?;
    println!(
        "drained: {} applied, {} left",
        report.flushed.applied,
        report.left.total + report.left.in_flight
    );
    Ok(())
}
