//! Passwords, where an admin allows them: argon2id hashing off the async
//! threads, the PBX's strength score, and the same time and answer for an
//! unknown account as for a wrong password.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};

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

/// Why a new password is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Weak {
    Empty,
    /// Its score, and the score the configured strength needs.
    TooWeak {
        score: u32,
        needed: u32,
    },
}

impl Weak {
    /// In words for the person choosing it, in `lang`.
    pub fn text(&self, lang: crate::ui::Lang) -> String {
        let messages = crate::ui::i18n::messages();
        match self {
            Self::Empty => messages.text(lang, "api.empty_password", &[]),
            Self::TooWeak { score, needed } => messages.text(
                lang,
                "api.weak_password",
                &[("score", &score.to_string()), ("needed", &needed.to_string())],
            ),
        }
    }

    /// The JSON answer to a script that tried to set it.
    pub fn answer(&self) -> http::Response<crate::Body> {
        match self {
            Self::Empty => {
                crate::error::api_error(http::StatusCode::BAD_REQUEST, "weak_password", "api.empty_password")
            }
            Self::TooWeak { score, needed } => crate::error::api_error_with(
                http::StatusCode::BAD_REQUEST,
                "weak_password",
                "api.weak_password",
                vec![("score", score.to_string()), ("needed", needed.to_string())],
            ),
        }
    }
}

/// Whether `password` is strong enough for the configured strength.
pub fn check_new(policy: &Passwords, password: &str) -> Result<(), Weak> {
    if password.is_empty() {
        return if policy.allow_empty { Ok(()) } else { Err(Weak::Empty) };
    }
    let needed = match policy.strength {
        PasswordStrength::AcceptAll => 0,
        PasswordStrength::Medium => 120,
        PasswordStrength::High => 200,
    };
    let score = score(password);
    if score < needed {
        return Err(Weak::TooWeak { score, needed });
    }
    Ok(())
}

/// Every argon2 run goes through here: one thread per core runs them in
/// turn (each run holds about 19 MiB and a core for tens of milliseconds;
/// the same threads keep reusing that memory), and at most
/// [`WAITING_PER_CORE`] per core wait. Past that the caller gets [`Busy`]
/// at once, so a flood of guesses costs neither memory nor threads.
struct Queue(tokio::sync::mpsc::Sender<Job>);

type Job = Box<dyn FnOnce() + Send>;

const WAITING_PER_CORE: usize = 8;

static QUEUE: LazyLock<Queue> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (jobs, waiting) = tokio::sync::mpsc::channel::<Job>(cores * WAITING_PER_CORE);
    let waiting = Arc::new(std::sync::Mutex::new(waiting));
    for i in 0..cores {
        let waiting = waiting.clone();
        let spawned = std::thread::Builder::new().name(format!("pbxgate-argon2-{i}")).spawn(move || loop {
            // One thread takes the next job; the lock is held only to take it.
            let job = waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).blocking_recv();
            match job {
                Some(job) => job(),
                None => return,
            }
        });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "could not start a password thread");
        }
    }
    Queue(jobs)
});

/// Every password check is taken: try again in a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("password checks are all busy")]
pub struct Busy;

/// Runs `work` on a password thread, when the queue has room.
async fn queued<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T, Busy> {
    let (done, result) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = done.send(work());
    });
    QUEUE.0.try_send(job).map_err(|_| Busy)?;
    result.await.map_err(|_| Busy)
}

/// Hashes on a blocking thread: argon2 takes tens of milliseconds on purpose.
pub async fn hash(password: String) -> Result<String, String> {
    queued(move || {
        let salt = new_salt()?;
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// [`verify`] with the gateway's argon2 counter.
pub(crate) async fn check(
    state: &crate::State,
    password: String,
    hash: Option<String>,
) -> Result<bool, Busy> {
    verify(password, hash, &state.metrics.password_verifications).await
}

/// Verifies through the queue. With no hash to check against (an unknown
/// account, or no password set), runs the same argon2 work on a fixed salt
/// and fails, so that takes as long as a real check and needs no set-up
/// that could fail. `counter` counts argon2 runs (a metric).
pub async fn verify(password: String, hash: Option<String>, counter: &AtomicU64) -> Result<bool, Busy> {
    counter.fetch_add(1, Ordering::Relaxed);
    queued(move || match hash {
        Some(phc) => PasswordHash::new(&phc)
            .map(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
            .unwrap_or(false),
        None => {
            let mut out = [0u8; 32];
            let _ =
                Argon2::default().hash_password_into(password.as_bytes(), b"pbxgate-no-account", &mut out);
            false
        }
    })
    .await
}

fn new_salt() -> Result<SaltString, String> {
    SaltString::encode_b64(&crate::store::secret::random::<16>()).map_err(|e| e.to_string())
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
        let runs = AtomicU64::new(0);
        let h = hash("correct horse".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert_eq!(verify("correct horse".into(), Some(h.clone()), &runs).await, Ok(true));
        assert_eq!(verify("wrong".into(), Some(h), &runs).await, Ok(false));
        assert_eq!(verify("anything".into(), None, &runs).await, Ok(false));
        assert_eq!(runs.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_is_refused_past_the_queue() {
        let runs = Arc::new(AtomicU64::new(0));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let flood = cores * (WAITING_PER_CORE + 1) + 20;
        let tasks: Vec<_> = (0..flood)
            .map(|_| {
                let runs = runs.clone();
                tokio::spawn(async move { verify("guess".into(), None, &runs).await })
            })
            .collect();
        let mut busy = 0;
        for task in tasks {
            if task.await.unwrap() == Err(Busy) {
                busy += 1;
            }
        }
        assert!(busy >= flood - cores * (WAITING_PER_CORE + 1), "{busy} of {flood} refused at once");
    }
}
