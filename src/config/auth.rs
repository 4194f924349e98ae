//! The authentication part of the file (`auth`, `tenants`, `rate_limit`, `trusted_proxies`,
//! and the MCP Front / Open MCP Gateway spellings) and its validation into [`AuthConfig`].
//!
//! Invariants: a secret lives here only between substitution and hashing; the runtime form
//! holds digests. A token that resolves to an empty string, two names with one secret, or a
//! grant naming an unknown server or tenant is an error.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{S, Validator};
use crate::authz::Grants;
use crate::credentials::{self as auth, AuthConfig, Cidr, FailureLimit, Rate, Role, TokenDef, TokenSource};

/// `auth:` (also MCP Front's `proxy.auth:`).
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    /// MCP Front's kind of authentication; only `bearer_token` is supported (the default).
    #[serde(default)]
    pub kind: Option<S>,
    /// Named tokens: `alice: "${ALICE_TOKEN}"`, or `alice: {token, servers, tools, prompts,
    /// resources, role, tenant, expires, rate}`.
    #[serde(default)]
    pub tokens: BTreeMap<String, RawToken>,
    /// Failed authentications allowed per client address per minute; past it the address gets
    /// 429 for a minute (default 10). A valid credential is never refused by this.
    #[serde(default)]
    pub max_failures_per_minute: Option<u32>,
    /// Accept static tokens (`auth.tokens`, `PORTCULLIS_TOKEN(S)`, `api_key`,
    /// `--generate-token`; default true). Turn off once every client has moved to OAuth.
    #[serde(default)]
    pub static_tokens: Option<bool>,
    /// Accept issued tokens (`portcullis token create`, `/admin/tokens`; default true).
    #[serde(default)]
    pub issued_tokens: Option<bool>,
}

/// One named token: its value alone, or its value with grants.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(untagged)]
pub(crate) enum RawToken {
    /// `name: "${SECRET}"`: every server, user role.
    Value(String),
    /// The full form.
    Full(RawTokenFull),
}

/// A named token with its grants.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTokenFull {
    /// The secret (use `${VAR}`; it must not be empty).
    pub token: String,
    /// Servers it may reach (default: all).
    #[serde(default)]
    pub servers: Vec<String>,
    /// Tool globs over aggregated names (`files__read_*`); `!glob` denies, deny wins.
    #[serde(default)]
    pub tools: Vec<String>,
    /// Prompt globs, as for tools.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Resource globs over `server` + separator + URI (`files__file:///srv/*`).
    #[serde(default)]
    pub resources: Vec<String>,
    /// `user` (default), `admin` (adds the management API) or `metrics` (reads `/metrics` and
    /// `/stats`, nothing else: for scrapers).
    #[serde(default)]
    pub role: Option<String>,
    /// The tenant it belongs to: it sees only that tenant's namespaces' servers.
    #[serde(default)]
    pub tenant: Option<String>,
    /// When it stops working, RFC 3339 (`2027-01-01T00:00:00Z`).
    #[serde(default)]
    pub expires: Option<String>,
    /// Its own rate limit (`100/min`), instead of `rate_limit.per_identity`.
    #[serde(default)]
    pub rate: Option<String>,
}

/// One tenant.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTenant {
    /// Named groups of servers: `prod: [files, db]`.
    #[serde(default)]
    pub namespaces: BTreeMap<String, Vec<String>>,
}

/// `rate_limit:`.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    /// Requests per identity (`600/min`); a token's own `rate` replaces it. Default: none.
    #[serde(default)]
    pub per_identity: Option<S>,
    /// Requests per client address (`1200/min`), authenticated or not. Default: none.
    #[serde(default)]
    pub per_address: Option<S>,
}

/// MCP Front's `proxy:` block.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProxy {
    /// As `auth:`.
    #[serde(default)]
    pub auth: Option<RawAuth>,
    /// As `listen:` (`":8080"` is every interface).
    #[serde(default)]
    pub addr: Option<S>,
    /// As `public_url:`.
    #[serde(default, rename = "baseUrl")]
    pub base_url: Option<S>,
    /// `baseUrl` as other MCP Front documents spell it.
    #[serde(default, rename = "baseURL")]
    pub base_url_upper: Option<S>,
    /// As `name:`.
    #[serde(default)]
    pub name: Option<S>,
}

/// The raw pieces the validator turns into an [`AuthConfig`].
pub(crate) struct RawAuthParts {
    pub auth: Option<RawAuth>,
    pub proxy: Option<RawProxy>,
    pub api_key: Option<S>,
    pub tenants: BTreeMap<String, RawTenant>,
    pub rate_limit: Option<RawRateLimit>,
    pub trusted_proxies: Vec<S>,
}

/// The name of the `serve --generate-token` identity; no config entry may take it.
pub(crate) const GENERATED_NAME: &str = "generated";

impl Validator<'_> {
    pub(super) fn auth(&mut self, parts: RawAuthParts, servers: &[String]) -> AuthConfig {
        let mut out = AuthConfig::default();
        self.single_keys(&mut out, parts.api_key.as_ref());
        for (name, tenant) in &parts.tenants {
            let mut namespaces = BTreeMap::new();
            for (ns, list) in &tenant.namespaces {
                for s in list.iter().filter(|s| !servers.contains(s)) {
                    self.error(format!("tenants.{name}.namespaces.{ns}"), format!("unknown server {s:?}"));
                }
                namespaces.insert(ns.clone(), list.clone());
            }
            out.tenants.insert(name.clone(), namespaces);
        }

        let proxy_auth = parts.proxy.and_then(|p| p.auth);
        let mut max_failures = None;
        for (section, auth) in [("auth", parts.auth), ("proxy.auth", proxy_auth)] {
            let Some(auth) = auth else { continue };
            if let Some(kind) = &auth.kind
                && !kind.eq_ignore_ascii_case("bearer_token")
            {
                self.error(format!("{section}.kind"), "only `bearer_token` is supported");
            }
            max_failures = auth.max_failures_per_minute.or(max_failures);
            if auth.static_tokens == Some(false) {
                out.static_off = true;
            }
            if auth.issued_tokens == Some(false) {
                out.issued_off = true;
            }
            for (name, entry) in &auth.tokens {
                if let Some(t) = self.token(&format!("{section}.tokens.{name}"), name, entry, servers, &out.tenants) {
                    out.tokens.push(t);
                }
            }
        }
        if let Some(max) = max_failures {
            out.failures = FailureLimit { max, ..FailureLimit::default() };
        }
        for i in 0..out.tokens.len() {
            for j in 0..i {
                if out.tokens[i].digest == out.tokens[j].digest {
                    let (a, b) = (out.tokens[j].name.clone(), out.tokens[i].name.clone());
                    self.error("auth.tokens", format!("{a:?} and {b:?} have the same secret"));
                }
                if out.tokens[i].name == out.tokens[j].name {
                    let n = out.tokens[i].name.clone();
                    self.error("auth.tokens", format!("the token name {n:?} is defined twice"));
                }
            }
        }

        if out.static_off {
            // Checked above like any others; then not accepted.
            out.tokens.clear();
        }
        if let Some(rl) = &parts.rate_limit {
            out.per_identity = rl.per_identity.as_ref().and_then(|r| self.rate("rate_limit.per_identity", r));
            out.per_address = rl.per_address.as_ref().and_then(|r| self.rate("rate_limit.per_address", r));
        }
        for (i, p) in parts.trusted_proxies.iter().enumerate() {
            let path = format!("trusted_proxies[{i}]");
            let text = self.subst(&path, p);
            match Cidr::parse(&text) {
                Ok(c) => out.trusted_proxies.push(c),
                Err(e) => self.error(path, e),
            }
        }
        out
    }

    /// The one-key sources, each an admin: `PORTCULLIS_TOKEN`, `PORTCULLIS_TOKENS`
    /// (VoiceGateway) and Open MCP Gateway's `api_key`.
    fn single_keys(&mut self, out: &mut AuthConfig, api_key: Option<&S>) {
        // The environment: one key for everything, admin (VoiceGateway, Open MCP Gateway).
        let mut env_tokens: Vec<String> = Vec::new();
        if let Some(t) = self.env.get("PORTCULLIS_TOKEN").map(str::trim).filter(|t| !t.is_empty()) {
            env_tokens.push(t.to_owned());
        }
        if let Some(list) = self.env.get("PORTCULLIS_TOKENS") {
            env_tokens.extend(list.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned));
        }
        for (i, secret) in env_tokens.iter().enumerate() {
            let name = if i == 0 { "env".to_owned() } else { format!("env-{}", i + 1) };
            out.tokens.push(admin_token(name, secret, TokenSource::Env));
        }
        if let Some(key) = api_key {
            let before = self.errors.len();
            let secret = self.subst("api_key", key);
            if !secret.trim().is_empty() {
                out.tokens.push(admin_token("api_key".into(), &secret, TokenSource::File));
            } else if self.errors.len() == before {
                self.error("api_key", "resolves to an empty string");
            }
        }
    }

    fn rate(&mut self, path: &str, value: &S) -> Option<Rate> {
        let text = self.subst(path, value);
        Rate::parse(&text).map_err(|e| self.error(path, e)).ok()
    }

    fn token(
        &mut self,
        path: &str,
        name: &str,
        entry: &RawToken,
        servers: &[String],
        tenants: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
    ) -> Option<TokenDef> {
        let before = self.errors.len();
        if let Err(e) = auth::check_name(name) {
            self.error(path, e);
        }
        if name == GENERATED_NAME {
            self.error(path, format!("the token name {name:?} is reserved for `serve --generate-token`"));
        }
        let empty = RawTokenFull::default();
        let (secret_raw, full, secret_path) = match entry {
            RawToken::Value(v) => (v.as_str(), &empty, path.to_owned()),
            RawToken::Full(f) => (f.token.as_str(), f, format!("{path}.token")),
        };
        let secret = match self.env.substitute(secret_raw) {
            Ok(s) => s,
            Err(errs) => {
                for e in errs {
                    self.error(&secret_path, e.to_string());
                }
                String::new()
            }
        };
        if secret.trim().is_empty() && self.errors.len() == before {
            self.error(&secret_path, "the token resolves to an empty string");
        }
        for (i, s) in full.servers.iter().enumerate().filter(|(_, s)| !servers.contains(s)) {
            self.error(format!("{path}.servers[{i}]"), format!("unknown server {s:?}"));
        }
        let role = Role::parse(full.role.as_deref()).unwrap_or_else(|e| {
            self.error(format!("{path}.role"), e);
            Role::User
        });
        if let Some(t) = &full.tenant
            && !tenants.contains_key(t)
        {
            self.error(format!("{path}.tenant"), format!("unknown tenant {t:?}"));
        }
        let expires = full.expires.as_deref().and_then(|e| {
            humantime::parse_rfc3339_weak(e.trim())
                .map_err(|err| self.error(format!("{path}.expires"), format!("{e:?} is not an RFC 3339 time: {err}")))
                .ok()
        });
        let rate =
            full.rate.as_deref().and_then(|r| Rate::parse(r).map_err(|e| self.error(format!("{path}.rate"), e)).ok());
        if self.errors.len() != before {
            return None;
        }
        Some(TokenDef {
            name: name.to_owned(),
            digest: auth::digest(secret.trim()),
            role,
            tenant: full.tenant.clone(),
            grants: Grants::from_lists(&full.servers, &full.tools, &full.prompts, &full.resources),
            expires,
            rate,
            source: TokenSource::File,
        })
    }
}

fn admin_token(name: String, secret: &str, source: TokenSource) -> TokenDef {
    TokenDef {
        name,
        digest: auth::digest(secret.trim()),
        role: Role::Admin,
        tenant: None,
        grants: Grants::all(),
        expires: None,
        rate: None,
        source,
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Env, parse};

    fn env() -> Env {
        Env::from_pairs([("ALICE", "alice-secret"), ("BOB", "bob-secret"), ("MCP_GATEWAY_API_KEY", "gw-key")])
    }

    #[test]
    fn named_tokens_short_and_full() {
        let yaml = r#"
servers:
  files: {command: x}
  db: {command: y}
auth:
  tokens:
    alice: "${ALICE}"
    bob:
      token: "${BOB}"
      servers: [files]
      tools: ["files__read_*", "!files__read_secret"]
      role: admin
      expires: 2027-01-01T00:00:00Z
      rate: 100/min
"#;
        let c = parse(yaml, false, &env()).unwrap();
        let names: Vec<&str> = c.auth.tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["alice", "bob"]);
        let bob = &c.auth.tokens[1];
        assert_eq!(bob.digest, crate::credentials::digest("bob-secret"));
        assert_eq!(bob.role, crate::credentials::Role::Admin);
        assert!(bob.grants.tools.allows("files__read_x") && !bob.grants.tools.allows("files__read_secret"));
        assert!(bob.expires.is_some() && bob.rate.is_some());
        // No secret in what the config prints.
        assert!(!format!("{c:?}").contains("bob-secret"));
    }

    #[test]
    fn environment_tokens_are_admins() {
        let e = Env::from_pairs([("PORTCULLIS_TOKEN", "one"), ("PORTCULLIS_TOKENS", "two, three,")]);
        let c = parse("servers: {}", false, &e).unwrap();
        let names: Vec<&str> = c.auth.tokens.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["env", "env-2", "env-3"]);
        assert!(c.auth.tokens.iter().all(|t| t.role == crate::credentials::Role::Admin));
        let empty = Env::from_pairs([("PORTCULLIS_TOKEN", ""), ("PORTCULLIS_TOKENS", " ")]);
        assert!(parse("servers: {}", false, &empty).unwrap().auth.tokens.is_empty());
    }

    #[test]
    fn mcp_front_and_open_mcp_gateway_files_work_as_written() {
        let front = r#"
proxy:
  baseURL: https://mcp.example.com
  addr: ":8080"
  auth:
    kind: bearer_token
    tokens:
      alice: "$env:ALICE|fallback"
      carol: "$env:CAROL|carol-default"
mcpServers:
  notes:
    command: notes
    authTokens: [alice]
"#;
        let c = parse(front, false, &env()).unwrap();
        let digests: Vec<[u8; 32]> = c.auth.tokens.iter().map(|t| t.digest).collect();
        assert_eq!(digests, [crate::credentials::digest("alice-secret"), crate::credentials::digest("carol-default")]);
        assert_eq!(c.servers[0].auth_tokens, ["alice"]);
        assert_eq!(c.public_url.as_deref(), Some("https://mcp.example.com"));
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        let gw = "listen_addr: 127.0.0.1:9000\napi_key: \"${MCP_GATEWAY_API_KEY}\"\nservers: {}\n";
        let c = parse(gw, false, &env()).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.auth.tokens[0].name, "api_key");
        assert_eq!(c.auth.tokens[0].digest, crate::credentials::digest("gw-key"));
    }

    #[test]
    fn bad_tokens_are_errors_with_paths() {
        let yaml = r#"
servers:
  files: {command: x}
  other: {command: y, authTokens: [nobody]}
auth:
  tokens:
    empty: "${NOTHING:-}"
    twin1: same-secret
    twin2: same-secret
    bad:
      token: t0ken-value
      servers: [nope]
      role: root
      tenant: ghost
      expires: tomorrow
      rate: fast
"#;
        let errs = parse(yaml, false, &env()).unwrap_err();
        let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
        let all = text.join("\n");
        for needle in [
            "auth.tokens.empty: the token resolves to an empty string",
            "\"twin1\" and \"twin2\" have the same secret",
            "auth.tokens.bad.servers[0]: unknown server \"nope\"",
            "auth.tokens.bad.role: unknown role",
            "auth.tokens.bad.tenant: unknown tenant",
            "auth.tokens.bad.expires",
            "auth.tokens.bad.rate",
            "servers.other.authTokens: unknown token name \"nobody\"",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(!all.contains("same-secret") && !all.contains("t0ken-value"), "a secret in an error:\n{all}");
    }
}
