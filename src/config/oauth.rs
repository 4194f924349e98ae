//! The `oauth:` part of the file: the identity providers whose access tokens Portcullis
//! accepts (an OAuth 2.1 resource server, see `docs/oauth.md`), validated into
//! [`OAuthConfig`].
//!
//! Invariants: an issuer is an https URL (http only on a loopback host); only asymmetric
//! algorithms can be named; a scope's grants only allow (a denial in one scope could not be
//! undone by another the token also carries, so none is accepted); every server a scope names
//! exists.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{DurationValue, S, Validator};
use crate::authz::Grants;
use crate::credentials::{IssuerDef, OAuthConfig, ResourceBinding};

/// `oauth:`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOAuth {
    /// The identity providers whose access tokens are accepted.
    #[serde(default)]
    pub issuers: Vec<RawIssuer>,
    /// Which resource a token must be issued for: `endpoint` (default: the exact MCP endpoint
    /// URL it is used at, so a token for one server's endpoint is refused at another's) or
    /// `gateway` (a token for any of this gateway's MCP endpoints is accepted at all of them).
    #[serde(default)]
    pub resources: Option<S>,
    /// Portcullis' own authorization server, for clients that log in with a browser
    /// (Claude.ai, ChatGPT, VS Code, Cursor): present to turn it on.
    #[serde(default)]
    pub authorization_server: Option<RawAuthorizationServer>,
}

/// `oauth.authorization_server`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuthorizationServer {
    /// Whether clients may register themselves (RFC 7591 dynamic client registration; default
    /// true).
    #[serde(default)]
    pub registration: Option<bool>,
    /// How long an access token lasts (default `1h`, at most `24h`).
    #[serde(default)]
    pub access_token_ttl: Option<DurationValue>,
    /// How long a refresh token lasts unused (default `30d`).
    #[serde(default)]
    pub refresh_token_ttl: Option<DurationValue>,
    /// Clients registered here ahead of time: client id → its name and redirect URIs. Public
    /// clients (PKCE, no secret), like every other client of this server.
    #[serde(default)]
    pub clients: BTreeMap<String, RawClient>,
    /// Clients that identify themselves by the https URL of a Client ID Metadata Document
    /// (ChatGPT, Claude.ai, VS Code): on by default.
    #[serde(default)]
    pub client_metadata_documents: Option<RawMetadataDocuments>,
    /// How a person signs in: with a Portcullis token, through the operator's OpenID provider,
    /// or both (default: with a token only).
    #[serde(default)]
    pub login: Option<RawLogin>,
}

/// A client registered in the config.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawClient {
    /// The name shown on the consent page (default: the client id).
    #[serde(default)]
    pub name: Option<S>,
    /// Where it may be sent back to: compared exactly, but for any port of a loopback http URI
    /// (RFC 8252).
    pub redirect_uris: Vec<S>,
}

/// `oauth.authorization_server.client_metadata_documents`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetadataDocuments {
    /// Whether client ids that are https URLs are accepted (default true).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Fetch documents from hosts with private, loopback or link-local addresses too (default
    /// false: a client id could otherwise make Portcullis reach into its own network).
    #[serde(default)]
    pub allow_private_addresses: bool,
    /// A PEM bundle of the CAs trusted for fetching documents, in place of the system's roots.
    #[serde(default)]
    pub ca: Option<S>,
}

/// `oauth.authorization_server.login`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLogin {
    /// Whether a person may sign in by presenting a Portcullis token (default true).
    #[serde(default)]
    pub tokens: Option<bool>,
    /// The operator's OpenID provider, through which people sign in (Portcullis is its
    /// client). Its issuer must be one of `oauth.issuers`: that entry's keys check the ID token,
    /// and its identity claim, scopes, roles and tenants say who the person is and what they
    /// reach.
    #[serde(default)]
    pub provider: Option<RawLoginProvider>,
}

/// The OpenID provider people sign in through.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLoginProvider {
    /// Its issuer, one of `oauth.issuers`.
    pub issuer: S,
    /// Portcullis' client id there (its redirect URI is `PUBLIC_URL/authorize/callback`).
    pub client_id: S,
    /// Its client secret (use `${VAR}`), sent with HTTP Basic authentication.
    pub client_secret: S,
    /// The scopes asked for (default: `openid email profile` and every scope the issuer's
    /// `scopes:` maps).
    #[serde(default)]
    pub scopes: Vec<S>,
    /// Only people whose verified `email` is in one of these domains may sign in.
    #[serde(default)]
    pub allowed_domains: Vec<S>,
    /// Only people in one of these groups (the issuer's `groups_claim`) may sign in.
    #[serde(default)]
    pub allowed_groups: Vec<S>,
}

/// One identity provider.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIssuer {
    /// The issuer identifier, exactly as its tokens' `iss` says (`https://idp.example.com/realms/acme`).
    pub issuer: S,
    /// Where its signing keys are (JWKS). Default: the `jwks_uri` of its metadata
    /// (`/.well-known/oauth-authorization-server`, then `/.well-known/openid-configuration`).
    #[serde(default)]
    pub jwks_uri: Option<S>,
    /// `aud` values accepted besides the endpoint's resource URL (Entra ID's `api://…`, say).
    #[serde(default)]
    pub audiences: Vec<S>,
    /// Signature algorithms accepted (default: RS256, RS384, RS512, PS256, PS384, PS512,
    /// ES256, ES384, EdDSA; `none` and HMAC never).
    #[serde(default)]
    pub algorithms: Vec<S>,
    /// Clock skew allowed on `exp` and `nbf` (default `60s`, at most `5m`).
    #[serde(default)]
    pub leeway: Option<DurationValue>,
    /// Require RFC 9068's `typ: at+jwt` (default false: many providers type access tokens `JWT`).
    #[serde(default)]
    pub require_at_jwt: bool,
    /// The claim that names the identity in audit records, metrics and rate limits (default
    /// `sub`; `email` or `preferred_username`, say). Sessions are bound to issuer and `sub`.
    #[serde(default)]
    pub identity_claim: Option<S>,
    /// What each scope grants: `files:read: {servers: [files], tools: ["files__read_*"]}`. A
    /// token reaches the union of its scopes' grants; a scope not listed grants nothing.
    #[serde(default)]
    pub scopes: BTreeMap<String, RawScopeGrant>,
    /// The claim that lists the token's groups or roles (default `groups`; `roles` for Entra
    /// ID app roles, say): a string or a list of strings.
    #[serde(default)]
    pub groups_claim: Option<S>,
    /// Group → role: `portcullis-admins: admin`, `scrapers: metrics` (default `user`). With
    /// several, `admin` wins over `metrics`.
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    /// Group → tenant: `acme-staff: acme`. A token in groups of two tenants is refused.
    #[serde(default)]
    pub tenants: BTreeMap<String, String>,
    /// Opaque (non-JWT) tokens are checked at this issuer's RFC 7662 introspection endpoint
    /// (at most one issuer may have one: a token is never shown to a provider that did not
    /// issue it).
    #[serde(default)]
    pub introspection: Option<RawIntrospection>,
}

/// An introspection endpoint and Portcullis' client credentials for it.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIntrospection {
    /// The endpoint (https; http only on a loopback host).
    pub endpoint: S,
    /// Portcullis' client id at the provider.
    pub client_id: S,
    /// Its client secret (use `${VAR}`).
    pub client_secret: S,
}

/// What one scope grants (allows only).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawScopeGrant {
    /// Servers it reaches (default: all).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Tool globs over aggregated names (default: every tool of its servers).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Prompt globs (default: every prompt of its servers).
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Resource globs over `server` + separator + URI (default: every resource of its servers).
    #[serde(default)]
    pub resources: Vec<String>,
}

/// The longest leeway accepted.
const MAX_LEEWAY: Duration = Duration::from_secs(300);

impl Validator<'_> {
    pub(super) fn oauth(
        &mut self,
        raw: Option<RawOAuth>,
        servers: &[String],
        separator: &str,
        tenants: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
    ) -> OAuthConfig {
        let Some(raw) = raw else { return OAuthConfig::default() };
        let resources = match raw.resources.as_deref() {
            None | Some("endpoint") => ResourceBinding::Endpoint,
            Some("gateway") => ResourceBinding::Gateway,
            Some(other) => {
                self.error("oauth.resources", format!("{other:?} is neither `endpoint` nor `gateway`"));
                ResourceBinding::Endpoint
            }
        };
        let mut issuers: Vec<IssuerDef> = Vec::new();
        for (i, r) in raw.issuers.iter().enumerate() {
            let path = format!("oauth.issuers[{i}]");
            if let Some(def) = self.issuer(&path, r, servers, tenants) {
                if issuers.iter().any(|d| d.issuer == def.issuer) {
                    self.error(format!("{path}.issuer"), format!("{:?} is listed twice", def.issuer));
                }
                issuers.push(def);
            }
        }
        if issuers.iter().filter(|d| d.introspection.is_some()).count() > 1 {
            self.error("oauth.issuers", "at most one issuer may have an introspection endpoint");
        }
        let server = raw.authorization_server.as_ref().map(|a| self.authorization_server(a, &issuers));
        OAuthConfig { issuers, resources, separator: separator.to_owned(), server }
    }

    fn authorization_server(
        &mut self,
        a: &RawAuthorizationServer,
        issuers: &[IssuerDef],
    ) -> crate::credentials::AuthorizationServerDef {
        let path = "oauth.authorization_server";
        let ttl = |me: &mut Self, name: &str, v: &Option<DurationValue>, default: Duration, max: Duration| {
            let d = me.duration(&format!("{path}.{name}"), v.as_ref(), default, false);
            if d.is_zero() || d > max {
                me.error(format!("{path}.{name}"), format!("must be more than 0 and at most {}s", max.as_secs()));
            }
            d
        };
        let access_ttl =
            ttl(self, "access_token_ttl", &a.access_token_ttl, Duration::from_secs(3600), Duration::from_secs(86_400));
        let refresh_ttl = ttl(
            self,
            "refresh_token_ttl",
            &a.refresh_token_ttl,
            Duration::from_secs(30 * 86_400),
            Duration::from_secs(366 * 86_400),
        );
        let mut clients = Vec::new();
        for (id, c) in &a.clients {
            let cp = format!("{path}.clients.{id}");
            if id.is_empty() || id.len() > 200 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
                self.error(&cp, "a client id is 1 to 200 visible characters");
            }
            if crate::oauth::cimd::is_document_id(id) {
                self.error(&cp, "an https URL is a metadata document's client id, not one to register here");
            }
            let uris: Vec<String> =
                c.redirect_uris.iter().map(|u| self.subst(&format!("{cp}.redirect_uris"), u)).collect();
            if uris.is_empty() || uris.len() > 10 {
                self.error(format!("{cp}.redirect_uris"), "one to ten redirect URIs");
            }
            for u in uris.iter().filter(|u| !crate::oauth::server::registrable(u)) {
                self.error(
                    format!("{cp}.redirect_uris"),
                    format!("{u:?}: https, http on a loopback host, or an app's own scheme"),
                );
            }
            clients.push(crate::store::OAuthClient {
                client_id: id.clone(),
                name: crate::oauth::server::display_name(Some(c.name.as_deref().unwrap_or(id))),
                redirect_uris: uris,
            });
        }
        let documents = match a.client_metadata_documents.as_ref() {
            Some(d) if d.enabled == Some(false) => None,
            d => {
                let ca = d
                    .and_then(|d| d.ca.as_ref())
                    .map(|p| std::path::PathBuf::from(self.subst(&format!("{path}.client_metadata_documents.ca"), p)));
                let allow_private = d.is_some_and(|d| d.allow_private_addresses);
                if allow_private {
                    self.warn(
                        format!("{path}.client_metadata_documents.allow_private_addresses"),
                        "client metadata documents may be fetched from private addresses (testing or an intranet only)",
                    );
                }
                match crate::oauth::cimd::Fetcher::new(allow_private, ca.as_deref()) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        self.error(format!("{path}.client_metadata_documents"), e.to_string());
                        None
                    }
                }
            }
        };
        let login = a.login.as_ref();
        let token_login = login.and_then(|l| l.tokens).unwrap_or(true);
        let provider = login.and_then(|l| l.provider.as_ref()).and_then(|p| self.login_provider(path, p, issuers));
        if !token_login && login.is_none_or(|l| l.provider.is_none()) {
            self.error(format!("{path}.login"), "no way to sign in: turn on tokens or name a provider");
        }
        crate::credentials::AuthorizationServerDef {
            registration: a.registration.unwrap_or(true),
            access_ttl,
            refresh_ttl,
            clients,
            documents,
            token_login,
            provider,
        }
    }

    fn login_provider(
        &mut self,
        path: &str,
        p: &RawLoginProvider,
        issuers: &[IssuerDef],
    ) -> Option<crate::credentials::LoginProvider> {
        let lp = format!("{path}.login.provider");
        let issuer = self.subst(&format!("{lp}.issuer"), &p.issuer);
        let Some(def) = issuers.iter().find(|d| d.issuer == issuer) else {
            self.error(format!("{lp}.issuer"), format!("{issuer:?} is not one of oauth.issuers"));
            return None;
        };
        let client_id = self.subst(&format!("{lp}.client_id"), &p.client_id);
        let client_secret = self.subst(&format!("{lp}.client_secret"), &p.client_secret);
        if client_id.is_empty() || client_secret.is_empty() {
            self.error(&lp, "client_id and client_secret must not be empty");
        }
        let mut scopes: Vec<String> = if p.scopes.is_empty() {
            ["openid", "email", "profile"].into_iter().map(str::to_owned).chain(def.scopes.keys().cloned()).collect()
        } else {
            p.scopes.iter().map(|s| self.subst(&format!("{lp}.scopes"), s)).collect()
        };
        if !scopes.iter().any(|s| s == "openid") {
            scopes.insert(0, "openid".into());
        }
        scopes.dedup();
        let lower = |v: &[S]| v.iter().map(|d| d.trim().to_ascii_lowercase()).collect::<Vec<_>>();
        Some(crate::credentials::LoginProvider {
            issuer,
            client_id,
            client_secret: client_secret.into(),
            scopes,
            allowed_domains: lower(&p.allowed_domains),
            allowed_groups: p.allowed_groups.clone(),
        })
    }

    fn issuer(
        &mut self,
        path: &str,
        r: &RawIssuer,
        servers: &[String],
        tenants: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
    ) -> Option<IssuerDef> {
        let before = self.errors.len();
        let issuer = self.subst(&format!("{path}.issuer"), &r.issuer);
        self.provider_url(&format!("{path}.issuer"), &issuer);
        let jwks_uri = r.jwks_uri.as_ref().map(|u| {
            let u = self.subst(&format!("{path}.jwks_uri"), u);
            self.provider_url(&format!("{path}.jwks_uri"), &u);
            u
        });
        let audiences =
            r.audiences.iter().enumerate().map(|(j, a)| self.subst(&format!("{path}.audiences[{j}]"), a)).collect();
        let mut algorithms = Vec::new();
        for (j, a) in r.algorithms.iter().enumerate() {
            match crate::credentials::ASYMMETRIC.iter().find(|alg| format!("{alg:?}") == *a) {
                Some(alg) => algorithms.push(*alg),
                None => self.error(
                    format!("{path}.algorithms[{j}]"),
                    format!("{a:?} is not accepted (RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA)"),
                ),
            }
        }
        if algorithms.is_empty() {
            algorithms = crate::credentials::ASYMMETRIC.to_vec();
        }
        let leeway = self.duration(&format!("{path}.leeway"), r.leeway.as_ref(), Duration::from_secs(60), true);
        if leeway > MAX_LEEWAY {
            self.error(format!("{path}.leeway"), "at most 5m");
        }
        let mut scopes = BTreeMap::new();
        for (scope, g) in &r.scopes {
            let sp = format!("{path}.scopes.{scope}");
            // RFC 6749 §3.3 scope-token: printable ASCII but space, `"` and `\`.
            if scope.is_empty() || !scope.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b'\\') {
                self.error(&sp, "a scope is printable ASCII without spaces, quotes or backslashes");
            }
            for (j, s) in g.servers.iter().enumerate().filter(|(_, s)| !servers.contains(s)) {
                self.error(format!("{sp}.servers[{j}]"), format!("unknown server {s:?}"));
            }
            for (kind, list) in [("tools", &g.tools), ("prompts", &g.prompts), ("resources", &g.resources)] {
                if list.iter().any(|p| p.starts_with('!')) {
                    self.error(format!("{sp}.{kind}"), "a scope only grants: `!` denials are not accepted here");
                }
            }
            scopes.insert(scope.clone(), Grants::from_lists(&g.servers, &g.tools, &g.prompts, &g.resources));
        }
        let mut roles = BTreeMap::new();
        for (group, role) in &r.roles {
            match crate::credentials::Role::parse(Some(role)) {
                Ok(role) => {
                    roles.insert(group.clone(), role);
                }
                Err(e) => self.error(format!("{path}.roles.{group}"), e),
            }
        }
        let introspection = r.introspection.as_ref().map(|i| {
            let ip = format!("{path}.introspection");
            let endpoint = self.subst(&format!("{ip}.endpoint"), &i.endpoint);
            self.provider_url(&format!("{ip}.endpoint"), &endpoint);
            let client_id = self.subst(&format!("{ip}.client_id"), &i.client_id);
            let client_secret = self.subst(&format!("{ip}.client_secret"), &i.client_secret);
            if client_id.is_empty() || client_secret.is_empty() {
                self.error(&ip, "client_id and client_secret must not be empty");
            }
            crate::credentials::Introspection { endpoint, client_id, client_secret: client_secret.into() }
        });
        for (group, tenant) in &r.tenants {
            if !tenants.contains_key(tenant) {
                self.error(format!("{path}.tenants.{group}"), format!("unknown tenant {tenant:?}"));
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(IssuerDef {
            issuer,
            jwks_uri,
            audiences,
            algorithms,
            leeway,
            require_at_jwt: r.require_at_jwt,
            identity_claim: r.identity_claim.clone().unwrap_or_else(|| "sub".into()),
            scopes,
            groups_claim: r.groups_claim.clone().unwrap_or_else(|| "groups".into()),
            roles,
            tenants: r.tenants.clone(),
            introspection,
        })
    }

    /// An identity provider's URL: https, or http on a loopback host (a provider on this
    /// machine, a test's).
    pub(super) fn provider_url(&mut self, path: &str, url: &str) {
        if !is_provider_url(url) {
            self.error(path, format!("{url:?} is not an https URL (http only on a loopback host)"));
        }
    }
}

/// Whether a URL may be an identity provider's (or any OAuth endpoint Portcullis talks to):
/// https, or http on a loopback host.
pub(crate) fn is_provider_url(url: &str) -> bool {
    match reqwest::Url::parse(url) {
        Ok(u) if u.scheme() == "https" => u.has_host(),
        Ok(u) if u.scheme() == "http" => u.host_str().is_some_and(is_loopback_host),
        _ => false,
    }
}

/// `localhost` or a loopback address.
pub(crate) fn is_loopback_host(h: &str) -> bool {
    h == "localhost" || h.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use crate::config::{Env, parse};

    fn errors(authorization_server: &str) -> String {
        let text = format!(
            "servers:\n  a: {{command: echo}}\noauth:\n  issuers:\n    - issuer: https://idp.example\n  authorization_server: {authorization_server}\n"
        );
        match parse(&text, false, &Env::from_pairs([])) {
            Ok(_) => String::new(),
            Err(e) => e.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
        }
    }

    #[test]
    fn the_authorization_server_s_clients_and_sign_ins_are_checked() {
        assert_eq!(errors("{}"), "");
        assert_eq!(
            errors("{login: {tokens: false, provider: {issuer: https://idp.example, client_id: p, client_secret: s}}}"),
            ""
        );
        for (bad, says) in [
            ("{login: {tokens: false}}", "no way to sign in"),
            (
                "{login: {provider: {issuer: https://other.example, client_id: p, client_secret: s}}}",
                "not one of oauth.issuers",
            ),
            (
                "{login: {provider: {issuer: https://idp.example, client_id: p, client_secret: ''}}}",
                "must not be empty",
            ),
            (
                "{clients: {'https://app.example/c.json': {redirect_uris: ['https://app.example/cb']}}}",
                "metadata document",
            ),
            ("{clients: {app: {redirect_uris: ['http://evil.example/cb']}}}", "loopback host"),
            ("{clients: {app: {redirect_uris: []}}}", "one to ten"),
            ("{client_metadata_documents: {ca: /nonexistent/ca.pem}}", "/nonexistent/ca.pem"),
        ] {
            let e = errors(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
