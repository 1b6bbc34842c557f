//! 9. Durability: Redis killed and restarted with AOF on; 10. the memory store's crash loss window.

use super::*;

// ---------------------------------------------------------------------------
// 9. Durability: Redis killed and restarted with AOF on
// ---------------------------------------------------------------------------

/// The control run: no append-only file (nor snapshots), so a restart
/// starts empty and every acknowledged op must show as lost.
pub(crate) const NO_AOF: &str = "no (control)";

/// A redis-server of this benchmark's own (the project's launcher), with an
/// append-only file per `fsync` (`NO_AOF`: none), killed and restarted on
/// the same port and directory.
pub(crate) async fn own_redis(fsync: &'static str) -> Res<testenv::Redis> {
    let aof = match fsync {
        "always" => Some(testenv::Fsync::Always),
        "everysec" => Some(testenv::Fsync::EverySec),
        _ => None,
    };
    Ok(testenv::Redis::start(testenv::RedisOptions {
        aof,
        ..Default::default()
    })
    .await?)
}

/// What one kill-and-restart run saw.
pub(crate) struct AofRun {
    pub(crate) fsync: &'static str,
    pub(crate) callers: usize,
    pub(crate) acked: usize,
    /// Time from the first call to the kill.
    pub(crate) load: Duration,
    pub(crate) failed_calls: usize,
    pub(crate) missing: usize,
    /// Ops in Redis after the restart that no caller saw acknowledged (in
    /// flight at the kill).
    pub(crate) unacked_present: usize,
    pub(crate) restart: Duration,
    pub(crate) resumed: Result<Duration, String>,
}

pub(crate) async fn aof_run(
    env: &Env,
    fsync: &'static str,
    callers: usize,
    load: Duration,
) -> Res<AofRun> {
    let mut redis = own_redis(fsync).await?;
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
    redis.kill();
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

    let restarting = Instant::now();
    redis.run().await?;
    let restart = restarting.elapsed();
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

pub(crate) async fn aof(env: &Env) -> Res<()> {
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
pub(crate) struct WindowRun {
    pub(crate) target: usize,
    pub(crate) granted: usize,
    pub(crate) time: Duration,
    pub(crate) applied: u64,
    pub(crate) samples: Lat,
    /// The sampler's achieved period (it may fall behind under load).
    pub(crate) sample_period: Duration,
}

/// Grants distinct tuples at `target`/s for `duration` (paced in 1 ms
/// steps) while a task samples pending() every 10 ms.
pub(crate) async fn window_run(env: &Env, target: usize, duration: Duration) -> Res<WindowRun> {
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

pub(crate) async fn loss_window(env: &Env) -> Res<()> {
    let duration = Duration::from_secs_f64((10.0 * env.scale).max(1.0));
    heading("10. Memory store: how many acknowledged ops a crash would lose, under steady load");
    let server = sqlite_openfga().await?;
    let sqlite = env.with_server(&server.url(), server.token())?;
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
