//! `testenv up SERVER...`: starts throw-away servers on loopback, prints
//! their addresses as `export` lines followed by `# ready`, and keeps them
//! until SIGINT, SIGTERM, SIGHUP, or the death of the process that started
//! it. Then it stops them and removes their files.
//!
//! Servers:
//!
//! * `openfga`: OpenFGA on the memory datastore, caches off
//!   (`FGA_WB_TEST_OPENFGA_URL`, `FGA_WB_TEST_OPENFGA_TOKEN`);
//! * `openfga-pg`: OpenFGA on PostgreSQL with every cache on, as production
//!   runs it (`FGA_WB_TEST_OPENFGA_PG_URL`, `FGA_WB_TEST_OPENFGA_PG_TOKEN`,
//!   and `FGA_WB_TEST_POSTGRES_PORT`);
//! * `redis`: a single Redis, no persistence (`FGA_WB_TEST_REDIS_URL`);
//! * `redis-cluster`: three primaries (`FGA_WB_TEST_REDIS_CLUSTER_URL`).

use std::time::Duration;

use testenv::{Datastore, OpenFga, OpenFgaOptions, Postgres, Redis, RedisCluster, RedisOptions};

/// The cache TTL of `openfga-pg`: long enough that a stale answer would
/// still be served when a test looks.
const CACHE_TTL: Duration = Duration::from_secs(60);

/// Servers kept alive until the end; dropped, they stop.
#[allow(dead_code)]
enum Held {
    OpenFga(OpenFga),
    Postgres(Postgres),
    Redis(Redis),
    Cluster(RedisCluster),
}

fn usage() -> ! {
    eprintln!("usage: testenv up [openfga] [openfga-pg] [redis] [redis-cluster]");
    std::process::exit(2);
}

fn export(name: &str, value: &str) {
    // Values are URLs, tokens and paths without quotes or spaces.
    println!("export {name}='{value}'");
}

#[tokio::main]
async fn main() {
    // SAFETY: prctl with constant arguments.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("up") || args.len() < 2 {
        usage();
    }
    let mut held = Vec::new();
    for what in &args[1..] {
        if let Err(e) = start(what, &mut held).await {
            eprintln!("testenv: {what}: {e}");
            drop(held);
            std::process::exit(1);
        }
    }
    if let Ok(bin) = testenv_openfga_bin() {
        export("FGA_WB_TEST_OPENFGA_BIN", &bin);
    }
    println!("# ready");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    wait_for_end().await;
    drop(held);
}

fn testenv_openfga_bin() -> testenv::Result<String> {
    Ok(testenv::OpenFga::bin()?.display().to_string())
}

async fn start(what: &str, held: &mut Vec<Held>) -> testenv::Result<()> {
    match what {
        "openfga" => {
            let s = OpenFga::start(OpenFgaOptions::default()).await?;
            export("FGA_WB_TEST_OPENFGA_URL", &s.url());
            export("FGA_WB_TEST_OPENFGA_TOKEN", s.token());
            held.push(Held::OpenFga(s));
        }
        "openfga-pg" => {
            let pg = Postgres::start().await?;
            let uri = pg.create_database("openfga")?;
            export("FGA_WB_TEST_POSTGRES_PORT", &pg.port().to_string());
            held.push(Held::Postgres(pg));
            let s = OpenFga::start(OpenFgaOptions {
                datastore: Datastore::Postgres(uri),
                caches: Some(CACHE_TTL),
                ..Default::default()
            })
            .await?;
            export("FGA_WB_TEST_OPENFGA_PG_URL", &s.url());
            export("FGA_WB_TEST_OPENFGA_PG_TOKEN", s.token());
            held.push(Held::OpenFga(s));
        }
        "redis" => {
            let r = Redis::start(RedisOptions::default()).await?;
            export("FGA_WB_TEST_REDIS_URL", &r.url());
            held.push(Held::Redis(r));
        }
        "redis-cluster" => {
            let c = RedisCluster::start(3, 0).await?;
            export("FGA_WB_TEST_REDIS_CLUSTER_URL", &c.url());
            held.push(Held::Cluster(c));
        }
        _ => usage(),
    }
    Ok(())
}

/// Returns on SIGINT, SIGTERM or SIGHUP.
async fn wait_for_end() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
        match s {
            Some(s) => {
                s.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    tokio::select! {
        _ = recv(&mut term) => {}
        _ = recv(&mut hup) => {}
        _ = recv(&mut int) => {}
    }
}
