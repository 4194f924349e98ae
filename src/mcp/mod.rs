//! The MCP protocol pieces: envelopes, SSE framing, sessions, the resource index, upstream
//! connectors, the gateway that routes between them.
pub(crate) mod downstream;
pub mod gateway;
pub mod jsonrpc;
pub(crate) mod lines;
pub mod lists;
pub(crate) mod resources;
pub(crate) mod sealed;
pub(crate) mod session;
pub mod sse;
pub mod upstream;
pub(crate) mod version;
