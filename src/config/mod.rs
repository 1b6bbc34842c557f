//! Configuration, layered with figment.
//!
//! Lowest to highest: built-in defaults, the TOML file (`config/fga-wb.toml`,
//! or the path given with `--config` or `FGA_WB_CONFIG`), OpenFGA's own CLI
//! variables (`FGA_API_URL`, `FGA_STORE_ID`, `FGA_MODEL_ID`, `FGA_API_TOKEN`),
//! then `FGA_WB_*` variables with `__` for nesting
//! (`FGA_WB_FLUSH__BATCH_SIZE=500`).
//!
//! Ids, URLs and secrets are always read as strings, even when they look like
//! numbers; a bad value is reported with the variable or file key it came from.

use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Map, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};
use crate::openfga::{Credentials, OAuth2, Secret};

/// The file read when no other is named.
pub const DEFAULT_CONFIG_PATH: &str = "config/fga-wb.toml";
/// Prefix of fga-wb's own environment variables.
pub const ENV_PREFIX: &str = "FGA_WB_";
const ENV_SOURCE: &str = "environment";

/// Every setting of fga-wb. `config/fga-wb.toml` documents each key.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Where OpenFGA is and how to talk to it.
    pub openfga: OpenFgaConfig,
    /// The pending-op buffer.
    pub buffer: BufferConfig,
    /// When and how pending ops are written to OpenFGA.
    pub flush: FlushConfig,
    /// The check-answer cache.
    pub cache: CacheConfig,
    /// Check behaviour around pending revokes.
    pub check: CheckConfig,
    /// Redis, for the redis store and queue mode.
    pub redis: RedisConfig,
    /// The apalis job queue, for queue mode.
    pub queue: QueueConfig,
}

/// `[openfga]`
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct OpenFgaConfig {
    /// Base URL of the HTTP API.
    #[serde(serialize_with = "redacted_url")]
    pub api_url: String,
    /// The store to write to and check against.
    pub store_id: String,
    /// Pin writes and checks to this model; empty means the store's latest.
    pub model_id: String,
    /// With `model_id` empty: how often to look for a newer latest model
    /// and follow it (`0s`: never; `WriteBehind::refresh_model` on demand;
    /// else at least 100 ms).
    /// A model that cannot be read at start is read again every 10 s (or
    /// this, when shorter) until it is, pinned or not.
    #[serde(with = "duration")]
    pub model_refresh: Duration,
    /// Preshared API token; empty means none.
    pub api_token: Secret,
    /// Per-request timeout.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// TCP connect timeout.
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// OAuth2 client credentials, used when `api_token` is empty (the
    /// `fga` CLI's order).
    pub oauth2: Option<OAuth2Config>,
    /// A PEM file of CA certificates to trust for an `https://` OpenFGA
    /// behind a private CA, besides the usual roots; empty: none.
    #[serde(serialize_with = "shown_file")]
    pub ca_file: String,
}

impl Default for OpenFgaConfig {
    fn default() -> Self {
        OpenFgaConfig {
            api_url: "http://127.0.0.1:8080".into(),
            store_id: String::new(),
            model_id: String::new(),
            model_refresh: Duration::from_secs(60),
            api_token: Secret::default(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            oauth2: None,
            ca_file: String::new(),
        }
    }
}

/// `[openfga.oauth2]`
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    /// Token endpoint.
    // Each may be missing while an API token is set (leftover variables,
    // which the `fga` CLI ignores then): `validate` asks for them only
    // when the client credentials are used.
    #[serde(serialize_with = "redacted_url", default)]
    pub token_url: String,
    /// Client id.
    #[serde(default)]
    pub client_id: String,
    /// Client secret.
    #[serde(default)]
    pub client_secret: Secret,
    /// Audience; empty means none.
    #[serde(default)]
    pub audience: String,
    /// Space-separated scopes; empty means none.
    #[serde(default)]
    pub scopes: String,
}

impl OpenFgaConfig {
    /// The credentials these settings describe: as the `fga` CLI picks
    /// them, an API token first, then client credentials.
    pub fn credentials(&self) -> Credentials {
        let non_empty = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        if !self.api_token.is_empty() {
            // Not for variables left over without a client id: the `fga`
            // CLI ignores them too.
            if self
                .oauth2
                .as_ref()
                .is_some_and(|o| !o.client_id.is_empty())
            {
                tracing::warn!("both an API token (FGA_API_TOKEN, openfga.api_token) and OAuth2 client credentials (FGA_CLIENT_ID, openfga.oauth2) are set: the token is used, as the fga CLI does, and the client credentials are not");
            }
            return Credentials::ApiToken(self.api_token.clone());
        }
        match &self.oauth2 {
            Some(o) => Credentials::ClientCredentials(OAuth2 {
                token_url: o.token_url.clone(),
                client_id: o.client_id.clone(),
                client_secret: o.client_secret.clone(),
                audience: non_empty(&o.audience),
                scopes: non_empty(&o.scopes),
            }),
            None => Credentials::None,
        }
    }

    /// A client for these settings.
    pub fn client(&self) -> Result<crate::openfga::Client> {
        let mut b = crate::openfga::Client::builder(&self.api_url)
            .credentials(self.credentials())
            .timeout(self.request_timeout)
            .connect_timeout(self.connect_timeout);
        if !self.ca_file.is_empty() {
            file_named("openfga.ca_file", &self.ca_file)?;
            let pem = std::fs::read(&self.ca_file).map_err(|e| {
                Error::config(format!(
                    "openfga.ca_file {:?} cannot be read: {e}",
                    self.ca_file
                ))
            })?;
            b = b.ca_certificate_pem(pem);
        }
        b.build()
    }
}

/// Where pending ops live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum StoreKind {
    /// In this process only.
    #[default]
    Memory,
    /// In Redis, shared and durable.
    Redis,
}

/// What `grant`/`revoke` do when the buffer is full.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Overflow {
    /// Wait for room, up to `buffer.block_timeout`, then fail.
    #[default]
    Block,
    /// Flush synchronously (`flush()`, waiting up to
    /// `buffer.block_timeout`), then take the op if that made room, else
    /// fail as full. In queue mode, where a flush only queues the ops and
    /// they keep their room until a worker writes them, then wait for room
    /// as `Block` does, up to the same time.
    Flush,
    /// Fail at once.
    Reject,
}

/// `[buffer]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BufferConfig {
    /// `memory` or `redis`.
    #[serde(deserialize_with = "by_name")]
    pub store: StoreKind,
    /// Most pending ops (distinct tuples) held at once.
    #[serde(deserialize_with = "positive")]
    pub capacity: usize,
    /// `block`, `flush` or `reject`.
    #[serde(deserialize_with = "by_name")]
    pub overflow: Overflow,
    /// With `overflow = "block"` (or `"flush"`): how long to wait for room.
    #[serde(with = "duration")]
    pub block_timeout: Duration,
    /// Memory store: most dead letters kept; past it the oldest go (counted
    /// in `Totals::dead_letters_evicted` and logged). The Redis store keeps
    /// every letter until it is replayed or purged.
    #[serde(deserialize_with = "positive")]
    pub dead_letter_capacity: usize,
}

impl Default for BufferConfig {
    fn default() -> Self {
        BufferConfig {
            store: StoreKind::Memory,
            capacity: 1_000_000,
            overflow: Overflow::Block,
            block_timeout: Duration::from_secs(5),
            dead_letter_capacity: 10_000,
        }
    }
}

/// How flushes reach OpenFGA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Mode {
    /// This process calls the Write API.
    #[default]
    Inline,
    /// Flush hands chunks to jobs kept in Redis; `fga-wb worker` calls the
    /// Write API.
    Queue,
}

/// `[flush]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct FlushConfig {
    /// `inline` or `queue`.
    #[serde(deserialize_with = "by_name")]
    pub mode: Mode,
    /// Flush when this many ops are pending.
    #[serde(deserialize_with = "positive")]
    pub batch_size: usize,
    /// Flush when the oldest pending op is this old.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Tuples per Write request (OpenFGA's default limit is 100).
    #[serde(deserialize_with = "positive")]
    pub max_tuples_per_write: usize,
    /// Most Write requests in flight at once.
    #[serde(deserialize_with = "positive")]
    pub max_parallel_requests: usize,
    /// Fewest Write requests in flight at once while something is due
    /// (the adaptive limit never goes below it); `max_parallel_requests`
    /// when that is lower.
    #[serde(deserialize_with = "positive")]
    pub min_parallel_requests: usize,
    /// Let the number of requests in flight follow the server: from 8 (or
    /// `max_parallel_requests`, if lower) up to `max_parallel_requests`
    /// while round trips stay short, back towards 8 when requests queue at
    /// the server, down to `min_parallel_requests` only when it pushes back
    /// (429, 5xx, timeouts). Off: always `max_parallel_requests`.
    pub adaptive_parallelism: bool,
    /// Inline mode: times one failed request is sent again at once (with a
    /// short jittered backoff) before its ops go back to pending and the
    /// flusher pauses.
    pub request_retries: u32,
    /// First backoff after a transient failure (inline mode).
    #[serde(with = "duration")]
    pub retry_initial_backoff: Duration,
    /// Longest backoff after repeated transient failures (inline mode);
    /// also how often flushing stopped by refused credentials or an unknown
    /// store asks OpenFGA again by itself (at least every second).
    #[serde(with = "duration")]
    pub retry_max_backoff: Duration,
    /// Flush revokes as soon as they arrive. Off: revokes wait for the batch
    /// size or interval like grants (fewer writes under churn), unless a
    /// check is waiting for one, which flushes at once.
    pub eager_revokes: bool,
    /// How long `shutdown()` keeps flushing before it reports what is left
    /// (a worker's stop, its grace); at most 24h.
    #[serde(with = "duration")]
    pub shutdown_deadline: Duration,
    /// How long a Write may still commit on the server after fga-wb stopped
    /// waiting for it (a timeout, a connection cut after the request went
    /// out, a gateway's 502 or 504): the server's own request timeout plus
    /// any queueing in front of it. Its ops stay in flight that long, so no
    /// newer op on those tuples is written before it could land. A process
    /// or worker that dies while writing (Redis store) leaves what it held
    /// to the others this long after its lease ends, for the same reason.
    /// At most 10 min; 0 turns holds off.
    #[serde(with = "duration")]
    pub unknown_outcome_hold: Duration,
}

impl Default for FlushConfig {
    fn default() -> Self {
        FlushConfig {
            mode: Mode::Inline,
            batch_size: 1000,
            interval: Duration::from_secs(1),
            max_tuples_per_write: 100,
            max_parallel_requests: 32,
            min_parallel_requests: 2,
            adaptive_parallelism: true,
            request_retries: 3,
            retry_initial_backoff: Duration::from_millis(100),
            retry_max_backoff: Duration::from_secs(30),
            eager_revokes: true,
            shutdown_deadline: Duration::from_secs(10),
            unknown_outcome_hold: Duration::from_secs(30),
        }
    }
}

/// `[cache]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheConfig {
    /// How long a check answer is reused.
    #[serde(with = "duration")]
    pub ttl: Duration,
    /// Most answers kept.
    pub capacity: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            ttl: Duration::from_secs(10),
            capacity: 100_000,
        }
    }
}

/// The longest `redis.writer_lease`: the Redis store forgets a writer's
/// term 10 minutes after its last heartbeat (BEATS_KEEP_MS in store.lua),
/// and heartbeats come every third of the lease.
pub(crate) const MAX_WRITER_LEASE: Duration = Duration::from_secs(600);

/// The longest `check.server_cache_ttl`: how long writes are remembered.
pub(crate) const MAX_SERVER_CACHE_TTL: Duration = Duration::from_secs(120);

/// `[check]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CheckConfig {
    /// How long a check that could depend on a pending revoke waits for it to
    /// be applied before failing closed.
    #[serde(with = "duration")]
    pub revoke_wait_timeout: Duration,
    /// How long after fga-wb applied a write OpenFGA may still answer from
    /// before it (its check query cache, iterator caches and cache
    /// controller, or a lagging read replica): a check, list or read that
    /// can depend on such a write asks for `HIGHER_CONSISTENCY`. The default
    /// covers OpenFGA's default 10 s cache TTLs chained (an iterator cache
    /// entry feeding a query cache entry) with 50% jitter; raise it with
    /// the server's TTLs. At most 2 minutes.
    #[serde(with = "duration")]
    pub server_cache_ttl: Duration,
    /// Ask for `HIGHER_CONSISTENCY` on every check, list and read (when the
    /// server's caches are not known, or writes bypass fga-wb), and keep
    /// no check answers in fga-wb's own cache (only fga-wb's ops drop
    /// them).
    pub always_higher_consistency: bool,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            revoke_wait_timeout: Duration::from_secs(2),
            server_cache_ttl: Duration::from_secs(30),
            always_higher_consistency: false,
        }
    }
}

/// `[redis]`
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisConfig {
    /// One node: `redis://[user:password@]host:port[/db]`. A Redis (or
    /// Valkey) Cluster: its seed nodes as several such URLs separated by
    /// commas, or `redis+cluster://[user:password@]host:port,host:port`.
    /// `rediss://` (and `rediss+cluster://`) connect over TLS.
    #[serde(serialize_with = "redacted_url")]
    pub url: String,
    /// For `rediss://`: a PEM file of the CA certificates to trust instead
    /// of the system's roots (a private CA); empty: the system's.
    #[serde(serialize_with = "shown_file")]
    pub ca_file: String,
    /// For `rediss://` to a server that asks for client certificates
    /// (`tls-auth-clients`): a PEM file of fga-wb's certificate (with its
    /// chain); set together with `key_file`.
    #[serde(serialize_with = "shown_file")]
    pub cert_file: String,
    /// The PEM private key of `cert_file`, unencrypted (fga-wb takes no
    /// passphrase).
    #[serde(serialize_with = "shown_file")]
    pub key_file: String,
    /// Prefix of every key fga-wb writes; the store id follows it.
    pub key_prefix: String,
    /// How long what a process or worker is writing stays its own without a
    /// heartbeat (renewed every third of it): after it dies, others take
    /// its ops and jobs over within this time (if it was writing, a
    /// `flush.unknown_outcome_hold` later: a Write of its may still land
    /// until then). A write never outlives it on fga-wb's side.
    #[serde(with = "duration")]
    pub writer_lease: Duration,
    /// Replicas that must have each push before `grant`/`revoke` return
    /// (Redis's WAIT, sent after each batch on the same connection); 0:
    /// do not wait. Without it a failover can drop acknowledged ops; loss
    /// detection then reports them and checks fail closed.
    pub wait_replicas: u32,
    /// Longest a push waits for `wait_replicas`.
    #[serde(with = "duration")]
    pub wait_timeout: Duration,
    /// What a push confirmed by fewer replicas than `wait_replicas` within
    /// `wait_timeout` returns: `accept` (counted and logged; the op is on
    /// the primary) or `fail` (an error that says the op is buffered but
    /// not yet replicated; calling again is safe).
    #[serde(deserialize_with = "by_name")]
    pub fewer_replicas: FewerReplicas,
}

/// See [`RedisConfig::fewer_replicas`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum FewerReplicas {
    /// Acknowledge anyway.
    #[default]
    Accept,
    /// Return an error (the op stays buffered).
    Fail,
}

impl RedisConfig {
    /// Refuses a file's text given for the name of `ca_file`, `cert_file`
    /// or `key_file` (see [`file_named`]).
    pub(crate) fn files_named(&self) -> Result<()> {
        for (name, v) in [
            ("redis.ca_file", &self.ca_file),
            ("redis.cert_file", &self.cert_file),
            ("redis.key_file", &self.key_file),
        ] {
            file_named(name, v)?;
        }
        Ok(())
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            key_prefix: "fga-wb".into(),
            writer_lease: Duration::from_secs(5),
            wait_replicas: 0,
            wait_timeout: Duration::from_millis(100),
            fewer_replicas: FewerReplicas::Accept,
        }
    }
}

/// `[queue]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct QueueConfig {
    /// Not used: jobs live in fga-wb's own Redis keys. Kept so that
    /// configuration files naming it still load.
    pub name: String,
    /// Waits before each retry of a failed job; after the last, the job's ops
    /// are dead-lettered.
    #[serde(with = "durations")]
    pub retry_schedule: Vec<Duration>,
    /// Requests one `fga-wb worker` keeps in flight. It runs up to twice as
    /// many jobs at once, so that fetching jobs and recording their outcomes
    /// overlap other jobs' requests.
    #[serde(deserialize_with = "positive")]
    pub worker_concurrency: usize,
    /// Times a worker sends a failed request again within the job's run,
    /// with a short jittered backoff from 50 ms (a blip such as a busy
    /// database), before the job waits for the next retry step.
    pub request_retries: u32,
    /// How often an idle worker looks for jobs.
    #[serde(with = "duration")]
    pub poll_interval: Duration,
    /// Not used: a worker renews its lease every third of
    /// `redis.writer_lease`, and one whose lease ends is presumed dead (its
    /// running jobs run again elsewhere). Kept so that configuration files
    /// naming it still load.
    #[serde(with = "duration")]
    pub heartbeat: Duration,
    /// How often workers look for dead letters that died of a transient
    /// cause (OpenFGA unreachable or failing through a job's whole retry
    /// schedule) and, once OpenFGA answers, replay them: an outage longer
    /// than the schedule needs no person. A letter whose tuple got a newer
    /// op since is dropped, never replayed over it (a revoke's letter stays
    /// if that op was cleared, not written). `0s`: never (replay them with
    /// `fga-wb dlq replay`); else at least 100 ms.
    #[serde(with = "duration")]
    pub replay_transient: Duration,
    /// How many times within an hour a tuple may die again after the
    /// workers' replays while other writes land before its letter is left
    /// for an operator. A tuple OpenFGA fails every time (a row its
    /// datastore cannot hold) dies again after each replay, for good:
    /// past this, its letter waits for `fga-wb dlq replay` once the cause
    /// is fixed, and `fga-wb flush --wait` says so rather than wait for a
    /// replay. That replay, a purge, an op on the tuple that lands, the
    /// letter giving way to an op buffered on the tuple, or the hour's end
    /// start the count again. `0`: no limit.
    pub replay_limit: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            name: "fga-wb-writes".into(),
            retry_schedule: vec![
                Duration::from_secs(10),
                Duration::from_secs(30),
                Duration::from_secs(60),
            ],
            worker_concurrency: 8,
            // One retry at once was not enough: under 16 concurrent Writes
            // SQLite stays busy for longer than 50 ms now and then, and
            // the job then waited 10 s for its next step.
            request_retries: 3,
            poll_interval: Duration::from_millis(100),
            heartbeat: Duration::from_secs(5),
            replay_transient: Duration::from_secs(30),
            replay_limit: 3,
        }
    }
}

/// Keys whose values are strings, whatever they look like: figment would
/// otherwise read `FGA_STORE_ID=0123` as the number 123.
const STRING_KEYS: &[&str] = &[
    "openfga.oauth2.client_id",
    "openfga.oauth2.client_secret",
    "openfga.oauth2.token_url",
    "openfga.oauth2.audience",
    "openfga.oauth2.scopes",
    "openfga.api_url",
    "openfga.ca_file",
    "redis.ca_file",
    "redis.cert_file",
    "redis.key_file",
    "openfga.store_id",
    "openfga.model_id",
    "openfga.api_token",
    "openfga.oauth2.token_url",
    "openfga.oauth2.client_id",
    "openfga.oauth2.client_secret",
    "openfga.oauth2.audience",
    "openfga.oauth2.scopes",
    "redis.url",
    "redis.key_prefix",
    "queue.name",
];

/// OpenFGA CLI variables and the keys they set.
const FGA_CLI_VARS: &[(&str, &str)] = &[
    ("FGA_API_URL", "openfga.api_url"),
    ("FGA_STORE_ID", "openfga.store_id"),
    ("FGA_MODEL_ID", "openfga.model_id"),
    ("FGA_API_TOKEN", "openfga.api_token"),
    // Client credentials, as the `fga` CLI and the SDKs take them.
    ("FGA_CLIENT_ID", "openfga.oauth2.client_id"),
    ("FGA_CLIENT_SECRET", "openfga.oauth2.client_secret"),
    ("FGA_API_TOKEN_ISSUER", "openfga.oauth2.token_url"),
    ("FGA_API_AUDIENCE", "openfga.oauth2.audience"),
    ("FGA_API_SCOPES", "openfga.oauth2.scopes"),
];

/// `FGA_API_TOKEN_ISSUER` as the `fga` CLI takes it: a host (`auth.fga.dev`)
/// means `https://<host>/oauth/token`; a URL with a path is used as is.
fn token_url_of_issuer(issuer: &str) -> String {
    let with_scheme = if issuer.contains("://") {
        issuer.to_owned()
    } else {
        format!("https://{issuer}")
    };
    let after_scheme = with_scheme.split_once("://").map_or("", |(_, r)| r);
    if after_scheme.trim_end_matches('/').contains('/') {
        with_scheme
    } else {
        format!("{}/oauth/token", with_scheme.trim_end_matches('/'))
    }
}

/// Top-level sections; other `FGA_WB_*` variables (`FGA_WB_CONFIG`, the test
/// harness's `FGA_WB_TEST_*`) are not settings.
const SECTIONS: &[&str] = &[
    "openfga", "buffer", "flush", "cache", "check", "redis", "queue",
];

/// Refuses `FGA_WB_` variables that look like settings but configure
/// nothing: `FGA_WB_NOPE__X` (no such section) and `FGA_WB_FLUSH_BATCH_SIZE`
/// (one underscore where two separate section and key), each with the name
/// that would work. Other `FGA_WB_` variables (the scripts' own) are left
/// alone.
fn check_env_names(vars: &[(String, String)]) -> Result<()> {
    let defaults = serde_json::to_value(Config::default()).unwrap_or_default();
    let keys_of = |section: &str| -> Vec<String> {
        defaults
            .get(section)
            .and_then(|v| v.as_object())
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    };
    for (name, _) in vars {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let lower = rest.to_ascii_lowercase();
        // `FGA_WB_REDIS=redis://...`: a whole section in one variable.
        // (`FGA_WB_CACHE` is the scripts' cache directory.)
        if SECTIONS.contains(&lower.as_str()) && name != "FGA_WB_CACHE" {
            let up = lower.to_ascii_uppercase();
            let mut keys = keys_of(&lower);
            keys.sort();
            return Err(Error::config(format!(
                "{name} configures nothing: a section's settings are set one by one, FGA_WB_{up}__<KEY> (keys: {})",
                keys.join(", ")
            )));
        }
        if let Some((section, key)) = lower.split_once("__") {
            if !SECTIONS.contains(&section) {
                return Err(Error::config(format!(
                    "{name} configures nothing: there is no section {section:?} (sections: {}); e.g. FGA_WB_{}__{}",
                    SECTIONS.join(", "),
                    closest(section, SECTIONS).to_ascii_uppercase(),
                    key.to_ascii_uppercase()
                )));
            }
            continue;
        }
        for section in SECTIONS {
            let Some(key) = lower
                .strip_prefix(section)
                .and_then(|k| k.strip_prefix('_'))
            else {
                continue;
            };
            if keys_of(section).iter().any(|k| k == key) {
                return Err(Error::config(format!(
                    "{name} configures nothing: section and key are separated by two underscores, FGA_WB_{}__{}",
                    section.to_ascii_uppercase(),
                    key.to_ascii_uppercase()
                )));
            }
        }
    }
    Ok(())
}

/// The candidate sharing the longest prefix with `word`.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> &'a str {
    candidates
        .iter()
        .max_by_key(|c| {
            c.chars()
                .zip(word.chars())
                .take_while(|(a, b)| a == b)
                .count()
        })
        .copied()
        .unwrap_or("flush")
}

/// Environment variables as a figment provider.
struct Env {
    vars: Vec<(String, String)>,
}

impl Provider for Env {
    fn metadata(&self) -> Metadata {
        Metadata::named(ENV_SOURCE)
    }

    fn data(&self) -> std::result::Result<Map<Profile, Dict>, figment::Error> {
        let mut dict = Dict::new();
        let mut put = |key: &str, raw: &str| {
            let value = if STRING_KEYS.contains(&key) {
                Value::from(raw.to_owned())
            } else {
                raw.parse::<Value>()
                    .unwrap_or_else(|_| Value::from(raw.to_owned()))
            };
            if let Some(nested) = nest(key, value) {
                dict = std::mem::take(&mut dict).merge_dict(nested);
            }
        };
        for (name, key) in FGA_CLI_VARS {
            // Empty is unset, as the `fga` CLI takes them: a chart that
            // passes `FGA_CLIENT_ID=` through must not start an OAuth2
            // section that is set only in part (refused at the start).
            let set = self
                .vars
                .iter()
                .find(|(n, v)| n == name && !v.trim().is_empty());
            if let Some((_, v)) = set {
                if *name == "FGA_API_TOKEN_ISSUER" {
                    put(key, &token_url_of_issuer(v));
                } else {
                    put(key, v);
                }
            }
        }
        for (name, v) in &self.vars {
            let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let key = rest.to_ascii_lowercase().replace("__", ".");
            if SECTIONS.contains(&key.split('.').next().unwrap_or_default()) && key.contains('.') {
                put(&key, v);
            }
        }
        Ok(Profile::Default.collect(dict))
    }
}

trait MergeDict {
    fn merge_dict(self, other: Dict) -> Dict;
}

impl MergeDict for Dict {
    fn merge_dict(mut self, other: Dict) -> Dict {
        for (k, v) in other {
            match (self.remove(&k), v) {
                (Some(Value::Dict(_, a)), Value::Dict(tag, b)) => {
                    self.insert(k, Value::Dict(tag, a.merge_dict(b)));
                }
                (_, v) => {
                    self.insert(k, v);
                }
            }
        }
        self
    }
}

fn nest(key: &str, value: Value) -> Option<Dict> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop()?;
    let mut dict = Dict::new();
    dict.insert(last.to_owned(), value);
    for p in parts.into_iter().rev() {
        let mut outer = Dict::new();
        outer.insert(p.to_owned(), Value::from(dict));
        dict = outer;
    }
    Some(dict)
}

impl Config {
    /// Loads defaults < TOML file < environment.
    ///
    /// `path` is the `--config` argument: when given, the file must exist.
    /// Otherwise `FGA_WB_CONFIG` names the file, which must exist, or
    /// `config/fga-wb.toml` is read if present.
    pub fn load(path: Option<&Path>) -> Result<Config> {
        let vars: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Self::load_from(path, vars)
    }

    /// [`Config::load`] with the environment given explicitly (for tests).
    pub fn load_from(path: Option<&Path>, vars: Vec<(String, String)>) -> Result<Config> {
        let env_path = vars
            .iter()
            .find(|(k, _)| k == "FGA_WB_CONFIG")
            .map(|(_, v)| PathBuf::from(v));
        let file = match path.map(Path::to_path_buf).or(env_path) {
            Some(p) if !p.is_file() => {
                return Err(Error::config(format!(
                    "config file {} does not exist (named by --config or FGA_WB_CONFIG)",
                    p.display()
                )))
            }
            Some(p) => Some(p),
            None => Some(PathBuf::from(DEFAULT_CONFIG_PATH)).filter(|p| p.is_file()),
        };
        check_env_names(&vars)?;
        let mut fig = Figment::from(Serialized::defaults(DefaultsOnly));
        if let Some(f) = &file {
            fig = fig.merge(Toml::file_exact(f));
        }
        fig = fig.merge(Env { vars });
        let config: Config = fig.extract().map_err(|e| describe(&e))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks relations between settings that no single key's type can.
    pub fn validate(&self) -> Result<()> {
        file_named("openfga.ca_file", &self.openfga.ca_file)?;
        self.redis.files_named()?;
        if self.flush.mode == Mode::Queue && self.buffer.store != StoreKind::Redis {
            return Err(Error::config(
                "flush.mode = \"queue\" needs buffer.store = \"redis\": workers read the buffer from Redis",
            ));
        }
        // Sizes: at least 1, checked here too for a config set in code
        // (`positive` refuses 0 only as it reads; a 0 made the flusher spin
        // on empty windows). Those bounded far above any server's limits,
        // so that sizes derived from them (windows of chunks, requests
        // ahead, a worker's job slots) cannot overflow.
        let f = &self.flush;
        for (name, v, bounded) in [
            ("buffer.capacity", self.buffer.capacity, false),
            (
                "buffer.dead_letter_capacity",
                self.buffer.dead_letter_capacity,
                false,
            ),
            ("flush.batch_size", f.batch_size, false),
            ("flush.max_tuples_per_write", f.max_tuples_per_write, true),
            ("flush.max_parallel_requests", f.max_parallel_requests, true),
            ("flush.min_parallel_requests", f.min_parallel_requests, true),
            (
                "queue.worker_concurrency",
                self.queue.worker_concurrency,
                true,
            ),
        ] {
            if v == 0 {
                return Err(Error::config(format!("{name} is 0; it must be at least 1")));
            }
            if bounded && v > MAX_REQUEST_SETTING {
                return Err(Error::config(format!(
                    "{name} is {v}; it must be at most {MAX_REQUEST_SETTING}"
                )));
            }
        }
        // Durations set in code, as those read are (10 years at most):
        // added to the clock, one past what it holds would panic.
        let (o, q) = (&self.openfga, &self.queue);
        let longest = [
            ("openfga.model_refresh", o.model_refresh),
            ("openfga.request_timeout", o.request_timeout),
            ("openfga.connect_timeout", o.connect_timeout),
            ("buffer.block_timeout", self.buffer.block_timeout),
            ("flush.interval", f.interval),
            ("flush.retry_initial_backoff", f.retry_initial_backoff),
            ("flush.retry_max_backoff", f.retry_max_backoff),
            ("cache.ttl", self.cache.ttl),
            ("check.revoke_wait_timeout", self.check.revoke_wait_timeout),
            ("queue.poll_interval", q.poll_interval),
            ("queue.heartbeat", q.heartbeat),
            ("queue.replay_transient", q.replay_transient),
        ]
        .into_iter()
        .chain(
            q.retry_schedule
                .iter()
                .map(|&d| ("queue.retry_schedule", d)),
        )
        .find(|(_, d)| *d > duration::MAX);
        if let Some((name, d)) = longest {
            return Err(Error::config(format!(
                "{name} is {d:?}, longer than the longest duration fga-wb takes (10 years)"
            )));
        }
        // HTTP headers cannot carry these: reqwest refuses the request, which
        // read as "cannot reach OpenFGA" and held every Write as one whose
        // outcome is unknown. The token itself is never shown.
        // The client id and secret go into a form, where the token endpoint
        // refuses them with a 401 that does not say why.
        let garbled = |s: &str| s.trim() != s || s.chars().any(char::is_control);
        let token = self.openfga.api_token.expose();
        let mut sent = vec![("openfga.api_token (FGA_API_TOKEN)", token)];
        if let Some(o) = self.openfga.oauth2.as_ref().filter(|_| token.is_empty()) {
            let parts = [
                (
                    "openfga.oauth2.token_url (FGA_API_TOKEN_ISSUER)",
                    o.token_url.as_str(),
                ),
                (
                    "openfga.oauth2.client_id (FGA_CLIENT_ID)",
                    o.client_id.as_str(),
                ),
                (
                    "openfga.oauth2.client_secret (FGA_CLIENT_SECRET)",
                    o.client_secret.expose(),
                ),
            ];
            let missing: Vec<&str> = parts
                .iter()
                .filter(|(_, v)| v.is_empty())
                .map(|(name, _)| *name)
                .collect();
            if !missing.is_empty() {
                return Err(Error::config(format!(
                    "OAuth2 client credentials are set in part: {} missing (or set an API token, FGA_API_TOKEN, instead)",
                    missing.join(", ")
                )));
            }
            // The client id and secret, sent in the token request's form.
            sent.extend_from_slice(&parts[1..]);
        }
        if let Some((name, _)) = sent.into_iter().find(|(_, v)| garbled(v)) {
            return Err(Error::config(format!(
                "{name} has leading or trailing whitespace or a control character (a newline at the end, as `echo` writes into a Kubernetes Secret): remove it"
            )));
        }
        if self.queue.retry_schedule.is_empty() {
            return Err(Error::config(
                "queue.retry_schedule is empty; give at least one wait, e.g. [\"10s\"]",
            ));
        }
        // reqwest takes zero as no time at all, not as no limit: every
        // request would time out, each Write's outcome unknown and held.
        for (name, d) in [
            ("openfga.request_timeout", self.openfga.request_timeout),
            ("openfga.connect_timeout", self.openfga.connect_timeout),
        ] {
            if d.is_zero() {
                return Err(Error::config(format!(
                    "{name} is 0; it must be above 0 (every request would time out at once; e.g. \"10s\")"
                )));
            }
        }
        // Zero would retry a failing OpenFGA, or poll Redis, with no pause.
        if self.flush.retry_initial_backoff.is_zero() {
            return Err(Error::config(
                "flush.retry_initial_backoff is 0; it must be above 0 (e.g. \"100ms\")",
            ));
        }
        if self.queue.poll_interval < Duration::from_millis(1) {
            return Err(Error::config(
                "queue.poll_interval is below 1ms; an idle worker would call Redis without a pause (e.g. \"100ms\")",
            ));
        }
        // Each is a request per look (a model read from OpenFGA, a read of
        // Redis's dead-letter count from every worker): a look every
        // millisecond would load the server and tell nothing sooner. Zero
        // is "never", as documented.
        for (name, d) in [
            ("openfga.model_refresh", self.openfga.model_refresh),
            ("queue.replay_transient", self.queue.replay_transient),
        ] {
            if !d.is_zero() && d < Duration::from_millis(100) {
                return Err(Error::config(format!(
                    "{name} is {d:?}; it must be 0s (never) or at least 100ms (each look is a request; e.g. \"30s\")"
                )));
            }
        }
        // Added to the clock at every stop: a deadline centuries away would
        // overflow it.
        if self.flush.shutdown_deadline > Duration::from_secs(86_400) {
            return Err(Error::config(
                "flush.shutdown_deadline must be at most 24h (a stop waits that long for writes to finish; e.g. \"10s\")",
            ));
        }
        if self.flush.unknown_outcome_hold > Duration::from_secs(600) {
            return Err(Error::config(
                "flush.unknown_outcome_hold must be at most 10m (the ops of a Write whose outcome is unknown stay in flight that long; e.g. \"30s\")",
            ));
        }
        if self.flush.retry_initial_backoff > self.flush.retry_max_backoff {
            return Err(Error::config(
                "flush.retry_initial_backoff is longer than flush.retry_max_backoff",
            ));
        }
        if self.redis.writer_lease < Duration::from_secs(2) {
            return Err(Error::config(
                "redis.writer_lease must be at least 2s (a write needs a second of it to spare)",
            ));
        }
        if self.redis.writer_lease > MAX_WRITER_LEASE {
            return Err(Error::config(
                "redis.writer_lease must be at most 10m (a writer renews every third of it, and one whose last renewal is 10 minutes old is taken for gone: what it holds would be stuck)",
            ));
        }
        if self.check.server_cache_ttl > MAX_SERVER_CACHE_TTL {
            return Err(Error::config(
                "check.server_cache_ttl must be at most 2m (writes are remembered that long); for longer server caches set check.always_higher_consistency = true",
            ));
        }
        if self.redis.wait_replicas > 0
            && !(Duration::from_millis(1)..=Duration::from_secs(10))
                .contains(&self.redis.wait_timeout)
        {
            return Err(Error::config(
                "redis.wait_timeout must be between 1ms and 10s (a push waits that long for its replicas)",
            ));
        }
        // Both name a store's Redis keys: a glob character in either
        // would make the key scans of `status` and the sweeps match other
        // stores' keys (the store id never has one: OpenFGA's ids are 26
        // digits and capital letters).
        let unsafe_in_keys =
            |v: &str| v.contains(|c: char| c.is_whitespace() || "{}*?[]\\".contains(c));
        if unsafe_in_keys(&self.openfga.store_id) {
            return Err(Error::config(
                "openfga.store_id (FGA_STORE_ID) is not an OpenFGA store id: it has whitespace, braces or any of * ? [ ] \\ (OpenFGA's ids are 26 digits and capital letters, e.g. 01J8Z6W2X1K3M4N5P6Q7R8S9T0)",
            ));
        }
        if self.redis.key_prefix.is_empty() || unsafe_in_keys(&self.redis.key_prefix) {
            return Err(Error::config(
                "redis.key_prefix must be non-empty, without whitespace, braces (they pick a store's Redis Cluster slot) or any of * ? [ ] \\ (the key scans of `status` and the sweeps would match other keys)",
            ));
        }
        Ok(())
    }
}

/// Serialises the defaults; a separate type so that `Config`'s serialised
/// form (which redacts secrets) is not what figment merges from.
struct DefaultsOnly;

impl Serialize for DefaultsOnly {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        Config::default().serialize(s)
    }
}

/// The most tuples per Write, and requests in flight, fga-wb accepts.
const MAX_REQUEST_SETTING: usize = 100_000;

/// Turns a figment error into one line naming the variable or file key.
fn describe(e: &figment::Error) -> Error {
    use figment::error::{Actual, Kind};
    let path = e.path.join(".");
    let from_env = e.metadata.as_ref().is_some_and(|m| m.name == ENV_SOURCE);
    let place = if from_env {
        FGA_CLI_VARS
            .iter()
            .find(|(_, k)| *k == path)
            .map(|(v, _)| (*v).to_owned())
            .unwrap_or_else(|| format!("{ENV_PREFIX}{}", e.path.join("__").to_ascii_uppercase()))
    } else {
        match e.metadata.as_ref().and_then(|m| m.source.as_ref()) {
            Some(figment::Source::File(f)) => format!("{path} in {}", f.display()),
            _ => path.clone(),
        }
    };
    // A secret's value is never echoed, nor a URL's password.
    let field = e.path.last().map_or("", String::as_str);
    let secret = matches!(field, "api_token" | "client_secret");
    let url = matches!(field, "api_url" | "token_url" | "url");
    let found = |a: &Actual| match a {
        _ if secret => "a value not shown (it may be a secret)".to_owned(),
        Actual::Str(s) if url => format!("{:?}", crate::openfga::redact_url(s)),
        Actual::Str(s) => format!("{s:?}"),
        other => other.to_string(),
    };
    let what = match &e.kind {
        Kind::InvalidType(actual, expected) | Kind::InvalidValue(actual, expected) => {
            format!("expected {expected}, found {}", found(actual))
        }
        Kind::UnknownVariant(v, expected) => {
            format!(
                "unknown value {v:?}, expected one of {}",
                expected.join(", ")
            )
        }
        Kind::UnknownField(f, _) => format!("unknown setting {f:?}; see config/fga-wb.toml"),
        // A file's syntax error quotes the line, which may hold a secret:
        // only where it is and why.
        Kind::Message(m) => m
            .lines()
            .filter(|l| !quotes_source(l))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    };
    if place.is_empty() {
        Error::config(what)
    } else {
        Error::config(format!("{place}: {what}"))
    }
}

/// Whether a line of a parser's message quotes the source: `3 | text`, or
/// the ` |` lines around it.
fn quotes_source(line: &str) -> bool {
    line.split_once('|')
        .is_some_and(|(gutter, _)| gutter.trim().chars().all(|c| c.is_ascii_digit()))
}

/// Deserialises a choice (an enum) by its name only: figment hands a
/// number (`store = 1`, `FGA_WB_BUFFER__STORE=1`) to an enum as the index
/// of a variant, which serde takes, and the second choice was silently
/// picked.
fn by_name<'de, D: Deserializer<'de>, T: serde::de::DeserializeOwned>(
    d: D,
) -> std::result::Result<T, D::Error> {
    use serde::de::IntoDeserializer;
    let name = String::deserialize(d)?;
    T::deserialize(name.as_str().into_deserializer())
}

/// Deserialises a `usize` that must be at least 1.
fn positive<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<usize, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = usize;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a positive integer")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<usize, E> {
            usize::try_from(v)
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<usize, E> {
            match u64::try_from(v) {
                Ok(u) => self.visit_u64(u),
                Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(v), &self)),
            }
        }
    }
    d.deserialize_any(V)
}

fn redacted_url<S: Serializer>(url: &str, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&crate::openfga::redact_url(url))
}

fn shown_file<S: Serializer>(file: &str, s: S) -> std::result::Result<S::Ok, S::Error> {
    match file_text(file) {
        true => s.serialize_str("<a file's text, not shown>"),
        false => s.serialize_str(file),
    }
}

/// Whether a setting that names a file holds a file's text instead (a key
/// pasted into `redis.key_file`, say): PEM, PEM in base64 (as Kubernetes
/// secrets hold it), DER in base64, or longer than any path in use.
fn file_text(value: &str) -> bool {
    value.contains('\n')
        || value.contains("-----BEGIN")
        || value.starts_with("LS0tLS1CRUdJTi")
        || value.starts_with("MII")
        || value.len() > 1024
}

/// Refuses a file's text given for its name, without showing it: every
/// message naming the file (it cannot be read, it holds no key) would
/// print the private key.
fn file_named(setting: &str, value: &str) -> Result<()> {
    let trimmed = value.trim();
    if trimmed != value && !trimmed.is_empty() && !file_text(trimmed) {
        // A path with a line break after it (a YAML `|` block, say).
        return Err(Error::config(format!(
            "{setting} {trimmed:?} has a line break or spaces around it: remove them"
        )));
    }
    match file_text(value) {
        true => Err(Error::config(format!(
            "{setting} holds a file's text (PEM), not a file's path: put it in a file readable only by fga-wb and give that file's path (the value is not shown: it may be a private key)"
        ))),
        false => Ok(()),
    }
}

/// `Debug` of the sections that hold URLs and secrets goes through
/// `Serialize`, which redacts them: an application that logs its config
/// with `{:?}` logs no password.
macro_rules! debug_as_serialized {
    ($($t:ident),*) => {$(
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match serde_json::to_string(self) {
                    Ok(s) => write!(f, "{} {s}", stringify!($t)),
                    Err(_) => write!(f, "{} {{ .. }}", stringify!($t)),
                }
            }
        }
    )*};
}
debug_as_serialized!(OpenFgaConfig, OAuth2Config, RedisConfig);

/// Durations as human strings: `"500ms"`, `"10s"`, `"1m"`.
mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse(Text::deserialize(d)?)
    }

    /// Accepts any scalar so that a bare number gets a helpful message rather
    /// than serde's "invalid type".
    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum Text {
        S(String),
        N(f64),
    }

    /// Longest duration any setting takes: far beyond any sensible value,
    /// and far below what timers and the cache would overflow on.
    pub(super) const MAX: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

    pub(super) fn parse<E: serde::de::Error>(t: Text) -> Result<Duration, E> {
        match t {
            Text::S(s) => match humantime::parse_duration(s.trim()) {
                Ok(d) if d <= MAX => Ok(d),
                Ok(_) => Err(E::custom(format!(
                    "{s:?} is longer than the longest duration fga-wb takes (10 years)"
                ))),
                Err(_) => Err(E::custom(format!(
                    "expected a duration like \"500ms\", \"10s\" or \"1m\", found {s:?}"
                ))),
            },
            Text::N(n) => Err(E::custom(format!(
                "expected a duration with a unit, like \"{n}s\" or \"{n}ms\", found {n}"
            ))),
        }
    }
}

/// Lists of durations, e.g. `["10s", "30s", "60s"]`.
mod durations {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        Vec::<super::duration::Text>::deserialize(d)?
            .into_iter()
            .map(super::duration::parse)
            .collect()
    }
}

#[cfg(test)]
mod tests;
