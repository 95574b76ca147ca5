//! What status polling reports: progress of a running job and the manifest of a finished one.

use std::collections::HashSet;

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

/// A manifest of the job (the Bulk Data `$export` status response) listing the files named in `names`,
/// every file when `None`, with a `link` to the `next` manifest when the list goes on there.
pub fn manifest(
    job: &Job,
    slices: &[Slice],
    url_of: &dyn Fn(&str) -> String,
    requires_token: bool,
    names: Option<&[String]>,
    next: Option<&str>,
) -> serde_json::Value {
    let names: Option<HashSet<&str>> = names.map(|n| n.iter().map(String::as_str).collect());
    let listed = |f: &FilePart| names.as_ref().is_none_or(|n| n.contains(f.name.as_str()));
    let ordered = in_order(job, slices);
    let layout = job.spec.layout;
    let files = |kind: SliceKind, file_type: Option<&str>| -> Vec<serde_json::Value> {
        ordered
            .iter()
            .filter(|s| s.kind == kind)
            .flat_map(|s| s.files.iter().enumerate().map(move |(i, f)| (s, i, f)))
            .filter(|(_, _, f)| f.lines > 0 && listed(f))
            .map(|(s, i, f)| {
                let continues_in = (s.files.get(i + 1))
                    .filter(|_| f.continues)
                    .map(|next| url_of(&next.name));
                layout.output_item(s, f, url_of(&f.name), file_type, continues_in)
            })
            .collect()
    };
    let output = files(SliceKind::Resources, None);
    let deleted = files(SliceKind::Deleted, Some("Bundle"));
    let error: Vec<serde_json::Value> = job
        .error_file
        .iter()
        .filter(|f| listed(f))
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
    if let Some(by) = layout.organized_by() {
        manifest["outputOrganizedBy"] = by.into();
    }
    if let Some(next) = next {
        manifest["link"] = serde_json::json!([{"relation": "next", "url": next}]);
    }
    manifest
}

/// The slices in the order their files are listed, as the job's layout has it.
fn in_order<'s>(job: &Job, slices: &'s [Slice]) -> Vec<&'s Slice> {
    let mut ordered: Vec<&Slice> = slices.iter().collect();
    job.spec.layout.order(&mut ordered);
    ordered
}

/// Names of the output and deleted files a job's manifests list, in manifest order; with
/// `complete_only`, only those that will not change any more: rolled over, or of a slice that ended.
fn data_files(job: &Job, slices: &[Slice], complete_only: bool) -> Vec<String> {
    let ordered = in_order(job, slices);
    let mut names = Vec::new();
    for kind in [SliceKind::Resources, SliceKind::Deleted] {
        for slice in ordered.iter().filter(|s| s.kind == kind) {
            let ended = slice.state != SliceState::Pending;
            let last = slice.files.len().saturating_sub(1);
            let rolled = |i: usize| i < last && job.spec.layout.lists_while_running(slice);
            let complete = |i: usize| !complete_only || ended || rolled(i);
            names.extend(
                (slice.files.iter().enumerate())
                    .filter(|(i, f)| f.lines > 0 && complete(*i))
                    .map(|(_, f)| f.name.clone()),
            );
        }
    }
    names
}

/// A finished job's manifests when none was served before it finished: its files in pages of
/// `per_page`, each also listing the error file (linked manifests repeat every field but `output`,
/// `deleted` and `link`).
pub fn pages(job: &Job, slices: &[Slice], per_page: usize) -> Vec<Vec<String>> {
    let names = data_files(job, slices, false);
    let mut pages: Vec<Vec<String>> = names.chunks(per_page).map(<[String]>::to_vec).collect();
    if pages.is_empty() {
        pages.push(Vec::new());
    }
    if let Some(error) = &job.error_file {
        pages.iter_mut().for_each(|p| p.push(error.name.clone()));
    }
    pages
}

/// Adds pages for the files complete now that no page of `served` lists yet (3.0.0 partial manifests):
/// a page once served never changes, so new files go to new pages, and a finished job's error file
/// to its last. True if a page was added.
pub fn extend_pages(
    served: &mut Vec<Vec<String>>,
    job: &Job,
    slices: &[Slice],
    per_page: usize,
) -> bool {
    let listed: HashSet<&String> = served.iter().flatten().collect();
    let mut fresh: Vec<String> = data_files(job, slices, job.is_active())
        .into_iter()
        .filter(|n| !listed.contains(n))
        .collect();
    if !job.is_active() {
        fresh.extend(job.error_file.iter().map(|f| f.name.clone()));
    }
    let before = served.len();
    served.extend(fresh.chunks(per_page).map(<[String]>::to_vec));
    if served.is_empty() && !job.is_active() {
        served.push(Vec::new());
    }
    served.len() > before
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
                continues: false,
            }],
            pages,
            total,
            visited: Vec::new(),
            patients: Vec::new(),
            members_by: None,
            others: 0,
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

    fn part(name: &str, lines: u64) -> FilePart {
        FilePart {
            name: name.into(),
            lines,
            bytes: 0,
            gzip: false,
            stream: None,
            continues: false,
        }
    }

    fn files_slice(index: u32, state: SliceState, files: &[(&str, u64)]) -> Slice {
        Slice {
            index,
            state,
            files: files.iter().map(|(n, l)| part(n, *l)).collect(),
            ..slice(SliceState::Pending, 0, 0, None)
        }
    }

    fn names(pages: &[&[&str]]) -> Vec<Vec<String>> {
        pages
            .iter()
            .map(|p| p.iter().map(|n| n.to_string()).collect())
            .collect()
    }

    #[test]
    fn a_finished_job_is_paged_with_the_error_file_on_every_page() {
        let mut job = job();
        job.state = JobState::Completed;
        job.error_file = Some(part(ERROR_FILE, 1));
        let slices = [
            files_slice(0, SliceState::Done, &[("a", 8), ("b", 8), ("c", 2)]),
            files_slice(1, SliceState::Done, &[("d", 1), ("empty", 0)]),
        ];
        assert_eq!(
            pages(&job, &slices, 2),
            names(&[&["a", "b", ERROR_FILE], &["c", "d", ERROR_FILE]])
        );
        let first = manifest(
            &job,
            &slices,
            &|n| format!("u/{n}"),
            false,
            Some(&pages(&job, &slices, 2)[0]),
            Some("next"),
        );
        assert_eq!(first["output"].as_array().unwrap().len(), 2);
        assert_eq!(first["error"][0]["url"], "u/errors.ndjson");
        assert_eq!(
            first["link"],
            serde_json::json!([{"relation": "next", "url": "next"}])
        );
        job.error_file = None;
        assert_eq!(
            pages(&job, &[], 2),
            names(&[&[]]),
            "an empty export has one manifest"
        );
    }

    #[test]
    fn partial_pages_only_grow_and_list_complete_files() {
        let mut job = job();
        let mut served = Vec::new();
        // The last file of a running slice may still grow: not listed.
        let running = [files_slice(0, SliceState::Pending, &[("a", 8), ("b", 3)])];
        assert!(extend_pages(&mut served, &job, &running, 10));
        assert_eq!(served, names(&[&["a"]]));
        assert!(
            !extend_pages(&mut served, &job, &running, 10),
            "nothing new, no new page"
        );
        let done = [files_slice(0, SliceState::Done, &[("a", 8), ("b", 5)])];
        assert!(extend_pages(&mut served, &job, &done, 10));
        assert_eq!(served, names(&[&["a"], &["b"]]));
        job.state = JobState::Completed;
        job.error_file = Some(part(ERROR_FILE, 1));
        assert!(extend_pages(&mut served, &job, &done, 10));
        assert_eq!(served, names(&[&["a"], &["b"], &[ERROR_FILE]]));
    }

    /// Organized by patient, a running batch's files are its spool: none is listed early; once done,
    /// its block files are, without `type`, with `continuesInFile` where a block goes on, and the
    /// manifest says `outputOrganizedBy`.
    #[test]
    fn an_organized_batch_is_listed_only_when_done() {
        let mut job = job();
        job.spec.layout = crate::export::layout::Layout::ByPatient;
        let batch = |state| Slice {
            patients: vec!["p".into()],
            ..files_slice(0, state, &[("s1", 8), ("s2", 3)])
        };
        let mut served = Vec::new();
        extend_pages(&mut served, &job, &[batch(SliceState::Pending)], 10);
        assert!(served.iter().all(Vec::is_empty), "{served:?}");
        let mut done = batch(SliceState::Done);
        done.files[0].continues = true;
        job.state = JobState::Completed;
        let m = manifest(&job, &[done], &|n| format!("u/{n}"), false, None, None);
        assert_eq!(m["outputOrganizedBy"], "Patient");
        assert_eq!(
            m["output"],
            serde_json::json!([
                {"url": "u/s1", "count": 8, "continuesInFile": "u/s2"},
                {"url": "u/s2", "count": 3}
            ])
        );
    }
}
