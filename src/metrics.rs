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
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .add_global_label("store", store)
        .install()
        .map_err(|e| Error::config(format!("cannot serve metrics on {addr}: {e}")))
}
