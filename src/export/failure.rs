//! Why a job failed as a whole: the cause with its data, stored with the failed job.
//!
//! The cause, not an HTTP status, is what the engine knows; `http::failure_status` maps it to the status
//! a status poll answers, next to the other errors that become responses.

use serde::{Deserialize, Deserializer, Serialize};

use crate::http::storage_full_message;

/// The cause of a failed job; its `Display` is the message a status poll reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum JobFailure {
    /// The export holds more resources than `max_resources_per_job`.
    #[error("the export holds more than max_resources_per_job ({max}) resources; narrow it with _type, _since or _typeFilter")]
    TooManyResources { max: u64 },
    /// The export would pass `max_disk_bytes`.
    #[error("the export would pass max_disk_bytes ({max} bytes, {used} in use); it was stopped and its files removed")]
    DiskLimit { max: u64, used: u64 },
    /// The local disk (or the proxy's quota on it) is full.
    #[error("{}", storage_full_message(.reason))]
    StorageFull { reason: String },
    /// The export needs more upstream requests than `max_requests_per_job`.
    #[error("the export needs more than max_requests_per_job ({max}) upstream requests")]
    RequestBudget { max: u64 },
    /// The upstream could not be reached for longer than `give_up_after_secs`.
    #[error("the upstream has been unreachable for {secs} s: {detail}")]
    UpstreamUnreachable { secs: u64, detail: String },
    /// The Group to export does not exist upstream.
    #[error("the export could not be planned: Group/{group} was not found on the upstream")]
    GroupNotFound { group: String },
    /// Planning the job's searches failed upstream.
    #[error("the export could not be planned: {reason}")]
    PlanningFailed { reason: String },
    /// Planning the referenced resources' searches failed upstream.
    #[error("the referenced resources could not be planned: {reason}")]
    ReferencesUnplanned { reason: String },
    /// Moving the finished files to the object store failed.
    #[error("storing the export files failed: {reason}")]
    UploadFailed { reason: String },
    /// The store or the local files failed otherwise.
    #[error("the export failed inside the proxy: {reason}")]
    Internal { reason: String },
    /// A failure recorded by a release that stored only its status and message.
    #[error("{message}")]
    Legacy { status: u16, message: String },
}

/// Decodes a stored failure, typed or as the previous release wrote it (`status` and `message` only).
pub fn decode<'de, D: Deserializer<'de>>(d: D) -> Result<JobFailure, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Record {
        Typed(JobFailure),
        Legacy { status: u16, message: String },
    }
    Ok(match Record::deserialize(d)? {
        Record::Typed(failure) => failure,
        Record::Legacy { status, message } => JobFailure::Legacy { status, message },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::model::JobState;

    /// A failed job stored by the previous release decodes, keeping its status and message.
    #[test]
    fn a_failure_of_the_previous_release_decodes() {
        let old =
            r#"{"state":"failed","status":502,"message":"storing the export files failed: down"}"#;
        let state: JobState = serde_json::from_str(old).unwrap();
        let JobState::Failed(failure) = state else {
            panic!("not failed: {state:?}")
        };
        assert_eq!(
            failure,
            JobFailure::Legacy {
                status: 502,
                message: "storing the export files failed: down".into()
            }
        );
        assert_eq!(crate::http::failure_status(&failure).as_u16(), 502);
        assert_eq!(failure.to_string(), "storing the export files failed: down");
    }

    /// Typed failures round-trip through the store's encoding.
    #[test]
    fn a_typed_failure_round_trips() {
        for failure in [
            JobFailure::TooManyResources { max: 5 },
            JobFailure::DiskLimit { max: 10, used: 7 },
            JobFailure::GroupNotFound { group: "g".into() },
            JobFailure::Internal { reason: "x".into() },
        ] {
            let state = JobState::Failed(failure);
            let json = serde_json::to_string(&state).unwrap();
            assert!(json.contains(r#""state":"failed""#), "{json}");
            assert_eq!(serde_json::from_str::<JobState>(&json).unwrap(), state);
        }
    }
}
