//! A page converted to a slice's output lines as its bytes arrive, and the hash that recognises a page.

use std::collections::HashSet;
use std::sync::Mutex;

use chrono::{DateTime, Utc};

use crate::export::elements::{elements_for, strip_whitespace, write_subset};
use crate::export::model::{Slice, SliceKind};
use crate::export::prefetch::Prefetch;
use crate::export::whole::Members;
use crate::export::worker::SliceContext;
use crate::store::StoreError;
use crate::upstream::bundle::{BundleError, BundleReader, Entry};
use crate::upstream::limiter::Slot;
use crate::upstream::PageSink;

/// One page, converted to output lines.
pub(crate) struct Page {
    /// The lines, each ending in a newline.
    pub(crate) data: Vec<u8>,
    /// Offset just past each line's newline in `data`.
    pub(crate) ends: Vec<usize>,
    /// Ids written, for deduplicated slices.
    pub(crate) ids: Vec<String>,
    /// `Bundle.link[next]`.
    pub(crate) next: Option<String>,
    /// `Bundle.total`.
    pub(crate) total: Option<u64>,
    /// `Bundle.link[self]`.
    pub(crate) self_link: Option<String>,
    /// Hash of the page's first resource (`None` for an empty page), to recognise a page served
    /// again under another URL.
    pub(crate) fingerprint: Option<u64>,
    /// Matches left out as other patients' (a type paged whole).
    pub(crate) others: u64,
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: a hash that stays the same across builds, since it is stored in cursors.
fn fnv(seed: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(seed, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The hash a cursor remembers a page's URL by.
pub(crate) fn url_hash(url: &str) -> u64 {
    fnv(FNV_OFFSET, url.as_bytes())
}

/// Why a page cannot be written as the slice's lines; the fetch retries the page.
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// The page is not a usable Bundle.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// A search returned a match of another type than it searched.
    #[error("a {expected} search returned a {found} as a match")]
    WrongType { expected: String, found: String },
    /// A resource of a deduplicated slice has no id to deduplicate by.
    #[error("a resource has no id")]
    NoId,
    /// A history entry deletes something other than a resource of the slice's type.
    #[error("history entry for {url:?} is not a {resource_type} deletion")]
    NotADeletion { url: String, resource_type: String },
    /// `_elements` could not be applied to a resource.
    #[error("{0}")]
    Elements(String),
    /// A resource of a type paged whole does not parse where its patient is looked for.
    #[error("resource JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The store could not say whether a resource was written before.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What converting a page of a slice needs, the same for every attempt at it.
pub(crate) struct Scope<'s> {
    /// The slice's context.
    pub(crate) ctx: &'s SliceContext,
    /// The slice's cursor.
    pub(crate) slice: &'s Slice,
    /// The page's URL.
    pub(crate) url: &'s str,
    /// Whether resources found before are left out (a slice of several OR-ed searches).
    pub(crate) dedupe: bool,
    /// Ids written since the last checkpoint.
    pub(crate) batch_ids: &'s HashSet<String>,
    /// Ids of the checkpoint being committed, if one is.
    pub(crate) committing_ids: Option<&'s HashSet<String>>,
    /// Where the page after this one is asked for.
    pub(crate) prefetch: &'s Prefetch,
    /// A written page's buffer, to fill again.
    pub(crate) spare: &'s Mutex<Vec<u8>>,
    /// The job's patients, whose resources alone a slice paging its type whole keeps.
    pub(crate) members: Option<&'s Members>,
}

/// A page converted as it arrives: each entry is checked and rendered as an output line as soon as its
/// last byte is in, and the page after it is asked for as soon as its `next` link is read. An `Err`
/// makes the fetch retry the page, whose lines are then dropped with it: nothing is written twice.
pub(crate) struct Converter<'s> {
    reader: BundleReader,
    lines: Lines<'s>,
}

/// The page's output lines, rendered entry by entry.
struct Lines<'s> {
    scope: &'s Scope<'s>,
    page: Page,
    /// Ids on this page so far (deduplicated slices).
    page_ids: HashSet<String>,
    /// Whether the page after this one has been asked for.
    asked: bool,
    /// The slot this page's request holds, which the request for the next page takes over.
    slot: Option<Slot>,
    /// The `_elements` entries that apply to the page's type (empty: whole resources).
    elements: Vec<String>,
}

impl<'s> Converter<'s> {
    /// A converter for one attempt at the page `scope` describes.
    pub(crate) fn new(scope: &'s Scope<'s>) -> Self {
        let data = std::mem::take(&mut *scope.spare.lock().expect("spare buffer lock"));
        Self {
            reader: BundleReader::new(),
            lines: Lines {
                scope,
                page: Page {
                    data,
                    ends: Vec::new(),
                    ids: Vec::new(),
                    next: None,
                    total: None,
                    self_link: None,
                    fingerprint: None,
                    others: 0,
                },
                page_ids: HashSet::new(),
                asked: false,
                slot: None,
                elements: elements_for(
                    &scope.ctx.elements,
                    scope.ctx.layout.page_type(scope.slice),
                ),
            },
        }
    }
}

impl PageSink for Converter<'_> {
    type Page = Page;
    type Error = PageError;

    fn expect(&mut self, bytes: usize) {
        // Exact, with headroom: `reserve` doubles the buffer whenever a page is a little larger than the last.
        self.lines.page.data.reserve_exact(bytes + bytes / 8);
    }

    fn opened(&mut self, slot: Slot) {
        self.lines.slot = Some(slot);
    }

    fn chunk(&mut self, bytes: &[u8]) -> Result<(), PageError> {
        self.reader.feed(bytes, &mut |e| self.lines.add(e))?;
        self.lines.ask_next(self.reader.next_link());
        Ok(())
    }

    fn finish(mut self) -> Result<Page, PageError> {
        let summary = self.reader.finish(&mut |e| self.lines.add(e))?;
        self.lines.ask_next(summary.next.as_deref());
        let mut page = self.lines.page;
        page.next = summary.next;
        page.total = summary.total;
        page.self_link = summary.self_link;
        Ok(page)
    }
}

impl Lines<'_> {
    /// Asks for the page after this one, once.
    fn ask_next(&mut self, next: Option<&str>) {
        let scope = self.scope;
        let Some(slot) = self.slot.as_ref() else {
            return;
        };
        if let Some(next) = next.filter(|_| !self.asked) {
            self.asked = true;
            scope
                .prefetch
                .start(scope.ctx, scope.slice, scope.url, next, slot);
        }
    }

    /// Renders an entry's resource as a line if it is one the slice exports.
    fn add(&mut self, entry: Entry<'_>) -> Result<(), PageError> {
        let Scope {
            ctx, slice, dedupe, ..
        } = *self.scope;
        let out = &mut self.page;
        if slice.kind == SliceKind::Deleted {
            return deletion(&entry, slice, ctx.snapshot, out);
        }
        if !entry.is_match()? {
            return Ok(());
        }
        let Some(resource) = entry.resource else {
            return Ok(());
        };
        if !ctx.layout.admits(slice, &resource.resource_type) {
            return Err(PageError::WrongType {
                expected: ctx.layout.page_type(slice).to_owned(),
                found: resource.resource_type.into_owned(),
            });
        }
        // A page is known by its first resource: a later page starting with the same one is the same
        // page served again (or an overlap), which would duplicate resources either way.
        if out.fingerprint.is_none() {
            out.fingerprint = Some(fnv(FNV_OFFSET, resource.json));
        }
        if let (Some(element), Some(members)) = (&slice.members_by, self.scope.members) {
            if !members.admits(&resource, element)? {
                out.others += 1;
                return Ok(());
            }
        }
        if dedupe {
            let id = resource.id.as_deref().ok_or(PageError::NoId)?;
            let key = ctx.layout.dedupe_key(slice, &resource.resource_type, id);
            if !self.page_ids.insert(key.clone())
                || self.scope.batch_ids.contains(&key)
                || self
                    .scope
                    .committing_ids
                    .is_some_and(|ids| ids.contains(&key))
                || ctx.store.seen(slice, &key)?
            {
                return Ok(());
            }
            out.ids.push(key);
        }
        if !self.elements.is_empty() {
            write_subset(resource.json, &self.elements, &mut out.data)
                .map_err(PageError::Elements)?;
        } else if resource.compact {
            out.data.extend_from_slice(resource.json);
        } else {
            strip_whitespace(resource.json, &mut out.data);
        }
        out.data.push(b'\n');
        out.ends.push(out.data.len());
        Ok(())
    }
}

/// Renders a history entry that deletes a resource of the slice's type, up to the snapshot, as the spec's
/// deleted-resource line: a transaction Bundle of that one deletion.
fn deletion(
    entry: &Entry<'_>,
    slice: &Slice,
    snapshot: DateTime<Utc>,
    out: &mut Page,
) -> Result<(), PageError> {
    let Some(request) = entry.request()?.filter(|r| r.method == "DELETE") else {
        return Ok(());
    };
    let prefix = format!("{}/", slice.resource_type);
    let id = request
        .url
        .strip_prefix(&prefix)
        .filter(|id| !id.is_empty() && !id.contains(['/', '?']))
        .ok_or_else(|| PageError::NotADeletion {
            url: request.url.clone(),
            resource_type: slice.resource_type.clone(),
        })?;
    let after_snapshot = entry
        .response()?
        .and_then(|r| r.last_modified)
        .and_then(|w| DateTime::parse_from_rfc3339(&w).ok())
        .is_some_and(|w| w > snapshot);
    if after_snapshot {
        return Ok(());
    }
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [{"request": {"method": "DELETE", "url": format!("{prefix}{id}")}}],
    });
    out.data.extend_from_slice(bundle.to_string().as_bytes());
    out.data.push(b'\n');
    out.ends.push(out.data.len());
    Ok(())
}
