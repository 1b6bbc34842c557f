//! The one error type of the crate.
//!
//! Callers (and the flusher) decide what to do with an error through its
//! classifiers, not by matching on variants: [`Error::is_transient`] means
//! "try again later", [`Error::is_invalid_input`] means "this tuple will never
//! be accepted", [`Error::is_auth`] means "fix the credentials; nothing will
//! work until then". New kinds can be added without breaking callers.
//!
//! No message ever contains an API token, a client secret or a Redis password:
//! the HTTP layer never puts headers or request bodies into errors, and URLs
//! are stripped of their user-info before they are shown.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::tuple::TupleError;

/// A specialised `Result` for fga-wb.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in fga-wb, with classifiers that say what to do
/// about it.
#[derive(Clone)]
pub struct Error {
    kind: Box<Kind>,
    /// The lower-level error behind this one (reqwest, redis, serde_json, a
    /// tuple's validation), for `std::error::Error::source` chains. Its text
    /// never holds a secret: URLs are stripped before it is attached.
    source: Option<Arc<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The private kinds behind [`Error`]. `pub(crate)` so modules can build them.
#[derive(Debug, Clone)]
pub(crate) enum Kind {
    /// A tuple was refused before anything was buffered.
    InvalidTuple(TupleError),
    /// A setting is missing or malformed.
    Config(String),
    /// OpenFGA answered with a non-success status.
    Api(ApiError),
    /// The request did not complete within the configured timeout.
    Timeout {
        operation: &'static str,
        timeout: Option<Duration>,
        /// The request may have reached the server (not a connect timeout).
        sent: bool,
    },
    /// No connection could be made, or it broke mid-request.
    Connect {
        operation: &'static str,
        url: String,
        detail: String,
        /// The request may have reached the server (the connection broke
        /// after it was made).
        sent: bool,
    },
    /// OpenFGA answered 2xx but with a body we could not understand.
    Decode {
        operation: &'static str,
        detail: String,
    },
    /// Something other than OpenFGA answered at its address: a redirect
    /// (a login page, http to https), or a success that is not OpenFGA's
    /// JSON (a captive portal, a default backend). Nothing was written.
    NotOpenFga {
        operation: &'static str,
        detail: String,
    },
    /// Fetching an OAuth2 access token failed.
    Token { detail: String, transient: bool },
    /// The buffer is at capacity and the overflow policy refused the op.
    BufferFull {
        capacity: usize,
        waited: Option<Duration>,
        /// Why flushing is stopped, when it is: this process makes no
        /// room until it looks again.
        stopped: Option<String>,
    },
    /// A replay of dead letters filled the buffer: `kept` letters stay.
    ReplayFilledBuffer {
        capacity: usize,
        replayed: usize,
        superseded: usize,
        kept: usize,
    },
    /// A check could depend on a revoke that did not reach OpenFGA in time; it
    /// fails closed rather than risk a stale allow.
    CheckWouldBeStale { waited: Duration },
    /// OpenFGA refuses a pending grant (as a contextual tuple) that could
    /// take this check's access away: the check fails closed until the grant
    /// is dead-lettered (flushed) or revoked.
    PendingGrantRefused {
        tuple: String,
        reason: String,
        /// It replaced a revoke not yet written, which is written once the
        /// grant is dead-lettered.
        owes: bool,
    },
    /// An op the check could depend on was dead-lettered after transient
    /// failures (queue mode) and is still current: OpenFGA may hold what a
    /// revoke revokes, or lack a grant that takes access away (under a
    /// `but not`, or with a condition), so the check fails closed until the
    /// letter is replayed or purged.
    DeadLetterInDoubt { count: usize },
    /// A read of a whole type found more than `letters` ops of the type
    /// that died after transient failures: it cannot tell which relations
    /// they leave in doubt.
    ReadInDoubt { object_type: String, letters: usize },
    /// The handle was shut down.
    Shutdown,
    /// Redis failed, or holds something fga-wb did not write.
    Redis { detail: String, transient: bool },
    /// Redis lost acknowledged ops (a restart without its data, a failover
    /// to a replica that had not received them); checks fail closed until
    /// an operator acknowledges the loss.
    BufferLost { detail: String },
    /// A connection to Redis dropped and came back: checks fail closed until
    /// every process has had time to compare what it acknowledged with what
    /// Redis holds (a failover may have lost another process's ops).
    Reconnecting { left: Duration },
    /// A push reached the primary but fewer replicas than
    /// `redis.wait_replicas` confirmed it in time (`fewer_replicas = "fail"`).
    UnderReplicated {
        wanted: u32,
        got: u32,
        timeout: Duration,
    },
    /// Another writer holds the tuples; try again shortly.
    Busy(String),
    /// Too many pending grants are relevant to a check or list to send them
    /// all as contextual tuples (or to a read to merge); the caller should
    /// flush first.
    TooManyContextualTuples { count: usize, limit: usize },
    /// The caller passed something that is not a tuple but is still wrong.
    InvalidArgument(String),
    /// fga-wb broke one of its own invariants: a bug, not the caller's input.
    Internal(String),
    /// The handle's flusher stopped on a panic (a bug): nothing more is
    /// written through this handle.
    FlusherStopped,
}

/// The parts of an error response from OpenFGA.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub operation: &'static str,
    pub status: u16,
    pub code: String,
    pub message: String,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// OpenFGA's throttling answer (422 `throttled_timeout_error`): retry later.
    fn is_throttled(&self) -> bool {
        self.code == "throttled_timeout_error"
    }

    /// OpenFGA's 400 `cancelled`: the request's context ended on the server
    /// (its caller gone, or the server shutting down), whatever its tuples;
    /// it may have committed first, as with `deadline_exceeded`.
    fn is_cancelled(&self) -> bool {
        self.code == "cancelled"
    }

    /// A request larger than the server takes: OpenFGA's gRPC limit
    /// (`--grpc-max-recv-msg-bytes`, 616,448 bytes by default; 500
    /// `resource_exhausted`, a message that says "larger than max"), or a
    /// proxy's 413. The datastore's throttling shares the code, not the
    /// message.
    fn is_too_large(&self) -> bool {
        self.status == 413
            || (self.code == "resource_exhausted" && self.message.contains("larger than max"))
    }

    /// 409 `Aborted` for a tuple that exists with a different condition: no
    /// retry will ever succeed, so it is an input error, not a conflict.
    fn is_condition_conflict(&self) -> bool {
        self.status == 409 && self.message.contains("different condition")
    }

    /// OpenFGA's 400 for a model it has stored but cannot use ("invalid
    /// authorization model encountered: invalid schema version", a model
    /// an older server accepted and this one's validation refuses): about
    /// every request under that model, delete-only ones too, so bisecting
    /// would dead-letter every op, revokes included.
    fn names_an_unusable_model(&self) -> bool {
        self.code == "validation_error"
            && self
                .message
                .trim_start()
                .starts_with("invalid authorization model encountered")
    }

    /// OpenFGA's 400 for a store or model id that cannot be one
    /// ("invalid WriteRequest.AuthorizationModelId: value does not match
    /// regex pattern ..."): about the request, whatever its tuples, so
    /// bisecting a batch over it would dead-letter every op.
    fn names_a_malformed_id(&self) -> bool {
        // Each part is "invalid <Request>.<Field>: ...": anchored there, as
        // a refused tuple's message quotes the tuple, ids and all.
        const FIELDS: [&str; 3] = [
            ".StoreId:",
            ".AuthorizationModelId:",
            "AuthorizationModelRequest.Id:",
        ];
        self.code == "validation_error"
            && self.message.split("; ").any(|part| {
                part.strip_prefix("invalid ")
                    .and_then(|r| r.split_once(' '))
                    .is_some_and(|(field, _)| FIELDS.iter().any(|f| field.ends_with(f)))
            })
    }
}

/// OpenFGA codes that come with a 400 but describe the store or model rather
/// than the tuple; bisecting a batch over them would dead-letter every op.
const NOT_FOUND_CODES: &[&str] = &[
    "store_id_not_found",
    "authorization_model_not_found",
    "latest_authorization_model_not_found",
    "undefined",
];

impl Error {
    pub(crate) fn new(kind: Kind) -> Self {
        Error {
            kind: Box::new(kind),
            source: None,
        }
    }

    pub(crate) fn config(msg: impl Into<String>) -> Self {
        Error::new(Kind::Config(msg.into()))
    }

    pub(crate) fn invalid_argument(msg: impl Into<String>) -> Self {
        Error::new(Kind::InvalidArgument(msg.into()))
    }

    pub(crate) fn internal(msg: impl Into<String>) -> Self {
        Error::new(Kind::Internal(msg.into()))
    }

    /// Keeps `cause` as this error's [`std::error::Error::source`].
    pub(crate) fn caused_by(
        mut self,
        cause: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        self.source = Some(Arc::new(cause));
        self
    }

    /// Worth retrying later: 5xx, 408, 409 (a conflicting concurrent write),
    /// 429, a 400 without OpenFGA's error code (not OpenFGA's answer: a
    /// proxy's or a gateway's), timeouts, connection errors.
    pub fn is_transient(&self) -> bool {
        match &*self.kind {
            Kind::Api(e) => {
                (e.status >= 500
                    || matches!(e.status, 408 | 409 | 429)
                    || (matches!(e.status, 400 | 422) && e.code.is_empty())
                    || e.is_throttled()
                    || e.is_cancelled())
                    && !e.is_condition_conflict()
                    && !e.is_too_large()
            }
            Kind::Timeout { .. }
            | Kind::Connect { .. }
            | Kind::Busy(_)
            | Kind::UnderReplicated { .. }
            | Kind::Reconnecting { .. } => true,
            Kind::Token { transient, .. } | Kind::Redis { transient, .. } => *transient,
            _ => false,
        }
    }

    /// The input will never be accepted as it is: a tuple that fails local
    /// validation, OpenFGA's 400 for the tuples of a request (unknown type or
    /// relation, user type not allowed, too many tuples, duplicates), or a
    /// request too large for the server (a 413, or over OpenFGA's gRPC size
    /// limit: a 500 `resource_exhausted` saying "larger than max"): the
    /// flusher splits such a request until the tuples pass or one stands
    /// alone. A 400
    /// without OpenFGA's error code (a proxy's page, a gateway's own
    /// answer) says nothing about the tuples: it is not one, and what it
    /// refused is kept and tried again rather than dead-lettered.
    pub fn is_invalid_input(&self) -> bool {
        match &*self.kind {
            Kind::InvalidTuple(_) | Kind::InvalidArgument(_) => true,
            Kind::Api(e) => {
                (matches!(e.status, 400 | 422)
                    && !e.code.is_empty()
                    && !e.is_throttled()
                    && !e.is_cancelled()
                    && !NOT_FOUND_CODES.contains(&e.code.as_str())
                    && !e.names_a_malformed_id()
                    && !e.names_an_unusable_model())
                    || e.is_condition_conflict()
                    || e.is_too_large()
            }
            _ => false,
        }
    }

    /// OpenFGA refused the credentials (401 or 403), or the token endpoint did.
    pub fn is_auth(&self) -> bool {
        match &*self.kind {
            Kind::Api(e) => matches!(e.status, 401 | 403),
            Kind::Token { transient, .. } => !*transient,
            _ => false,
        }
    }

    /// The store or the authorization model does not exist, or its id
    /// cannot be one (`openfga.store_id`, `openfga.model_id`: OpenFGA's ids
    /// are 26 digits and capital letters), or OpenFGA cannot use the model
    /// it has stored (one an older server accepted).
    pub fn is_not_found(&self) -> bool {
        match &*self.kind {
            Kind::Api(e) => {
                e.status == 404
                    || NOT_FOUND_CODES.contains(&e.code.as_str())
                    || e.names_a_malformed_id()
                    || e.names_an_unusable_model()
            }
            _ => false,
        }
    }

    /// Something other than OpenFGA answered at `openfga.api_url`: a
    /// redirect, or a success that is not OpenFGA's JSON. Flushing stops
    /// until the address is fixed; nothing was written.
    pub fn is_misdirected(&self) -> bool {
        matches!(&*self.kind, Kind::NotOpenFga { .. })
    }

    /// What only an operator can fix: the credentials, the store or model,
    /// or the address. Flushing stops on it rather than retrying, and the
    /// CLI exits 2 (configuration).
    pub fn stops_flushing(&self) -> bool {
        self.is_auth() || self.is_not_found() || self.is_misdirected()
    }

    /// The request failed, yet the server may have run it, or may still
    /// commit it: it timed out or its connection broke after it was sent, a
    /// gateway answered 502 or 504 (its upstream may still be running it),
    /// OpenFGA's own deadline passed (500 `deadline_exceeded`), a 5xx came
    /// without OpenFGA's error body, or a success came back
    /// unreadable though declared JSON (one that is not declared so is
    /// not OpenFGA's: [`is_misdirected`](Self::is_misdirected)). A Write
    /// that ends so may land after a newer one.
    pub fn may_have_applied(&self) -> bool {
        match &*self.kind {
            Kind::Timeout { sent, .. } | Kind::Connect { sent, .. } => *sent,
            Kind::Api(e) => {
                matches!(e.status, 502 | 504)
                    || (e.status >= 500 && e.code.is_empty())
                    // OpenFGA's own request timeout: the datastore may
                    // still commit what it was running.
                    || e.code == "deadline_exceeded"
                    || e.is_cancelled()
            }
            Kind::Decode { .. } => true,
            _ => false,
        }
    }

    /// A transient failure that may lie with the request's tuples rather
    /// than with the server: OpenFGA's own 500 (its datastore refused a
    /// row, as a column narrower than the API's limits does), or a 400/422
    /// without OpenFGA's code (a proxy's rule). The same tuples may meet it
    /// every time, so the flusher splits such a request while other writes
    /// land. Never an unknown outcome: those are waited out, not split.
    /// Nor OpenFGA's 500 `unavailable` (its gRPC server stopping or out of
    /// reach): the server, whatever the tuples.
    pub(crate) fn may_lie_with_tuples(&self) -> bool {
        match &*self.kind {
            Kind::Api(e) => {
                self.is_transient()
                    && !self.may_have_applied()
                    && !e.is_throttled()
                    && !e.code.contains("resource_exhausted")
                    && e.code != "unavailable"
                    && matches!(e.status, 500 | 400 | 422)
            }
            _ => false,
        }
    }

    /// The request reached OpenFGA, or the way to it (a proxy, a
    /// gateway): not a failure before anything was sent (this process's
    /// lease ending, the token endpoint, a timeout or a connection that
    /// failed before the request went out). Only those say how busy the
    /// server is.
    pub fn reached_server(&self) -> bool {
        match &*self.kind {
            Kind::Api(_) => true,
            Kind::Timeout { sent, .. } | Kind::Connect { sent, .. } => *sent,
            _ => false,
        }
    }

    /// The request timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(&*self.kind, Kind::Timeout { .. })
    }

    /// No connection could be made to OpenFGA.
    pub fn is_connect(&self) -> bool {
        matches!(&*self.kind, Kind::Connect { .. })
    }

    /// A setting is missing or malformed.
    pub fn is_config(&self) -> bool {
        matches!(&*self.kind, Kind::Config(_))
    }

    /// The buffer was full and the overflow policy refused the op, or a
    /// replay of dead letters stopped part way (the letters it did not
    /// replay stay).
    pub fn is_buffer_full(&self) -> bool {
        matches!(
            &*self.kind,
            Kind::BufferFull { .. } | Kind::ReplayFilledBuffer { .. }
        )
    }

    /// Redis failed or holds data fga-wb cannot read.
    pub fn is_redis(&self) -> bool {
        matches!(&*self.kind, Kind::Redis { .. })
    }

    /// A check failed closed because a revoke it could depend on was not yet in
    /// OpenFGA (pending, or dead-lettered after transient failures), or a
    /// pending grant that could take its access away is one OpenFGA refuses.
    /// Treat it as "not allowed" or retry.
    pub fn is_stale_check(&self) -> bool {
        matches!(
            &*self.kind,
            Kind::CheckWouldBeStale { .. }
                | Kind::PendingGrantRefused { .. }
                | Kind::DeadLetterInDoubt { .. }
                | Kind::ReadInDoubt { .. }
        )
    }

    /// The Redis buffer lost acknowledged ops: checks fail closed until an
    /// operator runs `fga-wb loss --ack` (see `fga-wb status`).
    pub fn is_buffer_lost(&self) -> bool {
        matches!(&*self.kind, Kind::BufferLost { .. })
    }

    /// Not started because this process's hold on the ops is ending or
    /// ended (its Redis lease): nothing was sent, so no attempt was used.
    pub(crate) fn is_busy(&self) -> bool {
        matches!(&*self.kind, Kind::Busy(_))
    }

    /// The request never left this process: refused before it was sent
    /// (`is_busy`), no token could be had, or no connection was made.
    pub(crate) fn never_sent(&self) -> bool {
        matches!(
            &*self.kind,
            Kind::Busy(_)
                | Kind::Token { .. }
                | Kind::Connect { sent: false, .. }
                | Kind::Timeout { sent: false, .. }
        )
    }

    /// The handle has been shut down.
    pub fn is_shutdown(&self) -> bool {
        matches!(&*self.kind, Kind::Shutdown)
    }

    /// The handle's flusher stopped on a panic: restart the process.
    pub fn is_flusher_stopped(&self) -> bool {
        matches!(&*self.kind, Kind::FlusherStopped)
    }

    /// The HTTP status OpenFGA answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match &*self.kind {
            Kind::Api(e) => Some(e.status),
            _ => None,
        }
    }

    /// OpenFGA's error `code` (for example `validation_error`), if it sent one.
    pub fn code(&self) -> Option<&str> {
        match &*self.kind {
            Kind::Api(e) if !e.code.is_empty() => Some(&e.code),
            _ => None,
        }
    }

    /// OpenFGA refused to write a tuple because it exists with another
    /// condition or condition context (409 `Aborted`).
    pub fn is_condition_conflict(&self) -> bool {
        matches!(&*self.kind, Kind::Api(e) if e.is_condition_conflict())
    }

    /// OpenFGA's error `message`, if it sent one.
    pub fn server_message(&self) -> Option<&str> {
        match &*self.kind {
            Kind::Api(e) if !e.message.is_empty() => Some(&e.message),
            _ => None,
        }
    }

    /// How long OpenFGA asked us to wait (`Retry-After` on a 429 or 503).
    pub fn retry_after(&self) -> Option<Duration> {
        match &*self.kind {
            Kind::Api(e) => e.retry_after,
            _ => None,
        }
    }
}

/// What to do about ops that died after transient write failures and leave
/// a read in doubt.
const REPLAY_THEM: &str = "in queue mode workers replay them once OpenFGA answers again (queue.replay_transient); else run `fga-wb dlq replay` (or `fga-wb dlq purge` to give them up)";

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &*self.kind {
            Kind::InvalidTuple(e) => write!(f, "invalid tuple: {e}"),
            Kind::Config(msg) => write!(f, "configuration error: {msg}"),
            Kind::Api(e) => {
                write!(f, "OpenFGA {} failed with HTTP {}", e.operation, e.status)?;
                if !e.code.is_empty() {
                    write!(f, " ({})", e.code)?;
                }
                if !e.message.is_empty() {
                    write!(f, ": {}", e.message)?;
                }
                if e.is_too_large() {
                    return write!(
                        f,
                        "; the request is larger than the server (or a proxy in front of it) accepts: \
                         its tuples are written in smaller requests, and a tuple too large alone is \
                         dead-lettered (raise OpenFGA's --grpc-max-recv-msg-bytes, then replay it)"
                    );
                }
                match e.status {
                    401 | 403 => write!(
                        f,
                        "; check the API token or OAuth2 client credentials (FGA_API_TOKEN)"
                    ),
                    404 => write!(f, "; check the store id and model id (FGA_STORE_ID, FGA_MODEL_ID)"),
                    429 => match e.retry_after {
                        Some(d) => write!(f, "; rate limited, retry after {}s", d.as_secs()),
                        None => write!(f, "; rate limited, retry later"),
                    },
                    s if s >= 500 => write!(f, "; the server failed, the request will be retried"),
                    _ => Ok(()),
                }
            }
            Kind::Timeout {
                operation, timeout, ..
            } => match timeout {
                Some(t) => write!(
                    f,
                    "OpenFGA {operation} timed out after {t:?}; raise openfga.request_timeout or check the server's load"
                ),
                None => write!(f, "OpenFGA {operation} timed out; check the server's load"),
            },
            Kind::Connect {
                operation,
                url,
                detail,
                ..
            } => write!(
                f,
                "OpenFGA {operation}: cannot reach {url} ({detail}); check openfga.api_url (FGA_API_URL) and that the server is up"
            ),
            Kind::Decode { operation, detail } => write!(
                f,
                "OpenFGA {operation}: unexpected response ({detail}); is openfga.api_url an OpenFGA >= 1.10 server?"
            ),
            Kind::NotOpenFga { operation, detail } => write!(
                f,
                "OpenFGA {operation}: {detail}, not OpenFGA's answer; set openfga.api_url (FGA_API_URL) to the address OpenFGA itself answers on (redirects are not followed: they drop a request's body or send it and its credentials elsewhere)"
            ),
            Kind::Token { detail, .. } => write!(
                f,
                "OAuth2 token request failed: {detail}; check openfga.oauth2.token_url, client_id and client_secret"
            ),
            Kind::BufferFull {
                capacity,
                waited,
                stopped,
            } => {
                write!(f, "write-behind buffer is full ({capacity} ops pending)")?;
                if let Some(w) = waited {
                    write!(f, " after waiting {w:?}")?;
                }
                match stopped {
                    Some(why) => write!(
                        f,
                        "; the op was not accepted: this process writes nothing while flushing is stopped ({why}); fix that, and flushing resumes at its next try (every flush.retry_max_backoff, at least 1 s) or at once on flush()"
                    ),
                    None => write!(
                        f,
                        "; the op was not accepted: retry later, flush, or raise buffer.capacity"
                    ),
                }
            }
            Kind::ReplayFilledBuffer {
                capacity,
                replayed,
                superseded,
                kept,
            } => write!(
                f,
                "replayed {replayed} dead letters (and dropped {superseded} superseded by a newer op on their tuple) until the write-behind buffer was full ({capacity} ops pending): {kept} stay dead letters, nothing is lost; flush, or raise buffer.capacity, and replay again"
            ),
            Kind::CheckWouldBeStale { waited } => write!(
                f,
                "check denied (fail closed): a pending revoke (or grant with a condition) it could depend on was not applied to OpenFGA within {waited:?}; retry, or look at `fga-wb status`"
            ),
            Kind::PendingGrantRefused {
                tuple,
                reason,
                owes: true,
            } => write!(
                f,
                "denied (fail closed): the pending grant {tuple} will be refused ({reason}), and it replaced a revoke of that tuple not yet written: OpenFGA still holds what that revoke deletes; once the grant is dead-lettered when flushed (`fga-wb flush`), the revoke is written"
            ),
            Kind::PendingGrantRefused { tuple, reason, .. } => write!(
                f,
                "denied (fail closed): OpenFGA refuses the pending grant {tuple} ({reason}), which could take this access away; it will be dead-lettered when flushed (`fga-wb flush`), or revoke it"
            ),
            Kind::DeadLetterInDoubt { count } => write!(
                f,
                "check denied (fail closed): {count} revoke(s), or grant(s) that can take its access away, it could depend on died after transient write failures and are in the dead letters, so OpenFGA may still hold what they revoke or lack what they grant; {REPLAY_THEM}"
            ),
            Kind::ReadInDoubt { object_type, letters } => write!(
                f,
                "read denied (fail closed): more than {letters} ops on {object_type} objects died after transient write failures and are in the dead letters, too many to tell which relations they leave in doubt; {REPLAY_THEM}"
            ),
            Kind::Shutdown => write!(f, "the write-behind handle has been shut down"),
            Kind::Redis { detail, transient } => {
                write!(f, "Redis: {detail}")?;
                if *transient {
                    write!(f, "; check redis.url and that Redis is up (a grant or revoke that failed so was not acknowledged, but if its request reached Redis before the connection dropped or timed out it may be buffered: calling it again is safe)")?;
                }
                Ok(())
            }
            Kind::BufferLost { detail } => write!(
                f,
                "denied (fail closed): Redis lost acknowledged grants or revokes: {detail}. \
                 Checks fail until an operator re-applies what the application granted and revoked recently \
                 and runs `fga-wb loss --ack`"
            ),
            Kind::Reconnecting { left } => write!(
                f,
                "check denied (fail closed): the connection to Redis dropped and came back; checks resume in {:.1}s, \
                 once every process has confirmed that Redis kept what it acknowledged; retry then",
                left.as_secs_f64()
            ),
            Kind::UnderReplicated {
                wanted,
                got,
                timeout,
            } => write!(
                f,
                "Redis stored the op on its primary, but only {got} of {wanted} replicas confirmed it within {timeout:?} \
                 (redis.wait_replicas); it is buffered and will be applied, but a failover now could lose it: calling again is safe"
            ),
            Kind::Busy(what) => write!(f, "{what}; retrying shortly"),
            Kind::TooManyContextualTuples { count, limit } => write!(
                f,
                "at least {count} pending grants are relevant to this request, more than the {limit} it can carry; flush first (in queue mode, wait for the workers: `fga-wb flush --wait`)"
            ),
            Kind::InvalidArgument(msg) => write!(f, "invalid argument: {msg}"),
            Kind::FlusherStopped => write!(
                f,
                "the flusher stopped on a panic (a bug in fga-wb: please report it; its message is in the log): this process writes nothing more and takes no more ops; what is pending stays in its store (in a shared store other processes write it, and what this one had taken once it exits; the memory store's is lost when the process ends): restart the process"
            ),
            Kind::Internal(msg) => write!(
                f,
                "internal error in fga-wb: {msg}; nothing was acknowledged by this call (please report it)"
            ),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Debug shows the same text as Display so that `{:?}` in a caller's log
        // line or a test failure is readable and equally free of secrets.
        write!(f, "fga_wb::Error({self})")
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if let Kind::InvalidTuple(t) = &*self.kind {
            return Some(t);
        }
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl From<TupleError> for Error {
    fn from(e: TupleError) -> Self {
        Error::new(Kind::InvalidTuple(e))
    }
}

impl From<Kind> for Error {
    fn from(kind: Kind) -> Self {
        Error::new(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, code: &str) -> Error {
        Error::new(Kind::Api(ApiError {
            operation: "write",
            status,
            code: code.into(),
            message: "m".into(),
            retry_after: None,
        }))
    }

    /// Only a request that went out tells how busy OpenFGA is (the
    /// concurrency limit halves on push-back): not this process's lease
    /// ending, the token endpoint failing, or a timeout before sending.
    #[test]
    fn only_requests_sent_tell_how_busy_the_server_is() {
        let timeout = |sent| {
            Error::new(Kind::Timeout {
                operation: "write",
                timeout: None,
                sent,
            })
        };
        assert!(api(503, "").reached_server());
        assert!(timeout(true).reached_server());
        assert!(!timeout(false).reached_server());
        assert!(!Error::new(Kind::Busy("the lease ends".into())).reached_server());
        let token = Kind::Token {
            detail: "503".into(),
            transient: true,
        };
        assert!(!Error::new(token).reached_server());
    }

    /// OpenFGA's answer to a Write over its gRPC limit, as a real server
    /// sends it.
    fn too_large() -> Error {
        Error::new(Kind::Api(ApiError {
            operation: "write",
            status: 500,
            code: "resource_exhausted".into(),
            message: "grpc: received message larger than max (902542 vs. 616448)".into(),
            retry_after: None,
        }))
    }

    #[test]
    fn classifies_statuses() {
        assert!(too_large().is_invalid_input() && !too_large().is_transient());
        assert!(api(413, "").is_invalid_input() && !api(413, "").is_transient());
        // The datastore's throttling shares the code: retried.
        assert!(api(500, "resource_exhausted").is_transient());
        assert!(!api(500, "resource_exhausted").is_invalid_input());
        assert!(api(503, "").is_transient());
        assert!(api(429, "").is_transient());
        assert!(api(409, "Aborted").is_transient());
        assert!(api(422, "throttled_timeout_error").is_transient());
        assert!(!api(422, "throttled_timeout_error").is_invalid_input());
        assert!(api(400, "validation_error").is_invalid_input());
        assert!(!api(400, "validation_error").is_transient());
        // The server's context ended (its shutdown): about the request, not
        // its tuples, so never split into dead letters.
        let cancelled = api(400, "cancelled");
        assert!(cancelled.is_transient() && !cancelled.is_invalid_input());
        assert!(api(401, "unauthenticated").is_auth());
        assert!(api(403, "forbidden").is_auth());
        assert!(api(404, "store_id_not_found").is_not_found());
        assert!(api(400, "latest_authorization_model_not_found").is_not_found());
        assert!(!api(400, "latest_authorization_model_not_found").is_invalid_input());
    }

    /// OpenFGA's 400 for a malformed store or model id is about the
    /// request (not found), matched where its validator names the field:
    /// a refused tuple whose ids hold the same text stays invalid input.
    #[test]
    fn a_malformed_id_is_told_from_a_tuple_that_quotes_one() {
        let with = |message: &str| {
            Error::new(Kind::Api(ApiError {
                operation: "write",
                status: 400,
                code: "validation_error".into(),
                message: message.into(),
                retry_after: None,
            }))
        };
        let id = with("invalid WriteRequest.StoreId: value does not match regex pattern \"^[ABCDEFGHJKMNPQRSTVWXYZ0-9]{26}$\"; invalid WriteRequest.AuthorizationModelId: value does not match regex pattern \"^[ABCDEFGHJKMNPQRSTVWXYZ0-9]{26}$\"");
        assert!(id.is_not_found() && !id.is_invalid_input());
        let model =
            with("invalid ReadAuthorizationModelRequest.Id: value does not match regex pattern");
        assert!(model.is_not_found());
        let tuple = with("Invalid tuple 'document:a.StoreId: b#viewer@user:x'. Reason: invalid WriteRequest.StoreId: c");
        assert!(tuple.is_invalid_input() && !tuple.is_not_found());
        let unusable = with("invalid authorization model encountered: invalid schema version");
        assert!(unusable.is_not_found() && !unusable.is_invalid_input());
    }

    /// What may have been applied though it failed: only what the server
    /// may have run, or may still.
    #[test]
    fn knows_which_failures_may_have_been_applied() {
        let timeout = |sent| {
            Error::new(Kind::Timeout {
                operation: "write",
                timeout: None,
                sent,
            })
        };
        let cut = |sent| {
            Error::new(Kind::Connect {
                operation: "write",
                url: "u".into(),
                detail: "d".into(),
                sent,
            })
        };
        for (e, unsure) in [
            (timeout(true), true),
            (timeout(false), false),
            (cut(true), true),
            (cut(false), false),
            (api(502, ""), true),
            (api(504, "deadline_exceeded"), true),
            (api(500, ""), true),
            (api(500, "internal_error"), false),
            (api(500, "deadline_exceeded"), true),
            (api(400, "cancelled"), true),
            (api(500, "unavailable"), false),
            (api(429, ""), false),
            (api(409, "write_failed_due_to_invalid_input"), false),
            (api(400, "validation_error"), false),
            (too_large(), false),
        ] {
            assert_eq!(e.may_have_applied(), unsure, "{e}");
        }
    }
}
