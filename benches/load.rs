//! Load benchmark: what Portcullis costs over talking to the upstream directly, measured side
//! by side in one run. Starts the bundled demo server over HTTP (the upstream), measures it
//! directly, then through Portcullis (auth off and on; HTTP upstream and stdio upstream; and a
//! gateway with an OAuth issuer, called with a static token and with an ES256 access token
//! whose keys an in-process provider publishes, in the order static, JWT, JWT, static), for
//! concurrency 1, 16 and 64 and payloads of 100 B and 64 KiB; then holds idle sessions open
//! (half legacy SSE streams, half streamable-HTTP sessions with their GET streams) and reports
//! memory per session. Prints one table.
//!
//! Run it with `scripts/bench` (which pins Portcullis to one core and the rest to the other),
//! or `cargo bench --bench load`. Knobs: `PCS_BENCH_SECONDS` (per cell, default 2),
//! `PCS_BENCH_SESSIONS` (idle sessions, default 10000; 0 skips the test), `PCS_BENCH_GATEWAY_CPU`
//! and `PCS_BENCH_OTHER_CPU` (taskset core lists), `PCS_BENCH_CONC` (comma-separated
//! concurrencies, default `1,16,64`) and `PCS_BENCH_PAYLOADS` (`small`, `large` or both, the
//! default), `PCS_BENCH_IDLE` (`mixed`, the default, or only `sse` or `http` idle sessions).
//!
//! Method (as the performance issue sets it): the direct upstream runs on the core Portcullis
//! would use; Portcullis runs with one worker on that core, its upstream and the load generator
//! on the other one. Each row also gives the CPU time per call the measured server (the direct
//! upstream or Portcullis) spent, summed over its threads from `/proc/<pid>/task/*/schedstat`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

#[path = "load/wire.rs"]
mod wire;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const TOKEN: &str = "bench-token-0123456789abcdefghij";

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

/// A child on given cores (when `taskset` exists and a core list is set).
/// The Portcullis binary measured: the one this bench was built with, or `PCS_BENCH_BIN` (an
/// earlier build, so that a before and an after are measured in one run).
fn bin() -> String {
    std::env::var("PCS_BENCH_BIN").unwrap_or_else(|_| BIN.to_owned())
}

fn pinned(cpus: &str) -> Command {
    if !cpus.is_empty() && std::process::Command::new("taskset").arg("-V").output().is_ok() {
        let mut c = Command::new("taskset");
        c.args(["-c", cpus]).arg(bin());
        c
    } else {
        Command::new(bin())
    }
}

async fn listen_url(child: &mut Child) -> String {
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines();
    loop {
        let line = lines.next_line().await.expect("read").expect("the child exited");
        if let Some(rest) = line.split("listening on ").nth(1) {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return rest.trim().to_owned();
        }
    }
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// CPU time (ns) a process has run, summed over its threads.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    dir.flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()))
        .sum()
}

struct Cell {
    /// CPU µs per completed call of the measured server (0 when not measured).
    cpu: f64,
    /// CPU µs per completed call of the load generator (this process).
    gen_cpu: f64,
    /// CPU µs per completed call of the upstream behind it (0 when not measured).
    up_cpu: f64,
    /// How busy the measured server's core was (its CPU time over the cell's time).
    busy: f64,
    rps: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    errors: u64,
}

impl Cell {
    /// Two cells of equal length as one: rates, CPU and percentiles averaged, errors summed.
    fn mean(a: &Cell, b: &Cell) -> Cell {
        let avg = |x: f64, y: f64| (x + y) / 2.0;
        Cell {
            cpu: avg(a.cpu, b.cpu),
            gen_cpu: avg(a.gen_cpu, b.gen_cpu),
            up_cpu: avg(a.up_cpu, b.up_cpu),
            busy: avg(a.busy, b.busy),
            rps: avg(a.rps, b.rps),
            p50: avg(a.p50, b.p50),
            p90: avg(a.p90, b.p90),
            p99: avg(a.p99, b.p99),
            errors: a.errors + b.errors,
        }
    }
}

/// `concurrency` workers calling `tool` for `secs` seconds (after a short warm-up).
async fn run(url: &str, tool: &str, text: &str, concurrency: usize, secs: f64, token: Option<&str>) -> Cell {
    run_on(url, tool, text, concurrency, secs, token, (0, 0)).await
}

/// [`run`], also measuring the CPU time process `pid` spends during the measured period.
/// Where a half-cell runs: the MCP URL, the token, the measured server's and its upstream's
/// pids.
type Target<'a> = (&'a str, Option<&'a str>, (u32, u32));

/// Two targets in one cell's time, half each, in the order A, B, B, A, so that a drift of the
/// machine during the four weighs on both alike: the mean of each.
async fn interleaved(a: Target<'_>, b: Target<'_>, text: &str, conc: usize, secs: f64) -> (Cell, Cell) {
    let half = secs / 2.0;
    let a1 = run_on(a.0, "h__echo", text, conc, half, a.1, a.2).await;
    let b1 = run_on(b.0, "h__echo", text, conc, half, b.1, b.2).await;
    let b2 = run_on(b.0, "h__echo", text, conc, half, b.1, b.2).await;
    let a2 = run_on(a.0, "h__echo", text, conc, half, a.1, a.2).await;
    (Cell::mean(&a1, &a2), Cell::mean(&b1, &b2))
}

async fn run_on(
    url: &str,
    tool: &str,
    text: &str,
    concurrency: usize,
    secs: f64,
    token: Option<&str>,
    (pid, up_pid): (u32, u32),
) -> Cell {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let request = wire::Prepared::call(url, tool, text, token, w as u64 + 1);
        let min_len = text.len();
        let (stop, measuring, errors) = (stop.clone(), measuring.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::with_capacity(1 << 16);
            let mut conn: Option<wire::Conn> = None;
            while !stop.load(Ordering::Relaxed) {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => match wire::Conn::open(request.addr).await {
                        Ok(c) => conn.insert(c),
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                let start = Instant::now();
                let ok = match c.exchange(&request.bytes).await {
                    Ok((status, len)) => status == 200 && len > min_len,
                    Err(_) => {
                        conn = None;
                        false
                    }
                };
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        samples.push(start.elapsed().as_secs_f64() * 1e6);
                    } else {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            samples
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    measuring.store(true, Ordering::Relaxed);
    let me = std::process::id();
    let cpu = |pid: u32| if pid != 0 { cpu_ns(pid) } else { 0 };
    let (before, gen_before, up_before) = (cpu(pid), cpu(me), cpu(up_pid));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed().as_secs_f64();
    let used = |pid: u32, before: u64| cpu(pid).saturating_sub(before) as f64;
    let (cpu_used, gen_used, up_used) = (used(pid, before), used(me, gen_before), used(up_pid, up_before));
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort_by(f64::total_cmp);
    let q = |p: f64| all.get(((all.len() as f64) * p) as usize).copied().unwrap_or(f64::NAN);
    let calls = all.len().max(1) as f64;
    Cell {
        cpu: cpu_used / 1e3 / calls,
        gen_cpu: gen_used / 1e3 / calls,
        up_cpu: up_used / 1e3 / calls,
        busy: cpu_used / 1e9 / elapsed,
        rps: all.len() as f64 / elapsed,
        p50: q(0.5),
        p90: q(0.9),
        p99: q(0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

/// An identity provider on 127.0.0.1 (OpenID discovery and a JWKS of one ES256 key): its
/// issuer URL and signing key.
async fn provider() -> (String, jsonwebtoken::EncodingKey) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).expect("key");
    let p = pair.public_key().as_ref();
    let jwk = serde_json::json!({"kty":"EC","crv":"P-256","x":b64(&p[1..33]),"y":b64(&p[33..65]),"kid":"bench","alg":"ES256"});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let issuer = format!("http://{}", listener.local_addr().expect("addr"));
    let discovery = serde_json::json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")}).to_string();
    let keys = serde_json::json!({"keys": [jwk]}).to_string();
    let app = axum::Router::new()
        .route("/.well-known/openid-configuration", axum::routing::get(move || async move { discovery }))
        .route("/jwks", axum::routing::get(move || async move { keys }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (issuer, jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()))
}

/// An access token of the provider for `resource`, valid for an hour, with scope `bench`.
fn access_token(issuer: &str, key: &jsonwebtoken::EncodingKey, resource: &str) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({"iss": issuer, "sub": "bench-client", "aud": resource, "exp": now + 3600,
        "iat": now, "scope": "bench", "jti": "bench-0001"});
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("bench".into());
    jsonwebtoken::encode(&h, &claims, key).expect("sign")
}

/// HAProxy from Debian's package with one thread, pinned to `cpus`, relaying to `upstream`
/// (`host:port`): its child, MCP URL and pid; None when it is not installed (`scripts/bench`
/// installs it). `mode` is `tcp` (a byte relay: the floor for any process on the path) or
/// `http` (it parses every request and response and keeps server connections for reuse: the
/// floor for any process that reads HTTP, before it does anything with what it read).
async fn haproxy(cpus: &str, upstream: &str, dir: &std::path::Path, mode: &str) -> Option<(Child, String, u32)> {
    let bin = ["/usr/sbin/haproxy", "/usr/bin/haproxy"].into_iter().find(|p| std::path::Path::new(p).exists())?;
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let cfg = dir.join(format!("haproxy-{mode}.cfg"));
    let reuse = if mode == "http" { "    http-reuse always\n" } else { "" };
    let text = format!(
        "global\n    nbthread 1\n    maxconn 4096\ndefaults\n    mode {mode}\n    timeout connect 2s\n    \
         timeout client 120s\n    timeout server 120s\nfrontend f\n    bind 127.0.0.1:{port}\n    \
         default_backend b\nbackend b\n{reuse}    server u {upstream}\n"
    );
    std::fs::write(&cfg, text).ok()?;
    let mut c = Command::new("taskset");
    c.args(["-c", if cpus.is_empty() { "0-63" } else { cpus }, bin, "-db", "-f"]).arg(&cfg);
    let child = c.stdout(Stdio::null()).stderr(Stdio::null()).kill_on_drop(true).spawn().ok()?;
    let pid = child.id().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Some((child, format!("http://127.0.0.1:{port}/mcp"), pid))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--upstream") {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        return rt.block_on(wire::serve_upstream());
    }
    // For profiling one process: `--drive URL TOOL CONCURRENCY SECONDS [TOKEN]` loads it as a
    // cell does and prints the cell's figures.
    if let Some(i) = args.iter().position(|a| a == "--drive") {
        let arg = |k: usize| args.get(i + k).cloned().expect("--drive URL TOOL CONCURRENCY SECONDS [TOKEN]");
        let (url, tool) = (arg(1), arg(2));
        let (conc, secs): (usize, f64) = (arg(3).parse().expect("concurrency"), arg(4).parse().expect("seconds"));
        let token = args.get(i + 5).cloned();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let c = rt.block_on(run(&url, &tool, &"x".repeat(100), conc, secs, token.as_deref()));
        println!(
            "{:.0} req/s, p50 {:.0} µs, {} errors, load generator {:.1} µs/call",
            c.rps, c.p50, c.errors, c.gen_cpu
        );
        return;
    }
    // `cargo test --all-targets` runs bench targets too (without `--bench`): skip there.
    if !args.iter().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench`");
        return;
    }
    // One thread: the load generator shares its core with the upstream.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(bench());
}

async fn bench() {
    let secs: f64 = env_or("PCS_BENCH_SECONDS", 2.0);
    let sessions: usize = env_or("PCS_BENCH_SESSIONS", 10_000);
    let gw_cpu: String = env_or("PCS_BENCH_GATEWAY_CPU", "0".to_owned());
    let other_cpu: String = env_or("PCS_BENCH_OTHER_CPU", "1".to_owned());
    let dir = std::env::temp_dir().join(format!("pcs-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");

    let concs: Vec<usize> =
        env_or("PCS_BENCH_CONC", "1,16,64".to_owned()).split(',').filter_map(|c| c.trim().parse().ok()).collect();
    let payloads = env_or("PCS_BENCH_PAYLOADS", "small,large".to_owned());

    // The upstream Portcullis calls, on the other core; and the same server for the direct
    // figures, on the core Portcullis would use: the benchmark's own fast upstream (see
    // `wire`), so that no row is bound by a slow upstream.
    let own = |cpus: &str, args: &[&str]| {
        let exe = std::env::current_exe().expect("own path");
        let mut c = if cpus.is_empty() {
            Command::new(exe)
        } else {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(exe);
            c
        };
        c.args(args).stderr(Stdio::piped()).kill_on_drop(true).spawn().expect("bench child")
    };
    let mut upstream = own(&other_cpu, &["--upstream"]);
    let up_pid = upstream.id().unwrap_or(0);
    let upstream_url = listen_url(&mut upstream).await;
    let mut direct_upstream = own(&gw_cpu, &["--upstream"]);
    let direct_pid = direct_upstream.id().unwrap_or(0);
    let direct_url = listen_url(&mut direct_upstream).await;
    let upstream_addr = upstream_url.trim_start_matches("http://").trim_end_matches("/mcp").to_owned();
    // The floor any process on the path pays: HAProxy relaying TCP, one thread, where
    // Portcullis runs.
    let haproxy_tcp = haproxy(&gw_cpu, &upstream_addr, &dir, "tcp").await;
    // The floor for a process that parses HTTP on both sides: HAProxy in HTTP mode.
    let haproxy_http = haproxy(&gw_cpu, &upstream_addr, &dir, "http").await;

    // Portcullis: one worker thread on its own core, fronting the upstream over HTTP and the
    // same demo server over stdio (pinned to the other core).
    // An identity provider for the OAuth rows: discovery and one ES256 key, in this process.
    let (issuer, signing) = provider().await;
    // With PCS_BENCH_POSTGRES (a URL, e.g. with `options=-csearch_path%3Dbench`), the issued-token
    // row is run a second time against a gateway whose store is that database.
    let postgres = std::env::var("PCS_BENCH_POSTGRES").ok();
    let config_file = |auth: bool, oauth: bool, store: Option<&str>| {
        let cfg = dir.join(match (auth, oauth, store) {
            (_, _, Some(_)) => "postgres.yaml",
            (_, true, None) => "oauth.yaml",
            (true, false, None) => "auth.yaml",
            (false, false, None) => "open.yaml",
        });
        // Tokens issued into a store turn authentication on: the open gateway has one of its own.
        let sqlite = dir.join(if auth { "tokens.db" } else { "open.db" }).display().to_string();
        let mut yaml = format!(
            "servers:\n  h:\n    url: {upstream_url:?}\n  s:\n    command: taskset\n    args: [\"-c\", {other_cpu:?}, {BIN:?}, demo-server, --fixtures]\nstore: {:?}\naudit:\n  file: {:?}\nlimits:\n  max_sessions: 100000\n  max_sessions_per_identity: 100000\n  max_sse_streams_per_identity: 100000\n  max_connections: 100000\n",
            store.unwrap_or(&sqlite),
            dir.join("audit.jsonl").display().to_string()
        );
        if auth {
            yaml.push_str(&format!("auth:\n  tokens:\n    bench: {TOKEN}\n"));
        }
        if oauth {
            yaml.push_str(&format!(
                "oauth:\n  issuers:\n    - issuer: {issuer:?}\n      scopes:\n        bench: {{}}\n"
            ));
        }
        std::fs::write(&cfg, yaml).expect("config");
        cfg
    };
    // With PCS_BENCH_REDIS as well (a URL), the shared mode against one replica alone.
    let redis = std::env::var("PCS_BENCH_REDIS").ok();
    let sqlite = dir.join("tokens.db").display().to_string();
    let limited_config = |store: &str, state: Option<&str>| {
        let cfg = dir.join(if state.is_some() { "shared.yaml" } else { "alone.yaml" });
        let mut yaml = format!(
            "servers:\n  h:\n    url: {upstream_url:?}\nstore: {store:?}\naudit:\n  file: {:?}\nlimits:\n  max_sessions: 100000\n  max_sessions_per_identity: 100000\n  max_connections: 100000\nrate_limit:\n  per_identity: 6000000/min\n",
            dir.join("audit.jsonl").display().to_string()
        );
        if let Some(url) = state {
            yaml.push_str(&format!("state:\n  url: {url:?}\n  prefix: \"pcs-bench-{}:\"\n", std::process::id()));
        }
        std::fs::write(&cfg, yaml).expect("config");
        cfg
    };
    let start_config = |cfg: &std::path::Path| {
        let mut cmd = pinned(&gw_cpu);
        cmd.args(["serve", "--config", cfg.to_str().unwrap_or_default(), "--listen", "127.0.0.1:0", "--workers", "1"])
            .env("RUST_LOG", "warn,portcullis::cli=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn().expect("portcullis")
    };
    let start_gateway = |auth: bool, oauth: bool| start_config(&config_file(auth, oauth, None));
    // A token issued into a config's store (by the CLI, as an operator would).
    let issue = |cfg: &std::path::Path, name: &str| {
        let out = std::process::Command::new(bin())
            .args(["token", "create", "--name", name, "--json", "--config", cfg.to_str().unwrap_or_default()])
            .output()
            .expect("token create");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["secret"].as_str().unwrap_or_default().to_owned()
    };

    let small = "x".repeat(100);
    let large = "x".repeat(64 * 1024);
    println!(
        "Portcullis load benchmark: {secs} s per cell, gateway on cpu {gw_cpu} with 1 worker, the rest on cpu {other_cpu}"
    );
    println!();
    println!(
        "| path | payload | conc | req/s | p50 µs | p90 µs | p99 µs | errors | CPU µs/call | its core | load gen µs/call | upstream µs/call | vs direct |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut peak = 0u64;
    let sizes = [("100 B", &small, "small"), ("64 KiB", &large, "large")];
    for (payload_name, text, _) in sizes.into_iter().filter(|(_, _, k)| payloads.contains(k)) {
        for &conc in &concs {
            let direct = run_on(&direct_url, "echo", text, conc, secs, None, (direct_pid, 0)).await;
            let print = |name: &str, c: &Cell| {
                println!(
                    "| {name} | {payload_name} | {conc} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {:.1} | {:.0} % | {:.1} | {} | {:.2}× rps, {:+.0} µs p50 |",
                    c.rps,
                    c.p50,
                    c.p90,
                    c.p99,
                    c.errors,
                    c.cpu,
                    c.busy * 100.0,
                    c.gen_cpu,
                    if c.up_cpu > 0.0 { format!("{:.1}", c.up_cpu) } else { "–".to_owned() },
                    c.rps / direct.rps,
                    c.p50 - direct.p50
                );
            };
            // One cell against another measured beside it: throughput ratio, CPU difference.
            let compare = |what: &str, c: &Cell, base: &Cell| {
                println!(
                    "| ({what}) | {payload_name} | {conc} | {:.3}× rps | | | | | {:+.1} µs/call | | | | |",
                    c.rps / base.rps,
                    c.cpu - base.cpu
                );
            };
            print("direct (HTTP upstream)", &direct);
            if let Some((_, relay_url, relay_pid)) = &haproxy_tcp {
                let relay = run_on(relay_url, "echo", text, conc, secs, None, (*relay_pid, up_pid)).await;
                print("HAProxy, TCP, 1 thread → HTTP (floor)", &relay);
            }
            if let Some((_, relay_url, relay_pid)) = &haproxy_http {
                let relay = run_on(relay_url, "echo", text, conc, secs, None, (*relay_pid, up_pid)).await;
                print("HAProxy, HTTP, 1 thread → HTTP", &relay);
            }
            for (auth, oauth) in [(false, false), (true, false), (true, true)] {
                let mut gw = start_gateway(auth, oauth);
                let pid = gw.id().unwrap_or(0);
                let url = listen_url(&mut gw).await;
                let base = url.trim_end_matches("/mcp").to_owned();
                let token = auth.then_some(TOKEN);
                // Wait for both upstreams.
                for _ in 0..100 {
                    let c = run(&format!("{base}/servers/s/mcp"), "echo", "warm", 1, 0.05, token).await;
                    if c.errors == 0 && c.rps > 0.0 {
                        break;
                    }
                }
                let mcp = format!("{base}/mcp");
                if oauth {
                    // The same gateway, the same endpoint: a static token and an access token,
                    // in the order static, JWT, JWT, static (half a cell each), so that a drift
                    // of the machine during the four weighs on both alike.
                    let jwt = access_token(&issuer, &signing, &mcp);
                    let (stat, with_jwt) =
                        interleaved((&mcp, token, (pid, up_pid)), (&mcp, Some(&jwt), (pid, up_pid)), text, conc, secs)
                            .await;
                    print("Portcullis → HTTP, OAuth on, static token", &stat);
                    print("Portcullis → HTTP, OAuth on, ES256 JWT", &with_jwt);
                    compare("JWT vs static token, same gateway", &with_jwt, &stat);
                } else {
                    let http = run_on(&mcp, "h__echo", text, conc, secs, token, (pid, up_pid)).await;
                    print(&format!("Portcullis → HTTP, auth {}", if auth { "on" } else { "off" }), &http);
                }
                if auth && !oauth {
                    let stdio = run_on(&mcp, "s__echo", text, conc, secs, token, (pid, 0)).await;
                    print("Portcullis → stdio, auth on", &stdio);
                    let issued = issue(&config_file(true, false, None), &format!("bench-{conc}-{}", text.len()));
                    let cell = run_on(&mcp, "h__echo", text, conc, secs, Some(&issued), (pid, up_pid)).await;
                    print("Portcullis → HTTP, issued token, SQLite store", &cell);
                    if let Some(url) = &postgres {
                        let cfg = config_file(true, false, Some(url));
                        let issued = issue(&cfg, &format!("bench-{conc}-{}-{}", text.len(), std::process::id()));
                        let mut pg = start_config(&cfg);
                        let pg_pid = pg.id().unwrap_or(0);
                        let pg_mcp = listen_url(&mut pg).await;
                        for _ in 0..100 {
                            let c = run(&pg_mcp, "h__echo", "warm", 1, 0.05, Some(&issued)).await;
                            if c.errors == 0 && c.rps > 0.0 {
                                break;
                            }
                        }
                        let cell = run_on(&pg_mcp, "h__echo", text, conc, secs, Some(&issued), (pg_pid, up_pid)).await;
                        print("Portcullis → HTTP, issued token, PostgreSQL store", &cell);
                        if let Some(redis) = &redis {
                            // One replica as it runs alone (SQLite, its own rate bucket) against
                            // one as it runs among replicas (PostgreSQL, the bucket in Redis),
                            // both with the same per-identity limit, high enough never to
                            // refuse: half a cell each, alone, shared, shared, alone.
                            let alone_cfg = limited_config(&sqlite, None);
                            let shared_cfg = limited_config(url, Some(redis));
                            let alone_token = issue(&alone_cfg, &format!("alone-{conc}-{}", text.len()));
                            let shared_token =
                                issue(&shared_cfg, &format!("shared-{conc}-{}-{}", text.len(), std::process::id()));
                            let mut alone = start_config(&alone_cfg);
                            let mut shared = start_config(&shared_cfg);
                            let (alone_pid, shared_pid) = (alone.id().unwrap_or(0), shared.id().unwrap_or(0));
                            let alone_mcp = listen_url(&mut alone).await;
                            let shared_mcp = listen_url(&mut shared).await;
                            for (m, t) in [(&alone_mcp, &alone_token), (&shared_mcp, &shared_token)] {
                                for _ in 0..100 {
                                    let c = run(m, "h__echo", "warm", 1, 0.05, Some(t)).await;
                                    if c.errors == 0 && c.rps > 0.0 {
                                        break;
                                    }
                                }
                            }
                            let (a, sh) = interleaved(
                                (&alone_mcp, Some(&alone_token), (alone_pid, up_pid)),
                                (&shared_mcp, Some(&shared_token), (shared_pid, up_pid)),
                                text,
                                conc,
                                secs,
                            )
                            .await;
                            print("Portcullis → HTTP, issued token, rate limit, SQLite (one replica alone)", &a);
                            print("Portcullis → HTTP, issued token, rate limit, PostgreSQL + Redis (shared)", &sh);
                            compare("shared vs alone, same run", &sh, &a);
                        }
                    }
                }
                peak = peak.max(rss_kib(pid, "VmHWM:"));
                drop(gw);
            }
        }
    }
    println!();
    println!("Portcullis peak RSS over the load runs: {} KiB", peak);

    if sessions == 0 {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    // Idle sessions: half legacy SSE streams, half streamable-HTTP sessions with GET streams.
    let mut gw = start_gateway(true, false);
    let pid = gw.id().unwrap_or(0);
    let url = listen_url(&mut gw).await;
    let base = url.trim_end_matches("/mcp").to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid, "VmRSS:");
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().expect("client");
    let mut held = Vec::with_capacity(sessions);
    let mut failed = 0usize;
    let idle_kind = env_or("PCS_BENCH_IDLE", "mixed".to_owned());
    for i in 0..sessions {
        let sse = match idle_kind.as_str() {
            "sse" => true,
            "http" => false,
            _ => i % 2 == 0,
        };
        let resp = if sse {
            client.get(format!("{base}/sse")).header("authorization", format!("Bearer {TOKEN}")).send().await
        } else {
            let init = serde_json::json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"b","version":"1"}}});
            let r = client
                .post(format!("{base}/mcp"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .header("content-type", "application/json")
                .body(init.to_string())
                .send()
                .await;
            match r
                .ok()
                .and_then(|r| r.headers().get("mcp-session-id").and_then(|v| v.to_str().ok()).map(str::to_owned))
            {
                Some(sid) => {
                    client
                        .get(format!("{base}/mcp"))
                        .header("authorization", format!("Bearer {TOKEN}"))
                        .header("accept", "text/event-stream")
                        .header("mcp-session-id", sid)
                        .header("mcp-protocol-version", "2025-11-25")
                        .send()
                        .await
                }
                None => {
                    failed += 1;
                    continue;
                }
            }
        };
        match resp {
            Ok(r) if r.status().is_success() => held.push(r),
            _ => failed += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(pid, "VmRSS:");
    // Still usable: a call on a fresh session while all of them are open.
    let usable = run(&format!("{base}/mcp"), "h__echo", "still here", 1, 0.2, Some(TOKEN)).await;
    println!(
        "Idle sessions: {} open ({} failed), RSS {} → {} KiB: {:.2} KiB per session; a call meanwhile: {} errors, p50 {:.0} µs",
        held.len(),
        failed,
        before,
        after,
        (after.saturating_sub(before)) as f64 / held.len().max(1) as f64,
        usable.errors,
        usable.p50
    );
    drop(held);
    drop(gw);
    let _ = std::fs::remove_dir_all(&dir);
}
