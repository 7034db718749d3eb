//! The nftables driver: one netlink socket, and the changes of single maps; the whole
//! table is written by `apply.rs`, read back by `readback.rs`.

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use ipnetwork::Ipv4Network;
use nlink::netlink::nftables::{RuleInfo, Transaction};
use nlink::netlink::{Connection, Nftables};

use super::error::NftError;
use super::forward::{self, ForwardAcceptReport};
use super::readback::{self, KernelState};
use super::settings::NatSettings;
use super::table::{ELEMENTS_PER_MESSAGE, FAMILY, TABLE};
use super::{ruleset, sets};
use crate::model::{MapCounters, PortRule, Proto};

/// The nftables driver: one netlink socket, bound to the network namespace of the
/// thread that created it.
pub struct Nft {
    pub(super) conn: Connection<Nftables>,
    settings: std::sync::RwLock<NatSettings>,
}

/// Bytes an element takes in a NEWSETELEM message (nests, key, concatenated value),
/// rounded up; only used to size the socket's send buffer.
pub(super) const ELEMENT_WIRE_BYTES: usize = 64;
/// Headroom for everything that is not an element: table, maps, chains, rules.
pub(super) const BATCH_OVERHEAD_BYTES: usize = 64 * 1024;

impl Nft {
    /// Opens the netlink socket in the calling thread's current network namespace.
    pub fn new(settings: NatSettings) -> Result<Self, NftError> {
        settings.validate()?;
        let conn = Connection::<Nftables>::new().map_err(|e| NftError::Socket(e.to_string()))?;
        Ok(Self {
            conn,
            settings: std::sync::RwLock::new(settings),
        })
    }

    pub fn settings(&self) -> NatSettings {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Changes the networks of the anti-spoofing chain. Takes effect in the kernel with
    /// the next [`apply_all`](Self::apply_all); until then the read-back reports drift.
    pub fn set_tunnel_sources(&self, nets: Vec<Ipv4Network>) {
        let mut s = match self.settings.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        s.tunnel_sources = nets;
    }

    /// Adds one map (and its allow-list) in one transaction. Fails if its listen port
    /// is already mapped (use [`replace`](Self::replace) to move it) or the table is
    /// absent.
    pub async fn add(&self, r: &PortRule) -> Result<(), NftError> {
        with_elements(self.conn.transaction(), &[r], Op::Add)
            .commit(&self.conn)
            .await
            .map_err(NftError::kernel("add port map"))
    }

    /// Removes several maps in one transaction: all of them, or (one missing element,
    /// `ENOENT`) none. The kernel deletes elements by key; the target is not compared.
    ///
    /// A missing element is an error ([`NftError::is_not_found`]): the caller deletes
    /// only what it believes is there, so "not there" means the kernel drifted from the
    /// database and a reconcile is due.
    pub async fn remove_all(&self, rules: &[PortRule]) -> Result<(), NftError> {
        let allow_count: usize = rules.iter().map(|r| r.allow_from.networks().len()).sum();
        self.ensure_send_buffer(
            BATCH_OVERHEAD_BYTES + (rules.len() * 4 + allow_count) * ELEMENT_WIRE_BYTES,
        )?;
        let refs: Vec<&PortRule> = rules.iter().collect();
        with_elements(self.conn.transaction(), &refs, Op::Delete)
            .commit(&self.conn)
            .await
            .map_err(NftError::kernel("remove port maps"))
    }

    /// Deletes `old` and adds `new` in one transaction: traffic switches target (or
    /// allow-list) atomically, and if either half is refused nothing changes. The map's
    /// counters start again.
    pub async fn replace(&self, old: &PortRule, new: &PortRule) -> Result<(), NftError> {
        let tx = with_elements(self.conn.transaction(), &[old], Op::Delete);
        with_elements(tx, &[new], Op::Add)
            .commit(&self.conn)
            .await
            .map_err(NftError::kernel("replace port map"))
    }

    /// Every map's live counters, by protocol and listen port (one dump per counted
    /// set, not one call per map).
    pub async fn counters(&self) -> Result<BTreeMap<(Proto, u16), MapCounters>, NftError> {
        Ok(readback::read_counters(&self.conn)
            .await?
            .into_iter()
            .map(|(k, c)| (k, c.to_map()))
            .collect())
    }

    /// Deletes the agent's table; `false` if it was not there.
    pub async fn delete_table(&self) -> Result<bool, NftError> {
        self.conn
            .del_table_if_exists(TABLE, FAMILY)
            .await
            .map_err(NftError::kernel("delete table"))
    }

    /// Reads the agent's table back; `None` when it does not exist.
    pub async fn read(&self) -> Result<Option<KernelState>, NftError> {
        let tables = self
            .conn
            .list_tables_in(FAMILY)
            .await
            .map_err(NftError::kernel("list tables"))?;
        if !tables.iter().any(|t| t.name == TABLE) {
            return Ok(None);
        }

        let mut state = KernelState::default();
        readback::read_sets(&self.conn, &mut state).await?;
        self.check_chains(&mut state).await?;
        state.structure_ok = state.problems.is_empty();
        Ok(Some(state))
    }

    async fn check_chains(&self, state: &mut KernelState) -> Result<(), NftError> {
        let chains = self
            .conn
            .list_chains_in(TABLE, FAMILY)
            .await
            .map_err(NftError::kernel("list chains"))?;
        let rules = self
            .conn
            .list_rules(TABLE, FAMILY)
            .await
            .map_err(NftError::kernel("list rules"))?;
        let expected = ruleset::chains(&self.settings());

        for spec in &expected {
            let Some(info) = chains.iter().find(|c| c.name == spec.name) else {
                state
                    .problems
                    .push(format!("chain {} is missing", spec.name));
                continue;
            };
            if info.kind().as_ref() != Some(&spec.kind) {
                state.problems.push(format!(
                    "chain {} has the wrong hook, type, priority or policy",
                    spec.name
                ));
            }
            let found: Vec<&RuleInfo> = rules.iter().filter(|r| r.chain == spec.name).collect();
            for (i, want) in spec.rules.iter().enumerate() {
                match found.get(i) {
                    None => state.problems.push(format!(
                        "chain {}: rule `{}` is missing",
                        spec.name, want.nft
                    )),
                    Some(have) if have.expressions() != ruleset::decoded(&want.exprs) => {
                        state.problems.push(format!(
                            "chain {}: rule {} should be `{}`, found `{}`",
                            spec.name,
                            i + 1,
                            want.nft,
                            describe(have)
                        ))
                    }
                    Some(_) => {}
                }
            }
            for extra in found.iter().skip(spec.rules.len()) {
                state.problems.push(format!(
                    "chain {}: unexpected rule `{}`",
                    spec.name,
                    describe(extra)
                ));
            }
        }
        for extra in chains
            .iter()
            .filter(|c| !expected.iter().any(|e| e.name == c.name))
        {
            state
                .problems
                .push(format!("unexpected chain {} in the table", extra.name));
        }
        Ok(())
    }

    /// See [`forward`]: keeps `ct status dnat accept` first in libvirt's forward chains.
    pub async fn ensure_forward_accept(&self) -> Result<ForwardAcceptReport, NftError> {
        forward::ensure(&self.conn).await
    }

    /// Deletes every agent-tagged rule from libvirt's forward chains; how many went.
    /// What [`Nft::ensure_forward_accept`] would change, one line per chain.
    pub async fn forward_accept_drift(&self) -> Result<Vec<String>, NftError> {
        forward::drift(&self.conn).await
    }

    pub async fn remove_forward_accept(&self) -> Result<usize, NftError> {
        forward::remove(&self.conn).await
    }

    pub(super) fn ensure_send_buffer(&self, bytes: usize) -> Result<(), NftError> {
        use nix::sys::socket::{getsockopt, setsockopt, sockopt};
        let fd = self.conn.socket().as_fd();
        let current = getsockopt(&fd, sockopt::SndBuf)
            .map_err(|e| NftError::Socket(format!("SO_SNDBUF: {}", e.desc())))?;
        // getsockopt reports the doubled size the kernel keeps; setsockopt takes half.
        if current >= bytes {
            return Ok(());
        }
        // FORCE: the plain option is capped by net.core.wmem_max (~200 KiB), far below
        // what 30,000 elements need. The agent runs with CAP_NET_ADMIN anyway.
        setsockopt(&fd, sockopt::SndBufForce, &bytes)
            .map_err(|e| NftError::Socket(format!("SO_SNDBUFFORCE {bytes}: {}", e.desc())))
    }
}

/// A rule read back, for humans: nft syntax when nlink can print it, else its handle.
fn describe(rule: &RuleInfo) -> String {
    rule.nft_syntax_stateless()
        .unwrap_or_else(|| format!("handle {}", rule.handle))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Op {
    Add,
    Delete,
}

/// `tx` plus adding or deleting every element of `rules` in every set, grouped into one
/// message per set and protocol.
pub(super) fn with_elements(mut tx: Transaction, rules: &[&PortRule], op: Op) -> Transaction {
    for proto in Proto::ALL {
        let mine: Vec<&PortRule> = rules
            .iter()
            .copied()
            .filter(|r| r.map.proto == proto)
            .collect();
        if mine.is_empty() {
            continue;
        }
        for kind in sets::Kind::ALL {
            let set = sets::set(kind, proto);
            let elements = sets::elements(kind, &mine);
            for chunk in elements.chunks(ELEMENTS_PER_MESSAGE) {
                tx = match op {
                    Op::Add => tx.add_set_elements(&set, chunk),
                    Op::Delete => tx.del_set_elements(&set, chunk),
                };
            }
        }
    }
    tx
}
