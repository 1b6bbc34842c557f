//! Throw-away servers on loopback for fga-wb's tests, benchmarks and scripts:
//! OpenFGA (memory, SQLite or PostgreSQL datastore, caches on or off, TLS),
//! PostgreSQL, Redis (single node, with or without AOF, or a cluster), a
//! TCP proxy that adds latency, one that loses an answer and one that
//! delivers a request late.
//!
//! This is the one place that starts servers. The integration tests and the
//! load tests use the library; `scripts/test`, `scripts/servers` and
//! `scripts/bench` run the `testenv` binary, which starts the shared servers
//! and prints their addresses as `export` lines.
//!
//! Every server runs in its own process group, on free loopback ports, with
//! its files in a temp dir. Dropping the handle kills the group and removes
//! the dir; a server also dies with the thread that started it
//! (`PR_SET_PDEATHSIG`), so a crashed test or a `kill -9` of the runner
//! leaves nothing behind.

mod cut;
mod error;
mod hold;
mod openfga;
mod ports;
mod postgres;
mod process;
mod proxy;
mod redis;
mod relay;
mod switch;

pub use cut::CutProxy;
pub use error::{Error, Result};
pub use hold::HoldProxy;
pub use openfga::{Datastore, OpenFga, OpenFgaOptions, Tls};
pub use ports::free_port;
pub use postgres::Postgres;
pub use process::Proc;
pub use proxy::{DelayProxy, WriteCounts};
pub use redis::{Fsync, Redis, RedisCluster, RedisOptions};
pub use switch::SwitchProxy;

/// A signal a test sends to a process it started (an fga-wb child, a worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
    Stop,
    Cont,
}

/// Sends `sig` to process `pid` with kill(2): no `kill` command needed,
/// which slim images (no procps) lack.
pub fn signal(pid: u32, sig: Signal) -> Result<()> {
    let n = match sig {
        Signal::Term => libc::SIGTERM,
        Signal::Kill => libc::SIGKILL,
        Signal::Stop => libc::SIGSTOP,
        Signal::Cont => libc::SIGCONT,
    };
    let target = i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Error::new(format!("no such process id: {pid}")))?;
    // SAFETY: kill(2) touches no memory of ours.
    if unsafe { libc::kill(target, n) } == 0 {
        Ok(())
    } else {
        Err(Error::io(
            format!("kill({pid}, {sig:?})"),
            std::io::Error::last_os_error(),
        ))
    }
}

/// A random 64-bit number, without a dependency on `rand`.
pub fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    h.finish()
}

/// A fresh temp dir named after `what`, readable by other users (PostgreSQL
/// runs as another user when we are root).
pub fn temp_dir(what: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "fga-wb-{what}-{}-{:x}",
        std::process::id(),
        random()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    Ok(dir)
}
