//! The gate fails closed: credential sources that cannot turn themselves off, a token store
//! that cannot answer, reserved marks, startup checks, randomness, the failure throttle and
//! bounded per-address state. Each test names the item of the fail-closed issue it proves.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use crate::secrets::{serve, stop};
use crate::support::*;

pub(crate) const INIT: &str = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;

/// POSTs `initialize` to `url` with an optional bearer token; the status.
async fn init_status(url: &str, token: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new().post(url).header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    req.body(INIT).send().await.unwrap().status().as_u16()
}

/// `portcullis serve` in `dir` with no `--config` (so the default file, or the built-in demo).
async fn serve_in(dir: &Path, env: &[(&str, &str)]) -> (tokio::process::Child, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]).current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let url = listen_url(&mut child).await;
    (child, url.trim_end_matches("/mcp").to_owned())
}

/// Item 1: the environment's credentials guard the built-in demo configuration too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_tokens_guard_the_built_in_configuration() {
    let dir = TempDir::new();
    let (mut child, url) = serve_in(&dir.0, &[("PORTCULLIS_TOKEN", "s3cret-env-token")]).await;
    let mcp = format!("{url}/mcp");
    assert_eq!(init_status(&mcp, None).await, 401, "the demo config ran without authentication");
    assert_eq!(init_status(&mcp, Some("s3cret-env-token")).await, 200);
    stop(&mut child).await;

    let (mut child, url) = serve_in(&dir.0, &[("PORTCULLIS_TOKENS", "tok-a-123,tok-b-456")]).await;
    let mcp = format!("{url}/mcp");
    assert_eq!(init_status(&mcp, None).await, 401);
    assert_eq!(init_status(&mcp, Some("tok-b-456")).await, 200);
    let (status, _) = http_json(reqwest::Method::GET, &format!("{url}/servers"), None, None).await;
    assert_eq!(status, 401);
    stop(&mut child).await;
}

/// Runs `serve` on a config that must be refused; its stderr.
async fn refused_start(cfg: &Path, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .args(args)
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the start was not refused: {err}");
    err
}

fn corrupt(db: &Path) {
    let mut bytes = std::fs::read(db).unwrap();
    for b in bytes.iter_mut().take(100) {
        *b = 0x5a;
    }
    std::fs::write(db, bytes).unwrap();
}

/// Item 2: a store that cannot be opened refuses the start; one that breaks later answers 503,
/// never 200 (anonymous) and never 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_store_that_cannot_answer_never_means_no_credentials() {
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, gateway().demo("pub", &[], "").yaml()).unwrap();
    let out = Command::new(BIN)
        .args(["token", "create", "--name", "svc", "--role", "admin", "--json", "--config", cfg.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let secret: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let secret = secret["secret"].as_str().unwrap().to_owned();
    let db = dir.0.join("portcullis.db");
    portcullis::store::Store::open(&portcullis::store::StoreLocation::File(db.clone())).unwrap().checkpoint().unwrap();

    // Running, then the store breaks underneath: 503 with and without a token.
    let mut served = Served::start(&cfg, &[]).await;
    let mcp = served.url.clone();
    let url = mcp.trim_end_matches("/mcp").to_owned();
    assert_eq!(init_status(&mcp, None).await, 401);
    assert_eq!(init_status(&mcp, Some(&secret)).await, 200);
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", db.display());
        if Path::new(&p).exists() {
            std::fs::write(&p, vec![0x5au8; 8192]).unwrap();
        }
    }
    // The next poll of the store fails, and says so.
    served.next_line_with("token store unavailable").await;
    assert_eq!(init_status(&mcp, None).await, 503);
    assert_eq!(init_status(&mcp, Some(&secret)).await, 503);
    let (status, _) = http_json(reqwest::Method::GET, &format!("{url}/servers"), None, None).await;
    assert_eq!(status, 503, "the management API with no token while the store is down");
    stop(&mut served.child).await;

    // Starting on a store that cannot be read: a clear refusal, nothing served.
    corrupt(&db);
    let err = refused_start(&cfg, &[]).await;
    assert!(err.contains("refusing to start") && err.contains("portcullis.db"), "{err}");
}

/// Item 3: a config entry cannot take the generated token's mark; a removed config token stops
/// working on reload, while the `--generate-token` one lives as long as the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_generated_token_survives_a_reload_that_removes_it() {
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, "servers: {}\nauth:\n  tokens:\n    generated: cfg-token-named-generated\n").unwrap();
    let out = std::process::Command::new(BIN).args(["check", "--config", cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("reserved for `serve --generate-token`"), "{err}");

    let base = "servers: {}\nauth:\n  tokens:\n    ops: ops-token-0123456789\n";
    let (mut child, url, stderr) = serve(&dir.0, base, &["--generate-token"], &[]).await;
    let text = std::fs::read_to_string(&stderr).unwrap();
    let generated = text.lines().find_map(|l| l.split("(shown once): ").nth(1)).unwrap().trim().to_owned();
    let mcp = format!("{url}/mcp");
    assert_eq!(init_status(&mcp, Some("ops-token-0123456789")).await, 200);
    std::fs::write(&cfg, "servers: {}\nauth:\n  tokens:\n    dev: dev-token-0123456789\n").unwrap();
    let (status, body) = http_json(reqwest::Method::POST, &format!("{url}/admin/reload"), Some(&generated), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(init_status(&mcp, Some("ops-token-0123456789")).await, 401, "a removed token still works");
    assert_eq!(init_status(&mcp, Some("dev-token-0123456789")).await, 200);
    assert_eq!(init_status(&mcp, Some(&generated)).await, 200, "the generated token lives as long as the process");
    stop(&mut child).await;
}

/// Item 4: the startup check counts the store's issued tokens, and one line says how requests
/// are authenticated (sources and counts, never a value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_check_knows_the_store_and_says_how_requests_are_authenticated() {
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, "servers: {}\n").unwrap();
    // The check `serve` makes on a config listening on every interface, with the store as it is.
    let check = || {
        let mut config = portcullis::config::load(&cfg).unwrap();
        config.listen = "0.0.0.0:8080".parse().unwrap();
        let (path, named) = config.store();
        let store = portcullis::store::StoreView::open(path, named).unwrap();
        portcullis::cli::startup_check(&mut config, &portcullis::cli::ServeOptions::default(), &store)
    };
    let err = check().unwrap_err().to_string();
    assert!(err.contains("refusing to serve 0.0.0.0:8080 without credentials"), "{err}");
    let path = portcullis::config::load(&cfg).unwrap().store().0;

    // One issued token: a credential source like any other.
    let (_, secret) = portcullis::store::Store::open(&path)
        .unwrap()
        .create(&portcullis::store::NewToken { name: "svc".into(), ..Default::default() }, portcullis::store::now_ms())
        .unwrap();
    let line = check().unwrap();
    assert!(line.starts_with("authentication: ON") && line.contains("1 live issued token"), "{line}");
    assert!(!line.contains(&secret[..8]), "{line}");

    // And the real binary prints that line (here with an environment token as well).
    let (mut child, _, stderr) =
        serve(&dir.0, "servers: {}\n", &[], &[("PORTCULLIS_TOKEN", "env-token-0123456789")]).await;
    let text = std::fs::read_to_string(&stderr).unwrap();
    let line = text.lines().find(|l| l.contains("authentication:")).unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains("1 token from PORTCULLIS_TOKEN(S)") && line.contains("1 live issued token"), "{line}");
    assert!(!text.contains("env-token-0123456789"));
    stop(&mut child).await;
}

/// Item 20: no randomness, no start (no counter ids, no zero MAC key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_random_source_refuses_the_start() {
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, "servers: {}\n").unwrap();
    let err = refused_start(&cfg, &["--test-no-randomness"]).await;
    assert!(err.contains("random source failed") && !err.contains("listening on"), "{err}");
}

/// Item 21: requests without any credential get the 401 challenge however many there are;
/// only wrong credentials count towards the failure throttle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_a_credential_are_never_throttled() {
    let gw = gateway().demo("a", &[], "").top("auth:\n  tokens:\n    alice: alice-token-0123456789\n").start().await;
    for _ in 0..30 {
        assert_eq!(init_status(&gw.mcp(), None).await, 401);
    }
    let resp = reqwest::Client::new().post(gw.mcp()).header("content-type", "application/json").body(INIT);
    let resp = resp.send().await.unwrap();
    assert!(resp.headers().get("www-authenticate").is_some());
    // Wrong credentials still are.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(init_status(&gw.mcp(), Some("wrong-token-0123456789")).await);
    }
    assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
    assert_eq!(init_status(&gw.mcp(), Some("alice-token-0123456789")).await, 200, "a valid token is never throttled");
    assert_eq!(init_status(&gw.mcp(), None).await, 401, "no credential: the challenge, even from a throttled address");
    gw.stop().await;
}

/// Item 13: per-address rate and failure state is bounded whatever the number of addresses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_state_stays_bounded() {
    let gw = gateway()
        .demo("a", &[], "")
        .top("auth:\n  tokens:\n    alice: alice-token-0123456789\nrate_limit:\n  per_address: 1000/min\n")
        .start()
        .await;
    let auth = gw.gateway().authenticator();
    let mut wrong = axum::http::HeaderMap::new();
    wrong.insert("authorization", "Bearer wrong-token-0123456789".parse().unwrap());
    let mut right = axum::http::HeaderMap::new();
    right.insert("authorization", "Bearer alice-token-0123456789".parse().unwrap());
    for i in 0..70_000u32 {
        let ip = std::net::IpAddr::V6(std::net::Ipv6Addr::from(u128::from(i) << 64 | 1));
        let _ = auth.authenticate(&wrong, ip);
        if let Ok(identity) = auth.authenticate(&right, ip) {
            let _ = auth.check_rate(&identity, ip).await;
        }
    }
    let (failures, buckets) = auth.address_state_len();
    assert!(failures <= 65_536 && buckets <= 65_536, "failures {failures}, buckets {buckets}");
    assert!(failures > 1000 && buckets > 1000, "failures {failures}, buckets {buckets}: nothing tracked?");
    // The bound forgets state only when it must: a blocked address stays blocked meanwhile.
    let ip: std::net::IpAddr = "203.0.113.7".parse().unwrap();
    let mut last = None;
    for _ in 0..12 {
        last = Some(auth.authenticate(&wrong, ip).unwrap_err());
    }
    assert!(matches!(last, Some(portcullis::auth::AuthError::Throttled(_))), "{last:?}");
    gw.stop().await;
}

/// POSTs a raw body with `client`'s headers (session, version, credentials); status and JSON.
async fn raw_post(client: &Client, method: &str, body: &str) -> (u16, serde_json::Value) {
    let resp =
        client.request_builder(&serde_json::json!({"method": method})).body(body.to_owned()).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({"raw": text})))
}

fn assert_refused(what: &str, (status, body): (u16, serde_json::Value)) {
    assert_eq!(status, 400, "{what}: {body}");
    assert_eq!(body["error"]["code"], -32600, "{what}: {body}");
}

/// Item 5: a member written twice is refused (-32600) before authorization on every transport,
/// escaped or not, in every method the gateway authorizes by name or URI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_written_twice_never_walks_past_the_grants() {
    let token = "dup-user-0123456789abcdef";
    let top = format!(
        "auth:\n  tokens:\n    user:\n      token: {token}\n      tools: [\"pub__echo\"]\n      prompts: [\"!*\"]\n      resources: [\"!*\"]\n"
    );
    let gw = gateway().demo("pub", &[], "").top(&top).start().await;
    let one = Client::connect_as(&gw.server("pub"), token).await;
    let call = |name: &str| {
        format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}","arguments":{{"text":"x"}},"name":"add"}}}}"#
        )
    };
    assert_refused("per-server tools/call", raw_post(&one, "tools/call", &call("echo")).await);
    let escaped =
        r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","n\u0061me":"add","arguments":{}}}"#;
    assert_refused("escaped key", raw_post(&one, "tools/call", escaped).await);
    let all = Client::connect_as(&gw.mcp(), token).await;
    assert_refused("aggregate tools/call", raw_post(&all, "tools/call", &call("pub__echo")).await);
    for (method, body) in [
        (
            "prompts/get",
            r#"{"jsonrpc":"2.0","id":2,"method":"prompts/get","params":{"name":"pub__nope","name":"pub__greet"}}"#,
        ),
        (
            "resources/read",
            r#"{"jsonrpc":"2.0","id":3,"method":"resources/read","params":{"uri":"x://y","uri":"demo://info"}}"#,
        ),
        (
            "completion/complete",
            r#"{"jsonrpc":"2.0","id":4,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"pub__x","name":"pub__greet"},"argument":{"name":"name","value":"a"}}}"#,
        ),
    ] {
        assert_refused(method, raw_post(&all, method, body).await);
    }
    // The granted call itself still works, and the upstream saw no duplicate.
    assert_eq!(all.call_text("pub__echo", serde_json::json!({"text": "ok"})).await, "ok");

    // 2025-03-26 batch elements: each element is refused on its own.
    let old = {
        let mut c = Client::new(&gw.mcp()).bearer(token);
        let resp = c.post(serde_json::json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-03-26","capabilities":{},"clientInfo":{"name":"t","version":"1"}}})).await;
        c.session = resp.headers().get("mcp-session-id").map(|v| v.to_str().unwrap().to_owned());
        c.version = "2025-03-26".into();
        c
    };
    let batch = format!("[{}]", call("pub__echo"));
    let (status, body) = raw_post(&old, "tools/call", &batch).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0]["error"]["code"], -32600, "{body}");

    // 2026-07-28: the stateless path.
    let modern = Client::modern(&gw.mcp()).bearer(token);
    let body = r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"pub__echo","arguments":{},"name":"pub__add","_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
    let resp = modern
        .request_builder(&serde_json::json!({"method":"tools/call","params":{"name":"pub__echo"}}))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], -32600, "{v}");

    // Legacy SSE `/messages/`.
    let (_events, endpoint) = crate::protocol::open_sse(&format!("{}/sse", gw.url), Some(token)).await;
    let resp = reqwest::Client::new()
        .post(format!("{}{endpoint}", gw.url))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(call("pub__echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    gw.stop().await;

    // `portcullis stdio --as`: an error line, and the upstream never sees the call.
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, gateway().demo("pub", &[], "").top(&top).yaml()).unwrap();
    let mut child = Command::new(BIN)
        .args(["stdio", "--config", cfg.to_str().unwrap(), "--as", "user"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let mut stdin = child.stdin.take().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    stdin.write_all(format!("{INIT}\n{}\n", call("pub__echo")).as_bytes()).await.unwrap();
    let answer = loop {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap().unwrap();
        let v = serde_json::from_str::<serde_json::Value>(&line).unwrap();
        if v["id"] == 1 {
            break v;
        }
    };
    assert_eq!(answer["error"]["code"], -32600, "{answer}");
    drop(stdin);
    let _ = child.wait().await;
}

/// Item 10: a stdio child sees a minimal environment and its own `env`, more only by
/// `inherit_env`, and never a `PORTCULLIS_*` variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn children_never_see_portcullis_secrets() {
    let dir = TempDir::new();
    let dump = |name: &str| dir.0.join(format!("{name}.env")).display().to_string();
    let server = |name: &str, extra: &str| {
        format!(
            "  {name}:\n    command: sh\n    args: [\"-c\", \"env > {} && exec {BIN} demo-server --fixtures\"]\n{extra}",
            dump(name)
        )
    };
    let config = format!(
        "servers:\n{}{}{}",
        server("plain", "    env: {OWN: own-value}\n"),
        server("named", "    inherit_env: [KEEP_ME, PORTCULLIS_TOKEN_NOT_A_NAME]\n"),
        server("all", "    inherit_env: true\n"),
    );
    // A PORTCULLIS_* name in inherit_env is a config error...
    let cfg = dir.0.join("bad.yaml");
    std::fs::write(&cfg, &config).unwrap();
    let out = std::process::Command::new(BIN).args(["check", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("PORTCULLIS_* variables are never passed"));
    let config = config.replace(", PORTCULLIS_TOKEN_NOT_A_NAME", "");
    let env = [
        ("PORTCULLIS_TOKEN", "admin-key-0123456789abcdef"),
        ("PORTCULLIS_TOKENS", "other-key-0123456789abcdef"),
        ("OPERATOR_SECRET", "operator-secret-value"),
        ("KEEP_ME", "kept-value"),
    ];
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, &config).unwrap();
    let mut served = Served::start(&cfg, &env).await;
    // Each child wrote its environment before it started serving.
    served.connected(&["plain", "named", "all"]).await;
    let read = |name: &str| std::fs::read_to_string(dump(name)).unwrap();
    let (plain, named, all) = (read("plain"), read("named"), read("all"));
    stop(&mut served.child).await;
    for (what, text) in [("plain", &plain), ("named", &named), ("all", &all)] {
        assert!(!text.contains("PORTCULLIS_"), "{what} saw a PORTCULLIS_ variable:\n{text}");
        assert!(!text.contains("admin-key-0123456789abcdef") && !text.contains("other-key"), "{what}:\n{text}");
        assert!(text.lines().any(|l| l.starts_with("PATH=")), "{what} has no PATH:\n{text}");
        assert!(!text.contains("NOTIFY_SOCKET"), "{what} could talk to the service manager:\n{text}");
    }
    assert!(plain.contains("OWN=own-value") && !plain.contains("OPERATOR_SECRET") && !plain.contains("KEEP_ME"));
    assert!(named.contains("KEEP_ME=kept-value") && !named.contains("OPERATOR_SECRET"), "{named}");
    assert!(all.contains("OPERATOR_SECRET=operator-secret-value") && all.contains("KEEP_ME"), "{all}");
}

/// Item 11: an upstream URL's credentials never appear in `check`, a reload's 400 answer or the
/// "config not reloaded" log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_url_secrets_stay_out_of_config_errors() {
    let dir = TempDir::new();
    let good = "servers: {}\nauth:\n  tokens:\n    root: {token: root-token-0123456789, role: admin}\n";
    let (mut child, url, stderr) = serve(&dir.0, good, &[], &[("PW", "pw-Secret-1"), ("QK", "qk-Secret-2")]).await;
    let cfg = dir.0.join("portcullis.yaml");
    for bad_url in ["ftp://svc:${PW}@example.com/mcp?key=${QK}", "http://svc:${PW}@exa mple.com/mcp?key=${QK}"] {
        std::fs::write(&cfg, good.replace("servers: {}\n", &format!("servers:\n  r:\n    url: \"{bad_url}\"\n")))
            .unwrap();
        let out = std::process::Command::new(BIN)
            .args(["check", "--config", cfg.to_str().unwrap()])
            .env("PW", "pw-Secret-1")
            .env("QK", "qk-Secret-2")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success() && text.contains("servers.r.url"), "{text}");
        let (status, body) =
            http_json(reqwest::Method::POST, &format!("{url}/admin/reload"), Some("root-token-0123456789"), None).await;
        assert_eq!(status, 400, "{body}");
        for t in [&text, &body.to_string()] {
            assert!(!t.contains("pw-Secret-1") && !t.contains("qk-Secret-2"), "{t}");
        }
    }
    // `check` of a valid file shows URLs the same way.
    let url_line = "servers:\n  r:\n    url: \"https://svc:${PW}@example.com/mcp?key=${QK}\"\n";
    std::fs::write(&cfg, good.replace("servers: {}\n", url_line)).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "--config", cfg.to_str().unwrap()])
        .env("PW", "pw-Secret-1")
        .env("QK", "qk-Secret-2")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success() && text.contains("https://example.com/mcp") && !text.contains("Secret"), "{text}");
    stop(&mut child).await;
    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(log.contains("config not reloaded"), "{log}");
    assert!(!log.contains("pw-Secret-1") && !log.contains("qk-Secret-2"), "{log}");
}

/// Item 22: the management API refuses names that cannot be printed safely, durations it cannot
/// represent, and answers 413 in its own format; the CLI prints every stored string safely.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_refuses_what_it_cannot_keep_or_print() {
    let root = "root-token-0123456789";
    let gw = gateway()
        .demo("a", &[], "")
        .top(&format!("auth:\n  tokens:\n    root: {{token: {root}, role: admin}}\n"))
        .start()
        .await;
    let post = |path: &str, body: String| {
        let url = format!("{}{path}", gw.url);
        async move { http_json(reqwest::Method::POST, &url, Some(root), Some(&body)).await }
    };
    for name in ["evil\u{1b}[2J\u{1b}[31mX", "nul\u{0}", "bell\u{7}", "rtl\u{202e}txt", "with space", ""] {
        let (status, body) = post("/admin/tokens", serde_json::json!({"name": name}).to_string()).await;
        assert_eq!(status, 400, "{name:?}: {body}");
        assert_eq!(body["error"], "invalid_request");
    }
    let long = "x".repeat(60_000);
    assert_eq!(post("/admin/tokens", serde_json::json!({"name": long}).to_string()).await.0, 400);
    let (status, body) =
        post("/admin/tokens", serde_json::json!({"name": "ok", "ttl": "999999999999d"}).to_string()).await;
    assert_eq!(status, 400, "a ttl too large to represent: {body}");
    let (status, created) =
        post("/admin/tokens", serde_json::json!({"name": "ok-name", "ttl": "30d"}).to_string()).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let (status, body) = post(&format!("/admin/tokens/{id}/rotate"), r#"{"grace":"999999999999d"}"#.into()).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&format!("/admin/tokens/{id}/rotate"), r#"{"grace":"#.into()).await;
    assert_eq!(status, 400, "a malformed body is not the default grace: {body}");
    let (status, body) = post("/admin/tokens", format!(r#"{{"name":"{}"}}"#, "y".repeat(70_000))).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("payload_too_large")), "{body}");

    // A row stored with control characters (from before names were checked) prints escaped.
    let db = gw.audit.with_file_name("tokens.db");
    let store = portcullis::store::Store::open(&portcullis::store::StoreLocation::File(db.clone())).unwrap();
    let new = portcullis::store::NewToken { name: "old\u{1b}[2Jname\u{202e}".into(), ..Default::default() };
    store.create(&new, portcullis::store::now_ms()).unwrap();
    let cfg = gw.audit.with_file_name("portcullis.yaml");
    std::fs::write(&cfg, format!("servers: {{}}\nstore:\n  path: {:?}\n", db.display().to_string())).unwrap();
    for args in [&["token", "list"][..], &["token", "list", "--json"][..]] {
        let out =
            std::process::Command::new(BIN).args(args).args(["--config", cfg.to_str().unwrap()]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("old"), "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\u{202e}'), "raw control characters: {text:?}");
    }
    gw.stop().await;
}

/// Item 6: `subscriptions/listen` subscribes only to granted URIs on reachable servers, does not
/// acknowledge the others, and delivers `resources/updated` only for granted URIs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_checks_the_resource_grant_both_ways() {
    let top = "auth:\n  tokens:\n    root: {token: root-token-0123456789, role: admin}\n    user:\n      token: user-token-0123456789\n      servers: [pub]\n      resources: [\"!pub__demo://info\"]\n";
    let gw = gateway().demo("pub", &[], "").demo("priv", &[], "").top(top).start().await;
    let root = Client::modern(&gw.mcp()).bearer("root-token-0123456789");
    let user = Client::modern(&gw.mcp()).bearer("user-token-0123456789");
    let mut root_listen = root
        .listen(serde_json::json!("R"), serde_json::json!({"resourceSubscriptions": ["portcullis://pub/demo://info"]}))
        .await;
    let ack = root_listen.next().await;
    assert_eq!(
        ack["params"]["notifications"]["resourceSubscriptions"],
        serde_json::json!(["portcullis://pub/demo://info"]),
        "{ack}"
    );
    let asked = ["portcullis://pub/demo://info", "portcullis://priv/demo://info", "demo://info"];
    let mut user_listen = user
        .listen(serde_json::json!("U"), serde_json::json!({"toolsListChanged": true, "resourceSubscriptions": asked}))
        .await;
    let ack = user_listen.next().await;
    assert_eq!(ack["method"], "notifications/subscriptions/acknowledged");
    assert!(ack["params"]["notifications"].get("resourceSubscriptions").is_none(), "denied URIs acknowledged: {ack}");
    // An update of the denied URI reaches the root's stream, never the user's: the user's next
    // message is the tool list change that follows it.
    assert_eq!(root.call_text("pub__touch", serde_json::json!({"uri": "demo://info"})).await, "told 1");
    root_listen.next_method("notifications/resources/updated").await;
    let _ = root.call("pub__crash", serde_json::json!({})).await;
    let next = user_listen.next().await;
    assert_eq!(next["method"], "notifications/tools/list_changed", "{next}");
    gw.stop().await;
}

/// Item 7: a list cursor is refused for anyone but the identity it was minted for, and for
/// another list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_cursors_belong_to_whoever_received_them() {
    let top = "auth:\n  tokens:\n    alice: alice-token-0123456789\n    bob:\n      token: bob-token-0123456789\n      servers: [a]\n";
    let gw = gateway().demo("a", &["--page-size", "1"], "").demo("b", &["--page-size", "1"], "").top(top).start().await;
    let alice = Client::connect_as(&gw.mcp(), "alice-token-0123456789").await;
    let bob = Client::connect_as(&gw.mcp(), "bob-token-0123456789").await;
    let first = alice.request(serde_json::json!(1), "tools/list", serde_json::json!({})).await;
    let cursor = first.response["result"]["nextCursor"].as_str().unwrap().to_owned();
    let replay = bob.request(serde_json::json!(2), "tools/list", serde_json::json!({"cursor": cursor})).await;
    assert_eq!(replay.response["error"]["code"], -32602, "{:?}", replay.response);
    let other = alice.request(serde_json::json!(3), "prompts/list", serde_json::json!({"cursor": cursor})).await;
    assert_eq!(other.response["error"]["code"], -32602, "{:?}", other.response);
    let own = alice.request(serde_json::json!(4), "tools/list", serde_json::json!({"cursor": cursor})).await;
    assert!(own.response["result"]["tools"].is_array(), "{:?}", own.response);
    assert!(alice.all_tools().await.iter().any(|t| t.starts_with("b__")));
    gw.stop().await;
}

/// Item 8: a session belongs to the credential's stable identity, not its name: an issued token
/// named like a config token (in another tenant) cannot use its sessions on any transport, and
/// rotating an issued token keeps its own sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_belong_to_a_principal_not_a_name() {
    let top = "auth:\n  tokens:\n    root: {token: root-token-0123456789, role: admin}\n    bob: bob-config-token-0123456789\ntenants:\n  evil:\n    namespaces:\n      x: [a]\n";
    let gw = gateway().demo("a", &[], "").top(top).start().await;
    let (status, issued) = http_json(
        reqwest::Method::POST,
        &format!("{}/admin/tokens", gw.url),
        Some("root-token-0123456789"),
        Some(r#"{"name":"bob","tenant":"evil"}"#),
    )
    .await;
    assert_eq!(status, 201, "{issued}");
    let evil = issued["secret"].as_str().unwrap().to_owned();
    let owner = Client::connect_as(&gw.mcp(), "bob-config-token-0123456789").await;
    let sid = owner.session.clone().unwrap();
    let mut thief = owner.clone();
    thief.headers = vec![("authorization".into(), format!("Bearer {evil}"))];
    assert_eq!(thief.post(serde_json::json!({"jsonrpc":"2.0","id":1,"method":"tools/list"})).await.status(), 404);
    let http = reqwest::Client::new();
    let get = http
        .get(gw.mcp())
        .bearer_auth(&evil)
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &sid)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), 404);
    let del = http.delete(gw.mcp()).bearer_auth(&evil).header("mcp-session-id", &sid).send().await.unwrap();
    assert_eq!(del.status(), 404);
    assert_eq!(owner.call_text("a__echo", serde_json::json!({"text": "mine"})).await, "mine");
    // Legacy SSE: the config token's session, the issued token's POST.
    let (_events, endpoint) =
        crate::protocol::open_sse(&format!("{}/sse", gw.url), Some("bob-config-token-0123456789")).await;
    let post = http
        .post(format!("{}{endpoint}", gw.url))
        .bearer_auth(&evil)
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 404);

    // Rotation keeps the issued token's own sessions, past the sweep that follows.
    let mine = Client::connect_as(&gw.mcp(), &evil).await;
    let id = issued["id"].as_str().unwrap();
    let (status, rotated) = http_json(
        reqwest::Method::POST,
        &format!("{}/admin/tokens/{id}/rotate", gw.url),
        Some("root-token-0123456789"),
        Some(r#"{"grace":"0s"}"#),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    gw.gateway().sweep_sessions().await;
    let mut rotated_client = mine.clone();
    rotated_client.headers = vec![("authorization".into(), format!("Bearer {}", rotated["secret"].as_str().unwrap()))];
    assert_eq!(rotated_client.call_text("a__echo", serde_json::json!({"text": "kept"})).await, "kept");
    assert_eq!(
        mine.post(serde_json::json!({"jsonrpc":"2.0","id":1,"method":"ping"})).await.status(),
        401,
        "the old secret"
    );
    gw.stop().await;
}

/// Item 9: a management action stays within the caller's own grants and tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_act_only_within_their_own_rights() {
    let top = "auth:\n  tokens:\n    root: {token: root-token-0123456789, role: admin}\n    ops: {token: ops-token-0123456789, role: admin, servers: [pub]}\n    acme-admin: {token: acme-token-0123456789, role: admin, tenant: acme}\ntenants:\n  acme:\n    namespaces:\n      n: [pub]\n  other:\n    namespaces:\n      n: [priv]\n";
    let gw = gateway().demo("pub", &[], "").demo("priv", &[], "").top(top).start().await;
    let call = |method: reqwest::Method, path: &str, token: &'static str, body: Option<serde_json::Value>| {
        let url = format!("{}{path}", gw.url);
        async move { http_json(method, &url, Some(token), body.map(|b| b.to_string()).as_deref()).await }
    };
    use reqwest::Method;
    const OPS: &str = "ops-token-0123456789";
    const ROOT: &str = "root-token-0123456789";
    for (body, what) in [
        (serde_json::json!({"name": "x", "servers": ["priv"]}), "a server it cannot reach"),
        (serde_json::json!({"name": "y"}), "every server"),
        (serde_json::json!({"name": "z", "role": "admin"}), "an unrestricted admin"),
    ] {
        let (status, answer) = call(Method::POST, "/admin/tokens", OPS, Some(body)).await;
        assert_eq!(status, 403, "{what}: {answer}");
    }
    let (status, answer) = call(
        Method::POST,
        "/admin/tokens",
        OPS,
        Some(serde_json::json!({"name": "sub", "servers": ["pub"], "role": "admin"})),
    )
    .await;
    assert_eq!(status, 201, "a subset of its own rights: {answer}");
    // Servers: only those it reaches are visible or controllable.
    assert_eq!(call(Method::POST, "/servers/priv/stop", OPS, None).await.0, 404);
    assert_eq!(call(Method::GET, "/servers/priv", OPS, None).await.0, 404);
    let (_, list) = call(Method::GET, "/servers", OPS, None).await;
    let names: Vec<&str> = list["servers"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["pub"]);
    assert_eq!(call(Method::POST, "/servers/pub/restart", OPS, None).await.0, 200);
    for path in ["/stats", "/metrics"] {
        assert_eq!(call(Method::GET, path, OPS, None).await.0, 403, "{path}");
    }
    assert_eq!(call(Method::POST, "/admin/reload", OPS, None).await.0, 403);
    // Tokens it does not cover are invisible to it.
    let (_, wide) = call(Method::POST, "/admin/tokens", ROOT, Some(serde_json::json!({"name": "wide"}))).await;
    let wide_id = wide["id"].as_str().unwrap().to_owned();
    let (_, mine) = call(Method::GET, "/admin/tokens", OPS, None).await;
    let names: Vec<&str> = mine["tokens"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["sub"]);
    assert_eq!(call(Method::POST, &format!("/admin/tokens/{wide_id}/rotate"), OPS, None).await.0, 404);
    assert_eq!(call(Method::DELETE, &format!("/admin/tokens/{wide_id}"), OPS, None).await.0, 404);
    assert_eq!(call(Method::GET, &format!("/admin/tokens/{wide_id}"), OPS, None).await.0, 404);
    // A tenant's admin issues only in its tenant.
    const ACME: &str = "acme-token-0123456789";
    let (status, _) =
        call(Method::POST, "/admin/tokens", ACME, Some(serde_json::json!({"name": "t", "tenant": "other"}))).await;
    assert_eq!(status, 403);
    let (status, made) = call(Method::POST, "/admin/tokens", ACME, Some(serde_json::json!({"name": "t"}))).await;
    assert_eq!((status, made["tenant"].as_str()), (201, Some("acme")), "{made}");
    // The unrestricted admin still does everything.
    assert_eq!(call(Method::GET, "/stats", ROOT, None).await.0, 200);
    assert_eq!(call(Method::DELETE, &format!("/admin/tokens/{wide_id}"), ROOT, None).await.0, 200);
    gw.stop().await;
}

/// The value of one Prometheus series on `/metrics`.
async fn metric(gw: &TestGateway, token: &str, series: &str) -> Option<f64> {
    let (_, body) = http_json(reqwest::Method::GET, &format!("{}/metrics", gw.url), Some(token), None).await;
    let text = body["raw"].as_str().unwrap_or_default().to_owned();
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

/// Item 12: idle sessions end (and say so in a metric); sessions, legacy SSE streams and calls
/// in flight are bounded per identity, per session and in total, each with a clear answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_client_holds_open_is_bounded() {
    let top = "auth:\n  tokens:\n    root: {token: root-token-0123456789, role: admin}\n    u: u-token-0123456789\nlimits:\n  session_idle_timeout: 1s\n  max_sessions_per_identity: 3\n  max_sessions: 6\n  max_sse_streams_per_identity: 2\n  max_calls_per_session: 2\n";
    let gw = gateway().demo("a", &[], "").top(top).start().await;
    const ROOT: &str = "root-token-0123456789";
    // Idle: ended by the sweep, counted by cause; the client's next request gets 404.
    let idle = Client::connect_as(&gw.mcp(), "u-token-0123456789").await;
    gw.until(Duration::from_secs(10), || async {
        (metric(&gw, ROOT, "portcullis_sessions_ended_total{cause=\"idle\"}").await >= Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(idle.post(serde_json::json!({"jsonrpc":"2.0","id":1,"method":"ping"})).await.status(), 404);

    // Per identity: the fourth session is 429 with a JSON-RPC error saying so; others carry on.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Client::connect_as(&gw.mcp(), "u-token-0123456789").await);
    }
    let mut fourth = Client::new(&gw.mcp()).bearer("u-token-0123456789");
    fourth.version = "2025-11-25".into();
    let resp = fourth.post(serde_json::from_str(INIT).unwrap()).await;
    assert_eq!(resp.status(), 429);
    let v: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
    assert_eq!(v["error"]["code"], -32029, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("limit"), "{v}");
    // In total: 3 (u) + 3 (root) = 6; the seventh is 503.
    for _ in 0..3 {
        held.push(Client::connect_as(&gw.mcp(), ROOT).await);
    }
    let resp = Client::new(&gw.mcp()).bearer(ROOT).post(serde_json::from_str(INIT).unwrap()).await;
    assert_eq!(resp.status(), 503);
    // Calls in flight per session: two slow calls, then a third is refused at once.
    let s = held.pop().unwrap();
    let slow = |c: &Client| {
        let c = c.clone();
        tokio::spawn(async move { c.call("a__sleep", serde_json::json!({"ms": 3000})).await })
    };
    let (one, two) = (slow(&s), slow(&s));
    crate::upstream::wait_in_flight(&held[0], "a", 2).await;
    let third = s.call("a__echo", serde_json::json!({"text": "x"})).await;
    assert_eq!(third.response["error"]["code"], -32029, "{:?}", third.response);
    assert!(one.await.unwrap().response["result"].is_object() && two.await.unwrap().response["result"].is_object());
    assert_eq!(s.call_text("a__echo", serde_json::json!({"text": "again"})).await, "again");
    drop(held);
    gw.stop().await;

    // Legacy SSE streams per identity.
    let gw = gateway().demo("a", &[], "").top(top).start().await;
    let _a = crate::protocol::open_sse(&format!("{}/sse", gw.url), Some(ROOT)).await;
    let _b = crate::protocol::open_sse(&format!("{}/sse", gw.url), Some(ROOT)).await;
    let third = reqwest::Client::new().get(format!("{}/sse", gw.url)).bearer_auth(ROOT).send().await.unwrap();
    assert_eq!(third.status(), 429);
    gw.stop().await;
}

/// Reads from a raw connection until it is closed by the server; false if still open at `limit`.
async fn closed_within(conn: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, conn.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Item 14: a header-read timeout, an idle keep-alive timeout and a connection cap, none of
/// which ends a healthy long-lived SSE stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_and_idle_connections_are_closed_but_streams_are_not() {
    use tokio::io::AsyncWriteExt;
    let top = "limits:\n  header_read_timeout: 1s\n  keep_alive_timeout: 2s\n  body_read_timeout: 1s\n  max_connections: 40\n";
    let gw = gateway().demo("a", &[], "").top(top).start().await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    // 20 connections trickling one header byte per 100 ms: closed after about a second.
    let request = format!("POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n");
    let mut trickles = Vec::new();
    for _ in 0..20 {
        let addr = addr.clone();
        let request = request.clone();
        trickles.push(tokio::spawn(async move {
            let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let started = tokio::time::Instant::now();
            for b in request.bytes().cycle() {
                if conn.write_all(&[b]).await.is_err() {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                if started.elapsed() > Duration::from_secs(10) {
                    panic!("a trickling connection is still open after 10 s");
                }
            }
            unreachable!()
        }));
    }
    // Meanwhile a session's GET stream outlives both clocks.
    let client = Client::connect(&gw.mcp()).await;
    let mut events = client.get_stream().await;
    for t in trickles {
        assert!(t.await.unwrap() < Duration::from_secs(5));
    }
    // A body that trickles (the headers done) gets 408 once its clock runs out.
    let mut slow_body = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n{{"
    );
    slow_body.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(8), async {
        let mut buf = [0u8; 1024];
        while let Ok(n) = slow_body.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&answer));
    // An idle keep-alive connection is closed once its clock runs out.
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(format!("GET /health HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await.unwrap();
    assert!(closed_within(&mut conn, Duration::from_secs(8)).await, "an idle connection stayed open");
    // The stream is still alive: it carries the list change that a restart causes.
    let _ = client.call("a__crash", serde_json::json!({})).await;
    events.next_method("notifications/tools/list_changed").await;
    gw.stop().await;

    // The connection cap: past it, new connections are closed at once.
    let gw = gateway().demo("a", &[], "").top("limits:\n  max_connections: 3\n").start().await;
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(5)).await, "a connection past the cap was served");
    drop(open);
    // Served again once the server has let a connection go.
    gw.until(Duration::from_secs(5), || async { reqwest::get(format!("{}/health", gw.url)).await.ok().map(|_| ()) })
        .await;
    gw.stop().await;
}

/// Item 15: `portcullis stdio` and a child's stderr take lines of bounded length: a clear error,
/// the next line read as usual, and no memory growth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_lines_are_refused_without_memory_growth() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    // The child writes a 10 MB stderr line before it starts serving.
    let noisy = format!("head -c 10000000 /dev/zero | tr '\\\\0' x >&2; echo >&2; exec {BIN} demo-server --fixtures");
    std::fs::write(
        &cfg,
        format!("servers:\n  a:\n    command: sh\n    args: [\"-c\", {}]\n", serde_json::json!(noisy)),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args(["stdio", "--config", cfg.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut err = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let log = tokio::spawn(async move {
        let mut all = String::new();
        while let Ok(Some(l)) = err.next_line().await {
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    // A 24 MiB line (the limit is max_body_bytes, 4 MiB), written in pieces.
    let piece = vec![b'x'; 1 << 20];
    for _ in 0..24 {
        stdin.write_all(&piece).await.unwrap();
    }
    stdin.write_all(b"\n").await.unwrap();
    stdin.write_all(format!("{INIT}\n").as_bytes()).await.unwrap();
    stdin.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"a__echo\",\"arguments\":{\"text\":\"fine\"}}}\n").await.unwrap();
    let mut seen = Vec::new();
    let answer = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), out.next_line()).await.unwrap().unwrap().unwrap();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["id"] == 2 {
            break v;
        }
        seen.push(v);
    };
    assert!(
        seen.iter()
            .any(|v| v["error"]["code"] == -32600 && v["error"]["message"].as_str().unwrap().contains("longer than")),
        "{seen:?}"
    );
    assert_eq!(answer["result"]["content"][0]["text"], "fine", "{answer}");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap();
    assert!(rss_kb < 60_000, "peak RSS {rss_kb} kB after a 24 MiB line and a 10 MB stderr line");
    drop(stdin);
    let _ = child.wait().await;
    let log = log.await.unwrap();
    assert!(log.contains("stderr line longer than 65536 bytes; skipped"), "{}", &log[..log.len().min(2000)]);
}

/// Item 16: the SSE parser as the WHATWG standard reads a stream (the property test beside the
/// parser compares it with the specification's algorithm on random streams).
#[test]
fn the_sse_parser_reads_streams_as_the_standard_does() {
    use portcullis::mcp::sse::Parser;
    let mut p = Parser::new(1 << 20);
    let events = p.feed(b"data: one\r\rdata: two\r\r").unwrap();
    assert_eq!(events.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(), ["one", "two"], "CR-only line endings");
    let mut p = Parser::new(1 << 20);
    let events = p.feed(b"\xEF\xBB\xBFdata: first\n\n").unwrap();
    assert_eq!(events.len(), 1, "a leading byte-order mark lost the first event");
    let mut p = Parser::new(1 << 20);
    assert!(p.feed(b"event: ping\n\n").unwrap().is_empty(), "a block with only event: is not dispatched");
    // One 4 MiB event in 16 KiB chunks: one event, its data whole.
    let mut big = b"data: ".to_vec();
    big.extend(std::iter::repeat_n(b'y', 4 << 20));
    big.extend_from_slice(b"\n\n");
    let mut p = Parser::new(8 << 20);
    let mut events = Vec::new();
    for chunk in big.chunks(16 * 1024) {
        events.extend(p.feed(chunk).unwrap());
    }
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].data.len(), 4 << 20);
}

/// Item 17: a remote upstream that forgot its sessions (a restart the gateway did not see) is
/// re-initialized once and the request sent again, whether it answers 404 or the 400 "No valid
/// session ID provided" of SDK servers: the caller sees only its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_remote_upstream_is_reinitialized_transparently() {
    for args in [&[][..], &["--unknown-session-400"][..]] {
        let up = http_demo(args).await;
        let gw = gateway().remote("d", &up.url, "transport: streamable_http").start().await;
        let client = Client::connect(&gw.mcp()).await;
        assert_eq!(client.call_text("d__echo", serde_json::json!({"text": "before"})).await, "before");
        assert_eq!(client.call_text("d__forget_sessions", serde_json::json!({})).await, "forgotten");
        let a = client.call("d__echo", serde_json::json!({"text": "after"})).await;
        assert_eq!(a.response["result"]["content"][0]["text"], "after", "{args:?}: {:?}", a.response);
        gw.stop().await;
    }
}

/// Items 18 and 19: an unreachable remote server is shown as such in its state, `/health`,
/// the up metric and call errors (naming it), is probed without the crash-loop breaker, and
/// works again within about a second of coming back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_remote_server_says_so_and_recovers_quickly() {
    // A session-era server with no GET stream: nothing but the probe can notice it is gone.
    let HttpDemo { url, _child: mut child } = http_demo(&["--session-only"]).await;
    let port: u16 = url.trim_end_matches("/mcp").rsplit(':').next().unwrap().parse().unwrap();
    let gw = gateway().remote("far", &url, "transport: streamable_http").start().await;
    let client = Client::connect(&gw.mcp()).await;
    assert_eq!(client.call_text("far__echo", serde_json::json!({"text": "up"})).await, "up");
    child.kill().await.unwrap();
    let _ = child.wait().await;
    let server = format!("{}/servers/far", gw.url);
    let state = |url: String| async move { http_json(reqwest::Method::GET, &url, None, None).await.1 };
    // Noticed without any call (the demo has no GET stream: the probe finds it gone), in
    // `/health` and the up metric, which make no upstream call themselves.
    let health = format!("{}/health", gw.url);
    // Each wait below re-checks on a change of the upstream's status (a failed probe, a
    // failed reconnect, a reconnect), never on a timer.
    gw.until(Duration::from_secs(15), || async {
        (http_json(reqwest::Method::GET, &health, None, None).await.1["status"] == "degraded").then_some(())
    })
    .await;
    let (_, metrics) = http_json(reqwest::Method::GET, &format!("{}/metrics", gw.url), None, None).await;
    assert!(metrics["raw"].as_str().unwrap().contains("portcullis_upstream_up{server=\"far\"} 0"));
    gw.until(Duration::from_secs(10), || async {
        (state(server.clone()).await["state"] == "unreachable").then_some(())
    })
    .await;
    // Reported everywhere.
    let failed = gw
        .until(Duration::from_secs(10), || async {
            // (A call in flight when it went away may get "closed the connection" first.)
            let a = client.call("far__echo", serde_json::json!({"text": "x"})).await;
            a.response["error"]["message"].as_str().filter(|m| m.contains("unreachable")).map(str::to_owned)
        })
        .await;
    assert!(failed.contains("server far"), "{failed}");
    gw.until(Duration::from_secs(10), || async {
        (state(server.clone()).await["state"] == "unreachable").then_some(())
    })
    .await;
    let (status, health) = http_json(reqwest::Method::GET, &format!("{}/health", gw.url), None, None).await;
    assert_eq!((status, health["status"].as_str()), (200, Some("degraded")), "{health}");
    let (_, metrics) = http_json(reqwest::Method::GET, &format!("{}/metrics", gw.url), None, None).await;
    assert!(metrics["raw"].as_str().unwrap().contains("portcullis_upstream_up{server=\"far\"} 0"));
    // Gone for longer than five failed connects: no breaker, it keeps probing.
    gw.until(Duration::from_secs(20), || async {
        (state(server.clone()).await["restarts"].as_u64() >= Some(8)).then_some(())
    })
    .await;
    assert_eq!(state(server.clone()).await["state"], "unreachable");
    // Back on the same address: calls work again at the next attempt (the backoff of a remote
    // server stops at one second: `upstream::tests`), so well within the wait's bound.
    let _back = http_demo_on(port, &["--session-only"]).await;
    let text = gw
        .until(Duration::from_secs(5), || async {
            let a = client.call("far__echo", serde_json::json!({"text": "again"})).await;
            a.response["result"]["content"][0]["text"].as_str().map(str::to_owned)
        })
        .await;
    assert_eq!(text, "again");
    assert_eq!(state(server).await["state"], "running");
    let (_, health) = http_json(reqwest::Method::GET, &format!("{}/health", gw.url), None, None).await;
    assert_eq!(health["status"], "ok");
    gw.stop().await;
}

/// Issue 12: `portcullis stdio` writes one audit record per message, as every other surface.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdio_writes_one_audit_record_per_message() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    let audit = dir.0.join("audit.jsonl");
    let top = format!("audit:\n  file: {:?}\n", audit.display().to_string());
    std::fs::write(&cfg, gateway().demo("a", &[], "").top(&top).yaml()).unwrap();
    let mut child = Command::new(BIN)
        .args(["stdio", "--config", cfg.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let call = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"a__echo","arguments":{"text":"x"}}}"#;
    stdin
        .write_all(
            format!("{INIT}\n{{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}}\n{call}\nnot json\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    loop {
        let line = tokio::time::timeout(Duration::from_secs(20), out.next_line()).await.unwrap().unwrap().unwrap();
        if serde_json::from_str::<serde_json::Value>(&line).unwrap()["id"] == 2 {
            break;
        }
    }
    drop(stdin);
    let _ = child.wait().await;
    let text = std::fs::read_to_string(&audit).unwrap();
    let records: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let methods: Vec<&str> = records.iter().map(|r| r["method"].as_str().unwrap()).collect();
    for m in ["initialize", "notifications/initialized", "tools/call", ""] {
        assert_eq!(methods.iter().filter(|x| **x == m).count(), 1, "{m:?} in {methods:?}");
    }
    let call = records.iter().find(|r| r["method"] == "tools/call").unwrap();
    assert_eq!((call["server"].as_str(), call["outcome"].as_str()), (Some("a"), Some("allowed")), "{call}");
    let bad = records.iter().find(|r| r["method"] == "").unwrap();
    assert_eq!(bad["outcome"], "refused: invalid message", "{bad}");
}

/// Item 12: a session refused by a limit starts nothing: no per-session child is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_refused_by_a_limit_leaves_no_child_behind() {
    let marker = format!("ps-{}", std::process::id());
    let gw = gateway()
        .demo(&marker, &[], "share: per_session")
        .top("limits:\n  max_sessions_per_identity: 1\n")
        .start()
        .await;
    let children = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
            .filter(|c| String::from_utf8_lossy(c).contains(&marker))
            .count()
    };
    let url = gw.server(&marker);
    let first = Client::connect(&url).await;
    assert_eq!(children(), 1, "the first session's own child");
    let resp = Client::new(&url).post(serde_json::from_str(INIT).unwrap()).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(children(), 1, "the refused session started a child");
    drop(first);
    gw.stop().await;
}

/// A server name in the path that is not UTF-8 once percent-decoded is refused, never read as
/// the aggregated endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_name_that_is_not_utf8_is_refused_not_widened() {
    let gw = gateway().demo("a", &[], "").start().await;
    let init = serde_json::json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"it","version":"1"}}});
    for path in ["/servers/%FF/mcp", "/%FF/mcp"] {
        let resp = Client::new(&format!("{}{path}", gw.url)).post(init.clone()).await;
        assert_eq!(resp.status(), 400, "{path}");
        let body: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
        assert_eq!(body["error"]["code"], -32600, "{path}: {body}");
    }
    assert_eq!(Client::new(&gw.mcp()).post(init).await.status(), 200);
}

/// Issue 12: an answer sent after the POST returned (a streamed answer; legacy SSE) is audited
/// once, with its server and tool, before the client has it; one whose client goes away
/// mid-stream is audited once too, still naming its target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_sent_later_are_audited_once_with_their_target() {
    let gw = gateway().demo("a", &[], "").start().await;
    let client = Client::connect(&gw.mcp()).await;
    let progress = |id: u64, steps: u64, ms: u64| {
        serde_json::json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{"name":"a__progress",
            "arguments":{"steps":steps,"ms":ms,"text":"t"},"_meta":{"progressToken":format!("p{id}")}}})
    };
    // Streamed to the end: the record is there once the answer is.
    let streamed = client.post(progress(7, 2, 20)).await;
    assert!(streamed.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut events = Events::from_response(streamed);
    loop {
        if events.next().await["id"] == 7 {
            break;
        }
    }
    // Abandoned after its first progress message: recorded once the work is dropped.
    let abandoned = client.post(progress(8, 50, 200)).await;
    let mut events = Events::from_response(abandoned);
    assert_eq!(events.next().await["method"], "notifications/progress");
    drop(events);
    // The audit thread writes in order: once 8 is there, any second record of 7 would be too.
    let records = gw.audit_until(|r| r.iter().any(|r| r["request_id"] == "8")).await;
    for id in ["7", "8"] {
        let of: Vec<&serde_json::Value> = records.iter().filter(|r| r["request_id"] == id).collect();
        assert_eq!(of.len(), 1, "{id}: {records:?}");
        assert_eq!((of[0]["server"].as_str(), of[0]["name"].as_str()), (Some("a"), Some("progress")), "{of:?}");
        assert_eq!((of[0]["status"].as_u64(), of[0]["outcome"].as_str()), (Some(200), Some("allowed")), "{of:?}");
    }
    gw.stop().await;
}
