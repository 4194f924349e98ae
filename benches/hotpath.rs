//! Hot-path pieces: parse a JSON-RPC envelope, rewrite a namespaced tool call, rewrite and
//! filter a `tools/list` of 500 tools (target: under 200 µs), and parse one 4 MiB SSE event.
//!
//! `cargo bench --bench hotpath` prints the median of 31 rounds.

use std::hint::black_box;
use std::time::Instant;

use portcullis::authz::{GrantKind, Grants, Patterns};
use portcullis::mcp::jsonrpc::{Envelope, RawObject};
use portcullis::mcp::lists::{ListPage, push_prefixed};

fn median_ns(iters: u32, mut f: impl FnMut()) -> f64 {
    let mut samples = Vec::new();
    for _ in 0..31 {
        let start = Instant::now();
        for _ in 0..iters {
            f();
        }
        samples.push(start.elapsed().as_nanos() as f64 / f64::from(iters));
    }
    samples.sort_by(f64::total_cmp);
    samples[15]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench`");
        return;
    }
    let call = br#"{"jsonrpc":"2.0","id":17,"method":"tools/call","params":{"name":"files__read_file","arguments":{"path":"/srv/notes/today.md","limit":100},"_meta":{"progressToken":"p-17"}}}"#;
    let parse = median_ns(100_000, || {
        let env = Envelope::parse(black_box(call)).ok();
        black_box(env.map(|e| e.method().len()));
    });
    let rename = median_ns(100_000, || {
        let env = Envelope::parse(black_box(call)).ok();
        let params = env.and_then(|e| e.params).and_then(|p| RawObject::parse(p).ok());
        let out = params.map(|p| p.to_json_with(&[("name", "\"read_file\"")]));
        black_box(out);
    });

    let tools: Vec<serde_json::Value> = (0..500)
        .map(|i| {
            serde_json::json!({"name": format!("tool_{i}"), "description": "Reads a file and returns its text, with line numbers",
                "inputSchema": {"type":"object","properties":{"path":{"type":"string"},"limit":{"type":"integer"}},"required":["path"]}})
        })
        .collect();
    let page = serde_json::json!({ "tools": tools }).to_string();
    let page_len = page.len();
    let open = Grants::all();
    let filtered = Grants { tools: Patterns::parse(["files__tool_1*", "!files__tool_13*"]), ..Grants::default() };
    // As the gateway does it: one pass over the page, then each item's name rewritten in place.
    let list = |grants: &Grants| {
        let page = ListPage::parse(&page).unwrap_or_else(|| panic!("page"));
        let mut out = String::with_capacity(page_len + 16 * 500);
        out.push('[');
        for item in page.items("tools") {
            push_prefixed(&mut out, item, "files", "__", grants, GrantKind::Tool);
        }
        out.push(']');
        out
    };
    assert_eq!(list(&filtered).matches("\"name\"").count(), 111 - 11, "the filter");
    let scan = median_ns(200, || {
        black_box(ListPage::parse(black_box(&page)).map(|p| p.items("tools").len()));
    });
    let all = median_ns(200, || {
        black_box(list(black_box(&open)));
    });
    let some = median_ns(200, || {
        black_box(list(black_box(&filtered)));
    });
    // One 4 MiB event read in 16 KiB chunks (the parser must scan each byte once).
    let mut big = b"event: message\ndata: ".to_vec();
    big.extend(std::iter::repeat_n(b'x', 4 << 20));
    big.extend_from_slice(b"\n\n");
    let sse = median_ns(3, || {
        let mut p = portcullis::mcp::sse::Parser::new(8 << 20);
        let mut n = 0;
        for chunk in big.chunks(16 * 1024) {
            n += p.feed(black_box(chunk)).map(|e| e.len()).unwrap_or(0);
        }
        assert_eq!(n, 1);
    });
    println!("{:<44} {:>12}", "case", "median");
    println!("{:<44} {:>9.0} ns", "parse a tools/call envelope", parse);
    println!("{:<44} {:>9.0} ns", "parse + rewrite the tool name", rename);
    println!("{:<44} {:>9.1} µs", "tools/list of 500: find the items", scan / 1000.0);
    println!("{:<44} {:>9.1} µs", "tools/list of 500: rewrite every name", all / 1000.0);
    println!("{:<44} {:>9.1} µs", "tools/list of 500: filter by grants + rewrite", some / 1000.0);
    println!("{:<44} {:>9.2} ms", "SSE: one 4 MiB event in 16 KiB chunks", sse / 1e6);
}
