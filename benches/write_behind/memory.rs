//! 5. Memory per pending op.

use super::*;

// ---------------------------------------------------------------------------
// 5. Memory
// ---------------------------------------------------------------------------

pub(crate) async fn memory(env: &Env) -> Res<()> {
    let n = env.n(1_000_000);
    heading("5. Memory: resident memory per pending op");
    let store = env.store("bench-memory").await?;
    let wb = WriteBehind::builder(env.deferred_config(&store))
        .build()
        .await?;
    let mut t = Tuples::new();
    // One op first, so lazily built parts of the store exist before the baseline.
    let (u, o) = t.set(n);
    wb.grant(u, RELATION, o).await?;
    let before = rss_bytes();
    for i in 0..n {
        let (u, o) = t.set(i);
        wb.grant(u, RELATION, o).await?;
    }
    let after = rss_bytes();
    let p = wb.pending().await?;
    let key = {
        let (u, o) = t.set(n / 2);
        format!("{o}#{RELATION}@{u}")
    };
    discard(wb).await?;
    let per_op = after.saturating_sub(before) as f64 / n as f64;
    println!(
        "{n} distinct grants pending (flush deferred); keys `object#relation@user` of {} bytes, e.g. {key}",
        key.len()
    );
    println!("{:<40} {:>14}", "", "value");
    println!(
        "{:<40} {:>11.1} MiB",
        "VmRSS before",
        before as f64 / 1048576.0
    );
    println!(
        "{:<40} {:>11.1} MiB",
        "VmRSS with ops pending",
        after as f64 / 1048576.0
    );
    println!("{:<40} {:>14}", "pending ops (pending().total)", p.total);
    println!(
        "{:<40} {:>12.0} B",
        "resident memory per pending op", per_op
    );
    println!(
        "target <= 256 B/op: {per_op:.0} B -> {}",
        verdict(per_op <= 256.0)
    );
    Ok(())
}
