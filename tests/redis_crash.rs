//! Kill an application process (SIGKILL) in the middle of a load of 100k
//! grants and revokes on the Redis store, inline and in queue mode, or kill
//! a `fga-wb worker` in the middle of a queue; then recover as an operator
//! does, with `fga-wb flush --wait` (which must exit 0 within its timeout).
//! Every acknowledged op must end in OpenFGA in its last acknowledged state:
//! loss must be 0, and the totals must add up.
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
use support::cli::Cli;
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
/// `fga-wb flush --wait --timeout`: the recovery bound is the writer lease
/// (5 s) plus, for what the killed writer was writing, its hold (`HOLD`),
/// plus the time to write what is left (README, Benchmarks); this leaves
/// room for a loaded machine.
const DRAIN_TIMEOUT: &str = "50s";
/// The killed writers' `flush.unknown_outcome_hold`: shorter than the
/// default 30 s, so the bound above stays well within `DRAIN_TIMEOUT`.
const HOLD: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct Params {
    store_id: String,
    model_id: String,
    ops: usize,
    seed: u64,
    queue: bool,
    /// The child's `redis.writer_lease` in ms (0: the default).
    lease_ms: u64,
    /// How many tuples the load is spread over.
    tuples: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Grant,
    Revoke,
}

/// The load: `n` ops over the first `tuples` of `USERS * DOCS` tuples, 60 %
/// grants.
fn ops(seed: u64, n: usize, tuples: usize) -> Vec<(usize, Kind)> {
    let mut rng = Rng::new(seed);
    (0..n)
        .map(|_| {
            let t = rng.below(tuples.min(USERS * DOCS));
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

fn redis_config(s: &TestStore, queue: bool) -> Config {
    let mut c = config_for(s);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.flush.mode = if queue { Mode::Queue } else { Mode::Inline };
    c.queue.heartbeat = Duration::from_secs(1);
    c.flush.unknown_outcome_hold = HOLD;
    c
}

fn mode(queue: bool) -> &'static str {
    if queue {
        "queue"
    } else {
        "inline"
    }
}

/// The child half of [`killed_application_loses_nothing`]: the application
/// process that gets SIGKILLed. Ignored in a plain run: the parent
/// re-executes this binary to run it, with its parameters in
/// `FGA_WB_CHILD_LOAD`, and without them it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of killed_application_loses_nothing, which runs it"]
async fn child_load() {
    let raw = std::env::var(CHILD_VAR)
        .expect("run by killed_application_loses_nothing, with FGA_WB_CHILD_LOAD");
    let p: Params = serde_json::from_str(&raw).expect("child parameters");
    let store = TestStore {
        client: support::client(),
        store_id: p.store_id,
        model_id: p.model_id,
        server: support::Server::Plain,
    };
    // Default flushing: batch size, interval, eager revokes.
    let mut config = redis_config(&store, p.queue);
    if p.lease_ms > 0 {
        config.redis.writer_lease = Duration::from_millis(p.lease_ms);
    }
    let wb = WriteBehind::builder(config)
        .build()
        .await
        .expect("child handle");
    let mut out = std::io::stdout().lock();
    for (i, (t, kind)) in ops(p.seed, p.ops, p.tuples).into_iter().enumerate() {
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

type ChildLines = tokio::io::Lines<BufReader<tokio::process::ChildStdout>>;

/// Starts [`child_load`] in a process of its own; its stdout, by line.
fn spawn_child(params: &Params) -> (tokio::process::Child, ChildLines) {
    let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_load",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_VAR, serde_json::to_string(params).unwrap())
        .stdout(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the child");
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

/// The op a line of the child acknowledges. With one test thread the
/// harness prints the test's name first, on the line the first ack ends:
/// "test child_load ... ack 0".
fn ack_of(line: &str) -> Option<usize> {
    let (_, i) = line.split_once("ack ")?;
    Some(i.parse().expect("ack index"))
}

/// Recovers as an operator does: `fga-wb flush --wait` flushes what comes
/// back when the dead writer's lease ends (in queue mode the worker applies
/// the jobs) and must exit 0 within [`DRAIN_TIMEOUT`]. Returns how long it
/// took.
async fn drain_with_cli(s: &TestStore, queue: bool) -> Duration {
    let started = Instant::now();
    Cli::new(s, mode(queue))
        .run(&["flush", "--wait", "--timeout", DRAIN_TIMEOUT])
        .await
        .ok();
    started.elapsed()
}

/// Every acknowledged op ended in exactly one place, nothing is dead.
async fn assert_accounted(wb: &WriteBehind) {
    let dead = wb.dead_letters().await.unwrap();
    assert!(dead.is_empty(), "dead letters: {dead:?}");
    let st = wb.status().await.unwrap();
    let t = &st.totals;
    assert_eq!(st.pending.total + st.pending.in_flight, 0, "{st:?}");
    assert_eq!(
        t.acknowledged,
        t.applied + t.coalesced + t.dead_lettered + t.cleared,
        "totals do not add up: {t:?}"
    );
}

/// Compares OpenFGA with each tuple's last acknowledged op (`maybe`: a
/// tuple whose last op may or may not have been acknowledged).
async fn assert_last_state(
    s: &TestStore,
    expected: &HashMap<usize, Kind>,
    maybe: Option<usize>,
) -> usize {
    let in_openfga: HashSet<String> = stored(s).await.into_iter().collect();
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
    assert_eq!(
        in_openfga.len(),
        present,
        "OpenFGA holds tuples the load never wrote"
    );
    assert_eq!((lost, stale), (0, 0), "acknowledged ops lost");
    present
}

/// SIGKILL an application process at a random point between 30 % and 70 %
/// of 100k grants and revokes on the Redis store, inline.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_application_loses_nothing_inline() {
    killed_application_loses_nothing(false).await;
}

/// The same in queue mode, with a worker applying the jobs throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_application_loses_nothing_in_queue_mode() {
    killed_application_loses_nothing(true).await;
}

/// After the kill, `fga-wb flush --wait` recovers (exit 0), every tuple in
/// OpenFGA is in its last acknowledged state, nothing is dead-lettered and
/// the totals add up.
async fn killed_application_loses_nothing(queue: bool) {
    let started = Instant::now();
    let s = new_store(&format!("redis-crash-{}", mode(queue))).await;
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

    // In queue mode a worker applies the child's jobs while it runs, as in
    // production, and goes on after the kill.
    let config = redis_config(&s, queue);
    let worker = queue.then(|| support::Worker::start(config.clone(), 8));

    let params = Params {
        store_id: s.store_id.clone(),
        model_id: s.model_id.clone(),
        ops: OPS,
        seed: LOAD_SEED,
        queue,
        lease_ms: 0,
        tuples: USERS * DOCS,
    };
    let (mut child, mut lines) = spawn_child(&params);
    let mut last: Option<usize> = None;
    let mut killed = false;
    let load_started = Instant::now();
    let mut kill_time = Duration::ZERO;
    while let Some(line) = lines.next_line().await.expect("child stdout") {
        if let Some(i) = ack_of(&line) {
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
    let load = ops(LOAD_SEED, OPS, USERS * DOCS);
    let mut expected: HashMap<usize, Kind> = HashMap::new();
    for &(t, kind) in &load[..acknowledged] {
        expected.insert(t, kind);
    }
    let maybe = load.get(acknowledged).map(|&(t, _)| t);

    let drain_time = drain_with_cli(&s, queue).await;
    if let Some(w) = worker {
        w.stop().await;
    }
    let present = assert_last_state(&s, &expected, maybe).await;
    let wb = manual_handle(config).await;
    let st = wb.status().await.unwrap();
    eprintln!(
        "kill test ({}): {acknowledged} acknowledged (store-wide counter: {}), {} applied, \
         {} coalesced; {present} tuples in OpenFGA; flush --wait {drain_time:.2?}, total {:.2?}",
        mode(queue),
        st.totals.acknowledged,
        st.totals.applied,
        st.totals.coalesced,
        started.elapsed()
    );
    let ack = st.totals.acknowledged as usize;
    assert!(
        ack == acknowledged || ack == acknowledged + 1,
        "Redis counted {ack} acknowledged ops, the child printed {acknowledged}"
    );
    assert_accounted(&wb).await;
}

/// SIGKILL a `fga-wb worker` process while it applies a queue of 20k
/// grants and revokes (between 30 % and 70 % applied), start another, and
/// recover with `fga-wb flush --wait`: it exits 0, the jobs the dead worker
/// ran come back when its lease ends, every tuple in OpenFGA is in its last
/// acknowledged state, and the totals add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_worker_loses_nothing() {
    const WORKER_OPS: usize = 20_000;
    let s = new_store("redis-crash-worker").await;
    let mut config = redis_config(&s, true);
    config.flush.batch_size = 1_000_000;
    config.flush.interval = Duration::from_secs(3600);
    let wb = manual_handle(config).await;
    let load = ops(LOAD_SEED ^ 1, WORKER_OPS, USERS * DOCS);
    let mut expected: HashMap<usize, Kind> = HashMap::new();
    for &(t, kind) in &load {
        match kind {
            Kind::Grant => wb.grant(&user(t), "viewer", &object(t)).await,
            Kind::Revoke => wb.revoke(&user(t), "viewer", &object(t)).await,
        }
        .unwrap();
        expected.insert(t, kind);
    }
    let queued = wb.flush().await.unwrap().queued;
    assert!(queued > 0);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let kill_at = (queued as usize) * 3 / 10 + Rng::new(seed).below(queued as usize * 4 / 10);
    eprintln!("{queued} ops queued; killing the worker after {kill_at} applied (seed {seed})");

    let mut cli = Cli::new(&s, "queue");
    cli.set(
        "FGA_WB_FLUSH__UNKNOWN_OUTCOME_HOLD",
        &format!("{}s", HOLD.as_secs()),
    );
    let mut first = cli.command(&["worker"]).spawn().expect("start a worker");
    let watch_started = Instant::now();
    while (wb.status().await.unwrap().totals.applied as usize) < kill_at {
        assert!(
            watch_started.elapsed() < Duration::from_secs(120),
            "the first worker applied too little: {:?}",
            wb.status().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.start_kill().expect("SIGKILL");
    first.wait().await.unwrap();
    let applied_at_kill = wb.status().await.unwrap().totals.applied;
    let mut second = cli.command(&["worker"]).spawn().expect("start a worker");
    let drain_time = drain_with_cli(&s, true).await;
    second.start_kill().expect("stop the second worker");
    second.wait().await.unwrap();
    eprintln!("killed at {applied_at_kill} applied; flush --wait {drain_time:.2?}");
    assert_last_state(&s, &expected, None).await;
    assert_accounted(&wb).await;
}

/// A handle that flushes only when told to.
async fn manual_handle(config: Config) -> WriteBehind {
    WriteBehind::builder(config)
        .automatic_flush(false)
        .build()
        .await
        .unwrap()
}

/// Waits until no writer of the store under `prefix` holds a live lease.
async fn lease_ended(redis: &support::RedisConn, prefix: &str) {
    support::eventually(
        "the stopped child's lease to end",
        Duration::from_secs(30),
        || {
            let mut redis = redis.clone();
            let owners = format!("{prefix}:owners");
            async move {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap()
                    .as_millis();
                let live: u64 = redis::cmd("ZCOUNT")
                    .arg(owners)
                    .arg(format!("({now}"))
                    .arg("+inf")
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                live == 0
            }
        },
    )
    .await;
}

/// Stop (SIGSTOP) an application process at a moment it is writing, for
/// longer than its writer lease (2 s here), so that what it was writing is
/// handed on, and another process applies it; then the stopped process
/// resumes (SIGCONT), finishes its writes late and goes on to the end of its
/// load. Each op still counts once, `fga-wb flush --wait` recovers, and
/// every tuple ends in its last state. (CI once caught late finishes
/// counted twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_application_resumes_and_counts_each_op_once() {
    const PAUSED_OPS: usize = 6_000;
    let s = new_store("redis-crash-paused").await;
    let prefix = format!("fga-wb:{{{}}}", s.store_id);
    let mut redis = support::redis_conn().await;
    let params = Params {
        store_id: s.store_id.clone(),
        model_id: s.model_id.clone(),
        ops: PAUSED_OPS,
        seed: LOAD_SEED ^ 2,
        queue: false,
        lease_ms: 2_000,
        // Few tuples, many ops on each: ops the child held when it stopped
        // get newer ops after it resumes, which its stale writes of them
        // would overtake.
        tuples: 200,
    };
    let (mut child, mut lines) = spawn_child(&params);
    let pid = child.id().expect("the child runs");

    // Stop it when it holds ops it is writing (taken, not yet finished) and
    // newer ops wait behind some of them: those are written by the other
    // process, and a stale write of the older op after it resumes would
    // undo them. What it holds is read once its lease has ended: a finish
    // it sent just before the stop may still land until then. When a stop
    // finds none, let it go on a little and try again.
    let mut acked = 0;
    let mut stops = 0;
    let (mut holding, mut behind) = (0, 0);
    while let Some(line) = lines.next_line().await.expect("child stdout") {
        if line.ends_with("done") {
            break;
        }
        let Some(i) = ack_of(&line) else { continue };
        acked = i + 1;
        if acked < PAUSED_OPS / 5 || acked % 10 != 0 {
            continue;
        }
        support::signal(pid, testenv::Signal::Stop);
        stops += 1;
        lease_ended(&redis, &prefix).await;
        (holding, behind) = redis::pipe()
            .cmd("HGET")
            .arg(format!("{prefix}:counts"))
            .arg("t")
            .cmd("ZCARD")
            .arg(format!("{prefix}:blocked"))
            .query_async::<(Option<u64>, u64)>(&mut redis)
            .await
            .map(|(t, b)| (t.unwrap_or(0), b))
            .unwrap();
        if holding > 0 && behind > 0 {
            break;
        }
        support::signal(pid, testenv::Signal::Cont);
    }
    assert!(
        holding > 0 && behind > 0,
        "no stop (of {stops}) found the child writing with newer ops behind; it acknowledged {acked} ops"
    );
    eprintln!(
        "stopped the child after {acked} acks ({stops} tries), writing {holding} ops, {behind} newer ops behind"
    );

    // Its lease has ended: another process takes what it held and applies
    // it.
    let wb = manual_handle(redis_config(&s, false)).await;
    let report = wb.flush().await.unwrap();
    let reclaimed: Option<u64> = redis::cmd("HGET")
        .arg(format!("{prefix}:stats"))
        .arg("reclaimed")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        reclaimed.unwrap_or(0) > 0,
        "nothing the child held was handed on: {report:?}"
    );

    // It resumes and runs its load to the end.
    support::signal(pid, testenv::Signal::Cont);
    let mut done = false;
    while let Some(line) = lines.next_line().await.expect("child stdout") {
        if line.ends_with("done") {
            done = true;
            break;
        }
    }
    assert!(done, "the child stopped before the end of its load");

    let drain_time = drain_with_cli(&s, false).await;
    let mut expected: HashMap<usize, Kind> = HashMap::new();
    for (t, kind) in ops(params.seed, PAUSED_OPS, params.tuples) {
        expected.insert(t, kind);
    }
    assert_last_state(&s, &expected, None).await;
    child.start_kill().expect("SIGKILL");
    child.wait().await.unwrap();
    let t = wb.status().await.unwrap().totals;
    eprintln!(
        "paused test: {} acknowledged, {} applied, {} coalesced; {} handed on; \
         flush --wait {drain_time:.2?}",
        t.acknowledged,
        t.applied,
        t.coalesced,
        reclaimed.unwrap_or(0)
    );
    assert_eq!(t.acknowledged, PAUSED_OPS as u64);
    assert_accounted(&wb).await;
}
