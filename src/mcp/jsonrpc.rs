//! JSON-RPC 2.0 envelopes over raw bytes.
//!
//! The gateway parses only the envelope (`jsonrpc`, `id`, `method`, and the *spans* of `params`,
//! `result` and `error`) and forwards everything else byte for byte, so fields from newer protocol
//! revisions survive the trip. Invariants: this module knows nothing of HTTP, processes or config;
//! messages it builds are single-line JSON (stdio framing relies on that); ids are kept as the raw
//! JSON text the peer sent and echoed back verbatim.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// Standard JSON-RPC and MCP error codes used by the gateway.
pub(crate) mod code {
    /// Invalid JSON was received.
    pub(crate) const PARSE_ERROR: i64 = -32700;
    /// The JSON sent is not a valid request object.
    pub(crate) const INVALID_REQUEST: i64 = -32600;
    /// The method does not exist or is not available.
    pub(crate) const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid method parameters (also: unknown tool, prompt or tampered cursor).
    pub(crate) const INVALID_PARAMS: i64 = -32602;
    /// Internal error.
    pub(crate) const INTERNAL_ERROR: i64 = -32603;
    /// MCP: resource not found.
    pub(crate) const RESOURCE_NOT_FOUND: i64 = -32002;
    /// MCP 2026-07-28: HTTP headers disagree with the body.
    pub(crate) const HEADER_MISMATCH: i64 = -32020;
    /// MCP 2026-07-28: a capability the request needs was not declared by the client.
    pub(crate) const MISSING_CAPABILITY: i64 = -32021;
    /// MCP 2026-07-28: unsupported protocol version (`data.supported` lists ours).
    pub(crate) const UNSUPPORTED_VERSION: i64 = -32022;
    /// Gateway-specific: the upstream server is unavailable, crashed or timed out.
    pub(crate) const UPSTREAM_ERROR: i64 = -32000;
    /// Gateway-specific: a limit of the gateway's was reached (sessions, streams, calls in
    /// flight); the message says which.
    pub(crate) const LIMIT_REACHED: i64 = -32029;
    /// Gateway-specific: the request was cancelled.
    pub(crate) const REQUEST_CANCELLED: i64 = -32800;
}

/// Why bytes could not be read as a JSON-RPC message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// Not JSON at all (JSON-RPC -32700).
    #[error("parse error: {0}")]
    Parse(String),
    /// JSON, but not a JSON-RPC 2.0 message (JSON-RPC -32600).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// A request or notification whose envelope or `params` name a member twice (JSON-RPC
    /// -32600); carries the request's raw id, so the refusal can be matched to it.
    #[error("invalid request: a member appears twice in the message or its params")]
    Repeated(Option<Box<str>>),
}

impl EnvelopeError {
    /// The JSON-RPC error code for this failure.
    pub(crate) fn code(&self) -> i64 {
        match self {
            EnvelopeError::Parse(_) => code::PARSE_ERROR,
            EnvelopeError::Invalid(_) | EnvelopeError::Repeated(_) => code::INVALID_REQUEST,
        }
    }

    /// The raw id of the refused request, when it could be read.
    pub(crate) fn id(&self) -> Option<&str> {
        match self {
            EnvelopeError::Repeated(id) => id.as_deref(),
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow, default)]
    jsonrpc: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "raw_or_null")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// Keeps a present `null` (as the raw text `null`) distinct from an absent field.
fn raw_or_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue as Deserialize>::deserialize(d).map(Some)
}

/// What kind of message an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Has `method` and `id`: expects a response.
    Request,
    /// Has `method`, no `id`.
    Notification,
    /// Has `id` and `result`.
    Result,
    /// Has `id` (possibly null) and `error`.
    Error,
}

/// A parsed view of one JSON-RPC message, borrowing from its bytes.
#[derive(Debug)]
pub struct Envelope<'a> {
    /// The message kind.
    pub kind: Kind,
    /// The raw JSON text of `id` (a number or a string), if any.
    pub id: Option<&'a RawValue>,
    /// The method of a request or notification.
    pub method: Option<Cow<'a, str>>,
    /// The raw `params`.
    pub params: Option<&'a RawValue>,
    /// The raw `result`.
    pub result: Option<&'a RawValue>,
    /// The raw `error`.
    pub error: Option<&'a RawValue>,
}

/// A request's envelope, owned, for an answer that outlives the body it came in (a streamed
/// or deferred answer): the id, method and params are copied once, nothing is parsed again.
pub(crate) struct OwnedRequest {
    id: Option<Box<RawValue>>,
    method: String,
    params: Option<Box<RawValue>>,
}

impl OwnedRequest {
    /// The request `env` carries, owned.
    pub(crate) fn from(env: &Envelope<'_>) -> Self {
        OwnedRequest {
            id: env.id.map(ToOwned::to_owned),
            method: env.method().to_owned(),
            params: env.params.map(ToOwned::to_owned),
        }
    }

    /// The raw id, or `null`.
    pub(crate) fn id(&self) -> &str {
        self.id.as_deref().map_or("null", RawValue::get)
    }

    /// The request as an envelope again.
    pub(crate) fn envelope(&self) -> Envelope<'_> {
        Envelope {
            kind: Kind::Request,
            id: self.id.as_deref(),
            method: Some(Cow::Borrowed(&self.method)),
            params: self.params.as_deref(),
            result: None,
            error: None,
        }
    }
}

impl<'a> Envelope<'a> {
    /// Parses one message. Arrays (batches) are rejected here; see [`is_array`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self, EnvelopeError> {
        let raw: RawEnvelope<'a> = match serde_json::from_slice(bytes) {
            Ok(raw) => raw,
            Err(e) if e.is_data() => return Err(EnvelopeError::Invalid("not a JSON-RPC object")),
            Err(e) => return Err(EnvelopeError::Parse(e.to_string())),
        };
        if raw.jsonrpc.as_deref() != Some("2.0") {
            return Err(EnvelopeError::Invalid("jsonrpc must be \"2.0\""));
        }
        let id = match raw.id {
            Some(id) if id.get() == "null" => None,
            Some(id) => {
                let first = id.get().as_bytes().first().copied();
                if !matches!(first, Some(b'"' | b'-' | b'0'..=b'9')) {
                    return Err(EnvelopeError::Invalid("id must be a string or a number"));
                }
                Some(id)
            }
            None => None,
        };
        // What the gateway authorizes is exactly what the upstream acts on: a member written
        // twice (SDK servers act on the last, a first-match reader on the first) is refused.
        // The envelope's own members are checked by the derived parse (a repeated `id`,
        // `method` or `params` is an error there, escaped or not); its other members are
        // never forwarded. `params` is scanned here, once.
        if raw.method.is_some()
            && let Some(p) = raw.params.filter(|p| p.get().starts_with('{'))
            && unique_members(p.get(), 0, Nesting::Params).is_err()
        {
            return Err(EnvelopeError::Repeated(id.map(|i| i.get().into())));
        }
        let had_id = raw.id.is_some();
        let kind = match (&raw.method, raw.result, raw.error) {
            (Some(_), None, None) if id.is_some() => Kind::Request,
            (Some(_), None, None) if !had_id => Kind::Notification,
            (Some(_), _, _) => return Err(EnvelopeError::Invalid("malformed request")),
            (None, Some(_), None) if id.is_some() => Kind::Result,
            (None, None, Some(_)) if had_id => Kind::Error,
            _ => return Err(EnvelopeError::Invalid("neither a request nor a response")),
        };
        Ok(Envelope { kind, id, method: raw.method, params: raw.params, result: raw.result, error: raw.error })
    }

    /// The method name, or "" for responses.
    pub fn method(&self) -> &str {
        self.method.as_deref().unwrap_or("")
    }

    /// The id as a `u64` when it is a plain non-negative integer (the form the gateway mints).
    pub(crate) fn id_u64(&self) -> Option<u64> {
        self.id.and_then(|id| id.get().parse().ok())
    }
}

/// Where [`unique_members`] is in a message.
#[derive(Clone, Copy)]
enum Nesting {
    /// `params`: every nested object but the tool or prompt `arguments` (the gateway reads
    /// nothing there; the upstream's own parser decides what they mean).
    Params,
    /// Inside `params`: every nested object.
    Inner,
}

/// A member named twice in an object (see [`unique_members`]).
struct Repeated;

/// Scans the object that starts at byte `start` (its `{`; the text already validated as JSON)
/// and the nested objects `at` looks into, in one pass: `Err` when one of them names a member
/// twice, compared after unescaping; else the position past its `}`. Allocation-free for
/// objects of up to 32 members whose keys hold no escapes.
fn unique_members(json: &str, start: usize, at: Nesting) -> Result<usize, Repeated> {
    const FAST: usize = 32;
    let b = json.as_bytes();
    let mut seen: [&str; FAST] = [""; FAST];
    let mut n = 0;
    let mut slow: Option<std::collections::HashSet<Cow<'_, str>>> = None;
    let mut i = start + 1;
    loop {
        // Malformed text cannot reach here (it passed a validating parse); stop quietly.
        let (raw, value) = match next_member(json, i) {
            None => return Ok(json.len()),
            Some(Err(end)) => return Ok(end),
            Some(Ok(member)) => member,
        };
        let duplicate = match &mut slow {
            None if n < FAST && !raw.contains('\\') => {
                let dup = seen[..n].contains(&raw);
                seen[n] = raw;
                n += 1;
                dup
            }
            _ => {
                let set = slow.get_or_insert_with(|| seen[..n].iter().map(|k| Cow::Borrowed(*k)).collect());
                // A key whose escapes cannot be read is refused like a repeated one.
                !set.insert(unescape_key(raw).ok_or(Repeated)?)
            }
        };
        if duplicate {
            return Err(Repeated);
        }
        let inner = match at {
            Nesting::Params => (!key_is(raw, "arguments")).then_some(Nesting::Inner),
            Nesting::Inner => Some(Nesting::Inner),
        };
        i = match inner {
            Some(inner) if b.get(value) == Some(&b'{') => unique_members(json, value, inner)?,
            _ => match skip_value(b, value) {
                Some(end) if end > value => end,
                _ => return Ok(json.len()),
            },
        };
    }
}

/// True when the body (after leading whitespace) is a JSON array.
pub(crate) fn is_array(bytes: &[u8]) -> bool {
    bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[')
}

/// The byte range of `part` inside `whole`; `part` must borrow from `whole`.
pub(crate) fn span_of(whole: &[u8], part: &RawValue) -> Range<usize> {
    let start = part.get().as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.get().len()
}

/// The result or error of a response, held as a slice of the bytes it arrived in (no copy).
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    /// The whole message the payload came from.
    pub bytes: Bytes,
    /// The span of the `result` or `error` value in `bytes`.
    pub span: Range<usize>,
    /// True for `error`, false for `result`.
    pub is_error: bool,
    /// Members written at the start of the result object on the way out (e.g. the
    /// 2026-07-28 `resultType` a session-era upstream does not send); empty for none.
    pub extra: &'static str,
    /// True when the payload came from a 2026-07-28 server and already has those members.
    pub stateless: bool,
}

/// The members a 2026-07-28 result carries that earlier results lack.
pub(crate) const STATELESS_COMPLETE: &str = r#""resultType":"complete""#;
/// The same for cacheable results (lists, `server/discover`, `resources/read`): Portcullis'
/// answers depend on who asks, so they are private and not to be reused.
pub(crate) const STATELESS_CACHEABLE: &str = r#""resultType":"complete","ttlMs":0,"cacheScope":"private""#;

impl Reply {
    /// A reply built from an already-serialised result or error value.
    pub(crate) fn owned(value: String, is_error: bool) -> Self {
        let len = value.len();
        Reply { bytes: Bytes::from(value), span: 0..len, is_error, extra: "", stateless: false }
    }

    /// An error reply with a code and message.
    pub(crate) fn error(code: i64, message: &str) -> Self {
        Reply::owned(error_object(code, message, None), true)
    }

    /// The raw JSON of the result or error value.
    pub(crate) fn payload(&self) -> Bytes {
        self.bytes.slice(self.span.clone())
    }

    /// The payload as text.
    pub(crate) fn payload_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[self.span.clone()]).unwrap_or("null")
    }

    /// The full response message for a downstream id, as chunks that can be written without
    /// copying the payload.
    pub(crate) fn to_chunks(&self, id: &str) -> [Bytes; 3] {
        let field = if self.is_error { "error" } else { "result" };
        let payload = &self.bytes[self.span.clone()];
        if !self.extra.is_empty() && payload.first() == Some(&b'{') {
            let rest = self.bytes.slice(self.span.start + 1..self.span.end);
            let empty = rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
            let sep = if empty { "" } else { "," };
            let head = format!(r#"{{"jsonrpc":"2.0","id":{id},"{field}":{{{}{sep}"#, self.extra);
            return [Bytes::from(head), rest, Bytes::from_static(b"}")];
        }
        [Bytes::from(format!(r#"{{"jsonrpc":"2.0","id":{id},"{field}":"#)), self.payload(), Bytes::from_static(b"}")]
    }

    /// The full response message as one string.
    pub(crate) fn to_message(&self, id: &str) -> String {
        let [a, b, c] = self.to_chunks(id);
        let mut s = String::with_capacity(a.len() + b.len() + c.len());
        s.push_str(std::str::from_utf8(&a).unwrap_or_default());
        s.push_str(std::str::from_utf8(&b).unwrap_or("null"));
        s.push_str(std::str::from_utf8(&c).unwrap_or("}"));
        s
    }
}

/// Serialises a JSON string literal.
pub(crate) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_quoted(&mut out, s);
    out
}

/// Appends a JSON string literal: as is between quotes when nothing needs escaping (the common
/// case for names and keys), else through serde_json.
pub(crate) fn push_quoted(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned()));
    }
}

/// A JSON-RPC error object.
pub(crate) fn error_object(code: i64, message: &str, data: Option<&str>) -> String {
    match data {
        Some(data) => format!(r#"{{"code":{code},"message":{},"data":{data}}}"#, quote(message)),
        None => format!(r#"{{"code":{code},"message":{}}}"#, quote(message)),
    }
}

/// A full error response; `id` is raw JSON (`null` when the request's id is unknown).
pub(crate) fn error_response(id: Option<&str>, code: i64, message: &str, data: Option<&str>) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{},"error":{}}}"#, id.unwrap_or("null"), error_object(code, message, data))
}

/// A full success response; `id` and `result` are raw JSON.
pub(crate) fn result_response(id: &str, result: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)
}

/// A request; `id` and `params` are raw JSON.
pub(crate) fn request(id: &str, method: &str, params: Option<&str>) -> String {
    match params {
        Some(p) => format!(r#"{{"jsonrpc":"2.0","id":{id},"method":{},"params":{p}}}"#, quote(method)),
        None => format!(r#"{{"jsonrpc":"2.0","id":{id},"method":{}}}"#, quote(method)),
    }
}

/// A notification; `params` is raw JSON.
pub(crate) fn notification(method: &str, params: Option<&str>) -> String {
    match params {
        Some(p) => format!(r#"{{"jsonrpc":"2.0","method":{},"params":{p}}}"#, quote(method)),
        None => format!(r#"{{"jsonrpc":"2.0","method":{}}}"#, quote(method)),
    }
}

/// Rebuilds a message with another id (requests and responses), keeping every other part raw.
pub(crate) fn with_id(env: &Envelope<'_>, id: &str) -> String {
    match env.kind {
        Kind::Request => request(id, env.method(), env.params.map(RawValue::get)),
        Kind::Notification => notification(env.method(), env.params.map(RawValue::get)),
        Kind::Result => result_response(id, env.result.map_or("null", RawValue::get)),
        Kind::Error => {
            format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{}}}"#, env.error.map_or("{}", RawValue::get))
        }
    }
}

/// A notification or request with one member added to (or replaced in) `params._meta`; the
/// message unchanged when it is not a JSON-RPC object.
pub(crate) fn with_meta(msg: &[u8], key: &str, value: &str) -> Vec<u8> {
    let Ok(env) = Envelope::parse(msg) else { return msg.to_vec() };
    let params = match env.params.map(RawObject::parse) {
        Some(Ok(p)) => p,
        Some(Err(_)) => return msg.to_vec(),
        None => RawObject::default(),
    };
    let meta = match params.get("_meta").map(RawObject::parse) {
        Some(Ok(m)) => m.to_json_with(&[(key, value)]),
        _ => RawObject::default().to_json_with(&[(key, value)]),
    };
    let params = params.to_json_with(&[("_meta", &meta)]);
    match env.kind {
        Kind::Request => request(env.id.map_or("null", RawValue::get), env.method(), Some(&params)),
        _ => notification(env.method(), Some(&params)),
    }
    .into_bytes()
}

/// A raw member key (as written, escapes and all, without its quotes) unescaped: borrowed when
/// it holds no escape (the common case), None when its escapes are malformed.
pub(crate) fn unescape_key(raw_key: &str) -> Option<Cow<'_, str>> {
    if !raw_key.contains('\\') {
        return Some(Cow::Borrowed(raw_key));
    }
    serde_json::from_str::<String>(&format!("\"{raw_key}\"")).ok().map(Cow::Owned)
}

/// Whether a raw member key (as written, escapes and all, without its quotes) names `key`.
pub(crate) fn key_is(raw_key: &str, key: &str) -> bool {
    unescape_key(raw_key).is_some_and(|k| k == key)
}

/// The top-level members of a JSON object already known to be valid (it came out of a validating
/// parse), in order: each raw key (without its quotes) and the byte range of its value. A light
/// scan that skips nested values without building anything. Stops at the first malformed byte;
/// empty when the text is not an object.
pub(crate) fn members(json: &str) -> Members<'_> {
    let b = json.as_bytes();
    let i = skip_ws(b, 0);
    Members { json, i: if b.get(i) == Some(&b'{') { i + 1 } else { usize::MAX } }
}

/// See [`members`]. Also a cursor: [`Members::key`] reads the next key, then
/// [`Members::value`] or [`Members::array`] consumes its value, so a caller that wants an
/// array's items scans it once.
pub(crate) struct Members<'a> {
    json: &'a str,
    i: usize,
}

impl<'a> Members<'a> {
    /// The next member's raw key (without its quotes); its value starts at the cursor.
    pub(crate) fn key(&mut self) -> Option<&'a str> {
        let i = std::mem::replace(&mut self.i, usize::MAX);
        let (key, start) = next_member(self.json, i)?.ok()?;
        self.i = start;
        Some(key)
    }

    /// Skips the value after [`Members::key`]: its byte range.
    pub(crate) fn value(&mut self) -> Option<Range<usize>> {
        let start = std::mem::replace(&mut self.i, usize::MAX);
        let end = skip_value(self.json.as_bytes(), start)?;
        if end <= start {
            return None;
        }
        self.i = end;
        Some(start..end)
    }

    /// Reads the value after [`Members::key`] as an array: its items, each with the span of its
    /// member `key`, so a caller needing one member of every item scans the array once. None when
    /// it is not an array.
    pub(crate) fn array(&mut self, key: &str) -> Option<Vec<Item<'a>>> {
        let start = std::mem::replace(&mut self.i, usize::MAX);
        let (items, end) = array_items_at(self.json, start, key)?;
        self.i = end;
        Some(items)
    }
}

impl<'a> Iterator for Members<'a> {
    type Item = (&'a str, Range<usize>);
    fn next(&mut self) -> Option<Self::Item> {
        let key = self.key()?;
        Some((key, self.value()?))
    }
}

/// At byte `i` inside an object (just past its `{` or past a member's value): the next member's
/// raw key and where its value starts, or `Err` with the position past the closing brace.
fn next_member(json: &str, mut i: usize) -> Option<Result<(&str, usize), usize>> {
    let b = json.as_bytes();
    loop {
        i = skip_ws(b, i);
        match b.get(i)? {
            b',' => i += 1,
            b'"' => break,
            b'}' => return Some(Err(i + 1)),
            _ => return None,
        }
    }
    let key_end = skip_string(b, i)?;
    let raw_key = json.get(i + 1..key_end - 1)?;
    let colon = skip_ws(b, key_end);
    if b.get(colon) != Some(&b':') {
        return None;
    }
    Some(Ok((raw_key, skip_ws(b, colon + 1))))
}

/// One item of an array read by [`Members::array`]: its text, and the value span (within the
/// text) of the member the caller asked for, when the item is an object that has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item<'a> {
    /// The item's JSON text.
    pub text: &'a str,
    /// Where the asked-for member's value is in `text`.
    pub member: Option<Range<usize>>,
}

/// The items of the array starting at byte `i` (see [`Members::array`]); also the position past
/// it. None when there is no array there.
fn array_items_at<'a>(json: &'a str, mut i: usize, key: &str) -> Option<(Vec<Item<'a>>, usize)> {
    let b = json.as_bytes();
    if b.get(i) != Some(&b'[') {
        return None;
    }
    i += 1;
    let mut out = Vec::new();
    loop {
        i = skip_ws(b, i);
        match b.get(i)? {
            b']' => return Some((out, i + 1)),
            b',' => i += 1,
            b'{' => {
                // Member by member, noting `key` on the way.
                let (mut j, mut member) = (i + 1, None);
                let end = loop {
                    match next_member(json, j)? {
                        Err(end) => break end,
                        Ok((k, start)) => {
                            j = skip_value(b, start).filter(|&e| e > start)?;
                            if member.is_none() && key_is(k, key) {
                                member = Some(start - i..j - i);
                            }
                        }
                    }
                };
                out.push(Item { text: json.get(i..end)?, member });
                i = end;
            }
            _ => {
                let end = skip_value(b, i).filter(|&e| e > i)?;
                out.push(Item { text: json.get(i..end)?, member: None });
                i = end;
            }
        }
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// Past the closing quote of the string starting at `i` (vectorised search for the quote).
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        j += memchr::memchr2(b'"', b'\\', b.get(j..)?)?;
        match b.get(j)? {
            b'"' => return Some(j + 1),
            _ => j += 2,
        }
    }
}

/// Past the value starting at `i`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while b.get(j).is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace()) {
                j += 1;
            }
            Some(j)
        }
    }
}

/// An object's members in order, values raw. Used to rewrite one field without touching others.
#[derive(Debug, Default)]
pub struct RawObject<'a>(pub Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for RawObject<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = RawObject<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
                    let value: &'de RawValue = map.next_value()?;
                    out.push((key, value));
                }
                Ok(RawObject(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// An object key, borrowed from the input unless it holds escapes (serde's own `Cow<str>`
/// always copies).
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'a> RawObject<'a> {
    /// Parses a raw value as an object.
    pub fn parse(raw: &'a RawValue) -> Result<Self, serde_json::Error> {
        serde_json::from_str(raw.get())
    }

    /// The raw value of a member.
    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// A member as a string, when it is one.
    pub(crate) fn get_str(&self, key: &str) -> Option<String> {
        self.get(key).and_then(|v| serde_json::from_str::<String>(v.get()).ok())
    }

    /// Serialises the object with some members replaced (raw JSON values) or added.
    pub fn to_json_with(&self, replace: &[(&str, &str)]) -> String {
        let mut out =
            String::with_capacity(self.0.iter().map(|(k, v)| k.len() + v.get().len() + 4).sum::<usize>() + 16);
        out.push('{');
        let mut first = true;
        let mut push = |out: &mut String, k: &str, v: &str| {
            if !std::mem::take(&mut first) {
                out.push(',');
            }
            push_quoted(out, k);
            out.push(':');
            out.push_str(v);
        };
        for (k, v) in &self.0 {
            let value = replace.iter().find(|(rk, _)| *rk == k.as_ref()).map_or(v.get(), |(_, rv)| *rv);
            push(&mut out, k, value);
        }
        for (rk, rv) in replace {
            if !self.0.iter().any(|(k, _)| k == rk) {
                push(&mut out, rk, rv);
            }
        }
        out.push('}');
        out
    }
}

/// Converts a string to a boxed raw JSON value (the string must be valid JSON).
pub(crate) fn raw(json: String) -> Box<RawValue> {
    RawValue::from_string(json).unwrap_or_else(|_| RawValue::NULL.to_owned())
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use super::{Item, array_items_at, key_is, members, skip_ws};

    /// The value span of a top-level member, through [`members`].
    fn member_span(json: &str, key: &str) -> Option<Range<usize>> {
        members(json).find(|(k, _)| key_is(k, key)).map(|(_, span)| span)
    }

    /// A whole text's array items, through the scanner [`super::Members::array`] uses.
    fn array_items<'a>(json: &'a str, key: &str) -> Option<Vec<Item<'a>>> {
        array_items_at(json, skip_ws(json.as_bytes(), 0), key).map(|(items, _)| items)
    }

    #[test]
    fn member_span_finds_top_level_members_only() {
        let j = r#"{ "inputSchema": {"name": "nested", "x": [1, {"name": 2}]}, "n\u0061me" : "tool_1" , "z": null}"#;
        let span = member_span(j, "name").unwrap();
        assert_eq!(&j[span], r#""tool_1""#);
        assert_eq!(&j[member_span(j, "z").unwrap()], "null");
        assert_eq!(&j[member_span(j, "inputSchema").unwrap()], r#"{"name": "nested", "x": [1, {"name": 2}]}"#);
        assert!(member_span(j, "nested").is_none());
        assert!(member_span("[1]", "name").is_none());
        let tricky = r#"{"a":"}\"{","name":"ok"}"#;
        assert_eq!(&tricky[member_span(tricky, "name").unwrap()], r#""ok""#);
    }

    #[test]
    fn array_items_and_members_scan_valid_json() {
        let j = r#" [ {"b":{"a":2},"a":[1,"]"]} , "x\"]" ,3, null,[ ] ,{}] "#;
        let items = array_items(j, "a").unwrap();
        let texts: Vec<&str> = items.iter().map(|i| i.text).collect();
        assert_eq!(texts, vec![r#"{"b":{"a":2},"a":[1,"]"]}"#, r#""x\"]""#, "3", "null", "[ ]", "{}"]);
        assert_eq!(&items[0].text[items[0].member.clone().unwrap()], r#"[1,"]"]"#);
        assert!(items[1..].iter().all(|i| i.member.is_none()));
        assert_eq!(array_items("[]", "a").unwrap(), Vec::new());
        assert!(array_items(r#"{"a":1}"#, "a").is_none());
        assert!(array_items("[1,}", "a").is_none());
        assert!(array_items(r#"[{"a" 1}]"#, "a").is_none());
        let keys: Vec<&str> = members(r#"{"a":1,"b\u0063":{"z":2}}"#).map(|(k, _)| k).collect();
        assert_eq!(keys, vec!["a", "b\\u0063"]);
        assert!(key_is("b\\u0063", "bc"));
        assert_eq!(members("[1]").count(), 0);
    }

    #[test]
    fn member_span_agrees_with_serde_json_on_random_objects() {
        use proptest::prelude::*;
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            "[a-z\"\\\\{}\\[\\],: \\n\\u{e9}]{0,8}".prop_map(Value::String),
        ];
        let value = leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map("[a-z\"]{0,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        });
        let objects = prop::collection::btree_map("[a-z\"\\\\]{0,4}", value, 0..6);
        proptest!(|(members in objects, pretty in any::<bool>())| {
            let obj = Value::Object(members.clone().into_iter().collect());
            let text = if pretty { serde_json::to_string_pretty(&obj).unwrap() } else { obj.to_string() };
            for (k, v) in &members {
                let span = member_span(&text, k).expect("member found");
                let found: Value = serde_json::from_str(&text[span]).unwrap();
                prop_assert_eq!(&found, v);
            }
            prop_assert!(member_span(&text, "absent-key-x").is_none());
        });
    }

    #[test]
    fn quote_matches_serde_json() {
        for v in ["plain", "", "with \"quote\"", "back\\slash", "tab\tnew\nline", "unicode é ✓", "\u{1}"] {
            assert_eq!(quote(v), serde_json::to_string(v).unwrap(), "{v:?}");
        }
    }

    use super::*;

    #[test]
    fn parses_kinds() {
        let r = Envelope::parse(br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#).unwrap();
        assert_eq!(r.kind, Kind::Request);
        assert_eq!(r.id.unwrap().get(), "1");
        let n = Envelope::parse(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#).unwrap();
        assert_eq!(n.kind, Kind::Notification);
        let ok = Envelope::parse(br#"{"jsonrpc":"2.0","id":"a","result":{}}"#).unwrap();
        assert_eq!(ok.kind, Kind::Result);
        let err = Envelope::parse(br#"{"jsonrpc":"2.0","id":null,"error":{"code":1,"message":"x"}}"#).unwrap();
        assert_eq!(err.kind, Kind::Error);
    }

    #[test]
    fn rejects_bad_messages() {
        assert!(matches!(Envelope::parse(b"{"), Err(EnvelopeError::Parse(_))));
        assert!(matches!(Envelope::parse(b"[]"), Err(EnvelopeError::Invalid(_))));
        assert!(matches!(Envelope::parse(br#"{"id":1,"method":"x"}"#), Err(EnvelopeError::Invalid(_))));
        assert!(matches!(
            Envelope::parse(br#"{"jsonrpc":"2.0","id":{},"method":"x"}"#),
            Err(EnvelopeError::Invalid(_))
        ));
        assert!(matches!(
            Envelope::parse(br#"{"jsonrpc":"2.0","id":null,"method":"x"}"#),
            Err(EnvelopeError::Invalid(_))
        ));
        assert!(matches!(Envelope::parse(br#"{"jsonrpc":"2.0","id":1}"#), Err(EnvelopeError::Invalid(_))));
    }

    #[test]
    fn a_member_written_twice_is_refused_escaped_or_nested() {
        for bad in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{},"name":"whoami"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","n\u0061me":"whoami"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"resources/read","params":{"uri":"a://x","uri":"a://y"}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"completion/complete","params":{"ref":{"type":"ref/prompt","name":"a","name":"b"}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","params":{"_meta":{"progressToken":1,"progressToken":2}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"x","m\u0065thod":"y"}"#,
            r#"{"jsonrpc":"2.0","id":1,"id":2,"method":"x"}"#,
        ] {
            let err = Envelope::parse(bad.as_bytes()).unwrap_err();
            assert_eq!(err.code(), code::INVALID_REQUEST, "{bad}: {err:?}");
        }
        let many: String = (0..40).map(|i| format!(r#""k{i}":{i},"#)).collect();
        let dup_late = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{{many}"k3":0}}}}"#);
        assert!(Envelope::parse(dup_late.as_bytes()).is_err());
        // Arguments are the upstream's to read; distinct keys anywhere are fine.
        for good in [
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"a":1,"a":2}}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"e","arguments":{},"_meta":{"n":1}}}"#,
        ] {
            assert!(Envelope::parse(good.as_bytes()).is_ok(), "{good}");
        }
        let ok_many = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"x","params":{{{many}"last":0}}}}"#);
        assert!(Envelope::parse(ok_many.as_bytes()).is_ok());
    }

    #[test]
    fn rewrites_id_and_fields() {
        let msg = br#"{"jsonrpc":"2.0","id":"abc","method":"tools/call","params":{"name":"a__b","arguments":{"x":1}}}"#;
        let env = Envelope::parse(msg).unwrap();
        let out = with_id(&env, "7");
        assert_eq!(
            out,
            r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"a__b","arguments":{"x":1}}}"#
        );
        let obj = RawObject::parse(env.params.unwrap()).unwrap();
        assert_eq!(obj.get_str("name").as_deref(), Some("a__b"));
        assert_eq!(obj.to_json_with(&[("name", "\"b\"")]), r#"{"name":"b","arguments":{"x":1}}"#);
    }

    #[test]
    fn reply_chunks_do_not_copy_payload() {
        let msg = Bytes::from_static(br#"{"jsonrpc":"2.0","id":3,"result":{"ok":true}}"#);
        let env = Envelope::parse(&msg).unwrap();
        let span = span_of(&msg, env.result.unwrap());
        let reply = Reply { bytes: msg.clone(), span, is_error: false, extra: "", stateless: false };
        assert_eq!(reply.to_message("\"x\""), r#"{"jsonrpc":"2.0","id":"x","result":{"ok":true}}"#);
        assert_eq!(reply.payload().as_ptr(), msg[reply.span.clone()].as_ptr());
    }
}
