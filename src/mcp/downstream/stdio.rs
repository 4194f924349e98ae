//! Portcullis as a local MCP server on stdin/stdout (`portcullis stdio`), so a desktop client
//! can launch it as a command: aggregated or one server, both eras (`initialize` for a session,
//! `server/discover` and 2026-07-28 `_meta` for stateless requests).
//!
//! Invariants: stdout carries only protocol, one JSON-RPC message per line (logs and audit
//! records go to stderr); no token is checked (the launching process is the only client), but
//! `--as NAME` applies a configured identity's grants; end of stdin ends the session and stops
//! every upstream.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use axum::http::StatusCode;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::auth::Identity;
use crate::mcp::gateway::{Ctx, Gateway, Note, Request};
use crate::mcp::jsonrpc::{self, Envelope, Kind, RawObject, code};
use crate::mcp::lines::{Line, Lines};
use crate::mcp::session::{Caller, ClientTransport, Scope, Session};
use crate::mcp::version::ProtocolVersion;
use crate::sharded::lock;

/// Serves one client on stdin/stdout until stdin closes.
pub async fn serve(gw: Arc<Gateway>, scope: Scope, identity: Arc<Identity>) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    let writer = tokio::spawn(async move {
        let mut out = tokio::io::stdout();
        while let Some(msg) = rx.recv().await {
            let mut line = msg.to_vec();
            line.retain(|b| *b != b'\n');
            line.push(b'\n');
            if out.write_all(&line).await.is_err() || out.flush().await.is_err() {
                break;
            }
        }
    });
    let session =
        Session::new(scope.clone(), ProtocolVersion::LATEST_SESSION, ClientTransport::Stdio, identity.clone())
            .map_err(std::io::Error::other)?;
    session.attach_stream(tx.clone());
    gw.add_session(session.clone(), &gw.config().limits).map_err(std::io::Error::other)?;
    // Each message gets its audit note (the one client is local: its address is loopback).
    let note_for = |method: &str, id: Option<&str>| {
        let note = Note {
            identity: Some(identity.clone()),
            method: method.to_owned(),
            request_id: id.map(str::to_owned),
            ..Note::default()
        };
        Arc::new(std::sync::Mutex::new(note))
    };
    let record = |gw: &Gateway, note: &Arc<std::sync::Mutex<Note>>, status: StatusCode, started: (String, Instant)| {
        crate::gate::audit(gw, started.0, IpAddr::V4(Ipv4Addr::LOCALHOST), &lock(note), status, started.1);
    };
    // One snapshot per message: what a reload changes applies from the next message on.
    let ctx_for = |caller: Caller, version: ProtocolVersion, note: Arc<std::sync::Mutex<Note>>| Ctx {
        snapshot: gw.snapshot(),
        scope: scope.clone(),
        caller,
        protocol_version: version,
        identity: identity.clone(),
        note,
    };
    let max = gw.config().max_body_bytes;
    let mut lines = Lines::new(tokio::io::stdin(), max);
    while let Some(line) = lines.next().await {
        let send = |msg: String| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Bytes::from(msg)).await;
            }
        };
        let started = (crate::audit::now_rfc3339(), Instant::now());
        let refused = |why: &str| {
            let note = note_for("", None);
            lock(&note).refused = Some(why.to_owned());
            record(&gw, &note, StatusCode::BAD_REQUEST, started.clone());
        };
        let line = match line {
            Line::Text(l) => l,
            Line::TooLong => {
                let msg = format!("message longer than {max} bytes (max_body_bytes); skipped");
                send(jsonrpc::error_response(None, code::INVALID_REQUEST, &msg, None)).await;
                refused("refused: message too long");
                continue;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if jsonrpc::is_array(&line) {
            send(jsonrpc::error_response(None, code::INVALID_REQUEST, "batches are not supported", None)).await;
            refused("refused: batch");
            continue;
        }
        let env = match Envelope::parse(&line) {
            Ok(e) => e,
            Err(e) => {
                send(jsonrpc::error_response(e.id(), e.code(), &e.to_string(), None)).await;
                refused("refused: invalid message");
                continue;
            }
        };
        let note = note_for(env.method(), env.id.map(RawValue::get));
        let stateless = env.method() == "server/discover" || is_stateless(&env);
        match env.kind {
            Kind::Request if env.method() == "initialize" => {
                let params = env.params.and_then(|p| RawObject::parse(p).ok());
                if let Some(caps) = params.as_ref().and_then(|o| o.get("capabilities")) {
                    session.set_capabilities(caps.get());
                }
                let version = ProtocolVersion::negotiate(params.and_then(|o| o.get_str("protocolVersion")).as_deref());
                let caller = Caller { session: Some(session.clone()), ..Caller::default() };
                let result = gw.initialize_result(&gw.config(), &scope, version, &caller, &identity).await;
                send(jsonrpc::result_response(env.id.map_or("null", RawValue::get), &result)).await;
                record(&gw, &note, StatusCode::OK, started);
            }
            Kind::Request => {
                let (caller, version) = if stateless {
                    // Stateless: related messages go out on stdout with the answer.
                    (
                        Caller { related: Some(tx.clone()), cancel_on_drop: true, ..Caller::default() },
                        ProtocolVersion::STATELESS,
                    )
                } else {
                    (Caller { session: Some(session.clone()), ..Caller::default() }, session.protocol_version)
                };
                let ctx = ctx_for(caller, version, note.clone());
                let id = env.id.map_or("null", RawValue::get).to_owned();
                let method = env.method().to_owned();
                let params: Option<Box<RawValue>> = env.params.map(ToOwned::to_owned);
                let gw = gw.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let r = Request { method: &method, params: params.as_deref(), id: Some(&id) };
                    let reply = gw.request(&ctx, &r).await;
                    let _ = tx.send(Bytes::from(reply.to_message(&id))).await;
                    record(&gw, &note, StatusCode::OK, started);
                });
            }
            Kind::Notification => {
                let caller = Caller { session: Some(session.clone()), ..Caller::default() };
                gw.notification(&ctx_for(caller, session.protocol_version, note.clone()), &env);
                record(&gw, &note, StatusCode::ACCEPTED, started);
            }
            Kind::Result | Kind::Error => {
                let caller = Caller { session: Some(session.clone()), ..Caller::default() };
                gw.response(&ctx_for(caller, session.protocol_version, note.clone()), &env);
                record(&gw, &note, StatusCode::ACCEPTED, started);
            }
        }
    }
    gw.end_session_as(&session.id, crate::mcp::gateway::EndCause::Closed).await;
    gw.shutdown().await;
    drop(tx);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer).await;
    Ok(())
}

fn is_stateless(env: &Envelope<'_>) -> bool {
    env.params
        .and_then(|p| RawObject::parse(p).ok())
        .and_then(|o| {
            o.get("_meta")
                .and_then(|m| RawObject::parse(m).ok())
                .and_then(|m| m.get_str(crate::mcp::downstream::http::PROTOCOL_VERSION_META))
        })
        .is_some_and(|v| ProtocolVersion::parse(&v).is_some_and(ProtocolVersion::is_stateless))
}
