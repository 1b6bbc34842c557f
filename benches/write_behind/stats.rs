//! Statistics and printing, and small helpers every section uses.

use super::*;

// ---------------------------------------------------------------------------
// Statistics and printing
// ---------------------------------------------------------------------------

/// Latencies in nanoseconds, sorted.
pub(crate) struct Lat(pub(crate) Vec<u64>);

impl Lat {
    pub(crate) fn new(mut v: Vec<u64>) -> Lat {
        v.sort_unstable();
        Lat(v)
    }

    /// The q-quantile (nearest rank).
    pub(crate) fn q(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        let rank = (q * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    pub(crate) fn median(&self) -> u64 {
        self.q(0.5)
    }

    pub(crate) fn max(&self) -> u64 {
        self.0.last().copied().unwrap_or(0)
    }

    pub(crate) fn mean(&self) -> f64 {
        self.0.iter().sum::<u64>() as f64 / self.0.len().max(1) as f64
    }
}

pub(crate) fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// A latency, in the unit that suits it.
pub(crate) fn fmt_ns(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 10_000.0 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1_000_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

pub(crate) fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

pub(crate) fn heading(title: &str) {
    println!("== {title} ==");
}

pub(crate) fn lat_header() {
    println!(
        "{:<44} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "", "calls", "median", "p99", "p99.9", "max"
    );
}

pub(crate) fn lat_row(name: &str, l: &Lat) {
    println!(
        "{:<44} {:>9} {:>10} {:>10} {:>10} {:>10}",
        name,
        l.0.len(),
        fmt_ns(l.median()),
        fmt_ns(l.q(0.99)),
        fmt_ns(l.q(0.999)),
        fmt_ns(l.max())
    );
}

/// The `k` slowest calls as (index, latency), in call order.
pub(crate) fn slowest(lat: &[u64], k: usize) -> Vec<(usize, u64)> {
    let mut v: Vec<(usize, u64)> = lat.iter().copied().enumerate().collect();
    v.sort_unstable_by_key(|&(_, l)| std::cmp::Reverse(l));
    v.truncate(k);
    v.sort_unstable();
    v
}

/// Calls slower than `threshold` ns: how many, the most common distance
/// between consecutive ones, and how many are that far apart.
pub(crate) fn periodicity(lat: &[u64], threshold: u64) -> (usize, usize, usize) {
    let slow: Vec<usize> = (0..lat.len()).filter(|&i| lat[i] > threshold).collect();
    let mut gaps = std::collections::HashMap::<usize, usize>::new();
    for w in slow.windows(2) {
        *gaps.entry(w[1] - w[0]).or_default() += 1;
    }
    let (gap, count) = gaps
        .into_iter()
        .max_by_key(|&(g, c)| (c, std::cmp::Reverse(g)))
        .unwrap_or((0, 0));
    (slow.len(), gap, count)
}

pub(crate) fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

pub(crate) fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "?".into())
    };
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    // A `go install` build calls itself `dev`; its path names the version.
    let openfga = std::env::var("FGA_WB_TEST_OPENFGA_BIN").unwrap_or_else(|_| "?".into());
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    println!("== machine ==");
    println!("nproc:    {nproc}");
    println!(
        "cpu:      {} ({} MHz)",
        field("model name"),
        field("cpu MHz")
    );
    println!("memory:   {:.1} GiB", mem_kib as f64 / 1024.0 / 1024.0);
    println!("kernel:   {}", kernel.trim());
    println!("rustc:    {rustc}");
    println!("openfga:  {openfga} (memory datastore, on this machine, preshared key)");
    let redis = std::env::var("FGA_WB_TEST_REDIS_BIN")
        .ok()
        .and_then(|bin| Command::new(bin).arg("--version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into());
    println!("redis:    {redis} (on this machine, loopback)");
    println!("fga-wb:   release build; memory store, inline flush unless a section says otherwise; no tracing subscriber or metrics recorder installed");
    println!("callers:  one task on a tokio multi-thread runtime ({nproc} workers), unless a section says otherwise");
    let t = timer_overhead();
    println!(
        "timer:    Instant::now() pair costs {} median (included in every per-call figure)",
        fmt_ns(t)
    );
    println!();
}

pub(crate) fn timer_overhead() -> u64 {
    let mut v = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        let t = Instant::now();
        v.push(ns(t.elapsed()));
    }
    Lat::new(v).median()
}

/// The 1, 5 and 15 minute load averages: other work on this machine skews
/// every figure, so each section reports it.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

pub(crate) fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

/// Flushes until nothing is pending or in flight; fails after `limit`.
/// Returns the number of flush() calls and of those that reported an error
/// (transient errors leave ops pending; the next flush() retries them).
pub(crate) async fn flush_all(wb: &WriteBehind, limit: Duration) -> Res<(u32, u64)> {
    let deadline = Instant::now() + limit;
    let (mut flushes, mut errors) = (0, 0);
    loop {
        let p = wb.pending().await?;
        if p.total + p.in_flight == 0 {
            return Ok((flushes, errors));
        }
        if Instant::now() > deadline {
            return Err(format!("still pending after {limit:?}: {p:?}").into());
        }
        let r = wb.flush().await?;
        flushes += 1;
        if let Some(e) = r.error {
            errors += 1;
            eprintln!("note: flush reported an error (ops stay pending, retried): {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Drops what is pending and stops the flusher (benchmarks that only fill
/// the buffer).
pub(crate) async fn discard(wb: WriteBehind) -> Res<()> {
    wb.clear().await?;
    let r = wb.shutdown().await?;
    if r.left.total > 0 {
        eprintln!("note: {} ops left at shutdown", r.left.total);
    }
    Ok(())
}
