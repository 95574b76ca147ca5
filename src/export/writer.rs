//! NDJSON files of one slice: appended page by page, rolled at a resource count, fsynced before commit.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::store::FilePart;

/// Writer of one slice's files, positioned at the slice's committed end.
pub struct NdjsonWriter {
    dir: PathBuf,
    stem: String,
    per_file: u64,
    parts: Vec<FilePart>,
    current: Option<File>,
    /// Files rolled over since the last sync: they are fsynced with the current one.
    unsynced: Vec<File>,
}

impl NdjsonWriter {
    /// Resumes at the committed state `parts`: the last file is truncated to its committed length and
    /// files past it (written after the last commit) are removed.
    pub fn resume(
        dir: &Path,
        stem: String,
        per_file: u64,
        parts: Vec<FilePart>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut writer = Self {
            dir: dir.to_owned(),
            stem,
            per_file,
            parts,
            current: None,
            unsynced: Vec::new(),
        };
        for stray in writer.parts.len().. {
            match std::fs::remove_file(writer.dir.join(writer.part_name(stray))) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                Err(e) => return Err(e),
            }
        }
        if let Some(last) = writer.parts.last() {
            // Append mode: later writes land after the truncation point, never over committed lines.
            let file = OpenOptions::new()
                .append(true)
                .open(writer.dir.join(&last.name))?;
            file.set_len(last.bytes)?;
            file.sync_data()?;
            writer.current = Some(file);
        }
        Ok(writer)
    }

    fn part_name(&self, part: usize) -> String {
        format!("{}.{part:03}.ndjson", self.stem)
    }

    /// Appends one resource line (`line` holds the JSON without the newline).
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let full = self.parts.last().is_none_or(|p| p.lines >= self.per_file);
        if full {
            self.roll()?;
        }
        let file = self.current.as_mut().expect("roll opened a file");
        file.write_all(line)?;
        file.write_all(b"\n")?;
        let part = self.parts.last_mut().expect("roll added a part");
        part.lines += 1;
        part.bytes += line.len() as u64 + 1;
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        let name = self.part_name(self.parts.len());
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.dir.join(&name))?;
        if let Some(previous) = self.current.replace(file) {
            self.unsynced.push(previous);
        }
        self.parts.push(FilePart {
            name,
            lines: 0,
            bytes: 0,
        });
        Ok(())
    }

    /// Makes everything written durable and returns the parts a cursor may now commit.
    pub fn sync(&mut self) -> io::Result<Vec<FilePart>> {
        let created = !self.unsynced.is_empty() || self.parts.last().is_some_and(|p| p.lines > 0);
        for file in self.unsynced.drain(..) {
            file.sync_data()?;
        }
        if let Some(file) = &self.current {
            file.sync_data()?;
        }
        if created {
            // New directory entries are only durable once the directory itself is synced.
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(self.parts.clone())
    }
}

/// Writes `lines` as a complete NDJSON file, durably (used for the job's error file).
pub fn write_file(path: &Path, lines: &[String]) -> io::Result<FilePart> {
    let mut file = File::create(path)?;
    let mut bytes = 0;
    for line in lines {
        file.write_all(line.as_bytes())?;
        file.write_all(b"\n")?;
        bytes += line.len() as u64 + 1;
    }
    file.sync_data()?;
    Ok(FilePart {
        name: path
            .file_name()
            .expect("a file path")
            .to_string_lossy()
            .into_owned(),
        lines: lines.len() as u64,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn rolls_at_the_limit_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = NdjsonWriter::resume(dir.path(), "Patient.0000".into(), 2, vec![]).unwrap();
        for i in 0..5 {
            w.write_line(format!("{{\"id\":\"{i}\"}}").as_bytes())
                .unwrap();
        }
        let parts = w.sync().unwrap();
        let lines: Vec<u64> = parts.iter().map(|p| p.lines).collect();
        assert_eq!(lines, [2, 2, 1]);
        assert_eq!(parts[2].name, "Patient.0000.002.ndjson");
        assert_eq!(
            read(dir.path(), "Patient.0000.000.ndjson"),
            "{\"id\":\"0\"}\n{\"id\":\"1\"}\n"
        );
        assert_eq!(parts[0].bytes, 22);
    }

    #[test]
    fn resume_drops_uncommitted_bytes_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = NdjsonWriter::resume(dir.path(), "Obs.0001".into(), 2, vec![]).unwrap();
        w.write_line(b"{\"id\":\"a\"}").unwrap();
        let committed = w.sync().unwrap();
        // Written after the commit, then "crashed": a partial line and a rolled-over file.
        w.write_line(b"{\"id\":\"b\"}").unwrap();
        w.write_line(b"{\"id\":\"c\"}").unwrap();
        w.sync().unwrap();
        drop(w);
        let mut w = NdjsonWriter::resume(dir.path(), "Obs.0001".into(), 2, committed).unwrap();
        assert_eq!(read(dir.path(), "Obs.0001.000.ndjson"), "{\"id\":\"a\"}\n");
        assert!(!dir.path().join("Obs.0001.001.ndjson").exists());
        w.write_line(b"{\"id\":\"b\"}").unwrap();
        let parts = w.sync().unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(
            read(dir.path(), "Obs.0001.000.ndjson"),
            "{\"id\":\"a\"}\n{\"id\":\"b\"}\n"
        );
    }
}
