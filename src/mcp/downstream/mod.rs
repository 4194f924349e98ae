//! Serving MCP to clients (the gateway as an MCP server): streamable HTTP in both eras, the
//! 2024-11-05 HTTP+SSE transport, and stdio for a client that launches Portcullis.
pub(crate) mod http;
pub(crate) mod sse;
pub(crate) mod stdio;
