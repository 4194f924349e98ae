//! Clients and upstreams of different MCP eras through one gateway: server-to-client requests
//! against `InputRequiredResult`, `resources/subscribe` and the GET stream against
//! `subscriptions/listen`, `logging/setLevel` against per-request levels.

use serde_json::{Value, json};

use crate::support::*;

pub(crate) fn sampling_answer(req: &Value) -> Value {
    assert_eq!(req["method"], "sampling/createMessage");
    let prompt = req["params"]["messages"][0]["content"]["text"].as_str().unwrap();
    json!({"role":"assistant","content":{"type":"text","text":format!("answer to {prompt}")},"model":"m"})
}

#[tokio::test]
async fn session_client_answers_sampling_for_a_modern_upstream() {
    let up = http_demo(&[]).await;
    let gw = gateway().remote("m", &up.url, "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    let a = client
        .request_with(json!(7), "tools/call", json!({"name":"m__sample","arguments":{"prompt":"p1"}}), sampling_answer)
        .await;
    assert_eq!(a.response["result"]["content"][0]["text"], "sampled: answer to p1", "{:?}", a.response);
    // The client saw a sampling request, never an InputRequiredResult.
    assert!(a.related.iter().any(|m| m["method"] == "sampling/createMessage"));
    assert!(!a.response.to_string().contains("input_required"));
    gw.stop().await;
}

#[tokio::test]
async fn modern_client_gets_modern_results_from_a_session_upstream() {
    let gw = gateway().demo("d", &[], "").start().await;
    let client = Client::modern(&gw.mcp());
    let list = client.request(json!(1), "tools/list", json!({})).await;
    let r = &list.response["result"];
    assert_eq!(
        (r["resultType"].as_str(), r["ttlMs"].as_u64(), r["cacheScope"].as_str()),
        (Some("complete"), Some(0), Some("private"))
    );
    let call = client.call("d__echo", json!({"text":"hi"})).await;
    assert_eq!(call.response["result"]["resultType"], "complete");
    assert_eq!(call.response["result"]["content"][0]["text"], "hi");
    let read = client.request(json!(2), "resources/read", json!({"uri":"demo://info"})).await;
    assert_eq!(read.response["result"]["cacheScope"], "private", "{:?}", read.response);
    gw.stop().await;
}

#[tokio::test]
async fn session_subscription_on_a_modern_upstream_uses_listen() {
    let up = http_demo(&[]).await;
    let gw = gateway().remote("m", &up.url, "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    let mut events = client.get_stream().await;
    let sub = client.request(json!(2), "resources/subscribe", json!({"uri":"demo://info"})).await;
    assert_eq!(sub.response["result"], json!({}), "{:?}", sub.response);
    // The subscription rides the upstream's subscriptions/listen stream: the demo touches the
    // resource once that stream is there.
    assert_eq!(client.call_text("m__touch", json!({"uri":"demo://info", "until_told": 1})).await, "told 1");
    let updated = events.next_method("notifications/resources/updated").await;
    assert_eq!(updated["params"]["uri"], "demo://info");
    // Unsubscribing closes the upstream listen for that URI.
    client.request(json!(3), "resources/unsubscribe", json!({"uri":"demo://info"})).await;
    assert_eq!(client.call_text("m__touch", json!({"uri":"demo://info", "until_told": 0})).await, "told 0");
    gw.stop().await;
}

#[tokio::test]
async fn modern_listen_stream_gets_updates_and_list_changes() {
    let gw = gateway().demo("d", &[], "").start().await;
    let modern = Client::modern(&gw.mcp());
    let mut listen =
        modern.listen(json!("L1"), json!({"toolsListChanged": true, "resourceSubscriptions": ["demo://info"]})).await;
    let ack = listen.next().await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
    assert_eq!(ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "L1");
    assert_eq!(ack["params"]["notifications"]["resourceSubscriptions"], json!(["demo://info"]));
    assert!(ack["params"]["notifications"].get("promptsListChanged").is_none());

    // A session client on the same gateway sees list changes on its GET stream too.
    let legacy = Client::connect(&gw.mcp()).await;
    let mut get = legacy.get_stream().await;

    assert_eq!(modern.call_text("d__touch", json!({"uri":"demo://info"})).await, "told 1");
    let updated = listen.next_method("notifications/resources/updated").await;
    assert_eq!(updated["params"]["uri"], "demo://info");
    assert_eq!(updated["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "L1");

    // The server crashes and restarts: the visible tool set changed twice.
    let _ = modern.call("d__crash", json!({})).await;
    let changed = listen.next_method("notifications/tools/list_changed").await;
    assert_eq!(changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"], "L1");
    get.next_method("notifications/tools/list_changed").await;
    get.next_method("notifications/prompts/list_changed").await;
    gw.stop().await;
}

#[tokio::test]
async fn log_levels_are_per_session_on_a_shared_server() {
    let gw = gateway().demo("d", &[], "").start().await;
    let a = Client::connect(&gw.mcp()).await;
    let b = Client::connect(&gw.mcp()).await;
    let level = |c: &Client, l: &'static str| {
        let c = c.clone();
        async move { c.request(json!(5), "logging/setLevel", json!({"level": l})).await.response }
    };
    let logs = |answer: Answer| answer.related.into_iter().filter(|m| m["method"] == "notifications/message").count();
    let upstream_level = || async {
        let stats: Value = serde_json::from_str(&a.call_text("d__stats", json!({})).await).unwrap();
        stats["log_level"].clone()
    };

    assert_eq!(level(&a, "error").await["result"], json!({}));
    // B never chose a level, so the shared child keeps sending everything; Portcullis filters A.
    assert_eq!(upstream_level().await, "debug");
    assert_eq!(logs(a.call("d__log", json!({"level":"info"})).await), 0);
    assert_eq!(logs(a.call("d__log", json!({"level":"error"})).await), 1);
    assert_eq!(logs(b.call("d__log", json!({"level":"info"})).await), 1);

    assert_eq!(level(&b, "warning").await["result"], json!({}));
    assert_eq!(upstream_level().await, "warning");
    assert_eq!(logs(b.call("d__log", json!({"level":"info"})).await), 0);
    assert_eq!(logs(b.call("d__log", json!({"level":"warning"})).await), 1);
    assert_eq!(logs(a.call("d__log", json!({"level":"warning"})).await), 0);

    let bad = level(&a, "loud").await;
    assert_eq!(bad["error"]["code"], -32602);
    gw.stop().await;
}

#[tokio::test]
async fn modern_client_answers_sampling_for_a_session_upstream_by_retrying() {
    let gw = gateway().demo("d", &[], "").start().await;
    let client = Client::modern(&gw.mcp());
    let first = client.call("d__sample", json!({"prompt":"p2"})).await;
    let r = &first.response["result"];
    assert_eq!(r["resultType"], "input_required", "{:?}", first.response);
    let (key, ask) = r["inputRequests"].as_object().unwrap().iter().next().unwrap();
    assert_eq!(ask["method"], "sampling/createMessage");
    let state = r["requestState"].as_str().unwrap_or_else(|| panic!("{r}"));

    // A made-up state is refused; the real one resumes the parked call.
    let bogus = client
        .request(json!(2), "tools/call", json!({"name":"d__sample","arguments":{"prompt":"p2"},"requestState":"pcs-parked.nope","inputResponses":{}}))
        .await;
    assert_eq!(bogus.response["error"]["code"], -32602, "{:?}", bogus.response);
    let retry = client
        .request(
            json!(3),
            "tools/call",
            json!({"name":"d__sample","arguments":{"prompt":"p2"},"requestState":state,"inputResponses":{key: sampling_answer(ask)}}),
        )
        .await;
    assert_eq!(retry.response["result"]["content"][0]["text"], "sampled: answer to p2", "{:?}", retry.response);
    // The state is single-use.
    let again = client
        .request(
            json!(4),
            "tools/call",
            json!({"name":"d__sample","arguments":{},"requestState":state,"inputResponses":{}}),
        )
        .await;
    assert_eq!(again.response["error"]["code"], -32602);
    gw.stop().await;
}

#[tokio::test]
async fn mcp_param_headers_reach_a_modern_upstream() {
    let up = http_demo(&[]).await;
    let gw = gateway().remote("m", &up.url, "").start().await;
    let client = Client::modern(&gw.mcp());
    let body = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{
        "name":"m__echo","arguments":{"text":"x","region":"eu"},
        "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}});
    let resp = client.request_builder(&body).header("Mcp-Param-Region", "eu").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let stats: Value = serde_json::from_str(&client.call_text("m__stats", json!({})).await).unwrap();
    assert_eq!(stats["param_headers"], json!({"mcp-param-region": "eu"}));
    gw.stop().await;
}
