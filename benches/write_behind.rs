//! Benchmarks of fga-wb against a real OpenFGA, each figure printed next to
//! what it is compared with. Not a test: it prints tables.
//!
//! Run through `scripts/bench [section...]`, which builds in release mode and
//! starts a throw-away OpenFGA (`scripts/servers`). Sections: `ack`,
//! `throughput`, `coalesce`, `checks`, `memory`; none means all. Each section
//! runs in a fresh process (the binary re-runs itself), so one section's
//! allocations never show in another's memory figure.
//!
//! The throughput section also starts a second OpenFGA, from the same
//! binary, on the sqlite datastore: the memory datastore's Write scans every
//! stored tuple, so it cannot take 100k tuples in reasonable time.
//!
//! `FGA_WB_BENCH_SCALE=0.1` shrinks every count (for a quick try; the
//! targets are stated for the full counts).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use fga_wb::openfga::{CheckRequest, Client, ReadFilter, Secret, WriteRequest};
use fga_wb::{Config, TupleKey, WriteBehind};
use futures::stream::{self, TryStreamExt};

const SECTIONS: &[&str] = &["ack", "throughput", "coalesce", "checks", "memory"];
const RELATION: &str = "viewer";
/// Set in the environment of the per-section child processes.
const CHILD_ENV: &str = "FGA_WB_BENCH_CHILD";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = std::result::Result<T, BoxError>;

fn main() {
    // `cargo bench` appends `--bench`; anything starting with `-` is not a section.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for a in &args {
        if !SECTIONS.contains(&a.as_str()) {
            eprintln!("unknown section {a:?}; sections: {}", SECTIONS.join(", "));
            std::process::exit(2);
        }
    }
    let sections: Vec<&str> = if args.is_empty() {
        SECTIONS.to_vec()
    } else {
        SECTIONS
            .iter()
            .copied()
            .filter(|s| args.iter().any(|a| a == s))
            .collect()
    };

    if std::env::var_os(CHILD_ENV).is_some() {
        let section = sections[0];
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        if let Err(e) = rt.block_on(run_section(section)) {
            eprintln!("section {section} failed: {e}");
            std::process::exit(1);
        }
        return;
    }

    print_machine();
    let exe = std::env::current_exe().expect("current exe");
    let mut failed = Vec::new();
    for s in sections {
        let status = Command::new(&exe)
            .arg(s)
            .env(CHILD_ENV, "1")
            .status()
            .expect("run section");
        if !status.success() {
            failed.push(s);
        }
    }
    if !failed.is_empty() {
        eprintln!("sections failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}

async fn run_section(section: &str) -> Res<()> {
    let env = Env::from_env()?;
    let load = loadavg();
    let started = Instant::now();
    match section {
        "ack" => ack(&env).await?,
        "throughput" => throughput(&env).await?,
        "coalesce" => coalesce(&env).await?,
        "checks" => checks(&env).await?,
        "memory" => memory(&env).await?,
        _ => unreachable!("sections are checked in main"),
    }
    println!(
        "(section took {:.1} s; load average before it: {})\n",
        started.elapsed().as_secs_f64(),
        load
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Set-up
// ---------------------------------------------------------------------------

struct Env {
    url: String,
    token: String,
    client: Client,
    model: serde_json::Value,
    scale: f64,
}

impl Env {
    fn from_env() -> Res<Env> {
        let var = |n: &str| {
            std::env::var(n).map_err(|_| {
                format!(
                    "{n} is not set: run the benchmarks with scripts/bench, which starts OpenFGA"
                )
            })
        };
        let url = var("FGA_WB_TEST_OPENFGA_URL")?;
        let token = var("FGA_WB_TEST_OPENFGA_TOKEN")?;
        let client = Client::builder(&url)
            .api_token(Secret::new(token.clone()))
            .build()?;
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/models/documents.json");
        let model = serde_json::from_str(&std::fs::read_to_string(path)?)?;
        let scale = match std::env::var("FGA_WB_BENCH_SCALE") {
            Ok(s) => s
                .parse::<f64>()
                .map_err(|e| format!("FGA_WB_BENCH_SCALE: {e}"))?,
            Err(_) => 1.0,
        };
        Ok(Env {
            url,
            token,
            client,
            model,
            scale,
        })
    }

    /// `n` scaled by `FGA_WB_BENCH_SCALE`, at least 1.
    fn n(&self, n: usize) -> usize {
        ((n as f64 * self.scale).round() as usize).max(1)
    }

    /// The same settings, for another OpenFGA server.
    fn with_server(&self, url: &str, token: &str) -> Res<Env> {
        Ok(Env {
            url: url.to_owned(),
            token: token.to_owned(),
            client: Client::builder(url)
                .api_token(Secret::new(token.to_owned()))
                .build()?,
            model: self.model.clone(),
            scale: self.scale,
        })
    }

    /// A fresh store with the documents model.
    async fn store(&self, name: &str) -> Res<Store> {
        let id = self.client.create_store(name).await?;
        let model_id = self
            .client
            .write_authorization_model(&id, &self.model)
            .await?;
        Ok(Store { id, model_id })
    }

    /// Default settings, pointed at `store`.
    fn config(&self, store: &Store) -> Config {
        let mut c = Config::default();
        c.openfga.api_url.clone_from(&self.url);
        c.openfga.api_token = Secret::new(self.token.clone());
        c.openfga.store_id.clone_from(&store.id);
        c.openfga.model_id.clone_from(&store.model_id);
        c
    }

    /// Settings that never flush by themselves: only the buffer is measured.
    fn deferred_config(&self, store: &Store) -> Config {
        let mut c = self.config(store);
        c.buffer.capacity = 2_000_000;
        c.flush.batch_size = 100_000_000;
        c.flush.interval = Duration::from_secs(24 * 3600);
        c
    }

    /// How many tuples the store holds (Read, 100 per page).
    async fn count(&self, store: &Store) -> Res<usize> {
        Ok(self
            .client
            .read_all(&store.id, &ReadFilter::default())
            .await?
            .len())
    }
}

struct Store {
    id: String,
    model_id: String,
}

/// The i-th distinct tuple: 1000 users per document,
/// e.g. `user:user-0042 viewer document:doc-0000123`.
struct Tuples {
    user: String,
    object: String,
}

impl Tuples {
    fn new() -> Self {
        Tuples {
            user: String::with_capacity(32),
            object: String::with_capacity(32),
        }
    }

    /// Fills the buffers with the i-th tuple (no allocation after the first).
    fn set(&mut self, i: usize) -> (&str, &str) {
        self.user.clear();
        self.object.clear();
        let _ = write!(self.user, "user:user-{:04}", i % 1000);
        let _ = write!(self.object, "document:doc-{:07}", i / 1000);
        (&self.user, &self.object)
    }
}

fn tuple(i: usize) -> TupleKey {
    let mut t = Tuples::new();
    let (u, o) = t.set(i);
    TupleKey::new(u, RELATION, o).expect("valid tuple")
}

/// A small fast PRNG (splitmix64), so the benchmark needs no extra crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------
// Statistics and printing
// ---------------------------------------------------------------------------

/// Latencies in nanoseconds, sorted.
struct Lat(Vec<u64>);

impl Lat {
    fn new(mut v: Vec<u64>) -> Lat {
        v.sort_unstable();
        Lat(v)
    }

    /// The q-quantile (nearest rank).
    fn q(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        let rank = (q * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    fn median(&self) -> u64 {
        self.q(0.5)
    }

    fn max(&self) -> u64 {
        self.0.last().copied().unwrap_or(0)
    }

    fn mean(&self) -> f64 {
        self.0.iter().sum::<u64>() as f64 / self.0.len().max(1) as f64
    }
}

fn ns(d: Duration) -> u64 {
    d.as_nanos() as u64
}

/// A latency, in the unit that suits it.
fn fmt_ns(ns: u64) -> String {
    let ns = ns as f64;
    if ns < 10_000.0 {
        format!("{:.2} µs", ns / 1e3)
    } else if ns < 1_000_000.0 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "MISSED"
    }
}

fn heading(title: &str) {
    println!("== {title} ==");
}

fn lat_header() {
    println!(
        "{:<44} {:>9} {:>10} {:>10} {:>10} {:>10}",
        "", "calls", "median", "p99", "p99.9", "max"
    );
}

fn lat_row(name: &str, l: &Lat) {
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
fn slowest(lat: &[u64], k: usize) -> Vec<(usize, u64)> {
    let mut v: Vec<(usize, u64)> = lat.iter().copied().enumerate().collect();
    v.sort_unstable_by_key(|&(_, l)| std::cmp::Reverse(l));
    v.truncate(k);
    v.sort_unstable();
    v
}

/// Calls slower than `threshold` ns: how many, the most common distance
/// between consecutive ones, and how many are that far apart.
fn periodicity(lat: &[u64], threshold: u64) -> (usize, usize, usize) {
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

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn print_machine() {
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
    println!("fga-wb:   release build; memory store, inline flush; no tracing subscriber or metrics recorder installed");
    println!("callers:  one task on a tokio multi-thread runtime ({nproc} workers)");
    let t = timer_overhead();
    println!(
        "timer:    Instant::now() pair costs {} median (included in every per-call figure)",
        fmt_ns(t)
    );
    println!();
}

fn timer_overhead() -> u64 {
    let mut v = Vec::with_capacity(100_000);
    for _ in 0..100_000 {
        let t = Instant::now();
        v.push(ns(t.elapsed()));
    }
    Lat::new(v).median()
}

/// The 1, 5 and 15 minute load averages: other work on this machine skews
/// every figure, so each section reports it.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn rss_bytes() -> u64 {
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
async fn flush_all(wb: &WriteBehind, limit: Duration) -> Res<(u32, u64)> {
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
async fn discard(wb: WriteBehind) -> Res<()> {
    wb.clear().await?;
    let r = wb.shutdown().await?;
    if r.left.total > 0 {
        eprintln!("note: {} ops left at shutdown", r.left.total);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Acknowledgement latency
// ---------------------------------------------------------------------------

/// Per-call latencies of `n` grants, and the slowest calls with their index.
async fn grant_latencies(
    wb: &WriteBehind,
    n: usize,
    offset: usize,
) -> Res<(Lat, Vec<(usize, u64)>)> {
    let mut t = Tuples::new();
    // Warm-up on other tuples: page in code and the maps' first buckets.
    for i in 0..1000 {
        let (u, o) = t.set(offset + n + i);
        wb.grant(u, RELATION, o).await?;
    }
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let (u, o) = t.set(offset + i);
        let start = Instant::now();
        wb.grant(u, RELATION, o).await?;
        lat.push(ns(start.elapsed()));
    }
    let slowest = slowest(&lat, 5);
    Ok((Lat::new(lat), slowest))
}

async fn ack(env: &Env) -> Res<()> {
    let n = env.n(1_000_000);
    let writes = env.n(2000);
    heading("1. Acknowledgement latency: grant() vs a direct Write of one tuple");
    println!(
        "{n} grants of distinct tuples, one caller, each call timed with Instant; buffer capacity 2M."
    );

    // (a) Only the buffer: nothing flushes while granting.
    let store = env.store("bench-ack-deferred").await?;
    let wb = WriteBehind::builder(env.deferred_config(&store))
        .build()
        .await?;
    let (deferred, deferred_slow) = grant_latencies(&wb, n, 0).await?;
    discard(wb).await?;

    // (b) Default flush settings: the flusher writes to OpenFGA meanwhile.
    let store = env.store("bench-ack-default").await?;
    let mut cfg = env.config(&store);
    cfg.buffer.capacity = 2_000_000;
    let flush_cfg = cfg.flush.clone();
    let wb = WriteBehind::builder(cfg).build().await?;
    let started = Instant::now();
    let (background, background_slow) = grant_latencies(&wb, n, 0).await?;
    let grant_time = started.elapsed();
    let st = wb.status().await?;
    discard(wb).await?;

    // Direct writes, one tuple each, one after another.
    let store = env.store("bench-ack-direct").await?;
    let write_one = |i: usize| {
        let mut req = WriteRequest::idempotent(vec![tuple(i)], vec![]);
        req.authorization_model_id = Some(store.model_id.clone());
        req
    };
    for i in 0..20 {
        env.client
            .write(&store.id, &write_one(10_000_000 + i))
            .await?;
    }
    let mut lat = Vec::with_capacity(writes);
    for i in 0..writes {
        let req = write_one(i);
        let start = Instant::now();
        env.client.write(&store.id, &req).await?;
        lat.push(ns(start.elapsed()));
    }
    let direct = Lat::new(lat);

    lat_header();
    lat_row("grant, flush deferred (buffer only)", &deferred);
    lat_row("grant, default flush running", &background);
    lat_row("direct client.write, 1 tuple, sequential", &direct);
    println!(
        "(b) used batch_size={} interval={:?} max_parallel_requests={}; while granting ({:.2} s) the flusher applied {} ops",
        flush_cfg.batch_size,
        flush_cfg.interval,
        flush_cfg.max_parallel_requests,
        grant_time.as_secs_f64(),
        st.totals.applied
    );
    println!(
        "mean grant: {} deferred, {} with flushing",
        fmt_ns(deferred.mean() as u64),
        fmt_ns(background.mean() as u64)
    );
    println!(
        "direct write median / grant median: {:.0}x (deferred), {:.0}x (flushing)",
        direct.median() as f64 / deferred.median().max(1) as f64,
        direct.median() as f64 / background.median().max(1) as f64
    );
    let show = |slow: &[(usize, u64)]| {
        slow.iter()
            .map(|&(i, l)| format!("#{i} {}", fmt_ns(l)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "slowest grants (op #: latency), buffer only: {}",
        show(&deferred_slow)
    );
    println!(
        "slowest grants (op #: latency), flushing:    {}",
        show(&background_slow)
    );
    let target = 10_000;
    println!(
        "target grant p99 <= 10 µs: deferred {} -> {}; default flush {} -> {}",
        fmt_ns(deferred.q(0.99)),
        verdict(deferred.q(0.99) <= target),
        fmt_ns(background.q(0.99)),
        verdict(background.q(0.99) <= target)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. End-to-end throughput
// ---------------------------------------------------------------------------

/// One timed run: `n` tuples from the first call until OpenFGA has them all.
struct Run {
    side: &'static str,
    n: usize,
    time: Duration,
    requests: u64,
    /// Failed requests that were sent again.
    retries: u64,
    /// Tuples Read back from the store afterwards.
    stored: usize,
}

impl Run {
    fn rate(&self) -> f64 {
        rate(self.n, self.time)
    }
}

/// Sends `req`, again on a transient failure (at most 5 tries); returns the
/// number of retries.
async fn write_retrying(client: &Client, store: &str, req: &WriteRequest) -> Res<u64> {
    let mut retries = 0;
    loop {
        match client.write(store, req).await {
            Ok(()) => return Ok(retries),
            Err(e) if e.is_transient() && retries < 4 => {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn run_fga_wb(env: &Env, n: usize) -> Res<Run> {
    let store = env.store("bench-tp-fgawb").await?;
    let wb = WriteBehind::builder(env.config(&store)).build().await?;
    let mut t = Tuples::new();
    let started = Instant::now();
    for i in 0..n {
        let (u, o) = t.set(i);
        wb.grant(u, RELATION, o).await?;
    }
    let (_, errors) = flush_all(&wb, Duration::from_secs(300)).await?;
    let time = started.elapsed();
    let st = wb.status().await?;
    wb.shutdown().await?;
    if st.totals.dead_lettered > 0 {
        return Err(format!("{} ops dead-lettered", st.totals.dead_lettered).into());
    }
    Ok(Run {
        side: "fga-wb",
        n,
        time,
        requests: st.totals.requests,
        retries: st.totals.retries.max(errors),
        stored: env.count(&store).await?,
    })
}

async fn run_raw(env: &Env, n: usize, per_write: usize, parallel: usize) -> Res<Run> {
    let store = env.store("bench-tp-raw").await?;
    let reqs: Vec<WriteRequest> = (0..n)
        .collect::<Vec<_>>()
        .chunks(per_write)
        .map(|c| {
            let mut r = WriteRequest::idempotent(c.iter().map(|&i| tuple(i)).collect(), vec![]);
            r.authorization_model_id = Some(store.model_id.clone());
            r
        })
        .collect();
    let retries = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    stream::iter(reqs.iter().map(Ok::<_, BoxError>))
        .try_for_each_concurrent(parallel, |r| async {
            let n = write_retrying(&env.client, &store.id, r).await?;
            retries.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        })
        .await?;
    let time = started.elapsed();
    Ok(Run {
        side: "raw",
        n,
        time,
        requests: reqs.len() as u64,
        retries: retries.into_inner(),
        stored: env.count(&store).await?,
    })
}

async fn run_per_tuple(env: &Env, n: usize, parallel: usize) -> Res<Run> {
    let store = env.store("bench-tp-single").await?;
    let retries = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    stream::iter((0..n).map(Ok::<_, BoxError>))
        .try_for_each_concurrent(parallel, |i| {
            let mut r = WriteRequest::idempotent(vec![tuple(i)], vec![]);
            r.authorization_model_id = Some(store.model_id.clone());
            let (client, store_id, retries) = (&env.client, &store.id, &retries);
            async move {
                let n = write_retrying(client, store_id, &r).await?;
                retries.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            }
        })
        .await?;
    let time = started.elapsed();
    Ok(Run {
        side: "per-tuple",
        n,
        time,
        requests: n as u64,
        retries: retries.into_inner(),
        stored: env.count(&store).await?,
    })
}

/// fga-wb and the raw ceiling `rounds` times (alternating which goes
/// first), then the per-tuple baseline once; prints the table and ratios.
async fn throughput_on(env: &Env, n: usize, n_single: usize, rounds: usize) -> Res<()> {
    let cfg = Config::default();
    let parallel = cfg.flush.max_parallel_requests;
    let per_write = cfg.flush.max_tuples_per_write;
    let mut runs = Vec::new();
    for round in 0..rounds {
        if round % 2 == 0 {
            runs.push((round, run_fga_wb(env, n).await?));
            runs.push((round, run_raw(env, n, per_write, parallel).await?));
        } else {
            runs.push((round, run_raw(env, n, per_write, parallel).await?));
            runs.push((round, run_fga_wb(env, n).await?));
        }
    }
    runs.push((0, run_per_tuple(env, n_single, 10).await?));

    let name = |side: &str| match side {
        "fga-wb" => "fga-wb: grant() each, then flush() until empty".to_owned(),
        "raw" => format!("raw ceiling: {per_write}-tuple Writes, {parallel} in parallel"),
        _ => "per-tuple: 1 Write per tuple, 10 in parallel".to_owned(),
    };
    println!(
        "{:<50} {:>5} {:>7} {:>9} {:>10} {:>9} {:>7} {:>8}",
        "", "round", "tuples", "time", "tuples/s", "requests", "retried", "verified"
    );
    for (round, r) in &runs {
        println!(
            "{:<50} {:>5} {:>7} {:>7.2} s {:>10.0} {:>9} {:>7} {:>8}",
            name(r.side),
            round + 1,
            r.n,
            r.time.as_secs_f64(),
            r.rate(),
            r.requests,
            r.retries,
            if r.stored == r.n {
                "yes".to_owned()
            } else {
                format!("NO {}", r.stored)
            }
        );
    }
    // Aggregate rate of each side over its rounds.
    let agg = |side: &str| {
        let (k, t) = runs
            .iter()
            .filter(|(_, r)| r.side == side)
            .fold((0usize, Duration::ZERO), |(k, t), (_, r)| {
                (k + r.n, t + r.time)
            });
        rate(k, t)
    };
    println!(
        "retried: requests sent again after a transient error (fga-wb: flushes that hit one and were retried)"
    );
    let (wb, raw, single) = (agg("fga-wb"), agg("raw"), agg("per-tuple"));
    if n_single != n {
        println!(
            "the per-tuple baseline ran on {n_single} tuples (not {n}) to bound the run time; sides are compared in tuples/s"
        );
    }
    println!(
        "fga-wb {wb:.0} tuples/s, raw ceiling {raw:.0}, per-tuple {single:.0}{}",
        if rounds > 1 { " (over all rounds)" } else { "" }
    );
    let vs_single = wb / single;
    let vs_raw = wb / raw;
    println!(
        "fga-wb / per-tuple: {vs_single:.1}x  (target >= 20x: {}); raw ceiling / per-tuple: {:.1}x",
        verdict(vs_single >= 20.0),
        raw / single
    );
    println!(
        "fga-wb / raw ceiling: {vs_raw:.2}x  (target >= 0.9x: {})",
        verdict(vs_raw >= 0.9)
    );
    Ok(())
}

async fn throughput(env: &Env) -> Res<()> {
    heading(
        "2. End-to-end throughput: distinct grants, from the first call until all are in OpenFGA",
    );
    println!(
        "Every run writes to its own fresh store and is checked afterwards by reading the whole store back \
         (verified: the Read returns exactly that many tuples). fga-wb uses the default settings."
    );
    let n_mem = env.n(5_000);
    println!();
    println!(
        "2a. OpenFGA, memory datastore (the scripts/servers one): its Write compares every tuple written \
         with every tuple already in the store, under one lock, so a tuple costs more the bigger the store; \
         100k tuples take minutes and hit its 3 s request deadline. So every side writes the same {n_mem} tuples; \
         fga-wb and the raw ceiling run three times, alternating which goes first."
    );
    throughput_on(env, n_mem, n_mem, 3).await?;

    let server = Server::sqlite(env).await?;
    let sqlite = env.with_server(&server.url, &server.token)?;
    let n = env.n(100_000);
    let n_single = env.n(10_000);
    println!();
    println!(
        "2b. OpenFGA, sqlite datastore (indexed; started by this benchmark from the same openfga binary, \
         database in {}): {n} tuples; fga-wb and the raw ceiling run three times, alternating which goes first.",
        server.dir.display()
    );
    throughput_on(&sqlite, n, n_single, 3).await?;
    drop(server);
    Ok(())
}

/// An extra OpenFGA on the sqlite datastore, stopped (and its files removed)
/// on drop. `scripts/servers` kills it too if this process dies, as it stops
/// the whole process group of the command it runs.
struct Server {
    child: std::process::Child,
    dir: std::path::PathBuf,
    url: String,
    token: String,
}

impl Server {
    async fn sqlite(env: &Env) -> Res<Server> {
        let bin = std::env::var("FGA_WB_TEST_OPENFGA_BIN")
            .map_err(|_| "FGA_WB_TEST_OPENFGA_BIN is not set: run through scripts/bench")?;
        let dir = std::env::temp_dir().join(format!("fga-wb-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let uri = format!("file:{}", dir.join("openfga.db").display());
        let log = |name: &str| std::fs::File::create(dir.join(name));
        let migrated = Command::new(&bin)
            .args([
                "migrate",
                "--datastore-engine",
                "sqlite",
                "--datastore-uri",
                &uri,
            ])
            .args(["--log-level", "warn"])
            .stdout(log("migrate.log")?)
            .stderr(log("migrate.err")?)
            .status()?;
        if !migrated.success() {
            return Err(format!("openfga migrate failed; see {}", dir.display()).into());
        }
        let free_port = || -> Res<u16> {
            Ok(std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port())
        };
        let (http, grpc) = (free_port()?, free_port()?);
        let token = format!(
            "bench-{:016x}",
            Rng(env.scale.to_bits() ^ u64::from(std::process::id())).next()
        );
        let child = Command::new(&bin)
            .args([
                "run",
                "--datastore-engine",
                "sqlite",
                "--datastore-uri",
                &uri,
            ])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
            .args(["--playground-enabled=false", "--metrics-enabled=false"])
            .args(["--profiler-enabled=false", "--log-level", "warn"])
            .args([
                "--authn-method",
                "preshared",
                "--authn-preshared-keys",
                &token,
            ])
            .stdin(std::process::Stdio::null())
            .stdout(log("openfga.log")?)
            .stderr(log("openfga.err")?)
            .spawn()?;
        let server = Server {
            child,
            dir,
            url: format!("http://127.0.0.1:{http}"),
            token,
        };
        let client = Client::builder(&server.url).build()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while client.health().await.is_err() {
            if Instant::now() > deadline {
                return Err("the sqlite OpenFGA did not become healthy in 60 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// 3. Coalescing
// ---------------------------------------------------------------------------

async fn coalesce(env: &Env) -> Res<()> {
    let updates = env.n(1_000_000);
    let keys = env.n(10_000);
    heading("3. Coalescing: random grant/revoke updates over a small key set, then flush");
    let store = env.store("bench-coalesce").await?;
    let cfg = env.config(&store);
    let wb = WriteBehind::builder(cfg.clone()).build().await?;
    let mut rng = Rng(0x5EED);
    let mut granted = vec![false; keys];
    let mut t = Tuples::new();
    let started = Instant::now();
    for _ in 0..updates {
        let r = rng.next();
        let k = (r % keys as u64) as usize;
        let grant = (r >> 32) & 1 == 1;
        let (u, o) = t.set(k);
        if grant {
            wb.grant(u, RELATION, o).await?;
        } else {
            wb.revoke(u, RELATION, o).await?;
        }
        granted[k] = grant;
    }
    let update_time = started.elapsed();
    let during = wb.status().await?.totals;
    let (flushes, _) = flush_all(&wb, Duration::from_secs(120)).await?;
    let total_time = started.elapsed();
    let totals = wb.status().await?.totals;
    wb.shutdown().await?;

    // The store must hold exactly the keys whose last op was a grant.
    let stored: HashSet<(String, String)> = env
        .client
        .read_all(&store.id, &ReadFilter::default())
        .await?
        .into_iter()
        .map(|t| (t.user, t.object))
        .collect();
    let expected: HashSet<(String, String)> = (0..keys)
        .filter(|&k| granted[k])
        .map(|k| {
            let (u, o) = t.set(k);
            (u.to_owned(), o.to_owned())
        })
        .collect();
    let sent = totals.applied + totals.dead_lettered;
    println!(
        "{updates} updates (grant or revoke, uniformly random) over {keys} keys, default settings \
         (revokes are flushed eagerly, grants at batch_size={} or interval={:?})",
        cfg.flush.batch_size, cfg.flush.interval
    );
    println!("{:<56} {:>12}", "", "count");
    let row = |name: &str, v: u64| println!("{name:<56} {v:>12}");
    row("updates acknowledged", totals.acknowledged);
    let during_sent = during.applied + during.dead_lettered;
    row("tuple ops sent to OpenFGA while updating", during_sent);
    row(
        "tuple ops sent after the last update returned",
        sent - during_sent,
    );
    row("tuple ops sent to OpenFGA, in total", sent);
    row("Write requests, in total", totals.requests);
    row("ops coalesced away (never sent)", totals.coalesced);
    row("ops dead-lettered", totals.dead_lettered);
    println!(
        "updates took {:.2} s; flush() until empty: {} calls; total {:.2} s",
        update_time.as_secs_f64(),
        flushes,
        total_time.as_secs_f64()
    );
    println!(
        "final state in OpenFGA equals the last op per key: {} ({} tuples stored, {} expected)",
        if stored == expected { "yes" } else { "NO" },
        stored.len(),
        expected.len()
    );
    println!(
        "tuple ops sent per key: {:.2} (a flush writes each key's newest op at most once; flushes start \
         while updates arrive, at once for a pending revoke and at batch_size for grants)",
        sent as f64 / keys as f64
    );
    println!(
        "target tuple ops sent <= {keys}: {} -> {}",
        sent,
        verdict(sent <= keys as u64)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. Checks
// ---------------------------------------------------------------------------

async fn checks(env: &Env) -> Res<()> {
    let hits = env.n(1_000_000);
    let misses = env.n(2000);
    heading("4. Checks: cache hits, and misses vs a raw Check");
    let store = env.store("bench-checks").await?;
    // Tuples in OpenFGA, none pending: tuple(i) for i < 2 * misses.
    let written = 2 * misses + 2;
    let reqs: Vec<WriteRequest> = (0..written)
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|c| WriteRequest::idempotent(c.iter().map(|&i| tuple(i)).collect(), vec![]))
        .collect();
    for r in &reqs {
        env.client.write(&store.id, r).await?;
    }
    let wb = WriteBehind::builder(env.config(&store)).build().await?;

    // Cache hits: one tuple, checked again and again after one miss.
    let (u, o) = {
        let t = tuple(written - 1);
        (t.user, t.object)
    };
    if !wb.check(&u, RELATION, &o).await? {
        return Err("the cached tuple should be allowed".into());
    }
    let before = wb.status().await?.totals;
    for _ in 0..1000 {
        wb.check(&u, RELATION, &o).await?;
    }
    let mut lat = Vec::with_capacity(hits);
    for _ in 0..hits {
        let start = Instant::now();
        let a = wb.check(&u, RELATION, &o).await?;
        lat.push(ns(start.elapsed()));
        debug_assert!(a);
    }
    let periodic = periodicity(&lat, 2000);
    let hit = Lat::new(lat);
    let after = wb.status().await?.totals;

    // Misses: distinct tuples, alternately through fga-wb and raw, same
    // request shape (model id pinned on both). Even i: an allowed tuple;
    // odd i: a denied one (user and document that share no tuple).
    let probe = |i: usize, side: usize| -> (TupleKey, bool) {
        let base = 2 * i + side;
        if i % 2 == 0 {
            (tuple(base), true)
        } else {
            (tuple(base + 1_000_000), false)
        }
    };
    let warm = 50;
    for i in 0..warm {
        let (t, _) = probe(misses + i, 0);
        let (r, _) = probe(misses + i, 1);
        let _ = wb.check(&t.user, RELATION, &t.object).await?;
        let mut req = CheckRequest::new(r.user, RELATION, r.object);
        req.authorization_model_id = Some(store.model_id.clone());
        let _ = env.client.check(&store.id, &req).await?;
    }
    let mut wb_lat = Vec::with_capacity(misses);
    let mut raw_lat = Vec::with_capacity(misses);
    let mut wrong = 0;
    let misses_before = wb.status().await?.totals.cache_misses;
    for i in 0..misses {
        let (t, want_t) = probe(i, 0);
        let (r, want_r) = probe(i, 1);
        let mut req = CheckRequest::new(r.user, RELATION, r.object);
        req.authorization_model_id = Some(store.model_id.clone());
        for side in [i % 2, 1 - i % 2] {
            if side == 0 {
                let start = Instant::now();
                let a = wb.check(&t.user, RELATION, &t.object).await?;
                wb_lat.push(ns(start.elapsed()));
                wrong += usize::from(a != want_t);
            } else {
                let start = Instant::now();
                let a = env.client.check(&store.id, &req).await?;
                raw_lat.push(ns(start.elapsed()));
                wrong += usize::from(a != want_r);
            }
        }
    }
    let wb_misses = wb.status().await?.totals.cache_misses - misses_before;
    wb.shutdown().await?;
    let wb_miss = Lat::new(wb_lat);
    let raw = Lat::new(raw_lat);

    lat_header();
    lat_row("wb.check, cache hit (same tuple)", &hit);
    lat_row("wb.check, miss (distinct tuples, none pending)", &wb_miss);
    lat_row("client.check, raw (same kind of tuples)", &raw);
    println!(
        "cache hits counted during the hit loop: {} of {}; misses counted during the miss loop: {} of {}",
        after.cache_hits - before.cache_hits,
        hits + 1000,
        wb_misses,
        misses
    );
    println!("wrong answers: {wrong} (half the probes are allowed, half denied)");
    let (slow, gap, at_gap) = periodic;
    println!(
        "cache hits slower than 2 µs: {slow} of {hits} ({:.2}%); {at_gap} of them came exactly {gap} calls after the previous one",
        100.0 * slow as f64 / hits.max(1) as f64
    );
    let r_med = wb_miss.median() as f64 / raw.median().max(1) as f64;
    let r_p99 = wb_miss.q(0.99) as f64 / raw.q(0.99).max(1) as f64;
    let r_mean = wb_miss.mean() / raw.mean().max(1.0);
    println!(
        "miss / raw: median {r_med:.3}x, p99 {r_p99:.3}x, mean {r_mean:.3}x; overhead at the median {}",
        fmt_ns(wb_miss.median().saturating_sub(raw.median()))
    );
    println!(
        "target cache-hit p99 <= 2 µs: {} -> {}",
        fmt_ns(hit.q(0.99)),
        verdict(hit.q(0.99) <= 2000)
    );
    println!(
        "target miss <= 1.1x raw (median): {r_med:.3}x -> {}",
        verdict(r_med <= 1.1)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 5. Memory
// ---------------------------------------------------------------------------

async fn memory(env: &Env) -> Res<()> {
    let n = env.n(1_000_000);
    heading("5. Memory: resident memory per pending op");
    let store = env.store("bench-memory").await?;
    let wb = WriteBehind::builder(env.deferred_config(&store))
        .build()
        .await?;
    let mut t = Tuples::new();
    // One op first, so lazily built parts of the store exist before the baseline.
    let (u, o) = t.set(n);
    wb.grant(u, RELATION, o).await?;
    let before = rss_bytes();
    for i in 0..n {
        let (u, o) = t.set(i);
        wb.grant(u, RELATION, o).await?;
    }
    let after = rss_bytes();
    let p = wb.pending().await?;
    let key = {
        let (u, o) = t.set(n / 2);
        format!("{o}#{RELATION}@{u}")
    };
    discard(wb).await?;
    let per_op = after.saturating_sub(before) as f64 / n as f64;
    println!(
        "{n} distinct grants pending (flush deferred); keys `object#relation@user` of {} bytes, e.g. {key}",
        key.len()
    );
    println!("{:<40} {:>14}", "", "value");
    println!(
        "{:<40} {:>11.1} MiB",
        "VmRSS before",
        before as f64 / 1048576.0
    );
    println!(
        "{:<40} {:>11.1} MiB",
        "VmRSS with ops pending",
        after as f64 / 1048576.0
    );
    println!("{:<40} {:>14}", "pending ops (pending().total)", p.total);
    println!(
        "{:<40} {:>12.0} B",
        "resident memory per pending op", per_op
    );
    println!(
        "target <= 256 B/op: {per_op:.0} B -> {}",
        verdict(per_op <= 256.0)
    );
    Ok(())
}
