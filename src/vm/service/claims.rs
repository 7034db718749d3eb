//! One operation per VM at a time: who holds which VM's claim.
//!
//! A request meeting another request's claim is refused at once (409): the client asked
//! for two things at the same time. A request meeting the agent's own reconcile waits
//! for it instead: a repair is one libvirt call (bounded by `LIBVIRT_TIMEOUT`), and the
//! client did nothing wrong by calling while the background loop happened to look at
//! the VM.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::vm::{Conflict, Unavailable, VmError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Holder {
    Request,
    Reconcile,
}

#[derive(Default)]
pub struct Claims {
    held: Mutex<HashMap<String, Holder>>,
    released: Notify,
}

/// Held while an operation works on one VM; dropping it releases the VM. It owns its
/// share of the table, so an operation that outlives its request (a timeout, or
/// `wait=false`) takes its claim along until its work has really ended.
pub struct Claim {
    claims: Arc<Claims>,
    name: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut held) = self.claims.held.lock() {
            held.remove(&self.name);
        }
        self.claims.released.notify_waiters();
    }
}

impl Claims {
    /// For a request: waits at most `wait` while the reconcile holds `name`, refuses
    /// while another request does.
    pub async fn for_request(
        self: &Arc<Self>,
        name: &str,
        wait: Duration,
    ) -> Result<Claim, VmError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Registered before looking, so a release in between is not missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.take(name, Holder::Request) {
                Ok(claim) => return Ok(claim),
                Err(Holder::Request) => return Err(Conflict::Busy(name.to_owned()).into()),
                Err(Holder::Reconcile) => {}
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return Err(Unavailable::Repairing {
                    name: name.to_owned(),
                    waited: wait,
                }
                .into());
            }
        }
    }

    /// For the reconcile: `None` when anything holds `name` (that operation owns it).
    pub fn for_reconcile(self: &Arc<Self>, name: &str) -> Option<Claim> {
        self.take(name, Holder::Reconcile).ok()
    }

    /// The claim, or who holds the name.
    fn take(self: &Arc<Self>, name: &str, holder: Holder) -> Result<Claim, Holder> {
        // The table is consistent at every step (one insert or remove), so a panic
        // elsewhere while holding its lock leaves nothing half done.
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = held.get(name) {
            return Err(*h);
        }
        held.insert(name.to_owned(), holder);
        Ok(Claim {
            claims: Arc::clone(self),
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_waits_for_the_reconcile_and_is_refused_by_another_request() {
        let claims = std::sync::Arc::new(Claims::default());
        let wait = Duration::from_secs(5);
        let repair = claims.for_reconcile("vm1").unwrap();
        assert!(claims.for_reconcile("vm1").is_none());
        let c = claims.clone();
        let waiting = tokio::spawn(async move {
            c.for_request("vm1", Duration::from_secs(5))
                .await
                .map(|_| ())
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the request waits for the repair");
        drop(repair);
        waiting.await.unwrap().unwrap();

        let first = claims.for_request("vm1", wait).await.unwrap();
        let second = claims.for_request("vm1", wait).await;
        assert!(matches!(second, Err(VmError::Conflict(_))));
        assert!(claims.for_reconcile("vm1").is_none());
        assert!(claims.for_request("vm2", wait).await.is_ok());
        drop(first);
        assert!(claims.for_reconcile("vm1").is_some());
    }

    #[tokio::test]
    async fn a_request_stops_waiting_for_a_stuck_reconcile() {
        let claims = std::sync::Arc::new(Claims::default());
        let _stuck = claims.for_reconcile("vm1").unwrap();
        let r = claims.for_request("vm1", Duration::from_millis(50)).await;
        assert!(matches!(r, Err(VmError::Unavailable(_))), "{:?}", r.err());
    }
}
