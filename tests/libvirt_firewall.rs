//! The agent next to a real libvirt's firewall: Debian 12's libvirt 9.0 writes its NAT
//! network's rules with iptables (iptables-nft) into `ip filter`, the table where the
//! agent keeps its forward accept. libvirtd runs inside the test topology's node
//! namespace (scripts/libvirt-netns.sh), the agent next to it. No guest is booted.
//!
//! libvirtd's control socket is machine-wide: the libvirt tests take turns
//! (`support::libvirt::turn`, a lock across test processes).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use support::libvirt::{URI, env, wait_until};
use support::netns::Netns;

/// Our accept as `iptables-save` prints it.
const OURS: &str =
    "-A FORWARD -m conntrack --ctstate DNAT -m comment --comment node-vm-agent -j ACCEPT";
/// libvirt 9's jumps from FORWARD to its private chains.
const LIBVIRT_JUMPS: [&str; 3] = [
    "-A FORWARD -j LIBVIRT_FWX",
    "-A FORWARD -j LIBVIRT_FWI",
    "-A FORWARD -j LIBVIRT_FWO",
];

fn ours_then_libvirt() -> Vec<String> {
    std::iter::once(OURS)
        .chain(LIBVIRT_JUMPS)
        .map(str::to_owned)
        .collect()
}

/// `iptables-save`'s FORWARD rules in `ns`; `Err` with what iptables printed when it
/// cannot read the table.
fn forward_rules(ns: &Netns) -> Result<Vec<String>, String> {
    let out = ns.exec(&["iptables-save", "-t", "filter"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || text.contains("incompatible") {
        return Err(format!("{text}{}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(text
        .lines()
        .filter(|l| l.starts_with("-A FORWARD "))
        .map(str::to_owned)
        .collect())
}

/// Polls (bounded by [`WAIT`]: a restarted libvirtd may be slow to rewrite its rules)
/// until `ns`'s FORWARD rules are `want`.
fn wait_for_forward(ns: &Netns, want: &[String], what: &str, log: impl Fn() -> String) {
    wait_until(
        &format!("FORWARD to hold the agent's accept first, {what}"),
        || forward_rules(ns).as_deref() == Ok(want),
        || {
            format!(
                "FORWARD is {:?}, want {want:?}\nagent log:\n{}",
                forward_rules(ns),
                log()
            )
        },
    );
}

/// `virsh` that must succeed; panics with libvirt's error otherwise.
fn virsh_ok(args: &[&str]) {
    let out = Command::new("virsh")
        .args(["-q", "-c", URI])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "virsh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn libvirt_restarts_its_network_next_to_the_agent_accept() {
    let _turn = support::libvirt::turn();
    let e = env(&[("RECONCILE_INTERVAL", "1")]);
    let node = &e.topo.node;
    let log = || e.agent.log();
    let reinserted = || {
        e.agent
            .sql(
                "select count(*) from audit_log where action = 'reconcile' \
                 and parameters like '%filter FORWARD%inserted%'",
            )
            .trim()
            .parse::<u32>()
            .unwrap()
    };

    // The agent's startup put its accept ahead of the jumps libvirt made when it started
    // its network; iptables reads the chain, ours included.
    wait_for_forward(node, &ours_then_libvirt(), "startup", log);
    let listed = node.exec_ok(&["iptables", "-L", "FORWARD", "-n"]);
    let first = listed.lines().nth(2).unwrap_or_default();
    assert!(
        first.starts_with("ACCEPT") && first.contains("ctstate DNAT /* node-vm-agent */"),
        "{listed}"
    );

    // Someone flushes FORWARD (a firewall reload): the agent puts its accept back alone.
    node.exec_ok(&["iptables", "-F", "FORWARD"]);
    wait_for_forward(node, &[OURS.to_owned()], "after a flush", log);

    // libvirtd restarts (a package upgrade, a reboot): with a network running it reads
    // the whole table with `iptables --list-rules` and inserts its missing jumps at the
    // head of FORWARD, ahead of ours; the agent's next reconcile puts ours first again.
    let before = reinserted();
    e.libvirtd.kill();
    e.libvirtd.revive();
    wait_for_forward(node, &ours_then_libvirt(), "after libvirtd restarted", log);
    assert!(reinserted() > before, "no reconcile re-inserted the accept");

    // And the network restarts: libvirt removes and re-adds its rules through iptables.
    virsh_ok(&["net-destroy", "default"]);
    virsh_ok(&["net-start", "default"]);
    let fwi = node.exec_ok(&["iptables", "-S", "LIBVIRT_FWI"]);
    assert!(fwi.contains("-o virbr0 -j REJECT"), "{fwi}");
    wait_for_forward(node, &ours_then_libvirt(), "after net-start", log);
    let (code, out) = e.agent.diff();
    assert_eq!(code, 0, "in sync, but diff said: {out}");
}
