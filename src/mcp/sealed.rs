//! Session ids any replica can serve: a session-era `Mcp-Session-Id` is an AEAD-sealed value
//! (the vault's key ring, [`crate::vault::KeyRing`]: AES-256-GCM, each value naming the key that
//! sealed it) carrying what the session is bound to and what it negotiated, so a replica that
//! never saw the session opens it again without asking anyone.
//!
//! Invariants: an id opens only under a key of the ring (the current one, or one of
//! `PORTCULLIS_SECRET_KEY_PREVIOUS` during a rotation), unchanged, before its expiry, for the
//! principal it was sealed for and at the endpoint it was opened at; anything else is "Session
//! not found" (404), exactly like an unknown id. A sealed id authenticates nothing: the request
//! still carries its credential, checked first. Ids are visible ASCII (base64url), at most
//! [`MAX_ID_LEN`] characters.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::session::Scope;
use super::version::ProtocolVersion;
use crate::vault::KeyRing;

/// What the sealed value is bound to (its associated data).
const PURPOSE: &str = "portcullis mcp-session-id v1";
/// How long a sealed id opens after it was issued.
pub(crate) const LIFETIME_MS: i64 = 24 * 3600 * 1000;
/// The largest client capabilities carried (raw JSON); larger ones are carried as `{}`.
const MAX_CAPABILITIES: usize = 2048;
/// The longest id accepted for opening.
pub(crate) const MAX_ID_LEN: usize = 4096;

/// What a session id carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sealed {
    /// The principal ([`crate::auth::Identity::key`]).
    #[serde(rename = "p")]
    pub principal: String,
    /// The tenant.
    #[serde(rename = "t")]
    pub tenant: String,
    /// The endpoint: `*` for `/mcp`, else the server's name.
    #[serde(rename = "s")]
    pub scope: String,
    /// The negotiated protocol version.
    #[serde(rename = "v")]
    pub version: String,
    /// The client's capabilities at `initialize` (raw JSON).
    #[serde(rename = "c")]
    pub capabilities: String,
    /// Unix ms after which the id no longer opens.
    #[serde(rename = "e")]
    pub expires_at: i64,
    /// A random value: two sessions of one principal never share an id.
    #[serde(rename = "n")]
    pub nonce: String,
}

/// Why an id does not open (every reason is answered 404 alike; the reason is for logs).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Unsealed {
    /// Not a sealed id, changed, or sealed by a key no longer in the ring.
    #[error("not a session id of this gateway's keys")]
    Foreign,
    /// Past its expiry.
    #[error("the session id has expired")]
    Expired,
    /// Another principal's, or another endpoint's.
    #[error("the session id belongs to another principal or endpoint")]
    Elsewhere,
}

fn scope_name(scope: &Scope) -> &str {
    match scope {
        Scope::All => "*",
        Scope::One(s) => s,
    }
}

impl Sealed {
    /// What a new session at `scope` for `principal` carries.
    pub(crate) fn new(
        principal: &str,
        tenant: &str,
        scope: &Scope,
        version: ProtocolVersion,
        capabilities: Option<&str>,
        now: i64,
    ) -> Result<Sealed, crate::random::NoRandomness> {
        let capabilities = capabilities.filter(|c| c.len() <= MAX_CAPABILITIES).unwrap_or("{}").to_owned();
        Ok(Sealed {
            principal: principal.to_owned(),
            tenant: tenant.to_owned(),
            scope: scope_name(scope).to_owned(),
            version: version.as_str().to_owned(),
            capabilities,
            expires_at: now.saturating_add(LIFETIME_MS),
            nonce: crate::random::id()?,
        })
    }

    /// The id: sealed with the ring's current key, in base64url.
    pub(crate) fn seal(&self, ring: &KeyRing) -> Result<String, crate::vault::VaultError> {
        let plain = serde_json::to_vec(self).map_err(|_| crate::vault::VaultError::Corrupt)?;
        Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(ring.seal(PURPOSE, &plain)?))
    }

    /// Opens `id` for a request of `principal` at `scope`, at `now`.
    pub(crate) fn open(ring: &KeyRing, id: &str, principal: &str, scope: &Scope, now: i64) -> Result<Sealed, Unsealed> {
        if id.len() > MAX_ID_LEN {
            return Err(Unsealed::Foreign);
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(id).map_err(|_| Unsealed::Foreign)?;
        let plain = ring.open(PURPOSE, &raw).map_err(|_| Unsealed::Foreign)?;
        let sealed: Sealed = serde_json::from_slice(&plain).map_err(|_| Unsealed::Foreign)?;
        if sealed.expires_at <= now {
            return Err(Unsealed::Expired);
        }
        if sealed.principal != principal || sealed.scope != scope_name(scope) {
            return Err(Unsealed::Elsewhere);
        }
        Ok(sealed)
    }

    /// The endpoint an id was sealed for, when it opens under `ring` (its principal and expiry
    /// are checked by [`Sealed::open`], which must follow).
    pub(crate) fn scope_of(ring: &KeyRing, id: &str) -> Option<Scope> {
        if id.len() > MAX_ID_LEN {
            return None;
        }
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(id).ok()?;
        let plain = ring.open(PURPOSE, &raw).ok()?;
        let sealed: Sealed = serde_json::from_slice(&plain).ok()?;
        Some(if sealed.scope == "*" { Scope::All } else { Scope::One(sealed.scope) })
    }

    /// The protocol version it negotiated (a session-era one).
    pub(crate) fn protocol_version(&self) -> Option<ProtocolVersion> {
        ProtocolVersion::parse(&self.version).filter(|v| v.is_handshake())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(current: &str, previous: Option<&str>) -> KeyRing {
        KeyRing::new(current, previous).unwrap()
    }

    #[test]
    fn an_id_opens_for_its_principal_and_endpoint_only_until_it_expires() {
        let (a, b) = ("key-a-0123456789abcdef0123456789abcdef", "key-b-0123456789abcdef0123456789abcdef");
        let s = Sealed::new(
            "config:alice",
            "",
            &Scope::All,
            ProtocolVersion::V2025_11_25,
            Some(r#"{"sampling":{}}"#),
            1000,
        )
        .unwrap();
        let id = s.seal(&ring(a, None)).unwrap();
        assert!(id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'), "{id}");
        assert_eq!(Sealed::open(&ring(a, None), &id, "config:alice", &Scope::All, 2000), Ok(s.clone()));
        assert_eq!(Sealed::open(&ring(a, None), &id, "config:bob", &Scope::All, 2000), Err(Unsealed::Elsewhere));
        assert_eq!(
            Sealed::open(&ring(a, None), &id, "config:alice", &Scope::One("x".into()), 2000),
            Err(Unsealed::Elsewhere)
        );
        assert_eq!(
            Sealed::open(&ring(a, None), &id, "config:alice", &Scope::All, 1000 + LIFETIME_MS),
            Err(Unsealed::Expired)
        );
        // During a rotation the previous key still opens it; once retired, it does not.
        assert!(Sealed::open(&ring(b, Some(a)), &id, "config:alice", &Scope::All, 2000).is_ok());
        assert_eq!(Sealed::open(&ring(b, None), &id, "config:alice", &Scope::All, 2000), Err(Unsealed::Foreign));
        // Any byte changed: not an id.
        let mut bytes = id.clone().into_bytes();
        for i in [0, bytes.len() / 2, bytes.len() - 1] {
            let was = bytes[i];
            bytes[i] = if was == b'A' { b'B' } else { b'A' };
            let tampered = String::from_utf8(bytes.clone()).unwrap();
            assert!(Sealed::open(&ring(a, None), &tampered, "config:alice", &Scope::All, 2000).is_err());
            bytes[i] = was;
        }
        assert_eq!(
            Sealed::open(&ring(a, None), "not base64 !", "config:alice", &Scope::All, 2000),
            Err(Unsealed::Foreign)
        );
        // Two sessions of one principal: two ids.
        let other = Sealed::new("config:alice", "", &Scope::All, ProtocolVersion::V2025_11_25, None, 1000).unwrap();
        assert_ne!(other.seal(&ring(a, None)).unwrap(), id);
        assert_eq!(other.capabilities, "{}");
    }
}
