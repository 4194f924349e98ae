//! Process hygiene: no child or grandchild outlives the gateway, whatever ends it.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::process::Command;

use crate::support::{BIN, Client, alive, gateway, listen_url, reaped};

async fn run_and_end(how: &str) {
    let dir = std::env::temp_dir().join(format!("pcs-orphans-{how}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("portcullis.yaml");
    std::fs::write(&cfg, gateway().demo("o", &[], "").demo("p", &[], "").yaml()).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config", cfg.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    if how == "panic" {
        cmd.args(["--test-panic-after", "4s"]);
    }
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).kill_on_drop(true).spawn().unwrap();
    let url = listen_url(&mut child).await;
    let client = Client::connect(&url).await;
    let mut pids = Vec::new();
    for server in ["o", "p"] {
        let grandchild: u32 =
            client.call_text(&format!("{server}__spawn_grandchild"), json!({})).await.parse().unwrap();
        let stats: Value =
            serde_json::from_str(&client.call_text(&format!("{server}__stats"), json!({})).await).unwrap();
        pids.push(grandchild);
        pids.push(stats["pid"].as_u64().unwrap() as u32);
    }
    assert!(pids.iter().all(|p| alive(*p)));
    let gw_pid = nix::unistd::Pid::from_raw(child.id().unwrap() as i32);
    match how {
        "term" => nix::sys::signal::kill(gw_pid, nix::sys::signal::Signal::SIGTERM).unwrap(),
        "int" => nix::sys::signal::kill(gw_pid, nix::sys::signal::Signal::SIGINT).unwrap(),
        _ => {}
    }
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    if how == "panic" {
        assert!(!status.success());
    }
    // Killed processes may linger a moment until their parent (init) reaps them.
    reaped(&pids, Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_orphans_after_sigterm() {
    run_and_end("term").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_orphans_after_sigint() {
    run_and_end("int").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_orphans_after_a_panic() {
    run_and_end("panic").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_errors_with_paths_and_lines() {
    let dir = std::env::temp_dir().join(format!("pcs-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "servers:\n  a:\n    url: ${PCS_TEST_MISSING_VAR}\n  b:\n    command: x\n    colour: red\n")
        .unwrap();
    let out = Command::new(BIN).args(["check", "--config", bad.to_str().unwrap()]).output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:3: servers.a.url") && err.contains("PCS_TEST_MISSING_VAR"), "{err}");
    assert!(err.contains("servers.b.colour"), "{err}");
    let good = dir.join("good.json");
    std::fs::write(&good, r#"{"mcpServers":{"fs":{"command":"npx","args":["-y","x"]}}}"#).unwrap();
    let out = Command::new(BIN).args(["check", "--config", good.to_str().unwrap()]).output().await.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("fs: stdio: npx -y x"));
    let _ = std::fs::remove_dir_all(dir);
}
