//! Interactive serial consoles: at most one session per VM, a budget of sessions for the
//! node, and every session an audit row (who, from where, attached and detached when,
//! bytes each way, how it ended), never what was typed.
//!
//! [`Consoles::attach`] answers before any WebSocket exists: an unknown or stopped VM, a
//! console held by another session (unless forced: the holder is ended first, with a
//! reason naming who took it over), or a full budget are refused with nothing opened.
//! The session it returns is moved by the API into the task that pumps bytes; that task
//! ends it with [`Session::finish`], which closes the stream, frees the VM's console and
//! completes the audit row. `session.rs` is one session, `reason.rs` why one ends.

mod reason;
mod registry;
mod session;
#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub use reason::EndReason;
pub use registry::{Client, Holder};
pub use session::{Input, Session, StopSignal};

use registry::{Refusal, Registry};

use crate::model::VmName;
use crate::store::audit::{self, Entry, Outcome};
use crate::store::{Store, StoreError};
use crate::vm::VmError;
use crate::vm::driver::Driver;
use crate::vm::driver::console::ConsoleOpen;

/// How long a forced attach waits for the session it ends to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// The settings of the consoles (CONSOLE_MAX_SESSIONS, CONSOLE_IDLE_TIMEOUT,
/// CONSOLE_INPUT_RATE).
#[derive(Clone, Copy, Debug)]
pub struct ConsoleSettings {
    pub max_sessions: usize,
    /// A session with no byte either way for this long is ended.
    pub idle_timeout: Duration,
    /// Client bytes per second at most (a burst of one second's worth).
    pub input_rate: u32,
}

/// Why an attach was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("no VM named {0}")]
    NoSuchVm(VmName),
    #[error("VM {0} is not running: start it first (POST /vms/{0}/start)")]
    NotRunning(VmName),
    #[error("{}", held_message(.vm, .holder))]
    Held { vm: VmName, holder: Holder },
    #[error(
        "another client of libvirt (a virsh console?) holds the console of VM {0}; \
         force=true takes it over"
    )]
    HeldOutside(VmName),
    #[error(
        "{0} console sessions are open, the most this node allows (CONSOLE_MAX_SESSIONS); retry later"
    )]
    TooMany(usize),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn held_message(vm: &VmName, h: &Holder) -> String {
    format!(
        "the console of VM {vm} is held by session {} ({}{}) since {}; force=true takes it over",
        h.session,
        h.identity,
        h.addr
            .as_deref()
            .map_or_else(String::new, |a| format!(" from {a}")),
        h.since
    )
}

/// The consoles of the node.
pub struct Consoles {
    driver: Driver,
    store: Store,
    settings: ConsoleSettings,
    registry: Arc<Registry>,
    shutting_down: AtomicBool,
}

impl Consoles {
    pub fn new(driver: Driver, store: Store, settings: ConsoleSettings) -> Arc<Self> {
        Arc::new(Self {
            driver,
            store,
            settings,
            registry: Arc::default(),
            shutting_down: AtomicBool::new(false),
        })
    }

    pub fn settings(&self) -> ConsoleSettings {
        self.settings
    }

    /// Sessions open now.
    pub fn open(&self) -> usize {
        self.registry.len()
    }

    /// Opens a session on `vm`'s console for `client`; `force` ends the session that
    /// holds it (and takes it from another libvirt client).
    pub async fn attach(
        self: &Arc<Self>,
        vm: VmName,
        client: Client,
        force: bool,
    ) -> Result<Session, ConsoleError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(ConsoleError::ShuttingDown);
        }
        let name = vm.to_string();
        let known = self
            .store
            .run(move |s| s.with(|c| crate::store::vms::get(c, &name)))
            .await?;
        if known.is_none() {
            return Err(ConsoleError::NoSuchVm(vm));
        }
        if force {
            self.take_over(&vm, &client).await;
        }
        let reserved = self
            .registry
            .reserve(&vm, &client, self.settings.max_sessions)
            .map_err(|r| match r {
                Refusal::Held(holder) => ConsoleError::Held {
                    vm: vm.clone(),
                    holder,
                },
                Refusal::Full(max) => ConsoleError::TooMany(max),
            })?;
        match self.open_pipe(&vm, force).await {
            Ok(pipe) => {
                let row = self.audit_attached(&vm, &client, reserved.id, force).await;
                Ok(Session::new(
                    session::Parts {
                        registry: Arc::clone(&self.registry),
                        store: self.store.clone(),
                        vm,
                        client,
                        audit_row: row,
                    },
                    reserved,
                    pipe,
                ))
            }
            Err(e) => {
                self.registry.release(&vm, reserved.id);
                Err(e)
            }
        }
    }

    /// Asks the holder of `vm`'s console (if any) to end, and waits (bounded) until it
    /// let go.
    async fn take_over(&self, vm: &VmName, by: &Client) {
        let why = EndReason::Forced {
            by: by.identity.clone(),
            from: by.addr.clone(),
        };
        if let Some(mut released) = self.registry.stop(vm, &why) {
            let _ = tokio::time::timeout(TAKEOVER_WAIT, released.wait_for(|r| *r)).await;
        }
    }

    async fn open_pipe(
        &self,
        vm: &VmName,
        force: bool,
    ) -> Result<crate::vm::driver::console::ConsolePipe, ConsoleError> {
        let name = vm.to_string();
        let opened = self
            .driver
            .ask(move |hv, call| hv.open_console(call, &name, force).map_err(VmError::from))
            .await?;
        match opened {
            ConsoleOpen::Opened(pipe) => Ok(pipe),
            ConsoleOpen::NoDomain | ConsoleOpen::NotRunning => {
                Err(ConsoleError::NotRunning(vm.clone()))
            }
            ConsoleOpen::HeldOutside => Err(ConsoleError::HeldOutside(vm.clone())),
        }
    }

    /// The session's audit row, written at attach (so an agent that dies mid-session
    /// leaves it) and completed at detach.
    async fn audit_attached(
        &self,
        vm: &VmName,
        client: &Client,
        id: u64,
        force: bool,
    ) -> Option<i64> {
        let entry = Entry {
            client_addr: client.addr.clone(),
            identity: client.identity.clone(),
            action: "GET /vms/{name}/console/attach".into(),
            parameters: Some(
                serde_json::json!({ "vm": vm.as_str(), "session": id, "force": force }).to_string(),
            ),
            outcome: Outcome::Failed,
            status: Some(101),
            error: Some(audit::UNFINISHED.into()),
        };
        let written = self
            .store
            .run(move |s| s.with(|c| audit::record(c, &entry)))
            .await;
        written
            .inspect_err(
                |e| tracing::error!(error = %e, "cannot write a console session's audit row"),
            )
            .ok()
    }

    /// Ends the session on `vm`'s console, if there is one, saying `why` (its VM is
    /// being deleted), without waiting for it.
    pub fn end(&self, vm: &VmName, why: EndReason) {
        let _ = self.registry.stop(vm, &why);
    }

    /// Ends every session (the agent stops), and waits for them to let go (bounded).
    pub async fn close_all(&self, why: EndReason) {
        self.shutting_down.store(true, Ordering::Release);
        for mut w in self.registry.stop_all(&why) {
            let _ = tokio::time::timeout(TAKEOVER_WAIT, w.wait_for(|r| *r)).await;
        }
    }
}
