//! `scripts/bench redis-calls [script.lua ...]`: Redis's time per op of the
//! store script's frequent calls on an idle Redis, for comparing versions of
//! the script with each other without OpenFGA or the machine's other load in
//! the figures.
//!
//! Each round, for each version in turn (the committed
//! `src/buffer/redis/store.lua` first, then the files given, which must take
//! the same call arguments), on a flushed Redis: push `N` distinct ops 16 a
//! call (`FGA_WB_BENCH_PUSH_BATCH`), take them 500 a call and enqueue them in
//! jobs of 100, then fetch the jobs 8 a call and finish each as applied, as
//! queue mode does (inline mode's calls are push, take and finish, though
//! its finish drops ops taken by a process, not held by a job, through the
//! same fast path). Between the pushes and the takes, `N / 5` calls of
//! `gen`, which every check on a shared store runs, are timed per call:
//! `src/buffer/redis/gen.lua`, or a version's own `gen` command where it
//! has one (store.lua had it before gen.lua).
//! Redis's own
//! `INFO commandstats` gives the time of the script runs, so neither the
//! network nor this process counts. Rotating which version goes first each
//! round puts drift in the machine on every version alike.
//! `FGA_WB_BENCH_ROUNDS` (default 5); `FGA_WB_BENCH_SCALE` scales N
//! (default 50k).

use fga_wb::queue::{Job, JobOp};
use loadtest::{env_usize, print_machine, scaled, spread, Res};
use redis::aio::MultiplexedConnection;
use redis::Value;
use testenv::{Redis, RedisOptions};

const CALLS: [&str; 5] = ["push", "take", "enqueue", "fetch", "finish"];
/// `gen` calls per op pushed: what every check on a shared store runs,
/// timed per call, on the store holding every op pushed.
const CHECKS_PER_OP: usize = 5;
const TAKE: usize = 500;
const JOB: usize = 100;
const FETCH: usize = 8;
const WRITER: &str = "bench:1";

/// µs of script time in Redis so far (`EVAL` and `EVALSHA`).
async fn script_us(c: &mut MultiplexedConnection) -> Res<u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(c)
        .await?;
    let mut total = 0;
    for line in info.lines().filter(|l| l.starts_with("cmdstat_eval")) {
        let us = line
            .split("usec=")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|u| u.parse::<u64>().ok())
            .ok_or_else(|| format!("unexpected INFO line: {line}"))?;
        total += us;
    }
    Ok(total)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn text(v: &Value) -> Res<String> {
    Ok(redis::from_redis_value_ref::<String>(v)?)
}

/// One script call, with its Redis time added to `spent`.
async fn timed(
    c: &mut MultiplexedConnection,
    inv: &redis::ScriptInvocation<'_>,
    spent: &mut u64,
) -> Res<Vec<Value>> {
    let before = script_us(c).await?;
    let v = match inv.invoke_async(c).await? {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    *spent += script_us(c).await? - before;
    Ok(v)
}

/// One version's run: µs per op of each call in `CALLS`, and µs per `gen`
/// call.
async fn run(
    c: &mut MultiplexedConnection,
    script: &redis::Script,
    gen_script: &redis::Script,
    prefix: &str,
    n: usize,
    batch: usize,
) -> Res<([f64; 5], f64)> {
    let _: () = redis::cmd("FLUSHALL").query_async(c).await?;
    let mut spent = [0u64; 5];
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let mut inv = script.key(prefix);
        inv.arg("push")
            .arg("PUBLISH")
            .arg(now_ms())
            .arg(n * 2)
            .arg(end - start);
        for i in start..end {
            // 2000 objects, users in no order: as concurrent callers push.
            let key = format!("document:d{:05}#viewer@user:u{:07}", (i * 7919) % 2000, i);
            inv.arg(key).arg("g").arg("");
        }
        timed(c, &inv, &mut spent[0]).await?;
    }
    let checks = (n / CHECKS_PER_OP).max(1);
    let mut gen = 0;
    for _ in 0..checks {
        let mut inv = gen_script.key(prefix);
        inv.arg("gen").arg("PUBLISH").arg(1).arg("document#viewer");
        timed(c, &inv, &mut gen).await?;
    }
    loop {
        let mut inv = script.key(prefix);
        inv.arg("take")
            .arg("PUBLISH")
            .arg(now_ms())
            .arg(TAKE)
            .arg("rg")
            .arg(u64::MAX / 4)
            .arg(WRITER)
            .arg(30_000);
        let v = timed(c, &inv, &mut spent[1]).await?;
        // {corrupt, term, (key, seq, op, cond, first)*}
        let mut ops = v
            .get(replies_from(&v)..)
            .unwrap_or_default()
            .chunks_exact(5)
            .map(|o| Ok((text(&o[0])?, text(&o[1])?)))
            .collect::<Res<Vec<(String, String)>>>()?;
        if ops.is_empty() {
            break;
        }
        ops.sort();
        for job in ops.chunks(JOB) {
            let mut inv = script.key(prefix);
            inv.arg("enqueue")
                .arg("PUBLISH")
                .arg(now_ms())
                .arg(WRITER)
                .arg("store")
                .arg("model")
                .arg(job.len());
            for (key, seq) in job {
                inv.arg(key).arg(seq);
            }
            // The job as the library encodes it (id 0 for the script to
            // fill in); a script that does not read it ignores it.
            let template = Job {
                id: 0,
                store_id: "store".into(),
                model_id: "model".into(),
                ops: job
                    .iter()
                    .map(|(key, seq)| JobOp {
                        key: key.clone(),
                        op: "g".into(),
                        seq: seq.parse().unwrap_or(0),
                        cond: String::new(),
                    })
                    .collect(),
                attempt: 0,
                last_error: None,
            };
            inv.arg(serde_json::to_string(&template)?);
            timed(c, &inv, &mut spent[2]).await?;
        }
    }
    let mut calls = 0u64;
    loop {
        let mut inv = script.key(prefix);
        inv.arg("fetch")
            .arg("PUBLISH")
            .arg(now_ms())
            .arg(WRITER)
            .arg(30_000)
            .arg(FETCH);
        let v = timed(c, &inv, &mut spent[3]).await?;
        // {bad, term, (job id, job json, claims)*}; scripts before ids:
        // (job json, claims)*.
        let from = replies_from(&v);
        if v.len() <= from {
            break;
        }
        let term = match v.get(1) {
            Some(Value::Int(t)) if from == 2 => t.to_string(),
            _ => String::new(),
        };
        let with_ids = !text(&v[from])?.starts_with('{');
        let json_at = usize::from(with_ids);
        for each in v.get(from..).unwrap_or_default().chunks_exact(2 + json_at) {
            let job: serde_json::Value = serde_json::from_str(&text(&each[json_at])?)?;
            let ops = job["ops"].as_array().ok_or("a job without ops")?;
            let mut inv = script.key(prefix);
            inv.arg("finish")
                .arg("PUBLISH")
                .arg(now_ms())
                .arg(WRITER)
                .arg(job["id"].to_string())
                .arg("done")
                .arg(0)
                .arg("")
                .arg(ops.len());
            for op in ops {
                let key = op["key"].as_str().ok_or("an op without a key")?;
                inv.arg(key)
                    .arg(op["seq"].to_string())
                    .arg("a")
                    .arg("")
                    .arg("")
                    .arg(0);
            }
            // The call's id, the oldest still open (this one) and the term,
            // as the library sends them; a script before finish ids
            // ignores them.
            calls += 1;
            inv.arg(calls).arg(calls).arg(&term);
            timed(c, &inv, &mut spent[4]).await?;
        }
    }
    let left: usize = redis::cmd("HLEN")
        .arg(format!("{prefix}:ops"))
        .query_async(c)
        .await?;
    if left != 0 {
        return Err(format!(
            "{left} ops left in Redis after the run: the calls did not match this script"
        )
        .into());
    }
    Ok((
        spent.map(|us| us as f64 / n as f64),
        gen as f64 / checks as f64,
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Res<()> {
    print_machine("Redis time per op of the store script's calls, idle Redis");
    let rounds = env_usize("FGA_WB_BENCH_ROUNDS", 5);
    let n = scaled(50_000);
    let batch = env_usize("FGA_WB_BENCH_PUSH_BATCH", 16).max(1);
    let mut files = vec!["src/buffer/redis/store.lua".to_owned()];
    files.extend(std::env::args().skip(1));
    let gen = redis::Script::new(&std::fs::read_to_string("src/buffer/redis/gen.lua")?);
    let scripts = files
        .iter()
        .map(|f| {
            let text = std::fs::read_to_string(f).map_err(|e| format!("{f}: {e}"))?;
            let script = redis::Script::new(&text);
            let gen = if text.contains("if cmd == 'gen' then") {
                script.clone()
            } else {
                gen.clone()
            };
            Ok::<_, String>((gen, script))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let redis = Redis::start(RedisOptions::default()).await?;
    let mut c = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    println!(
        "{n} ops per run, pushed {batch} a call; {rounds} rounds, the versions' order rotated each round"
    );
    let mut got: Vec<Vec<([f64; 5], f64)>> = vec![Vec::new(); scripts.len()];
    for round in 0..rounds {
        for i in 0..scripts.len() {
            let v = (round + i) % scripts.len();
            let prefix = format!("fga-wb:{{bench{round}v{v}}}");
            let (gen, script) = &scripts[v];
            got[v].push(run(&mut c, script, gen, &prefix, n, batch).await?);
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    println!("\nµs of Redis time per op, min / median / max over rounds");
    for (f, runs) in files.iter().zip(&got) {
        println!("{f}");
        let mut push_take_finish = Vec::new();
        let mut all_five = Vec::new();
        for (r, _) in runs {
            push_take_finish.push(r[0] + r[1] + r[4]);
            all_five.push(r.iter().sum::<f64>());
        }
        for (i, call) in CALLS.iter().enumerate() {
            let (lo, mid, hi) = spread(&runs.iter().map(|(r, _)| r[i]).collect::<Vec<_>>());
            println!("  {call:8} {lo:6.2} / {mid:6.2} / {hi:6.2}");
        }
        let (lo, mid, hi) = spread(&push_take_finish);
        println!("  push + take + finish  {lo:6.2} / {mid:6.2} / {hi:6.2}");
        let (lo, mid, hi) = spread(&all_five);
        println!("  all five              {lo:6.2} / {mid:6.2} / {hi:6.2}");
        let (lo, mid, hi) = spread(&runs.iter().map(|(_, g)| *g).collect::<Vec<_>>());
        println!("  gen, per check        {lo:6.2} / {mid:6.2} / {hi:6.2}");
    }
    println!("load average at the end: {:.2}", loadtest::load1());
    Ok(())
}

/// Where the ops or jobs of a take or fetch reply start: after the count
/// and the writer's term, or (a script from before terms) after the count.
fn replies_from(v: &[Value]) -> usize {
    match v.get(1) {
        Some(Value::Int(_)) => 2,
        _ => 1,
    }
}
