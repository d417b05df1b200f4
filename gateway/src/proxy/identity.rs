//! The identity the PBX may trust, as header values made once per user when
//! a policy is first used, not on every request. The signed assertion, when
//! configured, is reused for half of its minute: signing is the slowest thing
//! a request could otherwise do.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue};
use pbxgate_policies::{Policy, User};
use rustc_hash::FxHashMap;

use crate::auth::assertion::{Signer, LIFETIME_SECS};
use crate::config::IdentityHeaders;

/// Per policy: each user's identity headers.
#[derive(Default)]
pub struct Identities {
    current: ArcSwapOption<ForPolicy>,
}

struct ForPolicy {
    /// The policy these were made from; a reload makes them anew.
    policy: Arc<Policy>,
    /// Keyed by the policy's user names (Fx: no client chooses them).
    users: FxHashMap<String, UserHeaders>,
}

struct UserHeaders {
    fixed: Bytes,
    /// The last assertion and when it was signed (Unix seconds).
    assertion: Mutex<Option<(u64, HeaderValue)>>,
}

/// What one request sends upstream, after every client-sent copy is removed.
#[derive(Debug)]
pub struct UpstreamIdentity {
    /// The user's fixed headers as head lines (`name: value\r\n` each).
    fixed: Bytes,
    assertion: Option<(HeaderName, HeaderValue)>,
}

impl UpstreamIdentity {
    /// The fixed headers, written as head lines once per user.
    pub fn lines(&self) -> &[u8] {
        &self.fixed
    }

    pub fn assertion(&self) -> Option<&(HeaderName, HeaderValue)> {
        self.assertion.as_ref()
    }
}

impl Identities {
    /// `Remote-User` and friends (names from `[headers]`) for `user` of
    /// `policy`, plus the signed assertion when configured.
    pub fn for_user(
        &self,
        policy: &Arc<Policy>,
        user: &User,
        names: &IdentityHeaders,
        signer: Option<&Signer>,
        now_secs: u64,
    ) -> UpstreamIdentity {
        let mut current = self.current.load();
        if !current.as_ref().is_some_and(|c| Arc::ptr_eq(&c.policy, policy)) {
            self.current.store(Some(Arc::new(ForPolicy::new(policy, names))));
            current = self.current.load();
        }
        let Some(headers) = current.as_ref().and_then(|c| c.users.get(&user.name)) else {
            // Only while another thread swaps in a newer policy's headers.
            return UpstreamIdentity { fixed: fixed_lines(user, names), assertion: None };
        };
        let assertion = match (&names.assertion, signer) {
            (Some(name), Some(signer)) => {
                headers.assertion(user, signer, now_secs).map(|v| (name.clone(), v))
            }
            _ => None,
        };
        UpstreamIdentity { fixed: headers.fixed.clone(), assertion }
    }
}

impl ForPolicy {
    fn new(policy: &Arc<Policy>, names: &IdentityHeaders) -> Self {
        let users = policy
            .users
            .iter()
            .map(|user| {
                let headers = UserHeaders { fixed: fixed_lines(user, names), assertion: Mutex::new(None) };
                (user.name.clone(), headers)
            })
            .collect();
        Self { policy: policy.clone(), users }
    }
}

impl UserHeaders {
    fn assertion(&self, user: &User, signer: &Signer, now_secs: u64) -> Option<HeaderValue> {
        let mut last = self.assertion.lock().ok()?;
        if let Some((signed, value)) = last.as_ref() {
            if now_secs.saturating_sub(*signed) < LIFETIME_SECS / 2 {
                return Some(value.clone());
            }
        }
        let role = user.role.as_str();
        let jwt =
            signer.sign(&user.name, user.email.as_deref(), user.display_name.as_deref(), role, now_secs)?;
        let value = HeaderValue::from_str(&jwt).ok()?;
        *last = Some((now_secs, value.clone()));
        Some(value)
    }
}

/// The user's fixed identity headers as head lines. Values a header cannot
/// carry (not visible ASCII) are left out.
fn fixed_lines(user: &User, names: &IdentityHeaders) -> Bytes {
    let mut lines = BytesMut::new();
    let values = [
        (&names.groups, Some(user.role.as_str())),
        (&names.user, Some(user.name.as_str())),
        (&names.email, user.email.as_deref()),
        (&names.name, user.display_name.as_deref()),
    ];
    for (name, value) in values {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
            super::headers::line(&mut lines, name.as_str(), value.as_bytes());
        }
    }
    lines.freeze()
}
