//! Passkey ceremonies (webauthn-rs). The ceremony state never leaves the
//! gateway: it is stored under a random ceremony id for 60 s and taken once,
//! so a replayed response finds nothing.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use webauthn_rs::prelude::{
    DiscoverableAuthentication, Passkey, PasskeyAuthentication, PasskeyRegistration, PublicKeyCredential,
    RegisterPublicKeyCredential, Url, Uuid, Webauthn, WebauthnBuilder,
};

use crate::config::{Config, UserVerification};
use crate::store::{now_ms, AddPasskeyError, OneTime, PasskeyRecord, Secret, Store, StoreError};

pub const CEREMONY_TTL: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PasskeyError {
    #[error("the ceremony expired or was already used")]
    Expired,
    #[error("the passkey was not accepted: {0}")]
    Rejected(String),
    #[error("this passkey is already registered")]
    Duplicate,
    #[error("this account has the maximum number of passkeys")]
    TooMany,
    /// Refused once the passkey named its account.
    #[error("the passkey of {user} was refused: {detail}")]
    Refused { user: String, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Ceremony {
    Register {
        user: String,
        state: PasskeyRegistration,
    },
    Login {
        user: String,
        state: PasskeyAuthentication,
    },
    /// `expected`: the account a name typed first bound the ceremony to.
    Discoverable {
        state: DiscoverableAuthentication,
        #[serde(default)]
        expected: Option<String>,
    },
}

pub struct Passkeys {
    webauthn: Webauthn,
    max_per_user: u64,
}

/// What a successful sign-in proved.
#[derive(Debug)]
pub struct SignedIn {
    pub user: String,
    pub cred_id: String,
}

pub fn encode_cred_id(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn rejected(e: impl std::fmt::Display) -> PasskeyError {
    PasskeyError::Rejected(e.to_string())
}

impl Passkeys {
    pub fn new(config: &Config) -> Result<Self, String> {
        let origin = Url::parse(&config.public_url.origin).map_err(|e| format!("public_url: {e}"))?;
        let mut builder = WebauthnBuilder::new(&config.webauthn.rp_id, &origin)
            .map_err(|e| format!("webauthn.rp_id {:?} does not fit public_url: {e}", config.webauthn.rp_id))?
            .rp_name(&config.webauthn.rp_name)
            .timeout(CEREMONY_TTL);
        for extra in &config.webauthn.origins {
            let url = Url::parse(extra).map_err(|e| format!("webauthn.origins {extra:?}: {e}"))?;
            builder = builder.append_allowed_origin(&url);
        }
        let webauthn = builder.build().map_err(|e| format!("webauthn: {e}"))?;
        if config.webauthn.user_verification != UserVerification::Required {
            // webauthn-rs's passkey ceremonies always require it: say so
            // rather than let the setting look honoured.
            tracing::warn!(
                setting = ?config.webauthn.user_verification,
                "webauthn.user_verification: passkeys always verify the person (fingerprint, face, PIN); treated as required"
            );
        }
        Ok(Self { webauthn, max_per_user: config.webauthn.max_passkeys_per_user as u64 })
    }

    async fn keep(&self, store: &Store, ceremony: &Ceremony) -> Result<Secret, PasskeyError> {
        let id = Secret::generate();
        let state = serde_json::to_vec(ceremony).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        store.put_once(OneTime::Ceremony, &id, &state, CEREMONY_TTL).await?;
        Ok(id)
    }

    async fn take(&self, store: &Store, id: &Secret) -> Result<Ceremony, PasskeyError> {
        let bytes = store.take_once(OneTime::Ceremony, id).await?.ok_or(PasskeyError::Expired)?;
        serde_json::from_slice(&bytes).map_err(|_| PasskeyError::Expired)
    }

    async fn passkeys_of(
        &self,
        store: &Store,
        user: &str,
    ) -> Result<Vec<(PasskeyRecord, Passkey)>, PasskeyError> {
        Ok(store
            .passkeys_of(user)
            .await?
            .into_iter()
            .filter_map(|record| {
                let key = serde_json::from_value::<Passkey>(record.passkey.clone()).ok()?;
                Some((record, key))
            })
            .collect())
    }

    /// Options for `navigator.credentials.create`, asking for a discoverable
    /// credential so the person can later sign in without typing a name.
    pub async fn start_registration(
        &self,
        store: &Store,
        user: &str,
        display_name: &str,
    ) -> Result<(Secret, serde_json::Value), PasskeyError> {
        let existing = self.passkeys_of(store, user).await?;
        if existing.len() as u64 >= self.max_per_user {
            return Err(PasskeyError::TooMany);
        }
        let handle = Uuid::parse_str(&store.user_handle(user).await?)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let exclude = existing.iter().map(|(_, key)| key.cred_id().clone()).collect();
        let (options, state) = self
            .webauthn
            .start_passkey_registration(handle, user, display_name, Some(exclude))
            .map_err(rejected)?;
        let mut options = serde_json::to_value(options).map_err(rejected)?;
        if let Some(selection) = options.pointer_mut("/publicKey/authenticatorSelection") {
            selection["residentKey"] = "required".into();
            selection["requireResidentKey"] = true.into();
        }
        let id = self.keep(store, &Ceremony::Register { user: user.to_string(), state }).await?;
        Ok((id, options))
    }

    pub async fn finish_registration(
        &self,
        store: &Store,
        user: &str,
        ceremony: &Secret,
        credential: &RegisterPublicKeyCredential,
        name: &str,
    ) -> Result<PasskeyRecord, PasskeyError> {
        let Ceremony::Register { user: owner, state } = self.take(store, ceremony).await? else {
            return Err(PasskeyError::Expired);
        };
        if owner != user {
            return Err(PasskeyError::Expired);
        }
        let passkey = self.webauthn.finish_passkey_registration(credential, &state).map_err(rejected)?;
        let name = name.trim();
        let record = PasskeyRecord {
            v: 1,
            cred_id: encode_cred_id(passkey.cred_id().as_ref()),
            name: if name.is_empty() { "Passkey".into() } else { name.chars().take(64).collect() },
            created_ms: now_ms(),
            last_used_ms: None,
            passkey: serde_json::to_value(&passkey).map_err(rejected)?,
        };
        match store.add_passkey(user, &record).await {
            Ok(()) => Ok(record),
            Err(AddPasskeyError::Duplicate) => Err(PasskeyError::Duplicate),
            Err(AddPasskeyError::Store(e)) => Err(e.into()),
        }
    }

    /// Options for `navigator.credentials.get` to sign in: always a
    /// discoverable request, the same for every name, so the answer tells
    /// nothing of an account or its credentials. With `expected` (a name
    /// typed first), only that account's passkey signs in.
    pub async fn start_login(
        &self,
        store: &Store,
        expected: Option<String>,
    ) -> Result<(Secret, serde_json::Value), PasskeyError> {
        let (options, state) = self.webauthn.start_discoverable_authentication().map_err(rejected)?;
        let options = serde_json::to_value(options).map_err(rejected)?;
        let id = self.keep(store, &Ceremony::Discoverable { state, expected }).await?;
        Ok((id, options))
    }

    /// Options for a signed-in person to prove it is still them (unlock):
    /// their own passkeys, which they already know.
    pub async fn start_for(
        &self,
        store: &Store,
        user: &str,
    ) -> Result<(Secret, serde_json::Value), PasskeyError> {
        let keys: Vec<Passkey> = self.passkeys_of(store, user).await?.into_iter().map(|(_, k)| k).collect();
        let (options, state) = self.webauthn.start_passkey_authentication(&keys).map_err(rejected)?;
        let options = serde_json::to_value(options).map_err(rejected)?;
        let id = self.keep(store, &Ceremony::Login { user: user.to_string(), state }).await?;
        Ok((id, options))
    }

    /// Checks the browser's answer; updates the passkey's counter and backup
    /// state and its last use.
    pub async fn finish_login(
        &self,
        store: &Store,
        ceremony: &Secret,
        credential: &PublicKeyCredential,
    ) -> Result<SignedIn, PasskeyError> {
        let cred_id = encode_cred_id(credential.get_credential_id());
        let (user, result, mut passkey) = match self.take(store, ceremony).await? {
            Ceremony::Login { user, state } => {
                let result =
                    self.webauthn.finish_passkey_authentication(credential, &state).map_err(rejected)?;
                let record =
                    store.passkey(&user, &cred_id).await?.ok_or_else(|| rejected("unknown credential"))?;
                let passkey: Passkey = serde_json::from_value(record.passkey).map_err(rejected)?;
                (user, result, passkey)
            }
            Ceremony::Discoverable { state, expected } => {
                let (handle, _) =
                    self.webauthn.identify_discoverable_authentication(credential).map_err(rejected)?;
                let user = store
                    .user_by_handle(&handle.to_string())
                    .await?
                    .ok_or_else(|| rejected("unknown user handle"))?;
                let refused = |detail: String| PasskeyError::Refused { user: user.clone(), detail };
                if expected.as_ref().is_some_and(|name| *name != user) {
                    return Err(refused("a passkey of another account than the name typed".into()));
                }
                let record = store
                    .passkey(&user, &cred_id)
                    .await?
                    .ok_or_else(|| refused("unknown credential".into()))?;
                let passkey: Passkey =
                    serde_json::from_value(record.passkey).map_err(|e| refused(e.to_string()))?;
                let result = self
                    .webauthn
                    .finish_discoverable_authentication_v2(credential, state, &passkey)
                    .map_err(|e| refused(e.to_string()))?;
                (user, result, passkey)
            }
            Ceremony::Register { .. } => return Err(PasskeyError::Expired),
        };
        let changed = passkey.update_credential(&result) == Some(true);
        let updated = if changed { Some(serde_json::to_value(&passkey).map_err(rejected)?) } else { None };
        store.update_passkey(&user, &cred_id, updated, now_ms()).await?;
        Ok(SignedIn { user, cred_id })
    }
}
