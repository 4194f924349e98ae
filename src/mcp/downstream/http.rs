//! Streamable HTTP for clients, both eras on one endpoint (`/mcp`, `/servers/{name}/mcp`).
//!
//! Per request: Origin/Host check → body limit → envelope → era (a 2026-07-28
//! `MCP-Protocol-Version` header or `_meta` version makes it stateless; else session rules) →
//! route → answer as JSON, or as SSE once a related message (progress, a server-to-client
//! request) arrives before the result. Invariants: every malformed input gets a 4xx with a
//! JSON-RPC error body, never a 5xx; a stateless request never mints or reads a session; a
//! legacy request without a session id (other than `initialize`) gets 400, with an unknown
//! one 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::gate::{
    Entry, Rejection, guarded, header_str, json, no_randomness, parse, read_body, rpc_error, session_limit,
};
use crate::mcp::gateway::{self, Ctx, Gateway, Who};
use crate::mcp::jsonrpc::{self, Envelope, Kind, OwnedRequest, RawObject, Reply, code};
use crate::mcp::session::{Caller, ClientTransport, Scope, Session};
use crate::mcp::sse;
use crate::mcp::version::ProtocolVersion;

/// Interval of keep-alive comments on idle SSE streams.
pub(crate) const KEEPALIVE: Duration = Duration::from_secs(15);

/// `_meta` key of a 2026-07-28 request's protocol version.
pub(crate) const PROTOCOL_VERSION_META: &str = "io.modelcontextprotocol/protocolVersion";
const CLIENT_CAPABILITIES_META: &str = "io.modelcontextprotocol/clientCapabilities";

fn accepts(headers: &HeaderMap, mime: &str) -> bool {
    match headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        None => true,
        Some(a) => a.split(',').any(|p| {
            let p = p.split(';').next().unwrap_or("").trim();
            p == mime || p == "*/*" || (p.ends_with("/*") && mime.starts_with(&p[..p.len() - 1]))
        }),
    }
}

fn is_stateless_version(v: &str) -> bool {
    ProtocolVersion::parse(v).is_some_and(ProtocolVersion::is_stateless)
}

/// Handles POST, GET and DELETE on a streamable-HTTP MCP endpoint.
pub(crate) async fn handle(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    scope: Scope,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let label = method.to_string();
    let headers = &headers;
    guarded(&gw.clone(), &scope.clone(), &label, headers, peer, async move |who, entry| {
        let version_header = header_str(headers, "mcp-protocol-version").map(str::to_owned);
        let stateless_header = version_header.as_deref().is_some_and(is_stateless_version);
        match method {
            Method::POST => post(gw.clone(), scope, headers, body, version_header, who, entry).await,
            Method::GET if stateless_header => Ok(method_not_allowed()),
            Method::GET => get_stream(gw.clone(), scope, headers, &who).await,
            Method::DELETE if stateless_header => Ok(method_not_allowed()),
            Method::DELETE => {
                let s = session_of(&gw, &scope, headers, &who).await?;
                gw.forget_session_ids(std::slice::from_ref(&s.id)).await;
                gw.end_session_as(&s.id, gateway::EndCause::Deleted).await;
                Ok(StatusCode::NO_CONTENT.into_response())
            }
            _ => Ok(method_not_allowed()),
        }
    })
    .await
}

fn method_not_allowed() -> Response {
    let mut r = rpc_error(StatusCode::METHOD_NOT_ALLOWED, None, code::INVALID_REQUEST, "Method not allowed");
    r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, POST, DELETE"));
    r
}

/// The session a request names: held here, or reopened from its sealed id (a session another
/// replica opened, or this one before a restart). A session of another identity is answered
/// exactly like an unknown one (404): an id alone never authenticates.
async fn session_of(gw: &Gateway, scope: &Scope, headers: &HeaderMap, who: &Who) -> Result<Arc<Session>, Rejection> {
    let Some(id) = header_str(headers, "mcp-session-id") else {
        return Err(Rejection::rpc(
            StatusCode::BAD_REQUEST,
            None,
            code::INVALID_REQUEST,
            "Bad Request: Mcp-Session-Id header is required",
        ));
    };
    let found = match gw.session(id) {
        Some(s) => Some(s),
        None => {
            gw.reopen_session(id, scope, &who.identity, &who.snapshot.config.limits, ClientTransport::Streamable).await
        }
    };
    match found {
        Some(s)
            if s.scope == *scope
                && s.transport == ClientTransport::Streamable
                && s.identity.same_principal(&who.identity) =>
        {
            s.renew(&who.identity);
            Ok(s)
        }
        _ => Err(Rejection::rpc(StatusCode::NOT_FOUND, None, code::INVALID_REQUEST, "Session not found")),
    }
}

async fn get_stream(gw: Arc<Gateway>, scope: Scope, headers: &HeaderMap, who: &Who) -> Result<Response, Rejection> {
    if !accepts(headers, "text/event-stream") {
        return Err(Rejection::rpc(
            StatusCode::NOT_ACCEPTABLE,
            None,
            code::INVALID_REQUEST,
            "Not Acceptable: use Accept: text/event-stream",
        ));
    }
    let session = session_of(&gw, &scope, headers, who).await?;
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    session.attach_stream_heard(tx).await;
    Ok(sse_response(stream_with_keepalive(rx, session.closed.clone()), None))
}

/// An SSE body from a channel, with keep-alive comments, ending when `closed` fires. The
/// connection polls it directly: an idle stream holds no task or channel of its own.
pub(crate) fn stream_with_keepalive(
    rx: mpsc::Receiver<Bytes>,
    closed: tokio_util::sync::CancellationToken,
) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let tick = tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
    let closed = Box::pin(closed.cancelled_owned());
    futures_util::stream::unfold((rx, tick, closed), |(mut rx, mut tick, mut closed)| async move {
        let chunk = tokio::select! {
            biased;
            _ = &mut closed => return None,
            m = rx.recv() => sse::message(&m?, None),
            _ = tick.tick() => Bytes::from_static(sse::KEEPALIVE),
        };
        Some((Ok(chunk), (rx, tick, closed)))
    })
}

/// A tiny generator: runs `f` with a sender and streams what it sends.
pub(crate) fn async_stream<F, Fut>(f: F) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static
where
    F: FnOnce(mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let task = tokio::spawn(f(tx));
    let guard = AbortOnDrop(task);
    futures_util::stream::unfold(
        (rx, guard),
        |(mut rx, guard)| async move { rx.recv().await.map(|b| (Ok(b), (rx, guard))) },
    )
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Wraps a byte stream as an SSE response.
pub(crate) fn sse_response(
    stream: impl futures_util::Stream<Item = Result<Bytes, Infallible>> + Send + 'static,
    session_id: Option<&str>,
) -> Response {
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Some(id) = session_id.and_then(|s| HeaderValue::from_str(s).ok()) {
        h.insert("mcp-session-id", id);
    }
    r
}

async fn post(
    gw: Arc<Gateway>,
    scope: Scope,
    headers: &HeaderMap,
    body: Body,
    version_header: Option<String>,
    who: Who,
    entry: &mut Entry,
) -> Result<Response, Rejection> {
    if let Some(ct) = header_str(headers, "content-type")
        && !ct.to_ascii_lowercase().starts_with("application/json")
    {
        return Err(Rejection::rpc(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            None,
            code::INVALID_REQUEST,
            "Unsupported Media Type: use application/json",
        ));
    }
    if !accepts(headers, "application/json") && !accepts(headers, "text/event-stream") {
        return Err(Rejection::rpc(
            StatusCode::NOT_ACCEPTABLE,
            None,
            code::INVALID_REQUEST,
            "Not Acceptable: accept application/json or text/event-stream",
        ));
    }
    let config = &who.snapshot.config;
    let body = read_body(body, config.max_body_bytes, config.limits.body_read_timeout).await?;
    if jsonrpc::is_array(&body) {
        return batch(gw, scope, headers, body, version_header, &who, entry).await;
    }
    let env = parse(&body, entry)?;
    let stateless_header = version_header.as_deref().is_some_and(is_stateless_version);
    let parsed = StatelessParams::of(&env, stateless_header);
    if stateless_header || (parsed.version.is_some() && !headers.contains_key("mcp-session-id")) {
        return Ok(stateless_post(gw, scope, headers, &env, parsed, who, entry).await);
    }
    if let Some(v) = &version_header
        && !ProtocolVersion::parse(v).is_some_and(ProtocolVersion::is_handshake)
    {
        return Err(Rejection::rpc(
            StatusCode::BAD_REQUEST,
            env.id.map(RawValue::get),
            code::INVALID_REQUEST,
            format!("Bad Request: unsupported MCP-Protocol-Version {v:?}"),
        ));
    }
    if env.kind == Kind::Request && env.method() == "initialize" {
        return Ok(initialize(gw, scope, &env, &who).await);
    }
    let session = session_of(&gw, &scope, headers, &who).await?;
    let caller = Caller::in_session(&session);
    let ctx = who.ctx(scope, caller, session.protocol_version);
    if env.kind != Kind::Request {
        // A notification or a client's response: delivered at once, answered 202.
        gw.handle(&ctx, &env, entry.routed()).await;
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    Ok(answer(gw, ctx, OwnedRequest::from(&env), entry, accepts(headers, "text/event-stream"), false).await)
}

/// A request's `params` and `params._meta` as objects, parsed once for the era check and the
/// 2026-07-28 validation ladder. Left empty (nothing parsed) for a request that neither names
/// 2026-07-28 in its header nor carries a `_meta` protocol version.
#[derive(Default)]
struct StatelessParams<'a> {
    params: Option<RawObject<'a>>,
    meta: Option<RawObject<'a>>,
    /// The protocol version in `_meta`, if any.
    version: Option<String>,
}

impl<'a> StatelessParams<'a> {
    fn of(env: &Envelope<'a>, stateless_header: bool) -> Self {
        let Some(raw) = env.params else { return Self::default() };
        if !stateless_header && !raw.get().contains(PROTOCOL_VERSION_META) {
            return Self::default();
        }
        let params = RawObject::parse(raw).ok();
        let meta = params.as_ref().and_then(|p| p.get("_meta")).and_then(|m| RawObject::parse(m).ok());
        let version = meta
            .as_ref()
            .and_then(|m| m.get(PROTOCOL_VERSION_META))
            .map(|v| serde_json::from_str::<String>(v.get()).unwrap_or_else(|_| v.get().to_owned()));
        StatelessParams { params, meta, version }
    }
}

async fn initialize(gw: Arc<Gateway>, scope: Scope, env: &Envelope<'_>, who: &Who) -> Response {
    let requested = env.params.and_then(|p| RawObject::parse(p).ok()).and_then(|o| o.get_str("protocolVersion"));
    let Some(requested) = requested else {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            env.id.map(RawValue::get),
            code::INVALID_PARAMS,
            "initialize: params.protocolVersion is required",
        );
    };
    let version = ProtocolVersion::negotiate(Some(&requested));
    let caps = env.params.and_then(|p| RawObject::parse(p).ok()).and_then(|o| o.get("capabilities"));
    let id = match gw.seal_session_id(
        &who.identity,
        &scope,
        version,
        caps.map(RawValue::get),
        ClientTransport::Streamable,
    ) {
        Ok(id) => id,
        Err(crate::vault::VaultError::NoRandomness(e)) => return no_randomness(env.id.map(RawValue::get), &e),
        Err(e) => {
            tracing::error!(error = %e, "cannot seal a session id");
            return rpc_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                env.id.map(RawValue::get),
                code::INTERNAL_ERROR,
                "cannot open a session now",
            );
        }
    };
    let session = Session::with_id(id, scope.clone(), version, ClientTransport::Streamable, who.identity.clone());
    if let Some(caps) = caps {
        session.set_capabilities(caps.get());
    }
    // Registered (within the limits) before anything is started for it: a refused session
    // has no per-session upstream to leak, and one whose client went away mid-initialize is
    // reclaimed by the idle sweep, its children with it.
    if let Err(e) = gw.add_session(session.clone(), &who.snapshot.config.limits) {
        return session_limit(env.id.map(RawValue::get), &e);
    }
    let caller = Caller::in_session(&session);
    let result = gw.initialize_result(&who.snapshot.config, &scope, version, &caller, &who.identity).await;
    let id = env.id.map_or("null", RawValue::get);
    let msg = jsonrpc::result_response(id, &result);
    let mut r = json(StatusCode::OK, msg);
    if let Ok(v) = HeaderValue::from_str(&session.id) {
        r.headers_mut().insert("mcp-session-id", v);
    }
    r
}

/// The 2026-07-28 validation ladder, then routing without a session.
async fn stateless_post(
    gw: Arc<Gateway>,
    scope: Scope,
    headers: &HeaderMap,
    env: &Envelope<'_>,
    parsed: StatelessParams<'_>,
    who: Who,
    entry: &mut Entry,
) -> Response {
    let version_header = header_str(headers, "mcp-protocol-version");
    let id = env.id.map(RawValue::get);
    let reject = |code: i64, msg: &str| rpc_error(StatusCode::BAD_REQUEST, id, code, msg);
    match env.kind {
        Kind::Result | Kind::Error => {
            return reject(code::INVALID_REQUEST, "Bad Request: 2026-07-28 clients must not send responses");
        }
        Kind::Notification => {
            return if version_header.is_some_and(is_stateless_version) {
                StatusCode::ACCEPTED.into_response()
            } else {
                reject(code::HEADER_MISMATCH, "MCP-Protocol-Version header is required")
            };
        }
        Kind::Request => {}
    }
    for name in ["mcp-protocol-version", "mcp-method", "mcp-name"] {
        if headers.get_all(name).iter().count() > 1 {
            return reject(code::HEADER_MISMATCH, &format!("{name} header appears more than once"));
        }
    }
    let StatelessParams { params, meta, version: meta_version } = parsed;
    let Some(meta) = meta else {
        return reject(
            code::INVALID_PARAMS,
            &format!(
                "params._meta must be an object carrying {PROTOCOL_VERSION_META:?} and {CLIENT_CAPABILITIES_META:?}"
            ),
        );
    };
    let missing: Vec<&str> =
        [PROTOCOL_VERSION_META, CLIENT_CAPABILITIES_META].into_iter().filter(|k| meta.get(k).is_none()).collect();
    if !missing.is_empty() {
        return reject(code::INVALID_PARAMS, &format!("params._meta is missing: {}", missing.join(", ")));
    }
    if version_header.is_none() || version_header != meta_version.as_deref() {
        return reject(
            code::HEADER_MISMATCH,
            "MCP-Protocol-Version header does not match the request envelope's protocol version",
        );
    }
    if let Some(mismatch) = header_mismatch(headers, env, params.as_ref()) {
        return reject(code::HEADER_MISMATCH, &mismatch);
    }
    let requested = meta_version.unwrap_or_default();
    let Some(version) = ProtocolVersion::parse(&requested).filter(|v| v.is_stateless()) else {
        let data =
            format!(r#"{{"supported":["{}"],"requested":{}}}"#, ProtocolVersion::STATELESS, jsonrpc::quote(&requested));
        return json(
            StatusCode::BAD_REQUEST,
            jsonrpc::error_response(id, code::UNSUPPORTED_VERSION, "Unsupported protocol version", Some(&data)),
        );
    };
    let caller = Caller { cancel_on_drop: true, forward: param_headers(headers), ..Caller::default() };
    let ctx = who.ctx(scope, caller, version);
    if env.method() == "subscriptions/listen" {
        return listen(gw, ctx, env, entry).await;
    }
    answer(gw, ctx, OwnedRequest::from(env), entry, accepts(headers, "text/event-stream"), true).await
}

/// Where a 2026-07-28 request's `Mcp-Method` or `Mcp-Name` header says other than its body,
/// as the client is told; `None` when they agree.
fn header_mismatch(headers: &HeaderMap, env: &Envelope<'_>, params: Option<&RawObject<'_>>) -> Option<String> {
    if header_str(headers, "mcp-method") != Some(env.method()) {
        return Some("Mcp-Method header does not match the request body's method".into());
    }
    let name_key = match env.method() {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    };
    if let Some(key) = name_key
        && let Some(body_value) = params.and_then(|p| p.get_str(key))
        && decode_header_value(header_str(headers, "mcp-name")).as_deref() != Some(body_value.as_str())
    {
        return Some(format!("Mcp-Name header does not match the request body's {key:?}"));
    }
    None
}

/// `subscriptions/listen`: an SSE stream that starts with the acknowledgement and carries the
/// opted-in notifications until the client closes it (which ends its listen session) or the
/// gateway shuts down (which ends it with a result).
async fn listen(gw: Arc<Gateway>, ctx: Ctx, env: &Envelope<'_>, entry: &mut Entry) -> Response {
    let id = env.id.map_or("null", RawValue::get).to_owned();
    let (session, rx, ack) = match gw.listen(&ctx, &id, env.params, entry.routed()).await {
        Ok(opened) => opened,
        Err(reply) => return json(stateless_status(&reply), reply.to_message(&id)),
    };
    let end = EndSession { gw, id: session.id.clone() };
    let closed = session.closed.clone();
    let stream = async_stream(move |out| async move {
        let _end = end;
        if out.send(sse::message(ack.as_bytes(), None)).await.is_err() {
            return;
        }
        let mut messages = Box::pin(stream_with_keepalive(rx, closed.clone()));
        while let Some(Ok(chunk)) = messages.next().await {
            if out.send(chunk).await.is_err() {
                return;
            }
        }
        if closed.is_cancelled() {
            let result = format!(
                r#"{{"resultType":"complete","_meta":{{"{}":{id}}}}}"#,
                crate::mcp::session::SUBSCRIPTION_ID_META
            );
            let _ = out.send(sse::message(jsonrpc::result_response(&id, &result).as_bytes(), None)).await;
        }
    });
    sse_response(stream, None)
}

/// Ends a session when dropped (the stream that owned it went away).
pub(crate) struct EndSession {
    gw: Arc<Gateway>,
    id: String,
}

impl EndSession {
    /// A guard for a session.
    pub(crate) fn new(gw: Arc<Gateway>, id: String) -> Self {
        EndSession { gw, id }
    }
}

impl Drop for EndSession {
    fn drop(&mut self) {
        let (gw, id) = (self.gw.clone(), std::mem::take(&mut self.id));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                // Over for good: its sealed id opens on no replica again.
                gw.forget_session_ids(std::slice::from_ref(&id)).await;
                gw.end_session_as(&id, gateway::EndCause::Closed).await
            });
        }
    }
}

/// The `Mcp-Param-*` headers of a request (mirrored tool arguments), to forward upstream.
fn param_headers(headers: &HeaderMap) -> Option<crate::mcp::session::ForwardHeaders> {
    let found: Vec<(String, String)> = headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("mcp-param-"))
        .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
        .collect();
    (!found.is_empty()).then(|| found.into())
}

/// Decodes an `Mcp-Name`-style header value (`=?base64?…?=` or plain).
pub(crate) fn decode_header_value(v: Option<&str>) -> Option<String> {
    use base64::Engine;
    let v = v?;
    match v.strip_prefix("=?base64?").and_then(|r| r.strip_suffix("?=")) {
        Some(payload) => {
            let bytes = base64::engine::general_purpose::STANDARD.decode(payload).ok()?;
            String::from_utf8(bytes).ok()
        }
        None => Some(v.to_owned()),
    }
}

/// HTTP status for a stateless-era JSON error (as the 2026-07-28 SDKs map them).
fn stateless_status(reply: &Reply) -> StatusCode {
    if !reply.is_error {
        return StatusCode::OK;
    }
    #[derive(serde::Deserialize)]
    struct E {
        code: i64,
    }
    match serde_json::from_str::<E>(reply.payload_str()).map(|e| e.code) {
        Ok(code::PARSE_ERROR | code::INVALID_REQUEST | code::INVALID_PARAMS) => StatusCode::BAD_REQUEST,
        Ok(code::HEADER_MISMATCH | code::MISSING_CAPABILITY | code::UNSUPPORTED_VERSION) => StatusCode::BAD_REQUEST,
        Ok(code::METHOD_NOT_FOUND) => StatusCode::NOT_FOUND,
        _ => StatusCode::OK,
    }
}

/// Routes a request and answers: JSON when the result comes first, SSE when a related message
/// (progress, a server-to-client request) comes first and the client accepts SSE. The work
/// owns the audit entry: it is written just before the result goes out, or, if the client goes
/// away first, when the work is dropped, with what routing had found.
async fn answer(
    gw: Arc<Gateway>,
    mut ctx: Ctx,
    req: OwnedRequest,
    entry: &mut Entry,
    sse_ok: bool,
    stateless: bool,
) -> Response {
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    if sse_ok {
        ctx.caller.related = Some(tx);
    }
    let id = req.id().to_owned();
    let mut later = entry.defer(&gw, StatusCode::OK);
    let mut work = Box::pin(async move {
        let reply = gw.handle(&ctx, &req.envelope(), later.routed()).await;
        (reply, later)
    });
    tokio::select! {
        biased;
        (reply, mut later) = &mut work => {
            let Some(reply) = reply else {
                later.finish(StatusCode::ACCEPTED);
                return StatusCode::ACCEPTED.into_response();
            };
            // An access token refused an item another of its issuer's scopes grants: 403
            // with the scopes to come back with, not the unknown-name answer.
            if let Some(step_up) = later.routed().step_up.take() {
                later.finish(StatusCode::FORBIDDEN);
                return Rejection::from(step_up).into_response();
            }
            // Related messages that arrived with the result still go first, on an SSE stream.
            let mut early = Vec::new();
            while let Ok(m) = rx.try_recv() {
                early.push(sse::message(&m, None));
            }
            if !early.is_empty() {
                later.finish(StatusCode::OK);
                early.push(sse::message(reply.to_message(&id).as_bytes(), None));
                return sse_response(futures_util::stream::iter(early.into_iter().map(Ok::<_, Infallible>)), None);
            }
            let status = if stateless { stateless_status(&reply) } else { StatusCode::OK };
            later.finish(status);
            json(status, Body::new(Parts::of(reply.to_chunks(&id))))
        }
        first = rx.recv() => {
            let Some(first) = first else {
                let (reply, later) = work.await;
                later.finish(StatusCode::OK);
                return match reply {
                    Some(reply) => json(StatusCode::OK, reply.to_message(&id)),
                    None => StatusCode::ACCEPTED.into_response(),
                };
            };
            let stream = async_stream(move |out| async move {
                if out.send(sse::message(&first, None)).await.is_err() { return; }
                let mut tick = tokio::time::interval(KEEPALIVE);
                tick.tick().await;
                loop {
                    tokio::select! {
                        (reply, later) = &mut work => {
                            later.finish(StatusCode::OK);
                            while let Ok(m) = rx.try_recv() {
                                let _ = out.send(sse::message(&m, None)).await;
                            }
                            if let Some(reply) = reply {
                                let _ = out.send(sse::message(reply.to_message(&id).as_bytes(), None)).await;
                            }
                            return;
                        }
                        Some(m) = rx.recv() => { if out.send(sse::message(&m, None)).await.is_err() { return; } }
                        _ = tick.tick() => { if out.send(Bytes::from_static(sse::KEEPALIVE)).await.is_err() { return; } }
                    }
                }
            });
            sse_response(stream, None)
        }
    }
}

/// JSON-RPC batches: only in sessions negotiated at 2025-03-26; each element on its own, with
/// an audit entry of its own.
async fn batch(
    gw: Arc<Gateway>,
    scope: Scope,
    headers: &HeaderMap,
    body: Bytes,
    version_header: Option<String>,
    who: &Who,
    entry: &mut Entry,
) -> Result<Response, Rejection> {
    entry.set_method("batch");
    let invalid = || {
        Rejection::rpc(
            StatusCode::BAD_REQUEST,
            None,
            code::INVALID_REQUEST,
            "Bad Request: JSON-RPC batches are not supported in this protocol version",
        )
    };
    if version_header.as_deref().is_some_and(is_stateless_version) {
        return Err(invalid());
    }
    let session = match session_of(&gw, &scope, headers, who).await {
        Ok(s) if s.protocol_version.allows_batches() => s,
        Ok(_) => return Err(invalid()),
        Err(_) if !headers.contains_key("mcp-session-id") => return Err(invalid()),
        Err(r) => return Err(r),
    };
    let items: Vec<&RawValue> = serde_json::from_slice(&body)
        .map_err(|e| Rejection::rpc(StatusCode::BAD_REQUEST, None, code::PARSE_ERROR, format!("Parse error: {e}")))?;
    if items.is_empty() {
        return Err(Rejection::rpc(StatusCode::BAD_REQUEST, None, code::INVALID_REQUEST, "Bad Request: empty batch"));
    }
    entry.per_element();
    let entry = &*entry;
    let caller = Caller::in_session(&session);
    let futs = items.iter().map(|item| {
        let gw = gw.clone();
        let ctx = who.clone().ctx(scope.clone(), caller.clone(), session.protocol_version);
        async move {
            let env = match Envelope::parse(item.get().as_bytes()) {
                Ok(e) => e,
                Err(e) => return Some(jsonrpc::error_response(e.id(), e.code(), &e.to_string(), None)),
            };
            let mut one = entry.element(&env);
            let answer = if env.kind == Kind::Request && env.method() == "initialize" {
                Some(jsonrpc::error_response(
                    env.id.map(RawValue::get),
                    code::INVALID_REQUEST,
                    "initialize may not be part of a batch",
                    None,
                ))
            } else {
                let reply = gw.handle(&ctx, &env, one.routed()).await;
                reply.map(|r| r.to_message(env.id.map_or("null", RawValue::get)))
            };
            one.write(&gw, StatusCode::OK);
            answer
        }
    });
    let answers: Vec<String> = futures_util::future::join_all(futs).await.into_iter().flatten().collect();
    if answers.is_empty() {
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    Ok(json(StatusCode::OK, format!("[{}]", answers.join(","))))
}

/// A response body of parts already in memory: not copied into one buffer, and of known
/// length, so it goes out with `Content-Length` in one write with the head (a stream of parts
/// went out chunked, its last chunk in a write, and a wake-up of the client, of its own).
struct Parts {
    parts: [Bytes; 3],
    next: usize,
}

impl Parts {
    fn of(parts: [Bytes; 3]) -> Self {
        Parts { parts, next: 0 }
    }

    fn remaining(&self) -> u64 {
        self.parts.get(self.next..).unwrap_or_default().iter().map(|b| b.len() as u64).sum()
    }
}

impl hyper::body::Body for Parts {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        while let Some(part) = this.parts.get_mut(this.next) {
            this.next += 1;
            let part = std::mem::take(part);
            if !part.is_empty() {
                return std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(part))));
            }
        }
        std::task::Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.remaining() == 0
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.remaining())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle stream carries a keep-alive comment every `KEEPALIVE` and nothing else, and ends
    /// when its session closes (tokio's clock, paused: no real wait).
    #[tokio::test(start_paused = true)]
    async fn an_idle_stream_is_kept_alive_then_ends_with_its_session() {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let closed = tokio_util::sync::CancellationToken::new();
        let mut stream = Box::pin(stream_with_keepalive(rx, closed.clone()));
        let started = tokio::time::Instant::now();
        for n in 1..=3u32 {
            let chunk = stream.next().await.and_then(Result::ok);
            assert_eq!(chunk.as_deref(), Some(sse::KEEPALIVE));
            assert_eq!(started.elapsed(), KEEPALIVE * n);
        }
        tx.send(Bytes::from_static(b"{}")).await.ok();
        let message = stream.next().await.and_then(Result::ok);
        assert_eq!(message, Some(sse::message(b"{}", None)));
        closed.cancel();
        assert!(stream.next().await.is_none());
    }
}
