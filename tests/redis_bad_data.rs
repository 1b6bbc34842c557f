//! Bad Redis contents under fga-wb's keys (written with plain Redis
//! commands, as a bug, an operator or another program might) never cause a
//! panic: every call either fails with a clear Redis error or skips the bad
//! data with a log line.
#![cfg(feature = "redis")]

mod support;

use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::{Config, WriteBehind};
use support::logs::Logs;
use support::{config_for, new_store, stored, RedisConn, TestStore};

const BIN: &str = env!("CARGO_BIN_EXE_fga-wb");

fn config(s: &TestStore, prefix: &str, mode: Mode) -> Config {
    let mut c = config_for(s);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.redis.key_prefix = prefix.to_owned();
    c.flush.mode = mode;
    c.flush.interval = Duration::from_secs(3600);
    c.queue.heartbeat = Duration::from_secs(1);
    c
}

async fn redis() -> RedisConn {
    support::redis_conn().await
}

async fn cmd<T: redis::FromRedisValue>(c: &mut RedisConn, args: &[&str]) -> T {
    let mut k = redis::cmd(args[0]);
    for a in &args[1..] {
        k.arg(*a);
    }
    k.query_async(c)
        .await
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

/// A call's result is fine if it is `Ok`, or an error that says it is about
/// Redis. (A panic would already have failed the test.)
#[track_caller]
fn clear<T: std::fmt::Debug>(what: &str, r: &fga_wb::Result<T>) {
    match r {
        Ok(v) => eprintln!("{what}: ok {v:?}"),
        Err(e) => {
            eprintln!("{what}: error: {e}");
            assert!(e.is_redis(), "{what}: not a Redis error: {e:?}");
            assert!(e.to_string().contains("Redis"), "{what}: {e}");
        }
    }
}

/// Runs the `fga-wb` binary on the store `s` under key prefix `pre`: its
/// exit code (`None`: killed by a signal) and what it printed.
fn fga_wb(s: &TestStore, pre: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(BIN)
        .args(args)
        .env_clear()
        .env("FGA_API_URL", support::openfga_url())
        .env("FGA_API_TOKEN", support::openfga_token())
        .env("FGA_STORE_ID", &s.store_id)
        .env("FGA_WB_BUFFER__STORE", "redis")
        .env("FGA_WB_REDIS__URL", support::redis_url())
        .env("FGA_WB_REDIS__KEY_PREFIX", pre)
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ fga-wb {}  -> {}\n{text}", args.join(" "), out.status);
    (out.status.code(), text)
}

/// A unique key prefix per test, so tests sharing one OpenFGA store and one
/// Redis never see each other's keys.
fn prefix(name: &str) -> String {
    format!("fga-wb-bad-{name}-{}", std::process::id())
}

/// A store for a test named `name`, its key prefix `pre` and the prefix
/// `p` of its keys in Redis, an inline handle on it and a connection to
/// Redis.
struct Inline {
    s: TestStore,
    pre: String,
    p: String,
    wb: WriteBehind,
    c: RedisConn,
}

async fn inline(name: &str) -> Inline {
    inline_flushing(name, true).await
}

/// As `inline`, with the handle flushing only when asked (`automatic`
/// false).
async fn inline_flushing(name: &str, automatic: bool) -> Inline {
    let s = new_store(&format!("bad-{name}")).await;
    let pre = prefix(name);
    let p = format!("{pre}:{{{}}}", s.store_id);
    let wb = WriteBehind::builder(config(&s, &pre, Mode::Inline))
        .automatic_flush(automatic)
        .build()
        .await
        .unwrap();
    let c = redis().await;
    Inline { s, pre, p, wb, c }
}

/// Garbage as a tuple's pending entry in `:ops`: checks, pending, flush,
/// grant and revoke on it are fine; the bad entry is skipped with a log
/// line, and the next op on the key replaces it.
#[tokio::test]
async fn garbage_pending_entry() {
    let (logs, _guard) = Logs::start();
    let Inline {
        s, p, wb, mut c, ..
    } = inline("ops").await;

    // 1. A foreign value under a key nothing was pushed for.
    let k1 = "document:1#viewer@user:anne";
    let _: i64 = cmd(&mut c, &["HSET", &format!("{p}:ops"), k1, "not|an|entry"]).await;
    let r = wb.check("user:anne", "viewer", "document:1").await;
    clear("check", &r);
    assert!(!r.unwrap_or(false), "a garbage entry must not allow");
    assert!(
        logs.take().contains("corrupt"),
        "no log line for the skipped entry"
    );
    clear("pending", &wb.pending().await);
    let r = wb.flush().await;
    clear("flush", &r);
    logs.take();
    clear(
        "grant",
        &wb.grant("user:anne", "viewer", "document:1").await,
    );
    assert!(
        logs.take().contains("corrupt"),
        "no log line for the replaced entry"
    );
    assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());
    assert_eq!(wb.pending().await.unwrap().total, 1);
    assert_eq!(wb.flush().await.unwrap().applied, 1);
    assert_eq!(stored(&s).await, ["document:1#viewer@user:anne"]);

    // 2. A real pending op whose entry is then overwritten with garbage: it
    // is still counted and queued, but unreadable.
    wb.grant("user:bob", "viewer", "document:2").await.unwrap();
    let k2 = "document:2#viewer@user:bob";
    let _: i64 = cmd(&mut c, &["HSET", &format!("{p}:ops"), k2, "\u{0}garbage"]).await;
    let r = wb.check("user:bob", "viewer", "document:2").await;
    clear("check", &r);
    clear("pending", &wb.pending().await);
    logs.take();
    let r = wb.flush().await;
    clear("flush", &r);
    let flush_logs = logs.take();
    let p_after = wb.pending().await.unwrap();
    let counts: Vec<(String, i64)> = cmd(&mut c, &["HGETALL", &format!("{p}:counts")]).await;
    let ops_len: i64 = cmd(&mut c, &["HLEN", &format!("{p}:ops")]).await;
    eprintln!("after the flush: pending {p_after:?}, counts {counts:?}, entries in :ops {ops_len}");

    // The next op on the key replaces the garbage and is applied.
    clear(
        "revoke",
        &wb.revoke("user:bob", "viewer", "document:2").await,
    );
    clear("grant", &wb.grant("user:bob", "viewer", "document:2").await);
    let r = wb.flush().await.unwrap();
    assert!(r.error.is_none(), "{r:?}");
    assert!(stored(&s).await.contains(&k2.to_owned()));
    let p_end = wb.pending().await.unwrap();
    assert_eq!((p_end.total, p_end.in_flight), (0, 0));
    let counts: Vec<(String, i64)> = cmd(&mut c, &["HGETALL", &format!("{p}:counts")]).await;
    let ops_len: i64 = cmd(&mut c, &["HLEN", &format!("{p}:ops")]).await;

    // Checked last, so that everything above runs: the flush that met the
    // garbage said so, and left the counters right.
    let mut problems = Vec::new();
    if !(flush_logs.contains("corrupt") || flush_logs.contains(k2)) {
        problems.push(format!(
            "flush() dropped the unreadable pending entry of {k2} without a log line"
        ));
    }
    if !(counts.iter().all(|(_, n)| *n == 0) && ops_len == 0) {
        problems.push(format!(
            "counters drifted: counts {counts:?}, {ops_len} entries left in :ops"
        ));
    }
    assert!(problems.is_empty(), "{problems:#?}");

    // 3. A pending op overwritten with garbage, then pushed again before
    // anything met it: the push repairs the entry and queues the new op.
    // (Its ready member was added straight out, then taken out again by
    // the repair's collected removals: pending for good, never written.)
    wb.grant("user:carol", "viewer", "document:3")
        .await
        .unwrap();
    let k3 = "document:3#viewer@user:carol";
    let _: i64 = cmd(&mut c, &["HSET", &format!("{p}:ops"), k3, "\u{0}garbage"]).await;
    wb.grant("user:carol", "viewer", "document:3")
        .await
        .unwrap();
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, &r.error), (1, &None), "{r:?}");
    assert!(stored(&s).await.contains(&k3.to_owned()));
    let p_end = wb.pending().await.unwrap();
    assert_eq!((p_end.total, p_end.in_flight), (0, 0));
}

/// A dead-letter index (`:deadkey`) of another type does not fail the
/// finish that records a write after its other writes: the flush reports
/// the op applied, without an error. Before, the finish failed once its
/// ops were dropped, and its repeat found them gone and counted none.
#[tokio::test]
async fn a_letter_index_of_another_type_does_not_fail_the_finish() {
    let Inline {
        s, p, wb, mut c, ..
    } = inline("deadkey").await;
    let _: i64 = cmd(&mut c, &["RPUSH", &format!("{p}:deadkey"), "x"]).await;
    wb.grant("user:anne", "viewer", "document:dk")
        .await
        .unwrap();
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.error.as_deref()), (1, None), "{r:?}");
    assert_eq!(stored(&s).await, ["document:dk#viewer@user:anne"]);
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 0), "{p:?}");
    wb.shutdown().await.unwrap();
}

/// Non-JSON and wrong-shape JSON in `:dead`: `dead_letters()` skips them
/// with a log line; `status` counts them (it does not read the letters) and
/// `fga-wb dlq list` works.
#[tokio::test]
async fn garbage_dead_letters_are_skipped() {
    let (logs, _guard) = Logs::start();
    let Inline {
        s,
        pre,
        p,
        wb,
        mut c,
    } = inline("dead").await;
    let dead = format!("{p}:dead");
    let good = r#"{"id":3,"key":"document:1#viewer@user:ok","op":"g","seq":1,"reason":"refused","code":"validation_error","attempts":1,"dead_at":1700000000,"cond":""}"#;
    for (id, v) in [
        ("1", "not json"),
        ("2", r#"{"id":2,"key":42}"#),
        ("3", good),
        ("4", r#"{"id":4,"key":"no tuple here","op":"g","seq":1}"#),
        (
            "5",
            r#"{"id":5,"key":"document:1#viewer@user:x","op":"zap","seq":1}"#,
        ),
        ("6", r#"[1,2,3]"#),
        (
            "seven",
            r#"{"id":7,"key":"document:1#viewer@user:y","op":"r","seq":-1}"#,
        ),
    ] {
        let _: i64 = cmd(&mut c, &["HSET", &dead, id, v]).await;
    }
    let letters = wb.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].id, 3);
    assert_eq!(letters[0].tuple.to_string(), "document:1#viewer@user:ok");
    let l = logs.take();
    assert_eq!(
        l.matches("unreadable dead letter").count(),
        6,
        "one log line per skipped dead letter"
    );
    // Counted without reading them (HLEN): every entry, as purging
    // removes them all.
    let st = wb.status().await.unwrap();
    assert_eq!(st.dead_letters, 7);

    let run = |args: &[&str]| fga_wb(&s, &pre, args);
    let (code, text) = run(&["dlq", "list"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("document:1#viewer@user:ok"), "{text}");
    let (code, text) = run(&["dlq", "list", "--json"]);
    assert_eq!(code, Some(0), "{text}");
    let (code, text) = run(&["status"]);
    assert_eq!(code, Some(0), "{text}");
    // The log line says purging removes an unreadable letter, by its id
    // too: `dlq purge 1 2` said "no dead letter with id 1, 2".
    let (code, text) = run(&["dlq", "purge", "1", "2"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("purged 2 dead letters"), "{text}");
    let (code, text) = run(&["dlq", "purge", "99"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("no dead letter with id 99"), "{text}");
    let left: i64 = cmd(&mut c, &["HLEN", &dead]).await;
    assert_eq!(left, 5);
    // Nothing of it can be replayed: a replay by id says so, and how to
    // get rid of it (it replayed nothing and exited 0).
    let (code, text) = run(&["dlq", "replay", "4"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("`fga-wb dlq purge 4` removes it"), "{text}");

    // Invalid UTF-8 in a dead letter.
    let _: i64 = redis::cmd("HSET")
        .arg(&dead)
        .arg("8")
        .arg(&b"\xff\xfe{"[..])
        .query_async(&mut c)
        .await
        .unwrap();
    let mut problems = Vec::new();
    let r = wb.dead_letters().await;
    clear("dead_letters with invalid UTF-8", &r);
    if r.is_err() {
        problems.push("dead_letters() fails instead of skipping the letter".to_owned());
    }
    let r = wb.status().await;
    clear("status with invalid UTF-8", &r);
    if r.is_err() {
        problems.push("status() fails".to_owned());
    }
    for args in [
        &["dlq", "list"][..],
        &["status"],
        &["dlq", "purge", "--all", "--yes"],
    ] {
        let (code, text) = run(args);
        assert!(code == Some(0) || code == Some(1), "{text}");
        if code != Some(0) {
            problems.push(format!("`fga-wb {}` exits {code:?}", args.join(" ")));
        }
        // Every letter removed is counted, readable or not (3 to 6,
        // `seven` and the one that is not UTF-8).
        if args.get(1) == Some(&"purge") && !text.contains("purged 6 dead letters") {
            problems.push(format!("`fga-wb dlq purge --all` said: {text}"));
        }
    }
    // Purging clears the garbage too, so an operator can get rid of it.
    let n = wb.purge_dead_letters(None).await;
    clear("purge", &n);
    let left: i64 = cmd(&mut c, &["HLEN", &dead]).await;
    if left != 0 {
        problems.push(format!("purge_dead_letters(None) leaves {left} entries"));
    }
    assert!(
        problems.is_empty(),
        "one dead letter that is not UTF-8 under {dead}: {problems:#?}"
    );
}

/// `:seq` that is not a number: grant fails with a clear Redis error and
/// buffers nothing; after the key is fixed, grants work again.
#[tokio::test]
async fn sequence_that_is_not_a_number() {
    let (logs, _guard) = Logs::start();
    let Inline { p, wb, mut c, .. } = inline("seq").await;
    let _: () = cmd(&mut c, &["SET", &format!("{p}:seq"), "abc"]).await;

    let r = wb.grant("user:a", "viewer", "document:1").await;
    clear("grant", &r);
    let e = r.expect_err("grant with a corrupt sequence");
    assert!(e.is_redis() && !e.is_transient(), "{e:?}");
    let r = wb.revoke("user:a", "viewer", "document:1").await;
    clear("revoke", &r);
    assert!(r.is_err());
    assert_eq!(wb.pending().await.unwrap().total, 0, "nothing buffered");
    let r = wb.flush().await;
    clear("flush", &r);
    if let Ok(report) = &r {
        assert!(
            report.error.as_deref().is_some_and(|e| e.contains("Redis")) || report.requests == 0
        );
    }
    clear("check", &wb.check("user:a", "viewer", "document:1").await);
    clear("status", &wb.status().await);
    logs.take();

    let _: i64 = cmd(&mut c, &["DEL", &format!("{p}:seq")]).await;
    wb.grant("user:a", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().applied, 1);
}

/// A sequence number past 14 digits (set by hand, or after some 10^14 ops)
/// is written out in full: Lua's own number formatting gave "1e+14", which
/// the grant could not read back (it reported the buffer full, with the op
/// buffered) and the flush then dropped as a corrupt entry.
#[tokio::test]
async fn sequence_numbers_past_fourteen_digits() {
    let Inline {
        s, p, wb, mut c, ..
    } = inline("seq-digits").await;
    let _: () = cmd(&mut c, &["SET", &format!("{p}:seq"), "99999999999998"]).await;
    for i in 0..4 {
        wb.grant(&format!("user:d{i}"), "viewer", "document:digits")
            .await
            .unwrap();
    }
    let seq: String = cmd(&mut c, &["GET", &format!("{p}:seq")]).await;
    assert_eq!(seq, "100000000000002");
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.error.as_deref()), (4, None), "{r:?}");
    assert_eq!(stored(&s).await.len(), 4);

    // Past what 64 bits hold (Lua's numbers round it up to 2^63): a Redis
    // error, not a full buffer to wait on.
    let _: () = cmd(&mut c, &["SET", &format!("{p}:seq"), "9223372036854775500"]).await;
    let r = wb.grant("user:big", "viewer", "document:digits").await;
    clear("grant", &r);
    let e = r.expect_err("a sequence number past 64 bits");
    assert!(!e.is_buffer_full(), "{e}");
    wb.shutdown().await.unwrap();
}

/// Counters that are not numbers (`:termseq`, which a new writer's first
/// call draws from, and `:jobseq`, which a queue-mode flush draws from):
/// the call fails with an error that names the key, and works once the key
/// is gone.
#[tokio::test]
async fn counters_that_are_not_numbers_are_named() {
    let Inline {
        s, pre, p, mut c, ..
    } = inline("counters").await;
    for (key, mode) in [(":termseq", Mode::Inline), (":jobseq", Mode::Queue)] {
        let k = format!("{p}{key}");
        let _: () = cmd(&mut c, &["SET", &k, "abc"]).await;
        let wb = WriteBehind::builder(config(&s, &pre, mode))
            .automatic_flush(false)
            .build()
            .await
            .unwrap();
        wb.grant("user:a", "viewer", "document:1").await.unwrap();
        let e = match wb.flush().await {
            Ok(r) => r.error.expect("the flush failed"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(&k) && e.contains("not written by fga-wb"),
            "{key}: {e}"
        );
        let _: i64 = cmd(&mut c, &["DEL", &k]).await;
        let r = wb.flush().await.unwrap();
        assert_eq!(r.applied + r.queued, 1, "{key}: {r:?}");
        wb.shutdown().await.unwrap();
    }
}

/// Runs every handle call once; each must be `Ok` or a clear Redis error.
/// Returns what Redis holds for the grant's tuple if the grant failed.
async fn every_call(wb: &WriteBehind, label: &str, c: &mut RedisConn, ops: &str) -> Option<String> {
    let g = wb.grant("user:w", "viewer", "document:w").await;
    clear(&format!("{label}: grant"), &g);
    let mut held = None;
    if g.is_err() {
        // Whether the op that was reported as failed is in Redis anyway.
        let raw: redis::RedisResult<Option<String>> = redis::cmd("HGET")
            .arg(ops)
            .arg("document:w#viewer@user:w")
            .query_async(c)
            .await;
        if let Ok(Some(raw)) = raw {
            let allowed = wb.check("user:w", "viewer", "document:w").await;
            held = Some(format!("{raw} (and check says {allowed:?})"));
        }
    }
    clear(
        &format!("{label}: check"),
        &wb.check("user:w", "viewer", "document:w").await,
    );
    clear(
        &format!("{label}: check other"),
        &wb.check("user:z", "viewer", "document:z").await,
    );
    clear(&format!("{label}: pending"), &wb.pending().await);
    clear(&format!("{label}: status"), &wb.status().await);
    clear(&format!("{label}: dead_letters"), &wb.dead_letters().await);
    clear(&format!("{label}: flush"), &wb.flush().await);
    clear(
        &format!("{label}: revoke"),
        &wb.revoke("user:w", "viewer", "document:w").await,
    );
    clear(&format!("{label}: clear"), &wb.clear().await);
    held
}

/// Keys of the wrong Redis type (a string where a hash is expected, and so
/// on) and counters that are not numbers: every call is fine or a clear
/// error, and a grant that reports an error has buffered nothing.
#[tokio::test]
async fn wrong_types_and_non_numeric_counters() {
    let (logs, _guard) = Logs::start();
    let s = new_store("bad-types").await;
    let mut c = redis().await;
    let mut buffered_despite_error = Vec::new();
    for (i, (key, setup)) in [
        (":ops", vec!["SET", "{K}", "a string"]),
        (":ready:g", vec!["SET", "{K}", "a string"]),
        (":ready:r", vec!["HSET", "{K}", "f", "v"]),
        (":counts", vec!["RPUSH", "{K}", "x"]),
        (
            ":counts",
            vec!["HSET", "{K}", "pg", "many", "pr", "1.5", "t", "-", "j", "x"],
        ),
        (":gen", vec!["SET", "{K}", "a string"]),
        (
            ":gen",
            vec!["HSET", "{K}", "*", "lots", "document#viewer", "x"],
        ),
        (":rel", vec!["SET", "{K}", "a string"]),
        (":dead", vec!["SET", "{K}", "a string"]),
        (":owners", vec!["SET", "{K}", "a string"]),
        (":blocked", vec!["SADD", "{K}", "x"]),
        (":jobs", vec!["SET", "{K}", "a string"]),
        (":jobq", vec!["HSET", "{K}", "f", "v"]),
        (":stats", vec!["SET", "{K}", "a string"]),
        (
            ":stats",
            vec![
                "HSET",
                "{K}",
                "acknowledged",
                "lots",
                "applied",
                "x",
                "last_flush",
                "{not json",
                "stopped",
                "\u{1}",
            ],
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let pre = prefix(&format!("types{i}"));
        let p = format!("{pre}:{{{}}}", s.store_id);
        let k = format!("{p}{key}");
        let args: Vec<String> = setup.iter().map(|a| a.replace("{K}", &k)).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _: redis::Value = cmd(&mut c, &args).await;
        let wb = WriteBehind::builder(config(&s, &pre, Mode::Inline))
            .build()
            .await
            .unwrap();
        let label = format!("{key} = {:?}", &setup[2..]);
        if let Some(raw) = every_call(&wb, &label, &mut c, &format!("{p}:ops")).await {
            eprintln!("{label}: the grant failed, but Redis holds its op: {raw}");
            buffered_despite_error.push(format!("{label}: {raw}"));
        }
        let _: i64 = cmd(&mut c, &["DEL", &k]).await;
        // And the store works again.
        wb.grant("user:v", "viewer", "document:v").await.unwrap();
        wb.clear().await.unwrap();
        wb.shutdown().await.unwrap();
        logs.take();
    }
    // `fga-wb status` with non-numeric stats works.
    let pre = prefix("stats-cli");
    let p = format!("{pre}:{{{}}}", s.store_id);
    let _: i64 = cmd(
        &mut c,
        &[
            "HSET",
            &format!("{p}:stats"),
            "acknowledged",
            "lots",
            "last_flush",
            "{",
            "stopped",
            "",
        ],
    )
    .await;
    let (code, text) = fga_wb(&s, &pre, &["status"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        buffered_despite_error.is_empty(),
        "grant returned an error, yet its op is in Redis and would be written: {buffered_despite_error:?}"
    );
}

/// A pending entry whose numbers are too long for 64 bits is garbage like
/// any other: the flush drops it with a log line instead of taking it and
/// then failing to read it (which left it taken, and never written).
#[tokio::test]
async fn numbers_too_long_for_64_bits() {
    let (logs, _guard) = Logs::start();
    let Inline {
        s, p, wb, mut c, ..
    } = inline("long").await;
    let key = "document:n#viewer@user:n";
    let key2 = "document:n#viewer@user:m";
    wb.grant("user:n", "viewer", "document:n").await.unwrap();
    wb.grant("user:m", "viewer", "document:n").await.unwrap();
    // One entry's sequence number is too long, the other's `since`.
    for (k, field) in [(key, 0), (key2, 2)] {
        let raw: String = cmd(&mut c, &["HGET", &format!("{p}:ops"), k]).await;
        let mut fields: Vec<&str> = raw.split('|').collect();
        fields[field] = "99999999999999999999";
        let long = fields.join("|");
        let _: i64 = cmd(&mut c, &["HSET", &format!("{p}:ops"), k, &long]).await;
    }
    logs.take();

    let r = wb.flush().await;
    clear("flush", &r);
    assert!(logs.take().contains("corrupt"), "no log line for the entry");
    let left = wb.pending().await.unwrap();
    assert_eq!(left.in_flight, 0, "the entry was left taken: {left:?}");
    wb.grant("user:n", "viewer", "document:n").await.unwrap();
    wb.grant("user:m", "viewer", "document:n").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().applied, 2);
    assert_eq!(stored(&s).await, [key2, key]);
}

/// Replaces the condition of `key`'s entry in `:ops` (its last field) with
/// `cond`.
async fn set_stored_condition(c: &mut RedisConn, ops: &str, key: &str, cond: &str) {
    let raw: String = cmd(c, &["HGET", ops, key]).await;
    let (head, _) = raw.rsplit_once('|').expect("an entry");
    let _: i64 = cmd(c, &["HSET", ops, key, &format!("{head}|{cond}")]).await;
}

/// A pending grant whose stored condition cannot be read (not JSON fga-wb
/// wrote) is never taken for an unconditional grant: a check on it waits
/// for the flusher to dead-letter it (with the reason, instead of writing it
/// without its condition), then asks OpenFGA, which never had it.
#[tokio::test]
async fn unreadable_condition_is_never_dropped() {
    let (logs, _guard) = Logs::start();
    let Inline {
        s, p, wb, mut c, ..
    } = inline("cond").await;
    let key = "document:c#viewer@user:c";
    wb.grant("user:c", "viewer", "document:c").await.unwrap();
    set_stored_condition(&mut c, &format!("{p}:ops"), key, "{\"name\":").await;

    let r = wb.check("user:c", "viewer", "document:c").await;
    clear("check", &r);
    assert!(
        matches!(r, Ok(false)),
        "a check on an unreadable pending grant: {r:?}"
    );

    // Dead-lettered as it was taken (for the check), before anything was
    // written.
    let report = wb.flush().await.unwrap();
    assert_eq!(report.applied, 0, "{report:?}");
    assert!(
        !stored(&s).await.contains(&key.to_owned()),
        "written without its condition"
    );
    assert_eq!(wb.status().await.unwrap().totals.dead_lettered, 1);
    let letters = wb.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].tuple.to_string(), key);
    assert!(letters[0].reason.contains("condition"), "{letters:?}");
    let left = wb.pending().await.unwrap();
    assert_eq!((left.total, left.in_flight), (0, 0), "{left:?}");
    assert!(logs.take().contains("dead-lettered"));
}

/// A flush that dead-letters an op whose stored condition cannot be read,
/// as it takes it, reports it (before, only the store's totals counted it).
#[tokio::test]
async fn a_flush_reports_what_it_dead_lettered_unread() {
    let Inline { p, wb, mut c, .. } = inline_flushing("cond-report", false).await;
    let key = "document:r#viewer@user:r";
    wb.grant("user:r", "viewer", "document:r").await.unwrap();
    wb.grant("user:ok", "viewer", "document:r").await.unwrap();
    set_stored_condition(&mut c, &format!("{p}:ops"), key, "{\"name\":").await;
    let report = wb.flush().await.unwrap();
    assert_eq!((report.applied, report.dead_lettered), (1, 1), "{report:?}");
    assert_eq!(wb.status().await.unwrap().totals.dead_lettered, 1);
}

/// A pending revoke whose stored condition cannot be read is written all
/// the same: OpenFGA deletes a tuple by its key alone. Before, it was
/// dead-lettered for good, and OpenFGA kept the tuple it revoked.
#[tokio::test]
async fn a_revoke_is_written_whatever_its_stored_condition() {
    let Inline {
        s, p, wb, mut c, ..
    } = inline_flushing("cond-revoke", false).await;
    let key = "document:v#viewer@user:v";
    let t = fga_wb::TupleKey::new("user:v", "viewer", "document:v").unwrap();
    let req = fga_wb::openfga::WriteRequest::idempotent(vec![t], vec![]);
    s.client.write(&s.store_id, &req).await.unwrap();
    wb.revoke("user:v", "viewer", "document:v").await.unwrap();
    set_stored_condition(&mut c, &format!("{p}:ops"), key, "{\"name\":").await;
    let report = wb.flush().await.unwrap();
    assert_eq!((report.applied, report.dead_lettered), (1, 0), "{report:?}");
    assert!(!stored(&s).await.contains(&key.to_owned()), "not revoked");
    assert!(!wb.check("user:v", "viewer", "document:v").await.unwrap());
}

/// The same in queue mode, where the condition travels in the job: the
/// worker dead-letters the op and writes the rest of the job.
#[tokio::test]
async fn unreadable_condition_in_a_job_is_dead_lettered() {
    let (_logs, _guard) = Logs::start();
    let s = new_store("bad-cond-job").await;
    let pre = prefix("cond-job");
    let cfg = config(&s, &pre, Mode::Queue);
    let p = format!("{pre}:{{{}}}", s.store_id);
    let wb = WriteBehind::builder(cfg.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let mut c = redis().await;
    wb.grant("user:bad", "viewer", "document:j").await.unwrap();
    wb.grant("user:good", "viewer", "document:j").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 2);
    let ids: Vec<String> = cmd(&mut c, &["HKEYS", &format!("{p}:jobs")]).await;
    let [id] = &ids[..] else {
        panic!("one job: {ids:?}")
    };
    let job: String = cmd(&mut c, &["HGET", &format!("{p}:jobs"), id]).await;
    let mut json: serde_json::Value = serde_json::from_str(&job).unwrap();
    for op in json["ops"].as_array_mut().unwrap() {
        if op["key"] == "document:j#viewer@user:bad" {
            op["cond"] = "{not json".into();
        }
    }
    let _: i64 = cmd(
        &mut c,
        &["HSET", &format!("{p}:jobs"), id, &json.to_string()],
    )
    .await;

    let (stop, worker) = start_worker(&cfg);
    let deadline = Instant::now() + Duration::from_secs(20);
    while wb.dead_letters().await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the op was not dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, text) = fga_wb(&s, &pre, &["flush", "--wait", "--timeout", "20s"]);
    assert_eq!(code, Some(0), "{text}");
    assert_eq!(stored(&s).await, ["document:j#viewer@user:good"]);
    let letters = wb.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].tuple.to_string(), "document:j#viewer@user:bad");
    assert!(letters[0].reason.contains("condition"), "{letters:?}");
    stop_worker(stop, worker).await;
}

/// A writer's term that is not a number is replaced, as a missing one is:
/// the writer's next take still hands it its ops (a nil would cut the
/// script's reply short, leaving them taken and never written).
#[tokio::test]
async fn term_that_is_not_a_number() {
    let (_logs, _guard) = Logs::start();
    let Inline {
        s, p, wb, mut c, ..
    } = inline("term").await;
    wb.grant("user:a", "viewer", "document:t").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().applied, 1);
    let writers: Vec<String> = cmd(&mut c, &["HKEYS", &format!("{p}:terms")]).await;
    assert!(!writers.is_empty(), "no term recorded");
    for w in &writers {
        let _: i64 = cmd(&mut c, &["HSET", &format!("{p}:terms"), w, "x"]).await;
    }
    wb.grant("user:b", "viewer", "document:t").await.unwrap();
    let report = wb.flush().await.unwrap();
    assert_eq!(report.applied, 1, "{report:?}");
    assert_eq!(
        stored(&s).await,
        ["document:t#viewer@user:a", "document:t#viewer@user:b"]
    );
}

/// Times in Redis past what a clock holds or RFC 3339 shows, and a loss
/// record's count that is not a number: status, dead letters, checks and
/// the operator's commands answer, none panics, and the loss can still be
/// acknowledged.
#[tokio::test]
async fn times_out_of_range() {
    let (_logs, _guard) = Logs::start();
    let Inline {
        s,
        pre,
        p,
        wb,
        mut c,
    } = inline("times").await;
    wb.grant("user:a", "viewer", "document:t").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().applied, 1);
    let last: String = cmd(&mut c, &["HGET", &format!("{p}:stats"), "last_flush"]).await;
    let mut last: serde_json::Value = serde_json::from_str(&last).unwrap();
    last["at"] = 1.8e19.into();
    let letter = r#"{"id":1,"key":"document:1#viewer@user:t","op":"g","seq":1,"reason":"r","code":"","attempts":1,"dead_at":18446744073709551615,"cond":""}"#;
    for args in [
        vec![
            "HSET",
            &format!("{p}:stats"),
            "last_flush",
            &last.to_string(),
        ],
        vec!["HSET", &format!("{p}:dead"), "1", letter],
        vec![
            "HSET",
            &format!("{p}:loss"),
            "at",
            "99999999999999999",
            "by",
            "a test",
            "reason",
            "planted",
            "more",
            "lots",
        ],
    ] {
        let _: i64 = cmd(&mut c, &args).await;
    }
    let status = wb.status().await;
    clear("status", &status);
    assert!(status.is_ok());
    let letters = wb.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let r = wb.check("user:a", "viewer", "document:t").await;
    assert!(r.is_err(), "a check during a loss must fail closed: {r:?}");
    for args in [
        &["status"][..],
        &["dlq", "list"],
        &["loss"],
        &["loss", "--ack"],
    ] {
        let (code, text) = fga_wb(&s, &pre, args);
        assert!(
            matches!(code, Some(0 | 1)),
            "`fga-wb {}`: {text}",
            args.join(" ")
        );
    }
    let open: i64 = cmd(&mut c, &["EXISTS", &format!("{p}:loss")]).await;
    assert_eq!(open, 0, "`fga-wb loss --ack` left the loss open");
}

type Worker = tokio::task::JoinHandle<fga_wb::Result<()>>;

/// A queue worker in this process, and the sender that stops it.
fn start_worker(cfg: &Config) -> (tokio::sync::oneshot::Sender<()>, Worker) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let worker = tokio::spawn(fga_wb::queue::worker::run(cfg.clone(), 1, async move {
        let _ = stopped.await;
    }));
    (stop, worker)
}

async fn stop_worker(stop: tokio::sync::oneshot::Sender<()>, worker: Worker) {
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), worker)
        .await
        .expect("worker stopped")
        .expect("worker task")
        .expect("worker ended cleanly");
}

/// A queued job whose payload no longer decodes (a foreign or corrupted
/// job) must not take the worker down nor lose the ops it held: the worker
/// applies the good job, sets the bad one aside with a log line, and the
/// op the bad job held is pending again, so a later flush applies it.
#[tokio::test]
async fn undecodable_job_payload() {
    job_set_aside("job", |_, _| "{\"not\":\"a job\"}".into()).await;
}

/// The same for a job whose ops are not objects (the store script read
/// them as if they were, and raised after taking the job off the queue).
#[tokio::test]
async fn job_whose_ops_are_not_objects() {
    job_set_aside("job-ops", |_, _| "{\"ops\":[1,null]}".into()).await;
}

/// The same for jobs that look like fga-wb's to the store script (their
/// ops listed apart) but do not decode: one with its id as a string, one
/// that is not JSON past its start. The worker set aside the id it read
/// from the payload (`"7"` with its quotes, or none), which matched no
/// job: the job stayed running, its op held for good.
#[tokio::test]
async fn jobs_the_script_reads_but_the_worker_cannot() {
    job_set_aside("job-strid", |_, id| {
        format!("{{\"id\":\"{id}\",\"ops\":7}}")
    })
    .await;
    job_set_aside("job-notjson", |_, id| format!("{{\"id\":{id},\"ops\":[")).await;
    // A whole job stored under another id (copied, restored): it was run,
    // and finished under the id in its JSON, which ended nothing.
    job_set_aside("job-otherid", |json, id| {
        json.replacen(&format!("{{\"id\":{id},"), "{\"id\":999999,", 1)
    })
    .await;
}

/// A job whose claim list (kept beside its JSON, so that fetch claims its
/// ops without decoding it) is not its own: a worker of a version before
/// claim lists were dropped on a retry rewrote the JSON with fewer ops and
/// left the list. Paired by place, claims landed on the wrong ops (here
/// the job's one op got none and stayed held by a job that was gone). And
/// a job with an op of unknown kind, which was left out and stayed held
/// the same way. Both are set aside, their ops pending again.
#[tokio::test]
async fn jobs_whose_claims_do_not_match_their_ops() {
    job_set_aside("job-fewer", |json, _| {
        let start = json.find("\"ops\":[").unwrap() + "\"ops\":[".len();
        let end = start + json[start..].find(']').unwrap();
        format!("{}{}", &json[..start], &json[end..])
    })
    .await;
    job_set_aside("job-kind", |json, _| {
        json.replacen("\"op\":\"g\"", "\"op\":\"x\"", 1)
    })
    .await;
}

/// Queues a job, replaces its payload with `payload(stored, id)`, and
/// checks the worker sets it aside with its op pending again.
async fn job_set_aside(name: &str, payload: impl Fn(&str, &str) -> String) {
    let (logs, _guard) = Logs::start();
    let s = new_store(&format!("bad-{name}")).await;
    let pre = prefix(name);
    let cfg = config(&s, &pre, Mode::Queue);
    let p = format!("{pre}:{{{}}}", s.store_id);
    let wb = WriteBehind::builder(cfg.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let mut c = redis().await;

    // Job 1: its payload is then replaced with garbage.
    wb.grant("user:lost", "viewer", "document:1").await.unwrap();
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    let ids: Vec<String> = cmd(&mut c, &["HKEYS", &format!("{p}:jobs")]).await;
    assert_eq!(ids.len(), 1);
    let bad = ids[0].clone();
    let queued: String = cmd(&mut c, &["HGET", &format!("{p}:jobs"), &bad]).await;
    let payload = payload(&queued, &bad);
    assert_ne!(payload, queued);
    let _: i64 = cmd(&mut c, &["HSET", &format!("{p}:jobs"), &bad, &payload]).await;
    // Job 2: good.
    for i in 0..3 {
        wb.grant(&format!("user:g{i}"), "viewer", "document:2")
            .await
            .unwrap();
    }
    assert_eq!(wb.flush().await.unwrap().queued, 3);

    let (stop, mut worker) = start_worker(&cfg);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ended = None;
    while stored(&s).await.len() < 3 && Instant::now() < deadline {
        tokio::select! {
            r = &mut worker => { ended = Some(r); break; }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    assert!(
        ended.is_none(),
        "the worker stopped at the bad job: {ended:?}"
    );
    assert_eq!(stored(&s).await.len(), 3, "the good job was applied");
    let l = logs.take();
    assert!(l.contains("not decode"), "no log line for the bad job: {l}");
    // The bad job's op is pending again, nothing is lost: flushed again,
    // the worker applies it.
    let p_now = wb.pending().await.unwrap();
    assert_eq!((p_now.total, p_now.in_flight), (1, 0), "{p_now:?}");
    assert_eq!(wb.flush().await.unwrap().queued, 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored(&s).await.len() < 4 {
        assert!(
            Instant::now() < deadline,
            "the re-queued op was not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(stored(&s)
        .await
        .contains(&"document:1#viewer@user:lost".to_owned()));
    let set_aside: Vec<String> = cmd(&mut c, &["HKEYS", &format!("{p}:badjobs")]).await;
    assert_eq!(set_aside, [bad]);
    stop_worker(stop, worker).await;
}

/// The ops of a job set aside are written without anyone calling flush:
/// the automatic flusher of a handle that queued them earlier hears they
/// are pending again and queues them anew.
#[tokio::test]
async fn ops_of_a_job_set_aside_are_queued_again_by_the_automatic_flusher() {
    let (logs, _guard) = Logs::start();
    let s = new_store("bad-job-auto").await;
    let pre = prefix("job-auto");
    let mut cfg = config(&s, &pre, Mode::Queue);
    cfg.flush.interval = Duration::from_millis(200);
    let p = format!("{pre}:{{{}}}", s.store_id);
    let wb = WriteBehind::builder(cfg.clone()).build().await.unwrap();
    let mut c = redis().await;

    // The automatic flusher queues the op; the job is then corrupted.
    wb.grant("user:lost", "viewer", "document:1").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let bad = loop {
        let ids: Vec<String> = cmd(&mut c, &["HKEYS", &format!("{p}:jobs")]).await;
        if let [id] = &ids[..] {
            break id.clone();
        }
        assert!(Instant::now() < deadline, "the op was not queued: {ids:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _: i64 = cmd(&mut c, &["HSET", &format!("{p}:jobs"), &bad, "garbage"]).await;

    let (stop, worker) = start_worker(&cfg);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !stored(&s)
        .await
        .contains(&"document:1#viewer@user:lost".to_owned())
    {
        assert!(
            Instant::now() < deadline,
            "the op of the job set aside was not queued again: {:?}",
            wb.pending().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(logs.take().contains("do not decode"));
    let set_aside: Vec<String> = cmd(&mut c, &["HKEYS", &format!("{p}:badjobs")]).await;
    assert_eq!(set_aside, [bad]);
    stop_worker(stop, worker).await;
    wb.shutdown().await.unwrap();
}

/// A pending revoke on a relation checks count on every object (a group's
/// members, reached through a userset) is counted from the revoke index
/// too, not only the relation's counter: with the counter drifted to 0
/// (data fga-wb did not write), the check still waits for the revoke and
/// fails closed. Before, it answered "allowed" from OpenFGA.
#[tokio::test]
async fn a_revoke_counter_that_drifted_low_still_denies() {
    let Inline {
        s, p, wb, mut c, ..
    } = inline("revoke-counter").await;
    support::write_to_openfga(&s, "group:eng#member", "viewer", "document:d").await;
    support::write_to_openfga(&s, "user:anne", "member", "group:eng").await;
    assert!(wb.check("user:anne", "viewer", "document:d").await.unwrap());
    let app = revokes_held(&s, "revoke-counter", true).await;
    app.revoke("user:anne", "member", "group:eng")
        .await
        .unwrap();
    // Also what no count is, which Lua's `tonumber` reads ("nan" failed
    // every comparison, and reached Rust as a count of zero).
    for counter in ["0", "nan", "inf", "-inf", "1e30", "-5"] {
        let _: i64 = cmd(
            &mut c,
            &["HSET", &format!("{p}:rel"), "group#member|r", counter],
        )
        .await;
        let a = app.check("user:anne", "viewer", "document:d").await;
        assert!(
            matches!(&a, Err(e) if e.is_stale_check()),
            "with the revoke pending and the counter at {counter}: {a:?}"
        );
    }
    drop(wb);
    app.shutdown().await.unwrap();
}

/// A relation's count that drifted low (data fga-wb did not write) and
/// reaches 0 with a revoke pending stays listed: a check with no model
/// counts every listed relation's ops from its index, and still waits for
/// the revoke and fails closed. Before, the count went at 0 and the check
/// answered "allowed" from OpenFGA.
#[tokio::test]
async fn a_relation_count_that_drifted_to_zero_stays_while_ops_are_pending() {
    let Inline {
        s, p, wb, mut c, ..
    } = inline("rel-count-zero").await;
    support::write_to_openfga(&s, "user:anne", "viewer", "document:z").await;
    assert!(wb.check("user:anne", "viewer", "document:z").await.unwrap());
    let _: i64 = cmd(
        &mut c,
        &["HSET", &format!("{p}:rel"), "document#viewer|r", "-1"],
    )
    .await;
    let app = revokes_held(&s, "rel-count-zero", false).await;
    app.revoke("user:anne", "viewer", "document:z")
        .await
        .unwrap();
    let a = app.check("user:anne", "viewer", "document:z").await;
    assert!(matches!(&a, Err(e) if e.is_stale_check()), "{a:?}");
    drop(wb);
    app.shutdown().await.unwrap();
}

/// A handle of the store under `name`'s prefix that keeps its revokes
/// pending (no eager flush, none automatic), and whose checks that wait
/// for one fail closed after 200 ms; it reads the model if `read_model`.
async fn revokes_held(s: &TestStore, name: &str, read_model: bool) -> WriteBehind {
    let mut cfg = config(s, &prefix(name), Mode::Inline);
    cfg.flush.eager_revokes = false;
    cfg.check.revoke_wait_timeout = Duration::from_millis(200);
    WriteBehind::builder(cfg)
        .automatic_flush(false)
        .read_model(read_model)
        .build()
        .await
        .unwrap()
}

/// A grant counter that drifted low (data fga-wb did not write) does not
/// send more pending grants with a check than OpenFGA takes (100): the
/// grants listed count, as a count over the limit does. Before, the list
/// went out whole, OpenFGA refused it, and every check on the relation
/// failed until a flush.
#[tokio::test]
async fn a_grant_counter_that_drifted_low_sends_no_more_than_the_limit() {
    let Inline {
        s, p, wb, mut c, ..
    } = inline_flushing("grant-counter", false).await;
    support::write_to_openfga(&s, "group:eng#member", "viewer", "document:d").await;
    for i in 0..120 {
        wb.grant(&format!("user:u{i}"), "member", &format!("group:g{i}"))
            .await
            .unwrap();
    }
    wb.grant("user:anne", "member", "group:eng").await.unwrap();
    let _: i64 = cmd(
        &mut c,
        &["HSET", &format!("{p}:rel"), "group#member|g", "10"],
    )
    .await;
    let a = wb.check("user:anne", "viewer", "document:d").await;
    assert!(matches!(a, Ok(true)), "{a:?}");
}

/// A loss record without its fields (data fga-wb did not write) still
/// fails checks closed, shows in `status`, and can be acknowledged.
/// Before, `status` showed no loss and acknowledging it said none was
/// open, so checks failed closed for good.
#[tokio::test]
async fn a_loss_record_without_its_fields_can_be_acknowledged() {
    let Inline { p, wb, mut c, .. } = inline("loss-fields").await;
    let loss = format!("{p}:loss");
    let _: i64 = cmd(&mut c, &["HSET", &loss, "junk", "1"]).await;
    let r = wb.check("user:a", "viewer", "document:1").await;
    assert!(r.is_err(), "a check during a loss must fail closed: {r:?}");
    let st = wb.status().await.unwrap();
    assert!(st.loss.is_some(), "{st:?}");
    let closed = wb.acknowledge_loss("a test").await.unwrap();
    assert!(
        closed.is_some_and(|l| l.contains("an unreadable record of a loss")),
        "the record closed is told"
    );
    let open: i64 = cmd(&mut c, &["EXISTS", &loss]).await;
    assert_eq!(open, 0);
    assert!(!wb.check("user:a", "viewer", "document:1").await.unwrap());
}

/// A grant or revoke that fails on a key of another type (here the totals
/// or the check generations) has written nothing: before, it had already
/// listed its op in the relation's index of pending revokes, and every
/// check on that relation then waited for a revoke that did not exist, and
/// failed closed, until that very tuple was written.
#[tokio::test]
async fn a_push_that_fails_on_a_key_of_another_type_leaves_nothing_behind() {
    let s = new_store("bad-push-abort").await;
    let mut c = redis().await;
    for (i, key) in [":stats", ":gen", ":rel"].into_iter().enumerate() {
        let pre = prefix(&format!("push-abort{i}"));
        let p = format!("{pre}:{{{}}}", s.store_id);
        let mut cfg = config(&s, &pre, Mode::Inline);
        cfg.check.revoke_wait_timeout = Duration::from_secs(2);
        let wb = WriteBehind::builder(cfg)
            .automatic_flush(false)
            .build()
            .await
            .unwrap();
        let bad = format!("{p}{key}");
        let _: () = cmd(&mut c, &["SET", &bad, "a string"]).await;
        let r = wb.revoke("user:w", "viewer", "document:w").await;
        clear(key, &r);
        let e = r.expect_err("the revoke cannot be buffered").to_string();
        assert!(e.contains(&bad), "{key}: the error names the key: {e}");
        for (index, what) in [
            ("lex:document#viewer|r", "the relation's index"),
            ("ready:r", "the ready set"),
        ] {
            let n: i64 = cmd(&mut c, &["ZCARD", &format!("{p}:{index}")]).await;
            assert_eq!(n, 0, "{key}: the failed revoke is in {what}");
        }
        let entries: i64 = cmd(&mut c, &["HLEN", &format!("{p}:ops")]).await;
        assert_eq!(entries, 0, "{key}: the failed revoke's entry");
        let counts: Vec<Option<String>> =
            cmd(&mut c, &["HMGET", &format!("{p}:counts"), "pg", "pr"]).await;
        assert!(
            counts.iter().all(|v| v.as_deref().is_none_or(|v| v == "0")),
            "{key}: the failed revoke is counted: {counts:?}"
        );
        let _: i64 = cmd(&mut c, &["DEL", &bad]).await;
        // Nothing pending: a check on the relation asks OpenFGA at once.
        let allowed = wb.check("user:x", "viewer", "document:w").await;
        assert!(matches!(allowed, Ok(false)), "{key}: {allowed:?}");
        wb.shutdown().await.unwrap();
    }
}

/// A dead-letter index (`:deadkey`) of another type fails the finish that
/// would dead-letter an op before it writes the letter: before, the letter
/// was written, the finish failed, and each flush after wrote the op's
/// letter again. Once the key is gone, the op has one letter.
#[tokio::test]
async fn a_finish_that_fails_on_a_key_of_another_type_writes_no_letter() {
    let Inline { p, wb, mut c, .. } = inline_flushing("finish-abort", false).await;
    let key = "document:f#viewer@user:f";
    wb.grant("user:f", "viewer", "document:f").await.unwrap();
    // An op the flush dead-letters as it takes it: its stored condition
    // cannot be read.
    set_stored_condition(&mut c, &format!("{p}:ops"), key, "{\"name\":").await;
    let bad = format!("{p}:deadkey");
    let _: i64 = cmd(&mut c, &["RPUSH", &bad, "x"]).await;
    for _ in 0..2 {
        let r = wb.flush().await;
        let e = match &r {
            Ok(r) => r.error.clone().unwrap_or_default(),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(&bad), "the flush names the key: {r:?}");
        let letters: i64 = cmd(&mut c, &["HLEN", &format!("{p}:dead")]).await;
        assert_eq!(letters, 0, "a letter written by a finish that failed");
    }
    let _: i64 = cmd(&mut c, &["DEL", &bad]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = wb.flush().await;
        let p = wb.pending().await.unwrap();
        if (p.total, p.in_flight) == (0, 0) {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {p:?} ({r:?})");
    }
    let letters = wb.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].tuple.to_string(), key);
    assert_eq!(wb.status().await.unwrap().totals.dead_lettered, 1);
    wb.shutdown().await.unwrap();
}

/// A writer's term stored in a form fga-wb never writes ("7.0", " 7",
/// "07") is replaced like a missing one: the writer's ops are written and
/// end. Before, Lua read it as 7 and kept it, each finish compared the
/// stored text with "7" and found the writer's term changed, and the ops
/// stayed in flight, handed back and written again, for good.
#[tokio::test]
async fn a_term_in_another_form_is_replaced() {
    for (i, form) in ["{}.0", " {}", "0{}"].into_iter().enumerate() {
        let Inline { wb, mut c, p, .. } = inline_flushing(&format!("term-form-{i}"), false).await;
        wb.grant("user:anne", "viewer", "document:t").await.unwrap();
        // The handle's lease and term exist once it has pushed.
        let terms: Vec<String> = cmd(&mut c, &["HKEYS", &format!("{p}:terms")]).await;
        assert!(!terms.is_empty());
        for w in &terms {
            let t: String = cmd(&mut c, &["HGET", &format!("{p}:terms"), w]).await;
            let odd = form.replace("{}", &t);
            let _: i64 = cmd(&mut c, &["HSET", &format!("{p}:terms"), w, &odd]).await;
        }
        let r = wb.flush().await.unwrap();
        assert_eq!(r.applied, 1, "{form}: {r:?}");
        let left = wb.pending().await.unwrap();
        assert_eq!((left.total, left.in_flight), (0, 0), "{form}: {left:?}");
        wb.shutdown().await.unwrap();
    }
}

/// A loss found while a counter the heartbeat moves past it (the job or
/// letter sequence) holds another type is recorded once the key is fixed:
/// checks fail closed throughout and then report the loss. Before, the
/// heartbeat moved the store to a new epoch and then failed on the key,
/// before it wrote the loss record; the next one took the new epoch for
/// a recorded loss, and none was ever open.
#[tokio::test]
async fn a_loss_found_while_a_counter_has_another_type_is_recorded() {
    let Inline { p, wb, mut c, .. } = inline_flushing("loss-jobseq", false).await;
    wb.revoke("user:a", "viewer", "document:1").await.unwrap();
    let jobseq = format!("{p}:jobseq");
    let _: i64 = cmd(&mut c, &["SADD", &jobseq, "x"]).await;
    // The sequence counter went back: a loss.
    let _: () = cmd(&mut c, &["SET", &format!("{p}:seq"), "0"]).await;
    // A check no pending op touches: it fails on the heartbeat's error.
    let r = wb.check("user:b", "viewer", "document:2").await;
    assert!(r.as_ref().is_err_and(|e| e.is_redis()), "{r:?}");
    let _: i64 = cmd(&mut c, &["DEL", &jobseq]).await;
    let r = wb.check("user:a", "viewer", "document:1").await;
    assert!(r.as_ref().is_err_and(|e| e.is_buffer_lost()), "{r:?}");
    assert!(wb.status().await.unwrap().loss.is_some());
}

/// A pending count that is not a number fga-wb wrote ("nan", "inf") reads
/// as the ready ops, not as none: read as none, it kept the flushers from
/// looking until the next push. Before, `pending()` said 0 writes.
#[tokio::test]
async fn a_pending_count_that_is_not_a_number_reads_as_the_ready_ops() {
    let Inline { p, wb, mut c, .. } = inline_flushing("counts-nan", false).await;
    for u in ["a", "b", "c"] {
        wb.grant(&format!("user:{u}"), "viewer", "document:1")
            .await
            .unwrap();
    }
    for bad in ["nan", "inf", "-inf", "1e30"] {
        let _: i64 = cmd(&mut c, &["HSET", &format!("{p}:counts"), "pg", bad]).await;
        let pending = wb.pending().await.unwrap();
        assert_eq!(pending.writes, 3, "{bad}: {pending:?}");
    }
}
