//! Portcullis behind a real OpenID provider: `oidc-provider` (npm, pinned in tests/deps) on
//! 127.0.0.1 issues access tokens through its real grants (client credentials; authorization
//! code with PKCE, its sign-in and consent pages driven over HTTP), and the official Python
//! SDK's OAuth client finds everything from Portcullis' first 401.

use std::collections::BTreeMap;
use std::process::Stdio;

use base64::Engine;
use serde_json::{Value, json};
use sha2::Digest;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::external::{fixture, node, node_module, python};
use crate::support::*;

/// The provider's process (it ends when its stdin closes: when this is dropped) and issuer.
pub(crate) struct Idp {
    pub(crate) issuer: String,
    _child: Child,
    _stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

/// The redirect URI of the provider's public client `app` (nothing listens there: the flow
/// stops at the redirect and reads the code off it).
const CALLBACK: &str = "http://127.0.0.1:9/callback";

/// Starts the provider with the resource scopes `scopes`; a person's tokens carry `group`.
pub(crate) async fn idp(scopes: &str, group: Option<&str>) -> Idp {
    idp_with(scopes, group, "").await
}

/// The provider, with `login_scopes` granted to sign-ins (for a relying party).
pub(crate) async fn idp_with(scopes: &str, group: Option<&str>, login_scopes: &str) -> Idp {
    idp_env(scopes, group, login_scopes, &[]).await
}

/// The provider with more of its settings (`IDP_ACCESS_TTL`, …).
pub(crate) async fn idp_env(scopes: &str, group: Option<&str>, login_scopes: &str, env: &[(&str, &str)]) -> Idp {
    let mut cmd = Command::new(node());
    cmd.envs(env.iter().copied());
    cmd.arg(fixture("idp.mjs"))
        .arg(node_module("oidc-provider/lib/index.js"))
        .env("IDP_SCOPES", scopes)
        .env("IDP_LOGIN_SCOPES", login_scopes)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(g) = group {
        cmd.env("IDP_GROUP", g);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(std::time::Duration::from_secs(30), lines.next_line())
        .await
        .expect("the provider did not start")
        .unwrap()
        .expect("the provider ended before it listened");
    let issuer = serde_json::from_str::<Value>(&first).unwrap()["issuer"].as_str().unwrap().to_owned();
    Idp { issuer, _child: child, _stdout: lines }
}

pub(crate) fn form(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(k, v)| format!("{k}={}", urlencoding(v))).collect::<Vec<_>>().join("&")
}

fn urlencoding(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A query parameter of a URL.
pub(crate) fn param(url: &str, name: &str) -> Option<String> {
    reqwest::Url::parse(url).ok()?.query_pairs().find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// A browser's part, as small as the provider's pages need: cookies kept by name, redirects
/// followed by hand so the last one (to the client's redirect URI) is read, not followed.
pub(crate) struct Browser {
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    pub(crate) fn new() -> Self {
        let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
        Browser { http, cookies: BTreeMap::new() }
    }

    /// GET (or POST `body`) `url`; returns the status and the `Location` it names, if any.
    pub(crate) async fn go(&mut self, url: &str, body: Option<String>) -> (u16, Option<String>, String) {
        let mut req = match &body {
            Some(b) => self.http.post(url).header("content-type", "application/x-www-form-urlencoded").body(b.clone()),
            None => self.http.get(url),
        };
        if !self.cookies.is_empty() {
            let jar: Vec<String> = self.cookies.iter().map(|(k, v)| format!("{k}={v}")).collect();
            req = req.header("cookie", jar.join("; "));
        }
        let r = req.send().await.unwrap();
        for c in r.headers().get_all("set-cookie") {
            let pair = c.to_str().unwrap().split(';').next().unwrap();
            let (name, value) = pair.split_once('=').unwrap();
            if value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        let status = r.status().as_u16();
        let location = r.headers().get("location").map(|v| v.to_str().unwrap().to_owned());
        (status, location, r.text().await.unwrap_or_default())
    }
}

impl Idp {
    /// Registers a confidential client (RFC 7591) with `redirect_uri`: its id and secret.
    pub(crate) async fn register_confidential(&self, redirect_uri: &str) -> (String, String) {
        let body = json!({
            "redirect_uris": [redirect_uri],
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
        });
        let r = reqwest::Client::new()
            .post(format!("{}/reg", self.issuer))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        let id = v["client_id"].as_str().unwrap_or_else(|| panic!("not registered: {v}")).to_owned();
        (id, v["client_secret"].as_str().unwrap().to_owned())
    }

    /// Follows `url` through the provider's sign-in (as `login`) and consent pages until a
    /// redirect that starts with `until`: that redirect.
    pub(crate) async fn through(&self, browser: &mut Browser, url: &str, login: &str, until: &str) -> String {
        let mut next = url.to_owned();
        let mut body = None;
        for _ in 0..12 {
            let (status, location, page) = browser.go(&next, body.take()).await;
            match location {
                Some(l) if l.starts_with(until) => return l,
                Some(l) => next = if l.starts_with('/') { format!("{}{l}", self.issuer) } else { l },
                None => {
                    assert_eq!(status, 200, "{page}");
                    let prompt = if page.contains(r#"name="login""#) { "login" } else { "consent" };
                    body = Some(form(&[("prompt", prompt), ("login", login), ("password", "any")]));
                }
            }
        }
        panic!("the provider's pages did not lead to {until}");
    }

    /// An access token for `resource` by the client credentials grant of client `svc`.
    pub(crate) async fn client_credentials(&self, scope: &str, resource: &str) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/token", self.issuer))
            .basic_auth("svc", Some("svc-secret"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[("grant_type", "client_credentials"), ("scope", scope), ("resource", resource)]))
            .send()
            .await
            .unwrap();
        let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        body["access_token"].as_str().unwrap_or_else(|| panic!("no token: {body}")).to_owned()
    }

    /// An access token for `resource` by the authorization code grant with PKCE (S256) of the
    /// public client `app`: `login` signs in on the provider's page and consents on the next.
    pub(crate) async fn authorization_code(&self, login: &str, scope: &str, resource: &str) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let verifier = b64(&rand_bytes());
        let challenge = b64(&sha2::Sha256::digest(verifier.as_bytes()));
        let state = b64(&rand_bytes());
        let query = form(&[
            ("response_type", "code"),
            ("client_id", "app"),
            ("redirect_uri", CALLBACK),
            ("scope", scope),
            ("state", &state),
            ("code_challenge", &challenge),
            ("code_challenge_method", "S256"),
            ("resource", resource),
        ]);
        let mut browser = Browser::new();
        let mut next = format!("{}/auth?{query}", self.issuer);
        let mut body = None;
        // Sign-in page, consent page, each answered once; every other step is a redirect.
        for _ in 0..10 {
            let (status, location, page) = browser.go(&next, body.take()).await;
            match location {
                Some(l) if l.starts_with(CALLBACK) => {
                    assert_eq!(param(&l, "state").as_deref(), Some(state.as_str()));
                    assert_eq!(param(&l, "iss").as_deref(), Some(self.issuer.as_str()), "RFC 9207");
                    let code = param(&l, "code").unwrap_or_else(|| panic!("no code: {l}"));
                    return self.exchange(&code, &verifier, resource).await;
                }
                Some(l) => next = if l.starts_with('/') { format!("{}{l}", self.issuer) } else { l },
                None => {
                    assert_eq!(status, 200, "{page}");
                    let prompt = if page.contains(r#"name="login""#) { "login" } else { "consent" };
                    body = Some(form(&[("prompt", prompt), ("login", login), ("password", "any")]));
                }
            }
        }
        panic!("the authorization flow did not end");
    }

    async fn exchange(&self, code: &str, verifier: &str, resource: &str) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/token", self.issuer))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(&[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", CALLBACK),
                ("client_id", "app"),
                ("code_verifier", verifier),
                ("resource", resource),
            ]))
            .send()
            .await
            .unwrap();
        let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        body["access_token"].as_str().unwrap_or_else(|| panic!("no token: {body}")).to_owned()
    }
}

pub(crate) fn rand_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    b
}

/// The gateway's configuration for the provider: `a:all` reaches server a, `b:echo` b's echo.
fn config(idp: &Idp) -> String {
    format!(
        "oauth:\n  issuers:\n    - issuer: {:?}\n      identity_claim: email\n      require_at_jwt: true\n      scopes:\n        a:all: {{servers: [a]}}\n        b:echo: {{servers: [b], tools: [b__echo]}}\n",
        idp.issuer
    )
}

/// An `initialize` POST with a bearer token: (status, WWW-Authenticate).
async fn init(url: &str, token: &str) -> (u16, String) {
    let r = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .header("authorization", format!("Bearer {token}"))
        .body(crate::failclosed::INIT)
        .send()
        .await
        .unwrap();
    let challenge = r.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (r.status().as_u16(), challenge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_a_real_provider_through_its_real_grants() {
    let idp = idp("a:all b:echo", None).await;
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&config(&idp)).start().await;
    let (mcp, on_b) = (gw.mcp(), gw.server("b"));

    // A service by client credentials, for the aggregated endpoint: a's tools, named `svc`
    // (its token has no email: the identity falls back to the subject).
    let svc = idp.client_credentials("a:all", &mcp).await;
    let client = Client::connect_as(&mcp, &svc).await;
    let tools = client.all_tools().await;
    assert!(!tools.is_empty() && tools.iter().all(|t| t.starts_with("a__")), "{tools:?}");
    assert_eq!(client.call_text("a__echo", json!({"text": "from a service"})).await, "from a service");

    // A person by authorization code with PKCE, for b's endpoint: b's echo and nothing else.
    let alice = idp.authorization_code("alice", "b:echo", &on_b).await;
    let person = Client::connect_as(&on_b, &alice).await;
    assert_eq!(person.all_tools().await, ["echo"]);
    assert_eq!(person.call_text("echo", json!({"text": "from a person"})).await, "from a person");
    let records = gw.audit_until(|r| r.iter().filter(|r| r["method"] == "tools/call").count() == 2).await;
    let who: Vec<&str> =
        records.iter().filter(|r| r["method"] == "tools/call").map(|r| r["identity"].as_str().unwrap()).collect();
    assert_eq!(who, ["svc", "alice@example.com"]);

    // Each token is for its own resource only.
    let (status, challenge) = init(&mcp, &alice).await;
    assert_eq!(status, 401);
    assert!(challenge.contains(r#"error="invalid_token""#), "{challenge}");
    assert_eq!(init(&on_b, &svc).await.0, 401);
    // A token of the provider for a resource that is not this gateway's.
    let elsewhere = idp.client_credentials("a:all", "http://127.0.0.1:9/mcp").await;
    assert_eq!(init(&mcp, &elsewhere).await.0, 401);
    // The service's session is its own: another subject's token for the same endpoint gets
    // 404, as for an unknown session.
    let bob = idp.authorization_code("bob", "a:all", &mcp).await;
    assert_eq!(init(&mcp, &bob).await.0, 200);
    let mut stolen = client.clone();
    stolen.headers = vec![("authorization".into(), format!("Bearer {bob}"))];
    assert_eq!(stolen.post(json!({"jsonrpc":"2.0","id":9,"method":"tools/list"})).await.status(), 404);
    gw.stop().await;
}

/// Runs the Python SDK's OAuth client fixture against `url` (calling `tool`): what it saw.
pub(crate) async fn sdk_oauth(url: &str, tool: &str, env: &[(&str, &str)]) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(fixture("sdk_oauth.py")).arg(url).arg(tool).envs(env.iter().copied()).kill_on_drop(true);
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), cmd.output())
        .await
        .expect("the SDK client hung")
        .unwrap();
    assert!(out.status.success(), "SDK OAuth client failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_s_oauth_client_discovers_everything_from_the_first_401() {
    let idp = idp("a:all b:echo", None).await;
    let gw = gateway().demo("a", &[], "").demo("b", &[], "").top(&config(&idp)).start().await;
    let seen = sdk_oauth(&gw.mcp(), "a__echo", &[]).await;
    // It registered itself (RFC 7591), signed in as `sdk-user` and asked for the scopes the
    // challenge named, for the resource the metadata named.
    assert_eq!(seen["echo"], json!(["hello through oauth"]), "{seen}");
    assert_eq!(seen["resource"], gw.mcp());
    assert_eq!(seen["scope"], "a:all b:echo");
    let tools = seen["tools"].as_array().unwrap();
    assert!(tools.contains(&json!("a__echo")) && tools.contains(&json!("b__echo")), "{tools:?}");
    let records = gw.audit_until(|r| r.iter().any(|r| r["method"] == "tools/call")).await;
    let call = records.iter().find(|r| r["method"] == "tools/call").unwrap();
    assert_eq!(call["identity"], "sdk-user@example.com");
    gw.stop().await;
}

/// A remote server that wants OAuth (here a Portcullis that takes the provider's tokens):
/// Portcullis finds the token endpoint from the server's protected resource metadata and the
/// provider's metadata, gets a token of its own by the client credentials grant, and calls
/// through it as `svc`. The client's own token never goes upstream; a wrong client secret is
/// a clear error that shows no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_server_that_wants_oauth_gets_portcullis_own_token() {
    let idp = idp("up:all", None).await;
    let upstream = gateway()
        .demo("d", &[], "")
        .top(&format!("oauth:\n  issuers:\n    - issuer: {:?}\n      scopes:\n        up:all: {{}}\n", idp.issuer))
        .start()
        .await;
    let grant = |secret: &str| {
        format!("oauth: {{grant: client_credentials, client_id: svc, client_secret: {secret:?}, scope: \"up:all\"}}")
    };
    let front_token = "front-user-token-0123456789abc";
    let front = gateway()
        .remote("up", &upstream.mcp(), &grant("svc-secret"))
        .remote("bad", &upstream.mcp(), &grant("not-the-secret-42"))
        // No scope configured: the scopes the server's challenge names are asked for.
        .remote("implicit", &upstream.mcp(), &grant("svc-secret").replace(", scope: \"up:all\"", ""))
        .top(&format!("auth:\n  tokens:\n    user: {{token: {front_token}, role: admin}}\n"))
        .start()
        .await;
    let client = Client::connect_as(&front.mcp(), front_token).await;
    assert_eq!(client.call_text("up__d__echo", json!({"text": "as svc"})).await, "as svc");
    assert_eq!(client.call_text("implicit__d__echo", json!({"text": "scoped"})).await, "scoped");
    let records = upstream.audit_until(|r| r.iter().filter(|r| r["method"] == "tools/call").count() == 2).await;
    let call = records.iter().find(|r| r["method"] == "tools/call").unwrap();
    // Every request the server saw carried Portcullis' token (the client's would be refused),
    // but the discovery's: a GET without any credential, for the challenge (RFC 9728 §5.1).
    assert_eq!(call["identity"], "svc", "{call}");
    let discovery = |r: &Value| r["method"] == "GET" && r["outcome"] == "refused: missing credential";
    assert!(records.iter().any(discovery), "{records:?}");
    assert!(records.iter().all(|r| r["identity"] == "svc" || discovery(r)), "{records:?}");

    // The wrong secret: the server is down with the provider's answer, and calls say so.
    let a = client.call("bad__d__echo", json!({"text": "x"})).await;
    assert!(a.response["error"].is_object(), "{}", a.response);
    let (_, servers) =
        http_json(reqwest::Method::GET, &format!("{}/servers", front.url), Some(front_token), None).await;
    let of = |name: &str| servers["servers"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap().clone();
    let bad = of("bad").to_string();
    assert!(bad.contains("invalid_client") && !bad.contains("not-the-secret-42"), "{bad}");
    assert_eq!(of("bad")["oauth"]["token"], "none", "{bad}");
    assert_eq!(of("implicit")["oauth"]["scope"], "up:all");
    let good = of("up");
    assert_eq!(
        (&good["oauth"]["grant"], &good["oauth"]["token"], &good["oauth"]["scope"], &good["oauth"]["last_error"]),
        (&json!("client_credentials"), &json!("valid"), &json!("up:all"), &Value::Null),
        "{good}"
    );
    front.stop().await;
    upstream.stop().await;
}

/// Token exchange (RFC 8693): the caller's access token from the provider is exchanged there
/// for one audienced to the remote server, on the caller's behalf; the server sees the caller,
/// never the caller's own token; an identity the provider did not vouch for gets a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_s_token_is_exchanged_for_one_of_the_server_s_own() {
    let idp = idp("mcp:tools front:use", None).await;
    let upstream = gateway()
        .demo("d", &[], "")
        .top(&format!("oauth:\n  issuers:\n    - issuer: {:?}\n      scopes:\n        mcp:tools: {{}}\n", idp.issuer))
        .start()
        .await;
    let local = "local-static-token-0123456789abc";
    let front = gateway()
        .remote("up", &upstream.mcp(), "oauth: {grant: token_exchange, client_id: xchg, client_secret: xchg-secret}")
        .top(&format!(
            "auth:\n  tokens:\n    local: {local}\noauth:\n  issuers:\n    - issuer: {:?}\n      scopes:\n        front:use: {{}}\n",
            idp.issuer
        ))
        .start()
        .await;
    let token = idp.authorization_code("pat", "front:use", &front.mcp()).await;
    let client = Client::connect_as(&front.mcp(), &token).await;
    assert_eq!(client.call_text("up__d__echo", json!({"text": "exchanged"})).await, "exchanged");
    let records = upstream.audit_until(|r| r.iter().any(|r| r["method"] == "tools/call")).await;
    let call = records.iter().find(|r| r["method"] == "tools/call").unwrap();
    assert_eq!(call["identity"], "pat", "{call}");
    // Nothing but the exchanged token (and the discovery's bare GET) reached the server: the
    // caller's own token, audienced to the front, would have been refused there.
    let discovery = |r: &Value| r["method"] == "GET" && r["outcome"] == "refused: missing credential";
    assert!(records.iter().all(|r| r["identity"] == "pat" || discovery(r)), "{records:?}");
    // A caller with a static token has nothing to exchange.
    let other = Client::connect_as(&front.mcp(), local).await;
    let a = other.call("up__d__echo", json!({"text": "x"})).await;
    assert!(a.response["error"]["message"].as_str().is_some_and(|m| m.contains("identity provider")), "{}", a.response);
    front.stop().await;
    upstream.stop().await;
}
