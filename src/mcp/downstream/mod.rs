//! Serving MCP to clients (the gateway as an MCP server): streamable HTTP in both eras, and
//! the 2024-11-05 HTTP+SSE transport.
pub mod http;
pub mod sse;
