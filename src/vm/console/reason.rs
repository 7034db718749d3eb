//! Why a console session ended: the name the audit row and the event give it, and the
//! WebSocket close frame the client gets (code and reason text).

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The client closed the WebSocket (or its connection went away).
    Client,
    /// Another session took the console over with `force=true`.
    Forced { by: String, from: Option<String> },
    /// The guest's side closed: the VM stopped (powered off, stopped, destroyed).
    VmStopped,
    /// The VM was deleted.
    VmDeleted,
    /// No byte either way for CONSOLE_IDLE_TIMEOUT.
    Idle,
    /// The client stopped reading what the guest wrote.
    SlowClient,
    /// libvirt failed the stream or stopped answering.
    Libvirt(String),
    /// The agent is shutting down.
    Shutdown,
}

/// Close codes of the private range (4000-4999) for what the standard ones do not say.
pub const CLOSE_FORCED: u16 = 4001;
pub const CLOSE_IDLE: u16 = 4002;
pub const CLOSE_VM_STOPPED: u16 = 4003;

impl EndReason {
    /// The name in the audit row and the `console.detached` event.
    pub fn as_str(&self) -> &'static str {
        match self {
            EndReason::Client => "client",
            EndReason::Forced { .. } => "forced",
            EndReason::VmStopped => "vm-stopped",
            EndReason::VmDeleted => "vm-deleted",
            EndReason::Idle => "idle-timeout",
            EndReason::SlowClient => "slow-client",
            EndReason::Libvirt(_) => "libvirt",
            EndReason::Shutdown => "agent-shutdown",
        }
    }

    /// The WebSocket close code: 1001 going away (the agent stops), 1011 for libvirt's
    /// failure, 1008 for a client that does not read, the private codes otherwise.
    pub fn close_code(&self) -> u16 {
        match self {
            EndReason::Client => 1000,
            EndReason::Forced { .. } => CLOSE_FORCED,
            EndReason::VmStopped | EndReason::VmDeleted => CLOSE_VM_STOPPED,
            EndReason::Idle => CLOSE_IDLE,
            EndReason::SlowClient => 1008,
            EndReason::Libvirt(_) => 1011,
            EndReason::Shutdown => 1001,
        }
    }

    /// The close frame's reason, for a person (at most 123 bytes, as the frame allows).
    pub fn close_text(&self) -> String {
        let text = match self {
            EndReason::Client => "closed by the client".to_string(),
            EndReason::Forced { by, from } => format!(
                "taken over by another session ({by}{})",
                from.as_deref()
                    .map_or_else(String::new, |a| format!(" from {a}"))
            ),
            EndReason::VmStopped => "the VM stopped".into(),
            EndReason::VmDeleted => "the VM was deleted".into(),
            EndReason::Idle => "idle for CONSOLE_IDLE_TIMEOUT".into(),
            EndReason::SlowClient => "the client did not read the console's output".into(),
            EndReason::Libvirt(e) => format!("libvirt: {e}"),
            EndReason::Shutdown => "the agent is shutting down".into(),
        };
        truncate(text, 123)
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_close_reason_fits_a_close_frame() {
        let long = EndReason::Libvirt("é".repeat(200));
        assert!(long.close_text().len() <= 123);
        assert_eq!(
            EndReason::Forced {
                by: "token".into(),
                from: Some("10.0.0.1:5000".into())
            }
            .close_text(),
            "taken over by another session (token from 10.0.0.1:5000)"
        );
    }
}
