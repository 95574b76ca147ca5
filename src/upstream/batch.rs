//! Many reads in one `batch` request ([`crate::upstream::Upstream::read_batch`]): the Bundle that asks for
//! them, and the batch-response read as it arrives.
//!
//! A batch-response answers its entries in the order they were asked (FHIR R4 §3.1.0.11.3), so the
//! n-th answer belongs to the n-th read. An entry that failed, or is not a Bundle, is simply not
//! answered: the caller asks for it on its own, which reports its failure as a search would.

use crate::upstream::bundle::{BundleError, BundleReader, Entry};
use crate::upstream::PageSink;

/// Most bytes of answers kept from one batch-response; later answers are dropped.
const KEPT_BYTES: usize = 16 << 20;

/// A `batch` Bundle reading each of `urls` (absolute, under `base`) as the relative URL FHIR asks for;
/// `None` if one of them is not under `base`.
pub fn bundle(base: &str, urls: &[String]) -> Option<Vec<u8>> {
    let prefix = format!("{}/", base.trim_end_matches('/'));
    let entries = urls
        .iter()
        .map(|url| {
            let relative = url.strip_prefix(&prefix)?;
            Some(serde_json::json!({"request": {"method": "GET", "url": relative}}))
        })
        .collect::<Option<Vec<_>>>()?;
    let bundle = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
    Some(bundle.to_string().into_bytes())
}

/// A batch-response of `asked` reads, read chunk by chunk: each entry's Bundle is kept when it
/// answered 200.
pub struct Answers {
    reader: BundleReader,
    kept: Kept,
}

/// The Bundles a batch-response brought, in the order of the batch's entries: `None` where the entry
/// failed, was not a Bundle, or came after `KEPT_BYTES` of answers.
struct Kept {
    answers: Vec<Option<Vec<u8>>>,
    asked: usize,
    bytes: usize,
}

impl Answers {
    /// A reader for the answers to `asked` reads.
    pub fn new(asked: usize) -> Self {
        Self {
            reader: BundleReader::new(),
            kept: Kept {
                answers: Vec::with_capacity(asked),
                asked,
                bytes: 0,
            },
        }
    }
}

impl Kept {
    fn add(&mut self, entry: Entry<'_>) -> Result<(), BundleError> {
        if self.answers.len() == self.asked {
            return Ok(());
        }
        let ok = entry
            .response()?
            .and_then(|r| r.status)
            .is_some_and(|status| status.trim_start().starts_with("200"));
        let answer = entry
            .resource
            .filter(|r| ok && r.resource_type == "Bundle")
            .map(|r| r.json)
            .filter(|json| self.bytes + json.len() <= KEPT_BYTES);
        self.bytes += answer.map_or(0, <[u8]>::len);
        self.answers.push(answer.map(<[u8]>::to_vec));
        Ok(())
    }
}

impl PageSink for Answers {
    /// One answer per read asked for, in order.
    type Page = Vec<Option<Vec<u8>>>;
    type Error = BundleError;

    fn chunk(&mut self, bytes: &[u8]) -> Result<(), BundleError> {
        let kept = &mut self.kept;
        self.reader.feed(bytes, &mut |e| kept.add(e))
    }

    fn finish(self) -> Result<Self::Page, BundleError> {
        let mut kept = self.kept;
        self.reader.finish(&mut |e| kept.add(e))?;
        kept.answers.resize(kept.asked, None);
        Ok(kept.answers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(body: &str, asked: usize) -> Vec<Option<serde_json::Value>> {
        let mut answers = Answers::new(asked);
        // In two chunks, cut inside an entry, as bodies arrive.
        let (a, b) = body.as_bytes().split_at(body.len() / 2);
        answers.chunk(a).unwrap();
        answers.chunk(b).unwrap();
        let answers = answers.finish().unwrap();
        (answers.iter())
            .map(|a| a.as_ref().map(|b| serde_json::from_slice(b).unwrap()))
            .collect()
    }

    #[test]
    fn the_batch_reads_each_url_relative_to_the_base() {
        let urls = [
            "http://up:8080/fhir/Observation?_count=0&_lastUpdated=le2026-01-01T00%3A00%3A00.000Z"
                .to_owned(),
            "http://up:8080/fhir/Patient?_count=0".to_owned(),
        ];
        let bundle = bundle("http://up:8080/fhir/", &urls).unwrap();
        let bundle: serde_json::Value = serde_json::from_slice(&bundle).unwrap();
        assert_eq!(bundle["resourceType"], "Bundle");
        assert_eq!(bundle["type"], "batch");
        let requests: Vec<(&str, &str)> = (bundle["entry"].as_array().unwrap().iter())
            .map(|e| {
                (
                    e["request"]["method"].as_str().unwrap(),
                    e["request"]["url"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            requests,
            [
                (
                    "GET",
                    "Observation?_count=0&_lastUpdated=le2026-01-01T00%3A00%3A00.000Z"
                ),
                ("GET", "Patient?_count=0")
            ]
        );
        let foreign = ["http://other/fhir/Patient".to_owned()];
        assert!(super::bundle("http://up:8080/fhir", &foreign).is_none());
    }

    #[test]
    fn only_entries_that_answered_200_with_a_bundle_are_kept_in_order() {
        let body = r#"{"resourceType":"Bundle","type":"batch-response","entry":[
            {"resource":{"resourceType":"Bundle","type":"searchset","total":0},"response":{"status":"200 OK"}},
            {"resource":{"resourceType":"OperationOutcome","issue":[]},"response":{"status":"400 Bad Request"}},
            {"resource":{"resourceType":"Bundle","type":"searchset","total":7},"response":{"status":"200"}},
            {"response":{"status":"200"}},
            {"resource":{"resourceType":"Patient","id":"x"},"response":{"status":"200"}},
            {"resource":{"resourceType":"Bundle","type":"searchset","total":1}},
            {"resource":{"resourceType":"Bundle","type":"searchset","total":2},"response":{"status":"500"}},
            {"resource":{"resourceType":"Bundle","type":"searchset","total":3},"response":{"status":"200"}}
        ]}"#;
        let answers = read(body, 7);
        assert_eq!(
            answers.len(),
            7,
            "an answer past those asked for is dropped"
        );
        let totals: Vec<Option<u64>> = (answers.iter())
            .map(|a| a.as_ref().map(|b| b["total"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            totals,
            [Some(0), None, Some(7), None, None, None, None],
            "kept: 200s with a Bundle; dropped: a 400, no resource, not a Bundle, no status, a 500"
        );
    }

    #[test]
    fn answers_missing_or_past_the_room_left_are_none() {
        let big = "x".repeat(KEPT_BYTES / 2 + 1);
        let entry = format!(
            r#"{{"resource":{{"resourceType":"Bundle","id":"{big}"}},"response":{{"status":"200"}}}}"#
        );
        let body = format!(r#"{{"resourceType":"Bundle","entry":[{entry},{entry}]}}"#);
        let answers = read(&body, 3);
        assert!(answers[0].is_some());
        assert!(answers[1].is_none(), "past the room left");
        assert!(answers[2].is_none(), "not answered at all");
    }

    #[test]
    fn a_response_that_is_not_a_bundle_is_an_error() {
        let mut answers = Answers::new(1);
        answers
            .chunk(br#"{"resourceType":"OperationOutcome","issue":[]}"#)
            .unwrap();
        assert!(answers.finish().is_err());
    }
}
