//! Turns a job into slices: the upstream searches that together return exactly the export.
//!
//! One file past 700 lines because the plan is one procedure over one `Planner`: the levels, the
//! patient batches, the counts first, whole-type paging and the time splits all read and extend the same
//! planning progress, which is stored as they go so that planning resumes after a restart. Its pure
//! parts live in modules of their own (`ranges`, `whole`, `window`, `compartment`); its tests drive
//! whole plans against a fake upstream and sit with the procedure they test.

use std::collections::{BTreeSet, HashMap};

use url::Url;

use crate::export::compartment::{self, Reach};
use crate::export::elements::elements_for;
use crate::export::layout::{Layout, Searches};
use crate::export::model::{ExportSpec, Job, Level, Planning, Slice, SliceKind, TypeSelection};
use crate::export::ranges::{self, parse_ms, Range, Split};
use crate::export::whole;
use crate::export::window::Window;
use crate::store::{Store, StoreError};
use crate::upstream::bundle::read_matches;
use crate::upstream::{Capability, ParseError, Upstream, UpstreamError};

/// Page size used to list patient ids: only ids travel, so pages can be large.
const ID_PAGE_SIZE: u32 = 1000;

/// Most counts asked for in one `batch` request.
const READS_PER_BATCH: usize = 100;

/// Why a job could not be planned.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The upstream failed while the plan needed it.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The Group to export does not exist (any more).
    #[error("Group/{0} was not found on the upstream")]
    GroupNotFound(String),
    /// Planning progress could not be stored.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The job was deleted while it was being planned.
    #[error("the job was deleted while it was planned")]
    JobGone,
}

/// Search settings the planner needs from config.
#[derive(Debug, Clone, Copy)]
pub struct PlanLimits {
    /// `_count` of every search.
    pub page_size: u32,
    /// Patients per `patient=` search, at most.
    pub patient_batch_size: usize,
    /// Longest search URL a patient batch may make.
    pub max_search_url_bytes: usize,
    /// Whether a job of several patient batches, or a system-level job on an upstream that takes
    /// `batch` requests, leaves out the types the upstream holds none of.
    pub skip_empty_types: bool,
    /// Share of the upstream's patients from which such a job pages a type whole where that takes fewer
    /// requests ([`crate::export::whole`]); 0: never.
    pub whole_type_share: f64,
    /// `_lastUpdated` ranges each type is split into at system level (1: no split).
    pub time_slices: usize,
    /// Slices a job runs at once: what a type paged whole is split to keep up with.
    pub slice_concurrency: usize,
}

/// The end of a job's plan: the slices not yet stored, and what the manifest should tell the client.
#[derive(Debug)]
pub struct Plan {
    /// Searches to run besides those already stored with the planning progress.
    pub slices: Vec<Slice>,
    /// Notes for the manifest's OperationOutcome (e.g. deletions that cannot be reported).
    pub notes: Vec<String>,
}

/// Plans `job`: lists the searches of every type, per patient batch below the system level, and with
/// `_since` the type histories that reveal deletions.
///
/// At system level each type's slices, and each probe of a type's `_lastUpdated` split, are stored in
/// `store` with the planning progress as they are found, so a job planned again after a restart picks up
/// where it stopped: it skips the types already planned and resumes the split under way. The slices
/// left in the returned plan are the rest, to be stored with the job's new state.
pub async fn plan(
    job: &Job,
    upstream: &Upstream,
    capability: &Capability,
    limits: PlanLimits,
    store: &Store,
) -> Result<Plan, PlanError> {
    let spec = &job.spec;
    let mut planning = Planner {
        job,
        capability,
        limits,
        store,
        types: export_types(spec, capability),
        bounds: Bounds {
            upstream,
            job,
            window: Window::of(job),
            page_size: limits.page_size,
        },
        progress: store.planning(&job.id)?,
        plan: Plan {
            slices: Vec::new(),
            notes: Vec::new(),
        },
    };
    match &spec.level {
        Level::System => {
            planning.system().await?;
            if let Some(since) = &spec.since {
                planning.deletions(since);
            }
        }
        Level::Patient | Level::Group { .. } => {
            let patients = patients(job, upstream, store).await?;
            let newcomers = cohort_newcomers(job, store)?;
            let (later, earlier): (Vec<String>, Vec<String>) =
                patients.into_iter().partition(|p| newcomers.contains(p));
            let batches = planning.batches(&earlier);
            // A type empty since `_since` may still hold a newcomer's older resources.
            if batches.len() > 1 && limits.skip_empty_types && later.is_empty() {
                let totals = planning.skip_empty_types().await?;
                planning.page_whole(&earlier, &batches, &totals).await?;
            }
            for batch in batches {
                planning.patient_batch(batch);
            }
            if !later.is_empty() {
                planning.bounds.window =
                    Window::new(None, spec.until.as_deref(), &job.transaction_time);
                for batch in planning.batches(&later) {
                    planning.patient_batch(batch);
                }
                planning.plan.notes.push(format!(
                    "{} patient(s) joined the cohort after _since: all their resources are exported, not only those changed since",
                    later.len()
                ));
            }
            if spec.since.is_some() {
                // A deleted resource's history entry no longer says whose compartment it was in.
                planning.plan.notes.push(
                    "deleted resources are not reported for Patient and Group exports: a deletion no longer shows which patient it belonged to"
                        .into(),
                );
            }
        }
    }
    Ok(planning.plan)
}

/// A plan being made: the job, what it searches, and the planning progress stored so far.
struct Planner<'a> {
    job: &'a Job,
    capability: &'a Capability,
    limits: PlanLimits,
    store: &'a Store,
    /// The types the job searches.
    types: Vec<String>,
    bounds: Bounds<'a>,
    progress: Planning,
    /// The slices not yet stored, and the notes.
    plan: Plan,
}

impl Planner<'_> {
    /// Each type's slices at system level, one per `_lastUpdated` range, stored type by type. Where
    /// the upstream counts all types in one batch request, the types it holds none of are left out,
    /// and the largest go first: the longest chains of pages then do not trail the export alone.
    /// Those counts leave out the job's window: a type with no resources has none in any window, and
    /// a server that does not index `_lastUpdated` counts a whole type much faster than a range of it.
    async fn system(&mut self) -> Result<(), PlanError> {
        let mut types = self.types.clone();
        // One type's count costs what its first page does, and tells less.
        if self.limits.skip_empty_types && self.capability.batch && types.len() > 1 {
            // Only what the batch answered: a type it left out is searched, which says as much.
            let counted = self.batch_counts(false).await;
            let totals: HashMap<String, u64> = (self.types.iter().cloned())
                .zip(counted)
                .filter_map(|(t, total)| Some((t, total.flatten()?)))
                .collect();
            types.retain(|t| totals.get(t) != Some(&0));
            largest_first(&mut types, &totals);
        }
        for t in &types {
            if self.progress.done.contains(t) {
                continue;
            }
            let ranges = self
                .bounds
                .time_ranges(t, self.limits.time_slices, &mut self.progress, self.store)
                .await?;
            let planned: Vec<Slice> = ranges
                .into_iter()
                .map(|range| self.bounds.searches(t, &[], range))
                .map(|searches| {
                    new_slice(
                        self.job,
                        &mut self.progress,
                        t,
                        SliceKind::Resources,
                        searches,
                    )
                })
                .collect();
            self.progress.done.push(t.clone());
            self.progress.split = None;
            checkpoint(self.store, self.job, &self.progress, &planned)?;
        }
        Ok(())
    }

    /// The type histories since `since` whose DELETE entries become the manifest's `deleted` files.
    fn deletions(&mut self, since: &str) {
        let (with, without): (Vec<&String>, Vec<&String>) = self
            .types
            .iter()
            .partition(|t| self.capability.history.contains(*t));
        for t in with {
            let searches = vec![self.bounds.history(t, since)];
            let slice = new_slice(
                self.job,
                &mut self.progress,
                t,
                SliceKind::Deleted,
                searches,
            );
            self.plan.slices.push(slice);
        }
        if !without.is_empty() {
            let list: Vec<&str> = without.iter().map(|t| t.as_str()).collect();
            self.plan.notes.push(format!(
                "deleted resources are not reported for {}: the upstream offers no type history for them",
                list.join(", ")
            ));
        }
    }

    /// The patients in batches of at most `patient_batch_size`, each as large as the longest search
    /// URL allows: fewer searches, each returning more per page.
    fn batches<'p>(&self, patients: &'p [String]) -> Vec<&'p [String]> {
        // The longest of the job's searches with an empty patient list, plus what each patient adds.
        let fixed = (self.types.iter())
            .flat_map(|t| self.bounds.searches(t, &[self.by_patient(t, &[])], None))
            .map(|u| u.len())
            .max()
            .unwrap_or(0);
        let budget = self.limits.max_search_url_bytes.saturating_sub(fixed);
        let mut batches = Vec::new();
        let (mut start, mut used) = (0, 0);
        for (i, id) in patients.iter().enumerate() {
            // `Patient/{id}` and a comma, percent-encoded: `Patient%2F{id}%2C`.
            let cost = id.len() + 13;
            let full = i - start == self.limits.patient_batch_size;
            if i > start && (full || used + cost > budget) {
                batches.push(&patients[start..i]);
                (start, used) = (i, 0);
            }
            used += cost;
        }
        if start < patients.len() {
            batches.push(&patients[start..]);
        }
        batches
    }

    /// Leaves out the types of which the upstream holds nothing in the job's window, the largest
    /// first: one count per type ([`Planner::totals`]) instead of one search per type and batch. A
    /// type whose count the upstream does not give stays.
    /// Returns the counts found, by type.
    async fn skip_empty_types(&mut self) -> Result<HashMap<String, u64>, PlanError> {
        let totals = self.totals().await?;
        self.types.retain(|t| totals.get(t) != Some(&0));
        largest_first(&mut self.types, &totals);
        Ok(totals)
    }

    /// `Bundle.total` of each of the job's types in its window, where the upstream gives it: from one
    /// `batch` request where the upstream takes them ([`Planner::batch_counts`]), else (and for any the
    /// batch left unanswered) one `_count=0` search each.
    async fn totals(&self) -> Result<HashMap<String, u64>, PlanError> {
        let answered = self.batch_counts(true).await;
        let counted = self
            .types
            .iter()
            .zip(answered)
            .map(|(t, answer)| async move {
                match answer {
                    Some(total) => Ok(total),
                    None => self.bounds.total(t).await,
                }
            });
        // All at once: the upstream limiter, not this loop, decides how many go out together.
        let counted = futures_util::future::join_all(counted).await;
        let mut totals = HashMap::new();
        for (t, total) in self.types.iter().zip(counted) {
            if let Some(total) = total? {
                totals.insert(t.clone(), total);
            }
        }
        Ok(totals)
    }

    /// Each type's `Bundle.total` (in the job's window if `windowed`) as batch requests of counts
    /// answer them, in the order of the job's types: `None` for a type no batch answered (all of
    /// them where the upstream takes no batch), `Some(None)` where the upstream gives no total.
    async fn batch_counts(&self, windowed: bool) -> Vec<Option<Option<u64>>> {
        let mut answers: Vec<Option<Vec<u8>>> = vec![None; self.types.len()];
        if self.capability.batch {
            let urls: Vec<String> = (self.types.iter())
                .map(|t| self.bounds.count_url(t, windowed, None).into())
                .collect();
            for (i, chunk) in urls.chunks(READS_PER_BATCH).enumerate() {
                match self.bounds.upstream.read_batch(chunk).await {
                    Ok(got) => answers[i * READS_PER_BATCH..][..got.len()].clone_from_slice(&got),
                    Err(e) => {
                        tracing::warn!(job = %self.job.id, error = %e, "batch of counts failed")
                    }
                }
            }
        }
        let total = |body: Vec<u8>| read_matches(&body, |_| Ok(())).ok().map(|s| s.total);
        answers.into_iter().map(|a| a.and_then(total)).collect()
    }

    /// Pages whole, keeping the job's patients' resources, each type for which that takes fewer
    /// requests than searching it per batch, when the job's `patients` are at least `whole_type_share`
    /// of the upstream's (by the `totals` the probe found). One file series per type only: a patient
    /// block layout needs its resources by batch. A type much larger than the others is split into
    /// `_lastUpdated` ranges ([`whole::ranges_wanted`]) so that the slices run side by side.
    async fn page_whole(
        &mut self,
        patients: &[String],
        batches: &[&[String]],
        totals: &HashMap<String, u64>,
    ) -> Result<(), PlanError> {
        let share = self.limits.whole_type_share;
        let Some(&upstream_patients) = totals.get("Patient") else {
            return Ok(());
        };
        if share <= 0.0
            || self.job.spec.layout != Layout::ByType
            || (patients.len() as f64) < share * upstream_patients as f64
        {
            return Ok(());
        }
        let sizes: Vec<usize> = batches.iter().map(|b| b.len()).collect();
        let mut by_patient = Vec::with_capacity(self.types.len());
        let mut paged = Vec::new();
        for t in std::mem::take(&mut self.types) {
            let element = self
                .by_patient_param(&t)
                .and_then(|param| whole::member_element(&t, param));
            let total = totals.get(&t).copied().filter(|&total| {
                whole::fewer_requests(total, &sizes, upstream_patients, self.limits.page_size)
            });
            match element.zip(total) {
                Some((element, total)) => paged.push((t, element, total)),
                None => by_patient.push(t),
            }
        }
        self.types = by_patient;
        if paged.is_empty() {
            return Ok(());
        }
        self.store.put_job_patients(&self.job.id, patients)?;
        let page = u64::from(self.limits.page_size.max(1));
        let pages: Vec<u64> = paged.iter().map(|(_, _, n)| n.div_ceil(page)).collect();
        let wanted = whole::ranges_wanted(&pages, self.limits.slice_concurrency);
        for ((t, element, _), n) in paged.into_iter().zip(wanted) {
            for range in self.bounds.ranges(&t, n, None, |_| Ok(())).await? {
                let searches = self.bounds.searches(&t, &[], range);
                let mut slice = new_slice(
                    self.job,
                    &mut self.progress,
                    &t,
                    SliceKind::Resources,
                    searches,
                );
                slice.members_by = Some(element.to_owned());
                self.plan.slices.push(slice);
            }
        }
        Ok(())
    }

    /// The parameter a type is searched by patient with.
    fn by_patient_param(&self, resource_type: &str) -> Option<&str> {
        if resource_type == "Patient" {
            return Some("_id");
        }
        compartment::patient_param(resource_type, self.capability.types.get(resource_type)?)
    }

    /// The search parameter and value that restrict a search of `resource_type` to `batch`.
    fn by_patient(&self, resource_type: &str, batch: &[String]) -> (String, String) {
        let param = self
            .by_patient_param(resource_type)
            .expect("export_types keeps compartment types only");
        if resource_type == "Patient" {
            return (param.to_owned(), batch.join(","));
        }
        let refs: Vec<String> = batch.iter().map(|id| format!("Patient/{id}")).collect();
        (param.to_owned(), refs.join(","))
    }

    /// One batch of patients: every type searched by patient, grouped into slices by the layout.
    fn patient_batch(&mut self, batch: &[String]) {
        let mut per_type = Vec::new();
        for t in &self.types {
            per_type.push(Searches {
                resource_type: t.clone(),
                searches: self.bounds.searches(t, &[self.by_patient(t, batch)], None),
                patients: Vec::new(),
            });
        }
        for group in self.job.spec.layout.group(per_type, batch) {
            let mut slice = new_slice(
                self.job,
                &mut self.progress,
                &group.resource_type,
                SliceKind::Resources,
                group.searches,
            );
            slice.patients = group.patients;
            self.plan.slices.push(slice);
        }
    }
}

/// Orders `types` by their `totals`, largest first; a type of unknown size goes before all (it may be
/// the largest), and equal ones keep their order.
fn largest_first(types: &mut [String], totals: &HashMap<String, u64>) {
    types.sort_by_key(|t| std::cmp::Reverse(totals.get(t).copied().unwrap_or(u64::MAX)));
}

/// The next slice of a job's plan, numbered after those planned so far.
fn new_slice(
    job: &Job,
    progress: &mut Planning,
    resource_type: &str,
    kind: SliceKind,
    searches: Vec<String>,
) -> Slice {
    let index = progress.slices;
    progress.slices += 1;
    Slice::pending(&job.id, index, resource_type, kind, searches)
}

/// Stores planning progress with the slices it added.
fn checkpoint(
    store: &Store,
    job: &Job,
    progress: &Planning,
    planned: &[Slice],
) -> Result<(), PlanError> {
    if store.commit_planning(&job.id, progress, planned)? {
        Ok(())
    } else {
        Err(PlanError::JobGone)
    }
}

/// The types a job searches, in a stable order: those of its selection that its level searches (the
/// types reached by reference are planned after the data, by [`crate::export::references`]).
fn export_types(spec: &ExportSpec, capability: &Capability) -> Vec<String> {
    let reach = compartment::level_types(&spec.level, capability);
    let searched = |t: &str| reach.get(t).is_some_and(|r| *r != Reach::ByReference);
    match &spec.types {
        TypeSelection::All => reach.keys().filter(|t| searched(t)).cloned().collect(),
        TypeSelection::Only(types) => types.iter().filter(|t| searched(t)).cloned().collect(),
    }
}

struct Bounds<'a> {
    upstream: &'a Upstream,
    job: &'a Job,
    /// The job's `_lastUpdated` window, which every search of it renders.
    window: Window,
    page_size: u32,
}

impl Bounds<'_> {
    /// The `_lastUpdated` ranges of a type's search: `[None]` (one plain search) unless splitting is
    /// configured and the type has resources to split. The split is resumed from `progress` if it
    /// was under way, and stored there after every probe.
    async fn time_ranges(
        &self,
        resource_type: &str,
        n: usize,
        progress: &mut Planning,
        store: &Store,
    ) -> Result<Vec<Option<Range>>, PlanError> {
        let resumed = match progress.split.take() {
            Some((t, split)) if t == resource_type => Some(split),
            _ => None,
        };
        self.ranges(resource_type, n, resumed, |split| {
            progress.split = Some((resource_type.to_owned(), split.clone()));
            checkpoint(store, self.job, progress, &[])
        })
        .await
    }

    /// The `_lastUpdated` ranges of `n` (at most) that split a type's search, `[None]` when it is not
    /// worth splitting: continues `resumed`, or starts a split, and hands the split to `probed` after
    /// every probe.
    async fn ranges(
        &self,
        resource_type: &str,
        n: usize,
        resumed: Option<Split>,
        mut probed: impl FnMut(&Split) -> Result<(), PlanError>,
    ) -> Result<Vec<Option<Range>>, PlanError> {
        if n <= 1 {
            return Ok(vec![None]);
        }
        let mut split = match resumed {
            Some(split) => split,
            None => match self.start_split(resource_type, n).await? {
                Some(split) => split,
                None => return Ok(vec![None]),
            },
        };
        while let Some(probe) = split.probe() {
            split.record(self.count(resource_type, probe).await?);
            probed(&split)?;
        }
        Ok(split.ranges().into_iter().map(Some).collect())
    }

    /// The split of a type's resources into `n` ranges, before any probe; `None` when the type is not
    /// worth splitting (or the upstream cannot say how many it has, or since when).
    async fn start_split(&self, resource_type: &str, n: usize) -> Result<Option<Split>, PlanError> {
        let Some(hi) = self.window.last_ms() else {
            return Ok(None);
        };
        let mut url = self.upstream.url(resource_type);
        url.query_pairs_mut()
            .append_pair("_sort", "_lastUpdated")
            .append_pair("_count", "1");
        self.window.apply(&mut url);
        let (total, oldest) = self
            .upstream
            .fetch(url.as_str(), |body| {
                // The first match's `lastUpdated`; a resource that serde_json cannot take as a Value
                // (a number out of its range) only means no split, as before.
                let mut first = None;
                let page = read_matches(body, |resource| {
                    first.get_or_insert_with(|| {
                        serde_json::from_slice::<serde_json::Value>(resource.json)
                            .ok()
                            .and_then(|r| r["meta"]["lastUpdated"].as_str().and_then(parse_ms))
                    });
                    Ok(())
                })?;
                Ok((page.total, first.flatten()))
            })
            .await?;
        let (Some(total), Some(oldest)) = (total, oldest) else {
            return Ok(None);
        };
        let n = ranges::worth_splitting(total, self.page_size, n);
        if n <= 1 {
            return Ok(None);
        }
        let lo = self.window.since().and_then(parse_ms).unwrap_or(oldest - 1);
        Ok(Some(Split::new(Range { lo, hi }, total, n)))
    }

    /// The search that counts a type's resources: all of them, in the job's window if `windowed`, or
    /// in `range` of it.
    fn count_url(&self, resource_type: &str, windowed: bool, range: Option<Range>) -> Url {
        let mut url = self.upstream.url(resource_type);
        url.query_pairs_mut().append_pair("_count", "0");
        match range {
            Some(range) => self.window.narrow(range).apply(&mut url),
            None if windowed => self.window.apply(&mut url),
            None => {}
        }
        url
    }

    /// `Bundle.total` of a type's resources in the job's window, if the upstream gives it.
    async fn total(&self, resource_type: &str) -> Result<Option<u64>, UpstreamError> {
        let url = self.count_url(resource_type, true, None);
        self.upstream
            .fetch(url.as_str(), |body| {
                Ok(read_matches(body, |_| Ok(()))?.total)
            })
            .await
    }

    /// `Bundle.total` of a type's resources in a range.
    async fn count(&self, resource_type: &str, range: Range) -> Result<u64, UpstreamError> {
        let url = self.count_url(resource_type, true, Some(range));
        self.upstream
            .fetch(url.as_str(), |body| {
                read_matches(body, |_| Ok(()))?
                    .total
                    .ok_or_else(|| "the upstream gives no Bundle.total".into())
            })
            .await
    }

    /// First page of a type's history since `since` (deletions are filtered from it by the worker).
    fn history(&self, resource_type: &str, since: &str) -> String {
        let mut url: Url = self.upstream.url(&format!("{resource_type}/_history"));
        url.query_pairs_mut()
            .append_pair("_since", since)
            .append_pair("_count", &self.page_size.to_string());
        url.to_string()
    }

    /// First-page URLs of a type: one per `_typeFilter` of the type (OR), or one plain search.
    fn searches(
        &self,
        resource_type: &str,
        extra: &[(String, String)],
        range: Option<Range>,
    ) -> Vec<String> {
        let spec = &self.job.spec;
        let filters: Vec<&str> = spec
            .type_filters
            .iter()
            .filter(|(t, _)| t == resource_type)
            .map(|(_, q)| q.as_str())
            .collect();
        let elements = elements_for(&spec.elements, resource_type);
        let build = |filter: Option<&str>| {
            let mut url: Url = self.upstream.url(resource_type);
            url.query_pairs_mut()
                .append_pair("_count", &self.page_size.to_string());
            match range {
                Some(range) => self.window.narrow(range).apply(&mut url),
                None => self.window.apply(&mut url),
            }
            {
                let mut q = url.query_pairs_mut();
                if !elements.is_empty() {
                    q.append_pair("_elements", &elements.join(","));
                }
                for (k, v) in extra {
                    q.append_pair(k, v);
                }
                if let Some(filter) = filter {
                    q.extend_pairs(url::form_urlencoded::parse(filter.as_bytes()));
                }
            }
            url.to_string()
        };
        if filters.is_empty() {
            vec![build(None)]
        } else {
            filters.into_iter().map(|f| build(Some(f))).collect()
        }
    }
}

/// The patient ids of a Patient or Group export, sorted and unique.
async fn patients(job: &Job, upstream: &Upstream, store: &Store) -> Result<Vec<String>, PlanError> {
    let mut ids: BTreeSet<String> = match &job.spec.level {
        Level::Group { id } if crate::cohort::is_cohort_id(id) => cohort_members(id, store)?,
        Level::Group { id } => group_members(id, upstream).await?,
        _ if !job.spec.patients.is_empty() => return Ok(sorted(&job.spec.patients)),
        _ => all_patients(job, upstream).await?,
    };
    if !job.spec.patients.is_empty() {
        let wanted: BTreeSet<&String> = job.spec.patients.iter().collect();
        ids.retain(|id| wanted.contains(id));
    }
    Ok(ids.into_iter().collect())
}

fn sorted(ids: &[String]) -> Vec<String> {
    ids.iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The members of a cohort Group export's cohort who joined it after the job's `_since` (none without
/// `_since`, or for an upstream Group): Bulk Data 3.0.0 lets them have their older resources too.
fn cohort_newcomers(job: &Job, store: &Store) -> Result<BTreeSet<String>, PlanError> {
    let (Level::Group { id }, Some(since)) = (&job.spec.level, &job.spec.since) else {
        return Ok(BTreeSet::new());
    };
    let Some(since) = parse_ms(since) else {
        return Ok(BTreeSet::new());
    };
    if !crate::cohort::is_cohort_id(id) {
        return Ok(BTreeSet::new());
    }
    let Some(ready) = store.cohort(id)?.and_then(|c| c.ready) else {
        return Ok(BTreeSet::new());
    };
    Ok(store
        .cohort_joined(id, ready.generation)?
        .into_iter()
        .filter(|(_, joined)| parse_ms(joined).is_some_and(|j| j > since))
        .map(|(member, _)| member)
        .collect())
}

/// The members of a cohort's last finished computation, from the proxy's own store.
fn cohort_members(id: &str, store: &Store) -> Result<BTreeSet<String>, PlanError> {
    let cohort = store
        .cohort(id)?
        .ok_or_else(|| PlanError::GroupNotFound(id.to_owned()))?;
    let ready = cohort
        .ready
        .ok_or_else(|| PlanError::GroupNotFound(id.to_owned()))?;
    Ok(store
        .cohort_members(id, ready.generation)?
        .into_iter()
        .collect())
}

/// The members of upstream Group `id`.
async fn group_members(id: &str, upstream: &Upstream) -> Result<BTreeSet<String>, PlanError> {
    let url = upstream.url(&format!("Group/{id}"));
    match upstream.fetch(url.as_str(), active_patients).await {
        Ok(members) => Ok(members),
        Err(e) if matches!(e.status().map(|s| s.as_u16()), Some(404 | 410)) => {
            Err(PlanError::GroupNotFound(id.to_owned()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Active `Patient` members of a Group resource (`member.entity`, skipping `inactive` ones).
fn active_patients(body: &[u8]) -> Result<BTreeSet<String>, ParseError> {
    let group: GroupMembers = serde_json::from_slice(body)?;
    Ok(group
        .member
        .iter()
        .filter(|m| m.inactive != Some(serde_json::Value::Bool(true)))
        .filter_map(|m| m.entity.as_ref()?.reference.as_ref()?.as_str())
        .filter_map(compartment::patient_id)
        .filter(|id| super::kickoff::is_fhir_id(id))
        .map(str::to_owned)
        .collect())
}

/// Just the elements of a Group its members are read from: a Group of 10,000 read as a whole JSON
/// value took several MB, the largest part of a Group export's memory. Elements stay JSON values so a
/// malformed member is skipped, as before, rather than failing the Group.
#[derive(serde::Deserialize)]
struct GroupMembers {
    #[serde(default)]
    member: Vec<GroupMember>,
}

#[derive(serde::Deserialize)]
struct GroupMember {
    entity: Option<MemberEntity>,
    inactive: Option<serde_json::Value>,
}

#[derive(serde::Deserialize)]
struct MemberEntity {
    reference: Option<serde_json::Value>,
}

/// Every patient that existed at the job's transaction time.
async fn all_patients(job: &Job, upstream: &Upstream) -> Result<BTreeSet<String>, PlanError> {
    let mut url = upstream.url("Patient");
    url.query_pairs_mut()
        .append_pair("_count", &ID_PAGE_SIZE.to_string());
    Window::snapshot(&job.transaction_time).apply(&mut url);
    url.query_pairs_mut().append_pair("_elements", "id");
    let mut next = Some(url.to_string());
    let mut ids = BTreeSet::new();
    while let Some(page_url) = next {
        let (page_ids, page_next) = upstream
            .fetch(&page_url, |body| {
                let mut ids = Vec::new();
                let page = read_matches(body, |resource| {
                    let id = resource.id.ok_or("a Patient without id")?;
                    ids.push(id.into_owned());
                    Ok(())
                })?;
                Ok((ids, page.next))
            })
            .await?;
        ids.extend(page_ids);
        if page_next.as_deref() == Some(page_url.as_str()) {
            return Err(UpstreamError::Invalid {
                url: page_url,
                detail: "next link points at the same page".into(),
            }
            .into());
        }
        next = page_next;
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ranges::format_ms;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TYPES: [&str; 3] = ["Condition", "Encounter", "Observation"];

    /// A type the fake upstream holds nothing of.
    const EMPTY_TYPE: &str = "Procedure";

    /// Resources of every type, one a second from 2025-01-01.
    fn times() -> Vec<i64> {
        let start = parse_ms("2025-01-01T00:00:00Z").unwrap();
        (0..200).map(|i| start + i * 1_000).collect()
    }

    /// A type the fake upstream answers with 404 inside a batch (and normally on its own).
    const REFUSED_IN_BATCH: &str = "Encounter";

    /// An upstream answering the planner's probes from [`times`], alone or in a `batch`, counting
    /// requests; request number `stall_at` (from 1) is never answered.
    struct Fake {
        base: String,
        requests: Arc<AtomicUsize>,
        stall_at: Arc<AtomicUsize>,
        stalled: Arc<tokio::sync::Notify>,
        /// The URLs of the reads of every batch received.
        batches: Arc<std::sync::Mutex<Vec<Vec<String>>>>,
    }

    /// The batch-response to a `batch` Bundle of reads, each answered as alone (but
    /// [`REFUSED_IN_BATCH`]); records the reads in `batches`.
    fn batch_answer(body: &[u8], batches: &std::sync::Mutex<Vec<Vec<String>>>) -> String {
        let bundle: serde_json::Value = serde_json::from_slice(body).unwrap();
        let urls: Vec<String> = (bundle["entry"].as_array().unwrap().iter())
            .map(|e| e["request"]["url"].as_str().unwrap().to_owned())
            .collect();
        let entries: Vec<String> = (urls.iter())
            .map(|u| match u.starts_with(REFUSED_IN_BATCH) {
                true => r#"{"response":{"status":"404 Not Found"}}"#.to_owned(),
                false => {
                    let url = Url::parse(&format!("http://x/fhir/{u}")).unwrap();
                    format!(
                        r#"{{"resource":{},"response":{{"status":"200 OK"}}}}"#,
                        answer(&url)
                    )
                }
            })
            .collect();
        batches.lock().unwrap().push(urls);
        format!(
            r#"{{"resourceType":"Bundle","type":"batch-response","entry":[{}]}}"#,
            entries.join(",")
        )
    }

    async fn fake_upstream() -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Fake {
            base: format!("http://{}/fhir", listener.local_addr().unwrap()),
            requests: Arc::default(),
            stall_at: Arc::new(AtomicUsize::new(usize::MAX)),
            stalled: Arc::default(),
            batches: Arc::default(),
        };
        let (requests, stall_at, stalled, batches) = (
            fake.requests.clone(),
            fake.stall_at.clone(),
            fake.stalled.clone(),
            fake.batches.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let (requests, stall_at, stalled, batches) = (
                    requests.clone(),
                    stall_at.clone(),
                    stalled.clone(),
                    batches.clone(),
                );
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        let mut byte = [0u8];
                        if stream.read(&mut byte).await.unwrap() == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                    if n == stall_at.load(Ordering::SeqCst) {
                        stalled.notify_one();
                        std::future::pending::<()>().await;
                    }
                    let head = String::from_utf8(head).unwrap();
                    let target = head.split(' ').nth(1).unwrap();
                    let url = Url::parse(&format!("http://x{target}")).unwrap();
                    let length = (head.lines())
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(str::to_owned)
                        })
                        .map(|n| n.trim().parse::<usize>().unwrap());
                    let body = match length {
                        Some(length) => {
                            let mut body = vec![0; length];
                            stream.read_exact(&mut body).await.unwrap();
                            batch_answer(&body, &batches)
                        }
                        None => answer(&url),
                    };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/fhir+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    stream.write_all(response.as_bytes()).await.unwrap();
                });
            }
        });
        fake
    }

    /// A searchset of the first resource (with `_count=1`) or of the count (with `_count=0`) of
    /// [`times`] within the `_lastUpdated` bounds of `url`.
    fn answer(url: &Url) -> String {
        let resource_type = url.path().rsplit('/').next().unwrap();
        let (mut lo, mut hi) = (i64::MIN, i64::MAX);
        for (_, v) in url.query_pairs().filter(|(k, _)| k == "_lastUpdated") {
            if let Some(t) = v.strip_prefix("gt") {
                lo = parse_ms(t).unwrap();
            } else if let Some(t) = v.strip_prefix("le") {
                hi = parse_ms(t).unwrap();
            }
        }
        let range = Range { lo, hi };
        let mut matching: Vec<i64> = times().into_iter().filter(|t| range.contains(*t)).collect();
        if resource_type == EMPTY_TYPE {
            matching.clear();
        }
        let entry = match (
            url.query_pairs().any(|(k, v)| k == "_count" && v == "1"),
            matching.first(),
        ) {
            (true, Some(first)) => format!(
                r#","entry":[{{"resource":{{"resourceType":"{resource_type}","id":"a","meta":{{"lastUpdated":"{}"}}}}}}]"#,
                format_ms(*first)
            ),
            _ => String::new(),
        };
        format!(
            r#"{{"resourceType":"Bundle","type":"searchset","total":{}{entry}}}"#,
            matching.len()
        )
    }

    fn capability() -> Capability {
        let mut cap = Capability::default();
        for t in TYPES {
            cap.types.insert(t.into(), BTreeSet::new());
        }
        cap
    }

    const LIMITS: PlanLimits = PlanLimits {
        page_size: 10,
        patient_batch_size: 100,
        max_search_url_bytes: 6000,
        skip_empty_types: true,
        whole_type_share: 0.0,
        time_slices: 4,
        slice_concurrency: 4,
    };

    /// A store holding job "j" and the upstream client of `fake`.
    fn setup(dir: &std::path::Path, fake: &Fake) -> (Store, Job, Upstream) {
        let store = Store::open(dir).unwrap();
        let job = crate::export::model::tests::job("j");
        store.put_job(&job).unwrap();
        let cfg: crate::config::UpstreamConfig =
            toml::from_str(&format!("base_url = \"{}\"", fake.base)).unwrap();
        (store, job, Upstream::new(&cfg).unwrap())
    }

    /// Every slice of the finished plan: those stored while planning, then the rest.
    fn all_slices(store: &Store, plan: Plan) -> Vec<Slice> {
        let mut slices = store.slices("j").unwrap();
        slices.extend(plan.slices);
        slices
    }

    /// Where the upstream takes `batch` requests, a system export counts every type in one, without
    /// its window; the types without resources are left out, and one the batch did not answer is
    /// kept.
    #[tokio::test]
    async fn a_system_export_counts_its_types_in_one_batch_and_leaves_out_the_empty_ones() {
        let mut cap = capability();
        cap.types.insert(EMPTY_TYPE.into(), BTreeSet::new());
        cap.batch = true;
        let fake = fake_upstream().await;
        let tmp = tempfile::tempdir().unwrap();
        let (store, job, upstream) = setup(tmp.path(), &fake);
        let limits = PlanLimits {
            time_slices: 1,
            ..LIMITS
        };
        let planned = plan(&job, &upstream, &cap, limits, &store).await.unwrap();
        let slices = all_slices(&store, planned);
        let types: BTreeSet<&str> = slices.iter().map(|s| s.resource_type.as_str()).collect();
        assert_eq!(types, BTreeSet::from(TYPES), "{EMPTY_TYPE} is left out");
        let batches = fake.batches.lock().unwrap().clone();
        assert_eq!(batches.len(), 1, "{batches:?}");
        let mut counted = batches[0].clone();
        counted.sort();
        let expected: Vec<String> = ["Condition", "Encounter", "Observation", EMPTY_TYPE]
            .iter()
            .map(|t| format!("{t}?_count=0"))
            .collect();
        assert_eq!(
            counted, expected,
            "every type counted whole, without the job's window"
        );
        // The batch only: the type it did not answer is searched, not counted on its own.
        assert_eq!(fake.requests.load(Ordering::SeqCst), 1);
        assert_eq!(
            slices[0].resource_type, REFUSED_IN_BATCH,
            "a type of unknown size goes first"
        );

        // Without batch, nothing is counted: each type's first page says whether it is empty.
        let fake = fake_upstream().await;
        let (store, job, upstream) = setup(&tmp.path().join("no-batch"), &fake);
        cap.batch = false;
        let planned = plan(&job, &upstream, &cap, limits, &store).await.unwrap();
        let slices = all_slices(&store, planned);
        assert!(slices.iter().any(|s| s.resource_type == EMPTY_TYPE));
        assert_eq!(fake.requests.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_largest_types_go_first_and_those_of_unknown_size_before_them() {
        let totals = HashMap::from([
            ("A".to_owned(), 5),
            ("B".to_owned(), 50),
            ("C".to_owned(), 5),
        ]);
        let mut types: Vec<String> = ["A", "B", "C", "D"].map(String::from).to_vec();
        largest_first(&mut types, &totals);
        assert_eq!(types, ["D", "B", "A", "C"]);
    }

    #[tokio::test]
    async fn interrupted_planning_resumes_where_it_stopped() {
        let cap = capability();
        let tmp = tempfile::tempdir().unwrap();

        let fake = fake_upstream().await;
        let (store, job, upstream) = setup(&tmp.path().join("whole"), &fake);
        let plan_once = plan(&job, &upstream, &cap, LIMITS, &store).await.unwrap();
        let whole = all_slices(&store, plan_once);
        let whole_requests = fake.requests.load(Ordering::SeqCst);
        assert_eq!(whole.len(), 12, "every type split in 4: {whole:#?}");

        // Planning dies (as in a kill) while waiting for a request well into the second type.
        fake.requests.store(0, Ordering::SeqCst);
        let (store, job, upstream) = setup(&tmp.path().join("resumed"), &fake);
        let stall_at = whole_requests * 2 / 3;
        fake.stall_at.store(stall_at, Ordering::SeqCst);
        tokio::select! {
            _ = plan(&job, &upstream, &cap, LIMITS, &store) => panic!("planning did not stall"),
            _ = fake.stalled.notified() => {}
        }
        assert!(
            !store.slices("j").unwrap().is_empty(),
            "nothing was stored before the interruption"
        );
        let resumed = plan(&job, &upstream, &cap, LIMITS, &store).await.unwrap();
        assert_eq!(
            all_slices(&store, resumed),
            whole,
            "a resumed plan is the same plan"
        );
        // Only the request that never got its answer is made twice.
        assert_eq!(fake.requests.load(Ordering::SeqCst), whole_requests + 1);
    }

    #[test]
    fn a_groups_active_patient_members_are_read_and_the_rest_skipped() {
        let group = serde_json::json!({
            "resourceType": "Group", "id": "g", "type": "person", "actual": true,
            "characteristic": [{"code": {"text": "ignored"}, "valueBoolean": true, "exclude": false}],
            "member": [
                {"entity": {"reference": "Patient/a"}},
                {"entity": {"reference": "Patient/b"}, "inactive": false},
                {"entity": {"reference": "Patient/c"}, "inactive": true},
                {"entity": {"reference": "Practitioner/d"}},
                {"entity": {"reference": 7}},
                {"entity": {"display": "no reference"}},
                {"period": {"start": "2020"}},
                {"entity": {"reference": "Patient/a"}}
            ]
        });
        let members = active_patients(group.to_string().as_bytes()).unwrap();
        assert_eq!(members, BTreeSet::from(["a".to_owned(), "b".to_owned()]));
        let none = active_patients(br#"{"resourceType": "Group"}"#).unwrap();
        assert!(none.is_empty());
        assert!(active_patients(br#"{"member": "Patient/a"}"#).is_err());
    }

    /// A Patient export of 300 patients is batched as the URL limit allows, every search within it and
    /// no batch ended early; a type the upstream holds nothing of is probed once and never searched.
    #[tokio::test]
    async fn patients_are_batched_to_the_url_limit_and_empty_types_are_skipped() {
        let fake = fake_upstream().await;
        let tmp = tempfile::tempdir().unwrap();
        let (store, job, upstream) = patient_job(tmp.path(), &fake);
        let cap = searchable_by_patient(&["Condition", EMPTY_TYPE, "Patient"]);
        let limits = PlanLimits {
            max_search_url_bytes: 2000,
            ..LIMITS
        };
        let slices = plan(&job, &upstream, &cap, limits, &store)
            .await
            .unwrap()
            .slices;
        let types: BTreeSet<&str> = slices.iter().map(|s| s.resource_type.as_str()).collect();
        assert_eq!(types, BTreeSet::from(["Condition", "Patient"]));
        // One probe per type, no search yet.
        assert_eq!(fake.requests.load(Ordering::SeqCst), 3);
        let conditions: Vec<&Slice> = slices
            .iter()
            .filter(|s| s.resource_type == "Condition")
            .collect();
        let mut batched = 0;
        for slice in &conditions {
            let url = &slice.searches[0];
            assert!(url.len() <= 2000, "{} bytes: {url}", url.len());
            // Another patient (49 bytes encoded) would not have fitted, but for the last batch.
            let last = std::ptr::eq(*slice, *conditions.last().unwrap());
            assert!(
                last || url.len() + 49 > 2000,
                "a batch ended early: {} bytes",
                url.len()
            );
            batched += Url::parse(url)
                .unwrap()
                .query_pairs()
                .find(|(k, _)| k == "patient")
                .unwrap()
                .1
                .split(',')
                .count();
        }
        assert_eq!(batched, 300);
        assert!(conditions.len() > 1);

        let fake = fake_upstream().await;
        let (store, job, upstream) = patient_job(&tmp.path().join("old"), &fake);
        let old = PlanLimits {
            skip_empty_types: false,
            ..limits
        };
        let slices = plan(&job, &upstream, &cap, old, &store)
            .await
            .unwrap()
            .slices;
        assert!(
            slices.iter().any(|s| s.resource_type == EMPTY_TYPE),
            "without probes every type is searched"
        );
        assert_eq!(fake.requests.load(Ordering::SeqCst), 0);
    }

    /// A Patient export of more patients than the upstream holds pages its types whole, and a type
    /// with more than its share of the pages in `_lastUpdated` ranges that between them hold each of
    /// its resources exactly once.
    #[tokio::test]
    async fn types_paged_whole_are_split_to_run_side_by_side() {
        let fake = fake_upstream().await;
        let tmp = tempfile::tempdir().unwrap();
        let (store, job, upstream) = patient_job(tmp.path(), &fake);
        let cap = searchable_by_patient(&["Condition", "Patient"]);
        let limits = PlanLimits {
            whole_type_share: 0.5,
            ..LIMITS
        };
        let slices = plan(&job, &upstream, &cap, limits, &store)
            .await
            .unwrap()
            .slices;
        for t in ["Condition", "Patient"] {
            let of_type: Vec<&Slice> = slices.iter().filter(|s| s.resource_type == t).collect();
            assert_eq!(of_type.len(), 2, "{t}: {of_type:#?}");
            let mut seen = vec![0; times().len()];
            for slice in of_type {
                assert!(slice.members_by.is_some(), "{t} is paged whole");
                let url = Url::parse(&slice.searches[0]).unwrap();
                assert!(!url.query_pairs().any(|(k, _)| k == "patient" || k == "_id"));
                let bound = |prefix: &str| {
                    url.query_pairs()
                        .find_map(|(k, v)| {
                            (k == "_lastUpdated")
                                .then(|| v.strip_prefix(prefix).map(parse_ms))
                                .flatten()
                        })
                        .flatten()
                        .unwrap()
                };
                let range = Range {
                    lo: bound("gt"),
                    hi: bound("le"),
                };
                for (i, t) in times().into_iter().enumerate() {
                    seen[i] += usize::from(range.contains(t));
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{t}: {seen:?}");
        }
    }

    /// [`setup`] with job "j" a Patient export of [`job_patients`].
    fn patient_job(dir: &std::path::Path, fake: &Fake) -> (Store, Job, Upstream) {
        let (store, mut job, upstream) = setup(dir, fake);
        job.spec.level = Level::Patient;
        job.spec.patients = job_patients();
        (store, job, upstream)
    }

    /// A CapabilityStatement declaring `types`, each searchable by `patient`.
    fn searchable_by_patient(types: &[&str]) -> Capability {
        let mut cap = Capability::default();
        for t in types {
            cap.types
                .insert((*t).into(), BTreeSet::from(["patient".to_owned()]));
        }
        cap
    }

    /// 300 patient ids of 36 characters, as long as UUIDs.
    fn job_patients() -> Vec<String> {
        (0..300).map(|i| format!("{i:036}")).collect()
    }

    #[test]
    fn elements_apply_per_type() {
        let e = vec![
            "Observation.status".to_string(),
            "id".into(),
            "Patient.name".into(),
        ];
        assert_eq!(elements_for(&e, "Observation"), ["status", "id"]);
        assert_eq!(elements_for(&e, "Encounter"), ["id"]);
    }
}
