use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// A server process in its own process group, its output in a log file.
/// Dropping it kills the whole group.
pub struct Proc {
    child: Child,
    log: PathBuf,
    /// The signal that stops it at once (SIGKILL; PostgreSQL's postmaster
    /// takes SIGQUIT, which also stops its backends).
    stop_signal: i32,
}

impl Proc {
    /// Starts `cmd` with stdin closed and stdout and stderr in `log`.
    pub fn spawn(mut cmd: Command, log: &Path) -> Result<Proc> {
        let file = std::fs::File::create(log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = file
            .try_clone()
            .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
        cmd.stdin(Stdio::null()).stdout(file).stderr(err);
        die_with_parent(&mut cmd);
        let name = format!("{:?}", cmd.get_program());
        let child = cmd
            .spawn()
            .map_err(|e| Error::io(format!("start {name}"), e))?;
        Ok(Proc {
            child,
            log: log.to_owned(),
            stop_signal: libc::SIGKILL,
        })
    }

    /// Stop with this signal instead of SIGKILL.
    pub fn with_stop_signal(mut self, signal: i32) -> Proc {
        self.stop_signal = signal;
        self
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` to the process group.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a negative pid signals our own child's group.
        unsafe {
            libc::kill(-(self.child.id() as i32), signal);
        }
    }

    /// Kills the group (a crash: SIGKILL, or SIGQUIT for PostgreSQL) and
    /// waits until the process is gone.
    pub fn kill(&mut self) {
        self.signal(self.stop_signal);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.alive() {
            self.signal(libc::SIGKILL);
            let _ = self.child.wait();
        }
    }

    /// Waits for `ready` to succeed while the process runs; fails with the
    /// log's tail if it exits or `limit` passes.
    pub async fn wait_ready<F, Fut>(
        &mut self,
        what: &str,
        limit: Duration,
        mut ready: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if ready().await {
                return Ok(());
            }
            if !self.alive() {
                return Err(Error::new(format!(
                    "{what} exited during startup; log {}:\n{}",
                    self.log.display(),
                    self.log_tail()
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::new(format!(
                    "{what} not ready after {limit:?}; log {}:\n{}",
                    self.log.display(),
                    self.log_tail()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.alive() {
            self.kill();
        }
    }
}

/// Puts the child in its own process group and has the kernel kill it when
/// the thread that started it exits.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A program on PATH, or `None`.
pub(crate) fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}
