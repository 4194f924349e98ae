//! Portcullis: an authenticating gateway for MCP (Model Context Protocol) servers.
//!
//! # Layout
//! - [`config`]: the file format and its validation into an immutable runtime `Config`.
//! - [`credentials`]: credentials as validated (roles, rates, token definitions, digests),
//!   with no runtime dependency, so `config` and `store` build them without a cycle.
//! - [`auth`]: who is asking (credentials, limits, refusals); [`authz`]: what they may reach;
//!   [`audit`]: one record per request, in a sink no log filter silences.
//! - [`mcp::jsonrpc`]: JSON-RPC envelopes over raw bytes (parse only what the gateway acts on).
//! - [`mcp::upstream`]: the gateway as an MCP client: stdio children, streamable HTTP (both
//!   eras) and HTTP+SSE, supervised with restart, backoff and a crash-loop breaker.
//! - [`mcp::gateway`]: routing and the aggregated view (namespacing, merged lists, resources).
//! - [`mcp::session`]: downstream sessions and per-request callers.
//! - [`mcp::downstream`]: the gateway as an MCP server (streamable HTTP, both eras).
//! - [`server`]: the HTTP listener, health, graceful shutdown; [`admin`]: the management API;
//!   [`metrics`]: `/stats` and `/metrics`; [`tls`]: rustls on the listener.
//! - [`store`]: issued tokens in SQLite, shared with the `token` subcommands.
//! - [`cli`]: the command line. [`demo`]: the bundled demo MCP server.
#![forbid(unsafe_code)]

pub(crate) mod admin;
pub(crate) mod audit;
pub mod auth;
pub mod authz;
pub mod cli;
pub mod config;
pub mod credentials;
pub mod demo;
pub(crate) mod gate;
pub(crate) mod limits;
pub mod mcp;
pub(crate) mod metrics;
pub mod oauth;
pub mod random;
pub mod server;
mod sharded;
pub mod state;
pub mod store;
pub(crate) mod tls;
pub mod vault;
