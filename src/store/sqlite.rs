//! The embedded store: one SQLite file in WAL mode, for one node (the default, nothing to
//! install). The `token` subcommands open the same file from another process.
//!
//! Invariants: a new file is created readable by its owner only; migrations run in one
//! immediate transaction on open; a write transaction is `BEGIN IMMEDIATE`, so writers (in this
//! process or another) are ordered and a failed one changes nothing.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};

use super::sql::{Arg, Cell, Row, Tx};
use super::{Backend, Job, StoreError};
use crate::sharded::lock;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// The SQLite store.
pub(crate) struct Sqlite {
    conn: Mutex<Connection>,
}

impl Sqlite {
    /// Opens (creating on first use) the store at `path`, in WAL mode, with migrations applied.
    /// Another process switching to WAL or migrating at the same moment answers "locked" at
    /// once (no busy handler there): `retry` waits it out briefly.
    pub(crate) fn open(path: &Path, retry: bool) -> Result<Sqlite, StoreError> {
        let mut attempt = 0;
        loop {
            match Self::open_once(path) {
                Err(StoreError::Unavailable(m)) if retry && m.contains("locked") && attempt < 50 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(20 + 10 * attempt));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &Path) -> Result<Sqlite, StoreError> {
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
        let store = Sqlite { conn: Mutex::new(conn) };
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
}

impl Backend for Sqlite {
    fn run(&self, write: bool, job: Job) -> Result<(), StoreError> {
        let mut conn = lock(&self.conn);
        let behavior =
            if write { rusqlite::TransactionBehavior::Immediate } else { rusqlite::TransactionBehavior::Deferred };
        let mut tx = conn.transaction_with_behavior(behavior)?;
        job(&mut tx)?;
        tx.commit()?;
        Ok(())
    }

    fn checkpoint(&self) -> Result<(), StoreError> {
        lock(&self.conn).execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
        Ok(())
    }
}

impl rusqlite::ToSql for Arg<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Arg::Null => ValueRef::Null,
            Arg::Int(v) => ValueRef::Integer(v),
            Arg::Text(s) => ValueRef::Text(s.as_bytes()),
            Arg::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl Tx for rusqlite::Transaction<'_> {
    fn exec(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let n = self.prepare_cached(sql)?.execute(rusqlite::params_from_iter(args.iter()))?;
        Ok(u64::try_from(n).unwrap_or(u64::MAX))
    }

    fn rows(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StoreError> {
        let mut stmt = self.prepare_cached(sql)?;
        let width = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args.iter()))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            let mut cells = Vec::with_capacity(width);
            for i in 0..width {
                cells.push(match r.get_ref(i)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(v) => Cell::Int(v),
                    // The store writes no floating point; a REAL is someone else's edit.
                    ValueRef::Real(_) => {
                        return Err(StoreError::Unavailable(format!("column {i} holds a number with a fraction")));
                    }
                    ValueRef::Text(t) => Cell::Text(String::from_utf8_lossy(t).into_owned()),
                    ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
                });
            }
            out.push(Row(cells));
        }
        Ok(out)
    }
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
    r#"
CREATE TABLE deleted_sessions (
    digest BLOB PRIMARY KEY,
    deleted_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE INDEX deleted_sessions_at ON deleted_sessions(deleted_at);
"#,
    r#"
CREATE TABLE held (
    kind TEXT NOT NULL,
    key BLOB NOT NULL,
    data TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX held_expires ON held(expires_at);
"#,
];
