//! The token vault's keys: the upstream accounts' access and refresh tokens (and the client
//! secrets Portcullis was registered with) are kept in the store sealed with AES-256-GCM under
//! a key from the environment (`PORTCULLIS_SECRET_KEY`). Each sealed value names the key that
//! sealed it, so keys rotate without losing anything: values sealed by a previous key
//! (`PORTCULLIS_SECRET_KEY_PREVIOUS`, comma-separated) still open, and every write seals with
//! the current one.
//!
//! Invariants: a sealed value is bound to its row (the associated data names it: a value moved
//! to another row does not open); every nonce is 96 random bits from the OS; a key is never
//! shown (`Debug` shows key ids only); a value that does not open is an error, never an empty
//! secret.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest, Sha256};

/// The variable holding the current key.
pub const KEY_VAR: &str = "PORTCULLIS_SECRET_KEY";
/// The variable holding earlier keys, comma-separated (they open, never seal).
pub const PREVIOUS_VAR: &str = "PORTCULLIS_SECRET_KEY_PREVIOUS";
/// The shortest key accepted (characters; a random 32-byte value in base64 is 43).
pub const MIN_KEY_LEN: usize = 32;
/// What every sealed value starts with.
const VERSION: &[u8] = b"v1";
/// How long a key id is.
const ID_LEN: usize = 8;

/// Why a value could not be sealed or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VaultError {
    /// Sealed by a key that is neither the current nor a previous one.
    #[error("sealed with key {0}, which is neither {KEY_VAR} nor one of {PREVIOUS_VAR}")]
    UnknownKey(String),
    /// Not a sealed value, or one that was changed or moved.
    #[error("a sealed value does not open (changed, moved to another row, or not sealed)")]
    Corrupt,
    /// The OS gave no randomness for a nonce.
    #[error(transparent)]
    NoRandomness(#[from] crate::random::NoRandomness),
}

/// One key: its id and its 256 bits.
#[derive(Clone, PartialEq, Eq)]
struct Key {
    id: String,
    bytes: [u8; 32],
}

impl Key {
    /// The key a configured value names (any string of [`MIN_KEY_LEN`] or more characters):
    /// SHA-256 of it, domain-separated; its id likewise, so the id says nothing of the key.
    fn from_value(value: &str) -> Key {
        let bytes: [u8; 32] =
            Sha256::new().chain_update(b"portcullis vault key\0").chain_update(value).finalize().into();
        let id_hash = Sha256::new().chain_update(b"portcullis vault key id\0").chain_update(value).finalize();
        let id = id_hash.iter().take(ID_LEN / 2).map(|b| format!("{b:02x}")).collect();
        Key { id, bytes }
    }

    fn aead(&self) -> Result<LessSafeKey, VaultError> {
        UnboundKey::new(&AES_256_GCM, &self.bytes).map(LessSafeKey::new).map_err(|_| VaultError::Corrupt)
    }
}

/// The current key and the previous ones.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyRing {
    current: Key,
    previous: Vec<Key>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("current", &self.current.id)
            .field("previous", &self.previous.iter().map(|k| k.id.as_str()).collect::<Vec<_>>())
            .finish()
    }
}

impl KeyRing {
    /// The ring the values name: `current`, and `previous` comma-separated. Why not, when a key
    /// is too short.
    pub fn new(current: &str, previous: Option<&str>) -> Result<KeyRing, String> {
        let check = |name: &str, v: &str| {
            if v.chars().count() < MIN_KEY_LEN {
                Err(format!("{name} must be at least {MIN_KEY_LEN} characters (e.g. `openssl rand -base64 32`)"))
            } else {
                Ok(Key::from_value(v))
            }
        };
        let current = check(KEY_VAR, current.trim())?;
        let previous = previous
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(|v| check(PREVIOUS_VAR, v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(KeyRing { current, previous })
    }

    /// A ring of one random key, known to this process only (what seals session ids when no
    /// `PORTCULLIS_SECRET_KEY` is set: they open on this replica alone).
    pub(crate) fn random() -> Result<KeyRing, crate::random::NoRandomness> {
        Ok(KeyRing { current: Key::from_value(&crate::random::id()?), previous: Vec::new() })
    }

    /// The same ring for another purpose: every key (current and previous) replaced by one
    /// derived from it and `purpose`, under the same id, so values sealed for one purpose never
    /// open for another and a rotation rotates both.
    pub(crate) fn for_purpose(&self, purpose: &str) -> KeyRing {
        let derive = |k: &Key| Key {
            id: k.id.clone(),
            bytes: Sha256::new()
                .chain_update(b"portcullis purpose key\0")
                .chain_update(purpose)
                .chain_update(b"\0")
                .chain_update(k.bytes)
                .finalize()
                .into(),
        };
        KeyRing { current: derive(&self.current), previous: self.previous.iter().map(derive).collect() }
    }

    /// The current key's id.
    pub fn current_id(&self) -> &str {
        &self.current.id
    }

    /// Seals `plain` for the row `row` with the current key.
    pub fn seal(&self, row: &str, plain: &[u8]) -> Result<Vec<u8>, VaultError> {
        let mut nonce = [0u8; NONCE_LEN];
        crate::random::fill(&mut nonce)?;
        let mut sealed = plain.to_vec();
        self.current
            .aead()?
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(row.as_bytes()), &mut sealed)
            .map_err(|_| VaultError::Corrupt)?;
        let mut out = Vec::with_capacity(VERSION.len() + ID_LEN + NONCE_LEN + sealed.len());
        out.extend_from_slice(VERSION);
        out.extend_from_slice(self.current.id.as_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a value sealed for the row `row`, with whichever key of the ring sealed it.
    pub fn open(&self, row: &str, sealed: &[u8]) -> Result<Vec<u8>, VaultError> {
        let rest = sealed.strip_prefix(VERSION).ok_or(VaultError::Corrupt)?;
        if rest.len() < ID_LEN + NONCE_LEN {
            return Err(VaultError::Corrupt);
        }
        let (id, rest) = rest.split_at(ID_LEN);
        let id = std::str::from_utf8(id).map_err(|_| VaultError::Corrupt)?;
        let key = std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|k| k.id == id)
            .ok_or_else(|| VaultError::UnknownKey(id.to_owned()))?;
        let (nonce, cipher) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| VaultError::Corrupt)?;
        let mut buf = cipher.to_vec();
        let plain =
            key.aead()?.open_in_place(nonce, Aad::from(row.as_bytes()), &mut buf).map_err(|_| VaultError::Corrupt)?;
        Ok(plain.to_vec())
    }

    /// A key for another purpose (signing link tickets, say), derived from the current key:
    /// it changes when the key does.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        Sha256::new()
            .chain_update(b"portcullis derived key\0")
            .chain_update(purpose)
            .chain_update(self.current.bytes)
            .finalize()
            .into()
    }

    /// Whether a sealed value was sealed by the current key.
    pub fn is_current(&self, sealed: &[u8]) -> bool {
        sealed.strip_prefix(VERSION).and_then(|r| r.get(..ID_LEN)) == Some(self.current.id.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "first-key-0123456789abcdef0123456789";
    const K2: &str = "second-key-0123456789abcdef012345678";

    #[test]
    fn a_value_opens_only_with_its_key_for_its_row() {
        let ring = KeyRing::new(K1, None).unwrap();
        let sealed = ring.seal("up/alice", b"refresh-secret").unwrap();
        assert!(!sealed.windows(14).any(|w| w == b"refresh-secret"));
        assert_eq!(ring.open("up/alice", &sealed).unwrap(), b"refresh-secret");
        assert_eq!(ring.open("up/bob", &sealed), Err(VaultError::Corrupt), "moved to another row");
        let mut changed = sealed.clone();
        let last = changed.len() - 1;
        changed[last] ^= 1;
        assert_eq!(ring.open("up/alice", &changed), Err(VaultError::Corrupt));
        assert_eq!(ring.open("up/alice", b"v1"), Err(VaultError::Corrupt));
        assert_ne!(ring.seal("up/alice", b"x").unwrap(), ring.seal("up/alice", b"x").unwrap(), "random nonces");
    }

    #[test]
    fn keys_rotate() {
        let old = KeyRing::new(K1, None).unwrap();
        let sealed = old.seal("r", b"secret").unwrap();
        let rotated = KeyRing::new(K2, Some(&format!(" {K1} ,"))).unwrap();
        assert_eq!(rotated.open("r", &sealed).unwrap(), b"secret");
        assert!(!rotated.is_current(&sealed));
        assert!(rotated.is_current(&rotated.seal("r", b"secret").unwrap()));
        let retired = KeyRing::new(K2, None).unwrap();
        assert!(matches!(retired.open("r", &sealed), Err(VaultError::UnknownKey(_))));
        assert!(KeyRing::new("short", None).is_err());
        assert!(KeyRing::new(K2, Some("short")).is_err());
        assert!(!format!("{rotated:?}").contains("key-0123"), "{rotated:?}");
    }

    #[test]
    fn a_ring_for_a_purpose_opens_only_its_own_and_rotates_with_the_ring() {
        let (a, b) = ("purpose-key-a-0123456789abcdef0123456789", "purpose-key-b-0123456789abcdef0123456789");
        let old = KeyRing::new(a, None).unwrap();
        let sealed = old.for_purpose("one").seal("row", b"x").unwrap();
        assert_eq!(old.for_purpose("one").open("row", &sealed).unwrap(), b"x");
        assert!(old.for_purpose("two").open("row", &sealed).is_err());
        assert!(old.open("row", &sealed).is_err());
        let rotated = KeyRing::new(b, Some(a)).unwrap();
        assert_eq!(rotated.for_purpose("one").open("row", &sealed).unwrap(), b"x");
        assert!(KeyRing::new(b, None).unwrap().for_purpose("one").open("row", &sealed).is_err());
    }
}
