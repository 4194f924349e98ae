//! MCP protocol versions: the ones Portcullis speaks, and what each allows.
//!
//! Invariants: a version is compared as a [`ProtocolVersion`], never as text; the session-era
//! versions are reached through `initialize`, the stateless one (2026-07-28) through its
//! `MCP-Protocol-Version` header or `_meta`, and a version Portcullis does not know is never
//! guessed at (a client is offered the newest session-era version, an upstream is refused).

use std::fmt;

/// One MCP protocol version Portcullis speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProtocolVersion {
    /// 2024-11-05: HTTP+SSE, sessions.
    V2024_11_05,
    /// 2025-03-26: streamable HTTP, sessions, JSON-RPC batches.
    V2025_03_26,
    /// 2025-06-18: no batches, `MCP-Protocol-Version` on every request.
    V2025_06_18,
    /// 2025-11-25: the last session-based version.
    V2025_11_25,
    /// 2026-07-28: stateless (no session, no `initialize`).
    V2026_07_28,
}

impl ProtocolVersion {
    /// The versions `initialize` can negotiate, oldest first.
    pub(crate) const HANDSHAKE: [ProtocolVersion; 4] = [
        ProtocolVersion::V2024_11_05,
        ProtocolVersion::V2025_03_26,
        ProtocolVersion::V2025_06_18,
        ProtocolVersion::V2025_11_25,
    ];
    /// The newest session-based version (offered when a client asks for one Portcullis does not
    /// know, and asked of upstreams).
    pub(crate) const LATEST_SESSION: ProtocolVersion = ProtocolVersion::V2025_11_25;
    /// The stateless version.
    pub(crate) const STATELESS: ProtocolVersion = ProtocolVersion::V2026_07_28;

    /// The version a string names, if Portcullis speaks it.
    pub(crate) fn parse(s: &str) -> Option<ProtocolVersion> {
        Some(match s {
            "2024-11-05" => ProtocolVersion::V2024_11_05,
            "2025-03-26" => ProtocolVersion::V2025_03_26,
            "2025-06-18" => ProtocolVersion::V2025_06_18,
            "2025-11-25" => ProtocolVersion::V2025_11_25,
            "2026-07-28" => ProtocolVersion::V2026_07_28,
            _ => return None,
        })
    }

    /// As written on the wire.
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            ProtocolVersion::V2024_11_05 => "2024-11-05",
            ProtocolVersion::V2025_03_26 => "2025-03-26",
            ProtocolVersion::V2025_06_18 => "2025-06-18",
            ProtocolVersion::V2025_11_25 => "2025-11-25",
            ProtocolVersion::V2026_07_28 => "2026-07-28",
        }
    }

    /// Whether this is the stateless protocol (no session, per-request `_meta`).
    pub(crate) fn is_stateless(self) -> bool {
        self == ProtocolVersion::STATELESS
    }

    /// Whether a JSON-RPC batch is allowed (2025-03-26 only).
    pub(crate) fn allows_batches(self) -> bool {
        self == ProtocolVersion::V2025_03_26
    }

    /// Whether `initialize` can negotiate it.
    pub(crate) fn is_handshake(self) -> bool {
        ProtocolVersion::HANDSHAKE.contains(&self)
    }

    /// The version to answer `initialize` with: the one asked for when `initialize` can
    /// negotiate it, else the newest session-based one.
    pub(crate) fn negotiate(requested: Option<&str>) -> ProtocolVersion {
        requested
            .and_then(ProtocolVersion::parse)
            .filter(|v| v.is_handshake())
            .unwrap_or(ProtocolVersion::LATEST_SESSION)
    }
}

impl serde::Serialize for ProtocolVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_read_back_and_negotiate() {
        for v in ProtocolVersion::HANDSHAKE.into_iter().chain([ProtocolVersion::STATELESS]) {
            assert_eq!(ProtocolVersion::parse(v.as_str()), Some(v));
        }
        assert_eq!(ProtocolVersion::negotiate(Some("2025-03-26")), ProtocolVersion::V2025_03_26);
        assert_eq!(ProtocolVersion::negotiate(Some("2099-01-01")), ProtocolVersion::LATEST_SESSION);
        assert_eq!(ProtocolVersion::negotiate(Some("2026-07-28")), ProtocolVersion::LATEST_SESSION);
        assert_eq!(ProtocolVersion::negotiate(None), ProtocolVersion::LATEST_SESSION);
        assert!(ProtocolVersion::V2025_03_26.allows_batches() && !ProtocolVersion::V2025_06_18.allows_batches());
        assert!(ProtocolVersion::STATELESS.is_stateless() && !ProtocolVersion::V2025_11_25.is_stateless());
    }
}
