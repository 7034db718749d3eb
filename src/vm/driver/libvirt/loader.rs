//! libvirt's client library, loaded when the agent first talks to libvirt instead of
//! when the process starts.
//!
//! Linking libvirt.so.0 maps it and the ~30 libraries it needs (gnutls, libcrypto, glib,
//! libxml2, ICU, ...) into the process and runs their constructors: about 12 MB resident
//! before one libvirt call (a C program that only links libvirt: 12.9 MB VmRSS, without:
//! 1.1 MB; docs/decisions/15-libvirt-loaded-on-first-use.md). A node that only maps ports never calls libvirt
//! (reconcile connects only when there are VM rows), so it should not carry that, and
//! it should start where libvirt is not installed at all.
//!
//! How: every libvirt function the agent calls (through the `virt` crate) is defined
//! here as a two-instruction trampoline that jumps through a slot. The linker resolves
//! the crate's references to these definitions, so libvirt.so.0 is no longer needed at
//! start (rustc links with `--as-needed`). [`ensure_loaded`] dlopens libvirt.so.0 once
//! and fills the slots; [`super::Libvirt`] calls it before its first connection. A
//! libvirt function called before that, or one missing from this list, is caught: the
//! first aborts with a message naming it, the second makes libvirt.so.0 a start-time
//! dependency again, which `libvirt_is_loaded_on_first_use` in tests/startup.rs
//! reports with the symbol to add (for the unit tests' binary, `nm -D --undefined-only`
//! on it shows the same; `vm::service`'s tests run where libvirt.so.0 is absent).
//!
//! # Safety
//!
//! The trampolines are sound under these invariants, which this module keeps and which
//! every change to it must keep:
//!
//! 1. **Same name, same function.** Each trampoline is a global symbol with exactly the
//!    name of the libvirt function it stands for, and only jumps (never calls): the
//!    caller's arguments, return address and stack stay as the caller set them, so the
//!    trampoline has the C signature of libvirt's function, which the `virt` crate's
//!    `extern "C"` declarations (generated from libvirt's headers) already state. A
//!    trampoline for a name libvirt does not export would be caught by [`load`], which
//!    refuses a library lacking any of them.
//! 2. **A slot is written once, before it is read as a function.** Only [`load`] writes
//!    the slots, once per process (inside `LOADED`'s `OnceLock`), with `Release` stores
//!    of addresses `dlsym` returned for a handle that is never closed; the libvirt calls
//!    come after `ensure_loaded` returned `Ok` (every connection is opened by
//!    `conn::Libvirt::open`, which calls it first), so they see the stores
//!    (`OnceLock`'s completion synchronises with every later `get`).
//! 3. **An empty slot stops the process.** A trampoline whose slot is still 0 jumps to
//!    [`not_loaded`], which aborts: a libvirt call before loading is a bug of the agent,
//!    never undefined behaviour.
//! 4. **Scratch registers only.** The x86_64 trampoline uses `r11`, the aarch64 one `x16`:
//!    both are the platform ABI's intra-procedure-call scratch registers, which a callee
//!    may clobber and which carry no argument.
//! 5. **Nothing unloads.** The handle is never passed to `dlclose` (libvirt is NODELETE
//!    anyway), so the addresses stay valid for the life of the process.

use std::ffi::{CStr, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The shared object, by its soname (what the `libvirt0` package installs).
pub const SONAME: &CStr = c"libvirt.so.0";

macro_rules! trampolines {
    ($($name:ident),* $(,)?) => {
        $(
            #[allow(non_snake_case)]
            // The trampoline jumps through a slot that only `ensure_loaded` writes, after
            // which it holds the address of libvirt's function of the same name (the
            // module's `# Safety` section).
            #[allow(unsafe_code)]
            mod $name {
                use std::sync::atomic::AtomicUsize;
                /// The address of libvirt's function once loaded; 0 before.
                pub static SLOT: AtomicUsize = AtomicUsize::new(0);
                #[cfg(target_arch = "x86_64")]
                std::arch::global_asm!(
                    concat!(".pushsection .text.nva_libvirt.", stringify!($name), ",\"ax\",%progbits"),
                    concat!(".globl ", stringify!($name)),
                    concat!(".type ", stringify!($name), ",%function"),
                    concat!(stringify!($name), ":"),
                    "mov r11, qword ptr [rip + {slot}]",
                    "test r11, r11",
                    "jz {missing}",
                    "jmp r11",
                    concat!(".size ", stringify!($name), ", . - ", stringify!($name)),
                    ".popsection",
                    slot = sym SLOT,
                    missing = sym super::not_loaded,
                );
                #[cfg(target_arch = "aarch64")]
                std::arch::global_asm!(
                    concat!(".pushsection .text.nva_libvirt.", stringify!($name), ",\"ax\",%progbits"),
                    concat!(".globl ", stringify!($name)),
                    concat!(".type ", stringify!($name), ",%function"),
                    concat!(stringify!($name), ":"),
                    "adrp x16, {slot}",
                    "ldr x16, [x16, :lo12:{slot}]",
                    "cbnz x16, 1f",
                    "b {missing}",
                    "1: br x16",
                    concat!(".size ", stringify!($name), ", . - ", stringify!($name)),
                    ".popsection",
                    slot = sym SLOT,
                    missing = sym super::not_loaded,
                );
            }
        )*

        /// Every trampoline: the function's name and its slot.
        static SYMBOLS: &[(&CStr, &AtomicUsize)] = &[
            $((
                match CStr::from_bytes_with_nul(concat!(stringify!($name), "\0").as_bytes()) {
                    Ok(c) => c,
                    Err(_) => panic!("symbol name"),
                },
                &$name::SLOT,
            )),*
        ];
    };
}

trampolines!(
    virConnectClose,
    virConnectDomainEventRegisterAny,
    virConnectGetAllDomainStats,
    virConnectGetCapabilities,
    virConnectGetMaxVcpus,
    virConnectIsAlive,
    virConnectListAllDomains,
    // The unit tests' own calls on libvirt's test driver (so their binary, too, starts
    // without libvirt.so.0): counting domains, a network, a pool and a volume's XML.
    virConnectNumOfDomains,
    virConnectOpen,
    virConnectRef,
    virConnectSetKeepAlive,
    virDomainCreate,
    virDomainDefineXML,
    virDomainDestroy,
    virDomainFree,
    virDomainGetInfo,
    virDomainGetName,
    virDomainGetXMLDesc,
    virDomainIsActive,
    virDomainLookupByName,
    virDomainOpenConsole,
    virDomainReboot,
    virDomainSetAutostart,
    virDomainShutdown,
    virDomainUndefine,
    virDomainUndefineFlags,
    virDomainStatsRecordListFree,
    virEventRegisterDefaultImpl,
    virEventRunDefaultImpl,
    virGetLastError,
    virNetworkCreate,
    virNetworkDefineXML,
    virNetworkDHCPLeaseFree,
    virNetworkFree,
    virNetworkGetAutostart,
    virNetworkGetDHCPLeases,
    virNetworkGetXMLDesc,
    virNetworkIsActive,
    virNetworkIsPersistent,
    virNetworkLookupByName,
    virNetworkSetAutostart,
    virNetworkUpdate,
    virNodeGetInfo,
    virSetErrorFunc,
    virStoragePoolBuild,
    virStoragePoolCreate,
    virStoragePoolDefineXML,
    virStoragePoolFree,
    virStoragePoolGetXMLDesc,
    virStoragePoolGetAutostart,
    virStoragePoolIsActive,
    virStoragePoolListVolumes,
    virStoragePoolLookupByName,
    virStoragePoolRefresh,
    virStoragePoolSetAutostart,
    virStoragePoolUndefine,
    virStorageVolCreateXML,
    virStorageVolCreateXMLFrom,
    virStorageVolDelete,
    virStorageVolDownload,
    virStorageVolFree,
    virStorageVolGetInfo,
    virStorageVolGetPath,
    virStorageVolGetXMLDesc,
    virStorageVolLookupByName,
    virStorageVolUpload,
    virStreamAbort,
    virStreamEventAddCallback,
    virStreamEventRemoveCallback,
    virStreamEventUpdateCallback,
    virStreamFinish,
    virStreamFree,
    virStreamNew,
    virStreamRecv,
    virStreamSend,
);

/// Where a libvirt function is called before [`ensure_loaded`] succeeded: a bug in the
/// agent, never a client's doing. Arguments in registers are lost by then, so this can
/// only say so and stop.
extern "C" fn not_loaded() -> ! {
    eprintln!(
        "node-vm-agent: a libvirt function was called before libvirt.so.0 was loaded (a bug: every libvirt call goes through the driver's connections, vm::driver::libvirt::Libvirt)"
    );
    std::process::abort();
}

/// Why libvirt.so.0 could not be used.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LoadError {
    /// The dynamic loader could not open it (not installed, or unusable).
    #[error(
        "cannot load {}: {reason} (install the libvirt0 package to manage VMs on this node)",
        SONAME.to_string_lossy()
    )]
    Open {
        /// `dlerror()`'s words.
        reason: String,
    },
    /// It lacks functions the agent calls.
    #[error("{} lacks {} (libvirt too old?)", SONAME.to_string_lossy(), .missing.join(", "))]
    Missing { missing: Vec<String> },
}

/// Loads libvirt.so.0 and points every trampoline at it, once; later calls return the
/// first outcome. Blocking (the dynamic loader runs libvirt's constructors).
pub fn ensure_loaded() -> Result<(), LoadError> {
    LOADED.get_or_init(load).clone()
}

/// Whether libvirt.so.0 has been loaded (some part of the agent used libvirt in this
/// run); never loads it.
pub fn is_loaded() -> bool {
    LOADED.get().is_some_and(Result::is_ok)
}

static LOADED: OnceLock<Result<(), LoadError>> = OnceLock::new();

#[allow(
    unsafe_code,
    reason = "dlopen and dlsym have no safe wrapper in libc or nix"
)]
fn load() -> Result<(), LoadError> {
    // SAFETY: dlopen/dlerror with a valid C string; the handle is never closed (libvirt
    // is NODELETE anyway), so the addresses stay valid for the life of the process.
    let handle = unsafe { libc::dlopen(SONAME.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        return Err(LoadError::Open { reason: dl_error() });
    }
    let mut missing = Vec::new();
    for (name, slot) in SYMBOLS {
        // SAFETY: a valid handle and C string.
        let addr: *mut c_void = unsafe { libc::dlsym(handle, name.as_ptr()) };
        if addr.is_null() {
            missing.push(name.to_string_lossy().into_owned());
        } else {
            slot.store(addr as usize, Ordering::Release);
        }
    }
    if !missing.is_empty() {
        return Err(LoadError::Missing { missing });
    }
    tracing::info!(library = %SONAME.to_string_lossy(), functions = SYMBOLS.len(), "libvirt loaded");
    Ok(())
}

#[allow(unsafe_code, reason = "dlerror's string belongs to the loader")]
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a valid C string owned by the loader.
    let e = unsafe { libc::dlerror() };
    if e.is_null() {
        "unknown error".into()
    } else {
        // SAFETY: checked non-null above.
        unsafe { CStr::from_ptr(e) }.to_string_lossy().into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether libvirt.so.0 is mapped into this process.
    fn is_mapped() -> bool {
        std::fs::read_to_string("/proc/self/maps")
            .map(|m| {
                m.lines()
                    .any(|l| l.ends_with("/libvirt.so.0") || l.contains("/libvirt.so.0."))
            })
            .unwrap_or(false)
    }

    #[test]
    fn loading_fills_every_slot_and_the_library_answers() {
        ensure_loaded().unwrap();
        for (name, slot) in SYMBOLS {
            assert_ne!(slot.load(Ordering::Acquire), 0, "{name:?}");
        }
        let conn = virt::connect::Connect::open(Some("test:///default")).unwrap();
        assert!(conn.is_alive().unwrap());
        assert!(is_mapped());
    }
}
