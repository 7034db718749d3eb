//! libvirt's domain lifecycle events (started, stopped, crashed, defined, undefined, ...),
//! including changes made outside the agent: each names a domain, which the VM service
//! then observes again (`Vms::watch_events`), so a `virsh destroy` shows in `GET /vms`
//! within a second instead of at the next listing.
//!
//! The `virt` crate does not wrap `virConnectDomainEventRegisterAny`; this is the small
//! wrapper. The callback runs on libvirt's event loop thread (`conn::start_event_loop`)
//! and only copies the domain's name and the event into a bounded channel (the service's):
//! it never
//! calls into libvirt over the network, and a full channel drops the event (a read's
//! listing, at most `service::observed::FRESH` old, covers what a dropped event would have said).

use std::ffi::{CStr, c_int, c_void};

use tokio::sync::mpsc;
use virt::connect::Connect;
use virt::sys;

use crate::vm::driver::{DomainEvent, EventKind, LibvirtFailure, Op};

/// libvirt's `virDomainEventType` and its detail, in the driver's terms.
fn event(event: c_int, detail: c_int) -> Option<EventKind> {
    Some(match event as u32 {
        sys::VIR_DOMAIN_EVENT_DEFINED => EventKind::Defined,
        sys::VIR_DOMAIN_EVENT_UNDEFINED => EventKind::Undefined,
        sys::VIR_DOMAIN_EVENT_STARTED => EventKind::Started,
        sys::VIR_DOMAIN_EVENT_SUSPENDED => EventKind::Suspended,
        sys::VIR_DOMAIN_EVENT_RESUMED => EventKind::Resumed,
        sys::VIR_DOMAIN_EVENT_STOPPED => EventKind::Stopped(stop_reason(detail)),
        sys::VIR_DOMAIN_EVENT_SHUTDOWN => EventKind::Shutdown,
        sys::VIR_DOMAIN_EVENT_PMSUSPENDED => EventKind::PmSuspended,
        sys::VIR_DOMAIN_EVENT_CRASHED => EventKind::Crashed,
        _ => return None,
    })
}

/// Why a domain stopped, in libvirt's words (`virDomainEventStoppedDetailType`).
fn stop_reason(detail: c_int) -> &'static str {
    match detail as u32 {
        sys::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => "shutdown",
        sys::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => "destroyed",
        sys::VIR_DOMAIN_EVENT_STOPPED_CRASHED => "crashed",
        sys::VIR_DOMAIN_EVENT_STOPPED_MIGRATED => "migrated",
        sys::VIR_DOMAIN_EVENT_STOPPED_SAVED => "saved",
        sys::VIR_DOMAIN_EVENT_STOPPED_FAILED => "failed",
        sys::VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT => "from-snapshot",
        _ => "other",
    }
}

type Sender = mpsc::Sender<DomainEvent>;

/// Subscribes `conn` to every domain's lifecycle events, sending each to `tx`. The subscription ends with the connection (libvirt then frees the sender).
#[allow(
    unsafe_code,
    reason = "the virt crate has no wrapper for domain events"
)]
pub fn subscribe(conn: &Connect, tx: &Sender) -> Result<(), LibvirtFailure> {
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
        return Err(LibvirtFailure::libvirt(
            Op::new("subscribing to domain events"),
            virt::error::Error::last_error(),
        ));
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
    let _ = tx.try_send(DomainEvent {
        domain: name,
        kind: self::event(event, detail),
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
