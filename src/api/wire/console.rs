//! `GET /vms/{name}/console/attach`: its query, and the WebSocket subprotocols.

use serde::Deserialize;

/// The subprotocol the agent selects when a client offers it (a browser that sends its
/// token as a subprotocol must offer this one too: the answer names one it offered).
pub const CONSOLE_SUBPROTOCOL: &str = "console.node-vm-agent";

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AttachQuery {
    /// Take the console over: the session that holds it is closed (code 4001, naming
    /// who took it), and so is another libvirt client's (a `virsh console`).
    pub force: Option<bool>,
}
