//! fga-wb: a write-behind layer for [OpenFGA](https://openfga.dev).
//!
//! Writing every relationship tuple to OpenFGA as it happens costs a round
//! trip per grant and turns bursts into thousands of small Write requests.
//! fga-wb acknowledges `grant` and `revoke` as soon as they are buffered,
//! answers `check` as if they were already applied, and writes them to
//! OpenFGA in batches of up to 100 tuples, several requests in parallel.
//!
//! ```no_run
//! # async fn demo() -> fga_wb::Result<()> {
//! let config = fga_wb::Config::load(None)?;
//! let wb = fga_wb::WriteBehind::builder(config).build().await?;
//! wb.grant("user:anne", "editor", "document:roadmap").await?;
//! assert!(wb.check("user:anne", "viewer", "document:roadmap").await?);
//! wb.revoke("user:anne", "editor", "document:roadmap").await?;
//! assert!(!wb.check("user:anne", "viewer", "document:roadmap").await?);
//! wb.shutdown().await?;
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! * `redis` (default): the Redis store, queue mode and `queue::worker`.
//! * `cli` (default): the `fga-wb` binary; implies `redis`.
//! * `test-util`: `testing`, a fake OpenFGA and a fake job queue for an
//!   application's own tests.
//!
//! Without default features the library has the memory store only and no
//! Redis crate in its dependency graph.
//!
//! # Guarantees
//!
//! * **Acknowledged when buffered.** `grant`/`revoke` return once the op is
//!   in the buffer (memory: in this process). Invalid tuples are refused at
//!   the call with an error naming the field, and nothing is buffered; with a
//!   known model, types, relations and user types are checked too.
//! * **Read your writes, derived relations included.** A check sends every
//!   pending grant that could matter to it (as the model's rewrite graph
//!   says) to OpenFGA as contextual tuples, so `editor` implying `viewer`,
//!   parent folders and group usersets all see a grant at once. More than 100
//!   relevant grants make the check flush first.
//! * **Never stale-allowed.** Contextual tuples cannot delete, so a check
//!   that could depend on a pending revoke waits for the revoke to be
//!   written (revokes are flushed at once) and fails closed with an error if
//!   `check.revoke_wait_timeout` passes. Every op, grant or revoke, makes the
//!   cached answers it could change unusable, because with `but not` and
//!   `and` a grant can remove access too.
//! * **Last write wins per tuple.** Ops are coalesced per tuple key; a key is
//!   never in two Write requests at once, and an op that fails after a newer
//!   op on its key arrived is dropped, never retried over the newer one.
//! * **One bad tuple never blocks the rest.** A Write refused for its input
//!   is split in halves until the bad tuples stand alone; the rest is
//!   applied, the bad ones go to the dead letters with OpenFGA's message.
//!   Transient failures retry with exponential backoff and jitter; refused
//!   credentials stop flushing (reported in `status`) and keep every op.
//! * **Bounded memory.** At `buffer.capacity` distinct pending tuples, the
//!   `buffer.overflow` policy applies: block, flush, or reject.
//! * **What a crash loses.** With the memory store, everything pending or in
//!   flight when the process dies: at most `flush.batch_size` ops or
//!   `flush.interval` of ops, whichever comes first, plus what a failing
//!   OpenFGA kept pending. `shutdown()` drains first.
//!
//! # Layout
//!
//! How the pieces fit, and where each promise is kept, is in the
//! repository's `ARCHITECTURE.md`.
//!
//! * `tuple`: tuples and OpenFGA's validation rules.
//! * `config`: figment layering of defaults, file and environment.
//! * `openfga`: a thin HTTP client; knows nothing of buffering. Public as a
//!   secondary API (store and model admin, reads for tests and tools); the
//!   handle is the primary one and changes more carefully.
//! * `model` (private): what the authorization model says about validity,
//!   which checks a tuple can change, and which tuples can take access away.
//! * `buffer` (private): pending ops, coalescing, sequence numbers, the
//!   in-flight set, dead letters; the memory and Redis stores; recent writes.
//! * `cache` (private): the moka check cache and its invalidation.
//! * `flush` (private): the flusher, chunking, bisection, retries.
//! * `queue`: queue mode's jobs and the `fga-wb worker` applier
//!   (`queue::worker::run` is public for the binary and for embedding a
//!   worker in a service).
//! * `client`: [`WriteBehind`], the handle.
//! * `status`: counters, metrics and the status report.
//! * `testing` (feature `test-util`): test doubles for applications.
#![warn(missing_docs)]
// Without the Redis store, the variants and helpers only it and queue mode
// use (job states, claims, Redis errors) are unused: expected, not dead.
#![cfg_attr(not(feature = "redis"), allow(dead_code))]

pub(crate) mod buffer;
mod cache;
mod client;
mod condition;
pub mod config;
mod error;
mod flush;
pub mod metrics;
mod model;
pub mod openfga;
pub mod queue;
mod status;
#[cfg(feature = "test-util")]
pub mod testing;
pub mod tuple;

pub use buffer::{DeadLetter, KeyUsage, Pending, Replayed, Unfinished};
pub use client::{Builder, Health, ShutdownReport, WriteBehind};
pub use config::Config;
pub use error::{Error, Result};
pub use status::{FlushReport, HeldOver, LastFlush, Status, Totals};
pub use tuple::{Condition, Op, TupleKey};

/// A map looked up by name on every grant: hashed with foldhash, as SipHash
/// took about 5% of a grant's CPU in a profile. Seeded per map, so inserted
/// names (object types, with no model) cannot be chosen to collide.
pub(crate) type NameMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

// Handles and errors cross task and thread boundaries.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<WriteBehind>();
    assert_send_sync::<Error>();
};
