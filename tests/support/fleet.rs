//! A fleet under one controller: N node namespaces, each joined by a veth to a bridge in
//! the controller's namespace, and a test controller that speaks the original `/join`
//! protocol to all of them (one tunnel address per node) over one userspace WireGuard
//! interface. Every address lives inside namespaces the test made:
//!
//! ```text
//!  [ctl] bridge fleetbr 10.78.0.1/16   HTTP :5000 (/join), WireGuard :51820, 10.50.0.1/24
//!    fl0 --- eth0 10.78.1.1/16 [node 0]      tunnel 10.50.0.2 (first to join)
//!    fl1 --- eth0 10.78.1.2/16 [node 1]      tunnel 10.50.0.3
//!    ...
//! ```
//!
//! Unlike [`super::controller::Controller`] (one node, fixed address), it keeps a map
//! node_id -> (key, tunnel address, join times), answers joins concurrently, and can
//! [`Fleet::forget_all_peers`] as the original controller does on a restart (its
//! entrypoint does not add the WireGuard peers back; only a new `/join` does).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use defguard_wireguard_rs::key::Key;
use defguard_wireguard_rs::net::IpAddrMask;
use defguard_wireguard_rs::peer::Peer;
use defguard_wireguard_rs::{Userspace, WGApi, WireguardInterfaceApi};
use serde_json::{Value, json};

use super::client::Api;
use super::controller::{
    CTL_TUNNEL_IP, HTTP_PORT, JOIN_TOKEN, WG_PORT, read_request, unique_ifname, userspace_wg,
    write_reply,
};
use super::netns::Netns;
use super::topology::{API_PORT, sa};

/// The controller's address on the fleet's bridge.
pub const FLEET_CTL_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const BRIDGE: &str = "fleetbr";
/// At most this many nodes: one /16 link, one /24 of tunnel addresses.
pub const MAX_NODES: usize = 250;

/// One node as the controller knows it.
#[derive(Debug, Clone)]
pub struct Member {
    pub pubkey: String,
    pub tunnel_ip: Ipv4Addr,
    /// Every successful `/join` of this node, oldest first.
    pub joins: Vec<Instant>,
}

#[derive(Debug, Default)]
pub struct FleetState {
    pub members: BTreeMap<String, Member>,
    /// `/join` requests received (any answer).
    pub requests: usize,
}

pub struct Fleet {
    pub ctl: Netns,
    pub nodes: Vec<Netns>,
    pub wg_name: String,
    key: Key,
    wg: Option<WGApi<Userspace>>,
    pub state: Arc<Mutex<FleetState>>,
    stop: Arc<AtomicBool>,
    http: Option<JoinHandle<()>>,
}

impl Fleet {
    /// The controller's namespace, bridge and WireGuard interface, `n` node namespaces
    /// wired to the bridge, and `/join` answered from now on.
    pub fn new(n: usize) -> Fleet {
        assert!((1..=MAX_NODES).contains(&n), "1..={MAX_NODES} nodes");
        let ctl = Netns::new("fctl");
        ctl.exec_ok(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
        ctl.exec_ok(&["ip", "addr", "add", "10.78.0.1/16", "dev", BRIDGE]);
        ctl.exec_ok(&["ip", "link", "set", BRIDGE, "up"]);
        let nodes = (0..n).map(|i| wire_node(&ctl, i)).collect();
        let wg_name = unique_ifname("wgf");
        let key = Key::generate();
        let wg = userspace_wg(&ctl, &wg_name, &key, "10.50.0.1/24");
        let mut fleet = Fleet {
            ctl,
            nodes,
            wg_name,
            key,
            wg: Some(wg),
            state: Arc::new(Mutex::new(FleetState::default())),
            stop: Arc::new(AtomicBool::new(false)),
            http: None,
        };
        fleet.serve();
        fleet
    }

    pub fn node_id(i: usize) -> String {
        format!("node-{i}")
    }

    /// The settings that make node `i`'s agent join this controller over `wg_iface`.
    pub fn agent_env(i: usize, wg_iface: &str) -> Vec<(String, String)> {
        [
            (
                "CONTROLLER_URL",
                format!("http://{FLEET_CTL_IP}:{HTTP_PORT}"),
            ),
            ("JOIN_TOKEN", JOIN_TOKEN.to_string()),
            ("NODE_ID", Fleet::node_id(i)),
            ("WG_IFACE", wg_iface.to_string()),
            ("WG_MODE", "userspace".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// A copy of what the controller knows of node `i`, if it joined.
    pub fn member(&self, i: usize) -> Option<Member> {
        self.state
            .lock()
            .unwrap()
            .members
            .get(&Fleet::node_id(i))
            .cloned()
    }

    /// The controller restarts: every WireGuard peer (and its session) is gone until
    /// its node joins again. The nodes' records and tunnel addresses are kept, as the
    /// original controller keeps them in its database.
    pub fn forget_all_peers(&self) {
        let wg = self.wg.as_ref().unwrap();
        let host = wg.read_host().unwrap();
        for key in host.peers.keys() {
            wg.remove_peer(key).unwrap();
        }
    }

    /// The controller restarts: its API refuses connections for `down` and its
    /// WireGuard forgets every peer (as [`Fleet::forget_all_peers`]). Returns when it
    /// answers again.
    pub fn restart(&mut self, down: Duration) -> Instant {
        self.stop_serving();
        self.forget_all_peers();
        std::thread::sleep(down);
        self.serve();
        Instant::now()
    }

    /// The controller's kernel drops the ICMP it sends (a firewall that does): a probe
    /// to a closed port gets no port unreachable, and only WireGuard's passive keepalive
    /// answers it. The table is in the controller's own namespace.
    pub fn drop_outgoing_icmp(&self) {
        self.ctl.exec_ok(&["nft", "add", "table", "ip", "fleet"]);
        self.ctl.exec_ok(&[
            "nft",
            "add",
            "chain",
            "ip",
            "fleet",
            "out",
            "{ type filter hook output priority 0; }",
        ]);
        self.ctl.exec_ok(&[
            "nft", "add", "rule", "ip", "fleet", "out", "ip", "protocol", "icmp", "drop",
        ]);
    }

    /// `/join` requests received so far (any answer).
    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    /// The last handshake of each peer the controller has, by public key (base64);
    /// a node without a peer is absent. One read of the interface for the whole fleet.
    pub fn handshakes(&self) -> BTreeMap<String, Option<SystemTime>> {
        let host = self.wg.as_ref().unwrap().read_host().unwrap();
        host.peers
            .iter()
            .map(|(k, p)| (k.to_string(), p.last_handshake))
            .collect()
    }

    /// Node `i`'s agent API as the controller reaches it: over the tunnel.
    pub fn tunnel_api(&self, i: usize, token: &str) -> Option<Api> {
        let m = self.member(i)?;
        Some(Api::new(
            self.ctl.name(),
            SocketAddr::from((m.tunnel_ip, API_PORT)),
            token,
        ))
    }

    /// Stops answering: the listener closes, and connections are refused.
    fn stop_serving(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        self.stop.store(false, Ordering::SeqCst);
    }

    fn serve(&mut self) {
        let listener = self
            .ctl
            .run(|| TcpListener::bind(sa(FLEET_CTL_IP, HTTP_PORT)))
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let (state, stop, wg_name, key) = (
            self.state.clone(),
            self.stop.clone(),
            self.wg_name.clone(),
            self.key.clone(),
        );
        self.http = Some(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    // A thread per request: a node slow to send its body (20 agents
                    // starting on 2 cores) must not hold up the others' joins.
                    Ok((stream, _)) => {
                        let (state, wg_name, key) = (state.clone(), wg_name.clone(), key.clone());
                        std::thread::spawn(move || {
                            let _ = handle(stream, &state, &wg_name, &key);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }));
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop_serving();
        if let Some(wg) = self.wg.take() {
            let _ = wg.remove_interface();
        }
    }
}

/// Node `i`'s namespace with `eth0` 10.78.x.y/16 on the controller's bridge (made from
/// inside the controller's namespace, its peer end placed straight into the node's).
fn wire_node(ctl: &Netns, i: usize) -> Netns {
    let node = Netns::new(&format!("f{i}"));
    let port = format!("fl{i}");
    ctl.exec_ok(&[
        "ip",
        "link",
        "add",
        &port,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        node.name(),
    ]);
    ctl.exec_ok(&["ip", "link", "set", &port, "master", BRIDGE]);
    ctl.exec_ok(&["ip", "link", "set", &port, "up"]);
    let addr = format!("10.78.{}.{}/16", 1 + i / 250, 1 + i % 250);
    node.exec_ok(&["ip", "addr", "add", &addr, "dev", "eth0"]);
    node.exec_ok(&["ip", "link", "set", "eth0", "up"]);
    node
}

fn handle(
    stream: TcpStream,
    state: &Mutex<FleetState>,
    wg_name: &str,
    key: &Key,
) -> std::io::Result<()> {
    let req = read_request(&stream)?;
    // Only the UAPI socket is used from here, and its path is machine-wide.
    let wg = WGApi::<Userspace>::new(wg_name.to_owned()).unwrap();
    let (status, reply) = answer(&req.line, req.token.as_deref(), &req.body, state, &wg, key);
    write_reply(stream, status, &reply)
}

/// The original `/join`: the node's tunnel address (kept across re-joins), its peer
/// added when the controller does not have it, and the controller's side of the tunnel.
fn answer(
    request_line: &str,
    token: Option<&str>,
    body: &[u8],
    state: &Mutex<FleetState>,
    wg: &WGApi<Userspace>,
    key: &Key,
) -> (u16, Value) {
    let mut s = state.lock().unwrap();
    s.requests += 1;
    if !request_line.starts_with("POST /join ") {
        return (404, json!({"ok": false, "error": "not found"}));
    }
    if token != Some(JOIN_TOKEN) {
        return (403, json!({"ok": false, "error": "forbidden"}));
    }
    let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let (Some(node_id), Some(pubkey)) = (req["node_id"].as_str(), req["node_pubkey"].as_str())
    else {
        return (
            400,
            json!({"ok": false, "error": "node_id and node_pubkey required"}),
        );
    };
    let Ok(node_key) = Key::try_from(pubkey) else {
        return (400, json!({"ok": false, "error": "bad key"}));
    };
    let next_ip = Ipv4Addr::new(10, 50, 0, 2 + s.members.len() as u8);
    let member = s.members.entry(node_id.to_owned()).or_insert(Member {
        pubkey: pubkey.to_owned(),
        tunnel_ip: next_ip,
        joins: Vec::new(),
    });
    if member.pubkey != pubkey {
        // A new key for a known node: its old peer goes.
        let _ = wg.remove_peer(&Key::try_from(member.pubkey.as_str()).unwrap());
        member.pubkey = pubkey.to_owned();
    }
    let mut peer = Peer::new(node_key);
    peer.allowed_ips = vec![IpAddrMask::new(member.tunnel_ip.into(), 32)];
    // boringtun cannot modify a peer in place; a known key keeps its peer as it is.
    let known = wg
        .read_host()
        .is_ok_and(|h| h.peers.contains_key(&peer.public_key));
    if !known {
        wg.configure_peer(&peer).unwrap();
    }
    member.joins.push(Instant::now());
    let node_ip = member.tunnel_ip;
    (
        200,
        json!({"ok": true, "node_id": node_id, "node_ip": node_ip.to_string(),
               "controller_pubkey": key.public_key().to_string(),
               "endpoint": format!("{FLEET_CTL_IP}:{WG_PORT}"),
               "allowed_ips": format!("{CTL_TUNNEL_IP}/32"), "wg_net": "10.50.0.0/24"}),
    )
}
