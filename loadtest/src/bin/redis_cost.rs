//! `scripts/bench redis-cost`: where Redis's time goes, per tuple, when 16
//! calling tasks grant 100k distinct tuples (`FGA_WB_BENCH_SCALE` scales it)
//! through the Redis store inline and through queue mode with one worker
//! (in this process), flushing to OpenFGA on SQLite. Each of fga-wb's store
//! calls is one script run; Redis's slow log, set to record every command,
//! gives the time of each script run (by the store call it made) and of each
//! command inside it, and Redis's command statistics split the scripts' time
//! into the commands they issued and the rest: Lua itself (parsing and
//! encoding entries, tables, arguments, garbage collection).
//! `FGA_WB_BENCH_ROUNDS` (default 3).
//!
//! Recording every command costs Redis CPU (each round also runs each mode
//! without the slow log, to show how much), and a command's time is
//! wall time inside Redis: on shared cores it includes the moments Redis's
//! thread waited for a core. So the figures are for comparing the store
//! calls with each other and one version with another on one machine, not
//! an idle Redis's cost.

use std::collections::BTreeMap;
use std::time::Duration;

use fga_wb::config::{Mode, StoreKind};
use fga_wb::WriteBehind;
use loadtest::{
    drain, env_usize, grant_ranges, print_machine, proc_cpu, scaled, spread, Res, Target,
};
use redis::Value;
use testenv::{Datastore, OpenFga, OpenFgaOptions, Redis, RedisOptions};

const CALLERS: usize = 16;
/// Slow-log entries kept per tuple: a run makes about 1.3 per tuple (the
/// script runs and the commands inside them), each a few hundred bytes.
const LOG_PER_TUPLE: usize = 4;
/// Commands Redis counts that no store script issues (this benchmark's own,
/// the clients' connection setup and the events subscription).
const NOT_SCRIPTS: &[&str] = &[
    "evalsha",
    "eval",
    "config",
    "slowlog",
    "info",
    "client",
    "hello",
    "subscribe",
    "ssubscribe",
    "ping",
    "select",
    "script",
    "command",
];

/// One run's figures: µs per tuple by store call, and the totals.
#[derive(Default)]
struct Cost {
    /// store call -> (calls, µs)
    calls: BTreeMap<String, (u64, u64)>,
    scripts_us: u64,
    commands_us: u64,
    redis_cpu: Duration,
    /// Redis's CPU in a run of the same mode without the slow log.
    plain_cpu: Duration,
    tuples: usize,
}

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        _ => String::new(),
    }
}

/// Time by store call from the slow log: (call, µs) per EVALSHA entry.
fn script_times(log: &Value) -> Vec<(String, u64)> {
    let Value::Array(entries) = log else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let Value::Array(f) = e else { return None };
            let us = match f.get(2) {
                Some(Value::Int(i)) => u64::try_from(*i).ok()?,
                _ => return None,
            };
            let Some(Value::Array(argv)) = f.get(3) else {
                return None;
            };
            let argv: Vec<String> = argv.iter().map(text).collect();
            // EVALSHA sha numkeys prefix call ...
            let name = match argv.first().map(|c| c.to_ascii_lowercase()) {
                Some(c) if c == "evalsha" || c == "eval" => argv.get(4)?.clone(),
                Some(c) if NOT_SCRIPTS.contains(&c.as_str()) => return None,
                Some(c) => format!("({c})"),
                None => return None,
            };
            Some((name, us))
        })
        .collect()
}

/// (µs in scripts, µs in the commands scripts issued) from INFO commandstats.
fn split_stats(info: &str) -> (u64, u64) {
    let (mut scripts, mut commands) = (0, 0);
    for line in info.lines() {
        let Some((cmd, fields)) = line
            .strip_prefix("cmdstat_")
            .and_then(|l| l.split_once(':'))
        else {
            continue;
        };
        let us: u64 = fields
            .split(',')
            .find_map(|f| f.strip_prefix("usec="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if cmd == "evalsha" || cmd == "eval" {
            scripts += us;
        } else if !NOT_SCRIPTS.contains(&cmd.split('|').next().unwrap_or(cmd)) {
            commands += us;
        }
    }
    (scripts, commands)
}

/// One run; `logged`: with every command in the slow log (else only
/// Redis's CPU is measured).
async fn run(target: &Target, redis: &Redis, mode: Mode, n: usize, logged: bool) -> Res<Cost> {
    let store = target.store("bench-redis-cost").await?;
    let mut cfg = target.config(&store);
    cfg.buffer.store = StoreKind::Redis;
    cfg.redis.url = redis.url();
    cfg.flush.mode = mode;
    let client = redis::Client::open(redis.url())?;
    let mut con = client.get_connection_with_timeout(Duration::from_secs(60))?;
    let set = |con: &mut redis::Connection, k: &str, v: usize| -> Res<()> {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query::<()>(con)?;
        Ok(())
    };
    set(&mut con, "slowlog-max-len", n * LOG_PER_TUPLE)?;
    set(
        &mut con,
        "slowlog-log-slower-than",
        if logged { 0 } else { 10_000 },
    )?;
    redis::cmd("SLOWLOG").arg("RESET").query::<()>(&mut con)?;
    redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query::<()>(&mut con)?;
    let pid = redis.pid().ok_or("redis is not running")?;
    let cpu0 = proc_cpu(pid);

    let wb = WriteBehind::builder(cfg.clone()).build().await?;
    let (stop, worker) = tokio::sync::oneshot::channel::<()>();
    let worker = (mode == Mode::Queue).then(|| {
        let concurrency = cfg.queue.worker_concurrency;
        tokio::spawn(fga_wb::queue::worker::run(cfg, concurrency, async {
            let _ = worker.await;
        }))
    });
    grant_ranges(&wb, n, CALLERS).await?;
    drain(&wb, Duration::from_secs(600)).await?;
    let redis_cpu = proc_cpu(pid).saturating_sub(cpu0);
    set(&mut con, "slowlog-log-slower-than", 10_000)?;
    let log: Value = redis::cmd("SLOWLOG").arg("GET").arg(-1).query(&mut con)?;
    if matches!(&log, Value::Array(e) if e.len() >= n * LOG_PER_TUPLE) {
        return Err("Redis's slow log filled up: raise LOG_PER_TUPLE".into());
    }
    let info: String = redis::cmd("INFO").arg("commandstats").query(&mut con)?;
    let _ = stop.send(());
    if let Some(w) = worker {
        w.await??;
    }
    wb.shutdown().await?;
    let stored = target.count(&store).await?;
    if stored != n {
        return Err(format!("{stored} tuples stored, {n} expected").into());
    }

    let mut cost = Cost {
        redis_cpu,
        tuples: n,
        ..Default::default()
    };
    for (name, us) in script_times(&log) {
        let e = cost.calls.entry(name).or_default();
        e.0 += 1;
        e.1 += us;
    }
    (cost.scripts_us, cost.commands_us) = split_stats(&info);
    Ok(cost)
}

/// Per tuple, as `min / median / max` over the rounds.
fn per_tuple(runs: &[Cost], f: impl Fn(&Cost) -> f64) -> String {
    let v: Vec<f64> = runs.iter().map(|c| f(c) / c.tuples as f64).collect();
    let (lo, mid, hi) = spread(&v);
    format!("{lo:.2} / {mid:.2} / {hi:.2}")
}

fn print(name: &str, runs: &[Cost]) {
    println!(
        "\n{name}: µs of Redis time per tuple, min / median / max over {} rounds",
        runs.len()
    );
    let mut names: Vec<&String> = runs.iter().flat_map(|c| c.calls.keys()).collect();
    names.sort();
    names.dedup();
    let (commands, calls): (Vec<&String>, Vec<&String>) =
        names.into_iter().partition(|n| n.starts_with('('));
    let get = |c: &Cost, call: &str| c.calls.get(call).copied().unwrap_or_default();
    println!("  by store call (each one script run; calls per 1k tuples):");
    for call in calls {
        let per_k: Vec<f64> = runs
            .iter()
            .map(|c| get(c, call).0 as f64 * 1e3 / c.tuples as f64)
            .collect();
        println!(
            "    {call:<14} {:>22}   {:>6.1} calls",
            per_tuple(runs, |c| get(c, call).1 as f64),
            spread(&per_k).1
        );
    }
    println!(
        "    {:<14} {:>22}",
        "all scripts",
        per_tuple(runs, |c| c.scripts_us as f64)
    );
    println!(
        "  of which Redis commands {}, Lua itself {}",
        per_tuple(runs, |c| c.commands_us as f64),
        per_tuple(runs, |c| c.scripts_us.saturating_sub(c.commands_us) as f64)
    );
    // The costliest commands, by median.
    let mut top: Vec<(f64, &String)> = commands
        .into_iter()
        .map(|cmd| {
            let v: Vec<f64> = runs
                .iter()
                .map(|c| get(c, cmd).1 as f64 / c.tuples as f64)
                .collect();
            (spread(&v).1, cmd)
        })
        .collect();
    top.sort_by(|a, b| b.0.total_cmp(&a.0));
    let top: Vec<String> = top
        .iter()
        .take(8)
        .map(|(us, cmd)| format!("{} {us:.2}", cmd.trim_matches(|c| c == '(' || c == ')')))
        .collect();
    println!("  costliest commands (median): {}", top.join(", "));
    println!(
        "  Redis's CPU over the run (/proc): {}; in a run without the slow log: {}",
        per_tuple(runs, |c| c.redis_cpu.as_micros() as f64),
        per_tuple(runs, |c| c.plain_cpu.as_micros() as f64)
    );
}

#[tokio::main]
async fn main() -> Res<()> {
    print_machine("where Redis's time goes");
    let rounds = env_usize("FGA_WB_BENCH_ROUNDS", 3);
    let n = scaled(100_000);
    println!("starting servers ...");
    let openfga = OpenFga::start(OpenFgaOptions {
        datastore: Datastore::Sqlite,
        ..Default::default()
    })
    .await?;
    let target = Target::new("sqlite", &openfga.url(), openfga.token())?;
    let redis = Redis::start(RedisOptions::default()).await?;
    println!("{n} distinct grants per run, {CALLERS} calling tasks, default settings; OpenFGA on SQLite; {rounds} rounds");
    let modes = [
        ("Redis store, inline", Mode::Inline),
        ("queue mode, 1 worker", Mode::Queue),
    ];
    let mut results: Vec<Vec<Cost>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for (i, (name, mode)) in modes.iter().enumerate() {
            eprintln!("round {}: {name}", round + 1);
            // Without the slow log first: what recording costs Redis.
            let plain = run(&target, &redis, *mode, n, false).await?;
            let mut cost = run(&target, &redis, *mode, n, true).await?;
            cost.plain_cpu = plain.redis_cpu;
            results[i].push(cost);
        }
    }
    for ((name, _), runs) in modes.iter().zip(&results) {
        print(name, runs);
    }
    Ok(())
}
