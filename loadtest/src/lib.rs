//! Shared pieces of fga-wb's load tests: the workload, the servers, statistics
//! and what each figure is printed with. Each binary in `src/bin` is one
//! command of `scripts/bench`.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use fga_wb::openfga::{Client, ReadFilter, Secret, WriteRequest};
use fga_wb::{Config, TupleKey};

/// Errors end a benchmark with a message; nothing here is a library API.
pub type Res<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The relation every benchmark tuple uses.
pub const RELATION: &str = "viewer";

/// `n` scaled by `FGA_WB_BENCH_SCALE` (default 1), at least 1.
pub fn scaled(n: usize) -> usize {
    let scale = std::env::var("FGA_WB_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(1.0);
    ((n as f64 * scale).round() as usize).max(1)
}

/// The i-th distinct tuple: 1000 users per document, so tuple order, key
/// order and `i` order are the same (`document:doc-0000123#viewer@user:user-0042`).
pub struct Tuples {
    user: String,
    object: String,
}

impl Default for Tuples {
    fn default() -> Self {
        Tuples {
            user: String::with_capacity(32),
            object: String::with_capacity(32),
        }
    }
}

impl Tuples {
    /// Fills the buffers with the i-th tuple (no allocation after the first).
    pub fn set(&mut self, i: usize) -> (&str, &str) {
        self.user.clear();
        self.object.clear();
        let _ = write!(self.user, "user:user-{:04}", i % 1000);
        let _ = write!(self.object, "document:doc-{:07}", i / 1000);
        (&self.user, &self.object)
    }
}

/// A whole-number setting from the environment (`FGA_WB_BENCH_ROUNDS`,
/// ...), or `default` when unset or not a number.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `callers` tasks grant tuples `0..n` through `wb`, each its own
/// contiguous range, concurrently; returns when all are acknowledged.
pub async fn grant_ranges(wb: &fga_wb::WriteBehind, n: usize, callers: usize) -> Res<()> {
    let per = n.div_ceil(callers.max(1));
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let wb = wb.clone();
            tokio::spawn(async move {
                let mut t = Tuples::default();
                for i in c * per..((c + 1) * per).min(n) {
                    let (u, o) = t.set(i);
                    wb.grant(u, RELATION, o).await?;
                }
                Ok::<(), fga_wb::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Flushes until nothing is pending or in flight (in queue mode: until the
/// workers have applied everything).
pub async fn drain(wb: &fga_wb::WriteBehind, limit: Duration) -> Res<()> {
    let deadline = Instant::now() + limit;
    loop {
        let p = wb.pending().await?;
        if p.total + p.in_flight == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("still pending after {limit:?}: {p:?}").into());
        }
        if p.total > 0 {
            wb.flush().await?;
        } else {
            // Workers are writing: look now and then (each look is a Redis
            // call on the cores being measured; 20 ms is 0.2% of a run).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The i-th tuple as a [`TupleKey`].
pub fn tuple(i: usize) -> TupleKey {
    let mut t = Tuples::default();
    let (u, o) = t.set(i);
    TupleKey::new(u, RELATION, o).expect("benchmark tuples are valid")
}

/// One OpenFGA server to write to, and a client of it.
#[derive(Clone)]
pub struct Target {
    /// What it is, for the tables (`sqlite`, `postgres`, ...).
    pub name: String,
    pub url: String,
    pub token: String,
    pub client: Client,
}

/// A store with the documents model.
pub struct Store {
    pub id: String,
    pub model_id: String,
}

impl Target {
    pub fn new(name: &str, url: &str, token: &str) -> Res<Target> {
        Ok(Target {
            name: name.to_owned(),
            url: url.to_owned(),
            token: token.to_owned(),
            client: Client::builder(url)
                .api_token(Secret::new(token.to_owned()))
                .timeout(Duration::from_secs(30))
                .build()?,
        })
    }

    /// A fresh store with `models/documents.json`.
    pub async fn store(&self, name: &str) -> Res<Store> {
        let model: serde_json::Value =
            serde_json::from_str(include_str!("../../models/documents.json"))?;
        let id = self.client.create_store(name).await?;
        let model_id = self.client.write_authorization_model(&id, &model).await?;
        Ok(Store { id, model_id })
    }

    /// Default settings (with any `FGA_WB_*` overrides from the environment,
    /// for experiments) pointed at `store`.
    pub fn config(&self, store: &Store) -> Config {
        let vars: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| {
                k.starts_with("FGA_WB_")
                    && !k.starts_with("FGA_WB_BENCH")
                    && !k.starts_with("FGA_WB_TEST")
            })
            .collect();
        let mut c = Config::load_from(None, vars).expect("FGA_WB_* overrides are valid");
        c.openfga.api_url.clone_from(&self.url);
        c.openfga.api_token = Secret::new(self.token.clone());
        c.openfga.store_id.clone_from(&store.id);
        c.openfga.model_id.clone_from(&store.model_id);
        c
    }

    /// How many tuples `store` holds.
    pub async fn count(&self, store: &Store) -> Res<usize> {
        Ok(self
            .client
            .read_all(&store.id, &ReadFilter::default())
            .await?
            .len())
    }

    /// `req`, sent again on a transient failure (at most 20 tries, 50 ms
    /// apart); returns how many retries it took.
    pub async fn write_retrying(&self, store: &Store, req: &WriteRequest) -> Res<u64> {
        let mut retries = 0;
        loop {
            match self.client.write(&store.id, req).await {
                Ok(()) => return Ok(retries),
                Err(e) if e.is_transient() && retries < 20 => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Latencies in nanoseconds, sorted.
pub struct Lat(pub Vec<u64>);

impl Lat {
    pub fn new(mut v: Vec<u64>) -> Lat {
        v.sort_unstable();
        Lat(v)
    }

    /// The q-quantile (nearest rank).
    pub fn q(&self, q: f64) -> u64 {
        if self.0.is_empty() {
            return 0;
        }
        let rank = (q * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }
}

/// `1.47 µs`, `2.31 ms`.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.2} µs", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// min / median / max of `v` (sorted copy); the median of an even count
/// is the mean of the two middle values, not the upper one.
pub fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        return (0.0, 0.0, 0.0);
    }
    let median = match n % 2 {
        1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    };
    (s[0], median, s[n - 1])
}

/// The 1-minute load average.
pub fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU time (user + system) this process has used.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe {
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time (user + system) process `pid` has used, from /proc.
pub fn proc_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after ") ".
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    // SAFETY: sysconf with a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// Prints what this machine is, once at the top of a benchmark's output.
pub fn print_machine(what: &str) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("?".to_owned(), |(_, v)| v.trim().to_owned());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("== {what} ==");
    println!(
        "machine: {nproc} cores ({model}); the servers this benchmark starts and the benchmark share them; load average at start {:.2}",
        load1()
    );
}

/// A wall-clock stopwatch with the process CPU it covered.
pub struct Meter {
    wall: Instant,
    cpu: Duration,
}

impl Default for Meter {
    fn default() -> Self {
        Meter {
            wall: Instant::now(),
            cpu: self_cpu(),
        }
    }
}

impl Meter {
    /// Wall time and this process's CPU time since `default()`.
    pub fn read(&self) -> (Duration, Duration) {
        (self.wall.elapsed(), self_cpu().saturating_sub(self.cpu))
    }
}

/// Runs every thread of process `pid` (and the threads and processes it
/// starts later) on `cpus` only.
pub fn pin(pid: u32, cpus: &[usize]) -> Res<()> {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))?;
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // SAFETY: sched_setaffinity reads the set we own.
        let r =
            unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        if r != 0 {
            return Err(format!(
                "sched_setaffinity({tid}): {}",
                std::io::Error::last_os_error()
            )
            .into());
        }
    }
    Ok(())
}
