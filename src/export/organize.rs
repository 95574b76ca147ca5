//! `organizeOutputBy=Patient`: a patient batch's resources, fetched type by type into a spool, rewritten
//! as resource blocks, one per patient: a header `Parameters` whose `header` parameter references the
//! Patient, the Patient, then the resources of its compartment that the export holds.
//!
//! The spool is read twice, streaming: once to learn whose block each line belongs to (an index of 24
//! bytes per resource), once to copy the lines in block order. Memory is the batch's index plus at most
//! one block (or one file's worth of a block too large for a file), never the export.
//!
//! A resource goes in the block of the patient it references by `patient` or `subject`, else by any
//! other reference, so that a resource in two patients' compartments is written once. A line that
//! references no patient of the batch (e.g. `_elements` left its reference out) follows the blocks,
//! without a header.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::Value;

use crate::export::compartment::patient_id;
use crate::export::model::FilePart;
use crate::export::writer::{NdjsonWriter, Units};

/// Bytes of blocks gathered before they are handed to the writer in one call.
const WRITE_CHUNK: usize = 1 << 20;

/// The owner of a line that references no patient of the batch.
const NO_OWNER: u32 = u32::MAX;

/// Where a spool line is, and whose block it goes in.
struct Line {
    /// Index of its patient in the batch, or [`NO_OWNER`].
    owner: u32,
    /// Index of its spool file.
    file: u32,
    offset: u64,
    len: u32,
}

/// Writes the spool files `spool` (in `dir`) to `writer` as the blocks of `patients`, in their order.
pub fn write_blocks(
    dir: &Path,
    spool: &[FilePart],
    patients: &[String],
    writer: &mut NdjsonWriter,
    per_file: u64,
) -> io::Result<()> {
    let position: HashMap<&str, u32> = (patients.iter().enumerate())
        .map(|(i, p)| (p.as_str(), i as u32))
        .collect();
    let mut lines = Vec::new();
    let mut files = Vec::new();
    for (index, part) in spool.iter().enumerate() {
        let file = File::open(dir.join(&part.name))?;
        let mut reader = BufReader::new(file.try_clone()?.take(part.bytes));
        let (mut offset, mut line) = (0, Vec::new());
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            lines.push(Line {
                owner: owner(&line, &position).unwrap_or(NO_OWNER),
                file: index as u32,
                offset,
                len: n as u32,
            });
            offset += n as u64;
        }
        files.push(file);
    }
    // Stable: within a block, the Patient first (its search is the batch's first), then by type.
    lines.sort_by_key(|l| l.owner);
    let mut out = Blocks {
        writer,
        files: &files,
        per_file: per_file.max(2),
        data: Vec::new(),
        ends: Vec::new(),
        units: Vec::new(),
    };
    for block in lines.chunk_by(|a, b| a.owner == b.owner) {
        match patients.get(block[0].owner as usize) {
            Some(patient) => out.block(patient, block)?,
            None => out.loose(block)?,
        }
    }
    out.flush()
}

/// Blocks on their way to the writer.
struct Blocks<'a> {
    writer: &'a mut NdjsonWriter,
    files: &'a [File],
    /// Lines per file (at least two: a header and one resource).
    per_file: u64,
    data: Vec<u8>,
    /// Offset just past each line in `data`.
    ends: Vec<usize>,
    /// Line count at the end of each block in `data`.
    units: Vec<usize>,
}

impl Blocks<'_> {
    /// `patient`'s block; one too large for a file is split into file-sized parts, each under the
    /// header again, each file but the last marked as continued in the next.
    fn block(&mut self, patient: &str, lines: &[Line]) -> io::Result<()> {
        let header = header(patient);
        if (lines.len() as u64) < self.per_file {
            self.push(header.as_bytes())?;
            self.copy(lines)?;
            return self.end_unit();
        }
        self.flush()?;
        let parts: Vec<&[Line]> = lines.chunks(self.per_file as usize - 1).collect();
        for (i, part) in parts.iter().enumerate() {
            self.push(header.as_bytes())?;
            self.copy(part)?;
            self.end_unit()?;
            self.flush()?;
            if i + 1 < parts.len() {
                self.writer.mark_continues();
            }
        }
        Ok(())
    }

    /// Lines of no block, each a unit of its own.
    fn loose(&mut self, lines: &[Line]) -> io::Result<()> {
        for line in lines {
            self.copy(std::slice::from_ref(line))?;
            self.end_unit()?;
        }
        Ok(())
    }

    fn push(&mut self, line: &[u8]) -> io::Result<()> {
        self.data.extend_from_slice(line);
        self.data.push(b'\n');
        self.ends.push(self.data.len());
        Ok(())
    }

    /// Appends spool lines, read where the index says they are.
    fn copy(&mut self, lines: &[Line]) -> io::Result<()> {
        for line in lines {
            let start = self.data.len();
            self.data.resize(start + line.len as usize, 0);
            self.files[line.file as usize].read_exact_at(&mut self.data[start..], line.offset)?;
            if self.data.last() != Some(&b'\n') {
                self.data.push(b'\n');
            }
            self.ends.push(self.data.len());
        }
        Ok(())
    }

    fn end_unit(&mut self) -> io::Result<()> {
        self.units.push(self.ends.len());
        if self.data.len() >= WRITE_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the whole blocks gathered to the writer, which keeps each in one file.
    fn flush(&mut self) -> io::Result<()> {
        if self.ends.is_empty() {
            return Ok(());
        }
        let units = Units::Ends(std::mem::take(&mut self.units));
        self.writer.write_units(&self.data, &self.ends, &units)?;
        self.data.clear();
        self.ends.clear();
        Ok(())
    }
}

/// A block's header: a `Parameters` whose `header` parameter references the block's Patient.
fn header(patient: &str) -> String {
    serde_json::json!({
        "resourceType": "Parameters",
        "parameter": [{"name": "header", "valueReference": {"reference": format!("Patient/{patient}")}}],
    })
    .to_string()
}

/// The batch position of the patient whose block `line` goes in.
fn owner(line: &[u8], position: &HashMap<&str, u32>) -> Option<u32> {
    let resource: Value = serde_json::from_slice(line).ok()?;
    if resource["resourceType"] == "Patient" {
        return resource["id"]
            .as_str()
            .and_then(|id| position.get(id).copied());
    }
    ["patient", "subject"]
        .iter()
        .find_map(|field| referenced(&resource[field], position))
        .or_else(|| any_reference(&resource, position))
}

/// The batch position of the patient `value` (a Reference) points at, if it is one of the batch.
fn referenced(value: &Value, position: &HashMap<&str, u32>) -> Option<u32> {
    let id = value["reference"].as_str().and_then(patient_id)?;
    position.get(id).copied()
}

/// The first reference anywhere in `value` to a patient of the batch.
fn any_reference(value: &Value, position: &HashMap<&str, u32>) -> Option<u32> {
    match value {
        Value::Object(map) => referenced(value, position)
            .or_else(|| map.values().find_map(|v| any_reference(v, position))),
        Value::Array(items) => items.iter().find_map(|v| any_reference(v, position)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `lines` as one spool file and organizes it for `patients` into files of `per_file`.
    fn organize(lines: &[&str], patients: &[&str], per_file: u64) -> Vec<(FilePart, Vec<Value>)> {
        let tmp = tempfile::tempdir().unwrap();
        let mut spool =
            NdjsonWriter::resume(tmp.path(), "s".into(), u64::MAX, false, vec![]).unwrap();
        let mut page = Vec::new();
        let mut ends = Vec::new();
        for l in lines {
            page.extend_from_slice(l.as_bytes());
            page.push(b'\n');
            ends.push(page.len());
        }
        spool.write_page(&page, &ends).unwrap();
        let parts = spool.parts().to_vec();
        let mut out =
            NdjsonWriter::resume(tmp.path(), "o".into(), per_file, false, vec![]).unwrap();
        let patients: Vec<String> = patients.iter().map(|p| p.to_string()).collect();
        write_blocks(tmp.path(), &parts, &patients, &mut out, per_file).unwrap();
        out.finish().unwrap();
        out.parts()
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(tmp.path().join(&p.name)).unwrap();
                let lines = text
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect();
                (p.clone(), lines)
            })
            .collect()
    }

    fn kinds(lines: &[Value]) -> Vec<String> {
        lines
            .iter()
            .map(|v| match v["resourceType"].as_str().unwrap() {
                "Parameters" => format!(
                    "H:{}",
                    v["parameter"][0]["valueReference"]["reference"]
                        .as_str()
                        .unwrap()
                ),
                t => format!("{t}/{}", v["id"].as_str().unwrap_or("-")),
            })
            .collect()
    }

    const SPOOL: [&str; 6] = [
        r#"{"resourceType":"Patient","id":"a"}"#,
        r#"{"resourceType":"Patient","id":"b"}"#,
        r#"{"resourceType":"Condition","id":"c1","subject":{"reference":"Patient/b"}}"#,
        r#"{"resourceType":"Condition","id":"c2","subject":{"reference":"http://x/fhir/Patient/a/_history/3"}}"#,
        r#"{"resourceType":"Observation","id":"o1","performer":[{"reference":"Patient/b"}],"subject":{"reference":"Patient/a"}}"#,
        r#"{"resourceType":"Observation","id":"o2","code":{}}"#,
    ];

    /// Each patient's lines follow its header, Patient first; a resource in two compartments goes
    /// with its subject; a line of no patient comes last, without a header.
    #[test]
    fn lines_are_grouped_into_blocks_in_patient_order() {
        let files = organize(&SPOOL, &["a", "b"], 100);
        assert_eq!(files.len(), 1);
        assert_eq!(
            kinds(&files[0].1),
            [
                "H:Patient/a",
                "Patient/a",
                "Condition/c2",
                "Observation/o1",
                "H:Patient/b",
                "Patient/b",
                "Condition/c1",
                "Observation/o2"
            ]
        );
        assert_eq!(files[0].0.lines, 8);
        assert!(!files[0].0.continues);
    }

    /// A block that does not fit in what is left of a file starts the next file; one larger than a
    /// file is split with its header repeated, and the files it goes on from are marked.
    #[test]
    fn blocks_roll_whole_and_a_block_larger_than_a_file_repeats_its_header() {
        let files = organize(&SPOOL[..5], &["a", "b"], 3);
        let got: Vec<(Vec<String>, bool)> = files
            .iter()
            .map(|(p, lines)| (kinds(lines), p.continues))
            .collect();
        assert_eq!(
            got,
            [
                (
                    vec![
                        "H:Patient/a".into(),
                        "Patient/a".into(),
                        "Condition/c2".into()
                    ],
                    true
                ),
                (vec!["H:Patient/a".into(), "Observation/o1".into()], false),
                (
                    vec![
                        "H:Patient/b".into(),
                        "Patient/b".into(),
                        "Condition/c1".into()
                    ],
                    false
                ),
            ]
        );
    }
}
