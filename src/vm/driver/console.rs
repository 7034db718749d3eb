//! An open serial console as the hypervisor hands it over: the guest's bytes out, the
//! client's bytes in, and an end. Both directions are bounded channels; the hypervisor's
//! side (libvirt's event thread, or the fake's task) never waits on them: guest bytes
//! that find the output full are dropped and counted ([`ConsolePipe::dropped`]; libvirt's
//! client would otherwise queue them without bound), and this side tells it when there
//! is something to send ([`PipeEnd::want_input`]).
//!
//! A pipe is closed explicitly ([`ConsolePipe::close`], on a blocking thread); one that is
//! dropped without that is closed on a thread of its own, so a libvirt stream is never
//! freed during unwinding nor on the async runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Largest chunk either side moves at once.
pub const CHUNK: usize = 4096;
/// Chunks queued in each direction: with [`CHUNK`], at most 128 KiB each way.
pub const QUEUED: usize = 32;

/// What asking for a domain's console came to.
pub enum ConsoleOpen {
    Opened(ConsolePipe),
    NoDomain,
    NotRunning,
    /// Another client of the hypervisor holds it (a `virsh console`); forcing takes it.
    HeldOutside,
}

/// Why a console's stream ended, as the hypervisor saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEnd {
    /// The guest's side closed (the VM stopped, or its console went away).
    Eof,
    /// The hypervisor failed the stream (its connection lost, an error).
    Failed(String),
}

/// What the hypervisor's side of a pipe does for this side.
pub trait PipeEnd: Send + Sync + 'static {
    /// Input was queued: send it when the stream can take it.
    fn want_input(&self);
    /// Whether the stream's connection is still alive (no round trip).
    fn alive(&self) -> bool;
    /// Ends the stream and frees it; blocking, idempotent.
    fn close(&self);
}

/// Why the stream ended, once it did; set once by the hypervisor's side.
#[derive(Clone, Default)]
pub struct Ended(Arc<Mutex<Option<StreamEnd>>>);

impl Ended {
    /// The first end said counts.
    pub fn set(&self, why: StreamEnd) {
        let mut e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        e.get_or_insert(why);
    }

    pub fn get(&self) -> Option<StreamEnd> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// An open console.
pub struct ConsolePipe {
    /// The guest's bytes; `None` once the stream ended ([`ConsolePipe::ended`] says why).
    output: mpsc::Receiver<Bytes>,
    input: mpsc::Sender<Bytes>,
    ended: Ended,
    dropped: Arc<AtomicU64>,
    end: Option<Arc<dyn PipeEnd>>,
}

/// The hypervisor's halves of a new pipe.
pub struct PipeSide {
    pub output: mpsc::Sender<Bytes>,
    pub input: mpsc::Receiver<Bytes>,
    pub ended: Ended,
    /// Guest bytes dropped because the output was full.
    pub dropped: Arc<AtomicU64>,
}

/// A pipe's input, for the task that reads the client.
#[derive(Clone)]
pub struct ConsoleInput {
    tx: mpsc::Sender<Bytes>,
    end: Arc<dyn PipeEnd>,
}

impl ConsoleInput {
    /// Queues `bytes` for the guest, waiting while the queue is full; `false` once the
    /// stream ended.
    pub async fn send(&self, bytes: Bytes) -> bool {
        if self.tx.send(bytes).await.is_err() {
            return false;
        }
        self.end.want_input();
        true
    }
}

impl ConsolePipe {
    /// A pipe and the hypervisor's halves of it, ended through `end`.
    pub fn new(make_end: impl FnOnce(PipeSide) -> Arc<dyn PipeEnd>) -> ConsolePipe {
        let (out_tx, out_rx) = mpsc::channel(QUEUED);
        let (in_tx, in_rx) = mpsc::channel(QUEUED);
        let ended = Ended::default();
        let dropped = Arc::new(AtomicU64::new(0));
        let end = make_end(PipeSide {
            output: out_tx,
            input: in_rx,
            ended: ended.clone(),
            dropped: Arc::clone(&dropped),
        });
        ConsolePipe {
            output: out_rx,
            input: in_tx,
            ended,
            dropped,
            end: Some(end),
        }
    }

    /// The guest's next bytes; `None` once the stream ended.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.output.recv().await
    }

    /// Guest bytes dropped so far because the client fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The input half, for a task of its own; `None` after [`ConsolePipe::close`].
    pub fn input(&self) -> Option<ConsoleInput> {
        Some(ConsoleInput {
            tx: self.input.clone(),
            end: self.end.clone()?,
        })
    }

    /// Why the stream ended, if it did.
    pub fn ended(&self) -> Option<StreamEnd> {
        self.ended.get()
    }

    /// Whether the stream's connection is still alive.
    pub fn alive(&self) -> bool {
        self.end.as_ref().is_some_and(|e| e.alive())
    }

    /// Ends and frees the stream, on a blocking thread.
    pub async fn close(mut self) {
        if let Some(end) = self.end.take() {
            let _ = tokio::task::spawn_blocking(move || end.close()).await;
        }
    }
}

impl Drop for ConsolePipe {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            // Not on the runtime, and not in this (maybe unwinding) frame.
            let spawned = std::thread::Builder::new()
                .name("console-close".into())
                .spawn(move || end.close());
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a thread to close a console stream");
            }
        }
    }
}
