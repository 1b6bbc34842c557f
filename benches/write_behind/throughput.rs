//! 2. End-to-end throughput against raw Writes (superseded by `scripts/bench throughput`, kept for the earlier figures).

use super::*;

// ---------------------------------------------------------------------------
// 2. End-to-end throughput
// ---------------------------------------------------------------------------

/// One timed run: `n` tuples from the first call until OpenFGA has them all.
pub(crate) struct Run {
    pub(crate) side: &'static str,
    pub(crate) n: usize,
    pub(crate) time: Duration,
    pub(crate) requests: u64,
    /// Failed requests that were sent again.
    pub(crate) retries: u64,
    /// Tuples Read back from the store afterwards.
    pub(crate) stored: usize,
}

impl Run {
    pub(crate) fn rate(&self) -> f64 {
        rate(self.n, self.time)
    }
}

/// Sends `req`, again on a transient failure (at most 5 tries); returns the
/// number of retries.
pub(crate) async fn write_retrying(client: &Client, store: &str, req: &WriteRequest) -> Res<u64> {
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

pub(crate) async fn run_fga_wb(env: &Env, n: usize) -> Res<Run> {
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

pub(crate) async fn run_raw(env: &Env, n: usize, per_write: usize, parallel: usize) -> Res<Run> {
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

pub(crate) async fn run_per_tuple(env: &Env, n: usize, parallel: usize) -> Res<Run> {
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
pub(crate) async fn throughput_on(env: &Env, n: usize, n_single: usize, rounds: usize) -> Res<()> {
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

pub(crate) async fn throughput(env: &Env) -> Res<()> {
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

    let server = sqlite_openfga().await?;
    let sqlite = env.with_server(&server.url(), server.token())?;
    let n = env.n(100_000);
    let n_single = env.n(10_000);
    println!();
    println!(
        "2b. OpenFGA, sqlite datastore (indexed; started by this benchmark from the same openfga binary, \
         a throw-away database): {n} tuples; fga-wb and the raw ceiling run three times, alternating which goes first."
    );
    throughput_on(&sqlite, n, n_single, 3).await?;
    drop(server);
    Ok(())
}
