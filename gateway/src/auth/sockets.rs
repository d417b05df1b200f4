//! Upgraded connections (a PBX web UI keeps a websocket open) belong to the
//! session they were opened under: they are closed when it ends, whether by
//! logout here, revocation elsewhere, or expiry.

use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use tokio::task::AbortHandle;

use crate::store::{now_ms, SecretHash};
use crate::State;

const CHECK_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
pub struct Sockets {
    open: Mutex<HashMap<SecretHash, Vec<AbortHandle>>>,
}

impl Sockets {
    pub fn register(&self, session: SecretHash, socket: AbortHandle) {
        if let Ok(mut open) = self.open.lock() {
            let entry = open.entry(session).or_default();
            entry.retain(|h| !h.is_finished());
            entry.push(socket);
        }
    }

    /// Closes every connection opened under `session`.
    pub fn close(&self, session: &SecretHash) -> usize {
        let handles = self.open.lock().ok().and_then(|mut open| open.remove(session)).unwrap_or_default();
        let n = handles.iter().filter(|h| !h.is_finished()).count();
        for h in handles {
            h.abort();
        }
        n
    }

    fn sessions(&self) -> Vec<SecretHash> {
        self.open
            .lock()
            .map(|mut open| {
                open.retain(|_, handles| {
                    handles.retain(|h| !h.is_finished());
                    !handles.is_empty()
                });
                open.keys().cloned().collect()
            })
            .unwrap_or_default()
    }
}

/// Every few seconds, closes connections whose session no longer exists.
pub(crate) async fn watch(state: Weak<State>) {
    loop {
        tokio::time::sleep(CHECK_EVERY).await;
        let Some(state) = state.upgrade() else { return };
        for session in state.auth.sockets.sessions() {
            // A store error is not proof the session ended: keep the socket.
            if let Ok(None) = state.store.session(&session, now_ms()).await {
                let n = state.auth.sockets.close(&session);
                tracing::info!(target: "pbxgate::audit", session = session.short_id(), closed = n,
                    "session ended: websockets closed");
            }
        }
    }
}
