//! Server-Sent Events framing, both ways: an incremental parser for upstream streams and the
//! encoder for streams Portcullis serves.
//!
//! Invariants: the parser never buffers more than `max_event` bytes for one event (a larger
//! event is an error, not unbounded memory); data lines are joined with `\n` as the SSE spec says.

use bytes::{Buf, Bytes, BytesMut};

/// One parsed event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field (empty means `message`).
    pub event: String,
    /// The joined `data:` lines.
    pub data: String,
    /// The `id:` field, when present.
    pub id: Option<String>,
    /// The `retry:` field in milliseconds, when present.
    pub retry: Option<u64>,
}

impl Event {
    /// True for `message` events (the default type).
    pub fn is_message(&self) -> bool {
        self.event.is_empty() || self.event == "message"
    }
}

/// An event grew past the limit.
#[derive(Debug, thiserror::Error)]
#[error("SSE event larger than {0} bytes")]
pub struct TooLarge(pub usize);

/// Incremental SSE parser.
#[derive(Debug)]
pub struct Parser {
    buf: BytesMut,
    current: Event,
    has_fields: bool,
    max_event: usize,
    event_bytes: usize,
    seen_data: bool,
}

impl Parser {
    /// A parser that refuses events larger than `max_event` bytes.
    pub fn new(max_event: usize) -> Self {
        Parser {
            buf: BytesMut::new(),
            current: Event::default(),
            has_fields: false,
            max_event,
            event_bytes: 0,
            seen_data: false,
        }
    }

    /// Feeds bytes; returns the events they complete.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, TooLarge> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line = self.buf.split_to(pos + 1);
            line.truncate(pos);
            if line.last() == Some(&b'\r') {
                line.truncate(pos - 1);
            }
            self.line(&line, &mut out);
        }
        // A lone `\r` line ending is rare in practice; we only handle `\n` and `\r\n`.
        if self.buf.len() + self.event_bytes > self.max_event {
            self.buf.advance(self.buf.len());
            return Err(TooLarge(self.max_event));
        }
        Ok(out)
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            if self.has_fields {
                out.push(std::mem::take(&mut self.current));
            }
            self.has_fields = false;
            self.seen_data = false;
            self.event_bytes = 0;
            return;
        }
        if line[0] == b':' {
            return;
        }
        self.event_bytes += line.len();
        let text = String::from_utf8_lossy(line);
        let (field, value) = match text.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (text.as_ref(), ""),
        };
        match field {
            "event" => {
                self.current.event = value.to_owned();
                self.has_fields = true;
            }
            "data" => {
                if self.seen_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_fields = true;
                self.seen_data = true;
            }
            "id" if !value.contains('\0') => {
                self.current.id = Some(value.to_owned());
                self.has_fields = true;
            }
            "retry" => {
                if let Ok(ms) = value.parse() {
                    self.current.retry = Some(ms);
                    self.has_fields = true;
                }
            }
            _ => {}
        }
    }
}

/// Encodes one `message` event carrying a JSON-RPC message, with an optional id.
pub fn message(data: &[u8], id: Option<&str>) -> Bytes {
    let mut out = BytesMut::with_capacity(data.len() + 32);
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\n");
    }
    out.extend_from_slice(b"event: message\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    out.freeze()
}

/// Encodes a named event with text data (e.g. the legacy `endpoint` event).
pub fn named(event: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// A keep-alive comment.
pub const KEEPALIVE: &[u8] = b": keep-alive\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_split_events() {
        let mut p = Parser::new(1024);
        assert!(
            p.feed(
                b"id: 1
event: endpoint
da"
            )
            .unwrap()
            .is_empty()
        );
        let ev = p
            .feed(
                b"ta: /messages?x=1

: comment

data: a
data:
data: b
retry: 50

",
            )
            .unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].event, "endpoint");
        assert_eq!(ev[0].data, "/messages?x=1");
        assert_eq!(ev[0].id.as_deref(), Some("1"));
        assert_eq!(ev[1].data, "a\n\nb");
        assert_eq!(ev[1].retry, Some(50));
        assert!(ev[1].is_message());
    }

    #[test]
    fn bounds_event_size() {
        let mut p = Parser::new(16);
        assert!(p.feed(&[b'x'; 64]).is_err());
    }
}
