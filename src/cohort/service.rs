//! Cohort records and their computations: created, computed in the background, resumed after a
//! restart, refreshed and deleted.
//!
//! A computation is never resumed half-way: its members live only in memory until the last page, then
//! go into the store together with the record that makes them current. A restart therefore starts each
//! unfinished computation again, under a new generation, and whatever was being served stays served.

use std::sync::Arc;

use super::membership::{self, Limits};
use super::{Cohort, Computed, Filter, State, ID_PREFIX};
use crate::store::{Store, StoreError};
use crate::upstream::Upstream;

/// Creates, computes and serves cohorts.
pub struct Cohorts {
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    limits: Limits,
    runtime: tokio::runtime::Handle,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Cohorts {
    /// The cohort service over the proxy's store and upstream client; computations run on the
    /// current runtime (the one the proxy was started on), whichever thread asks for one.
    pub fn new(store: Arc<Store>, upstream: Arc<Upstream>, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            store,
            upstream,
            limits,
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Starts again every computation a previous run left unfinished.
    pub fn resume(self: &Arc<Self>) -> Result<(), StoreError> {
        for mut cohort in self.store.cohorts()? {
            if cohort.state != State::Computing {
                continue;
            }
            cohort.generation += 1;
            self.store.put_cohort(&cohort)?;
            self.store
                .prune_cohort_members(&cohort.id, cohort.ready.as_ref().map(|r| r.generation))?;
            tracing::info!(cohort = %cohort.id, "cohort membership computation restarted");
            self.spawn(cohort);
        }
        Ok(())
    }

    /// Stores a new cohort and starts computing its members.
    pub fn create(
        self: &Arc<Self>,
        definition: serde_json::Value,
        filters: Vec<Filter>,
        owner: Option<String>,
    ) -> Result<Cohort, StoreError> {
        let cohort = Cohort {
            id: format!("{ID_PREFIX}{}", uuid::Uuid::new_v4().simple()),
            owner,
            definition,
            filters,
            generation: 1,
            state: State::Computing,
            ready: None,
            last_updated: now(),
        };
        self.store.put_cohort(&cohort)?;
        self.spawn(cohort.clone());
        Ok(cohort)
    }

    /// Computes `cohort`'s members again; the last computed ones stay served until the new ones are in.
    /// `false` when a computation is already running.
    pub fn refresh(self: &Arc<Self>, mut cohort: Cohort) -> Result<bool, StoreError> {
        if cohort.state == State::Computing {
            return Ok(false);
        }
        cohort.generation += 1;
        cohort.state = State::Computing;
        cohort.last_updated = now();
        self.store.put_cohort(&cohort)?;
        self.spawn(cohort);
        Ok(true)
    }

    /// A cohort by id.
    pub fn find(&self, id: &str) -> Result<Option<Cohort>, StoreError> {
        self.store.cohort(id)
    }

    /// Every cohort.
    pub fn all(&self) -> Result<Vec<Cohort>, StoreError> {
        self.store.cohorts()
    }

    /// The members of `cohort`'s last finished computation, sorted (none before the first finishes).
    pub fn members(&self, cohort: &Cohort) -> Result<Vec<String>, StoreError> {
        match &cohort.ready {
            Some(ready) => self.store.cohort_members(&cohort.id, ready.generation),
            None => Ok(Vec::new()),
        }
    }

    /// Deletes a cohort; a computation still running finds it gone and stores nothing.
    pub fn delete(&self, id: &str) -> Result<(), StoreError> {
        self.store.delete_cohort(id)
    }

    fn spawn(self: &Arc<Self>, cohort: Cohort) {
        let this = self.clone();
        self.runtime.spawn(async move {
            let id = cohort.id.clone();
            if let Err(e) = this.compute(cohort).await {
                tracing::error!(cohort = %id, error = %e, "storing a cohort's membership failed");
            }
        });
    }

    async fn compute(&self, mut cohort: Cohort) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let result = membership::compute(&cohort.filters, &self.upstream, self.limits).await;
        let members: Vec<(String, String)> = match result {
            Ok(members) => {
                let finished = now();
                // Who was a member already keeps the time it joined: a Group export's `_since` gives
                // only those who joined later their older data.
                let before: std::collections::BTreeMap<String, String> = match &cohort.ready {
                    Some(ready) => self
                        .store
                        .cohort_joined(&cohort.id, ready.generation)?
                        .into_iter()
                        .collect(),
                    None => Default::default(),
                };
                cohort.ready = Some(Computed {
                    generation: cohort.generation,
                    count: members.len(),
                    refreshed: finished.clone(),
                });
                cohort.state = State::Ready;
                cohort.last_updated = finished.clone();
                members
                    .into_iter()
                    .map(|m| {
                        let joined = before.get(&m).cloned().unwrap_or_else(|| finished.clone());
                        (m, joined)
                    })
                    .collect()
            }
            Err(failure) => {
                tracing::warn!(cohort = %cohort.id, error = %failure, "cohort membership computation failed");
                cohort.state = State::Failed(failure);
                cohort.last_updated = now();
                Vec::new()
            }
        };
        if !self.store.commit_cohort(&cohort, &members)? {
            // Deleted, or refreshed again: this computation's result is nobody's any more.
            self.store.prune_cohort_members(
                &cohort.id,
                self.store
                    .cohort(&cohort.id)?
                    .and_then(|c| c.ready.map(|r| r.generation)),
            )?;
            return Ok(());
        }
        if let Some(ready) = &cohort.ready {
            self.store
                .prune_cohort_members(&cohort.id, Some(ready.generation))?;
        }
        self.store.flush().await?;
        tracing::info!(
            cohort = %cohort.id,
            members = members.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            state = ?cohort.state,
            "cohort membership computation ended"
        );
        Ok(())
    }
}
