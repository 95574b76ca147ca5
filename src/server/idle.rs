//! Closing client connections that hold a slot without using it: a fresh connection whose first
//! request head is not in within `server.header_read_timeout_secs`, a keep-alive connection with no
//! request for `server.idle_timeout_secs`, or a later head that starts and does not finish within the
//! header timeout. While a request is in flight nothing is timed, so a long download or a slow
//! pass-through answer is never cut.
//!
//! hyper's own `header_read_timeout` (hyper 1.12, hyper-util 0.1.21) cannot do this: behind the `auto`
//! builder it starts only once enough bytes came to tell HTTP/1 from HTTP/2, so a client that sends
//! nothing is held for ever (hyper#3962), and on keep-alive it runs from the end of the previous
//! response, so it would close idle connections at the header timeout and leave no room for a longer
//! idle timeout. It stays off; this watchdog does both.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

/// The two timeouts of a connection without a request in flight.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From a connection's start, or the first byte of a later HTTP/1 head, to the end of the head.
    pub header: Duration,
    /// From the end of the last response to the next request.
    pub idle: Duration,
}

/// What one connection is doing, as its requests, its socket and its watchdog see it.
pub struct Activity {
    timeouts: Timeouts,
    state: Mutex<State>,
    /// An HTTP/1 connection between requests: its next byte read starts a request head.
    awaiting_head: AtomicBool,
    /// An HTTP/1 connection between requests: a write is the tail of the last response going out.
    draining: AtomicBool,
    /// The watchdog is polling the connection, and looks at the state again when that returns.
    polling: AtomicBool,
    /// The state changed since the watchdog last read it (it polls far more often than that).
    changed: AtomicBool,
    watchdog: AtomicWaker,
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    http2: bool,
    /// When a request must be in flight by; `None` while one is.
    deadline: Option<Instant>,
}

impl Activity {
    /// The activity of a fresh connection, whose first request head is due within the header timeout.
    pub fn new(timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Self {
            timeouts,
            state: Mutex::new(State {
                in_flight: 0,
                http2: false,
                deadline: Some(Instant::now() + timeouts.header),
            }),
            awaiting_head: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            polling: AtomicBool::new(false),
            changed: AtomicBool::new(true),
            watchdog: AtomicWaker::new(),
        })
    }

    /// Records a request whose head has arrived; it is in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>, version: hyper::Version) -> InFlight {
        self.awaiting_head.store(false, Ordering::Relaxed);
        self.draining.store(false, Ordering::Relaxed);
        let mut state = self.lock();
        state.in_flight += 1;
        state.http2 = version == hyper::Version::HTTP_2;
        self.set_deadline(&mut state, None);
        InFlight(self.clone())
    }

    fn end(&self) {
        let mut state = self.lock();
        state.in_flight -= 1;
        if state.in_flight > 0 {
            return;
        }
        self.set_deadline(&mut state, Some(Instant::now() + self.timeouts.idle));
        let http1 = !state.http2;
        drop(state);
        self.awaiting_head.store(http1, Ordering::Relaxed);
        self.draining.store(http1, Ordering::Relaxed);
        // HTTP/2 responses end on tasks of their own, and the watchdog must learn the new deadline.
        if !self.polling.load(Ordering::Acquire) {
            self.watchdog.wake();
        }
    }

    fn head_started(&self) {
        if self.awaiting_head.swap(false, Ordering::Relaxed) {
            let mut state = self.lock();
            if state.in_flight == 0 {
                self.set_deadline(&mut state, Some(Instant::now() + self.timeouts.header));
            }
        }
    }

    fn wrote(&self) {
        let mut state = self.lock();
        if let (0, Some(deadline)) = (state.in_flight, state.deadline) {
            let later = deadline.max(Instant::now() + self.timeouts.idle);
            self.set_deadline(&mut state, Some(later));
        }
    }

    fn set_deadline(&self, state: &mut State, deadline: Option<Instant>) {
        state.deadline = deadline;
        self.changed.store(true, Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a few plain fields, consistent after any panic that could poison the lock.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A request in flight on its connection; dropped with the response body, once it is sent.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that keeps its request in flight until hyper is done with it.
pub struct Tracked<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> Tracked<B> {
    /// `body`, holding `in_flight` until it is dropped.
    pub fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket, telling its [`Activity`] when a request head starts and when the tail of a
/// response goes out.
pub struct Io<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Io<T> {
    /// `inner`, reporting to `activity`.
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Io<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before && this.activity.awaiting_head.load(Ordering::Relaxed) {
            this.activity.head_started();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> Io<T> {
    fn written(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0)
            && self.activity.draining.load(Ordering::Relaxed)
        {
            self.activity.wrote();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Io<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.written(polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.written(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Runs a connection until it ends, the server shuts down gracefully, or it outstays its
/// [`Timeouts`]: then HTTP/1 is closed at once (no request is in flight), HTTP/2 gets a GOAWAY and
/// another header timeout to go before it is closed.
pub struct Watchdog<C> {
    connection: Pin<Box<C>>,
    graceful_shutdown: fn(Pin<&mut C>),
    activity: Arc<Activity>,
    peer: SocketAddr,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    shutting_down: bool,
    going_away: bool,
    timer: Pin<Box<Sleep>>,
    armed: Option<Instant>,
    deadline: Option<Instant>,
    http2: bool,
}

impl<C> Watchdog<C> {
    /// Watches `connection`, whose socket and requests report to `activity`; `graceful_shutdown` asks
    /// it to finish what is in flight and close, as on `shutdown`.
    pub fn new(
        connection: C,
        graceful_shutdown: fn(Pin<&mut C>),
        activity: Arc<Activity>,
        peer: SocketAddr,
        shutdown: WaitForCancellationFutureOwned,
    ) -> Self {
        Self {
            connection: Box::pin(connection),
            graceful_shutdown,
            activity,
            peer,
            shutdown: Box::pin(shutdown),
            shutting_down: false,
            going_away: false,
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
            armed: None,
            deadline: None,
            http2: false,
        }
    }
}

impl<C: Future<Output = Result<(), E>>, E> Future for Watchdog<C> {
    type Output = Result<(), E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        this.activity.watchdog.register(cx.waker());
        if !this.shutting_down && this.shutdown.as_mut().poll(cx).is_ready() {
            this.shutting_down = true;
            (this.graceful_shutdown)(this.connection.as_mut());
        }
        loop {
            this.activity.polling.store(true, Ordering::Release);
            let polled = this.connection.as_mut().poll(cx);
            this.activity.polling.store(false, Ordering::Release);
            if polled.is_ready() {
                return polled;
            }
            if this.activity.changed.swap(false, Ordering::AcqRel) {
                let state = this.activity.lock();
                (this.deadline, this.http2) = (state.deadline, state.http2);
            }
            let Some(deadline) = this.deadline else {
                return Poll::Pending;
            };
            if this.armed != Some(deadline) {
                this.timer.as_mut().reset(deadline);
                this.armed = Some(deadline);
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if !this.http2 || this.going_away {
                tracing::debug!(peer = %this.peer, "closing a connection that sent no request in time");
                return Poll::Ready(Ok(()));
            }
            this.going_away = true;
            (this.graceful_shutdown)(this.connection.as_mut());
            let last_call = Instant::now() + this.activity.timeouts.header;
            this.activity
                .set_deadline(&mut this.activity.lock(), Some(last_call));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(30),
        idle: Duration::from_secs(90),
    };

    fn deadline(activity: &Activity) -> Option<Instant> {
        activity.lock().deadline
    }

    /// Runs `event` and asserts the deadline is then `timeout` after it.
    fn assert_due_after(activity: &Activity, timeout: Duration, event: impl FnOnce()) {
        let before = Instant::now();
        event();
        let after = Instant::now();
        let due = deadline(activity).expect("a deadline");
        assert!(
            before + timeout <= due && due <= after + timeout,
            "due {:?} after the event, not {timeout:?}",
            due - before
        );
    }

    #[test]
    fn nothing_is_due_while_a_request_is_in_flight() {
        let before = Instant::now();
        let fresh = Activity::new(TIMEOUTS);
        let due = deadline(&fresh).unwrap();
        assert!(before + TIMEOUTS.header <= due && due <= Instant::now() + TIMEOUTS.header);
        let activity = Activity::new(TIMEOUTS);
        let first = activity.begin(hyper::Version::HTTP_2);
        let second = activity.begin(hyper::Version::HTTP_2);
        assert_eq!(deadline(&activity), None);
        drop(first);
        assert_eq!(
            deadline(&activity),
            None,
            "one of two streams is still open"
        );
        assert_due_after(&activity, TIMEOUTS.idle, || drop(second));
    }

    #[test]
    fn a_keep_alive_head_is_due_a_header_timeout_after_its_first_byte() {
        let activity = Activity::new(TIMEOUTS);
        drop(activity.begin(hyper::Version::HTTP_11));
        assert_due_after(&activity, TIMEOUTS.header, || activity.head_started());
        let due = deadline(&activity);
        activity.head_started();
        assert_eq!(
            deadline(&activity),
            due,
            "only the first byte starts the timer"
        );
    }

    #[test]
    fn a_response_tail_going_out_keeps_an_http1_connection_from_idling_out() {
        let activity = Activity::new(TIMEOUTS);
        drop(activity.begin(hyper::Version::HTTP_11));
        let due = deadline(&activity).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        activity.wrote();
        assert!(deadline(&activity).unwrap() > due);
    }

    #[test]
    fn only_http1_between_requests_watches_for_heads_and_tails() {
        let activity = Activity::new(TIMEOUTS);
        assert!(!activity.awaiting_head.load(Ordering::Relaxed));
        let request = activity.begin(hyper::Version::HTTP_11);
        assert!(!activity.draining.load(Ordering::Relaxed));
        drop(request);
        assert!(activity.awaiting_head.load(Ordering::Relaxed));
        assert!(activity.draining.load(Ordering::Relaxed));
        drop(activity.begin(hyper::Version::HTTP_2));
        assert!(!activity.awaiting_head.load(Ordering::Relaxed));
        assert!(!activity.draining.load(Ordering::Relaxed));
    }
}
