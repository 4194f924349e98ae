//! Routing inside the gateway: aggregated and one-server lists, a call by name
//! (`server__tool`), a read or subscription by URI (through the resource index), completion
//! references and log levels, each checked against the caller's grants.
//!
//! Invariants: something the grants hide is answered exactly like something that does not
//! exist; every request reads the config of its own snapshot (passed in), never a newer one.

use futures_util::future::join_all;
use serde_json::value::RawValue;

use super::{Ctx, Gateway, Request, Routed, live};
use crate::authz::GrantKind;
use crate::config::{Config, Share};
use crate::mcp::jsonrpc::{self, RawObject, Reply, code};
use crate::mcp::lists::{self, ListKind};
use crate::mcp::resources::Resolved;
use crate::mcp::session::{self, Scope};

impl Gateway {
    pub(super) async fn list(&self, config: &Config, ctx: &Ctx, req: &Request<'_>, kind: ListKind) -> Reply {
        if let Scope::One(name) = &ctx.scope {
            return self.list_one(config, ctx, req, kind, name).await;
        }
        let cursor = req.params.and_then(|p| RawObject::parse(p).ok()).and_then(|o| o.get_str("cursor"));
        let Some(entries) = self.list_entries(config, ctx, kind, cursor.as_deref()) else {
            return Reply::error(code::INVALID_PARAMS, "Invalid cursor");
        };
        let calls = entries.iter().map(|(server, upstream_cursor)| async move {
            let def = config.server(server)?;
            // A per-user server the caller has not linked yet: left out until it does.
            if self.account_needed(config, def, ctx).await.is_some() {
                return None;
            }
            let up = self.instance_of(def, &ctx.caller, &ctx.who.identity)?;
            live(&up).await?;
            let params = upstream_cursor.as_ref().map(|c| format!(r#"{{"cursor":{}}}"#, jsonrpc::quote(c)));
            let params = params.map(jsonrpc::raw);
            match up.call(kind.method(), params.as_deref(), &[], &ctx.caller, None).await {
                Ok(r) if !r.is_error => Some((server.clone(), r)),
                Ok(r) => {
                    tracing::debug!(server, error = r.payload_str(), "list failed; left out");
                    None
                }
                Err(e) => {
                    tracing::debug!(server, error = %e, "list failed; left out");
                    None
                }
            }
        });
        let results: Vec<(String, Reply)> = join_all(calls).await.into_iter().flatten().collect();
        if kind == ListKind::Resources || kind == ListKind::Templates {
            // Index every page first, so a collision within this very page is already known.
            for (server, reply) in &results {
                self.index_resources(server, kind, reply);
            }
        }
        let (items, next) =
            lists::merge_pages(&self.resources, &config.separator, &ctx.who.identity.grants, kind, results);
        let mut out = format!(r#"{{"{}":{items}"#, kind.field());
        if !next.is_empty() {
            out.push_str(&format!(
                r#","nextCursor":{}"#,
                jsonrpc::quote(&self.cursors.seal(&next, &ctx.who.identity.key, kind))
            ));
        }
        out.push('}');
        Reply::owned(out, false)
    }

    /// A list on one server's own endpoint: its page as it is, less what the caller may not use.
    pub(super) async fn list_one(
        &self,
        config: &Config,
        ctx: &Ctx,
        req: &Request<'_>,
        kind: ListKind,
        name: &str,
    ) -> Reply {
        let unavailable = || Reply::error(code::UPSTREAM_ERROR, &format!("server {name} is not available"));
        let Some(def) = config.server(name) else { return unavailable() };
        if let Some(link) = self.account_needed(config, def, ctx).await {
            return link;
        }
        let Some(up) = self.instance_of(def, &ctx.caller, &ctx.who.identity) else { return unavailable() };
        match up.call(req.method, req.params, &[], &ctx.caller, req.id).await {
            Ok(r) => {
                if kind == ListKind::Resources || kind == ListKind::Templates {
                    self.index_resources(name, kind, &r);
                }
                if r.is_error || ctx.who.identity.grants.patterns(kind.grant()).is_open() {
                    return r;
                }
                self.filter_one(config, ctx, name, kind, r)
            }
            Err(e) => e.to_reply(),
        }
    }

    /// Which servers (and their own cursors) an aggregated page asks: every server in scope
    /// for a first page, the cursor's for a later one. None for a cursor that is not valid for
    /// this identity, scope and list, or names a server the identity may no longer reach.
    pub(super) fn list_entries(
        &self,
        config: &Config,
        ctx: &Ctx,
        kind: ListKind,
        cursor: Option<&str>,
    ) -> Option<Vec<(String, Option<String>)>> {
        let Some(c) = cursor else {
            let servers = self.servers_in_scope(config, &ctx.scope, &ctx.who.identity);
            return Some(servers.iter().map(|d| (d.name.clone(), None)).collect());
        };
        self.cursors.open(c, &ctx.who.identity.key, kind).filter(|e| {
            e.iter().all(|(s, _)| {
                config.server(s).is_some_and(|d| d.enabled)
                    && ctx.scope.includes(s)
                    && ctx.who.identity.grants.reaches(s)
            })
        })
    }

    /// A one-server list without the items the caller may not use.
    pub(super) fn filter_one(&self, config: &Config, ctx: &Ctx, server: &str, kind: ListKind, reply: Reply) -> Reply {
        let Ok(obj) = serde_json::from_str::<RawObject<'_>>(reply.payload_str()) else { return reply };
        let Some(list) = obj.get(kind.field()) else { return reply };
        let Ok(list) = serde_json::from_str::<Vec<&RawValue>>(list.get()) else { return reply };
        let key = match kind {
            ListKind::Tools | ListKind::Prompts => "name",
            ListKind::Resources => "uri",
            ListKind::Templates => "uriTemplate",
        };
        let kept: Vec<&str> =
            list.iter()
                .filter(|item| {
                    RawObject::parse(item).ok().and_then(|o| o.get_str(key)).is_some_and(|name| {
                        ctx.who.identity.grants.allows(kind.grant(), server, &config.separator, &name)
                    })
                })
                .map(|item| item.get())
                .collect();
        let filtered = format!("[{}]", kept.join(","));
        let mut out = Reply::owned(obj.to_json_with(&[(kind.field(), &filtered)]), false);
        out.stateless = reply.stateless;
        out
    }

    /// A cursor: the servers still to list and their own cursors, with (under the MAC) the
    /// identity and the list it was minted for.
    pub(super) fn index_resources(&self, server: &str, kind: ListKind, reply: &Reply) {
        if reply.is_error {
            return;
        }
        let Ok(obj) = serde_json::from_str::<RawObject<'_>>(reply.payload_str()) else { return };
        let Some(list) = obj.get(kind.field()) else { return };
        let Ok(list) = serde_json::from_str::<Vec<&RawValue>>(list.get()) else { return };
        for item in list {
            let Ok(o) = RawObject::parse(item) else { continue };
            match kind {
                ListKind::Resources => {
                    if let Some(uri) = o.get_str("uri") {
                        self.resources.add_uri(server, uri);
                    }
                }
                ListKind::Templates => {
                    if let Some(t) = o.get_str("uriTemplate") {
                        self.resources.add_template(server, &t);
                    }
                }
                _ => {}
            }
        }
    }

    pub(super) async fn refresh_resource_index(&self, config: &Config, ctx: &Ctx) {
        for def in self.servers_in_scope(config, &ctx.scope, &ctx.who.identity) {
            let Some(up) = self.instance(config, &def.name, &ctx.caller, &ctx.who.identity) else { continue };
            if up.connection().is_none() {
                continue;
            }
            for kind in [ListKind::Resources, ListKind::Templates] {
                let mut cursor: Option<String> = None;
                for _ in 0..100 {
                    let params =
                        cursor.as_ref().map(|c| jsonrpc::raw(format!(r#"{{"cursor":{}}}"#, jsonrpc::quote(c))));
                    let Ok(r) = up.call(kind.method(), params.as_deref(), &[], &ctx.caller, None).await else { break };
                    self.index_resources(&def.name, kind, &r);
                    cursor = RawObject::parse(jsonrpc::raw(r.payload_str().to_owned()).as_ref())
                        .ok()
                        .and_then(|o| o.get_str("nextCursor"));
                    if cursor.is_none() {
                        break;
                    }
                }
            }
        }
    }

    pub(super) async fn by_name(&self, config: &Config, ctx: &Ctx, req: &Request<'_>, routed: &mut Routed) -> Reply {
        let what = if req.method == "tools/call" { "tool" } else { "prompt" };
        let Some(params) = req.params else {
            return Reply::error(code::INVALID_PARAMS, "params.name is required");
        };
        let Ok(obj) = RawObject::parse(params) else {
            return Reply::error(code::INVALID_PARAMS, "params must be an object");
        };
        let Some(name) = obj.get_str("name") else {
            return Reply::error(code::INVALID_PARAMS, "params.name is required");
        };
        let unknown = || Reply::error(code::INVALID_PARAMS, &format!("Unknown {what}: {name}"));
        let (server, inner, edit) = match &ctx.scope {
            Scope::One(s) => (s.clone(), name.clone(), false),
            Scope::All => match name.split_once(config.separator.as_str()) {
                Some((s, t)) if !t.is_empty() => (s.to_owned(), t.to_owned(), true),
                _ => return unknown(),
            },
        };
        if !ctx.scope.includes(&server) {
            return unknown();
        }
        // Not granted answers exactly like unknown: the item is absent from the caller's lists.
        let kind = if req.method == "tools/call" { GrantKind::Tool } else { GrantKind::Prompt };
        routed.target(&server, Some(&inner));
        if !ctx.who.identity.grants.allows(kind, &server, &config.separator, &inner) {
            routed.refuse_item(ctx, config, kind, &server, &inner, &format!("refused: {what} not granted"));
            return unknown();
        }
        let Some(def) = config.server(&server) else { return unknown() };
        if let Some(link) = self.account_needed(config, def, ctx).await {
            return link;
        }
        let Some(up) = self.instance_of(def, &ctx.caller, &ctx.who.identity) else { return unknown() };
        let quoted = jsonrpc::quote(&inner);
        let edits: &[(&str, &str)] = if edit { &[("name", &quoted)] } else { &[] };
        match up.call(req.method, Some(params), edits, &ctx.caller, req.id).await {
            Ok(r) => self.show_uris(ctx, &server, r),
            Err(e) => e.to_reply(),
        }
    }

    pub(super) async fn by_uri(&self, config: &Config, ctx: &Ctx, req: &Request<'_>, routed: &mut Routed) -> Reply {
        let Some(uri) = req.params.and_then(|p| RawObject::parse(p).ok()).and_then(|o| o.get_str("uri")) else {
            return Reply::error(code::INVALID_PARAMS, "params.uri is required");
        };
        let (server, own) = match self.resolve_uri(config, ctx, &uri).await {
            Resolved::Found { server, uri } => (server, uri),
            Resolved::Ambiguous => {
                return Reply::error(
                    code::RESOURCE_NOT_FOUND,
                    &format!("Resource {uri} is listed by several servers: use the URI resources/list shows"),
                );
            }
            Resolved::Unknown => {
                return Reply::error(code::RESOURCE_NOT_FOUND, &format!("Resource not found: {uri}"));
            }
        };
        routed.target(&server, Some(&own));
        if !ctx.who.identity.grants.allows(GrantKind::Resource, &server, &config.separator, &own) {
            routed.refuse_item(ctx, config, GrantKind::Resource, &server, &own, "refused: resource not granted");
            return Reply::error(code::RESOURCE_NOT_FOUND, &format!("Resource not found: {uri}"));
        }
        let not_found = || Reply::error(code::RESOURCE_NOT_FOUND, &format!("Resource not found: {uri}"));
        let Some(def) = config.server(&server) else { return not_found() };
        if let Some(link) = self.account_needed(config, def, ctx).await {
            return link;
        }
        let Some(up) = self.instance_of(def, &ctx.caller, &ctx.who.identity) else { return not_found() };
        match req.method {
            "resources/subscribe" => {
                let Some(session) = &ctx.caller.session else {
                    return Reply::error(
                        code::METHOD_NOT_FOUND,
                        "resources/subscribe needs a session; use subscriptions/listen",
                    );
                };
                self.subscribe(&server, &up, session, &own, &ctx.caller, req.id).await
            }
            "resources/unsubscribe" => {
                if let Some(session) = &ctx.caller.session
                    && session.unsubscribe(&server, &own)
                {
                    self.release_subscription(&server, &own).await;
                }
                Reply::owned("{}".into(), false)
            }
            _ => {
                let quoted = jsonrpc::quote(&own);
                let edits: &[(&str, &str)] = if own == uri { &[] } else { &[("uri", &quoted)] };
                match up.call(req.method, req.params, edits, &ctx.caller, req.id).await {
                    Ok(r) => self.show_uris(ctx, &server, r),
                    Err(e) => e.to_reply(),
                }
            }
        }
    }

    /// The owner of a URI a client wrote, and the owner's own URI: the endpoint's own server
    /// as is, else by the resource index (refreshed once when it does not know the URI).
    pub(super) async fn resolve_uri(&self, config: &Config, ctx: &Ctx, uri: &str) -> Resolved {
        if let Scope::One(s) = &ctx.scope {
            return Resolved::Found { server: s.clone(), uri: uri.to_owned() };
        }
        match self.resources.resolve(uri, &ctx.scope) {
            Resolved::Unknown => {
                self.refresh_resource_index(config, ctx).await;
                self.resources.resolve(uri, &ctx.scope)
            }
            found => found,
        }
    }

    /// Rewrites the colliding URIs in a result for aggregate clients (see `mcp::resources`).
    pub(super) fn show_uris(&self, ctx: &Ctx, server: &str, reply: Reply) -> Reply {
        if ctx.scope != Scope::All || reply.is_error {
            return reply;
        }
        match self.resources.rewrite_result(server, reply.payload_str()) {
            Some(rewritten) => {
                let mut r = Reply::owned(rewritten, false);
                r.stateless = reply.stateless;
                r
            }
            None => reply,
        }
    }

    pub(super) async fn complete(&self, config: &Config, ctx: &Ctx, req: &Request<'_>, routed: &mut Routed) -> Reply {
        let Some(params) = req.params else { return Reply::error(code::INVALID_PARAMS, "params.ref is required") };
        let Ok(obj) = RawObject::parse(params) else {
            return Reply::error(code::INVALID_PARAMS, "params must be an object");
        };
        let Some(r) = obj.get("ref").and_then(|r| RawObject::parse(r).ok()) else {
            return Reply::error(code::INVALID_PARAMS, "params.ref is required");
        };
        let (server, edits) = match (r.get_str("type").as_deref(), &ctx.scope) {
            (_, Scope::One(s)) => (Some(s.clone()), None),
            (Some("ref/prompt"), Scope::All) => {
                match r.get_str("name").as_deref().and_then(|n| n.split_once(config.separator.as_str())) {
                    Some((s, p)) => (Some(s.to_owned()), Some(r.to_json_with(&[("name", &jsonrpc::quote(p))]))),
                    None => (None, None),
                }
            }
            (Some("ref/resource"), Scope::All) => {
                let uri = r.get_str("uri").unwrap_or_default();
                match self.resources.resolve(&uri, &ctx.scope) {
                    Resolved::Found { server, uri: own } if own != uri => {
                        (Some(server), Some(r.to_json_with(&[("uri", &jsonrpc::quote(&own))])))
                    }
                    Resolved::Found { server, .. } => (Some(server), None),
                    _ => (None, None),
                }
            }
            _ => (None, None),
        };
        let Some(server) = server else { return Reply::error(code::INVALID_PARAMS, "Unknown completion reference") };
        let granted = match r.get_str("type").as_deref() {
            Some("ref/prompt") => {
                let name = r.get_str("name").unwrap_or_default();
                let inner = match &ctx.scope {
                    Scope::All => {
                        name.split_once(config.separator.as_str()).map_or(name.clone(), |(_, p)| p.to_owned())
                    }
                    Scope::One(_) => name.clone(),
                };
                ctx.who.identity.grants.allows(GrantKind::Prompt, &server, &config.separator, &inner)
            }
            Some("ref/resource") => {
                let uri = r.get_str("uri").unwrap_or_default();
                let own = match self.resources.resolve(&uri, &ctx.scope) {
                    Resolved::Found { uri, .. } => uri,
                    _ => uri,
                };
                ctx.who.identity.grants.allows(GrantKind::Resource, &server, &config.separator, &own)
            }
            _ => ctx.who.identity.grants.reaches(&server),
        };
        if !granted || !ctx.scope.includes(&server) {
            routed.refuse(&server, "completion", "refused: reference not granted");
            return Reply::error(code::INVALID_PARAMS, "Unknown completion reference");
        }
        let Some(up) = self.instance(config, &server, &ctx.caller, &ctx.who.identity) else {
            return Reply::error(code::INVALID_PARAMS, "Unknown completion reference");
        };
        let edit_list: Vec<(&str, &str)> = edits.as_deref().map(|e| vec![("ref", e)]).unwrap_or_default();
        match up.call(req.method, Some(params), &edit_list, &ctx.caller, req.id).await {
            Ok(r) => r,
            Err(e) => e.to_reply(),
        }
    }

    /// `logging/setLevel`: recorded on the session (Portcullis filters what reaches it) and
    /// applied upstream: as is on the session's own instances, and on a shared one as the most
    /// verbose level any of its sessions wants (a session that never set one wants everything),
    /// so no session's choice reaches another's stream.
    pub(super) async fn set_level(&self, config: &Config, ctx: &Ctx, req: &Request<'_>) -> Reply {
        let level = req.params.and_then(|p| RawObject::parse(p).ok()).and_then(|o| o.get_str("level"));
        let Some(rank) = level.as_deref().and_then(session::log_rank) else {
            return Reply::error(
                code::INVALID_PARAMS,
                &format!("logging/setLevel: params.level must be one of {}", session::LOG_LEVELS.join(", ")),
            );
        };
        // A 2026-07-28 caller states its level in each request's `_meta`; nothing to keep.
        let Some(s) = &ctx.caller.session else { return Reply::owned("{}".into(), false) };
        s.set_log_level(rank);
        let mut updates = Vec::new();
        for def in self.servers_in_scope(config, &ctx.scope, &ctx.who.identity) {
            if def.share == Share::PerSession {
                if let Some(up) = self.instance(config, &def.name, &ctx.caller, &ctx.who.identity) {
                    updates.push((up, rank));
                }
            } else if let Some(up) = self.upstream(&def.name) {
                updates.push((up, self.shared_log_level(&def.name).unwrap_or(rank)));
            }
        }
        join_all(updates.iter().map(|(up, rank)| up.set_log_level(*rank))).await;
        Reply::owned("{}".into(), false)
    }

    /// The most verbose level wanted by the sessions that see a shared server.
    pub(super) fn shared_log_level(&self, server: &str) -> Option<u8> {
        self.sessions.values().iter().filter(|s| s.scope.includes(server)).map(|s| s.log_level().unwrap_or(0)).min()
    }
}
