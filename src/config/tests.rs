//! Parsing and validation of the settings, through clap as the binary does it.

use std::path::PathBuf;

use super::*;
use crate::model::PortMap;
use crate::vm::VmConfig;
use clap::Parser;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    s: Settings,
}

fn parse(args: &[&str]) -> Result<Settings, String> {
    let mut all = vec!["x"];
    all.extend_from_slice(args);
    Cli::try_parse_from(all)
        .map(|c| c.s)
        .map_err(|e| e.to_string())
}

#[test]
fn defaults_match_the_original_agent() {
    let s = parse(&[]).unwrap();
    assert_eq!(s.state.data_dir, PathBuf::from("/data"));
    assert_eq!(s.api.node_api_port, 8000);
    assert_eq!(s.mesh.wg_iface, "wg0");
    assert_eq!(s.portmaps.vms_bridge, "virbr0");
    assert_eq!(s.portmaps.vm_subnet.to_string(), "192.168.122.0/24");
    assert_eq!(s.vms.libvirt_uri, "qemu:///system");
    assert_eq!(s.vms.vms_work_dir, PathBuf::from("/srv/vms"));
    assert_eq!(s.vms.vms_network, "default");
    assert_eq!(s.vms.vms_arch, "x86_64");
    assert_eq!(s.reconcile_interval, 30);
    assert!(!s.portmaps.cleanup_on_exit);
    assert_eq!(s.mesh.wg_mode, WgMode::Auto);
    assert_eq!(s.mesh.wg_mtu, 1420);
    assert_eq!(s.mesh.wg_keepalive, 25);
    assert!(s.mesh.trust_controller_tunnel);
    assert_eq!(
        (
            s.api.header_read_timeout,
            s.api.body_read_timeout,
            s.api.keepalive_timeout
        ),
        (10, 30, 60)
    );
    assert_eq!(s.api.max_connections, 1024);
    assert_eq!((s.api.upload_min_bytes, s.api.upload_window), (65_536, 30));
    s.validate().unwrap();
    assert!(s.mesh.join_settings().unwrap().is_none());
}

#[test]
fn bad_values_name_the_variable_and_the_value() {
    let e = parse(&["--node-api-port", "70000"]).unwrap_err();
    assert!(e.contains("NODE_API_PORT") && e.contains("70000"), "{e}");
    let e = parse(&["--vm-subnet", "10.0.0.0/33"]).unwrap_err();
    assert!(e.contains("VM_SUBNET") && e.contains("10.0.0.0/33"), "{e}");
    let e = parse(&["--vms-bridge", "br/../x"]).unwrap_err();
    assert!(e.contains("VMS_BRIDGE"), "{e}");
    let e = parse(&["--reserved-ports", "80,0"]).unwrap_err();
    assert!(e.contains("RESERVED_PORTS"), "{e}");
    let e = parse(&["--reconcile-interval", "0"]).unwrap_err();
    assert!(e.contains("RECONCILE_INTERVAL"), "{e}");
}

#[test]
fn connection_settings_are_bounded_and_named_when_wrong() {
    for (flag, bad) in [
        ("--header-read-timeout", "0"),
        ("--header-read-timeout", "301"),
        ("--body-read-timeout", "0"),
        ("--keepalive-timeout", "x"),
        ("--max-connections", "15"),
        ("--upload-min-bytes", "0"),
        ("--upload-window", "3601"),
    ] {
        let e = parse(&[flag, bad]).unwrap_err();
        let variable = flag
            .trim_start_matches("--")
            .replace('-', "_")
            .to_uppercase();
        assert!(
            e.contains(&variable) && e.contains(bad),
            "{flag} {bad}: {e}"
        );
    }
    let s = parse(&["--max-connections", "4096", "--keepalive-timeout", "5"]).unwrap();
    assert_eq!((s.api.max_connections, s.api.keepalive_timeout), (4096, 5));
}

#[test]
fn join_settings_are_all_or_nothing() {
    let s = parse(&["--controller-url", "http://c:5000", "--node-id", "n1"]).unwrap();
    let e = s.validate().unwrap_err().to_string();
    assert_eq!(
        e,
        "CONTROLLER_URL and NODE_ID are set but JOIN_TOKEN is not: joining the mesh needs \
         CONTROLLER_URL, JOIN_TOKEN and NODE_ID together; unset CONTROLLER_URL and NODE_ID \
         to run standalone"
    );
    let s = parse(&["--controller-url", "http://c:5000"]).unwrap();
    let e = s.validate().unwrap_err().to_string();
    assert!(
        e.starts_with("CONTROLLER_URL is set but JOIN_TOKEN and NODE_ID are not:"),
        "{e}"
    );
    let s = parse(&[
        "--controller-url",
        "http://c:5000",
        "--node-id",
        "n1",
        "--join-token",
        "t",
    ])
    .unwrap();
    s.validate().unwrap();
    assert_eq!(s.mesh.join_settings().unwrap().unwrap().node_id, "n1");
    let s = parse(&[
        "--controller-url",
        "ftp://c",
        "--node-id",
        "n1",
        "--join-token",
        "t",
    ])
    .unwrap();
    assert!(
        s.validate()
            .unwrap_err()
            .to_string()
            .contains("CONTROLLER_URL")
    );
}

#[test]
fn cross_checks_refuse_open_relays_and_weak_tokens() {
    let s = parse(&["--allowed-targets", "10.0.0.0/8,0.0.0.0/0"]).unwrap();
    let e = s.validate().unwrap_err().to_string();
    assert!(
        e.contains("ALLOWED_TARGETS") && e.contains("0.0.0.0/0"),
        "{e}"
    );
    let s = parse(&["--api-token", "short"]).unwrap();
    let e = s.validate().unwrap_err().to_string();
    assert!(e.contains("API_TOKEN") && !e.contains("short"), "{e}");
    let s = parse(&["--vm-subnet", "0.0.0.0/0"]).unwrap();
    assert!(s.validate().is_err());
}

#[test]
fn values_that_parse_but_cannot_work_are_refused_by_name() {
    let refused = |args: &[&str], variable: &str, says: &str| {
        let e = parse(args).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains(variable) && e.contains(says), "{args:?}: {e}");
    };
    refused(
        &["--vm-subnet", "10.0.0.5/8"],
        "VM_SUBNET=\"10.0.0.5/8\"",
        "host bits are set; the network is 10.0.0.0/8",
    );
    refused(
        &["--allowed-targets", "10.1.2.3/16"],
        "ALLOWED_TARGETS",
        "the network is 10.1.0.0/16",
    );
    refused(
        &["--vms-work-dir", "relative/dir"],
        "VMS_WORK_DIR=\"relative/dir\"",
        "absolute path",
    );
    refused(&["--vms-host-dir", "pool"], "VMS_HOST_DIR", "absolute path");
    refused(
        &["--libvirt-uri", "banana"],
        "LIBVIRT_URI=\"banana\"",
        "not a libvirt URI",
    );
    refused(
        &["--libvirt-uri", "xen:///system"],
        "LIBVIRT_URI",
        "driver \"xen\"",
    );
    refused(
        &["--libvirt-uri", "qemu+carrier://h/system"],
        "LIBVIRT_URI",
        "transport \"carrier\"",
    );
    refused(
        &["--libvirt-uri", "qemu:///sytem"],
        "LIBVIRT_URI",
        "/system",
    );
    refused(&["--libvirt-uri", "qemu://"], "LIBVIRT_URI", "no path");
    for ok in [
        "qemu:///system",
        "qemu:///session",
        "qemu+ssh://root@node-7:2222/system?keyfile=/k",
        "qemu+tcp://10.77.3.2/system",
        "qemu+unix:///system?socket=/run/libvirt/libvirt-sock",
        "test:///default",
    ] {
        parse(&["--libvirt-uri", ok]).unwrap().validate().unwrap();
    }
    parse(&["--vm-subnet", "10.0.0.0/8"])
        .unwrap()
        .validate()
        .unwrap();
}

#[test]
fn a_bad_port_in_a_list_says_which_value() {
    let e = parse(&["--reserved-ports", "80,abc"]).unwrap_err();
    assert!(
        e.contains("RESERVED_PORTS") && e.contains("\"abc\" is not a port number (1..65535)"),
        "{e}"
    );
    assert!(!e.contains("invalid digit"), "{e}");
    assert_eq!(
        parse(&["--reserved-ports", "80, 443"])
            .unwrap()
            .portmaps
            .reserved_ports,
        [80, 443]
    );
}

#[test]
fn the_policy_keeps_the_nodes_own_ports_and_the_listed_ones() {
    let s = parse(&[
        "--node-api-port",
        "8100",
        "--wg-listen-port",
        "51820",
        "--reserved-ports",
        "8443",
        "--allowed-targets",
        "10.9.0.0/16",
    ])
    .unwrap();
    let policy = crate::portmap::Policy::from_settings(&s);
    let map = |port: u16, ip: &str| PortMap {
        listen_port: port,
        target_ip: ip.parse().unwrap(),
        target_port: 80,
        proto: crate::model::Proto::Tcp,
    };
    for (port, says) in [
        (22, "SSH"),
        (8100, "NODE_API_PORT"),
        (51820, "WG_LISTEN_PORT"),
        (8443, "RESERVED_PORTS"),
    ] {
        let e = policy.check(&map(port, "192.168.122.10")).unwrap_err();
        assert!(e.to_string().contains(says), "{port}: {e}");
    }
    policy.check(&map(8000, "192.168.122.10")).unwrap();
    policy.check(&map(8000, "10.9.1.1")).unwrap();
    assert!(policy.check(&map(8000, "10.10.1.1")).is_err());
}

#[test]
fn the_vm_config_comes_from_the_vm_group() {
    let s = parse(&[
        "--vms-work-dir",
        "/w",
        "--vms-host-dir",
        "/h",
        "--ssh-authorized-keys",
        "ssh-ed25519 AAAA a\n\n",
        "--vm-stop-timeout",
        "7",
    ])
    .unwrap();
    let cfg = VmConfig::from(&s.vms);
    assert_eq!(s.vms.pool_dir(), std::path::Path::new("/h"));
    assert_eq!(cfg.pool, "node-vm-agent");
    assert_eq!(cfg.stop_timeout, Duration::from_secs(7));
    assert_eq!(cfg.limits.max_disk_gb, 2048);
    assert!(cfg.local);
    let nat = crate::net::nft::NatSettings::from_settings(&s.portmaps, &s.mesh);
    assert_eq!(
        (nat.vms_bridge.as_str(), nat.wg_iface.as_deref()),
        ("virbr0", Some("wg0"))
    );
    assert_eq!(nat.external_iface, None);
}

#[test]
fn diff_lists_only_the_settings_it_uses_and_parses_the_same_environment() {
    use clap::CommandFactory;
    #[derive(Parser)]
    struct DiffCli {
        #[command(flatten)]
        s: DiffSettings,
    }
    let cmd = DiffCli::command();
    let shown: Vec<&str> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_long().is_some_and(|l| l != "help"))
        .map(|a| a.get_id().as_str())
        .collect();
    let mut want = DIFF_READS.to_vec();
    want.sort_unstable();
    let mut got = shown.clone();
    got.sort_unstable();
    assert_eq!(
        got, want,
        "every name in DIFF_READS is a setting, and only those show"
    );
    // The hidden ones still parse, so one environment serves serve and diff alike.
    let d = DiffCli::try_parse_from(["x", "--data-dir", "/tmp/d", "--libvirt-timeout", "5"])
        .unwrap()
        .s
        .0;
    assert_eq!(d.state.data_dir, PathBuf::from("/tmp/d"));
    assert_eq!(d.vms.libvirt_timeout, 5);
}

#[test]
fn libvirt_keepalives_default_is_the_connections_own() {
    // Two spellings of one default: the setting's (documented) and the one
    // `Libvirt::new` uses when no setting is given.
    assert_eq!(
        DEFAULT_LIBVIRT_KEEPALIVE_S,
        crate::vm::driver::libvirt::KEEPALIVE_INTERVAL_S
    );
    let s = parse(&[]).unwrap();
    assert_eq!(s.vms.libvirt_keepalive, DEFAULT_LIBVIRT_KEEPALIVE_S);
}
