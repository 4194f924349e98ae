//! The audit trail: one JSON record per request and per refusal, written to its own sink
//! (stderr or a file) by a dedicated thread, apart from `tracing`, so no log filter silences it.
//!
//! Invariants: a record names identities, never secrets; writing never blocks a request (records
//! go through a channel; the writer flushes when the channel runs dry).

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

/// One audit record.
#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct Record {
    /// RFC 3339 time the request arrived.
    pub time: String,
    /// The identity's name (`anonymous` without authentication, absent when refused before).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Its tenant.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The server addressed, when one was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// The JSON-RPC method (or the HTTP method for non-JSON-RPC requests).
    pub method: String,
    /// The tool, prompt or resource named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `allowed`, or `refused: <why>`.
    pub outcome: String,
    /// The HTTP status.
    pub status: u16,
    /// Time to answer (or to the start of a streamed answer), in milliseconds.
    pub latency_ms: f64,
    /// The client's address (after `trusted_proxies`).
    pub client: String,
    /// The JSON-RPC id, raw.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Formats a time as RFC 3339 with milliseconds.
pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// What the writer thread receives.
enum Msg {
    Record(Box<Record>),
    /// Write everything received so far, then answer.
    Sync(mpsc::Sender<()>),
}

/// Where records go.
#[derive(Clone)]
pub(crate) struct Audit {
    tx: mpsc::Sender<Msg>,
    /// How many records the writer has written (and flushed).
    written: tokio::sync::watch::Sender<u64>,
}

impl Audit {
    /// Starts the writer: to `file` (appended, created if needed) or stderr.
    pub(crate) fn start(file: Option<PathBuf>) -> std::io::Result<Audit> {
        let out: Box<dyn Write + Send> = match file {
            Some(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                // Created for its owner only: it names identities and what they did.
                Box::new(std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path)?)
            }
            None => Box::new(std::io::stderr()),
        };
        let (tx, rx) = mpsc::channel::<Msg>();
        let written = tokio::sync::watch::Sender::new(0);
        let counter = written.clone();
        std::thread::Builder::new().name("audit".into()).spawn(move || write_all(rx, out, &counter))?;
        Ok(Audit { tx, written })
    }

    /// A sink that drops records (for tools that never serve requests).
    pub(crate) fn discard() -> Audit {
        let (tx, _rx) = mpsc::channel();
        Audit { tx, written: tokio::sync::watch::Sender::new(0) }
    }

    /// The count of records written so far.
    pub(crate) fn written(&self) -> tokio::sync::watch::Receiver<u64> {
        self.written.subscribe()
    }

    /// Queues a record.
    pub(crate) fn record(&self, r: Record) {
        let _ = self.tx.send(Msg::Record(Box::new(r)));
    }

    /// Waits until every record queued so far is written (at shutdown).
    pub(crate) fn sync(&self) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Sync(tx)).is_ok() {
            let _ = rx.recv_timeout(Duration::from_secs(5));
        }
    }
}

/// How long the writer lets records gather after writing a batch: under load it wakes a few
/// dozen times a second instead of once per request (the request path only sends on a channel).
const GATHER: Duration = Duration::from_millis(20);

fn write_all(rx: mpsc::Receiver<Msg>, out: Box<dyn Write + Send>, written: &tokio::sync::watch::Sender<u64>) {
    let mut out = std::io::BufWriter::new(out);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        let mut synced = false;
        let mut count = 0;
        while let Some(m) = next {
            match m {
                Msg::Record(r) => {
                    if let Ok(line) = serde_json::to_string(&r) {
                        let _ = out.write_all(line.as_bytes());
                        let _ = out.write_all(b"\n");
                        count += 1;
                    }
                }
                Msg::Sync(ack) => {
                    let _ = out.flush();
                    let _ = ack.send(());
                    synced = true;
                }
            }
            next = rx.recv_timeout(Duration::ZERO).ok();
        }
        let _ = out.flush();
        if count > 0 {
            written.send_modify(|n| *n += count);
        }
        if !synced {
            std::thread::sleep(GATHER);
        }
    }
    let _ = out.flush();
}
