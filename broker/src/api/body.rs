//! The minimum request body rate of the HTTPS listeners: [`MinRateBody`] wraps every
//! request body (`server.rs`). Once the body is first read, it must have delivered
//! `min_rate` bytes per second on average after `grace`: the deadline for the next byte is
//! `first read + grace + received / min_rate`. A client that trickles a body (or stops
//! sending one) fails the read with [`BodyError::TooSlow`] when the handler waits for more
//! past that deadline; the handler answers an error and hyper closes the connection, since
//! the body was not read to its end. Time the server spends not reading does not count
//! against the client: the deadline is only checked while the handler waits for data.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::metrics::Metrics;

/// What a request body must keep up.
#[derive(Debug, Clone)]
pub(crate) struct BodyRate {
    /// Bytes per second, averaged from the first read (0: no minimum).
    pub(crate) min_rate: u64,
    /// How long the body may lag behind `min_rate`.
    pub(crate) grace: Duration,
    /// Counts bodies that were too slow (`admission_refusals_total{reason="slow_body"}`).
    pub(crate) metrics: Arc<Metrics>,
    /// Metric label of the listener.
    pub(crate) site: &'static str,
}

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BodyError {
    #[error("the request body arrived slower than {min_rate} bytes per second")]
    TooSlow { min_rate: u64 },
    #[error(transparent)]
    Inner(#[from] hyper::Error),
}

/// A request body that must arrive at a minimum rate (see the module docs).
pub(crate) struct MinRateBody<B> {
    inner: B,
    rate: BodyRate,
    /// When the handler first read the body.
    started: Option<Instant>,
    /// Data bytes received so far.
    received: u64,
    /// Fires at the current deadline while the handler waits for data.
    timer: Option<Pin<Box<Sleep>>>,
    /// Set once the body failed for being slow (it stays failed).
    failed: bool,
}

impl<B> MinRateBody<B> {
    pub(crate) fn new(inner: B, rate: BodyRate) -> Self {
        Self {
            inner,
            rate,
            started: None,
            received: 0,
            timer: None,
            failed: false,
        }
    }

    /// When the client must have sent more than `received` bytes.
    fn deadline(&self, started: Instant) -> Instant {
        let owed = Duration::from_secs_f64(self.received as f64 / self.rate.min_rate as f64);
        started + self.rate.grace + owed
    }
}

impl<B> Body for MinRateBody<B>
where
    B: Body<Data = Bytes, Error = hyper::Error> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let min_rate = this.rate.min_rate;
        if this.failed {
            return Poll::Ready(Some(Err(BodyError::TooSlow { min_rate })));
        }
        let started = *this.started.get_or_insert_with(Instant::now);
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending if min_rate == 0 => Poll::Pending,
            Poll::Pending => {
                let deadline = this.deadline(started);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.failed = true;
                    this.rate
                        .metrics
                        .admission_refuse(this.rate.site, "slow_body");
                    return Poll::Ready(Some(Err(BodyError::TooSlow { min_rate })));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
