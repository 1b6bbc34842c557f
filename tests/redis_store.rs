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
    // What a handle dropped mid-write held comes back a hold after its
    // lease: short here.
    c.flush.unknown_outcome_hold = Duration::from_secs(1);
    c.flush.interval = Duration::from_secs(3600);
    c
}

/// A handle on the Redis store of `s`.
async fn redis_handle(s: &TestStore) -> WriteBehind {
    WriteBehind::builder(redis_config(s)).build().await.unwrap()
}

/// A handle on the Redis store of `s` that flushes only when told to.
async fn manual_handle(s: &TestStore) -> WriteBehind {
    manual_with(redis_config(s)).await
}

/// A handle configured by `c` that flushes only when told to.
async fn manual_with(c: Config) -> WriteBehind {
    WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap()
}

/// A check waiting for a revoke that another process writes, while this
/// process's subscription to store events is lost (its connection
/// killed): the message that the revoke was written goes unheard, and once
/// subscribed again the check looks again and answers. Before, nothing
/// woke it, and it failed closed at its 30 s wait. A Redis of its own:
/// the kill ends every subscription on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_waiting_while_events_were_lost_looks_again() {
    let s = new_store("redis-events-lost").await;
    let redis = testenv::Redis::start(testenv::RedisOptions::default())
        .await
        .unwrap();
    support::write_to_openfga(&s, "user:anne", "viewer", "document:1").await;
    let mut c = redis_config(&s);
    c.redis.url = redis.url();
    let writer = manual_with(c.clone()).await;
    c.flush.eager_revokes = false;
    c.check.revoke_wait_timeout = Duration::from_secs(30);
    let waiting = manual_with(c).await;
    waiting
        .revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    let check = tokio::spawn({
        let waiting = waiting.clone();
        async move { waiting.check("user:anne", "viewer", "document:1").await }
    });
    // Killed once the check waits, then the revoke written at once: the
    // subscription comes back a second later.
    let limit = std::time::Instant::now() + Duration::from_secs(20);
    while waiting.local_totals().read_waits == 0 {
        assert!(!check.is_finished(), "the check did not wait");
        assert!(std::time::Instant::now() < limit, "the check did not wait");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Both handles' subscriptions.
    loop {
        let list = redis.command("CLIENT LIST TYPE pubsub").await;
        if list.is_some_and(|l| l.matches("cmd=").count() == 2) {
            break;
        }
        assert!(std::time::Instant::now() < limit, "not subscribed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let killed = redis.command("CLIENT KILL TYPE pubsub").await;
    assert_eq!(killed.as_deref().map(str::trim), Some(":2"));
    assert_eq!(writer.flush().await.unwrap().applied, 1);
    let answer = check.await.unwrap();
    assert!(matches!(answer, Ok(false)), "{answer:?}");
}

/// A primary demoted in place while the address fga-wb knows now leads to
/// the new one (a managed Redis's endpoint or a DNS name after a failover;
/// here a proxy): the old connection answers READONLY to every write, and
/// fga-wb connects again, so grants go through with no restart and nothing
/// acknowledged is lost. Before, every grant failed until the process
/// restarted (redis-rs reconnects only after an I/O error).
#[tokio::test]
async fn a_primary_demoted_behind_its_address_is_left_for_the_new_one() {
    let s = new_store("redis-demoted").await;
    let [old, new] = two_redis().await;
    let proxy = testenv::SwitchProxy::start(&format!("127.0.0.1:{}", old.port()))
        .await
        .unwrap();
    let mut c = redis_config(&s);
    c.redis.url = format!("redis://{}", proxy.addr());
    let wb = manual_with(c).await;
    wb.grant("user:anne", "viewer", "document:moved")
        .await
        .unwrap();
    // The failover: the new primary copies the old one, takes over, the
    // old one follows it, and the address leads to the new one.
    new.command(&format!("REPLICAOF 127.0.0.1 {}", old.port()))
        .await
        .unwrap();
    let ops = format!("fga-wb:{{{}}}:ops", s.store_id);
    support::eventually("the copy", Duration::from_secs(20), || async {
        let info = new.command("INFO replication").await.unwrap_or_default();
        let copied = new.command(&format!("HLEN {ops}")).await;
        info.contains("master_link_status:up") && copied.as_deref().map(str::trim) == Some(":1")
    })
    .await;
    take_over(&old, &new).await;
    proxy.switch_to(&format!("127.0.0.1:{}", new.port()));

    support::eventually("a grant", Duration::from_secs(30), || async {
        wb.grant("user:bob", "viewer", "document:moved")
            .await
            .is_ok()
    })
    .await;
    wb.flush().await.unwrap();
    assert_eq!(
        stored(&s).await,
        [
            "document:moved#viewer@user:anne",
            "document:moved#viewer@user:bob"
        ]
    );
    support::assert_accounted(&wb).await;
}

/// Two Redis servers of the test's own.
async fn two_redis() -> [testenv::Redis; 2] {
    let start = || async {
        testenv::Redis::start(testenv::RedisOptions::default())
            .await
            .unwrap()
    };
    [start().await, start().await]
}

/// `new` takes over from `old` as a failover does: primary, with `old`
/// demoted to its replica.
async fn take_over(old: &testenv::Redis, new: &testenv::Redis) {
    new.command("REPLICAOF NO ONE").await.unwrap();
    old.command(&format!("REPLICAOF 127.0.0.1 {}", new.port()))
        .await
        .unwrap();
}

/// The same demotion behind an address that does not follow it (it still
/// leads to the old primary, now a replica): grants fail with a transient
/// error (the replica refuses the push script before it runs), and the
/// connections made again back off
/// (after 1 s, then 2 s, 4 s...) rather than follow every READONLY. A
/// loop would make one per heartbeat retry, every 100 ms per connection.
#[tokio::test]
async fn a_primary_demoted_where_the_address_stays_is_not_hammered() {
    let s = new_store("redis-demoted-stays").await;
    let [old, new] = two_redis().await;
    let mut c = redis_config(&s);
    c.redis.url = old.url();
    let wb = manual_with(c).await;
    take_over(&old, &new).await;
    let connections = || async {
        let info = old.command("INFO stats").await.unwrap_or_default();
        let n = info
            .lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse::<u64>().ok());
        n.expect("INFO stats")
    };
    let before = connections().await;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let e = wb
            .grant("user:anne", "viewer", "document:stays")
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each of the store's two connections: at most one a second at first,
    // and INFO's own (one a call here).
    let made = connections().await - before;
    assert!(made < 20, "{made} connections in 5 s");
}

/// `redis.wait_replicas` on a Redis with no replica (every `WAIT` times
/// out): with `fewer_replicas = "accept"` a grant is acknowledged after
/// the wait; with `"fail"` it fails with a transient error that says the
/// op is buffered all the same, and calling again is safe: each op is
/// pending once and written once.
#[tokio::test]
async fn wait_replicas_accept_and_fail_act_as_configured() {
    use fga_wb::config::FewerReplicas;
    let s = new_store("redis-wait-replicas").await;
    let mut c = redis_config(&s);
    c.redis.wait_replicas = 1;
    c.redis.wait_timeout = Duration::from_millis(50);
    let accept = manual_with(c.clone()).await;
    accept
        .grant("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    c.redis.fewer_replicas = FewerReplicas::Fail;
    let fail = manual_with(c).await;
    for _ in 0..2 {
        let e = fail
            .grant("user:bob", "viewer", "document:1")
            .await
            .unwrap_err();
        assert!(e.is_transient(), "{e}");
        assert!(e.to_string().contains("0 of 1 replicas confirmed"), "{e}");
        assert!(e.to_string().contains("calling again is safe"), "{e}");
    }
    assert_eq!(accept.pending().await.unwrap().total, 2);
    assert_eq!(accept.flush().await.unwrap().applied, 2);
    let mut got = stored(&s).await;
    got.sort();
    assert_eq!(
        got,
        ["document:1#viewer@user:anne", "document:1#viewer@user:bob"]
    );
}

/// A relation name leaves the store's count of buffered ops by relation
/// (which every Read lists) once no op is buffered under it. Revokes are
/// not checked against the model, so an application can pass relation
/// names of any kind. Before, each left its fields in the count for good.
#[tokio::test]
async fn relation_names_no_longer_buffered_are_let_go() {
    let s = new_store("redis-rel-names").await;
    let wb = manual_handle(&s).await;
    for i in 0..200 {
        wb.revoke("user:anne", &format!("r{i}"), "document:1")
            .await
            .unwrap();
    }
    let mark = wb.last_acknowledged().await.unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.clear_ops_up_to(mark).await.unwrap().len(), 200);
    let fields: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("fga-wb:{{{}}}:rel", s.store_id))
        .query_async(&mut support::redis_conn().await)
        .await
        .unwrap();
    assert_eq!(fields, ["document#viewer|g"]);
}

/// The record of recent writes in Redis is bounded. Per object (a bulk
/// import writes more distinct objects in its two minutes than it keeps):
/// past 262,144 objects the oldest marks go, and from then on a check on
/// any one object counts as after a recent write (fresh answers, never
/// stale ones). Per relation (revokes are not checked against the model,
/// so their relations can be anything): past 4,096, those written longer
/// ago than it remembers go. Before, both grew with every one written.
#[tokio::test]
async fn the_writes_remembered_in_redis_are_bounded() {
    const KEPT: usize = 262_144;
    let s = new_store("redis-written-bound").await;
    let wb = manual_handle(&s).await;
    let prefix = format!("fga-wb:{{{}}}", s.store_id);
    let mut redis = support::redis_conn().await;
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().applied, 1);
    // The store's start counts as a write to everything: put it past.
    let now = now_ms();
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}:written"))
        .arg("*")
        .arg(now - 300_000)
        .query_async(&mut redis)
        .await
        .unwrap();
    let fresh_checks = || wb.local_totals().higher_consistency;
    let before = fresh_checks();
    assert!(!wb
        .check("user:zed", "viewer", "document:other")
        .await
        .unwrap());
    assert_eq!(fresh_checks(), before, "no write on document:other yet");

    // As many objects written within the last minute as it keeps.
    for part in (0..KEPT).collect::<Vec<_>>().chunks(10_000) {
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(format!("{prefix}:wobj"));
        for i in part {
            zadd.arg(now).arg(format!("document:bulk-{i}#viewer"));
        }
        let _: () = zadd.query_async(&mut redis).await.unwrap();
    }
    // And more relations than it keeps, written long ago.
    let mut hset = redis::cmd("HSET");
    hset.arg(format!("{prefix}:written"));
    for i in 0..5_000 {
        hset.arg(format!("document#old{i}")).arg(now - 300_000);
    }
    let _: () = hset.query_async(&mut redis).await.unwrap();
    wb.grant("user:anne", "viewer", "document:2").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().applied, 1);
    let rels: usize = redis::cmd("HLEN")
        .arg(format!("{prefix}:written"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(rels < 10, "{rels} relations kept");
    let kept: usize = redis::cmd("ZCARD")
        .arg(format!("{prefix}:wobj"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(kept <= KEPT, "{kept} objects kept");
    let before = fresh_checks();
    assert!(!wb
        .check("user:zed", "viewer", "document:other")
        .await
        .unwrap());
    assert_eq!(fresh_checks(), before + 1, "its mark may have gone");
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}:wobj"))
        .query_async(&mut redis)
        .await
        .unwrap();
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
    /// The term its last take answered.
    term: String,
    /// The `flush.unknown_outcome_hold` it records with a new term (ms; 0:
    /// none).
    hold_ms: u64,
}

impl LateWriter {
    async fn new(s: &TestStore, name: &str) -> LateWriter {
        LateWriter {
            conn: support::redis_conn().await,
            script: redis::Script::new(include_str!("../src/buffer/redis/store.lua")),
            prefix: format!("fga-wb:{{{}}}", s.store_id),
            publish: publish_command(),
            name: name.to_owned(),
            term: String::new(),
            hold_ms: 0,
        }
    }

    /// Takes every ready op at `now` with a lease of `lease_ms` (taken a
    /// minute ago with a lease of 1 ms, the lease has long ended). Returns
    /// each key's sequence number.
    async fn take_at(&mut self, now: u64, lease_ms: u64) -> HashMap<String, String> {
        self.try_take_at(now, lease_ms).await.unwrap()
    }

    /// `take_at`, with Redis's error if the call fails.
    async fn try_take_at(
        &mut self,
        now: u64,
        lease_ms: u64,
    ) -> redis::RedisResult<HashMap<String, String>> {
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
            .arg("")
            .arg(self.hold_ms)
            .invoke_async(&mut self.conn)
            .await?;
        self.term = out[1].clone();
        Ok(out[2..]
            .chunks(5)
            .map(|c| (c[0].clone(), c[1].clone()))
            .collect())
    }

    /// The place in line (`first`) of `key`'s entry, and when it became
    /// pending (`since`).
    async fn place(&mut self, key: &str) -> Vec<String> {
        let e: String = self.on_key("HGET", "ops", &[key]).await;
        e.split('|').skip(1).take(2).map(str::to_owned).collect()
    }

    /// Replays every letter that died of transient causes, as a worker.
    async fn replay_all(&mut self) {
        let replayed: Vec<redis::Value> = self
            .script
            .key(&self.prefix)
            .arg(&["replay", self.publish])
            .arg(now_ms())
            .arg(1000)
            .arg(&["1", "*"])
            .invoke_async(&mut self.conn)
            .await
            .unwrap();
        assert_eq!(replayed[0], redis::Value::Int(1), "{replayed:?}");
    }

    /// Runs `cmd` on the store's key `P:<key>` with `args`: what a test
    /// reads or breaks in Redis.
    async fn on_key<T: redis::FromRedisValue>(&mut self, cmd: &str, key: &str, args: &[&str]) -> T {
        redis::cmd(cmd)
            .arg(format!("{}:{key}", self.prefix))
            .arg(args)
            .query_async(&mut self.conn)
            .await
            .unwrap()
    }

    /// Fetches due jobs at `now` with a lease of `lease_ms`, as a worker:
    /// each job's id and its ops' keys and seqs.
    async fn fetch_at(&mut self, now: u64, lease_ms: u64) -> Vec<(String, Vec<(String, String)>)> {
        self.try_fetch_at(now, lease_ms).await.unwrap()
    }

    /// A heartbeat at `now` from a writer that knows the store's epoch as
    /// `known` and acknowledged ops up to `acked`: whether it recorded a
    /// loss.
    async fn heartbeat_at(&mut self, now: u64, known: &str, acked: u64) -> bool {
        let out: Vec<redis::Value> = self
            .script
            .key(&self.prefix)
            .arg(&["heartbeat", self.publish])
            .arg(now)
            .arg(&self.name)
            .arg(60_000)
            .arg(known)
            .arg(acked)
            .invoke_async(&mut self.conn)
            .await
            .unwrap();
        out.get(4) == Some(&redis::Value::Int(1))
    }

    /// Asks for its strays, naming the keys or jobs (`mode`) it holds:
    /// the ops and jobs given back.
    async fn strays(&mut self, mode: &str, held: &[&str]) -> Vec<i64> {
        self.script
            .key(&self.prefix)
            .arg(&["strays", self.publish])
            .arg(now_ms())
            .arg(&self.name)
            .arg(mode)
            .arg(held)
            .invoke_async(&mut self.conn)
            .await
            .unwrap()
    }

    /// `fetch_at`, with Redis's error if the call fails.
    async fn try_fetch_at(
        &mut self,
        now: u64,
        lease_ms: u64,
    ) -> redis::RedisResult<Vec<(String, Vec<(String, String)>)>> {
        let out: Vec<String> = self
            .script
            .key(&self.prefix)
            .arg(&["fetch", self.publish])
            .arg(now)
            .arg(&self.name)
            .arg(lease_ms)
            .arg(10)
            .invoke_async(&mut self.conn)
            .await?;
        self.term = out[1].clone();
        Ok(out[2..]
            .chunks(3)
            .map(|c| {
                let job: serde_json::Value = serde_json::from_str(&c[1]).unwrap();
                let ops = job["ops"].as_array().unwrap().iter();
                let ops =
                    ops.map(|o| (o["key"].as_str().unwrap().to_owned(), o["seq"].to_string()));
                (job["id"].to_string(), ops.collect())
            })
            .collect())
    }

    /// Pushes op `op` ("g" or "r") on `key` as this writer, with the
    /// call's `[id, oldest open id]` (or none): the call's answer.
    async fn push_call(&mut self, key: &str, op: &str, call: &[&str]) -> Vec<String> {
        self.script
            .key(&self.prefix)
            .arg(&["push", self.publish])
            .arg(now_ms())
            .arg(&["1000", "1", key, op, ""])
            .arg(&self.name)
            .arg(call)
            .invoke_async(&mut self.conn)
            .await
            .unwrap()
    }

    /// Finishes its write of `key` (op `seq`) with `outcome` ("a" applied,
    /// "r" not applied: try again), as a writer before finish ids and terms.
    async fn finish(&mut self, key: &str, seq: &str, outcome: &str) {
        self.finish_call(key, seq, outcome, &[]).await;
    }

    /// The same, with the call's `[id, oldest open id, term]` (or none);
    /// returns its answer (applied, dead, requeued, superseded).
    async fn finish_call(
        &mut self,
        key: &str,
        seq: &str,
        outcome: &str,
        call: &[&str],
    ) -> Vec<i64> {
        self.finish_job("", key, seq, outcome, call).await
    }

    /// A finish as a worker ends job `job` ("done").
    async fn finish_job(
        &mut self,
        job: &str,
        key: &str,
        seq: &str,
        outcome: &str,
        call: &[&str],
    ) -> Vec<i64> {
        let action = if job.is_empty() { "" } else { "done" };
        self.script
            .key(&self.prefix)
            .arg(&["finish", self.publish])
            .arg(now_ms())
            .arg(&self.name)
            .arg(&[job, action, "0", "", "1"])
            .arg(&[key, seq, outcome, "", "", "1"])
            .arg(call)
            .invoke_async(&mut self.conn)
            .await
            .unwrap()
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

/// A writer with a long lease whose last heartbeat is older than heartbeats
/// are kept, and whose lease has just ended with a key still taken: another
/// writer's heartbeat does not prune its hold before the key is taken
/// back, so the key is held over, not handed on at once (a late Write of
/// the dead writer could land over the newer op). Before, the prune
/// dropped the hold.
#[tokio::test]
async fn a_heartbeat_keeps_the_hold_of_a_writer_that_still_holds_keys() {
    let s = new_store("redis-hold-pruned").await;
    let b = manual_handle(&s).await;
    b.grant("user:a", "viewer", "document:held").await.unwrap();
    let mut a = LateWriter::new(&s, "app:long-lease").await;
    a.hold_ms = 120_000;
    // Taken eleven minutes ago with a lease of ten and a half: it ended
    // half a minute ago, and its hold runs a minute and a half more.
    let took = now_ms() - 660_000;
    assert_eq!(a.take_at(took, 630_000).await.len(), 1);
    let beat = took.to_string();
    let _: () = a.on_key("HSET", "beats", &[&a.name.clone(), &beat]).await;
    let mut other = LateWriter::new(&s, "app:other").await;
    other.heartbeat_at(now_ms(), "", 0).await;
    let held = b.status().await.unwrap().held_over;
    assert_eq!(held.map(|h| h.writers), Some(1), "handed on at once");
    b.clear().await.unwrap();
}

/// A writer whose lease ends while it holds keys (a crash, with a Write
/// perhaps under way) keeps them for its recorded hold past its lease's
/// end: the newer op waits, checks count its op in flight, and `status`
/// shows it held over. Once it renews it carries on in the same term. A
/// writer whose hold has passed by the time its lease is found ended, and
/// one that stopped keeping its lease to an end (`release` with an end),
/// are handed back at once: no second hold.
#[tokio::test]
async fn a_writer_whose_lease_ends_while_it_writes_is_held_for_its_hold() {
    let s = new_store("redis-held-over").await;
    let b = manual_handle(&s).await;
    let key = |u: &str| format!("document:held#viewer@user:{u}");
    let held = |b: &WriteBehind| {
        let b = b.clone();
        async move { b.status().await.unwrap().held_over }
    };
    let in_flight = |b: &WriteBehind| {
        let b = b.clone();
        async move { b.pending().await.unwrap().in_flight }
    };
    b.grant("user:a", "viewer", "document:held").await.unwrap();
    let mut a = LateWriter::new(&s, "app:held").await;
    a.hold_ms = 120_000;
    // Its lease (1 ms) ended a minute ago; its hold runs a minute more.
    assert_eq!(a.take_at(now_ms() - 60_000, 1).await.len(), 1);
    let term = a.term.clone();
    b.revoke("user:a", "viewer", "document:held").await.unwrap();
    let p = b.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (1, 1), "the revoke waits: {p:?}");
    let h = held(&b).await.expect("a held over");
    assert_eq!(h.writers, 1);
    assert!(
        h.until > std::time::SystemTime::now() + Duration::from_secs(30),
        "{h:?}"
    );
    // Denied, or failed closed while the revoke waits.
    assert!(!matches!(
        b.check("user:a", "viewer", "document:held").await,
        Ok(true)
    ));
    // Back: same term, no longer held over, still writing its op.
    assert!(a.take_at(now_ms(), 60_000).await.is_empty());
    assert_eq!(a.term, term);
    assert_eq!(held(&b).await, None);
    assert_eq!(in_flight(&b).await, 1);

    // Its hold passed before anyone found its lease ended: handed back.
    b.grant("user:c", "viewer", "document:held").await.unwrap();
    let mut c = LateWriter::new(&s, "app:held-long-ago").await;
    c.hold_ms = 120_000;
    assert_eq!(c.take_at(now_ms() - 200_000, 1).await[&key("c")], "3");
    assert_eq!(in_flight(&b).await, 1, "c's op is pending again");
    assert_eq!(held(&b).await, None);

    // A stop that keeps its lease to an end drops its hold: handed back
    // when that end passes, not a hold later.
    b.grant("user:d", "viewer", "document:held").await.unwrap();
    let mut d = LateWriter::new(&s, "app:held-stopped").await;
    d.hold_ms = 120_000;
    let mut taken = d.take_at(now_ms() - 60_000, 1).await;
    assert!(taken.remove(&key("d")).is_some(), "{taken:?}");
    let released: i64 = d
        .script
        .key(&d.prefix)
        .arg(&["release", d.publish])
        .arg(now_ms())
        .arg(&d.name)
        .arg(now_ms() - 1_000)
        .invoke_async(&mut d.conn)
        .await
        .unwrap();
    assert_eq!(released, 0);
    assert_eq!(in_flight(&b).await, 1, "d's op is pending again");
    assert_eq!(held(&b).await, None);
    b.shutdown().await.unwrap();
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

/// A finish that says an op its writer still holds was found superseded
/// when claimed (as after its own replay that stored a job and failed
/// before the rest) makes the op ready again: another writer writes it at
/// once. Before, it stayed held and left the writer's set, so nothing
/// ever handed it back or wrote it.
#[tokio::test]
async fn an_op_found_superseded_while_held_is_ready_again() {
    let s = new_store("redis-stale-held").await;
    let b = manual_handle(&s).await;
    b.grant("user:anne", "viewer", "document:held")
        .await
        .unwrap();
    let mut w = LateWriter::new(&s, "app:stale-held").await;
    let taken = w.take_at(now_ms(), 60_000).await;
    let (key, seq) = taken.iter().next().expect("one op taken");
    w.finish(key, seq, "s").await;
    let held: bool = w.on_key("SISMEMBER", "w:app:stale-held", &[key]).await;
    assert!(!held, "{key} is no longer the writer's");
    assert_eq!(b.flush().await.unwrap().applied, 1);
    assert_eq!(stored(&s).await, std::slice::from_ref(key));
}

/// A process whose lease ends while it waits to send a Write again (429,
/// `Retry-After: 2`, from a wiremock OpenFGA: a quick retry's longest wait;
/// a longer one ends the request, see `tests/transient.rs`) finds, at its
/// next heartbeat,
/// that what it held was handed to another process: it does not send that
/// Write (the other process may have written a newer op on the tuple since),
/// and the other process applies the op, counted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_handed_on_during_its_retry_is_not_sent() {
    use support::mock::{manual_flush, mock_config, mock_openfga, write_mock, STORE};
    let server = mock_openfga().await;
    write_mock()
        .respond_with(
            support::fixture("rate-limited-429")
                .response()
                .insert_header("Retry-After", "2"),
        )
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
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while reclaimed().await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "a's ops were never handed on"
        );
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

/// A finish whose reply was lost, repeated with its id after its ops were
/// taken again, answers what the first call did and ends nothing again: the
/// op it made ready, and that the writer is now writing again, stays in
/// flight (a plain repeat made it ready a second time, for another writer
/// to write alongside).
#[tokio::test]
async fn a_repeated_finish_answers_what_the_first_did() {
    let s = new_store("redis-finish-repeat").await;
    let b = manual_handle(&s).await;
    b.grant("user:anne", "viewer", "document:repeat")
        .await
        .unwrap();
    let key = "document:repeat#viewer@user:anne";
    let mut a = LateWriter::new(&s, "app:repeater").await;
    let seq = a.take_at(now_ms(), 60_000).await[key].clone();
    let term = a.term.clone();
    let first = a.finish_call(key, &seq, "r", &["7", "7", &term]).await;
    assert_eq!(first, [0, 0, 1, 0], "the op is ready again");
    assert_eq!(a.take_at(now_ms(), 60_000).await[key], seq, "taken again");

    let repeat = a.finish_call(key, &seq, "r", &["7", "7", &term]).await;
    assert_eq!(repeat, first, "the repeat answers what the first did");
    let p = b.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 1), "still being written: {p:?}");
    // Its next call (oldest open id 8) drops the answer: a repeat of 7
    // would now run again.
    let next = a.finish_call(key, &seq, "a", &["8", "8", &term]).await;
    assert_eq!(next, [1, 0, 0, 0]);
    let kept: Vec<String> = a.on_key("ZRANGE", "fin:app:repeater", &["0", "-1"]).await;
    assert_eq!(kept, ["8|1|0|0|0"]);
}

/// A push whose reply was lost, sent again with its id (as a Redis Cluster
/// client does after a dropped connection) once another process revoked
/// the tuple, answers what the first did and does not run again: the
/// revoke stays the tuple's last word and the grant is counted once. A
/// second run folded the older grant over the revoke, and OpenFGA got the
/// tuple. A handle's own pushes carry ids on a cluster only.
#[tokio::test]
async fn a_push_sent_again_answers_what_the_first_did() {
    let s = new_store("redis-push-again").await;
    let b = manual_handle(&s).await;
    let mut a = LateWriter::new(&s, "app:pusher").await;
    let key = "document:again#viewer@user:anne";
    let first = a.push_call(key, "g", &["1", "1"]).await;
    assert_eq!(first.len(), 4, "{first:?}");
    b.revoke("user:anne", "viewer", "document:again")
        .await
        .unwrap();
    let again = a.push_call(key, "g", &["1", "1"]).await;
    assert_eq!(again, first, "the repeat answers what the first did");
    let acks: Option<String> = a.on_key("HGET", "acks", &["app:pusher"]).await;
    assert_eq!(acks.as_deref(), Some("1"), "a's grant is counted once");
    assert_eq!(b.status().await.unwrap().totals.acknowledged, 2);
    b.flush().await.unwrap();
    assert_eq!(
        support::stored(&s).await,
        Vec::<String>::new(),
        "the revoke was the last word"
    );
    // Its next call (oldest open id 2) drops the first's answer.
    a.push_call("document:again#viewer@user:bob", "g", &["2", "2"])
        .await;
    let kept: Vec<String> = a.on_key("ZRANGE", "push:app:pusher", &["0", "-1"]).await;
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(kept[0].starts_with("2|"), "{kept:?}");

    // b's own grant: its push keeps an answer on a cluster only.
    b.grant("user:carl", "viewer", "document:again")
        .await
        .unwrap();
    let owners: Vec<String> = a.on_key("ZRANGE", "owners", &["0", "-1"]).await;
    let mut kept_by_b = 0;
    for w in owners.iter().filter(|w| *w != "app:pusher") {
        let n: usize = a.on_key("ZCARD", &format!("push:{w}"), &[]).await;
        kept_by_b += n;
    }
    let expected = usize::from(support::redis_is_cluster());
    assert_eq!(kept_by_b, expected, "answers kept for b's pushes");
}

/// What `flush --wait` waits for (`unfinished`): the ops acknowledged up
/// to a mark, wherever they go (pending, folded into a newer op, being
/// written, written with a newer op blocked behind, dead of transient
/// causes and replayed, held by a queued job and by the worker running
/// it), and none acknowledged after it.
#[tokio::test]
async fn unfinished_follows_the_ops_acknowledged_before_a_mark() {
    let s = new_store("redis-unfinished").await;
    let b = manual_handle(&s).await;
    let left = |mark| {
        let b = b.clone();
        async move {
            let u = b.unfinished(mark).await.unwrap();
            (u.ops, u.transient_letters)
        }
    };
    for doc in ["document:u1", "document:u2", "document:u3"] {
        b.grant("user:anne", "viewer", doc).await.unwrap();
    }
    let mark = b.last_acknowledged().await.unwrap();
    b.grant("user:anne", "viewer", "document:u4").await.unwrap();
    assert_eq!(left(mark).await, (3, 0));
    // Folded into a newer op, it keeps its place in line.
    b.revoke("user:anne", "viewer", "document:u1")
        .await
        .unwrap();
    assert_eq!(left(mark).await, (3, 0));
    assert_eq!(left(b.last_acknowledged().await.unwrap()).await, (4, 0));

    let mut w = LateWriter::new(&s, "app:unfinished").await;
    let taken = w.take_at(now_ms(), 60_000).await;
    assert_eq!(taken.len(), 4);
    let key = |doc: &str| format!("document:{doc}#viewer@user:anne");
    assert_eq!(left(mark).await, (1, 0), "being written");
    // u3's place in line, and when it became pending.
    let u3_place = w.place(&key("u3")).await;
    // A newer op on u2 waits behind u2's write.
    b.revoke("user:anne", "viewer", "document:u2")
        .await
        .unwrap();
    for (doc, outcome) in [("u1", "a"), ("u4", "a"), ("u3", "D")] {
        w.finish(&key(doc), &taken[&key(doc)], outcome).await;
    }
    assert_eq!(
        left(mark).await,
        (1, 0),
        "u2 being written (letters count once no op is left)"
    );
    w.finish(&key("u2"), &taken[&key("u2")], "a").await;
    // As an older version left it: the letter not indexed, among (here)
    // 5,000 ids, looked at 2,000 a look; meanwhile something is left, not
    // a letter (none is known to have died yet).
    let _: i64 = w.on_key("DEL", "deadcur", &[]).await;
    let _: i64 = w.on_key("DEL", "deadcur:v", &[]).await;
    let _: () = w.on_key("SET", "deadseq", &["5000"]).await;
    assert_eq!(left(mark).await, (1, 0), "ids 1 to 2000 looked at");
    assert_eq!(left(mark).await, (1, 0), "ids to 4000");
    assert_eq!(
        left(mark).await,
        (0, 1),
        "u3 dead; u2's newer revoke is not waited for"
    );
    // The same with the letter counter moved 2^32 ahead, as after a loss
    // (recorded by an older version, or with letters left): the walk ends
    // at the highest letter id, not 2^32 ids later (2000 a look: days).
    let _: i64 = w.on_key("DEL", "deadcur", &[]).await;
    let _: i64 = w.on_key("DEL", "deadcur:v", &[]).await;
    let _: () = w.on_key("SET", "deadseq", &["4294972296"]).await;
    assert_eq!(left(mark).await, (0, 1), "at once");
    // Replayed, u3's grant is still the op acknowledged before the mark:
    // in line where it was, pending since it was (the oldest op's age).
    w.replay_all().await;
    assert_eq!(left(mark).await, (1, 0));
    assert_eq!(w.place(&key("u3")).await, u3_place);
    // Dead again and replayed again: still that op.
    let again = w.take_at(now_ms(), 60_000).await;
    assert_eq!(again.len(), 2, "u3's grant and u2's revoke: {again:?}");
    w.finish(&key("u3"), &again[&key("u3")], "D").await;
    w.finish(&key("u2"), &again[&key("u2")], "a").await;
    assert_eq!(left(mark).await, (0, 1));
    w.replay_all().await;
    assert_eq!(left(mark).await, (1, 0));
    assert_eq!(w.place(&key("u3")).await, u3_place);
    b.flush().await.unwrap();
    assert_eq!(left(mark).await, (0, 0));
    assert_eq!(stored(&s).await, [key("u3")]);

    // In queue mode: held by a queued job, then by the worker running it.
    let app = one_queued_job(&s, "document:u5").await;
    let mark = app.last_acknowledged().await.unwrap();
    assert_eq!(left(mark).await, (1, 0), "queued");
    let mut worker = LateWriter::new(&s, "worker:unfinished").await;
    let jobs = worker.fetch_at(now_ms(), 60_000).await;
    let (job, ops) = &jobs[0];
    assert_eq!(left(mark).await, (1, 0), "running");
    // A job an older version queued is not in P:jobmin: still found, also
    // when one an older version ended is still listed.
    let _: i64 = worker.on_key("DEL", "jobmin", &[]).await;
    assert_eq!(left(mark).await, (1, 0), "running, not indexed");
    let _: i64 = worker.on_key("ZADD", "jobmin", &["0", "999999"]).await;
    assert_eq!(
        left(mark).await,
        (1, 0),
        "running, not indexed, one gone listed"
    );
    let listed: Vec<String> = worker.on_key("ZRANGE", "jobmin", &["0", "-1"]).await;
    assert!(listed.is_empty(), "the gone one is taken out: {listed:?}");
    worker.finish_job(job, &ops[0].0, &ops[0].1, "a", &[]).await;
    assert_eq!(left(mark).await, (0, 0));
}

/// A manual handle on `s` with anne's grant as viewer of `object`, taken by
/// writer `name` whose lease then ended and was found so by the handle: the
/// op is ready again. Returns the handle, the writer and the op's seq.
async fn taken_by_a_lapsed_writer(
    s: &TestStore,
    object: &str,
    name: &str,
) -> (WriteBehind, LateWriter, String) {
    let b = manual_handle(s).await;
    b.grant("user:anne", "viewer", object).await.unwrap();
    let mut a = LateWriter::new(s, name).await;
    let seq = a.take_at(now_ms() - 60_000, 1).await[&format!("{object}#viewer@user:anne")].clone();
    b.status().await.unwrap();
    (b, a, seq)
}

/// A reclaim whose call fails part way (here the take that runs it meets
/// a key of another type) leaves the lapsed writer's op to the next
/// reclaim: Redis keeps what a failed script wrote, and the reclaim had
/// already dropped the writer's lease and set while the op's move back to
/// ready was lost with the call, so the op stayed taken for good.
#[tokio::test]
async fn a_failed_reclaim_leaves_the_lapsed_writers_op_to_the_next() {
    let s = new_store("redis-failed-reclaim").await;
    let b = manual_handle(&s).await;
    b.grant("user:anne", "viewer", "document:reclaim")
        .await
        .unwrap();
    // Nothing else may reclaim meanwhile (dropped, it writes nothing).
    drop(b);
    let mut a = LateWriter::new(&s, "app:lapsed").await;
    let key = "document:reclaim#viewer@user:anne";
    assert!(a.take_at(now_ms() - 60_000, 1).await.contains_key(key));
    let _: i64 = a.on_key("HSET", "ready:g", &["not", "a zset"]).await;
    let mut next = LateWriter::new(&s, "app:next").await;
    assert!(next.try_take_at(now_ms(), 60_000).await.is_err());
    let _: i64 = a.on_key("DEL", "ready:g", &[]).await;
    let taken = next.take_at(now_ms(), 60_000).await;
    assert!(taken.contains_key(key), "{taken:?}");
}

/// A queue-mode handle on `s` that flushes only when asked.
async fn queue_app(s: &TestStore) -> WriteBehind {
    let mut c = redis_config(s);
    c.flush.mode = fga_wb::config::Mode::Queue;
    WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap()
}

/// A manual queue-mode handle on `s` that queued one job: anne's grant as
/// viewer of `object`.
async fn one_queued_job(s: &TestStore, object: &str) -> WriteBehind {
    let app = queue_app(s).await;
    app.grant("user:anne", "viewer", object).await.unwrap();
    assert_eq!(app.flush().await.unwrap().queued, 1);
    app
}

/// A process that acknowledged ops before it learnt the store's epoch (its
/// first heartbeat failed) still compares its counter: Redis below it lost
/// them. The script compared only with a known epoch, and the process then
/// took Redis's lower counter for its own.
#[tokio::test]
async fn a_heartbeat_without_an_epoch_still_finds_a_lost_counter() {
    let s = new_store("redis-no-epoch").await;
    let wb = manual_handle(&s).await;
    wb.grant("user:anne", "viewer", "document:epoch")
        .await
        .unwrap();
    let mut w = LateWriter::new(&s, "app:no-epoch").await;
    assert!(!w.heartbeat_at(now_ms(), "", 1).await, "Redis has seq 1");
    assert!(w.heartbeat_at(now_ms(), "", 5).await, "Redis lost 2 to 5");
    drop(wb);
}

/// A revoke that died of transient causes and is owed behind a newer op on
/// its tuple (written if that op is refused for good) is an op left for
/// `flush --wait`, also when the newer op came after the mark: the revoke
/// was acknowledged before it. Before, its letter was skipped (its tuple
/// has an entry) and the newer op was past the mark: nothing was left.
#[tokio::test]
async fn an_owed_revoke_behind_a_newer_op_is_left_before_the_mark() {
    let s = new_store("redis-owed-unfinished").await;
    let b = manual_handle(&s).await;
    b.revoke("user:anne", "viewer", "document:owed")
        .await
        .unwrap();
    let key = "document:owed#viewer@user:anne";
    let mut w = LateWriter::new(&s, "app:owed").await;
    let taken = w.take_at(now_ms(), 60_000).await;
    w.finish(key, &taken[key], "D").await;
    let mark = b.last_acknowledged().await.unwrap();
    let left = || async {
        let u = b.unfinished(mark).await.unwrap();
        (u.ops, u.transient_letters)
    };
    assert_eq!(left().await, (0, 1), "the revoke's letter");
    b.grant("user:anne", "viewer", "document:owed")
        .await
        .unwrap();
    assert_eq!(left().await, (1, 0), "owed behind the newer op");
}

/// After Redis lost acknowledged ops, the sequence numbers it hands out
/// next are not ones it handed out before: a writer still writing an op of
/// the lost history would otherwise finish a new op that got the same
/// number on the same key, and drop it unwritten.
#[tokio::test]
async fn after_a_loss_sequence_numbers_are_not_reused() {
    let s = new_store("redis-loss-seq").await;
    let wb = manual_handle(&s).await;
    wb.grant("user:anne", "viewer", "document:loss-seq")
        .await
        .unwrap();
    let key = "document:loss-seq#viewer@user:anne";
    let mut a = LateWriter::new(&s, "app:before-loss").await;
    let seq = a.take_at(now_ms(), 60_000).await[key].clone();
    // Redis goes back to before the grant (a failover to a replica behind),
    // and a heartbeat of the process that acknowledged it records the loss.
    let _: i64 = a.on_key("HDEL", "ops", &[key]).await;
    let _: () = a.on_key("SET", "seq", &["0"]).await;
    let mut b = LateWriter::new(&s, "app:acknowledged").await;
    assert!(
        b.heartbeat_at(now_ms(), "", 1).await,
        "the loss is recorded"
    );
    wb.revoke("user:anne", "viewer", "document:loss-seq")
        .await
        .unwrap();
    // The old write lands and its writer finishes it.
    a.finish_call(key, &seq, "a", &[]).await;
    let p = wb.pending().await.unwrap();
    assert_eq!(p.deletes, 1, "the revoke after the loss is pending: {p:?}");
}

/// A fetch whose call fails part way (here the worker's set of jobs holds
/// another type) leaves the job queued: it was taken off the queue first,
/// and left running under a worker whose set did not list it, so no
/// reclaim would ever queue it again.
#[tokio::test]
async fn a_failed_fetch_leaves_the_job_queued() {
    let s = new_store("redis-failed-fetch").await;
    let _app = one_queued_job(&s, "document:fetch").await;
    let mut w = LateWriter::new(&s, "worker:broken").await;
    let _: () = w.on_key("SET", "wj:worker:broken", &["not a set"]).await;
    assert!(w.try_fetch_at(now_ms(), 60_000).await.is_err());
    let _: i64 = w.on_key("DEL", "wj:worker:broken", &[]).await;
    assert_eq!(w.fetch_at(now_ms(), 60_000).await.len(), 1, "the job");
}

/// A writer's finish sent in a term that has ended (its lease ended, what
/// it held was handed back, and it took the same op again in a new term)
/// ends nothing it now holds: that is the new term's write.
#[tokio::test]
async fn a_finish_from_an_earlier_term_leaves_the_new_terms_write() {
    let s = new_store("redis-finish-term").await;
    let (b, mut a, seq) = taken_by_a_lapsed_writer(&s, "document:term", "app:two-terms").await;
    let key = "document:term#viewer@user:anne";
    let old_term = a.term.clone();
    let p = b.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (1, 0), "handed back: {p:?}");
    assert_eq!(a.take_at(now_ms(), 60_000).await[key], seq);
    assert_ne!(a.term, old_term, "a new term");

    let late = a.finish_call(key, &seq, "r", &["1", "1", &old_term]).await;
    assert_eq!(late, [0, 0, 0, 0], "ends nothing");
    let p = b.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 1), "still being written: {p:?}");
}

/// A write of an older op that lands late (its writer was paused) does not
/// hide a newer revoke's dead letter: the revoke died of transient causes,
/// OpenFGA holds the grant the late write wrote, and checks fail closed
/// until the revoke is replayed. Before, the late write marked the letter
/// superseded and the check answered "allowed".
#[tokio::test]
async fn a_late_write_does_not_hide_a_newer_dead_revoke() {
    let s = new_store("redis-late-letter").await;
    let (b, mut a, grant) =
        taken_by_a_lapsed_writer(&s, "document:late-letter", "app:late-grant").await;
    let key = "document:late-letter#viewer@user:anne";
    // The grant, handed back, is folded into a revoke that another writer
    // takes and gives up as transient.
    b.revoke("user:anne", "viewer", "document:late-letter")
        .await
        .unwrap();
    let mut c = LateWriter::new(&s, "app:gives-up").await;
    let revoke = c.take_at(now_ms(), 60_000).await[key].clone();
    assert!(revoke.parse::<u64>().unwrap() > grant.parse::<u64>().unwrap());
    let term = c.term.clone();
    assert_eq!(
        c.finish_call(key, &revoke, "D", &["1", "1", &term]).await,
        [0, 1, 0, 0]
    );

    // a's write of the grant lands late.
    support::write_to_openfga(&s, "user:anne", "viewer", "document:late-letter").await;
    a.finish(key, &grant, "a").await;

    let e = b
        .check("user:anne", "viewer", "document:late-letter")
        .await
        .expect_err("the revoke is dead, OpenFGA holds the grant");
    assert!(e.is_stale_check(), "{e}");
    let r = b.replay_dead_letters(None).await.unwrap();
    assert_eq!(r.replayed, 1, "the letter is current: {r:?}");
    b.flush().await.unwrap();
    assert!(!b
        .check("user:anne", "viewer", "document:late-letter")
        .await
        .unwrap());
}

/// A writer back from a pause whose first renewal fails (`:termseq` holds
/// data fga-wb did not write) is left no lease by it: once the counter is
/// mended, its next call brings a new term, not the one whose ops were
/// handed on. Before, the failed call left it a lease, and the next call
/// read its old term back: it would have written ops others had written
/// since.
#[tokio::test]
async fn a_failed_renewal_leaves_no_lease_with_an_old_term() {
    let s = new_store("redis-failed-renewal").await;
    let (b, mut a, _) = taken_by_a_lapsed_writer(&s, "document:renew", "app:renews").await;
    let old_term = a.term.clone();
    let _: () = a.on_key("SET", "termseq", &["not a number"]).await;
    let e = a.try_take_at(now_ms(), 60_000).await.unwrap_err();
    assert!(e.to_string().contains(":termseq"), "{e}");
    let lease: Option<f64> = a.on_key("ZSCORE", "owners", &["app:renews"]).await;
    assert_eq!(lease, None, "the failed call left a lease");
    let _: () = a.on_key("SET", "termseq", &["1000000"]).await;
    a.take_at(now_ms(), 60_000).await;
    assert_ne!(a.term, old_term, "a new term");
    drop(b);
}

/// A worker whose lease ended while it ran a job (it was paused) and that
/// then finishes it, while another worker runs the job again, ends neither
/// the job nor its ops: the other worker is writing them. Before, the late
/// finish deleted the job and dropped its ops from under the other worker.
#[tokio::test]
async fn a_late_workers_finish_leaves_a_job_another_worker_runs() {
    let s = new_store("redis-late-worker").await;
    let _app = one_queued_job(&s, "document:job").await;

    let mut a = LateWriter::new(&s, "worker:paused").await;
    let now = now_ms();
    let jobs = a.fetch_at(now, 1).await;
    let (job, ops) = jobs.first().expect("a's job").clone();
    let term = a.term.clone();
    // b finds a's lease ended: the job goes back to the queue, and b runs it.
    let mut b = LateWriter::new(&s, "worker:next").await;
    // Far enough ahead that a reclaim by anyone else since (requeueing the
    // job at their time) is due too.
    assert_eq!(
        b.fetch_at(now + 60_000, 60_000).await.first().map(|j| &j.0),
        Some(&job)
    );

    let (key, seq) = &ops[0];
    let late = a.finish_job(&job, key, seq, "a", &["1", "1", &term]).await;
    assert_eq!(late, [0, 0, 0, 0], "ends nothing");
    let runner: Option<String> = a.on_key("HGET", "jobrun", &[&job]).await;
    assert_eq!(runner.as_deref(), Some("worker:next"), "the job is b's");
    let held: bool = a.on_key("HEXISTS", "ops", &[key]).await;
    assert!(held, "its op is still held by the job");
}

/// A finish that Redis refuses for a moment (it is full: maxmemory) is
/// repeated until it is recorded: a Write fails (a 500 from a wiremock
/// OpenFGA), Redis refuses to make its op pending again, then accepts; the
/// op is pending again and the next flush writes it. Before, the op stayed
/// in flight, held by a live writer, until that process stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_redis_refuses_for_a_moment_is_repeated_until_recorded() {
    let failing = support::fixture("server-error-500").response();
    let (wb, report, _redis) = finish_while_redis_is_full(failing).await;
    // The flush reports the failed Write (or, if its next take met the
    // full Redis first, that); the op is pending again, not left taken.
    assert!(report.error.is_some(), "{report:?}");
    support::eventually("the op pending again", Duration::from_secs(20), || async {
        let p = wb.pending().await.unwrap();
        (p.total, p.in_flight) == (1, 0)
    })
    .await;
    assert_eq!(wb.flush().await.unwrap().applied, 1);
    support::assert_accounted(&wb).await;
}

/// So is one that dead-letters the op (OpenFGA refused it): the letter's
/// id is the script's first write, and Redis's refusal of it is "Redis is
/// full", transient. Before, the script took any failure of that counter
/// for a key fga-wb did not write ("remove it"), the finish was not
/// repeated, and the op stayed in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_that_dead_letters_redis_refuses_for_a_moment_is_repeated() {
    let refused = support::fixture("write-unknown-type").response();
    let (wb, _report, _redis) = finish_while_redis_is_full(refused).await;
    support::eventually("the op dead-lettered", Duration::from_secs(20), || async {
        let p = wb.pending().await.unwrap();
        (p.total, p.in_flight) == (0, 0) && wb.dead_letters().await.unwrap().len() == 1
    })
    .await;
    support::assert_accounted(&wb).await;
}

/// Grants one op on a Redis of its own (every other test's writes would be
/// refused too) and flushes it; its Write gets `failing` a second late,
/// after Redis was made full (maxmemory), so the finish that records the
/// outcome is refused, at least three times, before Redis takes writes
/// again. Returns the handle and the flush's report.
async fn finish_while_redis_is_full(
    failing: wiremock::ResponseTemplate,
) -> (WriteBehind, fga_wb::FlushReport, testenv::Redis) {
    use support::mock::{
        flush_until_a_write_arrives, manual_flush, mock_config, mock_openfga, no_quick_retries,
        reporting_write, write_mock,
    };
    use testenv::{Redis, RedisOptions};
    let server = mock_openfga().await;
    // Held long enough for the test to make Redis refuse writes first.
    let failing = failing.set_delay(Duration::from_secs(1));
    let mut arrivals = reporting_write(&server, failing, Some(1)).await;
    write_mock()
        .respond_with(support::fixture("write-ok").response())
        .mount(&server)
        .await;
    let redis = Redis::start(RedisOptions::default()).await.unwrap();
    let mut c = no_quick_retries(manual_flush(mock_config(&server)));
    c.buffer.store = StoreKind::Redis;
    c.redis.url = redis.url();
    // No heartbeat in the window: what Redis refuses is the finish.
    c.redis.writer_lease = Duration::from_secs(60);
    let wb = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let client = redis::Client::open(redis.url()).unwrap();
    let admin = client.get_multiplexed_async_connection().await.unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let flushing = flush_until_a_write_arrives(&wb, &mut arrivals).await;

    let query = |args: &'static [&'static str]| {
        let mut admin = admin.clone();
        async move {
            let v: String = redis::cmd(args[0])
                .arg(&args[1..])
                .query_async(&mut admin)
                .await
                .unwrap();
            v
        }
    };
    query(&["CONFIG", "SET", "maxmemory", "1"]).await;
    support::eventually("finishes refused", Duration::from_secs(20), || async {
        oom_errors(&query(&["INFO", "errorstats"]).await) >= 3
    })
    .await;
    let p = wb.pending().await.unwrap();
    assert_eq!(p.in_flight, 1, "{p:?}");
    query(&["CONFIG", "SET", "maxmemory", "0"]).await;
    let report = flushing.await.unwrap().unwrap();
    (wb, report, redis)
}

/// OOM errors Redis has answered, from `INFO errorstats`.
fn oom_errors(info: &str) -> u64 {
    info.lines()
        .find_map(|l| l.strip_prefix("errorstat_OOM:count="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Redis loses its data (here FLUSHALL; a restart without persistence
/// alike) and counts terms from scratch. A writer that renews first after
/// that, while it had a higher term than Redis now draws, still writes
/// what it takes: its new term is above the one it had. Before, it kept
/// the higher term, took every op as not its own, and wrote nothing until
/// it restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_writes_after_redis_lost_its_terms() {
    use testenv::{Redis, RedisOptions};
    let s = new_store("redis-terms-lost").await;
    let redis = Redis::start(RedisOptions::default()).await.unwrap();
    let mut c = redis_config(&s);
    c.redis.url = redis.url();
    // No heartbeat during the test: the take is the first renewal.
    c.redis.writer_lease = Duration::from_secs(60);
    let first = WriteBehind::builder(c.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let second = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let flushed = redis.command("FLUSHALL").await;
    assert!(flushed.is_some_and(|r| r.starts_with("+OK")));

    second
        .grant("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    let r = second.flush().await.unwrap();
    assert_eq!(r.applied, 1, "{r:?}");
    let p = second.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 0), "{p:?}");
    drop(first);
}

/// The one writer of `kind` (`app`, `tool`, `worker`) Redis knows for the store of
/// `late`, once it has renewed its lease.
async fn live_writer(late: &mut LateWriter, kind: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let owners: Vec<String> = late.on_key("ZRANGE", "owners", &["0", "-1"]).await;
        let mine: Vec<&String> = owners
            .iter()
            .filter(|w| w.starts_with(&format!("{kind}:")))
            .collect();
        if let [one] = mine.as_slice() {
            return (*one).clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no single live {kind} writer: {owners:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A take whose reply is lost (the connection dropped, or the call timed
/// out, after Redis ran it) leaves ops Redis names a live process as
/// writing, though the process never got them; a newer op on one of them
/// (a revoke) waits behind that write. The process gives them back:
/// flush() writes them, the revoke folded with its grant, and nothing
/// stays in flight. Before, they stayed in flight until the process
/// stopped, and flush() waited 30 s for the revoke and gave up with an
/// error.
#[tokio::test]
async fn ops_a_lost_take_reply_left_with_a_live_process_are_written() {
    let s = new_store("redis-lost-take").await;
    let wb = manual_handle(&s).await;
    support::grant_users(&wb, "document:lost", 0..30).await;
    let mut late = LateWriter::new(&s, "").await;
    // A handle that flushes only when told is a `tool` writer.
    late.name = live_writer(&mut late, "tool").await;
    // The take as the process's own call would make it, its reply lost.
    let taken = late.take_at(now_ms(), 60_000).await;
    assert_eq!(taken.len(), 30);
    wb.revoke("user:u0", "viewer", "document:lost")
        .await
        .unwrap();
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (1, 30), "{p:?}");

    let report = wb.flush().await.unwrap();
    assert_eq!(report.error, None, "{report:?}");
    let mut expected: Vec<String> = (1..30)
        .map(|i| format!("document:lost#viewer@user:u{i}"))
        .collect();
    expected.sort();
    assert_eq!(stored(&s).await, expected);
    let st = wb.status().await.unwrap();
    assert_eq!(
        (st.pending.total, st.pending.in_flight),
        (0, 0),
        "{:?}",
        st.pending
    );
    let t = &st.totals;
    assert_eq!(t.acknowledged, 31, "{t:?}");
    assert_eq!(t.applied + t.coalesced, 31, "each op counted once: {t:?}");
    wb.shutdown().await.unwrap();
}

/// A handle on the Redis store of `s`, flushing only when told to, whose
/// Redis (one of its own: its connections are cut) is behind a proxy that
/// can lose one answer: one node, or a cluster of one node that names the
/// proxy as its address.
struct BehindACut {
    wb: WriteBehind,
    proxy: testenv::CutProxy,
    _node: Option<testenv::Redis>,
    _cluster: Option<testenv::RedisCluster>,
}

impl BehindACut {
    async fn new(s: &TestStore) -> BehindACut {
        let redis = testenv::Redis::start(testenv::RedisOptions::default())
            .await
            .unwrap();
        let proxy = testenv::CutProxy::start(&format!("127.0.0.1:{}", redis.port()))
            .await
            .unwrap();
        let url = format!("redis://{}", proxy.addr());
        BehindACut::connect(s, url, proxy, Some(redis), None).await
    }

    async fn cluster(s: &TestStore) -> BehindACut {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cluster = testenv::RedisCluster::one_node(port).await.unwrap();
        let node = format!("127.0.0.1:{}", cluster.nodes()[0].port());
        let proxy = testenv::CutProxy::serve(listener, &node).unwrap();
        let url = format!("redis+cluster://{}", proxy.addr());
        BehindACut::connect(s, url, proxy, None, Some(cluster)).await
    }

    async fn connect(
        s: &TestStore,
        url: String,
        proxy: testenv::CutProxy,
        node: Option<testenv::Redis>,
        cluster: Option<testenv::RedisCluster>,
    ) -> BehindACut {
        let mut c = redis_config(s);
        c.redis.url = url;
        // What a lost answer left stays this live process's: only its own
        // look for strays gives it back.
        c.redis.writer_lease = Duration::from_secs(60);
        let wb = WriteBehind::builder(c)
            .automatic_flush(false)
            .build()
            .await
            .unwrap();
        BehindACut {
            wb,
            proxy,
            _node: node,
            _cluster: cluster,
        }
    }
}

/// The same as the test above, through the process's own calls: its take
/// runs in Redis and the connection is cut before the answer comes back
/// (`testenv::CutProxy`). The flush() that met the cut says so; the next
/// one gives the ops back (the failed take counts as unsure) and writes
/// them all, each counted once.
#[tokio::test]
async fn a_take_whose_answer_is_cut_off_is_written_by_the_next_flush() {
    let s = new_store("redis-cut-take").await;
    let cut = BehindACut::new(&s).await;
    let wb = &cut.wb;
    support::grant_users(wb, "document:cut", 0..30).await;
    cut.proxy.cut_after(b"$4\r\ntake\r\n", 1);
    let first = wb.flush().await.unwrap();
    assert_eq!(cut.proxy.cuts(), 1);
    assert!(first.error.is_some(), "{first:?}");
    assert_eq!(first.applied, 0, "{first:?}");
    // The take ran: Redis names this process as writing all 30.
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 30), "{p:?}");

    let second = wb.flush().await.unwrap();
    assert_eq!(second.error, None, "{second:?}");
    assert_eq!(second.applied, 30, "{second:?}");
    written_once(&s, wb, 30).await;
}

/// The `n` ops are in OpenFGA, nothing is pending or in flight, and each
/// was counted acknowledged and applied once; then `wb` shuts down.
async fn written_once(s: &TestStore, wb: &WriteBehind, n: u64) {
    assert_eq!(stored(s).await.len() as u64, n);
    let st = wb.status().await.unwrap();
    assert_eq!(
        (st.pending.total, st.pending.in_flight),
        (0, 0),
        "{:?}",
        st.pending
    );
    let t = &st.totals;
    assert_eq!((t.acknowledged, t.applied), (n, n), "{t:?}");
    wb.shutdown().await.unwrap();
}

/// A take is several script calls (500 ops each); when one after the
/// first loses its answer, the flush writes what the earlier calls took,
/// and, since the failed call may have run, waits for a look for strays
/// that gives back what it took: the one flush() writes every op, with no
/// error. Before the failed call counted as unsure, the flush could
/// report success with the lost call's ops not written.
#[tokio::test]
async fn a_take_cut_off_part_way_is_written_by_the_same_flush() {
    let s = new_store("redis-cut-take-later").await;
    take_cut_off_part_way(&s, BehindACut::new(&s).await).await;
}

/// The same on a Redis Cluster, whose client sends a call again on a new
/// connection when the first one's answer was lost: the call succeeds,
/// though its first run took ops too. A dropped connection counts as
/// unsure, so the flush waits for the look that gives those back. Before,
/// it reported success with 100 of the 600 ops not written.
#[tokio::test]
async fn a_take_the_cluster_client_sent_again_is_written_by_the_same_flush() {
    let s = new_store("redis-cut-take-cluster").await;
    take_cut_off_part_way(&s, BehindACut::cluster(&s).await).await;
}

async fn take_cut_off_part_way(s: &TestStore, cut: BehindACut) {
    let wb = &cut.wb;
    support::grant_users(wb, "document:cut", 0..600).await;
    cut.proxy.cut_after(b"$4\r\ntake\r\n", 2);
    let r = wb.flush().await.unwrap();
    assert_eq!(cut.proxy.cuts(), 1);
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!(r.applied, 600, "{r:?}");
    assert_eq!(stored(s).await.len(), 600);
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 0), "{p:?}");
    wb.shutdown().await.unwrap();
}

/// A finish that Redis ran but whose answer was cut off is repeated on a
/// new connection and recognised as done: the flush() that met the cut
/// succeeds, and each op is counted applied once.
#[tokio::test]
async fn a_finish_whose_answer_is_cut_off_counts_once() {
    let s = new_store("redis-cut-finish").await;
    let cut = BehindACut::new(&s).await;
    let wb = &cut.wb;
    support::grant_users(wb, "document:cut", 0..30).await;
    cut.proxy.cut_after(b"$6\r\nfinish\r\n", 1);
    let r = wb.flush().await.unwrap();
    assert_eq!(cut.proxy.cuts(), 1);
    assert_eq!(r.error, None, "{r:?}");
    assert_eq!(r.applied, 30, "{r:?}");
    written_once(&s, wb, 30).await;
}

/// A push that Redis ran but whose answer was cut off is sent again by the
/// cluster client on a new connection and recognised as done: the grant is
/// acknowledged and counted once. Before, it ran twice (counted twice, and
/// folded over whatever another process pushed on the tuple in between).
#[tokio::test]
async fn a_push_the_cluster_client_sent_again_counts_once() {
    let s = new_store("redis-cut-push-cluster").await;
    let cut = BehindACut::cluster(&s).await;
    let wb = &cut.wb;
    cut.proxy.cut_after(b"$4\r\npush\r\n", 1);
    wb.grant("user:anne", "viewer", "document:cut")
        .await
        .unwrap();
    assert_eq!(cut.proxy.cuts(), 1);
    let t = wb.status().await.unwrap().totals;
    assert_eq!((t.acknowledged, t.coalesced), (1, 0), "{t:?}");
    wb.flush().await.unwrap();
    written_once(&s, wb, 1).await;
}

/// A clear step that Redis ran but whose answer was cut off, sent again by
/// the cluster client: the clear still lists every op it dropped (the
/// operator's only record of them). Before, the repeat found nothing left
/// to drop and the clear listed none of the 30.
#[tokio::test]
async fn a_clear_step_the_cluster_client_sent_again_lists_what_it_dropped() {
    let s = new_store("redis-cut-clear-cluster").await;
    let cut = BehindACut::cluster(&s).await;
    let wb = &cut.wb;
    support::grant_users(wb, "document:cut", 0..30).await;
    cut.proxy.cut_after(b"$5\r\nclear\r\n", 1);
    let dropped = wb.clear_ops().await.unwrap();
    assert_eq!(cut.proxy.cuts(), 1);
    assert_eq!(dropped.len(), 30);
    assert_eq!(wb.status().await.unwrap().totals.cleared, 30);
}

/// A fetch whose reply is lost leaves a job Redis names a live worker as
/// running, though the worker never got it (here the worker is stopped
/// with SIGSTOP while the lost fetch happens, so the job is not fetched
/// for real first). Once the worker holds nothing it puts the job back in
/// the queue and runs it: `fga-wb flush --wait` ends with every op
/// written. Before, the job stayed "running" until the worker stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_a_lost_fetch_reply_left_with_a_live_worker_runs() {
    let s = new_store("redis-lost-fetch").await;
    let mut c = redis_config(&s);
    c.flush.mode = fga_wb::config::Mode::Queue;
    c.redis.writer_lease = Duration::from_secs(30);
    let wb = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let cli = support::cli::Cli::new(&s, "queue");
    let mut worker = cli
        .command(&["worker"])
        .env("FGA_WB_REDIS__WRITER_LEASE", "30s")
        .spawn()
        .expect("start a worker");
    let pid = worker.id().expect("worker pid");
    let mut late = LateWriter::new(&s, "").await;
    late.name = live_writer(&mut late, "worker").await;
    assert!(late.name.contains(&format!("-{pid}-")), "{}", late.name);

    support::signal(pid, testenv::Signal::Stop);
    support::grant_users(&wb, "document:fetched", 0..20).await;
    assert_eq!(wb.flush().await.unwrap().queued, 20);
    let jobs = late.fetch_at(now_ms(), 60_000).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    support::signal(pid, testenv::Signal::Cont);

    let r = cli
        .run(&["flush", "--wait", "--timeout", "40s", "--json"])
        .await;
    r.ok();
    assert_eq!(stored(&s).await.len(), 20, "{}", r.stdout);
    let j = r.json();
    assert_eq!(j["pending"]["in_flight"], 0, "{j:#}");
    worker.start_kill().expect("stop the worker");
    wb.shutdown().await.unwrap();
}

/// A worker busy with a job whose Write never ends (OpenFGA hung, here a
/// wiremock OpenFGA holding Writes of `document:slow`; every other Write
/// answers as OpenFGA does) still gets back a job a lost fetch reply left
/// with it, and runs it. Before, a worker looked for strays only while it
/// ran no job, so the job waited as long as the hung one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_worker_runs_a_job_a_lost_fetch_left_with_it() {
    use wiremock::matchers::{body_string_contains, method, path};
    use wiremock::{Mock, MockServer};
    let s = new_store("redis-busy-stray").await;
    let openfga = MockServer::start().await;
    let model = support::fixture("read-model").for_model(&s.model_id);
    Mock::given(method("GET"))
        .and(path(format!(
            "/stores/{}/authorization-models/{}",
            s.store_id, s.model_id
        )))
        .respond_with(model.response())
        .mount(&openfga)
        .await;
    let write = format!("/stores/{}/write", s.store_id);
    let (arrived, mut hung) = tokio::sync::mpsc::unbounded_channel();
    let held = support::fixture("hung-write")
        .response()
        .set_delay(Duration::from_secs(600));
    Mock::given(method("POST"))
        .and(path(write.clone()))
        .and(body_string_contains("document:slow"))
        .respond_with(move |_: &wiremock::Request| {
            let _ = arrived.send(());
            held.clone()
        })
        .with_priority(1)
        .mount(&openfga)
        .await;
    Mock::given(method("POST"))
        .and(path(write))
        .respond_with(support::fixture("write-ok").response())
        .mount(&openfga)
        .await;

    let app = queue_app(&s).await;
    let mut cli = support::cli::Cli::new(&s, "queue");
    cli.set("FGA_API_URL", &openfga.uri());
    cli.set("FGA_WB_OPENFGA__REQUEST_TIMEOUT", "600s");
    cli.set("FGA_WB_REDIS__WRITER_LEASE", "30s");
    let mut worker = cli.command(&["worker"]).spawn().expect("start a worker");
    let pid = worker.id().expect("worker pid");
    let mut late = LateWriter::new(&s, "").await;
    late.name = live_writer(&mut late, "worker").await;

    app.grant("user:anne", "viewer", "document:slow")
        .await
        .unwrap();
    assert_eq!(app.flush().await.unwrap().queued, 1);
    tokio::time::timeout(Duration::from_secs(30), hung.recv())
        .await
        .expect("the worker writes the slow job");

    support::signal(pid, testenv::Signal::Stop);
    support::grant_users(&app, "document:lost", 0..5).await;
    assert_eq!(app.flush().await.unwrap().queued, 5);
    let jobs = late.fetch_at(now_ms(), 60_000).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    support::signal(pid, testenv::Signal::Cont);

    // Only the hung job's op stays in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let p = app.pending().await.unwrap();
        if (p.total, p.in_flight) == (0, 1) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lost job is still out while the worker is busy: {p:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The running job was named, not handed back and fetched again.
    assert!(hung.try_recv().is_err(), "the hung job was written twice");
    worker.start_kill().expect("stop the worker");
    app.shutdown().await.unwrap();
}

/// A stray job that lists the very op a running job lists (a copy, as an
/// enqueue that failed part way can leave): the op blocked behind it stays
/// blocked, as the running job is writing that op.
#[tokio::test]
async fn strays_with_jobs_keeps_what_waits_behind_a_running_copy() {
    let s = new_store("redis-strays-copy").await;
    let app = one_queued_job(&s, "document:copy").await;
    let mut w = LateWriter::new(&s, "worker:copy").await;
    let ids: Vec<String> = w.on_key("ZRANGE", "jobq", &["0", "-1"]).await;
    let [runs] = ids.as_slice() else {
        panic!("one job: {ids:?}")
    };
    for hash in ["jobs", "jobc"] {
        let v: String = w.on_key("HGET", hash, &[runs]).await;
        let _: i64 = w.on_key("HSET", hash, &["copy", &v]).await;
    }
    let _: i64 = w.on_key("ZADD", "jobq", &["0", "copy"]).await;
    assert_eq!(w.fetch_at(now_ms(), 60_000).await.len(), 2);
    app.revoke("user:anne", "viewer", "document:copy")
        .await
        .unwrap();
    let key = "document:copy#viewer@user:anne";
    let answer = w.strays("jobs", &[runs]).await;
    assert_eq!(answer, [0, 1], "the copy back, no op");
    let at: Option<f64> = w.on_key("ZSCORE", "blocked", &[key]).await;
    assert!(at.is_some(), "the revoke waits behind the running job");
    let queued: Option<f64> = w.on_key("ZSCORE", "jobq", &["copy"]).await;
    assert!(queued.is_some(), "the copy is queued again");
    app.shutdown().await.unwrap();
}

/// Ops Redis names a worker as writing itself (a replay's take whose reply
/// was lost) go back with the jobs mode too, while the worker runs a job;
/// a newer op blocked behind one of them is ready, the lost op folded
/// into it.
#[tokio::test]
async fn strays_with_jobs_gives_back_ops_the_worker_took() {
    let s = new_store("redis-strays-took").await;
    let app = one_queued_job(&s, "document:running").await;
    let mut w = LateWriter::new(&s, "worker:took").await;
    let jobs = w.fetch_at(now_ms(), 60_000).await;
    let [(runs, _)] = jobs.as_slice() else {
        panic!("one job: {jobs:?}")
    };
    support::grant_users(&app, "document:took", 0..3).await;
    assert_eq!(w.take_at(now_ms(), 60_000).await.len(), 3);
    app.revoke("user:u0", "viewer", "document:took")
        .await
        .unwrap();
    let stat = |v: Option<i64>| v.unwrap_or(0);
    let reclaimed = stat(w.on_key("HGET", "stats", &["reclaimed"]).await);
    let coalesced = stat(w.on_key("HGET", "stats", &["coalesced"]).await);
    let answer = w.strays("jobs", &[runs]).await;
    assert_eq!(answer, [3, 0], "the ops back, no job");
    let p = app.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (3, 1), "{p:?}");
    let blocked: Option<f64> = w
        .on_key("ZSCORE", "blocked", &["document:took#viewer@user:u0"])
        .await;
    assert_eq!(blocked, None, "the revoke is ready");
    let now_reclaimed = stat(w.on_key("HGET", "stats", &["reclaimed"]).await);
    let now_coalesced = stat(w.on_key("HGET", "stats", &["coalesced"]).await);
    assert_eq!(now_reclaimed - reclaimed, 3);
    assert_eq!(now_coalesced - coalesced, 1, "the lost grant folded");
    app.shutdown().await.unwrap();
}

/// `strays` with keys gives back only the ops of those keys that Redis
/// names the writer as writing (what the flusher does not hold), and
/// leaves the writer's other ops being written: they are its own.
#[tokio::test]
async fn strays_with_keys_gives_back_only_those() {
    let s = new_store("redis-strays-keys").await;
    let wb = manual_handle(&s).await;
    support::grant_users(&wb, "document:sk", 0..3).await;
    let mut w = LateWriter::new(&s, "app:strays-keys").await;
    let taken = w.take_at(now_ms(), 60_000).await;
    assert_eq!(taken.len(), 3);
    let answer = w.strays("keys", &["document:sk#viewer@user:u1"]).await;
    assert_eq!(answer, [1, 0]);
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (1, 2), "{p:?}");
    let members: Vec<String> = w.on_key("SMEMBERS", &format!("w:{}", w.name), &[]).await;
    assert_eq!(members.len(), 2, "{members:?}");
    assert!(!members.contains(&"document:sk#viewer@user:u1".to_owned()));
    wb.shutdown().await.unwrap();
}

/// `strays` with the jobs a worker runs puts back in the queue only the
/// other jobs Redis names it as running (a fetch whose reply was lost),
/// and makes ready the op blocked behind theirs. Ops blocked behind a job
/// it runs stay blocked: `document:runs`, and `document:shared`, which the
/// lost job also lists, at an older op that a newer one, now in the
/// running job, superseded. Before, a worker looked only while it ran no
/// job, and a busy worker's stray job waited for its backlog to end.
#[tokio::test]
async fn strays_with_jobs_gives_back_only_the_others() {
    let s = new_store("redis-strays-jobs").await;
    let app = queue_app(&s).await;
    for object in ["document:lost", "document:shared"] {
        app.grant("user:anne", "viewer", object).await.unwrap();
    }
    assert_eq!(app.flush().await.unwrap().queued, 2);
    app.revoke("user:anne", "viewer", "document:shared")
        .await
        .unwrap();
    app.grant("user:anne", "viewer", "document:runs")
        .await
        .unwrap();
    assert_eq!(app.flush().await.unwrap().queued, 2);
    let mut w = LateWriter::new(&s, "worker:busy").await;
    let jobs = w.fetch_at(now_ms(), 60_000).await;
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    let id_of = |object: &str| {
        let job = jobs
            .iter()
            .find(|j| j.1.iter().any(|o| o.0.starts_with(object)));
        job.map(|j| j.0.clone()).unwrap()
    };
    let (runs, lost) = (id_of("document:runs"), id_of("document:lost"));
    // A newer op on each key waits behind the job that holds it now.
    app.revoke("user:anne", "viewer", "document:lost")
        .await
        .unwrap();
    app.revoke("user:anne", "viewer", "document:runs")
        .await
        .unwrap();
    app.grant("user:anne", "viewer", "document:shared")
        .await
        .unwrap();
    let blocked = |object: &str| format!("{object}#viewer@user:anne");
    let mut all: Vec<String> = w.on_key("SMEMBERS", "w:worker:busy", &[]).await;
    all.sort();
    let objects = ["document:lost", "document:runs", "document:shared"];
    assert_eq!(all, objects.map(blocked));
    assert_eq!(app.pending().await.unwrap().total, 3);

    let answer = w.strays("jobs", &[&runs]).await;
    assert_eq!(answer, [1, 1], "one op ready, one job back");
    let running: Vec<String> = w.on_key("SMEMBERS", "wj:worker:busy", &[]).await;
    assert_eq!(running, [runs]);
    let queued: Option<u64> = w.on_key("ZSCORE", "jobq", &[&lost]).await;
    assert!(queued.is_some(), "the lost job is queued again");
    let runner: Option<String> = w.on_key("HGET", "jobrun", &[&lost]).await;
    assert_eq!(runner, None);
    for (object, waits) in [
        ("document:lost", false),
        ("document:runs", true),
        ("document:shared", true),
    ] {
        let at: Option<f64> = w.on_key("ZSCORE", "blocked", &[&blocked(object)]).await;
        assert_eq!(at.is_some(), waits, "{object} blocked");
    }
    let mut left: Vec<String> = w.on_key("SMEMBERS", "w:worker:busy", &[]).await;
    left.sort();
    assert_eq!(left, [blocked("document:runs"), blocked("document:shared")]);
    assert_eq!(app.pending().await.unwrap().total, 3, "still pending");
    app.shutdown().await.unwrap();
}

/// The store's script under a prefix of its own (one cluster slot),
/// called command by command at chosen times.
struct ScriptAt {
    conn: support::RedisConn,
    script: redis::Script,
    prefix: String,
}

impl ScriptAt {
    async fn new(name: &str) -> ScriptAt {
        ScriptAt::on(support::redis_conn().await, name)
    }

    /// On the Redis `conn` reaches.
    fn on(conn: support::RedisConn, name: &str) -> ScriptAt {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        ScriptAt {
            conn,
            script: redis::Script::new(include_str!("../src/buffer/redis/store.lua")),
            prefix: format!("fga-wb-test:{{{name}-{nanos}}}"),
        }
    }

    /// Runs `command` with `args` (after the publish command it takes).
    async fn call(&mut self, command: &str, args: &[&str]) -> Vec<redis::Value> {
        match self.try_call(command, args).await.unwrap() {
            redis::Value::Array(v) => v,
            other => vec![other],
        }
    }

    /// As `call`, with the script's error, if it raised one.
    async fn try_call(&mut self, command: &str, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut inv = self.script.prepare_invoke();
        inv.key(&self.prefix).arg(command).arg(publish_command());
        for a in args {
            inv.arg(*a);
        }
        inv.invoke_async(&mut self.conn).await
    }

    /// `cmd` on the store's key `suffix` (`P:<suffix>`), with `args`.
    async fn look<T: redis::FromRedisValue>(
        &mut self,
        cmd: &str,
        suffix: &str,
        args: &[&str],
    ) -> T {
        redis::cmd(cmd)
            .arg(format!("{}:{suffix}", self.prefix))
            .arg(args)
            .query_async(&mut self.conn)
            .await
            .unwrap()
    }
}

/// What the script publishes with: `SPUBLISH` on a cluster.
fn publish_command() -> &'static str {
    if support::redis_is_cluster() {
        "SPUBLISH"
    } else {
        "PUBLISH"
    }
}

/// A queue-mode application's enqueue that reaches Redis late (after its
/// lease ended, its ops were handed back and it took one of them again in
/// a new term) leaves the key it took again in its writer's set. Before,
/// the late call removed every key it named from the set, and should the
/// writer then die, reclaim (which reads that set) never handed the key
/// back: it stayed taken by a dead writer, never written. Driven through
/// the store's script itself, at chosen times.
#[tokio::test]
async fn a_late_enqueue_leaves_a_key_taken_again_with_its_writer() {
    let mut r = ScriptAt::new("late-enqueue").await;
    let key = "document:1#viewer@user:anne";
    // push now capacity n (key op cond)*
    let push = |now: &'static str| [now, "100", "1", key, "g", ""];
    // take now max kinds up_to writer lease_ms had hold_ms; a lease of 5 s
    let take = |now: &'static str, who: &'static str, kinds: &'static str| {
        [now, "10", kinds, "999999999999999", who, "5000", "0", "0"]
    };
    r.call("push", &push("1000")).await;
    let t1 = r.call("take", &take("1000", "app-w", "rg")).await;
    assert_eq!(t1.len(), 2 + 5, "took the grant: {t1:?}");
    let seq1 = match &t1[3] {
        redis::Value::BulkString(b) => String::from_utf8(b.clone()).unwrap(),
        v => panic!("{v:?}"),
    };
    // app-w's lease ends at 6000; another writer's call at 10000 hands the
    // key back (it takes revokes only, so it leaves the grant ready).
    r.call("take", &take("10000", "app-x", "r")).await;
    r.call("push", &push("10000")).await;
    // app-w takes the key again, in a new term.
    let t2 = r.call("take", &take("10001", "app-w", "rg")).await;
    assert_eq!(t2.len(), 2 + 5, "took it again: {t2:?}");
    assert_ne!(t1[1], t2[1], "a new term");
    // Its enqueue of the first take arrives only now.
    // enqueue now writer store model n (key seq)* template
    r.call(
        "enqueue",
        &["10002", "app-w", "store", "", "1", key, &seq1, ""],
    )
    .await;
    let member: bool = r.look("SISMEMBER", "w:app-w", &[key]).await;
    assert!(member, "the key app-w took again is still in its set");
    // app-w dies: its lease ends, and the next call hands the key back.
    r.call("take", &take("30000", "app-x", "r")).await;
    let entry: String = r.look("HGET", "ops", &[key]).await;
    assert!(
        entry.contains("|r|"),
        "ready again, not stuck taken: {entry}"
    );
}

/// Every step of a clear keeps the list of jobs its steps found running
/// (P:clearskip) for another 10 minutes, not only a step that adds to it:
/// a clear of a large backlog can run longer than that, and the last step
/// needs the list (a job that went back to the queue since is ended there
/// with the ops it still holds). Driven through the store's script.
#[tokio::test]
async fn a_clear_step_keeps_the_running_jobs_it_noted() {
    let mut r = ScriptAt::new("clear-skip").await;
    let _: () = r.look("SADD", "clearskip", &["7"]).await;
    let _: () = r.look("PEXPIRE", "clearskip", &["30000"]).await;
    // A step over an empty store: it skips no job of its own.
    // clear now cursor up_to jobs_up_to
    r.call("clear", &["1000", "0", "", ""]).await;
    let ttl: i64 = r.look("PTTL", "clearskip", &[]).await;
    assert!(ttl > 590_000, "kept for another 10 minutes: {ttl} ms left");
    let kept: bool = r.look("SISMEMBER", "clearskip", &["7"]).await;
    assert!(kept, "the job noted by an earlier step is still listed");
}

/// The store's script, one tuple: pushes, takes and finishes by one
/// writer, with the replies' seqs.
struct OneKey {
    r: ScriptAt,
}

const OWED_KEY: &str = "document:1#viewer@user:anne";

impl OneKey {
    async fn new(name: &str) -> OneKey {
        OneKey {
            r: ScriptAt::new(name).await,
        }
    }

    /// push now capacity n (key op cond)*
    async fn push(&mut self, op: &str) {
        self.r
            .call("push", &["1000", "100", "1", OWED_KEY, op, ""])
            .await;
    }

    /// Takes the tuple's op, if ready: its seq.
    async fn take(&mut self) -> Option<String> {
        // take now max kinds up_to writer lease_ms had hold_ms
        let took = self
            .r
            .call(
                "take",
                &[
                    "1000",
                    "10",
                    "rg",
                    "999999999999999",
                    "app-w",
                    "60000",
                    "0",
                    "0",
                ],
            )
            .await;
        match took.get(3) {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8(b.clone()).unwrap()),
            _ => None,
        }
    }

    /// Finishes op `seq` with `outcome`: the reply.
    async fn finish(&mut self, seq: &str, outcome: &str) -> Vec<redis::Value> {
        // finish now writer job action due jobjson n (key seq outcome reason code attempts)*
        let args = [
            "1000", "app-w", "", "", "0", "", "1", OWED_KEY, seq, outcome, "refused", "", "1",
        ];
        self.r.call("finish", &args).await
    }

    /// Pushes `op`, takes it and finishes it with `outcome`.
    async fn ends(&mut self, op: &str, outcome: &str) {
        self.push(op).await;
        let seq = self.take().await.expect("the op ready");
        self.finish(&seq, outcome).await;
    }

    /// Replays the tuple's letter (`who`: as `replay` in store.lua takes
    /// it), and has the op it buffered again die of transient causes.
    async fn replayed_dies_again(&mut self, who: &str) {
        use redis::Value::Int;
        // replay now cap who ids -> {replayed, superseded, kept, waiting, left, ...}
        let out = self.r.call("replay", &["1000", "100", who, "*"]).await;
        assert_eq!(
            out[..5],
            [Int(1), Int(0), Int(0), Int(0), Int(0)],
            "{who}: {out:?}"
        );
        let seq = self.take().await.expect("replayed");
        self.finish(&seq, "D").await;
    }

    /// Other writes land: the store's applied total moves.
    async fn others_landed(&mut self) {
        let _: i64 = self.r.look("HINCRBY", "stats", &["applied", "1"]).await;
    }

    /// Replays every letter that died of transient causes, as a worker.
    async fn replay_all(&mut self) {
        // replay now cap who ids
        self.r.call("replay", &["1000", "100", "1", "*"]).await;
    }

    /// Takes the grant pending now and refuses it for good: the revoke it
    /// owed is pending again in its place (the reply names it).
    async fn refused_grant_leaves_the_revoke(&mut self, case: &str) {
        let grant = self.take().await.expect("a grant pending");
        let out = self.finish(&grant, "d").await;
        assert_eq!(out.len(), 5, "{case}: {out:?}");
        assert_eq!(self.entry().await, pair("r", "r"), "{case}");
    }

    /// A revoke, then a grant over it, taken and finished with `outcome`.
    async fn grant_over_a_revoke_ends(&mut self, outcome: &str) {
        self.push("r").await;
        self.push("g").await;
        let grant = self.take().await.unwrap();
        self.finish(&grant, outcome).await;
    }

    /// A revoke, then a grant over it given up after transient failures:
    /// its letter keeps the debt.
    async fn grant_given_up_over_a_revoke(&mut self, case: &str) {
        self.grant_over_a_revoke_ends("D").await;
        assert_eq!(self.letter().await["owes"], true, "{case}");
    }

    /// Whether a revoke of the tuple is still to reach OpenFGA (`owes`).
    async fn owes(&mut self) -> bool {
        self.r.call("owes", &[OWED_KEY]).await == [redis::Value::Int(1)]
    }

    /// The tuple's entry's op and state, if it has one.
    async fn entry(&mut self) -> Option<(String, String)> {
        let entry: Option<String> = self.r.look("HGET", "ops", &[OWED_KEY]).await;
        entry.map(|e| {
            let f: Vec<&str> = e.split('|').collect();
            (f[3].to_owned(), f[4].to_owned())
        })
    }

    /// The tuple's newest letter.
    async fn letter(&mut self) -> serde_json::Value {
        let id: String = self.r.look("HGET", "deadkey", &[OWED_KEY]).await;
        let letter: String = self.r.look("HGET", "dead", &[&id]).await;
        serde_json::from_str(&letter).unwrap()
    }
}

fn pair(op: &str, state: &str) -> Option<(String, String)> {
    Some((op.to_owned(), state.to_owned()))
}

/// A grant pushed while a revoke of its tuple was being written waits
/// behind it; the revoke's write does not land (its outcome is retried,
/// and the grant supersedes it), and the grant is then refused for good.
/// The revoke is owed: pending again, with the grant's letter numbered
/// after it so its write leaves the letter current. Before, the tuple
/// OpenFGA held stayed. Driven through the store's script.
#[tokio::test]
async fn a_grant_refused_for_good_leaves_a_revoke_written_ahead_of_it_owed() {
    let mut k = OneKey::new("owed-revoke").await;
    k.push("r").await;
    let revoke = k.take().await.unwrap();
    k.push("g").await;
    k.finish(&revoke, "r").await;
    let grant = k.take().await.expect("took the grant");
    let out = k.finish(&grant, "d").await;
    assert_eq!(out.len(), 5, "one revoke pending again: {out:?}");
    assert_eq!(k.entry().await, pair("r", "r"), "a ready revoke");
    let entry: String = k.r.look("HGET", "ops", &[OWED_KEY]).await;
    let seq: u64 = entry.split('|').next().unwrap().parse().unwrap();
    let letter = k.letter().await;
    assert_eq!(letter["op"], "g");
    assert!(
        letter["seq"].as_u64().unwrap() > seq,
        "the letter is numbered after the revoke: {letter} {entry}"
    );
    let owes: i64 = k.r.look("HLEN", "owes", &[]).await;
    assert_eq!(owes, 0, "nothing owed is left noted");
}

/// A revoke that died of transient causes, a grant over it refused for
/// good (the revoke is pending again), and that revoke dying of transient
/// causes again: OpenFGA may still hold what it revokes, so its letter is
/// the tuple's newest, owed, and indexed for checks to fail closed on.
/// (It guards against a rule that kept the grant's letter, numbered after
/// the revoke, the newest here: checks then answered from OpenFGA.)
#[tokio::test]
async fn a_revoke_owed_again_that_dies_in_an_outage_stays_owed() {
    let mut k = OneKey::new("owed-again-outage").await;
    k.ends("r", "D").await;
    k.push("g").await;
    let grant = k.take().await.expect("took the grant");
    k.finish(&grant, "d").await;
    assert_eq!(k.entry().await, pair("r", "r"), "the revoke pending again");
    let revoke = k.take().await.expect("took the revoke");
    k.finish(&revoke, "D").await;
    let letter = k.letter().await;
    assert_eq!(
        (&letter["op"], &letter["transient"]),
        (&"r".into(), &true.into())
    );
    assert!(k.owes().await, "the revoke is still to reach OpenFGA");
    let indexed: Option<String> = k.r.look("ZSCORE", "deadrev", &[OWED_KEY]).await;
    assert!(indexed.is_some(), "checks fail closed on it");
}

/// A revoke given up in an outage stays current for checks while its
/// tuple's entry among the pending ops is one fga-wb cannot read (written
/// by something else): such an entry is no op, as everywhere else. Before,
/// any entry counted as a newer op buffered, the letter was passed over,
/// and the check asked OpenFGA, which may still hold the tuple.
#[tokio::test]
async fn an_unreadable_entry_does_not_hide_a_revoke_given_up_in_an_outage() {
    let mut k = OneKey::new("unreadable-over-letter").await;
    k.ends("r", "D").await;
    let _: () = k.r.look("HSET", "ops", &[OWED_KEY, "not|an|entry"]).await;
    // relevant limit object user nrels (rel scope)* -> {revokes, grants,
    // written ago, dead, ...}
    let v =
        k.r.call(
            "relevant",
            &["10", "document:1", "user:anne", "1", "document#viewer", "1"],
        )
        .await;
    assert_eq!(v.get(3), Some(&redis::Value::Int(1)), "{v:?}");
}

/// A letter superseded by a newer op written leaves no trace of its tuple
/// among the current letters (`P:deadkey`). Before, the tuple's field was
/// set to 0 and stayed for good, one for every tuple ever dead-lettered.
#[tokio::test]
async fn a_superseded_letter_leaves_no_current_letter_field() {
    let mut k = OneKey::new("superseded-field").await;
    k.ends("g", "d").await;
    k.ends("r", "a").await;
    let fields: i64 = k.r.look("HLEN", "deadkey", &[]).await;
    assert_eq!(fields, 0);
    let letters: i64 = k.r.look("HLEN", "dead", &[]).await;
    assert_eq!(
        letters, 1,
        "the letter itself stays, superseded, until purged"
    );
    // As an older version left it: gone at the tuple's next op written.
    let _: () = k.r.look("HSET", "deadkey", &[OWED_KEY, "0"]).await;
    k.ends("g", "a").await;
    let fields: i64 = k.r.look("HLEN", "deadkey", &[]).await;
    assert_eq!(fields, 0, "the older version's field");
}

/// A grant pushed while a grant that owed a revoke was being written owes
/// it only unless that write lands: it lands, and the newer grant refused
/// for good leaves the tuple as the applied grant wrote it. Before the
/// distinction, the revoke was pended again and deleted it.
#[tokio::test]
async fn a_grant_behind_a_write_that_lands_owes_nothing() {
    let mut k = OneKey::new("owed-landed").await;
    k.push("r").await;
    k.push("g").await;
    let first = k.take().await.unwrap();
    k.push("g").await;
    k.finish(&first, "a").await;
    let second = k.take().await.expect("took the second grant");
    let out = k.finish(&second, "d").await;
    assert_eq!(out.len(), 4, "nothing pending again: {out:?}");
    assert_eq!(k.entry().await, None);
}

/// A grant over a pending revoke given up after transient failures keeps
/// the debt in its letter: replayed, it owes the revoke again, and refused
/// for good then, the revoke is pending again. So is it when, instead, a
/// newer grant on the free tuple is refused for good, also when a replay
/// meanwhile drops the old letter (the debt passes to the newer grant).
#[tokio::test]
async fn a_grant_given_up_keeps_the_revoke_it_owed() {
    for (replay, newer) in [(true, false), (false, true), (true, true)] {
        let case = format!("replay {replay}, newer {newer}");
        let mut k = OneKey::new(&format!("owed-given-up-{replay}-{newer}")).await;
        k.grant_given_up_over_a_revoke(&case).await;
        if newer {
            k.push("g").await;
        }
        if replay {
            // replay now cap who ids
            k.r.call("replay", &["1000", "100", "1", "*"]).await;
        }
        let again = k.take().await.expect("a grant pending again");
        let out = k.finish(&again, "d").await;
        assert_eq!(out.len(), 5, "{case}: {out:?}");
        assert_eq!(k.entry().await, pair("r", "r"), "{case}");
    }
}

/// A revoke given up in an outage, then a grant given up too: the grant's
/// letter replaces the revoke's as the key's newest, and keeps its debt.
/// Replayed and then refused for good, the grant leaves that revoke
/// pending. Before, the grant's letter owed nothing, the replay dropped the
/// revoke's letter as superseded, and OpenFGA kept the tuple.
#[tokio::test]
async fn a_grant_given_up_over_a_revoke_given_up_owes_it() {
    let mut k = OneKey::new("owed-over-letter").await;
    k.ends("r", "D").await;
    k.ends("g", "D").await;
    assert_eq!(k.letter().await["owes"], true);
    k.replay_all().await;
    k.refused_grant_leaves_the_revoke("replayed").await;
}

/// A revoke given up in an outage, then the same grant twice (a retried
/// call): the second folds the first, which never reached OpenFGA, so the
/// revoke stays owed, and the grant refused for good leaves it pending, as
/// a single grant does. Before, the fold settled the revoke's letter.
#[tokio::test]
async fn a_grant_folded_before_it_was_written_leaves_a_given_up_revoke_owed() {
    for twice in [false, true] {
        let mut k = OneKey::new(&format!("owed-fold-{twice}")).await;
        k.ends("r", "D").await;
        k.push("g").await;
        if twice {
            k.push("g").await;
        }
        k.refused_grant_leaves_the_revoke(&format!("twice {twice}"))
            .await;
    }
}

/// The same with the first grant's write failing (a 503; queue mode: its
/// job's attempt) while the second waits behind it: folded then, it
/// settled the revoke's letter as if it had landed, and with the second
/// refused for good OpenFGA kept the tuple. Only a write that lands
/// settles it now.
#[tokio::test]
async fn a_grant_folded_after_its_write_failed_leaves_a_given_up_revoke_owed() {
    let mut k = OneKey::new("owed-fold-failed").await;
    k.ends("r", "D").await;
    k.push("g").await;
    let first = k.take().await.unwrap();
    k.push("g").await;
    k.finish(&first, "r").await;
    k.refused_grant_leaves_the_revoke("the second").await;
}

/// Whether a revoke of the tuple is still to reach OpenFGA (reads that had
/// a refused grant fail closed on it): with a grant owing it, with the
/// revoke pending again after that grant died, with only letters that owe
/// it, and not once the revoke is written.
#[tokio::test]
async fn owes_tells_a_revoke_still_to_come() {
    let mut k = OneKey::new("owes-told").await;
    k.push("r").await;
    k.push("g").await;
    assert!(k.owes().await, "a grant owing the revoke");
    let grant = k.take().await.unwrap();
    k.finish(&grant, "d").await;
    assert!(k.owes().await, "the revoke pending again");
    let revoke = k.take().await.unwrap();
    k.finish(&revoke, "D").await;
    assert!(k.owes().await, "the revoke given up");
    k.push("r").await;
    let revoke = k.take().await.unwrap();
    k.finish(&revoke, "a").await;
    assert!(!k.owes().await, "written");
}

/// A grant given up that owed a revoke given up before it, then a newer op
/// that a clear drops: what is owed is the revoke, kept as a revoke letter
/// (checks fail closed until a replay writes it). Before, the clear
/// superseded the grant's letter and the debt was gone: OpenFGA kept the
/// tuple the revoke revokes.
#[tokio::test]
async fn a_clear_keeps_the_revoke_a_given_up_grant_owed() {
    let mut k = OneKey::new("clear-owing").await;
    k.ends("r", "D").await;
    k.ends("g", "D").await;
    assert_eq!(k.letter().await["owes"], true);
    k.push("g").await;
    // clear now cursor up_to jobs_up_to
    k.r.call("clear", &["1000", "0", "", ""]).await;
    assert_eq!(k.letter().await["op"], "r");
    assert!(k.owes().await, "the revoke is still owed");
    // replay now cap who ids: the revoke is written next.
    k.r.call("replay", &["1000", "100", "1", "*"]).await;
    assert_eq!(k.entry().await, pair("r", "r"));
}

/// A purge of every letter up to a bound (what `dlq purge --all` asked
/// about) spares a letter written after it, and its place in the indexes
/// checks read.
#[tokio::test]
async fn a_purge_up_to_a_bound_spares_newer_letters() {
    let mut k = OneKey::new("purge-bound").await;
    k.ends("r", "D").await;
    let first = k.letter().await["id"].as_u64().unwrap();
    k.push("r").await;
    let again = k.take().await.unwrap();
    k.finish(&again, "D").await;
    let first = first.to_string();
    // dlqdrop pub now ('*' up_to)
    let out = k.r.call("dlqdrop", &["1000", "*", &first]).await;
    assert_eq!(
        out.len(),
        3,
        "one letter purged, no revoke pending again: {out:?}"
    );
    assert_eq!(
        k.letter().await["op"],
        "r",
        "the newer letter stays current"
    );
    assert!(k.owes().await, "its revoke still fails checks closed");
}

/// Purged, a grant given up over a revoke (see finish) is never written,
/// and neither does OpenFGA keep what the application revoked before it:
/// the revoke is pending again, or, with a newer grant buffered on the key,
/// that grant owes it. Before, the purge dropped the debt, and checks asked
/// OpenFGA, which still held the tuple.
#[tokio::test]
async fn a_purged_grant_leaves_the_revoke_it_owed() {
    for newer in [false, true] {
        let case = format!("newer {newer}");
        let mut k = OneKey::new(&format!("purge-owing-{newer}")).await;
        k.grant_given_up_over_a_revoke(&case).await;
        if newer {
            k.push("g").await;
        }
        let id = k.letter().await["id"].as_u64().unwrap().to_string();
        // dlqdrop pub now ids -> {repended, (id, letter)*}
        let out = k.r.call("dlqdrop", &["1000", &id]).await;
        let repended = redis::Value::Int(i64::from(!newer));
        assert_eq!(out.len(), 3, "{case}: {out:?}");
        assert_eq!(out[0], repended, "{case}: {out:?}");
        assert!(k.owes().await, "{case}: the revoke is still owed");
        if newer {
            k.refused_grant_leaves_the_revoke(&case).await;
        } else {
            assert_eq!(k.entry().await, pair("r", "r"), "{case}");
        }
    }
}

/// A worker leaves a tuple's letter for an operator once it died again
/// `limit` times within an hour after its replays while other writes
/// landed: a tuple OpenFGA fails every time died again after each replay,
/// for good (a few failing Writes every couple of minutes, forever). Its
/// letter then stays, counted as left, and `unfinished` names it so
/// (`fga-wb flush --wait` ends on it); an operator's replay, or an op on
/// the tuple that lands, starts the count again. Deaths while nothing else
/// landed (an outage of writes) do not count.
#[tokio::test]
async fn a_worker_leaves_a_tuple_that_keeps_dying_to_an_operator() {
    use redis::Value::Int;
    let mut k = OneKey::new("replay-limit").await;
    k.ends("g", "D").await;
    // replay now cap who ids -> {replayed, superseded, kept, waiting, left, ...}
    // Nothing else lands: however often it dies, it is replayed.
    for _ in 0..4 {
        k.replayed_dies_again("1|2").await;
    }
    // Other writes land between its replays: two more deaths leave it.
    k.others_landed().await;
    k.replayed_dies_again("1|2").await;
    k.others_landed().await;
    let out = k.r.call("replay", &["1000", "100", "1|2", "*"]).await;
    assert_eq!(out, [Int(0), Int(0), Int(0), Int(0), Int(1)]);
    assert_eq!(k.entry().await, None, "not buffered again");
    assert_eq!(k.letter().await["op"], "g");
    // unfinished up_to -> {ops, transient letters, of which left}
    let u = k.r.call("unfinished", &["1000000"]).await;
    assert_eq!(u, [Int(0), Int(1), Int(1)]);
    // An operator still replays it, and its count starts again.
    k.replayed_dies_again("0").await;
    let u = k.r.call("unfinished", &["1000000"]).await;
    assert_eq!(u, [Int(0), Int(1), Int(0)], "no longer left");
    for _ in 0..2 {
        k.others_landed().await;
        k.replayed_dies_again("1|2").await;
    }
    // So does an op on it that lands: one more death would have left it,
    // and no longer does (the letter before that op is dropped,
    // superseded).
    k.ends("g", "a").await;
    k.ends("g", "D").await;
    k.others_landed().await;
    let out = k.r.call("replay", &["1000", "100", "1|2", "*"]).await;
    assert_eq!(
        out[..5],
        [Int(1), Int(1), Int(0), Int(0), Int(0)],
        "{out:?}"
    );
}

/// A clear that keeps a transient revoke's letter (a newer op dropped)
/// keeps what the workers counted of it: a revoke they had left for an
/// operator stays left. Before, the clear forgot the count, and the
/// workers replayed it `limit` more times.
#[tokio::test]
async fn a_clear_keeps_a_left_revokes_count() {
    use redis::Value::Int;
    let mut k = OneKey::new("replay-limit-clear").await;
    k.ends("r", "D").await;
    k.replayed_dies_again("1|1").await;
    k.others_landed().await;
    let out = k.r.call("replay", &["1000", "100", "1|1", "*"]).await;
    assert_eq!(out, [Int(0), Int(0), Int(0), Int(0), Int(1)]);
    k.push("g").await;
    // clear now cursor up_to jobs_up_to
    k.r.call("clear", &["1000", "0", "", ""]).await;
    assert_eq!(k.letter().await["op"], "r");
    // unfinished up_to -> {ops, transient letters, of which left}
    let u = k.r.call("unfinished", &["1000000"]).await;
    assert_eq!(u, [Int(0), Int(1), Int(1)]);
}

/// A replay counts the letters it leaves as they are: a grant refused for
/// good waits for the revoke it owed, pending again. Before, the replay
/// counted it nowhere, and `fga-wb dlq replay` said it replayed none and
/// dropped none, with no reason.
#[tokio::test]
async fn a_replay_counts_the_letters_that_wait() {
    use redis::Value::Int;
    let mut k = OneKey::new("replay-waiting").await;
    k.grant_over_a_revoke_ends("d").await;
    // replay now cap who ids
    //   -> {replayed, superseded, kept, waiting, left, (key, cond)*}
    let out = k.r.call("replay", &["1000", "100", "0", "*"]).await;
    assert_eq!(out, [Int(0), Int(0), Int(0), Int(1), Int(0)]);
}

/// A clear that leaves a revoke given up in an outage current again (the
/// op cleared was newer, so a replay had left the letter alone) tells the
/// workers to look at the letters again. Before, they looked only when
/// another op died, and checks on the tuple failed closed until then.
#[tokio::test]
async fn a_clear_that_leaves_a_letter_replayable_tells_the_workers() {
    let mut k = OneKey::new("clear-replayable").await;
    k.ends("r", "D").await;
    k.push("g").await;
    let before: u64 = k.r.look("HGET", "stats", &["dead_transient"]).await;
    // clear now cursor up_to jobs_up_to
    k.r.call("clear", &["1000", "0", "", ""]).await;
    let after: u64 = k.r.look("HGET", "stats", &["dead_transient"]).await;
    assert!(after > before, "{before} -> {after}");
    assert_eq!(k.letter().await["op"], "r");
}

/// Acknowledging a loss returns the record it closed, read in the same
/// step: a loss recorded after the operator last looked is closed with it,
/// and `fga-wb loss --ack` tells it. Before, the command printed the record
/// it had read before closing, or "no loss was open" when the loss came in
/// between.
#[tokio::test]
async fn acknowledging_a_loss_returns_the_record_it_closed() {
    let mut r = ScriptAt::new("ackloss").await;
    // ackloss now by
    assert!(
        r.call("ackloss", &["6000", "op"]).await.is_empty(),
        "none open"
    );
    let record = ["at", "5000", "by", "w1", "reason", "keys gone", "more", "1"];
    let _: () = r.look("HSET", "loss", &record).await;
    // Another ack (a call with the same time and operator is taken for
    // the first, sent again: see a_loss_ack_sent_again_closes_no_newer_loss).
    let closed = r.call("ackloss", &["6001", "op"]).await;
    let text: Vec<String> = closed
        .into_iter()
        .map(|v| redis::from_redis_value(v).unwrap())
        .collect();
    assert_eq!(text, ["5000", "w1", "keys gone", "1"]);
    let open: bool = r.look("EXISTS", "loss", &[]).await;
    assert!(!open);
}

/// A clear of a full Redis (maxmemory: a clear is what frees it) notes
/// itself for checks as any clear does. Before, Redis refused the note as
/// the script's first write that takes memory, the script went on without
/// it, and its steps dropped ops with no clear under way for the checks
/// between them.
#[tokio::test]
async fn a_clear_of_a_full_redis_notes_itself_for_checks() {
    let redis = testenv::Redis::start(testenv::RedisOptions::default())
        .await
        .unwrap();
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut r = ScriptAt::on(support::RedisConn::Node(conn.clone()), "clear-full");
    let keys: Vec<String> = (0..1200)
        .map(|i| format!("folder:f{i}#viewer@user:u"))
        .collect();
    // push now capacity n (key op cond)*
    let mut args = vec!["1000".to_owned(), "100000".into(), keys.len().to_string()];
    for k in &keys {
        args.extend([k.clone(), "g".to_owned(), String::new()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    r.call("push", &args).await;
    let config = |value: &'static str| {
        let mut conn = conn.clone();
        async move {
            let () = redis::cmd("CONFIG")
                .arg(&["SET", "maxmemory", value])
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    };
    config("1").await;
    let next = ClearSteps::new("").step(&mut r).await;
    let noted: i64 = r.look("ZCARD", "clearing", &[]).await;
    config("0").await;
    assert_ne!(next, "0", "the clear takes more than one step");
    assert_eq!(noted, 1, "the clear is noted while its steps run");
}

/// A clear takes steps (separate script calls) on a large buffer: while it
/// is under way, a check that would send pending grants counts it as a
/// revoke still to come, and waits. Before, a check between two steps could
/// see a revoke dropped and a grant on another object still pending, a
/// state that never existed. So does the shortcut for a pending grant of
/// the checked tuple (`latest`). A check with nothing pending answers as
/// after the clear, another clear (here one bounded below the pending
/// grants) that ends meanwhile does not end this one's wait, and a key
/// there that fga-wb did not write is named, not waited on.
#[tokio::test]
async fn checks_that_send_pending_grants_wait_while_a_clear_is_under_way() {
    const LATE: &str = "folder:late#viewer@user:u";
    let mut r = ScriptAt::new("clearing").await;
    // Grants on folders: a check of a folder's viewers sends those still
    // pending, up to the last step, which clears the last of them.
    let keys: Vec<String> = (0..2000)
        .map(|i| format!("folder:f{i}#viewer@user:u"))
        .collect();
    // push now capacity n (key op cond)*
    let mut args = vec![
        "1000".to_owned(),
        "100000".to_owned(),
        keys.len().to_string(),
    ];
    for k in &keys {
        args.extend([k.clone(), "g".to_owned(), String::new()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    r.call("push", &args).await;
    // relevant limit object user nrels (rel scope)* -> {revokes, ...}
    let with_grant = ["100", "folder:f0", "user:u", "1", "folder#viewer", "0"];
    let nothing_pending = ["100", "org:o", "user:u", "1", "org#member", "0"];
    let revokes = |v: Vec<redis::Value>| v.first().cloned();
    let (waits, answers) = (Some(redis::Value::Int(1)), Some(redis::Value::Int(0)));
    assert_eq!(revokes(r.call("relevant", &with_grant).await), answers);
    // clear now cursor up_to jobs_up_to, one step at a time.
    let mut steps = 0;
    let mut clear = ClearSteps::new("");
    loop {
        let cursor = clear.step(&mut r).await;
        steps += 1;
        if cursor == "0" {
            break;
        }
        let between = format!("between steps {steps} and {}", steps + 1);
        if steps == 1 {
            // Acknowledged after the clear began: kept, so a grant on a
            // folder stays pending whatever the steps have cleared.
            r.call("push", &["3000", "100000", "1", LATE, "g", ""])
                .await;
        }
        // The shortcut for a pending grant of the checked tuple waits too.
        let latest = r.call("latest", &[LATE]).await;
        assert!(latest.is_empty(), "{between}: {latest:?}");
        let grant = revokes(r.call("relevant", &with_grant).await);
        assert_eq!(grant, waits, "{between}");
        let nothing = revokes(r.call("relevant", &nothing_pending).await);
        assert_eq!(nothing, answers, "{between}");
        if steps == 1 {
            // Another clear, of ops up to seq 1 only, from start to end.
            let mut other = ClearSteps::new("1");
            while other.step(&mut r).await != "0" {}
            let grant = revokes(r.call("relevant", &with_grant).await);
            assert_eq!(grant, waits, "after the other clear ended");
        }
    }
    assert!(steps > 1, "the clear took one step: nothing between steps");
    let late = r.call("latest", &[LATE]).await;
    assert_eq!(late.len(), 2, "after the clear: {late:?}");
    // The late grant is pending still, on another folder.
    assert_eq!(revokes(r.call("relevant", &with_grant).await), answers);
    // A key there that fga-wb did not write is named, not waited on.
    let _: () = r.look("SET", "clearing", &["x"]).await;
    let _ = r
        .call("push", &["3000", "100", "1", &keys[0], "g", ""])
        .await;
    let e = r.try_call("relevant", &with_grant).await.unwrap_err();
    assert!(e.to_string().contains(":clearing"), "{e}");
}

/// A clear driven one step (script call) at a time, as `clear_now` drives
/// it: each step gets the bounds the first one read.
struct ClearSteps {
    cursor: String,
    up_to: String,
    jobs: String,
}

impl ClearSteps {
    fn new(up_to: &str) -> ClearSteps {
        ClearSteps {
            cursor: "0".into(),
            up_to: up_to.into(),
            jobs: String::new(),
        }
    }

    /// Runs the next step: the cursor after it ("0": the clear ended).
    async fn step(&mut self, r: &mut ScriptAt) -> String {
        // clear now cursor up_to jobs_up_to -> {next, up_to, jobs_up_to, ...}
        let out = r
            .call("clear", &["2000", &self.cursor, &self.up_to, &self.jobs])
            .await;
        let [next, up_to, jobs]: [String; 3] =
            std::array::from_fn(|i| redis::from_redis_value(out[i].clone()).unwrap());
        (self.cursor, self.up_to, self.jobs) = (next, up_to, jobs);
        self.cursor.clone()
    }
}

/// A writer whose last heartbeat is older than three leases before a
/// reconnect, but whose lease still runs (a longer lease of its own, or
/// one kept for an unknown outcome's hold), is waited for until the lease
/// ends. Before, a heartbeat on record that old took it for gone, and
/// checks answered without its look. Driven through the store's script.
#[tokio::test]
async fn confirmed_waits_for_a_writer_with_an_old_heartbeat_whose_lease_runs() {
    let mut r = ScriptAt::new("old-beat").await;
    // now 100 s, reconnected at 99 s, leases of 5 s: its beat is 20 s old.
    let _: () = r.look("HSET", "beats", &["other", "79000"]).await;
    let _: () = r.look("ZADD", "owners", &["110000", "other"]).await;
    // confirmed now since writer lease_ms
    let out = r
        .call("confirmed", &["100000", "99000", "me", "5000"])
        .await;
    assert_eq!(out.first(), Some(&redis::Value::Int(1)), "waits: {out:?}");
}

/// A writer silent for over ten minutes has its count of pushed ops pruned
/// by another writer's heartbeat; a push of its that reaches Redis before
/// its own heartbeat starts the count again from that push alone. The
/// heartbeat then takes the count for unknown, as when it comes first, not
/// for a loss, and starts it again from what the writer may count: one
/// push whose reply it has not read ran before the pruning, one after.
/// Before, it recorded a loss that never was, at once or at the
/// next heartbeat, and every check in every process failed closed until
/// an operator acknowledged it. A count kept (its heartbeat still there)
/// is still compared.
#[tokio::test]
async fn a_pruned_count_a_push_started_again_is_no_loss() {
    let mut r = ScriptAt::new("pruned-count").await;
    let t0 = now_ms();
    let (t0s, later) = (t0.to_string(), (t0 + 11 * 60_000).to_string());
    push(&mut r, &t0s, "document:1").await;
    let out = counted_beat(&mut r, ("w", &t0s, "", "1"), ["1", "1", "1"], "").await;
    assert!(!lost_now(&out), "{out:?}");
    let epoch = epoch_of(&out);
    // A push whose reply the writer has not read (it counts 1 of 2 sent).
    push(&mut r, &t0s, "document:2").await;
    // Eleven minutes on: another writer's heartbeat prunes w's count.
    let out = counted_beat(&mut r, ("x", &later, &epoch, "0"), ["0", "1", "0"], "").await;
    assert!(!lost_now(&out), "{out:?}");
    let count: Option<String> = r.look("HGET", "acks", &["w"]).await;
    assert_eq!(count, None, "pruned");
    // Another push runs, its reply unread too (1 of 3 sent counted).
    push(&mut r, &later, "document:3").await;
    let out = counted_beat(&mut r, ("w", &later, &epoch, "3"), ["1", "0", "3"], "").await;
    assert!(
        !lost_now(&out),
        "a pruned count is unknown, not a loss: {out:?}"
    );
    // The replies are read: the writer counts 3, and Redis no fewer.
    let out = counted_beat(&mut r, ("w", &later, &epoch, "3"), ["3", "1", "3"], "").await;
    assert!(!lost_now(&out), "the replies counted since: {out:?}");
    // Kept (its heartbeat is there now): a count below the writer's is a
    // loss, recorded once. A push that ran after that heartbeat read the
    // writer's counts, its reply read since, does not make the next
    // heartbeat record another: the count is counted again from there.
    let _: () = r.look("HSET", "acks", &["w", "1"]).await;
    push(&mut r, &later, "document:4").await;
    let out = counted_beat(&mut r, ("w", &later, &epoch, "3"), ["3", "0", "3"], "").await;
    assert!(lost_now(&out), "{out:?}");
    // The writer is asked for its next heartbeat at once.
    assert_eq!(out.get(6), Some(&redis::Value::Int(1)), "{out:?}");
    let epoch = epoch_of(&out);
    for _ in 0..2 {
        let out = counted_beat(&mut r, ("w", &later, &epoch, "3"), ["4", "1", "4"], "").await;
        assert!(!lost_now(&out), "no second loss: {out:?}");
    }
    // And compared again from then on.
    let _: () = r.look("HSET", "acks", &["w", "2"]).await;
    let out = counted_beat(&mut r, ("w", &later, &epoch, "3"), ["4", "1", "4"], "").await;
    assert!(lost_now(&out), "{out:?}");
}

/// A heartbeat as writer `who.0` at `who.1` that knows epoch `who.2` and
/// acknowledged up to `who.3`, with its counts `[pushed, recent,
/// may_count]` and its number `beat` ("": an older writer's, unnumbered).
async fn counted_beat(
    r: &mut ScriptAt,
    (writer, now, known, acked): (&str, &str, &str, &str),
    [pushed, recent, may_count]: [&str; 3],
    beat: &str,
) -> Vec<redis::Value> {
    // heartbeat now writer lease epoch acked had hold pushed recent may_count beat
    let args = [
        now, writer, "5000", known, acked, "", "0", pushed, recent, may_count, beat,
    ];
    r.call("heartbeat", &args).await
}

/// Writer "w" pushes a grant on `doc` at `now`.
async fn push(r: &mut ScriptAt, now: &str, doc: &str) {
    let key = format!("{doc}#viewer@user:a");
    r.call("push", &[now, "100", "1", &key, "g", "", "w"]).await;
}

fn lost_now(out: &[redis::Value]) -> bool {
    out.get(4) == Some(&redis::Value::Int(1))
}

fn epoch_of(out: &[redis::Value]) -> String {
    match out.get(1) {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        other => panic!("epoch: {other:?}"),
    }
}

/// The heartbeat that set a writer's count aside to be counted again
/// (below the writer's: a loss), sent again with its number by a Redis
/// Cluster client after its reply was lost, with a push of the writer's
/// run in between: it does not count from its own reads, which miss that
/// push, and the writer's next heartbeat counts it and records no second
/// loss. Before, the repeat counted 3 of the 4 ops and the next heartbeat
/// recorded a loss that never was (every check failing closed).
#[tokio::test]
async fn a_heartbeat_sent_again_records_no_false_loss() {
    let mut r = ScriptAt::new("beat-again").await;
    let now = now_ms().to_string();
    for doc in ["document:1", "document:2", "document:3"] {
        push(&mut r, &now, doc).await;
    }
    let out = counted_beat(&mut r, ("w", &now, "", "3"), ["3", "1", "3"], "1").await;
    assert!(!lost_now(&out), "{out:?}");
    let epoch = epoch_of(&out);
    // Redis lost two of w's ops. Heartbeat 2 sets out with w's counts
    // (3), a push of w's runs before it (its reply unread), and heartbeat
    // 2 records the loss and sets the count aside. Its reply is lost; the
    // cluster client sends it again.
    let _: () = r.look("HSET", "acks", &["w", "1"]).await;
    push(&mut r, &now, "document:4").await;
    let second = (("w", now.as_str(), epoch.as_str(), "3"), ["3", "1", "3"]);
    let out = counted_beat(&mut r, second.0, second.1, "2").await;
    assert!(lost_now(&out), "{out:?}");
    let epoch = epoch_of(&out);
    let out = counted_beat(&mut r, second.0, second.1, "2").await;
    assert!(!lost_now(&out), "{out:?}");
    // Heartbeat 3 (w has read the push's reply: 4).
    let out = counted_beat(&mut r, ("w", &now, &epoch, "3"), ["4", "1", "4"], "3").await;
    assert!(!lost_now(&out), "no second loss: {out:?}");
    let count: Option<String> = r.look("HGET", "acks", &["w"]).await;
    assert_eq!(count.as_deref(), Some("4"));
    let out = counted_beat(&mut r, ("w", &now, &epoch, "3"), ["4", "1", "4"], "4").await;
    assert!(!lost_now(&out), "{out:?}");
}

/// A job set aside as unreadable, the call sent again (a Redis Cluster
/// client does after a lost reply): the second finds it set aside and
/// does nothing. Before, it counted the job twice and overwrote what was
/// kept of it with nothing.
#[tokio::test]
async fn a_bad_job_set_aside_twice_is_kept_and_counted_once() {
    let mut r = ScriptAt::new("badjob-again").await;
    let _: () = r.look("HSET", "jobs", &["9", "{not json"]).await;
    let now = now_ms().to_string();
    for _ in 0..2 {
        r.call("badjob", &[&now, "9"]).await;
        let kept: Option<String> = r.look("HGET", "badjobs", &["9"]).await;
        assert_eq!(kept.as_deref(), Some("{not json"));
        let counted: Option<String> = r.look("HGET", "stats", &["bad_jobs"]).await;
        assert_eq!(counted.as_deref(), Some("1"));
    }
}

/// An operator's `loss --ack` sent again (a Redis Cluster client does
/// after a lost reply) once another loss was recorded: it answers what the
/// first closed and leaves the new loss open, for the operator to look
/// at. Before, it closed that one too, and checks answered again.
#[tokio::test]
async fn a_loss_ack_sent_again_closes_no_newer_loss() {
    let mut r = ScriptAt::new("ackloss-again").await;
    let record = |at: &'static str| ["at", at, "by", "w", "reason", "lost", "more", "0"];
    let _: () = r.look("HSET", "loss", &record("100")).await;
    let first = r.call("ackloss", &["500", "ops"]).await;
    assert_eq!(first.len(), 4, "{first:?}");
    let _: () = r.look("HSET", "loss", &record("600")).await;
    let again = r.call("ackloss", &["500", "ops"]).await;
    assert_eq!(again, first, "the first call's answer");
    let open: Option<String> = r.look("HGET", "loss", &["at"]).await;
    assert_eq!(open.as_deref(), Some("600"), "the newer loss stays open");
    // The operator's next ack closes it.
    let next = r.call("ackloss", &["700", "ops"]).await;
    assert_eq!(next[0], redis::Value::BulkString(b"600".to_vec()));
    // An ack that found none, sent again once a loss is recorded: none.
    assert_eq!(r.call("ackloss", &["800", "ops"]).await, []);
    let _: () = r.look("HSET", "loss", &record("900")).await;
    assert_eq!(r.call("ackloss", &["800", "ops"]).await, []);
    let open: Option<String> = r.look("HGET", "loss", &["at"]).await;
    assert_eq!(open.as_deref(), Some("900"));
}

/// Every connection to Redis has TCP keepalive on (the kernel's own record
/// in /proc/net/tcp: its keepalive timer runs on an idle socket), so a
/// node that stops answering without a reset (died, or its address moved
/// to another machine) is found within seconds and the connection made
/// again. Before, no timer ran: such a socket was kept, and every call
/// timed out on it until the kernel gave up, some fifteen minutes later.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn connections_to_redis_keep_alive() {
    let s = new_store("redis-keepalive").await;
    // A Redis of its own: the other tests' connections (their own raw
    // ones among them) are not this test's to judge.
    let node = testenv::Redis::start(testenv::RedisOptions::default())
        .await
        .unwrap();
    let mut c = redis_config(&s);
    c.redis.url = node.url();
    let wb = WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:alive")
        .await
        .unwrap();
    let ports = [node.port()];
    // This process's sockets, by inode.
    let timers = || {
        let ours: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
            })
            .collect();
        // sl local rem st queues tr:when retrnsmt uid timeout inode
        ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .flat_map(|t| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let port = u16::from_str_radix(f.get(2)?.rsplit(':').next()?, 16).ok()?;
                let wanted =
                    f.get(3) == Some(&"01") && ports.contains(&port) && ours.contains(*f.get(9)?);
                wanted.then(|| f.get(5)?.split(':').next().map(str::to_owned))?
            })
            .collect::<Vec<String>>()
    };
    // 02: the keepalive timer, which runs on an idle socket (01, a
    // retransmission timer, runs while a request is unanswered).
    support::eventually(
        "every connection idle with its keepalive timer",
        Duration::from_secs(10),
        || async {
            let t = timers();
            eprintln!("timers of this process's Redis connections: {t:?}");
            !t.is_empty() && t.iter().all(|t| t == "02")
        },
    )
    .await;
    drop(wb);
}

/// A Redis user that may not publish on the store's channel (Redis 7 gives
/// a new user no channels), or may not use its keys, is refused at the
/// connect with an error that names what it lacks and how to grant it.
/// Before, one without channels connected, and the store's scripts then
/// failed halfway, after their writes; one without the keys got "fga-wb
/// needs Lua scripting". A user granted the prefix's keys and channels
/// works.
#[tokio::test]
async fn a_redis_user_without_the_stores_keys_or_channel_is_refused_at_the_connect() {
    let s = new_store("redis-acl").await;
    let redis = testenv::Redis::start(testenv::RedisOptions::default())
        .await
        .unwrap();
    let (s, redis) = (&s, &redis);
    let with = |user: &str, rules: &str| {
        let (user, rules) = (user.to_string(), rules.to_string());
        async move {
            let set = redis
                .command(&format!("ACL SETUSER {user} on >pw-{user} {rules} +@all"))
                .await;
            assert!(
                set.as_deref().is_some_and(|r| r.starts_with("+OK")),
                "{set:?}"
            );
            let mut c = redis_config(s);
            c.redis.url = format!("redis://{user}:pw-{user}@127.0.0.1:{}", redis.port());
            c.redis.key_prefix = "acl".into();
            WriteBehind::builder(c).build().await
        }
    };
    let Err(e) = with("nochannels", "~acl:* resetchannels").await else {
        panic!("connected");
    };
    assert!(e.is_config(), "{e}");
    let m = e.to_string();
    assert!(m.contains("PUBLISH acl:{"), "{m}");
    assert!(m.contains("&acl:*"), "{m}");
    assert!(!m.contains("pw-"), "{m}");
    let Err(e) = with("nokeys", "~other:* &*").await else {
        panic!("connected");
    };
    assert!(e.is_config(), "{e}");
    let m = e.to_string();
    assert!(m.contains("no permissions") && m.contains("~acl:*"), "{m}");
    assert!(!m.contains("needs Lua scripting"), "{m}");
    let wb = with("granted", "~acl:* &acl:*").await.unwrap();
    wb.grant("user:anne", "viewer", "document:acl")
        .await
        .unwrap();
    assert!(wb
        .check("user:anne", "viewer", "document:acl")
        .await
        .unwrap());
    wb.shutdown().await.unwrap();
    assert_eq!(stored(s).await, ["document:acl#viewer@user:anne"]);
}
