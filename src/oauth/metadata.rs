//! Protected resource metadata (RFC 9728): where a client learns which authorization servers
//! issue tokens for an MCP endpoint and which scopes it knows.
//!
//! Invariants: a document exists only while identity providers are configured (404 otherwise,
//! and for a path that is no MCP endpoint of an enabled server); its `resource` is exactly the
//! URL the well-known path was formed from (§3.3: clients compare it strictly); it never lists
//! `offline_access`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::gate::json;
use crate::mcp::gateway::Gateway;

/// `GET /.well-known/oauth-protected-resource[/PATH]`.
pub(crate) async fn serve(State(gw): State<Arc<Gateway>>, path: Option<Path<String>>) -> Response {
    let snap = gw.snapshot();
    let (config, auth) = (&snap.config, &snap.auth);
    let rest = path.map(|Path(p)| p).unwrap_or_default();
    let Some(server) = super::endpoint_of(config, &rest) else { return StatusCode::NOT_FOUND.into_response() };
    if !auth.is_protected_resource() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let base = config.public_base();
    let resource = if rest.is_empty() { base.clone() } else { format!("{base}/{}", rest.trim_start_matches('/')) };
    // Portcullis' own authorization server first: the one a client with no other choice uses.
    let mut issuers: Vec<&str> = Vec::new();
    if auth.authorization_server().is_some() {
        issuers.push(&base);
    }
    issuers.extend(auth.providers().iter().map(|p| p.def.issuer.as_str()));
    let scopes = auth.scopes_for(server);
    let doc = serde_json::json!({
        "resource": resource,
        "authorization_servers": issuers,
        "scopes_supported": scopes,
        "bearer_methods_supported": ["header"],
        "resource_name": config.name,
    });
    json(StatusCode::OK, doc.to_string())
}
