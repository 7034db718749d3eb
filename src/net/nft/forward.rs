//! Letting DNAT'd connections past libvirt's forward rejects.
//!
//! libvirt's NAT network rejects new connections forwarded to its bridge from a
//! table of its own. An accept in our table cannot override that (every table's
//! hook sees the packet, and a reject anywhere wins), so the accept has to sit
//! ahead of the reject in libvirt's own forward chain:
//!
//! - libvirt 9 via iptables-nft: `ip filter FORWARD` jumps to `LIBVIRT_FWI`, which rejects;
//! - libvirt >= 10.4 nftables backend: `ip libvirt_network forward` calls `guest_input`.
//!
//! The agent keeps exactly one rule, tagged with [`RULE_TAG`] as its comment, at the
//! head of whichever of these chains exist, and touches nothing else there.

use std::fmt;

use nlink::netlink::message::NLM_F_CREATE;
use nlink::netlink::nftables::{
    NFT_MSG_NEWRULE, NFTA_RULE_CHAIN, NFTA_RULE_TABLE, NFTA_RULE_USERDATA, RawMessage, RuleInfo,
    write_expressions,
};
use nlink::netlink::{Connection, MessageBuilder, Nftables};

use super::NftError;
use super::ruleset::{self, FAMILY, RULE_TAG};

/// The chains that may hold libvirt's forward rejects, as (table, base chain).
pub const LIBVIRT_FORWARD_CHAINS: [(&str, &str); 2] =
    [("filter", "FORWARD"), ("libvirt_network", "forward")];

/// `NFTNL_UDATA_RULE_COMMENT`: libnftnl's TLV type for a rule comment, so `nft list`
/// shows ours as `comment "node-vm-agent"`.
const NFTNL_UDATA_RULE_COMMENT: u8 = 0;

/// What [`ensure`] did to one chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardChainOutcome {
    /// `filter FORWARD` or `libvirt_network forward` (family ip).
    pub chain: String,
    /// A fresh accept was inserted at the head.
    pub inserted: bool,
    /// Tagged copies deleted because they were not first (or not ours any more).
    pub removed_stale: usize,
}

/// What [`ensure`] found and did, per chain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardAcceptReport {
    /// Chains that were changed.
    pub touched: Vec<ForwardChainOutcome>,
    /// Chains that already had our accept first and no stale copies.
    pub already_fine: Vec<String>,
}

impl ForwardAcceptReport {
    pub fn changed(&self) -> bool {
        !self.touched.is_empty()
    }
}

impl fmt::Display for ForwardAcceptReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .touched
            .iter()
            .map(|o| {
                format!(
                    "ip {}: {}{} stale removed",
                    o.chain,
                    if o.inserted { "accept inserted, " } else { "" },
                    o.removed_stale
                )
            })
            .collect();
        parts.extend(
            self.already_fine
                .iter()
                .map(|c| format!("ip {c}: already fine")),
        );
        if parts.is_empty() {
            return f.write_str("no libvirt forward chain");
        }
        f.write_str(&parts.join("; "))
    }
}

fn is_ours(rule: &RuleInfo) -> bool {
    rule.comment_text.as_deref() == Some(RULE_TAG)
}

/// Our rules in `table`'s `chain`, in chain order; `None` if the chain is absent.
async fn chain_rules(
    conn: &Connection<Nftables>,
    table: &str,
    chain: &str,
) -> Result<Option<Vec<RuleInfo>>, NftError> {
    let tables = conn
        .list_tables_in(FAMILY)
        .await
        .map_err(NftError::kernel("list tables"))?;
    if !tables.iter().any(|t| t.name == table) {
        return Ok(None);
    }
    let chains = conn
        .list_chains_in(table, FAMILY)
        .await
        .map_err(NftError::kernel("list libvirt chains"))?;
    if !chains.iter().any(|c| c.name == chain) {
        return Ok(None);
    }
    let rules = conn
        .list_rules(table, FAMILY)
        .await
        .map_err(NftError::kernel("list libvirt rules"))?;
    // The dump lists each chain's rules in evaluation order.
    Ok(Some(
        rules.into_iter().filter(|r| r.chain == chain).collect(),
    ))
}

/// `insert rule ip <table> <chain> ct status dnat accept comment "node-vm-agent"`
///
/// nlink's `Transaction::add_rule` always appends (`NLM_F_APPEND`) and its
/// insert-before is crate-private, so the NEWRULE goes raw: without `NLM_F_APPEND`
/// and without a position the kernel links the rule at the head of the chain.
fn insert_at_head(table: &str, chain: &str) -> RawMessage {
    let mut b = MessageBuilder::new(0, 0);
    b.append_attr_str(NFTA_RULE_TABLE, table);
    b.append_attr_str(NFTA_RULE_CHAIN, chain);
    write_expressions(&mut b, &ruleset::ct_dnat_accept_rule().exprs);
    let mut udata = vec![NFTNL_UDATA_RULE_COMMENT, (RULE_TAG.len() + 1) as u8];
    udata.extend_from_slice(RULE_TAG.as_bytes());
    udata.push(0);
    b.append_attr(NFTA_RULE_USERDATA, &udata);
    RawMessage::new(NFT_MSG_NEWRULE, FAMILY)
        .flags(NLM_F_CREATE)
        .attrs(ruleset::attrs_of(b))
}

/// What one libvirt forward chain looks like from our side.
struct ChainCheck {
    table: &'static str,
    chain: &'static str,
    /// Our accept is the chain's first rule, with the right body.
    first_is_good: bool,
    /// Tagged rules to delete: copies lower down, or a tagged rule someone changed.
    stale: Vec<u64>,
}

/// Reads every libvirt forward chain that exists; changes nothing.
async fn check(conn: &Connection<Nftables>) -> Result<Vec<ChainCheck>, NftError> {
    let want = ruleset::decoded(&ruleset::ct_dnat_accept_rule().exprs);
    let mut out = Vec::new();
    for (table, chain) in LIBVIRT_FORWARD_CHAINS {
        let Some(rules) = chain_rules(conn, table, chain).await? else {
            continue;
        };
        let first_is_good = rules
            .first()
            .is_some_and(|r| is_ours(r) && r.expressions() == want);
        let stale = rules
            .iter()
            .enumerate()
            .filter(|(i, r)| is_ours(r) && !(*i == 0 && first_is_good))
            .map(|(_, r)| r.handle)
            .collect();
        out.push(ChainCheck {
            table,
            chain,
            first_is_good,
            stale,
        });
    }
    Ok(out)
}

/// What [`ensure`] would change, one line per chain; empty when nothing.
pub async fn drift(conn: &Connection<Nftables>) -> Result<Vec<String>, NftError> {
    Ok(check(conn)
        .await?
        .into_iter()
        .filter(|c| !c.first_is_good || !c.stale.is_empty())
        .map(|c| {
            format!(
                "ip {} {}: {}{} stale tagged rule(s)",
                c.table,
                c.chain,
                if c.first_is_good {
                    ""
                } else {
                    "ct status dnat accept is not the first rule, "
                },
                c.stale.len()
            )
        })
        .collect())
}

/// Makes our accept the first rule of each libvirt forward chain that exists, and the
/// only tagged one. Idempotent: a second call finds everything fine and changes nothing.
pub async fn ensure(conn: &Connection<Nftables>) -> Result<ForwardAcceptReport, NftError> {
    let mut report = ForwardAcceptReport::default();
    for ChainCheck {
        table,
        chain,
        first_is_good,
        stale,
    } in check(conn).await?
    {
        let name = format!("{table} {chain}");
        if first_is_good && stale.is_empty() {
            report.already_fine.push(name);
            continue;
        }
        // One transaction per chain, so the chain is never without the accept.
        let mut tx = conn.transaction();
        if !first_is_good {
            tx = tx.raw(insert_at_head(table, chain));
        }
        for handle in &stale {
            tx = tx.del_rule(table, chain, FAMILY, *handle);
        }
        tx.commit(conn)
            .await
            .map_err(NftError::kernel("insert forward accept"))?;
        tracing::info!(
            table,
            chain,
            inserted = !first_is_good,
            removed_stale = stale.len(),
            "ct status dnat accept placed ahead of libvirt's forward rejects"
        );
        report.touched.push(ForwardChainOutcome {
            chain: name,
            inserted: !first_is_good,
            removed_stale: stale.len(),
        });
    }
    Ok(report)
}

/// Deletes every tagged rule from the libvirt forward chains. Goes on after a failure
/// and reports all of them together; returns how many rules were deleted.
pub async fn remove(conn: &Connection<Nftables>) -> Result<usize, NftError> {
    let mut removed = 0;
    let mut errors = Vec::new();
    for (table, chain) in LIBVIRT_FORWARD_CHAINS {
        let rules = match chain_rules(conn, table, chain).await {
            Ok(Some(rules)) => rules,
            Ok(None) => continue,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for r in rules.iter().filter(|r| is_ours(r)) {
            match conn.del_rule(table, chain, FAMILY, r.handle).await {
                Ok(()) => removed += 1,
                Err(source) => errors.push(NftError::Kernel {
                    op: "remove forward accept",
                    source,
                }),
            }
        }
    }
    match errors.len() {
        0 => Ok(removed),
        1 => Err(errors.remove(0)),
        _ => Err(NftError::Several(errors)),
    }
}
