//! The console service over the in-memory hypervisor, whose guest echoes what it is sent.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::*;
use crate::vm::service::tests::{Harness, harness, request};

pub(crate) fn settings() -> ConsoleSettings {
    ConsoleSettings {
        max_sessions: 16,
        idle_timeout: Duration::from_secs(60),
        input_rate: 1 << 20,
    }
}

fn client(addr: &str) -> Client {
    Client {
        identity: "token".into(),
        addr: Some(addr.into()),
    }
}

/// A running VM `web` and the consoles over the same twin.
async fn running(max_sessions: usize) -> (Harness, Arc<Consoles>) {
    let h = harness();
    h.vms
        .create(request("web", serde_json::json!({})), "test")
        .await
        .unwrap();
    let consoles = Consoles::new(
        Driver::new(h.hv.clone(), Duration::from_secs(5)),
        h.store.clone(),
        ConsoleSettings {
            max_sessions,
            ..settings()
        },
    );
    (h, consoles)
}

fn web() -> VmName {
    "web".parse().unwrap()
}

async fn recv(s: &mut Session) -> Option<Bytes> {
    tokio::time::timeout(Duration::from_secs(5), s.recv())
        .await
        .unwrap()
}

/// identity, client_addr, outcome, status, parameters
type ConsoleRow = (String, Option<String>, String, Option<i64>, String);

/// The console rows of the audit trail.
fn console_rows(store: &Store) -> Vec<ConsoleRow> {
    store
        .with(|c| {
            let mut st = c.prepare(
                "SELECT identity, client_addr, outcome, status, parameters FROM audit_log \
                 WHERE action = 'GET /vms/{name}/console/attach' ORDER BY id",
            )?;
            let rows = st.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            Ok::<_, StoreError>(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .unwrap()
}

#[tokio::test]
async fn a_session_carries_bytes_both_ways_and_its_row_counts_them_without_them() {
    let (h, consoles) = running(16).await;
    let mut s = consoles
        .attach(web(), client("10.0.0.9:4000"), false)
        .await
        .unwrap();
    assert_eq!(consoles.open(), 1);
    let input = s.input().unwrap();
    assert!(input.send(Bytes::from_static(b"secret-password\n")).await);
    assert_eq!(
        recv(&mut s).await.unwrap(),
        Bytes::from_static(b"secret-password\n")
    );
    s.finish(EndReason::Client).await;
    assert_eq!(consoles.open(), 0);
    let rows = console_rows(&h.store);
    assert_eq!(rows.len(), 1, "{rows:?}");
    let (identity, addr, outcome, status, params) = &rows[0];
    assert_eq!(
        (identity.as_str(), addr.as_deref()),
        ("token", Some("10.0.0.9:4000"))
    );
    assert_eq!((outcome.as_str(), *status), ("ok", Some(101)));
    let p: serde_json::Value = serde_json::from_str(params).unwrap();
    assert_eq!(p["bytes_in"], 16);
    assert_eq!(p["bytes_out"], 16);
    assert_eq!(p["ended"], "client");
    assert!(
        p["attached_at"].is_string() && p["detached_at"].is_string(),
        "{p}"
    );
    let all = h
        .store
        .with(|c| {
            c.query_row("SELECT group_concat(coalesce(parameters,'') || coalesce(error,''), '|') FROM audit_log", [], |r| {
                r.get::<_, Option<String>>(0)
            })
            .map_err(StoreError::from)
        })
        .unwrap()
        .unwrap_or_default();
    assert!(!all.contains("secret-password"), "{all}");
}

#[tokio::test]
async fn a_second_attach_is_told_who_holds_the_console_and_a_forced_one_takes_it() {
    let (_h, consoles) = running(16).await;
    let first = consoles
        .attach(web(), client("10.0.0.9:4000"), false)
        .await
        .unwrap();
    let err = consoles
        .attach(web(), client("10.0.0.7:5000"), false)
        .await
        .unwrap_err();
    let ConsoleError::Held { holder, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(holder.session, first.id());
    assert_eq!(holder.addr.as_deref(), Some("10.0.0.9:4000"));
    assert!(err.to_string().contains("since"), "{err}");
    // The first session's pump ends it when told to.
    let mut stop = first.stop_signal();
    let pump = tokio::spawn(async move {
        let why = stop.wait().await;
        first.finish(why.clone()).await;
        why
    });
    let second = consoles
        .attach(web(), client("10.0.0.7:5000"), true)
        .await
        .unwrap();
    let why = pump.await.unwrap();
    assert_eq!(
        why,
        EndReason::Forced {
            by: "token".into(),
            from: Some("10.0.0.7:5000".into())
        }
    );
    assert_eq!(consoles.open(), 1);
    second.finish(EndReason::Client).await;
}

#[tokio::test]
async fn a_vm_that_stops_ends_its_session_and_unknown_stopped_or_too_many_are_refused() {
    let (h, consoles) = running(1).await;
    let missing = consoles
        .attach("nope".parse().unwrap(), client("a"), false)
        .await;
    assert!(
        matches!(missing, Err(ConsoleError::NoSuchVm(_))),
        "{missing:?}"
    );
    let mut s = consoles.attach(web(), client("a"), false).await.unwrap();
    h.vms
        .create(request("db", serde_json::json!({})), "test")
        .await
        .unwrap();
    let full = consoles
        .attach("db".parse().unwrap(), client("a"), false)
        .await;
    assert!(matches!(full, Err(ConsoleError::TooMany(1))), "{full:?}");
    h.hv.destroy_outside("web");
    assert_eq!(recv(&mut s).await, None);
    assert_eq!(s.stream_end().await, EndReason::VmStopped);
    s.finish(EndReason::VmStopped).await;
    let stopped = consoles.attach(web(), client("a"), false).await;
    assert!(
        matches!(stopped, Err(ConsoleError::NotRunning(_))),
        "{stopped:?}"
    );
}

#[tokio::test]
async fn the_agent_stopping_ends_every_session_and_refuses_new_ones() {
    let (_h, consoles) = running(16).await;
    let s = consoles.attach(web(), client("a"), false).await.unwrap();
    let mut stop = s.stop_signal();
    let pump = tokio::spawn(async move {
        let why = stop.wait().await;
        s.finish(why.clone()).await;
        why
    });
    consoles.close_all(EndReason::Shutdown).await;
    assert_eq!(pump.await.unwrap(), EndReason::Shutdown);
    assert_eq!(consoles.open(), 0);
    let late = consoles.attach(web(), client("a"), false).await;
    assert!(matches!(late, Err(ConsoleError::ShuttingDown)), "{late:?}");
}
