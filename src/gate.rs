//! The gate every client-facing surface passes (streamable HTTP, legacy SSE, `/rpc`, the
//! management API): the Origin/Host check, authentication, the endpoint's server grant and the
//! rate limits, then the handler, then one audit record; and the answers of the edge (JSON,
//! JSON-RPC errors, bounded bodies).
//!
//! Invariants: nothing behind the gate runs for a request it refused; every request and refusal
//! produces exactly one audit record (a batch: one per element); a body is read only within its
//! size and time bounds.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::auth::{AuthError, Identity};
use crate::config::Config;
use crate::mcp::gateway::{self, Ctx, Gateway, Note, Snapshot};
use crate::mcp::jsonrpc::{self, Envelope, code};
use crate::mcp::session::{Caller, Scope};
use crate::sharded::lock;

/// A JSON response with a status.
pub(crate) fn json(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A JSON-RPC error response with an HTTP status.
pub(crate) fn rpc_error(status: StatusCode, id: Option<&str>, code: i64, message: &str) -> Response {
    json(status, jsonrpc::error_response(id, code, message, None))
}

/// Which servers an MCP endpoint addresses, from its path: `/servers/{name}/…` (and MCP
/// Front's `/{name}/…`) is that one server, a path without parameters every server. A name that
/// is not valid UTF-8 once percent-decoded is refused (400), never read as "every server".
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Scope {
    type Rejection = Rejection;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::rejection::RawPathParamsRejection;
        match axum::extract::RawPathParams::from_request_parts(parts, state).await {
            Ok(params) => {
                let name = params.iter().find(|(k, _)| *k == "name").map(|(_, v)| v.to_owned());
                Ok(name.map_or(Scope::All, Scope::One))
            }
            Err(RawPathParamsRejection::MissingPathParams(_)) => Ok(Scope::All),
            Err(e) => Err(Rejection::rpc(
                StatusCode::BAD_REQUEST,
                None,
                code::INVALID_REQUEST,
                format!("Bad Request: {}", e.body_text()),
            )),
        }
    }
}

/// A request refused at the edge. It renders itself (`IntoResponse`): that rendering is the
/// HTTP edge's one conversion from a typed refusal to bytes, so handlers use `?` on it.
#[derive(Debug)]
pub(crate) enum Rejection {
    /// A JSON-RPC error answer with an HTTP status (the MCP surfaces, `/rpc`).
    Rpc {
        /// The HTTP status.
        status: StatusCode,
        /// The request's id, raw, when it could be read.
        id: Option<String>,
        /// The JSON-RPC error code.
        code: i64,
        /// What the client is told (no secret, no URL credentials).
        message: String,
    },
    /// Refused by authentication or authorization (401, 403, 429, 503 with their headers).
    Auth(AuthError),
    /// A management API error: `{"error": …, "message": …}`.
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error's short name (`invalid_request`, `not_found`, …).
        error: &'static str,
        /// What the caller is told.
        message: String,
    },
}

impl Rejection {
    /// A JSON-RPC error answer.
    pub(crate) fn rpc(status: StatusCode, id: Option<&str>, code: i64, message: impl Into<String>) -> Rejection {
        Rejection::Rpc { status, id: id.map(str::to_owned), code, message: message.into() }
    }

    /// A management API error.
    pub(crate) fn api(status: StatusCode, error: &'static str, message: impl Into<String>) -> Rejection {
        Rejection::Api { status, error, message: message.into() }
    }
}

impl From<AuthError> for Rejection {
    fn from(e: AuthError) -> Self {
        Rejection::Auth(e)
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        match self {
            Rejection::Rpc { status, id, code, message } => rpc_error(status, id.as_deref(), code, &message),
            Rejection::Auth(e) => e.into_response(),
            Rejection::Api { status, error, message } => {
                json(status, serde_json::json!({"error": error, "message": message}).to_string())
            }
        }
    }
}

pub(crate) fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// Checks `Origin` (when present) and `Host` (on loopback, or when `allowed_hosts` is set).
/// Returns the 403 response to send when the request must be refused.
pub(crate) fn check_origin(config: &Config, headers: &HeaderMap) -> Option<Rejection> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("").trim_end_matches('/').to_ascii_lowercase();
        let allowed = if config.allowed_origins.is_empty() {
            own_origins(config).contains(&origin)
        } else {
            config.allowed_origins.iter().any(|o| *o == origin || o == "*")
        };
        if !allowed {
            return Some(Rejection::rpc(
                StatusCode::FORBIDDEN,
                None,
                code::INVALID_REQUEST,
                "Forbidden: origin not allowed",
            ));
        }
    }
    let host = header_str(headers, "host").unwrap_or("").to_ascii_lowercase();
    let ok = if !config.allowed_hosts.is_empty() {
        config.allowed_hosts.iter().any(|h| *h == host || host_name(&host) == h.as_str())
    } else if config.listen.ip().is_loopback() {
        matches!(host_name(&host), "localhost" | "127.0.0.1" | "[::1]" | "")
    } else {
        true
    };
    if !ok {
        return Some(Rejection::rpc(StatusCode::FORBIDDEN, None, code::INVALID_REQUEST, "Forbidden: host not allowed"));
    }
    None
}

fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.split(':').next().unwrap_or(host)
}

fn own_origins(config: &Config) -> Vec<String> {
    let port = config.listen.port();
    let mut out = Vec::new();
    for scheme in ["http", "https"] {
        out.push(format!("{scheme}://{}", config.listen));
        if config.listen.ip().is_loopback() {
            out.push(format!("{scheme}://localhost:{port}"));
            out.push(format!("{scheme}://127.0.0.1:{port}"));
            out.push(format!("{scheme}://[::1]:{port}"));
        }
    }
    out
}

/// The answer when a session limit is reached: 429 for the identity's own, 503 for the
/// gateway's, with a JSON-RPC error saying which.
pub(crate) fn session_limit(id: Option<&str>, e: &gateway::SessionLimit) -> Response {
    let status = match e {
        gateway::SessionLimit::Identity(_) => StatusCode::TOO_MANY_REQUESTS,
        gateway::SessionLimit::Gateway(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    rpc_error(status, id, code::LIMIT_REACHED, &e.to_string())
}

/// The answer when the OS random source fails: 503, nothing created.
pub(crate) fn no_randomness(id: Option<&str>, e: &crate::random::NoRandomness) -> Response {
    tracing::error!(error = %e, "refusing to open a session");
    rpc_error(StatusCode::SERVICE_UNAVAILABLE, id, code::INTERNAL_ERROR, "No randomness available; try again")
}

/// Why a request body could not be read; every surface renders it in its own format.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    /// Larger than the limit (413).
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// Not all there within the time allowed (408).
    #[error("the request body did not arrive within {0:?}")]
    TooSlow(Duration),
    /// The connection failed while it was read (400).
    #[error("could not read the request body")]
    Unreadable,
}

impl BodyError {
    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Unreadable => StatusCode::BAD_REQUEST,
        }
    }
}

/// Collects a body up to `limit` bytes, within `within` (`limits.body_read_timeout`: a client
/// that trickles a body holds a connection and a task).
pub(crate) async fn collect_body(body: Body, limit: usize, within: Duration) -> Result<Bytes, BodyError> {
    let collected = tokio::time::timeout(within, http_body_util::Limited::new(body, limit).collect());
    match collected.await {
        Err(_) => Err(BodyError::TooSlow(within)),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Ok(Err(_)) => Err(BodyError::Unreadable),
    }
}

/// [`collect_body`] for the MCP endpoints: `Err` is the 413/408/400 JSON-RPC answer.
pub(crate) async fn read_body(body: Body, limit: usize, within: Duration) -> Result<Bytes, Rejection> {
    collect_body(body, limit, within).await.map_err(|e| {
        let code = if matches!(e, BodyError::Unreadable) { code::PARSE_ERROR } else { code::INVALID_REQUEST };
        Rejection::rpc(e.status(), None, code, e.to_string())
    })
}

/// Reads a body that must hold one JSON-RPC message (legacy SSE POSTs, `/rpc`): an array is 400
/// with -32600.
pub(crate) async fn read_single(body: Body, limit: usize, within: Duration) -> Result<Bytes, Rejection> {
    let body = read_body(body, limit, within).await?;
    if jsonrpc::is_array(&body) {
        return Err(Rejection::rpc(
            StatusCode::BAD_REQUEST,
            None,
            code::INVALID_REQUEST,
            "Bad Request: one JSON-RPC message per request, no batches",
        ));
    }
    Ok(body)
}

/// The authenticated caller of one HTTP request, and the note its audit record is made from.
#[derive(Clone)]
pub(crate) struct Who {
    /// The config and credentials the gate checked this request against: everything behind
    /// the gate reads this one snapshot, never a newer one.
    pub snapshot: Arc<Snapshot>,
    /// Who the credential says the caller is (its grants decide what it reaches).
    pub identity: Arc<Identity>,
    /// The client's address (after `trusted_proxies`).
    pub client: IpAddr,
    /// Filled while routing.
    pub note: Arc<Mutex<Note>>,
}

impl Who {
    /// The gateway context of one request by this caller.
    pub(crate) fn ctx(
        &self,
        scope: Scope,
        caller: Caller,
        protocol_version: crate::mcp::version::ProtocolVersion,
    ) -> Ctx {
        Ctx {
            snapshot: self.snapshot.clone(),
            scope,
            caller,
            protocol_version,
            identity: self.identity.clone(),
            note: self.note.clone(),
        }
    }

    /// Parses one JSON-RPC message (400 with its JSON-RPC error when it is not one) and notes
    /// its method and id for the audit record.
    pub(crate) fn parse<'a>(&self, body: &'a [u8]) -> Result<Envelope<'a>, Rejection> {
        let env = Envelope::parse(body)
            .map_err(|e| Rejection::rpc(StatusCode::BAD_REQUEST, e.id(), e.code(), e.to_string()))?;
        let mut n = lock(&self.note);
        n.method = env.method().to_owned();
        n.request_id = env.id.map(|i| i.get().to_owned());
        Ok(env)
    }

    /// The same caller with a fresh note (one batch element).
    pub(crate) fn element(&self, method: &str) -> Who {
        let note = Note { identity: Some(self.identity.clone()), method: method.to_owned(), ..Note::default() };
        Who {
            snapshot: self.snapshot.clone(),
            identity: self.identity.clone(),
            client: self.client,
            note: Arc::new(Mutex::new(note)),
        }
    }
}

/// Writes one audit record from a note.
pub(crate) fn audit(gw: &Gateway, time: String, client: IpAddr, note: &Note, status: StatusCode, started: Instant) {
    let latency = started.elapsed();
    gw.metrics().observe(&crate::metrics::Observation {
        server: note.server.as_deref(),
        identity: note.identity.as_ref().map(|i| &*i.name),
        method: &note.method,
        refused: note.refused.as_deref(),
        error: note.error || status.is_server_error(),
        latency,
    });
    gw.audit().record(crate::audit::Record {
        time,
        identity: note.identity.as_ref().map(|i| i.name.to_string()),
        tenant: note.identity.as_ref().and_then(|i| i.tenant.clone()),
        server: note.server.clone(),
        method: note.method.clone(),
        name: note.name.clone(),
        outcome: note.refused.clone().unwrap_or_else(|| "allowed".into()),
        status: status.as_u16(),
        // Microsecond precision: `1.327`, not `1.3273519999999999`.
        latency_ms: (latency.as_secs_f64() * 1_000_000.0).round() / 1000.0,
        client: client.to_string(),
        request_id: note.request_id.clone(),
    });
}

/// Runs one request behind the gate: the Origin check, authentication, the endpoint's server
/// grant and the rate limits, then `f`, then one audit record. Every client-facing endpoint
/// goes through here.
pub(crate) async fn guarded<F, Fut, R>(
    gw: &Arc<Gateway>,
    scope: &Scope,
    method: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    f: F,
) -> Response
where
    F: FnOnce(Who) -> Fut,
    Fut: std::future::Future<Output = R>,
    R: IntoResponse,
{
    let started = Instant::now();
    let time = crate::audit::now_rfc3339();
    // One snapshot for the whole gate: the config and the credentials of one reload.
    let snap = gw.snapshot();
    let client = snap.auth.client_addr(peer, headers);
    let note = Arc::new(Mutex::new(Note { method: method.to_owned(), ..Note::default() }));
    let resp = match admit(&snap, scope, headers, client, &note) {
        Ok(who) => f(who).await.into_response(),
        Err(r) => r.into_response(),
    };
    let n = lock(&note);
    if !n.batch && !n.deferred {
        audit(gw, time, client, &n, resp.status(), started);
    }
    resp
}

/// The gate itself (see [`guarded`]).
fn admit(
    snapshot: &Arc<Snapshot>,
    scope: &Scope,
    headers: &HeaderMap,
    client: IpAddr,
    note: &Arc<Mutex<Note>>,
) -> Result<Who, Rejection> {
    let (config, auth) = (&*snapshot.config, &*snapshot.auth);
    if let Some(r) = check_origin(config, headers) {
        lock(note).refused = Some("refused: origin not allowed".into());
        return Err(r);
    }
    let refuse = |e: AuthError| {
        lock(note).refused = Some(e.outcome().into());
        Rejection::Auth(e)
    };
    let identity = auth.authenticate(headers, client).map_err(refuse)?;
    lock(note).identity = Some(identity.clone());
    // A scraper's credential reads the figures and nothing else, whatever the surface.
    if identity.role == crate::credentials::Role::Metrics
        && !crate::credentials::METRICS_REQUESTS.contains(&lock(note).method.as_str())
    {
        return Err(refuse(AuthError::Forbidden(
            "this credential (role metrics) may only read /metrics and /stats".into(),
        )));
    }
    if let Scope::One(name) = scope {
        lock(note).server = Some(name.clone());
        if config.server(name).is_none_or(|d| !d.enabled) {
            return Err(Rejection::rpc(
                StatusCode::NOT_FOUND,
                None,
                code::INVALID_REQUEST,
                format!("No such server: {name}"),
            ));
        }
        if !identity.grants.reaches(name) {
            return Err(refuse(AuthError::Forbidden(format!("this token may not reach server {name}"))));
        }
    }
    auth.check_rate(&identity, client).map_err(refuse)?;
    Ok(Who { snapshot: snapshot.clone(), identity, client, note: note.clone() })
}
