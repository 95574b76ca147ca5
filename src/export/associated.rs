//! `includeAssociatedData`: the Provenance resources whose `target` is a resource the export holds, all
//! of them (`RelevantProvenanceResources`) or the newest per target (`LatestProvenanceResources`).
//!
//! Once the data and referenced slices are done, the job's NDJSON files are read once, line by line,
//! for the `Type/id` of every resource written but Provenance. These targets go, in batches that fit a
//! URL, to `Provenance?target=...` searches of the upstream, paged through `Bundle.link[next]`. The
//! Provenance chosen, less those the job wrote anyway, are then fetched by `_id=` searches planned as
//! ordinary slices ([`references::slices`]), so each is written once, by the usual slice machinery.
//! Those slices are stored at once: a restarted job either finds them stored and runs them, or runs this
//! step again, which then leaves out every Provenance the stored slices wrote.
//!
//! Memory stays bounded: the targets are streamed from the file scan a batch at a time, through a
//! channel of a few batches, and only the ids of the Provenance chosen are kept, at most
//! [`MAX_PROVENANCE`] of them (beyond that the error file says the rest were left out).

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::scopes::Grant;
use crate::export::failure::JobFailure;
use crate::export::kickoff::{is_fhir_id, Kickoff};
use crate::export::model::{Job, Slice, SliceKind};
use crate::export::ranges::parse_ms;
use crate::export::references::{self, Ids};
use crate::export::window::Window;
use crate::export::worker::WorkerError;
use crate::store::Store;
use crate::upstream::bundle::read_matches;
use crate::upstream::{Capability, Upstream, UpstreamError};

const PROVENANCE: &str = "Provenance";

/// Longest `target=` value of one search, URL-encoded: with the base and the other parameters the
/// URL stays well below common limits (~8 kB).
pub const TARGET_QUERY_BYTES: usize = 6000;

/// Most Provenance ids a job keeps while it chooses them; those found beyond are left out, and noted.
pub const MAX_PROVENANCE: usize = 500_000;

/// Target batches the file scan may read ahead of the searches.
const BATCHES_AHEAD: usize = 2;

/// Which associated resources a job adds (ordered: the later includes the earlier).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AssociatedData {
    /// `LatestProvenanceResources`: per exported resource, the newest Provenance targeting it.
    LatestProvenance,
    /// `RelevantProvenanceResources`: every Provenance targeting an exported resource.
    RelevantProvenance,
}

impl AssociatedData {
    /// One `includeAssociatedData` code; `Err` says why this server cannot honour it.
    pub fn from_code(code: &str) -> Result<AssociatedData, String> {
        match code {
            "LatestProvenanceResources" => Ok(AssociatedData::LatestProvenance),
            "RelevantProvenanceResources" => Ok(AssociatedData::RelevantProvenance),
            c if c.starts_with('_') => Err(format!(
                "{c:?} is a server-defined code, and this server defines none"
            )),
            c => Err(format!(
                "{c:?} is not LatestProvenanceResources or RelevantProvenanceResources"
            )),
        }
    }
}

/// Why the upstream cannot give associated Provenance, if it cannot: it must search Provenance by
/// `target` (to find them) and by `_id` (to fetch them as slices).
pub fn unsupported(capability: &Capability) -> Option<String> {
    let Some(params) = capability.types.get(PROVENANCE) else {
        return Some("the upstream cannot search Provenance".into());
    };
    let missing: Vec<&str> = ["target", "_id"]
        .into_iter()
        .filter(|p| !params.contains(*p))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the upstream cannot search Provenance by {}",
            missing.join(" or ")
        )
    })
}

/// Keeps associated data within the token's grant, which must allow Provenance: as for a `_type`
/// outside the grant, asking without it is refused (`Err`, the message of a 403) unless the client
/// asked for lenient handling, which drops the option with a note.
pub fn restrict_to_grant(kickoff: &mut Kickoff, grant: &Grant) -> Result<(), String> {
    if kickoff.spec.associated.is_none() || grant.allows(PROVENANCE) {
        return Ok(());
    }
    let message =
        "includeAssociatedData adds Provenance, which the access token does not allow exporting";
    if !kickoff.lenient {
        return Err(message.into());
    }
    kickoff.spec.associated = None;
    kickoff
        .notes
        .push(format!("{message}; no associated Provenance is added"));
    Ok(())
}

/// Plans the slices of a job's associated Provenance, once its other slices are done: empty when it
/// asks for none or there are none to add. `None` when the job was stopped or deleted meanwhile.
pub async fn plan(
    job: &Job,
    store: &Store,
    upstream: &Upstream,
    dir: PathBuf,
    page_size: u32,
    cancel: &CancellationToken,
) -> Result<Option<Vec<Slice>>, WorkerError> {
    let Some(kind) = job.spec.associated else {
        return Ok(Some(Vec::new()));
    };
    let why_not = match upstream.capability().await {
        Ok(capability) => unsupported(&capability),
        Err(e) => Some(e.public_message()),
    };
    if let Some(why) = why_not {
        let note = format!("no associated Provenance was added: {why}");
        return commit(job, store, Vec::new(), vec![note]).await;
    }
    let slices = store.slices(&job.id)?;
    let first = slices.iter().map(|s| s.index + 1).max().unwrap_or(0);
    let mut finder = Finder {
        kind,
        upstream,
        page_size,
        window: Window::snapshot(&job.transaction_time),
        chosen: BTreeSet::new(),
        full: false,
        failed: None,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(BATCHES_AHEAD);
    let scanned = slices.clone();
    let scan_dir = dir.clone();
    let scanner = tokio::task::spawn_blocking(move || {
        targets(&scan_dir, &scanned, |batch| tx.blocking_send(batch).is_ok())
    });
    while let Some(batch) = rx.recv().await {
        if !finder.batch(&batch, cancel).await? {
            return Ok(None);
        }
    }
    scanner.await.expect("target scan task panicked")?;
    let Finder {
        mut chosen,
        full,
        failed,
        ..
    } = finder;
    if !chosen.is_empty() {
        chosen = tokio::task::spawn_blocking(move || {
            leave_out_written(&dir, &slices, &mut chosen).map(|()| chosen)
        })
        .await
        .expect("Provenance scan task panicked")?;
    }
    let mut notes = Vec::new();
    if full {
        notes.push(format!(
            "associated Provenance: only the first {MAX_PROVENANCE} found were added; narrow the export to get them all"
        ));
    }
    if let Some((n, first_error)) = failed {
        notes.push(format!(
            "associated Provenance may be incomplete: {n} of the Provenance searches by target failed ({first_error})"
        ));
    }
    let ids = Ids::from([(PROVENANCE.to_owned(), chosen)]);
    let planned = references::slices(job, upstream, page_size, &ids, first);
    commit(job, store, planned, notes).await
}

/// Stores `planned` with the job's new `notes` (those it does not hold already) at once.
async fn commit(
    job: &Job,
    store: &Store,
    planned: Vec<Slice>,
    notes: Vec<String>,
) -> Result<Option<Vec<Slice>>, WorkerError> {
    let Some(mut current) = store.job(&job.id)? else {
        return Ok(None);
    };
    let new: Vec<String> = notes
        .into_iter()
        .filter(|n| !current.notes.contains(n))
        .collect();
    if planned.is_empty() && new.is_empty() {
        return Ok(Some(planned));
    }
    current.notes.extend(new);
    if !store.commit_plan(&current, &planned)? {
        return Ok(None);
    }
    store.flush().await?;
    tracing::info!(job = %job.id, slices = planned.len(), "associated Provenance planned");
    Ok(Some(planned))
}

/// The Provenance searches by target of one job, and what they found.
struct Finder<'a> {
    kind: AssociatedData,
    upstream: &'a Upstream,
    page_size: u32,
    /// Up to the transaction time: Provenance recorded after the kick-off are not the snapshot's.
    window: Window,
    /// The Provenance ids chosen so far.
    chosen: BTreeSet<String>,
    /// Whether [`MAX_PROVENANCE`] ids were chosen, and more found.
    full: bool,
    /// Searches that failed: how many, and the first one's error.
    failed: Option<(usize, String)>,
}

/// What one Provenance search result says about itself.
#[derive(Deserialize)]
struct Found {
    id: String,
    #[serde(default)]
    recorded: Option<String>,
    #[serde(default)]
    meta: Meta,
    #[serde(default)]
    target: Vec<Reference>,
}

#[derive(Default, Deserialize)]
struct Meta {
    #[serde(rename = "lastUpdated", default)]
    last_updated: Option<String>,
}

#[derive(Deserialize)]
struct Reference {
    #[serde(default)]
    reference: Option<String>,
}

/// How new a Provenance is: by `recorded`, then `meta.lastUpdated`, then id (so ties resolve alike).
type Newness = (Option<i64>, Option<i64>, String);

impl Found {
    fn newness(&self) -> Newness {
        (
            self.recorded.as_deref().and_then(parse_ms),
            self.meta.last_updated.as_deref().and_then(parse_ms),
            self.id.clone(),
        )
    }
}

impl Finder<'_> {
    /// Searches the Provenance of one batch of targets, every page; false if the job was stopped.
    async fn batch(
        &mut self,
        targets: &[String],
        cancel: &CancellationToken,
    ) -> Result<bool, JobFailure> {
        let mut url = self.upstream.url(PROVENANCE);
        url.query_pairs_mut()
            .append_pair("_count", &self.page_size.to_string())
            .append_pair("target", &targets.join(","));
        self.window.apply(&mut url);
        let wanted: HashSet<&str> = targets.iter().map(String::as_str).collect();
        let mut newest: HashMap<String, (Newness, String)> = HashMap::new();
        let mut visited = HashSet::new();
        let mut next = Some(url.to_string());
        while let Some(page) = next.take() {
            if cancel.is_cancelled() {
                return Ok(false);
            }
            if !visited.insert(page.clone()) {
                self.fail("the upstream's paging repeats a page".into());
                return Ok(true);
            }
            let (found, link) = match self.upstream.fetch(&page, provenance_page).await {
                Ok(read) => read,
                Err(UpstreamError::Unreachable { secs, detail }) => {
                    return Err(JobFailure::UpstreamUnreachable { secs, detail })
                }
                Err(e) => {
                    // Newest of a part of the results might not be the newest: none of them counts.
                    self.fail(e.public_message());
                    return Ok(true);
                }
            };
            for p in found {
                match self.kind {
                    AssociatedData::RelevantProvenance => self.choose(p.id),
                    AssociatedData::LatestProvenance => {
                        let newness = p.newness();
                        let hits = p
                            .target
                            .iter()
                            .filter_map(|r| r.reference.as_deref().and_then(target_key))
                            .filter(|t| wanted.contains(t));
                        for t in hits {
                            match newest.get(t) {
                                Some((have, _)) if *have >= newness => {}
                                _ => {
                                    newest.insert(t.to_owned(), (newness.clone(), p.id.clone()));
                                }
                            }
                        }
                    }
                }
            }
            next = link;
        }
        for (_, (_, id)) in newest {
            self.choose(id);
        }
        Ok(true)
    }

    fn choose(&mut self, id: String) {
        if self.chosen.len() < MAX_PROVENANCE || self.chosen.contains(&id) {
            self.chosen.insert(id);
        } else {
            self.full = true;
        }
    }

    fn fail(&mut self, message: String) {
        match &mut self.failed {
            Some((n, _)) => *n += 1,
            None => self.failed = Some((1, message)),
        }
    }
}

/// The Provenance of one search page, and its `next` link.
fn provenance_page(
    body: &[u8],
) -> Result<(Vec<Found>, Option<String>), crate::upstream::ParseError> {
    let mut found = Vec::new();
    let summary = read_matches(body, |resource| {
        if resource.resource_type == PROVENANCE {
            found.push(serde_json::from_slice::<Found>(resource.json)?);
        }
        Ok(())
    })?;
    Ok((found, summary.next))
}

/// `Type/id` of a reference as the exported resources' keys are written: relative, absolute
/// (the last two segments) or versioned (`.../_history/v` dropped).
fn target_key(reference: &str) -> Option<&str> {
    let unversioned = match reference.find("/_history/") {
        Some(i) => &reference[..i],
        None => reference,
    };
    let mut cuts = unversioned.rmatch_indices('/').map(|(i, _)| i);
    let _id_cut = cuts.next()?;
    let start = cuts.next().map_or(0, |i| i + 1);
    Some(&unversioned[start..])
}

/// The type and id of one exported line.
#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Cow<'a, str>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
}

/// `Type/id` targets collected until their `target=` value would pass [`TARGET_QUERY_BYTES`].
#[derive(Default)]
struct Batch {
    targets: Vec<String>,
    bytes: usize,
}

impl Batch {
    /// Adds one target; the batch so far when it is full.
    fn push(&mut self, resource_type: &str, id: &str) -> Option<Vec<String>> {
        // `/` and the separating `,` are percent-encoded (3 bytes each); type and id need no escaping.
        let bytes = resource_type.len() + id.len() + 6;
        let full = (self.bytes + bytes > TARGET_QUERY_BYTES && !self.targets.is_empty())
            .then(|| self.take());
        self.targets.push(format!("{resource_type}/{id}"));
        self.bytes += bytes;
        full
    }

    fn take(&mut self) -> Vec<String> {
        self.bytes = 0;
        std::mem::take(&mut self.targets)
    }
}

/// Hands `emit` the `Type/id` of every resource but Provenance in the files of `slices` under `dir`, in
/// batches for one search each; stops early once `emit` answers false.
fn targets(
    dir: &Path,
    slices: &[Slice],
    mut emit: impl FnMut(Vec<String>) -> bool,
) -> io::Result<()> {
    let mut batch = Batch::default();
    let mut go_on = true;
    each_line(dir, slices, |line| {
        let Ok(head) = serde_json::from_slice::<Head>(line) else {
            return true;
        };
        let type_ok = head.resource_type != PROVENANCE
            && head.resource_type.chars().all(|c| c.is_ascii_alphabetic());
        if let (true, Some(id)) = (type_ok, head.id.as_deref().filter(|id| is_fhir_id(id))) {
            if let Some(full) = batch.push(&head.resource_type, id) {
                go_on = emit(full);
            }
        }
        go_on
    })?;
    if go_on && !batch.targets.is_empty() {
        emit(batch.take());
    }
    Ok(())
}

/// Removes from `chosen` the Provenance the files of `slices` under `dir` hold already.
fn leave_out_written(
    dir: &Path,
    slices: &[Slice],
    chosen: &mut BTreeSet<String>,
) -> io::Result<()> {
    // Lines are compact JSON, so a Provenance line holds this; most others are not parsed at all.
    let marker = br#""resourceType":"Provenance""#;
    let finder = memchr::memmem::Finder::new(marker);
    each_line(dir, slices, |line| {
        if finder.find(line).is_some() {
            if let Ok(head) = serde_json::from_slice::<Head>(line) {
                if let (PROVENANCE, Some(id)) = (head.resource_type.as_ref(), head.id.as_deref()) {
                    chosen.remove(id);
                }
            }
        }
        !chosen.is_empty()
    })
}

/// Hands `on` every line of the committed bytes of the resource files of `slices` under `dir`, one
/// at a time; stops early once `on` answers false.
fn each_line(dir: &Path, slices: &[Slice], mut on: impl FnMut(&[u8]) -> bool) -> io::Result<()> {
    let mut line = Vec::new();
    let parts = slices
        .iter()
        .filter(|s| s.kind == SliceKind::Resources)
        .flat_map(|s| s.files.iter())
        .filter(|f| f.lines > 0);
    for part in parts {
        // Only the committed bytes: nothing past them is the export's.
        let file = std::fs::File::open(dir.join(&part.name))?.take(part.bytes);
        let mut reader: Box<dyn BufRead> = if part.gzip {
            Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
        } else {
            Box::new(BufReader::new(file))
        };
        loop {
            line.clear();
            if reader.read_until(b'\n', &mut line)? == 0 {
                break;
            }
            if !on(&line) {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::model::SliceState;
    use crate::export::writer::NdjsonWriter;

    #[test]
    fn codes() {
        assert_eq!(
            AssociatedData::from_code("LatestProvenanceResources"),
            Ok(AssociatedData::LatestProvenance)
        );
        assert_eq!(
            AssociatedData::from_code("RelevantProvenanceResources"),
            Ok(AssociatedData::RelevantProvenance)
        );
        for bad in ["_custom", "latestProvenanceResources", ""] {
            assert!(AssociatedData::from_code(bad).is_err(), "{bad}");
        }
        // Asking for both is asking for all.
        assert!(AssociatedData::RelevantProvenance > AssociatedData::LatestProvenance);
    }

    #[test]
    fn target_keys_are_type_and_id() {
        for (reference, key) in [
            ("Observation/o-1", Some("Observation/o-1")),
            ("Observation/o-1/_history/3", Some("Observation/o-1")),
            ("http://x/fhir/Patient/p", Some("Patient/p")),
            ("http://x/fhir/Patient/p/_history/1", Some("Patient/p")),
            ("p", None),
        ] {
            assert_eq!(target_key(reference), key, "{reference}");
        }
    }

    #[test]
    fn unsupported_unless_provenance_is_searchable_by_target_and_id() {
        let mut cap = Capability::default();
        assert!(unsupported(&cap).is_some());
        cap.types
            .insert("Provenance".into(), ["_id".to_owned()].into());
        assert!(unsupported(&cap).unwrap().contains("target"));
        cap.types.insert(
            "Provenance".into(),
            ["_id", "target"].map(String::from).into(),
        );
        assert_eq!(unsupported(&cap), None);
    }

    /// A finished slice of `resource_type` whose file holds `lines`, written as the worker writes them.
    fn slice_with(
        dir: &Path,
        index: u32,
        resource_type: &str,
        gzip: bool,
        lines: &[String],
    ) -> Slice {
        let mut page = Vec::new();
        let mut ends = Vec::new();
        for l in lines {
            page.extend_from_slice(l.as_bytes());
            page.push(b'\n');
            ends.push(page.len());
        }
        let name = format!("{resource_type}.{index:04}");
        let mut writer = NdjsonWriter::resume(dir, name, 1_000_000, gzip, Vec::new()).unwrap();
        writer.write_page(&page, &ends).unwrap();
        writer.finish().unwrap();
        let mut slice = crate::export::model::tests::slice("j", index);
        slice.resource_type = resource_type.into();
        slice.state = SliceState::Done;
        slice.files = writer.parts().to_vec();
        slice
    }

    #[test]
    fn targets_are_every_written_resource_but_provenance_in_batches_that_fit_a_url() {
        let tmp = tempfile::tempdir().unwrap();
        let observations: Vec<String> = (0..400)
            .map(|i| {
                format!(
                    r#"{{"resourceType":"Observation","id":"observation-{i:04}","status":"final"}}"#
                )
            })
            .collect();
        let slices = [
            slice_with(tmp.path(), 0, "Observation", true, &observations),
            slice_with(
                tmp.path(),
                1,
                "Provenance",
                false,
                &[r#"{"resourceType":"Provenance","id":"pv","target":[{"reference":"Patient/p"}]}"#.into()],
            ),
            slice_with(
                tmp.path(),
                2,
                "Patient",
                false,
                &[r#"{"resourceType":"Patient","id":"p"}"#.into()],
            ),
        ];
        let mut batches = Vec::new();
        targets(tmp.path(), &slices, |b| {
            batches.push(b);
            true
        })
        .unwrap();
        assert!(batches.len() > 1, "400 targets do not fit one search");
        for b in &batches {
            let value: String =
                url::form_urlencoded::byte_serialize(b.join(",").as_bytes()).collect();
            assert!(value.len() <= TARGET_QUERY_BYTES, "{}", value.len());
        }
        let all: Vec<String> = batches.concat();
        let mut expect: Vec<String> = (0..400)
            .map(|i| format!("Observation/observation-{i:04}"))
            .collect();
        expect.push("Patient/p".into());
        assert_eq!(all, expect);
        // Stopping early reads no further.
        let mut calls = 0;
        targets(tmp.path(), &slices, |_| {
            calls += 1;
            false
        })
        .unwrap();
        assert_eq!(calls, 1);

        let mut chosen: BTreeSet<String> = ["pv", "other"].map(String::from).into();
        leave_out_written(tmp.path(), &slices, &mut chosen).unwrap();
        assert_eq!(chosen, BTreeSet::from(["other".to_owned()]));
    }
}
