//! Hot reload: SIGHUP, or a change of the policy file, re-reads the policy
//! and the certificates. A valid new policy applies to the next request,
//! connections stay; an invalid one is refused with every problem logged, and
//! the old one stays in force.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pbxgate_policies::Policy;

use crate::{tls, State};

const POLL: Duration = Duration::from_secs(2);

fn stamp(state: &State) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(&state.config.policy_file).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Waits for SIGHUP or a changed policy file, and reloads.
pub(crate) async fn watch(state: Arc<State>) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut seen = stamp(&state);
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        let why = tokio::select! {
            _ = signalled => "SIGHUP",
            _ = tokio::time::sleep(POLL) => {
                if stamp(&state) == seen { continue; }
                "policy file changed"
            }
        };
        seen = stamp(&state);
        reload(&state, why);
    }
}

/// Re-reads the policy file and the certificates.
pub(crate) fn reload(state: &State, why: &str) -> bool {
    let path = &state.config.policy_file;
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(file = %path.display(), error = %e, reason = why, "reload refused: cannot read the policy; the old one stays");
            return false;
        }
    };
    let policy = match Policy::from_toml(&text) {
        Ok(p) => Arc::new(p),
        Err(errors) => {
            for e in &errors {
                tracing::error!(file = %path.display(), key = %e.path, problem = %e.message, "policy error");
            }
            tracing::error!(file = %path.display(), errors = errors.len(), reason = why,
                "reload refused: the new policy is invalid; the old one stays in force");
            return false;
        }
    };
    if let Some(current) = &state.tls {
        match tls::server_config(&state.config.tls, &policy) {
            Ok(config) => current.store(config),
            Err(e) => {
                tracing::error!(error = %e, reason = why, "reload refused: certificates; the old policy and certificates stay");
                return false;
            }
        }
    }
    let routes = policy.routes.len();
    let users = policy.users.len();
    state.policy.store(policy);
    tracing::info!(target: "pbxgate::audit", file = %path.display(), routes, users, reason = why, "policy reloaded");
    true
}
