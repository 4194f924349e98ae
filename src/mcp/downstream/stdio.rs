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

use axum::http::StatusCode;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::auth::Identity;
use crate::gate::Entry;
use crate::mcp::gateway::{Ctx, Gateway, Snapshot, Who};
use crate::mcp::jsonrpc::{self, Envelope, Kind, OwnedRequest, RawObject, code};
use crate::mcp::lines::{Line, Lines};
use crate::mcp::session::{Caller, ClientTransport, Scope, Session};
use crate::mcp::version::ProtocolVersion;

/// The one stdio client: its session, identity and the channel to stdout.
struct Client {
    gw: Arc<Gateway>,
    scope: Scope,
    identity: Arc<Identity>,
    session: Arc<Session>,
    tx: mpsc::Sender<Bytes>,
}

impl Client {
    /// The audit entry of one line (the one client is local: its address is loopback).
    fn entry(&self) -> Entry {
        let mut e = Entry::open(IpAddr::V4(Ipv4Addr::LOCALHOST), "");
        e.identify(&self.identity);
        e
    }

    /// The context of one message: one snapshot per message, so what a reload changes applies
    /// from the next message on.
    fn ctx(&self, snapshot: &Arc<Snapshot>, caller: Caller, version: ProtocolVersion) -> Ctx {
        let snapshot = snapshot.clone();
        let who = Who {
            snapshot,
            identity: self.identity.clone(),
            client: IpAddr::V4(Ipv4Addr::LOCALHOST),
            subject_token: None,
        };
        who.ctx(self.scope.clone(), caller, version)
    }

    fn in_session(&self) -> Caller {
        Caller::in_session(&self.session)
    }

    async fn send(&self, msg: String) {
        let _ = self.tx.send(Bytes::from(msg)).await;
    }

    /// Answers a line that is not one message with an error line, and audits the refusal.
    async fn refuse(&self, answer: String, why: &str, mut entry: Entry) {
        self.send(answer).await;
        entry.refuse(why);
        entry.write(&self.gw, StatusCode::BAD_REQUEST);
    }

    /// One line from stdin; `entry` was opened when it arrived.
    async fn line(&self, line: Line, entry: Entry) {
        let snap = self.gw.snapshot();
        let max = snap.config.max_body_bytes;
        let line = match line {
            Line::Text(l) => l,
            Line::TooLong => {
                let msg = format!("message longer than {max} bytes (max_body_bytes); skipped");
                let answer = jsonrpc::error_response(None, code::INVALID_REQUEST, &msg, None);
                return self.refuse(answer, "refused: message too long", entry).await;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        if jsonrpc::is_array(&line) {
            let answer = jsonrpc::error_response(None, code::INVALID_REQUEST, "batches are not supported", None);
            return self.refuse(answer, "refused: batch", entry).await;
        }
        match Envelope::parse(&line) {
            Ok(env) => self.message(&snap, &env, entry).await,
            Err(e) => {
                let answer = jsonrpc::error_response(e.id(), e.code(), &e.to_string(), None);
                self.refuse(answer, "refused: invalid message", entry).await;
            }
        }
    }

    /// One message: `initialize` answered here, a request answered when its reply comes (other
    /// lines keep flowing), notifications and responses delivered at once; one audit record
    /// each.
    async fn message(&self, snap: &Arc<Snapshot>, env: &Envelope<'_>, mut entry: Entry) {
        entry.message(env);
        if env.kind == Kind::Request && env.method() == "initialize" {
            let params = env.params.and_then(|p| RawObject::parse(p).ok());
            if let Some(caps) = params.as_ref().and_then(|o| o.get("capabilities")) {
                self.session.set_capabilities(caps.get());
            }
            let version = ProtocolVersion::negotiate(params.and_then(|o| o.get_str("protocolVersion")).as_deref());
            let result =
                self.gw.initialize_result(&snap.config, &self.scope, version, &self.in_session(), &self.identity).await;
            entry.write(&self.gw, StatusCode::OK);
            self.send(jsonrpc::result_response(env.id.map_or("null", RawValue::get), &result)).await;
            return;
        }
        if env.kind != Kind::Request {
            let ctx = self.ctx(snap, self.in_session(), self.session.protocol_version);
            self.gw.handle(&ctx, env, entry.routed()).await;
            entry.write(&self.gw, StatusCode::ACCEPTED);
            return;
        }
        let ctx = if env.method() == "server/discover" || is_stateless(env) {
            // Stateless: related messages go out on stdout with the answer.
            let caller = Caller { related: Some(self.tx.clone()), cancel_on_drop: true, ..Caller::default() };
            self.ctx(snap, caller, ProtocolVersion::STATELESS)
        } else {
            self.ctx(snap, self.in_session(), self.session.protocol_version)
        };
        let req = OwnedRequest::from(env);
        let mut later = entry.deferred(&self.gw, StatusCode::OK);
        let (gw, tx) = (self.gw.clone(), self.tx.clone());
        tokio::spawn(async move {
            let reply = gw.handle(&ctx, &req.envelope(), later.routed()).await;
            later.finish(StatusCode::OK);
            if let Some(reply) = reply {
                let _ = tx.send(Bytes::from(reply.to_message(req.id()))).await;
            }
        });
    }
}

/// Serves one client on stdin/stdout until stdin closes.
pub(crate) async fn serve(gw: Arc<Gateway>, scope: Scope, identity: Arc<Identity>) -> std::io::Result<()> {
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
    let _ = session.attach_stream(tx.clone());
    gw.add_session(session.clone(), &gw.config().limits).map_err(std::io::Error::other)?;
    let client = Client { gw: gw.clone(), scope, identity, session: session.clone(), tx };
    let mut lines = Lines::new(tokio::io::stdin(), gw.config().max_body_bytes);
    while let Some(line) = lines.next().await {
        let entry = client.entry();
        client.line(line, entry).await;
    }
    gw.end_session_as(&session.id, crate::mcp::gateway::EndCause::Closed).await;
    gw.shutdown().await;
    drop(client);
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
