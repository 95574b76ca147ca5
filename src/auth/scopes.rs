//! SMART system scopes (v1 `system/Type.read` and v2 `system/Type.rs`) and what they let a client export.

/// Permission bits in SMART v2 order: create, read, update, delete, search.
const PERMISSIONS: &str = "cruds";
/// `c`: create.
pub const CREATE: u8 = 1;
/// `r`: read (and vread, history).
pub const READ: u8 = 1 << 1;
/// `u`: update.
pub const UPDATE: u8 = 1 << 2;
/// `d`: delete.
pub const DELETE: u8 = 1 << 3;
/// `s`: search.
pub const SEARCH: u8 = 1 << 4;
/// Every permission.
pub const ALL: u8 = CREATE | READ | UPDATE | DELETE | SEARCH;

/// One parsed `system/` scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// A resource type, or `*`.
    pub resource: String,
    /// Bit set over `cruds`.
    pub permissions: u8,
}

impl Scope {
    /// Parses `system/<Type|*>.<read|write|*|cruds-subset>`; other scopes (patient/, user/, with
    /// query parameters, …) are not system scopes this server grants.
    pub fn parse(text: &str) -> Option<Scope> {
        let rest = text.strip_prefix("system/")?;
        let (resource, perms) = rest.split_once('.')?;
        let resource_ok = resource == "*"
            || (resource.starts_with(|c: char| c.is_ascii_uppercase())
                && resource.chars().all(|c| c.is_ascii_alphabetic()));
        if !resource_ok {
            return None;
        }
        let permissions = match perms {
            "read" => READ | SEARCH,
            "write" => CREATE | UPDATE | DELETE,
            "*" => ALL,
            v2 => {
                // v2 permissions are a non-empty subsequence of `cruds`, in that order.
                let mut bits = 0u8;
                let mut last = None;
                for c in v2.chars() {
                    let i = PERMISSIONS.find(c)?;
                    if last.is_some_and(|l| i <= l) {
                        return None;
                    }
                    last = Some(i);
                    bits |= 1 << i;
                }
                if bits == 0 {
                    return None;
                }
                bits
            }
        };
        Some(Scope {
            resource: resource.to_owned(),
            permissions,
        })
    }

    /// Whether holding `self` is enough to be granted `other`.
    pub fn covers(&self, other: &Scope) -> bool {
        (self.resource == "*" || self.resource == other.resource)
            && self.permissions & other.permissions == other.permissions
    }

    /// Whether the scope allows exporting its type(s): bulk export reads and searches.
    pub fn allows_export(&self) -> bool {
        self.permissions & (READ | SEARCH) == READ | SEARCH
    }

    /// Whether the scope names `*` or an R4 resource type: `system/Foo.read` parses but grants nothing.
    pub fn names_real_type(&self) -> bool {
        self.resource == "*" || crate::fhir_types::is_resource_type(&self.resource)
    }

    /// What holding both `self` and `other` allows: the narrower type, the common permissions.
    fn intersect(&self, other: &Scope) -> Option<Scope> {
        let resource = match (self.resource.as_str(), other.resource.as_str()) {
            ("*", r) | (r, "*") => r,
            (a, b) if a == b => a,
            _ => return None,
        };
        let permissions = self.permissions & other.permissions;
        (permissions != 0).then(|| Scope {
            resource: resource.to_owned(),
            permissions,
        })
    }
}

/// The scopes of an access token, as far as export is concerned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    scopes: Vec<Scope>,
}

impl Grant {
    /// Parses a space-separated scope string, ignoring what is not a system scope.
    pub fn from_scope_string(scopes: &str) -> Grant {
        Grant {
            scopes: scopes.split_whitespace().filter_map(Scope::parse).collect(),
        }
    }

    /// Whether every type may be exported.
    pub fn all_types(&self) -> bool {
        self.scopes
            .iter()
            .any(|s| s.resource == "*" && s.allows_export())
    }

    /// Whether `resource_type` may be exported.
    pub fn allows(&self, resource_type: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| (s.resource == "*" || s.resource == resource_type) && s.allows_export())
    }
}

impl Grant {
    /// The part of the grant that `allowed` (a client's current registration) still covers.
    pub fn within(&self, allowed: &[Scope]) -> Grant {
        Grant {
            scopes: self
                .scopes
                .iter()
                .flat_map(|s| allowed.iter().filter_map(|a| s.intersect(a)))
                .collect(),
        }
    }

    /// Whether any scope allows exporting some type.
    pub fn exports_anything(&self) -> bool {
        self.scopes.iter().any(Scope::allows_export)
    }

    /// Whether the scopes together give `permissions` on `resource_type`, or on every type when it is
    /// `None` (only `system/*` scopes count then).
    pub fn permits(&self, resource_type: Option<&str>, permissions: u8) -> bool {
        let held = self
            .scopes
            .iter()
            .filter(|s| s.resource == "*" || Some(s.resource.as_str()) == resource_type)
            .fold(0, |bits, s| bits | s.permissions);
        held & permissions == permissions
    }
}

/// The requested scopes that `allowed` covers, in request order (the granted subset).
pub fn grantable<'a>(requested: &'a str, allowed: &[Scope]) -> Vec<&'a str> {
    requested
        .split_whitespace()
        .filter(|r| Scope::parse(r).is_some_and(|r| allowed.iter().any(|a| a.covers(&r))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(list: &[&str]) -> Vec<Scope> {
        list.iter().map(|s| Scope::parse(s).unwrap()).collect()
    }

    #[test]
    fn parses_v1_and_v2() {
        assert_eq!(Scope::parse("system/*.read"), Scope::parse("system/*.rs"));
        assert!(Scope::parse("system/Observation.cruds").is_some());
        for bad in [
            "patient/*.read",
            "system/*.sr",
            "system/*.rr",
            "system/*.",
            "system/obs.read",
            "system/Observation.rs?category=x",
            "openid",
        ] {
            assert!(Scope::parse(bad).is_none(), "{bad} parsed");
        }
    }

    #[test]
    fn grants_the_covered_subset() {
        let allowed = scopes(&["system/*.rs", "system/Patient.cruds"]);
        assert_eq!(
            grantable(
                "system/Observation.rs system/*.read system/Observation.c system/Patient.u openid",
                &allowed
            ),
            ["system/Observation.rs", "system/*.read", "system/Patient.u"]
        );
        let narrow = scopes(&["system/Observation.read"]);
        assert!(grantable("system/*.rs", &narrow).is_empty());
        assert_eq!(
            grantable("system/Observation.rs", &narrow),
            ["system/Observation.rs"]
        );
    }

    #[test]
    fn export_needs_read_and_search() {
        let g = Grant::from_scope_string("system/Patient.rs system/Observation.r");
        assert!(g.allows("Patient"));
        assert!(!g.allows("Observation"));
        assert!(!g.all_types());
        assert!(Grant::from_scope_string("system/*.read").all_types());
    }

    #[test]
    fn a_grant_within_a_narrower_registration_keeps_only_the_overlap() {
        let token = Grant::from_scope_string("system/*.rs system/Patient.cruds");
        let g = token.within(&scopes(&["system/Observation.rs", "system/Patient.r"]));
        assert!(g.allows("Observation"));
        assert!(!g.allows("Patient") && g.permits(Some("Patient"), READ));
        assert!(!g.permits(Some("Patient"), SEARCH | UPDATE));
        assert!(!g.allows("Encounter") && !g.all_types());
        let g = Grant::from_scope_string("system/Observation.rs").within(&scopes(&["system/*.r"]));
        assert!(g.permits(Some("Observation"), READ) && !g.exports_anything());
        assert!(token.within(&[]).scopes.is_empty());
        assert_eq!(token.within(&scopes(&["system/*.cruds"])), token);
    }

    #[test]
    fn only_real_types_and_wildcards_are_named() {
        for (scope, real) in [
            ("system/*.rs", true),
            ("system/Observation.read", true),
            ("system/Foo.read", false),
            ("system/Resource.rs", false),
        ] {
            assert_eq!(
                Scope::parse(scope).unwrap().names_real_type(),
                real,
                "{scope}"
            );
        }
    }

    #[test]
    fn permits_combines_scopes_of_a_type_and_wildcards_count_for_all() {
        let g = Grant::from_scope_string("system/Patient.r system/Patient.s system/*.c");
        assert!(g.permits(Some("Patient"), READ | SEARCH | CREATE));
        assert!(!g.permits(Some("Patient"), DELETE));
        assert!(!g.permits(Some("Observation"), READ));
        assert!(g.permits(Some("Observation"), CREATE));
        assert!(g.permits(None, CREATE));
        assert!(!g.permits(None, READ));
        assert!(Grant::from_scope_string("system/*.write").permits(Some("Basic"), DELETE));
        assert!(!Grant::from_scope_string("system/*.read").permits(Some("Basic"), DELETE));
    }
}
