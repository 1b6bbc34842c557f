//! The flusher task and its thread: runs the pump until stopped or shut
//! down.

use super::*;

/// The background task: plans, keeps requests in flight, answers
/// `flush()`, until `stop` turns true or a shutdown command completes.
/// Without `automatic`, only `flush()` and shutdown trigger writes.
pub(crate) async fn run(
    engine: Arc<Engine>,
    mut commands: mpsc::Receiver<Command>,
    mut stop: watch::Receiver<bool>,
    automatic: bool,
) {
    let wake = engine.wake.clone();
    let mut pump = Pump::new(engine, automatic);
    let freed = pump.freed.clone();
    let mut shutdown_reply: Option<oneshot::Sender<(FlushReport, bool)>> = None;
    let mut shutdown_start = FlushReport::default();
    let mut shutdown_began: Option<Instant> = None;
    let mut last_record = Instant::now();
    // Declared last, so dropped first when a panic unwinds this: noted
    // before the waiters' replies go with the pump.
    let _panic = NotePanic(pump.engine.clone());
    loop {
        pump.engine.looking(pump.chunks_running() == 0);
        let due = pump.maybe_plan().await;
        pump.engine.looked(due.is_some());
        pump.fill().await;
        if pump.carry.is_empty() {
            pump.carry_since = None;
        }
        let due = match (due, pump.carry_deadline()) {
            (Some(d), Some(c)) => Some(d.min(c)),
            (d, c) => d.or(c),
        };
        if pump.chunks_running() > 0 {
            pump.engine.sleeping.store(false, Ordering::Release);
        }
        pump.settle();
        if !pump.waiters.is_empty() {
            pump.settle_quiet(false).await;
        }
        if last_record.elapsed() >= RECORD_EVERY || pump.running.is_empty() {
            pump.record().await;
            last_record = Instant::now();
        }
        if let Some(deadline) = pump.shutdown {
            let looked = shutdown_began.is_none_or(|t| pump.strays_seen_since(t));
            let mut idle = pump.running.is_empty() && pump.reached(pump.target) && looked;
            // As `settle_quiet` for a flush(): with nothing of this process
            // left in play, the store says whether any op up to the target
            // is pending (takes that keep overlapping other writers' events
            // never mark the target done).
            if !idle && looked && pump.running.is_empty() && pump.only_store_left(pump.target) {
                idle = matches!(
                    pump.engine.store.pending_up_to(pump.target).await,
                    Ok(false)
                );
            }
            let halted = pump.engine.stats.stopped().is_some();
            // Past the deadline nothing new starts; requests still running
            // get a moment to finish (their ops are then pending or applied,
            // not in flight), and are abandoned after it.
            let now = Instant::now();
            let over =
                now >= deadline && (pump.running.is_empty() || now >= deadline + SHUTDOWN_GRACE);
            if idle || halted || over {
                pump.end_take().await;
                pump.unstage().await;
                pump.record().await;
                let mut r = pump.totals.clone();
                r.applied -= shutdown_start.applied;
                r.dead_lettered -= shutdown_start.dead_lettered;
                r.retried -= shutdown_start.retried;
                r.requests -= shutdown_start.requests;
                r.queued -= shutdown_start.queued;
                r.duration = shutdown_began.map_or(Duration::ZERO, |t| t.elapsed());
                // An error only when something is left: a failure that was
                // retried away is not the shutdown's result.
                r.error = if idle {
                    None
                } else {
                    pump.engine
                        .stats
                        .stopped()
                        .or(pump.last_error.clone())
                        .or_else(|| {
                            Some("the shutdown deadline passed with ops not yet written".into())
                        })
                };
                if let Some(reply) = shutdown_reply.take() {
                    let _ = reply.send((r, pump.cut_off()));
                }
                return;
            }
        }
        let shutdown_at = pump.shutdown.map(|d| {
            if Instant::now() < d {
                d
            } else {
                d + SHUTDOWN_GRACE
            }
        });
        let wake_at = match (due, shutdown_at) {
            (Some(d), Some(s)) => Some(d.min(s)),
            (d, s) => d.or(s),
        };
        tokio::select! {
            biased;
            _ = stop.changed() => {
                pump.stop_now().await;
                return;
            }
            // Something asks to look again now (see `Pump::note_unsure`).
            _ = std::future::ready(()), if pump.replan => {}
            Some((result, held)) = pump.running.next(), if !pump.running.is_empty() => {
                pump.done(result, held);
                pump.park_if_idle();
            }
            w = next_window(&mut pump.taking), if pump.taking.is_some() => {
                pump.taken(w);
                // Before the next take starts (see settle_quiet).
                if !pump.waiters.is_empty() {
                    pump.settle_quiet(true).await;
                }
                pump.park_if_idle();
            }
            cmd = commands.recv() => match cmd {
                None => {
                    pump.stop_now().await;
                    return;
                }
                Some(Command::Flush(reply, up_to)) => {
                    pump.replan = true;
                    pump.add_waiter(reply, up_to).await;
                }
                Some(Command::Shutdown { deadline, reply }) => {
                    pump.replan = true;
                    pump.shutdown = Some(deadline);
                    pump.engine.retry_deadline.send_replace(Some(deadline));
                    pump.engine.store.stop_retrying_at(deadline.into_std());
                    // It tries again, as an explicit flush does, after an
                    // earlier stop (refused credentials, since fixed): the
                    // stop it looks for above is one met during shutdown.
                    pump.try_again();
                    shutdown_start = pump.totals.clone();
                    shutdown_began = Some(Instant::now());
                    pump.strays_wanted = Some(Instant::now());
                    shutdown_reply = Some(reply);
                    if let Ok(s) = pump.engine.store.last_seq().await {
                        pump.raise(s);
                        pump.revoke_target = pump.revoke_target.max(s);
                    }
                }
                Some(Command::Close(reply)) => {
                    pump.end_take().await;
                    pump.stop_now().await;
                    let _ = reply.send(pump.cut_off());
                    return;
                }
            },
            _ = wake.notified() => pump.replan = true,
            // Another chunk may start while this one records its outcomes.
            _ = freed.notified() => {}
            _ = sleep_until(wake_at), if wake_at.is_some() => pump.replan = true,
        }
    }
}

/// Notes a panic unwinding the flusher (see `Engine::flusher_panicked`).
struct NotePanic(Arc<Engine>);

impl Drop for NotePanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.flusher_panicked();
        }
    }
}

/// After the flusher stopped on a panic, gives what it held in a shared
/// store back to the other processes, once no Write it cut off can land
/// any more (`Engine::holds_until`): its lease goes on being renewed (the
/// heartbeat also guards this process's checks), so nothing else would
/// bring them back while the process lives. It looks again every
/// `STRAY_EVERY`, as a live flusher does. Ends when the handle stops:
/// its release (or, dropped, its lease's end) hands them on then, the hold
/// kept. Its stop is recorded for other processes' `status` (its lease
/// lives on, so it counts as a live application).
async fn give_back_after_panic(engine: Arc<Engine>, mut stop: watch::Receiver<bool>) {
    if !engine.store.shared() {
        return;
    }
    engine.record_stop().await;
    let held = *engine.holds_until.lock().unwrap_or_else(|p| p.into_inner());
    let mut at = held.unwrap_or_else(Instant::now);
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => {
                // As a flusher that ended as asked: the lease ends by
                // itself unless a release comes first.
                engine.store.flusher_ended();
                return;
            }
            () = tokio::time::sleep_until(at) => {}
        }
        match engine.store.give_back_strays(None).await {
            Ok((0, _)) => {}
            Ok((ops, _)) => {
                tracing::warn!(ops, "the ops the flusher held when it panicked went back to the store, for other processes to write");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot give the ops the flusher held when it panicked back to the store; retrying");
            }
        }
        // Again later, as a live flusher looks for strays: a take the panic
        // cut off may still run in Redis (the cluster client sends a call
        // again after a dropped connection).
        at = Instant::now() + STRAY_EVERY;
    }
}

/// The flusher's thread: the pump runs on a runtime of its own, so callers
/// granting flat out on the application's runtime (a memory-store grant
/// never waits) cannot starve it, and it never adds to their latency.
pub(crate) struct FlusherThread {
    done: oneshot::Receiver<()>,
}

impl FlusherThread {
    pub(crate) fn spawn(
        engine: Arc<Engine>,
        commands: mpsc::Receiver<Command>,
        stop: watch::Receiver<bool>,
        automatic: bool,
    ) -> crate::Result<FlusherThread> {
        let (tx, done) = oneshot::channel();
        // Its logs and spans go where the builder's did.
        let dispatch = tracing::dispatcher::get_default(Clone::clone);
        // The runtime is built on the thread itself: built here and then
        // dropped with a thread that failed to start, it would panic (a
        // runtime cannot be dropped inside another).
        let (started, start) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("fga-wb-flusher".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = started.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = started.send(Ok(()));
                let store = engine.store.clone();
                let at_end = engine.clone();
                let stopping = stop.clone();
                let panicked = tracing::dispatcher::with_default(&dispatch, || {
                    let pump = std::panic::AssertUnwindSafe(|| {
                        runtime.block_on(run(engine, commands, stop, automatic));
                    });
                    let Err(panic) = std::panic::catch_unwind(pump) else {
                        return false;
                    };
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(panic = %what, "the flusher stopped on a panic (a bug in fga-wb: please report it)");
                    // Noted already, unless it panicked before the pump
                    // was set up.
                    at_end.flusher_panicked();
                    true
                });
                // Ended as asked: the lease is no longer renewed. Not after
                // a panic: the heartbeat also watches for lost ops and
                // reconnects for the checks this process still answers.
                if !panicked {
                    store.flusher_ended();
                }
                // Kept for whoever subscribes later (`send` keeps nothing
                // with no receiver).
                at_end.flusher_ended.send_replace(true);
                let _ = tx.send(());
                if panicked {
                    tracing::dispatcher::with_default(&dispatch, || {
                        runtime.block_on(give_back_after_panic(at_end, stopping));
                    });
                }
            })
            .map_err(|e| Error::internal(format!("cannot start the flusher's thread: {e}")))?;
        // Building a runtime takes microseconds: waiting for it here keeps
        // a failure to build one an error of `build()`.
        match start.recv() {
            Ok(Ok(())) => Ok(FlusherThread { done }),
            Ok(Err(e)) => Err(Error::internal(format!(
                "cannot start the flusher's runtime: {e}"
            ))),
            Err(_) => Err(Error::internal("the flusher's thread ended as it started")),
        }
    }

    /// Waits until the flusher has stopped (after a shutdown command or
    /// `stop`), at most `limit`.
    pub(crate) async fn join(self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.done).await;
    }
}

/// Runs a pump until one `flush()` is answered (unit tests drive an engine
/// without a handle).
#[cfg(test)]
pub(crate) async fn flush_once(engine: Arc<Engine>) -> FlushReport {
    let (tx, rx) = mpsc::channel(1);
    let (_stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(run(engine, rx, stop, false));
    let (reply, answer) = oneshot::channel();
    let _ = tx.send(Command::Flush(reply, None)).await;
    let report = answer.await.unwrap_or_default();
    task.abort();
    report
}

pub(crate) async fn next_window(taking: &mut Option<BoxFuture<'static, Window>>) -> Window {
    match taking {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

pub(crate) async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
