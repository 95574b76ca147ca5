//! NDJSON files of one slice: appended page by page, rolled at a resource count, fsynced before commit.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use flate2::{Compress, Compression, FlushCompress};

use crate::export::model::{FilePart, GzipStream};

/// Every gzip file's header: deflate, no name, no time, unknown OS.
const GZIP_HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// An empty final deflate block (fixed Huffman codes, only the end-of-block code): it ends a stream
/// whose blocks were all flushed to a byte boundary without being final.
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// Bytes of compressed output handed to the file at a time.
const DEFLATE_CHUNK: usize = 128 * 1024;

/// The runs of a page's lines that must stay in one file, as its layout declares them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Units {
    /// Every line is a unit: files roll over at any line.
    #[default]
    Lines,
    /// Each entry is the number of the page's lines up to the end of a unit, ascending; the page ends
    /// with a unit.
    Ends(Vec<usize>),
}

impl Units {
    /// How many of the lines from `line` on, at most `room`, end on a unit boundary (0: not one unit fits).
    fn fit(&self, line: usize, room: usize) -> usize {
        match self {
            Units::Lines => room,
            Units::Ends(ends) => ends
                .iter()
                .rev()
                .find(|&&end| end > line && end <= line + room)
                .map_or(0, |end| end - line),
        }
    }
}

/// Writer of one slice's files, positioned at the slice's committed end.
///
/// Each page is written with one call per file it touches. With `gzip`, a file is one gzip stream, as
/// clients that decode a single gzip member need: each write adds deflate blocks that are not final and
/// end on a byte boundary, so that truncating at a committed length always cuts between writes and a
/// resumed writer goes on with the same stream (its CRC and size are committed with the part). The
/// final block and trailer are written when the file is complete: as it rolls over, or by `finish`.
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
    /// Compressed output on its way to the file.
    deflated: Vec<u8>,
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
            deflated: Vec::new(),
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

    /// Appends one page of lines, every line a unit of its own: `page` holds them back to back, each ending in a newline, and
    /// `ends[i]` is the offset just past line `i`'s newline. Written at once (one gzip member per file
    /// the page touches), straight from the page: lines are never copied into a buffer of the writer's.
    pub fn write_page(&mut self, page: &[u8], ends: &[usize]) -> io::Result<()> {
        self.write_units(page, ends, &Units::Lines)
    }

    /// [`NdjsonWriter::write_page`] rolling over only between `units`: a unit that does not fit in the
    /// current file starts the next one, and only a unit longer than a whole file is split.
    pub fn write_units(&mut self, page: &[u8], ends: &[usize], units: &Units) -> io::Result<()> {
        let (mut start, mut line) = (0, 0);
        while line < ends.len() {
            if !self.parts.last().is_some_and(|p| self.appendable(p)) {
                self.roll()?;
            }
            let part = self.parts.last().expect("roll added a part");
            let room = (self.per_file - part.lines).min((ends.len() - line) as u64) as usize;
            let take = match units.fit(line, room) {
                0 if part.lines > 0 => {
                    self.roll()?;
                    continue;
                }
                0 => room,
                whole => whole,
            };
            let end = ends[line + take - 1];
            self.append(&page[start..end], take as u64)?;
            (start, line) = (end, line + take);
        }
        Ok(())
    }

    /// Whether lines may go on into `part`: it has room, and if gzip, its stream is this release's and
    /// not ended (a previous release's series of members is not continued, so formats never mix).
    fn appendable(&self, part: &FilePart) -> bool {
        part.lines < self.per_file
            && part.gzip == self.gzip
            && (!part.gzip || part.stream.is_some_and(|s| !s.finished))
    }

    /// Writes `lines` whole lines to the current file.
    fn append(&mut self, bytes: &[u8], lines: u64) -> io::Result<()> {
        let file = self.current.as_mut().expect("roll opened a file");
        let part = self.parts.last_mut().expect("a part is open");
        let written = match &mut part.stream {
            Some(stream) => {
                let written = deflate_flushed(bytes, file, &mut self.deflated)?;
                let mut crc = crc32fast::Hasher::new_with_initial(stream.crc);
                crc.update(bytes);
                stream.crc = crc.finalize();
                stream.size += bytes.len() as u64;
                written
            }
            None => {
                file.write_all(bytes)?;
                bytes.len() as u64
            }
        };
        part.bytes += written;
        part.lines += lines;
        Ok(())
    }

    /// Ends the current file's gzip stream with the final block and trailer; for a slice with nothing
    /// more to write (a file that rolls over is ended then). Nothing to do for a plain or ended file.
    pub fn finish(&mut self) -> io::Result<()> {
        let (Some(file), Some(part)) = (self.current.as_mut(), self.parts.last_mut()) else {
            return Ok(());
        };
        let Some(stream) = part.stream.as_mut().filter(|s| !s.finished) else {
            return Ok(());
        };
        let mut tail = [0; 10];
        tail[..2].copy_from_slice(&FINAL_BLOCK);
        tail[2..6].copy_from_slice(&stream.crc.to_le_bytes());
        // ISIZE is the size modulo 2^32.
        tail[6..].copy_from_slice(&(stream.size as u32).to_le_bytes());
        file.write_all(&tail)?;
        stream.finished = true;
        part.bytes += tail.len() as u64;
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        self.finish()?;
        let name = self.part_name(self.parts.len());
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(self.dir.join(&name))?;
        let stream = if self.gzip {
            file.write_all(&GZIP_HEADER)?;
            Some(GzipStream::default())
        } else {
            None
        };
        if let Some(previous) = self.current.replace(file) {
            self.unsynced.push(previous);
        }
        self.created = true;
        self.parts.push(FilePart {
            name,
            lines: 0,
            bytes: if self.gzip {
                GZIP_HEADER.len() as u64
            } else {
                0
            },
            gzip: self.gzip,
            stream,
            continues: false,
        });
        Ok(())
    }

    /// Marks the current file as one whose last unit goes on in the next file.
    pub fn mark_continues(&mut self) {
        if let Some(part) = self.parts.last_mut() {
            part.continues = true;
        }
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

/// Compresses `bytes` into `file` as deflate blocks that are not final and end on a byte boundary (a
/// sync flush), so that whatever follows them, even a fresh compressor's output after a restart,
/// continues one valid stream. A fresh compressor per call: nothing refers back past a commit point.
/// Returns the bytes written.
fn deflate_flushed(bytes: &[u8], file: &mut File, buf: &mut Vec<u8>) -> io::Result<u64> {
    let mut deflate = Compress::new(Compression::fast(), false);
    buf.clear();
    buf.reserve_exact(DEFLATE_CHUNK);
    loop {
        let consumed = deflate.total_in() as usize;
        deflate
            .compress_vec(&bytes[consumed..], buf, FlushCompress::Sync)
            .map_err(io::Error::other)?;
        file.write_all(buf)?;
        // The flush is complete once the compressor stops short of filling the space it was given.
        let full = buf.len() == buf.capacity();
        buf.clear();
        if !full && deflate.total_in() as usize == bytes.len() {
            return Ok(deflate.total_out());
        }
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
        stream: None,
        continues: false,
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

    /// A unit that does not fit in the current file starts the next one whole; only a unit longer than
    /// a file is split; every-line units roll exactly as `write_page` does.
    #[test]
    fn a_unit_is_never_split_across_files_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut w =
            NdjsonWriter::resume(dir.path(), "block.0000".into(), 4, false, vec![]).unwrap();
        let (mut data, mut ends) = (Vec::new(), Vec::new());
        for i in 0..11 {
            data.extend_from_slice(format!("{{\"id\":\"{i}\"}}\n").as_bytes());
            ends.push(data.len());
        }
        // Units of 3, 2, 5 (longer than a file) and 1 lines.
        w.write_units(&data, &ends, &Units::Ends(vec![3, 5, 10, 11]))
            .unwrap();
        let counts: Vec<u64> = sync(&mut w).iter().map(|p| p.lines).collect();
        assert_eq!(counts, [3, 2, 4, 2]);
        assert_eq!(Units::Lines.fit(3, 2), 2);
        assert_eq!(Units::Ends(vec![3, 5]).fit(3, 1), 0);
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

    /// `n` lines of `width` pseudo-random hex digits (hardly compressible), numbered from `first`.
    fn noisy_lines(first: usize, n: usize, width: usize) -> Vec<String> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ first as u64;
        (first..first + n)
            .map(|i| {
                let noise: String = (0..width / 16)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        format!("{state:016x}")
                    })
                    .collect();
                format!("{{\"id\":\"{i}\",\"n\":\"{noise}\"}}")
            })
            .collect()
    }

    /// The text of a gzip file read with a single-member decoder, as most HTTP clients read it; it
    /// checks the trailer's CRC and size, and the file must hold nothing after that one member.
    fn single_member(dir: &Path, part: &FilePart) -> String {
        use std::io::Read;
        let raw = std::fs::read(dir.join(&part.name)).unwrap();
        assert_eq!(
            raw.len() as u64,
            part.bytes,
            "{}: committed length",
            part.name
        );
        let mut decoder = flate2::bufread::GzDecoder::new(&raw[..]);
        let mut text = String::new();
        decoder
            .read_to_string(&mut text)
            .unwrap_or_else(|e| panic!("{}: {e}", part.name));
        assert!(
            decoder.into_inner().is_empty(),
            "{}: bytes after the first gzip member",
            part.name
        );
        text
    }

    fn joined(lines: &[String]) -> String {
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn gzip_file_is_one_stream_across_pages_and_rolls() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = NdjsonWriter::resume(dir.path(), "P.0000".into(), 1000, true, vec![]).unwrap();
        // Small pages, then one whose compressed form outgrows the compressor's output chunk, then
        // enough to roll the first file over.
        let lines: Vec<String> = [(0, 3), (3, 1), (4, 900), (904, 300)]
            .into_iter()
            .flat_map(|(first, n)| {
                let page_lines = noisy_lines(first, n, 512);
                let refs: Vec<&str> = page_lines.iter().map(String::as_str).collect();
                page(&mut w, &refs);
                page_lines
            })
            .collect();
        w.finish().unwrap();
        let parts = sync(&mut w);
        assert_eq!(parts.len(), 2);
        assert!(parts[0].bytes > 2 * DEFLATE_CHUNK as u64);
        let mut text = String::new();
        for part in &parts {
            let stream = part.stream.expect("a gzip stream");
            assert!(stream.finished, "{} is complete", part.name);
            let part_text = single_member(dir.path(), part);
            assert_eq!(part_text.len() as u64, stream.size);
            assert_eq!(part_text.lines().count() as u64, part.lines);
            text.push_str(&part_text);
        }
        assert_eq!(text, joined(&lines));
    }

    #[test]
    fn gzip_resumes_the_stream_after_a_crash_at_each_commit() {
        // Pages of 2 lines into files of 3: commit points fall inside files and right after a roll.
        let pages: Vec<Vec<String>> = (0..6).map(|p| noisy_lines(2 * p, 2, 64)).collect();
        let write = |w: &mut NdjsonWriter, pages: &[Vec<String>]| {
            for lines in pages {
                let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
                page(w, &refs);
            }
        };
        for committed_pages in 0..=pages.len() {
            let dir = tempfile::tempdir().unwrap();
            let mut w = NdjsonWriter::resume(dir.path(), "P.0000".into(), 3, true, vec![]).unwrap();
            write(&mut w, &pages[..committed_pages]);
            let committed = sync(&mut w);
            // Written and even completed after the commit, then "crashed".
            write(&mut w, &pages[committed_pages..]);
            write(&mut w, &[noisy_lines(100, 2, 64)]);
            w.finish().unwrap();
            sync(&mut w);
            drop(w);
            let mut w =
                NdjsonWriter::resume(dir.path(), "P.0000".into(), 3, true, committed).unwrap();
            write(&mut w, &pages[committed_pages..]);
            w.finish().unwrap();
            let parts = sync(&mut w);
            assert_eq!(parts.len(), 4, "after {committed_pages} committed pages");
            let text: String = parts
                .iter()
                .map(|part| single_member(dir.path(), part))
                .collect();
            assert_eq!(
                text,
                joined(&pages.concat()),
                "after {committed_pages} committed pages"
            );
        }
    }

    #[test]
    fn a_previous_release_file_of_gzip_members_is_not_continued() {
        let dir = tempfile::tempdir().unwrap();
        let mut raw = Vec::new();
        for line in ["{\"id\":\"1\"}\n", "{\"id\":\"2\"}\n"] {
            let mut member = flate2::write::GzEncoder::new(Vec::new(), Compression::fast());
            member.write_all(line.as_bytes()).unwrap();
            raw.extend(member.finish().unwrap());
        }
        std::fs::write(dir.path().join("P.0000.000.ndjson.gz"), &raw).unwrap();
        // A record as that release stored it: no stream state.
        let old: FilePart = serde_json::from_str(&format!(
            r#"{{"name":"P.0000.000.ndjson.gz","lines":2,"bytes":{},"gzip":true}}"#,
            raw.len()
        ))
        .unwrap();
        assert_eq!(old.stream, None);
        let mut w = NdjsonWriter::resume(dir.path(), "P.0000".into(), 100, true, vec![old.clone()])
            .unwrap();
        page(&mut w, &[r#"{"id":"3"}"#]);
        w.finish().unwrap();
        let parts = sync(&mut w);
        assert_eq!(parts[0], old);
        assert_eq!(std::fs::read(dir.path().join(&old.name)).unwrap(), raw);
        assert_eq!(parts[1].name, "P.0000.001.ndjson.gz");
        assert_eq!(single_member(dir.path(), &parts[1]), "{\"id\":\"3\"}\n");
    }
}
