//! fga-wb refuses the condition contexts OpenFGA refuses, at the call.
//!
//! OpenFGA converts each value of a conditional tuple's context to its
//! parameter's type when the tuple is written, and refuses the tuple when
//! one does not convert. A grant fga-wb took would then die at flush time,
//! long after it was acknowledged, and take with it a revoke of the same
//! tuple it had replaced while both were pending. The oracle is the real
//! server: each context below goes through `WriteBehind::grant_tuple` and,
//! as the same tuple, straight to OpenFGA's Write. They must agree, except
//! where fga-wb takes a context and leaves the answer to OpenFGA on purpose
//! (numbers as strings at the edge of Go's rounding), which is listed.

mod support;

use fga_wb::openfga::{ListObjectsRequest, ReadFilter, WriteRequest};
use fga_wb::tuple::Condition;
use fga_wb::{TupleKey, WriteBehind};
use serde_json::{json, Map, Value};
use support::{config_for, new_store_with, stored, TestStore};

/// A condition with a parameter of every type, and one with none.
fn model() -> Value {
    let t = |name: &str| json!({ "type_name": name });
    let generic = |name: &str, of: &str| json!({ "type_name": name, "generic_types": [t(of)] });
    json!({
        "schema_version": "1.1",
        "type_definitions": [
            { "type": "user" },
            {
                "type": "doc",
                "relations": { "viewer": { "this": {} } },
                "metadata": { "relations": { "viewer": { "directly_related_user_types": [
                    { "type": "user", "condition": "every" },
                    { "type": "user", "condition": "bare" }
                ] } } }
            }
        ],
        "conditions": {
            "every": {
                "name": "every",
                "expression": "true",
                "parameters": {
                    "i": t("TYPE_NAME_INT"),
                    "u": t("TYPE_NAME_UINT"),
                    "d": t("TYPE_NAME_DOUBLE"),
                    "b": t("TYPE_NAME_BOOL"),
                    "s": t("TYPE_NAME_STRING"),
                    "du": t("TYPE_NAME_DURATION"),
                    "ts": t("TYPE_NAME_TIMESTAMP"),
                    "ip": t("TYPE_NAME_IPADDRESS"),
                    "li": generic("TYPE_NAME_LIST", "TYPE_NAME_INT"),
                    "ms": generic("TYPE_NAME_MAP", "TYPE_NAME_STRING"),
                    "a": t("TYPE_NAME_ANY")
                }
            },
            "bare": { "name": "bare", "expression": "true" }
        }
    })
}

/// Contexts given for condition `every` (or `bare`, where named), each as
/// one parameter and its value.
fn cases() -> Vec<(&'static str, &'static str, Value)> {
    let every = |p: &'static str, v: Value| ("every", p, v);
    let mut c = vec![];
    for v in [
        json!(3),
        json!(3.0),
        json!(-7),
        json!(3.5),
        json!(1e20),
        json!("12"),
        json!("-12"),
        json!("+12"),
        json!("1.50e1"),
        json!("15e-1"),
        json!("1.5"),
        json!("Inf"),
        json!("12abc"),
        json!(""),
        json!(" 1"),
        json!("0x10"),
        json!("1_000"),
        json!("."),
        json!("1e"),
        json!(true),
        json!(null),
        json!([1]),
        // Past Go's big.Float range: an infinity (no whole number), or zero.
        json!("1e650000000"),
        json!("1e-1000000000"),
        json!("1p-3"),
        json!("1p3"),
    ] {
        c.push(every("i", v));
    }
    for v in [
        json!(0),
        json!(-1),
        json!(5.5),
        json!("5"),
        json!("-1"),
        json!("-0"),
    ] {
        c.push(every("u", v));
    }
    for v in [
        json!(0.1),
        json!(-2),
        json!("2.5"),
        json!("-Inf"),
        json!("inf"),
        json!(".5"),
        json!("5."),
        json!("abc"),
        json!("INF"),
        json!(true),
        json!("0.1"),
        json!("1e400"),
        json!("1e-400"),
        // Past Go's big.Float range: an exact infinity, or zero.
        json!("1e650000000"),
        json!("-1e-1000000000"),
        // An exponent at i64's least: its leading digit's power of ten
        // overflowed an absolute value (a panic in debug builds).
        json!("1e-9223372036854775808"),
        json!("-0.1e-9223372036854775807"),
        // Go's big.Float refuses a binary exponent past an int32.
        json!("1e2147483647"),
        json!("1e-2147483650"),
        json!("123.5e2147483645"),
        json!("123.5e2147483646"),
        json!("1p2147483647"),
        json!("0e-9223372036854775808"),
        // Past a double's range by a binary exponent (not one within
        // Go's range by far: OpenFGA's refusal then keeps it busy for
        // minutes, which is why fga-wb refuses it).
        json!("1p-100000"),
        json!("1p1000"),
        // Exact or not as a float64 once rounded to 64 bits: Go's rule.
        json!("0.5"),
        json!("-0.75"),
        json!("0.3"),
        json!("1.5e-5"),
        json!("9007199254740992"),
        json!("9007199254740993"),
        json!("123456789012345678"),
        json!("1e22"),
        json!("1e23"),
        json!("1.7976931348623157e308"),
        json!("0.1000000000000000055511151231257827021181583404541015625"),
        json!("0.10000000000000000555111512312578270211815834045410156"),
        json!("5e-324"),
        json!("4.9406564584124654417656879286822137236505980e-324"),
        json!("2.2250738585072014e-308"),
        json!("0"),
        json!("-0.0"),
    ] {
        c.push(every("d", v));
    }
    for v in [json!(true), json!("true"), json!(1)] {
        c.push(every("b", v));
    }
    for v in [
        json!("x"),
        json!(""),
        json!(1),
        json!(null),
        json!("tab\there"),
    ] {
        c.push(every("s", v));
    }
    for v in [
        "1h30m",
        "1.5s",
        "1.s",
        ".5ms",
        "300\u{b5}s",
        "300\u{3bc}s",
        "0",
        "-0",
        "+0",
        "-2h",
        "1",
        "1d",
        " 1h",
        "",
        "h",
        ".s",
        "2562047h",
        "2562048h",
        "1h 30m",
        "1H",
        "9223372036853779661ns0.99614700000000000ms",
        "9223372036853779661ns0.996148ms",
    ] {
        c.push(every("du", json!(v)));
    }
    c.push(every("du", json!(90)));
    for v in [
        "2024-01-31T09:00:00Z",
        "2024-02-29T23:59:59.123456789+02:00",
        "2024-01-31T9:00:00Z",
        "2024-01-31T09:00:00,5-24:00",
        "2024-01-31T09:00:00+01:60",
        "2024-01-31T09:00:00+25:00",
        "0000-01-01T00:00:00Z",
        "2024-01-31",
        "2023-02-29T00:00:00Z",
        "2024-04-31T00:00:00Z",
        "2024-13-01T00:00:00Z",
        "2024-01-31T24:00:00Z",
        "2024-01-31T09:60:00Z",
        "2024-01-31T09:00:60Z",
        "2024-01-31t09:00:00Z",
        "2024-01-31T09:00:00",
        "2024-01-31T09:00:00z",
        "2024-01-31 09:00:00Z",
        "2024-01-31T09:00:00.Z",
        "24-01-31T09:00:00Z",
        "1706691600",
    ] {
        c.push(every("ts", json!(v)));
    }
    c.push(every("ts", json!(1706691600)));
    for v in [
        "10.0.0.1",
        "::1",
        "fe80::1%eth0",
        "::ffff:10.0.0.1",
        "2001:db8::",
        "10.0.0.0/8",
        "010.0.0.1",
        "256.0.0.1",
        "localhost",
        "fe80::1%",
        "%eth0",
        "1.2.3",
        "1.2.3.4%eth0",
        ":::1",
    ] {
        c.push(every("ip", json!(v)));
    }
    c.push(every("ip", json!(10)));
    for v in [
        json!([1, "2"]),
        json!([1, 2.5]),
        json!(1),
        json!([]),
        json!([null]),
    ] {
        c.push(every("li", v));
    }
    for v in [json!({"a": "b"}), json!({"a": 1}), json!("x"), json!({})] {
        c.push(every("ms", v));
    }
    for v in [
        json!({"x": [1]}),
        json!(null),
        json!(["a\nb"]),
        json!({"k\u{1}": 1}),
    ] {
        c.push(every("a", v));
    }
    c.push(every("nope", json!(1)));
    c.push(("bare", "x", json!(1)));
    c
}

/// Where fga-wb takes a context whatever OpenFGA answers: a number as a
/// string for a double whose power of ten is past 10^55 either way, where
/// Go's own conversion is approximate (see condition.rs).
fn left_to_openfga(param: &str, v: &Value) -> bool {
    let past = [
        "5e-324",
        "4.9406564584124654417656879286822137236505980e-324",
        "2.2250738585072014e-308",
        "1.7976931348623157e308",
    ];
    param == "d" && past.iter().any(|p| v == &json!(p))
}

fn tuple(i: usize, condition: &str, param: &str, v: &Value) -> TupleKey {
    let mut context = Map::new();
    context.insert(param.to_owned(), v.clone());
    TupleKey {
        user: format!("user:c{i}"),
        relation: "viewer".into(),
        object: "doc:1".into(),
        condition: Some(Condition {
            name: condition.into(),
            context: Some(context),
        }),
    }
}

/// Whether OpenFGA writes `t`.
async fn server_writes(store: &TestStore, t: &TupleKey) -> bool {
    let req = WriteRequest::idempotent(vec![t.clone()], vec![]);
    match store.client.write(&store.store_id, &req).await {
        Ok(()) => true,
        Err(e) if e.is_invalid_input() => false,
        Err(e) => panic!("the server failed on {t}: {e}"),
    }
}

async fn handle(store: &TestStore) -> WriteBehind {
    WriteBehind::builder(config_for(store))
        .automatic_flush(false)
        .build()
        .await
        .expect("handle")
}

#[tokio::test]
async fn grant_refuses_the_contexts_openfga_refuses() {
    let store = new_store_with("contexts", &model()).await;
    let wb = handle(&store).await;
    let mut disagree = vec![];
    for (i, (condition, param, v)) in cases().iter().enumerate() {
        let t = tuple(i, condition, param, v);
        let ours = wb.grant_tuple(t.clone()).await;
        if let Err(e) = &ours {
            assert!(
                e.is_invalid_input(),
                "grant failed, but not on its input: {e}"
            );
        }
        // Where fga-wb takes the context whatever OpenFGA answers, the
        // expected answer is "takes it".
        let theirs = left_to_openfga(param, v) || server_writes(&store, &t).await;
        if ours.is_ok() != theirs {
            disagree.push(format!(
                "{condition}.{param} = {v}: fga-wb {}, OpenFGA {}",
                match &ours {
                    Ok(()) => "takes it".to_owned(),
                    Err(e) => format!("refuses it ({e})"),
                },
                if theirs { "writes it" } else { "refuses it" }
            ));
        }
    }
    assert!(disagree.is_empty(), "{}", disagree.join("\n"));
}

/// The error says which parameter, what was given and what it must be.
#[tokio::test]
async fn a_refused_context_names_the_parameter_and_its_type() {
    let store = new_store_with("context-message", &model()).await;
    let wb = handle(&store).await;
    let e = wb
        .grant_with_condition(
            "user:anne",
            "viewer",
            "doc:1",
            "every",
            json!({"ts": "2024-01-31 09:00:00"}).as_object().cloned(),
        )
        .await
        .expect_err("a timestamp without T or zone");
    let msg = e.to_string();
    assert!(e.is_invalid_input(), "{msg}");
    for needle in ["\"ts\"", "2024-01-31 09:00:00", "RFC 3339"] {
        assert!(msg.contains(needle), "{needle:?} not in {msg:?}");
    }
}

/// The case the check exists for: a revoke pending, then a grant of the
/// same tuple whose context OpenFGA would refuse. The grant is refused at
/// the call, so it never replaces the revoke, and the revoke is written.
#[tokio::test]
async fn a_refused_grant_does_not_replace_a_pending_revoke() {
    let store = new_store_with("context-revoke", &model()).await;
    let wb = handle(&store).await;
    let good = tuple(0, "every", "i", &json!(1));
    wb.grant_tuple(good.clone()).await.expect("grant");
    wb.flush().await.expect("flush");
    assert_eq!(stored(&store).await.len(), 1);
    wb.revoke_tuple(good).await.expect("revoke");
    let bad = tuple(0, "every", "i", &json!("one"));
    let e = wb
        .grant_tuple(bad)
        .await
        .expect_err("context OpenFGA refuses");
    assert!(e.is_invalid_input(), "{e}");
    wb.flush().await.expect("flush");
    assert!(
        stored(&store).await.is_empty(),
        "the revoke was not written"
    );
    assert!(!wb.check("user:c0", "viewer", "doc:1").await.expect("check"));
}

/// A revoke pending, then a grant of the same tuple that OpenFGA refuses
/// only when it is written (validation off here; in production a model
/// change between the call and the flush does it, or a context left to
/// OpenFGA). The grant was pushed over the revoke, yet the revoke is still
/// written, as it would be were every acknowledged op applied in order,
/// and the grant's letter stays current (replayable once the cause is
/// fixed). Before, the refused grant took the revoke with it: the tuple
/// stayed in OpenFGA and the check answered allowed.
async fn a_grant_refused_when_written_leaves_the_revoke_before_it(
    wb: WriteBehind,
    store: &TestStore,
) {
    let good = tuple(0, "every", "i", &json!(1));
    wb.grant_tuple(good.clone()).await.expect("grant");
    wb.flush().await.expect("flush");
    assert_eq!(stored(store).await.len(), 1);
    wb.revoke_tuple(good).await.expect("revoke");
    wb.grant_tuple(tuple(0, "every", "i", &json!("one")))
        .await
        .expect("taken: not validated");
    let r = wb.flush().await.expect("flush");
    assert_eq!(r.dead_lettered, 1, "{r:?}");
    assert!(
        stored(store).await.is_empty(),
        "the revoke before the refused grant was not written"
    );
    assert!(!wb.check("user:c0", "viewer", "doc:1").await.expect("check"));
    let letters = wb.dead_letters().await.expect("letters");
    let got: Vec<(fga_wb::Op, bool)> = letters.iter().map(|d| (d.op, d.superseded)).collect();
    assert_eq!(got, [(fga_wb::Op::Grant, false)], "{letters:?}");
    wb.shutdown().await.expect("shutdown");
}

/// OpenFGA holds a conditional tuple; the application revokes it and grants
/// it plain, which this model refuses: the grant replaced a revoke not yet
/// written, and dead-lettered it leaves that revoke written. A check (or a
/// list) before the flush must not answer from the stored tuple the revoke
/// deletes: it fails closed. Before, the refused grant was left out of the
/// request and OpenFGA's stored tuple answered allowed.
async fn a_refused_grant_that_owes_a_revoke_fails_reads_closed(wb: WriteBehind, store: &TestStore) {
    let good = TupleKey {
        condition: Some(Condition {
            name: "bare".into(),
            context: None,
        }),
        ..TupleKey::new("user:c0", "viewer", "doc:1").expect("tuple")
    };
    wb.grant_tuple(good.clone()).await.expect("grant");
    wb.flush().await.expect("flush");
    wb.revoke_tuple(good).await.expect("revoke");
    wb.grant("user:c0", "viewer", "doc:1")
        .await
        .expect("taken: not validated");
    let check = wb.check("user:c0", "viewer", "doc:1").await;
    assert!(
        check.as_ref().is_err_and(|e| e.is_stale_check()),
        "{check:?}"
    );
    let lo = ListObjectsRequest::new("user:c0", "viewer", "doc");
    let listed = wb.list_objects(&lo).await;
    assert!(
        listed.as_ref().is_err_and(|e| e.is_stale_check()),
        "{listed:?}"
    );
    let doc = ReadFilter {
        object: Some("doc:1".into()),
        ..ReadFilter::default()
    };
    let read = wb.read(&doc).await;
    assert!(read.as_ref().is_err_and(|e| e.is_stale_check()), "{read:?}");
    let r = wb.flush().await.expect("flush");
    assert_eq!(r.dead_lettered, 1, "{r:?}");
    assert!(stored(store).await.is_empty());
    assert!(!wb.check("user:c0", "viewer", "doc:1").await.expect("check"));
    wb.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn a_refused_grant_that_owes_a_revoke_fails_reads_closed_in_memory() {
    let store = new_store_with("context-owing-refused-memory", &model()).await;
    let wb = unvalidated(&store, false).await;
    a_refused_grant_that_owes_a_revoke_fails_reads_closed(wb, &store).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_refused_grant_that_owes_a_revoke_fails_reads_closed_in_redis() {
    let store = new_store_with("context-owing-refused-redis", &model()).await;
    let wb = unvalidated(&store, true).await;
    a_refused_grant_that_owes_a_revoke_fails_reads_closed(wb, &store).await;
}

/// A pending grant the model does not admit (taken without validation) is
/// not shown by a read: OpenFGA will refuse it, and checks leave it out
/// too. Before, the read listed it.
#[tokio::test]
async fn a_read_leaves_out_a_pending_grant_the_model_refuses() {
    let store = new_store_with("context-read-refused", &model()).await;
    let wb = unvalidated(&store, false).await;
    wb.grant("user:c1", "viewer", "doc:1")
        .await
        .expect("taken: not validated");
    let doc = ReadFilter {
        object: Some("doc:1".into()),
        ..ReadFilter::default()
    };
    assert_eq!(wb.read(&doc).await.expect("read"), []);
    wb.clear().await.expect("clear");
}

/// The 32 KiB a written context may take, as OpenFGA measures it (its
/// protobuf form, not its JSON): for strings, lists and maps around the
/// limit, a grant is taken exactly when OpenFGA writes the tuple. Before,
/// any size was taken and a context over the limit was dead-lettered when
/// flushed.
#[tokio::test]
async fn the_context_size_limit_is_the_servers() {
    let store = new_store_with("context-size", &model()).await;
    let wb = handle(&store).await;
    type Shape = (&'static str, std::ops::Range<usize>, fn(usize) -> Value);
    let shapes: [Shape; 3] = [
        ("s", 32_740..32_766, |n| json!("x".repeat(n))),
        ("li", 2_972..2_984, |n| json!(vec![1; n])),
        ("ms", 2_176..2_190, |n| {
            let m: Map<String, Value> = (0..n).map(|i| (format!("k{i:05}"), json!("x"))).collect();
            Value::Object(m)
        }),
    ];
    let mut user = 100;
    for (param, sizes, make) in shapes {
        let mut seen = (false, false);
        for n in sizes {
            user += 1;
            let t = tuple(user, "every", param, &make(n));
            let ours = wb.grant_tuple(t.clone()).await;
            let theirs = server_writes(&store, &t).await;
            assert_eq!(ours.is_ok(), theirs, "{param} of {n}: {ours:?}");
            if theirs {
                seen.0 = true
            } else {
                seen.1 = true
            }
        }
        assert_eq!(
            seen,
            (true, true),
            "{param}: the limit is not in the range tried"
        );
    }
    wb.clear().await.expect("clear");
}

/// A handle on `store` that does not validate (nor flush on its own), on
/// the memory store or on Redis.
async fn unvalidated(store: &TestStore, redis: bool) -> WriteBehind {
    let mut c = config_for(store);
    if redis {
        c.buffer.store = fga_wb::config::StoreKind::Redis;
        c.redis.url = support::redis_url();
    }
    WriteBehind::builder(c)
        .automatic_flush(false)
        .validate_against_model(false)
        .build()
        .await
        .expect("handle")
}

#[tokio::test]
async fn a_grant_refused_when_written_leaves_the_revoke_before_it_in_memory() {
    let store = new_store_with("context-owed-memory", &model()).await;
    let wb = unvalidated(&store, false).await;
    a_grant_refused_when_written_leaves_the_revoke_before_it(wb, &store).await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn a_grant_refused_when_written_leaves_the_revoke_before_it_in_redis() {
    let store = new_store_with("context-owed-redis", &model()).await;
    let wb = unvalidated(&store, true).await;
    a_grant_refused_when_written_leaves_the_revoke_before_it(wb, &store).await;
}

/// Without the model (validation off here; at a start while OpenFGA is
/// out of reach, until it is read), a context string that reads as a
/// number OpenFGA refuses only after minutes of spelling it out is refused
/// at the call, whatever the parameter: its type is unknown. With the
/// model, the type decides: a string parameter takes it, as OpenFGA does.
#[tokio::test]
async fn without_the_model_a_number_openfga_is_slow_to_refuse_is_refused() {
    let store = new_store_with("contexts-slow", &model()).await;
    let slow = json!("1p2147483646");
    let blind = WriteBehind::builder(config_for(&store))
        .automatic_flush(false)
        .validate_against_model(false)
        .build()
        .await
        .expect("handle");
    let e = blind
        .grant_tuple(tuple(0, "every", "d", &slow))
        .await
        .expect_err("refused without the model");
    assert!(
        e.is_invalid_input() && e.to_string().contains("busy for minutes"),
        "{e}"
    );
    blind.shutdown().await.unwrap();
    let wb = handle(&store).await;
    let t = tuple(1, "every", "s", &slow);
    wb.grant_tuple(t.clone()).await.expect("a string parameter");
    assert!(server_writes(&store, &t).await, "OpenFGA writes it");
    wb.clear().await.unwrap();
    wb.shutdown().await.unwrap();
}
