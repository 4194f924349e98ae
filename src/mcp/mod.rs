//! The MCP protocol pieces: envelopes, SSE framing, sessions, the resource index, upstream
//! connectors, the gateway that routes between them.
pub mod downstream;
pub mod gateway;
pub mod jsonrpc;
pub mod lines;
pub mod lists;
pub mod resources;
pub mod session;
pub mod sse;
pub mod upstream;
pub mod version;
