//! Credentials as validated from the config file or the token store, before anything runs:
//! roles, rates, address ranges, the failure limit, token definitions and their digests.
//!
//! Invariants: this module depends on nothing of the runtime (no I/O, no HTTP, no store), so
//! `config` and `store` can build these values and `auth` can use them without a cycle; a
//! `TokenDef` holds a digest, never a secret, and its `Debug` shows neither.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::authz::Grants;

/// A value written in a config file, a command line or an API request that does not read as
/// what it should be. Always the writer's fault (a 400 at an API, an error in `check`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ValueError {
    /// Not a role.
    #[error("unknown role {0:?} (user, admin, metrics)")]
    Role(String),
    /// Not a rate.
    #[error("invalid rate {0:?}: write it as 100/min, 10/s or 5000/h")]
    Rate(String),
    /// Not an address or a range.
    #[error("invalid address range {0:?}: write it as 10.0.0.0/8 or 127.0.0.1")]
    Cidr(String),
    /// A name of no characters, or too many.
    #[error("the name must be 1 to {MAX_NAME_CHARS} characters")]
    NameLength,
    /// A name with an invisible character or a space.
    #[error("the name may not contain {0:?} (visible characters only, no spaces)")]
    NameChar(char),
    /// Not a duration.
    #[error("invalid duration {text:?}: {reason}")]
    Duration {
        /// As written.
        text: String,
        /// What `humantime` said.
        reason: String,
    },
    /// A duration longer than [`MAX_SPAN`].
    #[error("duration {0:?} is longer than 100 years")]
    TooLong(String),
    /// Not a listen address.
    #[error("{0:?} is not an address such as 127.0.0.1:8080, localhost:8080, :8080 or 8080")]
    Listen(String),
}

/// Parses `30s`, `5m`, `1h30m`, `250ms`, `2d`.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    humantime::parse_duration(text.trim())
        .map_err(|e| ValueError::Duration { text: text.to_owned(), reason: e.to_string() })
}

/// A duration of at most [`MAX_SPAN`] (a time to live, a rotation's grace).
pub(crate) fn parse_span(text: &str) -> Result<Duration, ValueError> {
    let d = parse_duration(text)?;
    if d > MAX_SPAN {
        return Err(ValueError::TooLong(text.to_owned()));
    }
    Ok(d)
}

/// The longest duration Portcullis takes anywhere (a limit, a token's time to live, a
/// rotation's grace): 100 years. Longer is refused, never read as "never" or left to overflow.
pub(crate) const MAX_SPAN: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// What an identity may administer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// MCP traffic only.
    #[default]
    User,
    /// Also the management API (`/servers*`, `/stats`, `/metrics`, `/admin/*`).
    Admin,
    /// `GET /metrics` and `GET /stats` and nothing else (no MCP, no management): for scrapers.
    Metrics,
}

impl Role {
    /// A role by name (`user`, `admin` or `metrics`; none is `user`).
    pub(crate) fn parse(name: Option<&str>) -> Result<Role, ValueError> {
        match name {
            None | Some("user") => Ok(Role::User),
            Some("admin") => Ok(Role::Admin),
            Some("metrics") => Ok(Role::Metrics),
            Some(other) => Err(ValueError::Role(other.to_owned())),
        }
    }

    /// Its name, as [`Role::parse`] reads it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
            Role::Metrics => "metrics",
        }
    }
}

/// The only requests a `metrics` credential may make (the gate's labels for them).
pub(crate) const METRICS_REQUESTS: &[&str] = &["GET /metrics", "GET /stats"];

/// A rate: `count` requests per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests allowed per period (also the burst).
    pub count: u32,
    /// The period.
    pub per: Duration,
}

impl Rate {
    /// Parses `100/min`, `10/s`, `5000/h`, `20/10s`.
    pub(crate) fn parse(s: &str) -> Result<Rate, ValueError> {
        let bad = || ValueError::Rate(s.to_owned());
        let (n, per) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        let per = match per.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            "d" | "day" => Duration::from_secs(86_400),
            other => humantime::parse_duration(other).map_err(|_| bad())?,
        };
        if count == 0 || per.is_zero() {
            return Err(bad());
        }
        Ok(Rate { count, per })
    }
}

impl std::fmt::Display for Rate {
    /// As people write it (`5/min`, `10/s`, `5000/h`, `1/d`, `20/10s`); [`Rate::parse`] reads it back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.per.as_secs() {
            1 if self.per.subsec_nanos() == 0 => write!(f, "{}/s", self.count),
            60 if self.per.subsec_nanos() == 0 => write!(f, "{}/min", self.count),
            3600 if self.per.subsec_nanos() == 0 => write!(f, "{}/h", self.count),
            86_400 if self.per.subsec_nanos() == 0 => write!(f, "{}/d", self.count),
            _ => write!(f, "{}/{}", self.count, humantime::format_duration(self.per)),
        }
    }
}

/// An address range, `10.0.0.0/8` or `::1/128` (a bare address is a /32 or /128).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses a CIDR or a bare address.
    pub(crate) fn parse(s: &str) -> Result<Cidr, ValueError> {
        let bad = || ValueError::Cidr(s.to_owned());
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().map_err(|_| bad())?, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s.trim().parse::<IpAddr>().map_err(|_| bad())?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { addr, prefix })
    }

    /// Whether an address is in the range.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Where a credential comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenSource {
    /// `PORTCULLIS_TOKEN` / `PORTCULLIS_TOKENS`.
    Env,
    /// The config file (`auth.tokens`, `api_key`, MCP Front's `proxy.auth`).
    #[default]
    File,
    /// `serve --generate-token`: lives as long as the process, whatever the file says. Only
    /// `cli` sets it; no config entry can.
    Generated,
    /// An issued token from the store.
    Issued,
}

/// The longest token name or tenant name, in characters.
pub(crate) const MAX_NAME_CHARS: usize = 128;

/// Whether a character prints as itself anywhere (terminal, audit line, log): a visible ASCII
/// character, or a letter or digit of any script. Not a space, a control or a formatting
/// character (ESC, NUL, BEL, U+202E, …).
pub(crate) fn is_visible(c: char) -> bool {
    c.is_ascii_graphic() || (!c.is_ascii() && c.is_alphanumeric())
}

/// A token or tenant name that can be printed anywhere as it is: 1 to [`MAX_NAME_CHARS`]
/// characters, each [`is_visible`].
pub(crate) fn check_name(name: &str) -> Result<(), ValueError> {
    let n = name.chars().count();
    if n == 0 || n > MAX_NAME_CHARS {
        return Err(ValueError::NameLength);
    }
    if let Some(c) = name.chars().find(|c| !is_visible(*c)) {
        return Err(ValueError::NameChar(c));
    }
    Ok(())
}

/// One token as the config defines it (its digest, never its value).
#[derive(Clone, PartialEq, Eq)]
pub struct TokenDef {
    /// The identity's name (what logs and audit records show).
    pub name: String,
    /// SHA-256 of the secret.
    pub digest: [u8; 32],
    /// Admin or not.
    pub role: Role,
    /// The tenant it belongs to, if any.
    pub tenant: Option<String>,
    /// What it may reach (before tenant and per-server restrictions).
    pub grants: Grants,
    /// When it stops working.
    pub expires: Option<SystemTime>,
    /// Its own rate limit (else the global per-identity one).
    pub rate: Option<Rate>,
    /// Where it comes from.
    pub source: TokenSource,
}

impl std::fmt::Debug for TokenDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The digest is not a secret, but nothing about a token's value belongs in output.
        f.debug_struct("TokenDef").field("name", &self.name).field("role", &self.role).finish_non_exhaustive()
    }
}

/// How failed authentications are throttled per client address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailureLimit {
    /// Failures allowed within `window`.
    pub max: u32,
    /// How long an address's failures are counted, and how long it is refused past the limit.
    pub window: Duration,
    /// How long an address is refused (429) once over.
    pub block: Duration,
}

impl Default for FailureLimit {
    fn default() -> Self {
        FailureLimit { max: 10, window: Duration::from_secs(60), block: Duration::from_secs(60) }
    }
}

/// The validated authentication settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    /// Every token: environment ones first (`env`, `env-2`, …), then the config's, then a
    /// generated one.
    pub tokens: Vec<TokenDef>,
    /// Tenant → namespace → servers.
    pub tenants: BTreeMap<String, BTreeMap<String, Vec<String>>>,
    /// Default rate per identity.
    pub per_identity: Option<Rate>,
    /// Rate per client address.
    pub per_address: Option<Rate>,
    /// The failure throttle.
    pub failures: FailureLimit,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: Vec<Cidr>,
    /// The identity providers whose access tokens are accepted.
    pub oauth: OAuthConfig,
    /// Static tokens are not accepted (`auth.static_tokens: false`): `tokens` is empty.
    pub static_off: bool,
    /// Issued tokens are not accepted (`auth.issued_tokens: false`).
    pub issued_off: bool,
}

/// The algorithms a public key can verify: the only ones an access token may use.
pub(crate) const ASYMMETRIC: &[jsonwebtoken::Algorithm] = &[
    jsonwebtoken::Algorithm::RS256,
    jsonwebtoken::Algorithm::RS384,
    jsonwebtoken::Algorithm::RS512,
    jsonwebtoken::Algorithm::PS256,
    jsonwebtoken::Algorithm::PS384,
    jsonwebtoken::Algorithm::PS512,
    jsonwebtoken::Algorithm::ES256,
    jsonwebtoken::Algorithm::ES384,
    jsonwebtoken::Algorithm::EdDSA,
];

impl AuthConfig {
    /// Whether no credential of any kind is configured, so every caller is the anonymous
    /// identity (unless the token store holds issued tokens). A kind turned off is a choice to
    /// authenticate otherwise, never a way to fall open.
    pub(crate) fn is_open(&self) -> bool {
        self.tokens.is_empty() && self.oauth.issuers.is_empty() && !self.static_off && !self.issued_off
    }
}

/// The identity providers whose access tokens are accepted (`oauth:`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OAuthConfig {
    /// One entry per issuer.
    pub issuers: Vec<IssuerDef>,
    /// Which resource a token must be issued for.
    pub resources: ResourceBinding,
    /// The config's name separator (scope grants are patterns over aggregated names).
    pub separator: String,
    /// Portcullis' own authorization server, when on.
    pub server: Option<AuthorizationServerDef>,
}

/// Portcullis' own authorization server, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationServerDef {
    /// Whether clients may register themselves (RFC 7591).
    pub registration: bool,
    /// How long an access token lasts.
    pub access_ttl: std::time::Duration,
    /// How long a refresh token lasts unused.
    pub refresh_ttl: std::time::Duration,
    /// Clients registered in the config.
    pub(crate) clients: Vec<crate::store::OAuthClient>,
    /// The fetcher of Client ID Metadata Documents, when they are accepted.
    pub(crate) documents: Option<crate::oauth::cimd::Fetcher>,
    /// Whether a person may sign in with a Portcullis token.
    pub token_login: bool,
    /// The OpenID provider people sign in through.
    pub provider: Option<LoginProvider>,
}

/// The operator's OpenID provider, for signing people in to the authorization server.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginProvider {
    /// Its issuer (one of the configured issuers).
    pub issuer: String,
    /// Portcullis' client id there.
    pub client_id: String,
    /// Its secret (never logged: `Debug` hides it).
    pub client_secret: Box<str>,
    /// The scopes asked for.
    pub scopes: Vec<String>,
    /// Email domains allowed (lowercase; empty: any).
    pub allowed_domains: Vec<String>,
    /// Groups allowed (empty: any).
    pub allowed_groups: Vec<String>,
}

impl std::fmt::Debug for LoginProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginProvider")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("scopes", &self.scopes)
            .field("allowed_domains", &self.allowed_domains)
            .field("allowed_groups", &self.allowed_groups)
            .finish()
    }
}

/// Which resource (RFC 8707 audience) a token must name to be accepted at an endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ResourceBinding {
    /// The exact endpoint URL (`…/mcp`, `…/servers/NAME/mcp`).
    #[default]
    Endpoint,
    /// Any of this gateway's MCP endpoint URLs.
    Gateway,
}

/// One identity provider, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerDef {
    /// The exact `iss`.
    pub issuer: String,
    /// Its JWKS URL, when the config gives it (else discovered from its metadata).
    pub jwks_uri: Option<String>,
    /// `aud` values accepted besides the endpoint's resource URL.
    pub audiences: Vec<String>,
    /// The signature algorithms accepted (asymmetric only).
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    /// Clock skew allowed.
    pub leeway: std::time::Duration,
    /// Whether `typ: at+jwt` is required.
    pub require_at_jwt: bool,
    /// The claim naming the identity.
    pub identity_claim: String,
    /// Scope → what it grants.
    pub scopes: BTreeMap<String, Grants>,
    /// The claim listing groups or roles.
    pub groups_claim: String,
    /// Group → role.
    pub roles: BTreeMap<String, Role>,
    /// Group → tenant.
    pub tenants: BTreeMap<String, String>,
    /// Where opaque tokens of this issuer are checked (RFC 7662).
    pub introspection: Option<Introspection>,
}

/// An RFC 7662 introspection endpoint and the client credentials Portcullis uses there.
#[derive(Clone, PartialEq, Eq)]
pub struct Introspection {
    /// The endpoint URL.
    pub endpoint: String,
    /// Portcullis' client id.
    pub client_id: String,
    /// Its secret (never logged: `Debug` hides it).
    pub client_secret: Box<str>,
}

impl std::fmt::Debug for Introspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Introspection").field("endpoint", &self.endpoint).field("client_id", &self.client_id).finish()
    }
}

/// SHA-256 of a secret.
pub fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}
