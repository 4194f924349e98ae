//! The HTTP listener: routes, the health endpoint, and graceful shutdown.
//!
//! Shutdown order: on SIGTERM, drain first (`limits.drain_period`: `/health` answers 503
//! `draining` while requests are still served, so a load balancer moves away) → stop accepting →
//! close every session's streams (so SSE responses end) →
//! let in-flight requests finish within the grace period → stop this gateway's upstreams
//! (children and their process groups). The binary then sweeps any process group left
//! (`stdio::kill_all`), so nothing it started outlives it on SIGTERM, SIGINT or a panic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{any, get, post};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::gate::json;
use crate::mcp::downstream::http as mcp_http;
use crate::mcp::downstream::sse as mcp_sse;
use crate::mcp::gateway::Gateway;
use crate::mcp::upstream::State as UpState;

/// How long in-flight requests get to finish after a shutdown signal.
pub(crate) const GRACE: Duration = Duration::from_secs(10);

/// Builds the router over a gateway.
pub(crate) fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        // The MCP endpoints: the path's `{name}` (if any) is the scope (`gate`'s `Scope` extractor).
        .route("/mcp", any(mcp_http::handle))
        .route("/servers/{name}/mcp", any(mcp_http::handle))
        .route("/sse", get(mcp_sse::open))
        .route("/servers/{name}/sse", get(mcp_sse::open))
        .route("/messages", post(mcp_sse::message))
        .route("/messages/", post(mcp_sse::message))
        // MCP Front's paths: /{name}/sse and /{name}/mcp (server names may not be reserved paths).
        .route("/{name}/sse", get(mcp_sse::open))
        .route("/{name}/mcp", any(mcp_http::handle))
        .route("/health", get(health))
        .route("/.well-known/oauth-protected-resource", get(crate::oauth::metadata::serve))
        // Portcullis' own authorization server (404 while it is off).
        .route("/.well-known/oauth-authorization-server", get(crate::oauth::server::metadata))
        .route("/.well-known/openid-configuration", get(crate::oauth::server::metadata))
        .route("/register", post(crate::oauth::server::register))
        .route("/authorize", get(crate::oauth::server::authorize).post(crate::oauth::server::decide))
        .route("/oauth/upstream/{server}/client.json", get(crate::oauth::login::serve_document))
        .route("/link/callback", get(crate::oauth::accounts::callback))
        .route("/link/{server}", get(crate::oauth::accounts::start))
        .route("/accounts", get(crate::oauth::accounts::list))
        .route("/accounts/{server}", axum::routing::delete(crate::oauth::accounts::unlink))
        .route("/authorize/federate", get(crate::oauth::federation::federate))
        .route("/authorize/callback", get(crate::oauth::federation::callback))
        .route("/token", post(crate::oauth::server::token))
        .route("/revoke", post(crate::oauth::server::revoke))
        .route("/.well-known/oauth-protected-resource/{*path}", get(crate::oauth::metadata::serve))
        .route("/servers", get(crate::admin::servers))
        .route("/servers/{name}", get(crate::admin::server))
        .route("/servers/{name}/{action}", post(crate::admin::control))
        .route("/stats", get(crate::admin::stats))
        .route("/metrics", get(crate::admin::metrics))
        .route("/admin/reload", post(crate::admin::reload))
        .route("/admin/tokens", post(crate::admin::create_token).get(crate::admin::list_tokens))
        .route("/admin/tokens/{id}", get(crate::admin::get_token).delete(crate::admin::revoke_token))
        .route("/admin/tokens/{id}/rotate", post(crate::admin::rotate_token))
        .route("/admin/consents", get(crate::admin::list_consents))
        .route("/admin/consents/{id}", axum::routing::delete(crate::admin::withdraw_consent))
        .route("/rpc", post(crate::admin::rpc))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(gw.clone(), edge))
        .with_state(gw)
}

/// Runs before every route: removes the internal client-certificate header a client might
/// forge, sets it from a verified certificate, and enforces `require_https`.
async fn edge(
    State(gw): State<Arc<Gateway>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    req.headers_mut().remove(crate::auth::CLIENT_SUBJECT_HEADER);
    if let Some(crate::tls::ClientSubject(subject)) = req.extensions().get::<crate::tls::ClientSubject>().cloned()
        && let Ok(v) = axum::http::HeaderValue::from_str(&subject)
    {
        req.headers_mut().insert(crate::auth::CLIENT_SUBJECT_HEADER, v);
    }
    let snap = gw.snapshot();
    if snap.config.require_https && req.extensions().get::<crate::tls::Https>().is_none() {
        let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
        let via_trusted_https = peer.is_some_and(|p| snap.auth.is_trusted(p))
            && req.headers().get("x-forwarded-proto").and_then(|v| v.to_str().ok()) == Some("https");
        if !via_trusted_https {
            return json(
                StatusCode::BAD_REQUEST,
                r#"{"error":"https_required","message":"This gateway accepts HTTPS only"}"#,
            );
        }
    }
    next.run(req).await
}

/// `GET /health` (open): 503 while starting or draining, or while the token store cannot be read
/// (requests would get 503 too: a load balancer should send them elsewhere), never for one dead
/// upstream, which does not take the gateway out of a load balancer; `degraded` (200) while a
/// shared state (Redis) cannot be reached.
async fn health(State(gw): State<Arc<Gateway>>) -> Response {
    let mut up = 0;
    let mut down = 0;
    let mut starting = false;
    for (def, status) in gw.statuses() {
        if !def.enabled || def.share != crate::config::Share::Shared {
            continue;
        }
        match status.as_ref().map(|s| (s.state, s.restarts)) {
            Some((UpState::Running, _)) => up += 1,
            Some((UpState::Starting, 0)) => {
                starting = true;
                down += 1;
            }
            _ => down += 1,
        }
    }
    let store = gw.store().state() == crate::store::StoreState::Unavailable;
    // A lost shared state leaves requests working (limits count per replica): degraded, not
    // out of the balancer, or one Redis would take every replica down with it.
    let state = gw.shared_state().map(|s| s.is_up());
    let (status, code) = if gw.is_draining() {
        ("draining", StatusCode::SERVICE_UNAVAILABLE)
    } else if store {
        ("store_unavailable", StatusCode::SERVICE_UNAVAILABLE)
    } else if starting {
        ("starting", StatusCode::SERVICE_UNAVAILABLE)
    } else if down == 0 && state != Some(false) {
        ("ok", StatusCode::OK)
    } else {
        ("degraded", StatusCode::OK)
    };
    let store = if store { "unavailable" } else { "ok" };
    let state = match state {
        None => "",
        Some(true) => r#","state":"ok""#,
        Some(false) => r#","state":"unavailable""#,
    };
    json(code, format!(r#"{{"status":"{status}","store":"{store}"{state},"servers":{{"up":{up},"down":{down}}}}}"#))
}

async fn not_found() -> Response {
    json(StatusCode::NOT_FOUND, r#"{"error":"not_found","message":"No such endpoint"}"#)
}

/// A running gateway server.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    /// The gateway core.
    pub gateway: Arc<Gateway>,
    shutdown: CancellationToken,
    done: tokio::task::JoinHandle<()>,
    /// How many times the TLS certificate was reloaded.
    certificates: tokio::sync::watch::Receiver<u64>,
}

impl Running {
    /// Starts a graceful shutdown and waits for it to finish.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        let _ = self.done.await;
    }

    /// Waits until the server stops (after [`Running::trigger`] or a signal).
    pub(crate) async fn wait(self) {
        let _ = self.done.await;
    }

    /// The token that starts a shutdown.
    pub(crate) fn trigger(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// A counter of TLS certificate reloads: await `changed()` to know new connections get the
    /// new certificate.
    pub fn certificate_reloads(&self) -> tokio::sync::watch::Receiver<u64> {
        self.certificates.clone()
    }
}

/// Binds and serves until the returned handle is shut down.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>) -> std::io::Result<Running> {
    let addr = listener.local_addr()?;
    gateway.set_bound_address(addr);
    let shutdown = CancellationToken::new();
    let app = router(gateway.clone());
    let gw = gateway.clone();
    let token = shutdown.clone();
    let tls = match gateway.config().tls.clone() {
        Some(settings) => Some(crate::tls::Tls::load(settings).map_err(std::io::Error::other)?),
        None => None,
    };
    let reloads = tokio::sync::watch::Sender::new(0);
    let certificates = reloads.subscribe();
    let done = tokio::spawn(async move {
        if let Some(tls) = &tls {
            let weak = Arc::downgrade(&gw);
            tls.watch(token.clone(), move || {
                reloads.send_modify(|n| *n += 1);
                if let Some(gw) = weak.upgrade() {
                    gw.changed();
                }
            });
        }
        let closing = token.clone();
        let gw2 = gw.clone();
        tokio::spawn(async move {
            closing.cancelled().await;
            gw2.close_all_sessions();
        });
        accept_loop(listener, app, gw.clone(), tls, token, GRACE).await;
        // Stops this gateway's own upstreams (and their process groups) only: other gateways in
        // the same process are untouched. The process-wide sweep is the binary's job.
        gw.shutdown().await;
        tracing::info!("stopped");
    });
    Ok(Running { addr, gateway, shutdown, done, certificates })
}

/// Accepts connections until `stop` and serves each with hyper's HTTP/1.1 server, after a TLS
/// handshake when configured; then gives open connections `grace` to finish. One task per
/// connection: an idle streaming connection holds that task and hyper's buffers, nothing else.
async fn accept_loop(
    listener: TcpListener,
    app: Router,
    gw: Arc<Gateway>,
    tls: Option<Arc<crate::tls::Tls>>,
    stop: CancellationToken,
    grace: Duration,
) {
    let mut connections = tokio::task::JoinSet::new();
    // `limits.max_connections` as of the start (a reload does not resize it).
    let max = gw.config().limits.max_connections.min(tokio::sync::Semaphore::MAX_PERMITS);
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let mut refused_logged: Option<tokio::time::Instant> = None;
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, say: wait a moment rather than spin on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // At the cap: closed at once (no task, no buffer), logged at most once a minute.
            if refused_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                refused_logged = Some(tokio::time::Instant::now());
                tracing::warn!("connection limit (limits.max_connections) reached: closing new connections");
            }
            drop(tcp);
            continue;
        };
        let slot = Slot { _permit: permit, gw: Arc::downgrade(&gw) };
        // Small JSON-RPC answers go out at once: no Nagle delay on the client's connection.
        let _ = tcp.set_nodelay(true);
        let (app, stop) = (app.clone(), stop.clone());
        let limits = gw.config().limits;
        let timeouts = Timeouts { header: limits.header_read_timeout, keep_alive: limits.keep_alive_timeout };
        // Two task shapes, so a plain connection's task has no room for TLS state.
        match tls.clone() {
            None => connections.spawn(async move {
                serve_connection(tcp, app, peer, None, stop, timeouts).await;
                drop(slot);
            }),
            Some(tls) => connections.spawn(async move {
                // The handshake is bounded like a request's headers.
                let Ok(Some((stream, subject))) = tokio::time::timeout(timeouts.header, tls.accept(tcp)).await else {
                    return;
                };
                serve_connection(stream, app, peer, Some(subject), stop, timeouts).await;
                drop(slot);
            }),
        };
        while connections.try_join_next().is_some() {}
    }
    let drained = tokio::time::timeout(grace, async { while connections.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("grace period over; closing remaining connections");
    }
    connections.abort_all();
}

/// A connection's place under `limits.max_connections`; freeing it is a change a watcher of
/// [`Gateway::changes`] sees (a connection refused at the cap may be retried).
struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gw: std::sync::Weak<Gateway>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(gw) = self.gw.upgrade() {
            gw.changed();
        }
    }
}

/// A connection's two clocks.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    /// From the first byte of a request to the end of its headers.
    header: Duration,
    /// With no request in flight.
    keep_alive: Duration,
}

/// What a connection's watchdog knows, kept current by the connection itself: requests in
/// flight (a streaming response counts until its body ends), when the last one ended, and when
/// the first byte of the next one arrived. Times are ms since the connection began, plus one
/// (0: not yet).
struct Watch {
    began: std::time::Instant,
    in_flight: std::sync::atomic::AtomicUsize,
    idle_since: std::sync::atomic::AtomicU64,
    first_byte: std::sync::atomic::AtomicU64,
    changed: tokio::sync::Notify,
}

impl Watch {
    fn now(&self) -> u64 {
        u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// When the watchdog must look again, or None to close the connection now.
    fn deadline(&self, t: Timeouts) -> Option<Option<tokio::time::Instant>> {
        use std::sync::atomic::Ordering::Acquire;
        if self.in_flight.load(Acquire) > 0 {
            return Some(None); // busy: woken when it is not
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2);
        let first = self.first_byte.load(Acquire);
        let due = if first > 0 { first + ms(t.header) } else { self.idle_since.load(Acquire) + ms(t.keep_alive) };
        let now = self.now();
        if now >= due {
            return None;
        }
        // A deadline past what the clock can hold is no deadline.
        Some(tokio::time::Instant::now().checked_add(Duration::from_millis(due - now)))
    }
}

/// One request in flight on a connection, until its response body is done or dropped.
struct InFlight(Arc<Watch>);

impl InFlight {
    fn begin(w: &Arc<Watch>) -> Self {
        use std::sync::atomic::Ordering::Release;
        w.in_flight.fetch_add(1, Release);
        w.first_byte.store(0, Release);
        InFlight(w.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::{AcqRel, Release};
        if self.0.in_flight.fetch_sub(1, AcqRel) == 1 {
            self.0.idle_since.store(self.0.now(), Release);
            self.0.first_byte.store(0, Release);
            self.0.changed.notify_one();
        }
    }
}

/// The connection's IO, noting the first byte of a request that arrives while none is in
/// flight (for the header-read timeout).
struct Watched<I> {
    io: I,
    watch: Arc<Watch>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::sync::atomic::Ordering::{Acquire, Release};
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        let w = &self.watch;
        if buf.filled().len() > before && w.in_flight.load(Acquire) == 0 && w.first_byte.load(Acquire) == 0 {
            w.first_byte.store(w.now(), Release);
            w.changed.notify_one();
        }
        polled
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Serves one connection until it closes, or until `stop` (then gracefully), or until one of
/// its clocks runs out: a request's headers not complete `header` after its first byte, or no
/// request in flight for `keep_alive` (then it is closed). A streaming response (SSE) is a
/// request in flight for as long as it lasts. `tls` is the client certificate's subject when
/// the connection came over TLS.
async fn serve_connection<I>(
    io: I,
    app: Router,
    peer: SocketAddr,
    tls: Option<Option<String>>,
    stop: CancellationToken,
    timeouts: Timeouts,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use futures_util::FutureExt;
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let watch = Arc::new(Watch {
        began: std::time::Instant::now(),
        in_flight: std::sync::atomic::AtomicUsize::new(0),
        idle_since: std::sync::atomic::AtomicU64::new(1),
        first_byte: std::sync::atomic::AtomicU64::new(0),
        changed: tokio::sync::Notify::new(),
    });
    let w = watch.clone();
    let svc = tower::service_fn(move |mut req: axum::http::Request<hyper::body::Incoming>| {
        let guard = InFlight::begin(&w);
        req.extensions_mut().insert(ConnectInfo(peer));
        if let Some(subject) = &tls {
            req.extensions_mut().insert(crate::tls::Https);
            if let Some(s) = subject {
                req.extensions_mut().insert(crate::tls::ClientSubject(s.clone()));
            }
        }
        app.clone().oneshot(req.map(Body::new)).map(move |r| {
            r.map(|resp| {
                resp.map(move |body| {
                    body.map_frame(move |f| {
                        let _held = &guard;
                        f
                    })
                })
            })
        })
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(
        hyper_util::rt::TokioIo::new(Watched { io, watch: watch.clone() }),
        hyper_util::service::TowerToHyperService::new(svc),
    );
    tokio::pin!(conn);
    loop {
        let Some(deadline) = watch.deadline(timeouts) else {
            return; // a clock ran out: dropping the connection closes it
        };
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
                return;
            }
            _ = watch.changed.notified() => {}
            _ = sleep => {}
        }
    }
}

/// Which signal asked Portcullis to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Termination {
    /// SIGTERM: a supervisor or orchestrator; drain first.
    Term,
    /// SIGINT: someone at a terminal; stop now.
    Int,
}

/// Resolves on SIGTERM or SIGINT, saying which.
pub(crate) async fn termination() -> Termination {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => Termination::Term,
        _ = int.recv() => Termination::Int,
    }
}
