//! The read path: checks, batch checks, lists and reads that see every
//! acknowledged op (pending grants as contextual tuples, pending revokes
//! waited for), cached answers, and `HIGHER_CONSISTENCY` after recent
//! writes.

use super::*;
use crate::openfga::{BATCH_CHECKS_IN_FLIGHT, MAX_CHECKS_PER_BATCH};

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
    let user_ok = |u: &str| match user_type_only(u) {
        Some(ty) => t.user.strip_prefix(ty).is_some_and(|r| r.starts_with(':')),
        None => t.user == u,
    };
    object_ok
        && filter
            .user
            .as_deref()
            .is_none_or(|u| u.is_empty() || user_ok(u))
        && filter
            .relation
            .as_deref()
            .is_none_or(|r| r.is_empty() || t.relation == r)
}

/// The type of a Read filter's user without an id (`group:#member`, which
/// OpenFGA's datastores read as every user of type `group`), split as
/// OpenFGA splits it: the relation after the last `#`, the type before the
/// first `:`. (`group:` alone OpenFGA refuses.)
fn user_type_only(user: &str) -> Option<&str> {
    let (object, _) = user.rsplit_once('#')?;
    let (ty, id) = object.split_once(':')?;
    id.is_empty().then_some(ty)
}

/// Whether two tuples have one key (user, relation, object).
fn same_key(a: &TupleKey, b: &TupleKey) -> bool {
    a.user == b.user && a.relation == b.relation && a.object == b.object
}

/// Adds pending grants to a request's contextual tuples, except those the
/// caller already sent (OpenFGA refuses a tuple twice; one with another
/// condition is waited for instead, see `pending_grants`).
fn add_grants(contextual: &mut Vec<TupleKey>, grants: Vec<TupleKey>) {
    for g in grants {
        let dup = contextual.iter().any(|c| same_key(c, &g));
        if !dup {
            contextual.push(g);
        }
    }
}

/// Where a batch check's answer goes: its index, cache key, generation, and
/// where the pending grants start in its contextual tuples.
type Slot = (usize, Option<String>, Generation, usize);

/// The requests sent in one BatchCheck: one consistency, one model.
type Group = (Consistency, Option<String>);

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
    /// Whether `user` has `relation` on `object`, counting every acknowledged
    /// grant and revoke.
    ///
    /// Fails closed with an error for which [`Error::is_stale_check`] is true
    /// when a pending revoke this check could depend on is not applied within
    /// `check.revoke_wait_timeout`; while flushing is stopped, with the
    /// stop's own error instead ([`Error::is_auth`], [`Error::is_not_found`],
    /// [`Error::is_misdirected`], [`Error::is_flusher_stopped`]). Treat any
    /// error as "not allowed".
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
        if self.inner.shut_down.load(Ordering::Relaxed)
            || e.store.shared()
            || self.inner.config.check.always_higher_consistency
        {
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
            } => self.ask_alone(request, key, generation, ours).await,
        }
    }

    /// One prepared check, in a Check request of its own.
    async fn ask_alone(
        &self,
        request: CheckRequest,
        key: Option<String>,
        generation: Generation,
        ours: usize,
    ) -> Result<bool> {
        let e = &self.inner.engine;
        let answer = e.client.check(&e.store_id, &request).await;
        self.settle(request, key, generation, ours, answer).await
    }

    /// OpenFGA's answer to a prepared check, cached if it may be; refused
    /// as invalid input with pending grants added, asked again without the
    /// grants OpenFGA refuses.
    async fn settle(
        &self,
        request: CheckRequest,
        key: Option<String>,
        generation: Generation,
        ours: usize,
        answer: Result<bool>,
    ) -> Result<bool> {
        match answer {
            Err(err) if err.is_invalid_input() && request.contextual_tuples.len() > ours => {
                self.without_refused_grants(request, ours).await
            }
            Ok(a) => {
                if let Some(k) = key {
                    self.inner.engine.cache.insert(k, a, generation);
                }
                Ok(a)
            }
            err => err,
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
        // (consistency, model) -> (requests, (index, cache key, generation))
        let mut groups: Vec<(Group, Vec<CheckRequest>, Vec<Slot>)> = Vec::new();
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
                    // Each item goes under the model it was prepared with.
                    let group = (request.consistency, request.authorization_model_id.clone());
                    let g = match groups.iter().position(|g| g.0 == group) {
                        Some(g) => g,
                        None => {
                            groups.push((group, Vec::new(), Vec::new()));
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
        // One BatchCheck each, so that one OpenFGA refuses costs only its
        // own checks (see below).
        let mut requests: Vec<(Group, Vec<CheckRequest>, Vec<Slot>)> = Vec::new();
        for (group, asks, slots) in groups {
            let (mut asks, mut slots) = (asks.into_iter(), slots.into_iter());
            loop {
                let chunk: Vec<CheckRequest> = asks.by_ref().take(MAX_CHECKS_PER_BATCH).collect();
                if chunk.is_empty() {
                    break;
                }
                let chunk_slots = slots.by_ref().take(chunk.len()).collect();
                requests.push((group.clone(), chunk, chunk_slots));
            }
        }
        let answered: Vec<_> = futures::stream::iter(requests)
            .map(|((consistency, model_id), asks, slots)| async move {
                let answers = e
                    .client
                    .batch_check(&e.store_id, &asks, model_id.as_deref(), consistency)
                    .await;
                (asks, slots, answers)
            })
            .buffered(BATCH_CHECKS_IN_FLIGHT)
            .collect()
            .await;
        for (asks, slots, answers) in answered {
            let answers = match answers {
                Ok(answers) => answers,
                // OpenFGA validates a whole BatchCheck before it checks
                // anything: one item it refuses (over 100 contextual tuples)
                // refuses them all. Asked alone, each gets its own answer
                // or error.
                Err(err) if err.is_invalid_input() => {
                    tracing::warn!(error = %err, checks = asks.len(), "OpenFGA refused a whole BatchCheck; its checks are asked one by one");
                    let alone: Vec<(usize, Result<bool>)> =
                        futures::stream::iter(asks.into_iter().zip(slots))
                            .map(|(r, (i, k, g, o))| async move {
                                (i, self.ask_alone(r, k, g, o).await)
                            })
                            .buffer_unordered(PREPARING)
                            .collect()
                            .await;
                    for (i, answer) in alone {
                        out[i] = Some(answer);
                    }
                    continue;
                }
                Err(err) => {
                    for (i, ..) in slots {
                        out[i] = Some(Err(err.clone()));
                    }
                    continue;
                }
            };
            for ((request, (i, key, generation, ours)), answer) in
                asks.into_iter().zip(slots).zip(answers)
            {
                out[i] = Some(self.settle(request, key, generation, ours, answer).await);
            }
        }
        Ok(out
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(Error::internal("a batch check item got no answer"))))
            .collect())
    }

    async fn prepare(&self, req: &CheckRequest) -> Result<Prepared> {
        self.ensure_open()?;
        // Check's own rules: its user may be 512 characters, not bytes.
        crate::tuple::validate_check_user(&req.user)?;
        crate::tuple::validate_relation(&req.relation)?;
        crate::tuple::validate_object(&req.object)?;
        let probe = TupleKey::unvalidated(&req.user, &req.relation, &req.object);
        let e = &self.inner.engine;
        let ty = probe.object_type();
        // Read the generations before looking at anything pending: see
        // cache.rs. This process's before the model, so that an answer
        // worked out with a model the handle just left is cached under
        // that model's epoch (see CheckCache::switch_model).
        let local = e.cache.generation(ty, &req.relation);
        // Taken before the shared store's guard (in `generation`): the
        // reads after it must come from the same connection's Redis.
        let mark = e.store.connection_mark();
        let model = self.inner.model();
        // OpenFGA answers with a model the caller pinned, so the pending ops
        // are judged by it too, and the answer is not cached (the cache
        // follows the handle's model).
        let pinned = self
            .pinned_elsewhere(req.authorization_model_id.as_deref(), model.as_deref())
            .await?;
        let model = pinned.as_deref().or(model.as_deref());
        let rels = model.and_then(|m| m.depends_on(ty, &req.relation));
        let deps = model.and_then(|m| m.depends_on_scoped(ty, &req.relation));
        // A shared store costs one round trip here, so that an op
        // acknowledged by another process is never hidden by this cache.
        let shared = if e.store.shared() {
            e.store.generation(rels).await?
        } else {
            0
        };
        let generation = (local, shared);
        // Answers kept here are dropped by fga-wb's own ops only: where
        // writes bypass fga-wb (`always_higher_consistency`), none is kept.
        let cacheable = req.context.is_none()
            && req.contextual_tuples.is_empty()
            && req.consistency != Consistency::HigherConsistency
            && !self.inner.config.check.always_higher_consistency
            && pinned.is_none();
        let key = cacheable.then(|| key_of(&probe));
        if let Some(k) = &key {
            if let Some(a) = e.cache.get(k, generation) {
                // A connection that dropped since the mark (another check
                // saw it) may have come back to a Redis that lost what the
                // generation counted: as every other answer, this one waits.
                e.store.still_connected(mark)?;
                count!(e.stats, cache_hits, "fga_wb_cache_hits_total", 1);
                return Ok(Prepared::Answer(a));
            }
        }
        // Not when the caller sends tuples or a context of its own: OpenFGA
        // judges them first (one with this key would be read, with its
        // condition, instead of the stored one; one it refuses refuses the
        // request). Not under a pinned model either: its grants were accepted under
        // the handle's, and the pinned one may not admit this one as sent.
        // Nor when the model does not admit the tuple (buffered under an
        // earlier model, or without validation): OpenFGA would not count it.
        if pinned.is_none()
            && model
                .is_some_and(|m| m.direct_implies(ty, &req.relation) && m.validate(&probe).is_ok())
            && req.contextual_tuples.is_empty()
            && req.context.is_none()
            && e.store.latest(&probe).await? == Some((Op::Grant, false))
        {
            e.store.still_connected(mark)?;
            // A pending unconditional grant of this very tuple, on a relation
            // with no exclusion above its direct assignment: true whatever
            // else is pending.
            count!(e.stats, cache_hits, "fga_wb_cache_hits_total", 1);
            return Ok(Prepared::Answer(true));
        }
        let room = MAX_CONTEXTUAL_TUPLES.saturating_sub(req.contextual_tuples.len());
        let (grants, written_ago) = self
            .pending_grants(deps, &req.object, &req.user, room, &req.contextual_tuples)
            .await?;
        e.store.still_connected(mark)?;
        count!(e.stats, cache_misses, "fga_wb_cache_misses_total", 1);
        let mut request = req.clone();
        // The model the pending ops were judged by (the caller's pinned one,
        // or the handle's), not one the handle switched to meanwhile.
        request.authorization_model_id = self.model_id_of(model);
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
    /// waited for, failing closed as [`WriteBehind::check`] does, and a list
    /// that can depend on a recent write bypasses OpenFGA's caches.
    pub async fn list_objects(&self, req: &ListObjectsRequest) -> Result<Vec<String>> {
        self.ensure_open()?;
        crate::tuple::validate_user(&req.user)?;
        crate::tuple::validate_relation(&req.relation)?;
        let e = &self.inner.engine;
        // Any object of the type can be listed: every pending op on the
        // relations it depends on counts, whatever its object and user.
        let deps_of = |m: &Model| {
            m.depends_on_scoped(&req.object_type, &req.relation)
                .map(|d| d.iter().map(Dep::anywhere).collect())
        };
        let mut request = req.clone();
        self.prepare_list(
            &deps_of,
            ("", &req.user),
            &mut request.contextual_tuples,
            &mut request.authorization_model_id,
            &mut request.consistency,
        )
        .await?;
        let asked = (
            request.authorization_model_id.as_deref(),
            req.object_type.as_str(),
            req.relation.as_str(),
        );
        let ours = req.contextual_tuples.len();
        let tuples = &request.contextual_tuples;
        let mut objects = self
            .asked_with_pending(asked, tuples, ours, |tuples| {
                let mut r = request.clone();
                r.contextual_tuples = tuples;
                async move { e.client.list_objects(&e.store_id, &r).await }
            })
            .await?;
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
        let deps_of = |m: &Model| {
            m.depends_on_scoped(ty, &req.relation)
                .map(|d| d.iter().map(Dep::any_user).collect())
        };
        let mut request = req.clone();
        self.prepare_list(
            &deps_of,
            (&req.object, ""),
            &mut request.contextual_tuples,
            &mut request.authorization_model_id,
            &mut request.consistency,
        )
        .await?;
        let asked = (
            request.authorization_model_id.as_deref(),
            ty,
            req.relation.as_str(),
        );
        let ours = req.contextual_tuples.len();
        let tuples = &request.contextual_tuples;
        let mut users = self
            .asked_with_pending(asked, tuples, ours, |tuples| {
                let mut r = request.clone();
                r.contextual_tuples = tuples;
                async move { e.client.list_users(&e.store_id, &r).await }
            })
            .await?;
        users.sort();
        users.dedup();
        Ok(users)
    }

    /// The tuples matching `filter`, as OpenFGA's Read takes it (any of
    /// user, relation and object; `type:` with a user for every object of a
    /// type), counting every acknowledged grant and revoke: what an admin
    /// page shows as "who has access". A pending revoke that matches is
    /// waited for (failing closed as [`WriteBehind::check`] does);
    /// pending grants that match are added, with their conditions, to what
    /// OpenFGA holds, read with `HIGHER_CONSISTENCY`.
    pub async fn read(&self, filter: &ReadFilter) -> Result<Vec<TupleKey>> {
        self.ensure_open()?;
        let e = &self.inner.engine;
        let object = filter.object.as_deref().unwrap_or("");
        let (ty, id) = object.split_once(':').unwrap_or((object, ""));
        // A user without an id stands for every user of its type: the
        // ops of any user count.
        let user = filter
            .user
            .as_deref()
            .filter(|u| user_type_only(u).is_none())
            .unwrap_or("");
        let one_object = !id.is_empty();
        let model = self.inner.model();
        // An empty relation filters nothing, for OpenFGA as for read_matches.
        let relation = filter.relation.as_deref().filter(|r| !r.is_empty());
        let deps: Option<Vec<Dep>> = match model.as_deref() {
            Some(m) if !ty.is_empty() => {
                let mut rels: Vec<String> = m
                    .relations_of(ty)
                    .into_iter()
                    .filter(|r| relation.is_none_or(|f| f == *r))
                    .map(str::to_owned)
                    .collect();
                // OpenFGA's Read returns what it holds whatever the model
                // says: with no relation asked for, ops on relations the
                // model lacks (it changed since, or they were not
                // validated) count too.
                if relation.is_none() {
                    for r in e.store.relations_buffered(ty).await? {
                        if !rels.contains(&r) {
                            rels.push(r);
                        }
                    }
                }
                Some(
                    rels.iter()
                        .map(|r| Dep {
                            rel: crate::model::rel_name(ty, r),
                            same_object: one_object,
                            user_bound: one_object && !user.is_empty(),
                            // A read shows what OpenFGA holds, doubt or not.
                            may_deny: false,
                        })
                        .collect(),
                )
            }
            _ => None,
        };
        // A type or relation the model lacks may still have ops buffered
        // (without validation): every pending op counts then.
        let deps = deps.filter(|d| !d.is_empty());
        let mark = self.guard_shared(deps.as_deref()).await?;
        let (grants, _) = self
            .pending_grants(deps.as_deref(), object, user, READ_PENDING_MAX, &[])
            .await?;
        e.store.still_connected(mark)?;
        let mut held = e.client.read_all(&e.store_id, filter).await?;
        for g in grants.into_iter().filter(|g| read_matches(filter, g)) {
            // A grant the model does not admit (buffered under an earlier
            // model, or without validation) will be refused: not shown, as
            // checks leave it out. One that replaced a revoke not yet
            // written leaves that revoke written: what OpenFGA holds of the
            // tuple is going, so the read fails closed.
            if let Some(refused) = model.as_deref().and_then(|m| m.validate(&g).err()) {
                if e.store.owes_revoke(&g).await? {
                    return Err(Error::new(Kind::PendingGrantRefused {
                        tuple: g.to_string(),
                        reason: refused.to_string(),
                        owes: true,
                    }));
                }
                continue;
            }
            match held.iter_mut().find(|h| same_key(h, &g)) {
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
        deps_of: &(dyn Fn(&Model) -> Option<Vec<Dep>> + Sync),
        (object, user): (&str, &str),
        contextual: &mut Vec<TupleKey>,
        model_id: &mut Option<String>,
        consistency: &mut Consistency,
    ) -> Result<()> {
        let model = self.inner.model();
        // An empty id pins nothing: the handle's is sent (below).
        if model_id.as_deref() == Some("") {
            *model_id = None;
        }
        // What the pending ops can change is the model OpenFGA will answer
        // with to say: one the caller pinned, if not the handle's.
        let deps = match self
            .pinned_elsewhere(model_id.as_deref(), model.as_deref())
            .await?
        {
            Some(pinned) => deps_of(&pinned),
            None => model.as_deref().and_then(deps_of),
        };
        let mark = self.guard_shared(deps.as_deref()).await?;
        let room = MAX_CONTEXTUAL_TUPLES.saturating_sub(contextual.len());
        let (grants, written_ago) = self
            .pending_grants(deps.as_deref(), object, user, room, contextual)
            .await?;
        self.inner.engine.store.still_connected(mark)?;
        if model_id.is_none() {
            *model_id = self.model_id_of(model.as_deref());
        }
        if self.needs_fresh_answers(written_ago) {
            *consistency = Consistency::HigherConsistency;
        }
        add_grants(contextual, grants);
        Ok(())
    }

    /// The model a request's caller pinned (`id`) when it is not the
    /// handle's (`model`, a snapshot): read from OpenFGA once. An empty id
    /// pins nothing.
    async fn pinned_elsewhere(
        &self,
        id: Option<&str>,
        model: Option<&Model>,
    ) -> Result<Option<Arc<Model>>> {
        match id {
            Some(id) if !id.is_empty() && Some(id) != self.model_id_of(model).as_deref() => {
                Ok(Some(self.inner.pinned_model(id).await?))
            }
            _ => Ok(None),
        }
    }

    /// With a shared store, fails when Redis may have lost acknowledged ops
    /// these `deps` depend on (restarted empty, a failover, a reconnect not
    /// yet confirmed by every process), as a check does: through reading
    /// their generations, which a check needs anyway and a list does not.
    /// Returns the connection's mark from before the guard, for the reads
    /// after it (see `Store::connection_mark`).
    async fn guard_shared(&self, deps: Option<&[Dep]>) -> Result<u64> {
        let e = &self.inner.engine;
        let mark = e.store.connection_mark();
        if e.store.shared() {
            let rels: Option<Vec<crate::model::RelName>> =
                deps.map(|d| d.iter().map(|d| d.rel.clone()).collect());
            e.store.generation(rels.as_deref()).await?;
        }
        Ok(mark)
    }

    /// The id of `model` (a snapshot of the handle's), or the configured
    /// one when no model was read.
    fn model_id_of(&self, model: Option<&Model>) -> Option<String> {
        model
            .map(|m| m.id().to_owned())
            .or_else(|| self.inner.engine.model_id.get())
    }

    /// The pending grants a request on `object` for `user` can depend on
    /// (`deps`; `None`: everything), at most `room` of them, and how long ago
    /// a write it can depend on was applied. Waits while a pending revoke
    /// (or grant with a condition) it can depend on is not written, failing
    /// closed after `check.revoke_wait_timeout`; flushes once when more than
    /// `room` grants are pending, waiting for that flush no longer either.
    async fn pending_grants(
        &self,
        deps: Option<&[Dep]>,
        object: &str,
        user: &str,
        room: usize,
        contextual: &[TupleKey],
    ) -> Result<(Vec<TupleKey>, Option<std::time::Duration>)> {
        let e = &self.inner.engine;
        let waited_from = Instant::now();
        let deadline = waited_from + self.inner.config.check.revoke_wait_timeout;
        let mut changed = e.changed.subscribe();
        let (mut flushed, mut waited) = (false, false);
        loop {
            changed.borrow_and_update();
            let r = e.store.relevant(deps, object, user, room).await?;
            // No flush writes these: waiting would only delay the denial.
            if r.dead_in_doubt > 0 {
                return Err(Error::new(Kind::DeadLetterInDoubt {
                    count: r.dead_in_doubt,
                }));
            }
            // A grant with a condition may replace a tuple OpenFGA holds
            // with a wider one (or none); as a contextual tuple it would only
            // add to that, so it narrows access only once written.
            // So may one the caller sends too, with another condition: one
            // of the two would be left out of the request.
            let narrowing = r.unreadable > 0
                || r.grants.as_ref().is_some_and(|g| {
                    g.iter().any(|t| {
                        t.condition.is_some()
                            || contextual
                                .iter()
                                .any(|c| same_key(c, t) && c.condition != t.condition)
                    })
                });
            if r.revokes > 0 || narrowing {
                // Contextual tuples cannot delete: wait for the op to land.
                let wanted = if narrowing {
                    &e.flush_wanted
                } else {
                    &e.revoke_wanted
                };
                wanted.store(true, std::sync::atomic::Ordering::Relaxed);
                e.wake_now();
                if !waited {
                    waited = true;
                    count!(e.stats, read_waits, "fga_wb_read_waits_total", 1);
                }
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
                    // Bounded as a wait for a revoke is: the flush writes
                    // everything pending (other processes' ops too, in a
                    // shared store), and a backlog must not hold the check.
                    if let Ok(flushed) = tokio::time::timeout_at(deadline, self.flush()).await {
                        flushed?;
                    }
                }
                None => {
                    return Err(Error::new(Kind::TooManyContextualTuples {
                        count: room + 1,
                        limit: room,
                    }))
                }
            }
        }
    }

    /// A check OpenFGA refused for its input after fga-wb added pending
    /// grants to it (those past the caller's `ours`): see
    /// [`WriteBehind::without_refused`].
    async fn without_refused_grants(&self, request: CheckRequest, ours: usize) -> Result<bool> {
        let e = &self.inner.engine;
        let ty = request.object.split_once(':').map_or("", |(t, _)| t);
        let asked = (
            request.authorization_model_id.as_deref(),
            ty,
            request.relation.as_str(),
        );
        self.without_refused(asked, &request.contextual_tuples, ours, |tuples| {
            let mut r = request.clone();
            r.contextual_tuples = tuples;
            async move { e.client.check(&e.store_id, &r).await }
        })
        .await
    }

    /// Sends a request with its contextual `tuples` (the caller's first
    /// `ours`, then the pending grants fga-wb added) through `ask`; if
    /// OpenFGA refuses its input and grants were added, answers
    /// [`WriteBehind::without_refused`] them.
    async fn asked_with_pending<T, F, Fut>(
        &self,
        asked: (Option<&str>, &str, &str),
        tuples: &[TupleKey],
        ours: usize,
        ask: F,
    ) -> Result<T>
    where
        F: Fn(Vec<TupleKey>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match ask(tuples.to_vec()).await {
            Err(err) if err.is_invalid_input() && tuples.len() > ours => {
                self.without_refused(asked, tuples, ours, ask).await
            }
            answer => answer,
        }
    }

    /// A request OpenFGA refused for its input after fga-wb added pending
    /// grants to its contextual tuples (those past the caller's `ours`).
    /// One such grant (buffered before the model changed, or with a
    /// condition context the server will not take) must not fail every
    /// request it is sent with: find the grants OpenFGA refuses, by halving,
    /// and answer without them, unless one of them could take access to
    /// `relation` on `object_type` away (it sits under a `but not` of the
    /// model the request names, `model_id`): then fail closed. Rare, so a
    /// few extra requests are fine. The refused grants are dead-lettered
    /// when flushed. `ask` sends the request with the given contextual
    /// tuples.
    async fn without_refused<T, F, Fut>(
        &self,
        (model_id, object_type, relation): (Option<&str>, &str, &str),
        tuples: &[TupleKey],
        ours: usize,
        ask: F,
    ) -> Result<T>
    where
        F: Fn(Vec<TupleKey>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let (own_tuples, added) = tuples.split_at(ours.min(tuples.len()));
        // The caller's own request may be what OpenFGA refuses.
        ask(own_tuples.to_vec()).await?;
        let mut refused = Vec::new();
        let mut groups = vec![added.to_vec()];
        while let Some(group) = groups.pop() {
            let probe = own_tuples.iter().chain(&group).cloned().collect();
            match ask(probe).await {
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
        // Judged by the model OpenFGA answers with: the one the request
        // names (a caller's pin, or the handle's when it was prepared).
        let own = self.inner.model();
        let pinned = self.pinned_elsewhere(model_id, own.as_deref()).await?;
        let model = pinned.as_deref().or(own.as_deref());
        for (t, reason) in &refused {
            tracing::warn!(tuple = %t, %reason, "OpenFGA refuses a pending grant as a contextual tuple; requests go on without it until it is dead-lettered");
            let rel = crate::model::rel_name(t.object_type(), &t.relation);
            // A grant that replaced a revoke not yet written: once it is
            // dead-lettered, that revoke is written, so the tuple OpenFGA
            // still holds would answer for a state that never comes.
            let owes = self.inner.engine.store.owes_revoke(t).await?;
            if owes || model.is_none_or(|m| m.may_deny(object_type, relation, &rel)) {
                return Err(Error::new(Kind::PendingGrantRefused {
                    tuple: t.to_string(),
                    reason: reason.clone(),
                    owes,
                }));
            }
        }
        let kept = added
            .iter()
            .filter(|t| !refused.iter().any(|(r, _)| r == *t));
        ask(own_tuples.iter().chain(kept).cloned().collect()).await
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
}

#[cfg(test)]
mod tests {
    use super::user_type_only;

    /// Split as OpenFGA's `ToUserParts` splits a Read filter's user.
    #[test]
    fn a_user_without_an_id_is_its_type() {
        for (user, ty) in [
            ("group:#member", Some("group")),
            ("group:#", Some("group")),
            ("user:#x", Some("user")),
            ("group:#a#b", None),
            ("group:", None),
            ("group:eng#member", None),
            ("group:*", None),
            ("group", None),
        ] {
            assert_eq!(user_type_only(user), ty, "{user}");
        }
    }
}
