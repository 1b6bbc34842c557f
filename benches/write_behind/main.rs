//! Benchmarks of fga-wb against a real OpenFGA, each figure printed next to
//! what it is compared with. Not a test: it prints tables.
//!
//! Run through `scripts/bench [section...]`, which builds in release mode and
//! starts a throw-away OpenFGA and Redis (`scripts/servers`). Sections:
//! `ack`, `throughput`, `coalesce`, `checks`, `memory` (memory store),
//! `redis-ack`, `redis-throughput`, `queue-e2e`, `aof` (Redis store and
//! queue mode), `loss-window` (the memory store's crash loss
//! window); none means all. Each section runs in a fresh process (the binary
//! re-runs itself), so one section's allocations never show in another's
//! memory figure.
//!
//! The throughput, queue-e2e and loss-window sections also start a second
//! OpenFGA, from the same binary, on the sqlite datastore: the memory
//! datastore's Write scans every stored tuple, so it cannot take 100k tuples
//! in reasonable time. The aof section starts its own redis-server (with
//! append-only files on), which it kills and restarts.
//!
//! `FGA_WB_BENCH_SCALE=0.1` shrinks every count (for a quick try; the
//! targets are stated for the full counts).

use std::collections::HashSet;
use std::fmt::Write as _;
use std::process::Command;
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::openfga::{CheckRequest, Client, ReadFilter, Secret, WriteRequest};
use fga_wb::{Config, TupleKey, WriteBehind};
use futures::stream::{self, TryStreamExt};

const SECTIONS: &[&str] = &[
    "ack",
    "throughput",
    "coalesce",
    "checks",
    "memory",
    "redis-ack",
    "redis-throughput",
    "queue-e2e",
    "aof",
    "loss-window",
];
const RELATION: &str = "viewer";
/// Set in the environment of the per-section child processes.
const CHILD_ENV: &str = "FGA_WB_BENCH_CHILD";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = std::result::Result<T, BoxError>;

fn main() {
    // `cargo bench` appends `--bench`; anything starting with `-` is not a section.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for a in &args {
        if !SECTIONS.contains(&a.as_str()) {
            eprintln!("unknown section {a:?}; sections: {}", SECTIONS.join(", "));
            std::process::exit(2);
        }
    }
    let sections: Vec<&str> = if args.is_empty() {
        SECTIONS.to_vec()
    } else {
        SECTIONS
            .iter()
            .copied()
            .filter(|s| args.iter().any(|a| a == s))
            .collect()
    };

    if std::env::var_os(CHILD_ENV).is_some() {
        let section = sections[0];
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        if let Err(e) = rt.block_on(run_section(section)) {
            eprintln!("section {section} failed: {e}");
            std::process::exit(1);
        }
        return;
    }

    print_machine();
    let exe = std::env::current_exe().expect("current exe");
    let mut failed = Vec::new();
    for s in sections {
        let status = Command::new(&exe)
            .arg(s)
            .env(CHILD_ENV, "1")
            .status()
            .expect("run section");
        if !status.success() {
            failed.push(s);
        }
    }
    if !failed.is_empty() {
        eprintln!("sections failed: {}", failed.join(", "));
        std::process::exit(1);
    }
}

async fn run_section(section: &str) -> Res<()> {
    let env = Env::from_env()?;
    let load = loadavg();
    let started = Instant::now();
    match section {
        "ack" => ack(&env).await?,
        "throughput" => throughput(&env).await?,
        "coalesce" => coalesce(&env).await?,
        "checks" => checks(&env).await?,
        "memory" => memory(&env).await?,
        "redis-ack" => redis_ack(&env).await?,
        "redis-throughput" => redis_throughput(&env).await?,
        "queue-e2e" => queue_e2e(&env).await?,
        "aof" => aof(&env).await?,
        "loss-window" => loss_window(&env).await?,
        _ => unreachable!("sections are checked in main"),
    }
    println!(
        "(section took {:.1} s; load average before it: {})\n",
        started.elapsed().as_secs_f64(),
        load
    );
    Ok(())
}

mod ack;
mod checks;
mod coalesce;
mod durability;
mod memory;
mod queue_e2e;
mod redis_store;
mod setup;
mod stats;
mod throughput;

use ack::*;
use checks::*;
use coalesce::*;
use durability::*;
use memory::*;
use queue_e2e::*;
use redis_store::*;
use setup::*;
use stats::*;
use throughput::*;
