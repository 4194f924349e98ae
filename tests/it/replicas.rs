//! Replicas: `portcullis serve` processes sharing one PostgreSQL database (a schema of the
//! test's own in `PORTCULLIS_TEST_POSTGRES`, default `postgres://127.0.0.1:5432/test`), behind
//! Debian's HAProxy in round-robin with no affinity.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use crate::eras::sampling_answer;
use crate::support::{Client, Served, TempDir, gateway, run_cli};

/// A schema of its own in the test database, dropped afterwards.
pub(crate) struct PgSchema {
    pub url: String,
    admin: String,
    name: String,
}

fn test_database() -> String {
    std::env::var("PORTCULLIS_TEST_POSTGRES").unwrap_or_else(|_| "postgres://127.0.0.1:5432/test".into())
}

/// Runs `f` with a connection to the test database (on a thread of its own: the synchronous
/// client cannot run on the test's runtime).
fn with_admin(url: &str, sql: String) {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable at {url} ({e}): start it or point PORTCULLIS_TEST_POSTGRES at one")
        });
        c.batch_execute(&sql).unwrap();
    })
    .join()
    .unwrap();
}

impl PgSchema {
    pub(crate) fn new(database: &str) -> PgSchema {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!("pcs_it_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed));
        let admin = test_database();
        with_admin(&admin, format!("DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"));
        let sep = if database.contains('?') { '&' } else { '?' };
        PgSchema { url: format!("{database}{sep}options=-csearch_path%3D{name}"), admin, name }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        with_admin(&self.admin, format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name));
    }
}

/// A TCP relay in front of a service (PostgreSQL, Redis) that the test can cut (every relayed
/// connection closed, new ones refused: a restart as the gateway sees it), freeze (nothing
/// answers, nothing closes: a partition) and restore.
struct Link {
    port: u16,
    up: Arc<AtomicBool>,
    frozen: Arc<AtomicBool>,
    cut: tokio::sync::watch::Sender<u64>,
}

impl Link {
    /// A relay to the test database.
    async fn postgres() -> Link {
        let target = test_database();
        Link::start(target.trim_start_matches("postgres://").split('/').next().unwrap().to_owned()).await
    }

    /// A relay to `target` (`host:port`).
    async fn start(target: String) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let frozen = Arc::new(AtomicBool::new(false));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let (link_up, link_frozen) = (up.clone(), frozen.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !link_up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let mut cuts = cuts.clone();
                // Only a cut after this connection ends it.
                cuts.borrow_and_update();
                let target = target.clone();
                let frozen = link_frozen.clone();
                tokio::spawn(async move {
                    if frozen.load(Ordering::SeqCst) {
                        // Held open, never answered, until the next cut or restore.
                        let _ = cuts.changed().await;
                        return;
                    }
                    let Ok(mut outbound) = TcpStream::connect(&target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        // Both ends closed, as a stopped server closes them.
                        _ = cuts.changed() => {}
                    }
                });
            }
        });
        Link { port, up, frozen, cut }
    }

    fn database(&self) -> String {
        let db = test_database();
        let (_, path) = db.trim_start_matches("postgres://").split_once('/').unwrap();
        format!("postgres://127.0.0.1:{}/{path}", self.port)
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    /// A partition: the relayed connections end, and every new one is held open and never
    /// answered (a connect that hangs, as to a host that drops packets).
    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }

    fn restore(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        self.up.store(true, Ordering::SeqCst);
        self.cut.send_modify(|n| *n += 1);
    }
}

/// HAProxy in front of `backends`, round-robin, no affinity, with health checks.
struct Balancer {
    /// Killed when dropped.
    _child: tokio::process::Child,
    url: String,
    _dir: TempDir,
}

impl Balancer {
    async fn start(backends: &[String]) -> Balancer {
        Self::start_on(free_port(), backends).await
    }

    /// On a port chosen before (the replicas' `public_url` names it).
    async fn start_on(port: u16, backends: &[String]) -> Balancer {
        let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("HAProxy is not installed: scripts/test installs Debian's haproxy as root");
        let dir = TempDir::new();
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, b)| {
                format!("    server r{i} {} check inter 100ms fall 1 rise 1\n", b.trim_start_matches("http://"))
            })
            .collect();
        let cfg = format!(
            "global\n    maxconn 512\ndefaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    \
             timeout server 30s\n    retries 3\n    option redispatch\n\
             frontend f\n    bind 127.0.0.1:{port}\n    default_backend b\n\
             backend b\n    balance roundrobin\n    option httpchk GET /health\n{servers}"
        );
        let path = dir.0.join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let child = tokio::process::Command::new(haproxy)
            .args(["-db", "-f", path.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        accepting(port, "HAProxy").await;
        Balancer { _child: child, url: format!("http://127.0.0.1:{port}"), _dir: dir }
    }
}

/// Waits until something accepts on 127.0.0.1:`port` (a refused connect is the only answer
/// until then), at most 10 s.
async fn accepting(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening");
        tokio::task::yield_now().await;
    }
}

/// Sends `signal` (`kill`'s spelling) to a child and waits until it has exited.
async fn signalled(mut child: tokio::process::Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill").args([signal, &pid]).status().unwrap();
    child.wait().await.unwrap();
}

/// A port free on 127.0.0.1 now.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A config for replica `i` on `store`: one stdio demo server, its own audit file.
fn replica_config(dir: &TempDir, i: usize, store: &str) -> std::path::PathBuf {
    let yaml = gateway().demo("d", &[], "").yaml();
    let path = dir.0.join(format!("replica{i}.yaml"));
    let audit = dir.0.join(format!("audit{i}.jsonl"));
    std::fs::write(&path, format!("{yaml}store: {store:?}\naudit:\n  file: {:?}\n", audit.display().to_string()))
        .unwrap();
    path
}

/// A replica's base URL.
struct Base(String);

/// `portcullis token create` against the shared store: the token's id and secret.
async fn issue(cfg: &std::path::Path, name: &str, role: &str) -> (String, String) {
    let (ok, out, err) = run_cli(
        None,
        &["token", "create", "--name", name, "--role", role, "--json", "--config", cfg.to_str().unwrap()],
        &[],
    )
    .await;
    assert!(ok, "{err}");
    assert!(!err.contains("password") && err.contains("postgres://"), "the store is named, without secrets: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    (v["id"].as_str().unwrap().to_owned(), v["secret"].as_str().unwrap().to_owned())
}

/// The status of one stateless call of `d__echo` at `url` with `token`.
async fn call_status(url: &str, token: &str) -> u16 {
    Client::modern(&format!("{url}/mcp")).bearer(token).call("d__echo", json!({"text": "x"})).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_behind_a_balancer_share_tokens_and_a_revocation_reaches_all_within_a_second() {
    let schema = PgSchema::new(&test_database());
    let dir = TempDir::new();
    let cfgs: Vec<_> = (0..3).map(|i| replica_config(&dir, i, &schema.url)).collect();
    let (_, admin) = issue(&cfgs[0], "ops", "admin").await;
    let (alice_id, alice) = issue(&cfgs[1], "alice", "user").await;
    let mut replicas = Vec::new();
    for cfg in &cfgs {
        replicas.push(Served::start(cfg, &[("PORTCULLIS_SECRET_KEY", KEY_A)]).await);
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url.trim_end_matches("/mcp").to_owned()).collect();
    let lb = Balancer::start(&urls).await;

    // Stateless calls through the balancer land on every replica (each has its own child).
    let client = Client::modern(&format!("{}/mcp", lb.url)).bearer(&alice);
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..60 {
        let stats: Value = serde_json::from_str(&client.call_text("d__stats", json!({})).await).unwrap();
        pids.insert(stats["pid"].as_u64().unwrap());
    }
    assert_eq!(pids.len(), 3, "round-robin reaches all three: {pids:?}");
    assert_eq!(call_status(&lb.url, "pcs_not-a-token-at-all-000000000000000000000000").await, 401);

    // Revoked through one replica: refused by all three within a second.
    let revoked = reqwest::Client::new()
        .delete(format!("{}/admin/tokens/{alice_id}", urls[0]))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let at = Instant::now();
    for url in &urls {
        while call_status(url, &alice).await != 401 {
            assert!(at.elapsed() < Duration::from_secs(1), "{url} still accepts a token revoked elsewhere");
        }
    }
    let took = at.elapsed();
    assert!(took < Duration::from_secs(1), "{took:?}");

    // A replica killed mid-run: the call in flight on it fails at once, nothing hangs, the
    // calls after it all succeed, and a session-era session carries on on the others.
    let (_, bob) = issue(&cfgs[2], "bob", "user").await;
    let client = Client::modern(&format!("{}/mcp", lb.url)).bearer(&bob);
    let session = Client::connect_as(&format!("{}/mcp", lb.url), &bob).await;
    for n in 0..6 {
        assert_eq!(session.call_text("d__echo", json!({"text": format!("s{n}")})).await, format!("s{n}"));
    }
    // Three long calls through the balancer: one on each replica.
    let sleeping: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let params = client.add_meta(json!({"name": "d__sleep", "arguments": {"ms": 20_000}}));
                let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params});
                client.request_builder(&body).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
            })
        })
        .collect();
    // Replica 2's child answers once its sleep is in flight.
    let on_two = Client::modern(&format!("{}/mcp", urls[2])).bearer(&bob);
    on_two.call_text("d__stats", json!({"until_in_flight": 1})).await;
    let killed = Instant::now();
    replicas[2].child.start_kill().unwrap();
    replicas[2].child.wait().await.unwrap();
    let (done, _, others) = futures_util::future::select_all(sleeping).await;
    let failed = done.unwrap();
    assert_ne!(failed, 200, "the call in flight on the killed replica fails");
    assert!(killed.elapsed() < Duration::from_secs(3), "and at once: {:?}", killed.elapsed());
    for other in others {
        other.abort();
    }
    let mut outcomes = Vec::new();
    for i in 0..120 {
        let started = Instant::now();
        // A call in flight on the killed replica may fail as a transport error (the balancer
        // closes the connection): counted as a failure (0), never a hang.
        let params = client.add_meta(json!({"name": "d__echo", "arguments": {"text": "y"}}));
        let body = json!({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params});
        let sent = tokio::time::timeout(Duration::from_secs(5), client.request_builder(&body).send())
            .await
            .expect("no call hangs");
        outcomes.push((sent.map_or(0, |r| r.status().as_u16()), started.elapsed()));
    }
    assert!(outcomes[20..].iter().all(|(s, _)| *s == 200), "every later call succeeds: {outcomes:?}");
    for n in 0..30 {
        let text = format!("after {n}");
        assert_eq!(session.call_text("d__echo", json!({"text": &text})).await, text, "the session carries on");
    }
    drop(lb);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_means_503_until_it_is_back_and_nothing_is_lost() {
    let link = Link::postgres().await;
    let schema = PgSchema::new(&link.database());
    let dir = TempDir::new();
    let cfg = replica_config(&dir, 0, &schema.url);
    // A config token for the metrics: confirmed by the config, not the store.
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str("auth:\n  tokens:\n    prom: {token: prom-token-0123456789abcdef, role: metrics}\n");
    std::fs::write(&cfg, text).unwrap();
    let (_, alice) = issue(&cfg, "alice", "user").await;
    let served = Served::start(&cfg, &[]).await;
    let replica = Base(served.url.trim_end_matches("/mcp").to_owned());
    assert_eq!(call_status(&replica.0, &alice).await, 200);
    let health = |url: String| async move {
        let r = reqwest::get(format!("{url}/health")).await.unwrap();
        (r.status().as_u16(), serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap())
    };
    assert_eq!(health(replica.0.clone()).await.0, 200);

    link.cut();
    // Within the next poll the replica can no longer confirm anyone: 503, never 200 or 401.
    let at = Instant::now();
    loop {
        match call_status(&replica.0, &alice).await {
            503 => break,
            200 => assert!(at.elapsed() < Duration::from_secs(2), "still serving without its store"),
            other => panic!("{other} while the store is gone"),
        }
    }
    let (status, body) = health(replica.0.clone()).await;
    assert_eq!((status, body["store"].as_str()), (503, Some("unavailable")), "{body}");
    let metrics = reqwest::Client::new()
        .get(format!("{}/metrics", replica.0))
        .bearer_auth("prom-token-0123456789abcdef")
        .send()
        .await
        .unwrap();
    assert!(metrics.text().await.unwrap().contains("portcullis_store_up 0"));

    link.restore();
    let at = Instant::now();
    while call_status(&replica.0, &alice).await != 200 {
        assert!(at.elapsed() < Duration::from_secs(15), "no recovery");
    }
    // `/health` follows at the next poll.
    while health(replica.0.clone()).await.0 != 200 {
        assert!(at.elapsed() < Duration::from_secs(16), "/health did not recover");
    }

    // A partition (nothing answers, nothing refuses): 503 within the poll's deadline too, not
    // after the connect timeout, and back when it heals.
    link.freeze();
    let at = Instant::now();
    loop {
        match call_status(&replica.0, &alice).await {
            503 => break,
            200 => assert!(at.elapsed() < Duration::from_secs(2), "still serving across a partition"),
            other => panic!("{other} across a partition"),
        }
    }
    link.restore();
    let at = Instant::now();
    while call_status(&replica.0, &alice).await != 200 {
        assert!(at.elapsed() < Duration::from_secs(15), "no recovery after the partition");
    }
}

const KEY_A: &str = "replica-key-a-0123456789abcdef0123456789";
const KEY_B: &str = "replica-key-b-0123456789abcdef0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_era_clients_move_between_replicas_on_sealed_ids() {
    let schema = PgSchema::new(&test_database());
    let dir = TempDir::new();
    let cfgs: Vec<_> = (0..5).map(|i| replica_config(&dir, i, &schema.url)).collect();
    let (_, alice) = issue(&cfgs[0], "alice", "user").await;
    let same_key = [("PORTCULLIS_SECRET_KEY", KEY_A)];
    let mut replicas = Vec::new();
    for cfg in &cfgs[..3] {
        replicas.push(Served::start(cfg, &same_key).await);
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url.trim_end_matches("/mcp").to_owned()).collect();
    let lb = Balancer::start(&urls).await;

    // One session, every request on whichever replica: all three serve it.
    let client = Client::connect_as(&format!("{}/mcp", lb.url), &alice).await;
    let mut pids = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let stats: Value = serde_json::from_str(&client.call_text("d__stats", json!({})).await).unwrap();
        pids.insert(stats["pid"].as_u64().unwrap());
    }
    assert_eq!(pids.len(), 3, "one session served by all three: {pids:?}");

    // The official SDK in both eras, 200 calls each, through the balancer.
    for mode in ["legacy", "auto"] {
        let out =
            crate::external::sdk_client_calls(&format!("{}/mcp", lb.url), mode, "d__", false, Some(&alice), 200).await;
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(seen["calls_ok"], 200, "{mode}: {seen}");
    }

    // Rotation: a replica with a new key and the old one as previous opens the id; one whose
    // ring no longer holds the old key does not; a changed id opens nowhere.
    let rotating =
        Served::start(&cfgs[3], &[("PORTCULLIS_SECRET_KEY", KEY_B), ("PORTCULLIS_SECRET_KEY_PREVIOUS", KEY_A)]).await;
    let retired = Served::start(&cfgs[4], &[("PORTCULLIS_SECRET_KEY", KEY_B)]).await;
    let on = |url: &str| {
        let mut c = Client::new(url).bearer(&alice);
        c.session = client.session.clone();
        c.version = client.version.clone();
        c
    };
    assert_eq!(on(&rotating.url).call("d__echo", json!({"text": "r"})).await.status, 200);
    assert_eq!(on(&retired.url).call("d__echo", json!({"text": "r"})).await.status, 404);
    let mut tampered = on(&rotating.url);
    let id = tampered.session.clone().unwrap();
    let mid = id.len() / 2;
    let flipped = if &id[mid..=mid] == "A" { "B" } else { "A" };
    tampered.session = Some(format!("{}{flipped}{}", &id[..mid], &id[mid + 1..]));
    assert_eq!(tampered.call("d__echo", json!({"text": "t"})).await.status, 404);
    // Another principal presenting the id: 404, as unknown.
    let (_, bob) = issue(&cfgs[0], "bob", "user").await;
    let mut stolen = Client::new(&format!("{}/mcp", urls[1])).bearer(&bob);
    stolen.session = client.session.clone();
    stolen.version = client.version.clone();
    assert_eq!(stolen.call("d__echo", json!({"text": "s"})).await.status, 404);

    // Deleted through one replica: no replica opens it again.
    let deleted = on(&rotating.url).request_builder(&json!({})).build().unwrap();
    let mut delete = reqwest::Request::new(reqwest::Method::DELETE, deleted.url().clone());
    *delete.headers_mut() = deleted.headers().clone();
    assert_eq!(reqwest::Client::new().execute(delete).await.unwrap().status(), 204);
    // Within a second, like a revocation (the store announces it; the replicas holding it end it).
    let at = Instant::now();
    for url in &urls {
        loop {
            match on(&format!("{url}/mcp")).call("d__echo", json!({"text": "d"})).await.status {
                404 => break,
                200 => assert!(at.elapsed() < Duration::from_secs(1), "{url} still serves a deleted session"),
                other => panic!("{other}"),
            }
        }
    }
}

/// The Redis the tests use (`PORTCULLIS_TEST_REDIS`, default `redis://127.0.0.1:6379/0`): its
/// `host:port` and database path.
fn test_redis() -> (String, String) {
    let url = std::env::var("PORTCULLIS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    let rest = url.trim_start_matches("redis://");
    let (host, db) = rest.split_once('/').unwrap_or((rest, "0"));
    assert!(
        std::net::TcpStream::connect(host).is_ok(),
        "Redis is not reachable at {url}: start it or point PORTCULLIS_TEST_REDIS at one"
    );
    (host.to_owned(), db.to_owned())
}

/// `/health` of a replica: status and body.
async fn health_of(url: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{url}/health")).await.unwrap();
    (r.status().as_u16(), serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap())
}

/// Waits until `/health` of every replica says the shared state is `want`.
async fn await_state(urls: &[String], want: &str, within: Duration) {
    let at = Instant::now();
    for url in urls {
        loop {
            let (status, body) = health_of(url).await;
            // A replica still starting its servers says so (503) whatever the state is.
            if body["state"] == want && body["status"] != "starting" {
                assert_eq!(status, 200, "a lost Redis never takes a replica out of the balancer: {body}");
                break;
            }
            assert!(at.elapsed() < within, "{url}: state is not {want}: {body}");
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_hold_one_rate_limit_and_one_failure_throttle_through_redis() {
    let (redis, db) = test_redis();
    let link = Link::start(redis).await;
    let dir = TempDir::new();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let prefix = format!("pcs-it-{}-{nanos}:", std::process::id());
    let mut replicas = Vec::new();
    for i in 0..3 {
        let cfg = replica_config(&dir, i, dir.0.join(format!("replica{i}.db")).to_str().unwrap());
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!(
            "state:\n  url: redis://127.0.0.1:{}/{db}\n  prefix: {prefix:?}\n\
             auth:\n  max_failures_per_minute: 6\n  tokens:\n    \
             alice: {{token: alice-token-0123456789abcdef, rate: 30/min}}\n    \
             bob: bob-token-0123456789abcdef\n    \
             carol: {{token: carol-token-0123456789abcdef, rate: 4/min}}\n    \
             prom: {{token: prom-token-0123456789abcdef, role: metrics}}\n",
            link.port
        ));
        std::fs::write(&cfg, text).unwrap();
        replicas.push(Served::start(&cfg, &[]).await);
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url.trim_end_matches("/mcp").to_owned()).collect();
    await_state(&urls, "ok", Duration::from_secs(10)).await;
    let lb = Balancer::start(&urls).await;

    // 60 calls through the balancer, 20 on each replica: alone, each would admit all 20; held
    // across the three, 30 pass (plus what refills meanwhile: one per 2 s).
    let started = Instant::now();
    let mut admitted = 0u32;
    let mut refused = 0u32;
    for _ in 0..60 {
        match call_status(&lb.url, "alice-token-0123456789abcdef").await {
            200 => admitted += 1,
            429 => refused += 1,
            other => panic!("{other}"),
        }
    }
    let refilled = u32::try_from(started.elapsed().as_secs() / 2).unwrap() + 1;
    eprintln!("rate limit 30/min across 3 replicas: {admitted} of 60 admitted in {:?}", started.elapsed());
    assert!((30..=30 + refilled).contains(&admitted), "{admitted} admitted, {refused} refused");

    // Wrong credentials, spread over the three: 6 failures allowed in all (each replica may let
    // one more through before it learns of a block made elsewhere), then 429.
    let mut failures_before_block = 0;
    for _ in 0..15 {
        match call_status(&lb.url, "bad-token-0123456789abcdef000").await {
            401 => failures_before_block += 1,
            429 => break,
            other => panic!("{other}"),
        }
    }
    eprintln!("failure throttle of 6 across 3 replicas: {failures_before_block} failures before 429");
    assert!((6..=9).contains(&failures_before_block), "{failures_before_block}");

    // Redis goes away: every replica carries on (authentication never depends on it), limits
    // count per replica, `/health` says degraded (200) and the metric says 0.
    link.cut();
    await_state(&urls, "unavailable", Duration::from_secs(5)).await;
    for url in &urls {
        assert_eq!(health_of(url).await.1["status"], "degraded");
        assert_eq!(call_status(url, "bob-token-0123456789abcdef").await, 200);
        let metrics = reqwest::Client::new()
            .get(format!("{url}/metrics"))
            .bearer_auth("prom-token-0123456789abcdef")
            .send()
            .await
            .unwrap();
        assert!(metrics.text().await.unwrap().contains("portcullis_state_up 0"));
    }
    // Each replica counts alone meanwhile: carol's 4/min is 4 on each of the three.
    let mut alone = 0;
    for _ in 0..15 {
        if call_status(&lb.url, "carol-token-0123456789abcdef").await == 200 {
            alone += 1;
        }
    }
    assert_eq!(alone, 12, "per replica while Redis is away");
    // The block each replica learnt holds while Redis is away.
    assert_eq!(call_status(&lb.url, "another-bad-token-0123456789ab").await, 429);

    // Back: shared again, and the bucket it kept still holds alice to her limit.
    link.restore();
    await_state(&urls, "ok", Duration::from_secs(10)).await;
    for url in &urls {
        assert_eq!(health_of(url).await.1["status"], "ok");
    }
    let mut after = 0;
    for _ in 0..6 {
        if call_status(&lb.url, "alice-token-0123456789abcdef").await == 200 {
            after += 1;
        }
    }
    let refilled = u32::try_from(started.elapsed().as_secs() / 2).unwrap() + 1;
    assert!(admitted + after <= 30 + refilled, "{admitted} + {after} admitted in {:?}", started.elapsed());
    drop(lb);
}

/// Three replicas sharing a database, a session key and a Redis (under a prefix of the test's
/// own); alice is a config token.
async fn sharing_replicas(dir: &TempDir, schema: &PgSchema, extra: &str) -> (Vec<Served>, Vec<String>) {
    let (redis, db) = test_redis();
    sharing_replicas_on(dir, schema, extra, &format!("{redis}/{db}")).await
}

/// [`sharing_replicas`] on the Redis at `redis` (`host:port/db`).
async fn sharing_replicas_on(dir: &TempDir, schema: &PgSchema, extra: &str, redis: &str) -> (Vec<Served>, Vec<String>) {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let prefix = format!("pcs-it-{}-{nanos}:", std::process::id());
    let mut replicas = Vec::new();
    for i in 0..3 {
        let cfg = replica_config(dir, i, &schema.url);
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!(
            "state:\n  url: redis://{redis}\n  prefix: {prefix:?}\n\
             auth:\n  tokens:\n    alice: alice-token-0123456789abcdef\n    \
             prom: {{token: prom-token-0123456789abcdef, role: metrics}}\n{extra}"
        ));
        std::fs::write(&cfg, text).unwrap();
        replicas.push(Served::start(&cfg, &[("PORTCULLIS_SECRET_KEY", KEY_A)]).await);
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url.trim_end_matches("/mcp").to_owned()).collect();
    await_state(&urls, "ok", Duration::from_secs(10)).await;
    (replicas, urls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_stream_hears_what_other_replicas_produce_for_it_and_answers_find_their_way_back() {
    let schema = PgSchema::new(&test_database());
    let dir = TempDir::new();
    let (mut replicas, urls) = sharing_replicas(&dir, &schema, "").await;
    let alice = "alice-token-0123456789abcdef";
    let within = Duration::from_secs(5);

    // Session-era: the GET stream on replica 0; subscriptions and the updates that follow
    // them made on replicas 1 and 2 (each replica's own child tells its own subscribers).
    let client = Client::connect_as(&format!("{}/mcp", urls[0]), alice).await;
    let mut events = client.get_stream().await;
    for (n, url) in urls.iter().enumerate().skip(1) {
        let mut there = Client::new(&format!("{url}/mcp")).bearer(alice);
        there.session = client.session.clone();
        there.version = client.version.clone();
        let sub = there.request(json!(10 + n), "resources/subscribe", json!({"uri": "demo://info"})).await;
        assert_eq!(sub.status, 200, "{:?}", sub.response);
        assert_eq!(there.call_text("d__touch", json!({"uri": "demo://info"})).await, "told 1");
        let updated = tokio::time::timeout(within, events.next_method("notifications/resources/updated"))
            .await
            .unwrap_or_else(|_| panic!("the stream on replica 0 did not hear replica {n}"));
        assert_eq!(updated["params"]["uri"], "demo://info");
    }

    // A server-to-client request asked by replica 1's child for a call whose POST takes only
    // JSON: it goes out on the GET stream (replica 0); its answer, POSTed to replica 2, finds
    // its way back to replica 1, and the call completes.
    let mut on1 = Client::new(&format!("{}/mcp", urls[1])).bearer(alice);
    on1.session = client.session.clone();
    on1.version = client.version.clone();
    let body = json!({"jsonrpc":"2.0","id":"s1","method":"tools/call","params":{"name":"d__sample","arguments":{"prompt":"far"}}});
    let mut req = on1.request_builder(&body).build().unwrap();
    req.headers_mut().insert("accept", "application/json".parse().unwrap());
    let call = tokio::spawn(async move { reqwest::Client::new().execute(req).await.unwrap().text().await.unwrap() });
    let asked = tokio::time::timeout(within, events.next_method("sampling/createMessage"))
        .await
        .expect("the request asked on replica 1 reaches the stream on replica 0");
    let mut on2 = Client::new(&format!("{}/mcp", urls[2])).bearer(alice);
    on2.session = client.session.clone();
    on2.version = client.version.clone();
    let answer = json!({"jsonrpc":"2.0","id":asked["id"],"result":{"role":"assistant","content":{"type":"text","text":"from afar"},"model":"m"}});
    assert_eq!(on2.post(answer).await.status(), 202);
    let done: Value =
        serde_json::from_str(&tokio::time::timeout(within, call).await.expect("the call completes").unwrap()).unwrap();
    assert_eq!(done["result"]["content"][0]["text"], "sampled: from afar", "{done}");

    // Legacy SSE: the stream on replica 0, POSTs on every replica, every answer on the stream.
    let (mut sse, endpoint) = crate::protocol::open_sse(&format!("{}/sse", urls[0]), Some(alice)).await;
    let init = json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2024-11-05","capabilities":{},"clientInfo":{"name":"t","version":"1"}}});
    assert_eq!(crate::support::post_as(&format!("{}{endpoint}", urls[1]), alice, &init).await.status(), 202);
    let answer = tokio::time::timeout(within, sse.next()).await.expect("initialize answered through replica 1");
    assert_eq!(answer["result"]["protocolVersion"], "2024-11-05");
    for round in 0..6u64 {
        let url = &urls[usize::try_from(round).unwrap() % 3];
        let call = json!({"jsonrpc":"2.0","id":round + 1,"method":"tools/call","params":{"name":"d__echo","arguments":{"text":format!("r{round}")}}});
        assert_eq!(crate::support::post_as(&format!("{url}{endpoint}"), alice, &call).await.status(), 202);
        let answer = tokio::time::timeout(within, sse.next()).await.expect("answered on the stream");
        assert_eq!(answer["id"], round + 1);
        assert_eq!(answer["result"]["content"][0]["text"], format!("r{round}"));
    }
    // Another identity's POST is refused wherever it lands, as an unknown id.
    let bad = crate::support::post_as(&format!("{}{endpoint}", urls[2]), "nobody-0123456789abcdef", &init).await;
    assert_eq!(bad.status(), 401);
    // The stream closed: the session is over on every replica within a second, the ones that
    // served its POSTs too.
    drop(sse);
    let call =
        json!({"jsonrpc":"2.0","id":99,"method":"tools/call","params":{"name":"d__echo","arguments":{"text":"late"}}});
    let at = Instant::now();
    for url in &urls {
        while crate::support::post_as(&format!("{url}{endpoint}"), alice, &call).await.status() != 404 {
            assert!(at.elapsed() < Duration::from_secs(1), "{url} still serves a legacy session whose stream closed");
        }
    }

    // The replica holding a stream killed: it never says the stream closed, and the others,
    // which served the session's POSTs, answer 404 from then on, not a 202 nobody hears.
    let (mut sse, endpoint) = crate::protocol::open_sse(&format!("{}/sse", urls[2]), Some(alice)).await;
    for url in &urls[..2] {
        assert_eq!(crate::support::post_as(&format!("{url}{endpoint}"), alice, &init).await.status(), 202);
        let answer = tokio::time::timeout(within, sse.next()).await.expect("answered on the stream");
        assert_eq!(answer["result"]["protocolVersion"], "2024-11-05");
    }
    replicas[2].child.start_kill().unwrap();
    replicas[2].child.wait().await.unwrap();
    let at = Instant::now();
    for url in &urls[..2] {
        while crate::support::post_as(&format!("{url}{endpoint}"), alice, &call).await.status() != 404 {
            assert!(at.elapsed() < Duration::from_secs(2), "{url} still takes POSTs for a stream on a killed replica");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_idle_on_one_replica_lives_on_where_it_is_used() {
    let schema = PgSchema::new(&test_database());
    let dir = TempDir::new();
    let limits = "limits:\n  session_idle_timeout: 1s\n";
    let (_replicas, urls) = sharing_replicas(&dir, &schema, limits).await;
    let alice = "alice-token-0123456789abcdef";
    // Opened on replica 0, with its stream there; one call on replica 1, then none.
    let client = Client::connect_as(&format!("{}/mcp", urls[0]), alice).await;
    let mut events = client.get_stream().await;
    let mut on1 = Client::new(&format!("{}/mcp", urls[1])).bearer(alice);
    on1.session = client.session.clone();
    on1.version = client.version.clone();
    assert_eq!(on1.call_text("d__echo", json!({"text": "once"})).await, "once");
    // Replica 1 ends its copy as idle (its metric says so) ...
    let at = Instant::now();
    loop {
        let m = reqwest::Client::new()
            .get(format!("{}/metrics", urls[1]))
            .bearer_auth("prom-token-0123456789abcdef")
            .send()
            .await
            .unwrap();
        if m.text().await.unwrap().contains("portcullis_sessions_ended_total{cause=\"idle\"} 1") {
            break;
        }
        assert!(at.elapsed() < Duration::from_secs(5), "replica 1 never ended its idle copy");
        tokio::task::yield_now().await;
    }
    // ... which ends nothing elsewhere: the stream on replica 0 still hears, and replica 1
    // serves the session again on its next request.
    assert_eq!(client.call_text("d__echo", json!({"text": "still"})).await, "still");
    let sub = on1.request(json!(7), "resources/subscribe", json!({"uri": "demo://info"})).await;
    assert_eq!(sub.status, 200, "{:?}", sub.response);
    assert_eq!(on1.call_text("d__touch", json!({"uri": "demo://info"})).await, "told 1");
    let updated = tokio::time::timeout(Duration::from_secs(5), events.next_method("notifications/resources/updated"))
        .await
        .expect("the stream on replica 0 outlived replica 1's idle copy");
    assert_eq!(updated["params"]["uri"], "demo://info");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_stateless_call_resumes_on_any_replica_for_its_caller_only() {
    let schema = PgSchema::new(&test_database());
    let dir = TempDir::new();
    let (mut replicas, urls) = sharing_replicas(&dir, &schema, "    bob: bob-token-0123456789abcdef\n").await;
    let on = |i: usize, token: &str| Client::modern(&format!("{}/mcp", urls[i])).bearer(token);
    let (alice, bob) = ("alice-token-0123456789abcdef", "bob-token-0123456789abcdef");
    let retry = |state: &str, answers: Value| json!({"name":"d__sample","arguments":{"prompt":"p2"},"requestState":state,"inputResponses":answers});

    // Parked on replica 0: replica 0's child asked for a sample.
    let first = on(0, alice).call("d__sample", json!({"prompt":"p2"})).await;
    let r = &first.response["result"];
    assert_eq!(r["resultType"], "input_required", "{:?}", first.response);
    let (key, ask) = r["inputRequests"].as_object().unwrap().iter().next().unwrap();
    let answers = json!({ key.as_str(): sampling_answer(ask) });
    let state = r["requestState"].as_str().unwrap().to_owned();

    // Another principal's retry, on another replica, is told it is unknown, and the call stays
    // parked for its own caller; an unknown state is refused at once.
    let stolen = on(1, bob).request(json!(2), "tools/call", retry(&state, answers.clone())).await;
    assert_eq!(stolen.response["error"]["code"], -32602, "{:?}", stolen.response);
    let made_up = format!("{state}x");
    let bogus = on(2, alice).request(json!(3), "tools/call", retry(&made_up, answers.clone())).await;
    assert_eq!(bogus.response["error"]["code"], -32602, "{:?}", bogus.response);

    // Its caller's retry on replica 1 resumes it on replica 0, and the result comes back.
    let resumed = on(1, alice).request(json!(4), "tools/call", retry(&state, answers.clone())).await;
    assert_eq!(resumed.response["result"]["content"][0]["text"], "sampled: answer to p2", "{:?}", resumed.response);
    // The state is single-use, wherever it is retried.
    for i in 0..3 {
        let again = on(i, alice).request(json!(5), "tools/call", retry(&state, answers.clone())).await;
        assert_eq!(again.response["error"]["code"], -32602, "replica {i}: {:?}", again.response);
    }

    // A call parked on a replica that is gone: the retry elsewhere is refused at once.
    let parked = on(2, alice).call("d__sample", json!({"prompt":"p2"})).await;
    let state = parked.response["result"]["requestState"].as_str().unwrap().to_owned();
    replicas[2].child.start_kill().unwrap();
    replicas[2].child.wait().await.unwrap();
    let started = Instant::now();
    let orphan = on(0, alice).request(json!(6), "tools/call", retry(&state, answers.clone())).await;
    assert_eq!(orphan.response["error"]["code"], -32602, "{:?}", orphan.response);
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

/// The official Python SDK signs in through a real browser against Portcullis' own
/// authorization server on three replicas behind round-robin HAProxy: the authorization
/// started on one replica is signed in to and approved on others, its code exchanged on
/// another, and the calls, the refresh and the revocation land anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_sign_in_goes_through_any_replica() {
    let schema = PgSchema::new(&test_database());
    let dir = TempDir::new();
    let port = free_port();
    let extra = format!(
        "    walker: {}\noauth:\n  authorization_server: {{}}\npublic_url: http://127.0.0.1:{port}\n",
        crate::authserver::ALICE
    );
    let (_replicas, urls) = sharing_replicas(&dir, &schema, &extra).await;
    let lb = Balancer::start_on(port, &urls).await;
    let shots = TempDir::new();
    let env = crate::authserver::browser_env(&shots.0.display().to_string());
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let seen = crate::idp::sdk_oauth(&format!("{}/mcp", lb.url), "d__echo", &env).await;
    crate::authserver::assert_refreshed_then_refused(&seen);
    assert_eq!(seen["resource"], format!("{}/mcp", lb.url));
}

/// A Redis of the test's own (Debian's `redis-server`, nothing kept on disk), so it can be
/// really stopped and started again on the same port.
struct OwnRedis {
    child: Option<tokio::process::Child>,
    port: u16,
}

impl OwnRedis {
    async fn start() -> OwnRedis {
        let mut r = OwnRedis { child: None, port: free_port() };
        r.run().await;
        r
    }

    async fn run(&mut self) {
        let server = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("redis-server is not installed (Debian's redis-server package)");
        let port = self.port.to_string();
        let child = tokio::process::Command::new(server)
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        accepting(self.port, "redis-server").await;
    }

    /// Stops it (SIGTERM, as a service manager does) and waits until it has exited.
    async fn stop(&mut self) {
        signalled(self.child.take().unwrap(), "-TERM").await;
    }
}

/// Redis really stopped and started again: nothing fails meanwhile (authentication never
/// depends on it; limits count per replica; /health degraded), and once it is back the limits
/// are shared again and a session's stream hears other replicas again (the subscriptions are
/// made anew on the new server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_started_again() {
    let schema = PgSchema::new(&test_database());
    let dir = TempDir::new();
    let mut redis = OwnRedis::start().await;
    let extra = "    carol: {token: carol-token-0123456789abcdef, rate: 6/min}\n";
    let (_replicas, urls) = sharing_replicas_on(&dir, &schema, extra, &format!("127.0.0.1:{}/0", redis.port)).await;
    let alice = "alice-token-0123456789abcdef";
    let carol = "carol-token-0123456789abcdef";
    let within = Duration::from_secs(5);
    let client = Client::connect_as(&format!("{}/mcp", urls[0]), alice).await;
    let mut events = client.get_stream().await;
    let mut there = Client::new(&format!("{}/mcp", urls[1])).bearer(alice);
    there.session = client.session.clone();
    there.version = client.version.clone();
    let sub = there.request(json!(2), "resources/subscribe", json!({"uri": "demo://info"})).await;
    assert_eq!(sub.status, 200, "{:?}", sub.response);

    redis.stop().await;
    await_state(&urls, "unavailable", within).await;
    for url in &urls {
        assert_eq!(call_status(url, alice).await, 200, "{url}: authentication does not depend on Redis");
        assert_eq!(call_status(url, "pcs_not-a-token-at-all-000000000000000000000000").await, 401);
    }

    redis.run().await;
    await_state(&urls, "ok", within).await;
    // A replica's stream subscriptions come back with it: an update made on replica 1 reaches
    // the stream on replica 0 (asked again until it does: a message published before replica
    // 0 has subscribed again is lost, as documented).
    let deadline = Instant::now() + within;
    loop {
        assert_eq!(there.call_text("d__touch", json!({"uri": "demo://info"})).await, "told 1");
        let heard =
            tokio::time::timeout(Duration::from_millis(250), events.next_method("notifications/resources/updated"));
        if heard.await.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the stream on replica 0 never heard replica 1 again");
    }
    // One limit again across the three: 6/min admits 6 of 12 calls, wherever they land.
    let mut admitted = 0;
    for i in 0..12 {
        if call_status(&urls[i % 3], carol).await == 200 {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 6, "one bucket across the replicas after the restart");
}

/// A PostgreSQL server of the test's own (Debian's binaries, a cluster in a temporary
/// directory, fsync off), so it can be really stopped and started again on the same port.
struct OwnPostgres {
    child: Option<tokio::process::Child>,
    port: u16,
    bin: std::path::PathBuf,
    dir: TempDir,
}

impl OwnPostgres {
    async fn start() -> OwnPostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|p| p.join("initdb").exists())
            .expect("PostgreSQL's server binaries are not installed (Debian's postgresql package)");
        let dir = TempDir::new();
        let mut pg = OwnPostgres { child: None, port: free_port(), bin, dir };
        // PostgreSQL refuses to run as root: as the package's postgres user then.
        if Self::as_root() {
            let ok = std::process::Command::new("chown").args(["-R", "postgres:postgres"]).arg(&pg.dir.0).status();
            assert!(ok.unwrap().success());
        }
        let data = pg.dir.0.join("data");
        let init = pg
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(init.success(), "initdb failed");
        pg.run().await;
        pg
    }

    fn as_root() -> bool {
        std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    }

    fn command(&self, program: &str) -> tokio::process::Command {
        let path = self.bin.join(program);
        if Self::as_root() {
            let mut c = tokio::process::Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]).arg(path);
            c
        } else {
            tokio::process::Command::new(path)
        }
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn run(&mut self) {
        let port = self.port.to_string();
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.0.join("data"))
            .args(["-p", &port, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-k"])
            .arg(&self.dir.0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Ready when it answers a query (it accepts connections a moment before).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = self.command("pg_isready").args(["-h", "127.0.0.1", "-p", &port, "-q"]).status().await;
            if ready.is_ok_and(|s| s.success()) {
                break;
            }
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            tokio::task::yield_now().await;
        }
    }

    /// A fast shutdown (SIGINT, what `pg_ctl stop -m fast` sends), waited for.
    async fn stop(&mut self) {
        signalled(self.child.take().unwrap(), "-INT").await;
    }
}

/// PostgreSQL really stopped and started again under a replica: 503 meanwhile (never 200 on
/// what it can no longer confirm, never 401), then recovery, with nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stopped_and_started_again() {
    let mut pg = OwnPostgres::start().await;
    let dir = TempDir::new();
    let cfg = replica_config(&dir, 0, &pg.url());
    let (_, alice) = issue(&cfg, "alice", "user").await;
    let (bob_id, bob) = issue(&cfg, "bob", "user").await;
    let served = Served::start(&cfg, &[]).await;
    let replica = served.url.trim_end_matches("/mcp").to_owned();
    let (admin_id, admin) = issue(&cfg, "ops", "admin").await;
    assert_eq!(call_status(&replica, &alice).await, 200);
    let revoked =
        reqwest::Client::new().delete(format!("{replica}/admin/tokens/{bob_id}")).bearer_auth(&admin).send().await;
    assert_eq!(revoked.unwrap().status(), 200);
    assert_eq!(call_status(&replica, &bob).await, 401);

    pg.stop().await;
    let at = Instant::now();
    loop {
        match call_status(&replica, &alice).await {
            503 => break,
            200 => assert!(at.elapsed() < Duration::from_secs(2), "still serving without its store"),
            other => panic!("{other} while the store is gone"),
        }
    }
    // `/health` follows at the next poll.
    while health_of(&replica).await.0 != 503 {
        assert!(at.elapsed() < Duration::from_secs(2), "/health still 200 without the store");
    }

    pg.run().await;
    let at = Instant::now();
    while call_status(&replica, &alice).await != 200 {
        assert!(at.elapsed() < Duration::from_secs(15), "no recovery");
    }
    // Nothing lost: the tokens issued and the revocation made before the restart; and each of
    // the pool's connections, closed by the restart, is replaced at its next use, unseen.
    for _ in 0..8 {
        assert_eq!(call_status(&replica, &bob).await, 401, "the revocation survived");
    }
    let listed = reqwest::Client::new().get(format!("{replica}/admin/tokens")).bearer_auth(&admin).send().await;
    let listed: Value = serde_json::from_str(&listed.unwrap().text().await.unwrap()).unwrap();
    let text = listed.to_string();
    assert!(text.contains(&admin_id) && text.contains(&bob_id), "{listed}");
    while health_of(&replica).await.0 != 200 {
        assert!(at.elapsed() < Duration::from_secs(16), "/health did not recover");
    }
}
