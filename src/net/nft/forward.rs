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
//! The agent keeps exactly one rule, tagged [`RULE_TAG`], at the head of whichever of
//! these chains exist, and touches nothing else there. Each chain gets the form its
//! readers understand:
//!
//! - `ip filter FORWARD` is read by every iptables-nft user on the node (libvirt 9,
//!   Docker, ufw, fail2ban), and iptables-nft refuses a whole chain holding a rule it
//!   cannot parse. There the rule is iptables' own encoding of
//!   `-m conntrack --ctstate DNAT -m comment --comment node-vm-agent -j ACCEPT`
//!   (xtables matches through nft_compat, the tag in the comment match, see `xt.rs`),
//!   so `iptables -L` / `iptables-save` show it and libvirt can restart its networks.
//! - `ip libvirt_network forward` is read only by nft (libvirt replaces its table
//!   without parsing it), so the rule stays native, `ct status dnat accept` with the
//!   tag as the nft comment: no dependency on nft_compat where nothing needs it.
//!
//! A tagged rule in the other form (the native one that agents before the iptables
//! form wrote into `ip filter FORWARD`) is ours but not right: the next reconcile puts
//! the right one at the head and deletes it, in one transaction.
//!
//! If the kernel refuses the xtables matches (no nft_compat, xt_conntrack or
//! xt_comment), the insert fails with an error saying so, and the native form is not
//! written instead: it would break every iptables user of the chain. The libvirt 9
//! reject that the accept has to beat is itself written with `-m conntrack`, so where
//! it exists the matches are available.

use std::fmt;

use nlink::netlink::message::NLM_F_CREATE;
use nlink::netlink::nftables::{
    Expr, NFT_MSG_NEWRULE, NFTA_RULE_CHAIN, NFTA_RULE_TABLE, NFTA_RULE_USERDATA, RawMessage,
    RuleExpr, RuleInfo, write_expressions,
};
use nlink::netlink::{Connection, MessageBuilder, Nftables};

use super::error::NftError;
use super::ruleset;
use super::table::{FAMILY, RULE_TAG};
use super::xt;

/// How our accept is encoded in one chain (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// iptables-nft's own encoding, for the table iptables-nft reads.
    Iptables,
    /// Native nft expressions, the tag in the rule's userdata comment.
    Native,
}

/// The chains that may hold libvirt's forward rejects, as (table, base chain), and the
/// form our accept takes in each.
const LIBVIRT_FORWARD_CHAINS: [(&str, &str, Form); 2] = [
    ("filter", "FORWARD", Form::Iptables),
    ("libvirt_network", "forward", Form::Native),
];

impl Form {
    fn exprs(self) -> Vec<Expr> {
        match self {
            Form::Iptables => xt::dnat_accept_rule(),
            Form::Native => ruleset::ct_dnat_accept_rule().exprs,
        }
    }

    /// The rule as its chain's own tool would print it, for drift reports.
    fn describe(self) -> &'static str {
        match self {
            Form::Iptables => "-m conntrack --ctstate DNAT -j ACCEPT",
            Form::Native => "ct status dnat accept",
        }
    }

    /// What the kernel refused, in words an operator can act on.
    fn insert_op(self) -> &'static str {
        match self {
            Form::Iptables => {
                "insert the iptables-nft form of the forward accept \
                 (the kernel needs nft_compat with xt_conntrack and xt_comment)"
            }
            Form::Native => "insert forward accept",
        }
    }
}

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

/// Tagged by us, in either form: as the nft comment, or in an iptables comment match.
fn is_ours(rule: &RuleInfo, exprs: &[RuleExpr]) -> bool {
    rule.comment_text.as_deref() == Some(RULE_TAG)
        || xt::comment_of(exprs).as_deref() == Some(RULE_TAG)
}

/// The same expressions, a counter's live packets and bytes aside.
fn same_body(got: &[RuleExpr], want: &[RuleExpr]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| match (g, w) {
            (RuleExpr::Counter { .. }, RuleExpr::Counter { .. }) => true,
            _ => g == w,
        })
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

/// `iptables -I <chain> -m conntrack --ctstate DNAT -m comment --comment node-vm-agent
/// -j ACCEPT`, or `insert rule ip <table> <chain> ct status dnat accept comment
/// "node-vm-agent"`, by [`Form`].
///
/// nlink's `Transaction::add_rule` always appends (`NLM_F_APPEND`) and its
/// insert-before is crate-private, so the NEWRULE goes raw: without `NLM_F_APPEND`
/// and without a position the kernel links the rule at the head of the chain.
fn insert_at_head(table: &str, chain: &str, form: Form) -> RawMessage {
    let mut b = MessageBuilder::new(0, 0);
    b.append_attr_str(NFTA_RULE_TABLE, table);
    b.append_attr_str(NFTA_RULE_CHAIN, chain);
    write_expressions(&mut b, &form.exprs());
    match form {
        Form::Iptables => xt::append_rule_compat(&mut b),
        Form::Native => {
            let mut udata = vec![NFTNL_UDATA_RULE_COMMENT, (RULE_TAG.len() + 1) as u8];
            udata.extend_from_slice(RULE_TAG.as_bytes());
            udata.push(0);
            b.append_attr(NFTA_RULE_USERDATA, &udata);
        }
    }
    RawMessage::new(NFT_MSG_NEWRULE, FAMILY)
        .flags(NLM_F_CREATE)
        .attrs(ruleset::attrs_of(b))
}

/// What one libvirt forward chain looks like from our side.
struct ChainCheck {
    table: &'static str,
    chain: &'static str,
    form: Form,
    /// Our accept is the chain's first rule, with the right body.
    first_is_good: bool,
    /// Tagged rules to delete: copies lower down, or a tagged rule someone changed.
    stale: Vec<u64>,
}

/// Reads every libvirt forward chain that exists; changes nothing.
async fn check(conn: &Connection<Nftables>) -> Result<Vec<ChainCheck>, NftError> {
    let mut out = Vec::new();
    for (table, chain, form) in LIBVIRT_FORWARD_CHAINS {
        let Some(rules) = chain_rules(conn, table, chain).await? else {
            continue;
        };
        let want = ruleset::decoded(&form.exprs());
        let ours: Vec<(usize, &RuleInfo, Vec<RuleExpr>)> = rules
            .iter()
            .enumerate()
            .map(|(i, r)| (i, r, r.expressions()))
            .filter(|(_, r, exprs)| is_ours(r, exprs))
            .collect();
        // A tagged rule in the other form (an older agent's) is not good: it is stale.
        let first_is_good = ours
            .first()
            .is_some_and(|(i, _, exprs)| *i == 0 && same_body(exprs, &want));
        let stale = ours
            .iter()
            .filter(|(i, _, _)| !(*i == 0 && first_is_good))
            .map(|(_, r, _)| r.handle)
            .collect();
        out.push(ChainCheck {
            table,
            chain,
            form,
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
                    String::new()
                } else {
                    format!("{} is not the first rule, ", c.form.describe())
                },
                c.stale.len()
            )
        })
        .collect())
}

/// Makes our accept the first rule of each libvirt forward chain that exists, and the
/// only tagged one. Idempotent: a second call finds everything fine and changes nothing.
/// A chain the kernel refuses does not keep the other one from being fixed (a kernel
/// without nft_compat, next to libvirt's nftables backend); all refusals are returned.
pub async fn ensure(conn: &Connection<Nftables>) -> Result<ForwardAcceptReport, NftError> {
    let mut report = ForwardAcceptReport::default();
    let mut errors = Vec::new();
    for ChainCheck {
        table,
        chain,
        form,
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
            tx = tx.raw(insert_at_head(table, chain, form));
        }
        for handle in &stale {
            tx = tx.del_rule(table, chain, FAMILY, *handle);
        }
        let op = if first_is_good {
            "remove stale forward accepts"
        } else {
            form.insert_op()
        };
        if let Err(source) = tx.commit(conn).await {
            errors.push(NftError::Kernel { op, source });
            continue;
        }
        tracing::info!(
            table,
            chain,
            inserted = !first_is_good,
            removed_stale = stale.len(),
            rule = form.describe(),
            "forward accept placed ahead of libvirt's forward rejects"
        );
        report.touched.push(ForwardChainOutcome {
            chain: name,
            inserted: !first_is_good,
            removed_stale: stale.len(),
        });
    }
    match errors.len() {
        0 => Ok(report),
        1 => Err(errors.remove(0)),
        _ => Err(NftError::Several(errors)),
    }
}

/// Deletes every tagged rule from the libvirt forward chains. Goes on after a failure
/// and reports all of them together; returns how many rules were deleted.
pub async fn remove(conn: &Connection<Nftables>) -> Result<usize, NftError> {
    let mut removed = 0;
    let mut errors = Vec::new();
    for (table, chain, _) in LIBVIRT_FORWARD_CHAINS {
        let rules = match chain_rules(conn, table, chain).await {
            Ok(Some(rules)) => rules,
            Ok(None) => continue,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        for r in rules.iter().filter(|r| is_ours(r, &r.expressions())) {
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
