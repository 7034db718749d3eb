//! The bytes of one console session, both ways, until one end closes: the guest's output
//! to the WebSocket (a client that stops reading is closed, never buffered for), the
//! client's input to the guest at CONSOLE_INPUT_RATE at most (a task of its own, so a
//! full input queue never holds the output back), a ping every [`PING_EVERY`], and the
//! session ended with a close frame that says why. Nothing typed is logged.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::time::Instant;

use crate::vm::console::{ConsoleSettings, EndReason, Input, Session};

/// Pings keep proxies from dropping an idle session (some do after about 20 s).
pub const PING_EVERY: Duration = Duration::from_secs(15);
/// How long the client may take to accept one frame before it counts as not reading.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the stream's libvirt connection is checked.
const ALIVE_EVERY: Duration = Duration::from_secs(1);

type Sink = SplitSink<WebSocket, Message>;

/// Runs `session` over `socket` to its end.
pub async fn pump(socket: WebSocket, mut session: Session, settings: ConsoleSettings) {
    let (mut sink, stream) = socket.split();
    let activity = Arc::new(Activity::new());
    let mut reader = match session.input() {
        Some(input) => tokio::spawn(read_client(
            stream,
            input,
            settings.input_rate,
            activity.clone(),
        )),
        None => tokio::spawn(async { None }),
    };
    let why = loop_until_end(&mut session, &mut sink, &mut reader, &activity, &settings).await;
    reader.abort();
    let closing = async {
        if why == EndReason::Client {
            // The client's close frame was read: the WebSocket queued the reply to it,
            // which a flush sends (a close frame of our own would be refused now).
            sink.flush().await
        } else {
            let frame = CloseFrame {
                code: why.close_code(),
                reason: why.close_text().into(),
            };
            sink.send(Message::Close(Some(frame))).await
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), closing).await;
    session.finish(why).await;
}

async fn loop_until_end(
    session: &mut Session,
    sink: &mut Sink,
    reader: &mut tokio::task::JoinHandle<Option<EndReason>>,
    activity: &Activity,
    settings: &ConsoleSettings,
) -> EndReason {
    let mut ping = tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
    let mut alive = tokio::time::interval(ALIVE_EVERY);
    let mut stop = session.stop_signal();
    loop {
        let idle_at = activity.last() + settings.idle_timeout;
        tokio::select! {
            out = session.recv() => match out {
                Some(bytes) => {
                    activity.touch();
                    if !send(sink, Message::Binary(bytes)).await {
                        return EndReason::SlowClient;
                    }
                }
                None => return session.stream_end().await,
            },
            read = &mut *reader => return match read {
                Ok(Some(why)) => why,
                // The input was refused: the stream ended.
                _ => session.stream_end().await,
            },
            why = stop.wait() => return why,
            _ = ping.tick() => {
                if !send(sink, Message::Ping(Default::default())).await {
                    return EndReason::SlowClient;
                }
            }
            _ = alive.tick() => {
                if !session.alive() {
                    return EndReason::Libvirt("the connection to libvirt was lost".into());
                }
            }
            () = tokio::time::sleep_until(idle_at) => {
                if activity.last() + settings.idle_timeout <= Instant::now() {
                    return EndReason::Idle;
                }
            }
        }
    }
}

/// Sends one frame; false when the client did not take it in time or is gone.
async fn send(sink: &mut Sink, msg: Message) -> bool {
    matches!(
        tokio::time::timeout(SEND_TIMEOUT, sink.send(msg)).await,
        Ok(Ok(()))
    )
}

/// Reads the client until it closes: `Some(Client)`; `None` when the guest's side
/// stopped taking input (the stream ended).
async fn read_client(
    mut stream: SplitStream<WebSocket>,
    input: Input,
    rate: u32,
    activity: Arc<Activity>,
) -> Option<EndReason> {
    let mut bucket = Bucket::new(rate);
    while let Some(msg) = stream.next().await {
        let bytes = match msg {
            Ok(Message::Binary(b)) => b,
            Ok(Message::Text(t)) => axum::body::Bytes::from(t),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
        };
        if bytes.is_empty() {
            continue;
        }
        bucket.take(bytes.len()).await;
        activity.touch();
        if !input.send(bytes).await {
            return None;
        }
    }
    Some(EndReason::Client)
}

/// When the session last moved a byte either way.
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A token bucket of `rate` bytes per second holding at most one second's worth.
struct Bucket {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self {
            rate,
            tokens: rate,
            at: Instant::now(),
        }
    }

    /// Waits until `n` bytes may pass.
    async fn take(&mut self, n: usize) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
        self.tokens -= n as f64;
        if self.tokens < 0.0 {
            tokio::time::sleep(Duration::from_secs_f64(-self.tokens / self.rate)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Bucket;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn input_beyond_the_rate_waits_for_it() {
        let mut b = Bucket::new(1000);
        let t = tokio::time::Instant::now();
        b.take(1000).await;
        assert_eq!(
            t.elapsed(),
            Duration::ZERO,
            "a second's worth passes at once"
        );
        b.take(500).await;
        assert_eq!(t.elapsed(), Duration::from_millis(500));
        b.take(1000).await;
        assert_eq!(t.elapsed(), Duration::from_millis(1500));
    }
}
