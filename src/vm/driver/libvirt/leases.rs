//! DHCP leases of a libvirt network. The virt crate does not wrap
//! `virNetworkGetDHCPLeases`, so this calls it through virt's own `sys` bindings.

use std::ffi::{CStr, CString, c_char};

use virt::network::Network;

use super::VmError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub ip: String,
    pub prefix: u32,
    pub hostname: Option<String>,
    /// Seconds since the epoch.
    pub expiry: i64,
}

/// The network's current leases, only those of `mac` when given. Blocking.
pub fn leases(net: &Network, mac: Option<&str>) -> Result<Vec<Lease>, VmError> {
    let mac_c = mac
        .map(CString::new)
        .transpose()
        .map_err(|_| VmError::Invalid("MAC address contains NUL".into()))?;
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
        return Err(VmError::libvirt(
            "reading DHCP leases",
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
            out.push(Lease {
                mac: string(l.mac).unwrap_or_default(),
                ip: string(l.ipaddr).unwrap_or_default(),
                prefix: l.prefix,
                hostname: string(l.hostname),
                expiry: l.expirytime,
            });
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

/// The IPv4 address leased to `mac`, the newest lease when there are several.
pub fn ipv4_of(leases: &[Lease], mac: &str) -> Option<String> {
    leases
        .iter()
        .filter(|l| l.mac.eq_ignore_ascii_case(mac) && l.ip.parse::<std::net::Ipv4Addr>().is_ok())
        .max_by_key(|l| l.expiry)
        .map(|l| l.ip.clone())
}
