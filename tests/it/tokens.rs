//! Issued tokens: the CLI against the store of a running gateway (create, use, rotate with
//! overlap, revoke closing streams within a second), expiry, concurrent writers, the admin API,
//! a store that is down (503), and no secret in the database files.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Command;

use crate::support::*;

const ROOT: &str = "root-secret-0123456789abcdef0";

async fn token_cli(cfg: &Path, args: &[&str]) -> (bool, String, String) {
    let out =
        Command::new(BIN).arg("token").args(args).args(["--config", cfg.to_str().unwrap()]).output().await.unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn create(cfg: &Path, args: &[&str]) -> Value {
    let (ok, out, err) = token_cli(cfg, &[&["create", "--json"], args].concat()).await;
    assert!(ok, "{err}");
    serde_json::from_str(out.lines().next().unwrap()).unwrap()
}

async fn status_with(url: &str, secret: &str) -> u16 {
    let body = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    post_as(url, secret, &body).await.status().as_u16()
}

async fn serve(dir: &Path) -> (tokio::process::Child, String, std::path::PathBuf) {
    let cfg = dir.join("portcullis.yaml");
    let yaml = gateway()
        .demo("a", &[], "")
        .top(&format!("auth:\n  tokens:\n    root: {{token: {ROOT}, role: admin}}\n"))
        .yaml();
    std::fs::write(&cfg, yaml).unwrap();
    let mut child = Command::new(BIN)
        .args(["serve", "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = listen_url(&mut child).await;
    (child, url, cfg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_issues_rotates_and_revokes_tokens_on_a_running_gateway() {
    let dir = TempDir::new();
    let (_child, mcp, cfg) = serve(&dir.0).await;
    let alice = create(&cfg, &["--name", "alice", "--tools", "a__echo,a__sleep"]).await;
    let secret = alice["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("pcs_") && secret.len() == 47);
    assert_eq!(alice["prefix"], &secret[..8]);
    // A token created while the gateway runs works at once: an unknown digest is looked up.
    assert_eq!(status_with(&mcp, &secret).await, 200);
    let client = Client::connect_as(&mcp, &secret).await;
    assert_eq!(client.all_tools().await, ["a__echo", "a__sleep"], "the token's grants apply");
    let (ok, _, err) = token_cli(&cfg, &["create", "--name", "alice"]).await;
    assert!(!ok && err.contains("already exists"), "{err}");

    // Rotation: both secrets work during the grace.
    let (ok, out, err) = token_cli(&cfg, &["rotate", "alice", "--grace", "1h", "--json"]).await;
    assert!(ok, "{err}");
    let rotated: Value = serde_json::from_str(out.trim()).unwrap();
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, secret);
    assert_eq!(status_with(&mcp, &secret).await, 200);
    assert_eq!(status_with(&mcp, &new_secret).await, 200);

    // Revocation by the CLI: the open session's stream closes within a second, and the token fails.
    let fresh = Client::connect_as(&mcp, &new_secret).await;
    let mut stream = fresh.get_stream().await;
    let (ok, _, err) = token_cli(&cfg, &["revoke", "alice"]).await;
    assert!(ok, "{err}");
    // The sweep runs four times a second (`gateway::SWEEP_EVERY`, asserted at compile time).
    tokio::time::timeout(Duration::from_secs(2), stream.ended()).await.expect("the stream stayed open");
    assert_eq!(status_with(&mcp, &new_secret).await, 401);
    // The superseded secret keeps its grace: revoking the live one does not end it.
    assert_eq!(status_with(&mcp, &secret).await, 200);

    // Expiry.
    let brief = create(&cfg, &["--name", "brief", "--ttl", "1ms"]).await;
    assert_eq!(status_with(&mcp, brief["secret"].as_str().unwrap()).await, 401);
    let (ok, out, _) = token_cli(&cfg, &["list", "--json"]).await;
    assert!(ok);
    let states: Vec<(String, String)> = out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v["state"].as_str().unwrap().to_owned()))
        .collect();
    assert!(states.contains(&("brief".into(), "expired".into())), "{states:?}");
    assert!(states.contains(&("alice".into(), "revoked".into())), "{states:?}");
    assert!(states.contains(&("alice".into(), "expiring".into())), "the superseded one in its grace: {states:?}");
    assert!(!out.contains(&secret) && !out.contains(&new_secret), "list shows a secret");
    for bad in [["--ttl", "soon"], ["--rate", "fast"], ["--servers", "nope"]] {
        let (ok, _, err) = token_cli(&cfg, &[&["create", "--name", "x"], &bad[..]].concat()).await;
        assert!(!ok && !err.is_empty(), "{bad:?}");
    }
    let (ok, _, err) = token_cli(&cfg, &["revoke", "nobody"]).await;
    assert!(!ok && err.contains("no live token"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_stay_consistent_and_no_secret_reaches_the_files() {
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, "servers: {}\n").unwrap();
    // Two processes creating 500 tokens each, at once.
    let run = |name: &'static str| {
        let cfg = cfg.clone();
        async move {
            Command::new(BIN)
                .args([
                    "token",
                    "create",
                    "--name",
                    name,
                    "--repeat",
                    "500",
                    "--json",
                    "--config",
                    cfg.to_str().unwrap(),
                ])
                .output()
                .await
                .unwrap()
        }
    };
    let (a, b) = tokio::join!(run("p"), run("q"));
    assert!(
        a.status.success() && b.status.success(),
        "{}{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let secrets: Vec<String> = [&a.stdout, &b.stdout]
        .iter()
        .flat_map(|o| String::from_utf8_lossy(o).lines().map(str::to_owned).collect::<Vec<_>>())
        .map(|l| serde_json::from_str::<Value>(&l).unwrap()["secret"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(secrets.len(), 1000);
    let (ok, out, _) = token_cli(&cfg, &["list", "--json"]).await;
    assert!(ok);
    let usable =
        out.lines().filter(|l| l.contains("\"state\":\"active\"") || l.contains("\"state\":\"expiring\"")).count();
    assert_eq!(usable, 1000);

    // A rotate and a revoke of one token at once end as one of the two serial orders.
    create(&cfg, &["--name", "contested"]).await;
    let cli = |args: Vec<&'static str>| {
        let cfg = cfg.clone();
        async move {
            Command::new(BIN).arg("token").args(args).args(["--config", cfg.to_str().unwrap()]).output().await.unwrap()
        }
    };
    let (rot, rev) = tokio::join!(cli(vec!["rotate", "contested", "--grace", "1h"]), cli(vec!["revoke", "contested"]));
    let (ok, out, _) = token_cli(&cfg, &["list", "--json"]).await;
    assert!(ok);
    let rows: Vec<Value> =
        out.lines().map(|l| serde_json::from_str(l).unwrap()).filter(|v: &Value| v["name"] == "contested").collect();
    let states: Vec<&str> = rows.iter().map(|r| r["state"].as_str().unwrap()).collect();
    match (rot.status.success(), rev.status.success()) {
        // rotate, then revoke (of the new live one): the old one in its grace, the new revoked.
        (true, true) => {
            let mut s = states.clone();
            s.sort();
            assert_eq!(s, ["expiring", "revoked"], "{rows:?}");
        }
        // revoke, then rotate (which finds nothing live).
        (false, true) => assert_eq!(states, ["revoked"], "{rows:?}"),
        other => panic!("no serial order gives {other:?}: {rows:?}"),
    }

    // No secret in the database, its WAL or its shared memory, before and after a checkpoint.
    let files = |dir: &Path| -> Vec<u8> {
        let mut all = Vec::new();
        for f in ["portcullis.db", "portcullis.db-wal", "portcullis.db-shm"] {
            all.extend(std::fs::read(dir.join(f)).unwrap_or_default());
        }
        all
    };
    let scan = |bytes: &[u8]| {
        for s in &secrets {
            assert!(!bytes.windows(s.len()).any(|w| w == s.as_bytes()), "a secret is in the database files");
        }
    };
    scan(&files(&dir.0));
    let store =
        portcullis::store::Store::open(&portcullis::store::StoreLocation::File(dir.0.join("portcullis.db"))).unwrap();
    store.checkpoint().unwrap();
    scan(&files(&dir.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_manages_tokens_and_a_down_store_answers_503() {
    let gw = gateway()
        .demo("a", &[], "")
        .top(&format!(
            "auth:\n  tokens:\n    root: {{token: {ROOT}, role: admin}}\n    user: user-secret-0123456789abcdef\n"
        ))
        .start()
        .await;
    let api = |method: reqwest::Method, path: &str, token: &str, body: Option<Value>| {
        let (url, token) = (format!("{}{path}", gw.url), token.to_owned());
        async move { http_json(method, &url, Some(&token), body.map(|b| b.to_string()).as_deref()).await }
    };
    let (status, created) =
        api(reqwest::Method::POST, "/admin/tokens", ROOT, Some(json!({"name": "svc", "ttl": "30d"}))).await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_owned();
    let secret = created["secret"].as_str().unwrap().to_owned();
    assert_eq!(status_with(&gw.mcp(), &secret).await, 200);
    assert_eq!(
        api(reqwest::Method::POST, "/admin/tokens", "user-secret-0123456789abcdef", Some(json!({"name": "x"}))).await.0,
        403
    );
    let (status, one) = api(reqwest::Method::GET, &format!("/admin/tokens/{id}"), ROOT, None).await;
    assert_eq!((status, one.get("secret")), (200, None), "a secret outside creation: {one}");
    let (_, list) = api(reqwest::Method::GET, "/admin/tokens", ROOT, None).await;
    assert!(!list.to_string().contains(&secret));
    assert_eq!(
        api(reqwest::Method::POST, "/admin/tokens", ROOT, Some(json!({"name": "svc"}))).await.0,
        400,
        "duplicate"
    );
    let (status, rotated) =
        api(reqwest::Method::POST, &format!("/admin/tokens/{id}/rotate"), ROOT, Some(json!({"grace": "0s"}))).await;
    assert_eq!(status, 200);
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_eq!(status_with(&gw.mcp(), &secret).await, 401, "no grace: the old secret stops at once");
    assert_eq!(status_with(&gw.mcp(), &new_secret).await, 200);
    let new_id = rotated["id"].as_str().unwrap().to_owned();
    // Revocation through the API takes effect at once.
    assert_eq!(api(reqwest::Method::DELETE, &format!("/admin/tokens/{new_id}"), ROOT, None).await.0, 200);
    assert_eq!(status_with(&gw.mcp(), &new_secret).await, 401);
    // Idempotent: revoking it again answers 200 with the token, still revoked; times are RFC 3339.
    let (status, again) = api(reqwest::Method::DELETE, &format!("/admin/tokens/{new_id}"), ROOT, None).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["state"], "revoked", "{again}");
    assert!(humantime::parse_rfc3339(again["revoked_at"].as_str().unwrap()).is_ok(), "{again}");

    // The store goes bad under the running gateway: an issued token may be valid, so 503.
    let (_, another) = api(reqwest::Method::POST, "/admin/tokens", ROOT, Some(json!({"name": "later"}))).await;
    let later = another["secret"].as_str().unwrap().to_owned();
    let db = gw.audit.with_file_name("tokens.db");
    for suffix in ["", "-wal", "-shm"] {
        let p = format!("{}{suffix}", db.display());
        if std::path::Path::new(&p).exists() {
            std::fs::write(&p, vec![0u8; 8192]).unwrap();
        }
    }
    let resp = reqwest::Client::new()
        .post(gw.mcp())
        .header("authorization", format!("Bearer {later}"))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().get("retry-after").is_some());
    // Config tokens do not depend on the store.
    assert_eq!(status_with(&gw.mcp(), ROOT).await, 200);
    gw.stop().await;
}
