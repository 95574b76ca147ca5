//! How a job's output is organized (Bulk Data's `organizeOutputBy`): the one place that decides
//! (a) which slices a job has, i.e. how the planner's searches are grouped into slices, (b) how a slice's
//! lines go into files: their names, which lines a match may be, and which runs of lines are atomic
//! units the writer never splits across files, and (c) what manifest items the files become.
//!
//! [`Layout::ByType`] is Bulk Data 2.0.0's output: one slice per type (and per patient batch or time
//! range), one file series per slice, every line a unit, manifest items `type` + `url` + `count`
//! ordered by type.
//!
//! [`Layout::ByPatient`] is 3.0.0's `organizeOutputBy=Patient`: one slice per patient batch holding
//! every type's searches of the batch. Its pages go to a spool file as they come (checkpointed like any
//! slice, so a crash refetches nothing committed); when the batch's last search is done,
//! [`crate::export::organize`] rewrites the spool as resource blocks (a header `Parameters`, the
//! Patient, its resources) into the slice's real files, which are then committed in one checkpoint.
//! Manifest items have no `type`, and the manifest says `outputOrganizedBy`. Slices of a by-patient
//! job that belong to no batch (the referenced resources) are written as by type, in files after the
//! blocks.
//!
//! The slice run itself (fetch, convert, write, checkpoint) asks the layout and does not change.

use serde::{Deserialize, Serialize};

use crate::export::model::{FilePart, Slice, SliceKind};

/// How a job's files are organized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Layout {
    /// One file series per resource type (Bulk Data 2.0.0, and 3.0.0 without `organizeOutputBy`).
    #[default]
    ByType,
    /// Resource blocks per patient (3.0.0 `organizeOutputBy=Patient`).
    ByPatient,
}

/// The searches of one slice-to-be, as the planner makes them for one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Searches {
    /// The type they search.
    pub resource_type: String,
    /// The OR-ed searches.
    pub searches: Vec<String>,
    /// The patients whose blocks the slice writes (empty: a slice of one type, not organized).
    pub patients: Vec<String>,
}

impl Layout {
    /// (a) The planner's searches of one patient batch or time range, grouped into slices: by type,
    /// each type's searches are a slice; by patient, all of them are one (the Patient search first,
    /// so that a block's Patient comes before its resources), writing the blocks of `batch`.
    pub fn group(self, per_type: Vec<Searches>, batch: &[String]) -> Vec<Searches> {
        match self {
            Layout::ByType => per_type,
            Layout::ByPatient => {
                let mut per_type = per_type;
                per_type.sort_by_key(|s| s.resource_type != "Patient");
                let searches = per_type.into_iter().flat_map(|s| s.searches).collect();
                vec![Searches {
                    resource_type: "Patient".into(),
                    searches,
                    patients: batch.to_vec(),
                }]
            }
        }
    }

    /// Whether `slice` is written as resource blocks: a by-patient job's patient batch.
    pub fn organizes(self, slice: &Slice) -> bool {
        self == Layout::ByPatient && !slice.patients.is_empty()
    }

    /// (b) The stem of a slice's file names (the writer adds the part number and extension).
    pub fn file_stem(self, slice: &Slice) -> String {
        if self.organizes(slice) {
            return format!("patients.{:04}", slice.index);
        }
        match slice.kind {
            SliceKind::Resources => format!("{}.{:04}", slice.resource_type, slice.index),
            SliceKind::Deleted => format!("{}.deleted.{:04}", slice.resource_type, slice.index),
        }
    }

    /// (b) The stem of the files a slice's pages are written to as they are fetched: its own files,
    /// or for a slice written as blocks, the spool they are organized from.
    pub fn fetch_stem(self, slice: &Slice) -> String {
        if self.organizes(slice) {
            format!("patients.{:04}.spool", slice.index)
        } else {
            self.file_stem(slice)
        }
    }

    /// (b) The type the search under way in `slice` returns as matches.
    pub fn page_type(self, slice: &Slice) -> &str {
        if !self.organizes(slice) {
            return &slice.resource_type;
        }
        slice.search_type(slice.search_index)
    }

    /// (b) Whether a search match of `resource_type` belongs in `slice` (otherwise the page is refused).
    pub fn admits(self, slice: &Slice, resource_type: &str) -> bool {
        resource_type == self.page_type(slice)
    }

    /// (b) Whether a slice leaves out resources found before: where a type has several OR-ed searches
    /// (`_typeFilter`s) in it, which may find the same resource.
    pub fn dedupes(self, slice: &Slice) -> bool {
        if !self.organizes(slice) {
            return slice.searches.len() > 1;
        }
        let types: Vec<&str> = (0..slice.searches.len())
            .map(|i| slice.search_type(i))
            .collect();
        types.len() > slice.types().len()
    }

    /// (b) What a resource is known by when a slice leaves out resources found before: its id, or
    /// where a slice holds several types, type and id.
    pub fn dedupe_key(self, slice: &Slice, resource_type: &str, id: &str) -> String {
        if self.organizes(slice) {
            format!("{resource_type}/{id}")
        } else {
            id.to_owned()
        }
    }

    /// (b) Whether a running slice's files other than its last are complete, and so may be listed in
    /// a partial manifest: not a spool's.
    pub fn lists_while_running(self, slice: &Slice) -> bool {
        !self.organizes(slice)
    }

    /// (c) The manifest's ordering of slices: by type, then as planned; by patient, the batches as
    /// planned, then the other slices by type.
    pub fn order(self, slices: &mut [&Slice]) {
        match self {
            Layout::ByType => {
                slices.sort_by(|a, b| (&a.resource_type, a.index).cmp(&(&b.resource_type, b.index)))
            }
            Layout::ByPatient => slices.sort_by(|a, b| {
                let key = |s: &Slice| (!self.organizes(s), s.resource_type.clone(), s.index);
                key(a).cmp(&key(b))
            }),
        }
    }

    /// The value of the manifest's `outputOrganizedBy`, if the files are organized.
    pub fn organized_by(self) -> Option<&'static str> {
        match self {
            Layout::ByType => None,
            Layout::ByPatient => Some("Patient"),
        }
    }

    /// (c) The manifest item of one of `slice`'s files, reached at `url`; `file_type` overrides the
    /// slice's type (deleted files are `Bundle`s); `continues_in` is the URL of the file its last
    /// block goes on in.
    pub fn output_item(
        self,
        slice: &Slice,
        file: &FilePart,
        url: String,
        file_type: Option<&str>,
        continues_in: Option<String>,
    ) -> serde_json::Value {
        match self {
            Layout::ByType => serde_json::json!({
                "type": file_type.unwrap_or(&slice.resource_type),
                "url": url,
                "count": file.lines,
            }),
            Layout::ByPatient => {
                let mut item = serde_json::json!({"url": url, "count": file.lines});
                if let Some(next) = continues_in {
                    item["continuesInFile"] = next.into();
                }
                item
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// By type, file names, admitted types, units and manifest items are those of the release before
    /// the layout existed.
    #[test]
    fn by_type_output_is_unchanged() {
        let slice = Slice {
            resource_type: "Observation".into(),
            ..crate::export::model::tests::slice("j", 7)
        };
        let layout = Layout::default();
        assert_eq!(layout, Layout::ByType);
        assert_eq!(layout.file_stem(&slice), "Observation.0007");
        let deleted = Slice {
            kind: SliceKind::Deleted,
            ..slice.clone()
        };
        assert_eq!(layout.file_stem(&deleted), "Observation.deleted.0007");
        assert!(layout.admits(&slice, "Observation"));
        assert!(!layout.dedupes(&slice));
        assert!(!layout.admits(&slice, "Patient"));
        let file = FilePart {
            name: "Observation.0007.000.ndjson".into(),
            lines: 3,
            bytes: 30,
            gzip: false,
            stream: None,
            continues: false,
        };
        assert_eq!(
            layout.output_item(&slice, &file, "u".into(), None, None),
            serde_json::json!({"type": "Observation", "url": "u", "count": 3})
        );
        let searches = vec![Searches {
            resource_type: "Observation".into(),
            searches: vec!["a".into(), "b".into()],
            patients: vec![],
        }];
        assert_eq!(layout.group(searches.clone(), &["p".into()]), searches);
    }

    /// By patient, a batch's searches are one slice, the Patient's first; its pages go to a spool, its
    /// files are named after the batch, each search admits its own type, and only a type searched
    /// twice (two `_typeFilter`s) makes the slice leave out what it found before.
    #[test]
    fn by_patient_groups_a_batch_into_one_slice() {
        let layout = Layout::ByPatient;
        let per_type = |t: &str, n: usize| Searches {
            resource_type: t.into(),
            searches: (0..n)
                .map(|i| format!("http://u/fhir/{t}?patient=Patient/a&f={i}"))
                .collect(),
            patients: vec![],
        };
        let grouped = layout.group(
            vec![per_type("Condition", 1), per_type("Patient", 1)],
            &["a".into()],
        );
        assert_eq!(grouped.len(), 1);
        assert!(grouped[0].searches[0].contains("/Patient?"));
        let mut slice = Slice {
            searches: grouped[0].searches.clone(),
            patients: grouped[0].patients.clone(),
            ..crate::export::model::tests::slice("j", 3)
        };
        assert!(layout.organizes(&slice));
        assert_eq!(layout.file_stem(&slice), "patients.0003");
        assert_eq!(layout.fetch_stem(&slice), "patients.0003.spool");
        assert!(layout.admits(&slice, "Patient") && !layout.admits(&slice, "Condition"));
        slice.search_index = 1;
        assert!(layout.admits(&slice, "Condition"));
        assert_eq!(layout.dedupe_key(&slice, "Condition", "1"), "Condition/1");
        assert!(!layout.dedupes(&slice));
        let twice = layout.group(vec![per_type("Condition", 2)], &["a".into()]);
        slice.searches = twice[0].searches.clone();
        assert!(layout.dedupes(&slice));
        assert!(!layout.lists_while_running(&slice));
    }
}
