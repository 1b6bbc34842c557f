//! 8. Queue-mode end-to-end throughput.

use super::*;

// ---------------------------------------------------------------------------
// 8. Queue-mode end-to-end throughput
// ---------------------------------------------------------------------------

/// How the ops reach OpenFGA in one end-to-end run.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Path {
    InlineMemory,
    InlineRedis,
    /// Queue mode, with one in-process worker of this concurrency.
    Queue(usize),
}

impl Path {
    pub(crate) fn name(self) -> String {
        match self {
            Path::InlineMemory => "inline, memory store".into(),
            Path::InlineRedis => "inline, Redis store".into(),
            Path::Queue(c) => format!("queue, Redis store, 1 worker x{c}"),
        }
    }
}

/// An in-process `fga-wb worker`, stopped through its shutdown future.
pub(crate) struct Worker {
    pub(crate) stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub(crate) task: tokio::task::JoinHandle<fga_wb::Result<()>>,
}

impl Worker {
    pub(crate) fn start(config: Config, concurrency: usize) -> Worker {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(fga_wb::queue::worker::run(config, concurrency, async {
            let _ = rx.await;
        }));
        Worker {
            stop: Some(tx),
            task,
        }
    }

    pub(crate) async fn stop(mut self) -> Res<()> {
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
pub(crate) async fn settle(wb: &WriteBehind, limit: Duration) -> Res<u64> {
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
pub(crate) const E2E_CALLERS: usize = 16;

/// `n` distinct grants through `path`, from the first call until settle()
/// sees nothing pending; then the store is read back.
pub(crate) async fn run_e2e(
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

pub(crate) async fn queue_e2e(env: &Env) -> Res<()> {
    let n = env.n(20_000);
    let rounds = 2;
    let redis_url = env.redis()?;
    heading("8. Queue-mode end-to-end throughput vs inline mode");
    let server = sqlite_openfga().await?;
    let sqlite = env.with_server(&server.url(), server.token())?;
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
        openfga_pid: server.pid().map(|p| p.to_string()).unwrap_or_default(),
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
