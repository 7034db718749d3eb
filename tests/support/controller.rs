//! A test controller that speaks the original join protocol over HTTP and owns a
//! userspace WireGuard interface (defguard's boringtun) in its own namespace, joined to
//! the topology's node namespace by a veth pair:
//!
//! ```text
//!  [node] ctl0 10.77.4.1/24 --- eth0 10.77.4.2/24 [ctl]   HTTP :5000 (/join), WireGuard :51820
//!  tunnel: node WG_IFACE 10.50.0.2/32  <==>  ctl wgc* 10.50.0.1/24
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use defguard_wireguard_rs::key::Key;
use defguard_wireguard_rs::net::IpAddrMask;
use defguard_wireguard_rs::peer::Peer;
use defguard_wireguard_rs::{InterfaceConfiguration, Userspace, WGApi, WireguardInterfaceApi};
use serde_json::{Value, json};

use super::netns::{Netns, unique_id};
use super::topology::{Topology, sa};

pub const CTL_LINK_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 4, 2);
pub const CTL_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 1);
pub const NODE_TUNNEL_IP: Ipv4Addr = Ipv4Addr::new(10, 50, 0, 2);
pub const HTTP_PORT: u16 = 5000;
pub const WG_PORT: u16 = 51820;
pub const JOIN_TOKEN: &str = "join-token-for-tests";

/// How the controller answers `/join`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Forbidden,
    ServerError,
}

#[derive(Debug)]
pub struct State {
    pub answer: Answer,
    pub endpoint: String,
    /// `/join` requests received (any answer).
    pub requests: usize,
    pub node_pubkey: Option<String>,
}

pub struct Controller {
    pub ns: Netns,
    pub wg_name: String,
    pub key: Key,
    wg: Option<WGApi<Userspace>>,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    http: Option<JoinHandle<()>>,
}

/// A unique interface name (control sockets in /var/run/wireguard are machine-wide).
pub fn unique_ifname(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        unique_id() % 1000
    )
}

impl Controller {
    /// The namespace, the veth to the node and the WireGuard interface; the HTTP side
    /// starts with [`Controller::serve`] (so a test can start the agent before it).
    pub fn new(topo: &Topology) -> Controller {
        let ns = Netns::new("ctl");
        topo.veth_pair("ctl0", &ns, "10.77.4.1/24", "10.77.4.2/24");

        let wg_name = unique_ifname("wgc");
        let key = Key::generate();
        let wg = userspace_wg(&ns, &wg_name, &key, "10.50.0.1/24");
        Controller {
            ns,
            wg_name,
            key,
            wg: Some(wg),
            state: Arc::new(Mutex::new(State {
                answer: Answer::Ok,
                endpoint: format!("{CTL_LINK_IP}:{WG_PORT}"),
                requests: 0,
                node_pubkey: None,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            http: None,
        }
    }

    pub fn url() -> String {
        format!("http://{CTL_LINK_IP}:{HTTP_PORT}")
    }

    /// The agent settings that make it join this controller.
    pub fn agent_env(node_iface: &str) -> Vec<(String, String)> {
        [
            ("CONTROLLER_URL", Controller::url()),
            ("JOIN_TOKEN", JOIN_TOKEN.to_string()),
            ("NODE_ID", "node-1".to_string()),
            ("WG_IFACE", node_iface.to_string()),
            ("WG_MODE", "userspace".to_string()),
            ("JOIN_RETRY_INITIAL_MS", "100".to_string()),
            ("JOIN_RETRY_MAX", "1".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub fn set_answer(&self, a: Answer) {
        self.state.lock().unwrap().answer = a;
    }

    pub fn requests(&self) -> usize {
        self.state.lock().unwrap().requests
    }

    /// Starts answering `/join` on 10.77.4.2:5000.
    pub fn serve(&mut self) {
        let listener = self
            .ns
            .run(|| TcpListener::bind(sa(CTL_LINK_IP, HTTP_PORT)))
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let (state, stop, wg_name, key) = (
            self.state.clone(),
            self.stop.clone(),
            self.wg_name.clone(),
            self.key.clone(),
        );
        self.http = Some(std::thread::spawn(move || {
            // Only the UAPI socket is used from here, and its path is machine-wide.
            let wg = WGApi::<Userspace>::new(wg_name).unwrap();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = handle(stream, &state, &wg, &key);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        }));
    }

    /// Hands out another endpoint on the next join: a second address on the
    /// controller's link (boringtun listens on all of them; it cannot move its port).
    pub fn move_endpoint(&self) -> String {
        self.ns
            .exec_ok(&["ip", "addr", "add", "10.77.4.3/24", "dev", "eth0"]);
        let endpoint = format!("10.77.4.3:{WG_PORT}");
        self.state.lock().unwrap().endpoint = endpoint.clone();
        endpoint
    }

    /// Forgets the node's peer (its session and handshake).
    pub fn remove_peer(&self, node_pubkey: &str) {
        let key = Key::try_from(node_pubkey).unwrap();
        self.wg.as_ref().unwrap().remove_peer(&key).unwrap();
    }

    /// Removes and re-adds the node's peer as `/join` adds it: the same key and allowed
    /// IP, but no session, so [`Controller::handshake_with`] shows `None` until the node
    /// completes a new handshake. (boringtun's handshake time is only as fine as its
    /// 1 s timer tick, so a new handshake cannot be told from an old one by its time.)
    pub fn reset_peer(&self, node_pubkey: &str) {
        self.remove_peer(node_pubkey);
        let mut peer = Peer::new(Key::try_from(node_pubkey).unwrap());
        peer.allowed_ips = vec![IpAddrMask::new(NODE_TUNNEL_IP.into(), 32)];
        self.wg.as_ref().unwrap().configure_peer(&peer).unwrap();
    }

    /// The last handshake with the node's key, if any.
    pub fn handshake_with(&self, node_pubkey: &str) -> Option<std::time::SystemTime> {
        let key = Key::try_from(node_pubkey).ok()?;
        let host = self.wg.as_ref()?.read_host().ok()?;
        host.peers.get(&key)?.last_handshake
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        if let Some(wg) = self.wg.take() {
            let _ = wg.remove_interface();
        }
    }
}

/// A userspace WireGuard interface `name` with `key` and `address`, listening on
/// [`WG_PORT`], no peers. Created on a thread inside `ns`: the tun device, its UDP socket
/// and boringtun's worker threads all belong to that namespace.
pub fn userspace_wg(ns: &Netns, name: &str, key: &Key, address: &str) -> WGApi<Userspace> {
    let (name, key, address) = (name.to_owned(), key.to_string(), address.to_owned());
    ns.run(move || {
        let mut api = WGApi::<Userspace>::new(name.clone()).unwrap();
        api.create_interface().unwrap();
        api.configure_interface(&InterfaceConfiguration {
            name,
            prvkey: key,
            addresses: vec![address.parse().unwrap()],
            port: WG_PORT,
            peers: vec![],
            mtu: None,
            fwmark: None,
        })
        .unwrap();
        api
    })
}

/// One HTTP request as the test controllers read it.
pub struct Request {
    /// `POST /join HTTP/1.1`
    pub line: String,
    /// The `X-Join-Token` header.
    pub token: Option<String>,
    pub body: Vec<u8>,
}

/// Reads one request (head and Content-Length body) from an accepted connection.
pub fn read_request(stream: &TcpStream) -> std::io::Result<Request> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let (mut length, mut token) = (0usize, None::<String>);
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => length = v.trim().parse().unwrap_or(0),
                "x-join-token" => token = Some(v.trim().to_string()),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    Ok(Request { line, token, body })
}

/// Writes a JSON answer and closes the connection.
pub fn write_reply(mut stream: TcpStream, status: u16, reply: &Value) -> std::io::Result<()> {
    let text = reply.to_string();
    write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
}

fn handle(
    stream: TcpStream,
    state: &Mutex<State>,
    wg: &WGApi<Userspace>,
    key: &Key,
) -> std::io::Result<()> {
    let req = read_request(&stream)?;
    let (status, reply) = answer(&req.line, req.token.as_deref(), &req.body, state, wg, key);
    write_reply(stream, status, &reply)
}

fn answer(
    request_line: &str,
    token: Option<&str>,
    body: &[u8],
    state: &Mutex<State>,
    wg: &WGApi<Userspace>,
    key: &Key,
) -> (u16, Value) {
    let mut s = state.lock().unwrap();
    s.requests += 1;
    if !request_line.starts_with("POST /join ") {
        return (404, json!({"ok": false, "error": "not found"}));
    }
    match s.answer {
        Answer::Forbidden => return (403, json!({"ok": false, "error": "forbidden"})),
        Answer::ServerError => return (500, json!({"ok": false, "error": "boom"})),
        Answer::Ok => {}
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
    let mut peer = Peer::new(node_key);
    peer.allowed_ips = vec![IpAddrMask::new(NODE_TUNNEL_IP.into(), 32)];
    // boringtun cannot modify a peer in place; a known key keeps its peer as it is.
    let known = wg
        .read_host()
        .is_ok_and(|h| h.peers.contains_key(&peer.public_key));
    if !known {
        wg.configure_peer(&peer).unwrap();
    }
    s.node_pubkey = Some(pubkey.to_string());
    (
        200,
        json!({"ok": true, "node_id": node_id, "node_ip": NODE_TUNNEL_IP.to_string(),
               "controller_pubkey": key.public_key().to_string(), "endpoint": s.endpoint,
               "allowed_ips": format!("{CTL_TUNNEL_IP}/32"), "wg_net": "10.50.0.0/24"}),
    )
}

/// The agent's API as the controller reaches it: over the tunnel, without a token.
pub fn tunnel_api(ctl: &Controller, token: &str) -> super::client::Api {
    super::client::Api::new(
        ctl.ns.name(),
        SocketAddr::from((NODE_TUNNEL_IP, super::topology::API_PORT)),
        token,
    )
}
