//! Searchset Bundles read as their bytes arrive: each entry is handed on as soon as its last byte is in,
//! so a page is converted while the rest of it is still on the wire and its body is never held whole.
//!
//! The one scan that finds the entries also validates the JSON as strictly as serde_json does (strings,
//! escapes, UTF-8, numbers, literals, nesting) and notes whether a resource has whitespace between its
//! tokens, so a compact resource is copied as it is without a second look at its bytes.
//!
//! One file past 700 lines because the reader is one state machine over a page's bytes: the entry scan and
//! the JSON validation it performs share every state, so neither reads alone.

use std::borrow::Cow;

use serde::Deserialize;

use crate::upstream::ParseError;

/// Nesting deeper than this is refused (serde_json's own limit), so hostile input cannot exhaust the stack.
const MAX_DEPTH: usize = 128;

/// Why a page is not a usable searchset Bundle.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// An entry's `search`, `request` or `response` is not what FHIR defines.
    #[error("entry.{member}: {source}")]
    Entry {
        member: &'static str,
        source: serde_json::Error,
    },
    /// Not valid JSON, or not a Bundle's shape, at `at`.
    #[error("not a JSON Bundle: {why} at byte {at}")]
    Invalid { why: &'static str, at: usize },
    /// The body ends before the Bundle does.
    #[error("not a JSON Bundle: the body ends early (after {0} bytes)")]
    EndsEarly(usize),
    /// The body is a resource of another type.
    #[error("expected a Bundle, got {0}")]
    NotABundle(String),
    /// The body has no `resourceType`.
    #[error("not a JSON Bundle: it has no resourceType")]
    NoResourceType,
}

/// `Bundle.link`.
#[derive(Debug, Deserialize)]
struct Link {
    /// `next`, `self`…
    relation: String,
    /// Target.
    url: String,
}

/// `Bundle.entry.request`.
#[derive(Debug, Deserialize)]
pub struct EntryRequest {
    /// HTTP method of the recorded interaction.
    pub method: String,
    /// `Type/id` it applied to.
    pub url: String,
}

/// `Bundle.entry.response`.
#[derive(Debug, Deserialize)]
pub struct EntryResponse {
    /// The entry's HTTP status (`200`, `200 OK`…), in a batch-response.
    pub status: Option<String>,
    /// When the interaction happened.
    #[serde(rename = "lastModified")]
    pub last_modified: Option<String>,
}

#[derive(Deserialize)]
struct EntrySearch {
    mode: Option<String>,
}

/// A resource of an entry, as received.
#[derive(Debug)]
pub struct Resource<'a> {
    /// The resource's JSON, byte for byte (valid UTF-8).
    pub json: &'a [u8],
    /// Its `resourceType`.
    pub resource_type: Cow<'a, str>,
    /// Its `id`, if it has one.
    pub id: Option<Cow<'a, str>>,
    /// Whether it has no whitespace between tokens, so it can be written as it is.
    pub compact: bool,
}

/// One `Bundle.entry`, its members other than the resource kept as raw JSON for whoever needs them.
#[derive(Debug, Default)]
pub struct Entry<'a> {
    /// `entry.resource`.
    pub resource: Option<Resource<'a>>,
    search: Option<&'a [u8]>,
    request: Option<&'a [u8]>,
    response: Option<&'a [u8]>,
}

impl Entry<'_> {
    /// Whether the entry is a search result (`search.mode` is `match` or absent), not an include or an outcome.
    pub fn is_match(&self) -> Result<bool, BundleError> {
        match self.search {
            None => Ok(true),
            Some(br#"{"mode":"match"}"#) => Ok(true),
            Some(raw) => {
                let search: Option<EntrySearch> =
                    serde_json::from_slice(raw).map_err(|source| BundleError::Entry {
                        member: "search",
                        source,
                    })?;
                Ok(search.and_then(|s| s.mode).is_none_or(|m| m == "match"))
            }
        }
    }

    /// `entry.request` (history Bundles).
    pub fn request(&self) -> Result<Option<EntryRequest>, BundleError> {
        let raw = self.request.unwrap_or(b"null");
        serde_json::from_slice(raw).map_err(|source| BundleError::Entry {
            member: "request",
            source,
        })
    }

    /// `entry.response` (history Bundles, batch-responses).
    pub fn response(&self) -> Result<Option<EntryResponse>, BundleError> {
        let raw = self.response.unwrap_or(b"null");
        serde_json::from_slice(raw).map_err(|source| BundleError::Entry {
            member: "response",
            source,
        })
    }
}

/// What a page says besides its entries, known once it is read to the end.
#[derive(Debug)]
pub struct Summary {
    /// `Bundle.total`, when the upstream counts.
    pub total: Option<u64>,
    /// The `next` link, if any.
    pub next: Option<String>,
    /// The `self` link: the search as the upstream understood it.
    pub self_link: Option<String>,
}

/// Where the reader stands in the Bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Start,
    FirstMember,
    Member,
    FirstEntry,
    Entry,
    End,
}

/// Members of the Bundle that may appear once only (a second `entry` would export its resources twice).
const MEMBERS: [&[u8]; 4] = [b"resourceType", b"total", b"link", b"entry"];

/// A searchset Bundle read chunk by chunk: [`BundleReader::feed`] each chunk as it arrives, then
/// [`BundleReader::finish`].
#[derive(Debug)]
pub struct BundleReader {
    /// Bytes of an entry (or member) not yet complete.
    pending: Vec<u8>,
    /// `pending` is scanned again once it reaches this length: a large entry arriving in small chunks
    /// then costs a scan of about twice its size, not one per chunk.
    retry_at: usize,
    /// Bytes consumed before `pending`, for error positions.
    offset: usize,
    state: State,
    seen: [bool; 4],
    resource_type: Option<String>,
    total: Option<u64>,
    next: Option<String>,
    self_link: Option<String>,
}

impl Default for BundleReader {
    fn default() -> Self {
        Self::new()
    }
}

impl BundleReader {
    /// A reader at the start of a body.
    pub fn new() -> Self {
        Self {
            pending: Vec::new(),
            retry_at: 0,
            offset: 0,
            state: State::Start,
            seen: [false; 4],
            resource_type: None,
            total: None,
            next: None,
            self_link: None,
        }
    }

    /// The `next` link, once the `link` member has been read (servers write it before the entries).
    pub fn next_link(&self) -> Option<&str> {
        self.next.as_deref()
    }

    /// Reads `chunk`, handing every entry it completes to `on`; an error from `on` stops the read.
    pub fn feed<E: From<BundleError>>(
        &mut self,
        chunk: &[u8],
        on: &mut impl FnMut(Entry<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.pending.is_empty() {
            // Most of a body is read where it arrived; only an entry cut by the chunk's end is copied.
            let used = self.advance(chunk, on)?;
            self.offset += used;
            self.pending.extend_from_slice(&chunk[used..]);
        } else {
            self.pending.extend_from_slice(chunk);
            if self.pending.len() < self.retry_at {
                return Ok(());
            }
            self.rescan(on)?;
        }
        self.retry_at = self.pending.len() * 2;
        Ok(())
    }

    /// Reads what is left once the body has ended: the Bundle must be complete.
    pub fn finish<E: From<BundleError>>(
        mut self,
        on: &mut impl FnMut(Entry<'_>) -> Result<(), E>,
    ) -> Result<Summary, E> {
        if !self.pending.is_empty() {
            self.rescan(on)?;
        }
        if self.state != State::End {
            return Err(BundleError::EndsEarly(self.offset + self.pending.len()).into());
        }
        match self.resource_type.as_deref() {
            Some("Bundle") => Ok(Summary {
                total: self.total,
                next: self.next,
                self_link: self.self_link,
            }),
            Some(other) => Err(BundleError::NotABundle(other.to_owned()).into()),
            None => Err(BundleError::NoResourceType.into()),
        }
    }

    fn rescan<E: From<BundleError>>(
        &mut self,
        on: &mut impl FnMut(Entry<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut pending = std::mem::take(&mut self.pending);
        let used = self.advance(&pending, on)?;
        self.offset += used;
        pending.drain(..used);
        self.pending = pending;
        Ok(())
    }

    /// Reads as many whole members and entries of `data` as it holds; returns the bytes consumed.
    fn advance<E: From<BundleError>>(
        &mut self,
        data: &[u8],
        on: &mut impl FnMut(Entry<'_>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut scan = Scan::new(data);
        let mut refused = None;
        loop {
            let mark = scan.i;
            match self.step(&mut scan, on, &mut refused) {
                Ok(()) => {}
                Err(Stop::Incomplete) => return Ok(mark),
                Err(Stop::Invalid(why)) => {
                    let at = self.offset + scan.i;
                    return Err(BundleError::Invalid { why, at }.into());
                }
                Err(Stop::Rejected) => return Err(refused.expect("a refusal is kept")),
            }
        }
    }

    /// Reads one member or entry, whole or not at all; what `on` refuses an entry with goes to `refused`.
    fn step<E>(
        &mut self,
        scan: &mut Scan<'_>,
        on: &mut impl FnMut(Entry<'_>) -> Result<(), E>,
        refused: &mut Option<E>,
    ) -> Result<(), Stop> {
        match self.state {
            State::Start => {
                scan.expect(b'{', "expected a JSON object")?;
                self.state = State::FirstMember;
            }
            State::FirstMember | State::Member => {
                let c = scan.ws()?;
                if c == b'}' {
                    scan.i += 1;
                    self.state = State::End;
                    return Ok(());
                }
                if self.state == State::Member {
                    scan.expect(b',', "expected , or }")?;
                }
                scan.expect_quote("expected a member name")?;
                let key = scan.key()?;
                scan.expect(b':', "expected :")?;
                let slot = MEMBERS.iter().position(|m| *m == &*key);
                if let Some(slot) = slot {
                    if self.seen[slot] {
                        return Err(Stop::Invalid("a Bundle member appears twice"));
                    }
                }
                match &*key {
                    b"entry" => {
                        scan.expect(b'[', "Bundle.entry is not an array")?;
                        self.state = State::FirstEntry;
                    }
                    b"resourceType" => {
                        let raw = scan.raw_value(1)?;
                        self.resource_type = Some(
                            serde_json::from_slice(raw)
                                .map_err(|_| Stop::Invalid("resourceType is not a string"))?,
                        );
                        self.state = State::Member;
                    }
                    b"total" => {
                        let raw = scan.raw_value(1)?;
                        self.total = serde_json::from_slice(raw)
                            .map_err(|_| Stop::Invalid("Bundle.total is not a count"))?;
                        self.state = State::Member;
                    }
                    b"link" => {
                        let raw = scan.raw_value(1)?;
                        let links: Vec<Link> = serde_json::from_slice(raw)
                            .map_err(|_| Stop::Invalid("Bundle.link is not a list of links"))?;
                        for link in links {
                            match link.relation.as_str() {
                                "next" if self.next.is_none() => self.next = Some(link.url),
                                "self" if self.self_link.is_none() => {
                                    self.self_link = Some(link.url)
                                }
                                _ => {}
                            }
                        }
                        self.state = State::Member;
                    }
                    _ => {
                        scan.value(1)?;
                        self.state = State::Member;
                    }
                }
                if let Some(slot) = slot {
                    self.seen[slot] = true;
                }
            }
            State::FirstEntry | State::Entry => {
                let c = scan.ws()?;
                if c == b']' {
                    scan.i += 1;
                    self.state = State::Member;
                    return Ok(());
                }
                if self.state == State::Entry {
                    scan.expect(b',', "expected , or ] between entries")?;
                }
                let entry = scan.entry()?;
                on(entry).map_err(|e| {
                    *refused = Some(e);
                    Stop::Rejected
                })?;
                self.state = State::Entry;
            }
            State::End => {
                scan.ws()?;
                return Err(Stop::Invalid("trailing characters after the Bundle"));
            }
        }
        Ok(())
    }
}

/// Why a scan stopped.
#[derive(Debug)]
enum Stop {
    /// The bytes end before the value does.
    Incomplete,
    /// Not valid JSON, or not a Bundle's shape.
    Invalid(&'static str),
    /// The receiver of an entry refused it (with the error the caller keeps).
    Rejected,
}

/// Words of a string scanned eight bytes at a time before the rest of it is taken for long.
const LONG_STRING_WORDS: u32 = 2;

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Bytes of `w` that are zero: the lowest flagged byte is exact (higher ones may be false), which is all
/// a search for the first one needs.
#[inline(always)]
fn zero_bytes(w: u64) -> u64 {
    w.wrapping_sub(ONES) & !w & HIGHS
}

/// A validating scanner over complete bytes; a value running past the end is [`Stop::Incomplete`].
struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    /// Whether whitespace was skipped between tokens since this was last cleared.
    spaced: bool,
}

impl<'a> Scan<'a> {
    fn new(b: &'a [u8]) -> Self {
        Self {
            b,
            i: 0,
            spaced: false,
        }
    }

    /// Skips whitespace; the next byte, not consumed.
    #[inline(always)]
    fn ws(&mut self) -> Result<u8, Stop> {
        while let Some(&c) = self.b.get(self.i) {
            match c {
                b' ' | b'\n' | b'\r' | b'\t' => {
                    self.spaced = true;
                    self.i += 1;
                }
                _ => return Ok(c),
            }
        }
        Err(Stop::Incomplete)
    }

    #[inline]
    fn expect(&mut self, c: u8, why: &'static str) -> Result<(), Stop> {
        if self.ws()? != c {
            return Err(Stop::Invalid(why));
        }
        self.i += 1;
        Ok(())
    }

    #[inline]
    fn expect_quote(&mut self, why: &'static str) -> Result<(), Stop> {
        if self.ws()? != b'"' {
            return Err(Stop::Invalid(why));
        }
        Ok(())
    }

    /// Any value, validated and skipped.
    fn value(&mut self, depth: usize) -> Result<(), Stop> {
        match self.ws()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => self.string().map(drop),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(Stop::Invalid("expected a value")),
        }
    }

    /// A value's raw bytes.
    fn raw_value(&mut self, depth: usize) -> Result<&'a [u8], Stop> {
        self.ws()?;
        let start = self.i;
        self.value(depth)?;
        Ok(&self.b[start..self.i])
    }

    /// An object at its `{`, skipped; its member names are not looked at, so they are not unescaped.
    ///
    /// The same walk as [`Scan::members`] without a name for anyone: nearly every object of a page comes
    /// here, and going through `members` made the whole scan 6-8% slower in A/B runs.
    fn object(&mut self, depth: usize) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop::Invalid("nested too deeply"));
        }
        self.i += 1;
        if self.ws()? == b'}' {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.expect_quote("expected a member name")?;
            self.string()?;
            self.expect(b':', "expected :")?;
            self.value(depth)?;
            match self.ws()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Stop::Invalid("expected , or }")),
            }
        }
    }

    /// An object at its `{`, handing each member's name to `member`, which must read the value.
    fn members(
        &mut self,
        depth: usize,
        mut member: impl FnMut(&mut Self, Cow<'a, [u8]>) -> Result<(), Stop>,
    ) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop::Invalid("nested too deeply"));
        }
        self.i += 1;
        if self.ws()? == b'}' {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.expect_quote("expected a member name")?;
            let key = self.key()?;
            self.expect(b':', "expected :")?;
            member(self, key)?;
            match self.ws()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Stop::Invalid("expected , or }")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<(), Stop> {
        if depth > MAX_DEPTH {
            return Err(Stop::Invalid("nested too deeply"));
        }
        self.i += 1;
        if self.ws()? == b']' {
            self.i += 1;
            return Ok(());
        }
        loop {
            self.value(depth)?;
            match self.ws()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Ok(());
                }
                _ => return Err(Stop::Invalid("expected , or ]")),
            }
        }
    }

    /// A member name at its quote, unescaped only when it has escapes (names almost never do).
    fn key(&mut self) -> Result<Cow<'a, [u8]>, Stop> {
        let (raw, escaped) = self.string()?;
        if !escaped {
            return Ok(Cow::Borrowed(raw));
        }
        Ok(Cow::Owned(
            unescape(&self.b[self.i - raw.len() - 2..self.i])?.into_bytes(),
        ))
    }

    /// A string at its opening quote; its raw contents, between the quotes, and whether it has escapes.
    #[inline(always)]
    fn string(&mut self) -> Result<(&'a [u8], bool), Stop> {
        let b = self.b;
        let start = self.i + 1;
        let mut i = start;
        let mut stop_at_high = HIGHS;
        let mut escaped = false;
        loop {
            // Eight bytes at a time to the next quote, backslash, control character or (once) non-ASCII byte.
            let mut words = 0;
            while let Some(word) = b.get(i..i + 8) {
                let w = u64::from_le_bytes(word.try_into().expect("eight bytes"));
                let found = zero_bytes(w ^ (ONES * u64::from(b'"')))
                    | zero_bytes(w ^ (ONES * u64::from(b'\\')))
                    | (w.wrapping_sub(ONES * 0x20) & !w & HIGHS)
                    | (w & stop_at_high);
                if found != 0 {
                    i += (found.trailing_zeros() / 8) as usize;
                    break;
                }
                i += 8;
                words += 1;
                if words == LONG_STRING_WORDS {
                    i += Self::long_run(&b[i..], &mut stop_at_high);
                    break;
                }
            }
            let Some(&c) = b.get(i) else {
                return Err(Stop::Incomplete);
            };
            match c {
                b'"' => {
                    let raw = &b[start..i];
                    if stop_at_high == 0 && std::str::from_utf8(raw).is_err() {
                        return Err(Stop::Invalid("a string is not valid UTF-8"));
                    }
                    self.i = i + 1;
                    return Ok((raw, escaped));
                }
                b'\\' => {
                    escaped = true;
                    i = self.escape(i)?;
                }
                0..=0x1f => return Err(Stop::Invalid("a control character in a string")),
                0x80.. => {
                    // Checked as UTF-8 once the string ends; no need to stop at such bytes again.
                    stop_at_high = 0;
                    i += 1;
                }
                _ => i += 1,
            }
        }
    }

    /// The length of the run of plain string bytes `rest` starts with, for a long string (narrative, an
    /// attachment): memchr's vector search finds its end, then one pass that the compiler vectorises looks
    /// for control characters (the run ends at the first) and non-ASCII bytes in it.
    fn long_run(rest: &[u8], stop_at_high: &mut u64) -> usize {
        let end = memchr::memchr2(b'"', b'\\', rest).unwrap_or(rest.len());
        let run = &rest[..end];
        let (low, high) = run
            .iter()
            .fold((u8::MAX, 0), |(low, high), &c| (low.min(c), high.max(c)));
        if high >= 0x80 {
            *stop_at_high = 0;
        }
        if low < 0x20 {
            return run.iter().position(|&c| c < 0x20).unwrap_or(end);
        }
        end
    }

    /// An escape at its backslash; the index after it.
    fn escape(&self, i: usize) -> Result<usize, Stop> {
        match self.b.get(i + 1) {
            None => Err(Stop::Incomplete),
            Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Ok(i + 2),
            Some(b'u') => {
                let hex = self.b.get(i + 2..i + 6).ok_or(Stop::Incomplete)?;
                if hex.iter().all(u8::is_ascii_hexdigit) {
                    Ok(i + 6)
                } else {
                    Err(Stop::Invalid("an invalid \\u escape"))
                }
            }
            Some(_) => Err(Stop::Invalid("an invalid escape")),
        }
    }

    fn literal(&mut self, word: &'static [u8]) -> Result<(), Stop> {
        let have = &self.b[self.i..self.b.len().min(self.i + word.len())];
        if !word.starts_with(have) {
            return Err(Stop::Invalid("expected a value"));
        }
        if have.len() < word.len() {
            return Err(Stop::Incomplete);
        }
        self.i += word.len();
        Ok(())
    }

    /// A number (JSON's grammar); one that reaches the end of the bytes may go on, so it is incomplete.
    fn number(&mut self) -> Result<(), Stop> {
        let b = self.b;
        let mut i = self.i;
        let digits = |mut i: usize| {
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                i += 1;
            }
            i
        };
        if b[i] == b'-' {
            i += 1;
        }
        match b.get(i) {
            None => return Err(Stop::Incomplete),
            Some(b'0') => i += 1,
            Some(b'1'..=b'9') => i = digits(i + 1),
            Some(_) => return Err(Stop::Invalid("a number without digits")),
        }
        if b.get(i) == Some(&b'.') {
            i += 1;
            match b.get(i) {
                None => return Err(Stop::Incomplete),
                Some(c) if c.is_ascii_digit() => i = digits(i),
                Some(_) => return Err(Stop::Invalid("a number without digits after its point")),
            }
        }
        if matches!(b.get(i), Some(b'e' | b'E')) {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            match b.get(i) {
                None => return Err(Stop::Incomplete),
                Some(c) if c.is_ascii_digit() => i = digits(i),
                Some(_) => return Err(Stop::Invalid("a number without digits in its exponent")),
            }
        }
        if i == b.len() {
            return Err(Stop::Incomplete);
        }
        self.i = i;
        Ok(())
    }

    /// A string value's text.
    fn text(&mut self) -> Result<Cow<'a, str>, Stop> {
        self.expect_quote("expected a string")?;
        let (raw, escaped) = self.string()?;
        if escaped {
            return unescape(&self.b[self.i - raw.len() - 2..self.i]).map(Cow::Owned);
        }
        std::str::from_utf8(raw)
            .map(Cow::Borrowed)
            .map_err(|_| Stop::Invalid("a string is not valid UTF-8"))
    }

    /// An entry object.
    fn entry(&mut self) -> Result<Entry<'a>, Stop> {
        if self.ws()? != b'{' {
            return Err(Stop::Invalid("an entry is not an object"));
        }
        let mut entry = Entry::default();
        let mut twice = false;
        self.members(3, |s, key| {
            let slot = match &*key {
                b"resource" if s.ws()? == b'n' => return s.value(3),
                b"resource" => {
                    twice |= entry.resource.is_some();
                    entry.resource = Some(s.resource()?);
                    return Ok(());
                }
                b"search" => &mut entry.search,
                b"request" => &mut entry.request,
                b"response" => &mut entry.response,
                _ => return s.value(3),
            };
            twice |= slot.is_some();
            *slot = Some(s.raw_value(3)?);
            Ok(())
        })?;
        if twice {
            return Err(Stop::Invalid("an entry member appears twice"));
        }
        Ok(entry)
    }

    /// A resource object, with its type and id picked out on the way.
    fn resource(&mut self) -> Result<Resource<'a>, Stop> {
        if self.ws()? != b'{' {
            return Err(Stop::Invalid("a resource is not an object"));
        }
        let start = self.i;
        self.spaced = false;
        let mut resource_type = None;
        let mut id = None;
        let mut twice = false;
        self.members(4, |s, key| {
            let slot = match &*key {
                b"resourceType" => &mut resource_type,
                b"id" if s.ws()? == b'n' => return s.value(4),
                b"id" => &mut id,
                _ => return s.value(4),
            };
            twice |= slot.is_some();
            *slot = Some(s.text()?);
            Ok(())
        })?;
        if twice {
            return Err(Stop::Invalid("a resource member appears twice"));
        }
        Ok(Resource {
            json: &self.b[start..self.i],
            resource_type: resource_type.ok_or(Stop::Invalid("a resource has no resourceType"))?,
            id,
            compact: !self.spaced,
        })
    }
}

/// A quoted JSON string's text, escapes resolved.
fn unescape(quoted: &[u8]) -> Result<String, Stop> {
    serde_json::from_slice(quoted).map_err(|_| Stop::Invalid("an invalid escape"))
}

/// Reads a whole page at once (the planner's small searches), handing its search results to `on`.
pub fn read_matches(
    body: &[u8],
    mut on: impl FnMut(Resource<'_>) -> Result<(), ParseError>,
) -> Result<Summary, ParseError> {
    let mut reader = BundleReader::new();
    let mut each = |entry: Entry<'_>| {
        if !entry.is_match()? {
            return Ok(());
        }
        entry.resource.map_or(Ok(()), &mut on)
    };
    reader.feed(body, &mut each)?;
    reader.finish(&mut each)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::value::RawValue;
    use serde_json::{json, Value};

    /// What a reader saw: the matches' bytes and compactness, `total` and `next`.
    type Read = (Vec<(String, bool)>, Option<u64>, Option<String>);

    /// Reads `body` fed in pieces cut at `cuts`.
    fn read(body: &[u8], cuts: &[usize]) -> Result<Read, BundleError> {
        let mut reader = BundleReader::new();
        let mut seen = Vec::new();
        let mut each = |e: Entry<'_>| {
            let is_match = e.is_match()?;
            if let Some(r) = e.resource.filter(|_| is_match) {
                seen.push((String::from_utf8(r.json.to_vec()).unwrap(), r.compact));
            }
            Ok(())
        };
        let mut at = 0;
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
        cuts.sort_unstable();
        for cut in cuts {
            reader.feed(&body[at..cut], &mut each)?;
            at = cut;
        }
        reader.feed(&body[at..], &mut each)?;
        let summary = reader.finish(&mut each)?;
        Ok((seen, summary.total, summary.next))
    }

    /// The same, read by serde_json as the proxy read pages before: the reference for what is valid.
    fn model(body: &[u8]) -> Result<Read, String> {
        #[derive(Deserialize)]
        struct Page<'a> {
            #[serde(rename = "resourceType")]
            resource_type: String,
            total: Option<u64>,
            #[serde(default)]
            link: Vec<Link>,
            #[serde(default, borrow)]
            entry: Vec<ModelEntry<'a>>,
        }
        #[derive(Deserialize)]
        struct ModelEntry<'a> {
            #[serde(borrow)]
            resource: Option<&'a RawValue>,
            search: Option<EntrySearch>,
        }
        // serde_json skips unused strings without checking their UTF-8; the proxy checks every string.
        std::str::from_utf8(body).map_err(|e| e.to_string())?;
        let page: Page = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        if page.resource_type != "Bundle" {
            return Err("not a Bundle".into());
        }
        let mut seen = Vec::new();
        for e in page.entry {
            #[derive(Deserialize)]
            struct Head {
                #[serde(rename = "resourceType")]
                _resource_type: String,
                #[serde(rename = "id")]
                _id: Option<String>,
            }
            let Some(raw) = e.resource else { continue };
            serde_json::from_str::<Head>(raw.get()).map_err(|e| e.to_string())?;
            if e.search.and_then(|s| s.mode).is_none_or(|m| m == "match") {
                let text = raw.get().to_owned();
                let compact = !has_space_between_tokens(&text);
                seen.push((text, compact));
            }
        }
        let next = page.link.into_iter().find(|l| l.relation == "next");
        Ok((seen, page.total, next.map(|l| l.url)))
    }

    fn has_space_between_tokens(json: &str) -> bool {
        let (mut in_string, mut escaped) = (false, false);
        json.chars().any(|c| {
            let space = !in_string && c.is_ascii_whitespace();
            if in_string && escaped {
                escaped = false;
            } else if in_string && c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = !in_string;
            }
            space
        })
    }

    fn bundle(entries: &[Value]) -> Value {
        json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": entries.len(),
            "link": [{"relation": "self", "url": "s"}, {"relation": "next", "url": "n?p=2"}],
            "entry": entries,
        })
    }

    #[test]
    fn matches_only_with_total_and_next() {
        let body = br#"{"resourceType":"Bundle","total":2,"link":[{"relation":"self","url":"a"},{"relation":"next","url":"b"}],
            "entry":[{"resource":{"resourceType":"Patient","id":"1"},"search":{"mode":"match"}},
                     {"resource":{"resourceType":"Organization","id":"o"},"search":{"mode":"include"}},
                     {"resource":{"resourceType":"Patient","id":"2"}},
                     {"resource":{ "resourceType" : "Patient" }, "search":null},
                     {"fullUrl":"x"}]}"#;
        let (seen, total, next) = read(body, &[]).unwrap();
        let seen: Vec<_> = seen.iter().map(|(j, c)| (j.as_str(), *c)).collect();
        assert_eq!(
            seen,
            [
                (r#"{"resourceType":"Patient","id":"1"}"#, true),
                (r#"{"resourceType":"Patient","id":"2"}"#, true),
                (r#"{ "resourceType" : "Patient" }"#, false),
            ]
        );
        assert_eq!((total, next.as_deref()), (Some(2), Some("b")));
    }

    #[test]
    fn the_self_link_is_kept() {
        let body = br#"{"resourceType":"Bundle","link":[{"relation":"next","url":"n"},{"relation":"self","url":"s?a=1"}],"entry":[]}"#;
        let mut reader = BundleReader::new();
        reader
            .feed(body, &mut |_| Ok::<_, BundleError>(()))
            .unwrap();
        let summary = reader.finish(&mut |_| Ok::<_, BundleError>(())).unwrap();
        assert_eq!(summary.self_link.as_deref(), Some("s?a=1"));
        assert_eq!(summary.next.as_deref(), Some("n"));
    }

    #[test]
    fn type_and_id_are_read_with_their_escapes() {
        let body = br#"{"resourceType":"Bundle","entry":[{"resource":{"id":"a\"b","resourceType":"Pati\u0065nt","x":[1]}}]}"#;
        let mut heads = Vec::new();
        read_matches(body, |r| {
            heads.push((r.resource_type.into_owned(), r.id.map(Cow::into_owned)));
            Ok(())
        })
        .unwrap();
        assert_eq!(heads, [("Patient".to_owned(), Some("a\"b".to_owned()))]);
    }

    #[test]
    fn what_is_not_a_bundle_is_refused() {
        for body in [
            &br#"{"resourceType":"Patient"}"#[..],
            b"<html>",
            b"",
            br#"{"resourceType":"Bundle","entry":[]"#,
            br#"{"resourceType":"Bundle"} x"#,
            br#"{"resourceType":"Bundle","entry":[],"entry":[]}"#,
            br#"{"resourceType":"Bundle","entry":[{"resource":{"id":"1"}}]}"#,
            br#"{"resourceType":"Bundle","entry":[{"resource":[1]}]}"#,
            br#"{"resourceType":"Bundle","entry":[{"resource":{"resourceType":"P"},"resource":{"resourceType":"P"}}]}"#,
            br#"{"resourceType":"Bundle","total":-1}"#,
            br#"{"resourceType":"Bundle","x":01}"#,
            br#"{"resourceType":"Bundle","x":"\x"}"#,
            br#"{"resourceType":"Bundle","x":tru}"#,
            b"{\"resourceType\":\"Bundle\",\"x\":\"\xff\"}",
            b"{\"resourceType\":\"Bundle\",\"x\":\"a\tb\"}",
        ] {
            assert!(read(body, &[]).is_err(), "{}", String::from_utf8_lossy(body));
            assert!(model(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
        // The same faults deep in a long string, where the scan runs ahead with a vector search.
        let long = "narrative ".repeat(20);
        for fault in [&b"\x01"[..], b"\n", b"\xff", b"\xc3("] {
            let mut body = br#"{"resourceType":"Bundle","x":""#.to_vec();
            body.extend_from_slice(long.as_bytes());
            body.extend_from_slice(fault);
            body.extend_from_slice(long.as_bytes());
            body.extend_from_slice(br#""}"#);
            let body = &body[..];
            assert!(
                read(body, &[]).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
            assert!(model(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_exhausting_the_stack() {
        let deep = format!(
            r#"{{"resourceType":"Bundle","x":{}{}}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let err = read(deep.as_bytes(), &[]).unwrap_err().to_string();
        assert!(err.contains("nested too deeply"), "{err}");
    }

    #[test]
    fn entries_are_handed_on_before_the_body_ends_and_next_is_known_before_them() {
        let body = serde_json::to_vec(&bundle(&[
            json!({"resource": {"resourceType": "Patient", "id": "1"}}),
            json!({"resource": {"resourceType": "Patient", "id": "2"}}),
        ]))
        .unwrap();
        let second = body.windows(8).position(|w| w == br#""id":"2""#).unwrap();
        let mut reader = BundleReader::new();
        let ids = std::cell::RefCell::new(Vec::new());
        let mut each = |e: Entry<'_>| {
            ids.borrow_mut()
                .push(e.resource.unwrap().id.unwrap().into_owned());
            Ok::<_, BundleError>(())
        };
        let first_entry = body.windows(7).position(|w| w == br#""entry""#).unwrap();
        reader.feed(&body[..first_entry], &mut each).unwrap();
        assert_eq!(reader.next_link(), Some("n?p=2"));
        reader.feed(&body[first_entry..second], &mut each).unwrap();
        assert_eq!(*ids.borrow(), ["1"]);
        reader.feed(&body[second..], &mut each).unwrap();
        reader.finish(&mut each).unwrap();
        assert_eq!(*ids.borrow(), ["1", "2"]);
    }

    #[test]
    fn an_entry_refused_by_its_receiver_stops_the_read() {
        let body =
            serde_json::to_vec(&bundle(&[json!({"resource": {"resourceType": "P"}})])).unwrap();
        let err = read_matches(&body, |_| Err("no thanks".into())).unwrap_err();
        assert_eq!(err.to_string(), "no thanks");
    }

    /// Any JSON value, strings with escapes, control characters and non-ASCII text.
    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            "(\\PC|[\"\\\\\\x00-\\x1f ])*".prop_map(Value::from),
            "(\\PC|[\"\\\\\\x00-\\x1f ]){10,120}".prop_map(Value::from),
            "[ -~\\x00-\\x1f]{10,120}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 24, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::from),
                prop::collection::vec(("[a-zA-Z \"é]{0,6}", inner), 0..5)
                    .prop_map(|members| Value::Object(members.into_iter().collect())),
            ]
        })
    }

    fn search_bundle() -> impl Strategy<Value = Value> {
        let resource = (
            "[a-z0-9\\-.]{1,12}",
            prop::collection::vec(("x[a-z]{0,7}", json_value()), 0..4),
        )
            .prop_map(|(id, members)| {
                let mut r = serde_json::Map::new();
                r.insert("resourceType".into(), json!("Observation"));
                r.insert("id".into(), json!(id));
                r.extend(members);
                Value::Object(r)
            });
        let entry = (
            resource,
            prop::option::of(prop_oneof![Just("match"), Just("include")]),
        )
            .prop_map(|(r, mode)| match mode {
                Some(mode) => json!({"fullUrl": "u", "resource": r, "search": {"mode": mode}}),
                None => json!({"resource": r}),
            });
        prop::collection::vec(entry, 0..6).prop_map(|entries| bundle(&entries))
    }

    fn edit() -> impl Strategy<Value = (usize, u8, u8)> {
        (
            any::<usize>(),
            0u8..3,
            prop_oneof![
                any::<u8>(),
                prop::sample::select(b"{}[],:\"\\ 0-.eE".to_vec())
            ],
        )
    }

    proptest! {
        // Failures are reported with their input, not saved beside the sources.
        #![proptest_config(ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Wherever the chunks are cut, the reader finds exactly what serde_json finds, compact or not.
        #[test]
        fn reads_what_serde_json_reads_however_the_body_is_cut(
            page in search_bundle(),
            pretty in any::<bool>(),
            cuts in prop::collection::vec(any::<usize>(), 0..6),
        ) {
            let body = if pretty { serde_json::to_vec_pretty(&page) } else { serde_json::to_vec(&page) }.unwrap();
            let expected = model(&body).unwrap();
            prop_assert_eq!(read(&body, &cuts).unwrap(), expected);
        }

        /// A page with a few bytes changed, dropped or added is read as serde_json reads it, or refused
        /// as serde_json refuses it: no invalid JSON gets through, nothing valid is refused.
        #[test]
        fn damaged_pages_are_refused_exactly_when_serde_json_refuses_them(
            page in search_bundle(),
            pretty in any::<bool>(),
            edits in prop::collection::vec(edit(), 1..4),
            cuts in prop::collection::vec(any::<usize>(), 0..6),
        ) {
            let mut body = if pretty { serde_json::to_vec_pretty(&page) } else { serde_json::to_vec(&page) }.unwrap();
            for (at, kind, byte) in edits {
                let at = at % (body.len() + 1);
                match kind {
                    0 if at < body.len() => body[at] = byte,
                    1 if at < body.len() => { body.remove(at); }
                    _ => body.insert(at, byte),
                }
            }
            prop_assert_eq!(read(&body, &cuts).ok(), model(&body).ok(), "{}", String::from_utf8_lossy(&body));
        }
    }
}
