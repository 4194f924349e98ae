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

/// Type of an audit note shared with a spawned answer.
type SharedNote = Arc<std::sync::Mutex<Note>>;

/// The one stdio client: its session, identity and the channel to stdout.
struct Client {
    gw: Arc<Gateway>,
    scope: Scope,
    identity: Arc<Identity>,
    session: Arc<Session>,
    tx: mpsc::Sender<Bytes>,
}

impl Client {
    /// An audit note for one message (the one client is local: its address is loopback).
    fn note(&self, method: &str, id: Option<&str>) -> SharedNote {
        let note = Note {
            identity: Some(self.identity.clone()),
            method: method.to_owned(),
            request_id: id.map(str::to_owned),
            ..Note::default()
        };
        Arc::new(std::sync::Mutex::new(note))
    }

    /// The gateway context of one message: one snapshot per message, so what a reload changes
    /// applies from the next message on.
    fn ctx(&self, caller: Caller, version: ProtocolVersion, note: SharedNote) -> Ctx {
        Ctx {
            snapshot: self.gw.snapshot(),
            scope: self.scope.clone(),
            caller,
            protocol_version: version,
            identity: self.identity.clone(),
            note,
        }
    }

    fn in_session(&self) -> Caller {
        Caller { session: Some(self.session.clone()), ..Caller::default() }
    }

    async fn send(&self, msg: String) {
        let _ = self.tx.send(Bytes::from(msg)).await;
    }

    /// Answers a line that is not one message with an error line, and audits the refusal.
    async fn refuse(&self, answer: String, why: &str, started: &(String, Instant)) {
        self.send(answer).await;
        let note = self.note("", None);
        lock(&note).refused = Some(why.to_owned());
        record(&self.gw, &note, StatusCode::BAD_REQUEST, started.clone());
    }

    /// One line from stdin.
    async fn line(&self, line: Line, started: (String, Instant)) {
        let max = self.gw.config().max_body_bytes;
        let line = match line {
            Line::Text(l) => l,
            Line::TooLong => {
                let msg = format!("message longer than {max} bytes (max_body_bytes); skipped");
                let answer = jsonrpc::error_response(None, code::INVALID_REQUEST, &msg, None);
                return self.refuse(answer, "refused: message too long", &started).await;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        if jsonrpc::is_array(&line) {
            let answer = jsonrpc::error_response(None, code::INVALID_REQUEST, "batches are not supported", None);
            return self.refuse(answer, "refused: batch", &started).await;
        }
        match Envelope::parse(&line) {
            Ok(env) => self.message(&env, started).await,
            Err(e) => {
                let answer = jsonrpc::error_response(e.id(), e.code(), &e.to_string(), None);
                self.refuse(answer, "refused: invalid message", &started).await;
            }
        }
    }

    /// One message: `initialize` answered here, a request answered when its reply comes (other
    /// lines keep flowing), notifications and responses routed at once; one audit record each.
    async fn message(&self, env: &Envelope<'_>, started: (String, Instant)) {
        let note = self.note(env.method(), env.id.map(RawValue::get));
        let version = self.session.protocol_version;
        match env.kind {
            Kind::Request if env.method() == "initialize" => {
                let params = env.params.and_then(|p| RawObject::parse(p).ok());
                if let Some(caps) = params.as_ref().and_then(|o| o.get("capabilities")) {
                    self.session.set_capabilities(caps.get());
                }
                let version = ProtocolVersion::negotiate(params.and_then(|o| o.get_str("protocolVersion")).as_deref());
                let config = self.gw.config();
                let result =
                    self.gw.initialize_result(&config, &self.scope, version, &self.in_session(), &self.identity).await;
                self.send(jsonrpc::result_response(env.id.map_or("null", RawValue::get), &result)).await;
                record(&self.gw, &note, StatusCode::OK, started);
            }
            Kind::Request => {
                let ctx = if env.method() == "server/discover" || is_stateless(env) {
                    // Stateless: related messages go out on stdout with the answer.
                    let caller = Caller { related: Some(self.tx.clone()), cancel_on_drop: true, ..Caller::default() };
                    self.ctx(caller, ProtocolVersion::STATELESS, note.clone())
                } else {
                    self.ctx(self.in_session(), version, note.clone())
                };
                let id = env.id.map_or("null", RawValue::get).to_owned();
                let method = env.method().to_owned();
                let params: Option<Box<RawValue>> = env.params.map(ToOwned::to_owned);
                let (gw, tx) = (self.gw.clone(), self.tx.clone());
                tokio::spawn(async move {
                    let r = Request { method: &method, params: params.as_deref(), id: Some(&id) };
                    let reply = gw.request(&ctx, &r).await;
                    let _ = tx.send(Bytes::from(reply.to_message(&id))).await;
                    record(&gw, &note, StatusCode::OK, started);
                });
            }
            Kind::Notification => {
                self.gw.notification(&self.ctx(self.in_session(), version, note.clone()), env);
                record(&self.gw, &note, StatusCode::ACCEPTED, started);
            }
            Kind::Result | Kind::Error => {
                self.gw.response(&self.ctx(self.in_session(), version, note.clone()), env);
                record(&self.gw, &note, StatusCode::ACCEPTED, started);
            }
        }
    }
}

fn record(gw: &Gateway, note: &SharedNote, status: StatusCode, started: (String, Instant)) {
    crate::gate::audit(gw, started.0, IpAddr::V4(Ipv4Addr::LOCALHOST), &lock(note), status, started.1);
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
    session.attach_stream(tx.clone());
    gw.add_session(session.clone(), &gw.config().limits).map_err(std::io::Error::other)?;
    let client = Client { gw: gw.clone(), scope, identity, session: session.clone(), tx };
    let mut lines = Lines::new(tokio::io::stdin(), gw.config().max_body_bytes);
    while let Some(line) = lines.next().await {
        client.line(line, (crate::audit::now_rfc3339(), Instant::now())).await;
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
