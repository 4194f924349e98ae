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

use super::{get_document, read_body, server_metadata};
use crate::config::shown_url;
use crate::sharded::lock;

/// How long after a failed fetch the endpoint is left alone (calls fail at once meanwhile).
pub(crate) const RETRY_AFTER: Duration = Duration::from_secs(5);
/// A token is renewed this long before it expires (or at four fifths of a shorter lifetime).
const RENEW_BEFORE: Duration = Duration::from_secs(60);
/// The most one fetch may take, discovery included (each request has [`FETCH_TIMEOUT`]).
const FETCH_TOTAL: Duration = Duration::from_secs(20);

/// How Portcullis gets its access tokens for a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Flow {
    /// A machine account of Portcullis' own (RFC 6749 §4.4).
    ClientCredentials,
    /// A person's account, signed in once with `portcullis login` (authorization code with
    /// PKCE), then refreshed; its tokens live in the vault.
    AuthorizationCode {
        /// The loopback port `portcullis login` takes the browser's return on.
        callback_port: u16,
    },
    /// The caller's own access token (from a provider the server trusts too) exchanged for one
    /// audienced to the server (RFC 8693, on behalf of the caller).
    TokenExchange {
        /// The `audience` asked for, when the provider wants one besides the `resource`.
        audience: Option<String>,
    },
}

/// The OAuth grant towards one remote server, as the config gives it.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamGrant {
    /// Which grant.
    pub flow: Flow,
    /// Portcullis' client id at the server's authorization server (empty: registered at login).
    pub client_id: String,
    /// Its secret (sent with HTTP Basic, RFC 6749 §2.3.1; empty for a public client).
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

impl std::fmt::Debug for UpstreamGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamGrant")
            .field("flow", &self.flow)
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
    /// A person's account is needed: none was signed in, or its refresh was refused.
    #[error("needs login ({reason}): run `portcullis login {server}`")]
    NeedsLogin {
        /// The server.
        server: String,
        /// Why.
        reason: String,
    },
    /// The vault cannot give the account's tokens (the store, or a key that does not open them).
    #[error("the token vault: {0}")]
    Vault(String),
}

/// Where a server's account tokens are kept: the store, and the keys that seal them.
#[derive(Clone)]
pub(crate) struct Vault {
    /// The store's file.
    pub store: crate::store::StoreLocation,
    /// The keys.
    pub keys: crate::vault::KeyRing,
}

/// An account's tokens as sealed in the vault.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct AccountTokens {
    /// The access token.
    pub access_token: String,
    /// The refresh token, when one was given.
    #[serde(default)]
    pub refresh_token: Option<String>,
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
    grant: UpstreamGrant,
    /// The vault of an `authorization_code` grant.
    vault: Option<Vault>,
    /// Whose account ("" for the server's shared one).
    subject: String,
    /// The last token the server refused (a 401): never taken from the vault again; refreshed.
    refused_token: Mutex<Option<HeaderValue>>,
    /// Refreshes made (for `/servers`).
    refreshes: std::sync::atomic::AtomicU64,
    /// The caller's access token a token exchange starts from (the latest it presented).
    subject_token: Mutex<Option<std::sync::Arc<str>>>,
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
    pub(crate) fn new(grant: UpstreamGrant, server: &str, vault: Option<Vault>) -> TokenSource {
        let http = super::http_client();
        TokenSource {
            vault,
            subject: String::new(),
            refused_token: Mutex::new(None),
            refreshes: std::sync::atomic::AtomicU64::new(0),
            subject_token: Mutex::new(None),
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

    /// The same source for `subject`'s account ("" for the server's own).
    pub(crate) fn for_subject(mut self, subject: &str) -> Self {
        subject.clone_into(&mut self.subject);
        self
    }

    /// Whether an account is there to use (a token in hand, or one the vault gives): false only
    /// when the vault says nobody is signed in or the account needs a new login.
    pub(crate) async fn has_account(&self) -> bool {
        if self.in_hand().is_some() {
            return true;
        }
        !matches!(self.bearer().await, Err(CredentialError::NeedsLogin { .. }))
    }

    /// Offers the caller's access token for a token exchange: a token other than the last one
    /// (the client renewed it) is exchanged afresh.
    pub(crate) fn offer(&self, token: &std::sync::Arc<str>) {
        let mut current = lock(&self.subject_token);
        if current.as_ref().is_some_and(|t| t == token) {
            return;
        }
        *current = Some(token.clone());
        drop(current);
        *lock(&self.current) = None;
        *lock(&self.failed) = None;
    }

    /// The grant it was made for.
    pub(crate) fn grant(&self) -> &UpstreamGrant {
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
        let failed = lock(&self.failed).as_ref().map(|(_, e)| e.clone());
        let grant = match self.grant.flow {
            Flow::ClientCredentials => "client_credentials",
            Flow::AuthorizationCode { .. } => "authorization_code",
            Flow::TokenExchange { .. } => "token_exchange",
        };
        let mut v = serde_json::json!({
            "grant": grant,
            "token": token,
            "scope": lock(&self.scope).clone(),
            "last_error": failed.as_ref().map(ToString::to_string),
        });
        if let Flow::AuthorizationCode { .. } = &self.grant.flow {
            let login = match (&failed, token) {
                (Some(CredentialError::NeedsLogin { .. }), _) => "needs_login",
                (_, "valid") => "logged_in",
                _ => "unknown",
            };
            v["login"] = serde_json::Value::String(login.into());
            v["refreshes"] = self.refreshes.load(std::sync::atomic::Ordering::Relaxed).into();
        }
        v
    }

    /// The store changed (a login, a logout, another process' refresh): an account's token is
    /// read from the vault again at the next request, and a failure is not waited out.
    pub(crate) fn vault_changed(&self) -> bool {
        if let Flow::AuthorizationCode { .. } = &self.grant.flow {
            *lock(&self.current) = None;
            *lock(&self.failed) = None;
            return true;
        }
        false
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
                *scope = Some(joined.clone());
                drop(scope);
                self.forget(used);
                if let (Flow::AuthorizationCode { .. }, Some(vault)) = (&self.grant.flow, &self.vault) {
                    // A person's consent covers the scopes it gave: more need a new login, which
                    // asks for these (the vault remembers them for it).
                    let reason = format!("the server asks for more scopes ({joined}): sign in again");
                    *lock(&self.failed) = Some((Instant::now(), self.needs_login(&reason)));
                    let (store, server, subject) = (vault.store.clone(), self.server.clone(), self.subject.clone());
                    tokio::task::spawn_blocking(move || {
                        let marked = crate::store::Store::open(&store)
                            .and_then(|s| s.upstream_wants_scope(&server, &subject, &joined, crate::store::now_ms()));
                        if let Err(e) = marked {
                            tracing::warn!(server = %server, error = %e, "could not mark the account as needing a login");
                        }
                    });
                    return false;
                }
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
        *lock(&self.refused_token) = Some(used.clone());
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
        match &self.grant.flow {
            Flow::ClientCredentials => self.fetch_client_credentials().await,
            Flow::AuthorizationCode { .. } => self.fetch_account().await,
            Flow::TokenExchange { audience } => self.fetch_exchange(audience.as_deref()).await,
        }
    }

    fn needs_login(&self, reason: &str) -> CredentialError {
        CredentialError::NeedsLogin { server: self.server.clone(), reason: reason.to_owned() }
    }

    /// The account's token from the vault, refreshed when it is due (or was refused): a refresh
    /// the authorization server refuses marks the account `needs_login`.
    async fn fetch_account(&self) -> Result<Token, CredentialError> {
        let vault = self.vault.clone().ok_or_else(|| CredentialError::Vault("no key".into()))?;
        let (server, subject) = (self.server.clone(), self.subject.clone());
        let store = vault.store.clone();
        let (account, client) = tokio::task::spawn_blocking(move || {
            let s = crate::store::Store::open(&store)?;
            let a = s.upstream_account(&server, &subject)?;
            let c = match &a {
                Some(a) => s.upstream_client(&server, &a.issuer)?,
                None => None,
            };
            Ok::<_, crate::store::StoreError>((a, c))
        })
        .await
        .map_err(|e| CredentialError::Vault(e.to_string()))?
        .map_err(|e| CredentialError::Vault(e.to_string()))?;
        let Some(account) = account else { return Err(self.needs_login("no account signed in")) };
        if account.state == "needs_login" {
            return Err(self.needs_login("the authorization server refused the last refresh"));
        }
        let row =
            crate::store::UpstreamAccount::row(&account.server, &account.subject, &account.issuer, &account.client_id);
        let plain = vault.keys.open(&row, &account.sealed).map_err(|e| CredentialError::Vault(e.to_string()))?;
        let tokens: AccountTokens = serde_json::from_slice(&plain)
            .map_err(|_| CredentialError::Vault("an account that does not read".into()))?;
        let now = crate::store::now_ms();
        let mut header = HeaderValue::from_str(&format!("Bearer {}", tokens.access_token))
            .map_err(|_| CredentialError::Vault("an access token that is not a header value".into()))?;
        header.set_sensitive(true);
        let refused = lock(&self.refused_token).as_ref() == Some(&header);
        // Due for renewal as a fetched token is: 60 s before it expires, or at four fifths of
        // a shorter life (it was issued when the account was last written).
        let ms = |d: i64| Duration::from_millis(u64::try_from(d).unwrap_or(0));
        let timing = account.expires_at.map(|e| {
            let life = ms(e - account.updated_at);
            let threshold = life.saturating_sub(RENEW_BEFORE).max(life * 4 / 5);
            let renew =
                ms(account.updated_at.saturating_add(i64::try_from(threshold.as_millis()).unwrap_or(i64::MAX)) - now);
            (renew, ms(e - now))
        });
        if !refused && timing.is_none_or(|(renew, _)| !renew.is_zero()) {
            let started = Instant::now();
            return Ok(match timing {
                Some((renew, left)) => {
                    Token { header, renew_at: Some(started + renew), expires_at: Some(started + left) }
                }
                None => Token { header, renew_at: None, expires_at: None },
            });
        }
        let Some(refresh) = tokens.refresh_token.clone() else {
            return Err(self.needs_login("the access token expired and there is no refresh token"));
        };
        // The client's secret: the config's, or the one its registration gave.
        let secret = if !self.grant.client_secret.is_empty() {
            Some(self.grant.client_secret.clone())
        } else {
            match client.as_ref().and_then(|c| c.sealed_secret.as_ref().map(|s| (c, s))) {
                Some((c, sealed)) => {
                    let row = crate::store::UpstreamClient::row(&c.server, &c.issuer, &c.client_id);
                    let plain = vault.keys.open(&row, sealed).map_err(|e| CredentialError::Vault(e.to_string()))?;
                    Some(
                        String::from_utf8(plain)
                            .map_err(|_| CredentialError::Vault("a secret that does not read".into()))?,
                    )
                }
                None => None,
            }
        };
        let mut form = vec![("grant_type", "refresh_token".to_owned()), ("refresh_token", refresh.clone())];
        form.push(("resource", self.grant.resource.clone()));
        let answer =
            token_request(&self.http, &account.token_endpoint, &account.client_id, secret.as_deref(), form).await;
        let answer = match answer {
            Ok(a) => a,
            Err(CredentialError::Refused { code, status, url }) => {
                if matches!(code.as_deref(), Some("invalid_grant")) || status == 401 {
                    // Refused for good: a person must sign in again (unless one just did).
                    let (store, server, subject, seen) =
                        (vault.store.clone(), account.server.clone(), account.subject.clone(), account.updated_at);
                    let marked = tokio::task::spawn_blocking(move || {
                        crate::store::Store::open(&store)?.upstream_needs_login(
                            &server,
                            &subject,
                            seen,
                            crate::store::now_ms(),
                        )
                    })
                    .await;
                    if !matches!(marked, Ok(Ok(_))) {
                        tracing::warn!(server = %self.server, "could not mark the account as needing a login");
                    }
                    return Err(self.needs_login(&format!(
                        "the authorization server refused the refresh ({})",
                        code.as_deref().unwrap_or("no error code")
                    )));
                }
                return Err(CredentialError::Refused { code, status, url });
            }
            Err(e) => return Err(e),
        };
        let started = Instant::now();
        let expires_at = answer.expires_in.map(|s| now + i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX));
        let next = AccountTokens {
            access_token: answer.access_token.clone(),
            refresh_token: answer.refresh_token.clone().or(Some(refresh)),
        };
        let plain = serde_json::to_vec(&next).map_err(|e| CredentialError::Vault(e.to_string()))?;
        let sealed = vault.keys.seal(&row, &plain).map_err(|e| CredentialError::Vault(e.to_string()))?;
        let saved = crate::store::UpstreamAccount {
            sealed,
            expires_at,
            scope: answer.scope.clone().or(account.scope.clone()),
            state: "active".into(),
            updated_at: crate::store::now_ms(),
            ..account
        };
        let store = vault.store.clone();
        tokio::task::spawn_blocking(move || crate::store::Store::open(&store)?.upstream_save(&saved))
            .await
            .map_err(|e| CredentialError::Vault(e.to_string()))?
            .map_err(|e| CredentialError::Vault(e.to_string()))?;
        self.refreshes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(server = %self.server, "the upstream account's access token was refreshed");
        Ok(answer.token(started))
    }

    /// The caller's token exchanged for one for the server (RFC 8693 §2.1): the caller's token
    /// goes to the provider only, never to the server.
    async fn fetch_exchange(&self, audience: Option<&str>) -> Result<Token, CredentialError> {
        let Some(subject) = lock(&self.subject_token).clone() else {
            return Err(CredentialError::NeedsLogin {
                server: self.server.clone(),
                reason: "a token exchange needs the caller's access token from the identity provider".into(),
            });
        };
        let url = self.token_endpoint().await?;
        let mut form = vec![
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange".to_owned()),
            ("subject_token", subject.to_string()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:access_token".to_owned()),
            ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token".to_owned()),
            ("resource", self.grant.resource.clone()),
        ];
        if let Some(a) = audience {
            form.push(("audience", a.to_owned()));
        }
        self.request_with_scope(&url, form).await
    }

    /// A token request of Portcullis' own client (id and secret), with the scopes asked for.
    async fn request_with_scope(&self, url: &str, mut form: Vec<(&str, String)>) -> Result<Token, CredentialError> {
        if let Some(scope) = lock(&self.scope).clone() {
            form.push(("scope", scope));
        }
        let started = Instant::now();
        let answer =
            token_request(&self.http, url, &self.grant.client_id, Some(&self.grant.client_secret), form).await?;
        Ok(answer.token(started))
    }

    async fn fetch_client_credentials(&self) -> Result<Token, CredentialError> {
        let url = self.token_endpoint().await?;
        // No scope configured: the ones the server's challenge names (MCP: clients ask for
        // what the challenge names).
        if lock(&self.scope).is_none()
            && let Some(wanted) = self.challenge().await.scope.clone()
        {
            lock(&self.scope).get_or_insert(wanted);
        }
        let form = vec![("grant_type", "client_credentials".to_owned()), ("resource", self.grant.resource.clone())];
        self.request_with_scope(&url, form).await
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

    /// The authorization server of the grant (the configured issuer, else the one the
    /// server's protected resource metadata names) and its metadata, for a login.
    pub(crate) async fn discover(&self) -> Result<(String, super::ServerMetadata), CredentialError> {
        let issuer = match &self.grant.issuer {
            Some(i) => i.clone(),
            None => self.authorization_server().await?,
        };
        let m = server_metadata(&self.http, &issuer, |m| Some(m.clone()))
            .await
            .map_err(|e| CredentialError::Discovery(e.to_string()))?
            .ok_or_else(|| CredentialError::Discovery(format!("no metadata for {}", shown_url(&issuer))))?;
        for u in [&m.authorization_endpoint, &m.token_endpoint, &m.registration_endpoint].into_iter().flatten() {
            secure(u)?;
        }
        Ok((issuer, m))
    }

    /// The scopes to ask for: the configured ones, else those of the server's challenge.
    pub(crate) async fn scope_to_ask(&self) -> Option<String> {
        if let Some(s) = lock(&self.scope).clone() {
            return Some(s);
        }
        self.challenge().await.scope.clone()
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

/// A bearer token response (RFC 6749 §5.1), checked.
pub(crate) struct TokenAnswer {
    /// The access token.
    pub access_token: String,
    /// Its lifetime in seconds, if said.
    pub expires_in: Option<u64>,
    /// A refresh token, if given.
    pub refresh_token: Option<String>,
    /// The scopes granted, if said.
    pub scope: Option<String>,
}

impl TokenAnswer {
    /// The token in hand it makes, fetched at `started`.
    fn token(&self, started: Instant) -> Token {
        let mut header = HeaderValue::from_str(&format!("Bearer {}", self.access_token))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
        header.set_sensitive(true);
        let (renew_at, expires_at) = match self.expires_in.map(Duration::from_secs) {
            Some(life) => {
                let early = life.saturating_sub(RENEW_BEFORE).max(life * 4 / 5);
                (Some(started + early), Some(started + life))
            }
            None => (None, None),
        };
        Token { header, renew_at, expires_at }
    }
}

/// One token request: the form, with the client authenticated by HTTP Basic when it has a
/// secret (form-encoded first, RFC 6749 §2.3.1), else by its `client_id` in the form. Errors
/// name the endpoint, the status and the OAuth `error` code only.
pub(crate) async fn token_request(
    http: &reqwest::Client,
    url: &str,
    client_id: &str,
    secret: Option<&str>,
    mut form: Vec<(&str, String)>,
) -> Result<TokenAnswer, CredentialError> {
    let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    let mut req = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(reqwest::header::ACCEPT, "application/json");
    match secret.filter(|s| !s.is_empty()) {
        Some(secret) => req = req.basic_auth(enc(client_id), Some(enc(secret))),
        None => form.push(("client_id", client_id.to_owned())),
    }
    let body = {
        let mut b = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &form {
            b.append_pair(k, v);
        }
        b.finish()
    };
    let unreachable = |reason: String| CredentialError::Unreachable { url: shown_url(url), reason };
    let resp = req.body(body).send().await.map_err(|e| unreachable(e.without_url().to_string()))?;
    let status = resp.status();
    let body = read_body(resp, url).await.map_err(|e| match e {
        super::FetchError::Http { reason, .. } => unreachable(reason),
        _ => CredentialError::Malformed(shown_url(url)),
    })?;
    #[derive(serde::Deserialize)]
    struct Answer {
        access_token: Option<String>,
        token_type: Option<String>,
        expires_in: Option<u64>,
        refresh_token: Option<String>,
        scope: Option<String>,
        error: Option<String>,
    }
    let answer = serde_json::from_slice::<Answer>(&body).ok();
    if !status.is_success() {
        // Only a code of the standard's shape is repeated: never free text from the server.
        let code = answer
            .and_then(|a| a.error)
            .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        return Err(CredentialError::Refused { url: shown_url(url), status: status.as_u16(), code });
    }
    let malformed = || CredentialError::Malformed(shown_url(url));
    let answer = answer.ok_or_else(malformed)?;
    let access_token = answer
        .access_token
        .filter(|t| !t.is_empty() && HeaderValue::from_str(&format!("Bearer {t}")).is_ok())
        .ok_or_else(malformed)?;
    if !answer.token_type.is_some_and(|t| t.eq_ignore_ascii_case("bearer")) {
        return Err(malformed());
    }
    Ok(TokenAnswer {
        access_token,
        expires_in: answer.expires_in,
        refresh_token: answer.refresh_token.filter(|t| !t.is_empty()),
        scope: answer.scope,
    })
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
        counting_endpoint(move |body: String, n: usize| async move {
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
        })
        .await
    }

    /// A token endpoint on 127.0.0.1 answering with `answer(body, n)` for its n-th request (from
    /// 1); its URL and the count of requests.
    async fn counting_endpoint<F, Fut>(answer: F) -> (String, Arc<AtomicUsize>)
    where
        F: Fn(String, usize) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = (axum::http::StatusCode, String)> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let app = axum::Router::new().route(
            "/token",
            axum::routing::post(move |body: String| {
                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                answer(body, n)
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, count)
    }

    fn source(url: &str) -> TokenSource {
        TokenSource::new(
            UpstreamGrant {
                flow: Flow::ClientCredentials,
                client_id: "portcullis".into(),
                client_secret: "s3cret".into(),
                scope: Some("mcp".into()),
                token_endpoint: Some(url.into()),
                issuer: None,
                resource: "https://mcp.example/mcp".into(),
            },
            "t",
            None,
        )
    }

    /// Fifty callers that each saw the server refuse `used`, then ask for a token at once.
    async fn fifty_refused(s: &Arc<TokenSource>, used: &HeaderValue) -> Vec<HeaderValue> {
        futures_util::future::join_all((0..50).map(|_| {
            let (s, used) = (s.clone(), used.clone());
            async move {
                assert!(s.refused(&used));
                s.bearer().await.unwrap()
            }
        }))
        .await
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
        let again = fifty_refused(&s, &used).await;
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
            UpstreamGrant {
                flow: Flow::ClientCredentials,
                client_id: "p".into(),
                client_secret: "s".into(),
                scope: None,
                token_endpoint: None,
                issuer: None,
                resource,
            },
            "t",
            None,
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

    /// A token endpoint for refresh tokens: `r{N}` gives `a{N+1}`/`r{N+1}`; with `ok` false,
    /// 400 `invalid_grant`. Counts its answers.
    async fn refresher(ok: bool) -> (String, Arc<AtomicUsize>) {
        counting_endpoint(move |body: String, _| async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let form: std::collections::HashMap<String, String> =
                form_urlencoded::parse(body.as_bytes()).into_owned().collect();
            assert_eq!(form["grant_type"], "refresh_token");
            assert_eq!(form["client_id"], "pcs", "a public client names itself");
            let n: u32 = form["refresh_token"].trim_start_matches('r').parse().unwrap();
            if ok {
                let next = n + 1;
                (
                    axum::http::StatusCode::OK,
                    format!(
                        r#"{{"access_token":"a{next}","refresh_token":"r{next}","token_type":"Bearer","expires_in":3600}}"#
                    ),
                )
            } else {
                (axum::http::StatusCode::BAD_REQUEST, r#"{"error":"invalid_grant"}"#.into())
            }
        })
        .await
    }

    /// A vault in a fresh store holding the shared account of server `t` with `a1`/`r1`,
    /// issued `age_ms` ago for `life_ms`.
    fn account_source(token_endpoint: &str, life_ms: i64, age_ms: i64) -> (TokenSource, Vault) {
        let dir = std::env::temp_dir().join(format!("pcs-vault-{}", crate::random::id().unwrap()));
        std::fs::create_dir_all(&dir).unwrap();
        let keys = crate::vault::KeyRing::new("a-test-key-0123456789abcdef0123456789", None).unwrap();
        let vault = Vault { store: crate::store::StoreLocation::File(dir.join("tokens.db")), keys: keys.clone() };
        let row = crate::store::UpstreamAccount::row("t", "", "https://as.example", "pcs");
        let plain = serde_json::to_vec(&AccountTokens { access_token: "a1".into(), refresh_token: Some("r1".into()) });
        let now = crate::store::now_ms() - age_ms;
        let account = crate::store::UpstreamAccount {
            server: "t".into(),
            subject: String::new(),
            name: String::new(),
            issuer: "https://as.example".into(),
            token_endpoint: token_endpoint.into(),
            client_id: "pcs".into(),
            sealed: keys.seal(&row, &plain.unwrap()).unwrap(),
            expires_at: Some(now + life_ms),
            scope: None,
            state: "active".into(),
            updated_at: now,
        };
        crate::store::Store::open(&vault.store).unwrap().upstream_save(&account).unwrap();
        let grant = UpstreamGrant {
            flow: Flow::AuthorizationCode { callback_port: 3000 },
            client_id: String::new(),
            client_secret: String::new(),
            scope: None,
            token_endpoint: None,
            issuer: None,
            resource: "https://mcp.example/mcp".into(),
        };
        (TokenSource::new(grant, "t", Some(vault.clone())), vault)
    }

    #[tokio::test]
    async fn an_account_is_refreshed_once_for_fifty_callers_after_a_refusal_and_sealed_again() {
        let (url, count) = refresher(true).await;
        let (s, vault) = account_source(&url, 3_600_000, 0);
        let s = Arc::new(s);
        let first = s.bearer().await.unwrap();
        assert_eq!((first.to_str().unwrap(), count.load(Ordering::SeqCst)), ("Bearer a1", 0), "from the vault");
        let all = fifty_refused(&s, &first).await;
        assert!(all.iter().all(|h| h == "Bearer a2"), "{all:?}");
        assert_eq!(count.load(Ordering::SeqCst), 1, "one refresh for fifty callers");
        // The vault holds the new pair, sealed; another reader (a restart) takes it as it is.
        let a = crate::store::Store::open(&vault.store).unwrap().upstream_account("t", "").unwrap().unwrap();
        let row = crate::store::UpstreamAccount::row("t", "", "https://as.example", "pcs");
        let t: AccountTokens = serde_json::from_slice(&vault.keys.open(&row, &a.sealed).unwrap()).unwrap();
        assert_eq!((t.access_token.as_str(), t.refresh_token.as_deref()), ("a2", Some("r2")));
        assert!(!a.sealed.windows(2).any(|w| w == b"a2" || w == b"r2"), "sealed, not in clear");
        assert!(s.vault_changed());
        assert_eq!(s.bearer().await.unwrap(), "Bearer a2");
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_account_due_for_renewal_is_refreshed_and_a_refused_refresh_needs_a_login() {
        let (url, count) = refresher(true).await;
        // Ten seconds of life: used as it is for eight, then refreshed; expired: refreshed.
        let (fresh, _) = account_source(&url, 10_000, 1_000);
        assert_eq!(fresh.bearer().await.unwrap(), "Bearer a1");
        let (due, _) = account_source(&url, 10_000, 9_000);
        assert_eq!(due.bearer().await.unwrap(), "Bearer a2", "past four fifths of its life");
        let (expired, _) = account_source(&url, 10_000, 20_000);
        assert_eq!(expired.bearer().await.unwrap(), "Bearer a2", "expired in the vault");
        assert_eq!(count.load(Ordering::SeqCst), 2);

        let (url, count) = refresher(false).await;
        let (s, vault) = account_source(&url, 10_000, 20_000);
        let e = s.bearer().await.unwrap_err();
        assert!(matches!(&e, CredentialError::NeedsLogin { .. }), "{e}");
        assert!(e.to_string().contains("portcullis login t") && e.to_string().contains("invalid_grant"), "{e}");
        let a = crate::store::Store::open(&vault.store).unwrap().upstream_account("t", "").unwrap().unwrap();
        assert_eq!(a.state, "needs_login");
        // Asked again (even past the back-off): the vault says so, the endpoint is not asked.
        s.vault_changed();
        assert!(matches!(s.bearer().await, Err(CredentialError::NeedsLogin { .. })));
        assert_eq!(count.load(Ordering::SeqCst), 1);
        assert_eq!(s.state()["login"], "needs_login");
        // No account at all.
        crate::store::Store::open(&vault.store).unwrap().upstream_forget("t", "").unwrap();
        s.vault_changed();
        let e = s.bearer().await.unwrap_err();
        assert!(e.to_string().contains("no account"), "{e}");
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
