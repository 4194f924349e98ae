//! Portcullis as an OAuth client of a remote MCP server that wants access tokens, with a machine
//! account of its own (the client credentials grant, RFC 6749 §4.4): the token endpoint from
//! the config, or discovered as MCP clients discover it (the server's protected resource
//! metadata, RFC 9728, then its authorization server's metadata, RFC 8414 / OpenID Discovery);
//! the token asked for the server's URL as the resource (RFC 8707).
//!
//! Invariants: one fetch at a time per server (callers that need a token while one is being
//! fetched wait for it and share it); a token is renewed before it expires, and a still-valid
//! token is used while a renewal fails; after a failure the endpoint is not asked again for
//! [`RETRY_AFTER`]; only https URLs are used (http on a loopback host); the client secret and the
//! tokens appear in no log line and no error (an error names the endpoint, the status and the
//! OAuth `error` code only). This token is Portcullis' own, issued for the remote server: a
//! client's credential never goes upstream.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::header::HeaderValue;

use super::{FETCH_TIMEOUT, get_document, read_body, server_metadata};
use crate::config::shown_url;
use crate::sharded::lock;

/// How long after a failed fetch the endpoint is left alone (calls fail at once meanwhile).
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(5);
/// A token is renewed this long before it expires (or at four fifths of a shorter lifetime).
const RENEW_BEFORE: Duration = Duration::from_secs(60);
/// The most one fetch may take, discovery included (each request has [`FETCH_TIMEOUT`]).
const FETCH_TOTAL: Duration = Duration::from_secs(20);

/// The client credentials grant towards one remote server, as the config gives it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    /// Portcullis' client id at the server's authorization server.
    pub client_id: String,
    /// Its secret (sent with HTTP Basic, RFC 6749 §2.3.1).
    pub client_secret: String,
    /// The scopes asked for (None: none named; the authorization server's default).
    pub scope: Option<String>,
    /// The token endpoint (None: discovered).
    pub token_endpoint: Option<String>,
    /// The authorization server (None: the one the server's metadata names).
    pub issuer: Option<String>,
    /// The resource the token is asked for (RFC 8707): the server's URL unless configured.
    pub resource: String,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"(hidden)")
            .field("scope", &self.scope)
            .field("token_endpoint", &self.token_endpoint.as_deref().map(shown_url))
            .field("issuer", &self.issuer)
            .field("resource", &shown_url(&self.resource))
            .finish()
    }
}

/// Why no access token could be had for a server. Cloneable, so the one failure can be handed
/// to every call that waited for it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// Neither the config nor any metadata names a token endpoint.
    #[error("no token endpoint: {0}")]
    Discovery(String),
    /// A discovered URL that is not https (http only on a loopback host).
    #[error("{0} is not an https URL")]
    Insecure(String),
    /// The token endpoint could not be asked.
    #[error("token endpoint {url}: {reason}")]
    Unreachable {
        /// The endpoint, as shown.
        url: String,
        /// What went wrong (without the URL).
        reason: String,
    },
    /// The token endpoint said no.
    #[error("token endpoint {url} answered {status}{}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Refused {
        /// The endpoint, as shown.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The OAuth `error` code of the answer (`invalid_client`, …), when it is one.
        code: Option<String>,
    },
    /// The answer is not a bearer token response (RFC 6749 §5.1).
    #[error("token endpoint {0}: not a bearer token response")]
    Malformed(String),
}

/// A token in hand.
struct Token {
    /// `Bearer …`, marked sensitive.
    header: HeaderValue,
    /// When to fetch the next one (None: when the server refuses this one).
    renew_at: Option<Instant>,
    /// When it stops working (None: not said).
    expires_at: Option<Instant>,
}

/// The access tokens of one remote server: see the module documentation.
pub(crate) struct TokenSource {
    grant: ClientCredentials,
    /// The server's name, for the log.
    server: String,
    http: reqwest::Client,
    current: Mutex<Option<Token>>,
    /// The discovered token endpoint, once found.
    endpoint: Mutex<Option<String>>,
    /// The scopes asked for: the configured ones (else those of the server's first challenge)
    /// and those the server asked for since (`insufficient_scope`), space-separated.
    scope: Mutex<Option<String>>,
    /// What the server's challenge to a request without a token said (read once).
    challenge: tokio::sync::OnceCell<Challenge>,
    /// The last failure and when it happened.
    failed: Mutex<Option<(Instant, CredentialError)>>,
    /// When a token was last thrown away for a 401 (at most once per [`RETRY_AFTER`]: a server
    /// that refuses every token cannot make each call fetch one).
    thrown: Mutex<Option<Instant>>,
    /// Serialises fetches.
    fetching: tokio::sync::Mutex<()>,
}

impl TokenSource {
    pub(crate) fn new(grant: ClientCredentials, server: &str) -> TokenSource {
        let http = crate::tls::http_client_builder().timeout(FETCH_TIMEOUT).build().unwrap_or_default();
        TokenSource {
            scope: Mutex::new(grant.scope.clone()),
            challenge: tokio::sync::OnceCell::new(),
            grant,
            server: server.to_owned(),
            http,
            current: Mutex::new(None),
            endpoint: Mutex::new(None),
            failed: Mutex::new(None),
            thrown: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// The grant it was made for.
    pub(crate) fn grant(&self) -> &ClientCredentials {
        &self.grant
    }

    /// What `/servers` shows of it: the grant, whether a token is in hand and valid, the
    /// scopes asked for, and the last failure (never a token or the secret).
    pub(crate) fn state(&self) -> serde_json::Value {
        let now = Instant::now();
        let token = match lock(&self.current).as_ref() {
            None => "none",
            Some(t) if t.expires_at.is_some_and(|e| now >= e) => "expired",
            Some(_) => "valid",
        };
        let failed = lock(&self.failed).as_ref().map(|(_, e)| e.to_string());
        serde_json::json!({
            "grant": "client_credentials",
            "token": token,
            "scope": lock(&self.scope).clone(),
            "last_error": failed,
        })
    }

    /// The `Authorization` value to send now: the token in hand, or a new one.
    pub(crate) async fn bearer(&self) -> Result<HeaderValue, CredentialError> {
        if let Some(h) = self.usable(false) {
            return Ok(h);
        }
        let _one = self.fetching.lock().await;
        // Another caller may have fetched one while this one waited.
        if let Some(h) = self.usable(false) {
            return Ok(h);
        }
        if let Some((at, e)) = lock(&self.failed).as_ref()
            && at.elapsed() < RETRY_AFTER
        {
            return self.usable(true).ok_or_else(|| e.clone());
        }
        let fetched = tokio::time::timeout(FETCH_TOTAL, self.fetch()).await.unwrap_or_else(|_| {
            Err(CredentialError::Unreachable {
                url: "the token endpoint".into(),
                reason: "no token within 20 s".into(),
            })
        });
        match fetched {
            Ok(token) => {
                let header = token.header.clone();
                *lock(&self.current) = Some(token);
                *lock(&self.failed) = None;
                tracing::info!(server = %self.server, "access token obtained for the upstream");
                Ok(header)
            }
            Err(e) => {
                tracing::warn!(server = %self.server, error = %e, "could not obtain an access token for the upstream");
                *lock(&self.failed) = Some((Instant::now(), e.clone()));
                // Renewal failed: a token that still works is used until it expires.
                self.usable(true).ok_or(e)
            }
        }
    }

    /// The token in hand, if it has not expired (never a fetch).
    pub(crate) fn in_hand(&self) -> Option<HeaderValue> {
        self.usable(true)
    }

    /// The token in hand if it is not due for renewal (or, with `expiring`, if it has not
    /// expired).
    fn usable(&self, expiring: bool) -> Option<HeaderValue> {
        let now = Instant::now();
        let current = lock(&self.current);
        let t = current.as_ref()?;
        let until = if expiring { t.expires_at } else { t.renew_at };
        until.is_none_or(|u| now < u).then(|| t.header.clone())
    }

    /// What the server's answer to a request with `used` means for the token: a 401 throws it
    /// away; a 403 `insufficient_scope` whose `scope` names a scope not asked for yet adds those
    /// and throws it away (step-up). True when a new token is worth one more try; never twice
    /// for the same scopes, so a server that keeps refusing cannot make a loop.
    pub(crate) fn answered(
        &self,
        used: &HeaderValue,
        status: reqwest::StatusCode,
        challenge: Option<&HeaderValue>,
    ) -> bool {
        match status {
            reqwest::StatusCode::UNAUTHORIZED => self.refused(used),
            reqwest::StatusCode::FORBIDDEN => {
                let Some(wanted) = challenge.and_then(|c| c.to_str().ok()).and_then(insufficient_scope) else {
                    return false;
                };
                let mut scope = lock(&self.scope);
                let mut all: Vec<&str> = scope.as_deref().unwrap_or_default().split_whitespace().collect();
                let before = all.len();
                for s in wanted.split_whitespace() {
                    if !all.contains(&s) {
                        all.push(s);
                    }
                }
                if all.len() == before {
                    return false;
                }
                let joined = all.join(" ");
                tracing::info!(server = %self.server, scope = %joined, "the upstream asks for more scopes");
                *scope = Some(joined);
                drop(scope);
                self.forget(used);
                true
            }
            _ => false,
        }
    }

    /// The server refused `used` (401): the next call fetches a new token, unless one newer
    /// than `used` is already in hand or on its way (true: try again with it) or a token was
    /// thrown away for a 401 less than [`RETRY_AFTER`] ago (false: a new token would fare no
    /// better).
    pub(crate) fn refused(&self, used: &HeaderValue) -> bool {
        let mut current = lock(&self.current);
        // Already replaced, or thrown away by another caller (whose fetch this one will share).
        if current.as_ref().is_none_or(|t| t.header != *used) {
            return true;
        }
        let mut thrown = lock(&self.thrown);
        if thrown.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return false;
        }
        *thrown = Some(Instant::now());
        *current = None;
        true
    }

    /// Drops `used` if it is the token in hand.
    fn forget(&self, used: &HeaderValue) {
        let mut current = lock(&self.current);
        if current.as_ref().is_some_and(|t| t.header == *used) {
            *current = None;
        }
    }

    async fn fetch(&self) -> Result<Token, CredentialError> {
        let url = self.token_endpoint().await?;
        // No scope configured: the ones the server's challenge names (MCP: clients ask for
        // what the challenge names).
        if lock(&self.scope).is_none()
            && let Some(wanted) = self.challenge().await.scope.clone()
        {
            lock(&self.scope).get_or_insert(wanted);
        }
        let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
        let mut form = format!("grant_type=client_credentials&resource={}", enc(&self.grant.resource));
        if let Some(scope) = lock(&self.scope).as_ref() {
            form.push_str(&format!("&scope={}", enc(scope)));
        }
        let unreachable = |reason: String| CredentialError::Unreachable { url: shown_url(&url), reason };
        let started = Instant::now();
        let resp = self
            .http
            .post(&url)
            // RFC 6749 §2.3.1: the credentials are form-encoded before they are joined.
            .basic_auth(enc(&self.grant.client_id), Some(enc(&self.grant.client_secret)))
            .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(form)
            .send()
            .await
            .map_err(|e| unreachable(e.without_url().to_string()))?;
        let status = resp.status();
        let body = read_body(resp, &url).await.map_err(|e| match e {
            super::FetchError::Http { reason, .. } => unreachable(reason),
            _ => CredentialError::Malformed(shown_url(&url)),
        })?;
        #[derive(serde::Deserialize)]
        struct Answer {
            access_token: Option<String>,
            token_type: Option<String>,
            expires_in: Option<u64>,
            error: Option<String>,
        }
        let answer = serde_json::from_slice::<Answer>(&body).ok();
        if !status.is_success() {
            // Only a code of the standard's shape is repeated: never free text from the server.
            let code = answer
                .and_then(|a| a.error)
                .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            return Err(CredentialError::Refused { url: shown_url(&url), status: status.as_u16(), code });
        }
        let malformed = || CredentialError::Malformed(shown_url(&url));
        let answer = answer.ok_or_else(malformed)?;
        let token = answer.access_token.filter(|t| !t.is_empty()).ok_or_else(malformed)?;
        if !answer.token_type.is_some_and(|t| t.eq_ignore_ascii_case("bearer")) {
            return Err(malformed());
        }
        let mut header = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| malformed())?;
        header.set_sensitive(true);
        let (renew_at, expires_at) = match answer.expires_in.map(Duration::from_secs) {
            Some(life) => {
                let early = life.saturating_sub(RENEW_BEFORE).max(life * 4 / 5);
                (Some(started + early), Some(started + life))
            }
            None => (None, None),
        };
        Ok(Token { header, renew_at, expires_at })
    }

    /// The configured token endpoint, or the one found (once) from the configured issuer's
    /// metadata, or from the server's protected resource metadata and its first authorization
    /// server's.
    async fn token_endpoint(&self) -> Result<String, CredentialError> {
        if let Some(u) = &self.grant.token_endpoint {
            return Ok(u.clone());
        }
        if let Some(u) = lock(&self.endpoint).clone() {
            return Ok(u);
        }
        let discovery = |e: super::FetchError| CredentialError::Discovery(e.to_string());
        let issuer = match &self.grant.issuer {
            Some(i) => i.clone(),
            None => self.authorization_server().await?,
        };
        let found = server_metadata(&self.http, &issuer, |m| m.token_endpoint.clone())
            .await
            .map_err(discovery)?
            .ok_or_else(|| CredentialError::Discovery(format!("the metadata of {} names none", shown_url(&issuer))))?;
        secure(&found)?;
        *lock(&self.endpoint) = Some(found.clone());
        Ok(found)
    }

    /// The first authorization server the resource's protected resource metadata names: the
    /// document the server's 401 challenge points to (`resource_metadata`), else the
    /// path-inserted well-known one, then the root one (RFC 9728 §3.1, §5.1). A document whose
    /// `resource` is not the one asked for is passed over (§3.3).
    async fn authorization_server(&self) -> Result<String, CredentialError> {
        #[derive(serde::Deserialize)]
        struct Resource {
            resource: Option<String>,
            authorization_servers: Option<Vec<String>>,
        }
        let resource = &self.grant.resource;
        let u = reqwest::Url::parse(resource).map_err(|_| CredentialError::Insecure(shown_url(resource)))?;
        let origin = u.origin().ascii_serialization();
        let path = u.path().trim_end_matches('/');
        let mut candidates: Vec<String> = self.challenge().await.metadata.iter().cloned().collect();
        candidates.push(format!("{origin}/.well-known/oauth-protected-resource{path}"));
        if !path.is_empty() {
            candidates.push(format!("{origin}/.well-known/oauth-protected-resource"));
        }
        let mut last = None;
        for url in candidates {
            if secure(&url).is_err() {
                continue;
            }
            match get_document(&self.http, &url).await {
                Ok((body, _)) => {
                    let Ok(doc) = serde_json::from_slice::<Resource>(&body) else { continue };
                    if doc.resource.as_deref() != Some(resource.as_str()) {
                        last.get_or_insert(format!("{} describes another resource", shown_url(&url)));
                        continue;
                    }
                    if let Some(first) = doc.authorization_servers.and_then(|s| s.into_iter().next()) {
                        secure(&first)?;
                        return Ok(first);
                    }
                }
                // The first failure says most (the challenge's document, or the nearest one).
                Err(e) => {
                    last.get_or_insert(e.to_string());
                }
            }
        }
        Err(CredentialError::Discovery(last.unwrap_or_else(|| {
            format!("the protected resource metadata of {} names no authorization server", shown_url(resource))
        })))
    }

    /// The server's challenge to a request without a token (a GET of the resource; RFC 9728
    /// §5.1), read once.
    async fn challenge(&self) -> &Challenge {
        self.challenge
            .get_or_init(|| async {
                let Ok(resp) = self.http.get(&self.grant.resource).send().await else { return Challenge::default() };
                let header = resp.headers().get(reqwest::header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok());
                match header {
                    Some(h) if resp.status() == reqwest::StatusCode::UNAUTHORIZED => Challenge {
                        metadata: challenge_param(h, "resource_metadata"),
                        scope: challenge_param(h, "scope").filter(|s| !s.trim().is_empty()),
                    },
                    _ => Challenge::default(),
                }
            })
            .await
    }
}

/// What a 401 challenge of the server says.
#[derive(Default)]
struct Challenge {
    /// `resource_metadata`.
    metadata: Option<String>,
    /// `scope`.
    scope: Option<String>,
}

/// The `scope` of a Bearer challenge whose `error` is `insufficient_scope` (RFC 6750 §3.1). The
/// auth-params are read as RFC 9110 §11.2 writes them (`name=token` or `name="quoted"`, comma
/// separated); no crate in the tree parses them, and only these two are needed.
pub(crate) fn insufficient_scope(challenge: &str) -> Option<String> {
    (challenge_param(challenge, "error").as_deref() == Some("insufficient_scope"))
        .then(|| challenge_param(challenge, "scope"))
        .flatten()
        .filter(|s| !s.trim().is_empty())
}

/// One auth-param of a Bearer challenge (the first of that name), unquoted.
fn challenge_param(challenge: &str, wanted: &str) -> Option<String> {
    let rest = challenge.trim_start();
    let params = rest.get(..6).filter(|s| s.eq_ignore_ascii_case("bearer")).map(|_| &rest[6..])?;
    let mut chars = params.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let name: String = chars.by_ref().take_while(|c| *c != '=').collect::<String>().trim().to_ascii_lowercase();
        if name.is_empty() {
            break;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let value = if chars.peek() == Some(&'"') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => v.extend(chars.next()),
                    '"' => break,
                    c => v.push(c),
                }
            }
            v
        } else {
            chars.by_ref().take_while(|c| *c != ',').collect::<String>().trim().to_owned()
        };
        if name == wanted {
            return Some(value);
        }
    }
    None
}

/// An https URL, or http on a loopback host.
fn secure(url: &str) -> Result<(), CredentialError> {
    if crate::config::is_provider_url(url) { Ok(()) } else { Err(CredentialError::Insecure(shown_url(url))) }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A token endpoint on 127.0.0.1 that counts its answers: `ok` gives `token-N` valid for
    /// `life` seconds, else 401 `invalid_client`.
    async fn endpoint(life: u64, ok: bool) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move |body: String| {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                async move {
                    assert!(body.starts_with("grant_type=client_credentials&resource="), "{body}");
                    // A little latency, so concurrent callers overlap the fetch.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if ok {
                        (
                            axum::http::StatusCode::OK,
                            format!(r#"{{"access_token":"token-{n}","token_type":"Bearer","expires_in":{life}}}"#),
                        )
                    } else {
                        (
                            axum::http::StatusCode::UNAUTHORIZED,
                            r#"{"error":"invalid_client","error_description":"secret s3cret is wrong"}"#.into(),
                        )
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, count)
    }

    fn source(url: &str) -> TokenSource {
        TokenSource::new(
            ClientCredentials {
                client_id: "portcullis".into(),
                client_secret: "s3cret".into(),
                scope: Some("mcp".into()),
                token_endpoint: Some(url.into()),
                issuer: None,
                resource: "https://mcp.example/mcp".into(),
            },
            "t",
        )
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_a_refusal_fetches_once_more() {
        let (url, count) = endpoint(3600, true).await;
        let s = Arc::new(source(&url));
        let all = futures_util::future::join_all((0..50).map(|_| {
            let s = s.clone();
            async move { s.bearer().await.unwrap() }
        }))
        .await;
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert!(all.iter().all(|h| h == "Bearer token-1" && h.is_sensitive()));
        // The server refused token-1: fifty callers that saw the refusal cause one fetch.
        let used = all[0].clone();
        let again = futures_util::future::join_all((0..50).map(|_| {
            let (s, used) = (s.clone(), used.clone());
            async move {
                assert!(s.refused(&used));
                s.bearer().await.unwrap()
            }
        }))
        .await;
        assert!(again.iter().all(|h| h == "Bearer token-2"), "{again:?}");
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // A refusal of the old token, reported late, does not throw the new one away.
        assert!(s.refused(&used));
        assert_eq!(s.bearer().await.unwrap(), "Bearer token-2");
        assert_eq!(count.load(Ordering::SeqCst), 2);
        // The server refuses token-2 too, at once: no third token within the back-off, so a
        // server that refuses every token cannot make every call fetch one.
        assert!(!s.refused(&again[0]));
        assert_eq!(s.bearer().await.unwrap(), "Bearer token-2");
        assert_eq!(count.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_token_is_renewed_before_it_expires() {
        // 60 s of life: due for renewal at four fifths of it, but never past it.
        let (url, count) = endpoint(60, true).await;
        let s = source(&url);
        assert_eq!(s.bearer().await.unwrap(), "Bearer token-1");
        assert_eq!(s.bearer().await.unwrap(), "Bearer token-1");
        // Ten seconds of life is shorter than the renewal margin: renewed at 8 s.
        let (url, count10) = endpoint(10, true).await;
        let s = source(&url);
        s.bearer().await.unwrap();
        let renew = lock(&s.current).as_ref().unwrap().renew_at.unwrap();
        let expires = lock(&s.current).as_ref().unwrap().expires_at.unwrap();
        assert!(expires - renew >= Duration::from_secs(2) - Duration::from_millis(50), "{:?}", expires - renew);
        // Past the renewal time: a new one.
        lock(&s.current).as_mut().unwrap().renew_at = Some(Instant::now());
        assert_eq!(s.bearer().await.unwrap(), "Bearer token-2");
        assert_eq!((count.load(Ordering::SeqCst), count10.load(Ordering::SeqCst)), (1, 2));
    }

    #[tokio::test]
    async fn a_refusal_names_the_code_never_the_description_or_secret() {
        let (url, count) = endpoint(60, false).await;
        let s = source(&url);
        let e = s.bearer().await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("401") && text.contains("invalid_client"), "{text}");
        assert!(!text.contains("s3cret") && !text.contains("wrong"), "{text}");
        // Within the back-off the endpoint is not asked again.
        assert_eq!(s.bearer().await.unwrap_err(), e);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    /// A resource server whose metadata only its challenge names (at `/custom/prm`), describing
    /// `resource_path`, with an authorization server at `/as` and its token endpoint.
    async fn protected(resource_path: &'static str) -> String {
        use axum::routing::{get, post};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (b1, b2, b3) = (base.clone(), base.clone(), base.clone());
        let app = axum::Router::new()
            .route(
                "/mcp",
                get(move || async move {
                    let challenge = format!(r#"Bearer realm="x", resource_metadata="{b1}/custom/prm""#);
                    (axum::http::StatusCode::UNAUTHORIZED, [(axum::http::header::WWW_AUTHENTICATE, challenge)])
                }),
            )
            .route(
                "/custom/prm",
                get(move || async move {
                    format!(r#"{{"resource":"{b2}{resource_path}","authorization_servers":["{b2}/as"]}}"#)
                }),
            )
            .route(
                "/.well-known/oauth-authorization-server/as",
                get(move || async move { format!(r#"{{"issuer":"{b3}/as","token_endpoint":"{b3}/token"}}"#) }),
            )
            .route("/token", post(|| async { r#"{"access_token":"found","token_type":"bearer","expires_in":600}"# }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        base
    }

    fn discovering(resource: String) -> TokenSource {
        TokenSource::new(
            ClientCredentials {
                client_id: "p".into(),
                client_secret: "s".into(),
                scope: None,
                token_endpoint: None,
                issuer: None,
                resource,
            },
            "t",
        )
    }

    #[tokio::test]
    async fn the_endpoint_is_found_from_the_challenge_and_the_metadata_must_describe_the_resource() {
        let base = protected("/mcp").await;
        assert_eq!(discovering(format!("{base}/mcp")).bearer().await.unwrap(), "Bearer found");
        let base = protected("/elsewhere").await;
        let e = discovering(format!("{base}/mcp")).bearer().await.unwrap_err();
        assert!(matches!(&e, CredentialError::Discovery(m) if m.contains("another resource")), "{e}");
    }

    #[test]
    fn an_insufficient_scope_challenge_is_read() {
        let c = r#"Bearer realm="portcullis", resource_metadata="https://x/.well-known/oauth-protected-resource/mcp", scope="a:echo b:echo", error="insufficient_scope""#;
        assert_eq!(insufficient_scope(c).as_deref(), Some("a:echo b:echo"));
        assert_eq!(insufficient_scope(r#"bearer error=insufficient_scope, scope="x\"y""#).as_deref(), Some("x\"y"));
        assert_eq!(insufficient_scope(r#"Bearer error="invalid_token", scope="a""#), None);
        assert_eq!(insufficient_scope(r#"Basic realm="x", error="insufficient_scope", scope="a""#), None);
        assert_eq!(insufficient_scope(r#"Bearer error="insufficient_scope""#), None);
        assert_eq!(insufficient_scope("Bearer"), None);
        assert_eq!(insufficient_scope(""), None);
    }

    #[test]
    fn a_step_up_adds_scopes_once() {
        let s = source("http://127.0.0.1:9/token");
        let used = HeaderValue::from_static("Bearer old");
        let forbidden = reqwest::StatusCode::FORBIDDEN;
        let challenge = HeaderValue::from_static(r#"Bearer error="insufficient_scope", scope="mcp extra""#);
        assert!(s.answered(&used, forbidden, Some(&challenge)));
        assert_eq!(lock(&s.scope).as_deref(), Some("mcp extra"));
        // The same challenge again asks for nothing new: no second try.
        assert!(!s.answered(&used, forbidden, Some(&challenge)));
        assert!(!s.answered(&used, forbidden, None));
        assert!(s.answered(&used, reqwest::StatusCode::UNAUTHORIZED, None));
        assert!(!s.answered(&used, reqwest::StatusCode::OK, None));
    }

    #[test]
    fn discovered_urls_must_be_https_but_on_loopback() {
        assert!(secure("https://idp.example/token").is_ok());
        assert!(secure("http://127.0.0.1:8080/token").is_ok());
        assert!(secure("http://localhost/token").is_ok());
        assert!(matches!(secure("http://idp.example/token"), Err(CredentialError::Insecure(_))));
        assert!(secure("file:///etc/passwd").is_err());
    }
}
