//! Pushes: concurrent grants and revokes of a process collected into
//! script calls, a few in flight at once.

use super::calls::CallIds;
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
    /// This process's writer name: Redis counts the ops it accepted from
    /// each writer (see `Watch::pushed`).
    pub(crate) writer: String,
    /// Ids for the calls, on a Redis Cluster: its client sends a call again
    /// after a dropped connection, and a push that ran twice would fold its
    /// older ops over newer ones other writers pushed in between (see
    /// `push` in store.lua). One node's connection never sends a call
    /// twice, and Redis is spared keeping the answers.
    pub(crate) calls: Option<CallIds>,
}

impl Pusher {
    pub(crate) async fn run(self, mut rx: mpsc::Receiver<PushRequest>) {
        let depth = pipeline_depth(self.replication);
        let this = Arc::new(self);
        let mut running = futures::stream::FuturesUnordered::new();
        let mut staged: Vec<PushRequest> = Vec::with_capacity(PUSH_BATCH);
        let mut open = true;
        // How many ops the last call carried: callers woken by its replies
        // come back within microseconds, so the next call waits a moment for
        // about as many, up to PUSH_PIPELINE_MIN: with more callers than
        // that they split into calls queued one behind the other, and Redis
        // runs one while this process hands out the replies of another.
        let mut last = 1;
        loop {
            if !staged.is_empty() && running.is_empty() {
                // Redis has nothing of ours: go now, with what the callers
                // just answered bring back in a moment.
                gather(&mut rx, &mut staged, last.min(PUSH_PIPELINE_MIN)).await;
                last = staged.len();
                let batch = std::mem::replace(&mut staged, Vec::with_capacity(PUSH_BATCH));
                running.push(this.clone().send(batch));
                continue;
            }
            if staged.len() >= PUSH_PIPELINE_MIN && running.len() < depth {
                // Queued behind the call Redis is running, so Redis goes on
                // while this process hands out replies; only when enough ops
                // wait, as small calls cost Redis more per op.
                let batch = std::mem::replace(&mut staged, Vec::with_capacity(PUSH_BATCH));
                running.push(this.clone().send(batch));
                continue;
            }
            let room = PUSH_BATCH - staged.len();
            tokio::select! {
                biased;
                Some(()) = running.next(), if !running.is_empty() => {}
                n = rx.recv_many(&mut staged, room), if open && room > 0 => {
                    if n == 0 {
                        open = false;
                    }
                }
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
        inv.arg(&self.writer);
        let call = self.calls.as_ref().map(|ids| (ids.open(), ids));
        if let Some((call, ids)) = &call {
            inv.arg(call.id).arg(ids.oldest());
        }
        // Until `pushed` counts what it accepted, whatever the reply (see
        // `Watch::unanswered`).
        let _unanswered = Unanswered::new(&self.watch, batch.len() as u64);
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
                // The script ran: its ops may be buffered.
                let e = corrupt(format!(
                    "push returned {} items for {} ops; the ops may be buffered (calling again is safe: the last call wins)",
                    v.len(),
                    batch.len()
                ));
                return answer_all(batch, &e);
            }
            Err(e) => return answer_all(batch, &e),
        };
        let pending = int(&v[v.len() - 2]).unwrap_or(0).max(0) as usize;
        let replaced = int(&v[v.len() - 1]).unwrap_or(0);
        if replaced > 0 {
            tracing::warn!(count = replaced, prefix = %self.prefix, "replaced corrupt pending entries in Redis");
        }
        // -1: refused, the buffer is full. A number it cannot read is not
        // that: the op may be buffered, and the caller hears so.
        let seqs: Vec<Option<i64>> = (0..batch.len()).map(|i| int(&v[2 * i]).ok()).collect();
        self.note_acked(&seqs.iter().flatten().copied().collect::<Vec<i64>>());
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
            let reply = match (seqs[i], &short) {
                (None, _) => Err(corrupt(format!(
                    "push answered {:?} for an op's sequence number; the op may be buffered",
                    v[2 * i]
                ))),
                (Some(s), _) if s < 0 => Err(Error::new(Kind::BufferFull {
                    capacity: self.capacity,
                    waited: None,
                    stopped: None,
                })),
                (_, Some(e)) => Err(e.clone()),
                (Some(s), None) => Ok(Pushed {
                    coalesced: int(&v[2 * i + 1]).unwrap_or(0) == 1,
                    pending,
                    seq: s as u64,
                }),
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

    /// Remembers the highest sequence number acknowledged, and counts the
    /// ops; a number at or below the highest means Redis went back (see
    /// `Watch`): look at once.
    pub(crate) fn note_acked(&self, seqs: &[i64]) {
        let accepted = seqs.iter().filter(|s| **s > 0).count() as u64;
        self.watch.pushed.fetch_add(accepted, Ordering::SeqCst);
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

/// Ops of a push call whose reply is not counted yet, from its start to
/// its end (a dropped call too).
struct Unanswered<'a>(&'a Watch, u64);

impl<'a> Unanswered<'a> {
    fn new(watch: &'a Watch, ops: u64) -> Self {
        watch.unanswered.fetch_add(ops, Ordering::SeqCst);
        Unanswered(watch, ops)
    }
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        self.0.unanswered.fetch_sub(self.1, Ordering::SeqCst);
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

/// Adds to `batch` what callers answered a moment ago bring back, until it
/// holds `want` (or `PUSH_BATCH`) or they stop coming.
///
/// "A moment" is a few yields, not a timer: the callers the last replies
/// woke are queued on this runtime and push as soon as this task yields,
/// while arming a timer of microseconds wakes the runtime's parked driver
/// thread (a syscall per batch) and delays the call by a timer tick.
pub(crate) async fn gather(
    rx: &mut mpsc::Receiver<PushRequest>,
    batch: &mut Vec<PushRequest>,
    want: usize,
) {
    let mut idle = 0;
    while batch.len() < want.min(PUSH_BATCH) && idle < PUSH_YIELDS {
        tokio::task::yield_now().await;
        let before = batch.len();
        while batch.len() < PUSH_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        idle = if batch.len() == before { idle + 1 } else { 0 };
    }
}

/// Yields in a row that bring no new push before a batch goes out.
pub(crate) const PUSH_YIELDS: usize = 2;

/// Most push script calls one store has in flight at once.
pub(crate) const PUSH_PIPELINE: usize = 4;

/// Push calls in flight at once. With `redis.wait_replicas`, each call's
/// `WAIT` holds the connection up to `redis.wait_timeout` while replicas
/// are missing, so the last call in line answers only after the `WAIT`s
/// ahead of it: all of them must fit in the connection's response
/// timeout, or pushes Redis stored fail as timed out (four 10 s waits did).
fn pipeline_depth(replication: Option<Replication>) -> usize {
    match replication {
        None => PUSH_PIPELINE,
        Some(r) => {
            let fits = conn::RESPONSE_TIMEOUT.as_millis() / r.timeout.as_millis().max(1);
            // One wait fewer than fit: room for the calls' own runs.
            usize::try_from(fits.saturating_sub(1))
                .unwrap_or(PUSH_PIPELINE)
                .clamp(1, PUSH_PIPELINE)
        }
    }
}

/// Ops waiting that justify a second push call in flight.
pub(crate) const PUSH_PIPELINE_MIN: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;

    /// Every call in flight waits out its replicas within the response
    /// timeout, whatever `redis.wait_timeout` (1 ms to 10 s) says.
    #[test]
    fn the_waits_in_flight_fit_in_the_response_timeout() {
        assert_eq!(pipeline_depth(None), PUSH_PIPELINE);
        for ms in [1, 100, 5_000, 6_000, 7_500, 9_999, 10_000] {
            let timeout = Duration::from_millis(ms);
            let r = Replication {
                replicas: 1,
                timeout,
                fail: false,
            };
            let depth = pipeline_depth(Some(r));
            assert!((1..=PUSH_PIPELINE).contains(&depth), "{ms} ms: {depth}");
            assert!(
                timeout * depth as u32 + Duration::from_secs(1) < conn::RESPONSE_TIMEOUT,
                "{ms} ms: {depth} in flight"
            );
        }
    }
}
