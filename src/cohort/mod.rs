//! The Bulk Cohort API (Bulk Data 3.0.0 group.html): criteria-based Groups the proxy creates, computes
//! over the upstream, keeps in its store and serves, so that `Group/[id]/$export` works on them.
//!
//! A cohort is created by an asynchronous `POST Group` whose `member-filter` modifier extensions are
//! FHIR searches ([`validate`]); its members are computed in the background by paging those searches on
//! the upstream ([`membership`]); [`service`] runs and resumes computations and owns the records; the
//! HTTP side (create, status, read, search, delete, refresh) is [`handlers`], and [`forward`] sends on a
//! `POST Group` that turned out not to be a cohort. Cohort ids carry [`ID_PREFIX`], and every path
//! `Group/cohort-…` is the proxy's: such a Group can never be created on the upstream through the proxy.

use serde::{Deserialize, Serialize};

pub mod forward;
pub mod handlers;
pub mod membership;
pub mod service;
pub mod validate;

pub use service::Cohorts;

/// The prefix of every cohort id (the rest is a UUID without dashes).
pub const ID_PREFIX: &str = "cohort-";

/// `Group.modifierExtension` url of a membership criterion.
pub const MEMBER_FILTER_URL: &str =
    "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/member-filter";

/// `Group.extension` url of the time membership was last computed.
pub const MEMBERS_REFRESHED_URL: &str =
    "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/members-refreshed";

/// The profile a served cohort Group claims.
pub const PROFILE_URL: &str =
    "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/bulk-cohort-group";

/// Whether `id` names a cohort (rather than an upstream Group).
pub fn is_cohort_id(id: &str) -> bool {
    id.len() > ID_PREFIX.len()
        && id[..ID_PREFIX.len()].eq_ignore_ascii_case(ID_PREFIX)
        && crate::export::kickoff::is_fhir_id(id)
}

/// One member-filter: a search of `resource_type` with `query`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// The expression as the client gave it.
    pub expression: String,
    /// The searched type: `Patient` or a type linked to a patient.
    pub resource_type: String,
    /// The search parameters, as a query string.
    pub query: String,
}

/// Where a cohort's membership stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Members are being computed (computation `generation` of the record).
    Computing,
    /// The last computation finished; its members are stored.
    Ready,
    /// The last computation failed.
    Failed(CohortFailure),
}

/// A finished computation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Computed {
    /// The computation whose members are stored.
    pub generation: u64,
    /// How many members it found.
    pub count: usize,
    /// When it finished (RFC 3339), the `members-refreshed` extension.
    pub refreshed: String,
}

/// A cohort as stored: the definition, its owner and the state of its membership.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cohort {
    /// `cohort-…`.
    pub id: String,
    /// The client that created it (with authorization on).
    pub owner: Option<String>,
    /// The Group as submitted (without `id`, `meta` or members).
    pub definition: serde_json::Value,
    /// Its member-filters, ANDed.
    pub filters: Vec<Filter>,
    /// The current or last computation; members are stored under it.
    pub generation: u64,
    /// Where the current computation stands.
    pub state: State,
    /// The last computation that finished, served as the Group.
    pub ready: Option<Computed>,
    /// When the record last changed (RFC 3339), the Group's `meta.lastUpdated`.
    pub last_updated: String,
}

/// Why a cohort cannot be created or its members computed; turned into a status and OperationOutcome
/// in [`crate::http`] only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum CohortFailure {
    /// The Group does not conform to the Bulk Cohort Group profile, or an expression is malformed.
    #[error("{0}")]
    Invalid(String),
    /// An expression searches a type or uses a parameter the proxy or the upstream does not support.
    #[error("{0}")]
    Unsupported(String),
    /// A filter matches more patients than `cohort.max_members`.
    #[error("{0}")]
    TooManyMembers(String),
    /// The upstream failed (after retries) or ignored a parameter while members were computed.
    #[error("{0}")]
    Upstream(String),
}
