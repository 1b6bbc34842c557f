use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::process::{on_path, Proc};
use crate::{free_port, temp_dir, Error, Result};

/// AOF fsync policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fsync {
    /// `appendfsync always`.
    Always,
    /// `appendfsync everysec`.
    EverySec,
}

/// How to start a Redis server.
#[derive(Clone, Debug, Default)]
pub struct RedisOptions {
    /// Append-only file with this fsync policy; `None`: no persistence.
    pub aof: Option<Fsync>,
    /// `maxmemory` and `maxmemory-policy`.
    pub maxmemory: Option<(String, String)>,
    /// Extra `--name value` arguments.
    pub extra: Vec<(String, String)>,
    /// Extra arguments as they are, after those (an option of two values:
    /// `--rename-command`, `HELLO`, `""`).
    pub args: Vec<String>,
}

/// The `redis-server` binary: `FGA_WB_TEST_REDIS_BIN`, or PATH.
fn redis_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("FGA_WB_TEST_REDIS_BIN").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    on_path("redis-server").ok_or_else(|| {
        Error::new("redis-server is not installed: run the tests through scripts/test, which installs Debian's redis-server")
    })
}

/// Sends one inline command and returns the reply's first line.
pub(crate) async fn command(port: u16, cmd: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("{cmd}\r\n").as_bytes()).await.ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A throw-away Redis server.
pub struct Redis {
    dir: PathBuf,
    port: u16,
    options: RedisOptions,
    cluster: bool,
    proc: Option<Proc>,
    starts: u32,
}

impl Redis {
    /// Starts a single-node Redis.
    pub async fn start(options: RedisOptions) -> Result<Redis> {
        let mut r = Redis {
            dir: temp_dir("redis")?,
            port: free_port()?,
            options,
            cluster: false,
            proc: None,
            starts: 0,
        };
        r.run().await?;
        Ok(r)
    }

    async fn cluster_node(options: RedisOptions) -> Result<Redis> {
        let mut r = Redis {
            dir: temp_dir("redis-node")?,
            port: crate::ports::free_cluster_port()?,
            options,
            cluster: true,
            proc: None,
            starts: 0,
        };
        r.run().await?;
        Ok(r)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// Starts the server (again) on the same port and data dir.
    pub async fn run(&mut self) -> Result<()> {
        if self.proc.is_some() {
            return Err(Error::new("redis is already running"));
        }
        self.starts += 1;
        let mut cmd = Command::new(redis_bin()?);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir);
        match self.options.aof {
            None => {
                cmd.args(["--appendonly", "no"]);
            }
            Some(f) => {
                cmd.args(["--appendonly", "yes", "--appendfsync"])
                    .arg(match f {
                        Fsync::Always => "always",
                        Fsync::EverySec => "everysec",
                    });
            }
        }
        if let Some((bytes, policy)) = &self.options.maxmemory {
            cmd.arg("--maxmemory")
                .arg(bytes)
                .arg("--maxmemory-policy")
                .arg(policy);
        }
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", "nodes.conf"]);
        }
        for (k, v) in &self.options.extra {
            cmd.arg(format!("--{k}")).arg(v);
        }
        cmd.args(&self.options.args);
        let log = self.dir.join(format!("redis-{}.log", self.starts));
        let mut proc = Proc::spawn(cmd, &log)?;
        let port = self.port;
        proc.wait_ready("redis-server", Duration::from_secs(60), || async move {
            command(port, "PING")
                .await
                .is_some_and(|r| r.contains("PONG"))
        })
        .await?;
        self.proc = Some(proc);
        Ok(())
    }

    /// Kills the server (SIGKILL) and waits until it is gone; its files stay.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Sends one command (inline protocol) and returns the raw reply.
    pub async fn command(&self, cmd: &str) -> Option<String> {
        command(self.port, cmd).await
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A throw-away Redis Cluster: `primaries` masters, each with `replicas`
/// replicas, slots spread evenly.
pub struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Starts the nodes, joins them with `redis-cli --cluster create`, and
    /// waits until every node reports `cluster_state:ok`.
    pub async fn start(primaries: usize, replicas: usize) -> Result<RedisCluster> {
        let mut nodes = Vec::new();
        for _ in 0..primaries * (1 + replicas) {
            nodes.push(Redis::cluster_node(RedisOptions::default()).await?);
        }
        let cli = on_path("redis-cli")
            .ok_or_else(|| Error::new("redis-cli is not installed (Debian's redis-tools)"))?;
        let out = Command::new(cli)
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .map_err(|e| Error::io("run redis-cli --cluster create", e))?;
        if !out.status.success() {
            return Err(Error::new(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let cluster = RedisCluster { nodes };
        cluster.wait_ok().await?;
        cluster.wait_replicas(primaries * replicas).await?;
        Ok(cluster)
    }

    /// A cluster of one primary holding every slot, reached at
    /// `announce_port` (a proxy's, in front of the node's own port, which
    /// `nodes()[0].port()` gives): clients that follow the cluster's map
    /// connect there too.
    pub async fn one_node(announce_port: u16) -> Result<RedisCluster> {
        let node = Redis::cluster_node(RedisOptions::default()).await?;
        for cmd in [
            format!("CONFIG SET cluster-announce-port {announce_port}"),
            "CLUSTER ADDSLOTSRANGE 0 16383".to_owned(),
        ] {
            match node.command(&cmd).await {
                Some(r) if r.starts_with("+OK") => {}
                r => return Err(Error::new(format!("{cmd} on a cluster node: {r:?}"))),
            }
        }
        let cluster = RedisCluster { nodes: vec![node] };
        cluster.wait_ok().await?;
        Ok(cluster)
    }

    /// Waits until every node's view lists `count` replicas and each replica's
    /// link to its primary is up: `cluster_state:ok` comes before gossip has
    /// spread who replicates whom, and a test that looks for a primary's
    /// replica (to fail over to it) must not race that.
    async fn wait_replicas(&self, count: usize) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut ok = true;
            for n in &self.nodes {
                ok &= n.command("CLUSTER NODES").await.is_some_and(|r| {
                    r.lines()
                        .filter(|l| {
                            l.split_whitespace()
                                .nth(2)
                                .is_some_and(|f| f.contains("slave"))
                        })
                        .count()
                        == count
                });
                let info = n.command("INFO replication").await.unwrap_or_default();
                ok &= !info.contains("role:slave") || info.contains("master_link_status:up");
            }
            if ok {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::new(
                    "the Redis cluster's replicas did not all attach in 60 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub async fn wait_ok(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let mut ok = true;
            for n in self.nodes.iter().filter(|n| n.proc.is_some()) {
                ok &= n
                    .command("CLUSTER INFO")
                    .await
                    .is_some_and(|r| r.contains("cluster_state:ok"));
            }
            if ok {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::new(
                    "the Redis cluster did not reach cluster_state:ok in 60 s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Seed URLs, comma-separated: `redis://127.0.0.1:<p1>,redis://...`.
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(Redis::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The nodes, in the order they were created (primaries first).
    pub fn nodes(&self) -> &[Redis] {
        &self.nodes
    }

    /// One node, mutably (to kill or restart it).
    pub fn node_mut(&mut self, i: usize) -> &mut Redis {
        &mut self.nodes[i]
    }
}
