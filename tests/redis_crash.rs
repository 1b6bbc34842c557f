//! Kill an application process (SIGKILL) in the middle of a load of 100k
//! grants and revokes on the Redis store, in queue mode; then let a worker
//! finish. Every acknowledged op must end in OpenFGA in its last
//! acknowledged state (or in the dead letters): loss must be 0.
//!
//! The application process is this very test binary, re-executed to run
//! only [`child_load`], with its parameters in `FGA_WB_CHILD_LOAD`. It
//! prints `ack <i>` after op `i` returned, so the parent knows exactly which
//! ops were acknowledged when it killed the child.
#![cfg(feature = "redis")]

mod support;

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::{Config, WriteBehind};
use serde::{Deserialize, Serialize};
use support::{config_for, new_store, stored, Rng, TestStore};
use tokio::io::{AsyncBufReadExt, BufReader};

/// Parameters the parent hands to the child.
const CHILD_VAR: &str = "FGA_WB_CHILD_LOAD";
/// Set to reproduce a run's kill point (the parent prints the one it used).
const KILL_SEED_VAR: &str = "FGA_WB_KILL_SEED";

const OPS: usize = 100_000;
const USERS: usize = 100;
const DOCS: usize = 50;
const LOAD_SEED: u64 = 0x5eed_f9a0_4b1d_2024;
/// Bound on the drain after the kill (it takes well under 10 s).
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);

#[derive(Serialize, Deserialize)]
struct Params {
    store_id: String,
    model_id: String,
    ops: usize,
    seed: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Grant,
    Revoke,
}

/// The load: `n` ops over `USERS * DOCS` tuples, 60 % grants.
fn ops(seed: u64, n: usize) -> Vec<(usize, Kind)> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let t = rng.below(USERS * DOCS);
            let kind = if rng.below(10) < 6 {
                Kind::Grant
            } else {
                Kind::Revoke
            };
            (t, kind)
        })
        .collect()
}

fn user(t: usize) -> String {
    format!("user:u{}", t % USERS)
}

fn object(t: usize) -> String {
    format!("document:d{}", t / USERS)
}

/// `object#relation@user`, as `support::stored` prints tuples.
fn key(t: usize) -> String {
    format!("{}#viewer@{}", object(t), user(t))
}

fn redis_queue_config(s: &TestStore) -> Config {
    let mut c = config_for(s);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.flush.mode = Mode::Queue;
    c.queue.heartbeat = Duration::from_secs(1);
    c
}

/// The child half of [`killed_application_loses_nothing`]: the application
/// process that gets SIGKILLed. Returns at once (a trivial pass) unless
/// `FGA_WB_CHILD_LOAD` is set, as it is only when the parent re-executes
/// this binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_load() {
    let Ok(raw) = std::env::var(CHILD_VAR) else {
        return;
    };
    let p: Params = serde_json::from_str(&raw).expect("child parameters");
    let store = TestStore {
        client: support::client(),
        store_id: p.store_id,
        model_id: p.model_id,
        server: support::Server::Plain,
    };
    // Default flushing: batch size, interval, eager revokes, all in queue mode.
    let wb = WriteBehind::builder(redis_queue_config(&store))
        .build()
        .await
        .expect("child handle");
    let mut out = std::io::stdout().lock();
    for (i, (t, kind)) in ops(p.seed, p.ops).into_iter().enumerate() {
        let r = match kind {
            Kind::Grant => wb.grant(&user(t), "viewer", &object(t)).await,
            Kind::Revoke => wb.revoke(&user(t), "viewer", &object(t)).await,
        };
        r.unwrap_or_else(|e| panic!("op {i} failed: {e}"));
        writeln!(out, "ack {i}").expect("stdout");
        out.flush().expect("stdout");
    }
    writeln!(out, "done").expect("stdout");
    out.flush().expect("stdout");
    // Parked until the parent kills us.
    std::future::pending::<()>().await;
}

/// Flushes until nothing is pending or in flight (the worker applies the
/// jobs). What the killed child held comes back when its writer lease ends.
async fn drain(wb: &WriteBehind) {
    let deadline = Instant::now() + DRAIN_DEADLINE;
    loop {
        let report = wb.flush().await.expect("flush");
        assert!(report.error.is_none(), "flush failed: {report:?}");
        let p = wb.pending().await.unwrap();
        if p.total == 0 && p.in_flight == 0 {
            return;
        }
        let q = wb.status().await.unwrap().queue.expect("queue stats");
        assert!(
            Instant::now() < deadline,
            "not drained after {DRAIN_DEADLINE:?}: pending {p:?}, queue {q:?}"
        );
        // Another task (the worker) is doing the work; look again shortly.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGKILL an application process at a random point between 30 % and 70 %
/// of 100k grants and revokes on the Redis store (queue mode, a worker
/// applying its jobs); the worker and a flush then finish, and every tuple in OpenFGA is in its last
/// acknowledged state. Loss must be 0, and nothing dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_application_loses_nothing() {
    let started = Instant::now();
    let s = new_store("redis-crash").await;
    let kill_seed = std::env::var(KILL_SEED_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let kill_at = OPS * 3 / 10 + Rng::new(kill_seed).below(OPS * 4 / 10);
    eprintln!("kill seed {kill_seed} ({KILL_SEED_VAR}): killing after op {kill_at}");

    // A worker applies the child's jobs while it runs, as in production,
    // and goes on after the kill.
    let config = redis_queue_config(&s);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(fga_wb::queue::worker::run(config.clone(), 8, async move {
        let _ = stopped.await;
    }));

    let params = Params {
        store_id: s.store_id.clone(),
        model_id: s.model_id.clone(),
        ops: OPS,
        seed: LOAD_SEED,
    };
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_load", "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, serde_json::to_string(&params).unwrap())
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut last: Option<usize> = None;
    let mut killed = false;
    let load_started = Instant::now();
    let mut kill_time = Duration::ZERO;
    while let Some(line) = lines.next_line().await.expect("child stdout") {
        if let Some(i) = line.strip_prefix("ack ") {
            let i: usize = i.parse().expect("ack index");
            last = Some(i);
            if !killed && i >= kill_at {
                child.start_kill().expect("SIGKILL");
                kill_time = load_started.elapsed();
                killed = true;
            }
        }
        // Keep reading after the kill: lines already in the pipe are
        // acknowledged ops too.
    }
    let status = child.wait().await.unwrap();
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "the child was not killed: {status}"
        );
    }
    let last = last.expect("the child acknowledged nothing");
    let acknowledged = last + 1;
    eprintln!(
        "killed after {acknowledged} acknowledged ops in {kill_time:.2?} ({:.0} ops/s)",
        acknowledged as f64 / kill_time.as_secs_f64()
    );

    // Expected: each tuple's last acknowledged op. The op after `last` may
    // have reached Redis without its line being printed: either state is
    // right for its tuple.
    let load = ops(LOAD_SEED, OPS);
    let mut expected: HashMap<usize, Kind> = HashMap::new();
    for &(t, kind) in &load[..acknowledged] {
        expected.insert(t, kind);
    }
    let maybe = load.get(acknowledged).map(|&(t, _)| t);

    // Recovery: the worker applies the queued jobs; a handle flushes what
    // the child left pending.
    let drain_started = Instant::now();
    let wb = WriteBehind::builder(config)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    drain(&wb).await;
    let drain_time = drain_started.elapsed();
    let _ = stop.send(());
    worker.await.unwrap().expect("worker");

    let in_openfga: HashSet<String> = stored(&s).await.into_iter().collect();
    let (mut lost, mut stale, mut present) = (0, 0, 0);
    for t in 0..USERS * DOCS {
        let there = in_openfga.contains(&key(t));
        present += usize::from(there);
        if Some(t) == maybe {
            continue;
        }
        let want = expected.get(&t) == Some(&Kind::Grant);
        if want && !there {
            lost += 1;
            eprintln!("LOST grant: {}", key(t));
        } else if !want && there {
            stale += 1;
            eprintln!("LOST revoke: {} is in OpenFGA", key(t));
        }
    }
    let dead = wb.dead_letters().await.unwrap();
    let st = wb.status().await.unwrap();
    eprintln!(
        "kill test: {acknowledged} acknowledged (store-wide counter: {}), {} applied, \
         {} coalesced, {} dead-lettered; {present} tuples in OpenFGA; \
         lost grants {lost}, lost revokes {stale}; \
         drain {drain_time:.2?}, total {:.2?}",
        st.totals.acknowledged,
        st.totals.applied,
        st.totals.coalesced,
        st.totals.dead_lettered,
        started.elapsed()
    );
    assert_eq!(
        in_openfga.len(),
        present,
        "OpenFGA holds tuples the load never wrote"
    );
    assert_eq!((lost, stale), (0, 0), "acknowledged ops lost");
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    let ack = st.totals.acknowledged as usize;
    assert!(
        ack == acknowledged || ack == acknowledged + 1,
        "Redis counted {ack} acknowledged ops, the child printed {acknowledged}"
    );
    // Every acknowledged op ended in exactly one place.
    let t = &st.totals;
    assert_eq!(
        t.acknowledged,
        t.applied + t.coalesced + t.dead_lettered + t.cleared,
        "totals do not add up: {t:?}"
    );
}
