//! The 2024-11-05 HTTP+SSE transport for clients: `GET /sse` (or a server's own `/sse`) opens
//! a stream whose first event names `POST /messages/?session_id=…`; messages POSTed there are
//! answered 202 and their responses arrive on the stream.
//!
//! Invariants: the session id is sealed ([`crate::mcp::sealed`], under a purpose of its own, so
//! it never opens as a session-era id) and bound to the identity that opened the stream
//! (another identity's POST gets 404, exactly like an unknown id), so a POST may land on any
//! replica: answers go to the stream through the shared state; closing the stream ends the
//! session and cancels its calls still in flight upstream; one JSON-RPC message per POST (an
//! array is 400, -32600); every POST is authenticated and audited when its answer is sent.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::http::{EndSession, sse_response, stream_with_keepalive};
use crate::gate::{Entry, Rejection, guarded, no_randomness, parse, read_single, session_limit};
use crate::mcp::gateway::Gateway;
use crate::mcp::jsonrpc::{self, Kind, OwnedRequest, RawObject, code};
use crate::mcp::session::{Caller, ClientTransport, Scope, Session};
use crate::mcp::sse;
use crate::mcp::version::ProtocolVersion;

/// The version a legacy SSE session speaks until `initialize` says otherwise.
const SSE_VERSION: ProtocolVersion = ProtocolVersion::V2024_11_05;

/// `GET /sse`: opens a session and its stream.
pub(crate) async fn open(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    scope: Scope,
    headers: HeaderMap,
) -> Response {
    guarded(&gw.clone(), &scope.clone(), "GET", &headers, peer, async move |who, _: &mut Entry| {
        let id = match gw.seal_session_id(&who.identity, &scope, SSE_VERSION, None, ClientTransport::Sse) {
            Ok(id) => id,
            Err(crate::vault::VaultError::NoRandomness(e)) => return no_randomness(None, &e),
            Err(e) => {
                tracing::error!(error = %e, "cannot seal a session id");
                let body = r#"{"error":"internal","message":"cannot open a session now"}"#;
                return (StatusCode::INTERNAL_SERVER_ERROR, [("content-type", "application/json")], body)
                    .into_response();
            }
        };
        let session = Session::with_id(id, scope, SSE_VERSION, ClientTransport::Sse, who.identity.clone());
        let session = match gw.add_session(session, &who.snapshot.config.limits) {
            Ok(s) => s,
            Err(e) => return session_limit(None, &e),
        };
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        // Heard from every replica before the client learns where to POST.
        session.attach_stream_heard(tx).await;
        let endpoint = format!("/messages/?session_id={}", session.id);
        let end = EndSession::new(gw.clone(), session.id.clone());
        let first = futures_util::stream::once(async move { Ok(sse::named("endpoint", &endpoint)) });
        let stream = first.chain(stream_with_keepalive(rx, session.closed.clone())).map(move |chunk| {
            let _ = &end; // held by the stream: the stream going away ends the session
            chunk
        });
        sse_response(stream, None)
    })
    .await
}

/// The session id of a legacy SSE POST: `session_id` (Python servers) or `sessionId` (TypeScript).
#[derive(serde::Deserialize)]
pub(crate) struct SessionQuery {
    session_id: Option<String>,
    #[serde(rename = "sessionId")]
    session_id_camel: Option<String>,
}

/// `POST /messages/?session_id=…` (or `sessionId`).
pub(crate) async fn message(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(q): Query<SessionQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let session_id = q.session_id.or(q.session_id_camel);
    // The gate checks the credential for the endpoint the session was opened at (a session of
    // `/servers/NAME/sse` is that server's resource), so a token is accepted here only where it
    // could have opened the session. The session is looked up again, for this identity, behind
    // the gate: an id that is unknown, or of another identity, is 404 there.
    let held = session_id.as_deref().and_then(|id| gw.session(id)).filter(|s| s.transport == ClientTransport::Sse);
    let scope = match &held {
        Some(s) => s.scope.clone(),
        // Opened on another replica: the endpoint it was opened at is in its sealed id.
        None => session_id.as_deref().and_then(|id| gw.sealed_sse_scope(id)).unwrap_or(Scope::All),
    };
    guarded(&gw.clone(), &scope.clone(), "POST", &headers, peer, async move |who, entry| {
        // The session, and whether it was reopened here from its sealed id just now.
        let found = match &session_id {
            Some(id) => match gw.session(id) {
                Some(s) => Some((s, false)),
                None => {
                    let limits = &who.snapshot.config.limits;
                    let s = gw.reopen_session(id, &scope, &who.identity, limits, ClientTransport::Sse).await;
                    s.map(|s| (s, true))
                }
            },
            None => None,
        };
        let found =
            found.filter(|(s, _)| s.transport == ClientTransport::Sse && s.identity.same_principal(&who.identity));
        let Some((session, reopened)) = found else {
            return Err(Rejection::rpc(StatusCode::NOT_FOUND, None, code::INVALID_REQUEST, "Session not found"));
        };
        // Its answers go to its stream: only while a replica holds it, never a 202 whose answer
        // nobody hears (after a restart, without Redis, or when the replica holding it was
        // killed and never said it closed). When Redis cannot say, a session served here
        // before goes on; one reopened just now does not.
        if !session.holds_stream() {
            let held = match session.stream_holders().await {
                Some(n) => n > 0,
                None => !reopened && session.relayed(),
            };
            if !held {
                gw.end_session_as(&session.id, crate::mcp::gateway::EndCause::Closed).await;
                return Err(Rejection::rpc(StatusCode::NOT_FOUND, None, code::INVALID_REQUEST, "Session not found"));
            }
        }
        session.renew(&who.identity);
        let config = who.snapshot.config.clone();
        let body = read_single(body, config.max_body_bytes, config.limits.body_read_timeout).await?;
        let env = parse(&body, entry)?;
        let caller = Caller::in_session(&session);
        if env.kind == Kind::Request && env.method() == "initialize" {
            let requested =
                env.params.and_then(|p| RawObject::parse(p).ok()).and_then(|o| o.get_str("protocolVersion"));
            if let Some(caps) = env.params.and_then(|p| RawObject::parse(p).ok()).and_then(|o| o.get("capabilities")) {
                session.set_capabilities(caps.get());
                session.share_capabilities(caps.get()).await;
            }
            let version = ProtocolVersion::negotiate(requested.as_deref());
            let result = gw.initialize_result(&config, &session.scope, version, &caller, &who.identity).await;
            session.send(Bytes::from(jsonrpc::result_response(env.id.map_or("null", RawValue::get), &result)));
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        // The initialize may have been taken by another replica.
        session.learn_capabilities().await;
        let ctx = who.ctx(session.scope.clone(), caller, session.protocol_version);
        if env.kind != Kind::Request {
            gw.handle(&ctx, &env, entry.routed()).await;
            return Ok(StatusCode::ACCEPTED.into_response());
        }
        // Answered on the stream; the POST returns at once. The audit entry goes with the
        // answer and is written, with what routing found, before the answer is sent.
        let mut later = entry.defer(&gw, StatusCode::ACCEPTED);
        let req = OwnedRequest::from(&env);
        let gw = gw.clone();
        tokio::spawn(async move {
            let reply = gw.handle(&ctx, &req.envelope(), later.routed()).await;
            later.finish(StatusCode::ACCEPTED);
            if let Some(reply) = reply {
                let [head, payload, tail] = reply.to_chunks(req.id());
                let mut msg = Vec::with_capacity(head.len() + payload.len() + tail.len());
                msg.extend_from_slice(&head);
                msg.extend_from_slice(&payload);
                msg.extend_from_slice(&tail);
                session.send(Bytes::from(msg));
            }
        });
        Ok(StatusCode::ACCEPTED.into_response())
    })
    .await
}
