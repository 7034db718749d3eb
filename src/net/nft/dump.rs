//! Dumping the elements of several sets, the flow sets on a second socket and thread.
//!
//! A read of the table is mostly the kernel's dump work, done inside `recvmsg` on the
//! thread that reads: for 10,000 maps about 15 ms for the DNAT map and as much for the
//! flow set (both counted). Dumped side by side on two threads, two cores do it in about
//! half the time; on one core it costs what one thread does (docs/decisions/24-apply-all-in-place.md).

use std::collections::BTreeMap;

use nlink::netlink::nftables::SetElement;
use nlink::netlink::{Connection, Nftables};

use super::error::NftError;
use super::sets::{self, Kind};
use super::table::{FAMILY, TABLE};

/// Every element of each set in `names`, by name.
pub async fn elements(
    conn: &Connection<Nftables>,
    names: &[&'static str],
) -> Result<BTreeMap<&'static str, Vec<SetElement>>, NftError> {
    let (aside, here): (Vec<&'static str>, Vec<&'static str>) =
        names.iter().partition(|n| is_flow_set(n));
    let helper = on_own_thread(aside.clone());
    let mut out = BTreeMap::new();
    for name in here {
        out.insert(name, dump(conn, name).await?);
    }
    match helper {
        Some(answer) => {
            let dumped = answer
                .await
                .map_err(|_| NftError::Socket("the dump thread ended without an answer".into()))?;
            out.extend(dumped?);
        }
        None => {
            for name in aside {
                out.insert(name, dump(conn, name).await?);
            }
        }
    }
    Ok(out)
}

fn is_flow_set(name: &str) -> bool {
    crate::model::Proto::ALL
        .iter()
        .any(|p| sets::name(Kind::Flows, *p) == name)
}

async fn dump(conn: &Connection<Nftables>, name: &str) -> Result<Vec<SetElement>, NftError> {
    conn.list_set_elements(TABLE, name, FAMILY)
        .await
        .map_err(NftError::kernel("list set elements"))
}

type Dumped = Result<Vec<(&'static str, Vec<SetElement>)>, NftError>;

/// Dumps `names` on a new thread (in the calling thread's network namespace, which a
/// new thread inherits) with a socket and runtime of its own. `None` when nothing is
/// to be dumped or the thread cannot be started: the caller dumps them itself.
fn on_own_thread(names: Vec<&'static str>) -> Option<tokio::sync::oneshot::Receiver<Dumped>> {
    if names.is_empty() {
        return None;
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let started = std::thread::Builder::new()
        .name("nft-dump".into())
        .spawn(move || {
            let _ = tx.send(dump_all(&names));
        });
    match started {
        Ok(_) => Some(rx),
        Err(e) => {
            tracing::debug!(error = %e, "no dump thread; dumping on one socket");
            None
        }
    }
}

fn dump_all(names: &[&'static str]) -> Dumped {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NftError::Socket(format!("dump thread runtime: {e}")))?;
    rt.block_on(async {
        let conn = Connection::<Nftables>::new().map_err(|e| NftError::Socket(e.to_string()))?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push((*name, dump(&conn, name).await?));
        }
        Ok(out)
    })
}
