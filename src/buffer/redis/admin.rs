//! Dead letters, queue jobs and what operators ask about the store's keys.

use super::*;

impl RedisStore {
    /// How many keys and bytes the store holds in Redis, by category
    /// (`pending`, `dead`, `queue`, `meta`, `legacy`), scanned in steps.
    pub async fn usage(&self) -> Result<Vec<KeyUsage>> {
        let mut out: Vec<KeyUsage> = Vec::new();
        let mut cursor = "0".to_owned();
        loop {
            let mut a = Args::new("usage", self.publish);
            a.push(&cursor);
            let v = items(self.call(&a).await?)?;
            cursor = text(v.first().unwrap_or(&Value::Nil))?;
            for c in v[1.min(v.len())..].chunks_exact(3) {
                let category = text(&c[0])?;
                let (keys, bytes) = (int(&c[1])?.max(0) as u64, int(&c[2])?.max(0) as u64);
                match out.iter_mut().find(|u| u.category == category) {
                    Some(u) => {
                        u.keys = u.keys.saturating_add(keys);
                        u.bytes = u.bytes.saturating_add(bytes);
                    }
                    None => out.push(KeyUsage {
                        category,
                        keys,
                        bytes,
                    }),
                }
            }
            if cursor == "0" || cursor.is_empty() {
                out.sort_by(|a, b| a.category.cmp(&b.category));
                return Ok(out);
            }
        }
    }

    /// Whether Redis keeps what it acknowledged across a restart: `None`
    /// when it does (AOF on), a warning when it does not or cannot say.
    pub async fn persistence_warning(&self) -> Option<String> {
        let mut conn = self.conn.clone();
        let r: redis::RedisResult<std::collections::HashMap<String, String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("appendonly")
            .query_async(&mut conn)
            .await;
        match r {
            Ok(m) if m.get("appendonly").is_some_and(|v| v == "yes") => None,
            Ok(_) => Some(
                "Redis runs without AOF (appendonly no): a Redis restart loses acknowledged ops (detected, see `fga-wb loss`); set appendonly yes".into(),
            ),
            Err(e) => Some(format!(
                "cannot read Redis's appendonly setting ({}); make sure AOF is on",
                super::error_text(&e)
            )),
        }
    }

    /// Deletes what older versions left: the apalis job keys of versions
    /// before fga-wb kept jobs in its own keys, and the claim lists of jobs
    /// that workers of versions before the lists finished (they do not
    /// delete them); returns how many.
    pub async fn sweep_legacy(&self) -> Result<u64> {
        let mut deleted = 0;
        let mut cursor = "0".to_owned();
        loop {
            let mut a = Args::new("sweep", self.publish);
            a.push(&cursor);
            let v = items(self.call(&a).await?)?;
            cursor = text(v.first().unwrap_or(&Value::Nil))?;
            deleted += v.get(1).map_or(Ok(0), int)?.max(0) as u64;
            if cursor == "0" || cursor.is_empty() {
                return Ok(deleted);
            }
        }
    }

    /// The dead letters, each marked superseded or not.
    pub(crate) async fn dead_now(&self) -> Result<Vec<DeadLetter>> {
        let mut conn = self.conn.clone();
        let raw: Vec<(Vec<u8>, Vec<u8>)> = redis::cmd("HGETALL")
            .arg(format!("{}:dead", self.prefix))
            .query_async(&mut conn)
            .await
            .map_err(redis_error)?;
        let mut out = self.letters_of(&raw);
        for part in out.chunks_mut(1000) {
            let mut a = Args::new("deadstate", self.publish);
            for d in part.iter() {
                a.push(key_of(&d.tuple)).push(d.id);
            }
            let flags = items(self.call(&a).await?)?;
            for (d, f) in part.iter_mut().zip(&flags) {
                d.superseded = int(f)? != 0;
            }
        }
        Ok(out)
    }

    /// Removes the letters with `ids`, or all, in steps of a few hundred
    /// letters (one script call each, so Redis is not held up long);
    /// purging all ends with one call that also drops the per-tuple
    /// bookkeeping. Returns how many were removed, unreadable ones
    /// included (they are not parsed: there is nothing to show of them),
    /// and how many revokes purged grants owed are pending again.
    pub(crate) async fn purge_now(
        &self,
        ids: Option<&[u64]>,
        up_to: Option<u64>,
    ) -> Result<Purged> {
        let all = ids.is_none();
        let ids = match ids {
            Some(ids) => ids.to_vec(),
            None => {
                let mut ids = self.letter_ids_now().await?;
                ids.retain(|&id| up_to.is_none_or(|u| id <= u));
                ids
            }
        };
        let mut calls: Vec<Args> = ids
            .chunks(LETTERS_STEP)
            .map(|part| {
                let mut a = Args::new("dlqdrop", self.publish);
                a.push(now_ms()).push(part);
                a
            })
            .collect();
        if all {
            // The rest, unreadable ones too; with `up_to`, not the letters
            // numbered after it.
            let mut a = Args::new("dlqdrop", self.publish);
            a.push(now_ms()).push("*");
            if let Some(u) = up_to {
                a.push(u);
            }
            calls.push(a);
        }
        let mut purged = Purged::default();
        for a in &calls {
            let v = items(self.call(a).await?)?;
            purged.repended += count(&v, 0)? as usize;
            purged.removed += v.len().saturating_sub(1) / 2;
        }
        Ok(purged)
    }

    /// Every letter's id, in order.
    pub(crate) async fn letter_ids_now(&self) -> Result<Vec<u64>> {
        let mut conn = self.conn.clone();
        // As bytes: a field that is not UTF-8 (not fga-wb's) is skipped,
        // not an error for the whole list.
        let mut all: Vec<u64> = redis::cmd("HKEYS")
            .arg(format!("{}:dead", self.prefix))
            .query_async::<Vec<Vec<u8>>>(&mut conn)
            .await
            .map_err(redis_error)?
            .iter()
            .filter_map(|id| std::str::from_utf8(id).ok()?.parse().ok())
            .collect();
        all.sort_unstable();
        Ok(all)
    }

    /// Letters from `(id, json)` pairs as stored, in id order; unreadable
    /// ones are logged and left out.
    fn letters_of(&self, raw: &[(Vec<u8>, Vec<u8>)]) -> Vec<DeadLetter> {
        let mut out = Vec::with_capacity(raw.len());
        for (id, json) in raw {
            match std::str::from_utf8(json).ok().and_then(parse_dead) {
                Some(d) => out.push(d),
                None => tracing::warn!(
                    id = %String::from_utf8_lossy(id),
                    key = %format!("{}:dead", self.prefix),
                    "skipping an unreadable dead letter (purge removes it)"
                ),
            }
        }
        out.sort_by_key(|d| d.id);
        out
    }

    /// See [`Store::replay_dead_letters`]: in steps of a few hundred
    /// letters, each step one script call.
    /// Replays letters: `only_transient` as a worker does by itself, and
    /// then, with a `limit`, at most that many times an hour per tuple
    /// (see `replay` in store.lua); else as an operator, every letter.
    pub(crate) async fn replay_now(
        &self,
        ids: Option<&[u64]>,
        only_transient: bool,
        limit: u32,
    ) -> Result<Replayed> {
        let ids: Vec<u64> = match ids {
            Some(ids) => ids.to_vec(),
            None => self.letter_ids_now().await?,
        };
        let mut r = Replayed::default();
        for (n, part) in ids.chunks(LETTERS_STEP).enumerate() {
            let mut a = Args::new("replay", self.publish);
            let who = match (only_transient, limit) {
                (false, _) => "0".to_owned(),
                (true, 0) => "1".to_owned(),
                (true, n) => format!("1|{n}"),
            };
            a.push(now_ms()).push(self.capacity).push(who).push(part);
            let v = items(self.call(&a).await?)?;
            r.replayed += count(&v, 0)? as usize;
            r.superseded += count(&v, 1)? as usize;
            r.waiting += count(&v, 3)? as usize;
            r.left += count(&v, 4)? as usize;
            for p in v.get(5..).unwrap_or_default().chunks_exact(2) {
                r.tuples
                    .push(tuple_of(&text(&p[0])?, shown_condition(&text(&p[1])?)));
            }
            let kept = count(&v, 2)? as usize;
            if kept > 0 {
                r.kept = kept + ids.len().saturating_sub((n + 1) * LETTERS_STEP);
                break;
            }
        }
        Ok(r)
    }

    /// How many dead letters workers left for an operator (see
    /// `queue.replay_limit`).
    pub(crate) async fn left_letters(&self) -> Result<u64> {
        let a = Args::new("left", self.publish);
        Ok(int(&self.call(&a).await?)?.max(0) as u64)
    }

    /// Hands ops this writer took to a new job; returns the job's id, or
    /// `None` if none of them was still this writer's.
    pub async fn enqueue(
        &self,
        store_id: &str,
        model_id: Option<&str>,
        ops: &[Taken],
    ) -> Result<Option<u64>> {
        // The job as stored, with id 0 for the script to fill in: built
        // here, where encoding costs a fraction of what it costs in Lua on
        // Redis's one core.
        let job = crate::queue::Job::new(0, store_id, model_id, ops);
        let mut a = Args::new("enqueue", self.publish);
        a.push(now_ms())
            .push(&self.writer)
            .push(store_id)
            .push(model_id.unwrap_or_default())
            .push(ops.len());
        for o in &job.ops {
            a.push(&o.key).push(o.seq);
        }
        // It cannot fail to encode; if it did, the script would build it.
        a.push(serde_json::to_string(&job).unwrap_or_default());
        let id = int(&self.call(&a).await?)?;
        Ok((id > 0).then_some(id as u64))
    }

    /// Up to `max` due jobs for this worker (their ids, and the jobs as
    /// stored: JSON), each with the claims it got for its ops, in order;
    /// and the worker's term (see [`Store::holds`]), which the jobs' ops are
    /// taken in.
    pub async fn fetch_jobs(&self, max: usize) -> Result<(u64, Vec<FetchedJob>)> {
        let now = now_ms();
        let mut a = Args::new("fetch", self.publish);
        a.push(now)
            .push(&self.writer)
            .push(self.lease.as_millis() as u64)
            .push(max)
            .push(self.hold.term())
            .push(self.outcome_hold.as_millis() as u64);
        let v = items(self.call(&a).await?)?;
        let bad = v.first().map_or(Ok(0), int)?;
        let term = v.get(1).map_or(Ok(0), int)?.max(0) as u64;
        self.hold.renewed(now, term, &self.writer);
        if bad > 0 {
            tracing::error!(jobs = bad, "set aside queued jobs that do not decode (not written by fga-wb, or corrupted); the ops they held are pending again");
            let _ = self
                .set_note(
                    "last_bad_job",
                    format!(
                        "{bad} jobs did not decode; set aside in :badjobs, their ops pending again"
                    ),
                )
                .await;
        }
        let jobs = v[2.min(v.len())..]
            .chunks_exact(3)
            .map(|c| {
                let claims = text(&c[2])?
                    .bytes()
                    .map(|b| match b {
                        b'1' => Claim::Claimed,
                        b'2' => Claim::Busy,
                        _ => Claim::Stale,
                    })
                    .collect();
                Ok(FetchedJob {
                    id: text(&c[0])?,
                    json: text(&c[1])?,
                    claims,
                })
            })
            .collect::<Result<_>>()?;
        Ok((term, jobs))
    }

    /// For a worker running the jobs `running` (and holding nothing
    /// else): the other jobs Redis names it as running (a fetch whose
    /// reply was lost, a finish that never got through) go back to the
    /// queue, and ops blocked behind theirs are pending. Returns the ops
    /// and the jobs given back. Running nothing, everything it is named as
    /// holding goes back (see [`Store::give_back_strays`]).
    pub async fn give_back_stray_jobs(&self, running: &[String]) -> Result<(u64, u64)> {
        if running.is_empty() {
            return Store::give_back_strays(self, None).await;
        }
        let mut a = Args::new("strays", self.publish);
        a.push(now_ms()).push(&self.writer).push("jobs");
        for id in running {
            a.push(id);
        }
        let v = items(self.call(&a).await?)?;
        Ok((count(&v, 0)?, count(&v, 1)?))
    }

    /// Sets aside a job that does not decode; the ops it held are pending
    /// again. Returns how many.
    pub async fn drop_bad_job(&self, id: &str) -> Result<u64> {
        let mut a = Args::new("badjob", self.publish);
        a.push(now_ms()).push(id);
        Ok(int(&self.call(&a).await?)?.max(0) as u64)
    }

    /// Jobs by state and the workers alive.
    pub async fn queue_counts(&self) -> Result<QueueCounts> {
        let mut a = Args::new("queue", self.publish);
        a.push(now_ms());
        let v = items(self.call(&a).await?)?;
        Ok(QueueCounts {
            due: count(&v, 0)?,
            running: count(&v, 1)?,
            scheduled: count(&v, 2)?,
            workers: v[3.min(v.len())..]
                .iter()
                .map(text)
                .collect::<Result<_>>()?,
        })
    }
}

#[derive(serde::Deserialize)]
pub(crate) struct StoredDead {
    pub(crate) id: u64,
    pub(crate) key: String,
    pub(crate) op: String,
    pub(crate) seq: u64,
    /// Letters of older versions have none: their op's own seq.
    #[serde(default)]
    pub(crate) first: Option<u64>,
    #[serde(default)]
    pub(crate) reason: String,
    #[serde(default)]
    pub(crate) code: String,
    #[serde(default)]
    pub(crate) attempts: u32,
    #[serde(default)]
    pub(crate) dead_at: u64,
    #[serde(default)]
    pub(crate) cond: String,
    #[serde(default)]
    pub(crate) transient: bool,
}

/// Letters one replay or purge script call handles: Redis is not held up
/// long.
pub(crate) const LETTERS_STEP: usize = 500;

pub(crate) fn parse_dead(json: &str) -> Option<DeadLetter> {
    let d: StoredDead = serde_json::from_str(json).ok()?;
    let tuple = tuple_of(&d.key, shown_condition(&d.cond));
    tuple.validate().ok()?;
    Some(DeadLetter {
        id: d.id,
        tuple,
        op: op_of(&d.op)?,
        seq: d.seq,
        first: d.first.unwrap_or(d.seq),
        reason: d.reason,
        code: (!d.code.is_empty()).then_some(d.code),
        attempts: d.attempts,
        dead_at: stored_time(Duration::from_secs(d.dead_at)),
        transient: d.transient,
        superseded: false,
        place: None,
    })
}

/// A job fetched for a worker: its id as Redis holds it, the job as
/// stored (JSON), and the claims it got for its ops.
pub(crate) struct FetchedJob {
    pub(crate) id: String,
    pub(crate) json: String,
    pub(crate) claims: Vec<Claim>,
}
