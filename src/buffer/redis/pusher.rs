//! Pushes: concurrent grants and revokes of a process collected into
//! script calls, a few in flight at once.

use super::*;

/// Sends pushes to Redis: concurrent ones are collected into script calls,
/// up to `PUSH_PIPELINE` of them in flight at once, so Redis has the next
/// batch while the replies of the last are handed out. (One caller's ops
/// never share a batch or race: each waits for its acknowledgement before
/// its next op.)
pub(crate) struct Pusher {
    pub(crate) conn: Conn,
    pub(crate) script: redis::Script,
    pub(crate) prefix: String,
    pub(crate) publish: &'static str,
    pub(crate) capacity: usize,
    pub(crate) watch: Arc<Watch>,
    pub(crate) replication: Option<Replication>,
}

impl Pusher {
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<PushRequest>) {
        let this = Arc::new(self);
        let mut running = futures::stream::FuturesUnordered::new();
        let mut open = true;
        // How many ops the last call carried: callers woken by its replies
        // come back within microseconds, so the next call waits a moment for
        // about as many.
        let mut last = 1;
        loop {
            // Another call goes out while one is in flight only when enough
            // ops wait for it: small calls cost Redis more per op than a
            // short wait costs the callers.
            let room = running.is_empty()
                || (running.len() < PUSH_PIPELINE && rx.len() >= PUSH_PIPELINE_MIN);
            tokio::select! {
                batch = collect(&mut rx, last), if open && room => {
                    if batch.is_empty() {
                        open = false;
                        continue;
                    }
                    last = batch.len();
                    running.push(this.clone().send(batch));
                }
                Some(()) = running.next(), if !running.is_empty() => {}
                else => return,
            }
        }
    }

    /// One script call (and its WAIT); answers every caller in `batch`.
    pub(crate) async fn send(self: Arc<Self>, batch: Vec<PushRequest>) {
        let mut inv = self.script.prepare_invoke();
        inv.key(&self.prefix)
            .arg("push")
            .arg(self.publish)
            .arg(now_ms())
            .arg(self.capacity)
            .arg(batch.len());
        for p in &batch {
            inv.arg(&p.key).arg(op_code(p.op)).arg(&p.condition);
        }
        let result = match self.replication {
            None => {
                let mut conn = self.conn.clone();
                match inv.invoke_async::<Value>(&mut conn).await {
                    Ok(v) => items(v).map(|v| (v, None)),
                    Err(e) => Err(redis_error(e)),
                }
            }
            Some(r) => self.invoke_and_wait(&inv, r).await,
        };
        let (v, replicas) = match result {
            Ok((v, replicas)) if v.len() == batch.len() * 2 + 2 => (v, replicas),
            Ok((v, _)) => {
                let e = corrupt(format!("push returned {} items", v.len()));
                return answer_all(batch, &e);
            }
            Err(e) => return answer_all(batch, &e),
        };
        let pending = int(&v[v.len() - 2]).unwrap_or(0).max(0) as usize;
        let corrupt = int(&v[v.len() - 1]).unwrap_or(0);
        if corrupt > 0 {
            tracing::warn!(count = corrupt, prefix = %self.prefix, "replaced corrupt pending entries in Redis");
        }
        let seqs: Vec<i64> = (0..batch.len())
            .map(|i| int(&v[2 * i]).unwrap_or(-1))
            .collect();
        self.note_acked(&seqs);
        let short = match (self.replication, replicas) {
            (Some(r), Some(got)) if got < r.replicas => {
                metrics::counter!("fga_wb_redis_under_replicated_total").increment(1);
                warn_under_replicated(r, got);
                r.fail.then_some(Error::new(Kind::UnderReplicated {
                    wanted: r.replicas,
                    got,
                    timeout: r.timeout,
                }))
            }
            _ => None,
        };
        for (i, p) in batch.into_iter().enumerate() {
            let reply = if seqs[i] < 0 {
                Err(Error::new(Kind::BufferFull {
                    capacity: self.capacity,
                    waited: None,
                }))
            } else if let Some(e) = &short {
                Err(e.clone())
            } else {
                Ok(Pushed {
                    coalesced: int(&v[2 * i + 1]).unwrap_or(0) == 1,
                    pending,
                })
            };
            let _ = p.reply.send(reply);
        }
    }

    /// The push script and `WAIT` in one pipeline on this connection, so
    /// the WAIT covers exactly the pushes sent before it.
    pub(crate) async fn invoke_and_wait(
        &self,
        inv: &redis::ScriptInvocation<'_>,
        r: Replication,
    ) -> Result<(Vec<Value>, Option<u32>)> {
        let mut pipe = redis::pipe();
        pipe.invoke_script(inv)
            .cmd("WAIT")
            .arg(r.replicas)
            .arg(r.timeout.as_millis() as u64);
        let mut conn = self.conn.clone();
        let mut reply: redis::RedisResult<(Value, u32)> = pipe.query_async(&mut conn).await;
        if matches!(&reply, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript))
        {
            // A pipeline does not load a script by itself; the push did
            // not run, so sending it again is safe.
            inv.load_async(&mut conn).await.map_err(redis_error)?;
            reply = pipe.query_async(&mut conn).await;
        }
        let (v, got) = reply.map_err(redis_error)?;
        Ok((items(v)?, Some(got)))
    }

    /// Remembers the highest sequence number acknowledged; one at or below
    /// it means Redis went back (see `Watch`): look at once.
    pub(crate) fn note_acked(&self, seqs: &[i64]) {
        let Some(max) = seqs.iter().copied().filter(|s| *s > 0).max() else {
            return;
        };
        let min = seqs.iter().copied().filter(|s| *s > 0).min().unwrap_or(max);
        let before = self.watch.acked.fetch_max(max as u64, Ordering::Relaxed);
        if (min as u64) <= before {
            self.watch.wake.notify_one();
        }
    }
}

pub(crate) fn answer_all(batch: Vec<PushRequest>, e: &Error) {
    for p in batch {
        let _ = p.reply.send(Err(e.clone()));
    }
}

/// Logs pushes that fewer replicas than asked confirmed, at most every 10 s.
pub(crate) fn warn_under_replicated(r: Replication, got: u32) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = now_ms();
    let last = LAST.load(Ordering::Relaxed);
    if now.saturating_sub(last) >= 10_000
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            wanted = r.replicas,
            got,
            timeout = ?r.timeout,
            "Redis replicas did not confirm pushes within redis.wait_timeout: those ops are on the primary only until they do (fga_wb_redis_under_replicated_total counts such batches)"
        );
    }
}

/// The next batch: what is waiting, and for up to `PUSH_LINGER` more, until
/// there are `want` (or `PUSH_BATCH`). Empty when the channel closed.
pub(crate) async fn collect(rx: &mut mpsc::Receiver<PushRequest>, want: usize) -> Vec<PushRequest> {
    let mut batch = Vec::with_capacity(PUSH_BATCH);
    if rx.recv_many(&mut batch, PUSH_BATCH).await == 0 {
        return batch;
    }
    let until = tokio::time::Instant::now() + PUSH_LINGER;
    while batch.len() < want.min(PUSH_BATCH) {
        let room = PUSH_BATCH - batch.len();
        match tokio::time::timeout_at(until, rx.recv_many(&mut batch, room)).await {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
    batch
}

/// Longest a push waits for others to share its script call.
pub(crate) const PUSH_LINGER: Duration = Duration::from_micros(200);

/// Most push script calls one store has in flight at once.
pub(crate) const PUSH_PIPELINE: usize = 4;

/// Ops waiting that justify a second push call in flight.
pub(crate) const PUSH_PIPELINE_MIN: usize = 32;
