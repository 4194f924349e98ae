//! The gate every client-facing surface passes (streamable HTTP, legacy SSE, `/rpc`, the
//! management API): the Origin/Host check, authentication, the endpoint's server grant and the
//! rate limits, then the handler, then one audit record; and the answers of the edge (JSON,
//! JSON-RPC errors, bounded bodies).
//!
//! Invariants: nothing behind the gate runs for a request it refused; every request and refusal
//! produces exactly one audit record (a batch: one per element); a body is read only within its
//! size and time bounds.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::auth::{AuthError, Identity};
use crate::config::Config;
use crate::mcp::gateway::{self, Gateway, Routed, Snapshot, Who};
use crate::mcp::jsonrpc::{self, Envelope, code};
use crate::mcp::session::Scope;

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
    /// Refused at a protected resource (OAuth configured): 401 or 403 with a challenge that
    /// names the resource's metadata and the scopes it needs (RFC 9728 §5.1, RFC 6750 §3).
    Challenge {
        /// The refusal.
        error: AuthError,
        /// The protected resource metadata URL.
        metadata: String,
        /// The scopes the endpoint needs, space-separated.
        scope: String,
    },
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

impl From<crate::mcp::gateway::StepUp> for Rejection {
    fn from(s: crate::mcp::gateway::StepUp) -> Self {
        Rejection::Challenge {
            error: AuthError::Forbidden("this token's scopes do not grant it".into()),
            metadata: s.metadata,
            scope: s.scope,
        }
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
            Rejection::Challenge { error, metadata, scope } => {
                // A missing credential gets no `error` (RFC 6750 §3.1).
                let code = match error {
                    AuthError::Invalid => Some("invalid_token"),
                    AuthError::Forbidden(_) => Some("insufficient_scope"),
                    _ => None,
                };
                let mut challenge = format!(r#"Bearer realm="{}", resource_metadata="{metadata}""#, crate::auth::REALM);
                if !scope.is_empty() {
                    challenge.push_str(&format!(r#", scope="{scope}""#));
                }
                if let Some(code) = code {
                    challenge.push_str(&format!(r#", error="{code}""#));
                }
                let mut r = error.into_response();
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                r
            }
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

/// The audit entry of one request in the making: the gate opens it, the surface notes the
/// message and [`Gateway::handle`] fills its [`Routed`] part, and it is written exactly once:
/// by [`guarded`] when the answer is ready, or, for an answer sent later (legacy SSE, a
/// streamed answer, stdio), by the [`Deferred`] that took it over.
#[derive(Debug)]
pub(crate) struct Entry {
    time: String,
    started: Instant,
    client: IpAddr,
    /// The identity, once authenticated.
    identity: Option<Arc<Identity>>,
    /// The JSON-RPC method (the HTTP method or the operation until one is known).
    method: String,
    request_id: Option<String>,
    /// What the gate and routing found: the server, the name, a refusal, an error.
    routed: Routed,
    /// Written, or handed on (taken over by a [`Deferred`], or a batch whose elements have
    /// entries of their own): nothing more is written from here.
    done: bool,
}

impl Entry {
    /// The entry of a request that arrives now from `client`.
    pub(crate) fn open(client: IpAddr, method: &str) -> Entry {
        Entry {
            time: crate::audit::now_rfc3339(),
            started: Instant::now(),
            client,
            identity: None,
            method: method.to_owned(),
            request_id: None,
            routed: Routed::default(),
            done: false,
        }
    }

    /// The entry of one element of a batch, or of one message on stdio: same client and
    /// identity, its own method, id and clock.
    pub(crate) fn element(&self, env: &Envelope<'_>) -> Entry {
        let mut e = Entry::open(self.client, env.method());
        e.identity = self.identity.clone();
        e.request_id = env.id.map(|i| i.get().to_owned());
        e
    }

    /// Notes the identity.
    pub(crate) fn identify(&mut self, identity: &Arc<Identity>) {
        self.identity = Some(identity.clone());
    }

    /// Notes the method and id of the message the request carries.
    pub(crate) fn message(&mut self, env: &Envelope<'_>) {
        env.method().clone_into(&mut self.method);
        self.request_id = env.id.map(|i| i.get().to_owned());
    }

    /// Replaces the method noted (a batch, an operation of the management API).
    pub(crate) fn set_method(&mut self, method: &str) {
        method.clone_into(&mut self.method);
    }

    /// Notes the server addressed.
    pub(crate) fn server(&mut self, name: &str) {
        self.routed.server = Some(name.to_owned());
    }

    /// Notes a refusal.
    pub(crate) fn refuse(&mut self, why: impl Into<String>) {
        self.routed.refused = Some(why.into());
    }

    /// The part [`Gateway::handle`] fills.
    pub(crate) fn routed(&mut self) -> &mut Routed {
        &mut self.routed
    }

    /// A batch: this request writes no entry of its own; each element writes one.
    pub(crate) fn per_element(&mut self) {
        self.done = true;
    }

    /// The answer will be sent by work that may outlive this call: the entry goes with it (see
    /// [`Deferred`]; `status` is what it records if the work is dropped), and what is left here
    /// is handed on (not written).
    pub(crate) fn defer(&mut self, gw: &Arc<Gateway>, status: StatusCode) -> Deferred {
        self.done = true;
        let taken = Entry {
            time: std::mem::take(&mut self.time),
            started: self.started,
            client: self.client,
            identity: self.identity.take(),
            method: std::mem::take(&mut self.method),
            request_id: self.request_id.take(),
            routed: std::mem::take(&mut self.routed),
            done: false,
        };
        taken.deferred(gw, status)
    }

    /// This entry, to be written when the answer is sent (see [`Deferred`]).
    pub(crate) fn deferred(self, gw: &Arc<Gateway>, status: StatusCode) -> Deferred {
        Deferred { gw: gw.clone(), entry: self, status }
    }

    /// Writes the audit record and the request's metrics, unless that was done (or handed
    /// on) before: an entry is written at most once.
    pub(crate) fn write(&mut self, gw: &Gateway, status: StatusCode) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let latency = self.started.elapsed();
        let Routed { server, name, refused, error, .. } = std::mem::take(&mut self.routed);
        let (method, identity) = (std::mem::take(&mut self.method), self.identity.take());
        gw.metrics().observe(&crate::metrics::Observation {
            server: server.as_deref(),
            identity: identity.as_ref().map(|i| &*i.name),
            method: &method,
            refused: refused.as_deref(),
            error: error || status.is_server_error(),
            latency,
        });
        gw.audit().record(crate::audit::Record {
            time: std::mem::take(&mut self.time),
            identity: identity.as_ref().map(|i| i.name.to_string()),
            tenant: identity.as_ref().and_then(|i| i.tenant.clone()),
            server,
            method,
            name,
            outcome: refused.unwrap_or_else(|| "allowed".into()),
            status: status.as_u16(),
            // Microsecond precision: `1.327`, not `1.3273519999999999`.
            latency_ms: (latency.as_secs_f64() * 1_000_000.0).round() / 1000.0,
            client: self.client.to_string(),
            request_id: self.request_id.take(),
        });
    }
}

/// An audit entry whose answer is sent later, owned by the work that sends it.
/// [`Deferred::finish`] writes it; dropped unfinished (the client went away, the work was
/// cancelled), it is written as it stands, with what routing had found and the status already
/// sent, so no request goes unrecorded.
pub(crate) struct Deferred {
    gw: Arc<Gateway>,
    entry: Entry,
    /// The status recorded if the work is dropped unfinished.
    status: StatusCode,
}

impl Deferred {
    /// The part [`Gateway::handle`] fills.
    pub(crate) fn routed(&mut self) -> &mut Routed {
        &mut self.entry.routed
    }

    /// Writes the entry with the answer's status; call it before the answer goes out, so a
    /// client that has its answer finds the record written.
    pub(crate) fn finish(mut self, status: StatusCode) {
        self.entry.write(&self.gw, status);
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        self.entry.write(&self.gw, self.status);
    }
}

/// Parses one JSON-RPC message (400 with its JSON-RPC error when it is not one) and notes its
/// method and id in the entry.
pub(crate) fn parse<'a>(body: &'a [u8], entry: &mut Entry) -> Result<Envelope<'a>, Rejection> {
    let env =
        Envelope::parse(body).map_err(|e| Rejection::rpc(StatusCode::BAD_REQUEST, e.id(), e.code(), e.to_string()))?;
    entry.message(&env);
    Ok(env)
}

/// Runs one request behind the gate: the Origin check, authentication, the endpoint's server
/// grant and the rate limits, then `f`, then one audit record (unless `f` handed the entry on).
/// Every client-facing HTTP endpoint goes through here.
pub(crate) async fn guarded<F, R>(
    gw: &Arc<Gateway>,
    scope: &Scope,
    method: &str,
    headers: &HeaderMap,
    peer: SocketAddr,
    f: F,
) -> Response
where
    F: AsyncFnOnce(Who, &mut Entry) -> R,
    R: IntoResponse,
{
    // One snapshot for the whole gate: the config and the credentials of one reload.
    let snap = gw.snapshot();
    let client = snap.auth.client_addr(peer, headers);
    let mut entry = Entry::open(client, method);
    let resp = match admit(&snap, scope, headers, client, &mut entry).await {
        Ok(who) => f(who, &mut entry).await.into_response(),
        Err(r) => r.into_response(),
    };
    entry.write(gw, resp.status());
    resp
}

/// The gate itself (see [`guarded`]).
async fn admit(
    snapshot: &Arc<Snapshot>,
    scope: &Scope,
    headers: &HeaderMap,
    client: IpAddr,
    entry: &mut Entry,
) -> Result<Who, Rejection> {
    let (config, auth) = (&*snapshot.config, &*snapshot.auth);
    if let Some(r) = check_origin(config, headers) {
        entry.refuse("refused: origin not allowed");
        return Err(r);
    }
    // With identity providers configured, the endpoint is a protected resource: its tokens
    // are checked for it, and its refusals say where its metadata is.
    let at = auth.is_protected_resource().then(|| crate::oauth::Endpoint {
        base: config.public_base(),
        server: match scope {
            Scope::One(s) => Some(s.clone()),
            Scope::All => None,
        },
    });
    let authenticated = match &at {
        Some(at) => auth.authenticate_at(headers, client, at).await,
        None => auth.authenticate(headers, client),
    };
    let refuse = |entry: &mut Entry, e: AuthError| {
        entry.refuse(e.outcome());
        match &at {
            Some(at) if matches!(e, AuthError::Missing | AuthError::Invalid | AuthError::Forbidden(_)) => {
                Rejection::Challenge {
                    metadata: at.metadata_url(),
                    scope: auth.scopes_for(at.server.as_deref()).join(" "),
                    error: e,
                }
            }
            _ => Rejection::Auth(e),
        }
    };
    let identity = match authenticated {
        Ok(i) => i,
        Err(e) => return Err(refuse(entry, e)),
    };
    entry.identify(&identity);
    // A scraper's credential reads the figures and nothing else, whatever the surface.
    if identity.role == crate::credentials::Role::Metrics
        && !crate::credentials::METRICS_REQUESTS.contains(&entry.method.as_str())
    {
        return Err(refuse(
            entry,
            AuthError::Forbidden("this credential (role metrics) may only read /metrics and /stats".into()),
        ));
    }
    if let Scope::One(name) = scope {
        entry.server(name);
        if config.server(name).is_none_or(|d| !d.enabled) {
            return Err(Rejection::rpc(
                StatusCode::NOT_FOUND,
                None,
                code::INVALID_REQUEST,
                format!("No such server: {name}"),
            ));
        }
        if !identity.grants.reaches(name) {
            return Err(refuse(entry, AuthError::Forbidden(format!("this token may not reach server {name}"))));
        }
    }
    if let Err(e) = auth.check_rate(&identity, client).await {
        return Err(refuse(entry, e));
    }
    let subject_token =
        identity.issuer.as_ref().and_then(|_| crate::auth::presented_credential(headers).ok()).map(Arc::from);
    Ok(Who { snapshot: snapshot.clone(), identity, client, subject_token })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that never finishes is refused once `body_read_timeout` has passed, on tokio's
    /// clock (paused here: the test does not wait for it).
    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_runs_out_of_time() {
        let stalled = futures_util::stream::pending::<Result<Bytes, std::io::Error>>();
        let started = tokio::time::Instant::now();
        let within = Duration::from_secs(30);
        let r = collect_body(Body::from_stream(stalled), 1024, within).await;
        assert!(matches!(r, Err(BodyError::TooSlow(d)) if d == within), "{r:?}");
        assert_eq!(started.elapsed(), within);
    }

    #[tokio::test]
    async fn a_body_past_the_limit_is_too_large() {
        let r = collect_body(Body::from(vec![b'x'; 2048]), 1024, Duration::from_secs(1)).await;
        assert!(matches!(r, Err(BodyError::TooLarge(1024))), "{r:?}");
    }
}
