//! Builder harnesses: in-process gateways, demo upstreams (stdio and HTTP child processes), a
//! small MCP client over reqwest that understands JSON and SSE answers.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use portcullis::config::{self, Env};
use portcullis::mcp::gateway::Gateway;
use portcullis::mcp::sse;
use portcullis::server::{self, Running};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The portcullis binary under test.
pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// A YAML config under construction.
#[derive(Default)]
pub(crate) struct GatewayBuilder {
    yaml: String,
    top: String,
    env: Vec<(String, String)>,
}

pub(crate) fn gateway() -> GatewayBuilder {
    GatewayBuilder { yaml: "servers:\n".into(), ..Default::default() }
}

/// A temporary directory removed on drop.
pub(crate) struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("portcullis-it-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl GatewayBuilder {
    /// A stdio demo server; `extra` is added to its entry (indented YAML lines).
    pub(crate) fn demo(mut self, name: &str, args: &[&str], extra: &str) -> Self {
        let mut all = vec!["demo-server", "--fixtures", "--name", name];
        all.extend_from_slice(args);
        self.yaml.push_str(&format!("  {name}:\n    command: {BIN:?}\n    args: {}\n", json!(all)));
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            self.yaml.push_str(&format!("    {}\n", line.trim()));
        }
        self
    }

    /// Any stdio command.
    pub(crate) fn command(mut self, name: &str, command: &str, args: &[&str], extra: &str) -> Self {
        self.yaml.push_str(&format!("  {name}:\n    command: {command:?}\n    args: {}\n", json!(args)));
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            self.yaml.push_str(&format!("    {}\n", line.trim()));
        }
        self
    }

    /// A remote server.
    pub(crate) fn remote(mut self, name: &str, url: &str, extra: &str) -> Self {
        self.yaml.push_str(&format!("  {name}:\n    url: {url:?}\n"));
        for line in extra.lines().filter(|l| !l.trim().is_empty()) {
            self.yaml.push_str(&format!("    {}\n", line.trim()));
        }
        self
    }

    /// Top-level YAML after `servers` (auth, tenants, rate_limit, trusted_proxies…).
    pub(crate) fn top(mut self, yaml: &str) -> Self {
        self.top.push_str(yaml);
        if !self.top.ends_with('\n') {
            self.top.push('\n');
        }
        self
    }

    /// An environment variable as config substitution and `PORTCULLIS_TOKEN(S)` see it.
    pub(crate) fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// The YAML text.
    pub(crate) fn yaml(&self) -> String {
        format!("{}{}", self.yaml, self.top)
    }

    fn config(&self, audit: &std::path::Path) -> portcullis::config::Config {
        let store = audit.with_file_name("tokens.db");
        let text = format!(
            "{}audit:\n  file: {:?}\nstore:\n  path: {:?}\n",
            self.yaml(),
            audit.display().to_string(),
            store.display().to_string()
        );
        let env = Env::from_pairs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut config = config::parse(&text, false, &env).expect("valid test config");
        config.listen = "127.0.0.1:0".parse().unwrap();
        config
    }

    /// Starts the gateway in this process on 127.0.0.1:0 and waits until every server runs.
    pub(crate) async fn start(self) -> TestGateway {
        let _ = tracing_subscriber::fmt()
            .with_test_writer()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
            .try_init();
        let dir = TempDir::new();
        let audit = dir.0.join("audit.jsonl");
        let config = self.config(&audit);
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let names: Vec<String> = config.servers.iter().filter(|s| s.enabled).map(|s| s.name.clone()).collect();
        let gw = Gateway::start(config).expect("the gateway starts");
        for n in names {
            if let Some(up) = gw.upstream(&n) {
                let _ = up.ready_by(tokio::time::Instant::now() + Duration::from_secs(20)).await;
            }
        }
        let running = server::serve(listener, gw).await.unwrap();
        TestGateway { url: format!("http://{}", running.addr), running: Some(running), audit, builder: self, _dir: dir }
    }
}

pub(crate) struct TestGateway {
    pub url: String,
    pub running: Option<Running>,
    pub audit: std::path::PathBuf,
    builder: GatewayBuilder,
    _dir: TempDir,
}

impl TestGateway {
    /// A handle on a gateway another thread owns (only its URL is used).
    pub(crate) fn detached(url: String) -> Self {
        TestGateway {
            url,
            running: None,
            audit: Default::default(),
            builder: GatewayBuilder::default(),
            _dir: TempDir::new(),
        }
    }

    pub(crate) fn mcp(&self) -> String {
        format!("{}/mcp", self.url)
    }
    pub(crate) fn server(&self, name: &str) -> String {
        format!("{}/servers/{name}/mcp", self.url)
    }
    pub(crate) fn gateway(&self) -> Arc<Gateway> {
        self.running.as_ref().unwrap().gateway.clone()
    }

    /// Reloads with the same servers and this top-level YAML instead of the original.
    pub(crate) async fn reload_top(&mut self, top: &str) {
        self.builder.top = top.to_owned();
        let config = self.builder.config(&self.audit);
        self.gateway().reload(config).await;
    }

    /// The audit records written so far, once `ready` holds for them (they are written by
    /// another thread: read again each time it writes more).
    pub(crate) async fn audit_until(&self, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let path = self.audit.clone();
        let ready = &ready;
        let mut written = self.gateway().audit_written();
        until(&mut written, Duration::from_secs(10), || {
            let path = path.clone();
            async move {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
                ready(&records).then_some(records)
            }
        })
        .await
    }

    /// Waits until `f` yields, checking it now and after each change of the gateway's state
    /// (an upstream's status, a session opened or ended, a reload: [`Gateway::changes`]).
    pub(crate) async fn until<T, F, Fut>(&self, limit: Duration, f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        until(&mut self.gateway().changes(), limit, f).await
    }
    pub(crate) async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// A demo server over HTTP in a child process.
pub(crate) struct HttpDemo {
    pub url: String,
    /// Kept so the process lives as long as the handle (kill on drop).
    pub _child: Child,
}

pub(crate) async fn http_demo(args: &[&str]) -> HttpDemo {
    http_demo_on(0, args).await
}

/// A demo server over HTTP on a given port of 127.0.0.1 (0: any).
pub(crate) async fn http_demo_on(port: u16, args: &[&str]) -> HttpDemo {
    let mut child = Command::new(BIN)
        .args(["demo-server", "--fixtures"])
        .args(["--http", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = listen_url(&mut child).await;
    HttpDemo { url, _child: child }
}

/// POSTs a JSON body with a bearer token (no `Accept`, no session): the raw response.
pub(crate) async fn post_as(url: &str, token: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(url)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// One HTTP request with an optional bearer token and JSON body: the status and the answer as
/// JSON (`{"raw": text}` when it is not JSON).
pub(crate) async fn http_json(
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b.to_owned());
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(json!({"raw": text})))
}

/// Reads a child's stderr until its `listening on URL` line; keeps draining it afterwards.
pub(crate) async fn listen_url(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap().unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.trim().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    url
}

/// What one request produced: the response and the messages that came before it.
#[derive(Debug, Default)]
pub(crate) struct Answer {
    pub status: u16,
    pub response: Value,
    pub related: Vec<Value>,
}

/// A streamable-HTTP MCP client for tests.
#[derive(Clone)]
pub(crate) struct Client {
    pub http: reqwest::Client,
    pub url: String,
    pub session: Option<String>,
    pub version: String,
    pub modern: bool,
    /// Extra headers on every request (credentials).
    pub headers: Vec<(String, String)>,
}

impl Client {
    pub(crate) fn new(url: &str) -> Self {
        Client {
            http: reqwest::Client::new(),
            url: url.to_owned(),
            session: None,
            version: "2025-11-25".into(),
            modern: false,
            headers: Vec::new(),
        }
    }

    /// The same client presenting a bearer token.
    pub(crate) fn bearer(mut self, token: &str) -> Self {
        self.headers.push(("authorization".into(), format!("Bearer {token}")));
        self
    }

    /// A session-based client with a bearer token.
    pub(crate) async fn connect_as(url: &str, token: &str) -> Self {
        let mut c = Client::new(url).bearer(token);
        c.initialize("2025-11-25").await;
        c
    }

    /// A session-based client after `initialize`.
    pub(crate) async fn connect(url: &str) -> Self {
        Self::connect_version(url, "2025-11-25").await
    }

    pub(crate) async fn connect_version(url: &str, version: &str) -> Self {
        let mut c = Client::new(url);
        c.initialize(version).await;
        c
    }

    async fn initialize(&mut self, version: &str) {
        self.initialize_with(version, json!({"sampling": {}})).await;
    }

    /// `initialize` declaring `capabilities`, then `initialized`.
    pub(crate) async fn initialize_with(&mut self, version: &str, capabilities: Value) {
        let c = self;
        let resp = c
            .post(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":version,"capabilities":capabilities,"clientInfo":{"name":"it","version":"1"}}}))
            .await;
        assert_eq!(resp.status(), 200);
        c.session = resp.headers().get("mcp-session-id").map(|v| v.to_str().unwrap().to_owned());
        let body: Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
        c.version = body["result"]["protocolVersion"].as_str().unwrap().to_owned();
        c.notify("notifications/initialized", None).await;
    }

    /// A stateless 2026-07-28 client.
    pub(crate) fn modern(url: &str) -> Self {
        let mut c = Client::new(url);
        c.modern = true;
        c.version = "2026-07-28".into();
        c
    }

    pub(crate) fn request_builder(&self, body: &Value) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s);
        }
        if self.modern {
            req = req.header("mcp-protocol-version", &self.version);
            if let Some(m) = body.get("method").and_then(Value::as_str) {
                req = req.header("mcp-method", m);
                let name = match m {
                    "tools/call" | "prompts/get" => body.pointer("/params/name"),
                    "resources/read" => body.pointer("/params/uri"),
                    _ => None,
                };
                if let Some(n) = name.and_then(Value::as_str) {
                    req = req.header("mcp-name", n);
                }
            }
        } else if self.session.is_some() {
            req = req.header("mcp-protocol-version", &self.version);
        }
        req.body(body.to_string())
    }

    pub(crate) async fn post(&self, body: Value) -> reqwest::Response {
        self.request_builder(&body).send().await.unwrap()
    }

    pub(crate) fn add_meta(&self, mut params: Value) -> Value {
        if self.modern {
            let meta = params.as_object_mut().unwrap().entry("_meta").or_insert_with(|| json!({}));
            meta["io.modelcontextprotocol/protocolVersion"] = json!(self.version);
            meta["io.modelcontextprotocol/clientCapabilities"] = json!({});
        }
        params
    }

    pub(crate) async fn notify(&self, method: &str, params: Option<Value>) {
        let mut body = json!({"jsonrpc":"2.0","method":method});
        if let Some(p) = params {
            body["params"] = p;
        }
        let r = self.post(body).await;
        assert_eq!(r.status(), 202, "notification {method}");
    }

    /// Sends a request and reads the whole answer (JSON or SSE). Server-to-client requests on
    /// the stream are answered with `on_request`.
    pub(crate) async fn request_with(
        &self,
        id: Value,
        method: &str,
        params: Value,
        on_request: impl Fn(&Value) -> Value,
    ) -> Answer {
        let params = self.add_meta(params);
        let resp = self.post(json!({"jsonrpc":"2.0","id":id,"method":method,"params":params})).await;
        let status = resp.status().as_u16();
        let is_sse =
            resp.headers().get("content-type").is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
        if !is_sse {
            let text = resp.text().await.unwrap();
            return Answer {
                status,
                response: serde_json::from_str(&text).unwrap_or(json!({"raw": text})),
                related: vec![],
            };
        }
        let mut parser = sse::Parser::new(1 << 26);
        let mut stream = resp.bytes_stream();
        let mut related = Vec::new();
        while let Some(chunk) = stream.next().await {
            for ev in parser.feed(&chunk.unwrap()).unwrap() {
                let msg: Value = serde_json::from_str(&ev.data).unwrap();
                if msg.get("id") == Some(&id) && msg.get("method").is_none() {
                    return Answer { status, response: msg, related };
                }
                if msg.get("method").is_some() && msg.get("id").is_some() {
                    let result = on_request(&msg);
                    let r = self.post(json!({"jsonrpc":"2.0","id":msg["id"],"result":result})).await;
                    assert_eq!(r.status(), 202);
                }
                related.push(msg);
            }
        }
        panic!("stream ended without a response to {id}");
    }

    pub(crate) async fn request(&self, id: Value, method: &str, params: Value) -> Answer {
        self.request_with(id, method, params, |_| json!({})).await
    }

    pub(crate) async fn call(&self, tool: &str, args: Value) -> Answer {
        self.request(json!(1), "tools/call", json!({"name": tool, "arguments": args})).await
    }

    /// The text of a tool result, or panics with the answer.
    pub(crate) async fn call_text(&self, tool: &str, args: Value) -> String {
        let a = self.call(tool, args).await;
        a.response["result"]["content"][0]["text"]
            .as_str()
            .unwrap_or_else(|| panic!("{tool}: {:?}", a.response))
            .to_owned()
    }

    /// Every tool name, following cursors.
    pub(crate) async fn all_tools(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..100 {
            let params = match &cursor {
                Some(c) => json!({"cursor": c}),
                None => json!({}),
            };
            let a = self.request(json!(9), "tools/list", params).await;
            let r = &a.response["result"];
            for t in r["tools"].as_array().unwrap_or_else(|| panic!("{:?}", a.response)) {
                out.push(t["name"].as_str().unwrap().to_owned());
            }
            match r.get("nextCursor").and_then(Value::as_str) {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
        panic!("pagination did not end");
    }
}

/// Polls `f` until it returns Some, up to `limit` (for state that has no event to wait on).
pub(crate) async fn until<T, F, Fut>(changes: &mut tokio::sync::watch::Receiver<u64>, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        // Marked seen before the check: a change during the check wakes the wait below.
        changes.borrow_and_update();
        if let Some(v) = f().await {
            return v;
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("the gateway went away"),
            Err(_) => panic!("condition not reached within {limit:?}"),
        }
    }
}

/// A `NOTIFY_SOCKET` for one child: it says `READY=1` (with its address as `STATUS`) once it
/// listens, by the systemd notification protocol, so a test waits for that message.
pub(crate) struct Readiness {
    sock: tokio::net::UnixDatagram,
    path: std::path::PathBuf,
    _dir: TempDir,
}

impl Readiness {
    pub(crate) fn new() -> Self {
        let dir = TempDir::new();
        let path = dir.0.join("notify.sock");
        let sock = tokio::net::UnixDatagram::bind(&path).unwrap();
        Readiness { sock, path, _dir: dir }
    }

    /// The variable to give the child.
    pub(crate) fn env(&self) -> (&'static str, String) {
        ("NOTIFY_SOCKET", self.path.display().to_string())
    }

    /// The `STATUS` of the child's `READY=1` message (`listening on URL`), waiting up to 30 s.
    pub(crate) async fn ready(&self) -> String {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = tokio::time::timeout(Duration::from_secs(30), self.sock.recv(&mut buf))
                .await
                .expect("no readiness message within 30 s")
                .unwrap();
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == "READY=1") {
                return msg.lines().find_map(|l| l.strip_prefix("STATUS=")).unwrap_or_default().to_owned();
            }
        }
    }
}

/// Waits until none of `pids` is alive. The one wait in this suite that checks on a timer:
/// these are not our children (the gateway's children and their children, reparented when it
/// exits), and the end of another's process has no event short of a pidfd.
pub(crate) async fn reaped(pids: &[u32], limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while pids.iter().any(|p| alive(*p)) {
        assert!(tokio::time::Instant::now() < deadline, "still alive after {limit:?}: {pids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a pid is alive (present in /proc and not a zombie).
pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next()).unwrap_or("");
            state != "Z" && state != "X"
        }
        Err(_) => false,
    }
}

/// An open SSE stream (a session's GET stream or a 2026-07-28 `subscriptions/listen`).
pub(crate) struct Events {
    stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    parser: sse::Parser,
    queue: std::collections::VecDeque<sse::Event>,
}

impl Events {
    fn new(resp: reqwest::Response) -> Self {
        Events { stream: Box::pin(resp.bytes_stream()), parser: sse::Parser::new(1 << 26), queue: Default::default() }
    }

    /// Reads the SSE stream of a response.
    pub(crate) fn from_response(resp: reqwest::Response) -> Self {
        Self::new(resp)
    }

    /// The next event of any type with data, as (event name, data), waiting up to 10 s.
    pub(crate) async fn next_event(&mut self) -> (Option<String>, String) {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                let name = (!ev.event.is_empty()).then(|| ev.event.clone());
                return (name, ev.data);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.stream.next())
                .await
                .expect("no message on the stream within 10 s")
                .expect("the stream ended")
                .unwrap();
            for ev in self.parser.feed(&chunk).unwrap() {
                if !ev.data.is_empty() {
                    self.queue.push_back(ev);
                }
            }
        }
    }

    /// The next message, waiting up to 10 s.
    pub(crate) async fn next(&mut self) -> Value {
        loop {
            let (name, data) = self.next_event().await;
            if name.as_deref().is_none_or(|n| n == "message") {
                return serde_json::from_str(&data).unwrap();
            }
        }
    }

    /// Waits until the server ends the stream (messages on the way are skipped).
    pub(crate) async fn ended(&mut self) {
        while let Some(chunk) = self.stream.next().await {
            if chunk.is_err() {
                break;
            }
        }
    }

    /// The response with this id (the end of a request's own stream), skipping the messages
    /// before it.
    pub(crate) async fn response(&mut self, id: Value) -> Value {
        loop {
            let m = self.next().await;
            if m.get("method").is_none() && m["id"] == id {
                return m;
            }
        }
    }

    /// The next message with this method, skipping others.
    pub(crate) async fn next_method(&mut self, method: &str) -> Value {
        loop {
            let m = self.next().await;
            if m["method"] == method {
                return m;
            }
        }
    }
}

impl Client {
    /// Opens the session's standalone GET stream.
    pub(crate) async fn get_stream(&self) -> Events {
        let mut req = self.http.get(&self.url);
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let resp = req
            .header("accept", "text/event-stream")
            .header("mcp-session-id", self.session.as_deref().unwrap())
            .header("mcp-protocol-version", &self.version)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        Events::new(resp)
    }

    /// Opens a 2026-07-28 `subscriptions/listen` stream with this filter.
    pub(crate) async fn listen(&self, id: Value, notifications: Value) -> Events {
        let params = self.add_meta(json!({ "notifications": notifications }));
        let resp = self.post(json!({"jsonrpc":"2.0","id":id,"method":"subscriptions/listen","params":params})).await;
        assert_eq!(resp.status(), 200);
        Events::new(resp)
    }
}

/// A `portcullis serve` child on 127.0.0.1, and its stderr lines as they come.
pub(crate) struct Served {
    pub child: Child,
    pub url: String,
    /// The lines up to the `listening on` one, not read by the tests yet.
    backlog: std::collections::VecDeque<String>,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Served {
    pub(crate) async fn start(config: &std::path::Path, env: &[(&str, &str)]) -> Served {
        Self::start_with(config, env, &[]).await
    }

    /// [`Served::start`] with more arguments for `serve` (e.g. `--workers 1`).
    pub(crate) async fn start_with(config: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> Served {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--config", config.to_str().unwrap(), "--listen", "127.0.0.1:0"]).args(args);
        cmd.env_remove("PORTCULLIS_TOKEN").env_remove("PORTCULLIS_TOKENS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let _ = tx.send(line);
            }
        });
        let mut backlog = std::collections::VecDeque::new();
        let listening = Self::wait(&mut lines, "listening on ", &mut backlog).await;
        let url = listening.split("listening on ").nth(1).unwrap().trim().to_owned();
        Served { child, url, backlog, lines }
    }

    /// The next stderr line containing `needle` (every line before it is passed over), each
    /// line passed over kept in `kept` when given.
    async fn wait(
        lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
        needle: &str,
        kept: &mut std::collections::VecDeque<String>,
    ) -> String {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.recv().await {
                if line.contains(needle) {
                    return line;
                }
                kept.push_back(line);
            }
            panic!("stderr ended before {needle:?}");
        });
        found.await.unwrap_or_else(|_| panic!("no {needle:?} on stderr"))
    }

    /// Waits until each of `servers` has logged `upstream connected` (in any order) from here.
    pub(crate) async fn connected(&mut self, servers: &[&str]) {
        let mut left: Vec<&str> = servers.to_vec();
        while !left.is_empty() {
            let line = self.next_line_with("upstream connected server=").await;
            left.retain(|n| !line.contains(&format!("server={n} ")));
        }
    }

    /// The next stderr line containing `needle`, from the start of stderr on: every line
    /// before it is passed over.
    pub(crate) async fn next_line_with(&mut self, needle: &str) -> String {
        while let Some(line) = self.backlog.pop_front() {
            if line.contains(needle) {
                return line;
            }
        }
        Self::wait(&mut self.lines, needle, &mut std::collections::VecDeque::new()).await
    }
}

/// Runs the binary to completion (`check`, `token …`) in `dir` (None: here), without any
/// `PORTCULLIS_TOKEN(S)` of the test's own environment: (success, stdout, stderr).
pub(crate) async fn run_cli(
    dir: Option<&std::path::Path>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("PORTCULLIS_TOKEN").env_remove("PORTCULLIS_TOKENS");
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
