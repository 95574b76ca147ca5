//! What a pass-through request needs from a token's scopes (`pass_through = "require-token"`).
//!
//! The request is read as the FHIR REST interaction its method and normalised path name. Where one
//! request can touch types its path does not name (batches and transactions, system-level search and
//! history, operations), it needs the permissions on every type (`system/*`): the proxy cannot tell
//! what they will read or write without running them.

use std::borrow::Cow;

use hyper::Method;

use super::scopes::{Grant, ALL, CREATE, DELETE, READ, SEARCH, UPDATE};

/// One permission a request needs: `permissions` on `resource_type`, or on every type when `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Need {
    /// The resource type, `None` for all.
    pub resource_type: Option<String>,
    /// SMART v2 permission bits.
    pub permissions: u8,
}

/// What `method` on `segments` (the path after the FHIR base) needs; empty when any valid token will do.
pub fn needs(method: &Method, segments: &[Cow<'_, str>]) -> Vec<Need> {
    let s: Vec<&str> = segments.iter().map(|s| s.as_ref()).collect();
    let reads = matches!(*method, Method::GET | Method::HEAD);
    let on = |t: &str, permissions| Need {
        resource_type: Some(t.to_owned()),
        permissions,
    };
    let everything = |permissions| {
        vec![Need {
            resource_type: None,
            permissions,
        }]
    };
    let any_type = if reads { READ | SEARCH } else { ALL };
    match s.as_slice() {
        ["metadata"] if reads => Vec::new(),
        [t, ..] if !is_type(t) => everything(any_type),
        [t] => match *method {
            Method::GET | Method::HEAD => vec![on(t, SEARCH)],
            Method::POST => vec![on(t, CREATE)],
            // Conditional update and delete first search for their target.
            Method::PUT | Method::PATCH => vec![on(t, SEARCH | UPDATE)],
            Method::DELETE => vec![on(t, SEARCH | DELETE)],
            _ => everything(ALL),
        },
        [t, "_search"] if *method == Method::POST => vec![on(t, SEARCH)],
        [t, "_history"] if reads => vec![on(t, READ)],
        [t, id] if !id.starts_with(['$', '_']) => match *method {
            Method::GET | Method::HEAD => vec![on(t, READ)],
            Method::PUT | Method::PATCH => vec![on(t, UPDATE)],
            Method::DELETE => vec![on(t, DELETE)],
            _ => everything(ALL),
        },
        [t, id, "_history"] | [t, id, "_history", _] if reads && !id.starts_with(['$', '_']) => {
            vec![on(t, READ)]
        }
        // A compartment search reads the compartment's owner and searches the target type.
        [t, id, target] if reads && is_type(target) && !id.starts_with(['$', '_']) => {
            vec![on(t, READ), on(target, SEARCH)]
        }
        _ => everything(any_type),
    }
}

/// The first need of `needs` that `grant` does not meet.
pub fn unmet<'a>(grant: &Grant, needs: &'a [Need]) -> Option<&'a Need> {
    needs
        .iter()
        .find(|n| !grant.permits(n.resource_type.as_deref(), n.permissions))
}

/// `need` in words, for the 403's diagnostics.
pub fn describe(need: &Need) -> String {
    let letters: String = "cruds"
        .chars()
        .enumerate()
        .filter(|(i, _)| need.permissions & (1 << i) != 0)
        .map(|(_, c)| c)
        .collect();
    let target = need.resource_type.as_deref().unwrap_or("*");
    format!("system/{target}.{letters}")
}

/// A FHIR resource type name: an upper-case ASCII letter, then letters.
fn is_type(segment: &str) -> bool {
    segment.starts_with(|c: char| c.is_ascii_uppercase())
        && segment.chars().all(|c| c.is_ascii_alphabetic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(method: Method, path: &str) -> Vec<String> {
        let segments: Vec<Cow<str>> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(Cow::Borrowed)
            .collect();
        needs(&method, &segments).iter().map(describe).collect()
    }

    #[test]
    fn interactions_map_to_scopes() {
        assert_eq!(need(Method::GET, "Observation"), ["system/Observation.s"]);
        assert_eq!(need(Method::GET, "Observation/1"), ["system/Observation.r"]);
        assert_eq!(
            need(Method::GET, "Observation/1/_history/2"),
            ["system/Observation.r"]
        );
        assert_eq!(need(Method::POST, "Basic"), ["system/Basic.c"]);
        assert_eq!(need(Method::PUT, "Basic/1"), ["system/Basic.u"]);
        assert_eq!(need(Method::PUT, "Basic"), ["system/Basic.us"]);
        assert_eq!(need(Method::DELETE, "Basic/1"), ["system/Basic.d"]);
        assert_eq!(
            need(Method::POST, "Observation/_search"),
            ["system/Observation.s"]
        );
        assert_eq!(
            need(Method::GET, "Patient/1/Observation"),
            ["system/Patient.r", "system/Observation.s"]
        );
        assert!(need(Method::GET, "metadata").is_empty());
    }

    #[test]
    fn requests_that_reach_past_their_path_need_every_type() {
        assert_eq!(need(Method::POST, ""), ["system/*.cruds"]);
        assert_eq!(need(Method::GET, ""), ["system/*.rs"]);
        assert_eq!(need(Method::GET, "_history"), ["system/*.rs"]);
        assert_eq!(need(Method::GET, "Patient/1/$everything"), ["system/*.rs"]);
        assert_eq!(need(Method::POST, "Patient/$match"), ["system/*.cruds"]);
        assert_eq!(need(Method::POST, "Patient/1"), ["system/*.cruds"]);
        assert_eq!(need(Method::POST, "metadata"), ["system/*.cruds"]);
    }

    #[test]
    fn a_grant_meets_only_what_it_covers() {
        let patient = Grant::from_scope_string("system/Patient.read");
        let read = needs(&Method::GET, &[Cow::Borrowed("Observation")]);
        assert!(unmet(&patient, &read).is_some());
        let delete = needs(
            &Method::DELETE,
            &[Cow::Borrowed("Basic"), Cow::Borrowed("1")],
        );
        assert!(unmet(&patient, &delete).is_some());
        let own = needs(
            &Method::GET,
            &[Cow::Borrowed("Patient"), Cow::Borrowed("1")],
        );
        assert!(unmet(&patient, &own).is_none());
        let v2 = Grant::from_scope_string("system/*.cruds");
        assert!(unmet(&v2, &needs(&Method::POST, &[])).is_none());
        let v1 = Grant::from_scope_string("system/*.read system/*.write");
        assert!(unmet(&v1, &needs(&Method::POST, &[])).is_none());
    }
}
