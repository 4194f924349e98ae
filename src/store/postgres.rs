//! The shared store for replicas: PostgreSQL (`store: postgres://…`), holding what SQLite holds
//! for one node, with the same logic ([`super::Store`]) over the same statements.
//!
//! The store's interface is synchronous (SQLite is, and the request path reads it only on a
//! cache miss), and so is the `postgres` client: it drives its connection on a runtime of its
//! own, which cannot run on one of tokio's threads. So connections live on threads of their own
//! ([`POOL_SIZE`] of them, each holding one connection and its prepared statements); a caller
//! hands its transaction to one and waits for the outcome, at most [`WAIT`].
//!
//! Invariants: every write transaction first bumps the change counter (a row lock, so writers on
//! every replica are ordered as SQLite's `BEGIN IMMEDIATE` orders them) and then notifies
//! [`CHANNEL`] (delivered at commit, to every replica's listener); a connection that failed is
//! dropped and the next transaction connects afresh; nothing here logs or returns the URL's
//! password ([`redacted`]); migrations run under an advisory lock, so replicas starting together
//! migrate once.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use postgres::types::{IsNull, ToSql, Type};
use postgres::{Client, NoTls, Statement};

use super::sql::{Arg, Cell, Row, Tx, dollar_placeholders};
use super::{Backend, Changed, Job, StoreError};
use crate::sharded::lock;

/// Connections (and threads) per store.
const POOL_SIZE: usize = 4;
/// Transactions waiting for a connection before a caller is refused at once.
const QUEUE: usize = 1024;
/// The longest a caller waits for its transaction (then the store is unavailable to it): short,
/// since a request waits on it (a database that does not answer is one that cannot confirm).
const WAIT: Duration = Duration::from_secs(2);
/// The connect timeout when the URL sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The notification channel every write announces itself on.
pub(crate) const CHANNEL: &str = "portcullis_changes";
/// Key of the advisory lock migrations hold.
const MIGRATION_LOCK: i64 = 0x706f_7274_6375_6c6c;

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        // A server error's message and code, never the connection string.
        match e.as_db_error() {
            Some(db) => StoreError::Unavailable(format!("{} ({})", db.message(), db.code().code())),
            None => StoreError::Unavailable(e.to_string()),
        }
    }
}

/// A URL with any password replaced (for messages and logs).
pub(crate) fn redacted(url: &str) -> String {
    match postgres::Config::from_str(url) {
        Ok(c) => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .map(|h| match h {
                    postgres::config::Host::Tcp(h) => h.clone(),
                    postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            let port = c.get_ports().first().map(|p| format!(":{p}")).unwrap_or_default();
            format!(
                "postgres://{}{}{}/{}",
                c.get_user().map(|u| format!("{u}@")).unwrap_or_default(),
                hosts.join(","),
                port,
                c.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "postgres://(unreadable URL)".into(),
    }
}

/// What a connection's thread is asked to do.
enum Task {
    /// The store's logic, in a transaction (a write one: bump, notify).
    Logic { write: bool, job: Job },
    /// Bring the schema up to date.
    Migrate,
}

struct Work {
    task: Task,
    done: SyncSender<Result<(), StoreError>>,
}

/// One PostgreSQL database (a pool of connections on their own threads).
pub(crate) struct Postgres {
    config: postgres::Config,
    shown: String,
    jobs: SyncSender<Work>,
    /// Who is told of changes (every view of this process on this database); the listener
    /// thread starts with the first.
    listeners: Arc<Mutex<Vec<Changed>>>,
    /// Alive as long as the pool: the listener stops when it is gone.
    alive: Arc<()>,
}

/// Every pool of this process by URL: opening the same store twice shares one pool (the
/// gateway, its OAuth flows and its management API all open the store by its location).
fn pools() -> &'static Mutex<HashMap<String, Weak<Postgres>>> {
    static POOLS: std::sync::OnceLock<Mutex<HashMap<String, Weak<Postgres>>>> = std::sync::OnceLock::new();
    POOLS.get_or_init(|| Mutex::new(HashMap::new()))
}

impl Postgres {
    /// The pool for `url`, opened (and the schema migrated) on first use.
    pub(crate) fn open(url: &str) -> Result<Arc<Postgres>, StoreError> {
        let mut all = lock(pools());
        if let Some(p) = all.get(url).and_then(Weak::upgrade) {
            return Ok(p);
        }
        let shown = redacted(url);
        let mut config = postgres::Config::from_str(url)
            .map_err(|e| StoreError::Invalid(format!("the store URL {shown} cannot be read: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.keepalives(true).keepalives_idle(Duration::from_secs(30));
        if config.get_application_name().is_none() {
            config.application_name("portcullis");
        }
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Work>(QUEUE);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..POOL_SIZE {
            let (queue, config) = (queue.clone(), config.clone());
            std::thread::Builder::new()
                .name(format!("portcullis-pg-{i}"))
                .spawn(move || worker(&queue, &config))
                .map_err(|e| StoreError::Unavailable(format!("cannot start a store thread: {e}")))?;
        }
        let pool = Arc::new(Postgres {
            config,
            shown,
            jobs,
            listeners: Arc::new(Mutex::new(Vec::new())),
            alive: Arc::new(()),
        });
        pool.submit(Task::Migrate)?;
        all.retain(|_, w| w.strong_count() > 0);
        all.insert(url.to_owned(), Arc::downgrade(&pool));
        Ok(pool)
    }

    fn submit(&self, task: Task) -> Result<(), StoreError> {
        let (done, outcome) = std::sync::mpsc::sync_channel(1);
        self.jobs.try_send(Work { task, done }).map_err(|_| {
            StoreError::Unavailable(format!("{}: too many transactions waiting for a connection", self.shown))
        })?;
        match outcome.recv_timeout(WAIT) {
            Ok(r) => r,
            Err(_) => Err(StoreError::Unavailable(format!("{}: no answer within {WAIT:?}", self.shown))),
        }
    }

    /// Calls `changed` whenever any replica's write commits (a thread with its own connection
    /// listening on [`CHANNEL`]; it reconnects after a loss, and the caller's polling covers
    /// the gap). Once per pool.
    fn listen_for(&self, changed: Changed) {
        let first = {
            let mut all = lock(&self.listeners);
            all.push(changed);
            all.len() == 1
        };
        if !first {
            return;
        }
        let pool = Arc::downgrade(&self.alive);
        let config = self.config.clone();
        let listeners = self.listeners.clone();
        let changed = move || {
            let all: Vec<_> = lock(&listeners).clone();
            for f in all {
                f();
            }
        };
        let spawned = std::thread::Builder::new().name("portcullis-pg-listen".into()).spawn(move || {
            let mut lost = false;
            while pool.strong_count() > 0 {
                let outcome = listen_once(&config, &pool, &changed, &mut lost);
                if let Err(e) = outcome
                    && !lost
                {
                    tracing::warn!(error = %e, "lost the store's change notifications: polling until they are back");
                    lost = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the store's listener: changes are seen by polling only");
        }
    }
}

/// One connection's worth of listening: returns when the connection is lost (or the pool gone).
fn listen_once(
    config: &postgres::Config,
    pool: &Weak<()>,
    changed: &dyn Fn(),
    lost: &mut bool,
) -> Result<(), StoreError> {
    let mut client = config.connect(NoTls)?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    if std::mem::take(lost) {
        tracing::info!("listening for store changes again");
    }
    // What changed while nobody listened is read by the next poll; wake it now.
    changed();
    while pool.strong_count() > 0 {
        let heard = {
            let mut notes = client.notifications();
            let mut it = notes.timeout_iter(Duration::from_secs(1));
            postgres::fallible_iterator::FallibleIterator::next(&mut it)?.is_some()
        };
        if heard {
            changed();
        } else if client.is_closed() {
            return Err(StoreError::Unavailable("the listening connection closed".into()));
        }
    }
    Ok(())
}

impl Backend for Postgres {
    fn run(&self, write: bool, job: Job) -> Result<(), StoreError> {
        self.submit(Task::Logic { write, job })
    }

    fn listen(&self, changed: Changed) {
        self.listen_for(changed);
    }
}

/// One connection's thread: takes transactions off the queue until the pool is dropped.
fn worker(queue: &Mutex<Receiver<Work>>, config: &postgres::Config) {
    let mut conn: Option<(Client, HashMap<String, Statement>)> = None;
    loop {
        let work = match lock(queue).recv() {
            Ok(w) => w,
            Err(_) => return,
        };
        if conn.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            conn = None;
        }
        if conn.is_none() {
            match config.connect(NoTls) {
                Ok(c) => conn = Some((c, HashMap::new())),
                Err(e) => {
                    let _ = work.done.send(Err(StoreError::from(e)));
                    continue;
                }
            }
        }
        let Some((client, statements)) = conn.as_mut() else { continue };
        let outcome = match transact(client, statements, work.task) {
            Ok(()) => Ok(()),
            // BEGIN failed on a connection the server has closed (it restarted): nothing ran,
            // so the transaction is tried once more on a new connection.
            Err((_, Some(task))) if client.is_closed() => match config.connect(NoTls) {
                Ok(c) => {
                    let (client, statements) = conn.insert((c, HashMap::new()));
                    transact(client, statements, task).map_err(|(e, _)| e)
                }
                Err(e) => {
                    conn = None;
                    Err(StoreError::from(e))
                }
            },
            Err((e, _)) => Err(e),
        };
        if outcome.is_err() && conn.as_ref().is_some_and(|(c, _)| c.is_closed()) {
            conn = None;
        }
        let _ = work.done.send(outcome);
    }
}

/// Runs one task in a transaction. When BEGIN itself fails the task is handed back (it has not
/// run).
fn transact(
    client: &mut Client,
    statements: &mut HashMap<String, Statement>,
    task: Task,
) -> Result<(), (StoreError, Option<Task>)> {
    let tx = match client.transaction() {
        Ok(tx) => tx,
        Err(e) => return Err((StoreError::from(e), Some(task))),
    };
    transact_in(PgTx { tx, statements }, task).map_err(|e| (e, None))
}

fn transact_in(mut tx: PgTx<'_>, task: Task) -> Result<(), StoreError> {
    match task {
        Task::Logic { write, job } => {
            job(&mut tx)?;
            if write {
                tx.batch(&format!("NOTIFY {CHANNEL}"))?;
            }
        }
        Task::Migrate => migrate(&mut tx)?,
    }
    tx.tx.commit()?;
    Ok(())
}

/// Applies the migrations this database has not had, one replica at a time.
fn migrate(tx: &mut PgTx<'_>) -> Result<(), StoreError> {
    tx.batch(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))?;
    tx.batch("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)")?;
    let at = match tx.rows("SELECT value FROM meta WHERE key = 'schema'", &[])?.first() {
        Some(r) => r.int(0)?,
        None => 0,
    };
    for (i, m) in MIGRATIONS.iter().enumerate().skip(usize::try_from(at).unwrap_or(0)) {
        tx.batch(m)?;
        let next = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.exec(
            "INSERT INTO meta (key, value) VALUES ('schema', ?1) ON CONFLICT (key) DO UPDATE SET value = ?1",
            &[Arg::Int(next)],
        )?;
    }
    Ok(())
}

/// A transaction on one connection, with that connection's prepared statements.
struct PgTx<'a> {
    tx: postgres::Transaction<'a>,
    statements: &'a mut HashMap<String, Statement>,
}

impl PgTx<'_> {
    fn statement(&mut self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.tx.prepare(&dollar_placeholders(sql))?;
        self.statements.insert(sql.to_owned(), s.clone());
        Ok(s)
    }

    /// Runs statements without arguments (a migration).
    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        Ok(self.tx.batch_execute(sql)?)
    }
}

fn params<'b>(args: &'b [Arg<'_>]) -> Vec<&'b (dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

impl Tx for PgTx<'_> {
    fn exec(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let s = self.statement(sql)?;
        Ok(self.tx.execute(&s, &params(args))?)
    }

    fn rows(&mut self, sql: &str, args: &[Arg<'_>]) -> Result<Vec<Row>, StoreError> {
        let s = self.statement(sql)?;
        let rows = self.tx.query(&s, &params(args))?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        let ty = r.columns()[i].type_();
                        Ok(if *ty == Type::INT8 {
                            r.try_get::<_, Option<i64>>(i)?.map_or(Cell::Null, Cell::Int)
                        } else if *ty == Type::INT4 {
                            r.try_get::<_, Option<i32>>(i)?.map_or(Cell::Null, |v| Cell::Int(v.into()))
                        } else if *ty == Type::BOOL {
                            r.try_get::<_, Option<bool>>(i)?.map_or(Cell::Null, |v| Cell::Int(v.into()))
                        } else if *ty == Type::BYTEA {
                            r.try_get::<_, Option<Vec<u8>>>(i)?.map_or(Cell::Null, Cell::Blob)
                        } else {
                            r.try_get::<_, Option<String>>(i)?.map_or(Cell::Null, Cell::Text)
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
                    .map(Row)
            })
            .collect()
    }
}

impl ToSql for Arg<'_> {
    fn to_sql(&self, ty: &Type, out: &mut bytes::BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match *self {
            Arg::Null => Ok(IsNull::Yes),
            Arg::Int(v) => v.to_sql(ty, out),
            Arg::Text(s) => s.to_sql(ty, out),
            Arg::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        // Checked per value by the conversions above (an integer for a BIGINT, text for TEXT).
        true
    }

    postgres::types::to_sql_checked!();
}

/// The schema, in PostgreSQL's types (64-bit integers, `BYTEA`): SQLite's first five migrations
/// as one, then one entry for each later one of SQLite's list.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL DEFAULT '',
    digest BYTEA NOT NULL UNIQUE,
    prefix TEXT NOT NULL,
    grants TEXT NOT NULL,
    role TEXT NOT NULL DEFAULT 'user',
    rate TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT,
    revoked_at BIGINT,
    last_used_at BIGINT,
    replaces TEXT,
    superseded_by TEXT,
    overlap_until BIGINT,
    lineage TEXT,
    audience TEXT,
    client_id TEXT
);
CREATE UNIQUE INDEX tokens_live_name ON tokens(tenant, name) WHERE superseded_by IS NULL AND revoked_at IS NULL;
CREATE INDEX tokens_lineage ON tokens(lineage);
INSERT INTO meta (key, value) VALUES ('version', 0) ON CONFLICT (key) DO NOTHING;
CREATE TABLE oauth_clients (
    client_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    redirect_uris TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE TABLE oauth_refresh (
    digest BYTEA PRIMARY KEY,
    family TEXT NOT NULL,
    client_id TEXT NOT NULL,
    audience TEXT NOT NULL,
    login TEXT NOT NULL,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    grants TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT,
    revoked_at BIGINT
);
CREATE INDEX oauth_refresh_family ON oauth_refresh(family);
CREATE TABLE oauth_consents (
    id TEXT PRIMARY KEY,
    login TEXT NOT NULL,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    client_id TEXT NOT NULL,
    client_name TEXT NOT NULL,
    resource TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    used_at BIGINT,
    UNIQUE (login, client_id, resource)
);
CREATE TABLE upstream_accounts (
    server TEXT NOT NULL,
    subject TEXT NOT NULL,
    name TEXT NOT NULL,
    issuer TEXT NOT NULL,
    token_endpoint TEXT NOT NULL,
    client_id TEXT NOT NULL,
    sealed BYTEA NOT NULL,
    expires_at BIGINT,
    scope TEXT,
    state TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (server, subject)
);
CREATE TABLE upstream_clients (
    server TEXT NOT NULL,
    issuer TEXT NOT NULL,
    client_id TEXT NOT NULL,
    sealed_secret BYTEA,
    registered_at BIGINT NOT NULL,
    PRIMARY KEY (server, issuer)
);
"#,
    r#"
CREATE TABLE deleted_sessions (
    digest BYTEA PRIMARY KEY,
    deleted_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX deleted_sessions_at ON deleted_sessions(deleted_at);
"#,
    r#"
CREATE TABLE held (
    kind TEXT NOT NULL,
    key BYTEA NOT NULL,
    data TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (kind, key)
);
CREATE INDEX held_expires ON held(expires_at);
"#,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_url_is_shown_without_its_password() {
        let shown = redacted("postgres://svc:s3cr3t-pw@db.internal:5433/portcullis?connect_timeout=2");
        assert_eq!(shown, "postgres://svc@db.internal:5433/portcullis");
        let shown = redacted("postgresql://db/p?password=s3cr3t-pw&user=svc");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(!redacted("postgres://u:s3cr3t-pw@[bad").contains("s3cr3t"));
        let location = crate::store::StoreLocation::parse("postgres://svc:s3cr3t-pw@db/p");
        assert!(!location.to_string().contains("s3cr3t"));
    }
}
