//! The export's domain model: what a job asks for, where it is, and the slices it is cut into.
//!
//! These are the records the store keeps (as JSON), so every field added later is `#[serde(default)]`:
//! a store written by an earlier release must open and resume (tests/upgrade.rs holds one).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::export::associated::AssociatedData;
use crate::export::failure::JobFailure;
use crate::export::kickoff::Kickoff;
use crate::export::layout::Layout;
use crate::export::ranges::Split;

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
    /// `_until` (Bulk Data 3.0.0) as a FHIR instant: only resources changed before it.
    #[serde(default)]
    pub until: Option<String>,
    /// `_type`, or every type the level allows.
    pub types: TypeSelection,
    /// `_typeFilter` queries by type: each a query string without the leading `Type?`.
    pub type_filters: Vec<(String, String)>,
    /// `_elements`: `Type.element` or bare `element` entries.
    pub elements: Vec<String>,
    /// `patient` references (ids only), Patient and Group level.
    pub patients: Vec<String>,
    /// How the output files are organized.
    #[serde(default)]
    pub layout: Layout,
    /// `includeAssociatedData`: the Provenance added for the exported resources, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associated: Option<AssociatedData>,
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
    /// Whether status polls answer 200 with the job's status in `X-Export-Status` (3.0.0's
    /// `Prefer: separate-export-status`).
    #[serde(default)]
    pub separate_status: bool,
    /// Whether polls of the running job may answer with a manifest of the files already complete
    /// (3.0.0's `allowPartialManifests`).
    #[serde(default)]
    pub partial_manifests: bool,
}

impl Job {
    /// A job accepted now for a validated kick-off: a fresh id, and `now` as its transaction time.
    pub fn new(
        kickoff: Kickoff,
        request: String,
        owner: Option<String>,
        gzip: bool,
        now: DateTime<Utc>,
    ) -> Job {
        Job {
            id: uuid::Uuid::new_v4().simple().to_string(),
            request,
            spec: kickoff.spec,
            state: JobState::Accepted,
            transaction_time: now.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            created: now.timestamp(),
            expires: None,
            owner,
            notes: kickoff.notes,
            error_file: None,
            stored_remotely: false,
            gzip,
            separate_status: kickoff.separate_status,
            partial_manifests: kickoff.partial_manifests,
        }
    }

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
    /// Whether the file's last resource block goes on in the slice's next file (`organizeOutputBy`: a
    /// block larger than a file, split with its header repeated).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continues: bool,
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
    /// The patients whose resource blocks the slice writes (`organizeOutputBy=Patient`), in block
    /// order; empty for a slice of one type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patients: Vec<String>,
    /// For a type a Patient or Group export pages whole: the element whose patient reference must be one
    /// of the job's patients for a resource to be kept (`id` for Patient); see [`crate::export::whole`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members_by: Option<String>,
    /// Matches left out as other patients' resources (`members_by`), counted against `Bundle.total`.
    #[serde(default)]
    pub others: u64,
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
            patients: Vec::new(),
            members_by: None,
            others: 0,
        }
    }

    /// The type the search at `index` returns as matches.
    pub fn search_type(&self, index: usize) -> &str {
        let search = &self.searches[index.min(self.searches.len().saturating_sub(1))];
        let path = search.split(['?', '#']).next().unwrap_or(search);
        path.rsplit('/').next().unwrap_or(&self.resource_type)
    }

    /// Every type whose resources the slice's files hold: its own, or a patient batch's written as
    /// blocks, those of all its searches.
    pub fn types(&self) -> Vec<&str> {
        if self.patients.is_empty() {
            return vec![self.resource_type.as_str()];
        }
        let mut types: Vec<&str> = (0..self.searches.len())
            .map(|i| self.search_type(i))
            .collect();
        types.sort_unstable();
        types.dedup();
        types
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
                until: None,
                types: TypeSelection::All,
                type_filters: vec![],
                elements: vec![],
                patients: vec![],
                layout: Layout::ByType,
                associated: None,
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
            separate_status: false,
            partial_manifests: false,
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
            patients: Vec::new(),
            members_by: None,
            others: 0,
        }
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
}
