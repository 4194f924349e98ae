//! The benchmark's own ends of the wire: the load generator's HTTP/1.1 client and the fast
//! upstream. Both are written by hand on purpose: an HTTP library costs more CPU per call than
//! the fastest row costs the system under test, so a row measured through one measures the
//! library (the first round's rows were bound by the load generator's core, not by the
//! gateway). They speak only what the benchmark needs: keep-alive connections, one request
//! at a time, bodies by `Content-Length` (and chunked responses, as any server may send).

use std::net::SocketAddr;

use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request prepared once and sent again and again on one connection.
pub(crate) struct Prepared {
    pub addr: SocketAddr,
    pub bytes: Vec<u8>,
}

impl Prepared {
    /// A 2026-07-28 `tools/call` of `tool` with `text` to `url` (`http://host:port/path`).
    pub(crate) fn call(url: &str, tool: &str, text: &str, token: Option<&str>, id: u64) -> Prepared {
        let rest = url.strip_prefix("http://").expect("an http:// URL");
        let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
        let addr: SocketAddr = host.parse().expect("a numeric host:port");
        let body = serde_json::json!({"jsonrpc":"2.0","id":id,"method":"tools/call","params":{
            "name": tool, "arguments": {"text": text},
            "_meta": {"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}})
        .to_string();
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\nMcp-Protocol-Version: 2026-07-28\r\n\
             Mcp-Method: tools/call\r\nMcp-Name: {tool}\r\n{auth}Content-Length: {}\r\n\r\n",
            body.len()
        );
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body.as_bytes());
        Prepared { addr, bytes }
    }
}

/// One connection of the load generator.
pub(crate) struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub(crate) async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: Vec::with_capacity(128 * 1024) })
    }

    /// Sends the request and reads its response: the status and the body's length.
    pub(crate) async fn exchange(&mut self, request: &[u8]) -> std::io::Result<(u16, usize)> {
        self.stream.write_all(request).await?;
        self.buf.clear();
        let (status, len) = read_message(&mut self.stream, &mut self.buf, true).await?;
        Ok((status, len))
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    buf.reserve(16 * 1024);
    if stream.read_buf(buf).await? == 0 {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed"));
    }
    Ok(())
}

fn find(hay: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    hay.get(from..)?.windows(needle.len()).position(|w| w == needle).map(|i| i + from)
}

/// A header's value in a head (names compared without case).
fn header<'a>(head: &'a [u8], name: &str) -> Option<&'a str> {
    std::str::from_utf8(head).ok()?.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Reads one whole HTTP/1.1 message into `buf` (which holds what was read before): the
/// status (a response) or 0 (a request), and the body's length. On return `buf` holds the
/// head and the body from offset [`body_start`] (chunked bodies are left encoded: only their
/// length is counted).
async fn read_message(stream: &mut TcpStream, buf: &mut Vec<u8>, response: bool) -> std::io::Result<(u16, usize)> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n", 0) {
            break i + 4;
        }
        read_more(stream, buf).await?;
    };
    let head = &buf[..head_end];
    let status = if response {
        std::str::from_utf8(head.get(9..12).unwrap_or_default())
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("no status"))?
    } else {
        0
    };
    if let Some(len) = header(head, "content-length") {
        let len: usize = len.parse().map_err(|_| invalid("content-length"))?;
        while buf.len() < head_end + len {
            read_more(stream, buf).await?;
        }
        return Ok((status, len));
    }
    if header(head, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let (mut at, mut total) = (head_end, 0usize);
        loop {
            let line_end = loop {
                if let Some(i) = find(buf, b"\r\n", at) {
                    break i;
                }
                read_more(stream, buf).await?;
            };
            let size_text = std::str::from_utf8(&buf[at..line_end]).map_err(|_| invalid("chunk size"))?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| invalid("chunk size"))?;
            at = line_end + 2;
            // The chunk and its CRLF (after the last chunk: the empty trailer line).
            while buf.len() < at + size + 2 {
                read_more(stream, buf).await?;
            }
            at += size + 2;
            total += size;
            if size == 0 {
                return Ok((status, total));
            }
        }
    }
    if response && (status == 204 || status == 202 || status == 304) {
        return Ok((status, 0));
    }
    if !response {
        return Ok((status, 0));
    }
    Err(invalid("a body delimited by closing"))
}

/// Where a request's body starts in `buf` (after [`read_message`]).
fn body_start(buf: &[u8]) -> usize {
    find(buf, b"\r\n\r\n", 0).map_or(buf.len(), |i| i + 4)
}

/// The fast upstream: a 2026-07-28 MCP server with one tool, `echo`, on `127.0.0.1:0`,
/// printing `listening on http://ADDR/mcp`. It answers `server/discover`, `tools/list` and
/// `tools/call echo` (the text back), anything else with an empty result; a GET (a stream)
/// with 405. Serves until killed.
pub(crate) async fn serve_upstream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    eprintln!("listening on http://{}/mcp", listener.local_addr().expect("addr"));
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = stream.set_nodelay(true);
            let _ = serve_conn(stream).await;
        });
    }
}

async fn serve_conn(mut stream: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(128 * 1024);
    let mut out = Vec::with_capacity(128 * 1024);
    loop {
        let (_, len) = read_message(&mut stream, &mut buf, false).await?;
        let start = body_start(&buf);
        let is_get = buf.starts_with(b"GET ");
        out.clear();
        if is_get {
            out.extend_from_slice(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n");
        } else {
            match answer(&buf[start..start + len]) {
                Some(json) => {
                    out.extend_from_slice(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                            json.len()
                        )
                        .as_bytes(),
                    );
                    out.extend_from_slice(json.as_bytes());
                }
                None => out.extend_from_slice(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n"),
            }
        }
        stream.write_all(&out).await?;
        buf.drain(..start + len);
    }
}

/// The answer to one JSON-RPC message (None for a notification or a response).
fn answer(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
        #[serde(default)]
        method: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        params: Option<&'a RawValue>,
    }
    #[derive(serde::Deserialize)]
    struct Call<'a> {
        #[serde(borrow)]
        arguments: Option<Arguments<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Arguments<'a> {
        #[serde(borrow)]
        text: Option<&'a RawValue>,
    }
    let m: Message<'_> = serde_json::from_slice(body).ok()?;
    let id = m.id?.get();
    let result = match m.method.as_ref() {
        "server/discover" => r#"{"supportedVersions":["2026-07-28"],"capabilities":{"tools":{}},"resultType":"complete","_meta":{"io.modelcontextprotocol/serverInfo":{"name":"bench-upstream","version":"1"}}}"#.to_owned(),
        "tools/list" => r#"{"tools":[{"name":"echo","inputSchema":{"type":"object"}}],"resultType":"complete"}"#.to_owned(),
        "tools/call" => {
            let text = m
                .params
                .and_then(|p| serde_json::from_str::<Call<'_>>(p.get()).ok())
                .and_then(|c| c.arguments?.text.map(RawValue::get))
                .unwrap_or(r#""""#);
            format!(r#"{{"content":[{{"type":"text","text":{text}}}],"resultType":"complete"}}"#)
        }
        _ => r#"{"resultType":"complete"}"#.to_owned(),
    };
    Some(format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#))
}
