//! Upstream MCP servers: the gateway as an MCP client.
//!
//! An [`Upstream`] is one running instance of a server definition: a supervisor task that
//! connects (spawns the child, or initializes the HTTP session), watches the connection, and
//! restarts it with exponential backoff behind a crash-loop breaker; plus a multiplexer that
//! gives every request a gateway-minted id and remembers which downstream caller it belongs to.
//!
//! Invariants:
//! - Every upstream request id is minted here (a per-instance counter), so ids from different
//!   downstream sessions never collide; progress tokens are rewritten to that id and restored on
//!   the way back, so progress reaches only its caller.
//! - When a connection ends, every request in flight on it is answered at once with an error
//!   naming the server; no caller waits for a deadline on a dead connection.
//! - A request is removed from the pending map exactly once (answered, timed out, failed or
//!   dropped by its caller).
//! - Client credentials never reach this module: it sends only what config names.

mod error;
pub(crate) mod http;
pub(crate) mod input_requests;
mod parking;
pub mod stdio;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::jsonrpc::{self, Envelope, Kind, RawObject, Reply, code};
use super::session::{self, Ask, Caller, ClientRequestRoute};
use crate::config::{ServerDef, Transport};
use crate::sharded::lock;
pub(crate) use error::{Down, TransportError, UpstreamError};

use super::version::ProtocolVersion;
pub(crate) use parking::Parking;

/// The protocol version Portcullis offers upstream in `initialize`.
pub(crate) const UPSTREAM_HANDSHAKE_VERSION: &str = ProtocolVersion::LATEST_SESSION.as_str();
/// `_meta` key of a 2026-07-28 request's log level.
pub(crate) const LOG_LEVEL_META: &str = "io.modelcontextprotocol/logLevel";
/// `_meta` key of a 2026-07-28 request's client capabilities.
pub(crate) const CAPABILITIES_META: &str = "io.modelcontextprotocol/clientCapabilities";

/// Crash-loop breaker: this many failed starts or crashes ...
const BREAKER_FAILURES: usize = 5;
/// ... within this window open the breaker ...
const BREAKER_WINDOW: Duration = Duration::from_secs(60);
/// ... for this long, during which calls fail fast.
const BREAKER_COOLDOWN: Duration = Duration::from_secs(30);
/// First restart delay, doubled per failure up to `BACKOFF_MAX`.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// The longest delay between two attempts to reach a remote server (no breaker for those: a
/// URL that is briefly unreachable is probed until it is back).
const REMOTE_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A connection that stayed up this long resets the backoff.
const HEALTHY_AFTER: Duration = Duration::from_secs(30);

/// When a supervisor tries again after a failure (a failed start, or a connection that ended):
/// a backoff doubling from 100 ms, to 10 s for a process and to 1 s for a remote server, and
/// for processes only the crash-loop breaker (5 failures within 60 s open it for 30 s).
struct Breaker {
    failures: VecDeque<Instant>,
    backoff: Duration,
    max: Duration,
    trips: bool,
}

/// What [`Breaker::failed`] decides.
#[derive(Debug, PartialEq, Eq)]
enum Retry {
    /// Try again after this long.
    After(Duration),
    /// Crash loop: the breaker is open for this long; calls fail fast meanwhile.
    Open(Duration),
}

impl Breaker {
    fn new(remote: bool) -> Self {
        let max = if remote { REMOTE_BACKOFF_MAX } else { BACKOFF_MAX };
        Breaker { failures: VecDeque::new(), backoff: BACKOFF_START, max, trips: !remote }
    }

    /// A connection that held (a remote one at all, a process for `HEALTHY_AFTER`).
    fn reset(&mut self) {
        self.failures.clear();
        self.backoff = BACKOFF_START;
    }

    fn failed(&mut self, now: Instant) -> Retry {
        if self.trips {
            self.failures.push_back(now);
            while self.failures.front().is_some_and(|t| now.duration_since(*t) > BREAKER_WINDOW) {
                self.failures.pop_front();
            }
            if self.failures.len() >= BREAKER_FAILURES {
                self.reset();
                return Retry::Open(BREAKER_COOLDOWN);
            }
        }
        let d = self.backoff;
        self.backoff = (self.backoff * 2).min(self.max);
        Retry::After(d)
    }
}

/// How often a connected remote server is probed (a TCP connect to its host and port).
const PROBE_EVERY: Duration = Duration::from_secs(2);

/// The probe target when its next probe is due (never, without one).
async fn probe_due(target: Option<&(String, u16)>) -> &(String, u16) {
    match target {
        Some(t) => {
            tokio::time::sleep(PROBE_EVERY).await;
            t
        }
        None => std::future::pending().await,
    }
}

/// Lifecycle state of an upstream instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// First start in progress.
    Starting,
    /// Connected and initialized.
    Running,
    /// Lost its connection; reconnecting after a backoff.
    Restarting,
    /// Crash loop: the breaker is open and calls fail fast until it closes.
    Failed,
    /// A remote server that cannot be reached: probed again after a short backoff (at most
    /// a second), calls fail fast naming it.
    Unreachable,
    /// Stopped on purpose.
    Stopped,
}

impl State {
    /// Lowercase name for APIs and logs.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Restarting => "restarting",
            State::Failed => "failed",
            State::Unreachable => "unreachable",
            State::Stopped => "stopped",
        }
    }
}

/// What the upstream said about itself at connect time.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// Negotiated protocol version.
    pub protocol_version: ProtocolVersion,
    /// Raw `capabilities` object.
    pub capabilities: Box<RawValue>,
    /// Raw `serverInfo` object.
    pub server_info: Box<RawValue>,
    /// `instructions`, if any.
    pub instructions: Option<String>,
}

/// A live connection.
pub struct Connection {
    link: Link,
    /// What the server said in its handshake.
    pub info: ServerInfo,
    closed: CancellationToken,
    pid: Option<u32>,
}

impl Connection {
    /// The child's pid, for stdio servers.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }
}

enum Link {
    Stdio(stdio::StdioLink),
    Http(Arc<http::HttpLink>),
}

impl Link {
    fn send(&self, msg: Bytes, id: Option<u64>) -> Result<(), TransportError> {
        match self {
            Link::Stdio(l) => l.send(msg),
            Link::Http(l) => l.send(msg, id, None, None),
        }
    }

    /// Sends a call: `forward` are the caller's `Mcp-Param-*` headers and `named` its
    /// `Mcp-Method` and `Mcp-Name`, both for a 2026-07-28 server.
    fn send_call(
        &self,
        msg: Bytes,
        id: u64,
        forward: Option<session::ForwardHeaders>,
        named: Option<http::Named>,
    ) -> Result<(), TransportError> {
        match self {
            Link::Stdio(l) => l.send(msg),
            Link::Http(l) => l.send(msg, Some(id), forward, named),
        }
    }

    /// Stops a request the transport can stop by itself (stateless HTTP: closing the POST).
    fn abort(&self, id: u64) -> bool {
        match self {
            Link::Stdio(_) => false,
            Link::Http(l) => l.abort(id),
        }
    }

    async fn shutdown(&self) {
        match self {
            Link::Stdio(l) => l.shutdown().await,
            Link::Http(l) => l.shutdown().await,
        }
    }
}

/// A transport opened (a child started, a URL reached), before the handshake makes it a
/// [`Connection`].
pub(crate) struct Opened {
    link: Link,
    closed: CancellationToken,
    pid: Option<u32>,
}

/// A snapshot of an instance's status.
#[derive(Clone)]
pub(crate) struct Status {
    /// Lifecycle state.
    pub state: State,
    /// The live connection when running.
    pub conn: Option<Arc<Connection>>,
    /// The last error, for operators.
    pub last_error: Option<Down>,
    /// How many times it was restarted.
    pub restarts: u64,
    /// When the current connection came up.
    pub since: Option<Instant>,
}

/// Receives what an upstream says that is not an answer to a request.
pub(crate) trait Hub: Send + Sync {
    /// A `notifications/*/list_changed` from `server`, or its visible set changed (it started,
    /// stopped or failed).
    fn list_changed(&self, server: &str, method: &str);
    /// `notifications/resources/updated` from `server` (raw params).
    fn resource_updated(&self, server: &str, params: &RawValue);
    /// An instance's status changed (the hub tells whoever waits for a change of state).
    fn status_changed(&self);
    /// Where stateless calls parked on an `InputRequiredResult` are found from any replica.
    fn parking(&self) -> &Parking;
}

struct Pending {
    /// The answer, or why there is none (a transport failure, the session expiring).
    reply: oneshot::Sender<Result<Reply, UpstreamError>>,
    caller: Caller,
    progress_token: Option<Box<RawValue>>,
}

/// One running instance of a server definition.
pub struct Upstream {
    /// The definition it runs.
    pub def: Arc<ServerDef>,
    status: watch::Sender<Status>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, Pending>>,
    stop: CancellationToken,
    hub: Weak<dyn Hub>,
    /// The session owning a `per_session` instance.
    owner: Option<Weak<super::session::Session>>,
    http: http::Clients,
    /// Access tokens of Portcullis' own for a server with `oauth:` (they outlive connections).
    credential: Option<Arc<crate::oauth::client::TokenSource>>,
    /// The `logging/setLevel` rank + 1 the sessions want from this instance (0: never set);
    /// re-sent after every reconnect.
    log_level: AtomicU8,
    /// Resources the sessions subscribed to on a 2026-07-28 instance, held by one
    /// `subscriptions/listen` stream that is reopened when the set changes.
    listen_uris: Mutex<BTreeSet<String>>,
    listen_changed: Arc<Notify>,
    /// Stateless calls parked on an `InputRequiredResult`, by `requestState` token.
    parked: Mutex<HashMap<String, Parked>>,
}

impl Upstream {
    /// Starts an instance; it connects in the background.
    pub(crate) fn start(
        def: Arc<ServerDef>,
        hub: Weak<dyn Hub>,
        owner: Option<Weak<super::session::Session>>,
        http: http::Clients,
        credential: Option<Arc<crate::oauth::client::TokenSource>>,
    ) -> Arc<Self> {
        let initial = Status {
            state: if def.enabled { State::Starting } else { State::Stopped },
            conn: None,
            last_error: None,
            restarts: 0,
            since: None,
        };
        let up = Arc::new(Upstream {
            def,
            status: watch::Sender::new(initial),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
            hub,
            owner,
            http,
            credential,
            log_level: AtomicU8::new(0),
            listen_uris: Mutex::new(BTreeSet::new()),
            listen_changed: Arc::new(Notify::new()),
            parked: Mutex::new(HashMap::new()),
        });
        if up.def.enabled {
            tokio::spawn(up.clone().supervise());
        }
        up
    }

    /// The state of its access token of Portcullis' own (`oauth:`), for `/servers`.
    pub(crate) fn credential_state(&self) -> Option<serde_json::Value> {
        self.credential.as_ref().map(|c| c.state())
    }

    /// The current status.
    pub(crate) fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// The live connection, if running.
    pub(crate) fn connection(&self) -> Option<Arc<Connection>> {
        self.status.borrow().conn.clone()
    }

    /// Stops the instance: ends its connection (children included) and fails calls in flight.
    pub(crate) async fn stop(&self) {
        self.stop.cancel();
        let mut rx = self.status.subscribe();
        let _ = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.state == State::Stopped)).await;
    }

    /// Marks stopping without waiting.
    pub(crate) fn stop_now(&self) {
        self.stop.cancel();
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        self.status.send_modify(f);
        if let Some(hub) = self.hub.upgrade() {
            hub.status_changed();
        }
    }

    async fn supervise(self: Arc<Self>) {
        let mut first = true;
        // The crash-loop breaker is for processes that crash; a remote URL is probed until back.
        let remote = matches!(self.def.transport, Transport::Http { .. });
        let mut breaker = Breaker::new(remote);
        let probe = match &self.def.transport {
            Transport::Http { url, .. } => http::probe_target(url),
            Transport::Stdio { .. } => None,
        };
        let mut unreachable = false;
        loop {
            if self.stop.is_cancelled() {
                break;
            }
            if !first {
                self.set(|s| s.restarts += 1);
            }
            first = false;
            let started = Instant::now();
            let attempt = tokio::select! {
                r = self.connect() => r,
                _ = self.stop.cancelled() => break,
            };
            match attempt {
                Ok(conn) => {
                    if std::mem::take(&mut unreachable) {
                        tracing::info!(server = %self.def.name, "upstream reachable again");
                    }
                    if remote {
                        breaker.reset();
                    }
                    if self.run_connection(Arc::new(conn), probe.as_ref()).await {
                        break;
                    }
                    if started.elapsed() >= HEALTHY_AFTER {
                        breaker.reset();
                    }
                }
                Err(e) if remote => {
                    if !unreachable {
                        tracing::warn!(server = %self.def.name, error = %e, "upstream unreachable; probing until it is back");
                    }
                    unreachable = true;
                    let reason = Down::Unreachable(e);
                    self.set(|s| {
                        s.last_error = Some(reason.clone());
                        s.state = State::Unreachable;
                    });
                    self.fail_all(reason);
                }
                Err(e) => {
                    tracing::warn!(server = %self.def.name, error = %e, "upstream failed to start");
                    self.set(|s| {
                        s.last_error = Some(Down::Failed(e));
                        if s.state == State::Running {
                            s.state = State::Restarting;
                        }
                    });
                }
            }
            let delay = self.after_failure(&mut breaker, remote);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.stop.cancelled() => break,
            }
        }
        self.set(|s| {
            s.state = State::Stopped;
            s.conn = None;
        });
        self.fail_all(Down::Stopped);
    }

    /// Publishes a new connection and watches it (probing a remote server) until it ends or
    /// the instance stops; returns whether it is stopping.
    async fn run_connection(self: &Arc<Self>, conn: Arc<Connection>, probe: Option<&(String, u16)>) -> bool {
        self.set(|s| {
            s.state = State::Running;
            s.conn = Some(conn.clone());
            s.since = Some(Instant::now());
        });
        tracing::info!(server = %self.def.name, pid = conn.pid, version = %conn.info.protocol_version, "upstream connected");
        if conn.info.protocol_version.is_stateless() {
            self.spawn_listener(conn.clone());
        }
        self.changed();
        let mut missed = 0;
        let stopping = loop {
            tokio::select! {
                _ = conn.closed.cancelled() => break false,
                _ = self.stop.cancelled() => break true,
                // A remote server is probed while connected, so its state, health and metrics
                // say it is gone even when nobody calls it.
                target = probe_due(probe) => {
                    // Two probes in a row, so one slow connect is not an outage.
                    missed = if http::reachable(target).await { 0 } else { missed + 1 };
                    if missed >= 2 {
                        tracing::warn!(server = %self.def.name, "upstream unreachable (probe)");
                        conn.closed.cancel();
                    }
                }
            }
        };
        // Unpublish first (no new calls land on it), reap, then say Stopped.
        self.set(|s| {
            s.conn = None;
            s.since = None;
            if !stopping {
                s.state = State::Restarting;
            }
        });
        conn.link.shutdown().await;
        if stopping {
            self.fail_all(Down::Stopped);
            self.changed();
            return true;
        }
        tracing::warn!(server = %self.def.name, "upstream connection ended; restarting");
        self.set(|s| s.last_error = Some(Down::ConnectionEnded));
        self.fail_all(Down::ConnectionEnded);
        self.changed();
        false
    }

    /// How long to wait after a failed start or an ended connection; opens the crash-loop
    /// breaker (failing every call in flight) when the breaker says so.
    fn after_failure(&self, breaker: &mut Breaker, remote: bool) -> Duration {
        match breaker.failed(Instant::now()) {
            Retry::Open(d) => {
                tracing::error!(server = %self.def.name, "crash loop: breaker open for {d:?}");
                self.set(|s| s.state = State::Failed);
                let last = self.status.borrow().last_error.clone().map(Box::new);
                self.fail_all(Down::CrashLoop { last });
                d
            }
            // A remote server keeps the state its failure set (unreachable, restarting).
            Retry::After(d) if remote => d,
            Retry::After(d) => {
                if self.status.borrow().state != State::Starting {
                    self.set(|s| s.state = State::Restarting);
                }
                d
            }
        }
    }

    /// Whether the connected server speaks 2026-07-28.
    pub(crate) fn is_stateless(&self) -> bool {
        self.connection().is_some_and(|c| c.info.protocol_version.is_stateless())
    }

    /// Adds or removes a resource on this instance's `subscriptions/listen` stream (2026-07-28
    /// servers have no `resources/subscribe`).
    pub(crate) fn listen_to(&self, uri: &str, on: bool) {
        let changed = {
            let mut uris = lock(&self.listen_uris);
            if on { uris.insert(uri.to_owned()) } else { uris.remove(uri) }
        };
        if changed {
            self.listen_changed.notify_one();
        }
    }

    /// Keeps one `subscriptions/listen` request open on a 2026-07-28 connection, for list
    /// changes and the subscribed resources; its notifications route like any others. It is
    /// reopened with the new set when subscriptions change, and after the server ends it.
    fn spawn_listener(self: &Arc<Self>, conn: Arc<Connection>) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(up) = weak.upgrade() else { return };
                let notify = up.listen_changed.clone();
                let changed = notify.notified();
                let uris: Vec<String> = lock(&up.listen_uris).iter().cloned().collect();
                let filter = serde_json::json!({
                    "toolsListChanged": true,
                    "promptsListChanged": true,
                    "resourcesListChanged": true,
                    "resourceSubscriptions": uris,
                });
                let params = format!(r#"{{"notifications":{filter}}}"#);
                let id = up.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, rx) = oneshot::channel();
                lock(&up.pending).insert(id, Pending { reply: tx, caller: Caller::default(), progress_token: None });
                let msg = jsonrpc::request(&id.to_string(), "subscriptions/listen", Some(&params));
                if conn.link.send(Bytes::from(msg), Some(id)).is_err() {
                    lock(&up.pending).remove(&id);
                    return;
                }
                drop(up);
                tokio::select! {
                    _ = changed => {
                        if let Some(up) = weak.upgrade() {
                            lock(&up.pending).remove(&id);
                        }
                        conn.link.abort(id);
                    }
                    _ = rx => {
                        // The server ended the subscription (or the stream broke): reopen soon.
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                            _ = conn.closed.cancelled() => return,
                        }
                    }
                    _ = conn.closed.cancelled() => return,
                }
            }
        });
    }

    fn changed(&self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.list_changed(&self.def.name, "");
        }
    }

    async fn connect(self: &Arc<Self>) -> Result<Connection, TransportError> {
        let opened = match &self.def.transport {
            Transport::Stdio { .. } => stdio::spawn(self).await?,
            Transport::Http { .. } => http::connect(self).await?,
        };
        let Opened { link, closed, pid } = opened;
        let handshake = async {
            if let Link::Http(h) = &link
                && let Some(info) = h.stateless_info()
            {
                return Ok(info);
            }
            self.handshake(&link).await
        };
        let info = tokio::select! {
            r = tokio::time::timeout(self.def.timeout.min(Duration::from_secs(60)), handshake) => match r {
                Ok(r) => r,
                Err(_) => Err(TransportError::InitializeTimeout),
            },
            _ = closed.cancelled() => Err(TransportError::EndedDuringInitialize),
        };
        match info {
            Ok(info) => Ok(Connection { link, info, closed, pid }),
            Err(e) => {
                link.shutdown().await;
                self.fail_all(Down::Failed(e.clone()));
                Err(e)
            }
        }
    }

    async fn handshake(self: &Arc<Self>, link: &Link) -> Result<ServerInfo, TransportError> {
        let params = format!(
            r#"{{"protocolVersion":"{UPSTREAM_HANDSHAKE_VERSION}","capabilities":{{"sampling":{{}},"elicitation":{{}},"roots":{{"listChanged":true}}}},"clientInfo":{{"name":"portcullis","version":"{}"}}}}"#,
            env!("CARGO_PKG_VERSION")
        );
        let reply = self.raw_call(link, "initialize", Some(&params), &Caller::default()).await?;
        if reply.is_error {
            return Err(TransportError::Initialize(reply.payload_str().to_owned()));
        }
        let info = parse_init(reply.payload_str())?;
        if let Link::Http(h) = link {
            h.set_protocol_version(info.protocol_version);
        }
        link.send(Bytes::from(jsonrpc::notification("notifications/initialized", None)), None)?;
        if let Link::Http(h) = link {
            h.start_get_stream();
        }
        if let Some(rank) = self.log_level.load(Ordering::Relaxed).checked_sub(1) {
            self.send_log_level(link, rank);
        }
        Ok(info)
    }

    /// Sends a request on a link that may not be published yet (handshake).
    async fn raw_call(
        &self,
        link: &Link,
        method: &str,
        params: Option<&str>,
        caller: &Caller,
    ) -> Result<Reply, TransportError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, Pending { reply: tx, caller: caller.clone(), progress_token: None });
        link.send(Bytes::from(jsonrpc::request(&id.to_string(), method, params)), Some(id))?;
        match rx.await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(UpstreamError::Transport { source, .. })) => Err(source),
            Ok(Err(e)) => Err(TransportError::Initialize(e.to_string())),
            Err(_) => Err(TransportError::ConnectionClosed),
        }
    }

    /// Waits until running (up to `deadline`); fails fast when stopped or the breaker is open.
    pub async fn ready_by(&self, deadline: Instant) -> Result<Arc<Connection>, UpstreamError> {
        self.ready(deadline).await
    }

    async fn ready(&self, deadline: Instant) -> Result<Arc<Connection>, UpstreamError> {
        let mut rx = self.status.subscribe();
        // While a remote server is unreachable, a call waits for the next probe (at most a
        // second away) and no longer: then it fails fast, naming the server.
        let mut wait_until = deadline;
        loop {
            {
                let s = rx.borrow_and_update();
                // A connection that has just ended is still published until the supervisor
                // notices; wait for its successor instead.
                if let Some(c) = s.conn.as_ref().filter(|c| !c.closed.is_cancelled()) {
                    return Ok(c.clone());
                }
                let unavailable = |reason: Down| UpstreamError::Unavailable { server: self.def.name.clone(), reason };
                match s.state {
                    State::Unreachable => {
                        let probe = Instant::now() + REMOTE_BACKOFF_MAX + Duration::from_millis(500);
                        if wait_until == deadline {
                            wait_until = deadline.min(probe);
                        }
                    }
                    State::Failed => {
                        return Err(unavailable(Down::CrashLoop { last: s.last_error.clone().map(Box::new) }));
                    }
                    State::Stopped => return Err(unavailable(Down::Stopped)),
                    _ => {}
                }
            }
            match tokio::time::timeout_at(wait_until, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => {
                    let reason = self.status.borrow().last_error.clone().unwrap_or(Down::NotReady);
                    return Err(UpstreamError::Unavailable { server: self.def.name.clone(), reason });
                }
            }
        }
    }

    /// Calls a method upstream on behalf of `caller`.
    ///
    /// `edits` replaces top-level members of `params` (e.g. an unprefixed tool name); the
    /// caller's progress token is swapped for the upstream id and restored on the way back.
    /// `down_id` (the caller's raw request id) registers the call for cancellation.
    ///
    /// A session-era caller never sees a 2026-07-28 `InputRequiredResult`: its embedded
    /// requests are asked on the caller's stream and the call is retried with the answers
    /// (see [`input_requests`]), all within the one deadline.
    pub(crate) async fn call(
        self: &Arc<Self>,
        method: &str,
        params: Option<&RawValue>,
        edits: &[(&str, &str)],
        caller: &Caller,
        down_id: Option<&str>,
    ) -> Result<Reply, UpstreamError> {
        if caller.session.is_none() && INPUT_REQUEST_METHODS.contains(&method) {
            return self.call_stateless(method, params, edits, caller, down_id).await;
        }
        let deadline = Instant::now() + self.def.timeout;
        let mut reply = self.call_once(method, params, edits, caller, down_id, deadline).await?;
        let Some(session) = &caller.session else { return Ok(reply) };
        let protocol =
            |source: input_requests::InputError| UpstreamError::Input { server: self.def.name.clone(), source };
        for _ in 0..input_requests::MAX_ROUNDS {
            // Only a 2026-07-28 server answers `input_required`: other results are not scanned.
            if reply.is_error || !reply.stateless {
                return Ok(reply);
            }
            let required = match input_requests::input_required(reply.payload_str()) {
                None => return Ok(reply),
                Some(r) => r.map_err(protocol)?,
            };
            let mut answers = Vec::with_capacity(required.requests.len());
            for (key, m, p) in &required.requests {
                match input_requests::ask(session, caller, m, p.as_deref(), deadline).await.map_err(protocol)? {
                    input_requests::Answer::Result(r) => answers.push((key.clone(), r)),
                    input_requests::Answer::Refused(err) => return Ok(err),
                }
            }
            let responses = input_requests::responses_json(&answers);
            let mut retry: Vec<(&str, &str)> = edits.to_vec();
            if !answers.is_empty() {
                retry.push(("inputResponses", &responses));
            }
            if let Some(state) = &required.state {
                retry.push(("requestState", state));
            }
            reply = self.call_once(method, params, &retry, caller, down_id, deadline).await?;
        }
        Err(protocol(input_requests::InputError::TooManyRounds))
    }

    async fn call_once(
        self: &Arc<Self>,
        method: &str,
        params: Option<&RawValue>,
        edits: &[(&str, &str)],
        caller: &Caller,
        down_id: Option<&str>,
        deadline: Instant,
    ) -> Result<Reply, UpstreamError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.wait_once(method, params, edits, caller, down_id, deadline).await {
                // The session-based server refused the session (404): it never saw the request,
                // so it goes again on the new session (once).
                Err(UpstreamError::SessionExpired { .. }) if attempts == 1 => continue,
                other => return other,
            }
        }
    }

    async fn wait_once(
        self: &Arc<Self>,
        method: &str,
        params: Option<&RawValue>,
        edits: &[(&str, &str)],
        caller: &Caller,
        down_id: Option<&str>,
        deadline: Instant,
    ) -> Result<Reply, UpstreamError> {
        let (conn, id, rx) = self.start_call(method, params, edits, caller, down_id, deadline).await?;
        let mut guard = CallGuard { up: self, conn: &conn, id, down_id, caller, armed: true };
        let result = tokio::time::timeout_at(deadline, rx).await;
        match result {
            Ok(Ok(Ok(mut reply))) => {
                guard.armed = false;
                reply.stateless = conn.info.protocol_version.is_stateless();
                Ok(reply)
            }
            Ok(Ok(Err(e))) => {
                guard.armed = false;
                Err(e)
            }
            Ok(Err(_)) => {
                guard.armed = false;
                Err(UpstreamError::Closed { server: self.def.name.clone(), reason: Down::NoAnswer })
            }
            Err(_) => {
                guard.cancel_upstream("timed out");
                guard.armed = false;
                Err(UpstreamError::Timeout { server: self.def.name.clone(), after: self.def.timeout })
            }
        }
    }

    /// Sends a request and registers it: everything of a call but the wait.
    async fn start_call(
        self: &Arc<Self>,
        method: &str,
        params: Option<&RawValue>,
        edits: &[(&str, &str)],
        caller: &Caller,
        down_id: Option<&str>,
        deadline: Instant,
    ) -> Result<(Arc<Connection>, u64, oneshot::Receiver<Result<Reply, UpstreamError>>), UpstreamError> {
        let conn = self.ready(deadline).await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id_text = id.to_string();
        // A session-era caller on a 2026-07-28 upstream: what its session negotiated once
        // travels in every request's `_meta` instead.
        let (level, caps);
        let mut meta_adds: Vec<(&str, &str)> = Vec::new();
        if let Some(session) = caller.session.as_ref().filter(|_| conn.info.protocol_version.is_stateless()) {
            level = jsonrpc::quote(session::LOG_LEVELS[usize::from(session.log_level().unwrap_or(0))]);
            caps = session.capabilities();
            meta_adds.push((LOG_LEVEL_META, &level));
            meta_adds.push((CAPABILITIES_META, &caps));
        }
        let stateless = conn.info.protocol_version.is_stateless();
        // A 2026-07-28 upstream's request is made whole here, `_meta` and the name its
        // `Mcp-Name` header carries included, so the link sends it without parsing it again.
        let rewrite = Rewrite {
            edits,
            id_text: &id_text,
            meta_adds: &meta_adds,
            client_meta: stateless,
            strip_era: caller.session.is_none() && !stateless,
            name_key: if stateless { http::name_key(method) } else { None },
        };
        let transport = |source| UpstreamError::Transport { server: self.def.name.clone(), source };
        let Rewritten { params, progress_token, name } = rewrite_params(params, &rewrite).map_err(transport)?;
        let named = if stateless { Some(http::Named::new(method, name.as_deref()).map_err(transport)?) } else { None };
        let msg = jsonrpc::request(&id_text, method, params.as_deref());
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, Pending { reply: tx, caller: caller.clone(), progress_token });
        if let (Some(s), Some(d)) = (&caller.session, down_id) {
            s.track(d, self.clone(), id);
        }
        if let Err(e) = conn.link.send_call(Bytes::from(msg), id, caller.forward.clone(), named) {
            lock(&self.pending).remove(&id);
            if let (Some(s), Some(d)) = (&caller.session, down_id) {
                s.untrack(d);
            }
            return Err(UpstreamError::Closed { server: self.def.name.clone(), reason: Down::Failed(e) });
        }
        Ok((conn, id, rx))
    }

    /// A 2026-07-28 caller's `tools/call`, `prompts/get` or `resources/read` on any upstream.
    ///
    /// Such a caller has no channel for server-to-client requests. When the upstream sends one
    /// during the call, the call is parked (still pending upstream) and the caller gets an
    /// `InputRequiredResult` naming the requests, with a `requestState` that finds the parked
    /// call again; its retry carries the answers, which go upstream under the ids the upstream
    /// used, and the wait resumes. A `requestState` that is not Portcullis' own (a 2026-07-28
    /// upstream's) is passed through untouched.
    async fn call_stateless(
        self: &Arc<Self>,
        method: &str,
        params: Option<&RawValue>,
        edits: &[(&str, &str)],
        caller: &Caller,
        down_id: Option<&str>,
    ) -> Result<Reply, UpstreamError> {
        // Only a retry carries `requestState`: a plain call is not parsed for it (unless some
        // key could spell it with escapes).
        let retry = params.filter(|p| p.get().contains("requestState") || p.get().contains("\\u"));
        let resume = retry.and_then(|p| RawObject::parse(p).ok()).and_then(|o| {
            let state = o.get_str("requestState")?;
            let state = state.strip_prefix(PARKED_PREFIX)?.to_owned();
            Some((state, o.get("inputResponses").map(|r| r.get().to_owned())))
        });
        if let Some((token, responses)) = resume {
            let Some(hub) = self.hub.upgrade() else { return Ok(parking::unknown()) };
            let home = token.split_once('.').and_then(|(tag, _)| u64::from_str_radix(tag, 16).ok());
            let parking = hub.parking();
            return match home {
                Some(tag) if tag == parking.tag() => self.resume(&token, method, responses.as_deref(), caller).await,
                Some(tag) => {
                    let retry = parking::Retry {
                        token: &token,
                        server: &self.def.name,
                        method,
                        principal: caller.principal.as_deref(),
                        responses: responses.as_deref(),
                    };
                    Ok(parking.resume_elsewhere(tag, retry, self.def.timeout).await)
                }
                None => Ok(parking::unknown()),
            };
        }
        let deadline = Instant::now() + self.def.timeout;
        let (asks_tx, asks_rx) = mpsc::channel(8);
        let mut asking = caller.clone();
        asking.asks = Some(asks_tx.clone());
        let (conn, id, rx) = self.start_call(method, params, edits, &asking, down_id, deadline).await?;
        let parked = Parked {
            conn,
            id,
            rx,
            asks_tx,
            asks_rx,
            asked: Vec::new(),
            method: method.to_owned(),
            principal: caller.principal.clone(),
            deadline,
        };
        self.wait_stateless(parked).await
    }

    /// Resumes the call parked here under `token` with the client's answers: for the principal
    /// and method it was parked for only (for anyone else it stays parked).
    pub(super) async fn resume(
        self: &Arc<Self>,
        token: &str,
        method: &str,
        responses: Option<&str>,
        caller: &Caller,
    ) -> Result<Reply, UpstreamError> {
        let mut parked = {
            let mut all = lock(&self.parked);
            match all.get(token) {
                Some(p) if p.method == method && p.principal == caller.principal => {}
                _ => return Ok(parking::unknown()),
            }
            let Some(parked) = all.remove(token) else { return Ok(parking::unknown()) };
            parked
        };
        if let Some(hub) = self.hub.upgrade() {
            hub.parking().unparked(token);
        }
        let answers = responses.and_then(|r| serde_json::from_str::<HashMap<String, &RawValue>>(r).ok());
        for (key, upstream_id) in std::mem::take(&mut parked.asked) {
            let msg = match answers.as_ref().and_then(|a| a.get(&key)) {
                Some(result) => jsonrpc::result_response(&upstream_id, result.get()),
                None => jsonrpc::error_response(
                    Some(&upstream_id),
                    code::INVALID_PARAMS,
                    "the client sent no answer for this request",
                    None,
                ),
            };
            let _ = parked.conn.link.send(Bytes::from(msg), None);
        }
        let mut resumed = caller.clone();
        resumed.asks = Some(parked.asks_tx.clone());
        if let Some(p) = lock(&self.pending).get_mut(&parked.id) {
            p.caller = resumed;
        }
        self.wait_stateless(parked).await
    }

    /// Waits for a stateless call's answer, or parks it when the upstream asks the client
    /// something. Dropping the wait (the client went away) cancels the call upstream.
    async fn wait_stateless(self: &Arc<Self>, mut p: Parked) -> Result<Reply, UpstreamError> {
        let mut guard = StatelessGuard { up: self, conn: p.conn.clone(), id: p.id, armed: true };
        let deadline = p.deadline;
        tokio::select! {
            r = &mut p.rx => {
                guard.armed = false;
                match r {
                    Ok(Ok(mut reply)) => {
                        reply.stateless = p.conn.info.protocol_version.is_stateless();
                        Ok(reply)
                    }
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(UpstreamError::Closed { server: self.def.name.clone(), reason: Down::NoAnswer }),
                }
            }
            Some(first) = p.asks_rx.recv() => {
                guard.armed = false;
                let mut asks = vec![first];
                while let Ok(more) = p.asks_rx.try_recv() {
                    asks.push(more);
                }
                let mut requests = String::from("{");
                for (i, ask) in asks.into_iter().enumerate() {
                    let key = format!("r{i}");
                    if i > 0 {
                        requests.push(',');
                    }
                    requests.push_str(&format!(r#""{key}":{{"method":{}"#, jsonrpc::quote(&ask.method)));
                    if let Some(params) = &ask.params {
                        requests.push_str(&format!(r#","params":{}"#, params.get()));
                    }
                    requests.push('}');
                    p.asked.push((key, ask.upstream_id));
                }
                requests.push('}');
                let token = match crate::random::id() {
                    Ok(t) => t,
                    Err(e) => {
                        lock(&self.pending).remove(&p.id);
                        send_cancel(&p.conn, p.id, Some("the gateway has no randomness"));
                        return Err(UpstreamError::Unavailable { server: self.def.name.clone(), reason: e.into() });
                    }
                };
                // The token names the replica holding the call (0 when there are no others).
                let hub = self.hub.upgrade();
                let token = format!("{:x}.{token}", hub.as_ref().map_or(0, |h| h.parking().tag()));
                let result = format!(
                    r#"{{"resultType":"input_required","inputRequests":{requests},"requestState":{}}}"#,
                    jsonrpc::quote(&format!("{PARKED_PREFIX}{token}"))
                );
                lock(&self.parked).insert(token.clone(), p);
                if let Some(hub) = &hub {
                    hub.parking().parked(&token, self);
                }
                // An unanswered park ends at the call's deadline, cancelled upstream.
                let weak = Arc::downgrade(self);
                tokio::spawn(async move {
                    tokio::time::sleep_until(deadline).await;
                    let Some(up) = weak.upgrade() else { return };
                    let expired = lock(&up.parked).remove(&token);
                    if let Some(hub) = up.hub.upgrade() {
                        hub.parking().unparked(&token);
                    }
                    if let Some(p) = expired {
                        lock(&up.pending).remove(&p.id);
                        send_cancel(&p.conn, p.id, Some("the client did not answer in time"));
                    }
                });
                let mut reply = Reply::owned(result, false);
                reply.stateless = true;
                Ok(reply)
            }
            _ = tokio::time::sleep_until(deadline) => {
                Err(UpstreamError::Timeout { server: self.def.name.clone(), after: self.def.timeout })
            }
        }
    }

    /// Sets the log level this instance should send at (`logging/setLevel`), now if connected
    /// with a session-era server and again after every reconnect. 2026-07-28 servers take the
    /// level per request instead.
    /// Returns once the server has answered (or failed to).
    pub(crate) async fn set_log_level(self: &Arc<Self>, rank: u8) {
        let previous = self.log_level.swap(rank.saturating_add(1), Ordering::Relaxed);
        if let Some(conn) = self.connection()
            && !conn.info.protocol_version.is_stateless()
            && previous != rank.saturating_add(1)
        {
            let params = jsonrpc::raw(format!(r#"{{"level":"{}"}}"#, session::LOG_LEVELS[usize::from(rank)]));
            if let Err(e) = self.call("logging/setLevel", Some(&params), &[], &Caller::default(), None).await {
                tracing::debug!(server = %self.def.name, error = %e, "logging/setLevel failed");
            }
        }
    }

    fn send_log_level(&self, link: &Link, rank: u8) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let params = format!(r#"{{"level":"{}"}}"#, session::LOG_LEVELS[usize::from(rank)]);
        // The answer is not awaited: an unmatched id is dropped on arrival.
        let _ = link.send(Bytes::from(jsonrpc::request(&id.to_string(), "logging/setLevel", Some(&params))), None);
    }

    /// Sends a notification upstream (no answer expected).
    pub(crate) fn notify(&self, method: &str, params: Option<&str>) -> Result<(), UpstreamError> {
        let conn = self
            .connection()
            .ok_or_else(|| UpstreamError::Unavailable { server: self.def.name.clone(), reason: Down::NotRunning })?;
        conn.link
            .send(Bytes::from(jsonrpc::notification(method, params)), None)
            .map_err(|e| UpstreamError::Closed { server: self.def.name.clone(), reason: Down::Failed(e) })
    }

    /// Cancels an in-flight call on behalf of its caller (`notifications/cancelled`).
    pub(crate) fn cancel(&self, id: u64, reason: Option<&str>) {
        if let Some(p) = lock(&self.pending).remove(&id) {
            let _ = p.reply.send(Ok(Reply::error(code::REQUEST_CANCELLED, "request cancelled")));
        }
        if let Some(conn) = self.connection() {
            send_cancel(&conn, id, reason);
        }
    }

    /// How many requests are waiting for their answers.
    pub fn in_flight(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Whether a request is still waiting for its answer.
    pub(crate) fn is_pending(&self, id: u64) -> bool {
        lock(&self.pending).contains_key(&id)
    }

    fn fail_all(&self, reason: Down) {
        let drained: Vec<(u64, Pending)> = lock(&self.pending).drain().collect();
        if drained.is_empty() {
            return;
        }
        let err = UpstreamError::Closed { server: self.def.name.clone(), reason };
        for (_, p) in drained {
            let _ = p.reply.send(Err(err.clone()));
        }
    }

    /// Ends one call in flight with `error` (its transport failed for it).
    pub(crate) fn fail_call(&self, id: u64, error: UpstreamError) {
        if let Some(p) = lock(&self.pending).remove(&id) {
            let _ = p.reply.send(Err(error));
        }
    }

    /// Handles one message from the upstream. `related` is the upstream id of the request whose
    /// response stream carried it (HTTP), which attributes notifications and server-to-client
    /// requests to their caller exactly.
    pub(crate) fn on_message(self: &Arc<Self>, bytes: Bytes, related: Option<u64>) {
        let env = match Envelope::parse(&bytes) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(server = %self.def.name, error = %e, "ignoring malformed message from upstream");
                return;
            }
        };
        match env.kind {
            Kind::Result | Kind::Error => {
                let Some(id) = env.id_u64() else {
                    tracing::warn!(server = %self.def.name, "response with an id Portcullis did not send");
                    return;
                };
                let Some(p) = lock(&self.pending).remove(&id) else { return };
                let part = if env.kind == Kind::Result { env.result } else { env.error };
                let span = part.map(|r| jsonrpc::span_of(&bytes, r));
                let reply = match span {
                    Some(span) => Reply {
                        bytes: bytes.clone(),
                        span,
                        is_error: env.kind == Kind::Error,
                        extra: "",
                        stateless: false,
                    },
                    None => Reply::error(code::INTERNAL_ERROR, "empty response"),
                };
                let _ = p.reply.send(Ok(reply));
            }
            Kind::Notification => self.on_notification(&env, related),
            Kind::Request => self.on_request(&env, related),
        }
    }

    fn on_notification(self: &Arc<Self>, env: &Envelope<'_>, related: Option<u64>) {
        let method = env.method();
        match method {
            "notifications/progress" => {
                let Some(params) = env.params else { return };
                let Ok(obj) = RawObject::parse(params) else { return };
                let Some(id) = obj.get("progressToken").and_then(|t| t.get().trim_matches('"').parse::<u64>().ok())
                else {
                    return;
                };
                let route = lock(&self.pending)
                    .get(&id)
                    .and_then(|p| p.progress_token.as_ref().map(|t| (p.caller.clone(), t.get().to_owned())));
                if let Some((caller, token)) = route {
                    let params = obj.to_json_with(&[("progressToken", &token)]);
                    caller.deliver(Bytes::from(jsonrpc::notification(method, Some(&params))));
                }
            }
            "notifications/tools/list_changed"
            | "notifications/prompts/list_changed"
            | "notifications/resources/list_changed" => {
                if let Some(hub) = self.hub.upgrade() {
                    hub.list_changed(&self.def.name, method);
                }
            }
            "notifications/resources/updated" => {
                if let (Some(hub), Some(p)) = (self.hub.upgrade(), env.params) {
                    hub.resource_updated(&self.def.name, p);
                }
            }
            "notifications/cancelled" => {
                // The server withdrew a request it sent to a client; nothing to route for the
                // gateway's own requests, and client-bound requests time out on their own.
            }
            _ => {
                // Logging and other notifications: deliver to the one caller they can belong to.
                if let Some(caller) = self.caller_for(related) {
                    if method == "notifications/message" && !wants_log(&caller, env) {
                        return;
                    }
                    caller.deliver(Bytes::from(jsonrpc::notification(method, env.params.map(RawValue::get))));
                } else {
                    tracing::debug!(server = %self.def.name, method, "notification not attributable to one session; dropped");
                }
            }
        }
    }

    /// The caller of the request whose stream carried a message, else [`Self::sole_caller`].
    fn caller_for(&self, related: Option<u64>) -> Option<Caller> {
        if let Some(id) = related
            && let Some(p) = lock(&self.pending).get(&id)
        {
            return Some(p.caller.clone());
        }
        self.sole_caller()
    }

    /// The caller a server-initiated message belongs to: the owner of a per-session instance,
    /// or the only session with calls in flight on a shared one.
    fn sole_caller(&self) -> Option<Caller> {
        let pending = lock(&self.pending);
        let mut found: Option<&Caller> = None;
        for p in pending.values() {
            if p.caller.session.is_none() && p.caller.related.is_none() && p.caller.asks.is_none() {
                continue;
            }
            match found {
                None => found = Some(&p.caller),
                Some(f) if f.key() == p.caller.key() && f.key() != 0 => {
                    // Two calls from one session: the session is known, the request is not.
                    if f.related.is_some() {
                        found = Some(&p.caller);
                    }
                }
                Some(_) => return None,
            }
        }
        if let Some(c) = found {
            return Some(c.clone());
        }
        drop(pending);
        let owner = self.owner.as_ref()?.upgrade()?;
        Some(Caller { session: Some(owner), ..Caller::default() })
    }

    fn on_request(self: &Arc<Self>, env: &Envelope<'_>, related: Option<u64>) {
        let id = env.id.map(|i| i.get().to_owned()).unwrap_or_default();
        let reply_err = |code: i64, msg: &str| {
            if let Some(conn) = self.connection() {
                let _ = conn.link.send(Bytes::from(jsonrpc::error_response(Some(&id), code, msg, None)), None);
            }
        };
        if env.method() == "ping" {
            if let Some(conn) = self.connection() {
                let _ = conn.link.send(Bytes::from(jsonrpc::result_response(&id, "{}")), None);
            }
            return;
        }
        let Some(caller) = self.caller_for(related) else {
            if env.method() == "roots/list" && related.is_none() {
                // Asked outside any call (servers ask right after `initialized`): the gateway
                // itself has no roots. Not worth a warning: no client was involved.
                tracing::debug!(server = %self.def.name, "roots/list outside any call: answered with no roots");
                if let Some(conn) = self.connection() {
                    let _ = conn.link.send(Bytes::from(jsonrpc::result_response(&id, r#"{"roots":[]}"#)), None);
                }
                return;
            }
            tracing::warn!(server = %self.def.name, method = env.method(), "server-to-client request cannot be attributed to one session; refused");
            reply_err(
                code::INTERNAL_ERROR,
                "Portcullis cannot route this request: several clients share this server (set share: per_session)",
            );
            return;
        };
        let Some(session) = caller.session.clone() else {
            if let Some(asks) = &caller.asks {
                let ask = Ask {
                    upstream_id: id.clone().into(),
                    method: env.method().to_owned(),
                    params: env.params.map(ToOwned::to_owned),
                };
                if asks.try_send(ask).is_ok() {
                    return;
                }
            }
            reply_err(code::METHOD_NOT_FOUND, "the client is stateless and cannot answer requests");
            return;
        };
        let down_id = session.add_client_request(ClientRequestRoute::Upstream {
            upstream: self.clone(),
            upstream_id: id.clone().into(),
        });
        let msg = jsonrpc::with_id(env, &format!("\"pcs-{down_id}\""));
        if !caller.deliver(Bytes::from(msg)) {
            session.take_client_request(down_id);
            reply_err(code::INTERNAL_ERROR, "the client has no open stream to receive this request");
        }
    }
}

/// Whether a `notifications/message` passes the level its session asked for.
fn wants_log(caller: &Caller, env: &Envelope<'_>) -> bool {
    let Some(session) = &caller.session else { return true };
    let level = env.params.and_then(|p| RawObject::parse(p).ok()).and_then(|o| o.get_str("level"));
    level.as_deref().and_then(session::log_rank).is_none_or(|rank| session.wants_log(rank))
}

/// The methods that may answer with `InputRequiredResult` (2026-07-28).
const INPUT_REQUEST_METHODS: [&str; 3] = ["tools/call", "prompts/get", "resources/read"];

/// Marks a `requestState` that Portcullis minted (a parked call), as opposed to an upstream's.
const PARKED_PREFIX: &str = "pcs-parked.";

/// A stateless call waiting for its caller's answers (see `Upstream::call_stateless`).
struct Parked {
    conn: Arc<Connection>,
    id: u64,
    rx: oneshot::Receiver<Result<Reply, UpstreamError>>,
    asks_tx: mpsc::Sender<Ask>,
    asks_rx: mpsc::Receiver<Ask>,
    /// Keys of the `inputRequests` sent, with the upstream's request ids.
    asked: Vec<(String, Box<str>)>,
    method: String,
    /// Who it was called by (only they may resume it).
    principal: Option<Arc<str>>,
    deadline: Instant,
}

/// Cancels a stateless call upstream when its wait is dropped (the client closed the stream).
struct StatelessGuard<'a> {
    up: &'a Arc<Upstream>,
    conn: Arc<Connection>,
    id: u64,
    armed: bool,
}

impl Drop for StatelessGuard<'_> {
    fn drop(&mut self) {
        if self.armed && lock(&self.up.pending).remove(&self.id).is_some() {
            send_cancel(&self.conn, self.id, Some("the client closed the request"));
        }
    }
}

/// Removes the pending entry if the call did not complete (caller dropped or timed out), and
/// cancels upstream when the caller's era says a dropped request is a cancelled one.
struct CallGuard<'a> {
    up: &'a Arc<Upstream>,
    conn: &'a Arc<Connection>,
    id: u64,
    down_id: Option<&'a str>,
    caller: &'a Caller,
    armed: bool,
}

impl CallGuard<'_> {
    fn cancel_upstream(&self, reason: &str) {
        if lock(&self.up.pending).remove(&self.id).is_some() || self.armed {
            send_cancel(self.conn, self.id, Some(reason));
        }
    }
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        if let (Some(s), Some(d)) = (&self.caller.session, self.down_id) {
            s.untrack(d);
        }
        if self.armed && lock(&self.up.pending).remove(&self.id).is_some() && self.caller.cancel_on_drop {
            send_cancel(self.conn, self.id, Some("the client closed the request"));
        }
    }
}

fn send_cancel(conn: &Connection, id: u64, reason: Option<&str>) {
    if conn.link.abort(id) {
        return;
    }
    let params = match reason {
        Some(r) => format!(r#"{{"requestId":{id},"reason":{}}}"#, jsonrpc::quote(r)),
        None => format!(r#"{{"requestId":{id}}}"#),
    };
    let _ = conn.link.send(Bytes::from(jsonrpc::notification("notifications/cancelled", Some(&params))), None);
}

/// The `_meta` keys that make a request 2026-07-28: removed when a stateless caller's request
/// goes to a session-era connection, which negotiated its version once.
const ERA_META_KEYS: [&str; 4] = [
    "io.modelcontextprotocol/protocolVersion",
    "io.modelcontextprotocol/clientCapabilities",
    "io.modelcontextprotocol/clientInfo",
    LOG_LEVEL_META,
];

/// How [`rewrite_params`] rewrites a request's params for its connection.
#[derive(Default)]
struct Rewrite<'a> {
    /// Top-level members replaced (raw JSON values).
    edits: &'a [(&'a str, &'a str)],
    /// The upstream request id, which replaces `_meta.progressToken`.
    id_text: &'a str,
    /// Members set in `_meta`.
    meta_adds: &'a [(&'a str, &'a str)],
    /// Add the client's description a 2026-07-28 upstream needs in every request's `_meta`
    /// ([`http::client_meta_for`]).
    client_meta: bool,
    /// Drop the [`ERA_META_KEYS`] from `_meta`.
    strip_era: bool,
    /// The member whose string value (after the edits) is returned as the request's name.
    name_key: Option<&'a str>,
}

/// What [`rewrite_params`] made.
#[derive(Debug)]
struct Rewritten {
    /// The params to send.
    params: Option<String>,
    /// The caller's own `_meta.progressToken`.
    progress_token: Option<Box<RawValue>>,
    /// The string value of [`Rewrite::name_key`].
    name: Option<String>,
}

/// Applies member edits, swaps `_meta.progressToken` for the upstream id, sets `meta_adds`
/// and `meta_defaults` in `_meta` and, with `strip_era`, drops its [`ERA_META_KEYS`]: the
/// params are parsed once, and only when something changes.
fn rewrite_params(params: Option<&RawValue>, r: &Rewrite<'_>) -> Result<Rewritten, TransportError> {
    let defaults = |meta: &RawObject| if r.client_meta { http::client_meta_for(meta, r.meta_adds) } else { Vec::new() };
    let Some(params) = params else {
        if r.meta_adds.is_empty() && !r.client_meta {
            return Ok(Rewritten { params: None, progress_token: None, name: None });
        }
        let mut meta: Vec<(&str, &str)> = r.meta_adds.to_vec();
        meta.extend(defaults(&RawObject::default()));
        let params = format!(r#"{{"_meta":{}}}"#, RawObject::default().to_json_with(&meta));
        return Ok(Rewritten { params: Some(params), progress_token: None, name: None });
    };
    let strip_era = r.strip_era && params.get().contains("io.modelcontextprotocol/");
    let needs_meta = !r.meta_adds.is_empty() || r.client_meta || strip_era || params.get().contains("progressToken");
    if r.edits.is_empty() && !needs_meta && r.name_key.is_none() {
        return Ok(Rewritten { params: Some(params.get().to_owned()), progress_token: None, name: None });
    }
    let obj =
        RawObject::parse(params).map_err(|e| TransportError::Unsendable(format!("params must be an object: {e}")))?;
    let name = r.name_key.and_then(|k| match r.edits.iter().find(|(e, _)| *e == k) {
        Some((_, v)) => serde_json::from_str::<String>(v).ok(),
        None => obj.get_str(k),
    });
    if r.edits.is_empty() && !needs_meta {
        return Ok(Rewritten { params: Some(params.get().to_owned()), progress_token: None, name });
    }
    let mut token = None;
    let mut meta_json = None;
    if needs_meta {
        let mut meta_obj = match obj.get("_meta") {
            Some(meta) => RawObject::parse(meta)
                .map_err(|e| TransportError::Unsendable(format!("_meta must be an object: {e}")))?,
            None => RawObject::default(),
        };
        if strip_era {
            let before = meta_obj.0.len();
            meta_obj.0.retain(|(k, _)| !ERA_META_KEYS.contains(&k.as_ref()));
            if meta_obj.0.len() != before {
                meta_json = Some(meta_obj.to_json_with(&[]));
            }
        }
        let mut meta_edits: Vec<(&str, &str)> = r.meta_adds.to_vec();
        meta_edits.extend(defaults(&meta_obj));
        if let Some(t) = meta_obj.get("progressToken") {
            token = Some(t.to_owned());
            meta_edits.push(("progressToken", r.id_text));
        }
        if !meta_edits.is_empty() {
            meta_json = Some(meta_obj.to_json_with(&meta_edits));
        }
    }
    let mut all: Vec<(&str, &str)> = r.edits.to_vec();
    if let Some(m) = &meta_json {
        all.push(("_meta", m));
    }
    Ok(Rewritten { params: Some(obj.to_json_with(&all)), progress_token: token, name })
}

fn parse_init(result: &str) -> Result<ServerInfo, TransportError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Init {
        protocol_version: String,
        #[serde(default)]
        capabilities: Option<Box<RawValue>>,
        #[serde(default)]
        server_info: Option<Box<RawValue>>,
        #[serde(default)]
        instructions: Option<String>,
    }
    let init: Init = serde_json::from_str(result)
        .map_err(|e| TransportError::Initialize(format!("not an InitializeResult: {e}")))?;
    // A version Portcullis does not speak is not guessed at: the server is refused.
    let protocol_version =
        ProtocolVersion::parse(&init.protocol_version).filter(|v| v.is_handshake()).ok_or_else(|| {
            TransportError::Initialize(format!(
                "the server speaks protocol version {:?}, which Portcullis does not",
                init.protocol_version
            ))
        })?;
    Ok(ServerInfo {
        protocol_version,
        capabilities: init.capabilities.unwrap_or_else(|| jsonrpc::raw("{}".into())),
        server_info: init.server_info.unwrap_or_else(|| jsonrpc::raw("{}".into())),
        instructions: init.instructions,
    })
}

/// What a session keeps of an instance: a client's answer goes back under the id the upstream
/// used; a cancellation is `notifications/cancelled` upstream.
impl session::Instance for Upstream {
    fn answer(&self, upstream_id: &str, env: &Envelope<'_>) {
        if let Some(conn) = self.connection() {
            let _ = conn.link.send(Bytes::from(jsonrpc::with_id(env, upstream_id)), None);
        }
    }

    fn cancel(&self, id: u64, reason: Option<&str>) {
        Upstream::cancel(self, id, reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_for_processes_only_and_backoff_is_bounded() {
        let t0 = Instant::now();
        let mut process = Breaker::new(false);
        let delays: Vec<Retry> = (0..5).map(|i| process.failed(t0 + Duration::from_secs(i))).collect();
        assert_eq!(delays[..4], [100, 200, 400, 800].map(|ms| Retry::After(Duration::from_millis(ms))));
        assert_eq!(delays[4], Retry::Open(BREAKER_COOLDOWN), "five failures within a minute");
        assert_eq!(process.failed(t0 + Duration::from_secs(100)), Retry::After(BACKOFF_START), "reset once open");
        // Failures a minute apart never open it; the backoff stops at 10 s.
        let mut slow = Breaker::new(false);
        let last = (0..10).map(|i| slow.failed(t0 + Duration::from_secs(61 * i))).last();
        assert_eq!(last, Some(Retry::After(BACKOFF_MAX)));
        // A remote server: never open, at most a second between attempts.
        let mut remote = Breaker::new(true);
        let all: Vec<Retry> = (0..20).map(|_| remote.failed(t0)).collect();
        assert!(all.iter().all(|r| matches!(r, Retry::After(d) if *d <= REMOTE_BACKOFF_MAX)), "{all:?}");
        assert_eq!(all.last(), Some(&Retry::After(REMOTE_BACKOFF_MAX)));
        remote.reset();
        assert_eq!(remote.failed(t0), Retry::After(BACKOFF_START));
    }

    #[test]
    fn progress_token_is_swapped() {
        let p = jsonrpc::raw(r#"{"name":"x__y","_meta":{"progressToken":"abc","other":1},"arguments":{}}"#.into());
        let edit = Rewrite { edits: &[("name", "\"y\"")], id_text: "42", ..Default::default() };
        let out = rewrite_params(Some(&p), &edit).unwrap();
        assert_eq!(out.params.unwrap(), r#"{"name":"y","_meta":{"progressToken":42,"other":1},"arguments":{}}"#);
        assert_eq!(out.progress_token.unwrap().get(), "\"abc\"");
        let plain = jsonrpc::raw(r#"{"a":1}"#.into());
        let out = rewrite_params(Some(&plain), &Rewrite { id_text: "1", ..Default::default() }).unwrap();
        assert_eq!(out.params.unwrap(), r#"{"a":1}"#);
        assert!(out.progress_token.is_none());
    }

    #[test]
    fn a_stateless_upstreams_request_is_made_whole_in_one_pass() {
        let stateless = |edits, meta_adds| Rewrite {
            edits,
            id_text: "9",
            meta_adds,
            client_meta: true,
            name_key: Some("name"),
            ..Default::default()
        };
        // The caller's own capabilities and client info stand; the version is ours; the name
        // is the edited one.
        let p = jsonrpc::raw(
            r#"{"name":"h__t","_meta":{"io.modelcontextprotocol/protocolVersion":"2099-01-01","io.modelcontextprotocol/clientCapabilities":{"x":{}}}}"#.into(),
        );
        let out = rewrite_params(Some(&p), &stateless(&[("name", "\"t\"")], &[])).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out.params.unwrap()).unwrap();
        assert_eq!(v["name"], "t");
        assert_eq!(v["_meta"]["io.modelcontextprotocol/protocolVersion"], "2026-07-28");
        assert_eq!(v["_meta"]["io.modelcontextprotocol/clientCapabilities"], serde_json::json!({"x":{}}));
        assert_eq!(v["_meta"]["io.modelcontextprotocol/clientInfo"]["name"], "portcullis");
        assert_eq!(out.name.as_deref(), Some("t"));
        // A session caller's capabilities (a meta add) win over the defaults; no params at all
        // still get the client's description.
        let caps = [(CAPABILITIES_META, r#"{"sampling":{}}"#)];
        let out = rewrite_params(Some(&jsonrpc::raw(r#"{"name":"t"}"#.into())), &stateless(&[], &caps)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out.params.unwrap()).unwrap();
        assert_eq!(v["_meta"][CAPABILITIES_META], serde_json::json!({"sampling":{}}));
        assert_eq!(out.name.as_deref(), Some("t"));
        let out = rewrite_params(None, &stateless(&[], &[])).unwrap();
        let v: serde_json::Value = serde_json::from_str(&out.params.unwrap()).unwrap();
        assert_eq!(v["_meta"]["io.modelcontextprotocol/protocolVersion"], "2026-07-28");
        assert_eq!(v["_meta"][CAPABILITIES_META], serde_json::json!({}));
    }

    #[test]
    fn era_keys_are_stripped_for_session_upstreams() {
        let p = jsonrpc::raw(
            r#"{"name":"t","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{},"progressToken":7,"x":1}}"#.into(),
        );
        let out = rewrite_params(Some(&p), &Rewrite { id_text: "3", strip_era: true, ..Default::default() }).unwrap();
        assert_eq!(out.params.unwrap(), r#"{"name":"t","_meta":{"progressToken":3,"x":1}}"#);
        assert_eq!(out.progress_token.unwrap().get(), "7");
        let out = rewrite_params(Some(&p), &Rewrite { id_text: "3", ..Default::default() }).unwrap();
        assert!(out.params.unwrap().contains("protocolVersion"));
    }
}
