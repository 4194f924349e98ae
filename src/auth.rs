//! Authentication: who is asking. Credential sources (environment tokens, named config tokens,
//! a generated token), the presentation rules (`Authorization: Bearer` or `X-API-Key`, exactly
//! one), lookup by SHA-256 digest, rate limits per identity and per client address, the
//! failure throttle, and the HTTP answers of each refusal.
//!
//! Invariants: no secret is kept (only digests) and none is ever logged, echoed or forwarded;
//! lookup is a hash-map probe on the digest, so answer time does not depend on how close a
//! guess is; a valid credential is never refused by the failure throttle; with no credential
//! source at all, every caller is the anonymous identity with every grant (allowed only on
//! loopback, see `cli`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::authz::{GrantKind, Grants};
use crate::credentials::{AuthConfig, Cidr, FailureLimit, Rate, Role, TokenDef, TokenSource, digest};
use crate::sharded::Sharded;
use crate::sharded::lock;

/// Carries a verified client certificate's subject from the TLS acceptor to authentication.
/// The edge layer removes it from every incoming request first, so a client cannot send it.
pub(crate) const CLIENT_SUBJECT_HEADER: &str = "x-portcullis-client-subject";

/// The realm in every challenge.
pub(crate) const REALM: &str = "portcullis";

/// A token bucket.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: Rate) -> Self {
        Bucket { tokens: f64::from(rate.count), at: Instant::now() }
    }

    /// Takes one token, or says how long until one is there.
    fn take(&mut self, rate: Rate, now: Instant) -> Result<(), Duration> {
        let per_sec = f64::from(rate.count) / rate.per.as_secs_f64();
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(f64::from(rate.count));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / per_sec))
        }
    }

    /// Puts back a token taken for a request another limit refused.
    fn give_back(&mut self, rate: Rate) {
        self.tokens = (self.tokens + 1.0).min(f64::from(rate.count));
    }
}

/// Who is asking.
#[derive(Debug)]
pub struct Identity {
    /// Its name (never a secret).
    pub name: Arc<str>,
    /// Admin or not.
    pub role: Role,
    /// The tenant whose namespaces bound what it sees (None: no tenant).
    pub tenant: Option<String>,
    /// What it may reach (tenant and per-server restrictions applied).
    pub grants: Grants,
    /// When it stops working.
    pub expires: Option<SystemTime>,
    /// The store id of an issued token (None for config and environment tokens).
    pub token_id: Option<String>,
    /// The credential's stable identity, which sessions are bound to: `config:NAME` for a
    /// config, environment or generated token (and a client certificate naming one),
    /// `issued:LINEAGE` for an issued token (its rotations share it; its tenant is fixed), and
    /// `anonymous`, `oauth:ISSUER#SUBJECT` for an access token. Two identities may share a
    /// name, never a key.
    pub key: Arc<str>,
    /// The identity provider of an access token (its configuration as the token was checked).
    pub(crate) issuer: Option<Arc<crate::credentials::IssuerDef>>,
    /// The scopes of an access token that its issuer maps (empty for other credentials).
    pub(crate) scopes: Box<[String]>,
    rate: Option<Rate>,
    /// Its rate bucket; an access token's is its subject's, shared by all the subject's tokens.
    bucket: Arc<Mutex<Option<Bucket>>>,
}

impl Identity {
    /// The caller when no credential source is configured: everything is allowed.
    pub(crate) fn anonymous() -> Arc<Self> {
        Arc::new(Identity {
            name: "anonymous".into(),
            role: Role::Admin,
            tenant: None,
            grants: Grants::all(),
            expires: None,
            token_id: None,
            key: "anonymous".into(),
            issuer: None,
            scopes: Box::default(),
            rate: None,
            bucket: Arc::default(),
        })
    }

    /// A user identity named `name` with key `key` (unit tests of what keys identities).
    #[cfg(test)]
    pub(crate) fn named_for_tests(name: &str, key: &str) -> Identity {
        Identity {
            name: name.into(),
            role: Role::User,
            tenant: None,
            grants: Grants::all(),
            expires: None,
            token_id: None,
            key: key.into(),
            issuer: None,
            scopes: Box::default(),
            rate: None,
            bucket: Arc::default(),
        }
    }

    /// Whether a session opened by `other` may be used by this identity.
    pub(crate) fn same_principal(&self, other: &Identity) -> bool {
        self.key == other.key
    }

    /// Whether it may use the management API.
    pub(crate) fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Whether it may read the gateway-wide figures (`/metrics`, `/stats`): a `metrics`
    /// credential, or an admin without restriction.
    pub(crate) fn reads_metrics(&self, servers: &[String]) -> bool {
        self.role == Role::Metrics || self.is_unrestricted_admin(servers)
    }

    /// Whether it is an admin without restriction: no tenant, every server, every name. Only
    /// such an admin may see gateway-wide figures (`/stats`, `/metrics`) or reload the config.
    pub(crate) fn is_unrestricted_admin(&self, servers: &[String]) -> bool {
        let every_server = self.grants.servers.as_ref().is_none_or(|s| servers.iter().all(|n| s.contains(n)));
        self.is_admin()
            && self.tenant.is_none()
            && every_server
            && self.grants.tools.is_open()
            && self.grants.prompts.is_open()
            && self.grants.resources.is_open()
    }

    /// Whether it has expired at `now`.
    pub(crate) fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }
}

/// Why a request was refused before it reached MCP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No credential, an empty one, or another scheme than Bearer.
    #[error("missing bearer token")]
    Missing,
    /// Unknown, expired or revoked (deliberately not saying which).
    #[error("invalid token")]
    Invalid,
    /// Two credentials, or a malformed one.
    #[error("malformed or duplicated credentials")]
    BadRequest,
    /// Valid, but not for this endpoint.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Too many requests (per identity or per address).
    #[error("rate limited")]
    RateLimited(Duration),
    /// Too many failed attempts from this address.
    #[error("too many failed authentications")]
    Throttled(Duration),
    /// The token store is locked or down: the token may be valid, so never a 401.
    #[error("the token store is unavailable")]
    Unavailable(Duration),
}

impl AuthError {
    /// The outcome as the audit log names it.
    pub(crate) fn outcome(&self) -> &'static str {
        match self {
            AuthError::Missing => "refused: missing credential",
            AuthError::Invalid => "refused: invalid token",
            AuthError::BadRequest => "refused: malformed credentials",
            AuthError::Forbidden(_) => "refused: endpoint not granted",
            AuthError::RateLimited(_) => "refused: rate limited",
            AuthError::Throttled(_) => "refused: failure throttle",
            AuthError::Unavailable(_) => "refused: store unavailable",
        }
    }

    /// The HTTP status.
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            AuthError::Missing | AuthError::Invalid => StatusCode::UNAUTHORIZED,
            AuthError::BadRequest => StatusCode::BAD_REQUEST,
            AuthError::Forbidden(_) => StatusCode::FORBIDDEN,
            AuthError::RateLimited(_) | AuthError::Throttled(_) => StatusCode::TOO_MANY_REQUESTS,
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let (error, message, challenge) = match &self {
            AuthError::Missing => {
                ("unauthorized", "Missing bearer token".to_owned(), format!(r#"Bearer realm="{REALM}""#))
            }
            AuthError::Invalid => (
                "invalid_token",
                "Invalid token".to_owned(),
                format!(r#"Bearer realm="{REALM}", error="invalid_token""#),
            ),
            AuthError::BadRequest => (
                "invalid_request",
                "Exactly one credential is allowed: Authorization: Bearer <token> or X-API-Key".to_owned(),
                format!(r#"Bearer realm="{REALM}", error="invalid_request""#),
            ),
            AuthError::Forbidden(m) => {
                ("forbidden", m.clone(), format!(r#"Bearer realm="{REALM}", error="insufficient_scope""#))
            }
            AuthError::RateLimited(_) => ("rate_limited", "Too many requests".to_owned(), String::new()),
            AuthError::Throttled(_) => {
                ("too_many_failures", "Too many failed authentications from this address".to_owned(), String::new())
            }
            AuthError::Unavailable(_) => {
                ("unavailable", "The token store is unavailable; try again".to_owned(), String::new())
            }
        };
        let body = serde_json::json!({"error": error, "message": message}).to_string();
        let mut r = (self.status(), [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if !challenge.is_empty()
            && let Ok(v) = HeaderValue::from_str(&challenge)
        {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        if let AuthError::RateLimited(d) | AuthError::Throttled(d) | AuthError::Unavailable(d) = self {
            let secs = d.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

/// What an `Authorization` header value presents (RFC 7235 `credentials`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Presented<'a> {
    /// `Bearer <token68>`.
    Bearer(&'a str),
    /// The Bearer scheme with nothing after it.
    Empty,
    /// Another scheme (Basic, Digest, …).
    OtherScheme,
    /// Not `scheme SP credentials` at all, or a Bearer value that is not a token68.
    Malformed,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token68(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty() && body.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))
}

/// Parses an `Authorization` value: `scheme 1*SP token68`, scheme case-insensitive.
pub(crate) fn parse_authorization(value: &str) -> Presented<'_> {
    let v = value.trim_matches(|c| c == ' ' || c == '\t');
    let (scheme, rest) = match v.find(' ') {
        Some(i) => (&v[..i], v[i..].trim_start_matches(' ')),
        None => (v, ""),
    };
    if scheme.is_empty() || !scheme.bytes().all(is_tchar) {
        return if v.is_empty() { Presented::Empty } else { Presented::Malformed };
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Presented::OtherScheme;
    }
    if rest.is_empty() {
        return Presented::Empty;
    }
    if is_token68(rest) { Presented::Bearer(rest) } else { Presented::Malformed }
}

/// The one credential a request presents, per the presentation rules.
pub(crate) fn presented_credential(headers: &HeaderMap) -> Result<&str, AuthError> {
    let auth: Vec<&HeaderValue> = headers.get_all(header::AUTHORIZATION).iter().collect();
    let keys: Vec<&HeaderValue> = headers.get_all("x-api-key").iter().collect();
    if auth.len() + keys.len() > 1 {
        return Err(AuthError::BadRequest);
    }
    if let Some(v) = auth.first() {
        let v = v.to_str().map_err(|_| AuthError::BadRequest)?;
        return match parse_authorization(v) {
            Presented::Bearer(t) => Ok(t),
            Presented::Empty | Presented::OtherScheme => Err(AuthError::Missing),
            Presented::Malformed => Err(AuthError::BadRequest),
        };
    }
    if let Some(v) = keys.first() {
        let v = v.to_str().map_err(|_| AuthError::BadRequest)?.trim();
        return if v.is_empty() { Err(AuthError::Missing) } else { Ok(v) };
    }
    Err(AuthError::Missing)
}

/// An identity for a token: its grants narrowed to its tenant's servers and to the servers
/// whose `authTokens` name it.
fn identity_for(
    t: &TokenDef,
    cfg: &AuthConfig,
    servers: &[(String, Vec<String>)],
    issued: Option<(&str, &str)>,
) -> Arc<Identity> {
    let (token_id, key) = match issued {
        Some((id, lineage)) => (Some(id.to_owned()), format!("issued:{lineage}")),
        None => (None, format!("config:{}", t.name)),
    };
    let mut grants = t.grants.clone();
    let mut reachable: Vec<String> =
        servers.iter().filter(|(s, _)| grants.reaches(s)).map(|(s, _)| s.clone()).collect();
    if let Some(tenant) = &t.tenant {
        let own: Vec<&String> = cfg.tenants.get(tenant).map(|ns| ns.values().flatten().collect()).unwrap_or_default();
        reachable.retain(|s| own.contains(&s));
    }
    reachable.retain(|s| {
        servers.iter().find(|(n, _)| n == s).is_none_or(|(_, names)| names.is_empty() || names.contains(&t.name))
    });
    let restricted =
        t.tenant.is_some() || grants.servers.is_some() || servers.iter().any(|(_, names)| !names.is_empty());
    if restricted {
        grants.servers = Some(reachable.into_iter().collect());
    }
    Arc::new(Identity {
        name: t.name.as_str().into(),
        role: t.role,
        tenant: t.tenant.clone(),
        grants,
        expires: t.expires,
        token_id,
        key: key.into(),
        issuer: None,
        scopes: Box::default(),
        rate: t.rate.or(cfg.per_identity),
        bucket: Arc::default(),
    })
}

/// The OpenID scope for refresh tokens: an authorization server's business, never named by a
/// resource server's challenge or metadata (MCP 2026-07-28).
const OFFLINE_ACCESS: &str = "offline_access";

/// Per-address entries one shard keeps at most (16 shards: 65,536 addresses per table).
const ADDRESS_STATE_PER_SHARD: usize = 4096;

fn failures_stale(f: &Failures, limit: FailureLimit, now: Instant) -> bool {
    f.blocked_until.is_none_or(|u| now >= u) && now.duration_since(f.since) > limit.window
}

fn bucket_refilled(b: &Bucket, rate: Rate, now: Instant) -> bool {
    let per_sec = f64::from(rate.count) / rate.per.as_secs_f64();
    b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec >= f64::from(rate.count)
}

/// Failures seen from one address.
struct Failures {
    count: u32,
    since: Instant,
    blocked_until: Option<Instant>,
}

/// An issued token's row and the identity built from it (rebuilt when the row changes).
type StoreIdentity = (Arc<crate::store::StoredToken>, Arc<Identity>);

/// A verified access token: the token itself (a hit must be the same token, not only the same
/// hash), the identity it makes and the `aud` values it carries (checked again at each
/// endpoint it is used at).
type VerifiedToken = (Box<str>, Arc<Identity>, Arc<[String]>, SystemTime);

/// How long an introspection's answer is trusted before the provider is asked again (a token
/// revoked at the provider is refused within this).
const INTROSPECTION_TRUSTED_FOR: Duration = Duration::from_secs(60);

/// Verified access tokens one shard keeps at most (16 shards).
const VERIFIED_PER_SHARD: usize = 1024;

/// What authentication decided, or that it needs an issuer's keys fetched first.
enum Verdict {
    Done(Result<Arc<Identity>, AuthError>),
    /// An access token names a key its issuer's set (of this generation) does not hold.
    Refetch(Arc<crate::oauth::Provider>, u64),
    /// An opaque token no table knows: ask the issuer that introspects.
    Introspect(Arc<crate::oauth::Provider>, String),
}

/// The credential table and the limits, built from one config (rebuilt whole on reload).
pub struct Authenticator {
    cfg: AuthConfig,
    /// One per configured issuer (kept across reloads that leave it unchanged, keys and all).
    providers: Vec<Arc<crate::oauth::Provider>>,
    /// Access tokens already verified, by [`Authenticator::verified_hash`] (no pass over the
    /// whole token, as SHA-256 would be; the stored token is compared on a hit).
    verified: Sharded<u64, VerifiedToken>,
    verified_seed: u64,
    opaque_key: std::collections::hash_map::RandomState,
    servers: Vec<(String, Vec<String>)>,
    store: Option<Arc<crate::store::StoreView>>,
    store_identities: Sharded<String, StoreIdentity>,
    by_digest: HashMap<[u8; 32], Arc<Identity>>,
    by_name: HashMap<Arc<str>, Arc<Identity>>,
    anonymous: Option<Arc<Identity>>,
    per_address: Option<Rate>,
    addresses: Sharded<IpAddr, Bucket>,
    /// The rate buckets of access tokens' subjects, by identity key (an entry lives while an
    /// identity of the subject is cached).
    subjects: Sharded<Arc<str>, Arc<Mutex<Option<Bucket>>>>,
    failure_limit: FailureLimit,
    failures: Arc<Sharded<IpAddr, Failures>>,
    trusted: Vec<Cidr>,
    /// The limits held across replicas, when the config names a shared state.
    shared: Option<crate::limits::SharedLimits>,
}

impl Authenticator {
    /// Builds the table: each token's grants narrowed to its tenant's servers and to the
    /// servers whose `authTokens` name it (admins from the environment reach everything).
    /// Issued tokens come from `store` on demand.
    pub fn new(
        cfg: &AuthConfig,
        servers: &[(String, Vec<String>)],
        store: Option<Arc<crate::store::StoreView>>,
    ) -> Self {
        let mut by_digest = HashMap::new();
        let mut by_name = HashMap::new();
        for t in &cfg.tokens {
            let identity = identity_for(t, cfg, servers, None);
            by_name.insert(identity.name.clone(), identity.clone());
            by_digest.insert(t.digest, identity);
        }
        let providers = cfg.oauth.issuers.iter().map(|d| crate::oauth::Provider::new(Arc::new(d.clone()))).collect();
        Authenticator {
            anonymous: cfg.is_open().then(Identity::anonymous),
            providers,
            verified: Sharded::new(),
            opaque_key: std::collections::hash_map::RandomState::new(),
            verified_seed: {
                use std::hash::BuildHasher;
                std::collections::hash_map::RandomState::new().hash_one(0u8)
            },
            cfg: cfg.clone(),
            servers: servers.to_vec(),
            store,
            store_identities: Sharded::new(),
            by_digest,
            by_name,
            per_address: cfg.per_address,
            addresses: Sharded::new(),
            subjects: Sharded::new(),
            failure_limit: cfg.failures,
            failures: Arc::new(Sharded::new()),
            trusted: cfg.trusted_proxies.clone(),
            shared: None,
        }
    }

    /// Holds the rate limits and the failure throttle across the replicas sharing `state`.
    pub(crate) fn sharing(mut self, state: Option<Arc<crate::state::SharedState>>) -> Self {
        self.shared = state.map(crate::limits::SharedLimits::new);
        self
    }

    /// Returns the tokens of shared-limit leases gone idle (a few times a second).
    pub(crate) fn release_idle_leases(&self) {
        if let Some(shared) = &self.shared {
            shared.release_idle();
        }
    }

    /// The identity of an issued token (kept while the stored row is unchanged, so its rate
    /// bucket carries over).
    fn store_identity(&self, t: &Arc<crate::store::StoredToken>) -> Arc<Identity> {
        let mut cache = lock(self.store_identities.shard(&t.id));
        if let Some((row, identity)) = cache.get(&t.id)
            && (Arc::ptr_eq(row, t) || row == t)
        {
            return identity.clone();
        }
        let def = TokenDef {
            name: t.name.clone(),
            digest: [0; 32],
            role: t.role(),
            tenant: (!t.tenant.is_empty()).then(|| t.tenant.clone()),
            grants: t.grants.grants(),
            expires: t.ends_at().map(crate::store::to_system_time),
            rate: t.rate(),
            source: TokenSource::Issued,
        };
        let identity = identity_for(&def, &self.cfg, &self.servers, Some((&t.id, &t.lineage)));
        cache.insert(t.id.clone(), (t.clone(), identity.clone()));
        identity
    }

    /// The grants a token with these lists would have here: narrowed to its tenant's servers
    /// and to the servers whose `authTokens` name it (what the management API compares).
    pub(crate) fn effective_grants(&self, name: &str, tenant: Option<&str>, grants: Grants) -> Grants {
        let def = TokenDef {
            name: name.to_owned(),
            digest: [0; 32],
            role: Role::User,
            tenant: tenant.filter(|t| !t.is_empty()).map(str::to_owned),
            grants,
            expires: None,
            rate: None,
            source: TokenSource::Issued,
        };
        identity_for(&def, &self.cfg, &self.servers, None).grants.clone()
    }

    /// Whether an issued token's lineage is still usable (for open sessions): the token, or
    /// the token that replaced it by rotation, and so on. None when the store cannot say.
    pub(crate) fn store_token_usable(&self, id: &str) -> Option<bool> {
        let store = self.store.as_ref()?;
        let now = crate::store::now_ms();
        let mut id = id.to_owned();
        for _ in 0..64 {
            match store.token(&id) {
                Ok(Some(t)) if t.usable(now) => return Some(self.stored_kind_on(&t)),
                Ok(Some(t)) if t.revoked_at.is_none() => match &t.superseded_by {
                    Some(next) => id = next.clone(),
                    None => return Some(false),
                },
                Ok(_) => return Some(false),
                Err(_) => return None,
            }
        }
        Some(false)
    }

    /// Whether this config takes a stored token of its kind (one rule for requests and for the
    /// sessions the sweep keeps): an access token of Portcullis' authorization server (it
    /// has a client and an audience) while that server is on; any other issued token while
    /// issued tokens are on.
    fn stored_kind_on(&self, t: &crate::store::StoredToken) -> bool {
        match (&t.client_id, &t.audience) {
            (Some(_), Some(_)) => self.cfg.oauth.server.is_some(),
            (None, None) => !self.cfg.issued_off,
            _ => false,
        }
    }

    /// The client's address: the peer, or when the peer is a trusted proxy, the nearest
    /// untrusted address in `X-Forwarded-For`.
    pub(crate) fn client_addr(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.ip();
        if !self.trusted.iter().any(|c| c.contains(peer)) {
            return peer;
        }
        let hops: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|h| h.trim().parse::<IpAddr>().ok())
            .collect();
        hops.iter()
            .rev()
            .find(|ip| !self.trusted.iter().any(|c| c.contains(**ip)))
            .or(hops.first())
            .copied()
            .unwrap_or(peer)
    }

    /// How many addresses the per-address tables hold (failure counts, rate buckets).
    pub fn address_state_len(&self) -> (usize, usize) {
        (self.failures.len(), self.addresses.len())
    }

    /// Whether an address is a trusted proxy.
    pub(crate) fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(ip))
    }

    /// Authenticates a request from `client`: its one credential, else a verified client
    /// certificate whose subject names a configured identity. (Access tokens from identity
    /// providers are accepted by [`Authenticator::authenticate_at`], which knows the endpoint.)
    pub fn authenticate(&self, headers: &HeaderMap, client: IpAddr) -> Result<Arc<Identity>, AuthError> {
        match self.decide(headers, client, None) {
            Verdict::Done(r) => r,
            Verdict::Refetch(..) | Verdict::Introspect(..) => Err(self.failed(client).unwrap_or(AuthError::Invalid)),
        }
    }

    /// Authenticates a request for an MCP endpoint: as [`Authenticator::authenticate`], and an
    /// access token of a configured issuer, issued for this endpoint. A token naming a key its
    /// issuer's set lacks has the set fetched again (at most once per 30 s) and is checked once
    /// more.
    pub async fn authenticate_at(
        &self,
        headers: &HeaderMap,
        client: IpAddr,
        at: &crate::oauth::Endpoint,
    ) -> Result<Arc<Identity>, AuthError> {
        match self.decide(headers, client, Some(at)) {
            Verdict::Done(r) => r,
            Verdict::Refetch(provider, seen) => {
                if !provider.refetch_for_unknown_key(seen).await {
                    return Err(self.failed(client).unwrap_or(AuthError::Invalid));
                }
                match self.decide(headers, client, Some(at)) {
                    Verdict::Done(r) => r,
                    Verdict::Refetch(..) | Verdict::Introspect(..) => {
                        Err(self.failed(client).unwrap_or(AuthError::Invalid))
                    }
                }
            }
            Verdict::Introspect(provider, token) => match provider.introspect(&token).await {
                Ok(Some(claims)) => match self.introspected(&provider, &token, &claims, at) {
                    Some(identity) => Ok(identity),
                    None => Err(self.failed(client).unwrap_or(AuthError::Invalid)),
                },
                Ok(None) => Err(self.failed(client).unwrap_or(AuthError::Invalid)),
                Err(e) => {
                    // The provider cannot say: the token may be valid, so never a 401.
                    tracing::warn!(issuer = %provider.def.issuer, error = %e, "token introspection failed");
                    Err(AuthError::Unavailable(Duration::from_secs(1)))
                }
            },
        }
    }

    /// The identity of an opaque token the provider called active, when it is for this
    /// endpoint; cached for [`INTROSPECTION_TRUSTED_FOR`] at most.
    fn introspected(
        &self,
        provider: &Arc<crate::oauth::Provider>,
        token: &str,
        claims: &crate::oauth::jwt::Claims,
        at: &crate::oauth::Endpoint,
    ) -> Option<Arc<Identity>> {
        let def = &provider.def;
        let names = || self.servers.iter().map(|(s, _)| s.as_str());
        let auds: Arc<[String]> = claims.aud.values().into_iter().map(str::to_owned).collect();
        if !auds.iter().any(|a| at.accepts(a, self.cfg.oauth.resources, names(), &def.audiences)) {
            tracing::debug!(issuer = %def.issuer, "introspected token refused: issued for another audience");
            return None;
        }
        let identity = self.token_identity(def, claims)?;
        let now = SystemTime::now();
        if identity.expired(now) {
            return None;
        }
        let until = identity.expires.map_or(now, |e| e.min(now + INTROSPECTION_TRUSTED_FOR));
        self.remember(token, &identity, auds, until);
        Some(identity)
    }

    /// Caches a verified token until `until`, within the cache's bound.
    fn remember(&self, token: &str, identity: &Arc<Identity>, auds: Arc<[String]>, until: SystemTime) {
        let now = SystemTime::now();
        let h = self.verified_hash(token);
        let mut cache = lock(self.verified.shard(&h));
        if cache.len() >= VERIFIED_PER_SHARD {
            cache.retain(|_, (_, _, _, u)| *u > now);
            if cache.len() >= VERIFIED_PER_SHARD {
                cache.clear();
            }
        }
        cache.insert(h, (token.into(), identity.clone(), auds, until));
    }

    /// Whether access tokens of identity providers are accepted.
    pub(crate) fn has_issuers(&self) -> bool {
        !self.providers.is_empty()
    }

    /// Portcullis' own authorization server, when on.
    pub(crate) fn authorization_server(&self) -> Option<&crate::credentials::AuthorizationServerDef> {
        self.cfg.oauth.server.as_ref()
    }

    /// Whether the MCP endpoints are OAuth protected resources (identity providers, or
    /// Portcullis' own authorization server): their tokens are checked for the endpoint, their
    /// refusals name the metadata.
    pub(crate) fn is_protected_resource(&self) -> bool {
        self.has_issuers() || self.cfg.oauth.server.is_some()
    }

    /// The identity providers, in config order.
    pub(crate) fn providers(&self) -> &[Arc<crate::oauth::Provider>] {
        &self.providers
    }

    /// Takes over the providers of `old` whose configuration is unchanged (their keys with
    /// them), so a reload neither refetches nor forgets keys.
    pub(crate) fn adopt_providers(&mut self, old: &Authenticator) {
        for p in &mut self.providers {
            if let Some(o) = old.providers.iter().find(|o| o.def == p.def) {
                *p = o.clone();
            }
        }
    }

    /// Starts fetching the keys of providers not started yet.
    pub(crate) fn start_providers(&self) {
        for p in &self.providers {
            p.start();
        }
    }

    /// Whether an access token's issuer is configured as it was when the token was checked
    /// (a reload that removes or changes it ends the sessions of its tokens).
    pub(crate) fn issuer_current(&self, def: &crate::credentials::IssuerDef) -> bool {
        self.providers.iter().any(|p| *p.def == *def)
    }

    /// The scopes that reach a server (all of them for the aggregated endpoint), by issuer: what
    /// a challenge asks for and the metadata lists (never `offline_access`, which a resource
    /// server does not ask for).
    pub(crate) fn scopes_for(&self, server: Option<&str>) -> Vec<String> {
        let mut out: Vec<String> = self
            .providers
            .iter()
            .flat_map(|p| p.def.scopes.iter())
            .filter(|(name, g)| server.is_none_or(|s| g.reaches(s)) && *name != OFFLINE_ACCESS)
            .map(|(name, _)| name.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The scopes an access token should come back with to reach an item it was refused
    /// (`insufficient_scope`): the scopes it has and the narrowest of its issuer's scopes that
    /// grant the item (a scope is left out when it covers another that grants it: the broader
    /// implies the narrower). None when it is not an access token, no scope grants the item, or
    /// its tenant keeps it from the server: that refusal stays an unknown name.
    pub(crate) fn step_up(&self, identity: &Identity, kind: GrantKind, server: &str, name: &str) -> Option<String> {
        let def = identity.issuer.as_ref()?;
        if let Some(t) = &identity.tenant
            && !self.cfg.tenants.get(t).is_some_and(|ns| ns.values().flatten().any(|s| s == server))
        {
            return None;
        }
        let sep = &self.cfg.oauth.separator;
        let granting: Vec<(&String, &Grants)> =
            def.scopes.iter().filter(|(_, g)| g.allows(kind, server, sep, name)).collect();
        let narrowest = granting.iter().filter(|(_, g)| {
            !granting.iter().any(|(_, other)| !std::ptr::eq(*g, *other) && g.covers(other) && !other.covers(g))
        });
        let mut out: Vec<&str> = identity.scopes.iter().map(String::as_str).filter(|s| *s != OFFLINE_ACCESS).collect();
        let before = out.len();
        out.extend(narrowest.map(|(s, _)| s.as_str()).filter(|s| *s != OFFLINE_ACCESS));
        if out.len() == before {
            return None;
        }
        out.sort_unstable();
        out.dedup();
        Some(out.join(" "))
    }

    fn decide(&self, headers: &HeaderMap, client: IpAddr, at: Option<&crate::oauth::Endpoint>) -> Verdict {
        if let Some(anon) = &self.anonymous {
            match self.store.as_ref().map(|s| s.state()) {
                None | Some(crate::store::StoreState::Empty) => return Verdict::Done(Ok(anon.clone())),
                // The store's tokens may be the only credentials: nobody can be confirmed.
                Some(crate::store::StoreState::Unavailable) => {
                    return Verdict::Done(Err(AuthError::Unavailable(Duration::from_secs(1))));
                }
                Some(crate::store::StoreState::HasTokens) => {}
            }
        }
        let presented = presented_credential(headers);
        if presented == Err(AuthError::Missing)
            && let Some(subject) = headers.get(CLIENT_SUBJECT_HEADER).and_then(|v| v.to_str().ok())
        {
            return Verdict::Done(match self.by_name.get(subject) {
                Some(identity) if !identity.expired(SystemTime::now()) => Ok(identity.clone()),
                _ => Err(self.failed(client).unwrap_or(AuthError::Invalid)),
            });
        }
        let mut refetch = None;
        let mut introspect = None;
        let introspector = self.providers.iter().find(|p| p.def.introspection.is_some());
        let found = presented.and_then(|secret| {
            let jwt = !self.providers.is_empty() && crate::oauth::jwt::looks_like_jwt(secret);
            // A known access token: no digest, no signature, no introspection.
            if (jwt || introspector.is_some())
                && let Some(at) = at
                && let Some(known) = self.verified_hit(secret, at)
            {
                return known;
            }
            let d = digest(secret);
            let identity = match self.by_digest.get(&d) {
                Some(i) => i.clone(),
                None if jwt => {
                    let Some(at) = at else { return Err(AuthError::Invalid) };
                    match self.access_token(secret, at) {
                        Ok(identity) => identity,
                        Err(Some(pending)) => {
                            refetch = Some(pending);
                            return Err(AuthError::Invalid);
                        }
                        Err(None) => return Err(AuthError::Invalid),
                    }
                }
                None => {
                    // Neither ours nor a known issuer's JWT: an issuer that introspects decides
                    // (never about a token in Portcullis' own format: no secret of ours, or a
                    // near miss of one, is shown to a provider).
                    let unknown = |introspect: &mut Option<_>| {
                        if let (Some(p), Some(_)) = (introspector, at)
                            && !secret.starts_with(crate::store::SECRET_PREFIX)
                        {
                            *introspect = Some((p.clone(), secret.to_owned()));
                        }
                        Err(AuthError::Invalid)
                    };
                    let own_server = self.cfg.oauth.server.is_some();
                    if self.cfg.issued_off && !own_server {
                        return unknown(&mut introspect);
                    }
                    let Some(store) = self.store.as_ref() else { return unknown(&mut introspect) };
                    let now = crate::store::now_ms();
                    match store.lookup(&d) {
                        Ok(Some(t)) if t.usable(now) => {
                            // An access token of Portcullis' own authorization server is
                            // accepted only at the resource it was issued for.
                            let names = || self.servers.iter().map(|(s, _)| s.as_str());
                            let at_its_resource = t.audience.as_deref().is_none_or(|aud| {
                                at.is_some_and(|at| at.accepts(aud, self.cfg.oauth.resources, names(), &[]))
                            });
                            if !self.stored_kind_on(&t) || !at_its_resource {
                                return Err(AuthError::Invalid);
                            }
                            store.used(&t.id, now);
                            self.store_identity(&t)
                        }
                        Ok(None) => return unknown(&mut introspect),
                        Ok(_) => return Err(AuthError::Invalid),
                        Err(e) => {
                            tracing::warn!(error = %e, "token store unavailable");
                            return Err(AuthError::Unavailable(Duration::from_secs(1)));
                        }
                    }
                }
            };
            if identity.expired(SystemTime::now()) {
                return Err(AuthError::Invalid);
            }
            Ok(identity)
        });
        if let Some((provider, seen)) = refetch {
            return Verdict::Refetch(provider, seen);
        }
        if let Some((provider, token)) = introspect {
            return Verdict::Introspect(provider, token);
        }
        Verdict::Done(match found {
            Ok(identity) => Ok(identity),
            // No credential at all is not a guess: it gets the 401 challenge that starts the
            // authorization flow, and is not counted by the failure throttle.
            Err(e @ (AuthError::Unavailable(_) | AuthError::Missing)) => Err(e),
            Err(e) => Err(self.failed(client).unwrap_or(e)),
        })
    }

    /// A verified access token's identity for `at`: None when the token is not in the cache;
    /// refused when it has expired or is not for this endpoint.
    fn verified_hit(&self, token: &str, at: &crate::oauth::Endpoint) -> Option<Result<Arc<Identity>, AuthError>> {
        let h = self.verified_hash(token);
        let (identity, auds, until) = {
            let shard = lock(self.verified.shard(&h));
            let (t, identity, auds, until) = shard.get(&h)?;
            if **t != *token {
                return None;
            }
            (identity.clone(), auds.clone(), *until)
        };
        // Past its trust (an introspection's answer ages): check it again.
        if !identity.expired(SystemTime::now()) && SystemTime::now() >= until {
            return None;
        }
        let def = identity.issuer.as_ref()?;
        let binding = self.cfg.oauth.resources;
        let names = || self.servers.iter().map(|(s, _)| s.as_str());
        if identity.expired(SystemTime::now()) || !auds.iter().any(|a| at.accepts(a, binding, names(), &def.audiences))
        {
            return Some(Err(AuthError::Invalid));
        }
        Some(Ok(identity))
    }

    /// The cache key of an access token: the first 16 characters of its signature (which the
    /// provider's key makes unpredictable), folded. Only verified tokens are cached and a hit
    /// is compared with the whole token, so a token made to collide only misses (and is then
    /// verified like any other).
    fn verified_hash(&self, token: &str) -> u64 {
        if !crate::oauth::jwt::looks_like_jwt(token) {
            // An opaque token may start with a fixed prefix: hash all of it, keyed.
            use std::hash::BuildHasher;
            return self.opaque_key.hash_one(token);
        }
        let sig = token.rsplit('.').next().unwrap_or(token).as_bytes();
        let mut word = [0u8; 16];
        let n = sig.len().min(16);
        word[..n].copy_from_slice(&sig[..n]);
        let (a, b) = word.split_at(8);
        let fold = |w: &[u8]| u64::from_le_bytes(w.try_into().unwrap_or_default());
        fold(a) ^ fold(b).rotate_left(29) ^ self.verified_seed
    }

    /// An access token for `at`, verified now against its issuer's keys (and then cached).
    /// `Err(Some(provider))` when its key id is not in the issuer's set (fetch and retry).
    fn access_token(
        &self,
        token: &str,
        at: &crate::oauth::Endpoint,
    ) -> Result<Arc<Identity>, Option<(Arc<crate::oauth::Provider>, u64)>> {
        let now = SystemTime::now();
        let iss = crate::oauth::jwt::claimed_issuer(token).map_err(|_| None)?;
        let provider = self.providers.iter().find(|p| p.def.issuer == iss).ok_or(None)?;
        let def = &provider.def;
        let audiences = at.audiences(self.cfg.oauth.resources, self.servers.iter().map(|(s, _)| s.as_str()), def);
        let policy = crate::oauth::jwt::Policy {
            issuer: &def.issuer,
            audiences: &audiences,
            algorithms: &def.algorithms,
            leeway: def.leeway,
            require_at_jwt: def.require_at_jwt,
        };
        let keys = provider.keys();
        let claims = match crate::oauth::jwt::verify(token, &policy, &keys) {
            Ok(c) => c,
            Err(crate::oauth::jwt::JwtError::UnknownKey(_)) => return Err(Some((provider.clone(), keys.generation))),
            Err(e) => {
                tracing::debug!(issuer = %def.issuer, reason = %e, "access token refused");
                return Err(None);
            }
        };
        let Some(identity) = self.token_identity(def, &claims) else {
            tracing::debug!(issuer = %def.issuer, "access token refused: its sub is not a name");
            return Err(None);
        };
        let auds: Arc<[String]> = claims.aud.values().into_iter().map(str::to_owned).collect();
        self.remember(token, &identity, auds, identity.expires.unwrap_or(now));
        Ok(identity)
    }

    /// The identity an access token makes: named by the issuer's identity claim (else `sub`),
    /// keyed by issuer and subject, reaching what its scopes grant (narrowed to its tenant's
    /// servers), with the role and tenant its groups map to, ending at its expiry. None when its
    /// groups name two tenants, or when `sub` is not a name (visible characters, 1 to 128; a claim that is not one falls
    /// back to `sub`): a claim never puts control characters into a log line or `/stats`.
    pub(crate) fn token_identity(
        &self,
        def: &Arc<crate::credentials::IssuerDef>,
        claims: &crate::oauth::jwt::Claims,
    ) -> Option<Arc<Identity>> {
        let named = |v: &str| crate::credentials::check_name(v).is_ok().then(|| v.to_owned());
        let sub = named(&claims.sub)?;
        let name =
            claims.other.get(def.identity_claim.as_str()).and_then(|v| v.as_str()).and_then(named).unwrap_or(sub);
        // It ends where verification would stop accepting it: `exp` plus the leeway. An `exp`
        // past what the clock can hold is no expiry Portcullis can keep.
        let expires = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(claims.exp))?.checked_add(def.leeway)?;
        let scopes = claims.scopes();
        let mapped: Box<[String]> = def.scopes.keys().filter(|s| scopes.contains(&s.as_str())).cloned().collect();
        let parts: Vec<&Grants> = mapped.iter().filter_map(|s| def.scopes.get(s)).collect();
        let mut grants = Grants::union(&parts, &self.cfg.oauth.separator);
        // Groups (or roles) give a role and a tenant; groups of two tenants refuse the token.
        let groups: Vec<&str> = match claims.other.get(def.groups_claim.as_str()) {
            Some(serde_json::Value::String(g)) => vec![g.as_str()],
            Some(serde_json::Value::Array(gs)) => gs.iter().filter_map(|g| g.as_str()).collect(),
            _ => Vec::new(),
        };
        let roles: Vec<Role> = groups.iter().filter_map(|g| def.roles.get(*g).copied()).collect();
        let role = if roles.contains(&Role::Admin) {
            Role::Admin
        } else if roles.contains(&Role::Metrics) {
            Role::Metrics
        } else {
            Role::User
        };
        let mut tenants: Vec<&String> = groups.iter().filter_map(|g| def.tenants.get(*g)).collect();
        tenants.sort();
        tenants.dedup();
        if tenants.len() > 1 {
            return None;
        }
        let tenant = tenants.first().map(|t| (*t).clone());
        if let Some(t) = &tenant {
            let own: Vec<&String> =
                self.cfg.tenants.get(t).map(|ns| ns.values().flatten().collect()).unwrap_or_default();
            let reachable = self.servers.iter().map(|(s, _)| s).filter(|s| grants.reaches(s) && own.contains(s));
            grants.servers = Some(reachable.cloned().collect());
        }
        let key: Arc<str> = format!("oauth:{}#{}", claims.iss, claims.sub).into();
        // Rate limits count per subject, across its tokens (a client that fetches a new token
        // per request gains nothing).
        let bucket = lock(self.subjects.shard(&key)).entry(key.clone()).or_default().clone();
        Some(Arc::new(Identity {
            name: name.into(),
            role,
            tenant,
            grants,
            expires: Some(expires),
            token_id: None,
            key,
            issuer: Some(def.clone()),
            scopes: mapped,
            rate: self.cfg.per_identity,
            bucket,
        }))
    }

    /// Drops per-address state that no longer says anything: failure counts whose window and
    /// block have passed, and rate buckets that have refilled (a fresh bucket is the same).
    pub(crate) fn prune(&self) {
        let now = Instant::now();
        let limit = self.failure_limit;
        self.failures.retain(|_, f| !failures_stale(f, limit, now));
        if let Some(rate) = self.per_address {
            self.addresses.retain(|_, b| !bucket_refilled(b, rate, now));
        }
        // A subject none of whose identities is cached any more (only this map holds it).
        self.subjects.retain(|_, b| Arc::strong_count(b) > 1);
    }

    /// Counts a failure from an address; the throttle's refusal when it is over the limit.
    fn failed(&self, client: IpAddr) -> Option<AuthError> {
        let now = Instant::now();
        let limit = self.failure_limit;
        let mut map = lock(self.failures.shard(&client));
        if map.len() >= ADDRESS_STATE_PER_SHARD && !map.contains_key(&client) {
            map.retain(|_, f| !failures_stale(f, limit, now));
            if map.len() >= ADDRESS_STATE_PER_SHARD {
                // Still full of live entries: forget the one whose block ends first (or an
                // unblocked one), never grow past the bound.
                let victim = map.iter().min_by_key(|(_, f)| f.blocked_until.unwrap_or(f.since)).map(|(k, _)| *k);
                if let Some(v) = victim {
                    map.remove(&v);
                }
            }
        }
        let f = map.entry(client).or_insert(Failures { count: 0, since: now, blocked_until: None });
        if let Some(until) = f.blocked_until {
            if now < until {
                return Some(AuthError::Throttled(until - now));
            }
            *f = Failures { count: 0, since: now, blocked_until: None };
        }
        if now.duration_since(f.since) > limit.window {
            f.count = 0;
            f.since = now;
        }
        f.count += 1;
        if f.count > limit.max {
            f.blocked_until = Some(now + limit.block);
            return Some(AuthError::Throttled(limit.block));
        }
        drop(map);
        if let Some(shared) = &self.shared {
            // Counted on every replica too; a block made anywhere holds here from the next
            // failure on.
            let failures = self.failures.clone();
            shared.report_failure(client, limit, move |left| {
                let until = Instant::now() + left;
                let mut map = lock(failures.shard(&client));
                let f = map.entry(client).or_insert(Failures { count: 0, since: Instant::now(), blocked_until: None });
                if f.blocked_until.is_none_or(|u| u < until) {
                    f.blocked_until = Some(until);
                }
            });
        }
        None
    }

    /// Applies the per-address and per-identity rates: this replica's count, then, with a
    /// shared state, the count across replicas (which Redis being away leaves to this one).
    pub async fn check_rate(&self, identity: &Identity, client: IpAddr) -> Result<(), AuthError> {
        let now = Instant::now();
        if let Some(rate) = self.per_address {
            {
                let mut map = lock(self.addresses.shard(&client));
                if map.len() >= ADDRESS_STATE_PER_SHARD && !map.contains_key(&client) {
                    map.retain(|_, b| !bucket_refilled(b, rate, now));
                    if map.len() >= ADDRESS_STATE_PER_SHARD {
                        // Forget the fullest bucket: the address that lost least by it.
                        let victim = map.iter().max_by(|a, b| a.1.tokens.total_cmp(&b.1.tokens)).map(|(k, _)| *k);
                        if let Some(v) = victim {
                            map.remove(&v);
                        }
                    }
                }
                map.entry(client)
                    .or_insert_with(|| Bucket::full(rate))
                    .take(rate, now)
                    .map_err(AuthError::RateLimited)?;
            }
            if let Some(shared) = &self.shared
                && let Some(Err(wait)) = shared.take(crate::limits::LimitKey::Address(client), rate).await
            {
                if let Some(b) = lock(self.addresses.shard(&client)).get_mut(&client) {
                    b.give_back(rate);
                }
                return Err(AuthError::RateLimited(wait));
            }
        }
        if let Some(rate) = identity.rate {
            lock(&identity.bucket)
                .get_or_insert_with(|| Bucket::full(rate))
                .take(rate, now)
                .map_err(AuthError::RateLimited)?;
            if let Some(shared) = &self.shared
                && let Some(Err(wait)) =
                    shared.take(crate::limits::LimitKey::Identity(identity.key.clone()), rate).await
            {
                if let Some(b) = lock(&identity.bucket).as_mut() {
                    b.give_back(rate);
                }
                return Err(AuthError::RateLimited(wait));
            }
        }
        Ok(())
    }

    /// The current identity of a name (None once removed by a reload).
    pub(crate) fn current(&self, name: &str) -> Option<Arc<Identity>> {
        match &self.anonymous {
            Some(a) if &*a.name == name => Some(a.clone()),
            _ => self.by_name.get(name).cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn presentation_rules() {
        assert_eq!(presented_credential(&headers(&[("authorization", "Bearer abc")])), Ok("abc"));
        assert_eq!(presented_credential(&headers(&[("authorization", "bEaReR   abc")])), Ok("abc"));
        assert_eq!(presented_credential(&headers(&[("x-api-key", "abc")])), Ok("abc"));
        assert_eq!(presented_credential(&headers(&[])), Err(AuthError::Missing));
        assert_eq!(presented_credential(&headers(&[("authorization", "Basic dXNlcjpwYXNz")])), Err(AuthError::Missing));
        assert_eq!(presented_credential(&headers(&[("authorization", "Bearer")])), Err(AuthError::Missing));
        assert_eq!(presented_credential(&headers(&[("x-api-key", "")])), Err(AuthError::Missing));
        assert_eq!(
            presented_credential(&headers(&[("authorization", "Bearer a"), ("x-api-key", "a")])),
            Err(AuthError::BadRequest)
        );
        assert_eq!(
            presented_credential(&headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")])),
            Err(AuthError::BadRequest)
        );
        assert_eq!(presented_credential(&headers(&[("authorization", "Bearer a b")])), Err(AuthError::BadRequest));
    }

    #[test]
    fn rates_and_cidrs() {
        assert_eq!(Rate::parse("100/min"), Ok(Rate { count: 100, per: Duration::from_secs(60) }));
        assert_eq!(Rate::parse("5/10s"), Ok(Rate { count: 5, per: Duration::from_secs(10) }));
        assert!(Rate::parse("0/s").is_err() && Rate::parse("fast").is_err());
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()) && !c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(Cidr::parse("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains("8.8.8.8".parse().unwrap()));
        let mut b = Bucket::full(Rate { count: 2, per: Duration::from_secs(60) });
        let now = Instant::now();
        assert!(b.take(Rate { count: 2, per: Duration::from_secs(60) }, now).is_ok());
        assert!(b.take(Rate { count: 2, per: Duration::from_secs(60) }, now).is_ok());
        assert!(b.take(Rate { count: 2, per: Duration::from_secs(60) }, now).is_err());
    }

    /// An independent reading of RFC 7235 §2.1 / RFC 6750 §2.1 for the Bearer scheme.
    fn oracle(v: &str) -> Presented<'_> {
        let v = v.trim_matches([' ', '\t']);
        if v.is_empty() {
            return Presented::Empty;
        }
        let mut parts = v.splitn(2, ' ');
        let scheme = parts.next().unwrap_or("");
        let rest = parts.next().unwrap_or("").trim_start_matches(' ');
        let tchar = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if !scheme.chars().all(tchar) {
            return Presented::Malformed;
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Presented::OtherScheme;
        }
        if rest.is_empty() {
            return Presented::Empty;
        }
        let body = rest.trim_end_matches('=');
        let t68 = |c: char| c.is_ascii_alphanumeric() || "-._~+/".contains(c);
        if !body.is_empty() && body.chars().all(t68) { Presented::Bearer(rest) } else { Presented::Malformed }
    }

    proptest! {
        #[test]
        fn authorization_parser_agrees_with_the_rfc_oracle(v in "[ \tBbEeAaRrSsIiCc:=/+._~a-z0-9-]{0,24}") {
            prop_assert_eq!(parse_authorization(&v), oracle(&v));
        }

        #[test]
        fn bearer_tokens_round_trip(scheme in "(?i)bearer", token in "[A-Za-z0-9._~+/-]{1,20}=*", sp in " {1,3}") {
            let v = format!("{scheme}{sp}{token}");
            prop_assert_eq!(parse_authorization(&v), Presented::Bearer(&token));
        }
    }
}
