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

pub(crate) const ALICE: &str = "alice-login-token-0123456789abc";
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
    start_with(gw, client_id, redirect, resource, &[]).await
}

/// [`start`] with more parameters.
async fn start_with(gw: &TestGateway, client_id: &str, redirect: &str, resource: &str, more: &[(&str, &str)]) -> Flow {
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let verifier = b64(&rand_bytes());
    let state = b64(&rand_bytes());
    let challenge = b64(&sha2::Sha256::digest(verifier.as_bytes()));
    let mut fields = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect),
        ("state", &state),
        ("code_challenge", &challenge),
        ("code_challenge_method", "S256"),
        ("resource", resource),
    ];
    fields.extend_from_slice(more);
    let query = form(&fields);
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

    /// Signs in as `token` and approves (unless this person consented to this client and
    /// resource before: then the sign-in alone sends them back): the code from the redirect.
    async fn approve(&mut self, gw: &TestGateway, token: &str) -> String {
        let (status, location, page) = self.post(gw, &[("action", "login"), ("token", token)]).await;
        let location = if status == 302 {
            location
        } else {
            assert_eq!(status, 200, "{page}");
            self.approve_page(gw).await
        };
        self.code_from(gw, location)
    }

    /// Approves on the consent page: where it sends the person.
    async fn approve_page(&mut self, gw: &TestGateway) -> Option<String> {
        let (status, location, _) = self.post(gw, &[("action", "approve")]).await;
        assert_eq!(status, 302);
        location
    }

    /// The code of a redirect to the client, its `state` and `iss` checked.
    fn code_from(&self, gw: &TestGateway, location: Option<String>) -> String {
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

    // The client's name, and the scopes it names, are shown escaped.
    let mut flow = start_with(&gw, &client_id, CALLBACK, &mcp, &[("scope", "files:read <img src=x>")]).await;
    let (_, _, consent) = flow.post(&gw, &[("action", "login"), ("token", ALICE)]).await;
    assert!(consent.contains("&lt;script&gt;alert(1)&lt;/script&gt;") && !consent.contains("<script>"), "{consent}");
    assert!(consent.contains("files:read &lt;img src=x&gt;") && !consent.contains("<img"), "{consent}");
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
    let store =
        portcullis::store::Store::open(&portcullis::store::StoreLocation::File(gw.audit.with_file_name("tokens.db")))
            .unwrap();
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

/// What `sdk_oauth.py` needs to sign in through a real browser: headless Chromium (Debian's,
/// driven by playwright-core) opens the authorization URL the SDK gives it, signs in with a
/// token and approves; the pages it saw are saved as screenshots in `shots`.
pub(crate) fn browser_env(shots: &str) -> Vec<(&'static str, String)> {
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "Debian's chromium is needed (./scripts/test installs it)"
    );
    vec![
        ("PORTCULLIS_LOGIN_TOKEN", ALICE.to_owned()),
        ("PORTCULLIS_BROWSER_LOGIN", crate::external::fixture("browser_login.mjs")),
        ("PORTCULLIS_PLAYWRIGHT", crate::external::node_module("playwright-core/index.mjs")),
        ("PORTCULLIS_NODE", crate::external::node().display().to_string()),
        ("PORTCULLIS_SCREENSHOTS", shots.to_owned()),
        ("PORTCULLIS_CALLBACK", BROWSER_CALLBACK.to_owned()),
        ("PORTCULLIS_REFRESH", "1".to_owned()),
    ]
}

/// Where the browser's sign-ins are sent back to (the browser reads the request; nothing
/// listens).
const BROWSER_CALLBACK: &str = "http://127.0.0.1:8976/callback";

/// What the SDK saw after it signed in, called, refreshed, called again in the same session,
/// revoked its refresh token (RFC 7009) and called once more.
pub(crate) fn assert_refreshed_then_refused(seen: &Value) {
    assert_eq!(seen["echo"], json!(["hello through oauth"]), "{seen}");
    assert_eq!(seen["refreshed"], true, "{seen}");
    assert_eq!(seen["echo_after_refresh"], json!(["after refresh"]), "{seen}");
    assert_eq!((seen["revoked"].clone(), seen["after_revoke"].clone()), (json!(200), json!("refused")), "{seen}");
}

/// The Python SDK registers itself (RFC 7591) and a real browser signs in: the pages it saw
/// are the documentation's screenshots (`PORTCULLIS_SCREENSHOTS` names where; docs/img holds
/// the ones in the documentation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_signs_in_through_a_real_browser() {
    let gw = gateway().demo("a", &[], "").top(&top("")).start().await;
    let dir = TempDir::new();
    let shots = std::env::var("PORTCULLIS_SCREENSHOTS").unwrap_or_else(|_| dir.0.display().to_string());
    let env = browser_env(&shots);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let seen = crate::idp::sdk_oauth(&gw.mcp(), "a__echo", &env).await;
    assert!(seen["client_id"].as_str().is_some_and(|c| !c.starts_with("https://")), "registered: {seen}");
    assert_refreshed_then_refused(&seen);
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
    let store =
        portcullis::store::Store::open(&portcullis::store::StoreLocation::File(gw.audit.with_file_name("tokens.db")))
            .unwrap();
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

/// A small HTTPS server on 127.0.0.1 for client metadata documents, with the test CA's
/// certificate for 127.0.0.1 and localhost: path → (body, `Cache-Control`); counts requests per
/// path. (Handwritten: one request per connection is all a document fetch needs.)
struct Documents {
    port: u16,
    docs: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (String, String)>>>,
    hits: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Documents {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Documents {
    async fn start(dir: &std::path::Path) -> Documents {
        use rustls::pki_types::pem::PemObject;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(dir.join("server1.pem"))
            .unwrap()
            .map(|c| c.unwrap())
            .collect();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(dir.join("server1.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let docs: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, (String, String)>>> =
            Default::default();
        let hits: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>> = Default::default();
        let (d, h) = (docs.clone(), hits.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, d, h) = (acceptor.clone(), d.clone(), h.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
                    *h.lock().unwrap().entry(path.clone()).or_default() += 1;
                    let found = d.lock().unwrap().get(&path).cloned();
                    let response = match found {
                        Some((body, cache)) => format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncache-control: {cache}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        None => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into(),
                    };
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Documents { port, docs, hits, task }
    }

    /// Serves `body` at `path`; the document's URL (on 127.0.0.1).
    fn serve(&self, path: &str, body: &str, cache: &str) -> String {
        self.docs.lock().unwrap().insert(path.to_owned(), (body.to_owned(), cache.to_owned()));
        self.url(path)
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits.lock().unwrap().get(path).copied().unwrap_or(0)
    }
}

/// A client's metadata document: its own URL as `client_id`.
fn document(url: &str, name: &str, redirect: &str) -> String {
    json!({"client_id": url, "client_name": name, "redirect_uris": [redirect], "token_endpoint_auth_method": "none"})
        .to_string()
}

/// The authorization server accepting documents from loopback, trusting the test CA.
fn documents_top(ca: &std::path::Path) -> String {
    top(&format!("client_metadata_documents: {{allow_private_addresses: true, ca: {:?}}}", ca.display().to_string()))
}

/// `GET /authorize` for a client: the status and the page (or where it redirects).
async fn authorize_status(gw: &TestGateway, client_id: &str, redirect: &str) -> (u16, Option<String>, String) {
    let query = form(&[
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect),
        ("code_challenge", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"),
        ("code_challenge_method", "S256"),
    ]);
    Browser::new().go(&format!("{}/authorize?{query}", gw.url), None).await
}

/// The Python SDK identifies itself by a Client ID Metadata Document that the test serves on
/// loopback (no registration: it is turned off), and a real browser signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_identifies_itself_by_a_metadata_document() {
    let dir = TempDir::new();
    crate::tls::pki(&dir.0);
    let docs = Documents::start(&dir.0).await;
    let path = "/sdk/client.json";
    let url = docs.serve(path, &document(&docs.url(path), "SDK by document", BROWSER_CALLBACK), "max-age=300");
    let top = documents_top(&dir.0.join("ca.pem")).replace("{client_metadata", "{registration: false, client_metadata");
    let gw = gateway().demo("a", &[], "").top(&top).start().await;
    let (_, asm) =
        http_json(reqwest::Method::GET, &format!("{}/.well-known/oauth-authorization-server", gw.url), None, None)
            .await;
    assert_eq!(asm["client_id_metadata_document_supported"], true, "{asm}");
    let shots = TempDir::new();
    let mut env = browser_env(&shots.0.display().to_string());
    env.push(("PORTCULLIS_CLIENT_METADATA_URL", url.clone()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let seen = crate::idp::sdk_oauth(&gw.mcp(), "a__echo", &env).await;
    assert_eq!(seen["client_id"], json!(url), "{seen}");
    assert_refreshed_then_refused(&seen);
    assert_eq!(docs.hits(path), 1, "fetched once, then cached by its max-age");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_documents_are_fetched_strictly() {
    let dir = TempDir::new();
    crate::tls::pki(&dir.0);
    let docs = Documents::start(&dir.0).await;
    let good = docs.serve("/good.json", &document(&docs.url("/good.json"), "Good <b>App</b>", CALLBACK), "no-store");
    let liar = docs.serve("/liar.json", &document("https://claude.ai/oauth/client.json", "Liar", CALLBACK), "");
    let big = format!(
        r#"{{"client_id":"{}","client_name":"{}","redirect_uris":["{CALLBACK}"]}}"#,
        docs.url("/big.json"),
        "x".repeat(6000)
    );
    let big = docs.serve("/big.json", &big, "");
    let secret = docs.serve(
        "/secret.json",
        &json!({"client_id": docs.url("/secret.json"), "client_secret": "s", "redirect_uris": [CALLBACK]}).to_string(),
        "",
    );
    let mut gw = gateway().demo("a", &[], "").top(&documents_top(&dir.0.join("ca.pem"))).start().await;
    // A good document: the sign-in page; the consent page names it, escaped, and its URL.
    let mut flow = start(&gw, &good, CALLBACK, &gw.mcp()).await;
    let (status, _, consent) = flow.post(&gw, &[("action", "login"), ("token", ALICE)]).await;
    assert_eq!(status, 200, "{consent}");
    assert!(consent.contains("Good &lt;b&gt;App&lt;/b&gt;") && consent.contains(&good), "{consent}");
    let location = flow.approve_page(&gw).await;
    let code = flow.code_from(&gw, location);
    let (status, tokens) = exchange(&gw, &good, &code, &flow.verifier).await;
    assert_eq!(status, 200, "{tokens}");
    assert_eq!(status_of(&gw.mcp(), tokens["access_token"].as_str().unwrap()).await, 200);
    // `no-store`: fetched again for the next authorization.
    let before = docs.hits("/good.json");
    assert_eq!(authorize_status(&gw, &good, CALLBACK).await.0, 200);
    assert_eq!(docs.hits("/good.json"), before + 1);
    // Each refusal is an error page, never a redirect.
    for (client_id, redirect, says) in [
        (good.as_str(), "http://127.0.0.1:9/callbacK", "not one it registered"),
        (liar.as_str(), CALLBACK, "not its URL"),
        (big.as_str(), CALLBACK, "larger than"),
        (secret.as_str(), CALLBACK, "secret"),
        (&docs.url("/absent.json"), CALLBACK, "status 404"),
        (&format!("https://127.0.0.1:{}/./good.json", docs.port), CALLBACK, "canonical"),
        (&format!("https://127.0.0.1:{}/", docs.port), CALLBACK, "with a path"),
    ] {
        let (status, location, page) = authorize_status(&gw, client_id, redirect).await;
        assert_eq!((status, location), (400, None), "{client_id}: {page}");
        assert!(page.contains(says), "{client_id}: {page}");
    }
    // A document cached while private addresses were allowed is not kept past a reload that
    // forbids them.
    let cached = docs.serve("/cached.json", &document(&docs.url("/cached.json"), "Cached", CALLBACK), "max-age=300");
    assert_eq!(authorize_status(&gw, &cached, CALLBACK).await.0, 200);
    assert_eq!(authorize_status(&gw, &cached, CALLBACK).await.0, 200);
    assert_eq!(docs.hits("/cached.json"), 1, "cached by its max-age");
    let ca_only = top(&format!("client_metadata_documents: {{ca: {:?}}}", dir.0.join("ca.pem").display().to_string()));
    gw.reload_top(&ca_only).await;
    let (status, _, page) = authorize_status(&gw, &cached, CALLBACK).await;
    assert!(status == 400 && page.contains("private"), "{page}");
    gw.stop().await;

    // Without allow_private_addresses: a document on loopback is never fetched, by address or
    // by a name that resolves there.
    let gw = gateway().demo("a", &[], "").top(&ca_only).start().await;
    let before = docs.hits("/good.json");
    let by_name = good.replace("127.0.0.1", "localhost");
    docs.serve("/good.json", &document(&by_name, "Good", CALLBACK), "no-store");
    for client_id in [good.as_str(), by_name.as_str()] {
        let (status, _, page) = authorize_status(&gw, client_id, CALLBACK).await;
        assert!(status == 400 && page.contains("private, loopback or link-local"), "{client_id}: {page}");
    }
    assert_eq!(docs.hits("/good.json"), before, "nothing was fetched");
    gw.stop().await;

    // Turned off: not advertised, and a URL client id is refused.
    let gw = gateway().demo("a", &[], "").top(&top("client_metadata_documents: {enabled: false}")).start().await;
    let (_, asm) =
        http_json(reqwest::Method::GET, &format!("{}/.well-known/oauth-authorization-server", gw.url), None, None)
            .await;
    assert_eq!(asm["client_id_metadata_document_supported"], false);
    let (status, _, page) = authorize_status(&gw, &good, CALLBACK).await;
    assert!(status == 400 && page.contains("does not accept client metadata documents"), "{page}");
    gw.stop().await;
}

/// A client registered in the config; consent remembered per person, client and resource,
/// listed, and withdrawn (which ends what the client got); a client registered by RFC 7591 is
/// asked about on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consents_are_remembered_listed_and_withdrawn() {
    let gw = gateway()
        .demo("a", &[], "")
        .env("PORTCULLIS_TOKEN", ALICE_ADMIN)
        .top(&top("clients: {my-app: {name: My App, redirect_uris: ['http://127.0.0.1/callback']}}"))
        .start()
        .await;
    let mcp = gw.mcp();
    // Any port of a loopback redirect URI (RFC 8252): the registered one has none.
    let mut flow = start(&gw, "my-app", CALLBACK, &mcp).await;
    let (status, _, consent) = flow.post(&gw, &[("action", "login"), ("token", ALICE)]).await;
    assert!(status == 200 && consent.contains("My App"), "{consent}");
    let location = flow.approve_page(&gw).await;
    let code = flow.code_from(&gw, location);
    let (_, tokens) = exchange(&gw, "my-app", &code, &flow.verifier).await;
    let session = Client::connect_as(&mcp, tokens["access_token"].as_str().unwrap()).await;
    let mut stream = session.get_stream().await;
    // The same person, client and resource again: the sign-in alone sends them back.
    let mut again = start(&gw, "my-app", CALLBACK, &mcp).await;
    let (status, location, _) = again.post(&gw, &[("action", "login"), ("token", ALICE)]).await;
    assert_eq!(status, 302, "consent remembered");
    let code = again.code_from(&gw, location);
    assert_eq!(exchange(&gw, "my-app", &code, &again.verifier).await.0, 200);
    // Another resource, or another (dynamically registered) client: asked again.
    let mut other = start(&gw, "my-app", CALLBACK, &gw.server("a")).await;
    assert_eq!(other.post(&gw, &[("action", "login"), ("token", ALICE)]).await.0, 200);
    let (_, registered) = register(&gw, "My App", CALLBACK).await;
    let mut dcr = start(&gw, registered["client_id"].as_str().unwrap(), CALLBACK, &mcp).await;
    assert_eq!(dcr.post(&gw, &[("action", "login"), ("token", ALICE)]).await.0, 200);

    // Listed for the administrator (and by the CLI).
    let (status, listed) =
        http_json(reqwest::Method::GET, &format!("{}/admin/consents", gw.url), Some(ALICE_ADMIN), None).await;
    let consents = listed["consents"].as_array().cloned().unwrap_or_default();
    assert_eq!((status, consents.len()), (200, 1), "{listed}");
    let c = &consents[0];
    assert_eq!(
        (c["name"].as_str(), c["client_id"].as_str(), c["resource"].as_str()),
        (Some("alice"), Some("my-app"), Some(mcp.as_str()))
    );
    let id = c["id"].as_str().unwrap().to_owned();
    let cfg = gw.audit.with_file_name("cli.yaml");
    std::fs::write(&cfg, format!("store:\n  path: {:?}\n", gw.audit.with_file_name("tokens.db").display().to_string()))
        .unwrap();
    let (ok, out, err) = run_cli(None, &["token", "consents", "--config", cfg.to_str().unwrap()], &[]).await;
    assert!(ok && out.contains(&id) && out.contains("My App"), "{out}{err}");
    assert_eq!(
        http_json(reqwest::Method::GET, &format!("{}/admin/consents", gw.url), Some(ALICE), None).await.0,
        403,
        "not for a user"
    );

    // Withdrawn: the client's session ends, its refresh token is dead, the person is asked again.
    let (status, _) =
        http_json(reqwest::Method::DELETE, &format!("{}/admin/consents/{id}", gw.url), Some(ALICE_ADMIN), None).await;
    assert_eq!(status, 200);
    tokio::time::timeout(std::time::Duration::from_secs(10), stream.ended())
        .await
        .expect("the session outlived the consent");
    assert_eq!(refresh(&gw, "my-app", tokens["refresh_token"].as_str().unwrap()).await.0, 400);
    let mut asked = start(&gw, "my-app", CALLBACK, &mcp).await;
    assert_eq!(asked.post(&gw, &[("action", "login"), ("token", ALICE)]).await.0, 200);
    assert_eq!(
        http_json(reqwest::Method::DELETE, &format!("{}/admin/consents/{id}", gw.url), Some(ALICE_ADMIN), None).await.0,
        404
    );
    gw.stop().await;
}

/// The login page's link to the provider, unescaped.
fn federate_link(page: &str) -> String {
    let at = page.find("href=\"/authorize/federate?").unwrap() + "href=\"".len();
    page[at..].split('"').next().unwrap().replace("&amp;", "&")
}

/// People sign in through a real OpenID provider (oidc-provider) instead of with a token:
/// Portcullis is its confidential client; the ID token's issuer entry says who they are (its
/// identity claim) and what they reach (the scopes granted); allowed domains are enforced; with
/// token sign-in off, the person goes to the provider at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn people_sign_in_through_the_operator_s_openid_provider() {
    let idp = crate::idp::idp_with("", None, "mcp").await;
    let issuer = format!(
        "oauth:\n  issuers:\n    - issuer: {:?}\n      identity_claim: email\n      scopes:\n        mcp: {{servers: [a]}}\n",
        idp.issuer
    );
    let as_top = |login: &str| {
        format!(
            "auth:\n  tokens:\n    alice: {{token: {ALICE}, servers: [a]}}\n{issuer}  authorization_server: {{{login}}}\n"
        )
    };
    let mut gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&as_top("")).start().await;
    let (rp_id, rp_secret) = idp.register_confidential(&format!("{}/authorize/callback", gw.url)).await;
    let provider = |extra: &str| {
        format!(
            "provider: {{issuer: {:?}, client_id: {rp_id}, client_secret: {rp_secret}, scopes: [openid, email, mcp]{extra}}}",
            idp.issuer
        )
    };
    gw.reload_top(&as_top(&format!("login: {{{}}}", provider(", allowed_domains: [Example.com]")))).await;
    let mcp = gw.mcp();
    let (_, client) = register(&gw, "Federated Client", CALLBACK).await;
    let client_id = client["client_id"].as_str().unwrap().to_owned();

    // The login page offers both ways; the link goes to the provider and back.
    let mut flow = start(&gw, &client_id, CALLBACK, &mcp).await;
    assert!(
        flow.page.contains("Sign in with your organization") && flow.page.contains("name=\"token\""),
        "{}",
        flow.page
    );
    let link = federate_link(&flow.page);
    let back = idp
        .through(&mut flow.browser, &format!("{}{link}", gw.url), "pat", &format!("{}/authorize/callback", gw.url))
        .await;
    let (status, _, consent) = flow.browser.go(&back, None).await;
    assert_eq!(status, 200, "{consent}");
    assert!(consent.contains("Signed in as <strong>pat@example.com</strong>"), "{consent}");
    flow.csrf = hidden(&consent, "csrf");
    let location = flow.approve_page(&gw).await;
    let code = flow.code_from(&gw, location);
    let (status, tokens) = exchange(&gw, &client_id, &code, &flow.verifier).await;
    assert_eq!(status, 200, "{tokens}");
    // What the scope `mcp` grants: server a, not b.
    let session = Client::connect_as(&mcp, tokens["access_token"].as_str().unwrap()).await;
    let tools = session.all_tools().await;
    assert!(!tools.is_empty() && tools.iter().all(|t| t.starts_with("a__")), "{tools:?}");
    assert_eq!(session.call_text("a__echo", json!({"text": "federated"})).await, "federated");
    assert_eq!(refresh(&gw, &client_id, tokens["refresh_token"].as_str().unwrap()).await.0, 200);
    // The callback replayed (its state is used up): refused.
    assert_eq!(flow.browser.go(&back, None).await.0, 400);

    // Someone from another domain is refused, and the client hears nothing.
    let mut flow = start(&gw, &client_id, CALLBACK, &mcp).await;
    let link = federate_link(&flow.page);
    let back = idp
        .through(
            &mut flow.browser,
            &format!("{}{link}", gw.url),
            "eve@evil.test",
            &format!("{}/authorize/callback", gw.url),
        )
        .await;
    let (status, location, page) = flow.browser.go(&back, None).await;
    assert!(status == 403 && location.is_none() && page.contains("not in a domain allowed"), "{page}");
    // A callback from another browser (no cookie of the sign-in): refused.
    let mut flow = start(&gw, &client_id, CALLBACK, &mcp).await;
    let link = federate_link(&flow.page);
    let back = idp
        .through(&mut flow.browser, &format!("{}{link}", gw.url), "pat", &format!("{}/authorize/callback", gw.url))
        .await;
    assert_eq!(Browser::new().go(&back, None).await.0, 403, "not the browser that started it");
    assert_eq!(flow.browser.go(&back, None).await.0, 400, "a state is taken once, even by a refused answer");

    // Token sign-in off: straight to the provider.
    gw.reload_top(&as_top(&format!("login: {{tokens: false, {}}}", provider("")))).await;
    let (status, location, _) = authorize_status(&gw, &client_id, CALLBACK).await;
    let l = location.unwrap_or_default();
    assert!(
        status == 302 && l.starts_with(&idp.issuer) && param(&l, "code_challenge_method").as_deref() == Some("S256"),
        "{l}"
    );
    assert_eq!(param(&l, "client_id"), Some(rp_id.clone()));
    gw.stop().await;
}
