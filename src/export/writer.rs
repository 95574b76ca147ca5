//! NDJSON files of one slice: appended page by page, rolled at a resource count, fsynced before commit.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::store::FilePart;

/// Writer of one slice's files, positioned at the slice's committed end.
///
/// Each page is written with one call per file it touches. With `gzip`, each such write is one gzip
/// member: concatenated members are a valid gzip file, and truncating at a committed length always cuts
/// between members.
pub struct NdjsonWriter {
    dir: PathBuf,
    stem: String,
    per_file: u64,
    gzip: bool,
    parts: Vec<FilePart>,
    current: Option<File>,
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

    /// Appends one page of lines: `page` holds them back to back, each ending in a newline, and
    /// `ends[i]` is the offset just past line `i`'s newline. Written at once (one gzip member per file
    /// the page touches), straight from the page: lines are never copied into a buffer of the writer's.
    pub fn write_page(&mut self, page: &[u8], ends: &[usize]) -> io::Result<()> {
        let (mut start, mut line) = (0, 0);
        while line < ends.len() {
            if self.parts.last().is_none_or(|p| p.lines >= self.per_file) {
                self.roll()?;
            }
            let part = self.parts.last().expect("roll added a part");
            let room = (self.per_file - part.lines).min((ends.len() - line) as u64) as usize;
            let end = ends[line + room - 1];
            self.append(&page[start..end], room as u64)?;
            (start, line) = (end, line + room);
        }
        Ok(())
    }

    /// Writes `lines` whole lines to the current file (as one gzip member when compressing).
    fn append(&mut self, bytes: &[u8], lines: u64) -> io::Result<()> {
        let file = self.current.as_mut().expect("roll opened a file");
        let written = if self.gzip {
            let mut encoder = flate2::write::GzEncoder::new(
                Vec::with_capacity(bytes.len() / 4),
                flate2::Compression::fast(),
            );
            encoder.write_all(bytes)?;
            let member = encoder.finish()?;
            file.write_all(&member)?;
            member.len()
        } else {
            file.write_all(bytes)?;
            bytes.len()
        };
        let part = self.parts.last_mut().expect("a part is open");
        part.bytes += written as u64;
        part.lines += lines;
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
        self.created = true;
        self.parts.push(FilePart {
            name,
            lines: 0,
            bytes: 0,
            gzip: self.gzip,
        });
        Ok(())
    }

    /// The files as written so far.
    pub fn parts(&self) -> &[FilePart] {
        &self.parts
    }

    /// The parts as they stand, and what makes exactly them durable, to be synced on another thread
    /// while writing goes on: a cursor may commit the parts once that sync is done.
    pub fn detach_sync(&mut self) -> io::Result<(Vec<FilePart>, Durable)> {
        // A rolled file is complete; the current one is synced and dropped from the cache only as far
        // as it is written now, since writing goes on meanwhile.
        let mut files: Vec<(File, u64)> = self.unsynced.drain(..).map(|f| (f, 0)).collect();
        if let (Some(file), Some(part)) = (&self.current, self.parts.last()) {
            files.push((file.try_clone()?, part.bytes));
        }
        // New directory entries are only durable once the directory itself is synced.
        let dir = std::mem::take(&mut self.created).then(|| self.dir.clone());
        Ok((self.parts.clone(), Durable { files, dir }))
    }
}

/// Written files (and the directory that got new ones) still to be fsynced.
pub struct Durable {
    /// Each file with the length written when the sync was asked for (0: the whole file).
    files: Vec<(File, u64)>,
    dir: Option<PathBuf>,
}

impl Durable {
    /// Fsyncs them, then drops what was synced from the page cache.
    pub fn sync(self) -> io::Result<()> {
        for (file, len) in &self.files {
            file.sync_data()?;
            drop_cached(file, *len);
        }
        if let Some(dir) = &self.dir {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// Tells the kernel that the first `len` bytes of `file` (0: all of it), already synced, will not be read
/// again soon, so that their page-cache pages are freed now.
///
/// An export file is written once and read once, by a client that may come hours later or never: kept
/// cached, it would make the proxy's page cache (counted against a container's memory limit) grow with
/// the export. Reusing the freed pages for the next writes is also what makes writing cheap:
/// `bench/run` measures the export with this in place.
fn drop_cached(file: &File, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let len = libc::off_t::try_from(len).unwrap_or(0);
        // SAFETY: posix_fadvise only reads the descriptor, which `file` keeps open; it is advice, and
        // its failure changes nothing that was written.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, len, libc::POSIX_FADV_DONTNEED);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, len);
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

    /// Writes `lines` as one page.
    fn page(w: &mut NdjsonWriter, lines: &[&str]) {
        let (mut data, mut ends) = (Vec::new(), Vec::new());
        for line in lines {
            data.extend_from_slice(line.as_bytes());
            data.push(b'\n');
            ends.push(data.len());
        }
        w.write_page(&data, &ends).unwrap();
    }

    /// Makes everything written durable, as a checkpoint does; the parts a cursor may commit.
    fn sync(w: &mut NdjsonWriter) -> Vec<FilePart> {
        let (parts, durable) = w.detach_sync().unwrap();
        durable.sync().unwrap();
        parts
    }

    /// Pages of the file at `path` that are in the page cache.
    #[cfg(target_os = "linux")]
    fn cached_pages(path: &Path) -> usize {
        use std::os::fd::AsRawFd;
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let page = 4096;
        let mut resident = vec![0u8; len.div_ceil(page)];
        // SAFETY: a read-only shared mapping of a file this test holds open, unmapped before return;
        // mincore writes one byte per page into `resident`, which has that many.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            assert_eq!(libc::mincore(map, len, resident.as_mut_ptr()), 0);
            libc::munmap(map, len);
        }
        resident.iter().filter(|&&r| r & 1 == 1).count()
    }

    /// On a disk file system (tmpfs pages cannot be dropped), so under the target directory.
    #[cfg(target_os = "linux")]
    #[test]
    fn synced_files_leave_the_page_cache() {
        let dir = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
        let mut w =
            NdjsonWriter::resume(dir.path(), "Observation.0000".into(), 3, false, vec![]).unwrap();
        let line = "x".repeat(64 * 1024);
        page(&mut w, &[line.as_str(); 5]);
        let (first, second) = (
            dir.path().join("Observation.0000.000.ndjson"),
            dir.path().join("Observation.0000.001.ndjson"),
        );
        assert!(cached_pages(&first) > 0 && cached_pages(&second) > 0);
        sync(&mut w);
        assert_eq!((cached_pages(&first), cached_pages(&second)), (0, 0));
    }

    fn read(dir: &Path, name: &str) -> String {
        std::fs::read_to_string(dir.join(name)).unwrap()
    }

    #[test]
    fn rolls_at_the_limit_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            NdjsonWriter::resume(dir.path(), "Patient.0000".into(), 2, false, vec![]).unwrap();
        let lines: Vec<String> = (0..5).map(|i| format!("{{\"id\":\"{i}\"}}")).collect();
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        page(&mut w, &lines[..1]);
        page(&mut w, &lines[1..]);
        page(&mut w, &[]);
        let parts = sync(&mut w);
        let counts: Vec<u64> = parts.iter().map(|p| p.lines).collect();
        assert_eq!(counts, [2, 2, 1]);
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
        page(&mut w, &[r#"{"id":"a"}"#]);
        let committed = sync(&mut w);
        // Written after the commit, then "crashed": a partial line and a rolled-over file.
        page(&mut w, &[r#"{"id":"b"}"#]);
        page(&mut w, &[r#"{"id":"c"}"#]);
        sync(&mut w);
        drop(w);
        let mut w =
            NdjsonWriter::resume(dir.path(), "Obs.0001".into(), 2, false, committed).unwrap();
        assert_eq!(read(dir.path(), "Obs.0001.000.ndjson"), "{\"id\":\"a\"}\n");
        assert!(!dir.path().join("Obs.0001.001.ndjson").exists());
        page(&mut w, &[r#"{"id":"b"}"#]);
        let parts = sync(&mut w);
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
        page(&mut w, &[r#"{"id":"1"}"#]);
        page(&mut w, &[r#"{"id":"2"}"#]);
        let committed = sync(&mut w);
        page(&mut w, &[r#"{"id":"lost"}"#]);
        sync(&mut w);
        drop(w);
        let mut w =
            NdjsonWriter::resume(dir.path(), "P.0000".into(), 100, true, committed).unwrap();
        page(&mut w, &[r#"{"id":"3"}"#]);
        let parts = sync(&mut w);
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
