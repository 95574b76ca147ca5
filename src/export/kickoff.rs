//! Kick-off request validation: headers and parameters (query or `Parameters` body) into an [`ExportSpec`].
//!
//! It passes 700 lines only with its tests, which hold the kick-off rules' cases one by one.

use std::collections::BTreeSet;

use crate::config::UnsearchableType;
use crate::export::associated::{self, AssociatedData};
use crate::export::layout::Layout;
use crate::export::model::{ExportSpec, Level, TypeSelection};
use crate::export::{compartment, filters};
use crate::fhir_types;
use crate::upstream::Capability;

/// Accepted `_outputFormat` values; all mean FHIR NDJSON.
const OUTPUT_FORMATS: [&str; 3] = ["application/fhir+ndjson", "application/ndjson", "ndjson"];

/// Search parameters that would change paging or the shape of results, so a `_typeFilter` may not set them.
const RESERVED_FILTER_PARAMS: [&str; 12] = [
    "_count",
    "_offset",
    "_page",
    "_sort",
    "_include",
    "_revinclude",
    "_elements",
    "_summary",
    "_total",
    "_contained",
    "_containedType",
    "_format",
];

/// Why a kick-off is refused.
#[derive(Debug, thiserror::Error)]
pub enum KickoffError {
    /// A required header is missing or has a value the server does not support.
    #[error("header {header}: {reason}")]
    Header {
        header: &'static str,
        reason: String,
    },
    /// A parameter is invalid or unsupported (and the client did not ask for lenient handling).
    #[error("parameter {name}: {reason}")]
    Param { name: String, reason: String },
    /// The POST body is not a usable `Parameters` resource.
    #[error("request body: {0}")]
    Body(String),
}

/// The headers a kick-off must carry, read once by the HTTP layer.
#[derive(Debug, Default)]
pub struct KickoffHeaders<'a> {
    /// `Accept`.
    pub accept: Option<&'a str>,
    /// Every `Prefer` value, comma lists included.
    pub prefer: Vec<&'a str>,
}

/// A validated kick-off.
#[derive(Debug)]
pub struct Kickoff {
    /// What to export.
    pub spec: ExportSpec,
    /// What lenient handling ignored, for the kick-off's and the manifest's OperationOutcome.
    pub notes: Vec<String>,
    /// Whether the client asked for `Prefer: handling=lenient`.
    pub lenient: bool,
    /// Whether the client asked for `Prefer: separate-export-status` (3.0.0): status polls then answer
    /// 200 and carry the job's own status in `X-Export-Status`.
    pub separate_status: bool,
    /// Whether the client sent `allowPartialManifests=true` (3.0.0): polls of the running job may list
    /// the files already complete.
    pub partial_manifests: bool,
}

/// Checks headers and parameters; `body` is the POST body, `None` for GET.
pub fn parse(
    level: Level,
    headers: &KickoffHeaders,
    query: Option<&str>,
    body: Option<&[u8]>,
    capability: &Capability,
    unsearchable: UnsearchableType,
) -> Result<Kickoff, KickoffError> {
    let prefer: Vec<String> = headers
        .prefer
        .iter()
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_ascii_lowercase().replace(' ', ""))
        .collect();
    check_headers(headers.accept, &prefer)?;
    let lenient = prefer.iter().any(|p| p == "handling=lenient");

    let mut params: Vec<(String, String)> = query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default();
    let is_post = body.is_some();
    if let Some(body) = body {
        params.extend(parameters_body(body)?);
    }
    let mut b = Builder {
        capability,
        lenient,
        notes: Vec::new(),
        allowed: compartment::level_types(&level, capability)
            .into_keys()
            .collect(),
        unsearchable,
        unusable_filters: BTreeSet::new(),
        patient_given: false,
        elements_given: false,
        partial_manifests: false,
        separate_status: prefer.iter().any(|p| p == "separate-export-status"),
        spec: ExportSpec {
            level,
            output_format: OUTPUT_FORMATS[0].to_owned(),
            since: None,
            until: None,
            types: TypeSelection::All,
            type_filters: Vec::new(),
            elements: Vec::new(),
            patients: Vec::new(),
            layout: Layout::ByType,
            associated: None,
        },
    };
    b.take(params, is_post)?;
    b.finish()
}

fn check_headers(accept: Option<&str>, prefer: &[String]) -> Result<(), KickoffError> {
    let accepts_fhir_json = accept.is_some_and(|a| {
        a.split(',').any(|m| {
            m.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/fhir+json")
        })
    });
    if !accepts_fhir_json {
        return Err(KickoffError::Header {
            header: "Accept",
            reason: format!(
                "must be application/fhir+json (got {})",
                accept.unwrap_or("nothing")
            ),
        });
    }
    if !prefer.iter().any(|p| p == "respond-async") {
        return Err(KickoffError::Header {
            header: "Prefer",
            reason: "must include respond-async".into(),
        });
    }
    Ok(())
}

/// `(name, value)` pairs of a FHIR `Parameters` body; each value is taken from its `value[x]`.
fn parameters_body(body: &[u8]) -> Result<Vec<(String, String)>, KickoffError> {
    let json: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| KickoffError::Body(format!("not JSON: {e}")))?;
    if json["resourceType"] != "Parameters" {
        return Err(KickoffError::Body(
            "must be a FHIR Parameters resource".into(),
        ));
    }
    let mut out = Vec::new();
    for p in json["parameter"].as_array().into_iter().flatten() {
        let name = p["name"]
            .as_str()
            .ok_or_else(|| KickoffError::Body("a parameter has no name".into()))?;
        let value = p
            .as_object()
            .into_iter()
            .flatten()
            .find(|(k, _)| k.starts_with("value"))
            .and_then(|(_, v)| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Bool(b) => Some(b.to_string()),
                serde_json::Value::Object(o) => o
                    .get("reference")
                    .and_then(serde_json::Value::as_str)
                    .map(str::to_owned),
                _ => None,
            })
            .ok_or_else(|| KickoffError::Param {
                name: name.to_owned(),
                reason: "has no usable value[x]".into(),
            })?;
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

struct Builder<'c> {
    capability: &'c Capability,
    lenient: bool,
    notes: Vec<String>,
    allowed: BTreeSet<String>,
    /// What to do with a requested type the upstream cannot search by patient.
    unsearchable: UnsearchableType,
    spec: ExportSpec,
    /// Exported types with a `_typeFilter` that lenient handling ignored.
    unusable_filters: BTreeSet<String>,
    /// Whether any `patient` parameter was given, usable or not.
    patient_given: bool,
    /// Whether any `_elements` parameter was given, usable or not.
    elements_given: bool,
    /// `allowPartialManifests`.
    partial_manifests: bool,
    /// `Prefer: separate-export-status`.
    separate_status: bool,
}

impl Builder<'_> {
    /// Takes every parameter in turn.
    fn take(
        &mut self,
        mut params: Vec<(String, String)>,
        is_post: bool,
    ) -> Result<(), KickoffError> {
        // `_type` first: `_typeFilter` and `_elements` are checked against the chosen types.
        params.sort_by_key(|(name, _)| name != "_type");
        let mut seen = BTreeSet::new();
        for (name, value) in params {
            let once = matches!(
                name.as_str(),
                "_outputFormat"
                    | "_since"
                    | "_until"
                    | "allowPartialManifests"
                    | "organizeOutputBy"
            );
            if once && !seen.insert(name.clone()) {
                self.reject(&name, "may be given only once")?;
                continue;
            }
            match name.as_str() {
                "_outputFormat" => self.output_format(&value)?,
                "_since" => self.since(&value)?,
                "_until" => self.until(&value)?,
                "_type" => self.types(&value)?,
                "_typeFilter" => self.type_filter(&value)?,
                "_elements" => self.elements(&value)?,
                "patient" if !is_post => {
                    self.patient_given = true;
                    self.reject(&name, "is supported with POST only")?
                }
                "patient" => self.patient(&value)?,
                "allowPartialManifests" => self.allow_partial_manifests(&value)?,
                "organizeOutputBy" => self.organize_output_by(&value)?,
                "includeAssociatedData" => self.include_associated_data(&value)?,
                _ => self.reject(&name, "is not a parameter of $export")?,
            }
        }
        Ok(())
    }

    /// Refuses, or with lenient handling records the parameter as ignored.
    fn reject(&mut self, name: &str, reason: &str) -> Result<(), KickoffError> {
        if self.lenient {
            self.notes
                .push(format!("ignored parameter {name}: {reason}"));
            Ok(())
        } else {
            Err(KickoffError::Param {
                name: name.to_owned(),
                reason: reason.to_owned(),
            })
        }
    }

    fn output_format(&mut self, value: &str) -> Result<(), KickoffError> {
        if OUTPUT_FORMATS.contains(&value.trim()) {
            self.spec.output_format = value.trim().to_owned();
            Ok(())
        } else {
            self.reject(
                "_outputFormat",
                &format!("{value:?} is not supported; use application/fhir+ndjson"),
            )
        }
    }

    fn since(&mut self, value: &str) -> Result<(), KickoffError> {
        let t = instant("_since", value)?;
        // Ignoring it would export everything, so even lenient handling refuses it.
        if t > chrono::Utc::now() {
            return Err(KickoffError::Param {
                name: "_since".into(),
                reason: format!("{value:?} is in the future"),
            });
        }
        self.spec.since = Some(format_instant(t));
        Ok(())
    }

    /// `allowPartialManifests` (3.0.0): a FHIR boolean.
    fn allow_partial_manifests(&mut self, value: &str) -> Result<(), KickoffError> {
        match value.trim() {
            "true" => self.partial_manifests = true,
            "false" => self.partial_manifests = false,
            _ => self.reject("allowPartialManifests", "must be true or false")?,
        }
        Ok(())
    }

    /// `organizeOutputBy` (3.0.0): resource blocks per Patient, for the exports that list patients.
    fn organize_output_by(&mut self, value: &str) -> Result<(), KickoffError> {
        match (value.trim(), &self.spec.level) {
            ("Patient", Level::Patient | Level::Group { .. }) => {
                self.spec.layout = Layout::ByPatient;
                Ok(())
            }
            ("Patient", Level::System) => self.reject(
                "organizeOutputBy",
                "Patient is supported for Patient and Group exports only",
            ),
            (other, _) => self.reject(
                "organizeOutputBy",
                &format!("{other:?} is not supported; the only value is Patient"),
            ),
        }
    }

    /// `includeAssociatedData`: comma lists and repeats alike; asking for both kinds of Provenance is
    /// asking for all of them. Codes this server does not know, and any on an upstream that cannot
    /// search Provenance by target, are refused (lenient: ignored, noted).
    fn include_associated_data(&mut self, value: &str) -> Result<(), KickoffError> {
        const NAME: &str = "includeAssociatedData";
        for code in value.split(',').map(str::trim) {
            match AssociatedData::from_code(code) {
                Ok(kind) => self.spec.associated = self.spec.associated.max(Some(kind)),
                Err(reason) => self.reject(NAME, &reason)?,
            }
        }
        if let Some(why) = self
            .spec
            .associated
            .and(associated::unsupported(self.capability))
        {
            self.spec.associated = None;
            self.reject(NAME, &why)?;
        }
        Ok(())
    }

    /// `_until` (3.0.0): a bound in the future is no bound, since the transaction time cuts every export.
    fn until(&mut self, value: &str) -> Result<(), KickoffError> {
        self.spec.until = Some(format_instant(instant("_until", value)?));
        Ok(())
    }

    /// Ends the kick-off. What lenient handling ignored may only narrow the export: a type that loses
    /// every filter is left out rather than exported unfiltered, and a `_type` or `patient` selection
    /// left with nothing in it is refused rather than taken to mean everything.
    fn finish(mut self) -> Result<Kickoff, KickoffError> {
        if let (Some(since), Some(until)) = (&self.spec.since, &self.spec.until) {
            // Instants formatted alike compare as text.
            if until <= since {
                return Err(KickoffError::Param {
                    name: "_until".into(),
                    reason: format!(
                        "{until} is not after _since ({since}): nothing could be exported"
                    ),
                });
            }
        }
        let filtered: BTreeSet<&str> = self
            .spec
            .type_filters
            .iter()
            .map(|(t, _)| t.as_str())
            .collect();
        let unfiltered: Vec<String> = self
            .unusable_filters
            .iter()
            .filter(|t| !filtered.contains(t.as_str()))
            .cloned()
            .collect();
        let mut emptied_by = "_type";
        if !unfiltered.is_empty() {
            let allowed = &self.allowed;
            let types = self
                .spec
                .types
                .make_explicit(|| allowed.iter().cloned().collect());
            if !types.is_empty() {
                emptied_by = "_typeFilter";
            }
            types.retain(|t| !unfiltered.contains(t));
            self.notes.push(format!(
                "not exported: {}, since none of its _typeFilter queries could be used",
                unfiltered.join(", ")
            ));
        }
        if self.spec.types == TypeSelection::Only(Vec::new()) {
            return Err(self.nothing_left(emptied_by, "no requested resource type can be exported"));
        }
        if self.patient_given && self.spec.patients.is_empty() {
            return Err(self.nothing_left("patient", "no usable patient reference remains"));
        }
        // Left empty, `_elements` would mean whole resources: more than the client asked for.
        if self.elements_given && self.spec.elements.is_empty() {
            return Err(self.nothing_left("_elements", "no usable element remains"));
        }
        Ok(Kickoff {
            spec: self.spec,
            notes: self.notes,
            lenient: self.lenient,
            separate_status: self.separate_status,
            partial_manifests: self.partial_manifests,
        })
    }

    /// The refusal of a selection that lenient handling emptied, saying what was ignored.
    fn nothing_left(&self, name: &str, what: &str) -> KickoffError {
        let reason = if self.notes.is_empty() {
            what.to_owned()
        } else {
            format!("{what} ({})", self.notes.join("; "))
        };
        KickoffError::Param {
            name: name.to_owned(),
            reason,
        }
    }

    fn types(&mut self, value: &str) -> Result<(), KickoffError> {
        let mut listed = match std::mem::replace(&mut self.spec.types, TypeSelection::All) {
            TypeSelection::All => Vec::new(),
            TypeSelection::Only(types) => types,
        };
        for t in value.split(',').map(str::trim) {
            if listed.iter().any(|x| x == t) {
                continue;
            }
            if self.allowed.contains(t) || self.exported_empty(t) {
                if !self.allowed.contains(t) {
                    self.notes.push(format!(
                        "{t} is exported empty: the upstream cannot search it by patient"
                    ));
                }
                listed.push(t.to_owned());
            } else {
                self.reject("_type", &self.unknown_type(t))?;
            }
        }
        self.spec.types = TypeSelection::Only(listed);
        Ok(())
    }

    /// Whether `t`, which the level cannot export, is still accepted (and exported empty): an R4 type
    /// the upstream cannot search by patient, unless configured to refuse it.
    fn exported_empty(&self, t: &str) -> bool {
        self.spec.level != Level::System
            && self.unsearchable == UnsearchableType::Note
            && fhir_types::is_resource_type(t)
    }

    fn unknown_type(&self, t: &str) -> String {
        match self.spec.level {
            _ if !fhir_types::is_resource_type(t) => format!("{t:?} is not an R4 resource type"),
            Level::System => format!("{t:?} is not a resource type the upstream can search"),
            _ => format!("{t:?} is not a resource type the upstream can search by patient"),
        }
    }

    /// Whether `t` is exported at all: allowed for the level and, if `_type` was given, listed there.
    fn exported(&self, t: &str) -> bool {
        self.allowed.contains(t) && self.spec.types.includes(t)
    }

    fn type_filter(&mut self, value: &str) -> Result<(), KickoffError> {
        for query in split_type_filters(value) {
            let Some((t, q)) = query.split_once('?') else {
                // A bare type name is a filter of that type gone wrong, not a filter of nothing.
                self.note_unusable_filter(query);
                self.reject(
                    "_typeFilter",
                    &format!("{query:?} is not of the form Type?params"),
                )?;
                continue;
            };
            if !self.exported(t) {
                self.reject(
                    "_typeFilter",
                    &format!("{t:?} is not a type this export includes"),
                )?;
                continue;
            }
            let mut serializer = url::form_urlencoded::Serializer::new(String::new());
            let mut bad = None;
            let mut count = 0;
            for (k, v) in url::form_urlencoded::parse(q.as_bytes()) {
                if let Some(reason) = self.unusable_param(t, &k) {
                    bad = Some(reason);
                    break;
                }
                serializer.append_pair(&k, &v);
                count += 1;
            }
            if bad.is_some() || count == 0 {
                self.note_unusable_filter(t);
            }
            match (bad, count) {
                (Some(reason), _) => self.reject("_typeFilter", &reason)?,
                (None, 0) => self.reject(
                    "_typeFilter",
                    &format!("{query:?} has no search parameters"),
                )?,
                (None, _) => self
                    .spec
                    .type_filters
                    .push((t.to_owned(), serializer.finish())),
            }
        }
        Ok(())
    }

    /// Why search parameter `name` cannot filter `t`, if it cannot. One the upstream does not list
    /// might be ignored there and the export silently widened.
    fn unusable_param(&self, t: &str, name: &str) -> Option<String> {
        if RESERVED_FILTER_PARAMS.contains(&name) {
            return Some(format!(
                "search parameter {name:?} cannot be used in a type filter"
            ));
        }
        let Some(key) = filters::parse_key(name) else {
            return Some(format!("{name:?} is not a search parameter name"));
        };
        filters::unsupported(&key, t, self.capability)
            .map(|why| format!("search parameter {name:?} of {t}: {why}"))
    }

    /// Remembers that an exported type had a filter ignored, so that [`Builder::finish`] can keep
    /// the type from being exported unfiltered.
    fn note_unusable_filter(&mut self, t: &str) {
        if self.exported(t) {
            self.unusable_filters.insert(t.to_owned());
        }
    }

    fn elements(&mut self, value: &str) -> Result<(), KickoffError> {
        self.elements_given = true;
        for e in value.split(',').map(str::trim) {
            let (t, element) = match e.split_once('.') {
                Some((t, el)) => (Some(t), el),
                None => (None, e),
            };
            let element_ok = element
                .strip_suffix("[x]")
                .unwrap_or(element)
                .chars()
                .enumerate()
                .all(|(i, c)| {
                    if i == 0 {
                        c.is_ascii_lowercase()
                    } else {
                        c.is_ascii_alphanumeric()
                    }
                })
                && !element.is_empty();
            if !element_ok {
                self.reject(
                    "_elements",
                    &format!("{e:?} is not Type.element or element"),
                )?;
            } else if t.is_some_and(|t| !self.allowed.contains(t)) {
                self.reject(
                    "_elements",
                    &format!("{e:?} names a type this export cannot include"),
                )?;
            } else {
                self.spec.elements.push(e.to_owned());
            }
        }
        Ok(())
    }

    fn patient(&mut self, value: &str) -> Result<(), KickoffError> {
        self.patient_given = true;
        if self.spec.level == Level::System {
            return self.reject("patient", "is only for Patient and Group level exports");
        }
        let id = value
            .trim()
            .strip_prefix("Patient/")
            .filter(|id| is_fhir_id(id));
        match id {
            Some(id) => {
                self.spec.patients.push(id.to_owned());
                Ok(())
            }
            None => self.reject(
                "patient",
                &format!("{value:?} is not a Patient/[id] reference"),
            ),
        }
    }
}

/// A FHIR instant parameter, in UTC. Ignoring a bound would widen the export, so even lenient
/// handling refuses one it cannot read.
fn instant(name: &str, value: &str) -> Result<chrono::DateTime<chrono::Utc>, KickoffError> {
    chrono::DateTime::parse_from_rfc3339(value.trim())
        .map(|t| t.with_timezone(&chrono::Utc))
        .map_err(|_| KickoffError::Param {
            name: name.into(),
            reason: format!("{value:?} is not a FHIR instant (e.g. 2024-01-31T12:00:00Z)"),
        })
}

/// An instant as the proxy writes it into searches and records: UTC, milliseconds.
fn format_instant(t: chrono::DateTime<chrono::Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

/// Whether `id` is a FHIR logical id (`[A-Za-z0-9\-\.]{1,64}`).
pub fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
}

/// Splits a `_typeFilter` value at commas that start a new `Type?` query, so commas inside a
/// query (OR-ed search values) survive.
fn split_type_filters(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, _) in value.match_indices(',') {
        let rest = &value[i + 1..];
        let starts_query = rest.split_once('?').is_some_and(|(t, _)| {
            t.starts_with(|c: char| c.is_ascii_uppercase())
                && t.chars().all(|c| c.is_ascii_alphabetic())
        });
        if starts_query {
            out.push(&value[start..i]);
            start = i + 1;
        }
    }
    out.push(&value[start..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capability {
        let mut c = Capability::default();
        for (t, params) in [
            ("Patient", vec!["_id", "gender"]),
            ("Observation", vec!["patient", "subject", "code"]),
            ("Practitioner", vec!["name"]),
        ] {
            c.types
                .insert(t.into(), params.into_iter().map(String::from).collect());
        }
        c
    }

    fn headers(prefer: &'static str) -> KickoffHeaders<'static> {
        KickoffHeaders {
            accept: Some("application/fhir+json"),
            prefer: vec![prefer],
        }
    }

    fn get(level: Level, query: &str) -> Result<Kickoff, KickoffError> {
        parse(
            level,
            &headers("respond-async"),
            Some(query),
            None,
            &cap(),
            UnsearchableType::Reject,
        )
    }

    fn param_error(r: Result<Kickoff, KickoffError>) -> String {
        match r {
            Err(KickoffError::Param { name, .. }) => name,
            other => panic!("expected a parameter error, got {other:?}"),
        }
    }

    #[test]
    fn patient_level_types_are_the_patient_searchable_and_the_referenced() {
        let k = get(Level::Patient, "_type=Observation,Practitioner").unwrap();
        assert_eq!(
            k.spec.types,
            TypeSelection::Only(vec!["Observation".into(), "Practitioner".into()])
        );
        // Slot: an R4 type the upstream cannot search by patient; Foo: no R4 type at all.
        let note = |query: &str| {
            parse(
                Level::Group { id: "g".into() },
                &headers("respond-async"),
                Some(query),
                None,
                &cap(),
                UnsearchableType::Note,
            )
        };
        let k = note("_type=Observation,Slot&_type=Slot").unwrap();
        assert_eq!(
            k.spec.types,
            TypeSelection::Only(vec!["Observation".into(), "Slot".into()])
        );
        assert_eq!(
            k.notes,
            ["Slot is exported empty: the upstream cannot search it by patient"]
        );
        assert_eq!(param_error(note("_type=Observation,Foo")), "_type");
        assert_eq!(
            param_error(get(Level::Group { id: "g".into() }, "_type=Slot")),
            "_type"
        );
        // At system level a type the upstream cannot search at all stays a 400 in either mode.
        let system = parse(
            Level::System,
            &headers("respond-async"),
            Some("_type=Slot"),
            None,
            &cap(),
            UnsearchableType::Note,
        );
        assert_eq!(param_error(system), "_type");
    }

    #[test]
    fn full_get_kickoff_is_parsed() {
        let k = get(
            Level::System,
            "_type=Patient,Observation&_since=2024-01-01T10:00:00%2B02:00&_outputFormat=ndjson\
             &_typeFilter=Observation%3Fcode%3Da%2Cb,Patient%3Fgender%3Dmale&_elements=Observation.status,id",
        )
        .unwrap();
        assert_eq!(
            k.spec.types,
            TypeSelection::Only(vec!["Patient".into(), "Observation".into()])
        );
        assert_eq!(k.spec.since.as_deref(), Some("2024-01-01T08:00:00.000Z"));
        assert_eq!(
            k.spec.type_filters,
            [
                ("Observation".into(), "code=a%2Cb".into()),
                ("Patient".into(), "gender=male".into())
            ]
        );
        assert_eq!(k.spec.elements, ["Observation.status", "id"]);
        assert!(k.notes.is_empty());
    }

    #[test]
    fn headers_are_required() {
        let no_accept = KickoffHeaders {
            accept: None,
            prefer: vec!["respond-async"],
        };
        assert!(matches!(
            parse(
                Level::System,
                &no_accept,
                None,
                None,
                &cap(),
                UnsearchableType::Reject
            ),
            Err(KickoffError::Header {
                header: "Accept",
                ..
            })
        ));
        let no_prefer = KickoffHeaders {
            accept: Some("application/fhir+json"),
            prefer: vec![],
        };
        assert!(matches!(
            parse(
                Level::System,
                &no_prefer,
                None,
                None,
                &cap(),
                UnsearchableType::Reject
            ),
            Err(KickoffError::Header {
                header: "Prefer",
                ..
            })
        ));
    }

    #[test]
    fn bad_parameters_are_named() {
        assert_eq!(param_error(get(Level::System, "_type=Foo")), "_type");
        assert_eq!(
            param_error(get(Level::System, "_since=yesterday")),
            "_since"
        );
        assert_eq!(
            param_error(get(Level::System, "_since=2020-13-45T00:00:00Z")),
            "_since"
        );
        assert_eq!(
            param_error(get(Level::System, "_outputFormat=text/csv")),
            "_outputFormat"
        );
        assert_eq!(
            param_error(get(Level::Patient, "patient=Patient/1")),
            "patient"
        );
        assert_eq!(
            param_error(get(Level::System, "_typeFilter=Observation%3F_count%3D5")),
            "_typeFilter"
        );
        assert_eq!(
            param_error(get(Level::System, "_typeFilter=nonsense")),
            "_typeFilter"
        );
        assert_eq!(
            param_error(get(Level::System, "_elements=Observation.Bad")),
            "_elements"
        );
        assert_eq!(param_error(get(Level::System, "bogus=1")), "bogus");
        assert_eq!(
            param_error(get(Level::System, "organizeOutputBy=Patient")),
            "organizeOutputBy"
        );
        assert_eq!(param_error(get(Level::Patient, "_type=Slot")), "_type");
        assert_eq!(
            param_error(get(
                Level::System,
                "_since=2020-01-01T00:00:00Z&_since=2021-01-01T00:00:00Z"
            )),
            "_since"
        );
    }

    /// `organizeOutputBy=Patient` sets the by-patient layout for the exports that list patients; any
    /// other value, a second one, or the system level is refused, and lenient handling keeps by type.
    #[test]
    fn organize_output_by_patient_is_taken_where_patients_are_listed() {
        for level in [Level::Patient, Level::Group { id: "g".into() }] {
            let k = get(level, "organizeOutputBy=Patient").unwrap();
            assert_eq!(k.spec.layout, Layout::ByPatient);
        }
        assert_eq!(get(Level::Patient, "").unwrap().spec.layout, Layout::ByType);
        for query in [
            "organizeOutputBy=Encounter",
            "organizeOutputBy=Patient&organizeOutputBy=Patient",
        ] {
            assert_eq!(param_error(get(Level::Patient, query)), "organizeOutputBy");
        }
        let k = lenient(Level::Patient, "organizeOutputBy=Encounter").unwrap();
        assert_eq!(k.spec.layout, Layout::ByType);
        assert!(
            k.notes.iter().any(|n| n.contains("organizeOutputBy")),
            "{:?}",
            k.notes
        );
    }

    #[test]
    fn lenient_ignores_what_it_can() {
        let k = parse(
            Level::System,
            &headers("respond-async, handling=lenient"),
            Some("_type=Foo,Patient&bogus=1"),
            None,
            &cap(),
            UnsearchableType::Reject,
        )
        .unwrap();
        assert_eq!(k.spec.types, TypeSelection::Only(vec!["Patient".into()]));
        assert_eq!(k.notes.len(), 2);
    }

    fn lenient(level: Level, query: &str) -> Result<Kickoff, KickoffError> {
        parse(
            level,
            &headers("respond-async, handling=lenient"),
            Some(query),
            None,
            &cap(),
            UnsearchableType::Reject,
        )
    }

    #[test]
    fn lenient_handling_refuses_a_since_or_elements_it_would_have_to_drop() {
        for query in ["_since=yesterday", "_elements=Bad!", "_elements=9x,Bad!"] {
            assert!(
                lenient(Level::System, query).is_err(),
                "lenient {query} was accepted"
            );
        }
        let kept = lenient(Level::System, "_elements=status,Bad!").unwrap();
        assert_eq!(kept.spec.elements, ["status"]);
    }

    fn lenient_post(level: Level, body: &str) -> Result<Kickoff, KickoffError> {
        parse(
            level,
            &headers("respond-async, handling=lenient"),
            None,
            Some(body.as_bytes()),
            &cap(),
            UnsearchableType::Reject,
        )
    }

    #[test]
    fn lenient_type_never_widens() {
        assert_eq!(param_error(lenient(Level::System, "_type=Foo")), "_type");
        assert_eq!(param_error(lenient(Level::System, "_type=")), "_type");
        assert_eq!(
            param_error(lenient(Level::System, "_type=Foo&_type=Bar")),
            "_type"
        );
        // Slot is an R4 type the upstream cannot search by patient (refused in this mode).
        assert_eq!(param_error(lenient(Level::Patient, "_type=Slot")), "_type");
        let k = lenient(Level::Patient, "_type=Slot,Observation").unwrap();
        assert_eq!(
            k.spec.types,
            TypeSelection::Only(vec!["Observation".into()])
        );
        assert_eq!(
            get(Level::System, "").unwrap().spec.types,
            TypeSelection::All
        );
    }

    #[test]
    fn lenient_type_filter_never_widens() {
        // Observation's only filter is unusable: Observation goes, Patient (filtered) stays.
        let k = lenient(
            Level::System,
            "_type=Patient,Observation&_typeFilter=Observation%3F_count%3D5,Patient%3Fgender%3Dmale",
        )
        .unwrap();
        assert_eq!(k.spec.types, TypeSelection::Only(vec!["Patient".into()]));
        assert!(
            k.notes
                .iter()
                .any(|n| n.contains("not exported: Observation")),
            "{:?}",
            k.notes
        );
        // Without _type, every other type is still exported, Observation is not.
        let k = lenient(Level::System, "_typeFilter=Observation%3F_count%3D5").unwrap();
        assert_eq!(
            k.spec.types,
            TypeSelection::Only(vec!["Patient".into(), "Practitioner".into()])
        );
        let k = lenient(Level::System, "_typeFilter=Observation").unwrap();
        assert!(!k.spec.types.includes("Observation"));
        // One usable filter left: the type stays, narrowed to it.
        let k = lenient(
            Level::System,
            "_type=Observation&_typeFilter=Observation%3F_sort%3Dx,Observation%3Fcode%3Da",
        )
        .unwrap();
        assert_eq!(
            k.spec.types,
            TypeSelection::Only(vec!["Observation".into()])
        );
        assert_eq!(
            k.spec.type_filters,
            [("Observation".into(), "code=a".into())]
        );
        // The only requested type lost its filters: nothing is left to export.
        assert_eq!(
            param_error(lenient(
                Level::System,
                "_type=Observation&_typeFilter=Observation%3F_count%3D5"
            )),
            "_typeFilter"
        );
    }

    #[test]
    fn filters_the_upstream_does_not_list_are_refused() {
        let error = get(
            Level::System,
            "_type=Patient&_typeFilter=Patient%3Fstatus%3Dactive",
        )
        .unwrap_err();
        assert!(
            matches!(&error, KickoffError::Param { name, reason } if name == "_typeFilter" && reason.contains("\"status\"")),
            "{error:?}"
        );
        for query in [
            "Observation%3Fpatient.status%3Dx",
            "Observation%3Fcode%3Abogus%3Dx",
            "Observation%3F_has%3AEncounter%3Asubject%3Astatus%3Dx",
        ] {
            assert_eq!(
                param_error(get(Level::System, &format!("_typeFilter={query}"))),
                "_typeFilter",
                "{query}"
            );
        }
        let k = get(
            Level::System,
            "_typeFilter=Observation%3Fpatient.gender%3Dfemale%26code%3Amissing%3Dfalse%26_lastUpdated%3Dgt2020",
        )
        .unwrap();
        assert_eq!(k.spec.type_filters.len(), 1);
    }

    #[test]
    fn lenient_drops_an_unlisted_filter_without_widening() {
        let k = lenient(
            Level::System,
            "_type=Patient&_typeFilter=Patient%3Fstatus%3Dactive,Patient%3Fgender%3Dfemale",
        )
        .unwrap();
        assert_eq!(
            k.spec.type_filters,
            [("Patient".into(), "gender=female".into())]
        );
        assert!(
            k.notes.iter().any(|n| n.contains("\"status\"")),
            "{:?}",
            k.notes
        );
        // The only filter dropped: nothing is left, rather than every patient.
        assert_eq!(
            param_error(lenient(
                Level::System,
                "_type=Patient&_typeFilter=Patient%3Fstatus%3Dactive"
            )),
            "_typeFilter"
        );
    }

    #[test]
    fn since_in_the_future_is_refused_also_when_lenient() {
        for k in [
            get(Level::System, "_since=2099-01-01T00:00:00Z"),
            lenient(Level::System, "_since=2099-01-01T00:00:00Z"),
        ] {
            assert_eq!(param_error(k), "_since");
        }
        assert!(get(Level::System, "_since=2020-01-01T00:00:00Z").is_ok());
    }

    #[test]
    fn until_bounds_the_export_and_is_checked_like_since() {
        let k = get(Level::System, "_until=2024-01-01T10:00:00%2B02:00").unwrap();
        assert_eq!(k.spec.until.as_deref(), Some("2024-01-01T08:00:00.000Z"));
        // A bound past the transaction time is no bound, not an error.
        assert!(get(Level::System, "_until=2099-01-01T00:00:00Z").is_ok());
        let k = get(
            Level::System,
            "_since=2023-01-01T00:00:00Z&_until=2024-01-01T00:00:00Z",
        )
        .unwrap();
        assert_eq!(
            (k.spec.since.as_deref(), k.spec.until.as_deref()),
            (
                Some("2023-01-01T00:00:00.000Z"),
                Some("2024-01-01T00:00:00.000Z")
            )
        );
        assert_eq!(
            param_error(get(
                Level::System,
                "_until=2024-01-01T00:00:00Z&_until=2025-01-01T00:00:00Z"
            )),
            "_until"
        );
        // Ignoring any of these would widen the export: refused also when lenient.
        for query in [
            "_until=yesterday",
            "_since=2024-01-01T00:00:00Z&_until=2024-01-01T00:00:00Z",
            "_until=2023-01-01T00:00:00Z&_since=2024-01-01T00:00:00Z",
        ] {
            assert_eq!(param_error(get(Level::System, query)), "_until", "{query}");
            assert_eq!(
                param_error(lenient(Level::System, query)),
                "_until",
                "{query}"
            );
        }
    }

    #[test]
    fn lenient_patient_never_widens() {
        let one = |reference: &str| {
            format!(
                r#"{{"resourceType":"Parameters","parameter":[{{"name":"patient","valueReference":{{"reference":"{reference}"}}}}]}}"#
            )
        };
        for level in [Level::Patient, Level::Group { id: "g".into() }] {
            assert_eq!(
                param_error(lenient_post(
                    level.clone(),
                    &one("https://evil.example/Patient/x")
                )),
                "patient"
            );
            assert_eq!(
                param_error(lenient(level.clone(), "patient=Patient/p1")),
                "patient"
            );
        }
        assert_eq!(
            param_error(lenient_post(Level::System, &one("Patient/p1"))),
            "patient"
        );
        let two = r#"{"resourceType":"Parameters","parameter":[
            {"name":"patient","valueReference":{"reference":"Patient/p1"}},
            {"name":"patient","valueReference":{"reference":"https://evil.example/Patient/x"}}]}"#;
        let k = lenient_post(Level::Patient, two).unwrap();
        assert_eq!(k.spec.patients, ["p1"]);
        assert_eq!(k.notes.len(), 1);
    }

    #[test]
    fn post_takes_parameters_with_patients() {
        let body = br#"{"resourceType":"Parameters","parameter":[
            {"name":"_type","valueString":"Observation"},
            {"name":"patient","valueReference":{"reference":"Patient/p1"}},
            {"name":"_since","valueInstant":"2024-01-01T00:00:00Z"}]}"#;
        let k = parse(
            Level::Patient,
            &headers("respond-async"),
            None,
            Some(body),
            &cap(),
            UnsearchableType::Reject,
        )
        .unwrap();
        assert_eq!(k.spec.patients, ["p1"]);
        assert_eq!(
            k.spec.types,
            TypeSelection::Only(vec!["Observation".into()])
        );
        assert!(matches!(
            parse(
                Level::Patient,
                &headers("respond-async"),
                None,
                Some(b"{}"),
                &cap(),
                UnsearchableType::Reject
            ),
            Err(KickoffError::Body(_))
        ));
        assert!(matches!(
            parse(
                Level::Patient,
                &headers("respond-async"),
                None,
                Some(b"\xff"),
                &cap(),
                UnsearchableType::Reject
            ),
            Err(KickoffError::Body(_))
        ));
        let system_patient = br#"{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{"reference":"Patient/p1"}}]}"#;
        assert_eq!(
            param_error(parse(
                Level::System,
                &headers("respond-async"),
                None,
                Some(system_patient),
                &cap(),
                UnsearchableType::Reject
            )),
            "patient"
        );
        // Objects without the expected member must be refused, not indexed blindly.
        for body in [
            r#"{"resourceType":"Parameters","parameter":[{"name":"patient","valueReference":{}}]}"#,
            r#"{"resourceType":"Parameters","parameter":[{"name":"_type","valueInteger":{}}]}"#,
        ] {
            assert!(parse(
                Level::Patient,
                &headers("respond-async"),
                None,
                Some(body.as_bytes()),
                &cap(),
                UnsearchableType::Reject
            )
            .is_err());
        }
    }

    #[test]
    fn include_associated_data_takes_lists_and_repeats_and_refuses_other_codes() {
        let mut with_provenance = cap();
        with_provenance.types.insert(
            "Provenance".into(),
            ["_id", "target", "patient"].map(String::from).into(),
        );
        let kickoff = |prefer: &'static str, query: &str, capability: &Capability| {
            let query = query.to_owned();
            parse(
                Level::Patient,
                &headers(prefer),
                Some(&query),
                None,
                capability,
                UnsearchableType::Reject,
            )
        };
        let strict = |query: &str| kickoff("respond-async", query, &with_provenance);
        let lenient =
            |query: &str| kickoff("respond-async,handling=lenient", query, &with_provenance);
        assert_eq!(strict("_type=Observation").unwrap().spec.associated, None);
        assert_eq!(
            strict("includeAssociatedData=LatestProvenanceResources")
                .unwrap()
                .spec
                .associated,
            Some(AssociatedData::LatestProvenance)
        );
        for both in [
            "includeAssociatedData=LatestProvenanceResources,RelevantProvenanceResources",
            "includeAssociatedData=RelevantProvenanceResources&includeAssociatedData=LatestProvenanceResources",
        ] {
            assert_eq!(
                strict(both).unwrap().spec.associated,
                Some(AssociatedData::RelevantProvenance),
                "{both}"
            );
        }
        for bad in [
            "includeAssociatedData=_foo",
            "includeAssociatedData=LatestProvenanceResources,Other",
            "includeAssociatedData=",
        ] {
            assert_eq!(param_error(strict(bad)), "includeAssociatedData", "{bad}");
        }
        let k = lenient("includeAssociatedData=_foo,RelevantProvenanceResources").unwrap();
        assert_eq!(k.spec.associated, Some(AssociatedData::RelevantProvenance));
        assert_eq!(k.notes.len(), 1);
        assert!(k.notes[0].contains("\"_foo\""), "{:?}", k.notes);
        // An upstream that cannot search Provenance by target cannot give them.
        let without = |prefer| {
            kickoff(
                prefer,
                "includeAssociatedData=LatestProvenanceResources",
                &cap(),
            )
        };
        assert_eq!(
            param_error(without("respond-async")),
            "includeAssociatedData"
        );
        let k = without("respond-async,handling=lenient").unwrap();
        assert_eq!(k.spec.associated, None);
        assert!(
            k.notes[0].contains("cannot search Provenance"),
            "{:?}",
            k.notes
        );
    }
}
