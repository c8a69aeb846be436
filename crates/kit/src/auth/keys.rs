//! Access tokens: what they assert ([`Claims`]) and the Ed25519 keys that sign them. Only the
//! auth service signs; every process verifies (see [`super::Verifier`]).

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use crm_proto::auth::v1::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair;
use serde::{Deserialize, Serialize};

/// The `iss` of every access token.
pub const ISSUER: &str = "crm";

/// What an access token asserts.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Claims {
    pub iss: String,
    /// User id, or service account id when `svc`.
    pub sub: String,
    /// Issued at, Unix seconds.
    pub iat: i64,
    /// Expires at, Unix seconds.
    pub exp: i64,
    /// Token id.
    pub jti: String,
    #[serde(default)]
    pub svc: bool,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub email: String,
    /// Department id at issue time.
    #[serde(default)]
    pub dept: String,
    /// Permissions at issue time.
    #[serde(default)]
    pub perms: Vec<String>,
}

/// An Ed25519 key that signs access tokens.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    pkcs8: Arc<[u8]>,
    public: Vec<u8>,
    encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A new random key named by a new id.
    pub fn generate() -> SigningKey {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).expect("the system random source works");
        SigningKey::from_pkcs8(crate::id::new(), pkcs8.as_ref()).expect("a generated key is valid")
    }

    /// A stored key.
    pub fn from_pkcs8(kid: String, pkcs8: &[u8]) -> Result<SigningKey, String> {
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8)
            .map_err(|_| format!("signing key {kid} is not an Ed25519 PKCS#8 key"))?;
        Ok(SigningKey {
            public: pair.public_key().as_ref().to_vec(),
            encoding: EncodingKey::from_ed_der(pkcs8),
            pkcs8: pkcs8.into(),
            kid,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as PKCS#8 DER, for storage.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as a JWK (RFC 8037).
    pub fn jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            kid: self.kid.clone(),
            x: URL_SAFE_NO_PAD.encode(&self.public),
            alg: "EdDSA".into(),
            r#use: "sig".into(),
        }
    }

    /// A compact JWT whose header names this key.
    pub fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("claims serialize and Ed25519 signs")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_keys_round_trip() {
        let key = SigningKey::generate();
        let again = SigningKey::from_pkcs8(key.kid().into(), key.pkcs8()).unwrap();
        assert_eq!(key.jwk(), again.jwk());
        assert!(SigningKey::from_pkcs8("k".into(), b"junk").is_err());
        assert!(!format!("{key:?}").contains(&URL_SAFE_NO_PAD.encode(key.pkcs8())));
    }
}
