//! A submitted Group checked against the Bulk Cohort Group profile, and its member-filter expressions
//! parsed and checked against what the upstream can search.

use serde_json::Value;

use super::{CohortFailure, Filter, MEMBER_FILTER_URL};
use crate::export::compartment;
use crate::export::filters::{parse_query, unsupported};
use crate::upstream::Capability;

/// Search parameters that change what a page holds or how it is paged rather than which resources
/// match: the proxy pages and reads the matches itself, so they are refused in an expression.
const RESULT_PARAMS: [&str; 12] = [
    "_count",
    "_offset",
    "_sort",
    "_total",
    "_format",
    "_elements",
    "_summary",
    "_include",
    "_revinclude",
    "_contained",
    "_containedType",
    "_pretty",
];

/// Whether `group` (a parsed request body) asks for a cohort: a Group with a member-filter modifier
/// extension. Anything else is ordinary Group traffic for the upstream.
pub fn is_cohort_request(group: &Value) -> bool {
    group["resourceType"] == "Group" && member_filters(group).next().is_some()
}

fn member_filters(group: &Value) -> impl Iterator<Item = &Value> {
    let extensions = group["modifierExtension"].as_array().into_iter().flatten();
    extensions.filter(|e| e["url"] == MEMBER_FILTER_URL)
}

/// The definition to store (the Group without `id`, `meta` or members) and its filters, once `group`
/// conforms to the profile and every filter is a search the upstream supports.
pub fn definition(
    group: &Value,
    capability: &Capability,
) -> Result<(Value, Vec<Filter>), CohortFailure> {
    let invalid = |m: &str| Err(CohortFailure::Invalid(m.to_owned()));
    if group["type"] != "person" {
        return invalid(
            "a cohort Group must have type \"person\" (the proxy computes patient cohorts)",
        );
    }
    if group["actual"] != false {
        return invalid(
            "a cohort Group must have actual = false: its members are computed, not given",
        );
    }
    if group["name"].as_str().is_none_or(|n| n.trim().is_empty()) {
        return invalid("a cohort Group must have a name");
    }
    if group
        .get("member")
        .is_some_and(|m| m != &Value::Array(Vec::new()))
    {
        return invalid(
            "a cohort Group must not list members: they are computed from its member-filters",
        );
    }
    if group.get("characteristic").is_some() {
        return invalid("the Bulk Cohort Group profile does not use characteristic; use member-filter extensions");
    }
    let mut filters = Vec::new();
    for extension in member_filters(group) {
        let expression = &extension["valueExpression"];
        if expression["language"] != "application/x-fhir-query" {
            return invalid(
                "a member-filter's valueExpression must have language application/x-fhir-query",
            );
        }
        let Some(text) = expression["expression"].as_str() else {
            return invalid("a member-filter's valueExpression has no expression");
        };
        filters.push(filter(text, capability)?);
    }
    let mut definition = group.clone();
    if let Some(fields) = definition.as_object_mut() {
        for field in ["id", "meta", "member", "quantity", "text"] {
            fields.remove(field);
        }
    }
    Ok((definition, filters))
}

/// One expression `Type?params` checked: `Type` is `Patient` or linked to a patient, every parameter is
/// one the upstream lists for it (modifiers, chains and `_has` checked link by link).
pub fn filter(expression: &str, capability: &Capability) -> Result<Filter, CohortFailure> {
    let malformed = |why: &str| {
        CohortFailure::Invalid(format!(
            "member-filter expression {expression:?} is malformed: {why}"
        ))
    };
    let (resource_type, query) = expression
        .split_once('?')
        .ok_or_else(|| malformed("it must be Type?parameters"))?;
    if !crate::fhir_types::is_resource_type(resource_type) {
        return Err(malformed("it does not start with a resource type"));
    }
    if query.is_empty() {
        return Err(malformed("it has no search parameters"));
    }
    let Some(params) = capability.types.get(resource_type) else {
        return Err(CohortFailure::Unsupported(format!(
            "member-filter expression {expression:?} searches {resource_type}, which the upstream cannot search"
        )));
    };
    if resource_type != "Patient" && compartment::patient_param(resource_type, params).is_none() {
        return Err(CohortFailure::Unsupported(format!(
            "member-filter expression {expression:?} searches {resource_type}, which is not linked to a patient on the upstream"
        )));
    }
    let parsed = parse_query(query)
        .map_err(|name| malformed(&format!("{name:?} is not a search parameter name")))?;
    for param in &parsed {
        let base = param.raw.split([':', '.']).next().unwrap_or_default();
        if RESULT_PARAMS.contains(&base) || base == "_filter" || base == "_query" {
            return Err(CohortFailure::Unsupported(format!(
                "member-filter expression {expression:?} uses {base}, which selects no patients (result and paging parameters are the proxy's)"
            )));
        }
        if param.values.iter().all(|v| v.is_empty()) {
            return Err(malformed(&format!("{:?} has no value", param.raw)));
        }
        if let Some(why) = unsupported(&param.key, resource_type, capability) {
            return Err(CohortFailure::Unsupported(format!(
                "member-filter expression {expression:?}: {why}"
            )));
        }
    }
    Ok(Filter {
        expression: expression.to_owned(),
        resource_type: resource_type.to_owned(),
        query: query.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn capability() -> Capability {
        let mut cap = Capability::default();
        for (t, params) in [
            ("Patient", &["gender", "birthdate", "name"][..]),
            ("Condition", &["code", "patient", "subject"][..]),
            ("Organization", &["name"][..]),
        ] {
            cap.types
                .insert(t.into(), params.iter().map(|p| p.to_string()).collect());
        }
        cap
    }

    fn group(filters: &[&str]) -> Value {
        json!({
            "resourceType": "Group",
            "type": "person",
            "actual": false,
            "name": "diabetics",
            "modifierExtension": filters.iter().map(|f| json!({
                "url": MEMBER_FILTER_URL,
                "valueExpression": {"language": "application/x-fhir-query", "expression": f}
            })).collect::<Vec<_>>(),
        })
    }

    #[test]
    fn a_conforming_group_gives_its_filters_in_order() {
        let g = group(&["Condition?code=44054006", "Patient?gender=female"]);
        assert!(is_cohort_request(&g));
        let (definition, filters) = definition(&g, &capability()).unwrap();
        assert_eq!(filters.len(), 2);
        assert_eq!(filters[0].resource_type, "Condition");
        assert_eq!(filters[0].query, "code=44054006");
        assert_eq!(filters[1].resource_type, "Patient");
        assert_eq!(definition["name"], "diabetics");
    }

    #[test]
    fn groups_without_member_filters_are_not_cohorts() {
        assert!(!is_cohort_request(&group(&[])));
        assert!(!is_cohort_request(&json!({"resourceType": "Patient"})));
        let mut other = group(&["Patient?gender=male"]);
        other["modifierExtension"][0]["url"] = json!("http://example.org/x");
        assert!(!is_cohort_request(&other));
    }

    #[test]
    fn profile_violations_are_invalid() {
        let cap = capability();
        for edit in [
            |g: &mut Value| g["type"] = json!("device"),
            |g: &mut Value| g["actual"] = json!(true),
            |g: &mut Value| {
                g.as_object_mut().unwrap().remove("name");
            },
            |g: &mut Value| g["member"] = json!([{"entity": {"reference": "Patient/1"}}]),
            |g: &mut Value| {
                g["modifierExtension"][0]["valueExpression"]["language"] = json!("text/fhirpath")
            },
        ] {
            let mut g = group(&["Patient?gender=male"]);
            edit(&mut g);
            assert!(
                matches!(definition(&g, &cap), Err(CohortFailure::Invalid(_))),
                "{g}"
            );
        }
    }

    #[test]
    fn expressions_are_checked_against_the_upstream() {
        let cap = capability();
        for bad in [
            "Condition",
            "condition?code=1",
            "?code=1",
            "Condition?",
            "Condition?a b=1",
        ] {
            assert!(
                matches!(filter(bad, &cap), Err(CohortFailure::Invalid(_))),
                "{bad}"
            );
        }
        for unsupported in [
            "Condition?severity=x",
            "Organization?name=x",
            "Encounter?status=finished",
            "Patient?_count=5",
            "Condition?code=1&_include=Condition:subject",
        ] {
            assert!(
                matches!(
                    filter(unsupported, &cap),
                    Err(CohortFailure::Unsupported(_))
                ),
                "{unsupported}"
            );
        }
        assert!(filter("Patient?gender=female&birthdate=lt1970", &cap).is_ok());
        assert!(filter("Condition?code:text=diabetes&_lastUpdated=gt2020", &cap).is_ok());
    }
}
