//! The resources a Patient or Group export references and clients need to read it (US Core, ONC (g)(10)):
//! Practitioner, PractitionerRole, Organization, Location and Medication.
//!
//! Once every data slice is done, the job's NDJSON files are read once, line by line, for relative
//! references (`Type/id`) to those types; the ids found, less those the job already exported, become
//! `_id=` searches planned as ordinary slices. The data path stays one-directional (the worker knows
//! nothing of this), and the slices bring their own cursors, checkpoints and files: a restarted job
//! either finds them stored (all of them: they are committed at once) or scans again.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

use url::Url;

use crate::export::compartment::{self, Reach, REFERENCED_TYPES};
use crate::export::elements::elements_for;
use crate::export::kickoff::is_fhir_id;
use crate::export::model::{ExportSpec, Job, Slice, SliceKind};
use crate::upstream::{Capability, Upstream};

/// Ids per `_id=` search: long enough lists to save requests, URLs well below common limits (~7 kB).
pub const ID_BATCH: usize = 100;

/// Ids by resource type.
pub type Ids = BTreeMap<String, BTreeSet<String>>;

/// The referenced types a job adds: those of [`REFERENCED_TYPES`] its selection (`_type`, narrowed to the
/// token's grant) includes and the upstream can search. None at system level, whose selection already
/// says which of them it exports.
pub fn wanted(spec: &ExportSpec, capability: &Capability) -> Vec<&'static str> {
    let reach = compartment::level_types(&spec.level, capability);
    REFERENCED_TYPES
        .into_iter()
        .filter(|t| reach.get(*t) == Some(&Reach::ByReference) && spec.types.includes(t))
        .collect()
}

/// Whether `slice` fetches referenced resources (a Patient or Group export searches none of
/// [`REFERENCED_TYPES`] by patient, so a slice of one of them was planned here).
pub fn is_reference_slice(slice: &Slice) -> bool {
    REFERENCED_TYPES.contains(&slice.resource_type.as_str())
}

/// The ids of `wanted` types referenced by the resources in the files of `slices` under `dir`, less
/// those the files hold themselves. Reads each file once, a line at a time.
pub fn scan(dir: &Path, slices: &[Slice], wanted: &[&str]) -> io::Result<Ids> {
    let mut referenced = Ids::new();
    let mut exported = Ids::new();
    let mut line = Vec::new();
    let parts = slices
        .iter()
        .filter(|s| s.kind == SliceKind::Resources)
        .flat_map(|s| s.files.iter())
        .filter(|f| f.lines > 0);
    for part in parts {
        // Only the committed bytes: the slices are finished, but nothing past them is the export's.
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
            let Ok(resource) = serde_json::from_slice::<serde_json::Value>(&line) else {
                continue;
            };
            if let (Some(t), Some(id)) =
                (resource["resourceType"].as_str(), resource["id"].as_str())
            {
                if wanted.contains(&t) {
                    exported
                        .entry(t.to_owned())
                        .or_default()
                        .insert(id.to_owned());
                }
            }
            collect(&resource, wanted, &mut referenced);
        }
    }
    for (t, ids) in &mut referenced {
        if let Some(have) = exported.get(t) {
            ids.retain(|id| !have.contains(id));
        }
    }
    referenced.retain(|_, ids| !ids.is_empty());
    Ok(referenced)
}

/// Adds the relative references to `wanted` types anywhere in `value` to `found`.
fn collect(value: &serde_json::Value, wanted: &[&str], found: &mut Ids) {
    match value {
        serde_json::Value::Object(members) => {
            for (k, v) in members {
                match v {
                    serde_json::Value::String(r) if k == "reference" => {
                        if let Some((t, id)) = relative_reference(r) {
                            if wanted.contains(&t) {
                                found.entry(t.to_owned()).or_default().insert(id.to_owned());
                            }
                        }
                    }
                    _ => collect(v, wanted, found),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, wanted, found)),
        _ => {}
    }
}

/// `(type, id)` of a relative reference `Type/id` or `Type/id/_history/version`; absolute, contained
/// (`#x`) and logical references are not the upstream's to resolve by id.
fn relative_reference(reference: &str) -> Option<(&str, &str)> {
    let mut parts = reference.split('/');
    let (t, id) = (parts.next()?, parts.next()?);
    let rest: Vec<&str> = parts.collect();
    let versioned = matches!(rest.as_slice(), [h, v] if *h == "_history" && is_fhir_id(v));
    let type_ok = t.starts_with(|c: char| c.is_ascii_uppercase())
        && t.chars().all(|c| c.is_ascii_alphabetic());
    (type_ok && is_fhir_id(id) && (rest.is_empty() || versioned)).then_some((t, id))
}

/// The slices that fetch `ids`, numbered from `first_index`: per type, one slice per [`ID_BATCH`] ids,
/// each with one `_id=` search per `_typeFilter` of the type (OR-ed, so deduplicated), or one search.
pub fn slices(
    job: &Job,
    upstream: &Upstream,
    page_size: u32,
    ids: &Ids,
    first_index: u32,
) -> Vec<Slice> {
    let spec = &job.spec;
    let mut index = first_index;
    let mut out = Vec::new();
    for (t, ids) in ids {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let filters: Vec<Option<&str>> = match spec
            .type_filters
            .iter()
            .filter(|(ft, _)| ft == t)
            .map(|(_, q)| Some(q.as_str()))
            .collect::<Vec<_>>()
        {
            f if f.is_empty() => vec![None],
            f => f,
        };
        let elements = elements_for(&spec.elements, t);
        for batch in ids.chunks(ID_BATCH) {
            let searches = filters
                .iter()
                .map(|filter| {
                    let mut url: Url = upstream.url(t);
                    {
                        let mut q = url.query_pairs_mut();
                        q.append_pair("_count", &page_size.to_string());
                        q.append_pair("_id", &batch.join(","));
                        if !elements.is_empty() {
                            q.append_pair("_elements", &elements.join(","));
                        }
                        if let Some(filter) = filter {
                            q.extend_pairs(url::form_urlencoded::parse(filter.as_bytes()));
                        }
                    }
                    url.to_string()
                })
                .collect();
            out.push(Slice::pending(
                &job.id,
                index,
                t,
                SliceKind::Resources,
                searches,
            ));
            index += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::model::SliceState;
    use crate::export::writer::NdjsonWriter;

    #[test]
    fn only_relative_references_count() {
        assert_eq!(
            relative_reference("Practitioner/p-1"),
            Some(("Practitioner", "p-1"))
        );
        assert_eq!(
            relative_reference("Organization/o/_history/2"),
            Some(("Organization", "o"))
        );
        for r in [
            "http://x/fhir/Practitioner/p",
            "#contained",
            "Practitioner/",
            "Practitioner/p/extra",
            "urn:uuid:6e2b",
            "practitioner/p",
        ] {
            assert_eq!(relative_reference(r), None, "{r}");
        }
    }

    /// A finished slice of `resource_type` whose files hold `lines`, written as the worker writes them.
    fn slice_with(
        dir: &Path,
        index: u32,
        resource_type: &str,
        gzip: bool,
        lines: &[&str],
    ) -> Slice {
        let mut page = Vec::new();
        let mut ends = Vec::new();
        for l in lines {
            page.extend_from_slice(l.as_bytes());
            page.push(b'\n');
            ends.push(page.len());
        }
        let mut writer = NdjsonWriter::resume(
            dir,
            format!("{resource_type}.{index:04}"),
            2,
            gzip,
            Vec::new(),
        )
        .unwrap();
        writer.write_page(&page, &ends).unwrap();
        writer.finish().unwrap();
        Slice {
            job_id: "j".into(),
            index,
            resource_type: resource_type.into(),
            kind: SliceKind::Resources,
            searches: vec!["u".into()],
            search_index: 1,
            next: None,
            state: SliceState::Done,
            files: writer.parts().to_vec(),
            pages: 1,
            total: None,
            visited: Vec::new(),
            patients: Vec::new(),
            members_by: None,
            others: 0,
        }
    }

    #[test]
    fn scan_finds_references_in_every_file_less_those_exported() {
        let tmp = tempfile::tempdir().unwrap();
        let observations = slice_with(
            tmp.path(),
            0,
            "Observation",
            true,
            &[
                r#"{"resourceType":"Observation","id":"o1","performer":[{"reference":"Practitioner/a"},{"reference":"Organization/x"}]}"#,
                r#"{"resourceType":"Observation","id":"o2","performer":[{"reference":"Practitioner/a"}],"subject":{"reference":"Patient/p"}}"#,
                r#"{"resourceType":"Observation","id":"o3","basedOn":[{"reference":"Practitioner/c"}],"extension":[{"valueReference":{"reference":"Location/l1/_history/3"}}]}"#,
            ],
        );
        let encounters = slice_with(
            tmp.path(),
            1,
            "Encounter",
            false,
            &[
                r#"{"resourceType":"Encounter","id":"e","serviceProvider":{"reference":"Organization/y"},"participant":[{"individual":{"reference":"https://elsewhere/Practitioner/b"}}]}"#,
            ],
        );
        let organizations = slice_with(
            tmp.path(),
            2,
            "Organization",
            false,
            &[r#"{"resourceType":"Organization","id":"y"}"#],
        );
        let found = scan(
            tmp.path(),
            &[observations, encounters, organizations],
            &["Practitioner", "Organization", "Location"],
        )
        .unwrap();
        let expect: Ids = [
            ("Location", vec!["l1"]),
            ("Organization", vec!["x"]),
            ("Practitioner", vec!["a", "c"]),
        ]
        .into_iter()
        .map(|(t, ids)| (t.to_owned(), ids.into_iter().map(String::from).collect()))
        .collect();
        assert_eq!(found, expect);
        // Types not wanted (outside `_type` or the grant) are not collected.
        let tmp2 = tempfile::tempdir().unwrap();
        let only = slice_with(
            tmp2.path(),
            0,
            "Observation",
            false,
            &[
                r#"{"resourceType":"Observation","id":"o","performer":[{"reference":"Organization/x"}]}"#,
            ],
        );
        assert!(scan(tmp2.path(), &[only], &["Practitioner"])
            .unwrap()
            .is_empty());
    }
}
