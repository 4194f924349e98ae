//! Authentication cost: valid tokens, near misses (a valid token with its last character changed)
//! and random tokens of the same length, against a table of 1,000 tokens. The lookup is a
//! hash-map probe on the SHA-256 digest, so a near miss and a random guess must cost the same.
//! Each case cycles through 256 different tokens, so where one digest happens to land in the
//! table averages out.
//!
//! Issued tokens (the SQLite store) are measured too: a cache hit through the authenticator, and
//! the one indexed lookup a cache miss costs.
//!
//! Access tokens (JWTs of an identity provider, `oauth.issuers`) are measured on the endpoint
//! path (`Authenticator::authenticate_at`) against a static token on the same path: a known
//! token (the verified cache), and a first verification (ES256). The provider is a JWKS
//! served on 127.0.0.1 by this process.
//!
//! `cargo bench --bench auth` prints the median time per authentication over 31 rounds.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use axum::http::{HeaderMap, HeaderValue};
use portcullis::auth::Authenticator;
use portcullis::authz::Grants;
use portcullis::credentials::{AuthConfig, FailureLimit, Role, TokenDef, digest};

/// A token shaped like Portcullis' own (`pcs_` + 43 base64url characters), from a xorshift
/// generator so the table, the near misses and the random guesses share one alphabet.
fn token(seed: &mut u64) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let body: String = (0..43)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            ALPHABET[(*seed % 64) as usize] as char
        })
        .collect();
    format!("pcs_{body}")
}

/// A config token for `secret`: a user reaching everything.
fn user_token(name: String, secret: &str) -> TokenDef {
    TokenDef {
        name,
        digest: digest(secret),
        role: Role::User,
        tenant: None,
        grants: Grants::all(),
        expires: None,
        rate: None,
        source: portcullis::credentials::TokenSource::File,
    }
}

fn headers(secret: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {secret}")).unwrap_or(HeaderValue::from_static("")),
    );
    h
}

/// Median ns per authentication for each case; rounds interleave the cases so machine noise
/// (frequency changes, other processes) falls on all of them alike.
/// Median ns per authentication for each case; rounds interleave the cases so machine noise
/// (frequency changes, other processes) falls on all of them alike.
fn medians(cases: &[Vec<HeaderMap>], auth: &Authenticator, client: IpAddr) -> Vec<f64> {
    const ROUNDS: usize = 31;
    const ITERS: usize = 20_480;
    let mut samples = vec![Vec::with_capacity(ROUNDS); cases.len()];
    for _ in 0..ROUNDS {
        for (i, set) in cases.iter().enumerate() {
            let start = Instant::now();
            for n in 0..ITERS {
                let _ = black_box(auth.authenticate(black_box(&set[n % set.len()]), client));
            }
            samples[i].push(start.elapsed().as_nanos() as f64 / ITERS as f64);
        }
    }
    samples
        .into_iter()
        .map(|mut s| {
            s.sort_by(f64::total_cmp);
            s[ROUNDS / 2]
        })
        .collect()
}

fn main() {
    // `cargo test --all-targets` runs bench targets too (without `--bench`): skip there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench`");
        return;
    }
    let mut cfg =
        AuthConfig { failures: FailureLimit { max: u32::MAX, ..FailureLimit::default() }, ..AuthConfig::default() };
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let table: Vec<String> = (0..1000).map(|_| token(&mut seed)).collect();
    for (i, t) in table.iter().enumerate() {
        cfg.tokens.push(user_token(format!("t{i}"), t));
    }
    let dir = std::env::temp_dir().join(format!("pcs-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_default();
    let db = portcullis::store::StoreLocation::File(dir.join("tokens.db"));
    let issued: Vec<String> = {
        let store = portcullis::store::Store::open(&db).unwrap_or_else(|e| panic!("{e}"));
        (0..1000)
            .map(|i| {
                let new = portcullis::store::NewToken { name: format!("issued-{i}"), ..Default::default() };
                store.create(&new, portcullis::store::now_ms()).map(|(_, s)| s).unwrap_or_default()
            })
            .collect()
    };
    let view = portcullis::store::StoreView::new(db.clone(), false);
    let auth = Authenticator::new(&cfg, &[], Some(view));
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let valid: Vec<String> = table[..256].to_vec();
    // One character off: the last one replaced by a different character of the alphabet.
    let near: Vec<String> = valid
        .iter()
        .map(|t| {
            let mut n = t.clone();
            let last = n.pop().unwrap_or('A');
            n.push(if last == 'A' { 'B' } else { 'A' });
            n
        })
        .collect();
    let random: Vec<String> = (0..256).map(|_| token(&mut seed)).collect();
    assert!(valid.iter().chain(&near).chain(&random).all(|t| t.len() == 47));
    let names = ["random token", "near miss (last char)", "valid token"];
    let sets: Vec<Vec<HeaderMap>> =
        [&random, &near, &valid].iter().map(|set| set.iter().map(|t| headers(t)).collect()).collect();
    let result = medians(&sets, &auth, client);
    println!("{:<24} {:>12}", "case", "median ns");
    for (name, ns) in names.iter().zip(&result) {
        println!("{name:<24} {ns:>12.1}");
    }
    println!("near miss / random: {:.3}", result[1] / result[0]);

    // Issued tokens: every lookup after the first is a cache hit.
    let issued_set: Vec<HeaderMap> = issued[..256].iter().map(|t| headers(t)).collect();
    let hit = medians(&[issued_set], &auth, client)[0];
    println!("{:<24} {hit:>12.1}", "issued token, cache hit");
    // A miss is one indexed lookup in SQLite.
    let store = portcullis::store::Store::open(&db).unwrap_or_else(|e| panic!("{e}"));
    let digests: Vec<[u8; 32]> = issued[..256].iter().map(|t| digest(t)).collect();
    let mut samples = Vec::new();
    for _ in 0..31 {
        let start = Instant::now();
        for d in &digests {
            let _ = black_box(store.lookup(black_box(d)));
        }
        samples.push(start.elapsed().as_nanos() as f64 / digests.len() as f64);
    }
    samples.sort_by(f64::total_cmp);
    println!("{:<24} {:>12.1}", "issued token, cache miss", samples[15]);
    let _ = std::fs::remove_dir_all(&dir);
    access_tokens(&table[0]);
}

/// An ES256 signing key and its public JWK.
fn es256() -> (jsonwebtoken::EncodingKey, serde_json::Value) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap_or_else(|e| panic!("{e}"));
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap_or_else(|e| panic!("{e}"));
    let p = pair.public_key().as_ref();
    let jwk =
        serde_json::json!({"kty":"EC","crv":"P-256","x":b64(&p[1..33]),"y":b64(&p[33..65]),"kid":"k1","alg":"ES256"});
    (jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
}

/// A static token and access tokens, each through `authenticate_at` for `/mcp`.
fn access_tokens(static_token: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    let (signing, jwk) = es256();
    let (issuer, _server) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap_or_else(|e| panic!("{e}"));
        let issuer = format!("http://{}", listener.local_addr().unwrap_or_else(|e| panic!("{e}")));
        let jwks = serde_json::json!({"keys": [jwk]}).to_string();
        let app = axum::Router::new().route("/jwks", axum::routing::get(move || std::future::ready(jwks.clone())));
        (issuer, tokio::spawn(async move { axum::serve(listener, app).await }))
    });
    let mut cfg =
        AuthConfig { failures: FailureLimit { max: u32::MAX, ..FailureLimit::default() }, ..AuthConfig::default() };
    cfg.tokens.push(user_token("static".into(), static_token));
    cfg.oauth.separator = "__".into();
    cfg.oauth.issuers.push(portcullis::credentials::IssuerDef {
        issuer: issuer.clone(),
        jwks_uri: Some(format!("{issuer}/jwks")),
        audiences: Vec::new(),
        algorithms: vec![jsonwebtoken::Algorithm::ES256],
        leeway: std::time::Duration::from_secs(60),
        require_at_jwt: false,
        identity_claim: "sub".into(),
        scopes: [("all".to_owned(), Grants::all())].into_iter().collect(),
        groups_claim: "groups".into(),
        roles: Default::default(),
        tenants: Default::default(),
        introspection: None,
    });
    let auth = Authenticator::new(&cfg, &[("a".into(), Vec::new())], None);
    let at = portcullis::oauth::Endpoint { base: "http://gw.test".into(), server: None };
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let jwt = |n: usize| {
        let claims = serde_json::json!({"iss": issuer, "sub": format!("user-{n}"), "aud": "http://gw.test/mcp", "exp": exp, "scope": "all"});
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims, &signing).unwrap_or_default()
    };
    // The first access token fetches the keys (an unknown key id makes the provider fetch).
    let first = headers(&jwt(0));
    assert!(rt.block_on(auth.authenticate_at(&first, client, &at)).is_ok(), "the access token is accepted");
    let known: Vec<HeaderMap> = (0..256).map(|n| headers(&jwt(n))).collect();
    for h in &known {
        assert!(rt.block_on(auth.authenticate_at(h, client, &at)).is_ok());
    }
    let statics: Vec<HeaderMap> = vec![headers(static_token); 256];
    const ROUNDS: usize = 31;
    const ITERS: usize = 20_480;
    let mut samples = [Vec::new(), Vec::new()];
    for _ in 0..ROUNDS {
        for (i, set) in [&statics, &known].into_iter().enumerate() {
            let start = Instant::now();
            rt.block_on(async {
                for n in 0..ITERS {
                    let _ = black_box(auth.authenticate_at(black_box(&set[n % set.len()]), client, &at).await);
                }
            });
            samples[i].push(start.elapsed().as_nanos() as f64 / ITERS as f64);
        }
    }
    let median = |s: &mut Vec<f64>| {
        s.sort_by(f64::total_cmp);
        s[ROUNDS / 2]
    };
    let (st, jw) = (median(&mut samples[0]), median(&mut samples[1]));
    println!("{:<24} {st:>12.1}", "static, endpoint path");
    println!("{:<24} {jw:>12.1}", "access token, known");
    println!("known access token - static: {:.1} ns", jw - st);
    // A first verification: a token never seen (ES256 signature and claims).
    let fresh: Vec<HeaderMap> = (1000..1000 + 31 * 64).map(|n| headers(&jwt(n))).collect();
    let mut first = Vec::new();
    for chunk in fresh.chunks(64) {
        let start = Instant::now();
        for h in chunk {
            let _ = black_box(rt.block_on(auth.authenticate_at(h, client, &at)));
        }
        first.push(start.elapsed().as_nanos() as f64 / chunk.len() as f64);
    }
    println!("{:<24} {:>12.1}", "access token, first (ES256)", median(&mut first));
}
