//! The aggregated lists: which list a request is, reading a server's page in one pass,
//! prefixing names, merging pages under the caller's grants, and the MAC-sealed cursors that
//! carry each server's own cursor.
//!
//! Invariants: pure (no I/O, no gateway state beyond what is passed in), so every rule is
//! table-testable; a cursor is valid only for the principal and the list it was sealed for,
//! and a tampered one opens to nothing; an item the grants hide is never in a merged page.

use base64::Engine;
use hmac::{KeyInit, Mac};

use super::jsonrpc::{self, Item, RawObject, Reply};
use super::resources::ResourceIndex;
use crate::authz::{GrantKind, Grants};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
/// Which list.
pub(crate) enum ListKind {
    /// `tools/list`.
    Tools,
    /// `prompts/list`.
    Prompts,
    /// `resources/list`.
    Resources,
    /// `resources/templates/list`.
    Templates,
}

impl ListKind {
    /// The result member that holds the items.
    pub(crate) fn field(self) -> &'static str {
        match self {
            ListKind::Tools => "tools",
            ListKind::Prompts => "prompts",
            ListKind::Resources => "resources",
            ListKind::Templates => "resourceTemplates",
        }
    }
    /// The method.
    pub(crate) fn method(self) -> &'static str {
        match self {
            ListKind::Tools => "tools/list",
            ListKind::Prompts => "prompts/list",
            ListKind::Resources => "resources/list",
            ListKind::Templates => "resources/templates/list",
        }
    }
    /// The grant that covers its items.
    pub(crate) fn grant(self) -> GrantKind {
        match self {
            ListKind::Tools => GrantKind::Tool,
            ListKind::Prompts => GrantKind::Prompt,
            ListKind::Resources | ListKind::Templates => GrantKind::Resource,
        }
    }
}

/// The key that seals list cursors, minted once per gateway.
pub(crate) struct CursorKey([u8; 32]);

impl CursorKey {
    /// A key from 32 random bytes.
    pub(crate) fn new(key: [u8; 32]) -> CursorKey {
        CursorKey(key)
    }

    fn mac(&self) -> Option<HmacSha256> {
        <HmacSha256 as KeyInit>::new_from_slice(&self.0).ok()
    }

    /// The cursor of an aggregated page: each server still to be read and its own cursor,
    /// bound to the principal and the list.
    pub(crate) fn seal(&self, entries: &[(String, Option<String>)], principal: &str, kind: ListKind) -> String {
        let payload = serde_json::to_vec(&(principal, kind.method(), entries)).unwrap_or_default();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let tag = self.mac().map(|mut mac| {
            mac.update(&payload);
            mac.finalize().into_bytes()
        });
        let tag = tag.as_ref().map_or(&[][..], |t| &t[..16]);
        format!("{}.{}", b64.encode(&payload), b64.encode(tag))
    }

    /// What a cursor sealed for this principal and list holds; None for any other cursor.
    pub(crate) fn open(&self, cursor: &str, principal: &str, kind: ListKind) -> Option<Vec<(String, Option<String>)>> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let (payload, tag) = cursor.split_once('.')?;
        let payload = b64.decode(payload).ok()?;
        let tag = b64.decode(tag).ok()?;
        let mut mac = self.mac()?;
        mac.update(&payload);
        mac.verify_truncated_left(&tag).ok()?;
        let (key, method, entries): (String, String, Vec<(String, Option<String>)>) =
            serde_json::from_slice(&payload).ok()?;
        (key == principal && method == kind.method()).then_some(entries)
    }
}

/// Appends one tool or prompt of a server's list as the aggregate shows it (`server__name`),
/// after a comma when `out` already holds an item; false (and nothing appended) when the grants
/// hide it or it has no name. Only the `name` member changes; the rest is copied as the server
/// sent it, in one pass and without parsing it.
pub fn push_prefixed(
    out: &mut String,
    item: &Item<'_>,
    server: &str,
    separator: &str,
    grants: &crate::authz::Grants,
    kind: GrantKind,
) -> bool {
    let json = item.text;
    let Some(span) = item.member.clone() else { return false };
    let raw = &json[span.clone()];
    let name: std::borrow::Cow<'_, str> = if raw.contains('\\') {
        match serde_json::from_str::<String>(raw) {
            Ok(n) => std::borrow::Cow::Owned(n),
            Err(_) => return false,
        }
    } else {
        match raw.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
            Some(n) => std::borrow::Cow::Borrowed(n),
            None => return false,
        }
    };
    if !grants.allows(kind, server, separator, &name) {
        return false;
    }
    if !out.ends_with('[') {
        out.push(',');
    }
    out.push_str(&json[..span.start]);
    if raw.contains('\\') || !server.is_ascii() || separator.contains(['"', '\\']) {
        jsonrpc::push_quoted(out, &format!("{server}{separator}{name}"));
    } else {
        out.push('"');
        out.push_str(server);
        out.push_str(separator);
        out.push_str(&name);
        out.push('"');
    }
    out.push_str(&json[span.end..]);
    true
}

/// A list page in one pass: its items (whichever list it is) and its cursor.
#[derive(Default)]
pub struct ListPage<'a> {
    tools: Option<Vec<Item<'a>>>,
    prompts: Option<Vec<Item<'a>>>,
    resources: Option<Vec<Item<'a>>>,
    resource_templates: Option<Vec<Item<'a>>>,
    /// The cursor of the next page, if any.
    pub next_cursor: Option<std::borrow::Cow<'a, str>>,
}

impl<'a> ListPage<'a> {
    /// Reads a list result. Every reply passed a validating parse when it arrived, so this is a
    /// light scan ([`jsonrpc::members`], [`jsonrpc::Members::array`]) that copies nothing; None
    /// when the result is not an object or a list is not an array.
    pub fn parse(payload: &'a str) -> Option<Self> {
        let mut page = ListPage::default();
        let mut members = jsonrpc::members(payload);
        while let Some(raw_key) = members.key() {
            let key = jsonrpc::unescape_key(raw_key)?;
            let (list, member) = match key.as_ref() {
                "tools" => (&mut page.tools, "name"),
                "prompts" => (&mut page.prompts, "name"),
                "resources" => (&mut page.resources, "uri"),
                "resourceTemplates" => (&mut page.resource_templates, "uriTemplate"),
                "nextCursor" => {
                    let value = &payload[members.value()?];
                    page.next_cursor = match value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                        Some(v) if !v.contains('\\') => Some(std::borrow::Cow::Borrowed(v)),
                        Some(_) => Some(std::borrow::Cow::Owned(serde_json::from_str::<String>(value).ok()?)),
                        None => None,
                    };
                    continue;
                }
                _ => {
                    members.value()?;
                    continue;
                }
            };
            *list = Some(members.array(member)?);
        }
        Some(page)
    }

    /// The items of the list named `field` (`tools`, `prompts`, `resources`, `resourceTemplates`),
    /// each with the span of its identifying member (`name`, `uri` or `uriTemplate`).
    pub fn items(&self, field: &str) -> &[Item<'a>] {
        let list = match field {
            "tools" => &self.tools,
            "prompts" => &self.prompts,
            "resources" => &self.resources,
            _ => &self.resource_templates,
        };
        list.as_deref().unwrap_or_default()
    }
}

/// The items of every server's page, prefixed and filtered by the caller's grants, as one
/// JSON array; and the servers that have more.
pub(crate) fn merge_pages(
    resources: &ResourceIndex,
    separator: &str,
    grants: &Grants,
    kind: ListKind,
    results: Vec<(String, Reply)>,
) -> (String, Vec<(String, Option<String>)>) {
    let mut items = String::from("[");
    let mut next: Vec<(String, Option<String>)> = Vec::new();
    for (server, reply) in results {
        let Some(page) = ListPage::parse(reply.payload_str()) else { continue };
        if let Some(c) = &page.next_cursor {
            next.push((server.clone(), Some(c.to_string())));
        }
        for item in page.items(kind.field()) {
            let rewritten = match kind {
                ListKind::Tools | ListKind::Prompts => {
                    push_prefixed(&mut items, item, &server, separator, grants, kind.grant());
                    continue;
                }
                ListKind::Resources | ListKind::Templates => {
                    let key = if kind == ListKind::Resources { "uri" } else { "uriTemplate" };
                    let Ok(o) = serde_json::from_str::<RawObject>(item.text) else { continue };
                    let own = o.get_str(key).unwrap_or_default();
                    if !grants.allows(GrantKind::Resource, &server, separator, &own) {
                        continue;
                    }
                    let shown = match kind {
                        ListKind::Resources => resources.show(&server, &own),
                        _ => resources.show_template(&server, &own),
                    };
                    match shown {
                        std::borrow::Cow::Owned(shown) => o.to_json_with(&[(key, &jsonrpc::quote(&shown))]),
                        std::borrow::Cow::Borrowed(_) => item.text.to_owned(),
                    }
                }
            };
            if items.len() > 1 {
                items.push(',');
            }
            items.push_str(&rewritten);
        }
    }
    items.push(']');
    (items, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_open_only_for_their_principal_and_list() {
        let key = CursorKey::new([7; 32]);
        let entries = vec![("files".to_owned(), Some("p2".to_owned())), ("db".to_owned(), None)];
        let c = key.seal(&entries, "config:alice", ListKind::Tools);
        assert_eq!(key.open(&c, "config:alice", ListKind::Tools), Some(entries.clone()));
        assert_eq!(key.open(&c, "config:bob", ListKind::Tools), None);
        assert_eq!(key.open(&c, "config:alice", ListKind::Prompts), None);
        assert_eq!(CursorKey::new([8; 32]).open(&c, "config:alice", ListKind::Tools), None);
        let (payload, tag) = c.split_once('.').unwrap();
        let forged = format!("{}x.{tag}", &payload[..payload.len() - 1]);
        assert_eq!(key.open(&forged, "config:alice", ListKind::Tools), None);
        assert_eq!(key.open("garbage", "config:alice", ListKind::Tools), None);
    }

    #[test]
    fn merged_pages_prefix_names_and_keep_only_what_the_grants_allow() {
        let page = |json: &str| Reply::owned(json.to_owned(), false);
        let results = vec![
            ("files".to_owned(), page(r#"{"tools":[{"name":"read","x":1},{"name":"secret"}],"nextCursor":"n1"}"#)),
            ("db".to_owned(), page(r#"{"tools":[{"name":"query"}]}"#)),
        ];
        let grants = Grants::from_lists(&[], &["*".to_owned(), "!files__secret".to_owned()], &[], &[]);
        let (items, next) = merge_pages(&ResourceIndex::default(), "__", &grants, ListKind::Tools, results);
        assert_eq!(items, r#"[{"name":"files__read","x":1},{"name":"db__query"}]"#);
        assert_eq!(next, [("files".to_owned(), Some("n1".to_owned()))]);
    }
}
