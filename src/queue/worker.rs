//! `fga-wb worker`: applies queued write jobs.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use apalis::prelude::{BoxDynError, Data, WorkerBuilder, WorkerBuilderExt};
use apalis_core::backend::ext::BackendExt;

use super::{storage, ApalisSink, Job, JobOp, JobSink};
use crate::buffer::{Outcome, Taken};
use crate::client::open_store;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::flush::{Engine, QuickRetries, Stop};

/// A busy key (another writer holds it) is tried again this soon.
const BUSY_RETRY: Duration = Duration::from_secs(1);

/// What a worker needs to apply a job.
pub(crate) struct Applier {
    engine: Engine,
    sink: Arc<dyn JobSink>,
    schedule: Vec<Duration>,
}

impl Applier {
    pub(crate) fn new(engine: Engine, sink: Arc<dyn JobSink>, schedule: Vec<Duration>) -> Self {
        Applier {
            engine,
            sink,
            schedule,
        }
    }

    /// Applies a job. Never fails the job: ops end applied, dead-lettered,
    /// superseded, or in a new job scheduled at the next retry step.
    #[tracing::instrument(level = "info", name = "fga_wb.job", skip_all, fields(ops = job.ops.len(), attempt = job.attempt))]
    pub(crate) async fn apply(&self, job: Job) -> Result<()> {
        let started = std::time::Instant::now();
        let taken: Vec<Taken> = job.ops.iter().map(|o| o.taken(job.attempt)).collect();
        // Conflicts (409) are retried at once; other failures go to the
        // retry schedule.
        let result = self
            .engine
            .write_chunk(taken, QuickRetries::ConflictsOnly(3))
            .await;
        let error = match &result.stop {
            Some(Stop::Transient(e)) | Some(Stop::Halt(e)) => Some(e.clone()),
            None => None,
        };
        let halted = matches!(result.stop, Some(Stop::Halt(_)));
        let mut done = Vec::with_capacity(result.outcomes.len());
        let (mut again, mut busy) = (Vec::new(), Vec::new());
        for (t, o) in result.outcomes {
            match o {
                Outcome::Retry => again.push(t),
                Outcome::Busy => busy.push(t),
                other => done.push((t, other)),
            }
        }
        let lease = self.engine.job_lease;
        if !busy.is_empty() {
            // Not a failure: wait for the other writer, same attempt.
            self.requeue(&job, &busy, job.attempt, BUSY_RETRY, None)
                .await?;
            done.extend(busy.into_iter().map(|t| (t, Outcome::Keep(lease))));
        }
        if !again.is_empty() {
            let reason = error.as_ref().map(ToString::to_string).unwrap_or_default();
            let step = job.attempt as usize;
            if halted {
                // Bad credentials or an unknown store: nothing to dead-letter,
                // everything to keep. Try again at the slowest step.
                tracing::error!(error = %reason, ops = again.len(), "OpenFGA refused the worker; ops kept");
                self.engine.stats.set_stopped(Some(reason.clone()));
                let wait = self.schedule.last().copied().unwrap_or(BUSY_RETRY);
                self.requeue(&job, &again, job.attempt, wait, Some(reason))
                    .await?;
                done.extend(again.into_iter().map(|t| (t, Outcome::Keep(lease))));
            } else if let Some(&wait) = self.schedule.get(step) {
                tracing::warn!(error = %reason, ops = again.len(), retry_in = ?wait, "write failed; retry scheduled");
                self.requeue(&job, &again, job.attempt + 1, wait, Some(reason))
                    .await?;
                done.extend(again.into_iter().map(|t| (t, Outcome::Keep(lease))));
            } else {
                let reason = format!("gave up after {} attempts: {reason}", step + 1);
                tracing::error!(%reason, ops = again.len(), "dead-lettering");
                done.extend(again.into_iter().map(|t| {
                    (
                        t,
                        Outcome::Dead {
                            reason: reason.clone(),
                            code: error.as_ref().and_then(|e| e.code().map(str::to_owned)),
                        },
                    )
                }));
            }
        }
        let finished = self.engine.store.finish(done).await?;
        if finished.applied > 0 {
            self.engine.stats.set_stopped(None);
        }
        let report = crate::status::FlushReport {
            applied: finished.applied,
            dead_lettered: finished.dead,
            retried: finished.requeued,
            requests: result.requests,
            duration: started.elapsed(),
            error: error.map(|e| e.to_string()),
            ..Default::default()
        };
        self.engine.record(&report).await;
        Ok(())
    }

    async fn requeue(
        &self,
        job: &Job,
        ops: &[Taken],
        attempt: u32,
        wait: Duration,
        error: Option<String>,
    ) -> Result<()> {
        let next = Job {
            ops: ops.iter().map(JobOp::from).collect(),
            attempt,
            last_error: error.or_else(|| job.last_error.clone()),
            ..job.clone()
        };
        self.sink.push(next, Some(wait)).await
    }
}

/// A worker name no other process uses: apalis refuses a second worker
/// under a name that reported recently.
fn unique_name() -> String {
    format!("fga-wb-worker-{}", crate::buffer::redis::unique_owner())
}

async fn handle(
    payload: super::Payload,
    applier: Data<Arc<Applier>>,
) -> std::result::Result<(), BoxDynError> {
    let job: Job = match serde_json::from_value(payload) {
        Ok(job) => job,
        Err(e) => {
            // Not ours, or corrupt: it holds no op this worker can trust.
            // Drop it with a loud log line rather than stop the worker.
            tracing::error!(error = %e, "skipping a job that is not an fga-wb job");
            let _ = applier
                .engine
                .store
                .set_note("last_bad_job", format!("undecodable job skipped: {e}"))
                .await;
            return Ok(());
        }
    };
    // A plain Err would make apalis-redis re-run the job on its own
    // schedule. Only when even re-queueing failed (Redis down) is that the
    // best left to do.
    applier.apply(job).await.map_err(|e| {
        tracing::error!(error = %e, "job could not be applied or re-queued");
        Box::new(e) as BoxDynError
    })
}

/// Runs one worker until `shutdown` completes, then lets running jobs finish
/// (up to `flush.shutdown_deadline`).
pub async fn run(
    config: Config,
    concurrency: usize,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut config = config;
    config.queue.worker_concurrency = concurrency.max(1);
    let applier = Arc::new(applier(&config).await?);
    let storage = storage(&config).await?;
    let name = unique_name();
    tracing::info!(worker = %name, queue = %super::queue_name(&config), concurrency, "worker started");
    let worker = WorkerBuilder::new(name)
        .backend(storage.poll_with_interval(config.queue.poll_interval))
        .data(applier)
        .concurrency(config.queue.worker_concurrency)
        .build(handle);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = tx.send(());
        Ok::<(), std::io::Error>(())
    };
    let grace = config.flush.shutdown_deadline;
    tokio::select! {
        r = worker.run_until(signal) => r.map_err(|e| Error::invalid_argument(format!("worker stopped: {e}"))),
        _ = async { let _ = rx.await; tokio::time::sleep(grace).await } => {
            tracing::warn!("shutdown deadline passed with jobs running; they will run again on another worker");
            Ok(())
        }
    }
}

/// The applier for `config`: a Redis store, an OpenFGA client, the queue.
pub(crate) async fn applier(config: &Config) -> Result<Applier> {
    let store = open_store(config).await?;
    let sink: Arc<dyn JobSink> = Arc::new(ApalisSink::new(storage(config).await?));
    let model_id = (!config.openfga.model_id.is_empty()).then(|| config.openfga.model_id.clone());
    let client = config.openfga.client()?;
    let engine = Engine {
        store,
        client: client.clone(),
        writer: client,
        store_id: config.openfga.store_id.clone(),
        model_id,
        cfg: config.flush.clone(),
        cache: Arc::new(crate::cache::CheckCache::new(
            1,
            Duration::from_secs(1),
            None,
        )),
        stats: Default::default(),
        changed: tokio::sync::watch::channel(0).0,
        sink: None,
        job_lease: crate::buffer::redis::job_lease(config),
        room_wanted: Default::default(),
        revoke_wanted: Default::default(),
        parallel: Default::default(),
        sleeping: Default::default(),
        timer_armed: Default::default(),
        wake: Default::default(),
        retry_deadline: Default::default(),
    };
    Ok(Applier::new(
        engine,
        sink,
        config.queue.retry_schedule.clone(),
    ))
}
