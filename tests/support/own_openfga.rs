//! An OpenFGA server of a test's own, on a SQLite file, that the test can
//! kill and restart without losing data (the shared test server uses the
//! memory datastore, which a restart empties).
#![allow(dead_code)]

use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use fga_wb::openfga::{Client, Secret};
use tokio::process::{Child, Command};

use super::openfga_bin;

/// A random number, without a dependency on `rand`.
fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0);
    h.finish()
}

/// A free loopback port below Linux's ephemeral range (32768+), as
/// scripts/lib/servers.sh picks them, so that no outgoing connection can
/// grab it while the server is down between kill and restart.
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
/// kills the process and removes the dir, also when the test fails.
pub struct OwnOpenFga {
    dir: PathBuf,
    http_port: u16,
    grpc_port: u16,
    /// The preshared key it was started with.
    pub key: String,
    child: Option<Child>,
    starts: u32,
}

impl OwnOpenFga {
    /// Migrates a fresh SQLite datastore and starts the server on it.
    pub async fn start() -> OwnOpenFga {
        let dir = std::env::temp_dir().join(format!(
            "fga-wb-own-openfga-{}-{:x}",
            std::process::id(),
            random()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = OwnOpenFga {
            dir,
            http_port: free_port(),
            grpc_port: free_port(),
            key: format!("own-{:x}", random()),
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

    pub fn datastore_uri(&self) -> String {
        format!("file:{}", self.dir.join("fga.db").display())
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn client(&self) -> Client {
        Client::builder(self.url())
            .api_token(Secret::new(self.key.clone()))
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join(format!("openfga-{}.log", self.starts))
    }

    /// Starts the server (again) on the same ports and datastore and waits
    /// until it reports SERVING.
    pub async fn run(&mut self) {
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

    /// Kills the server (SIGKILL: a crash, no graceful drain) and waits for
    /// it to be gone.
    pub async fn kill(&mut self) {
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
