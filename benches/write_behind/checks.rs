//! 4. Checks: cache hits and misses next to raw Checks.

use super::*;

// ---------------------------------------------------------------------------
// 4. Checks
// ---------------------------------------------------------------------------

pub(crate) async fn checks(env: &Env) -> Res<()> {
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
