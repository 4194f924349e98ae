//! Parked 2026-07-28 calls across replicas. A `requestState` Portcullis mints names the
//! replica holding the parked call (its tag in the shared state); a retry that lands on another
//! replica is sent there over Redis, resumed there, and its reply comes back to the replica the
//! client is waiting on.
//!
//! Invariants: a parked call resumes only for the principal it was parked for, on the server
//! and method it was parked on (else it stays parked, and the retry hears "unknown"); a
//! forwarded retry waits no longer than the server's timeout and a margin, and not at all when
//! no replica listens for the holder's tag (it is gone, and its calls with it); a retry whose
//! client went away is cancelled on the holder too; nothing here carries a credential (the
//! principal is an identity key, the token a random name).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::Upstream;
use crate::mcp::jsonrpc::{self, Reply, code};
use crate::sharded::lock;
use crate::state::SharedState;

/// What a replica holding parked calls hears from the others.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Heard {
    /// A retry of a call parked here, received by the replica `from` as its `n`th.
    Retry {
        from: u64,
        n: u64,
        /// The token after the prefix (tag included).
        token: String,
        server: String,
        method: String,
        principal: Option<String>,
        /// The retry's `inputResponses` (raw JSON), if any.
        responses: Option<String>,
    },
    /// The client of retry `n` from `from` went away.
    Cancel { from: u64, n: u64 },
}

/// The reply to a forwarded retry.
#[derive(serde::Serialize, serde::Deserialize)]
struct Resumed {
    n: u64,
    is_error: bool,
    stateless: bool,
    /// Which members the result is written with (see [`EXTRAS`]).
    extra: u8,
    payload: String,
}

/// The `Reply::extra` values a reply can carry, by index.
const EXTRAS: [&str; 3] = ["", jsonrpc::STATELESS_COMPLETE, jsonrpc::STATELESS_CACHEABLE];

/// How much longer than the server's timeout a forwarded retry waits for its reply (the
/// holder answers a timeout itself at the call's deadline).
const MARGIN: Duration = Duration::from_secs(1);

/// The gateway's parked calls and the retries it relays.
#[derive(Default)]
pub(crate) struct Parking {
    relay: OnceLock<Arc<SharedState>>,
    /// Calls parked here, by token, with the instance holding each (kept only with a relay:
    /// without one, a retry finds its call through the instance it is routed to).
    here: Mutex<HashMap<String, Weak<Upstream>>>,
    /// Retries sent to the replica holding their call, waiting for its reply.
    waiting: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next: AtomicU64,
    /// Retries from other replicas running here, by (their tag, their n).
    running: Mutex<HashMap<(u64, u64), tokio::task::AbortHandle>>,
}

impl Parking {
    /// Relays retries through `state`, and hears those for calls parked here.
    pub(crate) fn relay_through(self: &Arc<Self>, state: &Arc<SharedState>) {
        if self.relay.set(state.clone()).is_err() {
            return;
        }
        let tag = state.tag();
        let mut retries = state.subscribe(retries_channel(state, tag));
        let mut replies = state.subscribe(replies_channel(state, tag));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    Some(msg) = retries.rx.recv() => {
                        let Some(parking) = weak.upgrade() else { return };
                        parking.heard(&msg);
                    }
                    Some(msg) = replies.rx.recv() => {
                        let Some(parking) = weak.upgrade() else { return };
                        parking.replied(&msg);
                    }
                    else => return,
                }
            }
        });
    }

    /// This replica's tag in the tokens it mints (0 without a relay).
    pub(super) fn tag(&self) -> u64 {
        self.relay.get().map_or(0, |s| s.tag())
    }

    /// Notes a call parked here under `token` (for retries from other replicas).
    pub(super) fn parked(&self, token: &str, up: &Arc<Upstream>) {
        if self.relay.get().is_some() {
            lock(&self.here).insert(token.to_owned(), Arc::downgrade(up));
        }
    }

    /// A call parked here under `token` resumed or expired.
    pub(super) fn unparked(&self, token: &str) {
        if self.relay.get().is_some() {
            lock(&self.here).remove(token);
        }
    }

    /// Sends a retry to the replica `tag` holding its call and waits for that replica's reply.
    pub(super) async fn resume_elsewhere(&self, tag: u64, retry: Retry<'_>, wait: Duration) -> Reply {
        let Some(state) = self.relay.get() else { return unknown() };
        let channel = retries_channel(state, tag);
        match state.listeners(&channel).await {
            Ok(0) => return unknown(),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "a parked call's replica cannot be reached");
                return Reply::error(code::UPSTREAM_ERROR, "the replica holding this call cannot be reached now");
            }
        }
        let from = state.tag();
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.waiting).insert(n, tx);
        let mut guard = Waiting { parking: self, state, tag, n, armed: true };
        let heard = Heard::Retry {
            from,
            n,
            token: retry.token.to_owned(),
            server: retry.server.to_owned(),
            method: retry.method.to_owned(),
            principal: retry.principal.map(str::to_owned),
            responses: retry.responses.map(str::to_owned),
        };
        let Ok(msg) = serde_json::to_vec(&heard) else { return unknown() };
        if !state.publish(channel, Bytes::from(msg)) {
            return Reply::error(code::UPSTREAM_ERROR, "the replica holding this call cannot be reached now");
        }
        match tokio::time::timeout(wait + MARGIN, rx).await {
            Ok(Ok(reply)) => {
                guard.armed = false;
                reply
            }
            _ => Reply::error(code::UPSTREAM_ERROR, "the replica holding this call did not answer in time"),
        }
    }

    /// A retry (or its cancellation) from another replica.
    fn heard(self: &Arc<Self>, msg: &[u8]) {
        let Some(state) = self.relay.get() else { return };
        match serde_json::from_slice::<Heard>(msg) {
            Ok(Heard::Cancel { from, n }) => {
                if let Some(task) = lock(&self.running).remove(&(from, n)) {
                    task.abort();
                }
            }
            Ok(Heard::Retry { from, n, token, server, method, principal, responses }) => {
                let up = lock(&self.here).get(&token).and_then(Weak::upgrade);
                let reply_to = replies_channel(state, from);
                let Some(up) = up.filter(|up| up.def.name == server) else {
                    publish_reply(state, reply_to, n, &unknown());
                    return;
                };
                let weak = Arc::downgrade(self);
                let state = state.clone();
                // Held while spawning, so the task's own removal comes after the insert.
                let mut running = lock(&self.running);
                let task = tokio::spawn(async move {
                    let principal: Option<Arc<str>> = principal.map(Arc::from);
                    let caller = super::Caller { cancel_on_drop: true, principal, ..super::Caller::default() };
                    let reply = match up.resume(&token, &method, responses.as_deref(), &caller).await {
                        Ok(r) => r,
                        Err(e) => e.to_reply(),
                    };
                    if let Some(parking) = weak.upgrade() {
                        lock(&parking.running).remove(&(from, n));
                    }
                    publish_reply(&state, reply_to, n, &reply);
                });
                running.insert((from, n), task.abort_handle());
            }
            Err(e) => tracing::debug!(error = %e, "an unreadable parked-call message"),
        }
    }

    /// The reply to a retry this replica forwarded.
    fn replied(&self, msg: &[u8]) {
        let Ok(r) = serde_json::from_slice::<Resumed>(msg) else { return };
        let Some(tx) = lock(&self.waiting).remove(&r.n) else { return };
        let mut reply = Reply::owned(r.payload, r.is_error);
        reply.stateless = r.stateless;
        reply.extra = EXTRAS.get(usize::from(r.extra)).copied().unwrap_or("");
        let _ = tx.send(reply);
    }
}

/// A retry's parts, as the replica it landed on read them.
pub(super) struct Retry<'a> {
    pub token: &'a str,
    pub server: &'a str,
    pub method: &'a str,
    pub principal: Option<&'a str>,
    pub responses: Option<&'a str>,
}

/// A forwarded retry still waiting: dropped early (its client went away), it is cancelled on
/// the holder.
struct Waiting<'a> {
    parking: &'a Parking,
    state: &'a Arc<SharedState>,
    tag: u64,
    n: u64,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(&self.parking.waiting).remove(&self.n);
        if self.armed
            && let Ok(msg) = serde_json::to_vec(&Heard::Cancel { from: self.state.tag(), n: self.n })
        {
            self.state.publish(retries_channel(self.state, self.tag), Bytes::from(msg));
        }
    }
}

/// The answer to a retry whose call is not (or no longer) parked, or not for this caller.
pub(super) fn unknown() -> Reply {
    Reply::error(code::INVALID_PARAMS, "requestState is unknown or has expired")
}

fn publish_reply(state: &SharedState, channel: String, n: u64, reply: &Reply) {
    let extra = EXTRAS.iter().position(|e| *e == reply.extra).unwrap_or(0);
    let resumed = Resumed {
        n,
        is_error: reply.is_error,
        stateless: reply.stateless,
        extra: u8::try_from(extra).unwrap_or(0),
        payload: reply.payload_str().to_owned(),
    };
    if let Ok(msg) = serde_json::to_vec(&resumed) {
        state.publish(channel, Bytes::from(msg));
    }
}

/// Where the replica `tag` hears retries of the calls it parked.
fn retries_channel(state: &SharedState, tag: u64) -> String {
    state.key(format_args!("parked:{tag:x}"))
}

/// Where the replica `tag` hears the replies to retries it forwarded.
fn replies_channel(state: &SharedState, tag: u64) -> String {
    state.key(format_args!("resumed:{tag:x}"))
}
