//! Resource lines as written: compact JSON, and `_elements` subsetting the proxy enforces itself.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// `meta.tag` the spec asks for on resources reduced by `_elements`.
const SUBSETTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// Elements every subset keeps, whatever `_elements` says (FHIR search `_elements` semantics).
const MANDATORY: [&str; 3] = ["resourceType", "id", "meta"];

/// Appends `json` to `out` without insignificant whitespace, leaving every other byte as it is.
///
/// The input is valid JSON (it came through a `RawValue`), so tracking strings and escapes is enough.
pub fn write_compact(json: &str, out: &mut Vec<u8>) {
    let bytes = json.as_bytes();
    let n = bytes.len();
    // Copy in runs: strings (most of a resource) are skipped with memchr to their closing quote, and
    // only the few bytes between strings are looked at one by one.
    let mut run_start = 0;
    let mut i = 0;
    while i < n {
        match bytes[i] {
            b'"' => {
                i += 1;
                loop {
                    match memchr::memchr2(b'"', b'\\', &bytes[i..]) {
                        Some(p) if bytes[i + p] == b'\\' => {
                            i += p + 2;
                            if i >= n {
                                break;
                            }
                        }
                        Some(p) => {
                            i += p + 1;
                            break;
                        }
                        None => {
                            i = n;
                            break;
                        }
                    }
                }
            }
            b' ' | b'\n' | b'\r' | b'\t' => {
                out.extend_from_slice(&bytes[run_start..i]);
                i += 1;
                run_start = i;
            }
            _ => i += 1,
        }
    }
    out.extend_from_slice(&bytes[run_start.min(n)..]);
}

/// The top-level members of a resource, in document order, values untouched.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    out.push(entry);
                }
                Ok(Members(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Whether member `key` is selected by `element` (`value[x]` selects `valueQuantity`, …).
fn selects(element: &str, key: &str) -> bool {
    match element.strip_suffix("[x]") {
        Some(prefix) => key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase())),
        None => key == element,
    }
}

/// Writes the resource reduced to `elements` (plus the mandatory ones), tagged SUBSETTED, compact.
///
/// Kept members are copied byte for byte; only `meta` is rebuilt, to add the tag once.
pub fn write_subset(
    resource: &RawValue,
    elements: &[String],
    out: &mut Vec<u8>,
) -> Result<(), String> {
    let members: Members = serde_json::from_str(resource.get())
        .map_err(|e| format!("resource is not a JSON object: {e}"))?;
    let mut meta_written = false;
    out.push(b'{');
    let mut first = true;
    let mut member = |out: &mut Vec<u8>, key: &str, write_value: &dyn Fn(&mut Vec<u8>)| {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(serde_json::to_string(key).expect("string").as_bytes());
        out.push(b':');
        write_value(out);
    };
    for (key, value) in &members.0 {
        if key == "meta" {
            let meta = tagged_meta(Some(value))?;
            member(out, key, &|o| o.extend_from_slice(meta.as_bytes()));
            meta_written = true;
        } else if MANDATORY.contains(&key.as_str()) || elements.iter().any(|e| selects(e, key)) {
            member(out, key, &|o| write_compact(value.get(), o));
        }
    }
    if !meta_written {
        let meta = tagged_meta(None)?;
        member(out, "meta", &|o| o.extend_from_slice(meta.as_bytes()));
    }
    out.push(b'}');
    Ok(())
}

/// `meta` with the SUBSETTED tag present exactly once.
fn tagged_meta(meta: Option<&RawValue>) -> Result<String, String> {
    let mut meta: serde_json::Value = match meta {
        Some(raw) => serde_json::from_str(raw.get()).map_err(|e| e.to_string())?,
        None => serde_json::json!({}),
    };
    let obj = meta.as_object_mut().ok_or("meta is not an object")?;
    let tags = obj
        .entry("tag")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    let tags = tags.as_array_mut().ok_or("meta.tag is not an array")?;
    let tagged = tags
        .iter()
        .any(|t| t["system"] == SUBSETTED_SYSTEM && t["code"] == "SUBSETTED");
    if !tagged {
        tags.push(serde_json::json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}));
    }
    Ok(meta.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(s: &str) -> String {
        let mut out = Vec::new();
        write_compact(s, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn compaction_keeps_strings_and_numbers_exact() {
        assert_eq!(
            compact(r#"{ "a" : 1.50 , "b":[ 1, 2 ] }"#),
            r#"{"a":1.50,"b":[1,2]}"#
        );
        assert_eq!(
            compact(r#"{"s": "a \" b\\ ", "t":"x\ty"}"#),
            r#"{"s":"a \" b\\ ","t":"x\ty"}"#
        );
        assert_eq!(
            compact("{\n  \"k\": \"line1\\nline2\"\n}"),
            r#"{"k":"line1\nline2"}"#
        );
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = serde_json::Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            "[ -~\\t\\n\\\\\"é]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map("[a-z \\\"]{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        /// Compacting pretty JSON gives exactly the compact serialization, strings untouched.
        #[test]
        fn compaction_equals_compact_serialization(v in json_value()) {
            let mut out = Vec::new();
            write_compact(&serde_json::to_string_pretty(&v).unwrap(), &mut out);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&v).unwrap());
        }
    }

    fn subset(json: &str, elements: &[&str]) -> serde_json::Value {
        let raw: Box<RawValue> = serde_json::from_str(json).unwrap();
        let elements: Vec<String> = elements.iter().map(|s| s.to_string()).collect();
        let mut out = Vec::new();
        write_subset(&raw, &elements, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains('\n'));
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn subset_keeps_selected_and_mandatory_members_and_tags_once() {
        let v = subset(
            r#"{"resourceType":"Observation","id":"1","meta":{"versionId":"2"},"status":"final","valueQuantity":{"value":1.50},"code":{}}"#,
            &["status", "value[x]"],
        );
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            ["resourceType", "id", "meta", "status", "valueQuantity"]
        );
        assert_eq!(v["meta"]["versionId"], "2");
        assert_eq!(v["meta"]["tag"][0]["code"], "SUBSETTED");
        let again = subset(&v.to_string(), &["status"]);
        assert_eq!(again["meta"]["tag"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn subset_adds_meta_when_missing() {
        let v = subset(
            r#"{"resourceType":"Patient","id":"p","gender":"x"}"#,
            &["name"],
        );
        assert_eq!(v["meta"]["tag"][0]["code"], "SUBSETTED");
        assert!(v.get("gender").is_none());
    }
}
