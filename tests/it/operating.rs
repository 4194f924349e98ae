//! The first hour of an operator: the token CLI says which store it uses and reads a config
//! whose unrelated secrets are unset, shows times as RFC 3339 and rates as written, creates the
//! store for its owner only, revokes idempotently; log lines read as written.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::Value;
use tokio::process::Command;

use crate::support::*;

async fn token_cli(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    run_cli(Some(dir), &[&["token"], args].concat(), env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_cli_says_where_and_what() {
    // No config: the store in the working directory, and the CLI says so.
    let bare = TempDir::new();
    let (ok, out, err) = token_cli(&bare.0, &["create", "--name", "alice", "--rate", "5/min", "--json"], &[]).await;
    assert!(ok, "{err}");
    assert!(err.contains("token store: portcullis.db (no config file: the default in the working directory)"), "{err}");
    let t: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(t["rate"], "5/min", "{t}");
    let created = t["created_at"].as_str().unwrap_or_else(|| panic!("not RFC 3339: {t}"));
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    assert!(humantime::parse_rfc3339(t["expires_at"].as_str().unwrap()).is_ok(), "{t}");
    let mode = std::fs::metadata(bare.0.join("portcullis.db")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the store is its owner's alone");

    // A config whose upstream secret is unset still serves `token list`.
    let dir = TempDir::new();
    std::fs::write(
        dir.0.join("portcullis.yaml"),
        "servers:\n  gh:\n    url: https://example.com/mcp\n    headers:\n      Authorization: \"Bearer ${PCS_UNSET_UPSTREAM_SECRET}\"\n",
    )
    .unwrap();
    let (ok, _, err) = token_cli(&dir.0, &["create", "--name", "bob", "--servers", "gh"], &[]).await;
    assert!(ok, "{err}");
    assert!(err.contains("(the default beside portcullis.yaml)"), "{err}");
    let (ok, out, err) = token_cli(&dir.0, &["list", "--json"], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("\"bob\""), "{out}");
    // Revoking twice is fine; the token stays revoked.
    let id = serde_json::from_str::<Value>(out.lines().next().unwrap()).unwrap()["id"].as_str().unwrap().to_owned();
    for _ in 0..2 {
        let (ok, _, err) = token_cli(&dir.0, &["revoke", &id], &[]).await;
        assert!(ok, "{err}");
    }
    // Serving still needs the secret: the strict load refuses.
    let out = Command::new(BIN).current_dir(&dir.0).arg("check").output().await.unwrap();
    assert!(!out.status.success());
}

/// On SIGTERM, `/health` answers 503 `draining` for `limits.drain_period` while requests are
/// still served; then Portcullis stops. Both schedulers: the multi-thread default and one
/// worker's current-thread one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_before_it_stops() {
    drains_before_it_stops(&[]).await;
    drains_before_it_stops(&["--workers", "1"]).await;
}

async fn drains_before_it_stops(args: &[&str]) {
    let dir = TempDir::new();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, gateway().demo("a", &[], "").top("limits:\n  drain_period: 30s\n").yaml()).unwrap();
    let mut served = Served::start_with(&cfg, &[], args).await;
    // Both eras answer.
    let modern = Client::modern(&served.url);
    assert_eq!(modern.call_text("a__echo", serde_json::json!({"text": "stateless"})).await, "stateless");
    let base = served.url.trim_end_matches("/mcp").to_owned();
    let health = || {
        let url = format!("{base}/health");
        async move {
            let r = reqwest::get(url).await.unwrap();
            let status = r.status().as_u16();
            (status, serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap())
        }
    };
    let client = Client::connect(&served.url).await;
    assert_eq!(client.call_text("a__echo", serde_json::json!({"text": "before"})).await, "before");
    assert_eq!(health().await.0, 200);
    let pid = nix::unistd::Pid::from_raw(served.child.id().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    served.next_line_with("draining").await;
    let (status, body) = health().await;
    assert_eq!((status, body["status"].as_str()), (503, Some("draining")), "{body}");
    // Still serving: the session carries on, a new client still connects.
    assert_eq!(client.call_text("a__echo", serde_json::json!({"text": "during"})).await, "during");
    assert!(Client::connect(&served.url).await.all_tools().await.contains(&"a__echo".to_owned()));
    // A second signal ends the drain at once.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), served.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
}

/// The packaged systemd unit passes `systemd-analyze verify` (run against this build's binary),
/// and the packaged config is valid; the Dockerfile builds in stages and runs as non-root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_packaging_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = TempDir::new();
    let unit = std::fs::read_to_string(root.join("packaging/portcullis.service")).unwrap();
    for needle in
        ["DynamicUser=yes", "NoNewPrivileges=yes", "ProtectSystem=strict", "ExecReload=/bin/kill -HUP $MAINPID"]
    {
        assert!(unit.contains(needle), "{needle}");
    }
    let unit = unit.replace("/usr/local/bin/portcullis", BIN);
    let path = dir.0.join("portcullis.service");
    std::fs::write(&path, unit).unwrap();
    match Command::new("systemd-analyze").args(["verify", path.to_str().unwrap()]).output().await {
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            // Only complaints about this unit count (the host's other units are not ours).
            let ours: Vec<&str> = err.lines().filter(|l| l.contains("portcullis.service")).collect();
            assert!(out.status.success() && ours.is_empty(), "systemd-analyze verify:\n{err}");
        }
        Err(e) => eprintln!("systemd-analyze not available here ({e}); the unit was not verified"),
    }
    let config = std::fs::read_to_string(root.join("packaging/portcullis.yaml")).unwrap();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, config.replace("/usr/local/bin/portcullis", BIN)).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config", cfg.to_str().unwrap()])
        .env("PORTCULLIS_ADMIN_TOKEN", "a-long-admin-secret-0123456789")
        .env("PROMETHEUS_TOKEN", "a-long-metrics-secret-0123456789")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docker = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    assert!(docker.lines().filter(|l| l.starts_with("FROM ")).count() >= 2, "multi-stage");
    let user = docker.lines().rev().find(|l| l.starts_with("USER ")).unwrap();
    let name = user.trim_start_matches("USER ").split(':').next().unwrap().trim();
    assert!(!matches!(name, "root" | "0"), "the image runs as root: {user}");
    assert!(docker.contains("--locked"), "the image builds what Cargo.lock pins");
}

/// The built-in demo shows what Portcullis is for; the test fixtures need `--fixtures`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_built_in_demo_offers_no_test_fixtures() {
    let dir = TempDir::new();
    let mut child = Command::new(BIN)
        .current_dir(&dir.0)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env_remove("PORTCULLIS_TOKEN")
        .env_remove("PORTCULLIS_TOKENS")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = listen_url(&mut child).await;
    let client = Client::connect(&url).await;
    let tools = client.all_tools().await;
    assert!(tools.contains(&"demo__echo".to_owned()), "{tools:?}");
    for fixture in portcullis::demo::FIXTURES {
        assert!(!tools.contains(&format!("demo__{fixture}")), "{fixture} in {tools:?}");
    }
    let crash = client.call("demo__crash", serde_json::json!({})).await;
    assert!(
        crash.response.get("error").is_some() || crash.response["result"]["isError"] == true,
        "{:?}",
        crash.response
    );
    assert_eq!(client.call_text("demo__echo", serde_json::json!({"text": "still here"})).await, "still here");
}

/// A `.env` beside the config is read as a shell reads it: `"alice-secret" # comment` is the
/// secret `alice-secret`, without its quotes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dotenv_secret_in_quotes_with_a_comment_authenticates() {
    let dir = TempDir::new();
    std::fs::write(dir.0.join(".env"), "# tokens\nALICE_TOKEN=\"alice-secret-0123456789\" # Alice's laptop\n").unwrap();
    let cfg = dir.0.join("portcullis.yaml");
    std::fs::write(&cfg, gateway().demo("a", &[], "").top("auth:\n  tokens:\n    alice: \"${ALICE_TOKEN}\"\n").yaml())
        .unwrap();
    let served = Served::start(&cfg, &[]).await;
    let init = serde_json::json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"it","version":"1"}}});
    let with = |token: &'static str| Client::new(&served.url).bearer(token);
    assert_eq!(with("alice-secret-0123456789").post(init.clone()).await.status(), 200);
    // With the quotes it is not the secret (and not even a well-formed credential).
    let quoted = with("\"alice-secret-0123456789\"").post(init).await.status().as_u16();
    assert!(matches!(quoted, 400 | 401), "{quoted}");
}
