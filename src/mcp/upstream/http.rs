//! Remote upstreams over HTTP: streamable HTTP in both eras, and the 2024-11-05 HTTP+SSE
//! transport.
//!
//! Era detection: a `server/discover` probe at 2026-07-28 first; a result listing that version
//! makes the link stateless (every request a POST with `_meta` and `Mcp-*` headers). Anything
//! else falls back to `initialize` with `Mcp-Session-Id`, and, for `transport: auto`, a 404/405
//! on POST falls back to HTTP+SSE.
//!
//! Invariants: every response, JSON or SSE, is fed to the upstream's multiplexer as whole
//! messages; an HTTP failure for a request becomes a JSON-RPC error for that request id, so no
//! caller waits on a request the transport already knows failed; a 404 on a session request ends
//! the connection (the supervisor re-initializes); only the headers from config go upstream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{StatusCode, Url};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use super::{Link, Opened, ServerInfo, TransportError, Upstream, UpstreamError};
use crate::config::{HttpMode, Transport};
use crate::mcp::jsonrpc::{self, Envelope, Kind, RawObject};
use crate::mcp::sse;
use crate::mcp::version::ProtocolVersion;
use crate::sharded::lock;

/// The largest JSON body or SSE event accepted from an upstream.
const MAX_UPSTREAM_MESSAGE: usize = 64 * 1024 * 1024;
/// How many times one response stream is resumed with `Last-Event-ID`.
const MAX_RESUMES: u32 = 5;

enum Mode {
    Streamable,
    Stateless,
    Sse { post_url: Url },
}

/// hyper's pooled HTTP/1.1 client over plain TCP.
type PlainClient =
    hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, http_body_util::Full<Bytes>>;

/// The HTTP clients every upstream link shares. reqwest does everything; the POSTs to `http://`
/// upstreams (the hot path) go through hyper's pooled client directly, without reqwest's
/// per-request layers (two URL parses, redirect and retry policies, header merging), unless a
/// proxy is set in the environment (`HTTP_PROXY`, `ALL_PROXY`): reqwest honours those.
#[derive(Clone)]
pub(crate) struct Clients {
    full: reqwest::Client,
    plain: Option<PlainClient>,
}

impl Clients {
    /// Clients with a 5 s connect timeout and no redirects.
    pub(crate) fn new() -> Self {
        let full = crate::tls::http_client_builder().build().unwrap_or_default();
        let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let plain = (!proxy_in(|k| std::env::var_os(k))).then(|| {
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector)
        });
        Clients { full, plain }
    }
}

/// Where a remote server is probed for reachability (its host and port), or None when a proxy
/// is set in the environment (then only the proxy's answers say anything) or the URL has no
/// host.
pub(crate) fn probe_target(url: &str) -> Option<(String, u16)> {
    let any_proxy = ["HTTPS_PROXY", "https_proxy"].iter().any(|k| std::env::var_os(k).is_some_and(|v| !v.is_empty()));
    if any_proxy || proxy_in(|k| std::env::var_os(k)) {
        return None;
    }
    let u = Url::parse(url).ok()?;
    Some((u.host_str()?.trim_matches(['[', ']']).to_owned(), u.port_or_known_default()?))
}

/// Whether a TCP connection to the target opens within two seconds (it is closed at once).
pub(crate) async fn reachable(target: &(String, u16)) -> bool {
    let connect = tokio::net::TcpStream::connect((target.0.as_str(), target.1));
    matches!(tokio::time::timeout(Duration::from_secs(2), connect).await, Ok(Ok(_)))
}

/// Whether an environment (`var`) names a proxy for `http://` URLs.
fn proxy_in(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    ["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"].iter().any(|k| var(k).is_some_and(|v| !v.is_empty()))
}

impl Default for Clients {
    fn default() -> Self {
        Self::new()
    }
}

/// A connection to a remote server.
pub(crate) struct HttpLink {
    up: Weak<Upstream>,
    client: reqwest::Client,
    /// The POST target through hyper's client, for an `http://` URL.
    plain: Option<(PlainClient, hyper::Uri)>,
    url: Url,
    /// The configured headers.
    headers: HeaderMap,
    /// What every POST carries: the configured headers, `Content-Type`, `Accept` and, for a
    /// 2026-07-28 server, `Mcp-Protocol-Version`.
    post_headers: HeaderMap,
    mode: Mode,
    session_id: Mutex<Option<HeaderValue>>,
    protocol_version: Mutex<Option<HeaderValue>>,
    stateless_info: OnceLock<ServerInfo>,
    closed: CancellationToken,
    tasks: Mutex<HashMap<u64, AbortHandle>>,
    idle: Duration,
    name: String,
    /// Access tokens of Portcullis' own for this server (`oauth:`), sent on every request.
    credential: Option<Arc<crate::oauth::client::TokenSource>>,
}

/// `Mcp-Method`, `Mcp-Name` and `Mcp-Protocol-Version`.
const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
const MCP_NAME: HeaderName = HeaderName::from_static("mcp-name");
const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");

/// The headers of every POST in `mode`: `configured`, then ours.
fn post_headers(configured: &HeaderMap, mode: &Mode) -> HeaderMap {
    let mut headers = configured.clone();
    headers.reserve(6);
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(ACCEPT, HeaderValue::from_static("application/json, text/event-stream"));
    if matches!(mode, Mode::Stateless) {
        headers.insert(MCP_PROTOCOL_VERSION, HeaderValue::from_static(ProtocolVersion::STATELESS.as_str()));
    }
    headers
}

fn static_headers(headers: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
            map.append(k, v);
        }
    }
    map
}

pub(crate) async fn connect(up: &Arc<Upstream>) -> Result<Opened, TransportError> {
    let Transport::Http { url, mode, headers, tls, .. } = &up.def.transport else {
        return Err(TransportError::BadUrl("not an HTTP server".into()));
    };
    let url = Url::parse(url).map_err(|e| TransportError::BadUrl(e.to_string()))?;
    let headers = static_headers(headers);
    // What the connection's own requests (the probe, the SSE GET) carry: the configured
    // headers and, for a server with `oauth:`, a token; the link adds a current token to each
    // of its requests.
    let mut connecting = headers.clone();
    if let Some(c) = &up.credential {
        connecting.insert(AUTHORIZATION, c.bearer().await.map_err(TransportError::Credential)?);
    }
    let closed = CancellationToken::new();
    // A server with `tls:` of its own is reached only through the client made from it.
    let client = match tls {
        Some(t) => {
            if t.insecure() {
                tracing::warn!(server = %up.def.name, "TLS certificate verification is off for this server (insecure_skip_verify): development only");
            }
            t.client.clone()
        }
        None => up.http.full.clone(),
    };
    let plain = match url.scheme() {
        "http" => up.http.plain.clone().zip(url.as_str().parse::<hyper::Uri>().ok()),
        _ => None,
    };
    let make = |mode: Mode| HttpLink {
        up: Arc::downgrade(up),
        client: client.clone(),
        plain,
        url: url.clone(),
        headers: headers.clone(),
        post_headers: post_headers(&headers, &mode),
        mode,
        session_id: Mutex::new(None),
        protocol_version: Mutex::new(None),
        stateless_info: OnceLock::new(),
        closed: closed.clone(),
        tasks: Mutex::new(HashMap::new()),
        idle: up.def.sse_idle_timeout,
        name: up.def.name.clone(),
        credential: up.credential.clone(),
    };
    let link = match mode {
        HttpMode::Sse => connect_sse(make, &client, &url, &connecting, up).await?,
        HttpMode::Streamable | HttpMode::Auto => {
            match probe_stateless(&client, &url, &connecting, up.def.timeout).await {
                Probe::Stateless(info) => {
                    let link = make(Mode::Stateless);
                    let _ = link.stateless_info.set(info);
                    link.set_protocol_version(ProtocolVersion::STATELESS);
                    Arc::new(link)
                }
                Probe::NoPost if *mode == HttpMode::Auto => connect_sse(make, &client, &url, &connecting, up).await?,
                Probe::Legacy | Probe::NoPost => Arc::new(make(Mode::Streamable)),
                Probe::Unreachable(e) => return Err(e),
            }
        }
    };
    Ok(Opened { link: Link::Http(link), closed, pid: None })
}

enum Probe {
    Stateless(ServerInfo),
    Legacy,
    NoPost,
    Unreachable(TransportError),
}

fn client_meta() -> String {
    let members: Vec<(&str, &str)> = client_meta_members().iter().map(|(k, v)| (*k, v.as_str())).collect();
    RawObject::default().to_json_with(&members)
}

/// The members of [`client_meta`] a request's `_meta` gets: the protocol version always (it is
/// ours), the others unless `meta` has them or `set` sets them (the caller's own capabilities
/// and client info stand).
pub(super) fn client_meta_for<'a>(meta: &RawObject<'_>, set: &[(&str, &str)]) -> Vec<(&'static str, &'a str)> {
    client_meta_members()
        .iter()
        .filter(|(k, _)| k.ends_with("/protocolVersion") || (meta.get(k).is_none() && !set.iter().any(|(s, _)| s == k)))
        .map(|(k, v)| (*k, v.as_str()))
        .collect()
}

/// The members of [`client_meta`], as (key, raw JSON value).
fn client_meta_members() -> &'static [(&'static str, String)] {
    static MEMBERS: OnceLock<Vec<(&'static str, String)>> = OnceLock::new();
    MEMBERS.get_or_init(|| {
        vec![
            ("io.modelcontextprotocol/protocolVersion", jsonrpc::quote(ProtocolVersion::STATELESS.as_str())),
            ("io.modelcontextprotocol/clientCapabilities", "{}".to_owned()),
            (
                "io.modelcontextprotocol/clientInfo",
                format!(r#"{{"name":"portcullis","version":"{}"}}"#, env!("CARGO_PKG_VERSION")),
            ),
        ]
    })
}

async fn probe_stateless(client: &reqwest::Client, url: &Url, headers: &HeaderMap, timeout: Duration) -> Probe {
    let body = jsonrpc::request("0", "server/discover", Some(&format!(r#"{{"_meta":{}}}"#, client_meta())));
    let resp = client
        .post(url.clone())
        .headers(headers.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "application/json, text/event-stream")
        .header("mcp-protocol-version", ProtocolVersion::STATELESS.as_str())
        .header("mcp-method", "server/discover")
        .timeout(timeout.min(Duration::from_secs(30)))
        .body(body)
        .send()
        .await;
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return Probe::Unreachable(TransportError::Unreachable { url: shown(url), reason: error_chain(e) }),
    };
    let status = resp.status();
    if status == StatusCode::NOT_FOUND || status == StatusCode::METHOD_NOT_ALLOWED {
        return Probe::NoPost;
    }
    if !status.is_success() {
        return Probe::Legacy;
    }
    let is_sse = content_type(resp.headers()).starts_with("text/event-stream");
    let body = match read_limited(hyper::Response::from(resp).map(ResponseBody::Full)).await {
        Ok(b) => b,
        Err(_) => return Probe::Legacy,
    };
    let message = if is_sse {
        let mut parser = sse::Parser::new(MAX_UPSTREAM_MESSAGE);
        match parser.feed(&body) {
            Ok(events) => {
                events.into_iter().rev().find(|e| e.is_message() && !e.data.is_empty()).map(|e| e.data.into_bytes())
            }
            Err(_) => None,
        }
    } else {
        Some(body.to_vec())
    };
    let Some(message) = message else { return Probe::Legacy };
    let Ok(env) = Envelope::parse(&message) else { return Probe::Legacy };
    if env.kind != Kind::Result {
        return Probe::Legacy;
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Discover {
        supported_versions: Vec<String>,
        #[serde(default)]
        capabilities: Option<Box<serde_json::value::RawValue>>,
        #[serde(default)]
        instructions: Option<String>,
        #[serde(default, rename = "_meta")]
        meta: Option<HashMap<String, Box<serde_json::value::RawValue>>>,
    }
    let Some(Ok(d)) = env.result.map(|r| serde_json::from_str::<Discover>(r.get())) else { return Probe::Legacy };
    if !d.supported_versions.iter().any(|v| ProtocolVersion::parse(v).is_some_and(ProtocolVersion::is_stateless)) {
        return Probe::Legacy;
    }
    let server_info = d
        .meta
        .and_then(|mut m| m.remove("io.modelcontextprotocol/serverInfo"))
        .unwrap_or_else(|| jsonrpc::raw("{}".into()));
    Probe::Stateless(ServerInfo {
        protocol_version: ProtocolVersion::STATELESS,
        capabilities: d.capabilities.unwrap_or_else(|| jsonrpc::raw("{}".into())),
        server_info,
        instructions: d.instructions,
    })
}

async fn connect_sse(
    make: impl FnOnce(Mode) -> HttpLink,
    client: &reqwest::Client,
    url: &Url,
    headers: &HeaderMap,
    up: &Arc<Upstream>,
) -> Result<Arc<HttpLink>, TransportError> {
    let resp = client
        .get(url.clone())
        .headers(headers.clone())
        .header(ACCEPT, "text/event-stream")
        .send()
        .await
        .map_err(|e| TransportError::Unreachable { url: shown(url), reason: error_chain(e) })?;
    if !resp.status().is_success() {
        return Err(TransportError::Status { method: "GET", url: shown(url), status: resp.status().as_u16() });
    }
    let mut stream = resp.bytes_stream();
    let mut parser = sse::Parser::new(MAX_UPSTREAM_MESSAGE);
    let idle = up.def.sse_idle_timeout;
    let mut backlog = Vec::new();
    let post_url = loop {
        let chunk = tokio::time::timeout(idle.min(Duration::from_secs(30)), stream.next())
            .await
            .map_err(|_| TransportError::NoEndpointEvent)?;
        let Some(Ok(chunk)) = chunk else { return Err(TransportError::EndpointStreamEnded) };
        let events = parser.feed(&chunk).map_err(|_| TransportError::TooLarge(MAX_UPSTREAM_MESSAGE))?;
        let mut found = None;
        for ev in events {
            if ev.event == "endpoint" && found.is_none() {
                found = Some(ev.data);
            } else if found.is_some() {
                backlog.push(ev);
            }
        }
        if let Some(endpoint) = found {
            let post = url.join(endpoint.trim()).map_err(|e| TransportError::BadEndpoint(e.to_string()))?;
            if post.origin() != url.origin() {
                return Err(TransportError::ForeignEndpoint(post.origin().ascii_serialization()));
            }
            break post;
        }
    };
    let link = Arc::new(make(Mode::Sse { post_url }));
    let reader = link.clone();
    let up_weak = Arc::downgrade(up);
    tokio::spawn(async move {
        if let Some(up) = up_weak.upgrade() {
            for ev in backlog {
                if ev.is_message() && !ev.data.is_empty() {
                    up.on_message(Bytes::from(ev.data), None);
                }
            }
        }
        let closed = reader.closed.clone();
        tokio::select! {
            _ = reader.pump(stream, parser, None) => {}
            _ = closed.cancelled() => {}
        }
        tracing::warn!(server = %reader.name, "upstream SSE stream ended");
        reader.closed.cancel();
    });
    Ok(link)
}

impl HttpLink {
    pub(crate) fn stateless_info(&self) -> Option<ServerInfo> {
        self.stateless_info.get().cloned()
    }

    pub(crate) fn set_protocol_version(&self, v: ProtocolVersion) {
        *lock(&self.protocol_version) = Some(HeaderValue::from_static(v.as_str()));
    }

    pub(crate) async fn shutdown(&self) {
        let tasks: Vec<AbortHandle> = lock(&self.tasks).drain().map(|(_, t)| t).collect();
        for t in tasks {
            t.abort();
        }
        if matches!(self.mode, Mode::Streamable) {
            let sid = lock(&self.session_id).clone();
            if let Some(sid) = sid {
                // Only a token in hand: ending a connection never waits for a fetch.
                let mut headers = self.headers.clone();
                if let Some(t) = self.credential.as_ref().and_then(|c| c.in_hand()) {
                    headers.insert(AUTHORIZATION, t);
                }
                let _ = self
                    .client
                    .delete(self.url.clone())
                    .headers(headers)
                    .header("mcp-session-id", sid)
                    .timeout(Duration::from_secs(2))
                    .send()
                    .await;
            }
        }
        self.closed.cancel();
    }

    pub(crate) fn abort(&self, id: u64) -> bool {
        if !matches!(self.mode, Mode::Stateless) {
            return false;
        }
        if let Some(t) = lock(&self.tasks).remove(&id) {
            t.abort();
        }
        true
    }

    /// Sends a message; `forward` are the caller's `Mcp-Param-*` headers, passed on to a
    /// 2026-07-28 server (intermediaries must forward what they do not interpret).
    /// `named`, for a 2026-07-28 server, are the request's `Mcp-Method` and `Mcp-Name` and say
    /// that `msg` carries its `_meta` already; without them the message is read for both.
    pub(crate) fn send(
        self: &Arc<Self>,
        msg: Bytes,
        id: Option<u64>,
        forward: Option<ForwardHeaders>,
        named: Option<Named>,
    ) -> Result<(), TransportError> {
        if self.closed.is_cancelled() {
            return Err(TransportError::ConnectionClosed);
        }
        let this = self.clone();
        let run = async move {
            this.post(msg, id, forward, named).await;
            if let Some(id) = id {
                lock(&this.tasks).remove(&id);
            }
        };
        match id {
            // Insert under the lock the task must take to remove itself, so a fast answer
            // cannot remove its entry before it exists (which would leave a stale one behind).
            Some(id) => {
                let mut tasks = lock(&self.tasks);
                let task = tokio::spawn(run);
                tasks.insert(id, task.abort_handle());
            }
            None => {
                tokio::spawn(run);
            }
        }
        Ok(())
    }

    /// Ends a call with a transport failure naming this server.
    fn fail(&self, id: Option<u64>, source: TransportError) {
        let (Some(id), Some(up)) = (id, self.up.upgrade()) else { return };
        up.fail_call(id, UpstreamError::Transport { server: self.name.clone(), source });
    }

    /// The headers and body of the POST carrying `msg`: the configured headers, then ours.
    fn request(
        &self,
        msg: Bytes,
        forward: Option<ForwardHeaders>,
        named: Option<Named>,
    ) -> Result<(HeaderMap, Bytes), TransportError> {
        // The configured headers and the fixed ones of this mode, made once at connect.
        let mut headers = self.post_headers.clone();
        // Names the header, never its value (a mirrored argument may be sensitive).
        let value = |k: &str, v: &str| HeaderValue::from_str(v).map_err(|_| TransportError::HeaderValue(k.to_owned()));
        match self.mode {
            Mode::Stateless => {
                let (msg, named) = match named {
                    Some(n) => (msg, n),
                    None => {
                        let (msg, method, name) = for_stateless(&msg)?;
                        (msg, Named::new(&method, name.as_deref())?)
                    }
                };
                headers.insert(MCP_METHOD, named.method);
                if let Some(name) = named.name {
                    headers.insert(MCP_NAME, name);
                }
                for (k, v) in forward.iter().flat_map(|f| f.iter()) {
                    if let Ok(name) = HeaderName::from_bytes(k.as_bytes()) {
                        headers.append(name, value(k, v)?);
                    }
                }
                Ok((headers, msg))
            }
            Mode::Streamable => {
                if let Some(sid) = lock(&self.session_id).clone() {
                    headers.insert("mcp-session-id", sid);
                }
                if let Some(v) = lock(&self.protocol_version).clone() {
                    headers.insert(MCP_PROTOCOL_VERSION, v);
                }
                Ok((headers, msg))
            }
            Mode::Sse { .. } => Ok((headers, msg)),
        }
    }

    /// Sends a POST: through hyper's client to an `http://` server in the streamable modes,
    /// through reqwest otherwise. The answer's body is reqwest's or hyper's, as a stream. The
    /// error says whether the server could not be reached at all.
    async fn send_post(&self, headers: HeaderMap, body: Bytes) -> Result<hyper::Response<ResponseBody>, PostError> {
        match (&self.plain, &self.mode) {
            (Some((client, uri)), Mode::Stateless | Mode::Streamable) => {
                let mut req = hyper::Request::new(http_body_util::Full::new(body));
                *req.method_mut() = hyper::Method::POST;
                *req.uri_mut() = uri.clone();
                *req.headers_mut() = headers;
                let resp = client
                    .request(req)
                    .await
                    .map_err(|e| PostError { unreachable: e.is_connect(), message: chain(&e) })?;
                Ok(resp.map(ResponseBody::Plain))
            }
            _ => {
                let url = match &self.mode {
                    Mode::Sse { post_url } => post_url.clone(),
                    _ => self.url.clone(),
                };
                let resp = self.client.post(url).headers(headers).body(body).send().await;
                let resp = resp.map_err(|e| PostError { unreachable: e.is_connect(), message: error_chain(e) })?;
                Ok(hyper::Response::from(resp).map(ResponseBody::Full))
            }
        }
    }

    /// The configured headers, with a current token for a server with `oauth:`.
    async fn headers_now(&self) -> Result<HeaderMap, TransportError> {
        let mut headers = self.headers.clone();
        self.authorize(&mut headers).await?;
        Ok(headers)
    }

    /// Adds a current token for a server with `oauth:`; the token used, if any.
    async fn authorize(&self, headers: &mut HeaderMap) -> Result<Option<HeaderValue>, TransportError> {
        let Some(c) = &self.credential else { return Ok(None) };
        let bearer = c.bearer().await.map_err(TransportError::Credential)?;
        headers.insert(AUTHORIZATION, bearer.clone());
        Ok(Some(bearer))
    }

    /// [`HttpLink::send_post`], failing the call (and, when the server is gone, this
    /// connection) on an error.
    async fn exchange(
        &self,
        headers: HeaderMap,
        body: Bytes,
        id: Option<u64>,
    ) -> Option<hyper::Response<ResponseBody>> {
        match self.send_post(headers, body).await {
            Ok(r) => Some(r),
            Err(e) if e.unreachable => {
                // The server is gone: end this connection, so the supervisor says so and
                // probes until it is back.
                tracing::warn!(server = %self.name, "upstream unreachable: {}", e.message);
                self.closed.cancel();
                self.fail(id, TransportError::Unreachable { url: shown(&self.url), reason: e.message });
                None
            }
            Err(e) => {
                self.fail(id, TransportError::Request(e.message));
                None
            }
        }
    }

    async fn post(
        self: &Arc<Self>,
        msg: Bytes,
        id: Option<u64>,
        forward: Option<ForwardHeaders>,
        named: Option<Named>,
    ) {
        let (mut headers, body) = match self.request(msg, forward, named) {
            Ok(r) => r,
            Err(e) => return self.fail(id, e),
        };
        let used = match self.authorize(&mut headers).await {
            Ok(u) => u,
            Err(e) => return self.fail(id, e),
        };
        let again = used.as_ref().map(|_| (headers.clone(), body.clone()));
        let Some(mut resp) = self.exchange(headers, body, id).await else { return };
        // The server no longer takes the token, or wants more scopes: one new token, one more try.
        if let (Some(used), Some((mut headers, body)), Some(c)) = (used, again, &self.credential)
            && c.answered(&used, resp.status(), resp.headers().get(reqwest::header::WWW_AUTHENTICATE))
        {
            if let Err(e) = self.authorize(&mut headers).await {
                return self.fail(id, e);
            }
            let Some(r) = self.exchange(headers, body, id).await else { return };
            resp = r;
        }
        let status = resp.status();
        // Streamable HTTP: keep the session id the server gave; note whether there is one.
        let has_session = matches!(self.mode, Mode::Streamable) && {
            let mut cur = lock(&self.session_id);
            if cur.is_none() {
                *cur = resp.headers().get("mcp-session-id").cloned();
            }
            cur.is_some()
        };
        if has_session && status == StatusCode::NOT_FOUND {
            return self.session_refused(id, status);
        }
        if status == StatusCode::ACCEPTED || status == StatusCode::NO_CONTENT {
            return;
        }
        let is_sse = content_type(resp.headers()).starts_with("text/event-stream");
        if !status.is_success() {
            let body = read_limited(resp).await.unwrap_or_default();
            // A stateless server answers JSON-RPC errors with 4xx and a JSON-RPC body: deliver
            // those as they are. Any other refusal (an authorization server's 401 or 403, a
            // proxy's page) is the HTTP layer's, and fails the call with its status.
            if matches!(self.mode, Mode::Stateless) && !is_sse && Envelope::parse(&body).is_ok() {
                return self.deliver_json(body, id);
            }
            // The 400 "No valid session ID provided" that SDK servers answer after a restart is
            // the 404's kin.
            if has_session
                && status == StatusCode::BAD_REQUEST
                && String::from_utf8_lossy(&body).to_ascii_lowercase().contains("session")
            {
                return self.session_refused(id, status);
            }
            let snippet = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
            return self.fail(id, TransportError::Refused { status: status.as_u16(), snippet });
        }
        if matches!(self.mode, Mode::Sse { .. }) {
            return; // answers arrive on the stream
        }
        if is_sse {
            let stream = http_body_util::BodyDataStream::new(resp.into_body());
            let last = self.pump(stream, sse::Parser::new(MAX_UPSTREAM_MESSAGE), id).await;
            if let (Some(id), Some((last_id, retry))) = (id, last) {
                self.resume(id, last_id, retry).await;
            }
            return;
        }
        match read_limited(resp).await {
            Ok(body) => self.deliver_json(body, id),
            Err(e) => self.fail(id, e),
        }
    }

    /// A request that carried a session id was refused for it: the server never acted on it.
    /// This connection ends first (so the retry waits for the new one), then the call is
    /// failed with [`UpstreamError::SessionExpired`], which sends it again, once, on the new
    /// session.
    fn session_refused(&self, id: Option<u64>, status: StatusCode) {
        tracing::info!(server = %self.name, "upstream session refused ({status}); re-initializing");
        self.closed.cancel();
        if let (Some(id), Some(up)) = (id, self.up.upgrade()) {
            up.fail_call(id, UpstreamError::SessionExpired { server: self.name.clone() });
        }
    }

    fn deliver_json(&self, body: Bytes, id: Option<u64>) {
        let Some(up) = self.up.upgrade() else { return };
        if jsonrpc::is_array(&body) {
            match serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(&body) {
                Ok(items) => {
                    for item in items {
                        up.on_message(body.slice(jsonrpc::span_of(&body, item)), id);
                    }
                }
                Err(e) => self.fail(id, TransportError::BadJson(e.to_string())),
            }
        } else if body.is_empty() {
            self.fail(id, TransportError::BadJson("an empty response".into()));
        } else {
            up.on_message(body, id);
        }
        // A JSON body is the whole answer to the request: if it did not answer it (not a
        // JSON-RPC message, another id, notifications only), the call fails now rather than
        // waiting out its deadline (a no-op when it was answered).
        self.fail(id, TransportError::BadJson("the response does not answer the request".into()));
    }

    /// Reads an SSE stream, delivering messages. Returns the last event id and retry delay when
    /// the stream ended without the response to `id` (so it may be resumed).
    async fn pump<S, E>(&self, mut stream: S, mut parser: sse::Parser, id: Option<u64>) -> Option<(String, Duration)>
    where
        S: futures_util::Stream<Item = Result<Bytes, E>> + Unpin,
    {
        let mut last_id = None;
        let mut retry = Duration::from_millis(1000);
        let up = self.up.upgrade()?;
        loop {
            let chunk = match tokio::time::timeout(self.idle, stream.next()).await {
                Ok(Some(Ok(c))) => c,
                Ok(Some(Err(_))) | Ok(None) => break,
                Err(_) => {
                    tracing::warn!(server = %self.name, "upstream SSE stream idle for {:?}; dropped", self.idle);
                    break;
                }
            };
            let events = match parser.feed(&chunk) {
                Ok(e) => e,
                Err(_) => {
                    self.fail(id, TransportError::TooLarge(MAX_UPSTREAM_MESSAGE));
                    return None;
                }
            };
            // The last event id and the reconnection time are the stream's, set by any block.
            if let Some(i) = parser.last_event_id() {
                last_id = Some(i.to_owned());
            }
            if let Some(r) = parser.retry() {
                retry = Duration::from_millis(r);
            }
            for ev in events {
                if ev.is_message() && !ev.data.is_empty() {
                    up.on_message(Bytes::from(ev.data), id);
                }
            }
            if let Some(id) = id
                && !up.is_pending(id)
            {
                return None;
            }
        }
        let id = id?;
        if !up.is_pending(id) {
            return None;
        }
        match last_id {
            Some(l) if !matches!(self.mode, Mode::Stateless) => Some((l, retry)),
            _ => {
                self.fail(Some(id), TransportError::StreamEnded);
                None
            }
        }
    }

    /// Resumes a response stream with GET + `Last-Event-ID`, honouring `retry`.
    async fn resume(&self, id: u64, mut last_id: String, mut retry: Duration) {
        for _ in 0..MAX_RESUMES {
            tokio::time::sleep(retry.min(Duration::from_secs(30))).await;
            let headers = match self.headers_now().await {
                Ok(h) => h,
                Err(e) => return self.fail(Some(id), e),
            };
            let mut req = self
                .client
                .get(self.url.clone())
                .headers(headers)
                .header(ACCEPT, "text/event-stream")
                .header("last-event-id", last_id.clone());
            if let Some(sid) = lock(&self.session_id).clone() {
                req = req.header("mcp-session-id", sid);
            }
            if let Some(v) = lock(&self.protocol_version).clone() {
                req = req.header("mcp-protocol-version", v);
            }
            let resp = match req.send().await {
                Ok(r) if r.status().is_success() => r,
                Ok(r) => {
                    return self.fail(Some(id), TransportError::Resume(format!("HTTP {}", r.status())));
                }
                Err(e) => {
                    return self.fail(Some(id), TransportError::Resume(error_chain(e)));
                }
            };
            match self.pump(resp.bytes_stream(), sse::Parser::new(MAX_UPSTREAM_MESSAGE), Some(id)).await {
                Some((l, r)) => {
                    last_id = l;
                    retry = r;
                }
                None => return,
            }
        }
        self.fail(Some(id), TransportError::StreamKeptClosing);
    }

    /// Opens the standalone GET stream of a session-based server, for its own requests and
    /// notifications. Servers that answer 405 have none.
    pub(crate) fn start_get_stream(self: &Arc<Self>) {
        if !matches!(self.mode, Mode::Streamable) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            let mut failures = 0u32;
            let mut last_id: Option<String> = None;
            while !this.closed.is_cancelled() && failures < 5 {
                let Ok(headers) = this.headers_now().await else {
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(crate::oauth::client::RETRY_AFTER) => continue,
                        _ = this.closed.cancelled() => return,
                    }
                };
                let mut req = this.client.get(this.url.clone()).headers(headers).header(ACCEPT, "text/event-stream");
                if let Some(sid) = lock(&this.session_id).clone() {
                    req = req.header("mcp-session-id", sid);
                }
                if let Some(v) = lock(&this.protocol_version).clone() {
                    req = req.header("mcp-protocol-version", v);
                }
                if let Some(l) = &last_id {
                    req = req.header("last-event-id", l.clone());
                }
                let resp = tokio::select! {
                    r = req.send() => r,
                    _ = this.closed.cancelled() => return,
                };
                let resp = match resp {
                    Ok(r) if r.status().is_success() => r,
                    Ok(r) if r.status() == StatusCode::METHOD_NOT_ALLOWED => return,
                    // The server is gone (the stream ended and it no longer accepts), or it
                    // forgot the session: end this connection, so the supervisor says so and
                    // reconnects, instead of a state that says `running`.
                    Err(e) if e.is_connect() => {
                        tracing::warn!(server = %this.name, "upstream unreachable: {}", error_chain(e));
                        this.closed.cancel();
                        return;
                    }
                    Ok(r) if r.status() == StatusCode::NOT_FOUND && lock(&this.session_id).is_some() => {
                        tracing::info!(server = %this.name, "upstream session refused on the GET stream; re-initializing");
                        this.closed.cancel();
                        return;
                    }
                    _ => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(250 * u64::from(failures))).await;
                        continue;
                    }
                };
                failures = 0;
                let closed = this.closed.clone();
                let r = tokio::select! {
                    r = this.pump(resp.bytes_stream(), sse::Parser::new(MAX_UPSTREAM_MESSAGE), None) => r,
                    _ = closed.cancelled() => return,
                };
                if let Some((l, _)) = r {
                    last_id = Some(l);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }
}

pub(crate) use crate::mcp::session::ForwardHeaders;

/// The member of a 2026-07-28 request's params whose value its `Mcp-Name` header carries.
pub(super) fn name_key(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

/// A 2026-07-28 request's `Mcp-Method` and `Mcp-Name` header values, made where the request
/// was (so the link does not parse it again).
pub(crate) struct Named {
    method: HeaderValue,
    name: Option<HeaderValue>,
}

impl Named {
    /// The headers for `method` and the value of its [`name_key`] member; an error names the
    /// header that cannot carry its value (never the value: a mirrored argument may be
    /// sensitive).
    pub(super) fn new(method: &str, name: Option<&str>) -> Result<Self, TransportError> {
        let refused = |k: &str| TransportError::HeaderValue(k.to_owned());
        Ok(Named {
            method: HeaderValue::from_str(method).map_err(|_| refused("Mcp-Method"))?,
            // The encoded text becomes the value without another copy.
            name: name
                .map(|n| HeaderValue::try_from(encode_header_value(n)).map_err(|_| refused("Mcp-Name")))
                .transpose()?,
        })
    }
}

/// Adds the 2026-07-28 per-request `_meta` fields and returns the body with its `Mcp-Method`
/// and `Mcp-Name` header values: for what a link sends besides calls (notifications, answers).
fn for_stateless(msg: &[u8]) -> Result<(Bytes, String, Option<String>), TransportError> {
    let env = Envelope::parse(msg).map_err(|e| TransportError::Unsendable(e.to_string()))?;
    let method = env.method().to_owned();
    if env.kind != Kind::Request && env.kind != Kind::Notification {
        return Ok((Bytes::copy_from_slice(msg), method, None));
    }
    let (params, name) = match env.params {
        Some(p) => {
            let obj = RawObject::parse(p)
                .map_err(|e| TransportError::Unsendable(format!("params must be an object: {e}")))?;
            let name = name_key(&method).and_then(|k| obj.get_str(k));
            let merged_meta = match obj.get("_meta").map(RawObject::parse) {
                Some(Ok(m)) => m.to_json_with(&client_meta_for(&m, &[])),
                _ => client_meta(),
            };
            (obj.to_json_with(&[("_meta", &merged_meta)]), name)
        }
        None => (format!(r#"{{"_meta":{}}}"#, client_meta()), None),
    };
    let out = match env.kind {
        Kind::Request => jsonrpc::request(env.id.map_or("null", |i| i.get()), &method, Some(&params)),
        _ => jsonrpc::notification(&method, Some(&params)),
    };
    Ok((Bytes::from(out), method, name))
}

/// Encodes a header value: as is when it is visible ASCII, else `=?base64?…?=`.
pub(crate) fn encode_header_value(v: &str) -> String {
    use base64::Engine;
    if v.bytes().all(|b| (0x20..0x7f).contains(&b)) && !v.starts_with(' ') && !v.ends_with(' ') {
        v.to_owned()
    } else {
        format!("=?base64?{}?=", base64::engine::general_purpose::STANDARD.encode(v))
    }
}

fn content_type(h: &HeaderMap) -> String {
    h.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase()
}

/// A response body of either client.
enum ResponseBody {
    Full(reqwest::Body),
    Plain(hyper::body::Incoming),
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = TransportError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, TransportError>>> {
        match self.get_mut() {
            ResponseBody::Full(b) => {
                std::pin::Pin::new(b).poll_frame(cx).map_err(|e| TransportError::Body(error_chain(e)))
            }
            ResponseBody::Plain(b) => std::pin::Pin::new(b).poll_frame(cx).map_err(|e| TransportError::Body(chain(&e))),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            ResponseBody::Full(b) => hyper::body::Body::size_hint(b),
            ResponseBody::Plain(b) => hyper::body::Body::size_hint(b),
        }
    }
}

async fn read_limited<B>(resp: hyper::Response<B>) -> Result<Bytes, TransportError>
where
    B: hyper::body::Body<Data = Bytes, Error = TransportError> + Unpin,
{
    // Sized once from Content-Length (bounded), so a body in several chunks is copied once.
    let expected =
        hyper::body::Body::size_hint(resp.body()).exact().map_or(0, |n| n.min(MAX_UPSTREAM_MESSAGE as u64) as usize);
    let mut stream = http_body_util::BodyDataStream::new(resp.into_body());
    let mut buf = BytesMut::new();
    let failed = |e: TransportError| e;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(failed)?;
        if buf.is_empty() && chunk.len() <= MAX_UPSTREAM_MESSAGE {
            // Common case: one chunk; keep it without copying.
            if let Some(next) = stream.next().await {
                buf.reserve(expected.max(chunk.len() + next.as_ref().map_or(0, |n| n.len())));
                buf.extend_from_slice(&chunk);
                buf.extend_from_slice(&next.map_err(failed)?);
            } else {
                return Ok(chunk);
            }
        } else {
            buf.extend_from_slice(&chunk);
        }
        if buf.len() > MAX_UPSTREAM_MESSAGE {
            return Err(TransportError::TooLarge(MAX_UPSTREAM_MESSAGE));
        }
    }
    Ok(buf.freeze())
}

/// A URL as it may appear in messages: scheme, host, port and path only. Query strings and
/// userinfo can carry credentials, and messages reach clients and logs.
fn shown(url: &Url) -> String {
    crate::config::shown_url(url.as_str())
}

/// Why a POST got no answer.
struct PostError {
    /// The server could not be reached at all (connection refused, no route, DNS).
    unreachable: bool,
    /// What happened (without the URL).
    message: String,
}

/// An error and its causes, without the request URL (see [`shown`]).
/// A reqwest error and its causes, without its URL (which may carry credentials).
fn error_chain(e: reqwest::Error) -> String {
    chain(&e.without_url())
}

/// An error and its causes, `: `-separated.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_in_the_environment_keeps_requests_on_reqwest() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| std::ffi::OsString::from(v))
        };
        assert!(!proxy_in(env(&[])));
        assert!(!proxy_in(env(&[("HTTP_PROXY", ""), ("HTTPS_PROXY", "http://p:3128")])));
        assert!(proxy_in(env(&[("http_proxy", "http://p:3128")])));
        assert!(proxy_in(env(&[("ALL_PROXY", "socks5://p:1080")])));
    }

    #[test]
    fn messages_never_show_query_or_userinfo() {
        let u = Url::parse("https://user:pw@example.com:8443/mcp?api_key=SECRET#x").unwrap();
        assert_eq!(shown(&u), "https://example.com:8443/mcp");
    }

    #[tokio::test]
    async fn transport_errors_omit_the_url() {
        let e = reqwest::Client::new().get("http://127.0.0.1:1/mcp?api_key=SECRET").send().await.unwrap_err();
        let msg = error_chain(e);
        assert!(!msg.contains("SECRET") && !msg.contains("api_key"), "{msg}");
    }
}
