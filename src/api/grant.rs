//! What a kick-off may export under the caller's token: the requested types narrowed to the grant, and
//! `_typeFilter` queries refused where their chains or `_has` would read types the grant does not allow.

use crate::auth::scopes::Grant;
use crate::auth::{AuthError, Principal};
use crate::export::compartment;
use crate::export::filters::{query_reads, Reads};
use crate::export::kickoff;
use crate::export::model::TypeSelection;
use crate::http::ApiError;
use crate::upstream::Capability;

/// Narrows a kick-off to the types the caller's token allows.
///
/// Asking for a type outside the grant is refused (403), unless the client asked for lenient handling:
/// then the export narrows and the manifest's OperationOutcome says so.
pub(super) fn restrict_to_grant(
    kickoff: &mut kickoff::Kickoff,
    principal: &Principal,
    capability: &Capability,
) -> Result<(), ApiError> {
    let grant = &principal.grant;
    let spec = &mut kickoff.spec;
    if let TypeSelection::All = spec.types {
        if grant.all_types() {
            return Ok(());
        }
        spec.types = TypeSelection::Only(
            compartment::level_types(&spec.level, capability)
                .into_keys()
                .filter(|t| grant.allows(t))
                .collect(),
        );
    } else if let TypeSelection::Only(types) = &mut spec.types {
        let denied: Vec<String> = types.iter().filter(|t| !grant.allows(t)).cloned().collect();
        if !denied.is_empty() {
            let message = format!(
                "the access token does not allow exporting {}",
                denied.join(", ")
            );
            if !kickoff.lenient {
                return Err(AuthError::Forbidden(message).into());
            }
            types.retain(|t| grant.allows(t));
            kickoff.notes.push(format!(
                "{message}; the export was narrowed to the granted types"
            ));
        }
    }
    if spec.types == TypeSelection::Only(Vec::new()) {
        return Err(AuthError::Forbidden(
            "the access token allows none of the requested resource types".into(),
        )
        .into());
    }
    spec.type_filters.retain(|(t, _)| grant.allows(t));
    for (t, query) in &spec.type_filters {
        if let Some(message) = filter_reads_beyond_grant(t, query, grant, capability) {
            return Err(AuthError::Forbidden(message).into());
        }
    }
    Ok(())
}

/// Why a `_typeFilter` query of `t` reads what `grant` does not allow, if it does. Its result would
/// reveal the resources its chains and `_has` select by, so even lenient handling refuses it.
fn filter_reads_beyond_grant(
    t: &str,
    query: &str,
    grant: &Grant,
    capability: &Capability,
) -> Option<String> {
    let (name, denied) = reads_beyond_grant(t, query, grant, capability)?;
    Some(format!(
        "_typeFilter parameter {name:?} of {t} searches {denied}, which the access token does not allow reading"
    ))
}

/// The first parameter of `query`, a search of `t`, that reads a type `grant` does not allow, and
/// those types in words.
pub(super) fn reads_beyond_grant(
    t: &str,
    query: &str,
    grant: &Grant,
    capability: &Capability,
) -> Option<(String, String)> {
    query_reads(query, t, capability)
        .into_iter()
        .find_map(|(name, reads)| {
            let denied = match reads {
                Reads::Any if grant.all_types() => return None,
                Reads::Any => "every resource type".to_owned(),
                Reads::Types(types) => {
                    let denied: Vec<String> =
                        types.into_iter().filter(|r| !grant.allows(r)).collect();
                    if denied.is_empty() {
                        return None;
                    }
                    denied.join(", ")
                }
            };
            Some((name, denied))
        })
}
