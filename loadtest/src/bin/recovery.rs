//! `scripts/bench recovery`: how long fga-wb takes to recover after a
//! SIGKILL, driven through the operator's command, and how queue retries
//! are spaced.
//!
//! Recovery: an application process (Redis store, inline or queue mode)
//! granting flat out is SIGKILLed at a random point; or a `fga-wb worker`
//! is SIGKILLed in the middle of a queue and a new one started. The figure
//! is the time from the kill until `fga-wb flush --wait` exits 0 with every
//! acknowledged op in OpenFGA (verified by reading the store back). What a
//! dead writer held comes back when its lease (`redis.writer_lease`, 5 s)
//! ends, or, if it was writing then, its hold later
//! (`flush.unknown_outcome_hold`, 30 s: a Write of its may still land until
//! then), so the bound is the lease plus the hold plus the time to write
//! what is left.
//!
//! Retry spacing: a `fga-wb worker` whose OpenFGA is unreachable runs one
//! job through the default schedule (10 s, 30 s, 60 s), and the gaps
//! between its attempts are measured from its log lines as they arrive.
//!
//! `FGA_WB_BENCH_ROUNDS` (default 3), `FGA_WB_BENCH_SCALE`,
//! `FGA_WB_BENCH_ONLY=recovery,retries`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::WriteBehind;
use loadtest::*;
use testenv::{Datastore, OpenFga, OpenFgaOptions, Redis, RedisOptions};

/// Ops the killed application grants (before scaling).
const OPS: usize = 20_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    /// An application process, Redis store, inline mode.
    AppInline,
    /// An application process, queue mode, one worker running throughout.
    AppQueue,
    /// A worker in the middle of a queue; a new worker started at once.
    Worker,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::AppInline => "application SIGKILL, inline",
            Scenario::AppQueue => "application SIGKILL, queue mode",
            Scenario::Worker => "worker SIGKILL, queue mode",
        }
    }
}

struct Bench {
    fga: OpenFga,
    redis: Redis,
    target: Target,
    bin: PathBuf,
    seed: u64,
}

#[tokio::main]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        return child(args.get(2).map(String::as_str) == Some("queue")).await;
    }
    print_machine("recovery");
    let rounds = env_usize("FGA_WB_BENCH_ROUNDS", 3);
    let only = std::env::var("FGA_WB_BENCH_ONLY").unwrap_or_default();
    let wants = |what: &str| only.is_empty() || only.split(',').any(|o| o == what);
    let bin = std::env::current_exe()?
        .parent()
        .ok_or("no exe dir")?
        .join("fga-wb");
    if !bin.is_file() {
        return Err(format!("{} is missing: scripts/bench builds it", bin.display()).into());
    }
    eprintln!("starting servers ...");
    let fga = OpenFga::start(OpenFgaOptions {
        datastore: Datastore::Sqlite,
        ..Default::default()
    })
    .await?;
    let redis = Redis::start(RedisOptions::default()).await?;
    let target = Target::new("sqlite", &fga.url(), fga.token())?;
    let mut b = Bench {
        fga,
        redis,
        target,
        bin,
        seed: testenv::random(),
    };

    if wants("recovery") {
        let scenarios = [Scenario::AppInline, Scenario::AppQueue, Scenario::Worker];
        let mut results: Vec<Vec<f64>> = vec![Vec::new(); scenarios.len()];
        for round in 0..rounds {
            for (i, &s) in scenarios.iter().enumerate() {
                let secs = b.recover(s, round).await?;
                eprintln!("round {round}: {}: {secs:.2} s", s.name());
                results[i].push(secs);
            }
        }
        println!();
        println!(
            "Recovery after SIGKILL: from the kill until `fga-wb flush --wait` exits 0 with every \
             acknowledged op in OpenFGA ({} ops per run, {rounds} rounds; redis.writer_lease 5 s, \
             flush.unknown_outcome_hold 30 s)",
            scaled(OPS)
        );
        println!("| scenario | min | median | max |");
        println!("|---|---|---|---|");
        for (s, v) in scenarios.iter().zip(&results) {
            let (min, med, max) = spread(v);
            println!("| {} | {min:.2} s | {med:.2} s | {max:.2} s |", s.name());
        }
        println!("load average after: {:.2}", load1());
    }
    if wants("retries") {
        b.retry_spacing().await?;
    }
    Ok(())
}

impl Bench {
    /// `fga-wb` (or the child) configured for `store` through the
    /// environment, as an operator would.
    fn command(&self, exe: &PathBuf, store: &Store, queue: bool) -> Command {
        let mut c = Command::new(exe);
        c.current_dir("/")
            .env("FGA_API_URL", self.fga.url())
            .env("FGA_API_TOKEN", self.fga.token())
            .env("FGA_STORE_ID", &store.id)
            .env("FGA_MODEL_ID", &store.model_id)
            .env("FGA_WB_BUFFER__STORE", "redis")
            .env("FGA_WB_REDIS__URL", self.redis.url())
            .env("FGA_WB_FLUSH__MODE", if queue { "queue" } else { "inline" })
            .env("RUST_LOG", "error")
            .stdin(Stdio::null());
        c
    }

    fn worker(&self, store: &Store) -> Res<Child> {
        Ok(self.command(&self.bin, store, true).arg("worker").spawn()?)
    }

    /// One kill and recovery; returns the seconds from the kill until
    /// `flush --wait` exited 0.
    async fn recover(&mut self, s: Scenario, round: usize) -> Res<f64> {
        let store = self
            .target
            .store(&format!("recovery-{round}-{s:?}"))
            .await?;
        let n = scaled(OPS);
        self.seed = self.seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        // Between 30 % and 70 % of the way.
        let kill_at = n * 3 / 10 + (self.seed >> 33) as usize % (n * 4 / 10).max(1);
        let mut helpers: Vec<Child> = Vec::new();
        let (killed, acked) = match s {
            Scenario::AppInline | Scenario::AppQueue => {
                let queue = s == Scenario::AppQueue;
                if queue {
                    helpers.push(self.worker(&store)?);
                }
                let exe = std::env::current_exe()?;
                let mut child = self
                    .command(&exe, &store, queue)
                    .arg("child")
                    .arg(if queue { "queue" } else { "inline" })
                    .env("FGA_WB_BENCH_OPS", n.to_string())
                    .stdout(Stdio::piped())
                    .spawn()?;
                let out = BufReader::new(child.stdout.take().ok_or("no child stdout")?);
                let mut acked = 0;
                let mut killed = None;
                for line in out.lines() {
                    let line = line?;
                    if let Some(i) = line.strip_prefix("acked ") {
                        acked = i.parse::<usize>()? + 1;
                    }
                    if killed.is_none() && acked >= kill_at {
                        child.kill()?;
                        killed = Some(Instant::now());
                    }
                }
                child.wait()?;
                (killed.ok_or("the child ended before it was killed")?, acked)
            }
            Scenario::Worker => {
                let mut cfg = self.target.config(&store);
                cfg.buffer.store = StoreKind::Redis;
                cfg.redis.url = self.redis.url();
                cfg.flush.mode = Mode::Queue;
                cfg.flush.batch_size = 1_000_000;
                cfg.flush.interval = Duration::from_secs(3600);
                let wb = WriteBehind::builder(cfg)
                    .automatic_flush(false)
                    .build()
                    .await?;
                let mut t = Tuples::default();
                for i in 0..n {
                    let (u, o) = t.set(i);
                    wb.grant(u, RELATION, o).await?;
                }
                wb.flush().await?;
                let mut first = self.worker(&store)?;
                let started = Instant::now();
                while (wb.status().await?.totals.applied as usize) < kill_at {
                    if started.elapsed() > Duration::from_secs(120) {
                        return Err("the first worker applied too little".into());
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                first.kill()?;
                let killed = Instant::now();
                first.wait()?;
                helpers.push(self.worker(&store)?);
                wb.shutdown().await?;
                (killed, n)
            }
        };
        let status = self
            .command(&self.bin, &store, s != Scenario::AppInline)
            .args(["flush", "--wait", "--timeout", "300s"])
            .stdout(Stdio::null())
            .status()?;
        let secs = killed.elapsed().as_secs_f64();
        for mut h in helpers {
            let _ = h.kill();
            let _ = h.wait();
        }
        if !status.success() {
            return Err(format!("{}: flush --wait failed: {status}", s.name()).into());
        }
        let stored = self.target.count(&store).await?;
        // The op in progress at the kill may or may not have been
        // acknowledged (and written).
        if stored != acked && stored != acked + 1 {
            return Err(format!(
                "{}: {stored} tuples in OpenFGA, {acked} acknowledged",
                s.name()
            )
            .into());
        }
        Ok(secs)
    }

    /// A worker that cannot reach OpenFGA runs one job through the default
    /// schedule; prints the gaps between its attempts.
    async fn retry_spacing(&self) -> Res<()> {
        let store = self.target.store("retry-spacing").await?;
        let mut cfg = self.target.config(&store);
        cfg.buffer.store = StoreKind::Redis;
        cfg.redis.url = self.redis.url();
        cfg.flush.mode = Mode::Queue;
        let schedule = cfg.queue.retry_schedule.clone();
        let wb = WriteBehind::builder(cfg)
            .automatic_flush(false)
            .build()
            .await?;
        // The worker's OpenFGA is a closed port: every attempt fails at once.
        let closed = testenv::free_port()?;
        let mut worker = self
            .command(&self.bin, &store, true)
            .env("FGA_API_URL", format!("http://127.0.0.1:{closed}"))
            .env("RUST_LOG", "fga_wb=warn")
            .arg("worker")
            .stderr(Stdio::piped())
            .spawn()?;
        let err = BufReader::new(worker.stderr.take().ok_or("no worker stderr")?);
        wb.grant("user:spacing", RELATION, "document:spacing")
            .await?;
        wb.flush().await?;
        eprintln!(
            "retry spacing: one job through {schedule:?} (about {} s) ...",
            schedule.iter().map(Duration::as_secs).sum::<u64>()
        );
        let mut attempts: Vec<Instant> = Vec::new();
        for line in err.lines() {
            let line = line?;
            if line.contains("retry scheduled") || line.contains("dead-lettering") {
                attempts.push(Instant::now());
            }
            if line.contains("dead-lettering") {
                break;
            }
        }
        let _ = worker.kill();
        let _ = worker.wait();
        wb.shutdown().await?;
        println!();
        println!("Queue retry spacing (one job, OpenFGA unreachable, default schedule)");
        println!("| retry | scheduled | measured gap | late by |");
        println!("|---|---|---|---|");
        for (i, w) in attempts.windows(2).enumerate() {
            let gap = w[1] - w[0];
            let due = schedule.get(i).copied().unwrap_or_default();
            println!(
                "| {} | {:.1} s | {:.3} s | {:+.3} s |",
                i + 1,
                due.as_secs_f64(),
                gap.as_secs_f64(),
                gap.as_secs_f64() - due.as_secs_f64()
            );
        }
        if attempts.len() != schedule.len() + 1 {
            return Err(format!(
                "{} attempts seen, {} expected",
                attempts.len(),
                schedule.len() + 1
            )
            .into());
        }
        Ok(())
    }
}

/// The application that gets killed: grants distinct tuples one after
/// another through the Redis store, printing each acknowledged index.
async fn child(queue: bool) -> Res<()> {
    use std::io::Write;
    let n: usize = std::env::var("FGA_WB_BENCH_OPS")?.parse()?;
    let mut cfg = fga_wb::Config::load(None)?;
    cfg.buffer.store = StoreKind::Redis;
    cfg.flush.mode = if queue { Mode::Queue } else { Mode::Inline };
    let wb = WriteBehind::builder(cfg).build().await?;
    let mut out = std::io::stdout().lock();
    let mut t = Tuples::default();
    for i in 0..n {
        let (u, o) = t.set(i);
        wb.grant(u, RELATION, o).await?;
        writeln!(out, "acked {i}")?;
        out.flush()?;
    }
    // Parked until killed: a clean shutdown is not what is measured.
    std::future::pending::<()>().await;
    Ok(())
}
