//! Server-Sent Events framing, both ways: an incremental parser for upstream streams and the
//! encoder for streams Portcullis serves.
//!
//! Invariants: the parser follows the WHATWG event-stream algorithm (a property test compares
//! it with a direct reading of the specification on random streams split at random points),
//! scans each byte once, and never buffers more than `max_event` bytes for one event (a larger
//! event is an error, not unbounded memory).

use bytes::{Buf, Bytes, BytesMut};

/// One parsed event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field (empty means `message`).
    pub event: String,
    /// The joined `data:` lines.
    pub data: String,
    /// The stream's last event id when the event was dispatched (None while it is empty).
    pub id: Option<String>,
}

impl Event {
    /// True for `message` events (the default type).
    pub(crate) fn is_message(&self) -> bool {
        self.event.is_empty() || self.event == "message"
    }
}

/// An event grew past the limit.
#[derive(Debug, thiserror::Error)]
#[error("SSE event larger than {0} bytes")]
pub struct TooLarge(pub usize);

/// Incremental SSE parser, as the WHATWG HTML standard's "event stream interpretation": a
/// leading byte-order mark is dropped; lines end with CRLF, LF or CR (also split across
/// chunks); an event is dispatched at a blank line only when a `data` field was seen; the last
/// event id and the reconnection time persist across events. Each byte is scanned once.
#[derive(Debug)]
pub struct Parser {
    buf: BytesMut,
    /// How much of `buf` is known to hold no line ending.
    scanned: usize,
    /// The stream's start has been checked for a byte-order mark.
    bom_checked: bool,
    /// The previous chunk ended with CR: a LF that starts the next one belongs to it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
    last_id: String,
    retry: Option<u64>,
    max_event: usize,
    event_bytes: usize,
}

impl Parser {
    /// A parser that refuses events larger than `max_event` bytes.
    pub fn new(max_event: usize) -> Self {
        Parser {
            buf: BytesMut::new(),
            scanned: 0,
            bom_checked: false,
            after_cr: false,
            event: String::new(),
            data: String::new(),
            has_data: false,
            last_id: String::new(),
            retry: None,
            max_event,
            event_bytes: 0,
        }
    }

    /// The stream's last event id (for `Last-Event-ID`), None while empty.
    pub(crate) fn last_event_id(&self) -> Option<&str> {
        (!self.last_id.is_empty()).then_some(self.last_id.as_str())
    }

    /// The reconnection time the stream asked for (`retry:`), in milliseconds.
    pub(crate) fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Feeds bytes; returns the events they complete.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, TooLarge> {
        const BOM: &[u8] = b"\xEF\xBB\xBF";
        self.buf.extend_from_slice(chunk);
        if !self.bom_checked {
            if self.buf.len() < BOM.len() && BOM.starts_with(&self.buf) {
                return Ok(Vec::new()); // could still be a byte-order mark
            }
            if self.buf.starts_with(BOM) {
                self.buf.advance(BOM.len());
            }
            self.bom_checked = true;
        }
        let mut out = Vec::new();
        loop {
            if self.after_cr && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    self.buf.advance(1);
                }
                self.after_cr = false;
            }
            let Some(pos) = memchr::memchr2(b'\n', b'\r', &self.buf[self.scanned..]).map(|p| p + self.scanned) else {
                self.scanned = self.buf.len();
                break;
            };
            let ending = match (self.buf[pos], self.buf.get(pos + 1)) {
                (b'\r', Some(b'\n')) => 2,
                (b'\r', None) => {
                    self.after_cr = true;
                    1
                }
                _ => 1,
            };
            let line = self.buf.split_to(pos + ending);
            self.scanned = 0;
            self.line(&line[..pos], &mut out);
            if self.event_bytes > self.max_event {
                return Err(self.too_large());
            }
        }
        if self.buf.len() + self.event_bytes > self.max_event {
            return Err(self.too_large());
        }
        Ok(out)
    }

    fn too_large(&mut self) -> TooLarge {
        self.buf.clear();
        self.scanned = 0;
        TooLarge(self.max_event)
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            self.dispatch(out);
            return;
        }
        if line[0] == b':' {
            return;
        }
        self.event_bytes += line.len();
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let text = || String::from_utf8_lossy(value);
        match field {
            b"event" => self.event = text().into_owned(),
            b"data" => {
                self.data.push_str(&text());
                self.data.push('\n');
                self.has_data = true;
            }
            b"id" if !value.contains(&0) => self.last_id = text().into_owned(),
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                self.retry = text().parse().ok().or(Some(u64::MAX));
            }
            _ => {}
        }
    }

    /// A blank line: the event is dispatched if it has data; the buffers are reset either way.
    fn dispatch(&mut self, out: &mut Vec<Event>) {
        self.event_bytes = 0;
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            self.data.clear();
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the last line's LF
        out.push(Event { event, data, id: self.last_event_id().map(str::to_owned) });
    }
}

/// Encodes one `message` event carrying a JSON-RPC message, with an optional id.
pub(crate) fn message(data: &[u8], id: Option<&str>) -> Bytes {
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
pub(crate) fn named(event: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {event}\ndata: {data}\n\n"))
}

/// A keep-alive comment.
pub(crate) const KEEPALIVE: &[u8] = b": keep-alive\n\n";

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
        assert_eq!(p.retry(), Some(50));
        assert!(ev[1].is_message());
    }

    #[test]
    fn follows_the_whatwg_algorithm_where_the_old_parser_did_not() {
        let mut p = Parser::new(1024);
        // CR-only line endings.
        let ev = p.feed(b"data: a\rdata: b\r\rdata: c\r").unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].data, "a\nb");
        // A CR at the end of one chunk and the LF at the start of the next are one ending.
        let ev = p.feed(b"\n\r").unwrap();
        assert_eq!(ev.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(), ["c"]);
        let ev = p.feed(b"\ndata: d\n\n").unwrap();
        assert_eq!(
            ev.iter().map(|e| e.data.as_str()).collect::<Vec<_>>(),
            ["d"],
            "the LF after a CR is not a blank line"
        );
        // A leading byte-order mark (even split across chunks) does not lose the first event.
        let mut p = Parser::new(1024);
        assert!(p.feed(b"\xEF\xBB").unwrap().is_empty());
        let ev = p.feed(b"\xBFdata: first\n\n").unwrap();
        assert_eq!(ev[0].data, "first");
        // A block with only `event:` (or only `id:`) dispatches nothing; the id persists.
        let mut p = Parser::new(1024);
        assert!(p.feed(b"event: ping\n\nid: 7\n\n").unwrap().is_empty());
        assert_eq!(p.last_event_id(), Some("7"));
        let ev = p.feed(b"data:\n\n").unwrap();
        assert_eq!((ev[0].data.as_str(), ev[0].id.as_deref(), ev[0].event.as_str()), ("", Some("7"), ""));
    }

    /// A direct reading of the specification's algorithm, on a whole stream at once.
    fn reference(stream: &[u8]) -> (Vec<Event>, String, Option<u64>) {
        let text = String::from_utf8_lossy(stream);
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let (mut out, mut data, mut event, mut last_id, mut retry) =
            (Vec::new(), String::new(), String::new(), String::new(), None);
        let mut lines = Vec::new();
        let mut rest = text;
        while let Some(i) = rest.find(['\r', '\n']) {
            lines.push(&rest[..i]);
            rest = if rest[i..].starts_with("\r\n") { &rest[i + 2..] } else { &rest[i + 1..] };
        }
        for line in lines {
            if line.is_empty() {
                if data.is_empty() {
                    event.clear();
                    continue;
                }
                data.pop();
                let id = (!last_id.is_empty()).then(|| last_id.clone());
                out.push(Event { event: std::mem::take(&mut event), data: std::mem::take(&mut data), id });
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "event" => event = value.to_owned(),
                "data" => {
                    data.push_str(value);
                    data.push('\n');
                }
                "id" if !value.contains('\0') => last_id = value.to_owned(),
                "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                    retry = Some(value.parse().unwrap_or(u64::MAX));
                }
                _ => {}
            }
        }
        (out, last_id, retry)
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_the_specification_on_random_streams(
            bom in proptest::bool::ANY,
            parts in proptest::collection::vec(proptest::sample::select(vec![
                "data", "event", "id", "retry", ":", " ", "\r", "\n", "\r\n", "x", "é", "12", "\0", "message",
            ]), 0..60),
            cuts in proptest::collection::vec(0usize..400, 0..8),
        ) {
            let mut stream = if bom { b"\xEF\xBB\xBF".to_vec() } else { Vec::new() };
            for p in &parts {
                stream.extend_from_slice(p.as_bytes());
            }
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(stream.len())).collect();
            cuts.sort_unstable();
            let mut p = Parser::new(1 << 20);
            let mut events = Vec::new();
            let mut at = 0;
            for c in cuts.into_iter().chain([stream.len()]) {
                events.extend(p.feed(&stream[at..c]).unwrap());
                at = c;
            }
            let (want, last_id, retry) = reference(&stream);
            proptest::prop_assert_eq!(events, want);
            proptest::prop_assert_eq!(p.last_event_id().unwrap_or(""), last_id.as_str());
            proptest::prop_assert_eq!(p.retry(), retry);
        }
    }

    #[test]
    fn bounds_event_size() {
        let mut p = Parser::new(16);
        assert!(p.feed(&[b'x'; 64]).is_err());
    }
}
