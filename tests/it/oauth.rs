//! Portcullis as an OAuth 2.1 resource server: access tokens from an identity provider, checked
//! against the keys it publishes; protected resource metadata; the challenges of every refusal.
//! The provider here is a small one on 127.0.0.1 that publishes OpenID discovery and a JWKS
//! whose keys the test rotates, and counts its fetches.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::*;

/// A signing key and its public JWK.
pub(crate) struct Key {
    kid: String,
    signing: EncodingKey,
    jwk: Value,
}

pub(crate) fn key(kid: &str) -> Key {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
    let p = pair.public_key().as_ref();
    let jwk =
        json!({"kty":"EC","crv":"P-256","x":b64(&p[1..33]),"y":b64(&p[33..65]),"kid":kid,"alg":"ES256","use":"sig"});
    Key { kid: kid.to_owned(), signing: EncodingKey::from_ec_der(pkcs8.as_ref()), jwk }
}

/// The identity provider: OpenID discovery, a JWKS and an introspection endpoint (one active
/// opaque token, `opaque-good-token`, for Portcullis' client `portcullis:s3cret`), on 127.0.0.1.
pub(crate) struct Provider {
    pub(crate) issuer: String,
    keys: Arc<Mutex<Vec<Value>>>,
    fetches: Arc<AtomicUsize>,
    introspections: Arc<AtomicUsize>,
    /// The `aud` its introspection answers name (the gateway's endpoint, once known).
    audience: Arc<Mutex<String>>,
    /// What its token endpoint signs with (`/token`, the client credentials grant: the scopes
    /// asked for, `a:all` when none): a key id and key, and whether the first token it gives
    /// has already expired.
    pub(crate) mint: Arc<Mutex<Option<(String, EncodingKey, bool)>>>,
    /// How many tokens `/token` gave.
    pub(crate) minted: Arc<AtomicUsize>,
    pub(crate) stop: tokio_util::sync::CancellationToken,
}

pub(crate) async fn provider(keys: &[&Key]) -> Provider {
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let set = Arc::new(Mutex::new(keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()));
    let fetches = Arc::new(AtomicUsize::new(0));
    let introspections = Arc::new(AtomicUsize::new(0));
    let (s, f, i) = (set.clone(), fetches.clone(), issuer.clone());
    let audience = Arc::new(Mutex::new(String::new()));
    let (n, iss, a) = (introspections.clone(), issuer.clone(), audience.clone());
    let mint: Arc<Mutex<Option<(String, EncodingKey, bool)>>> = Arc::new(Mutex::new(None));
    let minted = Arc::new(AtomicUsize::new(0));
    let (m, count, token_iss) = (mint.clone(), minted.clone(), issuer.clone());
    let app = axum::Router::new()
        .route(
            "/token",
            axum::routing::post(move |body: String| {
                let Some((kid, signing, expired_first)) = m.lock().unwrap().clone() else {
                    return std::future::ready((axum::http::StatusCode::BAD_REQUEST, String::new()));
                };
                let n = count.fetch_add(1, Ordering::SeqCst) + 1;
                let field = |name: &str| {
                    form_urlencoded::parse(body.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
                };
                let (resource, scope) = (field("resource").unwrap_or_default(), field("scope").unwrap_or("a:all".into()));
                let exp = if n == 1 && expired_first { now() - 600 } else { now() + 300 };
                let claims = json!({"iss": token_iss, "sub": "machine", "aud": resource, "exp": exp, "scope": scope, "jti": n});
                let mut h = Header::new(Algorithm::ES256);
                h.kid = Some(kid);
                let t = jsonwebtoken::encode(&h, &claims, &signing).unwrap();
                // It says an hour, whatever the token says: the server's refusal is what counts.
                let answer = json!({"access_token": t, "token_type": "Bearer", "expires_in": 3600}).to_string();
                std::future::ready((axum::http::StatusCode::OK, answer))
            }),
        )
        .route(
            "/introspect",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (n, iss, aud) = (n.clone(), iss.clone(), a.lock().unwrap().clone());
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    let basic = base64::engine::general_purpose::STANDARD.encode("portcullis:s3cret");
                    let authorized = headers.get("authorization").and_then(|v| v.to_str().ok())
                        == Some(format!("Basic {basic}").as_str());
                    if authorized && body.starts_with("token=opaque-good-token&") {
                        json!({"active": true, "iss": iss, "sub": "erin", "exp": now() + 300, "scope": "a:all", "aud": aud})
                            .to_string()
                    } else {
                        json!({"active": false}).to_string()
                    }
                }
            }),
        )
        .route(
            "/.well-known/openid-configuration",
            get(move || {
                let i = i.clone();
                async move { json!({"issuer": i, "jwks_uri": format!("{i}/jwks")}).to_string() }
            }),
        )
        .route(
            "/jwks",
            get(move || {
                let (s, f) = (s.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    json!({"keys": *s.lock().unwrap()}).to_string()
                }
            }),
        );
    let stop = tokio_util::sync::CancellationToken::new();
    let until = stop.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(until.cancelled_owned()).await;
    });
    Provider { issuer, keys: set, fetches, introspections, audience, mint, minted, stop }
}

pub(crate) fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// A token from `k` for `aud` with `scope`, valid for five minutes unless `claims` says else.
pub(crate) fn token(p: &Provider, k: &Key, sub: &str, aud: &str, scope: &str, extra: Value) -> String {
    let mut claims = json!({"iss": p.issuer, "sub": sub, "aud": aud, "exp": now() + 300, "iat": now(),
        "scope": scope, "email": format!("{sub}@example.com")});
    for (name, v) in extra.as_object().unwrap() {
        claims[name] = v.clone();
    }
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(k.kid.clone());
    jsonwebtoken::encode(&h, &claims, &k.signing).unwrap()
}

/// An `initialize` POST with a bearer token: (status, WWW-Authenticate).
async fn init(url: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(crate::failclosed::INIT);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.unwrap();
    let challenge = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (r.status().as_u16(), challenge)
}

fn config(p: &Provider) -> String {
    format!(
        "oauth:\n  issuers:\n    - issuer: {:?}\n      identity_claim: email\n      scopes:\n        a:all: {{servers: [a]}}\n        b:echo: {{servers: [b], tools: [b__echo]}}\n",
        p.issuer
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_of_the_provider_are_checked_for_the_endpoint_they_were_issued_for() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    // `offline_access` is the authorization server's business: never asked for here.
    let top = config(&p).replace("        a:all:", "        offline_access: {servers: [a]}\n        a:all:");
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&top).start().await;
    let (mcp, on_b) = (gw.mcp(), gw.server("b"));

    // No credential: 401 naming the metadata and the scopes, no `error` (RFC 6750 §3.1).
    let (status, challenge) = init(&mcp, None).await;
    assert_eq!(status, 401);
    let metadata = format!("{}/.well-known/oauth-protected-resource/mcp", gw.url);
    assert!(challenge.contains(&format!("resource_metadata=\"{metadata}\"")), "{challenge}");
    assert!(challenge.contains("scope=\"a:all b:echo\"") && !challenge.contains("error="), "{challenge}");
    // The metadata names this endpoint exactly, and the provider.
    let (status, doc) = http_json(reqwest::Method::GET, &metadata, None, None).await;
    assert_eq!(status, 200);
    assert_eq!(doc["resource"], mcp);
    assert_eq!(doc["authorization_servers"], json!([p.issuer]));
    assert_eq!(doc["bearer_methods_supported"], json!(["header"]));
    assert_eq!(doc["scopes_supported"], json!(["a:all", "b:echo"]));
    let (_, doc_b) = http_json(
        reqwest::Method::GET,
        &format!("{}/.well-known/oauth-protected-resource/servers/b/mcp", gw.url),
        None,
        None,
    )
    .await;
    assert_eq!(
        (doc_b["resource"].as_str(), doc_b["scopes_supported"].clone()),
        (Some(on_b.as_str()), json!(["b:echo"]))
    );
    assert_eq!(
        http_json(
            reqwest::Method::GET,
            &format!("{}/.well-known/oauth-protected-resource/servers/nope/mcp", gw.url),
            None,
            None
        )
        .await
        .0,
        404
    );

    // A token for /mcp with scope a:all: a's tools only, named by its email in the audit.
    let alice = token(&p, &k1, "alice", &mcp, "a:all", json!({}));
    let client = Client::connect_as(&mcp, &alice).await;
    let tools = client.all_tools().await;
    assert!(!tools.is_empty() && tools.iter().all(|t| t.starts_with("a__")), "{tools:?}");
    assert_eq!(client.call_text("a__echo", json!({"text": "hi"})).await, "hi");
    let records = gw.audit_until(|r| r.iter().any(|r| r["method"] == "tools/call")).await;
    let call = records.iter().find(|r| r["method"] == "tools/call").unwrap();
    assert_eq!(call["identity"], "alice@example.com");
    // The client's token never goes upstream.
    let stats = client.call_text("a__stats", json!({})).await;
    assert!(!stats.contains(&alice) && !stats.to_ascii_lowercase().contains("authorization"), "{stats}");

    // The same token at another resource: refused as invalid there.
    let (status, challenge) = init(&on_b, Some(&alice)).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    assert!(challenge.contains("/.well-known/oauth-protected-resource/servers/b/mcp"), "{challenge}");
    // A token for b's endpoint without b's scope: 403 asking for every scope b needs.
    let narrow = token(&p, &k1, "alice", &on_b, "a:all", json!({}));
    let (status, challenge) = init(&on_b, Some(&narrow)).await;
    assert_eq!(status, 403);
    assert!(
        challenge.contains("error=\"insufficient_scope\"") && challenge.contains("scope=\"b:echo\""),
        "{challenge}"
    );
    // With it: b's echo and nothing else of b.
    let wide = token(&p, &k1, "alice", &on_b, "b:echo", json!({}));
    assert_eq!(Client::connect_as(&on_b, &wide).await.all_tools().await, ["echo"]);

    // Expired, not yet valid, another issuer, a session of another subject.
    for (what, claims) in [
        ("expired", json!({"exp": now() - 600})),
        ("not yet valid", json!({"nbf": now() + 600})),
        ("another issuer", json!({"iss": "http://127.0.0.1:1"})),
    ] {
        let t = token(&p, &k1, "alice", &mcp, "a:all", claims);
        assert_eq!(init(&mcp, Some(&t)).await.0, 401, "{what}");
    }
    let bob = token(&p, &k1, "bob", &mcp, "a:all", json!({}));
    let mut stolen = client.clone();
    stolen.headers = vec![("authorization".into(), format!("Bearer {bob}"))];
    let r = stolen.post(json!({"jsonrpc":"2.0","id":9,"method":"tools/list"})).await;
    assert_eq!(r.status(), 404, "a session is bound to issuer and subject");
    p.stop.cancel();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_without_a_restart_and_forged_key_ids_cannot_hammer_the_provider() {
    let (k1, k2) = (key("k1"), key("k2"));
    let p = provider(&[&k1]).await;
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&config(&p)).start().await;
    let mcp = gw.mcp();
    let first = token(&p, &k1, "alice", &mcp, "a:all", json!({}));
    assert_eq!(init(&mcp, Some(&first)).await.0, 200);
    // Fetched once at start (a token that came first waited for that fetch).
    assert_eq!(p.fetches.load(Ordering::SeqCst), 1);
    // The provider rotates to k2: a token of k2 makes the gateway fetch again, and it works.
    p.keys.lock().unwrap().push(k2.jwk.clone());
    let rotated = token(&p, &k2, "alice", &mcp, "a:all", json!({}));
    assert_eq!(init(&mcp, Some(&rotated)).await.0, 200);
    assert_eq!(p.fetches.load(Ordering::SeqCst), 2);
    // Forged key ids: no fetch within 30 s of the last one, so refused without fetching.
    let forger = key("forged");
    for i in 0..20 {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(format!("forged-{i}"));
        let claims = json!({"iss": p.issuer, "sub": "eve", "aud": mcp, "exp": now() + 300, "scope": "a:all"});
        let t = jsonwebtoken::encode(&h, &claims, &forger.signing).unwrap();
        // 401, until the failure throttle answers 429 for this address.
        assert!(matches!(init(&mcp, Some(&t)).await.0, 401 | 429));
    }
    assert_eq!(p.fetches.load(Ordering::SeqCst), 2);
    // The provider goes away: tokens of keys already fetched still work.
    p.stop.cancel();
    let later = token(&p, &k1, "alice", &mcp, "a:all", json!({"jti": "another"}));
    assert_eq!(init(&mcp, Some(&later)).await.0, 200);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_credential_kind_can_be_turned_off_while_clients_migrate() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    let statics = "auth:\n  tokens:\n    old: old-client-token-0123456789\n";
    // Side by side: the static token and the access token both work.
    let mut gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&format!("{statics}{}", config(&p))).start().await;
    let mcp = gw.mcp();
    let jwt = token(&p, &k1, "alice", &mcp, "a:all", json!({}));
    assert_eq!(init(&mcp, Some("old-client-token-0123456789")).await.0, 200);
    assert_eq!(init(&mcp, Some(&jwt)).await.0, 200);
    let old = Client::connect_as(&mcp, "old-client-token-0123456789").await;
    // Static tokens off: the old client is refused (its session ends), the access token works.
    gw.reload_top(&format!(
        "auth:\n  static_tokens: false\n  tokens:\n    old: old-client-token-0123456789\n{}",
        config(&p)
    ))
    .await;
    assert_eq!(init(&mcp, Some("old-client-token-0123456789")).await.0, 401);
    assert_eq!(old.post(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})).await.status(), 401);
    assert_eq!(init(&mcp, Some(&jwt)).await.0, 200);
    p.stop.cancel();
    gw.stop().await;

    // Everything off is a config error, never an open gateway.
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, "servers: {}\nauth:\n  static_tokens: false\n  issued_tokens: false\n").unwrap();
    let (ok, _, err) = run_cli(None, &["check", "--config", cfg.to_str().unwrap()], &[]).await;
    assert!(!ok && err.contains("nothing could authenticate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_give_a_role_and_a_tenant() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    let top = format!(
        "{}      roles: {{ops: admin}}\n      tenants: {{acme-staff: acme, globex-staff: globex}}\ntenants:\n  acme: {{namespaces: {{prod: [a]}}}}\n  globex: {{namespaces: {{prod: [b]}}}}\n",
        config(&p).replace("a:all: {servers: [a]}", "all: {}")
    );
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&top).start().await;
    let mcp = gw.mcp();
    let with_groups = |groups: Value| token(&p, &k1, "carol", &mcp, "all", json!({"groups": groups}));
    // A tenant's group: only the tenant's servers.
    let acme = Client::connect_as(&mcp, &with_groups(json!(["acme-staff"]))).await;
    let tools = acme.all_tools().await;
    assert!(!tools.is_empty() && tools.iter().all(|t| t.starts_with("a__")), "{tools:?}");
    // Groups of two tenants: refused.
    assert_eq!(init(&mcp, Some(&with_groups(json!(["acme-staff", "globex-staff"])))).await.0, 401);
    // The admin group reaches the management API; a plain token does not.
    let servers = format!("{}/servers", gw.url);
    assert_eq!(http_json(reqwest::Method::GET, &servers, Some(&with_groups(json!("ops"))), None).await.0, 200);
    assert_eq!(http_json(reqwest::Method::GET, &servers, Some(&with_groups(json!([]))), None).await.0, 403);
    p.stop.cancel();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_token_s_expiry_ends_its_sessions_on_every_transport() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    let top = config(&p).replace("      identity_claim: email\n", "      identity_claim: email\n      leeway: 0s\n");
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&top).start().await;
    let mcp = gw.mcp();
    let brief = token(&p, &k1, "dave", &mcp, "a:all", json!({"exp": now() + 2}));
    let client = Client::connect_as(&mcp, &brief).await;
    let mut stream = client.get_stream().await;
    // A legacy SSE session of the same token ends too.
    let (mut legacy, _) = crate::protocol::open_sse(&format!("{}/sse", gw.url), Some(&brief)).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), async { tokio::join!(stream.ended(), legacy.ended()) })
        .await
        .expect("a stream outlived the token");
    assert_eq!(client.post(json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})).await.status(), 401);
    p.stop.cancel();
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tokens_are_introspected_and_the_answer_is_cached_briefly() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    let top = format!(
        "{}      introspection: {{endpoint: \"{}/introspect\", client_id: portcullis, client_secret: \"${{SECRET}}\"}}\n",
        config(&p),
        p.issuer
    );
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").env("SECRET", "s3cret").top(&top).start().await;
    let mcp = gw.mcp();
    *p.audience.lock().unwrap() = mcp.clone();
    // Active, for this endpoint: in, as its subject, with its scope's grants.
    let client = Client::connect_as(&mcp, "opaque-good-token").await;
    let tools = client.all_tools().await;
    assert!(!tools.is_empty() && tools.iter().all(|t| t.starts_with("a__")), "{tools:?}");
    let asked = p.introspections.load(Ordering::SeqCst);
    assert_eq!(client.call_text("a__echo", json!({"text": "again"})).await, "again");
    assert_eq!(p.introspections.load(Ordering::SeqCst), asked, "the answer is cached");
    // Inactive: 401 invalid_token. For another endpoint: refused there.
    let (status, challenge) = init(&mcp, Some("opaque-other-token")).await;
    assert_eq!(status, 401);
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    assert_eq!(init(&gw.server("b"), Some("opaque-good-token")).await.0, 401);
    // A token in Portcullis' own format is never shown to the provider.
    let before = p.introspections.load(Ordering::SeqCst);
    assert_eq!(init(&mcp, Some("pcs_NotAnIssuedTokenOfThisGatewayAtAll0123456789")).await.0, 401);
    assert_eq!(p.introspections.load(Ordering::SeqCst), before);
    // The provider cannot answer: 503 (the token may be valid), never 401.
    p.stop.cancel();
    assert_eq!(init(&mcp, Some("opaque-unseen-token")).await.0, 503);
    gw.stop().await;
}

/// Turning static tokens off never leaves a gateway open: with no issued token and no issuer,
/// nobody is let in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_tokens_off_with_nothing_else_refuses_everyone() {
    let gw = gateway()
        .demo("a", &[], "")
        .top("auth:\n  static_tokens: false\n  tokens:\n    old: old-client-token-0123456789\n")
        .start()
        .await;
    let mcp = gw.mcp();
    assert_eq!(init(&mcp, None).await.0, 401);
    assert_eq!(init(&mcp, Some("old-client-token-0123456789")).await.0, 401);
    gw.stop().await;
}

/// A call the token's scopes do not grant: the list leaves it out, and the call gets 403
/// `insufficient_scope` naming every scope to come back with (its own and the narrowest that
/// grants the call), on streamable HTTP in both eras and `/rpc`. A name no scope grants stays
/// unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_the_scopes_do_not_grant_asks_for_every_scope_it_needs() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    let top = config(&p).replace(
        "        a:all: {servers: [a]}\n",
        "        a:all: {servers: [a]}\n        a:echo: {servers: [a], tools: [a__echo]}\n",
    );
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&top).start().await;
    let mcp = gw.mcp();
    let narrow = token(&p, &k1, "alice", &mcp, "b:echo", json!({}));
    let client = Client::connect_as(&mcp, &narrow).await;
    assert_eq!(client.all_tools().await, ["b__echo"]);
    let call = |name: &str| json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":name,"arguments":{"text":"x"}}});
    let r = client.post(call("a__echo")).await;
    assert_eq!(r.status(), 403);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    let metadata = format!("{}/.well-known/oauth-protected-resource/mcp", gw.url);
    assert!(challenge.contains(r#"error="insufficient_scope""#), "{challenge}");
    assert!(challenge.contains(r#"scope="a:echo b:echo""#), "a:all covers a:echo: {challenge}");
    assert!(challenge.contains(&format!(r#"resource_metadata="{metadata}""#)), "{challenge}");
    // Any other tool of a only a:all grants.
    let r = client.post(call("a__add")).await;
    assert_eq!(r.status(), 403);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains(r#"scope="a:all b:echo""#));
    // b's other tools no scope grants: answered as unknown, exactly as a name that is not there.
    let (hidden, absent) = (client.post(call("b__add")).await, client.post(call("b__no_such_tool")).await);
    assert_eq!((hidden.status(), absent.status()), (reqwest::StatusCode::OK, reqwest::StatusCode::OK));
    let body = async |r: reqwest::Response| serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap();
    let (hidden, absent) = (body(hidden).await, body(absent).await);
    assert_eq!(hidden["error"]["code"], absent["error"]["code"]);
    // The same on /rpc; the audit records the refusal with its status.
    let (status, _) =
        http_json(reqwest::Method::POST, &format!("{}/rpc", gw.url), Some(&narrow), Some(&call("a__echo").to_string()))
            .await;
    assert_eq!(status, 403);
    let records = gw.audit_until(|r| r.iter().filter(|r| r["status"] == 403).count() == 3).await;
    let refused = records.iter().find(|r| r["status"] == 403).unwrap();
    assert_eq!((refused["server"].as_str(), refused["name"].as_str()), (Some("a"), Some("echo")), "{refused}");
    // The stateless era: the same list, marked private to this caller; the same 403.
    let stateless = Client::modern(&mcp).bearer(&narrow);
    let listed = stateless.request(json!(1), "tools/list", json!({})).await;
    assert_eq!(listed.response["result"]["cacheScope"], "private", "{}", listed.response);
    let names: Vec<&str> =
        listed.response["result"]["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["b__echo"]);
    assert_eq!(stateless.call("a__echo", json!({"text": "x"})).await.status, 403);
    // With the scopes it asked for, the call goes through.
    let wide = token(&p, &k1, "alice", &mcp, "a:echo b:echo", json!({}));
    assert_eq!(Client::connect_as(&mcp, &wide).await.call_text("a__echo", json!({"text": "now"})).await, "now");
    p.stop.cancel();
    gw.stop().await;
}

/// `rate_limit.per_identity` counts an access token's subject, across all its tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_count_per_subject_across_its_tokens() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    let top = format!("rate_limit:\n  per_identity: 3/min\n{}", config(&p));
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&top).start().await;
    let mcp = gw.mcp();
    let fresh = |n: u32| token(&p, &k1, "mallory", &mcp, "a:all", json!({"jti": format!("t{n}")}));
    // A new token per request: the subject's budget is spent all the same.
    let statuses: Vec<u16> = futures_util::future::join_all((0..4).map(|n| {
        let t = fresh(n);
        let mcp = mcp.clone();
        async move { init(&mcp, Some(&t)).await.0 }
    }))
    .await;
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 3, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 1, "{statuses:?}");
    // Another subject has its own.
    assert_eq!(init(&mcp, Some(&token(&p, &k1, "trent", &mcp, "a:all", json!({})))).await.0, 200);
    p.stop.cancel();
    gw.stop().await;
}

/// Tokens an attacker makes, each refused at the gateway with 401 `invalid_token` and a
/// challenge naming the metadata: `alg: none`, HS256 keyed with the provider's public key, a
/// `jku` naming the attacker's own keys (never fetched), another audience, 64 KiB; a JWT of
/// 1 MiB gets 431; a provider that publishes 1,000 keys has its set refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_oversized_tokens_are_refused() {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&config(&p)).start().await;
    let mcp = gw.mcp();
    assert_eq!(init(&mcp, Some(&token(&p, &k1, "alice", &mcp, "a:all", json!({})))).await.0, 200);
    // 1,000 keys: the set is refused whole, so even a token of a real key in it is refused.
    let many = key("many");
    let mut set: Vec<Value> = (0..999)
        .map(|i| {
            let mut k = many.jwk.clone();
            k["kid"] = json!(format!("filler-{i}"));
            k
        })
        .collect();
    set.push(many.jwk.clone());
    *p.keys.lock().unwrap() = set;
    let fetched = p.fetches.load(Ordering::SeqCst);
    let (status, challenge) = init(&mcp, Some(&token(&p, &many, "alice", &mcp, "a:all", json!({})))).await;
    assert_eq!(p.fetches.load(Ordering::SeqCst), fetched + 1, "the unknown key id made it fetch once");
    assert_eq!(status, 401);
    assert!(challenge.contains(r#"error="invalid_token""#), "{challenge}");
    // The last good keys are kept.
    assert_eq!(init(&mcp, Some(&token(&p, &k1, "alice", &mcp, "a:all", json!({"jti": "k"})))).await.0, 200);

    let claims = json!({"iss": p.issuer, "sub": "eve", "aud": mcp, "exp": now() + 300, "scope": "a:all"});
    let body = b64(claims.to_string().as_bytes());

    // alg none, naming the provider's key.
    let none = format!("{}.{body}.", b64(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#));
    // HS256 with the provider's public key as the secret (the algorithm confusion attack).
    let public = serde_json::to_vec(&k1.jwk).unwrap();
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(&public).unwrap()).unwrap();
    // A jku pointing at the attacker's keys: Portcullis reads keys from its issuer only.
    let attacker_key = key("attacker");
    let attacker = provider(&[&attacker_key]).await;
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("attacker".into());
    h.jku = Some(format!("{}/jwks", attacker.issuer));
    let jku = jsonwebtoken::encode(&h, &claims, &attacker_key.signing).unwrap();
    // Signed by the provider, for another resource.
    let elsewhere = token(&p, &k1, "eve", "https://elsewhere.example/mcp", "a:all", json!({}));
    for (what, t) in [("alg none", &none), ("HS256 with the public key", &confused), ("jku", &jku), ("aud", &elsewhere)]
    {
        let (status, challenge) = init(&mcp, Some(t)).await;
        assert_eq!(status, 401, "{what}");
        assert!(challenge.contains(r#"error="invalid_token""#), "{what}: {challenge}");
        assert!(challenge.contains("resource_metadata="), "{what}: {challenge}");
    }
    assert_eq!(attacker.fetches.load(Ordering::SeqCst), 0, "a jku is never followed");

    // 1 MiB: past what the HTTP server reads of a request's headers (431); 64 KiB: past the
    // 16 KiB a token may have, refused unread.
    let sized = |n: usize| format!("{}.{}.{}", b64(br#"{"alg":"ES256","kid":"k1"}"#), "A".repeat(n), "AAAA");
    // The server answers 431 and closes; a client still writing its headers may see the
    // connection closed before it reads that answer. Either way the token is never read.
    let huge = reqwest::Client::new()
        .post(&mcp)
        .header("authorization", format!("Bearer {}", sized(1 << 20)))
        .body(crate::failclosed::INIT)
        .send()
        .await;
    match huge {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(e.is_request() && !e.is_timeout(), "{e:?}"),
    }
    let (status, challenge) = init(&mcp, Some(&sized(64 << 10))).await;
    assert_eq!(status, 401);
    assert!(challenge.contains(r#"error="invalid_token""#), "{challenge}");

    p.stop.cancel();
    attacker.stop.cancel();
    gw.stop().await;
}

/// A legacy SSE session opened at one server's endpoint posts its messages to the shared
/// `/messages/` with a token for that server's endpoint; the aggregated endpoint's token cannot
/// post there, nor that server's token into an aggregated session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_sse_messages_are_checked_for_the_endpoint_the_session_was_opened_at() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    let top = config(&p).replace("a:all: {servers: [a]}", "a:all: {servers: [a, b]}");
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&top).start().await;
    let (mcp, on_b) = (gw.mcp(), gw.server("b"));
    let for_b = token(&p, &k1, "alice", &on_b, "b:echo", json!({}));
    let for_all = token(&p, &k1, "alice", &mcp, "a:all", json!({}));
    let post =
        async |endpoint: &str, t: &str, body: Value| post_as(&format!("{}{endpoint}", gw.url), t, &body).await.status();
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    let call = json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"text":"one server"}}});

    let (mut events, endpoint) = crate::protocol::open_sse(&format!("{}/servers/b/sse", gw.url), Some(&for_b)).await;
    assert_eq!(post(&endpoint, &for_b, init.clone()).await, 202);
    assert_eq!(events.next().await["result"]["protocolVersion"], "2024-11-05");
    assert_eq!(post(&endpoint, &for_b, call.clone()).await, 202);
    assert_eq!(events.next().await["result"]["content"][0]["text"], "one server");
    // The same subject's token for the aggregated endpoint is not a token for b's.
    assert_eq!(post(&endpoint, &for_all, call.clone()).await, 401);

    // And the other way round: b's token cannot post into an aggregated session.
    let (_all_events, all_endpoint) = crate::protocol::open_sse(&format!("{}/sse", gw.url), Some(&for_all)).await;
    assert_eq!(post(&all_endpoint, &for_b, init).await, 401);
    p.stop.cancel();
    gw.stop().await;
}

/// Portcullis' own token for a remote server that the server refuses (here: it had expired,
/// though its endpoint said an hour) is replaced once and the request sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_the_remote_server_refuses_is_replaced_and_the_request_sent_again() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    *p.mint.lock().unwrap() = Some((k1.kid.clone(), k1.signing.clone(), true));
    let strict = config(&p).replace("      identity_claim: email\n", "      leeway: 0s\n");
    let upstream = gateway().demo("a", &[], "").demo("b", &[], "").top(&strict).start().await;
    let grant = format!(
        "oauth: {{grant: client_credentials, client_id: portcullis, client_secret: s3cret, token_endpoint: \"{}/token\"}}",
        p.issuer
    );
    let front = gateway().remote("up", &upstream.mcp(), &grant).start().await;
    let client = Client::connect(&front.mcp()).await;
    assert_eq!(client.call_text("up__a__echo", json!({"text": "sent again"})).await, "sent again");
    assert_eq!(p.minted.load(Ordering::SeqCst), 2, "one expired token, one replacement");
    let records = upstream.audit_until(|r| r.iter().any(|r| r["method"] == "tools/call")).await;
    assert!(records.iter().any(|r| r["status"] == 401), "the first token was refused: {records:?}");
    front.stop().await;
    upstream.stop().await;
    p.stop.cancel();
}

/// The instances of a `per_session` server share its one token: two sessions, one fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_of_a_per_session_server_share_its_token() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    *p.mint.lock().unwrap() = Some((k1.kid.clone(), k1.signing.clone(), false));
    let upstream = gateway().demo("a", &[], "").demo("b", &[], "").top(&config(&p)).start().await;
    let grant = format!(
        "share: per_session\noauth: {{grant: client_credentials, client_id: portcullis, client_secret: s3cret, token_endpoint: \"{}/token\"}}",
        p.issuer
    );
    let front = gateway().remote("up", &upstream.mcp(), &grant).start().await;
    for text in ["one", "two"] {
        let client = Client::connect(&front.mcp()).await;
        assert_eq!(client.call_text("up__a__echo", json!({"text": text})).await, text);
    }
    assert_eq!(p.minted.load(Ordering::SeqCst), 1);
    front.stop().await;
    upstream.stop().await;
    p.stop.cancel();
}

/// A remote server that answers 403 `insufficient_scope` (here a Portcullis whose call needs
/// another scope) gets a token with the scopes it named, and the call goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portcullis_own_token_steps_up_when_the_remote_server_asks_for_more_scopes() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    *p.mint.lock().unwrap() = Some((k1.kid.clone(), k1.signing.clone(), false));
    let upstream = gateway().demo("a", &[], "").demo("b", &[], "").top(&config(&p)).start().await;
    let grant = format!(
        "oauth: {{grant: client_credentials, client_id: portcullis, client_secret: s3cret, scope: \"b:echo\", token_endpoint: \"{}/token\"}}",
        p.issuer
    );
    let front = gateway().remote("up", &upstream.mcp(), &grant).start().await;
    let client = Client::connect(&front.mcp()).await;
    assert_eq!(client.call_text("up__b__echo", json!({"text": "narrow"})).await, "narrow");
    assert_eq!(p.minted.load(Ordering::SeqCst), 1);
    assert_eq!(client.call_text("up__a__echo", json!({"text": "wider"})).await, "wider");
    assert_eq!(p.minted.load(Ordering::SeqCst), 2, "one step-up");
    let records = upstream.audit_until(|r| r.iter().filter(|r| r["method"] == "tools/call").count() == 3).await;
    let statuses: Vec<&Value> = records.iter().filter(|r| r["method"] == "tools/call").map(|r| &r["status"]).collect();
    assert_eq!(statuses, [&json!(200), &json!(403), &json!(200)]);
    front.stop().await;
    upstream.stop().await;
    p.stop.cancel();
}

/// A client that refreshed its access token keeps its session: a newer token of the same
/// subject (same scopes) used on the session carries it past the first token's expiry, while
/// a session nobody renewed ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lives_on_with_the_subject_s_refreshed_token() {
    let k1 = key("k1");
    let p = provider(&[&k1]).await;
    let top = config(&p).replace("      identity_claim: email\n", "      identity_claim: email\n      leeway: 0s\n");
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&top).start().await;
    let mcp = gw.mcp();
    let exp = now() + 2;
    let first = token(&p, &k1, "erin", &mcp, "a:all", json!({"exp": exp, "jti": "first"}));
    let other = token(&p, &k1, "erin", &mcp, "a:all", json!({"exp": exp, "jti": "other"}));
    let refreshed = token(&p, &k1, "erin", &mcp, "a:all", json!({"exp": now() + 300, "jti": "refreshed"}));
    let mut kept = Client::connect_as(&mcp, &first).await;
    let abandoned = Client::connect_as(&mcp, &other).await;
    let mut abandoned_stream = abandoned.get_stream().await;
    // The client refreshes: its next request on the session carries the new token.
    kept.headers = vec![("authorization".into(), format!("Bearer {refreshed}"))];
    assert_eq!(kept.all_tools().await.len(), abandoned.all_tools().await.len());
    // The abandoned session ends when its token does (the sweep that ends it saw both)...
    tokio::time::timeout(std::time::Duration::from_secs(10), abandoned_stream.ended())
        .await
        .expect("the abandoned session outlived its token");
    // ...and the renewed one carries on.
    assert_eq!(kept.call_text("a__echo", json!({"text": "still here"})).await, "still here");
    p.stop.cancel();
    gw.stop().await;
}
