//! The nftables driver and the link helpers against the real kernel, each test in its
//! own network namespace (tests/kernel). Tests may run `ip` and `nft`; the agent never does.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nlink::netlink::{Connection, Nftables};
use node_vm_agent::model::{PortMap, PortRule, Proto};
use node_vm_agent::net::link;
use node_vm_agent::net::nft::*;
use support::netns::{Netns, in_private_netns, run, run_with_input};

const BRIDGE: &str = "vmbr-t";

fn settings() -> NatSettings {
    NatSettings {
        vms_bridge: BRIDGE.into(),
        vm_subnet: "10.200.2.0/24".parse().unwrap(),
        wg_iface: Some("wg-t".into()),
        external_iface: None,
        tunnel_sources: vec![],
    }
}

fn pm(proto: Proto, listen_port: u16, target_ip: [u8; 4], target_port: u16) -> PortMap {
    PortMap {
        proto,
        listen_port,
        target_ip: Ipv4Addr::from(target_ip),
        target_port,
    }
}

fn rules(maps: &[PortMap]) -> Vec<PortRule> {
    maps.iter().copied().map(PortRule::from).collect()
}

fn nft_json(args: &str) -> serde_json::Value {
    serde_json::from_str(&run(&format!("nft -j {args}"))).unwrap()
}

/// The rules of one chain of our table, as `nft -j` lists them.
fn listed_rules(chain: &str) -> Vec<serde_json::Value> {
    let v = nft_json(&format!("list chain ip {} {chain}", ruleset::TABLE));
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule").cloned())
        .collect()
}

#[test]
fn apply_read_and_nft_agree() {
    in_private_netns(|| async {
        let nft = Nft::new(settings()).unwrap();
        assert_eq!(nft.read().await.unwrap(), None);

        let maps = [
            pm(Proto::Tcp, 8080, [10, 200, 2, 10], 80),
            pm(Proto::Tcp, 2222, [10, 200, 2, 11], 22),
            pm(Proto::Udp, 5353, [10, 200, 2, 10], 53),
        ];
        nft.apply_all(&rules(&maps)).await.unwrap();

        let state = nft.read().await.unwrap().expect("table exists");
        assert!(state.structure_ok, "{:?}", state.problems);
        assert_eq!(state.maps, maps.iter().copied().collect::<BTreeSet<_>>());
        assert!(diff(&rules(&maps), Some(&state)).is_empty());

        // The nft CLI reads the same thing back.
        let text = run(&format!("nft list table ip {}", ruleset::TABLE));
        assert!(
            text.contains("type inet_service : ipv4_addr . inet_service"),
            "{text}"
        );
        // Every element carries its counter (connections).
        assert!(
            text.contains("8080 counter packets 0 bytes 0 : 10.200.2.10 . 80"),
            "{text}"
        );
        assert!(
            text.contains("5353 counter packets 0 bytes 0 : 10.200.2.10 . 53"),
            "{text}"
        );
        assert!(
            // nft elides `meta l4proto tcp`, implied by `tcp dport`.
            text.contains("fib daddr type local dnat ip to tcp dport map @tcp_ports"),
            "{text}"
        );
        assert!(
            text.contains("ct status dnat oifname \"vmbr-t\" masquerade"),
            "{text}"
        );
        assert!(text.contains("comment \"node-vm-agent\""), "{text}");
        let pre = listed_rules("prerouting");
        assert_eq!(
            pre.len(),
            4,
            "two rules (allow-list, DNAT) per protocol, not per port"
        );
        assert_eq!(listed_rules("output").len(), 4);
        assert_eq!(listed_rules("forward").len(), 3);
        assert_eq!(listed_rules("postrouting").len(), 3);
        let chains = nft_json(&format!("list table ip {}", ruleset::TABLE));
        let chain_of = |name: &str| {
            chains["nftables"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|o| o.get("chain").filter(|c| c["name"] == name).cloned())
                .unwrap()
        };
        assert_eq!(chain_of("prerouting")["hook"], "prerouting");
        assert_eq!(chain_of("prerouting")["prio"], -100);
        assert_eq!(chain_of("output")["prio"], -100);
        assert_eq!(chain_of("postrouting")["prio"], 100);
        assert_eq!(chain_of("forward")["type"], "filter");
    });
}

#[test]
fn apply_twice_and_single_element_changes() {
    in_private_netns(|| async {
        let nft = Nft::new(settings()).unwrap();
        let a = pm(Proto::Tcp, 8080, [10, 200, 2, 10], 80);
        let b = pm(Proto::Udp, 8080, [10, 200, 2, 10], 80);
        let c = pm(Proto::Tcp, 9090, [10, 200, 2, 12], 90);
        nft.apply_all(&rules(&[a, b])).await.unwrap();
        // A second apply replaces the whole table, whatever was in it.
        nft.apply_all(&rules(&[a, c])).await.unwrap();
        let maps = |s: Option<KernelState>| s.unwrap().maps.into_iter().collect::<Vec<_>>();
        assert_eq!(maps(nft.read().await.unwrap()), [a, c]);

        nft.add(&PortRule::from(b)).await.unwrap();
        assert_eq!(maps(nft.read().await.unwrap()), [a, c, b]);

        // Adding the same key with another target is refused, not silently changed.
        let err = nft
            .add(&PortRule::from(pm(Proto::Udp, 8080, [10, 200, 2, 99], 80)))
            .await
            .unwrap_err();
        assert!(err.errno().is_some(), "{err}");

        nft.remove_all(&rules(&[a])).await.unwrap();
        assert_eq!(maps(nft.read().await.unwrap()), [c, b]);
        // Removing what is not there is ENOENT, with the kernel's reason.
        let err = nft.remove_all(&rules(&[a])).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(err.reason(), "No such file or directory");

        // Several at once (a deleted VM's maps): all or nothing.
        let (d, e) = (
            pm(Proto::Tcp, 7070, [10, 200, 2, 20], 70),
            pm(Proto::Udp, 7070, [10, 200, 2, 20], 70),
        );
        nft.add(&PortRule::from(d)).await.unwrap();
        nft.add(&PortRule::from(e)).await.unwrap();
        let err = nft.remove_all(&rules(&[d, e, a])).await.unwrap_err();
        assert!(err.is_not_found(), "{err}");
        assert_eq!(maps(nft.read().await.unwrap()), [d, c, e, b]);
        nft.remove_all(&rules(&[d, e])).await.unwrap();
        assert_eq!(maps(nft.read().await.unwrap()), [c, b]);

        let c2 = pm(Proto::Tcp, 9090, [10, 200, 2, 13], 91);
        nft.replace(&PortRule::from(c), &PortRule::from(c2))
            .await
            .unwrap();
        assert_eq!(maps(nft.read().await.unwrap()), [c2, b]);
        // A replace whose delete half fails changes nothing.
        let err = nft
            .replace(
                &PortRule::from(a),
                &PortRule::from(pm(Proto::Tcp, 1, [10, 0, 0, 1], 1)),
            )
            .await;
        assert!(err.unwrap_err().is_not_found());
        let state = nft.read().await.unwrap().unwrap();
        assert!(state.structure_ok);
        assert_eq!(state.maps.into_iter().collect::<Vec<_>>(), [c2, b]);

        assert!(nft.delete_table().await.unwrap());
        assert!(!nft.delete_table().await.unwrap());
        assert_eq!(nft.read().await.unwrap(), None);
        // Element operations on a missing table say so.
        assert!(
            nft.add(&PortRule::from(a))
                .await
                .unwrap_err()
                .is_not_found()
        );
    });
}

#[test]
fn refused_apply_keeps_the_old_table() {
    in_private_netns(|| async {
        let nft = Nft::new(settings()).unwrap();
        let a = pm(Proto::Tcp, 8080, [10, 200, 2, 10], 80);
        let b = pm(Proto::Tcp, 9090, [10, 200, 2, 11], 90);
        // Duplicate keys are caught before anything is sent.
        let dup = [a, pm(Proto::Tcp, 8080, [10, 200, 2, 11], 81)];
        assert!(matches!(
            nft.apply_all(&rules(&dup)).await,
            Err(NftError::Invalid(_))
        ));

        // A table owned by another socket cannot be destroyed by ours: the kernel
        // refuses the batch at its first operation and must roll back all of it.
        let owner = Connection::<Nftables>::new().unwrap();
        owner
            .add_table_with_flags(
                ruleset::TABLE,
                ruleset::FAMILY,
                nlink::netlink::nftables::NFT_TABLE_F_OWNER,
            )
            .await
            .unwrap();
        owner.add_set(ruleset::map(Proto::Tcp)).await.unwrap();
        owner
            .add_set_elements(&ruleset::map(Proto::Tcp), &[ruleset::element(&a)])
            .await
            .unwrap();
        let err = nft.apply_all(&rules(&[b])).await.unwrap_err();
        assert_eq!(err.errno(), Some(libc::EPERM), "{err}");
        assert_eq!(err.reason(), "Operation not permitted");
        assert!(err.to_string().contains("Operation not permitted"), "{err}");
        let state = nft.read().await.unwrap().unwrap();
        assert_eq!(state.maps.into_iter().collect::<Vec<_>>(), [a]);
        assert!(!state.structure_ok);

        // The owner's table goes with its socket (the kernel releases it after the
        // socket closes, not always before drop returns); then apply_all works again.
        drop(owner);
        let mut tries = 0;
        while let Err(e) = nft.apply_all(&rules(&[b])).await {
            tries += 1;
            assert!(tries < 100, "the owner's table stayed: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(nft.read().await.unwrap().unwrap().maps.len(), 1);
    });
}

#[test]
fn diff_sees_outside_changes() {
    in_private_netns(|| async {
        let nft = Nft::new(settings()).unwrap();
        let maps = [
            pm(Proto::Tcp, 8080, [10, 200, 2, 10], 80),
            pm(Proto::Udp, 5353, [10, 200, 2, 10], 53),
        ];
        nft.apply_all(&rules(&maps)).await.unwrap();
        assert!(diff(&rules(&maps), nft.read().await.unwrap().as_ref()).is_empty());

        run(&format!(
            "nft delete element ip {} tcp_ports {{ 8080 }}",
            ruleset::TABLE
        ));
        let d = diff(&rules(&maps), nft.read().await.unwrap().as_ref());
        assert_eq!(d.missing, [maps[0]]);
        assert!(d.elements_only(), "{d}");

        run(&format!(
            "nft add element ip {} udp_ports {{ 7000 : 10.200.2.50 . 7000 }}",
            ruleset::TABLE
        ));
        let d = diff(&rules(&maps), nft.read().await.unwrap().as_ref());
        assert_eq!(d.extra, [pm(Proto::Udp, 7000, [10, 200, 2, 50], 7000)]);

        run(&format!("nft flush chain ip {} prerouting", ruleset::TABLE));
        let state = nft.read().await.unwrap().unwrap();
        assert!(!state.structure_ok);
        let d = diff(&rules(&maps), Some(&state));
        assert!(!d.elements_only());
        assert!(d.to_string().contains("chain prerouting: rule"), "{d}");

        // A changed rule is caught too, not only a missing one.
        nft.apply_all(&rules(&maps)).await.unwrap();
        run(&format!(
            "nft add rule ip {} forward meta l4proto tcp accept",
            ruleset::TABLE
        ));
        let d = diff(&rules(&maps), nft.read().await.unwrap().as_ref());
        assert!(
            d.to_string().contains("chain forward: unexpected rule"),
            "{d}"
        );

        nft.apply_all(&rules(&maps)).await.unwrap();
        run(&format!("nft delete table ip {}", ruleset::TABLE));
        let d = diff(&rules(&maps), nft.read().await.unwrap().as_ref());
        assert!(d.table_missing);
        assert_eq!(d.missing.len(), 2);
    });
}

fn many_maps(n: usize) -> Vec<PortMap> {
    (0..n)
        .map(|i| {
            let proto = if i % 2 == 0 { Proto::Tcp } else { Proto::Udp };
            let port = 20000 + (i / 2) as u16;
            pm(
                proto,
                port,
                [10, 200, (i % 250) as u8, (i % 200 + 2) as u8],
                (i % 60000 + 1) as u16,
            )
        })
        .collect()
}

#[test]
fn thirty_thousand_maps_in_one_transaction() {
    in_private_netns(|| async {
        let nft = Nft::new(settings()).unwrap();
        let maps = many_maps(30_000);

        // Timings are printed, never asserted: these machines are shared and noisy.
        let started = Instant::now();
        nft.apply_all(&rules(&maps[..10_000])).await.unwrap();
        let ten_thousand = started.elapsed();

        // 30,000 over the 10,000: destroy + create with every element, one batch of
        // about a megabyte, beyond the default socket send buffer.
        let started = Instant::now();
        nft.apply_all(&rules(&maps)).await.unwrap();
        let thirty_thousand = started.elapsed();

        let started = Instant::now();
        let state = nft.read().await.unwrap().unwrap();
        let read = started.elapsed();
        assert!(state.structure_ok, "{:?}", state.problems);
        assert_eq!(state.maps.len(), 30_000);
        assert_eq!(state.maps, maps.iter().copied().collect::<BTreeSet<_>>());
        assert!(diff(&rules(&maps), Some(&state)).is_empty());
        eprintln!(
            "apply_all: 10,000 maps into an empty table {ten_thousand:?}; \
             30,000 replacing them {thirty_thousand:?}; read back {read:?}"
        );
    });
}

// ---------------------------------------------------------------------------
// Real traffic: client netns -- node (the test's private netns) -- bridge -- vm netns
// ---------------------------------------------------------------------------

const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 1, 1);
const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 200, 2, 1);
const VM_IP: [u8; 4] = [10, 200, 2, 10];
const VM_TCP_PORT: u16 = 80;
const VM_UDP_PORT: u16 = 53;

/// The two named namespaces around the node, and the VM's servers. Dropping it
/// stops the servers and deletes the namespaces, also when the test panics.
struct Topology {
    client: Netns,
    vm: Netns,
    stop: Arc<AtomicBool>,
}

impl Topology {
    /// Must be called on the node's (private) namespace thread.
    fn new() -> Self {
        let client = Netns::new("c");
        let vm = Netns::new("v");
        run(&format!(
            "ip link add to-client type veth peer name eth0 netns {}",
            client.name()
        ));
        run(&format!("ip addr add {NODE_IP}/24 dev to-client"));
        run("ip link set to-client up");
        client.sh("ip addr add 10.200.1.2/24 dev eth0");
        client.sh("ip link set eth0 up");
        client.sh("ip link set lo up");

        run(&format!("ip link add {BRIDGE} type bridge"));
        run(&format!("ip addr add {BRIDGE_IP}/24 dev {BRIDGE}"));
        run(&format!("ip link set {BRIDGE} up"));
        run(&format!(
            "ip link add to-vm type veth peer name eth0 netns {}",
            vm.name()
        ));
        run(&format!("ip link set to-vm master {BRIDGE}"));
        run("ip link set to-vm up");
        // Where br_netfilter is loaded (it is on these machines), a VM -> node -> VM
        // connection is DNAT'd at bridge level and bridged back out of the port it
        // came in on, which a bridge only does in hairpin mode. Without it only that
        // hairpin case fails; client -> VM is unaffected.
        run("ip link set to-vm type bridge_slave hairpin on");
        vm.sh(&format!(
            "ip addr add {}/24 dev eth0",
            Ipv4Addr::from(VM_IP)
        ));
        vm.sh("ip link set eth0 up");
        vm.sh("ip link set lo up");
        vm.sh(&format!("ip route add default via {BRIDGE_IP}"));
        assert!(link::enable_ip_forward().unwrap());

        let stop = Arc::new(AtomicBool::new(false));
        let topo = Self { client, vm, stop };
        topo.serve();
        topo
    }

    /// A TCP server that answers `vm:<peer address>` (so a test sees the source the
    /// VM saw) and a UDP echo, both inside the vm namespace, bounded by `stop`.
    fn serve(&self) {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, ready) = (self.stop.clone(), ready_tx.clone());
        self.vm.spawn(move || {
            let l = TcpListener::bind(("0.0.0.0", VM_TCP_PORT)).unwrap();
            l.set_nonblocking(true).unwrap();
            ready.send(()).unwrap();
            while !stop.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut s, peer)) => {
                        s.set_nonblocking(false).unwrap();
                        let _ = write!(s, "vm:{peer}");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let stop = self.stop.clone();
        self.vm.spawn(move || {
            let u = UdpSocket::bind(("0.0.0.0", VM_UDP_PORT)).unwrap();
            u.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            ready_tx.send(()).unwrap();
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = u.recv_from(&mut buf) {
                    let mut answer = b"vm-udp:".to_vec();
                    answer.extend_from_slice(&buf[..n]);
                    let _ = u.send_to(&answer, peer);
                }
            }
        });
        for _ in 0..2 {
            ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn tcp_get_here(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    Some(answer)
}

fn udp_ask_here(addr: SocketAddr) -> Option<String> {
    let u = UdpSocket::bind("0.0.0.0:0").ok()?;
    u.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    u.send_to(b"ping", addr).ok()?;
    let mut buf = [0u8; 512];
    let (n, _) = u.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// TCP request from inside a named namespace.
fn tcp_get(ns: &Netns, port: u16) -> Option<String> {
    let addr = SocketAddr::from((NODE_IP, port));
    ns.spawn(move || tcp_get_here(addr)).join().unwrap()
}

fn udp_ask(ns: &Netns, port: u16) -> Option<String> {
    let addr = SocketAddr::from((NODE_IP, port));
    ns.spawn(move || udp_ask_here(addr)).join().unwrap()
}

#[test]
fn mapped_ports_carry_real_traffic() {
    in_private_netns(|| async {
        let topo = Topology::new();
        let nft = Nft::new(settings()).unwrap();
        let tcp = pm(Proto::Tcp, 18080, VM_IP, VM_TCP_PORT);
        let udp = pm(Proto::Udp, 15353, VM_IP, VM_UDP_PORT);
        nft.apply_all(&rules(&[tcp, udp])).await.unwrap();

        // client -> node:18080 -> vm:80; the vm sees the node's bridge address.
        let answer = tcp_get(&topo.client, 18080).expect("mapped tcp port answers");
        assert!(answer.starts_with(&format!("vm:{BRIDGE_IP}:")), "{answer}");
        assert_eq!(udp_ask(&topo.client, 15353).as_deref(), Some("vm-udp:ping"));
        // Unmapped ports reach nothing.
        assert_eq!(tcp_get(&topo.client, 18081), None);
        assert_eq!(udp_ask(&topo.client, 15354), None);
        // Hairpin: the node itself, and a VM through the node back to a VM.
        let here = tcp_get_here(SocketAddr::from((NODE_IP, 18080)));
        assert!(here.is_some_and(|a| a.starts_with("vm:")));
        let from_vm = tcp_get(&topo.vm, 18080).expect("vm -> node -> vm hairpin");
        assert!(
            from_vm.starts_with(&format!("vm:{BRIDGE_IP}:")),
            "{from_vm}"
        );
        // Loopback is the node's own: a local service on 127.0.0.1 keeps its port.
        let local = std::net::TcpListener::bind("127.0.0.1:18080").unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = local.accept().unwrap();
            c.write_all(b"node-local").unwrap();
        });
        assert_eq!(
            tcp_get_here(SocketAddr::from(([127, 0, 0, 1], 18080))).as_deref(),
            Some("node-local")
        );
        server.join().unwrap();

        // Removing the element stops new connections at once.
        nft.remove_all(&rules(&[tcp])).await.unwrap();
        assert_eq!(tcp_get(&topo.client, 18080), None);
        nft.remove_all(&rules(&[udp])).await.unwrap();
        assert_eq!(udp_ask(&topo.client, 15353), None);
        // And a replace moves a port to another target atomically.
        nft.add(&PortRule::from(tcp)).await.unwrap();
        assert!(tcp_get(&topo.client, 18080).is_some());
        let moved = pm(Proto::Tcp, 18080, VM_IP, 81);
        nft.replace(&PortRule::from(tcp), &PortRule::from(moved))
            .await
            .unwrap();
        assert_eq!(tcp_get(&topo.client, 18080), None, "nothing listens on :81");
    });
}

// ---------------------------------------------------------------------------
// Next to libvirt's forward rejects
// ---------------------------------------------------------------------------

/// What libvirt 9.0 writes through iptables-nft (Debian 12) for a NAT network on the
/// test's bridge, reduced to the chains that decide forwarded traffic, plus one rule of
/// someone else. Loaded with `iptables-restore`, so the table is iptables-nft's own.
const IPTABLES_NFT_LIBVIRT: &str = "\
*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:LIBVIRT_FWI - [0:0]
:LIBVIRT_FWO - [0:0]
:LIBVIRT_FWX - [0:0]
-A FORWARD -m comment --comment not-ours
-A FORWARD -j LIBVIRT_FWX
-A FORWARD -j LIBVIRT_FWI
-A FORWARD -j LIBVIRT_FWO
-A LIBVIRT_FWI -d 10.200.2.0/24 -o vmbr-t -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A LIBVIRT_FWI -o vmbr-t -j REJECT --reject-with icmp-port-unreachable
-A LIBVIRT_FWO -s 10.200.2.0/24 -i vmbr-t -j ACCEPT
-A LIBVIRT_FWO -i vmbr-t -j REJECT --reject-with icmp-port-unreachable
-A LIBVIRT_FWX -i vmbr-t -o vmbr-t -j ACCEPT
COMMIT
";

/// Our accept as iptables spells it: iptables-nft reads it back as its own rule.
const OURS: &str = "-m conntrack --ctstate DNAT -m comment --comment node-vm-agent -j ACCEPT";
const OURS_SAVED: &str =
    "-A FORWARD -m conntrack --ctstate DNAT -m comment --comment node-vm-agent -j ACCEPT";
const NOT_OURS_SAVED: &str = "-A FORWARD -m comment --comment not-ours";
const LIBVIRT_JUMPS_SAVED: [&str; 3] = [
    "-A FORWARD -j LIBVIRT_FWX",
    "-A FORWARD -j LIBVIRT_FWI",
    "-A FORWARD -j LIBVIRT_FWO",
];

/// `iptables-save`'s `-A <chain>` lines; panics if iptables-nft cannot read the table
/// (it then prints "# Table `filter' is incompatible" and still exits 0).
fn iptables_saved(chain: &str) -> Vec<String> {
    let out = run("iptables-save -t filter");
    assert!(!out.contains("incompatible"), "{out}");
    let prefix = format!("-A {chain} ");
    out.lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

/// `iptables -L FORWARD`, which fails outright on a rule iptables-nft cannot parse.
fn iptables_list_forward() -> std::process::Output {
    std::process::Command::new("iptables")
        .args(["-L", "FORWARD", "-n", "-v"])
        .output()
        .unwrap()
}

/// The FORWARD rules `iptables-save` shows, ours expected first.
fn expect_forward(first: &[&str]) -> Vec<String> {
    first
        .iter()
        .copied()
        .chain([NOT_OURS_SAVED])
        .chain(LIBVIRT_JUMPS_SAVED)
        .map(str::to_owned)
        .collect()
}

#[test]
fn forward_accept_beats_iptables_nft_libvirt_reject() {
    in_private_netns(|| async {
        let topo = Topology::new();
        let nft = Nft::new(settings()).unwrap();
        // Neither libvirt table: nothing to do.
        let report = nft.ensure_forward_accept().await.unwrap();
        assert_eq!(report, ForwardAcceptReport::default());

        nft.apply_all(&rules(&[
            pm(Proto::Tcp, 18080, VM_IP, VM_TCP_PORT),
            pm(Proto::Udp, 15353, VM_IP, VM_UDP_PORT),
        ]))
        .await
        .unwrap();
        run_with_input("iptables-restore", Some(IPTABLES_NFT_LIBVIRT));
        assert_eq!(tcp_get(&topo.client, 18080), None, "libvirt rejects it");
        let drift = nft.forward_accept_drift().await.unwrap();
        assert_eq!(drift.len(), 1, "{drift:?}");
        assert!(drift[0].contains("filter FORWARD"), "{drift:?}");

        let report = nft.ensure_forward_accept().await.unwrap();
        assert_eq!(
            report.touched,
            [ForwardChainOutcome {
                chain: "filter FORWARD".into(),
                inserted: true,
                removed_stale: 0
            }]
        );
        assert!(tcp_get(&topo.client, 18080).is_some_and(|a| a.starts_with("vm:")));
        assert_eq!(udp_ask(&topo.client, 15353).as_deref(), Some("vm-udp:ping"));

        // iptables-nft reads the chain, ours included, comment and all: libvirt, Docker,
        // ufw or fail2ban can go on using iptables next to the agent.
        assert_eq!(iptables_saved("FORWARD"), expect_forward(&[OURS_SAVED]));
        let listed = iptables_list_forward();
        let text = String::from_utf8_lossy(&listed.stdout);
        assert!(
            listed.status.success(),
            "{}",
            String::from_utf8_lossy(&listed.stderr)
        );
        let first = text.lines().nth(2).unwrap_or_default();
        assert!(first.contains("ACCEPT"), "{text}");
        assert!(first.contains("ctstate DNAT /* node-vm-agent */"), "{text}");
        // The mapped connections above went through it.
        let packets: u64 = first.split_whitespace().next().unwrap().parse().unwrap();
        assert!(packets > 0, "{text}");

        // Idempotent.
        assert_eq!(
            nft.forward_accept_drift().await.unwrap(),
            Vec::<String>::new()
        );
        let report = nft.ensure_forward_accept().await.unwrap();
        assert!(!report.changed(), "{report}");
        assert_eq!(report.already_fine, ["filter FORWARD"]);

        // Someone inserts ahead of ours (libvirt does on a network restart): ours goes
        // back to the head, the old copy goes.
        run("iptables -I FORWARD -m comment --comment someone-else");
        assert!(nft.forward_accept_drift().await.unwrap()[0].contains("not the first rule"));
        let report = nft.ensure_forward_accept().await.unwrap();
        assert!(report.touched[0].inserted);
        assert_eq!(report.touched[0].removed_stale, 1);
        assert_eq!(
            iptables_saved("FORWARD"),
            expect_forward(&[OURS_SAVED, "-A FORWARD -m comment --comment someone-else"])
        );
        run("iptables -D FORWARD -m comment --comment someone-else");

        // A copy further down, written by iptables itself, is ours too: removed, the
        // head one kept.
        run(&format!("iptables -A FORWARD {OURS}"));
        let report = nft.ensure_forward_accept().await.unwrap();
        assert_eq!(
            report.touched,
            [ForwardChainOutcome {
                chain: "filter FORWARD".into(),
                inserted: false,
                removed_stale: 1
            }]
        );
        assert_eq!(iptables_saved("FORWARD"), expect_forward(&[OURS_SAVED]));

        // Removal takes ours only, and libvirt's reject is back in force.
        assert_eq!(nft.remove_forward_accept().await.unwrap(), 1);
        assert_eq!(iptables_saved("FORWARD"), expect_forward(&[]));
        assert_eq!(iptables_saved("LIBVIRT_FWI").len(), 2);
        assert_eq!(tcp_get(&topo.client, 18080), None);
        assert_eq!(nft.remove_forward_accept().await.unwrap(), 0);
    });
}

/// The rules of one chain as the kernel dumps them, in chain order.
async fn dumped_rules(table: &str, chain: &str) -> Vec<nlink::netlink::nftables::RuleInfo> {
    let conn = Connection::<Nftables>::new().unwrap();
    conn.list_rules(table, nlink::netlink::nftables::Family::Ip)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.chain == chain)
        .collect()
}

#[test]
fn forward_accept_is_what_iptables_nft_writes_byte_for_byte() {
    in_private_netns(|| async {
        run_with_input("iptables-restore", Some(IPTABLES_NFT_LIBVIRT));
        let nft = Nft::new(settings()).unwrap();
        assert!(nft.ensure_forward_accept().await.unwrap().touched[0].inserted);
        // iptables' own copy of the same rule, second in the chain; no traffic has
        // touched either counter.
        run(&format!("iptables -I FORWARD 2 {OURS}"));
        let rules = dumped_rules("filter", "FORWARD").await;
        let (ours, theirs) = (&rules[0], &rules[1]);
        assert!(!ours.expression_bytes.is_empty());
        assert_eq!(
            hex::encode(&ours.expression_bytes),
            hex::encode(&theirs.expression_bytes)
        );
        assert_eq!(ours.userdata_raw, theirs.userdata_raw);
        assert_eq!(ours.userdata_raw, None);

        // Written by iptables at the head, it is ours and fine: nothing to change.
        assert_eq!(nft.remove_forward_accept().await.unwrap(), 2);
        run(&format!("iptables -I FORWARD {OURS}"));
        assert!(nft.forward_accept_drift().await.unwrap().is_empty());
        let report = nft.ensure_forward_accept().await.unwrap();
        assert_eq!(report.already_fine, ["filter FORWARD"], "{report}");
    });
}

#[test]
fn forward_accept_of_an_older_agent_is_replaced() {
    in_private_netns(|| async {
        run_with_input("iptables-restore", Some(IPTABLES_NFT_LIBVIRT));
        // What agents before the iptables-nft form wrote: native nft, comment in userdata.
        // iptables-nft cannot parse it, so every iptables user of the table fails.
        run(&format!(
            "nft insert rule ip filter FORWARD ct status dnat accept comment {}",
            ruleset::RULE_TAG
        ));
        let listed = iptables_list_forward();
        assert!(!listed.status.success());
        assert!(
            String::from_utf8_lossy(&listed.stderr).contains("incompatible"),
            "{listed:?}"
        );

        let nft = Nft::new(settings()).unwrap();
        let drift = nft.forward_accept_drift().await.unwrap();
        assert_eq!(drift.len(), 1, "{drift:?}");
        assert!(drift[0].contains("not the first rule"), "{drift:?}");
        let report = nft.ensure_forward_accept().await.unwrap();
        assert_eq!(
            report.touched,
            [ForwardChainOutcome {
                chain: "filter FORWARD".into(),
                inserted: true,
                removed_stale: 1
            }]
        );
        assert!(iptables_list_forward().status.success());
        assert_eq!(iptables_saved("FORWARD"), expect_forward(&[OURS_SAVED]));
        assert!(!nft.ensure_forward_accept().await.unwrap().changed());

        // The old form left lower down (or by a downgrade and upgrade again) goes too,
        // and removal finds both forms.
        run(&format!(
            "nft add rule ip filter FORWARD ct status dnat accept comment {}",
            ruleset::RULE_TAG
        ));
        let report = nft.ensure_forward_accept().await.unwrap();
        assert_eq!(report.touched[0].removed_stale, 1, "{report}");
        assert!(!report.touched[0].inserted, "{report}");
        run(&format!(
            "nft add rule ip filter FORWARD ct status dnat accept comment {}",
            ruleset::RULE_TAG
        ));
        assert_eq!(nft.remove_forward_accept().await.unwrap(), 2);
        assert_eq!(iptables_saved("FORWARD"), expect_forward(&[]));
    });
}

#[test]
fn forward_accept_refused_in_one_chain_still_lands_in_the_other() {
    in_private_netns(|| async {
        // `ip filter` owned by another process (NFT_TABLE_F_OWNER): the kernel refuses
        // everyone else's rules there, as it would our xtables matches without nft_compat.
        let mut owner = std::process::Command::new("nft")
            .arg("-i")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        owner
            .stdin
            .as_mut()
            .unwrap()
            .write_all(
                b"add table ip filter { flags owner; }\n\
                  add chain ip filter FORWARD { type filter hook forward priority filter; }\n",
            )
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::process::Command::new("nft")
            .args(["list", "chain", "ip", "filter", "FORWARD"])
            .output()
            .is_ok_and(|o| !o.status.success())
        {
            assert!(Instant::now() < deadline, "nft -i did not create the table");
            std::thread::sleep(Duration::from_millis(20));
        }
        run_with_input(
            "nft -f -",
            Some(
                "table ip libvirt_network { chain forward { \
                 type filter hook forward priority filter; policy accept; }; }",
            ),
        );

        let nft = Nft::new(settings()).unwrap();
        let err = nft.ensure_forward_accept().await.unwrap_err();
        let text = err.to_string();
        assert!(text.contains("nft_compat"), "{text}");
        assert_eq!(err.errno(), Some(libc::EPERM), "{text}");
        assert_eq!(chain_comments("libvirt_network", "forward"), [tagged()]);
        // Once the table is free again, the next reconcile fixes it.
        owner.kill().unwrap();
        owner.wait().unwrap();
        run_with_input("iptables-restore", Some(IPTABLES_NFT_LIBVIRT));
        let report = nft.ensure_forward_accept().await.unwrap();
        assert_eq!(report.already_fine, ["libvirt_network forward"], "{report}");
        assert_eq!(iptables_saved("FORWARD"), expect_forward(&[OURS_SAVED]));
    });
}

/// The comments of a chain's rules, in order (`None` for a rule without one).
fn chain_comments(table: &str, chain: &str) -> Vec<Option<String>> {
    nft_json(&format!("list chain ip {table} {chain}"))["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.get("rule"))
        .map(|r| r.get("comment").and_then(|c| c.as_str()).map(str::to_owned))
        .collect()
}

fn tagged() -> Option<String> {
    Some(ruleset::RULE_TAG.to_owned())
}

#[test]
fn forward_accept_in_libvirt_nftables_backend() {
    in_private_netns(|| async {
        run_with_input(
            "nft -f -",
            Some(
                r#"
table ip libvirt_network {
    chain forward {
        type filter hook forward priority filter; policy accept;
        counter jump guest_input
    }
    chain guest_input {
        oifname "virbr0" counter reject
    }
}
"#,
            ),
        );
        let nft = Nft::new(settings()).unwrap();
        let report = nft.ensure_forward_accept().await.unwrap();
        assert_eq!(report.touched.len(), 1);
        assert_eq!(report.touched[0].chain, "libvirt_network forward");
        assert_eq!(
            chain_comments("libvirt_network", "forward"),
            [tagged(), None]
        );
        let text = run("nft list chain ip libvirt_network forward");
        assert!(
            text.contains("ct status dnat accept comment \"node-vm-agent\""),
            "{text}"
        );
        assert!(!nft.ensure_forward_accept().await.unwrap().changed());
        assert_eq!(nft.remove_forward_accept().await.unwrap(), 1);
        assert_eq!(chain_comments("libvirt_network", "forward"), [None]);
        assert_eq!(chain_comments("libvirt_network", "guest_input"), [None]);
    });
}

#[test]
fn other_settings_round_trip_through_the_kernel() {
    in_private_netns(|| async {
        let nft = Nft::new(NatSettings {
            vms_bridge: "br-vms".into(),
            vm_subnet: "192.0.2.7/32".parse().unwrap(),
            wg_iface: None,
            external_iface: Some("eth-out".into()),
            tunnel_sources: vec![],
        })
        .unwrap();
        nft.apply_all(&rules(&[])).await.unwrap();
        let state = nft.read().await.unwrap().unwrap();
        assert!(state.structure_ok, "{:?}", state.problems);
        assert!(state.maps.is_empty());
        let text = run(&format!("nft list chain ip {} postrouting", ruleset::TABLE));
        assert!(
            text.contains(
                "ip saddr 192.0.2.7 ip daddr != 192.0.2.7 oifname \"eth-out\" masquerade"
            ),
            "{text}"
        );
        assert!(!text.contains("wg"), "{text}");

        // The same table read with other settings is drift: the rules differ.
        let other = Nft::new(settings()).unwrap();
        let state = other.read().await.unwrap().unwrap();
        assert!(!state.structure_ok);
    });
}

#[test]
fn interface_names_are_validated_before_any_socket() {
    for bad in ["", "a-name-longer-than-15", "nul\0"] {
        let mut s = settings();
        s.vms_bridge = bad.into();
        assert!(matches!(Nft::new(s), Err(NftError::Invalid(_))), "{bad:?}");
    }
    let mut s = settings();
    s.external_iface = Some("x".repeat(16));
    assert!(matches!(Nft::new(s), Err(NftError::Invalid(_))));
}

#[test]
fn ip_forward_is_per_namespace_and_idempotent() {
    in_private_netns(|| async {
        // A fresh namespace starts with forwarding off.
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap()
                .trim(),
            "0"
        );
        assert!(link::enable_ip_forward().unwrap());
        assert!(!link::enable_ip_forward().unwrap());
        assert_eq!(
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
                .unwrap()
                .trim(),
            "1"
        );
    });
}

#[test]
fn default_route_iface_follows_the_lowest_metric() {
    in_private_netns(|| async {
        assert_eq!(link::default_route_iface().await.unwrap(), None);
        // No dummy driver on these machines; a veth end works as well.
        run("ip link add dummy-a type veth peer name peer-a");
        run("ip link add dummy-b type veth peer name peer-b");
        for dev in ["dummy-a", "peer-a", "dummy-b", "peer-b"] {
            run(&format!("ip link set {dev} up"));
        }
        run("ip addr add 10.77.0.1/24 dev dummy-a");
        run("ip addr add 10.78.0.1/24 dev dummy-b");
        run("ip route add default via 10.77.0.254 dev dummy-a metric 200");
        assert_eq!(
            link::default_route_iface().await.unwrap().as_deref(),
            Some("dummy-a")
        );
        run("ip route add default via 10.78.0.254 dev dummy-b metric 100");
        assert_eq!(
            link::default_route_iface().await.unwrap().as_deref(),
            Some("dummy-b")
        );
        // Routes in other tables are not the default route.
        let out = std::process::Command::new("ip")
            .args(["route", "del", "default", "dev", "dummy-b"])
            .status()
            .unwrap();
        assert!(out.success());
        run("ip route add default via 10.78.0.254 dev dummy-b table 100");
        assert_eq!(
            link::default_route_iface().await.unwrap().as_deref(),
            Some("dummy-a")
        );
    });
}

/// A rebuild keeps the counters of the maps it does not change (written into the new
/// elements) and starts the others at zero; the counters read back in one go.
#[test]
fn apply_all_changes_in_place_and_a_rebuild_carries_the_counters_of_unchanged_maps() {
    in_private_netns(|| async {
        let nft = Nft::new(settings()).unwrap();
        let a = PortRule::from(pm(Proto::Tcp, 8080, [10, 200, 2, 10], 80));
        let mut b = PortRule::from(pm(Proto::Udp, 5353, [10, 200, 2, 10], 53));
        b.allow_from = node_vm_agent::model::AllowList::parse(&["192.0.2.0/24"]).unwrap();
        nft.apply_all(&[a.clone(), b.clone()]).await.unwrap();
        let zero = node_vm_agent::model::MapCounters::default();
        assert_eq!(nft.counters().await.unwrap()[&(Proto::Tcp, 8080)], zero);

        // Counts as traffic would leave them, put there with the nft CLI.
        for (set, key, packets, bytes) in [
            ("tcp_flows", "8080", 7, 700),
            ("udp_flows", "5353", 3, 300),
            ("udp_drops", "5353", 2, 80),
        ] {
            run(&format!(
                "nft delete element ip {} {set} {{ {key} }}",
                ruleset::TABLE
            ));
            run(&format!(
                "nft add element ip {} {set} {{ {key} counter packets {packets} bytes {bytes} }}",
                ruleset::TABLE
            ));
        }
        let counted = nft.counters().await.unwrap();
        assert_eq!(
            (
                counted[&(Proto::Tcp, 8080)].packets,
                counted[&(Proto::Tcp, 8080)].bytes
            ),
            (7, 700)
        );
        assert_eq!(counted[&(Proto::Udp, 5353)].drops, 2);

        // Same rules: both keep theirs. Another allow-list for b: b starts again. Both
        // in place: the table is the same table (same handle).
        let handle = table_handle();
        nft.apply_all(&[a.clone(), b.clone()]).await.unwrap();
        assert_eq!(nft.counters().await.unwrap(), counted);
        let mut b2 = b.clone();
        b2.allow_from = node_vm_agent::model::AllowList::parse(&["198.51.100.0/24"]).unwrap();
        nft.apply_all(&[a.clone(), b2.clone()]).await.unwrap();
        let after = nft.counters().await.unwrap();
        assert_eq!(after[&(Proto::Tcp, 8080)], counted[&(Proto::Tcp, 8080)]);
        assert_eq!(after[&(Proto::Udp, 5353)], zero);
        let state = nft.read().await.unwrap().unwrap();
        assert!(state.structure_ok, "{:?}", state.problems);
        assert!(diff(&[a.clone(), b2.clone()], Some(&state)).is_empty());
        assert_eq!(table_handle(), handle, "changed in place");

        // Other settings (anti-spoofing networks) need other rules: the table is built
        // again, and a's counts go with it.
        nft.set_tunnel_sources(vec!["10.99.0.0/24".parse().unwrap()]);
        nft.apply_all(&[a.clone(), b2.clone()]).await.unwrap();
        assert_ne!(table_handle(), handle, "rebuilt");
        let rebuilt = nft.counters().await.unwrap();
        assert_eq!(rebuilt[&(Proto::Tcp, 8080)], counted[&(Proto::Tcp, 8080)]);
        assert_eq!(rebuilt[&(Proto::Udp, 5353)], zero);

        // Sets that disagree (a flow element deleted behind the agent's back) cannot
        // be changed element by element safely: rebuilt too, the element back.
        let handle = table_handle();
        run(&format!(
            "nft delete element ip {} udp_flows {{ 5353 }}",
            ruleset::TABLE
        ));
        nft.apply_all(&[a.clone(), b2.clone()]).await.unwrap();
        assert_ne!(table_handle(), handle, "rebuilt");
        let state = nft.read().await.unwrap().unwrap();
        assert!(diff(&[a.clone(), b2], Some(&state)).is_empty());
        assert_eq!(
            nft.counters().await.unwrap()[&(Proto::Tcp, 8080)],
            counted[&(Proto::Tcp, 8080)]
        );
    })
}

/// The kernel's handle of the agent's table: a new one means the table was built again.
fn table_handle() -> String {
    let listing = run(&format!("nft -a list table ip {}", ruleset::TABLE));
    let first = listing.lines().next().unwrap_or_default();
    first
        .split("# handle ")
        .nth(1)
        .unwrap_or_else(|| panic!("no handle in {first:?}"))
        .trim()
        .to_owned()
}
