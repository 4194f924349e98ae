//! The bundled demo MCP server (`portcullis demo-server`): stdio by default, streamable HTTP in
//! both eras with `--http`. Deterministic tools for the built-in config, the README and the
//! tests: echo, add, sleep, fail, crash, progress, sample (a sampling round-trip), touch (a
//! `resources/updated` to subscribers), log (a `notifications/message`, honouring `logging/setLevel`), link (a
//! `resource_link` and an embedded resource),
//! spawn_grandchild, big, stats (including the most calls it had in flight at once), env. The
//! built-in demo offers only the showcase tools; the tests' fixtures ([`FIXTURES`]) need
//! `--fixtures`.
//!
//! It is a test fixture, not part of the gateway's hot path, so it uses `serde_json::Value`
//! freely. Invariant: in stdio mode nothing but protocol goes to stdout.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::sharded::lock;

/// Demo server options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Serve HTTP on this address instead of stdio.
    pub http: Option<SocketAddr>,
    /// Page size of lists.
    pub page_size: Option<usize>,
    /// serverInfo name.
    pub name: String,
    /// HTTP: refuse 2026-07-28 requests (a session-era-only server).
    pub session_only: bool,
    /// HTTP: answer an unknown session id with 400 "No valid session ID provided", as the
    /// TypeScript SDK's servers do after a restart, instead of 404.
    pub unknown_session_400: bool,
    /// Offer the test fixtures too ([`FIXTURES`]).
    pub fixtures: bool,
}

/// The tools only `--fixtures` offers: the tests' levers (crashes, delays, failures, large
/// answers, statistics, the environment), not what a first look at Portcullis should show.
pub const FIXTURES: &[&str] =
    &["forget_sessions", "drop_stream", "sleep", "fail", "crash", "spawn_grandchild", "big", "stats", "env"];

/// The longest a fixture waits for a state a test asked for (`stats until_in_flight`,
/// `touch until_told`).
const WAIT_AT_MOST: Duration = Duration::from_secs(30);

struct Demo {
    opts: Options,
    /// Calls running now (a watch, so `stats` can wait for a count instead of a test polling).
    in_flight: tokio::sync::watch::Sender<usize>,
    max_in_flight: AtomicUsize,
    calls: AtomicU64,
    next_id: AtomicU64,
    pending: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    cancels: Mutex<HashMap<String, CancellationToken>>,
    sessions: Mutex<HashMap<String, String>>,
    /// Who hears `notifications/resources/updated`: (URIs, stream) from `resources/subscribe`
    /// (stdio) and `subscriptions/listen` (2026-07-28).
    watchers: Mutex<Vec<(Vec<String>, Out)>>,
    /// Told when a watcher is added (`touch` waiting for a number of watchers).
    watcher_added: tokio::sync::Notify,
    /// The level from the last `logging/setLevel` (none: log everything).
    log_level: Mutex<Option<String>>,
    /// The `Mcp-Param-*` headers of the last HTTP request (reported by `stats`).
    param_headers: Mutex<serde_json::Map<String, Value>>,
    /// Results of `drop_stream` calls by event id, for resumption with `Last-Event-ID`.
    resumable: Mutex<HashMap<String, tokio::sync::watch::Receiver<Option<String>>>>,
    /// GET requests that resumed a stream.
    resumes: AtomicU64,
    /// Every HTTP header received (`name: value`), reported by `stats` so tests can prove what
    /// reached an upstream.
    seen_headers: Mutex<Vec<String>>,
}

type Out = mpsc::UnboundedSender<String>;

/// Runs the demo server until stdin closes (stdio) or forever (HTTP).
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let demo = Arc::new(Demo {
        opts: opts.clone(),
        in_flight: tokio::sync::watch::Sender::new(0),
        max_in_flight: AtomicUsize::new(0),
        calls: AtomicU64::new(0),
        next_id: AtomicU64::new(1),
        pending: Mutex::new(HashMap::new()),
        cancels: Mutex::new(HashMap::new()),
        sessions: Mutex::new(HashMap::new()),
        watchers: Mutex::new(Vec::new()),
        watcher_added: tokio::sync::Notify::new(),
        log_level: Mutex::new(None),
        param_headers: Mutex::new(serde_json::Map::new()),
        resumable: Mutex::new(HashMap::new()),
        resumes: AtomicU64::new(0),
        seen_headers: Mutex::new(Vec::new()),
    });
    match opts.http {
        Some(addr) => serve_http(demo, addr).await,
        None => serve_stdio(demo).await,
    }
}

async fn serve_stdio(demo: Arc<Demo>) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(line) = rx.recv().await {
            let mut buf = line.into_bytes();
            buf.push(b'\n');
            while let Ok(more) = rx.try_recv() {
                buf.extend_from_slice(more.as_bytes());
                buf.push(b'\n');
            }
            if stdout.write_all(&buf).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(msg) = serde_json::from_str::<Value>(&line) else {
            let _ =
                tx.send(json!({"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}).to_string());
            continue;
        };
        let demo = demo.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Some(resp) = demo.dispatch(msg, &tx).await {
                let _ = tx.send(resp.to_string());
            }
        });
    }
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    Ok(())
}

impl Demo {
    /// Handles any incoming message; returns the response for requests.
    async fn dispatch(self: &Arc<Self>, msg: Value, out: &Out) -> Option<Value> {
        let id = msg.get("id").cloned();
        let method = msg.get("method").and_then(Value::as_str).map(str::to_owned);
        match (method, id) {
            (None, Some(id)) => {
                if let Some(tx) = lock(&self.pending).remove(&id.to_string()) {
                    let _ = tx.send(msg.get("result").cloned().unwrap_or(Value::Null));
                }
                None
            }
            (Some(m), None) => {
                if m == "notifications/cancelled"
                    && let Some(rid) = msg.pointer("/params/requestId")
                    && let Some(t) = lock(&self.cancels).remove(&rid.to_string())
                {
                    t.cancel();
                }
                None
            }
            (Some(m), Some(id)) => {
                let params = msg.get("params").cloned().unwrap_or(json!({}));
                let token = CancellationToken::new();
                lock(&self.cancels).insert(id.to_string(), token.clone());
                let result = self.request(&m, &params, out, &token).await;
                lock(&self.cancels).remove(&id.to_string());
                if token.is_cancelled() {
                    return None;
                }
                Some(match result {
                    Ok(r) => json!({"jsonrpc":"2.0","id":id,"result":r}),
                    Err((code, message)) => json!({"jsonrpc":"2.0","id":id,"error":{"code":code,"message":message}}),
                })
            }
            (None, None) => None,
        }
    }

    fn page(&self, items: Vec<Value>, field: &str, params: &Value) -> Result<Value, (i64, String)> {
        let start = match params.get("cursor").and_then(Value::as_str) {
            Some(c) => c.parse::<usize>().map_err(|_| (-32602, "Invalid cursor".to_owned()))?,
            None => 0,
        };
        let size = self.opts.page_size.unwrap_or(usize::MAX);
        let end = start.saturating_add(size).min(items.len());
        let page: Vec<Value> = items.get(start..end).map(<[Value]>::to_vec).unwrap_or_default();
        let mut out = json!({ field: page });
        if end < items.len() {
            out["nextCursor"] = json!(end.to_string());
        }
        Ok(out)
    }

    async fn request(
        self: &Arc<Self>,
        method: &str,
        params: &Value,
        out: &Out,
        cancel: &CancellationToken,
    ) -> Result<Value, (i64, String)> {
        let info = json!({"name": self.opts.name, "version": env!("CARGO_PKG_VERSION")});
        let caps = json!({"tools":{"listChanged":true},"prompts":{},"resources":{"subscribe":true},"logging":{},"completions":{}});
        match method {
            "initialize" => {
                let requested = params.get("protocolVersion").and_then(Value::as_str).unwrap_or("2025-11-25");
                let version = if ["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"].contains(&requested) {
                    requested
                } else {
                    "2025-11-25"
                };
                Ok(json!({"protocolVersion": version, "capabilities": caps, "serverInfo": info}))
            }
            "server/discover" => Ok(json!({
                "supportedVersions": ["2026-07-28"], "capabilities": caps, "resultType": "complete",
                "_meta": {"io.modelcontextprotocol/serverInfo": info}
            })),
            "ping" | "resources/unsubscribe" => Ok(json!({})),
            "logging/setLevel" => {
                *lock(&self.log_level) = params.get("level").and_then(Value::as_str).map(str::to_owned);
                Ok(json!({}))
            }
            "resources/subscribe" => {
                let uri = params.get("uri").and_then(Value::as_str).unwrap_or("").to_owned();
                lock(&self.watchers).push((vec![uri], out.clone()));
                self.watcher_added.notify_waiters();
                Ok(json!({}))
            }
            "subscriptions/listen" => {
                let filter = params.get("notifications").cloned().unwrap_or(json!({}));
                let uris: Vec<String> = filter
                    .get("resourceSubscriptions")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default();
                let ack = json!({"jsonrpc":"2.0","method":"notifications/subscriptions/acknowledged","params":{"notifications":filter}});
                let _ = out.send(ack.to_string());
                lock(&self.watchers).push((uris, out.clone()));
                self.watcher_added.notify_waiters();
                cancel.cancelled().await;
                Ok(json!({"resultType":"complete","_meta":{}}))
            }
            "tools/list" => {
                let fixtures = self.opts.fixtures;
                let tools = tools()
                    .into_iter()
                    .filter(|t| fixtures || !FIXTURES.contains(&t["name"].as_str().unwrap_or("")))
                    .collect();
                self.page(tools, "tools", params)
            }
            "prompts/list" => self.page(
                vec![json!({"name":"greet","description":"A greeting","arguments":[{"name":"name","required":true}]})],
                "prompts",
                params,
            ),
            "prompts/get" => {
                if params.get("name").and_then(Value::as_str) != Some("greet") {
                    return Err((-32602, "Unknown prompt".into()));
                }
                let who = params.pointer("/arguments/name").and_then(Value::as_str).unwrap_or("world");
                Ok(json!({"messages":[{"role":"user","content":{"type":"text","text":format!("Hello, {who}!")}}]}))
            }
            "resources/list" => {
                self.page(vec![json!({"uri":"demo://info","name":"info","mimeType":"text/plain"})], "resources", params)
            }
            "resources/templates/list" => {
                self.page(vec![json!({"uriTemplate":"demo://items/{id}","name":"item"})], "resourceTemplates", params)
            }
            "resources/read" => {
                let uri = params.get("uri").and_then(Value::as_str).unwrap_or("");
                let text = if uri == "demo://info" {
                    format!("{} demo resource", self.opts.name)
                } else if let Some(id) = uri.strip_prefix("demo://items/") {
                    format!("item {id}")
                } else {
                    return Err((-32002, format!("Resource not found: {uri}")));
                };
                Ok(json!({"contents":[{"uri":uri,"mimeType":"text/plain","text":text}]}))
            }
            "completion/complete" => Ok(json!({"completion":{"values":["alice","bob"],"total":2,"hasMore":false}})),
            "tools/call" => {
                let mut now = 0;
                self.in_flight.send_modify(|n| {
                    *n += 1;
                    now = *n;
                });
                self.max_in_flight.fetch_max(now, Ordering::SeqCst);
                self.calls.fetch_add(1, Ordering::Relaxed);
                let r = self.call(params, out, cancel).await;
                self.in_flight.send_modify(|n| *n -= 1);
                r
            }
            other => Err((-32601, format!("Method not found: {other}"))),
        }
    }

    async fn call(
        self: &Arc<Self>,
        params: &Value,
        out: &Out,
        cancel: &CancellationToken,
    ) -> Result<Value, (i64, String)> {
        let name = params.get("name").and_then(Value::as_str).unwrap_or("");
        let args = params.get("arguments").cloned().unwrap_or(json!({}));
        let text = |t: String| Ok(json!({"content":[{"type":"text","text":t}]}));
        if !self.opts.fixtures && FIXTURES.contains(&name) {
            return Err((-32602, format!("Unknown tool: {name}")));
        }
        match name {
            "env" => {
                text(args.get("name").and_then(Value::as_str).and_then(|n| std::env::var(n).ok()).unwrap_or_default())
            }
            "echo" => text(args.get("text").and_then(Value::as_str).unwrap_or("").to_owned()),
            "add" => {
                let a = args.get("a").and_then(Value::as_f64).unwrap_or(0.0);
                let b = args.get("b").and_then(Value::as_f64).unwrap_or(0.0);
                text(format!("{}", a + b))
            }
            "sleep" => {
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(100);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(ms)) => text(format!("slept {ms} ms")),
                    _ = cancel.cancelled() => Err((-32800, "cancelled".into())),
                }
            }
            "fail" => {
                let m = args.get("message").and_then(Value::as_str).unwrap_or("failed on purpose");
                Ok(json!({"content":[{"type":"text","text":m}],"isError":true}))
            }
            "crash" => {
                tracing::warn!("crash tool called: exiting");
                std::process::exit(3);
            }
            "progress" => {
                let steps = args.get("steps").and_then(Value::as_u64).unwrap_or(3);
                let ms = args.get("ms").and_then(Value::as_u64).unwrap_or(5);
                let marker = args.get("text").and_then(Value::as_str).unwrap_or("");
                let token = params.pointer("/_meta/progressToken").cloned();
                for i in 1..=steps {
                    if let Some(t) = &token {
                        let n = json!({"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":t,"progress":i,"total":steps}});
                        let _ = out.send(n.to_string());
                    }
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                text(format!("done {steps} steps {marker}").trim_end().to_owned())
            }
            "sample"
                if params.pointer("/_meta/io.modelcontextprotocol~1protocolVersion") == Some(&json!("2026-07-28")) =>
            {
                // 2026-07-28: no back-channel; ask with InputRequiredResult, answer on the retry.
                let prompt = args.get("prompt").and_then(Value::as_str).unwrap_or("hello");
                match params.pointer("/inputResponses/sampling/content/text").and_then(Value::as_str) {
                    Some(t) => text(format!("sampled: {t}")),
                    None => Ok(json!({"resultType":"input_required","inputRequests":{"sampling":{
                        "method":"sampling/createMessage",
                        "params":{"messages":[{"role":"user","content":{"type":"text","text":prompt}}],"maxTokens":100}
                    }}})),
                }
            }
            "sample" => {
                let prompt = args.get("prompt").and_then(Value::as_str).unwrap_or("hello");
                let id = format!("\"s-{}\"", self.next_id.fetch_add(1, Ordering::Relaxed));
                let (tx, rx) = oneshot::channel();
                lock(&self.pending).insert(id.clone(), tx);
                let req = format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"method":"sampling/createMessage","params":{}}}"#,
                    json!({"messages":[{"role":"user","content":{"type":"text","text":prompt}}],"maxTokens":100})
                );
                let _ = out.send(req);
                match tokio::time::timeout(Duration::from_secs(30), rx).await {
                    Ok(Ok(v)) => {
                        let t = v.pointer("/content/text").and_then(Value::as_str).unwrap_or("").to_owned();
                        text(format!("sampled: {t}"))
                    }
                    _ => {
                        lock(&self.pending).remove(&id);
                        Err((-32603, "no answer to sampling".into()))
                    }
                }
            }
            "spawn_grandchild" => {
                let child =
                    std::process::Command::new("sleep").arg("3600").spawn().map_err(|e| (-32603, e.to_string()))?;
                let pid = child.id();
                // Deliberately not waited for: the test checks the gateway reaps the group.
                std::mem::forget(child);
                text(pid.to_string())
            }
            "log" => {
                let level = args.get("level").and_then(Value::as_str).unwrap_or("info");
                let rank = |l: &str| crate::mcp::session::log_rank(l).unwrap_or(0);
                let min = lock(&self.log_level).clone();
                if min.as_deref().is_none_or(|m| rank(level) >= rank(m)) {
                    let data = args.get("text").cloned().unwrap_or(json!("log line"));
                    let n =
                        json!({"jsonrpc":"2.0","method":"notifications/message","params":{"level":level,"data":data}});
                    let _ = out.send(n.to_string());
                }
                text(format!("logged at {level}"))
            }
            "forget_sessions" => {
                // The next request of every session gets 404, as after a server restart.
                lock(&self.sessions).clear();
                text("forgotten".into())
            }
            "link" => {
                let uri = args.get("uri").and_then(Value::as_str).unwrap_or("demo://info");
                Ok(json!({"content":[
                    {"type":"resource_link","uri":uri,"name":"linked"},
                    {"type":"resource","resource":{"uri":uri,"mimeType":"text/plain","text":"embedded"}}
                ]}))
            }
            "touch" => {
                let uri = args.get("uri").and_then(Value::as_str).unwrap_or("").to_owned();
                if let Some(want) = args.get("until_told").and_then(Value::as_u64) {
                    self.watchers_of(&uri, want as usize).await?;
                }
                let note = json!({"jsonrpc":"2.0","method":"notifications/resources/updated","params":{"uri":uri}});
                let mut watchers = lock(&self.watchers);
                watchers.retain(|(_, w)| !w.is_closed());
                let mut told = 0;
                for (uris, w) in watchers.iter() {
                    if uris.contains(&uri) && w.send(note.to_string()).is_ok() {
                        told += 1;
                    }
                }
                text(format!("told {told}"))
            }
            "big" => {
                let n = args.get("bytes").and_then(Value::as_u64).unwrap_or(1024) as usize;
                text("x".repeat(n))
            }
            "stats" => {
                if let Some(want) = args.get("until_in_flight").and_then(Value::as_u64) {
                    // Counting this stats call itself.
                    let mut rx = self.in_flight.subscribe();
                    tokio::time::timeout(WAIT_AT_MOST, rx.wait_for(|n| *n == want as usize + 1))
                        .await
                        .map_err(|_| (-32603, format!("in flight did not reach {want} within {WAIT_AT_MOST:?}")))?
                        .map_err(|_| (-32603, "stopping".to_owned()))?;
                }
                self.stats()
            }
            other => Err((-32602, format!("Unknown tool: {other}"))),
        }
    }

    /// The `stats` tool's answer.
    fn stats(&self) -> Result<Value, (i64, String)> {
        Ok(json!({"content":[{"type":"text","text":json!({
            "max_in_flight": self.max_in_flight.load(Ordering::SeqCst),
            // Not counting this stats call itself.
            "in_flight": self.in_flight.borrow().saturating_sub(1),
            "calls": self.calls.load(Ordering::Relaxed),
                "log_level": lock(&self.log_level).clone(),
                "param_headers": lock(&self.param_headers).clone(),
                "resumes": self.resumes.load(Ordering::Relaxed),
                "seen_headers": lock(&self.seen_headers).clone(),
                "sessions": lock(&self.sessions).len(),
                "pid": std::process::id(),
            }).to_string()}]}))
    }

    /// Waits until `want` live watchers hear `uri`: re-counted when one is added or one of
    /// those counted goes away (its stream closed), never on a timer.
    async fn watchers_of(&self, uri: &str, want: usize) -> Result<(), (i64, String)> {
        let wait = async {
            loop {
                let added = self.watcher_added.notified();
                tokio::pin!(added);
                added.as_mut().enable();
                let live: Vec<Out> = lock(&self.watchers)
                    .iter()
                    .filter(|(uris, w)| uris.iter().any(|u| u == uri) && !w.is_closed())
                    .map(|(_, w)| w.clone())
                    .collect();
                if live.len() == want {
                    return;
                }
                let closed = futures_util::future::select_all(live.iter().map(|w| Box::pin(w.closed())));
                if live.is_empty() {
                    added.await;
                } else {
                    tokio::select! {
                        _ = added => {}
                        _ = closed => {}
                    }
                }
            }
        };
        tokio::time::timeout(WAIT_AT_MOST, wait)
            .await
            .map_err(|_| (-32603, format!("{uri} did not have {want} watchers within {WAIT_AT_MOST:?}")))
    }
}

fn tools() -> Vec<Value> {
    let obj = |props: Value| json!({"type":"object","properties":props});
    vec![
        json!({"name":"echo","description":"Echoes text","inputSchema":obj(json!({"text":{"type":"string"}}))}),
        json!({"name":"log","description":"Sends a log message at a level","inputSchema":obj(json!({"level":{"type":"string"},"text":{"type":"string"}}))}),
        json!({"name":"link","description":"Returns a link to a resource and the resource embedded","inputSchema":obj(json!({"uri":{"type":"string"}}))}),
        json!({"name":"forget_sessions","description":"Ends every HTTP session (their next request gets 404)","inputSchema":obj(json!({}))}),
        json!({"name":"drop_stream","description":"HTTP: closes the response stream after a priming event; the result waits for a resume","inputSchema":obj(json!({"ms":{"type":"integer"}}))}),
        json!({"name":"touch","description":"Announces that a resource changed (first waiting, if asked, until until_told watchers hear it)","inputSchema":obj(json!({"uri":{"type":"string"},"until_told":{"type":"integer"}}))}),
        json!({"name":"add","description":"Adds two numbers","inputSchema":obj(json!({"a":{"type":"number"},"b":{"type":"number"}}))}),
        json!({"name":"sleep","description":"Sleeps ms milliseconds","inputSchema":obj(json!({"ms":{"type":"integer"}}))}),
        json!({"name":"fail","description":"Returns a tool error","inputSchema":obj(json!({"message":{"type":"string"}}))}),
        json!({"name":"crash","description":"Exits the server process","inputSchema":obj(json!({}))}),
        json!({"name":"progress","description":"Reports progress","inputSchema":obj(json!({"steps":{"type":"integer"},"ms":{"type":"integer"},"text":{"type":"string"}}))}),
        json!({"name":"sample","description":"Asks the client to sample","inputSchema":obj(json!({"prompt":{"type":"string"}}))}),
        json!({"name":"spawn_grandchild","description":"Starts a child process and returns its pid","inputSchema":obj(json!({}))}),
        json!({"name":"big","description":"Returns a text of the given size","inputSchema":obj(json!({"bytes":{"type":"integer"}}))}),
        json!({"name":"stats","description":"Call statistics (first waiting, if asked, until until_in_flight other calls run)","inputSchema":obj(json!({"until_in_flight":{"type":"integer"}}))}),
        json!({"name":"env","description":"The value of one of its environment variables","inputSchema":obj(json!({"name":{"type":"string"}}))}),
    ]
}

async fn serve_http(demo: Arc<Demo>, addr: SocketAddr) -> anyhow::Result<()> {
    let app = axum::Router::new().route("/mcp", axum::routing::any(http_mcp)).with_state(demo);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    // The tests read this line to learn the port.
    eprintln!("demo-server listening on http://{}/mcp", listener.local_addr()?);
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn http_mcp(State(demo): State<Arc<Demo>>, method: Method, headers: HeaderMap, body: Body) -> Response {
    let stateless = headers.get("mcp-protocol-version").and_then(|v| v.to_str().ok()) == Some("2026-07-28");
    let sid = headers.get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    {
        let mut seen = lock(&demo.seen_headers);
        for (k, v) in &headers {
            let line = format!("{k}: {}", v.to_str().unwrap_or("<binary>"));
            if !seen.contains(&line) {
                seen.push(line);
            }
        }
    }
    if stateless && demo.opts.session_only {
        // What a pre-2026 server says to a 2026-07-28 probe: a plain 400 without a stateless error.
        return StatusCode::BAD_REQUEST.into_response();
    }
    match method {
        Method::POST => {}
        Method::GET if headers.contains_key("last-event-id") => return resume(&demo, &headers).await,
        Method::DELETE => {
            if let Some(s) = sid {
                lock(&demo.sessions).remove(&s);
            }
            return StatusCode::OK.into_response();
        }
        _ => return StatusCode::METHOD_NOT_ALLOWED.into_response(),
    }
    let Ok(bytes) = crate::gate::read_body(body, 16 * 1024 * 1024, std::time::Duration::from_secs(60)).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let Ok(msg) = serde_json::from_slice::<Value>(&bytes) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"Parse error"}}"#.into(),
        );
    };
    let method_name = msg.get("method").and_then(Value::as_str).unwrap_or("").to_owned();
    if method_name == "tools/call" && msg.pointer("/params/name") != Some(&json!("stats")) {
        *lock(&demo.param_headers) = headers
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("mcp-param-"))
            .map(|(k, v)| (k.as_str().to_owned(), json!(v.to_str().unwrap_or(""))))
            .collect();
    }
    let is_request = msg.get("id").is_some() && msg.get("method").is_some();
    let mut new_session = None;
    if !stateless {
        if method_name == "initialize" {
            let Ok(id) = crate::random::id() else {
                return json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32603,"message":"No randomness"}}"#.into(),
                );
            };
            lock(&demo.sessions).insert(id.clone(), String::new());
            new_session = Some(id);
        } else {
            match &sid {
                None => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"Missing session"}}"#.into(),
                    );
                }
                Some(s) if !lock(&demo.sessions).contains_key(s) && demo.opts.unknown_session_400 => {
                    return json_response(
                        StatusCode::BAD_REQUEST,
                        r#"{"jsonrpc":"2.0","error":{"code":-32000,"message":"Bad Request: No valid session ID provided"},"id":null}"#.into(),
                    );
                }
                Some(s) if !lock(&demo.sessions).contains_key(s) => return StatusCode::NOT_FOUND.into_response(),
                _ => {}
            }
        }
    } else if method_name == "initialize" {
        return json_response(
            StatusCode::BAD_REQUEST,
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32601,"message":"Method not found"}}"#.into(),
        );
    }
    if !stateless && method_name == "tools/call" && msg.pointer("/params/name") == Some(&json!("drop_stream")) {
        return drop_stream(&demo, &msg);
    }
    if !is_request {
        let (tx, _rx) = mpsc::unbounded_channel();
        demo.dispatch(msg, &tx).await;
        return StatusCode::ACCEPTED.into_response();
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let d = demo.clone();
    let mut work = Box::pin(async move { d.dispatch(msg, &tx).await });
    let mut resp = tokio::select! {
        biased;
        r = &mut work => json_response(StatusCode::OK, r.map(|v| v.to_string()).unwrap_or_default()),
        Some(first) = rx.recv() => {
            let stream = crate::mcp::downstream::http::async_stream(move |out| async move {
                let _ = out.send(crate::mcp::sse::message(first.as_bytes(), None)).await;
                loop {
                    tokio::select! {
                        r = &mut work => {
                            while let Ok(m) = rx.try_recv() { let _ = out.send(crate::mcp::sse::message(m.as_bytes(), None)).await; }
                            if let Some(r) = r { let _ = out.send(crate::mcp::sse::message(r.to_string().as_bytes(), None)).await; }
                            return;
                        }
                        Some(m) = rx.recv() => { let _ = out.send(crate::mcp::sse::message(m.as_bytes(), None)).await; }
                    }
                }
            });
            crate::mcp::downstream::http::sse_response(stream, None)
        }
    };
    if let Some(id) = new_session.and_then(|s| axum::http::HeaderValue::from_str(&s).ok()) {
        resp.headers_mut().insert("mcp-session-id", id);
    }
    resp
}

/// `drop_stream`: answers with an SSE stream that carries only a priming event (an id and a
/// short `retry`) and ends; the result is kept for a GET with `Last-Event-ID` (SEP-1699 polling).
fn drop_stream(demo: &Arc<Demo>, msg: &Value) -> Response {
    let event_id = format!("drop-{}", demo.next_id.fetch_add(1, Ordering::Relaxed));
    let (tx, rx) = tokio::sync::watch::channel(None);
    lock(&demo.resumable).insert(event_id.clone(), rx);
    let id = msg.get("id").cloned().unwrap_or(Value::Null);
    let ms = msg.pointer("/params/arguments/ms").and_then(Value::as_u64).unwrap_or(100);
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        let result = json!({"jsonrpc":"2.0","id":id,"result":{"content":[{"type":"text","text":"resumed"}]}});
        let _ = tx.send(Some(result.to_string()));
    });
    let priming = format!("id: {event_id}\nretry: 50\ndata: \n\n");
    let stream = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(bytes::Bytes::from(priming))]);
    crate::mcp::downstream::http::sse_response(stream, None)
}

/// A GET with `Last-Event-ID`: the rest of a dropped stream (its result), then the end.
async fn resume(demo: &Arc<Demo>, headers: &HeaderMap) -> Response {
    let last = headers.get("last-event-id").and_then(|v| v.to_str().ok()).unwrap_or("");
    let Some(mut rx) = lock(&demo.resumable).get(last).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    demo.resumes.fetch_add(1, Ordering::Relaxed);
    let Ok(Ok(result)) =
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(Option::is_some)).await.map(|r| r.map(|v| v.clone()))
    else {
        return StatusCode::GATEWAY_TIMEOUT.into_response();
    };
    let event = crate::mcp::sse::message(result.unwrap_or_default().as_bytes(), Some(&format!("{last}-done")));
    crate::mcp::downstream::http::sse_response(
        futures_util::stream::iter([Ok::<_, std::convert::Infallible>(event)]),
        None,
    )
}
