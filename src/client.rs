//! The handle applications hold: [`WriteBehind`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::buffer::{key_of, DeadLetter, Pending, Replayed, StoreEvent};
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
    model: std::sync::RwLock<Option<Arc<Model>>>,
    /// The Redis store, when the buffer is there (its queue, for status).
    redis: Option<Arc<crate::buffer::redis::RedisStore>>,
    validate_against_model: bool,
    commands: mpsc::Sender<Command>,
    stop: watch::Sender<bool>,
    /// The flusher's thread; taken by shutdown.
    flusher: Mutex<Option<flush::FlusherThread>>,
    /// For a shared store, the listener for other processes' changes.
    tasks: Mutex<Vec<JoinHandle<()>>>,
    shut_down: AtomicBool,
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
pub struct ShutdownReport {
    /// What the final flushes did.
    pub flushed: FlushReport,
    /// What is still pending (or in flight) after the deadline; with the
    /// memory store, these ops are lost when the process exits.
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
        let (store, redis) = crate::buffer::open_store(&config).await?;
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
        let engine = Arc::new(Engine::new(
            store,
            client.fork()?,
            client,
            store_id,
            model_id,
            config.flush.clone(),
            cache,
            sink,
        ));
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
        let wb = WriteBehind {
            inner: Arc::new(Handle {
                engine,
                config,
                model: std::sync::RwLock::new(model),
                redis,
                validate_against_model: self.validate_against_model,
                commands,
                stop,
                flusher: Mutex::new(Some(flusher)),
                tasks: Mutex::new(tasks),
                shut_down: AtomicBool::new(false),
                #[cfg(feature = "test-util")]
                on_check: self.on_check,
            }),
        };
        if follow_latest {
            let task = tokio::spawn(follow_model(Arc::downgrade(&wb.inner), every, stop_rx));
            wb.inner
                .tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(task);
        }
        Ok(wb)
    }
}

/// Looks for a newer latest model every `every` until the handle stops (or
/// is dropped: it holds the handle only weakly).
async fn follow_model(
    handle: std::sync::Weak<Handle>,
    every: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let Some(inner) = handle.upgrade() else {
            return;
        };
        if let Err(e) = (WriteBehind { inner }).refresh_model().await {
            tracing::warn!(error = %e, "cannot read the authorization model; keeping the one in use");
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
    let found = match model_id {
        Some(id) => client
            .read_authorization_model(store_id, id)
            .await
            .map(Some),
        None => client.read_latest_authorization_model(store_id).await,
    };
    match found {
        Ok(m) => Ok(m.map(|m| Arc::new(Model::new(&m)))),
        Err(e) if e.is_transient() => {
            tracing::warn!(error = %e, "cannot read the authorization model; running without it (broader cache invalidation, no model validation)");
            Ok(None)
        }
        Err(e) => Err(e),
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
            Ok(mut events) => loop {
                use futures::StreamExt;
                tokio::select! {
                    _ = stop.changed() => return,
                    ev = events.next() => match ev {
                        Some(StoreEvent::Finished) => {
                            engine.changed.send_modify(|v| *v += 1);
                            engine.others_finished.store(true, std::sync::atomic::Ordering::Relaxed);
                            // A busy pump looks again anyway when its own
                            // requests end.
                            if engine.sleeping.load(std::sync::atomic::Ordering::Relaxed) {
                                engine.wake_now();
                            }
                        }
                        Some(StoreEvent::Jobs) => {}
                        Some(StoreEvent::All) => {
                            engine.cache.invalidate_all();
                            engine.changed.send_modify(|v| *v += 1);
                        }
                        None => break,
                    },
                }
            },
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

/// What a check needs after looking at the cache and the pending ops.
/// Most pending grants a `read` merges; more make it flush first.
const READ_PENDING_MAX: usize = 1000;

/// Whether a tuple matches a Read filter (`type:` matches every object of
/// the type).
fn read_matches(filter: &ReadFilter, t: &TupleKey) -> bool {
    let object_ok = match filter.object.as_deref() {
        None | Some("") => true,
        Some(o) if o.ends_with(':') => t.object.starts_with(o),
        Some(o) => t.object == o,
    };
    object_ok
        && filter
            .user
            .as_deref()
            .is_none_or(|u| u.is_empty() || t.user == u)
        && filter
            .relation
            .as_deref()
            .is_none_or(|r| r.is_empty() || t.relation == r)
}

/// Adds pending grants to a request's contextual tuples, except those the
/// caller already sent (OpenFGA refuses a tuple twice).
fn add_grants(contextual: &mut Vec<TupleKey>, grants: Vec<TupleKey>) {
    for g in grants {
        let dup = contextual
            .iter()
            .any(|c| c.user == g.user && c.relation == g.relation && c.object == g.object);
        if !dup {
            contextual.push(g);
        }
    }
}

/// Where a batch check's answer goes: its index, cache key, generation, and
/// where the pending grants start in its contextual tuples.
type Slot = (usize, Option<String>, Generation, usize);

// Built and consumed at once, never stored in bulk: boxing the request
// would only add an allocation per check.
#[allow(clippy::large_enum_variant)]
enum Prepared {
    /// Answered without OpenFGA.
    Answer(bool),
    /// Ask OpenFGA this, then cache the answer under `generation` if `key`.
    /// Contextual tuples from `ours` on are pending grants fga-wb added.
    Ask {
        request: CheckRequest,
        key: Option<String>,
        generation: Generation,
        ours: usize,
    },
}

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
        self.enqueue(TupleKey::new(user, relation, object)?, Op::Grant)
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
        self.enqueue(TupleKey::new(user, relation, object)?, Op::Revoke)
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
        self.ensure_open()?;
        tuple.validate_for_write()?;
        if self.inner.validate_against_model {
            if let Some(m) = self.inner.model() {
                match op {
                    Op::Grant => m.validate(&tuple)?,
                    Op::Revoke => m.validate_revoke(&tuple)?,
                }
            }
        }
        let e = &self.inner.engine;
        let started = Instant::now();
        let mut flushed_for_room = false;
        let pushed = loop {
            match e.store.push(&tuple, op).await {
                Ok(p) => break p,
                Err(err) if err.is_buffer_full() => {
                    self.make_room(started, &mut flushed_for_room).await?;
                }
                Err(err) => return Err(err),
            }
        };
        // After the push, never before: see cache.rs.
        e.cache.invalidate_for(&tuple);
        count!(e.stats, acknowledged, "fga_wb_ops_acknowledged_total", 1);
        metrics::gauge!("fga_wb_pending_ops").set(pushed.pending as f64);
        if pushed.coalesced {
            count!(e.stats, coalesced, "fga_wb_ops_coalesced_total", 1);
        }
        e.nudge(op == Op::Revoke, pushed.pending);
        Ok(())
    }

    /// Applies the overflow policy once; `Ok` means "try the push again".
    async fn make_room(&self, started: Instant, flushed: &mut bool) -> Result<()> {
        let cfg = &self.inner.config.buffer;
        let full = |waited| {
            Error::new(Kind::BufferFull {
                capacity: cfg.capacity,
                waited,
            })
        };
        match cfg.overflow {
            Overflow::Reject => Err(full(None)),
            Overflow::Flush if *flushed => Err(full(Some(started.elapsed()))),
            Overflow::Flush => {
                *flushed = true;
                self.flush().await?;
                Ok(())
            }
            Overflow::Block => {
                let mut changed = self.inner.engine.changed.subscribe();
                self.inner
                    .engine
                    .flush_wanted
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                self.inner.engine.wake_now();
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

    /// Whether `user` has `relation` on `object`, counting every acknowledged
    /// grant and revoke.
    ///
    /// Fails closed with an error for which [`Error::is_stale_check`] is true
    /// when a pending revoke this check could depend on is not applied within
    /// `check.revoke_wait_timeout`. Treat any error as "not allowed".
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(wb: fga_wb::WriteBehind) {
    /// let allowed = match wb.check("user:anne", "viewer", "document:roadmap").await {
    ///     Ok(a) => a,
    ///     Err(e) => {
    ///         tracing::warn!(error = %e, "check failed; denying");
    ///         false
    ///     }
    /// };
    /// # let _ = allowed; }
    /// ```
    #[tracing::instrument(level = "debug", skip(self), err(Display))]
    pub async fn check(&self, user: &str, relation: &str, object: &str) -> Result<bool> {
        self.observed(user, relation, object);
        if let Some(answer) = self.cached(user, relation, object) {
            return Ok(answer);
        }
        self.ask(&CheckRequest::new(user, relation, object)).await
    }

    #[cfg(feature = "test-util")]
    fn observed(&self, user: &str, relation: &str, object: &str) {
        if let Some(hook) = &self.inner.on_check {
            hook(user, relation, object);
        }
    }

    #[cfg(not(feature = "test-util"))]
    fn observed(&self, _user: &str, _relation: &str, _object: &str) {}

    /// The hot path of a cache hit, without allocating a request: only for
    /// a store no other process writes to (a shared store needs a round trip
    /// to Redis first).
    fn cached(&self, user: &str, relation: &str, object: &str) -> Option<bool> {
        let e = &self.inner.engine;
        if self.inner.shut_down.load(Ordering::Relaxed) || e.store.shared() {
            return None;
        }
        crate::tuple::validate_user(user).ok()?;
        crate::tuple::validate_relation(relation).ok()?;
        crate::tuple::validate_object(object).ok()?;
        let ty = object.split_once(':').map_or(object, |(t, _)| t);
        let generation = (e.cache.generation(ty, relation), 0);
        let key = format!("{object}#{relation}@{user}");
        let answer = e.cache.get(&key, generation)?;
        count!(e.stats, cache_hits, "fga_wb_cache_hits_total", 1);
        Some(answer)
    }

    /// A check with context, contextual tuples or a consistency preference.
    /// Checks with context or contextual tuples are not cached.
    pub async fn check_request(&self, req: &CheckRequest) -> Result<bool> {
        self.observed(&req.user, &req.relation, &req.object);
        self.ask(req).await
    }

    async fn ask(&self, req: &CheckRequest) -> Result<bool> {
        match self.prepare(req).await? {
            Prepared::Answer(a) => Ok(a),
            Prepared::Ask {
                request,
                key,
                generation,
                ours,
            } => {
                let e = &self.inner.engine;
                let answer = match e.client.check(&e.store_id, &request).await {
                    Err(err)
                        if err.is_invalid_input() && request.contextual_tuples.len() > ours =>
                    {
                        return self.without_refused_grants(request, ours).await;
                    }
                    answer => answer?,
                };
                if let Some(k) = key {
                    e.cache.insert(k, answer, generation);
                }
                Ok(answer)
            }
        }
    }

    /// Many checks at once, with the guarantees of [`WriteBehind::check_request`]
    /// each. Checks are prepared concurrently; those the cache cannot answer
    /// go to OpenFGA's BatchCheck (50 per request, a few requests at once),
    /// grouped by consistency since OpenFGA takes one per request. Each
    /// answer stands alone.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn example(wb: fga_wb::WriteBehind) -> fga_wb::Result<()> {
    /// use fga_wb::openfga::CheckRequest;
    /// let answers = wb
    ///     .batch_check(&[
    ///         CheckRequest::new("user:anne", "viewer", "document:1"),
    ///         CheckRequest::new("user:anne", "viewer", "document:2"),
    ///     ])
    ///     .await?;
    /// let visible: Vec<bool> = answers.into_iter().map(|a| a.unwrap_or(false)).collect();
    /// # let _ = visible; Ok(()) }
    /// ```
    pub async fn batch_check(&self, checks: &[CheckRequest]) -> Result<Vec<Result<bool>>> {
        use futures::StreamExt;
        /// Checks prepared at once (each may be a Redis round trip).
        const PREPARING: usize = 16;
        for c in checks {
            self.observed(&c.user, &c.relation, &c.object);
        }
        let prepared: Vec<Result<Prepared>> = futures::stream::iter(checks)
            .map(|c| self.prepare(c))
            .buffered(PREPARING)
            .collect()
            .await;
        let mut out: Vec<Option<Result<bool>>> = Vec::with_capacity(checks.len());
        // consistency -> (requests, (index, cache key, generation))
        let mut groups: Vec<(Consistency, Vec<CheckRequest>, Vec<Slot>)> = Vec::new();
        for (i, p) in prepared.into_iter().enumerate() {
            match p {
                Ok(Prepared::Answer(a)) => out.push(Some(Ok(a))),
                Ok(Prepared::Ask {
                    request,
                    key,
                    generation,
                    ours,
                }) => {
                    out.push(None);
                    let g = match groups.iter().position(|g| g.0 == request.consistency) {
                        Some(g) => g,
                        None => {
                            groups.push((request.consistency, Vec::new(), Vec::new()));
                            groups.len() - 1
                        }
                    };
                    groups[g].1.push(request);
                    groups[g].2.push((i, key, generation, ours));
                }
                Err(e) => out.push(Some(Err(e))),
            }
        }
        let e = &self.inner.engine;
        let model_id = e.model_id.get();
        let sent = groups.iter().map(|(consistency, asks, _)| {
            e.client
                .batch_check(&e.store_id, asks, model_id.as_deref(), *consistency)
        });
        let answers = futures::future::try_join_all(sent).await?;
        for ((_, asks, slots), answers) in groups.into_iter().zip(answers) {
            for ((request, (i, key, generation, ours)), answer) in
                asks.into_iter().zip(slots).zip(answers)
            {
                let answer = match answer {
                    Err(err)
                        if err.is_invalid_input() && request.contextual_tuples.len() > ours =>
                    {
                        self.without_refused_grants(request, ours).await
                    }
                    Ok(a) => {
                        if let Some(k) = key {
                            e.cache.insert(k, a, generation);
                        }
                        Ok(a)
                    }
                    err => err,
                };
                out[i] = Some(answer);
            }
        }
        Ok(out
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(Error::internal("a batch check item got no answer"))))
            .collect())
    }

    async fn prepare(&self, req: &CheckRequest) -> Result<Prepared> {
        self.ensure_open()?;
        let probe = TupleKey::new(&req.user, &req.relation, &req.object)?;
        let e = &self.inner.engine;
        let ty = probe.object_type();
        let model = self.inner.model();
        let model = model.as_deref();
        let rels = model.and_then(|m| m.depends_on(ty, &req.relation));
        let deps = model.and_then(|m| m.depends_on_scoped(ty, &req.relation));
        // Read the generations before looking at anything pending: see
        // cache.rs. A shared store costs one round trip here, so that an op
        // acknowledged by another process is never hidden by this cache.
        let shared = if e.store.shared() {
            e.store.generation(rels).await?
        } else {
            0
        };
        let generation = (e.cache.generation(ty, &req.relation), shared);
        let cacheable = req.context.is_none()
            && req.contextual_tuples.is_empty()
            && req.consistency != Consistency::HigherConsistency;
        let key = cacheable.then(|| key_of(&probe));
        if let Some(k) = &key {
            if let Some(a) = e.cache.get(k, generation) {
                count!(e.stats, cache_hits, "fga_wb_cache_hits_total", 1);
                return Ok(Prepared::Answer(a));
            }
        }
        if model.is_some_and(|m| m.direct_implies(ty, &req.relation))
            && e.store.latest(&probe).await? == Some((Op::Grant, false))
        {
            // A pending unconditional grant of this very tuple, on a relation
            // with no exclusion above its direct assignment: true whatever
            // else is pending.
            count!(e.stats, cache_hits, "fga_wb_cache_hits_total", 1);
            return Ok(Prepared::Answer(true));
        }
        let room = MAX_CONTEXTUAL_TUPLES.saturating_sub(req.contextual_tuples.len());
        let (grants, written_ago) = self
            .pending_grants(deps, &req.object, &req.user, room)
            .await?;
        count!(e.stats, cache_misses, "fga_wb_cache_misses_total", 1);
        let mut request = req.clone();
        request.authorization_model_id = e.model_id.get();
        if self.needs_fresh_answers(written_ago) {
            request.consistency = Consistency::HigherConsistency;
        }
        add_grants(&mut request.contextual_tuples, grants);
        Ok(Prepared::Ask {
            request,
            key,
            generation,
            ours: req.contextual_tuples.len(),
        })
    }

    /// The objects of a type on which a user has a relation, counting every
    /// acknowledged grant and revoke, as [`WriteBehind::check_request`]
    /// does: pending grants on the relations the list depends on go to
    /// OpenFGA's ListObjects as contextual tuples (more than 100: it flushes
    /// first), a pending revoke (or grant with a condition) it depends on is
    /// waited for, failing closed with [`Error::is_stale_check`], and a list
    /// that can depend on a recent write bypasses OpenFGA's caches.
    pub async fn list_objects(&self, req: &ListObjectsRequest) -> Result<Vec<String>> {
        self.ensure_open()?;
        crate::tuple::validate_user(&req.user)?;
        crate::tuple::validate_relation(&req.relation)?;
        let e = &self.inner.engine;
        // Any object of the type can be listed: every pending op on the
        // relations it depends on counts, whatever its object and user.
        let deps: Option<Vec<Dep>> = self.inner.model().and_then(|m| {
            m.depends_on_scoped(&req.object_type, &req.relation)
                .map(|d| d.iter().map(Dep::anywhere).collect())
        });
        let mut request = req.clone();
        self.prepare_list(
            deps.as_deref(),
            ("", &req.user),
            &mut request.contextual_tuples,
            &mut request.authorization_model_id,
            &mut request.consistency,
        )
        .await?;
        let mut objects = e.client.list_objects(&e.store_id, &request).await?;
        objects.sort();
        objects.dedup();
        Ok(objects)
    }

    /// The users of one type (`user`) or userset type (`group#member`) with
    /// a relation on an object, counting every acknowledged grant and
    /// revoke, with the guarantees of [`WriteBehind::list_objects`]. Users
    /// come as tuple users: `user:anne`, `user:*`, `group:eng#member`.
    pub async fn list_users(&self, req: &ListUsersRequest) -> Result<Vec<String>> {
        self.ensure_open()?;
        crate::tuple::validate_object(&req.object)?;
        crate::tuple::validate_relation(&req.relation)?;
        let e = &self.inner.engine;
        let ty = req.object.split_once(':').map_or("", |(t, _)| t);
        // Every user: ops of any user on the relations it depends on count.
        let deps: Option<Vec<Dep>> = self.inner.model().and_then(|m| {
            m.depends_on_scoped(ty, &req.relation)
                .map(|d| d.iter().map(Dep::any_user).collect())
        });
        let mut request = req.clone();
        self.prepare_list(
            deps.as_deref(),
            (&req.object, ""),
            &mut request.contextual_tuples,
            &mut request.authorization_model_id,
            &mut request.consistency,
        )
        .await?;
        let mut users = e.client.list_users(&e.store_id, &request).await?;
        users.sort();
        users.dedup();
        Ok(users)
    }

    /// The tuples matching `filter`, as OpenFGA's Read takes it (any of
    /// user, relation and object; `type:` with a user for every object of a
    /// type), counting every acknowledged grant and revoke: what an admin
    /// page shows as "who has access". A pending revoke that matches is
    /// waited for (failing closed as a check does, [`Error::is_stale_check`]);
    /// pending grants that match are added, with their conditions, to what
    /// OpenFGA holds, read with `HIGHER_CONSISTENCY`.
    pub async fn read(&self, filter: &ReadFilter) -> Result<Vec<TupleKey>> {
        self.ensure_open()?;
        let e = &self.inner.engine;
        let object = filter.object.as_deref().unwrap_or("");
        let (ty, id) = object.split_once(':').unwrap_or((object, ""));
        let user = filter.user.as_deref().unwrap_or("");
        let one_object = !id.is_empty();
        let model = self.inner.model();
        let deps: Option<Vec<Dep>> = match model.as_deref() {
            Some(m) if !ty.is_empty() => Some(
                m.relations_of(ty)
                    .into_iter()
                    .filter(|r| filter.relation.as_deref().is_none_or(|f| f == *r))
                    .map(|r| Dep {
                        rel: crate::model::rel_name(ty, r),
                        same_object: one_object,
                        user_bound: one_object && !user.is_empty(),
                    })
                    .collect(),
            ),
            _ => None,
        };
        let (grants, _) = self
            .pending_grants(deps.as_deref(), object, user, READ_PENDING_MAX)
            .await?;
        let mut held = e.client.read_all(&e.store_id, filter).await?;
        for g in grants.into_iter().filter(|g| read_matches(filter, g)) {
            let same = |h: &&mut TupleKey| {
                h.user == g.user && h.relation == g.relation && h.object == g.object
            };
            match held.iter_mut().find(same) {
                Some(h) => *h = g,
                None => held.push(g),
            }
        }
        held.sort_by(|a, b| {
            (&a.object, &a.relation, &a.user).cmp(&(&b.object, &b.relation, &b.user))
        });
        Ok(held)
    }

    /// Readies a list request: its pending grants as contextual tuples, the
    /// handle's model, and fresh answers where a recent write can matter.
    /// `(object, user)` scope the pending ops as the store's `relevant` does.
    async fn prepare_list(
        &self,
        deps: Option<&[Dep]>,
        (object, user): (&str, &str),
        contextual: &mut Vec<TupleKey>,
        model_id: &mut Option<String>,
        consistency: &mut Consistency,
    ) -> Result<()> {
        let room = MAX_CONTEXTUAL_TUPLES.saturating_sub(contextual.len());
        let (grants, written_ago) = self.pending_grants(deps, object, user, room).await?;
        if model_id.is_none() {
            *model_id = self.inner.engine.model_id.get();
        }
        if self.needs_fresh_answers(written_ago) {
            *consistency = Consistency::HigherConsistency;
        }
        add_grants(contextual, grants);
        Ok(())
    }

    /// The pending grants a request on `object` for `user` can depend on
    /// (`deps`; `None`: everything), at most `room` of them, and how long ago
    /// a write it can depend on was applied. Waits while a pending revoke
    /// (or grant with a condition) it can depend on is not written, failing
    /// closed after `check.revoke_wait_timeout`; flushes once when more than
    /// `room` grants are pending.
    async fn pending_grants(
        &self,
        deps: Option<&[Dep]>,
        object: &str,
        user: &str,
        room: usize,
    ) -> Result<(Vec<TupleKey>, Option<std::time::Duration>)> {
        let e = &self.inner.engine;
        let waited_from = Instant::now();
        let deadline = waited_from + self.inner.config.check.revoke_wait_timeout;
        let mut changed = e.changed.subscribe();
        let mut flushed = false;
        loop {
            changed.borrow_and_update();
            let r = e.store.relevant(deps, object, user, room).await?;
            // A grant with a condition may replace a tuple OpenFGA holds
            // with a wider one (or none); as a contextual tuple it would only
            // add to that, so it narrows access only once written.
            let narrowing = r
                .grants
                .as_ref()
                .is_some_and(|g| g.iter().any(|t| t.condition.is_some()));
            if r.revokes > 0 || narrowing {
                // Contextual tuples cannot delete: wait for the op to land.
                let wanted = if narrowing {
                    &e.flush_wanted
                } else {
                    &e.revoke_wanted
                };
                wanted.store(true, std::sync::atomic::Ordering::Relaxed);
                e.wake_now();
                match tokio::time::timeout_at(deadline, changed.changed()).await {
                    Ok(Ok(())) => continue,
                    // The real cause, when flushing is stopped.
                    _ => {
                        return Err(e.stats.halted().unwrap_or_else(|| {
                            Error::new(Kind::CheckWouldBeStale {
                                waited: waited_from.elapsed(),
                            })
                        }))
                    }
                }
            }
            match r.grants {
                Some(g) => return Ok((g, r.written_ago)),
                None if !flushed => {
                    flushed = true;
                    self.flush().await?;
                }
                None => {
                    return Err(Error::new(Kind::TooManyContextualTuples {
                        count: room + 1,
                        limit: MAX_CONTEXTUAL_TUPLES,
                    }))
                }
            }
        }
    }

    /// A check OpenFGA refused for its input after fga-wb added pending
    /// grants to it. One such grant (buffered before the model changed, or
    /// with a condition context the server will not take) must not fail
    /// every check it is sent with: find the grants OpenFGA refuses, by
    /// halving, and answer without them, unless one of them could take this
    /// access away (it sits under a `but not`): then fail closed. Rare, so a
    /// few extra checks are fine. The refused grants are dead-lettered when
    /// flushed.
    async fn without_refused_grants(&self, mut request: CheckRequest, ours: usize) -> Result<bool> {
        let e = &self.inner.engine;
        let added = request.contextual_tuples.split_off(ours);
        // The caller's own request may be what OpenFGA refuses.
        e.client.check(&e.store_id, &request).await?;
        let mut refused = Vec::new();
        let mut groups = vec![added.clone()];
        while let Some(group) = groups.pop() {
            let mut probe = request.clone();
            probe.contextual_tuples.extend(group.iter().cloned());
            match e.client.check(&e.store_id, &probe).await {
                Ok(_) => {}
                Err(err) if err.is_invalid_input() && group.len() == 1 => {
                    refused.extend(group.into_iter().map(|t| (t, err.to_string())));
                }
                Err(err) if err.is_invalid_input() => {
                    let mut a = group;
                    let b = a.split_off(a.len() / 2);
                    groups.push(a);
                    groups.push(b);
                }
                Err(err) => return Err(err),
            }
        }
        let ty = request.object.split_once(':').map_or("", |(t, _)| t);
        for (t, reason) in &refused {
            tracing::warn!(tuple = %t, %reason, "OpenFGA refuses a pending grant as a contextual tuple; checks go on without it until it is dead-lettered");
            let rel = crate::model::rel_name(t.object_type(), &t.relation);
            let denies = self
                .inner
                .model()
                .is_none_or(|m| m.may_deny(ty, &request.relation, &rel));
            if denies {
                return Err(Error::new(Kind::PendingGrantRefused {
                    tuple: t.to_string(),
                    reason: reason.clone(),
                }));
            }
        }
        request.contextual_tuples.extend(
            added
                .into_iter()
                .filter(|t| !refused.iter().any(|(r, _)| r == t)),
        );
        e.client.check(&e.store_id, &request).await
    }

    /// Whether a request must bypass OpenFGA's caches (and read replica):
    /// they may answer from before a write fga-wb applied `written_ago`.
    fn needs_fresh_answers(&self, written_ago: Option<std::time::Duration>) -> bool {
        let check = &self.inner.config.check;
        let fresh = check.always_higher_consistency
            || written_ago.is_some_and(|ago| ago < check.server_cache_ttl);
        if fresh {
            let e = &self.inner.engine;
            count!(
                e.stats,
                higher_consistency,
                "fga_wb_higher_consistency_total",
                1
            );
        }
        fresh
    }

    /// Writes everything acknowledged so far to OpenFGA and reports what
    /// happened. Also resumes flushing after an auth failure was fixed.
    ///
    /// Fails with OpenFGA's error ([`Error::is_auth`], [`Error::is_not_found`])
    /// when the server refused the credentials or does not know the store:
    /// nothing can be written until that is fixed, and every op is kept. A
    /// transient failure (OpenFGA down, 5xx, 429) is not an error here: the
    /// report's `error` says what happened, the ops stay pending and are
    /// retried by themselves.
    #[tracing::instrument(level = "debug", skip(self))]
    pub async fn flush(&self) -> Result<FlushReport> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .commands
            .send(Command::Flush(tx))
            .await
            .map_err(|_| Error::new(Kind::Shutdown))?;
        let report = rx.await.map_err(|_| Error::new(Kind::Shutdown))?;
        if report.error.is_some() {
            if let Some(halt) = self.inner.engine.stats.halted() {
                return Err(halt);
            }
        }
        Ok(report)
    }

    /// Drops every pending op that is not already being written, logs them,
    /// and returns how many were dropped.
    pub async fn clear(&self) -> Result<usize> {
        let e = &self.inner.engine;
        let dropped = e.store.clear().await?;
        e.cache.invalidate_all();
        count!(
            e.stats,
            cleared,
            "fga_wb_ops_cleared_total",
            dropped.len() as u64
        );
        tracing::warn!(
            count = dropped.len(),
            "cleared pending ops; they will not reach OpenFGA"
        );
        const SHOWN: usize = 100;
        for (t, op) in dropped.iter().take(SHOWN) {
            tracing::info!(tuple = %t, ?op, "cleared");
        }
        if dropped.len() > SHOWN {
            tracing::info!("... and {} more cleared", dropped.len() - SHOWN);
        }
        e.changed.send_modify(|v| *v += 1);
        Ok(dropped.len())
    }

    /// Counts of pending ops.
    pub async fn pending(&self) -> Result<Pending> {
        self.inner.engine.store.pending().await
    }

    /// Pending ops, dead letters, the last flush and totals.
    pub async fn status(&self) -> Result<Status> {
        let e = &self.inner.engine;
        let config = &self.inner.config;
        let mut status = Status {
            store: config.buffer.store,
            mode: config.flush.mode,
            store_id: e.store_id.clone(),
            pending: e.store.pending().await?,
            dead_letters: e.store.dead_letters().await?.len(),
            flushing_stopped: e.stats.stopped(),
            last_flush: e.stats.last_flush(),
            totals: e.stats.totals(),
            queue: match (config.flush.mode, &self.inner.redis) {
                (Mode::Queue, Some(r)) => Some(crate::queue::stats(r).await?),
                _ => None,
            },
            loss: e.store.loss().await?,
            last_loss_acknowledged: None,
            write_limit: match e.tuple_limit.load(Ordering::Relaxed) {
                0 => None,
                l => Some(l),
            },
            // A scan of every key: asked for separately (`redis_key_usage`),
            // not by every caller that polls the status.
            redis_keys: None,
        };
        status.merge_shared(&e.store.shared_stats().await?);
        Ok(status)
    }

    /// Redis store: how many keys and bytes the store holds in Redis, by
    /// category (`pending`, `queue`, `dead`, `meta`, `legacy`); `None` for
    /// the memory store. Scans the store's keys (in steps), so it is for an
    /// operator's look, not a loop: `status()` leaves `redis_keys` empty.
    pub async fn redis_key_usage(&self) -> Result<Option<Vec<crate::buffer::KeyUsage>>> {
        match &self.inner.redis {
            Some(r) => Ok(Some(r.usage().await?)),
            None => Ok(None),
        }
    }

    /// What could keep acknowledged ops from reaching OpenFGA, for an
    /// operator's health check: OpenFGA unreachable or refusing the
    /// credentials, flushing stopped, an open Redis loss, queued jobs with
    /// no worker seen (problems); Redis without AOF, dead letters waiting
    /// (warnings). Asks OpenFGA and Redis once each.
    pub async fn health(&self) -> Result<Health> {
        let e = &self.inner.engine;
        let status = self.status().await?;
        let mut h = Health::default();
        match e.client.read_latest_authorization_model(&e.store_id).await {
            Ok(_) => {}
            Err(err) if err.is_auth() => h
                .problems
                .push(format!("OpenFGA refuses the credentials: {err}")),
            Err(err) => h.problems.push(format!("OpenFGA: {err}")),
        }
        if let Some(why) = &status.flushing_stopped {
            h.problems.push(format!("flushing is stopped: {why}"));
        }
        if let Some(loss) = &status.loss {
            h.problems.push(format!(
                "Redis lost acknowledged ops: {loss}; see `fga-wb loss`"
            ));
        }
        if let Some(q) = &status.queue {
            if q.workers.is_empty() && q.pending + q.scheduled > 0 {
                h.problems.push(format!(
                    "{} jobs wait and no worker was seen: start `fga-wb worker`",
                    q.pending + q.scheduled
                ));
            }
        }
        if let Some(r) = &self.inner.redis {
            h.warnings.extend(r.persistence_warning().await);
        }
        if status.dead_letters > 0 {
            h.warnings.push(format!(
                "{} dead letters wait for a decision (`fga-wb dlq list`)",
                status.dead_letters
            ));
        }
        Ok(h)
    }

    /// Redis store: deletes the job keys versions before fga-wb kept jobs
    /// in its own keys left under the store's prefix (finished jobs stayed
    /// there forever); returns how many. `fga-wb sweep` runs it.
    pub async fn sweep_legacy_keys(&self) -> Result<u64> {
        match &self.inner.redis {
            Some(r) => r.sweep_legacy().await,
            None => Ok(0),
        }
    }

    /// Closes the record of a Redis loss so checks answer again: for an
    /// operator, after re-applying what the application granted and revoked
    /// around the time of the loss (`status().loss` says when). `by` names
    /// who did it, for the record. Returns false if no loss was open.
    pub async fn acknowledge_loss(&self, by: &str) -> Result<bool> {
        let e = &self.inner.engine;
        let closed = e.store.acknowledge_loss(by).await?;
        e.cache.invalidate_all();
        Ok(closed)
    }

    /// The engine, for the test doubles.
    #[cfg(feature = "test-util")]
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.inner.engine
    }

    /// The ops OpenFGA refused for good, with its reasons.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        self.inner.engine.store.dead_letters().await
    }

    /// Buffers dead letters again (those with `ids`, or all) as new ops, for
    /// after the model or the data was fixed, and flushes them (in queue
    /// mode: queues their jobs). They skip model validation: OpenFGA
    /// decides.
    ///
    /// A letter whose tuple got a newer op since it died (pending, applied
    /// or dead itself) is *superseded*: replaying it would undo what the
    /// application said last, so it is dropped instead, and counted. A
    /// letter leaves the dead letters only once its op is buffered again,
    /// so a full buffer loses nothing: the replay then fails with
    /// [`Error::is_buffer_full`] after flushing what it did replay. Unknown
    /// ids are an error, and nothing is replayed then.
    pub async fn replay_dead_letters(&self, ids: Option<&[u64]>) -> Result<Replayed> {
        let e = &self.inner.engine;
        if let Some(ids) = ids {
            let letters = e.store.dead_letters().await?;
            let unknown: Vec<String> = ids
                .iter()
                .filter(|id| !letters.iter().any(|d| d.id == **id))
                .map(ToString::to_string)
                .collect();
            if !unknown.is_empty() {
                return Err(Error::invalid_argument(format!(
                    "no dead letter with id {}; `fga-wb dlq list` shows them",
                    unknown.join(", ")
                )));
            }
        }
        let r = e.store.replay_dead_letters(ids, false).await?;
        // A replayed letter is a new op, acknowledged like a grant or revoke.
        for t in &r.tuples {
            e.cache.invalidate_for(t);
        }
        count!(
            e.stats,
            acknowledged,
            "fga_wb_ops_acknowledged_total",
            r.replayed as u64
        );
        if r.replayed > 0 {
            self.flush().await?;
        }
        if r.kept > 0 {
            tracing::warn!(
                replayed = r.replayed,
                kept = r.kept,
                "the buffer is full: dead letters kept (nothing lost); make room and replay again"
            );
            return Err(Error::new(Kind::BufferFull {
                capacity: self.inner.config.buffer.capacity,
                waited: None,
            }));
        }
        Ok(r)
    }

    /// Deletes dead letters (those with `ids`, or all); returns how many.
    pub async fn purge_dead_letters(&self, ids: Option<&[u64]>) -> Result<usize> {
        Ok(self
            .inner
            .engine
            .store
            .remove_dead_letters(ids)
            .await?
            .len())
    }

    /// Stops the flusher, then flushes until everything is applied or
    /// `flush.shutdown_deadline` passes, and reports what is left. Later
    /// calls on any clone fail with [`Error::is_shutdown`].
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
        if self.inner.shut_down.swap(true, Ordering::SeqCst) {
            return Err(Error::new(Kind::Shutdown));
        }
        let deadline = Instant::now() + self.inner.config.flush.shutdown_deadline;
        // The flusher drains until the deadline and then stops; the other
        // tasks (the event follower) stop at once.
        let (reply, answer) = oneshot::channel();
        let asked = self
            .inner
            .commands
            .send(Command::Shutdown { deadline, reply })
            .await
            .is_ok();
        let (flushed, cut_off) = if asked {
            // A little past the deadline: the flusher answers at it.
            let grace = deadline + std::time::Duration::from_secs(1);
            match tokio::time::timeout_at(grace, answer).await {
                Ok(Ok(r)) => r,
                _ => (
                    FlushReport {
                        error: Some("the flusher did not answer by the deadline".into()),
                        ..Default::default()
                    },
                    true,
                ),
            }
        } else {
            (FlushReport::default(), false)
        };
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
        let e = &self.inner.engine;
        // What this process still holds goes back to the others now, unless
        // a write was cut off in flight (then when its lease ends).
        if let Err(err) = e.store.release(!cut_off).await {
            tracing::warn!(error = %err, "could not release this process's Redis lease; it ends by itself");
        }
        let left = e.store.pending().await?;
        if left.total + left.in_flight > 0 {
            tracing::warn!(
                pending = left.total,
                in_flight = left.in_flight,
                "shutdown left ops unflushed"
            );
        }
        Ok(ShutdownReport { flushed, left })
    }

    fn ensure_open(&self) -> Result<()> {
        if self.inner.shut_down.load(Ordering::Relaxed) {
            return Err(Error::new(Kind::Shutdown));
        }
        Ok(())
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
    /// `openfga.model_id` is empty.
    pub async fn refresh_model(&self) -> Result<Option<String>> {
        self.ensure_open()?;
        let e = &self.inner.engine;
        let pinned = &self.inner.config.openfga.model_id;
        let pinned = (!pinned.is_empty()).then_some(pinned.as_str());
        let found = match pinned {
            Some(id) => e
                .client
                .read_authorization_model(&e.store_id, id)
                .await
                .map(Some),
            None => e.client.read_latest_authorization_model(&e.store_id).await,
        }?;
        let Some(found) = found else {
            return Ok(e.model_id.get());
        };
        if e.model_id.get().as_deref() == Some(found.id.as_str()) {
            return Ok(Some(found.id));
        }
        let model = Arc::new(Model::new(&found));
        *self.inner.model.write().unwrap_or_else(|p| p.into_inner()) = Some(model);
        e.model_id.set(Some(found.id.clone()));
        e.cache.invalidate_all();
        tracing::info!(model_id = %found.id, "following a new authorization model");
        Ok(Some(found.id))
    }
}

impl Handle {
    /// The analysed model in use, if one was read.
    fn model(&self) -> Option<Arc<Model>> {
        self.model.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

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
        if self.shut_down.load(Ordering::Relaxed) {
            return;
        }
        if let Some(p) = self.engine.store.pending_now() {
            let n = p.total + p.in_flight;
            if n > 0 && self.config.buffer.store == StoreKind::Memory {
                tracing::warn!(
                    pending = n,
                    "WriteBehind dropped without shutdown(): {n} acknowledged ops were not written to OpenFGA and are lost"
                );
            }
        }
    }
}
