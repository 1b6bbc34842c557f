//! Credentials for OpenFGA: a preshared API token, or OAuth2 client
//! credentials whose access token is cached until shortly before it expires.

use std::fmt;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::sync::Mutex;

use crate::error::{Error, Kind};

/// A secret string (a token, a client secret, a password). Its `Debug` and
/// `Display` never show the value, so it cannot leak through a log line.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The value, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether no secret was given.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "<empty>"
        } else {
            "<redacted>"
        })
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Serialised config (e.g. `status --json`) must not carry secrets.
        s.serialize_str(if self.0.is_empty() { "" } else { "<redacted>" })
    }
}

/// OAuth2 client-credentials settings.
#[derive(Clone)]
pub struct OAuth2 {
    /// Token endpoint URL.
    pub token_url: String,
    /// Client id.
    pub client_id: String,
    /// Client secret.
    pub client_secret: Secret,
    /// Audience to request the token for (`api_audience` in OpenFGA's SDKs).
    pub audience: Option<String>,
    /// Scopes to request, space separated.
    pub scopes: Option<String>,
}

impl fmt::Debug for OAuth2 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OAuth2")
            .field("token_url", &super::redact_url(&self.token_url))
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret)
            .field("audience", &self.audience)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// How to authenticate to OpenFGA.
#[derive(Clone, Debug, Default)]
pub enum Credentials {
    /// No `Authorization` header.
    #[default]
    None,
    /// `Authorization: Bearer <token>` (OpenFGA's preshared keys).
    ApiToken(Secret),
    /// OAuth2 client credentials.
    ClientCredentials(OAuth2),
}

/// Leave this much of a token's life unused, so a token never expires between
/// being read from the cache and reaching the server.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// Produces the `Authorization` header value for each request.
pub(crate) struct Authenticator {
    credentials: Credentials,
    cached: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    /// The token, and until when it is used.
    token: Option<(Secret, Instant)>,
    /// When a refused token was last dropped.
    dropped_at: Option<Instant>,
    /// The last fetch's failure, and when it ended.
    failed: Option<(Error, Instant)>,
}

/// A failed token fetch answers the requests of the next second too,
/// without asking again: requests queued behind a fetch that hung until
/// its timeout would otherwise each wait that long in turn, and a refused
/// client secret would cost the token endpoint a request for each of ours.
const FAILURE_HOLDS: Duration = Duration::from_secs(1);

/// After a refused token was dropped, refusals within this long do not
/// drop the next: a fresh token that is refused too (OpenFGA's 401s for a
/// wrong audience or issuer, its access control's) would otherwise be
/// fetched again for every wave of requests, each waiting on the token
/// endpoint.
const REFETCH_EVERY: Duration = Duration::from_secs(30);

/// Most of a token response read: a token takes a few KiB, and an endless
/// answer is not held whole.
const TOKEN_BODY_MAX: usize = 1 << 20;

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default, deserialize_with = "seconds")]
    expires_in: Option<u64>,
}

/// `expires_in` as a number or, as some identity providers send it (Azure
/// AD's v1 endpoint, which the `fga` CLI's Go library also takes), a
/// string of one; anything else as none (a short life is assumed).
fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| *f >= 0.0)
                .map(|f| f.min(u64::MAX as f64) as u64)
        }),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    })
}

impl Authenticator {
    pub fn new(credentials: Credentials) -> Self {
        Authenticator {
            credentials,
            cached: Mutex::default(),
        }
    }

    /// The bearer token to send, if any.
    pub async fn bearer(&self, http: &reqwest::Client) -> Result<Option<Secret>, Error> {
        match &self.credentials {
            Credentials::None => Ok(None),
            Credentials::ApiToken(t) => Ok(Some(t.clone())),
            Credentials::ClientCredentials(o) => {
                let mut cached = self.cached.lock().await;
                if let Some((token, until)) = &cached.token {
                    if Instant::now() < *until {
                        return Ok(Some(token.clone()));
                    }
                }
                if let Some((e, at)) = &cached.failed {
                    if at.elapsed() < FAILURE_HOLDS {
                        return Err(e.clone());
                    }
                }
                let (token, lifetime) = match fetch_token(http, o).await {
                    Ok(fetched) => fetched,
                    Err(e) => {
                        cached.failed = Some((e.clone(), Instant::now()));
                        return Err(e);
                    }
                };
                cached.failed = None;
                // A quarter of a short life at most: a token living a
                // minute or less was fetched again for every request.
                let margin = EXPIRY_MARGIN.min(lifetime / 4);
                let until = Instant::now() + lifetime.saturating_sub(margin);
                cached.token = Some((token.clone(), until));
                Ok(Some(token))
            }
        }
    }

    /// Forgets the cached token after the server refused `used` (it may
    /// have been revoked early), unless another request has fetched a newer
    /// one since, or one was dropped moments ago (see [`REFETCH_EVERY`]).
    ///
    /// Returns whether the request is worth sending again: the token it carried
    /// is no longer the one to use (dropped now, or by another request
    /// refused with it at the same time, or replaced since).
    pub async fn invalidate(&self, used: &Secret) -> bool {
        // A fixed token stays what it is: no use sending it again.
        if !matches!(self.credentials, Credentials::ClientCredentials(_)) {
            return false;
        }
        let mut cached = self.cached.lock().await;
        let same = cached.token.as_ref().is_some_and(|(t, _)| t == used);
        if !same {
            return true;
        }
        let drop = cached
            .dropped_at
            .is_none_or(|at| at.elapsed() >= REFETCH_EVERY);
        if drop {
            cached.token = None;
            cached.dropped_at = Some(Instant::now());
        }
        drop
    }
}

async fn fetch_token(http: &reqwest::Client, o: &OAuth2) -> Result<(Secret, Duration), Error> {
    let mut form = vec![
        ("grant_type", "client_credentials"),
        ("client_id", o.client_id.as_str()),
        ("client_secret", o.client_secret.expose()),
    ];
    if let Some(a) = &o.audience {
        form.push(("audience", a));
    }
    if let Some(s) = &o.scopes {
        form.push(("scope", s));
    }
    let token_err = |detail: String, transient: bool| Error::new(Kind::Token { detail, transient });
    let resp = http
        .post(&o.token_url)
        .form(&form)
        .send()
        .await
        // The innermost cause (refused, DNS, TLS), without the URL; never
        // the form body.
        .map_err(|e| token_err(super::root_cause(&e.without_url()), true))?;
    let status = resp.status();
    if let Some(redirect) = super::redirected(status, resp.headers()) {
        // Not followed: it would send the client secret on to wherever it
        // points.
        return Err(token_err(
            format!(
                "{} answered {redirect}; set openfga.oauth2.token_url to where it points (redirects are not followed)",
                super::redact_url(&o.token_url)
            ),
            false,
        ));
    }
    if !status.is_success() {
        return Err(token_err(
            format!(
                "{} answered HTTP {}",
                super::redact_url(&o.token_url),
                status.as_u16()
            ),
            status.is_server_error() || matches!(status.as_u16(), 408 | 429),
        ));
    }
    // A body cut off on the way is worth another try; one that is not a
    // token response is the endpoint's answer.
    // A token takes a few KiB: an endless answer is not read whole.
    let (bytes, ended) = super::read_up_to(resp, TOKEN_BODY_MAX).await;
    match ended {
        Ok(true) => {}
        Ok(false) => {
            return Err(token_err(
                format!(
                    "the token response is over {} MiB, not read whole",
                    TOKEN_BODY_MAX >> 20
                ),
                false,
            ))
        }
        Err(e) => {
            return Err(token_err(
                format!(
                    "token response cut off: {}",
                    super::root_cause(&e.without_url())
                ),
                true,
            ))
        }
    }
    let body: TokenResponse =
        serde_json::from_slice(&bytes).map_err(|e| token_err(unreadable_token(&e), e.is_eof()))?;
    // Without expires_in, assume a short life rather than caching forever;
    // at most a day, so no answer can push the expiry past what a clock
    // holds.
    let lifetime = Duration::from_secs(body.expires_in.unwrap_or(300).min(86_400));
    let token = Secret::new(body.access_token);
    // Sent as it is in every request's header: one that cannot be would
    // fail each request before it leaves, as if OpenFGA were out of reach.
    if !header_safe(&token) {
        return Err(token_err(
            "the token response's access_token has a character an HTTP header cannot carry (a control character or a line break); the token endpoint is not issuing usable tokens".into(),
            false,
        ));
    }
    Ok((token, lifetime))
}

/// Whether `token` goes into an `Authorization: Bearer` header as it is.
pub(super) fn header_safe(token: &Secret) -> bool {
    reqwest::header::HeaderValue::from_str(token.expose()).is_ok()
}

/// Why a token response could not be read, without serde's words for a
/// value of the wrong type: they quote it, and a body that is a JSON string
/// holding the token response (encoded twice) would put the token in
/// errors, logs and `fga-wb status`.
fn unreadable_token(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let why = match e.classify() {
        Category::Data if e.to_string().starts_with("missing field") => "it has no access_token",
        Category::Data => "a value of the wrong type (one JSON object, its access_token text, its expires_in a number of seconds)",
        Category::Syntax => "not JSON",
        Category::Eof => "cut off",
        Category::Io => "not read whole",
    };
    format!(
        "unreadable token response: {why} (line {}, column {})",
        e.line(),
        e.column()
    )
}
