//! Durable job state: job records, slice cursors and dedup sets, in sled; and cohort Groups with their
//! members.
//!
//! Everything that touches sled lives here, so the engine can be swapped without touching the export path.
//! Records are JSON so that a store can be inspected with ordinary tools.

use std::collections::HashSet;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::cohort::Cohort;
use crate::export::model::{Job, Planning, Slice};

/// sled's page cache. The store holds job records and cursors, rewritten every commit; sled's default
/// (1 GiB) lets the cache fill with superseded versions of them, so the proxy's memory would grow with
/// the length of an export. The working set is far smaller.
const CACHE_BYTES: u64 = 4 * 1024 * 1024;

/// Patients of a job per record. A key per patient made sled's tree hold one node entry per patient:
/// recording a Group of 10,000 took ~48 MB at its peak, most of the export's memory.
const PATIENTS_PER_RECORD: usize = 1024;

/// Errors of the job store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled could not open the store; the directory is left untouched.
    #[error("cannot open job store at {path}: {source} (the directory is left as it is; move it aside to start empty)")]
    Open { path: String, source: sled::Error },
    /// A read or write failed.
    #[error("job store error: {0}")]
    Sled(#[from] sled::Error),
    /// A record does not decode: the store is damaged or from an incompatible version.
    #[error("job store record {key} is unreadable: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

impl StoreError {
    /// The I/O failure underneath, if sled met one.
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            StoreError::Open {
                source: sled::Error::Io(e),
                ..
            }
            | StoreError::Sled(sled::Error::Io(e)) => Some(e),
            _ => None,
        }
    }
}

/// The sled-backed store.
pub struct Store {
    db: sled::Db,
    jobs: sled::Tree,
    slices: sled::Tree,
    seen: sled::Tree,
    planning: sled::Tree,
    /// Manifest pages served while a job ran (partial manifests), by job: they never change once served.
    manifests: sled::Tree,
    /// Cohort records by id.
    cohorts: sled::Tree,
    /// Cohort members, `{cohort}/{generation}/{patient}`: a computation's members are written with the
    /// record that makes them current, so a half-computed membership is never visible.
    cohort_members: sled::Tree,
    /// The patients of a Patient or Group export that pages some type whole, `{job}/{patient}`.
    job_patients: sled::Tree,
}

fn slice_key(job_id: &str, index: u32) -> String {
    format!("{job_id}/{index:08}")
}

fn seen_key(job_id: &str, index: u32, id: &str) -> String {
    format!("{job_id}/{index:08}/{id}")
}

fn member_prefix(cohort: &str, generation: u64) -> String {
    format!("{cohort}/{generation:08}/")
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

fn decode<T: for<'a> Deserialize<'a>>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    })
}

fn abort(e: TransactionError<()>) -> Option<StoreError> {
    match e {
        TransactionError::Abort(()) => None,
        TransactionError::Storage(e) => Some(e.into()),
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`; a damaged store is an error, never silently emptied.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let open = || -> Result<Self, sled::Error> {
            let db = sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .cache_capacity(CACHE_BYTES)
                .open()?;
            Ok(Self {
                jobs: db.open_tree("jobs")?,
                slices: db.open_tree("slices")?,
                seen: db.open_tree("seen")?,
                planning: db.open_tree("planning")?,
                manifests: db.open_tree("manifests")?,
                cohorts: db.open_tree("cohorts")?,
                cohort_members: db.open_tree("cohort_members")?,
                job_patients: db.open_tree("job_patients")?,
                db,
            })
        };
        let store = open().map_err(|source| StoreError::Open {
            path: dir.display().to_string(),
            source,
        })?;
        // Decode every job now: a damaged record must stop start-up, not surface mid-export.
        store.jobs()?;
        Ok(store)
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    /// Inserts or replaces a job record.
    pub fn put_job(&self, job: &Job) -> Result<(), StoreError> {
        self.jobs.insert(job.id.as_bytes(), encode(job))?;
        Ok(())
    }

    /// Reads one job.
    pub fn job(&self, id: &str) -> Result<Option<Job>, StoreError> {
        match self.jobs.get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Every job.
    pub fn jobs(&self) -> Result<Vec<Job>, StoreError> {
        self.jobs
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Replaces an existing job record; false (and nothing written) if the job was deleted meanwhile.
    pub fn replace_job(&self, job: &Job) -> Result<bool, StoreError> {
        self.commit_plan(job, &[])
    }

    /// Stores the last slices of a job's plan and its new state in one atomic step, ending its
    /// planning, unless the job was deleted meanwhile.
    pub fn commit_plan(&self, job: &Job, slices: &[Slice]) -> Result<bool, StoreError> {
        let trees = (&self.jobs, &self.slices, &self.planning);
        let result = trees.transaction(|(jobs, tx_slices, planning)| {
            if jobs.get(job.id.as_bytes())?.is_none() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            for s in slices {
                tx_slices.insert(slice_key(&s.job_id, s.index).as_bytes(), encode(s))?;
            }
            planning.remove(job.id.as_bytes())?;
            jobs.insert(job.id.as_bytes(), encode(job))?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(true),
            Err(e) => abort(e).map_or(Ok(false), Err),
        }
    }

    /// How far planning of a job got (nothing planned yet if there is no record).
    pub fn planning(&self, job_id: &str) -> Result<Planning, StoreError> {
        match self.planning.get(job_id.as_bytes())? {
            Some(v) => decode(job_id.as_bytes(), &v),
            None => Ok(Planning::default()),
        }
    }

    /// Stores planning progress with the slices planned since the last call in one atomic step,
    /// so that what is stored always matches `planning`; false if the job was deleted meanwhile.
    pub fn commit_planning(
        &self,
        job_id: &str,
        progress: &Planning,
        slices: &[Slice],
    ) -> Result<bool, StoreError> {
        let trees = (&self.jobs, &self.slices, &self.planning);
        let result = trees.transaction(|(jobs, tx_slices, planning)| {
            if jobs.get(job_id.as_bytes())?.is_none() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            for s in slices {
                tx_slices.insert(slice_key(&s.job_id, s.index).as_bytes(), encode(s))?;
            }
            planning.insert(job_id.as_bytes(), encode(progress))?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(true),
            Err(e) => abort(e).map_or(Ok(false), Err),
        }
    }

    /// The slices of a job, in index order.
    pub fn slices(&self, job_id: &str) -> Result<Vec<Slice>, StoreError> {
        self.slices
            .scan_prefix(format!("{job_id}/").as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Commits a slice cursor and the ids it newly wrote (for deduplicated slices), unless the job is gone.
    ///
    /// Returns false when the job was deleted meanwhile, so a cancelled job never gets records back.
    pub fn commit_slice(&self, slice: &Slice, new_ids: &[String]) -> Result<bool, StoreError> {
        let result = (&self.jobs, &self.slices, &self.seen).transaction(|(jobs, slices, seen)| {
            if jobs.get(slice.job_id.as_bytes())?.is_none() {
                return Err(ConflictableTransactionError::Abort(()));
            }
            for id in new_ids {
                seen.insert(seen_key(&slice.job_id, slice.index, id).as_bytes(), &[])?;
            }
            slices.insert(
                slice_key(&slice.job_id, slice.index).as_bytes(),
                encode(slice),
            )?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(true),
            Err(e) => abort(e).map_or(Ok(false), Err),
        }
    }

    /// Whether a deduplicated slice has already written resource `id`.
    pub fn seen(&self, slice: &Slice, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .seen
            .contains_key(seen_key(&slice.job_id, slice.index, id).as_bytes())?)
    }

    /// Removes a job with its slices and dedup sets.
    pub fn delete_job(&self, id: &str) -> Result<(), StoreError> {
        self.jobs.remove(id.as_bytes())?;
        self.manifests.remove(id.as_bytes())?;
        self.delete_slices(id)
    }

    /// Records the patients of job `job_id`, for its slices that page a type whole to keep theirs.
    pub fn put_job_patients(&self, job_id: &str, patients: &[String]) -> Result<(), StoreError> {
        let prefix = format!("{job_id}/");
        let mut batch = sled::Batch::default();
        for key in self.job_patients.scan_prefix(prefix.as_bytes()).keys() {
            batch.remove(key?);
        }
        for (n, chunk) in patients.chunks(PATIENTS_PER_RECORD).enumerate() {
            batch.insert(
                format!("{prefix}{n:08}").as_bytes(),
                chunk.join("\n").as_bytes(),
            );
        }
        self.job_patients.apply_batch(batch)?;
        Ok(())
    }

    /// The patients [`Store::put_job_patients`] recorded for job `job_id`.
    pub fn job_patients(&self, job_id: &str) -> Result<HashSet<String>, StoreError> {
        let prefix = format!("{job_id}/");
        let mut patients = HashSet::new();
        for record in self.job_patients.scan_prefix(prefix.as_bytes()) {
            let (key, chunk) = record?;
            // A job recorded by an earlier version has a key per patient and no value.
            let ids = match chunk.is_empty() {
                true => key.subslice(prefix.len(), key.len() - prefix.len()),
                false => chunk,
            };
            let ids = String::from_utf8_lossy(&ids);
            patients.extend(
                ids.split('\n')
                    .filter(|id| !id.is_empty())
                    .map(str::to_owned),
            );
        }
        Ok(patients)
    }

    /// The manifest pages a job has served, each the names of the files it lists, in order.
    pub fn manifest_pages(&self, job_id: &str) -> Result<Vec<Vec<String>>, StoreError> {
        match self.manifests.get(job_id.as_bytes())? {
            Some(v) => decode(job_id.as_bytes(), &v),
            None => Ok(Vec::new()),
        }
    }

    /// Records a job's manifest pages, durably: callers only ever add pages, so what was served stays.
    pub async fn put_manifest_pages(
        &self,
        job_id: &str,
        pages: &[Vec<String>],
    ) -> Result<(), StoreError> {
        self.manifests.insert(job_id.as_bytes(), encode(&pages))?;
        self.flush().await
    }

    /// Removes a job's slices, planning progress and dedup sets, keeping the job record (a failed
    /// job's outcome).
    pub fn delete_slices(&self, id: &str) -> Result<(), StoreError> {
        self.planning.remove(id.as_bytes())?;
        let prefix = format!("{id}/");
        for tree in [&self.slices, &self.seen, &self.job_patients] {
            let mut batch = sled::Batch::default();
            for key in tree.scan_prefix(prefix.as_bytes()).keys() {
                batch.remove(key?);
            }
            tree.apply_batch(batch)?;
        }
        Ok(())
    }
}

impl Store {
    /// Inserts or replaces a cohort record.
    pub fn put_cohort(&self, cohort: &Cohort) -> Result<(), StoreError> {
        self.cohorts.insert(cohort.id.as_bytes(), encode(cohort))?;
        Ok(())
    }

    /// Reads one cohort.
    pub fn cohort(&self, id: &str) -> Result<Option<Cohort>, StoreError> {
        match self.cohorts.get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(id.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Every cohort.
    pub fn cohorts(&self) -> Result<Vec<Cohort>, StoreError> {
        self.cohorts
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                decode(&k, &v)
            })
            .collect()
    }

    /// Replaces a cohort record with `cohort`, and adds `members` (each with the time it joined the
    /// cohort) under its generation, in one atomic step, unless the cohort was deleted or has started
    /// another computation meanwhile (false).
    pub fn commit_cohort(
        &self,
        cohort: &Cohort,
        members: &[(String, String)],
    ) -> Result<bool, StoreError> {
        let prefix = member_prefix(&cohort.id, cohort.generation);
        let trees = (&self.cohorts, &self.cohort_members);
        let result = trees.transaction(|(cohorts, tx_members)| {
            let current = match cohorts.get(cohort.id.as_bytes())? {
                Some(v) => v,
                None => return Err(ConflictableTransactionError::Abort(())),
            };
            let current: Cohort = serde_json::from_slice(&current)
                .map_err(|_| ConflictableTransactionError::Abort(()))?;
            if current.generation != cohort.generation {
                return Err(ConflictableTransactionError::Abort(()));
            }
            for (member, joined) in members {
                tx_members.insert(format!("{prefix}{member}").as_bytes(), joined.as_bytes())?;
            }
            cohorts.insert(cohort.id.as_bytes(), encode(cohort))?;
            Ok(())
        });
        match result {
            Ok(()) => Ok(true),
            Err(e) => abort(e).map_or(Ok(false), Err),
        }
    }

    /// The members a cohort's computation `generation` stored, sorted.
    pub fn cohort_members(&self, id: &str, generation: u64) -> Result<Vec<String>, StoreError> {
        let prefix = member_prefix(id, generation);
        self.cohort_members
            .scan_prefix(prefix.as_bytes())
            .keys()
            .map(|k| {
                let k = k?;
                Ok(String::from_utf8_lossy(&k[prefix.len()..]).into_owned())
            })
            .collect()
    }

    /// The members of a cohort's computation `generation`, each with the time it joined, sorted.
    pub fn cohort_joined(
        &self,
        id: &str,
        generation: u64,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let prefix = member_prefix(id, generation);
        self.cohort_members
            .scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, v) = kv?;
                Ok((
                    String::from_utf8_lossy(&k[prefix.len()..]).into_owned(),
                    String::from_utf8_lossy(&v).into_owned(),
                ))
            })
            .collect()
    }

    /// Removes a cohort's members of every computation but `keep` (all of them with `None`).
    pub fn prune_cohort_members(&self, id: &str, keep: Option<u64>) -> Result<(), StoreError> {
        let kept = keep.map(|g| member_prefix(id, g));
        let mut batch = sled::Batch::default();
        for key in self
            .cohort_members
            .scan_prefix(format!("{id}/").as_bytes())
            .keys()
        {
            let key = key?;
            if !kept.as_ref().is_some_and(|k| key.starts_with(k.as_bytes())) {
                batch.remove(key);
            }
        }
        self.cohort_members.apply_batch(batch)?;
        Ok(())
    }

    /// Removes a cohort and all its members.
    pub fn delete_cohort(&self, id: &str) -> Result<(), StoreError> {
        self.cohorts.remove(id.as_bytes())?;
        self.prune_cohort_members(id, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::model::tests::{job, slice};
    use crate::export::model::JobState;

    /// sled's flusher thread may hold the directory lock briefly after a `Db` is dropped.
    fn reopen(dir: &Path) -> Result<Store, StoreError> {
        for _ in 0..50 {
            match Store::open(dir) {
                Err(StoreError::Open { .. }) => {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                other => return other,
            }
        }
        Store::open(dir)
    }

    #[test]
    fn job_patients_round_trip_in_records_of_many() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let many: Vec<String> = (0..2_500).map(|n| format!("p{n}")).collect();
        store.put_job_patients("a", &many).unwrap();
        store.put_job_patients("b", &["q".to_owned()]).unwrap();
        assert_eq!(
            store.job_patients("a").unwrap(),
            many.iter().cloned().collect()
        );
        assert_eq!(store.job_patients.scan_prefix(b"a/").count(), 3);

        store.put_job_patients("a", &many[..10]).unwrap();
        assert_eq!(
            store.job_patients("a").unwrap(),
            many[..10].iter().cloned().collect()
        );
        assert_eq!(
            store.job_patients("b").unwrap(),
            HashSet::from(["q".to_owned()])
        );

        // An earlier version's records: a key per patient, no value.
        store.job_patients.insert(b"c/old-1", &[]).unwrap();
        store.job_patients.insert(b"c/old-2", &[]).unwrap();
        let old = HashSet::from(["old-1".to_owned(), "old-2".to_owned()]);
        assert_eq!(store.job_patients("c").unwrap(), old);

        store.delete_slices("a").unwrap();
        assert!(store.job_patients("a").unwrap().is_empty());
        assert_eq!(store.job_patients("b").unwrap().len(), 1);
    }

    #[tokio::test]
    async fn survives_reopen_and_deletes_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let mut j = job("a");
            assert!(
                !store.commit_plan(&j, &[slice("a", 0)]).unwrap(),
                "plan of a deleted job"
            );
            store.put_job(&j).unwrap();
            j.state = JobState::Running;
            assert!(store
                .commit_plan(&j, &[slice("a", 0), slice("a", 1)])
                .unwrap());
            store.put_job(&job("b")).unwrap();
            let mut s = slice("a", 1);
            s.pages = 3;
            assert!(store.commit_slice(&s, &["x".into()]).unwrap());
            store.flush().await.unwrap();
        }
        let store = reopen(dir.path()).unwrap();
        assert_eq!(store.jobs().unwrap().len(), 2);
        let slices = store.slices("a").unwrap();
        assert_eq!(slices.len(), 2);
        assert_eq!(slices[1].pages, 3);
        assert!(store.seen(&slices[1], "x").unwrap());
        assert!(store.slices("b").unwrap().is_empty());
        store.delete_job("a").unwrap();
        assert!(store.job("a").unwrap().is_none());
        assert!(store.slices("a").unwrap().is_empty());
        assert!(!store.seen(&slices[1], "x").unwrap());
        // A worker finishing a page after cancellation must not resurrect the slice.
        assert!(!store.commit_slice(&slices[1], &[]).unwrap());
        assert!(store.slices("a").unwrap().is_empty());
    }

    #[test]
    fn planning_progress_goes_with_the_plan() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let progress = Planning {
            slices: 1,
            done: vec!["Patient".into()],
            split: None,
        };
        assert!(!store
            .commit_planning("a", &progress, &[slice("a", 0)])
            .unwrap());
        let mut j = job("a");
        store.put_job(&j).unwrap();
        assert!(store
            .commit_planning("a", &progress, &[slice("a", 0)])
            .unwrap());
        assert_eq!(store.planning("a").unwrap(), progress);
        assert_eq!(store.slices("a").unwrap().len(), 1);
        j.state = JobState::Running;
        assert!(store.commit_plan(&j, &[slice("a", 1)]).unwrap());
        assert_eq!(store.planning("a").unwrap(), Planning::default());
        assert_eq!(store.slices("a").unwrap().len(), 2);
        assert!(store.commit_planning("a", &progress, &[]).unwrap());
        store.delete_job("a").unwrap();
        assert_eq!(store.planning("a").unwrap(), Planning::default());
    }

    fn cohort(generation: u64) -> Cohort {
        Cohort {
            id: "cohort-1".into(),
            owner: None,
            definition: serde_json::json!({"resourceType": "Group"}),
            filters: Vec::new(),
            generation,
            state: crate::cohort::State::Computing,
            ready: None,
            last_updated: "2026-01-01T00:00:00Z".into(),
        }
    }

    /// Members go in only with the computation that is current, and leave with their cohort.
    #[test]
    fn cohort_members_are_committed_only_for_the_current_computation() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let joined = |p: &str| (p.to_owned(), "2026-01-01T00:00:00Z".to_owned());
        let members = [joined("p1"), joined("p2")];
        assert!(
            !store.commit_cohort(&cohort(1), &members).unwrap(),
            "no record"
        );
        store.put_cohort(&cohort(2)).unwrap();
        assert!(!store.commit_cohort(&cohort(1), &members).unwrap(), "stale");
        assert!(store.cohort_members("cohort-1", 1).unwrap().is_empty());
        let mut done = cohort(2);
        done.state = crate::cohort::State::Ready;
        assert!(store.commit_cohort(&done, &members).unwrap());
        assert_eq!(store.cohort("cohort-1").unwrap(), Some(done));
        assert_eq!(store.cohort_members("cohort-1", 2).unwrap(), ["p1", "p2"]);
        assert_eq!(store.cohort_joined("cohort-1", 2).unwrap(), members);
        store.prune_cohort_members("cohort-1", Some(3)).unwrap();
        assert!(store.cohort_members("cohort-1", 2).unwrap().is_empty());
        store.commit_cohort(&cohort(2), &members).unwrap();
        store.delete_cohort("cohort-1").unwrap();
        assert_eq!(store.cohort("cohort-1").unwrap(), None);
        assert!(store.cohort_members("cohort-1", 2).unwrap().is_empty());
    }

    #[test]
    fn damaged_record_is_reported_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.jobs.insert(b"bad", b"{not json".to_vec()).unwrap();
            store.db.flush().unwrap();
        }
        match reopen(dir.path()) {
            Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "bad"),
            other => panic!("expected Corrupt, got {:?}", other.err()),
        }
    }
}
