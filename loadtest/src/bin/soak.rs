//! `scripts/bench soak`: what fga-wb leaves in Redis. 1M distinct grants
//! (`FGA_WB_BENCH_SCALE` scales it) go through the Redis store inline, then
//! through queue mode with one worker, each into its own OpenFGA store, 16
//! calling tasks, default settings. Redis's used memory and key count are
//! sampled every second; the table gives the idle baseline, the peak, the
//! state once everything is applied, and again after the write marks'
//! lifetime (2 min, `check.server_cache_ttl`'s ceiling) has passed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::WriteBehind;
use loadtest::{print_machine, scaled, Res, Target, Tuples, RELATION};
use testenv::{Datastore, OpenFga, OpenFgaOptions, Postgres, Redis, RedisOptions};

const CALLERS: usize = 16;
/// How long write marks stay in Redis (written.rs KEEP), plus a heartbeat.
const MARKS: Duration = Duration::from_secs(125);

/// Redis's used memory (bytes) and key count.
async fn sample(redis: &Redis) -> (u64, u64) {
    let info = redis.command("INFO memory").await.unwrap_or_default();
    let used = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let keys = redis
        .command("DBSIZE")
        .await
        .and_then(|r| r.trim().trim_start_matches(':').parse().ok())
        .unwrap_or(0);
    (used, keys)
}

fn mb(b: u64) -> String {
    format!("{:.2} MB", b as f64 / 1e6)
}

struct Row {
    name: &'static str,
    baseline: (u64, u64),
    peak: (u64, u64),
    drained: (u64, u64),
    later: (u64, u64),
    secs: f64,
}

async fn run(
    name: &'static str,
    mode: Mode,
    target: &Target,
    redis: &Arc<Redis>,
    n: usize,
) -> Res<Row> {
    let slug: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let store = target.store(&format!("soak-{slug}")).await?;
    let mut c = target.config(&store);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = redis.url();
    c.flush.mode = mode;
    let wb = WriteBehind::builder(c.clone()).build().await?;
    let worker = (mode == Mode::Queue).then(|| {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(fga_wb::queue::worker::run(c, 8, async {
            let _ = rx.await;
        }));
        (tx, task)
    });
    let baseline = sample(redis).await;
    let started = Instant::now();
    let peak = Arc::new(std::sync::Mutex::new(baseline));
    let sampling = {
        let (redis, peak) = (redis.clone(), peak.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let (m, k) = sample(&redis).await;
                let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                *p = (p.0.max(m), p.1.max(k));
            }
        })
    };
    let mut callers = Vec::new();
    for c in 0..CALLERS {
        let wb = wb.clone();
        callers.push(tokio::spawn(async move {
            let mut t = Tuples::default();
            for i in (c..n).step_by(CALLERS) {
                let (user, object) = t.set(i);
                wb.grant(user, RELATION, object).await?;
            }
            Ok::<_, fga_wb::Error>(())
        }));
    }
    for c in callers {
        c.await??;
    }
    // Drained: nothing pending, in flight or queued, every tuple applied.
    loop {
        wb.flush().await?;
        let st = wb.status().await?;
        let queued = st
            .queue
            .as_ref()
            .map_or(0, |q| q.pending + q.running + q.scheduled);
        if st.pending.total + st.pending.in_flight == 0
            && queued == 0
            && st.totals.applied >= n as u64
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let drained = sample(redis).await;
    tokio::time::sleep(MARKS).await;
    let later = sample(redis).await;
    sampling.abort();
    if let Some((tx, task)) = worker {
        let _ = tx.send(());
        let _ = task.await;
    }
    let _ = wb.shutdown().await;
    let peak = *peak.lock().unwrap_or_else(|e| e.into_inner());
    Ok(Row {
        name,
        baseline,
        peak,
        drained,
        later,
        secs,
    })
}

#[tokio::main]
async fn main() -> Res<()> {
    print_machine("what fga-wb leaves in Redis");
    let n = scaled(1_000_000);
    println!("starting servers ...");
    // PostgreSQL: OpenFGA's memory datastore slows to a few hundred writes
    // a second past ~100k tuples.
    let pg = Postgres::start().await?;
    let uri = pg.create_database("openfga")?;
    let openfga = OpenFga::start(OpenFgaOptions {
        datastore: Datastore::Postgres(uri),
        ..Default::default()
    })
    .await?;
    let target = Target::new("postgres", &openfga.url(), openfga.token())?;
    let redis = Arc::new(Redis::start(RedisOptions::default()).await?);
    println!("{n} distinct grants per run, {CALLERS} calling tasks, default settings; OpenFGA on PostgreSQL");
    let mut rows = Vec::new();
    for (name, mode) in [
        ("Redis store, inline", Mode::Inline),
        ("queue mode, 1 worker", Mode::Queue),
    ] {
        println!("running: {name}");
        rows.push(run(name, mode, &target, &redis, n).await?);
    }
    println!();
    println!(
        "{:<22} {:>9} {:>18} {:>18} {:>18} {:>18}",
        "", "time", "idle before", "peak", "drained", "2 min later"
    );
    for r in &rows {
        let cell = |(m, k): (u64, u64)| format!("{} / {k} keys", mb(m));
        println!(
            "{:<22} {:>8.0}s {:>18} {:>18} {:>18} {:>18}",
            r.name,
            r.secs,
            cell(r.baseline),
            cell(r.peak),
            cell(r.drained),
            cell(r.later)
        );
    }
    println!("Redis used_memory / DBSIZE. \"drained\": every grant applied, nothing pending or queued; \"2 min later\": after the write marks (kept for check.server_cache_ttl's 2 min ceiling) expired.");
    Ok(())
}
