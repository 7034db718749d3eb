//! The node's live event stream (`GET /events`): VM lifecycle, port maps, the mesh,
//! reconcile repairs and image transfers, each with a monotonic id, a time, a kind and
//! its subject.
//!
//! One bus per process ([`bus`]), like the logger: whatever changes something publishes,
//! nothing waits. The last [`BUFFER`] events are kept so a client that reconnects with
//! `Last-Event-ID` misses nothing; live events reach each stream through a bounded
//! channel, and a stream more than [`LAG`] events behind is ended (its client reconnects
//! and resumes from the buffer) rather than slowing the agent or growing its memory.

use std::collections::VecDeque;
use std::sync::{Arc, LazyLock, Mutex};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

/// Events kept for `Last-Event-ID`.
pub const BUFFER: usize = 1024;
/// How far behind a stream may fall before it is ended.
pub const LAG: usize = 256;

/// What happened. The wire name is [`Kind::as_str`] (`vm.stopped`, `portmap.added`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    VmDefined,
    VmUndefined,
    VmStarted,
    VmSuspended,
    VmResumed,
    VmStopped,
    VmShutdown,
    VmCrashed,
    VmPmSuspended,
    PortMapAdded,
    PortMapRemoved,
    /// The reconcile found the kernel's port maps drifted and rewrote them.
    PortMapRepaired,
    /// The join state changed (`joining`, `joined`, `cached`, `standalone`).
    MeshState,
    /// The tunnel lost its handshake (`stale`) or got it back (`live`).
    MeshTunnel,
    /// The VM reconcile repaired a VM in libvirt.
    ReconcileRepaired,
    ImageProgress,
    ImageReady,
    ImageFailed,
    /// A console session opened on a VM.
    ConsoleAttached,
    /// A console session ended (with why, bytes each way).
    ConsoleDetached,
    /// `Last-Event-ID` named an event older than the buffer: some were missed.
    StreamReset,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::VmDefined => "vm.defined",
            Kind::VmUndefined => "vm.undefined",
            Kind::VmStarted => "vm.started",
            Kind::VmSuspended => "vm.suspended",
            Kind::VmResumed => "vm.resumed",
            Kind::VmStopped => "vm.stopped",
            Kind::VmShutdown => "vm.shutdown",
            Kind::VmCrashed => "vm.crashed",
            Kind::VmPmSuspended => "vm.pmsuspended",
            Kind::PortMapAdded => "portmap.added",
            Kind::PortMapRemoved => "portmap.removed",
            Kind::PortMapRepaired => "portmap.repaired",
            Kind::MeshState => "mesh.state",
            Kind::MeshTunnel => "mesh.tunnel",
            Kind::ReconcileRepaired => "reconcile.repaired",
            Kind::ImageProgress => "image.progress",
            Kind::ImageReady => "image.ready",
            Kind::ImageFailed => "image.failed",
            Kind::ConsoleAttached => "console.attached",
            Kind::ConsoleDetached => "console.detached",
            Kind::StreamReset => "stream.reset",
        }
    }
}

impl Serialize for Kind {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One event as a client receives it (the `data:` of an SSE message, whose `id:` is
/// the same `id`).
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub id: u64,
    /// ISO 8601, UTC, milliseconds (as the database's `*_at` columns).
    pub time: String,
    pub kind: Kind,
    /// What it is about: a VM's name, a map's rule id (`8080`, `53/udp`), an image's
    /// name, `mesh`.
    pub subject: String,
    /// Kind-specific facts (libvirt's reason, a map's target, bytes so far, ...).
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

struct Ring {
    next_id: u64,
    events: VecDeque<Arc<Event>>,
}

/// The stream of events and the buffer behind it.
pub struct Bus {
    ring: Mutex<Ring>,
    live: broadcast::Sender<Arc<Event>>,
    closed: watch::Sender<bool>,
}

/// What a new stream starts from: the buffered events after the one it last saw, then
/// the live ones.
pub struct Subscription {
    pub replay: Vec<Arc<Event>>,
    pub live: broadcast::Receiver<Arc<Event>>,
    /// Becomes true when the agent shuts down: the stream ends so the server can stop.
    pub closed: watch::Receiver<bool>,
}

impl Default for Bus {
    fn default() -> Self {
        Self {
            ring: Mutex::new(Ring {
                next_id: 1,
                events: VecDeque::with_capacity(BUFFER),
            }),
            live: broadcast::channel(LAG).0,
            closed: watch::channel(false).0,
        }
    }
}

/// The process's bus.
pub fn bus() -> &'static Bus {
    static BUS: LazyLock<Bus> = LazyLock::new(Bus::default);
    &BUS
}

/// [`Bus::publish`] on the process's bus.
pub fn publish(kind: Kind, subject: impl Into<String>, detail: serde_json::Value) {
    bus().publish(kind, subject, detail);
}

impl Bus {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records an event and hands it to every stream; never waits on a reader.
    pub fn publish(&self, kind: Kind, subject: impl Into<String>, detail: serde_json::Value) {
        let mut ring = self.lock();
        let event = Arc::new(Event {
            id: ring.next_id,
            time: crate::model::time::now_iso(),
            kind,
            subject: subject.into(),
            detail,
        });
        ring.next_id += 1;
        if ring.events.len() == BUFFER {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        crate::metrics::global().events_published.inc();
        // Sent under the lock, so every stream sees the ids in order; an error only
        // means nobody listens.
        let _ = self.live.send(event);
    }

    /// A stream of the events after `last_id` (a client's `Last-Event-ID`: `Some(0)`
    /// replays the whole buffer; `None`, a client without the header, gets only the
    /// events published from now on). When `last_id` is older than the buffer, the
    /// replay starts with a [`Kind::StreamReset`] event saying how many were missed.
    pub fn subscribe(&self, last_id: Option<u64>) -> Subscription {
        let ring = self.lock();
        let live = self.live.subscribe();
        let replay = match last_id {
            None => Vec::new(),
            Some(last) => {
                let mut replay: Vec<Arc<Event>> = ring
                    .events
                    .iter()
                    .filter(|e| e.id > last)
                    .cloned()
                    .collect();
                let oldest = ring.events.front().map_or(ring.next_id, |e| e.id);
                if last + 1 < oldest {
                    replay.insert(0, Arc::new(reset(last, oldest)));
                }
                replay
            }
        };
        Subscription {
            replay,
            live,
            closed: self.closed.subscribe(),
        }
    }

    /// Ends every stream (the agent is shutting down).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }
}

/// Says that the events after `last` and before `oldest` are gone from the buffer; it
/// carries id 0, so it never moves a client's `Last-Event-ID`.
fn reset(last: u64, oldest: u64) -> Event {
    Event {
        id: 0,
        time: crate::model::time::now_iso(),
        kind: Kind::StreamReset,
        subject: "events".into(),
        detail: serde_json::json!({"last_event_id": last, "missed": oldest - last - 1}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn kinds(events: &[Arc<Event>]) -> Vec<(u64, &'static str)> {
        events.iter().map(|e| (e.id, e.kind.as_str())).collect()
    }

    #[test]
    fn ids_grow_and_a_resume_replays_what_came_after() {
        let bus = Bus::default();
        bus.publish(Kind::VmStarted, "a", Value::Null);
        bus.publish(Kind::VmStopped, "a", Value::Null);
        bus.publish(Kind::PortMapAdded, "8080", Value::Null);
        assert!(
            bus.subscribe(None).replay.is_empty(),
            "a new client gets only live events"
        );
        let s = bus.subscribe(Some(1));
        assert_eq!(kinds(&s.replay), [(2, "vm.stopped"), (3, "portmap.added")]);
        assert!(bus.subscribe(Some(3)).replay.is_empty());
    }

    #[test]
    fn a_resume_older_than_the_buffer_says_how_many_were_missed() {
        let bus = Bus::default();
        for _ in 0..BUFFER + 10 {
            bus.publish(Kind::ImageProgress, "img", Value::Null);
        }
        let s = bus.subscribe(Some(5));
        assert_eq!(s.replay[0].kind, Kind::StreamReset);
        assert_eq!(s.replay[0].detail["missed"], 5, "ids 6 to 10 are gone");
        assert_eq!(s.replay.len(), BUFFER + 1);
        assert_eq!(s.replay[1].id, 11);
    }

    #[tokio::test]
    async fn a_reader_that_falls_behind_is_told_so_and_the_publisher_never_waits() {
        let bus = Bus::default();
        let mut s = bus.subscribe(None);
        for _ in 0..LAG * 4 {
            bus.publish(Kind::ImageProgress, "img", Value::Null);
        }
        assert!(matches!(
            s.live.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        let mut fresh = bus.subscribe(None);
        bus.publish(Kind::VmCrashed, "b", Value::Null);
        let e = fresh.live.recv().await.unwrap();
        assert_eq!((e.id, e.kind), (LAG as u64 * 4 + 1, Kind::VmCrashed));
    }

    #[test]
    fn an_event_serializes_with_its_wire_kind() {
        let bus = Bus::default();
        bus.publish(Kind::PortMapRemoved, "53/udp", serde_json::json!({"x": 1}));
        let s = bus.subscribe(Some(0));
        let v = serde_json::to_value(&*s.replay[0]).unwrap();
        assert_eq!(v["kind"], "portmap.removed");
        assert_eq!(v["subject"], "53/udp");
        assert_eq!(v["id"], 1);
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
