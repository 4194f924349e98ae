//! The management API: `/servers` (status, start, stop, restart), `/stats`, `/metrics`,
//! `/admin/reload`, and `/rpc` (one JSON-RPC request without a session).
//!
//! Invariants: every endpoint goes through the same gate as MCP traffic
//! (`gate::guarded`: authentication, rate limits, one audit record); everything but
//! `/rpc` needs the admin role (403 otherwise); `/rpc` runs under the caller's own grants;
//! answers are JSON throughout. A management action stays within the caller's own grants and
//! tenant: an admin sees and controls only the servers it may reach, sees and manages only the
//! issued tokens its own grants cover (in its tenant), creates only tokens with a subset of its
//! rights; gateway-wide figures and reload need an unrestricted admin.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::auth::AuthError;
use crate::config::{self, ServerDef, Transport};
use crate::gate::{Entry, Rejection, guarded, json as json_response, parse, read_single};
use crate::mcp::gateway::{ControlError, Gateway, Who};
use crate::mcp::jsonrpc::{self, Kind, code};
use crate::mcp::session::{Caller, ClientTransport, Scope};
use crate::mcp::upstream::{State as UpState, Upstream};
use crate::mcp::version::ProtocolVersion;

fn json_value(status: StatusCode, v: &Value) -> Response {
    json_response(status, v.to_string())
}

fn error(status: StatusCode, error: &'static str, message: &str) -> Response {
    Rejection::api(status, error, message).into_response()
}

/// Runs `f` for an admin caller; others get 403 (`insufficient_scope`).
async fn admin<F, R>(gw: Arc<Gateway>, label: &str, headers: &HeaderMap, peer: SocketAddr, f: F) -> Response
where
    F: AsyncFnOnce(Arc<Gateway>, Who, &mut Entry) -> R,
    R: IntoResponse,
{
    guarded(&gw.clone(), &Scope::All, label, headers, peer, async move |who, entry| {
        if !who.identity.is_admin() {
            return refuse(entry, AuthError::Forbidden("the management API needs the admin role".into()));
        }
        f(gw, who, entry).await.into_response()
    })
    .await
}

/// Notes a refusal in the audit entry and answers it.
fn refuse(entry: &mut Entry, e: AuthError) -> Response {
    entry.refuse(e.outcome());
    e.into_response()
}

/// For an admin with every right only (`/admin/reload`).
async fn unrestricted<F>(gw: Arc<Gateway>, label: &str, headers: &HeaderMap, peer: SocketAddr, f: F) -> Response
where
    F: AsyncFnOnce(Arc<Gateway>) -> Response,
{
    admin(gw, label, headers, peer, async move |gw, who, entry| {
        let names: Vec<String> = who.snapshot.config.servers.iter().map(|s| s.name.clone()).collect();
        if !who.identity.is_unrestricted_admin(&names) {
            let e = AuthError::Forbidden("this needs an admin with every right (every server, no tenant)".into());
            return refuse(entry, e);
        }
        f(gw).await
    })
    .await
}

/// For a reader of the gateway-wide figures (`/stats`, `/metrics`): a `metrics` credential, or
/// an admin with every right.
async fn figures<F>(gw: Arc<Gateway>, label: &str, headers: &HeaderMap, peer: SocketAddr, f: F) -> Response
where
    F: AsyncFnOnce(Arc<Gateway>) -> Response,
{
    guarded(&gw.clone(), &Scope::All, label, headers, peer, async move |who, entry| {
        let names: Vec<String> = who.snapshot.config.servers.iter().map(|s| s.name.clone()).collect();
        if !who.identity.reads_metrics(&names) {
            let e = AuthError::Forbidden(
                "this needs a metrics credential or an admin with every right (every server, no tenant)".into(),
            );
            return refuse(entry, e);
        }
        f(gw).await
    })
    .await
}

fn no_such_server(name: &str) -> Response {
    error(StatusCode::NOT_FOUND, "not_found", &format!("No such server: {name}"))
}

/// Whether an admin may see and manage an issued token: its tenant (if the admin has one) and
/// grants its own grants cover.
fn manages(who: &Who, t: &crate::store::StoredToken) -> bool {
    let tenant_ok = who.identity.tenant.as_deref().is_none_or(|own| own == t.tenant);
    let grants = who.snapshot.auth.effective_grants(&t.name, Some(&t.tenant), t.grants.grants());
    tenant_ok && who.identity.grants.covers(&grants)
}

fn transport_name(def: &ServerDef) -> &'static str {
    match &def.transport {
        Transport::Stdio { .. } => "stdio",
        Transport::Http { mode: config::HttpMode::Streamable, .. } => "streamable_http",
        Transport::Http { mode: config::HttpMode::Sse, .. } => "sse",
        Transport::Http { mode: config::HttpMode::Auto, .. } => "auto",
    }
}

/// How many items a running server lists (following cursors, bounded).
async fn count(up: &Arc<Upstream>, method: &str, field: &str) -> Option<usize> {
    let mut total = 0;
    let mut cursor: Option<String> = None;
    for _ in 0..50 {
        let params = cursor.as_ref().map(|c| jsonrpc::raw(format!(r#"{{"cursor":{}}}"#, jsonrpc::quote(c))));
        let caller = Caller::default();
        let call = up.call(method, params.as_deref(), &[], &caller, None);
        let reply = tokio::time::timeout(Duration::from_secs(5), call).await.ok()?.ok()?;
        if reply.is_error {
            return None;
        }
        let v: Value = serde_json::from_str(reply.payload_str()).ok()?;
        total += v.get(field).and_then(Value::as_array).map_or(0, Vec::len);
        cursor = v.get("nextCursor").and_then(Value::as_str).map(str::to_owned);
        if cursor.is_none() {
            break;
        }
    }
    Some(total)
}

async fn describe(gw: &Gateway, def: &Arc<ServerDef>) -> Value {
    let up = gw.upstream(&def.name);
    let status = up.as_ref().map(|u| u.status());
    let state = match (&status, def.enabled) {
        (_, false) => "stopped".to_owned(),
        (Some(s), _) => s.state.as_str().to_owned(),
        (None, _) => "stopped".to_owned(),
    };
    let conn = status.as_ref().and_then(|s| s.conn.clone());
    let (tools, prompts, resources) = match (&up, &conn) {
        (Some(up), Some(_)) => {
            let (t, p, r) = tokio::join!(
                count(up, "tools/list", "tools"),
                count(up, "prompts/list", "prompts"),
                count(up, "resources/list", "resources")
            );
            (t, p, r)
        }
        _ => (None, None, None),
    };
    json!({
        "name": def.name,
        "state": state,
        "transport": transport_name(def),
        "share": if def.share == config::Share::Shared { "shared" } else { "per_session" },
        "pid": conn.as_ref().and_then(|c| c.pid()),
        "restarts": status.as_ref().map_or(0, |s| s.restarts),
        "last_error": status.as_ref().and_then(|s| s.last_error.as_ref().map(ToString::to_string)),
        "uptime_s": status.as_ref().and_then(|s| s.since).map(|t| t.elapsed().as_secs()),
        "protocol_version": conn.as_ref().map(|c| c.info.protocol_version),
        "in_flight": up.as_ref().map_or(0, |u| u.in_flight()),
        "tools": tools,
        "prompts": prompts,
        "resources": resources,
        "oauth": if def.per_user { per_user_state(gw, def).await } else { up.as_ref().and_then(|u| u.credential_state()) },
    })
}

/// What `/servers` says of a `per_user` server's accounts: the grant and how many identities
/// linked one (never who, nor any token).
async fn per_user_state(gw: &Gateway, def: &ServerDef) -> Option<Value> {
    let crate::config::Transport::Http { oauth: Some(grant), .. } = &def.transport else { return None };
    let grant = match grant.flow {
        crate::oauth::client::Flow::TokenExchange { .. } => {
            return Some(json!({"grant": "token_exchange", "credentials": "per_user"}));
        }
        _ => "authorization_code",
    };
    let name = def.name.clone();
    let (linked, needs_login) = match gw.with_store((0, 0), move |s| s.upstream_account_counts(&name)).await {
        Ok(c) => (Some(c.0), Some(c.1)),
        Err(_) => (None, None),
    };
    Some(json!({"grant": grant, "credentials": "per_user", "linked": linked, "needs_login": needs_login}))
}

/// `GET /servers`.
pub(crate) async fn servers(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    admin(gw, "GET /servers", &headers, peer, async move |gw, who, _| {
        let config = who.snapshot.config.clone();
        let visible = config.servers.iter().filter(|d| who.identity.grants.reaches(&d.name));
        let all = join_all(visible.map(|d| describe(&gw, d))).await;
        json_value(StatusCode::OK, &json!({"servers": all}))
    })
    .await
}

/// `GET /servers/{name}`.
pub(crate) async fn server(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    admin(gw, "GET /servers/{name}", &headers, peer, async move |gw, who, entry| {
        entry.server(&name);
        match who.snapshot.config.server(&name) {
            Some(def) if who.identity.grants.reaches(&name) => json_value(StatusCode::OK, &describe(&gw, def).await),
            _ => no_such_server(&name),
        }
    })
    .await
}

/// `POST /servers/{name}/start|stop|restart`.
pub(crate) async fn control(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    admin(gw, "POST /servers/{name}/{action}", &headers, peer, async move |gw, who, entry| {
        entry.server(&name);
        if !who.identity.grants.reaches(&name) {
            return no_such_server(&name);
        }
        let result = match action.as_str() {
            "start" => gw.start_server(&name),
            "stop" => gw.stop_server(&name).await,
            "restart" => match gw.stop_server(&name).await {
                Ok(()) => gw.start_server(&name),
                Err(e) => Err(e),
            },
            other => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    &format!("No such action: {other} (start, stop, restart)"),
                );
            }
        };
        match result {
            Ok(()) => match gw.config().server(&name) {
                Some(def) => json_value(StatusCode::OK, &describe(&gw, def).await),
                None => error(StatusCode::NOT_FOUND, "not_found", &format!("No such server: {name}")),
            },
            Err(ControlError::Unknown) => error(StatusCode::NOT_FOUND, "not_found", &format!("No such server: {name}")),
            Err(ControlError::Conflict(m)) => error(StatusCode::CONFLICT, "conflict", &m),
        }
    })
    .await
}

/// `GET /stats`.
pub(crate) async fn stats(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    figures(gw, "GET /stats", &headers, peer, async move |gw| json_value(StatusCode::OK, &gw.metrics().stats_json()))
        .await
}

/// `GET /metrics` (Prometheus text format).
pub(crate) async fn metrics(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    figures(gw, "GET /metrics", &headers, peer, async move |gw| {
        let mut out = String::new();
        gw.metrics().render(&mut out);
        let _ = writeln!(out, "# HELP portcullis_sessions Open client sessions by transport.");
        let _ = writeln!(out, "# TYPE portcullis_sessions gauge");
        let sessions = gw.sessions();
        for (t, label) in [
            (ClientTransport::Streamable, "streamable_http"),
            (ClientTransport::Sse, "sse"),
            (ClientTransport::Listen, "listen"),
            (ClientTransport::Stdio, "stdio"),
        ] {
            let n = sessions.iter().filter(|s| s.transport == t).count();
            let _ = writeln!(out, "portcullis_sessions{{transport=\"{label}\"}} {n}");
        }
        let _ =
            writeln!(out, "# HELP portcullis_store_up Whether the token store answered its last poll (1) or not (0).");
        let _ = writeln!(out, "# TYPE portcullis_store_up gauge");
        let up = gw.store().state() != crate::store::StoreState::Unavailable;
        let _ = writeln!(out, "portcullis_store_up {}", u8::from(up));
        if let Some(state) = gw.shared_state() {
            let _ = writeln!(
                out,
                "# HELP portcullis_state_up Whether the shared state (Redis) answers (1) or limits count per replica (0)."
            );
            let _ = writeln!(out, "# TYPE portcullis_state_up gauge");
            let _ = writeln!(out, "portcullis_state_up {}", u8::from(state.is_up()));
        }
        let _ = writeln!(out, "# HELP portcullis_sessions_ended_total Client sessions ended, by cause.");
        let _ = writeln!(out, "# TYPE portcullis_sessions_ended_total counter");
        for (cause, n) in gw.sessions_ended() {
            let _ = writeln!(out, "portcullis_sessions_ended_total{{cause=\"{}\"}} {n}", cause.as_str());
        }
        let _ = writeln!(out, "# HELP portcullis_upstream_up Whether a server is running (1) or not (0).");
        let _ = writeln!(out, "# TYPE portcullis_upstream_up gauge");
        let statuses = gw.statuses();
        for (def, status) in &statuses {
            let up = status.as_ref().is_some_and(|s| s.state == UpState::Running);
            let _ = writeln!(out, "portcullis_upstream_up{{server=\"{}\"}} {}", def.name, u8::from(up));
        }
        let _ = writeln!(out, "# HELP portcullis_upstream_restarts_total Restarts of a server's instance.");
        let _ = writeln!(out, "# TYPE portcullis_upstream_restarts_total counter");
        for (def, status) in &statuses {
            let n = status.as_ref().map_or(0, |s| s.restarts);
            let _ = writeln!(out, "portcullis_upstream_restarts_total{{server=\"{}\"}} {n}", def.name);
        }
        let mut r = (StatusCode::OK, out).into_response();
        r.headers_mut().insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    })
    .await
}

/// `POST /admin/reload`: as SIGHUP, but the errors of an invalid file come back in the answer.
pub(crate) async fn reload(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    unrestricted(gw, "POST /admin/reload", &headers, peer, async move |gw| match gw.reload_from_source().await {
        Ok(()) => json_value(StatusCode::OK, &json!({"status": "reloaded"})),
        Err(errors) => json_value(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid_config", "message": "the config was not reloaded", "errors": errors}),
        ),
    })
    .await
}

/// `POST /rpc`: one JSON-RPC request without a session, under the caller's own grants.
pub(crate) async fn rpc(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    guarded(&gw.clone(), &Scope::All, "POST /rpc", &headers, peer, async move |who, entry| {
        let config = who.snapshot.config.clone();
        let body = read_single(body, config.max_body_bytes, config.limits.body_read_timeout).await?;
        let env = parse(&body, entry)?;
        if env.kind != Kind::Request {
            return Err(Rejection::rpc(
                StatusCode::BAD_REQUEST,
                None,
                code::INVALID_REQUEST,
                "/rpc takes a JSON-RPC request",
            ));
        }
        if env.method() == "initialize" {
            let id = env.id.map(|i| i.get());
            return Err(Rejection::rpc(
                StatusCode::BAD_REQUEST,
                id,
                code::INVALID_REQUEST,
                "/rpc is sessionless: no initialize",
            ));
        }
        let caller = Caller { cancel_on_drop: true, ..Caller::default() };
        let ctx = who.ctx(Scope::All, caller, ProtocolVersion::LATEST_SESSION);
        let reply = gw.handle(&ctx, &env, entry.routed()).await;
        if let Some(step_up) = entry.routed().step_up.take() {
            return Err(step_up.into());
        }
        Ok(match reply {
            Some(reply) => json_response(StatusCode::OK, reply.to_message(env.id.map_or("null", |i| i.get()))),
            None => StatusCode::ACCEPTED.into_response(),
        })
    })
    .await
}

fn store_error(e: crate::store::StoreError) -> Response {
    Rejection::from(e).into_response()
}

impl From<crate::store::StoreError> for Rejection {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Invalid(m) => Rejection::api(StatusCode::BAD_REQUEST, "invalid_request", m),
            crate::store::StoreError::Unavailable(m) => {
                Rejection::api(StatusCode::SERVICE_UNAVAILABLE, "unavailable", m)
            }
        }
    }
}

fn token_json(t: &crate::store::StoredToken, secret: Option<&str>) -> Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    v["state"] = serde_json::to_value(t.state(crate::store::now_ms())).unwrap_or_default();
    if let Some(s) = secret {
        v["secret"] = Value::String(s.to_owned());
    }
    v
}

/// Opens the store the gateway reads (creating it on first use).
fn open_store(gw: &Gateway) -> Result<crate::store::Store, crate::store::StoreError> {
    gw.store().writable()
}

/// The token `id` when the caller manages it; 404 (as unknown) when it does not.
fn managed(gw: &Gateway, who: &Who, id: &str) -> Result<crate::store::StoredToken, Rejection> {
    match open_store(gw).and_then(|s| s.get(id)) {
        Ok(t) if manages(who, &t) => Ok(t),
        Ok(_) | Err(crate::store::StoreError::Invalid(_)) => {
            Err(Rejection::api(StatusCode::NOT_FOUND, "not_found", format!("no token {id}")))
        }
        Err(e) => Err(e.into()),
    }
}

/// Applies a store change at once: caches dropped, revoked tokens' sessions closed.
async fn applied(gw: &Gateway) {
    let _ = gw.store().poll();
    gw.sweep_sessions().await;
}

/// The largest body the token endpoints take.
const TOKEN_BODY_LIMIT: usize = 64 * 1024;

/// Reads a management API body: 413 (or 400) in the management API's error format.
async fn admin_body(who: &Who, body: Body) -> Result<bytes::Bytes, Rejection> {
    let within = who.snapshot.config.limits.body_read_timeout;
    crate::gate::collect_body(body, TOKEN_BODY_LIMIT, within).await.map_err(|e| {
        let kind = match e {
            crate::gate::BodyError::TooLarge(_) => "payload_too_large",
            crate::gate::BodyError::TooSlow(_) => "request_timeout",
            crate::gate::BodyError::Unreadable => "invalid_request",
        };
        Rejection::api(e.status(), kind, e.to_string())
    })
}

/// `POST /admin/tokens`: issues a token (its secret only in this answer).
pub(crate) async fn create_token(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    admin(gw, "POST /admin/tokens", &headers, peer, async move |gw, who, entry| {
        let body = admin_body(&who, body).await?;
        let mut req: crate::store::TokenRequest = serde_json::from_slice(&body)
            .map_err(|e| Rejection::api(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
        // A tenant's admin issues tokens in its tenant.
        if req.tenant.is_none() {
            req.tenant = who.identity.tenant.clone();
        }
        let new = req.validate(&who.snapshot.config)?;
        if let Some(refusal) = beyond_caller(&who, &new) {
            entry.refuse("refused: beyond the caller's rights");
            return Err(Rejection::api(StatusCode::FORBIDDEN, "forbidden", refusal));
        }
        let (t, secret) = open_store(&gw).and_then(|s| s.create(&new, crate::store::now_ms()))?;
        applied(&gw).await;
        Ok::<_, Rejection>(json_value(StatusCode::CREATED, &token_json(&t, Some(&secret))))
    })
    .await
}

/// Why a token to issue would have rights its issuer lacks, if it would.
fn beyond_caller(who: &Who, new: &crate::store::NewToken) -> Option<String> {
    let me = &who.identity;
    if let Some(own) = &me.tenant
        && *own != new.tenant
    {
        return Some(format!("a token of tenant {own:?} can only issue tokens in that tenant"));
    }
    if new.role == crate::credentials::Role::Metrics {
        let names: Vec<String> = who.snapshot.config.servers.iter().map(|s| s.name.clone()).collect();
        if !me.reads_metrics(&names) || me.role != crate::credentials::Role::Admin {
            return Some(
                "only an admin with every right may issue a metrics token (it reads gateway-wide figures)".into(),
            );
        }
    }
    let grants = who.snapshot.auth.effective_grants(&new.name, Some(&new.tenant), new.grants.grants());
    if !me.grants.covers(&grants) {
        return Some(
            "a token can only issue tokens with a subset of its own grants (servers, tools, prompts, resources)".into(),
        );
    }
    if let Some(mine) = me.expires {
        let ends = new.ttl.and_then(|t| std::time::SystemTime::now().checked_add(t));
        if ends.is_none_or(|e| e > mine) {
            return Some("a token can only issue tokens that end no later than itself".into());
        }
    }
    None
}

/// `GET /admin/tokens`.
pub(crate) async fn list_tokens(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    admin(gw, "GET /admin/tokens", &headers, peer, async move |gw, who, _| {
        match open_store(&gw).and_then(|s| s.list()) {
            Ok(tokens) => {
                let visible: Vec<Value> =
                    tokens.iter().filter(|t| manages(&who, t)).map(|t| token_json(t, None)).collect();
                json_value(StatusCode::OK, &json!({ "tokens": visible }))
            }
            Err(e) => store_error(e),
        }
    })
    .await
}

/// `GET /admin/consents`: the consents people gave OAuth clients (a tenant's admin sees its
/// tenant's).
pub(crate) async fn list_consents(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    admin(gw, "GET /admin/consents", &headers, peer, async move |gw, who, _| {
        let own = who.identity.tenant.clone();
        match open_store(&gw).and_then(|s| s.oauth_consents()) {
            Ok(all) => {
                let visible: Vec<&crate::store::Consent> =
                    all.iter().filter(|c| own.as_deref().is_none_or(|t| t == c.tenant)).collect();
                json_value(StatusCode::OK, &json!({ "consents": visible }))
            }
            Err(e) => store_error(e),
        }
    })
    .await
}

/// `DELETE /admin/consents/{id}`: withdraws a consent and revokes the tokens it let the client
/// have (their sessions end at once).
pub(crate) async fn withdraw_consent(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    admin(gw, "DELETE /admin/consents/{id}", &headers, peer, async move |gw, who, _| {
        let done =
            open_store(&gw).and_then(|s| s.oauth_withdraw(&id, who.identity.tenant.as_deref(), crate::store::now_ms()));
        let c = match done {
            Ok(c) => c,
            Err(crate::store::StoreError::Invalid(_)) => {
                return Err(Rejection::api(StatusCode::NOT_FOUND, "not_found", format!("no consent {id}")));
            }
            Err(e) => return Err(e.into()),
        };
        applied(&gw).await;
        Ok::<_, Rejection>(json_value(StatusCode::OK, &serde_json::to_value(&c).unwrap_or_default()))
    })
    .await
}

/// `GET /admin/tokens/{id}`.
pub(crate) async fn get_token(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    admin(gw, "GET /admin/tokens/{id}", &headers, peer, async move |gw, who, _| {
        managed(&gw, &who, &id).map(|t| json_value(StatusCode::OK, &token_json(&t, None)))
    })
    .await
}

/// `POST /admin/tokens/{id}/rotate` with `{"grace":"24h"}`.
pub(crate) async fn rotate_token(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    admin(gw, "POST /admin/tokens/{id}/rotate", &headers, peer, async move |gw, who, _| {
        managed(&gw, &who, &id)?;
        let body = admin_body(&who, body).await?;
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Rotate {
            #[serde(default)]
            grace: Option<String>,
        }
        let grace = if body.iter().all(u8::is_ascii_whitespace) {
            None
        } else {
            serde_json::from_slice::<Rotate>(&body)
                .map_err(|e| Rejection::api(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?
                .grace
        };
        let grace = crate::store::parse_span(grace.as_deref().unwrap_or("24h"))
            .map_err(|e| Rejection::api(StatusCode::BAD_REQUEST, "invalid_request", e.to_string()))?;
        let (t, secret) = open_store(&gw).and_then(|s| s.rotate(&id, grace, crate::store::now_ms()))?;
        applied(&gw).await;
        Ok::<_, Rejection>(json_value(StatusCode::OK, &token_json(&t, Some(&secret))))
    })
    .await
}

/// `DELETE /admin/tokens/{id}`: revokes (the row stays); effective at once.
pub(crate) async fn revoke_token(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    admin(gw, "DELETE /admin/tokens/{id}", &headers, peer, async move |gw, who, _| {
        managed(&gw, &who, &id)?;
        let t = open_store(&gw).and_then(|s| s.revoke(&id, crate::store::now_ms()))?;
        applied(&gw).await;
        Ok::<_, Rejection>(json_value(StatusCode::OK, &token_json(&t, None)))
    })
    .await
}
