//! 1. Acknowledgement latency of the memory store, next to a direct Write.

use super::*;

// ---------------------------------------------------------------------------
// 1. Acknowledgement latency
// ---------------------------------------------------------------------------

/// Per-call latencies of `n` grants, and the slowest calls with their index.
pub(crate) async fn grant_latencies(
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
pub(crate) async fn direct_writes(env: &Env, n: usize) -> Res<Lat> {
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

pub(crate) async fn ack(env: &Env) -> Res<()> {
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
