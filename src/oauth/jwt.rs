//! Access tokens that are JWTs (RFC 7519, profiled by RFC 9068): what a resource server checks
//! before it believes one.
//!
//! Invariants: a token is believed only when a key of its issuer's own set verifies it (never a
//! key the token names: `jku`, `x5u`, `jwk` and `x5c` are ignored), with an algorithm the
//! operator allowed, that fits the key's type and the key's own `alg`; `none` and the HMAC
//! algorithms never verify (no secret is shared with an issuer); a `crit` header is refused (no
//! extension is understood); `iss`, `aud`, `exp` and `sub` are required and `nbf` is checked,
//! both clocks with the leeway; a token larger than [`MAX_TOKEN`] is refused before anything is
//! decoded, and a key set larger than [`MAX_KEYS`] is refused whole.

use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;

/// The longest token read (16 KiB: more than any provider issues, less than a header limit).
pub(crate) const MAX_TOKEN: usize = 16 * 1024;
/// The most keys one issuer's set may hold.
pub(crate) const MAX_KEYS: usize = 100;

pub(crate) use crate::credentials::ASYMMETRIC;

/// Why a token is not believed (the client is told only "invalid token").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum JwtError {
    /// Larger than [`MAX_TOKEN`].
    #[error("the token is larger than {MAX_TOKEN} bytes")]
    TooLarge,
    /// Not three base64url parts with a JSON header and payload.
    #[error("not a JWT")]
    Malformed,
    /// An algorithm that is not accepted (`none`, HMAC, or one the operator left out).
    #[error("algorithm {0:?} is not accepted")]
    Algorithm(String),
    /// The header names extensions that must be understood.
    #[error("the header marks extensions critical")]
    Critical,
    /// No key of the issuer's set fits (its id, its type, its algorithm): the set may be stale.
    #[error("no key of the issuer fits (kid {0:?})")]
    UnknownKey(Option<String>),
    /// The signature does not verify.
    #[error("the signature does not verify")]
    Signature,
    /// Past `exp` (and the leeway).
    #[error("expired")]
    Expired,
    /// Before `nbf` (and the leeway).
    #[error("not valid yet")]
    NotYet,
    /// Another `iss`.
    #[error("issued by another issuer")]
    Issuer,
    /// No `aud` this resource accepts.
    #[error("issued for another audience")]
    Audience,
    /// `typ` is not `at+jwt` where access tokens are required to say so.
    #[error("not typed as an access token")]
    Type,
    /// A required claim is missing or malformed.
    #[error("claim {0} is missing or malformed")]
    Claim(String),
}

/// What a token must satisfy.
#[derive(Debug, Clone)]
pub(crate) struct Policy<'a> {
    /// The exact `iss`.
    pub issuer: &'a str,
    /// The `aud` values accepted (one is enough).
    pub audiences: &'a [String],
    /// The algorithms accepted (a subset of [`ASYMMETRIC`]).
    pub algorithms: &'a [Algorithm],
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway: Duration,
    /// Whether `typ` must be `at+jwt` (RFC 9068).
    pub require_at_jwt: bool,
}

/// One verification key.
struct Key {
    kid: Option<String>,
    /// The key's own `alg`, when its JWK names one.
    alg: Option<Algorithm>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

/// An issuer's public keys, from its JWKS document.
#[derive(Default)]
pub(crate) struct KeySet {
    keys: Vec<Key>,
    /// Which fetch produced it (0: none yet), so a waiter can tell newer keys arrived.
    pub generation: u64,
}

/// Why a JWKS document was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum KeySetError {
    /// Not `{"keys": [...]}`.
    #[error("not a JWK set: {0}")]
    Malformed(String),
    /// More keys than [`MAX_KEYS`].
    #[error("{0} keys, more than the {MAX_KEYS} accepted")]
    TooMany(usize),
}

impl KeySet {
    /// The signing keys of a JWKS document. Keys for encryption, symmetric keys and keys of a
    /// type this build cannot use are left out (one odd key does not discard the others).
    pub(crate) fn parse(json: &[u8]) -> Result<KeySet, KeySetError> {
        #[derive(Deserialize)]
        struct Doc<'a> {
            #[serde(borrow)]
            keys: Vec<&'a RawValue>,
        }
        let doc: Doc<'_> = serde_json::from_slice(json).map_err(|e| KeySetError::Malformed(e.to_string()))?;
        if doc.keys.len() > MAX_KEYS {
            return Err(KeySetError::TooMany(doc.keys.len()));
        }
        let mut keys = Vec::new();
        for raw in doc.keys {
            let Ok(jwk) = serde_json::from_str::<Jwk>(raw.get()) else { continue };
            if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != PublicKeyUse::Signature) {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(&jwk) else { continue };
            let family = key.family();
            if family == AlgorithmFamily::Hmac {
                continue;
            }
            // A key for another use (RSA-OAEP, say) is not a verification key.
            let alg = match jwk.common.key_algorithm.map(Algorithm::try_from) {
                Some(Ok(a)) => Some(a),
                Some(Err(_)) => continue,
                None => None,
            };
            keys.push(Key { kid: jwk.common.key_id.clone(), alg, family, key });
        }
        Ok(KeySet { keys, generation: 0 })
    }

    /// How many usable keys the set holds.
    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The key for a token: by its `kid`, or without one the only key that fits the algorithm;
    /// a key fits when its type is the algorithm's and its own `alg` (if any) is the same.
    fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<&Key> {
        let mut fitting = self.keys.iter().filter(|k| k.family == alg.family() && k.alg.is_none_or(|a| a == alg));
        match kid {
            Some(kid) => fitting.find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let first = fitting.next();
                if fitting.next().is_some() { None } else { first }
            }
        }
    }
}

/// The claims Portcullis reads from an access token.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Claims {
    /// The issuer.
    pub iss: String,
    /// The subject: who the token speaks for.
    pub sub: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// The `aud` value or values.
    #[serde(default)]
    pub aud: Audience,
    /// Scopes, space-separated (RFC 9068, RFC 8693).
    #[serde(default)]
    pub scope: Option<String>,
    /// Scopes as Entra ID and Okta write them: a list or a space-separated string.
    #[serde(default)]
    pub scp: Option<Audience>,
    /// Every other claim (the identity claim, groups, roles).
    #[serde(flatten)]
    pub other: serde_json::Map<String, serde_json::Value>,
}

/// One string or a list of them (`aud`, `scp`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub(crate) enum Audience {
    /// None given.
    #[default]
    None,
    /// One value.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Audience {
    /// The values.
    pub(crate) fn values(&self) -> Vec<&str> {
        match self {
            Audience::None => Vec::new(),
            Audience::One(v) => vec![v.as_str()],
            Audience::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

impl Claims {
    /// Every scope the token carries, from `scope` and `scp`.
    pub(crate) fn scopes(&self) -> Vec<&str> {
        let mut out: Vec<&str> = self.scope.as_deref().map(|s| s.split_whitespace().collect()).unwrap_or_default();
        for v in self.scp.as_ref().map(Audience::values).unwrap_or_default() {
            out.extend(v.split_whitespace());
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// The `iss` a token claims, read before anything is verified, only to choose whose keys and
/// policy to verify it with (nothing else of an unverified token is used).
pub(crate) fn claimed_issuer(token: &str) -> Result<String, JwtError> {
    if token.len() > MAX_TOKEN {
        return Err(JwtError::TooLarge);
    }
    let payload = token.split('.').nth(1).ok_or(JwtError::Malformed)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).map_err(|_| JwtError::Malformed)?;
    #[derive(Deserialize)]
    struct Iss {
        iss: String,
    }
    serde_json::from_slice::<Iss>(&bytes).map(|i| i.iss).map_err(|_| JwtError::Claim("iss".into()))
}

/// Whether a credential has the shape of a JWT (three base64url parts): only those are tried as
/// one.
pub(crate) fn looks_like_jwt(token: &str) -> bool {
    if token.len() > MAX_TOKEN {
        return false;
    }
    // One pass: every byte base64url or a dot, exactly two dots.
    let mut dots = 0;
    for b in token.bytes() {
        match b {
            b'.' => dots += 1,
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => {}
            _ => return false,
        }
    }
    dots == 2
}

/// Verifies a token against an issuer's keys and policy; its claims when it holds.
pub(crate) fn verify(token: &str, policy: &Policy<'_>, keys: &KeySet) -> Result<Claims, JwtError> {
    if token.len() > MAX_TOKEN {
        return Err(JwtError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed);
    };
    #[derive(Deserialize)]
    struct Header {
        alg: String,
        kid: Option<String>,
        typ: Option<String>,
        crit: Option<serde_json::Value>,
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).map_err(|_| JwtError::Malformed)?;
    let header: Header = serde_json::from_slice(&bytes).map_err(|_| JwtError::Malformed)?;
    if header.crit.is_some() {
        return Err(JwtError::Critical);
    }
    let alg = Algorithm::from_str(&header.alg)
        .ok()
        .filter(|a| ASYMMETRIC.contains(a) && policy.algorithms.contains(a))
        .ok_or_else(|| JwtError::Algorithm(header.alg.clone()))?;
    if policy.require_at_jwt
        && !header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt"))
    {
        return Err(JwtError::Type);
    }
    let key = keys.find(header.kid.as_deref(), alg).ok_or_else(|| JwtError::UnknownKey(header.kid.clone()))?;
    let mut v = Validation::new(alg);
    v.algorithms = vec![alg];
    v.leeway = policy.leeway.as_secs();
    v.validate_nbf = true;
    v.set_issuer(&[policy.issuer]);
    v.set_audience(policy.audiences);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    jsonwebtoken::decode::<Claims>(token, &key.key, &v).map(|d| d.claims).map_err(|e| match e.into_kind() {
        ErrorKind::InvalidSignature => JwtError::Signature,
        ErrorKind::ExpiredSignature => JwtError::Expired,
        ErrorKind::ImmatureSignature => JwtError::NotYet,
        ErrorKind::InvalidIssuer => JwtError::Issuer,
        ErrorKind::InvalidAudience => JwtError::Audience,
        ErrorKind::InvalidAlgorithm => JwtError::Algorithm(header.alg.clone()),
        ErrorKind::MissingRequiredClaim(c) | ErrorKind::InvalidClaimFormat(c) => JwtError::Claim(c),
        // The payload is not the claims Portcullis needs (a missing `sub`, a non-numeric `exp`).
        ErrorKind::Json(e) => JwtError::Claim(e.to_string()),
        _ => JwtError::Malformed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair};
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// An ES256 key: its signing key and its public JWK.
    fn ec_key(kid: &str) -> (EncodingKey, serde_json::Value) {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let point = pair.public_key().as_ref();
        let jwk = json!({"kty":"EC","crv":"P-256","x":b64(&point[1..33]),"y":b64(&point[33..65]),"kid":kid,"alg":"ES256","use":"sig"});
        (EncodingKey::from_ec_der(pkcs8.as_ref()), jwk)
    }

    fn ed_key(kid: &str) -> (EncodingKey, serde_json::Value) {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new()).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let jwk = json!({"kty":"OKP","crv":"Ed25519","x":b64(pair.public_key().as_ref()),"kid":kid});
        (EncodingKey::from_ed_der(pkcs8.as_ref()), jwk)
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn claims() -> serde_json::Value {
        json!({"iss":"https://idp.test","sub":"alice","aud":"https://gw.test/mcp","exp":now()+300,
            "scope":"files:read mail","scp":["extra"],"email":"alice@example.com"})
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &serde_json::Value, key: &EncodingKey) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&h, claims, key).unwrap()
    }

    fn check(token: &str, keys: &KeySet) -> Result<Claims, JwtError> {
        let audiences = ["https://gw.test/mcp".to_owned()];
        let policy = Policy {
            issuer: "https://idp.test",
            audiences: &audiences,
            algorithms: ASYMMETRIC,
            leeway: Duration::from_secs(60),
            require_at_jwt: false,
        };
        verify(token, &policy, keys)
    }

    fn set(jwks: &[&serde_json::Value]) -> KeySet {
        KeySet::parse(json!({"keys": jwks}).to_string().as_bytes()).unwrap()
    }

    #[test]
    fn a_token_signed_by_a_key_of_the_set_is_believed() {
        let (ec, ec_jwk) = ec_key("k1");
        let (ed, ed_jwk) = ed_key("k2");
        let keys = set(&[&ec_jwk, &ed_jwk]);
        assert_eq!(keys.len(), 2);
        let c = check(&sign(Algorithm::ES256, Some("k1"), &claims(), &ec), &keys).unwrap();
        assert_eq!((c.sub.as_str(), c.scopes()), ("alice", vec!["extra", "files:read", "mail"]));
        assert_eq!(c.other["email"], "alice@example.com");
        assert!(check(&sign(Algorithm::EdDSA, Some("k2"), &claims(), &ed), &keys).is_ok());
        // Without a kid: the one key that fits the algorithm.
        assert!(check(&sign(Algorithm::EdDSA, None, &claims(), &ed), &keys).is_ok());
    }

    #[test]
    fn the_claims_must_hold() {
        let (ec, jwk) = ec_key("k1");
        let keys = set(&[&jwk]);
        let with = |k: &str, v: serde_json::Value| {
            let mut c = claims();
            c[k] = v;
            sign(Algorithm::ES256, Some("k1"), &c, &ec)
        };
        assert_eq!(check(&with("exp", json!(now() - 120)), &keys).unwrap_err(), JwtError::Expired);
        assert!(check(&with("exp", json!(now() - 30)), &keys).is_ok(), "within the leeway");
        assert_eq!(check(&with("nbf", json!(now() + 120)), &keys).unwrap_err(), JwtError::NotYet);
        assert_eq!(check(&with("iss", json!("https://other.test")), &keys).unwrap_err(), JwtError::Issuer);
        assert_eq!(check(&with("aud", json!("https://gw.test/servers/a/mcp")), &keys).unwrap_err(), JwtError::Audience);
        assert!(check(&with("aud", json!(["x", "https://gw.test/mcp"])), &keys).is_ok());
        let mut c = claims();
        c.as_object_mut().unwrap().remove("sub");
        assert!(matches!(check(&sign(Algorithm::ES256, Some("k1"), &c, &ec), &keys), Err(JwtError::Claim(_))));
        c = claims();
        c.as_object_mut().unwrap().remove("aud");
        assert!(matches!(check(&sign(Algorithm::ES256, Some("k1"), &c, &ec), &keys), Err(JwtError::Claim(_))));
    }

    #[test]
    fn forged_tokens_are_refused() {
        let (ec, jwk) = ec_key("k1");
        let (attacker, attacker_jwk) = ec_key("k1");
        let keys = set(&[&jwk]);
        let payload = b64(claims().to_string().as_bytes());
        // alg none, with and without a signature.
        let none = format!("{}.{payload}.", b64(br#"{"alg":"none","kid":"k1"}"#));
        assert_eq!(check(&none, &keys).unwrap_err(), JwtError::Algorithm("none".into()));
        // HS256 keyed with the public key (the classic confusion).
        let secret = jwk.to_string();
        let hs = sign(Algorithm::HS256, Some("k1"), &claims(), &EncodingKey::from_secret(secret.as_bytes()).unwrap());
        assert_eq!(check(&hs, &keys).unwrap_err(), JwtError::Algorithm("HS256".into()));
        // Another key under our kid, with the header pointing at the attacker's keys.
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        h.jku = Some("https://attacker.test/jwks".into());
        h.jwk = serde_json::from_value(attacker_jwk).ok();
        let pointed = jsonwebtoken::encode(&h, &claims(), &attacker).unwrap();
        assert_eq!(check(&pointed, &keys).unwrap_err(), JwtError::Signature);
        // A kid the set never had.
        let unknown = sign(Algorithm::ES256, Some("k9"), &claims(), &ec);
        assert_eq!(check(&unknown, &keys).unwrap_err(), JwtError::UnknownKey(Some("k9".into())));
        // An ES256 token for an Ed25519-only set: no key fits.
        let (_, ed_jwk) = ed_key("e1");
        assert!(matches!(
            check(&sign(Algorithm::ES256, None, &claims(), &ec), &set(&[&ed_jwk])),
            Err(JwtError::UnknownKey(None))
        ));
        // A critical extension.
        let good = sign(Algorithm::ES256, Some("k1"), &claims(), &ec);
        let crit = format!(
            "{}.{}",
            b64(br#"{"alg":"ES256","kid":"k1","crit":["exp2"],"exp2":1}"#),
            good.split_once('.').unwrap().1
        );
        assert_eq!(check(&crit, &keys).unwrap_err(), JwtError::Critical);
        // Tampered payload.
        let (h, rest) = good.split_once('.').unwrap();
        let sig = rest.rsplit_once('.').unwrap().1;
        let mut c = claims();
        c["sub"] = json!("root");
        assert_eq!(
            check(&format!("{h}.{}.{sig}", b64(c.to_string().as_bytes())), &keys).unwrap_err(),
            JwtError::Signature
        );
    }

    #[test]
    fn size_and_shape_are_bounded() {
        let keys = KeySet::default();
        let huge = format!("{}.{}.{}", "a".repeat(MAX_TOKEN), "b", "c");
        assert_eq!(check(&huge, &keys).unwrap_err(), JwtError::TooLarge);
        assert!(!looks_like_jwt(&"a.b.".repeat(1 << 18)));
        assert_eq!(check("a.b", &keys).unwrap_err(), JwtError::Malformed);
        assert_eq!(check("a.b.c.d", &keys).unwrap_err(), JwtError::Malformed);
        let (_, jwk) = ec_key("k");
        let many: Vec<&serde_json::Value> = std::iter::repeat_n(&jwk, 1000).collect();
        let doc = json!({"keys": many}).to_string();
        assert_eq!(KeySet::parse(doc.as_bytes()).err(), Some(KeySetError::TooMany(1000)));
        // Odd keys are left out, the rest kept.
        let odd = json!({"keys":[{"kty":"oct","k":"c2VjcmV0"},{"kty":"RSA","alg":"RSA-OAEP","n":"AQAB","e":"AQAB"},{"kty":"nope"},jwk]});
        assert_eq!(KeySet::parse(odd.to_string().as_bytes()).unwrap().len(), 1);
    }

    #[test]
    fn access_token_type_when_required() {
        let (ec, jwk) = ec_key("k1");
        let keys = set(&[&jwk]);
        let audiences = ["https://gw.test/mcp".to_owned()];
        let policy = Policy {
            issuer: "https://idp.test",
            audiences: &audiences,
            algorithms: &[Algorithm::ES256],
            leeway: Duration::ZERO,
            require_at_jwt: true,
        };
        let plain = sign(Algorithm::ES256, Some("k1"), &claims(), &ec);
        assert_eq!(verify(&plain, &policy, &keys).unwrap_err(), JwtError::Type);
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        h.typ = Some("at+jwt".into());
        assert!(verify(&jsonwebtoken::encode(&h, &claims(), &ec).unwrap(), &policy, &keys).is_ok());
        assert_eq!(claimed_issuer(&plain).unwrap(), "https://idp.test");
    }
}
