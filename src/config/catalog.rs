//! Open MCP Gateway's server catalog (`catalog_path:`), read as that gateway documents it:
//! `servers: [{id, display_name, description, runtime: {type, …}, env, tags}]`.
//!
//! Invariants: a catalog entry becomes the same [`super::RawServer`] a Portcullis entry would be
//! and is validated by the same code; a runtime Portcullis cannot run (`docker`, `k8s-*`) is an
//! error, never skipped; every problem names the catalog file and the entry's line.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;

use serde::Deserialize;

use super::{ConfigError, RawServer, schema, tree};

/// The catalog file.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCatalog {
    /// The servers.
    #[serde(default)]
    pub servers: Vec<RawCatalogServer>,
}

/// One catalog entry.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCatalogServer {
    /// The server's name in Portcullis (`[a-z0-9_-]+`).
    pub id: String,
    /// Shown in Open MCP Gateway's listings; not used by Portcullis.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted as Open MCP Gateway writes it; not used by Portcullis")]
    pub display_name: Option<String>,
    /// Shown in Open MCP Gateway's listings; not used by Portcullis.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted as Open MCP Gateway writes it; not used by Portcullis")]
    pub description: Option<String>,
    /// How to start or reach the server.
    pub runtime: RawRuntime,
    /// Environment variables for a `local-process` server.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Categories in Open MCP Gateway's listings; not used by Portcullis.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted as Open MCP Gateway writes it; not used by Portcullis")]
    pub tags: Vec<String>,
}

/// `runtime:`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRuntime {
    /// `local-process` (a stdio child) or `remote-sse` (an HTTP server).
    #[serde(rename = "type")]
    pub kind: String,
    /// `local-process`: the program.
    #[serde(default)]
    pub command: Option<String>,
    /// `local-process`: its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// `local-process`: its working directory.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `remote-sse`: the server's URL.
    #[serde(default)]
    pub url: Option<String>,
    /// `remote-sse`: headers sent with every request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

static CATALOG_SCHEMA: LazyLock<serde_json::Value> =
    LazyLock::new(|| serde_json::to_value(schemars::schema_for!(RawCatalog)).unwrap_or(serde_json::Value::Bool(true)));

/// A read catalog: its entries as server entries, with the line of each.
pub(crate) struct Catalog {
    /// `(name, entry, line)`, in file order.
    pub(crate) servers: Vec<(String, RawServer, Option<u32>)>,
}

/// Reads the catalog at `file`: its entries, and its problems (errors and warnings), each
/// naming the catalog file.
pub(crate) fn load(file: &Path) -> (Catalog, Vec<ConfigError>, Vec<ConfigError>) {
    let at = |line: Option<u32>, path: String, message: String| ConfigError {
        file: Some(file.to_owned()),
        path,
        line,
        message,
    };
    let mut catalog = Catalog { servers: Vec::new() };
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return (catalog, vec![at(None, String::new(), format!("cannot read the catalog: {e}"))], vec![]),
    };
    let node = match tree::parse(&text) {
        Ok(Some(n)) => n,
        Ok(None) => return (catalog, vec![], vec![]),
        Err(e) => return (catalog, vec![at(e.line, String::new(), e.message)], vec![]),
    };
    let (value, problems) = schema::convert_with(&CATALOG_SCHEMA, &node, true);
    let (mut errors, mut warnings) = (Vec::new(), Vec::new());
    for p in problems {
        let e = at(Some(p.line), p.path, p.message);
        if p.warning { warnings.push(e) } else { errors.push(e) }
    }
    let raw: RawCatalog = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            errors.push(at(None, String::new(), e.to_string()));
            return (catalog, errors, warnings);
        }
    };
    for (i, entry) in raw.servers.into_iter().enumerate() {
        let path = format!("servers[{i}]");
        let line = node.line_of(&path);
        let rt = entry.runtime;
        let server = match rt.kind.as_str() {
            "local-process" => RawServer {
                command: rt.command,
                args: rt.args,
                env: entry.env,
                cwd: rt.working_dir,
                ..RawServer::default()
            },
            "remote-sse" => {
                if !entry.env.is_empty() {
                    warnings.push(at(
                        line,
                        format!("{path}.env"),
                        "ignored (`env` applies only to local-process)".into(),
                    ));
                }
                RawServer { url: rt.url, headers: rt.headers, ..RawServer::default() }
            }
            other => {
                let message = format!("runtime type {other:?} is not supported (local-process, remote-sse)");
                errors.push(at(node.line_of(&format!("{path}.runtime.type")), format!("{path}.runtime.type"), message));
                continue;
            }
        };
        if catalog.servers.iter().any(|(id, _, _)| *id == entry.id) {
            errors.push(at(line, format!("{path}.id"), format!("duplicate server ID {:?}", entry.id)));
            continue;
        }
        catalog.servers.push((entry.id, server, line));
    }
    (catalog, errors, warnings)
}
