//! Upstream behaviour: concurrency over a shared child, crashes, the breaker, timeouts,
//! cancellation, sampling in per-session children, session-based HTTP (resume, 404), legacy SSE.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Client, gateway, http_demo};

/// Waits until the demo server `server` has `n` calls in flight (not counting the stats call
/// that asks): the demo answers once its count is `n`.
pub(crate) async fn wait_in_flight(client: &Client, server: &str, n: u64) {
    let s: Value =
        serde_json::from_str(&client.call_text(&format!("{server}__stats"), json!({"until_in_flight": n})).await)
            .unwrap();
    assert_eq!(s["in_flight"], n, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_calls_share_one_child_without_crossing() {
    let gw = gateway().demo("s", &[], "").start().await;
    let a = Client::connect(&gw.mcp()).await;
    let b = Client::connect(&gw.mcp()).await;
    let mut tasks = Vec::new();
    for (who, client) in [("a", a.clone()), ("b", b.clone())] {
        for i in 0..100 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                // Both sessions use the same request ids and progress tokens.
                let params = json!({"name": "s__progress", "arguments": {"steps": 2, "ms": 150, "text": format!("{who}-{i}")},
                    "_meta": {"progressToken": format!("tok-{i}")}});
                let ans = client.request(json!(i), "tools/call", params).await;
                assert_eq!(ans.response["id"], json!(i));
                let text = ans.response["result"]["content"][0]["text"].as_str().unwrap().to_owned();
                assert_eq!(text, format!("done 2 steps {who}-{i}"));
                let progress: Vec<&Value> = ans.related.iter().filter(|m| m["method"] == "notifications/progress").collect();
                assert_eq!(progress.len(), 2, "{who}-{i}: {:?}", ans.related);
                for p in progress {
                    assert_eq!(p["params"]["progressToken"], json!(format!("tok-{i}")));
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats: Value = serde_json::from_str(&a.call_text("s__stats", json!({})).await).unwrap();
    assert!(stats["max_in_flight"].as_u64().unwrap() >= 50, "gateway serialised calls: {stats}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_mid_call_fails_fast_restarts_and_next_call_works() {
    let gw = gateway().demo("c", &[], "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    let pid_before: Value = serde_json::from_str(&client.call_text("c__stats", json!({})).await).unwrap();
    let slow = {
        let client = client.clone();
        tokio::spawn(async move { client.call("c__sleep", json!({"ms": 20000})).await })
    };
    wait_in_flight(&client, "c", 1).await;
    let crash = client.call("c__crash", json!({})).await;
    assert!(crash.response["error"]["message"].as_str().unwrap().contains("server c"), "{:?}", crash.response);
    // Failed with the crash, not at the end of its sleep or the call timeout (60 s).
    let slow = tokio::time::timeout(Duration::from_secs(15), slow).await.expect("the in-flight call waited").unwrap();
    assert_eq!(slow.response["error"]["code"], -32000);
    assert!(slow.response["error"]["message"].as_str().unwrap().contains("server c"));
    // The next call waits for the restart and succeeds, on a new process.
    assert_eq!(client.call_text("c__echo", json!({"text": "back"})).await, "back");
    let pid_after: Value = serde_json::from_str(&client.call_text("c__stats", json!({})).await).unwrap();
    assert_ne!(pid_before["pid"], pid_after["pid"]);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loop_opens_the_breaker_and_calls_fail_fast() {
    let gw = gateway().command("bad", "sh", &["-c", "exit 1"], "").demo("good", &[], "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    // Five failed starts open the breaker: a change of its status.
    gw.until(Duration::from_secs(20), || async {
        let a = client.call("bad__echo", json!({})).await;
        a.response["error"]["message"].as_str().is_some_and(|m| m.contains("crash loop")).then_some(())
    })
    .await;
    // While the breaker is open every call fails at once, saying why (no start is attempted).
    let a = client.call("bad__echo", json!({})).await;
    assert_eq!(a.response["error"]["code"], -32000);
    assert!(a.response["error"]["message"].as_str().unwrap().contains("crash loop"), "{:?}", a.response);
    // The other server is untouched, and lists leave the failed one out.
    assert_eq!(client.call_text("good__echo", json!({"text": "ok"})).await, "ok");
    let tools = client.all_tools().await;
    assert!(tools.iter().all(|t| t.starts_with("good__")), "{tools:?}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_answers_with_an_error_naming_the_server() {
    let gw = gateway().demo("t", &[], "timeout: 300ms").start().await;
    let client = Client::connect(&gw.mcp()).await;
    // Answered by the timeout (the sleep would have succeeded after 10 s).
    let a = client.call("t__sleep", json!({"ms": 10000})).await;
    let msg = a.response["error"]["message"].as_str().unwrap();
    assert!(msg.contains("server t") && msg.contains("did not answer"), "{msg}");
    // The upstream was told to cancel: nothing stays in flight there.
    wait_in_flight(&client, "t", 0).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_is_forwarded_with_the_mapped_id() {
    let gw = gateway().demo("k", &[], "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    let call = {
        let client = client.clone();
        tokio::spawn(async move {
            client.request(json!("req-7"), "tools/call", json!({"name": "k__sleep", "arguments": {"ms": 30000}})).await
        })
    };
    wait_in_flight(&client, "k", 1).await;
    client.notify("notifications/cancelled", Some(json!({"requestId": "req-7", "reason": "user"}))).await;
    let a = tokio::time::timeout(Duration::from_secs(10), call).await.unwrap().unwrap();
    assert_eq!(a.response["error"]["code"], -32800, "{:?}", a.response);
    wait_in_flight(&client, "k", 0).await;
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_round_trip_reaches_only_its_caller_in_per_session_children() {
    let gw = gateway().demo("m", &[], "share: per_session").start().await;
    let mut tasks = Vec::new();
    for who in ["alice", "bob"] {
        let url = gw.mcp();
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&url).await;
            let ans = client
                .request_with(json!(1), "tools/call", json!({"name": "m__sample", "arguments": {"prompt": who}}), move |req| {
                    assert_eq!(req["method"], "sampling/createMessage");
                    let prompt = req["params"]["messages"][0]["content"]["text"].as_str().unwrap();
                    assert_eq!(prompt, who, "a sampling request reached the wrong session");
                    json!({"role": "assistant", "content": {"type": "text", "text": format!("answer for {who}")}, "model": "test"})
                })
                .await;
            assert_eq!(ans.response["result"]["content"][0]["text"], format!("sampled: answer for {who}"));
            // Each session has its own child.
            let s: Value = serde_json::from_str(&client.call_text("m__stats", json!({})).await).unwrap();
            s["pid"].as_u64().unwrap()
        }));
    }
    let mut pids = Vec::new();
    for t in tasks {
        pids.push(t.await.unwrap());
    }
    assert_ne!(pids[0], pids[1]);
    gw.stop().await;
}

#[tokio::test]
async fn session_http_upstream_resumes_dropped_streams_and_survives_404() {
    let up = http_demo(&["--session-only"]).await;
    let gw = gateway().remote("s", &up.url, "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    assert_eq!(client.call_text("s__echo", json!({"text": "over a session"})).await, "over a session");
    let stats =
        |c: Client| async move { serde_json::from_str::<Value>(&c.call_text("s__stats", json!({})).await).unwrap() };
    assert_eq!(stats(client.clone()).await["sessions"], 1, "Portcullis holds one session upstream");

    // The server closes the response stream after a priming event; Portcullis resumes it with
    // GET + Last-Event-ID after `retry` and the result arrives.
    assert_eq!(client.call_text("s__drop_stream", json!({"ms": 100})).await, "resumed");
    assert_eq!(stats(client.clone()).await["resumes"], 1);

    // The server forgets its sessions: the next call meets 404, Portcullis re-initializes and
    // sends it again, so the caller sees only the answer.
    assert_eq!(client.call_text("s__forget_sessions", json!({})).await, "forgotten");
    assert_eq!(client.call_text("s__echo", json!({"text": "after 404"})).await, "after 404");
    assert_eq!(stats(client.clone()).await["sessions"], 1);
    gw.stop().await;
}

#[tokio::test]
async fn a_modern_disconnect_cancels_upstream_and_a_session_disconnect_does_not() {
    let gw = gateway().demo("d", &[], "").start().await;
    let legacy = Client::connect(&gw.mcp()).await;
    let modern = Client::modern(&gw.mcp());
    let watcher = Client::connect(&gw.mcp()).await;

    let long = |c: Client| tokio::spawn(async move { c.call("d__sleep", json!({"ms": 60_000})).await });
    let first = long(legacy);
    wait_in_flight(&watcher, "d", 1).await;
    first.abort(); // the 2025-era client goes away: its call keeps running upstream
    let second = long(modern);
    wait_in_flight(&watcher, "d", 2).await;
    second.abort(); // the 2026-07-28 client closes its request: that is a cancellation
    wait_in_flight(&watcher, "d", 1).await;
    gw.stop().await;
}

/// A remote server whose JSON answer to a call is not a JSON-RPC response (`{"ok":true}`), or
/// that refuses with a page that is not JSON-RPC: the call fails at once with a clear error
/// (it used to wait out its five-minute deadline, the body matching no request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_answer_that_answers_nothing_fails_the_call_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/mcp", listener.local_addr().unwrap());
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(|body: String| async move {
            let msg: Value = serde_json::from_str(&body).unwrap_or_default();
            let id = msg["id"].clone();
            let json = |v: Value| {
                let mut r = axum::response::IntoResponse::into_response(v.to_string());
                r.headers_mut().insert("content-type", "application/json".parse().unwrap());
                r.headers_mut().insert("mcp-session-id", "s1".parse().unwrap());
                r
            };
            match msg["method"].as_str().unwrap_or_default() {
                "initialize" => json(json!({"jsonrpc": "2.0", "id": id, "result": {
                    "protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                    "serverInfo": {"name": "odd", "version": "1"}}})),
                "tools/list" => json(json!({"jsonrpc": "2.0", "id": id, "result": {"tools": [
                    {"name": "nothing", "inputSchema": {"type": "object"}},
                    {"name": "refused", "inputSchema": {"type": "object"}}]}})),
                "tools/call" if msg["params"]["name"] == "nothing" => json(json!({"ok": true})),
                "tools/call" => {
                    let mut r = axum::response::IntoResponse::into_response("<html>denied</html>");
                    *r.status_mut() = axum::http::StatusCode::FORBIDDEN;
                    r
                }
                _ => axum::response::IntoResponse::into_response(axum::http::StatusCode::ACCEPTED),
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let gw = gateway().remote("odd", &url, "transport: streamable_http").start().await;
    let client = Client::connect(&gw.mcp()).await;
    for (tool, says) in [("odd__nothing", "does not answer"), ("odd__refused", "403")] {
        let a = tokio::time::timeout(Duration::from_secs(10), client.call(tool, json!({})))
            .await
            .expect("the call waited for an answer that was never coming");
        let e = a.response["error"]["message"].as_str().unwrap_or_default().to_owned();
        assert!(e.contains(says), "{tool}: {}", a.response);
    }
    gw.stop().await;
}
