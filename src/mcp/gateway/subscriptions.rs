//! Resource subscriptions: `resources/subscribe` on session-era upstreams (shared instances
//! subscribed once, reference-counted) and the 2026-07-28 `subscriptions/listen` stream.
//!
//! Invariants: a subscription outside the caller's grants is refused like an unknown resource;
//! a shared upstream is unsubscribed when its last subscriber goes.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use super::{Ctx, Gateway, Routed};
use crate::authz::GrantKind;
use crate::config::Share;
use crate::mcp::jsonrpc::{self, RawObject, Reply, code};
use crate::mcp::resources::Resolved;
use crate::mcp::session::{self, Caller, Session};
use crate::mcp::upstream::Upstream;
use crate::sharded::lock;

impl Gateway {
    /// Subscribes a session to a resource. A shared instance is subscribed once for all its
    /// sessions (reference-counted); a 2026-07-28 instance through its `subscriptions/listen`.
    pub(super) async fn subscribe(
        &self,
        server: &str,
        up: &Arc<Upstream>,
        session: &Arc<Session>,
        uri: &str,
        caller: &Caller,
        down_id: Option<&str>,
    ) -> Reply {
        if !session.subscribe(server, uri) {
            return Reply::owned("{}".into(), false);
        }
        let first = {
            let mut subs = lock(&self.subscriptions);
            let n = subs.entry((server.to_owned(), uri.to_owned())).or_insert(0);
            *n += 1;
            *n == 1
        };
        if !first && up.def.share == Share::Shared {
            return Reply::owned("{}".into(), false);
        }
        if up.is_stateless() {
            up.listen_to(uri, true);
            return Reply::owned("{}".into(), false);
        }
        let params = jsonrpc::raw(format!(r#"{{"uri":{}}}"#, jsonrpc::quote(uri)));
        match up.call("resources/subscribe", Some(&params), &[], caller, down_id).await {
            Ok(r) => r,
            Err(e) => e.to_reply(),
        }
    }

    /// Opens a 2026-07-28 `subscriptions/listen` stream: a listen session that receives the
    /// change notifications it opted in to and `resources/updated` for the URIs it named.
    /// Returns the session, its message channel and the acknowledgement to send first.
    pub(crate) async fn listen(
        &self,
        ctx: &Ctx,
        id: &str,
        params: Option<&RawValue>,
        routed: &mut Routed,
    ) -> Result<(Arc<Session>, mpsc::Receiver<Bytes>, String), Reply> {
        let bad = |m: &str| Reply::error(code::INVALID_PARAMS, m);
        let obj = params.and_then(|p| RawObject::parse(p).ok()).ok_or_else(|| bad("params must be an object"))?;
        let wanted = obj
            .get("notifications")
            .and_then(|n| RawObject::parse(n).ok())
            .ok_or_else(|| bad("params.notifications is required"))?;
        let flag = |k: &str| wanted.get(k).is_some_and(|v| v.get() == "true");
        let uris: Vec<String> = match wanted.get("resourceSubscriptions") {
            Some(v) => serde_json::from_str(v.get())
                .map_err(|_| bad("params.notifications.resourceSubscriptions must be an array of strings"))?,
            None => Vec::new(),
        };
        let filter = session::ListenFilter {
            id: id.into(),
            tools: flag("toolsListChanged"),
            prompts: flag("promptsListChanged"),
            resources: flag("resourcesListChanged"),
        };
        let session =
            Session::listener(ctx.scope.clone(), ctx.protocol_version, ctx.who.identity.clone(), filter.clone())
                .map_err(|e| Reply::error(code::INTERNAL_ERROR, &e.to_string()))?;
        let (tx, rx) = mpsc::channel(256);
        let _ = session.attach_stream(tx);
        self.add_session(session.clone(), &ctx.who.snapshot.config.limits)
            .map_err(|e| Reply::error(code::LIMIT_REACHED, &e.to_string()))?;
        let caller = Caller::in_session(&session);
        let config = &ctx.who.snapshot.config;
        let mut honoured = Vec::new();
        for uri in uris {
            let Resolved::Found { server, uri: own } = self.resolve_uri(config, ctx, &uri).await else { continue };
            // Not granted is answered exactly like unknown: left out of the acknowledgement.
            if !ctx.scope.includes(&server)
                || !ctx.who.identity.grants.allows(GrantKind::Resource, &server, &config.separator, &own)
            {
                routed.refuse(&server, &own, "refused: resource not granted");
                continue;
            }
            let Some(up) = self.instance(config, &server, &caller, &ctx.who.identity) else { continue };
            if !self.subscribe(&server, &up, &session, &own, &caller, None).await.is_error {
                honoured.push(uri);
            }
        }
        let mut ack = serde_json::Map::new();
        for (key, on) in [
            ("toolsListChanged", filter.tools),
            ("promptsListChanged", filter.prompts),
            ("resourcesListChanged", filter.resources),
        ] {
            if on {
                ack.insert(key.into(), serde_json::Value::Bool(true));
            }
        }
        if !honoured.is_empty() {
            ack.insert("resourceSubscriptions".into(), serde_json::json!(honoured));
        }
        let params = format!(
            r#"{{"notifications":{},"_meta":{{"{}":{id}}}}}"#,
            serde_json::Value::Object(ack),
            session::SUBSCRIPTION_ID_META
        );
        Ok((session, rx, jsonrpc::notification("notifications/subscriptions/acknowledged", Some(&params))))
    }

    pub(super) async fn release_subscription(&self, server: &str, uri: &str) {
        let last = {
            let mut subs = lock(&self.subscriptions);
            let key = (server.to_owned(), uri.to_owned());
            match subs.get_mut(&key) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    subs.remove(&key);
                    true
                }
                None => false,
            }
        };
        if last && let Some(up) = self.upstream(server) {
            if up.is_stateless() {
                up.listen_to(uri, false);
                return;
            }
            let params = jsonrpc::raw(format!(r#"{{"uri":{}}}"#, jsonrpc::quote(uri)));
            let _ = up.call("resources/unsubscribe", Some(&params), &[], &Caller::default(), None).await;
        }
    }
}
