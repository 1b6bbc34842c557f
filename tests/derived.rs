//! Read-your-writes through derived relations, and no stale allows, on the
//! documents model (`models/documents.fga`), against the real OpenFGA.
//!
//! Every scenario is a list of grants, revokes and flushes. After each op it
//! asks the handle every *watched* check and compares with the hand-written
//! expectation: an expected `true` must be `Ok(true)` (promise 2: derived
//! relations see a grant before any flush); an expected `false` must not be
//! `Ok(true)` (promise 3: a stale allow is a bug; `false` or a fail-closed
//! stale-check error are both a deny). The handle is asked right after the op
//! returns; only then is the op written to an *oracle* store, against which
//! the expectations themselves are checked, so a wrong expectation fails the
//! test as a test bug, not silently.
//!
//! Flushing is left to the scenario: the interval is an hour and the batch
//! size huge, so nothing is written by itself, and each step asserts that
//! OpenFGA holds nothing but what the last explicit flush wrote (revokes are
//! flushed eagerly, but they only delete). At each flush, and at the end,
//! OpenFGA's own answer (HIGHER_CONSISTENCY) must agree with the handle on
//! every watched check.
//!
//! Each scenario runs twice: *cold*, with a cache of capacity 0 and every
//! check asked once, and *warm*, with every watched check asked before the
//! first op and twice after each op, so that every op meets a cache full of
//! answers it may have made wrong (a grant can turn a cached `false` into
//! `true`, and, with `but not` and `and`, a cached `true` into `false`).

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use fga_wb::openfga::{CheckRequest, WriteRequest};
use fga_wb::{TupleKey, WriteBehind};
use support::{config_for, ground_truth, new_store, parse, stored, tuple, TestStore};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Cold,
    Warm,
}

/// One scenario run: the handle under test, its store, and the oracle.
struct Scenario {
    name: String,
    mode: Mode,
    store: TestStore,
    oracle: TestStore,
    wb: WriteBehind,
    /// Checks asked after every op, as `object#relation@user`.
    watched: Vec<String>,
    /// Every acknowledged tuple (grants minus revokes).
    acknowledged: BTreeSet<String>,
    /// What the last explicit flush left in OpenFGA: nothing outside it may
    /// be stored, because nothing flushes grants by itself.
    at_last_flush: BTreeSet<String>,
    /// The watched checks expected `true` right now.
    expected: BTreeSet<String>,
    /// Acknowledged ops the oracle has not been given yet.
    to_oracle: Vec<WriteRequest>,
    /// Ops so far, for failure messages.
    history: Vec<String>,
    /// Expected-false checks that failed closed instead of answering `false`.
    stale_checks: usize,
}

impl Scenario {
    async fn new(name: &str, mode: Mode, watched: &[&str]) -> Scenario {
        let name = format!("{name}-{mode:?}").to_lowercase();
        let store = new_store(&name).await;
        let oracle = new_store(&format!("{name}-oracle")).await;
        let mut cfg = config_for(&store);
        cfg.flush.interval = Duration::from_secs(3600);
        cfg.flush.batch_size = 100_000;
        // Generous: a derived check that must wait for a revoke should get
        // its answer, not a fail-closed error, on a slow CI machine.
        cfg.check.revoke_wait_timeout = Duration::from_secs(10);
        cfg.cache.ttl = Duration::from_secs(3600);
        if mode == Mode::Cold {
            cfg.cache.capacity = 0;
        }
        let wb = WriteBehind::builder(cfg)
            .build()
            .await
            .expect("build handle");
        let mut sc = Scenario {
            name,
            mode,
            store,
            oracle,
            wb,
            watched: watched.iter().map(|s| (*s).to_owned()).collect(),
            acknowledged: BTreeSet::new(),
            at_last_flush: BTreeSet::new(),
            expected: BTreeSet::new(),
            to_oracle: Vec::new(),
            history: Vec::new(),
            stale_checks: 0,
        };
        if mode == Mode::Warm {
            // Fill the cache with every watched check's `false`.
            sc.expect(&[]).await;
        }
        sc
    }

    async fn grant(&mut self, t: &str) {
        let (user, relation, object) = parse(t);
        self.wb
            .grant(user, relation, object)
            .await
            .unwrap_or_else(|e| panic!("{}: grant {t}: {e}", self.name));
        self.history.push(format!("grant {t}"));
        self.acknowledged.insert(t.to_owned());
        self.to_oracle
            .push(WriteRequest::idempotent(vec![tuple(t)], vec![]));
    }

    async fn revoke(&mut self, t: &str) {
        let (user, relation, object) = parse(t);
        self.wb
            .revoke(user, relation, object)
            .await
            .unwrap_or_else(|e| panic!("{}: revoke {t}: {e}", self.name));
        self.history.push(format!("revoke {t}"));
        self.acknowledged.remove(t);
        self.to_oracle
            .push(WriteRequest::idempotent(vec![], vec![tuple(t)]));
    }

    /// Writes the ops acknowledged since the last call to the oracle, in
    /// order.
    async fn apply_to_oracle(&mut self) {
        for w in self.to_oracle.drain(..) {
            self.oracle
                .client
                .write(&self.oracle.store_id, &w)
                .await
                .expect("oracle write");
        }
    }

    /// After the last op: exactly the watched checks in `allowed` are true.
    async fn expect(&mut self, allowed: &[&str]) {
        for a in allowed {
            assert!(
                self.watched.iter().any(|w| w == a),
                "test bug: {a} is expected but not watched"
            );
        }
        self.expected = allowed.iter().map(|s| (*s).to_owned()).collect();
        let last = self
            .history
            .last()
            .cloned()
            .unwrap_or_else(|| "start".into());

        // Ask the handle first, right after the op returned: anything in
        // between (like the oracle's round trips) would give its flusher time
        // to apply a pending revoke and hide a check that does not wait.
        let rounds = match self.mode {
            Mode::Cold => 1,
            Mode::Warm => 2,
        };
        let mut answers = Vec::new();
        for round in 0..rounds {
            for c in &self.watched {
                let (user, relation, object) = parse(c);
                answers.push((
                    round,
                    c.clone(),
                    self.wb.check(user, relation, object).await,
                ));
            }
        }

        // The expectation must be what OpenFGA says with every op applied.
        self.apply_to_oracle().await;
        for c in &self.watched {
            let truth = ground_truth(&self.oracle, c).await;
            assert_eq!(
                truth,
                self.expected.contains(c),
                "test bug in {}: after `{last}`, OpenFGA says {c} is {truth}",
                self.name
            );
        }

        for (round, c, got) in answers {
            let want = self.expected.contains(&c);
            match got {
                Ok(true) if want => {}
                Ok(false) | Err(_) if want => panic!(
                    "{}: stale deny of a granted check: after `{last}`, {c} (round {round}) \
                     answered {got:?}, expected true before any flush\nops: {:#?}",
                    self.name, self.history
                ),
                Ok(true) => panic!(
                    "{}: STALE ALLOW: after `{last}`, {c} (round {round}) answered true, \
                     OpenFGA with every op applied says false\nops: {:#?}",
                    self.name, self.history
                ),
                Ok(false) => {}
                Err(e) if e.is_stale_check() => self.stale_checks += 1,
                Err(e) => panic!("{}: check {c} after `{last}`: {e}", self.name),
            }
        }

        // Nothing was written but by the explicit flushes.
        let now: BTreeSet<String> = stored(&self.store).await.into_iter().collect();
        let extra: Vec<&String> = now.difference(&self.at_last_flush).collect();
        assert!(
            extra.is_empty(),
            "{}: after `{last}`, OpenFGA holds {extra:?}, which no explicit flush wrote",
            self.name
        );
    }

    /// Flushes and checks that OpenFGA holds exactly the acknowledged tuples
    /// and agrees with the handle on every watched check.
    async fn flush(&mut self) {
        self.apply_to_oracle().await;
        let report = self.wb.flush().await.expect("flush");
        assert_eq!(report.error, None, "{}: flush: {report:?}", self.name);
        assert_eq!(report.dead_lettered, 0, "{}: flush: {report:?}", self.name);
        self.history.push("flush".into());
        self.at_last_flush = self.acknowledged.clone();
        let now: BTreeSet<String> = stored(&self.store).await.into_iter().collect();
        assert_eq!(now, self.acknowledged, "{}: stored after flush", self.name);
        assert_eq!(
            self.wb.pending().await.unwrap().total,
            0,
            "{}: pending after flush",
            self.name
        );
        for c in self.watched.clone() {
            let (user, relation, object) = parse(&c);
            let fga = ground_truth(&self.store, &c).await;
            let handle = self
                .wb
                .check(user, relation, object)
                .await
                .unwrap_or_else(|e| panic!("{}: check {c} after flush: {e}", self.name));
            let want = self.expected.contains(&c);
            assert_eq!(fga, want, "{}: OpenFGA on {c} after flush", self.name);
            assert_eq!(handle, fga, "{}: handle vs OpenFGA on {c}", self.name);
        }
    }

    async fn finish(mut self) {
        self.flush().await;
        let r = self.wb.shutdown().await.expect("shutdown");
        assert_eq!(r.left.total + r.left.in_flight, 0);
        if self.stale_checks > 0 {
            println!(
                "{}: {} expected-false checks failed closed (stale deny by timeout)",
                self.name, self.stale_checks
            );
        }
    }
}

const MODES: [Mode; 2] = [Mode::Cold, Mode::Warm];

/// `editor` implies `viewer` (and so `can_view`), not `owner` nor
/// `can_share`. The grant is seen through `viewer` before any flush; the
/// revoke, of a flushed tuple and of a pending one, is denied at once.
#[tokio::test]
async fn editor_implies_viewer() {
    let anne = [
        "document:1#editor@user:anne",
        "document:1#viewer@user:anne",
        "document:1#can_view@user:anne",
    ];
    for mode in MODES {
        let mut sc = Scenario::new(
            "derived-editor",
            mode,
            &[
                anne[0],
                anne[1],
                anne[2],
                "document:1#owner@user:anne",
                "document:1#can_share@user:anne",
                "document:1#viewer@user:bob",
                "document:2#viewer@user:anne",
            ],
        )
        .await;
        sc.grant("document:1#editor@user:anne").await;
        sc.expect(&anne).await;
        sc.flush().await;
        sc.revoke("document:1#editor@user:anne").await;
        sc.expect(&[]).await;
        // Pending grant, then pending revoke of the same tuple.
        sc.grant("document:1#editor@user:anne").await;
        sc.expect(&anne).await;
        sc.revoke("document:1#editor@user:anne").await;
        sc.expect(&[]).await;
        sc.grant("document:1#editor@user:anne").await;
        sc.expect(&anne).await;
        sc.finish().await;
    }
}

/// The shortcut that answers `true` for a pending grant of the checked tuple
/// does not skip the caller's own input: with a contextual tuple OpenFGA
/// refuses (a type the model lacks), the check is refused, as the same
/// check is once the grant is written. Before, it answered `true`.
#[tokio::test]
async fn a_check_openfga_refuses_is_refused_with_the_grant_pending_too() {
    let s = new_store("derived-shortcut-input").await;
    let wb = WriteBehind::builder(config_for(&s))
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    let mut r = CheckRequest::new("user:anne", "viewer", "document:1");
    r.contextual_tuples
        .push(TupleKey::new("planet:x", "viewer", "document:2").unwrap());
    let pending = wb.check_request(&r).await;
    wb.flush().await.unwrap();
    let written = wb.check_request(&r).await;
    assert!(
        matches!(&written, Err(e) if e.is_invalid_input()),
        "OpenFGA refuses it: {written:?}"
    );
    assert!(
        matches!(&pending, Err(e) if e.is_invalid_input()),
        "so with the grant pending: {pending:?}"
    );
}

/// `owner` implies `editor` implies `viewer`; `can_share` is `editor and
/// owner`, so it needs both sides: a direct `editor` alone is not enough, and
/// revoking `owner` takes `can_share` away while a direct `editor` keeps
/// `editor` and `viewer`.
#[tokio::test]
async fn owner_implies_editor_viewer_and_can_share_needs_both() {
    let all = |u: &str| {
        ["owner", "editor", "viewer", "can_view", "can_share"]
            .map(|r| format!("document:1#{r}@{u}"))
    };
    let (anne, bob) = (all("user:anne"), all("user:bob"));
    let watched: Vec<&str> = anne.iter().chain(bob.iter()).map(String::as_str).collect();
    for mode in MODES {
        let mut sc = Scenario::new("derived-owner", mode, &watched).await;
        // Intersection, one side only: editor without owner.
        sc.grant("document:1#editor@user:bob").await;
        sc.expect(&[&bob[1], &bob[2], &bob[3]]).await;
        // Owner alone gives both sides (owner implies editor).
        sc.grant("document:1#owner@user:anne").await;
        let anne_all: Vec<&str> = anne.iter().map(String::as_str).collect();
        let mut want = anne_all.clone();
        want.extend([&bob[1], &bob[2], &bob[3]].map(String::as_str));
        sc.expect(&want).await;
        // Both sides for bob now.
        sc.grant("document:1#owner@user:bob").await;
        let mut want = anne_all.clone();
        want.extend(bob.iter().map(String::as_str));
        sc.expect(&want).await;
        sc.flush().await;
        // One side of the intersection goes: can_share goes with it.
        sc.revoke("document:1#owner@user:bob").await;
        let mut want = anne_all.clone();
        want.extend([&bob[1], &bob[2], &bob[3]].map(String::as_str));
        sc.expect(&want).await;
        sc.revoke("document:1#owner@user:anne").await;
        sc.expect(&[&bob[1], &bob[2], &bob[3]]).await;
        // The other side goes while owner comes back: still no can_share.
        sc.revoke("document:1#editor@user:bob").await;
        sc.expect(&[]).await;
        sc.grant("document:1#owner@user:bob").await;
        sc.expect(&bob.iter().map(String::as_str).collect::<Vec<_>>())
            .await;
        sc.finish().await;
    }
}

/// A document's `parent` folder passes its viewers and editors on: granting
/// `document:1#parent@folder:f` and `folder:f#viewer@user:anne` (in either
/// order) makes anne a viewer of the document before any flush; revoking the
/// parent link takes it away while the folder grant stays.
#[tokio::test]
async fn folder_parent_gives_access_to_its_documents() {
    let watched = [
        "folder:f#viewer@user:anne",
        "folder:f#editor@user:anne",
        "document:1#viewer@user:anne",
        "document:1#can_view@user:anne",
        "document:1#editor@user:anne",
        "document:1#parent@folder:f",
        "document:2#viewer@user:anne",
        "folder:f#viewer@user:bob",
        "folder:f#editor@user:bob",
        "document:1#viewer@user:bob",
        "document:1#editor@user:bob",
        "document:1#can_view@user:bob",
        "document:1#can_share@user:bob",
    ];
    let anne_folder = "folder:f#viewer@user:anne";
    let anne_doc = [
        "document:1#viewer@user:anne",
        "document:1#can_view@user:anne",
    ];
    let link = "document:1#parent@folder:f";
    let bob_folder = ["folder:f#viewer@user:bob", "folder:f#editor@user:bob"];
    let bob_doc = [
        "document:1#viewer@user:bob",
        "document:1#editor@user:bob",
        "document:1#can_view@user:bob",
    ];
    for mode in MODES {
        let mut sc = Scenario::new("derived-parent", mode, &watched).await;
        sc.grant("folder:f#viewer@user:anne").await;
        sc.expect(&[anne_folder]).await;
        sc.grant("document:1#parent@folder:f").await;
        sc.expect(&[anne_folder, link, anne_doc[0], anne_doc[1]])
            .await;
        sc.grant("folder:f#editor@user:bob").await;
        let mut all = vec![anne_folder, link, anne_doc[0], anne_doc[1]];
        all.extend(bob_folder);
        all.extend(bob_doc);
        sc.expect(&all).await;
        sc.flush().await;
        // The link goes: the folder grants stay, the document's go.
        sc.revoke("document:1#parent@folder:f").await;
        sc.expect(&[anne_folder, bob_folder[0], bob_folder[1]])
            .await;
        // Link first this time, then the folder grant.
        sc.revoke("folder:f#viewer@user:anne").await;
        sc.expect(&[bob_folder[0], bob_folder[1]]).await;
        sc.grant("document:1#parent@folder:f").await;
        let mut want = vec![link];
        want.extend(bob_folder);
        want.extend(bob_doc);
        sc.expect(&want).await;
        sc.grant("folder:f#viewer@user:anne").await;
        sc.expect(&all).await;
        sc.finish().await;
    }
}

/// Folders nest: `editor from parent` and `viewer from parent` go through
/// two levels (root -> sub -> document), and `owner` of the root makes anne
/// an editor all the way down (but not `can_share`: she owns no document).
#[tokio::test]
async fn nested_folders() {
    let watched = [
        "folder:root#editor@user:anne",
        "folder:sub#editor@user:anne",
        "folder:sub#viewer@user:anne",
        "document:1#editor@user:anne",
        "document:1#viewer@user:anne",
        "document:1#can_view@user:anne",
        "document:1#can_share@user:anne",
        "document:1#viewer@user:bob",
    ];
    let down = [
        "folder:root#editor@user:anne",
        "folder:sub#editor@user:anne",
        "folder:sub#viewer@user:anne",
        "document:1#editor@user:anne",
        "document:1#viewer@user:anne",
        "document:1#can_view@user:anne",
    ];
    for mode in MODES {
        let mut sc = Scenario::new("derived-nested-folders", mode, &watched).await;
        sc.grant("document:1#parent@folder:sub").await;
        sc.grant("folder:sub#parent@folder:root").await;
        sc.expect(&[]).await;
        sc.grant("folder:root#owner@user:anne").await;
        sc.expect(&down).await;
        sc.flush().await;
        // Cut the middle link: only the root keeps anne.
        sc.revoke("folder:sub#parent@folder:root").await;
        sc.expect(&[down[0]]).await;
        sc.grant("folder:sub#parent@folder:root").await;
        sc.expect(&down).await;
        sc.flush().await;
        // A viewer of the root views the document through two parents.
        sc.grant("folder:root#viewer@user:bob").await;
        let mut want = down.to_vec();
        want.push("document:1#viewer@user:bob");
        sc.expect(&want).await;
        sc.revoke("folder:root#owner@user:anne").await;
        sc.expect(&["document:1#viewer@user:bob"]).await;
        sc.finish().await;
    }
}

/// A `group#member` userset: `document:1#viewer@group:eng#member` plus
/// `group:eng#member@user:anne` makes anne a viewer; the same through
/// `editor`; removing the membership or the userset takes it away.
#[tokio::test]
async fn group_userset() {
    let watched = [
        "group:eng#member@user:anne",
        "document:1#viewer@user:anne",
        "document:1#editor@user:anne",
        "document:1#can_view@user:anne",
        "group:eng#member@user:bob",
        "document:1#viewer@user:bob",
        "document:1#editor@user:bob",
        "document:1#can_view@user:bob",
    ];
    let member = |u: &'static str| format!("group:eng#member@user:{u}");
    let viewer =
        |u: &'static str| ["viewer", "can_view"].map(|r| format!("document:1#{r}@user:{u}"));
    let editor = |u: &'static str| format!("document:1#editor@user:{u}");
    for mode in MODES {
        let mut sc = Scenario::new("derived-group", mode, &watched).await;
        sc.grant("document:1#viewer@group:eng#member").await;
        sc.expect(&[]).await;
        sc.grant("group:eng#member@user:anne").await;
        let [v, cv] = viewer("anne");
        let anne_member = member("anne");
        sc.expect(&[&anne_member, &v, &cv]).await;
        sc.grant("document:1#editor@group:eng#member").await;
        let anne_editor = editor("anne");
        sc.expect(&[&anne_member, &v, &cv, &anne_editor]).await;
        sc.flush().await;
        sc.revoke("group:eng#member@user:anne").await;
        sc.expect(&[]).await;
        sc.grant("group:eng#member@user:bob").await;
        let [bv, bcv] = viewer("bob");
        let (bob_member, bob_editor) = (member("bob"), editor("bob"));
        sc.expect(&[&bob_member, &bv, &bcv, &bob_editor]).await;
        sc.revoke("document:1#editor@group:eng#member").await;
        sc.expect(&[&bob_member, &bv, &bcv]).await;
        sc.flush().await;
        sc.revoke("document:1#viewer@group:eng#member").await;
        sc.expect(&[&bob_member]).await;
        sc.finish().await;
    }
}

/// Groups in groups: `group:eng#member@group:backend#member` makes every
/// backend member an eng member, and so a viewer of what eng may view.
#[tokio::test]
async fn nested_groups() {
    let watched = [
        "group:backend#member@user:anne",
        "group:eng#member@user:anne",
        "document:1#viewer@user:anne",
        "group:eng#member@user:bob",
        "document:1#viewer@user:bob",
        "group:backend#member@user:bob",
    ];
    let anne_all = [
        "group:backend#member@user:anne",
        "group:eng#member@user:anne",
        "document:1#viewer@user:anne",
    ];
    let bob = ["group:eng#member@user:bob", "document:1#viewer@user:bob"];
    for mode in MODES {
        let mut sc = Scenario::new("derived-nested-groups", mode, &watched).await;
        sc.grant("document:1#viewer@group:eng#member").await;
        sc.grant("group:backend#member@user:anne").await;
        sc.expect(&[anne_all[0]]).await;
        sc.grant("group:eng#member@group:backend#member").await;
        sc.expect(&anne_all).await;
        sc.grant("group:eng#member@user:bob").await;
        sc.expect(&[anne_all[0], anne_all[1], anne_all[2], bob[0], bob[1]])
            .await;
        sc.flush().await;
        // Cut the nesting: anne stays in backend only.
        sc.revoke("group:eng#member@group:backend#member").await;
        sc.expect(&[anne_all[0], bob[0], bob[1]]).await;
        sc.grant("group:eng#member@group:backend#member").await;
        sc.expect(&[anne_all[0], anne_all[1], anne_all[2], bob[0], bob[1]])
            .await;
        sc.flush().await;
        sc.revoke("group:backend#member@user:anne").await;
        sc.expect(&bob).await;
        // Bob joins backend too: still a viewer, now two ways.
        sc.grant("group:backend#member@user:bob").await;
        sc.expect(&[bob[0], bob[1], "group:backend#member@user:bob"])
            .await;
        sc.revoke("group:eng#member@user:bob").await;
        sc.expect(&[bob[0], bob[1], "group:backend#member@user:bob"])
            .await;
        sc.finish().await;
    }
}

/// The public wildcard: `document:1#viewer@user:*` makes every user a viewer
/// (and `can_view`, unless blocked), but not an editor.
#[tokio::test]
async fn wildcard_viewer() {
    let watched = [
        "document:1#viewer@user:anne",
        "document:1#can_view@user:anne",
        "document:1#editor@user:anne",
        "document:1#viewer@user:bob",
        "document:1#can_view@user:bob",
        "document:1#blocked@user:bob",
        "document:2#viewer@user:anne",
    ];
    for mode in MODES {
        let mut sc = Scenario::new("derived-wildcard", mode, &watched).await;
        sc.grant("document:1#viewer@user:*").await;
        sc.expect(&[
            "document:1#viewer@user:anne",
            "document:1#can_view@user:anne",
            "document:1#viewer@user:bob",
            "document:1#can_view@user:bob",
        ])
        .await;
        sc.grant("document:1#blocked@user:bob").await;
        sc.expect(&[
            "document:1#viewer@user:anne",
            "document:1#can_view@user:anne",
            "document:1#viewer@user:bob",
            "document:1#blocked@user:bob",
        ])
        .await;
        sc.flush().await;
        sc.revoke("document:1#viewer@user:*").await;
        sc.expect(&["document:1#blocked@user:bob"]).await;
        sc.grant("document:1#viewer@user:anne").await;
        sc.expect(&[
            "document:1#viewer@user:anne",
            "document:1#can_view@user:anne",
            "document:1#blocked@user:bob",
        ])
        .await;
        sc.grant("document:1#viewer@user:*").await;
        sc.revoke("document:1#blocked@user:bob").await;
        sc.expect(&[
            "document:1#viewer@user:anne",
            "document:1#can_view@user:anne",
            "document:1#viewer@user:bob",
            "document:1#can_view@user:bob",
        ])
        .await;
        sc.finish().await;
    }
}

/// Exclusion: `can_view` is `viewer but not blocked`, so a *grant* of
/// `blocked` removes access at once, pending or flushed viewer alike, and the
/// revoke of `blocked` gives it back, pending or flushed blocked alike.
#[tokio::test]
async fn exclusion_a_grant_removes_access() {
    let watched = [
        "document:1#viewer@user:anne",
        "document:1#can_view@user:anne",
        "document:1#blocked@user:anne",
        "document:2#viewer@user:anne",
        "document:2#can_view@user:anne",
        "document:2#blocked@user:anne",
    ];
    let open = [
        "document:1#viewer@user:anne",
        "document:1#can_view@user:anne",
    ];
    let blocked = [
        "document:1#viewer@user:anne",
        "document:1#blocked@user:anne",
    ];
    for mode in MODES {
        let mut sc = Scenario::new("derived-exclusion", mode, &watched).await;
        // Both pending.
        sc.grant("document:1#viewer@user:anne").await;
        sc.expect(&open).await;
        sc.grant("document:1#blocked@user:anne").await;
        sc.expect(&blocked).await;
        sc.revoke("document:1#blocked@user:anne").await;
        sc.expect(&open).await;
        // Viewer flushed, blocked pending.
        sc.flush().await;
        sc.grant("document:1#blocked@user:anne").await;
        sc.expect(&blocked).await;
        // Both flushed; the revoke of blocked gives access back.
        sc.flush().await;
        sc.revoke("document:1#blocked@user:anne").await;
        sc.expect(&open).await;
        // Blocked first, then a derived viewer through a folder: still no
        // can_view on document:2.
        sc.grant("document:2#blocked@user:anne").await;
        sc.grant("document:2#parent@folder:f").await;
        sc.grant("folder:f#editor@user:anne").await;
        let mut want = open.to_vec();
        want.extend([
            "document:2#viewer@user:anne",
            "document:2#blocked@user:anne",
        ]);
        sc.expect(&want).await;
        sc.flush().await;
        sc.revoke("document:2#blocked@user:anne").await;
        want.pop();
        want.push("document:2#can_view@user:anne");
        sc.expect(&want).await;
        sc.finish().await;
    }
}

/// Revokes are flushed eagerly, whatever happened before: a `flush()` that
/// found nothing to write must not hold back the next revoke until
/// `flush.interval` (an hour here). A check that depends on the revoke
/// waits for it and must then answer, not fail closed.
#[tokio::test]
async fn revoke_after_an_empty_flush_is_still_flushed_eagerly() {
    let s = new_store("derived-revoke-after-empty-flush").await;
    let mut cfg = config_for(&s);
    cfg.flush.interval = Duration::from_secs(3600);
    cfg.check.revoke_wait_timeout = Duration::from_secs(5);
    let wb = WriteBehind::builder(cfg).build().await.unwrap();
    wb.grant("user:anne", "viewer", "document:1").await.unwrap();
    wb.flush().await.unwrap();
    // Nothing pending: this flush sends no request.
    let r = wb.flush().await.unwrap();
    assert_eq!(r.requests, 0);
    wb.revoke("user:anne", "viewer", "document:1")
        .await
        .unwrap();
    // Nothing asks the handle for it (a check that finds the revoke pending
    // flushes it itself): the revoke trigger alone must send it.
    support::eventually(
        "the revoke in OpenFGA, sent by the trigger alone",
        Duration::from_secs(20),
        || async { stored(&s).await.is_empty() },
    )
    .await;
    let started = std::time::Instant::now();
    let got = wb.check("user:anne", "viewer", "document:1").await;
    assert!(
        matches!(got, Ok(false)),
        "check after the revoke: {got:?} after {:?} (expected Ok(false): the revoke is \
         flushed eagerly)",
        started.elapsed()
    );
    assert!(stored(&s).await.is_empty());
    wb.shutdown().await.unwrap();
}
