//! `scripts/bench throughput`: end-to-end throughput of fga-wb against the
//! server's own ceiling, with many concurrent callers, in every mode.
//!
//! One run starts its own servers (OpenFGA on SQLite, on PostgreSQL, and on
//! the memory datastore behind a proxy that adds 1.4 ms of round trip; one
//! Redis) and runs every contender in rounds, rotating the order each round,
//! so that drift in the machine's load hits every contender alike. Each
//! fga-wb figure is a ratio to the raw ceiling (pre-built 100-tuple Writes
//! in key order, 8 in parallel) measured on the same server just before and
//! just after it: the raw ceiling runs between every two contenders. On this
//! kind of machine two raw runs in a row differ by up to a fifth, so the raw
//! row's own ratio (each raw run against the raw runs either side of it) is
//! the control: the spread a ratio has when nothing differs.
//! Every run writes distinct tuples to a fresh store and is verified by
//! reading the store back.
//!
//! `FGA_WB_BENCH_SCALE=0.1` shrinks the counts; `FGA_WB_BENCH_ROUNDS` sets
//! the rounds (default 3); `FGA_WB_BENCH_RAW_PARALLEL` the raw writer's
//! Writes in flight (default 8, as the issue defines the ceiling; fga-wb's
//! adaptive limit starts there and may grow to `flush.max_parallel_requests`,
//! so a run at 32 shows whether more in flight raises the ceiling).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::openfga::WriteRequest;
use fga_wb::WriteBehind;
use futures::stream::{self, TryStreamExt};
use loadtest::*;
use testenv::{Datastore, DelayProxy, OpenFga, OpenFgaOptions, Postgres, Redis, RedisOptions};

/// Parallel requests of the raw ceiling: 8, or `FGA_WB_BENCH_RAW_PARALLEL`.
fn raw_parallel() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        std::env::var("FGA_WB_BENCH_RAW_PARALLEL")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(8)
    })
}
const RAW_PER_WRITE: usize = 100;

/// One measured run.
#[derive(Clone, Debug)]
struct Run {
    tuples: usize,
    wall: Duration,
    /// CPU of this process (fga-wb and its callers) during the run.
    cpu: Duration,
    /// CPU of `fga-wb worker` processes during the run (queue mode).
    worker_cpu: Duration,
    /// Write requests sent (the raw writer's: its pre-built requests).
    requests: u64,
    /// The raw writer's requests sent again after a transient failure
    /// (each 50 ms lost): a ceiling lowered so shows here.
    retries: u64,
    load: f64,
    /// CPU of Redis and of the OpenFGA server over the timed part of the
    /// run only (its wall time divides it).
    redis_cpu: Duration,
    server_cpu: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.tuples as f64 / self.wall.as_secs_f64()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Raw,
    Memory {
        callers: usize,
    },
    /// Memory store with a fixed 8 requests in flight (adaptive off).
    MemoryFixed8 {
        callers: usize,
    },
    RedisInline {
        callers: usize,
    },
    /// Redis inline with the grants made before the clock starts, and
    /// nothing written meanwhile: the drain alone. A diagnostic (where
    /// the Redis row's time goes), run only when `FGA_WB_BENCH_SIDES`
    /// names it.
    RedisDrain {
        callers: usize,
    },
    Queue {
        callers: usize,
        workers: usize,
    },
}

impl Side {
    /// Its short name for `FGA_WB_BENCH_SIDES`: `memory16`, `memory1`,
    /// `fixed8`, `inline`, `drain`, `queue1`, `queue2`.
    fn tag(&self) -> String {
        match self {
            Side::Raw => "raw".into(),
            Side::Memory { callers } => format!("memory{callers}"),
            Side::MemoryFixed8 { .. } => "fixed8".into(),
            Side::RedisInline { .. } => "inline".into(),
            Side::RedisDrain { .. } => "drain".into(),
            Side::Queue { workers, .. } => format!("queue{workers}"),
        }
    }

    fn name(&self) -> String {
        match self {
            Side::Raw => format!(
                "raw ceiling: {RAW_PER_WRITE}-tuple Writes, {} in parallel, key order",
                raw_parallel()
            ),
            Side::Memory { callers } => format!("fga-wb memory store, {callers} calling tasks"),
            Side::MemoryFixed8 { callers } => {
                format!("fga-wb memory store, {callers} calling tasks, fixed 8 in flight")
            }
            Side::RedisInline { callers } => {
                format!("fga-wb Redis store, inline, {callers} calling tasks")
            }
            Side::RedisDrain { callers } => {
                format!("  the same ({callers} tasks), its flush alone, granted untimed")
            }
            Side::Queue { callers, workers } => format!(
                "fga-wb queue mode, {workers} `fga-wb worker` process{}, {callers} calling tasks",
                if *workers == 1 { "" } else { "es" }
            ),
        }
    }
}

struct Bench {
    redis: Redis,
    worker_bin: std::path::PathBuf,
    round: usize,
    /// Each target's OpenFGA process, for its CPU per run.
    servers: BTreeMap<String, u32>,
}

#[tokio::main]
async fn main() -> Res<()> {
    print_machine("throughput");
    let rounds = env_usize("FGA_WB_BENCH_ROUNDS", 3);
    let worker_bin = std::env::current_exe()?
        .parent()
        .ok_or("no exe dir")?
        .join("fga-wb");
    if !worker_bin.is_file() {
        return Err(format!(
            "{} is missing: scripts/bench builds it (cargo build --release)",
            worker_bin.display()
        )
        .into());
    }

    eprintln!("starting servers ...");
    let sqlite_fga = OpenFga::start(OpenFgaOptions {
        datastore: Datastore::Sqlite,
        ..Default::default()
    })
    .await?;
    let pg = Postgres::start().await?;
    let pg_fga = OpenFga::start(OpenFgaOptions {
        datastore: Datastore::Postgres(pg.create_database("openfga")?),
        ..Default::default()
    })
    .await?;
    let mem_fga = OpenFga::start(OpenFgaOptions::default()).await?;
    let upstream = mem_fga.url().trim_start_matches("http://").to_owned();
    let proxy = DelayProxy::start(&upstream, Duration::from_micros(700)).await?;
    // A server with room for more requests (PostgreSQL) far away (10 ms
    // each way): where more requests in flight pay.
    let pg_upstream = pg_fga.url().trim_start_matches("http://").to_owned();
    let far_proxy = DelayProxy::start(&pg_upstream, Duration::from_millis(10)).await?;
    let redis = Redis::start(RedisOptions::default()).await?;

    // FGA_WB_BENCH_LAYOUT=split: the servers (OpenFGA, PostgreSQL) on core
    // 0, the application side (this process, its callers and flusher, Redis,
    // the workers) on core 1, as when they run on different hosts. Default:
    // everything shares both cores.
    let split = std::env::var("FGA_WB_BENCH_LAYOUT").is_ok_and(|l| l == "split");
    if split {
        for pid in [sqlite_fga.pid(), pg_fga.pid(), mem_fga.pid(), pg.pid()]
            .into_iter()
            .flatten()
        {
            pin(pid, &[0])?;
        }
        for pid in [redis.pid(), Some(std::process::id())]
            .into_iter()
            .flatten()
        {
            pin(pid, &[1])?;
        }
        println!("layout: split (OpenFGA and PostgreSQL on core 0; this process, Redis and the workers on core 1)");
    } else {
        println!("layout: shared (every process may run on both cores)");
    }
    let sqlite = Target::new("sqlite", &sqlite_fga.url(), sqlite_fga.token())?;
    let postgres = Target::new("postgres", &pg_fga.url(), pg_fga.token())?;
    let remote = Target::new(
        "remote",
        &format!("http://{}", proxy.addr()),
        mem_fga.token(),
    )?;
    let far = Target::new(
        "far-pg",
        &format!("http://{}", far_proxy.addr()),
        pg_fga.token(),
    )?;

    let n = scaled(100_000);
    let n_pg = scaled(50_000);
    let n_remote = scaled(20_000);
    println!(
        "{rounds} rounds; {n} distinct tuples per run on SQLite, {n_pg} on PostgreSQL, {n_remote} on the remote \
         (memory-datastore OpenFGA behind a proxy adding 0.7 ms each way) and on far-pg (the PostgreSQL OpenFGA \
         behind a proxy adding 10 ms each way)."
    );
    // Settings from the environment (fga-wb's, which reach it and its
    // workers, and the benchmark's own `FGA_WB_BENCH_*`): shown, so that
    // one left over from an experiment is seen.
    let settings: Vec<String> = std::env::vars()
        // As fga-wb reads them: by the exact prefix.
        .filter(|(k, _)| k.starts_with("FGA_WB_") && !k.starts_with("FGA_WB_TEST_"))
        .map(|(k, v)| {
            let upper = k.to_ascii_uppercase();
            match ["TOKEN", "SECRET", "PASS", "URL"]
                .iter()
                .any(|s| upper.contains(s))
            {
                true => format!("{k}=<set>"),
                false => format!("{k}={v}"),
            }
        })
        .collect();
    println!(
        "Settings from the environment: {}",
        match settings.is_empty() {
            true => "none".to_owned(),
            false => settings.join(" "),
        }
    );
    println!("fga-wb runs: callers grant their own contiguous ranges concurrently, then flush() until nothing is pending; timed from the first grant until OpenFGA has every tuple.\n");

    let groups: Vec<(Target, usize, Vec<Side>)> = vec![
        (
            sqlite.clone(),
            n,
            vec![
                Side::Raw,
                Side::Memory { callers: 16 },
                Side::Memory { callers: 1 },
                Side::RedisInline { callers: 16 },
                Side::RedisDrain { callers: 16 },
                Side::Queue {
                    callers: 16,
                    workers: 1,
                },
                Side::Queue {
                    callers: 16,
                    workers: 2,
                },
            ],
        ),
        (
            postgres,
            n_pg,
            vec![
                Side::Raw,
                Side::Memory { callers: 16 },
                Side::RedisInline { callers: 16 },
            ],
        ),
        (
            remote,
            n_remote,
            vec![
                Side::Raw,
                Side::Memory { callers: 16 },
                Side::MemoryFixed8 { callers: 16 },
            ],
        ),
        (
            far,
            n_remote,
            vec![
                Side::Raw,
                Side::Memory { callers: 16 },
                Side::MemoryFixed8 { callers: 16 },
            ],
        ),
    ];
    // FGA_WB_BENCH_ONLY=postgres,remote runs only those servers' groups.
    let only = std::env::var("FGA_WB_BENCH_ONLY").ok();
    let groups: Vec<_> = groups
        .into_iter()
        .filter(|(t, _, _)| picked(&only, &[&t.name]))
        .collect();
    // FGA_WB_BENCH_SIDES=inline,queue1 runs only those contenders (and the
    // raw ceiling they are measured against).
    let sides = std::env::var("FGA_WB_BENCH_SIDES").ok();
    let groups: Vec<_> = groups
        .into_iter()
        .map(|(t, n, s)| {
            let s: Vec<Side> = s
                .into_iter()
                .filter(|side| match side {
                    Side::Raw => true,
                    // A diagnostic: only when named.
                    Side::RedisDrain { .. } => sides
                        .as_deref()
                        .is_some_and(|s| s.split(',').any(|t| t == "drain")),
                    _ => picked(&sides, &[&side.tag()]),
                })
                .collect();
            (t, n, s)
        })
        .filter(|(_, _, s)| s.len() > 1)
        .collect();
    let servers = [
        ("sqlite", sqlite_fga.pid()),
        ("postgres", pg_fga.pid()),
        ("remote", mem_fga.pid()),
        ("far-pg", pg_fga.pid()),
    ]
    .into_iter()
    .filter_map(|(name, pid)| Some((name.to_owned(), pid?)))
    .collect();
    let mut bench = Bench {
        redis,
        worker_bin,
        round: 0,
        servers,
    };
    let mut results: BTreeMap<(String, Side), Vec<Run>> = BTreeMap::new();
    let mut ratios: BTreeMap<(String, Side), Vec<f64>> = BTreeMap::new();
    let mut micro = Micro::default();
    // One untimed raw run per server first: the first timed run of a group
    // does not meet a cold server (and an empty database) alone.
    for (target, n, _) in &groups {
        eprint!("warm-up, untimed: ");
        bench.run(target, *n, Side::Raw).await?;
        eprintln!("done");
    }
    for round in 0..rounds {
        bench.round = round;
        for (target, n, sides) in &groups {
            // Raw, then each contender followed by raw again, in an order
            // rotated each round: a contender's ratio is to the mean of the
            // raw runs just before and just after it, so drift in the
            // machine's speed over minutes does not pass for a difference.
            let contenders: Vec<Side> = sides.iter().copied().filter(|s| *s != Side::Raw).collect();
            let k = contenders.len();
            let mut raws = vec![bench.timed_run(round, target, *n, Side::Raw).await?];
            for j in 0..k {
                let side = contenders[(j + round) % k];
                let run = bench.timed_run(round, target, *n, side).await?;
                let after = bench.timed_run(round, target, *n, Side::Raw).await?;
                let before = raws.last().map_or(after.rate(), Run::rate);
                ratios
                    .entry((target.name.clone(), side))
                    .or_default()
                    .push(run.rate() * 2.0 / (before + after.rate()));
                raws.push(after);
                results
                    .entry((target.name.clone(), side))
                    .or_default()
                    .push(run);
            }
            // The control: each raw run between two others, against their
            // mean, as a contender is measured. Its spread is what the
            // machine alone does to a ratio.
            for w in raws.windows(3) {
                ratios
                    .entry((target.name.clone(), Side::Raw))
                    .or_default()
                    .push(w[1].rate() * 2.0 / (w[0].rate() + w[2].rate()));
            }
            results
                .entry((target.name.clone(), Side::Raw))
                .or_default()
                .extend(raws);
        }
        if picked(&only, &["sqlite", "micro"]) {
            micro.round(&bench, &sqlite, &results).await?;
        }
    }
    print_results(&groups, &results, &ratios);
    if !micro.grant_p99.is_empty() {
        micro.print();
    }
    drop(proxy);
    drop(far_proxy);
    Ok(())
}

/// Whether a comma-separated pick (`FGA_WB_BENCH_ONLY`, `..._SIDES`; none:
/// everything) names one of `names`.
fn picked(list: &Option<String>, names: &[&str]) -> bool {
    list.as_ref()
        .is_none_or(|l| l.split(',').any(|n| names.contains(&n)))
}

impl Bench {
    async fn timed_run(&self, round: usize, target: &Target, n: usize, side: Side) -> Res<Run> {
        eprint!("round {}: {} on {}", round + 1, side.name(), target.name);
        let run = self.run(target, n, side).await?;
        eprintln!(": {:.0} tuples/s", run.rate());
        Ok(run)
    }

    async fn run(&self, target: &Target, n: usize, side: Side) -> Res<Run> {
        let store = target.store("bench-throughput").await?;
        let cpu_of = |pid: Option<u32>| pid.map_or(Duration::ZERO, proc_cpu);
        let redis_pid = self.redis.pid();
        let server_pid = self.servers.get(&target.name).copied();
        let servers = || (cpu_of(redis_pid), cpu_of(server_pid));
        let servers: ServersCpu = &servers;
        let run = match side {
            Side::Raw => raw(target, &store, n, servers).await?,
            Side::Memory { callers } => {
                let cfg = target.config(&store);
                fga_wb_run(cfg, n, callers, &[], Grants::Timed, servers).await?
            }
            Side::MemoryFixed8 { callers } => {
                let mut cfg = target.config(&store);
                cfg.flush.adaptive_parallelism = false;
                cfg.flush.max_parallel_requests = 8;
                fga_wb_run(cfg, n, callers, &[], Grants::Timed, servers).await?
            }
            Side::RedisInline { callers } => {
                let mut cfg = target.config(&store);
                cfg.buffer.store = StoreKind::Redis;
                cfg.redis.url = self.redis.url();
                fga_wb_run(cfg, n, callers, &[], Grants::Timed, servers).await?
            }
            Side::RedisDrain { callers } => {
                let mut cfg = target.config(&store);
                cfg.buffer.store = StoreKind::Redis;
                cfg.redis.url = self.redis.url();
                fga_wb_run(cfg, n, callers, &[], Grants::Untimed, servers).await?
            }
            Side::Queue { callers, workers } => {
                let mut cfg = target.config(&store);
                cfg.buffer.store = StoreKind::Redis;
                cfg.redis.url = self.redis.url();
                cfg.flush.mode = Mode::Queue;
                let procs = (0..workers)
                    .map(|_| self.worker(target, &store))
                    .collect::<Res<Vec<_>>>()?;
                // A worker is up once it has registered; give them a moment.
                tokio::time::sleep(Duration::from_millis(500)).await;
                let pids: Vec<u32> = procs.iter().map(|p| p.id()).collect();
                let run = fga_wb_run(cfg, n, callers, &pids, Grants::Timed, servers).await;
                for mut p in procs {
                    // SAFETY: signalling our own child.
                    unsafe {
                        libc::kill(p.id() as i32, libc::SIGTERM);
                    }
                    let _ = p.wait();
                }
                run?
            }
        };
        let stored = target.count(&store).await?;
        if stored != n {
            return Err(format!("{}: {stored} tuples stored, {n} expected", side.name()).into());
        }
        Ok(run)
    }

    fn worker(&self, target: &Target, store: &Store) -> Res<std::process::Child> {
        let child = std::process::Command::new(&self.worker_bin)
            .arg("worker")
            .current_dir("/")
            .env("FGA_API_URL", &target.url)
            .env("FGA_API_TOKEN", &target.token)
            .env("FGA_STORE_ID", &store.id)
            .env("FGA_MODEL_ID", &store.model_id)
            .env("FGA_WB_BUFFER__STORE", "redis")
            .env("FGA_WB_FLUSH__MODE", "queue")
            .env("FGA_WB_REDIS__URL", self.redis.url())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()?;
        Ok(child)
    }
}

/// `n` distinct tuples in key order, as pre-built 100-tuple Writes.
fn raw_requests(store: &Store, n: usize) -> Vec<WriteRequest> {
    (0..n)
        .collect::<Vec<_>>()
        .chunks(RAW_PER_WRITE)
        .map(|c| {
            let mut r = WriteRequest::idempotent(c.iter().map(|&i| tuple(i)).collect(), vec![]);
            r.authorization_model_id = Some(store.model_id.clone());
            r
        })
        .collect()
}

/// Sends `reqs`, `raw_parallel()` at once, until all are written or `stop`
/// is set; adds the tuples of the requests that ended before `stop` to
/// `written`, and the retries to `retries`.
async fn write_raw(
    target: &Target,
    store: &Store,
    reqs: &[WriteRequest],
    stop: &AtomicBool,
    written: &AtomicU64,
    retries: &AtomicU64,
) -> Res<()> {
    stream::iter(reqs.iter().map(Ok))
        .try_for_each_concurrent(raw_parallel(), |r| async move {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let again = target.write_retrying(store, r).await?;
            retries.fetch_add(again, Ordering::Relaxed);
            if !stop.load(Ordering::Relaxed) {
                written.fetch_add(r.writes.len() as u64, Ordering::Relaxed);
            }
            Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
        })
        .await
}

/// CPU of the Redis server and of the OpenFGA server so far.
type ServersCpu<'a> = &'a (dyn Fn() -> (Duration, Duration) + Sync);

/// The raw ceiling: pre-built requests in key order, `raw_parallel()` at
/// once.
async fn raw(target: &Target, store: &Store, n: usize, servers: ServersCpu<'_>) -> Res<Run> {
    let reqs = raw_requests(store, n);
    let load = load1();
    let retries = AtomicU64::new(0);
    let servers0 = servers();
    let meter = Meter::default();
    write_raw(
        target,
        store,
        &reqs,
        &AtomicBool::new(false),
        &AtomicU64::new(0),
        &retries,
    )
    .await?;
    let (wall, cpu) = meter.read();
    let servers1 = servers();
    Ok(Run {
        tuples: n,
        wall,
        cpu,
        worker_cpu: Duration::ZERO,
        // Sent again after a failure: requests too, as fga-wb's count.
        requests: reqs.len() as u64 + retries.load(Ordering::Relaxed),
        retries: retries.into_inner(),
        load,
        redis_cpu: servers1.0.saturating_sub(servers0.0),
        server_cpu: servers1.1.saturating_sub(servers0.1),
    })
}

/// Whether a run's clock starts before its grants or after them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Grants {
    Timed,
    Untimed,
}

/// `callers` tasks grant `n` distinct tuples (each its own contiguous
/// range), then `flush()` until nothing is pending or in flight. With
/// `Grants::Untimed`, the grants are made before the clock starts, with
/// nothing flushed meanwhile: the time of the flush alone.
async fn fga_wb_run(
    mut cfg: fga_wb::Config,
    n: usize,
    callers: usize,
    workers: &[u32],
    grants: Grants,
    servers: ServersCpu<'_>,
) -> Res<Run> {
    if grants == Grants::Untimed {
        cfg.flush.batch_size = 100_000_000;
        cfg.flush.interval = Duration::from_secs(3600);
    }
    let wb = WriteBehind::builder(cfg).build().await?;
    if grants == Grants::Untimed {
        grant_ranges(&wb, n, callers).await?;
    }
    let load = load1();
    let worker_cpu0: Duration = workers.iter().map(|&p| proc_cpu(p)).sum();
    let servers0 = servers();
    let meter = Meter::default();
    if grants == Grants::Timed {
        grant_ranges(&wb, n, callers).await?;
    }
    drain(&wb, Duration::from_secs(600)).await?;
    let (wall, cpu) = meter.read();
    let servers1 = servers();
    let worker_cpu = workers
        .iter()
        .map(|&p| proc_cpu(p))
        .sum::<Duration>()
        .saturating_sub(worker_cpu0);
    let totals = wb.status().await?.totals;
    wb.shutdown().await?;
    if totals.dead_lettered > 0 {
        return Err(format!("{} ops dead-lettered", totals.dead_lettered).into());
    }
    Ok(Run {
        tuples: n,
        wall,
        cpu,
        worker_cpu,
        requests: totals.requests,
        retries: totals.retries,
        load,
        redis_cpu: servers1.0.saturating_sub(servers0.0),
        server_cpu: servers1.1.saturating_sub(servers0.1),
    })
}

fn print_results(
    groups: &[(Target, usize, Vec<Side>)],
    results: &BTreeMap<(String, Side), Vec<Run>>,
    ratios: &BTreeMap<(String, Side), Vec<f64>>,
) {
    println!(
        "== end to end, as a ratio to the raw ceiling on the same server, run just before and just after =="
    );
    println!(
        "{:<9} {:<66} {:>6} {:>6} {:>6} {:>9} {:>10} {:>10} {:>10} {:>6} {:>8} {:>6}",
        "server",
        "",
        "min",
        "median",
        "max",
        "tuples/s",
        "CPU/100k",
        "Redis",
        "OpenFGA",
        "cores",
        "req/100k",
        "load"
    );
    for (target, _, sides) in groups {
        for side in sides {
            let key = (target.name.clone(), *side);
            let runs = &results[&key];
            // No control without a raw run either side of another: shown
            // as such, not as a spread of nothing.
            let [lo, mid, hi] = match ratios.get(&key) {
                Some(r) => {
                    let (lo, mid, hi) = spread(r);
                    [lo, mid, hi].map(|v| format!("{v:.2}"))
                }
                None => ["—".to_owned(), "—".to_owned(), "—".to_owned()],
            };
            let (_, rate, _) = spread(&runs.iter().map(Run::rate).collect::<Vec<_>>());
            let per_100k = |f: &dyn Fn(&Run) -> Duration| {
                spread(
                    &runs
                        .iter()
                        .map(|r| f(r).as_secs_f64() * 100_000.0 / r.tuples as f64)
                        .collect::<Vec<_>>(),
                )
                .1
            };
            let cpu = per_100k(&|r| r.cpu + r.worker_cpu);
            let redis_cpu = per_100k(&|r| r.redis_cpu);
            let server_cpu = per_100k(&|r| r.server_cpu);
            let (_, cores, _) = spread(
                &runs
                    .iter()
                    .map(|r| {
                        (r.cpu + r.worker_cpu + r.redis_cpu + r.server_cpu).as_secs_f64()
                            / r.wall.as_secs_f64()
                    })
                    .collect::<Vec<_>>(),
            );
            let (_, requests, _) = spread(
                &runs
                    .iter()
                    .map(|r| r.requests as f64 * 100_000.0 / r.tuples as f64)
                    .collect::<Vec<_>>(),
            );
            let load = runs.iter().map(|r| r.load).sum::<f64>() / runs.len() as f64;
            println!(
                "{:<9} {:<66} {:>6} {:>6} {:>6} {:>9.0} {:>8.2} s {:>8.2} s {:>8.2} s {:>6.2} {:>8.0} {:>6.2}",
                target.name,
                side.name(),
                lo,
                mid,
                hi,
                rate,
                cpu,
                redis_cpu,
                server_cpu,
                cores,
                requests,
                load
            );
        }
    }
    println!("Requests sent again after a transient failure, per run (the raw writer waits 50 ms before each):");
    for (target, _, sides) in groups {
        for side in sides {
            // Queue mode's workers send the Writes, and count their
            // retries in their own processes.
            if matches!(side, Side::Queue { .. }) {
                println!("{:<9} {:<66} n/a (the workers')", target.name, side.name());
            } else if let Some(runs) = results.get(&(target.name.clone(), *side)) {
                let retries: Vec<u64> = runs.iter().map(|r| r.retries).collect();
                println!("{:<9} {:<66} {retries:?}", target.name, side.name());
            }
        }
    }
    println!("Ratios: each run against the mean of the raw runs just before and just after it; the raw row's is each raw run against the raw runs either side of it (a contender between), the spread of a ratio when nothing differs.");
    println!("CPU/100k: CPU seconds of the benchmark process (fga-wb and its calling tasks; the raw row: the raw writer) plus the `fga-wb worker` processes, per 100k tuples, median over rounds; Redis and OpenFGA: the same for the Redis server and the OpenFGA server (not PostgreSQL's own processes); cores: all four together over the run's wall time, median (the machine has 2). req/100k: Write requests per 100k tuples (store-wide, workers' included), median. load: mean 1-minute load average at the start of the runs.\n");
}

/// `n` tasks granting distinct tuples through `wb` until `stop` is set;
/// each returns how many it granted.
fn grant_flat_out(
    wb: &WriteBehind,
    n: usize,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<Result<u64, fga_wb::Error>>> {
    (0..n)
        .map(|c| {
            let (wb, stop) = (wb.clone(), stop.clone());
            tokio::spawn(async move {
                let mut t = Tuples::default();
                let mut i = c * 10_000_000;
                while !stop.load(Ordering::Relaxed) {
                    let (u, o) = t.set(i);
                    wb.grant(u, RELATION, o).await?;
                    i += 1;
                }
                Ok((i - c * 10_000_000) as u64)
            })
        })
        .collect()
}

/// A memory store that never flushes: callers granting into it hold the
/// cores as in the burst, and nothing of theirs reaches the server.
async fn sink(target: &Target) -> Res<WriteBehind> {
    let store = target.store("bench-sink").await?;
    let mut cfg = target.config(&store);
    cfg.buffer.capacity = 10_000_000;
    cfg.flush.batch_size = 100_000_000;
    cfg.flush.interval = Duration::from_secs(3600);
    cfg.flush.eager_revokes = false;
    Ok(WriteBehind::builder(cfg)
        .automatic_flush(false)
        .build()
        .await?)
}

/// The raw writer (pre-built 100-tuple Writes in key order, 8 in parallel)
/// on a thread and runtime of its own, as fga-wb's flusher runs: says
/// `ready` once its requests are built, then writes until `stop` is set,
/// adding what it wrote by then to `written`. Its own client, so its
/// connections are driven by its own runtime.
fn raw_until(
    target: &Target,
    n: usize,
    ready: tokio::sync::oneshot::Sender<()>,
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Res<()>> {
    let (name, url, token) = (
        target.name.clone(),
        target.url.clone(),
        target.token.clone(),
    );
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let target = Target::new(&name, &url, &token)?;
            let store = target.store("bench-burst-raw").await?;
            let reqs = raw_requests(&store, n);
            let _ = ready.send(());
            write_raw(&target, &store, &reqs, &stop, &written, &AtomicU64::new(0)).await
        })
    })
}

/// How long the burst lasts.
const BURST: Duration = Duration::from_secs(2);

/// Sets `stop` once `BURST` has passed and returns what `read` finds at that
/// moment. The callers never wait (a memory-store grant does not), so the
/// burst is timed on a thread of its own, not on their runtime.
fn after_burst<T: Send + 'static>(
    stop: &Arc<AtomicBool>,
    read: impl FnOnce() -> T + Send + 'static,
) -> Res<T> {
    let stop = stop.clone();
    std::thread::spawn(move || {
        std::thread::sleep(BURST);
        stop.store(true, Ordering::Relaxed);
        read()
    })
    .join()
    .map_err(|_| "timer thread".into())
}

/// One round's burst: ops fga-wb applied during it, the raw writer's rate
/// (from the end-to-end run) times its length, and what the raw writer
/// wrote during the same burst.
struct Burst {
    applied: u64,
    raw_rate_times: f64,
    raw_in_burst: u64,
}

/// The per-call and burst figures, measured once per round.
#[derive(Default)]
struct Micro {
    grant_p99: Vec<(u64, u64, u64)>,
    burst: Vec<Burst>,
    redis_rate: Vec<(f64, f64)>,
}

impl Micro {
    async fn round(
        &mut self,
        bench: &Bench,
        sqlite: &Target,
        results: &BTreeMap<(String, Side), Vec<Run>>,
    ) -> Res<()> {
        let raw_rate = match results
            .get(&(sqlite.name.clone(), Side::Raw))
            .and_then(|r| r.last())
        {
            Some(r) => r.rate(),
            None => {
                let store = sqlite.store("bench-raw").await?;
                raw(sqlite, &store, scaled(50_000), &|| Default::default())
                    .await?
                    .rate()
            }
        };
        // grant latency, 8 tasks, default settings, flushing to SQLite.
        let store = sqlite.store("bench-grant-latency").await?;
        let wb = WriteBehind::builder(sqlite.config(&store)).build().await?;
        let per = scaled(125_000);
        let tasks: Vec<_> = (0..8)
            .map(|c| {
                let wb = wb.clone();
                tokio::spawn(async move {
                    let mut t = Tuples::default();
                    let mut lat = Vec::with_capacity(per);
                    for i in c * per..(c + 1) * per {
                        let (u, o) = t.set(i);
                        let start = Instant::now();
                        wb.grant(u, RELATION, o).await?;
                        lat.push(start.elapsed().as_nanos() as u64);
                    }
                    Ok::<Vec<u64>, fga_wb::Error>(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let lat = Lat::new(all);
        self.grant_p99.push((lat.q(0.5), lat.q(0.99), lat.q(0.999)));
        wb.clear().await?;
        wb.shutdown().await?;

        // A 2 s burst of 8 tasks granting flat out: what the flusher applied
        // meanwhile; then the same burst into a store that does not flush,
        // while the raw writer writes on a thread of its own (as the flusher
        // runs): the server's pace while the callers hold the cores.
        let store = sqlite.store("bench-burst").await?;
        let mut cfg = sqlite.config(&store);
        cfg.buffer.capacity = 10_000_000;
        let wb = WriteBehind::builder(cfg).build().await?;
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = grant_flat_out(&wb, 8, &stop);
        let started = Instant::now();
        let applied_at_stop = {
            let wb = wb.clone();
            after_burst(&stop, move || wb.local_totals().applied)?
        };
        let elapsed = started.elapsed();
        for t in tasks {
            t.await??;
        }
        wb.clear().await?;
        wb.shutdown().await?;

        let wb = sink(sqlite).await?;
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let n =
            ((raw_rate * BURST.as_secs_f64() * 3.0) as usize).max(RAW_PER_WRITE * raw_parallel());
        let writer = raw_until(sqlite, n, ready_tx, stop.clone(), written.clone());
        ready_rx
            .await
            .map_err(|_| "the raw writer's thread stopped before it was ready")?;
        let tasks = grant_flat_out(&wb, 8, &stop);
        let raw_in_burst = {
            let written = written.clone();
            after_burst(&stop, move || written.load(Ordering::Relaxed))?
        };
        for t in tasks {
            t.await??;
        }
        writer.join().map_err(|_| "raw writer thread")??;
        wb.clear().await?;
        wb.shutdown().await?;
        self.burst.push(Burst {
            applied: applied_at_stop,
            raw_rate_times: raw_rate * elapsed.as_secs_f64(),
            raw_in_burst,
        });

        // Redis store acknowledgements, 32 callers, flushing deferred.
        let store = sqlite.store("bench-redis-ack").await?;
        let mut cfg = sqlite.config(&store);
        cfg.buffer.store = StoreKind::Redis;
        cfg.redis.url = bench.redis.url();
        cfg.buffer.capacity = 10_000_000;
        cfg.flush.batch_size = 100_000_000;
        cfg.flush.interval = Duration::from_secs(3600);
        cfg.flush.eager_revokes = false;
        let wb = WriteBehind::builder(cfg)
            .automatic_flush(false)
            .build()
            .await?;
        let pid = bench.redis.pid().unwrap_or(0);
        let cpu0 = proc_cpu(pid);
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let tasks = grant_flat_out(&wb, 32, &stop);
        tokio::time::sleep(Duration::from_secs(3)).await;
        stop.store(true, Ordering::Relaxed);
        let mut acked = 0;
        for t in tasks {
            acked += t.await??;
        }
        let wall = started.elapsed();
        let busy = proc_cpu(pid).saturating_sub(cpu0).as_secs_f64() / wall.as_secs_f64();
        self.redis_rate
            .push((acked as f64 / wall.as_secs_f64(), busy));
        wb.clear().await?;
        drop(wb);
        let _ = bench.round;
        Ok(())
    }

    fn print(&self) {
        println!("== per call and burst figures, one per round ==");
        let p99: Vec<f64> = self.grant_p99.iter().map(|t| t.1 as f64).collect();
        let (lo, mid, hi) = spread(&p99);
        println!(
            "grant p99, memory store, 8 tasks, flushing to SQLite:      min {} median {} max {}   (medians of p50: {}, p99.9: {})",
            fmt_ns(lo as u64),
            fmt_ns(mid as u64),
            fmt_ns(hi as u64),
            fmt_ns(spread(&self.grant_p99.iter().map(|t| t.0 as f64).collect::<Vec<_>>()).1 as u64),
            fmt_ns(spread(&self.grant_p99.iter().map(|t| t.2 as f64).collect::<Vec<_>>()).1 as u64),
        );
        let ratio = |f: &dyn Fn(&Burst) -> f64| {
            spread(
                &self
                    .burst
                    .iter()
                    .map(|b| b.applied as f64 / f(b).max(1.0))
                    .collect::<Vec<_>>(),
            )
        };
        let (lo, mid, hi) = ratio(&|b| b.raw_rate_times);
        println!(
            "applied during a 2 s burst of 8 tasks, / raw rate x 2 s:   min {lo:.2} median {mid:.2} max {hi:.2}   (applied: {:?})",
            self.burst.iter().map(|b| b.applied).collect::<Vec<_>>()
        );
        let (lo, mid, hi) = ratio(&|b| b.raw_in_burst as f64);
        println!(
            "  / raw writer during the same burst (callers granting into a store that does not flush): min {lo:.2} median {mid:.2} max {hi:.2}   (raw wrote: {:?})",
            self.burst.iter().map(|b| b.raw_in_burst).collect::<Vec<_>>()
        );
        let rates: Vec<f64> = self.redis_rate.iter().map(|r| r.0).collect();
        let (lo, mid, hi) = spread(&rates);
        let (blo, bmid, bhi) = spread(
            &self
                .redis_rate
                .iter()
                .map(|r| r.1 * 100.0)
                .collect::<Vec<_>>(),
        );
        println!(
            "Redis-store grants/s, 32 callers, no flushing:             min {lo:.0} median {mid:.0} max {hi:.0}   (Redis's core busy: {blo:.0}% / {bmid:.0}% / {bhi:.0}%)"
        );
        println!("load average at the end: {:.2}", load1());
    }
}
