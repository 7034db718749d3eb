//! Domain types every layer shares: storage, services, drivers and the API depend on
//! this module, and it depends on none of them (only on serde, base64 and rusqlite's value
//! traits, so each type knows its own column and JSON spelling). A type here is what
//! the agent means by a word, spelled once.

use std::fmt;
use std::str::FromStr;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Serialize};

/// A string that passed its check: `$check(&str) -> Result<String, $err>` returns the
/// value to keep (an SSH key is trimmed) or why it was refused. Built only through that
/// check (`FromStr`, `TryFrom<String>`, serde, SQL), then read as a `&str`.
macro_rules! checked_string {
    ($(#[$m:meta])* $name:ident, $check:path, $err:ty) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = $err;
            fn from_str(s: &str) -> Result<Self, $err> {
                $check(s).map($name)
            }
        }

        impl TryFrom<String> for $name {
            type Error = $err;
            fn try_from(s: String) -> Result<Self, $err> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl rusqlite::types::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(rusqlite::types::ToSqlOutput::from(self.0.as_str()))
            }
        }

        /// A stored value that no longer passes the check is an error, not a value.
        impl rusqlite::types::FromSql for $name {
            fn column_result(
                v: rusqlite::types::ValueRef<'_>,
            ) -> rusqlite::types::FromSqlResult<Self> {
                v.as_str()?
                    .parse()
                    .map_err(|e: $err| rusqlite::types::FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

/// A word that is none of the values of a spelled enum (`spelled!`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{word:?} is not a {kind}")]
pub struct UnknownWord {
    pub kind: &'static str,
    pub word: String,
}

pub mod allow;
pub mod iface;
pub mod mac;
pub mod name;
pub mod portmap;
pub mod ssh_key;
pub mod time;

pub use allow::{AllowList, AllowListError};
pub use iface::IfaceName;
pub use mac::MacAddr;
pub use name::VmName;
pub use portmap::{MapCounters, PortMap, PortRule, Proto};
pub use ssh_key::SshKey;

/// Spells a fieldless enum one way in Rust, SQL (its CHECK constraint) and JSON.
macro_rules! spelled {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident => $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($(#[$vm])* $v),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$v),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$v => $s),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownWord;
            fn from_str(s: &str) -> Result<Self, UnknownWord> {
                match s {
                    $($s => Ok($name::$v),)+
                    other => Err(UnknownWord {
                        kind: stringify!($name),
                        word: other.to_owned(),
                    }),
                }
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(v: ValueRef<'_>) -> FromSqlResult<Self> {
                v.as_str()?
                    .parse()
                    .map_err(|e: UnknownWord| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

spelled!(
    /// What the operator last asked of a VM (`vms.desired_state`): the reconcile starts
    /// a `Running` VM whose domain it had to define again.
    DesiredState {
        Running => "running",
        Stopped => "stopped",
    }
);

spelled!(
    /// Where a base image is (`images.state`).
    ImageState {
        /// Being downloaded or uploaded; not usable yet.
        Downloading => "downloading",
        Ready => "ready",
        /// The transfer failed (`images.error` says why); delete it and add it again.
        Failed => "failed",
    }
);

spelled!(
    /// What a VM is, as `GET /vms` shows it: libvirt's state of its domain, or the
    /// agent's word for a VM libvirt does not show. `vms.last_state` keeps the last one
    /// observed for the agent's VMs (libvirt's states and `missing`).
    VmState {
        /// libvirt knows no state (`VIR_DOMAIN_NOSTATE`, or a state newer than the agent).
        Nostate => "nostate",
        Running => "running",
        /// Blocked on a resource (libvirt's `blocked`); still running.
        Blocked => "blocked",
        Paused => "paused",
        /// Shutting down.
        Shutdown => "shutdown",
        /// Defined and not running.
        Shutoff => "shutoff",
        Crashed => "crashed",
        /// Suspended by the guest's power management.
        Pmsuspended => "pmsuspended",
        /// A create is in flight (not in libvirt yet, or not finished).
        Creating => "creating",
        /// A create failed after its request stopped waiting (`error` says why).
        Failed => "failed",
        /// The agent's row has no domain in libvirt's last listing: the reconcile
        /// defines it again.
        Missing => "missing",
    }
);

impl VmState {
    /// The states `vms.last_state` may hold (its CHECK constraint, migration 0006):
    /// what libvirt said, or that it had no such domain.
    pub const OBSERVED: &'static [VmState] = &[
        VmState::Nostate,
        VmState::Running,
        VmState::Blocked,
        VmState::Paused,
        VmState::Shutdown,
        VmState::Shutoff,
        VmState::Crashed,
        VmState::Pmsuspended,
        VmState::Missing,
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_state_is_spelled_the_same_in_rust_sql_and_json() {
        let c = rusqlite::Connection::open_in_memory().unwrap();
        for s in DesiredState::ALL {
            let back: DesiredState = c.query_row("SELECT ?1", [s], |r| r.get(0)).unwrap();
            assert_eq!(back, *s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(s.as_str().parse::<DesiredState>(), Ok(*s));
        }
        for s in ImageState::ALL {
            let back: ImageState = c.query_row("SELECT ?1", [s], |r| r.get(0)).unwrap();
            assert_eq!(back, *s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in VmState::ALL {
            let back: VmState = c.query_row("SELECT ?1", [s], |r| r.get(0)).unwrap();
            assert_eq!(back, *s);
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        let bad: rusqlite::Result<ImageState> = c.query_row("SELECT 'half'", [], |r| r.get(0));
        assert!(bad.is_err());
    }

    /// The CHECK constraints of migrations 0003 and 0006 allow exactly these spellings.
    #[test]
    fn the_schema_allows_exactly_the_spellings_of_the_enums() {
        let store = crate::store::Store::open_in_memory().unwrap();
        let sql: String = store
            .with(|c| {
                Ok::<_, crate::store::StoreError>(c.query_row(
                    "SELECT group_concat(sql, ' ') FROM sqlite_master WHERE name IN ('vms', 'images')",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        let desired = DesiredState::ALL
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let image = ImageState::ALL
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            sql.contains(&format!("desired_state IN ({desired})")),
            "{sql}"
        );
        assert!(sql.contains(&format!("state IN ({image})")), "{sql}");
        let observed = VmState::OBSERVED
            .iter()
            .map(|s| format!("'{s}'"))
            .collect::<Vec<_>>()
            .join(", ");
        assert!(
            sql.contains(&format!("last_state IN ({observed})")),
            "{sql}"
        );
    }
}
