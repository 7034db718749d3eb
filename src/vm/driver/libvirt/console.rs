//! An interactive session on a domain's serial console: `virDomainOpenConsole` into a
//! non-blocking stream whose data moves on libvirt's event thread.
//!
//! Each session has a connection of its own, with a short keepalive
//! ([`CONSOLE_KEEPALIVE`]): after it is opened, only libvirt's event thread uses it (the
//! stream's callback reads and writes, the keepalive timer probes), so no two threads
//! ever wait on it (libvirt 9.0's CVE-2024-4418, `conn.rs`), and a frozen or restarted
//! libvirtd ends the session within seconds instead of at the pool's 20 s. The `virt`
//! crate's `Stream` is not used: it hands libvirt its own address (it must never move)
//! and panics in `Drop` when libvirt has gone. Here the callback's state is an `Arc`
//! libvirt holds a reference of, and the stream is freed once, by [`Stream::close`].

use std::ffi::{c_int, c_void};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Buf, Bytes};
use tokio::sync::mpsc::{self, error::TrySendError};
use virt::connect::Connect;
use virt::sys;

use super::conn::Libvirt;
use crate::vm::driver::console::{CHUNK, ConsoleOpen, ConsolePipe, Ended, PipeEnd, StreamEnd};
use crate::vm::driver::error::OrLibvirt;
use crate::vm::driver::{Call, LibvirtFailure, Op};

/// Keepalive of a console's connection: a probe each second, closed after 3 unanswered
/// (libvirt gives up at the 4th timer): a frozen libvirtd ends the session in about 4 s.
pub const CONSOLE_KEEPALIVE: (i32, u32) = (1, 3);

/// Guest bytes read per callback at most, so one busy console cannot hold the event
/// thread for long.
const READS_PER_EVENT: usize = 16;

const READABLE: c_int = sys::VIR_STREAM_EVENT_READABLE as c_int;
const WRITABLE: c_int = sys::VIR_STREAM_EVENT_WRITABLE as c_int;
const TROUBLE: c_int = (sys::VIR_STREAM_EVENT_ERROR | sys::VIR_STREAM_EVENT_HANGUP) as c_int;

/// Opens the console of domain `name` (its first serial port); `force` takes it from
/// another libvirt client (a `virsh console`). Blocking.
pub fn open(
    lv: &Libvirt,
    call: &Call,
    name: &str,
    force: bool,
) -> Result<ConsoleOpen, LibvirtFailure> {
    let conn = lv.open_dedicated(CONSOLE_KEEPALIVE)?;
    call.reach();
    let Some(dom) = super::domain::lookup(&conn, name)? else {
        return Ok(ConsoleOpen::NoDomain);
    };
    if !dom
        .is_active()
        .or_libvirt(|| Op::of("the state of", name))?
    {
        return Ok(ConsoleOpen::NotRunning);
    }
    let st = new_stream(&conn)?;
    let mut flags = sys::VIR_DOMAIN_CONSOLE_SAFE;
    if force {
        flags |= sys::VIR_DOMAIN_CONSOLE_FORCE;
    }
    // SAFETY: `dom` and `st` are live objects of `conn`; a null device name is the
    // domain's first console.
    #[allow(unsafe_code)]
    let opened =
        unsafe { sys::virDomainOpenConsole(dom.as_ptr(), std::ptr::null(), st.0, flags as _) };
    if opened < 0 {
        let e = virt::error::Error::last_error();
        st.free();
        if e.message().contains("Active console session") {
            return Ok(ConsoleOpen::HeldOutside);
        }
        return Err(LibvirtFailure::libvirt(
            Op::of("opening the console of", name),
            e,
        ));
    }
    let mut made = None;
    let pipe = ConsolePipe::new(|side| {
        let stream = Arc::new(Stream {
            inner: Mutex::new(Inner {
                st: Some(st),
                conn: Some(conn),
                output: Some(side.output),
                dropped: side.dropped,
                input: Some(side.input),
                sending: None,
                interest: 0,
                ended: side.ended,
            }),
        });
        made = Some(Arc::clone(&stream));
        stream as Arc<dyn PipeEnd>
    });
    if let Some(stream) = made {
        // On failure the pipe is dropped, which closes the stream.
        add_callback(&stream)?;
    }
    Ok(ConsoleOpen::Opened(pipe))
}

/// A stream pointer, freed once.
struct RawStream(sys::virStreamPtr);

// SAFETY: libvirt's stream objects are thread-safe (their own lock); the pointer is used
// under `Stream`'s mutex only, and freed once.
#[allow(unsafe_code)]
unsafe impl Send for RawStream {}

impl RawStream {
    fn free(self) {
        // SAFETY: a stream this module made and nobody frees twice (`self` is consumed).
        #[allow(unsafe_code)]
        unsafe {
            sys::virStreamFree(self.0);
        }
    }
}

fn new_stream(conn: &Connect) -> Result<RawStream, LibvirtFailure> {
    // SAFETY: `conn` is open; the result is checked for null.
    #[allow(unsafe_code)]
    let st = unsafe { sys::virStreamNew(conn.as_ptr(), sys::VIR_STREAM_NONBLOCK as _) };
    if st.is_null() {
        return Err(LibvirtFailure::libvirt(
            Op::new("making a stream for a console"),
            virt::error::Error::last_error(),
        ));
    }
    Ok(RawStream(st))
}

/// One session's stream, shared by the pipe and libvirt's callback.
struct Stream {
    inner: Mutex<Inner>,
}

struct Inner {
    /// `None` once closed.
    st: Option<RawStream>,
    conn: Option<Connect>,
    /// To the pipe; dropped when the stream ends.
    output: Option<mpsc::Sender<Bytes>>,
    /// Guest bytes read while the output was full, and dropped: libvirt's client queues
    /// whatever libvirtd sends without bound, so the stream is always read.
    dropped: Arc<std::sync::atomic::AtomicU64>,
    input: Option<mpsc::Receiver<Bytes>>,
    /// What is left of the input chunk being sent.
    sending: Option<Bytes>,
    /// The events the callback is registered for (0 before it is).
    interest: c_int,
    ended: Ended,
}

impl Stream {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Inner {
    fn ptr(&self) -> Option<sys::virStreamPtr> {
        self.st.as_ref().map(|s| s.0)
    }

    /// The stream ended: the pipe sees its output close and its input refused.
    fn end(&mut self, why: StreamEnd) {
        self.ended.set(why);
        self.output = None;
        self.input = None;
        self.sending = None;
    }

    fn last_error(what: &str) -> StreamEnd {
        StreamEnd::Failed(format!(
            "{what}: {}",
            virt::error::Error::last_error().message()
        ))
    }

    /// Reads what the guest wrote, into the output while it has room.
    fn read(&mut self) {
        let Some(st) = self.ptr() else { return };
        for _ in 0..READS_PER_EVENT {
            if self.output.is_none() {
                return;
            }
            let mut buf = vec![0u8; CHUNK];
            // SAFETY: `st` is live (under the lock, not closed); `buf` holds CHUNK bytes.
            #[allow(unsafe_code)]
            let n = unsafe { sys::virStreamRecv(st, buf.as_mut_ptr().cast(), CHUNK) };
            match n {
                n if n > 0 => {
                    buf.truncate(n as usize);
                    self.forward(Bytes::from(buf));
                }
                0 => return self.end(StreamEnd::Eof),
                -2 => return,
                _ => return self.end(Self::last_error("reading the console")),
            }
        }
    }

    /// Hands guest bytes to the pipe, or drops them (counted) when it is full.
    fn forward(&mut self, bytes: Bytes) {
        let Some(out) = &self.output else { return };
        match out.try_send(bytes) {
            Ok(()) => {}
            Err(TrySendError::Full(b)) => {
                self.dropped
                    .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Err(TrySendError::Closed(_)) => self.end(StreamEnd::Failed("the reader left".into())),
        }
    }

    /// Sends queued input until the stream would block.
    fn write(&mut self) {
        let Some(st) = self.ptr() else { return };
        loop {
            if self.sending.is_none() {
                self.sending = self.input.as_mut().and_then(|i| i.try_recv().ok());
            }
            let Some(chunk) = self.sending.as_mut() else {
                return;
            };
            // SAFETY: `st` is live; `chunk` holds `len` bytes.
            #[allow(unsafe_code)]
            let n = unsafe { sys::virStreamSend(st, chunk.as_ptr().cast(), chunk.len()) };
            match n {
                n if n > 0 => {
                    chunk.advance(n as usize);
                    if chunk.is_empty() {
                        self.sending = None;
                    }
                }
                -2 => return,
                _ => return self.end(Self::last_error("writing to the console")),
            }
        }
    }

    /// Registers for what the stream needs now: reading always, writing while there is
    /// input; nothing once it ended.
    fn update(&mut self) {
        let Some(st) = self.ptr() else { return };
        let want = if self.ended.get().is_some() {
            0
        } else {
            let reading = READABLE;
            let input =
                self.sending.is_some() || self.input.as_ref().is_some_and(|i| !i.is_empty());
            reading | if input { WRITABLE } else { 0 } | TROUBLE
        };
        if want == self.interest {
            return;
        }
        // SAFETY: `st` is live and has the callback `register` added.
        #[allow(unsafe_code)]
        unsafe {
            sys::virStreamEventUpdateCallback(st, want);
        }
        self.interest = want;
    }

    /// What libvirt's event thread reports.
    fn on_events(&mut self, events: c_int) {
        if self.ended.get().is_some() {
            return;
        }
        if events & (READABLE | TROUBLE) != 0 {
            self.read();
        }
        if events & WRITABLE != 0 && self.ended.get().is_none() {
            self.write();
        }
        self.update();
    }
}

impl PipeEnd for Stream {
    fn want_input(&self) {
        self.lock().update();
    }

    fn alive(&self) -> bool {
        self.lock()
            .conn
            .as_ref()
            .is_some_and(|c| c.is_alive().unwrap_or(false))
    }

    fn close(&self) {
        let (st, conn, ended) = {
            let mut inner = self.lock();
            let Some(st) = inner.st.take() else { return };
            let ended = inner.ended.get();
            inner.end(ended.clone().unwrap_or(StreamEnd::Failed("closed".into())));
            (st, inner.conn.take(), ended)
        };
        // The callback, if it runs now, finds the stream closed and touches nothing.
        // SAFETY: `st` is live and owned here alone from now on.
        #[allow(unsafe_code)]
        unsafe {
            sys::virStreamEventRemoveCallback(st.0);
            match ended {
                Some(StreamEnd::Eof) => sys::virStreamFinish(st.0),
                _ => sys::virStreamAbort(st.0),
            };
        }
        st.free();
        drop(conn);
    }
}

/// Registers `stream`'s callback for reading (and trouble).
fn add_callback(stream: &Arc<Stream>) -> Result<(), LibvirtFailure> {
    let mut inner = stream.lock();
    let Some(st) = inner.ptr() else {
        return Ok(());
    };
    let opaque = Arc::into_raw(Arc::clone(stream))
        .cast_mut()
        .cast::<c_void>();
    let want = READABLE | TROUBLE;
    // SAFETY: `on_stream` has the callback's signature; `opaque` is a reference to the
    // stream's state that `free_stream` gives back when libvirt drops the callback.
    #[allow(unsafe_code)]
    let added = unsafe {
        sys::virStreamEventAddCallback(st, want, Some(on_stream), opaque, Some(free_stream))
    };
    if added < 0 {
        // SAFETY: libvirt did not take the reference.
        #[allow(unsafe_code)]
        unsafe {
            free_stream(opaque)
        };
        return Err(LibvirtFailure::libvirt(
            Op::new("watching a console stream"),
            virt::error::Error::last_error(),
        ));
    }
    inner.interest = want;
    Ok(())
}

#[allow(
    unsafe_code,
    reason = "called by libvirt with the pointer add_callback gave it"
)]
unsafe extern "C" fn on_stream(_st: sys::virStreamPtr, events: c_int, opaque: *mut c_void) {
    if opaque.is_null() {
        return;
    }
    // SAFETY: `opaque` is the reference `add_callback` gave libvirt, alive until
    // `free_stream`.
    let stream = unsafe { &*opaque.cast_const().cast::<Stream>() };
    stream.lock().on_events(events);
}

#[allow(
    unsafe_code,
    reason = "called by libvirt with the pointer add_callback gave it"
)]
unsafe extern "C" fn free_stream(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: made by Arc::into_raw in `add_callback`, given back once.
        drop(unsafe { Arc::from_raw(opaque.cast_const().cast::<Stream>()) });
    }
}
