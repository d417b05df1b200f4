//! Passwords, where an admin allows them: argon2id hashing off the async
//! threads, the PBX's strength score, and the same time and answer for an
//! unknown account as for a wrong password.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::{PasswordStrength, Passwords};

/// The PBX's score: 10 points per digit, 26 per letter, 28 per other character.
pub fn score(password: &str) -> u32 {
    password
        .chars()
        .map(|c| {
            if c.is_ascii_digit() {
                10
            } else if c.is_alphabetic() {
                26
            } else {
                28
            }
        })
        .sum()
}

/// Why a new password is refused, in words for the person choosing it.
pub fn check_new(policy: &Passwords, password: &str) -> Result<(), String> {
    if password.is_empty() {
        return if policy.allow_empty { Ok(()) } else { Err("An empty password is not allowed.".into()) };
    }
    let needed = match policy.strength {
        PasswordStrength::AcceptAll => 0,
        PasswordStrength::Medium => 120,
        PasswordStrength::High => 200,
    };
    if score(password) < needed {
        return Err(format!(
            "This password is too weak (score {} of {needed} needed). Use a longer one, mixing letters, digits and symbols.",
            score(password)
        ));
    }
    Ok(())
}

/// Hashes on a blocking thread: argon2 takes tens of milliseconds on purpose.
pub async fn hash(password: String) -> Result<String, String> {
    tokio::task::spawn_blocking(move || {
        let salt = new_salt()?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// [`verify`] with the gateway's dummy hash and argon2 counter.
pub(crate) async fn check(state: &crate::State, password: String, hash: Option<String>) -> bool {
    verify(password, hash, state.auth.dummy_hash().await, &state.metrics.password_verifications).await
}

/// Verifies on a blocking thread. With no hash to check against, verifies
/// against `dummy` and fails, so that takes as long as a real check.
/// `counter` counts argon2 runs (a metric: the Basic cache keeps it flat).
pub async fn verify(password: String, hash: Option<String>, dummy: &str, counter: &AtomicU64) -> bool {
    let dummy = dummy.to_string();
    counter.fetch_add(1, Ordering::Relaxed);
    tokio::task::spawn_blocking(move || {
        let real = hash.is_some();
        let phc = hash.unwrap_or(dummy);
        let ok = PasswordHash::new(&phc)
            .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
            .unwrap_or(false);
        ok && real
    })
    .await
    .unwrap_or(false)
}

fn new_salt() -> Result<SaltString, String> {
    SaltString::encode_b64(&crate::store::secret::random::<16>()).map_err(|e| e.to_string())
}

/// A hash of a random password, made at start-up, for [`verify`] to burn time on.
pub fn dummy_hash() -> String {
    let Ok(salt) = new_salt() else { return String::new() };
    let random = crate::store::secret::hex(&crate::store::secret::random::<16>());
    Argon2::default().hash_password(random.as_bytes(), &salt).map(|h| h.to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(strength: PasswordStrength, allow_empty: bool) -> Passwords {
        Passwords { strength, allow_empty, users_may_set: false }
    }

    #[test]
    fn scores_follow_the_pbx_table() {
        assert_eq!(score("1234"), 40);
        assert_eq!(score("abcd"), 104);
        assert_eq!(score("ab!1"), 90);
        assert_eq!(score("Ünï"), 78, "letters beyond ASCII count as letters");
    }

    #[test]
    fn strength_levels() {
        let medium = policy(PasswordStrength::Medium, false);
        assert!(check_new(&medium, "abcd1").is_err(), "4 * 26 + 10 = 114");
        assert!(check_new(&medium, "abc1").is_err(), "88");
        assert!(check_new(&medium, "abcd12").is_ok(), "124");
        let high = policy(PasswordStrength::High, false);
        assert!(check_new(&high, "abcd12").is_err());
        assert!(check_new(&high, "abcdefg!").is_ok(), "7*26+28 = 210");
        assert!(check_new(&policy(PasswordStrength::AcceptAll, false), "1").is_ok());
        assert!(check_new(&medium, "").is_err());
        assert!(check_new(&policy(PasswordStrength::Medium, true), "").is_ok());
    }

    #[tokio::test]
    async fn hash_and_verify() {
        let dummy = dummy_hash();
        let runs = AtomicU64::new(0);
        let h = hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("correct horse".into(), Some(h.clone()), &dummy, &runs).await);
        assert!(!verify("wrong".into(), Some(h), &dummy, &runs).await);
        assert!(!verify("anything".into(), None, &dummy, &runs).await);
        assert_eq!(runs.load(Ordering::Relaxed), 3);
    }
}
