//! Our forward accept in iptables-nft's own encoding, for the one chain iptables reads.
//!
//! `ip filter FORWARD` belongs to iptables-nft (libvirt 9, Docker, ufw, fail2ban).
//! iptables-nft parses every rule of a chain it lists or changes, and refuses the whole
//! chain when one rule is made of expressions it does not know (`chain 'FORWARD' in
//! table 'filter' is incompatible, use 'nft' tool`): a native `ct status dnat accept`
//! there breaks `iptables -L`, `iptables-save` and libvirt's `net-start`. So in that
//! chain the accept is written byte for byte as iptables-nft 1.8.9 (Debian 12) writes
//!
//! ```text
//! iptables -I FORWARD -m conntrack --ctstate DNAT -m comment --comment node-vm-agent -j ACCEPT
//! ```
//!
//! which `nft --debug=netlink list ruleset` shows as
//!
//! ```text
//! [ match name conntrack rev 3 ]     info: struct xt_conntrack_mtinfo3, 168 bytes
//! [ match name comment rev 0 ]       info: struct xt_comment_info, 256 bytes
//! [ counter pkts 0 bytes 0 ]
//! [ immediate reg 0 accept ]
//! ```
//!
//! with `NFTA_RULE_COMPAT { proto 0, flags 0 }` on the NEWRULE and no rule userdata:
//! iptables 1.8.9 keeps the comment in the `comment` match, not in userdata. The
//! `match` expressions run the kernel's xtables matches through nft_compat, which
//! iptables-nft needs for libvirt's own `-m conntrack` rules anyway. The bytes were
//! taken from iptables 1.8.9's NEWRULE (`strace -e write=`); the unit tests below
//! compare against them, and `tests/net_kernel.rs` against iptables itself.

use nlink::netlink::nftables::{Expr, RawExpr, RuleExpr, Verdict};
use nlink::netlink::{AttrIter, MessageBuilder};

use super::table::{RULE_TAG, attrs_of};

/// `NFTA_MATCH_*` (linux/netfilter/nf_tables_compat.h).
const NFTA_MATCH_NAME: u16 = 1;
const NFTA_MATCH_REV: u16 = 2;
const NFTA_MATCH_INFO: u16 = 3;

/// `NFTA_RULE_COMPAT` and its `NFTA_RULE_COMPAT_*` (linux/netfilter/nf_tables.h).
pub const NFTA_RULE_COMPAT: u16 = 5;
const NFTA_RULE_COMPAT_PROTO: u16 = 1;
const NFTA_RULE_COMPAT_FLAGS: u16 = 2;

/// The revision iptables 1.8.9 picks for `-m conntrack` on any kernel since 2.6.3x.
const CONNTRACK_REVISION: u32 = 3;
const COMMENT_REVISION: u32 = 0;

/// `XT_ALIGN(sizeof(struct xt_conntrack_mtinfo3))`: 8 address/mask pairs of 16 bytes,
/// two u32 expiry bounds, then fourteen u16 (l4proto, four ports, match_flags,
/// invert_flags, state_mask, status_mask, four high ports) = 162, padded to 168.
const CONNTRACK_INFO_LEN: usize = 168;
const CONNTRACK_MATCH_FLAGS_AT: usize = 146;
const CONNTRACK_STATE_MASK_AT: usize = 150;
/// `XT_CONNTRACK_STATE`: only `--ctstate` is matched.
const XT_CONNTRACK_STATE: u16 = 1 << 0;
/// `XT_CONNTRACK_STATE_DNAT` = `1 << (IP_CT_NUMBER + 2)`, IP_CT_NUMBER being 5; the
/// kernel tests it as `ct->status & IPS_DST_NAT`, i.e. nft's `ct status dnat`.
const XT_CONNTRACK_STATE_DNAT: u16 = 1 << 7;

/// `sizeof(struct xt_comment_info)`: `char comment[XT_MAX_COMMENT_LEN]`.
const COMMENT_INFO_LEN: usize = 256;

/// `-m conntrack --ctstate DNAT -m comment --comment node-vm-agent -j ACCEPT`
pub fn dnat_accept_rule() -> Vec<Expr> {
    vec![
        xt_match("conntrack", CONNTRACK_REVISION, &conntrack_dnat_info()),
        xt_match("comment", COMMENT_REVISION, &comment_info(RULE_TAG)),
        Expr::Counter,
        Expr::Verdict(Verdict::Accept),
    ]
}

/// iptables' `NFTA_RULE_COMPAT`: layer-4 protocol 0 (no `-p`), no inversion. The
/// kernel hands it to the matches' checks and does not keep it, so it never shows in
/// a dump; sent anyway so our NEWRULE is iptables' own.
pub fn append_rule_compat(b: &mut MessageBuilder) {
    let nest = b.nest_start(NFTA_RULE_COMPAT);
    b.append_attr_u32_be(NFTA_RULE_COMPAT_PROTO, 0);
    b.append_attr_u32_be(NFTA_RULE_COMPAT_FLAGS, 0);
    b.nest_end(nest);
}

/// The text of a rule's `-m comment` match, if it has one: how iptables-nft tags a rule.
pub fn comment_of(exprs: &[RuleExpr]) -> Option<String> {
    exprs.iter().find_map(|e| match e {
        RuleExpr::Unknown { name, data, .. } if name == "match" => {
            let mut is_comment = false;
            let mut info = None;
            for (kind, payload) in AttrIter::new(data) {
                match kind {
                    NFTA_MATCH_NAME => {
                        is_comment = payload.split(|b| *b == 0).next() == Some(b"comment")
                    }
                    NFTA_MATCH_INFO => info = Some(payload),
                    _ => {}
                }
            }
            let info = info.filter(|_| is_comment)?;
            let text = info.split(|b| *b == 0).next().unwrap_or_default();
            Some(String::from_utf8_lossy(text).into_owned())
        }
        _ => None,
    })
}

fn xt_match(name: &str, revision: u32, info: &[u8]) -> Expr {
    let mut b = MessageBuilder::new(0, 0);
    b.append_attr_str(NFTA_MATCH_NAME, name);
    b.append_attr_u32_be(NFTA_MATCH_REV, revision);
    b.append_attr(NFTA_MATCH_INFO, info);
    RawExpr::new("match", attrs_of(b)).into()
}

/// `struct xt_conntrack_mtinfo3` for `--ctstate DNAT`; its fields are host-endian.
fn conntrack_dnat_info() -> [u8; CONNTRACK_INFO_LEN] {
    let mut info = [0u8; CONNTRACK_INFO_LEN];
    info[CONNTRACK_MATCH_FLAGS_AT..CONNTRACK_MATCH_FLAGS_AT + 2]
        .copy_from_slice(&XT_CONNTRACK_STATE.to_ne_bytes());
    info[CONNTRACK_STATE_MASK_AT..CONNTRACK_STATE_MASK_AT + 2]
        .copy_from_slice(&XT_CONNTRACK_STATE_DNAT.to_ne_bytes());
    info
}

/// `struct xt_comment_info`: the text, NUL-padded; cut to 255 bytes as iptables does.
fn comment_info(text: &str) -> [u8; COMMENT_INFO_LEN] {
    let mut info = [0u8; COMMENT_INFO_LEN];
    let bytes = text.as_bytes();
    let n = bytes.len().min(COMMENT_INFO_LEN - 1);
    info[..n].copy_from_slice(&bytes[..n]);
    info
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use nlink::netlink::nftables::{
        NFTA_RULE_CHAIN, NFTA_RULE_TABLE, parse_expressions, write_expressions,
    };

    /// The attributes of the NEWRULE iptables-nft 1.8.9 sent for
    /// `iptables -I FORWARD -m conntrack --ctstate DNAT -m comment --comment
    /// node-vm-agent -j ACCEPT`, captured with `strace -e trace=sendmsg -e write=3`.
    fn iptables_1_8_9_newrule() -> Vec<u8> {
        let text = include_str!("testdata/iptables-1.8.9-newrule.hex");
        let hex: String = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(|l| l.split_whitespace())
            .collect();
        hex::decode(hex).unwrap()
    }

    fn our_newrule() -> Vec<u8> {
        let mut b = MessageBuilder::new(0, 0);
        b.append_attr_str(NFTA_RULE_TABLE, "filter");
        b.append_attr_str(NFTA_RULE_CHAIN, "FORWARD");
        write_expressions(&mut b, &dnat_accept_rule());
        append_rule_compat(&mut b);
        attrs_of(b)
    }

    #[test]
    fn newrule_is_byte_for_byte_iptables_1_8_9() {
        assert_eq!(
            hex::encode(our_newrule()),
            hex::encode(iptables_1_8_9_newrule())
        );
    }

    #[test]
    fn conntrack_info_sets_only_the_state_match() {
        let info = conntrack_dnat_info();
        let set: Vec<(usize, u8)> = info
            .iter()
            .enumerate()
            .filter(|(_, b)| **b != 0)
            .map(|(i, b)| (i, *b))
            .collect();
        if cfg!(target_endian = "little") {
            assert_eq!(set, [(146, 1), (150, 0x80)]);
        }
    }

    #[test]
    fn comment_reads_back_from_the_match() {
        let mut b = MessageBuilder::new(0, 0);
        write_expressions(&mut b, &dnat_accept_rule());
        let attrs = attrs_of(b);
        let exprs = parse_expressions(&attrs[4..]);
        assert_eq!(comment_of(&exprs).as_deref(), Some(RULE_TAG));
        // The conntrack match is not a comment, whatever its info holds.
        assert_eq!(comment_of(&exprs[..1]), None);
    }

    #[test]
    fn long_comments_keep_their_terminating_nul() {
        let info = comment_info(&"x".repeat(300));
        assert_eq!(info[254], b'x');
        assert_eq!(info[255], 0);
    }
}
