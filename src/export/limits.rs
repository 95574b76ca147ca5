//! A job's limits (resources, upstream requests) and the disk all jobs share, counted as pages come in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::export::failure::JobFailure;
use crate::export::worker::WorkerError;
use crate::upstream::UpstreamError;

/// Bytes all export files take, against `max_disk_bytes`; shared by every job.
#[derive(Debug, Default)]
pub struct DiskUsage {
    /// Limit in bytes (0: none).
    pub max: u64,
    /// Committed bytes of every job's files.
    pub used: AtomicU64,
}

/// A job's limits and what it has used of them, shared by its slices.
#[derive(Debug)]
pub struct JobLimits {
    /// Most resources the job may export (0: no limit).
    pub max_resources: u64,
    /// Most upstream requests the job may make (0: no limit).
    pub max_requests: u64,
    /// Resources written so far.
    pub resources: AtomicU64,
    /// Upstream requests made so far.
    pub requests: AtomicU64,
    /// Disk used by all jobs.
    pub disk: Arc<DiskUsage>,
}

impl JobLimits {
    /// Counts a request the job may do without: none when the budget is spent.
    pub(crate) fn spare_request(&self) -> bool {
        self.requests
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |made| {
                (self.max_requests == 0 || made < self.max_requests).then_some(made + 1)
            })
            .is_ok()
    }

    /// Counts a request the job makes; fails once the budget is spent.
    pub(crate) fn spend_request(&self) -> Result<(), UpstreamError> {
        let made = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if self.max_requests > 0 && made > self.max_requests {
            return Err(UpstreamError::Budget(self.max_requests));
        }
        Ok(())
    }

    /// Reserves room for a page of `lines` resources and `bytes` bytes, or fails the job.
    pub(crate) fn admit_page(&self, lines: u64, bytes: u64) -> Result<(), WorkerError> {
        let total = self.resources.fetch_add(lines, Ordering::Relaxed) + lines;
        if self.max_resources > 0 && total > self.max_resources {
            return Err(JobFailure::TooManyResources {
                max: self.max_resources,
            }
            .into());
        }
        let used = self.disk.used.load(Ordering::Relaxed);
        if self.disk.max > 0 && used + bytes > self.disk.max {
            return Err(JobFailure::DiskLimit {
                max: self.disk.max,
                used,
            }
            .into());
        }
        Ok(())
    }
}
