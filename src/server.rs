//! Process start-up: opens the store, resumes jobs, and serves HTTP until told to stop.

pub(crate) mod accept;
mod idle;
mod threads;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::api::App;
use crate::auth::{Auth, AuthError};
use crate::config::{Config, OnClientRemoved, Overrides};
use crate::export::runner::Runner;
use crate::proxy::affinity;
use crate::storage::{Storage, StorageError};
use crate::store::{Store, StoreError};
use crate::upstream::Upstream;
use accept::{Acceptor, Slot};
use idle::{Activity, Io, Timeouts, Tracked, Watchdog};
use threads::Threads;

/// HTTP/2 pings while streams are open, so that a peer gone silent does not keep its streams (and
/// their upstream connections) open; hyper's default ack timeout of 20 s applies.
const HTTP2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The job store could not be opened or resumed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data directory or listener could not be set up.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// Upstream calls could not be set up (client, credentials).
    #[error("cannot set up upstream calls: {0}")]
    Upstream(#[from] crate::upstream::UpstreamError),
    /// The object store could not be set up.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Authorization could not be set up.
    #[error(transparent)]
    Auth(#[from] AuthError),
}

/// Runs the proxy until SIGTERM or Ctrl-C; SIGHUP reloads the client registry from `config_path`.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
) -> Result<(), ServerError> {
    let data_dir = config.export.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::Io {
        what: format!("cannot create data directory {}", data_dir.display()),
        source,
    })?;
    let store = Arc::new(Store::open(&data_dir.join("store"))?);
    let listener = accept::bind(config.server.listen).map_err(|source| ServerError::Io {
        what: format!("cannot listen on {}", config.server.listen),
        source,
    })?;
    let bound = listener.local_addr().map_err(|source| ServerError::Io {
        what: "cannot read the bound address".into(),
        source,
    })?;
    let public_base = config.public_base(bound);
    let upstream = Arc::new(Upstream::new(&config.upstream)?);
    let storage = Arc::new(Storage::from_config(&config.storage)?);
    let auth = Arc::new(Auth::new(&config.auth, &public_base, &data_dir)?);
    let runner = Runner::new(
        store.clone(),
        upstream.clone(),
        config.export.clone(),
        config.upstream.max_requests_per_job,
        storage.clone(),
        data_dir.join("files"),
    );
    runner.start().await?;
    runner.spawn_reaper();
    spawn_reloader(
        auth.clone(),
        store.clone(),
        runner.clone(),
        config_path,
        overrides,
    );
    let admin_listener = crate::admin::bind(config.admin.listen)
        .await
        .map_err(|source| ServerError::Io {
            what: format!(
                "cannot listen on the admin address {:?}",
                config.admin.listen
            ),
            source,
        })?;
    if let Some(admin_listener) = admin_listener {
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| ServerError::Io {
                what: "cannot read the admin address".into(),
                source,
            })?;
        tracing::info!(%admin_addr, "admin listening (healthz, readyz, metrics, jobs)");
        // Printed before the main line, which is the one scripts wait for.
        println!("admin listening on {admin_addr}");
        crate::admin::Admin::new(store.clone(), upstream.clone(), runner.clone())
            .spawn(admin_listener);
    }
    let app = Arc::new(App::new(
        config,
        public_base.clone(),
        store.clone(),
        upstream,
        runner,
        auth,
        storage,
    )?);
    app.cohorts.resume()?;

    tracing::info!(%bound, %public_base, "listening");
    // Tests and scripts read this one stdout line to learn the port.
    println!("listening on {bound}, public base {public_base}");

    let server = &app.config.server;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The proxy answers heads over max_header_bytes itself, with an OperationOutcome; hyper's own
    // buffer (at least 8 KiB) is kept well above that so only absurd heads get hyper's bare 431.
    // hyper's header timeout stays off: the watchdog (idle.rs) times heads and idle connections.
    builder
        .http1()
        .max_buf_size((server.max_header_bytes * 4).max(8192))
        .header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(HTTP2_KEEP_ALIVE)
        .max_concurrent_streams(server.http2_max_concurrent_streams);
    let timeouts = Timeouts {
        header: Duration::from_secs(server.header_read_timeout_secs),
        idle: Duration::from_secs(server.idle_timeout_secs),
    };
    let max_connections = accept::connection_limit(server.max_connections);
    tracing::info!(max_connections, "accepting connections");
    let grace = Duration::from_secs(server.shutdown_grace_secs);
    let graceful = CancellationToken::new();
    let serving_app = app.clone();
    let mut serving = Threads::start(serving_threads(), move |stream, peer, held| {
        serve_connection(serving_app.clone(), &builder, timeouts, stream, peer, held)
    })
    .map_err(|source| ServerError::Io {
        what: "cannot start the serving threads".into(),
        source,
    })?;
    let mut acceptor = Acceptor::new(listener, max_connections);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer, slot) = tokio::select! {
            accepted = acceptor.accept() => accepted,
            _ = &mut shutdown => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        serving.serve(stream, peer, (slot, graceful.clone().cancelled_owned()));
    }
    let all_closed = acceptor.stop();
    tracing::info!(
        grace_s = grace.as_secs(),
        "shutting down: no new connections, finishing requests in flight"
    );
    graceful.cancel();
    // Jobs stop at a page boundary; their committed cursors resume them at the next start.
    let jobs = app.runner.shutdown();
    let requests = async {
        if tokio::time::timeout(grace, all_closed).await.is_err() {
            tracing::warn!("grace period over; closing the connections still open");
        }
    };
    tokio::join!(jobs, requests);
    // Joining waits for each thread's runtime to drop what is left: off the async threads.
    let _ = tokio::task::spawn_blocking(move || serving.stop()).await;
    store.flush().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// One serving thread per CPU the process may use.
fn serving_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Serves one connection, on a serving thread: hyper's HTTP/1 or HTTP/2, with pass-through on the
/// connection's own upstream connection, until it closes, outstays its timeouts or the graceful
/// shutdown ends it; `slot` is given back then.
fn serve_connection(
    app: Arc<App>,
    builder: &auto::Builder<TokioExecutor>,
    timeouts: Timeouts,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    (slot, shutdown): (Slot, WaitForCancellationFutureOwned),
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (affinity, driver) = affinity::pair();
    let affinity = Arc::new(affinity);
    let activity = Activity::new(timeouts);
    let requests = activity.clone();
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let in_flight = requests.begin(req.version());
        let (app, affinity) = (app.clone(), affinity.clone());
        async move {
            let response = app.handle(req, peer, &affinity).await;
            Ok::<_, std::convert::Infallible>(response.map(|body| Tracked::new(body, in_flight)))
        }
    });
    let connection = builder
        .serve_connection(TokioIo::new(Io::new(stream, activity.clone())), service)
        .into_owned();
    let connection = Watchdog::new(
        connection,
        |connection| connection.graceful_shutdown(),
        activity,
        peer,
        shutdown,
    );
    async move {
        if let Err(e) = affinity::drive(connection, driver).await {
            tracing::debug!(error = %e, %peer, "connection ended with an error");
        }
        drop(slot);
    }
}

/// Reloads registered clients on SIGHUP; a bad file keeps the current registry. The jobs of removed
/// clients are cancelled unless `auth.on_client_removed = "keep"`.
fn spawn_reloader(
    auth: Arc<Auth>,
    store: Arc<Store>,
    runner: Arc<Runner>,
    config_path: Option<PathBuf>,
    overrides: Overrides,
) {
    tokio::spawn(async move {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                return tracing::warn!(error = %e, "no SIGHUP handler; client reload disabled")
            }
        };
        while hup.recv().await.is_some() {
            let reloaded = Config::load(config_path.as_deref(), overrides.clone())
                .map_err(|e| e.to_string())
                .and_then(|c| {
                    let r = auth.reload(&c.auth.clients).map_err(|e| e.to_string())?;
                    Ok((r, c.auth.on_client_removed))
                });
            match reloaded {
                Ok((r, on_removed)) => {
                    tracing::info!(clients = r.clients, removed = ?r.removed, "client registry reloaded");
                    if on_removed == OnClientRemoved::Cancel && !r.removed.is_empty() {
                        cancel_jobs_of(&store, &runner, &r.removed).await;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "client registry reload failed; keeping the previous one")
                }
            }
        }
    });
}

/// Cancels every job `owners` started and removes its files.
async fn cancel_jobs_of(store: &Store, runner: &Runner, owners: &[String]) {
    let jobs = match store.jobs() {
        Ok(jobs) => jobs,
        Err(e) => return tracing::error!(error = %e, "cannot list the jobs of removed clients"),
    };
    for job in jobs {
        let Some(owner) = job.owner.as_ref().filter(|o| owners.contains(o)) else {
            continue;
        };
        match runner.remove(&job.id).await {
            Ok(_) => {
                tracing::info!(job = %job.id, client = %owner, "job of a removed client cancelled")
            }
            Err(e) => {
                tracing::error!(job = %job.id, error = %e, "cancelling a removed client's job failed")
            }
        }
    }
}

async fn shutdown_signal() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
