//! Config text as a tree of nodes, each with the line and column it starts at: YAML, JSON, and
//! JSON with comments and trailing commas (VS Code's `mcp.json`).
//!
//! Invariants: the tree keeps every key's and every value's position in the original text, so
//! an error about any field names that field's own line; JSONC is made JSON by overwriting
//! comments and trailing commas with spaces, never by removing text, so positions do not move. A
//! key written twice in one mapping is an error, not "the last one wins".

use serde_saphyr::granit_parser::{Event, Parser, ScalarStyle};

/// One value in the file.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    /// 1-based line of the value's first character.
    pub(crate) line: u32,
    /// 1-based column of the value's first character.
    pub(crate) col: u32,
    /// What it is.
    pub(crate) kind: Kind,
}

/// The three shapes a YAML value takes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Kind {
    /// A scalar's text; `plain` when it was written unquoted (so `8080` may be a number and
    /// `true` a boolean), false when quoted or a block scalar (always a string).
    Scalar { text: String, plain: bool },
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in file order.
    Map(Vec<Entry>),
}

/// One key of a mapping and its value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    /// The key's text.
    pub(crate) key: String,
    /// 1-based line of the key.
    pub(crate) line: u32,
    /// 1-based column of the key.
    pub(crate) col: u32,
    /// The value under the key.
    pub(crate) value: Node,
}

/// A syntax error: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SyntaxError {
    /// 1-based line, when the parser knows it.
    pub(crate) line: Option<u32>,
    /// What is wrong (one line).
    pub(crate) message: String,
}

impl Node {
    /// Whether this is a plain `null`, `~` or empty scalar.
    pub(crate) fn is_null(&self) -> bool {
        matches!(&self.kind, Kind::Scalar { text, plain: true } if matches!(text.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }

    /// The value under `key`, when this is a mapping that has it.
    pub(crate) fn get(&self, key: &str) -> Option<&Entry> {
        match &self.kind {
            Kind::Map(entries) => entries.iter().find(|e| e.key == key),
            _ => None,
        }
    }

    /// The line of the field a dotted path names (`servers.files.command`, `args[2]`): the
    /// deepest node the path reaches, so a path into a value the file does not have still
    /// points at its nearest ancestor.
    pub(crate) fn line_of(&self, path: &str) -> Option<u32> {
        let mut node = self;
        let mut line = None;
        let mut rest = path;
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('[') {
                let (index, tail) = after.split_once(']')?;
                let Kind::Seq(items) = &node.kind else { break };
                let Some(item) = index.parse::<usize>().ok().and_then(|i| items.get(i)) else { break };
                node = item;
                line = Some(item.line);
                rest = tail.strip_prefix('.').unwrap_or(tail);
                continue;
            }
            let Kind::Map(entries) = &node.kind else { break };
            // The longest key that the path continues from (keys may contain dots).
            let found = entries
                .iter()
                .filter(|e| {
                    rest.strip_prefix(e.key.as_str()).is_some_and(|t| t.is_empty() || t.starts_with(['.', '[']))
                })
                .max_by_key(|e| e.key.len());
            let Some(entry) = found else { break };
            line = Some(entry.line);
            node = &entry.value;
            let tail = &rest[entry.key.len()..];
            rest = tail.strip_prefix('.').unwrap_or(tail);
        }
        line
    }
}

/// Overwrites `//` and `/* */` comments and trailing commas (before `}` or `]`) with spaces,
/// leaving newlines and every other character where it was. Text inside strings is untouched.
///
/// Hand-written rather than taken from a crate: `json_comments` turns the newlines inside block
/// comments into spaces (every later line number would move) and keeps trailing commas.
pub(crate) fn jsonc_to_json(text: &str) -> String {
    let mut out: Vec<u8> = text.as_bytes().to_vec();
    let mut i = 0;
    let mut pending_comma: Option<usize> = None;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for b in &mut out[from..to] {
            if *b != b'\n' && *b != b'\r' {
                *b = b' ';
            }
        }
    };
    while i < out.len() {
        match out[i] {
            b'"' => {
                pending_comma = None;
                i += 1;
                while i < out.len() && out[i] != b'"' {
                    i += if out[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'/' if out.get(i + 1) == Some(&b'/') => {
                let end = out[i..].iter().position(|b| *b == b'\n').map_or(out.len(), |p| i + p);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if out.get(i + 1) == Some(&b'*') => {
                let end = out[i + 2..].windows(2).position(|w| w == b"*/").map_or(out.len(), |p| i + 2 + p + 2);
                blank(&mut out, i, end);
                i = end;
            }
            b',' => {
                pending_comma = Some(i);
                i += 1;
            }
            b'}' | b']' => {
                if let Some(c) = pending_comma.take() {
                    out[c] = b' ';
                }
                i += 1;
            }
            b if b.is_ascii_whitespace() => i += 1,
            _ => {
                pending_comma = None;
                i += 1;
            }
        }
    }
    // Only ASCII bytes outside strings were overwritten, with ASCII: still UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Parses YAML (JSON is YAML) into a tree; `None` for a document with no content.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, SyntaxError> {
    let mut builder = Builder::default();
    for item in Parser::new_from_str(text) {
        let (event, span) = item.map_err(|e| {
            let line = u32::try_from(e.marker().line()).ok().filter(|l| *l > 0);
            SyntaxError { line, message: e.info().lines().next().unwrap_or("invalid YAML").to_owned() }
        })?;
        let line = u32::try_from(span.start.line()).unwrap_or(u32::MAX);
        let col = u32::try_from(span.start.col() + 1).unwrap_or(u32::MAX);
        builder.event(event, line, col)?;
    }
    Ok(builder.root)
}

/// YAML's merge key: `<<: *defaults` (or a list of them) brings in the entries of those mappings
/// that the mapping does not write itself.
const MERGE_KEY: &str = "<<";

/// Resolves the merge keys of a finished mapping: its own entries win, then the merged
/// mappings in order.
fn merge_keys(node: &mut Node) {
    let Kind::Map(entries) = &mut node.kind else { return };
    if !entries.iter().any(|e| e.key == MERGE_KEY) {
        return;
    }
    let (merges, mut own): (Vec<Entry>, Vec<Entry>) =
        std::mem::take(entries).into_iter().partition(|e| e.key == MERGE_KEY);
    for merge in merges {
        let sources = match merge.value.kind {
            Kind::Seq(items) => items,
            other => vec![Node { kind: other, ..merge.value }],
        };
        for source in sources {
            // A merge of something other than a mapping stays, to be reported as an unknown key.
            let Kind::Map(from) = source.kind else {
                own.push(Entry { key: MERGE_KEY.into(), line: merge.line, col: merge.col, value: source });
                continue;
            };
            for e in from {
                if !own.iter().any(|o| o.key == e.key) {
                    own.push(e);
                }
            }
        }
    }
    *entries = own;
}

/// A collection whose end has not been read yet.
struct Open {
    node: Node,
    /// For a mapping: the key (text, line, column) waiting for its value.
    pending: Option<(String, u32, u32)>,
    /// Its anchor id (0: none).
    anchor: usize,
}

/// Assembles nodes from parser events.
#[derive(Default)]
struct Builder {
    /// Open collections.
    stack: Vec<Open>,
    /// Anchored nodes by anchor id, for aliases.
    anchors: Vec<(usize, Node)>,
    root: Option<Node>,
    documents: usize,
}

impl Builder {
    fn event(&mut self, event: Event<'_>, line: u32, col: u32) -> Result<(), SyntaxError> {
        let err = |message: &str| SyntaxError { line: Some(line), message: message.to_owned() };
        match event {
            Event::DocumentStart(..) => {
                self.documents += 1;
                if self.documents > 1 {
                    return Err(err("a config file holds one YAML document, not several"));
                }
            }
            Event::Scalar(text, style, anchor, _) => {
                let plain = style == ScalarStyle::Plain;
                self.value(Node { line, col, kind: Kind::Scalar { text: text.into_owned(), plain } }, anchor)?;
            }
            Event::SequenceStart(_, anchor, _) => {
                self.stack.push(Open { node: Node { line, col, kind: Kind::Seq(Vec::new()) }, pending: None, anchor })
            }
            Event::MappingStart(_, anchor, _) => {
                self.stack.push(Open { node: Node { line, col, kind: Kind::Map(Vec::new()) }, pending: None, anchor })
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some(mut open) = self.stack.pop() {
                    merge_keys(&mut open.node);
                    self.value(open.node, open.anchor)?;
                }
            }
            Event::Alias(id) => {
                let node = self.anchors.iter().rev().find(|(a, _)| *a == id).map(|(_, n)| n.clone());
                let Some(mut node) = node else { return Err(err("an alias to an unknown anchor")) };
                node.line = line;
                node.col = col;
                self.value(node, 0)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// A finished value: the root, an item of the open sequence, or a key or value of the
    /// open mapping.
    fn value(&mut self, node: Node, anchor: usize) -> Result<(), SyntaxError> {
        if anchor != 0 {
            self.anchors.push((anchor, node.clone()));
        }
        let Some(Open { node: parent, pending, .. }) = self.stack.last_mut() else {
            self.root = Some(node);
            return Ok(());
        };
        match &mut parent.kind {
            Kind::Seq(items) => items.push(node),
            Kind::Map(entries) => match pending.take() {
                None => match node.kind {
                    Kind::Scalar { text, .. } => *pending = Some((text, node.line, node.col)),
                    _ => {
                        return Err(SyntaxError {
                            line: Some(node.line),
                            message: "a mapping key must be a plain string".into(),
                        });
                    }
                },
                Some((key, line, col)) => {
                    if key != MERGE_KEY && entries.iter().any(|e| e.key == key) {
                        return Err(SyntaxError {
                            line: Some(line),
                            message: format!("the key {key:?} is written twice"),
                        });
                    }
                    entries.push(Entry { key, line, col, value: node });
                }
            },
            Kind::Scalar { .. } => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_keys_and_values() {
        let t = parse("a: 1\nservers:\n  files:\n    command: x\n    args: [p, \"q\"]\n").unwrap().unwrap();
        assert_eq!(t.line_of("servers.files.command"), Some(4));
        assert_eq!(t.line_of("servers.files.args[1]"), Some(5));
        assert_eq!(t.line_of("servers.files.nothing"), Some(3));
        assert_eq!(t.line_of("a"), Some(1));
        let args = &t.get("servers").unwrap().value.get("files").unwrap().value.get("args").unwrap().value;
        let Kind::Seq(items) = &args.kind else { panic!() };
        assert_eq!(items[0].kind, Kind::Scalar { text: "p".into(), plain: true });
        assert_eq!(items[1].kind, Kind::Scalar { text: "q".into(), plain: false });
    }

    #[test]
    fn jsonc_keeps_positions() {
        let text = "{\n  // a comment, with \"quotes\"\n  \"a\": \"x // not a comment\", /* one\n  two */\n  \"b\": [1, 2,],\n}\n";
        let json = jsonc_to_json(text);
        assert_eq!(json.len(), text.len());
        assert_eq!(json.lines().count(), text.lines().count());
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["a"], "x // not a comment");
        assert_eq!(v["b"], serde_json::json!([1, 2]));
        let t = parse(&json).unwrap().unwrap();
        assert_eq!(t.line_of("b"), Some(5));
    }

    #[test]
    fn duplicates_aliases_and_errors() {
        assert!(parse("a: 1\na: 2\n").unwrap_err().message.contains("twice"));
        let t = parse("x: &v {k: 1}\ny: *v\n").unwrap().unwrap();
        assert_eq!(t.get("y").unwrap().value.line, 2);
        assert!(t.get("y").unwrap().value.get("k").is_some());
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.line.is_some(), "{e:?}");
        let t = parse("base: &b {command: x, args: [a]}\ns:\n  <<: *b\n  args: [own]\n").unwrap().unwrap();
        let s = &t.get("s").unwrap().value;
        assert_eq!(s.get("command").unwrap().value.kind, Kind::Scalar { text: "x".into(), plain: true });
        let Kind::Seq(args) = &s.get("args").unwrap().value.kind else { panic!() };
        assert_eq!(args[0].kind, Kind::Scalar { text: "own".into(), plain: true });
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
    }
}
