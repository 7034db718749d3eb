//! The serial port of a VM defined before the interactive console: a plain file, which
//! libvirt cannot open a console on. Such a VM is defined again, while it is stopped,
//! with the pty the agent defines now; the pty logs to the same file, so the console log
//! keeps what it had.

use crate::vm::driver::{Call, Disk, Domain, Hypervisor, LibvirtFailure, SerialPort, VmDefinition};

/// Defines `vm` again (same UUID, MAC, disk, seed and log file) when its domain `d` is
/// one of the agent's, stopped, with a file for its serial port; a running one keeps its
/// device until it stops. Set to start with the host when `autostart`. Blocking. True
/// when it defined it again.
pub(super) fn give_a_pty(
    hv: &dyn Hypervisor,
    call: &Call,
    vm: &VmDefinition,
    d: &Domain,
    autostart: bool,
) -> Result<bool, LibvirtFailure> {
    if d.active || d.serial != SerialPort::File || d.instance_id.is_none() {
        return Ok(false);
    }
    hv.define(call, vm, &Disk::Keep, None, autostart)?;
    tracing::info!(
        vm = %vm.name,
        "defined the VM again: its serial port is a pty now, logging to the same file"
    );
    Ok(true)
}
