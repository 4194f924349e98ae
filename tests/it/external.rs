//! Real third-party peers around Portcullis: the official Python SDK as a client in both eras,
//! `@modelcontextprotocol/server-everything` as a stdio and an HTTP upstream, and the MCP
//! conformance suite run against a Python SDK fixture directly and through Portcullis.
//! `./scripts/test` installs the pinned peers into `target/test-deps`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;

use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::support::*;

/// Where `./scripts/test` installed the pinned peers.
pub(crate) fn deps() -> PathBuf {
    let dir = std::env::var_os("PORTCULLIS_TEST_DEPS")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-deps"), PathBuf::from);
    assert!(
        dir.join("venv/bin/python").exists() && dir.join("node/node_modules/.bin/node").exists(),
        "the external test peers are not installed in {}: run ./scripts/test",
        dir.display()
    );
    dir
}

pub(crate) fn python() -> PathBuf {
    deps().join("venv/bin/python")
}

pub(crate) fn node() -> PathBuf {
    deps().join("node/node_modules/.bin/node")
}

pub(crate) fn node_module(path: &str) -> String {
    deps().join("node/node_modules").join(path).display().to_string()
}

pub(crate) fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name).display().to_string()
}

/// Runs the Python SDK client fixture and returns what it printed.
pub(crate) async fn sdk_client(url: &str, mode: &str, prefix: &str, sample: bool) -> Value {
    let out = sdk_client_run(url, mode, prefix, sample, None).await;
    assert!(out.status.success(), "SDK client failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

pub(crate) async fn sdk_client_run(
    url: &str,
    mode: &str,
    prefix: &str,
    sample: bool,
    token: Option<&str>,
) -> std::process::Output {
    sdk_client_calls(url, mode, prefix, sample, token, 0).await
}

/// The SDK client fixture with `calls` more calls on its session.
pub(crate) async fn sdk_client_calls(
    url: &str,
    mode: &str,
    prefix: &str,
    sample: bool,
    token: Option<&str>,
    calls: u32,
) -> std::process::Output {
    let mut cmd = Command::new(python());
    cmd.arg(fixture("sdk_client.py")).args([url, mode, prefix]);
    if sample {
        cmd.arg("sample");
    }
    if let Some(t) = token {
        cmd.env("PORTCULLIS_TEST_TOKEN", t);
    }
    cmd.env("PORTCULLIS_BIN", BIN).env("PORTCULLIS_TEST_CALLS", calls.to_string());
    tokio::time::timeout(std::time::Duration::from_secs(60), cmd.kill_on_drop(true).output())
        .await
        .expect("the SDK client hung")
        .unwrap()
}

#[tokio::test]
async fn python_sdk_client_with_a_token_and_without() {
    let gw = gateway().demo("demo", &[], "").env("PORTCULLIS_TOKEN", "sdk-token-0123456789abcdef").start().await;
    for mode in ["legacy", "auto"] {
        let ok = sdk_client_run(&gw.mcp(), mode, "demo__", false, Some("sdk-token-0123456789abcdef")).await;
        assert!(ok.status.success(), "{mode}: {}", String::from_utf8_lossy(&ok.stderr));
        let printed: Value = serde_json::from_slice(&ok.stdout).unwrap();
        assert_eq!(printed["echo"], json!(["hello from the python sdk"]));
        let refused = sdk_client_run(&gw.mcp(), mode, "demo__", false, None).await;
        assert!(!refused.status.success(), "{mode}: connected without a token");
        // The SDK reports the refusal its own way; the gateway's audit says what it answered.
        let records = gw.audit_until(|r| r.iter().any(|r| r["status"] == 401 && r["identity"].is_null())).await;
        assert!(records.iter().all(|r| r["status"] == 401 || r["identity"] == "env"), "{records:?}");
    }
    gw.stop().await;
}

#[tokio::test]
async fn python_sdk_client_in_both_eras() {
    let gw = gateway().demo("demo", &[], "").start().await;
    let legacy = sdk_client(&gw.mcp(), "legacy", "demo__", true).await;
    assert_eq!(legacy["protocol_version"], "2025-11-25");
    assert!(legacy["tools"].as_array().unwrap().contains(&json!("demo__echo")));
    assert_eq!(legacy["echo"], json!(["hello from the python sdk"]));
    assert!(legacy["sample"][0].as_str().unwrap().contains("sampled: a haiku"), "{legacy}");
    assert_eq!(legacy["sample_is_error"], false);
    let after_legacy = gw.gateway().handshakes();
    assert_eq!(after_legacy.initialize, 1);

    // The SDK's default: probe with server/discover, then speak 2026-07-28 statelessly.
    let sessions_before = gw.gateway().session_count();
    let modern = sdk_client(&gw.mcp(), "auto", "demo__", true).await;
    assert_eq!(modern["protocol_version"], "2026-07-28");
    assert_eq!(modern["tools"], legacy["tools"]);
    assert_eq!(modern["echo"], json!(["hello from the python sdk"]));
    // Sampling from a session-era child reaches the stateless client as InputRequiredResult,
    // which the SDK answers and retries.
    assert!(modern["sample"][0].as_str().unwrap().contains("sampled: a haiku"), "{modern}");
    let after_modern = gw.gateway().handshakes();
    assert!(after_modern.discover > after_legacy.discover, "Portcullis saw no server/discover");
    assert_eq!(after_modern.initialize, after_legacy.initialize, "the modern client sent initialize");
    assert_eq!(gw.gateway().session_count(), sessions_before, "a session was minted for a modern client");
    gw.stop().await;
}

/// Starts server-everything over streamable HTTP, pinned to 127.0.0.1 by a preload.
async fn everything_http() -> (Child, String) {
    let (child, base) = everything("streamableHttp", 0).await;
    (child, format!("{base}/mcp"))
}

/// Starts server-everything with a transport (`streamableHttp`, `sse`) on a port (0: any);
/// returns the process and its base URL.
async fn everything(transport: &str, port: u16) -> (Child, String) {
    let mut child = Command::new(node())
        .args(["--require", &fixture("loopback.cjs")])
        .arg(node_module("@modelcontextprotocol/server-everything/dist/index.js"))
        .arg(transport)
        .env("PORT", port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = listen_url(&mut child).await;
    (child, url)
}

#[tokio::test]
async fn server_everything_as_stdio_and_http_upstream() {
    let (_http_child, http_url) = everything_http().await;
    let everything = node_module("@modelcontextprotocol/server-everything/dist/index.js");
    let node = node().display().to_string();
    let gw = gateway()
        .command("ev", &node, &[&everything, "stdio"], "")
        .remote("evh", &http_url, "transport: streamable_http")
        .start()
        .await;
    let client = Client::connect(&gw.mcp()).await;
    let tools = gw
        .until(std::time::Duration::from_secs(30), || async {
            let tools = client.all_tools().await;
            (tools.contains(&"ev__echo".to_owned()) && tools.contains(&"evh__echo".to_owned())).then_some(tools)
        })
        .await;
    assert!(tools.iter().filter(|t| t.starts_with("ev__")).count() >= 5, "{tools:?}");
    assert_eq!(client.call_text("ev__echo", json!({"message": "via stdio"})).await, "Echo: via stdio");
    assert_eq!(client.call_text("evh__echo", json!({"message": "via http"})).await, "Echo: via http");
    // The same servers unprefixed on their own endpoints.
    let one = Client::connect(&gw.server("evh")).await;
    assert_eq!(one.call_text("echo", json!({"message": "direct name"})).await, "Echo: direct name");
    gw.stop().await;
}

/// Runs the conformance suite's active server scenarios against a URL; returns
/// scenario → (checks passed, checks failed).
async fn conformance(url: &str) -> BTreeMap<String, (u32, u32)> {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(300),
        Command::new(node())
            .arg(node_module("@modelcontextprotocol/conformance/dist/index.js"))
            .args(["server", "--url", url])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the conformance suite hung")
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines().filter(|l| l.contains("Error:") || l.contains("FAILURE")) {
        println!("{url}: {line}");
    }
    let summary = text.split("=== SUMMARY ===").nth(1).unwrap_or_else(|| panic!("no summary in: {text}"));
    let mut results = BTreeMap::new();
    for line in summary.lines() {
        // "✓ tools-list: 1 passed, 0 failed"
        let Some(rest) = line.strip_prefix("✓ ").or_else(|| line.strip_prefix("✗ ")) else { continue };
        let Some((name, counts)) = rest.split_once(": ") else { continue };
        let nums: Vec<u32> = counts.split(|c: char| !c.is_ascii_digit()).filter_map(|n| n.parse().ok()).collect();
        if let [passed, failed] = nums[..] {
            results.insert(name.to_owned(), (passed, failed));
        }
    }
    results
}

#[tokio::test]
async fn conformance_suite_same_through_portcullis_as_direct() {
    let mut fixture_server = Command::new(python())
        .arg(fixture("conformance_server.py"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let direct_url = listen_url(&mut fixture_server).await;
    let gw = gateway().remote("fx", &direct_url, "").start().await;
    Client::connect(&gw.server("fx")).await; // the upstream is connected before the suite starts

    let direct = conformance(&direct_url).await;
    let through = conformance(&gw.server("fx")).await;
    let mut table = String::from("| scenario | direct | through Portcullis |\n|---|---|---|\n");
    for (name, (p, f)) in &direct {
        let (tp, tf) = through.get(name).copied().unwrap_or((0, 99));
        table.push_str(&format!("| {name} | {p} passed, {f} failed | {tp} passed, {tf} failed |\n"));
    }
    println!("{table}");
    assert_eq!(direct.len(), 30, "expected the 30 active server scenarios:\n{table}");
    assert!(direct.values().all(|(p, f)| *p > 0 && *f == 0), "the fixture fails directly:\n{table}");
    assert_eq!(direct.keys().collect::<Vec<_>>(), through.keys().collect::<Vec<_>>(), "{table}");
    assert!(through.values().all(|(p, f)| *p > 0 && *f == 0), "a scenario fails through Portcullis:\n{table}");
    gw.stop().await;
}

#[tokio::test]
async fn server_everything_as_legacy_sse_upstream_fails_fast_and_reconnects() {
    let (mut sse_child, base) = everything("sse", 0).await;
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let gw = gateway().remote("evs", &format!("{base}/sse"), "transport: sse").start().await;
    let client = Client::connect(&gw.mcp()).await;
    gw.until(std::time::Duration::from_secs(30), || async {
        client.all_tools().await.contains(&"evs__echo".to_owned()).then_some(())
    })
    .await;
    assert_eq!(client.call_text("evs__echo", json!({"message": "over sse"})).await, "Echo: over sse");

    // A call in flight when the SSE stream drops gets an error at once (long before the
    // operation's 60 s), naming the server. In flight: its first progress report is here.
    let slow = client
        .post(
            json!({"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"evs__trigger-long-running-operation",
            "arguments":{"duration": 60, "steps": 60},"_meta":{"progressToken":"slow"}}}),
        )
        .await;
    let mut slow = Events::from_response(slow);
    assert_eq!(slow.next_method("notifications/progress").await["params"]["progressToken"], "slow");
    sse_child.kill().await.unwrap();
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), slow.response(json!(9))).await.unwrap();
    let message = answer["error"]["message"].as_str().unwrap_or_else(|| panic!("{answer:?}"));
    assert!(message.contains("evs"), "{message}");

    // The server comes back on the same address: the next call re-initializes and works.
    let (_again, _) = everything("sse", port).await;
    let echoed = gw
        .until(std::time::Duration::from_secs(30), || async {
            let a = client.call("evs__echo", json!({"message": "again"})).await;
            a.response["result"]["content"][0]["text"].as_str().map(str::to_owned)
        })
        .await;
    assert_eq!(echoed, "Echo: again");
    gw.stop().await;
}

#[tokio::test]
async fn python_sdk_sse_client_aggregated_per_server_and_alias() {
    let token = "sse-token-0123456789abcdef0";
    let gw = gateway().demo("d", &[], "").env("PORTCULLIS_TOKEN", token).start().await;
    for (url, prefix) in [
        (format!("{}/sse", gw.url), "d__"),
        (format!("{}/servers/d/sse", gw.url), ""),
        (format!("{}/d/sse", gw.url), ""),
    ] {
        let out = sdk_client_run(&url, "sse", prefix, true, Some(token)).await;
        assert!(out.status.success(), "{url}: {}", String::from_utf8_lossy(&out.stderr));
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(printed["tools"].as_array().unwrap().contains(&json!(format!("{prefix}echo"))), "{printed}");
        assert_eq!(printed["echo"], json!(["hello from the python sdk"]), "{url}");
        assert!(printed["sample"][0].as_str().unwrap().contains("sampled: a haiku"), "{url}: {printed}");
    }
    let refused = sdk_client_run(&format!("{}/sse", gw.url), "sse", "d__", false, None).await;
    assert!(!refused.status.success());
    gw.stop().await;
}

#[tokio::test]
async fn python_sdk_stdio_client_launches_portcullis_stdio() {
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    let top =
        "auth:\n  tokens:\n    narrow: {token: narrow-secret-0123456789abcd, tools: [\"d__echo\", \"d__sample\"]}\n";
    std::fs::write(&cfg, gateway().demo("d", &[], "").top(top).yaml()).unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    for mode in ["stdio", "stdio-auto"] {
        let out = sdk_client_run(&cfg, mode, "d__", true, None).await;
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(printed["echo"], json!(["hello from the python sdk"]), "{mode}");
        assert!(printed["sample"][0].as_str().unwrap().contains("sampled: a haiku"), "{mode}: {printed}");
        assert!(printed["tools"].as_array().unwrap().len() > 5, "{mode}: {printed}");
    }
    // --as applies a configured token's grants.
    let mut cmd = Command::new(python());
    cmd.arg(fixture("sdk_client.py")).args([cfg.as_str(), "stdio", "d__"]);
    cmd.env("PORTCULLIS_BIN", BIN).env("PORTCULLIS_STDIO_ARGS", "--as narrow");
    let out = cmd.output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(printed["tools"], json!(["d__echo", "d__sample"]));
}

/// Issue 11, items 17 and 19 with the real SDK server: server-everything restarted on the same
/// address is re-initialized behind the caller's back; the first call after it is back works.
#[tokio::test]
async fn server_everything_restarted_is_transparent_to_the_caller() {
    let (mut first, base) = everything("streamableHttp", 0).await;
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let gw = gateway().remote("ev", &format!("{base}/mcp"), "transport: streamable_http").start().await;
    let client = Client::connect(&gw.mcp()).await;
    assert_eq!(client.call_text("ev__echo", json!({"message": "before"})).await, "Echo: before");
    first.kill().await.unwrap();
    let _ = first.wait().await;
    let (_again, _) = everything("streamableHttp", port).await;
    let a = client.call("ev__echo", json!({"message": "after"})).await;
    assert_eq!(a.response["result"]["content"][0]["text"], "Echo: after", "{:?}", a.response);
    gw.stop().await;
}

/// A clean start with server-everything logs no warning: its `roots/list` right after
/// `initialized`, outside any call, is answered (no roots) without one; the log is text lines
/// (no audit records in it), pids read as numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_start_with_server_everything_warns_of_nothing() {
    let dir = TempDir::new();
    let everything = node_module("@modelcontextprotocol/server-everything/dist/index.js");
    let cfg = dir.0.join("portcullis.yaml");
    let yaml = gateway().command("ev", &node().display().to_string(), &[&everything, "stdio"], "").yaml();
    std::fs::write(&cfg, yaml).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .env_remove("PORTCULLIS_TOKEN")
        .env_remove("PORTCULLIS_TOKENS")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
    let mut log = Vec::new();
    let mut url = None;
    let mut connected = false;
    while !(connected && url.is_some()) {
        let line = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            url = Some(rest.trim().to_owned());
        }
        connected |= line.contains("upstream connected");
        log.push(line);
    }
    let client = Client::connect(&url.unwrap()).await;
    assert!(client.all_tools().await.iter().any(|t| t.starts_with("ev__")));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id().unwrap() as i32), nix::sys::signal::Signal::SIGINT)
        .unwrap();
    while let Ok(Some(line)) = lines.next_line().await {
        log.push(line);
    }
    let text = log.join("\n");
    assert!(!text.contains(" WARN "), "a warning on a clean start:\n{text}");
    assert!(!text.contains("\"outcome\""), "audit records in the log:\n{text}");
    let connected = log.iter().find(|l| l.contains("upstream connected")).unwrap();
    let pid = connected.split("pid=").nth(1).and_then(|p| p.split_whitespace().next()).unwrap();
    assert!(pid.parse::<u32>().is_ok(), "pid={pid}: {connected}");
    let audit = std::fs::read_to_string(dir.0.join("portcullis-audit.jsonl")).unwrap();
    let record: Value = serde_json::from_str(audit.lines().last().unwrap()).unwrap();
    let latency = record["latency_ms"].to_string();
    assert!(latency.split('.').nth(1).is_none_or(|d| d.len() <= 3), "latency_ms {latency}");
}

/// A scraper's credential (`role: metrics`) reads `/metrics` (valid Prometheus text, read by
/// the official Python client's parser) and `/stats`, and nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_credential_reads_metrics_and_nothing_else() {
    let gw = gateway()
        .demo("a", &[], "")
        .top("auth:\n  tokens:\n    scraper: {token: scrape-secret-0123456789, role: metrics}\n    alice: alice-secret-0123456789\n    root: {token: root-secret-0123456789, role: admin}\n")
        .start()
        .await;
    let client = Client::connect_as(&gw.mcp(), "alice-secret-0123456789").await;
    client.call_text("a__echo", json!({"text": "hi"})).await;
    let get = |path: &str, token: &str| {
        let req = reqwest::Client::new().get(format!("{}{path}", gw.url)).bearer_auth(token);
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (status, text) = get("/metrics", "scrape-secret-0123456789").await;
    assert_eq!(status, 200, "{text}");
    let mut parser = Command::new(python())
        .args([
            "-c",
            "import sys\nfrom prometheus_client.parser import text_string_to_metric_families\nfor f in text_string_to_metric_families(sys.stdin.read()):\n    print(f.name, f.type, len(f.samples))\n",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = parser.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = parser.wait_with_output().await.unwrap();
    assert!(out.status.success(), "not Prometheus text: {}", String::from_utf8_lossy(&out.stderr));
    let families = String::from_utf8_lossy(&out.stdout);
    assert!(families.lines().any(|l| l.starts_with("portcullis_requests ")), "{families}");
    assert!(families.lines().any(|l| l.starts_with("portcullis_sessions gauge")), "{families}");
    assert_eq!(get("/stats", "scrape-secret-0123456789").await.0, 200);
    // Nothing else: not MCP, not the management API.
    for path in ["/servers", "/admin/tokens", "/servers/a"] {
        assert_eq!(get(path, "scrape-secret-0123456789").await.0, 403, "{path}");
    }
    let mcp = Client::new(&gw.mcp()).bearer("scrape-secret-0123456789");
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"it","version":"1"}}});
    assert_eq!(mcp.post(init).await.status(), 403);
    let reload = reqwest::Client::new()
        .post(format!("{}/admin/reload", gw.url))
        .bearer_auth("scrape-secret-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 403);
    // A user may not read the figures; an unrestricted admin may.
    assert_eq!(get("/metrics", "alice-secret-0123456789").await.0, 403);
    assert_eq!(get("/metrics", "root-secret-0123456789").await.0, 200);
}
