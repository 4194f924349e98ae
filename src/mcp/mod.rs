//! The MCP protocol pieces: envelopes, SSE framing, sessions, upstream connectors.
pub mod downstream;
pub mod gateway;
pub mod jsonrpc;
pub mod session;
pub mod sse;
pub mod upstream;
