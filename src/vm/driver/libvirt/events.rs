//! libvirt's domain lifecycle events (started, stopped, crashed, defined, undefined, ...),
//! including changes made outside the agent: each names a domain, which the VM service
//! then observes again (`Vms::watch_events`), so a `virsh destroy` shows in `GET /vms`
//! within a second instead of at the next listing.
//!
//! The `virt` crate does not wrap `virConnectDomainEventRegisterAny`; this is the small
//! wrapper. The callback runs on libvirt's event loop thread (`conn::start_event_loop`)
//! and only copies the domain's name and the event into a bounded channel: it never
//! calls into libvirt over the network, and a full channel drops the event (a read's
//! listing, at most `observed::FRESH` old, covers what a dropped event would have said).

use std::ffi::{CStr, c_int, c_void};

use tokio::sync::mpsc;
use virt::connect::Connect;
use virt::sys;

/// Events waiting to be handled; more at once are dropped.
pub const QUEUE: usize = 1024;

/// One lifecycle event: the domain's name, libvirt's `virDomainEventType` and its
/// detail (for `Stopped`: shut down, destroyed, crashed, ...).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lifecycle {
    pub domain: String,
    pub event: c_int,
    pub detail: c_int,
}

impl Lifecycle {
    /// The event stream's kind for this event (`None` for one libvirt added later).
    pub fn kind(&self) -> Option<crate::events::Kind> {
        use crate::events::Kind;
        Some(match self.event as u32 {
            sys::VIR_DOMAIN_EVENT_DEFINED => Kind::VmDefined,
            sys::VIR_DOMAIN_EVENT_UNDEFINED => Kind::VmUndefined,
            sys::VIR_DOMAIN_EVENT_STARTED => Kind::VmStarted,
            sys::VIR_DOMAIN_EVENT_SUSPENDED => Kind::VmSuspended,
            sys::VIR_DOMAIN_EVENT_RESUMED => Kind::VmResumed,
            sys::VIR_DOMAIN_EVENT_STOPPED => Kind::VmStopped,
            sys::VIR_DOMAIN_EVENT_SHUTDOWN => Kind::VmShutdown,
            sys::VIR_DOMAIN_EVENT_PMSUSPENDED => Kind::VmPmSuspended,
            sys::VIR_DOMAIN_EVENT_CRASHED => Kind::VmCrashed,
            _ => return None,
        })
    }

    /// Why a domain stopped, in libvirt's words (`virDomainEventStoppedDetailType`).
    pub fn reason(&self) -> Option<&'static str> {
        if self.event as u32 != sys::VIR_DOMAIN_EVENT_STOPPED {
            return None;
        }
        Some(match self.detail as u32 {
            sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => "shutdown",
            sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => "destroyed",
            sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED => "crashed",
            sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED => "migrated",
            sys::VIR_DOMAIN_EVENT_STOPPED_SAVED => "saved",
            sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => "failed",
            sys::VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT => "from-snapshot",
            _ => "other",
        })
    }

    /// Whether the event may leave an agent's VM in need of a repair (its domain gone,
    /// stopped or crashed), so the VM reconcile should run now.
    pub fn may_need_repair(&self) -> bool {
        matches!(
            self.event as u32,
            sys::VIR_DOMAIN_EVENT_UNDEFINED
                | sys::VIR_DOMAIN_EVENT_STOPPED
                | sys::VIR_DOMAIN_EVENT_CRASHED
        )
    }
}

type Sender = mpsc::Sender<Lifecycle>;

/// Subscribes `conn` to every domain's lifecycle events, sending each to `tx`. The subscription ends with the connection (libvirt then frees the sender).
#[allow(
    unsafe_code,
    reason = "the virt crate has no wrapper for domain events"
)]
pub fn subscribe(conn: &Connect, tx: &Sender) -> Result<(), String> {
    let opaque = Box::into_raw(Box::new(tx.clone())).cast::<c_void>();
    // SAFETY: the lifecycle callback's real signature is `on_lifecycle`'s; libvirt casts
    // it back by the event id (VIR_DOMAIN_EVENT_CALLBACK). `opaque` is a boxed sender
    // that `free_sender` takes back when libvirt drops the callback.
    let id = unsafe {
        let cb: sys::virConnectDomainEventGenericCallback = Some(std::mem::transmute::<
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, c_int, c_int, *mut c_void),
            unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
        >(on_lifecycle));
        sys::virConnectDomainEventRegisterAny(
            conn.as_ptr(),
            std::ptr::null_mut(),
            sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int,
            cb,
            opaque,
            Some(free_sender),
        )
    };
    if id < 0 {
        // SAFETY: libvirt did not take the sender; it is still ours to free.
        unsafe { free_sender(opaque) };
        return Err(virt::error::Error::last_error().message().to_string());
    }
    Ok(())
}

#[allow(unsafe_code, reason = "called by libvirt with its own pointers")]
unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) {
    if dom.is_null() || opaque.is_null() {
        return;
    }
    // SAFETY: `opaque` is the boxed sender `subscribe` registered, alive until
    // `free_sender`; the name belongs to `dom`, valid during the callback.
    let (tx, name) = unsafe {
        let name = sys::virDomainGetName(dom);
        if name.is_null() {
            return;
        }
        (
            &*opaque.cast::<Sender>(),
            CStr::from_ptr(name).to_string_lossy().into_owned(),
        )
    };
    let _ = tx.try_send(Lifecycle {
        domain: name,
        event,
        detail,
    });
}

#[allow(
    unsafe_code,
    reason = "called by libvirt with the pointer subscribe gave it"
)]
unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: made by Box::into_raw in `subscribe`, freed once.
        drop(unsafe { Box::from_raw(opaque.cast::<Sender>()) });
    }
}
