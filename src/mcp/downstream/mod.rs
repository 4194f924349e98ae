//! Serving MCP to clients (the gateway as an MCP server).
pub mod http;
