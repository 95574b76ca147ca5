//! Where a request goes, decided once from its path.
//!
//! The path is first normalised the way upstream servers read it: percent-decoded (`%2F` becomes a
//! separator) and with empty segments dropped. The proxy then routes, authorizes and forwards that one
//! normalised path, so a spelling the upstream would take for `$export` can never slip past the routing
//! as "something else". Dot segments, and characters no FHIR path has, are refused outright rather than
//! guessed at. A path that names an export operation the proxy does not serve itself is refused too,
//! never forwarded: the upstream may run an export of its own, and reached around the proxy it would
//! bypass the proxy's authorization and scopes.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::cohort::is_cohort_id;
use crate::export::model::Level;

/// What a request is for.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// `$export` kick-off at one level.
    Kickoff(Level),
    /// `$bulk-status/{id}`: poll or cancel.
    Status(String),
    /// `$bulk-files/{id}/{name}`: download.
    File(String, String),
    /// `metadata`: the upstream's CapabilityStatement, augmented.
    Metadata,
    /// `.well-known/smart-configuration` (when authorization is on).
    SmartConfiguration,
    /// `auth/token` (when authorization is on).
    Token,
    /// `Group` itself: a `POST` may create a cohort, a `GET ?_id=` may name cohorts; otherwise forwarded.
    Groups,
    /// `Group/cohort-…`: a cohort Group, the proxy's (read, delete).
    Cohort(String),
    /// `Group/cohort-…/$cohort-refresh`: computes a cohort's members again.
    CohortRefresh(String),
    /// `$cohort-status/{id}`: a cohort's computation.
    CohortStatus(String),
    /// An export-like operation the proxy does not serve (`$bulk-status/a/b`, `Observation/$export`, an
    /// upstream's own status URL...): answered 404 by the proxy, never forwarded.
    Refused,
    /// Everything else: forwarded upstream.
    PassThrough,
}

/// Why a request path is refused before any routing.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an origin-form path (`*`, or empty).
    #[error("the request target is not a path")]
    NotAPath,
    /// Percent-decoding does not give UTF-8.
    #[error("the request path is not UTF-8 once percent-decoded")]
    NotUtf8,
    /// A character no FHIR path has, after decoding (a `%` left over means double encoding).
    #[error("the request path contains {0:?}, which no FHIR path has")]
    Character(char),
    /// A `.` or `..` segment (raw or percent-encoded): servers resolve them differently, so none is guessed.
    #[error("the request path has a '.' or '..' segment")]
    DotSegment,
    /// Outside the public FHIR base, with `server.forward_outside_base` off.
    #[error("the request path is outside the FHIR base {0}")]
    OutsideBase(String),
}

/// The routing decision for one request path.
#[derive(Debug)]
pub struct Resolved<'a> {
    /// Where it goes.
    pub route: Route,
    /// The decoded segments after the public base (all of them when outside the base).
    pub segments: Vec<Cow<'a, str>>,
    /// The normalised path to forward, when it differs from the request's own.
    pub rewritten: Option<String>,
}

/// The public base path and the routing switches, prepared once.
#[derive(Debug, Clone)]
pub struct Router {
    base: Vec<String>,
    base_path: String,
    auth: bool,
    outside_base: bool,
}

impl Router {
    /// A router for the public base path `base_path` (e.g. `/fhir`); `auth` enables the SMART endpoints,
    /// `outside_base` forwards paths outside the base (still never an owned operation).
    pub fn new(base_path: &str, auth: bool, outside_base: bool) -> Self {
        let base: Vec<String> = base_path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Self {
            base_path: format!("/{}", base.join("/")),
            base,
            auth,
            outside_base,
        }
    }

    /// Routes `path` (a request's path, without the query).
    pub fn resolve<'a>(&self, path: &'a str) -> Result<Resolved<'a>, PathError> {
        let (segments, changed) = normalise(path)?;
        let rewritten = changed.then(|| format!("/{}", segments.join("/")));
        let inside = segments.len() >= self.base.len()
            && segments.iter().zip(&self.base).all(|(s, b)| s == b);
        if !inside {
            if owns_any(&segments) {
                return Ok(Resolved {
                    route: Route::Refused,
                    segments,
                    rewritten,
                });
            }
            if !self.outside_base {
                return Err(PathError::OutsideBase(self.base_path.clone()));
            }
            return Ok(Resolved {
                route: Route::PassThrough,
                segments,
                rewritten,
            });
        }
        let segments: Vec<Cow<'a, str>> = segments.into_iter().skip(self.base.len()).collect();
        let route = self.classify(&segments);
        Ok(Resolved {
            route,
            segments,
            rewritten,
        })
    }

    fn classify(&self, segments: &[Cow<'_, str>]) -> Route {
        let s: Vec<&str> = segments.iter().map(|s| s.as_ref()).collect();
        match s.as_slice() {
            ["$export"] => Route::Kickoff(Level::System),
            ["Patient", "$export"] => Route::Kickoff(Level::Patient),
            ["Group", id, "$export"] => Route::Kickoff(Level::Group { id: id.to_string() }),
            ["$bulk-status", id] => Route::Status(id.to_string()),
            ["$bulk-files", id, name] => Route::File(id.to_string(), name.to_string()),
            ["$cohort-status", id] => Route::CohortStatus(id.to_string()),
            ["Group"] => Route::Groups,
            ["Group", id] if is_cohort_id(id) => Route::Cohort(id.to_string()),
            ["Group", id, "$cohort-refresh"] if is_cohort_id(id) => {
                Route::CohortRefresh(id.to_string())
            }
            // Nothing else of a cohort exists upstream (history, compartments, other operations).
            ["Group", id, ..] if is_cohort_id(id) => Route::Refused,
            ["metadata"] => Route::Metadata,
            [".well-known", "smart-configuration"] if self.auth => Route::SmartConfiguration,
            ["auth", "token"] if self.auth => Route::Token,
            _ if owns_any(segments) => Route::Refused,
            _ => Route::PassThrough,
        }
    }
}

/// The decoded, non-empty segments of `path`, and whether they differ from its raw spelling.
fn normalise(path: &str) -> Result<(Vec<Cow<'_, str>>, bool), PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotAPath)?;
    let mut segments = Vec::with_capacity(8);
    let mut changed = false;
    for raw in rest.split('/') {
        if raw.is_empty() {
            // `/` alone is the root, not an empty segment; anything else empty is dropped.
            changed |= !rest.is_empty();
            continue;
        }
        if !raw.contains('%') {
            segments.push(Cow::Borrowed(checked(raw)?));
            continue;
        }
        changed = true;
        let decoded = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PathError::NotUtf8)?;
        for piece in decoded.split('/').filter(|p| !p.is_empty()) {
            segments.push(Cow::Owned(checked(piece)?.to_owned()));
        }
    }
    Ok((segments, changed))
}

/// `segment` if it is neither a dot segment nor holds a character outside RFC 3986's `pchar` (less `;`,
/// which some servers take for a path parameter and strip).
fn checked(segment: &str) -> Result<&str, PathError> {
    if segment == "." || segment == ".." {
        return Err(PathError::DotSegment);
    }
    match segment.chars().find(|&c| !is_path_char(c)) {
        Some(c) => Err(PathError::Character(c)),
        None => Ok(segment),
    }
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,=:@".contains(c)
}

/// Whether any segment names an export or cohort operation or an export's async endpoint, in any letter
/// case (some servers route case-insensitively): the proxy serves the ones it implements and refuses the
/// rest.
fn owns_any(segments: &[Cow<'_, str>]) -> bool {
    segments.iter().enumerate().any(|(i, s)| {
        let s = s.to_ascii_lowercase();
        s.starts_with("$export")
            || s.starts_with("$bulk")
            || s.starts_with("$cohort")
            || s.starts_with("bulk-")
            || (s == "_operations"
                && segments
                    .get(i + 1)
                    .is_some_and(|n| n.eq_ignore_ascii_case("export")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        Router::new("/fhir", true, false)
    }

    fn route(path: &str) -> Result<Route, PathError> {
        router().resolve(path).map(|r| r.route)
    }

    #[test]
    fn owned_endpoints_route_to_the_proxy() {
        assert_eq!(route("/fhir/$export"), Ok(Route::Kickoff(Level::System)));
        assert_eq!(
            route("/fhir/Patient/$export"),
            Ok(Route::Kickoff(Level::Patient))
        );
        assert_eq!(
            route("/fhir/Group/g1/$export"),
            Ok(Route::Kickoff(Level::Group { id: "g1".into() }))
        );
        assert_eq!(
            route("/fhir/$bulk-status/abc"),
            Ok(Route::Status("abc".into()))
        );
        assert_eq!(
            route("/fhir/$bulk-files/abc/Patient.000.ndjson"),
            Ok(Route::File("abc".into(), "Patient.000.ndjson".into()))
        );
        assert_eq!(route("/fhir/metadata"), Ok(Route::Metadata));
        assert_eq!(
            route("/fhir/.well-known/smart-configuration"),
            Ok(Route::SmartConfiguration)
        );
        assert_eq!(route("/fhir/auth/token"), Ok(Route::Token));
    }

    #[test]
    fn spellings_the_upstream_reads_as_export_route_the_same() {
        for path in [
            "/fhir/$export/",
            "/fhir/$export//",
            "//fhir//$export",
            "/fhir/%24export",
            "/fhir/%2F$export",
            "/fhir%2F$export",
            "/fhir/%2F%2F$export",
        ] {
            assert_eq!(route(path), Ok(Route::Kickoff(Level::System)), "{path}");
        }
        for path in [
            "/fhir/Patient//$export",
            "/fhir/Patient/$export/",
            "/fhir/Patient/%2F$export",
            "/fhir/Patient%2F%24export",
        ] {
            assert_eq!(route(path), Ok(Route::Kickoff(Level::Patient)), "{path}");
        }
        for path in [
            "/fhir/Group/G/$export/",
            "/fhir/Group//G/$export",
            "/fhir/Group/G//$export",
        ] {
            assert_eq!(
                route(path),
                Ok(Route::Kickoff(Level::Group { id: "G".into() })),
                "{path}"
            );
        }
    }

    #[test]
    fn export_like_paths_the_proxy_does_not_serve_are_refused() {
        for path in [
            "/fhir/$EXPORT",
            "/fhir/Observation/$export",
            "/fhir/Patient/p1/$export",
            "/fhir/Group/$export",
            "/fhir/$export-poll-status",
            "/fhir/bulk-status/abc",
            "/fhir/bulk-files/abc/Observation.ndjson",
            "/fhir/$bulk-status/abc/extra",
            "/fhir/$bulk-status",
            "/fhir/_operations/export/1",
            "/FHIR/$export",
            "/other/$export",
        ] {
            assert_eq!(route(path), Ok(Route::Refused), "{path}");
        }
    }

    #[test]
    fn cohort_paths_route_to_the_proxy_in_every_spelling() {
        let id = "cohort-0123abcd";
        for path in [
            "/fhir/$cohort-status/cohort-0123abcd",
            "/fhir//$cohort-status/cohort-0123abcd/",
            "/fhir/%24cohort-status/cohort-0123abcd",
            "/fhir%2F$cohort-status%2Fcohort-0123abcd",
        ] {
            assert_eq!(route(path), Ok(Route::CohortStatus(id.into())), "{path}");
        }
        for path in [
            "/fhir/Group/cohort-0123abcd",
            "/fhir//Group/%63ohort-0123abcd/",
        ] {
            assert_eq!(route(path), Ok(Route::Cohort(id.into())), "{path}");
        }
        assert_eq!(
            route("/fhir/Group/cohort-0123abcd/$cohort-refresh"),
            Ok(Route::CohortRefresh(id.into()))
        );
        assert_eq!(
            route("/fhir/Group/cohort-0123abcd/$export"),
            Ok(Route::Kickoff(Level::Group { id: id.into() }))
        );
        assert_eq!(route("/fhir/Group"), Ok(Route::Groups));
        assert_eq!(route("/fhir/Group/"), Ok(Route::Groups));
        for path in [
            "/fhir/Group/cohort-0123abcd/_history",
            "/fhir/Group/cohort-0123abcd/_history/1",
            "/fhir/Group/cohort-0123abcd/$everything",
            "/fhir/$cohort-status",
            "/fhir/$COHORT-STATUS/x",
            "/fhir/Group/g1/$cohort-refresh",
            "/fhir/Patient/$cohort-status/x",
        ] {
            assert_eq!(route(path), Ok(Route::Refused), "{path}");
        }
        assert_eq!(route("/fhir/Group/g1"), Ok(Route::PassThrough));
        assert_eq!(route("/fhir/Group/cohort-"), Ok(Route::PassThrough));
    }

    #[test]
    fn dot_segments_and_stray_characters_are_refused() {
        for path in [
            "/fhir/$export/.",
            "/fhir/$export/..",
            "/fhir/Group/./$export",
            "/fhir/Group/../$export",
            "/fhir/Group/%2e%2e/$export",
            "/fhir/Group/%2E/$export",
            "/fhir/Patient/%2e%2e%2f$export",
        ] {
            assert_eq!(route(path), Err(PathError::DotSegment), "{path}");
        }
        assert_eq!(route("/fhir/$export;x"), Err(PathError::Character(';')));
        assert_eq!(route("/fhir/%2524export"), Err(PathError::Character('%')));
        assert_eq!(route("/fhir/$export%20"), Err(PathError::Character(' ')));
        assert_eq!(
            route("/fhir/Patient\\$export"),
            Err(PathError::Character('\\'))
        );
        assert_eq!(route("/fhir/%ff"), Err(PathError::NotUtf8));
        assert_eq!(route("*"), Err(PathError::NotAPath));
    }

    #[test]
    fn ordinary_paths_pass_unchanged_and_odd_spellings_are_normalised() {
        let r = router();
        let plain = r.resolve("/fhir/Patient/p-1.a/_history/2").unwrap();
        assert_eq!(plain.route, Route::PassThrough);
        assert_eq!(plain.rewritten, None);
        assert_eq!(plain.segments, ["Patient", "p-1.a", "_history", "2"]);
        assert_eq!(r.resolve("/fhir").unwrap().rewritten, None);
        let odd = r.resolve("/fhir//Patient/%70%2F_history/").unwrap();
        assert_eq!(odd.route, Route::PassThrough);
        assert_eq!(odd.rewritten.as_deref(), Some("/fhir/Patient/p/_history"));
        assert_eq!(
            r.resolve("/x/Patient").unwrap_err(),
            PathError::OutsideBase("/fhir".into())
        );
        let open = Router::new("/fhir", false, true);
        assert_eq!(
            open.resolve("/x/Patient").unwrap().route,
            Route::PassThrough
        );
        assert_eq!(open.resolve("/x/$export").unwrap().route, Route::Refused);
        assert_eq!(
            open.resolve("/fhir/auth/token").unwrap().route,
            Route::PassThrough
        );
        let root = Router::new("/", false, false);
        assert_eq!(
            root.resolve("/$export").unwrap().route,
            Route::Kickoff(Level::System)
        );
        assert_eq!(root.resolve("/").unwrap().rewritten, None);
    }
}
