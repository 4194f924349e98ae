//! Authentication and authorization: the answers table on every endpoint and era, grants on
//! lists and calls, tenants, sessions bound to identities, revocation and expiry closing
//! streams, rate limits, the failure throttle, trusted proxies, and the audit trail.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

const ALICE: &str = "alice-secret-0123456789abcdef";
const BOB: &str = "bob-secret-0123456789abcdef00";
const OLD: &str = "old-secret-0123456789abcdef00";
const ACME: &str = "acme-secret-0123456789abcdef0";

const TOP: &str = r#"
auth:
  tokens:
    alice: "${ALICE}"
    bob:
      token: "${BOB}"
      servers: [a]
      tools: ["a__*", "!a__crash"]
      prompts: ["!a__*"]
      resources: ["a__demo://items/*"]
    old:
      token: "${OLD}"
      expires: "2020-01-01T00:00:00Z"
    acme:
      token: "${ACME}"
      tenant: acme
tenants:
  acme:
    namespaces:
      prod: [b]
"#;

/// Headers sent, status expected, challenge expected (a substring).
type Case<'a> = (Vec<(&'a str, &'a str)>, u16, &'a str);

async fn two_servers() -> TestGateway {
    two_servers_with(TOP).await
}

async fn two_servers_with(top: &str) -> TestGateway {
    gateway()
        .demo("a", &[], "")
        .demo("b", &[], "")
        .top(top)
        .env("ALICE", ALICE)
        .env("BOB", BOB)
        .env("OLD", OLD)
        .env("ACME", ACME)
        .start()
        .await
}

fn initialize_body() -> Value {
    json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}})
}

fn modern_body() -> Value {
    json!({"jsonrpc":"2.0","id":1,"method":"tools/list","params":{"_meta":{
        "io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}})
}

/// Posts a body with raw headers; returns status, WWW-Authenticate and the JSON body.
async fn post(url: &str, headers: &[(&str, &str)], body: &Value, modern: bool) -> (u16, String, Value) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream");
    if modern {
        req = req.header("mcp-protocol-version", "2026-07-28").header("mcp-method", "tools/list");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.body(body.to_string()).send().await.unwrap();
    let status = resp.status().as_u16();
    let challenge = resp.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let text = resp.text().await.unwrap();
    (status, challenge, serde_json::from_str(&text).unwrap_or(json!({"raw": text})))
}

#[tokio::test]
async fn every_row_of_the_answers_table_in_both_eras() {
    // Many refusals from one address: keep the failure throttle (tested below) out of the way.
    let gw = two_servers_with(&TOP.replace("auth:\n", "auth:\n  max_failures_per_minute: 1000\n")).await;
    let near_miss = format!("{}X", &ALICE[..ALICE.len() - 1]);
    let basic = format!("Basic {}", "dXNlcjpwYXNz");
    let bearer = |t: &str| format!("Bearer {t}");
    let (alice, near, old) = (bearer(ALICE), bearer(&near_miss), bearer(OLD));
    let missing_body = json!({"error":"unauthorized","message":"Missing bearer token"});
    let invalid_body = json!({"error":"invalid_token","message":"Invalid token"});
    for modern in [false, true] {
        let body = if modern { modern_body() } else { initialize_body() };
        let url = gw.mcp();
        let cases: Vec<Case> = vec![
            (vec![], 401, r#"Bearer realm="portcullis""#),
            (vec![("authorization", basic.as_str())], 401, r#"Bearer realm="portcullis""#),
            (vec![("authorization", "Bearer ")], 401, r#"Bearer realm="portcullis""#),
            (vec![("x-api-key", "")], 401, r#"Bearer realm="portcullis""#),
            (
                vec![("authorization", "Bearer nope-not-a-token")],
                401,
                r#"Bearer realm="portcullis", error="invalid_token""#,
            ),
            (vec![("authorization", near.as_str())], 401, r#"Bearer realm="portcullis", error="invalid_token""#),
            (vec![("authorization", old.as_str())], 401, r#"Bearer realm="portcullis", error="invalid_token""#),
            (vec![("authorization", alice.as_str()), ("x-api-key", ALICE)], 400, "error=\"invalid_request\""),
            (
                vec![("authorization", alice.as_str()), ("authorization", alice.as_str())],
                400,
                "error=\"invalid_request\"",
            ),
            (vec![("authorization", alice.as_str())], 200, ""),
            (vec![("authorization", "bearer alice-secret-0123456789abcdef")], 200, ""),
            (vec![("x-api-key", ALICE)], 200, ""),
        ];
        for (headers, status, challenge) in cases {
            let (s, c, b) = post(&url, &headers, &body, modern).await;
            assert_eq!(s, status, "{headers:?} modern={modern}: {b}");
            assert!(c.contains(challenge), "{headers:?}: challenge {c:?}");
            match status {
                401 if challenge.contains("invalid_token") => assert_eq!(b, invalid_body),
                401 => assert_eq!(b, missing_body),
                400 => assert_eq!(b["error"], "invalid_request"),
                _ => {}
            }
        }
        // The query string is never read for credentials.
        for q in ["token", "access_token", "api_key"] {
            let (s, _, _) = post(&format!("{url}?{q}={ALICE}"), &[], &body, modern).await;
            assert_eq!(s, 401, "?{q}=");
        }
        // A server not granted, and another tenant's server: 403 insufficient_scope.
        for (token, server) in [(BOB, "b"), (ACME, "a")] {
            let (s, c, b) = post(&gw.server(server), &[("authorization", &bearer(token))], &body, modern).await;
            assert_eq!(s, 403, "{server}: {b}");
            assert!(c.contains("error=\"insufficient_scope\""), "{c}");
            assert_eq!(b["error"], "forbidden");
        }
    }
    // GET streams and DELETE are authenticated too.
    let client = Client::connect_as(&gw.mcp(), ALICE).await;
    let mut bare = client.clone();
    bare.headers.clear();
    let get = bare
        .http
        .get(gw.mcp())
        .header("accept", "text/event-stream")
        .header("mcp-session-id", client.session.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 401);
    let del =
        bare.http.delete(gw.mcp()).header("mcp-session-id", client.session.clone().unwrap()).send().await.unwrap();
    assert_eq!(del.status(), 401);
    // /health stays open.
    assert_eq!(reqwest::get(format!("{}/health", gw.url)).await.unwrap().status(), 200);
    gw.stop().await;
}

#[tokio::test]
async fn grants_filter_lists_and_refuse_calls_like_unknown_names() {
    let gw = two_servers().await;
    let bob = Client::connect_as(&gw.mcp(), BOB).await;
    let tools = bob.all_tools().await;
    assert!(tools.contains(&"a__echo".to_owned()), "{tools:?}");
    assert!(!tools.contains(&"a__crash".to_owned()), "denied tool listed: {tools:?}");
    assert!(!tools.iter().any(|t| t.starts_with("b__")), "server b listed: {tools:?}");
    assert_eq!(bob.call_text("a__echo", json!({"text": "ok"})).await, "ok");
    let unknown = bob.call("a__nonexistent", json!({})).await.response["error"].clone();
    let denied = bob.call("a__crash", json!({})).await.response["error"].clone();
    assert_eq!(denied["code"], unknown["code"]);
    assert_eq!(denied["message"], "Unknown tool: a__crash");
    assert_eq!(bob.call("b__echo", json!({"text": "x"})).await.response["error"]["code"], -32602);
    let prompts = bob.request(json!(2), "prompts/list", json!({})).await;
    assert_eq!(prompts.response["result"]["prompts"], json!([]));
    let prompt = bob.request(json!(3), "prompts/get", json!({"name": "a__greet"})).await;
    assert_eq!(prompt.response["error"]["code"], -32602);
    let resources = bob.request(json!(4), "resources/list", json!({})).await;
    assert_eq!(resources.response["result"]["resources"], json!([]), "demo://info is not granted");
    let item = bob.request(json!(5), "resources/read", json!({"uri": "demo://items/3"})).await;
    assert_eq!(item.response["result"]["contents"][0]["text"], "item 3", "{:?}", item.response);
    let info = bob.request(json!(6), "resources/read", json!({"uri": "demo://info"})).await;
    assert_eq!(info.response["error"]["code"], -32002);

    // The same grants on the server's own endpoint, with its own names.
    let own = Client::connect_as(&gw.server("a"), BOB).await;
    let names = own.all_tools().await;
    assert!(names.contains(&"echo".to_owned()) && !names.contains(&"crash".to_owned()), "{names:?}");
    assert_eq!(own.call("crash", json!({})).await.response["error"]["message"], "Unknown tool: crash");

    // A tenant's token sees only its namespaces' servers.
    let acme = Client::connect_as(&gw.mcp(), ACME).await;
    let acme_tools = acme.all_tools().await;
    assert!(!acme_tools.is_empty() && acme_tools.iter().all(|t| t.starts_with("b__")), "{acme_tools:?}");

    // Refusals are audited with who, what and why.
    let records = gw.audit_until(|r| r.iter().any(|r| r["name"] == "crash" && r["identity"] == "bob")).await;
    let refused = records.iter().find(|r| r["name"] == "crash" && r["identity"] == "bob").unwrap();
    assert_eq!(refused["outcome"], "refused: tool not granted");
    assert_eq!(refused["server"], "a");
    gw.stop().await;
}

#[tokio::test]
async fn batch_elements_are_authorized_one_by_one() {
    let gw = two_servers().await;
    let mut bob = Client::new(&gw.mcp()).bearer(BOB);
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let resp = bob.post(init).await;
    bob.session = resp.headers().get("mcp-session-id").map(|v| v.to_str().unwrap().to_owned());
    bob.version = "2025-03-26".into();
    let batch = json!([
        {"jsonrpc":"2.0","id":"ok","method":"tools/call","params":{"name":"a__echo","arguments":{"text":"fine"}}},
        {"jsonrpc":"2.0","id":"no","method":"tools/call","params":{"name":"a__crash","arguments":{}}}
    ]);
    let answers: Vec<Value> = serde_json::from_str(&bob.post(batch).await.text().await.unwrap()).unwrap();
    let by_id = |id: &str| answers.iter().find(|a| a["id"] == id).cloned().unwrap();
    assert_eq!(by_id("ok")["result"]["content"][0]["text"], "fine");
    assert_eq!(by_id("no")["error"]["code"], -32602);
    let records = gw
        .audit_until(|r| r.iter().filter(|r| r["request_id"] == "\"no\"" || r["request_id"] == "\"ok\"").count() == 2)
        .await;
    assert!(
        records.iter().any(|r| r["request_id"] == "\"no\"" && r["outcome"] == "refused: tool not granted"),
        "{records:?}"
    );
    assert!(records.iter().any(|r| r["request_id"] == "\"ok\"" && r["outcome"] == "allowed"), "{records:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_session_belongs_to_the_identity_that_made_it() {
    let gw = two_servers().await;
    let alice = Client::connect_as(&gw.mcp(), ALICE).await;
    let mut thief = alice.clone();
    thief.headers = vec![("authorization".into(), format!("Bearer {BOB}"))];
    assert_eq!(thief.post(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})).await.status(), 404);
    let get = thief
        .http
        .get(gw.mcp())
        .header("authorization", format!("Bearer {BOB}"))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", alice.session.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 404);
    let del = thief
        .http
        .delete(gw.mcp())
        .header("authorization", format!("Bearer {BOB}"))
        .header("mcp-session-id", alice.session.clone().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(del.status(), 404);
    // The owner carries on.
    assert_eq!(alice.call_text("a__echo", json!({"text": "still mine"})).await, "still mine");
    gw.stop().await;
}

#[tokio::test]
async fn streams_close_when_a_token_is_removed_or_expires() {
    let soon = humantime::format_rfc3339_seconds(std::time::SystemTime::now() + Duration::from_secs(2)).to_string();
    let top = TOP.replace(
        "\ntenants:",
        &format!("\n    brief:\n      token: brief-secret-0123456789abcd\n      expires: \"{soon}\"\ntenants:"),
    );
    let mut gw = gateway()
        .demo("a", &[], "")
        .demo("b", &[], "")
        .top(&top)
        .env("ALICE", ALICE)
        .env("BOB", BOB)
        .env("OLD", OLD)
        .env("ACME", ACME)
        .start()
        .await;

    // Expiry: the stream of a token that expires ends by itself.
    let brief = Client::connect_as(&gw.mcp(), "brief-secret-0123456789abcd").await;
    let mut brief_stream = brief.get_stream().await;
    let ended = tokio::time::timeout(Duration::from_secs(6), brief_stream.ended()).await;
    assert!(ended.is_ok(), "the expired token's stream is still open");
    assert_eq!(brief.post(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})).await.status(), 401);

    // Revocation by reload: alice's stream ends within a second; bob's carries on.
    let alice = Client::connect_as(&gw.mcp(), ALICE).await;
    let bob = Client::connect_as(&gw.mcp(), BOB).await;
    let mut alice_stream = alice.get_stream().await;
    let mut bob_stream = bob.get_stream().await;
    let without_alice = TOP.replace("    alice: \"${ALICE}\"\n", "");
    let sessions = gw.gateway().session_count();
    gw.reload_top(&without_alice).await;
    // The reload's own sweep ended alice's session before the reload returned.
    assert_eq!(gw.gateway().session_count(), sessions - 1);
    tokio::time::timeout(Duration::from_secs(2), alice_stream.ended()).await.expect("alice's stream stayed open");
    assert_eq!(alice.post(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})).await.status(), 401);
    assert_eq!(bob.call_text("a__echo", json!({"text": "bob stays"})).await, "bob stays");
    assert!(tokio::time::timeout(Duration::from_millis(300), bob_stream.ended()).await.is_err());
    gw.stop().await;
}

#[tokio::test]
async fn rate_limits_per_identity_and_per_address() {
    let top = r#"
auth:
  tokens:
    slow: {token: slow-secret-0123456789abcdef, rate: 3/min}
    fast: fast-secret-0123456789abcdef0
"#;
    let gw = gateway().demo("a", &[], "").top(top).start().await;
    let body = initialize_body();
    for _ in 0..3 {
        let (s, _, _) =
            post(&gw.mcp(), &[("authorization", "Bearer slow-secret-0123456789abcdef")], &body, false).await;
        assert_eq!(s, 200);
    }
    let resp = reqwest::Client::new()
        .post(gw.mcp())
        .header("authorization", "Bearer slow-secret-0123456789abcdef")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    // Another identity is not affected.
    let (s, _, _) = post(&gw.mcp(), &[("authorization", "Bearer fast-secret-0123456789abcdef0")], &body, false).await;
    assert_eq!(s, 200);
    gw.stop().await;

    // Per address, with no credentials at all (loopback): the address is limited.
    let gw = gateway().demo("a", &[], "").top("rate_limit:\n  per_address: 2/min\n").start().await;
    for expected in [200, 200, 429] {
        assert_eq!(post(&gw.mcp(), &[], &body, false).await.0, expected);
    }
    gw.stop().await;
}

#[tokio::test]
async fn failure_throttle_spares_a_valid_token_and_trusted_proxies_name_the_client() {
    let top = r#"
auth:
  max_failures_per_minute: 3
  tokens:
    alice: alice-secret-0123456789abcdef
"#;
    let gw = gateway().demo("a", &[], "").top(top).start().await;
    let body = initialize_body();
    let bad = [("authorization", "Bearer wrong-wrong-wrong")];
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..5 {
            v.push(post(&gw.mcp(), &bad, &body, false).await.0);
        }
        v
    };
    assert_eq!(statuses, [401, 401, 401, 429, 429]);
    // A valid credential from the throttled address still works.
    assert_eq!(
        post(&gw.mcp(), &[("authorization", "Bearer alice-secret-0123456789abcdef")], &body, false).await.0,
        200
    );
    gw.stop().await;

    // Behind a trusted proxy, X-Forwarded-For names the client; otherwise it is ignored.
    let limited = "rate_limit:\n  per_address: 2/min\n";
    let gw = gateway().demo("a", &[], "").top(&format!("{limited}trusted_proxies: [127.0.0.1]\n")).start().await;
    let from = |ip: &'static str| [("x-forwarded-for", ip)];
    assert_eq!(post(&gw.mcp(), &from("10.0.0.1"), &body, false).await.0, 200);
    assert_eq!(post(&gw.mcp(), &from("10.0.0.1"), &body, false).await.0, 200);
    assert_eq!(post(&gw.mcp(), &from("10.0.0.1"), &body, false).await.0, 429);
    assert_eq!(post(&gw.mcp(), &from("10.0.0.2"), &body, false).await.0, 200);
    gw.audit_until(|r| r.iter().any(|r| r["client"] == "10.0.0.2")).await;
    gw.stop().await;
    let gw = gateway().demo("a", &[], "").top(limited).start().await;
    assert_eq!(post(&gw.mcp(), &from("10.0.0.1"), &body, false).await.0, 200);
    assert_eq!(post(&gw.mcp(), &from("10.0.0.2"), &body, false).await.0, 200);
    assert_eq!(
        post(&gw.mcp(), &from("10.0.0.3"), &body, false).await.0,
        429,
        "X-Forwarded-For from an untrusted peer was believed"
    );
    gw.stop().await;
}

#[tokio::test]
async fn environment_tokens_are_admins_named_env() {
    let gw = gateway()
        .demo("a", &[], "")
        .env("PORTCULLIS_TOKEN", "env-secret-0123456789abcdef00")
        .env("PORTCULLIS_TOKENS", "second-secret-0123456789abcd, third-secret-0123456789abcde")
        .start()
        .await;
    for t in ["env-secret-0123456789abcdef00", "second-secret-0123456789abcd", "third-secret-0123456789abcde"] {
        let c = Client::connect_as(&gw.mcp(), t).await;
        assert_eq!(c.call_text("a__echo", json!({"text": "hi"})).await, "hi");
    }
    assert_eq!(post(&gw.mcp(), &[], &initialize_body(), false).await.0, 401);
    gw.audit_until(|r| {
        let names: std::collections::BTreeSet<&str> = r.iter().filter_map(|r| r["identity"].as_str()).collect();
        names.contains("env") && names.contains("env-2") && names.contains("env-3")
    })
    .await;
    gw.stop().await;
}
