//! The link-mode decision, without a link.

use super::*;

fn no_kernel() -> Result<(), WgError> {
    Err(WgError::Wireguard {
        ifname: "wg0".into(),
        op: "create the kernel link",
        reason: "Operation not supported (os error 95)".into(),
    })
}

#[test]
fn auto_prefers_the_kernel_and_falls_back_to_userspace_saying_why() {
    let c = choose(WgMode::Auto, &Existing::Absent, || Ok(())).unwrap();
    assert_eq!((c.mode, c.created), (TunnelMode::Kernel, true));
    let c = choose(WgMode::Auto, &Existing::Absent, no_kernel).unwrap();
    assert_eq!(c.mode, TunnelMode::Userspace);
    assert!(c.fallback.unwrap().contains("not supported"));
}

#[test]
fn an_existing_kernel_link_is_reused_without_creating() {
    for mode in [WgMode::Auto, WgMode::Kernel] {
        let c = choose(mode, &Existing::Wireguard, || panic!("must not create")).unwrap();
        assert_eq!((c.mode, c.created), (TunnelMode::Kernel, false));
    }
    let e = choose(WgMode::Userspace, &Existing::Wireguard, no_kernel).unwrap_err();
    assert!(e.to_string().contains("WG_MODE=userspace"), "{e}");
}

#[test]
fn explicit_modes_do_not_fall_back() {
    let e = choose(WgMode::Kernel, &Existing::Absent, no_kernel).unwrap_err();
    assert!(e.to_string().contains("WG_MODE=kernel"), "{e}");
    let c = choose(WgMode::Userspace, &Existing::Absent, || {
        panic!("must not probe")
    })
    .unwrap();
    assert_eq!(c.mode, TunnelMode::Userspace);
}

#[test]
fn a_foreign_link_under_the_name_is_refused() {
    for mode in [WgMode::Auto, WgMode::Kernel, WgMode::Userspace] {
        let e = choose(mode, &Existing::Other(Some("veth".into())), || Ok(())).unwrap_err();
        assert!(e.to_string().contains("veth"), "{e}");
    }
}
