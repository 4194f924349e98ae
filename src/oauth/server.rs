//! Portcullis' own OAuth 2.1 authorization server (`oauth.authorization_server`), for MCP
//! clients that log in with a browser: metadata (RFC 8414, and the OpenID discovery path),
//! dynamic client registration (RFC 7591), `/authorize` (authorization code only, PKCE S256
//! required, RFC 8707 `resource`, RFC 9207 `iss` in every response), `/token`
//! (`authorization_code`, `refresh_token`) and `/revoke` (RFC 7009). A person logs in by
//! presenting a Portcullis token once; the client's tokens carry that identity's grants, never
//! more. Access tokens are issued tokens of the store (kept hashed, listed and revocable with
//! the others) bound to the resource; refresh tokens rotate on every use, and a reused one
//! revokes its whole family.
//!
//! Invariants: nothing is redirected to a URI that is not registered for the client (an unknown
//! client or redirect URI gets an error page, never a redirect); every form post needs the
//! request's CSRF token and the browser cookie the request was started with; a code is single
//! use, lives [`CODE_LIFETIME`], and is bound to client, redirect URI, PKCE challenge and
//! resource; every client-supplied string on a page is escaped; pages cannot be framed; what an
//! authorization in progress and an unexchanged code are is kept in the store (bounded, so a
//! browser's next request and the client's exchange may reach any replica; a code and a form's
//! approval are taken by exactly one of them), and a store that cannot answer gets 503.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use crate::gate::json;
use crate::mcp::gateway::Gateway;
use crate::sharded::lock;
use crate::store::{OAuthClient, OAuthGrant, RefreshError, StoredGrants};

/// How long a code may wait for its exchange.
pub(crate) const CODE_LIFETIME: Duration = Duration::from_secs(60);
/// How long a started authorization may wait for the person.
const PENDING_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// The most authorizations in progress, codes unexchanged, clients registered.
const MAX_HELD: i64 = 10_000;
const MAX_CLIENTS: usize = 10_000;
/// Requests one address may make per minute to the registration, authorization and token
/// endpoints together (generous: a hosted client's many users share its few addresses; the
/// sign-in itself is also under the failure throttle).
const PER_ADDRESS_PER_MINUTE: u32 = 300;
/// The cookie that ties an authorization's forms to the browser that started it.
const COOKIE: &str = "pcs_authz";

/// What the authorization server keeps in memory: the per-address count (per replica) and the
/// metadata documents fetched. Authorizations in progress and codes are in the store.
#[derive(Default)]
pub(crate) struct AuthorizationState {
    per_address: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    /// Client ID Metadata Documents fetched.
    documents: super::cimd::Documents,
}

/// One authorization request, from its start to the person's answer (held in the store as
/// JSON, under the digest of its id).
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Pending {
    pub(super) client: OAuthClient,
    pub(super) redirect_uri: String,
    pub(super) state: Option<String>,
    challenge: String,
    pub(super) resource: String,
    /// The scopes the client named (shown; what it gets is what the person reaches).
    scope: Option<String>,
    /// The digest of the browser cookie it was started with.
    pub(super) browser: [u8; 32],
    pub(super) csrf: String,
    login: Option<Login>,
    /// A sign-in at the operator's OpenID provider, while it is under way.
    pub(super) federation: Option<super::federation::Started>,
    /// Unix ms.
    pub(super) expires: i64,
}

/// Who logged in, and what they may reach.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct Login {
    pub(super) key: String,
    pub(super) name: String,
    pub(super) tenant: String,
    pub(super) grants: StoredGrants,
    pub(super) servers: Vec<String>,
}

/// A code given to the client, until it is exchanged (then it names the family it made, so a
/// second exchange revokes it); held in the store as JSON, under the code's digest.
#[derive(serde::Serialize, serde::Deserialize)]
struct Code {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    resource: String,
    login: Login,
    used_by: Option<String>,
}

/// The store's kinds of held rows: an authorization in progress (by its id's digest), a code
/// (by its digest), a sign-in at the provider (by its `state`'s digest: the authorization id).
const AUTHORIZATION: &str = "authorization";
const CODE: &str = "code";
pub(super) const FEDERATION: &str = "federation";

/// Why an authorization in progress could not be read or kept.
#[derive(Debug, thiserror::Error)]
pub(super) enum HeldError {
    /// The store did not answer (503).
    #[error("the store cannot answer now")]
    Store(#[from] crate::store::StoreError),
    /// Too many authorizations in progress (503).
    #[error("too many sign-ins in progress")]
    Full,
}

impl IntoResponse for HeldError {
    fn into_response(self) -> Response {
        if let HeldError::Store(e) = &self {
            tracing::warn!(error = %e, "an authorization in progress could not be read or kept");
        }
        let message = match self {
            HeldError::Store(_) => "The gateway cannot continue this sign-in now; try again.",
            HeldError::Full => "Too many logins in progress; try again later.",
        };
        error_page(StatusCode::SERVICE_UNAVAILABLE, message)
    }
}

/// Unix ms `after` from now.
pub(super) fn expires_in(after: Duration) -> i64 {
    crate::store::now_ms().saturating_add(after.as_millis().try_into().unwrap_or(i64::MAX))
}

/// Keeps `value`, sealed ([`seal_held`]), in the store under (`kind`, `key`) until `expires`
/// (Unix ms), replacing what was there when `replace`: whether it is kept (false: a row was
/// there, left as it was).
pub(super) fn hold(
    gw: &Gateway,
    kind: &'static str,
    key: &[u8; 32],
    value: &impl serde::Serialize,
    expires: i64,
    replace: bool,
) -> Result<bool, HeldError> {
    let data = seal_held(gw, kind, value)?;
    let now = crate::store::now_ms();
    match gw.store().writable()?.held_put(kind, key, &data, expires, MAX_HELD, now, replace)? {
        crate::store::Put::Kept => Ok(true),
        crate::store::Put::There => Ok(false),
        crate::store::Put::Full => Err(HeldError::Full),
    }
}

/// What is held under (`kind`, `key`), opened; None when nothing is, it expired, or it does not
/// open. Taken (to one taker only, on any replica) when `take`.
pub(super) fn held<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    kind: &'static str,
    key: &[u8; 32],
    take: bool,
) -> Result<Option<T>, HeldError> {
    let store = gw.store().writable()?;
    let now = crate::store::now_ms();
    let data = if take { store.held_take(kind, key, now)? } else { store.held_get(kind, key, now)? };
    Ok(data.and_then(|d| open_held(gw, kind, &d)))
}

/// `value` sealed for the store as a held row of `kind` (what is held carries form tokens,
/// PKCE verifiers and client secrets: the store never sees them in the clear). Sealed under
/// the vault key when there is one (every replica opens it), else this process's own.
fn seal_held(gw: &Gateway, kind: &str, value: &impl serde::Serialize) -> Result<String, HeldError> {
    let invalid = |e: String| HeldError::Store(crate::store::StoreError::Invalid(e));
    let plain = serde_json::to_vec(value).map_err(|e| invalid(e.to_string()))?;
    let sealed = gw.ring_for("held row").seal(kind, &plain).map_err(|e| invalid(e.to_string()))?;
    Ok(base64::engine::general_purpose::STANDARD.encode(sealed))
}

/// A held row of `kind` opened (None when it does not open: another key, or tampered).
fn open_held<T: serde::de::DeserializeOwned>(gw: &Gateway, kind: &str, data: &str) -> Option<T> {
    let sealed = base64::engine::general_purpose::STANDARD.decode(data).ok()?;
    let plain = gw.ring_for("held row").open(kind, &sealed).ok()?;
    serde_json::from_slice(&plain).ok()
}

impl Pending {
    /// Keeps it under `id` (replacing what was there).
    pub(super) fn keep(&self, gw: &Gateway, id: &str) -> Result<(), HeldError> {
        hold(gw, AUTHORIZATION, &crate::credentials::digest(id), self, self.expires, true).map(drop)
    }

    /// The authorization in progress `id`, unless it expired.
    pub(super) fn find(gw: &Gateway, id: &str) -> Result<Option<Pending>, HeldError> {
        held(gw, AUTHORIZATION, &crate::credentials::digest(id), false)
    }

    /// Takes the authorization in progress `id`: to one taker only, on any replica.
    pub(super) fn take(gw: &Gateway, id: &str) -> Result<Option<Pending>, HeldError> {
        held(gw, AUTHORIZATION, &crate::credentials::digest(id), true)
    }
}

/// Form or query parameters; None when one is given twice (RFC 6749 §3.1: "MUST NOT be
/// included more than once"), which is refused rather than guessed at.
fn params(raw: &[u8]) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(raw) {
        if out.insert(k.into_owned(), v.into_owned()).is_some() {
            return None;
        }
    }
    Some(out)
}

/// Escapes text for HTML (the five characters that matter in text and quoted attributes).
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A page: small, no script, unframeable, never cached. Its forms may post only here, and be
/// redirected on to `sent_to` (CSP `form-action` covers the redirect after a post: the consent
/// form's answer goes on to the client).
fn page(status: StatusCode, title: &str, body: &str, cookie: Option<String>) -> Response {
    page_to(status, title, body, cookie, None)
}

fn page_to(status: StatusCode, title: &str, body: &str, cookie: Option<String>, sent_to: Option<&str>) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{}</title><style>body{{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;color:#222}}\
         h1{{font-size:1.4rem}}.host{{font-size:1.2rem;font-weight:bold;background:#fff3cd;padding:.3rem .5rem}}\
         input[type=password]{{width:100%;padding:.5rem;font:inherit}}button{{font:inherit;padding:.5rem 1.2rem;margin:.8rem .5rem 0 0}}\
         .muted{{color:#666;font-size:.9rem}}a.button{{display:inline-block;padding:.5rem 1.2rem;background:#1f4e8c;color:#fff;text-decoration:none}}</style></head><body><h1>{}</h1>{body}\
         <p class=\"muted\">Portcullis</p></body></html>",
        esc(title),
        esc(title)
    );
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    let csp = format!(
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'{}; frame-ancestors 'none'",
        sent_to.map(|s| format!(" {s}")).unwrap_or_default()
    );
    if let Ok(v) = HeaderValue::from_str(&csp) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if let Some(c) = cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::SET_COOKIE, c);
    }
    r
}

/// A plain page with `body`.
pub(super) fn page_ok(title: &str, body: &str) -> Response {
    page(StatusCode::OK, title, body, None)
}

pub(super) fn error_page(status: StatusCode, message: &str) -> Response {
    page(status, "Cannot continue", &format!("<p>{}</p>", esc(message)), None)
}

/// An OAuth error answer of the token, registration and revocation endpoints.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut r = json(status, serde_json::json!({"error": error, "error_description": description}).to_string());
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The authorization server of this gateway's config, if on.
fn enabled(gw: &Gateway) -> Option<(Arc<crate::mcp::gateway::Snapshot>, crate::credentials::AuthorizationServerDef)> {
    let snap = gw.snapshot();
    let def = snap.auth.authorization_server()?.clone();
    Some((snap, def))
}

/// `GET /.well-known/oauth-authorization-server` and `/.well-known/openid-configuration`.
pub(crate) async fn metadata(State(gw): State<Arc<Gateway>>) -> Response {
    let Some((snap, def)) = enabled(&gw) else { return StatusCode::NOT_FOUND.into_response() };
    let base = snap.config.public_base();
    let mut doc = serde_json::json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/authorize"),
        "token_endpoint": format!("{base}/token"),
        "revocation_endpoint": format!("{base}/revoke"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": ["none"],
        "revocation_endpoint_auth_methods_supported": ["none"],
        "authorization_response_iss_parameter_supported": true,
        "client_id_metadata_document_supported": def.documents.is_some(),
        "scopes_supported": [],
    });
    if def.registration {
        doc["registration_endpoint"] = serde_json::Value::String(format!("{base}/register"));
    }
    json(StatusCode::OK, doc.to_string())
}

impl AuthorizationState {
    /// Counts one request of `client` against [`PER_ADDRESS_PER_MINUTE`]; false past it.
    fn admit(&self, client: IpAddr) -> bool {
        let mut m = lock(&self.per_address);
        let now = Instant::now();
        if m.len() >= 10_000 {
            m.retain(|_, (since, _)| now.duration_since(*since) < Duration::from_secs(60));
        }
        let e = m.entry(client).or_insert((now, 0));
        if now.duration_since(e.0) >= Duration::from_secs(60) {
            *e = (now, 0);
        }
        e.1 += 1;
        e.1 <= PER_ADDRESS_PER_MINUTE
    }
}

/// Whether a redirect URI may be registered: https, http on a loopback host (native apps,
/// RFC 8252 §7.3), or a private-use scheme (RFC 8252 §7.1); never with a fragment.
pub(crate) fn registrable(uri: &str) -> bool {
    let Ok(u) = reqwest::Url::parse(uri) else { return false };
    if u.fragment().is_some() {
        return false;
    }
    match u.scheme() {
        "https" => u.has_host(),
        "http" => u.host_str().is_some_and(crate::config::is_loopback_host),
        "javascript" | "data" | "file" | "vbscript" | "about" | "blob" | "ftp" | "ws" | "wss" => false,
        s => s.contains('.'),
    }
}

/// Whether `asked` is one of `registered`: exactly, or, for http on a loopback host, with any
/// port (RFC 8252 §7.3).
fn redirect_matches(registered: &[String], asked: &str) -> bool {
    if registered.iter().any(|r| r == asked) {
        return true;
    }
    let Ok(a) = reqwest::Url::parse(asked) else { return false };
    if a.scheme() != "http" || !a.host_str().is_some_and(crate::config::is_loopback_host) {
        return false;
    }
    registered.iter().filter_map(|r| reqwest::Url::parse(r).ok()).any(|r| {
        r.scheme() == "http"
            && r.host_str() == a.host_str()
            && r.path() == a.path()
            && r.query() == a.query()
            && a.fragment().is_none()
    })
}

/// `POST /register` (RFC 7591): public clients only (`token_endpoint_auth_method: none`).
pub(crate) async fn register(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some((snap, def)) = enabled(&gw) else { return StatusCode::NOT_FOUND.into_response() };
    if !def.registration {
        return StatusCode::NOT_FOUND.into_response();
    }
    if !gw.authorization().admit(snap.auth.client_addr(peer, &headers)) {
        return oauth_error(StatusCode::TOO_MANY_REQUESTS, "slow_down", "too many requests from this address");
    }
    #[derive(serde::Deserialize)]
    struct Metadata {
        redirect_uris: Option<Vec<String>>,
        client_name: Option<String>,
        grant_types: Option<Vec<String>>,
        response_types: Option<Vec<String>>,
    }
    let bad = |d: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_client_metadata", d);
    if body.len() > 64 * 1024 {
        return bad("the registration is larger than 64 KiB");
    }
    let Ok(m) = serde_json::from_slice::<Metadata>(&body) else { return bad("not a JSON client metadata document") };
    let uris = m.redirect_uris.unwrap_or_default();
    if uris.is_empty() || uris.len() > 10 {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_redirect_uri", "give one to ten redirect_uris");
    }
    if let Some(u) = uris.iter().find(|u| u.len() > 2048 || !registrable(u)) {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_redirect_uri",
            &format!("{u:?}: https, http on a loopback host, or an app's own scheme"),
        );
    }
    let ok_list = |v: &Option<Vec<String>>, allowed: &[&str]| {
        v.as_ref().is_none_or(|l| l.iter().all(|g| allowed.contains(&g.as_str())))
    };
    if !ok_list(&m.grant_types, &["authorization_code", "refresh_token"]) || !ok_list(&m.response_types, &["code"]) {
        return bad("only the authorization_code and refresh_token grants and the code response type");
    }
    let name = display_name(m.client_name.as_deref());
    let Ok(client_id) = crate::random::id() else {
        return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "no randomness");
    };
    let client = OAuthClient { client_id, name, redirect_uris: uris };
    let now = crate::store::now_ms();
    let stored = gw.store().writable().and_then(|s| s.oauth_add_client(&client, MAX_CLIENTS, now));
    if let Err(e) = stored {
        tracing::warn!(error = %e, "client registration failed");
        return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "the store cannot take it now");
    }
    let mut r = json(
        StatusCode::CREATED,
        serde_json::json!({
            "client_id": client.client_id,
            "client_id_issued_at": now / 1000,
            "client_name": client.name,
            "redirect_uris": client.redirect_uris,
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        })
        .to_string(),
    );
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A client's name as pages show it: no control characters, at most 100 characters.
pub(crate) fn display_name(name: Option<&str>) -> String {
    let name: String = name.unwrap_or_default().chars().filter(|c| !c.is_control()).take(100).collect();
    if name.trim().is_empty() { "an unnamed client".into() } else { name }
}

/// The client of a request: registered in the config, described by its metadata document (an
/// https client id), or registered by RFC 7591, in that order. Why not, as the page says it.
async fn client_of(
    gw: &Gateway,
    def: &crate::credentials::AuthorizationServerDef,
    id: &str,
) -> Result<OAuthClient, String> {
    if let Some(c) = def.clients.iter().find(|c| c.client_id == id) {
        return Ok(c.clone());
    }
    if super::cimd::is_document_id(id) {
        let Some(fetcher) = &def.documents else {
            return Err("This gateway does not accept client metadata documents.".into());
        };
        return gw.authorization().documents.client(fetcher, id).await.map_err(|e| format!("This application's {e}."));
    }
    let store =
        gw.store().writable().map_err(|_| "The gateway cannot look up applications now; try again.".to_owned())?;
    match store.oauth_client(id) {
        Ok(Some(c)) => Ok(c),
        Ok(None) => Err("This application is not registered here.".into()),
        Err(_) => Err("The gateway cannot look up applications now; try again.".into()),
    }
}

/// Where a response goes back to the client: its redirect URI with the parameters, `state`
/// and `iss` (RFC 9207).
pub(super) fn back(redirect_uri: &str, params: &[(&str, &str)], state: Option<&str>, iss: &str) -> Response {
    let Ok(mut u) = reqwest::Url::parse(redirect_uri) else {
        return error_page(StatusCode::BAD_REQUEST, "bad redirect URI");
    };
    {
        let mut q = u.query_pairs_mut();
        for (k, v) in params {
            q.append_pair(k, v);
        }
        if let Some(s) = state {
            q.append_pair("state", s);
        }
        q.append_pair("iss", iss);
    }
    let mut r = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(u.as_str()) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The MCP endpoint a `resource` names, as the server it addresses (`Some(None)`: the
/// aggregated one); None when it is none of this gateway's.
pub(super) fn resource_server(config: &crate::config::Config, resource: &str) -> Option<Option<String>> {
    // After the base, nothing or a path: `https://gw:8443/mcp` is not under `https://gw:84`.
    let path = resource.strip_prefix(config.public_base().as_str()).filter(|p| p.is_empty() || p.starts_with('/'))?;
    super::endpoint_of(config, path).map(|s| s.map(str::to_owned))
}

/// `GET /authorize`.
pub(crate) async fn authorize(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let Some((snap, def)) = enabled(&gw) else { return StatusCode::NOT_FOUND.into_response() };
    if !gw.authorization().admit(snap.auth.client_addr(peer, &headers)) {
        return error_page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests from this address; try again in a minute.",
        );
    }
    let Some(q) = params(query.unwrap_or_default().as_bytes()) else {
        return error_page(StatusCode::BAD_REQUEST, "A parameter is given twice.");
    };
    let config = &snap.config;
    let iss = config.public_base();
    // Until the client and its redirect URI are known, nothing is redirected anywhere.
    let Some(client_id) = q.get("client_id") else {
        return error_page(StatusCode::BAD_REQUEST, "The application did not say who it is (client_id).");
    };
    let client = match client_of(&gw, &def, client_id).await {
        Ok(c) => c,
        Err(why) => return error_page(StatusCode::BAD_REQUEST, &why),
    };
    let Some(redirect_uri) = q.get("redirect_uri").filter(|r| redirect_matches(&client.redirect_uris, r)).cloned()
    else {
        return error_page(
            StatusCode::BAD_REQUEST,
            "The address this application asked to be sent back to is not one it registered.",
        );
    };
    let state = q.get("state").filter(|s| s.len() <= 1024).cloned();
    let fail = |error: &str, description: &str| {
        back(&redirect_uri, &[("error", error), ("error_description", description)], state.as_deref(), &iss)
    };
    if q.get("response_type").map(String::as_str) != Some("code") {
        return fail("unsupported_response_type", "only the code response type");
    }
    let Some(challenge) = q.get("code_challenge").filter(|c| (43..=128).contains(&c.len())).cloned() else {
        return fail("invalid_request", "PKCE is required: code_challenge with code_challenge_method S256");
    };
    if q.get("code_challenge_method").map(String::as_str) != Some("S256") {
        return fail("invalid_request", "PKCE with S256 only");
    }
    // RFC 8707: one of this gateway's MCP endpoints (the aggregated one when none is named).
    let resource = q.get("resource").cloned().unwrap_or_else(|| format!("{iss}/mcp"));
    if resource_server(config, &resource).is_none() {
        return fail("invalid_target", "resource is none of this gateway's MCP endpoints");
    }
    let (Ok(cookie), Ok(csrf), Ok(id)) = (crate::random::id(), crate::random::id(), crate::random::id()) else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again.");
    };
    let pending = Pending {
        client,
        redirect_uri,
        state,
        challenge,
        resource,
        scope: q.get("scope").filter(|s| !s.trim().is_empty() && s.len() <= 1024).cloned(),
        browser: crate::credentials::digest(&cookie),
        csrf: csrf.clone(),
        login: None,
        federation: None,
        expires: expires_in(PENDING_LIFETIME),
    };
    if let Err(e) = pending.keep(&gw, &id) {
        return e.into_response();
    }
    let secure = if iss.starts_with("https://") { "; Secure" } else { "" };
    let set_cookie = format!("{COOKIE}={cookie}; Path=/authorize; HttpOnly; SameSite=Lax; Max-Age=600{secure}");
    // With the provider the only way in, the person goes there at once.
    if !def.token_login
        && let Some(provider) = &def.provider
    {
        let mut r = super::federation::start(&gw, provider, &id, pending).await;
        if let Ok(v) = HeaderValue::from_str(&set_cookie) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        return r;
    }
    login_page(&def, &id, &csrf, None, Some(set_cookie))
}

fn login_page(
    def: &crate::credentials::AuthorizationServerDef,
    id: &str,
    csrf: &str,
    problem: Option<&str>,
    cookie: Option<String>,
) -> Response {
    let problem = problem.map(|p| format!("<p role=\"alert\"><strong>{}</strong></p>", esc(p))).unwrap_or_default();
    let federated = def
        .provider
        .as_ref()
        .map(|p| {
            let host =
                reqwest::Url::parse(&p.issuer).ok().and_then(|u| u.host_str().map(str::to_owned)).unwrap_or_default();
            let query = form_urlencoded::Serializer::new(String::new())
                .append_pair("request", id)
                .append_pair("csrf", csrf)
                .finish();
            format!(
                "<p><a class=\"button\" href=\"/authorize/federate?{}\">Sign in with your organization ({})</a></p>",
                esc(&query),
                esc(&host)
            )
        })
        .unwrap_or_default();
    let token_form = if def.token_login {
        format!(
            "<form method=\"post\" action=\"/authorize\"><input type=\"hidden\" name=\"request\" value=\"{}\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"action\" value=\"login\">\
             <label for=\"token\">Portcullis token</label><input id=\"token\" type=\"password\" name=\"token\" autocomplete=\"off\" required autofocus>\
             <button type=\"submit\">Sign in</button></form>",
            esc(id),
            esc(csrf)
        )
    } else {
        String::new()
    };
    let how = if def.token_login { "Sign in with your Portcullis token" } else { "Sign in" };
    let body = format!(
        "<p>An application wants to use this gateway's MCP servers on your behalf. {how} \
         (once: the application then gets tokens of its own, with no more than yours).</p>{problem}{federated}{token_form}"
    );
    page(
        if problem.is_empty() { StatusCode::OK } else { StatusCode::UNAUTHORIZED },
        "Sign in to Portcullis",
        &body,
        cookie,
    )
}

fn consent_page(id: &str, p: &Pending, login: &Login) -> Response {
    let host = reqwest::Url::parse(&p.redirect_uri)
        .ok()
        .map(|u| match (u.host_str(), u.port()) {
            (Some(h), Some(port)) => format!("{h}:{port}"),
            (Some(h), None) => h.to_owned(),
            (None, _) => u.scheme().to_owned(),
        })
        .unwrap_or_default();
    // The specification asks for a warning when the answer goes to this computer only: any
    // program on it could be the one listening.
    let local = reqwest::Url::parse(&p.redirect_uri)
        .ok()
        .is_some_and(|u| u.scheme() == "http" && u.host_str().is_some_and(crate::config::is_loopback_host));
    let local = if local {
        "<p class=\"muted\"><strong>This address is on your own computer</strong>: approve only if you \
         started this in an application running here.</p>"
    } else {
        ""
    };
    let scopes = p
        .scope
        .as_deref()
        .map(|s| {
            format!(
                "<p class=\"muted\">It asks for the scopes <code>{}</code>: it gets what you may reach, no more.</p>",
                esc(s)
            )
        })
        .unwrap_or_default();
    let identified = if super::cimd::is_document_id(&p.client.client_id) {
        format!("<p class=\"muted\">It identifies itself as <code>{}</code>.</p>", esc(&p.client.client_id))
    } else {
        String::new()
    };
    let servers = if login.servers.is_empty() {
        "every server you can reach".to_owned()
    } else {
        login.servers.iter().map(|s| format!("<code>{}</code>", esc(s))).collect::<Vec<_>>().join(", ")
    };
    let body = format!(
        "<p>Signed in as <strong>{}</strong>.</p><p><strong>{}</strong> asks to use, as you:</p>{identified}\
         <p>{servers} at <code>{}</code></p>{scopes}<p>After you approve, you are sent to</p><p class=\"host\">{}</p>{local}\
         <p class=\"muted\">Approve only if you started this from that application.</p>\
         <form method=\"post\" action=\"/authorize\"><input type=\"hidden\" name=\"request\" value=\"{}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\" name=\"action\" value=\"approve\">Approve</button>\
         <button type=\"submit\" name=\"action\" value=\"deny\">Deny</button></form>",
        esc(&login.name),
        esc(&p.client.name),
        esc(&p.resource),
        esc(&host),
        esc(id),
        esc(&p.csrf)
    );
    // The approval (or denial) is redirected to the client: its origin (or its app's scheme).
    let target = reqwest::Url::parse(&p.redirect_uri).ok().map(|u| match u.scheme() {
        "http" | "https" => u.origin().ascii_serialization(),
        scheme => format!("{scheme}:"),
    });
    page_to(StatusCode::OK, "Allow access?", &body, None, target.as_deref())
}

/// What an identity's grants are as stored lists (None when they reach no server: an empty
/// list would mean every server).
fn stored_grants(g: &crate::authz::Grants) -> Option<(StoredGrants, Vec<String>)> {
    let servers: Vec<String> = match &g.servers {
        None => Vec::new(),
        Some(s) if s.is_empty() => return None,
        Some(s) => s.iter().cloned().collect(),
    };
    let list = |p: &crate::authz::Patterns| -> Vec<String> {
        p.allow.iter().map(|a| a.as_str().to_owned()).chain(p.deny.iter().map(|d| format!("!{}", d.as_str()))).collect()
    };
    let stored = StoredGrants {
        servers: servers.clone(),
        tools: list(&g.tools),
        prompts: list(&g.prompts),
        resources: list(&g.resources),
    };
    Some((stored, servers))
}

/// `POST /authorize`: the login and consent forms.
pub(crate) async fn decide(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some((snap, def)) = enabled(&gw) else { return StatusCode::NOT_FOUND.into_response() };
    let Some(form) = params(&body) else { return error_page(StatusCode::BAD_REQUEST, "A field is given twice.") };
    let iss = snap.config.public_base();
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let id = field("request").to_owned();
    let p = match check(&gw, &id, field("csrf"), &headers) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    match field("action") {
        "login" if def.token_login => {
            let client = snap.auth.client_addr(peer, &headers);
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {}", field("token").trim())) {
                h.insert(header::AUTHORIZATION, v);
            }
            // Counted by the failure throttle like any other wrong token.
            let identity = match snap.auth.authenticate(&h, client) {
                Ok(i) if i.key.as_ref() != "anonymous" && i.role != crate::credentials::Role::Metrics => i,
                Ok(_) | Err(_) => {
                    return login_page(&def, &id, &p.csrf, Some("That token is not one that can sign in here."), None);
                }
            };
            signed_in(&gw, &snap, &id, p, &identity)
        }
        action @ ("approve" | "deny") => {
            // One answer per authorization, whichever replica the forms reach.
            let p = match Pending::take(&gw, &id) {
                Ok(Some(p)) => p,
                Ok(None) => return error_page(StatusCode::BAD_REQUEST, "Start again."),
                Err(e) => return e.into_response(),
            };
            let Some(login) = p.login.clone() else { return error_page(StatusCode::BAD_REQUEST, "Sign in first.") };
            if action == "deny" {
                return back(&p.redirect_uri, &[("error", "access_denied")], p.state.as_deref(), &iss);
            }
            remember_consent(&gw, &p, &login);
            issue_code(&gw, p, login, &iss)
        }
        _ => error_page(StatusCode::BAD_REQUEST, "Unknown action."),
    }
}

/// Why a form (or the provider's callback) is not taken for an authorization.
#[derive(Debug, thiserror::Error)]
pub(super) enum NotThisForm {
    /// No such authorization in progress (expired, finished, or never started).
    #[error("This sign-in has expired or is unknown; start again from the application.")]
    Unknown,
    /// Its CSRF token or browser cookie does not match.
    #[error("This form was not sent by the page it belongs to.")]
    Forged,
    /// The store could not say.
    #[error(transparent)]
    Held(#[from] HeldError),
}

impl IntoResponse for NotThisForm {
    fn into_response(self) -> Response {
        let status = match self {
            NotThisForm::Unknown => StatusCode::BAD_REQUEST,
            NotThisForm::Forged => StatusCode::FORBIDDEN,
            NotThisForm::Held(e) => return e.into_response(),
        };
        error_page(status, &self.to_string())
    }
}

/// The browser cookie of an authorization, from a request's headers.
fn browser_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")).map(str::to_owned))
}

/// The authorization in progress `id`, if the request comes from the browser that started it
/// (its cookie).
pub(super) fn in_browser(gw: &Gateway, id: &str, headers: &HeaderMap) -> Result<Pending, NotThisForm> {
    let p = Pending::find(gw, id)?.ok_or(NotThisForm::Unknown)?;
    let cookie = browser_cookie(headers);
    if cookie.as_deref().is_some_and(|c| crate::credentials::digest(c) == p.browser) {
        Ok(p)
    } else {
        Err(NotThisForm::Forged)
    }
}

/// The authorization in progress a form (or link) belongs to: `id`, from the browser that
/// started it, with the CSRF token of its last page.
pub(super) fn check(gw: &Gateway, id: &str, csrf: &str, headers: &HeaderMap) -> Result<Pending, NotThisForm> {
    let p = in_browser(gw, id, headers)?;
    if !p.csrf.is_empty() && crate::credentials::digest(csrf) == crate::credentials::digest(&p.csrf) {
        Ok(p)
    } else {
        Err(NotThisForm::Forged)
    }
}

/// Gives the client its code: the redirect back with it.
fn issue_code(gw: &Gateway, p: Pending, login: Login, iss: &str) -> Response {
    let Ok(code) = crate::random::id() else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again.");
    };
    let held = Code {
        client_id: p.client.client_id.clone(),
        redirect_uri: p.redirect_uri.clone(),
        challenge: p.challenge,
        resource: p.resource,
        login,
        used_by: None,
    };
    match hold(gw, CODE, &crate::credentials::digest(&code), &held, expires_in(CODE_LIFETIME), false) {
        Ok(true) => back(&p.redirect_uri, &[("code", &code)], p.state.as_deref(), iss),
        // Another code under the same digest: 256 random bits make it never happen.
        Ok(false) => error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again."),
        Err(e) => e.into_response(),
    }
}

/// A person signed in (with a token, or at the provider) for authorization `id`: if they may
/// reach what the client asked for, the consent page, or straight back to the client with a
/// code when they consented to this client and resource before.
pub(super) fn signed_in(
    gw: &Gateway,
    snap: &crate::mcp::gateway::Snapshot,
    id: &str,
    mut p: Pending,
    identity: &crate::auth::Identity,
) -> Response {
    let server = resource_server(&snap.config, &p.resource).flatten();
    let Some((grants, servers)) =
        stored_grants(&identity.grants).filter(|_| server.as_deref().is_none_or(|s| identity.grants.reaches(s)))
    else {
        let _ = Pending::take(gw, id);
        return error_page(StatusCode::FORBIDDEN, "You cannot reach the servers this application asked for.");
    };
    let login = Login {
        key: identity.key.to_string(),
        name: identity.name.to_string(),
        tenant: identity.tenant.clone().unwrap_or_default(),
        grants,
        servers,
    };
    let remembered = gw
        .store()
        .writable()
        .and_then(|s| s.oauth_consented(&login.key, &p.client.client_id, &p.resource, crate::store::now_ms()))
        .unwrap_or(false);
    if remembered {
        let p = match Pending::take(gw, id) {
            Ok(Some(p)) => p,
            Ok(None) => return error_page(StatusCode::BAD_REQUEST, "Start again."),
            Err(e) => return e.into_response(),
        };
        return issue_code(gw, p, login, &snap.config.public_base());
    }
    // A new CSRF token for the next form.
    if let Ok(c) = crate::random::id() {
        p.csrf = c;
    }
    p.login = Some(login.clone());
    if let Err(e) = p.keep(gw, id) {
        return e.into_response();
    }
    consent_page(id, &p, &login)
}

/// Remembers an approval, so that the person is not asked again for this client and resource
/// (until they or an administrator withdraw it). A store that cannot take it costs only that.
fn remember_consent(gw: &Gateway, p: &Pending, login: &Login) {
    let remembered = crate::store::new_id().and_then(|id| {
        let consent = crate::store::Consent {
            id: id.replacen("tok_", "con_", 1),
            login: login.key.clone(),
            name: login.name.clone(),
            tenant: login.tenant.clone(),
            client_id: p.client.client_id.clone(),
            client_name: p.client.name.clone(),
            resource: p.resource.clone(),
            created_at: crate::store::now_ms(),
            used_at: None,
        };
        gw.store().writable()?.oauth_consent(&consent)
    });
    if let Err(e) = remembered {
        tracing::warn!(error = %e, "the consent could not be remembered");
    }
}

/// `POST /token`.
pub(crate) async fn token(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some((snap, def)) = enabled(&gw) else { return StatusCode::NOT_FOUND.into_response() };
    let Some(form) = params(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "a parameter is given twice");
    };
    if !gw.authorization().admit(snap.auth.client_addr(peer, &headers)) {
        return oauth_error(StatusCode::TOO_MANY_REQUESTS, "slow_down", "too many requests from this address");
    }
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
    let invalid = |d: &str| oauth_error(StatusCode::BAD_REQUEST, "invalid_grant", d);
    let store = match gw.store().writable() {
        Ok(s) => s,
        Err(_) => {
            return oauth_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "the store cannot answer now",
            );
        }
    };
    let now = crate::store::now_ms();
    let issued = match field("grant_type") {
        "authorization_code" => {
            let (client_id, verifier) = (field("client_id"), field("code_verifier"));
            let key = crate::credentials::digest(field("code"));
            let unavailable = || {
                oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "the store cannot answer now")
            };
            let Ok(found) = store.held_get(CODE, &key, now) else { return unavailable() };
            let Some((held, code)) = found.and_then(|d| open_held::<Code>(&gw, CODE, &d).map(|c| (d, c))) else {
                return invalid("unknown or expired code");
            };
            let reused = |family: &str| {
                // A code used twice: whatever it gave is revoked (RFC 6749 §4.1.2).
                let _ = store.oauth_revoke_family(family, now);
                let _ = gw.store().poll();
                invalid("the code was used before; its tokens are revoked")
            };
            if let Some(family) = &code.used_by {
                return reused(family);
            }
            let challenge =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(crate::credentials::digest(verifier));
            if code.client_id != client_id
                || code.redirect_uri != field("redirect_uri")
                || !(43..=128).contains(&verifier.len())
                || challenge != code.challenge
                || form.get("resource").is_some_and(|r| *r != code.resource)
            {
                return invalid("the code, client, redirect URI, code_verifier or resource do not match");
            }
            let Ok(family) = crate::store::new_id() else { return invalid("try again") };
            let mut used = code;
            used.used_by = Some(family.clone());
            let Ok(marked) = seal_held(&gw, CODE, &used) else { return unavailable() };
            // Of exchanges racing on any replicas, the one whose mark lands wins; the others
            // find the code used, and revoke what the winner got.
            match store.held_swap(CODE, &key, &held, &marked) {
                Ok(true) => {}
                Ok(false) => {
                    let winner = store.held_get(CODE, &key, now).ok().flatten();
                    let winner = winner.and_then(|d| open_held::<Code>(&gw, CODE, &d)).and_then(|c| c.used_by);
                    return match winner {
                        Some(family) => reused(&family),
                        None => invalid("unknown or expired code"),
                    };
                }
                Err(_) => return unavailable(),
            }
            let code = used;
            let grant = OAuthGrant {
                family,
                client_id: code.client_id.clone(),
                audience: code.resource.clone(),
                login: code.login.key.clone(),
                name: code.login.name.clone(),
                tenant: code.login.tenant.clone(),
                grants: code.login.grants.clone(),
            };
            store.oauth_issue(&grant, def.access_ttl, def.refresh_ttl, now).map_err(RefreshError::Store)
        }
        "refresh_token" => {
            // The login behind it must still hold: revoking the token a person signed in with
            // ends what their clients got from it.
            let auth = snap.auth.clone();
            let provider = def.provider.as_ref().map(|p| p.issuer.clone());
            let holds = move |g: &OAuthGrant| match g.login.split_once(':') {
                Some(("config", name)) => {
                    auth.current(name).is_some_and(|i| *i.key == *g.login && !i.expired(std::time::SystemTime::now()))
                }
                Some(("issued", lineage)) => auth.store_token_usable(lineage) == Some(true),
                // Signed in at the provider: while it is still the one people sign in through.
                Some(("oauth", subject)) => provider
                    .as_deref()
                    .is_some_and(|issuer| subject.strip_prefix(issuer).is_some_and(|rest| rest.starts_with('#'))),
                _ => false,
            };
            store.oauth_refresh(
                field("refresh_token"),
                field("client_id"),
                (def.access_ttl, def.refresh_ttl),
                now,
                holds,
            )
        }
        _ => {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "authorization_code or refresh_token",
            );
        }
    };
    // The gateway's view of the store moves at once (a revoked family is refused from now).
    let _ = gw.store().poll();
    match issued {
        Ok(t) => {
            let mut r = json(
                StatusCode::OK,
                serde_json::json!({
                    "access_token": t.access_secret,
                    "token_type": "Bearer",
                    "expires_in": def.access_ttl.as_secs(),
                    "refresh_token": t.refresh_secret,
                })
                .to_string(),
            );
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(RefreshError::Invalid) => invalid("unknown, expired or revoked refresh token"),
        Err(RefreshError::Reused) => invalid("the refresh token was used before; its family is revoked"),
        Err(RefreshError::Store(e)) => {
            tracing::warn!(error = %e, "token issue failed");
            oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "the store cannot answer now")
        }
    }
}

/// `POST /revoke` (RFC 7009): always 200 for a well-formed request.
pub(crate) async fn revoke(State(gw): State<Arc<Gateway>>, body: axum::body::Bytes) -> Response {
    if enabled(&gw).is_none() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let Some(form) = params(&body) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "a parameter is given twice");
    };
    let Some(token) = form.get("token").filter(|t| !t.is_empty()) else {
        return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "token is required");
    };
    let done = gw.store().writable().and_then(|s| s.oauth_revoke(token, crate::store::now_ms()));
    if let Err(e) = done {
        tracing::warn!(error = %e, "revocation failed");
        return oauth_error(StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable", "the store cannot answer now");
    }
    let _ = gw.store().poll();
    StatusCode::OK.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_is_one_of_this_gateway_s_endpoints() {
        let text = "listen: 127.0.0.1:84\npublic_url: https://gw:84\nservers:\n  '43': {command: echo}\n  b: {command: echo}\n";
        let config = crate::config::parse(text, false, &crate::config::Env::from_pairs([])).unwrap();
        assert_eq!(resource_server(&config, "https://gw:84/mcp"), Some(None));
        assert_eq!(resource_server(&config, "https://gw:84"), Some(None));
        assert_eq!(resource_server(&config, "https://gw:84/servers/b/mcp"), Some(Some("b".into())));
        assert_eq!(resource_server(&config, "https://gw:8443/mcp"), None, "another port, with a server named 43");
        assert_eq!(resource_server(&config, "https://gw:84/servers/b/mcp/"), None);
        assert_eq!(resource_server(&config, "https://gw:84/servers/nope/mcp"), None);
    }

    #[test]
    fn escaping_covers_text_and_attributes() {
        assert_eq!(esc(r#"<script>"x"&'y'</script>"#), "&lt;script&gt;&quot;x&quot;&amp;&#39;y&#39;&lt;/script&gt;");
    }

    #[test]
    fn redirect_uris_are_exact_but_loopback_ports() {
        let reg = vec!["http://127.0.0.1/callback".to_owned(), "https://app.example/cb".to_owned()];
        assert!(redirect_matches(&reg, "https://app.example/cb"));
        assert!(!redirect_matches(&reg, "https://app.example/cb/"));
        assert!(!redirect_matches(&reg, "https://app.example/cc"));
        assert!(redirect_matches(&reg, "http://127.0.0.1:53117/callback"));
        assert!(!redirect_matches(&reg, "http://127.0.0.1:53117/callbacks"));
        assert!(!redirect_matches(&reg, "http://localhost:53117/callback"), "another host");
        assert!(registrable("https://claude.ai/api/mcp/auth_callback"));
        assert!(registrable("http://localhost:3000/cb"));
        assert!(registrable("com.example.app:/oauth"));
        assert!(!registrable("http://evil.example/cb"));
        assert!(!registrable("javascript:alert(1)"));
        assert!(!registrable("https://app.example/cb#frag"));
    }
}
