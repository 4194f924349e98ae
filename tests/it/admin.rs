//! The management API: admin role, server status and control while others serve, stats,
//! Prometheus metrics with bounded series, `/rpc` under the caller's grants, reload over HTTP.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const ROOT: &str = "root-secret-0123456789abcdef0";
const USER: &str = "user-secret-0123456789abcdef0";

const TOP: &str = r#"
auth:
  tokens:
    root: {token: root-secret-0123456789abcdef0, role: admin}
    user: {token: user-secret-0123456789abcdef0, tools: ["!a__crash"]}
"#;

async fn get(url: &str, token: Option<&str>) -> (u16, Value) {
    http_json(reqwest::Method::GET, url, token, None).await
}

async fn post(url: &str, token: &str, body: &str) -> (u16, Value) {
    http_json(reqwest::Method::POST, url, Some(token), Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_need_the_admin_role() {
    let gw = gateway().demo("a", &[], "").top(TOP).start().await;
    for path in ["/servers", "/servers/a", "/stats", "/metrics"] {
        let url = format!("{}{path}", gw.url);
        assert_eq!(get(&url, None).await.0, 401, "{path}");
        let (status, body) = get(&url, Some(USER)).await;
        assert_eq!(status, 403, "{path}");
        assert_eq!(body["error"], "forbidden");
        assert_eq!(get(&url, Some(ROOT)).await.0, 200, "{path}");
    }
    assert_eq!(post(&format!("{}/admin/reload", gw.url), USER, "").await.0, 403);
    assert_eq!(post(&format!("{}/servers/a/stop", gw.url), USER, "").await.0, 403);
    assert_eq!(get(&format!("{}/servers/nope", gw.url), Some(ROOT)).await.0, 404);
    let (_, a) = get(&format!("{}/servers/a", gw.url), Some(ROOT)).await;
    assert_eq!((a["state"].as_str(), a["transport"].as_str()), (Some("running"), Some("stdio")), "{a}");
    assert!(a["pid"].as_u64().is_some() && a["tools"].as_u64().unwrap() > 5, "{a}");
    assert!(a["protocol_version"].is_string());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_one_server_leaves_the_other_serving() {
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(TOP).start().await;
    let client = Client::connect_as(&gw.mcp(), ROOT).await;
    let mut events = client.get_stream().await;
    let pid = |s: Value| s["pid"].as_u64().unwrap();
    let a_pid = pid(get(&format!("{}/servers/a", gw.url), Some(ROOT)).await.1);

    // A long call on b and one on a; a is stopped; b's call completes, a's ends with an error.
    let on_b = tokio::spawn({
        let c = client.clone();
        async move { c.call_text("b__sleep", json!({"ms": 800})).await }
    });
    let on_a = tokio::spawn({
        let c = client.clone();
        async move { c.call("a__sleep", json!({"ms": 60000})).await }
    });
    crate::upstream::wait_in_flight(&client, "a", 1).await;
    let (status, stopped) = post(&format!("{}/servers/a/stop", gw.url), ROOT, "").await;
    assert_eq!((status, stopped["state"].as_str()), (200, Some("stopped")), "{stopped}");
    let a_answer = tokio::time::timeout(Duration::from_secs(5), on_a).await.unwrap().unwrap();
    let message = a_answer.response["error"]["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("server a") && message.contains("stopped"), "{message}");
    assert_eq!(on_b.await.unwrap(), "slept 800 ms");
    events.next_method("notifications/tools/list_changed").await;
    assert!(!client.all_tools().await.iter().any(|t| t.starts_with("a__")));
    let (_, health) = get(&format!("{}/health", gw.url), None).await;
    assert_eq!(health, json!({"status":"degraded","store":"ok","servers":{"up":1,"down":1}}));
    assert_eq!(post(&format!("{}/servers/a/stop", gw.url), ROOT, "").await.0, 409);

    // Start and restart: a serves again, under a new pid after the restart.
    assert_eq!(post(&format!("{}/servers/a/start", gw.url), ROOT, "").await.0, 200);
    gw.until(Duration::from_secs(10), || async {
        let a = client.call("a__echo", json!({"text": "back"})).await;
        (a.response["result"]["content"][0]["text"] == "back").then_some(())
    })
    .await;
    let started_pid = pid(get(&format!("{}/servers/a", gw.url), Some(ROOT)).await.1);
    assert_ne!(started_pid, a_pid);
    assert_eq!(post(&format!("{}/servers/a/restart", gw.url), ROOT, "").await.0, 200);
    let restarted = gw
        .until(Duration::from_secs(10), || async {
            get(&format!("{}/servers/a", gw.url), Some(ROOT)).await.1["pid"].as_u64().filter(|p| *p != started_pid)
        })
        .await;
    assert_ne!(restarted, started_pid);
    assert_eq!(post(&format!("{}/servers/a/explode", gw.url), ROOT, "").await.0, 404);
    gw.stop().await;
}

/// A small Prometheus text-format parser: every sample line is `name{labels} value`.
fn series(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (key, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value == "+Inf" || value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let name_end = key.find('{').unwrap_or(key.len());
        let name = &key[..name_end];
        assert!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'), "{line}");
        if name_end < key.len() {
            assert!(key.ends_with('}'), "{line}");
            for pair in key[name_end + 1..key.len() - 1].split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
                assert!(!v.contains('\n'));
            }
        }
        out.insert(key.to_owned());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_metrics_and_rpc() {
    let gw = gateway().demo("a", &[], "").top(TOP).start().await;
    let user = Client::connect_as(&gw.mcp(), USER).await;
    user.call_text("a__echo", json!({"text": "x"})).await;
    user.call("a__crash", json!({})).await; // refused: not granted

    // /rpc: one request, no session, the caller's own grants.
    let (status, answer) = post(
        &format!("{}/rpc", gw.url),
        USER,
        r#"{"jsonrpc":"2.0","id":"r1","method":"tools/call","params":{"name":"a__echo","arguments":{"text":"rpc"}}}"#,
    )
    .await;
    assert_eq!((status, &answer["result"]["content"][0]["text"]), (200, &json!("rpc")), "{answer}");
    let denied = post(
        &format!("{}/rpc", gw.url),
        USER,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"a__crash","arguments":{}}}"#,
    )
    .await;
    assert_eq!(denied.1["error"]["code"], -32602);
    assert_eq!(post(&format!("{}/rpc", gw.url), USER, "[]").await.0, 400);

    let (_, stats) = get(&format!("{}/stats", gw.url), Some(ROOT)).await;
    let a = &stats["servers"]["a"];
    assert!(a["requests"].as_u64().unwrap() >= 4 && a["refusals"].as_u64().unwrap() >= 2, "{stats}");
    assert!(a["latency_ms"]["p50"].as_f64().is_some() && a["latency_ms"]["p99"].as_f64().is_some());
    assert!(stats["identities"]["user"]["requests"].as_u64().unwrap() >= 4, "{stats}");

    let metrics = |gw_url: String| async move {
        let resp = reqwest::Client::new()
            .get(format!("{gw_url}/metrics"))
            .header("authorization", format!("Bearer {ROOT}"))
            .send()
            .await
            .unwrap();
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        resp.text().await.unwrap()
    };
    let text = metrics(gw.url.clone()).await;
    for needle in [
        r#"portcullis_requests_total{server="a",method="tools/call",outcome="allowed"}"#,
        r#"portcullis_requests_total{server="a",method="tools/call",outcome="refused"}"#,
        r#"portcullis_sessions{transport="streamable_http"}"#,
        r#"portcullis_upstream_up{server="a"} 1"#,
        "portcullis_request_duration_seconds_bucket",
        r#"portcullis_reloads_total{result="ok"}"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(!text.contains("user") && !text.contains(USER), "an identity or a secret in a label");

    // 1,000 requests with random methods and tool names do not add series.
    let before = series(&text);
    let mut seed = 7u64;
    for i in 0..1000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let method = if i % 2 == 0 { format!("x/{seed}") } else { "tools/call".to_owned() };
        let body =
            json!({"jsonrpc":"2.0","id":i,"method":method,"params":{"name":format!("a__t{seed}"),"arguments":{}}});
        let _ = user.post(body).await;
    }
    let after = series(&metrics(gw.url.clone()).await);
    assert_eq!(before.len(), after.len(), "new series: {:?}", after.difference(&before).collect::<Vec<_>>());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_over_http_applies_a_valid_file_and_refuses_an_invalid_one() {
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    let good = gateway().demo("a", &[], "").top(TOP).yaml();
    std::fs::write(&cfg, &good).unwrap();
    let mut served = Served::start(&cfg, &[]).await;
    let url = served.url.trim_end_matches("/mcp").to_owned();
    // The listener opens while the child may still be starting.
    served.connected(&["a"]).await;
    std::fs::write(&cfg, good.replace("servers:\n", "servers:\n  bad name: {command: x}\n")).unwrap();
    let (status, body) = post(&format!("{url}/admin/reload"), ROOT, "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["errors"][0].as_str().unwrap().contains("servers.bad name"), "{body}");
    assert_eq!(get(&format!("{url}/servers/a"), Some(ROOT)).await.1["state"], "running");
    let with_b = gateway().demo("a", &[], "").demo("b", &[], "").top(TOP).yaml();
    std::fs::write(&cfg, with_b).unwrap();
    assert_eq!(post(&format!("{url}/admin/reload"), ROOT, "").await.0, 200);
    let client = Client::connect_as(&format!("{url}/mcp"), ROOT).await;
    served.connected(&["b"]).await;
    assert_eq!(client.call_text("b__echo", json!({"text": "new"})).await, "new");
    let text = reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .header("authorization", format!("Bearer {ROOT}"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The file watcher may have reloaded the same edits too: at least one of each.
    let count = |result: &str| -> u64 {
        let key = format!("portcullis_reloads_total{{result=\"{result}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(key.as_str())).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    assert!(count("failed") >= 1 && count("ok") >= 1, "{text}");
}

/// Writes a file the way editors save: a temporary file renamed over the original.
fn save(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_edits_reload_without_dropping_untouched_servers_or_sessions() {
    let dir = TempDir::new();
    let real = dir.0.join("v1.yaml");
    let link = dir.0.join("portcullis.yaml");
    let config = |servers: &[(&str, &str)]| {
        let mut b = gateway();
        for (name, extra) in servers {
            b = b.demo(name, &[], extra);
        }
        b.top(TOP).yaml()
    };
    std::fs::write(&real, config(&[("a", ""), ("b", ""), ("c", "")])).unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let mut served = Served::start(&link, &[]).await;
    let url = served.url.trim_end_matches("/mcp").to_owned();
    let status = |name: &'static str| {
        let url = url.clone();
        async move { get(&format!("{url}/servers/{name}"), Some(ROOT)).await }
    };
    let pid_of = |v: &Value| v["pid"].as_u64();
    served.connected(&["a", "b", "c"]).await;
    let (a_pid, c_pid) = (pid_of(&status("a").await.1).unwrap(), pid_of(&status("c").await.1).unwrap());
    let client = Client::connect_as(&format!("{url}/mcp"), ROOT).await;
    let session = client.session.clone();
    let long = tokio::spawn({
        let c = client.clone();
        async move { c.call_text("a__sleep", json!({"ms": 2000})).await }
    });

    // Rename-on-save over the symlink's target: b removed, c changed, d added, a untouched.
    save(&real, &config(&[("a", ""), ("c", "timeout: 42s"), ("d", "")]));
    // The reload restarts c and starts d (in either order).
    served.connected(&["c", "d"]).await;
    assert_eq!(status("d").await.1["state"], "running");
    assert!(pid_of(&status("c").await.1).is_some_and(|p| p != c_pid));
    assert_eq!(status("b").await.0, 404);
    assert_eq!(long.await.unwrap(), "slept 2000 ms", "the call on the untouched server was cut");
    assert_eq!(pid_of(&status("a").await.1), Some(a_pid), "the untouched server was restarted");
    assert_eq!(client.session, session);
    assert_eq!(client.call_text("a__echo", json!({"text": "same session"})).await, "same session");

    // A symlink swap to another file: e added.
    let v2 = dir.0.join("v2.yaml");
    std::fs::write(&v2, config(&[("a", ""), ("c", "timeout: 42s"), ("d", ""), ("e", "")])).unwrap();
    let tmp_link = dir.0.join("link.tmp");
    std::os::unix::fs::symlink(&v2, &tmp_link).unwrap();
    std::fs::rename(&tmp_link, &link).unwrap();
    served.connected(&["e"]).await;
    assert_eq!(status("e").await.1["state"], "running");

    // An invalid edit changes nothing.
    save(&v2, "servers:\n  Bad Name: {command: x}\n");
    let metrics = || async {
        reqwest::Client::new()
            .get(format!("{url}/metrics"))
            .header("authorization", format!("Bearer {ROOT}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    served.next_line_with("config not reloaded").await;
    assert!(!metrics().await.contains(r#"portcullis_reloads_total{result="failed"} 0"#));
    assert_eq!(status("e").await.1["state"], "running");
    assert_eq!(pid_of(&status("a").await.1), Some(a_pid));
    assert_eq!(client.call_text("a__echo", json!({"text": "still"})).await, "still");
}
