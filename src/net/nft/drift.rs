//! Desired port maps versus the kernel's table: what a reconcile would change.

use std::collections::BTreeMap;
use std::fmt;

use crate::model::{PortMap, Proto};

use super::KernelState;

/// Differences between the desired port maps and the kernel. Empty means in sync.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Drift {
    /// The agent's table does not exist at all.
    pub table_missing: bool,
    /// Desired, but no element for its listen port.
    pub missing: Vec<PortMap>,
    /// In the kernel, but its listen port is not desired.
    pub extra: Vec<PortMap>,
    /// Same listen port, other target: (desired, kernel).
    pub wrong: Vec<(PortMap, PortMap)>,
    /// Chains, rules or maps differ from what `apply_all` writes.
    pub structure: Vec<String>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        !self.table_missing
            && self.missing.is_empty()
            && self.extra.is_empty()
            && self.wrong.is_empty()
            && self.structure.is_empty()
    }

    /// Whether only elements differ, so element operations can repair it without
    /// rebuilding the table.
    pub fn elements_only(&self) -> bool {
        !self.table_missing && self.structure.is_empty()
    }
}

/// Compares desired port maps with what [`super::Nft::read`] found. Pure.
pub fn diff<'a>(
    desired: impl IntoIterator<Item = &'a PortMap>,
    kernel: Option<&KernelState>,
) -> Drift {
    let desired: BTreeMap<(Proto, u16), PortMap> = desired
        .into_iter()
        .map(|m| ((m.proto, m.listen_port), *m))
        .collect();
    let Some(kernel) = kernel else {
        return Drift {
            table_missing: true,
            missing: desired.into_values().collect(),
            ..Drift::default()
        };
    };
    let have: BTreeMap<(Proto, u16), PortMap> = kernel
        .maps
        .iter()
        .map(|m| ((m.proto, m.listen_port), *m))
        .collect();

    let mut drift = Drift {
        structure: kernel.problems.clone(),
        ..Drift::default()
    };
    if !kernel.structure_ok && drift.structure.is_empty() {
        drift.structure.push("structure differs".into());
    }
    for (key, want) in &desired {
        match have.get(key) {
            None => drift.missing.push(*want),
            Some(got) if got != want => drift.wrong.push((*want, *got)),
            Some(_) => {}
        }
    }
    drift.extra = have
        .iter()
        .filter(|(key, _)| !desired.contains_key(key))
        .map(|(_, m)| *m)
        .collect();
    drift
}

fn target(m: &PortMap) -> String {
    format!(
        "{} {} -> {}:{}",
        m.proto, m.listen_port, m.target_ip, m.target_port
    )
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("in sync");
        }
        let mut lines = Vec::new();
        if self.table_missing {
            lines.push(format!("table ip {} is missing", super::ruleset::TABLE));
        }
        lines.extend(self.structure.iter().cloned());
        lines.extend(
            self.missing
                .iter()
                .map(|m| format!("missing: {}", target(m))),
        );
        lines.extend(self.extra.iter().map(|m| format!("extra: {}", target(m))));
        lines.extend(self.wrong.iter().map(|(want, got)| {
            format!(
                "wrong target: {} (kernel has {}:{})",
                target(want),
                got.target_ip,
                got.target_port
            )
        }));
        f.write_str(&lines.join("\n"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn pm(proto: Proto, listen_port: u16, last: u8, target_port: u16) -> PortMap {
        PortMap {
            proto,
            listen_port,
            target_ip: Ipv4Addr::new(10, 0, 0, last),
            target_port,
        }
    }

    fn state(maps: &[PortMap]) -> KernelState {
        KernelState {
            maps: maps.iter().copied().collect(),
            structure_ok: true,
            problems: vec![],
        }
    }

    #[test]
    fn in_sync_is_empty() {
        let maps = [pm(Proto::Tcp, 80, 2, 80), pm(Proto::Udp, 80, 2, 53)];
        let d = diff(&maps, Some(&state(&maps)));
        assert!(d.is_empty(), "{d}");
        assert_eq!(d.to_string(), "in sync");
    }

    #[test]
    fn missing_table_lists_everything_missing() {
        let maps = [pm(Proto::Tcp, 80, 2, 80)];
        let d = diff(&maps, None);
        assert!(d.table_missing);
        assert_eq!(d.missing, maps);
        assert!(!d.elements_only());
        assert!(d.to_string().contains("table ip node_vm_agent is missing"));
    }

    #[test]
    fn missing_extra_and_wrong_elements() {
        let desired = [
            pm(Proto::Tcp, 80, 2, 80),
            pm(Proto::Tcp, 443, 2, 443),
            pm(Proto::Udp, 53, 3, 53),
        ];
        // tcp 443 missing, udp 53 points elsewhere, tcp 22 is extra; tcp/udp keyed apart.
        let kernel = state(&[
            pm(Proto::Tcp, 80, 2, 80),
            pm(Proto::Udp, 53, 4, 53),
            pm(Proto::Tcp, 22, 9, 22),
        ]);
        let d = diff(&desired, Some(&kernel));
        assert_eq!(d.missing, [pm(Proto::Tcp, 443, 2, 443)]);
        assert_eq!(d.extra, [pm(Proto::Tcp, 22, 9, 22)]);
        assert_eq!(
            d.wrong,
            [(pm(Proto::Udp, 53, 3, 53), pm(Proto::Udp, 53, 4, 53))]
        );
        assert!(d.elements_only());
        let text = d.to_string();
        assert!(text.contains("missing: tcp 443 -> 10.0.0.2:443"), "{text}");
        assert!(text.contains("wrong target: udp 53 -> 10.0.0.3:53 (kernel has 10.0.0.4:53)"));
    }

    #[test]
    fn broken_structure_is_drift() {
        let mut kernel = state(&[]);
        kernel.structure_ok = false;
        kernel.problems = vec!["chain prerouting: rule `x` is missing".into()];
        let d = diff(&[], Some(&kernel));
        assert!(!d.is_empty());
        assert!(!d.elements_only());
        assert_eq!(d.to_string(), "chain prerouting: rule `x` is missing");
    }
}
