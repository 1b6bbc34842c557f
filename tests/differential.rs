//! Differential test of the handle against OpenFGA itself.
//!
//! Thousands of random grants, revokes, checks and occasional flushes on the
//! documents model (`models/documents.fga`), over a universe small enough
//! that ops interact (4 users, 2 groups, 3 folders, 4 documents: group
//! nesting, folder chains and cycles, usersets, the `user:*` wildcard, `but
//! not` and `and`). Every op the handle acknowledges is also written to a
//! second store, the *oracle*, before the oracle is next asked, so the oracle
//! is "OpenFGA with every acknowledged op applied". After every check on the
//! handle, the same check goes to the oracle with HIGHER_CONSISTENCY. (The
//! oracle writes wait until just after the handle's check, so that the check
//! follows the op at once: an oracle round trip in between would give the
//! handle's flusher time to apply a revoke and hide a missing wait. Half the
//! checks are on the object of the last op, where it most likely changed
//! something.) A quarter of the checks go through `batch_check`; ~5% of ops
//! are a `list_objects` and a `list_users`, each compared whole with the
//! oracle's lists.
//!
//! * **stale allow** (handle `true`, or a listed object or user the oracle
//!   does not list) breaks "a revoke is never answered allowed" and fails
//!   the test;
//! * **stale deny** (handle `false`, or a fail-closed stale-check error,
//!   where the oracle says `true`) is allowed by the design and counted.
//!
//! At the end the handle is flushed: its store must hold exactly the
//! oracle's tuples, and with nothing pending every check must agree.
//!
//! Three variants: `manual_flushes` (nothing flushes by itself but revokes,
//! checks are answered from pending grants; ~2% of ops are `flush()`),
//! `background_flushes` (a 50 ms flush interval and a 50 ms cache TTL, so the
//! flusher and cache expiry interleave with the ops), and
//! `on_a_caching_server` (background flushes against OpenFGA on PostgreSQL
//! with every cache on: answers OpenFGA cached before a write must never
//! come back).
//!
//! `FGA_WB_DIFF_SEED` and `FGA_WB_DIFF_OPS` override the seed and the number
//! of ops; the counts are printed (`--nocapture`), and on a stale allow the
//! whole op log is written under the target directory.

mod support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use fga_wb::openfga::{
    CheckRequest, Consistency, ListObjectsRequest, ListUsersRequest, WriteRequest,
};
use fga_wb::WriteBehind;
use support::{
    config_for, documents_model, ground_truth, new_store_on, parse, stored, tuple, Rng, Server,
    TestStore,
};

const USERS: [&str; 4] = ["user:u0", "user:u1", "user:u2", "user:u3"];
const GROUPS: [&str; 2] = ["group:g0", "group:g1"];
const FOLDERS: [&str; 3] = ["folder:f0", "folder:f1", "folder:f2"];
const DOCUMENTS: [&str; 4] = ["document:d0", "document:d1", "document:d2", "document:d3"];

// The universe of `models/shapes.fga`.
const S_USERS: [&str; 3] = ["user:u0", "user:u1", "user:u2"];
const ORGS: [&str; 2] = ["org:o0", "org:o1"];
const DRIVES: [&str; 1] = ["drive:v0"];
const S_FOLDERS: [&str; 2] = ["folder:f0", "folder:f1"];
const DOCS: [&str; 2] = ["doc:d0", "doc:d1"];

/// The universe: every model-valid tuple, and every check, grouped in
/// categories so that rare-but-important kinds (parent links, nesting) come
/// up as often as the plentiful ones.
struct Universe {
    tuples: Vec<Vec<String>>,
    checks: Vec<Vec<String>>,
    /// The type whose checks ops on `feeds` types most likely change.
    top: &'static str,
    feeds: &'static [&'static str],
}

fn key(object: &str, relation: &str, user: &str) -> String {
    format!("{object}#{relation}@{user}")
}

/// `relation` of every object in `objects` for every user in `users`.
fn keys(objects: &[&str], relation: &str, users: &[&str]) -> Vec<String> {
    objects
        .iter()
        .flat_map(|o| users.iter().map(move |u| key(o, relation, u)))
        .collect()
}

impl Universe {
    /// `models/shapes.fga`: a tupleset of two types (one without the
    /// relation asked through it), `but not` under `from` and under a
    /// userset, `and` over `from`, a wildcard under `but not`.
    fn shapes() -> Universe {
        let members: Vec<String> = ORGS.iter().map(|o| format!("{o}#member")).collect();
        let members: Vec<&str> = members.iter().map(String::as_str).collect();
        let banned: Vec<&str> = S_USERS.iter().copied().chain(["user:*"]).collect();
        let parents: Vec<&str> = S_FOLDERS.iter().chain(DRIVES.iter()).copied().collect();
        let viewers: Vec<&str> = S_USERS.iter().copied().chain(members).collect();
        let tuples = vec![
            keys(&ORGS, "banned", &banned),
            keys(&ORGS, "member", &S_USERS),
            keys(&DRIVES, "viewer", &S_USERS),
            keys(&S_FOLDERS, "org", &ORGS),
            keys(&S_FOLDERS, "blocked", &S_USERS),
            keys(&S_FOLDERS, "viewer", &viewers),
            keys(&DOCS, "parent", &parents),
            keys(&DOCS, "org", &ORGS),
        ];
        let mut checks = Vec::new();
        for (objects, relations) in [
            (&ORGS[..], &["member", "banned"][..]),
            (&DRIVES[..], &["viewer"][..]),
            (&S_FOLDERS[..], &["viewer", "blocked"][..]),
            (&DOCS[..], &["viewer", "can_view", "denied"][..]),
        ] {
            checks.extend(relations.iter().map(|r| keys(objects, r, &S_USERS)));
        }
        Universe {
            tuples,
            checks,
            top: "doc:",
            feeds: &["org:", "drive:", "folder:"],
        }
    }

    /// `models/documents.fga`.
    fn documents() -> Universe {
        let members: Vec<String> = GROUPS.iter().map(|g| format!("{g}#member")).collect();
        let mut tuples: Vec<Vec<String>> = Vec::new();
        let mut cat = |f: &mut dyn FnMut(&mut Vec<String>)| {
            let mut v = Vec::new();
            f(&mut v);
            tuples.push(v);
        };
        // group#member: [user, group#member] (cycles included). Not
        // `group:g#member@group:g#member`: OpenFGA refuses it ("cannot write a
        // tuple that is implicit").
        cat(&mut |v| {
            for g in GROUPS {
                v.extend(USERS.iter().map(|u| key(g, "member", u)));
            }
        });
        cat(&mut |v| {
            for g in GROUPS {
                v.extend(
                    members
                        .iter()
                        .filter(|m| !m.starts_with(&format!("{g}#")))
                        .map(|m| key(g, "member", m)),
                );
            }
        });
        for objects in [&FOLDERS[..], &DOCUMENTS[..]] {
            // owner: [user]
            cat(&mut |v| {
                for o in objects {
                    v.extend(USERS.iter().map(|u| key(o, "owner", u)));
                }
            });
            // parent: [folder] (folder chains, cycles and self-parents too)
            cat(&mut |v| {
                for o in objects {
                    v.extend(FOLDERS.iter().map(|f| key(o, "parent", f)));
                }
            });
            // editor: [user, group#member]
            cat(&mut |v| {
                for o in objects {
                    v.extend(USERS.iter().map(|u| key(o, "editor", u)));
                    v.extend(members.iter().map(|m| key(o, "editor", m)));
                }
            });
            // viewer: [user, user:*, group#member] (`user with non_expired`
            // needs a check context; left out)
            cat(&mut |v| {
                for o in objects {
                    v.extend(USERS.iter().map(|u| key(o, "viewer", u)));
                    v.push(key(o, "viewer", "user:*"));
                    v.extend(members.iter().map(|m| key(o, "viewer", m)));
                }
            });
        }
        // document#blocked: [user]
        cat(&mut |v| {
            for d in DOCUMENTS {
                v.extend(USERS.iter().map(|u| key(d, "blocked", u)));
            }
        });

        let mut checks: Vec<Vec<String>> = Vec::new();
        let per_user = |objects: &[&str], relation: &str| -> Vec<String> {
            objects
                .iter()
                .flat_map(|o| USERS.iter().map(move |u| key(o, relation, u)))
                .collect()
        };
        checks.push(per_user(&GROUPS, "member"));
        for r in ["owner", "editor", "viewer"] {
            checks.push(per_user(&FOLDERS, r));
        }
        for r in [
            "owner",
            "editor",
            "viewer",
            "blocked",
            "can_view",
            "can_share",
        ] {
            checks.push(per_user(&DOCUMENTS, r));
        }
        // Checked users that are usersets, and the wildcard: a revoke of a
        // group's nesting, or of a public grant, must deny them too.
        let others: Vec<String> = members
            .iter()
            .cloned()
            .chain(["user:*".to_owned()])
            .collect();
        for r in ["viewer", "can_view"] {
            checks.push(
                DOCUMENTS
                    .iter()
                    .flat_map(|o| others.iter().map(move |u| key(o, r, u)))
                    .collect(),
            );
        }
        // The relation's direct tuples, asked as checks too.
        checks.push(
            FOLDERS
                .iter()
                .chain(DOCUMENTS.iter())
                .flat_map(|o| FOLDERS.iter().map(move |f| key(o, "parent", f)))
                .collect(),
        );
        checks.push(
            GROUPS
                .iter()
                .flat_map(|g| members.iter().map(move |m| key(g, "member", m)))
                .collect(),
        );
        Universe {
            tuples,
            checks,
            top: "document:",
            feeds: &["group:"],
        }
    }

    fn random_tuple(&self, rng: &mut Rng) -> String {
        let cat = rng.pick(&self.tuples);
        rng.pick(cat).clone()
    }

    fn random_check(&self, rng: &mut Rng) -> String {
        let cat = rng.pick(&self.checks);
        rng.pick(cat).clone()
    }

    /// A check on `object`, or, for one of a type that feeds the top
    /// type's checks (a group, whose members may reach documents), on the
    /// top type: the checks an op on `object` most likely changes.
    fn check_near(&self, object: &str, rng: &mut Rng) -> String {
        let feeds = self.feeds.iter().any(|f| object.starts_with(f));
        let near: Vec<&String> = self
            .all_checks()
            .filter(|q| {
                let (_, _, o) = parse(q);
                o == object || (feeds && o.starts_with(self.top))
            })
            .collect();
        (*rng.pick(&near)).clone()
    }

    fn all_checks(&self) -> impl Iterator<Item = &String> {
        self.checks.iter().flatten()
    }
}

/// Acknowledged ops not yet written to the oracle.
#[derive(Default)]
struct Deferred(Vec<(bool, String)>);

impl Deferred {
    /// Writes them to the oracle, in order, one request each (a grant and a
    /// revoke of one tuple cannot share a request).
    async fn apply(&mut self, oracle: &TestStore) {
        for (grant, t) in self.0.drain(..) {
            let w = if grant {
                WriteRequest::idempotent(vec![tuple(&t)], vec![])
            } else {
                WriteRequest::idempotent(vec![], vec![tuple(&t)])
            };
            oracle
                .client
                .write(&oracle.store_id, &w)
                .await
                .unwrap_or_else(|e| panic!("oracle write of {t} (grant: {grant}): {e}"));
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    grants: usize,
    revokes: usize,
    flushes: usize,
    checks: usize,
    /// Checks the oracle answered `true`.
    oracle_true: usize,
    agree: usize,
    /// Agreeing denies that came as a fail-closed error.
    agree_failed_closed: usize,
    stale_allow: usize,
    stale_deny: usize,
    /// Lists of objects and of users compared with the oracle's.
    lists: usize,
    /// Lists holding an object or user the oracle's does not.
    list_stale_allow: usize,
    /// Stale denies that came as a fail-closed error.
    stale_deny_failed_closed: usize,
}

impl Counts {
    /// No stale allow anywhere, no plain stale deny, and enough of every
    /// kind of op and check for that to mean something.
    fn assert_meaningful_and_never_stale(&self) {
        assert_eq!(self.stale_allow, 0);
        assert_eq!(self.list_stale_allow, 0);
        // Read your writes: a deny OpenFGA would not give comes only as a
        // fail-closed error (a revoke still being written), never as a
        // plain "no".
        assert_eq!(self.stale_deny, self.stale_deny_failed_closed, "{self:?}");
        assert!(self.lists > 100, "{self:?}");
        assert!(
            self.checks > 500 && self.grants > 500 && self.revokes > 300,
            "{self:?}"
        );
        assert!(
            self.oracle_true > self.checks / 10,
            "too few allowed checks to mean much: {self:?}"
        );
    }
}

struct Variant {
    name: &'static str,
    seed: u64,
    server: Server,
    configure: fn(&mut fga_wb::Config),
    /// The model and its universe.
    model: fn() -> serde_json::Value,
    universe: fn() -> Universe,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn run(v: Variant) -> Counts {
    let seed = env_or("FGA_WB_DIFF_SEED", v.seed);
    let ops = env_or("FGA_WB_DIFF_OPS", 3000usize);
    let model = (v.model)();
    let store = new_store_on(v.server, &format!("diff-{}", v.name), &model).await;
    let oracle = new_store_on(v.server, &format!("diff-{}-oracle", v.name), &model).await;
    let mut cfg = config_for(&store);
    (v.configure)(&mut cfg);
    let wb = WriteBehind::builder(cfg)
        .build()
        .await
        .expect("build handle");

    let universe = (v.universe)();
    let mut rng = Rng::new(seed);
    let mut acknowledged: BTreeSet<String> = BTreeSet::new();
    let mut log: Vec<String> = Vec::with_capacity(ops);
    let mut first_stale_allow: Option<usize> = None;
    // The oracle gets each acknowledged op before it is next asked, but
    // after the handle is: so the handle's check follows the op at once,
    // without an oracle round trip that would give its flusher time.
    let mut deferred = Deferred::default();
    let mut last_object: Option<String> = None;
    let mut c = Counts::default();
    let started = Instant::now();

    for i in 0..ops {
        let dice = rng.below(100);
        if dice < 2 {
            let r = wb.flush().await.expect("flush");
            assert_eq!(r.error, None, "{}: flush at op {i}: {r:?}", v.name);
            assert_eq!(r.dead_lettered, 0, "{}: flush at op {i}: {r:?}", v.name);
            c.flushes += 1;
            log.push(format!("{i}: flush ({} requests)", r.requests));
        } else if dice < 40 {
            let t = universe.random_tuple(&mut rng);
            let (user, relation, object) = parse(&t);
            wb.grant(user, relation, object)
                .await
                .unwrap_or_else(|e| panic!("{}: grant {t}: {e}", v.name));
            deferred.0.push((true, t.clone()));
            c.grants += 1;
            log.push(format!("{i}: grant {t}"));
            last_object = Some(parse(&t).2.to_owned());
            acknowledged.insert(t);
        } else if dice < 60 {
            // Mostly revoke something granted; sometimes something absent.
            let t = if !acknowledged.is_empty() && rng.below(4) != 0 {
                let n = rng.below(acknowledged.len());
                acknowledged.iter().nth(n).cloned().expect("in range")
            } else {
                universe.random_tuple(&mut rng)
            };
            let (user, relation, object) = parse(&t);
            wb.revoke(user, relation, object)
                .await
                .unwrap_or_else(|e| panic!("{}: revoke {t}: {e}", v.name));
            deferred.0.push((false, t.clone()));
            c.revokes += 1;
            log.push(format!("{i}: revoke {t}"));
            last_object = Some(parse(&t).2.to_owned());
            acknowledged.remove(&t);
        } else if dice >= 95 {
            // A list of objects and a list of users, each compared whole
            // with the oracle's.
            let q = universe.random_check(&mut rng);
            let (user, relation, object) = parse(&q);
            let ty = object.split_once(':').map_or(object, |(t, _)| t);
            let lo = ListObjectsRequest::new(user, relation, ty);
            let lu = ListUsersRequest::new(object, relation, "user");
            let got_objects = wb.list_objects(&lo).await;
            let got_users = wb.list_users(&lu).await;
            deferred.apply(&oracle).await;
            let fresh = |mut r: ListObjectsRequest| {
                r.consistency = Consistency::HigherConsistency;
                r.authorization_model_id = Some(oracle.model_id.clone());
                r
            };
            let want_objects = oracle
                .client
                .list_objects(&oracle.store_id, &fresh(lo))
                .await
                .expect("oracle list objects");
            let mut lu = lu;
            lu.consistency = Consistency::HigherConsistency;
            lu.authorization_model_id = Some(oracle.model_id.clone());
            let want_users = oracle
                .client
                .list_users(&oracle.store_id, &lu)
                .await
                .expect("oracle list users");
            c.lists += 2;
            for (what, got, want) in [
                ("objects", got_objects, want_objects),
                ("users", got_users, want_users),
            ] {
                let verdict = match &got {
                    Ok(g) if g.iter().any(|x| !want.contains(x)) => {
                        c.list_stale_allow += 1;
                        first_stale_allow.get_or_insert(i);
                        "STALE ALLOW"
                    }
                    Ok(g) if g.len() < want.len() => "stale deny",
                    Ok(_) => "agree",
                    Err(e) if e.is_stale_check() => "failed closed",
                    Err(e) => panic!("{}: list {what} for {q} at op {i}: {e}", v.name),
                };
                log.push(format!(
                    "{i}: list {what} for {q}: handle {got:?}, oracle {want:?}: {verdict}"
                ));
            }
        } else {
            // Half the checks are near the last op, where it most likely
            // changed something.
            let q = match &last_object {
                Some(o) if rng.below(2) == 0 => universe.check_near(o, &mut rng),
                _ => universe.random_check(&mut rng),
            };
            let (user, relation, object) = parse(&q);
            // A quarter of the checks go through batch_check, next to
            // another check.
            let got = if rng.below(4) == 0 {
                let other = universe.random_check(&mut rng);
                let (ou, or, oo) = parse(&other);
                let mut answers = wb
                    .batch_check(&[
                        CheckRequest::new(user, relation, object),
                        CheckRequest::new(ou, or, oo),
                    ])
                    .await
                    .unwrap_or_else(|e| panic!("{}: batch check at op {i}: {e}", v.name));
                answers.swap_remove(0)
            } else {
                wb.check(user, relation, object).await
            };
            deferred.apply(&oracle).await;
            let truth = ground_truth(&oracle, &q).await;
            c.checks += 1;
            c.oracle_true += usize::from(truth);
            let verdict = match (&got, truth) {
                (Ok(a), t) if *a == t => {
                    c.agree += 1;
                    "agree"
                }
                (Ok(true), false) => {
                    c.stale_allow += 1;
                    first_stale_allow.get_or_insert(i);
                    "STALE ALLOW"
                }
                (Ok(false), true) => {
                    c.stale_deny += 1;
                    "stale deny"
                }
                (Err(e), t) if e.is_stale_check() => {
                    if t {
                        c.stale_deny += 1;
                        c.stale_deny_failed_closed += 1;
                        "stale deny (failed closed)"
                    } else {
                        c.agree += 1;
                        c.agree_failed_closed += 1;
                        "agree (failed closed)"
                    }
                }
                (Err(e), _) => panic!("{}: check {q} at op {i}: {e}", v.name),
                (Ok(_), _) => unreachable!("covered above"),
            };
            log.push(format!(
                "{i}: check {q}: handle {got:?}, oracle {truth}: {verdict}"
            ));
        }
    }
    let elapsed = started.elapsed();

    deferred.apply(&oracle).await;
    // Everything acknowledged reaches OpenFGA, and nothing else.
    let r = wb.flush().await.expect("final flush");
    assert_eq!(r.error, None, "{}: final flush: {r:?}", v.name);
    assert_eq!(wb.pending().await.unwrap().total, 0);
    let ours = stored(&store).await;
    let theirs = stored(&oracle).await;
    let want: Vec<String> = acknowledged.iter().cloned().collect();
    assert_eq!(
        theirs, want,
        "{}: the oracle holds the acknowledged set",
        v.name
    );
    assert_eq!(ours, theirs, "{}: handle's store vs oracle", v.name);

    // With nothing pending, every check in the universe agrees exactly.
    let mut sweep_mismatches = Vec::new();
    for q in universe.all_checks() {
        let (user, relation, object) = parse(q);
        let got = wb.check(user, relation, object).await;
        let truth = ground_truth(&oracle, q).await;
        if !matches!(got, Ok(a) if a == truth) {
            sweep_mismatches.push(format!("{q}: handle {got:?}, oracle {truth}"));
        }
    }
    let _ = wb.shutdown().await;

    println!(
        "differential {}: seed {seed}, {ops} ops in {elapsed:.1?} ({} grants, {} revokes, {} flushes, \
         {} checks, {} true in OpenFGA): agree {} (of which failed closed {}), stale-allow {}, \
         stale-deny {} (of which failed closed {}); {} lists, {} with a stale allow; final tuples {}",
        v.name,
        c.grants,
        c.revokes,
        c.flushes,
        c.checks,
        c.oracle_true,
        c.agree,
        c.agree_failed_closed,
        c.stale_allow,
        c.stale_deny,
        c.stale_deny_failed_closed,
        c.lists,
        c.list_stale_allow,
        ours.len()
    );
    if let Some(at) = first_stale_allow {
        let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("differential-{}-{seed}.log", v.name));
        let mut text = String::new();
        for line in &log {
            let _ = writeln!(text, "{line}");
        }
        let _ = std::fs::write(&path, text);
        let from = at.saturating_sub(40);
        panic!(
            "{}: {} stale allows in checks, {} in lists (first at op {at}); full log in {}; ops {from}..={at}:\n{}",
            v.name,
            c.stale_allow,
            c.list_stale_allow,
            path.display(),
            log[from..=at].join("\n")
        );
    }
    assert!(
        sweep_mismatches.is_empty(),
        "{}: with nothing pending, the handle disagrees with OpenFGA on:\n{}",
        v.name,
        sweep_mismatches.join("\n")
    );
    c
}

/// Nothing flushes by itself but revokes (eagerly): checks are answered from
/// pending grants sent as contextual tuples, past 100 of them by flushing
/// first; ~2% of ops are an explicit `flush()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn differential_manual_flushes() {
    let c = run(Variant {
        name: "manual",
        seed: 0x5EED_0001,
        server: Server::Plain,
        model: documents_model,
        universe: Universe::documents,
        configure: |cfg| {
            cfg.flush.interval = Duration::from_secs(3600);
            cfg.flush.batch_size = 100_000;
            cfg.cache.ttl = Duration::from_secs(3600);
            // Revokes are flushed eagerly (milliseconds against a local
            // OpenFGA); a check waiting longer fails closed and is counted.
            cfg.check.revoke_wait_timeout = Duration::from_millis(500);
        },
    })
    .await;
    c.assert_meaningful_and_never_stale();
}

/// Background flushes every 50 ms and a 50 ms cache TTL: the flusher, the
/// in-flight set and cache expiry interleave with grants, revokes and checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn differential_background_flushes() {
    let c = run(Variant {
        name: "background",
        seed: 0x5EED_0002,
        server: Server::Plain,
        model: documents_model,
        universe: Universe::documents,
        configure: |cfg| {
            cfg.flush.interval = Duration::from_millis(50);
            cfg.cache.ttl = Duration::from_millis(50);
        },
    })
    .await;
    c.assert_meaningful_and_never_stale();
}

/// Background flushes against OpenFGA as production runs it: on PostgreSQL
/// with the check query cache, both iterator caches and the cache controller
/// on (TTL 60 s). The handle's own cache is off, so every check that cannot
/// be answered from pending ops reaches the server: those that could depend
/// on a recent write must bypass its caches.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn differential_on_a_caching_server() {
    let c = run(Variant {
        name: "caching",
        seed: 0x5EED_0003,
        server: Server::Caching,
        model: documents_model,
        universe: Universe::documents,
        configure: |cfg| {
            cfg.flush.interval = Duration::from_millis(50);
            cfg.cache.capacity = 0;
        },
    })
    .await;
    c.assert_meaningful_and_never_stale();
}

/// Shapes the documents model lacks (`models/shapes.fga`), with background
/// flushes: a tupleset of two types, `but not` under `from` and under a
/// userset, `and` over `from`, a wildcard under `but not`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn differential_other_shapes() {
    let c = run(Variant {
        name: "shapes",
        seed: 0x5EED_0004,
        server: Server::Plain,
        model: || support::model("shapes.json"),
        universe: Universe::shapes,
        configure: |cfg| {
            cfg.flush.interval = Duration::from_millis(50);
            cfg.cache.ttl = Duration::from_millis(50);
        },
    })
    .await;
    c.assert_meaningful_and_never_stale();
}
