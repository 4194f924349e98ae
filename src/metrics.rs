//! Counters and latency histograms behind `/stats` (per server and per identity) and
//! `/metrics` (Prometheus text), fed from the one place every request ends: its audit record.
//!
//! Invariants: recording takes no lock on the request path (series are looked up in maps that
//! are replaced whole, and counted with atomics); Prometheus labels come only from bounded sets
//! (configured server names, a fixed list of MCP methods, fixed outcomes and reasons), never
//! from a token, an identity, a tool argument or a name a client chose.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::sharded::lock;

/// The MCP methods counted under their own label; anything else is `other`.
pub(crate) const METHODS: [&str; 22] = [
    "initialize",
    "ping",
    "server/discover",
    "tools/list",
    "tools/call",
    "prompts/list",
    "prompts/get",
    "resources/list",
    "resources/templates/list",
    "resources/read",
    "resources/subscribe",
    "resources/unsubscribe",
    "subscriptions/listen",
    "completion/complete",
    "logging/setLevel",
    "notifications/initialized",
    "notifications/cancelled",
    "batch",
    "GET",
    "DELETE",
    "POST",
    "other",
];

/// Refusal reasons counted under their own label.
pub(crate) const REASONS: [&str; 8] = [
    "missing credential",
    "invalid token",
    "malformed credentials",
    "endpoint not granted",
    "rate limited",
    "failure throttle",
    "origin not allowed",
    "not granted",
];

/// Histogram bucket upper bounds, microseconds: 10 µs × 1.25^i.
fn bounds() -> &'static [u64] {
    static B: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    B.get_or_init(|| (0..80).map(|i| (10.0 * 1.25f64.powi(i)).round() as u64).collect())
}

/// A latency histogram with fine geometric buckets.
pub(crate) struct Histogram {
    buckets: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: (0..=bounds().len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = bounds().partition_point(|b| *b < us);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// The q-quantile in milliseconds (the upper bound of its bucket), None when empty.
    pub(crate) fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count.load(Ordering::Relaxed);
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                let us = bounds().get(i).copied().unwrap_or(u64::MAX);
                return Some(us as f64 / 1000.0);
            }
        }
        None
    }
}

/// Counters of one server or one identity.
#[derive(Default)]
pub(crate) struct Series {
    /// Requests seen.
    pub requests: AtomicU64,
    /// Requests answered with an error (a JSON-RPC error or an HTTP 5xx).
    pub errors: AtomicU64,
    /// Requests refused (authentication, grants, limits).
    pub refusals: AtomicU64,
    /// How long requests took, from arrival to answer.
    pub latency: Histogram,
    /// Per method (index in [`METHODS`]) and outcome (0 allowed, 1 refused).
    by_method: [[AtomicU64; 2]; METHODS.len()],
}

/// What one finished request contributes.
pub(crate) struct Observation<'a> {
    /// The server it addressed, if any.
    pub server: Option<&'a str>,
    /// The identity's series, if authenticated.
    pub identity: Option<&'a str>,
    /// The JSON-RPC or HTTP method.
    pub method: &'a str,
    /// The refusal outcome (`refused: …`), if refused.
    pub refused: Option<&'a str>,
    /// Whether it ended in an error.
    pub error: bool,
    /// How long it took.
    pub latency: Duration,
}

/// The most identities with a series of their own.
const MAX_IDENTITY_SERIES: usize = 1000;
/// The name under which `/stats` shows the series the identities past the cap share.
const OTHER_IDENTITIES: &str = "(other)";

/// Every series, and the gateway-wide counters.
pub(crate) struct Metrics {
    servers: ArcSwap<HashMap<String, Arc<Series>>>,
    identities: ArcSwap<HashMap<String, Arc<Series>>>,
    /// Identities seen since the last rebuild (added on first sight, rare).
    added: Mutex<()>,
    auth_failures: [AtomicU64; REASONS.len()],
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut servers = HashMap::new();
        servers.insert(String::new(), Arc::new(Series::default()));
        Metrics {
            servers: ArcSwap::from_pointee(servers),
            identities: ArcSwap::from_pointee(HashMap::new()),
            added: Mutex::new(()),
            auth_failures: std::array::from_fn(|_| AtomicU64::new(0)),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        }
    }
}

fn method_index(m: &str) -> usize {
    METHODS.iter().position(|x| *x == m).unwrap_or(METHODS.len() - 1)
}

impl Metrics {
    /// Sets the known servers and identities (config load and reload): existing series carry
    /// over, new ones start at zero.
    pub(crate) fn configure<'a>(
        &self,
        servers: impl Iterator<Item = &'a str>,
        identities: impl Iterator<Item = &'a str>,
    ) {
        let _g = lock(&self.added);
        let old = self.servers.load();
        let mut next: HashMap<String, Arc<Series>> =
            servers.map(|s| (s.to_owned(), old.get(s).cloned().unwrap_or_default())).collect();
        next.insert(String::new(), old.get("").cloned().unwrap_or_default());
        self.servers.store(Arc::new(next));
        let old = self.identities.load();
        let mut ids: HashMap<String, Arc<Series>> = (**old).clone();
        for i in identities {
            ids.entry(i.to_owned()).or_default();
        }
        self.identities.store(Arc::new(ids));
    }

    /// The series of an identity (made on first use).
    fn identity(&self, name: &str) -> Arc<Series> {
        if let Some(s) = self.identities.load().get(name) {
            return s.clone();
        }
        let _g = lock(&self.added);
        let mut ids = (**self.identities.load()).clone();
        // Identities that come and go (access tokens of a provider's every user) are bounded:
        // past the cap, the rest share one series.
        let key = if ids.len() >= MAX_IDENTITY_SERIES && !ids.contains_key(name) { OTHER_IDENTITIES } else { name };
        let s = ids.entry(key.to_owned()).or_default().clone();
        self.identities.store(Arc::new(ids));
        s
    }

    /// Counts one finished request.
    pub(crate) fn observe(&self, o: &Observation<'_>) {
        let servers = self.servers.load();
        let series = o.server.and_then(|s| servers.get(s)).or_else(|| servers.get(""));
        let identity = o.identity.map(|i| self.identity(i));
        let refused = o.refused.is_some();
        for s in series.map(|s| &**s).into_iter().chain(identity.as_deref()) {
            s.requests.fetch_add(1, Ordering::Relaxed);
            if refused {
                s.refusals.fetch_add(1, Ordering::Relaxed);
            } else if o.error {
                s.errors.fetch_add(1, Ordering::Relaxed);
            }
            s.latency.record(o.latency);
            s.by_method[method_index(o.method)][usize::from(refused)].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(r) = o.refused {
            let reason = r.trim_start_matches("refused: ");
            let i = REASONS.iter().position(|x| reason == *x).unwrap_or(REASONS.len() - 1);
            self.auth_failures[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a reload.
    pub(crate) fn reloaded(&self, ok: bool) {
        if ok { &self.reloads_ok } else { &self.reloads_failed }.fetch_add(1, Ordering::Relaxed);
    }

    /// `/stats`: per server and per identity.
    pub(crate) fn stats_json(&self) -> serde_json::Value {
        let one = |s: &Series| {
            serde_json::json!({
                "requests": s.requests.load(Ordering::Relaxed),
                "errors": s.errors.load(Ordering::Relaxed),
                "refusals": s.refusals.load(Ordering::Relaxed),
                "latency_ms": {"p50": s.latency.quantile_ms(0.5), "p99": s.latency.quantile_ms(0.99)},
            })
        };
        let servers: serde_json::Map<String, serde_json::Value> =
            self.servers.load().iter().filter(|(k, _)| !k.is_empty()).map(|(k, s)| (k.clone(), one(s))).collect();
        let identities: serde_json::Map<String, serde_json::Value> =
            self.identities.load().iter().map(|(k, s)| (k.clone(), one(s))).collect();
        serde_json::json!({"servers": servers, "identities": identities})
    }

    /// The request-derived part of `/metrics` (Prometheus text format 0.0.4).
    pub(crate) fn render(&self, out: &mut String) {
        let servers = self.servers.load();
        let mut names: Vec<&String> = servers.keys().collect();
        names.sort();
        let _ = writeln!(out, "# HELP portcullis_requests_total Requests by server, method and outcome.");
        let _ = writeln!(out, "# TYPE portcullis_requests_total counter");
        for name in &names {
            let s = &servers[*name];
            for (mi, m) in METHODS.iter().enumerate() {
                for (oi, outcome) in ["allowed", "refused"].iter().enumerate() {
                    let n = s.by_method[mi][oi].load(Ordering::Relaxed);
                    if n > 0 {
                        let _ = writeln!(
                            out,
                            "portcullis_requests_total{{server=\"{name}\",method=\"{m}\",outcome=\"{outcome}\"}} {n}"
                        );
                    }
                }
            }
        }
        let _ = writeln!(out, "# HELP portcullis_request_duration_seconds Request latency by server.");
        let _ = writeln!(out, "# TYPE portcullis_request_duration_seconds histogram");
        for name in &names {
            let h = &servers[*name].latency;
            let mut cumulative = 0;
            for (i, b) in h.buckets.iter().enumerate() {
                cumulative += b.load(Ordering::Relaxed);
                // Every fourth fine bucket (a factor of about 2.4) is exposed.
                if let Some(bound) = bounds().get(i).filter(|_| i % 4 == 3) {
                    let le = *bound as f64 / 1e6;
                    let _ = writeln!(
                        out,
                        "portcullis_request_duration_seconds_bucket{{server=\"{name}\",le=\"{le}\"}} {cumulative}"
                    );
                }
            }
            let count = h.count.load(Ordering::Relaxed);
            let sum = h.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ =
                writeln!(out, "portcullis_request_duration_seconds_bucket{{server=\"{name}\",le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "portcullis_request_duration_seconds_sum{{server=\"{name}\"}} {sum}");
            let _ = writeln!(out, "portcullis_request_duration_seconds_count{{server=\"{name}\"}} {count}");
        }
        let _ = writeln!(out, "# HELP portcullis_refusals_total Refused requests by reason.");
        let _ = writeln!(out, "# TYPE portcullis_refusals_total counter");
        for (i, r) in REASONS.iter().enumerate() {
            let n = self.auth_failures[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "portcullis_refusals_total{{reason=\"{}\"}} {n}", r.replace(' ', "_"));
        }
        let _ = writeln!(out, "# HELP portcullis_reloads_total Config reloads by result.");
        let _ = writeln!(out, "# TYPE portcullis_reloads_total counter");
        let _ = writeln!(out, "portcullis_reloads_total{{result=\"ok\"}} {}", self.reloads_ok.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "portcullis_reloads_total{{result=\"failed\"}} {}",
            self.reloads_failed.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_and_bounded_labels() {
        let m = Metrics::default();
        m.configure(["files"].into_iter(), ["alice"].into_iter());
        for ms in 1..=100 {
            m.observe(&Observation {
                server: Some("files"),
                identity: Some("alice"),
                method: if ms % 2 == 0 { "tools/call" } else { "made/up/by/a/client" },
                refused: None,
                error: ms == 100,
                latency: Duration::from_millis(ms),
            });
        }
        let stats = m.stats_json();
        let p50 = stats["servers"]["files"]["latency_ms"]["p50"].as_f64().unwrap();
        assert!((45.0..70.0).contains(&p50), "{p50}");
        assert_eq!(stats["identities"]["alice"]["errors"], 1);
        let mut text = String::new();
        m.render(&mut text);
        assert!(text.contains(r#"method="other""#) && !text.contains("made/up"));
        assert!(!text.contains("alice"));
    }
}
