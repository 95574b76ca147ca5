//! A slice's files while it runs: the page being written in the background, the pages written since the
//! last commit, and the checkpoint whose fsync is under way.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Instant;

use tokio::task::JoinHandle;

use crate::export::model::Slice;
use crate::export::worker::WorkerError;
use crate::export::writer::NdjsonWriter;

/// Pages written since the last commit.
pub(crate) struct Batch {
    /// Ids written (deduplicated slices), not yet in the store.
    pub(crate) ids: HashSet<String>,
    /// Bytes written.
    pub(crate) bytes: u64,
    /// When the first of them was written.
    pub(crate) started: Instant,
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            ids: HashSet::new(),
            bytes: 0,
            started: Instant::now(),
        }
    }
}

/// A page written: the writer and the page's buffer, handed back.
type Written = (NdjsonWriter, Vec<u8>);

/// A slice's files: at most one page is being written (on a blocking thread) while the slice fetches the
/// next, so that fetching and writing overlap even in a single slice; memory stays at two pages.
pub(crate) struct Output {
    /// The writer, while no page is being written.
    writer: Option<NdjsonWriter>,
    /// The page being written; it hands the writer and the page's buffer back.
    writing: Option<JoinHandle<std::io::Result<Written>>>,
    /// A written page's buffer, for the next page to fill: a slice allocates two, not one per page.
    pub(crate) spare: Mutex<Vec<u8>>,
}

impl Output {
    /// The slice's files, continued from `writer`.
    pub(crate) fn new(writer: NdjsonWriter) -> Self {
        Self {
            writer: Some(writer),
            writing: None,
            spare: Mutex::new(Vec::new()),
        }
    }

    /// Waits for the page being written, if any.
    pub(crate) async fn settle(&mut self) -> Result<&mut NdjsonWriter, WorkerError> {
        if let Some(writing) = self.writing.take() {
            let (writer, mut data) = writing.await.expect("writer task panicked")?;
            data.clear();
            *self.spare.lock().expect("spare buffer lock") = data;
            self.writer = Some(writer);
        }
        Ok(self
            .writer
            .as_mut()
            .expect("the writer is back once nothing is being written"))
    }

    /// Starts writing a page, once the previous one is written.
    pub(crate) async fn start(
        &mut self,
        data: Vec<u8>,
        ends: Vec<usize>,
    ) -> Result<(), WorkerError> {
        self.settle().await?;
        let mut writer = self.writer.take().expect("settled");
        self.writing = Some(tokio::task::spawn_blocking(move || {
            writer.write_page(&data, &ends)?;
            Ok((writer, data))
        }));
        Ok(())
    }
}

/// A checkpoint whose fsync runs on a blocking thread while the slice goes on fetching: the cursor, as
/// it stood when the sync began, is committed once the sync is done, so a slice never waits for the disk.
pub(crate) struct Pending {
    /// The cursor to commit once the sync is done.
    pub(crate) cursor: Slice,
    /// What the cursor covers beyond the previous one.
    pub(crate) batch: Batch,
    /// The fsync.
    pub(crate) synced: JoinHandle<std::io::Result<()>>,
}
