//! 3. Coalescing: many updates of few keys.

use super::*;

// ---------------------------------------------------------------------------
// 3. Coalescing
// ---------------------------------------------------------------------------

/// One coalescing run: what it sent and whether the final state is right.
pub(crate) struct CoalesceRun {
    pub(crate) flush: fga_wb::config::FlushConfig,
    /// Totals when the last update returned, and after the final flush.
    pub(crate) during: fga_wb::Totals,
    pub(crate) totals: fga_wb::Totals,
    pub(crate) update_time: Duration,
    pub(crate) total_time: Duration,
    pub(crate) flushes: u32,
    /// Tuples stored, tuples expected, and whether they are the same set.
    pub(crate) stored: usize,
    pub(crate) expected: usize,
    pub(crate) exact: bool,
}

impl CoalesceRun {
    pub(crate) fn sent(&self) -> u64 {
        self.totals.applied + self.totals.dead_lettered
    }

    pub(crate) fn sent_during(&self) -> u64 {
        self.during.applied + self.during.dead_lettered
    }
}

/// `updates` random grant/revoke updates over `keys` keys with `cfg`, then
/// flush() until empty; reads the store back.
pub(crate) async fn coalesce_run(
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

pub(crate) async fn coalesce(env: &Env) -> Res<()> {
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
