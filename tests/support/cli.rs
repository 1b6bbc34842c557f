//! The `fga-wb` binary, run as an operator runs it: configured through the
//! environment only, in an empty directory.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use super::TestStore;

pub const BIN: &str = env!("CARGO_BIN_EXE_fga-wb");

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }

    /// The line of the status table that starts with `label`.
    pub fn line(&self, label: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{}", self.stdout))
    }

    #[track_caller]
    pub fn ok(&self) -> &Run {
        assert_eq!(self.code, 0, "{self:#?}");
        self
    }

    /// Exit `code` with exactly one line on stderr, mentioning `needle`.
    #[track_caller]
    pub fn fails(&self, code: i32, needle: &str) -> &Run {
        assert_eq!(self.code, code, "{self:#?}");
        let lines: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(lines.len(), 1, "want one line on stderr: {self:#?}");
        assert!(lines[0].starts_with("fga-wb: "), "{self:#?}");
        assert!(
            lines[0].contains(needle),
            "stderr does not mention {needle:?}: {self:#?}"
        );
        self
    }
}

/// Where a [`Cli`] finds OpenFGA, the store and Redis.
pub struct Where {
    pub api_url: String,
    pub token: String,
    pub store_id: String,
    pub model_id: String,
    pub redis_url: String,
}

/// How to run the binary for one store: configuration through the
/// environment only, in an empty directory (no config/fga-wb.toml).
pub struct Cli {
    pub dir: PathBuf,
    pub vars: Vec<(String, String)>,
    pub token: String,
}

impl Cli {
    pub fn new(s: &TestStore, mode: &str) -> Cli {
        let at = Where {
            api_url: super::openfga_url(),
            token: super::openfga_token(),
            store_id: s.store_id.clone(),
            model_id: s.model_id.clone(),
            redis_url: super::redis_url(),
        };
        Cli::at(at, mode)
    }

    /// For a store on another OpenFGA (a test's own, a wiremock one), with
    /// its buffer in Redis at `redis_url`.
    pub fn at(at: Where, mode: &str) -> Cli {
        // A Redis of a test's own can hold a store id another test uses.
        let dir = std::env::temp_dir().join(format!(
            "fga-wb-cli-{}-{}-{}",
            std::process::id(),
            at.store_id,
            at.redis_url.rsplit(':').next().unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let token = at.token;
        let vars = [
            ("FGA_API_URL", at.api_url),
            ("FGA_API_TOKEN", token.clone()),
            ("FGA_STORE_ID", at.store_id),
            ("FGA_MODEL_ID", at.model_id),
            ("FGA_WB_BUFFER__STORE", "redis".into()),
            ("FGA_WB_FLUSH__MODE", mode.into()),
            ("FGA_WB_REDIS__URL", at.redis_url),
            ("FGA_WB_QUEUE__HEARTBEAT", "1s".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Cli { dir, vars, token }
    }

    pub fn set(&mut self, name: &str, value: &str) {
        self.vars.retain(|(k, _)| k != name);
        self.vars.push((name.into(), value.into()));
    }

    pub fn command(&self, args: &[&str]) -> tokio::process::Command {
        // Another `Cli` of the same store, dropped, removed it.
        let _ = std::fs::create_dir_all(&self.dir);
        let mut c = tokio::process::Command::new(BIN);
        c.args(args)
            .env_clear()
            .envs(self.vars.iter().map(|(k, v)| (k, v)))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        c
    }

    /// Runs `fga-wb args...` to completion; checks that no secret leaked.
    pub async fn run(&self, args: &[&str]) -> Run {
        let out = tokio::time::timeout(Duration::from_secs(60), self.command(args).output())
            .await
            .unwrap_or_else(|_| panic!("fga-wb {args:?} did not finish in 60 s"))
            .expect("run fga-wb");
        let run = Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        self.no_secrets(&run);
        eprintln!("$ fga-wb {}  -> {}", args.join(" "), run.code);
        run
    }

    #[track_caller]
    pub fn no_secrets(&self, run: &Run) {
        for secret in [self.token.as_str(), "s3cret"] {
            assert!(
                !run.stdout.contains(secret) && !run.stderr.contains(secret),
                "a secret was printed: {run:#?}"
            );
        }
    }
}

impl Drop for Cli {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
