//! `GET /events`: the node's events as Server-Sent Events (`crate::events` keeps them).
//! Each message's `id:` is the event's id and its `data:` the event as JSON; a client
//! that reconnects with `Last-Event-ID` gets what it missed from the buffer. A stream
//! that falls too far behind is ended, so a slow reader never slows the agent; at most
//! [`MAX_STREAMS`] are open at once.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Sse;
use axum::response::sse::{Event as SseEvent, KeepAlive};
use futures_util::Stream;
use tokio::sync::{OwnedSemaphorePermit, broadcast, watch};

use super::error::{ApiError, ErrorBody};
use super::state::AppState;
use crate::events::{self, Event};

/// Event streams open at once; one more is refused with 503.
pub const MAX_STREAMS: usize = 32;

/// A comment line this often keeps proxies and idle timers from closing a quiet stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[utoipa::path(
    get, path = "/events", tag = "node",
    params(("Last-Event-ID" = Option<u64>, Header,
        description = "Resume after this event id (the last `id:` received): the buffered \
        events after it come first (the last 1,024 are kept; when some are gone, a \
        `stream.reset` event says how many). `0`: every buffered event. Absent: live events only.")),
    responses(
        (status = 200, description = "A Server-Sent Events stream of JSON events \
            `{\"id\",\"time\",\"kind\",\"subject\",\"detail\"}`; kinds: vm.defined, vm.undefined, \
            vm.started, vm.suspended, vm.resumed, vm.stopped, vm.shutdown, vm.crashed, \
            vm.pmsuspended, portmap.added, portmap.removed, portmap.repaired, mesh.state, \
            mesh.tunnel, reconcile.repaired, image.progress, image.ready, image.failed, \
            stream.reset. A reader more than 256 events behind is disconnected (reconnect \
            with Last-Event-ID).", content_type = "text/event-stream", body = String),
        (status = 400, description = "Last-Event-ID is not a number", body = ErrorBody),
        (status = 503, description = "32 streams are open already", body = ErrorBody),
    ),
)]
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let last = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "Last-Event-ID must be an event id (a whole number)",
                    )
                })?,
        ),
    };
    let permit = Arc::clone(&state.event_streams)
        .try_acquire_owned()
        .map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_STREAMS} event streams are open already; close one and retry"),
            )
        })?;
    let sub = events::bus().subscribe(last);
    let open = Open {
        replay: sub.replay.into(),
        live: sub.live,
        closed: sub.closed,
        _permit: permit,
    };
    Ok(Sse::new(messages(open)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// One open stream: what is left to replay, then the live events.
struct Open {
    replay: VecDeque<Arc<Event>>,
    live: broadcast::Receiver<Arc<Event>>,
    closed: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
}

/// The SSE messages of `open`; ends when the reader fell behind, or the agent stops.
fn messages(open: Open) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    futures_util::stream::unfold(open, |mut open| async move {
        if let Some(e) = open.replay.pop_front() {
            return Some((Ok(message(&e)), open));
        }
        let next = tokio::select! {
            got = open.live.recv() => match got {
                Ok(e) => Some(message(&e)),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::info!(missed = n, "an event stream fell behind; closed it (the client resumes with Last-Event-ID)");
                    None
                }
                Err(broadcast::error::RecvError::Closed) => None,
            },
            _ = open.closed.wait_for(|c| *c) => None,
        };
        next.map(|m| (Ok(m), open))
    })
}

fn message(e: &Event) -> SseEvent {
    let data = serde_json::to_string(e).unwrap_or_default();
    let m = SseEvent::default().data(data);
    // A `stream.reset` has no id of its own: it must not move the client's position.
    if e.id == 0 { m } else { m.id(e.id.to_string()) }
}
