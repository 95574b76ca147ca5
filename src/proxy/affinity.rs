//! An upstream connection of each inbound connection's own, driven inside that connection's task.
//!
//! The pooled client hands every request and every body chunk from the task that serves the inbound
//! connection to the task that owns the upstream connection, usually on another worker thread. Here the
//! HTTP/1 client connection is polled by the same task as the inbound connection it serves, so a
//! pass-through exchange is one poll loop, as in an event-driven proxy. A request that finds this
//! connection busy (concurrent HTTP/2 streams) uses the shared pool instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use tokio::sync::mpsc;

/// A client connection's I/O future, polled by [`drive`].
type Driving = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The inbound connection's upstream connection, as the request handlers see it.
pub struct Affinity {
    slot: Mutex<Slot>,
    spawn: mpsc::UnboundedSender<Driving>,
}

enum Slot {
    /// No connection yet, or the last one closed.
    Empty,
    /// A connection that no request is using.
    Idle(SendRequest<Incoming>),
    /// A request is being sent on it.
    InUse,
}

/// The other half of an [`Affinity`]: runs its connections inside [`drive`].
pub struct Driver {
    spawned: mpsc::UnboundedReceiver<Driving>,
}

/// A fresh, empty affinity for one inbound connection.
pub fn pair() -> (Affinity, Driver) {
    let (spawn, spawned) = mpsc::unbounded_channel();
    (
        Affinity {
            slot: Mutex::new(Slot::Empty),
            spawn,
        },
        Driver { spawned },
    )
}

/// What [`Affinity::take`] found.
pub enum Taken {
    /// An open connection, ready for a request.
    Ready(SendRequest<Incoming>),
    /// No connection: the caller connects one and hands it over with [`Affinity::adopt`].
    Connect,
    /// The connection is serving another request: use the pool.
    Busy,
}

impl Affinity {
    /// Takes the connection for one request.
    pub fn take(&self) -> Taken {
        let mut slot = self.slot.lock().expect("affinity lock");
        match std::mem::replace(&mut *slot, Slot::InUse) {
            Slot::Idle(sender) if sender.is_ready() => Taken::Ready(sender),
            Slot::Idle(sender) if !sender.is_closed() => {
                // Still streaming the previous response (HTTP/2 streams overlap): keep it for later.
                *slot = Slot::Idle(sender);
                Taken::Busy
            }
            Slot::Idle(_) | Slot::Empty => Taken::Connect,
            Slot::InUse => Taken::Busy,
        }
    }

    /// Runs a new connection's I/O inside the inbound connection's task.
    pub fn adopt(&self, connection: impl Future<Output = ()> + Send + 'static) {
        // A send fails only once the inbound connection is gone, and with it every use of this one.
        let _ = self.spawn.send(Box::pin(connection));
    }

    /// Gives the connection back after a request (`None`: it failed and is dropped).
    pub fn give_back(&self, sender: Option<SendRequest<Incoming>>) {
        *self.slot.lock().expect("affinity lock") = match sender {
            Some(s) if !s.is_closed() => Slot::Idle(s),
            _ => Slot::Empty,
        };
    }
}

/// Polls `server` (an inbound connection) and the upstream connections it adopts, in one task, until
/// `server` ends; the upstream connections end with it.
pub fn drive<F: Future>(server: F, driver: Driver) -> Drive<F> {
    let task = Arc::new(TaskWaker::default());
    Drive {
        server: Box::pin(server),
        driver,
        connections: FuturesUnordered::new(),
        server_part: Part::new(&task),
        connections_part: Part::new(&task),
        task,
    }
}

/// How many times one poll of a [`Drive`] goes round its woken parts before it yields to the scheduler.
const MAX_ROUNDS: usize = 8;

/// The future of [`drive`].
// A named future rather than an `async fn`: inside an `async fn`, rustc cannot prove the hyper
// connection's `Send` bounds for every lifetime (rust-lang/rust#102211).
pub struct Drive<F> {
    server: Pin<Box<F>>,
    driver: Driver,
    connections: FuturesUnordered<Driving>,
    server_part: Part,
    connections_part: Part,
    task: Arc<TaskWaker>,
}

impl<F: Future> Future for Drive<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        this.task.waker.register(cx.waker());
        // The two sides wake each other on every exchange (a request sent up, a response handed down):
        // going round here until neither is woken serves both in one poll, where a wake-up of the task
        // would have the scheduler poll everything again for each.
        for _ in 0..MAX_ROUNDS {
            this.task.polling.store(true, Ordering::SeqCst);
            if this.connections_part.take_wake() {
                this.poll_connections();
            }
            if this.server_part.take_wake() {
                let mut cx = Context::from_waker(&this.server_part.waker);
                if let Poll::Ready(out) = this.server.as_mut().poll(&mut cx) {
                    return Poll::Ready(out);
                }
            }
            // Cleared before the last look: a wake-up after it reaches the task.
            this.task.polling.store(false, Ordering::SeqCst);
            if !this.connections_part.is_woken() && !this.server_part.is_woken() {
                return Poll::Pending;
            }
        }
        // Still woken (a part yields, e.g. once tokio's cooperative budget is spent): let others run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<F> Drive<F> {
    fn poll_connections(&mut self) {
        let mut cx = Context::from_waker(&self.connections_part.waker);
        while let Poll::Ready(Some(c)) = self.driver.spawned.poll_recv(&mut cx) {
            self.connections.push(c);
        }
        while let Poll::Ready(Some(())) = self.connections.poll_next_unpin(&mut cx) {}
    }
}

/// The task that polls a [`Drive`], and whether it is polling it now.
#[derive(Default)]
struct TaskWaker {
    waker: AtomicWaker,
    polling: AtomicBool,
}

/// One side of a [`Drive`] (the inbound connection, or the upstream ones), polled with a waker of its own.
struct Part {
    woken: Arc<PartWaker>,
    waker: Waker,
}

impl Part {
    fn new(task: &Arc<TaskWaker>) -> Self {
        let woken = Arc::new(PartWaker {
            // Polled on the first poll.
            woken: AtomicBool::new(true),
            task: task.clone(),
        });
        Self {
            waker: Waker::from(woken.clone()),
            woken,
        }
    }

    fn take_wake(&self) -> bool {
        self.woken.woken.swap(false, Ordering::SeqCst)
    }

    fn is_woken(&self) -> bool {
        self.woken.woken.load(Ordering::SeqCst)
    }
}

/// Marks its part as woken; wakes the task only when the [`Drive`] is not being polled, since then the
/// poll itself goes round again.
struct PartWaker {
    woken: AtomicBool,
    task: Arc<TaskWaker>,
}

impl Wake for PartWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        if !self.task.polling.load(Ordering::SeqCst) {
            self.task.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts the wake-ups of the task.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A server part that wakes itself on its first `self_wakes` polls and keeps its last waker.
    fn server(
        self_wakes: usize,
        polls: Arc<AtomicUsize>,
        waker: Arc<Mutex<Option<Waker>>>,
    ) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            if polls.fetch_add(1, Ordering::SeqCst) < self_wakes {
                cx.waker().wake_by_ref();
            }
            *waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    /// A drive of [`server`] under a counting task, with the server's poll count and last waker.
    struct Harness {
        drive: Pin<Box<Drive<Driving>>>,
        task: Arc<Task>,
        polls: Arc<AtomicUsize>,
        kept: Arc<Mutex<Option<Waker>>>,
    }

    impl Harness {
        fn new(self_wakes: usize) -> Self {
            let (polls, kept) = (Arc::new(AtomicUsize::new(0)), Arc::new(Mutex::new(None)));
            let (_affinity, driver) = pair();
            let server: Driving = Box::pin(server(self_wakes, polls.clone(), kept.clone()));
            Self {
                drive: Box::pin(drive(server, driver)),
                task: Arc::new(Task::default()),
                polls,
                kept,
            }
        }

        /// Polls the drive once, as the task would; it never finishes.
        fn poll(&mut self) {
            let waker = Waker::from(self.task.clone());
            assert!(self
                .drive
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_pending());
        }

        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }

        fn task_wakes(&self) -> usize {
            self.task.0.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn a_wake_up_during_the_poll_is_served_in_the_same_poll_not_by_the_scheduler() {
        let mut h = Harness::new(1);
        h.poll();
        assert_eq!(h.polls(), 2, "woken during the poll: polled again");
        assert_eq!(h.task_wakes(), 0, "and the task not woken");

        // A wake-up from outside a poll (I/O became ready) reaches the task.
        h.kept.lock().unwrap().take().unwrap().wake();
        assert_eq!(h.task_wakes(), 1);
        h.poll();
        assert_eq!(h.polls(), 3);
    }

    #[test]
    fn a_part_that_keeps_waking_itself_yields_to_the_scheduler() {
        let mut h = Harness::new(usize::MAX);
        h.poll();
        assert_eq!(h.polls(), MAX_ROUNDS);
        assert_eq!(h.task_wakes(), 1, "it asks to be polled again");
    }
}
