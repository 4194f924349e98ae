//! Why talking to an upstream failed, by layer: [`TransportError`] (starting a child, reaching
//! a URL, sending, reading an answer) and [`UpstreamError`] (what a call ends with, and what
//! the edge answers: a JSON-RPC error naming the server, never a 4xx, since none of it is the
//! client's fault).
//!
//! Invariants: no variant holds a URL with its credentials (URLs are kept as
//! [`crate::config::shown_url`] renders them) or a message body; a retry or a state change is
//! chosen by variant, never by matching text.

use std::time::Duration;

use crate::mcp::jsonrpc::{Reply, code};

/// Why the transport to an upstream failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The child could not be started.
    #[error("cannot start {command:?}: {reason}")]
    Spawn {
        /// The program.
        command: String,
        /// What the OS said.
        reason: String,
    },
    /// The child was gone before it could be talked to.
    #[error("the process exited at once")]
    ExitedAtOnce,
    /// The child has exited: nothing more can be sent to it.
    #[error("the process has exited")]
    Exited,
    /// The connection ended (or was ended) before this message could be sent.
    #[error("the connection is closed")]
    ConnectionClosed,
    /// The configured URL does not parse (validation makes this unreachable in practice).
    #[error("bad url: {0}")]
    BadUrl(String),
    /// The server could not be reached at all (connection refused, no route, DNS).
    #[error("cannot reach {url}: {reason}")]
    Unreachable {
        /// The URL, as shown.
        url: String,
        /// The error chain, without the URL.
        reason: String,
    },
    /// A request that reached the server but failed on the way (reset, TLS, a broken body).
    #[error("request failed: {0}")]
    Request(String),
    /// An answer's body broke off while it was read.
    #[error("reading the response failed: {0}")]
    Body(String),
    /// The server answered with an HTTP status that means no.
    #[error("{method} {url} answered {status}")]
    Status {
        /// `GET` or `POST`.
        method: &'static str,
        /// The URL, as shown.
        url: String,
        /// The HTTP status code.
        status: u16,
    },
    /// A POST answered with an error status (the start of the body says why).
    #[error("HTTP {status}: {snippet}")]
    Refused {
        /// The HTTP status code.
        status: u16,
        /// The first 200 bytes of the body, as text.
        snippet: String,
    },
    /// A response stream ended without the answer (and cannot be resumed).
    #[error("the upstream closed the response stream without answering")]
    StreamEnded,
    /// A response stream that ended could not be resumed.
    #[error("resuming the response stream failed: {0}")]
    Resume(String),
    /// A response stream kept ending without the answer, however often it was resumed.
    #[error("the upstream response stream kept closing without an answer")]
    StreamKeptClosing,
    /// No access token could be had for a server with `oauth:`.
    #[error("no access token: {0}")]
    Credential(#[from] crate::oauth::client::CredentialError),
    /// A legacy SSE server did not name its POST endpoint in time.
    #[error("no endpoint event from the SSE server")]
    NoEndpointEvent,
    /// A legacy SSE server's stream ended before it named its POST endpoint.
    #[error("the SSE stream ended before its endpoint event")]
    EndpointStreamEnded,
    /// A legacy SSE server named an endpoint that is not a URL.
    #[error("bad endpoint event: {0}")]
    BadEndpoint(String),
    /// A legacy SSE server named an endpoint on another origin (refused: it could send the
    /// configured headers anywhere).
    #[error("the SSE server named an endpoint on another origin ({0}); refused")]
    ForeignEndpoint(String),
    /// An event or an answer larger than Portcullis reads.
    #[error("the upstream response is larger than {0} bytes")]
    TooLarge(usize),
    /// An answer that is not the JSON it should be.
    #[error("bad JSON from upstream: {0}")]
    BadJson(String),
    /// A message that cannot be carried in the headers the 2026-07-28 transport needs.
    #[error("{0} cannot be sent: not a header value")]
    HeaderValue(String),
    /// A message Portcullis was to send that is not a JSON-RPC message (a bug upstream of here).
    #[error("cannot send: {0}")]
    Unsendable(String),
    /// The server's answer to `initialize` is an error, or not an `InitializeResult`.
    #[error("initialize failed: {0}")]
    Initialize(String),
    /// No answer to `initialize` in time.
    #[error("no answer to initialize")]
    InitializeTimeout,
    /// The child exited or the connection ended during `initialize`.
    #[error("exited during initialize")]
    EndedDuringInitialize,
}

/// Why a server cannot take a call, or why the connection a call was on went away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Down {
    /// Stopped on purpose (reload, shutdown).
    #[error("the server was stopped")]
    Stopped,
    /// The crash-loop breaker is open.
    #[error("crash loop, not restarting for a while (last error: {})", last.as_deref().map_or_else(|| "none".to_owned(), ToString::to_string))]
    CrashLoop {
        /// What went wrong last.
        last: Option<Box<Down>>,
    },
    /// Still starting, or restarting, past the call's deadline.
    #[error("not ready")]
    NotReady,
    /// Not connected when a notification was to go.
    #[error("not running")]
    NotRunning,
    /// The connection ended before the answer.
    #[error("no answer")]
    NoAnswer,
    /// The connection ended (the process exited, the stream closed).
    #[error("the connection ended")]
    ConnectionEnded,
    /// A remote server that cannot be reached.
    #[error("unreachable: {0}")]
    Unreachable(TransportError),
    /// Starting or connecting failed.
    #[error("{0}")]
    Failed(TransportError),
    /// The gateway could not mint a `requestState` (no randomness).
    #[error("{0}")]
    NoRandomness(#[from] crate::random::NoRandomness),
}

/// Why an upstream call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// Not running (starting, restarting, stopped, or the breaker is open).
    #[error("server {server} is unavailable: {reason}")]
    Unavailable {
        /// The server's name.
        server: String,
        /// Why: the state, or the last error.
        reason: Down,
    },
    /// The connection ended while the request was in flight.
    #[error("server {server} closed the connection while handling the request ({reason})")]
    Closed {
        /// The server's name.
        server: String,
        /// What happened.
        reason: Down,
    },
    /// The deadline passed.
    #[error("server {server} did not answer within {after:?}")]
    Timeout {
        /// The server's name.
        server: String,
        /// The deadline.
        after: Duration,
    },
    /// The transport failed for this call.
    #[error("server {server}: {source}")]
    Transport {
        /// The server's name.
        server: String,
        /// What failed.
        source: TransportError,
    },
    /// The upstream session ended under the call, which the server never acted on: it is sent
    /// again, once, on the new session.
    #[error("server {server}: the upstream session expired; it is being re-initialized")]
    SessionExpired {
        /// The server's name.
        server: String,
    },
    /// A round of 2026-07-28 input requests failed (a malformed `InputRequiredResult`, or a
    /// session-era client that could not be asked).
    #[error("server {server}: {source}")]
    Input {
        /// The server's name.
        server: String,
        /// What failed.
        source: super::input_requests::InputError,
    },
}

impl UpstreamError {
    /// The JSON-RPC error object for a downstream response.
    pub(crate) fn to_reply(&self) -> Reply {
        Reply::error(code::UPSTREAM_ERROR, &self.to_string())
    }
}
