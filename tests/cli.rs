//! The `fga-wb` binary against a Redis buffer that another process (a
//! handle in this test) is filling, against the real OpenFGA and Redis:
//! `status`, `flush [--wait]`, `clear [--yes]`, `dlq list|replay|purge`,
//! `worker`, `--json` on each, exit codes, and what must never be printed
//! (the API token, the Redis password).

#![cfg(feature = "cli")]

mod support;

use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::{Config, WriteBehind};
use serde_json::Value;
use support::cli::Cli;
use support::{config_for, new_store, stored, TestStore};

/// A handle in this process: the application filling the buffer. No
/// automatic flush (long interval, big batch), so the CLI sees every op.
async fn filler(s: &TestStore, mode: Mode) -> WriteBehind {
    WriteBehind::builder(filler_config(s, mode))
        .build()
        .await
        .unwrap()
}

fn filler_config(s: &TestStore, mode: Mode) -> Config {
    let mut c = config_for(s);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.flush.mode = mode;
    c.flush.interval = Duration::from_secs(3600);
    c.flush.batch_size = 1_000_000;
    c
}

/// A signal while `clear` drops ops, step by step, does not cut it short:
/// each step drops its ops for good, and their record is printed at the
/// end. The clear goes on to its end and lists every op it dropped.
/// Before, it ended at the signal with exit 1 and listed none of the ops
/// its earlier steps had dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clear_interrupted_still_lists_every_op_it_drops() {
    const N: usize = 20_000;
    let s = new_store("cli-clear-signal").await;
    let cli = Cli::new(&s, "inline");
    let wb = filler(&s, Mode::Inline).await;
    futures::future::try_join_all((0..N).map(|i| {
        let wb = &wb;
        async move {
            let object = format!("document:d{}", i % 100);
            wb.grant(&format!("user:u{i}"), "viewer", &object).await
        }
    }))
    .await
    .unwrap();
    let child = cli
        .command(&["clear", "--yes", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut redis = support::redis_conn().await;
    let stats = format!("fga-wb:{{{}}}:stats", s.store_id);
    loop {
        let cleared: Option<usize> = redis::cmd("HGET")
            .arg(&stats)
            .arg("cleared")
            .query_async(&mut redis)
            .await
            .unwrap();
        match cleared {
            Some(n) if n >= N => panic!("the clear ended before the signal: try more ops"),
            Some(n) if n > 0 => break,
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    let out = support::terminate(child, Duration::from_secs(60)).await;
    // Exit 0 and every op listed, whether the signal came mid-clear (as
    // it almost always does) or just after its last step.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["cleared"], N, "{stderr}");
    assert_eq!(j["ops"].as_array().map(Vec::len), Some(N));
    assert_eq!(wb.pending().await.unwrap().total, 0);
}

/// `status`, `status --json`, `flush`, `clear` and `clear --yes` on a
/// buffer that a handle in this process fills, also while it is filling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_flush_clear_on_a_buffer_being_filled() {
    let s = new_store("cli-status").await;
    let cli = Cli::new(&s, "inline");
    let wb = filler(&s, Mode::Inline).await;
    const N: usize = 40;
    support::grant_users(&wb, "document:a", 0..N).await;

    // The table names the pending count and the dead letters.
    let r = cli.run(&["status"]).await;
    r.ok();
    assert!(
        r.line("pending")
            .contains(&format!("{N} (writes {N}, deletes 0)")),
        "{}",
        r.stdout
    );
    assert_eq!(r.line("dead letters").split_whitespace().last(), Some("0"));
    assert!(r.line("store").contains("Redis"), "{}", r.stdout);
    assert!(r.line("openfga store").contains(&s.store_id));

    let j = cli.run(&["status", "--json"]).await.ok().json();
    assert_eq!(j["pending"]["total"], N, "{j:#}");
    assert_eq!(j["pending"]["writes"], N);
    assert_eq!(j["pending"]["in_flight"], 0);
    assert!(j["pending"]["oldest_age"].as_f64().is_some(), "{j:#}");
    assert_eq!(j["dead_letters"], 0);
    assert_eq!(j["store"], "redis");
    assert_eq!(j["totals"]["acknowledged"], N);

    // `clear` without --yes and no terminal: usage error, nothing cleared.
    cli.run(&["clear"]).await.fails(2, "--yes");
    assert_eq!(wb.pending().await.unwrap().total, N);

    // `flush` applies everything acknowledged before it.
    let r = cli.run(&["flush"]).await;
    r.ok();
    assert!(
        r.stdout.contains(&format!("flushed: {N} applied")),
        "{}",
        r.stdout
    );
    assert!(r.stdout.contains("now pending: 0"), "{}", r.stdout);
    assert_eq!(stored(&s).await.len(), N);
    assert_eq!(wb.pending().await.unwrap().total, 0);

    // Now while the handle keeps granting: every CLI run still succeeds
    // and reports consistent numbers.
    let stop = Arc::new(AtomicBool::new(false));
    let granted = Arc::new(AtomicUsize::new(0));
    let fill = tokio::spawn({
        let (wb, stop, granted) = (wb.clone(), stop.clone(), granted.clone());
        async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) || i < 20 {
                wb.grant(&format!("user:u{i}"), "viewer", "document:b")
                    .await
                    .unwrap();
                i += 1;
                granted.store(i, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        }
    });
    let j = cli.run(&["status", "--json"]).await.ok().json();
    let seen = j["pending"]["total"].as_u64().unwrap() as usize;
    assert!(seen <= granted.load(Ordering::Relaxed), "{j:#}");
    let j = cli.run(&["flush", "--json"]).await.ok().json();
    let applied = j["flush"]["applied"].as_u64().unwrap() as usize;
    assert!(j["flush"]["error"].is_null(), "{j:#}");
    stop.store(true, Ordering::Relaxed);
    fill.await.unwrap();
    let total = granted.load(Ordering::Relaxed);
    let left = wb.pending().await.unwrap().total;
    assert_eq!(applied + left, total, "flushed {applied}, left {left}");
    assert!(stored(&s).await.len() >= N + applied);

    // `clear --yes` drops what is left, says how many, and lists them: the
    // record of what will not reach OpenFGA (before, only a log line at
    // info, which the CLI does not show).
    let j = cli.run(&["clear", "--yes", "--json"]).await.ok().json();
    assert_eq!(j["cleared"], left, "{j:#}");
    let ops = j["ops"].as_array().expect("the cleared ops");
    assert_eq!(ops.len(), left, "{j:#}");
    assert!(
        ops.iter().all(|o| o["op"] == "grant"
            && o["tuple"]
                .as_str()
                .is_some_and(|t| t.starts_with("document:b#viewer@user:u"))),
        "{j:#}"
    );
    assert_eq!(wb.pending().await.unwrap().total, 0);
    assert_eq!(stored(&s).await.len(), N + applied);

    support::grant_users(&wb, "document:c", 0..7).await;
    let r = cli.run(&["clear", "--yes"]).await;
    r.ok();
    assert!(r.stdout.contains("cleared 7 pending ops"), "{}", r.stdout);
    for i in 0..7 {
        let line = format!("  grant document:c#viewer@user:u{i}\n");
        assert!(r.stdout.contains(&line), "{}", r.stdout);
    }
    assert_eq!(wb.pending().await.unwrap().total, 0);
    let j = cli.run(&["status", "--json"]).await.ok().json();
    assert_eq!(j["pending"]["total"], 0);
    assert_eq!(j["totals"]["cleared"], left + 7);
}

/// `dlq list`, `dlq replay ID`, `dlq purge --all`, with and without
/// `--json`, after ops OpenFGA refuses were flushed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_list_replay_purge() {
    let s = new_store("cli-dlq").await;
    let cli = Cli::new(&s, "inline");
    let wb = WriteBehind::builder(filler_config(&s, Mode::Inline))
        .validate_against_model(false)
        .build()
        .await
        .unwrap();
    cli.run(&["dlq", "list"])
        .await
        .ok()
        .stdout
        .contains("no dead letters")
        .then_some(())
        .expect("no dead letters yet");
    // Two tuples the model has no relation for, between good ones.
    support::grant_users(&wb, "document:ok", 0..5).await;
    wb.grant("user:bad1", "no_such_relation", "document:x")
        .await
        .unwrap();
    wb.grant("user:bad2", "no_such_relation", "document:y")
        .await
        .unwrap();
    support::grant_users(&wb, "document:ok2", 0..5).await;

    // `flush --wait` did not write everything acknowledged before it
    // began: exit 1 (it exited 0 with a warning).
    // (The flush's own warnings come first.)
    let r = cli.run(&["flush", "--wait"]).await;
    assert_eq!(r.code, 1, "{r:#?}");
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("fga-wb: 2 of the ops it waited for (acknowledged before it began"),
        "{r:#?}"
    );
    assert!(
        r.stdout.contains("10 applied") && r.stdout.contains("2 dead-lettered"),
        "{}",
        r.stdout
    );
    assert_eq!(stored(&s).await.len(), 10);

    let r = cli.run(&["dlq", "list"]).await;
    r.ok();
    let rows: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(rows.len(), 2, "{}", r.stdout);
    for t in [
        "document:x#no_such_relation@user:bad1",
        "document:y#no_such_relation@user:bad2",
    ] {
        assert!(rows.iter().any(|l| l.contains(t)), "{t}: {}", r.stdout);
    }
    assert!(rows.iter().all(|l| l.contains("grant")), "{}", r.stdout);
    // OpenFGA's reason is shown.
    assert!(rows.iter().all(|l| l.contains("no_such_relation")));

    let j = cli.run(&["dlq", "list", "--json"]).await.ok().json();
    let letters = j.as_array().expect("a JSON array");
    assert_eq!(letters.len(), 2, "{j:#}");
    assert!(letters
        .iter()
        .all(|d| !d["reason"].as_str().unwrap_or_default().is_empty()));
    let id_bad1 = letters
        .iter()
        .find(|d| d["tuple"]["user"] == "user:bad1")
        .expect("bad1")["id"]
        .as_u64()
        .unwrap();
    let r = cli.run(&["status"]).await;
    r.ok();
    assert_eq!(r.line("dead letters").split_whitespace().last(), Some("2"));

    // Replay needs ids or --all.
    cli.run(&["dlq", "replay"]).await.fails(2, "--all");

    // Replay one: buffered again and flushed at once; refused again, it is
    // a new dead letter, and the other stays dead. Exit 1: the replay
    // fixed nothing (it exited 0).
    let r = cli.run(&["dlq", "replay", &id_bad1.to_string()]).await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(r.stdout.contains("replayed 1 dead letters"), "{}", r.stdout);
    assert!(
        r.stderr
            .contains("dead-lettered 1 of the replayed ops: OpenFGA refused them again"),
        "{}",
        r.stderr
    );
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 0, "{p:?}");
    let j = cli.run(&["dlq", "list", "--json"]).await.ok().json();
    assert_eq!(j.as_array().unwrap().len(), 2, "{j:#}");
    assert!(j
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["id"].as_u64() != Some(id_bad1)));
    assert!(j
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["tuple"]["user"] == "user:bad1"));
    // Replaying an id that is gone is an error, and replays nothing; so
    // is purging one (it said "purged 0" and exited 0), with another that
    // is there: nothing is purged.
    cli.run(&["dlq", "replay", &id_bad1.to_string()])
        .await
        .fails(1, "no dead letter with id");
    let there = wb.dead_letters().await.unwrap()[0].id.to_string();
    cli.run(&["dlq", "purge", &there, &id_bad1.to_string()])
        .await
        .fails(1, &format!("no dead letter with id {id_bad1}"));
    assert_eq!(wb.dead_letters().await.unwrap().len(), 2);

    // A replay whose flush OpenFGA refuses (a wrong token) exits 1, and
    // says that the letters were replayed and are pending: nothing lost,
    // and `fga-wb flush` writes them (here: refused again, dead again).
    let mut wrong = Cli::new(&s, "inline");
    wrong.set("FGA_API_TOKEN", "not-the-token");
    // Its exit may find its flush's chunk still recording the refusal, or
    // its pump taking the next window: neither is a Write cut off, and its
    // lease is released at once, what it took given back (with the
    // default hold, 30 s, the wait below would fail otherwise).
    let r = wrong.run(&["dlq", "replay", "--all"]).await;
    // The flush's own warnings come first: the error is the last line.
    assert_eq!(r.code, 1, "{r:#?}");
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("fga-wb: replayed 2 dead letters (nothing is lost), but the flush after the replay did not finish"),
        "{r:#?}"
    );
    assert!(!r.stderr.contains("not-the-token"), "{r:#?}");
    assert!(r.stdout.contains("replayed 2 dead letters"), "{}", r.stdout);
    // A `flush --wait` refused so is a configuration error (exit 2, as a
    // password Redis refuses is), not "work remains" (1, before).
    let r = wrong.run(&["flush", "--wait"]).await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(!r.stderr.contains("not-the-token"), "{r:#?}");
    // Nothing lost: `wb` writes them, refused again: dead again.
    support::eventually(
        "the replayed letters written, and dead again",
        Duration::from_secs(15),
        || async {
            let _ = wb.flush().await;
            let p = wb.pending().await.unwrap();
            p.total + p.in_flight == 0 && wb.dead_letters().await.unwrap().len() == 2
        },
    )
    .await;

    // Purge them all.
    let j = cli
        .run(&["dlq", "purge", "--all", "--yes", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(j["purged"], 2, "{j:#}");
    let r = cli.run(&["dlq", "list"]).await;
    assert!(r.ok().stdout.contains("no dead letters"), "{}", r.stdout);
    // Without a terminal to ask on, --all needs --yes.
    cli.run(&["dlq", "purge", "--all"])
        .await
        .fails(2, "nothing purged (use --yes");
    let r = cli.run(&["dlq", "purge", "--all", "--yes"]).await;
    assert!(
        r.ok().stdout.contains("purged 0 dead letters"),
        "{}",
        r.stdout
    );
    assert_eq!(wb.dead_letters().await.unwrap().len(), 0);
    assert_eq!(stored(&s).await.len(), 10);
}

/// Polls `status --json` until `pred` holds on it (another process is
/// what changes it).
async fn wait_for_status(cli: &Cli, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = cli.run(&["status", "--json"]).await.ok().json();
        if pred(&j) {
            return j;
        }
        assert!(Instant::now() < deadline, "never saw {what}: {j:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Queue mode: `fga-wb worker` runs, shows up in `status`, `flush --wait`
/// returns once it applied everything, and SIGTERM stops it with exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_flush_wait_and_worker_sigterm() {
    let s = new_store("cli-queue").await;
    let cli = Cli::new(&s, "queue");
    let wb = filler(&s, Mode::Queue).await;
    const N: usize = 250;
    support::grant_users(&wb, "document:q", 0..N).await;

    let worker = cli
        .command(&["worker", "--concurrency", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fga-wb worker");
    let pid = worker.id().expect("worker pid");
    let j = wait_for_status(&cli, "the worker", |j| {
        j["queue"]["workers"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    })
    .await;
    let workers = j["queue"]["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 1, "{j:#}");
    assert!(
        workers[0].as_str().unwrap().contains(&pid.to_string()),
        "{j:#}"
    );
    let r = cli.run(&["status"]).await;
    r.ok();
    assert!(
        r.line("workers seen").contains(&pid.to_string()),
        "{}",
        r.stdout
    );
    assert!(
        r.line("queue").contains("0 scheduled retries"),
        "{}",
        r.stdout
    );

    let r = cli.run(&["flush", "--wait"]).await;
    r.ok();
    assert!(
        r.stdout.contains("now pending: 0 (0 in flight)"),
        "{}",
        r.stdout
    );
    assert_eq!(stored(&s).await.len(), N, "flush --wait returned early");
    let applied_line = r.stdout.lines().next().unwrap_or_default().to_owned();

    // And with --json.
    support::grant_users(&wb, "document:q2", 0..10).await;
    let j = cli.run(&["flush", "--wait", "--json"]).await.ok().json();
    assert_eq!(j["flush"]["queued"], 10, "{j:#}");
    assert_eq!(j["flush"]["applied"], 10, "{j:#}");
    assert_eq!(j["pending"]["total"], 0);
    assert_eq!(j["pending"]["in_flight"], 0);
    assert_eq!(stored(&s).await.len(), N + 10);
    // A timeout longer than a clock can count is no timeout, not a panic.
    cli.run(&["flush", "--wait", "--timeout", "10000000000000000000s"])
        .await
        .ok();
    // What the worker dead-lettered while `flush --wait` waited is
    // reported (the summary said 0: it counted only the CLI's own enqueue).
    let unchecked = WriteBehind::builder(filler_config(&s, Mode::Queue))
        .validate_against_model(false)
        .build()
        .await
        .unwrap();
    support::grant_users(&unchecked, "document:q4", 0..4).await;
    unchecked
        .grant("user:bad", "no_such_relation", "document:q4")
        .await
        .unwrap();
    // An op acknowledged before it began is not written: it did not do
    // what it is for (it exited 0).
    let r = cli.run(&["flush", "--wait", "--json"]).await;
    let j = r
        .fails(
            1,
            "1 of the ops it waited for (acknowledged before it began",
        )
        .json();
    let counts = ["queued", "applied", "dead_lettered"].map(|k| j["flush"][k].as_u64());
    assert_eq!(counts, [Some(5), Some(4), Some(1)], "{j:#}");
    assert!(r.stderr.contains("dlq list"), "{r:#?}");
    // The JSON says so too (its error was null, its exit 1).
    let error = j["flush"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("dead-lettered while it ran"), "{j:#}");
    // The letter is older than the next wait, which succeeds.
    support::grant_users(&unchecked, "document:q5", 0..2).await;
    cli.run(&["flush", "--wait"]).await.ok();
    unchecked.shutdown().await.unwrap();

    // All applied, a worker running: healthy, with a warning for the test
    // Redis, which runs without AOF.
    let r = cli.run(&["status", "--check"]).await;
    r.ok();
    assert!(r.stdout.contains("health            ok"), "{}", r.stdout);
    assert!(r.stdout.contains("appendonly"), "{}", r.stdout);

    // SIGTERM: a graceful stop, exit 0.
    let started = Instant::now();
    let out = support::terminate(worker, Duration::from_secs(30)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "worker stopped in {:.2?}: {}; its log:\n{stderr}",
        started.elapsed(),
        out.status
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains(&cli.token));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&cli.token));

    // Wrong credentials show as a problem, without the token.
    let mut wrong = Cli::new(&s, "queue");
    wrong.set("FGA_API_TOKEN", "s3cret-but-wrong");
    let r = wrong.run(&["status", "--check"]).await;
    r.fails(1, "OpenFGA refuses the credentials");

    // No worker now: `flush --wait` says so and gives up at its timeout.
    support::grant_users(&wb, "document:q3", 0..5).await;
    let r = cli.run(&["flush", "--wait", "--timeout", "2s"]).await;
    r.fails(1, "no worker is running");
    assert!(r.stderr.contains("5 ops still pending"), "{r:#?}");
    // Given one, it is not told to pass --timeout.
    assert!(!r.stderr.contains("pass --timeout"), "{r:#?}");
    let r = cli.run(&["status", "--check"]).await;
    r.fails(1, "no worker was seen");
    assert!(r.stdout.contains("PROBLEM"), "{}", r.stdout);
    // So does an operator's CLI configured for inline mode (the hint for
    // a memory store names only buffer.store): the store's queue shows
    // whatever the CLI's own flush.mode says. Before, it showed no queue.
    let inline = Cli::new(&s, "inline");
    let r = inline.run(&["status", "--check"]).await;
    r.fails(1, "no worker was seen");
    // Nor does it wait forever without a timeout: it gives up once no
    // worker has run for 6 worker leases.
    let mut short_lease = Cli::new(&s, "queue");
    short_lease.set("FGA_WB_REDIS__WRITER_LEASE", "2s");
    let r = short_lease.run(&["flush", "--wait"]).await;
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(
        r.code == 1 && last.contains("no worker is running") && last.contains("--timeout"),
        "{r:#?}"
    );
    // A plain flush says so too (it said only "queued"; it still exits 0).
    let r = short_lease.run(&["flush"]).await;
    r.ok();
    assert!(
        r.stderr
            .contains("jobs wait: no worker is running: start `fga-wb worker`"),
        "{r:#?}"
    );

    // The summary of `flush --wait` should say what the workers applied:
    // checked last, so that the checks above run whatever it says.
    assert!(
        applied_line.contains(&format!("{N} applied")),
        "`flush --wait` waited until the worker applied all {N} ops, but its summary \
         says: {applied_line:?}"
    );
}

/// `flush --wait` while an application keeps granting, inline: it waits
/// for what was acknowledged before it began, not for a moment with
/// nothing pending, which steady traffic never gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_wait_ends_under_steady_traffic() {
    flush_wait_under_traffic("cli-steady", Mode::Inline).await;
}

/// The same in queue mode, with a worker applying the jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_flush_wait_ends_under_steady_traffic() {
    flush_wait_under_traffic("cli-steady-queue", Mode::Queue).await;
}

async fn flush_wait_under_traffic(name: &str, mode: Mode) {
    let s = new_store(name).await;
    let cli = Cli::new(
        &s,
        if mode == Mode::Queue {
            "queue"
        } else {
            "inline"
        },
    );
    let wb = filler(&s, mode).await;
    let _worker = (mode == Mode::Queue).then(|| quiet_worker(&cli));
    const N: usize = 100;
    support::grant_users(&wb, "document:before", 0..N).await;
    let stop = Arc::new(AtomicBool::new(false));
    let granted = Arc::new(AtomicUsize::new(0));
    let (started_tx, mut started) = tokio::sync::watch::channel(0usize);
    let fill = tokio::spawn({
        let (wb, stop, granted) = (wb.clone(), stop.clone(), granted.clone());
        async move {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                wb.grant(&format!("user:u{i}"), "viewer", "document:steady")
                    .await
                    .unwrap();
                i += 1;
                granted.store(i, Ordering::Relaxed);
                started_tx.send_replace(i);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    started.wait_for(|n| *n >= 20).await.unwrap();
    let before = granted.load(Ordering::Relaxed);
    let r = cli.run(&["flush", "--wait", "--timeout", "40s"]).await;
    let during = granted.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    fill.await.unwrap();
    r.ok();
    assert!(during > 0, "the application granted while it ran");
    let stored: std::collections::HashSet<String> = stored(&s).await.into_iter().collect();
    let acknowledged_before = (0..N)
        .map(|i| format!("document:before#viewer@user:u{i}"))
        .chain((0..before).map(|i| format!("document:steady#viewer@user:u{i}")));
    let missing: Vec<String> = acknowledged_before
        .filter(|t| !stored.contains(t))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged before `flush --wait` began, not in OpenFGA when it exited 0: {missing:?}"
    );
}

/// A revoke that died of transient failures (its worker could not reach
/// OpenFGA through the retry schedule, while the application could): OpenFGA
/// still holds the grant, so the checks the revoke can change fail closed
/// instead of answering `allowed`, and the others answer. After `fga-wb dlq
/// replay --all` and a worker that reaches OpenFGA, the revoke is applied
/// and the check answers `false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_dead_lettered_in_an_outage_denies_until_replayed() {
    let s = new_store("cli-deadrev").await;
    support::write_to_openfga(&s, "user:anne", "viewer", "document:1").await;
    let wb = filler(&s, Mode::Queue).await;
    assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());

    die_in_an_outage(&s, &wb, 1, async {
        wb.revoke("user:anne", "viewer", "document:1")
            .await
            .unwrap();
    })
    .await;
    let letters = wb.dead_letters().await.unwrap();
    assert_eq!(letters[0].op, fga_wb::Op::Revoke, "{letters:?}");

    let e = wb
        .check("user:anne", "viewer", "document:1")
        .await
        .expect_err("a check answered while the revoke it depends on is dead-lettered");
    assert!(e.is_stale_check(), "{e}");
    assert!(e.to_string().contains("dlq replay"), "{e}");
    let e = wb
        .batch_check(&[fga_wb::openfga::CheckRequest::new(
            "user:anne",
            "viewer",
            "document:1",
        )])
        .await;
    assert!(!matches!(e.as_deref(), Ok([Ok(true)])), "{e:?}");
    // Checks the revoke cannot change answer.
    assert!(!wb.check("user:bob", "viewer", "document:1").await.unwrap());
    assert!(!wb.check("user:anne", "viewer", "document:2").await.unwrap());

    replay_and_drain(&s, 1).await;
    assert!(!wb.check("user:anne", "viewer", "document:1").await.unwrap());
    assert!(stored(&s).await.is_empty());
}

/// The same for grants that take access away, which died of transient
/// failures: `blocked` (under `can_view`'s `but not`) for anne, whose
/// `can_view` OpenFGA answers `true` without it, and bob's `viewer` with a
/// condition over his unconditional tuple (written, it would narrow his
/// access). Their checks fail closed instead of answering `allowed`. A
/// plain grant that died (carol's `viewer`) leaves her checks answered from
/// OpenFGA, which errs towards deny, and so do 1,001 plain group
/// memberships that died (more than a check looks at one by one, on a
/// relation no grant takes access away through). After a replay all are
/// written. Before, only revokes failed closed: anne's `can_view` and
/// bob's `viewer` answered `true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_that_takes_access_away_dead_lettered_in_an_outage_denies_until_replayed() {
    let s = new_store("cli-deadgrant").await;
    support::write_to_openfga(&s, "user:anne", "viewer", "document:1").await;
    support::write_to_openfga(&s, "user:bob", "viewer", "document:1").await;
    let wb = filler(&s, Mode::Queue).await;
    assert!(wb
        .check("user:anne", "can_view", "document:1")
        .await
        .unwrap());
    assert!(wb.check("user:bob", "viewer", "document:1").await.unwrap());

    const MEMBERS: usize = 1_001;
    die_in_an_outage(&s, &wb, 3 + MEMBERS, async {
        for i in 0..MEMBERS {
            wb.grant(&format!("user:m{i}"), "member", "group:many")
                .await
                .unwrap();
        }
        wb.grant("user:anne", "blocked", "document:1")
            .await
            .unwrap();
        wb.grant_with_condition(
            "user:bob",
            "viewer",
            "document:1",
            "non_expired",
            serde_json::json!({ "grant_time": "2000-01-01T00:00:00Z", "grant_duration": "1h" })
                .as_object()
                .cloned(),
        )
        .await
        .unwrap();
        wb.grant("user:carol", "viewer", "document:1")
            .await
            .unwrap();
    })
    .await;

    for (user, relation) in [("user:anne", "can_view"), ("user:bob", "viewer")] {
        let e = wb.check(user, relation, "document:1").await.expect_err(
            "a check answered while a grant that takes its access away is dead-lettered",
        );
        assert!(e.is_stale_check(), "{user} {relation}: {e}");
    }
    assert!(!wb
        .check("user:carol", "viewer", "document:1")
        .await
        .unwrap());
    assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());
    // document#viewer depends on group#member on every group.
    assert!(!wb.check("user:m0", "viewer", "document:2").await.unwrap());

    replay_and_drain(&s, 3 + MEMBERS).await;
    assert!(!wb
        .check("user:anne", "can_view", "document:1")
        .await
        .unwrap());
    assert!(wb
        .check("user:carol", "viewer", "document:1")
        .await
        .unwrap());
    // Without the time in its context, the condition cannot say yes.
    let e = wb.check("user:bob", "viewer", "document:1").await;
    assert!(!matches!(e, Ok(true)), "bob's access is narrowed: {e:?}");
}

/// A revoke that died in an outage is owed to OpenFGA until a newer op on
/// its tuple is written. When the newer op is refused for good (here a
/// grant under a condition the model lacks, from a handle that does not
/// validate against the model), the revoke is pending again, and the
/// worker queues and writes it with no application flushing. A replay
/// while the newer op is buffered leaves the revoke's letter as it is.
/// Before, the refused grant's letter took the revoke's place: checks
/// stopped failing closed and answered `true` from the tuple OpenFGA still
/// held, and a replay dropped the revoke as superseded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_dead_in_an_outage_is_owed_again_when_a_newer_op_is_refused() {
    let s = new_store("cli-owed-revoke").await;
    let wb = revoke_dead_in_an_outage(&s).await;
    let unchecked = unchecked_handle(&s).await;
    refused_grant(&unchecked).await;
    let cli = Cli::new(&s, "queue");
    let r = cli.run(&["dlq", "replay", "--all"]).await;
    r.ok();
    assert!(r.stdout.contains("replayed 0"), "{}", r.stdout);
    assert!(
        r.stdout
            .contains("1 letter stays: its tuple has an op that must be written first"),
        "{}",
        r.stdout
    );
    assert_eq!(
        wb.dead_letters().await.unwrap().len(),
        1,
        "the revoke's letter stays"
    );
    unchecked.flush().await.unwrap();
    // No application flushes from here on.
    unchecked.shutdown().await.unwrap();
    wb.shutdown().await.unwrap();
    let inspect = inspecting_handle(&s).await;
    let _worker = replaying_off_worker(&s);
    let refused = refused_letter(&inspect).await;
    assert_eq!(refused.op, fga_wb::Op::Grant, "{refused:?}");
    let e = inspect.check("user:anne", "viewer", "document:1").await;
    assert!(
        !matches!(e, Ok(true)),
        "a revoke owed to OpenFGA answered allowed"
    );
    // The worker alone writes the revoke.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !stored(&s).await.is_empty() {
        assert!(Instant::now() < deadline, "the revoke was not written");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!inspect
        .check("user:anne", "viewer", "document:1")
        .await
        .unwrap());
    let letters = inspect.dead_letters().await.unwrap();
    assert!(letters.iter().all(|d| !d.transient), "{letters:?}");
    cli.run(&["flush", "--wait"]).await.ok();
}

/// The same, with a plain grant acknowledged after the revoke and folded
/// into the refused one before either was written: the folded grant never
/// reaches OpenFGA, so the revoke is still owed and is written, as when
/// the revoke is pending rather than dead (ops folded into a grant refused
/// for good leave the tuple revoked: towards deny). Before, the fold
/// settled the revoke, and OpenFGA kept the tuple from before the revoke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_folded_after_a_revoke_dead_in_an_outage_leaves_it_owed() {
    let s = new_store("cli-owed-settled").await;
    let wb = revoke_dead_in_an_outage(&s).await;
    let unchecked = unchecked_handle(&s).await;
    unchecked
        .grant("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    refused_grant(&unchecked).await;
    unchecked.flush().await.unwrap();
    let _worker = replaying_off_worker(&s);
    refused_letter(&wb).await;
    Cli::new(&s, "queue").run(&["flush", "--wait"]).await.ok();
    assert!(stored(&s).await.is_empty());
    assert!(!wb.check("user:anne", "viewer", "document:1").await.unwrap());
}

/// A store where anne is viewer of document:1 in OpenFGA, and a queue-mode
/// handle whose revoke of it died in an outage (checks fail closed).
async fn revoke_dead_in_an_outage(s: &TestStore) -> WriteBehind {
    support::write_to_openfga(s, "user:anne", "viewer", "document:1").await;
    let wb = filler(s, Mode::Queue).await;
    die_in_an_outage(s, &wb, 1, async {
        wb.revoke("user:anne", "viewer", "document:1")
            .await
            .unwrap();
    })
    .await;
    let e = wb.check("user:anne", "viewer", "document:1").await;
    assert!(e.as_ref().is_err_and(|e| e.is_stale_check()), "{e:?}");
    wb
}

/// `fga-wb worker --metrics-addr` counts the ops its jobs apply: in queue
/// mode only workers see jobs end, so their counters are the ones a
/// dashboard shows. Before, they stayed at 0 while the worker wrote. Its
/// pending-ops gauge shows the store's backlog, also before any job is
/// queued (with the applications down, it is the only one left); it
/// stayed at its first 0 before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_counts_what_its_jobs_apply() {
    let s = new_store("metrics-worker").await;
    let wb = filler(&s, Mode::Queue).await;
    let port = testenv::free_port().unwrap();
    let cli = Cli::new(&s, "queue");
    let _worker = cli
        .command(&["worker", "--metrics-addr", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn fga-wb worker");
    for i in 0..5 {
        wb.grant(&format!("user:u{i}"), "viewer", "document:w")
            .await
            .unwrap();
    }
    let scraped = |name: &str, want: f64| {
        let series = format!("{name}{{store=\"{}\"}}", s.store_id);
        let wb = &wb;
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let text = match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                let value = text
                    .lines()
                    .find(|l| l.starts_with(&series))
                    .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
                if value == Some(want) {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "the worker's {series} after 30 s (want {want}):\n{text}\nstatus: {:#?}",
                    wb.status().await
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    scraped("fga_wb_pending_ops", 5.0).await;
    wb.flush().await.unwrap();
    scraped("fga_wb_ops_applied_total", 5.0).await;
    scraped("fga_wb_pending_ops", 0.0).await;
    assert_eq!(support::stored(&s).await.len(), 5);
    wb.shutdown().await.unwrap();
}

/// Ops given up in an outage: `status --check` reports them as a problem
/// where no worker replays them (it said "health ok" while their checks
/// failed closed), and purging them says what that costs however it is
/// asked: by id (a revoke), and with `--all --yes` (a grant that takes
/// access away, anne's `blocked`), which purged silently before, as any
/// purge of such a grant did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_ops_given_up_in_an_outage_warns() {
    let s = new_store("cli-purge-owed").await;
    let wb = revoke_dead_in_an_outage(&s).await;
    // Once the worker (gone) is no longer seen, nothing replays them.
    support::eventually(
        "the worker's lease ended",
        Duration::from_secs(60),
        || async {
            let s = wb.status().await.unwrap();
            s.queue.is_some_and(|q| q.workers.is_empty())
        },
    )
    .await;
    let r = Cli::new(&s, "queue").run(&["status", "--check"]).await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(r.stderr.contains("given up in an outage"), "{r:#?}");
    let id = wb.dead_letters().await.unwrap()[0].id.to_string();
    let r = Cli::new(&s, "queue").run(&["dlq", "purge", &id]).await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stderr.contains("given up in an outage"), "{r:#?}");
    // What the warning said: OpenFGA answers, and it still holds the tuple.
    assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());

    die_in_an_outage(&s, &wb, 1, async {
        wb.grant("user:anne", "blocked", "document:1")
            .await
            .unwrap();
    })
    .await;
    let e = wb.check("user:anne", "can_view", "document:1").await;
    assert!(e.as_ref().is_err_and(|e| e.is_stale_check()), "{e:?}");
    let r = Cli::new(&s, "queue")
        .run(&["dlq", "purge", "--all", "--yes"])
        .await;
    assert_eq!(r.code, 0, "{r:#?}");
    assert!(r.stderr.contains("given up in an outage"), "{r:#?}");
    // OpenFGA never got the grant that took anne's access away.
    assert!(wb
        .check("user:anne", "can_view", "document:1")
        .await
        .unwrap());
}

/// Inline, `flush --wait` ended with success while an op acknowledged
/// before it lay given up in an outage, though inline nothing replays it
/// (`status --check` named it a problem). It now exits 1 and says what to
/// run; once replayed, the wait writes it and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_flush_wait_fails_on_ops_given_up_in_an_outage() {
    let s = new_store("cli-inline-letters").await;
    let wb = inspecting_handle(&s).await;
    die_in_an_outage(&s, &wb, 1, async {
        wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    })
    .await;
    let cli = Cli::new(&s, "inline");
    let r = cli.run(&["flush", "--wait"]).await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(
        r.stderr.contains("1 ops died of transient failures")
            && r.stderr.contains("inline, nothing replays them")
            && r.stderr.contains("fga-wb dlq replay"),
        "{r:#?}"
    );
    cli.run(&["dlq", "replay", "--all"]).await.ok();
    cli.run(&["flush", "--wait"]).await.ok();
    assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());
}

/// A queue-mode handle that does not check tuples against the model.
async fn unchecked_handle(s: &TestStore) -> WriteBehind {
    WriteBehind::builder(filler_config(s, Mode::Queue))
        .validate_against_model(false)
        .build()
        .await
        .unwrap()
}

/// A queue-mode handle that flushes nothing by itself.
async fn inspecting_handle(s: &TestStore) -> WriteBehind {
    WriteBehind::builder(filler_config(s, Mode::Queue))
        .automatic_flush(false)
        .build()
        .await
        .unwrap()
}

/// Grants anne viewer of document:1 under a condition the model lacks:
/// OpenFGA refuses it for good.
async fn refused_grant(unchecked: &WriteBehind) {
    unchecked
        .grant_with_condition(
            "user:anne",
            "viewer",
            "document:1",
            "no_such_condition",
            None,
        )
        .await
        .unwrap();
}

/// A worker that writes, and does not replay transient letters by itself.
fn replaying_off_worker(s: &TestStore) -> tokio::process::Child {
    let mut worker = Cli::new(s, "queue");
    worker.set("FGA_WB_QUEUE__REPLAY_TRANSIENT", "0s");
    quiet_worker(&worker)
}

/// Waits for the letter of an op OpenFGA refused for good.
async fn refused_letter(wb: &WriteBehind) -> fga_wb::DeadLetter {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let letters = wb.dead_letters().await.unwrap();
        if let Some(d) = letters.iter().find(|d| !d.transient) {
            return d.clone();
        }
        assert!(Instant::now() < deadline, "no refused op: {letters:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `fga-wb worker` for `cli`'s store, its output dropped.
fn quiet_worker(cli: &Cli) -> tokio::process::Child {
    cli.command(&["worker"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fga-wb worker")
}

/// Runs `act` (ops that the application acknowledges) with only a worker
/// that cannot reach OpenFGA (one 100 ms retry), until `letters` transient
/// dead letters are written; the worker is gone when this returns.
async fn die_in_an_outage(
    s: &TestStore,
    wb: &WriteBehind,
    letters: usize,
    act: impl std::future::Future<Output = ()>,
) {
    let mut cut_off = Cli::new(s, "queue");
    let port = support::closed_port();
    cut_off.set("FGA_API_URL", &format!("http://127.0.0.1:{port}"));
    cut_off.set("FGA_WB_QUEUE__RETRY_SCHEDULE", r#"["100ms"]"#);
    cut_off.set("FGA_WB_QUEUE__REQUEST_RETRIES", "0");
    cut_off.set("FGA_WB_QUEUE__REPLAY_TRANSIENT", "0s");
    let worker = quiet_worker(&cut_off);
    act.await;
    wb.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = wb.dead_letters().await.unwrap();
        if found.len() == letters {
            assert!(found.iter().all(|d| d.transient), "{found:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "expected {letters} dead letters: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(worker);
}

/// `fga-wb dlq replay --all` (of `letters`), then a worker that reaches
/// OpenFGA, until `fga-wb flush --wait` says everything is written.
async fn replay_and_drain(s: &TestStore, letters: usize) {
    let cli = Cli::new(s, "queue");
    let r = cli.run(&["dlq", "replay", "--all"]).await;
    r.ok();
    let replayed = format!("replayed {letters} dead letters");
    assert!(r.stdout.contains(&replayed), "{}", r.stdout);
    let _worker = quiet_worker(&cli);
    cli.run(&["flush", "--wait"]).await.ok();
}

/// Scripts and Kubernetes Jobs branch on the exit codes: `--help` (the
/// command's and each subcommand's) says what they mean. Before, only the
/// README did.
#[test]
fn help_names_the_exit_codes() {
    for args in [
        &["--help"][..],
        &["flush", "--help"],
        &["dlq", "--help"],
        &["status", "--help"],
    ] {
        let out = std::process::Command::new(support::cli::BIN)
            .args(args)
            .env_clear()
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(
            text.contains("Exit codes:") && text.contains("2  usage or configuration error"),
            "{args:?}: {text}"
        );
    }
}

/// The memory store is per process: `status` and `flush` refuse it with
/// exit 2 instead of showing zeros.
#[tokio::test]
async fn memory_store_is_refused() {
    let s = new_store("cli-memory").await;
    let mut cli = Cli::new(&s, "inline");
    cli.set("FGA_WB_BUFFER__STORE", "memory");
    for cmd in [
        &["status"][..],
        &["flush"],
        &["status", "--json"],
        &["clear", "--yes"],
    ] {
        let r = cli.run(cmd).await;
        r.fails(2, "memory");
        assert!(
            r.stderr.contains("own buffer") || r.stderr.contains("per process"),
            "{r:#?}"
        );
        assert!(r.stdout.is_empty(), "{r:#?}");
    }
}

/// A bad value in the environment: exit 2, and the message names the
/// variable.
#[tokio::test]
async fn bad_config_value_names_the_variable() {
    let s = new_store("cli-badconfig").await;
    let mut cli = Cli::new(&s, "inline");
    cli.set("FGA_WB_FLUSH__BATCH_SIZE", "ten");
    for cmd in [&["status"][..], &["worker"], &["dlq", "list", "--json"]] {
        cli.run(cmd)
            .await
            .fails(2, "FGA_WB_FLUSH__BATCH_SIZE")
            .stderr
            .contains("ten")
            .then_some(())
            .expect("the message shows the bad value");
    }
    // A usage error is exit 2 too.
    let r = cli.run(&["no-such-command"]).await;
    assert_eq!(r.code, 2, "{r:#?}");
    // A config file named by --config that does not exist.
    cli.set("FGA_WB_FLUSH__BATCH_SIZE", "10");
    cli.run(&["status", "--config", "nope.toml"])
        .await
        .fails(2, "nope.toml");
}

/// A reader of stderr that went away (`fga-wb ... 2>&1 | head -1`) does
/// not turn the exit code into a panic's 101: the failure's own code
/// stands. Before, the message's `eprintln!` panicked on the broken pipe.
#[tokio::test]
async fn a_closed_stderr_keeps_the_exit_code() {
    let s = new_store("cli-closed-stderr").await;
    let mut cli = Cli::new(&s, "inline");
    cli.set("FGA_WB_FLUSH__BATCH_SIZE", "ten");
    let mut child = cli
        .command(&["status"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run fga-wb");
    // Closed before the process gets to its message: writing it fails.
    drop(child.stderr.take());
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("fga-wb did not finish in 60 s")
        .unwrap();
    assert_eq!(status.code(), Some(2), "{status:?}");
}

/// `--config PATH` is read: settings from the file, the rest from the
/// environment.
#[tokio::test]
async fn config_file_is_read() {
    let s = new_store("cli-config").await;
    let mut cli = Cli::new(&s, "inline");
    let path = cli.dir.join("mine.toml");
    std::fs::write(
        &path,
        format!(
            "[buffer]\nstore = \"redis\"\n[redis]\nurl = \"{}\"\nkey_prefix = \"fga-wb\"\n",
            support::redis_url()
        ),
    )
    .unwrap();
    cli.vars
        .retain(|(k, _)| k != "FGA_WB_BUFFER__STORE" && k != "FGA_WB_REDIS__URL");
    let wb = filler(&s, Mode::Inline).await;
    support::grant_users(&wb, "document:cfg", 0..3).await;
    let j = cli
        .run(&["--config", path.to_str().unwrap(), "status", "--json"])
        .await
        .ok()
        .json();
    assert_eq!(j["pending"]["total"], 3, "{j:#}");
    // Without the file, the default store is memory: refused.
    cli.run(&["status"]).await.fails(2, "memory");
}

/// Redis unreachable: exit 1, one clear line, and never the password
/// from the URL.
#[tokio::test]
async fn unreachable_redis_is_one_line_without_the_password() {
    let s = new_store("cli-noredis").await;
    let mut cli = Cli::new(&s, "queue");
    let port = support::closed_port();
    // Passwords as typed, unencoded: with a comma (which also separates
    // cluster seeds) or a `://` (which starts a URL, and makes this one
    // unreadable: a configuration error) in them.
    for (password, code, says) in [
        ("s3cret", 1, "Redis"),
        ("s3cret,redis", 1, "Redis"),
        ("s3cret://x", 2, "percent-encoded"),
    ] {
        cli.set(
            "FGA_WB_REDIS__URL",
            &format!("redis://:{password}@127.0.0.1:{port}"),
        );
        for cmd in [
            &["status"][..],
            &["status", "--json"],
            &["flush", "--wait"],
            &["clear", "--yes"],
            &["dlq", "list"],
            &["dlq", "purge", "--all", "--yes"],
            &["worker"],
        ] {
            let r = cli.run(cmd).await;
            r.fails(code, says);
            assert!(r.stderr.contains(&format!("127.0.0.1:{port}")), "{r:#?}");
            assert!(r.stdout.is_empty(), "{r:#?}");
        }
    }
}

/// Redis refusing fga-wb's credentials (a wrong password; none where one
/// is needed): exit 2, a configuration error that says to fix
/// `redis.url`, and never the password. Before, exit 1, "cannot connect",
/// which an application takes for an outage and retries for ever.
#[tokio::test]
async fn refused_redis_credentials_are_a_configuration_error() {
    let s = new_store("cli-redis-auth").await;
    let redis = testenv::Redis::start(testenv::RedisOptions::default())
        .await
        .unwrap();
    let port = redis.port();
    let set = redis
        .command("ACL SETUSER ops on >s3cret-right ~* &* +@all")
        .await;
    assert!(set.is_some_and(|r| r.starts_with("+OK")));
    let set = redis.command("CONFIG SET requirepass s3cret-default").await;
    assert!(set.is_some_and(|r| r.starts_with("+OK")));
    let mut cli = Cli::new(&s, "inline");
    for url in [
        format!("redis://ops:s3cret@127.0.0.1:{port}"),
        format!("redis://127.0.0.1:{port}"),
    ] {
        cli.set("FGA_WB_REDIS__URL", &url);
        for cmd in [&["status"][..], &["worker"]] {
            let r = cli.run(cmd).await;
            r.fails(2, "refused fga-wb's credentials");
            assert!(r.stderr.contains("redis.url"), "{r:#?}");
        }
    }
    refused_by_redis(&s, &format!("redis://ops:s3cret@127.0.0.1:{port}")).await;
}

/// The error of a handle built for `url`'s Redis: a configuration error.
async fn refused_by_redis(s: &support::TestStore, url: &str) -> fga_wb::Error {
    let mut c = filler_config(s, Mode::Inline);
    c.redis.url = url.into();
    let e = WriteBehind::builder(c)
        .build()
        .await
        .err()
        .expect("refused");
    assert!(e.is_config() && !e.is_transient(), "{e}");
    e
}

/// A Redis that does not know HELLO (renamed away here; a proxy's or an
/// old server's the same) quotes the arguments of the one fga-wb sends,
/// its password among them: the error names what is wrong, exit 2, and
/// never the password. Before, the password was in the error, and the
/// connect was retried as an outage.
#[tokio::test]
async fn a_redis_without_hello_keeps_the_password_out_of_errors() {
    let s = new_store("cli-redis-hello").await;
    let redis = testenv::Redis::start(testenv::RedisOptions {
        args: vec!["--rename-command".into(), "HELLO".into(), String::new()],
        ..Default::default()
    })
    .await
    .unwrap();
    let port = redis.port();
    let set = redis.command("CONFIG SET requirepass s3cret-pw").await;
    assert!(set.is_some_and(|r| r.starts_with("+OK")));
    let url = format!("redis://:s3cret-pw@127.0.0.1:{port}");
    let mut cli = Cli::new(&s, "inline");
    cli.set("FGA_WB_REDIS__URL", &url);
    for cmd in [&["status"][..], &["worker"]] {
        let r = cli.run(cmd).await;
        r.fails(2, "does not take HELLO");
        assert!(!r.stderr.contains("s3cret-pw"), "{r:#?}");
    }
    let e = refused_by_redis(&s, &url).await;
    assert!(!format!("{e} {e:?}").contains("s3cret-pw"), "{e}");
}

/// The `fga` CLI's global flags: `--store-id`, `--api-url`, `--api-token`
/// beat the variables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fga_cli_flags_beat_the_variables() {
    let s = new_store("cli-flags").await;
    let mut cli = Cli::new(&s, "inline");
    cli.vars
        .retain(|(k, _)| k != "FGA_STORE_ID" && k != "FGA_API_URL");
    cli.run(&["status"]).await.fails(2, "store_id");
    let url = support::openfga_url();
    let r = cli
        .run(&["--store-id", &s.store_id, "--api-url", &url, "status"])
        .await;
    r.ok();
    assert!(r.stdout.contains(&s.store_id), "{}", r.stdout);
    // A wrong token given as a flag is used (and never printed).
    cli.set("FGA_API_URL", &url);
    let r = cli
        .run(&[
            "--store-id",
            &s.store_id,
            "--api-token",
            "s3cret-wrong",
            "status",
            "--check",
        ])
        .await;
    r.fails(1, "OpenFGA refuses the credentials");
}

/// As `mocked_inline`, with every Write held for 2 minutes and the CLI
/// waiting for them.
async fn writes_held() -> (wiremock::MockServer, testenv::Redis, WriteBehind, Cli) {
    let (server, redis, app, mut cli) = mocked_inline().await;
    support::mock::write_mock()
        .respond_with(
            support::fixture("write-ok")
                .response()
                .set_delay(Duration::from_secs(120)),
        )
        .mount(&server)
        .await;
    cli.set("FGA_WB_OPENFGA__REQUEST_TIMEOUT", "300s");
    (server, redis, app, cli)
}

/// `flush --wait --timeout` gives up at its timeout even while its first
/// flush is still writing (inline, the command writes the backlog itself;
/// here a wiremock OpenFGA holds every Write for 2 minutes): it exits 1
/// saying what is left. Before, the timeout began after that first flush,
/// which returned only once its Writes did.
#[tokio::test]
async fn flush_wait_gives_up_at_its_timeout_while_it_writes() {
    let (_server, _redis, app, cli) = writes_held().await;
    // A deadline that passes before the command has read what to wait for
    // does not say that everything is written (it did).
    let r = cli.run(&["flush", "--wait", "--timeout", "1ms"]).await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(!r.stderr.contains("is written now"), "{r:#?}");
    let r = cli.run(&["flush", "--wait", "--timeout", "1s"]).await;
    r.fails(1, "1 ops still pending or queued");
    drop(app);
}

/// `flush --wait` ends on SIGTERM as on Ctrl-C (`timeout`, a Kubernetes
/// Job and a cancelled CI run send it): it exits 1 saying it was
/// interrupted, and hands back what it had taken and not sent at once;
/// only the ops of the Write it cut off stay in flight (it may still
/// land). Before, SIGTERM killed it, and all it had taken stayed its own
/// until its lease, and a hold after it, ended.
#[tokio::test]
async fn flush_wait_ends_on_sigterm_and_hands_back_what_it_did_not_send() {
    let (server, _redis, app, mut cli) = writes_held().await;
    support::grant_users(&app, "document:term", 0..299).await;
    cli.set("FGA_WB_FLUSH__MAX_PARALLEL_REQUESTS", "1");
    let child = cli
        .command(&["flush", "--wait"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let limit = Instant::now() + Duration::from_secs(30);
    while app.pending().await.unwrap().in_flight < 300 {
        assert!(Instant::now() < limit, "the command took nothing");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .all(|r| r.method.as_str() != "POST")
    {
        assert!(Instant::now() < limit, "the command sent no Write");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = support::terminate(child, Duration::from_secs(20)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let p = app.pending().await.unwrap();
    assert!(p.in_flight <= 100 && p.total >= 200, "{p:?}");
    drop(app);
}

/// `flush --wait` against an OpenFGA that fails every Write (503, no quick
/// retries) backs off between its flushes, doubling from half a second:
/// a handful of Writes in 4 s. Before, it flushed every 250 ms, each
/// flush retrying at once: about sixteen.
#[tokio::test]
async fn flush_wait_backs_off_while_openfga_fails() {
    let (server, _redis, app, mut cli) = mocked_inline().await;
    let mut writes = support::mock::reporting_write(
        &server,
        support::fixture("unavailable-503").response(),
        None,
    )
    .await;
    cli.set("FGA_WB_FLUSH__REQUEST_RETRIES", "0");
    let r = cli.run(&["flush", "--wait", "--timeout", "4s"]).await;
    // Each failed Write logs a warning; the error is the last line.
    assert_eq!(r.code, 1, "{r:#?}");
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(last.contains("1 ops still pending or queued"), "{r:#?}");
    let mut n = 0;
    while writes.try_recv().is_ok() {
        n += 1;
    }
    assert!((1..=6).contains(&n), "{n} Writes in 4 s");
    drop(app);
}

/// `flush --wait` without --timeout ends when the ops it waits for keep
/// failing while OpenFGA answers: here the one pending tuple's Write fails
/// with a 500 every time, and nothing else is written (no other writer),
/// so the tuple is never given up (a failure counts only while other
/// Writes land). Before, the command waited for good. OpenFGA answering a
/// read of the store tells this from an outage, which is waited out.
#[tokio::test]
async fn flush_wait_ends_when_a_tuple_keeps_failing_while_openfga_answers() {
    let (server, _redis, app, mut cli) = mocked_inline().await;
    // A patience of a few seconds: twice a request, the retry schedule, a
    // hold and a lease.
    let settings = [
        ("FGA_WB_QUEUE__REPLAY_TRANSIENT", "0s"),
        ("FGA_WB_REDIS__WRITER_LEASE", "2s"),
    ];
    writes_fail_reads_answer(&server, &mut cli, &settings).await;
    let r = cli.run(&["flush", "--wait"]).await;
    ended_with(
        &r,
        "keep failing while OpenFGA answers reads: none of them was written",
    );
    drop(app);
}

/// OpenFGA refusing the command's own read (its credentials or settings,
/// not an outage) does not pass for an outage: the wait still ends, and
/// says why it could not tell. Before, every refused read reset its
/// patience, and it waited for good.
#[tokio::test]
async fn flush_wait_ends_when_openfga_refuses_its_read() {
    let (server, _redis, app, mut cli) = mocked_inline().await;
    let settings = [
        ("FGA_WB_QUEUE__REPLAY_TRANSIENT", "0s"),
        ("FGA_WB_REDIS__WRITER_LEASE", "2s"),
    ];
    writes_fail_reads_answer(&server, &mut cli, &settings).await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path(format!(
            "/stores/{}/read",
            support::mock::STORE
        )))
        .respond_with(support::fixture("auth-wrong-token").response())
        .with_priority(1)
        .mount(&server)
        .await;
    let r = cli.run(&["flush", "--wait"]).await;
    ended_with(
        &r,
        "OpenFGA did not answer this command's read of the store",
    );
    drop(app);
}

/// Queue mode, where the command needs only Redis: with no OpenFGA of its
/// own to ask (its address left at a port nothing listens on), a tuple the
/// workers keep failing is not waited on for good as if OpenFGA were down.
/// Before, every look counted as an outage, and it waited for good.
#[tokio::test]
async fn queue_flush_wait_ends_without_an_openfga_of_its_own() {
    let r = queue_wait_with_own_openfga_at("http://127.0.0.1:9").await;
    ended_with(&r, "in queue mode this command needs only Redis");
}

/// Inline, where the command writes: with its OpenFGA address at a port
/// nothing listens on (left at its default, or not reachable from where
/// it runs), every flush of its own failed as in an outage, every look
/// too, and it waited for good. It now ends once its patience passes
/// without ever reaching OpenFGA, and says what to check.
#[tokio::test]
async fn inline_flush_wait_ends_when_it_never_reaches_openfga() {
    let (server, _redis, app, mut cli) = mocked_inline().await;
    let settings = [
        ("FGA_WB_QUEUE__REPLAY_TRANSIENT", "0s"),
        ("FGA_WB_REDIS__WRITER_LEASE", "2s"),
    ];
    writes_fail_reads_answer(&server, &mut cli, &settings).await;
    cli.set("FGA_WB_OPENFGA__API_URL", "http://127.0.0.1:9");
    let r = cli.run(&["flush", "--wait"]).await;
    ended_with(&r, "this command never heard from it while waiting");
    assert!(r.stderr.contains("--timeout"), "{r:#?}");
    // Its 5 s lines said why nothing moved meanwhile.
    assert!(r.stderr.contains("last flush failed: "), "{r:#?}");
    assert_eq!(app.pending().await.unwrap().total, 1);
    drop(app);
}

/// `flush --wait` in queue mode, where a worker fails a tuple for good and
/// the command's own OpenFGA is at `api_url`.
async fn queue_wait_with_own_openfga_at(api_url: &str) -> support::cli::Run {
    let (server, _redis, app, mut cli) = mocked_inline().await;
    // With no replay limit: its replays, each dying again, must not end
    // the wait before its look at OpenFGA does.
    let settings = [
        ("FGA_WB_FLUSH__MODE", "queue"),
        ("FGA_WB_QUEUE__REPLAY_TRANSIENT", "2s"),
        ("FGA_WB_QUEUE__REPLAY_LIMIT", "0"),
        ("FGA_WB_REDIS__WRITER_LEASE", "2s"),
    ];
    writes_fail_reads_answer(&server, &mut cli, &settings).await;
    let mut worker = quiet_worker(&cli);
    cli.set("FGA_WB_OPENFGA__API_URL", api_url);
    // Its read may take longer than the look waits for it.
    cli.set("FGA_WB_OPENFGA__REQUEST_TIMEOUT", "60s");
    let r = cli.run(&["flush", "--wait"]).await;
    let _ = worker.kill().await;
    drop(app);
    r
}

/// The same with an address that takes connections and never answers (a
/// stalled proxy): the command's look at OpenFGA times out, which counted
/// as an outage even from an OpenFGA it never heard from, and it waited
/// for good.
#[tokio::test]
async fn queue_flush_wait_ends_when_its_openfga_never_answers() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = silent.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    let r = queue_wait_with_own_openfga_at(&format!("http://{at}")).await;
    ended_with(&r, "in queue mode this command needs only Redis");
    assert!(r.stderr.contains("did not answer a read"), "{r:#?}");
}

/// An outage (OpenFGA not answering reads either) is waited out, and its
/// time does not count: after three failed reads OpenFGA answers again,
/// and the wait gives up only once a whole patience (about 12 s here, the
/// probe every 5 s) passed with OpenFGA answering, three answers later.
/// Counting the outage, it would have given up at the first answer.
#[tokio::test]
async fn flush_wait_does_not_count_an_outage() {
    let (server, _redis, app, mut cli) = mocked_inline().await;
    let settings = [
        ("FGA_WB_QUEUE__REPLAY_TRANSIENT", "0s"),
        ("FGA_WB_REDIS__WRITER_LEASE", "5s"),
    ];
    writes_fail_reads_answer(&server, &mut cli, &settings).await;
    let read = format!("/stores/{}/read", support::mock::STORE);
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path(read.as_str()))
        .respond_with(support::fixture("unavailable-503").response())
        .up_to_n_times(3)
        .with_priority(1)
        .mount(&server)
        .await;
    let r = cli.run(&["flush", "--wait"]).await;
    ended_with(&r, "none of them was written");
    let reads = server
        .received_requests()
        .await
        .unwrap_or_default()
        .iter()
        .filter(|q| q.url.path() == read)
        .count();
    assert!(
        reads >= 3 + 3,
        "{reads} reads: gave up too soon after the outage"
    );
    drop(app);
}

/// In queue mode the same tuple dies of transient causes after its job's
/// retries, the workers replay it (OpenFGA answers), it dies again, and so
/// on for good: `flush --wait` without --timeout ends once it died again
/// after a replay, naming it. Before, it waited for good.
#[tokio::test]
async fn queue_flush_wait_ends_when_a_replayed_tuple_dies_again() {
    let (server, _redis, app, mut cli) = mocked_inline().await;
    // Letters wait 2 s for each replay, so the command sees them; its
    // patience with nothing written is far longer (the lease), so it is
    // the second death that ends it.
    // With no replay limit, which would leave it for an operator first.
    let settings = [
        ("FGA_WB_FLUSH__MODE", "queue"),
        ("FGA_WB_QUEUE__REPLAY_TRANSIENT", "2s"),
        ("FGA_WB_QUEUE__REPLAY_LIMIT", "0"),
        ("FGA_WB_REDIS__WRITER_LEASE", "60s"),
    ];
    writes_fail_reads_answer(&server, &mut cli, &settings).await;
    let mut worker = quiet_worker(&cli);
    let r = cli.run(&["flush", "--wait"]).await;
    let _ = worker.kill().await;
    ended_with(
        &r,
        "document:held#viewer@user:anne died again after the workers replayed it",
    );
    drop(app);
}

/// A tuple OpenFGA fails every time while it takes other writes dies
/// again after each of the workers' replays: past `queue.replay_limit`
/// such deaths an hour they leave its letter for an operator, and `flush
/// --wait` ends at once saying so (before, workers replayed it for good, a
/// few failing Writes every replay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_flush_wait_ends_on_a_tuple_the_workers_left_to_an_operator() {
    let (server, redis, app, mut cli) = mocked_inline().await;
    // Only anne's tuple fails; other writes land.
    support::mock::write_mock()
        .and(wiremock::matchers::body_string_contains("user:anne"))
        .respond_with(support::fixture("server-error-500").response())
        .with_priority(1)
        .mount(&server)
        .await;
    support::mock::write_mock()
        .respond_with(support::fixture("write-ok").response())
        .with_priority(2)
        .mount(&server)
        .await;
    let settings = [
        ("FGA_WB_FLUSH__MODE", "queue"),
        ("FGA_WB_QUEUE__REPLAY_TRANSIENT", "1s"),
        ("FGA_WB_QUEUE__REPLAY_LIMIT", "1"),
        ("FGA_WB_REDIS__WRITER_LEASE", "60s"),
    ];
    writes_fail_reads_answer(&server, &mut cli, &settings).await;
    let mut worker = quiet_worker(&cli);
    cli.run(&["flush"]).await.ok();
    // Another application's grants, queued as they come: written.
    let mut c = support::mock::mock_config(&server);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = redis.url();
    c.flush.mode = Mode::Queue;
    c.flush.interval = Duration::from_millis(100);
    let other = WriteBehind::builder(c).build().await.unwrap();
    let traffic = tokio::spawn({
        let other = other.clone();
        async move {
            for i in 0.. {
                let user = format!("user:u{i}");
                let _ = other.grant(&user, "viewer", "document:other").await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    // Looked at in Redis: `unfinished` counts letters only once no op is
    // left, and the other application's keep coming.
    let client = redis::Client::open(redis.url()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let left = format!("fga-wb:{{{}}}:left", support::mock::STORE);
    support::eventually(
        "the workers left the letter for an operator",
        Duration::from_secs(60),
        || {
            let (mut conn, left) = (conn.clone(), left.clone());
            async move {
                let n: i64 = redis::cmd("SCARD")
                    .arg(&left)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                n == 1
            }
        },
    )
    .await;
    traffic.abort();
    // `status --check` names it a problem, though a worker that replays
    // runs.
    let r = cli.run(&["status", "--check"]).await;
    assert_eq!(r.code, 1, "{r:#?}");
    assert!(
        r.stdout.contains("the workers left them for an operator"),
        "{r:#?}"
    );
    let r = cli.run(&["flush", "--wait"]).await;
    let _ = worker.kill().await;
    ended_with(&r, "the workers left them for an operator");
    // Its letter stays, for the operator.
    let letters = app.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0].tuple.user == "user:anne", "{letters:?}");
    let _ = other.clear().await;
    drop(app);
}

/// Every Write to the mock fails with a 500 while OpenFGA answers reads
/// (of the store, its tuples and its latest model); the CLI runs with no
/// quick retries, 1 s requests, a 50 ms retry schedule and a 100 ms hold,
/// and `settings`.
async fn writes_fail_reads_answer(
    server: &wiremock::MockServer,
    cli: &mut Cli,
    settings: &[(&str, &str)],
) {
    use wiremock::matchers::{method, path};
    use wiremock::Mock;
    let store = support::mock::STORE;
    support::mock::write_mock()
        .respond_with(support::fixture("server-error-500").response())
        .mount(server)
        .await;
    let models = support::fixture("read-models").for_model(support::mock::MODEL);
    Mock::given(method("GET"))
        .and(path(format!("/stores/{store}/authorization-models")))
        .respond_with(models.response())
        .mount(server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/stores/{store}")))
        .respond_with(support::fixture("get-store").response())
        .mount(server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/stores/{store}/read")))
        .respond_with(support::fixture("read-page").response())
        .mount(server)
        .await;
    for (var, value) in [
        ("FGA_WB_FLUSH__REQUEST_RETRIES", "0"),
        ("FGA_WB_QUEUE__REQUEST_RETRIES", "0"),
        ("FGA_WB_OPENFGA__REQUEST_TIMEOUT", "1s"),
        ("FGA_WB_QUEUE__RETRY_SCHEDULE", r#"["50ms"]"#),
        ("FGA_WB_FLUSH__UNKNOWN_OUTCOME_HOLD", "100ms"),
    ]
    .iter()
    .chain(settings)
    {
        cli.set(var, value);
    }
}

/// `r` exited 1 with `needle` in its last line (each failed Write logs a
/// warning before it).
fn ended_with(r: &support::cli::Run, needle: &str) {
    assert_eq!(r.code, 1, "{r:#?}");
    let last = r.stderr.lines().last().unwrap_or_default();
    assert!(last.contains(needle), "{r:#?}");
}

/// A wiremock OpenFGA (tests mount its Writes), a Redis of its own (the
/// mocked store's id is every mock test's), an application on them that
/// acknowledged one grant and does not flush, and the CLI, inline.
async fn mocked_inline() -> (wiremock::MockServer, testenv::Redis, WriteBehind, Cli) {
    use support::cli::Where;
    use support::mock::{mock_config, mock_openfga, MODEL, STORE};
    let server = mock_openfga().await;
    let redis = testenv::Redis::start(testenv::RedisOptions::default())
        .await
        .unwrap();
    let mut c = mock_config(&server);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = redis.url();
    let app = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    app.grant("user:anne", "viewer", "document:held")
        .await
        .unwrap();
    let cli = Cli::at(
        Where {
            api_url: server.uri(),
            token: "mock-token".into(),
            store_id: STORE.into(),
            model_id: MODEL.into(),
            redis_url: redis.url(),
        },
        "inline",
    );
    (server, redis, app, cli)
}

/// An operator's command leaves the store's writers as it exits, whether
/// it wrote (`flush`) or only looked: after Redis drops a connection, the
/// applications' checks wait for every writer seen recently to run a
/// heartbeat, and a command that is gone never does. Before, its entry
/// stayed until its lease ran out.
#[tokio::test]
async fn commands_leave_no_writer_behind() {
    let s = new_store("cli-leaves").await;
    let wb = filler(&s, Mode::Inline).await;
    support::grant_users(&wb, "document:left", 0..3).await;
    let beats = format!("fga-wb:{{{}}}:beats", s.store_id);
    let redis = support::redis_conn().await;
    let writers = || {
        let beats = beats.clone();
        let mut redis = redis.clone();
        async move {
            let mut w: Vec<String> = redis::cmd("HKEYS")
                .arg(&beats)
                .query_async(&mut redis)
                .await
                .unwrap();
            w.sort();
            w
        }
    };
    let before = writers().await;
    assert_eq!(before.len(), 1, "the application: {before:?}");
    let cli = Cli::new(&s, "inline");
    for args in [&["status"][..], &["flush"], &["dlq", "list"]] {
        cli.run(args).await.ok();
        assert_eq!(writers().await, before, "fga-wb {args:?} stayed a writer");
    }
    assert_eq!(stored(&s).await.len(), 3);
    wb.shutdown().await.unwrap();
}

/// `status` on a Redis whose ACL denies `MEMORY` (as some managed ones
/// do) still works: the store's keys are counted, their bytes left at 0.
/// Before, the whole command failed with Redis's NOPERM. An ACL that
/// denies `INFO` too is named in a warning: checks cannot compare the
/// node's replication id then.
#[tokio::test]
async fn status_works_where_the_acl_denies_memory() {
    use support::cli::Where;
    let s = new_store("cli-acl").await;
    let redis = testenv::Redis::start(testenv::RedisOptions::default())
        .await
        .unwrap();
    let set = redis
        .command("ACL SETUSER ops on >s3cret-ops ~* &* +@all -memory -info")
        .await;
    assert!(
        set.as_deref().is_some_and(|r| r.starts_with("+OK")),
        "{set:?}"
    );
    let url = format!("redis://ops:s3cret-ops@127.0.0.1:{}", redis.port());
    let mut c = filler_config(&s, Mode::Inline);
    c.redis.url = url.clone();
    let wb = WriteBehind::builder(c).build().await.unwrap();
    support::grant_users(&wb, "document:acl", 0..3).await;
    let cli = Cli::at(
        Where {
            api_url: support::openfga_url(),
            token: support::openfga_token(),
            store_id: s.store_id.clone(),
            model_id: s.model_id.clone(),
            redis_url: url,
        },
        "inline",
    );
    let r = cli.run(&["--json", "status"]).await;
    assert!(r.stderr.contains("INFO replication"), "{r:#?}");
    let j = r.ok().json();
    assert_eq!(j["pending"]["total"], 3, "{j:#}");
    let keys = j["redis_keys"].as_array().expect("redis_keys");
    let counted: u64 = keys.iter().filter_map(|k| k["keys"].as_u64()).sum();
    assert!(counted > 0, "{j:#}");
    wb.shutdown().await.unwrap();
}

/// `status --check` reports pending ops that no application process is
/// left to flush (and no worker queues: none runs here): while the application
/// runs, old pending ops are its to write; once it is gone and they have
/// waited ten flush intervals or two writer leases, it is a problem; once
/// they are written, it is not. Before, the check said "ok" while
/// acknowledged ops sat in Redis with nobody to write them.
#[tokio::test]
async fn status_check_reports_pending_ops_nobody_flushes() {
    let s = new_store("cli-nobody").await;
    let wb = filler(&s, Mode::Inline).await;
    support::grant_users(&wb, "document:nobody", 0..2).await;
    let mut cli = Cli::new(&s, "inline");
    cli.set("FGA_WB_FLUSH__INTERVAL", "100ms");
    cli.set("FGA_WB_REDIS__WRITER_LEASE", "2s");
    support::eventually(
        "the ops to wait two leases",
        Duration::from_secs(20),
        || {
            let wb = wb.clone();
            async move {
                let p = wb.pending().await.unwrap();
                p.oldest_age.is_some_and(|a| a > Duration::from_secs(4))
            }
        },
    )
    .await;
    cli.run(&["status", "--check"]).await.ok();
    wb.close().await.unwrap();
    let r = cli.run(&["status", "--check"]).await;
    r.fails(1, "no application process runs to flush them");
    cli.run(&["flush"]).await.ok();
    cli.run(&["status", "--check"]).await.ok();
    assert_eq!(stored(&s).await.len(), 2);
}

/// `worker --concurrency 0` is refused by clap (exit 2, naming the flag);
/// it ran with 1 and logged 0.
#[tokio::test]
async fn worker_concurrency_zero_is_refused() {
    let s = new_store("cli-concurrency-0").await;
    let r = Cli::new(&s, "queue")
        .run(&["worker", "--concurrency", "0"])
        .await;
    assert_eq!(r.code, 2, "{r:#?}");
    assert!(r.stderr.contains("--concurrency"), "{r:#?}");
}
