//! Runs jobs in the background: admits them, plans them, drives their slices, finishes or fails them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::ExportConfig;
use crate::export::manifest::{error_lines, ERROR_FILE};
use crate::export::planner::{self, PlanError, PlanLimits};
use crate::export::worker::{run_slice, SliceContext, SliceEnd, WorkerError};
use crate::export::writer;
use crate::store::{Job, JobState, SliceState, Store, StoreError};
use crate::upstream::Upstream;

/// Why a job was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// As many jobs as configured are running.
    #[error("{0} export jobs are already running; try again later")]
    Busy(usize),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The background job engine.
pub struct Runner {
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    cfg: ExportConfig,
    files_dir: PathBuf,
    tasks: Mutex<HashMap<String, (CancellationToken, JoinHandle<()>)>>,
    admission: tokio::sync::Mutex<()>,
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Whether `name` has the shape of a job id (32 lowercase hex digits).
pub fn is_job_id(name: &str) -> bool {
    name.len() == 32
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Runner {
    /// A runner writing job files under `files_dir`.
    pub fn new(
        store: Arc<Store>,
        upstream: Arc<Upstream>,
        cfg: ExportConfig,
        files_dir: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            upstream,
            cfg,
            files_dir,
            tasks: Mutex::new(HashMap::new()),
            admission: tokio::sync::Mutex::new(()),
        })
    }

    /// Directory of a job's files.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.files_dir.join(id)
    }

    /// Stores a new job durably and starts it, unless the concurrent job cap is reached.
    pub async fn submit(self: &Arc<Self>, job: Job) -> Result<(), AdmitError> {
        let _admission = self.admission.lock().await;
        let active = self.store.jobs()?.iter().filter(|j| j.is_active()).count();
        if active >= self.cfg.max_concurrent_jobs {
            return Err(AdmitError::Busy(active));
        }
        self.store.put_job(&job)?;
        self.store.flush().await?;
        self.spawn(job.id);
        Ok(())
    }

    /// Resumes every unfinished job and clears what expired or was orphaned while the process was down.
    pub async fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.files_dir).map_err(|e| StoreError::Sled(e.into()))?;
        self.reap().await?;
        let jobs = self.store.jobs()?;
        let known: std::collections::HashSet<&str> = jobs.iter().map(|j| j.id.as_str()).collect();
        // Only directories named like job ids are ours to remove: nothing else in the data directory is touched.
        if let Ok(entries) = std::fs::read_dir(&self.files_dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if is_job_id(&name) && !known.contains(name.as_str()) {
                    tracing::info!(job = %name, "removing files of a job that no longer exists");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        for job in jobs.into_iter().filter(Job::is_active) {
            tracing::info!(job = %job.id, "resuming job");
            self.spawn(job.id);
        }
        Ok(())
    }

    /// Removes expired jobs now, then every `reaper_interval_secs`.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let runner = self.clone();
        tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_secs(runner.cfg.reaper_interval_secs.max(1)));
            loop {
                tick.tick().await;
                if let Err(e) = runner.reap().await {
                    tracing::error!(error = %e, "removing expired jobs failed");
                }
            }
        });
    }

    async fn reap(&self) -> Result<(), StoreError> {
        let now = now_secs();
        for job in self.store.jobs()? {
            if job.expires.is_some_and(|e| e <= now) {
                tracing::info!(job = %job.id, "job expired");
                self.remove(&job.id).await?;
            }
        }
        Ok(())
    }

    /// Cancels a job if it runs and removes it with its files; false if there was no such job.
    pub async fn remove(&self, id: &str) -> Result<bool, StoreError> {
        if self.store.job(id)?.is_none() {
            return Ok(false);
        }
        self.store.delete_job(id)?;
        self.store.flush().await?;
        let task = self.tasks.lock().expect("tasks lock").remove(id);
        if let Some((cancel, handle)) = task {
            cancel.cancel();
            let _ = handle.await;
        }
        match std::fs::remove_dir_all(self.job_dir(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(job = %id, error = %e, "could not remove job files")
            }
            _ => {}
        }
        Ok(true)
    }

    fn spawn(self: &Arc<Self>, id: String) {
        let cancel = CancellationToken::new();
        let runner = self.clone();
        let (task_id, task_cancel) = (id.clone(), cancel.clone());
        let mut tasks = self.tasks.lock().expect("tasks lock");
        let handle = tokio::spawn(async move {
            if let Err(e) = runner.run(&task_id, &task_cancel).await {
                tracing::error!(job = %task_id, error = %e, "job failed");
                let failed = JobState::Failed {
                    status: 500,
                    message: format!("the export failed inside the proxy: {e}"),
                };
                if let Err(e) = runner.finish(&task_id, failed).await {
                    tracing::error!(job = %task_id, error = %e, "could not record job failure");
                }
            }
            runner.tasks.lock().expect("tasks lock").remove(&task_id);
        });
        tasks.insert(id, (cancel, handle));
    }

    async fn run(&self, id: &str, cancel: &CancellationToken) -> Result<(), WorkerError> {
        let Some(mut job) = self.store.job(id)? else {
            return Ok(());
        };
        if job.state == JobState::Accepted {
            let limits = PlanLimits {
                page_size: self.cfg.page_size,
                patient_batch_size: self.cfg.patient_batch_size,
            };
            let planned = match self.upstream.capability().await {
                Ok(cap) => planner::plan(&job, &self.upstream, &cap, limits).await,
                Err(e) => Err(e.into()),
            };
            let slices = match planned {
                Ok(slices) => slices,
                Err(e) => {
                    let status = match &e {
                        PlanError::GroupNotFound(_) => 404,
                        PlanError::Upstream(_) => 502,
                    };
                    let message = format!("the export could not be planned: {e}");
                    return self.finish(id, JobState::Failed { status, message }).await;
                }
            };
            tracing::info!(job = %id, slices = slices.len(), "job planned");
            job.state = JobState::Running;
            if !self.store.commit_plan(&job, &slices)? {
                return Ok(());
            }
            self.store.flush().await?;
        }
        let dir = self.job_dir(id);
        let pending: Vec<_> = self
            .store
            .slices(id)?
            .into_iter()
            .filter(|s| s.state == SliceState::Pending)
            .collect();
        let contexts: Vec<_> = pending
            .into_iter()
            .map(|slice| {
                let ctx = SliceContext {
                    store: &self.store,
                    upstream: &self.upstream,
                    dir: &dir,
                    per_file: self.cfg.resources_per_file,
                    elements: planner::elements_for(&job.spec.elements, &slice.resource_type),
                    cancel,
                };
                (ctx, slice)
            })
            .collect();
        let mut queue = contexts.iter();
        let mut running = FuturesUnordered::new();
        let mut stopped = false;
        loop {
            while running.len() < self.cfg.slice_concurrency {
                let Some((ctx, slice)) = queue.next() else {
                    break;
                };
                running.push(run_slice(ctx, slice.clone()));
            }
            match running.next().await {
                Some(end) => stopped |= end? == SliceEnd::Stopped,
                None => break,
            }
        }
        if stopped || cancel.is_cancelled() {
            return Ok(());
        }
        self.finish(id, JobState::Completed).await?;
        Ok(())
    }

    /// Records the end of a job (completed or failed) with its error file and expiry, durably.
    async fn finish(&self, id: &str, state: JobState) -> Result<(), WorkerError> {
        let Some(mut job) = self.store.job(id)? else {
            return Ok(());
        };
        let slices = self.store.slices(id)?;
        let lines = error_lines(&job, &slices);
        if !lines.is_empty() && state == JobState::Completed {
            let dir = self.job_dir(id);
            let part = tokio::task::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                writer::write_file(&dir.join(ERROR_FILE), &lines)
            })
            .await
            .expect("error file task panicked")?;
            job.error_file = Some(part);
        }
        tracing::info!(job = %id, state = ?state, "job finished");
        job.state = state;
        job.expires = Some(now_secs() + self.cfg.expire_after_secs as i64);
        self.store.replace_job(&job)?;
        self.store.flush().await?;
        Ok(())
    }
}
