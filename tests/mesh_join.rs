//! The mesh join through the real agent binary and a real (userspace) WireGuard tunnel to
//! a test controller that speaks the original protocol (tests/support/controller.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::controller::{
    Answer, CTL_TUNNEL_IP, Controller, NODE_TUNNEL_IP, tunnel_api, unique_ifname,
};
use support::*;

fn wait_for(what: &str, bound: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < bound {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn health(agent: &Agent) -> Value {
    let r = agent.api.request("GET", "/health", None, None).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    r.json().clone()
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn wait_joined_with_handshake(agent: &Agent) {
    wait_for("join and first handshake", Duration::from_secs(15), || {
        let h = health(agent);
        h["join"] == json!("joined") && h["last_handshake_s"].is_u64()
    });
}

#[test]
fn joins_over_a_real_tunnel_trusts_only_the_tunnel_and_follows_changes() {
    let topo = Topology::new();
    let mut ctl = Controller::new(&topo);
    ctl.serve();
    let iface = unique_ifname("wgn");
    let mut env = Controller::agent_env(&iface);
    env.push(("JOIN_REFRESH_INTERVAL".into(), "1".into()));
    let mut agent = Agent::start_with(&topo, &env_refs(&env));
    wait_joined_with_handshake(&agent);
    let h = health(&agent);
    assert_eq!(h["ok"], json!(true));
    assert_eq!(h["node_ip"], json!("10.50.0.2"));
    assert_eq!(h["tunnel"], json!("userspace"));
    assert!(!h.to_string().contains(&agent.token));

    eprintln!("step: The controller reaches /health");
    // The controller reaches /health and /ports over the tunnel without a token.
    let tunnel = tunnel_api(&ctl, &agent.token);
    let r = tunnel.request("GET", "/health", None, None).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let r = tunnel.request("GET", "/ports", None, None).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // ... and changes things, audited as the tunnel path.
    let body = json!({"listen_port": 8080, "target_ip": VM_IP.to_string(), "target_port": 80});
    let r = tunnel
        .request("POST", "/ports", None, Some(&body.to_string()))
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        agent
            .sql("SELECT identity FROM audit_log ORDER BY id DESC LIMIT 1")
            .trim(),
        "controller-tunnel"
    );
    // The same request without a token from a non-tunnel address is refused.
    let r = agent.api.request("GET", "/ports", None, None).unwrap();
    assert_eq!(r.status, 401, "{r:?}");

    eprintln!("step: A request crossing the tunnel");
    // A request crossing the tunnel into the mapped port reaches the VM...
    let _vm_http = HttpServer::start(&topo.vm, sa(VM_IP, 80), "vm");
    let reply = tcp_get(ctl.ns.name(), sa(NODE_TUNNEL_IP, 8080)).unwrap();
    assert_eq!(who(&reply), "vm", "{reply}");
    eprintln!("step: ... and the VM reaches");
    // ... and the VM reaches the controller through the tunnel, masqueraded on WG_IFACE
    // to the node's tunnel address (the controller only routes that one back).
    let _ctl_http = HttpServer::start(&ctl.ns, sa(CTL_TUNNEL_IP, 9000), "ctl");
    let reply = tcp_get(topo.vm.name(), sa(CTL_TUNNEL_IP, 9000)).unwrap();
    assert_eq!(peer_ip(&reply), NODE_TUNNEL_IP.to_string(), "{reply}");

    eprintln!("step: A new endpoint");
    // A new endpoint handed out on a re-join is followed without a restart.
    ctl.move_endpoint();
    // (The live endpoint is not compared: WireGuard roams to wherever the controller
    // answers from.) The desired state and the log show it was applied.
    wait_for("the new endpoint", Duration::from_secs(10), || {
        agent.sql("SELECT endpoint FROM mesh_join").trim() == "10.77.4.3:51820"
            && agent.log().contains("the controller changed the tunnel")
    });
    // boringtun re-creates the peer, so the session is renegotiated: bounded wait.
    wait_for(
        "the tunnel after the endpoint change",
        Duration::from_secs(15),
        || {
            tunnel
                .request("GET", "/health", None, None)
                .is_ok_and(|r| r.status == 200)
        },
    );

    eprintln!("step: A restart reuses");
    // A restart reuses the key and keeps node_ip and the tunnel.
    let pubkey = std::fs::read_to_string(agent.data_dir().join("node.pub")).unwrap();
    agent.restart();
    assert_eq!(
        std::fs::read_to_string(agent.data_dir().join("node.pub")).unwrap(),
        pubkey
    );
    wait_joined_with_handshake(&agent);
    assert_eq!(health(&agent)["node_ip"], json!("10.50.0.2"));
    let r = tunnel.request("GET", "/ports", None, None).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert!(agent.data_dir().join("join.json").exists());

    eprintln!("step: The controller's address forged");
    // The controller's address forged from another interface is dropped, even when the
    // forger would see the replies (a route back to it through the client side).
    let rules = topo
        .node
        .exec_ok(&["nft", "list", "chain", "ip", "node_vm_agent", "antispoof"]);
    assert!(
        rules.contains(&format!("iifname != \"{iface}\" ip saddr 10.50.0.1 drop")),
        "{rules}"
    );
    topo.client
        .exec_ok(&["ip", "addr", "add", "10.50.0.1/32", "dev", "eth0"]);
    topo.client
        .exec_ok(&["ip", "route", "add", "10.50.0.2/32", "via", "10.77.1.1"]);
    topo.node.exec_ok(&[
        "ip",
        "route",
        "add",
        "10.50.0.1/32",
        "via",
        "10.77.1.2",
        "dev",
        "ext0",
    ]);
    let out = topo.client.exec(&[
        "curl",
        "-s",
        "-m",
        "3",
        "-H",
        "X-Forwarded-For: 10.50.0.1",
        "--interface",
        "10.50.0.1",
        "http://10.50.0.2:8000/ports",
    ]);
    assert!(
        !out.status.success(),
        "forged request answered: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Forwarding headers grant nothing from a plain client address either.
    let out = topo.client.exec(&[
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-m",
        "3",
        "-H",
        "X-Forwarded-For: 10.50.0.1",
        "-H",
        "Forwarded: for=10.50.0.1",
        "http://10.77.1.1:8000/ports",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
    drop(agent);
}

#[test]
fn controller_down_at_boot_then_joins_and_403_stops_at_once() {
    let topo = Topology::new();
    let mut ctl = Controller::new(&topo);
    let iface = unique_ifname("wgn");
    let env = Controller::agent_env(&iface);
    // Agent::start_with returns once /health answers: the API is up without a controller.
    let started = Instant::now();
    let agent = Agent::start_with(&topo, &env_refs(&env));
    let h = health(&agent);
    assert_eq!(h["join"], json!("joining"), "{h}");
    eprintln!("API up after {:?} without a controller", started.elapsed());
    ctl.serve();
    wait_joined_with_handshake(&agent);
    let r = tunnel_api(&ctl, &agent.token)
        .request("GET", "/health", None, None)
        .unwrap();
    assert_eq!(r.status, 200);
    drop(agent);

    // A bad join token: one request, a clear log line, no retry storm.
    let topo2 = Topology::new();
    let mut ctl2 = Controller::new(&topo2);
    ctl2.set_answer(Answer::Forbidden);
    ctl2.serve();
    let iface2 = unique_ifname("wgn");
    let agent2 = Agent::start_with(&topo2, &env_refs(&Controller::agent_env(&iface2)));
    wait_for("the refused join", Duration::from_secs(5), || {
        ctl2.requests() >= 1
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(ctl2.requests(), 1, "retried after 403");
    let h = health(&agent2);
    assert_eq!(h["join"], json!("joining"));
    assert!(
        h["join_error"].as_str().unwrap().contains("JOIN_TOKEN"),
        "{h}"
    );
    assert!(agent2.log().contains("set JOIN_TOKEN"), "{}", agent2.log());
}

#[test]
fn an_original_nodes_wg_keys_are_used_as_they_are() {
    // RFC 7748's test key pair, in the `wg genkey` / `wg pubkey` base64 format, as an
    // original node left them (written by a shell redirect: mode 0644, trailing newline).
    const PRIVATE: &str = "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=";
    const PUBLIC: &str = "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=";
    use std::os::unix::fs::PermissionsExt;

    let topo = Topology::new();
    let mut ctl = Controller::new(&topo);
    let iface = unique_ifname("wgn");
    let mut agent = Agent::start_with(&topo, &env_refs(&Controller::agent_env(&iface)));
    // Turn the data dir into an original node's: its keys, no database yet.
    assert!(agent.stop(), "the joining agent exits on SIGTERM");
    let dir = agent.data_dir().to_path_buf();
    for f in ["agent.db", "agent.db-wal", "agent.db-shm", "join.json"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    std::fs::write(dir.join("node.key"), format!("{PRIVATE}\n")).unwrap();
    std::fs::write(dir.join("node.pub"), format!("{PUBLIC}\n")).unwrap();
    std::fs::set_permissions(dir.join("node.key"), std::fs::Permissions::from_mode(0o644)).unwrap();

    ctl.serve();
    agent.start_again();
    wait_joined_with_handshake(&agent);
    // The controller was sent the original public key, and the handshake proves the
    // agent holds the matching private key.
    assert_eq!(
        ctl.state.lock().unwrap().node_pubkey.as_deref(),
        Some(PUBLIC)
    );
    assert!(ctl.handshake_with(PUBLIC).is_some());
    // Reused as they are: same content; only the private key's mode was tightened.
    assert_eq!(
        std::fs::read_to_string(dir.join("node.key"))
            .unwrap()
            .trim(),
        PRIVATE
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("node.pub"))
            .unwrap()
            .trim(),
        PUBLIC
    );
    let mode = std::fs::metadata(dir.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A malformed key file stops the agent with an error naming the file, and is kept.
    assert!(agent.stop(), "the joined agent exits on SIGTERM");
    std::fs::write(dir.join("node.key"), "not a key\n").unwrap();
    let (code, out) = agent.serve_expecting_exit();
    assert_ne!(code, 0);
    assert!(out.contains("node.key"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.join("node.key")).unwrap(),
        "not a key\n"
    );
}

#[test]
fn a_previous_join_brings_the_tunnel_up_while_the_controller_api_is_down() {
    let topo = Topology::new();
    let mut ctl = Controller::new(&topo);
    ctl.serve();
    let iface = unique_ifname("wgn");
    let mut agent = Agent::start_with(&topo, &env_refs(&Controller::agent_env(&iface)));
    wait_joined_with_handshake(&agent);
    let joins = ctl.requests();

    // The controller's API fails from now on (its WireGuard side stays up).
    ctl.set_answer(Answer::ServerError);
    agent.restart();
    // From the cached join: the tunnel is back, the controller reaches the node through
    // it, and the agent keeps re-joining in the background.
    wait_for(
        "the tunnel from the cached join",
        Duration::from_secs(15),
        || {
            let h = health(&agent);
            h["join"] == json!("cached") && h["last_handshake_s"].is_u64()
        },
    );
    assert_eq!(health(&agent)["node_ip"], json!(NODE_TUNNEL_IP.to_string()));
    let r = tunnel_api(&ctl, &agent.token)
        .request("GET", "/ports", None, None)
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    wait_for("a retried join", Duration::from_secs(10), || {
        ctl.requests() > joins + 1
    });
    assert_eq!(health(&agent)["join"], json!("cached"));

    // When the controller answers again, the node is joined again.
    ctl.set_answer(Answer::Ok);
    wait_for("the re-join", Duration::from_secs(15), || {
        health(&agent)["join"] == json!("joined")
    });
}

/// The original controller with `NODE_PORTMAP_TOKENS` sends the node's token as
/// `X-Portmap-Token` on its proxied `/ports` calls. With TRUST_CONTROLLER_TUNNEL=false
/// that header is the credential: accepted like the bearer token (same audit identity),
/// a wrong one refused like a wrong bearer token.
#[test]
fn the_original_controllers_portmap_token_is_the_api_token_with_tunnel_trust_off() {
    let topo = Topology::new();
    let mut ctl = Controller::new(&topo);
    ctl.serve();
    let iface = unique_ifname("wgn");
    let mut env = Controller::agent_env(&iface);
    env.push(("TRUST_CONTROLLER_TUNNEL".into(), "false".into()));
    let agent = Agent::start_with(&topo, &env_refs(&env));
    wait_joined_with_handshake(&agent);
    let tunnel = tunnel_api(&ctl, &agent.token);

    let r = tunnel.request("GET", "/ports", None, None).unwrap();
    assert_eq!(r.status, 401, "trust is off: no token, no entry: {r:?}");
    let wrong = format!("{}x", agent.token);
    let r = tunnel
        .request_with_headers("GET", "/ports", None, &[("X-Portmap-Token", &wrong)], None)
        .unwrap();
    assert_eq!(r.status, 401, "{r:?}");

    let header = [("X-Portmap-Token", agent.token.as_str())];
    let r = tunnel
        .request_with_headers("GET", "/ports", None, &header, None)
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let body = json!({"listen_port": 8080, "target_ip": VM_IP.to_string(), "target_port": 80});
    let r = tunnel
        .request_with_headers(
            "POST",
            "/ports",
            None,
            &header,
            Some(body.to_string().as_bytes()),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(
        agent
            .sql("SELECT identity FROM audit_log ORDER BY id DESC LIMIT 1")
            .trim(),
        "token"
    );
    assert!(
        !agent.log().contains(&agent.token),
        "the token is never logged"
    );
}

/// New key files on a node that joined before: the controller does not know the new
/// key until a join registers it, so the agent joins first and brings the tunnel up
/// from the answer (the cached join would have the controller drop the first handshake
/// and WireGuard wait 5 s to retry). Only when the controller cannot be reached does it
/// fall back to the cached join, and then it starts the handshake again as soon as a
/// join succeeds.
#[test]
fn a_new_key_is_joined_before_the_tunnel_uses_it() {
    // RFC 7748's test key pairs, in `wg genkey` / `wg pubkey` form.
    const KEYS: [(&str, &str); 2] = [
        (
            "dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo=",
            "hSDwCYkwp1R0i33ctD73Wg2/Og0mOBr066SpjqqbTmo=",
        ),
        (
            "XasIfmJKikt54X+Lg4AO5m87sSkmGLb9HC+LJ/+I4Os=",
            "3p7bfXt9wbTTW2HC7OQ1Nz+DQ8hbeGdNrfx+FG+IK08=",
        ),
    ];
    let topo = Topology::new();
    let mut ctl = Controller::new(&topo);
    ctl.serve();
    let iface = unique_ifname("wgn");
    let mut agent = Agent::start_with(&topo, &env_refs(&Controller::agent_env(&iface)));
    wait_joined_with_handshake(&agent);
    let dir = agent.data_dir().to_path_buf();
    let use_key = |(private, public): (&str, &str)| {
        std::fs::write(dir.join("node.key"), format!("{private}\n")).unwrap();
        std::fs::write(dir.join("node.pub"), format!("{public}\n")).unwrap();
    };

    eprintln!("step: a new key with the controller up");
    assert!(agent.stop());
    use_key(KEYS[0]);
    let started = Instant::now();
    agent.start_again();
    wait_joined_with_handshake(&agent);
    eprintln!("handshake with the new key after {:?}", started.elapsed());
    assert!(ctl.handshake_with(KEYS[0].1).is_some());
    let log = agent.log();
    assert!(log.contains("joining before the tunnel comes up"), "{log}");
    assert!(
        !log.contains("bringing the tunnel up from the previous join"),
        "the tunnel came up with a key the controller did not know: {log}"
    );

    eprintln!("step: a new key with the controller's API down");
    assert!(agent.stop());
    use_key(KEYS[1]);
    ctl.set_answer(Answer::ServerError);
    agent.start_again();
    wait_for(
        "the fallback to the cached join",
        Duration::from_secs(15),
        || health(&agent)["join"] == json!("cached"),
    );
    ctl.set_answer(Answer::Ok);
    wait_joined_with_handshake(&agent);
    assert!(ctl.handshake_with(KEYS[1].1).is_some());
    let log = agent.log();
    assert!(log.contains("handshaking again"), "{log}");
}

/// The original controller's entrypoint does not add its WireGuard peers back after a
/// restart: the node's handshakes go unanswered until it joins again. With no handshake
/// for WG_STALE_AFTER the agent re-joins at once (not at JOIN_REFRESH_INTERVAL, here
/// 300 s) and starts a new handshake; `/health` says so while it lasts.
#[test]
fn a_controller_that_forgot_the_node_has_it_back_after_wg_stale_after() {
    let topo = Topology::new();
    let mut ctl = Controller::new(&topo);
    ctl.serve();
    let iface = unique_ifname("wgn");
    let mut env = Controller::agent_env(&iface);
    env.push(("WG_STALE_AFTER".into(), "8".into()));
    env.push(("JOIN_REFRESH_INTERVAL".into(), "300".into()));
    let agent = Agent::start_with(&topo, &env_refs(&env));
    wait_joined_with_handshake(&agent);
    let pubkey = ctl.state.lock().unwrap().node_pubkey.clone().unwrap();
    let joins = ctl.requests();
    assert_eq!(health(&agent)["tunnel_stale"], json!(false));
    // The join as the event stream tells it (from the buffer: `Last-Event-ID: 0`), and
    // the mesh's series.
    let mut events = support::events::EventStream::open(
        topo.client.name(),
        sa(NODE_IP, API_PORT),
        &agent.token,
        Some("0"),
    )
    .unwrap();
    let mesh = |kind: &str, key: &str, value: &str| {
        let (kind, key, value) = (kind.to_owned(), key.to_owned(), value.to_owned());
        move |ev: &Value| {
            ev["kind"] == kind.as_str() && ev["detail"][key.as_str()] == value.as_str()
        }
    };
    // The tunnel comes up, then the join is done.
    events.until(
        Duration::from_secs(1),
        mesh("mesh.tunnel", "tunnel", "live"),
    );
    events.until(
        Duration::from_secs(1),
        mesh("mesh.state", "state", "joined"),
    );
    let scrape = agent.api.get("/metrics").body;
    let value = |series: &str| support::client::series_value(&scrape, series);
    assert_eq!(
        value(r#"node_vm_agent_mesh_join_state{state="joined"}"#),
        Some(1.0)
    );
    assert_eq!(value("node_vm_agent_mesh_tunnel_stale"), Some(0.0));
    assert!(value("node_vm_agent_mesh_last_handshake_age_seconds").is_some_and(|a| a < 30.0));
    assert!(
        value("node_vm_agent_mesh_tunnel_receive_bytes_total").is_some_and(|b| b > 0.0),
        "{scrape}"
    );
    assert!(
        value("node_vm_agent_mesh_tunnel_transmit_bytes_total").is_some_and(|b| b > 0.0),
        "{scrape}"
    );
    // A live tunnel stays live past WG_STALE_AFTER without a new handshake (WireGuard
    // handshakes every two minutes): the controller answers the agent's probes.
    std::thread::sleep(Duration::from_secs(12));
    assert!(
        !agent.log().contains("the tunnel is dead"),
        "{}",
        agent.log()
    );
    assert_eq!(ctl.requests(), joins, "no re-join of a live tunnel");

    // The controller restarts and forgets its peers.
    ctl.remove_peer(&pubkey);
    let forgotten = Instant::now();
    // Stale (logged once), re-joined, handshaking again: the window in which /health
    // says `tunnel_stale` lasts a join and a handshake, so the log tells it.
    wait_for("the node back", Duration::from_secs(30), || {
        let log = agent.log();
        log.contains("the tunnel is dead") && log.contains("the tunnel is back")
    });
    assert!(ctl.handshake_with(&pubkey).is_some());
    eprintln!(
        "node back {:?} after the controller forgot it",
        forgotten.elapsed()
    );
    events.until(
        Duration::from_secs(5),
        mesh("mesh.tunnel", "tunnel", "stale"),
    );
    events.until(
        Duration::from_secs(5),
        mesh("mesh.tunnel", "tunnel", "live"),
    );
    assert!(ctl.requests() > joins, "it re-joined");
    let r = tunnel_api(&ctl, &agent.token)
        .request("GET", "/health", None, None)
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(health(&agent)["tunnel_stale"], json!(false));
}

/// An endpoint given by name (`host:port`) is resolved when the tunnel is set up, and
/// resolved again when the tunnel goes stale, as wg-quick users do with reresolve-dns:
/// a controller whose name moves to another address keeps its nodes. The agent runs in
/// a mount namespace of its own with the test's /etc/hosts.
#[test]
fn an_endpoint_by_name_is_resolved_again_when_the_tunnel_goes_stale() {
    let topo = Topology::new();
    let mut ctl = Controller::new(&topo);
    let name = "nva-controller.test";
    ctl.state.lock().unwrap().endpoint = format!("{name}:51820");
    ctl.serve();
    let hosts = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        hosts.path(),
        format!("127.0.0.1 localhost\n10.77.4.2 {name}\n"),
    )
    .unwrap();
    let script = format!(
        "mount --bind {} /etc/hosts && exec \"$@\"",
        hosts.path().display()
    );
    let iface = unique_ifname("wgn");
    let mut env = Controller::agent_env(&iface);
    env.push(("WG_STALE_AFTER".into(), "8".into()));
    env.push(("JOIN_REFRESH_INTERVAL".into(), "300".into()));
    let agent = Agent::start_via(
        &topo,
        &["unshare", "-m", "sh", "-c", &script, "sh"],
        &env_refs(&env),
    );
    wait_joined_with_handshake(&agent);

    // The controller moves: its name points at a new address, from which it now sends,
    // and WireGuard no longer answers on the old one (its HTTP API stays where it was).
    ctl.move_endpoint();
    ctl.state.lock().unwrap().endpoint = format!("{name}:51820");
    std::fs::write(
        hosts.path(),
        format!("127.0.0.1 localhost\n10.77.4.3 {name}\n"),
    )
    .unwrap();
    ctl.ns.exec_ok(&[
        "ip",
        "route",
        "replace",
        "10.77.4.0/24",
        "dev",
        "eth0",
        "src",
        "10.77.4.3",
    ]);
    ctl.ns.exec_ok(&[
        "nft",
        "add table ip moved; add chain ip moved in { type filter hook input priority 0; }; \
         add rule ip moved in ip daddr 10.77.4.2 udp dport 51820 drop",
    ]);
    let moved = Instant::now();
    // Nothing is sent from the controller to the node meanwhile (WireGuard would follow
    // the packets' source address on its own): only the name can bring it back.
    wait_for(
        "the tunnel through the new address",
        Duration::from_secs(40),
        || {
            let log = agent.log();
            log.contains("peer (endpoint 10.77.4.3:51820)") && log.contains("the tunnel is back")
        },
    );
    eprintln!(
        "back through the new address {:?} after the move",
        moved.elapsed()
    );
    let r = tunnel_api(&ctl, &agent.token)
        .request("GET", "/health", None, None)
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
}
