//! The tour of fga-wb: run `scripts/demo`.
//!
//! `scripts/demo` starts a throw-away OpenFGA (the same way the tests do) and
//! runs this example against it. To point it at a server of your own instead:
//!
//! ```text
//! FGA_API_URL=http://127.0.0.1:8080 FGA_API_TOKEN=... scripts/demo
//! ```
//!
//! It creates a new store with the model in `models/documents.json` (folders
//! and documents; `owner` implies `editor` implies `viewer`; access flows down
//! from a `parent` folder; `group#member` usersets) and walks through what
//! fga-wb promises, printing a short report:
//!
//! 1. `grant` is acknowledged in microseconds; a direct OpenFGA Write takes
//!    milliseconds;
//! 2. `check` sees a grant at once, derived relations included, while OpenFGA
//!    itself does not have the tuple yet;
//! 3. what is pending, then one flush that writes it in batches;
//! 4. the tuples, read back from OpenFGA;
//! 5. a revoke is denied at once;
//! 6. a tuple the model does not allow is refused at the call, and a tuple
//!    OpenFGA rejects at flush time is isolated into the dead letters while
//!    the rest of its batch is applied;
//! 7. the status totals, and a shutdown that writes what is still pending.
//!
//! Set `RUST_LOG=fga_wb=debug` to see the library's spans and events on stderr.

use std::collections::HashSet;
use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use fga_wb::openfga::{CheckRequest, Client, Consistency, ReadFilter, Secret, WriteRequest};
use fga_wb::{Config, FlushReport, Pending, TupleKey, WriteBehind};

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// Grants timed in step 1.
const BULK_GRANTS: usize = 10_000;
/// Direct OpenFGA Writes timed in step 1, one tuple each.
const DIRECT_WRITES: usize = 50;
/// Good grants sent along with the poison tuples in step 6.
const POISON_BATCH: usize = 200;
/// Grants left pending for shutdown to write, in step 7.
const SHUTDOWN_GRANTS: usize = 25;

/// The relationships of step 2: (user, relation, object).
const STORY: &[(&str, &str, &str)] = &[
    ("user:anne", "editor", "folder:engineering"),
    ("folder:engineering", "parent", "document:roadmap"),
    ("user:bob", "member", "group:platform"),
    ("group:platform#member", "viewer", "folder:engineering"),
];

/// One check of the walkthrough and the answer the model gives for it.
struct Probe {
    user: &'static str,
    relation: &'static str,
    object: &'static str,
    /// Why the answer is what it is.
    why: &'static str,
}

const fn probe(
    user: &'static str,
    relation: &'static str,
    object: &'static str,
    why: &'static str,
) -> Probe {
    Probe {
        user,
        relation,
        object,
        why,
    }
}

/// Step 2's checks; each is true once STORY and the bulk grants count.
const STORY_CHECKS: &[Probe] = &[
    probe(
        "user:anne",
        "viewer",
        "folder:engineering",
        "editor implies viewer",
    ),
    probe(
        "user:anne",
        "editor",
        "document:roadmap",
        "editor of its parent folder",
    ),
    probe(
        "user:bob",
        "viewer",
        "folder:engineering",
        "member of group:platform",
    ),
    probe(
        "user:reader-42",
        "viewer",
        "document:report-42",
        "one of the 10,000 grants",
    ),
];

#[tokio::main]
async fn main() -> ExitCode {
    init_logging();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Display, not Debug: the library's messages say what to fix.
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    let started = Instant::now();
    let server = Server::from_env()?;
    let client = Client::builder(&server.url)
        .api_token(Secret::new(server.token.clone()))
        .build()?;
    let mut demo = Demo::setup(client, &server).await?;

    let wb = WriteBehind::builder(demo.config(&server)).build().await?;
    demo.acknowledgement(&wb).await?;
    demo.read_your_writes(&wb).await?;
    demo.pending_and_flush(&wb).await?;
    demo.verify().await?;
    demo.revoke(&wb).await?;
    demo.refused_at_the_call(&wb).await?;
    let poison = demo.poison(&server).await?;
    demo.shutdown(&wb, &poison).await?;

    println!();
    if demo.surprises.is_empty() {
        println!(
            "Every answer was as the model says. Demo took {}.",
            fmt_duration(started.elapsed())
        );
        Ok(())
    } else {
        for s in &demo.surprises {
            println!("UNEXPECTED: {s}");
        }
        Err(format!("{} unexpected results (listed above)", demo.surprises.len()).into())
    }
}

/// `url` with any user and password in it shown as `***` (a demo's output
/// ends up in terminals and CI logs): everything between `://` and the
/// last `@`.
fn shown_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), url),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Where OpenFGA is: a server of the user's (`FGA_API_URL`) or the one
/// `scripts/demo` started (`FGA_WB_TEST_OPENFGA_URL`).
struct Server {
    url: String,
    token: String,
    /// Where the URL came from, for the report.
    origin: &'static str,
    /// Whether it is the in-memory server scripts/demo started.
    throwaway: bool,
}

impl Server {
    fn from_env() -> Result<Server> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        if let Some(url) = var("FGA_API_URL") {
            return Ok(Server {
                url,
                token: var("FGA_API_TOKEN").unwrap_or_default(),
                origin: "FGA_API_URL",
                throwaway: false,
            });
        }
        if let Some(url) = var("FGA_WB_TEST_OPENFGA_URL") {
            return Ok(Server {
                url,
                token: var("FGA_WB_TEST_OPENFGA_TOKEN").unwrap_or_default(),
                origin: "in-memory, started by scripts/demo",
                throwaway: true,
            });
        }
        Err(
            "no OpenFGA to talk to: run scripts/demo, which starts one, \
             or set FGA_API_URL (and FGA_API_TOKEN) to use a server of yours"
                .into(),
        )
    }
}

/// The store the demo works in, and what it has seen so far.
struct Demo {
    /// A plain OpenFGA client: the demo's independent view of the server.
    client: Client,
    store_id: String,
    model_id: String,
    /// Every tuple granted through fga-wb and not revoked, to verify later.
    granted: Vec<TupleKey>,
    /// Answers that contradict the model; the demo exits non-zero if any.
    surprises: Vec<String>,
    /// Whether OpenFGA is the in-memory server scripts/demo started.
    throwaway_server: bool,
}

impl Demo {
    /// Creates a fresh store with the documents model, so that runs never see
    /// each other's tuples.
    async fn setup(client: Client, server: &Server) -> Result<Demo> {
        let model: serde_json::Value =
            serde_json::from_str(include_str!("../models/documents.json"))?;
        let store_id = client.create_store("fga-wb-demo").await?;
        let model_id = client.write_authorization_model(&store_id, &model).await?;
        println!("fga-wb demo");
        println!("  OpenFGA   {} ({})", shown_url(&server.url), server.origin);
        println!("  store     {store_id} (new)");
        println!("  model     {model_id} (models/documents.json)");
        Ok(Demo {
            client,
            store_id,
            model_id,
            granted: Vec::new(),
            surprises: Vec::new(),
            throwaway_server: server.throwaway,
        })
    }

    /// The handle's settings. The demo flushes by hand so that it can show
    /// what is pending; left to itself, fga-wb flushes when `batch_size` ops
    /// are pending or the oldest is `interval` old (1,000 ops / 1 s by
    /// default), and revokes at once.
    fn config(&self, server: &Server) -> Config {
        let mut config = Config::default();
        config.openfga.api_url.clone_from(&server.url);
        config.openfga.api_token = Secret::new(server.token.clone());
        config.openfga.store_id.clone_from(&self.store_id);
        config.openfga.model_id.clone_from(&self.model_id);
        config.flush.batch_size = 1_000_000;
        config.flush.interval = Duration::from_secs(3600);
        config
    }

    /// Step 1: the time `grant` takes, next to a direct Write of one tuple.
    async fn acknowledgement(&mut self, wb: &WriteBehind) -> Result<()> {
        heading(1, "grant is acknowledged once buffered");
        let mut grant_times = Vec::with_capacity(BULK_GRANTS);
        let all = Instant::now();
        for i in 0..BULK_GRANTS {
            let (user, object) = (format!("user:reader-{i}"), format!("document:report-{i}"));
            let t = Instant::now();
            wb.grant(&user, "viewer", &object).await?;
            grant_times.push(t.elapsed());
            self.granted.push(TupleKey::new(user, "viewer", object)?);
        }
        let all = all.elapsed();

        // The alternative: one Write per tuple, each a round trip to OpenFGA
        // and a database transaction.
        let mut write_times = Vec::with_capacity(DIRECT_WRITES);
        for i in 0..DIRECT_WRITES {
            let tuple = TupleKey::new(
                format!("user:direct-{i}"),
                "viewer",
                format!("document:direct-{i}"),
            )?;
            let req = WriteRequest::idempotent(vec![tuple], vec![]);
            let t = Instant::now();
            self.client.write(&self.store_id, &req).await?;
            write_times.push(t.elapsed());
        }

        let grants = Percentiles::of(grant_times);
        let writes = Percentiles::of(write_times);
        println!("  {:<36}{:>8} {:>11} {:>11}", "", "calls", "median", "p99");
        println!(
            "  {:<36}{:>8} {:>11} {:>11}   (all {} in {})",
            "wb.grant(reader-N viewer report-N)",
            thousands(BULK_GRANTS as u64),
            fmt_duration(grants.median),
            fmt_duration(grants.p99),
            thousands(BULK_GRANTS as u64),
            fmt_duration(all),
        );
        println!(
            "  {:<36}{:>8} {:>11} {:>11}",
            "direct OpenFGA Write, 1 tuple",
            DIRECT_WRITES,
            fmt_duration(writes.median),
            fmt_duration(writes.p99),
        );
        let ratio = writes.median.as_secs_f64() / grants.median.as_secs_f64().max(1e-9);
        println!(
            "  A grant is acknowledged ~{}x faster than a direct Write (medians);",
            thousands(ratio.round() as u64)
        );
        println!(
            "  writing the {} tuples one at a time would keep the caller waiting {} or more.",
            thousands(BULK_GRANTS as u64),
            fmt_duration(writes.median * BULK_GRANTS as u32)
        );
        Ok(())
    }

    /// Step 2: checks see pending grants, derived relations included, while
    /// OpenFGA alone does not know them yet.
    async fn read_your_writes(&mut self, wb: &WriteBehind) -> Result<()> {
        heading(2, "check sees grants at once, before any flush");
        for &(user, relation, object) in STORY {
            wb.grant(user, relation, object).await?;
            self.granted.push(TupleKey::new(user, relation, object)?);
            println!("  granted  {}", TupleKey::new(user, relation, object)?);
        }
        println!();
        print_check_header();
        for p in STORY_CHECKS {
            self.compare(wb, p, true, false).await?;
        }
        let control = probe("user:carl", "viewer", "folder:engineering", "no grant");
        self.compare(wb, &control, false, false).await?;
        println!();
        println!("  \"OpenFGA\" is a plain Check against the server: it does not have the");
        println!("  tuples yet. fga-wb answers from the pending grant itself where it can,");
        println!("  and otherwise sends the pending grants a check could depend on (at");
        println!("  most 100) as contextual tuples. Only grants that can reach the checked");
        println!("  object count: the 10,000 viewer grants on other documents do not.");
        Ok(())
    }

    /// Runs one check through fga-wb and one straight against OpenFGA, prints
    /// both, and records answers that differ from the expected ones.
    async fn compare(
        &mut self,
        wb: &WriteBehind,
        p: &Probe,
        want_wb: bool,
        want_openfga: bool,
    ) -> Result<()> {
        let t = Instant::now();
        let via_wb = wb.check(p.user, p.relation, p.object).await?;
        let took = t.elapsed();
        let direct = self.raw_check(p).await?;
        println!(
            "  {:<44} {:>6} {:>9}  {:<8} {}",
            format!("{} {} {}", p.user, p.relation, p.object),
            via_wb,
            fmt_duration(took),
            direct,
            p.why
        );
        self.expect(via_wb == want_wb, || {
            format!("fga-wb answered {via_wb} for {}", describe(p))
        });
        self.expect(direct == want_openfga, || {
            format!("OpenFGA answered {direct} for {}", describe(p))
        });
        Ok(())
    }

    /// A Check straight against OpenFGA, bypassing fga-wb.
    async fn raw_check(&self, p: &Probe) -> Result<bool> {
        let req = CheckRequest::new(p.user, p.relation, p.object);
        Ok(self.client.check(&self.store_id, &req).await?)
    }

    /// Step 3: what is pending, then one flush.
    async fn pending_and_flush(&mut self, wb: &WriteBehind) -> Result<()> {
        heading(3, "pending ops, then the flush");
        let before = wb.pending().await?;
        print_pending("pending", &before);
        let report = wb.flush().await?;
        print_flush(&report);
        let after = wb.pending().await?;
        print_pending("pending", &after);
        let flush = &Config::default().flush;
        println!(
            "  Up to {} tuples per Write request, {} requests in parallel.",
            flush.max_tuples_per_write, flush.max_parallel_requests
        );
        if self.throwaway_server {
            println!("  Most of the time is OpenFGA's: the in-memory datastore of the throw-away");
            println!("  server gets slower per Write as the store grows.");
        }
        let want = self.granted.len() as u64;
        self.expect(before.writes as u64 == want, || {
            format!("{} writes pending, expected {want}", before.writes)
        });
        self.expect(report.applied == want && report.error.is_none(), || {
            format!("flush applied {} of {want}: {report:?}", report.applied)
        });
        self.expect(after.total + after.in_flight == 0, || {
            format!("still pending after the flush: {after:?}")
        });
        Ok(())
    }

    /// Step 4: read every tuple back from OpenFGA and compare.
    async fn verify(&mut self) -> Result<()> {
        heading(4, "read the tuples back from OpenFGA");
        let t = Instant::now();
        // An empty filter reads the whole store, 100 tuples a page.
        let stored: HashSet<String> = self
            .client
            .read_all(&self.store_id, &ReadFilter::default())
            .await?
            .iter()
            .map(TupleKey::to_string)
            .collect();
        let took = t.elapsed();
        let missing: Vec<String> = self
            .granted
            .iter()
            .map(TupleKey::to_string)
            .filter(|t| !stored.contains(t))
            .collect();
        let found = self.granted.len() - missing.len();
        println!(
            "  granted through fga-wb   {:>7}",
            thousands(self.granted.len() as u64)
        );
        println!(
            "  found in OpenFGA         {:>7}   (read in {}; the store also holds the {} direct writes)",
            thousands(found as u64),
            fmt_duration(took),
            DIRECT_WRITES
        );
        self.expect(missing.is_empty(), || {
            format!(
                "{} granted tuples are not in OpenFGA, e.g. {}",
                missing.len(),
                missing.first().map_or("", String::as_str)
            )
        });
        let mut now_true = 0;
        for p in STORY_CHECKS {
            let direct = self.raw_check(p).await?;
            now_true += usize::from(direct);
            self.expect(direct, || {
                format!("OpenFGA still answers false for {}", describe(p))
            });
        }
        println!(
            "  OpenFGA alone now answers true to {} of the {} checks of step 2.",
            now_true,
            STORY_CHECKS.len()
        );
        Ok(())
    }

    /// Step 5: after `revoke` returns, no check answers true from the old
    /// grant, even though the tuple is still in OpenFGA at that moment.
    async fn revoke(&mut self, wb: &WriteBehind) -> Result<()> {
        heading(5, "a revoke is denied at once");
        let (user, relation, object) = STORY[0];
        let t = Instant::now();
        wb.revoke(user, relation, object).await?;
        let took = t.elapsed();
        let revoked = TupleKey::new(user, relation, object)?.to_string();
        self.granted.retain(|g| g.to_string() != revoked);
        println!(
            "  revoked  {revoked}   (returned in {})",
            fmt_duration(took)
        );
        println!();
        print_check_header();
        // The first check waits for the revoke to reach OpenFGA: revokes are
        // flushed at once, and contextual tuples cannot express a delete.
        let anne = [
            probe(
                "user:anne",
                "viewer",
                "folder:engineering",
                "editor was revoked",
            ),
            probe(
                "user:anne",
                "editor",
                "document:roadmap",
                "not editor of the parent",
            ),
        ];
        for p in &anne {
            self.compare(wb, p, false, false).await?;
        }
        let bob = probe(
            "user:bob",
            "viewer",
            "folder:engineering",
            "still a member of group:platform",
        );
        self.compare(wb, &bob, true, true).await?;
        println!();
        println!("  Until the revoke is in OpenFGA, checks it could change wait for it");
        println!("  (or fail closed after check.revoke_wait_timeout); they never answer");
        println!("  true from the old grant.");
        Ok(())
    }

    /// Step 6a: a tuple the model cannot hold is refused at the call, and
    /// nothing is buffered.
    async fn refused_at_the_call(&mut self, wb: &WriteBehind) -> Result<()> {
        heading(
            6,
            "bad tuples: refused at the call, or dead-lettered at flush",
        );
        println!("  The handle knows the model, so a tuple it cannot hold is refused:");
        println!("  wb.grant(\"user:anne\", \"viewer\", \"planet:mars\")");
        match wb.grant("user:anne", "viewer", "planet:mars").await {
            Ok(()) => self.expect(false, || "grant on planet:mars was accepted".into()),
            Err(e) => println!("    error: {e}"),
        }
        let pending = wb.pending().await?;
        println!("  pending   total {} (nothing was buffered)", pending.total);
        self.expect(pending.total == 0, || {
            format!("{} ops pending after a refused grant", pending.total)
        });
        Ok(())
    }

    /// Step 6b: a handle that does not validate against the model lets bad
    /// tuples through to OpenFGA, which refuses the whole Write they are in.
    /// fga-wb splits such a Write in halves until the bad tuples stand alone,
    /// applies the rest, and dead-letters the bad ones with OpenFGA's reason.
    async fn poison(&mut self, server: &Server) -> Result<WriteBehind> {
        println!();
        println!(
            "  A second handle, built with .validate_against_model(false), grants {POISON_BATCH}"
        );
        println!("  good tuples and 2 that OpenFGA rejects, then flushes:");
        let wb = WriteBehind::builder(self.config(server))
            .validate_against_model(false)
            .build()
            .await?;
        // Both bad tuples are on folder#viewer like the good ones, so they
        // travel in the same Write requests: one among the first 100 tuples,
        // the other among the next 100.
        let bad = [
            ("planet:mars", "viewer", "folder:lobby"), // no type `planet`
            ("group:platform#admirer", "viewer", "folder:lobby"), // no group#admirer
        ];
        let bad_at = [POISON_BATCH / 3, 2 * POISON_BATCH / 3];
        for i in 0..POISON_BATCH {
            if let Some(k) = bad_at.iter().position(|&at| at == i) {
                let (user, relation, object) = bad[k];
                wb.grant(user, relation, object).await?;
            }
            let (user, object) = (format!("user:guest-{i}"), format!("folder:shared-{i}"));
            wb.grant(&user, "viewer", &object).await?;
        }
        let report = wb.flush().await?;
        print_flush(&report);
        let letters = wb.dead_letters().await?;
        for d in &letters {
            println!("  dead      #{} {}", d.id, d.tuple);
            println!(
                "            {}: {}",
                d.code.as_deref().unwrap_or("no code"),
                d.reason
            );
        }
        // The good tuples are really there: ask OpenFGA itself, 50 a request.
        let asks: Vec<CheckRequest> = (0..POISON_BATCH)
            .map(|i| {
                CheckRequest::new(
                    format!("user:guest-{i}"),
                    "viewer",
                    format!("folder:shared-{i}"),
                )
            })
            .collect();
        let mut guests = 0;
        for answer in self
            .client
            .batch_check(&self.store_id, &asks, None, Consistency::Unspecified)
            .await?
        {
            guests += usize::from(answer?);
        }
        println!();
        println!("  OpenFGA refuses a whole Write for one bad tuple. fga-wb split the two");
        let unsplit =
            (POISON_BATCH + bad.len()).div_ceil(Config::default().flush.max_tuples_per_write);
        println!(
            "  refused requests in halves until each bad tuple stood alone: {} Write",
            report.requests
        );
        println!(
            "  requests instead of {unsplit}. OpenFGA now allows {guests} of the {POISON_BATCH} good tuples."
        );
        self.expect(
            report.applied == POISON_BATCH as u64 && report.dead_lettered == 2,
            || format!("poison flush: {report:?}"),
        );
        self.expect(letters.len() == 2, || {
            format!("{} dead letters, expected 2", letters.len())
        });
        self.expect(guests == POISON_BATCH, || {
            format!("{guests} good tuples in OpenFGA, expected {POISON_BATCH}")
        });
        Ok(wb)
    }

    /// Step 7: `status` has the totals; `shutdown` drains what is still
    /// pending before the process exits, and says what it could not.
    async fn shutdown(&mut self, wb: &WriteBehind, poison: &WriteBehind) -> Result<()> {
        heading(7, "status and shutdown");
        for (name, handle) in [("main handle", wb), ("poison handle", poison)] {
            let t = handle.status().await?.totals;
            println!(
                "  {name:<14} acknowledged {:>6}   applied {:>6}   dead-lettered {}   Write requests {}",
                thousands(t.acknowledged),
                thousands(t.applied),
                t.dead_lettered,
                t.requests
            );
        }
        // Leave some grants pending: shutdown, not a timer, writes them.
        for i in 0..SHUTDOWN_GRANTS {
            let (user, object) = (format!("user:late-{i}"), format!("folder:late-{i}"));
            wb.grant(&user, "viewer", &object).await?;
        }
        println!();
        println!("  {SHUTDOWN_GRANTS} more grants on the main handle, then shutdown() on both:");
        for (name, handle) in [("main handle", wb), ("poison handle", poison)] {
            let r = handle.shutdown().await?;
            println!(
                "  {name:<14} flushed {:>2} ops in {}; left {} pending, {} in flight",
                r.flushed.applied,
                write_requests(r.flushed.requests),
                r.left.total,
                r.left.in_flight
            );
            self.expect(r.left.total + r.left.in_flight == 0, || {
                format!("{name}: shutdown left {:?}", r.left)
            });
        }
        let last = probe("user:late-0", "viewer", "folder:late-0", "");
        let applied = self.raw_check(&last).await?;
        println!("  OpenFGA alone: {} -> {applied}", describe(&last));
        self.expect(applied, || {
            format!("{} is not in OpenFGA after shutdown", describe(&last))
        });
        Ok(())
    }

    /// Records a surprise when `ok` is false; the report goes on regardless.
    fn expect(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.surprises.push(what());
        }
    }
}

fn describe(p: &Probe) -> String {
    format!("{} {} {}", p.user, p.relation, p.object)
}

fn heading(n: u32, title: &str) {
    println!();
    println!("{n}. {title}");
}

/// The columns `Demo::compare` prints.
fn print_check_header() {
    println!(
        "  {:<44} {:>6} {:>9}  {:<8} because",
        "check", "fga-wb", "took", "OpenFGA"
    );
}

fn print_pending(label: &str, p: &Pending) {
    let oldest = p.oldest_age.map_or_else(|| "-".to_owned(), fmt_duration);
    println!(
        "  {label:<9} writes {:>6}   deletes {}   total {:>6}   in flight {}   oldest {}",
        thousands(p.writes as u64),
        p.deletes,
        thousands(p.total as u64),
        p.in_flight,
        oldest
    );
}

fn print_flush(r: &FlushReport) {
    println!(
        "  flush     applied {:>6}   in {}   took {}   (coalesced {}, dead-lettered {}, retried {})",
        thousands(r.applied),
        write_requests(r.requests),
        fmt_duration(r.duration),
        r.coalesced,
        r.dead_lettered,
        r.retried
    );
    if let Some(e) = &r.error {
        println!("            stopped early: {e}");
    }
}

/// `1 Write request`, `29 Write requests`.
fn write_requests(n: u64) -> String {
    format!("{n} Write request{}", if n == 1 { "" } else { "s" })
}

/// Median and 99th percentile of a set of timings.
struct Percentiles {
    median: Duration,
    p99: Duration,
}

impl Percentiles {
    fn of(mut samples: Vec<Duration>) -> Percentiles {
        samples.sort_unstable();
        let at = |q: f64| {
            let last = samples.len().saturating_sub(1);
            samples
                .get((last as f64 * q).round() as usize)
                .copied()
                .unwrap_or_default()
        };
        Percentiles {
            median: at(0.5),
            p99: at(0.99),
        }
    }
}

/// `850 ns`, `3.2 µs`, `2.41 ms`, `1.30 s`.
fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} µs", ns as f64 / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.2} ms", ns as f64 / 1e6)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

/// `10000` -> `10,000`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The library's tracing output on stderr, only when `RUST_LOG` asks for it:
/// the report itself is the demo's output.
fn init_logging() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
}
