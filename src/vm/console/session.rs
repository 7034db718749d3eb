//! One console session: the open pipe, the signal that ends it from outside (a forced
//! attach, the agent stopping), its byte counts, and its end ([`Session::finish`]): the
//! stream closed, the VM's console freed, the audit row completed, `console.detached`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;

use super::reason::EndReason;
use super::registry::{Client, Registry, Reserved};
use crate::events::{self, Kind};
use crate::model::VmName;
use crate::store::Store;
use crate::store::audit::{self, Outcome};
use crate::vm::driver::console::{ConsoleInput, ConsolePipe, StreamEnd};

/// An open session, owned by the task that moves its bytes.
pub struct Session {
    registry: Arc<Registry>,
    store: Store,
    vm: VmName,
    id: u64,
    client: Client,
    /// `None` once finished.
    pipe: Option<ConsolePipe>,
    stop: watch::Receiver<Option<EndReason>>,
    released: watch::Sender<bool>,
    audit_row: Option<i64>,
    attached_at: String,
    started: Instant,
    bytes_in: Arc<AtomicU64>,
    bytes_out: u64,
}

/// Something outside asking a session to end (a forced attach, the agent stopping).
pub struct StopSignal(watch::Receiver<Option<EndReason>>);

impl StopSignal {
    /// Resolves when the session is asked to end, with why.
    pub async fn wait(&mut self) -> EndReason {
        match self.0.wait_for(Option::is_some).await {
            Ok(why) => why.clone().unwrap_or(EndReason::Shutdown),
            // The registry is gone: the agent stops.
            Err(_) => EndReason::Shutdown,
        }
    }
}

/// A session's input, counted.
#[derive(Clone)]
pub struct Input {
    input: ConsoleInput,
    counted: Arc<AtomicU64>,
}

impl Input {
    /// Queues the client's `bytes` for the guest (waiting while the queue is full);
    /// `false` once the stream ended.
    pub async fn send(&self, bytes: Bytes) -> bool {
        let n = bytes.len() as u64;
        let sent = self.input.send(bytes).await;
        if sent {
            self.counted.fetch_add(n, Ordering::Relaxed);
            crate::metrics::global().console_input_bytes.inc_by(n);
        }
        sent
    }
}

/// What a session is made of, besides its reservation and its pipe.
pub(super) struct Parts {
    pub registry: Arc<Registry>,
    pub store: Store,
    pub vm: VmName,
    pub client: Client,
    pub audit_row: Option<i64>,
}

impl Session {
    pub(super) fn new(parts: Parts, reserved: Reserved, pipe: ConsolePipe) -> Session {
        let Parts {
            registry,
            store,
            vm,
            client,
            audit_row,
        } = parts;
        let Reserved { id, stop, released } = reserved;
        let attached_at = audit::now_iso();
        events::publish(
            Kind::ConsoleAttached,
            vm.as_str(),
            serde_json::json!({ "session": id, "identity": client.identity, "client_addr": client.addr }),
        );
        tracing::info!(vm = %vm, session = id, identity = %client.identity, client = ?client.addr, "console attached");
        Session {
            registry,
            store,
            vm,
            id,
            client,
            pipe: Some(pipe),
            stop,
            released,
            audit_row,
            attached_at,
            started: Instant::now(),
            bytes_in: Arc::default(),
            bytes_out: 0,
        }
    }

    pub fn vm(&self) -> &VmName {
        &self.vm
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The input half, for the task that reads the client.
    pub fn input(&self) -> Option<Input> {
        Some(Input {
            input: self.pipe.as_ref()?.input()?,
            counted: Arc::clone(&self.bytes_in),
        })
    }

    /// The guest's next bytes; `None` once the stream ended ([`Session::stream_end`]).
    pub async fn recv(&mut self) -> Option<Bytes> {
        let got = self.pipe.as_mut()?.recv().await?;
        self.bytes_out += got.len() as u64;
        crate::metrics::global()
            .console_output_bytes
            .inc_by(got.len() as u64);
        Some(got)
    }

    /// What tells the session to end from outside.
    pub fn stop_signal(&self) -> StopSignal {
        StopSignal(self.stop.clone())
    }

    /// Whether libvirt's connection under the stream still lives.
    pub fn alive(&self) -> bool {
        self.pipe.as_ref().is_some_and(ConsolePipe::alive)
    }

    /// Why the stream ended, in the session's terms: a guest side that closed is a VM
    /// that stopped, or was deleted if the agent no longer has it.
    pub async fn stream_end(&self) -> EndReason {
        match self.pipe.as_ref().and_then(ConsolePipe::ended) {
            Some(StreamEnd::Failed(e)) => EndReason::Libvirt(e),
            _ => {
                let name = self.vm.to_string();
                let still = self
                    .store
                    .run(move |s| s.with(|c| crate::store::vms::get(c, &name)))
                    .await;
                match still {
                    Ok(None) => EndReason::VmDeleted,
                    _ => EndReason::VmStopped,
                }
            }
        }
    }

    /// Ends the session: the stream closed, the console freed, the audit row completed
    /// and `console.detached` published.
    pub async fn finish(mut self, why: EndReason) {
        let mut bytes_dropped = 0;
        if let Some(pipe) = self.pipe.take() {
            bytes_dropped = pipe.dropped();
            pipe.close().await;
        }
        self.registry.release(&self.vm, self.id);
        let _ = self.released.send(true);
        let bytes_in = self.bytes_in.load(Ordering::Relaxed);
        let detail = serde_json::json!({
            "vm": self.vm.as_str(),
            "session": self.id,
            "attached_at": self.attached_at,
            "detached_at": audit::now_iso(),
            "seconds": self.started.elapsed().as_secs_f64(),
            "bytes_in": bytes_in,
            "bytes_out": self.bytes_out,
            "bytes_dropped": bytes_dropped,
            "ended": why.as_str(),
            "reason": why.close_text(),
        });
        tracing::info!(vm = %self.vm, session = self.id, identity = %self.client.identity, ended = why.as_str(), bytes_in, bytes_out = self.bytes_out, "console detached");
        if let Some(row) = self.audit_row {
            let params = detail.to_string();
            let done = self
                .store
                .run(move |s| {
                    s.with(|c| audit::finish_session(c, row, Outcome::Ok, Some(101), None, &params))
                })
                .await;
            if let Err(e) = done {
                tracing::error!(error = %e, row, "cannot complete a console session's audit row");
            }
        }
        events::publish(Kind::ConsoleDetached, self.vm.as_str(), detail);
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("vm", &self.vm)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Drop for Session {
    /// A session dropped without [`Session::finish`] (its WebSocket upgrade never
    /// happened): the pipe closes itself, the VM's console is freed, the row says so.
    fn drop(&mut self) {
        if self.pipe.is_none() {
            return;
        }
        self.registry.release(&self.vm, self.id);
        let _ = self.released.send(true);
        let (Some(row), Ok(runtime)) = (self.audit_row, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let store = self.store.clone();
        let params = serde_json::json!({ "vm": self.vm.as_str(), "session": self.id }).to_string();
        runtime.spawn(async move {
            let _ = store
                .run(move |s| {
                    s.with(|c| {
                        let why = "the WebSocket upgrade did not complete";
                        audit::finish_session(c, row, Outcome::Failed, None, Some(why), &params)
                    })
                })
                .await;
        });
    }
}
