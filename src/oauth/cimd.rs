//! Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document): an OAuth
//! client of Portcullis' authorization server whose `client_id` is an https URL is described by
//! the JSON document at that URL, fetched here by a strict fetcher and cached by its HTTP
//! headers.
//!
//! Invariants: a document is fetched only over https, from a client id that is its own
//! canonical URL (a path, no dot segments, no fragment, no user info); every address its host
//! resolves to must be public unless the config allows private ones, and the connection goes to
//! an address that was checked (the check is the HTTP client's resolver, so nothing re-resolves
//! in between); no proxy, no redirect, 200 only, at most [`MAX_DOCUMENT`] bytes within
//! [`FETCH_TIMEOUT`]; the document's `client_id` is its URL exactly; it describes a public
//! client (no secret) whose redirect URIs are ones registration would take; the cache is bounded
//! in size and in time.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sharded::lock;
use crate::store::OAuthClient;

/// The largest document read (the draft recommends 5 KB).
pub(crate) const MAX_DOCUMENT: usize = 5 * 1024;
/// How long one fetch may take, connection included.
pub(crate) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a document is kept when its response says nothing, and at most.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(5 * 60);
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a failure is remembered (a client cannot make Portcullis fetch in a loop).
const FAILURE_LIFETIME: Duration = Duration::from_secs(10);
/// The most documents cached.
const MAX_CACHED: usize = 1000;

/// Why a client id URL names no usable client: the client's (or its document's) fault.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum DocumentError {
    /// The client id is not a URL a document may be fetched from.
    #[error("the client id is not an https URL with a path, in canonical form, without fragment or user info")]
    Url,
    /// Its host resolves to an address that is not public.
    #[error("its host resolves to a private, loopback or link-local address")]
    Address,
    /// The fetch failed.
    #[error("its metadata document could not be fetched: {0}")]
    Fetch(String),
    /// Not a 200.
    #[error("its metadata document answered with status {0}")]
    Status(u16),
    /// Larger than [`MAX_DOCUMENT`].
    #[error("its metadata document is larger than {MAX_DOCUMENT} bytes")]
    TooLarge,
    /// Not a document Portcullis takes.
    #[error("its metadata document is not valid: {0}")]
    Invalid(&'static str),
}

/// The fetcher of one config (`oauth.authorization_server.client_metadata_documents`). Two are
/// equal when made from the same settings.
#[derive(Clone)]
pub(crate) struct Fetcher {
    allow_private: bool,
    ca: Option<Vec<u8>>,
    client: reqwest::Client,
}

impl PartialEq for Fetcher {
    fn eq(&self, other: &Self) -> bool {
        (self.allow_private, &self.ca) == (other.allow_private, &other.ca)
    }
}

impl Eq for Fetcher {}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("allow_private", &self.allow_private)
            .field("own_ca", &self.ca.is_some())
            .finish()
    }
}

/// The resolver of the fetcher: every address of a name, all of them public (unless allowed).
struct PublicOnly {
    allow_private: bool,
}

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            if addrs.is_empty() {
                return Err("the name has no address".into());
            }
            if !allow_private && addrs.iter().any(|a| !public(a.ip())) {
                return Err(Box::new(DocumentError::Address) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Whether an address is on the public internet: not loopback, private, link-local, shared
/// (CGNAT), unspecified, multicast, broadcast, documentation, benchmarking or reserved; IPv6
/// forms of IPv4 addresses are judged as those.
pub(crate) fn public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (18..20).contains(&b))
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            // NAT64 (64:ff9b::/96) carries an IPv4 address too.
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let [a, b] = s[6].to_be_bytes();
                let [c, d] = s[7].to_be_bytes();
                return public(IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d)));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8)
                || s[0..6] == [0, 0, 0, 0, 0, 0])
        }
    }
}

/// Whether a client id is a metadata document's URL (then it is never looked up elsewhere).
pub(crate) fn is_document_id(client_id: &str) -> bool {
    client_id.starts_with("https://")
}

/// The client id as a URL a document may be fetched from: https, a host, a path other than
/// `/`, no fragment, no user info, at most 2048 characters, and already in canonical form (so no
/// `.` or `..` segments, no default port, a lowercase host).
fn document_url(client_id: &str) -> Result<reqwest::Url, DocumentError> {
    let u = reqwest::Url::parse(client_id).map_err(|_| DocumentError::Url)?;
    let ok = client_id.len() <= 2048
        && u.scheme() == "https"
        && u.has_host()
        && u.username().is_empty()
        && u.password().is_none()
        && u.fragment().is_none()
        && u.path() != "/"
        && u.as_str() == client_id;
    if ok { Ok(u) } else { Err(DocumentError::Url) }
}

impl Fetcher {
    /// A fetcher that trusts `ca` (a PEM bundle) in place of the system's roots, when given.
    pub(crate) fn new(allow_private: bool, ca: Option<&Path>) -> Result<Fetcher, crate::tls::UpstreamTlsError> {
        let mut builder = crate::tls::http_client_builder()
            .no_proxy()
            .timeout(FETCH_TIMEOUT)
            .connect_timeout(FETCH_TIMEOUT)
            .https_only(true)
            .dns_resolver(Arc::new(PublicOnly { allow_private }));
        let ca = match ca {
            Some(path) => {
                let (pem, certs) = crate::tls::read_ca(path)?;
                builder = builder.tls_certs_only(certs);
                Some(pem)
            }
            None => None,
        };
        let client = builder.build().map_err(crate::tls::UpstreamTlsError::Client)?;
        Ok(Fetcher { allow_private, ca, client })
    }

    /// Fetches and checks the document of `client_id`; the client and how long it may be kept.
    async fn fetch(&self, client_id: &str) -> Result<(OAuthClient, Duration), DocumentError> {
        let url = document_url(client_id)?;
        // An address in the URL is not resolved: it is checked here.
        if let Some(ip) = url.host_str().and_then(|h| h.trim_matches(['[', ']']).parse::<IpAddr>().ok())
            && !self.allow_private
            && !public(ip)
        {
            return Err(DocumentError::Address);
        }
        let mut resp = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| fetch_error(&e))?;
        if resp.status() != reqwest::StatusCode::OK {
            return Err(DocumentError::Status(resp.status().as_u16()));
        }
        if resp.content_length().is_some_and(|n| n > MAX_DOCUMENT as u64) {
            return Err(DocumentError::TooLarge);
        }
        let lifetime = lifetime(resp.headers());
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| fetch_error(&e))? {
            if body.len() + chunk.len() > MAX_DOCUMENT {
                return Err(DocumentError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((client_of_document(client_id, &body)?, lifetime))
    }
}

/// A fetch failure as the client may be told it (the resolver's refusal named as such).
fn fetch_error(e: &reqwest::Error) -> DocumentError {
    let mut source: Option<&dyn std::error::Error> = Some(e);
    while let Some(s) = source {
        if s.downcast_ref::<DocumentError>().is_some() {
            return DocumentError::Address;
        }
        source = s.source();
    }
    let reason = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "no connection"
    } else if e.is_body() || e.is_decode() {
        "the body could not be read"
    } else {
        "the request failed"
    };
    DocumentError::Fetch(reason.into())
}

/// How long a response may be kept: `no-store` or `no-cache` not at all, else its `max-age`
/// (default [`DEFAULT_LIFETIME`]), at most [`MAX_LIFETIME`].
fn lifetime(headers: &reqwest::header::HeaderMap) -> Duration {
    let Some(cc) = headers.get(reqwest::header::CACHE_CONTROL).and_then(|v| v.to_str().ok()) else {
        return DEFAULT_LIFETIME;
    };
    let mut max_age = None;
    for d in cc.split(',').map(|d| d.trim().to_ascii_lowercase()) {
        if d == "no-store" || d == "no-cache" {
            return Duration::ZERO;
        }
        if let Some(v) = d.strip_prefix("max-age=") {
            max_age = v.trim_matches('"').parse().ok().map(Duration::from_secs);
        }
    }
    max_age.unwrap_or(DEFAULT_LIFETIME).min(MAX_LIFETIME)
}

/// The client a document describes, if it is one Portcullis takes: `client_id` its URL exactly,
/// one to ten redirect URIs that registration would take, a public client (no secret, no
/// authentication method but `none`), the code grant only.
fn client_of_document(client_id: &str, body: &[u8]) -> Result<OAuthClient, DocumentError> {
    #[derive(serde::Deserialize)]
    struct Document {
        client_id: String,
        #[serde(default)]
        client_name: Option<String>,
        #[serde(default)]
        redirect_uris: Vec<String>,
        #[serde(default)]
        token_endpoint_auth_method: Option<String>,
        #[serde(default)]
        client_secret: Option<serde_json::Value>,
        #[serde(default)]
        client_secret_expires_at: Option<serde_json::Value>,
        #[serde(default)]
        grant_types: Option<Vec<String>>,
        #[serde(default)]
        response_types: Option<Vec<String>>,
    }
    let d: Document = serde_json::from_slice(body).map_err(|_| DocumentError::Invalid("not a JSON object"))?;
    if d.client_id != client_id {
        return Err(DocumentError::Invalid("its client_id is not its URL"));
    }
    if d.client_secret.is_some() || d.client_secret_expires_at.is_some() {
        return Err(DocumentError::Invalid("a metadata document may not carry a client secret"));
    }
    if d.token_endpoint_auth_method.as_deref().is_some_and(|m| m != "none") {
        return Err(DocumentError::Invalid("only public clients (token_endpoint_auth_method none)"));
    }
    let subset = |v: &Option<Vec<String>>, allowed: &[&str]| {
        v.as_ref().is_none_or(|l| l.iter().all(|g| allowed.contains(&g.as_str())))
    };
    if !subset(&d.grant_types, &["authorization_code", "refresh_token"]) || !subset(&d.response_types, &["code"]) {
        return Err(DocumentError::Invalid("only the authorization_code and refresh_token grants"));
    }
    if d.redirect_uris.is_empty()
        || d.redirect_uris.len() > 10
        || d.redirect_uris.iter().any(|u| u.len() > 2048 || !super::server::registrable(u))
    {
        return Err(DocumentError::Invalid(
            "redirect_uris: one to ten, each https, http on a loopback host, or an app's own scheme",
        ));
    }
    Ok(OAuthClient {
        client_id: client_id.to_owned(),
        name: super::server::display_name(d.client_name.as_deref()),
        redirect_uris: d.redirect_uris,
    })
}

/// A fetch's outcome, until when it is kept, and the settings of the fetcher that made it (a
/// reload that changes them does not keep what the old ones let in).
type Cached = (Result<OAuthClient, DocumentError>, Instant, Fetcher);

/// Documents fetched, and failures, until they expire.
#[derive(Default)]
pub(crate) struct Documents {
    cached: Mutex<HashMap<String, Cached>>,
}

impl Documents {
    /// The client `client_id` names: from the cache while it lasts, else fetched now.
    pub(crate) async fn client(&self, fetcher: &Fetcher, client_id: &str) -> Result<OAuthClient, DocumentError> {
        if let Some((found, until, by)) = lock(&self.cached).get(client_id)
            && *until > Instant::now()
            && by == fetcher
        {
            return found.clone();
        }
        let (found, keep) = match fetcher.fetch(client_id).await {
            Ok((client, keep)) => (Ok(client), keep),
            Err(e) => {
                tracing::info!(client_id = %crate::store::printable(client_id), error = %e, "client metadata document refused");
                (Err(e), FAILURE_LIFETIME)
            }
        };
        if !keep.is_zero() {
            let mut cached = lock(&self.cached);
            let now = Instant::now();
            if cached.len() >= MAX_CACHED {
                cached.retain(|_, (_, until, _)| *until > now);
                if cached.len() >= MAX_CACHED {
                    cached.clear();
                }
            }
            cached.insert(client_id.to_owned(), (found.clone(), now + keep, fetcher.clone()));
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_are_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2001:db8::1",
        ] {
            assert!(!public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert!(public(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_client_id_is_a_canonical_https_url_with_a_path() {
        assert!(document_url("https://app.example/oauth/client.json").is_ok());
        assert!(document_url("https://app.example/c?v=1").is_ok());
        for bad in [
            "http://app.example/client.json",
            "https://app.example",
            "https://app.example/",
            "https://app.example/a/../client.json",
            "https://app.example/./client.json",
            "https://user:pw@app.example/client.json",
            "https://app.example/client.json#x",
            "https://APP.example/client.json",
            "https://app.example:443/client.json",
            "not a url",
        ] {
            assert!(document_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_document_must_name_itself_and_be_a_public_client() {
        let id = "https://app.example/client.json";
        let doc = |extra: &str| {
            format!(r#"{{"client_id":"{id}","client_name":"App","redirect_uris":["https://app.example/cb"]{extra}}}"#)
        };
        let c = client_of_document(id, doc("").as_bytes()).unwrap();
        assert_eq!((c.name.as_str(), c.redirect_uris.len()), ("App", 1));
        assert!(client_of_document("https://other.example/client.json", doc("").as_bytes()).is_err());
        assert!(client_of_document(id, doc(r#","client_secret":"s""#).as_bytes()).is_err());
        assert!(
            client_of_document(id, doc(r#","token_endpoint_auth_method":"client_secret_basic""#).as_bytes()).is_err()
        );
        assert!(client_of_document(id, doc(r#","grant_types":["client_credentials"]"#).as_bytes()).is_err());
        let no_uris = format!(r#"{{"client_id":"{id}","redirect_uris":[]}}"#);
        assert!(client_of_document(id, no_uris.as_bytes()).is_err());
        let evil = format!(r#"{{"client_id":"{id}","redirect_uris":["javascript:alert(1)"]}}"#);
        assert!(client_of_document(id, evil.as_bytes()).is_err());
        assert!(client_of_document(id, b"[1,2]").is_err());
    }

    #[test]
    fn lifetimes_follow_the_headers() {
        let h = |v: &str| {
            let mut m = reqwest::header::HeaderMap::new();
            m.insert(reqwest::header::CACHE_CONTROL, v.parse().unwrap());
            lifetime(&m)
        };
        assert_eq!(lifetime(&reqwest::header::HeaderMap::new()), DEFAULT_LIFETIME);
        assert_eq!(h("public, max-age=120"), Duration::from_secs(120));
        assert_eq!(h("max-age=99999999"), MAX_LIFETIME);
        assert_eq!(h("no-store"), Duration::ZERO);
        assert_eq!(h("max-age=60, no-cache"), Duration::ZERO);
    }
}
