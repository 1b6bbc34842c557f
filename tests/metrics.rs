//! Prometheus metrics: after a known workload, `/metrics` (served by
//! `fga_wb::metrics::serve_prometheus`) holds one series per name with the
//! counts of what happened, and the live gauges.

mod support;

use fga_wb::WriteBehind;
use support::{config_for, new_store};

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_workload_shows_in_the_scraped_metrics() {
    let s = new_store("metrics").await;
    let port = testenv::free_port().unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    fga_wb::metrics::serve_prometheus(addr, &s.store_id).unwrap();

    let mut c = config_for(&s);
    c.flush.interval = std::time::Duration::from_secs(3600);
    let wb = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    for i in 0..10 {
        wb.grant(&format!("user:u{i}"), "viewer", "document:m")
            .await
            .unwrap();
    }
    // Folded into the pending grant: 11 acknowledged, 1 coalesced.
    wb.revoke("user:u0", "viewer", "document:m").await.unwrap();
    let scrape = || async {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .expect("scrape /metrics")
            .text()
            .await
            .unwrap()
    };
    let before = scrape().await;
    let store = format!("store=\"{}\"", s.store_id);
    let pending = format!("fga_wb_pending_ops{{{store}}}");
    assert_eq!(
        value(&before, &pending),
        Some(10.0),
        "live gauge:\n{before}"
    );

    let r = wb.flush().await.unwrap();
    assert_eq!(r.applied, 10, "{r:?}");
    let text = scrape().await;
    for (series, want) in [
        (format!("fga_wb_ops_acknowledged_total{{{store}}}"), 11.0),
        (format!("fga_wb_ops_coalesced_total{{{store}}}"), 1.0),
        (format!("fga_wb_ops_applied_total{{{store}}}"), 10.0),
        (format!("fga_wb_pending_ops{{{store}}}"), 0.0),
    ] {
        assert_eq!(value(&text, &series), Some(want), "{series}:\n{text}");
    }
    // The flush's wall time is recorded (it was 0: the reports of its
    // requests carry none).
    let took = || async {
        let last = wb.status().await.unwrap().last_flush;
        last.is_some_and(|l| !l.report.duration.is_zero())
    };
    support::eventually(
        "a flush with its time",
        std::time::Duration::from_secs(10),
        took,
    )
    .await;
    let text = scrape().await;
    let sum = format!("fga_wb_flush_duration_seconds_sum{{{store}}}");
    assert!(
        value(&text, &sum).is_some_and(|s| s > 0.0),
        "{sum}:\n{text}"
    );
    let requests: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("fga_wb_write_requests_total"))
        .collect();
    assert!(!requests.is_empty(), "{text}");
    assert!(
        requests.iter().all(|l| l.contains("outcome=")),
        "one series per outcome, none without: {requests:?}"
    );

    // The shipped Grafana dashboard asks only for series that are served.
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dashboards/fga-wb.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(i) = rest.find("fga_wb_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[i + name.len()..];
                names.push(name);
            }
        }
    }
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{name}{{"))),
            "the dashboard asks for {name}, which /metrics does not serve:\n{text}"
        );
    }
    wb.shutdown().await.unwrap();

    // A Write that times out (wiremock: a server cannot be made to hang on
    // demand) is counted, and its op shows as held until the hold ends
    // (here: cut short by shutdown).
    use support::mock::*;
    let server = mock_openfga().await;
    first_write_then_ok(&server, support::fixture("hung-write").response()).await;
    let mut c = no_quick_retries(mock_config(&server));
    c.openfga.request_timeout = std::time::Duration::from_millis(300);
    c.flush.unknown_outcome_hold = std::time::Duration::from_secs(600);
    c.flush.shutdown_deadline = std::time::Duration::from_secs(1);
    let held = WriteBehind::builder(c).build().await.unwrap();
    held.grant("user:held", "viewer", "document:1")
        .await
        .unwrap();
    let unknown = format!("fga_wb_write_unknown_outcomes_total{{{store}}}");
    let ops_held = format!("fga_wb_ops_held{{{store}}}");
    support::eventually(
        "the op to show as held",
        std::time::Duration::from_secs(10),
        || async {
            let text = scrape().await;
            value(&text, &unknown) == Some(1.0) && value(&text, &ops_held) == Some(1.0)
        },
    )
    .await;
    held.shutdown().await.unwrap();
    let text = scrape().await;
    assert_eq!(value(&text, &ops_held), Some(0.0), "{ops_held}:\n{text}");

    // Every Write request sent is counted, by how it ended: a 503 sent
    // again at once is a failed request, then an ok one. Before, the
    // request retried inside a chunk was not counted at all, so the
    // outcomes did not add up to the requests `status` reports.
    let outcome = |text: &str, o: &str| {
        value(
            text,
            &format!("fga_wb_write_requests_total{{outcome=\"{o}\",{store}}}"),
        )
        .or_else(|| {
            value(
                text,
                &format!("fga_wb_write_requests_total{{{store},outcome=\"{o}\"}}"),
            )
        })
        .unwrap_or(0.0)
    };
    let before = scrape().await;
    let server = mock_openfga().await;
    first_write_then_ok(&server, support::fixture("unavailable-503").response()).await;
    let retried = manual_handle(&server).await;
    retried
        .grant("user:retried", "viewer", "document:1")
        .await
        .unwrap();
    let r = retried.flush().await.unwrap();
    assert_eq!((r.applied, r.requests), (1, 2), "{r:?}");
    let after = scrape().await;
    for (o, want) in [("ok", 1.0), ("failed", 1.0), ("rejected", 0.0)] {
        assert_eq!(
            outcome(&after, o) - outcome(&before, o),
            want,
            "{o}:\n{before}\n---\n{after}"
        );
    }
    retried.shutdown().await.unwrap();
}
