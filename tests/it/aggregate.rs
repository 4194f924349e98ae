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
    // Every demo server has the template demo://items/{id}: aggregate clients name one server's.
    let r = client.request(json!(4), "resources/read", json!({"uri": "portcullis://b/demo://items/7"})).await;
    assert_eq!(r.response["result"]["contents"][0]["text"], "item 7", "{:?}", r.response);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_lists_every_tool_exactly_once() {
    let gw = gateway().demo("p", &["--page-size", "2"], "").demo("q", &["--page-size", "3"], "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    let tools = client.all_tools().await;
    let unique: HashSet<&String> = tools.iter().collect();
    assert_eq!(unique.len(), tools.len(), "duplicates in {tools:?}");
    let per_server = Client::connect(&gw.server("p")).await.all_tools().await.len();
    assert!(per_server > 5);
    assert_eq!(tools.len(), 2 * per_server, "{tools:?}");

    // A tampered cursor is refused with -32602.
    let first = client.request(json!(1), "tools/list", json!({})).await;
    let cursor = first.response["result"]["nextCursor"].as_str().unwrap().to_owned();
    let mut bad = cursor.clone().into_bytes();
    bad[3] = if bad[3] == b'A' { b'B' } else { b'A' };
    let r = client.request(json!(2), "tools/list", json!({"cursor": String::from_utf8(bad).unwrap()})).await;
    assert_eq!(r.response["error"]["code"], -32602, "{:?}", r.response);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn colliding_uris_are_rewritten_everywhere_and_only_then() {
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    let list = client.request(json!(1), "resources/list", json!({})).await;
    let mut uris: Vec<&str> =
        list.response["result"]["resources"].as_array().unwrap().iter().map(|r| r["uri"].as_str().unwrap()).collect();
    uris.sort();
    assert_eq!(uris, ["portcullis://a/demo://info", "portcullis://b/demo://info"]);
    let templates = client.request(json!(2), "resources/templates/list", json!({})).await;
    let t = &templates.response["result"]["resourceTemplates"];
    assert!(t.as_array().unwrap().iter().any(|t| t["uriTemplate"] == "portcullis://a/demo://items/{id}"), "{t}");

    // Reads: the rewritten URI goes to its server under the server's own URI, and comes back shown.
    let read = client.request(json!(3), "resources/read", json!({"uri": "portcullis://b/demo://info"})).await;
    let content = &read.response["result"]["contents"][0];
    assert_eq!(
        (content["uri"].as_str(), content["text"].as_str()),
        (Some("portcullis://b/demo://info"), Some("b demo resource"))
    );
    let ambiguous = client.request(json!(4), "resources/read", json!({"uri": "demo://info"})).await;
    assert_eq!(ambiguous.response["error"]["code"], -32002, "{:?}", ambiguous.response);

    // Links and embedded resources in tool results.
    let link = client.call("a__link", json!({"uri": "demo://info"})).await;
    let items = &link.response["result"]["content"];
    assert_eq!(items[0]["uri"], "portcullis://a/demo://info");
    assert_eq!(items[1]["resource"]["uri"], "portcullis://a/demo://info");
    let other = client.call("a__link", json!({"uri": "demo://unique"})).await;
    assert_eq!(other.response["result"]["content"][0]["uri"], "demo://unique");

    // Subscriptions and updates.
    let mut events = client.get_stream().await;
    client.request(json!(5), "resources/subscribe", json!({"uri": "portcullis://a/demo://info"})).await;
    assert_eq!(client.call_text("b__touch", json!({"uri": "demo://info"})).await, "told 0");
    assert_eq!(client.call_text("a__touch", json!({"uri": "demo://info"})).await, "told 1");
    let updated = events.next_method("notifications/resources/updated").await;
    assert_eq!(updated["params"]["uri"], "portcullis://a/demo://info");

    // One server's own endpoint sees its own URIs.
    let one = Client::connect(&gw.server("a")).await;
    let own = one.request(json!(6), "resources/list", json!({})).await;
    assert_eq!(own.response["result"]["resources"][0]["uri"], "demo://info");
    let link = one.call("link", json!({"uri": "demo://info"})).await;
    assert_eq!(link.response["result"]["content"][0]["uri"], "demo://info");
    gw.stop().await;
}
