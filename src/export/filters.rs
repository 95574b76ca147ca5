//! Search parameters of a `_typeFilter` query: what they name, which resource types they read, and
//! whether the upstream says it supports them.
//!
//! A chained (`subject:Patient.gender`) or reverse-chained (`_has:DiagnosticReport:result:status`)
//! parameter selects resources by the contents of other resources, so the export it filters reveals
//! those: the types it traverses are read as surely as the exported one.

use std::collections::BTreeSet;

use crate::upstream::Capability;

/// Parameters every resource type has, which a CapabilityStatement need not list.
const COMMON: [&str; 6] = [
    "_id",
    "_lastUpdated",
    "_tag",
    "_profile",
    "_security",
    "_has",
];

/// R4 search modifiers (a resource type name is a modifier of reference parameters too).
const MODIFIERS: [&str; 11] = [
    "missing",
    "exact",
    "contains",
    "text",
    "not",
    "above",
    "below",
    "in",
    "not-in",
    "of-type",
    "identifier",
];

/// Parameters a server may add to or drop from a page's self link without the search selecting more.
const PAGING: [&str; 5] = ["_count", "_offset", "_sort", "_total", "_format"];

/// Chains longer than this are refused: no real query needs them, and parsing stays shallow.
const MAX_LINKS: usize = 8;

/// One search parameter of a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The name as given, modifiers and chain included (`subject:Patient.gender`).
    pub raw: String,
    /// What the name says.
    pub key: Key,
    /// The comma-separated values (OR-ed), `\,` left escaped.
    pub values: Vec<String>,
}

/// A parameter name taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// `name[:modifier]`, chained to `then` when followed by `.`: then `modifier` is the target type.
    Plain {
        /// Parameter name.
        name: String,
        /// Modifier or, in a chain, the referenced type.
        modifier: Option<String>,
        /// The rest of the chain, searched on the referenced resources.
        then: Option<Box<Key>>,
    },
    /// `_has:Type:reference:key`: resources that a `Type` refers to through `reference` and matches `key`.
    Reverse {
        /// The referring type.
        resource_type: String,
        /// Its reference parameter pointing back.
        reference: String,
        /// What the referring resources must match.
        key: Box<Key>,
    },
}

/// Which resource types a parameter reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reads {
    /// These types (the filtered type itself not counted).
    Types(BTreeSet<String>),
    /// Types that cannot be known beforehand: any.
    Any,
}

impl Reads {
    fn add(&mut self, t: &str) {
        if let Reads::Types(set) = self {
            set.insert(t.to_owned());
        }
    }
}

/// Parses a query string (`a=1&b:exact=x`) into its parameters; `Err` names one that is not a
/// well-formed parameter name.
pub fn parse_query(query: &str) -> Result<Vec<Param>, String> {
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(k, v)| {
            let key = parse_key(&k).ok_or_else(|| k.clone().into_owned())?;
            Ok(Param {
                raw: k.into_owned(),
                key,
                values: split_values(&v),
            })
        })
        .collect()
}

/// `name` taken apart; `None` if it is malformed or chains more than `MAX_LINKS` deep.
pub fn parse_key(name: &str) -> Option<Key> {
    key_at(name, 0)
}

fn key_at(name: &str, depth: usize) -> Option<Key> {
    if depth >= MAX_LINKS || name.is_empty() {
        return None;
    }
    if let Some(rest) = name.strip_prefix("_has:") {
        let mut parts = rest.splitn(3, ':');
        let (resource_type, reference, key) = (parts.next()?, parts.next()?, parts.next()?);
        if !is_type(resource_type) || !is_name(reference) {
            return None;
        }
        return Some(Key::Reverse {
            resource_type: resource_type.to_owned(),
            reference: reference.to_owned(),
            key: Box::new(key_at(key, depth + 1)?),
        });
    }
    let (head, then) = match name.split_once('.') {
        Some((head, rest)) => (head, Some(Box::new(key_at(rest, depth + 1)?))),
        None => (name, None),
    };
    let (name, modifier) = match head.split_once(':') {
        Some((n, m)) => (n, Some(m)),
        None => (head, None),
    };
    let modifier_ok =
        modifier.is_none_or(|m| is_type(m) || (then.is_none() && MODIFIERS.contains(&m)));
    if !is_name(name) || !modifier_ok {
        return None;
    }
    Some(Key::Plain {
        name: name.to_owned(),
        modifier: modifier.map(str::to_owned),
        then,
    })
}

/// Each parameter of `query`, a search of `base`, with the types other than `base` it reads: its chains
/// and `_has`, and what `_include`, `_revinclude` and `_list` bring in. A name that cannot be taken
/// apart, `_filter` and `_query` read what cannot be known beforehand.
pub fn query_reads(query: &str, base: &str, capability: &Capability) -> Vec<(String, Reads)> {
    url::form_urlencoded::parse(query.as_bytes())
        .map(|(name, value)| {
            let reads = match name.split_once(':').map_or(name.as_ref(), |(n, _)| n) {
                "_include" => include_reads(&name, &value, capability, false),
                "_revinclude" => include_reads(&name, &value, capability, true),
                "_list" => Reads::Types(BTreeSet::from(["List".to_owned()])),
                "_filter" | "_query" => Reads::Any,
                _ => match parse_key(&name) {
                    Some(key) => reads(&key, base, capability),
                    None => Reads::Any,
                },
            };
            (name.into_owned(), reads)
        })
        .collect()
}

/// What `_include=Type:param[:target]` (or `_revinclude`, which brings in `Type` itself) reads;
/// `:iterate` follows references of the included too, so it may reach any type.
fn include_reads(name: &str, value: &str, capability: &Capability, reverse: bool) -> Reads {
    let mut parts = value.split(':');
    let (Some(t), Some(param), target) = (parts.next(), parts.next(), parts.next()) else {
        return Reads::Any;
    };
    let iterate = name.ends_with(":iterate") || name.ends_with(":recurse");
    if iterate || !is_type(t) || param == "*" {
        return Reads::Any;
    }
    if reverse {
        return Reads::Types(BTreeSet::from([t.to_owned()]));
    }
    match chain_targets(capability, t, param, target) {
        Some(types) => Reads::Types(types),
        None => Reads::Any,
    }
}

/// The types other than `base` that `key` on `base` reads.
pub fn reads(key: &Key, base: &str, capability: &Capability) -> Reads {
    let mut out = Reads::Types(BTreeSet::new());
    collect_reads(key, base, capability, &mut out);
    out
}

fn collect_reads(key: &Key, base: &str, capability: &Capability, out: &mut Reads) {
    match key {
        Key::Plain {
            then: Some(then),
            name,
            modifier,
        } => {
            let Some(targets) = chain_targets(capability, base, name, modifier.as_deref()) else {
                *out = Reads::Any;
                return;
            };
            for t in &targets {
                out.add(t);
                collect_reads(then, t, capability, out);
            }
        }
        Key::Plain { then: None, .. } => {}
        Key::Reverse {
            resource_type, key, ..
        } => {
            out.add(resource_type);
            collect_reads(key, resource_type, capability, out);
        }
    }
}

/// Why the upstream cannot be trusted to apply `key` on `base`, if it cannot: a parameter (or a
/// link of a chain) its CapabilityStatement does not list, which it might silently ignore.
pub fn unsupported(key: &Key, base: &str, capability: &Capability) -> Option<String> {
    let listed = |t: &str, name: &str| {
        COMMON.contains(&name) || capability.types.get(t).is_some_and(|p| p.contains(name))
    };
    match key {
        Key::Plain {
            name,
            then,
            modifier,
        } => {
            if !listed(base, name) {
                return Some(format!(
                    "{name:?} is not a search parameter the upstream lists for {base}"
                ));
            }
            let then = then.as_deref()?;
            let targets = chain_targets(capability, base, name, modifier.as_deref())?;
            // With several possible targets the upstream applies the chain to whichever has the parameter.
            let [target] = targets.iter().collect::<Vec<_>>()[..] else {
                return None;
            };
            if !capability.types.contains_key(target) {
                return Some(format!("{target} is not a type the upstream can search"));
            }
            unsupported(then, target, capability)
        }
        Key::Reverse {
            resource_type,
            reference,
            key,
        } => {
            if !capability.types.contains_key(resource_type) {
                return Some(format!(
                    "{resource_type} is not a type the upstream can search"
                ));
            }
            if !listed(resource_type, reference) {
                return Some(format!(
                    "{reference:?} is not a search parameter the upstream lists for {resource_type}"
                ));
            }
            unsupported(key, resource_type, capability)
        }
    }
}

/// The parameter names of `sent` (a search URL) that `self_link` (the page's `Bundle.link[self]`)
/// no longer has: parameters the upstream ignored. Paging parameters do not count; a page without a
/// self link cannot be judged and gives none.
pub fn dropped(sent: &str, self_link: Option<&str>) -> Vec<String> {
    let names = |url: &str| -> BTreeSet<String> {
        let query = url.split_once('?').map_or("", |(_, q)| q);
        url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, _)| k.into_owned())
            .filter(|k| !PAGING.contains(&k.as_str()))
            .collect()
    };
    let Some(self_link) = self_link else {
        return Vec::new();
    };
    let kept = names(self_link);
    names(sent)
        .into_iter()
        .filter(|k| !kept.contains(k))
        .collect()
}

/// Where a chain link `name[:modifier]` of `base` leads: the type its modifier names, else
/// [`targets`].
fn chain_targets(
    capability: &Capability,
    base: &str,
    name: &str,
    modifier: Option<&str>,
) -> Option<BTreeSet<String>> {
    match modifier {
        Some(t) => Some(BTreeSet::from([t.to_owned()])),
        None => targets(capability, base, name),
    }
}

/// The types a reference parameter `name` of `base` may point to: the CapabilityStatement's `target`
/// where it gives one, else R4's definition where this module knows it; `None` when unknown.
fn targets(capability: &Capability, base: &str, name: &str) -> Option<BTreeSet<String>> {
    if let Some(t) = capability.targets.get(base).and_then(|p| p.get(name)) {
        return Some(t.clone());
    }
    let r4: &[&str] = match (base, name) {
        (_, "patient") => &["Patient"],
        (_, "organization") => &["Organization"],
        (_, "practitioner") => &["Practitioner"],
        (_, "location") => &["Location"],
        (_, "medication") => &["Medication"],
        (_, "specimen") => &["Specimen"],
        (_, "device") => &["Device"],
        (_, "encounter") => &["Encounter", "EpisodeOfCare"],
        ("DiagnosticReport", "result") => &["Observation"],
        ("Patient", "general-practitioner") => {
            &["Organization", "Practitioner", "PractitionerRole"]
        }
        (
            "Condition"
            | "Encounter"
            | "Procedure"
            | "MedicationRequest"
            | "MedicationAdministration"
            | "MedicationDispense"
            | "MedicationStatement"
            | "CarePlan"
            | "CareTeam"
            | "RiskAssessment"
            | "ClinicalImpression",
            "subject",
        ) => &["Group", "Patient"],
        (
            "Observation" | "DiagnosticReport" | "ServiceRequest" | "DeviceRequest" | "List",
            "subject",
        ) => &["Device", "Group", "Location", "Patient"],
        ("DocumentReference", "subject") => &["Device", "Group", "Patient", "Practitioner"],
        ("Goal", "subject") => &["Group", "Organization", "Patient"],
        ("Specimen", "subject") => &["Device", "Group", "Location", "Patient", "Substance"],
        _ => return None,
    };
    Some(r4.iter().map(|t| (*t).to_owned()).collect())
}

/// Values split at commas not escaped with `\`.
fn split_values(value: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut escaped = false;
    for c in value.chars() {
        match c {
            ',' if !escaped => out.push(String::new()),
            _ => out.last_mut().expect("never empty").push(c),
        }
        escaped = c == '\\' && !escaped;
    }
    out
}

/// A resource type name: an upper-case ASCII letter, then letters.
fn is_type(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphabetic())
}

/// A search parameter name: letters, digits, `-` and `_`.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap() -> Capability {
        let mut c = Capability::default();
        for (t, params) in [
            (
                "Patient",
                vec![
                    "gender",
                    "birthdate",
                    "organization",
                    "general-practitioner",
                ],
            ),
            (
                "Observation",
                vec!["patient", "subject", "code", "performer"],
            ),
            ("DiagnosticReport", vec!["result", "status", "subject"]),
            ("Organization", vec!["name", "partof"]),
        ] {
            c.types
                .insert(t.into(), params.into_iter().map(String::from).collect());
        }
        c
    }

    fn reads_of(base: &str, name: &str) -> Reads {
        reads(&parse_key(name).unwrap(), base, &cap())
    }

    fn types(list: &[&str]) -> Reads {
        Reads::Types(list.iter().map(|t| (*t).to_owned()).collect())
    }

    #[test]
    fn chains_read_every_type_they_pass() {
        assert_eq!(reads_of("Observation", "code"), types(&[]));
        assert_eq!(reads_of("Observation", "subject:Patient"), types(&[]));
        assert_eq!(
            reads_of("Observation", "subject:Patient.gender"),
            types(&["Patient"])
        );
        assert_eq!(
            reads_of("Observation", "patient.birthdate"),
            types(&["Patient"])
        );
        assert_eq!(
            reads_of("Observation", "subject.gender"),
            types(&["Device", "Group", "Location", "Patient"])
        );
        assert_eq!(
            reads_of("Observation", "patient.organization.name"),
            types(&["Organization", "Patient"])
        );
        assert_eq!(
            reads_of(
                "Observation",
                "subject:Patient.organization:Organization.name"
            ),
            types(&["Organization", "Patient"])
        );
        assert_eq!(
            reads_of("Observation", "patient.organization.partof.name"),
            Reads::Any
        );
        assert_eq!(reads_of("Observation", "performer.name"), Reads::Any);
        assert_eq!(
            reads_of("Observation", "_has:DiagnosticReport:result:status"),
            types(&["DiagnosticReport"])
        );
        assert_eq!(
            reads_of(
                "Patient",
                "_has:Observation:patient:_has:DiagnosticReport:result:status"
            ),
            types(&["DiagnosticReport", "Observation"])
        );
        assert_eq!(
            reads_of(
                "Patient",
                "_has:Observation:patient:performer:Organization.name"
            ),
            types(&["Observation", "Organization"])
        );
    }

    #[test]
    fn includes_and_lists_read_what_they_bring_in() {
        let of = |query: &str| -> Vec<Reads> {
            query_reads(query, "Observation", &cap())
                .into_iter()
                .map(|(_, r)| r)
                .collect()
        };
        assert_eq!(
            of("code=x&subject:Patient.gender=female"),
            [types(&[]), types(&["Patient"])]
        );
        assert_eq!(of("_include=Observation:patient"), [types(&["Patient"])]);
        assert_eq!(
            of("_include=Observation:subject:Group"),
            [types(&["Group"])]
        );
        assert_eq!(
            of("_revinclude=DiagnosticReport:result"),
            [types(&["DiagnosticReport"])]
        );
        for any in [
            "_include=*",
            "_include=Observation:performer",
            "_include:iterate=Observation:patient",
            "_filter=subject.gender eq female",
            "a..b=1",
        ] {
            assert_eq!(of(any), [Reads::Any], "{any}");
        }
        assert_eq!(of("_list=l1"), [types(&["List"])]);
    }

    #[test]
    fn targets_in_the_statement_win() {
        let mut c = cap();
        c.targets
            .entry("Observation".into())
            .or_default()
            .insert("performer".into(), BTreeSet::from(["Practitioner".into()]));
        let key = parse_key("performer.name").unwrap();
        assert_eq!(reads(&key, "Observation", &c), types(&["Practitioner"]));
    }

    #[test]
    fn malformed_names_are_refused() {
        let deep = "a.".repeat(20) + "b";
        for name in [
            "",
            "a..b",
            "code:bogus",
            "subject:missing.gender",
            "_has:DiagnosticReport:result",
            "_has:diagnosticReport:result:status",
            "a=b",
            &deep,
        ] {
            assert_eq!(parse_key(name), None, "{name:?}");
        }
        assert_eq!(
            parse_query("code:exact=a,b%5C,c").unwrap()[0].values,
            ["a", "b\\,c"]
        );
    }

    #[test]
    fn only_listed_parameters_are_supported() {
        let check = |base: &str, name: &str| unsupported(&parse_key(name).unwrap(), base, &cap());
        assert_eq!(check("Patient", "gender"), None);
        assert_eq!(check("Patient", "_lastUpdated"), None);
        assert_eq!(check("Observation", "code:missing"), None);
        assert!(check("Patient", "status").unwrap().contains("\"status\""));
        assert_eq!(check("Observation", "patient.birthdate"), None);
        assert!(check("Observation", "patient.status")
            .unwrap()
            .contains("\"status\""));
        assert!(check("Observation", "specimen.x").is_some());
        assert_eq!(
            check("Observation", "_has:DiagnosticReport:result:status"),
            None
        );
        assert!(check("Observation", "_has:DiagnosticReport:result:bogus").is_some());
        assert!(check("Observation", "_has:DiagnosticReport:based-on:status").is_some());
        assert!(check("Observation", "_has:Encounter:subject:status").is_some());
    }

    #[test]
    fn dropped_parameters_are_found_in_the_self_link() {
        let sent = "http://u/fhir/Patient?status=active&gender=female&_count=5";
        assert_eq!(
            dropped(
                sent,
                Some("http://u/fhir/Patient?gender=female&_count=5&_offset=0")
            ),
            ["status"]
        );
        assert!(dropped(
            "http://u/fhir/Observation?subject%3APatient.gender=female&_count=5",
            Some("http://u/fhir/Observation?subject:Patient.gender=female&_offset=0")
        )
        .is_empty());
        assert!(dropped(sent, None).is_empty());
    }
}
