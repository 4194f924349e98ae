//! Portcullis as an OAuth 2.1 resource server (MCP authorization): access tokens from the
//! operator's identity providers, verified locally against each issuer's published keys
//! ([`jwt`]), and the keys themselves ([`Provider`]): fetched at start, refreshed on the
//! provider's cache lifetime, fetched again for a key id they do not hold (at most once per
//! [`REFETCH_EVERY`]), and kept while the provider cannot be reached.
//!
//! Invariants: a provider's documents are read only over https (http on loopback), without
//! redirects, within [`MAX_DOCUMENT`] bytes and [`FETCH_TIMEOUT`]; a failed fetch never
//! replaces the last good key set; the metadata's `issuer` must be the configured one; a URL in
//! an error is shown without credentials or query; a token in Portcullis' own format is never
//! introspected.

pub(crate) mod accounts;
pub(crate) mod cimd;
pub(crate) mod client;
pub(crate) mod federation;
pub(crate) mod jwt;
pub(crate) mod login;
pub(crate) mod metadata;
pub(crate) mod server;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::config::shown_url;
use crate::credentials::{IssuerDef, ResourceBinding};
use crate::sharded::lock;

/// The least time between two fetches caused by an unknown key id (a flood of forged `kid`s
/// cannot hammer the provider).
pub(crate) const REFETCH_EVERY: Duration = Duration::from_secs(30);
/// The largest metadata or JWKS document read.
pub(crate) const MAX_DOCUMENT: usize = 1 << 20;
/// How long one fetch may take.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// The bounds on a key set's lifetime, whatever the provider's `Cache-Control` says.
const MIN_LIFETIME: Duration = Duration::from_secs(5 * 60);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// The lifetime without a `max-age`.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// How soon a failed fetch is tried again by the refresher.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// The HTTP client every OAuth exchange of Portcullis' uses (providers' documents and keys,
/// token, registration and exchange endpoints): no redirects, a 5 s connect and a
/// [`FETCH_TIMEOUT`] overall timeout.
pub(crate) fn http_client() -> reqwest::Client {
    crate::tls::http_client_builder().timeout(FETCH_TIMEOUT).build().unwrap_or_default()
}

/// Which MCP endpoint a path after the gateway's base names: `Some(None)` for the aggregated one
/// (``, `/mcp`, `/sse`), `Some(Some(name))` for an enabled server's (`/servers/NAME/mcp`, its
/// `/sse`, and MCP Front's `/NAME/mcp`, `/NAME/sse`), None for anything else (a trailing slash
/// included: clients compare resources strictly).
pub(crate) fn endpoint_of<'a>(config: &crate::config::Config, path: &'a str) -> Option<Option<&'a str>> {
    let p = path.strip_prefix('/').unwrap_or(path);
    if p.ends_with('/') {
        return None;
    }
    match p.split('/').collect::<Vec<_>>().as_slice() {
        [""] | ["mcp" | "sse"] => Some(None),
        ["servers", name, "mcp" | "sse"] | [name, "mcp" | "sse"] if config.server(name).is_some_and(|d| d.enabled) => {
            Some(Some(*name))
        }
        _ => None,
    }
}

/// The MCP endpoint a request is for, as an OAuth resource (RFC 8707, RFC 9728).
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The gateway's public URL (`public_url`, else from `listen`), without a trailing slash.
    pub base: String,
    /// The one server of a `/servers/{name}/mcp` endpoint; None for the aggregated `/mcp`.
    pub server: Option<String>,
}

impl Endpoint {
    /// The endpoint's path.
    pub(crate) fn path(&self) -> String {
        match &self.server {
            Some(s) => format!("/servers/{s}/mcp"),
            None => "/mcp".to_owned(),
        }
    }

    /// Where its protected resource metadata is (RFC 9728 §3.1: the well-known path inserted
    /// before the resource's path).
    pub(crate) fn metadata_url(&self) -> String {
        format!("{}/.well-known/oauth-protected-resource{}", self.base, self.path())
    }

    /// The `aud` values a token must carry one of to be used here: the URLs of the endpoints
    /// that address the same servers (`/mcp`, `/sse` and the gateway's own URL for all of them;
    /// `/servers/NAME/mcp`, `/servers/NAME/sse` and MCP Front's `/NAME/mcp`, `/NAME/sse` for
    /// one), or with `resources: gateway` those of every endpoint; and the issuer's own extra
    /// audiences.
    pub(crate) fn audiences<'a>(
        &self,
        binding: ResourceBinding,
        servers: impl Iterator<Item = &'a str>,
        def: &IssuerDef,
    ) -> Vec<String> {
        let mut out = def.audiences.clone();
        let base = &self.base;
        let one = |s: &str| -> Vec<String> {
            ["servers/", ""].iter().flat_map(|p| ["mcp", "sse"].map(|t| format!("{base}/{p}{s}/{t}"))).collect()
        };
        match (binding, &self.server) {
            (ResourceBinding::Endpoint, Some(s)) => out.extend(one(s)),
            (ResourceBinding::Endpoint, None) => {
                out.extend([format!("{base}/mcp"), format!("{base}/sse"), base.clone()])
            }
            (ResourceBinding::Gateway, _) => {
                out.extend([format!("{base}/mcp"), format!("{base}/sse"), base.clone()]);
                out.extend(servers.flat_map(one));
            }
        }
        out
    }
}

impl Endpoint {
    /// Whether one `aud` value is among [`Endpoint::audiences`] (`extra` standing for the
    /// issuer's own extra audiences), without building that list (a cached token is checked at
    /// every request).
    pub(crate) fn accepts<'a>(
        &self,
        aud: &str,
        binding: ResourceBinding,
        mut servers: impl Iterator<Item = &'a str>,
        extra: &[String],
    ) -> bool {
        if extra.iter().any(|a| a == aud) {
            return true;
        }
        let Some(path) = aud.strip_prefix(self.base.as_str()) else { return false };
        let aggregated = matches!(path, "" | "/mcp" | "/sse");
        let of_server = |path: &str| -> Option<String> {
            let p = path.strip_prefix("/servers").unwrap_or(path);
            let name =
                p.strip_prefix('/')?.strip_suffix("/mcp").or_else(|| p.strip_prefix('/')?.strip_suffix("/sse"))?;
            (!name.is_empty() && !name.contains('/')).then(|| name.to_owned())
        };
        match (binding, &self.server) {
            (ResourceBinding::Endpoint, None) => aggregated,
            (ResourceBinding::Endpoint, Some(s)) => of_server(path).is_some_and(|n| n == *s),
            (ResourceBinding::Gateway, _) => aggregated || of_server(path).is_some_and(|n| servers.any(|s| s == n)),
        }
    }
}

/// Why a provider's keys could not be fetched.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FetchError {
    /// The request failed or the status was not 200.
    #[error("{url}: {reason}")]
    Http {
        /// The URL, shown without credentials or query (`config::shown_url`).
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// Larger than [`MAX_DOCUMENT`].
    #[error("{0}: larger than {MAX_DOCUMENT} bytes")]
    TooLarge(String),
    /// Neither metadata document names a `jwks_uri` for this issuer.
    #[error("no metadata of {0} names a jwks_uri (set oauth.issuers[].jwks_uri)")]
    NoJwksUri(String),
    /// The metadata names another issuer.
    #[error("the metadata at {url} is for issuer {found:?}")]
    IssuerMismatch {
        /// Where it was read.
        url: String,
        /// What it says.
        found: String,
    },
    /// The JWKS document is not one Portcullis takes.
    #[error("{0}")]
    Keys(#[from] jwt::KeySetError),
}

/// One identity provider: its configuration and its current keys.
pub(crate) struct Provider {
    /// The configuration it was made from.
    pub def: Arc<IssuerDef>,
    keys: ArcSwap<jwt::KeySet>,
    /// When the last fetch for an unknown key id started.
    refetched: Mutex<Option<Instant>>,
    /// Serialises fetches.
    fetching: tokio::sync::Mutex<()>,
    /// Whether its refresher runs.
    started: std::sync::atomic::AtomicBool,
    http: reqwest::Client,
}

impl Provider {
    /// A provider with no keys yet; [`Provider::start`] fetches them.
    pub(crate) fn new(def: Arc<IssuerDef>) -> Arc<Provider> {
        let http = http_client();
        Arc::new(Provider {
            def,
            keys: ArcSwap::from_pointee(jwt::KeySet::default()),
            refetched: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            started: std::sync::atomic::AtomicBool::new(false),
            http,
        })
    }

    /// The current keys.
    pub(crate) fn keys(&self) -> Arc<jwt::KeySet> {
        self.keys.load_full()
    }

    /// Fetches the keys now, then again whenever their lifetime ends (a failure keeps the last
    /// good set and is retried sooner), for as long as the provider is in use. Once per
    /// provider, however often it is called.
    pub(crate) fn start(self: &Arc<Self>) {
        if self.started.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(p) = weak.upgrade() else { return };
                let wait = match p.fetch().await {
                    Ok(lifetime) => lifetime,
                    Err(e) => {
                        tracing::warn!(issuer = %p.def.issuer, error = %e, "could not fetch the issuer's keys; keeping the last ones");
                        RETRY_AFTER_FAILURE
                    }
                };
                drop(p);
                tokio::time::sleep(wait).await;
            }
        });
    }

    /// A token named a key id the set of generation `seen` does not hold: fetch again, unless
    /// newer keys arrived meanwhile (a fetch in progress is waited for) or a fetch for that
    /// reason started less than [`REFETCH_EVERY`] ago. Whether there are newer keys to try.
    pub(crate) async fn refetch_for_unknown_key(&self, seen: u64) -> bool {
        drop(self.fetching.lock().await);
        if self.keys.load().generation != seen {
            return true;
        }
        {
            let mut last = lock(&self.refetched);
            if last.is_some_and(|t| t.elapsed() < REFETCH_EVERY) {
                return false;
            }
            *last = Some(Instant::now());
        }
        match self.fetch().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(issuer = %self.def.issuer, error = %e, "could not fetch the issuer's keys; keeping the last ones");
                false
            }
        }
    }

    /// Fetches the key set (finding its URL in the metadata first, when the config gives
    /// none) and swaps it in; its lifetime by the response's `Cache-Control`.
    async fn fetch(&self) -> Result<Duration, FetchError> {
        let _one = self.fetching.lock().await;
        let url = match &self.def.jwks_uri {
            Some(u) => u.clone(),
            None => self.discover().await?,
        };
        let (body, lifetime) = self.get(&url).await?;
        let mut keys = jwt::KeySet::parse(&body)?;
        keys.generation = self.keys.load().generation + 1;
        tracing::info!(issuer = %self.def.issuer, keys = keys.len(), "issuer keys fetched");
        self.keys.store(Arc::new(keys));
        Ok(lifetime)
    }

    /// The `jwks_uri` of the issuer's metadata.
    async fn discover(&self) -> Result<String, FetchError> {
        let issuer = &self.def.issuer;
        server_metadata(&self.http, issuer, |m| m.jwks_uri.clone())
            .await?
            .ok_or_else(|| FetchError::NoJwksUri(issuer.clone()))
    }

    /// Asks the issuer's introspection endpoint (RFC 7662) about an opaque token: its claims
    /// when it is active and names this issuer (or none), a `sub` and an `exp`; None otherwise.
    pub(crate) async fn introspect(&self, token: &str) -> Result<Option<jwt::Claims>, FetchError> {
        let Some(i) = &self.def.introspection else { return Ok(None) };
        let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
        let http = |reason: String| FetchError::Http { url: shown_url(&i.endpoint), reason };
        let resp = self
            .http
            .post(&i.endpoint)
            // RFC 6749 §2.3.1: the credentials are form-encoded before they are joined.
            .basic_auth(enc(&i.client_id), Some(enc(&i.client_secret)))
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(format!("token={}&token_type_hint=access_token", enc(token)))
            .send()
            .await
            .map_err(|e| http(e.without_url().to_string()))?;
        let body = self.read(resp, &i.endpoint).await?.0;
        let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else { return Ok(None) };
        if v.get("active") != Some(&serde_json::Value::Bool(true)) {
            return Ok(None);
        }
        match v.get("iss").and_then(|i| i.as_str()) {
            Some(iss) if iss != self.def.issuer => return Ok(None),
            Some(_) => {}
            None => v["iss"] = serde_json::Value::String(self.def.issuer.clone()),
        }
        Ok(serde_json::from_value::<jwt::Claims>(v).ok())
    }

    async fn get(&self, url: &str) -> Result<(Vec<u8>, Duration), FetchError> {
        get_document(&self.http, url).await
    }

    async fn read(&self, resp: reqwest::Response, url: &str) -> Result<(Vec<u8>, Duration), FetchError> {
        read_document(resp, url).await
    }
}

/// What Portcullis reads of an authorization server's metadata (RFC 8414, OpenID Discovery).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub(crate) struct ServerMetadata {
    /// The issuer it describes.
    pub issuer: Option<String>,
    /// Its key set.
    pub jwks_uri: Option<String>,
    /// Its token endpoint.
    pub token_endpoint: Option<String>,
    /// Its authorization endpoint.
    pub authorization_endpoint: Option<String>,
    /// Its dynamic client registration endpoint (RFC 7591).
    #[serde(default)]
    pub registration_endpoint: Option<String>,
    /// Whether it takes Client ID Metadata Documents.
    #[serde(default)]
    pub client_id_metadata_document_supported: Option<bool>,
    /// The PKCE methods it supports.
    #[serde(default)]
    pub code_challenge_methods_supported: Option<Vec<String>>,
}

/// What `pick` takes from `issuer`'s metadata: RFC 8414's path-inserted document first, then
/// OpenID discovery's appended one; the first document that gives it. A document naming another
/// issuer is an error (RFC 8414 §3.3). None when no document gives it.
pub(crate) async fn server_metadata<T>(
    http: &reqwest::Client,
    issuer: &str,
    pick: impl Fn(&ServerMetadata) -> Option<T>,
) -> Result<Option<T>, FetchError> {
    let mut last = None;
    for url in metadata_urls(issuer) {
        let body = match get_document(http, &url).await {
            Ok((b, _)) => b,
            Err(e) => {
                last = Some(e);
                continue;
            }
        };
        let Ok(m) = serde_json::from_slice::<ServerMetadata>(&body) else { continue };
        if let Some(found) = m.issuer.as_ref().filter(|i| *i != issuer) {
            return Err(FetchError::IssuerMismatch { url: shown_url(&url), found: found.clone() });
        }
        if let Some(v) = pick(&m) {
            return Ok(Some(v));
        }
    }
    match last {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// One bounded GET: the body (200 only, within [`MAX_DOCUMENT`]) and its lifetime.
pub(crate) async fn get_document(http: &reqwest::Client, url: &str) -> Result<(Vec<u8>, Duration), FetchError> {
    let fail = |reason: String| FetchError::Http { url: shown_url(url), reason };
    let resp = http.get(url).send().await.map_err(|e| fail(e.without_url().to_string()))?;
    read_document(resp, url).await
}

/// A response's body (200 only, within [`MAX_DOCUMENT`]) and its lifetime by `Cache-Control`.
pub(crate) async fn read_document(resp: reqwest::Response, url: &str) -> Result<(Vec<u8>, Duration), FetchError> {
    let http = |reason: String| FetchError::Http { url: shown_url(url), reason };
    if resp.status() != reqwest::StatusCode::OK {
        return Err(http(format!("status {}", resp.status())));
    }
    let lifetime = resp
        .headers()
        .get(reqwest::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(max_age)
        .unwrap_or(DEFAULT_LIFETIME)
        .clamp(MIN_LIFETIME, MAX_LIFETIME);
    Ok((read_body(resp, url).await?, lifetime))
}

/// A response's body, whatever its status, within [`MAX_DOCUMENT`].
pub(crate) async fn read_body(mut resp: reqwest::Response, url: &str) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) =
        resp.chunk().await.map_err(|e| FetchError::Http { url: shown_url(url), reason: e.without_url().to_string() })?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT {
            return Err(FetchError::TooLarge(shown_url(url)));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Where an issuer's metadata may be: RFC 8414 inserts the well-known path before the issuer's
/// path; OpenID Connect Discovery appends it.
fn metadata_urls(issuer: &str) -> Vec<String> {
    let trimmed = issuer.trim_end_matches('/');
    let mut out = Vec::new();
    if let Ok(u) = reqwest::Url::parse(trimmed) {
        let origin = u.origin().ascii_serialization();
        let path = u.path().trim_end_matches('/');
        out.push(format!("{origin}/.well-known/oauth-authorization-server{path}"));
    }
    out.push(format!("{trimmed}/.well-known/openid-configuration"));
    out
}

/// `max-age` of a `Cache-Control` value.
fn max_age(v: &str) -> Option<Duration> {
    v.split(',')
        .find_map(|d| d.trim().strip_prefix("max-age=")?.trim_matches('"').parse().ok().map(Duration::from_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_looked_for_where_both_standards_put_it() {
        assert_eq!(
            metadata_urls("https://idp.test/realms/acme"),
            [
                "https://idp.test/.well-known/oauth-authorization-server/realms/acme",
                "https://idp.test/realms/acme/.well-known/openid-configuration"
            ]
        );
        assert_eq!(
            metadata_urls("https://idp.test/"),
            [
                "https://idp.test/.well-known/oauth-authorization-server",
                "https://idp.test/.well-known/openid-configuration"
            ]
        );
    }

    /// What a cached token is checked with agrees with the list its first check used.
    #[test]
    fn accepted_audiences_agree_with_the_list() {
        let def = IssuerDef {
            issuer: "https://idp.test".into(),
            jwks_uri: None,
            audiences: vec!["api://portcullis".into()],
            algorithms: Vec::new(),
            leeway: Duration::ZERO,
            require_at_jwt: false,
            identity_claim: "sub".into(),
            scopes: Default::default(),
            groups_claim: "groups".into(),
            roles: Default::default(),
            tenants: Default::default(),
            introspection: None,
        };
        let servers = ["a".to_owned(), "b".to_owned()];
        let base = "https://gw.test".to_owned();
        let candidates = [
            "https://gw.test",
            "https://gw.test/mcp",
            "https://gw.test/sse",
            "https://gw.test/servers/a/mcp",
            "https://gw.test/servers/b/sse",
            "https://gw.test/a/mcp",
            "https://gw.test/b/sse",
            "https://gw.test/servers/c/mcp",
            "https://gw.test/servers/a/b/mcp",
            "https://gw.test/mcp/",
            "https://other.test/mcp",
            "api://portcullis",
            "https://gw.test/servers//mcp",
        ];
        for server in [None, Some("a".to_owned())] {
            let at = Endpoint { base: base.clone(), server };
            for binding in [ResourceBinding::Endpoint, ResourceBinding::Gateway] {
                let list = at.audiences(binding, servers.iter().map(String::as_str), &def);
                for aud in candidates {
                    let quick = at.accepts(aud, binding, servers.iter().map(String::as_str), &def.audiences);
                    assert_eq!(quick, list.iter().any(|a| a == aud), "{aud} at {:?} with {binding:?}", at.server);
                }
            }
        }
    }

    #[test]
    fn cache_lifetimes_are_read_and_bounded() {
        assert_eq!(max_age("public, max-age=600"), Some(Duration::from_secs(600)));
        assert_eq!(max_age("no-cache"), None);
        assert_eq!(Duration::from_secs(1).clamp(MIN_LIFETIME, MAX_LIFETIME), MIN_LIFETIME);
    }
}
