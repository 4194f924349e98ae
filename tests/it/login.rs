//! A person's account at a remote server: `portcullis login SERVER` against a real OpenID
//! provider (oidc-provider), the browser step driven over HTTP; the gateway then reaches the
//! server as that person, refreshes the token before it expires, and stops at `logout`. The
//! tokens are in the store only sealed.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::idp::{Browser, idp_env};
use crate::support::*;

const KEY: &str = "a-vault-key-for-the-login-test-0123456789";

/// A port for the login's callback outside the ephemeral range (where every other test's
/// listeners are), free when chosen.
fn callback_port() -> u16 {
    (20_000..30_000)
        .map(|p| p + (std::process::id() % 5000) as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .unwrap()
}

/// Where the front gateway keeps its config for the CLI: its servers, and the store it uses.
fn cli_config(front: &TestGateway, yaml: &str) -> std::path::PathBuf {
    let path = front.audit.with_file_name("front.yaml");
    let store = front.audit.with_file_name("tokens.db");
    std::fs::write(&path, format!("{yaml}store:\n  path: {:?}\n", store.display().to_string())).unwrap();
    path
}

/// `up__d__echo` of `text`, once the server is reached (the gateway reads the vault at the
/// next store change and reconnects).
async fn echo_once_up(front: &TestGateway, client: &Client, text: &str) -> String {
    front
        .until(Duration::from_secs(15), || {
            let client = client.clone();
            async move {
                let a = client.call("up__d__echo", json!({"text": text})).await;
                a.response["result"]["content"][0]["text"].as_str().map(str::to_owned)
            }
        })
        .await
}

async fn servers(front: &TestGateway) -> Value {
    http_json(reqwest::Method::GET, &format!("{}/servers", front.url), None, None).await.1
}

fn oauth_of(servers: &Value, name: &str) -> Value {
    servers["servers"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["oauth"].clone()
}

/// Whether any file under `dir` holds something shaped like a JWT (`eyJ….eyJ…`) in clear.
fn clear_jwt_in(dir: &std::path::Path) -> Option<String> {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut rest = text.as_ref();
        while let Some(at) = rest.find("eyJ") {
            let tail = &rest[at + 3..];
            let run = tail.bytes().take_while(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_').count();
            if run >= 10 && tail[run..].starts_with(".eyJ") {
                return Some(path.display().to_string());
            }
            rest = tail;
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portcullis_login_signs_a_person_in_and_the_gateway_refreshes_their_token() {
    // Access tokens of five seconds: the gateway renews them at four.
    let refuse = TempDir::new();
    let refuse_flag = refuse.0.join("refuse-refresh");
    let flag = refuse_flag.display().to_string();
    let idp = idp_env("mcp:tools", None, "", &[("IDP_ACCESS_TTL", "5"), ("IDP_REFUSE_REFRESH", &flag)]).await;
    let upstream = gateway()
        .demo("d", &[], "")
        .top(&format!("oauth:\n  issuers:\n    - issuer: {:?}\n      scopes:\n        mcp:tools: {{}}\n", idp.issuer))
        .start()
        .await;
    let port = callback_port();
    let entry = format!("oauth: {{grant: authorization_code, callback_port: {port}}}");
    let builder = gateway().remote("up", &upstream.mcp(), &entry).env("PORTCULLIS_SECRET_KEY", KEY);
    let yaml = builder.yaml();
    let front = builder.start().await;
    let config = cli_config(&front, &yaml);
    let client = Client::connect(&front.mcp()).await;

    // Nobody signed in yet: calls say what to do, and so do /servers and `check`.
    let a = client.call("up__d__echo", json!({"text": "x"})).await;
    assert!(a.response["error"].to_string().contains("portcullis login up"), "{}", a.response);
    assert_eq!(oauth_of(&servers(&front).await, "up")["grant"], "authorization_code");
    let env = [("PORTCULLIS_SECRET_KEY", KEY)];
    let (ok, out, err) = run_cli(None, &["check", "--config", config.to_str().unwrap()], &env).await;
    assert!(ok && out.contains("not logged in"), "{out}{err}");

    // `portcullis login up`: discovery from the server's 401, dynamic registration, the URL
    // printed; the person signs in at the provider; the browser comes back to the CLI.
    let mut login = tokio::process::Command::new(BIN)
        .args(["login", "up", "--no-browser", "--timeout", "60s", "--config", config.to_str().unwrap()])
        .env("PORTCULLIS_SECRET_KEY", KEY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(login.stdout.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap();
        let line = line.expect("the login ended before it printed a URL");
        if let Some(u) = line.trim().strip_prefix("http") {
            break format!("http{u}");
        }
    };
    let callback = format!("http://127.0.0.1:{port}/callback");
    assert_eq!(crate::idp::param(&url, "code_challenge_method").as_deref(), Some("S256"));
    assert_eq!(crate::idp::param(&url, "resource").as_deref(), Some(upstream.mcp().as_str()));
    assert_eq!(crate::idp::param(&url, "scope").as_deref(), Some("mcp:tools"), "the challenge's scope");
    let back = idp.through(&mut Browser::new(), &url, "pat", &callback).await;
    let done = reqwest::get(&back).await.unwrap();
    assert_eq!(done.status(), 200);
    let rest: Vec<String> = {
        let mut v = Vec::new();
        while let Ok(Ok(Some(l))) = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await {
            v.push(l);
        }
        v
    };
    let status = tokio::time::timeout(Duration::from_secs(30), login.wait()).await.unwrap().unwrap();
    assert!(status.success() && rest.join("\n").contains("logged in to up"), "{rest:?}");
    let mut err = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut login.stderr.take().unwrap(), &mut err).await.unwrap();
    assert!(!format!("{url}{rest:?}{err}").contains("eyJ"), "the login printed a token: {rest:?} {err}");

    // The gateway reads the vault within a second and reaches the server as pat.
    assert_eq!(echo_once_up(&front, &client, "as pat").await, "as pat");
    let records = upstream.audit_until(|r| r.iter().any(|r| r["method"] == "tools/call")).await;
    let call = records.iter().find(|r| r["method"] == "tools/call").unwrap();
    assert_eq!(call["identity"], "pat", "{call}");
    let state = oauth_of(&servers(&front).await, "up");
    assert_eq!((state["login"].as_str(), state["token"].as_str()), (Some("logged_in"), Some("valid")), "{state}");
    let (ok, out, _) = run_cli(None, &["check", "--config", config.to_str().unwrap()], &env).await;
    assert!(ok && out.contains("logged in at"), "{out}");

    // Renewed before it expires (a refresh, not a new login), and calls carry on.
    front
        .until(Duration::from_secs(20), || {
            let front = &front;
            async move { (oauth_of(&servers(front).await, "up")["refreshes"].as_u64() >= Some(1)).then_some(()) }
        })
        .await;
    assert_eq!(client.call_text("up__d__echo", json!({"text": "refreshed"})).await, "refreshed");
    // Nothing in the store, the audit files or the logs' neighbours is a token in clear.
    let dir = front.audit.parent().unwrap().to_owned();
    assert_eq!(clear_jwt_in(&dir), None);

    // The provider refuses the next refresh (a revoked grant): the account needs a login, and
    // calls say so at once, without a retry loop.
    std::fs::write(&refuse_flag, "").unwrap();
    front
        .until(Duration::from_secs(20), || {
            let front = &front;
            async move { (oauth_of(&servers(front).await, "up")["login"] == "needs_login").then_some(()) }
        })
        .await;
    // (The access token in hand may serve until the vault's state reaches the gateway.)
    let e = front
        .until(Duration::from_secs(15), || {
            let client = client.clone();
            async move {
                let a = client.call("up__d__echo", json!({"text": "x"})).await;
                Some(a.response["error"].to_string()).filter(|e| e.contains("needs login"))
            }
        })
        .await;
    assert!(e.contains("refused") && e.contains("portcullis login up"), "{e}");
    let (_, out, _) = run_cli(None, &["check", "--config", config.to_str().unwrap()], &env).await;
    assert!(out.contains("needs login"), "{out}");
    std::fs::remove_file(&refuse_flag).unwrap();

    // `portcullis logout up`: the gateway stops using the account.
    let (ok, out, err) = run_cli(None, &["logout", "up", "--config", config.to_str().unwrap()], &env).await;
    assert!(ok && out.contains("logged out of up"), "{out}{err}");
    let refused = front
        .until(Duration::from_secs(15), || {
            let client = client.clone();
            async move {
                // A fresh session: the old upstream connection may still hold its last token.
                let a = client.call("up__d__echo", json!({"text": "after logout"})).await;
                let e = a.response["error"].to_string();
                e.contains("portcullis login up").then_some(e)
            }
        })
        .await;
    assert!(refused.contains("needs login"), "{refused}");
    front.stop().await;
    upstream.stop().await;
}

const ALICE: &str = "alice-front-token-0123456789ab";
const BOB: &str = "bob-front-token-0123456789abcd";
const CAROL: &str = "carol-front-token-0123456789ab";
const ADMIN: &str = "admin-front-token-0123456789ab";

/// Follows a link URL through the provider's pages as `login`, back to the gateway: the page
/// the gateway shows at the end.
async fn link(idp: &crate::idp::Idp, front: &TestGateway, url: &str, login: &str) -> (u16, String) {
    let mut browser = Browser::new();
    let (status, location, page) = browser.go(url, None).await;
    assert_eq!(status, 302, "{page}");
    let back = idp.through(&mut browser, &location.unwrap(), login, &format!("{}/link/callback", front.url)).await;
    let (status, _, page) = browser.go(&back, None).await;
    (status, page)
}

/// Who the upstream saw on its tools/calls, in order.
async fn upstream_callers(upstream: &TestGateway, n: usize) -> Vec<String> {
    let records = upstream.audit_until(|r| r.iter().filter(|r| r["method"] == "tools/call").count() >= n).await;
    records
        .iter()
        .filter(|r| r["method"] == "tools/call")
        .map(|r| r["identity"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_links_its_own_account_and_reaches_the_server_as_itself() {
    let idp = idp_env("mcp:tools", None, "", &[]).await;
    let upstream = gateway()
        .demo("d", &[], "")
        .top(&format!("oauth:\n  issuers:\n    - issuer: {:?}\n      scopes:\n        mcp:tools: {{}}\n", idp.issuer))
        .start()
        .await;
    let front = gateway()
        .remote("up", &upstream.mcp(), "oauth: {grant: authorization_code}\ncredentials: per_user")
        .demo("local", &[], "")
        .env("PORTCULLIS_SECRET_KEY", KEY)
        .top(&format!(
            "auth:\n  tokens:\n    alice: {ALICE}\n    bob: {BOB}\n    carol: {CAROL}\n    admin: {{token: {ADMIN}, role: admin}}\n"
        ))
        .start()
        .await;

    // Alice's client is older (2025-06-18): an error that carries the link.
    let mut alice = Client::new(&front.mcp()).bearer(ALICE);
    alice.initialize_with("2025-06-18", json!({})).await;
    let a = alice.call("up__d__echo", json!({"text": "x"})).await;
    assert_eq!(a.response["error"]["code"], -32010, "{}", a.response);
    let url = a.response["error"]["data"]["link"].as_str().unwrap().to_owned();
    assert!(url.starts_with(&format!("{}/link/up?ticket=", front.url)), "{url}");
    // Not linked yet: the server's tools are left out of her list; the others are there.
    let tools = alice.all_tools().await;
    assert!(
        tools.iter().all(|t| !t.starts_with("up__")) && tools.iter().any(|t| t.starts_with("local__")),
        "{tools:?}"
    );
    // A ticket for another server, or altered, is refused.
    let elsewhere = url.replace("/link/up?", "/link/local?");
    assert_eq!(Browser::new().go(&elsewhere, None).await.0, 403);
    let altered = format!("{}x", &url[..url.len() - 1]);
    assert_eq!(Browser::new().go(&altered, None).await.0, 403);
    let (status, page) = link(&idp, &front, &url, "alice-up").await;
    assert!(status == 200 && page.contains("linked"), "{page}");
    assert_eq!(Browser::new().go(&url, None).await.0, 403, "a link works once");
    assert_eq!(alice.call_text("up__d__echo", json!({"text": "as alice"})).await, "as alice");
    assert!(alice.all_tools().await.iter().any(|t| t == "up__d__echo"));

    // Bob's client takes URL elicitations (2025-11-25): the link comes as one.
    let mut bob = Client::new(&front.mcp()).bearer(BOB);
    bob.initialize_with("2025-11-25", json!({"elicitation": {"url": {}}})).await;
    let b = bob.call("up__d__echo", json!({"text": "x"})).await;
    assert_eq!(b.response["error"]["code"], -32042, "{}", b.response);
    let e = &b.response["error"]["data"]["elicitations"][0];
    assert_eq!(e["mode"], "url");
    assert!(e["elicitationId"].is_string(), "{e}");
    let (status, _) = link(&idp, &front, e["url"].as_str().unwrap(), "bob-up").await;
    assert_eq!(status, 200);
    assert_eq!(bob.call_text("up__d__echo", json!({"text": "as bob"})).await, "as bob");
    // A stateless (2026-07-28) request of Bob's reaches the server as Bob too.
    let modern = Client::modern(&front.mcp()).bearer(BOB);
    assert_eq!(modern.call_text("up__d__echo", json!({"text": "stateless bob"})).await, "stateless bob");
    // Two identities, two upstream users; Alice's account never served Bob.
    assert_eq!(upstream_callers(&upstream, 3).await, ["alice-up", "bob-up", "bob-up"]);

    // Each sees their own accounts; Alice unlinks hers and is asked again; Bob carries on.
    let (status, mine) = http_json(reqwest::Method::GET, &format!("{}/accounts", front.url), Some(ALICE), None).await;
    assert_eq!(
        (status, mine["accounts"][0]["server"].as_str(), mine["accounts"][0]["state"].as_str()),
        (200, Some("up"), Some("linked")),
        "{mine}"
    );
    let (_, carols) = http_json(reqwest::Method::GET, &format!("{}/accounts", front.url), Some(CAROL), None).await;
    assert_eq!(carols["accounts"][0]["state"], "not_linked", "{carols}");
    assert!(carols["accounts"][0]["link"].as_str().is_some_and(|l| l.contains("/link/up?ticket=")));
    let (_, servers) = http_json(reqwest::Method::GET, &format!("{}/servers", front.url), Some(ADMIN), None).await;
    let state = oauth_of(&servers, "up");
    assert_eq!((state["credentials"].as_str(), state["linked"].as_u64()), (Some("per_user"), Some(2)), "{state}");
    let (status, _) =
        http_json(reqwest::Method::DELETE, &format!("{}/accounts/up", front.url), Some(ALICE), None).await;
    assert_eq!(status, 200);
    let a = alice.call("up__d__echo", json!({"text": "x"})).await;
    assert_eq!(a.response["error"]["code"], -32010, "{}", a.response);
    assert_eq!(bob.call_text("up__d__echo", json!({"text": "still bob"})).await, "still bob");
    let (status, _) =
        http_json(reqwest::Method::DELETE, &format!("{}/accounts/up", front.url), Some(ALICE), None).await;
    assert_eq!(status, 404);
    assert_eq!(clear_jwt_in(front.audit.parent().unwrap()), None);
    front.stop().await;
    upstream.stop().await;
}

/// Registration by Portcullis' own Client ID Metadata Document: the server's authorization
/// server (here Portcullis' own, on the upstream, taking documents from loopback with the test
/// CA) fetches `PUBLIC_URL/oauth/upstream/up/client.json` from the front gateway over https; the
/// person signs in there with a token; nothing was registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_registers_by_portcullis_own_metadata_document() {
    let dir = TempDir::new();
    crate::tls::pki(&dir.0);
    let path = |f: &str| dir.0.join(f).display().to_string();
    let person = "upstream-person-token-0123456789";
    let upstream = gateway()
        .demo("d", &[], "")
        .top(&format!(
            "auth:\n  tokens:\n    pat: {person}\noauth:\n  authorization_server: {{registration: false, client_metadata_documents: {{allow_private_addresses: true, ca: {:?}}}}}\n",
            path("ca.pem")
        ))
        .start()
        .await;
    let port = callback_port();
    let tls = format!("tls:\n  cert: {:?}\n  key: {:?}\n", path("live.pem"), path("live.key"));
    let entry = format!("oauth: {{grant: authorization_code, callback_port: {port}}}");
    let mut front =
        gateway().remote("up", &upstream.mcp(), &entry).env("PORTCULLIS_SECRET_KEY", KEY).top(&tls).start().await;
    let base = front.url.replace("http://", "https://");
    let top = format!("public_url: {base}\n{tls}");
    front.reload_top(&top).await;
    let https = {
        let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.0.join("ca.pem")).unwrap()).unwrap();
        reqwest::Client::builder().tls_certs_only([ca]).build().unwrap()
    };
    let doc = https.get(format!("{base}/oauth/upstream/up/client.json")).send().await.unwrap();
    let doc: Value = serde_json::from_str(&doc.text().await.unwrap()).unwrap();
    assert_eq!(doc["client_id"], format!("{base}/oauth/upstream/up/client.json"));
    assert_eq!(doc["redirect_uris"][0], format!("http://127.0.0.1:{port}/callback"));
    assert_eq!(doc["token_endpoint_auth_method"], "none");
    let yaml = gateway().remote("up", &upstream.mcp(), &entry).top(&top).yaml();
    let config = cli_config(&front, &yaml);

    let (mut login, url) = start_login(&config).await;
    assert_eq!(crate::idp::param(&url, "client_id"), Some(doc["client_id"].as_str().unwrap().to_owned()));
    // The person, on the upstream's own pages: sign in with a token, approve.
    let hidden = |page: &str, name: &str| {
        let marker = format!("name=\"{name}\" value=\"");
        let at = page.find(&marker).unwrap_or_else(|| panic!("no {name}: {page}")) + marker.len();
        page[at..].split('"').next().unwrap().to_owned()
    };
    let mut browser = Browser::new();
    let (status, _, page) = browser.go(&url, None).await;
    assert_eq!(status, 200, "the upstream took the document: {page}");
    let post = |page: &str, action: &str, token: Option<&str>| {
        let mut f =
            vec![("request", hidden(page, "request")), ("csrf", hidden(page, "csrf")), ("action", action.to_owned())];
        if let Some(t) = token {
            f.push(("token", t.to_owned()));
        }
        f.iter()
            .map(|(k, v)| format!("{k}={}", form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()))
            .collect::<Vec<_>>()
            .join("&")
    };
    let authorize = format!("{}/authorize", upstream.url);
    let (_, _, consent) = browser.go(&authorize, Some(post(&page, "login", Some(person)))).await;
    assert!(consent.contains(doc["client_name"].as_str().unwrap()) || consent.contains("Portcullis"), "{consent}");
    let (status, location, _) = browser.go(&authorize, Some(post(&consent, "approve", None))).await;
    assert_eq!(status, 302);
    let back = location.unwrap();
    assert!(back.starts_with(&format!("http://127.0.0.1:{port}/callback")), "{back}");
    assert_eq!(reqwest::get(&back).await.unwrap().status(), 200);
    let status = tokio::time::timeout(Duration::from_secs(30), login.wait()).await.unwrap().unwrap();
    assert!(status.success());

    // The front reaches the upstream as pat.
    let mut client = Client::new(&format!("{base}/mcp"));
    client.http = https.clone();
    client.initialize_with("2025-11-25", json!({})).await;
    assert_eq!(echo_once_up(&front, &client, "by document").await, "by document");
    let records = upstream.audit_until(|r| r.iter().any(|r| r["method"] == "tools/call")).await;
    // The upstream's own token for pat (its authorization server names them `oauth:pat:…`).
    let identity = records.iter().find(|r| r["method"] == "tools/call").unwrap()["identity"].clone();
    assert!(identity.as_str().is_some_and(|i| i.starts_with("oauth:pat:")), "{identity}");
    front.stop().await;
    upstream.stop().await;
}

/// Runs `portcullis login up` with `config` and returns the URL it printed, and the process.
async fn start_login(config: &std::path::Path) -> (tokio::process::Child, String) {
    let mut login = tokio::process::Command::new(BIN)
        .args(["login", "up", "--no-browser", "--timeout", "60s", "--config", config.to_str().unwrap()])
        .env("PORTCULLIS_SECRET_KEY", KEY)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(login.stdout.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await.unwrap().unwrap();
        if let Some(u) = line.expect("the login ended early").trim().strip_prefix("http") {
            break format!("http{u}");
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (login, url)
}

/// A server that asks a person's account for more scopes (403 `insufficient_scope`): the
/// account needs a new login, which asks for them, and then the call goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_asking_for_more_scopes_gets_a_login_that_asks_for_them() {
    let idp = idp_env("basic more", None, "", &[]).await;
    let upstream = gateway()
        .demo("d", &[], "")
        .top(&format!(
            "oauth:\n  issuers:\n    - issuer: {:?}\n      scopes:\n        basic: {{servers: [d], tools: [d__echo]}}\n        more: {{servers: [d]}}\n",
            idp.issuer
        ))
        .start()
        .await;
    let port = callback_port();
    let entry = format!("oauth: {{grant: authorization_code, callback_port: {port}, scope: basic}}");
    let builder = gateway().remote("up", &upstream.mcp(), &entry).env("PORTCULLIS_SECRET_KEY", KEY);
    let yaml = builder.yaml();
    let front = builder.start().await;
    let config = cli_config(&front, &yaml);
    let callback = format!("http://127.0.0.1:{port}/callback");
    let sign_in = |url: String| {
        let (idp, callback) = (&idp, callback.clone());
        async move {
            let back = idp.through(&mut Browser::new(), &url, "pat", &callback).await;
            assert_eq!(reqwest::get(&back).await.unwrap().status(), 200);
        }
    };
    let (mut login, url) = start_login(&config).await;
    assert_eq!(crate::idp::param(&url, "scope").as_deref(), Some("basic"));
    sign_in(url).await;
    assert!(login.wait().await.unwrap().success());
    let client = Client::connect(&front.mcp()).await;
    assert_eq!(echo_once_up(&front, &client, "basic").await, "basic");
    // `add` needs `more`: the server steps up; the account needs a login for it.
    let a = client.call("up__d__add", json!({"a": 1, "b": 2})).await;
    assert!(a.response["error"].is_object() || a.response["result"]["isError"] == true, "{}", a.response);
    let e = front
        .until(Duration::from_secs(15), || {
            let client = client.clone();
            async move {
                let a = client.call("up__d__echo", json!({"text": "x"})).await;
                Some(a.response["error"].to_string()).filter(|e| e.contains("more scopes"))
            }
        })
        .await;
    assert!(e.contains("portcullis login up"), "{e}");
    let (mut login, url) = start_login(&config).await;
    let scope = crate::idp::param(&url, "scope").unwrap_or_default();
    assert!(scope.split(' ').any(|s| s == "more") && scope.split(' ').any(|s| s == "basic"), "{scope}");
    sign_in(url).await;
    assert!(login.wait().await.unwrap().success());
    let sum = front
        .until(Duration::from_secs(15), || {
            let client = client.clone();
            async move {
                let a = client.call("up__d__add", json!({"a": 1, "b": 2})).await;
                a.response["result"]["content"][0]["text"].as_str().map(str::to_owned)
            }
        })
        .await;
    assert_eq!(sum, "3");
    front.stop().await;
    upstream.stop().await;
}
