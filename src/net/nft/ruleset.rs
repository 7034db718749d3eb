//! The agent-owned table, built as nlink values without touching the kernel.
//!
//! Rules are written as explicit expression lists rather than through nlink's
//! high-level matchers: the same list is both sent and used as the reference the
//! read-back compares against, so "structure_ok" means "byte-for-byte what we
//! would write", with no guessing about how a matcher lowers.

use ipnetwork::Ipv4Network;
use nlink::netlink::MessageBuilder;
use nlink::netlink::nftables::{
    BaseChain, Chain, ChainKind, CmpOp, CtDirection, CtKey, CtStatus, Expr, FibFlags, FibResult,
    LookupExpr, MasqExpr, MetaKey, NF_NAT_RANGE_MAP_IPS, NF_NAT_RANGE_PROTO_SPECIFIED,
    NFTA_NAT_FAMILY, NFTA_NAT_FLAGS, NFTA_NAT_REG_ADDR_MIN, NFTA_NAT_REG_PROTO_MIN, NFTA_NAT_TYPE,
    NatHook, NatType, PayloadBase, Policy, Priority, RawExpr, Register, Rule, RuleExpr, Verdict,
    parse_expressions, write_expressions,
};

use crate::model::Proto;

use super::settings::NatSettings;
pub use super::table::{
    ELEMENTS_PER_MESSAGE, FAMILY, IFNAMSIZ, RULE_TAG, TABLE, TCP_MAP, UDP_MAP, attrs_of,
    decode_element, element, map, map_name, map_value_type,
};

pub const CHAIN_PREROUTING: &str = "prerouting";
pub const CHAIN_OUTPUT: &str = "output";
pub const CHAIN_FORWARD: &str = "forward";
pub const CHAIN_POSTROUTING: &str = "postrouting";
pub const CHAIN_ANTISPOOF: &str = "antispoof";

/// `dstnat` (-100): after conntrack (-200), where nft puts DNAT.
pub const PRIORITY_PREROUTING: Priority = Priority::DstNat;
/// -100 on output, so locally generated connections to mapped ports (hairpin from the
/// node itself) are translated like forwarded ones.
pub const PRIORITY_OUTPUT: Priority = Priority::Custom(-100);
pub const PRIORITY_FORWARD: Priority = Priority::Filter;
/// `srcnat` (100): last, once routing has picked the output interface.
pub const PRIORITY_POSTROUTING: Priority = Priority::SrcNat;

/// `raw` (-300): before conntrack, so a forged packet never creates a connection.
pub const PRIORITY_ANTISPOOF: Priority = Priority::Raw;

/// `RTN_LOCAL`, the fib address type of addresses configured on this node.
const RTN_LOCAL: u32 = 2;
/// `NFPROTO_IPV4`, the family the NAT expression rewrites.
const NFPROTO_IPV4: u32 = 2;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
/// Offset of the destination port in both TCP and UDP headers.
const L4_DPORT_OFFSET: u32 = 2;
const IPV4_SADDR_OFFSET: u32 = 12;
const IPV4_DADDR_OFFSET: u32 = 16;

fn l4proto(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => IPPROTO_TCP,
        Proto::Udp => IPPROTO_UDP,
    }
}

/// One base chain of the table: name, what it hooks, and the rules it must hold.
pub struct ChainSpec {
    pub name: &'static str,
    pub kind: ChainKind,
    pub rules: Vec<RuleSpec>,
}

/// A rule as the agent writes it: the nft syntax it stands for (for humans, in
/// drift reports) and the exact expressions.
pub struct RuleSpec {
    pub nft: String,
    pub exprs: Vec<Expr>,
}

impl RuleSpec {
    pub fn to_rule(&self, chain: &str) -> Rule {
        Rule::new(TABLE, chain)
            .family(FAMILY)
            .expressions(self.exprs.clone())
            .comment(RULE_TAG)
    }
}

fn nat_chain(hook: NatHook, priority: Priority) -> ChainKind {
    ChainKind::Base(BaseChain::nat(hook, priority).policy(Policy::Accept))
}

pub fn chain(spec: &ChainSpec) -> Result<Chain, nlink::Error> {
    let ChainKind::Base(base) = &spec.kind else {
        return Err(nlink::Error::invalid_message(format!(
            "chain {} must be a base chain",
            spec.name
        )));
    };
    Ok(Chain::new(TABLE, spec.name)?
        .family(FAMILY)
        .base(base.clone()))
}

/// Every chain of the table, in the order they are created, with their rules.
pub fn chains(settings: &NatSettings) -> Vec<ChainSpec> {
    // Per protocol: the allow-list's drop, then the DNAT it guards.
    let dnat_rules = |skip_loopback: bool| -> Vec<RuleSpec> {
        Proto::ALL
            .iter()
            .flat_map(|p| {
                [
                    allow_drop_rule(*p, skip_loopback),
                    dnat_rule(*p, skip_loopback),
                ]
            })
            .collect()
    };
    vec![
        ChainSpec {
            name: CHAIN_PREROUTING,
            kind: nat_chain(NatHook::Prerouting, PRIORITY_PREROUTING),
            rules: dnat_rules(false),
        },
        ChainSpec {
            name: CHAIN_OUTPUT,
            kind: nat_chain(NatHook::Output, PRIORITY_OUTPUT),
            rules: dnat_rules(true),
        },
        ChainSpec {
            name: CHAIN_FORWARD,
            kind: ChainKind::Base(
                BaseChain::filter(
                    nlink::netlink::nftables::FilterHook::Forward,
                    PRIORITY_FORWARD,
                )
                .policy(Policy::Accept),
            ),
            rules: vec![
                flow_count_rule(Proto::Tcp),
                flow_count_rule(Proto::Udp),
                ct_dnat_accept_rule(),
            ],
        },
        ChainSpec {
            name: CHAIN_POSTROUTING,
            kind: nat_chain(NatHook::Postrouting, PRIORITY_POSTROUTING),
            rules: postrouting_rules(settings),
        },
        ChainSpec {
            name: CHAIN_ANTISPOOF,
            kind: ChainKind::Base(
                BaseChain::filter(
                    nlink::netlink::nftables::FilterHook::Prerouting,
                    PRIORITY_ANTISPOOF,
                )
                .policy(Policy::Accept),
            ),
            rules: antispoof_rules(settings),
        },
    ]
}

/// `iifname != "<wg_iface>" ip saddr <net> drop`, one per controller network.
///
/// The API trusts the controller's tunnel address without a token; WireGuard
/// authenticates that address only on the tunnel, so the same source arriving through
/// any other interface is forged and never reaches a socket.
fn antispoof_rules(s: &NatSettings) -> Vec<RuleSpec> {
    let Some(wg) = &s.wg_iface else {
        return Vec::new();
    };
    s.tunnel_sources
        .iter()
        .map(|net| {
            let mut exprs = ifname(MetaKey::IifName, CmpOp::Neq, wg);
            exprs.extend(ip_addr_in(IPV4_SADDR_OFFSET, CmpOp::Eq, *net));
            exprs.push(Expr::Verdict(Verdict::Drop));
            RuleSpec {
                nft: format!("iifname != \"{wg}\" ip saddr {net} drop"),
                exprs,
            }
        })
        .collect()
}

/// `[ip daddr != 127.0.0.0/8] fib daddr type local meta l4proto <p> dnat ip to <p> dport map @<p>_ports`
///
/// One lookup per protocol, whatever the number of maps. The lookup writes
/// `ipv4_addr . inet_service` into R0: the address in its first 32-bit word and the
/// port in the second, which is where the NAT expression reads them.
///
/// In output, loopback destinations are left alone: a node-local service on
/// 127.0.0.1:<port> stays reachable, and a DNAT'd packet with a 127/8 source would be
/// dropped as martian on the VM bridge anyway (route_localnet is off).
fn dnat_rule(proto: Proto, skip_loopback: bool) -> RuleSpec {
    let map = map_name(proto);
    let mut exprs = Vec::new();
    if skip_loopback {
        exprs.extend(ip_addr_in(IPV4_DADDR_OFFSET, CmpOp::Neq, loopback_net()));
    }
    exprs.extend(fib_daddr_local());
    exprs.extend(l4proto_is(proto));
    exprs.extend([
        Expr::Payload {
            dreg: Register::R0,
            base: PayloadBase::Transport,
            offset: L4_DPORT_OFFSET,
            len: 2,
        },
        LookupExpr::new(map, Register::R0).dreg(Register::R0).into(),
        dnat_from_registers(Register::R0, Register::Reg32_01),
    ]);
    RuleSpec {
        nft: format!(
            "{}fib daddr type local meta l4proto {proto} dnat ip to {proto} dport map @{map}",
            if skip_loopback {
                "ip daddr != 127.0.0.0/8 "
            } else {
                ""
            }
        ),
        exprs,
    }
}

/// `[ip daddr != 127.0.0.0/8] meta l4proto <p> <p> dport @<p>_restricted fib daddr type local
/// <p> dport . ip saddr != @<p>_allow <p> dport @<p>_drops drop`
///
/// Before the DNAT, in the same NAT chain, so only a connection's first packet pays it
/// and a refused one is never translated. A port without an allow-list leaves at the
/// first lookup (one hash miss); a restricted one adds one interval lookup of
/// `port . source`; only a refused packet reaches `@<p>_drops`, whose element counter
/// is the map's drop count.
fn allow_drop_rule(proto: Proto, skip_loopback: bool) -> RuleSpec {
    use super::sets::{Kind, name};
    let (restricted, allow, drops) = (
        name(Kind::Restricted, proto),
        name(Kind::Allow, proto),
        name(Kind::Drops, proto),
    );
    let mut exprs = Vec::new();
    if skip_loopback {
        exprs.extend(ip_addr_in(IPV4_DADDR_OFFSET, CmpOp::Neq, loopback_net()));
    }
    exprs.extend(l4proto_is(proto));
    exprs.extend([
        dport_to_r0(),
        LookupExpr::new(restricted, Register::R0).into(),
    ]);
    exprs.extend(fib_daddr_local_in(Register::R1));
    exprs.extend([
        // R0 = dport (word 0, zero-padded) . saddr (word 1)
        Expr::Payload {
            dreg: Register::Reg32_01,
            base: PayloadBase::Network,
            offset: IPV4_SADDR_OFFSET,
            len: 4,
        },
        LookupExpr::new(allow, Register::R0).invert().into(),
        LookupExpr::new(drops, Register::R0).into(),
        Expr::Verdict(Verdict::Drop),
    ]);
    RuleSpec {
        nft: format!(
            "{}meta l4proto {proto} {proto} dport @{restricted} fib daddr type local \
             {proto} dport . ip saddr != @{allow} {proto} dport @{drops} drop",
            if skip_loopback {
                "ip daddr != 127.0.0.0/8 "
            } else {
                ""
            }
        ),
        exprs,
    }
}

/// `ct status dnat meta l4proto <p> ct original proto-dst @<p>_flows`
///
/// Every forwarded packet of a DNAT'd connection, both directions: the original
/// destination port is the listen port, and the lookup that matches updates that map's
/// element counter (packets and bytes of the whole flow). No verdict: the accept follows.
fn flow_count_rule(proto: Proto) -> RuleSpec {
    let flows = super::sets::name(super::sets::Kind::Flows, proto);
    let mut exprs = ct_status_dnat();
    exprs.extend(l4proto_is(proto));
    exprs.extend([
        Expr::CtDirectional {
            dreg: Register::R0,
            key: CtKey::ProtoDst,
            direction: CtDirection::Original,
        },
        LookupExpr::new(flows, Register::R0).into(),
    ]);
    RuleSpec {
        nft: format!("ct status dnat meta l4proto {proto} ct original proto-dst @{flows}"),
        exprs,
    }
}

/// `meta l4proto <p>`
fn l4proto_is(proto: Proto) -> [Expr; 2] {
    [
        Expr::Meta {
            dreg: Register::R0,
            key: MetaKey::L4Proto,
        },
        Expr::Cmp {
            sreg: Register::R0,
            op: CmpOp::Eq,
            data: vec![l4proto(proto)],
        },
    ]
}

/// `th dport` into R0's first word (the rest of the word zeroed by the kernel).
fn dport_to_r0() -> Expr {
    Expr::Payload {
        dreg: Register::R0,
        base: PayloadBase::Transport,
        offset: L4_DPORT_OFFSET,
        len: 2,
    }
}

/// 127.0.0.0/8, the loopback network.
fn loopback_net() -> Ipv4Network {
    Ipv4Network::new_checked(std::net::Ipv4Addr::new(127, 0, 0, 0), 8)
        .unwrap_or_else(|| unreachable!("127.0.0.0/8 is a valid network"))
}

fn fib_daddr_local() -> Vec<Expr> {
    fib_daddr_local_in(Register::R0)
}

/// `fib daddr type local`, its result in `reg` (R1 where R0 holds a key being built).
fn fib_daddr_local_in(reg: Register) -> Vec<Expr> {
    vec![
        Expr::Fib {
            dreg: reg,
            result: FibResult::AddrType,
            flags: FibFlags::DADDR,
        },
        Expr::Cmp {
            sreg: reg,
            op: CmpOp::Eq,
            data: RTN_LOCAL.to_ne_bytes().to_vec(),
        },
    ]
}

/// `dnat ip to <addr reg>:<port reg>`, register form.
///
/// nlink 0.33 only builds NAT from immediates (`NatRegs` is `#[non_exhaustive]`
/// with no constructor), so the expression is written raw. The flags are sent
/// although the kernel would infer them, because the kernel always dumps them and
/// the read-back compares what we send with what it dumps.
fn dnat_from_registers(addr: Register, port: Register) -> Expr {
    let mut b = MessageBuilder::new(0, 0);
    b.append_attr_u32_be(NFTA_NAT_TYPE, NatType::Dnat as u32);
    b.append_attr_u32_be(NFTA_NAT_FAMILY, NFPROTO_IPV4);
    b.append_attr_u32_be(NFTA_NAT_REG_ADDR_MIN, addr.wire());
    b.append_attr_u32_be(NFTA_NAT_REG_PROTO_MIN, port.wire());
    b.append_attr_u32_be(
        NFTA_NAT_FLAGS,
        NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED,
    );
    RawExpr::new("nat", attrs_of(b)).into()
}

/// `ct status dnat accept`
///
/// Also the rule kept at the head of libvirt's forward chains, see `forward.rs`.
pub fn ct_dnat_accept_rule() -> RuleSpec {
    let mut exprs = ct_status_dnat();
    exprs.push(Expr::Verdict(Verdict::Accept));
    RuleSpec {
        nft: "ct status dnat accept".into(),
        exprs,
    }
}

fn ct_status_dnat() -> Vec<Expr> {
    vec![
        Expr::Ct {
            dreg: Register::R0,
            key: CtKey::Status,
        },
        Expr::Bitwise {
            sreg: Register::R0,
            dreg: Register::R0,
            len: 4,
            mask: CtStatus::DST_NAT.bits().to_ne_bytes().to_vec(),
            xor: 0u32.to_ne_bytes().to_vec(),
        },
        Expr::Cmp {
            sreg: Register::R0,
            op: CmpOp::Neq,
            data: 0u32.to_ne_bytes().to_vec(),
        },
    ]
}

fn oifname(op: CmpOp, name: &str) -> Vec<Expr> {
    ifname(MetaKey::OifName, op, name)
}

fn ifname(key: MetaKey, op: CmpOp, name: &str) -> Vec<Expr> {
    let mut data = name.as_bytes().to_vec();
    data.resize(IFNAMSIZ, 0);
    vec![
        Expr::Meta {
            dreg: Register::R0,
            key,
        },
        Expr::Cmp {
            sreg: Register::R0,
            op,
            data,
        },
    ]
}

/// `ip saddr|daddr [!=] <net>`
fn ip_addr_in(offset: u32, op: CmpOp, net: Ipv4Network) -> Vec<Expr> {
    let mut exprs = vec![Expr::Payload {
        dreg: Register::R0,
        base: PayloadBase::Network,
        offset,
        len: 4,
    }];
    if net.prefix() < 32 {
        exprs.push(Expr::Bitwise {
            sreg: Register::R0,
            dreg: Register::R0,
            len: 4,
            mask: net.mask().octets().to_vec(),
            xor: vec![0; 4],
        });
    }
    exprs.push(Expr::Cmp {
        sreg: Register::R0,
        op,
        data: net.network().octets().to_vec(),
    });
    exprs
}

fn masquerade() -> Expr {
    MasqExpr::new().into()
}

fn postrouting_rules(s: &NatSettings) -> Vec<RuleSpec> {
    let mut rules = Vec::new();

    // ct status dnat oifname "<vms_bridge>" masquerade
    //
    // Replies from a VM must come back through the node to be un-DNAT'd; making
    // the node the source guarantees it, also for VM -> node -> VM hairpin.
    let mut exprs = ct_status_dnat();
    exprs.extend(oifname(CmpOp::Eq, &s.vms_bridge));
    exprs.push(masquerade());
    rules.push(RuleSpec {
        nft: format!("ct status dnat oifname \"{}\" masquerade", s.vms_bridge),
        exprs,
    });

    // oifname "<wg_iface>" masquerade
    //
    // Multi-hop proxy chains: the next node answers to this node's tunnel address.
    if let Some(wg) = &s.wg_iface {
        let mut exprs = oifname(CmpOp::Eq, wg);
        exprs.push(masquerade());
        rules.push(RuleSpec {
            nft: format!("oifname \"{wg}\" masquerade"),
            exprs,
        });
    }

    // ip saddr <vm_subnet> ip daddr != <vm_subnet> oifname "<external_iface>" masquerade
    // or, without a known external interface:
    // ip saddr <vm_subnet> ip daddr != <vm_subnet> oifname != "<vms_bridge>" masquerade
    //
    // VM internet egress.
    let subnet = s.vm_subnet;
    let mut exprs = ip_addr_in(IPV4_SADDR_OFFSET, CmpOp::Eq, subnet);
    exprs.extend(ip_addr_in(IPV4_DADDR_OFFSET, CmpOp::Neq, subnet));
    let oif = match &s.external_iface {
        Some(ext) => {
            exprs.extend(oifname(CmpOp::Eq, ext));
            format!("oifname \"{ext}\"")
        }
        None => {
            exprs.extend(oifname(CmpOp::Neq, &s.vms_bridge));
            format!("oifname != \"{}\"", s.vms_bridge)
        }
    };
    exprs.push(masquerade());
    rules.push(RuleSpec {
        nft: format!("ip saddr {subnet} ip daddr != {subnet} {oif} masquerade"),
        exprs,
    });

    rules
}

/// `exprs` as the kernel's dump of them decodes, for comparing with a rule read back.
pub fn decoded(exprs: &[Expr]) -> Vec<RuleExpr> {
    let mut b = MessageBuilder::new(0, 0);
    write_expressions(&mut b, exprs);
    let attrs = attrs_of(b);
    // write_expressions wraps the list in one NFTA_RULE_EXPRESSIONS nest; the dump's
    // expression bytes are that nest's payload.
    parse_expressions(attrs.get(4..).unwrap_or_default())
}

#[cfg(test)]
#[path = "ruleset_tests.rs"]
mod tests;
