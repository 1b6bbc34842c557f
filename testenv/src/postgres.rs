use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::process::{on_path, Proc};
use crate::{free_port, temp_dir, Error, Result};

/// A throw-away PostgreSQL cluster on loopback, trust authentication.
///
/// PostgreSQL refuses to run as root; as root, it runs as the `postgres`
/// user that Debian's package creates.
pub struct Postgres {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    run_as: Option<(u32, u32)>,
    proc: Option<Proc>,
}

/// The directory with `initdb` and `postgres`: `FGA_WB_PG_BIN`, Debian's
/// newest `/usr/lib/postgresql/<v>/bin`, or PATH.
fn pg_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FGA_WB_PG_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((v, bin))
        })
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Ok(bin);
    }
    on_path("initdb")
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| {
            Error::new(
                "PostgreSQL is not installed (no initdb): run the tests through scripts/test, \
                 which installs Debian's postgresql, or set FGA_WB_PG_BIN",
            )
        })
}

/// uid and gid of `name` from /etc/passwd.
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name) && f.len() > 3)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))
            .flatten()
    })
}

impl Postgres {
    /// Creates a cluster in a temp dir and starts it.
    pub async fn start() -> Result<Postgres> {
        let bin = pg_bin()?;
        let dir = temp_dir("postgres")?;
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = if root {
            Some(user_ids("postgres").ok_or_else(|| {
                Error::new("running as root, and there is no `postgres` user to run PostgreSQL as: install Debian's postgresql")
            })?)
        } else {
            None
        };
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .map_err(|e| Error::io(format!("chown {}", dir.display()), e))?;
        }
        let mut pg = Postgres {
            bin,
            dir,
            port: free_port()?,
            run_as,
            proc: None,
        };
        let data = pg.dir.join("data");
        let out = pg
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .output()
            .map_err(|e| Error::io("run initdb", e))?;
        if !out.status.success() {
            return Err(Error::new(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        pg.run().await?;
        Ok(pg)
    }

    fn command(&self, program: &str) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(self.bin.join(program));
        // Not the caller's locale: one that is not generated on this
        // machine (`en_US.UTF-8` on a slim image) fails initdb.
        cmd.env_remove("LANG")
            .env_remove("LANGUAGE")
            .env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd.current_dir(&self.dir);
        cmd
    }

    /// Starts the server (again) on the same port and data.
    pub async fn run(&mut self) -> Result<()> {
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=300",
            ]);
        let log = self.dir.join("postgres.log");
        let mut proc = Proc::spawn(cmd, &log)?.with_stop_signal(libc::SIGQUIT);
        let port = self.port;
        let ready = self.bin.join("pg_isready");
        proc.wait_ready("postgres", Duration::from_secs(60), || {
            let ready = ready.clone();
            async move {
                Command::new(&ready)
                    .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                    .status()
                    .is_ok_and(|s| s.success())
            }
        })
        .await?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Creates a database and returns its URI (for OpenFGA's
    /// `--datastore-uri`).
    pub fn create_database(&self, name: &str) -> Result<String> {
        let out = self
            .command("psql")
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
                &self.port.to_string(),
            ])
            .args(["-c", &format!("CREATE DATABASE \"{name}\"")])
            .output()
            .map_err(|e| Error::io("run psql", e))?;
        if !out.status.success() {
            return Err(Error::new(format!(
                "CREATE DATABASE {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(format!(
            "postgres://postgres@127.0.0.1:{}/{name}?sslmode=disable",
            self.port
        ))
    }

    /// The postmaster's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Stops the server at once (SIGQUIT), keeping its data.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("postgres logs kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
