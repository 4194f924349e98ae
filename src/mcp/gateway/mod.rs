//! The gateway core: which upstream instance serves a request, and the aggregated view.
//!
//! `/mcp` presents every server as one: tools and prompts are named `server{sep}name`, lists are
//! merged across servers with one opaque, MAC-protected cursor, resources are routed by an index
//! of each server's URIs and templates. `/servers/{name}/mcp` passes one server through
//! unchanged. Invariants: a server that is down is left out of lists (the rest answer); the
//! config and the credential table are one snapshot, swapped whole; unknown names get the same
//! JSON-RPC error whether the server or the tool is unknown; a list cursor is valid only for the
//! principal and the list it was minted for; resource subscriptions on shared upstreams are reference-counted across
//! sessions, so one session's unsubscribe never ends another's.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::join_all;
use serde_json::value::RawValue;

mod routing;
mod subscriptions;

use super::jsonrpc::{self, Envelope, RawObject, Reply, code};
use super::lists::{self, ListKind};
use super::resources::ResourceIndex;
use super::session::{self, Caller, ClientRequestRoute, Scope, Session};
use super::upstream::{Hub, Status, Upstream};
use super::version::ProtocolVersion;
use crate::auth::{Authenticator, Identity};
use crate::authz::GrantKind;
use crate::config::{Config, ServerDef, Share};
use crate::sharded::Sharded;
use crate::sharded::lock;

/// One request as the gateway routes it: the envelope's parts.
pub(crate) struct Request<'a> {
    /// The JSON-RPC method, as the client wrote it.
    pub method: &'a str,
    /// Raw params.
    pub params: Option<&'a RawValue>,
    /// The caller's raw id (for cancellation tracking).
    pub id: Option<&'a str>,
}

/// One request, whatever surface it came by: who sent it and what it may see. It is built
/// once, by the surface, from what the gate admitted, and read (never changed) by everything
/// behind it.
pub(crate) struct Ctx {
    /// What the gate admitted: the snapshot, the identity and the client's address.
    pub who: Who,
    /// Which servers are visible.
    pub scope: Scope,
    /// How to reach the caller: its session (absent for a stateless request) and its
    /// request's own stream.
    pub caller: Caller,
    /// The protocol version of this request (negotiated, or the stateless one).
    pub protocol_version: ProtocolVersion,
}

/// The caller of one request as the gate admitted it.
#[derive(Clone)]
pub(crate) struct Who {
    /// The config and credentials the gate checked this request against: everything behind
    /// the gate reads this one snapshot, never a newer one.
    pub snapshot: Arc<Snapshot>,
    /// Who the credential says the caller is (its grants decide what it reaches).
    pub identity: Arc<Identity>,
    /// The client's address (after `trusted_proxies`).
    pub client: std::net::IpAddr,
    /// The identity provider's access token the caller presented (only for such an identity):
    /// what a token exchange towards a server starts from. It goes to that provider only.
    pub subject_token: Option<Arc<str>>,
}

impl Who {
    /// This caller's context for one request.
    pub(crate) fn ctx(self, scope: Scope, mut caller: Caller, protocol_version: ProtocolVersion) -> Ctx {
        if caller.session.is_none() {
            caller.principal = Some(self.identity.key.clone());
        }
        Ctx { who: self, scope, caller, protocol_version }
    }
}

/// What routing found about one request, for its audit record: [`Gateway::handle`] fills it.
#[derive(Debug, Default)]
pub(crate) struct Routed {
    /// The server addressed.
    pub server: Option<String>,
    /// The tool, prompt or resource named.
    pub name: Option<String>,
    /// Why the request was refused, if it was.
    pub refused: Option<String>,
    /// The answer was a JSON-RPC error.
    pub error: bool,
    /// An access token was refused an item another scope of its issuer grants: an HTTP
    /// surface answers 403 `insufficient_scope` with this challenge instead of the answer.
    pub step_up: Option<StepUp>,
}

/// What a 403 `insufficient_scope` names (RFC 6750 §3.1, RFC 9728 §5.1).
#[derive(Debug)]
pub(crate) struct StepUp {
    /// The protected resource metadata URL of the endpoint.
    pub metadata: String,
    /// Every scope the token should come back with, space-separated.
    pub scope: String,
}

impl Routed {
    /// Records the target.
    fn target(&mut self, server: &str, name: Option<&str>) {
        self.server = Some(server.to_owned());
        self.name = name.map(str::to_owned);
    }

    /// Records a refusal of a target.
    fn refuse(&mut self, server: &str, name: &str, why: &str) {
        self.target(server, Some(name));
        self.refused = Some(why.to_owned());
    }

    /// Records a refusal of an item the caller's grants lack, with the step-up its access
    /// token could take (see [`crate::auth::Authenticator::step_up`]).
    fn refuse_item(&mut self, ctx: &Ctx, config: &Config, kind: GrantKind, server: &str, name: &str, why: &str) {
        self.refuse(server, name, why);
        let who = &ctx.who;
        self.step_up = who.snapshot.auth.step_up(&who.identity, kind, server, name).map(|scope| StepUp {
            metadata: crate::oauth::Endpoint {
                base: config.public_base(),
                server: match &ctx.scope {
                    Scope::One(s) => Some(s.clone()),
                    Scope::All => None,
                },
            }
            .metadata_url(),
            scope,
        });
    }
}

/// The gateway.
pub struct Gateway {
    /// The config and the credential table built from it, swapped together: a reload is seen
    /// whole or not at all.
    snapshot: ArcSwap<Snapshot>,
    /// Shared instances by server name: read on every call without a lock, replaced whole on
    /// the rare start or stop.
    upstreams: ArcSwap<HashMap<String, Arc<Upstream>>>,
    sessions: Sharded<String, Arc<Session>>,
    /// Each session's own instances of `per_session` servers, by session key, then server:
    /// owned here, not by the session, so sessions do not depend on upstreams.
    per_session: Sharded<u64, HashMap<String, Arc<Upstream>>>,
    resources: ResourceIndex,
    subscriptions: Mutex<HashMap<(String, String), usize>>,
    cursors: lists::CursorKey,
    http: crate::mcp::upstream::http::Clients,
    /// The access tokens of servers with `oauth:`, by server, shared by all its instances (a
    /// `per_session` server's sessions use one token), replaced when the grant changes.
    credentials: Mutex<HashMap<String, Arc<crate::oauth::client::TokenSource>>>,
    /// Portcullis' authorization server's logins and codes in progress (they outlive reloads).
    authorization: crate::oauth::server::AuthorizationState,
    /// Stateless calls parked here, and retries relayed to the replicas holding theirs.
    parking: Arc<crate::mcp::upstream::Parking>,
    /// Instances of `per_user` servers for stateless callers, by identity and server (a session
    /// caller's are its own, in `per_session`).
    per_identity: Mutex<HashMap<IdentityServer, Arc<Upstream>>>,
    me: Weak<Gateway>,
    initializes: AtomicU64,
    discovers: AtomicU64,
    audit: crate::audit::Audit,
    metrics: crate::metrics::Metrics,
    draining: std::sync::atomic::AtomicBool,
    store: Arc<crate::store::StoreView>,
    /// The Redis replicas share (`state:`), fixed at start.
    shared_state: Option<Arc<crate::state::SharedState>>,
    /// Per principal: (sessions, legacy SSE streams) open, for the limits.
    held: Sharded<Arc<str>, (usize, usize)>,
    /// Sessions ended, by [`EndCause`].
    ended: [AtomicU64; EndCause::ALL.len()],
    /// Bumped whenever something a watcher can see changes (see [`Gateway::changes`]).
    changes: tokio::sync::watch::Sender<u64>,
    /// Seals session ids when the config has no vault key (`PORTCULLIS_SECRET_KEY`): ids then
    /// open on this process only.
    own_ring: crate::vault::KeyRing,
    /// Ids of sessions ended for good (deleted by their clients or idle, here or on another
    /// replica), by digest, with when the id would expire anyway: never opened again. At most
    /// [`MAX_REMEMBERED`]; the store holds them all.
    deleted: Mutex<HashMap<[u8; 32], i64>>,
    /// When the store was last asked which sessions were deleted elsewhere (Unix ms).
    deleted_checked: std::sync::atomic::AtomicI64,
}

/// Why a session ended (the `cause` label of `portcullis_sessions_ended_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndCause {
    /// The client sent DELETE.
    Deleted,
    /// Its stream closed (legacy SSE, `subscriptions/listen`) or its stdio client went away.
    Closed,
    /// Unused for `limits.session_idle_timeout`.
    Idle,
    /// Its credential was revoked, expired, or lost the server.
    Revoked,
}

impl EndCause {
    /// Every cause, in label order.
    pub(crate) const ALL: [EndCause; 4] = [EndCause::Deleted, EndCause::Closed, EndCause::Idle, EndCause::Revoked];

    /// The label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            EndCause::Deleted => "deleted",
            EndCause::Closed => "closed",
            EndCause::Idle => "idle",
            EndCause::Revoked => "revoked",
        }
    }
}

/// One configuration and everything derived from it, replaced whole on reload.
pub(crate) struct Snapshot {
    /// The validated config.
    pub config: Arc<Config>,
    /// The credential table built from it.
    pub auth: Arc<Authenticator>,
}

/// Why a server could not be started or stopped (`POST /servers/{name}/start|stop`).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ControlError {
    /// No such server in the config.
    #[error("no such server")]
    Unknown,
    /// Not in a state for it (already running, disabled, per-session).
    #[error("{0}")]
    Conflict(String),
}

/// Why a session could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SessionLimit {
    /// The identity holds `limits.max_sessions_per_identity` (or its SSE streams) already.
    #[error("this identity holds {0} open sessions or streams of this kind already (the limit); end some first")]
    Identity(usize),
    /// The gateway holds `limits.max_sessions` already.
    #[error("the gateway holds {0} open sessions (the limit); try again later")]
    Gateway(usize),
}

/// How clients have opened conversations since start: `initialize` handshakes (each mints a
/// session) and 2026-07-28 `server/discover` requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshakes {
    /// `initialize` requests answered.
    pub initialize: u64,
    /// `server/discover` requests answered.
    pub discover: u64,
}

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The OS random source failed (session ids and the cursor key need it).
    #[error(transparent)]
    Randomness(#[from] crate::random::NoRandomness),
    /// The token store exists (or is named) but cannot be opened or read.
    #[error("cannot use the token store {path}: {source}")]
    Store {
        /// The store (shown without secrets).
        path: crate::store::StoreLocation,
        /// Why.
        #[source]
        source: crate::store::StoreError,
    },
    /// The shared state's URL cannot be used.
    #[error("cannot use the shared state {at}: {source}")]
    State {
        /// The state (shown without secrets).
        at: crate::state::StateLocation,
        /// Why.
        #[source]
        source: crate::state::StateError,
    },
}

/// An identity's key and a server's name.
type IdentityServer = (Arc<str>, String);

impl Gateway {
    /// Opens the config's token store, builds the gateway and starts every enabled shared
    /// server. Refuses when the store exists but cannot be read, or when there is no randomness.
    pub fn start(config: Config) -> Result<Arc<Self>, StartError> {
        let (path, named) = config.store();
        let store =
            crate::store::StoreView::open(path.clone(), named).map_err(|source| StartError::Store { path, source })?;
        Self::start_with(config, store)
    }

    /// Like [`Gateway::start`], with a store view already opened.
    pub(crate) fn start_with(config: Config, store: Arc<crate::store::StoreView>) -> Result<Arc<Self>, StartError> {
        let cursors = lists::CursorKey::new(crate::random::key()?);
        let own_ring = crate::vault::KeyRing::random()?;
        let shared_state = match &config.state_at {
            Some(at) => Some(
                crate::state::SharedState::start(at).map_err(|source| StartError::State { at: at.clone(), source })?,
            ),
            None => None,
        };
        let authenticator = authenticator_for(&config, Some(store.clone()), shared_state.clone());
        authenticator.start_providers();
        let audit = crate::audit::Audit::start(config.audit_target()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot open the audit file; audit records go to stderr");
            crate::audit::Audit::start(None).unwrap_or_else(|_| crate::audit::Audit::discard())
        });
        let http = crate::mcp::upstream::http::Clients::new();
        let gw = Arc::new_cyclic(|me| Gateway {
            snapshot: ArcSwap::from_pointee(Snapshot { config: Arc::new(config), auth: Arc::new(authenticator) }),
            upstreams: ArcSwap::from_pointee(HashMap::new()),
            sessions: Sharded::new(),
            per_session: Sharded::new(),
            resources: ResourceIndex::default(),
            subscriptions: Mutex::new(HashMap::new()),
            cursors,
            http,
            credentials: Mutex::new(HashMap::new()),
            authorization: crate::oauth::server::AuthorizationState::default(),
            parking: Arc::default(),
            per_identity: Mutex::new(HashMap::new()),
            me: me.clone(),
            initializes: AtomicU64::new(0),
            discovers: AtomicU64::new(0),
            audit,
            metrics: crate::metrics::Metrics::default(),
            store,
            shared_state,
            draining: std::sync::atomic::AtomicBool::new(false),
            held: Sharded::new(),
            ended: std::array::from_fn(|_| AtomicU64::new(0)),
            changes: tokio::sync::watch::Sender::new(0),
            own_ring,
            deleted: Mutex::new(HashMap::new()),
            deleted_checked: std::sync::atomic::AtomicI64::new(crate::store::now_ms()),
        });
        let config = gw.config();
        gw.configure_metrics(&config);
        if let Some(state) = &gw.shared_state {
            gw.hear_answers(state);
            gw.parking.relay_through(state);
        }
        for def in &config.servers {
            if def.share == Share::Shared {
                gw.start_shared(def.clone());
            }
        }
        // Revocation, expiry and lost grants end the identity's sessions and streams.
        let weak = Arc::downgrade(&gw);
        let announced = gw.store.announcements();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_EVERY);
            let mut flushed = tokio::time::Instant::now();
            let mut pruned = tokio::time::Instant::now();
            loop {
                // A change another replica announces is acted on at once; polling is the net.
                tokio::select! {
                    _ = tick.tick() => {}
                    () = announced.notified() => {}
                }
                let Some(gw) = weak.upgrade() else { return };
                gw.sweep_sessions().await;
                gw.authenticator().release_idle_leases();
                if pruned.elapsed() >= PRUNE_EVERY {
                    pruned = tokio::time::Instant::now();
                    gw.authenticator().prune();
                }
                if flushed.elapsed() >= std::time::Duration::from_secs(60) {
                    flushed = tokio::time::Instant::now();
                    if let Err(e) = gw.store.flush_used(crate::store::now_ms()) {
                        tracing::warn!(error = %e, "could not record token use");
                    }
                }
            }
        });
        Ok(gw)
    }

    /// Ends every session whose identity no longer holds: revoked (gone from the credential
    /// table), expired, or no longer reaching the session's server.
    pub async fn sweep_sessions(&self) {
        // The store is synchronous (SQLite, or PostgreSQL on its own threads): read it off the
        // async threads.
        let store = self.store.clone();
        let polled = tokio::time::timeout(POLL_DEADLINE, tokio::task::spawn_blocking(move || store.poll())).await;
        let polled = polled.unwrap_or_else(|_| {
            // A store that does not answer in time cannot confirm anything meanwhile (a
            // partition): fail closed now rather than trust the caches for the whole wait.
            self.store.fail();
            Ok(Err(crate::store::StoreError::Unavailable("no answer to the change poll in time".into())))
        });
        match polled {
            Ok(Err(e)) => tracing::warn!(error = %e, "token store unavailable"),
            // A login, logout or refresh elsewhere: accounts are read from the vault again.
            Ok(Ok(true)) => {
                let accounts = {
                    let all = lock(&self.credentials);
                    all.values().filter(|c| c.vault_changed()).count()
                };
                // A login, logout or refresh is a change of the gateway's state (`/servers`).
                if accounts > 0 {
                    self.changed();
                }
                self.end_sessions_deleted_elsewhere().await;
            }
            _ => {}
        }
        let auth = self.authenticator();
        // stdio has no tokens to revoke: the launching process is the client.
        let sessions: Vec<Arc<Session>> =
            self.sessions().into_iter().filter(|s| s.transport != session::ClientTransport::Stdio).collect();
        let now = std::time::SystemTime::now();
        let mut stale: Vec<String> = sessions
            .iter()
            .filter(|s| s.identity.token_id.is_none() && config_identity_stale(&auth, s, now))
            .map(|s| s.id.clone())
            .collect();
        // Issued tokens: gone once revoked, expired or past their rotation's grace. Their rows
        // come from the store (cached until it changes), read off the async threads in one go;
        // a store that cannot answer right now closes nothing.
        let issued: Vec<(String, String)> =
            sessions.iter().filter_map(|s| s.current_token().map(|t| (s.id.clone(), t))).collect();
        if !issued.is_empty() {
            let auth = auth.clone();
            let gone = tokio::task::spawn_blocking(move || {
                issued.into_iter().filter(|(_, t)| auth.store_token_usable(t) == Some(false)).map(|(s, _)| s).collect()
            })
            .await
            .unwrap_or_default();
            stale.extend::<Vec<String>>(gone);
        }
        for id in stale {
            tracing::info!("closing a session whose credential was revoked, expired or lost the server");
            self.end_session_as(&id, EndCause::Revoked).await;
        }
        // Session-era sessions nobody uses any more (many clients never send DELETE).
        let idle = self.config().limits.session_idle_timeout;
        let now = crate::store::now_ms();
        let unused: Vec<String> = sessions
            .iter()
            .filter(|s| s.transport == session::ClientTransport::Streamable && s.idle(now, idle))
            .map(|s| s.id.clone())
            .collect();
        // Alone (no shared state), over for good, like a deleted one: no replica reopens it (its
        // client initializes). Among replicas sharing a state, idle here says nothing of the
        // others (its stream may be open on one, its calls going to another): it ends here
        // only, and its sealed id's expiry bounds its life.
        if !unused.is_empty() && self.shared_state.is_none() {
            self.forget_session_ids(&unused).await;
        }
        for id in unused {
            self.end_session_as(&id, EndCause::Idle).await;
        }
    }

    /// Starts a stopped shared server (`POST /servers/{name}/start`).
    pub(crate) fn start_server(&self, name: &str) -> Result<(), ControlError> {
        let config = self.config();
        let def = config.server(name).ok_or(ControlError::Unknown)?;
        if !def.enabled {
            return Err(ControlError::Conflict(format!("server {name} is disabled in the config")));
        }
        if def.share != Share::Shared {
            return Err(ControlError::Conflict(format!("server {name} runs one instance per session")));
        }
        if self.upstream(name).is_some_and(|u| u.status().state != crate::mcp::upstream::State::Stopped) {
            return Err(ControlError::Conflict(format!("server {name} is already running")));
        }
        self.start_shared(def.clone());
        Ok(())
    }

    /// Stops a shared server (`POST /servers/{name}/stop`): its calls in flight end with an
    /// error naming it, sessions get `*/list_changed`, the others carry on.
    pub(crate) async fn stop_server(&self, name: &str) -> Result<(), ControlError> {
        let config = self.config();
        let def = config.server(name).ok_or(ControlError::Unknown)?;
        if def.share != Share::Shared {
            return Err(ControlError::Conflict(format!("server {name} runs one instance per session")));
        }
        match self.upstream(name) {
            Some(up) if up.status().state != crate::mcp::upstream::State::Stopped => {
                up.stop().await;
                Ok(())
            }
            _ => Err(ControlError::Conflict(format!("server {name} is not running"))),
        }
    }

    /// Reloads from the file the config came from; the errors when it is invalid (the running
    /// config stays).
    pub(crate) async fn reload_from_source(&self) -> Result<(), Vec<String>> {
        let Some(path) = self.config().source.clone() else {
            return Err(vec!["there is no config file to reload (the built-in demo is running)".into()]);
        };
        match crate::config::load(&path) {
            Ok(next) => {
                self.reload(next).await;
                Ok(())
            }
            Err(e) => {
                self.metrics.reloaded(false);
                tracing::error!("config not reloaded: {e}");
                Err(e.errors.iter().map(ToString::to_string).collect())
            }
        }
    }

    /// Replaces the whole configuration: credentials and grants at once (sessions of identities
    /// that lost them are ended by the next sweep, within a second); servers whose definition
    /// changed are restarted, removed ones stopped, new ones started; unchanged ones and every
    /// other session carry on.
    pub async fn reload(&self, mut config: Config) {
        config.listen = self.config().listen;
        let old = self.config();
        // A `--generate-token` token lives as long as the process (marked by its source, which
        // no config entry can carry; its name is reserved in config files).
        for t in old.auth.tokens.iter().filter(|t| t.source == crate::credentials::TokenSource::Generated) {
            config.auth.tokens.push(t.clone());
        }
        if config.state_at != old.state_at {
            tracing::warn!(
                "the shared state (state:) changed in the config: the one the gateway started with stays until a restart"
            );
        }
        let mut authenticator = authenticator_for(&config, Some(self.store.clone()), self.shared_state.clone());
        authenticator.adopt_providers(&self.authenticator());
        authenticator.start_providers();
        let config = Arc::new(config);
        self.snapshot.store(Arc::new(Snapshot { config: config.clone(), auth: Arc::new(authenticator) }));
        self.configure_metrics(&config);
        self.metrics.reloaded(true);
        let mut stops = Vec::new();
        for def in &old.servers {
            let kept = config.server(&def.name).is_some_and(|n| **n == **def);
            if !kept && let Some(up) = self.remove_upstream(&def.name) {
                stops.push(up);
            }
        }
        for up in stops {
            up.stop().await;
            self.list_changed(&up.def.name, "");
        }
        for def in &config.servers {
            if def.share == Share::Shared && def.enabled && self.upstream(&def.name).is_none() {
                self.start_shared(def.clone());
            }
        }
        log_changes(&old, &config);
        self.sweep_sessions().await;
        self.changed();
    }

    fn hub(&self) -> Weak<dyn Hub> {
        let w: Weak<dyn Hub> = self.me.clone();
        w
    }

    /// The token source of a server with `oauth:` (the one its instances share, or a new one
    /// when the grant changed).
    fn credential(&self, def: &ServerDef) -> Option<Arc<crate::oauth::client::TokenSource>> {
        self.credential_of(def, "")
    }

    /// The token source of `subject`'s account at a server ("" for the server's own): a
    /// `per_user` server's identities each have their own.
    fn credential_of(&self, def: &ServerDef, subject: &str) -> Option<Arc<crate::oauth::client::TokenSource>> {
        let key = if subject.is_empty() { def.name.clone() } else { format!("{}\0{subject}", def.name) };
        let crate::config::Transport::Http { oauth: Some(grant), .. } = &def.transport else {
            lock(&self.credentials).remove(&key);
            return None;
        };
        let mut all = lock(&self.credentials);
        if let Some(c) = all.get(&key).filter(|c| c.grant() == grant) {
            return Some(c.clone());
        }
        let vault = match grant.flow {
            crate::oauth::client::Flow::AuthorizationCode { .. } => self
                .config()
                .vault
                .clone()
                .map(|keys| crate::oauth::client::Vault { store: self.store.location().clone(), keys }),
            crate::oauth::client::Flow::ClientCredentials | crate::oauth::client::Flow::TokenExchange { .. } => None,
        };
        let c = Arc::new(crate::oauth::client::TokenSource::new(grant.clone(), &def.name, vault).for_subject(subject));
        all.insert(key, c.clone());
        Some(c)
    }

    fn start_shared(&self, def: Arc<ServerDef>) -> Arc<Upstream> {
        let up = Upstream::start(def.clone(), self.hub(), None, self.http.clone(), self.credential(&def));
        self.upstreams.rcu(|m| {
            let mut m = HashMap::clone(m);
            m.insert(def.name.clone(), up.clone());
            m
        });
        up
    }

    fn remove_upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        let mut removed = None;
        self.upstreams.rcu(|m| {
            let mut m = HashMap::clone(m);
            removed = m.remove(name);
            m
        });
        removed
    }

    /// The current config snapshot.
    pub(crate) fn config(&self) -> Arc<Config> {
        self.snapshot.load().config.clone()
    }

    /// The current snapshot: config and credentials from one reload.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Records the address the listener actually bound (port 0 resolves to a real port), which
    /// the Origin and Host checks compare against.
    pub(crate) fn set_bound_address(&self, addr: std::net::SocketAddr) {
        if self.snapshot.load().config.listen != addr {
            self.snapshot.rcu(|s| {
                let mut c = Config::clone(&s.config);
                c.listen = addr;
                Snapshot { config: Arc::new(c), auth: s.auth.clone() }
            });
        }
    }

    /// The shared instance of a server.
    pub fn upstream(&self, name: &str) -> Option<Arc<Upstream>> {
        self.upstreams.load().get(name).cloned()
    }

    /// Status of every server, in config order.
    pub(crate) fn statuses(&self) -> Vec<(Arc<ServerDef>, Option<Status>)> {
        self.config().servers.iter().map(|d| (d.clone(), self.upstream(&d.name).map(|u| u.status()))).collect()
    }

    /// Registers a new session, within `limits` (the request's own snapshot's): per principal
    /// (sessions; legacy SSE streams separately) and in total. A stdio session (the one local
    /// client) is not counted.
    /// Registers a session within the limits. An id already registered keeps its session (two
    /// requests reopening one sealed id at once): that one is returned, and nothing is counted
    /// twice.
    pub(crate) fn add_session(
        &self,
        s: Arc<Session>,
        limits: &crate::config::Limits,
    ) -> Result<Arc<Session>, SessionLimit> {
        let stdio = s.transport == session::ClientTransport::Stdio;
        // Counted before the shard is locked: counting locks every shard.
        if !stdio && self.sessions.len() >= limits.max_sessions {
            return Err(SessionLimit::Gateway(limits.max_sessions));
        }
        let mut shard = lock(self.sessions.shard(&s.id));
        if let Some(existing) = shard.get(&s.id) {
            return Ok(existing.clone());
        }
        if !stdio {
            let mut held = lock(self.held.shard(&s.identity.key));
            let h = held.entry(s.identity.key.clone()).or_insert((0, 0));
            if h.0 >= limits.max_sessions_per_identity {
                return Err(SessionLimit::Identity(limits.max_sessions_per_identity));
            }
            if s.transport == session::ClientTransport::Sse && h.1 >= limits.max_sse_streams_per_identity {
                return Err(SessionLimit::Identity(limits.max_sse_streams_per_identity));
            }
            h.0 += 1;
            h.1 += usize::from(s.transport == session::ClientTransport::Sse);
        }
        if let Some(state) = &self.shared_state
            && matches!(s.transport, session::ClientTransport::Streamable | session::ClientTransport::Sse)
        {
            s.relay_through(state);
        }
        shard.insert(s.id.clone(), s.clone());
        drop(shard);
        self.changed();
        Ok(s)
    }

    /// Sessions ended since start, by cause.
    pub(crate) fn sessions_ended(&self) -> Vec<(EndCause, u64)> {
        EndCause::ALL.iter().zip(&self.ended).map(|(c, n)| (*c, n.load(Ordering::Relaxed))).collect()
    }

    /// Looks a session up by id.
    pub(crate) fn session(&self, id: &str) -> Option<Arc<Session>> {
        lock(self.sessions.shard(id)).get(id).cloned()
    }

    /// The ring session ids are sealed with: the vault's (shared by replicas with the same
    /// `PORTCULLIS_SECRET_KEY`), else this process's own.
    pub(crate) fn session_ring(&self, transport: session::ClientTransport) -> crate::vault::KeyRing {
        // A legacy SSE id never opens as a session-era one, nor the other way round.
        let purpose = match transport {
            session::ClientTransport::Sse => "mcp-sse-session-id",
            _ => "mcp-session-id",
        };
        match &self.config().vault {
            None if purpose == "mcp-session-id" => self.own_ring.clone(),
            _ => self.ring_for(purpose),
        }
    }

    /// A ring for `purpose`, derived from the vault's (shared by replicas with the same
    /// `PORTCULLIS_SECRET_KEY`), else from this process's own.
    pub(crate) fn ring_for(&self, purpose: &str) -> crate::vault::KeyRing {
        match &self.config().vault {
            Some(vault) => vault.for_purpose(purpose),
            None => self.own_ring.for_purpose(purpose),
        }
    }

    /// A new session's id (session-era, or legacy SSE with `transport`): sealed, carrying
    /// what any replica needs to serve it.
    pub(crate) fn seal_session_id(
        &self,
        identity: &crate::auth::Identity,
        scope: &session::Scope,
        version: crate::mcp::version::ProtocolVersion,
        capabilities: Option<&str>,
        transport: session::ClientTransport,
    ) -> Result<String, crate::vault::VaultError> {
        let tenant = identity.tenant.as_deref().unwrap_or_default();
        let now = crate::store::now_ms();
        let sealed = crate::mcp::sealed::Sealed::new(&identity.key, tenant, scope, version, capabilities, now)?;
        sealed.seal(&self.session_ring(transport))
    }

    /// The endpoint a legacy SSE id this replica does not hold was opened at, from the id
    /// itself (None: not an id of this gateway's keys). Says nothing about who may use it.
    pub(crate) fn sealed_sse_scope(&self, id: &str) -> Option<session::Scope> {
        crate::mcp::sealed::Sealed::scope_of(&self.session_ring(session::ClientTransport::Sse), id)
    }

    /// A session this replica does not hold, opened from its sealed id: for `identity` at
    /// `scope`, never one its client deleted (here or, by the store, on another replica).
    /// None is answered as an unknown session (404).
    pub(crate) async fn reopen_session(
        &self,
        id: &str,
        scope: &session::Scope,
        identity: &Arc<crate::auth::Identity>,
        limits: &crate::config::Limits,
        transport: session::ClientTransport,
    ) -> Option<Arc<Session>> {
        let now = crate::store::now_ms();
        let ring = self.session_ring(transport);
        let sealed = match crate::mcp::sealed::Sealed::open(&ring, id, &identity.key, scope, now) {
            Ok(s) if s.tenant == identity.tenant.as_deref().unwrap_or_default() => s,
            Ok(_) => return None,
            Err(e) => {
                tracing::debug!(reason = %e, "a session id that does not open");
                return None;
            }
        };
        let version = sealed.protocol_version()?;
        let digest = crate::credentials::digest(id);
        if lock(&self.deleted).contains_key(&digest) {
            return None;
        }
        match self.with_store(false, move |s| s.session_deleted(&digest)).await {
            Ok(false) => {}
            // Deleted, or a store that cannot say: not reopened (the client initializes again).
            _ => return None,
        }
        let s = Session::with_id(id.to_owned(), scope.clone(), version, transport, identity.clone());
        // A legacy SSE id is sealed before the client's initialize: its capabilities are
        // learnt from the shared state instead (`Session::learn_capabilities`).
        if transport != session::ClientTransport::Sse {
            s.set_capabilities(&sealed.capabilities);
        }
        // Two requests racing to reopen it: the first one's session serves both.
        let s = self.add_session(s, limits).ok()?;
        tracing::debug!("reopened a session sealed elsewhere");
        Some(s)
    }

    /// Runs `f` on the token store off the async threads; `absent` when there is no store to
    /// open (no file yet).
    pub(crate) async fn with_store<T: Send + 'static>(
        &self,
        absent: T,
        f: impl FnOnce(&crate::store::Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, crate::store::StoreError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || match store.handle()? {
            Some(s) => f(&s),
            None => Ok(absent),
        })
        .await
        .unwrap_or_else(|e| Err(crate::store::StoreError::Unavailable(e.to_string())))
    }

    /// Notes ids that never open again here, until `until`; past [`MAX_REMEMBERED`] the ones
    /// closest to expiring are forgotten first (the store still holds them).
    fn remember_ended(&self, digests: impl IntoIterator<Item = [u8; 32]>, until: i64) {
        let mut ended = lock(&self.deleted);
        let now = crate::store::now_ms();
        ended.retain(|_, u| *u > now);
        for d in digests {
            ended.entry(d).or_insert(until);
        }
        if ended.len() > MAX_REMEMBERED {
            let mut by_expiry: Vec<i64> = ended.values().copied().collect();
            by_expiry.sort_unstable();
            let cut = by_expiry[ended.len() - MAX_REMEMBERED];
            ended.retain(|_, u| *u >= cut);
        }
    }

    /// Ends the sessions held here whose clients deleted them through another replica (read
    /// from the store when it changed; a margin covers replicas' clocks).
    async fn end_sessions_deleted_elsewhere(&self) {
        const MARGIN_MS: i64 = 60_000;
        let now = crate::store::now_ms();
        let since = self.deleted_checked.load(Ordering::Relaxed).saturating_sub(MARGIN_MS);
        // Moved on only once read: a store that could not answer is asked again next time.
        let Ok(digests) = self.with_store(Vec::new(), move |s| s.sessions_deleted_since(since)).await else { return };
        self.deleted_checked.store(now, Ordering::Relaxed);
        if digests.is_empty() {
            return;
        }
        let gone: std::collections::HashSet<[u8; 32]> = digests.into_iter().collect();
        let ended: Vec<String> = self
            .sessions()
            .into_iter()
            .filter(|s| matches!(s.transport, session::ClientTransport::Streamable | session::ClientTransport::Sse))
            .filter(|s| gone.contains(&crate::credentials::digest(&s.id)))
            .map(|s| s.id.clone())
            .collect();
        self.remember_ended(gone, now.saturating_add(crate::mcp::sealed::LIFETIME_MS));
        for id in ended {
            self.end_session_as(&id, EndCause::Deleted).await;
        }
    }

    /// Remembers that sessions ended for good (deleted by their clients, or idle): their ids
    /// never open again, here or (through the store) on any replica, until they would have
    /// expired anyway.
    pub(crate) async fn forget_session_ids(&self, ids: &[String]) {
        let digests: Vec<[u8; 32]> = ids.iter().map(|id| crate::credentials::digest(id)).collect();
        let until = crate::store::now_ms().saturating_add(crate::mcp::sealed::LIFETIME_MS);
        self.remember_ended(digests.iter().copied(), until);
        let written = self.with_store((), move |s| s.session_delete(&digests, until, crate::store::now_ms())).await;
        if written.is_err() {
            tracing::warn!("could not record a deleted session in the store: other replicas may reopen it");
        }
    }

    /// Number of open sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A counter that moves whenever something the management API, `/health` or the metrics
    /// show may have changed: an upstream's status (started, connected, failed, restarted,
    /// breaker), a session opened or ended, a connection closed, a reload, a certificate
    /// reload. For tools and tests
    /// that wait for a state instead of polling for it: check, then await `changed()`. Nothing
    /// on a call's path moves it.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Moves [`Gateway::changes`].
    pub(crate) fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A counter of the audit records written so far (to the file or stderr): check the file,
    /// then await `changed()` to wait for a record without polling.
    pub fn audit_written(&self) -> tokio::sync::watch::Receiver<u64> {
        self.audit.written()
    }

    /// Ends a session: closes its streams, releases its subscriptions, stops its own servers.
    pub(crate) async fn end_session_as(&self, id: &str, cause: EndCause) -> bool {
        let Some(s) = lock(self.sessions.shard(id)).remove(id) else { return false };
        if let Some(i) = EndCause::ALL.iter().position(|c| *c == cause) {
            self.ended[i].fetch_add(1, Ordering::Relaxed);
        }
        if s.transport != session::ClientTransport::Stdio {
            let mut held = lock(self.held.shard(&s.identity.key));
            if let Some(h) = held.get_mut(&s.identity.key) {
                h.0 = h.0.saturating_sub(1);
                h.1 = h.1.saturating_sub(usize::from(s.transport == session::ClientTransport::Sse));
                if *h == (0, 0) {
                    held.remove(&s.identity.key);
                }
            }
        }
        s.close();
        // Its calls still running upstream have nobody left to answer.
        for (up, up_id) in s.take_inflight() {
            up.cancel(up_id, Some("the client session ended"));
        }
        for up in self.take_per_session(Some(s.key)) {
            up.stop().await;
        }
        for (server, uri) in s.subscriptions() {
            self.release_subscription(&server, &uri).await;
        }
        if s.log_level().is_some() {
            let config = self.config();
            for def in self.servers_in_scope(&config, &s.scope, &s.identity) {
                if let (Some(up), Some(level)) = (self.upstream(&def.name), self.shared_log_level(&def.name)) {
                    up.set_log_level(level).await;
                }
            }
        }
        self.changed();
        true
    }

    /// Marks the gateway as draining: `/health` answers 503 `draining`, requests are still
    /// served (the drain period before a shutdown).
    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Closes every session's streams (first step of shutdown).
    pub(crate) fn close_all_sessions(&self) {
        self.draining.store(true, Ordering::Relaxed);
        for s in self.sessions.values() {
            s.close();
        }
    }

    /// Stops every upstream instance (children included).
    pub(crate) async fn shutdown(&self) {
        self.close_all_sessions();
        drop(self.sessions.drain());
        let mut stops = self.take_per_session(None);
        let shared: Vec<Arc<Upstream>> = self.upstreams.swap(Arc::default()).values().cloned().collect();
        stops.extend(shared);
        for up in &stops {
            up.stop_now();
        }
        join_all(stops.iter().map(|u| u.stop())).await;
    }

    /// A session's own instance of a `per_session` server, if started.
    fn own_instance(&self, session: u64, server: &str) -> Option<Arc<Upstream>> {
        lock(self.per_session.shard(&session)).get(&session).and_then(|m| m.get(server)).cloned()
    }

    /// Takes the `per_session` instances of one session (every session's with None), to stop.
    fn take_per_session(&self, session: Option<u64>) -> Vec<Arc<Upstream>> {
        match session {
            Some(key) => {
                lock(self.per_session.shard(&key)).remove(&key).map(|m| m.into_values().collect()).unwrap_or_default()
            }
            None => self.per_session.drain().into_iter().flat_map(HashMap::into_values).collect(),
        }
    }

    /// The instance serving `server` for this caller: its own for `per_session` servers (with
    /// the caller's own account for `per_user` ones).
    fn instance(&self, config: &Config, server: &str, caller: &Caller, who: &Identity) -> Option<Arc<Upstream>> {
        self.instance_of(config.server(server)?, caller, who)
    }

    /// [`Gateway::instance`] for a server already looked up.
    fn instance_of(&self, def: &Arc<ServerDef>, caller: &Caller, who: &Identity) -> Option<Arc<Upstream>> {
        let server = def.name.as_str();
        if !def.enabled {
            return None;
        }
        if def.share != Share::PerSession {
            return self.upstream(server);
        }
        // A `per_user` server's instances carry their identity's own account.
        let credential = || if def.per_user { self.credential_of(def, &who.key) } else { self.credential(def) };
        if let Some(session) = caller.session.as_ref().filter(|s| s.transport != session::ClientTransport::Listen) {
            // Looked up and started under one lock: two first calls start one instance.
            let mut shard = lock(self.per_session.shard(&session.key));
            let instances = shard.entry(session.key).or_default();
            if let Some(up) = instances.get(server) {
                return Some(up.clone());
            }
            let owner = Some(Arc::downgrade(session));
            let up = Upstream::start(def.clone(), self.hub(), owner, self.http.clone(), credential());
            instances.insert(server.to_owned(), up.clone());
            return Some(up);
        }
        if def.per_user {
            // A stateless caller of a per-user server: one instance per identity.
            let mut all = lock(&self.per_identity);
            let key = (who.key.clone(), server.to_owned());
            if let Some(up) = all.get(&key).filter(|u| u.def == *def) {
                return Some(up.clone());
            }
            let up = Upstream::start(def.clone(), self.hub(), None, self.http.clone(), credential());
            if let Some(old) = all.insert(key, up.clone()) {
                old.stop_now();
            }
            return Some(up);
        }
        // Stateless callers have no session to own an instance: one instance serves them all.
        if let Some(up) = self.upstream(server) {
            return Some(up);
        }
        Some(self.start_shared(def.clone()))
    }

    /// The enabled servers in a scope that an identity may reach.
    fn servers_in_scope(&self, config: &Config, scope: &Scope, who: &Identity) -> Vec<Arc<ServerDef>> {
        config
            .servers
            .iter()
            .filter(|d| d.enabled && scope.includes(&d.name) && who.grants.reaches(&d.name))
            .cloned()
            .collect()
    }

    /// An account was linked or unlinked here: the vault is read again now (as a change made
    /// elsewhere would be within a second).
    pub(crate) async fn accounts_changed(&self) {
        self.sweep_sessions().await;
    }

    /// Whether `who` must link an account before reaching `server`: the answer that gives it the
    /// link (a URL elicitation when the client declared it), else None.
    pub(crate) async fn account_needed(&self, config: &Config, def: &ServerDef, ctx: &Ctx) -> Option<Reply> {
        if !def.per_user {
            return None;
        }
        let server = def.name.as_str();
        let credential = self.credential_of(def, &ctx.who.identity.key)?;
        if let crate::oauth::client::Flow::TokenExchange { .. } = credential.grant().flow {
            return match &ctx.who.subject_token {
                Some(t) => {
                    credential.offer(t);
                    None
                }
                None => Some(Reply::error(
                    crate::oauth::accounts::ACCOUNT_REQUIRED,
                    &format!("{server} is reached with your identity provider's access token: sign in with it"),
                )),
            };
        }
        if credential.has_account().await {
            return None;
        }
        let session_era = ctx.protocol_version < crate::mcp::version::ProtocolVersion::V2026_07_28;
        let url_mode = ctx.protocol_version >= crate::mcp::version::ProtocolVersion::V2025_11_25
            && ctx.caller.session.as_ref().is_some_and(|s| {
                serde_json::from_str::<serde_json::Value>(&s.capabilities())
                    .ok()
                    .is_some_and(|c| c["elicitation"]["url"].is_object())
            });
        Some(crate::oauth::accounts::link_required(config, server, &ctx.who.identity, url_mode, session_era))
    }

    /// The authorization server's logins and codes in progress.
    pub(crate) fn authorization(&self) -> &crate::oauth::server::AuthorizationState {
        &self.authorization
    }

    /// The token store as this gateway sees it.
    pub(crate) fn store(&self) -> &Arc<crate::store::StoreView> {
        &self.store
    }

    /// The shared state, when the config names one.
    pub(crate) fn shared_state(&self) -> Option<&Arc<crate::state::SharedState>> {
        self.shared_state.as_ref()
    }

    /// The credential table of the current config.
    pub fn authenticator(&self) -> Arc<Authenticator> {
        self.snapshot.load().auth.clone()
    }

    /// The audit sink.
    pub(crate) fn audit(&self) -> &crate::audit::Audit {
        &self.audit
    }

    /// The counters behind `/stats` and `/metrics`.
    pub(crate) fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    fn configure_metrics(&self, config: &Config) {
        self.metrics.configure(
            config.servers.iter().map(|s| s.name.as_str()),
            config.auth.tokens.iter().map(|t| t.name.as_str()),
        );
    }

    /// True once shutdown has begun (health answers `draining`).
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Every live session (for `/metrics`).
    pub(crate) fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.values()
    }

    /// Counts of the handshakes clients have made.
    pub fn handshakes(&self) -> Handshakes {
        Handshakes {
            initialize: self.initializes.load(Ordering::Relaxed),
            discover: self.discovers.load(Ordering::Relaxed),
        }
    }

    /// Answers `initialize` (the caller has already negotiated the version).
    pub(crate) async fn initialize_result(
        &self,
        config: &Config,
        scope: &Scope,
        version: ProtocolVersion,
        caller: &Caller,
        who: &Identity,
    ) -> String {
        self.initializes.fetch_add(1, Ordering::Relaxed);
        let (caps, info, instructions) = self.server_identity(config, scope, caller, who).await;
        let mut out = format!(r#"{{"protocolVersion":"{version}","capabilities":{caps},"serverInfo":{info}"#);
        if let Some(i) = instructions {
            out.push_str(&format!(r#","instructions":{}"#, jsonrpc::quote(&i)));
        }
        out.push('}');
        out
    }

    /// Answers `server/discover`.
    pub(crate) async fn discover_result(
        &self,
        config: &Config,
        scope: &Scope,
        caller: &Caller,
        who: &Identity,
    ) -> String {
        let (caps, info, instructions) = self.server_identity(config, scope, caller, who).await;
        let mut out = format!(r#"{{"supportedVersions":["{}"],"capabilities":{caps}"#, ProtocolVersion::STATELESS);
        if let Some(i) = instructions {
            out.push_str(&format!(r#","instructions":{}"#, jsonrpc::quote(&i)));
        }
        out.push_str(&format!(r#","_meta":{{"io.modelcontextprotocol/serverInfo":{info}}}}}"#));
        out
    }

    /// What Portcullis says it is: one server's own identity on its endpoint, else its own
    /// with the union of the capabilities of the servers the caller may reach.
    async fn server_identity(
        &self,
        config: &Config,
        scope: &Scope,
        caller: &Caller,
        who: &Identity,
    ) -> (String, String, Option<String>) {
        let own_info =
            format!(r#"{{"name":{},"version":"{}"}}"#, jsonrpc::quote(&config.name), env!("CARGO_PKG_VERSION"));
        if let Scope::One(name) = scope {
            if let Some(up) = self.instance(config, name, caller, who) {
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
                if let Ok(conn) = up.ready_by(deadline).await {
                    return (
                        conn.info.capabilities.get().to_owned(),
                        conn.info.server_info.get().to_owned(),
                        conn.info.instructions.clone(),
                    );
                }
            }
            return (r#"{"tools":{}}"#.to_owned(), own_info, None);
        }
        // The union of what the running servers offer; list_changed always, since servers come
        // and go behind the gateway.
        let mut has = HashMap::<&str, bool>::new();
        let mut subscribe = false;
        for def in self.servers_in_scope(config, scope, who) {
            let Some(up) = self.upstream(&def.name) else { continue };
            let Some(conn) = live(&up).await else { continue };
            let Ok(obj) = RawObject::parse(&conn.info.capabilities) else { continue };
            for key in ["prompts", "resources", "logging", "completions"] {
                if obj.get(key).is_some() {
                    has.insert(key, true);
                }
            }
            if let Some(r) = obj.get("resources") {
                subscribe |= r.get().contains("\"subscribe\":true");
            }
        }
        let mut caps = String::from(r#"{"tools":{"listChanged":true}"#);
        if has.contains_key("prompts") {
            caps.push_str(r#","prompts":{"listChanged":true}"#);
        }
        if has.contains_key("resources") {
            caps.push_str(&format!(r#","resources":{{"listChanged":true,"subscribe":{subscribe}}}"#));
        }
        if has.contains_key("logging") {
            caps.push_str(r#","logging":{}"#);
        }
        if has.contains_key("completions") {
            caps.push_str(r#","completions":{}"#);
        }
        caps.push('}');
        (caps, own_info, Some("Portcullis aggregates several MCP servers; tool and prompt names are prefixed with their server's name.".to_owned()))
    }

    /// The one entry point behind the gate: every surface (streamable HTTP and its batch
    /// elements, legacy SSE, stdio, `/rpc`) hands each message it admitted here. A request is
    /// routed and answered; a notification or a client's response is delivered (no answer).
    /// What routing finds goes into `routed`, the request's own part of its audit entry, as it
    /// is found: a request cancelled half-way still records its target.
    pub(crate) async fn handle(&self, ctx: &Ctx, env: &Envelope<'_>, routed: &mut Routed) -> Option<Reply> {
        match env.kind {
            jsonrpc::Kind::Request => {
                let id = env.id.map_or("null", RawValue::get);
                let req = Request { method: env.method(), params: env.params, id: Some(id) };
                Some(self.request(ctx, &req, routed).await)
            }
            jsonrpc::Kind::Notification => {
                self.notification(ctx, env);
                None
            }
            jsonrpc::Kind::Result | jsonrpc::Kind::Error => {
                self.response(ctx, env);
                None
            }
        }
    }

    /// Routes one request and returns its result or error. A session's calls in flight are
    /// bounded by `limits.max_calls_per_session`.
    async fn request(&self, ctx: &Ctx, req: &Request<'_>, routed: &mut Routed) -> Reply {
        let _slot = match &ctx.caller.session {
            Some(s) => {
                s.touch();
                let max = ctx.who.snapshot.config.limits.max_calls_per_session;
                match s.begin_call(max) {
                    Some(slot) => Some(slot),
                    None => {
                        tracing::info!(
                            identity = %ctx.who.identity.name,
                            client = %ctx.who.client,
                            limit = max,
                            "a session reached its limit of calls in flight"
                        );
                        routed.refused = Some("refused: calls in flight limit".into());
                        return Reply::error(
                            code::LIMIT_REACHED,
                            &format!("this session has {max} calls in flight (the limit); wait for some to finish"),
                        );
                    }
                }
            }
            None => None,
        };
        let mut reply = self.dispatch(ctx, req, routed).await;
        routed.error = reply.is_error;
        // A 2026-07-28 caller gets 2026-07-28 results, whatever era produced them.
        if ctx.protocol_version.is_stateless() && !reply.is_error && !reply.stateless {
            reply.extra = match req.method {
                "tools/list"
                | "prompts/list"
                | "resources/list"
                | "resources/templates/list"
                | "resources/read"
                | "server/discover" => jsonrpc::STATELESS_CACHEABLE,
                _ => jsonrpc::STATELESS_COMPLETE,
            };
        }
        reply
    }

    async fn dispatch(&self, ctx: &Ctx, req: &Request<'_>, routed: &mut Routed) -> Reply {
        let config = &ctx.who.snapshot.config;
        match req.method {
            "ping" => Reply::owned("{}".into(), false),
            "server/discover" => {
                self.discovers.fetch_add(1, Ordering::Relaxed);
                Reply::owned(self.discover_result(config, &ctx.scope, &ctx.caller, &ctx.who.identity).await, false)
            }
            "initialize" => {
                Reply::error(code::INVALID_REQUEST, "initialize is only valid as the first request of a session")
            }
            "tools/list" => self.list(config, ctx, req, ListKind::Tools).await,
            "prompts/list" => self.list(config, ctx, req, ListKind::Prompts).await,
            "resources/list" => self.list(config, ctx, req, ListKind::Resources).await,
            "resources/templates/list" => self.list(config, ctx, req, ListKind::Templates).await,
            "tools/call" | "prompts/get" => self.by_name(config, ctx, req, routed).await,
            "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                self.by_uri(config, ctx, req, routed).await
            }
            "completion/complete" => self.complete(config, ctx, req, routed).await,
            "logging/setLevel" => self.set_level(config, ctx, req).await,
            other => Reply::error(code::METHOD_NOT_FOUND, &format!("Method not found: {other}")),
        }
    }

    /// Handles a notification from a client.
    fn notification(&self, ctx: &Ctx, env: &Envelope<'_>) {
        match env.method() {
            "notifications/cancelled" => {
                let (Some(session), Some(params)) = (&ctx.caller.session, env.params) else { return };
                let Ok(obj) = RawObject::parse(params) else { return };
                let Some(id) = obj.get("requestId") else { return };
                if let Some((up, up_id)) = session.inflight(id.get()) {
                    up.cancel(up_id, obj.get_str("reason").as_deref());
                }
            }
            "notifications/roots/list_changed" => {
                let config = &ctx.who.snapshot.config;
                for def in self.servers_in_scope(config, &ctx.scope, &ctx.who.identity) {
                    if let Some(up) = ctx.caller.session.as_ref().and_then(|s| self.own_instance(s.key, &def.name)) {
                        let _ = up.notify("notifications/roots/list_changed", None);
                    }
                }
            }
            _ => {}
        }
    }

    /// Handles a client's answer to a server-to-client request.
    fn response(&self, ctx: &Ctx, env: &Envelope<'_>) {
        let Some(session) = &ctx.caller.session else { return };
        let Some(id) = env.id.map(|i| i.get().trim_matches('"')) else { return };
        let Some(n) = id.strip_prefix("pcs-").and_then(|n| n.parse().ok()) else { return };
        if !Self::answer(session, n, env) {
            // Asked by another replica (its tag is in the id): the answer goes back there.
            session.answer_elsewhere(n, jsonrpc::with_id(env, &format!("\"pcs-{n}\"")).as_bytes());
        }
    }

    /// Routes an answer to the request `n` a session's client was asked here; false when there
    /// is no such request here.
    fn answer(session: &Session, n: u64, env: &Envelope<'_>) -> bool {
        match session.take_client_request(n) {
            Some(ClientRequestRoute::Upstream { upstream, upstream_id }) => upstream.answer(&upstream_id, env),
            Some(ClientRequestRoute::Local(tx)) => {
                let _ = tx.send(Bytes::from(jsonrpc::with_id(env, "0")));
            }
            None => return false,
        }
        true
    }

    /// Hears the answers other replicas received to requests asked here (`session id` LF
    /// `message`), while the gateway lives.
    fn hear_answers(self: &Arc<Self>, state: &Arc<crate::state::SharedState>) {
        let mut heard = state.subscribe(state.answers_channel(state.tag()));
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(payload) = heard.rx.recv().await {
                let Some(gw) = weak.upgrade() else { return };
                let Some(cut) = payload.iter().position(|b| *b == b'\n') else { continue };
                let (id, msg) = (&payload[..cut], &payload[cut + 1..]);
                let Some(session) = std::str::from_utf8(id).ok().and_then(|id| gw.session(id)) else { continue };
                let Ok(env) = Envelope::parse(msg) else { continue };
                let n = env.id.and_then(|i| i.get().trim_matches('"').strip_prefix("pcs-")?.parse().ok());
                if let Some(n) = n {
                    Self::answer(&session, n, &env);
                }
            }
        });
    }

    fn broadcast(&self, server: &str, method: &str, msg: &Bytes, filter: impl Fn(&Session) -> bool) {
        let sessions: Vec<Arc<Session>> = self.sessions.values();
        for s in sessions {
            if s.scope.includes(server) && s.identity.grants.reaches(server) && filter(&s) {
                s.notify_change(method, msg);
            }
        }
    }
}

/// The connection of a running instance; one still on its first start is waited for (briefly),
/// so the first requests after the gateway starts see every server that comes up.
async fn live(up: &Upstream) -> Option<Arc<crate::mcp::upstream::Connection>> {
    if let Some(c) = up.connection() {
        return Some(c);
    }
    let status = up.status();
    if status.state != crate::mcp::upstream::State::Starting || status.restarts > 0 {
        return None;
    }
    up.ready_by(tokio::time::Instant::now() + FIRST_START_WAIT).await.ok()
}

/// Whether a config or environment identity behind a session no longer holds: removed,
/// expired, or its grants or tenant changed by a reload (it was authorized under the old ones).
fn config_identity_stale(auth: &Authenticator, s: &Session, now: std::time::SystemTime) -> bool {
    // An access token's session: until the token (or a newer one of the subject used on it)
    // expires, or its issuer leaves the config.
    if let Some(def) = &s.identity.issuer {
        return s.credential_expired(now) || !auth.issuer_current(def);
    }
    match auth.current(&s.identity.name) {
        None => true,
        Some(c) if Arc::ptr_eq(&c, &s.identity) => c.expired(now),
        Some(c) => c.expired(now) || c.grants != s.identity.grants || c.tenant != s.identity.tenant,
    }
}

/// How long a list waits for a server on its first start.
const FIRST_START_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often per-address state that says nothing any more is dropped.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// How often sessions are checked against the credential table.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(250);
/// The most ended session ids a gateway remembers itself (the store remembers them all).
const MAX_REMEMBERED: usize = 100_000;
/// The longest the change poll may take before the store is treated as unavailable.
const POLL_DEADLINE: std::time::Duration = std::time::Duration::from_millis(750);
// A revoked, expired or narrowed credential's sessions end within a second (ARCHITECTURE.md).
const _: () = assert!(SWEEP_EVERY.as_millis() <= 1000);

/// The credential table for a config (each token's grants narrowed by tenants and `authTokens`).
pub(crate) fn authenticator_for(
    config: &Config,
    store: Option<Arc<crate::store::StoreView>>,
    state: Option<Arc<crate::state::SharedState>>,
) -> Authenticator {
    let servers: Vec<(String, Vec<String>)> =
        config.servers.iter().map(|s| (s.name.clone(), s.auth_tokens.clone())).collect();
    Authenticator::new(&config.auth, &servers, store).sharing(state)
}

impl Hub for Gateway {
    fn status_changed(&self) {
        self.changed();
    }

    fn parking(&self) -> &crate::mcp::upstream::Parking {
        &self.parking
    }

    fn list_changed(&self, server: &str, method: &str) {
        let methods: &[&str] = if method.is_empty() {
            &[
                "notifications/tools/list_changed",
                "notifications/prompts/list_changed",
                "notifications/resources/list_changed",
            ]
        } else {
            &[method][..]
        };
        if method.is_empty() || method == "notifications/resources/list_changed" {
            self.resources.forget(server);
        }
        for m in methods {
            let msg = Bytes::from(jsonrpc::notification(m, None));
            self.broadcast(server, m, &msg, |_| true);
        }
    }

    fn resource_updated(&self, server: &str, params: &RawValue) {
        let Some(uri) = RawObject::parse(params).ok().and_then(|o| o.get_str("uri")) else { return };
        let method = "notifications/resources/updated";
        let own = Bytes::from(jsonrpc::notification(method, Some(params.get())));
        let shown = match self.resources.show(server, &uri) {
            std::borrow::Cow::Owned(shown) => RawObject::parse(params)
                .map(|o| {
                    Bytes::from(jsonrpc::notification(
                        method,
                        Some(&o.to_json_with(&[("uri", &jsonrpc::quote(&shown))])),
                    ))
                })
                .unwrap_or_else(|_| own.clone()),
            std::borrow::Cow::Borrowed(_) => own.clone(),
        };
        let sessions: Vec<Arc<Session>> = self.sessions.values();
        let config = self.config();
        for s in sessions {
            if s.scope.includes(server)
                && s.is_subscribed(server, &uri)
                && s.identity.grants.allows(GrantKind::Resource, server, &config.separator, &uri)
            {
                s.notify_change(method, if s.scope == Scope::All { &shown } else { &own });
            }
        }
    }
}

/// Logs what a reload changed: servers added, removed and restarted, token names added and
/// removed (names only, never a secret).
fn log_changes(old: &Config, new: &Config) {
    let names = |c: &Config| c.servers.iter().map(|s| s.name.clone()).collect::<std::collections::BTreeSet<_>>();
    let (before, after) = (names(old), names(new));
    let added: Vec<&String> = after.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&after).collect();
    let restarted: Vec<&String> =
        after.intersection(&before).filter(|n| old.server(n).map(|d| &**d) != new.server(n).map(|d| &**d)).collect();
    let tokens = |c: &Config| c.auth.tokens.iter().map(|t| t.name.clone()).collect::<std::collections::BTreeSet<_>>();
    let (tb, ta) = (tokens(old), tokens(new));
    let tokens_added: Vec<&String> = ta.difference(&tb).collect();
    let tokens_removed: Vec<&String> = tb.difference(&ta).collect();
    let changed_tokens =
        old.auth.tokens.iter().filter(|t| new.auth.tokens.iter().any(|n| n.name == t.name && n != *t)).count();
    tracing::info!(
        servers_added = ?added,
        servers_removed = ?removed,
        servers_restarted = ?restarted,
        tokens_added = ?tokens_added,
        tokens_removed = ?tokens_removed,
        tokens_changed = changed_tokens,
        "config reloaded"
    );
}
