//! The serving threads: one single-threaded runtime per core, each running the connections handed to it.
//!
//! On tokio's work-stealing runtime a connection's task hops between worker threads as it is woken, and
//! every wake-up pays for the shared run queues' atomics; a connection that stays on one thread's own
//! runtime cost about 2 µs less CPU per pass-through request in the benchmark (16.0–16.8 → 13.8–14.1 µs,
//! BENCHMARKS.md notes). Accepting stays on the main runtime, which also runs the export jobs; its
//! threads run at `server.background_nice`, these at the default priority, so that export work yields
//! the CPU to the requests served here.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A connection accepted on the main runtime, on its way to a serving thread with what it holds
/// while open (`T`).
type Accepted<T> = (std::net::TcpStream, SocketAddr, T);

/// The running serving threads.
pub struct Threads<T> {
    queues: Vec<mpsc::UnboundedSender<Accepted<T>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
}

impl<T: Send + 'static> Threads<T> {
    /// Starts `count` threads (at least one) that run `serve` for each connection handed to them.
    pub fn start<S, F>(count: usize, serve: S) -> std::io::Result<Self>
    where
        S: Fn(TcpStream, SocketAddr, T) -> F + Send + Sync + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let serve = Arc::new(serve);
        let mut threads = Self {
            queues: Vec::new(),
            handles: Vec::new(),
            next: 0,
        };
        for i in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (queue, mut accepted) = mpsc::unbounded_channel::<Accepted<T>>();
            let serve = serve.clone();
            let handle = std::thread::Builder::new()
                .name(format!("serve-{i}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some((stream, peer, held)) = accepted.recv().await {
                            match TcpStream::from_std(stream) {
                                Ok(stream) => drop(tokio::spawn(serve(stream, peer, held))),
                                Err(e) => {
                                    tracing::warn!(error = %e, %peer, "cannot serve an accepted connection")
                                }
                            }
                        }
                    });
                    // Dropping the runtime here ends the connections still open: `stop` comes after the grace period.
                })?;
            threads.queues.push(queue);
            threads.handles.push(handle);
        }
        Ok(threads)
    }

    /// Hands a connection accepted on another runtime to the next thread in turn.
    pub fn serve(&mut self, stream: TcpStream, peer: SocketAddr, held: T) {
        // The stream is registered with the accepting runtime's reactor; it moves to the serving thread's.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => return tracing::warn!(error = %e, %peer, "cannot hand over a connection"),
        };
        let queue = &self.queues[self.next % self.queues.len()];
        self.next = self.next.wrapping_add(1);
        // A send fails only while the threads stop, when the connection is dropped anyway.
        let _ = queue.send((stream, peer, held));
    }

    /// Stops the threads, ending the connections they still serve.
    pub fn stop(self) {
        drop(self.queues);
        for handle in self.handles {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_are_served_in_turn_by_every_thread() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let recorded = seen.clone();
        let mut threads = Threads::start(2, move |mut stream: TcpStream, _, ()| {
            let seen = recorded.clone();
            async move {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                seen.lock().unwrap().insert(name.clone());
                stream.write_all(name.as_bytes()).await.unwrap();
            }
        })
        .unwrap();
        let mut names = Vec::new();
        for _ in 0..4 {
            let client = tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let mut name = String::new();
                s.read_to_string(&mut name).await.unwrap();
                name
            });
            let (stream, peer) = listener.accept().await.unwrap();
            threads.serve(stream, peer, ());
            names.push(client.await.unwrap());
        }
        tokio::task::spawn_blocking(move || threads.stop())
            .await
            .unwrap();
        assert_eq!(names, ["serve-0", "serve-1", "serve-0", "serve-1"]);
        assert_eq!(seen.lock().unwrap().len(), 2);
    }
}
