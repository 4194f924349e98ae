//! Configuration: the file format (raw serde types, documented field by field), and its
//! validation into the runtime [`Config`].
//!
//! Invariants: a file is validated whole, into an immutable `Config` that is swapped in
//! atomically (never edited in place); every problem is reported at once, each with the path of
//! the field (`servers.github.url`) and its line where known; unknown keys in Portcullis' own
//! schema are errors, unknown keys in entries written for other clients (`mcpServers`, VS Code's
//! `mcp.json`) are warnings.

pub mod auth;
pub mod env;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_saphyr::Spanned;

pub use env::Env;

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The default separator between a server's name and a tool or prompt name.
pub const DEFAULT_SEPARATOR: &str = "__";
/// The default per-request deadline for an upstream call.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The default idle timeout of an upstream SSE stream.
pub const DEFAULT_SSE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The default request body limit.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Paths a server name may not take, because they are the gateway's own.
pub const RESERVED_NAMES: &[&str] =
    &["mcp", "sse", "messages", "servers", "health", "rpc", "stats", "metrics", "admin", ".well-known"];

type S = Spanned<String>;

/// The top level of a Portcullis config file (YAML or JSON).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address and port to listen on, e.g. `127.0.0.1:8080` (the default). `--listen` overrides it.
    #[serde(default)]
    pub listen: Option<S>,
    /// Synonym of `listen`, as Open MCP Gateway spells it.
    #[serde(default)]
    pub listen_addr: Option<S>,
    /// What joins a server's name to a tool or prompt name in the aggregated view: `files__read`
    /// with the default `__`. Server names may not contain it.
    #[serde(default)]
    pub separator: Option<S>,
    /// Origins (`scheme://host[:port]`) allowed in the `Origin` header of browser requests. A
    /// request with any other `Origin` gets 403. Default: only the listen address' own origin.
    #[serde(default)]
    pub allowed_origins: Vec<S>,
    /// Host names (with or without port) allowed in the `Host` header. When empty and the
    /// listener is on loopback, only `localhost`, `127.0.0.1` and `[::1]` are allowed (DNS
    /// rebinding protection); when empty on another address, any host is allowed.
    #[serde(default)]
    pub allowed_hosts: Vec<S>,
    /// The largest request body accepted, in bytes (default 4 MiB). Larger bodies get 413.
    #[serde(default)]
    pub max_body_bytes: Option<usize>,
    /// The MCP servers to front, by name (`[a-z0-9_-]+`).
    #[serde(default)]
    pub servers: BTreeMap<String, Spanned<RawServer>>,
    /// Claude Desktop / Claude Code / Cursor style server map; entries as in those files.
    #[serde(default, rename = "mcpServers")]
    pub mcp_servers: BTreeMap<String, Spanned<RawServer>>,
    /// VS Code `mcp.json` prompt inputs. Portcullis cannot prompt: referencing one is an error.
    #[serde(default)]
    pub inputs: Option<serde::de::IgnoredAny>,
    /// Authentication: named tokens and their grants (see `docs/authentication.md`).
    #[serde(default)]
    pub auth: Option<auth::RawAuth>,
    /// MCP Front's `proxy` block; its `auth` is read as `auth`.
    #[serde(default)]
    pub proxy: Option<auth::RawProxy>,
    /// Open MCP Gateway's single key: one admin token for everything.
    #[serde(default)]
    pub api_key: Option<S>,
    /// Tenants: `acme: {namespaces: {prod: [files, db]}}`. A tenant's tokens see only its
    /// namespaces' servers.
    #[serde(default)]
    pub tenants: BTreeMap<String, auth::RawTenant>,
    /// Request rates per identity and per client address.
    #[serde(default)]
    pub rate_limit: Option<auth::RawRateLimit>,
    /// Proxies (CIDRs or addresses) whose `X-Forwarded-For` names the client.
    #[serde(default)]
    pub trusted_proxies: Vec<S>,
    /// Where audit records go (one JSON line per request).
    #[serde(default)]
    pub audit: Option<RawAudit>,
    /// TLS on the listener: `{cert, key, client_ca}` (PEM files).
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Refuse plain-HTTP requests (400 `https_required`) unless a proxy in `trusted_proxies`
    /// says `X-Forwarded-Proto: https`.
    #[serde(default)]
    pub require_https: Option<bool>,
    /// The token store: `{path}` (default `portcullis.db` beside the config file).
    #[serde(default)]
    pub store: Option<RawStore>,
    /// Bounds on what one client can hold open: connections, sessions, streams, calls.
    #[serde(default)]
    pub limits: Option<RawLimits>,
}

/// `limits:` (every field optional; the defaults suit real clients).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// How long a client may take to send a request's headers, from its first byte (default
    /// `5s`). A slower client's connection is closed.
    #[serde(default)]
    pub header_read_timeout: Option<Spanned<DurationValue>>,
    /// How long a connection may stay open with no request in flight (default `75s`). A
    /// streaming response is a request in flight: SSE streams are never cut by this.
    #[serde(default)]
    pub keep_alive_timeout: Option<Spanned<DurationValue>>,
    /// How long a request body may take to arrive in full (default `30s`); then 408.
    #[serde(default)]
    pub body_read_timeout: Option<Spanned<DurationValue>>,
    /// Connections open at once (default 20,000); past it new ones are closed at once.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// How long a session-era session may go unused (no request, no open stream, no call in
    /// flight) before it ends (default `30m`); its next request gets 404 and the client
    /// starts a new session, as the protocol has it.
    #[serde(default)]
    pub session_idle_timeout: Option<Spanned<DurationValue>>,
    /// Sessions open at once, all identities together (default 20,000); past it 503.
    #[serde(default)]
    pub max_sessions: Option<usize>,
    /// Sessions one identity may hold open (default 1,000); past it 429.
    #[serde(default)]
    pub max_sessions_per_identity: Option<usize>,
    /// Legacy SSE streams (`GET /sse`) one identity may hold open (default 100); past it 429.
    #[serde(default)]
    pub max_sse_streams_per_identity: Option<usize>,
    /// Calls in flight on one session (default 128); past it the call gets a JSON-RPC error.
    #[serde(default)]
    pub max_calls_per_session: Option<usize>,
}

/// The validated `limits`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// See [`RawLimits::header_read_timeout`].
    pub header_read_timeout: Duration,
    /// See [`RawLimits::keep_alive_timeout`].
    pub keep_alive_timeout: Duration,
    /// See [`RawLimits::body_read_timeout`].
    pub body_read_timeout: Duration,
    /// See [`RawLimits::max_connections`].
    pub max_connections: usize,
    /// See [`RawLimits::session_idle_timeout`].
    pub session_idle_timeout: Duration,
    /// See [`RawLimits::max_sessions`].
    pub max_sessions: usize,
    /// See [`RawLimits::max_sessions_per_identity`].
    pub max_sessions_per_identity: usize,
    /// See [`RawLimits::max_sse_streams_per_identity`].
    pub max_sse_streams_per_identity: usize,
    /// See [`RawLimits::max_calls_per_session`].
    pub max_calls_per_session: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            keep_alive_timeout: Duration::from_secs(75),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 20_000,
            session_idle_timeout: Duration::from_secs(30 * 60),
            max_sessions: 20_000,
            max_sessions_per_identity: 1_000,
            max_sse_streams_per_identity: 100,
            max_calls_per_session: 128,
        }
    }
}

/// `store:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// The SQLite file for issued tokens (created on first use).
    pub path: S,
}

/// `tls:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain for the listener (reloaded when the file changes).
    pub cert: S,
    /// PEM private key (reloaded when the file changes).
    pub key: S,
    /// PEM CA certificates for client certificates; a verified client certificate whose
    /// subject common name is a configured token name authenticates as that identity.
    #[serde(default)]
    pub client_ca: Option<S>,
}

/// `audit:`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// Append records to this file instead of stderr.
    #[serde(default)]
    pub file: Option<S>,
}

/// One upstream MCP server: a local command (stdio) or a remote URL.
///
/// Keys from other clients' formats are accepted too (`type`, `disabled`, `authTokens`).
#[derive(Debug, Default, Deserialize)]
pub struct RawServer {
    /// The program to run for a stdio server (looked up on `PATH`).
    #[serde(default)]
    pub command: Option<S>,
    /// Arguments to the command.
    #[serde(default)]
    pub args: Vec<S>,
    /// Environment variables for the command. The child gets only these and a minimal base
    /// (`HOME`, `LOGNAME`, `PATH`, `SHELL`, `TERM`, `USER`, the locale, `TMPDIR`, `TZ`), never
    /// Portcullis' whole environment; `PORTCULLIS_*` names are refused here.
    #[serde(default)]
    pub env: BTreeMap<String, S>,
    /// More of Portcullis' own environment for the command: `true` (all of it) or a list of
    /// names. `PORTCULLIS_*` variables are never passed, whatever this says.
    #[serde(default)]
    pub inherit_env: Option<InheritEnvValue>,
    /// Working directory for the command (default: Portcullis' own).
    #[serde(default)]
    pub cwd: Option<S>,
    /// The MCP endpoint of a remote server, `http://` or `https://`.
    #[serde(default)]
    pub url: Option<S>,
    /// How to talk to `url`: `streamable_http`, `sse` (the 2024-11-05 HTTP+SSE transport) or
    /// `auto` (the default: try streamable HTTP, fall back to SSE).
    #[serde(default)]
    pub transport: Option<S>,
    /// Synonym of the transport, as other clients write it: `stdio`, `http`
    /// (`streamable-http`, `streamableHttp`) or `sse`.
    #[serde(default, rename = "type")]
    pub kind: Option<S>,
    /// HTTP headers sent with every request to `url` (e.g. an upstream API key). Never the
    /// client's own credentials: those are not forwarded.
    #[serde(default)]
    pub headers: BTreeMap<String, S>,
    /// Deadline for one request to this server, e.g. `30s` or `5m` (default `5m`); a number
    /// is milliseconds, as Claude's format has it. Progress notifications do not extend it.
    #[serde(default)]
    pub timeout: Option<Spanned<DurationValue>>,
    /// How long an upstream SSE stream may stay silent before it is dropped (default `5m`).
    #[serde(default)]
    pub sse_idle_timeout: Option<Spanned<DurationValue>>,
    /// Set to `false` to keep the entry but not run it.
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Claude's spelling of `enabled: false`.
    #[serde(default)]
    pub disabled: Option<bool>,
    /// `shared` (default): one process or connection serves every client session, with request
    /// ids and progress tokens rewritten. `per_session`: one per client session, for servers
    /// that keep per-client state or ask clients things (sampling, elicitation, roots).
    #[serde(default)]
    pub share: Option<S>,
    /// MCP Front: names of the tokens allowed to reach this server.
    #[serde(default, rename = "authTokens")]
    pub auth_tokens: Vec<S>,
}

/// `inherit_env:` as written: `true`/`false` or a list of variable names.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum InheritEnvValue {
    /// All (`true`) or only the base (`false`).
    All(bool),
    /// These names (on top of the base).
    Names(Vec<String>),
}

/// Which of Portcullis' own environment variables a stdio child gets, beyond its `env`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum InheritEnv {
    /// The base only ([`BASE_CHILD_ENV`]).
    #[default]
    Base,
    /// The base and these names.
    Names(Vec<String>),
    /// Everything (but `PORTCULLIS_*`).
    All,
}

/// What every stdio child gets from Portcullis' environment, as the official SDKs pass it, plus
/// what a process needs to run (locale, temporary directory, time zone). Names ending in `*`
/// are prefixes.
pub const BASE_CHILD_ENV: &[&str] =
    &["HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "LANGUAGE", "LC_*", "TMPDIR", "TZ"];

impl InheritEnv {
    /// Whether a variable of Portcullis' environment passes to the child.
    pub fn passes(&self, name: &str) -> bool {
        if name.starts_with("PORTCULLIS_") {
            return false;
        }
        let base =
            BASE_CHILD_ENV.iter().any(|b| b.strip_suffix('*').map_or(*b == name, |prefix| name.starts_with(prefix)));
        base || match self {
            InheritEnv::Base => false,
            InheritEnv::Names(names) => names.iter().any(|n| n == name),
            InheritEnv::All => true,
        }
    }
}

/// A duration written as text (`30s`, `5m`, `1h30m`) or as a number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationValue(pub Duration);

impl<'de> Deserialize<'de> for DurationValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = DurationValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as `30s` or `5m`, or a number of milliseconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<DurationValue, E> {
                Ok(DurationValue(Duration::from_millis(v)))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<DurationValue, E> {
                u64::try_from(v).map(|v| DurationValue(Duration::from_millis(v))).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<DurationValue, E> {
                parse_duration(v).map(DurationValue).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A URL as Portcullis shows it anywhere (errors, `check`, logs, the management API): scheme,
/// host, port and path only, so credentials in the user part or the query never appear. Works
/// on text that is not a valid URL too.
pub fn shown_url(url: &str) -> String {
    if let Ok(mut u) = reqwest::Url::parse(url)
        && u.has_host()
    {
        u.set_query(None);
        u.set_fragment(None);
        let _ = u.set_username("");
        let _ = u.set_password(None);
        return u.to_string();
    }
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let host = rest[..end].rsplit('@').next().unwrap_or("");
    let path = &rest[end..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    if scheme.is_empty() { format!("{host}{path}") } else { format!("{scheme}://{host}{path}") }
}

/// The longest duration Portcullis takes anywhere (a limit, a token's time to live, a
/// rotation's grace): 100 years. Longer is refused, never read as "never" or left to overflow.
pub const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Parses `30s`, `5m`, `1h30m`, `250ms`, `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// The keys a server entry may have in Portcullis' own schema.
const OWN_SERVER_KEYS: &[&str] = &[
    "command",
    "args",
    "env",
    "inherit_env",
    "cwd",
    "url",
    "transport",
    "type",
    "headers",
    "timeout",
    "sse_idle_timeout",
    "enabled",
    "disabled",
    "share",
    "authTokens",
];

#[derive(Deserialize, Default)]
struct KeysOnly {
    #[serde(default)]
    servers: BTreeMap<String, BTreeMap<String, serde::de::IgnoredAny>>,
    #[serde(default, rename = "mcpServers")]
    mcp_servers: BTreeMap<String, BTreeMap<String, serde::de::IgnoredAny>>,
}

/// How a server is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// A child process speaking newline-delimited JSON-RPC on stdin/stdout.
    Stdio {
        /// The program.
        command: String,
        /// Its arguments.
        args: Vec<String>,
        /// Its own environment variables (from `env`).
        env: BTreeMap<String, String>,
        /// What it gets of Portcullis' environment.
        inherit_env: InheritEnv,
        /// Working directory.
        cwd: Option<PathBuf>,
    },
    /// A remote server over HTTP.
    Http {
        /// The endpoint URL.
        url: String,
        /// Which HTTP transport.
        mode: HttpMode,
        /// Static headers sent upstream.
        headers: Vec<(String, String)>,
    },
}

/// The HTTP transport of a remote server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpMode {
    /// Streamable HTTP (2025-03-26 and later, both eras).
    Streamable,
    /// HTTP+SSE (2024-11-05).
    Sse,
    /// Streamable HTTP, falling back to SSE when the server does not speak it.
    Auto,
}

/// Whether clients share one upstream process/connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// One for all sessions (request ids and progress tokens rewritten).
    Shared,
    /// One per downstream session.
    PerSession,
}

/// One validated server definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerDef {
    /// The server's name.
    pub name: String,
    /// How to reach it.
    pub transport: Transport,
    /// Per-request deadline.
    pub timeout: Duration,
    /// Idle timeout of upstream SSE streams.
    pub sse_idle_timeout: Duration,
    /// Whether it runs.
    pub enabled: bool,
    /// Sharing mode.
    pub share: Share,
    /// MCP Front token names allowed to reach it (empty: no restriction from this list).
    pub auth_tokens: Vec<String>,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Name separator.
    pub separator: String,
    /// Allowed `Origin` values (normalised, lowercase).
    pub allowed_origins: Vec<String>,
    /// Allowed `Host` values (lowercase).
    pub allowed_hosts: Vec<String>,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Servers, in name order.
    pub servers: Vec<Arc<ServerDef>>,
    /// Credentials, grants, tenants and limits.
    pub auth: crate::auth::AuthConfig,
    /// The audit file (None: stderr).
    pub audit_file: Option<PathBuf>,
    /// TLS on the listener.
    pub tls: Option<crate::tls::TlsSettings>,
    /// Refuse plain-HTTP requests not vouched for by a trusted proxy.
    pub require_https: bool,
    /// Bounds on connections, sessions, streams and calls.
    pub limits: Limits,
    /// The token store file named in the config (None: the default beside the config file).
    pub store_path: Option<PathBuf>,
    /// The file this came from (None for the built-in demo).
    pub source: Option<PathBuf>,
    /// Warnings found while loading (unknown keys in foreign entries).
    pub warnings: Vec<String>,
}

impl Config {
    /// The token store file and whether the config named it: the named path, else
    /// `portcullis.db` beside the config file (or in the working directory without one).
    pub fn store(&self) -> (PathBuf, bool) {
        match &self.store_path {
            Some(p) => {
                let p = match (&self.source, p.is_relative()) {
                    (Some(src), true) => src.parent().map_or_else(|| p.clone(), |d| d.join(p)),
                    _ => p.clone(),
                };
                (p, true)
            }
            None => {
                let dir = self.source.as_ref().and_then(|s| s.parent()).map(Path::to_path_buf).unwrap_or_default();
                (dir.join("portcullis.db"), false)
            }
        }
    }

    /// A server by name.
    pub fn server(&self, name: &str) -> Option<&Arc<ServerDef>> {
        self.servers.iter().find(|s| s.name == name)
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path of the field (empty for file-level errors).
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<u32>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.path.is_empty()) {
            (Some(l), false) => write!(f, "line {l}: {}: {}", self.path, self.message),
            (Some(l), true) => write!(f, "line {l}: {}", self.message),
            (None, false) => write!(f, "{}: {}", self.path, self.message),
            (None, true) => write!(f, "{}", self.message),
        }
    }
}

/// Every problem found in a config file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    /// The file, when there is one.
    pub file: Option<PathBuf>,
    /// The problems, in file order where known.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_deref().map(|p| p.display().to_string()).unwrap_or_else(|| "config".into());
        let n = self.errors.len();
        write!(f, "{file}: {n} error{}", if n == 1 { "" } else { "s" })?;
        for e in &self.errors {
            write!(f, "\n  {file}:{e}")?;
        }
        Ok(())
    }
}

/// Where to look when no `--config` is given: `./portcullis.yaml`, then `./portcullis.json`.
pub fn default_path() -> Option<PathBuf> {
    ["portcullis.yaml", "portcullis.yml", "portcullis.json"].iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: Some(path.to_owned()),
        errors: vec![ConfigError { path: String::new(), line: None, message: format!("cannot read: {e}") }],
    })?;
    let env = Env::load(path.parent());
    let mut config =
        parse(&text, is_json(path), &env).map_err(|errors| ConfigErrors { file: Some(path.to_owned()), errors })?;
    config.source = Some(path.to_owned());
    Ok(config)
}

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// The built-in configuration used when no file exists: the bundled demo server over stdio.
/// It is validated exactly as a file is, so the credential sources (`PORTCULLIS_TOKEN`,
/// `PORTCULLIS_TOKENS`, and `.env` in the working directory) apply to it as to a file.
pub fn demo(exe: &Path) -> Result<Config, ConfigErrors> {
    let command = serde_json::Value::String(exe.display().to_string());
    // `$` in the path is literal, not a variable reference.
    let command = command.to_string().replace('$', "$$");
    let text = format!("servers:\n  demo:\n    command: {command}\n    args: [demo-server]\n");
    parse(&text, false, &Env::load(Some(Path::new(".")))).map_err(|errors| ConfigErrors { file: None, errors })
}

fn line_of<T>(s: &Spanned<T>) -> Option<u32> {
    let l = s.referenced.line();
    (l > 0).then_some(l as u32)
}

/// Parses and validates config text; `json` selects strict JSON syntax.
pub fn parse(text: &str, json: bool, env: &Env) -> Result<Config, Vec<ConfigError>> {
    let err = |message: String, line: Option<u32>| vec![ConfigError { path: String::new(), line, message }];
    if json && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
        return Err(err(format!("invalid JSON: {e}"), Some(e.line() as u32)));
    }
    // JSON is YAML, so one parser (with line numbers) serves both once the JSON syntax is checked.
    let raw: RawConfig = if text.trim().is_empty() {
        RawConfig::default()
    } else {
        serde_saphyr::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line() as u32).filter(|l| *l > 0);
            err(first_line(&e.to_string()), line)
        })?
    };
    let keys: KeysOnly = serde_saphyr::from_str(text).unwrap_or_default();
    Validator { env, errors: Vec::new(), warnings: Vec::new() }.validate(raw, keys)
}

fn first_line(s: &str) -> String {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim().to_owned()
}

struct Validator<'a> {
    env: &'a Env,
    errors: Vec<ConfigError>,
    warnings: Vec<String>,
}

impl Validator<'_> {
    fn error(&mut self, path: impl Into<String>, line: Option<u32>, message: impl Into<String>) {
        self.errors.push(ConfigError { path: path.into(), line, message: message.into() });
    }

    fn subst(&mut self, path: &str, value: &S) -> String {
        match self.env.substitute(&value.value) {
            Ok(v) => v,
            Err(errs) => {
                for e in errs {
                    self.error(path, line_of(value), e.to_string());
                }
                String::new()
            }
        }
    }

    fn validate(mut self, raw: RawConfig, keys: KeysOnly) -> Result<Config, Vec<ConfigError>> {
        let listen_raw = raw.listen.as_ref().or(raw.listen_addr.as_ref());
        let listen = match listen_raw {
            Some(l) => {
                let path = if raw.listen.is_some() { "listen" } else { "listen_addr" };
                let text = self.subst(path, l);
                match text.parse::<SocketAddr>() {
                    Ok(a) => a,
                    Err(_) => {
                        if !text.is_empty() {
                            self.error(
                                path,
                                line_of(l),
                                format!("{text:?} is not an address:port such as 127.0.0.1:8080"),
                            );
                        }
                        SocketAddr::from(([127, 0, 0, 1], 8080))
                    }
                }
            }
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let separator = match &raw.separator {
            Some(s) => {
                let v = self.subst("separator", s);
                if v.is_empty() || v.chars().any(|c| c.is_whitespace()) {
                    self.error("separator", line_of(s), "must be non-empty and contain no whitespace");
                }
                v
            }
            None => DEFAULT_SEPARATOR.to_owned(),
        };
        let allowed_origins = raw
            .allowed_origins
            .iter()
            .enumerate()
            .map(|(i, o)| self.subst(&format!("allowed_origins[{i}]"), o).trim_end_matches('/').to_ascii_lowercase())
            .collect();
        let allowed_hosts = raw
            .allowed_hosts
            .iter()
            .enumerate()
            .map(|(i, h)| self.subst(&format!("allowed_hosts[{i}]"), h).to_ascii_lowercase())
            .collect();
        let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            self.error("max_body_bytes", None, "must be greater than 0");
        }

        // VS Code's mcp.json (it has `inputs`) is a foreign format too.
        let own_servers_foreign = raw.inputs.is_some();
        for (section, entries, foreign) in
            [("servers", &keys.servers, own_servers_foreign), ("mcpServers", &keys.mcp_servers, true)]
        {
            for (name, fields) in entries {
                for key in fields.keys().filter(|k| !OWN_SERVER_KEYS.contains(&k.as_str())) {
                    let path = format!("{section}.{name}.{key}");
                    if foreign {
                        self.warnings.push(format!("{path}: unknown key ignored"));
                    } else {
                        let line = raw.servers.get(name).and_then(line_of);
                        self.error(path, line, "unknown field (check the spelling)");
                    }
                }
            }
        }

        let mut servers = Vec::new();
        for (section, map) in [("servers", raw.servers), ("mcpServers", raw.mcp_servers)] {
            for (name, entry) in map {
                if let Some(def) = self.server(section, &name, &entry, &separator) {
                    if servers.iter().any(|s: &Arc<ServerDef>| s.name == def.name) {
                        self.error(format!("{section}.{name}"), line_of(&entry), "defined twice");
                    } else {
                        servers.push(Arc::new(def));
                    }
                }
            }
        }
        servers.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
        let auth = self.auth(
            auth::RawAuthParts {
                auth: raw.auth,
                proxy: raw.proxy,
                api_key: raw.api_key,
                tenants: raw.tenants,
                rate_limit: raw.rate_limit,
                trusted_proxies: raw.trusted_proxies,
            },
            &names,
        );
        for s in &servers {
            for t in s.auth_tokens.iter().filter(|t| !auth.tokens.iter().any(|d| d.name == **t)) {
                self.error(format!("servers.{}.authTokens", s.name), None, format!("unknown token name {t:?}"));
            }
        }
        let audit_file = raw.audit.and_then(|a| a.file).map(|f| PathBuf::from(self.subst("audit.file", &f)));
        let store_path = raw.store.map(|st| PathBuf::from(self.subst("store.path", &st.path)));
        let tls = raw.tls.map(|t| {
            let settings = crate::tls::TlsSettings {
                cert: PathBuf::from(self.subst("tls.cert", &t.cert)),
                key: PathBuf::from(self.subst("tls.key", &t.key)),
                client_ca: t.client_ca.as_ref().map(|c| PathBuf::from(self.subst("tls.client_ca", c))),
            };
            if let Err(e) = crate::tls::server_config(&settings) {
                self.error("tls", line_of(&t.cert), e);
            }
            settings
        });
        let limits = self.limits(raw.limits.as_ref());
        if !self.errors.is_empty() {
            self.errors.sort_by_key(|e| e.line.unwrap_or(u32::MAX));
            return Err(self.errors);
        }
        Ok(Config {
            listen,
            separator,
            allowed_origins,
            allowed_hosts,
            max_body_bytes,
            servers,
            auth,
            audit_file,
            tls,
            require_https: raw.require_https.unwrap_or(false),
            limits,
            store_path,
            source: None,
            warnings: self.warnings,
        })
    }

    fn limits(&mut self, raw: Option<&RawLimits>) -> Limits {
        let d = Limits::default();
        let Some(raw) = raw else { return d };
        let mut duration = |v: &Option<Spanned<DurationValue>>, name: &str, default: Duration| match v {
            None => default,
            Some(s) if s.value.0.is_zero() || s.value.0 > MAX_SPAN => {
                self.error(format!("limits.{name}"), line_of(s), "must be greater than 0 and at most 100 years");
                default
            }
            Some(s) => s.value.0,
        };
        let header_read_timeout = duration(&raw.header_read_timeout, "header_read_timeout", d.header_read_timeout);
        let keep_alive_timeout = duration(&raw.keep_alive_timeout, "keep_alive_timeout", d.keep_alive_timeout);
        let session_idle_timeout = duration(&raw.session_idle_timeout, "session_idle_timeout", d.session_idle_timeout);
        let body_read_timeout = duration(&raw.body_read_timeout, "body_read_timeout", d.body_read_timeout);
        let mut count = |v: Option<usize>, name: &str, default: usize| match v {
            Some(0) => {
                self.error(format!("limits.{name}"), None, "must be greater than 0");
                default
            }
            Some(n) => n,
            None => default,
        };
        Limits {
            header_read_timeout,
            keep_alive_timeout,
            body_read_timeout,
            session_idle_timeout,
            max_connections: count(raw.max_connections, "max_connections", d.max_connections),
            max_sessions: count(raw.max_sessions, "max_sessions", d.max_sessions),
            max_sessions_per_identity: count(
                raw.max_sessions_per_identity,
                "max_sessions_per_identity",
                d.max_sessions_per_identity,
            ),
            max_sse_streams_per_identity: count(
                raw.max_sse_streams_per_identity,
                "max_sse_streams_per_identity",
                d.max_sse_streams_per_identity,
            ),
            max_calls_per_session: count(raw.max_calls_per_session, "max_calls_per_session", d.max_calls_per_session),
        }
    }

    fn server(&mut self, section: &str, name: &str, entry: &Spanned<RawServer>, separator: &str) -> Option<ServerDef> {
        let base = format!("{section}.{name}");
        let line = line_of(entry);
        let before = self.errors.len();
        let s = &entry.value;
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            self.error(&base, line, "server names may use only a-z, 0-9, `_` and `-`");
        } else if name.contains(separator) {
            self.error(&base, line, format!("server names may not contain the separator {separator:?}"));
        } else if RESERVED_NAMES.contains(&name) {
            self.error(&base, line, format!("{name:?} is reserved for the gateway's own endpoints"));
        }
        let kind = s.kind.as_ref().map(|k| (k.value.to_ascii_lowercase(), line_of(k)));
        let transport_kw = s.transport.as_ref().map(|t| (t.value.to_ascii_lowercase(), line_of(t)));
        let transport = match (&s.command, &s.url) {
            (Some(_), Some(_)) => {
                self.error(&base, line, "give either `command` (stdio) or `url` (remote), not both");
                None
            }
            (None, None) => {
                self.error(&base, line, "needs `command` (stdio) or `url` (remote)");
                None
            }
            (Some(command), None) => {
                if let Some((k, l)) = &kind
                    && k != "stdio"
                {
                    self.error(format!("{base}.type"), *l, format!("{k:?} needs `url`, not `command`"));
                }
                if s.transport.is_some() || !s.headers.is_empty() {
                    self.error(&base, line, "`transport` and `headers` apply only to `url` servers");
                }
                let command = self.subst(&format!("{base}.command"), command);
                if command.trim().is_empty() && self.errors.len() == before {
                    self.error(format!("{base}.command"), line, "must not be empty");
                }
                let args =
                    s.args.iter().enumerate().map(|(i, a)| self.subst(&format!("{base}.args[{i}]"), a)).collect();
                let env = s.env.iter().map(|(k, v)| (k.clone(), self.subst(&format!("{base}.env.{k}"), v))).collect();
                for k in s.env.keys().filter(|k| k.starts_with("PORTCULLIS_")) {
                    self.error(format!("{base}.env.{k}"), line, "PORTCULLIS_* variables are never passed to a server");
                }
                let inherit_env = match &s.inherit_env {
                    None | Some(InheritEnvValue::All(false)) => InheritEnv::Base,
                    Some(InheritEnvValue::All(true)) => InheritEnv::All,
                    Some(InheritEnvValue::Names(names)) => {
                        for n in names.iter().filter(|n| n.starts_with("PORTCULLIS_")) {
                            self.error(
                                format!("{base}.inherit_env"),
                                line,
                                format!("{n}: PORTCULLIS_* variables are never passed to a server"),
                            );
                        }
                        InheritEnv::Names(names.clone())
                    }
                };
                let cwd = s.cwd.as_ref().map(|c| PathBuf::from(self.subst(&format!("{base}.cwd"), c)));
                Some(Transport::Stdio { command, args, env, inherit_env, cwd })
            }
            (None, Some(url_raw)) => {
                if !s.args.is_empty() || !s.env.is_empty() || s.cwd.is_some() || s.inherit_env.is_some() {
                    self.error(&base, line, "`args`, `env`, `inherit_env` and `cwd` apply only to `command` servers");
                }
                let url = self.subst(&format!("{base}.url"), url_raw);
                if !url.is_empty() {
                    match reqwest::Url::parse(&url) {
                        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                        _ => self.error(
                            format!("{base}.url"),
                            line_of(url_raw),
                            format!("{:?} is not an http(s) URL", shown_url(&url)),
                        ),
                    }
                }
                let from_kind = match &kind {
                    None => None,
                    Some((k, l)) => match k.as_str() {
                        "http" | "streamable-http" | "streamable_http" | "streamablehttp" => Some(HttpMode::Streamable),
                        "sse" => Some(HttpMode::Sse),
                        other => {
                            self.error(
                                format!("{base}.type"),
                                *l,
                                format!("unknown type {other:?} for a `url` server (http, sse)"),
                            );
                            None
                        }
                    },
                };
                let from_transport = match &transport_kw {
                    None => None,
                    Some((t, l)) => match t.as_str() {
                        "streamable_http" | "streamable-http" | "http" => Some(HttpMode::Streamable),
                        "sse" => Some(HttpMode::Sse),
                        "auto" => Some(HttpMode::Auto),
                        other => {
                            self.error(
                                format!("{base}.transport"),
                                *l,
                                format!("unknown transport {other:?} (streamable_http, sse, auto)"),
                            );
                            None
                        }
                    },
                };
                if let (Some(a), Some(b)) = (from_kind, from_transport)
                    && a != b
                {
                    self.error(&base, line, "`type` and `transport` disagree");
                }
                let mode = from_transport.or(from_kind).unwrap_or(HttpMode::Auto);
                let mut headers = Vec::new();
                for (k, v) in &s.headers {
                    let value = self.subst(&format!("{base}.headers.{k}"), v);
                    if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                        self.error(format!("{base}.headers.{k}"), line_of(v), "not a valid header name");
                    } else if reqwest::header::HeaderValue::from_str(&value).is_err() {
                        self.error(format!("{base}.headers.{k}"), line_of(v), "not a valid header value");
                    }
                    headers.push((k.clone(), value));
                }
                Some(Transport::Http { url, mode, headers })
            }
        };
        let timeout = s.timeout.as_ref().map_or(DEFAULT_TIMEOUT, |t| t.value.0);
        if timeout.is_zero() {
            self.error(format!("{base}.timeout"), s.timeout.as_ref().and_then(line_of), "must be greater than 0");
        }
        let sse_idle_timeout = s.sse_idle_timeout.as_ref().map_or(DEFAULT_SSE_IDLE_TIMEOUT, |t| t.value.0);
        let share = match &s.share {
            None => Share::Shared,
            Some(v) => match v.value.as_str() {
                "shared" => Share::Shared,
                "per_session" | "per-session" => Share::PerSession,
                other => {
                    self.error(
                        format!("{base}.share"),
                        line_of(v),
                        format!("unknown value {other:?} (shared, per_session)"),
                    );
                    Share::Shared
                }
            },
        };
        let enabled = s.enabled.unwrap_or(true) && !s.disabled.unwrap_or(false);
        let auth_tokens = s.auth_tokens.iter().map(|t| t.value.clone()).collect();
        if self.errors.len() > before {
            return None;
        }
        Some(ServerDef {
            name: name.to_owned(),
            transport: transport?,
            timeout,
            sse_idle_timeout,
            enabled,
            share,
            auth_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Env {
        Env::from_pairs([("TOKEN", "t0k"), ("HOST", "example.com")])
    }

    #[test]
    fn own_format() {
        let yaml = r#"
listen: 127.0.0.1:9000
servers:
  files:
    command: npx
    args: ["-y", "server-files", "${HOME:-/tmp}"]
    env: { KEY: "${TOKEN}" }
    timeout: 30s
    share: per_session
  remote:
    url: https://${HOST}/mcp
    headers: { Authorization: "Bearer ${TOKEN}" }
    transport: sse
"#;
        let c = parse(yaml, false, &env()).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.servers.len(), 2);
        let files = c.server("files").unwrap();
        assert_eq!(files.timeout, Duration::from_secs(30));
        assert_eq!(files.share, Share::PerSession);
        let Transport::Stdio { env, .. } = &files.transport else { panic!() };
        assert_eq!(env["KEY"], "t0k");
        let Transport::Http { url, mode, .. } = &c.server("remote").unwrap().transport else { panic!() };
        assert_eq!(url, "https://example.com/mcp");
        assert_eq!(*mode, HttpMode::Sse);
    }

    #[test]
    fn claude_and_vscode_formats() {
        let json = r#"{"mcpServers": {"fs": {"command": "x", "disabled": true, "timeout": 1500, "alwaysAllow": []}}}"#;
        let c = parse(json, true, &env()).unwrap();
        let fs = c.server("fs").unwrap();
        assert!(!fs.enabled);
        assert_eq!(fs.timeout, Duration::from_millis(1500));
        assert_eq!(c.warnings, vec!["mcpServers.fs.alwaysAllow: unknown key ignored".to_owned()]);

        let vscode =
            r#"{"inputs": [], "servers": {"gh": {"type": "http", "url": "https://${env:HOST}/x", "gallery": true}}}"#;
        let c = parse(vscode, true, &env()).unwrap();
        assert!(matches!(c.server("gh").unwrap().transport, Transport::Http { mode: HttpMode::Streamable, .. }));
        assert_eq!(c.warnings.len(), 1);

        let input = r#"{"inputs": [], "servers": {"gh": {"type": "http", "url": "https://x/${input:tok}"}}}"#;
        let errs = parse(input, true, &env()).unwrap_err();
        assert!(errs[0].message.contains("cannot prompt"), "{errs:?}");
    }

    #[test]
    fn reports_every_error_with_path_and_line() {
        let yaml = "servers:\n  a:\n    url: ${NOPE}\n  b:\n    command: ${ALSO_NOPE}\n    colour: red\n  Bad:\n    command: x\n";
        let errs = parse(yaml, false, &env()).unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        assert!(
            text.iter().any(|e| e.contains("servers.a.url") && e.contains("NOPE") && e.starts_with("line 3")),
            "{text:?}"
        );
        assert!(text.iter().any(|e| e.contains("servers.b.command") && e.contains("ALSO_NOPE")), "{text:?}");
        assert!(text.iter().any(|e| e.contains("servers.b.colour")), "{text:?}");
        assert!(text.iter().any(|e| e.contains("servers.Bad")), "{text:?}");
    }

    #[test]
    fn typos_at_top_level_fail() {
        let errs = parse("lisen: 1.2.3.4:5\n", false, &env()).unwrap_err();
        assert_eq!(errs[0].line, Some(1), "{errs:?}");
        assert!(parse("{\"servers\": {", true, &env()).is_err());
    }

    #[test]
    fn limits_have_defaults_and_refuse_zero() {
        let c = parse("servers: {}\n", false, &env()).unwrap();
        assert_eq!(c.limits, Limits::default());
        let c = parse("limits:\n  session_idle_timeout: 10m\n  max_sessions_per_identity: 5\n", false, &env()).unwrap();
        assert_eq!(c.limits.session_idle_timeout, Duration::from_secs(600));
        assert_eq!(c.limits.max_sessions_per_identity, 5);
        assert_eq!(c.limits.max_sessions, Limits::default().max_sessions);
        let errs = parse("limits:\n  keep_alive_timeout: 0s\n  max_connections: 0\n", false, &env());
        let text = format!("{:?}", errs.unwrap_err());
        assert!(text.contains("limits.keep_alive_timeout") && text.contains("limits.max_connections"), "{text}");
        let text = format!("{:?}", parse("limits:\n  colour: red\n", false, &env()).unwrap_err());
        assert!(text.contains("colour"), "unknown keys in limits are errors: {text}");
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        for (url, shown) in [
            ("ftp://svc:pw-secret@example.com/mcp?key=qk-secret", "ftp://example.com/mcp"),
            ("http://svc:pw-secret@ex ample.com/mcp?key=qk-secret#f", "http://ex ample.com/mcp"),
            ("https://u@h.example:8443/p/q?x=1", "https://h.example:8443/p/q"),
            ("no scheme?key=qk-secret", "no scheme"),
        ] {
            assert_eq!(shown_url(url), shown, "{url}");
        }
        let e = Env::from_pairs([("PW", "pw-secret"), ("QK", "qk-secret")]);
        let errs = parse("servers:\n  r:\n    url: \"ftp://svc:${PW}@example.com/mcp?key=${QK}\"\n", false, &e);
        let text = format!("{:?}", errs.unwrap_err());
        assert!(text.contains("ftp://example.com/mcp") && !text.contains("secret"), "{text}");
    }

    #[test]
    fn reserved_and_separator_names() {
        assert!(parse("servers:\n  mcp:\n    command: x\n", false, &env()).is_err());
        assert!(parse("servers:\n  a__b:\n    command: x\n", false, &env()).is_err());
        assert!(parse("separator: '.'\nservers:\n  a__b:\n    command: x\n", false, &env()).is_ok());
    }
}
