//! Asking for a slice's next page while the current one is still being read.

use std::sync::Mutex;

use tokio::task::JoinHandle;

use crate::export::model::Slice;
use crate::export::page::url_hash;
use crate::export::worker::SliceContext;
use crate::upstream::limiter::Slot;
use crate::upstream::Prefetched;

/// A slice's next page, asked for as soon as the current page's `next` link is read, before the rest of
/// the page is: the upstream prepares it while the proxy converts, instead of each waiting for the other.
/// At most one per slice; one still in flight when the slice ends is aborted.
#[derive(Default)]
pub(crate) struct Prefetch(Mutex<Option<Asked>>);

/// A page asked for: its URL, and the attempt at it.
type Asked = (String, JoinHandle<Prefetched>);

impl Prefetch {
    /// Asks for `next`, the page after `url`, unless it is asked for already, leads back to a page
    /// fetched before, or the job's request budget has no request to spare. It goes in `after`, the slot
    /// of the page at `url`.
    pub(crate) fn start(
        &self,
        ctx: &SliceContext,
        slice: &Slice,
        url: &str,
        next: &str,
        after: &Slot,
    ) {
        let mut slot = self.0.lock().expect("prefetch lock");
        if slot.as_ref().is_some_and(|(asked, _)| *asked == next)
            || next == url
            || slice.visited.contains(&url_hash(next))
            || !ctx.limits.spare_request()
        {
            return;
        }
        if let Some(handle) = ctx.upstream.prefetch(next, after.clone()) {
            if let Some((_, stale)) = slot.replace((next.to_owned(), handle)) {
                stale.abort();
            }
        }
    }

    /// Drops the page asked for, if any: before a page is tried again, since a failed attempt may have
    /// asked for the next page, which holds the slot the new attempt needs (and will ask for it again).
    pub(crate) fn forget(&self) {
        if let Some((_, handle)) = self.0.lock().expect("prefetch lock").take() {
            handle.abort();
        }
    }

    /// The attempt at `url` if that is the page asked for; any other is dropped.
    pub(crate) async fn take(&self, url: &str) -> Option<Prefetched> {
        let asked = self.0.lock().expect("prefetch lock").take();
        match asked {
            Some((asked, handle)) if asked == url => handle.await.ok(),
            Some((_, handle)) => {
                handle.abort();
                None
            }
            None => None,
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.0.get_mut().ok().and_then(Option::take) {
            handle.abort();
        }
    }
}
