//! The JSON Schema of the config file, generated from the raw config types, and the check of a
//! parsed file against it that finds every structural problem in one pass.
//!
//! Invariants: the schema is derived from the serde types (never written by hand), so what
//! `check` accepts is what the loader reads; the check converts the file into the JSON value the
//! serde types are read from, dropping each key or value it reports, so one problem never hides
//! the next. In Portcullis' own format an unknown key is an error; in a file written for another
//! tool (`foreign`) it is a warning.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use serde_json::{Map, Value};

use super::tree::{Kind, Node};

/// The schema of [`super::RawConfig`], as JSON.
pub(crate) static SCHEMA: LazyLock<Value> =
    LazyLock::new(|| serde_json::to_value(schemars::schema_for!(super::RawConfig)).unwrap_or(Value::Bool(true)));

/// The schema as published in `docs/portcullis.schema.json` (pretty-printed, one trailing newline).
pub fn schema_text() -> String {
    let mut text = serde_json::to_string_pretty(&*SCHEMA).unwrap_or_default();
    text.push('\n');
    text
}

/// One problem the check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// Dotted path of the field.
    pub(crate) path: String,
    /// 1-based line of the field.
    pub(crate) line: u32,
    /// What is wrong.
    pub(crate) message: String,
    /// A warning (an unknown key in a foreign file) rather than an error.
    pub(crate) warning: bool,
}

/// Checks `node` against the schema and converts it into the value serde reads: scalars take
/// the type the schema asks for (`listen: 8080` is the string `"8080"`), unknown keys and
/// mistyped values are left out and reported.
pub(crate) fn convert(node: &Node, foreign: bool) -> (Value, Vec<Problem>) {
    convert_with(&SCHEMA, node, foreign)
}

/// [`convert`] against another schema (a catalog's).
pub(crate) fn convert_with(schema: &Value, node: &Node, foreign: bool) -> (Value, Vec<Problem>) {
    let mut walk = Walk { root: schema, foreign, problems: Vec::new() };
    let value = walk.node(schema, node, "").unwrap_or(Value::Object(Map::new()));
    (value, walk.problems)
}

struct Walk<'a> {
    root: &'a Value,
    foreign: bool,
    problems: Vec<Problem>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// What a node is, in the schema's words.
fn found(node: &Node) -> &'static str {
    match &node.kind {
        Kind::Map(_) => "a mapping",
        Kind::Seq(_) => "a list",
        Kind::Scalar { .. } if node.is_null() => "nothing (null)",
        Kind::Scalar { plain: false, .. } => "a string",
        Kind::Scalar { text, .. } if bool_of(text).is_some() => "a boolean",
        Kind::Scalar { text, .. } if text.parse::<f64>().is_ok() => "a number",
        Kind::Scalar { .. } => "a string",
    }
}

fn bool_of(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

/// The closest of `candidates` to a misspelt `key`, when one is close enough to suggest.
pub(crate) fn did_you_mean<'c>(key: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(&key.to_ascii_lowercase(), &c.to_ascii_lowercase()), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

impl<'a> Walk<'a> {
    fn problem(&mut self, path: &str, line: u32, message: String) {
        self.problems.push(Problem { path: path.to_owned(), line, message, warning: false });
    }

    fn resolve(&self, mut schema: &'a Value) -> &'a Value {
        for _ in 0..16 {
            let Some(reference) = schema.get("$ref").and_then(Value::as_str) else { break };
            let name = reference.rsplit('/').next().unwrap_or("");
            match self.root.get("$defs").and_then(|d| d.get(name)) {
                Some(s) => schema = s,
                None => break,
            }
        }
        schema
    }

    /// The value of `node` under `schema`, or None (and a problem) when it does not fit.
    fn node(&mut self, schema: &'a Value, node: &Node, path: &str) -> Option<Value> {
        let schema = self.resolve(schema);
        if let Some(branches) = schema.get("anyOf").or_else(|| schema.get("oneOf")).and_then(Value::as_array) {
            return self.any_of(branches, node, path);
        }
        let types: Vec<&str> = match schema.get("type") {
            Some(Value::String(t)) => vec![t.as_str()],
            Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
            _ => return Some(self.untyped(node)),
        };
        let allows = |t: &str| types.contains(&t);
        let value = match &node.kind {
            _ if node.is_null() && allows("null") => Some(Value::Null),
            Kind::Map(_) if allows("object") => return self.object(schema, node, path),
            Kind::Seq(items) if allows("array") => {
                let item_schema = schema.get("items").unwrap_or(&Value::Bool(true));
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    if let Some(v) = self.node(item_schema, item, &format!("{path}[{i}]")) {
                        out.push(v);
                    }
                }
                return Some(Value::Array(out));
            }
            Kind::Scalar { text, plain: true } if allows("boolean") && bool_of(text).is_some() => {
                bool_of(text).map(Value::Bool)
            }
            Kind::Scalar { text, plain: true } if allows("integer") && text.parse::<i64>().is_ok() => {
                let n = text.parse::<i64>().ok()?;
                if schema.get("minimum").and_then(Value::as_f64).is_some_and(|min| (n as f64) < min) {
                    self.problem(path, node.line, format!("must not be negative, found {n}"));
                    return None;
                }
                Some(Value::from(n))
            }
            Kind::Scalar { text, plain: true } if allows("number") && text.parse::<f64>().is_ok() => {
                serde_json::Number::from_f64(text.parse::<f64>().ok()?).map(Value::Number)
            }
            Kind::Scalar { text, .. } if allows("string") && !(node.is_null() && allows("null")) => {
                Some(Value::String(text.clone()))
            }
            _ => None,
        };
        if value.is_none() {
            let wanted = describe(&types);
            self.problem(path, node.line, format!("expected {wanted}, found {}", found(node)));
        }
        value
    }

    fn any_of(&mut self, branches: &'a [Value], node: &Node, path: &str) -> Option<Value> {
        let mut first_failure = None;
        for branch in branches {
            let mut trial = Walk { root: self.root, foreign: self.foreign, problems: Vec::new() };
            let value = trial.node(branch, node, path);
            if trial.problems.iter().all(|p| p.warning)
                && let Some(v) = value
            {
                self.problems.extend(trial.problems);
                return Some(v);
            }
            // A branch of the same shape as the node explains the problem best.
            let shape_matches = trial.problems.iter().any(|p| p.path != path);
            if first_failure.is_none() || shape_matches {
                first_failure = Some(trial.problems);
            }
        }
        self.problems.extend(first_failure.unwrap_or_default());
        None
    }

    fn object(&mut self, schema: &'a Value, node: &Node, path: &str) -> Option<Value> {
        let Kind::Map(entries) = &node.kind else { return None };
        let properties = schema.get("properties").and_then(Value::as_object);
        let additional = schema.get("additionalProperties");
        let mut out = Map::new();
        for entry in entries {
            let field = join(path, &entry.key);
            let property = properties.and_then(|p| p.get(&entry.key));
            let sub = match (property, additional) {
                (Some(s), _) => s,
                (None, Some(Value::Bool(false))) => {
                    let known: Vec<&str> =
                        properties.map(|p| p.keys().map(String::as_str).collect()).unwrap_or_default();
                    let hint = did_you_mean(&entry.key, known.iter().copied())
                        .map(|k| format!(" (did you mean `{k}`?)"))
                        .unwrap_or_default();
                    let (message, warning) = if self.foreign {
                        (format!("unknown key ignored{hint}"), true)
                    } else {
                        (format!("unknown key{hint}"), false)
                    };
                    self.problems.push(Problem { path: field, line: entry.line, message, warning });
                    continue;
                }
                (None, Some(s)) if s.is_object() || s.as_bool() == Some(true) => s,
                (None, _) => &Value::Bool(true),
            };
            if let Some(v) = self.node(sub, &entry.value, &field) {
                out.insert(entry.key.clone(), v);
            }
        }
        let required: BTreeSet<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut complete = true;
        for r in required {
            if !entries.iter().any(|e| e.key == r) {
                self.problem(path, node.line, format!("missing `{r}`"));
                complete = false;
            }
        }
        complete.then_some(Value::Object(out))
    }

    /// A node where the schema does not constrain it: YAML's own typing.
    fn untyped(&self, node: &Node) -> Value {
        match &node.kind {
            _ if node.is_null() => Value::Null,
            Kind::Map(entries) => {
                Value::Object(entries.iter().map(|e| (e.key.clone(), self.untyped(&e.value))).collect())
            }
            Kind::Seq(items) => Value::Array(items.iter().map(|i| self.untyped(i)).collect()),
            Kind::Scalar { text, plain: true } => {
                if let Some(b) = bool_of(text) {
                    Value::Bool(b)
                } else if let Ok(n) = text.parse::<i64>() {
                    Value::from(n)
                } else if let Some(n) = text.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
                    Value::Number(n)
                } else {
                    Value::String(text.clone())
                }
            }
            Kind::Scalar { text, .. } => Value::String(text.clone()),
        }
    }
}

fn describe(types: &[&str]) -> String {
    let words: Vec<&str> = types
        .iter()
        .filter(|t| **t != "null")
        .map(|t| match *t {
            "object" => "a mapping",
            "array" => "a list",
            "string" => "a string",
            "integer" => "a whole number",
            "number" => "a number",
            "boolean" => "true or false",
            other => other,
        })
        .collect();
    match words.as_slice() {
        [] => "nothing".into(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_published_schema_is_the_one_the_types_give() {
        let published = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/portcullis.schema.json"))
            .unwrap_or_default();
        assert!(
            published == schema_text(),
            "docs/portcullis.schema.json is stale: run `cargo run -- schema > docs/portcullis.schema.json`"
        );
        let schema: Value = serde_json::from_str(&published).unwrap();
        assert_eq!(schema["additionalProperties"], false);
        for key in ["servers", "mcpServers", "auth", "limits", "listen", "catalog_path"] {
            assert!(schema["properties"].get(key).is_some(), "{key} missing");
        }
        let server = &schema["$defs"]["RawServer"];
        assert!(server["properties"]["command"]["description"].as_str().unwrap().contains("stdio"));
    }

    #[test]
    fn suggestions_for_misspelt_keys() {
        assert_eq!(did_you_mean("comand", ["command", "args", "env"]), Some("command"));
        assert_eq!(did_you_mean("tokns", ["tokens", "kind"]), Some("tokens"));
        assert_eq!(did_you_mean("globalShortcut", ["servers", "listen"]), None);
    }
}
