//! `cargo bench --bench bundle`: how fast the export reads a searchset page into NDJSON lines with its
//! streaming reader (`upstream::bundle`, fed 64 KiB chunks), against the way the proxy read pages before:
//! serde_json parsing the whole page with the resources as `RawValue`s, then `write_compact` (a scan for
//! whitespace, then a copy). CPU only: no network, no disk.
//!
//! Three pages: 1000 lab Observations of short strings (as the export benchmark's fast upstream serves),
//! the same with a 600-byte narrative each, and 20 documents each carrying a 100 KB base64 attachment.
//! Each is read 10 rounds, interleaved; the best round of each reader is reported.

use std::fmt::Write as _;
use std::time::Instant;

use fhir_bulk_proxy::export::elements::{strip_whitespace, write_compact};
use fhir_bulk_proxy::upstream::bundle::{BundleError, BundleReader, Entry};
use serde::Deserialize;
use serde_json::value::RawValue;

const ROUNDS: usize = 10;
const CHUNK: usize = 64 * 1024;

#[derive(Deserialize)]
struct SerdePage<'a> {
    #[serde(rename = "resourceType")]
    _resource_type: String,
    #[serde(rename = "link", default)]
    _link: Vec<SerdeLink>,
    #[serde(default, borrow)]
    entry: Vec<SerdeEntry<'a>>,
}

#[derive(Deserialize)]
struct SerdeLink {
    #[serde(rename = "relation")]
    _relation: String,
    #[serde(rename = "url")]
    _url: String,
}

#[derive(Deserialize)]
struct SerdeEntry<'a> {
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
    search: Option<SerdeSearch>,
}

#[derive(Deserialize)]
struct SerdeSearch {
    mode: Option<String>,
}

fn lab(i: usize, narrative: &str) -> String {
    format!(
        r##"{{"resourceType":"Observation","id":"obs-{i:08}","meta":{{"versionId":"1","lastUpdated":"2020-01-01T00:00:00.000Z","source":"#lab-system","profile":["http://hl7.org/fhir/us/core/StructureDefinition/us-core-observation-lab"]}},{narrative}"status":"final","category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"laboratory","display":"Laboratory"}}],"text":"Laboratory"}}],"code":{{"coding":[{{"system":"http://loinc.org","code":"2345-7","display":"Glucose"}}],"text":"Glucose"}},"subject":{{"reference":"Patient/pat-{:08}","display":"James Smith"}},"effectiveDateTime":"2020-01-01T00:00:00.000Z","valueQuantity":{{"value":95.3,"unit":"mg/dL","system":"http://unitsofmeasure.org","code":"mg/dL"}},"referenceRange":[{{"low":{{"value":70,"unit":"mg/dL"}},"high":{{"value":99,"unit":"mg/dL"}},"text":"70-99 mg/dL"}}],"note":[{{"text":"Specimen collected after an overnight fast; result verified by the laboratory."}}]}}"##,
        i / 20
    )
}

fn document(i: usize) -> String {
    let data: String = (0..100_000)
        .map(|k| {
            char::from(
                b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                    [(k * 7 + i) % 64],
            )
        })
        .collect();
    format!(
        r#"{{"resourceType":"DocumentReference","id":"doc-{i:04}","status":"current","content":[{{"attachment":{{"contentType":"application/pdf","data":"{data}"}}}}]}}"#
    )
}

fn page(resources: impl Iterator<Item = String>) -> Vec<u8> {
    let mut body = String::from(
        r#"{"resourceType":"Bundle","type":"searchset","link":[{"relation":"next","url":"http://127.0.0.1/fhir/Observation?_offset=1000"}],"entry":["#,
    );
    for (i, r) in resources.enumerate() {
        if i > 0 {
            body.push(',');
        }
        let _ = write!(body, r#"{{"resource":{r},"search":{{"mode":"match"}}}}"#);
    }
    body.push_str("]}");
    body.into_bytes()
}

fn by_reader(body: &[u8], out: &mut Vec<u8>) {
    let mut reader = BundleReader::new();
    let mut each = |e: Entry<'_>| {
        let is_match = e.is_match()?;
        if let Some(r) = e.resource.filter(|_| is_match) {
            if r.compact {
                out.extend_from_slice(r.json);
            } else {
                strip_whitespace(r.json, out);
            }
            out.push(b'\n');
        }
        Ok::<_, BundleError>(())
    };
    for chunk in body.chunks(CHUNK) {
        reader.feed(chunk, &mut each).expect("valid page");
    }
    reader.finish(&mut each).expect("valid page");
}

fn by_serde_json(body: &[u8], out: &mut Vec<u8>) {
    let page: SerdePage = serde_json::from_slice(body).expect("valid page");
    for e in page.entry {
        let is_match = e.search.and_then(|s| s.mode).is_none_or(|m| m == "match");
        if let Some(r) = e.resource.filter(|_| is_match) {
            write_compact(r.get(), out);
            out.push(b'\n');
        }
    }
}

fn main() {
    let narrative = format!(
        r#""text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>"}},"#,
        "Glucose 95.3 mg/dL, within the reference range of 70-99 mg/dL, fasting. ".repeat(8)
    );
    let pages = [
        ("1000 lab Observations", page((0..1000).map(|i| lab(i, "")))),
        (
            "the same with narratives",
            page((0..1000).map(|i| lab(i, &narrative))),
        ),
        ("20 documents of 100 KB", page((0..20).map(document))),
    ];
    println!("| Page | Size (MB) | serde_json + write_compact (MB/s) | streaming reader (MB/s) | × before |");
    println!("|---|---:|---:|---:|---:|");
    for (name, body) in &pages {
        let (mut a, mut b) = (
            Vec::with_capacity(body.len()),
            Vec::with_capacity(body.len()),
        );
        by_serde_json(body, &mut a);
        by_reader(body, &mut b);
        assert_eq!(a, b, "both readers write the same lines");
        let reps = (200_000_000 / body.len()).max(1);
        let (mut serde_best, mut reader_best) = (f64::MAX, f64::MAX);
        for _ in 0..ROUNDS {
            for (best, read) in [
                (&mut serde_best, by_serde_json as fn(&[u8], &mut Vec<u8>)),
                (&mut reader_best, by_reader),
            ] {
                let started = Instant::now();
                for _ in 0..reps {
                    a.clear();
                    read(body, &mut a);
                }
                *best = best.min(started.elapsed().as_secs_f64());
            }
        }
        let mb = (body.len() * reps) as f64 / 1e6;
        println!(
            "| {name} | {:.2} | {:.0} | {:.0} | {:.2}× |",
            body.len() as f64 / 1e6,
            mb / serde_best,
            mb / reader_best,
            serde_best / reader_best
        );
    }
}
