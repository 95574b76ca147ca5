//! Accepting client connections: at most `server.max_connections` at once, and no busy loop when
//! `accept` fails.
//!
//! At the open-file limit `accept` fails with EMFILE while the client stays in the listen queue, so the
//! listener is at once ready again: retrying straight away spun a core and logged the same line ~88 MB/s.
//! Waiting for a connection slot before `accept` leaves clients past the cap in the kernel's backlog,
//! where they wait for a slot instead of being accepted and dropped.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::metrics::METRICS;
use prometheus::IntGauge;

/// File descriptors kept out of the connection budget for everything else the process opens: the
/// runtimes, the job store, export files being written or served, the proxy's own upstream
/// connections and the admin listener.
const RESERVED_FDS: u64 = 128;
/// Ceiling of the derived default: past it memory, not descriptors, is what runs out.
const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;
/// Floor of the derived default, so that a very low open-file limit still serves a few clients.
const MIN_DERIVED_CONNECTIONS: u64 = 16;
/// First pause after an accept failure that is not about one connection.
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause: a slot freed meanwhile is picked up within this.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one `accept failed` line per this period; the others are counted in the next one.
const LOG_EVERY: Duration = Duration::from_secs(5);
/// Clients past the cap wait in the listen queue; with the 128 of `TcpListener::bind` the next ones'
/// SYNs are dropped and they retry only after 1, 3, 7... s. The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 1024;

/// A listener on `addr` with a listen queue deep enough to hold clients waiting for a slot.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The connection cap: `configured`, or what the open-file limit leaves for client connections.
pub fn connection_limit(configured: Option<u32>) -> u32 {
    let open_files = open_file_limit();
    match configured {
        Some(max) => {
            if let Some(open_files) = open_files.filter(|&n| u64::from(max) > n / 2) {
                tracing::warn!(
                    max_connections = max,
                    open_files,
                    "server.max_connections is over half the open-file limit: connections may fail with EMFILE first"
                );
            }
            max
        }
        None => derived_limit(open_files),
    }
}

/// Each client connection may hold two descriptors: its socket and its own upstream connection (or
/// the export file it downloads).
fn derived_limit(open_files: Option<u64>) -> u32 {
    let Some(open_files) = open_files else {
        return DEFAULT_MAX_CONNECTIONS as u32;
    };
    let limit = (open_files.saturating_sub(RESERVED_FDS) / 2)
        .clamp(MIN_DERIVED_CONNECTIONS, DEFAULT_MAX_CONNECTIONS);
    limit as u32
}

/// The soft RLIMIT_NOFILE (`None`: unlimited or unknown).
pub fn open_file_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(limit.rlim_cur)
}

/// One of the `max_connections` slots, held by a connection until it closes.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: Option<IntGauge>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, gauge: Option<IntGauge>) -> Self {
        if let Some(gauge) = &gauge {
            gauge.inc();
        }
        Self {
            _permit: permit,
            gauge,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(gauge) = &self.gauge {
            gauge.dec();
        }
    }
}

/// Hands out accepted connections, each with the slot it holds until it is dropped.
pub struct Acceptor {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max: u32,
    backoff: Backoff,
    log: Throttle,
    gauge: Option<IntGauge>,
}

impl Acceptor {
    /// Accepts from the main `listener`, at most `max` connections open at once, counted in
    /// `fbp_connections`.
    pub fn new(listener: TcpListener, max: u32) -> Self {
        Self::with_gauge(listener, max, Some(METRICS.connections.clone()))
    }

    /// Accepts from `listener` (the admin listener, say), at most `max` at once, counted in `gauge` if any.
    pub fn with_gauge(listener: TcpListener, max: u32, gauge: Option<IntGauge>) -> Self {
        Self {
            listener,
            slots: Arc::new(Semaphore::new(max as usize)),
            max,
            backoff: Backoff::default(),
            log: Throttle::default(),
            gauge,
        }
    }

    /// The next connection, once a slot is free and `accept` succeeds.
    pub async fn accept(&mut self) -> (TcpStream, SocketAddr, Slot) {
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed");
        loop {
            match self.listener.accept().await {
                Ok((stream, peer)) => {
                    self.backoff.reset();
                    return (stream, peer, Slot::new(permit, self.gauge.clone()));
                }
                Err(e) => {
                    if let Some(suppressed) = self.log.allow(Instant::now()) {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
                    // A failure about one connection took that connection off the queue: the next
                    // accept is another client's.
                    if !is_per_connection(&e) {
                        tokio::time::sleep(self.backoff.next()).await;
                    }
                }
            }
        }
    }

    /// Closes the listener; the future returned resolves once every connection has given its slot back.
    pub fn stop(self) -> impl std::future::Future<Output = ()> {
        drop(self.listener);
        let (slots, max) = (self.slots, self.max);
        async move {
            // Never fails: the semaphore is never closed.
            let _ = slots.acquire_many(max).await;
        }
    }
}

/// Errors about one connection (aborted or refused before it was accepted), after which the listen
/// queue has moved on; anything else (EMFILE, ENFILE, ENOBUFS, ENOMEM...) lasts until something frees.
fn is_per_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}

/// Pauses doubling from [`FIRST_BACKOFF`] to [`MAX_BACKOFF`].
#[derive(Debug, Default)]
struct Backoff {
    current: Option<Duration>,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let next = self
            .current
            .map_or(FIRST_BACKOFF, |d| (d * 2).min(MAX_BACKOFF));
        self.current = Some(next);
        next
    }

    fn reset(&mut self) {
        self.current = None;
    }
}

/// Lets one event through per [`LOG_EVERY`] and counts the rest.
#[derive(Debug, Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(events suppressed since the last one let through)` if this one may be logged.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self.last.is_some_and(|last| now < last + LOG_EVERY) {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling_and_starts_over_after_a_success() {
        let mut backoff = Backoff::default();
        let pauses: Vec<u128> = (0..10).map(|_| backoff.next().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000, 1000]);
        backoff.reset();
        assert_eq!(backoff.next(), FIRST_BACKOFF);
    }

    #[test]
    fn throttle_lets_one_line_through_per_period_with_the_count_of_the_others() {
        let mut throttle = Throttle::default();
        let start = Instant::now();
        assert_eq!(throttle.allow(start), Some(0));
        for i in 1..=500 {
            assert_eq!(throttle.allow(start + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.allow(start + LOG_EVERY), Some(500));
        assert_eq!(throttle.allow(start + LOG_EVERY), None);
        assert_eq!(throttle.allow(start + LOG_EVERY * 3), Some(1));
    }

    #[test]
    fn resource_exhaustion_backs_off_and_aborted_connections_do_not() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!is_per_connection(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [libc::ECONNABORTED, libc::EPROTO, libc::EPERM, libc::EINTR] {
            assert!(is_per_connection(&io::Error::from_raw_os_error(errno)));
        }
    }

    #[test]
    fn derived_limit_leaves_a_reserve_and_two_descriptors_per_connection() {
        assert_eq!(derived_limit(Some(1024)), 448);
        assert_eq!(derived_limit(Some(64)), 16);
        assert_eq!(derived_limit(Some(1 << 20)), 10_000);
        assert_eq!(derived_limit(None), 10_000);
    }

    #[tokio::test]
    async fn a_connection_past_the_cap_waits_in_the_backlog_for_a_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut acceptor = Acceptor::new(listener, 1);
        let _first_client = TcpStream::connect(addr).await.unwrap();
        let (_, _, first_slot) = acceptor.accept().await;
        let _second_client = TcpStream::connect(addr).await.unwrap();
        let mut second = Box::pin(acceptor.accept());
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut second)
                .await
                .is_err(),
            "a second connection was accepted while the only slot was taken"
        );
        drop(first_slot);
        let (_, peer, _) = second.await;
        assert_eq!(peer.ip(), addr.ip());
    }
}
