//! The handle applications hold: [`WriteBehind`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::buffer::{key_of, DeadLetter, Pending, Replayed, StoreEvent, Unfinished};
use crate::cache::{CheckCache, Generation};
use crate::config::{Config, Mode, Overflow, StoreKind};
use crate::error::{Error, Kind, Result};
use crate::flush::{self, Command, Engine};
use crate::model::{Dep, Model};
use crate::openfga::{
    CheckRequest, Client, Consistency, Context, ListObjectsRequest, ListUsersRequest, ReadFilter,
    MAX_CONTEXTUAL_TUPLES,
};
use crate::status::{count, FlushReport, Status};
use crate::tuple::{Op, TupleKey};

/// A write-behind buffer in front of one OpenFGA store.
///
/// Cheap to clone; clones share the buffer, the cache and the background
/// flusher. Call [`WriteBehind::shutdown`] before exit to drain what is
/// pending; dropping the last clone without it stops the flusher and logs how
/// many ops were left.
#[derive(Clone)]
pub struct WriteBehind {
    inner: Arc<Handle>,
}

struct Handle {
    engine: Arc<Engine>,
    config: Config,
    /// The analysed model; replaced by `refresh_model`.
    model: arc_swap::ArcSwapOption<Model>,
    /// Held by `refresh_model` from its read to its switch: two at once
    /// (the application's and the background one) could install an older
    /// model over a newer one, or the cache's tables of one model with the
    /// other in use.
    refreshing: tokio::sync::Mutex<()>,
    /// Models that checks and lists were pinned to by their callers, by id,
    /// each read and analysed once however many ask at a time (a model
    /// never changes under its id).
    pinned_models: Mutex<std::collections::HashMap<String, PinnedRead>>,
    /// The Redis store, when the buffer is there (its queue, for status).
    redis: Option<Arc<crate::buffer::redis::RedisStore>>,
    validate_against_model: bool,
    /// Whether it reads the authorization model (the CLI does not).
    read_model: bool,
    /// The handle's flusher writes on its own (not `fga-wb status`'s).
    automatic_flush: bool,
    commands: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    /// The flusher's thread; taken by shutdown.
    flusher: Mutex<Option<flush::FlusherThread>>,
    /// For a shared store, the listener for other processes' changes.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shut_down: AtomicBool,
    /// A `shutdown()` or `close()` ran to its end (one cut short, its
    /// future dropped, leaves the ops it did not write to `Drop`'s count);
    /// a second call waits for it, until the first's deadline at most.
    ended: watch::Sender<bool>,
    /// When the first `shutdown()` or `close()` is bound to have ended.
    ending_by: std::sync::OnceLock<Instant>,
    /// Told of every check the application makes (the test doubles).
    #[cfg(feature = "test-util")]
    on_check: Option<CheckHook>,
}

/// Called with `(user, relation, object)` of each check.
#[cfg(feature = "test-util")]
pub(crate) type CheckHook = Arc<dyn Fn(&str, &str, &str) + Send + Sync>;

/// Builds a [`WriteBehind`] from a [`Config`].
#[must_use]
pub struct Builder {
    config: Config,
    client: Option<Client>,
    validate_against_model: bool,
    automatic_flush: bool,
    read_model: bool,
    /// Queue mode's job sink when it is not Redis's (the test double).
    sink: Option<crate::flush::Sink>,
    #[cfg(feature = "test-util")]
    on_check: Option<CheckHook>,
}

/// What [`WriteBehind::health`] found.
#[derive(Clone, Debug, Default, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// What keeps ops from reaching OpenFGA now.
    pub problems: Vec<String>,
    /// What could lose or delay ops later.
    pub warnings: Vec<String>,
}

/// What [`WriteBehind::shutdown`] did and what it left.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// What the final flushes did.
    pub flushed: FlushReport,
    /// What is still pending (or in flight) after the deadline; with the
    /// memory store, these ops are lost when the process exits. With the
    /// Redis store, what the whole store holds: other processes' ops too,
    /// and in queue mode the ops of jobs waiting for workers, all kept
    /// for those to write.
    pub left: Pending,
}

impl Builder {
    /// Use this OpenFGA client instead of one built from the config
    /// (a custom timeout or TLS setup). Default: built from `[openfga]`.
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Check each tuple's type, relation and user type against the
    /// authorization model in `grant`/`revoke`, before acknowledging.
    /// Default: on. Turn it off only when the model may change under a
    /// running process; OpenFGA then refuses bad tuples at flush time and
    /// they are dead-lettered.
    pub fn validate_against_model(mut self, on: bool) -> Self {
        self.validate_against_model = on;
        self
    }

    /// Flush in the background (batch size, interval, revokes). Default: on.
    /// Off for a handle that only inspects or flushes on request, such as
    /// `fga-wb status` looking at a shared Redis buffer.
    pub fn automatic_flush(mut self, on: bool) -> Self {
        self.automatic_flush = on;
        self
    }

    /// Read the authorization model at build. Default: on. Without it,
    /// tuples are not checked against the model and every pending op counts
    /// as relevant to every check (correct, just broader).
    pub fn read_model(mut self, on: bool) -> Self {
        self.read_model = on;
        self
    }

    /// Hands every flushed chunk to `sink` as a job instead of writing it
    /// (queue mode with any store): for `testing::FakeQueue`.
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub(crate) fn job_sink(mut self, sink: crate::flush::Sink) -> Self {
        self.sink = Some(sink);
        self
    }

    /// Tells `hook` of every check made through the handle.
    #[cfg(feature = "test-util")]
    pub(crate) fn on_check(mut self, hook: CheckHook) -> Self {
        self.on_check = Some(hook);
        self
    }

    /// Connects to OpenFGA, reads the authorization model, and starts the
    /// flusher. Must be called inside a Tokio runtime.
    pub async fn build(self) -> Result<WriteBehind> {
        let config = self.config;
        config.validate()?;
        if config.openfga.store_id.is_empty() {
            return Err(Error::config(
                "openfga.store_id is not set; set FGA_STORE_ID or openfga.store_id in the config file",
            ));
        }
        let client = match self.client {
            Some(c) => c,
            None => config.openfga.client()?,
        };
        let store_id = config.openfga.store_id.clone();
        let model_id =
            (!config.openfga.model_id.is_empty()).then(|| config.openfga.model_id.clone());
        let model = if self.read_model {
            load_model(&client, &store_id, model_id.as_deref()).await?
        } else {
            None
        };
        let model_id = model_id.or_else(|| model.as_ref().map(|m| m.id().to_owned()));

        let cache = Arc::new(CheckCache::new(
            config.cache.capacity,
            config.cache.ttl,
            model.clone(),
        ));
        let (store, redis) = crate::buffer::open_store(&config, self.automatic_flush).await?;
        let sink: Option<crate::flush::Sink> = match (config.flush.mode, &redis) {
            _ if self.sink.is_some() => self.sink,
            (Mode::Queue, Some(r)) => Some(Arc::new(crate::queue::RedisJobs(r.clone()))),
            (Mode::Queue, None) => {
                return Err(Error::config(
                    "flush.mode = \"queue\" needs buffer.store = \"redis\"",
                ))
            }
            (Mode::Inline, _) => None,
        };
        let mut engine = Engine::new(
            store,
            client.fork()?,
            client,
            store_id,
            model_id,
            config.flush.clone(),
            cache,
            sink,
        );
        // Only where a transient letter fails the checks it can change
        // closed: the memory store's checks do not look at letters, so a
        // revoke given up there would let OpenFGA's stale tuple answer.
        if engine.store.shared() {
            engine.lone = crate::flush::LoneFailures::after(&config.queue.retry_schedule);
        }
        let engine = Arc::new(engine);
        let (commands, rx) = mpsc::channel(16);
        let (stop, stop_rx) = watch::channel(false);
        let flusher =
            flush::FlusherThread::spawn(engine.clone(), rx, stop_rx.clone(), self.automatic_flush)?;
        let mut tasks = Vec::new();
        if engine.store.events().is_some() {
            tasks.push(tokio::spawn(follow_events(engine.clone(), stop_rx.clone())));
        }
        let every = config.openfga.model_refresh;
        let follow_latest =
            config.openfga.model_id.is_empty() && self.read_model && !every.is_zero();
        // A model that could not be read at start (OpenFGA down, pinned or
        // not) is read again until it is: without it nothing is validated
        // and every pending op counts for every check.
        let missing = self.read_model && model.is_none();
        let wb = WriteBehind {
            inner: Arc::new(Handle {
                engine,
                config,
                model: arc_swap::ArcSwapOption::new(model),
                pinned_models: Mutex::default(),
                refreshing: tokio::sync::Mutex::default(),
                redis,
                validate_against_model: self.validate_against_model,
                read_model: self.read_model,
                automatic_flush: self.automatic_flush,
                commands,
                stop,
                flusher: Mutex::new(Some(flusher)),
                tasks: Mutex::new(tasks),
                shut_down: AtomicBool::new(false),
                ended: watch::channel(false).0,
                ending_by: std::sync::OnceLock::new(),
                #[cfg(feature = "test-util")]
                on_check: self.on_check,
            }),
        };
        if follow_latest || missing {
            let task = tokio::spawn(follow_model(
                Arc::downgrade(&wb.inner),
                every,
                follow_latest,
                stop_rx,
            ));
            wb.inner
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(task);
        }
        Ok(wb)
    }
}

/// How often a model that could not be read is read again, at most.
const MISSING_MODEL_RETRY: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the model again until the handle stops (or is dropped: it holds
/// the handle only weakly): every `every` to follow the store's latest
/// (`follow_latest`), and while none could be read yet, at least every
/// `MISSING_MODEL_RETRY`; a pinned model, once read, is not read again.
async fn follow_model(
    handle: std::sync::Weak<Handle>,
    every: std::time::Duration,
    follow_latest: bool,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let Some(loaded) = handle.upgrade().map(|h| h.model.load().is_some()) else {
            return;
        };
        let wait = match (loaded, follow_latest) {
            (true, true) => every,
            (true, false) => return,
            (false, _) if every.is_zero() => MISSING_MODEL_RETRY,
            (false, _) => every.min(MISSING_MODEL_RETRY),
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let Some(inner) = handle.upgrade() else {
            return;
        };
        if let Err(e) = (WriteBehind { inner }).refresh_model().await {
            let meanwhile = match loaded {
                true => "keeping the one in use",
                false => "still running without it (no model validation, every pending op counts for every check)",
            };
            tracing::warn!(error = %e, "cannot read the authorization model; {meanwhile}");
        }
    }
}

/// The pinned model, or the store's latest. A store without a model, or an
/// OpenFGA that cannot be reached at start, leaves fga-wb without one: checks
/// then treat every pending op as relevant (correct, just broader).
async fn load_model(
    client: &Client,
    store_id: &str,
    model_id: Option<&str>,
) -> Result<Option<Arc<Model>>> {
    match read_model(client, store_id, model_id).await {
        Ok(m) => Ok(m.map(|m| Arc::new(Model::new(&m)))),
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "cannot read the authorization model; running without it (broader cache invalidation, no model validation)");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// The model `model_id`, or the store's latest (`None` if it has none).
async fn read_model(
    client: &Client,
    store_id: &str,
    model_id: Option<&str>,
) -> Result<Option<crate::openfga::AuthorizationModel>> {
    match model_id {
        Some(id) => client
            .read_authorization_model(store_id, id)
            .await
            .map(Some),
        None => client.read_latest_authorization_model(store_id).await,
    }
}

/// Applies other processes' changes to this process's cache, and wakes
/// checks waiting for a revoke that another process (or a worker) applied.
/// Reconnects after a lost subscription, dropping the whole cache, since
/// changes may have been missed meanwhile.
async fn follow_events(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    loop {
        let Some(connect) = engine.store.events() else {
            return;
        };
        match connect.await {
            Ok(mut events) => {
                use futures::StreamExt;
                // Subscribed (again): what ended before was not heard, so
                // whoever waits for it looks again now.
                heard_finished(&engine);
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        ev = events.next() => match ev {
                            Some(StoreEvent::Finished) => heard_finished(&engine),
                            Some(StoreEvent::Jobs) => {}
                            Some(StoreEvent::All) => {
                                engine.cache.invalidate_all();
                                heard_finished(&engine);
                            }
                            None => break,
                        },
                    }
                }
            }
            // A handle being dropped closes its connections: not news.
            Err(_) if *stop.borrow() => return,
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to store events; retrying"),
        }
        engine.cache.invalidate_all();
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    }
}

/// What another process's "finished" message (or one that may have been
/// missed) tells this one: checks waiting for an op look again, and an
/// idle flusher looks for its ops that waited behind other writers'.
fn heard_finished(engine: &Engine) {
    engine.changed.send_modify(|v| *v += 1);
    engine
        .others_finished
        .store(true, std::sync::atomic::Ordering::Relaxed);
    // A busy pump looks again anyway when its own requests end.
    if engine.sleeping.load(std::sync::atomic::Ordering::Relaxed) {
        engine.wake_now();
    }
}

mod admin;
mod reads;

impl WriteBehind {
    /// A builder reading every setting from `config`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example() -> fga_wb::Result<()> {
    /// // config/fga-wb.toml (or FGA_WB_CONFIG), then FGA_* / FGA_WB_* variables.
    /// let config = fga_wb::Config::load(None)?;
    /// let wb = fga_wb::WriteBehind::builder(config).build().await?;
    /// # Ok(()) }
    /// ```
    pub fn builder(config: Config) -> Builder {
        Builder {
            config,
            client: None,
            validate_against_model: true,
            automatic_flush: true,
            read_model: true,
            sink: None,
            #[cfg(feature = "test-util")]
            on_check: None,
        }
    }

    /// Grants `relation` on `object` to `user`. Returns once the op is
    /// buffered; it reaches OpenFGA with the next flush. A tuple OpenFGA
    /// would refuse is refused here, with an error naming the field and the
    /// rule ([`Error::is_invalid_input`]), and nothing is buffered.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(wb: fga_wb::WriteBehind) -> fga_wb::Result<()> {
    /// wb.grant("user:anne", "editor", "document:roadmap").await?;
    /// // Derived relations see it at once (editor implies viewer here).
    /// assert!(wb.check("user:anne", "viewer", "document:roadmap").await?);
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(level = "debug", skip(self), err(Display))]
    pub async fn grant(&self, user: &str, relation: &str, object: &str) -> Result<()> {
        // enqueue validates it.
        self.enqueue(TupleKey::unvalidated(user, relation, object), Op::Grant)
            .await
    }

    /// Revokes `relation` on `object` from `user`. Returns once buffered;
    /// revokes are flushed at once, and until they are applied no check that
    /// could depend on them answers `true`. A tuple written with a condition
    /// is revoked by its user, relation and object alone, as OpenFGA
    /// deletes it.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(wb: fga_wb::WriteBehind) -> fga_wb::Result<()> {
    /// wb.revoke("user:anne", "editor", "document:roadmap").await?;
    /// // Never "allowed" from here on: an error means "not allowed" too.
    /// let allowed = wb.check("user:anne", "editor", "document:roadmap").await.unwrap_or(false);
    /// assert!(!allowed);
    /// # Ok(()) }
    /// ```
    #[tracing::instrument(level = "debug", skip(self), err(Display))]
    pub async fn revoke(&self, user: &str, relation: &str, object: &str) -> Result<()> {
        // enqueue validates it.
        self.enqueue(TupleKey::unvalidated(user, relation, object), Op::Revoke)
            .await
    }

    /// Grants a tuple that holds only while the named condition holds, with
    /// some of its parameters fixed by `context`.
    pub async fn grant_with_condition(
        &self,
        user: &str,
        relation: &str,
        object: &str,
        condition: &str,
        context: Option<Context>,
    ) -> Result<()> {
        let t = TupleKey::new(user, relation, object)?.with_condition(condition, context)?;
        self.enqueue(t, Op::Grant).await
    }

    /// Grants a tuple given whole (with or without a condition).
    pub async fn grant_tuple(&self, tuple: TupleKey) -> Result<()> {
        self.enqueue(tuple, Op::Grant).await
    }

    /// Revokes a tuple given whole. A condition on it is ignored: OpenFGA
    /// deletes by user, relation and object.
    pub async fn revoke_tuple(&self, mut tuple: TupleKey) -> Result<()> {
        tuple.condition = None;
        self.enqueue(tuple, Op::Revoke).await
    }

    async fn enqueue(&self, tuple: TupleKey, op: Op) -> Result<()> {
        self.ensure_flushing()?;
        match op {
            Op::Grant => {
                tuple.validate_for_write()?;
                // A guard, not a clone: no shared count to bump per op.
                let model = self.inner.model.load();
                match model
                    .as_deref()
                    .filter(|_| self.inner.validate_against_model)
                {
                    Some(m) => m.validate(&tuple)?,
                    None => tuple.refuse_slow_numbers()?,
                }
            }
            // As OpenFGA takes a delete: its syntax, not the model (a tuple
            // an earlier model admitted can still be deleted).
            Op::Revoke => tuple.validate_for_delete()?,
        }
        let e = &self.inner.engine;
        let mut started = None;
        let mut flushed_for_room = false;
        let pushed = loop {
            let pushed = match e.store.push_at_once(&tuple, op) {
                Some(p) => p,
                None => e.store.push(&tuple, op).await,
            };
            match pushed {
                Ok(p) => break p,
                Err(err) if err.is_buffer_full() => {
                    let started = *started.get_or_insert_with(Instant::now);
                    self.make_room(started, &mut flushed_for_room).await?;
                }
                Err(err) => return Err(err),
            }
        };
        // A push that raced shutdown() got in before the store closed: the
        // memory store's drain counts it (see `Store::close`), a shared
        // store keeps it. Acknowledged either way.
        // After the push, never before: see cache.rs.
        e.cache.invalidate_for(&tuple);
        count!(e.stats, acknowledged, "fga_wb_ops_acknowledged_total", 1);
        metrics::gauge!("fga_wb_pending_ops").set(pushed.pending as f64);
        if pushed.coalesced {
            count!(e.stats, coalesced, "fga_wb_ops_coalesced_total", 1);
        }
        if op == Op::Revoke {
            e.note_revokes([(tuple.clone(), pushed.seq)]);
        }
        e.nudge(op == Op::Revoke, pushed.pending);
        Ok(())
    }

    /// Applies the overflow policy once; `Ok` means "try the push again".
    async fn make_room(&self, started: Instant, flushed: &mut bool) -> Result<()> {
        let cfg = &self.inner.config.buffer;
        let e = &self.inner.engine;
        // A flusher stopped on a panic makes no room, ever: its own error.
        self.flusher_failed()?;
        // While flushing is stopped (OpenFGA refused the credentials, does
        // not know the store, or something else answered) this process
        // makes no room until it looks again: the error says so, not
        // "raise buffer.capacity".
        let full = |waited| {
            Error::new(Kind::BufferFull {
                capacity: cfg.capacity,
                waited,
                stopped: e.stats.stopped(),
            })
        };
        // A job sink, not the configured mode: a handle on a test queue
        // sends its flushes to jobs too, which hold their room as real
        // ones do.
        let queued = e.sink.is_some();
        match cfg.overflow {
            Overflow::Reject => Err(full(None)),
            Overflow::Flush if !*flushed => {
                *flushed = true;
                // Bounded as a wait for room is: an OpenFGA that accepts
                // connections and never answers held the call for each
                // request's timeout and retries, and a hold after them.
                match tokio::time::timeout_at(started + cfg.block_timeout, self.flush()).await {
                    Ok(flushed) => flushed.map(|_| ()),
                    Err(_) => Err(full(Some(started.elapsed()))),
                }
            }
            // In queue mode a flush only queues the ops, and queued ops
            // hold their room until a worker writes them: wait for that.
            Overflow::Flush if !queued => Err(full(Some(started.elapsed()))),
            // Waits while flushing is stopped too: chunks already under
            // way, the flusher's own next look, a flush() or a clear() of
            // another caller, or other processes may still make room.
            Overflow::Flush | Overflow::Block => {
                let mut changed = e.changed.subscribe();
                e.flush_wanted
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                e.wake_now();
                let deadline = started + cfg.block_timeout;
                // Other processes sharing the store make room without
                // telling us: look again now and then.
                let until = deadline.min(Instant::now() + std::time::Duration::from_millis(100));
                match tokio::time::timeout_at(until, changed.changed()).await {
                    Ok(Ok(())) => Ok(()),
                    _ if Instant::now() < deadline => Ok(()),
                    _ => Err(full(Some(started.elapsed()))),
                }
            }
        }
    }

    /// Writes everything acknowledged so far to OpenFGA and reports what
    /// happened. Also resumes flushing after an auth failure was fixed.
    ///
    /// Fails with OpenFGA's error ([`Error::is_auth`], [`Error::is_not_found`])
    /// when the server refused the credentials or does not know the store:
    /// nothing can be written until that is fixed, and every op is kept. A
    /// transient failure (OpenFGA down, 5xx, 429) is not an error here: the
    /// report's `error` says what happened, the ops stay pending and are
    /// retried by themselves. While a pause OpenFGA asked for
    /// (`Retry-After`) runs, it sends nothing and returns at once so.
    ///
    /// With the Redis store, "everything" is what this process can reach:
    /// the ops pending when it looks (its own and other processes'), written
    /// here; ops another process was already writing stay that process's,
    /// and the call does not wait for them (should that process die, they
    /// come back as pending after its lease and are written by whoever
    /// flushes then). In queue mode it returns once the ops are in jobs.
    /// To wait until every op acknowledged before a moment is in OpenFGA,
    /// whoever writes it, poll [`unfinished`](Self::unfinished) with the
    /// mark from [`last_acknowledged`](Self::last_acknowledged), as
    /// `fga-wb flush --wait` does.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn flush(&self) -> Result<FlushReport> {
        self.flush_to(None).await
    }

    /// As [`flush`](Self::flush), for the ops acknowledged up to `seq`
    /// (from [`last_acknowledged`](Self::last_acknowledged)) only: it does
    /// not reach for ops acknowledged later, so a flush that waits for a
    /// moment's ops under steady traffic does not cut everyone's newest
    /// ops into small requests or jobs (`fga-wb flush --wait`). A flush
    /// this handle already has under way (its own triggers, another
    /// `flush()`) may still write them, and the call returns once that
    /// ends. An op folded into a pending one from before keeps its place
    /// in line, and is written.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn flush_up_to(&self, seq: u64) -> Result<FlushReport> {
        self.flush_to(Some(seq)).await
    }

    async fn flush_to(&self, up_to: Option<u64>) -> Result<FlushReport> {
        let (tx, rx) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Flush(tx, up_to))
            .await
            .is_err()
        {
            return Err(self.flusher_gone().await);
        }
        let Ok(report) = rx.await else {
            return Err(self.flusher_gone().await);
        };
        if report.error.is_some() {
            if let Some(halt) = self.inner.engine.stats.halted() {
                return Err(halt);
            }
        }
        Ok(report)
    }

    /// Counts of pending ops.
    pub async fn pending(&self) -> Result<Pending> {
        self.inner.engine.store.pending().await
    }

    /// The engine, for the test doubles.
    #[cfg(feature = "test-util")]
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// Stops the flusher, then flushes until everything is applied or
    /// `flush.shutdown_deadline` passes, and reports what is left. Later
    /// calls on any clone fail with [`Error::is_shutdown`]; a second
    /// `shutdown()` (or `close()`) fails only once the first has ended. A grant or
    /// revoke under way when it began (one waiting for room, say) is either
    /// buffered and acknowledged, or (memory store) fails as shut down with
    /// nothing buffered: it never replaces an acknowledged op on its tuple
    /// and is then disowned. With the memory store, one buffered is drained
    /// with the rest; with the Redis store, one that lands after the drain
    /// began is left there for the other processes.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(wb: fga_wb::WriteBehind) -> fga_wb::Result<()> {
    /// let report = wb.shutdown().await?;
    /// if report.left.total + report.left.in_flight > 0 {
    ///     eprintln!("{} ops were not written", report.left.total + report.left.in_flight);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn shutdown(&self) -> Result<ShutdownReport> {
        let deadline = Instant::now() + self.inner.config.flush.shutdown_deadline;
        self.stop_taking_ops(deadline).await?;
        // The flusher drains until the deadline and then stops; the other
        // tasks (the event follower) stop at once.
        let (reply, answer) = oneshot::channel();
        // A little past the deadline: the flusher answers at it. The send
        // counts against it too: commands queued before this one (flushes
        // of callers at a full buffer, on a slow Redis) may hold the
        // channel past the deadline.
        let grace = deadline + std::time::Duration::from_secs(1);
        let unanswered = |what: &str| {
            (
                FlushReport {
                    error: Some(what.into()),
                    ..Default::default()
                },
                true,
            )
        };
        let sent = tokio::time::timeout_at(
            grace,
            self.inner
                .commands
                .send(Command::Shutdown { deadline, reply }),
        )
        .await;
        let (flushed, cut_off) = match sent {
            Ok(Ok(())) => match tokio::time::timeout_at(grace, answer).await {
                Ok(Ok(r)) => r,
                _ => unanswered("the flusher did not answer by the deadline"),
            },
            // The flusher is gone.
            Ok(Err(_)) => (FlushReport::default(), false),
            Err(_) => unanswered("the shutdown could not be handed to the flusher by the deadline"),
        };
        self.stop_and_release(cut_off).await;
        let e = &self.inner.engine;
        let left = match e.store.pending().await {
            Ok(left) => left,
            Err(err) => {
                self.inner.ended.send_replace(true);
                return Err(err);
            }
        };
        // Requests running at the deadline may still have finished within
        // its grace: the report's error is for what is left, not for a
        // deadline that passed with nothing lost.
        let mut flushed = flushed;
        if let Some(failed) = e.failed.get() {
            flushed.error = Some(failed.to_string());
        }
        if left.total.saturating_add(left.in_flight) == 0 {
            flushed.error = None;
        } else if e.store.shared() && flushed.error.is_none() {
            // Other processes' and queued jobs' too: kept, theirs to write.
            tracing::info!(
                pending = left.total,
                in_flight = left.in_flight,
                "the shared store still holds ops; other processes and workers write them"
            );
        } else {
            tracing::warn!(
                pending = left.total,
                in_flight = left.in_flight,
                "shutdown left ops unflushed"
            );
        }
        // Last: a second call waiting for this one may end the process.
        self.inner.ended.send_replace(true);
        Ok(ShutdownReport { flushed, left })
    }

    /// Stops without writing anything more, for a handle through which
    /// nothing was buffered, or whose ops others write (an operator's
    /// tool, a process that only checks): with the Redis store, what it
    /// holds goes back to the other processes at once and it stops
    /// counting as a live writer, instead of when its lease ends (until
    /// then, after Redis drops a connection, other processes' checks wait
    /// for its heartbeat). Ops pending in a memory store are lost, as when
    /// the handle is dropped: [`WriteBehind::shutdown`] writes them. Takes
    /// a second or two at most, plus a Redis call or two (each bounded by
    /// the connection's 30 s response timeout); a Write still under way is
    /// cut off, and its ops stay this process's until it can no longer
    /// land (`flush.unknown_outcome_hold`), as do those of a Write whose
    /// outcome is unknown whose hold has not ended, and (inline) what a
    /// take under way for more than 300 ms took. Later calls on any clone fail
    /// with [`Error::is_shutdown`]; one made while a `shutdown()` or
    /// `close()` runs fails once that has ended (by its deadline and 5 s
    /// at most).
    pub async fn close(&self) -> Result<()> {
        // Its steps are bounded by a second each.
        let by = Instant::now() + std::time::Duration::from_secs(3);
        self.stop_taking_ops(by).await?;
        let (reply, answer) = oneshot::channel();
        // The flusher answers between two steps: a second is ample.
        let ample = std::time::Duration::from_secs(1);
        let cut_off = match self
            .inner
            .commands
            .send_timeout(Command::Close(reply), ample)
            .await
        {
            Ok(()) => tokio::time::timeout(ample, answer)
                .await
                .map_or(true, |r| r.unwrap_or(true)),
            // The flusher is gone: it took nothing it still holds (after
            // a panic, a Write it cut off noted its hold).
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => true,
        };
        self.stop_and_release(cut_off).await;
        self.inner.warn_unwritten("closed without shutdown()");
        self.inner.ended.send_replace(true);
        Ok(())
    }

    /// The first step of `shutdown` and `close` (an error if either ran
    /// before): later calls fail as shut down, and the store is closed
    /// before the flusher is told, so a grant or revoke racing this is in
    /// by then, acknowledged and counted by what follows (the drain, or the
    /// warning of what is left unwritten), or refused untouched: it never
    /// folds into an acknowledged op and is then disowned.
    ///
    /// A later call fails only once the first has ended (or could have:
    /// `by`, the first's deadline, and a few seconds more, also when the
    /// first's future was dropped), so that a caller that exits on its
    /// error (a signal hook's shutdown and `main`'s) does not cut the first
    /// one's drain short.
    async fn stop_taking_ops(&self, by: Instant) -> Result<()> {
        if self.inner.shut_down.swap(true, Ordering::SeqCst) {
            // Set right after the swap by the first call: a moment to wait.
            let first = loop {
                if let Some(f) = self.inner.ending_by.get() {
                    break *f;
                }
                tokio::task::yield_now().await;
            };
            let limit = first + std::time::Duration::from_secs(5);
            let mut ended = self.inner.ended.subscribe();
            let _ = tokio::time::timeout_at(limit, ended.wait_for(|e| *e)).await;
            return Err(Error::new(Kind::Shutdown));
        }
        let _ = self.inner.ending_by.set(by);
        self.inner.engine.store.close();
        Ok(())
    }

    /// Stops the flusher and the other tasks, and gives what this process
    /// still holds back to the others now, unless a Write was cut off in
    /// flight or a hold has not ended (then when they can no longer land:
    /// see `Engine::release_lease`).
    async fn stop_and_release(&self, cut_off: bool) {
        let _ = self.inner.stop.send(true);
        let flusher = self
            .inner
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(f) = flusher {
            f.join(std::time::Duration::from_secs(1)).await;
        }
        let tasks =
            std::mem::take(&mut *self.inner.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        for mut task in tasks {
            if tokio::time::timeout(std::time::Duration::from_secs(1), &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        self.inner.engine.release_lease(cut_off).await;
    }

    fn ensure_open(&self) -> Result<()> {
        if self.inner.shut_down.load(Ordering::Relaxed) {
            return Err(Error::new(Kind::Shutdown));
        }
        Ok(())
    }

    /// As `ensure_open`, and fails after the flusher stopped on a panic:
    /// for calls that give it ops to write (checks go on: they need no
    /// flusher).
    fn ensure_flushing(&self) -> Result<()> {
        self.ensure_open()?;
        self.flusher_failed()
    }

    /// The flusher's panic, if it stopped on one.
    fn flusher_failed(&self) -> Result<()> {
        match self.inner.engine.failed.get() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    /// Why the flusher no longer answers: it stopped on a panic, or the
    /// handle was shut down. Unless shut down, it waits a moment for the
    /// flusher's thread to end: a reply dropped as a panic unwinds may
    /// come before the panic is noted.
    async fn flusher_gone(&self) -> Error {
        let e = &self.inner.engine;
        if e.failed.get().is_none() && !self.inner.shut_down.load(Ordering::Relaxed) {
            let mut ended = e.flusher_ended.subscribe();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                ended.wait_for(|done| *done),
            )
            .await;
        }
        match e.failed.get() {
            Some(e) => e.clone(),
            None => Error::new(Kind::Shutdown),
        }
    }

    /// This process's counters, read without waiting (for the Redis store,
    /// [`WriteBehind::status`] reports the store-wide ones).
    pub fn local_totals(&self) -> crate::Totals {
        self.inner.engine.stats.totals()
    }

    /// The id of the authorization model in use, if one was found.
    pub fn model_id(&self) -> Option<String> {
        self.inner.engine.model_id.get()
    }

    /// Reads the authorization model again (`openfga.model_id`, or the
    /// store's latest when that is empty) and, if it changed, switches to it:
    /// validation of new grants and revokes, the dependencies checks wait
    /// for, and the model id on checks and writes (ops already buffered are
    /// written under it). Every cached answer is dropped. Returns the model
    /// id now in use. Runs every `openfga.model_refresh` on its own when
    /// `openfga.model_id` is empty, and (pinned or not) until a model is
    /// read when none could be at start. Refreshes run one at a time: a
    /// call waits for one under way (its model read) first.
    pub async fn refresh_model(&self) -> Result<Option<String>> {
        self.ensure_open()?;
        let e = &self.inner.engine;
        let pinned = &self.inner.config.openfga.model_id;
        let pinned = (!pinned.is_empty()).then_some(pinned.as_str());
        let _one_at_a_time = self.inner.refreshing.lock().await;
        // The handle may have closed while a refresh under way held it.
        self.ensure_open()?;
        let found = read_model(&e.client, &e.store_id, pinned).await?;
        let Some(found) = found else {
            return Ok(e.model_id.get());
        };
        // The same id is news when its model could not be read before (a
        // pinned id is known from the start).
        if e.model_id.get().as_deref() == Some(found.id.as_str())
            && self.inner.model.load().is_some()
        {
            return Ok(Some(found.id));
        }
        let model = Arc::new(Model::new(&found));
        e.cache.switch_model(Some(&model), || {
            self.inner.model.store(Some(model.clone()));
            e.model_id.set(Some(found.id.clone()));
        });
        tracing::info!(model_id = %found.id, "following a new authorization model");
        Ok(Some(found.id))
    }
}

impl Handle {
    /// The analysed model in use, if one was read.
    fn model(&self) -> Option<Arc<Model>> {
        self.model.load_full()
    }

    /// The analysed model `id`, read from OpenFGA the first time; callers
    /// asking for it meanwhile share that one read, and its failure (a
    /// failed read is forgotten, so the next caller reads again).
    async fn pinned_model(&self, id: &str) -> Result<Arc<Model>> {
        let read = {
            let mut models = self.pinned_models.lock().unwrap_or_else(|p| p.into_inner());
            // A handful in practice; bounded all the same.
            if models.len() >= 16 && !models.contains_key(id) {
                models.clear();
            }
            let e = &self.engine;
            models
                .entry(id.to_owned())
                .or_insert_with(|| {
                    let (client, store_id, id) =
                        (e.client.clone(), e.store_id.clone(), id.to_owned());
                    // A task of its own: it goes on if every waiter gives
                    // up, and a panic in it is an error, forgotten as one.
                    let task = tokio::spawn(async move {
                        let found = client.read_authorization_model(&store_id, &id).await?;
                        Ok(Arc::new(Model::new(&found)))
                    });
                    let read: futures::future::BoxFuture<'static, Result<Arc<Model>>> =
                        Box::pin(async move {
                            task.await.unwrap_or_else(|e| {
                                Err(Error::internal(format!(
                                    "reading a pinned model failed: {e}"
                                )))
                            })
                        });
                    futures::FutureExt::shared(read)
                })
                .clone()
        };
        let got = read.clone().await;
        if got.is_err() {
            let mut models = self.pinned_models.lock().unwrap_or_else(|p| p.into_inner());
            if models.get(id).is_some_and(|r| r.ptr_eq(&read)) {
                models.remove(id);
            }
        }
        got
    }
}

/// A read of a pinned model, shared by the callers waiting for it.
type PinnedRead = futures::future::Shared<futures::future::BoxFuture<'static, Result<Arc<Model>>>>;

impl Drop for Handle {
    fn drop(&mut self) {
        // The flusher's thread ends when it sees this.
        let _ = self.stop.send(true);
        for task in self
            .tasks
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
        if *self.ended.borrow() {
            return;
        }
        self.warn_unwritten(if self.shut_down.load(Ordering::SeqCst) {
            "dropped with its shutdown() or close() cut short"
        } else {
            "dropped without shutdown()"
        });
    }
}

impl Handle {
    /// A memory store's ops die with the handle: says how many, if any.
    fn warn_unwritten(&self, how: &str) {
        if self.config.buffer.store != StoreKind::Memory {
            return;
        }
        let n = self
            .engine
            .store
            .pending_now()
            .map_or(0, |p| p.total.saturating_add(p.in_flight));
        if n > 0 {
            tracing::warn!(
                pending = n,
                "WriteBehind {how}: {n} acknowledged ops were not written to OpenFGA and are lost"
            );
        }
    }
}

#[cfg(all(test, feature = "test-util"))]
mod tests {
    use super::*;
    use crate::buffer::Taken;
    use crate::testing::viewers;
    use futures::future::BoxFuture;

    /// Hands nothing on: panics, as a bug in the flusher would.
    struct Panicking;

    impl flush::JobSink for Panicking {
        fn enqueue<'a>(
            &'a self,
            _: &'a str,
            _: Option<&'a str>,
            _: &'a [Taken],
        ) -> BoxFuture<'a, Result<()>> {
            Box::pin(async { panic!("a bug in the job sink") })
        }
    }

    /// A flusher that stops on a panic is reported: `flush()` and new ops
    /// fail with an error that says so and what to do, `status` shows it,
    /// and checks go on. Before, grants went on being acknowledged with
    /// nothing to write them, `flush()` said the handle was shut down, and
    /// `status` showed nothing.
    #[tokio::test]
    async fn a_flusher_that_panicked_is_reported_and_takes_no_more_ops() {
        let fga = viewers().await;
        let wb = WriteBehind::builder(fga.config())
            .job_sink(Arc::new(Panicking))
            .automatic_flush(false)
            .build()
            .await
            .unwrap();
        wb.grant("user:anne", "viewer", "document:1").await.unwrap();
        let e = wb.flush().await.unwrap_err();
        // Again, at once (not after a wait for the flusher's end).
        let again = tokio::time::timeout(std::time::Duration::from_secs(1), wb.flush()).await;
        assert!(
            matches!(&again, Ok(Err(e)) if e.is_flusher_stopped()),
            "{again:?}"
        );
        assert!(!e.is_shutdown(), "{e}");
        assert!(e.is_flusher_stopped(), "{e}");
        assert!(
            e.to_string().contains("the flusher stopped on a panic"),
            "{e}"
        );
        assert!(e.to_string().contains("restart the process"), "{e}");
        let stopped = wb.status().await.unwrap().flushing_stopped;
        assert!(
            stopped.as_deref().is_some_and(|s| s.contains("panic")),
            "{stopped:?}"
        );
        let e = wb
            .grant("user:bob", "viewer", "document:1")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("panic"), "{e}");
        assert!(wb.check("user:anne", "viewer", "document:1").await.unwrap());
        // A letter replayed is an op to write too.
        let e = wb.replay_dead_letters(None).await.unwrap_err();
        assert!(e.is_flusher_stopped(), "{e}");
    }

    /// What a flusher that panicked took from Redis goes back to the other
    /// processes sharing the store, which write it. Before, this process's
    /// heartbeat went on renewing its lease (it also guards its checks),
    /// and the ops stayed its own, unwritten, until it exited.
    #[cfg(feature = "redis")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_a_flusher_that_panicked_took_from_redis_goes_to_other_processes() {
        let fga = viewers().await;
        let mut c = fga.config();
        c.buffer.store = StoreKind::Redis;
        // Never a silent skip: without the test Redis this fails.
        c.redis.url = std::env::var("FGA_WB_TEST_REDIS_URL").expect(
            "FGA_WB_TEST_REDIS_URL: this test needs the test Redis (scripts/test starts it)",
        );
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        c.redis.key_prefix = format!("fga-wb-unit-panic-{nanos}");
        let panicked = WriteBehind::builder(c.clone())
            .job_sink(Arc::new(Panicking))
            .automatic_flush(false)
            .build()
            .await
            .unwrap();
        panicked
            .grant("user:anne", "viewer", "document:1")
            .await
            .unwrap();
        let e = panicked.flush().await.unwrap_err();
        assert!(e.is_flusher_stopped(), "{e}");
        // Another process, writing inline: it writes what the first took.
        let other = WriteBehind::builder(c).build().await.unwrap();
        let limit = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !fga.has("user:anne", "viewer", "document:1") {
            assert!(
                std::time::Instant::now() < limit,
                "still held by the flusher that panicked: {:?}",
                other.status().await.map(|s| s.pending)
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        // And the first process still answers checks.
        assert!(panicked
            .check("user:anne", "viewer", "document:1")
            .await
            .unwrap());
        // Its stop shows in the others' status: it counts as a live
        // application, and flushes nothing. Not as a worker's.
        let status = other.status().await.unwrap();
        assert!(
            status
                .flushing_stopped
                .as_deref()
                .is_some_and(|s| s.contains("panic")),
            "{status:?}"
        );
        assert_eq!(status.workers_stopped, None);
        other.shutdown().await.unwrap();
    }
}
