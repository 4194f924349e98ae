//! Secrets never leak, and the audit sink cannot be silenced: the real binary at trace level,
//! every sink scanned for every secret in every encoding; the upstream's view of the request
//! checked for client credentials; `serve` credential rules and `--generate-token`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::support::*;

/// Starts `portcullis serve` with stderr going to a file; returns the child and its base URL
/// once it says it is ready (the service manager's `READY=1`, logging on or off).
pub(crate) async fn serve(dir: &Path, config: &str, args: &[&str], env: &[(&str, &str)]) -> (Child, String, PathBuf) {
    let cfg = dir.join("portcullis.yaml");
    std::fs::write(&cfg, config).unwrap();
    let stderr_path = dir.join(format!("stderr-{}.log", args.len()));
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let ready = Readiness::new();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"]).args(args);
    let (k, v) = ready.env();
    cmd.env(k, v);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.stdout(Stdio::null()).stderr(stderr).kill_on_drop(true).spawn().unwrap();
    let status = ready.ready().await;
    let url = status.strip_prefix("listening on ").unwrap_or_else(|| panic!("{status:?}"));
    (child, url.trim_end_matches("/mcp").to_owned(), stderr_path)
}

/// Stops a served child at once (SIGINT: no drain period) and waits for it.
pub(crate) async fn stop(child: &mut Child) {
    let pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
}

/// Every form of a secret that must not appear anywhere.
fn forms(secret: &str) -> Vec<String> {
    let mut out = vec![
        secret.to_owned(),
        url_encode(secret),
        base64::engine::general_purpose::STANDARD.encode(secret),
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
    ];
    let chars: Vec<char> = secret.chars().collect();
    for w in chars.windows(8) {
        out.push(w.iter().collect());
    }
    out
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn assert_clean(what: &str, text: &str, secrets: &[&str]) {
    for secret in secrets {
        for form in forms(secret) {
            assert!(!text.contains(&form), "{what} contains {form:?} (a form of a secret)");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_a_log_an_audit_record_an_answer_or_an_upstream() {
    let dir = TempDir::new();
    let alice = "Qz7alice-Secret-Value-91x";
    let envtok = "Wp3env-Token-Value-55k";
    let intro = "Kx9QvR7-zT4wYp2-Lm8nB3q";
    // The client secret of Portcullis' own account at a remote server's provider (which cannot
    // be reached: the secret is used and must show nowhere).
    let up_secret = "Ur5Qp7-Zx2Kw9-Vn4Tb8-Jh3M";
    let upstream = http_demo(&[]).await;
    let audit = dir.0.join("audit.jsonl");
    // An issuer whose introspection endpoint cannot be reached: its client secret is used (an
    // opaque token below is introspected) and must show nowhere.
    // And an identity provider whose access tokens are used below, accepted and refused.
    let k1 = crate::oauth::key("k1");
    let idp = crate::oauth::provider(&[&k1]).await;
    let oauth = format!(
        "oauth:\n  issuers:\n    - issuer: \"http://127.0.0.1:1\"\n      jwks_uri: \"http://127.0.0.1:1/jwks\"\n      introspection: {{endpoint: \"http://127.0.0.1:1/introspect\", client_id: portcullis, client_secret: \"${{INTRO_SECRET}}\"}}\n    - issuer: {:?}\n      scopes: {{all: {{}}}}\n",
        idp.issuer
    );
    let config = format!(
        "servers:\n  h:\n    url: {:?}\n  s:\n    command: {BIN:?}\n    args: [demo-server, --fixtures]\n  o:\n    url: \"http://127.0.0.1:1/mcp\"\n    oauth: {{grant: client_credentials, client_id: portcullis, client_secret: \"${{UP_SECRET}}\", token_endpoint: \"http://127.0.0.1:1/token\"}}\nauth:\n  max_failures_per_minute: 1000\n  tokens:\n    alice: \"${{ALICE_TOKEN}}\"\naudit:\n  file: {:?}\n{oauth}",
        upstream.url,
        audit.display().to_string()
    );
    let env = [
        ("ALICE_TOKEN", alice),
        ("PORTCULLIS_TOKEN", envtok),
        ("INTRO_SECRET", intro),
        ("UP_SECRET", up_secret),
        ("RUST_LOG", "trace"),
    ];
    let (mut child, url, stderr) = serve(&dir.0, &config, &[], &env).await;
    let mcp = format!("{url}/mcp");
    let jwt = crate::oauth::token(&idp, &k1, "jay", &mcp, "all", json!({}));
    let expired = crate::oauth::token(&idp, &k1, "jay", &mcp, "all", json!({"exp": crate::oauth::now() - 600}));
    let elsewhere = crate::oauth::token(&idp, &k1, "jay", "http://127.0.0.1:9/mcp", "all", json!({}));
    // Only the signature is the token's own: header and claims are shapes any token shares.
    let signature = |t: &str| t.rsplit('.').next().unwrap().to_owned();
    let (jwt_sig, expired_sig, elsewhere_sig) = (signature(&jwt), signature(&expired), signature(&elsewhere));
    let secrets = [alice, envtok, intro, up_secret, jwt_sig.as_str(), expired_sig.as_str(), elsewhere_sig.as_str()];
    let near = format!("{}#", &alice[..alice.len() - 1]);
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("user:{alice}")));
    let mut answers = String::new();
    let attempts: Vec<Vec<(&str, String)>> = vec![
        vec![("authorization", format!("Bearer {near}"))],
        vec![("authorization", basic)],
        vec![("authorization", format!("Bearer {alice}")), ("x-api-key", envtok.to_owned())],
        vec![("x-api-key", format!("{alice}x"))],
        vec![("authorization", "Bearer an-opaque-token-to-introspect".to_owned())],
        vec![("authorization", format!("Bearer {expired}"))],
        vec![("authorization", format!("Bearer {elsewhere}"))],
        vec![("authorization", format!("Bearer {jwt}x"))],
        vec![],
    ];
    let http = reqwest::Client::new();
    for headers in &attempts {
        let mut req = http.post(format!("{mcp}?token={alice}")).header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        let resp = req.body(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#).send().await.unwrap();
        answers.push_str(&format!("{:?}\n", resp.headers()));
        answers.push_str(&resp.text().await.unwrap());
    }
    // Real traffic with both valid tokens, to both upstreams, including an upstream error.
    for token in [alice, envtok, jwt.as_str()] {
        let client = Client::connect_as(&mcp, token).await;
        for tool in ["h__echo", "s__echo"] {
            let a = client.call(tool, json!({"text": "hi"})).await;
            answers.push_str(&a.response.to_string());
        }
        answers.push_str(&client.call("h__fail", json!({})).await.response.to_string());
        answers.push_str(&client.call("h__nope", json!({})).await.response.to_string());
    }
    let client = Client::connect_as(&mcp, alice).await;
    let seen: Value = serde_json::from_str(&client.call_text("h__stats", json!({})).await).unwrap();
    let upstream_view = seen["seen_headers"].to_string();
    assert!(upstream_view.contains("mcp-protocol-version"), "the demo recorded nothing: {upstream_view}");
    assert!(!upstream_view.to_ascii_lowercase().contains("authorization"), "{upstream_view}");
    assert_clean("what the upstream received", &upstream_view, &secrets);
    stop(&mut child).await;

    let check = std::process::Command::new(BIN)
        .args(["check", "--config", dir.0.join("portcullis.yaml").to_str().unwrap()])
        .env("ALICE_TOKEN", alice)
        .env("PORTCULLIS_TOKEN", envtok)
        .env("INTRO_SECRET", intro)
        .env("UP_SECRET", up_secret)
        .output()
        .unwrap();
    let check_out = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success(), "{check_out}");

    let log = std::fs::read_to_string(&stderr).unwrap();
    assert!(log.lines().count() > 20, "trace logging produced almost nothing:\n{log}");
    let audit_text = std::fs::read_to_string(&audit).unwrap();
    assert!(audit_text.lines().count() >= 10, "{audit_text}");
    for (what, text) in
        [("stderr at trace level", &log), ("the audit file", &audit_text), ("answers", &answers), ("check", &check_out)]
    {
        assert_clean(what, text, &secrets);
    }
    assert!(log.contains("token introspection failed"), "the opaque token was not introspected:\n{log}");
    assert!(log.contains("could not obtain an access token"), "the upstream's token was not asked for:\n{log}");
    idp.stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_sink_holds_one_record_per_request_with_logging_off() {
    let dir = TempDir::new();
    let config = format!("servers:\n  s:\n    command: {BIN:?}\n    args: [demo-server, --fixtures]\n");
    let (mut child, url, stderr) = serve(&dir.0, &config, &[], &[("RUST_LOG", "off")]).await;
    let client = Client::connect(&format!("{url}/mcp")).await; // initialize + initialized
    client.call_text("s__echo", json!({"text": "one"})).await;
    client.call_text("s__echo", json!({"text": "two"})).await;
    stop(&mut child).await;
    // The default audit file, beside the (default) store; nothing of it in the log.
    let logged = std::fs::read_to_string(&stderr).unwrap();
    assert!(!logged.contains("\"outcome\""), "audit records in the log: {logged}");
    let text = std::fs::read_to_string(dir.0.join("portcullis-audit.jsonl")).unwrap();
    let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let methods: Vec<&str> = records.iter().filter_map(|r| r["method"].as_str()).collect();
    assert_eq!(methods, ["initialize", "notifications/initialized", "tools/call", "tools/call"], "{text}");
    assert!(records.iter().all(|r| r["outcome"] == "allowed" && r["identity"] == "anonymous"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_an_open_non_loopback_listener_and_generates_tokens() {
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, "servers: {}\n").unwrap();
    // Refused before anything is bound.
    let out = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap(), "--listen", "0.0.0.0:0"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to serve") && err.contains("--allow-unauthenticated"), "{err}");

    // --generate-token: printed once, accepted, and nothing else gets in.
    let (mut child, url, stderr) = serve(&dir.0, "servers: {}\n", &["--generate-token"], &[]).await;
    let text = std::fs::read_to_string(&stderr).unwrap();
    let token = text.lines().find_map(|l| l.split("(shown once): ").nth(1)).unwrap().trim().to_owned();
    assert!(token.starts_with("pcs_") && token.len() == 47, "{token}");
    assert_eq!(text.matches(&token).count(), 1);
    let mcp = format!("{url}/mcp");
    Client::connect_as(&mcp, &token).await;
    let anon = reqwest::Client::new()
        .post(&mcp)
        .header("content-type", "application/json")
        .body(r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    stop(&mut child).await;
}
