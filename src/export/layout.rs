//! How a job's output is organized (Bulk Data's `organizeOutputBy`): the one place that decides
//! (a) which slices a job has, i.e. how the planner's searches are grouped into slices, (b) how a slice's
//! lines go into files: their names, which lines a match may be, and which runs of lines are atomic
//! units the writer never splits across files, and (c) what manifest items the files become.
//!
//! Today's output, one slice per type (and per patient batch or time range), one file series per slice,
//! every line a unit, manifest items `type` + `url` + `count` ordered by type, is [`Layout::ByType`].
//!
//! The layout is the job's ([`crate::export::model::ExportSpec::layout`], stored with it); the runner hands
//! it to every slice run. Adding `organizeOutputBy=Patient` is a second variant, `ByPatient`, and touches
//! only this module and the kick-off (to accept the parameter and set the job's layout):
//! - [`Layout::group`] gives one slice per patient batch, holding every type's searches of the batch;
//! - [`Layout::file_stem`] names its files after the batch, not a type; [`Layout::admits`] accepts
//!   a match of any of the batch's types;
//! - [`Layout::units`] makes the converter mark `Units::Ends` at each block's end (header
//!   `Parameters`, the Patient, its resources): a block is written as one page run, and the writer's
//!   roll-over ([`crate::export::writer::NdjsonWriter::write_units`]) keeps it in one file unless it
//!   alone exceeds a file;
//! - [`Layout::output_item`] leaves out `type`, and the manifest adds `outputOrganizedBy`.
//!
//! The slice run itself (fetch, convert, write, checkpoint) does not change: it asks the layout.

use serde::{Deserialize, Serialize};

use crate::export::model::{FilePart, Slice, SliceKind};

use crate::export::writer::Units;

/// How a job's files are organized.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Layout {
    /// One file series per resource type (Bulk Data 2.0.0, and 3.0.0 without `organizeOutputBy`).
    #[default]
    ByType,
}

/// The searches of one slice-to-be, as the planner makes them for one resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Searches {
    /// The type they search.
    pub resource_type: String,
    /// The OR-ed searches.
    pub searches: Vec<String>,
}

impl Layout {
    /// (a) The planner's searches of one patient batch or time range, grouped into slices: by type,
    /// each type's searches are a slice.
    pub fn group(self, per_type: Vec<Searches>) -> Vec<Searches> {
        match self {
            Layout::ByType => per_type,
        }
    }

    /// (b) The stem of a slice's file names (the writer adds the part number and extension).
    pub fn file_stem(self, slice: &Slice) -> String {
        match (self, slice.kind) {
            (Layout::ByType, SliceKind::Resources) => {
                format!("{}.{:04}", slice.resource_type, slice.index)
            }
            (Layout::ByType, SliceKind::Deleted) => {
                format!("{}.deleted.{:04}", slice.resource_type, slice.index)
            }
        }
    }

    /// (b) Whether a search match of `resource_type` belongs in `slice` (otherwise the page is refused).
    pub fn admits(self, slice: &Slice, resource_type: &str) -> bool {
        match self {
            Layout::ByType => resource_type == slice.resource_type,
        }
    }

    /// (b) The units a page's lines form, which the writer keeps in one file: by type, every line.
    pub fn units(self) -> Units {
        match self {
            Layout::ByType => Units::Lines,
        }
    }

    /// (c) The manifest's ordering of slices: by type, then as planned.
    pub fn order(self, slices: &mut [&Slice]) {
        match self {
            Layout::ByType => {
                slices.sort_by(|a, b| (&a.resource_type, a.index).cmp(&(&b.resource_type, b.index)))
            }
        }
    }

    /// (c) The manifest item of one of `slice`'s files, reached at `url`; `file_type` overrides the
    /// slice's type (deleted files are `Bundle`s).
    pub fn output_item(
        self,
        slice: &Slice,
        file: &FilePart,
        url: String,
        file_type: Option<&str>,
    ) -> serde_json::Value {
        match self {
            Layout::ByType => serde_json::json!({
                "type": file_type.unwrap_or(&slice.resource_type),
                "url": url,
                "count": file.lines,
            }),
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
        assert!(!layout.admits(&slice, "Patient"));
        assert_eq!(layout.units(), Units::Lines);
        let file = FilePart {
            name: "Observation.0007.000.ndjson".into(),
            lines: 3,
            bytes: 30,
            gzip: false,
            stream: None,
        };
        assert_eq!(
            layout.output_item(&slice, &file, "u".into(), None),
            serde_json::json!({"type": "Observation", "url": "u", "count": 3})
        );
        let searches = vec![Searches {
            resource_type: "Observation".into(),
            searches: vec!["a".into(), "b".into()],
        }];
        assert_eq!(layout.group(searches.clone()), searches);
    }
}
