//! Aggregation across stdio and HTTP upstreams, per-server endpoints, pagination.

use std::collections::HashSet;

use serde_json::json;

use crate::support::{Client, gateway, http_demo};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_list_and_call_across_stdio_and_http() {
    let remote = http_demo(&["--name", "c"]).await;
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").remote("c", &remote.url, "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    let tools = client.all_tools().await;
    for server in ["a", "b", "c"] {
        for tool in ["echo", "add", "progress"] {
            assert!(tools.contains(&format!("{server}__{tool}")), "{server}__{tool} missing from {tools:?}");
        }
    }
    assert_eq!(client.call_text("a__echo", json!({"text": "from a"})).await, "from a");
    assert_eq!(client.call_text("c__add", json!({"a": 2, "b": 40})).await, "42");
    let unknown = client.call("zz__echo", json!({})).await;
    assert_eq!(unknown.response["error"]["code"], -32602);

    // One server, unchanged: no prefixes, original names.
    let one = Client::connect(&gw.server("c")).await;
    let names = one.all_tools().await;
    assert!(names.contains(&"echo".to_owned()) && !names.iter().any(|n| n.contains("__")), "{names:?}");
    assert_eq!(one.call_text("echo", json!({"text": "direct"})).await, "direct");

    // Prompts and resources route by name and URI.
    let p = client.request(json!(3), "prompts/get", json!({"name": "b__greet", "arguments": {"name": "Ada"}})).await;
    assert_eq!(p.response["result"]["messages"][0]["content"]["text"], "Hello, Ada!", "{:?}", p.response);
    let r = client.request(json!(4), "resources/read", json!({"uri": "demo://items/7"})).await;
    assert_eq!(r.response["result"]["contents"][0]["text"], "item 7");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_lists_every_tool_exactly_once() {
    let gw = gateway().demo("p", &["--page-size", "2"], "").demo("q", &["--page-size", "3"], "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    let tools = client.all_tools().await;
    let unique: HashSet<&String> = tools.iter().collect();
    assert_eq!(unique.len(), tools.len(), "duplicates in {tools:?}");
    assert_eq!(tools.len(), 24, "{tools:?}");

    // A tampered cursor is refused with -32602.
    let first = client.request(json!(1), "tools/list", json!({})).await;
    let cursor = first.response["result"]["nextCursor"].as_str().unwrap().to_owned();
    let mut bad = cursor.clone().into_bytes();
    bad[3] = if bad[3] == b'A' { b'B' } else { b'A' };
    let r = client.request(json!(2), "tools/list", json!({"cursor": String::from_utf8(bad).unwrap()})).await;
    assert_eq!(r.response["error"]["code"], -32602, "{:?}", r.response);
    gw.stop().await;
}
