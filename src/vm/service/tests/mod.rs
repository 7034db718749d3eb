//! The VM service against the hypervisor's in-memory twin (`driver::memory`): no libvirt
//! is needed, loaded or touched (`cargo test --lib vm::service` runs where libvirt.so.0
//! is absent). What only libvirt can show (its test driver's refusals, its events, its
//! network updates) is `vm::libvirt_tests` and `driver::libvirt::tests`.

mod addresses;
mod create;
mod lifecycle;
mod reconcile;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{VmConfig, Vms};
use crate::model::VmName;
use crate::store::Store;
use crate::store::vms::{self, SeedInputs, VmRow, test_row};
use crate::vm::driver::memory::MemoryHypervisor;
use crate::vm::driver::{Driver, volumes};
use crate::vm::spec::{Limits, VmSpec};

/// The settings of the tests' VM side.
pub(crate) fn test_config() -> VmConfig {
    VmConfig {
        pool: "nva-test-pool".into(),
        domain_type: "qemu".into(),
        default_network: "default".into(),
        default_arch: "x86_64".into(),
        default_image: "base".into(),
        default_image_url: String::new(),
        default_keys: Vec::new(),
        limits: Limits {
            max_memory_mib: 4096,
            max_vcpus: 4,
            max_disk_gb: 100,
        },
        stop_timeout: Duration::from_secs(1),
        lease_poll: Duration::from_millis(50),
        local: true,
    }
}

/// The service over a twin with a network `default` (10.77.0.0/24, DHCP range .2-.50)
/// and a ready image `base`.
pub(crate) struct Harness {
    pub vms: Arc<Vms>,
    pub store: Store,
    pub hv: Arc<MemoryHypervisor>,
}

/// `default`'s address `10.77.0.<last>`.
pub(super) fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, last)
}

pub(crate) fn harness() -> Harness {
    harness_with(test_config(), Duration::from_secs(30))
}

/// A harness whose callers wait at most `timeout` (LIBVIRT_TIMEOUT).
pub(super) fn harness_with(cfg: VmConfig, timeout: Duration) -> Harness {
    let store = Store::open_in_memory().unwrap();
    let hv = MemoryHypervisor::new();
    hv.add_network("default", ip(1), (ip(2), ip(50)));
    hv.add_volume(&volumes::image("base"), 1 << 20);
    store
        .with(|c| {
            vms::image_begin(c, "base", "upload", None, &volumes::image("base"), "test")?;
            vms::image_ready(c, "base", "00", "qcow2", 1 << 20)
        })
        .unwrap();
    let driver = Driver::new(hv.clone(), timeout);
    let vms = Arc::new(Vms::new(driver, store.clone(), cfg, None));
    vms.watch_events();
    Harness { vms, store, hv }
}

pub(super) fn vm(name: &str) -> VmName {
    name.parse().unwrap()
}

/// `POST /vms`'s body: `{"name": name, "memory_mib": 64}` with `extra`'s fields.
pub(crate) fn request(name: &str, extra: serde_json::Value) -> VmSpec {
    let mut v = serde_json::json!({"name": name, "memory_mib": 64, "disk_size_gb": 1});
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    VmSpec::from_json(v)
}

/// (action, outcome, error) of every audit row.
pub(super) fn audit(store: &Store) -> Vec<(String, String, Option<String>)> {
    store
        .with(|c| {
            let mut st = c.prepare("SELECT action, outcome, error FROM audit_log ORDER BY id")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
            Ok::<_, crate::store::StoreError>(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .unwrap()
}

/// A VM as a create leaves it, made directly: its row with seed inputs and its volumes in
/// the pool; no domain (the reconcile defines it).
pub(super) fn planted(h: &Harness, name: &str, mac: &str) -> VmRow {
    let row = test_row(name, mac);
    h.store
        .transaction(|tx| vms::upsert(tx, &row, &SeedInputs::default()))
        .unwrap();
    h.hv.add_volume(&row.disk_volume, 1 << 20);
    h.hv.add_volume(&row.seed_volume, 1 << 10);
    row
}

pub(super) fn last_state(store: &Store, name: &str) -> Option<String> {
    store
        .with(|c| {
            Ok::<_, crate::store::StoreError>(c.query_row(
                "SELECT last_state FROM vms WHERE name = ?1",
                [name],
                |r| r.get(0),
            )?)
        })
        .unwrap()
}

/// Waits (at most 5 s) until `cond` holds.
pub(super) async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
