//! Connections to Redis: one node, or a Redis Cluster (Valkey alike), behind
//! one type, and the store's event channel on either.
//!
//! `redis.url` names one node (`redis://host:port`), or a cluster by its
//! seed nodes: several URLs separated by commas, or `redis+cluster://`
//! (`rediss+cluster://` with TLS) followed by comma-separated `host:port`s.
//! Every key of a store shares one slot, so every script runs on the node
//! that owns it; redirections during resharding and failovers (MOVED, ASK,
//! TRYAGAIN, CLUSTERDOWN) are followed and retried by the cluster client.
//!
//! `rediss://` connects over TLS (rustls), trusting the system's roots, or
//! only the CA certificates of `redis.ca_file` when it is set, and shows
//! the client certificate of `redis.cert_file` and `redis.key_file` to a
//! server that asks for one.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::{BoxStream, StreamExt};
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::error::{Error, Kind, Result};
use crate::openfga::{redact_url, split_urls};

/// Where Redis is. Its `Debug` shows the URLs without their passwords.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Target {
    /// One node.
    Node(String),
    /// A cluster, by its seed nodes' URLs.
    Cluster(Vec<String>),
}

impl Target {
    /// Reads `redis.url`.
    pub fn parse(url: &str) -> Result<Target> {
        let url = url.trim();
        let bad = |why: &str| {
            Error::config(format!(
                "redis.url {:?} {why}; expected redis://host:port, several such URLs separated by commas (a cluster), or redis+cluster://host:port,host:port",
                redact_url(url)
            ))
        };
        // redis-rs reads `#insecure` as "do not verify the server's
        // certificate" wherever its TLS feature allows it (a feature any
        // crate in the application may turn on): verification is never
        // turned off by a URL. What follows the last `@` is no password.
        let fragment = |u: &str| u.rsplit_once('@').map_or(u, |(_, h)| h).contains('#');
        if split_urls(url).into_iter().any(fragment) {
            return Err(bad("has a #fragment, which fga-wb does not take (the certificate of a rediss:// server is always verified)"));
        }
        for (scheme, plain) in [
            ("redis+cluster://", "redis://"),
            ("rediss+cluster://", "rediss://"),
        ] {
            if let Some(rest) = url.strip_prefix(scheme) {
                // Credentials and a path may only come with the first seed.
                let (userinfo, hosts) = match rest.rsplit_once('@') {
                    Some((u, h)) => (format!("{u}@"), h),
                    None => (String::new(), rest),
                };
                let seeds: Vec<String> = hosts
                    .split(',')
                    .map(str::trim)
                    .filter(|h| !h.is_empty())
                    .map(|h| format!("{plain}{userinfo}{h}"))
                    .collect();
                if seeds.is_empty() {
                    return Err(bad("names no node"));
                }
                return Ok(Target::Cluster(seeds));
            }
        }
        let seeds: Vec<String> = split_urls(url)
            .into_iter()
            .map(|s| s.trim_matches(|c: char| c == ',' || c.is_whitespace()))
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        match seeds.len() {
            0 => Err(bad("is empty")),
            1 => Ok(Target::Node(seeds.into_iter().next().unwrap_or_default())),
            _ => Ok(Target::Cluster(seeds)),
        }
    }

    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, Target::Cluster(_))
    }

    /// Whether it is reached over TLS (`rediss://`, or redis-rs's other
    /// spelling, `valkeys://`).
    fn is_tls(&self) -> bool {
        let tls = |u: &String| {
            u.split_once("://").is_some_and(|(scheme, _)| {
                scheme.eq_ignore_ascii_case("rediss") || scheme.eq_ignore_ascii_case("valkeys")
            })
        };
        match self {
            Target::Node(u) => tls(u),
            Target::Cluster(s) => s.iter().any(tls),
        }
    }

    /// The URLs, for messages (without passwords).
    pub fn shown(&self) -> String {
        match self {
            Target::Node(u) => redact_url(u),
            Target::Cluster(s) => s
                .iter()
                .map(|u| redact_url(u))
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Node(_) => write!(f, "Node({})", self.shown()),
            Target::Cluster(_) => write!(f, "Cluster({})", self.shown()),
        }
    }
}

/// A connection to one node or to a cluster. Cheap to clone; clones share
/// the underlying connections.
#[derive(Clone)]
pub(crate) enum Conn {
    /// One node, reconnecting by itself.
    Node(Node),
    /// A cluster: one connection per node, commands routed by key.
    Cluster(ClusterConnection),
}

/// One node's connection. redis-rs reconnects after an I/O error; this
/// also reconnects once the node answers READONLY: a primary demoted in
/// place while the address fga-wb knows (a DNS name, a proxy: a managed
/// Redis's endpoint) now leads to the new primary. The old connection
/// would stay on the replica for good, every push failing and every check
/// failing closed until the process restarted.
#[derive(Clone)]
pub(crate) struct Node(Arc<NodeInner>);

struct NodeInner {
    /// The connection, and how many times it was replaced.
    current: std::sync::Mutex<(u64, ConnectionManager)>,
    /// Whether a new connection is being made.
    replacing: std::sync::atomic::AtomicBool,
    /// After a reconnect that found a replica again (an address that does
    /// not follow failovers) or failed: no new one before the instant, and
    /// the wait after the next such.
    backoff: std::sync::Mutex<(Option<std::time::Instant>, Duration)>,
    client: redis::Client,
    config: redis::aio::ConnectionManagerConfig,
    on_disconnect: OnDisconnect,
}

const REPLACE_FIRST_WAIT: Duration = Duration::from_secs(1);
const REPLACE_MAX_WAIT: Duration = Duration::from_secs(60);

impl Node {
    async fn connect(
        client: redis::Client,
        config: redis::aio::ConnectionManagerConfig,
        on_disconnect: OnDisconnect,
    ) -> redis::RedisResult<Node> {
        let c = ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
        Ok(Node(Arc::new(NodeInner {
            current: std::sync::Mutex::new((0, c)),
            replacing: Default::default(),
            backoff: std::sync::Mutex::new((None, REPLACE_FIRST_WAIT)),
            client,
            config,
            on_disconnect,
        })))
    }

    fn current(&self) -> (u64, ConnectionManager) {
        let c = self.0.current.lock().unwrap_or_else(|p| p.into_inner());
        (c.0, c.1.clone())
    }

    /// After a READONLY from connection `seen`: the node is a replica now,
    /// which a failover may have left without the last writes, so the
    /// store hears of it at once, as of a dropped connection (checks fail
    /// closed until it is known safe); and a new connection is made in the
    /// background (calls meanwhile go to the old one and fail as
    /// transient), the store told again once it is in place.
    fn replace(&self, seen: u64) {
        use std::sync::atomic::Ordering::{AcqRel, Release};
        let inner = &self.0;
        // The flag first, the connection's number after: a task that just
        // swapped (and cleared the flag) is seen by its new number.
        if inner.replacing.swap(true, AcqRel) {
            return;
        }
        let due = {
            let b = inner.backoff.lock().unwrap_or_else(|p| p.into_inner());
            b.0.is_none_or(|at| std::time::Instant::now() >= at)
        };
        if self.current().0 != seen || !due {
            inner.replacing.store(false, Release);
            return;
        }
        (inner.on_disconnect)();
        let inner = inner.clone();
        tokio::spawn(async move {
            let made =
                ConnectionManager::new_with_config(inner.client.clone(), inner.config.clone())
                    .await;
            let role = match made {
                Ok(mut c) => {
                    let primary = is_primary(&mut c).await;
                    let mut cur = inner.current.lock().unwrap_or_else(|p| p.into_inner());
                    if cur.0 == seen {
                        *cur = (seen + 1, c);
                    }
                    Ok(primary)
                }
                Err(e) => Err(e),
            };
            let now = std::time::Instant::now();
            let mut b = inner.backoff.lock().unwrap_or_else(|p| p.into_inner());
            // A wait doubled in an incident long past starts over.
            let wait = match b.0 {
                Some(at) if now < at + REPLACE_MAX_WAIT * 5 => b.1,
                _ => REPLACE_FIRST_WAIT,
            };
            let later = (Some(now + wait), (wait * 2).min(REPLACE_MAX_WAIT));
            let connected = role.is_ok();
            match role {
                Ok(Some(true)) => {
                    *b = (None, REPLACE_FIRST_WAIT);
                    tracing::warn!("Redis answered READONLY (a primary demoted in place, e.g. by a failover behind its address): connected again, to the primary");
                }
                Ok(Some(false)) => {
                    *b = later;
                    tracing::warn!(retry_in = ?wait, "Redis answered READONLY, and connecting again reached a replica again: redis.url must lead to the primary (grants fail and checks fail closed until it does)");
                }
                // INFO refused (an ACL) or failed: the next READONLY, if
                // any, says it is a replica still.
                Ok(None) => {
                    *b = later;
                    tracing::warn!(retry_in = ?wait, "Redis answered READONLY: connected again (whether to the primary is not known: INFO is refused); another READONLY connects again after the wait");
                }
                Err(e) => {
                    *b = later;
                    tracing::warn!(error = %super::error_text(&e), retry_in = ?wait, "Redis answered READONLY, and connecting again failed");
                }
            }
            drop(b);
            if connected {
                (inner.on_disconnect)();
            }
            inner.replacing.store(false, Release);
        });
    }
}

/// Whether the node behind `c` says it is a primary; `None` when it does
/// not say (INFO refused by an ACL, or failed).
async fn is_primary(c: &mut ConnectionManager) -> Option<bool> {
    let info: redis::RedisResult<String> =
        redis::cmd("INFO").arg("replication").query_async(c).await;
    let info = info.ok()?;
    let role = info.lines().find_map(|l| l.strip_prefix("role:"))?;
    Some(role.trim() == "master")
}

/// Whether a call was refused with READONLY: redis-rs hands a server's
/// error back as a value (an error only once a caller reads it), the
/// connection's own failures as errors.
fn read_only<T>(r: &redis::RedisResult<T>, values: impl Fn(&T) -> bool) -> bool {
    match r {
        Err(e) => e.code() == Some("READONLY"),
        Ok(v) => values(v),
    }
}

fn read_only_value(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.code() == "READONLY")
}

impl ConnectionLike for Node {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (seen, mut c) = self.current();
            let r = c.req_packed_command(cmd).await;
            if read_only(&r, read_only_value) {
                self.replace(seen);
            }
            r
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (seen, mut c) = self.current();
            let r = c.req_packed_commands(pipeline, offset, count).await;
            if read_only(&r, |items| items.iter().any(read_only_value)) {
                self.replace(seen);
            }
            r
        })
    }

    fn get_db(&self) -> i64 {
        self.current().1.get_db()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn unreachable(target: &Target, e: redis::RedisError) -> Error {
    let text = super::error_text(&e);
    // Refused credentials are not worth retrying for ever: the URL needs
    // fixing (the CLI's exit 2).
    let refused = e.kind() == redis::ErrorKind::AuthenticationFailed
        || e.code().is_some_and(|c| c == "WRONGPASS" || c == "NOAUTH");
    if refused {
        return Error::config(format!(
            "Redis at {} refused fga-wb's credentials ({text}): put the right user and password in redis.url (redis://user:password@host:port, the password percent-encoded)",
            target.shown()
        ));
    }
    // Redis before 6, or a proxy or a server whose HELLO is renamed away:
    // RESP3 cannot be had, however long it is tried.
    // Redis 7 quotes the command so, Redis 6.0 and older (and their
    // forks) with backticks.
    let upper = text.to_ascii_uppercase();
    if upper.contains("UNKNOWN COMMAND") && (upper.contains("'HELLO'") || upper.contains("`HELLO`"))
    {
        return Error::config(format!(
            "Redis at {} does not take HELLO ({text}): fga-wb speaks RESP3 and needs Redis 6.0+ or Valkey, with HELLO not renamed or disabled",
            target.shown()
        ));
    }
    // rustls refuses a client certificate and key that do not match, or
    // a key it cannot use, only when it connects: no use retrying. (A
    // cluster's client wraps the error as I/O, with the same words.)
    if target.is_tls()
        && e.to_string()
            .contains("Unable to build client with TLS parameters")
    {
        return Error::config(format!(
            "Redis at {} cannot be reached with these TLS settings ({text}): check redis.ca_file, and that redis.cert_file and redis.key_file are a certificate and its own key (RSA keys of 2048 bits or more)",
            target.shown()
        ));
    }
    let hint = match target.is_tls() {
        true => " (over TLS: the server's certificate must be signed by a CA the system trusts, or by one in redis.ca_file; a server that asks for client certificates, tls-auth-clients, needs redis.cert_file and redis.key_file, a certificate its CA signed)",
        false => "",
    };
    Error::new(Kind::Redis {
        detail: format!("cannot connect to {}: {text}{hint}", target.shown()),
        transient: true,
    })
}

/// TLS for `rediss://`: the CA certificates to trust instead of the
/// system's roots (`redis.ca_file`), and the client certificate to show a
/// server that asks for one (`redis.cert_file`, `redis.key_file`), if any;
/// none for a plain `redis://` (the files are read and checked still).
#[derive(Clone, Default)]
pub(crate) struct Tls {
    /// The file's name, and what it holds.
    ca: Option<(String, Arc<Vec<u8>>)>,
    /// The certificate's and the key's files, and what they hold.
    client: Option<Arc<ClientFiles>>,
}

struct ClientFiles {
    cert_file: String,
    key_file: String,
    cert: Vec<u8>,
    key: Vec<u8>,
}

/// Reads the PEM file of `setting`, which must hold `marker` (rustls
/// skips what it cannot read, and would only say later, at each connect,
/// that the handshake failed).
fn read_pem(setting: &str, file: &str, marker: &str, what: &str) -> Result<Vec<u8>> {
    let pem = std::fs::read(file)
        .map_err(|e| Error::config(format!("{setting} {file:?} cannot be read: {e}")))?;
    if !holds(&pem, marker) {
        return Err(Error::config(format!(
            "{setting} {file:?} holds no {what} in PEM (no line with {marker})"
        )));
    }
    Ok(pem)
}

fn holds(pem: &[u8], text: &str) -> bool {
    pem.windows(text.len()).any(|w| w == text.as_bytes())
}

impl Tls {
    /// Reads `redis.ca_file`, `redis.cert_file` and `redis.key_file`, for
    /// `target` (`redis.url`).
    pub fn from_config(c: &crate::config::RedisConfig, target: &Target) -> Result<Tls> {
        c.files_named()?;
        let mut tls = Tls::default();
        if !c.ca_file.is_empty() {
            let pem = read_pem(
                "redis.ca_file",
                &c.ca_file,
                "-----BEGIN CERTIFICATE-----",
                "CA certificate",
            )?;
            tls.ca = Some((c.ca_file.clone(), Arc::new(pem)));
        }
        match (c.cert_file.is_empty(), c.key_file.is_empty()) {
            (true, true) => {}
            (false, false) => {
                use rustls_pki_types::pem::PemObject;
                let cert = read_pem(
                    "redis.cert_file",
                    &c.cert_file,
                    "-----BEGIN CERTIFICATE-----",
                    "certificate",
                )?;
                if !rustls_pki_types::CertificateDer::pem_slice_iter(&cert).all(|r| r.is_ok()) {
                    return Err(Error::config(format!(
                        "redis.cert_file {:?} holds a certificate that cannot be read as PEM",
                        c.cert_file
                    )));
                }
                // PKCS#8, PKCS#1 and SEC1 keys all end their first line so.
                let key = read_pem("redis.key_file", &c.key_file, "PRIVATE KEY-----", "private key")?;
                // The parser's own errors may quote the key's text: never
                // shown.
                if holds(&key, "-----BEGIN ENCRYPTED PRIVATE KEY-----")
                    || holds(&key, "Proc-Type: 4,ENCRYPTED")
                {
                    return Err(Error::config(format!(
                        "redis.key_file {:?} is encrypted, and fga-wb takes no passphrase: give it the key decrypted (openssl pkey -in <file> -out <plain file>, readable only by fga-wb)",
                        c.key_file
                    )));
                }
                if rustls_pki_types::PrivateKeyDer::from_pem_slice(&key).is_err() {
                    return Err(Error::config(format!(
                        "redis.key_file {:?} holds no private key that can be read (PKCS#8, PKCS#1 or SEC1 in PEM, one line per line: a key pasted on one line with \\n for its line breaks needs them back)",
                        c.key_file
                    )));
                }
                tls.client = Some(Arc::new(ClientFiles {
                    cert_file: c.cert_file.clone(),
                    key_file: c.key_file.clone(),
                    cert,
                    key,
                }));
            }
            _ => {
                return Err(Error::config(
                    "redis.cert_file and redis.key_file go together: give both (the client certificate and its private key, in PEM) or neither",
                ))
            }
        }
        if (tls.ca.is_some() || tls.client.is_some()) && !target.is_tls() {
            tracing::warn!("redis.ca_file, redis.cert_file or redis.key_file is set but redis.url is not rediss://: the connection is not encrypted, and the files are not used");
            return Ok(Tls::default());
        }
        Ok(tls)
    }

    fn certificates(&self) -> Option<redis::TlsCertificates> {
        if self.ca.is_none() && self.client.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self.client.as_ref().map(|c| redis::ClientTlsConfig {
                client_cert: c.cert.clone(),
                client_key: c.key.clone(),
            }),
            // None: the system's roots.
            root_cert: self.ca.as_ref().map(|(_, pem)| pem.to_vec()),
        })
    }

    /// What is wrong when a client cannot be built: the CA, certificate
    /// and key files given, else the URL.
    fn refused(&self, target: &Target, e: redis::RedisError) -> Error {
        let mut files = Vec::new();
        if let Some((file, _)) = &self.ca {
            files.push(format!("redis.ca_file {file:?} (PEM CA certificates)"));
        }
        if let Some(c) = &self.client {
            files.push(format!(
                "redis.cert_file {:?} and redis.key_file {:?} (a PEM certificate and its private key)",
                c.cert_file, c.key_file
            ));
        }
        if files.is_empty() {
            return not_a_url(target, e);
        }
        Error::config(format!(
            "{} or redis.url cannot be used ({e})",
            files.join(", ")
        ))
    }

    /// A client for one node, with fga-wb's socket settings.
    fn client(&self, info: redis::ConnectionInfo, target: &Target) -> Result<redis::Client> {
        let info = info.set_tcp_settings(tcp_settings());
        match self.certificates() {
            Some(certs) => redis::Client::build_with_tls(info, certs),
            None => redis::Client::open(info),
        }
        .map_err(|e| self.refused(target, e))
    }

    /// A cluster client builder for `seeds`, with fga-wb's socket settings.
    fn cluster(&self, seeds: &[String]) -> redis::cluster::ClusterClientBuilder {
        let b =
            redis::cluster::ClusterClientBuilder::new(seeds.to_vec()).tcp_settings(tcp_settings());
        match self.certificates() {
            Some(certs) => b.certs(certs),
            None => b,
        }
    }
}

fn not_a_url(target: &Target, e: impl std::fmt::Display) -> Error {
    Error::config(format!(
        "redis.url {:?} is not a Redis URL ({e}); a password holding `/`, `?`, `#` or `@` must be percent-encoded (`/` as %2F)",
        target.shown()
    ))
}

/// Called with every connection that drops (before it is re-established).
pub(crate) type OnDisconnect = Arc<dyn Fn() + Send + Sync>;

/// Longest any one command may take, redirections and reconnects included.
pub(crate) const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Every connection's socket: a peer that stops answering at all (a node
/// that died without a reset, an address moved to another machine) drops
/// the connection for a reconnect once a call would have timed out
/// anyway: a response timeout alone keeps the socket, and every call
/// timed out on it until the kernel gave up, some fifteen minutes later.
/// Keepalive finds it on an idle connection (a subscription) too. Nagle's
/// algorithm stays on (redis-rs's default): with it, pipelined pushes
/// reach Redis in fewer reads, and Redis takes 20% more grants a second
/// (benches/RESULTS.md, stop 59).
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::{socket2::TcpKeepalive, TcpSettings};
    let keepalive = TcpKeepalive::new().with_time(Duration::from_secs(10));
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "fuchsia",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "windows"
    ))]
    let keepalive = keepalive.with_interval(Duration::from_secs(5));
    let s = TcpSettings::default().set_keepalive(keepalive);
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    let s = s.set_user_timeout(RESPONSE_TIMEOUT);
    s
}

/// A cluster client that follows redirections, with no per-attempt
/// response timeout (on one, redis-rs would re-send a script, and scripts
/// are not idempotent): only the overall time is capped. It does send a
/// command again after a dropped connection or an I/O error, within
/// `retries`: a `finish` is repeatable; what a `take` or `fetch` whose
/// first reply was lost took goes back once the writer holds nothing (see
/// ARCHITECTURE.md). RESP3 carries the library's notice of a dropped
/// connection.
fn cluster_client(
    seeds: &[String],
    target: &Target,
    tls: &Tls,
    on_disconnect: OnDisconnect,
) -> Result<redis::cluster::ClusterClient> {
    tls.cluster(seeds)
        .connection_timeout(Duration::from_secs(3))
        .overall_response_timeout(Some(RESPONSE_TIMEOUT))
        .retries(8)
        .min_retry_wait(50)
        .max_retry_wait(1_000)
        .use_protocol(redis::ProtocolVersion::RESP3)
        .push_sender(disconnect_sender(on_disconnect))
        .build()
        .map_err(|e| tls.refused(target, e))
}

fn disconnect_sender(
    f: OnDisconnect,
) -> impl Fn(redis::PushInfo) -> std::result::Result<(), ()> + Send + Sync + 'static {
    move |push: redis::PushInfo| {
        if push.kind == redis::PushKind::Disconnection {
            f();
        }
        Ok(())
    }
}

/// Connects to `target`; `on_disconnect` is told of every dropped
/// connection (a restart or a failover may have happened behind it).
pub(crate) async fn connect(
    target: &Target,
    tls: &Tls,
    on_disconnect: OnDisconnect,
) -> Result<Conn> {
    match target {
        Target::Node(url) => {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| not_a_url(target, e))?;
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            let client = tls.client(info.set_redis_settings(settings), target)?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(3)))
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_number_of_retries(2)
                .set_push_sender(disconnect_sender(on_disconnect.clone()));
            let c = Node::connect(client, config, on_disconnect.clone())
                .await
                .map_err(|e| unreachable(target, e))?;
            Ok(Conn::Node(c))
        }
        Target::Cluster(seeds) => {
            let c = cluster_client(seeds, target, tls, on_disconnect)?
                .get_async_connection()
                .await
                .map_err(|e| unreachable(target, e))?;
            Ok(Conn::Cluster(c))
        }
    }
}

/// Messages on `channel`: plain pub/sub on one node, sharded pub/sub
/// (SSUBSCRIBE) on a cluster, where the store's scripts SPUBLISH. On a
/// cluster the subscription is renewed after a failover or a reshard
/// drops it. The stream ends when the subscription is lost for good (the
/// caller subscribes again).
pub(crate) async fn subscribe(
    target: &Target,
    tls: &Tls,
    channel: &str,
) -> Result<BoxStream<'static, String>> {
    match target {
        Target::Node(url) => {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| not_a_url(target, e))?;
            let client = tls.client(info, target)?;
            // Bounded: a peer that takes the connection and never answers
            // must not hold the subscriber (it subscribes again).
            let subscribed = tokio::time::timeout(RESPONSE_TIMEOUT, async {
                let mut ps = client.get_async_pubsub().await?;
                ps.subscribe(channel).await?;
                Ok::<_, redis::RedisError>(ps)
            })
            .await;
            let ps = match subscribed {
                Ok(ps) => ps.map_err(super::redis_error)?,
                Err(_) => {
                    return Err(Error::new(Kind::Redis {
                        detail: format!(
                            "subscribing to store events at {} took over {}s",
                            target.shown(),
                            RESPONSE_TIMEOUT.as_secs()
                        ),
                        transient: true,
                    }))
                }
            };
            Ok(ps
                .into_on_message()
                .map(|m| m.get_payload::<String>().unwrap_or_default())
                .boxed())
        }
        Target::Cluster(seeds) => {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<redis::PushInfo>();
            let client = tls
                .cluster(seeds)
                .connection_timeout(Duration::from_secs(3))
                .overall_response_timeout(Some(RESPONSE_TIMEOUT))
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .build()
                .map_err(|e| tls.refused(target, e))?;
            // Subscriptions only: a command on this connection could be
            // answered with an unsolicited push.
            let mut sub = client
                .get_async_connection()
                .await
                .map_err(|e| unreachable(target, e))?;
            sub.ssubscribe(channel).await.map_err(super::redis_error)?;
            let channel = channel.to_owned();
            let (msg_tx, msg_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
            tokio::spawn(async move {
                loop {
                    // Ends with the stream's reader, not only with a message
                    // after it is gone: the connection holds the push
                    // sender, so on a quiet store `recv` alone never ends.
                    let push = tokio::select! {
                        push = rx.recv() => match push {
                            Some(push) => push,
                            None => return,
                        },
                        () = msg_tx.closed() => return,
                    };
                    match push.kind {
                        redis::PushKind::SMessage => {
                            let payload = push
                                .data
                                .get(1)
                                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                                .unwrap_or_default();
                            if msg_tx.send(payload).is_err() {
                                return;
                            }
                        }
                        // A failover or reshard dropped the subscription, or
                        // a node connection died: subscribe again.
                        redis::PushKind::SUnsubscribe | redis::PushKind::Disconnection => {
                            // Anything may have been missed meanwhile.
                            if msg_tx.send("all".into()).is_err() {
                                return;
                            }
                            let mut wait = Duration::from_millis(100);
                            while sub.ssubscribe(&channel).await.is_err() {
                                tokio::time::sleep(wait).await;
                                wait = (wait * 2).min(Duration::from_secs(2));
                                if msg_tx.is_closed() {
                                    return;
                                }
                            }
                            // And what was sent until now: waiting checks
                            // look again, subscribed.
                            if msg_tx.send("all".into()).is_err() {
                                return;
                            }
                        }
                        _ => {}
                    }
                }
            });
            Ok(tokio_stream_from(msg_rx))
        }
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<String>,
) -> BoxStream<'static, String> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// The keys and channel a store uses, for the connect's test of what its
/// Redis user may do.
pub(crate) struct Uses<'a> {
    /// The store's keys' prefix (with its cluster hash tag).
    pub(crate) prefix: &'a str,
    /// `redis.key_prefix`, for the error's advice.
    pub(crate) key_prefix: &'a str,
    /// PUBLISH, or SPUBLISH on a cluster.
    pub(crate) publish: &'static str,
}

/// What the connect's test publishes on the store's channel: other
/// processes skip it.
pub(crate) const PROBE: &str = "probe";

/// The connect's test script: the node's replication id and role, and on a
/// primary the first thing the user may not do of what the store's scripts
/// do (write a key under its prefix, publish on its channel), with
/// Redis's error. Run inside a script, as the store's calls are: an ACL
/// denial there would fail a call halfway, after its writes.
const TEST_SCRIPT: &str = r#"
local i = redis.pcall('INFO', 'replication')
if type(i) ~= 'string' then i = '' end
local role = string.match(i, 'role:(%w+)') or ''
local denied = ''
if role == '' or role == 'master' then
  for _, c in ipairs({ { 'DEL', KEYS[1] }, { ARGV[1], ARGV[2], ARGV[3] } }) do
    local r = redis.pcall(unpack(c))
    -- Redis 7.0 words a denial inside a script so; later ones, NOPERM.
    if type(r) == 'table' and r.err and (string.find(r.err, 'NOPERM', 1, true)
        or string.find(r.err, 'user executing the script', 1, true)) then
      denied = c[1] .. ' ' .. c[2] .. ': ' .. r.err
      break
    end
  end
end
return { 1, string.match(i, 'master_replid:(%w+)') or '', role, denied }
"#;

/// What the server is, checked at connect: Lua scripting must work, and
/// the Redis user may use the store's keys and channel. The same test
/// script reads the node's replication id, which every check compares (to
/// notice a failover or a restart behind a connection that did not drop):
/// a warning when scripts cannot read it (an ACL that denies INFO, a
/// renamed command).
pub(crate) async fn check_server(conn: &mut Conn, target: &Target, uses: &Uses<'_>) -> Result<()> {
    let r: redis::RedisResult<(i64, String, String, String)> = redis::cmd("EVAL")
        .arg(TEST_SCRIPT)
        .arg(1)
        .arg(format!("{}:probe", uses.prefix))
        .arg(uses.publish)
        .arg(format!("{}:events", uses.prefix))
        .arg(PROBE)
        .query_async(conn)
        .await;
    let acl = |what: &str| {
        Error::config(format!(
            "Redis at {} does not let fga-wb's user {what}; fga-wb needs EVAL and EVALSHA, the keys and channels under redis.key_prefix, and the commands its scripts run: for instance `ACL SETUSER <user> ~{k}:* &{k}:* +@all` (Redis 7 gives a new user no channels)",
            target.shown(),
            k = uses.key_prefix
        ))
    };
    match r {
        Ok((1, _, _, denied)) if !denied.is_empty() => Err(acl(&format!("run {denied}"))),
        // Its writes would fail (READONLY), or not reach the primary. Not
        // a configuration error for sure: a primary's address may name a
        // replica for a moment during a failover.
        Ok((1, _, role, _)) if !role.is_empty() && role != "master" && !target.is_cluster() => {
            Err(Error::new(Kind::Redis {
                detail: format!(
                    "Redis at {} is a replica (role {role}); point redis.url at the primary (during a failover, try again)",
                    target.shown()
                ),
                transient: true,
            }))
        }
        Ok((1, replid, _, _)) => {
            if replid.is_empty() {
                tracing::warn!(
                    redis = %target.shown(),
                    "Redis does not let scripts run INFO replication (an ACL, or a renamed command): a failover or restart behind a connection that did not drop is noticed only by the writers' heartbeats, up to a third of redis.writer_lease later; allow INFO to fga-wb's Redis user"
                );
            }
            check_eviction(conn, target).await
        }
        Ok((other, _, _, _)) => Err(Error::config(format!(
            "Redis at {} answered {other} to a test script; fga-wb needs Lua scripting (Redis 7.0+ or Valkey 7.2+)",
            target.shown()
        ))),
        Err(e) if e.is_io_error() || e.is_connection_refusal() || e.is_timeout() => {
            Err(unreachable(target, e))
        }
        // Not a missing feature: a server that cannot serve yet.
        Err(e) if super::not_ready(&e) => Err(Error::new(Kind::Redis {
            detail: format!(
                "Redis at {} is not ready ({}); try again",
                target.shown(),
                super::error_text(&e)
            ),
            transient: true,
        })),
        // Its key, or EVAL itself.
        Err(e) if e.code() == Some("NOPERM") => Err(acl(&format!("run a test script ({})", super::error_text(&e)))),
        Err(e) => Err(Error::config(format!(
            "Redis at {} refused a test script ({}); fga-wb needs Lua scripting (EVAL/EVALSHA) allowed: Redis 7.0+ or Valkey 7.2+",
            target.shown(),
            super::error_text(&e)
        ))),
    }
}

/// Refuses a Redis that may evict keys when full: it would drop acknowledged
/// ops (and the sequence counter) silently. With `noeviction` a full Redis
/// refuses writes instead, and `grant` fails with an error. Managed services
/// that hide CONFIG get a warning: check the policy there.
async fn check_eviction(conn: &mut Conn, target: &Target) -> Result<()> {
    // A map in RESP3, a flat list in RESP2: HashMap reads both.
    let r: redis::RedisResult<std::collections::HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(conn)
        .await;
    match r {
        Ok(v) => match v.get("maxmemory-policy").map(String::as_str) {
            Some("noeviction") | None => Ok(()),
            Some(policy) => Err(Error::config(format!(
                "Redis at {} has maxmemory-policy {policy}: when full it would evict fga-wb's pending ops; set maxmemory-policy noeviction (a full Redis then refuses new ops with an error instead)",
                target.shown()
            ))),
        },
        Err(e) => {
            tracing::warn!(redis = %target.shown(), error = %super::error_text(&e), "cannot read Redis's maxmemory-policy; make sure it is noeviction, or a full Redis may evict acknowledged ops");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A URL's `#fragment` is refused: redis-rs reads `#insecure` as "do
    /// not verify the certificate" when its insecure TLS feature is on. A
    /// password's `#`, percent-encoded as a URL's password must be, is no
    /// fragment.
    #[test]
    fn a_url_fragment_is_refused() {
        for url in [
            "rediss://h:6380/#insecure",
            "rediss://u:p@h:6380#insecure",
            "rediss+cluster://a:1,b:2/#insecure",
            "redis://a:1,rediss://b:2/#insecure",
        ] {
            let err = Target::parse(url)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains("#fragment"), "{url}: {err}");
        }
        assert!(Target::parse("rediss://u:p%23w@h:6380").is_ok());
    }

    /// `valkeys://` is TLS as much as `rediss://` (redis-rs connects over
    /// TLS for both). Before, a `redis.ca_file` with a `valkeys://` URL was
    /// said to be unused on an unencrypted connection.
    #[test]
    fn valkeys_is_tls_too() {
        for (url, tls) in [
            ("rediss://h:1", true),
            ("valkeys://h:1", true),
            ("VALKEYS://h:1", true),
            ("redis://h:1", false),
            ("valkey://h:1", false),
            ("rediss+cluster://a:1,b:2", true),
            ("redis://a:1,valkeys://b:2", true),
        ] {
            assert_eq!(Target::parse(url).unwrap().is_tls(), tls, "{url}");
        }
    }

    /// A server that cannot serve yet (loading its data after a restart, a
    /// long script, a replica cut off or just demoted) fails a call as
    /// transient, not as a configuration error. Before, the connect's test
    /// script read LOADING as "needs Lua scripting", and `fga-wb status`
    /// exited 2 right after a restart.
    #[test]
    fn a_server_not_ready_is_transient() {
        let refused = |reply: &str| {
            redis::parse_redis_value(reply.as_bytes())
                .and_then(Value::extract_error)
                .expect_err("a server error")
        };
        for reply in [
            "-LOADING Redis is loading the dataset in memory\r\n",
            "-BUSY Redis is busy running a script.\r\n",
            "-MASTERDOWN Link with MASTER is down\r\n",
            "-READONLY You can't write against a read only replica.\r\n",
        ] {
            let e = refused(reply);
            assert!(super::super::not_ready(&e), "{reply}");
            let e = super::super::redis_error(e);
            assert!(e.is_transient() && !e.is_config(), "{reply}: {e}");
        }
        assert!(!super::super::not_ready(&refused(
            "-NOSCRIPT No matching script\r\n"
        )));
    }

    #[test]
    fn urls_name_one_node_or_a_cluster() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:6379").unwrap(),
            Target::Node("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            Target::parse("redis://a:1, redis://b:2").unwrap(),
            Target::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        // A comma in a password does not make a cluster of one node.
        assert_eq!(
            Target::parse("redis://u:p,w@a:1").unwrap(),
            Target::Node("redis://u:p,w@a:1".into())
        );
        assert_eq!(
            Target::parse("redis://u:p,w@a:1,,redis://:x,y@b:2").unwrap(),
            Target::Cluster(vec!["redis://u:p,w@a:1".into(), "redis://:x,y@b:2".into()])
        );
        assert_eq!(
            Target::parse("redis+cluster://user:pw@a:1,b:2").unwrap(),
            Target::Cluster(vec![
                "redis://user:pw@a:1".into(),
                "redis://user:pw@b:2".into()
            ])
        );
        assert_eq!(
            Target::parse("rediss+cluster://a:1").unwrap(),
            Target::Cluster(vec!["rediss://a:1".into()])
        );
        assert!(Target::parse("").is_err());
        assert!(Target::parse("redis+cluster://").is_err());
        let shown = Target::parse("redis+cluster://u:secret@a:1,b:2")
            .unwrap()
            .shown();
        assert!(!shown.contains("secret"), "{shown}");
        for url in ["redis://:secret@a:1", "redis+cluster://u:secret@a:1,b:2"] {
            let debug = format!("{:?}", Target::parse(url).unwrap());
            assert!(
                !debug.contains("secret") && debug.contains("a:1"),
                "{debug}"
            );
        }
    }
}
