//! Signing people in to Portcullis' authorization server through the operator's OpenID
//! provider (`oauth.authorization_server.login.provider`): Portcullis is the provider's
//! confidential client (authorization code with PKCE S256, `state` and `nonce`), and the ID token
//! it gets back, verified with the keys of the matching `oauth.issuers` entry, says who the
//! person is; that entry's identity claim, scopes, roles and tenants say what they reach, exactly
//! as for an access token of that issuer.
//!
//! Invariants: the callback is taken only for an authorization in progress, in the browser
//! that started it (its cookie), with the `state` sent for it, once; an `iss` in the callback
//! must be the provider's (RFC 9207); the ID token's signature, issuer, audience (Portcullis'
//! client id), expiry and `nonce` must all hold; allowed domains need a verified email and
//! allowed groups a group; the provider's client secret and tokens are never logged or shown.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;

use super::server::{FEDERATION, Pending, back, check, error_page, held, hold, in_browser, signed_in};
use crate::credentials::LoginProvider;
use crate::mcp::gateway::Gateway;

/// A sign-in at the provider, while it is under way (held with its authorization in the store).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Started {
    /// The `state` sent to the provider.
    state: String,
    /// The PKCE verifier.
    verifier: String,
    /// The `nonce` the ID token must carry.
    nonce: String,
    /// Where the code is exchanged.
    token_endpoint: String,
}

/// Why a sign-in at the provider did not give a person.
#[derive(Debug, thiserror::Error)]
enum FederationError {
    /// The provider could not be reached or answered nonsense (its fault, or the network's).
    #[error("the sign-in provider cannot be reached or did not answer as expected ({0})")]
    Provider(String),
    /// The ID token does not hold.
    #[error("the sign-in provider's answer could not be verified")]
    Unverified,
    /// The person is not one the config lets in.
    #[error("{0}")]
    NotAllowed(&'static str),
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Sends the person of authorization `id` to the provider: the redirect to its authorization
/// endpoint (found in its metadata), with what the callback will check recorded.
pub(super) async fn start(gw: &Gateway, provider: &LoginProvider, id: &str, mut p: Pending) -> Response {
    let found = super::server_metadata(&super::http_client(), &provider.issuer, |m| {
        Some((m.authorization_endpoint.clone()?, m.token_endpoint.clone()?))
    })
    .await;
    let (authorize, token_endpoint) = match found {
        Ok(Some(endpoints)) => endpoints,
        Ok(None) | Err(_) => {
            tracing::warn!(issuer = %provider.issuer, "the sign-in provider's metadata names no authorization and token endpoints");
            return error_page(StatusCode::BAD_GATEWAY, "The sign-in provider cannot be reached now; try again later.");
        }
    };
    let (Ok(state), Ok(verifier), Ok(nonce)) = (crate::random::id(), crate::random::id(), crate::random::id()) else {
        return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again.");
    };
    let challenge = b64(&crate::credentials::digest(&verifier));
    let redirect_uri = callback_uri(gw);
    let Ok(mut url) = reqwest::Url::parse(&authorize) else {
        return error_page(StatusCode::BAD_GATEWAY, "The sign-in provider's authorization endpoint is not a URL.");
    };
    url.query_pairs_mut()
        .append_pair("response_type", "code")
        .append_pair("client_id", &provider.client_id)
        .append_pair("redirect_uri", &redirect_uri)
        .append_pair("scope", &provider.scopes.join(" "))
        .append_pair("state", &state)
        .append_pair("nonce", &nonce)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    // The callback finds the authorization by its `state`, on whichever replica it lands.
    let found = crate::credentials::digest(&state);
    let expires = p.expires;
    p.federation = Some(Started { state, verifier, nonce, token_endpoint });
    let kept = p.keep(gw, id).and_then(|()| hold(gw, FEDERATION, &found, &id, expires, false));
    match kept {
        Ok(true) => {}
        Ok(false) => return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again."),
        Err(e) => return e.into_response(),
    }
    let mut r = StatusCode::FOUND.into_response();
    if let Ok(v) = axum::http::HeaderValue::from_str(url.as_str()) {
        r.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    r.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
    r
}

/// Portcullis' redirect URI at the provider.
fn callback_uri(gw: &Gateway) -> String {
    format!("{}/authorize/callback", gw.snapshot().config.public_base())
}

fn query(raw: Option<String>) -> HashMap<String, String> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).into_owned().collect()
}

/// `GET /authorize/federate?request=…&csrf=…`: the login page's link to the provider.
pub(crate) async fn federate(State(gw): State<Arc<Gateway>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let snap = gw.snapshot();
    let Some(provider) = snap.auth.authorization_server().and_then(|d| d.provider.clone()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let q = query(raw);
    let id = q.get("request").cloned().unwrap_or_default();
    match check(&gw, &id, q.get("csrf").map(String::as_str).unwrap_or_default(), &headers) {
        Ok(p) => start(&gw, &provider, &id, p).await,
        Err(refused) => refused.into_response(),
    }
}

/// `GET /authorize/callback`: the provider sends the person back.
pub(crate) async fn callback(State(gw): State<Arc<Gateway>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let snap = gw.snapshot();
    let Some(provider) = snap.auth.authorization_server().and_then(|d| d.provider.clone()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let q = query(raw);
    let given = q.get("state").map(String::as_str).unwrap_or_default();
    let unknown = || {
        error_page(StatusCode::BAD_REQUEST, "This sign-in has expired or is unknown; start again from the application.")
    };
    if given.is_empty() {
        return unknown();
    }
    // The authorization this answer belongs to, its sign-in taken (a state works once).
    let id = match held::<String>(&gw, FEDERATION, &crate::credentials::digest(given), true) {
        Ok(Some(id)) => id,
        Ok(None) => return unknown(),
        Err(e) => return e.into_response(),
    };
    let mut p = match in_browser(&gw, &id, &headers) {
        Ok(p) => p,
        Err(refused) => return refused.into_response(),
    };
    let Some(started) =
        p.federation.take().filter(|f| crate::credentials::digest(&f.state) == crate::credentials::digest(given))
    else {
        return unknown();
    };
    if q.get("iss").is_some_and(|iss| *iss != provider.issuer) {
        return error_page(StatusCode::BAD_REQUEST, "The answer came from another provider than the one asked.");
    }
    let iss = snap.config.public_base();
    if let Some(error) = q.get("error") {
        tracing::info!(error = %crate::store::printable(error), "the sign-in provider refused the sign-in");
        // The person refused (or the provider did): the client hears it as a denial.
        let p = match Pending::take(&gw, &id) {
            Ok(Some(p)) => p,
            Ok(None) => return error_page(StatusCode::BAD_REQUEST, "Start again."),
            Err(e) => return e.into_response(),
        };
        return back(&p.redirect_uri, &[("error", "access_denied")], p.state.as_deref(), &iss);
    }
    let Some(code) = q.get("code") else { return error_page(StatusCode::BAD_REQUEST, "The provider sent no code.") };
    let identity = match person(&gw, &snap, &provider, &started, code).await {
        Ok(i) => i,
        Err(e) => {
            match &e {
                FederationError::Provider(_) => {
                    tracing::warn!(issuer = %provider.issuer, error = %e, "federated sign-in failed")
                }
                _ => tracing::info!(issuer = %provider.issuer, error = %e, "federated sign-in refused"),
            }
            let _ = Pending::take(&gw, &id);
            let status = match e {
                FederationError::Provider(_) => StatusCode::BAD_GATEWAY,
                FederationError::Unverified | FederationError::NotAllowed(_) => StatusCode::FORBIDDEN,
            };
            return error_page(status, &format!("{}.", capitalized(&e.to_string())));
        }
    };
    signed_in(&gw, &snap, &id, p, &identity)
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
}

/// Exchanges the code and verifies the ID token: the person, as an identity of the issuer.
async fn person(
    gw: &Gateway,
    snap: &crate::mcp::gateway::Snapshot,
    provider: &LoginProvider,
    started: &Started,
    code: &str,
) -> Result<Arc<crate::auth::Identity>, FederationError> {
    let enc = |v: &str| form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>();
    let body = form_urlencoded::Serializer::new(String::new())
        .append_pair("grant_type", "authorization_code")
        .append_pair("code", code)
        .append_pair("redirect_uri", &callback_uri(gw))
        .append_pair("code_verifier", &started.verifier)
        .finish();
    let resp = super::http_client()
        .post(&started.token_endpoint)
        // RFC 6749 §2.3.1: the credentials are form-encoded before they are joined.
        .basic_auth(enc(&provider.client_id), Some(enc(&provider.client_secret)))
        .header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(reqwest::header::ACCEPT, "application/json")
        .body(body)
        .send()
        .await
        .map_err(|e| FederationError::Provider(e.without_url().to_string()))?;
    let status = resp.status();
    let body =
        super::read_body(resp, &started.token_endpoint).await.map_err(|e| FederationError::Provider(e.to_string()))?;
    if !status.is_success() {
        return Err(FederationError::Provider(format!("the token endpoint answered {status}")));
    }
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        id_token: Option<String>,
        scope: Option<String>,
    }
    let t: TokenResponse = serde_json::from_slice(&body)
        .map_err(|_| FederationError::Provider("the token endpoint's answer is not JSON".into()))?;
    let id_token = t.id_token.ok_or_else(|| FederationError::Provider("no id_token in the answer".into()))?;
    let issuer = snap
        .auth
        .providers()
        .iter()
        .find(|p| p.def.issuer == provider.issuer)
        .cloned()
        .ok_or(FederationError::Unverified)?;
    let def = issuer.def.clone();
    let audiences = [provider.client_id.clone()];
    let policy = super::jwt::Policy {
        issuer: &def.issuer,
        audiences: &audiences,
        algorithms: &def.algorithms,
        leeway: def.leeway,
        require_at_jwt: false,
    };
    let mut keys = issuer.keys();
    let mut claims = super::jwt::verify(&id_token, &policy, &keys);
    if matches!(claims, Err(super::jwt::JwtError::UnknownKey(_)))
        && issuer.refetch_for_unknown_key(keys.generation).await
    {
        keys = issuer.keys();
        claims = super::jwt::verify(&id_token, &policy, &keys);
    }
    let mut claims = claims.map_err(|e| {
        tracing::debug!(reason = %e, "ID token refused");
        FederationError::Unverified
    })?;
    // OpenID Connect Core §3.1.3.7: with several audiences, the authorized party is Portcullis.
    if claims.aud.values().len() > 1
        && claims.other.get("azp").and_then(|a| a.as_str()) != Some(provider.client_id.as_str())
    {
        return Err(FederationError::Unverified);
    }
    let nonce = claims.other.get("nonce").and_then(|n| n.as_str()).unwrap_or_default();
    if crate::credentials::digest(nonce) != crate::credentials::digest(&started.nonce) {
        return Err(FederationError::Unverified);
    }
    if !provider.allowed_domains.is_empty() {
        let verified = claims.other.get("email_verified").and_then(|v| v.as_bool()) == Some(true);
        let domain = claims
            .other
            .get("email")
            .and_then(|v| v.as_str())
            .and_then(|e| e.rsplit_once('@'))
            .map(|(_, d)| d.to_ascii_lowercase());
        if !verified || !domain.is_some_and(|d| provider.allowed_domains.contains(&d)) {
            return Err(FederationError::NotAllowed("your account's email is not in a domain allowed here"));
        }
    }
    if !provider.allowed_groups.is_empty() {
        let groups: Vec<&str> = match claims.other.get(def.groups_claim.as_str()) {
            Some(serde_json::Value::String(g)) => vec![g.as_str()],
            Some(serde_json::Value::Array(gs)) => gs.iter().filter_map(|g| g.as_str()).collect(),
            _ => Vec::new(),
        };
        if !groups.iter().any(|g| provider.allowed_groups.iter().any(|a| a == g)) {
            return Err(FederationError::NotAllowed("your account is in no group allowed here"));
        }
    }
    // What the person reaches comes from the scopes the provider granted this sign-in (its
    // token response says them; an ID token does not carry them).
    if claims.scope.is_none() && claims.scp.is_none() {
        claims.scope = t.scope;
    }
    let identity = snap.auth.token_identity(&def, &claims).ok_or(FederationError::Unverified)?;
    if identity.role == crate::credentials::Role::Metrics {
        return Err(FederationError::NotAllowed("your account may only read metrics"));
    }
    Ok(identity)
}
