//! `scripts/bench cluster`: how many grants per second the Redis store
//! acknowledges on one Redis node, on a 3-primary Redis Cluster with the
//! stores spread over the primaries, and on that cluster with a replica per
//! primary and `redis.wait_replicas = 1` (every push waits for its replica).
//!
//! Stores: `FGA_WB_BENCH_STORES` (default 6), chosen so each primary serves
//! the same number; 8 calling tasks per store grant distinct tuples for 3 s,
//! nothing is flushed. The contenders run interleaved, in rounds
//! (`FGA_WB_BENCH_ROUNDS`, default 3); each row gives min/median/max of the
//! rounds' rates, the median p50/p99 grant latency, the Redis servers' CPU
//! (cores busy, summed over nodes) and the load average.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fga_wb::config::StoreKind;
use fga_wb::WriteBehind;
use loadtest::{
    env_usize, fmt_ns, load1, print_machine, proc_cpu, spread, Lat, Res, Store, Target, Tuples,
    RELATION,
};
use testenv::{OpenFga, OpenFgaOptions, Redis, RedisCluster, RedisOptions};

const CALLERS_PER_STORE: usize = 8;
const RUN: Duration = Duration::from_secs(3);

/// One way to run Redis.
struct Contender {
    name: &'static str,
    url: String,
    pids: Vec<u32>,
    wait_replicas: u32,
}

#[derive(Default)]
struct Figures {
    rates: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    busy: Vec<f64>,
    load: Vec<f64>,
}

#[tokio::main]
async fn main() -> Res<()> {
    print_machine("Redis store on one node vs a Redis Cluster");
    let rounds = env_usize("FGA_WB_BENCH_ROUNDS", 3);
    let n_stores = env_usize("FGA_WB_BENCH_STORES", 6).max(3);
    println!("starting servers ...");
    let openfga = OpenFga::start(OpenFgaOptions::default()).await?;
    let target = Target::new("memory", &openfga.url(), openfga.token())?;
    let node = Redis::start(RedisOptions::default()).await?;
    let cluster = RedisCluster::start(3, 0).await?;
    let replicated = RedisCluster::start(3, 1).await?;

    // Stores spread evenly over the primaries (both clusters split the
    // slots the same way).
    let mut by_owner: BTreeMap<String, Vec<Store>> = BTreeMap::new();
    let per_primary = n_stores.div_ceil(3);
    let mut made = 0;
    while by_owner.len() < 3 || by_owner.values().any(|v| v.len() < per_primary) {
        let s = target.store(&format!("bench-cluster-{made}")).await?;
        made += 1;
        let owner = owner_of(&cluster, &format!("fga-wb:{{{}}}", s.id)).await?;
        let list = by_owner.entry(owner).or_default();
        if list.len() < per_primary {
            list.push(s);
        }
        if made > 50 * n_stores {
            return Err("could not spread the stores over the primaries".into());
        }
    }
    let stores: Vec<Store> = by_owner.into_values().flatten().collect();
    println!(
        "{} stores ({} per primary), {} calling tasks each, {} s per run, {rounds} rounds, interleaved",
        stores.len(),
        per_primary,
        CALLERS_PER_STORE,
        RUN.as_secs()
    );

    let pids = |nodes: &[Redis]| nodes.iter().filter_map(Redis::pid).collect::<Vec<_>>();
    let contenders = [
        Contender {
            name: "one Redis node",
            url: node.url(),
            pids: node.pid().into_iter().collect(),
            wait_replicas: 0,
        },
        Contender {
            name: "Redis Cluster, 3 primaries",
            url: cluster.url(),
            pids: pids(cluster.nodes()),
            wait_replicas: 0,
        },
        Contender {
            name: "3 primaries + 1 replica each, wait_replicas = 1",
            url: replicated.url(),
            pids: pids(replicated.nodes()),
            wait_replicas: 1,
        },
    ];
    let mut figures: Vec<Figures> = contenders.iter().map(|_| Figures::default()).collect();
    for round in 1..=rounds {
        for (c, f) in contenders.iter().zip(&mut figures) {
            println!("round {round}: {}", c.name);
            run(&target, &stores, c, f).await?;
        }
    }

    println!();
    println!(
        "{:<50} {:>8} {:>8} {:>8} {:>9} {:>9} {:>10} {:>6}",
        "Redis", "min", "median", "max", "p50", "p99", "Redis CPU", "load"
    );
    for (c, f) in contenders.iter().zip(&figures) {
        let (lo, mid, hi) = spread(&f.rates);
        println!(
            "{:<50} {:>8.0} {:>8.0} {:>8.0} {:>9} {:>9} {:>9.2}c {:>6.2}",
            c.name,
            lo,
            mid,
            hi,
            fmt_ns(spread(&f.p50).1 as u64),
            fmt_ns(spread(&f.p99).1 as u64),
            spread(&f.busy).1,
            spread(&f.load).1,
        );
    }
    println!(
        "grants/s acknowledged (min/median/max over rounds); p50/p99: median over rounds of each grant's latency; \
         Redis CPU: cores the redis-server processes kept busy, summed; load: 1-minute load average at the start of the runs."
    );
    Ok(())
}

/// Which primary serves `key`: its address, from CLUSTER SLOTS.
async fn owner_of(cluster: &RedisCluster, key: &str) -> Res<String> {
    let n = &cluster.nodes()[0];
    let slot: u16 = n
        .command(&format!("CLUSTER KEYSLOT {key}"))
        .await
        .and_then(|r| r.trim().trim_start_matches(':').parse().ok())
        .ok_or("CLUSTER KEYSLOT")?;
    let mut client = redis::Client::open(n.url())?
        .get_multiplexed_async_connection()
        .await?;
    let ranges: Vec<(u16, u16, (String, u16))> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async::<Vec<redis::Value>>(&mut client)
        .await?
        .into_iter()
        .filter_map(|r| {
            let v: Vec<redis::Value> = redis::from_redis_value(r).ok()?;
            let lo: u16 = redis::from_redis_value_ref(v.first()?).ok()?;
            let hi: u16 = redis::from_redis_value_ref(v.get(1)?).ok()?;
            let node: Vec<redis::Value> = redis::from_redis_value_ref(v.get(2)?).ok()?;
            let host: String = redis::from_redis_value_ref(node.first()?).ok()?;
            let port: u16 = redis::from_redis_value_ref(node.get(1)?).ok()?;
            Some((lo, hi, (host, port)))
        })
        .collect();
    ranges
        .into_iter()
        .find(|(lo, hi, _)| (*lo..=*hi).contains(&slot))
        .map(|(_, _, (h, p))| format!("{h}:{p}"))
        .ok_or_else(|| "slot not served".into())
}

async fn run(target: &Target, stores: &[Store], c: &Contender, f: &mut Figures) -> Res<()> {
    let mut handles = Vec::new();
    for s in stores {
        let mut cfg = target.config(s);
        cfg.buffer.store = StoreKind::Redis;
        cfg.redis.url.clone_from(&c.url);
        cfg.redis.wait_replicas = c.wait_replicas;
        cfg.buffer.capacity = 100_000_000;
        cfg.flush.interval = Duration::from_secs(3600);
        cfg.flush.batch_size = 100_000_000;
        cfg.flush.eager_revokes = false;
        handles.push(
            WriteBehind::builder(cfg)
                .automatic_flush(false)
                .read_model(false)
                .build()
                .await?,
        );
    }
    f.load.push(load1());
    let cpu0: Vec<Duration> = c.pids.iter().map(|p| proc_cpu(*p)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (si, wb) in handles.iter().enumerate() {
        for k in 0..CALLERS_PER_STORE {
            let (wb, stop) = (wb.clone(), stop.clone());
            // Distinct tuples per caller and per run, so nothing coalesces.
            let base = (si * CALLERS_PER_STORE + k) * 100_000_000 + f.rates.len() * 10_000_000;
            tasks.push(tokio::spawn(async move {
                let mut t = Tuples::default();
                let mut lat = Vec::with_capacity(200_000);
                let mut i = base;
                while !stop.load(Ordering::Relaxed) {
                    let (u, o) = t.set(i);
                    let at = Instant::now();
                    wb.grant(u, RELATION, o).await?;
                    lat.push(at.elapsed().as_nanos() as u64);
                    i += 1;
                }
                Ok::<Vec<u64>, fga_wb::Error>(lat)
            }));
        }
    }
    tokio::time::sleep(RUN).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let wall = started.elapsed();
    let busy: f64 = c
        .pids
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| proc_cpu(*p).saturating_sub(*c0).as_secs_f64())
        .sum::<f64>()
        / wall.as_secs_f64();
    let n = all.len();
    let lat = Lat::new(all);
    f.rates.push(n as f64 / wall.as_secs_f64());
    f.p50.push(lat.q(0.5) as f64);
    f.p99.push(lat.q(0.99) as f64);
    f.busy.push(busy);
    for wb in handles {
        wb.clear().await?;
    }
    Ok(())
}
