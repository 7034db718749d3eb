//! DHCP leases of a libvirt network. The virt crate does not wrap
//! `virNetworkGetDHCPLeases`, so this calls it through virt's own `sys` bindings.

use std::ffi::{CStr, CString, c_char};

use virt::network::Network;

use crate::model::MacAddr;
use crate::vm::driver::{Lease, LibvirtFailure, Op};

/// The network's current leases, only those of `mac` when given. Blocking. A lease whose
/// MAC or address does not parse (a client-id lease, say) is left out.
pub fn leases(net: &Network, mac: Option<&MacAddr>) -> Result<Vec<Lease>, LibvirtFailure> {
    // A MAC has no NUL (it passed its check).
    let mac_c = mac.and_then(|m| CString::new(m.as_str()).ok());
    let mut array: *mut virt::sys::virNetworkDHCPLeasePtr = std::ptr::null_mut();
    #[allow(unsafe_code)]
    // SAFETY: `net` is a live network object; `mac_c` outlives the call; libvirt fills
    // `array` with `n` lease pointers that we own and free below.
    let n = unsafe {
        virt::sys::virNetworkGetDHCPLeases(
            net.as_ptr(),
            mac_c.as_ref().map_or(std::ptr::null(), |m| m.as_ptr()),
            &mut array,
            0,
        )
    };
    if n < 0 {
        return Err(LibvirtFailure::libvirt(
            Op::new("reading DHCP leases"),
            virt::error::Error::last_error(),
        ));
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        #[allow(unsafe_code)]
        // SAFETY: `array` holds `n` valid lease pointers (libvirt's contract); each string
        // field is NULL or a NUL-terminated C string owned by the lease.
        unsafe {
            let lease = *array.add(i);
            let l = &*lease;
            let mac = string(l.mac).and_then(|m| m.parse().ok());
            let ip = string(l.ipaddr).and_then(|i| i.parse().ok());
            if let (Some(mac), Some(ip)) = (mac, ip) {
                out.push(Lease {
                    mac,
                    ip,
                    expiry: l.expirytime,
                });
            }
            virt::sys::virNetworkDHCPLeaseFree(lease);
        }
    }
    if !array.is_null() {
        #[allow(unsafe_code)]
        // SAFETY: the array itself was allocated by libvirt with malloc.
        unsafe {
            libc::free(array.cast())
        };
    }
    Ok(out)
}

#[allow(unsafe_code)]
unsafe fn string(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        // SAFETY: the caller passes a NUL-terminated string from libvirt.
        Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    }
}
