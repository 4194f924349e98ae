//! Randomness: every session id, secret, token id and MAC key comes from the operating
//! system's random source.
//!
//! Invariant: there is no fallback. When the OS cannot give randomness, the caller gets
//! [`NoRandomness`]: a start refuses, a request is refused (503); nothing falls back to a
//! counter or to zeros.

use std::sync::atomic::{AtomicBool, Ordering};

/// The system random source failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the system random source failed: {0}")]
pub struct NoRandomness(String);

/// Test hook (`serve --test-no-randomness`): behave as if the OS random source failed.
static FAIL: AtomicBool = AtomicBool::new(false);

/// Makes every later call fail, as a broken random source would (a hidden test hook).
pub fn fail_from_now_on() {
    FAIL.store(true, Ordering::Relaxed);
}

/// Fills `buf` from the OS random source.
pub(crate) fn fill(buf: &mut [u8]) -> Result<(), NoRandomness> {
    if FAIL.load(Ordering::Relaxed) {
        return Err(NoRandomness("disabled by --test-no-randomness".into()));
    }
    getrandom::fill(buf).map_err(|e| NoRandomness(e.to_string()))
}

/// 32 random bytes.
pub(crate) fn key() -> Result<[u8; 32], NoRandomness> {
    let mut b = [0u8; 32];
    fill(&mut b)?;
    Ok(b)
}

/// A new random id: 32 bytes, base64url without padding (43 characters).
pub(crate) fn id() -> Result<String, NoRandomness> {
    use base64::Engine;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(key()?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_distinct_and_url_safe() {
        let a = super::id().unwrap();
        let b = super::id().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
    }
}
