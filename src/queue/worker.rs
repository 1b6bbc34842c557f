//! `fga-wb worker`: applies queued write jobs.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{BoxDynError, Data, WorkerBuilder, WorkerBuilderExt};
use apalis_core::backend::custom::BackendBuilder;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::Task;
use apalis_core::worker::context::WorkerContext;
use futures::stream::{BoxStream, StreamExt};
use futures::SinkExt;

use super::{decode, Job, JobOp};
use crate::buffer::redis::{now_ms, FetchedJob, RedisStore};
use crate::buffer::{op_of, unreadable_outcome, Claim, JobEnd, Outcome, Store, StoreEvent, Taken};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::flush::{add_one, publish_pending, remove_one, Engine, QuickRetries, Stop, STRAY_EVERY};

/// A busy key (a writer presumed dead still holds it) is tried again this
/// soon, at the same attempt.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// Jobs a worker runs per request it keeps in flight: while some jobs are
/// fetched or record their outcomes (Redis round trips), others' requests
/// fill the `queue.worker_concurrency` slots, so OpenFGA always has that
/// many to work on.
const JOBS_PER_WRITE: usize = 2;

/// What a worker needs to apply a job.
pub(crate) struct Applier {
    engine: Engine,
    store: Arc<RedisStore>,
    schedule: Vec<Duration>,
    request_retries: u32,
    /// `queue.replay_limit`: most replays of one tuple's letters an hour.
    replay_limit: u32,
    /// One permit per request in flight (`queue.worker_concurrency`).
    writes: tokio::sync::Semaphore,
    /// The store's count of transient letters ever written when a look
    /// last found none to replay, and when: while it stays, no need to
    /// list them all, for up to an hour (letters left for an operator
    /// are replayable again once their hour has passed).
    none_transient_at: std::sync::Mutex<Option<(u64, std::time::Instant)>>,
    /// Who holds this worker's ops: jobs handed to apalis and not yet
    /// ended, and a replay's take until its enqueue (see `Holding`).
    holding: Arc<Holding>,
    /// Jobs waiting out a Write whose outcome is unknown (see
    /// [`Engine::wait_out`]), apart from apalis's job slots: a brownout's
    /// timeouts would otherwise fill them all, and the worker would fetch
    /// nothing until the holds end. A stop waits for them.
    holds: tokio_util::task::TaskTracker,
    /// One permit per job waiting out a hold in `holds`.
    held_jobs: Arc<tokio::sync::Semaphore>,
    /// Cancelled when the worker's run ends or its future is dropped: the
    /// jobs in `holds` then stop waiting (see `run_worker`).
    stopped: tokio_util::sync::CancellationToken,
}

/// A job whose request has been sent: what ending it needs.
struct Written {
    job: Job,
    id: String,
    /// The term the job was fetched in.
    term: u64,
    result: crate::flush::ChunkResult,
    /// Ops ended without a request (unreadable in the job).
    unreadable: Vec<(Taken, Outcome)>,
    started: std::time::Instant,
}

/// What a worker holds in Redis to its knowledge: whatever else Redis
/// names it as holding is stray (a fetch or take whose reply was lost, a
/// finish that never got through) and goes back.
#[derive(Default)]
struct Holding {
    /// Jobs fetched and not yet ended, by id and the term they were
    /// fetched in (a job handed back and fetched again may run twice at
    /// once).
    jobs: std::sync::Mutex<BTreeMap<(String, u64), usize>>,
    /// Held by a replay between its take and its enqueue, and by the look
    /// for strays.
    taking: tokio::sync::Mutex<()>,
}

/// A fetched job's hold: ends when the job does, however it ends.
struct JobHold {
    holding: Arc<Holding>,
    job: (String, u64),
}

impl JobHold {
    fn new(holding: &Arc<Holding>, id: &str, term: u64) -> JobHold {
        let job = (id.to_owned(), term);
        add_one(&mut holding.running(), job.clone());
        JobHold {
            holding: holding.clone(),
            job,
        }
    }
}

impl Drop for JobHold {
    fn drop(&mut self) {
        remove_one(&mut self.holding.running(), std::mem::take(&mut self.job));
    }
}

impl Holding {
    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, u64), usize>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives back whatever Redis names the worker as holding besides the
    /// jobs it runs, if it did not look within `STRAY_EVERY` and no replay
    /// holds taken ops.
    async fn give_back_strays(&self, store: &RedisStore, looked: &mut Option<std::time::Instant>) {
        if looked.is_some_and(|t| t.elapsed() < STRAY_EVERY) {
            return;
        }
        // Jobs are only handed out by the fetching stream this runs in.
        let Ok(_quiet) = self.taking.try_lock() else {
            return;
        };
        *looked = Some(std::time::Instant::now());
        // A run from an earlier term never ends its job (see `end`): the
        // job may be stray in this one.
        let term = store.term();
        let running: Vec<String> = self
            .running()
            .keys()
            .filter(|(_, t)| *t == term)
            .map(|(id, _)| id.clone())
            .collect();
        match store.give_back_stray_jobs(&running).await {
            Ok((0, 0)) => {}
            Ok((ops, jobs)) => tracing::warn!(ops, jobs, "gave back ops and jobs Redis named this worker as holding though it was not (a reply lost on the way); they are pending or queued again"),
            Err(e) => tracing::warn!(error = %e, "cannot look for jobs this worker holds in Redis without knowing"),
        }
    }
}

impl Applier {
    /// Applies a job. Never fails the job: ops end applied, dead-lettered,
    /// superseded, or with the job rescheduled at the next retry step.
    #[tracing::instrument(level = "info", name = "fga_wb.job", skip_all, fields(id = job.id, ops = job.ops.len(), attempt = job.attempt))]
    async fn apply(
        self: &Arc<Self>,
        job: Job,
        claims: Vec<Claim>,
        term: u64,
        hold: Arc<JobHold>,
    ) -> Result<()> {
        let started = std::time::Instant::now();
        let id = job.id.to_string();
        // An op of an unknown kind never gets here (see `runnable`). One
        // whose condition cannot be read is dead-lettered
        // unless it is stale (then it is dropped as such): kept in the job
        // for a retry, it would be stored without its condition.
        let mut unreadable = Vec::new();
        let (taken, claims): (Vec<Taken>, Vec<Claim>) = job
            .ops
            .iter()
            .zip(claims.into_iter().chain(std::iter::repeat(Claim::Stale)))
            .filter_map(|(o, c)| match o.taken(job.attempt, term)? {
                (t, Some(reason)) if !matches!(c, Claim::Stale) => {
                    unreadable.push((t, unreadable_outcome(&o.key, reason)));
                    None
                }
                (t, _) => Some((t, c)),
            })
            .unzip();
        let model = (!job.model_id.is_empty()).then_some(job.model_id.as_str());
        // Never closed; without a permit the job would write anyway.
        let slot = self.writes.acquire().await.ok();
        // A failed request is sent again once at once (a blip such as a busy
        // database), conflicts a few times; then the retry schedule.
        let retries = QuickRetries {
            transient: self.request_retries,
            conflicts: self.request_retries.max(5),
        };
        let result = self
            .engine
            .write_chunk_as(Some(claims), model, taken, retries)
            .await;
        drop(slot);
        // OpenFGA answered every request it was sent, so it took the
        // credentials (all of a job's ops may be superseded or refused).
        // Said now: after a hold it could clear a stop met since. And
        // published now: the job may end without recording (a hold, a
        // changed term), and the look past the stop no longer runs.
        if result.requests > 0 && result.stop.is_none() {
            if let Some(was) = self.engine.stats.stopped() {
                self.engine.end_stop(&was).await;
            }
        }
        let (unsure_at, outcomes) = (result.unsure_at, result.outcomes.len());
        let written = Written {
            job,
            id,
            term,
            result,
            unreadable,
            started,
        };
        let Some(at) = unsure_at else {
            let ended = self.end(written).await;
            drop(hold);
            return ended;
        };
        // The job stays running, so its keys stay claimed: no newer op on
        // them is written while the request may still land. It waits apart
        // from its apalis slot, which fetches the next job meanwhile, while
        // fewer than twice `worker_concurrency` jobs wait so (as inline,
        // twice `max_parallel_requests` chunks): in an outage the worker
        // then stops fetching, rather than spend every queued job's retries.
        let apart = self.held_jobs.clone().try_acquire_owned().ok();
        let me = self.clone();
        let waited = async move {
            if !me.engine.wait_out(at, outcomes).await {
                // Shutdown cut the hold short: the job stays running, and
                // goes back to the queue when this worker's lease (kept
                // until the hold's end) ends, not before.
                tracing::warn!(job = %written.id, "stopping within the hold of a Write whose outcome is unknown; the job runs again once it can no longer land");
                return;
            }
            if let Err(e) = me.end(written).await {
                tracing::error!(error = %e, "job could not be applied or rescheduled");
            }
            drop(hold);
        };
        match apart {
            Some(permit) => {
                let stopped = self.stopped.clone();
                let waited = async move {
                    // Stopped: the job stays running in Redis, as when a
                    // shutdown cuts the hold short.
                    tokio::select! {
                        () = waited => {}
                        () = stopped.cancelled() => {}
                    }
                    drop(permit);
                };
                self.holds.spawn(tracing::Instrument::instrument(
                    waited,
                    tracing::Span::current(),
                ));
            }
            None => waited.await,
        }
        Ok(())
    }

    /// Ends a job whose request was sent (and waited out, if its outcome
    /// was unknown): records the outcomes, and reschedules or dead-letters
    /// what failed.
    async fn end(&self, w: Written) -> Result<()> {
        let Written {
            job,
            id,
            term,
            result,
            unreadable,
            started,
        } = w;
        if self.store.term() != term {
            // This worker's lease ended while it ran the job, and the job
            // went back to the queue (another worker may be running it):
            // it is not this worker's to end. Whatever it wrote before is
            // written again by the next run, as claimed then.
            tracing::warn!(job = %id, "the job was handed to other workers while this one was paused; left to them");
            return Ok(());
        }
        let error = result.stop.as_ref().map(|s| match s {
            Stop::Transient(e) | Stop::Halt(e) => e.clone(),
        });
        let halted = match &result.stop {
            Some(Stop::Halt(e)) => !self.refused_for_its_model(&job, e).await,
            _ => false,
        };
        let mut done = unreadable;
        let (mut again, mut busy) = (Vec::new(), Vec::new());
        for (t, o) in result.outcomes {
            match o {
                Outcome::Retry => again.push(t),
                Outcome::Busy => busy.push(t),
                other => done.push((t, other)),
            }
        }
        let reason = error.as_ref().map(ToString::to_string).unwrap_or_default();
        let step = job.attempt as usize;
        // When (and at which attempt) the job runs again, if it does.
        let mut next: Option<(Duration, u32)> = None;
        if !busy.is_empty() {
            // Not a failure: wait for the other writer, same attempt.
            next = Some((BUSY_RETRY, job.attempt));
        }
        // Not sent (the worker's lease is ending): no attempt was used, so
        // none of the schedule is, nor is the job given up.
        let unsent = error.as_ref().is_some_and(Error::is_busy);
        if !again.is_empty() {
            if unsent {
                next = Some((BUSY_RETRY, job.attempt));
            } else if halted {
                // Bad credentials or an unknown store: nothing to dead-letter,
                // everything to keep. Try again at the slowest step.
                tracing::error!(error = %reason, ops = again.len(), "OpenFGA refused the worker; ops kept");
                self.engine.stats.set_stopped(error.clone());
                let wait = self.schedule.last().copied().unwrap_or(BUSY_RETRY);
                next = Some((wait, job.attempt));
            } else if let Some(&step_wait) = self.schedule.get(step) {
                // Never sooner than the server asked (429, 503).
                let wait = error
                    .as_ref()
                    .and_then(Error::retry_after)
                    .map_or(step_wait, |r| r.max(step_wait));
                tracing::warn!(error = %reason, ops = again.len(), retry_in = ?wait, "write failed; retry scheduled");
                next = Some((wait, job.attempt + 1));
            } else {
                let why = format!("gave up after {} attempts: {reason}", step + 1);
                tracing::error!(reason = %why, ops = again.len(), "dead-lettering");
                let code = error.as_ref().and_then(|e| e.code().map(str::to_owned));
                done.extend(again.drain(..).map(|t| {
                    (
                        t,
                        Outcome::Dead {
                            reason: why.clone(),
                            code: code.clone(),
                            transient: true,
                        },
                    )
                }));
            }
        }
        let end = match next {
            None => JobEnd::Done {
                id: id.clone(),
                term,
            },
            Some((wait, attempt)) => {
                let kept: Vec<JobOp> = again.iter().chain(&busy).map(JobOp::from).collect();
                let retry = Job {
                    ops: kept,
                    attempt,
                    last_error: error
                        .as_ref()
                        .map(ToString::to_string)
                        .or(job.last_error.clone()),
                    ..job.clone()
                };
                let json = serde_json::to_string(&retry)
                    .map_err(|e| Error::internal(format!("cannot encode a job: {e}")))?;
                JobEnd::Retry {
                    id: id.clone(),
                    term,
                    due_ms: now_ms() + wait.as_millis() as u64,
                    json,
                }
            }
        };
        done.extend(again.into_iter().map(|t| (t, Outcome::Keep)));
        done.extend(busy.into_iter().map(|t| (t, Outcome::Busy)));
        let finished = self.store.finish(done, Some(&end)).await?;
        if finished.repended > 0 {
            // Revokes pending again (a newer op on their tuples was refused
            // for good): queued now, as a flush would, since no application
            // process need be running.
            if let Err(e) = self.queue_pending().await {
                tracing::warn!(error = %e, "cannot queue revokes pending again; the next flush does");
            }
        }
        let mut report = crate::status::FlushReport {
            requests: result.requests,
            duration: started.elapsed(),
            error: error.map(|e| e.to_string()),
            ..Default::default()
        };
        // Counted here as an application's flusher counts its chunks: a
        // worker's metrics are the only ones that see jobs end.
        self.engine.account(&finished, &mut report);
        self.engine.record(&report).await;
        Ok(())
    }
}

fn handle(
    (job, claims, term, hold): Fetched,
    applier: Data<Arc<Applier>>,
) -> futures::future::BoxFuture<'static, std::result::Result<(), BoxDynError>> {
    let applier: Arc<Applier> = (*applier).clone();
    // Boxed here, at a concrete type: the job's future borrows strings, and
    // apalis's generic handler bound cannot see that it is Send otherwise.
    Box::pin(async move {
        // An Err would only make apalis log it: the job's state is in
        // Redis, and a job left running by a failed finish goes back to the
        // queue at this worker's next look for strays.
        let result: Result<()> = applier.apply(job, claims, term, hold).await;
        result.map_err(|e| {
            tracing::error!(error = %e, "job could not be applied or rescheduled");
            Box::new(e) as BoxDynError
        })
    })
}

/// A fetched job, the claims its ops got, the worker's term then, and the
/// job's hold (shared: apalis wants tasks it can clone).
type Fetched = (Job, Vec<Claim>, u64, Arc<JobHold>);
type JobStream = BoxStream<'static, std::result::Result<Option<Task<Fetched>>, BoxDynError>>;
/// `job` if each of its ops is of a known kind and has a claim (Redis
/// answers one per op it listed for the job): else it is set aside. A
/// worker of a version before claim lists were dropped on a retry leaves
/// the list of the job as first queued beside JSON with fewer ops; paired
/// by place, claims would land on the wrong ops (an op superseded since
/// written over the newer one, another left held by a job that is gone).
/// An op of unknown kind, left out, would stay held by the job for good.
/// Set aside, the job's ops are pending again, as Redis holds them.
fn runnable(job: Job, claims: usize) -> Result<Job> {
    if claims != job.ops.len() {
        return Err(Error::internal(format!(
            "job {} lists {} ops, and Redis claimed {claims} for it: its claim list is another version's",
            job.id,
            job.ops.len()
        )));
    }
    if let Some(o) = job.ops.iter().find(|o| op_of(&o.op).is_none()) {
        return Err(Error::internal(format!(
            "job {} has an op of unknown kind {:?}",
            job.id, o.op
        )));
    }
    Ok(job)
}

/// Jobs are queued by flushes, never through apalis.
type NoSink = std::pin::Pin<Box<dyn futures::Sink<Task<Fetched>, Error = BoxDynError> + Send>>;

fn never(e: std::convert::Infallible) -> BoxDynError {
    match e {}
}

/// Due jobs, one at a time, as fast as the worker takes them: fetched when
/// the worker has room, woken by new jobs (pub/sub) and else polled. Each
/// job holds `holding` until it ends.
fn jobs(
    store: Arc<RedisStore>,
    holding: Arc<Holding>,
    poll: Duration,
    stats: Arc<crate::status::Stats>,
) -> JobStream {
    let events = Arc::new(tokio::sync::Notify::new());
    // Ends with the stream (and so with the worker).
    let listener = store.events().map(|subscribe| {
        let events = events.clone();
        tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            if let Ok(mut stream) = subscribe.await {
                while let Some(ev) = stream.next().await {
                    if matches!(
                        ev,
                        StoreEvent::Jobs | StoreEvent::Finished | StoreEvent::All
                    ) {
                        events.notify_one();
                    }
                }
            }
        }))
    });
    let state = (store, events, holding, None);
    // Since when a stopped worker has fetched nothing (or last fetched a
    // job anyway).
    let tried = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    futures::stream::unfold(state, move |(store, events, holding, mut looked)| {
        let _owned = &listener;
        let (stats, tried) = (stats.clone(), tried.clone());
        async move {
        loop {
            holding.give_back_strays(&store, &mut looked).await;
            if stats.halted().is_some() {
                // OpenFGA refused this worker (credentials, the store): a
                // job fetched now would most likely be refused too, one
                // Write per due job. Its look (`look_past_stop`) ends the
                // stop once OpenFGA answers a read; credentials that may
                // write but not read are found by one job per look.
                let wait = {
                    let mut last = tried.lock().unwrap_or_else(|p| p.into_inner());
                    let wait = last.is_none_or(|t| t.elapsed() < STOP_LOOK);
                    if last.is_none() || !wait {
                        *last = Some(std::time::Instant::now());
                    }
                    wait
                };
                if wait {
                    tokio::time::sleep(poll).await;
                    continue;
                }
            } else {
                *tried.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            match store.fetch_jobs(1).await {
                Ok((term, found)) => {
                    for FetchedJob { id, json, claims } in found {
                        // A job is finished under the id its JSON says: one
                        // stored under another (copied, restored) would
                        // never end the run Redis holds it in.
                        let decoded = decode(&json)
                            .and_then(|job| match job.id.to_string() == id {
                                true => Ok(job),
                                false => Err(Error::internal(format!(
                                    "a queued job stored as {id} says it is job {}",
                                    job.id
                                ))),
                            })
                            .and_then(|job| runnable(job, claims.len()));
                        match decoded {
                            Ok(job) => {
                                let hold = Arc::new(JobHold::new(&holding, &id, term));
                                let task = TaskBuilder::new((job, claims, term, hold)).build();
                                return Some((Ok(Some(task)), (store, events, holding, looked)));
                            }
                            Err(e) => {
                                // Not ours, or corrupt: set aside, loudly;
                                // the ops it held are pending again.
                                match store.drop_bad_job(&id).await {
                                    Ok(back) => {
                                        tracing::error!(error = %e, job = %id, ops_back_to_pending = back, "set aside a job that does not decode");
                                        let _ = store
                                            .set_note("last_bad_job", format!("job {id} does not decode ({e}); set aside, its {back} ops pending again"))
                                            .await;
                                    }
                                    // It stays this worker's: the look for
                                    // strays hands it back, and it comes
                                    // here again.
                                    Err(why) => tracing::error!(error = %e, job = %id, cause = %why, "a job that does not decode could not be set aside yet"),
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot fetch jobs; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            let _ = tokio::time::timeout(poll, events.notified()).await;
        }
        }
    })
    .boxed()
}

/// Runs one worker until `shutdown` completes, then lets running jobs finish
/// (up to `flush.shutdown_deadline`). Dropping the future stops the worker
/// at once: what it spawned ends with it, its lease is no longer renewed,
/// and the jobs it was running go to other workers once a Write of theirs
/// can no longer land (its lease, then `flush.unknown_outcome_hold`).
pub fn run(
    config: Config,
    concurrency: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> futures::future::BoxFuture<'static, Result<()>> {
    Box::pin(run_worker(config, concurrency, shutdown))
}

async fn run_worker(
    config: Config,
    concurrency: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut config = config;
    config.queue.worker_concurrency = concurrency;
    // `--concurrency` comes after the config was checked (0 is refused).
    config.validate()?;
    let applier = Arc::new(applier(&config).await?);
    let replay_applier = applier.clone();
    let deadline_applier = applier.clone();
    let store = applier.store.clone();
    let name = store.writer().to_owned();
    tracing::info!(worker = %name, concurrency, "worker started");
    let poll = config.queue.poll_interval;
    let fetch_store = store.clone();
    let holding = applier.holding.clone();
    let stats = applier.engine.stats.clone();
    let backend = BackendBuilder::new()
        .database(())
        .fetcher(move |_: &mut (), _: &(), _: &WorkerContext| -> JobStream {
            jobs(fetch_store.clone(), holding.clone(), poll, stats.clone())
        })
        .sink(|_: &mut (), _: &()| -> NoSink {
            Box::pin(futures::sink::drain().sink_map_err(never))
        })
        .build()
        .map_err(|e| Error::internal(format!("cannot build the worker's backend: {e}")))?;
    let worker = WorkerBuilder::new(name)
        .backend(backend)
        .data(applier)
        .concurrency(
            config
                .queue
                .worker_concurrency
                .saturating_mul(JOBS_PER_WRITE),
        )
        .build(handle);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = tx.send(());
        Ok::<(), std::io::Error>(())
    };
    let grace = config.flush.shutdown_deadline;
    // What the worker spawns ends with this function, also when its future
    // is dropped (an application's `select!`): else the replayer and jobs
    // waiting out holds would keep the store, and so the heartbeat that
    // renews the worker's lease, alive for good, and the jobs it held
    // would never go back to the queue.
    let _stop_holds = deadline_applier.stopped.clone().drop_guard();
    let replay = config.queue.replay_transient;
    let replayer = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(look_again(
        replay_applier,
        match replay.is_zero() {
            true => STOP_LOOK,
            false => replay.min(STOP_LOOK),
        },
        (!replay.is_zero()).then_some(replay),
    )));
    let running: futures::future::BoxFuture<'static, _> = Box::pin(worker.run_until(signal));
    // From the stop on: outcomes Redis does not take are not repeated past
    // the grace, nor do jobs wait out holds past it (see
    // `Engine::wait_out`), with time left to end them before it is over.
    // Set once; returns when the grace ends.
    let stop = std::sync::OnceLock::new();
    let stopping = || {
        *stop.get_or_init(|| {
            let now = tokio::time::Instant::now();
            if let Some(at) = now.into_std().checked_add(grace) {
                store.stop_retrying_at(at);
            }
            let end = now + grace.saturating_sub(HOLD_END_MARGIN).max(grace / 2);
            deadline_applier
                .engine
                .retry_deadline
                .send_replace(Some(end));
            now + grace
        })
    };
    let mut cut_off = false;
    let result = tokio::select! {
        r = running => r.map_err(|e| Error::internal(format!("worker stopped: {e}"))),
        // Read while the jobs still run: dropped, they are no longer
        // counted.
        under_way = async {
            let _ = rx.await;
            stopping();
            tokio::time::sleep(grace).await;
            deadline_applier.engine.writes_under_way()
        } => {
            match under_way {
                0 => tracing::warn!("shutdown deadline passed with jobs running (recording their outcomes or waiting out holds); they run again on another worker once this worker's lease ends"),
                n => tracing::warn!(writes_cut_off = n, "shutdown deadline passed with jobs' Writes under way; they run again on another worker once this worker's lease, kept until those Writes can no longer land, ends"),
            }
            cut_off = under_way > 0;
            Ok(())
        }
    };
    replayer.abort();
    // Jobs waiting out holds end them by the holds' deadline, then record
    // their outcomes; one still at it stays this worker's until its lease
    // ends (kept to the end of its hold, see `Engine::release_lease`).
    let holds = &deadline_applier.holds;
    holds.close();
    if !holds.is_empty() {
        let _ = tokio::time::timeout_at(stopping(), holds.wait()).await;
    }
    // Whatever this worker still holds goes back at once, unless a job was
    // cut off mid-write or in a hold (then when the kept lease ends).
    deadline_applier
        .engine
        .release_lease(result.is_err() || cut_off)
        .await;
    result
}

/// At shutdown, holds end this long before the grace does: the jobs then
/// record their outcomes (Redis round trips) before the worker stops.
const HOLD_END_MARGIN: Duration = Duration::from_secs(1);

/// How often a worker reads the store's backlog for its pending-ops gauges
/// (and queues ops no application took: see `Applier::queue_orphans`).
const PENDING_GAUGES_EVERY: Duration = Duration::from_secs(5);

/// Pending ops at least this old (and twice `flush.interval`) are queued
/// by a worker itself while no application process runs.
const ORPHANED_AFTER: Duration = Duration::from_secs(5);

/// How often, at most, a worker whose flushing stopped asks OpenFGA again.
const STOP_LOOK: Duration = Duration::from_secs(30);

/// Every `every`: a worker whose flushing stopped asks OpenFGA again (see
/// [`Applier::look_past_stop`]); every `replay`, if dead letters died of
/// transient causes and OpenFGA answers, replays them (superseded ones are
/// dropped, see [`crate::buffer::Store::replay_dead_letters`]) and queues
/// their jobs; every 5 s, it reads the store's backlog for the pending-ops
/// gauges, and queues ops that no application took.
async fn look_again(applier: Arc<Applier>, every: Duration, replay: Option<Duration>) {
    let ticks = |d: Duration| {
        let mut t = tokio::time::interval(d);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    };
    let mut stop_tick = ticks(every);
    // Each on its own clock: one cadence never skips the other's ticks.
    let mut replay_tick = replay.map(ticks);
    let mut gauge_tick = ticks(PENDING_GAUGES_EVERY);
    loop {
        tokio::select! {
            _ = stop_tick.tick() => applier.look_past_stop().await,
            // A worker's `/metrics` shows the store's backlog too: with the
            // applications down, a worker is all that is left to show it
            // (a gauge left at its first zero would hide a stuck backlog).
            _ = gauge_tick.tick() => {
                match applier.store.pending().await {
                    Ok(p) => {
                        publish_pending(&p);
                        applier.queue_orphans(&p).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot read the backlog for the pending-ops gauges"),
                }
            }
            _ = async {
                match replay_tick.as_mut() {
                    Some(t) => t.tick().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Err(e) = applier.replay_transient().await {
                    tracing::warn!(error = %e, "cannot replay transient dead letters yet; trying again later");
                }
            }
        }
    }
}

impl Applier {
    /// Whether OpenFGA answers for the worker's store: it exists, and the
    /// worker's credentials read it. OpenFGA's model reads answer for a
    /// store that does not exist (with no models), so the store itself is
    /// asked; where its access control lets the credentials write but not
    /// read stores (a 403 there), the latest model's read stands for it.
    async fn store_answers(&self) -> bool {
        let (client, store) = (&self.engine.client, &self.engine.store_id);
        match client.get_store(store).await {
            Ok(()) => true,
            // A store that does not exist lists no models.
            Err(e) if e.is_auth() => matches!(
                client.read_latest_authorization_model(store).await,
                Ok(Some(_))
            ),
            Err(_) => false,
        }
    }

    /// Whether OpenFGA refused the job for the model it is pinned to (one
    /// the application named that the store lacks, or that OpenFGA cannot
    /// use) while the store itself answers: the job's fault, not this
    /// worker's. The job then follows the retry schedule to a dead letter
    /// (replayable, under the replaying process's model). Stopping the
    /// worker instead kept its ops held for good: the stop ends at the
    /// worker's next look, which reads the store's latest model, and the
    /// job came back at the slowest step with its attempt unspent, again
    /// and again. Any doubt (a read that fails, the job's model the
    /// store's latest) stops the worker, as before.
    async fn refused_for_its_model(&self, job: &Job, e: &Error) -> bool {
        if job.model_id.is_empty() || !e.is_not_found() {
            return false;
        }
        let (client, store) = (&self.engine.client, &self.engine.store_id);
        // First the store: to OpenFGA's other reads, one that does not
        // exist has no models, and the job's would be "missing" too.
        if !self.store_answers().await {
            return false;
        }
        let Ok(latest) = client.read_latest_authorization_model(store).await else {
            return false;
        };
        match client.read_authorization_model(store, &job.model_id).await {
            // Missing, or no model id at all.
            Err(read) => read.is_not_found(),
            // There, yet refused: unusable, unless it is the store's own.
            Ok(_) => latest.is_some_and(|l| l.id != job.model_id),
        }
    }

    /// A worker OpenFGA refused (credentials, an unknown store) notes its
    /// flushing as stopped until it completes a request; but the job it
    /// stopped on may go to another worker, which applies it, and leave
    /// this one idle with a note `status --check` and `fga-wb flush
    /// --wait` take for final. So it asks OpenFGA again, and ends the stop
    /// once OpenFGA answers a read with its credentials (credentials that
    /// may read but not write are refused again at its next job).
    async fn look_past_stop(&self) {
        let e = &self.engine;
        let Some(was) = e.stats.stopped() else {
            return;
        };
        let answers = self.store_answers().await;
        // A job refused meanwhile keeps its own stop.
        if answers && e.end_stop(&was).await {
            tracing::info!("OpenFGA answers the worker again: its flushing is no longer stopped");
        }
    }

    /// One look for transient dead letters; see [`look_again`].
    async fn replay_transient(&self) -> Result<()> {
        // Read before the letters: one written meanwhile moves it, and the
        // next look lists them again.
        let written = self
            .store
            .shared_stats()
            .await?
            .get("dead_transient")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let none_at = || {
            self.none_transient_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
        };
        if none_at().is_some_and(|(at, when)| {
            at == written && when.elapsed() < std::time::Duration::from_secs(3600)
        }) {
            return Ok(());
        }
        // OpenFGA answers again (and the credentials work): a cheap read,
        // before the letters are listed: in an outage they pile up, and
        // every worker listing them all on every look would hold Redis.
        if !self.store_answers().await {
            // Not yet: the next look asks again.
            return Ok(());
        }
        let letters = self.store.dead_letters().await?;
        let now = std::time::Instant::now();
        if !letters.iter().any(crate::DeadLetter::given_up_in_an_outage) {
            *none_at() = Some((written, now));
            return Ok(());
        }
        let r = self.store.replay_now(None, true, self.replay_limit).await?;
        if r.replayed + r.superseded + r.kept == 0 {
            // Only letters waiting for an op on their tuple to be written
            // (`Replayed::waiting`), or left for an operator: not again
            // until another letter dies (or their hour has passed).
            *none_at() = Some((written, now));
        }
        if r.left > 0 {
            tracing::warn!(
                left = r.left,
                limit = self.replay_limit,
                "dead letters whose tuples died again after the workers' replays this hour while other writes landed (queue.replay_limit) are left for an operator; see `fga-wb dlq list` for OpenFGA's reasons, and `fga-wb dlq replay` once their cause is fixed"
            );
        }
        if [r.replayed, r.superseded, r.kept, r.waiting]
            .iter()
            .any(|&n| n > 0)
        {
            tracing::info!(
                replayed = r.replayed,
                superseded = r.superseded,
                kept = r.kept,
                waiting = r.waiting,
                "OpenFGA answers again: replayed dead letters that died of transient causes"
            );
        }
        // Queued at once, as a flush would: no application process need be
        // running.
        self.queue_pending().await.map(drop)
    }

    /// Queues what is pending that no application process takes: once
    /// its oldest op is older than a flusher leaves one (twice
    /// `flush.interval`, 5 s at least) while no application process runs
    /// (all died or ended, and what they held came back when their leases
    /// ended), or older than `fga-wb status --check` calls a problem
    /// (`buffer::unflushed_after`) whatever runs (none can flush: cut
    /// off from Redis, stopped on a panic). Workers write what the
    /// applications acknowledged, with or without them; live applications
    /// batch their ops as they are set to.
    async fn queue_orphans(&self, p: &crate::Pending) {
        let Some(age) = p.oldest_age.filter(|_| p.total > 0) else {
            return;
        };
        let interval = self.engine.cfg.interval;
        if age < interval.saturating_mul(2).max(ORPHANED_AFTER) {
            return;
        }
        let late = crate::buffer::unflushed_after(interval, self.store.lease());
        if age < late {
            let apps = self
                .store
                .shared_stats()
                .await
                .ok()
                .and_then(|s| s.get(crate::buffer::LIVE_APPS)?.parse::<usize>().ok());
            if apps != Some(0) {
                return;
            }
        }
        match self.queue_pending().await {
            Ok(0) => {}
            Ok(ops) => tracing::info!(ops, "queued pending ops that no application process took"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot queue pending ops that no application process took; trying again later")
            }
        }
    }

    /// Takes what is pending and queues it in jobs, as an application's
    /// flush would; returns how many ops it queued.
    async fn queue_pending(&self) -> Result<usize> {
        let e = &self.engine;
        let up_to = self.store.last_seq().await?;
        let model = e.model_id.get();
        // Taken ops are this worker's until enqueued: no look for strays
        // meanwhile.
        let _taking = self.holding.taking.lock().await;
        let mut queued = 0;
        loop {
            // Stopping: what is pending stays so, for the application's
            // flushers. A take now could come after the worker released
            // its lease, which would renew it under a new term and hold
            // the ops until that ran out.
            if e.retry_deadline.borrow().is_some() {
                return Ok(queued);
            }
            let ops = self
                .store
                .take(e.max_tuples(), crate::buffer::Take::All, up_to)
                .await?;
            if ops.is_empty() {
                return Ok(queued);
            }
            if let Err(err) = self
                .store
                .enqueue(&e.store_id, model.as_deref(), &ops)
                .await
            {
                // Pending again, for the next flush or look.
                let back = ops.into_iter().map(|t| (t, Outcome::Retry)).collect();
                let f = self.store.finish(back, None).await?;
                // Ops superseded meanwhile end here: counted as coalesced.
                e.account(&f, &mut crate::status::FlushReport::default());
                return Err(err);
            }
            queued += ops.len();
        }
    }
}

/// The applier for `config`: a Redis store and an OpenFGA client.
pub(crate) async fn applier(config: &Config) -> Result<Applier> {
    let kind = match config.queue.replay_transient.is_zero() {
        true => crate::buffer::NOT_REPLAYING_WORKER,
        false => "worker",
    };
    let store = Arc::new(crate::buffer::open_redis(config, kind).await?);
    let model_id = (!config.openfga.model_id.is_empty()).then(|| config.openfga.model_id.clone());
    let client = config.openfga.client()?;
    // The worker writes on the client it checks with: it has no flusher
    // runtime of its own.
    let engine = Engine::new(
        store.clone(),
        client.clone(),
        client,
        config.openfga.store_id.clone(),
        model_id,
        config.flush.clone(),
        Arc::new(crate::cache::CheckCache::new(
            1,
            Duration::from_secs(1),
            None,
        )),
        None,
    );
    Ok(Applier {
        engine,
        store,
        schedule: config.queue.retry_schedule.clone(),
        request_retries: config.queue.request_retries,
        replay_limit: config.queue.replay_limit,
        // Any positive number is a valid setting; a semaphore holds fewer.
        writes: tokio::sync::Semaphore::new(
            config
                .queue
                .worker_concurrency
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        ),
        none_transient_at: std::sync::Mutex::new(None),
        holds: tokio_util::task::TaskTracker::new(),
        stopped: tokio_util::sync::CancellationToken::new(),
        held_jobs: Arc::new(tokio::sync::Semaphore::new(
            config
                .queue
                .worker_concurrency
                .saturating_mul(2)
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        )),
        holding: Arc::default(),
    })
}
