//! Fetches one slice page by page and appends its resources to the slice's NDJSON files.
//!
//! Per page the order is the crash-safety contract: fetch, write, fsync the files, then commit the cursor
//! that covers them. A crash anywhere leaves a cursor whose files hold at least its committed bytes; resume
//! truncates them back to exactly that and refetches the page after it.
//!
//! This module is the slice run, a small state machine (`SliceRun`: fetch, accept, advance,
//! checkpoint); the page converter, the background writer, the limits and the prefetch are modules of
//! their own beside it, and the layout decides file names and units. It passes 700 lines only with its
//! tests, which run whole slices against a local HTTP server and so sit with the run they test.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::export::failure::JobFailure;
use crate::export::layout::Layout;
use crate::export::limits::JobLimits;
use crate::export::model::{FilePart, Slice, SliceKind, SliceState};
use crate::export::organize::write_blocks;
use crate::export::output::{Batch, Output, Pending};
use crate::export::page::{url_hash, Converter, Page, Scope};
use crate::export::prefetch::Prefetch;
use crate::export::whole::Members;
use crate::export::writer::NdjsonWriter;
use crate::http::storage_full;
use crate::metrics::METRICS;
use crate::store::{Store, StoreError};
use crate::upstream::{Upstream, UpstreamError};

/// Failures that stop the whole job (the local disk or store), as opposed to a slice's upstream failure.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Writing the export files failed.
    #[error("writing export files: {0}")]
    Io(#[from] std::io::Error),
    /// A limit was reached or the upstream is gone: the whole job fails for this cause.
    #[error(transparent)]
    Failed(#[from] JobFailure),
}

impl WorkerError {
    /// What the job fails with.
    pub fn failure(self) -> JobFailure {
        let io = match &self {
            WorkerError::Io(e) => Some(e),
            WorkerError::Store(e) => e.io_error(),
            WorkerError::Failed(_) => None,
        };
        if io.is_some_and(storage_full) {
            return JobFailure::StorageFull {
                reason: self.to_string(),
            };
        }
        match self {
            WorkerError::Failed(failure) => failure,
            e => JobFailure::Internal {
                reason: e.to_string(),
            },
        }
    }
}

/// How a slice run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum SliceEnd {
    /// Done or failed, and committed as such.
    Finished,
    /// Stopped because the job was cancelled or deleted.
    Stopped,
}

/// What one slice needs besides its cursor; owned, so that every slice runs as a task of its own.
pub struct SliceContext {
    /// Job store.
    pub store: Arc<Store>,
    /// Upstream client.
    pub upstream: Arc<Upstream>,
    /// The job's file directory.
    pub dir: PathBuf,
    /// Resources per file.
    pub per_file: u64,
    /// The job's `_elements` entries, of every type (empty: whole resources).
    pub elements: Vec<String>,
    /// Set when the job is cancelled.
    pub cancel: CancellationToken,
    /// The job's limits, shared by its slices.
    pub limits: Arc<JobLimits>,
    /// The last instant of the job's window (its transaction time, or just before `_until`): later
    /// changes are not part of the export.
    pub snapshot: DateTime<Utc>,
    /// Whether files are written gzip-compressed.
    pub gzip: bool,
    /// The job's output layout.
    pub layout: Layout,
    /// The job's patients, when one of its slices pages a type whole.
    pub members: Option<Arc<Members>>,
}

/// How often a running slice commits its cursor: pages are written as they come, fsynced and
/// committed at most this often, so a crash costs at most this much refetching and fsync is not paid
/// per page.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

/// Whether a slice run goes on with its next page or has ended.
enum Step {
    /// Fetch the next page.
    Continue,
    /// The run has ended this way; nothing is left to do.
    Stop(SliceEnd),
}

/// Runs `slice` to its end (or until cancelled), resuming from its committed cursor.
pub async fn run_slice(ctx: SliceContext, slice: Slice) -> Result<SliceEnd, WorkerError> {
    let mut run = SliceRun::open(&ctx, slice).await?;
    while run.slice.state == SliceState::Pending {
        if let Step::Stop(end) = run.step().await? {
            return Ok(end);
        }
    }
    Ok(SliceEnd::Finished)
}

/// One slice being run: its cursor, its files, what was written since the last commit, the commit under
/// way and the page asked for ahead.
struct SliceRun<'c> {
    ctx: &'c SliceContext,
    /// The cursor, ahead of the committed one by what `batch` and `pending` hold.
    slice: Slice,
    output: Output,
    batch: Batch,
    /// The checkpoint whose fsync is under way.
    pending: Option<Pending>,
    prefetch: Prefetch,
    /// Whether resources found before are left out (a slice of several OR-ed searches).
    dedupe: bool,
    /// The job's patients, for a slice that pages its type whole.
    members: Option<Arc<Members>>,
}

impl<'c> SliceRun<'c> {
    /// Resumes the slice's files at its committed cursor.
    async fn open(ctx: &'c SliceContext, slice: Slice) -> Result<Self, WorkerError> {
        let stem = ctx.layout.fetch_stem(&slice);
        let (dir, per_file, gzip) = match ctx.layout.organizes(&slice) {
            // A spool is read back once, by the organizer: one plain file.
            true => (ctx.dir.to_owned(), u64::MAX, false),
            false => (ctx.dir.to_owned(), ctx.per_file, ctx.gzip),
        };
        let parts = slice.files.clone();
        let writer = tokio::task::spawn_blocking(move || {
            NdjsonWriter::resume(&dir, stem, per_file, gzip, parts)
        })
        .await
        .expect("writer task panicked")?;
        // The runner loads the set once per job. A context built without it loads its own, so a slice
        // paged whole never runs unfiltered.
        let members = match slice.members_by {
            Some(_) => Some(match &ctx.members {
                Some(members) => members.clone(),
                None => Arc::new(Members::new(ctx.store.job_patients(&slice.job_id)?)),
            }),
            None => None,
        };
        Ok(Self {
            ctx,
            members,
            dedupe: ctx.layout.dedupes(&slice),
            slice,
            output: Output::new(writer),
            batch: Batch::default(),
            pending: None,
            prefetch: Prefetch::default(),
        })
    }

    /// Fetches the page at the cursor and takes it in.
    async fn step(&mut self) -> Result<Step, WorkerError> {
        let url = self
            .slice
            .next
            .clone()
            .unwrap_or_else(|| self.slice.searches[self.slice.search_index].clone());
        match self.fetch(&url).await {
            None => {
                // Nothing may write into the job's files once the caller goes on to remove them.
                self.output.settle().await?;
                Ok(Step::Stop(SliceEnd::Stopped))
            }
            Some(Ok(page)) => self.accept(&url, page).await,
            Some(Err(e)) => self.upstream_failed(e).await,
        }
    }

    /// The page at `url`, converted as it arrives; `None` when the job is cancelled first.
    async fn fetch(&self, url: &str) -> Option<Result<Page, UpstreamError>> {
        let ctx = self.ctx;
        tokio::select! {
            _ = ctx.cancel.cancelled() => None,
            r = async {
                let early = self.prefetch.take(url).await;
                let scope = Scope {
                    ctx,
                    slice: &self.slice,
                    url,
                    dedupe: self.dedupe,
                    batch_ids: &self.batch.ids,
                    // Ids of a checkpoint still syncing are in neither the batch nor the store.
                    committing_ids: self.pending.as_ref().map(|p| &p.batch.ids),
                    prefetch: &self.prefetch,
                    spare: &self.output.spare,
                    members: self.members.as_deref(),
                };
                let before_attempt = || {
                    self.prefetch.forget();
                    ctx.limits.spend_request()
                };
                ctx.upstream
                    .fetch_streamed(url, early, || Converter::new(&scope), before_attempt)
                    .await
            } => Some(r),
        }
    }

    /// A fetch that failed after its retries: the job's budget or the upstream is gone (the job fails),
    /// or only this slice's search failed (the slice fails).
    async fn upstream_failed(&mut self, e: UpstreamError) -> Result<Step, WorkerError> {
        let failure = match e {
            UpstreamError::Budget(max) => JobFailure::RequestBudget { max },
            UpstreamError::Unreachable { secs, detail } => {
                JobFailure::UpstreamUnreachable { secs, detail }
            }
            e => {
                let slice = &self.slice;
                tracing::warn!(job = %slice.job_id, slice = slice.index, error = %e, "slice failed");
                return self.fail(e.to_string()).await;
            }
        };
        self.output.settle().await?;
        Err(failure.into())
    }

    /// Takes in a fetched page: judges it, writes it, moves the cursor past it and checkpoints.
    async fn accept(&mut self, url: &str, page: Page) -> Result<Step, WorkerError> {
        if let Some(message) = self.untrusted(url, &page) {
            return self.fail(message).await;
        }
        let next = self.next_link(url, &page);
        let lines = page.ends.len() as u64;
        let page_bytes = page.data.len() as u64;
        let admitted = self
            .ctx
            .limits
            .admit_page(lines, self.batch.bytes + page_bytes);
        if let Err(e) = admitted {
            self.output.settle().await?;
            return Err(e);
        }
        self.batch.ids.extend(page.ids);
        self.batch.bytes += page_bytes;
        self.slice.others += page.others;
        // Written in the background while the next page is fetched and converted.
        self.output.start(page.data, page.ends).await?;
        self.slice.pages += 1;
        METRICS.exported_resources.inc_by(lines);
        METRICS.exported_bytes.inc_by(page_bytes);
        if self.slice.next.is_none() {
            if let Some(t) = page.total {
                self.slice.total = Some(self.slice.total.unwrap_or(0) + t);
            }
        }
        if let Ok(None) = next {
            // The count of written lines must include the page just handed to the writer.
            self.slice.files = self.output.settle().await?.parts().to_vec();
        }
        self.advance(next);
        self.checkpoint().await
    }

    /// Why the page at `url` must not be written, if it must not; remembers it as fetched otherwise.
    fn untrusted(&mut self, url: &str, page: &Page) -> Option<String> {
        if let Some(message) = ignored_parameters(&self.slice, url, page) {
            return Some(message);
        }
        let visited = &mut self.slice.visited;
        remember(visited, url_hash(url));
        let fingerprint = page.fingerprint?;
        if visited.contains(&fingerprint) {
            return Some(format!(
                "the upstream served the same page again at {url} (a paging loop); nothing of it was written twice"
            ));
        }
        remember(visited, fingerprint);
        None
    }

    /// The page after the one at `url`, `None` at the end of its search, or why its link is refused.
    fn next_link(&self, url: &str, page: &Page) -> Result<Option<String>, String> {
        let visited = &self.slice.visited;
        match page.next.as_deref().map(|n| self.ctx.upstream.check_own(n)) {
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(_)) if page.next.as_deref().is_some_and(|n| visited.contains(&url_hash(n))) => Err(format!(
                "the upstream's next link after {url} leads back to a page already fetched (a paging loop)"
            )),
            _ => Ok(page.next.clone()),
        }
    }

    /// Moves the cursor to `next`, to the next search, or to the slice's end (done or failed).
    fn advance(&mut self, next: Result<Option<String>, String>) {
        let slice = &mut self.slice;
        match next {
            Ok(Some(n)) => slice.next = Some(n),
            Ok(None) => match short_of_total(slice) {
                Some(message) => slice.state = SliceState::Failed { message },
                None => {
                    slice.next = None;
                    slice.visited.clear();
                    slice.search_index += 1;
                    if slice.search_index == slice.searches.len() {
                        slice.state = SliceState::Done;
                    }
                }
            },
            Err(message) => slice.state = SliceState::Failed { message },
        }
    }

    /// After a page: the last checkpoint if the slice ended, a new one if the interval has passed, the
    /// commit of the one under way if its sync is done.
    async fn checkpoint(&mut self) -> Result<Step, WorkerError> {
        let step = if self.slice.state != SliceState::Pending {
            self.last_checkpoint().await?
        } else if self.batch.started.elapsed() >= COMMIT_INTERVAL {
            self.begin_checkpoint().await?
        } else if self
            .pending
            .as_ref()
            .is_some_and(|p| p.synced.is_finished())
        {
            self.end_checkpoint().await?
        } else {
            Step::Continue
        };
        if let Step::Stop(SliceEnd::Stopped) = step {
            self.output.settle().await?;
        }
        Ok(step)
    }

    /// Fails the slice with `message`, keeping what it wrote, and commits that.
    async fn fail(&mut self, message: String) -> Result<Step, WorkerError> {
        self.slice.state = SliceState::Failed { message };
        self.last_checkpoint().await
    }

    /// Starts a checkpoint of everything written so far, once the one before it is committed (cursors
    /// are committed in order).
    async fn begin_checkpoint(&mut self) -> Result<Step, WorkerError> {
        self.output.settle().await?;
        if let Step::Stop(end) = self.end_checkpoint().await? {
            return Ok(Step::Stop(end));
        }
        let writer = self.output.settle().await?;
        let (parts, durable) = writer.detach_sync()?;
        self.slice.files = parts;
        self.pending = Some(Pending {
            cursor: self.slice.clone(),
            batch: std::mem::take(&mut self.batch),
            synced: tokio::task::spawn_blocking(move || durable.sync()),
        });
        Ok(Step::Continue)
    }

    /// Waits for the checkpoint in progress, if any, and commits its cursor.
    async fn end_checkpoint(&mut self) -> Result<Step, WorkerError> {
        let Some(Pending {
            cursor,
            batch,
            synced,
        }) = self.pending.take()
        else {
            return Ok(Step::Continue);
        };
        synced.await.expect("sync task panicked")?;
        let ids: Vec<String> = batch.ids.into_iter().collect();
        if !self.ctx.store.commit_slice(&cursor, &ids)? {
            return Ok(Step::Stop(SliceEnd::Stopped));
        }
        self.ctx
            .limits
            .disk
            .used
            .fetch_add(batch.bytes, Ordering::Relaxed);
        Ok(Step::Continue)
    }

    /// Completes the slice's last file, makes everything written durable, then commits the cursor that
    /// covers it: a slice's last checkpoint, after which the run has ended. A slice written as resource
    /// blocks has its spool organized into its files first; the spool goes once they are committed.
    async fn last_checkpoint(&mut self) -> Result<Step, WorkerError> {
        let spool = match self.ctx.layout.organizes(&self.slice) {
            true => self.organize().await?,
            false => Vec::new(),
        };
        self.output.settle().await?.finish()?;
        if let Step::Stop(end) = self.begin_checkpoint().await? {
            return Ok(Step::Stop(end));
        }
        let step = self.end_checkpoint().await?;
        if !spool.is_empty() {
            // The spool may go only once no restart can resume it: the commit must be on disk.
            self.ctx.store.flush().await?;
            for part in spool {
                remove_spent(&self.ctx.dir.join(part.name))?;
            }
        }
        Ok(match step {
            Step::Continue => Step::Stop(SliceEnd::Finished),
            stop => stop,
        })
    }

    /// Rewrites the spool as the slice's blocks into its real files, which the output then holds;
    /// returns the spool's files. Until the slice's last cursor is committed, a restart resumes the
    /// spool and organizes it again, over whatever this left behind.
    async fn organize(&mut self) -> Result<Vec<FilePart>, WorkerError> {
        let spool = self.output.settle().await?.parts().to_vec();
        let ctx = self.ctx;
        let (dir, stem, per_file, gzip) = (
            ctx.dir.clone(),
            ctx.layout.file_stem(&self.slice),
            ctx.per_file,
            ctx.gzip,
        );
        let (patients, parts) = (self.slice.patients.clone(), spool.clone());
        let writer = tokio::task::spawn_blocking(move || {
            let mut writer = NdjsonWriter::resume(&dir, stem, per_file, gzip, Vec::new())?;
            write_blocks(&dir, &parts, &patients, &mut writer, per_file)?;
            Ok::<_, std::io::Error>(writer)
        })
        .await
        .expect("organizer task panicked")?;
        self.output = Output::new(writer);
        Ok(spool)
    }
}

/// Removes a file that is no longer needed; one already gone is fine.
fn remove_spent(path: &std::path::Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Pages remembered per search for loop detection: enough for any real loop, and it keeps cursors
/// small on very long searches (a loop longer than this is stopped by the request budget instead).
const REMEMBERED_PAGES: usize = 4096;

fn remember(visited: &mut Vec<u64>, hash: u64) {
    if visited.len() >= 2 * REMEMBERED_PAGES {
        visited.drain(..visited.len() - 2 * REMEMBERED_PAGES + 1);
    }
    visited.push(hash);
}

/// Why a finished search must not count as complete: it returned fewer resources than its
/// `Bundle.total` promised (paging that stopped early must not lose resources silently).
/// Why the first page of a search cannot be trusted, if its self link shows that the upstream ignored
/// parameters the search sent: its results would hold more than the search asked for. History pages
/// are not judged: a server may give their self link without any parameters (sekmet-fhir does).
fn ignored_parameters(slice: &Slice, url: &str, page: &Page) -> Option<String> {
    if slice.next.is_some() || slice.kind == SliceKind::Deleted {
        return None;
    }
    let dropped = crate::export::filters::dropped(url, page.self_link.as_deref());
    (!dropped.is_empty()).then(|| {
        format!(
            "the upstream ignored the search parameter(s) {} (its self link leaves them out), so its results were not written",
            dropped.join(", ")
        )
    })
}

fn short_of_total(slice: &Slice) -> Option<String> {
    let total = slice.total?;
    let written = slice.lines() + slice.others;
    // With several OR-ed searches duplicates are dropped, and deletions are a subset of history.
    let comparable = slice.searches.len() == 1 && slice.kind == SliceKind::Resources;
    (comparable && written < total).then(|| {
        format!("the upstream's paging ended after {written} resources although Bundle.total said {total}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::limits::DiskUsage;
    use std::sync::atomic::AtomicU64;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A request's head, read byte by byte (no body follows a GET); `None` if the connection closes first.
    async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            if stream.read(&mut byte).await.unwrap() == 0 {
                return None;
            }
            head.push(byte[0]);
        }
        Some(String::from_utf8(head).unwrap())
    }

    /// Serves `pages` (path and query → delay, body), one request per connection.
    async fn serve(pages: Vec<(&'static str, u64, String)>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/fhir", listener.local_addr().unwrap());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let pages = pages.clone();
                tokio::spawn(async move {
                    let Some(head) = read_head(&mut stream).await else {
                        return;
                    };
                    let target = head.split(' ').nth(1).unwrap().to_owned();
                    let (_, delay, body) = pages
                        .iter()
                        .find(|(path, _, _)| target.ends_with(path))
                        .unwrap_or_else(|| panic!("unexpected request {target}"));
                    tokio::time::sleep(Duration::from_millis(*delay)).await;
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(answer.as_bytes()).await.unwrap();
                });
            }
        });
        base
    }

    fn bundle(ids: &[&str]) -> String {
        let entries: Vec<String> = ids
            .iter()
            .map(|id| format!(r#"{{"resource":{{"resourceType":"Observation","id":"{id}"}}}}"#))
            .collect();
        format!(
            r#"{{"resourceType":"Bundle","type":"searchset","entry":[{}]}}"#,
            entries.join(",")
        )
    }

    /// A job "j" in a fresh store with `slice` as its plan, and the context to run the slice against `base`.
    fn context(tmp: &std::path::Path, base: &str, slice: &Slice) -> (Arc<Store>, SliceContext) {
        let store = Arc::new(Store::open(&tmp.join("store")).unwrap());
        let job = crate::export::model::tests::job("j");
        store.put_job(&job).unwrap();
        assert!(store
            .commit_plan(&job, std::slice::from_ref(slice))
            .unwrap());
        let upstream: crate::config::UpstreamConfig =
            toml::from_str(&format!("base_url = \"{base}\"")).unwrap();
        let ctx = SliceContext {
            store: store.clone(),
            upstream: Arc::new(Upstream::new(&upstream).unwrap()),
            dir: tmp.join("files"),
            per_file: 1000,
            elements: vec![],
            cancel: CancellationToken::new(),
            limits: Arc::new(JobLimits {
                max_resources: 0,
                max_requests: 0,
                resources: AtomicU64::new(0),
                requests: AtomicU64::new(0),
                disk: Arc::new(DiskUsage::default()),
            }),
            snapshot: Utc::now(),
            gzip: false,
            layout: Layout::ByType,
            members: None,
        };
        (store, ctx)
    }

    /// The ids in the files of the job's only slice, which must be done.
    fn written_ids(tmp: &std::path::Path, store: &Store) -> Vec<String> {
        let done = store.slices("j").unwrap().remove(0);
        assert_eq!(done.state, SliceState::Done);
        let mut ids = Vec::new();
        for part in &done.files {
            let text = std::fs::read_to_string(tmp.join("files").join(&part.name)).unwrap();
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                ids.push(v["id"].as_str().unwrap().to_owned());
            }
        }
        ids
    }

    /// A full disk fails the job with 507 and an explanation. The slice's second file is /dev/full, so
    /// writing into it gets ENOSPC from the kernel through the writer, as on a full file system (with
    /// no first file, resuming stops looking for stray files before it reaches the second).
    #[tokio::test]
    async fn a_full_disk_fails_the_job_with_507() {
        let base = serve(vec![("Observation?code=x", 0, bundle(&["o1", "o2"]))]).await;
        let tmp = tempfile::tempdir().unwrap();
        let slice = Slice {
            resource_type: "Observation".into(),
            searches: vec![format!("{base}/Observation?code=x")],
            ..crate::export::model::tests::slice("j", 0)
        };
        let (_store, ctx) = context(tmp.path(), &base, &slice);
        let ctx = SliceContext { per_file: 1, ..ctx };
        std::fs::create_dir_all(&ctx.dir).unwrap();
        std::os::unix::fs::symlink("/dev/full", ctx.dir.join("Observation.0000.001.ndjson"))
            .unwrap();
        let error = run_slice(ctx, slice).await.unwrap_err();
        assert!(
            matches!(&error, WorkerError::Io(e) if e.raw_os_error() == Some(libc::ENOSPC)),
            "not the kernel's ENOSPC: {error:?}"
        );
        let failure = error.failure();
        let (status, message) = (crate::http::failure_status(&failure), failure.to_string());
        assert_eq!(status, 507, "{message}");
        assert!(message.contains("disk is full"), "{message}");
    }

    /// A resource two OR-ed searches of a slice both return is written once, also when the first search's
    /// page was checkpointed (its fsync and commit still under way) as the second search's page came in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_resource_found_again_across_a_checkpoint_is_written_once() {
        // The first page takes longer than a commit interval, so a checkpoint starts right after it.
        let slow = COMMIT_INTERVAL.as_millis() as u64 + 100;
        let base = serve(vec![
            ("Observation?subject=Patient/a", slow, bundle(&["o1"])),
            ("Observation?performer=Patient/a", 0, bundle(&["o1", "o2"])),
        ])
        .await;
        let tmp = tempfile::tempdir().unwrap();
        let slice = Slice {
            resource_type: "Observation".into(),
            searches: vec![
                format!("{base}/Observation?subject=Patient/a"),
                format!("{base}/Observation?performer=Patient/a"),
            ],
            ..crate::export::model::tests::slice("j", 0)
        };
        let (store, ctx) = context(tmp.path(), &base, &slice);
        assert_eq!(run_slice(ctx, slice).await.unwrap(), SliceEnd::Finished);
        let mut ids = written_ids(tmp.path(), &store);
        ids.sort();
        assert_eq!(ids, ["o1", "o2"]);
    }

    /// A first page whose self link lacks a parameter the search sent (the upstream ignored it) fails
    /// the slice with nothing of it written, and the job's error file says which parameter; a page whose
    /// self link keeps every parameter (re-encoded, with paging added) is written.
    #[tokio::test]
    async fn a_page_whose_self_link_drops_a_sent_parameter_fails_the_slice() {
        let page = |self_link: &str| {
            format!(
                r#"{{"resourceType":"Bundle","type":"searchset","link":[{{"relation":"self","url":"{self_link}"}}],"entry":[{{"resource":{{"resourceType":"Patient","id":"p1"}}}}]}}"#
            )
        };
        let base = serve(vec![
            (
                "Patient?status=active&gender=female&_count=5",
                0,
                page("http://127.0.0.1/fhir/Patient?gender=female&_count=5&_offset=0"),
            ),
            (
                "Patient?subject%3APatient.gender=female&_count=5",
                0,
                page("http://127.0.0.1/fhir/Patient?subject:Patient.gender=female&_count=5&_offset=0"),
            ),
        ])
        .await;
        for (query, dropped) in [
            ("status=active&gender=female&_count=5", Some("status")),
            ("subject%3APatient.gender=female&_count=5", None),
        ] {
            let tmp = tempfile::tempdir().unwrap();
            let slice = Slice {
                resource_type: "Patient".into(),
                searches: vec![format!("{base}/Patient?{query}")],
                ..crate::export::model::tests::slice("j", 0)
            };
            let (store, ctx) = context(tmp.path(), &base, &slice);
            assert_eq!(run_slice(ctx, slice).await.unwrap(), SliceEnd::Finished);
            let Some(dropped) = dropped else {
                assert_eq!(written_ids(tmp.path(), &store), ["p1"]);
                continue;
            };
            let slices = store.slices("j").unwrap();
            assert!(
                matches!(&slices[0].state, SliceState::Failed { message } if message.contains(dropped)),
                "{:?}",
                slices[0].state
            );
            assert_eq!(slices[0].lines(), 0);
            let job = store.job("j").unwrap().unwrap();
            let errors = crate::export::manifest::error_lines(&job, &slices);
            assert!(
                errors
                    .iter()
                    .any(|l| l.contains("Patient export incomplete") && l.contains(dropped)),
                "{errors:?}"
            );
        }
    }

    /// The page after a page is asked for as soon as the page's `link` has arrived, while the rest of
    /// the page is still on its way: the first page's last entries are held back until the second page
    /// is asked for (or 5 s pass).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_next_page_is_asked_for_while_the_page_is_still_arriving() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/fhir", listener.local_addr().unwrap());
        let first = format!(
            r#"{{"resourceType":"Bundle","link":[{{"relation":"next","url":"{base}/Observation?page=2"}}],"entry":[{{"resource":{{"resourceType":"Observation","id":"o1"}}}},"#
        );
        let rest = r#"{"resource":{"resourceType":"Observation","id":"o2"}}]}"#;
        let second = bundle(&["o3"]);
        let asked = Arc::new(tokio::sync::Notify::new());
        let early = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (asked2, early2) = (asked.clone(), early.clone());
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let (asked, early) = (asked2.clone(), early2.clone());
                let (first, second) = (first.clone(), second.clone());
                tokio::spawn(async move {
                    let Some(head) = read_head(&mut stream).await else {
                        return;
                    };
                    let page_two = head.contains("page=2");
                    let body_len = if page_two {
                        second.len()
                    } else {
                        first.len() + rest.len()
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {body_len}\r\nconnection: close\r\n\r\n"
                    );
                    stream.write_all(answer.as_bytes()).await.unwrap();
                    if page_two {
                        asked.notify_one();
                        stream.write_all(second.as_bytes()).await.unwrap();
                        return;
                    }
                    stream.write_all(first.as_bytes()).await.unwrap();
                    let waited =
                        tokio::time::timeout(Duration::from_secs(5), asked.notified()).await;
                    early.store(waited.is_ok(), Ordering::SeqCst);
                    stream.write_all(rest.as_bytes()).await.unwrap();
                });
            }
        });
        let tmp = tempfile::tempdir().unwrap();
        let slice = Slice {
            resource_type: "Observation".into(),
            searches: vec![format!("{base}/Observation")],
            ..crate::export::model::tests::slice("j", 0)
        };
        let (store, ctx) = context(tmp.path(), &base, &slice);
        assert_eq!(run_slice(ctx, slice).await.unwrap(), SliceEnd::Finished);
        assert!(
            early.load(Ordering::SeqCst),
            "page 2 was asked for only after page 1 was in"
        );
        assert_eq!(written_ids(tmp.path(), &store), ["o1", "o2", "o3"]);
    }

    /// A page cut off after its `next` link has already asked for the next page, which holds the only
    /// slot (the adaptive limiter starts at one): trying the page again must not wait for that slot.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_page_cut_off_after_its_next_link_is_tried_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}/fhir", listener.local_addr().unwrap());
        let first = format!(
            r#"{{"resourceType":"Bundle","link":[{{"relation":"next","url":"{base}/Observation?page=2"}}],"entry":[{{"resource":{{"resourceType":"Observation","id":"o1"}}}},"#
        );
        let rest = r#"{"resource":{"resourceType":"Observation","id":"o2"}}]}"#;
        let second = bundle(&["o3"]);
        let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let seen = attempts.clone();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let (first, second, seen) = (first.clone(), second.clone(), seen.clone());
                tokio::spawn(async move {
                    let Some(head) = read_head(&mut stream).await else {
                        return;
                    };
                    let body = if head.contains("page=2") {
                        second
                    } else {
                        format!("{first}{rest}")
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    stream.write_all(answer.as_bytes()).await.unwrap();
                    if !head.contains("page=2") && seen.fetch_add(1, Ordering::SeqCst) == 0 {
                        // The first attempt at page 1 ends after the link, short of its length.
                        stream.write_all(first.as_bytes()).await.unwrap();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        return;
                    }
                    stream.write_all(body.as_bytes()).await.unwrap();
                });
            }
        });
        let tmp = tempfile::tempdir().unwrap();
        let slice = Slice {
            resource_type: "Observation".into(),
            searches: vec![format!("{base}/Observation")],
            ..crate::export::model::tests::slice("j", 0)
        };
        let (store, ctx) = context(tmp.path(), &base, &slice);
        let ended = tokio::time::timeout(Duration::from_secs(20), run_slice(ctx, slice))
            .await
            .expect("the retry of page 1 waited for the slot of page 2");
        assert_eq!(ended.unwrap(), SliceEnd::Finished);
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert_eq!(written_ids(tmp.path(), &store), ["o1", "o2", "o3"]);
    }
}
