//! `fga-wb`: look at and operate a shared (Redis) write-behind buffer.
//!
//! Thin by design: parse arguments, load the configuration, set up logging,
//! call the library, print. Exit codes: 0 success, 1 the operation failed,
//! 2 usage or configuration error.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use fga_wb::config::StoreKind;
use fga_wb::{Config, Op, WriteBehind};

/// Prints a line to stdout; a closed pipe (`fga-wb status | head`) is not
/// an error worth a panic.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// The same on stderr (`fga-wb flush --wait 2>&1 | head -1`).
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// Shown under every `--help`: scripts and Kubernetes Jobs branch on them.
const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the operation failed or did not finish: ops left unwritten or
     dead-lettered (flush --wait), a problem found (status --check), a
     loss open (loss), an unknown dead-letter id, Redis or OpenFGA failing,
     SIGINT/SIGTERM (worker stops gracefully and exits 0; a clear begun
     runs to its end and exits 0)
  2  usage or configuration error, including a flush of the command's own
     that OpenFGA refuses for the credentials, or for not knowing the
     store or the model, or that something other than OpenFGA answers
     (status --check reports those as problems, exit 1, and dlq replay,
     whose letters were replayed, exits 1)
Configuration: --config FILE (or config/fga-wb.toml, FGA_WB_CONFIG), then
FGA_WB_* variables (FGA_WB_REDIS__URL, ...) and FGA_API_URL, FGA_STORE_ID,
FGA_MODEL_ID, FGA_API_TOKEN.";

#[derive(Parser)]
#[command(
    name = "fga-wb",
    version,
    about = "Operate fga-wb, the write-behind buffer for OpenFGA",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Configuration file (default: config/fga-wb.toml, or FGA_WB_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// OpenFGA's URL, as the `fga` CLI takes it (beats FGA_API_URL).
    #[arg(long, global = true, value_name = "URL")]
    api_url: Option<String>,
    /// The OpenFGA store (beats FGA_STORE_ID).
    #[arg(long, global = true, value_name = "ID")]
    store_id: Option<String>,
    /// The authorization model (beats FGA_MODEL_ID).
    #[arg(long, global = true, value_name = "ID")]
    model_id: Option<String>,
    /// A preshared API token (beats FGA_API_TOKEN; prefer the variable:
    /// command lines are visible to other users).
    #[arg(long, global = true, value_name = "TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Pending ops, queue, dead letters, workers, Redis keys, the last flush.
    #[command(after_help = EXIT_CODES)]
    Status {
        /// Also ask OpenFGA and Redis whether all is well (credentials,
        /// flushing, workers, Redis persistence), and exit 1 on a problem:
        /// for monitoring.
        #[arg(long)]
        check: bool,
    },
    /// Write (inline mode) or enqueue (queue mode) everything pending.
    #[command(after_help = EXIT_CODES)]
    Flush {
        /// Keep flushing until every op acknowledged before the command
        /// began is written: none pending, in flight or queued (ops a dead
        /// process held come back and are flushed again; in queue mode,
        /// until workers applied their jobs and replayed those that died of
        /// transient failures). Ops acknowledged later are left to their
        /// writers' own flushes and not waited for, so it ends under
        /// steady traffic; an op
        /// a newer one on its tuple superseded is done. Exits 0 only then:
        /// exits 1 when some of those ops were dead-lettered while it ran,
        /// and when Redis lost acknowledged ops (a loss record is open:
        /// `fga-wb loss`), before it began or while it waited.
        /// Exits 1 at once when ops acknowledged before it began died of
        /// transient failures and nothing replays them: inline, only `fga-wb
        /// dlq replay` does; in queue mode, workers with
        /// queue.replay_transient = "0s" do not. In queue mode also when a
        /// worker reports flushing stopped, and, without --timeout, once
        /// no worker has run for 6 worker leases (30 s by default).
        /// Without --timeout it also exits 1 when those ops keep failing
        /// while OpenFGA answers a read of the store: one died again after
        /// the workers replayed it, or none of them (nor anything else) was
        /// written for twice what a healthy store makes an op wait (a
        /// request and its retries, queue.retry_schedule, the replay wait,
        /// a writer's lease and hold: about 7 minutes by default). An outage
        /// (that read failing) is waited out, and its time not counted,
        /// unless this command never heard from OpenFGA at all (a wrong
        /// openfga.api_url; inline, a server answering with errors is in
        /// an outage): pass --timeout to wait one out anyway.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (e.g. 90s, 5m), the first
        /// flush included, and exit 1.
        #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Option<Duration>,
    },
    /// Drop every pending op that is not already being written, and print
    /// each one dropped (ops acknowledged after it asked are kept). Once
    /// begun, a clear runs to its end through SIGINT and SIGTERM, so that
    /// every op it drops is printed.
    #[command(after_help = EXIT_CODES)]
    Clear {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Apply queued write jobs until SIGINT or SIGTERM.
    #[command(after_help = EXIT_CODES)]
    Worker {
        /// Requests kept in flight (default: queue.worker_concurrency).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: Option<u16>,
        /// Serve Prometheus metrics on this address (`/metrics`), e.g.
        /// 0.0.0.0:9464.
        #[arg(long)]
        metrics_addr: Option<std::net::SocketAddr>,
    },
    /// Dead letters: ops OpenFGA refused, or that died of transient causes.
    #[command(after_help = EXIT_CODES)]
    Dlq {
        #[command(subcommand)]
        command: Dlq,
    },
    /// Delete what older versions left in Redis: job keys (finished jobs
    /// stayed forever; `status` shows them as `legacy`) and the claim lists
    /// of jobs their workers finished during an upgrade.
    #[command(after_help = EXIT_CODES)]
    Sweep,
    /// Whether Redis lost acknowledged ops (checks fail closed until
    /// acknowledged); exits 1 while a loss is open.
    #[command(after_help = EXIT_CODES)]
    Loss {
        /// Acknowledge the open loss, after re-applying what the
        /// application granted and revoked around its time: checks answer
        /// again.
        #[arg(long)]
        ack: bool,
    },
}

#[derive(Subcommand)]
enum Dlq {
    /// List dead letters with OpenFGA's reasons.
    List,
    /// Buffer dead letters again, each in its op's place in line.
    Replay {
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Dead-letter ids (from `dlq list`).
        ids: Vec<u64>,
    },
    /// Delete dead letters: their ops are never written.
    Purge {
        /// Delete every dead letter (asks first; without a terminal, needs
        /// --yes).
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// With --all: do not ask for confirmation.
        #[arg(long, requires = "all")]
        yes: bool,
        /// Dead-letter ids (from `dlq list`).
        ids: Vec<u64>,
    },
}

/// A failure and its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<fga_wb::Error> for Failure {
    fn from(e: fga_wb::Error) -> Self {
        Failure {
            // OpenFGA refusing the credentials, or not knowing the store
            // or model, is the configuration's to fix too: a script can
            // tell it from "work remains" (1).
            code: if e.is_config() || e.stops_flushing() {
                2
            } else {
                1
            },
            message: e.to_string(),
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_log = match cli.command {
        Command::Worker { .. } => "warn,fga_wb=info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A worker waits on the network almost all the time: one thread spares
    // the cross-thread wake-ups a multi-threaded runtime pays per request,
    // on the cores OpenFGA and Redis need.
    let runtime = match &cli.command {
        Command::Worker { .. } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    };
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            note!("fga-wb: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            note!("fga-wb: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // The `fga` CLI's flags beat every variable and the file.
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    for (flag, key) in [
        (&cli.api_url, "FGA_WB_OPENFGA__API_URL"),
        (&cli.store_id, "FGA_WB_OPENFGA__STORE_ID"),
        (&cli.model_id, "FGA_WB_OPENFGA__MODEL_ID"),
        (&cli.api_token, "FGA_WB_OPENFGA__API_TOKEN"),
    ] {
        if let Some(v) = flag {
            vars.retain(|(k, _)| k != key);
            vars.push((key.to_owned(), v.clone()));
        }
    }
    let config = Config::load_from(cli.config.as_deref(), vars)?;
    if config.openfga.store_id.is_empty() {
        return Err(usage(
            "openfga.store_id is not set; set FGA_STORE_ID or openfga.store_id in the config file",
        ));
    }
    if let Command::Worker {
        concurrency,
        metrics_addr,
    } = cli.command
    {
        if config.buffer.store != StoreKind::Redis {
            return Err(usage(
                "the worker applies jobs from Redis: set buffer.store = \"redis\" and flush.mode = \"queue\"",
            ));
        }
        if let Some(addr) = metrics_addr {
            fga_wb::metrics::serve_prometheus(addr, &config.openfga.store_id)?;
        }
        let n = concurrency.map_or(config.queue.worker_concurrency, usize::from);
        fga_wb::queue::worker::run(config, n, shutdown_signal()).await?;
        return Ok(());
    }
    if config.buffer.store == StoreKind::Memory {
        return Err(usage(
            "buffer.store is \"memory\": each application process keeps its own buffer, which no other \
             process can see or flush. Use buffer.store = \"redis\" (FGA_WB_BUFFER__STORE=redis) to share \
             one buffer and operate it from here.",
        ));
    }
    // An operator's handle: no background flushing, no model needed.
    let wb = WriteBehind::builder(config.clone())
        .automatic_flush(false)
        .read_model(false)
        .build()
        .await?;
    // A SIGTERM (`timeout`, a Kubernetes Job, a cancelled CI run) ends the
    // command as a Ctrl-C does, through the close below: killed, it left
    // what an inline flush had taken this process's until its lease and a
    // hold after it ended.
    let result = match cli.command {
        // It answers a signal itself (see `clear`).
        Command::Clear { .. } => command(&cli, &wb, &config).await,
        _ => tokio::select! {
            biased;
            r = command(&cli, &wb, &config) => r,
            () = shutdown_signal() => Err(interrupted("what was done stays done")),
        },
    };
    // Nothing was buffered through this handle: drain nothing, but leave
    // the store's writers now, not when the lease ends (after a Redis
    // reconnect, the applications' checks wait for every recent writer).
    // Bounded: a Redis that does not answer must not hold the exit (the
    // lease then ends by itself). `close()` takes 3 s at most, and a
    // Redis call or two.
    match tokio::time::timeout(Duration::from_secs(5), wb.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "closing the operator's handle"),
        Err(_) => tracing::debug!("closing the operator's handle took too long"),
    }
    result
}

/// `fga-wb clear`. A signal before the operator answers ends it with
/// nothing cleared. Once begun, the clear runs to its end: each of its
/// steps (a few hundred ops) drops its ops for good, and their record is
/// printed at the end, so a clear cut short would drop ops unlisted.
async fn clear(json: bool, wb: &WriteBehind, yes: bool) -> Result<(), Failure> {
    let asked = async {
        // What the question is about: ops acknowledged while the
        // operator answers are not theirs to drop.
        let mark = wb.last_acknowledged().await?;
        let status = wb.status().await?;
        let pending = &status.pending;
        // In queue mode a clear also drops the ops of jobs no worker
        // runs yet, which count as in flight.
        let queued = match &status.queue {
            Some(_) if pending.in_flight > 0 => format!(
                ", and those of queued jobs no worker has started (up to {})",
                pending.in_flight
            ),
            _ => String::new(),
        };
        // Up to: ops waiting behind a write under way are kept.
        let question = format!("drop up to {} pending ops{queued}?", pending.total);
        if !yes && !confirm(&question).await {
            return Err(usage(
                "not confirmed; nothing cleared (use --yes to skip the question)",
            ));
        }
        Ok(mark)
    };
    let mark = tokio::select! {
        biased;
        r = asked => r?,
        () = shutdown_signal() => return Err(interrupted("nothing cleared")),
    };
    // The record of what will not reach OpenFGA.
    let clearing = wb.clear_ops_up_to(mark);
    tokio::pin!(clearing);
    let ops = tokio::select! {
        biased;
        r = &mut clearing => r?,
        () = shutdown_signal() => {
            note!("interrupted: the clear goes on to its end, so that every op it drops is listed");
            clearing.await?
        }
    };
    if json {
        let listed: Vec<_> = ops
            .iter()
            .map(|(t, op)| serde_json::json!({ "op": op, "tuple": t.to_string() }))
            .collect();
        print_json(&serde_json::json!({ "cleared": ops.len(), "ops": listed }))
    } else {
        out!("cleared {} pending ops", ops.len());
        for (t, op) in &ops {
            out!("  {} {t}", op_name(*op));
        }
        Ok(())
    }
}

/// A command ended by a signal (Ctrl-C, SIGTERM), saying what became of
/// its work.
fn interrupted(what: &str) -> Failure {
    Failure {
        code: 1,
        message: format!("interrupted; {what}"),
    }
}

async fn command(cli: &Cli, wb: &WriteBehind, config: &Config) -> Result<(), Failure> {
    match &cli.command {
        Command::Status { check } => {
            let mut s = wb.status().await?;
            s.redis_keys = wb.redis_key_usage().await?;
            let health = match check {
                true => Some(wb.health().await?),
                false => None,
            };
            if cli.json {
                let mut v = serde_json::to_value(&s).map_err(|e| Failure {
                    code: 1,
                    message: format!("cannot print the status: {e}"),
                })?;
                if let (Some(h), Some(map)) = (&health, v.as_object_mut()) {
                    map.insert("health".into(), serde_json::json!(h));
                }
                print_json(&v)?;
            } else {
                print_status(&s);
                if let Some(h) = &health {
                    for p in &h.problems {
                        out!("PROBLEM           {p}");
                    }
                    for w in &h.warnings {
                        out!("warning           {w}");
                    }
                    if h.problems.is_empty() {
                        out!("health            ok");
                    }
                }
            }
            match health {
                Some(h) if !h.problems.is_empty() => Err(Failure {
                    code: 1,
                    message: format!("unhealthy: {}", h.problems.join("; ")),
                }),
                _ => Ok(()),
            }
        }
        Command::Flush { wait, timeout } => {
            let started = tokio::time::Instant::now();
            let mut waiting = Waiting {
                started,
                // A timeout past what a clock can hold is no timeout.
                deadline: timeout
                    .filter(|_| *wait)
                    .and_then(|t| started.checked_add(t)),
                // Long enough for a worker to restart and show up again.
                no_worker_patience: config.redis.writer_lease.saturating_mul(NO_WORKER_LEASES),
                replays: (config.flush.mode == fga_wb::config::Mode::Queue)
                    .then_some(config.queue.replay_transient)
                    .filter(|every| !every.is_zero()),
                queue: config.flush.mode == fga_wb::config::Mode::Queue,
                patience: stuck_patience(config),
                mark: None,
            };
            // Letters written from here on are this wait's to report.
            let old_letters = match *wait {
                true => within(wb, &waiting, wb.newest_dead_letter_id()).await?,
                false => 0,
            };
            let status = within(wb, &waiting, wb.status()).await?;
            // As the live workers run, whatever this command's
            // configuration says (inline, or another replay setting): one
            // that replays does so every `queue.replay_transient` (this
            // configuration's, or the default if it says never); with
            // none seen, as this configuration says, for those to come.
            if let Some(q) = status.queue.as_ref().filter(|q| !q.workers.is_empty()) {
                waiting.replays = q.any_worker_replays().then(|| {
                    Some(config.queue.replay_transient)
                        .filter(|e| !e.is_zero())
                        .unwrap_or(fga_wb::config::QueueConfig::default().replay_transient)
                });
            }
            let before = status.totals;
            // What --wait waits for: ops acknowledged up to now.
            let mark = within(wb, &waiting, wb.last_acknowledged()).await?;
            waiting.mark = Some(mark);
            // Inline, this flush writes everything pending first (with
            // --wait, everything up to the mark).
            let mut report = match *wait {
                true => within(wb, &waiting, wb.flush_up_to(mark)).await?,
                false => within(wb, &waiting, wb.flush()).await?,
            };
            if *wait {
                let more = match wait_until_applied(wb, cli.json, &waiting).await {
                    Ok(more) => more,
                    Err(f) => {
                        // --json still prints its object, the failure as its
                        // error (scripts read stdout); Redis failing too
                        // leaves the failure as it is.
                        if cli.json {
                            report.error = Some(f.message.clone());
                            report.duration = started.elapsed();
                            if let Ok(s) = wb.status().await {
                                print_json(
                                    &serde_json::json!({ "flush": report, "pending": s.pending }),
                                )?;
                            }
                        }
                        return Err(f);
                    }
                };
                // What every writer and worker did while we waited (the
                // store's totals: in queue mode the workers write), and no
                // error: everything was written or dead-lettered in the end.
                let after = wb.status().await?.totals;
                report.applied = after.applied.saturating_sub(before.applied);
                report.coalesced = after.coalesced.saturating_sub(before.coalesced);
                report.dead_lettered = after.dead_lettered.saturating_sub(before.dead_lettered);
                report.requests = after.requests.saturating_sub(before.requests);
                report.queued = report.queued.saturating_add(more);
                report.duration = started.elapsed();
                report.error = None;
            }
            let status = wb.status().await?;
            // Looked at after the wait: ops Redis lost meanwhile are no
            // longer there to wait for, and the look at what is left found
            // none.
            if let Some(loss) = status.loss.as_ref().filter(|_| *wait) {
                return Err(lost_while_waiting(loss));
            }
            // Not written: --wait failed at what it is for. (Past the wait,
            // as the status read above: its deadline is for the waiting.)
            // Before the summary, so that --json's error says so too.
            let lost = match *wait && wb.newest_dead_letter_id().await? > old_letters {
                true => wb
                    .dead_letters()
                    .await?
                    .iter()
                    .filter(|d| d.id > old_letters && d.first <= mark && !d.superseded)
                    .count(),
                false => 0,
            };
            let lost = (lost > 0).then(|| format!(
                "{lost} of the ops it waited for (acknowledged before it began, or folded into such an op's place in line) were dead-lettered while it ran, not written: see `fga-wb dlq list`, and `fga-wb dlq replay` once their cause is fixed"
            ));
            if lost.is_some() {
                report.error.clone_from(&lost);
            }
            if cli.json {
                print_json(&serde_json::json!({ "flush": report, "pending": status.pending }))?;
            } else {
                out!(
                    "flushed: {} applied, {} queued, {} dead-lettered, {} requests in {:.2?}",
                    report.applied,
                    report.queued,
                    report.dead_lettered,
                    report.requests,
                    report.duration
                );
                out!(
                    "now pending: {} ({} in flight)",
                    status.pending.total,
                    status.pending.in_flight
                );
            }
            if let Some(message) = lost {
                return Err(Failure { code: 1, message });
            }
            if report.dead_lettered > 0 {
                note!(
                    "warning: {} ops were dead-lettered: see `fga-wb dlq list`",
                    report.dead_lettered
                );
            }
            // Queued is not written: without a worker nothing applies the
            // jobs (--wait says so while it waits).
            if !*wait && jobs_of(&status) > 0 && no_worker(&status) {
                note!(
                    "warning: {} jobs wait: {}",
                    jobs_of(&status),
                    no_worker_note(&status)
                );
            }
            match report.error {
                Some(e) => Err(Failure {
                    code: 1,
                    message: format!("flush stopped: {e}"),
                }),
                None => Ok(()),
            }
        }
        Command::Clear { yes } => clear(cli.json, wb, *yes).await,
        Command::Dlq { command } => dlq(cli.json, wb, command).await,
        Command::Loss { ack } => loss(cli.json, wb, *ack).await,
        Command::Sweep => {
            let n = wb.sweep_legacy_keys().await?;
            if cli.json {
                print_json(&serde_json::json!({ "deleted": n }))
            } else {
                out!("deleted {n} keys and claim lists older versions left");
                Ok(())
            }
        }
        Command::Worker { .. } => Ok(()),
    }
}

/// An op as the operator's listings name it.
fn op_name(op: Op) -> &'static str {
    match op {
        Op::Grant => "grant",
        Op::Revoke => "revoke",
    }
}

async fn dlq(json: bool, wb: &WriteBehind, command: &Dlq) -> Result<(), Failure> {
    let ids = |all: bool, ids: &[u64]| -> Result<Option<Vec<u64>>, Failure> {
        match (all, ids.is_empty()) {
            (true, _) => Ok(None),
            (false, false) => Ok(Some(ids.to_vec())),
            (false, true) => Err(usage("give dead-letter ids, or --all")),
        }
    };
    match command {
        Dlq::List => {
            let letters = wb.dead_letters().await?;
            if json {
                return print_json(&letters);
            }
            if letters.is_empty() {
                out!("no dead letters");
            }
            for d in letters {
                let state = match (d.superseded, d.transient) {
                    (true, _) => "superseded  ",
                    (false, true) => "transient  ",
                    _ => "",
                };
                out!(
                    "{:>6}  {:<6}  {}  attempts={}  {state}{}{}",
                    d.id,
                    op_name(d.op),
                    d.tuple,
                    d.attempts,
                    d.code.map(|c| format!("[{c}] ")).unwrap_or_default(),
                    d.reason
                );
            }
            Ok(())
        }
        Dlq::Replay { all, ids: given } => {
            let which = ids(*all, given)?;
            let r = wb.replay_dead_letters(which.as_deref()).await?;
            if json {
                print_json(&r)?;
            } else {
                out!(
                    "replayed {} dead letters; dropped {} superseded by a newer op on their tuple",
                    r.replayed,
                    r.superseded
                );
                // Say why letters the replay left as they are stay.
                if r.waiting > 0 {
                    let what = match r.waiting {
                        1 => "1 letter stays: its tuple has".to_owned(),
                        n => format!("{n} letters stay: each one's tuple has"),
                    };
                    out!(
                        "{what} an op that must be written first (a revoke given up in an outage waits behind a newer op, and is written if that op is refused for good; a grant waits for the revoke it owed); once it is, `fga-wb dlq replay` replays or drops them (`fga-wb dlq list` shows them)"
                    );
                }
            }
            match r.flush_error {
                Some(e) => Err(Failure {
                    code: 1,
                    message: format!(
                        "replayed {} dead letters (nothing is lost), but the flush after the replay did not finish: {e}; what it did not write stays pending, and `fga-wb flush` writes it once that is fixed",
                        r.replayed
                    ),
                }),
                // A replay whose ops are refused again fixed nothing.
                None if r.dead_lettered > 0 => Err(Failure {
                    code: 1,
                    message: format!(
                        "the flush after the replay dead-lettered {} of the replayed ops: OpenFGA refused them again (their cause is not fixed), see `fga-wb dlq list`",
                        r.dead_lettered
                    ),
                }),
                None => Ok(()),
            }
        }
        Dlq::Purge {
            all,
            yes,
            ids: given,
        } => {
            let which = ids(*all, given)?;
            // What the operator was asked about: not letters written while
            // the question was open (with --yes, all there are).
            let mut up_to = None;
            let mut asked = None;
            if *all && !*yes {
                let newest = wb.newest_dead_letter_id().await?;
                let letters = wb.dead_letters().await?;
                up_to = Some(letters.iter().map(|d| d.id).fold(newest, u64::max));
                let n = given_up(letters.iter());
                let note = match n {
                    0 => String::new(),
                    n => format!(", {n} of them {GIVEN_UP}"),
                };
                if !confirm(&format!("delete {} dead letters{note}?", letters.len())).await {
                    return Err(usage(
                        "not confirmed; nothing purged (use --yes to skip the question)",
                    ));
                }
                asked = Some(n);
            }
            // Purged without a question too (named letters, `--all --yes`:
            // scripts run them), but not without saying what that costs
            // (when the letters can be read: the purge does not depend on
            // it).
            let owed = match asked {
                Some(n) => n,
                None => wb.dead_letters().await.map_or(0, |letters| {
                    given_up(
                        letters
                            .iter()
                            .filter(|d| which.as_deref().is_none_or(|named| named.contains(&d.id))),
                    )
                }),
            };
            let n = match (which.as_deref(), up_to) {
                (None, Some(up_to)) => wb.purge_dead_letters_up_to(up_to).await?,
                (which, _) => wb.purge_dead_letters(which).await?,
            };
            if owed > 0 && n > 0 {
                note!("warning: {owed} of the letters purged were {GIVEN_UP_PURGED}");
            }
            report_count(json, "purged", n)
        }
    }
}

/// Ops given up in an outage, still their tuples' newest: OpenFGA may
/// still hold what a revoke among them revokes, and lacks a grant among
/// them, so the checks that could answer `allowed` for that (a revoke's,
/// and those of a grant that takes access away: under a `but not`, or a
/// condition narrowing a wider tuple) fail closed until they are replayed,
/// and ask OpenFGA once their letters are gone.
const GIVEN_UP: &str = "ops given up in an outage, which OpenFGA may not have (the checks of revokes among them, and of grants that take access away, fail closed until replayed; once deleted, checks ask OpenFGA, which may still hold what those revokes revoke and lacks those grants)";
const GIVEN_UP_PURGED: &str = "ops given up in an outage, which OpenFGA may not have (the checks of revokes among them, and of grants that take access away, failed closed until replayed): checks on those tuples now ask OpenFGA, which may still hold what the revokes revoke and lacks the grants";

fn given_up<'a>(letters: impl Iterator<Item = &'a fga_wb::DeadLetter>) -> usize {
    letters.filter(|d| d.given_up_in_an_outage()).count()
}

/// `1.2 KiB`, `3.4 MiB`.
fn bytes(n: u64) -> String {
    match n {
        0..=1023 => format!("{n} B"),
        1024..=1_048_575 => format!("{:.1} KiB", n as f64 / 1024.0),
        _ => format!("{:.1} MiB", n as f64 / 1_048_576.0),
    }
}

async fn loss(json: bool, wb: &WriteBehind, ack: bool) -> Result<(), Failure> {
    if ack {
        let by = format!(
            "`fga-wb loss --ack` as {}",
            std::env::var("USER").unwrap_or_else(|_| "?".into())
        );
        // What was closed, not what was read before: a loss recorded in
        // between is closed too, and must be told.
        let closed = wb.acknowledge_loss(&by).await?;
        if json {
            return print_json(
                &serde_json::json!({ "acknowledged": closed.is_some(), "loss": closed }),
            );
        }
        match closed {
            Some(l) => out!("acknowledged: {l}; checks answer again"),
            None => out!("no loss was open"),
        }
        return Ok(());
    }
    let open = wb.status().await?.loss;
    if json {
        print_json(&serde_json::json!({ "loss": open }))?;
    } else if let Some(l) = &open {
        out!("LOSS  {l}");
        out!("checks fail closed until `fga-wb loss --ack`");
    } else {
        out!("no loss recorded");
    }
    match open {
        Some(_) => Err(Failure {
            code: 1,
            message: "Redis lost acknowledged ops; see above".into(),
        }),
        None => Ok(()),
    }
}

fn report_count(json: bool, what: &str, n: usize) -> Result<(), Failure> {
    if json {
        print_json(&serde_json::json!({ what: n }))
    } else {
        out!("{what} {n} dead letters");
        Ok(())
    }
}

/// How `flush --wait` waits.
struct Waiting {
    started: tokio::time::Instant,
    /// `--timeout`: when it gives up, wherever it is.
    deadline: Option<tokio::time::Instant>,
    /// Without a deadline, how long it waits for a worker while none runs
    /// and jobs are queued.
    no_worker_patience: Duration,
    /// How often workers replay ops that died of transient failures
    /// (`None`: none does): as the live workers' names say, else, with
    /// none seen, as this configuration says in queue mode.
    replays: Option<Duration>,
    /// This command's configuration is for queue mode: inline, only an
    /// operator replays what died in an outage.
    queue: bool,
    /// Without a deadline, how long it waits while none of its ops is
    /// written, nor anything else, and OpenFGA answers (see [`Stuck`]).
    patience: Duration,
    /// The last op acknowledged when the command began: what it waits for
    /// (`None` until it is read).
    mark: Option<u64>,
}

/// Longer than a healthy store keeps an op from being written: a Write
/// and its quick retries, the queue's retry schedule, a replay's wait, a
/// dead writer's lease and hold; twice that.
fn stuck_patience(c: &Config) -> Duration {
    let tries = c
        .flush
        .request_retries
        .max(c.queue.request_retries)
        .saturating_add(1);
    let schedule: Duration = c.queue.retry_schedule.iter().sum();
    [
        c.openfga.request_timeout.saturating_mul(tries),
        schedule,
        c.queue.replay_transient,
        c.flush.unknown_outcome_hold,
        c.redis.writer_lease,
    ]
    .into_iter()
    .fold(Duration::ZERO, Duration::saturating_add)
    .saturating_mul(2)
}

/// Tells `flush --wait` without `--timeout` that the ops it waits for
/// keep failing while OpenFGA answers, so that it ends: one that died of
/// transient causes dying again after the workers replayed it (queue mode,
/// where they replay it for good), or none of them written, nor anything
/// else, for its patience (inline, a tuple whose Write fails alone is
/// given up only while other Writes land). OpenFGA is asked every few
/// seconds (a read of the store's tuples): time it does not answer is an
/// outage, waited out, and counts for neither.
struct Stuck {
    /// The fewest ops (and letters) left, the store's applied total, and
    /// when either last moved or OpenFGA last failed to answer.
    moved: (u64, u64, tokio::time::Instant),
    /// The newest letter id when the letters were last listed.
    newest_letter: Option<u64>,
    /// The newest transient letter seen of each tuple waited for.
    letters: HashMap<String, u64>,
    /// An op that died again after a replay (while OpenFGA answered),
    /// until one of the ops is written.
    died_again: Option<String>,
    /// Why OpenFGA refused the last look's read, when it was not an outage.
    refused: Option<String>,
    /// OpenFGA answered a look at least once during this wait.
    answered: bool,
    looked_at: Option<tokio::time::Instant>,
}

/// How often [`Stuck`] asks OpenFGA, and looks for new letters.
const STUCK_LOOK_EVERY: Duration = Duration::from_secs(5);

impl Stuck {
    fn new() -> Stuck {
        Stuck {
            moved: (u64::MAX, 0, tokio::time::Instant::now()),
            newest_letter: None,
            letters: HashMap::new(),
            died_again: None,
            refused: None,
            answered: false,
            looked_at: None,
        }
    }

    /// Why the wait should end, if it should.
    async fn look(
        &mut self,
        wb: &WriteBehind,
        w: &Waiting,
        s: &fga_wb::Status,
        u: &fga_wb::Unfinished,
        dead: usize,
    ) -> Result<Option<String>, Failure> {
        let now = tokio::time::Instant::now();
        let left = u.ops.saturating_add(dead as u64);
        if left < self.moved.0 {
            self.died_again = None;
        }
        if left < self.moved.0 || s.totals.applied != self.moved.1 {
            self.moved = (left, s.totals.applied, now);
        }
        if self
            .looked_at
            .is_some_and(|t| now.duration_since(t) < STUCK_LOOK_EVERY)
        {
            return Ok(None);
        }
        self.looked_at = Some(now);
        // Bounded: a hung OpenFGA must not hold up the wait's own flushes.
        // No answer in that time is a transient failure like any other.
        let probe = match tokio::time::timeout(STUCK_LOOK_EVERY, wb.openfga_reads()).await {
            Ok(r) => r.map_err(|e| {
                // Never heard from: nothing reached it (nor the token
                // endpoint), or it never answered what did.
                let unheard = !e.reached_server() || e.is_timeout();
                (e.is_transient(), unheard, e.to_string())
            }),
            Err(_) => Err((
                true,
                true,
                format!("OpenFGA did not answer a read of the store within {STUCK_LOOK_EVERY:?}"),
            )),
        };
        self.refused = None;
        match probe {
            Ok(()) => self.answered = true,
            // Not an outage: this command's own credentials or settings
            // (queue mode's CLI may have only Redis's). Taken as one, it
            // kept the wait from ever ending.
            Err((false, _, e)) => self.refused = Some(e),
            // One it never reached (nor heard from: an address that takes
            // connections and never answers) may be no OpenFGA at all
            // (settings left at their defaults, or not reachable from
            // where the command runs), not an outage. In queue mode the
            // command needs only Redis, and any failure of an OpenFGA that
            // never answered counts; inline, its own flushes failed the
            // same way, and the wait went on for good, but a server that
            // answers with an error (a 503) is one in an outage.
            Err((true, unheard, e)) if !self.answered && (w.queue || unheard) => {
                self.refused = Some(match w.queue {
                    true => format!(
                        "{e}; in queue mode this command needs only Redis, and tells an outage apart only through an OpenFGA it reaches: check openfga.api_url (and its credentials)"
                    ),
                    false => format!(
                        "{e}; this command never heard from it while waiting: check openfga.api_url (and its credentials or token endpoint) where it runs, or pass --timeout to wait out an outage"
                    ),
                });
            }
            _ => {
                // An outage: its time, and deaths during it, count for nothing.
                self.moved.2 = now;
                self.died_again = None;
                self.letters.clear();
                return Ok(None);
            }
        }
        // Listed only when a letter was written since the last listing.
        let newest = wb.newest_dead_letter_id().await?;
        if dead > 0 && self.newest_letter != Some(newest) {
            self.newest_letter = Some(newest);
            let mark = w.mark.unwrap_or_default();
            for d in wb.dead_letters().await? {
                if !d.transient || d.superseded || d.first > mark {
                    continue;
                }
                let tuple = d.tuple.to_string();
                if self
                    .letters
                    .insert(tuple.clone(), d.id)
                    .is_some_and(|id| id < d.id)
                {
                    self.died_again.get_or_insert_with(|| {
                        format!(
                            "{tuple} died again after the workers replayed it ({})",
                            d.reason
                        )
                    });
                }
            }
        }
        let still = now.duration_since(self.moved.2);
        let why = match &self.died_again {
            Some(why) => why.clone(),
            None if still >= w.patience => {
                format!("none of them was written, nor anything else, for {still:.0?}")
            }
            None => return Ok(None),
        };
        Ok(Some(match &self.refused {
            Some(e) => format!(
                "(OpenFGA did not answer this command's read of the store, so an outage \
                 could not be told apart: {e}): {why}"
            ),
            None => format!("while OpenFGA answers reads: {why}"),
        }))
    }
}

/// Ops not yet written (ops held by queued jobs count as in flight).
fn left_of(s: &fga_wb::Status) -> u64 {
    s.pending.total.saturating_add(s.pending.in_flight) as u64
}

/// Jobs not yet finished.
fn jobs_of(s: &fga_wb::Status) -> u64 {
    s.queue.as_ref().map_or(0, |q| {
        q.pending
            .saturating_add(q.running)
            .saturating_add(q.scheduled)
    })
}

/// The letters of `u` (ops given up in an outage) that keep `flush
/// --wait` from succeeding: in queue mode the workers may replay them
/// (`Waiting::replays`); inline, only the operator's `dlq replay` does, so
/// the wait ends with them unwritten (it ended with success, though
/// `status --check` names them a problem).
fn letters_waited_for(u: &fga_wb::Unfinished) -> usize {
    usize::try_from(u.transient_letters).unwrap_or(usize::MAX)
}

/// Of the letters of `u`, those the workers left for an operator.
fn left_letters(u: &fga_wb::Unfinished) -> usize {
    usize::try_from(u.left_letters).unwrap_or(usize::MAX)
}

/// What is left when only ops the workers left for an operator are.
fn left_note(dead: usize) -> String {
    format!(
        "{dead} ops died of transient failures, and died again after the workers' replays while other writes landed, queue.replay_limit times this hour: the workers left them for an operator; see `fga-wb dlq list` for OpenFGA's reasons, and run `fga-wb dlq replay` once their cause is fixed"
    )
}

/// Queue mode, and no worker was seen.
fn no_worker(s: &fga_wb::Status) -> bool {
    s.queue.as_ref().is_some_and(|q| q.workers.is_empty())
}

/// What keeps jobs from being applied, if it is that no worker runs.
fn no_worker_note(s: &fga_wb::Status) -> &'static str {
    match no_worker(s) {
        true => "no worker is running: start `fga-wb worker`",
        false => "",
    }
}

/// What `flush --wait` waits for besides pending ops and jobs: a worker,
/// and ops that died of transient failures (`dead`) for the workers'
/// replay; `hint` adds what to do about no worker when giving up.
fn waiting_for(s: &fga_wb::Status, dead: usize, replays: Option<Duration>, hint: bool) -> String {
    let mut parts = Vec::new();
    match no_worker_note(s) {
        "" => {}
        n if hint => parts.push(format!("{n}, or pass --timeout to wait for one")),
        n => parts.push(n.to_owned()),
    }
    if let Some(every) = replays.filter(|_| dead > 0) {
        parts.push(dead_note(dead, every));
    }
    if let Some(h) = &s.held_over {
        parts.push(held_over_note(h));
    }
    parts.join("; ")
}

/// Writers held over: what they hold, and until when.
fn held_over_note(h: &fga_wb::HeldOver) -> String {
    let left = h
        .until
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    format!(
        "{} writer(s) stopped while writing (crashed, or cut off from Redis); what they held stays in flight {:.0?} more, while a Write of theirs may still land (flush.unknown_outcome_hold)",
        h.writers, left
    )
}

/// `flush --wait` gives up: what is left (`u`: of what it waits for), and
/// what it waits for.
fn gave_up(s: &fga_wb::Status, w: &Waiting, u: &fga_wb::Unfinished) -> Failure {
    let after = w.started.elapsed();
    let dead = letters_waited_for(u);
    // Told to pass --timeout only when it was not given one.
    let note = waiting_for(s, dead, w.replays, w.deadline.is_none());
    let message = match u.ops {
        0 if dead > 0 && w.replays.is_some() => {
            format!("not all written after {after:.0?}: {note}")
        }
        0 if dead > 0 => format!("after {after:.0?}: {}", unreplayed_note(w, dead)),
        // Written while the last call ran past the deadline.
        0 => format!(
            "the deadline passed after {after:.0?} during a call; everything acknowledged before this command began is written now (run it again to confirm)"
        ),
        // The store's counts: ops acknowledged since are among them.
        _ => format!(
            "{} ops still pending or queued ({} jobs) after {after:.0?}, some acknowledged before this command began{}",
            left_of(s),
            jobs_of(s),
            if note.is_empty() {
                String::new()
            } else {
                format!(" ({note})")
            }
        ),
    };
    Failure { code: 1, message }
}

/// `flush --wait` ends: its ops keep failing while OpenFGA answers, or
/// while it cannot tell (see [`Stuck`]); `why` says which.
fn stuck_failure(why: &str, last_error: Option<&str>) -> Failure {
    Failure {
        code: 1,
        message: format!(
            "ops acknowledged before this command began are not written and keep failing {why}{}. They stay pending or dead-lettered and are retried; the logs and `fga-wb dlq list` name them (`fga-wb dlq purge <id>` gives one up). Pass --timeout to wait anyway",
            last_error.map_or(String::new(), |e| format!("; the last flush: {e}"))
        ),
    }
}

/// `call`, given up at `flush --wait`'s deadline (saying what is left).
async fn within<T>(
    wb: &WriteBehind,
    w: &Waiting,
    call: impl std::future::Future<Output = fga_wb::Result<T>>,
) -> Result<T, Failure> {
    match w.deadline {
        Some(d) => match tokio::time::timeout_at(d, call).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(left_after(wb, w).await),
        },
        None => Ok(call.await?),
    }
}

/// `flush --wait`'s deadline passed during a call: what is left, if
/// Redis says so promptly.
async fn left_after(wb: &WriteBehind, w: &Waiting) -> Failure {
    let Some(mark) = w.mark else {
        return Failure {
            code: 1,
            message: format!(
                "the deadline passed after {:.0?}, before this command could read what to wait for; nothing was flushed",
                w.started.elapsed()
            ),
        };
    };
    let look = async {
        let s = wb.status().await?;
        Ok::<_, Failure>(gave_up(&s, w, &wb.unfinished(mark).await?))
    };
    match tokio::time::timeout(Duration::from_secs(5), look).await {
        Ok(Ok(f)) => f,
        _ => Failure {
            code: 1,
            message: format!(
                "not everything was written after {:.0?}",
                w.started.elapsed()
            ),
        },
    }
}

/// What `flush --wait` waits for when only ops that died of transient
/// failures (`dead`) are left: workers replay them `every` so often.
fn dead_note(dead: usize, every: Duration) -> String {
    format!(
        "{dead} ops that died of transient failures wait in the dead-letter set for the workers' replay (every {} by this command's queue.replay_transient, or the default; the workers' own may differ) once OpenFGA answers",
        humantime::format_duration(every)
    )
}

/// What is left when only ops that died of transient failures (`dead`)
/// are, and workers do not replay them.
fn unreplayed_note(w: &Waiting, dead: usize) -> String {
    let nobody = match w.queue {
        true => {
            "no worker replays them (none runs, or they run with queue.replay_transient = \"0s\")"
        }
        false => "inline, nothing replays them by itself",
    };
    format!(
        "{dead} ops died of transient failures (OpenFGA unreachable or failing through the retry schedule) and are not written; {nobody}: run `fga-wb dlq replay` once OpenFGA answers"
    )
}

/// `flush --wait` cannot say that what it waited for was written: a
/// record of Redis losing acknowledged ops is open (from before the wait,
/// or from during it).
fn lost_while_waiting(loss: &str) -> Failure {
    Failure {
        code: 1,
        message: format!(
            "a record of Redis losing acknowledged ops is open ({loss}): lost ops are never written, and this wait cannot tell whether those it waited for were among them; re-apply what the application granted and revoked around then, then run `fga-wb loss --ack`"
        ),
    }
}

/// Flushes again and again until every op acknowledged before the command
/// began (`w.mark`) is written, and returns how many ops its own flushes
/// queued: ops a dead process held come back pending when its lease ends
/// (a hold later if it was writing) and are flushed again; in queue mode
/// the workers apply the jobs, and replay ops that died of transient
/// failures. Ops acknowledged since are neither flushed here (their
/// writers flush them, in full chunks) nor waited for, so steady traffic
/// does not keep it waiting. A progress bar on a
/// terminal, a line every 5 s otherwise (unless `quiet`: --json).
async fn wait_until_applied(wb: &WriteBehind, quiet: bool, w: &Waiting) -> Result<u64, Failure> {
    use std::io::IsTerminal;
    let started = w.started;
    // Read before the first flush, which came before this.
    let mark = w.mark.unwrap_or_default();
    let tty = !quiet && std::io::stderr().is_terminal();
    let bar = if tty {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} written ({elapsed}) {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let waited = async {
        let total = left_of(&wb.status().await?);
        let mut last_line = tokio::time::Instant::now();
        let mut queued = 0u64;
        let mut no_worker_since = None;
        // After flushes that failed: none again before this, doubling
        // from half a second to 10 s (each flush() retries at once).
        let mut failed_flushes = 0u32;
        let mut flush_at = tokio::time::Instant::now();
        let mut stuck = Stuck::new();
        // Inline, the last error its own flushes met.
        let mut last_error: Option<String> = None;
        loop {
            let status = wb.status().await?;
            if let Some(loss) = &status.loss {
                bar.abandon();
                return Err(lost_while_waiting(loss));
            }
            let left = left_of(&status);
            bar.set_length(total.max(left));
            bar.set_position(total.saturating_sub(left));
            // One look, atomic in the store, at what is left of the ops
            // acknowledged before the command began: an op moving on
            // meanwhile (taken, dead, replayed) is seen where it is.
            let u = wb.unfinished(mark).await?;
            let dead = letters_waited_for(&u);
            if u.ops == 0 {
                // Left for an operator by the workers: no replay of theirs
                // is coming (inline, none is anyway).
                let waited = match w.replays {
                    Some(_) => dead.saturating_sub(left_letters(&u)),
                    None => dead,
                };
                match w.replays {
                    _ if dead == 0 => {
                        bar.finish();
                        return Ok(queued);
                    }
                    Some(_) if waited == 0 => {
                        bar.abandon();
                        return Err(Failure {
                            code: 1,
                            message: left_note(dead),
                        });
                    }
                    None => {
                        bar.abandon();
                        return Err(Failure {
                            code: 1,
                            message: unreplayed_note(w, dead),
                        });
                    }
                    Some(_) => {}
                }
            }
            let mut note = waiting_for(&status, dead, w.replays, false);
            // Inline, what keeps this command's own flushes from writing
            // (an address it cannot reach, say): else the wait showed only
            // a count that never moved.
            if let Some(e) = last_error.as_ref().filter(|_| failed_flushes > 0) {
                if !note.is_empty() {
                    note.push_str("; ");
                }
                note.push_str("last flush failed: ");
                note.push_str(e);
            }
            // In queue mode a worker's stop is final for the wait (not an
            // application's: one whose flusher panicked, say, while
            // workers queue what it gave back); inline, this process
            // writes, and its own flush says if it cannot.
            if let Some(why) = status
                .workers_stopped
                .as_ref()
                .filter(|_| status.queue.is_some())
            {
                bar.abandon();
                return Err(Failure {
                    code: 1,
                    message: format!("flushing is stopped: {why}"),
                });
            }
            let no_worker = no_worker(&status);
            bar.set_message(note.clone());
            if !tty && !quiet && last_line.elapsed() >= Duration::from_secs(5) {
                last_line = tokio::time::Instant::now();
                note!(
                    "waiting ({:.0?}): {} pending, {} in flight{}{}",
                    started.elapsed(),
                    status.pending.total,
                    status.pending.in_flight,
                    status.queue.as_ref().map_or(String::new(), |q| format!(
                        ", jobs {} queued / {} running / {} scheduled",
                        q.pending, q.running, q.scheduled
                    )),
                    if note.is_empty() {
                        String::new()
                    } else {
                        format!("; {note}")
                    }
                );
            }
            // Without a timeout, jobs no worker runs would be waited for
            // forever: give up once none has been seen for a while.
            let no_worker_for = no_worker
                .then(|| *no_worker_since.get_or_insert_with(tokio::time::Instant::now))
                .map(|since| since.elapsed());
            if !no_worker {
                no_worker_since = None;
            }
            let gave_up_now = match w.deadline {
                Some(d) => tokio::time::Instant::now() >= d,
                None => no_worker_for.is_some_and(|d| d >= w.no_worker_patience),
            };
            if gave_up_now {
                bar.abandon();
                return Err(gave_up(&status, w, &u));
            }
            if w.deadline.is_none() {
                if let Some(why) = stuck.look(wb, w, &status, &u, dead).await? {
                    bar.abandon();
                    return Err(stuck_failure(&why, last_error.as_deref()));
                }
            }
            // While any op it waits for is left, not only while some are
            // pending: each flush also looks for ops Redis names this
            // process as holding that it does not (a take whose reply was
            // lost), and gives them back.
            if u.ops > 0 && tokio::time::Instant::now() >= flush_at {
                // Ops came back (a dead writer's lease ended) or arrived: write
                // or enqueue them; a transient failure is retried next round.
                // Only up to the mark: later ops are their writers' to
                // flush, in full chunks.
                let error = match wb.flush_up_to(mark).await {
                    // Nothing will be written until the operator fixes it.
                    Err(e) if e.stops_flushing() => {
                        bar.abandon();
                        return Err(e.into());
                    }
                    Err(e) => Some(e.to_string()),
                    Ok(r) => {
                        queued = queued.saturating_add(r.queued);
                        r.error
                    }
                };
                if error.is_some() {
                    last_error.clone_from(&error);
                }
                failed_flushes = match &error {
                    Some(e) => {
                        bar.set_message(format!("flush failed, retrying: {e}"));
                        failed_flushes.saturating_add(1)
                    }
                    None => 0,
                };
                let pause = match failed_flushes {
                    0 => Duration::ZERO,
                    n => (Duration::from_millis(250) * 2u32.pow(n.min(6)))
                        .min(Duration::from_secs(10)),
                };
                flush_at = tokio::time::Instant::now() + pause;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    let deadline = async {
        match w.deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    // One listener for the whole wait: a Ctrl-C during a flush or a status
    // read counts too (a listener made per sleep missed those).
    tokio::select! {
        r = waited => r,
        // A call under way at the deadline (an inline flush writing a
        // backlog, Redis slow to answer) does not hold the wait past it.
        () = deadline => {
            bar.abandon();
            Err(left_after(wb, w).await)
        }
        () = shutdown_signal() => {
            bar.abandon();
            Err(interrupted("what was flushed stays flushed"))
        }
    }
}

/// How long, in worker leases, `flush --wait` without `--timeout` waits
/// for a worker while none runs and jobs are queued (30 s by default).
const NO_WORKER_LEASES: u32 = 6;

fn print_status(s: &fga_wb::Status) {
    let age = s
        .pending
        .oldest_age
        .map_or("-".to_owned(), |a| format!("{:.1}s", a.as_secs_f64()));
    out!("store             {:?} / {:?}", s.store, s.mode);
    out!("openfga store     {}", s.store_id);
    out!(
        "pending           {} (writes {}, deletes {}), oldest {age}",
        s.pending.total,
        s.pending.writes,
        s.pending.deletes
    );
    out!("in flight         {}", s.pending.in_flight);
    if let Some(h) = &s.held_over {
        out!("held over         {}", held_over_note(h));
    }
    if let Some(q) = &s.queue {
        out!(
            "queue             {} pending, {} running, {} scheduled retries",
            q.pending,
            q.running,
            q.scheduled
        );
        let workers = if q.workers.is_empty() {
            "none".to_owned()
        } else {
            q.workers.join(", ")
        };
        out!("workers seen      {workers}");
    }
    out!("dead letters      {}", s.dead_letters);
    if let Some(l) = s.write_limit {
        out!("write limit       {l} tuples per Write (OpenFGA's --max-tuples-per-write; set flush.max_tuples_per_write = {l})");
    }
    if let Some(keys) = &s.redis_keys {
        let all: Vec<String> = keys
            .iter()
            .map(|k| format!("{} {} keys {}", k.category, k.keys, bytes(k.bytes)))
            .collect();
        let total: u64 = keys.iter().map(|k| k.bytes).sum();
        out!(
            "redis keys        {} ({} in all)",
            all.join(", "),
            bytes(total)
        );
        if keys.iter().any(|k| k.category == "legacy" && k.keys > 0) {
            out!("                  legacy: job keys an older version left; `fga-wb sweep` deletes them");
        }
    }
    if let Some(l) = &s.loss {
        out!("REDIS LOST OPS    {l}; checks fail closed until `fga-wb loss --ack`");
    }
    if let Some(why) = &s.flushing_stopped {
        out!("FLUSHING STOPPED  {why}");
    }
    match &s.last_flush {
        Some(l) => {
            let ago = l.at.elapsed().map_or(0.0, |d| d.as_secs_f64());
            let r = &l.report;
            out!(
                "last flush        {ago:.0}s ago: {} applied, {} queued, {} dead-lettered, {} requests{}",
                r.applied,
                r.queued,
                r.dead_lettered,
                r.requests,
                r.error.as_ref().map(|e| format!(", error: {e}")).unwrap_or_default()
            );
        }
        None => out!("last flush        never"),
    }
    let t = &s.totals;
    out!(
        "totals            {} acknowledged, {} applied, {} coalesced, {} dead-lettered, {} cleared",
        t.acknowledged,
        t.applied,
        t.coalesced,
        t.dead_lettered,
        t.cleared
    );
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    match serde_json::to_string_pretty(v) {
        Ok(s) => {
            out!("{s}");
            Ok(())
        }
        Err(e) => Err(Failure {
            code: 1,
            message: format!("cannot print JSON: {e}"),
        }),
    }
}

/// Asks `question` on a terminal; no terminal is a no. The answer is read
/// on a thread of its own: read in the command's task, it kept the signal
/// handler from running, and Ctrl-C did nothing at the prompt. (A thread
/// left reading does not hold the process's exit.)
async fn confirm(question: &str) -> bool {
    use std::io::{BufRead, IsTerminal, Write};
    if !std::io::stdin().is_terminal() {
        return false;
    }
    let _ = write!(std::io::stderr(), "{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let read = std::thread::Builder::new().spawn(move || {
        let mut line = String::new();
        let yes = std::io::stdin().lock().read_line(&mut line).is_ok()
            && line.trim().eq_ignore_ascii_case("y");
        let _ = tx.send(yes);
    });
    read.is_ok() && rx.await.unwrap_or(false)
}

async fn shutdown_signal() {
    // A handler that cannot be set up never fires: it must not end the
    // worker the moment it starts (with exit 0).
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    () = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => interrupt.await,
        }
    }
    #[cfg(not(unix))]
    interrupt.await;
}
