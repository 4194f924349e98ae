//! The command line: `serve`, `check`, `demo-server`. The only place besides `main` that uses
//! `anyhow`: everything here reports to a person and exits.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{self, Config, Transport};

/// Portcullis: an authenticating gateway for MCP servers.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log line format.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (default: ./portcullis.yaml, then ./portcullis.json, else the built-in demo).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address, overriding the config's `listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Worker threads (default: one per core this process may use). With one, the
        /// current-thread scheduler runs everything on the main thread.
        #[arg(long)]
        workers: Option<usize>,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value_t)]
        log_format: LogFormat,
        /// Test hook: panic on the main thread after this long (e.g. `2s`), to prove that no
        /// child process outlives a crash of the gateway.
        #[arg(long, hide = true)]
        test_panic_after: Option<String>,
        /// Test hook: behave as if the OS random source had failed, to prove that the gateway
        /// then refuses to start.
        #[arg(long, hide = true)]
        test_no_randomness: bool,
        /// Create a random token for this run, print it once to stderr, and accept it (admin).
        #[arg(long)]
        generate_token: bool,
        /// Serve on a non-loopback address with no credential configured, warned at every start
        /// (without this flag Portcullis refuses to start on such an address)
        #[arg(long)]
        allow_unauthenticated: bool,
    },
    /// Speak MCP on stdin/stdout (for clients that launch a local command): every server, or
    /// one with `--server`. No token is checked; `--as NAME` applies that token's grants.
    Stdio {
        /// Config file (default: ./portcullis.yaml, then ./portcullis.json, else the built-in demo).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Expose only this server, unchanged (no name prefixes).
        #[arg(long)]
        server: Option<String>,
        /// Apply the grants of this configured token name.
        #[arg(long = "as")]
        as_identity: Option<String>,
    },
    /// Sign in to a remote server whose `oauth:` has the authorization_code grant: prints the
    /// URL to open (and opens a browser where there is one), takes the browser's return on
    /// 127.0.0.1, and keeps the tokens in the vault for the gateway.
    Login {
        /// The server's name.
        server: String,
        /// Config file (default: ./portcullis.yaml, then ./portcullis.json).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Do not try to open a browser (print the URL only).
        #[arg(long)]
        no_browser: bool,
        /// How long to wait for the browser's return.
        #[arg(long, default_value = "5m")]
        timeout: String,
    },
    /// Forget a remote server's signed-in account (the gateway stops using it within a second).
    Logout {
        /// The server's name.
        server: String,
        /// Config file (default: ./portcullis.yaml, then ./portcullis.json).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Manage issued tokens (the store a running gateway reads: `portcullis.db` beside the config).
    Token {
        /// Config file (default: ./portcullis.yaml, then ./portcullis.json).
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
        /// What to do.
        #[command(subcommand)]
        action: TokenCommand,
    },
    /// Validate a config file: every error with its path and line; a summary per server.
    Check {
        /// Config file (default: ./portcullis.yaml, then ./portcullis.json).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the JSON Schema of the config file (published as docs/portcullis.schema.json).
    Schema,
    /// Run the bundled demo MCP server (stdio by default).
    DemoServer {
        /// Serve streamable HTTP on this address instead of stdio.
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Page size of its lists (default: everything on one page).
        #[arg(long)]
        page_size: Option<usize>,
        /// The name it reports in serverInfo.
        #[arg(long, default_value = "portcullis-demo")]
        name: String,
        /// HTTP: speak only the session-based era (refuse 2026-07-28 requests, as pre-2026
        /// servers do).
        #[arg(long)]
        session_only: bool,
        /// HTTP: answer an unknown session with 400 "No valid session ID provided" (as the
        /// TypeScript SDK's servers do) instead of 404.
        #[arg(long)]
        unknown_session_400: bool,
        /// Also offer the test fixtures (crash, sleep, fail, big, stats, env, spawn_grandchild,
        /// forget_sessions, drop_stream); without it only the showcase tools.
        #[arg(long)]
        fixtures: bool,
    },
}

/// Loads the config named on the command line, or the default file, or the built-in demo.
/// What the vault says of a server's shared account: `logged in`, `needs login`, `not logged in`.
fn login_state(config: &Config, server: &str) -> String {
    let store = config.store().0;
    if !store.exists() {
        return format!("not logged in: run `portcullis login {server}`");
    }
    match crate::store::Store::open(&store).and_then(|s| s.upstream_account(server, "")) {
        Ok(Some(a)) if a.state == "needs_login" => format!("needs login: run `portcullis login {server}`"),
        Ok(Some(a)) => format!("logged in at {}", config::shown_url(&a.issuer)),
        Ok(None) => format!("not logged in: run `portcullis login {server}`"),
        Err(e) => format!("unknown ({e})"),
    }
}

/// `portcullis login SERVER`; the exit code.
pub fn login(config: Option<PathBuf>, server: &str, no_browser: bool, timeout: &str) -> i32 {
    let run = || -> anyhow::Result<String> {
        let config = load_config(config)?;
        let timeout = crate::store::parse_span(timeout).map_err(anyhow::Error::msg)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let opts = crate::oauth::login::LoginOptions { open_browser: !no_browser, timeout };
        Ok(rt.block_on(crate::oauth::login::login(&config, server, opts))?)
    };
    match run() {
        Ok(done) => {
            println!("{done}");
            0
        }
        Err(e) => {
            eprintln!("portcullis login: {e:#}");
            1
        }
    }
}

/// `portcullis logout SERVER`; the exit code.
pub fn logout(config: Option<PathBuf>, server: &str) -> i32 {
    let run = || -> anyhow::Result<bool> {
        let config = load_config(config)?;
        if config.server(server).is_none() {
            anyhow::bail!("no server {server:?}");
        }
        Ok(crate::store::Store::open(&config.store().0)?.upstream_forget(server, "")?)
    };
    match run() {
        Ok(true) => {
            println!("logged out of {server}");
            0
        }
        Ok(false) => {
            println!("{server} had no account signed in");
            0
        }
        Err(e) => {
            eprintln!("portcullis logout: {e:#}");
            1
        }
    }
}

pub fn load_config(path: Option<PathBuf>) -> anyhow::Result<Config> {
    match path.or_else(config::default_path) {
        Some(p) => Ok(config::load(&p)?),
        None => {
            let exe = std::env::current_exe().context("cannot find the portcullis executable")?;
            Ok(config::demo(&exe)?)
        }
    }
}

/// Runs `check`; returns the process exit code.
pub fn check(path: Option<PathBuf>) -> i32 {
    let Some(path) = path.or_else(config::default_path) else {
        eprintln!("no config file: pass --config FILE (looked for ./portcullis.yaml and ./portcullis.json)");
        return 2;
    };
    match config::load(&path) {
        Ok(c) => {
            for w in &c.warnings {
                let at = w.line.map_or_else(|| path.display().to_string(), |l| format!("{}:{l}", path.display()));
                eprintln!("{at}: warning: {}: {}", w.path, w.message);
            }
            println!("{}: ok, {} server(s), listen {}", path.display(), c.servers.len(), c.listen);
            if let Some(u) = &c.public_url {
                println!("  public URL {}", config::shown_url(u));
            }
            if c.name != config::DEFAULT_NAME {
                println!("  name {:?}", c.name);
            }
            for s in &c.servers {
                let what = match &s.transport {
                    Transport::Stdio { command, args, .. } => format!("stdio: {command} {}", args.join(" ")),
                    Transport::Http { url, mode, tls, oauth, .. } => {
                        let tls = tls.as_ref().map_or(String::new(), |t| format!(" ({})", t.summary()));
                        let oauth = match oauth.as_ref().map(|g| g.flow.clone()) {
                            None => String::new(),
                            Some(crate::oauth::client::Flow::ClientCredentials) => {
                                " (its own access token: client credentials)".into()
                            }
                            Some(crate::oauth::client::Flow::AuthorizationCode { .. }) if s.per_user => {
                                " (each user's own account, linked from a client)".into()
                            }
                            Some(crate::oauth::client::Flow::AuthorizationCode { .. }) => {
                                format!(" (a person's account: {})", login_state(&c, &s.name))
                            }
                            Some(crate::oauth::client::Flow::TokenExchange { .. }) => {
                                " (the caller's token exchanged for one of its own: RFC 8693)".into()
                            }
                        };
                        format!("{} {}{tls}{oauth}", format!("{mode:?}").to_lowercase(), config::shown_url(url))
                    }
                };
                let state = if s.enabled { "" } else { " (disabled)" };
                println!("  {}: {}{state}", s.name, what.trim_end());
            }
            0
        }
        Err(e) => {
            eprintln!("{e}");
            1
        }
    }
}

/// `portcullis token …`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Issue a token; its secret is shown once.
    Create {
        /// Name (unique per tenant among live tokens).
        #[arg(long)]
        name: String,
        /// Tenant (configured in `tenants`).
        #[arg(long)]
        tenant: Option<String>,
        /// Servers it may reach, comma-separated (default: all).
        #[arg(long, value_delimiter = ',')]
        servers: Vec<String>,
        /// Tool globs, comma-separated (`!` denies).
        #[arg(long, value_delimiter = ',')]
        tools: Vec<String>,
        /// Prompt globs, comma-separated.
        #[arg(long, value_delimiter = ',')]
        prompts: Vec<String>,
        /// Resource globs, comma-separated.
        #[arg(long, value_delimiter = ',')]
        resources: Vec<String>,
        /// `user` (default), `admin`, or `metrics` (reads /metrics and /stats only).
        #[arg(long)]
        role: Option<String>,
        /// Time to live: `30d`, `12h`, or `never` (default 90d).
        #[arg(long)]
        ttl: Option<String>,
        /// Rate limit, e.g. `100/min`.
        #[arg(long)]
        rate: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Test hook: create this many tokens named NAME-1…NAME-N.
        #[arg(long, hide = true)]
        repeat: Option<usize>,
    },
    /// List tokens (never a secret).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Give a token a new secret; the old one keeps working for the grace period.
    Rotate {
        /// The token's name or id.
        token: String,
        /// The tenant, when the name is ambiguous.
        #[arg(long)]
        tenant: Option<String>,
        /// How long the old secret keeps working.
        #[arg(long, default_value = "24h")]
        grace: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token (a running gateway refuses it within a second).
    Revoke {
        /// The token's name or id.
        token: String,
        /// The tenant, when the name is ambiguous.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// List the consents people gave OAuth clients of the authorization server.
    Consents {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Withdraw a consent: its client's tokens from that person's sign-ins are revoked, and the
    /// person is asked again next time.
    Withdraw {
        /// The consent's id (`con_…`).
        consent: String,
    },
}

/// Runs a `token` command; the exit code.
pub fn token(config: Option<PathBuf>, action: TokenCommand) -> i32 {
    match run_token(config, action) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("portcullis token: {e:#}");
            1
        }
    }
}

fn fmt_time(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), |m| humantime::format_rfc3339_seconds(crate::store::to_system_time(m)).to_string())
}

fn run_token(config: Option<PathBuf>, action: TokenCommand) -> anyhow::Result<()> {
    use crate::store::{Store, TokenRequest, now_ms, printable};
    let config = match config.or_else(config::default_path) {
        Some(p) => config::load_lenient(&p)?,
        None => load_config(None)?,
    };
    let (path, named) = config.store();
    let whence = match (&config.source, named) {
        (Some(src), true) => format!("named in {}", src.display()),
        (Some(src), false) => format!("the default beside {}", src.display()),
        (None, _) => "no config file: the default in the working directory".into(),
    };
    eprintln!("token store: {path} ({whence})");
    let store = Store::open(&path)?;
    let show = |t: &crate::store::StoredToken, secret: Option<&str>, json: bool| {
        if json {
            let mut v = serde_json::to_value(t).unwrap_or_default();
            v["state"] = serde_json::to_value(t.state(now_ms())).unwrap_or_default();
            if let Some(s) = secret {
                v["secret"] = serde_json::Value::String(s.to_owned());
            }
            println!("{}", crate::store::printable_json(&v.to_string()));
        } else {
            println!("{} {} ({})", t.id, printable(&t.name), t.prefix);
            if let Some(s) = secret {
                println!("secret (shown once): {s}");
            }
        }
    };
    match action {
        TokenCommand::Create { name, tenant, servers, tools, prompts, resources, role, ttl, rate, json, repeat } => {
            let mut req =
                TokenRequest { name: name.clone(), tenant, servers, tools, prompts, resources, role, ttl, rate };
            let new = req.validate(&config)?;
            match repeat {
                None => {
                    let (t, secret) = store.create(&new, now_ms())?;
                    show(&t, Some(&secret), json);
                }
                Some(n) => {
                    for i in 1..=n {
                        req.name = format!("{name}-{i}");
                        let mut one = new.clone();
                        one.name = req.name.clone();
                        let (t, secret) = store.create(&one, now_ms())?;
                        show(&t, Some(&secret), json);
                    }
                }
            }
        }
        TokenCommand::List { json } => {
            let tokens = store.list()?;
            if json {
                for t in &tokens {
                    show(t, None, true);
                }
            } else {
                print_token_table(&tokens);
            }
        }
        TokenCommand::Rotate { token, tenant, grace, json } => {
            let grace = crate::store::parse_span(&grace).map_err(anyhow::Error::msg)?;
            let (t, secret) = store.rotate_ref(&token, tenant.as_deref(), grace, now_ms())?;
            show(&t, Some(&secret), json);
        }
        TokenCommand::Revoke { token, tenant } => {
            let t = store.revoke_ref(&token, tenant.as_deref(), now_ms())?;
            println!("revoked {} {}", t.id, printable(&t.name));
        }
        TokenCommand::Consents { json } => {
            for c in store.oauth_consents()? {
                if json {
                    println!("{}", crate::store::printable_json(&serde_json::to_string(&c).unwrap_or_default()));
                } else {
                    println!(
                        "{}  {} gave {} ({}) access to {}  since {}",
                        c.id,
                        printable(&c.name),
                        printable(&c.client_name),
                        printable(&c.client_id),
                        printable(&c.resource),
                        fmt_time(Some(c.created_at))
                    );
                }
            }
        }
        TokenCommand::Withdraw { consent } => {
            let c = store.oauth_withdraw(&consent, None, now_ms())?;
            println!(
                "withdrew {} ({} for {}); its tokens are revoked",
                c.id,
                printable(&c.name),
                printable(&c.client_name)
            );
        }
    }
    Ok(())
}

/// `token list` as a table.
fn print_token_table(tokens: &[crate::store::StoredToken]) {
    use crate::store::{now_ms, printable};
    let now = now_ms();
    println!(
        "{:<20} {:<10} {:<10} {:<28} {:<20} {:<20} {:<20} state",
        "name", "tenant", "prefix", "grants", "created", "expires", "last used"
    );
    for t in tokens {
        let g = &t.grants;
        let grants = format!(
            "servers={} tools={}",
            if g.servers.is_empty() { "*".into() } else { g.servers.join(",") },
            if g.tools.is_empty() { "*".into() } else { g.tools.join(",") }
        );
        let grants = printable(&grants);
        let state =
            serde_json::to_value(t.state(now)).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        println!(
            "{:<20} {:<10} {:<10} {:<28} {:<20} {:<20} {:<20} {state}",
            printable(&t.name),
            if t.tenant.is_empty() { "-".into() } else { printable(&t.tenant) },
            t.prefix,
            grants,
            fmt_time(Some(t.created_at)),
            fmt_time(t.ends_at()),
            fmt_time(t.last_used_at)
        );
    }
}

/// Sets up logging on stderr (stdout may carry protocol).
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(false).try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// How `serve` treats credentials.
#[derive(Debug, Clone, Default)]
pub struct ServeOptions {
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--test-panic-after`.
    pub panic_after: Option<String>,
    /// `--generate-token`.
    pub generate_token: bool,
    /// `--allow-unauthenticated`.
    pub allow_unauthenticated: bool,
}

/// A new random token: `pcs_` and 43 characters of base64url from 32 bytes of OS randomness.
pub(crate) fn new_token() -> anyhow::Result<String> {
    Ok(crate::store::new_secret()?)
}

/// Adds the `--generate-token` token and enforces the no-credentials rule, which counts the
/// store's issued tokens as credentials. Returns the startup line saying how requests are
/// authenticated (sources and counts, never a value).
pub fn startup_check(
    config: &mut Config,
    opts: &ServeOptions,
    store: &crate::store::StoreView,
) -> anyhow::Result<String> {
    if opts.generate_token && config.auth.static_off {
        anyhow::bail!("--generate-token makes a static token, and auth.static_tokens is false");
    }
    if opts.generate_token {
        let token = new_token()?;
        // Straight to stderr, once: never through the log, which may be kept.
        eprintln!("portcullis: token for this run (shown once): {token}");
        config.auth.tokens.push(crate::credentials::TokenDef {
            name: crate::config::auth::GENERATED_NAME.into(),
            digest: crate::credentials::digest(&token),
            role: crate::credentials::Role::Admin,
            tenant: None,
            grants: crate::authz::Grants::all(),
            expires: None,
            rate: None,
            source: crate::credentials::TokenSource::Generated,
        });
    }
    let store_has_tokens = store.state() == crate::store::StoreState::HasTokens;
    let open = config.auth.is_open() && !store_has_tokens;
    if open && !config.listen.ip().is_loopback() {
        if !opts.allow_unauthenticated {
            anyhow::bail!(
                "refusing to serve {} without credentials: set PORTCULLIS_TOKEN, add auth.tokens, use \
                 --generate-token, issue a token (portcullis token create), or pass --allow-unauthenticated",
                config.listen
            );
        }
        tracing::warn!(listen = %config.listen, "serving WITHOUT authentication on a non-loopback address (--allow-unauthenticated)");
    }
    Ok(auth_summary(config, store, open))
}

/// One line: how requests are authenticated, by source and count.
fn auth_summary(config: &Config, store: &crate::store::StoreView, open: bool) -> String {
    use crate::credentials::TokenSource;
    if open {
        return "authentication: OFF (no credential configured; every caller is the anonymous admin)".into();
    }
    let count = |s: TokenSource| config.auth.tokens.iter().filter(|t| t.source == s).count();
    let mut parts = Vec::new();
    for (source, what) in [
        (TokenSource::Env, "from PORTCULLIS_TOKEN(S)"),
        (TokenSource::File, "from the config file"),
        (TokenSource::Generated, "generated for this run"),
    ] {
        let n = count(source);
        if n > 0 {
            parts.push(format!("{n} token{} {what}", if n == 1 { "" } else { "s" }));
        }
    }
    if config.auth.static_off {
        parts.push("static tokens off".into());
    }
    match store.live_count() {
        _ if config.auth.issued_off => parts.push("issued tokens off".into()),
        Ok(n) => parts.push(format!("{n} live issued token{} in {}", if n == 1 { "" } else { "s" }, store.location())),
        Err(e) => parts.push(format!("issued tokens in {} (unreadable: {e})", store.location())),
    }
    if config.tls.as_ref().is_some_and(|t| t.client_ca.is_some()) {
        parts.push("client certificates".into());
    }
    for i in &config.auth.oauth.issuers {
        parts.push(format!("access tokens from {}", i.issuer));
    }
    format!("authentication: ON: {}", parts.join(", "))
}

/// What identifies the content of a config file as the editor left it: the file it resolves
/// to (symlinks followed), its inode and its modification time and size. Rename-on-save and
/// symlink swaps change the inode; in-place writes change the time or size.
fn file_identity(path: &std::path::Path) -> Option<(std::path::PathBuf, u64, u64, std::time::SystemTime)> {
    use std::os::unix::fs::MetadataExt;
    let resolved = std::fs::canonicalize(path).ok()?;
    let meta = std::fs::metadata(&resolved).ok()?;
    Some((resolved, meta.ino(), meta.len(), meta.modified().ok()?))
}

/// Watches the config file, and the catalog it names, and reloads when either changes
/// (checked twice a second).
fn watch_config(gateway: std::sync::Arc<crate::mcp::gateway::Gateway>, path: std::path::PathBuf) {
    let weak = std::sync::Arc::downgrade(&gateway);
    let identities = move |gw: &crate::mcp::gateway::Gateway| {
        let catalog = gw.config().catalog.clone();
        [Some(path.clone()), catalog].into_iter().flatten().map(|p| file_identity(&p)).collect::<Vec<_>>()
    };
    tokio::spawn(async move {
        let mut last = identities(&gateway);
        drop(gateway);
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        loop {
            tick.tick().await;
            let Some(gw) = weak.upgrade() else { return };
            let now = identities(&gw);
            if now.iter().any(Option::is_none) || now == last {
                continue; // mid-save (a file is briefly gone) or unchanged
            }
            tracing::info!("config file changed: reloading");
            let _ = gw.reload_from_source().await;
            last = identities(&gw);
        }
    });
}

/// Runs the gateway until SIGTERM/SIGINT; SIGHUP reloads the config file.
pub async fn serve(mut config: Config, opts: ServeOptions) -> anyhow::Result<()> {
    if let Some(l) = opts.listen {
        config.listen = l;
    }
    let (store_path, named) = config.store();
    // A store that exists but cannot be read never means "no credentials": refuse to start.
    let store = crate::store::StoreView::open(store_path.clone(), named)
        .with_context(|| format!("refusing to start: cannot use the token store {store_path}"))?;
    let auth_line = startup_check(&mut config, &opts, &store)?;
    let panic_after = opts.panic_after.clone();
    for w in &config.warnings {
        tracing::warn!(field = %w.path, line = w.line, "config: {}", w.message);
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    match &config.source {
        Some(p) => tracing::info!(config = %p.display(), servers = config.servers.len(), "config loaded"),
        None => tracing::info!("no config file; running the built-in demo configuration"),
    }
    let source = config.source.clone();
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    tracing::info!("{auth_line}");
    match config.audit_target() {
        Some(p) => tracing::info!("audit records: {}", p.display()),
        None => tracing::info!("audit records: stderr"),
    }
    let gateway = crate::mcp::gateway::Gateway::start_with(config, store).context("refusing to start")?;
    let running = crate::server::serve(listener, gateway.clone()).await?;
    tracing::info!("listening on {scheme}://{addr}/mcp");
    service_manager(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("listening on {scheme}://{addr}/mcp")),
    ]);
    let trigger = running.trigger();
    let panic_delay = panic_after.map(|d| config::parse_duration(&d)).transpose().map_err(anyhow::Error::msg)?;
    if let Some(path) = source.clone() {
        watch_config(gateway.clone(), path);
    }
    let reloads = reload_on_hangup(&gateway, source);
    let drain = gateway.config().limits.drain_period;
    tokio::select! {
        how = crate::server::termination() => {
            if how == crate::server::Termination::Term && !drain.is_zero() {
                // A load balancer sees `/health` go 503 and moves away while requests are still
                // served; a second signal ends the wait.
                gateway.start_draining();
                tracing::info!(drain = %humantime::format_duration(drain), "SIGTERM: draining (health answers 503), then shutting down");
                tokio::select! {
                    _ = tokio::time::sleep(drain) => {}
                    _ = crate::server::termination() => {}
                }
            }
            tracing::info!("shutting down");
            service_manager(&[sd_notify::NotifyState::Stopping]);
        }
        _ = reloads => {}
        _ = async {
            match panic_delay {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        } => panic!("test hook: --test-panic-after elapsed"),
    }
    trigger.cancel();
    running.wait().await;
    gateway.audit().sync();
    // Anything still registered (a child that ignored every signal) goes now.
    crate::mcp::upstream::stdio::kill_all();
    Ok(())
}

/// Reloads the config file on every SIGHUP (forever; never, without a file).
async fn reload_on_hangup(gateway: &crate::mcp::gateway::Gateway, source: Option<std::path::PathBuf>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Some(path), Ok(mut hup)) = (source, signal(SignalKind::hangup())) else {
        return std::future::pending::<()>().await;
    };
    while hup.recv().await.is_some() {
        tracing::info!(config = %path.display(), "SIGHUP: reloading");
        // A bad file changes nothing: the running config stays (the errors are logged).
        let _ = gateway.reload_from_source().await;
    }
}

/// Tells the service manager (systemd's `Type=notify`, through `NOTIFY_SOCKET`; nothing when it
/// is unset) that the gateway is ready and where it listens, or that it is stopping.
fn service_manager(state: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Runs `portcullis stdio` until stdin closes.
pub async fn stdio(config: Config, server: Option<String>, as_identity: Option<String>) -> anyhow::Result<()> {
    use crate::mcp::session::Scope;
    if let Some(s) = &server
        && config.server(s).is_none_or(|d| !d.enabled)
    {
        anyhow::bail!("no enabled server named {s:?} in the config");
    }
    let gateway = crate::mcp::gateway::Gateway::start(config)?;
    let identity = match as_identity {
        Some(name) => gateway
            .authenticator()
            .current(&name)
            .with_context(|| format!("--as {name:?}: no token of that name in the config"))?,
        None => crate::auth::Identity::anonymous(),
    };
    if identity.role == crate::credentials::Role::Metrics {
        anyhow::bail!("--as: a metrics credential may only read /metrics and /stats, not speak MCP");
    }
    let scope = server.map_or(Scope::All, Scope::One);
    crate::mcp::downstream::stdio::serve(gateway.clone(), scope, identity).await?;
    gateway.audit().sync();
    crate::mcp::upstream::stdio::kill_all();
    Ok(())
}
