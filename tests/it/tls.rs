//! TLS on the listener with a test CA: HTTPS requests, client certificates naming identities,
//! a certificate swap that keeps open connections, and `require_https`.

use std::path::Path;
use std::process::Command as StdCommand;
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::*;

fn openssl(dir: &Path, args: &[&str]) {
    let out =
        StdCommand::new("openssl").current_dir(dir).args(args).output().expect("openssl is needed for the TLS tests");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA, two server certificates for 127.0.0.1/localhost, and client certificates for `alice`
/// and `mallory`, all under `dir`.
fn pki(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=portcullis test CA",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
    for (name, cn, ext) in [
        ("server1", "server one", "server.ext"),
        ("server2", "server two", "server.ext"),
        ("alice", "alice", "client.ext"),
        ("mallory", "mallory", "client.ext"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                ext,
            ],
        );
    }
    for f in ["server1.pem", "server1.key"] {
        std::fs::copy(dir.join(f), dir.join(f.replace("server1", "live"))).unwrap();
    }
}

fn client(dir: &Path, identity: Option<&str>) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.pem")).unwrap()).unwrap();
    let mut b = reqwest::Client::builder().tls_certs_only([ca]).tls_info(true);
    if let Some(name) = identity {
        let mut pem = std::fs::read(dir.join(format!("{name}.pem"))).unwrap();
        pem.extend(std::fs::read(dir.join(format!("{name}.key"))).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

fn peer_cert(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions().get::<reqwest::tls::TlsInfo>().and_then(|i| i.peer_certificate()).unwrap().to_vec()
}

fn initialize() -> String {
    json!({"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-11-25","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_client_certificates_and_a_certificate_swap() {
    let dir = TempDir::new();
    pki(&dir.0);
    let top = format!(
        "tls:\n  cert: {:?}\n  key: {:?}\n  client_ca: {:?}\nauth:\n  tokens:\n    alice: alice-secret-0123456789abcdef\n",
        dir.0.join("live.pem").display().to_string(),
        dir.0.join("live.key").display().to_string(),
        dir.0.join("ca.pem").display().to_string()
    );
    let gw = gateway().demo("d", &[], "").top(&top).start().await;
    let base = gw.url.replace("http://", "https://");
    let plain = client(&dir.0, None);

    // HTTPS with a bearer token.
    let r = plain
        .post(format!("{base}/mcp"))
        .header("authorization", "Bearer alice-secret-0123456789abcdef")
        .header("content-type", "application/json")
        .body(initialize())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first_cert = peer_cert(&r);
    // A plain-HTTP client gets nothing from a TLS listener.
    assert!(reqwest::get(format!("{}/health", gw.url)).await.is_err());

    // A client certificate whose subject is a configured name authenticates as that identity.
    let as_alice = client(&dir.0, Some("alice"));
    let r = as_alice
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .body(initialize())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    gw.audit_until(|r| r.iter().any(|r| r["identity"] == "alice" && r["method"] == "initialize")).await;
    let r = client(&dir.0, Some("mallory"))
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .body(initialize())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "an unknown certificate subject");
    // The internal header cannot be forged by a client.
    let r = plain
        .post(format!("{base}/mcp"))
        .header("x-portcullis-client-subject", "alice")
        .header("content-type", "application/json")
        .body(initialize())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // An open stream on the old certificate survives a swap; new connections get the new one.
    let stream = as_alice
        .get(format!("{base}/mcp"))
        .header("accept", "text/event-stream")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let mut events = Events::from_response(stream);
    let mut reloads = gw.running.as_ref().unwrap().certificate_reloads();
    for f in ["pem", "key"] {
        let tmp = dir.0.join(format!("live.{f}.tmp"));
        std::fs::copy(dir.0.join(format!("server2.{f}")), &tmp).unwrap();
        std::fs::rename(&tmp, dir.0.join(format!("live.{f}"))).unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), reloads.changed()).await.unwrap().unwrap();
    // A fresh client: no pooled connection on the old certificate.
    let r = client(&dir.0, None).get(format!("{base}/health")).send().await.unwrap();
    assert_ne!(peer_cert(&r), first_cert);
    let caller = as_alice.clone();
    let r = caller
        .post(format!("{base}/mcp"))
        .header("content-type", "application/json")
        .header("mcp-session-id", &session)
        .header("mcp-protocol-version", "2025-11-25")
        .body(
            json!({"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"d__crash","arguments":{}}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let changed: Value = events.next_method("notifications/tools/list_changed").await;
    assert_eq!(changed["method"], "notifications/tools/list_changed");
    gw.stop().await;
}

#[tokio::test]
async fn require_https_refuses_plain_http_unless_a_trusted_proxy_vouches() {
    let gw = gateway().demo("d", &[], "").top("require_https: true\n").start().await;
    let r = reqwest::Client::new()
        .post(gw.mcp())
        .header("content-type", "application/json")
        .body(initialize())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(body["error"], "https_required");
    // X-Forwarded-Proto from an untrusted peer is not believed.
    let r = reqwest::Client::new()
        .get(format!("{}/health", gw.url))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    gw.stop().await;

    let gw = gateway().demo("d", &[], "").top("require_https: true\ntrusted_proxies: [127.0.0.1]\n").start().await;
    let r = reqwest::Client::new()
        .get(format!("{}/health", gw.url))
        .header("x-forwarded-proto", "https")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::Client::new().get(format!("{}/health", gw.url)).send().await.unwrap();
    assert_eq!(r.status(), 400);
    gw.stop().await;
}
