//! Other tools' files as those tools write them, run as they are: Claude Desktop, VS Code, MCP
//! Front, Open MCP Gateway (with its catalog, hot-reloaded); and `check` on a file with many
//! problems at once.

use std::path::Path;

use serde_json::{Value, json};

use crate::support::*;

async fn check(config: &Path) -> (bool, String, String) {
    check_with(config, &[]).await
}

async fn check_with(config: &Path, env: &[(&str, &str)]) -> (bool, String, String) {
    run_cli(None, &["check", "--config", config.to_str().unwrap()], env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_desktop_config_runs_as_claude_writes_it() {
    let dir = TempDir::new();
    let file = dir.0.join("claude_desktop_config.json");
    let text = format!(
        r#"{{
  "globalShortcut": "Ctrl+Space",
  "preferences": {{"menuBarEnabled": false, "quickEntryShortcut": "off"}},
  "mcpServers": {{
    "demo": {{"command": {BIN:?}, "args": ["demo-server"], "env": {{}}}}
  }}
}}
"#
    );
    std::fs::write(&file, text).unwrap();
    let (ok, stdout, stderr) = check(&file).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("demo: stdio"), "{stdout}");
    assert!(stderr.contains("claude_desktop_config.json:2: warning: globalShortcut: unknown key ignored"), "{stderr}");
    assert!(stderr.contains(":3: warning: preferences: unknown key ignored"), "{stderr}");
    let served = Served::start(&file, &[]).await;
    let tools = Client::connect(&served.url).await.all_tools().await;
    assert!(tools.contains(&"demo__echo".to_owned()), "{tools:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vscode_mcp_json_with_comments_variables_and_env_file() {
    let dir = TempDir::new();
    let vscode = dir.0.join(".vscode");
    std::fs::create_dir_all(&vscode).unwrap();
    std::fs::write(
        dir.0.join(".env.demo"),
        "# secrets for the demo\nDEMO_SECRET=\"s3cret value\" # quoted, with a comment\nexport OTHER=2\n",
    )
    .unwrap();
    let file = vscode.join("mcp.json");
    let text = format!(
        r#"{{
  // VS Code writes comments
  "inputs": [],
  "servers": {{
    "demo": {{
      "type": "stdio",
      "command": {BIN:?},
      "args": ["demo-server", "--fixtures",], /* and trailing commas */
      "env": {{"WS": "${{workspaceFolder}}", "SEP": "${{pathSeparator}}", "HOME_SEEN": "${{userHome}}", "FROM": "${{workspaceFolder}}${{/}}.env.demo"}},
      "envFile": ".env.demo",
    }},
  }},
}}
"#
    );
    std::fs::write(&file, text).unwrap();
    let (ok, _, stderr) = check(&file).await;
    assert!(ok, "{stderr}");
    let served = Served::start(&file, &[("HOME", "/home/someone")]).await;
    let client = Client::connect(&served.url).await;
    let env = |name: &'static str| {
        let client = client.clone();
        async move { client.call_text("demo__env", json!({"name": name})).await }
    };
    let workspace = std::fs::canonicalize(&dir.0).unwrap();
    assert_eq!(std::fs::canonicalize(env("WS").await).unwrap(), workspace);
    assert_eq!(env("SEP").await, "/");
    assert_eq!(env("HOME_SEEN").await, "/home/someone");
    assert_eq!(env("DEMO_SECRET").await, "s3cret value");
    assert_eq!(env("OTHER").await, "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_front_config_dev_json_as_its_documentation_writes_it() {
    let dir = TempDir::new();
    let file = dir.0.join("config.dev.json");
    // The complete development example of MCP Front's documentation; `files` runs the demo.
    let text = format!(
        r#"{{
  "version": "1.0",
  "proxy": {{
    "name": "Development MCP Proxy",
    "baseUrl": "http://localhost:8080",
    "addr": ":8080",
    "auth": {{
      "kind": "bearer_token",
      "tokens": {{
        "dev": "$env:DEV_TOKEN|dev-token-123",
        "test": "$env:TEST_TOKEN|test-token-456"
      }}
    }}
  }},
  "mcpServers": {{
    "database": {{
      "url": "http://127.0.0.1:9/sse",
      "authTokens": ["dev", "test"],
      "env": {{
        "DATABASE_URL": "$env:DATABASE_URL"
      }}
    }},
    "files": {{
      "command": {BIN:?},
      "args": ["demo-server"],
      "authTokens": ["dev"]
    }}
  }}
}}
"#
    );
    std::fs::write(&file, text).unwrap();
    let (ok, stdout, stderr) = check(&file).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("listen 0.0.0.0:8080"), "proxy.addr is the listen address: {stdout}");
    assert!(stdout.contains("public URL http://localhost:8080"), "{stdout}");
    assert!(stdout.contains("name \"Development MCP Proxy\""), "{stdout}");
    assert!(stderr.contains("warning: mcpServers.database.env: ignored"), "{stderr}");
    let served = Served::start(&file, &[("DEV_TOKEN", "my-secure-dev-token")]).await;
    let resp = Client::new(&format!("{}/servers/files/mcp", served.url.trim_end_matches("/mcp")))
        .bearer("my-secure-dev-token")
        .post(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"it","version":"1"}}}))
        .await;
    assert_eq!(resp.status(), 200);
    let all = Client::new(&served.url)
        .bearer("my-secure-dev-token")
        .post(json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"it","version":"1"}}}))
        .await;
    let body: Value = serde_json::from_str(&all.text().await.unwrap()).unwrap();
    assert_eq!(body["result"]["serverInfo"]["name"], "Development MCP Proxy", "{body}");
    // `test` may not reach `files` (authTokens), `dev` may.
    let test_client = Client::connect_as(&served.url, "test-token-456").await;
    assert!(!test_client.all_tools().await.iter().any(|t| t.starts_with("files__")));
    let dev_client = Client::connect_as(&served.url, "my-secure-dev-token").await;
    assert!(dev_client.all_tools().await.contains(&"files__echo".to_owned()));

    // `addr: ":0"` is every interface: without credentials that is refused before anything
    // is bound (so this test never listens beyond loopback).
    let open = dir.0.join("open.json");
    std::fs::write(&open, r#"{"version": "1.0", "proxy": {"addr": ":0"}, "mcpServers": {}}"#).unwrap();
    let (ok, _, stderr) = run_cli(None, &["serve", "--config", open.to_str().unwrap()], &[]).await;
    assert!(!ok);
    assert!(stderr.contains("refusing to serve 0.0.0.0:0 without credentials"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_mcp_gateway_catalog_is_loaded_and_reloaded() {
    let dir = TempDir::new();
    let config = dir.0.join("config.yaml");
    std::fs::write(
        &config,
        "listen_addr: \"127.0.0.1:4444\"\ncatalog_path: \"catalog.yaml\"\nlog_level: \"info\"\napi_key: \"${MCP_GATEWAY_API_KEY}\"\nidle_timeout_seconds: 300\n",
    )
    .unwrap();
    let entry = |id: &str| {
        format!(
            "  - id: {id}\n    display_name: Demo {id}\n    description: The demo server\n    runtime:\n      type: local-process\n      command: {BIN:?}\n      args:\n        - demo-server\n      working_dir: /\n    env:\n      DEMO_MODE: \"on\"\n    tags:\n      - demo\n"
        )
    };
    std::fs::write(dir.0.join("catalog.yaml"), format!("servers:\n{}", entry("alpha"))).unwrap();
    let (ok, stdout, stderr) = check_with(&config, &[("MCP_GATEWAY_API_KEY", "gw-key")]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("alpha: stdio"), "{stdout}");
    assert!(stderr.contains("warning: log_level: unknown key ignored"), "{stderr}");
    let mut served = Served::start(&config, &[("MCP_GATEWAY_API_KEY", "gw-key")]).await;
    let client = Client::connect_as(&served.url, "gw-key").await;
    assert!(client.all_tools().await.contains(&"alpha__echo".to_owned()));
    // Editing the catalog alone reloads it.
    std::fs::write(dir.0.join("catalog.yaml"), format!("servers:\n{}{}", entry("alpha"), entry("beta"))).unwrap();
    let reloaded = served.next_line_with("config reloaded").await;
    assert!(reloaded.contains("beta"), "{reloaded}");
    assert!(client.all_tools().await.contains(&"beta__echo".to_owned()));
    // A runtime Portcullis cannot run is an error naming the catalog and the line.
    std::fs::write(
        dir.0.join("catalog.yaml"),
        "servers:\n  - id: boxed\n    runtime:\n      type: docker\n      image: mcp/x\n",
    )
    .unwrap();
    let (ok, _, stderr) = check_with(&config, &[("MCP_GATEWAY_API_KEY", "gw-key")]).await;
    assert!(!ok);
    assert!(
        stderr.contains("catalog.yaml:4: servers[0].runtime.type: runtime type \"docker\" is not supported"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_problem_at_once_at_its_field() {
    let dir = TempDir::new();
    let file = dir.0.join("portcullis.yaml");
    std::fs::write(
        &file,
        "\
lisen: 127.0.0.1:8080
servers:
  a:
    comand: x
  b:
    command: definitely-not-a-command-pcs
    timeout: soon
  c:
    url: ftp://example.com/mcp
max_body_bytes: [1]
auth:
  tokens:
    alice:
      token: \"${PCS_UNSET_SECRET_VAR}\"
      servers: [b, ghost]
      role: root
",
    )
    .unwrap();
    let (ok, _, stderr) = check(&file).await;
    assert!(!ok);
    let f = file.display().to_string();
    for want in [
        format!("{f}:1: lisen: unknown key (did you mean `listen`?)"),
        format!("{f}:4: servers.a.comand: unknown key (did you mean `command`?)"),
        format!("{f}:7: servers.b.timeout: invalid duration"),
        format!("{f}:9: servers.c.url: \"ftp://example.com/mcp\" is not an http(s) URL"),
        format!("{f}:10: max_body_bytes: expected a whole number, found a list"),
        format!("{f}:14: auth.tokens.alice.token: environment variable PCS_UNSET_SECRET_VAR is not set"),
        format!("{f}:15: auth.tokens.alice.servers[1]: unknown server \"ghost\""),
        format!("{f}:16: auth.tokens.alice.role: unknown role"),
    ] {
        assert!(stderr.contains(&want), "missing {want:?} in:\n{stderr}");
    }
    assert!(!stderr.contains("column"), "one position per error:\n{stderr}");
    // A command not on PATH is a warning when the rest is fine.
    std::fs::write(&file, "servers:\n  b:\n    command: definitely-not-a-command-pcs\n").unwrap();
    let (ok, _, stderr) = check(&file).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(":3: warning: servers.b.command: \"definitely-not-a-command-pcs\" is not found on PATH"),
        "{stderr}"
    );
}
