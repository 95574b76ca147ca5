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
/// Most servers send compact JSON: that is recognised in one fast scan and copied as it is.
pub fn write_compact(json: &str, out: &mut Vec<u8>) {
    if is_compact(json.as_bytes()) {
        out.extend_from_slice(json.as_bytes());
    } else {
        strip_whitespace(json.as_bytes(), out);
    }
}

/// Whether valid JSON `bytes` certainly holds no insignificant whitespace (`false` may be wrong, `true` never).
///
/// Tabs and line breaks are escaped inside strings, so a raw one is always insignificant. A run of spaces
/// between two tokens always touches a structural character: the token before it is `{`, `[`, `,` or `:`,
/// or it ends a value, and then the token after it is `}`, `]`, `,` or `:`. A space with neither beside it
/// is inside a string; one that has (`"Smith, John"`) only sends the value down the slower path.
fn is_compact(bytes: &[u8]) -> bool {
    if memchr::memchr3(b'\n', b'\r', b'\t', bytes).is_some() {
        return false;
    }
    memchr::memchr_iter(b' ', bytes).all(|i| {
        let before = i.checked_sub(1).map(|b| bytes[b]);
        let after = bytes.get(i + 1).copied();
        !matches!(before, None | Some(b'{' | b'[' | b',' | b':'))
            && !matches!(after, None | Some(b'}' | b']' | b',' | b':'))
    })
}

/// Copies `bytes` (valid JSON) to `out`, leaving out whitespace outside strings.
pub fn strip_whitespace(bytes: &[u8], out: &mut Vec<u8>) {
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
pub fn write_subset(resource: &[u8], elements: &[String], out: &mut Vec<u8>) -> Result<(), String> {
    let members: Members = serde_json::from_slice(resource)
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

/// `meta` with the SUBSETTED tag present exactly once, as exactly `{system, code}`: an upstream that
/// subsetted the resource may have tagged it already, with a `display` or a `version` of its own.
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
    tags.retain(|t| !(t["system"] == SUBSETTED_SYSTEM && t["code"] == "SUBSETTED"));
    tags.push(serde_json::json!({"system": SUBSETTED_SYSTEM, "code": "SUBSETTED"}));
    Ok(meta.to_string())
}

/// The `_elements` entries that apply to `resource_type`, without their type prefix.
pub fn elements_for(elements: &[String], resource_type: &str) -> Vec<String> {
    elements
        .iter()
        .filter_map(|e| match e.split_once('.') {
            Some((t, el)) if t == resource_type => Some(el.to_owned()),
            Some(_) => None,
            None => Some(e.clone()),
        })
        .collect()
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

    #[test]
    fn compact_input_is_recognised_and_spaced_input_is_not() {
        assert!(is_compact(
            br#"{"a":"Glucose [Mass/volume] in Blood","b":[1,{"c":"x y"}]}"#
        ));
        // A space beside a structural character inside a string is only suspected, never missed.
        assert!(!is_compact(br#"{"a":"Smith, John"}"#));
        for spaced in [
            r#"{ "a":1}"#,
            r#"{"a" :1}"#,
            r#"{"a": 1}"#,
            r#"{"a":1 }"#,
            r#"[1 ,2]"#,
            r#"[1, 2]"#,
            r#"[true ]"#,
            r#"["x" ]"#,
            r#"[[1] ,[2]]"#,
            "{\"a\":\t1}",
        ] {
            assert!(!is_compact(spaced.as_bytes()), "{spaced}");
            assert_ne!(compact(spaced), spaced);
        }
    }

    /// JSON text built token by token, with a random run of spaces (mostly none) between any two tokens.
    fn spaced_json() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        // Mostly no gap, so that many texts have only one or two spaced places to get right.
        let gap = || prop_oneof![12 => Just(""), 1 => Just(" "), 1 => Just("  ")];
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            any::<i32>().prop_map(|n| n.to_string()),
            "[ -~é]{0,10}".prop_map(|s| serde_json::Value::from(s).to_string()),
        ];
        leaf.prop_recursive(4, 32, 5, move |inner| {
            let member = ("[a-z ,:\\[\\]{}]{0,5}", gap(), gap(), inner.clone())
                .prop_map(|(k, g1, g2, v)| format!("{}{g1}:{g2}{v}", serde_json::Value::from(k)));
            prop_oneof![
                (
                    proptest::collection::vec((gap(), inner, gap()), 0..5),
                    gap()
                )
                    .prop_map(|(items, end)| enclose('[', items, end, ']')),
                (
                    proptest::collection::vec((gap(), member, gap()), 0..5),
                    gap()
                )
                    .prop_map(|(members, end)| enclose('{', members, end, '}')),
            ]
        })
    }

    /// `open`, the `parts` (each between its gaps) joined by commas, the closing gap, `close`.
    fn enclose(open: char, parts: Vec<(&str, String, &str)>, end: &str, close: char) -> String {
        let parts: Vec<String> = parts
            .into_iter()
            .map(|(before, part, after)| format!("{before}{part}{after}"))
            .collect();
        format!("{open}{}{end}{close}", parts.join(","))
    }

    proptest::proptest! {
        /// Whatever passes as compact is exactly what stripping its whitespace gives.
        #[test]
        fn what_passes_as_compact_has_no_whitespace_to_strip(text in spaced_json()) {
            serde_json::from_str::<serde_json::Value>(&text).expect("the strategy builds valid JSON");
            let mut stripped = Vec::new();
            strip_whitespace(text.as_bytes(), &mut stripped);
            if is_compact(text.as_bytes()) {
                proptest::prop_assert_eq!(String::from_utf8(stripped).unwrap(), text);
            }
        }

        /// Compacting pretty JSON gives exactly the compact serialization, strings untouched.
        #[test]
        fn compaction_equals_compact_serialization(v in json_value()) {
            let mut out = Vec::new();
            write_compact(&serde_json::to_string_pretty(&v).unwrap(), &mut out);
            proptest::prop_assert_eq!(String::from_utf8(out).unwrap(), serde_json::to_string(&v).unwrap());
        }
    }

    fn subset(json: &str, elements: &[&str]) -> serde_json::Value {
        let elements: Vec<String> = elements.iter().map(|s| s.to_string()).collect();
        let mut out = Vec::new();
        write_subset(json.as_bytes(), &elements, &mut out).unwrap();
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
    fn an_upstreams_subsetted_tag_becomes_exactly_the_specs() {
        let v = subset(
            r#"{"resourceType":"Patient","id":"p","meta":{"tag":[{"system":"urn:x","code":"keep"},
                {"system":"http://terminology.hl7.org/CodeSystem/v3-ObservationValue","code":"SUBSETTED","display":"subsetted"}]}}"#,
            &["gender"],
        );
        assert_eq!(
            v["meta"]["tag"],
            serde_json::json!([{"system": "urn:x", "code": "keep"},
                {"system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue", "code": "SUBSETTED"}])
        );
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
