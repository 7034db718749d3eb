//! Time rules for request bodies: an ordinary body must arrive whole within
//! BODY_READ_TIMEOUT of its headers; an image upload, of any size, must instead keep up
//! UPLOAD_MIN_BYTES in every UPLOAD_WINDOW. Breaking a rule ends the body with a
//! [`BodyTimeout`] error, so the handler fails the request cleanly (an upload leaves no
//! partial image) and hyper closes the connection, whose body was not read to the end.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The rule one body is held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The whole body within this time of the request's headers.
    Deadline(Duration),
    /// At least `bytes` in every `window` spent waiting for the client.
    MinThroughput { bytes: u64, window: Duration },
}

/// A body that broke its [`Rule`].
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum BodyTimeout {
    #[error(
        "request body not received within {} s (BODY_READ_TIMEOUT)",
        .0.as_secs()
    )]
    Deadline(Duration),
    #[error(
        "upload too slow: fewer than {bytes} bytes arrived in {} s \
         (UPLOAD_MIN_BYTES per UPLOAD_WINDOW)",
        .window.as_secs()
    )]
    TooSlow { bytes: u64, window: Duration },
}

impl BodyTimeout {
    /// The `BodyTimeout` somewhere in an error's chain (axum and http-body-util wrap
    /// body errors in their own).
    pub fn find(e: &(dyn std::error::Error + 'static)) -> Option<BodyTimeout> {
        let mut current = Some(e);
        while let Some(err) = current {
            if let Some(t) = err.downcast_ref::<BodyTimeout>() {
                return Some(*t);
            }
            current = err.source();
        }
        None
    }
}

/// A request body under a [`Rule`].
pub struct TimedBody<B> {
    inner: B,
    rule: Rule,
    timer: Pin<Box<Sleep>>,
    /// Bytes received in the current window (throughput rule).
    received: u64,
    /// When a frame was handed to the handler: the time until it asks for the next one
    /// is the agent's own (e.g. libvirt writing the upload) and does not count against
    /// the client.
    handed_over: Option<Instant>,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, rule: Rule) -> Self {
        let first = match rule {
            Rule::Deadline(d) => d,
            Rule::MinThroughput { window, .. } => window,
        };
        Self {
            inner,
            rule,
            timer: Box::pin(tokio::time::sleep(first)),
            received: 0,
            handed_over: None,
        }
    }

    /// The timer has fired: the body is cut, or (throughput kept up) a new window starts.
    fn on_timer(&mut self) -> Result<(), BodyTimeout> {
        match self.rule {
            Rule::Deadline(d) => Err(BodyTimeout::Deadline(d)),
            Rule::MinThroughput { bytes, window } if self.received >= bytes => {
                self.received = 0;
                let next = self.timer.deadline() + window;
                self.timer.as_mut().reset(next);
                Ok(())
            }
            Rule::MinThroughput { bytes, window } => Err(BodyTimeout::TooSlow { bytes, window }),
        }
    }

    /// Moves the throughput window past the time the handler took.
    fn discount_handler_time(&mut self) {
        if let (Rule::MinThroughput { .. }, Some(at)) = (self.rule, self.handed_over.take()) {
            let next = self.timer.deadline() + at.elapsed();
            self.timer.as_mut().reset(next);
        }
    }
}

impl<B> Body for TimedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        this.discount_handler_time();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received = this.received.saturating_add(data.len() as u64);
                }
                this.handed_over = Some(Instant::now());
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(other) => return Poll::Ready(other.map(|r| r.map_err(Into::into))),
            Poll::Pending => {}
        }
        // Waiting for the client: the rule's timer decides how long.
        while this.timer.as_mut().poll(cx).is_ready() {
            if let Err(e) = this.on_timer() {
                return Poll::Ready(Some(Err(Box::new(e))));
            }
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    type Chunks =
        StreamBody<futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>>;

    /// A body fed by the test, one chunk at a time.
    fn channel() -> (mpsc::Sender<Bytes>, Chunks) {
        let (tx, rx) = mpsc::channel::<Bytes>(16);
        let stream = tokio_stream_from(rx).map(|b| Ok(Frame::data(b))).boxed();
        (tx, StreamBody::new(stream))
    }

    fn tokio_stream_from(
        mut rx: mpsc::Receiver<Bytes>,
    ) -> impl futures_util::Stream<Item = Bytes> + Send {
        futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }

    const KIB: usize = 1024;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_comes_is_cut_at_the_deadline() {
        let (tx, body) = channel();
        let mut timed = TimedBody::new(body, Rule::Deadline(Duration::from_secs(5)));
        tx.send(Bytes::from_static(b"{\"a\":")).await.unwrap();
        let t0 = Instant::now();
        assert!(timed.frame().await.unwrap().is_ok());
        let err = timed.frame().await.unwrap().unwrap_err();
        assert_eq!(
            BodyTimeout::find(err.as_ref()),
            Some(BodyTimeout::Deadline(Duration::from_secs(5)))
        );
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dribbled_body_is_cut_at_the_deadline_too() {
        let (tx, body) = channel();
        let feeder = tokio::spawn(async move {
            for _ in 0..100 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if tx.send(Bytes::from_static(b"x")).await.is_err() {
                    return;
                }
            }
        });
        let t0 = Instant::now();
        let err = TimedBody::new(body, Rule::Deadline(Duration::from_secs(5)))
            .collect()
            .await
            .unwrap_err();
        assert!(BodyTimeout::find(err.as_ref()).is_some(), "{err}");
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_that_keeps_up_outlives_any_deadline() {
        let (tx, body) = channel();
        // 4 KiB a second for 60 s against a rule of 1 KiB per 2 s.
        let feeder = tokio::spawn(async move {
            for _ in 0..60 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tx.send(Bytes::from(vec![0u8; 4 * KIB])).await.unwrap();
            }
        });
        let rule = Rule::MinThroughput {
            bytes: KIB as u64,
            window: Duration::from_secs(2),
        };
        let all = TimedBody::new(body, rule).collect().await.unwrap();
        assert_eq!(all.to_bytes().len(), 60 * 4 * KIB);
        feeder.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_upload_that_stalls_is_cut_after_one_short_window() {
        let (tx, body) = channel();
        let feeder = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tx.send(Bytes::from(vec![0u8; 4 * KIB])).await.unwrap();
            }
            // Stalls, connection still open.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(tx);
        });
        let rule = Rule::MinThroughput {
            bytes: KIB as u64,
            window: Duration::from_secs(2),
        };
        let t0 = Instant::now();
        let err = TimedBody::new(body, rule).collect().await.unwrap_err();
        assert!(
            matches!(
                BodyTimeout::find(err.as_ref()),
                Some(BodyTimeout::TooSlow { .. })
            ),
            "{err}"
        );
        // The last bytes came at 5 s; the window holding them ends at 6 s, the next,
        // empty one at 8 s.
        assert_eq!(t0.elapsed(), Duration::from_secs(8));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn time_the_handler_spends_does_not_count_against_the_client() {
        let (tx, body) = channel();
        let rule = Rule::MinThroughput {
            bytes: KIB as u64,
            window: Duration::from_secs(2),
        };
        let mut timed = TimedBody::new(body, rule);
        for _ in 0..3 {
            tx.send(Bytes::from(vec![0u8; 2 * KIB])).await.unwrap();
            assert!(timed.frame().await.unwrap().is_ok());
            // e.g. libvirt's disk is slow: 10 s before the next chunk is asked for.
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
        drop(tx);
        assert!(timed.frame().await.is_none());
    }
}
