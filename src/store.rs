//! The token store: issued tokens, held hashed in an embedded SQLite database (WAL), shared by
//! the gateway and the `token` subcommands (another process).
//!
//! Invariants: the store holds SHA-256 digests and a short display prefix, never a secret;
//! every change happens in one `BEGIN IMMEDIATE` transaction and bumps a version counter that
//! running gateways poll to drop caches and close revoked tokens' streams; a name is unique
//! among a tenant's tokens that are neither superseded nor revoked; a failed command changes
//! nothing. Times are Unix milliseconds and are passed in, so tests can move the clock.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

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

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
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

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    digest BLOB NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    grants TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT 'user',
    rate TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER,
    last_used_at INTEGER,
    replaces TEXT,
    superseded_by TEXT,
    overlap_until INTEGER
);
CREATE UNIQUE INDEX tokens_live_name ON tokens(tenant, name) WHERE superseded_by IS NULL AND revoked_at IS NULL;
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT INTO meta VALUES ('version', 0);
"#,
    r#"
ALTER TABLE tokens ADD COLUMN lineage TEXT;
WITH RECURSIVE chain(id, root) AS (
    SELECT id, id FROM tokens WHERE replaces IS NULL
    UNION ALL
    SELECT t.id, c.root FROM tokens t JOIN chain c ON t.replaces = c.id
)
UPDATE tokens SET lineage = (SELECT root FROM chain WHERE chain.id = tokens.id) WHERE replaces IS NOT NULL;
"#,
    r#"
ALTER TABLE tokens ADD COLUMN audience TEXT;
ALTER TABLE tokens ADD COLUMN client_id TEXT;
CREATE TABLE oauth_clients (
    client_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE TABLE oauth_refresh (
    digest BLOB PRIMARY KEY,
    family TEXT NOT NULL,
    client_id TEXT NOT NULL,
    audience TEXT NOT NULL,
    login TEXT NOT NULL,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    grants TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    used_at INTEGER,
    revoked_at INTEGER
);
CREATE INDEX oauth_refresh_family ON oauth_refresh(family);
"#,
    r#"
CREATE TABLE oauth_consents (
    id TEXT PRIMARY KEY,
    login TEXT NOT NULL,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_name TEXT NOT NULL,
    resource TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    used_at INTEGER,
    UNIQUE (login, client_id, resource)
);
"#,
    r#"
CREATE TABLE upstream_accounts (
    server TEXT NOT NULL,
    subject TEXT NOT NULL,
    name TEXT NOT NULL,
    issuer TEXT NOT NULL,
    token_endpoint TEXT NOT NULL,
    client_id TEXT NOT NULL,
    sealed BLOB NOT NULL,
    expires_at INTEGER,
    scope TEXT,
    state TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (server, subject)
);
CREATE TABLE upstream_clients (
    server TEXT NOT NULL,
    issuer TEXT NOT NULL,
    client_id TEXT NOT NULL,
    sealed_secret BLOB,
    registered_at INTEGER NOT NULL,
    PRIMARY KEY (server, issuer)
);
"#,
];

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

/// What Portcullis needs of a token store, whatever the database. SQLite implements it for one
/// node; a shared database (Postgres, for several replicas) would implement the same, and the
/// gateway, the CLI and the admin API would not change.
#[allow(
    dead_code,
    reason = "the seam for a shared store (replicas): every operation, though today the gateway calls only some through it"
)]
pub(crate) trait TokenStore: Send + Sync {
    /// The change counter (every write that matters to authentication bumps it).
    fn version(&self) -> Result<i64, StoreError>;
    /// Whether any token exists (then authentication is on).
    fn has_any(&self) -> Result<bool, StoreError>;
    /// Issues a token; returns it and its secret.
    fn create(&self, new: &NewToken, now: i64) -> Result<(StoredToken, String), StoreError>;
    /// Every token.
    fn list(&self) -> Result<Vec<StoredToken>, StoreError>;
    /// One token by id.
    fn get(&self, id: &str) -> Result<StoredToken, StoreError>;
    /// The token with a digest.
    fn lookup(&self, digest: &[u8; 32]) -> Result<Option<StoredToken>, StoreError>;
    /// Rotates by id with a grace.
    fn rotate(&self, id: &str, grace: Duration, now: i64) -> Result<(StoredToken, String), StoreError>;
    /// Revokes by id.
    fn revoke(&self, id: &str, now: i64) -> Result<StoredToken, StoreError>;
    /// Records last-use times.
    fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError>;
}

impl TokenStore for SqliteStore {
    fn version(&self) -> Result<i64, StoreError> {
        SqliteStore::version(self)
    }
    fn has_any(&self) -> Result<bool, StoreError> {
        Ok(lock(&self.conn).query_row("SELECT EXISTS(SELECT 1 FROM tokens)", [], |r| r.get(0))?)
    }
    fn create(&self, new: &NewToken, now: i64) -> Result<(StoredToken, String), StoreError> {
        SqliteStore::create(self, new, now)
    }
    fn list(&self) -> Result<Vec<StoredToken>, StoreError> {
        SqliteStore::list(self)
    }
    fn get(&self, id: &str) -> Result<StoredToken, StoreError> {
        SqliteStore::get(self, id)
    }
    fn lookup(&self, digest: &[u8; 32]) -> Result<Option<StoredToken>, StoreError> {
        SqliteStore::lookup(self, digest)
    }
    fn rotate(&self, id: &str, grace: Duration, now: i64) -> Result<(StoredToken, String), StoreError> {
        SqliteStore::rotate(self, id, grace, now)
    }
    fn revoke(&self, id: &str, now: i64) -> Result<StoredToken, StoreError> {
        SqliteStore::revoke(self, id, now)
    }
    fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        SqliteStore::touch(self, used)
    }
}

/// The SQLite store.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const COLUMNS: &str = "id, name, tenant, prefix, grants, role, rate, created_at, expires_at, revoked_at, \
                       last_used_at, replaces, superseded_by, overlap_until, COALESCE(lineage, id), audience, client_id";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredToken> {
    let grants: String = r.get(4)?;
    Ok(StoredToken {
        id: r.get(0)?,
        name: r.get(1)?,
        tenant: r.get(2)?,
        prefix: r.get(3)?,
        grants: serde_json::from_str(&grants).unwrap_or_default(),
        role: r.get(5)?,
        rate: r.get(6)?,
        created_at: r.get(7)?,
        expires_at: r.get(8)?,
        revoked_at: r.get(9)?,
        last_used_at: r.get(10)?,
        replaces: r.get(11)?,
        superseded_by: r.get(12)?,
        overlap_until: r.get(13)?,
        lineage: r.get(14)?,
        audience: r.get(15)?,
        client_id: r.get(16)?,
    })
}

impl SqliteStore {
    /// Opens (creating on first use) the store at `path`, in WAL mode, with migrations applied.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        // Switching to WAL and migrating need a moment alone with the file; another process
        // doing the same answers "locked" at once (no busy handler there), so retry briefly.
        let mut attempt = 0;
        loop {
            match Self::open_once(path) {
                Err(StoreError::Unavailable(m)) if m.contains("locked") && attempt < 50 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(20 + 10 * attempt));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &Path) -> Result<SqliteStore, StoreError> {
        // A new store is created readable by its owner only (SQLite gives the -wal and -shm
        // files the database file's mode): it holds digests and grants, nobody else's business.
        if !path.exists() {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists { Ok(std::fs::File::open(path)?) } else { Err(e) }
                })
                .map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| StoreError::Unavailable(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_millis(5000))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let store = SqliteStore { conn: Mutex::new(conn) };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        for (i, m) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
            tx.execute_batch(m)?;
            tx.pragma_update(None, "user_version", i64::try_from(i + 1).unwrap_or(i64::MAX))?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Runs `f` in one immediate transaction and bumps the change counter.
    fn write<T>(&self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.execute("UPDATE meta SET value = value + 1 WHERE key = 'version'", [])?;
        tx.commit()?;
        Ok(out)
    }

    /// The change counter (every write bumps it).
    pub(crate) fn version(&self) -> Result<i64, StoreError> {
        Ok(lock(&self.conn).query_row("SELECT value FROM meta WHERE key = 'version'", [], |r| r.get(0))?)
    }

    /// Issues a token; returns it and its secret (shown once).
    pub fn create(&self, new: &NewToken, now: i64) -> Result<(StoredToken, String), StoreError> {
        if new.name.trim().is_empty() {
            return Err(StoreError::Invalid("a token needs a name".into()));
        }
        let secret = new_secret()?;
        let id = new_id()?;
        let expires = new.ttl.map(|t| now.saturating_add(i64::try_from(t.as_millis()).unwrap_or(i64::MAX)));
        let role = new.role.name();
        let rate = new.rate.map(|r| r.to_string());
        let grants = serde_json::to_string(&new.grants).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.write(|tx| {
            let taken: bool = tx.query_row(
                "SELECT EXISTS(SELECT 1 FROM tokens WHERE tenant = ?1 AND name = ?2 AND superseded_by IS NULL AND revoked_at IS NULL)",
                params![new.tenant, new.name],
                |r| r.get(0),
            )?;
            if taken {
                return Err(StoreError::Invalid(format!("a token named {:?} already exists{}", new.name, tenant_suffix(&new.tenant))));
            }
            tx.execute(
                "INSERT INTO tokens (id, name, tenant, digest, prefix, grants, role, rate, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![id, new.name, new.tenant, crate::credentials::digest(&secret).to_vec(), &secret[..8], grants, role, rate, now, expires],
            )?;
            Ok(())
        })?;
        Ok((self.get(&id)?, secret))
    }

    /// Every token, newest first.
    pub(crate) fn list(&self) -> Result<Vec<StoredToken>, StoreError> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM tokens ORDER BY created_at DESC, id"))?;
        let rows = stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// One token by id.
    pub(crate) fn get(&self, id: &str) -> Result<StoredToken, StoreError> {
        let conn = lock(&self.conn);
        conn.query_row(&format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1"), params![id], row)
            .optional()?
            .ok_or_else(|| StoreError::Invalid(format!("no token {id}")))
    }

    /// The token with a secret's digest (one indexed lookup).
    pub fn lookup(&self, digest: &[u8; 32]) -> Result<Option<StoredToken>, StoreError> {
        let conn = lock(&self.conn);
        Ok(conn
            .query_row(&format!("SELECT {COLUMNS} FROM tokens WHERE digest = ?1"), params![digest.to_vec()], row)
            .optional()?)
    }

    /// Finds the live token a name (and tenant) or an id refers to (the tests' view of what
    /// `rotate_ref` and `revoke_ref` resolve).
    #[cfg(test)]
    fn resolve(&self, name_or_id: &str, tenant: Option<&str>) -> Result<StoredToken, StoreError> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        resolve_in(&tx, name_or_id, tenant)
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
        let secret = new_secret()?;
        let new_id = new_id()?;
        self.write(|tx| {
            let old = resolve_in(tx, name_or_id, tenant)?;
            rotate_in(tx, &old, &new_id, &secret, grace, now)
        })?;
        Ok((self.get(&new_id)?, secret))
    }

    /// Revokes the token a name or id refers to, resolved in the same transaction.
    pub(crate) fn revoke_ref(
        &self,
        name_or_id: &str,
        tenant: Option<&str>,
        now: i64,
    ) -> Result<StoredToken, StoreError> {
        let id = self.write(|tx| {
            let t = resolve_in(tx, name_or_id, tenant)?;
            revoke_in(tx, &t.id, now)?;
            Ok(t.id)
        })?;
        self.get(&id)
    }

    /// Replaces a token's secret: a new token with the same name and grants; the old one keeps
    /// working until `now + grace`, then stops by itself.
    pub(crate) fn rotate(&self, id: &str, grace: Duration, now: i64) -> Result<(StoredToken, String), StoreError> {
        let secret = new_secret()?;
        let new_id = new_id()?;
        self.write(|tx| {
            let old = tx
                .query_row(&format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1"), params![id], row)
                .optional()?
                .ok_or_else(|| StoreError::Invalid(format!("no token {id}")))?;
            rotate_in(tx, &old, &new_id, &secret, grace, now)
        })?;
        Ok((self.get(&new_id)?, secret))
    }

    /// Revokes a token (the row stays).
    pub(crate) fn revoke(&self, id: &str, now: i64) -> Result<StoredToken, StoreError> {
        self.write(|tx| revoke_in(tx, id, now))?;
        self.get(id)
    }

    /// Records when tokens were last used (a batch, at most once a minute per token).
    pub(crate) fn touch(&self, used: &[(String, i64)]) -> Result<(), StoreError> {
        if used.is_empty() {
            return Ok(());
        }
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for (id, at) in used {
            tx.execute(
                "UPDATE tokens SET last_used_at = MAX(COALESCE(last_used_at, 0), ?1) WHERE id = ?2",
                params![at, id],
            )?;
        }
        // Not a change that matters to authentication: the version stays.
        tx.commit()?;
        Ok(())
    }

    /// Registers an OAuth client; refused past `max` clients.
    pub(crate) fn oauth_add_client(&self, c: &OAuthClient, max: usize, now: i64) -> Result<(), StoreError> {
        let uris = serde_json::to_string(&c.redirect_uris).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.write(|tx| {
            let n: i64 = tx.query_row("SELECT COUNT(*) FROM oauth_clients", [], |r| r.get(0))?;
            if usize::try_from(n).unwrap_or(usize::MAX) >= max {
                return Err(StoreError::Invalid("too many registered clients".into()));
            }
            tx.execute(
                "INSERT INTO oauth_clients (client_id, name, redirect_uris, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![c.client_id, c.name, uris, now],
            )?;
            Ok(())
        })
    }

    /// A registered OAuth client.
    pub(crate) fn oauth_client(&self, client_id: &str) -> Result<Option<OAuthClient>, StoreError> {
        let conn = lock(&self.conn);
        let found = conn
            .query_row(
                "SELECT client_id, name, redirect_uris FROM oauth_clients WHERE client_id = ?1",
                params![client_id],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?)),
            )
            .optional()?;
        Ok(found.map(|(client_id, name, uris)| OAuthClient {
            client_id,
            name,
            redirect_uris: serde_json::from_str(&uris).unwrap_or_default(),
        }))
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
        let (id, access_secret, refresh_secret) = (new_id()?, new_secret()?, new_secret()?);
        self.write(|tx| issue_in(tx, grant, &id, &access_secret, &refresh_secret, access_ttl, refresh_ttl, now))?;
        Ok(Issued { access_secret, refresh_secret })
    }

    /// Uses a refresh token: marks it used and issues the next pair of its family, if
    /// `still_valid` says the login behind it still holds. A token used before revokes its whole
    /// family (access tokens included); so does a login that no longer holds.
    pub(crate) fn oauth_refresh(
        &self,
        refresh_secret: &str,
        client_id: &str,
        ttls: (Duration, Duration),
        now: i64,
        still_valid: impl FnOnce(&OAuthGrant) -> bool,
    ) -> Result<Issued, RefreshError> {
        let (access_ttl, refresh_ttl) = ttls;
        let digest = crate::credentials::digest(refresh_secret).to_vec();
        let (id, access_secret, next_secret) = (new_id()?, new_secret()?, new_secret()?);
        let outcome = self.write(|tx| {
            let row = tx
                .query_row(
                    "SELECT family, client_id, audience, login, name, tenant, grants, expires_at, used_at, revoked_at \
                     FROM oauth_refresh WHERE digest = ?1",
                    params![digest],
                    |r| {
                        Ok((
                            OAuthGrant {
                                family: r.get(0)?,
                                client_id: r.get(1)?,
                                audience: r.get(2)?,
                                login: r.get(3)?,
                                name: r.get(4)?,
                                tenant: r.get(5)?,
                                grants: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
                            },
                            r.get::<_, i64>(7)?,
                            r.get::<_, Option<i64>>(8)?,
                            r.get::<_, Option<i64>>(9)?,
                        ))
                    },
                )
                .optional()?;
            let Some((grant, expires_at, used_at, revoked_at)) = row else { return Ok(Err(RefreshError::Invalid)) };
            if used_at.is_some() {
                revoke_family_in(tx, &grant.family, now)?;
                return Ok(Err(RefreshError::Reused));
            }
            if revoked_at.is_some() || expires_at <= now || grant.client_id != client_id {
                return Ok(Err(RefreshError::Invalid));
            }
            if !still_valid(&grant) {
                revoke_family_in(tx, &grant.family, now)?;
                return Ok(Err(RefreshError::Invalid));
            }
            tx.execute("UPDATE oauth_refresh SET used_at = ?1 WHERE digest = ?2", params![now, digest])?;
            issue_in(tx, &grant, &id, &access_secret, &next_secret, access_ttl, refresh_ttl, now)?;
            Ok(Ok(()))
        })?;
        outcome?;
        Ok(Issued { access_secret, refresh_secret: next_secret })
    }

    /// Revokes a refresh family (a code exchanged twice).
    pub(crate) fn oauth_revoke_family(&self, family: &str, now: i64) -> Result<(), StoreError> {
        self.write(|tx| revoke_family_in(tx, family, now))
    }

    /// Revokes what a secret is (RFC 7009): a refresh token's whole family, or one access token
    /// of the authorization server. Anything else changes nothing.
    pub(crate) fn oauth_revoke(&self, secret: &str, now: i64) -> Result<(), StoreError> {
        let digest = crate::credentials::digest(secret).to_vec();
        self.write(|tx| {
            let family: Option<String> = tx
                .query_row("SELECT family FROM oauth_refresh WHERE digest = ?1", params![digest], |r| r.get(0))
                .optional()?;
            if let Some(f) = family {
                return revoke_family_in(tx, &f, now);
            }
            tx.execute(
                "UPDATE tokens SET revoked_at = ?1 WHERE digest = ?2 AND client_id IS NOT NULL AND revoked_at IS NULL",
                params![now, digest],
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
        let n = lock(&self.conn).execute(
            "UPDATE oauth_consents SET used_at = ?1 WHERE login = ?2 AND client_id = ?3 AND resource = ?4",
            params![now, login, client_id, resource],
        )?;
        Ok(n > 0)
    }

    /// Remembers a consent (one per person, client and resource: a newer one replaces it).
    pub(crate) fn oauth_consent(&self, c: &Consent) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO oauth_consents (id, login, name, tenant, client_id, client_name, resource, created_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (login, client_id, resource) DO UPDATE SET \
                 name = excluded.name, client_name = excluded.client_name, created_at = excluded.created_at",
                params![c.id, c.login, c.name, c.tenant, c.client_id, c.client_name, c.resource, c.created_at],
            )?;
            Ok(())
        })
    }

    /// Every remembered consent, oldest first.
    pub(crate) fn oauth_consents(&self) -> Result<Vec<Consent>, StoreError> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare(
            "SELECT id, login, name, tenant, client_id, client_name, resource, created_at, used_at \
             FROM oauth_consents ORDER BY created_at, id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(Consent {
                id: r.get(0)?,
                login: r.get(1)?,
                name: r.get(2)?,
                tenant: r.get(3)?,
                client_id: r.get(4)?,
                client_name: r.get(5)?,
                resource: r.get(6)?,
                created_at: r.get(7)?,
                used_at: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Withdraws a consent: forgets it and revokes every token family that person's sign-ins
    /// gave that client for that resource (their sessions end with the next poll).
    pub(crate) fn oauth_withdraw(&self, id: &str, tenant: Option<&str>, now: i64) -> Result<Consent, StoreError> {
        let found = self.oauth_consents()?.into_iter().find(|c| c.id == id && tenant.is_none_or(|t| c.tenant == t));
        let Some(c) = found else { return Err(StoreError::Invalid(format!("no consent {id:?}"))) };
        self.write(|tx| {
            tx.execute("DELETE FROM oauth_consents WHERE id = ?1", params![c.id])?;
            let mut stmt = tx.prepare(
                "SELECT DISTINCT family FROM oauth_refresh WHERE login = ?1 AND client_id = ?2 AND audience = ?3",
            )?;
            let families: Vec<String> =
                stmt.query_map(params![c.login, c.client_id, c.resource], |r| r.get(0))?.collect::<Result<_, _>>()?;
            for f in families {
                revoke_family_in(tx, &f, now)?;
            }
            Ok(())
        })?;
        Ok(c)
    }

    /// The account of `subject` at `server`.
    pub(crate) fn upstream_account(&self, server: &str, subject: &str) -> Result<Option<UpstreamAccount>, StoreError> {
        Ok(lock(&self.conn)
            .query_row(
                "SELECT server, subject, name, issuer, token_endpoint, client_id, sealed, expires_at, scope, state, updated_at \
                 FROM upstream_accounts WHERE server = ?1 AND subject = ?2",
                params![server, subject],
                account_row,
            )
            .optional()?)
    }

    /// How many identities' accounts a server has: (active, needing a login).
    pub(crate) fn upstream_account_counts(&self, server: &str) -> Result<(u64, u64), StoreError> {
        Ok(lock(&self.conn).query_row(
            "SELECT COALESCE(SUM(state != 'needs_login'), 0), COALESCE(SUM(state = 'needs_login'), 0) \
             FROM upstream_accounts WHERE server = ?1 AND subject != ''",
            params![server],
            |r| Ok((r.get::<_, i64>(0)?.unsigned_abs(), r.get::<_, i64>(1)?.unsigned_abs())),
        )?)
    }

    /// Saves an account (replacing the one of the same server and subject).
    pub(crate) fn upstream_save(&self, a: &UpstreamAccount) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO upstream_accounts (server, subject, name, issuer, token_endpoint, client_id, sealed, \
                 expires_at, scope, state, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    a.server,
                    a.subject,
                    a.name,
                    a.issuer,
                    a.token_endpoint,
                    a.client_id,
                    a.sealed,
                    a.expires_at,
                    a.scope,
                    a.state,
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
        self.write(|tx| {
            let n = tx.execute(
                "UPDATE upstream_accounts SET state = 'needs_login', updated_at = ?1 \
                 WHERE server = ?2 AND subject = ?3 AND updated_at = ?4",
                params![now, server, subject, seen],
            )?;
            Ok(n > 0)
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
        self.write(|tx| {
            tx.execute(
                "UPDATE upstream_accounts SET state = 'needs_login', scope = ?1, updated_at = ?2 \
                 WHERE server = ?3 AND subject = ?4",
                params![scope, now, server, subject],
            )?;
            Ok(())
        })
    }

    /// Forgets an account. Whether there was one.
    pub(crate) fn upstream_forget(&self, server: &str, subject: &str) -> Result<bool, StoreError> {
        self.write(|tx| {
            Ok(tx.execute(
                "DELETE FROM upstream_accounts WHERE server = ?1 AND subject = ?2",
                params![server, subject],
            )? > 0)
        })
    }

    /// The registration Portcullis made for `server` at `issuer`.
    pub(crate) fn upstream_client(&self, server: &str, issuer: &str) -> Result<Option<UpstreamClient>, StoreError> {
        Ok(lock(&self.conn)
            .query_row(
                "SELECT server, issuer, client_id, sealed_secret FROM upstream_clients WHERE server = ?1 AND issuer = ?2",
                params![server, issuer],
                |r| {
                    Ok(UpstreamClient {
                        server: r.get(0)?,
                        issuer: r.get(1)?,
                        client_id: r.get(2)?,
                        sealed_secret: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Remembers a registration.
    pub(crate) fn upstream_save_client(&self, c: &UpstreamClient, now: i64) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT OR REPLACE INTO upstream_clients (server, issuer, client_id, sealed_secret, registered_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![c.server, c.issuer, c.client_id, c.sealed_secret, now],
            )?;
            Ok(())
        })
    }

    /// Writes the WAL back into the database file.
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        lock(&self.conn).execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }
}

fn resolve_in(
    tx: &rusqlite::Transaction<'_>,
    name_or_id: &str,
    tenant: Option<&str>,
) -> Result<StoredToken, StoreError> {
    if name_or_id.starts_with("tok_") {
        return tx
            .query_row(&format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1"), params![name_or_id], row)
            .optional()?
            .ok_or_else(|| StoreError::Invalid(format!("no token {name_or_id}")));
    }
    let mut stmt = tx.prepare(&format!(
        "SELECT {COLUMNS} FROM tokens WHERE name = ?1 AND superseded_by IS NULL AND revoked_at IS NULL \
         AND (?2 IS NULL OR tenant = ?2)"
    ))?;
    let mut live = stmt.query_map(params![name_or_id, tenant], row)?.collect::<Result<Vec<_>, _>>()?;
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

fn rotate_in(
    tx: &rusqlite::Transaction<'_>,
    old: &StoredToken,
    new_id: &str,
    secret: &str,
    grace: Duration,
    now: i64,
) -> Result<(), StoreError> {
    if old.revoked_at.is_some() || old.superseded_by.is_some() {
        return Err(StoreError::Invalid(format!("token {} is {:?} and cannot be rotated", old.id, old.state(now))));
    }
    let until = now.saturating_add(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
    tx.execute(
        "UPDATE tokens SET superseded_by = ?1, overlap_until = ?2 WHERE id = ?3",
        params![new_id, until, old.id],
    )?;
    let grants = serde_json::to_string(&old.grants).map_err(|e| StoreError::Invalid(e.to_string()))?;
    tx.execute(
        "INSERT INTO tokens (id, name, tenant, digest, prefix, grants, role, rate, created_at, expires_at, replaces, \
         lineage) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            new_id,
            old.name,
            old.tenant,
            crate::credentials::digest(secret).to_vec(),
            &secret[..8],
            grants,
            old.role,
            old.rate,
            now,
            old.expires_at.map(|e| now.saturating_add(e - old.created_at)),
            old.id,
            old.lineage
        ],
    )?;
    Ok(())
}

/// Revokes a token; revoking a revoked token changes nothing and succeeds (the request's
/// outcome, "this token no longer works", holds), so a retried revoke is safe.
fn revoke_in(tx: &rusqlite::Transaction<'_>, id: &str, now: i64) -> Result<(), StoreError> {
    let n = tx.execute("UPDATE tokens SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL", params![now, id])?;
    if n == 0 {
        let exists: bool =
            tx.query_row("SELECT EXISTS(SELECT 1 FROM tokens WHERE id = ?1)", params![id], |r| r.get(0))?;
        if !exists {
            return Err(StoreError::Invalid(format!("no token {id}")));
        }
    }
    // The identity is gone once no token of its lineage lives: its upstream accounts go too.
    tx.execute(
        "DELETE FROM upstream_accounts WHERE subject = (SELECT 'issued:' || COALESCE(lineage, id) FROM tokens WHERE id = ?1) \
         AND NOT EXISTS (SELECT 1 FROM tokens t, tokens me WHERE me.id = ?1 \
             AND COALESCE(t.lineage, t.id) = COALESCE(me.lineage, me.id) AND t.revoked_at IS NULL)",
        params![id],
    )?;
    Ok(())
}

/// Inserts an access token and a refresh token of `grant`'s family.
#[allow(clippy::too_many_arguments, reason = "one insert of each row, with what they are made of")]
fn issue_in(
    tx: &rusqlite::Transaction<'_>,
    grant: &OAuthGrant,
    id: &str,
    access_secret: &str,
    refresh_secret: &str,
    access_ttl: Duration,
    refresh_ttl: Duration,
    now: i64,
) -> Result<(), StoreError> {
    let ms = |d: Duration| now.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let grants = serde_json::to_string(&grant.grants).map_err(|e| StoreError::Invalid(e.to_string()))?;
    // Unique among live tokens: the family's previous access token lives on until it expires.
    let name = format!("oauth:{}:{}", grant.name, &id[id.len().saturating_sub(8)..]);
    tx.execute(
        "INSERT INTO tokens (id, name, tenant, digest, prefix, grants, role, created_at, expires_at, lineage, audience, \
         client_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'user', ?7, ?8, ?9, ?10, ?11)",
        params![
            id,
            name,
            grant.tenant,
            crate::credentials::digest(access_secret).to_vec(),
            &access_secret[..8],
            grants,
            now,
            ms(access_ttl),
            grant.family,
            grant.audience,
            grant.client_id
        ],
    )?;
    tx.execute(
        "INSERT INTO oauth_refresh (digest, family, client_id, audience, login, name, tenant, grants, created_at, expires_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            crate::credentials::digest(refresh_secret).to_vec(),
            grant.family,
            grant.client_id,
            grant.audience,
            grant.login,
            grant.name,
            grant.tenant,
            grants,
            now,
            ms(refresh_ttl)
        ],
    )?;
    Ok(())
}

/// Revokes a refresh family: its refresh tokens and its access tokens.
fn revoke_family_in(tx: &rusqlite::Transaction<'_>, family: &str, now: i64) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE oauth_refresh SET revoked_at = ?1 WHERE family = ?2 AND revoked_at IS NULL",
        params![now, family],
    )?;
    tx.execute(
        "UPDATE tokens SET revoked_at = ?1 WHERE lineage = ?2 AND client_id IS NOT NULL AND revoked_at IS NULL",
        params![now, family],
    )?;
    Ok(())
}

fn account_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UpstreamAccount> {
    Ok(UpstreamAccount {
        server: r.get(0)?,
        subject: r.get(1)?,
        name: r.get(2)?,
        issuer: r.get(3)?,
        token_endpoint: r.get(4)?,
        client_id: r.get(5)?,
        sealed: r.get(6)?,
        expires_at: r.get(7)?,
        scope: r.get(8)?,
        state: r.get(9)?,
        updated_at: r.get(10)?,
    })
}

fn tenant_suffix(tenant: &str) -> String {
    if tenant.is_empty() { String::new() } else { format!(" in tenant {tenant:?}") }
}

/// What a running gateway sees of the store: opened when its file exists (a `token create` in
/// another process may create it later), with a cache of lookups dropped whenever the store's
/// change counter moves (polled every 250 ms), and last-use times batched.
pub struct StoreView {
    path: PathBuf,
    create: bool,
    store: Mutex<Option<std::sync::Arc<dyn TokenStore>>>,
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
    pub fn new(path: PathBuf, create: bool) -> std::sync::Arc<StoreView> {
        Self::build(path, create).0
    }

    /// Like [`StoreView::new`], but an error when the store exists (or is named) and cannot be
    /// opened or read: a gateway refuses to start on a store it cannot read.
    pub fn open(path: PathBuf, create: bool) -> Result<std::sync::Arc<StoreView>, StoreError> {
        let (view, polled) = Self::build(path, create);
        polled.map(|_| view)
    }

    fn build(path: PathBuf, create: bool) -> (std::sync::Arc<StoreView>, Result<bool, StoreError>) {
        let view = std::sync::Arc::new(StoreView {
            path,
            create,
            store: Mutex::new(None),
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

    /// The file.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    fn handle(&self) -> Result<Option<std::sync::Arc<dyn TokenStore>>, StoreError> {
        self.open_with(SqliteStore::open)
    }

    fn open_with(
        &self,
        open: fn(&Path) -> Result<SqliteStore, StoreError>,
    ) -> Result<Option<std::sync::Arc<dyn TokenStore>>, StoreError> {
        let mut slot = lock(&self.store);
        if slot.is_none() && (self.create || self.path.exists()) {
            let store: std::sync::Arc<dyn TokenStore> = std::sync::Arc::new(open(&self.path)?);
            *slot = Some(store);
        }
        Ok(slot.clone())
    }

    /// Checks the change counter; on a change drops the caches. True when it changed. A store
    /// that cannot answer is [`StoreState::Unavailable`] until a later poll succeeds, and its
    /// caches are dropped, so nothing it said before is trusted meanwhile.
    pub(crate) fn poll(&self) -> Result<bool, StoreError> {
        use std::sync::atomic::Ordering::Relaxed;
        let polled = self.poll_once();
        if polled.is_err() {
            self.state.store(STATE_UNAVAILABLE, Relaxed);
            self.version.store(-1, Relaxed);
            self.by_digest.clear();
            lock(&self.by_id).clear();
            // A handle on a file that broke is dropped: the next poll opens it afresh.
            *lock(&self.store) = None;
        }
        polled
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
        let Some(store) = self.open_with(SqliteStore::open_once)? else { return Ok(None) };
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

    fn store() -> (SqliteStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("pcs-store-{}-{}", std::process::id(), new_id().unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        (SqliteStore::open(&path).unwrap(), dir)
    }

    #[test]
    fn revoking_an_identity_removes_its_upstream_accounts_once_its_lineage_is_gone() {
        let (s, dir) = store();
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
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn create_rotate_with_grace_then_the_old_secret_stops() {
        let (s, dir) = store();
        let t0 = 1_000_000;
        let (alice, secret) = s
            .create(&NewToken { name: "alice".into(), ttl: Some(Duration::from_secs(3600)), ..Default::default() }, t0)
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
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn names_are_per_tenant_and_ambiguity_asks_for_one() {
        let (s, dir) = store();
        s.create(&NewToken { name: "ci".into(), tenant: "a".into(), ..Default::default() }, 1).unwrap();
        s.create(&NewToken { name: "ci".into(), tenant: "b".into(), ..Default::default() }, 1).unwrap();
        let err = s.resolve("ci", None).unwrap_err().to_string();
        assert!(err.contains("--tenant"), "{err}");
        assert_eq!(s.resolve("ci", Some("b")).unwrap().tenant, "b");
        assert!(s.version().unwrap() >= 2);
        let _ = std::fs::remove_dir_all(dir);
    }
}
