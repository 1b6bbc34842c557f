use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{on_path, Proc};
use crate::{free_port, random, temp_dir, Error, Result};

/// Where an OpenFGA server keeps its tuples.
#[derive(Clone, Debug, Default)]
pub enum Datastore {
    /// In memory: fast, emptied by a restart.
    #[default]
    Memory,
    /// A SQLite file in the server's temp dir: survives a restart.
    Sqlite,
    /// PostgreSQL, as production runs it; the URI of a database of its own.
    Postgres(String),
}

/// A certificate and key for `--http-tls-*`.
#[derive(Clone, Debug)]
pub struct Tls {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// The CA that signed `cert` (for the health check).
    pub ca: PathBuf,
}

/// How to start an OpenFGA server.
#[derive(Clone, Debug, Default)]
pub struct OpenFgaOptions {
    /// The datastore.
    pub datastore: Datastore,
    /// Turn on every cache OpenFGA has (check query cache, check and
    /// list-objects iterator caches, cache controller), with this TTL.
    pub caches: Option<Duration>,
    /// `--max-tuples-per-write` (OpenFGA's default is 100).
    pub max_tuples_per_write: Option<u32>,
    /// `--grpc-max-recv-msg-bytes`: the largest request it takes (OpenFGA's
    /// default is 616,448 bytes).
    pub max_request_bytes: Option<u32>,
    /// Serve HTTPS with this certificate.
    pub tls: Option<Tls>,
}

/// A throw-away OpenFGA server with a random preshared key.
pub struct OpenFga {
    bin: PathBuf,
    dir: PathBuf,
    http_port: u16,
    grpc_port: u16,
    key: String,
    options: OpenFgaOptions,
    proc: Option<Proc>,
    starts: u32,
}

/// The `openfga` binary: `FGA_WB_TEST_OPENFGA_BIN`, `OPENFGA_BIN`, the
/// scripts' cached build, or `openfga` on PATH.
fn openfga_bin() -> Result<PathBuf> {
    for var in ["FGA_WB_TEST_OPENFGA_BIN", "OPENFGA_BIN"] {
        if let Some(p) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            return Ok(PathBuf::from(p));
        }
    }
    let cache = std::env::var_os("FGA_WB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/fga-wb")));
    if let Some(built) = cache
        .map(|c| c.join("openfga-v1.18.1/openfga"))
        .filter(|p| p.is_file())
    {
        return Ok(built);
    }
    on_path("openfga").ok_or_else(|| {
        Error::new(
            "no openfga binary: run the tests through scripts/test (it builds OpenFGA v1.18.1), \
             or set FGA_WB_TEST_OPENFGA_BIN",
        )
    })
}

impl OpenFga {
    /// Migrates the datastore (SQLite, PostgreSQL) and starts the server.
    pub async fn start(options: OpenFgaOptions) -> Result<OpenFga> {
        let mut s = OpenFga {
            bin: openfga_bin()?,
            dir: temp_dir("openfga")?,
            http_port: free_port()?,
            grpc_port: free_port()?,
            key: format!("key-{:016x}", random()),
            options,
            proc: None,
            starts: 0,
        };
        if let Some((engine, uri)) = s.engine_uri() {
            let out = Command::new(&s.bin)
                .args([
                    "migrate",
                    "--datastore-engine",
                    engine,
                    "--datastore-uri",
                    &uri,
                ])
                .output()
                .map_err(|e| Error::io("run openfga migrate", e))?;
            if !out.status.success() {
                return Err(Error::new(format!(
                    "openfga migrate ({engine}) failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
        }
        s.run().await?;
        Ok(s)
    }

    fn engine_uri(&self) -> Option<(&'static str, String)> {
        match &self.options.datastore {
            Datastore::Memory => None,
            Datastore::Sqlite => Some((
                "sqlite",
                format!("file:{}", self.dir.join("fga.db").display()),
            )),
            Datastore::Postgres(uri) => Some(("postgres", uri.clone())),
        }
    }

    /// The base URL, `http://127.0.0.1:<port>` (https with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.http_port)
    }

    /// The preshared key.
    pub fn token(&self) -> &str {
        &self.key
    }

    /// The options it runs with.
    pub fn options(&self) -> &OpenFgaOptions {
        &self.options
    }

    /// The current log file.
    pub fn log(&self) -> PathBuf {
        self.dir.join(format!("openfga-{}.log", self.starts))
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Starts the server (again) on the same ports and datastore, and waits
    /// until `/healthz` reports SERVING.
    pub async fn run(&mut self) -> Result<()> {
        if self.proc.is_some() {
            return Err(Error::new("openfga is already running"));
        }
        self.starts += 1;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("run");
        match self.engine_uri() {
            None => {
                cmd.args(["--datastore-engine", "memory"]);
            }
            Some((engine, uri)) => {
                cmd.args(["--datastore-engine", engine, "--datastore-uri", &uri]);
            }
        }
        cmd.arg("--http-addr")
            .arg(format!("127.0.0.1:{}", self.http_port))
            .arg("--grpc-addr")
            .arg(format!("127.0.0.1:{}", self.grpc_port))
            .args(["--playground-enabled=false", "--metrics-enabled=false"])
            .args(["--profiler-enabled=false", "--log-level", "warn"])
            .args([
                "--authn-method",
                "preshared",
                "--authn-preshared-keys",
                &self.key,
            ]);
        if let Some(ttl) = self.options.caches {
            let ttl = format!("{}ms", ttl.as_millis());
            for flag in [
                "check-query-cache",
                "check-iterator-cache",
                "list-objects-iterator-cache",
                "cache-controller",
            ] {
                cmd.arg(format!("--{flag}-enabled=true"))
                    .arg(format!("--{flag}-ttl={ttl}"));
            }
        }
        if let Some(n) = self.options.max_tuples_per_write {
            cmd.arg(format!("--max-tuples-per-write={n}"));
        }
        if let Some(n) = self.options.max_request_bytes {
            cmd.arg(format!("--grpc-max-recv-msg-bytes={n}"));
        }
        if let Some(tls) = &self.options.tls {
            cmd.arg("--http-tls-enabled=true")
                .arg("--http-tls-cert")
                .arg(&tls.cert)
                .arg("--http-tls-key")
                .arg(&tls.key);
        }
        let mut proc = Proc::spawn(cmd, &self.log())?;
        let http = health_client(self.options.tls.as_ref().map(|t| t.ca.as_path()))?;
        let url = format!("{}/healthz", self.url());
        proc.wait_ready("openfga", Duration::from_secs(60), || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                match http.get(&url).send().await {
                    Ok(r) => r
                        .text()
                        .await
                        .is_ok_and(|t| t.contains("SERVING") && !t.contains("NOT_SERVING")),
                    Err(_) => false,
                }
            }
        })
        .await?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Kills the server (SIGKILL: a crash, no graceful drain) and waits
    /// until it is gone. The datastore stays for [`OpenFga::run`].
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

fn health_client(ca: Option<&Path>) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder().timeout(Duration::from_secs(2));
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|e| Error::io(format!("read {}", ca.display()), e))?;
        let cert = reqwest::Certificate::from_pem(&pem)
            .map_err(|e| Error::new(format!("{}: {e}", ca.display())))?;
        b = b.add_root_certificate(cert);
    }
    b.build()
        .map_err(|e| Error::new(format!("health-check client: {e}")))
}

impl Drop for OpenFga {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("openfga logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl OpenFga {
    /// The `openfga` binary servers are started from.
    pub fn bin() -> Result<PathBuf> {
        openfga_bin()
    }
}
