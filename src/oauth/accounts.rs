//! Per-user upstream accounts (`credentials: per_user` on a server): each downstream identity
//! links its own account at the server's authorization server and reaches the server as
//! itself. An identity without one is given a link: a URL-mode elicitation for clients that
//! declared it (2025-11-25 and later), else a JSON-RPC error carrying the URL. The link page runs
//! the authorization code flow in the person's browser and seals the tokens into the vault for
//! that identity and server; `/accounts` lists and unlinks them.
//!
//! Invariants: a link URL is a ticket signed with a key derived from the vault's, naming the
//! server and the identity, that expires within [`TICKET_LIFETIME`] and works once (so only
//! the identity the gateway authenticated can link an account to itself, and a leaked link
//! cannot tie another upstream account to it later); the callback is taken once, for the
//! `state` sent, in the browser that started it (a cookie); one identity's account is never used
//! for another (the token source is keyed by server and identity, and the vault row by both).
//! A link in progress and the tickets used are held in the store (sealed, see `server::hold`:
//! a link carries the upstream client's secret), so the callback may reach any replica.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hmac::{KeyInit, Mac};

use super::login::Begun;
use super::server::{error_page, esc, expires_in};
use crate::mcp::gateway::Gateway;

/// How long a link URL works.
pub(crate) const TICKET_LIFETIME: Duration = Duration::from_secs(15 * 60);
/// How long a link started may wait for the person.
const LINK_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// The cookie that ties a link's callback to the browser that started it.
const COOKIE: &str = "pcs_link";

/// The store's kinds of held rows: a ticket used, until it expires (a link works once: a
/// leaked one cannot tie somebody else's upstream account to the identity later), and a link in
/// progress, by its `state`'s digest.
const TICKET_USED: &str = "link-ticket";
const LINK: &str = "link";

/// A link in progress.
#[derive(serde::Serialize, serde::Deserialize)]
struct Pending {
    server: String,
    subject: String,
    name: String,
    begun: Begun,
    browser: [u8; 32],
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// The MAC of a ticket's payload (None only if the MAC refused the key, which HMAC never does).
fn mac(key: &[u8; 32], payload: &[u8]) -> Option<Vec<u8>> {
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(key).ok()?;
    m.update(payload);
    Some(m.finalize().into_bytes().to_vec())
}

/// The link URL for `identity` to link its account at `server`.
pub(crate) fn link_url(
    config: &crate::config::Config,
    server: &str,
    identity: &crate::auth::Identity,
) -> Option<String> {
    let keys = config.vault.as_ref()?;
    let until = SystemTime::now().checked_add(TICKET_LIFETIME)?.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    let payload = serde_json::json!({"s": server, "k": &*identity.key, "n": &*identity.name, "e": until}).to_string();
    let sig = mac(&keys.derive("link ticket"), payload.as_bytes())?;
    Some(format!(
        "{}/link/{}?ticket={}.{}",
        config.public_base(),
        form_urlencoded::byte_serialize(server.as_bytes()).collect::<String>(),
        b64(payload.as_bytes()),
        b64(&sig)
    ))
}

/// The identity a ticket names for `server`: (key, name), if it is signed and unexpired.
fn ticket(config: &crate::config::Config, server: &str, ticket: &str) -> Option<(String, String)> {
    let keys = config.vault.as_ref()?;
    let (payload, sig) = ticket.split_once('.')?;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = engine.decode(payload).ok()?;
    let sig = engine.decode(sig).ok()?;
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(&keys.derive("link ticket")).ok()?;
    m.update(&payload);
    m.verify_slice(&sig).ok()?;
    #[derive(serde::Deserialize)]
    struct T {
        s: String,
        k: String,
        n: String,
        e: u64,
    }
    let t: T = serde_json::from_slice(&payload).ok()?;
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    (t.s == server && t.e > now).then_some((t.k, t.n))
}

/// The answer to a request that needs `identity`'s account at `server`: a URL-mode elicitation
/// when the client can take one, else an error that carries the link.
pub(crate) fn link_required(
    config: &crate::config::Config,
    server: &str,
    identity: &crate::auth::Identity,
    url_elicitation: bool,
    with_id: bool,
) -> crate::mcp::jsonrpc::Reply {
    let Some(url) = link_url(config, server, identity) else {
        return crate::mcp::jsonrpc::Reply::error(
            crate::mcp::jsonrpc::code::INTERNAL_ERROR,
            &format!("{server} needs an account of yours, and this gateway has no vault key to keep one"),
        );
    };
    let message = format!("Link your {server} account: open {url}");
    if url_elicitation {
        let mut e = serde_json::json!({"mode": "url", "message": format!("Link your {server} account"), "url": url});
        if with_id && let Ok(id) = crate::random::id() {
            e["elicitationId"] = serde_json::Value::String(id);
        }
        let data = serde_json::json!({"elicitations": [e]}).to_string();
        return crate::mcp::jsonrpc::Reply::owned(
            crate::mcp::jsonrpc::error_object(URL_ELICITATION_REQUIRED, "URL elicitation required", Some(&data)),
            true,
        );
    }
    let data = serde_json::json!({"server": server, "link": url}).to_string();
    crate::mcp::jsonrpc::Reply::owned(crate::mcp::jsonrpc::error_object(ACCOUNT_REQUIRED, &message, Some(&data)), true)
}

/// MCP's `URLElicitationRequiredError` (2025-11-25).
pub(crate) const URL_ELICITATION_REQUIRED: i64 = -32042;
/// Portcullis' error for a client that cannot take a URL elicitation (implementation-defined
/// server error range).
pub(crate) const ACCOUNT_REQUIRED: i64 = -32010;

/// `GET /link/{server}?ticket=…`: starts the person's login at the server's authorization server.
pub(crate) async fn start(
    State(gw): State<Arc<Gateway>>,
    Path(server): Path<String>,
    RawQuery(raw): RawQuery,
) -> Response {
    let config = gw.config();
    let q: HashMap<String, String> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).into_owned().collect();
    let Some((subject, name)) = q.get("ticket").and_then(|t| ticket(&config, &server, t)) else {
        return error_page(StatusCode::FORBIDDEN, "This link is not valid, or has expired: ask the application again.");
    };
    let digest = crate::credentials::digest(q.get("ticket").map(String::as_str).unwrap_or_default());
    match super::server::hold(&gw, TICKET_USED, &digest, &(), expires_in(TICKET_LIFETIME), false) {
        Ok(true) => {}
        Ok(false) => {
            return error_page(StatusCode::FORBIDDEN, "This link was used already: ask the application again.");
        }
        Err(e) => return e.into_response(),
    }
    if !config.server(&server).is_some_and(|d| d.per_user) {
        return error_page(StatusCode::NOT_FOUND, "No such server takes linked accounts here.");
    }
    let begun = match super::login::begin(&config, &server, &subject, &super::login::link_callback(&config)).await {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(server = %server, error = %e, "a link could not start");
            return error_page(StatusCode::BAD_GATEWAY, &format!("The sign-in for {server} cannot start: {e}."));
        }
    };
    let Ok(cookie) = crate::random::id() else { return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again.") };
    let url = begun.url.clone();
    let key = crate::credentials::digest(&begun.state);
    let pending = Pending { server, subject, name, begun, browser: crate::credentials::digest(&cookie) };
    match super::server::hold(&gw, LINK, &key, &pending, expires_in(LINK_LIFETIME), false) {
        Ok(true) => {}
        Ok(false) => return error_page(StatusCode::SERVICE_UNAVAILABLE, "Try again."),
        Err(e) => return e.into_response(),
    }
    let secure = if config.public_base().starts_with("https://") { "; Secure" } else { "" };
    let mut r = StatusCode::FOUND.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&url) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) =
        HeaderValue::from_str(&format!("{COOKIE}={cookie}; Path=/link; HttpOnly; SameSite=Lax; Max-Age=600{secure}"))
    {
        h.insert(header::SET_COOKIE, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// `GET /link/callback`: the authorization server sends the person back.
pub(crate) async fn callback(State(gw): State<Arc<Gateway>>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Response {
    let config = gw.config();
    let q: HashMap<String, String> = form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).into_owned().collect();
    let gone = || error_page(StatusCode::BAD_REQUEST, "This link has expired or was used: ask the application again.");
    let Some(state) = q.get("state") else { return gone() };
    // Taken once, on whichever replica the answer reaches.
    let p = match super::server::held::<Pending>(&gw, LINK, &crate::credentials::digest(state), true) {
        Ok(Some(p)) => p,
        Ok(None) => return gone(),
        Err(e) => return e.into_response(),
    };
    let cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")).map(str::to_owned));
    if cookie.is_none_or(|c| crate::credentials::digest(&c) != p.browser) {
        return error_page(StatusCode::FORBIDDEN, "This answer does not belong to the browser that started the link.");
    }
    match super::login::finish(&config, &p.server, p.begun, &q, &p.subject, &p.name).await {
        Ok(_) => {
            // The gateway reads the vault again at once: the next call uses the account.
            gw.accounts_changed().await;
            super::server::page_ok(
                "Account linked",
                &format!(
                    "<p>Your <strong>{}</strong> account is linked for <strong>{}</strong>. You can close this window and go back to the application.</p>",
                    esc(&p.server),
                    esc(&p.name)
                ),
            )
        }
        Err(e) => {
            tracing::info!(server = %p.server, error = %e, "a link did not finish");
            error_page(StatusCode::BAD_REQUEST, &format!("The account could not be linked: {e}."))
        }
    }
}

fn unavailable() -> Response {
    crate::gate::json(
        StatusCode::SERVICE_UNAVAILABLE,
        r#"{"error":"unavailable","message":"the store cannot answer now"}"#,
    )
}

/// `GET /accounts`: the caller's accounts at the per-user servers it may reach (linked or not,
/// with the link for those that are not).
pub(crate) async fn list(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let g = gw.clone();
    crate::gate::guarded(&gw, &crate::mcp::session::Scope::All, "GET /accounts", &headers, peer, async move |who, _| {
        let config = who.snapshot.config.clone();
        let servers: Vec<String> = config
            .servers
            .iter()
            .filter(|d| d.per_user && d.enabled && who.identity.grants.reaches(&d.name))
            .map(|d| d.name.clone())
            .collect();
        let store = g.store().location().clone();
        let subject = who.identity.key.to_string();
        let rows = tokio::task::spawn_blocking(move || {
            let s = crate::store::Store::open(&store)?;
            servers.into_iter().map(|name| Ok((name.clone(), s.upstream_account(&name, &subject)?))).collect::<Result<Vec<_>, crate::store::StoreError>>()
        })
        .await;
        let Ok(Ok(rows)) = rows else {
            return unavailable();
        };
        let accounts: Vec<serde_json::Value> = rows
            .into_iter()
            .map(|(name, a)| match a {
                Some(a) => serde_json::json!({
                    "server": name,
                    "state": if a.state == "needs_login" { "needs_login" } else { "linked" },
                    "issuer": a.issuer,
                    "linked_at": crate::store::format_ms(a.updated_at),
                }),
                None => serde_json::json!({"server": name, "state": "not_linked", "link": link_url(&config, &name, &who.identity)}),
            })
            .collect();
        crate::gate::json(StatusCode::OK, serde_json::json!({"accounts": accounts}).to_string())
    })
    .await
}

/// `DELETE /accounts/{server}`: unlinks the caller's account at a server.
pub(crate) async fn unlink(
    State(gw): State<Arc<Gateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(server): Path<String>,
    headers: HeaderMap,
) -> Response {
    let g = gw.clone();
    crate::gate::guarded(
        &gw,
        &crate::mcp::session::Scope::All,
        "DELETE /accounts/{server}",
        &headers,
        peer,
        async move |who, _| {
            let store = g.store().location().clone();
            let subject = who.identity.key.to_string();
            let s = server.clone();
            let gone =
                tokio::task::spawn_blocking(move || crate::store::Store::open(&store)?.upstream_forget(&s, &subject))
                    .await;
            match gone {
                Ok(Ok(true)) => {
                    g.accounts_changed().await;
                    crate::gate::json(
                        StatusCode::OK,
                        serde_json::json!({"server": server, "state": "not_linked"}).to_string(),
                    )
                }
                Ok(Ok(false)) => crate::gate::json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "not_found", "message": format!("no account of yours at {server}")})
                        .to_string(),
                ),
                _ => unavailable(),
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_names_its_server_and_identity_and_cannot_be_forged() {
        let env = crate::config::Env::from_pairs([("PORTCULLIS_SECRET_KEY", "k-0123456789abcdef0123456789abcdef")]);
        let text = "public_url: https://gw.example\nservers:\n  up: {url: 'https://up.example/mcp', oauth: {grant: authorization_code}, credentials: per_user}\n";
        let config = crate::config::parse(text, false, &env).unwrap();
        let alice = crate::auth::Identity::named_for_tests("alice", "config:alice");
        let url = link_url(&config, "up", &alice).unwrap();
        assert!(url.starts_with("https://gw.example/link/up?ticket="), "{url}");
        let t = url.split("ticket=").nth(1).unwrap();
        assert_eq!(ticket(&config, "up", t), Some(("config:alice".into(), "alice".into())));
        assert_eq!(ticket(&config, "other", t), None, "another server");
        let (payload, sig) = t.split_once('.').unwrap();
        let forged = b64(&base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap()
            .iter()
            .map(|b| if *b == b'a' { b'b' } else { *b })
            .collect::<Vec<_>>());
        assert_eq!(ticket(&config, "up", &format!("{forged}.{sig}")), None, "changed payload");
        let other_key =
            crate::config::Env::from_pairs([("PORTCULLIS_SECRET_KEY", "another-key-0123456789abcdef012345")]);
        let config2 = crate::config::parse(text, false, &other_key).unwrap();
        assert_eq!(ticket(&config2, "up", t), None, "another key");
    }
}
