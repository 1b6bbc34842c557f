//! Redis helpers; 6. Redis-store acknowledgement latency; 7. Redis-store throughput with concurrent callers.

use super::*;

// ---------------------------------------------------------------------------
// Redis helpers
// ---------------------------------------------------------------------------

/// A plain connection to the Redis at `url` (for what fga-wb does not
/// expose: PING, INFO, HEXISTS).
pub(crate) async fn redis_conn(url: &str) -> Res<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    let conn = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| format!("no connection to {url} within 5 s"))??;
    Ok(conn)
}

/// How many times Redis has run a script (EVAL or EVALSHA) so far, and the
/// server's CPU time in them (µs): every fga-wb store operation is one
/// script call.
pub(crate) async fn script_calls(conn: &mut redis::aio::MultiplexedConnection) -> Res<(u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await?;
    let field = |l: &str, name: &str| {
        l.split([':', ','])
            .find_map(|f| f.strip_prefix(name))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok(info
        .lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .fold((0, 0), |(c, u), l| {
            (c + field(l, "calls="), u + field(l, "usec="))
        }))
}

/// CPU seconds (user + system) a process has used so far, from
/// /proc/<pid>/stat (clock ticks of 1/100 s, Linux's USER_HZ).
pub(crate) fn proc_cpu(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// CPU seconds the Redis server has used so far (INFO cpu).
pub(crate) async fn redis_cpu(conn: &mut redis::aio::MultiplexedConnection) -> Res<f64> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await?;
    Ok(info
        .lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
        .sum())
}

/// CPU seconds used by this process, Redis and OpenFGA during a run.
#[derive(Clone, Copy, Default)]
pub(crate) struct Cpu {
    pub(crate) app: f64,
    pub(crate) redis: f64,
    pub(crate) openfga: f64,
}

/// Samples the three processes' CPU counters.
pub(crate) struct CpuMeter {
    pub(crate) openfga_pid: String,
    pub(crate) conn: redis::aio::MultiplexedConnection,
}

impl CpuMeter {
    pub(crate) async fn now(&mut self) -> Res<Cpu> {
        Ok(Cpu {
            app: proc_cpu("self"),
            redis: redis_cpu(&mut self.conn).await?,
            openfga: proc_cpu(&self.openfga_pid),
        })
    }

    pub(crate) async fn since(&mut self, start: Cpu) -> Res<Cpu> {
        let now = self.now().await?;
        Ok(Cpu {
            app: now.app - start.app,
            redis: now.redis - start.redis,
            openfga: now.openfga - start.openfga,
        })
    }
}

/// `n` PING round trips on one connection, one after another.
pub(crate) async fn ping_latencies(
    conn: &mut redis::aio::MultiplexedConnection,
    n: usize,
) -> Res<Lat> {
    for _ in 0..1000 {
        let _: String = redis::cmd("PING").query_async(conn).await?;
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        let _: String = redis::cmd("PING").query_async(conn).await?;
        lat.push(ns(start.elapsed()));
    }
    Ok(Lat::new(lat))
}

/// `total` distinct grants (tuples `offset..offset + total`) from `callers`
/// concurrent tasks, each taking a contiguous share; every call is timed.
/// Returns the latencies and the wall time from the first call to the last
/// return.
pub(crate) async fn concurrent_grants(
    wb: &WriteBehind,
    callers: usize,
    total: usize,
    offset: usize,
) -> Res<(Lat, Duration)> {
    let per = total.div_ceil(callers);
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let wb = wb.clone();
            let (lo, hi) = ((c * per).min(total), ((c + 1) * per).min(total));
            tokio::spawn(async move {
                let mut t = Tuples::new();
                let mut lat = Vec::with_capacity(hi - lo);
                for i in lo..hi {
                    let (u, o) = t.set(offset + i);
                    let start = Instant::now();
                    wb.grant(u, RELATION, o).await?;
                    lat.push(ns(start.elapsed()));
                }
                Ok::<_, fga_wb::Error>(lat)
            })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await??);
    }
    Ok((Lat::new(all), started.elapsed()))
}

/// Drops what a Redis-store handle left pending, so the shared Redis does
/// not keep it; returns how long that took.
pub(crate) async fn discard_timed(wb: WriteBehind) -> Res<Duration> {
    let started = Instant::now();
    discard(wb).await?;
    Ok(started.elapsed())
}

// ---------------------------------------------------------------------------
// 6. Redis-store acknowledgement latency
// ---------------------------------------------------------------------------

pub(crate) async fn redis_ack(env: &Env) -> Res<()> {
    let n = env.n(100_000);
    let writes = env.n(1000);
    let redis_url = env.redis()?;
    heading(
        "6. Redis-store acknowledgement latency: grant() vs the memory store and a direct Write",
    );
    println!(
        "{n} grants of distinct tuples per store, one caller, each call timed with Instant; flush deferred \
         (only the buffer is measured). Redis: the scripts/servers one on loopback (no persistence: \
         --appendonly no --save '')."
    );
    let mut conn = redis_conn(&redis_url).await?;
    let ping = ping_latencies(&mut conn, env.n(20_000)).await?;

    let store = env.store("bench-redis-ack-memory").await?;
    let wb = WriteBehind::builder(env.deferred_config(&store))
        .build()
        .await?;
    let (memory, _) = grant_latencies(&wb, n, 0).await?;
    discard(wb).await?;

    let store = env.store("bench-redis-ack").await?;
    let cfg = Env::with_redis(env.deferred_config(&store), &redis_url);
    let wb = WriteBehind::builder(cfg).build().await?;
    let before = script_calls(&mut conn).await?;
    let (redis_lat, redis_slow) = grant_latencies(&wb, n, 0).await?;
    let after = script_calls(&mut conn).await?;
    let (calls, usec) = (after.0 - before.0, after.1 - before.1);
    let pending = wb.pending().await?;
    let cleared_in = discard_timed(wb).await?;

    let direct = direct_writes(env, writes).await?;

    lat_header();
    lat_row("grant, Redis store (one script call each)", &redis_lat);
    lat_row("grant, memory store", &memory);
    lat_row("redis PING round trip (the floor)", &ping);
    lat_row("direct client.write, 1 tuple, sequential", &direct);
    println!(
        "Redis script calls during the timed grants and their warm-up: {calls} for {} grants, \
         {:.1} µs of Redis CPU each; pending in Redis afterwards: {} (cleared in {:.2} s)",
        n + 1000,
        usec as f64 / calls.max(1) as f64,
        pending.total,
        cleared_in.as_secs_f64()
    );
    println!(
        "mean grant: {} Redis store, {} memory store",
        fmt_ns(redis_lat.mean() as u64),
        fmt_ns(memory.mean() as u64)
    );
    println!(
        "grant median / PING median: {:.1}x; direct write median / Redis grant median: {:.1}x",
        redis_lat.median() as f64 / ping.median().max(1) as f64,
        direct.median() as f64 / redis_lat.median().max(1) as f64
    );
    println!(
        "slowest Redis-store grants (op #: latency): {}",
        redis_slow
            .iter()
            .map(|&(i, l)| format!("#{i} {}", fmt_ns(l)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "target Redis-store grant p99 <= 1 ms: {} -> {}",
        fmt_ns(redis_lat.q(0.99)),
        verdict(redis_lat.q(0.99) <= 1_000_000)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 7. Redis-store throughput with concurrent callers
// ---------------------------------------------------------------------------

pub(crate) async fn redis_throughput(env: &Env) -> Res<()> {
    let total = env.n(200_000);
    let single = env.n(50_000);
    let redis_url = env.redis()?;
    heading("7. Redis-store acknowledgement throughput with concurrent callers");
    println!(
        "{total} distinct grants per run ({single} with one caller, to bound the run time), shared evenly by \
         the callers (tokio tasks on one handle); \
         flush deferred, so this measures the buffer; each run on a fresh store. The memory store \
         runs the same load for comparison."
    );
    let mut conn = redis_conn(&redis_url).await?;
    println!(
        "{:<8} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6}",
        "store",
        "callers",
        "ops",
        "time",
        "ops/s",
        "median",
        "p99",
        "p99.9",
        "max",
        "ops/call",
        "µs/op",
        "busy"
    );
    let mut best = 0.0f64;
    for callers in [1, 8, 64, 256] {
        // One caller is bounded by the round trip (section 6): fewer ops.
        let ops = if callers == 1 { single } else { total };
        for redis in [true, false] {
            let store = env.store("bench-redis-tp").await?;
            let cfg = if redis {
                Env::with_redis(env.deferred_config(&store), &redis_url)
            } else {
                env.deferred_config(&store)
            };
            let wb = WriteBehind::builder(cfg).build().await?;
            // Warm-up on other tuples: connections, the script cache, code.
            concurrent_grants(&wb, callers.min(8), 1000, total).await?;
            let before = script_calls(&mut conn).await?;
            let (lat, time) = concurrent_grants(&wb, callers, ops, 0).await?;
            let after = script_calls(&mut conn).await?;
            let (calls, usec) = (after.0 - before.0, after.1 - before.1);
            let pending = wb.pending().await?.total;
            if pending != ops + 1000 {
                return Err(format!("{pending} pending, expected {}", ops + 1000).into());
            }
            discard(wb).await?;
            let r = rate(ops, time);
            if redis {
                best = best.max(r);
            }
            let (per_call, per_op, busy) = if redis {
                (
                    format!("{:.1}", ops as f64 / calls.max(1) as f64),
                    format!("{:.1}", usec as f64 / ops as f64),
                    format!("{:.0}%", usec as f64 / 1e4 / time.as_secs_f64()),
                )
            } else {
                ("-".into(), "-".into(), "-".into())
            };
            println!(
                "{:<8} {:>7} {:>7} {:>6.2} s {:>8.0} {:>9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>6}",
                if redis { "Redis" } else { "memory" },
                callers,
                ops,
                time.as_secs_f64(),
                r,
                fmt_ns(lat.median()),
                fmt_ns(lat.q(0.99)),
                fmt_ns(lat.q(0.999)),
                fmt_ns(lat.max()),
                per_call,
                per_op,
                busy
            );
        }
    }
    println!(
        "ops/call: grants per Redis script call (INFO commandstats): concurrent grants are pushed \
         together, up to 512 per call, each batch one atomic script run; µs/op: Redis CPU time in \
         those scripts per grant; busy: that time as a share of the run's wall time (Redis runs \
         scripts on one thread, so near 100% it is the limit)"
    );
    println!(
        "every run verified: pending() afterwards equals the grants made (each grant is one distinct pending op)"
    );
    println!(
        "target Redis-store throughput >= 50k ops/s (best over caller counts): {best:.0} -> {}",
        verdict(best >= 50_000.0)
    );
    Ok(())
}
