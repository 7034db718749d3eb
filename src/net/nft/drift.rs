//! Desired port maps versus the kernel's table: what a reconcile would change.

use std::collections::BTreeMap;
use std::fmt;

use crate::model::{AllowList, PortMap, PortRule, Proto};

use super::readback::{KernelState, expected_members};
use super::sets::{self, Kind};

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
    /// Allow-lists, or the ports the flow, restricted and drop sets hold, differ.
    pub sets: Vec<String>,
}

impl Drift {
    pub fn is_empty(&self) -> bool {
        !self.table_missing
            && self.missing.is_empty()
            && self.extra.is_empty()
            && self.wrong.is_empty()
            && self.structure.is_empty()
            && self.sets.is_empty()
    }

    /// Whether only elements differ, so element operations can repair it without
    /// rebuilding the table.
    pub fn elements_only(&self) -> bool {
        !self.table_missing && self.structure.is_empty()
    }
}

/// Compares desired port maps with what [`super::Nft::read`] found. Pure.
pub fn diff<'a>(
    desired: impl IntoIterator<Item = &'a PortRule>,
    kernel: Option<&KernelState>,
) -> Drift {
    let desired: BTreeMap<(Proto, u16), &PortRule> = desired
        .into_iter()
        .map(|r| ((r.map.proto, r.map.listen_port), r))
        .collect();
    let Some(kernel) = kernel else {
        return Drift {
            table_missing: true,
            missing: desired.into_values().map(|r| r.map).collect(),
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
            None => drift.missing.push(want.map),
            Some(got) if *got != want.map => drift.wrong.push((want.map, *got)),
            Some(_) => {}
        }
    }
    drift.extra = have
        .iter()
        .filter(|(key, _)| !desired.contains_key(key))
        .map(|(_, m)| *m)
        .collect();
    drift.sets = set_differences(&desired, kernel);
    drift
}

/// Allow-lists and set memberships that differ, one line each.
fn set_differences(
    desired: &BTreeMap<(Proto, u16), &PortRule>,
    kernel: &KernelState,
) -> Vec<String> {
    let mut lines = Vec::new();
    let none = AllowList::default();
    let keys: std::collections::BTreeSet<(Proto, u16)> =
        desired.keys().chain(kernel.allow.keys()).copied().collect();
    for key in keys {
        let want = desired.get(&key).map_or(&none, |r| &r.allow_from);
        let got = kernel.allow.get(&key).unwrap_or(&none);
        if want != got {
            lines.push(format!(
                "allow-list of {} {}: {want}, kernel has {got}",
                key.0, key.1
            ));
        }
    }
    for proto in Proto::ALL {
        for kind in [Kind::Flows, Kind::Restricted, Kind::Drops] {
            let name = sets::name(kind, proto);
            let want = expected_members(kind, proto, desired.values().copied());
            let empty = Default::default();
            let got = kernel.members.get(name).unwrap_or(&empty);
            let missing: Vec<_> = want.difference(got).collect();
            let extra: Vec<_> = got.difference(&want).collect();
            if !missing.is_empty() || !extra.is_empty() {
                lines.push(format!(
                    "set {name}: missing ports {missing:?}, extra ports {extra:?}"
                ));
            }
        }
    }
    lines
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
        lines.extend(self.sets.iter().cloned());
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

    fn rules(maps: &[PortMap]) -> Vec<PortRule> {
        maps.iter().copied().map(PortRule::from).collect()
    }

    /// The kernel holding `maps` without allow-lists: a flow counter for each.
    fn state(maps: &[PortMap]) -> KernelState {
        let mut members: BTreeMap<&'static str, std::collections::BTreeSet<u16>> = BTreeMap::new();
        for m in maps {
            members
                .entry(sets::name(Kind::Flows, m.proto))
                .or_default()
                .insert(m.listen_port);
        }
        KernelState {
            maps: maps.iter().copied().collect(),
            members,
            structure_ok: true,
            ..KernelState::default()
        }
    }

    #[test]
    fn in_sync_is_empty() {
        let maps = [pm(Proto::Tcp, 80, 2, 80), pm(Proto::Udp, 80, 2, 53)];
        let d = diff(&rules(&maps), Some(&state(&maps)));
        assert!(d.is_empty(), "{d}");
        assert_eq!(d.to_string(), "in sync");
    }

    #[test]
    fn missing_table_lists_everything_missing() {
        let maps = [pm(Proto::Tcp, 80, 2, 80)];
        let d = diff(&rules(&maps), None);
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
        let d = diff(&rules(&desired), Some(&kernel));
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
        let d = diff(&[] as &[PortRule], Some(&kernel));
        assert!(!d.is_empty());
        assert!(!d.elements_only());
        assert_eq!(d.to_string(), "chain prerouting: rule `x` is missing");
    }

    #[test]
    fn allow_lists_and_set_members_are_compared() {
        let m = pm(Proto::Tcp, 80, 2, 80);
        let mut want = PortRule::from(m);
        want.allow_from = AllowList::parse(&["192.0.2.0/24"]).unwrap();
        // The kernel has the map but lost the allow-list and its restricted/drop ports.
        let kernel = state(&[m]);
        let d = diff([&want], Some(&kernel));
        assert!(!d.is_empty() && d.elements_only());
        let text = d.to_string();
        assert!(
            text.contains("allow-list of tcp 80: [192.0.2.0/24], kernel has []"),
            "{text}"
        );
        assert!(
            text.contains("set tcp_restricted: missing ports [80]"),
            "{text}"
        );
        assert!(text.contains("set tcp_drops: missing ports [80]"), "{text}");

        let mut kernel = state(&[m]);
        kernel
            .allow
            .insert((Proto::Tcp, 80), want.allow_from.clone());
        for kind in [Kind::Restricted, Kind::Drops] {
            kernel
                .members
                .entry(sets::name(kind, Proto::Tcp))
                .or_default()
                .insert(80);
        }
        assert!(diff([&want], Some(&kernel)).is_empty());
        // An open map where the kernel still restricts it.
        let d = diff([&PortRule::from(m)], Some(&kernel));
        assert!(d.to_string().contains("extra ports [80]"), "{d}");
    }
}
