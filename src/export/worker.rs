//! Fetches one slice page by page and appends its resources to the slice's NDJSON files.
//!
//! Per page the order is the crash-safety contract: fetch, write, fsync the files, then commit the cursor
//! that covers them. A crash anywhere leaves a cursor whose files hold at least its committed bytes; resume
//! truncates them back to exactly that and refetches the page after it.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::export::elements::{strip_whitespace, write_subset};
use crate::export::failure::JobFailure;
use crate::export::writer::NdjsonWriter;
use crate::http::storage_full;
use crate::metrics::METRICS;
use crate::store::{Slice, SliceKind, SliceState, Store, StoreError};
use crate::upstream::bundle::{BundleError, BundleReader, Entry};
use crate::upstream::{PageSink, Prefetched, Upstream, UpstreamError};

/// How often a running slice commits its cursor: pages are written as they come, fsynced and
/// committed at most this often, so a crash costs at most this much refetching and fsync is not paid
/// per page.
const COMMIT_INTERVAL: Duration = Duration::from_millis(500);

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

/// Bytes all export files take, against `max_disk_bytes`; shared by every job.
#[derive(Debug, Default)]
pub struct DiskUsage {
    /// Limit in bytes (0: none).
    pub max: u64,
    /// Committed bytes of every job's files.
    pub used: AtomicU64,
}

/// A job's limits and what it has used of them, shared by its slices.
#[derive(Debug)]
pub struct JobLimits {
    /// Most resources the job may export (0: no limit).
    pub max_resources: u64,
    /// Most upstream requests the job may make (0: no limit).
    pub max_requests: u64,
    /// Resources written so far.
    pub resources: AtomicU64,
    /// Upstream requests made so far.
    pub requests: AtomicU64,
    /// Disk used by all jobs.
    pub disk: Arc<DiskUsage>,
}

impl JobLimits {
    /// Counts a request the job may do without: none when the budget is spent.
    fn spare_request(&self) -> bool {
        self.requests
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |made| {
                (self.max_requests == 0 || made < self.max_requests).then_some(made + 1)
            })
            .is_ok()
    }

    fn spend_request(&self) -> Result<(), UpstreamError> {
        let made = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if self.max_requests > 0 && made > self.max_requests {
            return Err(UpstreamError::Budget(self.max_requests));
        }
        Ok(())
    }

    /// Reserves room for a page of `lines` resources and `bytes` bytes, or fails the job.
    fn admit_page(&self, lines: u64, bytes: u64) -> Result<(), WorkerError> {
        let total = self.resources.fetch_add(lines, Ordering::Relaxed) + lines;
        if self.max_resources > 0 && total > self.max_resources {
            return Err(JobFailure::TooManyResources {
                max: self.max_resources,
            }
            .into());
        }
        let used = self.disk.used.load(Ordering::Relaxed);
        if self.disk.max > 0 && used + bytes > self.disk.max {
            return Err(JobFailure::DiskLimit {
                max: self.disk.max,
                used,
            }
            .into());
        }
        Ok(())
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
    /// `_elements` entries that apply to the slice's type (empty: whole resources).
    pub elements: Vec<String>,
    /// Set when the job is cancelled.
    pub cancel: CancellationToken,
    /// The job's limits, shared by its slices.
    pub limits: Arc<JobLimits>,
    /// The job's transaction time: later changes are not part of the export.
    pub snapshot: DateTime<Utc>,
    /// Whether files are written gzip-compressed.
    pub gzip: bool,
}

/// One page, converted to output lines.
struct Page {
    /// The lines, each ending in a newline.
    data: Vec<u8>,
    /// Offset just past each line's newline in `data`.
    ends: Vec<usize>,
    /// Ids written, for deduplicated slices.
    ids: Vec<String>,
    next: Option<String>,
    total: Option<u64>,
    /// `Bundle.link[self]`.
    self_link: Option<String>,
    /// Hash of the page's first resource (`None` for an empty page), to recognise a page served
    /// again under another URL.
    fingerprint: Option<u64>,
}

/// Runs `slice` to its end (or until cancelled), resuming from its committed cursor.
pub async fn run_slice(ctx: SliceContext, mut slice: Slice) -> Result<SliceEnd, WorkerError> {
    let ctx = &ctx;
    let stem = match slice.kind {
        SliceKind::Resources => format!("{}.{:04}", slice.resource_type, slice.index),
        SliceKind::Deleted => format!("{}.deleted.{:04}", slice.resource_type, slice.index),
    };
    let (dir, per_file, gzip) = (ctx.dir.to_owned(), ctx.per_file, ctx.gzip);
    let parts = slice.files.clone();
    let writer = tokio::task::spawn_blocking(move || {
        NdjsonWriter::resume(&dir, stem, per_file, gzip, parts)
    })
    .await
    .expect("writer task panicked")?;
    let mut output = Output {
        writer: Some(writer),
        writing: None,
        spare: Mutex::new(Vec::new()),
    };
    let dedupe = slice.searches.len() > 1;
    let mut batch = Batch::default();
    let prefetch = Prefetch::default();
    let mut pending = None;
    while slice.state == SliceState::Pending {
        let url = slice
            .next
            .clone()
            .unwrap_or_else(|| slice.searches[slice.search_index].clone());
        let fetched = tokio::select! {
            _ = ctx.cancel.cancelled() => {
                // Nothing may write into the job's files once the caller goes on to remove them.
                output.settle().await?;
                return Ok(SliceEnd::Stopped);
            }
            r = async {
                let early = prefetch.take(&url).await;
                let scope = Scope {
                    ctx,
                    slice: &slice,
                    url: &url,
                    dedupe,
                    batch_ids: &batch.ids,
                    // Ids of a checkpoint still syncing are in neither the batch nor the store.
                    committing_ids: pending.as_ref().map(|p: &Pending| &p.batch.ids),
                    prefetch: &prefetch,
                    spare: &output.spare,
                };
                ctx.upstream
                    .fetch_streamed(
                        &url,
                        early,
                        || Converter::new(&scope),
                        || ctx.limits.spend_request(),
                    )
                    .await
            } => r,
        };
        let page = match fetched {
            Ok(page) => page,
            Err(UpstreamError::Budget(max)) => {
                output.settle().await?;
                return Err(JobFailure::RequestBudget { max }.into());
            }
            Err(UpstreamError::Unreachable { secs, detail }) => {
                output.settle().await?;
                return Err(JobFailure::UpstreamUnreachable { secs, detail }.into());
            }
            Err(e) => {
                tracing::warn!(job = %slice.job_id, slice = slice.index, error = %e, "slice failed");
                slice.state = SliceState::Failed {
                    message: e.to_string(),
                };
                return checkpoint(ctx, &mut slice, &mut output, &mut batch, &mut pending).await;
            }
        };
        if let Some(message) = ignored_parameters(&slice, &url, &page) {
            slice.state = SliceState::Failed { message };
            return checkpoint(ctx, &mut slice, &mut output, &mut batch, &mut pending).await;
        }
        remember(&mut slice.visited, url_hash(&url));
        if let Some(fingerprint) = page.fingerprint {
            if slice.visited.contains(&fingerprint) {
                slice.state = SliceState::Failed {
                    message: format!(
                        "the upstream served the same page again at {url} (a paging loop); nothing of it was written twice"
                    ),
                };
                return checkpoint(ctx, &mut slice, &mut output, &mut batch, &mut pending).await;
            }
            remember(&mut slice.visited, fingerprint);
        }
        let next = match page.next.as_deref().map(|n| ctx.upstream.check_own(n)) {
            Some(Err(e)) => Err(e.to_string()),
            Some(Ok(_)) if page.next.as_deref().is_some_and(|n| slice.visited.contains(&url_hash(n))) => Err(format!(
                "the upstream's next link after {url} leads back to a page already fetched (a paging loop)"
            )),
            _ => Ok(page.next.clone()),
        };
        let lines = page.ends.len() as u64;
        let page_bytes = page.data.len() as u64;
        if let Err(e) = ctx.limits.admit_page(lines, batch.bytes + page_bytes) {
            output.settle().await?;
            return Err(e);
        }
        batch.ids.extend(page.ids);
        batch.bytes += page_bytes;
        // Written in the background while the next page is fetched and converted.
        output.start(page.data, page.ends).await?;
        slice.pages += 1;
        METRICS.exported_resources.inc_by(lines);
        METRICS.exported_bytes.inc_by(page_bytes);
        if slice.next.is_none() {
            if let Some(t) = page.total {
                slice.total = Some(slice.total.unwrap_or(0) + t);
            }
        }
        if let Ok(None) = next {
            // The count of written lines must include the page just handed to the writer.
            slice.files = output.settle().await?.parts().to_vec();
        }
        match next {
            Ok(Some(n)) => slice.next = Some(n),
            Ok(None) => match short_of_total(&slice) {
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
        let end = if slice.state != SliceState::Pending {
            checkpoint(ctx, &mut slice, &mut output, &mut batch, &mut pending).await?
        } else if batch.started.elapsed() >= COMMIT_INTERVAL {
            begin_checkpoint(ctx, &mut slice, &mut output, &mut batch, &mut pending).await?
        } else if pending.as_ref().is_some_and(|p| p.synced.is_finished()) {
            end_checkpoint(ctx, &mut pending).await?
        } else {
            SliceEnd::Finished
        };
        if end == SliceEnd::Stopped {
            output.settle().await?;
            return Ok(SliceEnd::Stopped);
        }
    }
    Ok(SliceEnd::Finished)
}

/// Pages written since the last commit.
struct Batch {
    /// Ids written (deduplicated slices), not yet in the store.
    ids: HashSet<String>,
    /// Bytes written.
    bytes: u64,
    started: Instant,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            ids: HashSet::new(),
            bytes: 0,
            started: Instant::now(),
        }
    }
}

/// A slice's next page, asked for as soon as the current page's `next` link is read, before the rest of
/// the page is: the upstream prepares it while the proxy converts, instead of each waiting for the other.
/// At most one per slice; one still in flight when the slice ends is aborted.
#[derive(Default)]
struct Prefetch(Mutex<Option<Asked>>);

/// A page asked for: its URL, and the attempt at it.
type Asked = (String, JoinHandle<Prefetched>);

impl Prefetch {
    /// Asks for `next`, the page after `url`, unless it is asked for already, leads back to a page
    /// fetched before, or the job's request budget has no request to spare.
    fn start(&self, ctx: &SliceContext, slice: &Slice, url: &str, next: &str) {
        let mut slot = self.0.lock().expect("prefetch lock");
        if slot.as_ref().is_some_and(|(asked, _)| *asked == next)
            || next == url
            || slice.visited.contains(&url_hash(next))
            || !ctx.limits.spare_request()
        {
            return;
        }
        if let Some(handle) = ctx.upstream.prefetch(next) {
            if let Some((_, stale)) = slot.replace((next.to_owned(), handle)) {
                stale.abort();
            }
        }
    }

    /// The attempt at `url` if that is the page asked for; any other is dropped.
    async fn take(&self, url: &str) -> Option<Prefetched> {
        let asked = self.0.lock().expect("prefetch lock").take();
        match asked {
            Some((asked, handle)) if asked == url => handle.await.ok(),
            Some((_, handle)) => {
                handle.abort();
                None
            }
            None => None,
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.0.get_mut().ok().and_then(Option::take) {
            handle.abort();
        }
    }
}

/// A page written: the writer and the page's buffer, handed back.
type Written = (NdjsonWriter, Vec<u8>);

/// A slice's files: at most one page is being written (on a blocking thread) while the slice fetches the
/// next, so that fetching and writing overlap even in a single slice; memory stays at two pages.
struct Output {
    /// The writer, while no page is being written.
    writer: Option<NdjsonWriter>,
    /// The page being written; it hands the writer and the page's buffer back.
    writing: Option<JoinHandle<std::io::Result<Written>>>,
    /// A written page's buffer, for the next page to fill: a slice allocates two, not one per page.
    spare: Mutex<Vec<u8>>,
}

impl Output {
    /// Waits for the page being written, if any.
    async fn settle(&mut self) -> Result<&mut NdjsonWriter, WorkerError> {
        if let Some(writing) = self.writing.take() {
            let (writer, mut data) = writing.await.expect("writer task panicked")?;
            data.clear();
            *self.spare.lock().expect("spare buffer lock") = data;
            self.writer = Some(writer);
        }
        Ok(self
            .writer
            .as_mut()
            .expect("the writer is back once nothing is being written"))
    }

    /// Starts writing a page, once the previous one is written.
    async fn start(&mut self, data: Vec<u8>, ends: Vec<usize>) -> Result<(), WorkerError> {
        self.settle().await?;
        let mut writer = self.writer.take().expect("settled");
        self.writing = Some(tokio::task::spawn_blocking(move || {
            writer.write_page(&data, &ends)?;
            Ok((writer, data))
        }));
        Ok(())
    }
}

/// A checkpoint whose fsync runs on a blocking thread while the slice goes on fetching: the cursor, as
/// it stood when the sync began, is committed once the sync is done, so a slice never waits for the disk.
struct Pending {
    cursor: Slice,
    batch: Batch,
    synced: JoinHandle<std::io::Result<()>>,
}

/// Starts a checkpoint of everything written so far, once the one before it is committed (cursors are
/// committed in order).
async fn begin_checkpoint(
    ctx: &SliceContext,
    slice: &mut Slice,
    output: &mut Output,
    batch: &mut Batch,
    pending: &mut Option<Pending>,
) -> Result<SliceEnd, WorkerError> {
    let writer = output.settle().await?;
    if end_checkpoint(ctx, pending).await? == SliceEnd::Stopped {
        return Ok(SliceEnd::Stopped);
    }
    let (parts, durable) = writer.detach_sync()?;
    slice.files = parts;
    *pending = Some(Pending {
        cursor: slice.clone(),
        batch: std::mem::take(batch),
        synced: tokio::task::spawn_blocking(move || durable.sync()),
    });
    Ok(SliceEnd::Finished)
}

/// Waits for the checkpoint in progress, if any, and commits its cursor.
async fn end_checkpoint(
    ctx: &SliceContext,
    pending: &mut Option<Pending>,
) -> Result<SliceEnd, WorkerError> {
    let Some(Pending {
        cursor,
        batch,
        synced,
    }) = pending.take()
    else {
        return Ok(SliceEnd::Finished);
    };
    synced.await.expect("sync task panicked")?;
    let ids: Vec<String> = batch.ids.into_iter().collect();
    let end = commit(ctx, &cursor, &ids)?;
    if end == SliceEnd::Finished {
        ctx.limits
            .disk
            .used
            .fetch_add(batch.bytes, Ordering::Relaxed);
    }
    Ok(end)
}

/// Completes the slice's last file, makes everything written durable, then commits the cursor that
/// covers it: a slice's last checkpoint.
async fn checkpoint(
    ctx: &SliceContext,
    slice: &mut Slice,
    output: &mut Output,
    batch: &mut Batch,
    pending: &mut Option<Pending>,
) -> Result<SliceEnd, WorkerError> {
    output.settle().await?.finish()?;
    if begin_checkpoint(ctx, slice, output, batch, pending).await? == SliceEnd::Stopped {
        return Ok(SliceEnd::Stopped);
    }
    end_checkpoint(ctx, pending).await
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

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: a hash that stays the same across builds, since it is stored in cursors.
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn url_hash(url: &str) -> u64 {
    fnv(FNV_OFFSET, url.as_bytes())
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
    let written = slice.lines();
    // With several OR-ed searches duplicates are dropped, and deletions are a subset of history.
    let comparable = slice.searches.len() == 1 && slice.kind == SliceKind::Resources;
    (comparable && written < total).then(|| {
        format!("the upstream's paging ended after {written} resources although Bundle.total said {total}")
    })
}

fn commit(ctx: &SliceContext, slice: &Slice, ids: &[String]) -> Result<SliceEnd, WorkerError> {
    if ctx.store.commit_slice(slice, ids)? {
        Ok(SliceEnd::Finished)
    } else {
        Ok(SliceEnd::Stopped)
    }
}

/// Why a page cannot be written as the slice's lines; the fetch retries the page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The page is not a usable Bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A search returned a match of another type than it searched.
    #[error("a {expected} search returned a {found} as a match")]
    WrongType { expected: String, found: String },
    /// A resource of a deduplicated slice has no id to deduplicate by.
    #[error("a resource has no id")]
    NoId,
    /// A history entry deletes something other than a resource of the slice's type.
    #[error("history entry for {url:?} is not a {resource_type} deletion")]
    NotADeletion { url: String, resource_type: String },
    /// `_elements` could not be applied to a resource.
    #[error("{0}")]
    Elements(String),
    /// The store could not say whether a resource was written before.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What converting a page of a slice needs, the same for every attempt at it.
struct Scope<'s> {
    ctx: &'s SliceContext,
    slice: &'s Slice,
    /// The page's URL.
    url: &'s str,
    /// Whether resources found before are left out (a slice of several OR-ed searches).
    dedupe: bool,
    /// Ids written since the last checkpoint.
    batch_ids: &'s HashSet<String>,
    /// Ids of the checkpoint being committed, if one is.
    committing_ids: Option<&'s HashSet<String>>,
    prefetch: &'s Prefetch,
    spare: &'s Mutex<Vec<u8>>,
}

/// A page converted as it arrives: each entry is checked and rendered as an output line as soon as its
/// last byte is in, and the page after it is asked for as soon as its `next` link is read. An `Err`
/// makes the fetch retry the page, whose lines are then dropped with it: nothing is written twice.
struct Converter<'s> {
    reader: BundleReader,
    lines: Lines<'s>,
}

/// The page's output lines, rendered entry by entry.
struct Lines<'s> {
    scope: &'s Scope<'s>,
    page: Page,
    /// Ids on this page so far (deduplicated slices).
    page_ids: HashSet<String>,
    /// Whether the page after this one has been asked for.
    asked: bool,
}

impl<'s> Converter<'s> {
    fn new(scope: &'s Scope<'s>) -> Self {
        let data = std::mem::take(&mut *scope.spare.lock().expect("spare buffer lock"));
        Self {
            reader: BundleReader::new(),
            lines: Lines {
                scope,
                page: Page {
                    data,
                    ends: Vec::new(),
                    ids: Vec::new(),
                    next: None,
                    total: None,
                    self_link: None,
                    fingerprint: None,
                },
                page_ids: HashSet::new(),
                asked: false,
            },
        }
    }
}

impl PageSink for Converter<'_> {
    type Page = Page;
    type Error = PageError;

    fn expect(&mut self, bytes: usize) {
        // Exact, with headroom: `reserve` doubles the buffer whenever a page is a little larger than the last.
        self.lines.page.data.reserve_exact(bytes + bytes / 8);
    }

    fn chunk(&mut self, bytes: &[u8]) -> Result<(), PageError> {
        self.reader.feed(bytes, &mut |e| self.lines.add(e))?;
        self.lines.ask_next(self.reader.next_link());
        Ok(())
    }

    fn finish(mut self) -> Result<Page, PageError> {
        let summary = self.reader.finish(&mut |e| self.lines.add(e))?;
        self.lines.ask_next(summary.next.as_deref());
        let mut page = self.lines.page;
        page.next = summary.next;
        page.total = summary.total;
        page.self_link = summary.self_link;
        Ok(page)
    }
}

impl Lines<'_> {
    /// Asks for the page after this one, once.
    fn ask_next(&mut self, next: Option<&str>) {
        let scope = self.scope;
        if let Some(next) = next.filter(|_| !self.asked) {
            self.asked = true;
            scope
                .prefetch
                .start(scope.ctx, scope.slice, scope.url, next);
        }
    }

    /// Renders an entry's resource as a line if it is one the slice exports.
    fn add(&mut self, entry: Entry<'_>) -> Result<(), PageError> {
        let Scope {
            ctx, slice, dedupe, ..
        } = *self.scope;
        let out = &mut self.page;
        if slice.kind == SliceKind::Deleted {
            return deletion(&entry, slice, ctx.snapshot, out);
        }
        if !entry.is_match()? {
            return Ok(());
        }
        let Some(resource) = entry.resource else {
            return Ok(());
        };
        if resource.resource_type != slice.resource_type {
            return Err(PageError::WrongType {
                expected: slice.resource_type.clone(),
                found: resource.resource_type.into_owned(),
            });
        }
        // A page is known by its first resource: a later page starting with the same one is the same
        // page served again (or an overlap), which would duplicate resources either way.
        if out.fingerprint.is_none() {
            out.fingerprint = Some(fnv(FNV_OFFSET, resource.json));
        }
        if dedupe {
            let id = resource.id.as_deref().ok_or(PageError::NoId)?;
            if !self.page_ids.insert(id.to_owned())
                || self.scope.batch_ids.contains(id)
                || self
                    .scope
                    .committing_ids
                    .is_some_and(|ids| ids.contains(id))
                || ctx.store.seen(slice, id)?
            {
                return Ok(());
            }
            out.ids.push(id.to_owned());
        }
        if !ctx.elements.is_empty() {
            write_subset(resource.json, &ctx.elements, &mut out.data)
                .map_err(PageError::Elements)?;
        } else if resource.compact {
            out.data.extend_from_slice(resource.json);
        } else {
            strip_whitespace(resource.json, &mut out.data);
        }
        out.data.push(b'\n');
        out.ends.push(out.data.len());
        Ok(())
    }
}

/// Renders a history entry that deletes a resource of the slice's type, up to the snapshot, as the spec's
/// deleted-resource line: a transaction Bundle of that one deletion.
fn deletion(
    entry: &Entry<'_>,
    slice: &Slice,
    snapshot: DateTime<Utc>,
    out: &mut Page,
) -> Result<(), PageError> {
    let Some(request) = entry.request()?.filter(|r| r.method == "DELETE") else {
        return Ok(());
    };
    let prefix = format!("{}/", slice.resource_type);
    let id = request
        .url
        .strip_prefix(&prefix)
        .filter(|id| !id.is_empty() && !id.contains(['/', '?']))
        .ok_or_else(|| PageError::NotADeletion {
            url: request.url.clone(),
            resource_type: slice.resource_type.clone(),
        })?;
    let after_snapshot = entry
        .response()?
        .and_then(|r| r.last_modified)
        .and_then(|w| DateTime::parse_from_rfc3339(&w).ok())
        .is_some_and(|w| w > snapshot);
    if after_snapshot {
        return Ok(());
    }
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": format!("{prefix}{id}")}}],
    });
    out.data.extend_from_slice(bundle.to_string().as_bytes());
    out.data.push(b'\n');
    out.ends.push(out.data.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
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
        let job = crate::store::tests::job("j");
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
            ..crate::store::tests::slice("j", 0)
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
            ..crate::store::tests::slice("j", 0)
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
                ..crate::store::tests::slice("j", 0)
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
            ..crate::store::tests::slice("j", 0)
        };
        let (store, ctx) = context(tmp.path(), &base, &slice);
        assert_eq!(run_slice(ctx, slice).await.unwrap(), SliceEnd::Finished);
        assert!(
            early.load(Ordering::SeqCst),
            "page 2 was asked for only after page 1 was in"
        );
        assert_eq!(written_ids(tmp.path(), &store), ["o1", "o2", "o3"]);
    }
}
