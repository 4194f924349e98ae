//! A person's login to a remote server (`portcullis login SERVER`): the OAuth authorization
//! code flow with PKCE (S256) and `state`, run from the command line. The authorization server
//! is discovered as MCP clients discover it; Portcullis' client id is the config's, else a
//! registration it made before (kept in the store), else the Client ID Metadata Document it
//! serves at its public URL (when the server takes one and the URL is https), else a new dynamic
//! registration (RFC 7591). The browser comes back to `http://127.0.0.1:PORT/callback`; the
//! tokens are sealed into the vault for the gateway, which refreshes them from then on.
//!
//! Invariants: the callback listens on loopback only, takes one answer whose `state` is the one
//! sent (and whose `iss`, when given, is the authorization server's), and gives up after the
//! timeout; the code is exchanged with its verifier for the server's URL as the resource; no
//! token or secret is printed or logged.

use std::time::Duration;

use base64::Engine;

use super::client::{AccountTokens, CredentialError, Flow, TokenSource, token_request};
use crate::config::{Config, Transport};

/// Why a login did not end with an account.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LoginError {
    /// The operator named something that cannot log in.
    #[error("{0}")]
    Config(String),
    /// The authorization server could not be found, reached, or said no.
    #[error(transparent)]
    Provider(#[from] CredentialError),
    /// The callback port cannot be listened on.
    #[error("cannot listen on 127.0.0.1:{port} for the browser's return ({reason}); set oauth.callback_port")]
    Port {
        /// The port.
        port: u16,
        /// Why.
        reason: String,
    },
    /// Nobody came back in time, or the answer was a refusal.
    #[error("{0}")]
    Browser(String),
    /// The store or the vault failed.
    #[error("the token vault: {0}")]
    Vault(String),
}

/// The redirect URI of a login on `port`.
pub(crate) fn callback_uri(port: u16) -> String {
    format!("http://127.0.0.1:{port}/callback")
}

/// The URL of the Client ID Metadata Document Portcullis serves for `server`, when its public
/// URL is https (an authorization server fetches it from there).
pub(crate) fn document_url(config: &Config, server: &str) -> Option<String> {
    let base = config.public_url.as_deref().filter(|u| u.starts_with("https://"))?;
    Some(format!("{base}/oauth/upstream/{server}/client.json"))
}

/// The metadata document of `server`'s client: its own URL as `client_id`, the login callback.
fn document(config: &Config, server: &str) -> Option<serde_json::Value> {
    let (_, callback_port) = code_grant(config, server).ok()?;
    let url = document_url(config, server)?;
    Some(serde_json::json!({
        "client_id": url,
        "client_name": format!("{} (Portcullis)", config.name),
        "redirect_uris": [callback_uri(callback_port), link_callback(config)],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }))
}

/// `GET /oauth/upstream/{server}/client.json`: the Client ID Metadata Document of Portcullis as
/// a client of that server's authorization server (404 for a server without the
/// authorization_code grant, or without an https public URL).
pub(crate) async fn serve_document(
    axum::extract::State(gw): axum::extract::State<std::sync::Arc<crate::mcp::gateway::Gateway>>,
    axum::extract::Path(server): axum::extract::Path<String>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let config = gw.config();
    let found = document(&config, &server);
    match found {
        Some(doc) => {
            let mut r = crate::gate::json(axum::http::StatusCode::OK, doc.to_string());
            r.headers_mut()
                .insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("max-age=3600"));
            r
        }
        None => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

/// How `portcullis login` runs.
pub(crate) struct LoginOptions {
    /// Try to open a browser on the URL.
    pub(crate) open_browser: bool,
    /// How long to wait for the browser's return.
    pub(crate) timeout: Duration,
}

/// A login under way: what its answer is checked and exchanged with (a link's is held in the
/// store sealed with the vault key: it carries the client secret).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Begun {
    /// Where to send the person.
    pub url: String,
    /// The `state` sent.
    pub state: String,
    verifier: String,
    pub(crate) issuer: String,
    token_endpoint: String,
    client_id: String,
    secret: Option<String>,
    redirect_uri: String,
    resource: String,
}

impl std::fmt::Debug for Begun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Begun").field("issuer", &self.issuer).field("client_id", &self.client_id).finish()
    }
}

/// The grant of a server that a person logs in to.
pub(crate) fn code_grant<'a>(
    config: &'a Config,
    server: &str,
) -> Result<(&'a super::client::UpstreamGrant, u16), LoginError> {
    let def = config.server(server).ok_or_else(|| LoginError::Config(format!("no server {server:?}")))?;
    let Transport::Http { oauth: Some(grant), .. } = &def.transport else {
        return Err(LoginError::Config(format!("{server} has no `oauth:` with the authorization_code grant")));
    };
    let Flow::AuthorizationCode { callback_port } = grant.flow else {
        return Err(LoginError::Config(format!("{server} uses the client credentials grant: nobody logs in")));
    };
    Ok((grant, callback_port))
}

/// The redirect URI of a person linking their own account in a browser (`credentials:
/// per_user`).
pub(crate) fn link_callback(config: &Config) -> String {
    format!("{}/link/callback", config.public_base())
}

/// Starts a login of `server` whose answer comes to `redirect_uri`: discovery, the client, and
/// the URL with PKCE and `state`.
pub(crate) async fn begin(
    config: &Config,
    server: &str,
    subject: &str,
    redirect_uri: &str,
) -> Result<Begun, LoginError> {
    let (grant, callback_port) = code_grant(config, server)?;
    let keys = config
        .vault
        .clone()
        .ok_or_else(|| LoginError::Config(format!("{} is not set: the vault has no key", crate::vault::KEY_VAR)))?;
    let source = TokenSource::new(grant.clone(), server, None);
    let (issuer, meta) = source.discover().await?;
    let authorize = meta
        .authorization_endpoint
        .clone()
        .ok_or_else(|| CredentialError::Discovery("the authorization server names no authorization endpoint".into()))?;
    let token_endpoint = meta
        .token_endpoint
        .clone()
        .ok_or_else(|| CredentialError::Discovery("the authorization server names no token endpoint".into()))?;
    if meta.code_challenge_methods_supported.as_ref().is_some_and(|m| !m.iter().any(|m| m == "S256")) {
        return Err(LoginError::Config("the authorization server does not support PKCE with S256".into()));
    }
    // One registration serves both ways in: the CLI's loopback callback and the link page's.
    let redirects = [callback_uri(callback_port), link_callback(config)];
    let (client_id, secret) =
        client(config, server, grant, &issuer, &meta, &redirects, &keys, &config.store().0).await?;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let rand = || crate::random::id().map_err(|e| LoginError::Vault(e.to_string()));
    let (verifier, state) = (rand()?, rand()?);
    let challenge = b64(&crate::credentials::digest(&verifier));
    let mut url = reqwest::Url::parse(&authorize)
        .map_err(|_| CredentialError::Discovery("the authorization endpoint is not a URL".into()))?;
    // The scopes: configured or challenged, and those a server asked this account for since
    // (a step-up left them in the vault).
    let wanted = crate::store::Store::open(&config.store().0)
        .and_then(|s| s.upstream_account(server, subject))
        .ok()
        .flatten()
        .filter(|a| a.state == "needs_login")
        .and_then(|a| a.scope);
    let scope = match (source.scope_to_ask().await, wanted) {
        (Some(a), Some(b)) => {
            let mut all: Vec<&str> = a.split_whitespace().collect();
            all.extend(b.split_whitespace().filter(|s| !a.split_whitespace().any(|x| x == *s)));
            Some(all.join(" "))
        }
        (a, b) => a.or(b),
    };
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("response_type", "code")
            .append_pair("client_id", &client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("state", &state)
            .append_pair("code_challenge", &challenge)
            .append_pair("code_challenge_method", "S256")
            .append_pair("resource", &grant.resource);
        if let Some(scope) = &scope {
            q.append_pair("scope", scope);
        }
    }
    Ok(Begun {
        url: url.to_string(),
        state,
        verifier,
        issuer,
        token_endpoint,
        client_id,
        secret,
        redirect_uri: redirect_uri.to_owned(),
        resource: grant.resource.clone(),
    })
}

/// Checks the answer to a login and keeps its tokens in the vault as `subject`'s account
/// (`name` shown for it; "" for the shared one). Whether a refresh token came with them.
pub(crate) async fn finish(
    config: &Config,
    server: &str,
    begun: Begun,
    answer: &std::collections::HashMap<String, String>,
    subject: &str,
    name: &str,
) -> Result<bool, LoginError> {
    let keys = config.vault.clone().ok_or_else(|| LoginError::Config("the vault has no key".into()))?;
    let same = |a: &str, b: &str| crate::credentials::digest(a) == crate::credentials::digest(b);
    if !answer.get("state").is_some_and(|s| same(s, &begun.state)) {
        return Err(LoginError::Browser("the answer is not for this login (its state differs)".into()));
    }
    if answer.get("iss").is_some_and(|i| *i != begun.issuer) {
        return Err(LoginError::Browser("the answer came from another authorization server (iss)".into()));
    }
    if let Some(e) = answer.get("error") {
        let code: String = e.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').take(64).collect();
        return Err(LoginError::Browser(format!("the authorization server refused the login ({code})")));
    }
    let code = answer.get("code").ok_or_else(|| LoginError::Browser("the answer carries no code".into()))?;
    let http = super::http_client();
    let form = vec![
        ("grant_type", "authorization_code".to_owned()),
        ("code", code.clone()),
        ("redirect_uri", begun.redirect_uri.clone()),
        ("code_verifier", begun.verifier.clone()),
        ("resource", begun.resource.clone()),
    ];
    let t = token_request(&http, &begun.token_endpoint, &begun.client_id, begun.secret.as_deref(), form).await?;
    let now = crate::store::now_ms();
    let row = crate::store::UpstreamAccount::row(server, subject, &begun.issuer, &begun.client_id);
    let refresh = t.refresh_token.is_some();
    let tokens = AccountTokens { access_token: t.access_token, refresh_token: t.refresh_token };
    let plain = serde_json::to_vec(&tokens).map_err(|e| LoginError::Vault(e.to_string()))?;
    let sealed = keys.seal(&row, &plain).map_err(|e| LoginError::Vault(e.to_string()))?;
    let account = crate::store::UpstreamAccount {
        server: server.to_owned(),
        subject: subject.to_owned(),
        name: name.to_owned(),
        issuer: begun.issuer,
        token_endpoint: begun.token_endpoint,
        client_id: begun.client_id,
        sealed,
        expires_at: t.expires_in.map(|s| now + i64::try_from(s.saturating_mul(1000)).unwrap_or(i64::MAX)),
        scope: t.scope,
        state: "active".into(),
        updated_at: now,
    };
    let store = config.store().0;
    tokio::task::spawn_blocking(move || crate::store::Store::open(&store).and_then(|s| s.upstream_save(&account)))
        .await
        .map_err(|e| LoginError::Vault(e.to_string()))?
        .map_err(|e| LoginError::Vault(e.to_string()))?;
    Ok(refresh)
}

/// Runs the login of `server` from the command line; what to tell the person at the end.
pub(crate) async fn login(config: &Config, server: &str, opts: LoginOptions) -> Result<String, LoginError> {
    let (_, callback_port) = code_grant(config, server)?;
    // Bound before the URL is shown: a browser that is quick finds it listening.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", callback_port))
        .await
        .map_err(|e| LoginError::Port { port: callback_port, reason: e.to_string() })?;
    let begun = begin(config, server, "", &callback_uri(callback_port)).await?;
    println!("To sign in to {server}, open this URL in a browser:\n\n  {}\n", begun.url);
    if opts.open_browser {
        open_browser(&begun.url);
    }
    let answer = tokio::time::timeout(opts.timeout, callback(listener)).await.map_err(|_| {
        LoginError::Browser(format!("nobody came back within {}s; run the login again", opts.timeout.as_secs()))
    })??;
    let issuer = begun.issuer.clone();
    let refresh = finish(config, server, begun, &answer, "", "").await?;
    let refresh = if refresh { "it is refreshed from now on" } else { "no refresh token was given" };
    Ok(format!("logged in to {server} at {} ({refresh})", crate::config::shown_url(&issuer)))
}

/// Portcullis' client id (and secret) at the authorization server, in the specification's
/// order: configured, registered before, a metadata document, a new registration.
#[allow(clippy::too_many_arguments, reason = "what one choice of registration depends on")]
async fn client(
    config: &Config,
    server: &str,
    grant: &super::client::UpstreamGrant,
    issuer: &str,
    meta: &super::ServerMetadata,
    redirect_uris: &[String],
    keys: &crate::vault::KeyRing,
    store_path: &crate::store::StoreLocation,
) -> Result<(String, Option<String>), LoginError> {
    if !grant.client_id.is_empty() {
        return Ok((grant.client_id.clone(), Some(grant.client_secret.clone()).filter(|s| !s.is_empty())));
    }
    let vault = |e: crate::store::StoreError| LoginError::Vault(e.to_string());
    let store = crate::store::Store::open(store_path).map_err(vault)?;
    if let Some(c) = store.upstream_client(server, issuer).map_err(vault)? {
        let secret = match &c.sealed_secret {
            Some(s) => {
                let row = crate::store::UpstreamClient::row(&c.server, &c.issuer, &c.client_id);
                let plain = keys.open(&row, s).map_err(|e| LoginError::Vault(e.to_string()))?;
                Some(String::from_utf8(plain).map_err(|e| LoginError::Vault(e.to_string()))?)
            }
            None => None,
        };
        return Ok((c.client_id, secret));
    }
    if meta.client_id_metadata_document_supported == Some(true)
        && let Some(url) = document_url(config, server)
    {
        return Ok((url, None));
    }
    let Some(endpoint) = &meta.registration_endpoint else {
        return Err(LoginError::Config(format!(
            "the authorization server of {server} takes neither a metadata document of this gateway (it needs an https \
             public_url) nor a registration: set oauth.client_id"
        )));
    };
    let http = super::http_client();
    let body = serde_json::json!({
        "client_name": format!("{} (Portcullis)", config.name),
        "redirect_uris": redirect_uris,
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    });
    let shown = crate::config::shown_url(endpoint);
    let resp = http
        .post(endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| CredentialError::Unreachable { url: shown.clone(), reason: e.without_url().to_string() })?;
    let status = resp.status();
    let bytes = super::read_body(resp, endpoint).await.map_err(|e| CredentialError::Discovery(e.to_string()))?;
    #[derive(serde::Deserialize)]
    struct Registered {
        client_id: String,
        client_secret: Option<String>,
    }
    let r: Registered = serde_json::from_slice(&bytes)
        .ok()
        .filter(|_| status.is_success())
        .ok_or(CredentialError::Refused { url: shown, status: status.as_u16(), code: None })?;
    let sealed_secret = match &r.client_secret {
        Some(s) => Some(
            keys.seal(&crate::store::UpstreamClient::row(server, issuer, &r.client_id), s.as_bytes())
                .map_err(|e| LoginError::Vault(e.to_string()))?,
        ),
        None => None,
    };
    let record = crate::store::UpstreamClient {
        server: server.to_owned(),
        issuer: issuer.to_owned(),
        client_id: r.client_id.clone(),
        sealed_secret,
    };
    store.upstream_save_client(&record, crate::store::now_ms()).map_err(vault)?;
    Ok((r.client_id, r.client_secret))
}

/// Takes the browser's one return on the listener: its query.
async fn callback(listener: tokio::net::TcpListener) -> Result<std::collections::HashMap<String, String>, LoginError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<std::collections::HashMap<String, String>>(1);
    let app = axum::Router::new().route(
        "/callback",
        axum::routing::get(move |axum::extract::RawQuery(q): axum::extract::RawQuery| {
            let tx = tx.clone();
            async move {
                let params: std::collections::HashMap<String, String> =
                    form_urlencoded::parse(q.unwrap_or_default().as_bytes()).into_owned().collect();
                let _ = tx.try_send(params);
                let mut r = axum::response::IntoResponse::into_response(axum::response::Html(
                    "<!doctype html><title>Portcullis</title><p>Done: you may close this window and go back to the terminal.</p>",
                ));
                r.headers_mut().insert(axum::http::header::CACHE_CONTROL, axum::http::HeaderValue::from_static("no-store"));
                r
            }
        }),
    );
    let serving = tokio::spawn(async move { axum::serve(listener, app).await });
    let got = rx.recv().await;
    serving.abort();
    got.ok_or_else(|| LoginError::Browser("the callback listener stopped".into()))
}

/// Opens `url` in the desktop's browser, where there is one (never fatal).
fn open_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        Some("open")
    } else if std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some() {
        Some("xdg-open")
    } else {
        None
    };
    if let Some(cmd) = opener {
        let _ = std::process::Command::new(cmd)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}
