//! Configuration: the file format (raw serde types, documented field by field), and its
//! validation into the runtime [`Config`].
//!
//! Invariants: a file is validated whole, into an immutable `Config` that is swapped in
//! atomically (never edited in place); every problem is reported at once, each with the path of
//! the field (`servers.github.url`) and its line where known; unknown keys in Portcullis' own
//! schema are errors, unknown keys in entries written for other clients (`mcpServers`, VS Code's
//! `mcp.json`) are warnings.

pub(crate) mod auth;
pub(crate) mod catalog;
pub(crate) mod env;
pub(crate) mod oauth;
pub mod schema;
mod tree;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

pub use env::Env;

/// The default listen address, `127.0.0.1:8080`.
pub(crate) const DEFAULT_LISTEN_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8080);
/// The server name Portcullis gives clients in `initialize` unless the config names another.
pub(crate) const DEFAULT_NAME: &str = "portcullis";
/// The default separator between a server's name and a tool or prompt name.
pub(crate) const DEFAULT_SEPARATOR: &str = "__";
/// The default per-request deadline for an upstream call.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// The default idle timeout of an upstream SSE stream.
pub(crate) const DEFAULT_SSE_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The default request body limit.
pub(crate) const DEFAULT_MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Paths a server name may not take, because they are the gateway's own.
pub(crate) const RESERVED_NAMES: &[&str] =
    &["mcp", "sse", "messages", "servers", "health", "rpc", "stats", "metrics", "admin", ".well-known"];

type S = String;

/// The top level of a Portcullis config file (YAML or JSON). The same file may be written in
/// the formats of Claude Desktop, Claude Code, Cursor, VS Code, MCP Front or Open MCP Gateway:
/// their keys are here too.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Portcullis configuration")]
pub(crate) struct RawConfig {
    /// Address and port to listen on: `127.0.0.1:8080` (the default), `localhost:8080`, `:8080`
    /// (every interface) or a port alone (`8080`, on loopback). `--listen` overrides it.
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
    /// The URL clients reach Portcullis at, when it is behind a proxy or a load balancer
    /// (`https://mcp.example.com`); used wherever Portcullis names itself.
    #[serde(default)]
    pub public_url: Option<S>,
    /// The server name Portcullis gives clients in `initialize` (default `portcullis`).
    #[serde(default)]
    pub name: Option<S>,
    /// MCP Front's format version (`"1.0"`); accepted and not otherwise read.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    #[allow(dead_code, reason = "accepted as MCP Front writes it; nothing to read")]
    pub version: Option<serde::de::IgnoredAny>,
    /// Open MCP Gateway's server catalog: a YAML file of `servers: [{id, runtime, env}]`,
    /// relative to this file, watched and reloaded like it.
    #[serde(default)]
    pub catalog_path: Option<S>,
    /// The MCP servers to front, by name (`[a-z0-9_-]+`).
    #[serde(default)]
    pub servers: BTreeMap<String, RawServer>,
    /// Claude Desktop / Claude Code / Cursor style server map; entries as in those files.
    #[serde(default, rename = "mcpServers")]
    pub mcp_servers: BTreeMap<String, RawServer>,
    /// VS Code `mcp.json` prompt inputs. Portcullis cannot prompt: referencing one is an error.
    #[serde(default)]
    #[schemars(with = "Option<serde_json::Value>")]
    #[allow(dead_code, reason = "accepted as VS Code writes it; a reference to an input is refused where it is used")]
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
    /// Access tokens from identity providers (OAuth 2.1; see `docs/oauth.md`).
    #[serde(default)]
    pub oauth: Option<oauth::RawOAuth>,
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
    /// The token store: an SQLite file (`{path}`, or the path alone; default `portcullis.db`
    /// beside the config file), or a PostgreSQL URL (`postgres://…`) that replicas share.
    #[serde(default)]
    pub store: Option<RawStore>,
    /// What replicas share at once (`redis://…`, or `{url, prefix}`): rate limits and the
    /// failure throttle hold across every replica that names the same Redis. Without it each
    /// replica counts alone.
    #[serde(default)]
    pub state: Option<RawState>,
    /// Bounds on what one client can hold open: connections, sessions, streams, calls.
    #[serde(default)]
    pub limits: Option<RawLimits>,
}

/// `limits:` (every field optional; the defaults suit real clients).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLimits {
    /// How long a client may take to send a request's headers, from its first byte (default
    /// `5s`). A slower client's connection is closed.
    #[serde(default)]
    pub header_read_timeout: Option<DurationValue>,
    /// How long a connection may stay open with no request in flight (default `75s`). A
    /// streaming response is a request in flight: SSE streams are never cut by this.
    #[serde(default)]
    pub keep_alive_timeout: Option<DurationValue>,
    /// How long a request body may take to arrive in full (default `30s`); then 408.
    #[serde(default)]
    pub body_read_timeout: Option<DurationValue>,
    /// Connections open at once (default 20,000); past it new ones are closed at once.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// How long a session-era session may go unused (no request, no open stream, no call in
    /// flight) before it ends (default `30m`); its next request gets 404 and the client
    /// starts a new session, as the protocol has it.
    #[serde(default)]
    pub session_idle_timeout: Option<DurationValue>,
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
    /// On SIGTERM, how long `/health` answers 503 `draining` while requests are still served,
    /// before Portcullis stops accepting (default `5s`; `0s` stops at once). SIGINT never waits.
    #[serde(default)]
    pub drain_period: Option<DurationValue>,
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
    /// See [`RawLimits::drain_period`].
    pub drain_period: Duration,
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
            drain_period: Duration::from_secs(5),
        }
    }
}

/// `store:`: a path or URL alone, or `{path}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub(crate) enum RawStore {
    /// An SQLite file, or a `postgres://user:password@host:port/database` URL (libpq's
    /// parameters, `options` and `connect_timeout` among them).
    At(S),
    /// `{path}`.
    Path {
        /// The SQLite file (created on first use), or a PostgreSQL URL.
        path: S,
    },
}

/// `state:`: a Redis URL alone, or `{url, prefix}`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub(crate) enum RawState {
    /// `redis://[user:password@]host[:port][/database]`.
    At(S),
    /// `{url, prefix}`.
    Full {
        /// `redis://[user:password@]host[:port][/database]`.
        url: S,
        /// Prefix of every key and channel (default `portcullis:`), so deployments can share
        /// one Redis.
        #[serde(default)]
        prefix: Option<S>,
    },
}

/// `tls:`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
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
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAudit {
    /// Append records to this file (default: `portcullis-audit.jsonl` beside the token store;
    /// `-` for stderr, with the log).
    #[serde(default)]
    pub file: Option<S>,
}

/// One upstream MCP server: a local command (stdio) or a remote URL.
///
/// Keys from other clients' formats are accepted too (`type`, `disabled`, `authTokens`,
/// `envFile`).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawServer {
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
    /// VS Code: a dotenv file whose variables are added to `env` (`env` wins), e.g.
    /// `${workspaceFolder}/.env`; a relative path is relative to the workspace folder.
    #[serde(default, rename = "envFile")]
    pub env_file: Option<S>,
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
    /// TLS towards an `https://` `url`: the CAs to trust, a client certificate (mTLS), or, for
    /// development only, no verification.
    #[serde(default)]
    pub tls: Option<RawUpstreamTls>,
    /// An access token of Portcullis' own for a `url` server that wants OAuth: a machine
    /// account by the client credentials grant. Never the client's token.
    #[serde(default)]
    pub oauth: Option<RawUpstreamOAuth>,
    /// Deadline for one request to this server, e.g. `30s` or `5m` (default `5m`); a number
    /// is milliseconds, as Claude's format has it. Progress notifications do not extend it.
    #[serde(default)]
    pub timeout: Option<DurationValue>,
    /// How long an upstream SSE stream may stay silent before it is dropped (default `5m`).
    #[serde(default)]
    pub sse_idle_timeout: Option<DurationValue>,
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
    /// `shared` (default): everyone reaches the server with the one account of its `oauth:`.
    /// `per_user`: each identity links its own account (`oauth: {grant: authorization_code}`)
    /// and reaches the server as itself; an identity without one is given the link.
    #[serde(default)]
    pub credentials: Option<S>,
    /// MCP Front: names of the tokens allowed to reach this server.
    #[serde(default, rename = "authTokens")]
    pub auth_tokens: Vec<S>,
}

/// `tls:` on a `url` server.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamTls {
    /// A PEM file of the CA certificates trusted for this server, in place of the system's
    /// roots (an internal CA, a self-signed server).
    #[serde(default)]
    pub ca: Option<S>,
    /// A PEM client certificate chain presented to the server (mTLS); needs `key`.
    #[serde(default)]
    pub cert: Option<S>,
    /// The PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<S>,
    /// `true` turns certificate verification off for this server: anyone on the path can then
    /// read and change its traffic. For development only; logged as a warning at every start.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

/// `oauth:` on a `url` server.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawUpstreamOAuth {
    /// The grant: `client_credentials` (a machine account of Portcullis' own),
    /// `authorization_code` (a person's account, signed in with `portcullis login SERVER`; its
    /// tokens are kept in the store encrypted with `PORTCULLIS_SECRET_KEY`), or
    /// `token_exchange` (the caller's access token from an identity provider the server trusts
    /// too, exchanged at that provider for one audienced to the server: RFC 8693).
    pub grant: S,
    /// Portcullis' client id at the server's authorization server (required for
    /// `client_credentials`; for `authorization_code`, default: a Client ID Metadata Document
    /// Portcullis serves when the server accepts one and `public_url` is https, else dynamic
    /// registration).
    #[serde(default)]
    pub client_id: Option<S>,
    /// Its client secret, e.g. `${UPSTREAM_CLIENT_SECRET}` (required for `client_credentials`;
    /// none for a public client).
    #[serde(default)]
    pub client_secret: Option<S>,
    /// The loopback port `portcullis login` listens on for the browser's return (default
    /// 3000: its redirect URI is `http://127.0.0.1:PORT/callback`).
    #[serde(default)]
    pub callback_port: Option<u16>,
    /// For `token_exchange`: the `audience` to ask for besides the `resource` (RFC 8693), when
    /// the provider names its resources so.
    #[serde(default)]
    pub audience: Option<S>,
    /// The scopes to ask for, space-separated (default: none named).
    #[serde(default)]
    pub scope: Option<S>,
    /// The token endpoint (default: discovered from the server's protected resource metadata
    /// and its authorization server's metadata).
    #[serde(default)]
    pub token_endpoint: Option<S>,
    /// The authorization server (default: the first the server's metadata names).
    #[serde(default)]
    pub issuer: Option<S>,
    /// The resource the token is for (RFC 8707; default: the server's `url`).
    #[serde(default)]
    pub resource: Option<S>,
}

/// `inherit_env:` as written: `true`/`false` or a list of variable names.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub(crate) enum InheritEnvValue {
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
pub(crate) const BASE_CHILD_ENV: &[&str] =
    &["HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER", "LANG", "LANGUAGE", "LC_*", "TMPDIR", "TZ"];

/// What systemd gives Portcullis itself, never passed on (even with `inherit_env: true`).
const SERVICE_MANAGER_ENV: &[&str] =
    &["NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_USEC", "WATCHDOG_PID"];

impl InheritEnv {
    /// Whether a variable of Portcullis' environment passes to the child.
    pub(crate) fn passes(&self, name: &str) -> bool {
        // Portcullis' own secrets, and the service manager's channels to Portcullis (a child
        // that inherited them could report readiness or claim sockets in its name).
        if name.starts_with("PORTCULLIS_") || SERVICE_MANAGER_ENV.contains(&name) {
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

/// A duration written as text (`30s`, `5m`, `1h30m`) or as a number of milliseconds; read
/// into a [`Duration`] by the validator, so that a bad one is reported with the rest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(crate) enum DurationValue {
    /// A number: milliseconds, as Claude's format has it.
    Millis(u64),
    /// Text for `humantime`.
    Text(String),
}

impl DurationValue {
    /// The duration, or why the text is not one.
    pub(crate) fn duration(&self) -> Result<Duration, crate::credentials::ValueError> {
        match self {
            DurationValue::Millis(ms) => Ok(Duration::from_millis(*ms)),
            DurationValue::Text(t) => parse_duration(t),
        }
    }
}

impl schemars::JsonSchema for DurationValue {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A duration such as `30s`, `5m` or `1h30m`, or a number of milliseconds.",
            "type": ["string", "integer"],
            "minimum": 0
        })
    }
}

/// A URL as Portcullis shows it anywhere (errors, `check`, logs, the management API): scheme,
/// host, port and path only, so credentials in the user part or the query never appear. Works
/// on text that is not a valid URL too.
pub(crate) fn shown_url(url: &str) -> String {
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

pub(crate) use crate::credentials::MAX_SPAN;

/// Reads a listen address as people write it: `127.0.0.1:8080`, `[::1]:8080`,
/// `localhost:8080` (loopback), `:8080` (every interface) or a port alone, `8080` (loopback).
pub(crate) fn parse_listen(text: &str) -> Result<SocketAddr, crate::credentials::ValueError> {
    let t = text.trim();
    let bad = || crate::credentials::ValueError::Listen(t.to_owned());
    if let Ok(a) = t.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Ok(port) = t.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    match host.to_ascii_lowercase().as_str() {
        "" | "*" => Ok(SocketAddr::from(([0, 0, 0, 0], port))),
        "localhost" => Ok(SocketAddr::from(([127, 0, 0, 1], port))),
        _ => Err(bad()),
    }
}

pub(crate) use crate::credentials::parse_duration;
pub(crate) use oauth::{is_loopback_host, is_provider_url};

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
        /// TLS of its own (None: the system's roots, verification on).
        tls: Option<crate::tls::UpstreamTls>,
        /// Access tokens of Portcullis' own for it.
        oauth: Option<crate::oauth::client::UpstreamGrant>,
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

/// The audit file's name when the config names none (beside the token store).
pub(crate) const DEFAULT_AUDIT_FILE: &str = "portcullis-audit.jsonl";

/// Where audit records go, as the config says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTo {
    /// Not configured: [`DEFAULT_AUDIT_FILE`] beside the token store.
    Default,
    /// `audit: {file: PATH}`.
    File(PathBuf),
    /// `audit: {file: "-"}`: stderr, with the log.
    Stderr,
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
    /// Each identity reaches it with its own linked account (`credentials: per_user`).
    pub per_user: bool,
    /// MCP Front token names allowed to reach it (empty: no restriction from this list).
    pub auth_tokens: Vec<String>,
}

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// The URL clients reach Portcullis at, when the config gives one (no trailing slash).
    pub public_url: Option<String>,
    /// The server name given to clients in `initialize`.
    pub name: String,
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
    /// The token vault's keys (`PORTCULLIS_SECRET_KEY`), when set.
    pub vault: Option<crate::vault::KeyRing>,
    /// Credentials, grants, tenants and limits.
    pub auth: crate::credentials::AuthConfig,
    /// Where audit records go, as configured (see [`Config::audit_target`]).
    pub audit_file: AuditTo,
    /// TLS on the listener.
    pub tls: Option<crate::tls::TlsSettings>,
    /// Refuse plain-HTTP requests not vouched for by a trusted proxy.
    pub require_https: bool,
    /// Bounds on connections, sessions, streams and calls.
    pub limits: Limits,
    /// The token store named in the config (None: the default file beside the config file).
    pub store_at: Option<crate::store::StoreLocation>,
    /// The Redis replicas share (None: each replica counts its limits alone).
    pub state_at: Option<crate::state::StateLocation>,
    /// Open MCP Gateway's catalog file, when `catalog_path` names one (watched with the config).
    pub catalog: Option<PathBuf>,
    /// The file this came from (None for the built-in demo).
    pub source: Option<PathBuf>,
    /// Warnings found while loading (unknown keys in foreign entries).
    pub warnings: Vec<ConfigError>,
}

impl Config {
    /// The URL clients reach the gateway at, without a trailing slash: `public_url`, else the
    /// listen address (https when TLS is on).
    pub(crate) fn public_base(&self) -> String {
        match &self.public_url {
            Some(u) => u.clone(),
            None => format!("{}://{}", if self.tls.is_some() { "https" } else { "http" }, self.listen),
        }
    }

    /// The token store and whether the config named it: the named file or database, else
    /// `portcullis.db` beside the config file (or in the working directory without one).
    pub fn store(&self) -> (crate::store::StoreLocation, bool) {
        use crate::store::StoreLocation;
        let dir = || self.source.as_ref().and_then(|s| s.parent()).map(Path::to_path_buf).unwrap_or_default();
        match &self.store_at {
            Some(StoreLocation::File(p)) if p.is_relative() && self.source.is_some() => {
                (StoreLocation::File(dir().join(p)), true)
            }
            Some(at) => (at.clone(), true),
            None => (StoreLocation::File(dir().join("portcullis.db")), false),
        }
    }

    /// The audit file, or None for stderr: the configured file, else `portcullis-audit.jsonl`
    /// beside the token store, so that audit records never mix with the log.
    pub(crate) fn audit_target(&self) -> Option<PathBuf> {
        match &self.audit_file {
            AuditTo::Stderr => None,
            AuditTo::File(p) => Some(p.clone()),
            AuditTo::Default => match self.store().0.file() {
                Some(store) => Some(store.with_file_name(DEFAULT_AUDIT_FILE)),
                // A shared database: beside the config file (each replica keeps its own).
                None => Some(
                    self.source
                        .as_ref()
                        .and_then(|s| s.parent())
                        .map(Path::to_path_buf)
                        .unwrap_or_default()
                        .join(DEFAULT_AUDIT_FILE),
                ),
            },
        }
    }

    /// A server by name.
    pub(crate) fn server(&self, name: &str) -> Option<&Arc<ServerDef>> {
        self.servers.iter().find(|s| s.name == name)
    }
}

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, when it is not the config file itself (a catalog it names).
    pub file: Option<PathBuf>,
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
            // One position per error, as compilers write it: `file:line: field: message`.
            let file = e.file.as_deref().map_or_else(|| file.clone(), |f| f.display().to_string());
            let at = e.line.map(|l| format!("{file}:{l}")).unwrap_or_else(|| file.clone());
            match e.path.is_empty() {
                true => write!(f, "\n  {at}: {}", e.message)?,
                false => write!(f, "\n  {at}: {}: {}", e.path, e.message)?,
            }
        }
        Ok(())
    }
}

/// Where to look when no `--config` is given: `./portcullis.yaml`, then `./portcullis.json`.
pub(crate) fn default_path() -> Option<PathBuf> {
    ["portcullis.yaml", "portcullis.yml", "portcullis.json"].iter().map(PathBuf::from).find(|p| p.is_file())
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, false)
}

/// [`load`] for commands that need only the store, servers and tenants (`portcullis token`):
/// an unset variable elsewhere (an upstream's secret) is not an error. The store path itself
/// must still resolve.
pub(crate) fn load_lenient(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, true)
}

fn load_with(path: &Path, lenient: bool) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: Some(path.to_owned()),
        errors: vec![ConfigError { file: None, path: String::new(), line: None, message: format!("cannot read: {e}") }],
    })?;
    let env = Env::load(path.parent()).for_file(path);
    let env = if lenient { env.lenient() } else { env };
    let mut config = parse_named(&text, is_json(path), Some(path), &env)
        .map_err(|errors| ConfigErrors { file: Some(path.to_owned()), errors })?;
    config.source = Some(path.to_owned());
    Ok(config)
}

fn is_json(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// The built-in configuration used when no file exists: the bundled demo server over stdio.
/// It is validated exactly as a file is, so the credential sources (`PORTCULLIS_TOKEN`,
/// `PORTCULLIS_TOKENS`, and `.env` in the working directory) apply to it as to a file.
pub(crate) fn demo(exe: &Path) -> Result<Config, ConfigErrors> {
    let command = serde_json::Value::String(exe.display().to_string());
    // `$` in the path is literal, not a variable reference.
    let command = command.to_string().replace('$', "$$");
    let text = format!("servers:\n  demo:\n    command: {command}\n    args: [demo-server]\n");
    parse(&text, false, &Env::load(Some(Path::new(".")))).map_err(|errors| ConfigErrors { file: None, errors })
}

/// Parses and validates config text; `json` selects JSON (with comments and trailing commas,
/// as VS Code writes it) rather than YAML.
pub fn parse(text: &str, json: bool, env: &Env) -> Result<Config, Vec<ConfigError>> {
    parse_named(text, json, None, env)
}

/// Top-level keys that only files written for other tools have.
const FOREIGN_KEYS: &[&str] = &["mcpServers", "inputs", "proxy", "version", "catalog_path", "listen_addr"];

/// Whether a file was written for another tool (Claude Desktop, Claude Code, Cursor, VS Code,
/// MCP Front, Open MCP Gateway): its unknown keys are warnings, not errors.
fn is_foreign(tree: Option<&tree::Node>, file: Option<&Path>) -> bool {
    let named = file.and_then(Path::file_name).and_then(|n| n.to_str()).is_some_and(|n| {
        matches!(n, "mcp.json" | "claude_desktop_config.json" | ".mcp.json" | ".claude.json" | "config.dev.json")
    });
    named || FOREIGN_KEYS.iter().any(|k| tree.and_then(|t| t.get(k)).is_some())
}

/// [`parse`], knowing the file's name (which tells whether it was written for another tool).
fn parse_named(text: &str, json: bool, file: Option<&Path>, env: &Env) -> Result<Config, Vec<ConfigError>> {
    let one = |message: String, line: Option<u32>| vec![ConfigError { file: None, path: String::new(), line, message }];
    let text = if json { tree::jsonc_to_json(text) } else { text.to_owned() };
    if json && let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
        // One position per error: the line goes in front, so not again at the end.
        let message = e.to_string();
        let message = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
        return Err(one(format!("invalid JSON: {message}"), u32::try_from(e.line()).ok()));
    }
    let tree = tree::parse(&text).map_err(|e| one(e.message, e.line))?;
    let foreign = is_foreign(tree.as_ref(), file);
    let (value, problems) = match &tree {
        Some(t) => schema::convert(t, foreign),
        None => (serde_json::Value::Object(serde_json::Map::new()), Vec::new()),
    };
    let mut errors = Vec::new();
    let mut warnings: Vec<ConfigError> = env
        .warnings
        .iter()
        .map(|w| ConfigError { file: None, path: ".env".into(), line: None, message: w.clone() })
        .collect();
    for p in problems {
        let e = ConfigError { file: None, path: p.path, line: Some(p.line), message: p.message };
        if p.warning { warnings.push(e) } else { errors.push(e) }
    }
    let raw = match serde_json::from_value::<RawConfig>(value) {
        Ok(raw) => raw,
        Err(e) => {
            // The schema check lets through only what the types read, so this is a type the
            // schema describes less precisely than serde reads it.
            errors.push(ConfigError {
                file: None,
                path: String::new(),
                line: None,
                message: first_line(&e.to_string()),
            });
            return Err(errors);
        }
    };
    // The vault's keys are the environment's (a `.env` beside the config counts), never the file's.
    let vault = match env.get(crate::vault::KEY_VAR).filter(|k| !k.trim().is_empty()) {
        Some(key) => match crate::vault::KeyRing::new(key, env.get(crate::vault::PREVIOUS_VAR)) {
            Ok(ring) => Some(ring),
            Err(e) => {
                errors.push(ConfigError { file: None, path: String::new(), line: None, message: e });
                None
            }
        },
        None => None,
    };
    let validator =
        Validator { env, vault, errors, warnings, base: file.and_then(Path::parent).map(Path::to_path_buf) };
    let place = |list: &mut Vec<ConfigError>| {
        for e in list.iter_mut() {
            if e.line.is_none() && e.file.is_none() {
                e.line = tree.as_ref().and_then(|t| t.line_of(&e.path));
            }
        }
        list.sort_by_key(|e| e.line.unwrap_or(u32::MAX));
        list.dedup();
    };
    match validator.validate(raw) {
        Ok(mut config) => {
            place(&mut config.warnings);
            Ok(config)
        }
        Err(mut errors) => {
            place(&mut errors);
            Err(errors)
        }
    }
}

fn first_line(s: &str) -> String {
    s.lines().find(|l| !l.trim().is_empty()).unwrap_or(s).trim().to_owned()
}

struct Validator<'a> {
    env: &'a Env,
    /// The token vault's keys, from the environment (`PORTCULLIS_SECRET_KEY`).
    vault: Option<crate::vault::KeyRing>,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    /// The directory of the config file, for relative paths in it (`envFile`, `catalog_path`).
    base: Option<PathBuf>,
}

impl Validator<'_> {
    fn error(&mut self, path: impl Into<String>, message: impl fmt::Display) {
        self.errors.push(ConfigError { file: None, path: path.into(), line: None, message: message.to_string() });
    }

    fn warn(&mut self, path: impl Into<String>, message: impl fmt::Display) {
        self.warnings.push(ConfigError { file: None, path: path.into(), line: None, message: message.to_string() });
    }

    fn subst(&mut self, path: &str, value: &S) -> String {
        match self.env.substitute(value) {
            Ok(v) => v,
            Err(errs) => {
                for e in errs {
                    self.error(path, e.to_string());
                }
                String::new()
            }
        }
    }

    fn validate(mut self, raw: RawConfig) -> Result<Config, Vec<ConfigError>> {
        let listen = self.listen(&raw);
        let public_url = self.public_url(&raw);
        let name = self.name(&raw);
        let separator = self.separator(raw.separator.as_ref());
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
            self.error("max_body_bytes", "must be greater than 0");
        }
        let mut servers = self.servers([("servers", raw.servers), ("mcpServers", raw.mcp_servers)], &separator);
        let catalog = raw.catalog_path.as_ref().map(|c| self.catalog(c, &separator, &mut servers));
        servers.sort_by(|a, b| a.name.cmp(&b.name));
        let names: Vec<String> = servers.iter().map(|s| s.name.clone()).collect();
        let raw_oauth = raw.oauth;
        let mut auth = self.auth(
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
        auth.oauth = self.oauth(raw_oauth, &names, &separator, &auth.tenants);
        if auth.static_off && auth.issued_off && auth.oauth.issuers.is_empty() {
            self.error(
                "auth",
                "static_tokens and issued_tokens are off and no oauth issuer is configured: nothing could authenticate",
            );
        }
        for s in &servers {
            for t in s.auth_tokens.iter().filter(|t| !auth.tokens.iter().any(|d| d.name == **t)) {
                self.error(format!("servers.{}.authTokens", s.name), format!("unknown token name {t:?}"));
            }
        }
        let audit_file = self.audit(raw.audit);
        let store_at = raw.store.map(|st| {
            let (RawStore::At(p) | RawStore::Path { path: p }) = st;
            let p = self.subst("store", &p);
            if env::has_unset(&p) {
                self.error("store", "names an environment variable that is not set");
            }
            crate::store::StoreLocation::parse(&p)
        });
        let state_at = raw.state.and_then(|st| self.state(st));
        let tls = raw.tls.map(|t| self.tls(&t));
        let limits = self.limits(raw.limits.as_ref());
        if !self.errors.is_empty() {
            self.errors.sort_by_key(|e| e.line.unwrap_or(u32::MAX));
            return Err(self.errors);
        }
        Ok(Config {
            catalog,
            listen,
            public_url,
            name,
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
            store_at,
            state_at,
            source: None,
            vault: self.vault,
            warnings: self.warnings,
        })
    }

    /// `name`, or MCP Front's `proxy.name`.
    fn name(&mut self, raw: &RawConfig) -> String {
        raw.name
            .as_ref()
            .map(|n| ("name", n))
            .or_else(|| raw.proxy.as_ref().and_then(|p| p.name.as_ref()).map(|n| ("proxy.name", n)))
            .map(|(path, n)| self.subst(path, n))
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_NAME.to_owned())
    }

    fn separator(&mut self, raw: Option<&S>) -> String {
        let Some(s) = raw else { return DEFAULT_SEPARATOR.to_owned() };
        let v = self.subst("separator", s);
        if v.is_empty() || v.chars().any(|c| c.is_whitespace()) {
            self.error("separator", "must be non-empty and contain no whitespace");
        }
        v
    }

    /// The servers of the file's server maps, each name once.
    fn servers<const N: usize>(
        &mut self,
        sections: [(&str, BTreeMap<String, RawServer>); N],
        separator: &str,
    ) -> Vec<Arc<ServerDef>> {
        let mut servers: Vec<Arc<ServerDef>> = Vec::new();
        for (section, map) in sections {
            for (name, entry) in map {
                if let Some(def) = self.server(section, &name, &entry, separator) {
                    if servers.iter().any(|s| s.name == def.name) {
                        self.error(format!("{section}.{name}"), "defined twice");
                    } else {
                        servers.push(Arc::new(def));
                    }
                }
            }
        }
        servers
    }

    /// Open MCP Gateway's catalog: its servers join `servers` (each problem names the catalog
    /// file); returns the file, for the watcher.
    fn catalog(&mut self, path: &S, separator: &str, servers: &mut Vec<Arc<ServerDef>>) -> PathBuf {
        let file = self.subst("catalog_path", path);
        let file = match &self.base {
            Some(dir) if Path::new(&file).is_relative() => dir.join(&file),
            _ => PathBuf::from(file),
        };
        let (catalog, errors, warnings) = catalog::load(&file);
        self.errors.extend(errors);
        self.warnings.extend(warnings);
        for (name, entry, line) in &catalog.servers {
            let before = self.errors.len();
            let def = self.server("catalog", name, entry, separator);
            for e in &mut self.errors[before..] {
                e.file = Some(file.clone());
                e.line = e.line.or(*line);
            }
            match def {
                Some(def) if servers.iter().any(|s| s.name == def.name) => self.errors.push(ConfigError {
                    file: Some(file.clone()),
                    path: format!("catalog.{name}"),
                    line: *line,
                    message: "defined twice (also in this config file)".into(),
                }),
                Some(def) => servers.push(Arc::new(def)),
                None => {}
            }
        }
        file
    }

    fn audit(&mut self, raw: Option<RawAudit>) -> AuditTo {
        match raw.and_then(|a| a.file).map(|f| PathBuf::from(self.subst("audit.file", &f))) {
            Some(p) if p.as_os_str() == "-" => AuditTo::Stderr,
            Some(p) => AuditTo::File(p),
            None => AuditTo::Default,
        }
    }

    /// `state:`: a Redis URL the client can read (TLS to Redis is not built in).
    fn state(&mut self, raw: RawState) -> Option<crate::state::StateLocation> {
        let (url, prefix) = match raw {
            RawState::At(u) => (u, None),
            RawState::Full { url, prefix } => (url, prefix),
        };
        let url = self.subst("state", &url);
        if env::has_unset(&url) {
            self.error("state", "names an environment variable that is not set");
            return None;
        }
        if !url.starts_with("redis://") {
            self.error("state", "must be a redis:// URL (rediss:// and sockets are not supported)");
            return None;
        }
        if let Err(e) = redis::Client::open(url.as_str()) {
            // The client's message can quote the URL; say what is wrong without it.
            self.error("state", format!("is not a Redis URL the client can read ({:?})", e.kind()));
            return None;
        }
        let prefix = prefix.map_or_else(|| "portcullis:".to_owned(), |p| self.subst("state.prefix", &p));
        Some(crate::state::StateLocation { url, prefix })
    }

    /// `tls:`, with its files loaded once to prove they make a configuration.
    fn tls(&mut self, t: &RawTls) -> crate::tls::TlsSettings {
        let settings = crate::tls::TlsSettings {
            cert: PathBuf::from(self.subst("tls.cert", &t.cert)),
            key: PathBuf::from(self.subst("tls.key", &t.key)),
            client_ca: t.client_ca.as_ref().map(|c| PathBuf::from(self.subst("tls.client_ca", c))),
        };
        if let Err(e) = crate::tls::server_config(&settings) {
            self.error("tls", e);
        }
        settings
    }

    /// A duration field: its value, or `default` when absent or wrong (with an error). Zero is
    /// refused unless `zero_ok`; more than [`MAX_SPAN`] always.
    fn duration(&mut self, path: &str, value: Option<&DurationValue>, default: Duration, zero_ok: bool) -> Duration {
        let Some(value) = value else { return default };
        match value.duration() {
            Ok(d) if (d.is_zero() && !zero_ok) || d > MAX_SPAN => {
                self.error(path, "must be greater than 0 and at most 100 years");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.error(path, e);
                default
            }
        }
    }

    /// `listen`, or Open MCP Gateway's `listen_addr`, or MCP Front's `proxy.addr`.
    fn listen(&mut self, raw: &RawConfig) -> SocketAddr {
        let given = [("listen", &raw.listen), ("listen_addr", &raw.listen_addr)]
            .into_iter()
            .chain(raw.proxy.as_ref().map(|p| ("proxy.addr", &p.addr)))
            .find_map(|(path, v)| v.as_ref().map(|v| (path, v)));
        let Some((path, value)) = given else { return DEFAULT_LISTEN_ADDR };
        let text = self.subst(path, value);
        match parse_listen(&text) {
            Ok(a) => a,
            Err(e) => {
                if !text.is_empty() {
                    self.error(path, e);
                }
                DEFAULT_LISTEN_ADDR
            }
        }
    }

    /// `public_url`, or MCP Front's `proxy.baseUrl`: an absolute http(s) URL, kept without a
    /// trailing slash.
    fn public_url(&mut self, raw: &RawConfig) -> Option<String> {
        let proxy = raw.proxy.as_ref();
        let (path, value) = [
            ("public_url", raw.public_url.as_ref()),
            ("proxy.baseUrl", proxy.and_then(|p| p.base_url.as_ref())),
            ("proxy.baseURL", proxy.and_then(|p| p.base_url_upper.as_ref())),
        ]
        .into_iter()
        .find_map(|(path, v)| v.map(|v| (path, v)))?;
        let text = self.subst(path, value);
        match reqwest::Url::parse(&text) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.has_host() => {
                Some(text.trim_end_matches('/').to_owned())
            }
            _ => {
                self.error(path, format!("{:?} is not an http(s) URL", shown_url(&text)));
                None
            }
        }
    }

    fn limits(&mut self, raw: Option<&RawLimits>) -> Limits {
        let d = Limits::default();
        let Some(raw) = raw else { return d };
        let mut duration = |v: &Option<DurationValue>, name: &str, default: Duration| {
            self.duration(&format!("limits.{name}"), v.as_ref(), default, false)
        };
        let header_read_timeout = duration(&raw.header_read_timeout, "header_read_timeout", d.header_read_timeout);
        let keep_alive_timeout = duration(&raw.keep_alive_timeout, "keep_alive_timeout", d.keep_alive_timeout);
        let session_idle_timeout = duration(&raw.session_idle_timeout, "session_idle_timeout", d.session_idle_timeout);
        let body_read_timeout = duration(&raw.body_read_timeout, "body_read_timeout", d.body_read_timeout);
        let drain_period = self.duration("limits.drain_period", raw.drain_period.as_ref(), d.drain_period, true);
        let mut count = |v: Option<usize>, name: &str, default: usize| match v {
            Some(0) => {
                self.error(format!("limits.{name}"), "must be greater than 0");
                default
            }
            Some(n) => n,
            None => default,
        };
        Limits {
            drain_period,
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

    fn server(&mut self, section: &str, name: &str, s: &RawServer, separator: &str) -> Option<ServerDef> {
        let base = format!("{section}.{name}");
        let before = self.errors.len();
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        {
            self.error(&base, "server names may use only a-z, 0-9, `_` and `-`");
        } else if name.contains(separator) {
            self.error(&base, format!("server names may not contain the separator {separator:?}"));
        } else if RESERVED_NAMES.contains(&name) {
            self.error(&base, format!("{name:?} is reserved for the gateway's own endpoints"));
        }
        let transport = match (&s.command, &s.url) {
            (Some(_), Some(_)) => {
                self.error(&base, "give either `command` (stdio) or `url` (remote), not both");
                None
            }
            (None, None) => {
                self.error(&base, "needs `command` (stdio) or `url` (remote)");
                None
            }
            (Some(command), None) => self.stdio(&base, command, s),
            (None, Some(url)) => self.remote(&base, url, s),
        };
        let timeout = self.duration(&format!("{base}.timeout"), s.timeout.as_ref(), DEFAULT_TIMEOUT, false);
        let sse_idle_timeout = self.duration(
            &format!("{base}.sse_idle_timeout"),
            s.sse_idle_timeout.as_ref(),
            DEFAULT_SSE_IDLE_TIMEOUT,
            false,
        );
        let share = match s.share.as_deref() {
            None | Some("shared") => Share::Shared,
            Some("per_session" | "per-session") => Share::PerSession,
            Some(other) => {
                self.error(format!("{base}.share"), format!("unknown value {other:?} (shared, per_session)"));
                Share::Shared
            }
        };
        let exchange = matches!(
            &transport,
            Some(Transport::Http { oauth: Some(g), .. }) if matches!(g.flow, crate::oauth::client::Flow::TokenExchange { .. })
        );
        let per_user = match s.credentials.as_deref() {
            // A token exchange is each caller's own token: per user by nature.
            _ if exchange => true,
            None | Some("shared") => false,
            Some("per_user" | "per-user") => {
                let code = matches!(
                    &transport,
                    Some(Transport::Http { oauth: Some(g), .. })
                        if matches!(g.flow, crate::oauth::client::Flow::AuthorizationCode { .. })
                );
                if !code && transport.is_some() {
                    self.error(
                        format!("{base}.credentials"),
                        "per_user needs `oauth: {grant: authorization_code}`: each identity links an account there",
                    );
                }
                true
            }
            Some(other) => {
                self.error(format!("{base}.credentials"), format!("unknown value {other:?} (shared, per_user)"));
                false
            }
        };
        // Each identity's account means each identity's connection: per session (or, for a
        // stateless caller, per identity), never one shared by everyone.
        let share = if per_user { Share::PerSession } else { share };
        if self.errors.len() > before {
            return None;
        }
        Some(ServerDef {
            name: name.to_owned(),
            transport: transport?,
            timeout,
            sse_idle_timeout,
            enabled: s.enabled.unwrap_or(true) && !s.disabled.unwrap_or(false),
            share,
            per_user,
            auth_tokens: s.auth_tokens.clone(),
        })
    }

    /// A `command` server.
    fn stdio(&mut self, base: &str, command: &S, s: &RawServer) -> Option<Transport> {
        if let Some(k) = s.kind.as_deref().map(str::to_ascii_lowercase)
            && k != "stdio"
        {
            self.error(format!("{base}.type"), format!("{k:?} needs `url`, not `command`"));
        }
        if s.transport.is_some() || !s.headers.is_empty() || s.tls.is_some() || s.oauth.is_some() {
            self.error(base, "`transport`, `headers`, `tls` and `oauth` apply only to `url` servers");
        }
        let command = self.subst(&format!("{base}.command"), command);
        if command.trim().is_empty() {
            self.error(format!("{base}.command"), "must not be empty");
        }
        let args = s.args.iter().enumerate().map(|(i, a)| self.subst(&format!("{base}.args[{i}]"), a)).collect();
        let mut env: BTreeMap<String, String> =
            s.env.iter().map(|(k, v)| (k.clone(), self.subst(&format!("{base}.env.{k}"), v))).collect();
        if let Some(file) = &s.env_file {
            let path = format!("{base}.envFile");
            let file = self.subst(&path, file);
            for (k, v) in self.env_file(&path, &file) {
                env.entry(k).or_insert(v);
            }
        }
        for k in env.keys().filter(|k| k.starts_with("PORTCULLIS_")) {
            self.errors.push(ConfigError {
                file: None,
                path: format!("{base}.env.{k}"),
                line: None,
                message: "PORTCULLIS_* variables are never passed to a server".into(),
            });
        }
        let inherit_env = match &s.inherit_env {
            None | Some(InheritEnvValue::All(false)) => InheritEnv::Base,
            Some(InheritEnvValue::All(true)) => InheritEnv::All,
            Some(InheritEnvValue::Names(names)) => {
                for n in names.iter().filter(|n| n.starts_with("PORTCULLIS_")) {
                    self.error(
                        format!("{base}.inherit_env"),
                        format!("{n}: PORTCULLIS_* variables are never passed to a server"),
                    );
                }
                InheritEnv::Names(names.clone())
            }
        };
        let cwd = s.cwd.as_ref().map(|c| PathBuf::from(self.subst(&format!("{base}.cwd"), c)));
        if !command.trim().is_empty() && !self.command_exists(&command, env.get("PATH"), cwd.as_deref()) {
            self.warn(format!("{base}.command"), format!("{command:?} is not found on PATH or is not executable"));
        }
        Some(Transport::Stdio { command, args, env, inherit_env, cwd })
    }

    /// The variables of a dotenv file named by `envFile` (relative to the workspace folder, as
    /// VS Code resolves it: the folder holding `.vscode/`, else the config's folder).
    fn env_file(&mut self, path: &str, file: &str) -> Vec<(String, String)> {
        let dir = self.env.workspace().map(Path::to_path_buf).or_else(|| self.base.clone());
        let full = match dir {
            Some(dir) if Path::new(file).is_relative() => dir.join(file),
            _ => PathBuf::from(file),
        };
        match std::fs::read_to_string(&full) {
            Ok(text) => {
                let (vars, warnings) = env::parse_dotenv(&text);
                for w in warnings {
                    self.warn(path, w);
                }
                vars.into_iter().collect()
            }
            Err(e) => {
                self.error(path, format!("cannot read {}: {e}", full.display()));
                Vec::new()
            }
        }
    }

    /// Whether a stdio command can be found as the child will look for it: a path (relative to
    /// its working directory), or a name on the child's `PATH`.
    fn command_exists(&self, command: &str, child_path: Option<&String>, cwd: Option<&Path>) -> bool {
        use std::os::unix::fs::PermissionsExt;
        let executable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
        if command.contains('/') {
            let p = Path::new(command);
            return match cwd {
                Some(dir) if p.is_relative() => executable(&dir.join(p)),
                _ => executable(p),
            };
        }
        let search = child_path.map(String::as_str).or_else(|| self.env.get("PATH")).unwrap_or("/usr/bin:/bin");
        std::env::split_paths(search).any(|dir| executable(&dir.join(command)))
    }

    /// A `url` server.
    fn remote(&mut self, base: &str, url_raw: &S, s: &RawServer) -> Option<Transport> {
        if !s.args.is_empty() || s.cwd.is_some() || s.inherit_env.is_some() {
            self.error(base, "`args`, `inherit_env` and `cwd` apply only to `command` servers");
        }
        if !s.env.is_empty() || s.env_file.is_some() {
            self.warn(format!("{base}.env"), "ignored (`env` applies only to `command` servers)");
        }
        let url = self.subst(&format!("{base}.url"), url_raw);
        if !url.is_empty() && !env::has_unset(&url) {
            match reqwest::Url::parse(&url) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => self.error(format!("{base}.url"), format!("{:?} is not an http(s) URL", shown_url(&url))),
            }
        }
        let from_kind = match s.kind.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("http" | "streamable-http" | "streamable_http" | "streamablehttp") => Some(HttpMode::Streamable),
            Some("sse") => Some(HttpMode::Sse),
            Some(other) => {
                self.error(format!("{base}.type"), format!("unknown type {other:?} for a `url` server (http, sse)"));
                None
            }
        };
        let from_transport = match s.transport.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None => None,
            Some("streamable_http" | "streamable-http" | "http") => Some(HttpMode::Streamable),
            Some("sse") => Some(HttpMode::Sse),
            Some("auto") => Some(HttpMode::Auto),
            Some(other) => {
                self.error(
                    format!("{base}.transport"),
                    format!("unknown transport {other:?} (streamable_http, sse, auto)"),
                );
                None
            }
        };
        if let (Some(a), Some(b)) = (from_kind, from_transport)
            && a != b
        {
            self.error(base, "`type` and `transport` disagree");
        }
        let mode = from_transport.or(from_kind).unwrap_or(HttpMode::Auto);
        let mut headers = Vec::new();
        for (k, v) in &s.headers {
            let value = self.subst(&format!("{base}.headers.{k}"), v);
            if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
                self.error(format!("{base}.headers.{k}"), "not a valid header name");
            } else if reqwest::header::HeaderValue::from_str(&value).is_err() && !env::has_unset(&value) {
                self.error(format!("{base}.headers.{k}"), "not a valid header value");
            }
            headers.push((k.clone(), value));
        }
        let tls = s.tls.as_ref().and_then(|t| self.upstream_tls(base, &url, t));
        let oauth = s.oauth.as_ref().and_then(|o| self.upstream_oauth(base, &url, o, &headers));
        Some(Transport::Http { url, mode, headers, tls, oauth })
    }

    /// A `url` server's `oauth:`.
    fn upstream_oauth(
        &mut self,
        base: &str,
        url: &str,
        o: &RawUpstreamOAuth,
        headers: &[(String, String)],
    ) -> Option<crate::oauth::client::UpstreamGrant> {
        let field = format!("{base}.oauth");
        let flow = match o.grant.as_str() {
            "client_credentials" => crate::oauth::client::Flow::ClientCredentials,
            "authorization_code" => {
                if self.vault.is_none() {
                    self.error(
                        format!("{field}.grant"),
                        format!(
                            "authorization_code keeps a person's tokens in the store, encrypted: set {} ({}+ characters)",
                            crate::vault::KEY_VAR,
                            crate::vault::MIN_KEY_LEN
                        ),
                    );
                }
                crate::oauth::client::Flow::AuthorizationCode { callback_port: o.callback_port.unwrap_or(3000) }
            }
            "token_exchange" => crate::oauth::client::Flow::TokenExchange {
                audience: o.audience.as_ref().map(|a| self.subst(&format!("{field}.audience"), a)),
            },
            other => {
                self.error(
                    format!("{field}.grant"),
                    format!(
                        "{other:?}: the grants towards a server are client_credentials, authorization_code and token_exchange"
                    ),
                );
                return None;
            }
        };
        if o.audience.is_some() && !matches!(flow, crate::oauth::client::Flow::TokenExchange { .. }) {
            self.error(format!("{field}.audience"), "only for the token_exchange grant");
        }
        if o.callback_port.is_some() && flow == crate::oauth::client::Flow::ClientCredentials {
            self.error(format!("{field}.callback_port"), "only for the authorization_code grant");
        }
        if headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("authorization")) {
            self.error(&field, "an `Authorization` header and `oauth` cannot both say what to send");
            return None;
        }
        let get = |me: &mut Self, name: &str, v: &S| me.subst(&format!("{field}.{name}"), v);
        let client_id = o.client_id.as_ref().map(|v| get(self, "client_id", v)).unwrap_or_default();
        let client_secret = o.client_secret.as_ref().map(|v| get(self, "client_secret", v)).unwrap_or_default();
        match flow {
            crate::oauth::client::Flow::ClientCredentials | crate::oauth::client::Flow::TokenExchange { .. }
                if client_id.is_empty() || client_secret.is_empty() =>
            {
                self.error(&field, "`client_id` and `client_secret` must not be empty");
            }
            crate::oauth::client::Flow::AuthorizationCode { .. }
                if client_id.is_empty() && !client_secret.is_empty() =>
            {
                self.error(&field, "a `client_secret` needs its `client_id`");
            }
            _ => {}
        }
        let opt = |me: &mut Self, name: &str, v: &Option<S>| v.as_ref().map(|v| get(me, name, v));
        let scope = opt(self, "scope", &o.scope).filter(|s| !s.trim().is_empty());
        let token_endpoint = opt(self, "token_endpoint", &o.token_endpoint);
        let issuer = opt(self, "issuer", &o.issuer);
        let resource = opt(self, "resource", &o.resource).unwrap_or_else(|| url.to_owned());
        for (name, v) in [("token_endpoint", &token_endpoint), ("issuer", &issuer)] {
            if let Some(v) = v {
                self.provider_url(&format!("{field}.{name}"), v);
            }
        }
        Some(crate::oauth::client::UpstreamGrant {
            flow,
            client_id,
            client_secret,
            scope,
            token_endpoint,
            issuer,
            resource,
        })
    }

    /// A `url` server's `tls:`, its files loaded and its client built once: an error here is a
    /// config error (the server is never reached with a trust it was not configured with).
    fn upstream_tls(&mut self, base: &str, url: &str, t: &RawUpstreamTls) -> Option<crate::tls::UpstreamTls> {
        let field = format!("{base}.tls");
        if !url.starts_with("https://") {
            self.error(&field, "applies only to an https:// url");
            return None;
        }
        let path = |me: &mut Self, name: &str, v: &Option<S>| {
            v.as_ref().map(|p| PathBuf::from(me.subst(&format!("{field}.{name}"), p)))
        };
        let ca = path(self, "ca", &t.ca);
        let (cert, key) = (path(self, "cert", &t.cert), path(self, "key", &t.key));
        let cert_key = match (&cert, &key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => {
                self.error(&field, "`cert` and `key` go together");
                return None;
            }
        };
        if t.insecure_skip_verify && ca.is_some() {
            self.error(&field, "`ca` and `insecure_skip_verify` contradict each other");
            return None;
        }
        if t.insecure_skip_verify {
            self.warn(&field, "insecure_skip_verify: this server's certificate is not verified (development only)");
        }
        match crate::tls::UpstreamTls::load(ca.as_deref(), cert_key, t.insecure_skip_verify) {
            Ok(tls) => Some(tls),
            Err(e) => {
                self.error(&field, e);
                None
            }
        }
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
        assert_eq!(c.warnings[0].to_string(), "line 1: mcpServers.fs.alwaysAllow: unknown key ignored");

        let vscode =
            r#"{"inputs": [], "servers": {"gh": {"type": "http", "url": "https://${env:HOST}/x", "gallery": true}}}"#;
        let c = parse(vscode, true, &env()).unwrap();
        assert!(matches!(c.server("gh").unwrap().transport, Transport::Http { mode: HttpMode::Streamable, .. }));
        let warnings: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(warnings, ["line 1: servers.gh.gallery: unknown key ignored"]);

        let input = r#"{"inputs": [], "servers": {"gh": {"type": "http", "url": "https://x/${input:tok}"}}}"#;
        let errs = parse(input, true, &env()).unwrap_err();
        assert!(errs[0].message.contains("cannot prompt"), "{errs:?}");
    }

    #[test]
    fn a_remote_server_s_own_oauth_is_validated() {
        let ok = "servers:\n  r:\n    url: https://r.example/mcp\n    oauth: {grant: client_credentials, client_id: p, client_secret: \"${TOKEN}\", scope: \"a b\"}\n";
        let c = parse(ok, false, &env()).unwrap();
        let Transport::Http { oauth: Some(g), .. } = &c.server("r").unwrap().transport else { panic!() };
        assert_eq!(
            (g.client_secret.as_str(), g.resource.as_str(), g.scope.as_deref()),
            ("t0k", "https://r.example/mcp", Some("a b"))
        );
        assert!(!format!("{g:?}").contains("t0k"), "the secret stays out of Debug");
        for (yaml, says) in [
            ("    oauth: {grant: password, client_id: p, client_secret: s}\n", "authorization_code and token_exchange"),
            ("    oauth: {grant: token_exchange, client_id: x}\n", "must not be empty"),
            (
                "    oauth: {grant: client_credentials, client_id: p, client_secret: s, audience: a}\n",
                "only for the token_exchange",
            ),
            ("    oauth: {grant: authorization_code}\n", "PORTCULLIS_SECRET_KEY"),
            (
                "    oauth: {grant: client_credentials, client_id: p, client_secret: s, callback_port: 3001}\n",
                "only for",
            ),
            (
                "    headers: {Authorization: \"Bearer x\"}\n    oauth: {grant: client_credentials, client_id: p, client_secret: s}\n",
                "cannot both",
            ),
            (
                "    oauth: {grant: client_credentials, client_id: p, client_secret: s, token_endpoint: \"http://idp.example/token\"}\n",
                "not an https URL",
            ),
            ("    oauth: {grant: client_credentials, client_id: \"\", client_secret: s}\n", "must not be empty"),
        ] {
            let text = format!("servers:\n  r:\n    url: https://r.example/mcp\n{yaml}");
            let errs = parse(&text, false, &env()).unwrap_err();
            assert!(errs.iter().any(|e| e.to_string().contains(says)), "{yaml}: {errs:?}");
        }
        // A person's account: the vault's key from the environment; a secret needs its id.
        let keyed = Env::from_pairs([("PORTCULLIS_SECRET_KEY", "k-0123456789abcdef0123456789abcdef")]);
        let code = "servers:\n  r:\n    url: https://r.example/mcp\n    oauth: {grant: authorization_code}\n";
        let c = parse(code, false, &keyed).unwrap();
        assert!(c.vault.is_some());
        let Transport::Http { oauth: Some(g), .. } = &c.server("r").unwrap().transport else { panic!() };
        assert_eq!(g.flow, crate::oauth::client::Flow::AuthorizationCode { callback_port: 3000 });
        let secret_alone = code.replace("authorization_code}", "authorization_code, client_secret: s}");
        assert!(parse(&secret_alone, false, &keyed).is_err());
        let per_user = code.replace("    oauth:", "    credentials: per_user\n    oauth:");
        let c = parse(&per_user, false, &keyed).unwrap();
        let def = c.server("r").unwrap();
        assert!(def.per_user && def.share == Share::PerSession, "each identity its own connection");
        let cc = "servers:\n  r:\n    url: https://r.example/mcp\n    credentials: per_user\n    oauth: {grant: client_credentials, client_id: p, client_secret: s}\n";
        assert!(parse(cc, false, &keyed).unwrap_err().iter().any(|e| e.message.contains("per_user needs")));
        let short = Env::from_pairs([("PORTCULLIS_SECRET_KEY", "short")]);
        assert!(parse(code, false, &short).unwrap_err().iter().any(|e| e.message.contains("at least 32")));
        let stdio = "servers:\n  s:\n    command: echo\n    oauth: {grant: client_credentials, client_id: p, client_secret: s}\n";
        assert!(
            parse(stdio, false, &env()).unwrap_err().iter().any(|e| e.to_string().contains("only to `url` servers"))
        );
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
    fn every_problem_at_once_each_at_its_field() {
        let yaml = "\
lisen: 1.2.3.4:5
servers:
  a:
    comand: x
    args: [1, {x: 2}]
  b:
    url: ftp://nope
    timeout: 5 parsecs
max_body_bytes: lots
auth:
  tokens:
    t:
      token: \"${NOPE}\"
      servers: [a, ghost]
";
        let errs = parse(yaml, false, &env()).unwrap_err();
        let shown: Vec<(Option<u32>, String, String)> =
            errs.iter().map(|e| (e.line, e.path.clone(), e.message.clone())).collect();
        let has = |line: u32, path: &str, words: &str| {
            shown.iter().any(|(l, p, m)| *l == Some(line) && p == path && m.contains(words))
        };
        assert!(has(1, "lisen", "did you mean `listen`"), "{shown:#?}");
        assert!(has(4, "servers.a.comand", "did you mean `command`"), "{shown:#?}");
        assert!(has(5, "servers.a.args[1]", "expected a string"), "{shown:#?}");
        assert!(has(7, "servers.b.url", "not an http(s) URL"), "{shown:#?}");
        assert!(has(8, "servers.b.timeout", "invalid duration"), "{shown:#?}");
        assert!(has(9, "max_body_bytes", "expected a whole number"), "{shown:#?}");
        assert!(has(13, "auth.tokens.t.token", "NOPE"), "{shown:#?}");
        assert!(has(14, "auth.tokens.t.servers[1]", "unknown server \"ghost\""), "{shown:#?}");
        // Sorted by line, one position each.
        let lines: Vec<u32> = errs.iter().filter_map(|e| e.line).collect();
        assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{lines:?}");
        let text = ConfigErrors { file: Some("p.yaml".into()), errors: errs }.to_string();
        assert!(text.contains("\n  p.yaml:4: servers.a.comand: unknown key (did you mean `command`?)"), "{text}");
        assert!(!text.contains("column"), "{text}");
    }

    #[test]
    fn listen_as_people_write_it() {
        for (text, want) in [
            ("listen: \":8080\"", "0.0.0.0:8080"),
            ("listen: 8080", "127.0.0.1:8080"),
            ("listen: localhost:8080", "127.0.0.1:8080"),
            ("listen: \"[::1]:9\"", "[::1]:9"),
            ("proxy:\n  addr: \":8081\"", "0.0.0.0:8081"),
        ] {
            let c = parse(text, false, &env()).unwrap_or_else(|e| panic!("{text}: {e:?}"));
            assert_eq!(c.listen.to_string(), want, "{text}");
        }
        assert!(parse("listen: example.com:80", false, &env()).is_err());
    }

    #[test]
    fn claude_desktop_keys_outside_servers_are_warnings() {
        let json = r#"{
  "globalShortcut": "Ctrl+Space",
  "preferences": {"menuBarEnabled": true},
  "mcpServers": {"fs": {"command": "sh", "args": ["-c", "cat"]}}
}"#;
        let c = parse(json, true, &env()).unwrap();
        assert_eq!(c.servers.len(), 1);
        let warnings: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert!(warnings.iter().any(|w| w == "line 2: globalShortcut: unknown key ignored"), "{warnings:?}");
        assert!(warnings.iter().any(|w| w.contains("preferences")), "{warnings:?}");
        // Portcullis' own format stays strict.
        assert!(parse("globalShortcut: x\nservers: {}\n", false, &env()).is_err());
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
