//! NDJSON files of one slice: appended page by page, rolled at a resource count, fsynced before commit.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::store::FilePart;

/// Writer of one slice's files, positioned at the slice's committed end.
///
/// Lines are gathered per page and written with one call when the page is synced (or the file rolls
/// over). With `gzip`, each such batch becomes one gzip member: concatenated members are a valid gzip
/// file, and truncating at a committed length always cuts between members.
pub struct NdjsonWriter {
    dir: PathBuf,
    stem: String,
    per_file: u64,
    gzip: bool,
    parts: Vec<FilePart>,
    current: Option<File>,
    /// Lines of the current file not yet written.
    pending: Vec<u8>,
    /// Files rolled over since the last sync: they are fsynced with the current one.
    unsynced: Vec<File>,
    /// Whether a file was created since the last sync (its directory entry needs syncing too).
    created: bool,
}

impl NdjsonWriter {
    /// Resumes at the committed state `parts`: the last file is truncated to its committed length and
    /// files past it (written after the last commit) are removed.
    pub fn resume(
        dir: &Path,
        stem: String,
        per_file: u64,
        gzip: bool,
        parts: Vec<FilePart>,
    ) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut writer = Self {
            dir: dir.to_owned(),
            stem,
            per_file,
            gzip,
            parts,
            current: None,
            pending: Vec::new(),
            unsynced: Vec::new(),
            created: false,
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
        let ext = if self.gzip { "ndjson.gz" } else { "ndjson" };
        format!("{}.{part:03}.{ext}", self.stem)
    }

    /// Appends one resource line (`line` holds the JSON without the newline).
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        let full = self.parts.last().is_none_or(|p| p.lines >= self.per_file);
        if full {
            self.roll()?;
        }
        self.pending.extend_from_slice(line);
        self.pending.push(b'\n');
        self.parts.last_mut().expect("roll added a part").lines += 1;
        Ok(())
    }

    /// Writes the pending lines of the current file (as one gzip member when compressing).
    fn flush_pending(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let file = self
            .current
            .as_mut()
            .expect("lines pend only with a file open");
        let written = if self.gzip {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(self.pending.len() / 4),
                flate2::Compression::fast(),
            );
            encoder.write_all(&self.pending)?;
            let member = encoder.finish()?;
            file.write_all(&member)?;
            member.len()
        } else {
            file.write_all(&self.pending)?;
            self.pending.len()
        };
        self.parts.last_mut().expect("a part is open").bytes += written as u64;
        self.pending.clear();
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        self.flush_pending()?;
        let name = self.part_name(self.parts.len());
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.dir.join(&name))?;
        if let Some(previous) = self.current.replace(file) {
            self.unsynced.push(previous);
        }
        self.created = true;
        self.parts.push(FilePart {
            name,
            lines: 0,
            bytes: 0,
            gzip: self.gzip,
        });
        Ok(())
    }

    /// Writes the pending lines to the file (not yet durable: see [`NdjsonWriter::sync`]).
    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_pending()
    }

    /// The files as written so far.
    pub fn parts(&self) -> &[FilePart] {
        &self.parts
    }

    /// Makes everything written durable and returns the parts a cursor may now commit.
    pub fn sync(&mut self) -> io::Result<Vec<FilePart>> {
        self.flush_pending()?;
        for file in self.unsynced.drain(..) {
            file.sync_data()?;
        }
        if let Some(file) = &self.current {
            file.sync_data()?;
        }
        if std::mem::take(&mut self.created) {
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
        gzip: false,
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
        let mut w =
            NdjsonWriter::resume(dir.path(), "Patient.0000".into(), 2, false, vec![]).unwrap();
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
        let mut w = NdjsonWriter::resume(dir.path(), "Obs.0001".into(), 2, false, vec![]).unwrap();
        w.write_line(b"{\"id\":\"a\"}").unwrap();
        let committed = w.sync().unwrap();
        // Written after the commit, then "crashed": a partial line and a rolled-over file.
        w.write_line(b"{\"id\":\"b\"}").unwrap();
        w.write_line(b"{\"id\":\"c\"}").unwrap();
        w.sync().unwrap();
        drop(w);
        let mut w =
            NdjsonWriter::resume(dir.path(), "Obs.0001".into(), 2, false, committed).unwrap();
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

    #[test]
    fn gzip_members_survive_truncation_at_a_commit() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let mut w = NdjsonWriter::resume(dir.path(), "P.0000".into(), 100, true, vec![]).unwrap();
        w.write_line(b"{\"id\":\"1\"}").unwrap();
        w.write_line(b"{\"id\":\"2\"}").unwrap();
        let committed = w.sync().unwrap();
        w.write_line(b"{\"id\":\"lost\"}").unwrap();
        w.sync().unwrap();
        drop(w);
        let mut w =
            NdjsonWriter::resume(dir.path(), "P.0000".into(), 100, true, committed).unwrap();
        w.write_line(b"{\"id\":\"3\"}").unwrap();
        let parts = w.sync().unwrap();
        assert_eq!(parts[0].name, "P.0000.000.ndjson.gz");
        assert!(parts[0].gzip);
        let raw = std::fs::read(dir.path().join(&parts[0].name)).unwrap();
        assert_eq!(raw.len() as u64, parts[0].bytes);
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "{\"id\":\"1\"}\n{\"id\":\"2\"}\n{\"id\":\"3\"}\n");
    }
}
