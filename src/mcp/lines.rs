//! Newline-framed input with a bound: the reader behind stdio framing (a child's stdout and
//! stderr, `portcullis stdio`'s stdin).
//!
//! Invariants: memory stays within the bound plus one read, whatever the input; a line longer
//! than the bound is reported once ([`Line::TooLong`]) and the rest of it skipped, so the
//! lines after it are read as usual; each byte is scanned once.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// What [`Lines::next`] read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// One line, without its `\n` (or `\r\n`).
    Text(BytesMut),
    /// A line longer than the bound (its bytes are skipped up to the next newline).
    TooLong,
}

/// Lines of at most `max` bytes from a reader.
pub(crate) struct Lines<R> {
    reader: R,
    buf: BytesMut,
    scanned: usize,
    max: usize,
    skipping: bool,
}

impl<R: AsyncRead + Unpin> Lines<R> {
    /// Lines of `reader`, each at most `max` bytes.
    pub(crate) fn new(reader: R, max: usize) -> Self {
        Lines { reader, buf: BytesMut::with_capacity(8 * 1024), scanned: 0, max, skipping: false }
    }

    /// The next line; None at the end of the input (a last line without `\n` is returned
    /// first) or on a read error.
    pub(crate) async fn next(&mut self) -> Option<Line> {
        loop {
            if let Some(pos) = memchr::memchr(b'\n', &self.buf[self.scanned..]).map(|p| p + self.scanned) {
                let mut line = self.buf.split_to(pos + 1);
                self.scanned = 0;
                if std::mem::take(&mut self.skipping) {
                    continue; // the end of a line already reported as too long
                }
                line.truncate(pos);
                if line.last() == Some(&b'\r') {
                    line.truncate(pos - 1);
                }
                return Some(Line::Text(line));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max {
                self.buf.advance(self.buf.len());
                self.scanned = 0;
                if !std::mem::replace(&mut self.skipping, true) {
                    return Some(Line::TooLong);
                }
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve((self.buf.len() + 8192).min(self.max + 1).max(8192));
            }
            match self.reader.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => {
                    if self.skipping || self.buf.is_empty() {
                        return None;
                    }
                    self.scanned = 0;
                    return Some(Line::Text(self.buf.split()));
                }
                Ok(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_reported_once_and_skipped() {
        let mut input = b"short\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 100_000));
        input.extend_from_slice(b"\nafter\nlast");
        let mut lines = Lines::new(&input[..], 1000);
        assert_eq!(lines.next().await, Some(Line::Text(BytesMut::from(&b"short"[..]))));
        assert_eq!(lines.next().await, Some(Line::TooLong));
        assert_eq!(lines.next().await, Some(Line::Text(BytesMut::from(&b"after"[..]))));
        assert_eq!(lines.next().await, Some(Line::Text(BytesMut::from(&b"last"[..]))));
        assert_eq!(lines.next().await, None);
        assert!(lines.buf.capacity() < 64 * 1024, "memory grew: {}", lines.buf.capacity());
    }
}
