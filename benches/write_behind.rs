//! Benchmarks of fga-wb against a real OpenFGA, each figure printed next to
//! what it is compared with. Not a test: it prints tables.
//!
//! Run through `scripts/bench [section...]`, which builds in release mode and
//! starts a throw-away OpenFGA and Redis (`scripts/servers`). Sections:
//! `ack`, `throughput`, `coalesce`, `checks`, `memory` (memory store),
//! `redis-ack`, `redis-throughput`, `queue-e2e`, `aof` (Redis store and
//! queue mode), `loss-window` (the memory store's crash loss
//! window); none means all. Each section runs in a fresh process (the binary
//! re-runs itself), so one section's allocations never show in another's
//! memory figure.
//!
//! The throughput, queue-e2e and loss-window sections also start a second
//! OpenFGA, from the same binary, on the sqlite datastore: the memory
//! datastore's Write scans every stored tuple, so it cannot take 100k tuples
//! in reasonable time. The aof section starts its own redis-server (with
//! append-only files on), which it kills and restarts.
//!
//! `FGA_WB_BENCH_SCALE=0.1` shrinks every count (for a quick try; the
//! targets are stated for the full counts).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::openfga::{CheckRequest, Client, ReadFilter, Secret, WriteRequest};
use fga_wb::{Config, TupleKey, WriteBehind};
use futures::stream::{self, TryStreamExt};

const SECTIONS: &[&str] = &[
    "ack",
    "throughput",
    "coalesce",
    "checks",
    "memory",
    "redis-ack",
    "redis-throughput",
    "queue-e2e",
    "aof",
    "loss-window",
];
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
        "redis-ack" => redis_ack(&env).await?,
        "redis-throughput" => redis_throughput(&env).await?,
        "queue-e2e" => queue_e2e(&env).await?,
        "aof" => aof(&env).await?,
        "loss-window" => loss_window(&env).await?,
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
    /// The Redis that `scripts/servers` started (no persistence).
    redis_url: Option<String>,
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
            redis_url: std::env::var("FGA_WB_TEST_REDIS_URL").ok(),
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
            redis_url: self.redis_url.clone(),
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

    /// The URL of the Redis that `scripts/servers` started.
    fn redis(&self) -> Res<String> {
        self.redis_url.clone().ok_or_else(|| {
            "FGA_WB_TEST_REDIS_URL is not set: run the benchmarks with scripts/bench, which starts Redis"
                .into()
        })
    }

    /// `c` with the Redis store at `url`.
    fn with_redis(mut c: Config, url: &str) -> Config {
        c.buffer.store = StoreKind::Redis;
        c.redis.url = url.to_owned();
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

/// `n` direct one-tuple Writes, one after another, to a fresh store.
async fn direct_writes(env: &Env, n: usize) -> Res<Lat> {
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
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let req = write_one(i);
        let start = Instant::now();
        env.client.write(&store.id, &req).await?;
        lat.push(ns(start.elapsed()));
    }
    Ok(Lat::new(lat))
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

    let direct = direct_writes(env, writes).await?;

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

/// One coalescing run: what it sent and whether the final state is right.
struct CoalesceRun {
    flush: fga_wb::config::FlushConfig,
    /// Totals when the last update returned, and after the final flush.
    during: fga_wb::Totals,
    totals: fga_wb::Totals,
    update_time: Duration,
    total_time: Duration,
    flushes: u32,
    /// Tuples stored, tuples expected, and whether they are the same set.
    stored: usize,
    expected: usize,
    exact: bool,
}

impl CoalesceRun {
    fn sent(&self) -> u64 {
        self.totals.applied + self.totals.dead_lettered
    }

    fn sent_during(&self) -> u64 {
        self.during.applied + self.during.dead_lettered
    }
}

/// `updates` random grant/revoke updates over `keys` keys with `cfg`, then
/// flush() until empty; reads the store back.
async fn coalesce_run(
    env: &Env,
    store: &Store,
    cfg: Config,
    updates: usize,
    keys: usize,
) -> Res<CoalesceRun> {
    let flush = cfg.flush.clone();
    let wb = WriteBehind::builder(cfg).build().await?;
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
    Ok(CoalesceRun {
        flush,
        during,
        totals,
        update_time,
        total_time,
        flushes,
        stored: stored.len(),
        expected: expected.len(),
        exact: stored == expected,
    })
}

async fn coalesce(env: &Env) -> Res<()> {
    let updates = env.n(1_000_000);
    let keys = env.n(10_000);
    heading("3. Coalescing: random grant/revoke updates over a small key set, then flush");

    // (a) Default settings. (b) A batch larger than the key set, a long
    // interval, and revokes that wait like grants: nothing should flush
    // while the burst lasts.
    let store_a = env.store("bench-coalesce").await?;
    let a = coalesce_run(env, &store_a, env.config(&store_a), updates, keys).await?;
    let store_b = env.store("bench-coalesce-batched").await?;
    let mut cfg_b = env.config(&store_b);
    cfg_b.flush.batch_size = 20_000;
    cfg_b.flush.interval = Duration::from_secs(10);
    cfg_b.flush.eager_revokes = false;
    let b = coalesce_run(env, &store_b, cfg_b, updates, keys).await?;

    let describe = |f: &fga_wb::config::FlushConfig| {
        format!(
            "batch_size={} interval={:?} eager_revokes={}",
            f.batch_size, f.interval, f.eager_revokes
        )
    };
    println!(
        "{updates} updates (grant or revoke, uniformly random, same sequence in both runs) over {keys} keys"
    );
    println!("(a) default settings:  {}", describe(&a.flush));
    println!(
        "(b) burst settings:    {} (revokes wait for the batch or interval unless a check needs one)",
        describe(&b.flush)
    );
    println!("{:<52} {:>12} {:>12}", "", "(a) default", "(b) burst");
    let row = |name: &str, f: &dyn Fn(&CoalesceRun) -> u64| {
        println!("{name:<52} {:>12} {:>12}", f(&a), f(&b));
    };
    row("updates acknowledged", &|r| r.totals.acknowledged);
    row("tuple ops sent to OpenFGA while updating", &|r| {
        r.sent_during()
    });
    row("tuple ops sent after the last update returned", &|r| {
        r.sent() - r.sent_during()
    });
    row("tuple ops sent to OpenFGA, in total", &|r| r.sent());
    row("Write requests, in total", &|r| r.totals.requests);
    row("ops coalesced away (never sent)", &|r| r.totals.coalesced);
    row("ops dead-lettered", &|r| r.totals.dead_lettered);
    row("flush() calls until empty, after the updates", &|r| {
        u64::from(r.flushes)
    });
    let secs = |name: &str, f: &dyn Fn(&CoalesceRun) -> Duration| {
        println!(
            "{name:<52} {:>10.2} s {:>10.2} s",
            f(&a).as_secs_f64(),
            f(&b).as_secs_f64()
        );
    };
    secs("time for the updates", &|r| r.update_time);
    secs("time until all applied", &|r| r.total_time);
    let exact = |r: &CoalesceRun| {
        format!(
            "{} ({} stored, {} expected)",
            if r.exact { "yes" } else { "NO" },
            r.stored,
            r.expected
        )
    };
    println!(
        "final state in OpenFGA equals the last op per key: (a) {}; (b) {}",
        exact(&a),
        exact(&b)
    );
    println!(
        "tuple ops sent per key: (a) {:.2}, (b) {:.2} (a flush writes each key's newest op at most once; \
         with the defaults, flushes start while updates arrive, at once for a pending revoke and at \
         batch_size for grants)",
        a.sent() as f64 / keys as f64,
        b.sent() as f64 / keys as f64
    );
    println!(
        "target tuple ops sent <= {keys}: (a) default {} -> {}; (b) burst settings {} -> {}",
        a.sent(),
        verdict(a.sent() <= keys as u64),
        b.sent(),
        verdict(b.sent() <= keys as u64)
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
        if i.is_multiple_of(2) {
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

// ---------------------------------------------------------------------------
// Redis helpers
// ---------------------------------------------------------------------------

/// A plain connection to the Redis at `url` (for what fga-wb does not
/// expose: PING, INFO, HEXISTS).
async fn redis_conn(url: &str) -> Res<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| format!("no connection to {url} within 5 s"))??;
    Ok(conn)
}

/// How many times Redis has run a script (EVAL or EVALSHA) so far, and the
/// server's CPU time in them (µs): every fga-wb store operation is one
/// script call.
async fn script_calls(conn: &mut redis::aio::MultiplexedConnection) -> Res<(u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let field = |l: &str, name: &str| {
        l.split([':', ','])
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .fold((0, 0), |(c, u), l| {
            (c + field(l, "calls="), u + field(l, "usec="))
        }))
}

/// CPU seconds (user + system) a process has used so far, from
/// /proc/<pid>/stat (clock ticks of 1/100 s, Linux's USER_HZ).
fn proc_cpu(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// CPU seconds the Redis server has used so far (INFO cpu).
async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> Res<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
        .sum())
}

/// CPU seconds used by this process, Redis and OpenFGA during a run.
#[derive(Clone, Copy, Default)]
struct Cpu {
    app: f64,
    redis: f64,
    openfga: f64,
}

/// Samples the three processes' CPU counters.
struct CpuMeter {
    openfga_pid: String,
    conn: redis::aio::MultiplexedConnection,
}

impl CpuMeter {
    async fn now(&mut self) -> Res<Cpu> {
        Ok(Cpu {
            app: proc_cpu("self"),
            redis: redis_cpu(&mut self.conn).await?,
            openfga: proc_cpu(&self.openfga_pid),
        })
    }

    async fn since(&mut self, start: Cpu) -> Res<Cpu> {
        let now = self.now().await?;
        Ok(Cpu {
            app: now.app - start.app,
            redis: now.redis - start.redis,
            openfga: now.openfga - start.openfga,
        })
    }
}

/// `n` PING round trips on one connection, one after another.
async fn ping_latencies(conn: &mut redis::aio::MultiplexedConnection, n: usize) -> Res<Lat> {
    for _ in 0..1000 {
        let _: String = redis::cmd("PING").query_async(conn).await?;
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let _: String = redis::cmd("PING").query_async(conn).await?;
        lat.push(ns(start.elapsed()));
    }
    Ok(Lat::new(lat))
}

/// `total` distinct grants (tuples `offset..offset + total`) from `callers`
/// concurrent tasks, each taking a contiguous share; every call is timed.
/// Returns the latencies and the wall time from the first call to the last
/// return.
async fn concurrent_grants(
    wb: &WriteBehind,
    callers: usize,
    total: usize,
    offset: usize,
) -> Res<(Lat, Duration)> {
    let per = total.div_ceil(callers);
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let wb = wb.clone();
            let (lo, hi) = ((c * per).min(total), ((c + 1) * per).min(total));
            tokio::spawn(async move {
                let mut t = Tuples::new();
                let mut lat = Vec::with_capacity(hi - lo);
                for i in lo..hi {
                    let (u, o) = t.set(offset + i);
                    let start = Instant::now();
                    wb.grant(u, RELATION, o).await?;
                    lat.push(ns(start.elapsed()));
                }
                Ok::<_, fga_wb::Error>(lat)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok((Lat::new(all), started.elapsed()))
}

/// Drops what a Redis-store handle left pending, so the shared Redis does
/// not keep it; returns how long that took.
async fn discard_timed(wb: WriteBehind) -> Res<Duration> {
    let started = Instant::now();
    discard(wb).await?;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------
// 6. Redis-store acknowledgement latency
// ---------------------------------------------------------------------------

async fn redis_ack(env: &Env) -> Res<()> {
    let n = env.n(100_000);
    let writes = env.n(1000);
    let redis_url = env.redis()?;
    heading(
        "6. Redis-store acknowledgement latency: grant() vs the memory store and a direct Write",
    );
    println!(
        "{n} grants of distinct tuples per store, one caller, each call timed with Instant; flush deferred \
         (only the buffer is measured). Redis: the scripts/servers one on loopback (no persistence: \
         --appendonly no --save '')."
    );
    let mut conn = redis_conn(&redis_url).await?;
    let ping = ping_latencies(&mut conn, env.n(20_000)).await?;

    let store = env.store("bench-redis-ack-memory").await?;
    let wb = WriteBehind::builder(env.deferred_config(&store))
        .build()
        .await?;
    let (memory, _) = grant_latencies(&wb, n, 0).await?;
    discard(wb).await?;

    let store = env.store("bench-redis-ack").await?;
    let cfg = Env::with_redis(env.deferred_config(&store), &redis_url);
    let wb = WriteBehind::builder(cfg).build().await?;
    let before = script_calls(&mut conn).await?;
    let (redis_lat, redis_slow) = grant_latencies(&wb, n, 0).await?;
    let after = script_calls(&mut conn).await?;
    let (calls, usec) = (after.0 - before.0, after.1 - before.1);
    let pending = wb.pending().await?;
    let cleared_in = discard_timed(wb).await?;

    let direct = direct_writes(env, writes).await?;

    lat_header();
    lat_row("grant, Redis store (one script call each)", &redis_lat);
    lat_row("grant, memory store", &memory);
    lat_row("redis PING round trip (the floor)", &ping);
    lat_row("direct client.write, 1 tuple, sequential", &direct);
    println!(
        "Redis script calls during the timed grants and their warm-up: {calls} for {} grants, \
         {:.1} µs of Redis CPU each; pending in Redis afterwards: {} (cleared in {:.2} s)",
        n + 1000,
        usec as f64 / calls.max(1) as f64,
        pending.total,
        cleared_in.as_secs_f64()
    );
    println!(
        "mean grant: {} Redis store, {} memory store",
        fmt_ns(redis_lat.mean() as u64),
        fmt_ns(memory.mean() as u64)
    );
    println!(
        "grant median / PING median: {:.1}x; direct write median / Redis grant median: {:.1}x",
        redis_lat.median() as f64 / ping.median().max(1) as f64,
        direct.median() as f64 / redis_lat.median().max(1) as f64
    );
    println!(
        "slowest Redis-store grants (op #: latency): {}",
        redis_slow
            .iter()
            .map(|&(i, l)| format!("#{i} {}", fmt_ns(l)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "target Redis-store grant p99 <= 1 ms: {} -> {}",
        fmt_ns(redis_lat.q(0.99)),
        verdict(redis_lat.q(0.99) <= 1_000_000)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. Redis-store throughput with concurrent callers
// ---------------------------------------------------------------------------

async fn redis_throughput(env: &Env) -> Res<()> {
    let total = env.n(200_000);
    let single = env.n(50_000);
    let redis_url = env.redis()?;
    heading("7. Redis-store acknowledgement throughput with concurrent callers");
    println!(
        "{total} distinct grants per run ({single} with one caller, to bound the run time), shared evenly by \
         the callers (tokio tasks on one handle); \
         flush deferred, so this measures the buffer; each run on a fresh store. The memory store \
         runs the same load for comparison."
    );
    let mut conn = redis_conn(&redis_url).await?;
    println!(
        "{:<8} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6}",
        "store",
        "callers",
        "ops",
        "time",
        "ops/s",
        "median",
        "p99",
        "p99.9",
        "max",
        "ops/call",
        "µs/op",
        "busy"
    );
    let mut best = 0.0f64;
    for callers in [1, 8, 64, 256] {
        // One caller is bounded by the round trip (section 6): fewer ops.
        let ops = if callers == 1 { single } else { total };
        for redis in [true, false] {
            let store = env.store("bench-redis-tp").await?;
            let cfg = if redis {
                Env::with_redis(env.deferred_config(&store), &redis_url)
            } else {
                env.deferred_config(&store)
            };
            let wb = WriteBehind::builder(cfg).build().await?;
            // Warm-up on other tuples: connections, the script cache, code.
            concurrent_grants(&wb, callers.min(8), 1000, total).await?;
            let before = script_calls(&mut conn).await?;
            let (lat, time) = concurrent_grants(&wb, callers, ops, 0).await?;
            let after = script_calls(&mut conn).await?;
            let (calls, usec) = (after.0 - before.0, after.1 - before.1);
            let pending = wb.pending().await?.total;
            if pending != ops + 1000 {
                return Err(format!("{pending} pending, expected {}", ops + 1000).into());
            }
            discard(wb).await?;
            let r = rate(ops, time);
            if redis {
                best = best.max(r);
            }
            let (per_call, per_op, busy) = if redis {
                (
                    format!("{:.1}", ops as f64 / calls.max(1) as f64),
                    format!("{:.1}", usec as f64 / ops as f64),
                    format!("{:.0}%", usec as f64 / 1e4 / time.as_secs_f64()),
                )
            } else {
                ("-".into(), "-".into(), "-".into())
            };
            println!(
                "{:<8} {:>7} {:>7} {:>6.2} s {:>8.0} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6}",
                if redis { "Redis" } else { "memory" },
                callers,
                ops,
                time.as_secs_f64(),
                r,
                fmt_ns(lat.median()),
                fmt_ns(lat.q(0.99)),
                fmt_ns(lat.q(0.999)),
                fmt_ns(lat.max()),
                per_call,
                per_op,
                busy
            );
        }
    }
    println!(
        "ops/call: grants per Redis script call (INFO commandstats): concurrent grants are pushed \
         together, up to 512 per call, each batch one atomic script run; µs/op: Redis CPU time in \
         those scripts per grant; busy: that time as a share of the run's wall time (Redis runs \
         scripts on one thread, so near 100% it is the limit)"
    );
    println!(
        "every run verified: pending() afterwards equals the grants made (each grant is one distinct pending op)"
    );
    println!(
        "target Redis-store throughput >= 50k ops/s (best over caller counts): {best:.0} -> {}",
        verdict(best >= 50_000.0)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 8. Queue-mode end-to-end throughput
// ---------------------------------------------------------------------------

/// How the ops reach OpenFGA in one end-to-end run.
#[derive(Clone, Copy, PartialEq)]
enum Path {
    InlineMemory,
    InlineRedis,
    /// Queue mode, with one in-process worker of this concurrency.
    Queue(usize),
}

impl Path {
    fn name(self) -> String {
        match self {
            Path::InlineMemory => "inline, memory store".into(),
            Path::InlineRedis => "inline, Redis store".into(),
            Path::Queue(c) => format!("queue, Redis store, 1 worker x{c}"),
        }
    }
}

/// An in-process `fga-wb worker`, stopped through its shutdown future.
struct Worker {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<fga_wb::Result<()>>,
}

impl Worker {
    fn start(config: Config, concurrency: usize) -> Worker {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(fga_wb::queue::worker::run(config, concurrency, async {
            let _ = rx.await;
        }));
        Worker {
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) -> Res<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(Duration::from_secs(30), &mut self.task).await {
            Ok(r) => Ok(r??),
            Err(_) => {
                self.task.abort();
                Err("the worker did not stop within 30 s".into())
            }
        }
    }
}

/// Waits until nothing is pending or in flight, calling flush() while ops
/// are pending (in queue mode it enqueues them and returns; the worker's
/// progress shows as in-flight ops going away). Returns the flush() calls
/// that reported an error.
async fn settle(wb: &WriteBehind, limit: Duration) -> Res<u64> {
    let deadline = Instant::now() + limit;
    let mut errors = 0;
    loop {
        let p = wb.pending().await?;
        if p.total + p.in_flight == 0 {
            return Ok(errors);
        }
        if Instant::now() > deadline {
            return Err(format!("still pending after {limit:?}: {p:?}").into());
        }
        if p.total > 0 {
            if let Some(e) = wb.flush().await?.error {
                errors += 1;
                eprintln!("note: flush reported an error (ops stay pending, retried): {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        } else {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// Concurrent callers in the end-to-end runs: one caller would measure the
/// Redis round trip of each grant, not the pipeline.
const E2E_CALLERS: usize = 16;

/// `n` distinct grants through `path`, from the first call until settle()
/// sees nothing pending; then the store is read back.
async fn run_e2e(
    env: &Env,
    path: Path,
    n: usize,
    redis_url: &str,
    meter: &mut CpuMeter,
) -> Res<(Run, Cpu)> {
    let store = env.store("bench-e2e").await?;
    let mut cfg = env.config(&store);
    if path != Path::InlineMemory {
        cfg = Env::with_redis(cfg, redis_url);
    }
    let worker = if let Path::Queue(c) = path {
        cfg.flush.mode = Mode::Queue;
        let w = Worker::start(cfg.clone(), c);
        // A worker is a long-running process: let it start polling first.
        tokio::time::sleep(Duration::from_millis(300)).await;
        Some(w)
    } else {
        None
    };
    // In queue mode a failed Write is retried on the queue's schedule
    // (first after 10 s): watch for jobs waiting for a retry.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = worker.as_ref().map(|_| {
        let (cfg, done) = (cfg.clone(), done.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(wb) = WriteBehind::builder(cfg.clone())
                    .automatic_flush(false)
                    .read_model(false)
                    .build()
                    .await
                {
                    if let Ok(Some(q)) = wb.status().await.map(|s| s.queue) {
                        most = most.max(q.scheduled);
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        })
    });
    let wb = WriteBehind::builder(cfg).build().await?;
    let cpu_start = meter.now().await?;
    let started = Instant::now();
    concurrent_grants(&wb, E2E_CALLERS, n, 0).await?;
    let errors = settle(&wb, Duration::from_secs(300)).await?;
    let time = started.elapsed();
    let cpu = meter.since(cpu_start).await?;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let st = wb.status().await?;
    wb.shutdown().await?;
    if let Some(w) = worker {
        w.stop().await?;
    }
    let scheduled = match watcher {
        Some(w) => w.await?,
        None => 0,
    };
    if st.totals.dead_lettered > 0 {
        return Err(format!("{} ops dead-lettered", st.totals.dead_lettered).into());
    }
    let run = Run {
        side: match path {
            Path::InlineMemory => "inline-memory",
            Path::InlineRedis => "inline-redis",
            Path::Queue(_) => "queue",
        },
        n,
        time,
        requests: st.totals.requests,
        retries: st.totals.retries.max(errors).max(scheduled),
        stored: env.count(&store).await?,
    };
    Ok((run, cpu))
}

async fn queue_e2e(env: &Env) -> Res<()> {
    let n = env.n(20_000);
    let rounds = 2;
    let redis_url = env.redis()?;
    heading("8. Queue-mode end-to-end throughput vs inline mode");
    let server = Server::sqlite(env).await?;
    let sqlite = env.with_server(&server.url, &server.token)?;
    let paths = [
        Path::InlineMemory,
        Path::InlineRedis,
        Path::Queue(8),
        Path::Queue(4),
    ];
    println!(
        "{n} distinct grants per run from {E2E_CALLERS} concurrent callers (tasks), from the first grant() until every op is applied \
         (pending and in-flight both 0), each run on a fresh store verified by reading it back. \
         OpenFGA: sqlite datastore (started by this benchmark, as in section 2b). Default settings \
         (batch_size=1000, interval=1s, 100 tuples per Write, 8 Writes in parallel inline); queue \
         mode: one in-process worker (fga_wb::queue::worker::run), polling every 100 ms, started \
         before the clock. {rounds} rounds, the order of the sides reversed in the second."
    );
    let mut meter = CpuMeter {
        openfga_pid: server.child.id().to_string(),
        conn: redis_conn(&redis_url).await?,
    };
    let mut runs = Vec::new();
    for round in 0..rounds {
        let order: Vec<Path> = if round % 2 == 0 {
            paths.to_vec()
        } else {
            paths.iter().rev().copied().collect()
        };
        for p in order {
            let (run, cpu) = run_e2e(&sqlite, p, n, &redis_url, &mut meter).await?;
            runs.push((round, p, run, cpu));
        }
    }
    drop(server);
    println!(
        "{:<36} {:>5} {:>6} {:>8} {:>8} {:>8} {:>7} {:>8} | {:>17}",
        "",
        "round",
        "tuples",
        "time",
        "tuples/s",
        "requests",
        "retried",
        "verified",
        "CPU s: app redis openfga"
    );
    for (round, p, r, cpu) in &runs {
        println!(
            "{:<36} {:>5} {:>6} {:>6.2} s {:>8.0} {:>8} {:>7} {:>8} | {:>8.1} {:>5.1} {:>7.1}",
            p.name(),
            round + 1,
            r.n,
            r.time.as_secs_f64(),
            r.rate(),
            if matches!(p, Path::Queue(_)) {
                "-".to_owned()
            } else {
                r.requests.to_string()
            },
            r.retries,
            if r.stored == r.n {
                "yes".to_owned()
            } else {
                format!("NO {}", r.stored)
            },
            cpu.app,
            cpu.redis,
            cpu.openfga
        );
    }
    let agg = |path: Path| {
        let (k, t) = runs
            .iter()
            .filter(|(_, p, _, _)| *p == path)
            .fold((0usize, Duration::ZERO), |(k, t), (_, _, r, _)| {
                (k + r.n, t + r.time)
            });
        rate(k, t)
    };
    println!(
        "requests: Write requests the application's handle sent (in queue mode the worker sends them: -); \
         retried: inline, flushes that hit a transient error and were retried (after 100 ms and up); \
         queue, the most jobs seen waiting at once for a scheduled retry (the first retry comes 10 s later); \
         CPU s: CPU time during the run of this process (callers, flusher, in-process worker), of Redis and \
         of OpenFGA; the machine has {} s of CPU per second of wall time",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let base = agg(Path::InlineMemory);
    for p in paths {
        println!(
            "{:<40} {:>8.0} tuples/s over both rounds = {:.2}x inline memory",
            p.name(),
            agg(p),
            agg(p) / base
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 9. Durability: Redis killed and restarted with AOF on
// ---------------------------------------------------------------------------

/// The control run: no append-only file (nor snapshots), so a restart
/// starts empty and every acknowledged op must show as lost.
const NO_AOF: &str = "no (control)";

/// A redis-server of this benchmark's own, with an append-only file in a
/// temporary directory; killed (and its files removed) on drop.
struct OwnRedis {
    bin: String,
    dir: std::path::PathBuf,
    port: u16,
    fsync: &'static str,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    async fn start(fsync: &'static str) -> Res<OwnRedis> {
        let bin = std::env::var("FGA_WB_TEST_REDIS_BIN")
            .map_err(|_| "FGA_WB_TEST_REDIS_BIN is not set: run through scripts/bench")?;
        let dir = std::env::temp_dir().join(format!(
            "fga-wb-bench-aof-{}-{}",
            fsync.split(' ').next().unwrap_or(fsync),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut r = OwnRedis {
            bin,
            dir,
            port,
            fsync,
            child: None,
        };
        r.spawn().await?;
        Ok(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server on the same port and directory (it loads the
    /// append-only file there) and waits until it answers PING.
    async fn spawn(&mut self) -> Res<Duration> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))?;
        let started = Instant::now();
        let child = Command::new(&self.bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--dir", &self.dir.display().to_string()])
            .args(if self.fsync == NO_AOF {
                vec!["--appendonly", "no"]
            } else {
                vec!["--appendonly", "yes", "--appendfsync", self.fsync]
            })
            .args(["--save", "", "--daemonize", "no"])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // LOADING errors while the append-only file is read back.
            let ok = match redis_conn(&self.url()).await {
                Ok(mut c) => redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok(),
                Err(_) => false,
            };
            if ok {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "redis-server did not answer PING within 60 s; see {}",
                    self.dir.display()
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: no shutdown handler runs, nothing more is written or synced.
    fn kill(&mut self) -> Res<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What one kill-and-restart run saw.
struct AofRun {
    fsync: &'static str,
    callers: usize,
    acked: usize,
    /// Time from the first call to the kill.
    load: Duration,
    failed_calls: usize,
    missing: usize,
    /// Ops in Redis after the restart that no caller saw acknowledged (in
    /// flight at the kill).
    unacked_present: usize,
    restart: Duration,
    resumed: Result<Duration, String>,
}

async fn aof_run(env: &Env, fsync: &'static str, callers: usize, load: Duration) -> Res<AofRun> {
    let mut redis = OwnRedis::start(fsync).await?;
    let store = env.store("bench-aof").await?;
    let cfg = Env::with_redis(env.deferred_config(&store), &redis.url());
    let prefix = format!("{}:{{{}}}", cfg.redis.key_prefix, store.id);
    let wb = WriteBehind::builder(cfg)
        .automatic_flush(false)
        .build()
        .await?;
    // Callers grant distinct tuples until a call fails; each records what
    // was acknowledged. Bounded: at most 2M ops in all.
    let per = 2_000_000 / callers;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let wb = wb.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut t = Tuples::new();
                let mut acked = Vec::new();
                let mut failed = false;
                for i in c * per..(c + 1) * per {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let (u, o) = t.set(i);
                    match wb.grant(u, RELATION, o).await {
                        Ok(()) => acked.push(i),
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                (acked, failed)
            })
        })
        .collect();
    tokio::time::sleep(load).await;
    redis.kill()?;
    let killed_at = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    let mut failed_calls = 0;
    let joined = tokio::time::timeout(Duration::from_secs(60), async {
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await);
        }
        out
    })
    .await
    .map_err(|_| "callers did not stop within 60 s of the kill")?;
    for r in joined {
        let (a, failed) = r?;
        acked.extend(a);
        failed_calls += usize::from(failed);
    }

    let restart = redis.spawn().await?;
    let mut conn = redis_conn(&redis.url()).await?;
    let ops_key = format!("{prefix}:ops");
    let mut missing = 0;
    let mut t = Tuples::new();
    for chunk in acked.chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let (u, o) = t.set(i);
            pipe.cmd("HEXISTS")
                .arg(&ops_key)
                .arg(format!("{o}#{RELATION}@{u}"));
        }
        let found: Vec<bool> = pipe.query_async(&mut conn).await?;
        missing += found.iter().filter(|&&f| !f).count();
    }
    let present: usize = redis::cmd("HLEN")
        .arg(&ops_key)
        .query_async(&mut conn)
        .await?;

    // The same handle, after the restart: does it acknowledge again?
    let resumed = {
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(15);
        loop {
            let (u, o) = t.set(3_000_000);
            match wb.grant(u, RELATION, o).await {
                Ok(()) => break Ok(t0.elapsed()),
                Err(e) if Instant::now() > deadline => break Err(e.to_string()),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), wb.shutdown()).await;
    drop(redis);
    Ok(AofRun {
        fsync,
        callers,
        acked: acked.len(),
        load: killed_at,
        failed_calls,
        missing,
        unacked_present: present.saturating_sub(acked.len() - missing),
        restart,
        resumed,
    })
}

async fn aof(env: &Env) -> Res<()> {
    let callers = 64;
    let load = Duration::from_secs_f64((3.0 * env.scale).max(1.0));
    heading("9. Durability: Redis SIGKILLed mid-load and restarted, append-only file on");
    println!(
        "{callers} callers grant distinct tuples into the Redis store (flush off: nothing leaves Redis) on a \
         redis-server of this benchmark's own (--appendonly yes with each appendfsync policy, --save ''); after {:.1} s it is SIGKILLed, \
         then restarted on the same port and directory (it reloads the append-only file). Every \
         acknowledged grant is then looked up with HEXISTS in the store's ops hash.",
        load.as_secs_f64()
    );
    let mut runs = Vec::new();
    for fsync in ["everysec", "always", NO_AOF] {
        runs.push(aof_run(env, fsync, callers, load).await?);
    }
    println!(
        "{:<22} {:>9} {:>10} {:>9} {:>6} {:>13} {:>9} {:>9}",
        "appendfsync", "acked", "acked/s", "lost", "lost", "in-flight", "restart", "resumed"
    );
    for r in &runs {
        println!(
            "{:<22} {:>9} {:>10.0} {:>9} {:>5.3}% {:>13} {:>7.2} s {:>9}",
            r.fsync,
            r.acked,
            rate(r.acked, r.load),
            r.missing,
            100.0 * r.missing as f64 / r.acked.max(1) as f64,
            r.unacked_present,
            r.restart.as_secs_f64(),
            match &r.resumed {
                Ok(d) => format!("{:.0} ms", d.as_secs_f64() * 1e3),
                Err(_) => "NO".into(),
            }
        );
    }
    for r in &runs {
        if let Err(e) = &r.resumed {
            println!("{}: the handle did not acknowledge again: {e}", r.fsync);
        }
        if r.failed_calls != r.callers {
            println!(
                "{}: {} of {} callers saw an error at the kill (the others had stopped)",
                r.fsync, r.failed_calls, r.callers
            );
        }
    }
    println!(
        "acked: grant() calls that returned Ok before the kill; lost: of those, not in Redis after the restart; \
         in-flight: ops in Redis after the restart that were never acknowledged (the reply was lost with the \
         process; the caller got an error and may retry; grants are idempotent); restart: until PING answers, \
         append-only file loaded; resumed: the same handle's next grant() succeeded after that long"
    );
    println!(
        "the control run ({NO_AOF}: --appendonly no --save '') restarts empty, so it must lose every acknowledged op: \
         it shows the lookup would see a loss"
    );
    println!(
        "SIGKILL ends the Redis process, not the machine: what it had written to the append-only file is in \
         the kernel's page cache and survives, fsynced or not. This measures a Redis process crash. On an OS \
         crash or power loss, everysec can lose the last ~1 s of acknowledged ops (about {:.0} ops at the rate \
         above), always loses none; the cost of always is the acked/s column.",
        runs.first().map_or(0.0, |r| rate(r.acked, r.load))
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 10. The memory store's crash loss window
// ---------------------------------------------------------------------------

/// One steady-load run: the sampled loss window and what was done.
struct WindowRun {
    target: usize,
    granted: usize,
    time: Duration,
    applied: u64,
    samples: Lat,
    /// The sampler's achieved period (it may fall behind under load).
    sample_period: Duration,
}

/// Grants distinct tuples at `target`/s for `duration` (paced in 1 ms
/// steps) while a task samples pending() every 10 ms.
async fn window_run(env: &Env, target: usize, duration: Duration) -> Res<WindowRun> {
    let store = env.store("bench-loss-window").await?;
    let wb = WriteBehind::builder(env.config(&store)).build().await?;
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (wb, done) = (wb.clone(), done.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut v = Vec::with_capacity(2000);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                tick.tick().await;
                let p = wb.pending().await?;
                v.push((p.total + p.in_flight) as u64);
            }
            Ok::<_, fga_wb::Error>(v)
        })
    };
    let max = (target as f64 * duration.as_secs_f64()) as usize;
    let mut t = Tuples::new();
    let mut sent = 0;
    let started = Instant::now();
    loop {
        let elapsed = started.elapsed();
        if elapsed >= duration || sent >= max {
            break;
        }
        let due = ((target as f64 * elapsed.as_secs_f64()) as usize).min(max);
        if sent >= due {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        while sent < due {
            let (u, o) = t.set(sent);
            wb.grant(u, RELATION, o).await?;
            sent += 1;
        }
    }
    let time = started.elapsed();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let samples = sampler.await??;
    let applied = wb.status().await?.totals.applied;
    // What is left would take long to write (the offered load may exceed
    // what OpenFGA accepts): drop it.
    discard(wb).await?;
    let sample_period = time / samples.len().max(1) as u32;
    Ok(WindowRun {
        target,
        granted: sent,
        time,
        applied,
        samples: Lat::new(samples),
        sample_period,
    })
}

async fn loss_window(env: &Env) -> Res<()> {
    let duration = Duration::from_secs_f64((10.0 * env.scale).max(1.0));
    heading("10. Memory store: how many acknowledged ops a crash would lose, under steady load");
    let server = Server::sqlite(env).await?;
    let sqlite = env.with_server(&server.url, &server.token)?;
    let cfg = Config::default();
    println!(
        "One caller grants distinct tuples at a steady target rate for {:.0} s with the default flush settings \
         (batch_size={}, interval={:?}, {} tuples per Write, {} Writes in parallel, buffer capacity {}), \
         against OpenFGA on the sqlite datastore (as in section 2b; the memory datastore slows down as the \
         store grows). A task samples pending() every 10 ms: total + in_flight is what a crash of the \
         process at that instant would lose (in-flight ops may already be applied; they count, as their \
         Write is unconfirmed).",
        duration.as_secs_f64(),
        cfg.flush.batch_size,
        cfg.flush.interval,
        cfg.flush.max_tuples_per_write,
        cfg.flush.max_parallel_requests,
        cfg.buffer.capacity
    );
    let mut runs = Vec::new();
    for target in [1_000, 5_000, 10_000, 50_000] {
        runs.push(window_run(&sqlite, target, duration).await?);
    }
    drop(server);
    println!(
        "{:>9} {:>9} {:>9} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>10}",
        "target/s", "acked/s", "applied/s", "samples", "median", "p99", "max", "last", "median, s"
    );
    for r in &runs {
        let achieved = rate(r.granted, r.time);
        println!(
            "{:>9} {:>9.0} {:>9.0} {:>8} | {:>8} {:>8} {:>8} {:>8} | {:>8.2} s",
            r.target,
            achieved,
            rate(r.applied as usize, r.time),
            r.samples.0.len(),
            r.samples.median(),
            r.samples.q(0.99),
            r.samples.max(),
            r.granted as u64 - r.applied.min(r.granted as u64),
            r.samples.median() as f64 / achieved.max(1.0)
        );
    }
    println!(
        "median/p99/max: ops pending or in flight over the samples (ops a crash would lose); last: \
         acknowledged but not applied when the load stopped; median, s: the median loss as seconds of \
         acknowledged grants; applied/s: ops OpenFGA confirmed during the load"
    );
    println!(
        "sampling period achieved: {}",
        runs.iter()
            .map(|r| format!("{} ms at {}/s", r.sample_period.as_millis(), r.target))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "while OpenFGA keeps up, the window is bounded by the settings: about min(batch_size, rate x interval) \
         pending plus up to {} x {} in flight; once the offered rate exceeds what OpenFGA applies, the \
         backlog (and the loss window) grows by the difference every second, up to buffer.capacity, where \
         the overflow policy pushes back on callers",
        cfg.flush.max_parallel_requests, cfg.flush.max_tuples_per_write
    );
    Ok(())
}
