//! Reading the table's sets back: the DNAT maps, the allow-lists, which ports the other
//! sets hold, and every element's counter. One dump per set, whatever the number of maps.

use std::collections::{BTreeMap, BTreeSet};

use nlink::netlink::nftables::{RuleExpr, SetElement, SetElementData, SetInfo};
use nlink::netlink::{Connection, Nftables};

use crate::model::{AllowList, PortMap, Proto};

use super::dump;
use super::error::NftError;
use super::ruleset;
use super::sets::{self, ElementCounters, Kind};
use super::table::{FAMILY, TABLE};

/// The agent's table as read from the kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Every element of both maps that decodes as a port map.
    pub maps: BTreeSet<PortMap>,
    /// The allow-lists in the allow sets, by protocol and listen port.
    pub allow: BTreeMap<(Proto, u16), AllowList>,
    /// The listen ports each of the other sets holds, by set name.
    pub members: BTreeMap<&'static str, BTreeSet<u16>>,
    /// Each map's element counters.
    pub counters: BTreeMap<(Proto, u16), ElementCounters>,
    /// Sets, chains and rules are exactly what [`Nft::apply_all`](super::Nft::apply_all) writes.
    pub structure_ok: bool,
    /// Why `structure_ok` is false, one line each.
    pub problems: Vec<String>,
}

/// Fills `state` from the sets; problems with a set's declaration or elements go to
/// `state.problems`.
pub async fn read_sets(
    conn: &Connection<Nftables>,
    state: &mut KernelState,
) -> Result<(), NftError> {
    let infos = conn
        .list_sets_in(TABLE, FAMILY)
        .await
        .map_err(NftError::kernel("list sets"))?;
    let readable = readable_sets(&infos, state);
    let names: Vec<&'static str> = readable.iter().map(|(_, _, name)| *name).collect();
    let mut dumped = dump::elements(conn, &names).await?;

    // Gathered in the kernel's (hash) order and sorted once at the end: 10,000 tree
    // inserts each cost more than the sort.
    let mut found = Found::default();
    for (proto, kind, name) in readable {
        let elements = dumped.remove(name).unwrap_or_default();
        let unreadable = elements
            .iter()
            .filter(|&e| !found.read(proto, kind, name, e))
            .count();
        if unreadable > 0 {
            state
                .problems
                .push(format!("set {name} holds {unreadable} unreadable elements"));
        }
    }
    found.into_state(state);
    for extra in infos
        .iter()
        .filter(|s| !sets::all_names().any(|n| n == s.name))
    {
        state
            .problems
            .push(format!("unexpected set {} in the table", extra.name));
    }
    Ok(())
}

/// The agent's sets the kernel has with a key its elements can be read by; a missing
/// set, or one with the wrong key or declaration, is a problem in `state`.
fn readable_sets(infos: &[SetInfo], state: &mut KernelState) -> Vec<(Proto, Kind, &'static str)> {
    let mut readable = Vec::new();
    for proto in Proto::ALL {
        for kind in Kind::ALL {
            let name = sets::name(kind, proto);
            let Some(info) = infos.iter().find(|s| s.name == name) else {
                state.problems.push(format!("set {name} is missing"));
                continue;
            };
            if let Some(problem) = key_problem(kind, info) {
                state.problems.push(problem);
                continue;
            }
            // Wrong flags or statements: drift, but its elements still say which maps
            // the kernel holds.
            if let Some(problem) = declaration_problem(kind, info) {
                state.problems.push(problem);
            }
            readable.push((proto, kind, name));
        }
    }
    readable
}

/// One element's counter: the map's key, the set it is in, packets and bytes.
type Count = ((Proto, u16), Kind, (u64, u64));

/// What the element dumps found, before it is sorted into a [`KernelState`].
#[derive(Default)]
struct Found {
    maps: Vec<crate::model::PortMap>,
    members: BTreeMap<&'static str, Vec<u16>>,
    counts: Vec<Count>,
    allow: BTreeMap<(Proto, u16), Vec<ipnetwork::Ipv4Network>>,
}

impl Found {
    /// Reads one element of set `name` (of `kind`, for `proto`); false when it cannot
    /// be read.
    fn read(&mut self, proto: Proto, kind: Kind, name: &'static str, e: &SetElement) -> bool {
        match kind {
            Kind::Ports => read_map_element(proto, e, self),
            Kind::Allow => match sets::decode_allow(e.key(), e.key_end()) {
                Some((port, net)) => {
                    self.allow.entry((proto, port)).or_default().push(net);
                    true
                }
                None => false,
            },
            Kind::Flows | Kind::Restricted | Kind::Drops => {
                let Ok(k) = <[u8; 2]>::try_from(e.key()) else {
                    return false;
                };
                let port = u16::from_be_bytes(k);
                self.members.entry(name).or_default().push(port);
                if kind.counted() {
                    self.counts
                        .push(((proto, port), kind, e.counter().unwrap_or_default()));
                }
                true
            }
        }
    }

    /// Into `state`, which holds no maps, members or counters yet. `collect` sorts once
    /// and builds each tree in bulk.
    fn into_state(self, state: &mut KernelState) {
        state.allow = self
            .allow
            .into_iter()
            .map(|(k, nets)| (k, AllowList::from_networks(nets)))
            .collect();
        state.maps = self.maps.into_iter().collect();
        state.members = self
            .members
            .into_iter()
            .map(|(name, ports)| (name, ports.into_iter().collect()))
            .collect();
        let mut counts = self.counts;
        counts.sort_unstable_by_key(|(key, _, _)| *key);
        let mut merged: Vec<((Proto, u16), ElementCounters)> = Vec::with_capacity(counts.len());
        for (key, kind, value) in counts {
            if merged.last().map(|(k, _)| *k) != Some(key) {
                merged.push((key, ElementCounters::default()));
            }
            if let Some((_, c)) = merged.last_mut() {
                c.set(kind, value);
            }
        }
        state.counters = merged.into_iter().collect();
    }
}

fn read_map_element(
    proto: Proto,
    e: &nlink::netlink::nftables::SetElement,
    found: &mut Found,
) -> bool {
    let decoded = match e.data() {
        Some(SetElementData::Value(v)) => ruleset::decode_element(proto, e.key(), v),
        _ => None,
    };
    let Some(m) = decoded else {
        return false;
    };
    found.counts.push((
        (proto, m.listen_port),
        Kind::Ports,
        e.counter().unwrap_or_default(),
    ));
    found.maps.push(m);
    true
}

/// Why a set's elements cannot be read as ours (wrong key or data type), if so.
fn key_problem(kind: Kind, info: &SetInfo) -> Option<String> {
    let name = info.name.as_str();
    let key = match kind {
        Kind::Ports | Kind::Flows | Kind::Restricted | Kind::Drops => {
            nlink::netlink::nftables::SetKeyType::InetService
        }
        Kind::Allow => sets::allow_key_type(),
    };
    if info.key_type != key.type_id() || info.key_len != key.len() {
        return Some(format!("set {name} has the wrong key type"));
    }
    if kind == Kind::Ports {
        let value = ruleset::map_value_type();
        if info.data_type != Some(value.type_id()) || info.data_len != Some(value.len()) {
            return Some(format!(
                "map {name} is not `type inet_service : ipv4_addr . inet_service`"
            ));
        }
    }
    None
}

/// Why a set is not declared as [`sets::set`] declares it (flags, per-element counter),
/// if it is not.
fn declaration_problem(kind: Kind, info: &SetInfo) -> Option<String> {
    let name = info.name.as_str();
    if sets::significant_flags(info.flags) != sets::expected_flags(kind) {
        return Some(format!("set {name} has the wrong flags"));
    }
    let counted = matches!(info.statements[..], [RuleExpr::Counter { .. }]);
    let none = info.statements.is_empty();
    if (kind.counted() && !counted) || (!kind.counted() && !none) {
        return Some(format!(
            "set {name} should {}carry a counter on every element",
            if kind.counted() { "" } else { "not " }
        ));
    }
    None
}

/// Every map's counters, read from the three counted sets of each protocol (six dumps).
pub async fn read_counters(
    conn: &Connection<Nftables>,
) -> Result<BTreeMap<(Proto, u16), ElementCounters>, NftError> {
    let counted: Vec<(Proto, Kind, &'static str)> = Proto::ALL
        .into_iter()
        .flat_map(|p| [Kind::Ports, Kind::Flows, Kind::Drops].map(|k| (p, k, sets::name(k, p))))
        .collect();
    let names: Vec<&'static str> = counted.iter().map(|(_, _, name)| *name).collect();
    let mut dumped = dump::elements(conn, &names).await?;
    let mut out: BTreeMap<(Proto, u16), ElementCounters> = BTreeMap::new();
    for (proto, kind, name) in counted {
        for e in dumped.remove(name).unwrap_or_default() {
            if let Ok(k) = <[u8; 2]>::try_from(e.key()) {
                out.entry((proto, u16::from_be_bytes(k)))
                    .or_default()
                    .set(kind, e.counter().unwrap_or_default());
            }
        }
    }
    Ok(out)
}

/// The listen ports a set of `kind` should hold, for the drift check.
pub fn expected_members<'a>(
    kind: Kind,
    proto: Proto,
    rules: impl IntoIterator<Item = &'a crate::model::PortRule>,
) -> BTreeSet<u16> {
    rules
        .into_iter()
        .filter(|r| r.map.proto == proto && sets::holds(kind, r))
        .map(|r| r.map.listen_port)
        .collect()
}
