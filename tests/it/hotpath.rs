//! What one proxied `tools/call` costs in heap allocations, counted by a counting global
//! allocator (`allocation-counter`, per thread) on the gateway's own thread: the gateway runs on
//! a current-thread runtime on the test thread, while the client runs on another thread and the
//! upstream (the demo server over streamable HTTP, 2026-07-28) in another process, so neither is
//! counted. Everything the gateway does on its thread during the calls is: authentication,
//! routing, the upstream request, the answer, the audit record and the background sweeps.

use std::sync::mpsc;

use serde_json::json;
use tokio::sync::oneshot;

use crate::support::{Client, gateway, http_demo};

const TOKEN: &str = "hotpath-token-0123456789abcdefghij";

/// Allocations per proxied call (authenticated, 100 B argument and result) at most. Measured:
/// 124 (see docs/performance.md for where they come from).
const MAX_ALLOCATIONS_PER_CALL: f64 = 135.0;

/// Bytes allocated per call with a 64 KiB result, as a multiple of the answer, at most.
/// Measured: 2.59×. The performance issue's target is 1.5×, which this does not reach: on a
/// warmed keep-alive connection hyper's adaptive read buffer reserves about 128 KiB to read a
/// 64 KiB body (docs/performance.md). This bound, with room for how hyper happens to read under
/// load, guards against another copy of the body.
const MAX_BYTES_PER_ANSWER_BYTE: f64 = 3.5;

/// A job for the client thread: `n` calls of a tool with arguments; answers the body lengths.
type Job = (&'static str, serde_json::Value, usize, oneshot::Sender<Vec<usize>>);

/// A client on its own thread (and runtime), so its allocations are not counted.
fn client_thread(url: String) -> (mpsc::Sender<Job>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<Job>();
    let handle = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let client = Client::modern(&url).bearer(TOKEN);
        while let Ok((tool, args, n, done)) = rx.recv() {
            let lens = rt.block_on(async {
                let mut lens = Vec::with_capacity(n);
                for _ in 0..n {
                    let body = json!({"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":tool,"arguments":args,
                        "_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}});
                    let resp = client.post(body).await;
                    assert_eq!(resp.status(), 200);
                    let text = resp.text().await.unwrap();
                    assert!(text.contains(r#""id":7"#) && !text.contains("\"error\""), "{}", &text[..text.len().min(300)]);
                    lens.push(text.len());
                }
                lens
            });
            let _ = done.send(lens);
        }
    });
    (tx, handle)
}

#[test]
fn a_proxied_call_allocates_a_bounded_amount() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (up, gw) = rt.block_on(async {
        let up = http_demo(&[]).await;
        let gw = gateway().remote("h", &up.url, "").top(&format!("auth:\n  tokens:\n    t: {TOKEN}\n")).start().await;
        (up, gw)
    });
    let (jobs, client) = client_thread(gw.mcp());
    // Runs `n` calls and counts what the gateway's thread allocates meanwhile.
    let run = |tool: &'static str, args: serde_json::Value, n: usize| {
        let (tx, rx) = oneshot::channel();
        jobs.send((tool, args, n, tx)).unwrap();
        let mut lens = Vec::new();
        let info = allocation_counter::measure(|| lens = rt.block_on(rx).unwrap());
        (info, lens)
    };

    let small = json!({"text": "x".repeat(100)});
    run("h__echo", small.clone(), 50); // warm-up: connections, caches
    let n = 500;
    let (info, _) = run("h__echo", small, n);
    let per_call = info.count_total as f64 / n as f64;
    let bytes_per_call = info.bytes_total as f64 / n as f64;
    eprintln!("100 B call: {per_call:.1} allocations and {bytes_per_call:.0} bytes allocated per call");
    assert!(info.count_total > 0, "the counting allocator is not installed");
    assert!(per_call <= MAX_ALLOCATIONS_PER_CALL, "{per_call:.1} allocations per call");

    // A 64 KiB result: what the gateway allocates per call, against the result's size.
    let big = json!({"bytes": 64 * 1024});
    run("h__big", big.clone(), 10);
    let n = 100;
    let (info, lens) = run("h__big", big, n);
    let size = lens.iter().sum::<usize>() as f64 / n as f64;
    let bytes_per_call = info.bytes_total as f64 / n as f64;
    eprintln!(
        "64 KiB result ({size:.0} B answer): {:.1} allocations and {bytes_per_call:.0} bytes allocated per call, {:.2}× the answer",
        info.count_total as f64 / n as f64,
        bytes_per_call / size
    );
    assert!(size >= 64.0 * 1024.0);
    assert!(
        bytes_per_call <= MAX_BYTES_PER_ANSWER_BYTE * size,
        "{bytes_per_call:.0} bytes allocated for a {size:.0} B answer"
    );

    drop(jobs);
    client.join().unwrap();
    rt.block_on(async move {
        gw.stop().await;
        drop(up);
    });
}
