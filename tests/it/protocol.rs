//! The downstream protocol table (docs/protocol.md): every malformed input gets a 4xx with a
//! JSON-RPC error, never a 5xx; both eras on one endpoint.

use proptest::prelude::*;
use serde_json::{Value, json};

use crate::support::{Client, Events, TestGateway, gateway, post_as};

async fn raw(gw: &TestGateway, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(gw.mcp());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.body(body.to_owned()).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_precise_4xx_answers() {
    let gw = gateway().demo("d", &[], "").start().await;
    let session = Client::connect(&gw.mcp()).await;
    let sid = session.session.clone().unwrap();
    let list = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;

    let (s, b) = raw(&gw, &[JSON], "{not json").await;
    assert_eq!((s, b["error"]["code"].clone()), (400, json!(-32700)));
    let (s, b) = raw(&gw, &[JSON], r#"{"id":1,"method":"x"}"#).await;
    assert_eq!((s, b["error"]["code"].clone()), (400, json!(-32600)));
    let (s, b) = raw(&gw, &[JSON], list).await;
    assert_eq!((s, b["error"]["code"].clone()), (400, json!(-32600)), "missing session");
    let (s, _) = raw(&gw, &[JSON, ("mcp-session-id", "nope")], list).await;
    assert_eq!(s, 404, "unknown session");
    let (s, b) = raw(&gw, &[JSON, ("mcp-session-id", &sid)], &format!("[{list}]")).await;
    assert_eq!((s, b["error"]["code"].clone()), (400, json!(-32600)), "batch outside 2025-03-26");
    let (s, _) = raw(&gw, &[JSON, ("mcp-session-id", &sid), ("mcp-protocol-version", "1999-01-01")], list).await;
    assert_eq!(s, 400, "unsupported version header");
    let (s, b) = raw(&gw, &[JSON, ("origin", "http://evil.example.com")], list).await;
    assert_eq!((s, b["error"]["code"].clone()), (403, json!(-32600)));
    let (s, _) = raw(&gw, &[JSON, ("host", "evil.example.com")], list).await;
    assert_eq!(s, 403, "DNS rebinding: foreign Host on a loopback listener");
    let big =
        format!(r#"{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":"{}"}}}}"#, "a".repeat(5 * 1024 * 1024));
    let (s, _) = raw(&gw, &[JSON, ("mcp-session-id", &sid)], &big).await;
    assert_eq!(s, 413);
    let (s, _) = raw(&gw, &[("content-type", "text/plain"), ("mcp-session-id", &sid)], list).await;
    assert_eq!(s, 415);
    let (s, _) =
        raw(&gw, &[JSON, ("mcp-session-id", &sid)], r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).await;
    assert_eq!(s, 202);
    let unknown = session.request(json!(5), "no/such", json!({})).await;
    assert_eq!(unknown.response["error"]["code"], -32601);

    // DELETE ends the session; its id then answers 404.
    let del = reqwest::Client::new().delete(gw.mcp()).header("mcp-session-id", &sid).send().await.unwrap();
    assert_eq!(del.status(), 204);
    let (s, _) = raw(&gw, &[JSON, ("mcp-session-id", &sid)], list).await;
    assert_eq!(s, 404);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_work_only_in_2025_03_26_sessions() {
    let gw = gateway().demo("d", &[], "").start().await;
    let old = Client::connect_version(&gw.mcp(), "2025-03-26").await;
    assert_eq!(old.version, "2025-03-26");
    let sid = old.session.clone().unwrap();
    let batch = r#"[{"jsonrpc":"2.0","id":1,"method":"ping"},{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"d__echo","arguments":{"text":"b"}}},{"jsonrpc":"2.0","method":"notifications/initialized"},{"jsonrpc":"2.0","id":3,"method":"initialize","params":{}}]"#;
    let (s, b) = raw(&gw, &[JSON, ("mcp-session-id", &sid)], batch).await;
    assert_eq!(s, 200);
    let answers = b.as_array().unwrap();
    assert_eq!(answers.len(), 3);
    assert_eq!(answers[1]["result"]["content"][0]["text"], "b");
    assert_eq!(answers[2]["error"]["code"], -32600, "initialize may not be batched");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modern_era_is_stateless_and_validates_headers_against_the_body() {
    let gw = gateway().demo("d", &[], "").start().await;
    let modern = Client::modern(&gw.mcp());
    let d = modern.request(json!(1), "server/discover", json!({})).await;
    assert_eq!(d.status, 200);
    assert_eq!(d.response["result"]["supportedVersions"], json!(["2026-07-28"]));
    let a = modern.request(json!(2), "tools/call", json!({"name": "d__add", "arguments": {"a": 1, "b": 2}})).await;
    assert_eq!(a.response["result"]["content"][0]["text"], "3");
    assert_eq!(gw.gateway().session_count(), 0, "a modern request minted a session");

    let meta = json!({"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}});
    let body =
        json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"d__echo","arguments":{},"_meta":meta}})
            .to_string();
    let v = ("mcp-protocol-version", "2026-07-28");
    let (s, b) = raw(&gw, &[JSON, v, ("mcp-method", "tools/call"), ("mcp-name", "d__add")], &body).await;
    assert_eq!((s, b["error"]["code"].clone()), (400, json!(-32020)), "Mcp-Name mismatch");
    let (s, b) = raw(&gw, &[JSON, v, ("mcp-method", "tools/list"), ("mcp-name", "d__echo")], &body).await;
    assert_eq!((s, b["error"]["code"].clone()), (400, json!(-32020)), "Mcp-Method mismatch");
    let old_meta = body.replace("\"2026-07-28\"", "\"2030-01-01\"");
    let (s, b) = raw(
        &gw,
        &[JSON, ("mcp-protocol-version", "2030-01-01"), ("mcp-method", "tools/call"), ("mcp-name", "d__echo")],
        &old_meta,
    )
    .await;
    assert_eq!(s, 400, "{b}");
    let no_meta = json!({"jsonrpc":"2.0","id":4,"method":"tools/list","params":{}}).to_string();
    let (s, b) = raw(&gw, &[JSON, v, ("mcp-method", "tools/list")], &no_meta).await;
    assert_eq!((s, b["error"]["code"].clone()), (400, json!(-32602)));
    let resp = json!({"jsonrpc":"2.0","id":4,"result":{}}).to_string();
    let (s, _) = raw(&gw, &[JSON, v], &resp).await;
    assert_eq!(s, 400, "modern clients may not POST responses");
    let get = reqwest::Client::new().get(gw.mcp()).header("mcp-protocol-version", "2026-07-28").send().await.unwrap();
    assert_eq!(get.status(), 405);
    gw.stop().await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn random_input_never_gets_a_5xx(
        body in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            Just(r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"d__echo"}}"#.to_owned()),
            "[a-z{}\\[\\]\":,0-9 ]{0,80}",
            Just(r#"{"jsonrpc":"2.0","id":{"x":1},"method":"a"}"#.to_owned()),
            Just(r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#.to_owned()),
        ],
        version in prop_oneof![Just(None), Just(Some("2026-07-28")), Just(Some("2025-06-18")), Just(Some("zzz"))],
        session in any::<bool>(),
        method in prop_oneof![Just("POST"), Just("GET"), Just("DELETE"), Just("PUT")],
        ctype in prop_oneof![Just("application/json"), Just("text/plain"), Just("")],
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let gw = fuzz_gateway().await;
            let mut req = reqwest::Client::new().request(method.parse().unwrap(), gw.mcp());
            if !ctype.is_empty() { req = req.header("content-type", ctype); }
            if let Some(v) = version { req = req.header("mcp-protocol-version", v); }
            if session { req = req.header("mcp-session-id", "x"); }
            let resp = req.body(body.clone()).send().await.unwrap();
            prop_assert!(resp.status().as_u16() < 500, "{} for {body:?}", resp.status());
            Ok(())
        })?;
    }
}

async fn fuzz_gateway() -> &'static TestGateway {
    use tokio::sync::OnceCell;
    static GW: OnceCell<TestGateway> = OnceCell::const_new();
    GW.get_or_init(|| async {
        // Its own runtime thread, so it outlives each proptest case's runtime.
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            rt.block_on(async {
                let gw = gateway().demo("d", &[], "").start().await;
                let url = gw.url.clone();
                let _ = tx.send(url);
                std::future::pending::<()>().await;
                drop(gw);
            });
        });
        let url = rx.await.unwrap();
        TestGateway::detached(url)
    })
    .await
}

/// A raw legacy SSE client: the stream and the POST endpoint it named.
pub(crate) async fn open_sse(url: &str, token: Option<&str>) -> (Events, String) {
    let mut req = reqwest::Client::new().get(url).header("accept", "text/event-stream");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = Events::from_response(resp);
    let endpoint = events.next_event().await;
    assert_eq!(endpoint.0.as_deref(), Some("endpoint"));
    (events, endpoint.1)
}

#[tokio::test]
async fn legacy_sse_sessions_are_private_single_message_and_end_with_their_stream() {
    let token = "sse-owner-0123456789abcdef0";
    let other = "sse-other-0123456789abcdef0";
    let gw = gateway().demo("d", &[], "").env("PORTCULLIS_TOKENS", &format!("{token},{other}")).start().await;
    let (mut events, endpoint) = open_sse(&format!("{}/sse", gw.url), Some(token)).await;
    assert!(endpoint.starts_with("/messages/?session_id="), "{endpoint}");
    let post = async |body: Value, t: &str, path: &str| post_as(&format!("{}{path}", gw.url), t, &body).await;
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    assert_eq!(post(init, token, &endpoint).await.status(), 202);
    assert_eq!(events.next().await["result"]["protocolVersion"], "2024-11-05");
    // sessionId works as well as session_id.
    let camel = endpoint.replace("session_id", "sessionId");
    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"d__echo","arguments":{"text":"via sse"}}});
    assert_eq!(post(call.clone(), token, &camel).await.status(), 202);
    assert_eq!(events.next().await["result"]["content"][0]["text"], "via sse");
    // Another identity, an unknown id, an array, no credential.
    assert_eq!(post(call.clone(), other, &endpoint).await.status(), 404);
    assert_eq!(post(call.clone(), token, "/messages/?session_id=nope").await.status(), 404);
    let arr = post(json!([call.clone()]), token, &endpoint).await;
    assert_eq!(arr.status(), 400);
    let body: Value = serde_json::from_str(&arr.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["code"], -32600);
    let anon = reqwest::Client::new().get(format!("{}/sse", gw.url)).send().await.unwrap();
    assert_eq!(anon.status(), 401);

    // A call in flight when the stream closes is cancelled upstream.
    let watcher = Client::connect_as(&gw.mcp(), other).await;
    let sleep =
        json!({"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"d__sleep","arguments":{"ms":60000}}});
    assert_eq!(post(sleep, token, &endpoint).await.status(), 202);
    crate::upstream::wait_in_flight(&watcher, "d", 1).await;
    drop(events);
    crate::upstream::wait_in_flight(&watcher, "d", 0).await;
    assert_eq!(post(call, token, &endpoint).await.status(), 404, "the session outlived its stream");
    gw.stop().await;
}
