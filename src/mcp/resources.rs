//! The resource index: which server owns a URI, and how URIs are shown when servers collide.
//!
//! Invariants: a URI is shown as its server wrote it unless two servers of the aggregate list
//! it (or list templates with the same fixed prefix); then, for aggregate clients, it is shown
//! as `portcullis://{server}/{uri}` everywhere it appears: lists, `resources/read` answers,
//! subscriptions, `notifications/resources/updated`, and `resource_link` / embedded resources
//! in tool and prompt results. Requests name the shown form and go upstream with the server's
//! own. `/servers/{name}/mcp` always sees the server's own URIs. Results are only walked for a
//! server that has a collision, so the common case costs nothing.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::Value;

use super::session::Scope;
use crate::sharded::lock;

/// The scheme of rewritten URIs.
pub(crate) const PREFIX: &str = "portcullis://";

/// What the gateway knows of every server's resources.
#[derive(Default)]
pub(crate) struct ResourceIndex {
    /// URI → the servers that list it.
    uris: Mutex<HashMap<String, Vec<String>>>,
    /// (server, fixed prefix of a URI template).
    templates: Mutex<Vec<(String, String)>>,
    /// Servers with at least one colliding URI or template.
    colliding: Mutex<HashSet<String>>,
    /// Whether `colliding` is non-empty: every tool result asks, so the common answer (no
    /// collision anywhere) takes no lock.
    any: AtomicBool,
}

/// How a URI resolved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Resolved {
    /// Owned by this server, under this URI of its own.
    Found { server: String, uri: String },
    /// Listed by several servers: the client must use a rewritten URI.
    Ambiguous,
    /// Nobody lists it.
    Unknown,
}

fn template_prefix(template: &str) -> &str {
    template.split('{').next().unwrap_or("")
}

impl ResourceIndex {
    /// Records a resource a server listed.
    pub(crate) fn add_uri(&self, server: &str, uri: String) {
        let mut uris = lock(&self.uris);
        let owners = uris.entry(uri).or_default();
        if !owners.iter().any(|s| s == server) {
            owners.push(server.to_owned());
        }
        if owners.len() > 1 {
            lock(&self.colliding).extend(owners.iter().cloned());
            self.any.store(true, Ordering::Relaxed);
        }
    }

    /// Records a URI template a server listed.
    pub(crate) fn add_template(&self, server: &str, template: &str) {
        let prefix = template_prefix(template).to_owned();
        let mut templates = lock(&self.templates);
        if templates.iter().any(|(s, p)| s == server && *p == prefix) {
            return;
        }
        let others: Vec<String> =
            templates.iter().filter(|(s, p)| s != server && *p == prefix).map(|(s, _)| s.clone()).collect();
        templates.push((server.to_owned(), prefix));
        if !others.is_empty() {
            let mut colliding = lock(&self.colliding);
            colliding.insert(server.to_owned());
            colliding.extend(others);
            self.any.store(true, Ordering::Relaxed);
        }
    }

    /// Forgets a server's resources (it stopped, or its list changed).
    pub(crate) fn forget(&self, server: &str) {
        let mut uris = lock(&self.uris);
        uris.retain(|_, owners| {
            owners.retain(|s| s != server);
            !owners.is_empty()
        });
        let mut templates = lock(&self.templates);
        templates.retain(|(s, _)| s != server);
        let mut colliding: HashSet<String> =
            uris.values().filter(|o| o.len() > 1).flat_map(|o| o.iter().cloned()).collect();
        for (s, p) in templates.iter() {
            if templates.iter().any(|(s2, p2)| s2 != s && p2 == p) {
                colliding.insert(s.clone());
            }
        }
        self.any.store(!colliding.is_empty(), Ordering::Relaxed);
        *lock(&self.colliding) = colliding;
    }

    /// Whether a server has any colliding URI (results need walking only then).
    pub(crate) fn has_collisions(&self, server: &str) -> bool {
        self.any.load(Ordering::Relaxed) && lock(&self.colliding).contains(server)
    }

    /// Whether a server's URI is also another server's.
    fn collides(&self, server: &str, uri: &str) -> bool {
        if !self.has_collisions(server) {
            return false;
        }
        if lock(&self.uris).get(uri).is_some_and(|o| o.len() > 1 && o.iter().any(|s| s == server)) {
            return true;
        }
        let templates = lock(&self.templates);
        let mine = templates
            .iter()
            .filter(|(s, p)| s == server && !p.is_empty() && uri.starts_with(p.as_str()))
            .max_by_key(|(_, p)| p.len());
        mine.is_some_and(|(_, p)| templates.iter().any(|(s2, p2)| s2 != server && p2 == p))
    }

    /// A server's URI as aggregate clients see it.
    pub(crate) fn show<'a>(&self, server: &str, uri: &'a str) -> Cow<'a, str> {
        if self.collides(server, uri) { Cow::Owned(format!("{PREFIX}{server}/{uri}")) } else { Cow::Borrowed(uri) }
    }

    /// A server's URI template as aggregate clients see it.
    pub(crate) fn show_template<'a>(&self, server: &str, template: &'a str) -> Cow<'a, str> {
        let prefix = template_prefix(template);
        let clash =
            self.has_collisions(server) && lock(&self.templates).iter().any(|(s, p)| s != server && p == prefix);
        if clash { Cow::Owned(format!("{PREFIX}{server}/{template}")) } else { Cow::Borrowed(template) }
    }

    /// Finds the owner of a URI as an aggregate client wrote it.
    pub(crate) fn resolve(&self, shown: &str, scope: &Scope) -> Resolved {
        if let Some(rest) = shown.strip_prefix(PREFIX)
            && let Some((server, uri)) = rest.split_once('/')
            && scope.includes(server)
        {
            return Resolved::Found { server: server.to_owned(), uri: uri.to_owned() };
        }
        if let Some(owners) = lock(&self.uris).get(shown) {
            let owners: Vec<&String> = owners.iter().filter(|s| scope.includes(s)).collect();
            match owners[..] {
                [one] => return Resolved::Found { server: one.clone(), uri: shown.to_owned() },
                [] => {}
                _ => return Resolved::Ambiguous,
            }
        }
        let templates = lock(&self.templates);
        let best = templates
            .iter()
            .filter(|(s, p)| scope.includes(s) && !p.is_empty() && shown.starts_with(p.as_str()))
            .map(|(_, p)| p.len())
            .max();
        let Some(len) = best else { return Resolved::Unknown };
        let owners: Vec<&String> = templates
            .iter()
            .filter(|(s, p)| scope.includes(s) && p.len() == len && shown.starts_with(p.as_str()))
            .map(|(s, _)| s)
            .collect();
        match owners[..] {
            [one] => Resolved::Found { server: one.clone(), uri: shown.to_owned() },
            _ => Resolved::Ambiguous,
        }
    }

    /// Rewrites every colliding `uri` (and `uriTemplate`) member in a result of `server`, at
    /// any depth; `None` when nothing changed (or the server has no collision).
    pub(crate) fn rewrite_result(&self, server: &str, payload: &str) -> Option<String> {
        if !self.has_collisions(server) {
            return None;
        }
        let mut value: Value = serde_json::from_str(payload).ok()?;
        let changed = self.walk(server, &mut value);
        changed.then(|| value.to_string())
    }

    fn walk(&self, server: &str, v: &mut Value) -> bool {
        match v {
            Value::Object(map) => {
                let mut changed = false;
                for (k, child) in map.iter_mut() {
                    match (k.as_str(), &*child) {
                        ("uri", Value::String(s)) => {
                            if let Cow::Owned(shown) = self.show(server, s) {
                                *child = Value::String(shown);
                                changed = true;
                            }
                        }
                        ("uriTemplate", Value::String(s)) => {
                            if let Cow::Owned(shown) = self.show_template(server, s) {
                                *child = Value::String(shown);
                                changed = true;
                            }
                        }
                        _ => changed |= self.walk(server, child),
                    }
                }
                changed
            }
            Value::Array(items) => items.iter_mut().fold(false, |acc, i| self.walk(server, i) | acc),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_collisions_are_rewritten_and_resolve_back() {
        let idx = ResourceIndex::default();
        idx.add_uri("a", "file:///x".into());
        idx.add_uri("a", "only://a".into());
        assert_eq!(idx.show("a", "file:///x"), "file:///x");
        idx.add_uri("b", "file:///x".into());
        assert_eq!(idx.show("a", "file:///x"), "portcullis://a/file:///x");
        assert_eq!(idx.show("b", "file:///x"), "portcullis://b/file:///x");
        assert_eq!(idx.show("a", "only://a"), "only://a");
        assert_eq!(idx.resolve("file:///x", &Scope::All), Resolved::Ambiguous);
        assert_eq!(
            idx.resolve("portcullis://b/file:///x", &Scope::All),
            Resolved::Found { server: "b".into(), uri: "file:///x".into() }
        );
        assert_eq!(
            idx.resolve("only://a", &Scope::All),
            Resolved::Found { server: "a".into(), uri: "only://a".into() }
        );
        idx.forget("b");
        assert_eq!(idx.show("a", "file:///x"), "file:///x");
    }

    #[test]
    fn templates_collide_by_prefix() {
        let idx = ResourceIndex::default();
        idx.add_template("a", "demo://items/{id}");
        idx.add_template("b", "demo://items/{id}");
        assert_eq!(idx.show_template("a", "demo://items/{id}"), "portcullis://a/demo://items/{id}");
        assert_eq!(idx.show("b", "demo://items/7"), "portcullis://b/demo://items/7");
        assert_eq!(idx.resolve("demo://items/7", &Scope::All), Resolved::Ambiguous);
        let r = idx.rewrite_result("a", r#"{"content":[{"type":"resource_link","uri":"demo://items/1"}]}"#).unwrap();
        assert_eq!(r, r#"{"content":[{"type":"resource_link","uri":"portcullis://a/demo://items/1"}]}"#);
        assert!(idx.rewrite_result("a", r#"{"content":[{"type":"text","text":"hi"}]}"#).is_none());
    }
}
