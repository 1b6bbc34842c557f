//! `scripts/bench server-caches`: check latency against OpenFGA as production runs
//! it (PostgreSQL, check query cache, both iterator caches and the cache
//! controller on, 10 s TTL), with many concurrent callers, and how often
//! fga-wb has to bypass those caches.
//!
//! Rows, interleaved in rounds (`FGA_WB_BENCH_ROUNDS`, default 3), 16
//! calling tasks for 3 s each, over 10k tuples (half of the checks allowed):
//! a raw Check with the default consistency (the server's caches), a raw
//! Check with HIGHER_CONSISTENCY (no cache), fga-wb's check with its own
//! cache on 100 hot tuples (hits), fga-wb's check with its cache off and no
//! recent write (the server's caches), and a mix: 1% of calls grant or
//! revoke a tuple (flushed in the background, 1 s interval), the rest check
//! the whole universe, with fga-wb's cache on and off. A check goes out
//! with HIGHER_CONSISTENCY when its document was written within
//! `check.server_cache_ttl` (30 s), so the share is about the share of
//! documents written in the last 30 s: here ~28 writes/s over 1000
//! documents, split over two handles. Each row gives checks/s (min/median/max over rounds), the median
//! over rounds of the p50 and p99 latency, and the share of checks fga-wb
//! sent with HIGHER_CONSISTENCY because a recent write could matter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fga_wb::openfga::{CheckRequest, Consistency, WriteRequest};
use fga_wb::WriteBehind;
use loadtest::{
    env_usize, fmt_ns, load1, print_machine, spread, Lat, Res, Store, Target, RELATION,
};
use testenv::{Datastore, OpenFga, OpenFgaOptions, Postgres};

const CALLERS: usize = 16;
const RUN: Duration = Duration::from_secs(3);
const DOCS: usize = 1000;
const USERS: usize = 20;

/// A small deterministic generator (xorshift), per calling task.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// A user and document of the universe; even users are granted.
fn pick(rng: &mut Rng) -> (String, String) {
    (
        format!("user:u{}", rng.below(USERS)),
        format!("document:d{}", rng.below(DOCS)),
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Who {
    RawDefault,
    RawHigher,
    Handle { cached: bool, writes: bool },
}

struct Row {
    name: &'static str,
    who: Who,
    rates: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    higher: Vec<f64>,
    load: Vec<f64>,
}

struct Env {
    target: Target,
    store: Store,
    /// Handles by (its cache on, it writes): the read-only ones know of no
    /// write, so they show what checks cost when none is recent.
    handles: [[WriteBehind; 2]; 2],
}

impl Env {
    fn handle(&self, who: Who) -> Option<&WriteBehind> {
        match who {
            Who::Handle { cached, writes } => {
                Some(&self.handles[usize::from(cached)][usize::from(writes)])
            }
            _ => None,
        }
    }
}

/// One run: `CALLERS` tasks for `RUN`; returns (checks/s, latencies,
/// share of checks sent with HIGHER_CONSISTENCY).
async fn run(env: &Arc<Env>, who: Who, seed: u64) -> Res<(f64, Lat, f64)> {
    let handle = env.handle(who);
    let before = match handle {
        Some(h) => h.status().await?.totals,
        None => Default::default(),
    };
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let env = env.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ ((c as u64 + 1) * 0x9E37_79B9_7F4A_7C15));
            let mut lat = Vec::new();
            let mut checks = 0u64;
            let h = env.handle(who);
            // Cache hits: a read-only handle with its cache on asks about
            // 100 hot tuples over and over.
            let hot = who
                == Who::Handle {
                    cached: true,
                    writes: false,
                };
            while started.elapsed() < RUN {
                let (user, doc) = if hot {
                    (
                        format!("user:u{}", rng.below(2)),
                        format!("document:d{}", rng.below(50)),
                    )
                } else {
                    pick(&mut rng)
                };
                if matches!(who, Who::Handle { writes: true, .. }) && rng.below(100) == 0 {
                    if let Some(h) = h {
                        let r = if rng.below(2) == 0 {
                            h.grant(&user, RELATION, &doc).await
                        } else {
                            h.revoke(&user, RELATION, &doc).await
                        };
                        r.map_err(|e| e.to_string())?;
                    }
                    continue;
                }
                let t = Instant::now();
                let answer = match (who, h) {
                    (Who::RawDefault | Who::RawHigher, _) => {
                        let mut req = CheckRequest::new(&user, RELATION, &doc);
                        req.authorization_model_id = Some(env.store.model_id.clone());
                        if who == Who::RawHigher {
                            req.consistency = Consistency::HigherConsistency;
                        }
                        env.target.client.check(&env.store.id, &req).await
                    }
                    (_, Some(h)) => h.check(&user, RELATION, &doc).await,
                    (_, None) => unreachable!("a handle row has a handle"),
                };
                match answer {
                    Ok(_) => {}
                    // A check held up by a pending revoke fails closed: count
                    // its time like any other answer.
                    Err(e) if e.is_stale_check() => {}
                    Err(e) => return Err(e.to_string()),
                }
                lat.push(t.elapsed().as_nanos() as u64);
                checks += 1;
            }
            Ok::<_, String>((checks, lat))
        }));
    }
    let mut all = Vec::new();
    let mut checks = 0;
    for t in tasks {
        let (n, lat) = t.await??;
        checks += n;
        all.extend(lat);
    }
    let rate = checks as f64 / started.elapsed().as_secs_f64();
    let higher = match handle {
        Some(h) => {
            let after = h.status().await?.totals;
            let misses = after.cache_misses - before.cache_misses;
            let hits = after.cache_hits - before.cache_hits;
            let sent = after.higher_consistency - before.higher_consistency;
            sent as f64 / (misses + hits).max(1) as f64
        }
        None => 0.0,
    };
    Ok((rate, Lat::new(all), higher))
}

#[tokio::main]
async fn main() -> Res<()> {
    print_machine("check latency against a caching OpenFGA on PostgreSQL");
    let rounds = env_usize("FGA_WB_BENCH_ROUNDS", 3);
    println!("starting servers ...");
    let pg = Postgres::start().await?;
    let uri = pg.create_database("openfga")?;
    let openfga = OpenFga::start(OpenFgaOptions {
        datastore: Datastore::Postgres(uri),
        caches: Some(Duration::from_secs(10)),
        ..Default::default()
    })
    .await?;
    let target = Target::new("postgres", &openfga.url(), openfga.token())?;
    let store = target.store("bench-checks").await?;
    // Even users view every document: half the checks are allowed.
    let mut tuples = Vec::new();
    for d in 0..DOCS {
        for u in (0..USERS).step_by(2) {
            tuples.push(fga_wb::TupleKey::new(
                format!("user:u{u}"),
                RELATION,
                format!("document:d{d}"),
            )?);
        }
    }
    for chunk in tuples.chunks(100) {
        let mut req = WriteRequest::idempotent(chunk.to_vec(), vec![]);
        req.authorization_model_id = Some(store.model_id.clone());
        target.write_retrying(&store, &req).await?;
    }
    let started = Instant::now();
    let mut handles = Vec::new();
    for cached in [false, true] {
        let mut row = Vec::new();
        for _writes in [false, true] {
            let mut c = target.config(&store);
            if !cached {
                c.cache.ttl = Duration::from_millis(1);
            } else {
                // Long enough to span the rounds.
                c.cache.ttl = Duration::from_secs(600);
            }
            row.push(WriteBehind::builder(c).build().await?);
        }
        handles.push(<[WriteBehind; 2]>::try_from(row).map_err(|_| "two handles")?);
    }
    let handles = <[[WriteBehind; 2]; 2]>::try_from(handles).map_err(|_| "four handles")?;
    let env = Arc::new(Env {
        target,
        store,
        handles,
    });
    println!(
        "{} tuples ({DOCS} documents x {} users); {CALLERS} calling tasks, {} s per run, {rounds} rounds, interleaved",
        tuples.len(),
        USERS / 2,
        RUN.as_secs()
    );

    let mut rows = vec![
        Row::new(
            "raw Check, default consistency (server caches)",
            Who::RawDefault,
        ),
        Row::new("raw Check, HIGHER_CONSISTENCY (no cache)", Who::RawHigher),
        Row::new(
            "fga-wb check, its cache on (100 hot tuples: hits)",
            Who::Handle {
                cached: true,
                writes: false,
            },
        ),
        Row::new(
            "fga-wb check, its cache off, no recent writes",
            Who::Handle {
                cached: false,
                writes: false,
            },
        ),
        Row::new(
            "fga-wb, 1% grants/revokes, its cache on",
            Who::Handle {
                cached: true,
                writes: true,
            },
        ),
        Row::new(
            "fga-wb, 1% grants/revokes, its cache off",
            Who::Handle {
                cached: false,
                writes: true,
            },
        ),
    ];
    // Warm every cache once.
    for row in &rows {
        run(&env, row.who, 1).await?;
    }
    // A new handle cannot know what was written before it started, so it
    // asks HIGHER_CONSISTENCY for `check.server_cache_ttl` after: measure
    // the handles as they run for good, past that.
    let window = env.target.config(&env.store).check.server_cache_ttl;
    if let Some(left) = (started + window).checked_duration_since(Instant::now()) {
        println!(
            "waiting {:.0} s: the handles' first {} s after they started",
            left.as_secs_f64(),
            window.as_secs()
        );
        tokio::time::sleep(left).await;
    }
    for round in 0..rounds {
        // Rotate the order so no row always runs first.
        let n = rows.len();
        for k in 0..n {
            let row = &mut rows[(k + round) % n];
            println!("round {}: {}", round + 1, row.name);
            let load = load1();
            let (rate, lat, higher) = run(&env, row.who, 7 + round as u64).await?;
            row.rates.push(rate);
            row.p50.push(lat.q(0.5) as f64);
            row.p99.push(lat.q(0.99) as f64);
            row.higher.push(higher);
            row.load.push(load);
        }
    }

    println!();
    println!(
        "{:<52} {:>8} {:>8} {:>8} {:>10} {:>10} {:>8} {:>6}",
        "", "min/s", "median/s", "max/s", "p50", "p99", "HIGHER", "load"
    );
    for row in &rows {
        let (lo, mid, hi) = spread(&row.rates);
        let (_, p50, _) = spread(&row.p50);
        let (_, p99, _) = spread(&row.p99);
        let (_, higher, _) = spread(&row.higher);
        let (_, load, _) = spread(&row.load);
        let higher = match row.who {
            Who::Handle { .. } => format!("{:.1}%", higher * 100.0),
            Who::RawHigher => "100%".to_owned(),
            Who::RawDefault => "0%".to_owned(),
        };
        println!(
            "{:<52} {:>8.0} {:>8.0} {:>8.0} {:>10} {:>10} {:>8} {:>6.2}",
            row.name,
            lo,
            mid,
            hi,
            fmt_ns(p50 as u64),
            fmt_ns(p99 as u64),
            higher,
            load
        );
    }
    println!(
        "checks/s: all calling tasks together (min/median/max over rounds); p50/p99: median over rounds of each check's latency; \
         HIGHER: share of fga-wb's checks sent with HIGHER_CONSISTENCY (median over rounds); load: 1-minute load average at the start of the runs."
    );
    for h in env.handles.iter().flatten() {
        let _ = h.shutdown().await;
    }
    Ok(())
}

impl Row {
    fn new(name: &'static str, who: Who) -> Row {
        Row {
            name,
            who,
            rates: Vec::new(),
            p50: Vec::new(),
            p99: Vec::new(),
            higher: Vec::new(),
            load: Vec::new(),
        }
    }
}
