//! What fga-wb keeps in Redis. Finished jobs leave nothing, keys
//! do not grow from one round of work to the next, `status` accounts for
//! every key, older versions' leftovers can be swept, their jobs still run,
//! a Redis that would evict keys is refused, and a full Redis refuses ops
//! with a clear error and buffers nothing.
#![cfg(feature = "redis")]

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::{Config, KeyUsage, WriteBehind};
use support::{config_for, new_store, stored, TestStore, Worker};
use testenv::{Redis, RedisOptions};

fn redis_config(s: &TestStore, url: &str) -> Config {
    let mut c = config_for(s);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = url.to_owned();
    c
}

/// Queue mode on the Redis at `url`, with a quick worker poll; the handle
/// flushes only when told.
async fn queue_app(s: &TestStore, url: &str) -> (Config, WriteBehind) {
    let mut c = redis_config(s, url);
    c.flush.mode = Mode::Queue;
    c.queue.poll_interval = Duration::from_millis(50);
    let wb = WriteBehind::builder(c.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    (c, wb)
}

fn keys_of(usage: &[KeyUsage], category: &str) -> u64 {
    usage
        .iter()
        .filter(|u| u.category == category)
        .map(|u| u.keys)
        .sum()
}

/// Grants `n` distinct tuples from `from` on, flushes, and waits until the
/// worker applied them all.
async fn round(wb: &WriteBehind, from: usize, n: usize) {
    for i in from..from + n {
        wb.grant(
            &format!("user:u{i}"),
            "viewer",
            &format!("document:d{}", i / 10),
        )
        .await
        .unwrap();
    }
    let r = wb.flush().await.unwrap();
    assert!(r.error.is_none(), "{r:?}");
    drained(wb, 0).await;
}

/// Waits until the queue holds no job and `pending` ops are left, none of
/// them being written.
async fn drained(wb: &WriteBehind, pending: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = wb.status().await.unwrap();
        let q = st.queue.as_ref().expect("queue mode");
        if (st.pending.total, st.pending.in_flight) == (pending, 0)
            && q.pending + q.running + q.scheduled == 0
        {
            return;
        }
        assert!(Instant::now() < deadline, "not drained: {st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn finished_jobs_leave_nothing_and_keys_do_not_grow() {
    let s = new_store("redis-keys-jobs").await;
    let (c, wb) = queue_app(&s, &support::redis_url()).await;
    let worker = Worker::start(c, 2);

    round(&wb, 0, 1000).await;
    let first = wb.redis_key_usage().await.unwrap().expect("Redis store");
    assert_eq!(
        keys_of(&first, "queue"),
        0,
        "finished jobs left keys: {first:?}"
    );
    assert_eq!(keys_of(&first, "pending"), 0, "{first:?}");
    assert_eq!(keys_of(&first, "legacy"), 0, "{first:?}");

    round(&wb, 1000, 1000).await;
    let second = wb.redis_key_usage().await.unwrap().expect("Redis store");
    let total = |u: &[KeyUsage]| u.iter().map(|k| k.keys).sum::<u64>();
    assert_eq!(
        total(&second),
        total(&first),
        "keys grew from one round to the next: {first:?} -> {second:?}"
    );
    assert_eq!(keys_of(&second, "queue"), 0, "{second:?}");
    worker.stop().await;
}

/// A job queued by a version that kept no list of its ops beside it (the
/// claim list, `:jobc`) still runs: the worker's claims come from the job's
/// JSON, and an op a newer one superseded while the job waited is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_without_its_claim_list_runs_and_skips_superseded_ops() {
    let s = new_store("redis-keys-no-list").await;
    let redis = Redis::start(RedisOptions::default()).await.unwrap();
    let (c, wb) = queue_app(&s, &redis.url()).await;
    for i in 0..3 {
        wb.grant(&format!("user:old{i}"), "viewer", "document:1")
            .await
            .unwrap();
    }
    assert_eq!(wb.flush().await.unwrap().queued, 3);
    let prefix = format!("fga-wb:{{{}}}", s.store_id);
    let r = redis.command(&format!("DEL {prefix}:jobc")).await;
    assert_eq!(r.as_deref().map(str::trim), Some(":1"), "the claim list");
    // Superseded while its job waits: the grant must not be written.
    wb.revoke("user:old1", "viewer", "document:1")
        .await
        .unwrap();

    let worker = Worker::start(c, 1);
    drained(&wb, 1).await;
    assert_eq!(
        stored(&s).await,
        ["document:1#viewer@user:old0", "document:1#viewer@user:old2"]
    );
    worker.stop().await;
}

#[cfg(feature = "cli")]
async fn hlen(redis: &Redis, key: &str) -> String {
    let r = redis.command(&format!("HLEN {key}")).await;
    r.map(|r| r.trim().to_owned()).unwrap_or_default()
}

/// A worker of a version before the claim lists finishes a job this version
/// queued without deleting its list. `fga-wb sweep` deletes such a list and
/// keeps the list of a job still queued, which then runs as usual.
#[cfg(feature = "cli")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sweep_deletes_claim_lists_an_older_worker_left() {
    let s = new_store("redis-keys-orphan-list").await;
    let redis = Redis::start(RedisOptions::default()).await.unwrap();
    let (c, wb) = queue_app(&s, &redis.url()).await;
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    let jobc = format!("fga-wb:{{{}}}:jobc", s.store_id);
    // What the older worker left: the list of a job it finished.
    let r = redis.command(&format!("HSET {jobc} 424242 x")).await;
    assert_eq!(r.as_deref().map(str::trim), Some(":1"));
    assert_eq!(hlen(&redis, &jobc).await, ":2");

    let mut cli = support::cli::Cli::new(&s, "queue");
    cli.set("FGA_WB_REDIS__URL", &redis.url());
    let run = cli.run(&["--json", "sweep"]).await;
    assert_eq!(run.ok().json()["deleted"], 1, "{run:?}");
    assert_eq!(hlen(&redis, &jobc).await, ":1", "the queued job's list");

    let worker = Worker::start(c, 1);
    drained(&wb, 0).await;
    assert_eq!(stored(&s).await, ["document:1#viewer@user:anne"]);
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_older_versions_left_are_shown_and_swept() {
    let s = new_store("redis-keys-legacy").await;
    let mut redis = Redis::start(RedisOptions::default()).await.unwrap();
    let wb = WriteBehind::builder(redis_config(&s, &redis.url()))
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    // What apalis-redis kept per finished job, under the store's prefix.
    let prefix = format!("fga-wb:{{{}}}", s.store_id);
    for k in ["jobs:fga-wb:meta:1", "jobs:fga-wb:data", "jobs:fga-wb:done"] {
        let r = redis.command(&format!("SET {prefix}:{k} x")).await;
        assert!(r.is_some_and(|r| r.starts_with("+OK")), "SET {k}");
    }
    let before = wb.redis_key_usage().await.unwrap().unwrap();
    assert_eq!(keys_of(&before, "legacy"), 3, "{before:?}");
    assert!(keys_of(&before, "pending") > 0, "{before:?}");

    assert_eq!(wb.sweep_legacy_keys().await.unwrap(), 3);
    let after = wb.redis_key_usage().await.unwrap().unwrap();
    assert_eq!(keys_of(&after, "legacy"), 0, "{after:?}");
    assert_eq!(keys_of(&after, "pending"), keys_of(&before, "pending"));
    assert_eq!(
        wb.pending().await.unwrap().total,
        1,
        "the sweep kept the ops"
    );
    redis.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_that_would_evict_keys_is_refused() {
    let s = new_store("redis-keys-evict").await;
    let redis = Redis::start(RedisOptions::default()).await.unwrap();
    redis
        .command("CONFIG SET maxmemory-policy allkeys-lru")
        .await
        .expect("CONFIG SET");
    let e = refused_at_start(&s, &redis.url(), "a Redis that evicts").await;
    assert!(e.is_config(), "{e}");
    assert!(e.to_string().contains("noeviction"), "{e}");
}

/// A `redis.url` that names a replica is refused at start, naming the
/// fix. Before, it passed the start's read-only probe and every grant then
/// failed with READONLY.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_is_refused() {
    let s = new_store("redis-keys-replica").await;
    let primary = Redis::start(RedisOptions::default()).await.unwrap();
    let replica = Redis::start(RedisOptions::default()).await.unwrap();
    replica
        .command(&format!("REPLICAOF 127.0.0.1 {}", primary.port()))
        .await
        .expect("REPLICAOF");
    let e = refused_at_start(&s, &replica.url(), "a replica").await;
    assert!(e.to_string().contains("is a replica"), "{e}");
}

/// The error of a handle built on the Redis at `url`, which must refuse
/// `what`.
async fn refused_at_start(s: &TestStore, url: &str, what: &str) -> fga_wb::Error {
    match WriteBehind::builder(redis_config(s, url)).build().await {
        Ok(_) => panic!("{what} was not refused"),
        Err(e) => e,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_redis_refuses_ops_with_a_clear_error_and_buffers_nothing() {
    let s = new_store("redis-keys-full").await;
    let redis = Redis::start(RedisOptions::default()).await.unwrap();
    let wb = WriteBehind::builder(redis_config(&s, &redis.url()))
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    redis
        .command("CONFIG SET maxmemory 1")
        .await
        .expect("CONFIG SET");
    let e = wb
        .grant("user:bob", "viewer", "document:1")
        .await
        .expect_err("a full Redis takes no op");
    assert!(e.is_redis() && e.is_transient(), "{e}");
    assert!(e.to_string().contains("Redis is full"), "{e}");
    redis
        .command("CONFIG SET maxmemory 0")
        .await
        .expect("CONFIG SET");
    assert_eq!(
        wb.pending().await.unwrap().total,
        1,
        "bob's grant was not buffered"
    );
    wb.grant("user:bob", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.pending().await.unwrap().total, 2);
}

/// `clear` of a backlog runs in steps of a few hundred keys, so it never
/// holds Redis (and every other process's pushes and checks) for long: a
/// clear of the 1,201 ops acknowledged up to a mark (more than one step),
/// while another task keeps granting, drops exactly those and keeps every
/// op acknowledged after the mark. An unbounded clear meanwhile drops what
/// was acknowledged before it began (of a caller's ops in order: a first
/// run of them) and keeps the rest; the totals stay exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_of_a_backlog_runs_in_steps_and_keeps_later_ops() {
    let s = new_store("wb-clear-steps").await;
    let wb = WriteBehind::builder(redis_config(&s, &support::redis_url()))
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let mut backlog = BTreeSet::new();
    for i in 0..1200 {
        let (user, object) = (format!("user:u{i}"), format!("document:d{}", i / 100));
        wb.grant(&user, "viewer", &object).await.unwrap();
        backlog.insert(format!("{object}#viewer@{user}"));
    }
    wb.revoke("user:u0", "viewer", "document:other")
        .await
        .unwrap();
    backlog.insert("document:other#viewer@user:u0".to_owned());
    let mark = wb.last_acknowledged().await.unwrap();
    let late = |from: usize| {
        let wb = wb.clone();
        tokio::spawn(async move {
            for i in from..from + 300 {
                wb.grant(&format!("user:late{i}"), "viewer", "document:late")
                    .await
                    .unwrap();
            }
        })
    };
    let keys = |ops: Vec<(fga_wb::TupleKey, fga_wb::Op)>| -> Vec<String> {
        ops.iter()
            .map(|(t, _)| format!("{}#{}@{}", t.object, t.relation, t.user))
            .collect()
    };

    let granting = late(0);
    let dropped = keys(wb.clear_ops_up_to(mark).await.unwrap());
    granting.await.unwrap();
    assert_eq!(dropped.len(), 1201, "each dropped once");
    assert_eq!(dropped.into_iter().collect::<BTreeSet<_>>(), backlog);
    assert_eq!(wb.pending().await.unwrap().total, 300, "the late ops kept");

    let granting = late(300);
    let first = keys(wb.clear_ops().await.unwrap());
    granting.await.unwrap();
    let rest = keys(wb.clear_ops().await.unwrap());
    let late_dropped: Vec<usize> = first
        .iter()
        .filter_map(|k| k.strip_prefix("document:late#viewer@user:late"))
        .map(|i| i.parse().unwrap())
        .collect();
    assert!(
        first.len() >= 300 && late_dropped.len() == first.len(),
        "the first 300, and only late ops: {first:?}"
    );
    let mut sorted = late_dropped.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (0..sorted.len()).collect::<Vec<_>>(),
        "acknowledged before the clear began: a first run"
    );
    let all: BTreeSet<&String> = first.iter().chain(&rest).collect();
    assert_eq!(
        (all.len(), first.len() + rest.len()),
        (600, 600),
        "each late op dropped once, by one clear or the other"
    );
    let t = wb.status().await.unwrap().totals;
    assert_eq!((t.acknowledged, t.cleared), (1801, 1801), "{t:?}");
    support::assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}
