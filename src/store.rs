//! Durable job state: job records, slice cursors and dedup sets, in sled.
//!
//! Everything that touches sled lives here, so the engine can be swapped without touching the export path.
//! Records are JSON so that a store can be inspected with ordinary tools.

use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::export::failure::JobFailure;
use crate::export::ranges::Split;

/// sled's page cache. The store holds job records and cursors, rewritten every commit; sled's default
/// (1 GiB) lets the cache fill with superseded versions of them, so the proxy's memory would grow with
/// the length of an export. The working set is far smaller.
const CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// Errors of the job store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled could not open the store; the directory is left untouched.
    #[error("cannot open job store at {path}: {source} (the directory is left as it is; move it aside to start empty)")]
    Open { path: String, source: sled::Error },
    /// A read or write failed.
    #[error("job store error: {0}")]
    Sled(#[from] sled::Error),
    /// A record does not decode: the store is damaged or from an incompatible version.
    #[error("job store record {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

impl StoreError {
    /// The I/O failure underneath, if sled met one.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            StoreError::Open {
                source: sled::Error::Io(e),
                ..
            }
            | StoreError::Sled(sled::Error::Io(e)) => Some(e),
            _ => None,
        }
    }
}

/// Which population a job exports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Level {
    /// `[base]/$export`: every resource of the listed types.
    System,
    /// `[base]/Patient/$export`: the Patient compartments of all patients.
    Patient,
    /// `[base]/Group/[id]/$export`: the Patient compartments of the group's members.
    Group { id: String },
}

/// What a kick-off asked for, after validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportSpec {
    /// Population to export.
    pub level: Level,
    /// Requested `_outputFormat` as given (all accepted values mean NDJSON).
    pub output_format: String,
    /// `_since` as a FHIR instant.
    pub since: Option<String>,
    /// `_type`, or every type the level allows.
    pub types: TypeSelection,
    /// `_typeFilter` queries by type: each a query string without the leading `Type?`.
    pub type_filters: Vec<(String, String)>,
    /// `_elements`: `Type.element` or bare `element` entries.
    pub elements: Vec<String>,
    /// `patient` references (ids only), Patient and Group level.
    pub patients: Vec<String>,
}

/// The resource types a job exports.
///
/// "Every type" is a variant of its own: an empty list means no type at all, so a list that lost its
/// entries (to lenient handling, to a grant) can never come to mean everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TypeSelection {
    /// No `_type` was given: every type the level allows.
    All,
    /// Exactly these types (those of them the level allows).
    Only(Vec<String>),
}

impl TypeSelection {
    /// Whether `resource_type` is selected.
    pub fn includes(&self, resource_type: &str) -> bool {
        match self {
            TypeSelection::All => true,
            TypeSelection::Only(types) => types.iter().any(|t| t == resource_type),
        }
    }

    /// The explicit list of types, made from `every` first when every type is selected.
    pub fn make_explicit(&mut self, every: impl FnOnce() -> Vec<String>) -> &mut Vec<String> {
        if *self == TypeSelection::All {
            *self = TypeSelection::Only(every());
        }
        match self {
            TypeSelection::Only(types) => types,
            TypeSelection::All => unreachable!("made explicit above"),
        }
    }
}

impl<'de> Deserialize<'de> for TypeSelection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        enum Tagged {
            All,
            Only(Vec<String>),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Record {
            Tagged(Tagged),
            Legacy(Vec<String>),
        }
        Ok(match Record::deserialize(d)? {
            Record::Tagged(Tagged::All) => TypeSelection::All,
            Record::Tagged(Tagged::Only(types)) => TypeSelection::Only(types),
            // Jobs stored before the selection was explicit wrote every type as an empty list.
            Record::Legacy(types) if types.is_empty() => TypeSelection::All,
            Record::Legacy(types) => TypeSelection::Only(types),
        })
    }
}

/// Lifecycle of a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum JobState {
    /// Accepted, not yet planned.
    Accepted,
    /// Planned into slices, which are being fetched.
    Running,
    /// Every slice ended; the manifest is available.
    Completed,
    /// The job as a whole failed, for this cause.
    #[serde(deserialize_with = "crate::export::failure::decode")]
    Failed(JobFailure),
}

/// One export job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// 32 lowercase hex digits.
    pub id: String,
    /// The kick-off URL, as the manifest's `request`.
    pub request: String,
    /// The validated request.
    pub spec: ExportSpec,
    /// Where the job is.
    pub state: JobState,
    /// Snapshot instant: nothing updated after it is exported.
    pub transaction_time: String,
    /// Unix seconds of kick-off.
    pub created: i64,
    /// Unix seconds after which a finished job is removed.
    pub expires: Option<i64>,
    /// Client that started the job, when authorization is on.
    pub owner: Option<String>,
    /// Messages for the manifest's OperationOutcome (ignored parameters, failed slices).
    pub notes: Vec<String>,
    /// The OperationOutcome NDJSON file written at completion, if there was anything to report.
    pub error_file: Option<FilePart>,
    /// Whether the finished files were moved to the object store.
    #[serde(default)]
    pub stored_remotely: bool,
    /// Whether the job's NDJSON files are written gzip-compressed.
    #[serde(default)]
    pub gzip: bool,
}

impl Job {
    /// Whether the job still needs work.
    pub fn is_active(&self) -> bool {
        matches!(self.state, JobState::Accepted | JobState::Running)
    }
}

/// One NDJSON file of a slice, as far as it is committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePart {
    /// File name inside the job's directory.
    pub name: String,
    /// Resources (lines) committed.
    pub lines: u64,
    /// Bytes committed; a resumed job truncates the file back to this.
    pub bytes: u64,
    /// Whether the file is gzip-compressed at rest.
    #[serde(default)]
    pub gzip: bool,
    /// Where the file's single gzip stream stands; `None` for a plain file, and for a gzip file of the
    /// previous release, which is a series of gzip members (many clients decode only the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<GzipStream>,
}

/// What a gzip file's trailer needs, as of the committed bytes: the stream goes on from here on resume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GzipStream {
    /// CRC-32 of the uncompressed bytes.
    pub crc: u32,
    /// Uncompressed bytes.
    pub size: u64,
    /// Whether the final block and trailer are written: the file is a complete gzip file.
    pub finished: bool,
}

/// Where a slice is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum SliceState {
    /// More pages to fetch.
    Pending,
    /// Every page fetched.
    Done,
    /// Gave up; what was written stays, the message goes to the error file.
    Failed { message: String },
}

/// What a slice's pages hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SliceKind {
    /// Search results: the resources themselves.
    #[default]
    Resources,
    /// Type history since `_since`: its DELETE entries become the manifest's `deleted` files.
    Deleted,
}

/// A resumable unit of work: one resource type, one or more searches fetched in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slice {
    /// Owning job.
    pub job_id: String,
    /// Position within the job; names its files.
    pub index: u32,
    /// Resource type all searches return.
    pub resource_type: String,
    /// Resources, or deletions.
    #[serde(default)]
    pub kind: SliceKind,
    /// First-page URLs; more than one means OR-ed `_typeFilter` queries, deduplicated by id.
    pub searches: Vec<String>,
    /// Index into `searches` of the search under way.
    pub search_index: usize,
    /// Next page to fetch of the current search; `None` means its first page.
    pub next: Option<String>,
    /// Progress state.
    pub state: SliceState,
    /// Files written, the last one possibly still growing.
    pub files: Vec<FilePart>,
    /// Pages fetched.
    pub pages: u64,
    /// Sum of `Bundle.total` of the searches started, when the upstream gave it.
    pub total: Option<u64>,
    /// Hashes of the page URLs fetched in the current search, to catch paging loops.
    #[serde(default)]
    pub visited: Vec<u64>,
}

impl Slice {
    /// A slice not started yet: slice `index` of job `job_id`, running `searches` for `resource_type`.
    pub fn pending(
        job_id: &str,
        index: u32,
        resource_type: &str,
        kind: SliceKind,
        searches: Vec<String>,
    ) -> Slice {
        Slice {
            job_id: job_id.to_owned(),
            index,
            resource_type: resource_type.to_owned(),
            kind,
            searches,
            search_index: 0,
            next: None,
            state: SliceState::Pending,
            files: Vec::new(),
            pages: 0,
            total: None,
            visited: Vec::new(),
        }
    }

    /// Resources written so far.
    pub fn lines(&self) -> u64 {
        self.files.iter().map(|f| f.lines).sum()
    }
}

/// How far planning of a job got, stored with the slices planned so far so that a restarted job
/// resumes planning instead of starting it over.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Planning {
    /// Slices stored so far: the index of the next one.
    #[serde(default)]
    pub slices: u32,
    /// Types whose slices are all stored.
    #[serde(default)]
    pub done: Vec<String>,
    /// The type whose `_lastUpdated` split is under way, with the split so far.
    #[serde(default)]
    pub split: Option<(String, Split)>,
}

/// The sled-backed store.
pub struct Store {
    db: sled::Db,
    jobs: sled::Tree,
    slices: sled::Tree,
    seen: sled::Tree,
    planning: sled::Tree,
}

fn slice_key(job_id: &str, index: u32) -> String {
    format!("{job_id}/{index:08}")
}

fn seen_key(job_id: &str, index: u32, id: &str) -> String {
    format!("{job_id}/{index:08}/{id}")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

fn decode<T: for<'a> Deserialize<'a>>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn abort(e: TransactionError<()>) -> Option<StoreError> {
    match e {
        TransactionError::Abort(()) => None,
        TransactionError::Storage(e) => Some(e.into()),
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`; a damaged store is an error, never silently emptied.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open = || -> Result<Self, sled::Error> {
            let db = sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .cache_capacity(CACHE_BYTES)
                .open()?;
            Ok(Self {
                jobs: db.open_tree("jobs")?,
                slices: db.open_tree("slices")?,
                seen: db.open_tree("seen")?,
                planning: db.open_tree("planning")?,
                db,
            })
        };
        let store = open().map_err(|source| StoreError::Open {
            path: dir.display().to_string(),
            source,
        })?;
        // Decode every job now: a damaged record must stop start-up, not surface mid-export.
        store.jobs()?;
        Ok(store)
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Inserts or replaces a job record.
    pub fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.jobs.insert(job.id.as_bytes(), encode(job))?;
        Ok(())
    }

    /// Reads one job.
    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        match self.jobs.get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Every job.
    pub fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.jobs
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Replaces an existing job record; false (and nothing written) if the job was deleted meanwhile.
    pub fn replace_job(&self, job: &Job) -> Result<bool, StoreError> {
        self.commit_plan(job, &[])
    }

    /// Stores the last slices of a job's plan and its new state in one atomic step, ending its
    /// planning, unless the job was deleted meanwhile.
    pub fn commit_plan(&self, job: &Job, slices: &[Slice]) -> Result<bool, StoreError> {
        let trees = (&self.jobs, &self.slices, &self.planning);
        let result = trees.transaction(|(jobs, tx_slices, planning)| {
            if jobs.get(job.id.as_bytes())?.is_none() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            for s in slices {
                tx_slices.insert(slice_key(&s.job_id, s.index).as_bytes(), encode(s))?;
            }
            planning.remove(job.id.as_bytes())?;
            jobs.insert(job.id.as_bytes(), encode(job))?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(true),
            Err(e) => abort(e).map_or(Ok(false), Err),
        }
    }

    /// How far planning of a job got (nothing planned yet if there is no record).
    pub fn planning(&self, job_id: &str) -> Result<Planning, StoreError> {
        match self.planning.get(job_id.as_bytes())? {
            Some(v) => decode(job_id.as_bytes(), &v),
            None => Ok(Planning::default()),
        }
    }

    /// Stores planning progress with the slices planned since the last call in one atomic step,
    /// so that what is stored always matches `planning`; false if the job was deleted meanwhile.
    pub fn commit_planning(
        &self,
        job_id: &str,
        progress: &Planning,
        slices: &[Slice],
    ) -> Result<bool, StoreError> {
        let trees = (&self.jobs, &self.slices, &self.planning);
        let result = trees.transaction(|(jobs, tx_slices, planning)| {
            if jobs.get(job_id.as_bytes())?.is_none() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            for s in slices {
                tx_slices.insert(slice_key(&s.job_id, s.index).as_bytes(), encode(s))?;
            }
            planning.insert(job_id.as_bytes(), encode(progress))?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(true),
            Err(e) => abort(e).map_or(Ok(false), Err),
        }
    }

    /// The slices of a job, in index order.
    pub fn slices(&self, job_id: &str) -> Result<Vec<Slice>, StoreError> {
        self.slices
            .scan_prefix(format!("{job_id}/").as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Commits a slice cursor and the ids it newly wrote (for deduplicated slices), unless the job is gone.
    ///
    /// Returns false when the job was deleted meanwhile, so a cancelled job never gets records back.
    pub fn commit_slice(&self, slice: &Slice, new_ids: &[String]) -> Result<bool, StoreError> {
        let result = (&self.jobs, &self.slices, &self.seen).transaction(|(jobs, slices, seen)| {
            if jobs.get(slice.job_id.as_bytes())?.is_none() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            for id in new_ids {
                seen.insert(seen_key(&slice.job_id, slice.index, id).as_bytes(), &[])?;
            }
            slices.insert(
                slice_key(&slice.job_id, slice.index).as_bytes(),
                encode(slice),
            )?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(true),
            Err(e) => abort(e).map_or(Ok(false), Err),
        }
    }

    /// Whether a deduplicated slice has already written resource `id`.
    pub fn seen(&self, slice: &Slice, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .seen
            .contains_key(seen_key(&slice.job_id, slice.index, id).as_bytes())?)
    }

    /// Removes a job with its slices and dedup sets.
    pub fn delete_job(&self, id: &str) -> Result<(), StoreError> {
        self.jobs.remove(id.as_bytes())?;
        self.delete_slices(id)
    }

    /// Removes a job's slices, planning progress and dedup sets, keeping the job record (a failed
    /// job's outcome).
    pub fn delete_slices(&self, id: &str) -> Result<(), StoreError> {
        self.planning.remove(id.as_bytes())?;
        let prefix = format!("{id}/");
        for tree in [&self.slices, &self.seen] {
            let mut batch = sled::Batch::default();
            for key in tree.scan_prefix(prefix.as_bytes()).keys() {
                batch.remove(key?);
            }
            tree.apply_batch(batch)?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn job(id: &str) -> Job {
        Job {
            id: id.into(),
            request: "http://proxy/fhir/$export".into(),
            spec: ExportSpec {
                level: Level::System,
                output_format: "application/fhir+ndjson".into(),
                since: None,
                types: TypeSelection::All,
                type_filters: vec![],
                elements: vec![],
                patients: vec![],
            },
            state: JobState::Accepted,
            transaction_time: "2026-01-01T00:00:00.000Z".into(),
            created: 0,
            expires: None,
            owner: None,
            notes: vec![],
            error_file: None,
            stored_remotely: false,
            gzip: false,
        }
    }

    pub(crate) fn slice(job_id: &str, index: u32) -> Slice {
        Slice {
            job_id: job_id.into(),
            index,
            resource_type: "Patient".into(),
            kind: SliceKind::Resources,
            searches: vec!["http://u/Patient".into()],
            search_index: 0,
            next: None,
            state: SliceState::Pending,
            files: vec![],
            pages: 0,
            total: None,
            visited: Vec::new(),
        }
    }

    /// sled's flusher thread may hold the directory lock briefly after a `Db` is dropped.
    fn reopen(dir: &Path) -> Result<Store, StoreError> {
        for _ in 0..50 {
            match Store::open(dir) {
                Err(StoreError::Open { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                other => return other,
            }
        }
        Store::open(dir)
    }

    #[tokio::test]
    async fn survives_reopen_and_deletes_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut j = job("a");
            assert!(
                !store.commit_plan(&j, &[slice("a", 0)]).unwrap(),
                "plan of a deleted job"
            );
            store.put_job(&j).unwrap();
            j.state = JobState::Running;
            assert!(store
                .commit_plan(&j, &[slice("a", 0), slice("a", 1)])
                .unwrap());
            store.put_job(&job("b")).unwrap();
            let mut s = slice("a", 1);
            s.pages = 3;
            assert!(store.commit_slice(&s, &["x".into()]).unwrap());
            store.flush().await.unwrap();
        }
        let store = reopen(dir.path()).unwrap();
        assert_eq!(store.jobs().unwrap().len(), 2);
        let slices = store.slices("a").unwrap();
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[1].pages, 3);
        assert!(store.seen(&slices[1], "x").unwrap());
        assert!(store.slices("b").unwrap().is_empty());
        store.delete_job("a").unwrap();
        assert!(store.job("a").unwrap().is_none());
        assert!(store.slices("a").unwrap().is_empty());
        assert!(!store.seen(&slices[1], "x").unwrap());
        // A worker finishing a page after cancellation must not resurrect the slice.
        assert!(!store.commit_slice(&slices[1], &[]).unwrap());
        assert!(store.slices("a").unwrap().is_empty());
    }

    #[test]
    fn type_selection_keeps_all_apart_from_none() {
        for selection in [
            TypeSelection::All,
            TypeSelection::Only(vec![]),
            TypeSelection::Only(vec!["Patient".into()]),
        ] {
            let stored = serde_json::to_vec(&selection).unwrap();
            assert_eq!(
                serde_json::from_slice::<TypeSelection>(&stored).unwrap(),
                selection
            );
        }
        // Records of jobs accepted before the selection was explicit.
        let legacy = |json: &str| serde_json::from_str::<TypeSelection>(json).unwrap();
        assert_eq!(legacy("[]"), TypeSelection::All);
        assert_eq!(
            legacy(r#"["Patient"]"#),
            TypeSelection::Only(vec!["Patient".into()])
        );
    }

    #[test]
    fn planning_progress_goes_with_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let progress = Planning {
            slices: 1,
            done: vec!["Patient".into()],
            split: None,
        };
        assert!(!store
            .commit_planning("a", &progress, &[slice("a", 0)])
            .unwrap());
        let mut j = job("a");
        store.put_job(&j).unwrap();
        assert!(store
            .commit_planning("a", &progress, &[slice("a", 0)])
            .unwrap());
        assert_eq!(store.planning("a").unwrap(), progress);
        assert_eq!(store.slices("a").unwrap().len(), 1);
        j.state = JobState::Running;
        assert!(store.commit_plan(&j, &[slice("a", 1)]).unwrap());
        assert_eq!(store.planning("a").unwrap(), Planning::default());
        assert_eq!(store.slices("a").unwrap().len(), 2);
        assert!(store.commit_planning("a", &progress, &[]).unwrap());
        store.delete_job("a").unwrap();
        assert_eq!(store.planning("a").unwrap(), Planning::default());
    }

    #[test]
    fn damaged_record_is_reported_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.jobs.insert(b"bad", b"{not json".to_vec()).unwrap();
            store.db.flush().unwrap();
        }
        match reopen(dir.path()) {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "bad"),
            other => panic!("expected Corrupt, got {:?}", other.err()),
        }
    }
}
