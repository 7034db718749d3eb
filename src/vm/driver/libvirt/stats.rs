//! Every domain's statistics in one libvirt call (`virConnectGetAllDomainStats`), for
//! `GET /metrics` (the service keeps the last sample: `service::statscache`).
//!
//! The `virt` crate's `all_domain_stats` hands back raw records it never frees and gives
//! no way to read them; this is the small wrapper that reads and frees them.

use std::ffi::{CStr, c_uint};

use virt::connect::Connect;
use virt::sys;

use crate::metrics::sample::DomainSample;

/// Reads every domain's state, CPU time, balloon, block and interface statistics.
#[allow(
    unsafe_code,
    reason = "the virt crate cannot read the records of virConnectGetAllDomainStats"
)]
pub fn read_all(conn: &Connect) -> Result<Vec<DomainSample>, virt::error::Error> {
    let stats = sys::VIR_DOMAIN_STATS_STATE
        | sys::VIR_DOMAIN_STATS_CPU_TOTAL
        | sys::VIR_DOMAIN_STATS_BALLOON
        | sys::VIR_DOMAIN_STATS_INTERFACE
        | sys::VIR_DOMAIN_STATS_BLOCK;
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: a live connection and an out-pointer libvirt fills with an array of
    // `n` records, NULL-terminated, freed below with virDomainStatsRecordListFree.
    let n = unsafe {
        sys::virConnectGetAllDomainStats(conn.as_ptr(), stats as c_uint, &mut records, 0)
    };
    if n < 0 {
        return Err(virt::error::Error::last_error());
    }
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: `i < n`, so the record and its parameter array are libvirt's, alive
        // until the list is freed; the domain's name lives as long as the domain.
        let sample = unsafe {
            let rec = &**records.add(i);
            let params = std::slice::from_raw_parts(rec.params, rec.nparams.max(0) as usize);
            let name = sys::virDomainGetName(rec.dom);
            (!name.is_null())
                .then(|| from_params(CStr::from_ptr(name).to_string_lossy().into_owned(), params))
        };
        out.extend(sample);
    }
    // SAFETY: the list libvirt returned, freed once (NULL is allowed).
    unsafe { sys::virDomainStatsRecordListFree(records) };
    Ok(out)
}

/// One record's typed parameters (`state.state`, `cpu.time`, `balloon.current`,
/// `block.<n>.rd.bytes`, `net.<n>.rx.bytes`, ...) as a sample.
#[allow(unsafe_code, reason = "reads the union libvirt tagged with its type")]
fn from_params(name: String, params: &[sys::virTypedParameter]) -> DomainSample {
    let mut d = DomainSample {
        name,
        ..DomainSample::default()
    };
    for p in params {
        // SAFETY: libvirt NUL-terminates the field name within its 80 bytes.
        let field = unsafe { CStr::from_ptr(p.field.as_ptr()) }.to_bytes();
        // SAFETY: the union is read as the member its `type_` names.
        let value: u64 = unsafe {
            match p.type_ as c_uint {
                sys::VIR_TYPED_PARAM_INT => p.value.i.max(0) as u64,
                sys::VIR_TYPED_PARAM_UINT => u64::from(p.value.ui),
                sys::VIR_TYPED_PARAM_LLONG => p.value.l.max(0) as u64,
                sys::VIR_TYPED_PARAM_ULLONG => p.value.ul,
                _ => continue,
            }
        };
        add(&mut d, field, value);
    }
    d
}

/// Adds one parameter to the sample; per-device values are summed over devices.
fn add(d: &mut DomainSample, field: &[u8], v: u64) {
    match field {
        b"state.state" => d.state = v as u32,
        b"cpu.time" => d.cpu_seconds = v as f64 / 1e9,
        b"balloon.current" => d.memory_bytes = v * 1024,
        _ => {
            let Ok(f) = std::str::from_utf8(field) else {
                return;
            };
            let mut parts = f.splitn(3, '.');
            let (Some(dev), Some(index), Some(rest)) = (parts.next(), parts.next(), parts.next())
            else {
                return;
            };
            if index.parse::<u32>().is_err() {
                return;
            }
            let slot = match (dev, rest) {
                ("block", "rd.bytes") => &mut d.block_read_bytes,
                ("block", "wr.bytes") => &mut d.block_write_bytes,
                ("net", "rx.bytes") => &mut d.net_rx_bytes,
                ("net", "tx.bytes") => &mut d.net_tx_bytes,
                _ => return,
            };
            *slot = slot.saturating_add(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_summed_and_units_converted() {
        let mut d = DomainSample::default();
        for (f, v) in [
            ("state.state", 1),
            ("cpu.time", 2_500_000_000),
            ("balloon.current", 1024),
            ("block.0.rd.bytes", 10),
            ("block.1.rd.bytes", 5),
            ("block.0.wr.bytes", 7),
            ("block.count", 2),
            ("net.0.rx.bytes", 100),
            ("net.1.tx.bytes", 3),
            ("net.0.name", 9),
        ] {
            add(&mut d, f.as_bytes(), v);
        }
        assert_eq!(
            (d.state, d.cpu_seconds, d.memory_bytes),
            (1, 2.5, 1024 * 1024)
        );
        assert_eq!((d.block_read_bytes, d.block_write_bytes), (15, 7));
        assert_eq!((d.net_rx_bytes, d.net_tx_bytes), (100, 3));
    }

    #[test]
    fn the_test_driver_answers_in_one_call() {
        super::super::loader::ensure_loaded().unwrap();
        let conn = Connect::open(Some("test:///default")).unwrap();
        let all = read_all(&conn).unwrap();
        // The test driver reports states only; a real libvirtd's figures are checked
        // by tests/observability.rs.
        let test = all.iter().find(|d| d.name == "test").unwrap();
        assert_eq!(test.state, 1, "test:///default's domain runs");
    }
}
