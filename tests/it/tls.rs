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

/// A self-signed CA under `dir`: `NAME.pem` and `NAME.key`.
fn ca(dir: &Path, name: &str, cn: &str) {
    let (key, pem, subject) = (format!("{name}.key"), format!("{name}.pem"), format!("/CN={cn}"));
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
            &key,
            "-out",
            &pem,
            "-days",
            "2",
            "-subj",
            &subject,
        ],
    );
}

/// A CA, two server certificates for 127.0.0.1/localhost, and client certificates for `alice`
/// and `mallory`, all under `dir`.
pub(crate) fn pki(dir: &Path) {
    ca(dir, "ca", "portcullis test CA");
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

/// TLS towards a remote server of its own: the server here is a Portcullis on HTTPS that
/// takes client certificates (alice's names a token). A server entry with the test CA and
/// alice's certificate gets in by mTLS alone; without the certificate it is refused (401); with
/// the system's roots or another CA the certificate is refused; `insecure_skip_verify` gets in
/// (and says so at every start). Bad settings are config errors, never a fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_servers_with_their_own_ca_and_client_certificate() {
    let dir = TempDir::new();
    pki(&dir.0);
    ca(&dir.0, "other-ca", "another CA");
    let path = |f: &str| dir.0.join(f).display().to_string();
    let top = format!(
        "tls:\n  cert: {:?}\n  key: {:?}\n  client_ca: {:?}\nauth:\n  tokens:\n    alice: alice-secret-0123456789abcdef\n",
        path("live.pem"),
        path("live.key"),
        path("ca.pem")
    );
    let upstream = gateway().demo("d", &[], "").top(&top).start().await;
    let url = format!("{}/mcp", upstream.url.replace("http://", "https://"));
    let mtls =
        format!("tls: {{ca: {:?}, cert: {:?}, key: {:?}}}", path("ca.pem"), path("alice.pem"), path("alice.key"));
    let front = gateway()
        .remote("good", &url, &mtls)
        .remote("nocert", &url, &format!("tls: {{ca: {:?}}}", path("ca.pem")))
        .remote("roots", &url, "")
        .remote("otherca", &url, &mtls.replace("ca.pem", "other-ca.pem"))
        .remote(
            "insecure",
            &url,
            &format!(
                "tls: {{insecure_skip_verify: true, cert: {:?}, key: {:?}}}",
                path("alice.pem"),
                path("alice.key")
            ),
        )
        .start()
        .await;
    let client = Client::connect(&front.mcp()).await;
    assert_eq!(client.call_text("good__d__echo", json!({"text": "by mTLS"})).await, "by mTLS");
    assert_eq!(client.call_text("insecure__d__echo", json!({"text": "unverified"})).await, "unverified");
    for refused in ["nocert", "roots", "otherca"] {
        let a = client.call(&format!("{refused}__d__echo"), json!({"text": "x"})).await;
        assert!(a.response["error"].is_object(), "{refused}: {}", a.response);
    }
    let (_, servers) = http_json(reqwest::Method::GET, &format!("{}/servers", front.url), None, None).await;
    let error_of = |name: &str| {
        servers["servers"].as_array().unwrap().iter().find(|s| s["name"] == name).unwrap()["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(error_of("nocert").contains("401"), "{}", error_of("nocert"));
    for name in ["roots", "otherca"] {
        assert!(error_of(name).to_ascii_lowercase().contains("certificate"), "{name}: {}", error_of(name));
    }
    front.stop().await;
    upstream.stop().await;

    // Settings that cannot work are refused when the config is loaded.
    let check = |entry: String| {
        let cfg = dir.0.join("check.yaml");
        std::fs::write(&cfg, format!("servers:\n  r:\n{entry}")).unwrap();
        async move { run_cli(None, &["check", "--config", cfg.to_str().unwrap()], &[]).await }
    };
    std::fs::write(dir.0.join("junk.pem"), "not a certificate").unwrap();
    for (entry, says) in [
        (format!("    url: http://127.0.0.1:9/mcp\n    tls: {{ca: {:?}}}\n", path("ca.pem")), "https://"),
        (format!("    url: https://127.0.0.1:9/mcp\n    tls: {{cert: {:?}}}\n", path("alice.pem")), "go together"),
        (format!("    url: https://127.0.0.1:9/mcp\n    tls: {{ca: {:?}}}\n", path("junk.pem")), "no PEM certificate"),
        (format!("    url: https://127.0.0.1:9/mcp\n    tls: {{ca: {:?}}}\n", path("absent.pem")), "absent.pem"),
        (
            format!(
                "    url: https://127.0.0.1:9/mcp\n    tls: {{cert: {:?}, key: {:?}}}\n",
                path("alice.pem"),
                path("ca.key")
            ),
            "cert and key",
        ),
    ] {
        let (ok, out, err) = check(entry.clone()).await;
        assert!(!ok && format!("{out}{err}").contains(says), "{entry}: {out}{err}");
    }
    let (ok, out, err) =
        check("    url: https://127.0.0.1:9/mcp\n    tls: {insecure_skip_verify: true}\n".into()).await;
    assert!(ok && format!("{out}{err}").contains("insecure_skip_verify"), "{out}{err}");
}
