//! A thin client for OpenFGA's HTTP API.
//!
//! It knows requests, responses and how to classify failures; it knows nothing
//! about buffering. Every call is one HTTP request (or, for
//! [`Client::batch_check`] and [`Client::read_all`], a few), with a `tracing`
//! span around it.

mod auth;
mod types;

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

pub use auth::{Credentials, OAuth2, Secret};
pub use types::{
    AuthorizationModel, CheckRequest, Consistency, Context, ListObjectsRequest, ListUsersRequest,
    OnDuplicate, OnMissing, ReadFilter, ReadPage, StoredTuple, TypeDefinition, WriteRequest,
};

use crate::error::{ApiError, Error, Kind, Result};
use crate::tuple::TupleKey;
use auth::Authenticator;
use types::*;

/// OpenFGA's limit on checks in one BatchCheck request.
pub const MAX_CHECKS_PER_BATCH: usize = 50;
/// BatchCheck requests one `batch_check` keeps in flight.
pub const BATCH_CHECKS_IN_FLIGHT: usize = 4;
/// OpenFGA's default limit on tuples in one Write request.
pub const DEFAULT_MAX_TUPLES_PER_WRITE: usize = 100;
/// OpenFGA's limit on contextual tuples in one Check.
pub const MAX_CONTEXTUAL_TUPLES: usize = 100;

/// A client for one OpenFGA server. Cheap to clone: clones share the
/// connection pool and the cached OAuth2 token.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    base: String,
    /// Shared by forks, so they share one cached OAuth2 token.
    auth: Arc<Authenticator>,
    timeout: Duration,
    connect_timeout: Duration,
    pool_max_idle_per_host: usize,
    /// A private CA to trust, kept for forks.
    ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("api_url", &redact_url(&self.inner.base))
            .finish_non_exhaustive()
    }
}

/// Builds a [`Client`]. A bad setting is remembered and returned by
/// [`ClientBuilder::build`], so chained calls never panic.
#[must_use]
pub struct ClientBuilder {
    api_url: String,
    credentials: Credentials,
    timeout: Duration,
    connect_timeout: Duration,
    pool_max_idle_per_host: usize,
    ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("api_url", &redact_url(&self.api_url))
            .field("credentials", &self.credentials)
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

impl ClientBuilder {
    /// Authenticate with a preshared API token. Default: no authentication.
    pub fn api_token(mut self, token: Secret) -> Self {
        self.credentials = if token.is_empty() {
            Credentials::None
        } else {
            Credentials::ApiToken(token)
        };
        self
    }

    /// Authenticate however `credentials` says.
    pub fn credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Give up on a request after this long. Default: 10 s.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Give up on connecting after this long. Default: 3 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Keep at most this many idle connections. Default: 32.
    pub fn pool_max_idle(mut self, n: usize) -> Self {
        self.pool_max_idle_per_host = n;
        self
    }

    /// Trust this CA (PEM) for `https://` servers, besides the usual roots:
    /// an OpenFGA behind a private CA. Default: the usual roots only.
    pub fn ca_certificate_pem(mut self, pem: Vec<u8>) -> Self {
        self.ca_pem = Some(pem);
        self
    }

    /// The client, or the first setting that was wrong.
    pub fn build(self) -> Result<Client> {
        let base = self.api_url.trim_end_matches('/').to_owned();
        let parsed = reqwest::Url::parse(&base).map_err(|e| {
            Error::config(format!(
                "openfga.api_url {:?} is not a URL ({e}); expected e.g. http://127.0.0.1:8080",
                redact_url(&base)
            ))
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(Error::config(format!(
                "openfga.api_url {:?} must start with http:// or https://",
                redact_url(&base)
            )));
        }
        // A user and password in the URL go out as a Basic Authorization
        // header, and a token as a second one: OpenFGA reads the first, and
        // refuses every request.
        let userinfo = !parsed.username().is_empty() || parsed.password().is_some();
        if userinfo && !matches!(self.credentials, Credentials::None) {
            return Err(Error::config(format!(
                "openfga.api_url {:?} carries a user and password, and a token (api_token or oauth2) is set too: OpenFGA takes one Authorization header; remove the user:password@ from the URL",
                redact_url(&base)
            )));
        }
        // One set in code skips the configuration's checks: reqwest would
        // refuse every request, which reads as OpenFGA out of reach.
        if let Credentials::ApiToken(t) = &self.credentials {
            if !auth::header_safe(t) {
                return Err(Error::config(
                    "the API token has a character an HTTP header cannot carry (a newline or another control character): remove it",
                ));
            }
        }
        if let Credentials::ClientCredentials(o) = &self.credentials {
            if reqwest::Url::parse(&o.token_url).is_err() {
                return Err(Error::config(format!(
                    "openfga.oauth2.token_url {:?} is not a URL",
                    redact_url(&o.token_url)
                )));
            }
        }
        for w in sent_in_clear(&parsed, &self.credentials, self.ca_pem.is_some()) {
            tracing::warn!("{w}");
        }
        let http = http_client(
            self.timeout,
            self.connect_timeout,
            self.pool_max_idle_per_host,
            self.ca_pem.as_deref(),
        )?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                auth: Arc::new(Authenticator::new(self.credentials)),
                timeout: self.timeout,
                connect_timeout: self.connect_timeout,
                pool_max_idle_per_host: self.pool_max_idle_per_host,
                ca_pem: self.ca_pem,
            }),
        })
    }
}

/// What is wrong, though it works, with where secrets go: a token or a
/// client secret over `http://` to another machine (anyone on the path can
/// read it), or a CA file for a connection that uses none.
fn sent_in_clear(api: &reqwest::Url, credentials: &Credentials, ca_file: bool) -> Vec<String> {
    let in_clear = |u: &reqwest::Url| {
        let host = u.host_str().unwrap_or("localhost");
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let local = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        u.scheme() == "http" && !local
    };
    // A user and password in the URL go out as a Basic header.
    let basic = !api.username().is_empty() || api.password().is_some();
    let issuer = match credentials {
        Credentials::ClientCredentials(o) => reqwest::Url::parse(&o.token_url).ok(),
        _ => None,
    };
    let secret_to = match credentials {
        Credentials::None => (basic && in_clear(api)).then_some("openfga.api_url"),
        Credentials::ApiToken(_) => in_clear(api).then_some("openfga.api_url"),
        Credentials::ClientCredentials(_) => issuer
            .as_ref()
            .filter(|u| in_clear(u))
            .map(|_| "openfga.oauth2.token_url")
            .or_else(|| in_clear(api).then_some("openfga.api_url")),
    };
    let mut out = Vec::new();
    if let Some(setting) = secret_to {
        out.push(format!(
            "{setting} is plain http:// to another machine: the credentials sent there can be read on the way; use https://"
        ));
    }
    // The token issuer is reached through the same client, with the CA.
    let issuer_tls = issuer.is_some_and(|u| u.scheme() == "https");
    if ca_file && api.scheme() == "http" && !issuer_tls {
        out.push(
            "openfga.ca_file is set but nothing is reached over https://: the CA is not used"
                .into(),
        );
    }
    out
}

fn http_client(
    timeout: Duration,
    connect: Duration,
    pool: usize,
    ca_pem: Option<&[u8]>,
) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(connect)
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        // OpenFGA never redirects; whatever does (a login page, http to
        // https) would have a Write's body dropped (a 302 turns it into a
        // GET), or sent with its credentials to another host.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
            Error::config(format!(
                "the CA certificate is not PEM ({e}); give openfga.ca_file a PEM file"
            ))
        })?;
        if certs.is_empty() {
            return Err(Error::config(
                "the CA file holds no certificate; give openfga.ca_file a PEM file",
            ));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| Error::config(format!("cannot build the HTTP client: {e}")))
}

/// A URL (or a list of them, as Redis Cluster seeds) without what may be a
/// password, for messages: in each URL (see [`split_urls`]), everything
/// between its `://` (or its start, if it has none) and its last `@` is
/// shown as `***@`, as a password may hold an unencoded `/`, `?`, `#`, `@`
/// or even `://`, so where the authority ends cannot be told; and the query
/// is shown only up to its first parameter that may be a secret: a `pass`
/// or `password` (as Redis's unix-socket URLs take them), a key in a token
/// URL (`?code=`), anything but a few known to be harmless.
pub(crate) fn redact_url(url: &str) -> String {
    split_urls(url)
        .into_iter()
        .map(redact_one)
        .collect::<Vec<_>>()
        .join(",")
}

/// The first 200 bytes or so of `text` (up to a character's end),
/// trimmed.
fn excerpt(text: &str) -> String {
    let mut end = text.len().min(200);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim().to_owned()
}

/// Query parameters shown in messages: Redis URLs' database and protocol,
/// and an identity provider's API version.
const HARMLESS_PARAMS: &[&str] = &["db", "protocol", "api-version"];

fn redact_one(url: &str) -> String {
    let (scheme, body) = url.split_at(scheme_len(url));
    // A unix socket's path (`redis+unix:///run/r.sock`) has no user info;
    // an `@` there may be in its password parameter. A scheme-relative
    // `//u:p@h` has, and so has `redis:///:p@h` (a slash too many, which
    // Redis's URL parser refuses with the URL shown).
    let socket = scheme.is_empty() || scheme.contains("unix");
    let path = socket && body.starts_with('/') && !body.starts_with("//");
    let at = body.rfind('@').filter(|_| !path);
    let shown = match at {
        None => without_password_param(body).to_owned(),
        // The `@` may be inside a password parameter: hide it all.
        Some(at) if cut_at_param(&body[..at], password_param).len() < at => "***".to_owned(),
        Some(at) => format!("***@{}", without_password_param(&body[at + 1..])),
    };
    format!("{scheme}{shown}")
}

/// `s` without its first query parameter that may be a secret (any but
/// those of [`HARMLESS_PARAMS`]) and all that follows it (an unencoded
/// password may hold `&` or `#`).
fn without_password_param(s: &str) -> &str {
    cut_at_param(s, |name| {
        !HARMLESS_PARAMS.iter().any(|h| name.eq_ignore_ascii_case(h))
    })
}

/// `s` up to its first query parameter whose name `cut` picks (without
/// the `?` or `&` before it).
fn cut_at_param(s: &str, cut: impl Fn(&str) -> bool) -> &str {
    let Some(q) = s.find('?') else { return s };
    let mut at = q + 1;
    for param in s[q + 1..].split('&') {
        if cut(param.split('=').next().unwrap_or_default()) {
            // Keep the `?` only if a parameter stays before it.
            return if at == q + 1 { &s[..q] } else { &s[..at - 1] };
        }
        at += param.len() + 1;
    }
    s
}

/// Whether a query parameter's name may be a password's: `pass`,
/// `password`, or a percent-encoded name (`pa%73s`), which may decode to
/// either.
fn password_param(name: &str) -> bool {
    name.eq_ignore_ascii_case("pass") || name.eq_ignore_ascii_case("password") || name.contains('%')
}

/// The URLs of a comma-separated list (Redis Cluster seeds), each with
/// the whitespace that followed its comma: a comma starts the next URL
/// only where the `://` of a known scheme follows it, so a comma inside a
/// password does not split a URL.
pub(crate) fn split_urls(list: &str) -> Vec<&str> {
    let mut urls = Vec::new();
    let mut rest = list;
    loop {
        // Past this URL's own `://`, so that it is not taken for the next.
        let body = scheme_len(rest);
        let end = body + next_url(&rest[body..]);
        urls.push(&rest[..end]);
        match rest.get(end + 1..) {
            Some(next) => rest = next,
            None => return urls,
        }
    }
}

/// The length of `s`'s leading scheme and `://` (with the whitespace
/// before them), or 0 if it does not start with one.
fn scheme_len(s: &str) -> usize {
    let t = s.trim_start();
    let Some((scheme, _)) = t.split_once("://") else {
        return 0;
    };
    let mut chars = scheme.chars();
    let is_scheme = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    if is_scheme {
        s.len() - t.len() + scheme.len() + 3
    } else {
        0
    }
}

/// Where the next URL of a comma-separated list starts in `s` (the part
/// after a scheme's `://`): at a comma followed by the `://` of a scheme
/// fga-wb takes, or `s.len()`. Only known schemes, so that a password
/// holding `,x://` is not cut in two.
fn next_url(s: &str) -> usize {
    const SCHEMES: [&str; 10] = [
        "redis",
        "rediss",
        "redis+unix",
        "unix",
        "redis+cluster",
        "rediss+cluster",
        "valkey",
        "valkeys",
        "http",
        "https",
    ];
    let mut from = 0;
    while let Some(c) = s[from..].find(',') {
        let comma = from + c;
        let after = s[comma + 1..].trim_start();
        if let Some((scheme, _)) = after.split_once("://") {
            if SCHEMES.iter().any(|k| scheme.eq_ignore_ascii_case(k)) {
                return comma;
            }
        }
        from = comma + 1;
    }
    s.len()
}

impl Client {
    /// A builder for a client of the server at `api_url`
    /// (e.g. `http://127.0.0.1:8080`).
    pub fn builder(api_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            api_url: api_url.into(),
            credentials: Credentials::None,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            pool_max_idle_per_host: 32,
            ca_pem: None,
        }
    }

    /// A client with the same settings and credentials (one cached OAuth2
    /// token) but its own connection pool: connections belong to the Tokio
    /// runtime that opened them, so a client used on another runtime (the
    /// flusher's thread) must not share them.
    pub(crate) fn fork(&self) -> Result<Client> {
        let i = &self.inner;
        Ok(Client {
            inner: Arc::new(Inner {
                http: http_client(
                    i.timeout,
                    i.connect_timeout,
                    i.pool_max_idle_per_host,
                    i.ca_pem.as_deref(),
                )?,
                base: i.base.clone(),
                auth: i.auth.clone(),
                timeout: i.timeout,
                connect_timeout: i.connect_timeout,
                pool_max_idle_per_host: i.pool_max_idle_per_host,
                ca_pem: i.ca_pem.clone(),
            }),
        })
    }

    /// The server's base URL as given, with any user and password in it:
    /// not for logs (the client's `Debug` shows it without them).
    pub fn api_url(&self) -> &str {
        &self.inner.base
    }

    /// `GET /healthz`: Ok once the server reports `SERVING`.
    pub async fn health(&self) -> Result<()> {
        #[derive(serde::Deserialize)]
        struct Health {
            #[serde(default)]
            status: String,
        }
        let h: Health = self
            .call::<(), _>("healthz", Method::GET, "/healthz".into(), None)
            .await?;
        if h.status == "SERVING" {
            Ok(())
        } else {
            Err(Error::new(Kind::Api(ApiError {
                operation: "healthz",
                status: 503,
                code: "not_serving".into(),
                message: format!("server status is {:?}", h.status),
                retry_after: None,
            })))
        }
    }

    /// Creates a store and returns its id.
    pub async fn create_store(&self, name: &str) -> Result<String> {
        let body = serde_json::json!({ "name": name });
        let s: StoreCreated = self
            .call("create store", Method::POST, "/stores".into(), Some(&body))
            .await?;
        Ok(s.id)
    }

    /// Whether store `store_id` exists: `Ok(())`, or an error for which
    /// [`Error::is_not_found`] is true when it does not, or was deleted.
    /// (OpenFGA's other reads do not say: a store that does not exist lists
    /// no models, and a Write to it names its model as missing. With
    /// OpenFGA's access control on, only a store admin may ask.)
    pub async fn get_store(&self, store_id: &str) -> Result<()> {
        let path = format!("/stores/{}", seg(store_id));
        let _: StoreCreated = self
            .call::<(), _>("read store", Method::GET, path, None)
            .await?;
        Ok(())
    }

    /// Writes an authorization model (in OpenFGA's JSON form) and returns its id.
    pub async fn write_authorization_model(
        &self,
        store_id: &str,
        model: &serde_json::Value,
    ) -> Result<String> {
        let path = format!("/stores/{}/authorization-models", seg(store_id));
        let m: ModelCreated = self
            .call("write authorization model", Method::POST, path, Some(model))
            .await?;
        Ok(m.authorization_model_id)
    }

    /// Reads one authorization model.
    pub async fn read_authorization_model(
        &self,
        store_id: &str,
        model_id: &str,
    ) -> Result<AuthorizationModel> {
        let path = format!(
            "/stores/{}/authorization-models/{}",
            seg(store_id),
            seg(model_id)
        );
        let m: ModelEnvelope = self
            .call::<(), _>("read authorization model", Method::GET, path, None)
            .await?;
        Ok(m.authorization_model)
    }

    /// Reads the store's newest authorization model, if it has one.
    pub async fn read_latest_authorization_model(
        &self,
        store_id: &str,
    ) -> Result<Option<AuthorizationModel>> {
        let path = format!("/stores/{}/authorization-models?page_size=1", seg(store_id));
        let list: ModelList = self
            .call::<(), _>("read authorization models", Method::GET, path, None)
            .await?;
        Ok(list.authorization_models.into_iter().next())
    }

    /// One Write request: all of it is applied, or none of it.
    pub async fn write(&self, store_id: &str, req: &WriteRequest) -> Result<()> {
        self.write_within(store_id, req, None).await
    }

    /// [`Client::write`], giving up after `limit` if that is shorter than
    /// the client's timeout.
    pub(crate) async fn write_within(
        &self,
        store_id: &str,
        req: &WriteRequest,
        limit: Option<Duration>,
    ) -> Result<()> {
        if req.is_empty() {
            return Ok(());
        }
        let path = format!("/stores/{}/write", seg(store_id));
        let span = tracing::debug_span!(
            "openfga.write",
            writes = req.writes.len(),
            deletes = req.deletes.len()
        );
        let _: serde_json::Value = self
            .call_within(
                "write",
                Method::POST,
                path,
                Some(&WriteBody::new(req)),
                // Counted from the call (a token fetch included), so passed
                // even when the request's own timeout is shorter.
                limit.map(|l| l.min(self.inner.timeout)),
            )
            .instrument(span)
            .await?;
        Ok(())
    }

    /// One Check.
    pub async fn check(&self, store_id: &str, req: &CheckRequest) -> Result<bool> {
        let path = format!("/stores/{}/check", seg(store_id));
        let span = tracing::debug_span!("openfga.check", contextual = req.contextual_tuples.len());
        let r: CheckResponse = self
            .call("check", Method::POST, path, Some(&CheckBody::new(req)))
            .instrument(span)
            .await?;
        Ok(r.allowed)
    }

    /// The objects of a type on which a user has a relation (ListObjects;
    /// OpenFGA caps the answer at its `--listObjects-max-results`).
    pub async fn list_objects(
        &self,
        store_id: &str,
        req: &ListObjectsRequest,
    ) -> Result<Vec<String>> {
        let path = format!("/stores/{}/list-objects", seg(store_id));
        let body = ListObjectsBody {
            object_type: &req.object_type,
            relation: &req.relation,
            user: &req.user,
            contextual_tuples: (!req.contextual_tuples.is_empty()).then(|| ContextualTuples {
                tuple_keys: &req.contextual_tuples,
            }),
            context: req.context.as_ref(),
            authorization_model_id: req.authorization_model_id.as_deref(),
            consistency: req.consistency,
        };
        let span = tracing::debug_span!(
            "openfga.list_objects",
            contextual = req.contextual_tuples.len()
        );
        let r: ListObjectsResponse = self
            .call("list objects", Method::POST, path, Some(&body))
            .instrument(span)
            .await?;
        Ok(r.objects)
    }

    /// The users of one type (or userset type) with a relation on an object
    /// (ListUsers), as tuple user strings: `user:anne`, `user:*`,
    /// `group:eng#member`.
    pub async fn list_users(&self, store_id: &str, req: &ListUsersRequest) -> Result<Vec<String>> {
        let path = format!("/stores/{}/list-users", seg(store_id));
        let (object_type, id) = req.object.split_once(':').unwrap_or((&req.object, ""));
        let (user_type, relation) = match req.user_filter.split_once('#') {
            Some((t, r)) => (t, Some(r)),
            None => (req.user_filter.as_str(), None),
        };
        let body = ListUsersBody {
            object: ObjectRef { object_type, id },
            relation: &req.relation,
            user_filters: [UserFilterBody {
                user_type,
                relation,
            }],
            contextual_tuples: &req.contextual_tuples,
            context: req.context.as_ref(),
            authorization_model_id: req.authorization_model_id.as_deref(),
            consistency: req.consistency,
        };
        let span = tracing::debug_span!(
            "openfga.list_users",
            contextual = req.contextual_tuples.len()
        );
        let r: ListUsersResponse = self
            .call("list users", Method::POST, path, Some(&body))
            .instrument(span)
            .await?;
        Ok(r.users.iter().filter_map(ListedUser::as_user).collect())
    }

    /// Many checks, in requests of at most 50 (OpenFGA's limit), up to
    /// [`BATCH_CHECKS_IN_FLIGHT`] requests at once. Answers come back in the
    /// order of `checks`; a check the server could not evaluate gets its own
    /// error, the others still answer. `model_id` and `consistency` apply to
    /// every check (OpenFGA has no per-item consistency).
    pub async fn batch_check(
        &self,
        store_id: &str,
        checks: &[CheckRequest],
        model_id: Option<&str>,
        consistency: Consistency,
    ) -> Result<Vec<Result<bool>>> {
        use futures::{StreamExt, TryStreamExt};
        let path = format!("/stores/{}/batch-check", seg(store_id));
        let chunks: Vec<Vec<Result<bool>>> =
            futures::stream::iter(checks.chunks(MAX_CHECKS_PER_BATCH).enumerate())
                .map(|(chunk_no, chunk)| {
                    self.batch_check_chunk(
                        &path,
                        chunk,
                        chunk_no * MAX_CHECKS_PER_BATCH,
                        model_id,
                        consistency,
                    )
                })
                .buffered(BATCH_CHECKS_IN_FLIGHT)
                .try_collect()
                .await?;
        Ok(chunks.into_iter().flatten().collect())
    }

    async fn batch_check_chunk(
        &self,
        path: &str,
        chunk: &[CheckRequest],
        base: usize,
        model_id: Option<&str>,
        consistency: Consistency,
    ) -> Result<Vec<Result<bool>>> {
        let body = BatchCheckBody {
            checks: chunk
                .iter()
                .enumerate()
                .map(|(i, c)| BatchCheckItem {
                    tuple_key: KeyOnly {
                        user: &c.user,
                        relation: &c.relation,
                        object: &c.object,
                    },
                    contextual_tuples: (!c.contextual_tuples.is_empty()).then(|| {
                        ContextualTuples {
                            tuple_keys: &c.contextual_tuples,
                        }
                    }),
                    context: c.context.as_ref(),
                    correlation_id: (base + i).to_string(),
                })
                .collect(),
            authorization_model_id: model_id,
            consistency,
        };
        let span = tracing::debug_span!("openfga.batch_check", checks = chunk.len());
        let mut resp: BatchCheckResponse = self
            .call("batch check", Method::POST, path.to_owned(), Some(&body))
            .instrument(span)
            .await?;
        Ok(chunk
            .iter()
            .enumerate()
            .map(|(i, check)| {
                let id = (base + i).to_string();
                match resp.result.remove(&id) {
                    Some(BatchCheckSingle { error: Some(e), .. }) => {
                        Err(batch_item_error(check, &e))
                    }
                    Some(r) => Ok(r.allowed),
                    None => Err(Error::new(Kind::Decode {
                        operation: "batch check",
                        detail: format!("no result for correlation id {id}"),
                    })),
                }
            })
            .collect())
    }

    /// One page of tuples matching `filter`.
    pub async fn read(
        &self,
        store_id: &str,
        filter: &ReadFilter,
        page_size: Option<u32>,
        continuation_token: Option<&str>,
    ) -> Result<ReadPage> {
        let path = format!("/stores/{}/read", seg(store_id));
        let body = ReadBody {
            tuple_key: filter,
            page_size,
            continuation_token: continuation_token.filter(|t| !t.is_empty()),
            consistency: Consistency::HigherConsistency,
        };
        self.call("read", Method::POST, path, Some(&body)).await
    }

    /// Every tuple matching `filter`, following continuation tokens; each
    /// once, as the last page that had it.
    pub async fn read_all(&self, store_id: &str, filter: &ReadFilter) -> Result<Vec<TupleKey>> {
        let mut out = Vec::new();
        let mut token = String::new();
        let mut seen = std::collections::HashSet::new();
        loop {
            let page = self
                .read(store_id, filter, Some(100), Some(token.as_str()))
                .await?;
            out.extend(page.tuples.into_iter().map(|t| t.key));
            if page.continuation_token.is_empty() {
                return Ok(latest_copies(out));
            }
            // A server or proxy that hands back a token already followed
            // would keep this reading (and growing) for good.
            if !seen.insert(page.continuation_token.clone()) {
                return Err(Error::new(Kind::Decode {
                    operation: "read",
                    detail: "a continuation token came back twice".into(),
                }));
            }
            token = page.continuation_token;
        }
    }

    /// Sends one request and decodes the answer, turning every failure into a
    /// classified [`Error`].
    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        operation: &'static str,
        method: Method,
        path: String,
        body: Option<&B>,
    ) -> Result<T> {
        self.call_within(operation, method, path, body, None).await
    }

    /// [`Client::call`] with a shorter timeout for this request.
    async fn call_within<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        operation: &'static str,
        method: Method,
        path: String,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<T> {
        let asked = std::time::Instant::now();
        let send = |method| self.attempt(operation, method, &path, body, timeout, asked);
        match send(method.clone()).await {
            // A cached OAuth2 token refused before its time (revoked early,
            // the server's clock ahead of the issuer's, a suspended
            // process): one more try with a fresh one. A 401 is answered
            // before the request runs, so sending it again cannot apply it
            // twice.
            Err(Refused {
                token_stale: true, ..
            }) => send(method).await.map_err(|r| r.error),
            answer => answer.map_err(|r| r.error),
        }
    }

    /// One request of [`Client::call_within`], its time limit counted from
    /// `asked`.
    async fn attempt<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        operation: &'static str,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
        asked: std::time::Instant,
    ) -> std::result::Result<T, Refused> {
        let url = format!("{}{}", self.inner.base, path);
        let mut req = self.inner.http.request(method, &url);
        let token = self.inner.auth.bearer(&self.inner.http).await?;
        if let Some(token) = &token {
            req = req.header(AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        // The time limit counts from the call, a token fetch included: a
        // Write given what is left of a writer's lease must not start after
        // it ends (another writer may write the key by then).
        if let Some(t) = timeout {
            let left = t.saturating_sub(asked.elapsed());
            if left.is_zero() {
                return Err(Error::new(Kind::Timeout {
                    operation,
                    timeout: Some(t),
                    sent: false,
                })
                .into());
            }
            req = req.timeout(left);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(operation, e, timeout))?;
        let status = resp.status();
        if let Some(detail) = redirected(status, resp.headers()) {
            return Err(Error::new(Kind::NotOpenFga { operation, detail }).into());
        }
        if status.is_success() {
            let kind = content_type(resp.headers()).to_owned();
            // OpenFGA's answers are JSON, and say so: an unreadable body
            // declared otherwise (or not at all) is not one of them, and
            // nothing was written; one declared JSON may be a cut-off
            // answer of OpenFGA's, whose request may have applied.
            let unreadable = |detail: String| {
                if kind.to_ascii_lowercase().contains("json") {
                    Error::new(Kind::Decode { operation, detail })
                } else {
                    let kind = if kind.is_empty() {
                        "no declared"
                    } else {
                        &kind
                    };
                    Error::new(Kind::NotOpenFga {
                        operation,
                        detail: format!("HTTP {} with a {kind} body", status.as_u16()),
                    })
                }
            };
            let (bytes, ended) = read_up_to(resp, SUCCESS_BODY_MAX).await;
            match ended {
                Ok(true) => {}
                Ok(false) => {
                    return Err(unreadable(format!(
                        "an answer over {} MiB, not read whole",
                        SUCCESS_BODY_MAX >> 20
                    ))
                    .into())
                }
                Err(e) => return Err(self.transport_error(operation, e, timeout).into()),
            }
            return serde_json::from_slice(&bytes)
                .map_err(|e| unreadable(e.to_string()).caused_by(e).into());
        }
        let mut token_stale = false;
        if status == StatusCode::UNAUTHORIZED {
            if let Some(token) = &token {
                token_stale = self.inner.auth.invalidate(token).await;
            }
        }
        let retry_after = parse_retry_after(resp.headers());
        let bytes = error_body(resp).await;
        // A page that echoes the request (a gateway's debug page) would
        // carry the token: never in an error.
        let hide = |text: &str| match &token {
            Some(t) if !t.is_empty() => text.replace(t.expose(), "***"),
            _ => text.to_owned(),
        };
        let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(b) => (b.code, hide(&b.message)),
            // A proxy's HTML page or an empty body: keep a short, printable
            // excerpt (cut after the token is hidden: a token cut in two
            // would not be found).
            Err(_) => (
                String::new(),
                excerpt(&hide(&String::from_utf8_lossy(&bytes))),
            ),
        };
        Err(Refused {
            error: Error::new(Kind::Api(ApiError {
                operation,
                status: status.as_u16(),
                code,
                message,
                retry_after,
            })),
            token_stale,
        })
    }

    fn transport_error(
        &self,
        operation: &'static str,
        e: reqwest::Error,
        timeout: Option<Duration>,
    ) -> Error {
        self.transport_kind(operation, &e, timeout)
            .caused_by(e.without_url())
    }

    fn transport_kind(
        &self,
        operation: &'static str,
        e: &reqwest::Error,
        timeout: Option<Duration>,
    ) -> Error {
        // A connection that failed to open carried no request, nor did one
        // that could not be built (a token that is no header value).
        let sent = !e.is_connect() && !e.is_builder();
        // A connection that did not open in time is a timeout to reqwest
        // too, but the setting to look at is the connect timeout, and the
        // server is out of reach, not slow.
        if e.is_timeout() && e.is_connect() {
            Error::new(Kind::Connect {
                operation,
                url: redact_url(&self.inner.base),
                detail: format!(
                    "no connection within {:?} (openfga.connect_timeout)",
                    self.inner.connect_timeout
                ),
                sent,
            })
        } else if e.is_timeout() {
            Error::new(Kind::Timeout {
                operation,
                timeout: Some(timeout.unwrap_or(self.inner.timeout)),
                sent,
            })
        } else if e.is_decode() || e.is_body() && !e.is_connect() && !e.is_request() {
            Error::new(Kind::Connect {
                operation,
                url: redact_url(&self.inner.base),
                detail: "the response body was cut off".into(),
                sent,
            })
        } else {
            Error::new(Kind::Connect {
                operation,
                url: redact_url(&self.inner.base),
                detail: root_cause(e),
                sent,
            })
        }
    }
}

/// A request's failure, and whether it was a 401 for an OAuth2 token no
/// longer the one to use (worth one more try with a fresh one).
struct Refused {
    error: Error,
    token_stale: bool,
}

impl From<Error> for Refused {
    fn from(error: Error) -> Self {
        Refused {
            error,
            token_stale: false,
        }
    }
}

/// The innermost cause of a reqwest error ("Connection refused (os error
/// 111)"), which says more than reqwest's own "error sending request".
fn root_cause(e: &reqwest::Error) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn batch_item_error(check: &CheckRequest, e: &serde_json::Value) -> Error {
    let message = e
        .get("message")
        .and_then(|m| m.as_str())
        .unwrap_or_default()
        .to_owned();
    let mut code = ["input_error", "internal_error"]
        .iter()
        .find_map(|k| e.get(*k).and_then(|v| v.as_str()))
        .unwrap_or_default()
        .to_owned();
    let mut status = if e.get("internal_error").is_some() {
        500
    } else {
        400
    };
    // OpenFGA reports a throttled item as an input error (`validation_error`
    // with the message "throttled: ..."), where a single Check answers 422
    // `throttled_timeout_error`: the server was busy, the input is fine.
    if message.starts_with("throttled") {
        (status, code) = (422, "throttled_timeout_error".to_owned());
    }
    Error::new(Kind::Api(ApiError {
        operation: "batch check",
        status,
        code,
        message: format!(
            "{}#{}@{}: {message}",
            check.object, check.relation, check.user
        ),
        retry_after: None,
    }))
}

/// Most of a success's body read (OpenFGA's largest answers with its
/// default limits, 1,000 objects or users, or a page of 100 tuples, take
/// well under 1 MiB; a server whose list limits are raised a hundredfold
/// still fits): a proxy's or a broken server's endless answer is not held
/// whole.
const SUCCESS_BODY_MAX: usize = 32 << 20;

/// An error answer's body, up to 64 KiB (OpenFGA's are a line of JSON):
/// a proxy's endless page is not read to the request's timeout.
async fn error_body(resp: reqwest::Response) -> Vec<u8> {
    read_up_to(resp, 64 * 1024).await.0
}

/// An answer's body, up to `max` bytes, and whether it ended before
/// `max` (`Ok(true)`), reached it (`Ok(false)`), or broke off.
async fn read_up_to(
    mut resp: reqwest::Response,
    max: usize,
) -> (Vec<u8>, std::result::Result<bool, reqwest::Error>) {
    let mut body = Vec::new();
    loop {
        // Full: whether more would come is not worth a wait (a stalled
        // page would hold it to the request's timeout).
        if body.len() == max {
            return (body, Ok(false));
        }
        match resp.chunk().await {
            Ok(Some(c)) if c.len() > max - body.len() => {
                body.extend_from_slice(&c[..max - body.len()]);
                return (body, Ok(false));
            }
            Ok(Some(c)) => body.extend_from_slice(&c),
            Ok(None) => return (body, Ok(true)),
            Err(e) => return (body, Err(e)),
        }
    }
}

/// "HTTP 302 redirecting to <where>" for a redirect (OpenFGA sends none;
/// fga-wb follows none), the target's user and password hidden; None for
/// any other answer.
pub(crate) fn redirected(status: StatusCode, headers: &HeaderMap) -> Option<String> {
    if !status.is_redirection() {
        return None;
    }
    let to = match headers
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
    {
        None | Some("") => "a place it does not say".to_owned(),
        Some(to) => redact_url(to),
    };
    Some(format!("HTTP {} redirecting to {to}", status.as_u16()))
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Each tuple once, as the last page that had it: one deleted and written
/// again while the pages were read (a condition replaced) comes on a later
/// page too.
fn latest_copies(mut tuples: Vec<TupleKey>) -> Vec<TupleKey> {
    let mut seen = std::collections::HashSet::new();
    tuples.reverse();
    tuples.retain(|t| seen.insert((t.object.clone(), t.relation.clone(), t.user.clone())));
    tuples.reverse();
    tuples
}

/// `Retry-After` in seconds, or as an HTTP date (the time left until it,
/// by this machine's clock), at most [`MAX_RETRY_AFTER`]. A value that is
/// neither is ignored rather than guessed at.
fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let wait = match v.parse::<u64>() {
        // "Again at once": no pause asked for (one asked for holds every
        // flush() waiter's answer and shutdown's own pauses to it).
        Ok(0) => return None,
        Ok(secs) => Duration::from_secs(secs),
        // More seconds than a u64 holds: the longest wait, as any long one.
        Err(_) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => MAX_RETRY_AFTER,
        // By another machine's clock: never taken for "at once".
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            .max(Duration::from_secs(1)),
    };
    Some(wait.min(MAX_RETRY_AFTER))
}

/// The longest wait a `Retry-After` gets: a server that asks for more is
/// asked again then, and no header value can push a timer past what a
/// clock holds.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// Percent-encodes an id for use as one path segment, so an id can never
/// change which endpoint is called.
fn seg(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret bound for another machine over plain http:// is warned
    /// about, naming the setting to fix; loopback and https are not, nor
    /// is a URL without credentials. A CA file on plain http is unused,
    /// and said so.
    #[test]
    fn secrets_sent_in_clear_are_warned_about() {
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        let token = Credentials::ApiToken(Secret::new("t"));
        let oauth = |token_url: &str| {
            Credentials::ClientCredentials(OAuth2 {
                token_url: token_url.into(),
                client_id: "id".into(),
                client_secret: Secret::new("s"),
                audience: None,
                scopes: None,
            })
        };
        let warned = |api: &str, c: &Credentials, ca: bool| sent_in_clear(&url(api), c, ca);
        for api in [
            "http://10.1.2.3:8080",
            "http://fga.internal",
            "http://[2001:db8::1]:80",
        ] {
            let w = warned(api, &token, false);
            assert!(
                w.len() == 1 && w[0].starts_with("openfga.api_url is plain http://"),
                "{api}: {w:?}"
            );
        }
        for api in [
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
            "https://fga.example.com",
        ] {
            assert!(warned(api, &token, false).is_empty(), "{api}");
        }
        assert!(warned("http://10.1.2.3:8080", &Credentials::None, false).is_empty());
        let w = warned("http://u:pw@10.1.2.3:8080", &Credentials::None, false);
        assert!(w.len() == 1 && w[0].starts_with("openfga.api_url"), "{w:?}");
        assert!(!w[0].contains("pw"), "{w:?}");
        let w = warned(
            "https://fga.example.com",
            &oauth("http://issuer.example.com/oauth/token"),
            false,
        );
        assert!(
            w.len() == 1 && w[0].starts_with("openfga.oauth2.token_url"),
            "{w:?}"
        );
        let w = warned(
            "http://10.1.2.3:8080",
            &oauth("https://issuer.example.com/oauth/token"),
            false,
        );
        assert!(w.len() == 1 && w[0].starts_with("openfga.api_url"), "{w:?}");
        let w = warned("http://127.0.0.1:8080", &Credentials::None, true);
        assert!(w.len() == 1 && w[0].starts_with("openfga.ca_file"), "{w:?}");
        // A sidecar OpenFGA on loopback, its tokens from an issuer behind
        // the private CA: the CA is used.
        let sidecar = oauth("https://issuer.corp/oauth/token");
        assert!(warned("http://127.0.0.1:8080", &sidecar, true).is_empty());
        assert!(warned("https://fga.example.com", &token, true).is_empty());
    }

    /// A Write limited to what is left of a writer's lease is not sent
    /// once a slow token fetch has used that up (wiremock: the token
    /// endpoint answers after 600 ms, the limit is 300 ms): it fails as not
    /// sent, and no Write reaches the server. Before, the limit began after
    /// the fetch, and the Write went out past the lease.
    #[tokio::test]
    async fn a_time_limit_counts_the_token_fetch() {
        use wiremock::matchers::{method, path};
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/oauth/token"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(serde_json::json!({"access_token": "t", "expires_in": 3600}))
                    .set_delay(Duration::from_millis(600)),
            )
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/stores/s/write"))
            .respond_with(ResponseTemplate::new(200).set_body_json(serde_json::json!({})))
            .expect(0)
            .mount(&server)
            .await;
        let client = Client::builder(server.uri())
            .credentials(Credentials::ClientCredentials(OAuth2 {
                token_url: format!("{}/oauth/token", server.uri()),
                client_id: "id".into(),
                client_secret: Secret::new("secret"),
                audience: None,
                scopes: None,
            }))
            .build()
            .unwrap();
        let req = WriteRequest::idempotent(
            vec![crate::TupleKey::new("user:a", "viewer", "document:1").unwrap()],
            vec![],
        );
        let e = client
            .write_within("s", &req, Some(Duration::from_millis(300)))
            .await
            .unwrap_err();
        assert!(e.is_timeout() && !e.may_have_applied(), "{e}");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(seg("01HXYZ"), "01HXYZ");
        assert_eq!(seg("a/../b"), "a%2F..%2Fb");
    }

    /// `{:?}` of the builder, the client and its credentials never shows
    /// a password in a URL or a secret.
    #[test]
    fn debug_never_shows_credentials() {
        let oauth = OAuth2 {
            token_url: "https://auth:pw-issuer@issuer.example/oauth/token".into(),
            client_id: "client".into(),
            client_secret: Secret::new("pw-client"),
            audience: None,
            scopes: None,
        };
        let builder = Client::builder("http://proxy:pw-api@127.0.0.1:8080")
            .credentials(Credentials::ClientCredentials(oauth));
        let shown_builder = format!("{builder:?}");
        // A password in the URL and a token: two Authorization headers,
        // refused as a configuration error (which shows neither).
        let e = builder.build().expect_err("userinfo and a token");
        assert!(e.is_config(), "{e}");
        let client = Client::builder("http://proxy:pw-api@127.0.0.1:8080")
            .build()
            .expect("a client");
        for shown in [shown_builder, e.to_string(), format!("{client:?}")] {
            for secret in ["pw-api", "pw-issuer", "pw-client"] {
                assert!(!shown.contains(secret), "{secret} in {shown}");
            }
            assert!(shown.contains("127.0.0.1:8080"), "{shown}");
        }
    }

    /// A transport failure keeps reqwest's error as its source, without
    /// the URL (which may carry credentials) anywhere in the chain.
    #[tokio::test]
    async fn a_connection_error_has_a_source_chain_without_secrets() {
        let client = Client::builder("http://u:s3cret@127.0.0.1:9")
            .timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        let e = client.create_store("x").await.unwrap_err();
        assert!(e.is_transient(), "{e}");
        let mut chain = vec![e.to_string()];
        let mut cause = std::error::Error::source(&e);
        assert!(cause.is_some(), "no source: {e}");
        while let Some(c) = cause {
            chain.push(c.to_string());
            cause = c.source();
        }
        assert!(chain.len() >= 2, "{chain:?}");
        assert!(!chain.iter().any(|m| m.contains("s3cret")), "{chain:?}");
    }

    #[test]
    fn urls_lose_their_credentials_in_messages() {
        for (url, shown) in [
            ("http://u:secret@h:1/x", "http://***@h:1/x"),
            ("http://h:1/x", "http://h:1/x"),
            // Passwords that stop a URL parser, or fool it.
            ("redis://default:ab/se#cr?et@h:6379", "redis://***@h:6379"),
            ("redis://u:12/34@h:6379/0", "redis://***@h:6379/0"),
            // Cluster seeds, each with its password.
            (
                "redis://:pw1@a:1,redis://:pw2@b:2",
                "redis://***@a:1,redis://***@b:2",
            ),
            (
                "redis+cluster://u:p/w@a:1,b:2",
                "redis+cluster://***@a:1,b:2",
            ),
            (
                "redis+unix:///tmp/r.sock?db=1&pass=secret",
                "redis+unix:///tmp/r.sock?db=1",
            ),
            ("unix:///tmp/r.sock?password=secret", "unix:///tmp/r.sock"),
            ("not a url", "not a url"),
            // No scheme: still a password before the `@`.
            ("default:s3cret@redis:6379", "***@redis:6379"),
            ("u:p@fga:8080,redis://h:1", "***@fga:8080,redis://h:1"),
            ("u:p://x@h:1", "***@h:1"),
            // Scheme-relative: a user and password all the same.
            ("//u:secret@h:1/x", "***@h:1/x"),
            // A unix socket's password with an `@`, a `&` or a `#` in it.
            (
                "redis+unix:///run/r.sock?pass=abc@defghij",
                "redis+unix:///run/r.sock",
            ),
            (
                "redis+unix:///r.sock?db=2&pass=a&b#c",
                "redis+unix:///r.sock?db=2",
            ),
            ("redis://h:1/0?PASSWORD=x", "redis://h:1/0"),
            ("redis://u:p@h:1/0?db=1", "redis://***@h:1/0?db=1"),
            ("redis://h:1/0?password=a@b", "redis://***"),
            (
                "redis+unix:///r.sock?db=1&pa%73s=secret",
                "redis+unix:///r.sock?db=1",
            ),
            // A `://` or an `@` inside a password: hidden to the last `@`.
            ("redis://u:ab://cd@h:6379", "redis://***@h:6379"),
            (
                "redis://u:a@b://c@h:1,redis://:x://y@k:2",
                "redis://***@h:1,redis://***@k:2",
            ),
            (
                "redis://h:1, rediss://:p://w@k:2/0",
                "redis://h:1, rediss://***@k:2/0",
            ),
            // A slash too many: a password still, not a socket's path.
            ("redis:///:pw@h:6379", "redis://***@h:6379"),
            ("rediss:///user:pw@h", "rediss://***@h"),
            ("redis+cluster:///:pw@a:1", "redis+cluster://***@a:1"),
            ("/run/r.sock?db=1&pass=x@y", "/run/r.sock?db=1"),
            // Keys in other query parameters: a token URL's, say.
            (
                "https://fn.example/api/token?code=FUNCKEY",
                "https://fn.example/api/token",
            ),
            (
                "https://login.example/t/oauth2/token?api-version=1.0&client_secret=x",
                "https://login.example/t/oauth2/token?api-version=1.0",
            ),
            (
                "redis://h:1/0?db=2&protocol=resp3",
                "redis://h:1/0?db=2&protocol=resp3",
            ),
            // A comma inside a password does not start a URL of its own.
            ("redis://u:p,w://x@h:1", "redis://***@h:1"),
            ("redis://u:p,1://x@h:1", "redis://***@h:1"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }

    /// A BatchCheck item OpenFGA throttled comes as an input error (its
    /// `validation_error`, message "throttled: ..."); it is the server's
    /// load, as a single Check's 422 says, not the input.
    #[test]
    fn a_throttled_batch_item_is_transient() {
        let check = CheckRequest::new("user:a", "viewer", "document:1");
        let e = batch_item_error(
            &check,
            &serde_json::json!({
                "input_error": "validation_error",
                "message": "throttled: context deadline exceeded"
            }),
        );
        assert!(e.is_transient() && !e.is_invalid_input(), "{e}");
        let e = batch_item_error(
            &check,
            &serde_json::json!({
                "input_error": "validation_error",
                "message": "invalid relation"
            }),
        );
        assert!(e.is_invalid_input() && !e.is_transient(), "{e}");
    }

    #[test]
    fn retry_after_is_capped() {
        let at = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, v.parse().expect("header value"));
            parse_retry_after(&h)
        };
        assert_eq!(at("3"), Some(Duration::from_secs(3)));
        assert_eq!(at("0"), None);
        assert_eq!(at("18446744073709551615"), Some(MAX_RETRY_AFTER));
        assert_eq!(at("99999999999999999999999"), Some(MAX_RETRY_AFTER));
        // An HTTP date: the time left until it (a second, once past: the
        // clocks of two machines).
        assert_eq!(
            at("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::from_secs(1))
        );
        let soon = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        let left = at(&soon).expect("a date is read");
        assert!(
            left > Duration::from_secs(100) && left <= Duration::from_secs(120),
            "{left:?}"
        );
        let far =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(86_400));
        assert_eq!(at(&far), Some(MAX_RETRY_AFTER));
        assert_eq!(at("soon"), None);
        assert_eq!(at(""), None);
        assert_eq!(at("  "), None);
    }
}
