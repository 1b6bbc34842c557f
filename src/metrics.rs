//! Serving fga-wb's metrics to Prometheus: the counters and gauges listed
//! in the `status` module docs, on `/metrics` at an address of the
//! application's (or `fga-wb worker --metrics-addr`'s) choosing.

use std::net::SocketAddr;

use crate::error::{Error, Result};

/// Installs a Prometheus exporter as this process's metrics recorder and
/// serves `/metrics` on `addr`; every series gets a `store` label. Call it
/// once, inside a Tokio runtime, before building handles (a process has one
/// recorder: a second call fails).
///
/// ```no_run
/// # async fn f() -> fga_wb::Result<()> {
/// fga_wb::metrics::serve_prometheus("127.0.0.1:9464".parse().unwrap(), "01J...")?;
/// # Ok(()) }
/// ```
pub fn serve_prometheus(addr: SocketAddr, store: &str) -> Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .add_global_label("store", store)
        // A histogram (buckets), not a summary: quantiles over any window.
        .set_buckets_for_metric(
            Matcher::Full("fga_wb_flush_duration_seconds".into()),
            &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0],
        )
        .map_err(|e| Error::config(format!("metrics buckets: {e}")))?
        .install()
        .map_err(|e| Error::config(format!("cannot serve metrics on {addr}: {e}")))?;
    // Every series from the start, at zero: a dashboard shows 0, not "no
    // data", before the first retry or dead letter.
    for name in COUNTERS {
        metrics::counter!(*name).increment(0);
    }
    for outcome in ["ok", "rejected", "failed"] {
        metrics::counter!("fga_wb_write_requests_total", "outcome" => outcome).increment(0);
    }
    metrics::gauge!("fga_wb_pending_ops").set(0.0);
    metrics::gauge!("fga_wb_in_flight_ops").set(0.0);
    metrics::gauge!("fga_wb_oldest_pending_seconds").set(0.0);
    metrics::gauge!("fga_wb_ops_held").set(0.0);
    Ok(())
}

/// The counters fga-wb keeps (labels aside).
const COUNTERS: &[&str] = &[
    "fga_wb_ops_acknowledged_total",
    "fga_wb_ops_applied_total",
    "fga_wb_ops_coalesced_total",
    "fga_wb_ops_dead_lettered_total",
    "fga_wb_dead_letters_evicted_total",
    "fga_wb_ops_cleared_total",
    "fga_wb_write_retries_total",
    "fga_wb_write_splits_total",
    "fga_wb_write_unknown_outcomes_total",
    "fga_wb_cache_hits_total",
    "fga_wb_cache_misses_total",
    "fga_wb_higher_consistency_total",
    "fga_wb_read_waits_total",
    "fga_wb_flush_pauses_total",
    "fga_wb_redis_losses_total",
    "fga_wb_redis_leases_lost_total",
    "fga_wb_redis_term_regressed_total",
    "fga_wb_redis_under_replicated_total",
];
