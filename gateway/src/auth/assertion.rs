//! The signed assertion for the upstream (`headers.assertion`): a short-lived
//! ES256 JWT. The key is made once and kept in the store, so every gateway
//! instance signs with the same key; its public half is served as a JWKS at
//! `/.well-known/pbxgate/jwks.json`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::Serialize;

use crate::store::{secret, Store, StoreError};

pub(crate) const LIFETIME_SECS: u64 = 60;

pub struct Signer {
    key: EncodingKey,
    kid: String,
    jwks: String,
    issuer: String,
    audience: String,
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    aud: &'a str,
    sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    role: &'a str,
    iat: u64,
    exp: u64,
}

impl Signer {
    /// Loads the shared key from the store, making it on first use.
    pub async fn load(store: &Store, issuer: &str, audience: &str) -> Result<Self, StoreError> {
        let pkcs8 = store
            .get_or_init("assertion-key", || {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                    .map(|doc| doc.as_ref().to_vec())
                    .unwrap_or_default()
            })
            .await?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &SystemRandom::new())
            .map_err(|e| StoreError::Corrupt(format!("assertion key: {e}")))?;
        let public = pair.public_key().as_ref();
        // Uncompressed point: 0x04 || x (32) || y (32).
        let (x, y) = (&public[1..33], &public[33..65]);
        let kid = secret::hex(&ring::digest::digest(&ring::digest::SHA256, public).as_ref()[..8]);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]})
        .to_string();
        Ok(Self {
            key: EncodingKey::from_ec_der(&pkcs8),
            kid,
            jwks,
            issuer: issuer.to_string(),
            audience: audience.to_string(),
        })
    }

    pub fn jwks(&self) -> &str {
        &self.jwks
    }

    /// A JWT for one request: who, with which role, valid for a minute.
    pub fn sign(
        &self,
        user: &str,
        email: Option<&str>,
        name: Option<&str>,
        role: &str,
        now_secs: u64,
    ) -> Option<String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let claims = Claims {
            iss: &self.issuer,
            aud: &self.audience,
            sub: user,
            email,
            name,
            role,
            iat: now_secs,
            exp: now_secs + LIFETIME_SECS,
        };
        jsonwebtoken::encode(&header, &claims, &self.key).ok()
    }
}
