//! Making the kernel's table exactly the desired maps, in one transaction: in place when
//! the table has the right shape (only the maps that differ change; the others, and
//! their counters, are not touched), else a rebuild that carries the counters of the
//! maps it keeps (docs/decisions/24-apply-all-in-place.md).

use std::collections::{BTreeMap, BTreeSet};

use crate::model::{AllowList, PortRule, Proto};

use super::driver::{BATCH_OVERHEAD_BYTES, ELEMENT_WIRE_BYTES, Nft, Op, with_elements};
use super::error::NftError;
use super::readback::KernelState;
use super::readback::expected_members;
use super::ruleset;
use super::sets::{self, ElementCounters, Kind};

/// Maps by protocol and listen port.
type ByKey<'a> = BTreeMap<(Proto, u16), &'a PortRule>;

impl Nft {
    /// Makes the table hold exactly `rules`, in ONE transaction (none when it already
    /// does). The kernel commits all or nothing: a refused batch leaves the table as it
    /// was.
    ///
    /// - The table is there with the right sets, chains and rules, and its sets agree
    ///   with each other: the maps that differ are deleted and added again (their
    ///   counters start again); the others are not touched, counters included.
    /// - Otherwise (no table, a damaged one, other settings), or when the in-place
    ///   change is refused (the table changed behind the agent's back meanwhile): destroy
    ///   and rebuild the table. A map the old table held unchanged (same target, same
    ///   allow-list) keeps its counters: they were read first and go into the new
    ///   elements.
    pub async fn apply_all(&self, rules: &[PortRule]) -> Result<(), NftError> {
        let wanted = by_key(rules)?;
        let held = match self.read().await {
            Ok(held) => held,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the table; rebuilding it, counters start at zero");
                None
            }
        };
        let Some(held) = held else {
            return self.rebuild(&wanted, &BTreeMap::new()).await;
        };
        if let Some(kernel) = kernel_rules(&held) {
            match self.change_in_place(&wanted, &kernel).await {
                Ok(InPlace::Done) => return Ok(()),
                Ok(InPlace::TooBig) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "in-place change refused; rebuilding the table")
                }
            }
        }
        self.rebuild(&wanted, &counters_to_carry(&held, &wanted))
            .await
    }

    /// Deletes the maps of `kernel` that `wanted` does not hold as they are, and adds
    /// the maps of `wanted` that `kernel` does not: one transaction, or nothing at all
    /// when they agree. [`InPlace::TooBig`] when a rebuild is cheaper.
    async fn change_in_place(
        &self,
        wanted: &ByKey<'_>,
        kernel: &BTreeMap<(Proto, u16), PortRule>,
    ) -> Result<InPlace, NftError> {
        let gone: Vec<&PortRule> = kernel
            .iter()
            .filter(|(key, rule)| wanted.get(key) != Some(rule))
            .map(|(_, rule)| rule)
            .collect();
        let new: Vec<&PortRule> = wanted
            .iter()
            .filter(|(key, rule)| kernel.get(key) != Some(**rule))
            .map(|(_, rule)| *rule)
            .collect();
        if gone.is_empty() && new.is_empty() {
            return Ok(InPlace::Done);
        }
        if rebuild_is_cheaper(&gone, new.len(), kernel.len().max(wanted.len())) {
            return Ok(InPlace::TooBig);
        }
        self.ensure_send_buffer(batch_bytes(gone.iter().chain(&new).copied()))?;
        let tx = with_elements(self.conn.transaction(), &gone, Op::Delete);
        with_elements(tx, &new, Op::Add)
            .commit(&self.conn)
            .await
            .map_err(NftError::kernel("apply_all in place"))?;
        Ok(InPlace::Done)
    }

    /// Destroy (if present), then table, sets with every element, chains and rules.
    ///
    /// Elements whose carried counts are zero go in plain and get a copy of their set's
    /// counter; only the others carry a `counter` of their own, which costs the kernel
    /// two more per-CPU allocations each (docs/benchmarks.md (a)).
    async fn rebuild(
        &self,
        wanted: &ByKey<'_>,
        carried: &BTreeMap<(Proto, u16), ElementCounters>,
    ) -> Result<(), NftError> {
        // The whole batch goes out in one sendmsg (nfnetlink only treats a batch
        // atomically inside one skb), and a netlink sendmsg larger than the socket's
        // send buffer fails with EMSGSIZE: grow the buffer to fit.
        self.ensure_send_buffer(batch_bytes(wanted.values().copied()))?;

        let mut tx = self
            .conn
            .transaction()
            .destroy_table(ruleset::TABLE, ruleset::FAMILY)
            .add_table(ruleset::TABLE, ruleset::FAMILY);
        for proto in Proto::ALL {
            let mine: Vec<&PortRule> = wanted
                .iter()
                .filter(|((p, _), _)| *p == proto)
                .map(|(_, r)| *r)
                .collect();
            for kind in Kind::ALL {
                let set = sets::set(kind, proto);
                tx = tx.add_set(set.clone());
                let counts = |r: &PortRule| {
                    carried
                        .get(&(proto, r.map.listen_port))
                        .map(|c| c.get(kind))
                        .unwrap_or_default()
                };
                let (counted, fresh): (Vec<&PortRule>, Vec<&PortRule>) = mine
                    .iter()
                    .partition(|r| kind.counted() && counts(r) != (0, 0));
                let counted: Vec<(&PortRule, (u64, u64))> =
                    counted.into_iter().map(|r| (r, counts(r))).collect();
                for chunk in counted.chunks(sets::COUNTED_PER_MESSAGE) {
                    tx = tx.raw(sets::counted_elements(kind, proto, chunk));
                }
                // One element list is a single attribute nest with a u16 length;
                // split across several messages of the same batch.
                let elements = sets::elements(kind, &fresh);
                for chunk in elements.chunks(ruleset::ELEMENTS_PER_MESSAGE) {
                    tx = tx.add_set_elements(&set, chunk);
                }
            }
        }
        for chain in ruleset::chains(&self.settings()) {
            tx = tx.add_chain(ruleset::chain(&chain).map_err(NftError::kernel("apply_all"))?);
            for rule in &chain.rules {
                tx = tx.add_rule(rule.to_rule(chain.name));
            }
        }
        tx.commit(&self.conn)
            .await
            .map_err(NftError::kernel("apply_all"))
    }
}

/// What [`Nft::change_in_place`] did.
enum InPlace {
    Done,
    /// Nothing: the change is better made by a rebuild.
    TooBig,
}

/// Allow-list networks that an in-place change may delete; above it, a rebuild. The
/// kernel's interval set (pipapo) reworks its lookup table for every deleted element:
/// deleting 10,000 took 2.8 s in one batch (docs/benchmarks.md (c)), a rebuild of such a
/// table a small part of that.
const IN_PLACE_MAX_ALLOW_DELETES: usize = 256;

/// Whether rebuilding the table costs less than deleting `gone` and adding `added` maps
/// of a table of `size`: the change touches more than half the maps, or deletes many
/// allow-list networks.
fn rebuild_is_cheaper(gone: &[&PortRule], added: usize, size: usize) -> bool {
    let nets: usize = gone.iter().map(|r| r.allow_from.networks().len()).sum();
    (gone.len() + added) * 2 > size.max(64) || nets > IN_PLACE_MAX_ALLOW_DELETES
}

/// `rules` by protocol and listen port; a key twice is refused.
fn by_key(rules: &[PortRule]) -> Result<ByKey<'_>, NftError> {
    // `collect` sorts once and builds the tree in bulk, keeping one rule per key.
    let out: ByKey<'_> = rules
        .iter()
        .map(|r| ((r.map.proto, r.map.listen_port), r))
        .collect();
    if out.len() == rules.len() {
        return Ok(out);
    }
    let mut seen = BTreeSet::new();
    let twice = rules
        .iter()
        .find(|r| !seen.insert((r.map.proto, r.map.listen_port)));
    Err(NftError::Invalid(match twice {
        Some(r) => format!("{} port {} is mapped twice", r.map.proto, r.map.listen_port),
        None => "a port is mapped twice".into(),
    }))
}

/// Bytes a batch of these maps' elements may take, for the socket's send buffer.
fn batch_bytes<'a>(rules: impl Iterator<Item = &'a PortRule>) -> usize {
    let (n, nets) = rules.fold((0, 0), |(n, nets), r| {
        (n + 1, nets + r.allow_from.networks().len())
    });
    BATCH_OVERHEAD_BYTES + (n * 4 + nets) * ELEMENT_WIRE_BYTES
}

/// The maps the kernel holds, each with its allow-list, when the table has the right
/// shape and its sets agree with each other: every allow-list belongs to a map, and the
/// flow, restricted and drop sets hold exactly the ports these maps put there. Element
/// deletes can then only find what they delete. `None` otherwise: only a rebuild
/// repairs that.
fn kernel_rules(held: &KernelState) -> Option<BTreeMap<(Proto, u16), PortRule>> {
    if !held.structure_ok {
        return None;
    }
    let rules: BTreeMap<(Proto, u16), PortRule> = held
        .maps
        .iter()
        .map(|m| {
            let key = (m.proto, m.listen_port);
            let allow_from = held.allow.get(&key).cloned().unwrap_or_default();
            (
                key,
                PortRule {
                    map: *m,
                    allow_from,
                },
            )
        })
        .collect();
    if held.allow.keys().any(|k| !rules.contains_key(k)) {
        return None;
    }
    for proto in Proto::ALL {
        for kind in [Kind::Flows, Kind::Restricted, Kind::Drops] {
            let want = expected_members(kind, proto, rules.values());
            let got = held.members.get(sets::name(kind, proto));
            if got.map_or(!want.is_empty(), |got| *got != want) {
                return None;
            }
        }
    }
    Some(rules)
}

/// The counters of the maps the kernel holds exactly as wanted.
fn counters_to_carry(
    held: &KernelState,
    wanted: &ByKey<'_>,
) -> BTreeMap<(Proto, u16), ElementCounters> {
    let targets: BTreeSet<_> = held.maps.iter().collect();
    let none = AllowList::default();
    wanted
        .iter()
        .filter(|(key, r)| {
            targets.contains(&r.map) && held.allow.get(key).unwrap_or(&none) == &r.allow_from
        })
        .filter_map(|(key, _)| Some((*key, *held.counters.get(key)?)))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::PortMap;

    fn rule<S: AsRef<str>>(port: u16, nets: &[S]) -> PortRule {
        PortRule {
            map: PortMap {
                proto: Proto::Tcp,
                listen_port: port,
                target_ip: "10.0.0.2".parse().unwrap(),
                target_port: 80,
            },
            allow_from: AllowList::parse(nets).unwrap(),
        }
    }

    #[test]
    fn small_changes_go_in_place_and_large_ones_rebuild() {
        let none: [&str; 0] = [];
        let one = [rule(1, &none)];
        let one: Vec<&PortRule> = one.iter().collect();
        assert!(!rebuild_is_cheaper(&one, 1, 10_000));
        assert!(
            !rebuild_is_cheaper(&one, 1, 2),
            "a small table changes in place"
        );
        let many: Vec<PortRule> = (0..6_000).map(|p| rule(p, &none)).collect();
        let many: Vec<&PortRule> = many.iter().collect();
        assert!(rebuild_is_cheaper(&many, 0, 10_000), "more than half");
        // Few maps, but many allow-list networks to delete from the interval set.
        let listed: Vec<PortRule> = (0..5)
            .map(|p| {
                let nets: Vec<String> = (0..60).map(|i| format!("10.{p}.{i}.0/24")).collect();
                rule(p, &nets)
            })
            .collect();
        let listed: Vec<&PortRule> = listed.iter().collect();
        assert!(rebuild_is_cheaper(&listed, 0, 10_000));
        assert!(!rebuild_is_cheaper(&listed[..4], 0, 10_000));
    }
}
