//! Runs jobs in the background: admits them, plans them, drives their slices, finishes or fails them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::ExportConfig;
use crate::export::associated;
use crate::export::failure::JobFailure;
use crate::export::limits::{DiskUsage, JobLimits};
use crate::export::manifest::{self, error_lines, ERROR_FILE};
use crate::export::model::{FilePart, Job, JobState, Level, Slice, SliceState};
use crate::export::planner::{self, PlanError, PlanLimits};
use crate::export::references;
use crate::export::whole::Members;
use crate::export::window::Window;
use crate::export::worker::{run_slice, SliceContext, SliceEnd, WorkerError};
use crate::export::writer;
use crate::metrics::METRICS;
use crate::storage::Storage;
use crate::store::{Store, StoreError};
use crate::upstream::Upstream;

/// Why a job was not admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// As many jobs as configured are running (in all, or for this client).
    #[error("{0}")]
    Busy(String),
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
    disk: Arc<DiskUsage>,
    upstream_max_requests: u64,
    storage: Arc<Storage>,
    /// The runtime jobs run on: the one the runner was made on, not the serving thread a kick-off came in on.
    runtime: tokio::runtime::Handle,
}

/// Unix seconds now.
pub fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Whether `name` has the shape of a job id (32 lowercase hex digits).
fn is_job_id(name: &str) -> bool {
    name.len() == 32
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Runner {
    /// A runner writing job files under `files_dir`, running its jobs on the current runtime.
    pub fn new(
        store: Arc<Store>,
        upstream: Arc<Upstream>,
        cfg: ExportConfig,
        upstream_max_requests: u64,
        storage: Arc<Storage>,
        files_dir: PathBuf,
    ) -> Arc<Self> {
        Arc::new(Self {
            runtime: tokio::runtime::Handle::current(),
            upstream_max_requests,
            storage,
            store,
            upstream,
            files_dir,
            tasks: Mutex::new(HashMap::new()),
            admission: tokio::sync::Mutex::new(()),
            disk: Arc::new(DiskUsage {
                max: cfg.max_disk_bytes,
                used: AtomicU64::new(0),
            }),
            cfg,
        })
    }

    /// The job `id`; `None` when there is none or `id` is not even shaped like a job id (so a
    /// client-chosen string never reaches the store).
    pub fn find(&self, id: &str) -> Result<Option<Job>, StoreError> {
        if !is_job_id(id) {
            return Ok(None);
        }
        self.store.job(id)
    }

    /// Directory of a job's files.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.files_dir.join(id)
    }

    /// Stores a new job durably and starts it, unless the concurrent job cap is reached.
    pub async fn submit(self: &Arc<Self>, job: Job) -> Result<(), AdmitError> {
        let _admission = self.admission.lock().await;
        let jobs = self.store.jobs()?;
        let active: Vec<&Job> = jobs.iter().filter(|j| j.is_active()).collect();
        if active.len() >= self.cfg.max_concurrent_jobs {
            return Err(AdmitError::Busy(format!(
                "{} export jobs are already running; try again later",
                active.len()
            )));
        }
        if let Some(owner) = &job.owner {
            let mine = active
                .iter()
                .filter(|j| j.owner.as_ref() == Some(owner))
                .count();
            if mine >= self.cfg.max_jobs_per_client {
                return Err(AdmitError::Busy(format!(
                    "client {owner} already has {mine} export jobs running (max_jobs_per_client); try again later"
                )));
            }
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
        let mut used = 0;
        for job in &jobs {
            used += self.committed_bytes(job)?;
        }
        self.disk.used.store(used, Ordering::Relaxed);
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
        let Some(job) = self.store.job(id)? else {
            return Ok(false);
        };
        let bytes = self.committed_bytes(&job)?;
        self.store.delete_job(id)?;
        self.store.flush().await?;
        let task = self.tasks.lock().expect("tasks lock").remove(id);
        if let Some((cancel, handle)) = task {
            cancel.cancel();
            let _ = handle.await;
        }
        self.remove_files(id, bytes);
        if let Some(bucket) = self.storage.bucket() {
            // Always, not only when stored_remotely: a crash may have left a partial upload.
            if let Err(e) = bucket.delete_job(id).await {
                tracing::warn!(job = %id, error = %e, "could not delete the job's objects");
            }
        }
        Ok(true)
    }

    /// Stops every running job at its next page boundary, for a clean exit; their cursors stay committed
    /// and the next start resumes them.
    pub async fn shutdown(&self) {
        let tasks: Vec<_> = self.tasks.lock().expect("tasks lock").drain().collect();
        for (_, (cancel, _)) in &tasks {
            cancel.cancel();
        }
        for (id, (_, handle)) in tasks {
            if handle.await.is_err() {
                tracing::warn!(job = %id, "job task ended abnormally during shutdown");
            }
        }
    }

    /// Bytes of a job's local files that its records account for.
    fn committed_bytes(&self, job: &Job) -> Result<u64, StoreError> {
        if job.stored_remotely {
            return Ok(0);
        }
        let slices: u64 = self
            .store
            .slices(&job.id)?
            .iter()
            .flat_map(|s| s.files.iter())
            .map(|f| f.bytes)
            .sum();
        Ok(slices + job.error_file.as_ref().map_or(0, |f| f.bytes))
    }

    fn remove_files(&self, id: &str, bytes: u64) {
        let _ = self
            .disk
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(bytes))
            });
        match std::fs::remove_dir_all(self.job_dir(id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(job = %id, error = %e, "could not remove job files")
            }
            _ => {}
        }
    }

    fn spawn(self: &Arc<Self>, id: String) {
        let cancel = CancellationToken::new();
        let runner = self.clone();
        let (task_id, task_cancel) = (id.clone(), cancel.clone());
        let mut tasks = self.tasks.lock().expect("tasks lock");
        let span = tracing::info_span!("job", job = %id);
        let handle = self.runtime.spawn(
            async move {
                if let Err(e) = runner.run(&task_id, &task_cancel).await {
                    tracing::error!(job = %task_id, error = %e, "job failed");
                    let failed = JobState::Failed(e.failure());
                    if let Err(e) = runner.finish(&task_id, failed).await {
                        tracing::error!(job = %task_id, error = %e, "could not record job failure");
                    }
                }
                runner.tasks.lock().expect("tasks lock").remove(&task_id);
            }
            .instrument(span),
        );
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
                max_search_url_bytes: self.cfg.max_search_url_bytes,
                skip_empty_types: self.cfg.skip_empty_types,
                whole_type_share: self.cfg.whole_type_share,
                time_slices: self.cfg.time_slices,
                slice_concurrency: self.cfg.slice_concurrency,
            };
            let planned = match self.upstream.capability().await {
                Ok(cap) => planner::plan(&job, &self.upstream, &cap, limits, &self.store).await,
                Err(e) => Err(e.into()),
            };
            let plan = match planned {
                Ok(plan) => plan,
                Err(PlanError::JobGone) => return Ok(()),
                Err(PlanError::Store(e)) => return Err(e.into()),
                Err(PlanError::GroupNotFound(group)) => {
                    let failure = JobFailure::GroupNotFound { group };
                    return self.finish(id, JobState::Failed(failure)).await;
                }
                Err(e @ PlanError::Upstream(_)) => {
                    let reason = e.to_string();
                    let failure = JobFailure::PlanningFailed { reason };
                    return self.finish(id, JobState::Failed(failure)).await;
                }
            };
            job.state = JobState::Running;
            job.notes.extend(plan.notes);
            if !self.store.commit_plan(&job, &plan.slices)? {
                return Ok(());
            }
            self.store.flush().await?;
            tracing::info!(job = %id, slices = self.store.slices(id)?.len(), "job planned");
        }
        let slices = self.store.slices(id)?;
        let limits = Arc::new(JobLimits {
            max_resources: self.cfg.max_resources_per_job,
            max_requests: self.upstream_max_requests,
            resources: AtomicU64::new(slices.iter().map(|s| s.lines()).sum()),
            requests: AtomicU64::new(slices.iter().map(|s| s.pages).sum()),
            disk: self.disk.clone(),
        });
        if self.drive(&job, slices, &limits, cancel).await? {
            return Ok(());
        }
        let referenced = match self.plan_references(&job).await? {
            Some(slices) => slices,
            None => return Ok(()),
        };
        if self.drive(&job, referenced, &limits, cancel).await? {
            return Ok(());
        }
        let page_size = self.cfg.page_size;
        let dir = self.job_dir(id);
        let planned = associated::plan(&job, &self.store, &self.upstream, dir, page_size, cancel);
        let Some(associated) = planned.await? else {
            return Ok(());
        };
        if self.drive(&job, associated, &limits, cancel).await? {
            return Ok(());
        }
        self.finish(id, JobState::Completed).await?;
        Ok(())
    }

    /// Runs the pending ones of `slices` to their end; true if the job was stopped (cancelled,
    /// deleted, shutting down) before they all ended.
    async fn drive(
        &self,
        job: &Job,
        slices: Vec<Slice>,
        limits: &Arc<JobLimits>,
        cancel: &CancellationToken,
    ) -> Result<bool, WorkerError> {
        let id = job.id.as_str();
        let dir = self.job_dir(id);
        let snapshot = Window::of(job)
            .last_ms()
            .and_then(chrono::DateTime::from_timestamp_millis)
            .unwrap_or_else(chrono::Utc::now);
        let slices: Vec<Slice> = slices
            .into_iter()
            .filter(|s| s.state == SliceState::Pending)
            .collect();
        // One set for all the slices that keep the job's patients: a copy each would multiply the
        // job's largest structure by the slices running at once.
        let members = match slices.iter().any(|s| s.members_by.is_some()) {
            true => Some(Arc::new(Members::new(self.store.job_patients(id)?))),
            false => None,
        };
        let mut queue = slices.into_iter().map(|slice| {
            let ctx = SliceContext {
                store: self.store.clone(),
                upstream: self.upstream.clone(),
                dir: dir.clone(),
                per_file: self.cfg.resources_per_file,
                elements: job.spec.elements.clone(),
                cancel: cancel.clone(),
                limits: limits.clone(),
                snapshot,
                gzip: job.gzip,
                layout: job.spec.layout,
                members: members.clone(),
            };
            (ctx, slice)
        });
        // Each slice is a task of its own: a page's parsing and conversion is CPU work, and slices in
        // one task would take turns on one core however many the machine has.
        let mut running = JoinSet::new();
        let mut stopped = false;
        let mut progress =
            tokio::time::interval(Duration::from_secs(self.cfg.progress_log_secs.max(1)));
        progress.tick().await;
        let drove = loop {
            while running.len() < self.cfg.slice_concurrency {
                let Some((ctx, slice)) = queue.next() else {
                    break;
                };
                running.spawn(run_slice(ctx, slice).in_current_span());
            }
            tokio::select! {
                end = running.join_next() => match end {
                    Some(Ok(Ok(end))) => stopped |= end == SliceEnd::Stopped,
                    Some(Ok(Err(e))) => break Err(e),
                    Some(Err(e)) => std::panic::resume_unwind(e.into_panic()),
                    None => break Ok(()),
                },
                _ = progress.tick() => match self.store.slices(id) {
                    Ok(slices) => tracing::info!(
                        progress = %manifest::progress(job, &slices),
                        upstream = %self.upstream.limiter().snapshot(),
                        "export progress"
                    ),
                    Err(e) => break Err(e.into()),
                },
            }
        };
        if drove.is_err() {
            // Nothing of the job may run on once its failure is recorded and its files go.
            running.shutdown().await;
        }
        drove?;
        Ok(stopped || cancel.is_cancelled())
    }

    /// Plans the slices of the resources a Patient or Group export references, once its data slices
    /// are done (see [`references`]); none when the job wants none or they are planned already.
    /// `None` when the job was deleted meanwhile.
    async fn plan_references(&self, job: &Job) -> Result<Option<Vec<Slice>>, WorkerError> {
        let slices = self.store.slices(&job.id)?;
        if job.spec.level == Level::System || slices.iter().any(references::is_reference_slice) {
            return Ok(Some(Vec::new()));
        }
        let capability =
            self.upstream
                .capability()
                .await
                .map_err(|e| JobFailure::ReferencesUnplanned {
                    reason: e.to_string(),
                })?;
        let wanted = references::wanted(&job.spec, &capability);
        if wanted.is_empty() {
            return Ok(Some(Vec::new()));
        }
        let dir = self.job_dir(&job.id);
        let scanned = slices.clone();
        let ids = tokio::task::spawn_blocking(move || references::scan(&dir, &scanned, &wanted))
            .await
            .expect("reference scan task panicked")?;
        let first = slices.iter().map(|s| s.index + 1).max().unwrap_or(0);
        let planned = references::slices(job, &self.upstream, self.cfg.page_size, &ids, first);
        if planned.is_empty() {
            return Ok(Some(planned));
        }
        let Some(current) = self.store.job(&job.id)? else {
            return Ok(None);
        };
        if !self.store.commit_plan(&current, &planned)? {
            return Ok(None);
        }
        self.store.flush().await?;
        tracing::info!(job = %job.id, slices = planned.len(), "referenced resources planned");
        Ok(Some(planned))
    }

    /// Records the end of a job (completed or failed) with its error file and expiry, durably.
    async fn finish(&self, id: &str, mut state: JobState) -> Result<(), WorkerError> {
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
        let local_bytes = self.committed_bytes(&job)?;
        if let (JobState::Completed, Some(bucket)) = (&state, self.storage.bucket()) {
            let files: Vec<FilePart> = slices
                .iter()
                .flat_map(|s| s.files.iter())
                .chain(job.error_file.iter())
                .filter(|f| f.lines > 0)
                .cloned()
                .collect();
            match bucket.upload(id, &self.job_dir(id), &files).await {
                Ok(()) => job.stored_remotely = true,
                Err(e) => {
                    state = JobState::Failed(JobFailure::UploadFailed {
                        reason: e.to_string(),
                    })
                }
            }
        }
        if matches!(state, JobState::Failed(_)) {
            // A failed job has no manifest: its partial files would only take disk until it expires.
            self.remove_files(id, local_bytes);
            self.store.delete_slices(id)?;
            job.error_file = None;
        }
        tracing::info!(job = %id, state = ?state, "job finished");
        let state_label = if state == JobState::Completed {
            "completed"
        } else {
            "failed"
        };
        METRICS
            .export_seconds
            .with_label_values(&[state_label])
            .observe((now_secs() - job.created).max(0) as f64);
        job.state = state;
        job.expires = Some(now_secs() + self.cfg.expire_after_secs as i64);
        self.store.replace_job(&job)?;
        self.store.flush().await?;
        if job.stored_remotely {
            // Only once the record says the bucket has them may the local copies go.
            self.remove_files(id, local_bytes);
        }
        Ok(())
    }
}
