//! One bad tuple never blocks the rest: poison tuples are bisected into the
//! dead letters with OpenFGA's reason, and dead letters can be replayed and
//! purged without losing one (ARCHITECTURE.md, promises 4 and 6).
//!
//! Tests marked "real server" run against the OpenFGA that `scripts/test`
//! starts; the others put wiremock in its place, replaying responses captured
//! from the real server (`wiremock-fixtures/`), for what a healthy server
//! cannot be made to do on demand.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use fga_wb::{Op, WriteBehind};
use support::mock::*;
use support::{assert_accounted, config_for, new_store, stored};

/// The three tuples OpenFGA refuses for the documents model, and the text its
/// message contains for each.
const POISON: [(&str, &str, &str, &str); 3] = [
    (
        "user:anne",
        "viewer",
        "planet:earth",
        "type 'planet' not found",
    ),
    (
        "user:anne",
        "reader",
        "document:poison",
        "relation 'document#reader' not found",
    ),
    (
        "user:anne",
        "parent",
        "document:poison",
        "type 'user' is not an allowed type restriction",
    ),
];

/// Grants `n` tuples of which the three `POISON` ones sit at spread-out
/// positions (so they fall in different 100-tuple chunks); returns the
/// valid ones as `object#relation@user`.
async fn grant_with_poison(wb: &WriteBehind, n: usize) -> BTreeSet<String> {
    let at = [n / 10, n / 2, n - 3];
    let mut valid = BTreeSet::new();
    let mut poison = POISON.iter();
    for i in 0..n {
        if at.contains(&i) {
            let (u, r, o, _) = poison.next().unwrap();
            wb.grant(u, r, o).await.unwrap();
        } else {
            let (u, r, o) = (format!("user:u{i}"), "viewer", format!("document:d{i}"));
            wb.grant(&u, r, &o).await.unwrap();
            valid.insert(format!("{o}#{r}@{u}"));
        }
    }
    assert_eq!(valid.len(), n - 3);
    valid
}

/// Poison (real server): 250 grants of which 3 are refused by OpenFGA
/// (unknown type, unknown relation, user type not allowed; local model
/// validation off so they reach the server) → one flush applies the 247
/// valid ones, and exactly the 3 bad ones are dead-lettered, each with the
/// server's own message and code.
#[tokio::test]
async fn poison_tuples_are_isolated_and_the_rest_applied() {
    let s = new_store("wb-poison").await;
    let wb = WriteBehind::builder(manual_flush(config_for(&s)))
        .validate_against_model(false)
        .build()
        .await
        .unwrap();
    let valid = grant_with_poison(&wb, 250).await;

    let report = wb.flush().await.unwrap();
    assert_eq!(report.applied, 247, "{report:?}");
    assert_eq!(report.dead_lettered, 3, "{report:?}");
    assert_eq!(report.error, None, "{report:?}");
    // Three chunks of at most 100, plus the bisection of the three bad ones.
    assert!(report.requests > 3, "{report:?}");

    let in_openfga: BTreeSet<String> = stored(&s).await.into_iter().collect();
    assert_eq!(in_openfga, valid, "exactly the valid tuples are in OpenFGA");

    let dead = wb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 3, "{dead:#?}");
    for (u, r, o, message) in POISON {
        let d = dead
            .iter()
            .find(|d| d.tuple.user == u && d.tuple.relation == r && d.tuple.object == o)
            .unwrap_or_else(|| panic!("{o}#{r}@{u} is not dead-lettered: {dead:#?}"));
        assert!(
            d.reason.contains(message),
            "dead letter for {o}#{r}@{u} should carry the server's message {message:?}: {:?}",
            d.reason
        );
        assert_eq!(d.code.as_deref(), Some("validation_error"), "{d:?}");
        assert_eq!(d.op, Op::Grant);
        assert!(d.attempts >= 1, "{d:?}");
    }
    let ids: BTreeSet<u64> = dead.iter().map(|d| d.id).collect();
    assert_eq!(ids.len(), 3, "dead-letter ids are distinct");

    let st = wb.status().await.unwrap();
    assert_eq!(st.totals.dead_lettered, 3);
    assert_eq!(st.totals.applied, 247);
    assert_eq!(st.totals.acknowledged, 250);
    assert_eq!(st.dead_letters, 3);
    assert_eq!(st.flushing_stopped, None);
    assert_accounted(&wb).await;
    assert_eq!(wb.shutdown().await.unwrap().left.total, 0);
}

/// Bounded memory (real server): the memory store keeps at most
/// `buffer.dead_letter_capacity` letters. Three refused tuples with room for
/// two: the oldest letter goes, counted, and the op still counts as
/// dead-lettered; the two kept are the newest and still replay.
#[tokio::test]
async fn the_memory_store_keeps_at_most_its_dead_letter_capacity() {
    let s = new_store("wb-dlq-cap").await;
    let mut c = manual_flush(config_for(&s));
    c.buffer.dead_letter_capacity = 2;
    let wb = WriteBehind::builder(c)
        .validate_against_model(false)
        .build()
        .await
        .unwrap();
    grant_with_poison(&wb, 20).await;
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.dead_lettered), (17, 3), "{r:?}");
    let dead = wb.dead_letters().await.unwrap();
    let ids: Vec<u64> = dead.iter().map(|d| d.id).collect();
    assert_eq!(ids, [2, 3], "the first letter went: {dead:#?}");
    let st = wb.status().await.unwrap();
    assert_eq!(st.dead_letters, 2);
    assert_eq!(st.totals.dead_lettered, 3);
    assert_eq!(st.totals.dead_letters_evicted, 1);
    // The kept ones are the newest, and still replay (and die again).
    assert_eq!(wb.replay_dead_letters(None).await.unwrap().replayed, 2);
    let again = wb.dead_letters().await.unwrap();
    assert_eq!(again.len(), 2, "{again:#?}");
    let st = wb.status().await.unwrap();
    assert_eq!(st.totals.dead_lettered, 5);
    assert_eq!(
        st.totals.dead_letters_evicted, 1,
        "a replay frees its letters first"
    );
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// A replay that cannot buffer its ops (the buffer is full) keeps the
/// letters it could not replay: none is lost.
#[tokio::test]
async fn a_replay_that_cannot_buffer_keeps_its_letters() {
    let s = new_store("wb-dlq-full").await;
    let mut c = manual_flush(config_for(&s));
    c.buffer.capacity = 20;
    let wb = WriteBehind::builder(c)
        .validate_against_model(false)
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    grant_with_poison(&wb, 20).await;
    wb.flush().await.unwrap();
    assert_eq!(wb.dead_letters().await.unwrap().len(), 3);
    // Full, then with room for one (the replayed one is flushed, and dies
    // again): the error says what was replayed and what stays.
    for (fill, replayed, pending) in [(20, 0, 20), (19, 1, 0)] {
        wb.clear().await.unwrap();
        support::grant_users(&wb, "document:full", 0..fill).await;
        let e = wb.replay_dead_letters(None).await.unwrap_err();
        assert!(e.is_buffer_full(), "{e}");
        let said = format!("replayed {replayed} dead letters");
        assert!(e.to_string().contains(&said), "{e}");
        let kept = format!("{} stay dead letters", 3 - replayed);
        assert!(e.to_string().contains(&kept), "{e}");
        assert_eq!(wb.dead_letters().await.unwrap().len(), 3, "no letter lost");
        assert_eq!(wb.pending().await.unwrap().total, pending);
    }
}

/// Dead letters (real server): after a poison flush, replaying one dead
/// letter unchanged sends it again and it is dead again (with a new id, the
/// others untouched); replaying all does the same for all; purging one and
/// then all empties the list, and nothing valid is disturbed.
#[tokio::test]
async fn dead_letters_replay_and_purge() {
    let s = new_store("wb-dlq").await;
    let wb = WriteBehind::builder(manual_flush(config_for(&s)))
        .validate_against_model(false)
        .build()
        .await
        .unwrap();
    let valid = grant_with_poison(&wb, 20).await;
    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.dead_lettered), (17, 3), "{r:?}");
    let dead = wb.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 3);

    // Replay one: buffered again and flushed at once, refused again.
    let one = dead[0].clone();
    assert_eq!(
        wb.replay_dead_letters(Some(&[one.id]))
            .await
            .unwrap()
            .replayed,
        1
    );
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 0, "the replay flushed: {p:?}");
    let dead2 = wb.dead_letters().await.unwrap();
    assert_eq!(dead2.len(), 3);
    let again = dead2
        .iter()
        .find(|d| d.tuple == one.tuple)
        .expect("the replayed tuple is dead again");
    assert_ne!(again.id, one.id, "a new dead letter, with a new id");
    assert_eq!(again.reason, one.reason);
    for d in &dead[1..] {
        assert!(dead2.iter().any(|x| x.id == d.id), "{d:?} untouched");
    }

    // Replay an unknown id: an error naming it, nothing replayed.
    let e = wb.replay_dead_letters(Some(&[999_999])).await.unwrap_err();
    assert!(
        e.is_invalid_input() && e.to_string().contains("999999"),
        "{e}"
    );
    assert_eq!(wb.dead_letters().await.unwrap().len(), 3);

    // Replay all: refused again, all of them.
    let r = wb.replay_dead_letters(None).await.unwrap();
    assert_eq!((r.replayed, r.dead_lettered), (3, 3), "{r:?}");
    assert_eq!(wb.dead_letters().await.unwrap().len(), 3);
    assert_eq!(wb.status().await.unwrap().totals.dead_lettered, 7);

    // Purge one, then those up to a bound (what `dlq purge --all` asked
    // about), then all.
    let first = wb.dead_letters().await.unwrap()[0].id;
    assert_eq!(wb.purge_dead_letters(Some(&[first])).await.unwrap(), 1);
    let left = wb.dead_letters().await.unwrap();
    assert_eq!(left.len(), 2);
    assert_eq!(wb.purge_dead_letters_up_to(left[0].id).await.unwrap(), 1);
    let after: Vec<u64> = wb
        .dead_letters()
        .await
        .unwrap()
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(after, [left[1].id], "the newer letter is spared");
    assert_eq!(wb.purge_dead_letters(None).await.unwrap(), 1);
    assert!(wb.dead_letters().await.unwrap().is_empty());
    assert_eq!(wb.status().await.unwrap().dead_letters, 0);
    assert_eq!(wb.purge_dead_letters(None).await.unwrap(), 0);

    // A replay counts the replayed ops refused again, not other ops the
    // flush after it dead-lettered: a poison grant pending beside it.
    let (_, relation, object, _) = POISON[0];
    wb.grant("user:one", relation, object).await.unwrap();
    assert_eq!(wb.flush().await.unwrap().dead_lettered, 1);
    wb.grant("user:other", relation, object).await.unwrap();
    let r = wb.replay_dead_letters(None).await.unwrap();
    assert_eq!((r.replayed, r.dead_lettered), (1, 1), "{r:?}");
    assert_eq!(wb.dead_letters().await.unwrap().len(), 2);
    assert_eq!(wb.purge_dead_letters(None).await.unwrap(), 2);

    let in_openfga: BTreeSet<String> = stored(&s).await.into_iter().collect();
    assert_eq!(in_openfga, valid);
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 0, "{p:?}");
    wb.shutdown().await.unwrap();
}

/// Too large for one request (a real server that takes at most 100,000
/// bytes a request; the default is 616,448): 60 grants whose condition
/// context is 30 KB each (OpenFGA allows 32 KB a tuple). fga-wb cuts
/// requests of some 400 KB, which this server refuses with a 500
/// `resource_exhausted`; the flusher writes the same tuples in smaller
/// requests: all 60 are applied, none dead-lettered, and the flush ends.
/// Before, that 500 was retried as it was, forever.
#[tokio::test]
async fn grants_too_large_for_one_request_are_written_in_smaller_ones() {
    let own = support::own_store(
        testenv::OpenFgaOptions {
            max_request_bytes: Some(100_000),
            ..Default::default()
        },
        "wb-too-large",
        &support::model("conditions.json"),
    )
    .await;
    let wb = WriteBehind::builder(manual_flush(own.config.clone()))
        .build()
        .await
        .unwrap();
    let mut context = serde_json::Map::new();
    context.insert("cidr".into(), "1".repeat(30_000).into());
    let mut want = BTreeSet::new();
    for i in 0..60 {
        let user = format!("user:u{i}");
        wb.grant_with_condition(
            &user,
            "viewer",
            "document:big",
            "in_company_network",
            Some(context.clone()),
        )
        .await
        .unwrap();
        want.insert(format!(
            "document:big#viewer@{user} (when in_company_network)"
        ));
    }
    let r = tokio::time::timeout(std::time::Duration::from_secs(120), wb.flush())
        .await
        .expect("the flush did not end within 120 s: the oversized request is retried as it is")
        .unwrap();
    assert_eq!((r.applied, r.dead_lettered), (60, 0), "{r:?}");
    assert!(r.requests > 1, "{r:?}");
    let got: BTreeSet<String> = support::stored_in(&own.client, &own.store_id)
        .await
        .into_iter()
        .collect();
    assert_eq!(got, want);
    assert_accounted(&wb).await;
    wb.shutdown().await.unwrap();
}

/// A malformed model id (real server: a lower-case `FGA_MODEL_ID`, as an
/// operator's shell may hold) is the request's fault, not its tuples':
/// flushing stops with OpenFGA's reason and every op is kept, none
/// dead-lettered. Before, each op was bisected alone and dead-lettered as
/// refused. Built without reading the model, as `fga-wb` builds its own.
#[tokio::test]
async fn a_malformed_model_id_stops_flushing_and_dead_letters_nothing() {
    let s = new_store("bad-model-id").await;
    let mut c = config_for(&s);
    c.openfga.model_id = "01jlowercase00000000000000".into();
    let wb = WriteBehind::builder(c)
        .read_model(false)
        .build()
        .await
        .unwrap();
    for i in 0..5 {
        wb.grant(&format!("user:u{i}"), "viewer", "document:1")
            .await
            .unwrap();
    }
    let e = wb.flush().await.expect_err("flushing stops");
    assert!(
        e.is_not_found() && e.to_string().contains("AuthorizationModelId"),
        "{e}"
    );
    let st = wb.status().await.unwrap();
    assert_eq!(st.totals.dead_lettered, 0, "{st:?}");
    assert!(st.flushing_stopped.is_some(), "{st:?}");
    assert_eq!(st.pending.total, 5, "{st:?}");
    assert!(stored(&s).await.is_empty());
    wb.clear().await.unwrap();
}

/// A model OpenFGA has stored but cannot use (one an older server accepted)
/// refuses every Write under it, delete-only ones too: that is the
/// model's fault, not the tuples'. Flushing stops with OpenFGA's reason and
/// every op is kept, the revoke too. Before, each op was bisected alone and
/// dead-lettered for good: once the model was fixed, OpenFGA still held
/// the revoked tuple, and checks answered allowed.
#[tokio::test]
async fn a_model_openfga_cannot_use_stops_flushing_and_dead_letters_nothing() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(support::fixture("write-unusable-model").response())
        .mount(&server)
        .await;
    let wb = manual_handle(&server).await;
    for i in 0..4 {
        wb.grant(&format!("user:u{i}"), "viewer", "document:1")
            .await
            .unwrap();
    }
    wb.revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    let e = wb.flush().await.expect_err("flushing stops");
    assert!(e.is_not_found(), "{e}");
    let st = wb.status().await.unwrap();
    assert_eq!(st.totals.dead_lettered, 0, "{st:?}");
    assert!(st.flushing_stopped.is_some(), "{st:?}");
    let kept = st.pending.total + st.pending.in_flight;
    assert_eq!(kept, 5, "nothing lost: {st:?}");
    wb.clear().await.unwrap();
}

/// The Write mocks for a server whose datastore fails every request that
/// carries `user:poison` (OpenFGA's own 500, as for a row a column cannot
/// hold) and takes the rest.
async fn failing_on_poison(server: &wiremock::MockServer) {
    failing_on(server, "user:poison").await;
}

/// Write mocks: a 500 to every Write whose body contains `needle`, OK to
/// the others.
async fn failing_on(server: &wiremock::MockServer, needle: &str) {
    write_mock()
        .and(wiremock::matchers::body_string_contains(needle))
        .respond_with(support::fixture("server-error-500").response())
        .with_priority(1)
        .mount(server)
        .await;
    write_mock()
        .respond_with(support::fixture("write-ok").response())
        .mount(server)
        .await;
}

/// The tuples of the Writes that did not carry `user:poison`.
async fn landed_without_poison(server: &wiremock::MockServer) -> BTreeSet<String> {
    write_bodies(server)
        .await
        .iter()
        .map(body_tuples)
        .filter(|t| !t.iter().any(|t| t.ends_with("@user:poison")))
        .flatten()
        .collect()
}

/// The tuples of a Write body, as `object#relation@user`.
fn body_tuples(body: &serde_json::Value) -> Vec<String> {
    ["writes", "deletes"]
        .iter()
        .flat_map(|k| {
            body[k]["tuple_keys"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|t| format!("{}#{}@{}", t["object"], t["relation"], t["user"]).replace('"', ""))
        .collect()
}

/// One tuple the server fails with a 500 every time (not a refusal, so not
/// bisected as one) holds back only itself: the 40 grants cut into its
/// request are applied, it stays pending (not dead-lettered: the failure
/// is transient), and a later flush tries it alone, also when new ops are
/// cut into its chunk. Before, every op of its request went back to
/// pending with it, every time.
#[tokio::test]
async fn a_tuple_the_server_fails_every_time_holds_back_only_itself() {
    let server = mock_openfga().await;
    failing_on_poison(&server).await;
    let wb = manual_handle(&server).await;
    for i in 0..40 {
        wb.grant(&format!("user:u{i:02}"), "viewer", "document:p")
            .await
            .unwrap();
    }
    wb.grant("user:poison", "viewer", "document:p")
        .await
        .unwrap();

    let r = wb.flush().await.unwrap();
    assert_eq!((r.applied, r.dead_lettered), (40, 0), "{r:?}");
    assert!(
        r.error.is_some(),
        "the lone tuple's failure is reported: {r:?}"
    );
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (1, 0), "{p:?}");
    let landed = landed_without_poison(&server).await;
    assert_eq!(landed.len(), 40, "{landed:?}");

    let before = write_bodies(&server).await.len();
    let r = wb.flush().await.unwrap();
    assert_eq!(r.applied, 0, "{r:?}");
    let later = write_bodies(&server).await;
    assert!(
        later[before..]
            .iter()
            .all(|b| body_tuples(b) == ["document:p#viewer@user:poison"]),
        "tried alone: {:?}",
        &later[before..]
    );
    assert_eq!(wb.pending().await.unwrap().total, 1);

    // New grants of its object are cut into its chunk again: it still goes
    // alone (with one quick retry), and they land together. Before, it
    // went with them: the chunk failed through its quick retries, then was
    // bisected down to it, every time.
    for i in 40..80 {
        wb.grant(&format!("user:u{i:02}"), "viewer", "document:p")
            .await
            .unwrap();
    }
    let before = write_bodies(&server).await.len();
    let r = wb.flush().await.unwrap();
    assert_eq!(r.applied, 40, "{r:?}");
    let later = write_bodies(&server).await;
    let with_poison: Vec<_> = later[before..]
        .iter()
        .map(body_tuples)
        .filter(|t| t.iter().any(|t| t.ends_with("@user:poison")))
        .collect();
    assert!(
        (1..=2).contains(&with_poison.len())
            && with_poison
                .iter()
                .all(|b| b == &["document:p#viewer@user:poison"]),
        "alone, tried at most twice: {:?}",
        &later[before..]
    );
    assert_eq!(
        later.len() - before,
        with_poison.len() + 1,
        "{:?}",
        &later[before..]
    );
    assert_eq!(wb.pending().await.unwrap().total, 1);
    wb.clear().await.unwrap();
}

/// Two tuples the server fails every time, first and last in their chunk
/// (so one in each half), hold back only themselves too, within a few
/// flushes, though no other Write lands meanwhile. Before, the split
/// stopped at the halves (both failed, nothing landed: taken for a server
/// failing everything), and all 100 ops went back to pending on every
/// flush, for good.
#[tokio::test]
async fn two_tuples_the_server_fails_every_time_in_both_halves_hold_back_only_themselves() {
    let server = mock_openfga().await;
    failing_on(&server, "poison").await;
    let wb = manual_handle(&server).await;
    for user in ["apoison", "zpoison"] {
        wb.grant(&format!("user:{user}"), "viewer", "document:p")
            .await
            .unwrap();
    }
    for i in 0..98 {
        wb.grant(&format!("user:u{i:02}"), "viewer", "document:p")
            .await
            .unwrap();
    }
    let landed = || async {
        write_bodies(&server)
            .await
            .iter()
            .map(body_tuples)
            .filter(|t| !t.iter().any(|t| t.contains("poison")))
            .flatten()
            .collect::<BTreeSet<_>>()
    };
    for _ in 0..3 {
        wb.flush().await.unwrap();
        if landed().await.len() == 98 {
            break;
        }
    }
    assert_eq!(landed().await.len(), 98);
    // The two may still be on a retry of their own when the flush that
    // landed the rest returns (CI once saw them in flight): they end
    // pending, not lost and not dead-lettered.
    support::eventually(
        "the two failing ops pending again",
        std::time::Duration::from_secs(30),
        || async {
            let p = wb.pending().await.unwrap();
            (p.total, p.in_flight) == (2, 0)
        },
    )
    .await;
    assert!(wb.dead_letters().await.unwrap().is_empty());
    wb.clear().await.unwrap();
}

/// Inline on the Redis store, a revoke whose Write alone keeps failing
/// while other Writes land is given up after `queue.retry_schedule`, as a
/// queue job's op is: a transient dead letter with the server's reason,
/// checks it can change fail closed (OpenFGA may still hold the tuple), and
/// flushes end without error again. Before, it was retried for good, and
/// every flush it was in returned the error.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_revoke_failing_alone_through_the_retry_schedule_is_dead_lettered_in_redis() {
    let server = mock_openfga().await;
    failing_on_poison(&server).await;
    let wb = lone_redis_handle(&server, "lone").await;
    let mut others = 0;
    let last = give_up(&wb, Op::Revoke, &mut others).await;
    // Given up, it is no failure: the flush waited for the other tuple
    // (and counts one an earlier flush, ended by the failure, left).
    assert_eq!(last.dead_lettered, 1, "{last:?}");
    assert!(last.applied >= 1 && last.error.is_none(), "{last:?}");
    let letters = wb.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let d = &letters[0];
    assert_eq!((d.tuple.user.as_str(), d.op), ("user:poison", Op::Revoke));
    assert!(d.transient, "{d:?}");
    assert!(d.reason.contains("queue.retry_schedule"), "{d:?}");
    // At least the schedule's two waits and a first try, other Writes
    // landing between them (its first try may be the background's, sent
    // for the revoke before any other traffic).
    let alone = write_bodies(&server)
        .await
        .iter()
        .filter(|b| body_tuples(b) == ["document:p#viewer@user:poison"])
        .count();
    assert!(
        alone >= 3 && others >= 2,
        "given up after {alone} tries, {others} other Writes"
    );
    let e = wb
        .check("user:poison", "viewer", "document:p")
        .await
        .expect_err("fails closed on the dead revoke");
    assert!(e.to_string().contains("dlq replay"), "{e}");
    let p = wb.pending().await.unwrap();
    assert_eq!((p.total, p.in_flight), (0, 0), "{p:?}");
    // Inline nothing replays it: `flush --wait` says so, and fails (it
    // ended with success, the revoke unwritten).
    let mut cli = support::cli::Cli::at(
        support::cli::Where {
            api_url: server.uri(),
            token: "mock-token".into(),
            store_id: STORE.into(),
            model_id: MODEL.into(),
            redis_url: support::redis_url(),
        },
        "inline",
    );
    cli.set("FGA_WB_REDIS__KEY_PREFIX", &lone_prefix("lone"));
    cli.run(&["flush", "--wait"])
        .await
        .fails(1, "inline, nothing replays them");
    // With --json, its object too, the failure as its error (it printed
    // nothing).
    let j = cli
        .run(&["flush", "--wait", "--json"])
        .await
        .fails(1, "inline, nothing replays them")
        .json();
    let error = j["flush"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("inline, nothing replays them"), "{j:#}");
    let r = flush_with_traffic(&wb, &mut others).await;
    assert!(r.error.is_none() && r.applied == 1, "{r:?}");
    let landed = landed_without_poison(&server).await;
    assert_eq!(landed.len(), others, "{landed:?}");
    wb.purge_dead_letters(None).await.unwrap();
    wb.shutdown().await.unwrap();
}

/// The Redis store on the mock whose Writes of `user:poison` fail
/// (`failing_on_poison`), under a key prefix of `test`'s own.
#[cfg(feature = "redis")]
async fn lone_redis_handle(server: &wiremock::MockServer, test: &str) -> WriteBehind {
    let mut cfg = lone_config(server);
    cfg.buffer.store = fga_wb::config::StoreKind::Redis;
    cfg.redis.url = support::redis_url();
    // The mock's one store id: keys of this test's own.
    cfg.redis.key_prefix = lone_prefix(test);
    WriteBehind::builder(cfg).build().await.unwrap()
}

/// The key prefix of `lone_redis_handle(_, test)`.
fn lone_prefix(test: &str) -> String {
    format!("fga-wb-{test}-{}", std::process::id())
}

/// `op` on the tuple whose Write alone fails, flushed with other traffic
/// until it is given up; the flush that gave it up.
#[cfg(feature = "redis")]
async fn give_up(wb: &WriteBehind, op: Op, others: &mut usize) -> fga_wb::FlushReport {
    on_poison(wb, op).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = flush_with_traffic(wb, others).await;
        if r.dead_lettered > 0 {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never given up: {r:?}"
        );
    }
}

/// `op` on the tuple whose Write alone fails.
async fn on_poison(wb: &WriteBehind, op: Op) {
    match op {
        Op::Revoke => wb.revoke("user:poison", "viewer", "document:p").await,
        _ => wb.grant("user:poison", "viewer", "document:p").await,
    }
    .unwrap();
}

/// A clear that drops a newer op on a tuple whose revoke was given up
/// after transient failures leaves that letter current: the op dropped
/// never reached OpenFGA, which may still hold the tuple, so checks keep
/// failing closed until a replay. Before, the clear superseded the letter,
/// and the check asked OpenFGA, which could answer `allowed`. A grant's
/// letter is superseded by such a clear as before: a replay must not grant
/// what the application took back since.
#[cfg(feature = "redis")]
#[tokio::test]
async fn a_clear_keeps_a_given_up_revoke_failing_checks_closed() {
    let server = mock_openfga().await;
    failing_on_poison(&server).await;
    let wb = lone_redis_handle(&server, "lone-clear").await;
    give_up(&wb, Op::Revoke, &mut 0).await;
    for newer in [Op::Revoke, Op::Grant] {
        on_poison(&wb, newer).await;
        assert_eq!(wb.clear().await.unwrap(), 1, "{newer:?}");
        let e = wb
            .check("user:poison", "viewer", "document:p")
            .await
            .expect_err("fails closed on the dead revoke");
        assert!(e.to_string().contains("dlq replay"), "{newer:?}: {e}");
        let letters = wb.dead_letters().await.unwrap();
        assert_eq!(letters.len(), 1, "{letters:?}");
        assert!(!letters[0].superseded, "{newer:?}: {letters:?}");
    }
    wb.purge_dead_letters(None).await.unwrap();
    give_up(&wb, Op::Grant, &mut 0).await;
    on_poison(&wb, Op::Revoke).await;
    assert_eq!(wb.clear().await.unwrap(), 1);
    let letters = wb.dead_letters().await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].op, Op::Grant, "{letters:?}");
    assert!(letters[0].superseded, "{letters:?}");
    wb.purge_dead_letters(None).await.unwrap();
    wb.shutdown().await.unwrap();
}

/// The memory store never gives such an op up: its checks do not look at
/// dead letters, so a revoke given up would let OpenFGA's stale tuple
/// answer `allowed`. It stays pending, and checks on it fail closed.
#[tokio::test]
async fn the_memory_store_keeps_a_revoke_failing_alone() {
    let server = mock_openfga().await;
    failing_on_poison(&server).await;
    let wb = WriteBehind::builder(lone_config(&server))
        .build()
        .await
        .unwrap();
    on_poison(&wb, Op::Revoke).await;
    let mut others = 0;
    // Well past what the Redis store gives up after.
    let started = std::time::Instant::now();
    while others < 10 || started.elapsed() < Duration::from_millis(200) {
        let r = flush_with_traffic(&wb, &mut others).await;
        assert_eq!(r.dead_lettered, 0, "{r:?}");
    }
    let p = wb.pending().await.unwrap();
    assert_eq!((p.deletes, p.in_flight), (1, 0), "{p:?}");
    assert!(wb.dead_letters().await.unwrap().is_empty());
    // OpenFGA still says allowed: only the pending revoke denies.
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path(format!("/stores/{STORE}/check")))
        .respond_with(support::fixture("check-allowed").response())
        .mount(&server)
        .await;
    let e = wb
        .check("user:poison", "viewer", "document:p")
        .await
        .expect_err("fails closed on the pending revoke");
    assert!(e.is_stale_check(), "{e}");
    wb.clear().await.unwrap();
    wb.shutdown().await.unwrap();
}

/// Manual flushes, no quick retries, and a retry schedule of 40 ms in all.
fn lone_config(server: &wiremock::MockServer) -> fga_wb::Config {
    let mut cfg = no_quick_retries(manual_flush(mock_config(server)));
    cfg.queue.retry_schedule = vec![Duration::from_millis(20); 2];
    // Only the test's flushes retry it: after the pump's own pause (a
    // busy machine's gap between two of them), a retry in the background
    // counted towards the schedule and could give the op up there, out of
    // every flush's report.
    cfg.flush.retry_initial_backoff = Duration::from_secs(3600);
    cfg.flush.retry_max_backoff = Duration::from_secs(3600);
    // A check waiting for the pending revoke gives up soon.
    cfg.check.revoke_wait_timeout = Duration::from_millis(100);
    cfg
}

/// Grants one more tuple (other traffic: a Write lands between the
/// failing tuple's tries), then flushes.
async fn flush_with_traffic(wb: &WriteBehind, others: &mut usize) -> fga_wb::FlushReport {
    wb.grant(&format!("user:u{others}"), "viewer", "document:q")
        .await
        .unwrap();
    *others += 1;
    wb.flush().await.unwrap()
}

/// A server that fails every Write with a 500 is not bisected: each chunk
/// is split once, its halves sent once each, and then it waits for the
/// pause like any outage (its requests carry at least half a chunk).
#[tokio::test]
async fn a_server_failing_every_write_is_not_bisected() {
    let server = mock_openfga().await;
    write_mock()
        .respond_with(support::fixture("server-error-500").response())
        .mount(&server)
        .await;
    let wb = manual_handle(&server).await;
    for i in 0..200 {
        wb.grant(&format!("user:u{i:03}"), "viewer", "document:o")
            .await
            .unwrap();
    }
    let r = wb.flush().await.unwrap();
    assert_eq!(r.applied, 0, "{r:?}");
    assert!(r.error.is_some(), "{r:?}");
    let sizes: Vec<usize> = write_bodies(&server)
        .await
        .iter()
        .map(|b| body_tuples(b).len())
        .collect();
    assert!(sizes.iter().all(|&n| n >= 50), "{sizes:?}");
    // Per chunk of 100 at most: the request and its 3 quick retries,
    // then two halves once each.
    let n = |size| sizes.iter().filter(|&&s| s == size).count();
    assert!(n(100) <= 2 * 4 && n(50) <= 2 * 2, "{sizes:?}");
    let p = wb.pending().await.unwrap();
    assert_eq!(p.total + p.in_flight, 200, "nothing lost: {p:?}");
    assert_eq!(r.dead_lettered, 0, "{r:?}");
    wb.clear().await.unwrap();
}

/// A grant over a tuple OpenFGA holds with another condition replaces it:
/// a delete, then a write. Where the delete lands and the write is refused
/// for good (a model switched in between, another client's write), the
/// grant is dead-lettered and OpenFGA no longer holds the old tuple, yet
/// its cached answers may still allow through it. Checks on it then ask
/// for fresh answers, as after an applied op, in either store. Before,
/// nothing recorded the delete, and the next check went out with
/// OpenFGA's default consistency.
#[tokio::test]
async fn a_condition_replacement_refused_after_its_delete_asks_for_fresh_answers() {
    replacement_refused_after_its_delete(None).await;
    #[cfg(feature = "redis")]
    replacement_refused_after_its_delete(Some("replaced-refused")).await;
}

/// The test above, with the buffer in Redis under a prefix of `redis`'s
/// (`None`: in memory).
async fn replacement_refused_after_its_delete(redis: Option<&str>) {
    let (server, wb) = past_the_start(
        redis,
        [
            (
                support::fixture("write-duplicate-different-condition").response(),
                1,
            ),
            (support::fixture("write-ok").response(), 1),
            (support::fixture("write-unknown-relation").response(), 1),
        ],
    )
    .await;
    grant_with_another_condition(&wb).await;
    let r = wb.flush().await.unwrap();
    assert_eq!(r.dead_lettered, 1, "{redis:?}: {r:?}");
    let writes = write_bodies(&server).await;
    assert_eq!(
        writes.len(),
        4,
        "the grant, the delete, the grant: {writes:#?}"
    );
    assert!(writes[2]["deletes"]["tuple_keys"].is_array(), "{writes:#?}");
    assert!(!wb.check("user:fay", "viewer", "document:5").await.unwrap());
    assert_eq!(
        consistencies(&server).await,
        ["HIGHER_CONSISTENCY"],
        "{redis:?}"
    );
    wb.purge_dead_letters(None).await.unwrap();
    wb.shutdown().await.unwrap();
}

/// A cleared op may have been written already (a Write whose outcome was
/// unknown, pending again after its hold, that landed late): checks on it
/// then ask for fresh answers, as after an applied op, in either store.
/// Before, the clear left nothing to say so.
#[tokio::test]
async fn checks_on_a_cleared_op_ask_for_fresh_answers() {
    for redis in [None, Some("cleared-fresh")] {
        #[cfg(not(feature = "redis"))]
        if redis.is_some() {
            continue;
        }
        let (server, wb) = past_the_start(redis, []).await;
        // A grant: a revoke would be flushed at once (eager revokes).
        wb.grant("user:fay", "viewer", "document:5").await.unwrap();
        assert_eq!(wb.clear().await.unwrap(), 1, "{redis:?}");
        assert!(!wb.check("user:fay", "viewer", "document:5").await.unwrap());
        assert_eq!(
            consistencies(&server).await,
            ["HIGHER_CONSISTENCY"],
            "{redis:?}"
        );
        wb.shutdown().await.unwrap();
    }
}

/// A mocked OpenFGA whose Checks answer denied and whose Writes answer
/// `writes` in turn (then OK), and a handle on it that flushes when told,
/// with its buffer in Redis under a prefix of `redis`'s (`None`: in
/// memory), past the time its store's start counts as a write to every
/// relation (the memory store's at the handle's start, Redis's at its
/// first op): from then on only a write noted since asks for fresh
/// answers (2 s here).
async fn past_the_start<const N: usize>(
    redis: Option<&str>,
    writes: [(wiremock::ResponseTemplate, u64); N],
) -> (wiremock::MockServer, WriteBehind) {
    let server = mock_openfga().await;
    let first = [(support::fixture("write-ok").response(), 1)];
    writes_then_ok(&server, first.into_iter().chain(writes)).await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .and(wiremock::matchers::path(format!("/stores/{STORE}/check")))
        .respond_with(support::fixture("check-denied").response())
        .mount(&server)
        .await;
    let mut cfg = no_quick_retries(manual_flush(mock_config(&server)));
    if let Some(test) = redis {
        cfg.buffer.store = fga_wb::config::StoreKind::Redis;
        cfg.redis.url = support::redis_url();
        cfg.redis.key_prefix = lone_prefix(test);
    }
    cfg.check.server_cache_ttl = Duration::from_secs(2);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:other", "viewer", "document:9")
        .await
        .unwrap();
    wb.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    (server, wb)
}

/// The `consistency` of each Check the mock received, in order.
async fn consistencies(server: &wiremock::MockServer) -> Vec<serde_json::Value> {
    let check = format!("/stores/{STORE}/check");
    server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|q| q.url.path() == check)
        .map(|q| {
            serde_json::from_slice::<serde_json::Value>(&q.body).unwrap()["consistency"].clone()
        })
        .collect()
}
