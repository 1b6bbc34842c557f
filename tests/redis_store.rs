//! The Redis store against the real Redis and OpenFGA: a buffer shared by
//! several handles (standing in for processes), durable before acknowledging.
#![cfg(feature = "redis")]

mod support;

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fga_wb::config::StoreKind;
use fga_wb::openfga::WriteRequest;
use fga_wb::{Config, WriteBehind};
use support::{config_for, new_store, stored, TestStore};

fn redis_config(s: &TestStore) -> Config {
    let mut c = config_for(s);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.redis.writer_lease = Duration::from_secs(2);
    c.flush.interval = Duration::from_secs(3600);
    c
}

/// A handle on the Redis store of `s`.
async fn redis_handle(s: &TestStore) -> WriteBehind {
    WriteBehind::builder(redis_config(s)).build().await.unwrap()
}

/// A handle on the Redis store of `s` that flushes only when told to.
async fn manual_handle(s: &TestStore) -> WriteBehind {
    WriteBehind::builder(redis_config(s))
        .automatic_flush(false)
        .build()
        .await
        .unwrap()
}

/// Two handles share one buffer: a grant through one is pending for both, is
/// visible to the other's checks, and either can flush it.
#[tokio::test]
async fn handles_share_one_buffer() {
    let s = new_store("redis-shared").await;
    let a = redis_handle(&s).await;
    let b = redis_handle(&s).await;

    a.grant("user:anne", "editor", "document:1").await.unwrap();
    assert_eq!(b.pending().await.unwrap().writes, 1);
    assert!(b.check("user:anne", "viewer", "document:1").await.unwrap());

    let report = b.flush().await.unwrap();
    assert_eq!(report.applied, 1);
    assert_eq!(stored(&s).await, ["document:1#editor@user:anne"]);
    assert_eq!(a.pending().await.unwrap().total, 0);
}

/// A revoke through one handle is never answered "allowed" by the other, even
/// when the other had the positive answer cached.
#[tokio::test]
async fn a_revoke_elsewhere_is_never_stale_allowed() {
    let s = new_store("redis-revoke").await;
    let a = redis_handle(&s).await;
    let b = redis_handle(&s).await;
    a.grant("user:bob", "viewer", "document:2").await.unwrap();
    a.flush().await.unwrap();
    // Cache a positive answer in b.
    assert!(b.check("user:bob", "viewer", "document:2").await.unwrap());
    assert!(b.check("user:bob", "viewer", "document:2").await.unwrap());

    a.revoke("user:bob", "viewer", "document:2").await.unwrap();
    // Immediately, with no wait for pub/sub: b must not answer true.
    match b.check("user:bob", "viewer", "document:2").await {
        Ok(allowed) => assert!(!allowed),
        Err(e) => assert!(e.is_stale_check(), "{e}"),
    }
    a.flush().await.unwrap();
    assert!(stored(&s).await.is_empty());
    assert!(!b.check("user:bob", "viewer", "document:2").await.unwrap());
}

/// Ops acknowledged by a handle that is dropped without shutdown (a crashed
/// process) are still in Redis, and another handle applies them: at once
/// those it had not started writing, and those it was writing once its
/// writer lease ends (`redis.writer_lease`, 2 s here).
#[tokio::test]
async fn acknowledged_ops_survive_the_handle() {
    let s = new_store("redis-durable").await;
    {
        let a = redis_handle(&s).await;
        for i in 0..50 {
            a.grant(&format!("user:u{i}"), "viewer", "document:3")
                .await
                .unwrap();
        }
        a.revoke("user:u0", "viewer", "document:3").await.unwrap();
        // Dropped here without shutdown() or flush().
    }
    let b = redis_handle(&s).await;
    let p = b.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 50, "{p:?}");
    assert_eq!(p.writes, 49, "the grants were not being written yet: {p:?}");
    let mut applied = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        applied += b.flush().await.unwrap().applied;
        let p = b.pending().await.unwrap();
        if p.total + p.in_flight == 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not drained: {p:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(applied <= 50);
    assert_eq!(stored(&s).await.len(), 49);
    let st = b.status().await.unwrap();
    assert_eq!(st.pending.total, 0);
    assert_eq!(
        st.totals.acknowledged,
        st.totals.applied + st.totals.coalesced,
        "{:?}",
        st.totals
    );
}

/// With Redis unreachable, grant fails with a clear, transient error and
/// acknowledges nothing.
#[tokio::test]
async fn redis_down_is_a_clear_error() {
    let s = new_store("redis-down").await;
    let mut c = redis_config(&s);
    let port = support::closed_port();
    c.redis.url = format!("redis://:secretpw@127.0.0.1:{port}");
    let e = match WriteBehind::builder(c).build().await {
        Ok(_) => panic!("built against a closed port"),
        Err(e) => e,
    };
    assert!(e.is_redis() && e.is_transient(), "{e}");
    assert!(!e.to_string().contains("secretpw"), "{e}");
}

/// A flush takes its windows from Redis in several script calls (so no one
/// call holds Redis for long); across them every op is taken once: all are
/// applied, none twice, none left behind.
#[tokio::test]
async fn a_window_taken_in_several_calls_applies_every_op_once() {
    let s = new_store("redis-split-take").await;
    let wb = redis_handle(&s).await;
    let n = 1_700;
    support::grant_spread(&wb, 0..n, 7).await;
    // The flusher may have applied some already (flush.batch_size).
    let report = wb.flush().await.unwrap();
    assert_eq!(report.dead_lettered, 0, "{report:?}");
    assert_eq!(stored(&s).await.len(), n);
    let st = wb.status().await.unwrap();
    assert_eq!(
        st.pending.total + st.pending.in_flight,
        0,
        "{:?}",
        st.pending
    );
    assert_eq!(st.totals.applied, n as u64);
    wb.shutdown().await.unwrap();
}

/// The store's script, called directly to play a writer that was paused for
/// longer than its lease (a process stopped, or starved of CPU) and then
/// goes on: Redis has handed what it was writing to others meanwhile.
struct LateWriter {
    conn: support::RedisConn,
    script: redis::Script,
    prefix: String,
    publish: &'static str,
    name: String,
}

impl LateWriter {
    async fn new(s: &TestStore, name: &str) -> LateWriter {
        LateWriter {
            conn: support::redis_conn().await,
            script: redis::Script::new(include_str!("../src/buffer/redis/store.lua")),
            prefix: format!("fga-wb:{{{}}}", s.store_id),
            publish: if support::redis_is_cluster() {
                "SPUBLISH"
            } else {
                "PUBLISH"
            },
            name: name.to_owned(),
        }
    }

    /// Takes every ready op at `now` with a lease of `lease_ms` (taken a
    /// minute ago with a lease of 1 ms, the lease has long ended). Returns
    /// each key's sequence number.
    async fn take_at(&mut self, now: u64, lease_ms: u64) -> HashMap<String, String> {
        let out: Vec<String> = self
            .script
            .key(&self.prefix)
            .arg(&["take", self.publish])
            .arg(now)
            .arg(100)
            .arg("gr")
            .arg(u64::MAX / 2)
            .arg(&self.name)
            .arg(lease_ms)
            .invoke_async(&mut self.conn)
            .await
            .unwrap();
        out[2..]
            .chunks(5)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect()
    }

    /// Finishes its write of `key` (op `seq`) with `outcome` ("a" applied,
    /// "r" not applied: try again).
    async fn finish(&mut self, key: &str, seq: &str, outcome: &str) {
        let _: Vec<i64> = self
            .script
            .key(&self.prefix)
            .arg(&["finish", self.publish])
            .arg(now_ms())
            .arg(&self.name)
            .arg(&["", "", "0", "", "1"])
            .arg(&[key, seq, outcome, "", "", "1"])
            .invoke_async(&mut self.conn)
            .await
            .unwrap();
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A writer paused past its lease goes on: it finishes writes whose ops
/// Redis handed to another writer, folded into newer ops, or left waiting.
/// Each op still counts once (acknowledged = applied + coalesced), what
/// it did write is not written again, and OpenFGA ends in each tuple's
/// last state.
#[tokio::test]
async fn a_writer_back_from_a_pause_counts_each_op_once() {
    let s = new_store("redis-late-writer").await;
    let b = manual_handle(&s).await;
    let users = ["u1", "u2", "u3", "u4", "u5"];
    for u in users {
        b.grant(&format!("user:{u}"), "viewer", "document:late")
            .await
            .unwrap();
    }
    let key = |u: &str| format!("document:late#viewer@user:{u}");
    let mut a = LateWriter::new(&s, "app:paused").await;
    let seqs = a.take_at(now_ms() - 60_000, 1).await;
    assert_eq!(seqs.len(), 5, "{seqs:?}");
    let seq = |u: &str| seqs[&key(u)].clone();

    // u3's revoke waits behind a's write; then a's lease is found ended:
    // its ops are ready again, and u3's grant is folded into the revoke.
    b.revoke("user:u3", "viewer", "document:late")
        .await
        .unwrap();
    assert_eq!(b.status().await.unwrap().totals.coalesced, 1);
    // u2's grant, ready again, is folded into a revoke.
    b.revoke("user:u2", "viewer", "document:late")
        .await
        .unwrap();

    // a's write of u4 landed; u5's did not.
    let write = WriteRequest::idempotent(vec![support::tuple(&key("u4"))], vec![]);
    s.client.write(&s.store_id, &write).await.unwrap();
    a.finish(&key("u4"), &seq("u4"), "a").await;
    a.finish(&key("u5"), &seq("u5"), "r").await;

    // b writes what is left: u1's and u5's grants, u2's and u3's revokes.
    let report = b.flush().await.unwrap();
    assert_eq!(report.applied, 4, "u4 is written once: {report:?}");
    // a's writes of u1, u2 and u3 land late.
    for u in ["u1", "u2", "u3"] {
        a.finish(&key(u), &seq(u), "a").await;
    }

    let t = b.status().await.unwrap().totals;
    assert_eq!((t.acknowledged, t.applied, t.coalesced), (7, 5, 2), "{t:?}");
    support::assert_accounted(&b).await;
    assert_eq!(stored(&s).await, [key("u1"), key("u4"), key("u5")]);
}

/// A writer whose lease ended while it was paused, and that takes again
/// before anyone else noticed, keeps what it is writing: it is not handed
/// back to itself to be written twice.
#[tokio::test]
async fn a_writer_back_from_a_pause_keeps_what_it_is_writing() {
    let s = new_store("redis-late-taker").await;
    let b = manual_handle(&s).await;
    b.grant("user:anne", "viewer", "document:paused")
        .await
        .unwrap();
    let mut a = LateWriter::new(&s, "app:paused-taker").await;
    assert_eq!(a.take_at(now_ms() - 60_000, 1).await.len(), 1);
    assert!(a.take_at(now_ms(), 60_000).await.is_empty());
    let p = b.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 1), "{p:?}");
}

/// A process whose lease ends while it waits to send a Write again (429,
/// `Retry-After: 3`, from a wiremock OpenFGA) finds, at its next heartbeat,
/// that what it held was handed to another process: it does not send that
/// Write (the other process may have written a newer op on the tuple since),
/// and the other process applies the op, counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_handed_on_during_its_retry_is_not_sent() {
    use support::mock::{manual_flush, mock_config, mock_openfga, write_mock, STORE};
    let server = mock_openfga().await;
    write_mock()
        .respond_with(support::fixture("rate-limited-429").response())
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    write_mock()
        .respond_with(support::fixture("write-ok").response())
        .mount(&server)
        .await;
    let mut c = manual_flush(mock_config(&server));
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.redis.key_prefix = format!("fga-wb-handed-on-{}", now_ms());
    let prefix = format!("{}:{{{STORE}}}", c.redis.key_prefix);
    let writes = || async { support::mock::write_bodies(&server).await.len() };

    let a = WriteBehind::builder(c.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    a.grant("user:anne", "viewer", "document:1").await.unwrap();
    let flushing = tokio::spawn(async move {
        let report = a.flush().await.unwrap();
        (a, report)
    });
    support::eventually("the first Write", Duration::from_secs(10), || async {
        writes().await == 1
    })
    .await;

    // a's lease ends (as if it were paused) and b takes over what it held.
    let mut redis = support::redis_conn().await;
    let owners: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("{prefix}:owners"))
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(owners.len(), 1, "{owners:?}");
    let b = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let watcher = redis.clone();
    let reclaimed = || {
        let mut redis = watcher.clone();
        let stats = format!("{prefix}:stats");
        async move {
            let n: Option<u64> = redis::cmd("HGET")
                .arg(stats)
                .arg("reclaimed")
                .query_async(&mut redis)
                .await
                .unwrap();
            n.unwrap_or(0)
        }
    };
    while reclaimed().await == 0 {
        // a's heartbeat may renew in between: end its lease again.
        let _: () = redis::cmd("ZADD")
            .arg(format!("{prefix}:owners"))
            .arg(0)
            .arg(&owners[0])
            .query_async(&mut redis)
            .await
            .unwrap();
        b.status().await.unwrap();
    }
    let (a, report) = flushing.await.unwrap();
    assert_eq!(
        writes().await,
        1,
        "a sent the Write it no longer held: {report:?}"
    );
    // From here a is a live writer again, in a new term: either process
    // may write the op, once.
    a.shutdown().await.unwrap();
    b.flush().await.unwrap();
    assert_eq!(writes().await, 2);
    let t = b.status().await.unwrap().totals;
    assert_eq!((t.acknowledged, t.applied), (1, 1), "{t:?}");
    support::assert_accounted(&b).await;
}
