//! Downstream client sessions and the per-request caller context.
//!
//! A [`Session`] exists for session-based clients (2025 era, legacy SSE); stateless 2026-07-28
//! requests run with a [`Caller`] that has no session. Invariants: session ids are unguessable:
//! a session-era or legacy SSE id is sealed ([`crate::mcp::sealed`], with a 256-bit nonce),
//! the others are 256-bit values, all from the OS random source (no fallback); a message for a client goes on exactly one
//! stream (the request's own stream when it relates to a request, else the session's standalone
//! stream); routes for server-to-client requests are removed when answered or when the session
//! closes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::jsonrpc::Envelope;
use super::version::ProtocolVersion;
use crate::auth::Identity;
use crate::random::NoRandomness;
use crate::sharded::lock;

/// Which servers a downstream endpoint exposes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Scope {
    /// All servers, names prefixed (`/mcp`).
    All,
    /// One server, unchanged (`/servers/{name}/mcp`).
    One(String),
}

impl Scope {
    /// Whether the scope includes a server.
    pub(crate) fn includes(&self, server: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::One(s) => s == server,
        }
    }
}

/// The transport a session arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClientTransport {
    /// Streamable HTTP (2025 era).
    Streamable,
    /// HTTP+SSE (2024-11-05).
    Sse,
    /// `portcullis stdio`: the launching process is the one client.
    Stdio,
    /// A 2026-07-28 `subscriptions/listen` stream: a session in all but name, never addressable
    /// by id, living as long as the stream.
    Listen,
}

/// What a `subscriptions/listen` stream asked for.
#[derive(Debug, Clone, Default)]
pub(crate) struct ListenFilter {
    /// The listen request's id, raw JSON (carried as `subscriptionId`).
    pub id: Box<str>,
    /// `notifications/tools/list_changed` wanted.
    pub tools: bool,
    /// `notifications/prompts/list_changed` wanted.
    pub prompts: bool,
    /// `notifications/resources/list_changed` wanted.
    pub resources: bool,
}

/// `_meta` key naming the subscription a notification belongs to.
pub(crate) const SUBSCRIPTION_ID_META: &str = "io.modelcontextprotocol/subscriptionId";

/// What a session keeps of an upstream instance it has business with: the calls it has in
/// flight there (to cancel them) and the requests that instance asked its client (to answer
/// them). `upstream::Upstream` implements it, so this module does not depend on `upstream`.
pub(crate) trait Instance: Send + Sync {
    /// Sends the client's answer to a request the instance asked under `upstream_id`.
    fn answer(&self, upstream_id: &str, env: &Envelope<'_>);
    /// Cancels a call in flight (`notifications/cancelled` upstream).
    fn cancel(&self, id: u64, reason: Option<&str>);
}

/// A server-to-client request for a caller without a back-channel (a 2026-07-28 call on a
/// session-era upstream): it becomes an `InputRequiredResult`.
pub(crate) struct Ask {
    /// The id the upstream used, raw JSON.
    pub upstream_id: Box<str>,
    /// The server-to-client method (`sampling/createMessage`, `elicitation/create`, …).
    pub method: String,
    /// The params, raw.
    pub params: Option<Box<serde_json::value::RawValue>>,
}

/// Headers a client sent that go upstream as they are (`Mcp-Param-*`).
pub(crate) type ForwardHeaders = Arc<[(String, String)]>;

/// Where a server-to-client request must be answered.
pub(crate) enum ClientRequestRoute {
    /// Back to the upstream that asked, under the raw id it used.
    Upstream { upstream: Arc<dyn Instance>, upstream_id: Box<str> },
    /// To Portcullis itself (an era translation asking on an upstream's behalf): the client's
    /// whole answer message.
    Local(oneshot::Sender<Bytes>),
}

static NEXT_KEY: AtomicU64 = AtomicU64::new(1);

/// An upstream call in flight: the instance and the id it was sent under.
type InflightCall = (Arc<dyn Instance>, u64);

/// One downstream client session.
pub(crate) struct Session {
    /// The session id the client presents.
    pub id: String,
    /// A small process-unique key (cheap to compare and hash).
    pub key: u64,
    /// The servers this session sees.
    pub scope: Scope,
    /// The negotiated protocol version.
    pub protocol_version: ProtocolVersion,
    /// How the client reached it (decides which limits count it and how it is answered).
    pub transport: ClientTransport,
    /// The identity that opened it: only that identity may use it (others get 404), and it
    /// ends when that identity is revoked, expires (an access token's: unless a newer token
    /// renewed it, [`Session::renew`]) or loses the server.
    pub identity: Arc<Identity>,
    /// Cancelled when the session ends (DELETE, stream closed, shutdown).
    pub closed: CancellationToken,
    stream: Mutex<Option<mpsc::Sender<Bytes>>>,
    next_client_id: AtomicU64,
    client_requests: Mutex<HashMap<u64, ClientRequestRoute>>,
    inflight: Mutex<HashMap<Box<str>, InflightCall>>,
    subscriptions: Mutex<HashSet<(String, String)>>,
    capabilities: Mutex<Option<Box<str>>>,
    /// 0 while unset, else the `logging/setLevel` level's rank + 1.
    log_level: AtomicU8,
    listen: Option<ListenFilter>,
    /// When a request last used it (Unix ms).
    last_active: AtomicU64,
    /// Calls in flight on it.
    calls: Arc<std::sync::atomic::AtomicUsize>,
    /// For a session opened with an access token: the latest expiry (Unix ms, 0 for none) of a
    /// newer token of the same subject, issuer, grants and tenant used on it since (a client
    /// that refreshed its token keeps its session).
    renewed_until: AtomicU64,
    /// For a session opened with an issued token: a newer token of the same lineage, grants and
    /// tenant used on it since (an OAuth client's refreshed access token), whose state decides.
    renewed_token: Mutex<Option<String>>,
    /// With a shared state: the channel on which messages for its stream reach the replica
    /// holding the stream, wherever they were produced.
    relay: std::sync::OnceLock<Relay>,
}

/// How long a legacy SSE session's capabilities stay in the shared state (its id's lifetime).
const SHARED_CAPABILITIES_FOR: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A session's channel in the shared state ([`crate::state`]).
struct Relay {
    state: Arc<crate::state::SharedState>,
    channel: String,
}

/// One call in flight on a session; the count drops when it does.
pub(crate) struct CallSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The `logging/setLevel` levels, least severe first (RFC 5424 order).
pub(crate) const LOG_LEVELS: [&str; 8] =
    ["debug", "info", "notice", "warning", "error", "critical", "alert", "emergency"];

/// A log level's rank in [`LOG_LEVELS`].
pub(crate) fn log_rank(level: &str) -> Option<u8> {
    LOG_LEVELS.iter().position(|l| *l == level).and_then(|p| u8::try_from(p).ok())
}

impl Session {
    /// A new session with a fresh random id.
    pub(crate) fn new(
        scope: Scope,
        protocol_version: ProtocolVersion,
        transport: ClientTransport,
        identity: Arc<Identity>,
    ) -> Result<Arc<Self>, NoRandomness> {
        Ok(Self::build(crate::random::id()?, scope, protocol_version, transport, identity, None))
    }

    /// A session with a given id (a sealed one, [`crate::mcp::sealed`]).
    pub(crate) fn with_id(
        id: String,
        scope: Scope,
        protocol_version: ProtocolVersion,
        transport: ClientTransport,
        identity: Arc<Identity>,
    ) -> Arc<Self> {
        Self::build(id, scope, protocol_version, transport, identity, None)
    }

    /// The session behind one `subscriptions/listen` stream.
    pub(crate) fn listener(
        scope: Scope,
        protocol_version: ProtocolVersion,
        identity: Arc<Identity>,
        filter: ListenFilter,
    ) -> Result<Arc<Self>, NoRandomness> {
        Ok(Self::build(crate::random::id()?, scope, protocol_version, ClientTransport::Listen, identity, Some(filter)))
    }

    fn build(
        id: String,
        scope: Scope,
        protocol_version: ProtocolVersion,
        transport: ClientTransport,
        identity: Arc<Identity>,
        listen: Option<ListenFilter>,
    ) -> Arc<Self> {
        Arc::new(Session {
            identity,
            id,
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            scope,
            protocol_version,
            transport,
            closed: CancellationToken::new(),
            stream: Mutex::new(None),
            next_client_id: AtomicU64::new(1),
            client_requests: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            subscriptions: Mutex::new(HashSet::new()),
            capabilities: Mutex::new(None),
            log_level: AtomicU8::new(0),
            listen,
            last_active: AtomicU64::new(crate::store::now_ms().max(0).cast_unsigned()),
            calls: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
            renewed_until: AtomicU64::new(0),
            renewed_token: Mutex::new(None),
            relay: std::sync::OnceLock::new(),
        })
    }

    /// Carries its stream's messages across replicas through `state`: produced on a replica
    /// without its stream, they are published on the session's channel (named by a digest of
    /// its id), which the replica holding the stream hears.
    pub(crate) fn relay_through(&self, state: &Arc<crate::state::SharedState>) {
        let digest = crate::credentials::digest(&self.id);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        if self.relay.set(Relay { state: state.clone(), channel: state.key(format_args!("session:{hex}")) }).is_ok() {
            // Ids of server-to-client requests asked here carry this replica's tag.
            self.next_client_id.store(state.tag() << 32 | 1, Ordering::Relaxed);
        }
    }

    /// Tells the other replicas the capabilities its client declared at `initialize` (a legacy
    /// SSE id is made before it, so it cannot carry them): kept in the shared state for the
    /// id's lifetime, under the session's channel name.
    pub(crate) async fn share_capabilities(&self, raw: &str) {
        if let Some(relay) = self.relay.get()
            && let Err(e) = relay.state.remember(&format!("{}:caps", relay.channel), raw, SHARED_CAPABILITIES_FOR).await
        {
            tracing::debug!(error = %e, "a session's capabilities could not be shared");
        }
    }

    /// The capabilities another replica learnt at the client's `initialize`, when none are
    /// known here (none stay none: less is allowed, never more).
    pub(crate) async fn learn_capabilities(&self) {
        if lock(&self.capabilities).is_some() {
            return;
        }
        let Some(relay) = self.relay.get() else { return };
        if let Ok(Some(caps)) = relay.state.recall(&format!("{}:caps", relay.channel)).await
            && serde_json::from_str::<&serde_json::value::RawValue>(&caps).is_ok()
        {
            self.set_capabilities(&caps);
        }
    }

    /// Whether it relays through a shared state.
    pub(crate) fn relayed(&self) -> bool {
        self.relay.get().is_some()
    }

    /// Whether its stream is held here (and still open).
    pub(crate) fn holds_stream(&self) -> bool {
        lock(&self.stream).as_ref().is_some_and(|tx| !tx.is_closed())
    }

    /// How many replicas hear its channel now (None without a relay, or when the shared state
    /// cannot say).
    pub(crate) async fn stream_holders(&self) -> Option<u64> {
        let relay = self.relay.get()?;
        relay.state.listeners(&relay.channel).await.ok()
    }

    /// An answer to server-to-client request `n` that this replica did not ask: sent to the
    /// replica whose tag `n` carries (true), when there is a relay and it is another's.
    pub(crate) fn answer_elsewhere(&self, n: u64, msg: &[u8]) -> bool {
        let Some(relay) = self.relay.get() else { return false };
        let tag = n >> 32;
        if tag == 0 || tag == relay.state.tag() {
            return false;
        }
        let mut payload = Vec::with_capacity(self.id.len() + 1 + msg.len());
        payload.extend_from_slice(self.id.as_bytes());
        payload.push(b'\n');
        payload.extend_from_slice(msg);
        relay.state.publish(relay.state.answers_channel(tag), Bytes::from(payload))
    }

    /// Notes that a request used it now.
    pub(crate) fn touch(&self) {
        self.last_active.store(crate::store::now_ms().max(0).cast_unsigned(), Ordering::Relaxed);
    }

    /// A request on this session came with `by` (the same principal, checked by the caller):
    /// for an access token of the same issuer configuration, grants and tenant that lasts
    /// longer than any seen, the session lasts as long. Anything else changes nothing (a token
    /// with other grants is authorized by its own on each request, but never extends a session
    /// whose notifications are filtered by the grants it was opened with).
    pub(crate) fn renew(&self, by: &Identity) {
        // The common case, on every request of a session: the credential that opened it.
        if std::ptr::eq(by, &*self.identity) {
            return;
        }
        let same_authority = || by.grants == self.identity.grants && by.tenant == self.identity.tenant;
        if let (Some(mine), Some(theirs)) = (&self.identity.token_id, &by.token_id) {
            if mine != theirs {
                let mut renewed = lock(&self.renewed_token);
                if renewed.as_deref() != Some(theirs.as_str()) && same_authority() {
                    *renewed = Some(theirs.clone());
                }
            }
            return;
        }
        let (Some(mine), Some(theirs)) = (&self.identity.issuer, &by.issuer) else { return };
        let Some(until) = by.expires.and_then(|e| e.duration_since(std::time::UNIX_EPOCH).ok()) else { return };
        let ms = u64::try_from(until.as_millis()).unwrap_or(u64::MAX);
        if ms > self.renewed_until.load(Ordering::Relaxed) && **mine == **theirs && same_authority() {
            self.renewed_until.fetch_max(ms, Ordering::Relaxed);
        }
    }

    /// The issued token whose state decides whether the session lives: the newest one used on
    /// it ([`Session::renew`]), else the one that opened it.
    pub(crate) fn current_token(&self) -> Option<String> {
        lock(&self.renewed_token).clone().or_else(|| self.identity.token_id.clone())
    }

    /// Whether the credential behind it has expired at `now`: the identity that opened it,
    /// unless a renewal ([`Session::renew`]) lasts longer.
    pub(crate) fn credential_expired(&self, now: std::time::SystemTime) -> bool {
        if !self.identity.expired(now) {
            return false;
        }
        let renewed = self.renewed_until.load(Ordering::Relaxed);
        let now_ms =
            now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        renewed <= now_ms
    }

    /// Whether it has gone unused for `idle` at `now_ms`: no request since, no open stream,
    /// no call in flight.
    pub(crate) fn idle(&self, now_ms: i64, idle: std::time::Duration) -> bool {
        let last = self.last_active.load(Ordering::Relaxed);
        let since = now_ms.max(0).cast_unsigned().saturating_sub(last);
        u128::from(since) >= idle.as_millis() && self.calls.load(Ordering::Relaxed) == 0 && !self.has_stream()
    }

    /// Takes a slot for one call, unless `max` are in flight already.
    pub(crate) fn begin_call(&self, max: usize) -> Option<CallSlot> {
        let before = self.calls.fetch_add(1, Ordering::Relaxed);
        let slot = CallSlot(self.calls.clone());
        (before < max).then_some(slot)
    }

    /// Sends a change notification if this session wants it: every session-era session does;
    /// a listen stream only what it opted in to, tagged with its subscription id.
    pub(crate) fn notify_change(&self, method: &str, msg: &Bytes) -> bool {
        let Some(f) = &self.listen else { return self.send(msg.clone()) };
        let wanted = match method {
            "notifications/tools/list_changed" => f.tools,
            "notifications/prompts/list_changed" => f.prompts,
            "notifications/resources/list_changed" => f.resources,
            _ => true,
        };
        wanted && self.send(Bytes::from(crate::mcp::jsonrpc::with_meta(msg, SUBSCRIPTION_ID_META, &f.id)))
    }

    /// Records the capabilities the client declared at `initialize` (raw JSON).
    pub(crate) fn set_capabilities(&self, raw: &str) {
        *lock(&self.capabilities) = Some(raw.into());
    }

    /// The capabilities the client declared, raw JSON (`{}` when none).
    pub(crate) fn capabilities(&self) -> String {
        lock(&self.capabilities).as_deref().unwrap_or("{}").to_owned()
    }

    /// Records the client's `logging/setLevel` rank.
    pub(crate) fn set_log_level(&self, rank: u8) {
        self.log_level.store(rank.saturating_add(1), Ordering::Relaxed);
    }

    /// The client's log level rank, if it set one.
    pub(crate) fn log_level(&self) -> Option<u8> {
        self.log_level.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Whether a `notifications/message` at `rank` passes the client's level (all pass until
    /// the client sets one, as a session-era server sends them unasked).
    pub(crate) fn wants_log(&self, rank: u8) -> bool {
        self.log_level().is_none_or(|min| rank >= min)
    }

    /// Attaches the standalone stream (GET or legacy SSE), replacing an earlier one; with a
    /// relay, what other replicas publish for the session goes on it too, while it is open,
    /// from when the returned signal is answered (Redis confirmed the subscription).
    pub(crate) fn attach_stream(&self, tx: mpsc::Sender<Bytes>) -> Option<oneshot::Receiver<()>> {
        *lock(&self.stream) = Some(tx.clone());
        let mut ready = None;
        if let Some(relay) = self.relay.get() {
            let mut heard = relay.state.subscribe(relay.channel.clone());
            ready = heard.ready.take();
            let closed = self.closed.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        msg = heard.rx.recv() => {
                            let Some(msg) = msg else { return };
                            if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(msg) {
                                return;
                            }
                        }
                        () = tx.closed() => return,
                        () = closed.cancelled() => return,
                    }
                }
            });
        }
        ready
    }

    /// Attaches the standalone stream, and with a relay waits (at most the shared state's
    /// deadline) until messages other replicas publish for it are heard.
    pub(crate) async fn attach_stream_heard(&self, tx: mpsc::Sender<Bytes>) {
        if let Some(ready) = self.attach_stream(tx) {
            let _ = tokio::time::timeout(crate::state::DEADLINE, ready).await;
        }
    }

    /// Whether a standalone stream is attached and open.
    pub(crate) fn has_stream(&self) -> bool {
        lock(&self.stream).as_ref().is_some_and(|s| !s.is_closed())
    }

    /// Sends a message on the standalone stream: here when it is here, else (with a relay) to
    /// the replica holding it; false when there is none or it is full.
    pub(crate) fn send(&self, msg: Bytes) -> bool {
        let tx = lock(&self.stream).clone().filter(|tx| !tx.is_closed());
        match (tx, self.relay.get()) {
            (Some(tx), _) => tx.try_send(msg).is_ok(),
            (None, Some(relay)) => relay.state.publish(relay.channel.clone(), msg),
            (None, None) => false,
        }
    }

    /// Registers a server-to-client request and returns the id to use downstream.
    pub(crate) fn add_client_request(&self, route: ClientRequestRoute) -> u64 {
        let id = self.next_client_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.client_requests).insert(id, route);
        id
    }

    /// Removes and returns the route of a server-to-client request.
    pub(crate) fn take_client_request(&self, id: u64) -> Option<ClientRequestRoute> {
        lock(&self.client_requests).remove(&id)
    }

    /// Records an in-flight upstream call for cancellation.
    pub(crate) fn track(&self, down_id: &str, upstream: Arc<dyn Instance>, up_id: u64) {
        lock(&self.inflight).insert(down_id.into(), (upstream, up_id));
    }

    /// Forgets an in-flight call.
    pub(crate) fn untrack(&self, down_id: &str) {
        lock(&self.inflight).remove(down_id);
    }

    /// Takes every call in flight (to cancel them when the session ends).
    pub(crate) fn take_inflight(&self) -> Vec<InflightCall> {
        lock(&self.inflight).drain().map(|(_, v)| v).collect()
    }

    /// The upstream call for a downstream request id.
    pub(crate) fn inflight(&self, down_id: &str) -> Option<InflightCall> {
        lock(&self.inflight).get(down_id).cloned()
    }

    /// Records a subscription to a server's resource (its own URI); true if new.
    pub(crate) fn subscribe(&self, server: &str, uri: &str) -> bool {
        lock(&self.subscriptions).insert((server.to_owned(), uri.to_owned()))
    }

    /// Removes a subscription; true if it existed.
    pub(crate) fn unsubscribe(&self, server: &str, uri: &str) -> bool {
        lock(&self.subscriptions).remove(&(server.to_owned(), uri.to_owned()))
    }

    /// Whether the session subscribed to a server's resource.
    pub(crate) fn is_subscribed(&self, server: &str, uri: &str) -> bool {
        lock(&self.subscriptions).iter().any(|(s, u)| s == server && u == uri)
    }

    /// Every (server, URI) the session subscribed to.
    pub(crate) fn subscriptions(&self) -> Vec<(String, String)> {
        lock(&self.subscriptions).iter().cloned().collect()
    }

    /// Ends the session: closes its stream and drops its routes.
    pub(crate) fn close(&self) {
        self.closed.cancel();
        lock(&self.stream).take();
        lock(&self.client_requests).clear();
    }
}

/// Who made a request: the session (if any) and the request's own response stream (if any).
#[derive(Clone, Default)]
pub(crate) struct Caller {
    /// The session, for session-based clients.
    pub session: Option<Arc<Session>>,
    /// Messages related to this request (progress, server-to-client requests) go here.
    pub related: Option<mpsc::Sender<Bytes>>,
    /// True when dropping the request means cancelling it (2026-07-28: closing the response
    /// stream cancels; in the 2025 era a disconnect is not a cancellation).
    pub cancel_on_drop: bool,
    /// Where server-to-client requests go for a caller without a back-channel (a 2026-07-28
    /// call waiting on a session-era upstream); they become an `InputRequiredResult`.
    pub asks: Option<mpsc::Sender<Ask>>,
    /// The request's `Mcp-Param-*` headers, forwarded to a 2026-07-28 upstream as they are.
    pub forward: Option<ForwardHeaders>,
    /// A stateless caller's identity key (a call it parks resumes for it alone).
    pub principal: Option<Arc<str>>,
}

impl Caller {
    /// A request of `session`, with no stream of its own.
    pub(crate) fn in_session(session: &Arc<Session>) -> Self {
        Caller { session: Some(session.clone()), ..Caller::default() }
    }

    /// The session key, or 0 for stateless callers.
    pub(crate) fn key(&self) -> u64 {
        self.session.as_ref().map_or(0, |s| s.key)
    }

    /// Delivers a message related to this caller's request: on its own stream if it has one,
    /// else on the session's standalone stream.
    pub(crate) fn deliver(&self, msg: Bytes) -> bool {
        if let Some(tx) = &self.related
            && tx.try_send(msg.clone()).is_ok()
        {
            return true;
        }
        self.session.as_ref().is_some_and(|s| s.send(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two replicas' copies of one legacy SSE session: the capabilities the client declared
    /// on one are learnt by the other; a copy that knows some keeps its own.
    #[tokio::test]
    async fn a_legacy_sse_session_s_capabilities_reach_the_other_replicas() {
        let Some(state) = crate::state::tests::test_state().await else { return };
        let copy = || {
            let s = Session::with_id(
                "sse-session-id".into(),
                Scope::All,
                ProtocolVersion::V2024_11_05,
                ClientTransport::Sse,
                Identity::anonymous(),
            );
            s.relay_through(&state);
            s
        };
        let (took_initialize, holds_stream, knows_own) = (copy(), copy(), copy());
        holds_stream.learn_capabilities().await;
        assert_eq!(holds_stream.capabilities(), "{}", "nothing declared yet");
        knows_own.set_capabilities(r#"{"roots":{}}"#);
        let declared = r#"{"sampling":{},"elicitation":{"url":{}}}"#;
        took_initialize.set_capabilities(declared);
        took_initialize.share_capabilities(declared).await;
        holds_stream.learn_capabilities().await;
        assert_eq!(holds_stream.capabilities(), declared);
        knows_own.learn_capabilities().await;
        assert_eq!(knows_own.capabilities(), r#"{"roots":{}}"#);
    }
}
