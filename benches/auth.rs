//! Authentication cost: valid tokens, near misses (a valid token with its last character changed)
//! and random tokens of the same length, against a table of 1,000 tokens. The lookup is a
//! hash-map probe on the SHA-256 digest, so a near miss and a random guess must cost the same.
//! Each case cycles through 256 different tokens, so where one digest happens to land in the
//! table averages out.
//!
//! Issued tokens (the SQLite store) are measured too: a cache hit through the authenticator, and
//! the one indexed lookup a cache miss costs.
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
        cfg.tokens.push(TokenDef {
            name: format!("t{i}"),
            digest: digest(t),
            role: Role::User,
            tenant: None,
            grants: Grants::all(),
            expires: None,
            rate: None,
            source: portcullis::credentials::TokenSource::File,
        });
    }
    let dir = std::env::temp_dir().join(format!("pcs-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_default();
    let db = dir.join("tokens.db");
    let issued: Vec<String> = {
        let store = portcullis::store::SqliteStore::open(&db).unwrap_or_else(|e| panic!("{e}"));
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
    let store = portcullis::store::SqliteStore::open(&db).unwrap_or_else(|e| panic!("{e}"));
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
}
