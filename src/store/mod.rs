//! The token store: issued tokens (held hashed), the authorization server's clients, refresh
//! families and consents, the upstream token vault, and the short-lived rows a browser sign-in
//! continues from on any replica (`held`: by the digest of their key, sealed by their callers,
//! gone when they expire). One SQLite file (WAL) for one node,
//! shared with the `token` subcommands in another process; PostgreSQL for replicas. The logic
//! is written once ([`Store`]) over the SQL both databases read alike ([`sql`]).
//!
//! Invariants: the store holds SHA-256 digests and a short display prefix, never a secret (the
//! vault's and the held rows' values are sealed before they reach it); every change happens in one write transaction that first bumps a version counter (ordering
//! writers, on SQLite by `BEGIN IMMEDIATE`, on PostgreSQL by the counter's row lock); running
//! gateways poll the counter (and on PostgreSQL are told at commit) to drop caches and close
//! revoked tokens' streams; a name is unique among a tenant's tokens that are neither
//! superseded nor revoked; a failed command changes nothing. Times are Unix milliseconds and
//! are passed in, so tests can move the clock.

mod postgres;
pub(crate) mod sql;
mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use sql::{Row, Tx, args};

use crate::authz::Grants;
use crate::credentials::{Rate, Role};
use crate::sharded::Sharded;
use crate::sharded::lock;

/// Why a store operation failed, and whose fault it is.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The caller asked for something impossible (duplicate name, unknown token, bad input).
    #[error("{0}")]
    Invalid(String),
    /// The store is locked or unreachable: try again later (requests get 503, never 401).
    #[error("the token store is unavailable: {0}")]
    Unavailable(String),
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A Unix-ms time as a `SystemTime`.
pub(crate) fn to_system_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The grants of an issued token, as stored (JSON).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredGrants {
    /// Servers (empty: all).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Tool globs.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Prompt globs.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Resource globs.
    #[serde(default)]
    pub resources: Vec<String>,
}

impl StoredGrants {
    /// The runtime form.
    pub(crate) fn grants(&self) -> Grants {
        Grants::from_lists(&self.servers, &self.tools, &self.prompts, &self.resources)
    }
}

/// One issued token as stored (no secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredToken {
    /// Stable id (`tok_…`).
    pub id: String,
    /// Name, unique per tenant among live tokens.
    pub name: String,
    /// Tenant ("" for none).
    pub tenant: String,
    /// The first characters of the secret, for recognising it (`pcs_AbCd`).
    pub prefix: String,
    /// The servers, tools, prompts and resources it reaches.
    pub grants: StoredGrants,
    /// `user` or `admin`.
    pub role: String,
    /// Its own rate limit (`100/min`).
    pub rate: Option<String>,
    /// Unix ms (shown as RFC 3339).
    #[serde(serialize_with = "rfc3339")]
    pub created_at: i64,
    /// Unix ms, None for never (shown as RFC 3339).
    #[serde(serialize_with = "rfc3339_opt")]
    pub expires_at: Option<i64>,
    /// Unix ms (shown as RFC 3339).
    #[serde(serialize_with = "rfc3339_opt")]
    pub revoked_at: Option<i64>,
    /// Unix ms, written at most once a minute (shown as RFC 3339).
    #[serde(serialize_with = "rfc3339_opt")]
    pub last_used_at: Option<i64>,
    /// The token this one replaced (rotation).
    pub replaces: Option<String>,
    /// The token that replaced this one.
    pub superseded_by: Option<String>,
    /// When this one stops, if superseded (end of the rotation's grace; shown as RFC 3339).
    #[serde(serialize_with = "rfc3339_opt")]
    pub overlap_until: Option<i64>,
    /// The id of the first token of its rotation chain: the stable identity its sessions are
    /// bound to, which a rotation keeps (for an access token of Portcullis' authorization
    /// server: its refresh family, which a refresh keeps).
    pub lineage: String,
    /// For an access token of Portcullis' authorization server: the resource (MCP endpoint
    /// URL) it was issued for; it is accepted only there.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// For an access token of Portcullis' authorization server: the OAuth client it was issued
    /// to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
}

/// A time in unix ms as RFC 3339 (`2026-12-01T10:00:00.123Z`), as every API shows times.
pub(crate) fn format_ms(ms: i64) -> String {
    humantime::format_rfc3339_millis(to_system_time(ms)).to_string()
}

fn rfc3339<S: serde::Serializer>(ms: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format_ms(*ms))
}

fn rfc3339_opt<S: serde::Serializer>(ms: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
    match ms {
        Some(ms) => s.serialize_str(&format_ms(*ms)),
        None => s.serialize_none(),
    }
}

/// What a token is, at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum TokenState {
    /// Usable.
    Active,
    /// Usable, but ends within a week (or is in a rotation's grace).
    Expiring,
    /// Past its expiry.
    Expired,
    /// Revoked (`portcullis token revoke` or the management API).
    Revoked,
    /// Replaced by a rotation and past the grace.
    Superseded,
}

impl StoredToken {
    /// When it stops working (expiry, or the end of a rotation's grace), if ever.
    pub(crate) fn ends_at(&self) -> Option<i64> {
        match (self.expires_at, self.superseded_by.as_ref().and(self.overlap_until)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Its state at `now`.
    pub(crate) fn state(&self, now: i64) -> TokenState {
        if self.revoked_at.is_some() {
            return TokenState::Revoked;
        }
        if self.superseded_by.is_some() && self.overlap_until.is_none_or(|t| now >= t) {
            return TokenState::Superseded;
        }
        if self.expires_at.is_some_and(|t| now >= t) {
            return TokenState::Expired;
        }
        const WEEK: i64 = 7 * 24 * 3600 * 1000;
        if self.superseded_by.is_some() || self.expires_at.is_some_and(|t| t - now < WEEK) {
            return TokenState::Expiring;
        }
        TokenState::Active
    }

    /// Whether it authenticates at `now`.
    pub(crate) fn usable(&self, now: i64) -> bool {
        matches!(self.state(now), TokenState::Active | TokenState::Expiring)
    }

    /// Its role.
    pub(crate) fn role(&self) -> Role {
        Role::parse(Some(&self.role)).unwrap_or_default()
    }

    /// Its rate limit.
    pub(crate) fn rate(&self) -> Option<Rate> {
        self.rate.as_deref().and_then(|r| Rate::parse(r).ok())
    }
}

/// What to create.
#[derive(Debug, Clone, Default)]
pub struct NewToken {
    /// Unique per tenant among live tokens.
    pub name: String,
    /// Tenant ("" for none).
    pub tenant: String,
    /// The servers, tools, prompts and resources it will reach.
    pub grants: StoredGrants,
    /// `user` or `admin`.
    pub role: Role,
    /// Time to live (None: never).
    pub ttl: Option<Duration>,
    /// Rate limit.
    pub rate: Option<Rate>,
}

/// A token to issue, as the CLI and the admin API take it (strings, validated against the
/// config by [`TokenRequest::validate`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TokenRequest {
    /// Unique per tenant among live tokens.
    pub name: String,
    /// Tenant (must be configured).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Servers (must be configured; empty: all).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Tool globs (`!` denies).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Prompt globs.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Resource globs.
    #[serde(default)]
    pub resources: Vec<String>,
    /// `user` (default) or `admin`.
    #[serde(default)]
    pub role: Option<String>,
    /// `30d`, `12h`, … or `never` (default `90d`).
    #[serde(default)]
    pub ttl: Option<String>,
    /// `100/min`, …
    #[serde(default)]
    pub rate: Option<String>,
}

/// The default time to live of an issued token.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(90 * 24 * 3600);

impl TokenRequest {
    /// Checks every field against the config; all problems at once.
    pub(crate) fn validate(&self, config: &crate::config::Config) -> Result<NewToken, StoreError> {
        let mut errors = Vec::new();
        if let Err(e) = crate::credentials::check_name(&self.name) {
            errors.push(e.to_string());
        }
        if let Some(t) = &self.tenant
            && let Err(e) = crate::credentials::check_name(t)
        {
            errors.push(format!("tenant: {e}"));
        }
        for s in self.servers.iter().filter(|s| config.server(s).is_none()) {
            errors.push(format!("unknown server {s:?}"));
        }
        if let Some(t) = &self.tenant
            && !config.auth.tenants.contains_key(t)
        {
            errors.push(format!("unknown tenant {t:?}"));
        }
        for (kind, globs) in [("tools", &self.tools), ("prompts", &self.prompts), ("resources", &self.resources)] {
            for g in globs.iter().filter(|g| g.trim_start_matches('!').is_empty() || g.contains(char::is_whitespace)) {
                errors.push(format!("malformed {kind} glob {g:?}"));
            }
        }
        let role = Role::parse(self.role.as_deref()).unwrap_or_else(|e| {
            errors.push(e.to_string());
            Role::User
        });
        let ttl = match self.ttl.as_deref().map(str::trim) {
            None => Some(DEFAULT_TTL),
            Some("never") => None,
            Some(t) => match parse_span(t) {
                Ok(d) if !d.is_zero() => Some(d),
                Ok(_) => {
                    errors.push("ttl must be greater than 0 (or never)".to_owned());
                    None
                }
                Err(e) => {
                    errors.push(format!("ttl: {e} (30d, 12h, or never)"));
                    None
                }
            },
        };
        let rate = match self.rate.as_deref() {
            None => None,
            Some(r) => match Rate::parse(r) {
                Ok(r) => Some(r),
                Err(e) => {
                    errors.push(e.to_string());
                    None
                }
            },
        };
        if !errors.is_empty() {
            return Err(StoreError::Invalid(errors.join("; ")));
        }
        Ok(NewToken {
            name: self.name.clone(),
            tenant: self.tenant.clone().unwrap_or_default(),
            grants: StoredGrants {
                servers: self.servers.clone(),
                tools: self.tools.clone(),
                prompts: self.prompts.clone(),
                resources: self.resources.clone(),
            },
            role,
            ttl,
            rate,
        })
    }
}

pub(crate) use crate::credentials::parse_span;

/// A stored string made safe to print: control, formatting and other invisible characters as
/// `\u{…}` escapes (a name stored before names were checked may hold them).
pub(crate) fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let visible = |c: char| c == ' ' || crate::credentials::is_visible(c);
    if s.chars().all(visible) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars().map(|c| if visible(c) { c.to_string() } else { format!("\\u{{{:x}}}", u32::from(c)) }).collect(),
    )
}

/// JSON text made safe to print: every non-ASCII character that is not a letter or digit as a
/// `\uXXXX` escape (serde_json already escapes control characters; U+202E and its kind it
/// writes raw). Only valid where such characters can stand only inside strings: JSON text.
pub(crate) fn printable_json(json: &str) -> std::borrow::Cow<'_, str> {
    if json.chars().all(|c| c.is_ascii() || c.is_alphanumeric()) {
        return std::borrow::Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if c.is_ascii() || c.is_alphanumeric() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{:04x}", u));
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// How every secret Portcullis makes begins (issued tokens, `--generate-token`).
pub(crate) const SECRET_PREFIX: &str = "pcs_";

/// A new secret: [`SECRET_PREFIX`] + 43 base64url characters of 32 bytes from the OS.
pub(crate) fn new_secret() -> Result<String, StoreError> {
    crate::random::id().map(|id| format!("{SECRET_PREFIX}{id}")).map_err(|e| StoreError::Unavailable(e.to_string()))
}

pub(crate) fn new_id() -> Result<String, StoreError> {
    let mut b = [0u8; 9];
    crate::random::fill(&mut b).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    Ok(format!("tok_{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>()))
}

/// A person's (or the shared) account at a remote server's authorization server: its tokens
/// sealed by the vault ([`crate::vault`]), never in clear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamAccount {
    /// The server (its name in the config).
    pub server: String,
    /// Whose: "" for the server's shared account, else the identity's key.
    pub subject: String,
    /// The identity's name ("" for the shared account).
    pub name: String,
    /// The authorization server that issued the tokens.
    pub issuer: String,
    /// Where they are refreshed.
    pub token_endpoint: String,
    /// The client id they were issued to.
    pub client_id: String,
    /// The access and refresh tokens, sealed for this row ([`UpstreamAccount::row`]).
    pub sealed: Vec<u8>,
    /// When the access token expires (Unix ms), if said.
    pub expires_at: Option<i64>,
    /// The scopes granted.
    pub scope: Option<String>,
    /// `active`, or `needs_login` after a refresh the authorization server refused.
    pub state: String,
    /// When it last changed.
    pub updated_at: i64,
}

impl UpstreamAccount {
    /// What the sealed tokens are bound to: the row and who issued them to whom.
    pub(crate) fn row(server: &str, subject: &str, issuer: &str, client_id: &str) -> String {
        format!("account\0{server}\0{subject}\0{issuer}\0{client_id}")
    }
}

/// A client registration Portcullis made at a remote server's authorization server (RFC 7591).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamClient {
    /// The server.
    pub server: String,
    /// The authorization server.
    pub issuer: String,
    /// The client id it gave.
    pub client_id: String,
    /// Its secret, sealed for this row, when it gave one.
    pub sealed_secret: Option<Vec<u8>>,
}

impl UpstreamClient {
    /// What the sealed secret is bound to.
    pub(crate) fn row(server: &str, issuer: &str, client_id: &str) -> String {
        format!("client\0{server}\0{issuer}\0{client_id}")
    }
}

/// What [`Store::held_put`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Put {
    /// The data is kept.
    Kept,
    /// A row was there already and is left as it was.
    There,
    /// Too many rows of the kind: nothing kept.
    Full,
}

/// An OAuth client of Portcullis' authorization server (registered by RFC 7591).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OAuthClient {
    /// Its id (random, given at registration).
    pub client_id: String,
    /// The name it gave (shown on the consent page, escaped).
    pub name: String,
    /// Where it may be sent back to, compared exactly (loopback: any port).
    pub redirect_uris: Vec<String>,
}

/// What a login granted an OAuth client: one refresh family's fixed part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OAuthGrant {
    /// The refresh family (every token of one login and its refreshes).
    pub family: String,
    /// The client.
    pub client_id: String,
    /// The resource the tokens are for.
    pub audience: String,
    /// The key of the identity that logged in (`config:NAME`, `issued:LINEAGE`).
    pub login: String,
    /// That identity's name.
    pub name: String,
    /// Its tenant ("" for none).
    pub tenant: String,
    /// Its grants at login (never more).
    pub grants: StoredGrants,
}

/// A person's consent to an OAuth client, for one resource: remembered, so the next sign-in
/// of the same person for the same client and resource is not asked again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Consent {
    /// Its id (`con_…`).
    pub id: String,
    /// The identity that consented (`config:NAME`, `issued:LINEAGE`, `oidc:ISSUER#SUB`).
    #[serde(skip)]
    pub login: String,
    /// That identity's name.
    pub name: String,
    /// Its tenant ("" for none).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tenant: String,
    /// The client.
    pub client_id: String,
    /// Its name as it was shown.
    pub client_name: String,
    /// The MCP endpoint it was for.
    pub resource: String,
    /// When it was given.
    #[serde(serialize_with = "rfc3339")]
    pub created_at: i64,
    /// When it last spared a consent page.
    #[serde(serialize_with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    pub used_at: Option<i64>,
}

/// A refresh token that cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RefreshError {
    /// Unknown, expired, revoked, or another client's.
    #[error("invalid refresh token")]
    Invalid,
    /// Used before: its whole family is revoked now (RFC 9700 §4.14.2).
    #[error("refresh token reused; its family is revoked")]
    Reused,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tokens issued to an OAuth client: the access token's and the refresh token's secrets.
pub(crate) struct Issued {
    pub access_secret: String,
    pub refresh_secret: String,
}

/// Where the store lives: an SQLite file (one node), or a PostgreSQL database (replicas).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// An SQLite file.
    File(PathBuf),
    /// A `postgres://` (or `postgresql://`) URL.
    Postgres(String),
}

impl StoreLocation {
    /// What the `store:` setting (or `--store`) names: a URL of PostgreSQL, else a file.
    pub fn parse(s: &str) -> StoreLocation {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            StoreLocation::Postgres(s.to_owned())
        } else {
            StoreLocation::File(PathBuf::from(s))
        }
    }

    /// Whether there is something to open: a file that exists, or a database (always: its
    /// schema is created on first use).
    pub(crate) fn exists(&self) -> bool {
        match self {
            StoreLocation::File(p) => p.exists(),
            StoreLocation::Postgres(_) => true,
        }
    }

    /// The file, for what is kept beside it.
    pub(crate) fn file(&self) -> Option<&Path> {
        match self {
            StoreLocation::File(p) => Some(p),
            StoreLocation::Postgres(_) => None,
        }
    }
}

impl std::fmt::Display for StoreLocation {
    /// The file, or the URL without its password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::File(p) => write!(f, "{}", p.display()),
            StoreLocation::Postgres(url) => f.write_str(&postgres::redacted(url)),
        }
    }
}

/// The store's logic, handed to a backend to run in one transaction.
pub(crate) type Job = Box<dyn FnOnce(&mut dyn Tx) -> Result<(), StoreError> + Send>;

/// Told that some writer committed.
pub(crate) type Changed = std::sync::Arc<dyn Fn() + Send + Sync>;

/// A database the store's logic runs on.
pub(crate) trait Backend: Send + Sync {
    /// Runs `job` in one transaction: committed when it returns `Ok`, rolled back otherwise. A
    /// `write` transaction is ordered after every other write (and announced to listeners).
    fn run(&self, write: bool, job: Job) -> Result<(), StoreError>;
    /// Writes buffered changes back (SQLite's WAL); nothing elsewhere.
    fn checkpoint(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Calls `changed` as soon as any writer commits, where the database can tell (PostgreSQL);
    /// elsewhere polling alone sees changes.
    fn listen(&self, changed: Changed) {
        let _ = changed;
    }
}

/// The token store, on whichever database: every operation is written once, here.
#[derive(Clone)]
pub struct Store {
    backend: std::sync::Arc<dyn Backend>,
}

const COLUMNS: &str = "id, name, tenant, prefix, grants, role, rate, created_at, expires_at, revoked_at, \
                       last_used_at, replaces, superseded_by, overlap_until, COALESCE(lineage, id), audience, client_id";

fn token_row(r: &Row) -> Result<StoredToken, StoreError> {
    Ok(StoredToken {
        id: r.text(0)?,
        name: r.text(1)?,
        tenant: r.text(2)?,
        prefix: r.text(3)?,
        grants: serde_json::from_str(&r.text(4)?).unwrap_or_default(),
        role: r.text(5)?,
        rate: r.opt_text(6)?,
        created_at: r.int(7)?,
        expires_at: r.opt_int(8)?,
        revoked_at: r.opt_int(9)?,
        last_used_at: r.opt_int(10)?,
        replaces: r.opt_text(11)?,
        superseded_by: r.opt_text(12)?,
        overlap_until: r.opt_int(13)?,
        lineage: r.text(14)?,
        audience: r.opt_text(15)?,
        client_id: r.opt_text(16)?,
    })
}

fn token_by_id(tx: &mut dyn Tx, id: &str) -> Result<Option<StoredToken>, StoreError> {
    tx.row(&format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1"), args![id])?.as_ref().map(token_row).transpose()
}

fn ms_after(now: i64, d: Duration) -> i64 {
    now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Store {
    /// Opens the store at `at` (creating an SQLite file, or a database's schema, on first use),
    /// with migrations applied. A PostgreSQL database is opened once per process and shared.
    pub fn open(at: &StoreLocation) -> Result<Store, StoreError> {
        Self::open_as(at, true)
    }

    /// Like [`Store::open`], without waiting out another process that holds an SQLite file
    /// locked (on the request path: 503 at once rather than a held thread).
    pub(crate) fn open_now(at: &StoreLocation) -> Result<Store, StoreError> {
        Self::open_as(at, false)
    }

    fn open_as(at: &StoreLocation, wait: bool) -> Result<Store, StoreError> {
        let backend: std::sync::Arc<dyn Backend> = match at {
            StoreLocation::File(p) => std::sync::Arc::new(sqlite::Sqlite::open(p, wait)?),
            StoreLocation::Postgres(url) => postgres::Postgres::open(url)?,
        };
        Ok(Store { backend })
    }

    /// Runs `f` in one read transaction.
    fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.transact(false, f)
    }

    /// Runs `f` in one write transaction that first bumps the change counter (which orders it
    /// after every other writer's).
    fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.transact(true, |tx| {
            tx.exec("UPDATE meta SET value = value + 1 WHERE key = 'version'", &[])?;
            f(tx)
        })
    }

    fn transact<T: Send + 'static>(
        &self,
        write: bool,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (give, take) = std::sync::mpsc::sync_channel(1);
        self.backend.run(
            write,
            Box::new(move |tx| {
                let out = f(tx)?;
                let _ = give.send(out);
                Ok(())
            }),
        )?;
        take.try_recv().map_err(|_| StoreError::Unavailable("the store gave no answer".into()))
    }

    /// See [`Backend::listen`].
    pub(crate) fn listen(&self, changed: Changed) {
        self.backend.listen(changed);
    }

    /// The change counter (every write that matters to authentication bumps it).
    pub(crate) fn version(&self) -> Result<i64, StoreError> {
        self.read(|tx| tx.int("SELECT value FROM meta WHERE key = 'version'", &[]))
    }

    /// Whether any token exists (then authentication is on).
    pub(crate) fn has_any(&self) -> Result<bool, StoreError> {
        self.read(|tx| Ok(tx.row("SELECT 1 FROM tokens LIMIT 1", &[])?.is_some()))
    }

    /// Issues a token; returns it and its secret (shown once).
    pub fn create(&self, new: &NewToken, now: i64) -> Result<(StoredToken, String), StoreError> {
        if new.name.trim().is_empty() {
            return Err(StoreError::Invalid("a token needs a name".into()));
        }
        let secret = new_secret()?;
        let id = new_id()?;
        let expires = new.ttl.map(|t| ms_after(now, t));
        let role = new.role.name();
        let rate = new.rate.map(|r| r.to_string());
        let grants = serde_json::to_string(&new.grants).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let (name, tenant, digest) = (new.name.clone(), new.tenant.clone(), crate::credentials::digest(&secret));
        let prefix = secret[..8].to_owned();
        self.write(move |tx| {
            let taken = tx
                .row(
                    "SELECT 1 FROM tokens WHERE tenant = ?1 AND name = ?2 AND superseded_by IS NULL AND revoked_at IS NULL",
                    args![&tenant, &name],
                )?
                .is_some();
            if taken {
                return Err(StoreError::Invalid(format!("a token named {name:?} already exists{}", tenant_suffix(&tenant))));
            }
            tx.exec(
                "INSERT INTO tokens (id, name, tenant, digest, prefix, grants, role, rate, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                args![&id, &name, &tenant, &digest, &prefix, &grants, role, rate.as_deref(), now, expires],
            )?;
            let made = token_by_id(tx, &id)?.ok_or_else(|| StoreError::Unavailable("the new token is gone".into()))?;
            Ok((made, secret))
        })
    }

    /// Every token, newest first.
    pub(crate) fn list(&self) -> Result<Vec<StoredToken>, StoreError> {
        self.read(|tx| {
            tx.rows(&format!("SELECT {COLUMNS} FROM tokens ORDER BY created_at DESC, id"), &[])?
                .iter()
                .map(token_row)
                .collect()
        })
    }

    /// One token by id.
    pub(crate) fn get(&self, id: &str) -> Result<StoredToken, StoreError> {
        let id = id.to_owned();
        self.read(move |tx| token_by_id(tx, &id)?.ok_or_else(|| StoreError::Invalid(format!("no token {id}"))))
    }

    /// The token with a secret's digest (one indexed lookup).
    pub fn lookup(&self, digest: &[u8; 32]) -> Result<Option<StoredToken>, StoreError> {
        let digest = *digest;
        self.read(move |tx| {
            tx.row(&format!("SELECT {COLUMNS} FROM tokens WHERE digest = ?1"), args![&digest])?
                .as_ref()
                .map(token_row)
                .transpose()
        })
    }

    /// Finds the live token a name (and tenant) or an id refers to (the tests' view of what
    /// `rotate_ref` and `revoke_ref` resolve).
    #[cfg(test)]
    fn resolve(&self, name_or_id: &str, tenant: Option<&str>) -> Result<StoredToken, StoreError> {
        let (name_or_id, tenant) = (name_or_id.to_owned(), tenant.map(str::to_owned));
        self.read(move |tx| resolve_in(tx, &name_or_id, tenant.as_deref()))
    }

    /// Rotates the token a name or id refers to, resolved in the same transaction (so a
    /// concurrent revoke or rotate is ordered before or after it, never between).
    pub(crate) fn rotate_ref(
        &self,
        name_or_id: &str,
        tenant: Option<&str>,
        grace: Duration,
        now: i64,
    ) -> Result<(StoredToken, String), StoreError> {
        let (name_or_id, tenant) = (name_or_id.to_owned(), tenant.map(str::to_owned));
        self.write(move |tx| {
            let old = resolve_in(tx, &name_or_id, tenant.as_deref())?;
            rotate_in(tx, &old, grace, now)
        })
    }

    /// Revokes the token a name or id refers to, resolved in the same transaction.
    pub(crate) fn revoke_ref(
        &self,
        name_or_id: &str,
        tenant: Option<&str>,
        now: i64,
    ) -> Result<StoredToken, StoreError> {
        let (name_or_id, tenant) = (name_or_id.to_owned(), tenant.map(str::to_owned));
        self.write(move |tx| {
            let t = resolve_in(tx, &name_or_id, tenant.as_deref())?;
            revoke_in(tx, &t.id, now)
        })
    }

    /// Replaces a token's secret: a new token with the same name and grants; the old one keeps
    /// working until `now + grace`, then stops by itself.
    pub(crate) fn rotate(&self, id: &str, grace: Duration, now: i64) -> Result<(StoredToken, String), StoreError> {
        let id = id.to_owned();
        self.write(move |tx| {
            let old = token_by_id(tx, &id)?.ok_or_else(|| StoreError::Invalid(format!("no token {id}")))?;
            rotate_in(tx, &old, grace, now)
        })
    }

    /// Revokes a token (the row stays).
    pub(crate) fn revoke(&self, id: &str, now: i64) -> Result<StoredToken, StoreError> {
        let id = id.to_owned();
        self.write(move |tx| revoke_in(tx, &id, now))
    }

    /// Records when tokens were last used (a batch, at most once a minute per token). Not a
    /// change that matters to authentication: the version stays.
    pub(crate) fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let used = used.to_vec();
        self.transact(true, move |tx| {
            for (id, at) in &used {
                tx.exec(
                    "UPDATE tokens SET last_used_at = ?1 WHERE id = ?2 AND (last_used_at IS NULL OR last_used_at < ?1)",
                    args![*at, id],
                )?;
            }
            Ok(())
        })
    }

    /// Registers an OAuth client; refused past `max` clients.
    pub(crate) fn oauth_add_client(&self, c: &OAuthClient, max: usize, now: i64) -> Result<(), StoreError> {
        let uris = serde_json::to_string(&c.redirect_uris).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let c = c.clone();
        self.write(move |tx| {
            let n = tx.int("SELECT COUNT(*) FROM oauth_clients", &[])?;
            if usize::try_from(n).unwrap_or(usize::MAX) >= max {
                return Err(StoreError::Invalid("too many registered clients".into()));
            }
            tx.exec(
                "INSERT INTO oauth_clients (client_id, name, redirect_uris, created_at) VALUES (?1, ?2, ?3, ?4)",
                args![&c.client_id, &c.name, &uris, now],
            )?;
            Ok(())
        })
    }

    /// A registered OAuth client.
    pub(crate) fn oauth_client(&self, client_id: &str) -> Result<Option<OAuthClient>, StoreError> {
        let client_id = client_id.to_owned();
        self.read(move |tx| {
            let Some(r) = tx.row(
                "SELECT client_id, name, redirect_uris FROM oauth_clients WHERE client_id = ?1",
                args![&client_id],
            )?
            else {
                return Ok(None);
            };
            Ok(Some(OAuthClient {
                client_id: r.text(0)?,
                name: r.text(1)?,
                redirect_uris: serde_json::from_str(&r.text(2)?).unwrap_or_default(),
            }))
        })
    }

    /// Issues an access token and a refresh token for `grant` (a login, or a refresh of its
    /// family), in one transaction.
    pub(crate) fn oauth_issue(
        &self,
        grant: &OAuthGrant,
        access_ttl: Duration,
        refresh_ttl: Duration,
        now: i64,
    ) -> Result<Issued, StoreError> {
        let fresh = Fresh::new()?;
        let grant = grant.clone();
        self.write(move |tx| issue_in(tx, &grant, fresh, (access_ttl, refresh_ttl), now))
    }

    /// Uses a refresh token: marks it used and issues the next pair of its family, if
    /// `still_valid` says the login behind it still holds (asked before the transaction, which
    /// then holds nothing else up). A token used before revokes its whole family (access tokens
    /// included); so does a login that no longer holds.
    pub(crate) fn oauth_refresh(
        &self,
        refresh_secret: &str,
        client_id: &str,
        ttls: (Duration, Duration),
        now: i64,
        still_valid: impl FnOnce(&OAuthGrant) -> bool,
    ) -> Result<Issued, RefreshError> {
        const SELECT: &str = "SELECT family, client_id, audience, login, name, tenant, grants, expires_at, used_at, \
                              revoked_at FROM oauth_refresh WHERE digest = ?1";
        fn refresh_row(r: &Row) -> Result<(OAuthGrant, i64, Option<i64>, Option<i64>), StoreError> {
            Ok((
                OAuthGrant {
                    family: r.text(0)?,
                    client_id: r.text(1)?,
                    audience: r.text(2)?,
                    login: r.text(3)?,
                    name: r.text(4)?,
                    tenant: r.text(5)?,
                    grants: serde_json::from_str(&r.text(6)?).unwrap_or_default(),
                },
                r.int(7)?,
                r.opt_int(8)?,
                r.opt_int(9)?,
            ))
        }
        let digest = crate::credentials::digest(refresh_secret);
        let Some((grant, ..)) =
            self.read(move |tx| tx.row(SELECT, args![&digest])?.as_ref().map(refresh_row).transpose())?
        else {
            return Err(RefreshError::Invalid);
        };
        let holds = still_valid(&grant);
        let (fresh, client_id) = (Fresh::new()?, client_id.to_owned());
        self.write(move |tx| {
            let Some((grant, expires_at, used_at, revoked_at)) =
                tx.row(SELECT, args![&digest])?.as_ref().map(refresh_row).transpose()?
            else {
                return Ok(Err(RefreshError::Invalid));
            };
            if used_at.is_some() {
                revoke_family_in(tx, &grant.family, now)?;
                return Ok(Err(RefreshError::Reused));
            }
            if revoked_at.is_some() || expires_at <= now || grant.client_id != client_id {
                return Ok(Err(RefreshError::Invalid));
            }
            if !holds {
                revoke_family_in(tx, &grant.family, now)?;
                return Ok(Err(RefreshError::Invalid));
            }
            tx.exec("UPDATE oauth_refresh SET used_at = ?1 WHERE digest = ?2", args![now, &digest])?;
            issue_in(tx, &grant, fresh, ttls, now).map(Ok)
        })?
    }

    /// Revokes a refresh family (a code exchanged twice).
    pub(crate) fn oauth_revoke_family(&self, family: &str, now: i64) -> Result<(), StoreError> {
        let family = family.to_owned();
        self.write(move |tx| revoke_family_in(tx, &family, now))
    }

    /// Revokes what a secret is (RFC 7009): a refresh token's whole family, or one access token
    /// of the authorization server. Anything else changes nothing.
    pub(crate) fn oauth_revoke(&self, secret: &str, now: i64) -> Result<(), StoreError> {
        let digest = crate::credentials::digest(secret);
        self.write(move |tx| {
            if let Some(r) = tx.row("SELECT family FROM oauth_refresh WHERE digest = ?1", args![&digest])? {
                return revoke_family_in(tx, &r.text(0)?, now);
            }
            tx.exec(
                "UPDATE tokens SET revoked_at = ?1 WHERE digest = ?2 AND client_id IS NOT NULL AND revoked_at IS NULL",
                args![now, &digest],
            )?;
            Ok(())
        })
    }

    /// Whether `login` consented to `client_id` for `resource` (then the consent's last use
    /// is now).
    pub(crate) fn oauth_consented(
        &self,
        login: &str,
        client_id: &str,
        resource: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (login, client_id, resource) = (login.to_owned(), client_id.to_owned(), resource.to_owned());
        self.transact(true, move |tx| {
            Ok(tx.exec(
                "UPDATE oauth_consents SET used_at = ?1 WHERE login = ?2 AND client_id = ?3 AND resource = ?4",
                args![now, &login, &client_id, &resource],
            )? > 0)
        })
    }

    /// Remembers a consent (one per person, client and resource: a newer one replaces it).
    pub(crate) fn oauth_consent(&self, c: &Consent) -> Result<(), StoreError> {
        let c = c.clone();
        self.write(move |tx| {
            tx.exec(
                "INSERT INTO oauth_consents (id, login, name, tenant, client_id, client_name, resource, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (login, client_id, resource) DO UPDATE SET \
                 name = excluded.name, client_name = excluded.client_name, created_at = excluded.created_at",
                args![&c.id, &c.login, &c.name, &c.tenant, &c.client_id, &c.client_name, &c.resource, c.created_at],
            )?;
            Ok(())
        })
    }

    /// Every remembered consent, oldest first.
    pub(crate) fn oauth_consents(&self) -> Result<Vec<Consent>, StoreError> {
        self.read(consents_in)
    }

    /// Withdraws a consent: forgets it and revokes every token family that person's sign-ins
    /// gave that client for that resource (their sessions end with the next poll).
    pub(crate) fn oauth_withdraw(&self, id: &str, tenant: Option<&str>, now: i64) -> Result<Consent, StoreError> {
        let (id, tenant) = (id.to_owned(), tenant.map(str::to_owned));
        self.write(move |tx| {
            let found =
                consents_in(tx)?.into_iter().find(|c| c.id == id && tenant.as_deref().is_none_or(|t| c.tenant == t));
            let Some(c) = found else { return Err(StoreError::Invalid(format!("no consent {id:?}"))) };
            tx.exec("DELETE FROM oauth_consents WHERE id = ?1", args![&c.id])?;
            let families = tx.rows(
                "SELECT DISTINCT family FROM oauth_refresh WHERE login = ?1 AND client_id = ?2 AND audience = ?3",
                args![&c.login, &c.client_id, &c.resource],
            )?;
            for f in families {
                revoke_family_in(tx, &f.text(0)?, now)?;
            }
            Ok(c)
        })
    }

    /// The account of `subject` at `server`.
    pub(crate) fn upstream_account(&self, server: &str, subject: &str) -> Result<Option<UpstreamAccount>, StoreError> {
        let (server, subject) = (server.to_owned(), subject.to_owned());
        self.read(move |tx| {
            tx.row(
                "SELECT server, subject, name, issuer, token_endpoint, client_id, sealed, expires_at, scope, state, \
                 updated_at FROM upstream_accounts WHERE server = ?1 AND subject = ?2",
                args![&server, &subject],
            )?
            .as_ref()
            .map(account_row)
            .transpose()
        })
    }

    /// How many identities' accounts a server has: (active, needing a login).
    pub(crate) fn upstream_account_counts(&self, server: &str) -> Result<(u64, u64), StoreError> {
        let server = server.to_owned();
        self.read(move |tx| {
            let r = tx
                .row(
                    "SELECT COALESCE(SUM(CASE WHEN state = 'needs_login' THEN 0 ELSE 1 END), 0), \
                     COALESCE(SUM(CASE WHEN state = 'needs_login' THEN 1 ELSE 0 END), 0) \
                     FROM upstream_accounts WHERE server = ?1 AND subject != ''",
                    args![&server],
                )?
                .unwrap_or_default();
            Ok((r.int(0)?.unsigned_abs(), r.int(1)?.unsigned_abs()))
        })
    }

    /// Saves an account (replacing the one of the same server and subject).
    pub(crate) fn upstream_save(&self, a: &UpstreamAccount) -> Result<(), StoreError> {
        let a = a.clone();
        self.write(move |tx| {
            tx.exec(
                "INSERT INTO upstream_accounts (server, subject, name, issuer, token_endpoint, client_id, sealed, \
                 expires_at, scope, state, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) \
                 ON CONFLICT (server, subject) DO UPDATE SET name = excluded.name, issuer = excluded.issuer, \
                 token_endpoint = excluded.token_endpoint, client_id = excluded.client_id, sealed = excluded.sealed, \
                 expires_at = excluded.expires_at, scope = excluded.scope, state = excluded.state, \
                 updated_at = excluded.updated_at",
                args![
                    &a.server,
                    &a.subject,
                    &a.name,
                    &a.issuer,
                    &a.token_endpoint,
                    &a.client_id,
                    &a.sealed,
                    a.expires_at,
                    a.scope.as_deref(),
                    &a.state,
                    a.updated_at
                ],
            )?;
            Ok(())
        })
    }

    /// Marks an account as needing a new login (its refresh was refused), unless it changed
    /// since `seen` (a login meanwhile). Whether it was marked.
    pub(crate) fn upstream_needs_login(
        &self,
        server: &str,
        subject: &str,
        seen: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (server, subject) = (server.to_owned(), subject.to_owned());
        self.write(move |tx| {
            Ok(tx.exec(
                "UPDATE upstream_accounts SET state = 'needs_login', updated_at = ?1 \
                 WHERE server = ?2 AND subject = ?3 AND updated_at = ?4",
                args![now, &server, &subject, seen],
            )? > 0)
        })
    }

    /// Marks an account as needing a new login for wider scopes: `scope` is what that login
    /// must ask for.
    pub(crate) fn upstream_wants_scope(
        &self,
        server: &str,
        subject: &str,
        scope: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        let (server, subject, scope) = (server.to_owned(), subject.to_owned(), scope.to_owned());
        self.write(move |tx| {
            tx.exec(
                "UPDATE upstream_accounts SET state = 'needs_login', scope = ?1, updated_at = ?2 \
                 WHERE server = ?3 AND subject = ?4",
                args![&scope, now, &server, &subject],
            )?;
            Ok(())
        })
    }

    /// Forgets an account. Whether there was one.
    pub(crate) fn upstream_forget(&self, server: &str, subject: &str) -> Result<bool, StoreError> {
        let (server, subject) = (server.to_owned(), subject.to_owned());
        self.write(move |tx| {
            Ok(tx.exec("DELETE FROM upstream_accounts WHERE server = ?1 AND subject = ?2", args![&server, &subject])?
                > 0)
        })
    }

    /// The registration Portcullis made for `server` at `issuer`.
    pub(crate) fn upstream_client(&self, server: &str, issuer: &str) -> Result<Option<UpstreamClient>, StoreError> {
        let (server, issuer) = (server.to_owned(), issuer.to_owned());
        self.read(move |tx| {
            let Some(r) = tx.row(
                "SELECT server, issuer, client_id, sealed_secret FROM upstream_clients WHERE server = ?1 AND issuer = ?2",
                args![&server, &issuer],
            )?
            else {
                return Ok(None);
            };
            Ok(Some(UpstreamClient {
                server: r.text(0)?,
                issuer: r.text(1)?,
                client_id: r.text(2)?,
                sealed_secret: r.opt_blob(3)?,
            }))
        })
    }

    /// Remembers a registration.
    pub(crate) fn upstream_save_client(&self, c: &UpstreamClient, now: i64) -> Result<(), StoreError> {
        let c = c.clone();
        self.write(move |tx| {
            tx.exec(
                "INSERT INTO upstream_clients (server, issuer, client_id, sealed_secret, registered_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (server, issuer) DO UPDATE SET \
                 client_id = excluded.client_id, sealed_secret = excluded.sealed_secret, \
                 registered_at = excluded.registered_at",
                args![&c.server, &c.issuer, &c.client_id, c.sealed_secret.as_ref(), now],
            )?;
            Ok(())
        })
    }

    /// Records that sessions ended for good (by their ids' digests), until `expires_at`; the
    /// records past their time go. A change: every replica ends the session it holds.
    pub(crate) fn session_delete(&self, digests: &[[u8; 32]], expires_at: i64, now: i64) -> Result<(), StoreError> {
        let digests = digests.to_vec();
        self.write(move |tx| {
            tx.exec("DELETE FROM deleted_sessions WHERE expires_at <= ?1", args![now])?;
            for digest in &digests {
                tx.exec(
                    "INSERT INTO deleted_sessions (digest, deleted_at, expires_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (digest) DO NOTHING",
                    args![digest, now, expires_at],
                )?;
            }
            Ok(())
        })
    }

    /// The digests of sessions deleted at or after `since` (Unix ms).
    pub(crate) fn sessions_deleted_since(&self, since: i64) -> Result<Vec<[u8; 32]>, StoreError> {
        self.read(move |tx| {
            tx.rows("SELECT digest FROM deleted_sessions WHERE deleted_at >= ?1", args![since])?
                .iter()
                .map(|r| r.blob(0).map(|b| <[u8; 32]>::try_from(b.as_slice()).unwrap_or_default()))
                .collect()
        })
    }

    /// Whether a client deleted the session whose id has this digest.
    pub(crate) fn session_deleted(&self, digest: &[u8; 32]) -> Result<bool, StoreError> {
        let digest = *digest;
        self.read(move |tx| Ok(tx.row("SELECT 1 FROM deleted_sessions WHERE digest = ?1", args![&digest])?.is_some()))
    }

    /// Keeps `data` under (`kind`, `key`) until `expires_at`: what a browser's next request (on
    /// any replica) continues from. What was there is replaced when `replace`, else it stays
    /// and the answer is [`Put::There`] (of adders racing on any replicas, one gets
    /// [`Put::Kept`]). Expired rows of every kind go first; [`Put::Full`] (nothing kept) when
    /// `max` live rows of the kind are held. Not a change: nobody's view of the store moves.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn held_put(
        &self,
        kind: &'static str,
        key: &[u8; 32],
        data: &str,
        expires_at: i64,
        max: i64,
        now: i64,
        replace: bool,
    ) -> Result<Put, StoreError> {
        let (key, data) = (*key, data.to_owned());
        self.transact(true, move |tx| {
            tx.exec("DELETE FROM held WHERE expires_at <= ?1", args![now])?;
            let there = tx.row("SELECT 1 FROM held WHERE kind = ?1 AND key = ?2", args![kind, &key])?.is_some();
            if there && !replace {
                return Ok(Put::There);
            }
            if !there && tx.int("SELECT COUNT(*) FROM held WHERE kind = ?1", args![kind])? >= max {
                return Ok(Put::Full);
            }
            let conflict = if replace {
                "DO UPDATE SET data = excluded.data, expires_at = excluded.expires_at"
            } else {
                "DO NOTHING"
            };
            let n = tx.exec(
                &format!(
                    "INSERT INTO held (kind, key, data, expires_at) VALUES (?1, ?2, ?3, ?4) \
                     ON CONFLICT (kind, key) {conflict}"
                ),
                args![kind, &key, &data, expires_at],
            )?;
            Ok(if n == 1 { Put::Kept } else { Put::There })
        })
    }

    /// What is held under (`kind`, `key`), unless it expired.
    pub(crate) fn held_get(&self, kind: &'static str, key: &[u8; 32], now: i64) -> Result<Option<String>, StoreError> {
        let key = *key;
        self.read(move |tx| {
            tx.row("SELECT data FROM held WHERE kind = ?1 AND key = ?2 AND expires_at > ?3", args![kind, &key, now])?
                .map(|r| r.text(0))
                .transpose()
        })
    }

    /// Takes what is held under (`kind`, `key`): its data, to exactly one taker (of any number
    /// on any replica), unless it expired.
    pub(crate) fn held_take(&self, kind: &'static str, key: &[u8; 32], now: i64) -> Result<Option<String>, StoreError> {
        let key = *key;
        self.transact(true, move |tx| {
            let found = tx
                .row("SELECT data FROM held WHERE kind = ?1 AND key = ?2 AND expires_at > ?3", args![kind, &key, now])?
                .map(|r| r.text(0))
                .transpose()?;
            // Only the taker whose delete removed the row has it.
            let taken = tx.exec("DELETE FROM held WHERE kind = ?1 AND key = ?2", args![kind, &key])? == 1;
            Ok(found.filter(|_| taken))
        })
    }

    /// Replaces the data under (`kind`, `key`) with `new` if it is still `old`: whether this
    /// caller's replacement is the one made (of any number racing on any replica).
    pub(crate) fn held_swap(
        &self,
        kind: &'static str,
        key: &[u8; 32],
        old: &str,
        new: &str,
    ) -> Result<bool, StoreError> {
        let (key, old, new) = (*key, old.to_owned(), new.to_owned());
        self.transact(true, move |tx| {
            Ok(tx.exec(
                "UPDATE held SET data = ?1 WHERE kind = ?2 AND key = ?3 AND data = ?4",
                args![&new, kind, &key, &old],
            )? == 1)
        })
    }

    /// Writes SQLite's WAL back into the database file (nothing on PostgreSQL).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.backend.checkpoint()
    }
}

fn consents_in(tx: &mut dyn Tx) -> Result<Vec<Consent>, StoreError> {
    tx.rows(
        "SELECT id, login, name, tenant, client_id, client_name, resource, created_at, used_at \
         FROM oauth_consents ORDER BY created_at, id",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(Consent {
            id: r.text(0)?,
            login: r.text(1)?,
            name: r.text(2)?,
            tenant: r.text(3)?,
            client_id: r.text(4)?,
            client_name: r.text(5)?,
            resource: r.text(6)?,
            created_at: r.int(7)?,
            used_at: r.opt_int(8)?,
        })
    })
    .collect()
}

fn resolve_in(tx: &mut dyn Tx, name_or_id: &str, tenant: Option<&str>) -> Result<StoredToken, StoreError> {
    if name_or_id.starts_with("tok_") {
        return token_by_id(tx, name_or_id)?.ok_or_else(|| StoreError::Invalid(format!("no token {name_or_id}")));
    }
    let mut live = tx
        .rows(
            &format!("SELECT {COLUMNS} FROM tokens WHERE name = ?1 AND superseded_by IS NULL AND revoked_at IS NULL"),
            args![name_or_id],
        )?
        .iter()
        .map(token_row)
        .filter(|t| t.as_ref().map_or(true, |t| tenant.is_none_or(|want| t.tenant == want)))
        .collect::<Result<Vec<_>, _>>()?;
    if live.len() > 1 {
        return Err(StoreError::Invalid(format!(
            "several tenants have a token named {name_or_id:?}: give --tenant or the id ({})",
            live.iter().map(|t| t.id.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    live.pop().ok_or_else(|| {
        StoreError::Invalid(format!("no live token named {name_or_id:?}{}", tenant_suffix(tenant.unwrap_or(""))))
    })
}

/// What a new token is made of, drawn before its transaction (randomness can fail; a
/// transaction should not wait on it).
struct Fresh {
    id: String,
    secret: String,
    refresh: String,
}

impl Fresh {
    fn new() -> Result<Fresh, StoreError> {
        Ok(Fresh { id: new_id()?, secret: new_secret()?, refresh: new_secret()? })
    }
}

fn rotate_in(
    tx: &mut dyn Tx,
    old: &StoredToken,
    grace: Duration,
    now: i64,
) -> Result<(StoredToken, String), StoreError> {
    if old.revoked_at.is_some() || old.superseded_by.is_some() {
        return Err(StoreError::Invalid(format!("token {} is {:?} and cannot be rotated", old.id, old.state(now))));
    }
    let (new_id, secret) = (new_id()?, new_secret()?);
    tx.exec(
        "UPDATE tokens SET superseded_by = ?1, overlap_until = ?2 WHERE id = ?3",
        args![&new_id, ms_after(now, grace), &old.id],
    )?;
    let grants = serde_json::to_string(&old.grants).map_err(|e| StoreError::Invalid(e.to_string()))?;
    tx.exec(
        "INSERT INTO tokens (id, name, tenant, digest, prefix, grants, role, rate, created_at, expires_at, replaces, \
         lineage) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        args![
            &new_id,
            &old.name,
            &old.tenant,
            &crate::credentials::digest(&secret),
            &secret[..8],
            &grants,
            &old.role,
            old.rate.as_deref(),
            now,
            old.expires_at.map(|e| now.saturating_add(e - old.created_at)),
            &old.id,
            &old.lineage
        ],
    )?;
    let made = token_by_id(tx, &new_id)?.ok_or_else(|| StoreError::Unavailable("the new token is gone".into()))?;
    Ok((made, secret))
}

/// Revokes a token; revoking a revoked token changes nothing and succeeds (the request's
/// outcome, "this token no longer works", holds), so a retried revoke is safe.
fn revoke_in(tx: &mut dyn Tx, id: &str, now: i64) -> Result<StoredToken, StoreError> {
    tx.exec("UPDATE tokens SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL", args![now, id])?;
    let Some(t) = token_by_id(tx, id)? else { return Err(StoreError::Invalid(format!("no token {id}"))) };
    // The identity is gone once no token of its lineage lives: its upstream accounts go too.
    let lives = tx
        .row("SELECT 1 FROM tokens WHERE COALESCE(lineage, id) = ?1 AND revoked_at IS NULL LIMIT 1", args![&t.lineage])?
        .is_some();
    if !lives {
        tx.exec("DELETE FROM upstream_accounts WHERE subject = ?1", args![&format!("issued:{}", t.lineage)])?;
    }
    Ok(t)
}

/// Inserts an access token and a refresh token of `grant`'s family.
fn issue_in(
    tx: &mut dyn Tx,
    grant: &OAuthGrant,
    fresh: Fresh,
    (access_ttl, refresh_ttl): (Duration, Duration),
    now: i64,
) -> Result<Issued, StoreError> {
    let grants = serde_json::to_string(&grant.grants).map_err(|e| StoreError::Invalid(e.to_string()))?;
    let Fresh { id, secret, refresh } = fresh;
    // Unique among live tokens: the family's previous access token lives on until it expires.
    let name = format!("oauth:{}:{}", grant.name, &id[id.len().saturating_sub(8)..]);
    tx.exec(
        "INSERT INTO tokens (id, name, tenant, digest, prefix, grants, role, created_at, expires_at, lineage, audience, \
         client_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'user', ?7, ?8, ?9, ?10, ?11)",
        args![
            &id,
            &name,
            &grant.tenant,
            &crate::credentials::digest(&secret),
            &secret[..8],
            &grants,
            now,
            ms_after(now, access_ttl),
            &grant.family,
            &grant.audience,
            &grant.client_id
        ],
    )?;
    tx.exec(
        "INSERT INTO oauth_refresh (digest, family, client_id, audience, login, name, tenant, grants, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        args![
            &crate::credentials::digest(&refresh),
            &grant.family,
            &grant.client_id,
            &grant.audience,
            &grant.login,
            &grant.name,
            &grant.tenant,
            &grants,
            now,
            ms_after(now, refresh_ttl)
        ],
    )?;
    Ok(Issued { access_secret: secret, refresh_secret: refresh })
}

/// Revokes a refresh family: its refresh tokens and its access tokens.
fn revoke_family_in(tx: &mut dyn Tx, family: &str, now: i64) -> Result<(), StoreError> {
    tx.exec("UPDATE oauth_refresh SET revoked_at = ?1 WHERE family = ?2 AND revoked_at IS NULL", args![now, family])?;
    tx.exec(
        "UPDATE tokens SET revoked_at = ?1 WHERE lineage = ?2 AND client_id IS NOT NULL AND revoked_at IS NULL",
        args![now, family],
    )?;
    Ok(())
}

fn account_row(r: &Row) -> Result<UpstreamAccount, StoreError> {
    Ok(UpstreamAccount {
        server: r.text(0)?,
        subject: r.text(1)?,
        name: r.text(2)?,
        issuer: r.text(3)?,
        token_endpoint: r.text(4)?,
        client_id: r.text(5)?,
        sealed: r.blob(6)?,
        expires_at: r.opt_int(7)?,
        scope: r.opt_text(8)?,
        state: r.text(9)?,
        updated_at: r.int(10)?,
    })
}

fn tenant_suffix(tenant: &str) -> String {
    if tenant.is_empty() { String::new() } else { format!(" in tenant {tenant:?}") }
}

/// What a running gateway sees of the store: opened when its file exists (a `token create` in
/// another process may create it later), with a cache of lookups dropped whenever the store's
/// change counter moves (polled every 250 ms; on PostgreSQL also told at once when any replica
/// commits), and last-use times batched.
pub struct StoreView {
    at: StoreLocation,
    create: bool,
    store: Mutex<Option<Store>>,
    /// Woken when the database says a writer committed (PostgreSQL).
    changed: std::sync::Arc<tokio::sync::Notify>,
    version: std::sync::atomic::AtomicI64,
    state: std::sync::atomic::AtomicU8,
    by_digest: Sharded<[u8; 32], Option<std::sync::Arc<StoredToken>>>,
    by_id: Mutex<std::collections::HashMap<String, Option<std::sync::Arc<StoredToken>>>>,
    used: Sharded<String, i64>,
    written: Mutex<std::collections::HashMap<String, i64>>,
}

/// What the store says about authentication, as of the last poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreState {
    /// No store file (and none named), or one that holds no token: it adds no credential.
    Empty,
    /// It holds tokens (live or not): authentication is on.
    HasTokens,
    /// It exists but cannot be read: nothing can be confirmed, so requests get 503.
    Unavailable,
}

const STATE_EMPTY: u8 = 0;
const STATE_TOKENS: u8 = 1;
const STATE_UNAVAILABLE: u8 = 2;

/// Largest number of cached lookups (unknown digests included) before the cache is reset.
const CACHE_LIMIT: usize = 100_000;

impl StoreView {
    /// A view of the store at `path`; `create` opens (and creates) it at once. A store that
    /// cannot be read starts [`StoreState::Unavailable`]; see [`StoreView::open`] to refuse.
    pub fn new(at: StoreLocation, create: bool) -> std::sync::Arc<StoreView> {
        Self::build(at, create).0
    }

    /// Like [`StoreView::new`], but an error when the store exists (or is named) and cannot be
    /// opened or read: a gateway refuses to start on a store it cannot read.
    pub fn open(at: StoreLocation, create: bool) -> Result<std::sync::Arc<StoreView>, StoreError> {
        let (view, polled) = Self::build(at, create);
        polled.map(|_| view)
    }

    fn build(at: StoreLocation, create: bool) -> (std::sync::Arc<StoreView>, Result<bool, StoreError>) {
        let view = std::sync::Arc::new(StoreView {
            at,
            create,
            store: Mutex::new(None),
            changed: std::sync::Arc::new(tokio::sync::Notify::new()),
            version: std::sync::atomic::AtomicI64::new(-1),
            state: std::sync::atomic::AtomicU8::new(STATE_UNAVAILABLE),
            by_digest: Sharded::new(),
            by_id: Mutex::new(std::collections::HashMap::new()),
            used: Sharded::new(),
            written: Mutex::new(std::collections::HashMap::new()),
        });
        let polled = view.poll();
        (view, polled)
    }

    /// Where the store is.
    pub(crate) fn location(&self) -> &StoreLocation {
        &self.at
    }

    /// The store, opened (with a wait for another process's lock) when there is one to open.
    pub(crate) fn handle(&self) -> Result<Option<Store>, StoreError> {
        self.open_with(Store::open)
    }

    /// The store, opened for a write when there is none yet (a token issued, a client
    /// registered): created on first use, as `portcullis token create` creates it.
    pub(crate) fn writable(&self) -> Result<Store, StoreError> {
        match self.handle()? {
            Some(s) => Ok(s),
            None => Store::open(&self.at),
        }
    }

    fn open_with(&self, open: fn(&StoreLocation) -> Result<Store, StoreError>) -> Result<Option<Store>, StoreError> {
        let mut slot = lock(&self.store);
        if slot.is_none() && (self.create || self.at.exists()) {
            let store = open(&self.at)?;
            let changed = self.changed.clone();
            store.listen(std::sync::Arc::new(move || changed.notify_one()));
            *slot = Some(store);
        }
        Ok(slot.clone())
    }

    /// Notified when the database says some writer committed (never, on SQLite).
    pub(crate) fn announcements(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    /// Checks the change counter; on a change drops the caches. True when it changed. A store
    /// that cannot answer is [`StoreState::Unavailable`] until a later poll succeeds, and its
    /// caches are dropped, so nothing it said before is trusted meanwhile.
    pub(crate) fn poll(&self) -> Result<bool, StoreError> {
        let polled = self.poll_once();
        if polled.is_err() {
            self.fail();
        }
        polled
    }

    /// Trusts nothing the store said before: [`StoreState::Unavailable`] and no cached answer,
    /// until a poll succeeds (a poll that failed, or one that did not answer in time).
    pub(crate) fn fail(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.state.store(STATE_UNAVAILABLE, Relaxed);
        self.version.store(-1, Relaxed);
        self.by_digest.clear();
        lock(&self.by_id).clear();
        // A handle on a file that broke is dropped: the next poll opens it afresh. A database's
        // pool stays: its connections reconnect by themselves.
        if self.at.file().is_some() {
            *lock(&self.store) = None;
        }
    }

    fn poll_once(&self) -> Result<bool, StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(store) = self.handle()? else {
            self.state.store(STATE_EMPTY, Relaxed);
            return Ok(false);
        };
        let v = store.version()?;
        if self.version.load(Relaxed) == v && self.state.load(Relaxed) != STATE_UNAVAILABLE {
            return Ok(false);
        }
        self.by_digest.clear();
        lock(&self.by_id).clear();
        let any = store.has_any()?;
        self.version.store(v, Relaxed);
        self.state.store(if any { STATE_TOKENS } else { STATE_EMPTY }, Relaxed);
        Ok(true)
    }

    /// What the store said at the last poll.
    pub(crate) fn state(&self) -> StoreState {
        match self.state.load(std::sync::atomic::Ordering::Relaxed) {
            STATE_EMPTY => StoreState::Empty,
            STATE_TOKENS => StoreState::HasTokens,
            _ => StoreState::Unavailable,
        }
    }

    /// How many usable issued tokens the store holds (for the startup line).
    pub(crate) fn live_count(&self) -> Result<usize, StoreError> {
        let Some(store) = self.handle()? else { return Ok(0) };
        let now = now_ms();
        Ok(store.list()?.iter().filter(|t| t.usable(now)).count())
    }

    /// The token with a digest: a cache hit, or one indexed lookup.
    /// A hit costs a map probe and a reference count, no copy of the row.
    pub(crate) fn lookup(&self, digest: &[u8; 32]) -> Result<Option<std::sync::Arc<StoredToken>>, StoreError> {
        if let Some(hit) = lock(self.by_digest.shard(digest)).get(digest) {
            return Ok(hit.clone());
        }
        // On the request path a store not open yet is opened with one attempt, no retry pause
        // (a store busy migrating in another process answers 503 instead of holding the thread).
        let Some(store) = self.open_with(Store::open_now)? else { return Ok(None) };
        let found = store.lookup(digest)?.map(std::sync::Arc::new);
        let mut cache = lock(self.by_digest.shard(digest));
        if cache.len() >= CACHE_LIMIT / crate::sharded::SHARDS {
            cache.clear();
        }
        cache.insert(*digest, found.clone());
        Ok(found)
    }

    /// A token by id (cached until the next change).
    pub(crate) fn token(&self, id: &str) -> Result<Option<std::sync::Arc<StoredToken>>, StoreError> {
        if let Some(hit) = lock(&self.by_id).get(id) {
            return Ok(hit.clone());
        }
        let Some(store) = self.handle()? else { return Ok(None) };
        let found = match store.get(id) {
            Ok(t) => Some(std::sync::Arc::new(t)),
            Err(StoreError::Invalid(_)) => None,
            Err(e) => return Err(e),
        };
        lock(&self.by_id).insert(id.to_owned(), found.clone());
        Ok(found)
    }

    /// Notes a use (kept in memory).
    pub(crate) fn used(&self, id: &str, now: i64) {
        lock(self.used.shard(id)).insert(id.to_owned(), now);
    }

    /// Writes last-use times, each token at most once a minute.
    pub(crate) fn flush_used(&self, now: i64) -> Result<(), StoreError> {
        let due: Vec<(String, i64)> = {
            let used = self.used.entries();
            let written = lock(&self.written);
            used.into_iter().filter(|(id, at)| written.get(id).is_none_or(|w| now - w >= 60_000 && *at > *w)).collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        let Some(store) = self.handle()? else { return Ok(()) };
        store.touch(&due)?;
        let mut written = lock(&self.written);
        for (id, _) in due {
            written.insert(id, now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store of each kind, empty: an SQLite file in a directory of its own, and a schema of
    /// its own in the PostgreSQL database of `PORTCULLIS_TEST_POSTGRES` (default
    /// `postgres://127.0.0.1:5432/test`; `off` leaves PostgreSQL out, said on stderr). Each is
    /// removed when dropped.
    pub(crate) fn stores() -> Vec<TestStore> {
        let dir = std::env::temp_dir().join(format!("pcs-store-{}-{}", std::process::id(), new_id().unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = TestStore {
            store: Store::open(&StoreLocation::File(dir.join("t.db"))).unwrap(),
            at: StoreLocation::File(dir.join("t.db")),
            cleanup: Cleanup::Dir(dir),
        };
        let url = std::env::var("PORTCULLIS_TEST_POSTGRES").unwrap_or_else(|_| "postgres://127.0.0.1:5432/test".into());
        if url == "off" {
            eprintln!("PORTCULLIS_TEST_POSTGRES=off: the store's tests run on SQLite only");
            return vec![file];
        }
        let schema = format!("pcs_unit_{}", new_id().unwrap().trim_start_matches("tok_"));
        let mut admin = ::postgres::Client::connect(&url, ::postgres::NoTls).unwrap_or_else(|e| {
            panic!("PostgreSQL is not reachable at {url} ({e}): start it, point PORTCULLIS_TEST_POSTGRES at one, or set it to off")
        });
        admin.batch_execute(&format!("CREATE SCHEMA {schema}")).unwrap();
        let sep = if url.contains('?') { '&' } else { '?' };
        let at = StoreLocation::Postgres(format!("{url}{sep}options=-csearch_path%3D{schema}"));
        let pg = TestStore { store: Store::open(&at).unwrap(), at, cleanup: Cleanup::Schema(url, schema) };
        vec![file, pg]
    }

    pub(crate) enum Cleanup {
        Dir(PathBuf),
        Schema(String, String),
    }

    /// A store for one test, removed afterwards.
    pub(crate) struct TestStore {
        pub(crate) store: Store,
        #[allow(dead_code, reason = "for tests that open the store again by its location")]
        pub(crate) at: StoreLocation,
        cleanup: Cleanup,
    }

    impl std::ops::Deref for TestStore {
        type Target = Store;
        fn deref(&self) -> &Store {
            &self.store
        }
    }

    impl Drop for TestStore {
        fn drop(&mut self) {
            match &self.cleanup {
                Cleanup::Dir(d) => {
                    let _ = std::fs::remove_dir_all(d);
                }
                Cleanup::Schema(url, schema) => {
                    // On a thread of its own: a test may drop this on a runtime's thread.
                    let (url, schema) = (url.clone(), schema.clone());
                    let _ = std::thread::spawn(move || {
                        if let Ok(mut c) = ::postgres::Client::connect(&url, ::postgres::NoTls) {
                            let _ = c.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"));
                        }
                    })
                    .join();
                }
            }
        }
    }

    #[test]
    fn revoking_an_identity_removes_its_upstream_accounts_once_its_lineage_is_gone() {
        for s in stores() {
            let t0 = 1_000_000;
            let (bob, _) = s.create(&NewToken { name: "bob".into(), ..Default::default() }, t0).unwrap();
            let (rotated, _) = s.rotate(&bob.id, Duration::from_secs(60), t0 + 1).unwrap();
            let account = |subject: &str| UpstreamAccount {
                server: "up".into(),
                subject: subject.into(),
                name: "bob".into(),
                issuer: "https://as".into(),
                token_endpoint: "https://as/token".into(),
                client_id: "c".into(),
                sealed: vec![1, 2, 3],
                expires_at: None,
                scope: None,
                state: "active".into(),
                updated_at: t0,
            };
            let subject = format!("issued:{}", bob.id);
            s.upstream_save(&account(&subject)).unwrap();
            s.upstream_save(&account("config:alice")).unwrap();
            // The first secret of the lineage revoked: the rotated one lives, so does the account.
            s.revoke(&bob.id, t0 + 2).unwrap();
            assert!(s.upstream_account("up", &subject).unwrap().is_some());
            s.revoke(&rotated.id, t0 + 3).unwrap();
            assert!(s.upstream_account("up", &subject).unwrap().is_none(), "the identity is gone");
            assert!(s.upstream_account("up", "config:alice").unwrap().is_some(), "others' stay");
        }
    }

    #[test]
    fn create_rotate_with_grace_then_the_old_secret_stops() {
        for s in stores() {
            let t0 = 1_000_000;
            let (alice, secret) = s
                .create(
                    &NewToken { name: "alice".into(), ttl: Some(Duration::from_secs(3600)), ..Default::default() },
                    t0,
                )
                .unwrap();
            assert!(secret.starts_with("pcs_") && secret.len() == 47);
            assert_eq!(alice.prefix, &secret[..8]);
            assert!(s.create(&NewToken { name: "alice".into(), ..Default::default() }, t0).is_err(), "duplicate name");
            let (new, new_secret) = s.rotate(&alice.id, Duration::from_secs(60), t0 + 1000).unwrap();
            let old = s.lookup(&crate::credentials::digest(&secret)).unwrap().unwrap();
            let now_new = s.lookup(&crate::credentials::digest(&new_secret)).unwrap().unwrap();
            assert_eq!(now_new.id, new.id);
            // Inside the grace both work; after it only the new one.
            assert!(old.usable(t0 + 30_000) && now_new.usable(t0 + 30_000));
            assert!(!old.usable(t0 + 61_001) && now_new.usable(t0 + 61_001));
            assert_eq!(old.state(t0 + 61_001), TokenState::Superseded);
            // The new one expires when the old one would have, relative to its creation.
            assert!(!now_new.usable(t0 + 1000 + 3_600_000));
            let revoked = s.revoke(&new.id, t0 + 2000).unwrap();
            assert_eq!(revoked.state(t0 + 2000), TokenState::Revoked);
            // Revoking again changes nothing (the first revocation time stays) and succeeds.
            let again = s.revoke(&new.id, t0 + 3000).unwrap();
            assert_eq!(again.revoked_at, Some(t0 + 2000));
            assert!(s.revoke("tok_nope", t0 + 3000).is_err());
            // A revoked name can be issued again.
            s.create(&NewToken { name: "alice".into(), ..Default::default() }, t0 + 4000).unwrap();
        }
    }

    #[test]
    fn names_are_per_tenant_and_ambiguity_asks_for_one() {
        for s in stores() {
            s.create(&NewToken { name: "ci".into(), tenant: "a".into(), ..Default::default() }, 1).unwrap();
            s.create(&NewToken { name: "ci".into(), tenant: "b".into(), ..Default::default() }, 1).unwrap();
            let err = s.resolve("ci", None).unwrap_err().to_string();
            assert!(err.contains("--tenant"), "{err}");
            assert_eq!(s.resolve("ci", Some("b")).unwrap().tenant, "b");
            assert!(s.version().unwrap() >= 2);
        }
    }

    fn grant(family: &str) -> OAuthGrant {
        OAuthGrant {
            family: family.into(),
            client_id: "c1".into(),
            audience: "http://gw/mcp".into(),
            login: "issued:tok_x".into(),
            name: "alice".into(),
            tenant: String::new(),
            grants: StoredGrants::default(),
        }
    }

    #[test]
    fn refresh_tokens_rotate_and_a_reused_one_revokes_its_family() {
        for s in stores() {
            let ttls = (Duration::from_secs(60), Duration::from_secs(3600));
            let first = s.oauth_issue(&grant("fam1"), ttls.0, ttls.1, 1000).unwrap();
            let v0 = s.version().unwrap();
            let second = s.oauth_refresh(&first.refresh_secret, "c1", ttls, 2000, |_| true).unwrap();
            assert!(s.version().unwrap() > v0, "a refresh is a change");
            // Another client's, or a login that no longer holds: refused.
            assert!(matches!(
                s.oauth_refresh(&second.refresh_secret, "c2", ttls, 2001, |_| true),
                Err(RefreshError::Invalid)
            ));
            let access = s.lookup(&crate::credentials::digest(&second.access_secret)).unwrap().unwrap();
            assert_eq!((access.client_id.as_deref(), access.lineage.as_str()), (Some("c1"), "fam1"));
            // The first refresh token again: the whole family goes, access tokens included.
            assert!(matches!(
                s.oauth_refresh(&first.refresh_secret, "c1", ttls, 3000, |_| true),
                Err(RefreshError::Reused)
            ));
            assert!(!s.lookup(&crate::credentials::digest(&second.access_secret)).unwrap().unwrap().usable(3001));
            assert!(matches!(
                s.oauth_refresh(&second.refresh_secret, "c1", ttls, 3002, |_| true),
                Err(RefreshError::Invalid)
            ));
            // A login that no longer holds revokes the family too.
            let other = s.oauth_issue(&grant("fam2"), ttls.0, ttls.1, 4000).unwrap();
            assert!(matches!(
                s.oauth_refresh(&other.refresh_secret, "c1", ttls, 4001, |_| false),
                Err(RefreshError::Invalid)
            ));
            assert!(!s.lookup(&crate::credentials::digest(&other.access_secret)).unwrap().unwrap().usable(4002));
            // RFC 7009: revoking a refresh token revokes its family; unknown secrets change nothing.
            let third = s.oauth_issue(&grant("fam3"), ttls.0, ttls.1, 5000).unwrap();
            s.oauth_revoke("pcs_unknown", 5001).unwrap();
            assert!(s.lookup(&crate::credentials::digest(&third.access_secret)).unwrap().unwrap().usable(5002));
            s.oauth_revoke(&third.refresh_secret, 5003).unwrap();
            assert!(!s.lookup(&crate::credentials::digest(&third.access_secret)).unwrap().unwrap().usable(5004));
        }
    }

    #[test]
    fn concurrent_refreshes_of_one_token_issue_one_pair() {
        for s in stores() {
            let ttls = (Duration::from_secs(60), Duration::from_secs(3600));
            let first = s.oauth_issue(&grant("race"), ttls.0, ttls.1, 1000).unwrap();
            let outcomes: Vec<bool> = std::thread::scope(|scope| {
                let runs: Vec<_> = (0..4)
                    .map(|_| {
                        let (s, secret) = (&s.store, first.refresh_secret.clone());
                        scope.spawn(move || s.oauth_refresh(&secret, "c1", ttls, 2000, |_| true).is_ok())
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().unwrap()).collect()
            });
            // One wins; the others find it used and revoke the family (a reuse).
            assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 1, "{outcomes:?}");
        }
    }

    #[test]
    fn held_rows_are_capped_expire_and_go_to_one_taker_and_one_swapper() {
        for s in stores() {
            let (a, b, c) = ([1u8; 32], [2u8; 32], [3u8; 32]);
            let put =
                |kind, key, data, expires, now, replace| s.held_put(kind, key, data, expires, 2, now, replace).unwrap();
            assert_eq!(put("k", &a, "one", 5000, 1000, true), Put::Kept);
            assert_eq!(put("k", &b, "two", 5000, 1000, false), Put::Kept);
            assert_eq!(put("k", &c, "three", 5000, 1000, true), Put::Full, "the cap");
            assert_eq!(put("k", &a, "one again", 5000, 1000, true), Put::Kept, "a replacement is no new row");
            assert_eq!(put("k", &a, "not this", 5000, 1000, false), Put::There, "an add leaves it");
            assert_eq!(put("other", &c, "x", 5000, 1000, true), Put::Kept, "caps are per kind");
            assert_eq!(s.held_get("k", &a, 1000).unwrap().as_deref(), Some("one again"));
            assert_eq!(s.held_get("k", &a, 5000).unwrap(), None, "expired");
            assert_eq!(s.held_get("other", &a, 1000).unwrap(), None, "kinds are apart");

            let taken: Vec<Option<String>> = std::thread::scope(|scope| {
                let runs: Vec<_> = (0..4).map(|_| scope.spawn(|| s.store.held_take("k", &b, 1000).unwrap())).collect();
                runs.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert_eq!(taken.iter().flatten().collect::<Vec<_>>(), vec!["two"], "{taken:?}");

            let swapped: Vec<bool> = std::thread::scope(|scope| {
                let runs: Vec<_> = (0..4)
                    .map(|i| {
                        let store = &s.store;
                        scope.spawn(move || store.held_swap("k", &a, "one again", &format!("used by {i}")).unwrap())
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert_eq!(swapped.iter().filter(|w| **w).count(), 1, "{swapped:?}");
            assert!(s.held_get("k", &a, 1000).unwrap().is_some_and(|d| d.starts_with("used by ")));
            // Past their time, rows make room.
            assert_eq!(put("k", &c, "three", 9000, 6000, false), Put::Kept);
            // Of adders racing, one keeps its row.
            let added: Vec<Put> = std::thread::scope(|scope| {
                let runs: Vec<_> = (0..4)
                    .map(|_| scope.spawn(|| s.store.held_put("add", &a, "mine", 9000, 10, 6000, false).unwrap()))
                    .collect();
                runs.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert_eq!(added.iter().filter(|p| **p == Put::Kept).count(), 1, "{added:?}");
        }
    }

    #[test]
    fn consents_are_remembered_once_and_withdrawing_revokes_what_they_gave() {
        for s in stores() {
            let consent = |id: &str, at: i64| Consent {
                id: id.into(),
                login: "issued:tok_x".into(),
                name: "alice".into(),
                tenant: "t".into(),
                client_id: "c1".into(),
                client_name: "Client".into(),
                resource: "http://gw/mcp".into(),
                created_at: at,
                used_at: None,
            };
            assert!(!s.oauth_consented("issued:tok_x", "c1", "http://gw/mcp", 1).unwrap());
            s.oauth_consent(&consent("cs1", 10)).unwrap();
            s.oauth_consent(&consent("cs2", 20)).unwrap();
            let all = s.oauth_consents().unwrap();
            assert_eq!(all.len(), 1, "one per person, client and resource");
            assert_eq!((all[0].id.as_str(), all[0].created_at), ("cs1", 20));
            assert!(s.oauth_consented("issued:tok_x", "c1", "http://gw/mcp", 30).unwrap());
            assert_eq!(s.oauth_consents().unwrap()[0].used_at, Some(30));
            let issued = s.oauth_issue(&grant("famc"), Duration::from_secs(60), Duration::from_secs(60), 40).unwrap();
            assert!(s.oauth_withdraw("cs1", Some("other"), 50).is_err(), "another tenant's");
            s.oauth_withdraw("cs1", Some("t"), 50).unwrap();
            assert!(s.oauth_consents().unwrap().is_empty());
            assert!(!s.lookup(&crate::credentials::digest(&issued.access_secret)).unwrap().unwrap().usable(51));
            // Clients: registered up to a bound.
            let client = |id: &str| OAuthClient {
                client_id: id.into(),
                name: "n".into(),
                redirect_uris: vec!["http://127.0.0.1/cb".into()],
            };
            s.oauth_add_client(&client("a"), 2, 1).unwrap();
            s.oauth_add_client(&client("b"), 2, 1).unwrap();
            assert!(s.oauth_add_client(&client("c"), 2, 1).is_err());
            assert_eq!(s.oauth_client("a").unwrap(), Some(client("a")));
            assert_eq!(s.oauth_client("zz").unwrap(), None);
        }
    }

    #[test]
    fn upstream_accounts_and_registrations_are_replaced_counted_and_marked() {
        for s in stores() {
            let account = |subject: &str, at: i64| UpstreamAccount {
                server: "up".into(),
                subject: subject.into(),
                name: "n".into(),
                issuer: "https://as".into(),
                token_endpoint: "https://as/token".into(),
                client_id: "c".into(),
                sealed: vec![0, 1, 255],
                expires_at: Some(at + 1),
                scope: None,
                state: "active".into(),
                updated_at: at,
            };
            s.upstream_save(&account("", 1)).unwrap();
            s.upstream_save(&account("", 2)).unwrap();
            s.upstream_save(&account("config:a", 2)).unwrap();
            s.upstream_save(&account("config:b", 2)).unwrap();
            assert_eq!(s.upstream_account("up", "").unwrap(), Some(account("", 2)));
            assert_eq!(s.upstream_account_counts("up").unwrap(), (2, 0), "the shared account is not a person's");
            assert!(!s.upstream_needs_login("up", "config:a", 1, 3).unwrap(), "changed since");
            assert!(s.upstream_needs_login("up", "config:a", 2, 3).unwrap());
            s.upstream_wants_scope("up", "config:b", "read write", 4).unwrap();
            assert_eq!(s.upstream_account("up", "config:b").unwrap().unwrap().scope.as_deref(), Some("read write"));
            assert_eq!(s.upstream_account_counts("up").unwrap(), (0, 2));
            assert!(s.upstream_forget("up", "config:a").unwrap());
            assert!(!s.upstream_forget("up", "config:a").unwrap());
            let reg = |id: &str| UpstreamClient {
                server: "up".into(),
                issuer: "https://as".into(),
                client_id: id.into(),
                sealed_secret: Some(vec![9]),
            };
            s.upstream_save_client(&reg("one"), 1).unwrap();
            s.upstream_save_client(&reg("two"), 2).unwrap();
            assert_eq!(s.upstream_client("up", "https://as").unwrap(), Some(reg("two")));
            // Last use: recorded, never moved back, and not a change.
            let (t, _) = s.create(&NewToken { name: "u".into(), ..Default::default() }, 1).unwrap();
            let v = s.version().unwrap();
            s.touch(&[(t.id.clone(), 50)]).unwrap();
            s.touch(&[(t.id.clone(), 40)]).unwrap();
            assert_eq!(s.get(&t.id).unwrap().last_used_at, Some(50));
            assert_eq!(s.version().unwrap(), v);
        }
    }

    #[test]
    fn sessions_ended_for_good_are_told_to_every_reader_until_they_expire() {
        for s in stores() {
            let (a, b) = ([1u8; 32], [2u8; 32]);
            let v = s.version().unwrap();
            s.session_delete(&[a], 10_000, 1_000).unwrap();
            assert!(s.version().unwrap() > v, "a change, announced");
            s.session_delete(&[a, b], 20_000, 2_000).unwrap();
            assert!(s.session_deleted(&a).unwrap() && s.session_deleted(&b).unwrap());
            assert!(!s.session_deleted(&[3u8; 32]).unwrap());
            assert_eq!(s.sessions_deleted_since(1_500).unwrap(), vec![b]);
            // Past their time they go (with the next write).
            s.session_delete(&[], 0, 15_000).unwrap();
            assert!(!s.session_deleted(&a).unwrap() && s.session_deleted(&b).unwrap());
        }
    }
}
