//! What status polling reports: progress of a running job and the manifest of a finished one.

use url::Url;

use crate::export::model::{FilePart, Job, JobState, Slice, SliceKind, SliceState};

/// Name of a job's OperationOutcome NDJSON file.
pub const ERROR_FILE: &str = "errors.ndjson";

/// Public URL of a job file.
pub fn file_url(public_base: &Url, job_id: &str, name: &str) -> String {
    format!(
        "{}/$bulk-files/{job_id}/{name}",
        public_base.as_str().trim_end_matches('/')
    )
}

/// `X-Progress` text: a percentage when the upstream reports `Bundle.total`, else pages fetched.
///
/// Each search counts equally; a running one counts by the share of its `Bundle.total` written.
pub fn progress(job: &Job, slices: &[Slice]) -> String {
    // A job being planned already has slices stored, but not all of them yet.
    if slices.is_empty() || job.state == JobState::Accepted {
        return format!("{} (planning)", state_word(job));
    }
    let finished = slices
        .iter()
        .filter(|s| s.state != SliceState::Pending)
        .count();
    let written: u64 = slices.iter().map(Slice::lines).sum();
    let pages: u64 = slices.iter().map(|s| s.pages).sum();
    let searches = slices.len();
    let running_shares: Option<Vec<f64>> = slices
        .iter()
        .filter(|s| s.state == SliceState::Pending && s.pages > 0)
        .map(|s| {
            s.total.map(|t| {
                if t == 0 {
                    1.0
                } else {
                    (s.lines() as f64 / t as f64).min(1.0)
                }
            })
        })
        .collect();
    if finished == searches {
        return format!("100% complete ({written} resources, {searches} searches finished)");
    }
    match running_shares {
        Some(shares) if slices.iter().any(|s| s.total.is_some()) => {
            let done = finished as f64 + shares.iter().sum::<f64>();
            let pct = ((done * 100.0 / searches as f64) as u64).min(99);
            format!("{pct}% complete ({written} resources, {finished} of {searches} searches finished)")
        }
        _ => format!("{pages} pages fetched ({written} resources, {finished} of {searches} searches finished)"),
    }
}

fn state_word(job: &Job) -> &'static str {
    if job.is_active() {
        "accepted"
    } else {
        "finished"
    }
}

/// The file of a finished job called `name`, if the job has one.
pub fn find_file<'a>(job: &'a Job, slices: &'a [Slice], name: &str) -> Option<&'a FilePart> {
    slices
        .iter()
        .flat_map(|s| s.files.iter())
        .chain(job.error_file.iter())
        .find(|f| f.name == name)
}

/// The completion manifest (Bulk Data Access 2.0 `$export` status response).
pub fn manifest(
    job: &Job,
    slices: &[Slice],
    url_of: &dyn Fn(&str) -> String,
    requires_token: bool,
) -> serde_json::Value {
    let mut ordered: Vec<&Slice> = slices.iter().collect();
    let layout = job.spec.layout;
    layout.order(&mut ordered);
    let files = |kind: SliceKind, file_type: Option<&str>| -> Vec<serde_json::Value> {
        ordered
            .iter()
            .filter(|s| s.kind == kind)
            .flat_map(|s| s.files.iter().map(move |f| (s, f)))
            .filter(|(_, f)| f.lines > 0)
            .map(|(s, f)| layout.output_item(s, f, url_of(&f.name), file_type))
            .collect()
    };
    let output = files(SliceKind::Resources, None);
    let deleted = files(SliceKind::Deleted, Some("Bundle"));
    let error: Vec<serde_json::Value> = job
        .error_file
        .iter()
        .map(|f| {
            serde_json::json!({
                "type": "OperationOutcome",
                "url": url_of(&f.name),
                "count": f.lines,
            })
        })
        .collect();
    let mut manifest = serde_json::json!({
        "transactionTime": job.transaction_time,
        "request": job.request,
        "requiresAccessToken": requires_token,
        "output": output,
        "error": error,
    });
    if job.spec.since.is_some() {
        manifest["deleted"] = deleted.into();
    }
    manifest
}

/// The lines of the job's error file: one OperationOutcome per failed slice or note.
pub fn error_lines(job: &Job, slices: &[Slice]) -> Vec<String> {
    let failures = slices.iter().filter_map(|s| match &s.state {
        SliceState::Failed { message } => Some(crate::outcome::outcome(
            "error",
            "exception",
            &format!(
                "{} export incomplete: {} of its resources were written before the search failed: {message}",
                s.resource_type,
                s.lines()
            ),
        )),
        _ => None,
    });
    let notes = job
        .notes
        .iter()
        .map(|n| crate::outcome::outcome("information", "informational", n));
    failures.chain(notes).map(|o| o.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::model::JobState;

    fn job() -> Job {
        let mut job = crate::export::model::tests::job("j");
        job.state = JobState::Running;
        job
    }

    fn slice(state: SliceState, pages: u64, lines: u64, total: Option<u64>) -> Slice {
        Slice {
            job_id: "j".into(),
            index: 0,
            resource_type: "Patient".into(),
            kind: SliceKind::Resources,
            searches: vec!["u".into()],
            search_index: 0,
            next: None,
            state,
            files: vec![FilePart {
                name: "f".into(),
                lines,
                bytes: 0,
                gzip: false,
                stream: None,
            }],
            pages,
            total,
            visited: Vec::new(),
        }
    }

    #[test]
    fn progress_is_a_percentage_when_totals_are_known() {
        let slices = [
            slice(SliceState::Done, 2, 10, Some(10)),
            slice(SliceState::Pending, 1, 5, Some(10)),
            slice(SliceState::Pending, 0, 0, None),
            slice(SliceState::Pending, 0, 0, None),
        ];
        assert!(progress(&job(), &slices).starts_with("37% complete (15 resources, 1 of 4"));
        let unknown = [slice(SliceState::Pending, 3, 7, None)];
        assert!(progress(&job(), &unknown).starts_with("3 pages fetched (7 resources"));
        assert_eq!(progress(&job(), &[]), "accepted (planning)");
    }
}
