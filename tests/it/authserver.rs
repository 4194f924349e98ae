//! Portcullis' own authorization server: a client registers itself, a person signs in with a
//! Portcullis token and approves, the client gets tokens bound to the endpoint it asked for,
//! refreshes them (a reused refresh token revokes its family), and every refusal on the way.
//! The person's browser is a cookie-keeping HTTP client (`idp::Browser`); the official Python
//! SDK's OAuth client does the whole flow too.

use crate::idp::{Browser, form, param, rand_bytes};
use crate::support::*;
use base64::Engine;
use serde_json::{Value, json};
use sha2::Digest;

const ALICE: &str = "alice-login-token-0123456789abc";
const CALLBACK: &str = "http://127.0.0.1:9/callback";

fn top(extra: &str) -> String {
    format!(
        "auth:\n  tokens:\n    alice: {{token: {ALICE}, servers: [a]}}\n    scraper: {{token: scraper-token-0123456789abcd, role: metrics}}\noauth:\n  authorization_server: {{{extra}}}\n"
    )
}

/// Servers a and b, an admin token, and the authorization server on.
async fn two_servers() -> TestGateway {
    gateway().demo("a", &[], "").demo("b", &[], "").env("PORTCULLIS_TOKEN", ALICE_ADMIN).top(&top("")).start().await
}

async fn register(gw: &TestGateway, name: &str, redirect: &str) -> (u16, Value) {
    let body = json!({"client_name": name, "redirect_uris": [redirect], "token_endpoint_auth_method": "none"});
    http_json(reqwest::Method::POST, &format!("{}/register", gw.url), None, Some(&body.to_string())).await
}

/// A hidden field's value on a page.
fn hidden(page: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page.find(&marker).unwrap_or_else(|| panic!("no {name} on {page}")) + marker.len();
    page[start..].split('"').next().unwrap().to_owned()
}

struct Flow {
    browser: Browser,
    verifier: String,
    state: String,
    request: String,
    csrf: String,
    page: String,
}

/// Starts an authorization for `client_id` at `resource`: the login page.
async fn start(gw: &TestGateway, client_id: &str, redirect: &str, resource: &str) -> Flow {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let verifier = b64(&rand_bytes());
    let state = b64(&rand_bytes());
    let challenge = b64(&sha2::Sha256::digest(verifier.as_bytes()));
    let query = form(&[
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect),
        ("state", &state),
        ("code_challenge", &challenge),
        ("code_challenge_method", "S256"),
        ("resource", resource),
    ]);
    let mut browser = Browser::new();
    let (status, _, page) = browser.go(&format!("{}/authorize?{query}", gw.url), None).await;
    assert_eq!(status, 200, "{page}");
    let (request, csrf) = (hidden(&page, "request"), hidden(&page, "csrf"));
    Flow { browser, verifier, state, request, csrf, page }
}

impl Flow {
    async fn post(&mut self, gw: &TestGateway, fields: &[(&str, &str)]) -> (u16, Option<String>, String) {
        let mut all = vec![("request", self.request.as_str()), ("csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        let body = form(&all);
        let r = self.browser.go(&format!("{}/authorize", gw.url), Some(body)).await;
        if r.2.contains("name=\"csrf\"") {
            self.csrf = hidden(&r.2, "csrf");
            self.page = r.2.clone();
        }
        r
    }

    /// Signs in as `token` and approves: the code from the redirect.
    async fn approve(&mut self, gw: &TestGateway, token: &str) -> String {
        let (status, _, page) = self.post(gw, &[("action", "login"), ("token", token)]).await;
        assert_eq!(status, 200, "{page}");
        let (status, location, _) = self.post(gw, &[("action", "approve")]).await;
        assert_eq!(status, 302);
        let l = location.unwrap();
        assert!(l.starts_with(CALLBACK), "{l}");
        assert_eq!(param(&l, "state").as_deref(), Some(self.state.as_str()));
        assert_eq!(param(&l, "iss").as_deref(), Some(gw.url.as_str()), "RFC 9207");
        param(&l, "code").unwrap()
    }
}

async fn token_request(gw: &TestGateway, fields: &[(&str, &str)]) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/token", gw.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(fields))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    assert_eq!(r.headers().get("cache-control").map(|v| v.to_str().unwrap()), Some("no-store"));
    (status, serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null))
}

async fn exchange(gw: &TestGateway, client_id: &str, code: &str, verifier: &str) -> (u16, Value) {
    token_request(
        gw,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", CALLBACK),
            ("client_id", client_id),
            ("code_verifier", verifier),
        ],
    )
    .await
}

async fn refresh(gw: &TestGateway, client_id: &str, refresh_token: &str) -> (u16, Value) {
    token_request(gw, &[("grant_type", "refresh_token"), ("refresh_token", refresh_token), ("client_id", client_id)])
        .await
}

async fn status_of(url: &str, token: &str) -> u16 {
    post_as(url, token, &serde_json::from_str::<Value>(crate::failclosed::INIT).unwrap()).await.status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_registers_a_person_signs_in_with_a_token_and_the_client_gets_its_own_tokens() {
    let gw = two_servers().await;
    let mcp = gw.mcp();
    // The endpoints say where to go: protected resource metadata names this server.
    let (status, prm) =
        http_json(reqwest::Method::GET, &format!("{}/.well-known/oauth-protected-resource/mcp", gw.url), None, None)
            .await;
    assert_eq!((status, prm["authorization_servers"][0].as_str()), (200, Some(gw.url.as_str())));
    let (_, asm) =
        http_json(reqwest::Method::GET, &format!("{}/.well-known/oauth-authorization-server", gw.url), None, None)
            .await;
    assert_eq!(asm["issuer"], gw.url);
    assert_eq!(asm["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(asm["authorization_response_iss_parameter_supported"], true);

    let (status, client) = register(&gw, "Test Client", CALLBACK).await;
    assert_eq!(status, 201, "{client}");
    let client_id = client["client_id"].as_str().unwrap().to_owned();
    let mut flow = start(&gw, &client_id, CALLBACK, &mcp).await;
    assert!(flow.page.contains("Sign in"), "{}", flow.page);
    // The consent page names the client and, prominently, where it sends the person.
    let (status, _, consent) = flow.post(&gw, &[("action", "login"), ("token", ALICE)]).await;
    assert_eq!(status, 200);
    assert!(consent.contains("Test Client") && consent.contains("class=\"host\">127.0.0.1:9<"), "{consent}");
    let (status, location, _) = flow.post(&gw, &[("action", "approve")]).await;
    assert_eq!(status, 302);
    let code = param(&location.unwrap(), "code").unwrap();
    let (status, tokens) = exchange(&gw, &client_id, &code, &flow.verifier).await;
    assert_eq!(status, 200, "{tokens}");
    let (access, refresh_token) =
        (tokens["access_token"].as_str().unwrap().to_owned(), tokens["refresh_token"].as_str().unwrap().to_owned());
    assert_eq!(tokens["token_type"], "Bearer");
    assert_eq!(tokens["expires_in"], 3600);

    // The client calls as alice, with alice's grants (server a only), at the endpoint it asked for.
    let session = Client::connect_as(&mcp, &access).await;
    let tools = session.all_tools().await;
    assert!(!tools.is_empty() && tools.iter().all(|t| t.starts_with("a__")), "{tools:?}");
    assert_eq!(session.call_text("a__echo", json!({"text": "as alice"})).await, "as alice");
    assert_eq!(status_of(&gw.server("a"), &access).await, 401, "a token for /mcp is not one for /servers/a/mcp");
    // Listed with the other issued tokens, with its client and audience.
    let (_, listed) =
        http_json(reqwest::Method::GET, &format!("{}/admin/tokens", gw.url), Some(ALICE_ADMIN), None).await;
    let row = listed["tokens"].as_array().unwrap().iter().find(|t| t["client_id"] == client_id.as_str()).cloned();
    assert_eq!(row.as_ref().map(|r| r["audience"].clone()), Some(json!(mcp)), "{listed}");

    // A refresh: a new pair; the session carries on with the new access token.
    let (status, next) = refresh(&gw, &client_id, &refresh_token).await;
    assert_eq!(status, 200, "{next}");
    let new_access = next["access_token"].as_str().unwrap().to_owned();
    let mut renewed = session.clone();
    renewed.headers = vec![("authorization".into(), format!("Bearer {new_access}"))];
    assert_eq!(renewed.call_text("a__echo", json!({"text": "refreshed"})).await, "refreshed");
    // The old refresh token used again: the whole family is revoked, the session ends.
    let mut stream = renewed.get_stream().await;
    let (status, reused) = refresh(&gw, &client_id, &refresh_token).await;
    assert_eq!((status, reused["error"].as_str()), (400, Some("invalid_grant")));
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.ended())
        .await
        .expect("the session outlived its family");
    assert_eq!(status_of(&mcp, &new_access).await, 401);
    let (status, _) = refresh(&gw, &client_id, next["refresh_token"].as_str().unwrap()).await;
    assert_eq!(status, 400, "the newest refresh token of the family is revoked too");

    // Revocation (RFC 7009) of a second login's refresh token ends its access token too.
    let mut flow = start(&gw, &client_id, CALLBACK, &mcp).await;
    let code = flow.approve(&gw, ALICE).await;
    let (_, tokens) = exchange(&gw, &client_id, &code, &flow.verifier).await;
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(status_of(&mcp, access).await, 200);
    let r = reqwest::Client::new()
        .post(format!("{}/revoke", gw.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form(&[("token", tokens["refresh_token"].as_str().unwrap())]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(status_of(&mcp, access).await, 401);
    gw.stop().await;
}

/// Alice's own token is not an admin's: the management API is asked with one.
const ALICE_ADMIN: &str = "admin-token-for-listing-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_refuses_what_it_must() {
    let gw = two_servers().await;
    let mcp = gw.mcp();
    let (_, client) = register(&gw, "<script>alert(1)</script>", CALLBACK).await;
    let client_id = client["client_id"].as_str().unwrap().to_owned();

    // An unknown client, or a redirect URI one character off: an error page, never a redirect.
    let mut b = Browser::new();
    let q = |id: &str, redirect: &str| {
        format!(
            "{}/authorize?{}",
            gw.url,
            form(&[
                ("response_type", "code"),
                ("client_id", id),
                ("redirect_uri", redirect),
                ("code_challenge", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"),
                ("code_challenge_method", "S256"),
            ])
        )
    };
    for (id, redirect) in [("nobody", CALLBACK), (client_id.as_str(), "http://127.0.0.1:9/callbacK")] {
        let (status, location, _) = b.go(&q(id, redirect), None).await;
        assert_eq!((status, location), (400, None), "{id} {redirect}");
    }
    // No PKCE: back to the client with invalid_request.
    let no_pkce = format!(
        "{}/authorize?{}",
        gw.url,
        form(&[("response_type", "code"), ("client_id", &client_id), ("redirect_uri", CALLBACK), ("state", "s1")])
    );
    let (status, location, _) = b.go(&no_pkce, None).await;
    let l = location.unwrap_or_default();
    assert_eq!(
        (status, param(&l, "error").as_deref(), param(&l, "state").as_deref()),
        (302, Some("invalid_request"), Some("s1"))
    );
    // A resource that is not this gateway's.
    let mut flow_elsewhere = Browser::new();
    let (_, location, _) = flow_elsewhere
        .go(&format!("{}&resource={}", q(&client_id, CALLBACK), "https%3A%2F%2Fevil.example%2Fmcp"), None)
        .await;
    assert_eq!(param(&location.unwrap_or_default(), "error").as_deref(), Some("invalid_target"));

    // The client's name is shown escaped.
    let mut flow = start(&gw, &client_id, CALLBACK, &mcp).await;
    let (_, _, consent) = flow.post(&gw, &[("action", "login"), ("token", ALICE)]).await;
    assert!(consent.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !consent.contains("<script>"), "{consent}");
    // A consent form without its CSRF token, or from another browser: 403.
    let body = form(&[("request", &flow.request), ("action", "approve")]);
    assert_eq!(flow.browser.go(&format!("{}/authorize", gw.url), Some(body)).await.0, 403);
    let body = form(&[("request", &flow.request), ("csrf", &flow.csrf), ("action", "approve")]);
    assert_eq!(Browser::new().go(&format!("{}/authorize", gw.url), Some(body)).await.0, 403);
    // Denied: access_denied back to the client.
    let (status, location, _) = flow.post(&gw, &[("action", "deny")]).await;
    assert_eq!((status, param(&location.unwrap_or_default(), "error").as_deref()), (302, Some("access_denied")));

    // A wrong token on the login page, and a metrics credential: not a sign-in.
    let mut flow = start(&gw, &client_id, CALLBACK, &mcp).await;
    assert_eq!(flow.post(&gw, &[("action", "login"), ("token", "not-a-token-of-this-gateway-000")]).await.0, 401);
    assert_eq!(flow.post(&gw, &[("action", "login"), ("token", "scraper-token-0123456789abcd")]).await.0, 401);
    // A wrong code_verifier; then the right one; then the same code again (its tokens revoked).
    let code = flow.approve(&gw, ALICE).await;
    let (status, e) = exchange(&gw, &client_id, &code, "wrong-verifier-wrong-verifier-wrong-verifier-0").await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_grant")));
    let (status, tokens) = exchange(&gw, &client_id, &code, &flow.verifier).await;
    assert_eq!(status, 200, "a failed exchange does not use the code up");
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    assert_eq!(status_of(&mcp, &access).await, 200);
    let (status, _) = exchange(&gw, &client_id, &code, &flow.verifier).await;
    assert_eq!(status, 400);
    assert_eq!(status_of(&mcp, &access).await, 401, "a code used twice revokes what it gave");
    // Another client cannot use a refresh token.
    let (_, other) = register(&gw, "Other", CALLBACK).await;
    let (status, _) =
        refresh(&gw, other["client_id"].as_str().unwrap(), tokens["refresh_token"].as_str().unwrap()).await;
    assert_eq!(status, 400);
    // A redirect URI that is not https, http on loopback or an app's scheme is not registered.
    let (status, e) = register(&gw, "Bad", "http://evil.example/cb").await;
    assert_eq!((status, e["error"].as_str()), (400, Some("invalid_redirect_uri")));
    gw.stop().await;

    // Registration turned off.
    let gw = gateway().demo("a", &[], "").top(&top("registration: false")).start().await;
    assert_eq!(register(&gw, "Late", CALLBACK).await.0, 404);
    let (_, asm) =
        http_json(reqwest::Method::GET, &format!("{}/.well-known/oauth-authorization-server", gw.url), None, None)
            .await;
    assert!(asm.get("registration_endpoint").is_none(), "{asm}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_the_login_token_ends_what_the_client_got_from_it() {
    let gw = gateway().demo("a", &[], "").env("PORTCULLIS_TOKEN", ALICE_ADMIN).top(&top("")).start().await;
    let mcp = gw.mcp();
    // Alice signs in with an issued token.
    let store = portcullis::store::SqliteStore::open(&gw.audit.with_file_name("tokens.db")).unwrap();
    let (issued, secret) = store
        .create(&portcullis::store::NewToken { name: "bob".into(), ..Default::default() }, portcullis::store::now_ms())
        .unwrap();
    let (_, client) = register(&gw, "Client", CALLBACK).await;
    let client_id = client["client_id"].as_str().unwrap().to_owned();
    let mut flow = start(&gw, &client_id, CALLBACK, &mcp).await;
    let code = flow.approve(&gw, &secret).await;
    let (_, tokens) = exchange(&gw, &client_id, &code, &flow.verifier).await;
    assert_eq!(status_of(&mcp, tokens["access_token"].as_str().unwrap()).await, 200);
    let revoked = format!("{}/admin/tokens/{}", gw.url, issued.id);
    assert_eq!(http_json(reqwest::Method::DELETE, &revoked, Some(ALICE_ADMIN), None).await.0, 200);
    let (status, _) = refresh(&gw, &client_id, tokens["refresh_token"].as_str().unwrap()).await;
    assert_eq!(status, 400, "the login no longer holds");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_registers_signs_in_and_calls_through_portcullis_own_server() {
    let gw = gateway().demo("a", &[], "").top(&top("")).start().await;
    let seen = crate::idp::sdk_oauth(&gw.mcp(), "a__echo", &[("PORTCULLIS_LOGIN_TOKEN", ALICE)]).await;
    assert_eq!(seen["echo"], json!(["hello through oauth"]), "{seen}");
    assert_eq!(seen["resource"], gw.mcp());
    gw.stop().await;
}

/// The same through a real browser: headless Chromium (Debian's, driven by playwright-core)
/// opens the authorization URL the SDK gives it, signs in with a token and approves; the SDK
/// gets its tokens at its callback and calls a tool. The pages it saw are saved as screenshots
/// (`PORTCULLIS_SCREENSHOTS` names where; docs/img holds the ones in the documentation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_signs_in_through_a_real_browser() {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is needed (./scripts/test installs it)"
    );
    let gw = gateway().demo("a", &[], "").top(&top("")).start().await;
    let dir = TempDir::new();
    let shots = std::env::var("PORTCULLIS_SCREENSHOTS").unwrap_or_else(|_| dir.0.display().to_string());
    let (node, playwright, login) = (
        crate::external::node().display().to_string(),
        crate::external::node_module("playwright-core/index.mjs"),
        crate::external::fixture("browser_login.mjs"),
    );
    let env = [
        ("PORTCULLIS_LOGIN_TOKEN", ALICE),
        ("PORTCULLIS_BROWSER_LOGIN", login.as_str()),
        ("PORTCULLIS_PLAYWRIGHT", playwright.as_str()),
        ("PORTCULLIS_NODE", node.as_str()),
        ("PORTCULLIS_SCREENSHOTS", shots.as_str()),
        ("PORTCULLIS_CALLBACK", "http://127.0.0.1:8976/callback"),
    ];
    let seen = crate::idp::sdk_oauth(&gw.mcp(), "a__echo", &env).await;
    assert_eq!(seen["echo"], json!(["hello through oauth"]), "{seen}");
    for page in ["signin.png", "consent.png"] {
        let png = std::fs::read(std::path::Path::new(&shots).join(page)).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "{page}");
    }
    gw.stop().await;
}

/// Which stored tokens a config takes is one rule for requests and for the sessions the sweep
/// keeps: with issued tokens turned off, the authorization server's tokens and their sessions
/// carry on (an issued token's session ends); with the authorization server turned off, its
/// tokens' sessions end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_kind_of_stored_token_lives_and_ends_with_its_own_switch() {
    let mut gw = gateway().demo("a", &[], "").top(&top("")).start().await;
    let mcp = gw.mcp();
    let store = portcullis::store::SqliteStore::open(&gw.audit.with_file_name("tokens.db")).unwrap();
    let (_, issued) = store
        .create(
            &portcullis::store::NewToken { name: "carol".into(), ..Default::default() },
            portcullis::store::now_ms(),
        )
        .unwrap();
    let (_, client) = register(&gw, "Client", CALLBACK).await;
    let client_id = client["client_id"].as_str().unwrap().to_owned();
    let mut flow = start(&gw, &client_id, CALLBACK, &mcp).await;
    let code = flow.approve(&gw, ALICE).await;
    let (_, tokens) = exchange(&gw, &client_id, &code, &flow.verifier).await;
    let oauth = Client::connect_as(&mcp, tokens["access_token"].as_str().unwrap()).await;
    let mut oauth_stream = oauth.get_stream().await;
    let carol = Client::connect_as(&mcp, &issued).await;
    let mut carol_stream = carol.get_stream().await;

    // Issued tokens off (a reload sweeps before it returns): carol's session ends, the OAuth
    // client's carries on.
    let top_issued_off = top("").replacen("auth:\n", "auth:\n  issued_tokens: false\n", 1);
    gw.reload_top(&top_issued_off).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), carol_stream.ended())
        .await
        .expect("carol's session lived on");
    assert_eq!(oauth.call_text("a__echo", json!({"text": "still"})).await, "still");
    // The authorization server off: its sessions end too.
    gw.reload_top(&format!("auth:\n  tokens:\n    alice: {{token: {ALICE}, servers: [a]}}\n")).await;
    tokio::time::timeout(std::time::Duration::from_secs(10), oauth_stream.ended())
        .await
        .expect("the OAuth client's session outlived its server");
    gw.stop().await;
}
