//! Queue mode with OpenFGA down (issue 4): jobs that fail because OpenFGA is
//! unreachable are rescheduled on the retry schedule, and once it is back
//! everything is applied. This test runs its own OpenFGA (the `openfga`
//! binary `scripts/test` found) on a SQLite file, so that it can stop and
//! restart it without touching the shared test server.

mod support;

use std::collections::BTreeSet;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fga_wb::config::{Mode, StoreKind};
use fga_wb::openfga::{Client, Secret};
use fga_wb::{Config, WriteBehind};
use support::{documents_model, openfga_bin};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A random number, without a dependency on `rand`.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// A free loopback port below Linux's ephemeral range (32768+), so that no
/// outgoing connection can grab it while the server is down.
fn free_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + (random() % 12_768) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-32767");
}

/// An OpenFGA process on a SQLite file in its own temp dir. Dropping it
/// kills the process and removes the dir (kept, with the logs, when the test
/// failed).
struct OwnOpenFga {
    dir: PathBuf,
    http_port: u16,
    grpc_port: u16,
    key: String,
    child: Option<Child>,
    starts: u32,
}

impl OwnOpenFga {
    /// Migrates a fresh SQLite datastore and starts the server on it.
    async fn start() -> OwnOpenFga {
        let dir = std::env::temp_dir().join(format!(
            "fga-wb-queue-outage-{}-{:x}",
            std::process::id(),
            random()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = OwnOpenFga {
            dir,
            http_port: free_port(),
            grpc_port: free_port(),
            key: format!("queue-outage-{:x}", random()),
            child: None,
            starts: 0,
        };
        let out = Command::new(openfga_bin())
            .args(["migrate", "--datastore-engine", "sqlite", "--datastore-uri"])
            .arg(s.datastore_uri())
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .output()
            .await
            .expect("run openfga migrate");
        assert!(
            out.status.success(),
            "openfga migrate failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        s.run().await;
        s
    }

    fn datastore_uri(&self) -> String {
        format!("file:{}", self.dir.join("fga.db").display())
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn client(&self) -> Client {
        Client::builder(self.url())
            .api_token(Secret::new(self.key.clone()))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("openfga-{}.log", self.starts))
    }

    /// Starts the server (again) on the same ports and datastore and waits
    /// until it reports SERVING.
    async fn run(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = std::fs::File::create(self.log_path()).unwrap();
        let child = Command::new(openfga_bin())
            .args(["run", "--datastore-engine", "sqlite", "--datastore-uri"])
            .arg(self.datastore_uri())
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .arg("--grpc-addr")
            .arg(format!("127.0.0.1:{}", self.grpc_port))
            .args([
                "--playground-enabled=false",
                "--metrics-enabled=false",
                "--profiler-enabled=false",
                "--authn-method",
                "preshared",
                "--authn-preshared-keys",
            ])
            .arg(&self.key)
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start openfga");
        self.child = Some(child);

        // Awaiting the process's readiness: poll /healthz, bounded.
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if client.health().await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "openfga exited during startup ({status}): {}",
                    std::fs::read_to_string(self.log_path()).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "openfga not SERVING after 60 s: {}",
                std::fs::read_to_string(self.log_path()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server (SIGKILL) and waits for it to be gone.
    async fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().await.expect("kill openfga");
    }
}

impl Drop for OwnOpenFga {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        if std::thread::panicking() {
            eprintln!("openfga logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Waits for a condition no API call can await, polling; after `limit`,
/// fails the test with `what` and the handle's status.
async fn eventually<F, Fut>(wb: &WriteBehind, what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        if Instant::now() >= deadline {
            let status = wb.status().await;
            panic!("timed out after {limit:?} waiting for {what}\nstatus: {status:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An in-process worker, stopped through its shutdown future; aborted on
/// drop (a failed test).
struct Worker {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<fga_wb::Result<()>>>,
}

impl Worker {
    fn start(config: Config, concurrency: usize) -> Worker {
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(fga_wb::queue::worker::run(config, concurrency, async {
            let _ = rx.await;
        }));
        Worker {
            stop: Some(tx),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = self.task.take().unwrap();
        match tokio::time::timeout(Duration::from_secs(20), task).await {
            Ok(r) => r.expect("worker task").expect("worker ended cleanly"),
            Err(_) => panic!("the worker did not stop within 20 s"),
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

const N: usize = 500;
/// How long OpenFGA stays down: past the first three retry steps.
const DOWN: Duration = Duration::from_secs(6);

fn tuple(i: usize) -> (String, &'static str, String) {
    (
        format!("user:u{i}"),
        "viewer",
        format!("document:d{}", i % 37),
    )
}

/// OpenFGA down in queue mode (own OpenFGA on SQLite, retry schedule 1 s,
/// 2 s, 4 s, 8 s, 8 s): with OpenFGA killed, 500 grants are acknowledged and
/// flushed into 5 jobs; the worker's attempts fail and the jobs are
/// rescheduled, nothing dead-lettered. OpenFGA stays down ~6 s, then
/// restarts on the same port and datastore; the retries then apply
/// everything: OpenFGA holds exactly the 500 tuples, each op counted
/// applied once, no dead letters, nothing pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openfga_down_in_queue_mode_loses_nothing() {
    let mut server = OwnOpenFga::start().await;
    let admin = server.client();
    let store_id = admin.create_store("wb-queue-outage").await.unwrap();
    let model_id = admin
        .write_authorization_model(&store_id, &documents_model())
        .await
        .unwrap();

    let mut c = Config::default();
    c.openfga.api_url = server.url();
    c.openfga.api_token = Secret::new(server.key.clone());
    c.openfga.store_id = store_id.clone();
    c.openfga.model_id = model_id;
    c.openfga.request_timeout = Duration::from_secs(2);
    c.openfga.connect_timeout = Duration::from_millis(500);
    c.buffer.store = StoreKind::Redis;
    c.redis.url = support::redis_url();
    c.flush.mode = Mode::Queue;
    c.flush.batch_size = 1_000_000;
    c.flush.interval = Duration::from_secs(3600);
    c.queue.retry_schedule = [1, 2, 4, 8, 8].map(Duration::from_secs).to_vec();
    c.queue.heartbeat = Duration::from_secs(1);
    c.queue.poll_interval = Duration::from_millis(50);
    let wb = WriteBehind::builder(c.clone())
        .automatic_flush(false)
        .build()
        .await
        .unwrap();
    let worker = Worker::start(c, 4);

    server.kill().await;
    let down_at = Instant::now();
    for i in 0..N {
        let (u, r, o) = tuple(i);
        wb.grant(&u, r, &o).await.unwrap();
    }
    let report = wb.flush().await.unwrap();
    assert_eq!(report.queued as usize, N, "{report:?}");

    eventually(
        &wb,
        "the worker's attempts to fail and be rescheduled",
        Duration::from_secs(DOWN.as_secs()),
        || async {
            let st = wb.status().await.unwrap();
            st.last_flush.is_some_and(|l| {
                l.report.error.is_some() && l.report.requests > 0 && l.report.applied == 0
            })
        },
    )
    .await;
    // Stay down for the scenario's length, watching that nothing is lost
    // or dead-lettered meanwhile.
    while down_at.elapsed() < DOWN {
        let st = wb.status().await.unwrap();
        assert_eq!(st.totals.dead_lettered, 0, "{st:?}");
        assert_eq!(st.totals.applied, 0, "{st:?}");
        assert_eq!(st.pending.in_flight, N, "the jobs own the ops: {st:?}");
        assert_eq!(st.flushing_stopped, None, "an outage is transient: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let q = wb.status().await.unwrap().queue.unwrap();
    assert!(
        q.scheduled + q.pending + q.running > 0,
        "the jobs wait for their retries: {q:?}"
    );

    server.run().await;
    eprintln!("OpenFGA back after {:?}", down_at.elapsed());
    eventually(
        &wb,
        "every op to be applied",
        Duration::from_secs(30),
        || async {
            let st = wb.status().await.unwrap();
            let q = st.queue.unwrap();
            st.pending.total + st.pending.in_flight == 0 && q.pending + q.running + q.scheduled == 0
        },
    )
    .await;
    eprintln!("all applied {:?} after the outage began", down_at.elapsed());
    worker.stop().await;

    let st = wb.status().await.unwrap();
    assert_eq!(
        (
            st.totals.acknowledged as usize,
            st.totals.applied as usize,
            st.totals.dead_lettered
        ),
        (N, N, 0),
        "{st:?}"
    );
    assert!(wb.dead_letters().await.unwrap().is_empty());
    let in_openfga: BTreeSet<String> = admin
        .read_all(&store_id, &Default::default())
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    let expected: BTreeSet<String> = (0..N)
        .map(|i| {
            let (u, r, o) = tuple(i);
            format!("{o}#{r}@{u}")
        })
        .collect();
    assert_eq!(
        in_openfga, expected,
        "OpenFGA holds every acknowledged tuple"
    );
}
