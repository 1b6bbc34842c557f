//! Redis losing acknowledged ops is loud (ARCHITECTURE.md, "Sharing one
//! buffer"): a Redis restarted without its data, and a Redis Cluster failover
//! to a replica that had not received the last writes. Both times a revoke
//! acknowledged before the loss vanishes from Redis while OpenFGA still
//! holds the grant, so the only safe answer is a denial: checks must fail
//! closed (never `true`) from the failure on, report the loss, and answer
//! again only after an operator acknowledges it with `fga-wb loss --ack`.
//!
//! Each test runs its own Redis (or cluster), since it kills it; OpenFGA is
//! the shared test server. The writer whose heartbeat is held up is this
//! very test binary, re-executed to run only [`loss_writer`], so that it can
//! be stopped (SIGSTOP) like a process the scheduler or a GC pause holds up.
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::{Config, WriteBehind};
use support::{config_for, new_store, TestStore};
use testenv::{Redis, RedisCluster, RedisOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// `<store id> <model id> <redis url>` for [`loss_writer`].
const WRITER_VAR: &str = "FGA_WB_LOSS_WRITER";

/// The writer's and reader's lease in the stopped-writer test. Others wait
/// for a writer that looks dead after a failover for up to two leases after
/// their reconnect; the resumed writer must run its heartbeat within that,
/// after a failover and a reconnect that take seconds on a loaded machine.
const STOPPED_TEST_LEASE: Duration = Duration::from_secs(6);

fn config(s: &TestStore, url: &str) -> Config {
    let mut c = config_for(s);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = url.to_owned();
    c.flush.mode = Mode::Inline;
    // Short, so the quiet time after a reconnect is short too.
    c.redis.writer_lease = Duration::from_secs(3);
    c
}

/// A handle that flushes only when told: the revoke stays in Redis.
async fn app(c: Config) -> WriteBehind {
    WriteBehind::builder(c)
        .automatic_flush(false)
        .build()
        .await
        .expect("build the handle")
}

/// Runs `fga-wb` against `url` for store `s`; returns the exit code and
/// stdout followed by stderr.
async fn cli(s: &TestStore, url: &str, args: &[&str]) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fga-wb"))
        .args(args)
        .env_clear()
        .env("FGA_API_URL", support::openfga_url())
        .env("FGA_API_TOKEN", support::openfga_token())
        .env("FGA_STORE_ID", &s.store_id)
        .env("FGA_MODEL_ID", &s.model_id)
        .env("FGA_WB_BUFFER__STORE", "redis")
        .env("FGA_WB_REDIS__URL", url)
        .current_dir(std::env::temp_dir())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("run fga-wb");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "$ fga-wb {}  -> {:?}\n{text}",
        args.join(" "),
        out.status.code()
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Checks with every handle until each reports the loss, failing the test
/// if any check ever answers `true` (the revoke was acknowledged).
async fn until_every_check_reports_the_loss(handles: &[&WriteBehind]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    // Each handle's check, list_objects, list_users and read of anne's
    // revoked access (lists and reads skipped the loss guard and showed it).
    let mut reported = vec![[false; 4]; handles.len()];
    let mut seen = Vec::new();
    while reported.iter().flatten().any(|r| !r) {
        for (i, wb) in handles.iter().enumerate() {
            for (k, (what, answer)) in access_of_anne(wb).await.into_iter().enumerate() {
                match answer {
                    Ok(true) => panic!(
                        "handle {i}'s {what} showed a revoked grant after Redis lost the revoke; before: {seen:?}"
                    ),
                    Ok(false) => seen.push(format!("{i} {what}: no access")),
                    Err(e) if e.is_buffer_lost() => reported[i][k] = true,
                    Err(e) => seen.push(format!("{i} {what}: {e}")),
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "the loss was not reported within 60 s: {reported:?}, {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen.dedup();
    eprintln!("answers before the loss was reported: {seen:?}");
}

/// Whether each way of asking shows anne as a viewer of document:1.
async fn access_of_anne(wb: &WriteBehind) -> [(&'static str, fga_wb::Result<bool>); 4] {
    use fga_wb::openfga::{ListObjectsRequest, ListUsersRequest, ReadFilter};
    let check = wb.check("user:anne", "viewer", "document:1").await;
    let objects = wb
        .list_objects(&ListObjectsRequest::new("user:anne", "viewer", "document"))
        .await
        .map(|o| o.iter().any(|o| o == "document:1"));
    let users = wb
        .list_users(&ListUsersRequest::new("document:1", "viewer", "user"))
        .await
        .map(|u| u.iter().any(|u| u == "user:anne"));
    let filter = ReadFilter {
        object: Some("document:1".into()),
        ..Default::default()
    };
    let read = wb
        .read(&filter)
        .await
        .map(|t| t.iter().any(|t| t.user == "user:anne"));
    [
        ("check", check),
        ("list_objects", objects),
        ("list_users", users),
        ("read", read),
    ]
}

/// The operator's part: status and `fga-wb loss` show the loss, the
/// revoke is issued again, `fga-wb loss --ack` closes it, and a flush
/// makes OpenFGA agree.
async fn operator_recovers(s: &TestStore, url: &str, wb: &WriteBehind) {
    let (code, text) = cli(s, url, &["status"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("REDIS LOST OPS"), "{text}");
    let (code, text) = cli(s, url, &["loss"]).await;
    assert_eq!(code, 1, "an open loss exits 1: {text}");
    assert!(text.contains("acknowledged"), "the loss says what: {text}");

    wb.revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    let err = wb
        .check("user:anne", "viewer", "document:1")
        .await
        .expect_err("still closed until acknowledged");
    assert!(err.is_buffer_lost(), "{err}");

    let (code, text) = cli(s, url, &["loss", "--ack"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("acknowledged"), "{text}");
    let (code, text) = cli(s, url, &["loss"]).await;
    assert_eq!(code, 0, "{text}");

    // The marks of what was written before the loss went with it: for a
    // while every check is sent fresh, past OpenFGA's caches, even one on
    // an object nothing was written to since. Before, such a check was
    // sent as MINIMIZE_LATENCY right after the acknowledgement.
    let fresh = wb.local_totals().higher_consistency;
    assert!(!wb.check("user:zed", "viewer", "document:9").await.unwrap());
    assert_eq!(wb.local_totals().higher_consistency, fresh + 1);

    // `flush --wait` ends: the loss moved the letter counter 2^32 ahead,
    // and the look for letters older versions wrote once walked every id
    // up to it, 2000 a call (days).
    let (code, text) = cli(s, url, &["flush", "--wait", "--timeout", "60s"]).await;
    assert_eq!(code, 0, "{text}");
    assert!(!wb.check("user:anne", "viewer", "document:1").await.unwrap());
    assert!(!support::ground_truth(s, "document:1#viewer@user:anne").await);
    let st = wb.status().await.unwrap();
    assert!(st.loss.is_none(), "{st:?}");
    assert!(st.last_loss_acknowledged.is_some(), "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restarted_without_its_data_fails_checks_closed_until_acknowledged() {
    let s = new_store("redis-loss-restart").await;
    let mut redis = Redis::start(RedisOptions::default()).await.unwrap();
    let url = redis.url();
    let wb = app(config(&s, &url)).await;
    // Another process that only checks: it acknowledged nothing itself.
    let reader = app(config(&s, &url)).await;

    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().applied, 1);
    assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());
    assert!(reader
        .check("user:anne", "viewer", "document:1")
        .await
        .unwrap());
    wb.revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();

    redis.kill();
    redis.run().await.unwrap();

    until_every_check_reports_the_loss(&[&wb, &reader]).await;
    operator_recovers(&s, &url, &wb).await;
}

/// `fga-wb flush --wait` exits 1 when Redis loses the ops it waits for
/// (a FLUSHALL while it waits for a worker), with no application left to
/// notice: the command's own look finds the loss. Before, its next look
/// found nothing left to wait for, and it printed "flushed" and exited 0,
/// the answer a pre-deploy gate takes for "everything is in OpenFGA".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn flush_wait_fails_when_redis_loses_what_it_waits_for() {
    let s = new_store("redis-loss-flush-wait").await;
    let redis = Redis::start(RedisOptions::default()).await.unwrap();
    let url = redis.url();
    let mut c = config(&s, &url);
    c.flush.mode = Mode::Queue;
    let wb = app(c).await;
    for doc in ["document:1", "document:2", "document:3"] {
        wb.grant("user:anne", "viewer", doc).await.unwrap();
    }
    let cli = support::cli::Cli::at(
        support::cli::Where {
            api_url: support::openfga_url(),
            token: support::openfga_token(),
            store_id: s.store_id.clone(),
            model_id: s.model_id.clone(),
            redis_url: url.clone(),
        },
        "queue",
    );
    // No worker runs: the command queues the three ops and waits.
    let waiting = cli
        .command(&["flush", "--wait", "--timeout", "60s"])
        .output();
    let waiting = tokio::spawn(waiting);
    let deadline = Instant::now() + Duration::from_secs(60);
    while wb.status().await.unwrap().queue.map_or(0, |q| q.pending) == 0 {
        assert!(Instant::now() < deadline, "the command queued nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wb.shutdown().await.unwrap();
    drop(wb);
    let flushed = redis.command("FLUSHALL").await;
    assert!(flushed.is_some_and(|r| r.starts_with("+OK")));

    let out = tokio::time::timeout(Duration::from_secs(60), waiting)
        .await
        .expect("flush --wait ends")
        .unwrap()
        .expect("run fga-wb");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("Redis losing acknowledged ops is open"),
        "{text}"
    );
    assert!(text.contains("fga-wb loss --ack"), "{text}");
    assert!(!text.contains(&support::openfga_token()), "{text}");
}

/// The node of `cluster` that serves `key`'s slot, and its replica.
async fn primary_and_replica(cluster: &RedisCluster, key: &str) -> (usize, usize) {
    let nodes = cluster.nodes();
    let slot: u16 = nodes[0]
        .command(&format!("CLUSTER KEYSLOT {key}"))
        .await
        .and_then(|r| r.trim().trim_start_matches(':').parse().ok())
        .expect("CLUSTER KEYSLOT");
    let listing = nodes[0]
        .command("CLUSTER NODES")
        .await
        .expect("CLUSTER NODES");
    // <id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <state> <slots...>
    let mut primary = None;
    for line in listing.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 || !f[2].contains("master") {
            continue;
        }
        let owns = f[8..].iter().any(|r| match r.split_once('-') {
            Some((a, b)) => {
                a.parse::<u16>().is_ok_and(|a| a <= slot)
                    && b.parse::<u16>().is_ok_and(|b| slot <= b)
            }
            None => r.parse::<u16>() == Ok(slot),
        });
        if owns {
            primary = Some((f[0].to_owned(), port_of(f[1])));
        }
    }
    let (id, port) = primary.expect("a primary serves the slot");
    let replica_port = listing
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
        .map(|f| port_of(f[1]))
        .expect("the primary has a replica");
    let index = |p: u16| {
        nodes
            .iter()
            .position(|n| n.port() == p)
            .expect("known node")
    };
    (index(port), index(replica_port))
}

/// The primary and replica of the store's slot, with the replica no longer
/// applying what it receives (it lags from now on).
async fn pause_replica(cluster: &RedisCluster, s: &TestStore) -> (usize, usize) {
    let (primary, replica) =
        primary_and_replica(cluster, &format!("fga-wb:{{{}}}", s.store_id)).await;
    let paused = cluster.nodes()[replica]
        .command("CLIENT PAUSE 60000 WRITE")
        .await
        .unwrap_or_default();
    assert!(paused.contains("OK"), "{paused}");
    (primary, replica)
}

/// The primary dies and its lagging replica takes over.
async fn fail_over(cluster: &mut RedisCluster, primary: usize, replica: usize) {
    cluster.node_mut(primary).kill();
    let took = cluster.nodes()[replica]
        .command("CLUSTER FAILOVER TAKEOVER")
        .await
        .unwrap_or_default();
    assert!(took.contains("OK"), "{took}");
    cluster.nodes()[replica].command("CLIENT UNPAUSE").await;
}

/// [`fail_over`], then another process's push raises the sequence counter
/// back to what the writer acknowledged: the counter alone no longer
/// tells the loss.
async fn fail_over_then_push(
    cluster: &mut RedisCluster,
    primary: usize,
    replica: usize,
    reader: &WriteBehind,
) {
    fail_over(cluster, primary, replica).await;
    reader
        .grant("user:bob", "viewer", "document:2")
        .await
        .expect("a push after the failover");
}

fn port_of(addr: &str) -> u16 {
    addr.split('@')
        .next()
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .expect("ip:port@cport")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_that_drops_acknowledged_ops_is_detected_and_no_revoked_access_returns() {
    let s = new_store("redis-loss-failover").await;
    let mut cluster = RedisCluster::start(3, 1).await.unwrap();
    let url = cluster.url();
    let wb = app(config(&s, &url)).await;
    let reader = app(config(&s, &url)).await;

    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().applied, 1);
    // Both handles have "allowed" cached now.
    assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());
    assert!(reader
        .check("user:anne", "viewer", "document:1")
        .await
        .unwrap());

    // The revoke reaches the primary only, and is acknowledged.
    let (primary, replica) = pause_replica(&cluster, &s).await;
    wb.revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();

    fail_over(&mut cluster, primary, replica).await;

    until_every_check_reports_the_loss(&[&wb, &reader]).await;
    operator_recovers(&s, &url, &wb).await;
}

/// The child half of
/// [`a_writer_that_looks_dead_after_a_failover_is_waited_for_before_checks_answer`]:
/// an application process that grants (and writes the grant) or revokes
/// (acknowledged, left in Redis) as told on stdin, answering each on
/// stdout. Ignored in a plain run: the parent re-executes this binary to
/// run it, with `FGA_WB_LOSS_WRITER` set, and without it it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a child process of the failover test, which runs it"]
async fn loss_writer() {
    let raw = std::env::var(WRITER_VAR).expect("run by its parent test, with FGA_WB_LOSS_WRITER");
    let [store_id, model_id, url]: [&str; 3] = raw
        .split(' ')
        .collect::<Vec<_>>()
        .try_into()
        .expect("store id, model id, redis url");
    let s = TestStore {
        client: support::client(),
        store_id: store_id.to_owned(),
        model_id: model_id.to_owned(),
        server: support::Server::Plain,
    };
    let mut c = config(&s, url);
    c.redis.writer_lease = STOPPED_TEST_LEASE;
    let wb = app(c).await;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    while let Some(line) = lines.next_line().await.expect("stdin") {
        let answer = match line.as_str() {
            // Its handle is built (its first heartbeat ran).
            "hello" => "hello\n",
            "grant" => {
                wb.grant("user:anne", "viewer", "document:1").await.unwrap();
                assert_eq!(wb.flush().await.unwrap().applied, 1);
                "granted\n"
            }
            "revoke" => {
                wb.revoke("user:anne", "viewer", "document:1")
                    .await
                    .unwrap();
                "revoked\n"
            }
            other => panic!("unknown command {other:?}"),
        };
        out.write_all(answer.as_bytes()).await.expect("stdout");
        out.flush().await.expect("stdout");
    }
    // Parked until the parent kills us.
    std::future::pending::<()>().await;
}

/// A reader and a [`Writer`] (leases of `STOPPED_TEST_LEASE`); the writer
/// has granted, and the reader has seen it.
async fn reader_and_writer(s: &TestStore, url: &str) -> (WriteBehind, Writer) {
    let mut c = config(s, url);
    c.redis.writer_lease = STOPPED_TEST_LEASE;
    let reader = app(c).await;
    let mut writer = Writer::spawn(s, url);
    writer.tell("grant", "granted").await;
    assert!(reader
        .check("user:anne", "viewer", "document:1")
        .await
        .unwrap());
    (reader, writer)
}

/// [`loss_writer`] in a process of its own, told what to do on stdin.
struct Writer {
    /// Killed when dropped.
    _child: tokio::process::Child,
    pid: u32,
    to: tokio::process::ChildStdin,
    from: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Writer {
    fn spawn(s: &TestStore, url: &str) -> Writer {
        let mut child = tokio::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "loss_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WRITER_VAR, format!("{} {} {url}", s.store_id, s.model_id))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the writer");
        Writer {
            pid: child.id().expect("the writer runs"),
            to: child.stdin.take().unwrap(),
            from: BufReader::new(child.stdout.take().unwrap()).lines(),
            _child: child,
        }
    }

    /// Tells it `what` and waits for its line ending in `answer`.
    async fn tell(&mut self, what: &str, answer: &str) {
        self.to
            .write_all(format!("{what}\n").as_bytes())
            .await
            .unwrap();
        self.to.flush().await.unwrap();
        loop {
            match self.from.next_line().await.unwrap().as_deref() {
                // With one test thread, the harness prints the test's name
                // before running it, on the line its first answer ends.
                Some(l) if l.ends_with(answer) => return,
                Some(_) => continue,
                None => panic!("the writer exited before answering {what}"),
            }
        }
    }

    /// Sends it a signal.
    fn signal(&self, sig: testenv::Signal) {
        support::signal(self.pid, sig);
    }
}

/// The race CI once caught, made deterministic: after a failover to a
/// replica that lagged, the writer that acknowledged the lost revoke looks
/// dead (the replica holds its lease from before it lagged), and its next
/// heartbeat, the only thing that can tell Redis lost its revoke, is held
/// up (the process is stopped). Another process must not answer `allowed`
/// meanwhile: it waits for that writer (fails closed) until it has run a
/// heartbeat, or two leases after the reconnect; here the writer resumes
/// well within that, finds the loss, and every check reports it, though
/// another process pushed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_that_looks_dead_after_a_failover_is_waited_for_before_checks_answer() {
    let s = new_store("redis-loss-stopped-writer").await;
    let mut cluster = RedisCluster::start(3, 1).await.unwrap();
    let url = cluster.url();
    let lease = STOPPED_TEST_LEASE;
    let (reader, mut writer) = reader_and_writer(&s, &url).await;

    let (primary, replica) = pause_replica(&cluster, &s).await;
    let paused_at = Instant::now();
    writer.tell("revoke", "revoked").await;
    // The writer's heartbeats now reach the primary only: once a lease has
    // passed, the replica holds a lease of the writer's that has ended.
    tokio::time::sleep_until((paused_at + lease + lease / 5).into()).await;
    writer.signal(testenv::Signal::Stop);

    // The writer's own count in Redis still tells the loss. Before,
    // nothing did: the heartbeat compared the counter alone.
    fail_over_then_push(&mut cluster, primary, replica, &reader).await;

    // With the writer stopped, past the quiet time every reconnect has (a
    // third of a lease and a second, from a reconnect that came before
    // `fail_over` returned), so only waiting for the writer holds the reader
    // back, the reader asks again and again: never `allowed`.
    never_allowed_while_stopped(&reader, lease / 3 + Duration::from_secs(2)).await;

    writer.signal(testenv::Signal::Cont);
    until_every_check_reports_the_loss(&[&reader]).await;
}

/// A writer whose every push the failover lost: its first op, a revoke,
/// reaches the primary only. Redis then holds no count of its pushes at all
/// (P:acks has no field for it), and another process's push raises the
/// sequence counter back to what the writer acknowledged, so only a missing
/// count can tell the loss. Before, a missing count meant "unknown": the
/// writer's heartbeat accepted it, and the reader answered `allowed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_writer_whose_every_push_was_lost_is_detected() {
    let s = new_store("redis-loss-first-push").await;
    let mut cluster = RedisCluster::start(3, 1).await.unwrap();
    let url = cluster.url();
    let mut c = config(&s, &url);
    c.redis.writer_lease = STOPPED_TEST_LEASE;
    let reader = app(c).await;
    let mut writer = Writer::spawn(&s, &url);
    writer.tell("hello", "hello").await;
    // The reader grants and writes; it has "allowed" cached.
    reader
        .grant("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    assert_eq!(reader.flush().await.unwrap().applied, 1);
    assert!(reader
        .check("user:anne", "viewer", "document:1")
        .await
        .unwrap());

    let (primary, replica) = pause_replica(&cluster, &s).await;
    writer.tell("revoke", "revoked").await;
    writer.signal(testenv::Signal::Stop);
    fail_over_then_push(&mut cluster, primary, replica, &reader).await;
    writer.signal(testenv::Signal::Cont);
    until_every_check_reports_the_loss(&[&reader]).await;
}

/// Checks with `reader` for `how_long`, failing the test if it ever
/// answers `allowed` (the writer that acknowledged the revoke is stopped).
async fn never_allowed_while_stopped(reader: &WriteBehind, how_long: Duration) {
    let stopped_until = Instant::now() + how_long;
    // Answers by kind (the countdown in their text left out), and how often.
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    while Instant::now() < stopped_until {
        let answer = match reader.check("user:anne", "viewer", "document:1").await {
            Ok(true) => panic!(
                "the reader answered `allowed` for a revoked grant while the writer that acknowledged the revoke was stopped; before: {answers:?}"
            ),
            Ok(false) => "false".to_owned(),
            Err(e) => e.to_string().replace(|c: char| c.is_ascii_digit(), ""),
        };
        *answers.entry(answer).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("answers while the writer was stopped: {answers:?}");
    assert!(
        !answers.is_empty(),
        "the reader was never asked while the writer was stopped"
    );
}

/// A node's reply to INFO holds `field:value`.
async fn info_says(node: &Redis, section: &str, field: &str, value: &str) -> bool {
    node.command(&format!("INFO {section}"))
        .await
        .is_some_and(|i| i.lines().any(|l| l.trim() == format!("{field}:{value}")))
}

/// `node` becomes a replica of `of` and takes its data; then it is a
/// primary again, with a new replication id. The connections of its
/// clients stay open all along: nothing tells them but that id.
async fn resync_from(node: &Redis, of: &Redis) {
    let told = node
        .command(&format!("REPLICAOF 127.0.0.1 {}", of.port()))
        .await
        .unwrap_or_default();
    assert!(told.contains("OK"), "{told}");
    support::eventually(
        "the node to sync from the other",
        Duration::from_secs(30),
        || async {
            info_says(node, "replication", "master_link_status", "up").await
                && info_says(node, "persistence", "loading", "0").await
        },
    )
    .await;
    let told = node.command("REPLICAOF NO ONE").await.unwrap_or_default();
    assert!(told.contains("OK"), "{told}");
}

/// A Redis that went back to an older copy of the store under open
/// connections (here: it took the data of a node that stopped replicating
/// from it before the revoke, then was made primary again) drops no
/// connection, so a process learns of it only from the node's new
/// replication id, which every check reads. The reader must fail closed
/// from its first check on: its cached `allowed` is from before the revoke
/// the node no longer holds, and the writer that acknowledged the revoke is
/// stopped. CI once saw that first check answer `allowed` after a failover,
/// before the client's notice of the dropped connection arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_that_went_back_under_open_connections_fails_checks_closed() {
    let s = new_store("redis-loss-replid").await;
    let node = Redis::start(RedisOptions::default()).await.unwrap();
    let copy = Redis::start(RedisOptions::default()).await.unwrap();
    let url = node.url();
    let lease = STOPPED_TEST_LEASE;
    let (reader, mut writer) = reader_and_writer(&s, &url).await;
    // `copy` holds the store as it is now, then stops following `node`.
    resync_from(&copy, &node).await;

    writer.tell("revoke", "revoked").await;
    writer.signal(testenv::Signal::Stop);
    resync_from(&node, &copy).await;

    never_allowed_while_stopped(&reader, lease / 3 + Duration::from_secs(2)).await;

    writer.signal(testenv::Signal::Cont);
    until_every_check_reports_the_loss(&[&reader]).await;
}
