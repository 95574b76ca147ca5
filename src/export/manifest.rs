//! What status polling reports: progress of a running job and the manifest of a finished one.

use url::Url;

use crate::store::{FilePart, Job, Slice, SliceState};

/// Name of a job's OperationOutcome NDJSON file.
pub const ERROR_FILE: &str = "errors.ndjson";

/// Public URL of a job file.
pub fn file_url(public_base: &Url, job_id: &str, name: &str) -> String {
    format!(
        "{}/$bulk-files/{job_id}/{name}",
        public_base.as_str().trim_end_matches('/')
    )
}

/// `X-Progress` text: a percentage when every started search reported `Bundle.total`, else pages done.
pub fn progress(job: &Job, slices: &[Slice]) -> String {
    if slices.is_empty() {
        return format!("{} (planning)", state_word(job));
    }
    let finished = slices
        .iter()
        .filter(|s| s.state != SliceState::Pending)
        .count();
    let pages: u64 = slices.iter().map(|s| s.pages).sum();
    let totals: Option<u64> = slices
        .iter()
        .map(|s| {
            if s.state == SliceState::Pending {
                s.total
            } else {
                Some(s.lines())
            }
        })
        .sum();
    match totals {
        Some(total) if total > 0 => {
            let written: u64 = slices.iter().map(Slice::lines).sum();
            let pct = (written * 100 / total).min(99);
            format!("{pct}% complete ({written} of {total} resources)")
        }
        _ => format!(
            "{pages} pages fetched, {finished} of {} searches finished",
            slices.len()
        ),
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
    public_base: &Url,
    requires_token: bool,
) -> serde_json::Value {
    let mut ordered: Vec<&Slice> = slices.iter().collect();
    ordered.sort_by(|a, b| (&a.resource_type, a.index).cmp(&(&b.resource_type, b.index)));
    let output: Vec<serde_json::Value> = ordered
        .iter()
        .flat_map(|s| s.files.iter().map(move |f| (s, f)))
        .filter(|(_, f)| f.lines > 0)
        .map(|(s, f)| {
            serde_json::json!({
                "type": s.resource_type,
                "url": file_url(public_base, &job.id, &f.name),
                "count": f.lines,
            })
        })
        .collect();
    let error: Vec<serde_json::Value> = job
        .error_file
        .iter()
        .map(|f| {
            serde_json::json!({
                "type": "OperationOutcome",
                "url": file_url(public_base, &job.id, &f.name),
                "count": f.lines,
            })
        })
        .collect();
    serde_json::json!({
        "transactionTime": job.transaction_time,
        "request": job.request,
        "requiresAccessToken": requires_token,
        "output": output,
        "error": error,
    })
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
