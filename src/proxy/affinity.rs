//! An upstream connection of each inbound connection's own, driven inside that connection's task.
//!
//! The pooled client hands every request and every body chunk from the task that serves the inbound
//! connection to the task that owns the upstream connection, usually on another worker thread. Here the
//! HTTP/1 client connection is polled by the same task as the inbound connection it serves, so a
//! pass-through exchange is one poll loop, as in an event-driven proxy. A request that finds this
//! connection busy (concurrent HTTP/2 streams) uses the shared pool instead.

use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};

use futures_util::stream::{FuturesUnordered, StreamExt};
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
    Drive {
        server: Box::pin(server),
        driver,
        connections: FuturesUnordered::new(),
    }
}

/// The future of [`drive`].
// A named future rather than an `async fn`: inside an `async fn`, rustc cannot prove the hyper
// connection's `Send` bounds for every lifetime (rust-lang/rust#102211).
pub struct Drive<F> {
    server: Pin<Box<F>>,
    driver: Driver,
    connections: FuturesUnordered<Driving>,
}

impl<F: Future> Future for Drive<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Upstream I/O first: a response that arrived is then handed to the server part in this same poll.
        this.poll_connections(cx);
        if let Poll::Ready(out) = this.server.as_mut().poll(cx) {
            return Poll::Ready(out);
        }
        // A request the server part just sent is written upstream without another wake-up.
        this.poll_connections(cx);
        Poll::Pending
    }
}

impl<F> Drive<F> {
    fn poll_connections(&mut self, cx: &mut Context<'_>) {
        while let Poll::Ready(Some(c)) = self.driver.spawned.poll_recv(cx) {
            self.connections.push(c);
        }
        while let Poll::Ready(Some(())) = self.connections.poll_next_unpin(cx) {}
    }
}
