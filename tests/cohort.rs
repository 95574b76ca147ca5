//! The Bulk Cohort API against the real upstream: cohorts created through the proxy, their members
//! compared with direct searches of the upstream, their exports with exports of an upstream Group of the
//! same patients and with direct compartment searches; restarts, limits, bad input and scopes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::mock::{Mock, Reply};
use common::*;
use serde_json::{json, Value};

const MEMBER_FILTER: &str = "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/member-filter";
const MEMBERS_REFRESHED: &str =
    "http://hl7.org/fhir/uv/bulkdata/StructureDefinition/members-refreshed";
const GROUP_ID: &str = "bulk-test-group";

/// A Bulk Cohort Group with one member-filter per expression.
fn cohort_group(name: &str, expressions: &[&str]) -> Value {
    json!({
        "resourceType": "Group",
        "type": "person",
        "actual": false,
        "name": name,
        "modifierExtension": expressions.iter().map(|e| json!({
            "url": MEMBER_FILTER,
            "valueExpression": {"language": "application/x-fhir-query", "expression": e},
        })).collect::<Vec<_>>(),
    })
}

/// `POST [base]/Group` with `Prefer: respond-async` (when `async_`), as a client creating a cohort.
fn post_group(
    base: &str,
    group: &Value,
    async_: bool,
    token: Option<&str>,
) -> reqwest::blocking::Response {
    let mut request = with_token(client().post(format!("{base}/Group")), token)
        .header("Content-Type", "application/fhir+json")
        .header("Accept", "application/fhir+json");
    if async_ {
        request = request.header("Prefer", "respond-async");
    }
    request.body(group.to_string()).send().unwrap()
}

/// Creates the cohort, insisting on 202 with a `$cohort-status` URL; returns that URL.
fn create(base: &str, group: &Value, token: Option<&str>) -> String {
    let (status, location, body) =
        status_header_body(post_group(base, group, true, token), "Content-Location");
    assert_eq!(status, 202, "cohort create answered {status}: {body}");
    let location = location.unwrap_or_else(|| panic!("202 without Content-Location: {body}"));
    assert!(
        location.starts_with(&format!("{base}/$cohort-status/cohort-")),
        "{location}"
    );
    location
}

fn id_of(status_url: &str) -> String {
    status_url.rsplit('/').next().unwrap().to_owned()
}

/// Polls the status URL until it is no longer 202; returns the final status and body.
fn wait_status(status_url: &str, token: Option<&str>) -> (u16, Value) {
    let deadline = Instant::now() + EXPORT_DEADLINE;
    loop {
        let resp = get_with_token(status_url, token).send().unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body: Value = resp.json().unwrap();
        if status != 202 {
            return (status, body);
        }
        assert!(headers.contains_key("X-Progress"), "{headers:?}");
        assert!(headers.contains_key("Retry-After"), "{headers:?}");
        assert!(Instant::now() < deadline, "{status_url} still 202");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The computed Group, once the status says it is done.
fn wait_group(status_url: &str, token: Option<&str>) -> Value {
    let (status, body) = wait_status(status_url, token);
    assert_eq!(
        status, 200,
        "cohort computation ended with {status}: {body}"
    );
    assert_eq!(body["resourceType"], "Group", "{body}");
    body
}

/// The patient ids a served Group lists, checking the profile's fields on the way.
fn members_of(group: &Value) -> BTreeSet<String> {
    let members: BTreeSet<String> = group["member"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let r = m["entity"]["reference"].as_str().unwrap();
            r.strip_prefix("Patient/").unwrap().to_owned()
        })
        .collect();
    assert_eq!(group["quantity"], members.len(), "{group}");
    assert_eq!(group["actual"], !members.is_empty(), "{group}");
    assert_eq!(group["type"], "person");
    let refreshed = group["extension"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["url"] == MEMBERS_REFRESHED)
        .unwrap_or_else(|| panic!("no members-refreshed extension: {group}"));
    let refreshed = refreshed["valueDateTime"].as_str().unwrap();
    let last_updated = group["meta"]["lastUpdated"].as_str().unwrap();
    assert!(
        refreshed <= last_updated,
        "{refreshed} after {last_updated}"
    );
    members
}

/// The patients a direct upstream search's matches are or reference (`subject`/`patient`).
fn direct_patients(upstream: &str, ty: &str, query: &str) -> BTreeSet<String> {
    let found = search_all(&format!("{upstream}/{ty}?{query}&_count=200"));
    found
        .iter()
        .filter_map(|r| match ty {
            "Patient" => r["id"].as_str().map(str::to_owned),
            _ => ["subject", "patient"].iter().find_map(|f| {
                let reference = r[*f]["reference"].as_str()?;
                reference.strip_prefix("Patient/").map(str::to_owned)
            }),
        })
        .collect()
}

/// The Condition code (`system|code`) that the most patients have, with those patients.
fn common_condition(upstream: &str) -> (String, BTreeSet<String>) {
    let mut by_code: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for condition in search_all(&format!("{upstream}/Condition?_count=500")) {
        let patient = condition["subject"]["reference"]
            .as_str()
            .and_then(|r| r.strip_prefix("Patient/"));
        let coding = &condition["code"]["coding"][0];
        if let (Some(patient), Some(system), Some(code)) =
            (patient, coding["system"].as_str(), coding["code"].as_str())
        {
            by_code
                .entry(format!("{system}|{code}"))
                .or_default()
                .insert(patient.to_owned());
        }
    }
    by_code
        .into_iter()
        .max_by_key(|(_, patients)| patients.len())
        .expect("the upstream has Conditions")
}

/// Runs `Group/{id}/$export` and returns its resources by type.
fn export_group(base: &str, id: &str, token: Option<&str>) -> BTreeMap<String, Vec<Value>> {
    export(base, &format!("Group/{id}/$export"), token)
}

/// Runs the export `path_and_query` and returns its resources by type.
fn export(base: &str, path_and_query: &str, token: Option<&str>) -> BTreeMap<String, Vec<Value>> {
    let status_url = accepted_status_url(base, kickoff_get(base, path_and_query, token));
    let (manifest, _) = wait_manifest(&status_url, token);
    resources_by_type(&download_all(&manifest, "output", token))
}

fn keys_by_type(resources: &BTreeMap<String, Vec<Value>>) -> BTreeMap<String, BTreeSet<Key>> {
    resources
        .iter()
        .map(|(t, rs)| (t.clone(), rs.iter().map(key_of).collect()))
        .collect()
}

fn outcome_text(body: &Value) -> String {
    assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
    body["issue"][0]["diagnostics"].as_str().unwrap().to_owned()
}

#[test]
fn condition_cohort_has_the_patients_a_direct_search_finds_and_exports_their_compartments() {
    let upstream = upstream();
    let (code, expected) = common_condition(&upstream);
    assert!(expected.len() >= 2, "{code} has too few patients");
    let proxy = Proxy::builder(&upstream).admin().start();
    let requests = || {
        let text = scrape(&proxy.admin_url());
        text.lines()
            .filter(|l| l.starts_with("fbp_upstream_requests_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let before = requests();
    let started = Instant::now();
    let status_url = create(
        &proxy.base,
        &cohort_group("by condition", &[&format!("Condition?code={}", enc(&code))]),
        None,
    );
    let group = wait_group(&status_url, None);
    eprintln!(
        "cohort Condition?code={code}: {} members in {:?}, {} upstream requests",
        expected.len(),
        started.elapsed(),
        requests() - before
    );
    let id = id_of(&status_url);
    assert_eq!(group["id"], id.as_str());
    assert_eq!(group["name"], "by condition");
    assert_eq!(members_of(&group), expected);

    // Read and search give the same Group.
    let read = get_json(&format!("{}/Group/{id}", proxy.base));
    assert_eq!(members_of(&read), expected);
    let found = get_json(&format!("{}/Group?_id={id}", proxy.base));
    assert_eq!(found["type"], "searchset");
    assert_eq!(found["total"], 1);
    assert_eq!(found["entry"][0]["resource"]["id"], id.as_str());

    // Its export is what direct compartment searches of those patients find.
    let exported = export_group(&proxy.base, &id, None);
    let patients: Vec<String> = expected.iter().cloned().collect();
    assert_same(&exported, &direct_compartment(&upstream, &patients));
}

#[test]
fn filters_are_anded() {
    let upstream = upstream();
    let (code, with_condition) = common_condition(&upstream);
    let first = with_condition.iter().next().unwrap();
    let gender = get_json(&format!("{upstream}/Patient/{first}"))["gender"]
        .as_str()
        .unwrap()
        .to_owned();
    let of_gender = direct_patients(&upstream, "Patient", &format!("gender={gender}"));
    let expected: BTreeSet<String> = with_condition.intersection(&of_gender).cloned().collect();
    assert!(expected.contains(first));
    assert!(
        expected.len() < of_gender.len(),
        "the Condition filter selects nothing among the {gender} patients"
    );
    let proxy = Proxy::start(&upstream, "");
    let status_url = create(
        &proxy.base,
        &cohort_group(
            "two filters",
            &[
                &format!("Condition?code={}", enc(&code)),
                &format!("Patient?gender={gender}"),
            ],
        ),
        None,
    );
    assert_eq!(members_of(&wait_group(&status_url, None)), expected);
}

/// A cohort of the upstream Group's own members exports exactly what that Group's export does.
#[test]
fn cohort_export_equals_the_export_of_an_upstream_group_of_the_same_patients() {
    let upstream = upstream();
    let members = group_member_ids(&upstream, GROUP_ID);
    let proxy = Proxy::start(&upstream, "patient_batch_size = 2");
    let status_url = create(
        &proxy.base,
        &cohort_group("by hand", &[&format!("Patient?_id={}", members.join(","))]),
        None,
    );
    let group = wait_group(&status_url, None);
    assert_eq!(members_of(&group), members.iter().cloned().collect());
    let cohort = export_group(&proxy.base, &id_of(&status_url), None);
    let by_hand = export_group(&proxy.base, GROUP_ID, None);
    assert!(by_hand.len() > 2, "{:?}", by_hand.keys());
    assert_eq!(keys_by_type(&cohort), keys_by_type(&by_hand));
    // `_type` and `_since` apply to a cohort as to any Group.
    let status_url = accepted_status_url(
        &proxy.base,
        kickoff_get(
            &proxy.base,
            &format!("Group/{}/$export?_type=Patient", id_of(&status_url)),
            None,
        ),
    );
    let (manifest, _) = wait_manifest(&status_url, None);
    let only = resources_by_type(&download_all(&manifest, "output", None));
    assert_eq!(only.keys().collect::<Vec<_>>(), ["Patient"]);
    assert_eq!(only["Patient"].len(), members.len());
}

#[test]
fn restart_in_the_middle_of_a_computation_completes_with_the_right_members() {
    let upstream = upstream();
    let expected = direct_patients(&upstream, "Patient", "gender=female");
    assert!(expected.len() >= 4, "too few female patients");
    let mut proxy = Proxy::builder(&upstream)
        .upstream_toml("requests_per_second = 1")
        .tables("[cohort]\npage_size = 1\n")
        .start();
    let status_url = create(
        &proxy.base,
        &cohort_group("restarted", &["Patient?gender=female"]),
        None,
    );
    std::thread::sleep(Duration::from_millis(1500));
    let resp = client().get(&status_url).send().unwrap();
    assert_eq!(resp.status(), 202, "the computation ended before the kill");
    proxy.kill9();
    proxy.restart();
    let status_url = format!("{}{}", origin(&proxy.base), url_path(&status_url));
    // Nothing half-made is served meanwhile.
    let id = id_of(&status_url);
    let read = client()
        .get(format!("{}/Group/{id}", proxy.base))
        .send()
        .unwrap();
    assert_eq!(read.status(), 404);
    assert_eq!(members_of(&wait_group(&status_url, None)), expected);
}

#[test]
fn too_many_members_fails_on_the_status_url_and_serves_no_group() {
    let upstream = upstream();
    let proxy = Proxy::builder(&upstream)
        .tables("[cohort]\nmax_members = 3\npage_size = 2\n")
        .start();
    let status_url = create(
        &proxy.base,
        &cohort_group("big", &["Patient?gender=female"]),
        None,
    );
    let (status, body) = wait_status(&status_url, None);
    assert_eq!(status, 413, "{body}");
    assert!(outcome_text(&body).contains("max_members (3)"), "{body}");
    let id = id_of(&status_url);
    let read = client()
        .get(format!("{}/Group/{id}", proxy.base))
        .send()
        .unwrap();
    assert_eq!(read.status(), 404);
    let export = kickoff_get(&proxy.base, &format!("Group/{id}/$export"), None);
    assert_eq!(export.status(), 404);
}

#[test]
fn bad_definitions_are_refused_with_an_operation_outcome() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let mut not_person = cohort_group("x", &["Patient?gender=male"]);
    not_person["type"] = json!("device");
    let mut no_name = cohort_group("x", &["Patient?gender=male"]);
    no_name.as_object_mut().unwrap().remove("name");
    for (group, status, says) in [
        (cohort_group("x", &["Patient"]), 400, "malformed"),
        (cohort_group("x", &["Condition?"]), 400, "malformed"),
        (cohort_group("x", &["condition?code=1"]), 400, "malformed"),
        (
            cohort_group("x", &["Patient?no-such-param=1"]),
            400,
            "not a search parameter the upstream lists",
        ),
        (
            cohort_group("x", &["Condition?code=1&_include=Condition:subject"]),
            400,
            "_include",
        ),
        (
            cohort_group("x", &["Organization?name=x"]),
            400,
            "not linked to a patient",
        ),
        (not_person, 400, "person"),
        (no_name, 400, "name"),
    ] {
        let resp = post_group(&proxy.base, &group, true, None);
        assert_eq!(resp.status().as_u16(), status, "{group}");
        let body: Value = resp.json().unwrap();
        let text = outcome_text(&body);
        assert!(text.contains(says), "{text}");
    }
}

/// A fake upstream with one Patient search parameter whose searches answer `page`'s reply, and a proxy
/// in front of it that does not retry; returns the final status of a cohort of `Patient?gender=female`.
fn cohort_on_fake_upstream(page: fn(&str, &str) -> Reply) -> (Mock, u16, Value, String) {
    let metadata = json!({
        "resourceType": "CapabilityStatement",
        "rest": [{"mode": "server", "resource": [{
            "type": "Patient",
            "interaction": [{"code": "read"}, {"code": "search-type"}],
            "searchParam": [{"name": "gender", "type": "token"}],
        }]}],
    });
    let base = std::sync::Arc::new(std::sync::OnceLock::<String>::new());
    let page_base = base.clone();
    let mock = Mock::routes()
        .route(
            Some("GET"),
            |p| p.ends_with("/metadata"),
            move |_| Reply::fhir(metadata.to_string()),
        )
        .route(
            Some("GET"),
            |p| p.ends_with("/Patient"),
            move |req| page(page_base.get().unwrap(), req.target()),
        )
        .start();
    base.set(mock.base()).unwrap();
    let proxy = Proxy::builder(&mock.base())
        .upstream_toml("max_retries = 0")
        .start();
    let status_url = create(
        &proxy.base,
        &cohort_group("fake", &["Patient?gender=female"]),
        None,
    );
    let (status, body) = wait_status(&status_url, None);
    let read = client()
        .get(format!("{}/Group/{}", proxy.base, id_of(&status_url)))
        .send()
        .unwrap();
    assert_eq!(read.status(), 404, "a failed cohort is served");
    (mock, status, body, status_url)
}

/// A searchset page of one Patient with the given self link and, optionally, a next link.
fn patient_page(self_link: &str, next: Option<&str>) -> Reply {
    let mut links = vec![json!({"relation": "self", "url": self_link})];
    links.extend(next.map(|n| json!({"relation": "next", "url": n})));
    Reply::fhir(
        json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "link": links,
            "entry": [{"resource": {"resourceType": "Patient", "id": "p1"}, "search": {"mode": "match"}}],
        })
        .to_string(),
    )
}

/// The upstream fails on the second page: the computation fails (502 on the status URL), the
/// upstream's address stays out of the answer, and no Group is served.
#[test]
fn upstream_failure_mid_computation_fails_the_cohort() {
    let (mock, status, body, _) = cohort_on_fake_upstream(|base, target| {
        if target.contains("page=2") {
            return Reply::fhir("{}").status(500);
        }
        patient_page(
            &format!("{base}/Patient?gender=female&_count=1000"),
            Some(&format!("{base}/Patient?gender=female&_count=1000&page=2")),
        )
    });
    assert_eq!(status, 502, "{body}");
    let text = outcome_text(&body);
    assert!(text.contains("answered 500"), "{text}");
    assert!(
        !text.contains("127.0.0.1"),
        "the upstream's address leaked: {text}"
    );
    let pages = mock
        .requests()
        .iter()
        .filter(|r| r.path().ends_with("/Patient"))
        .count();
    assert_eq!(pages, 2, "the computation stopped before the failing page");
}

/// An upstream that leaves the filter's parameter out of its self link ignored it: its matches would
/// be more patients than asked for, so the cohort fails.
#[test]
fn an_ignored_parameter_fails_the_cohort() {
    let (_mock, status, body, _) = cohort_on_fake_upstream(|base, _| {
        patient_page(&format!("{base}/Patient?_count=1000"), None)
    });
    assert_eq!(status, 502, "{body}");
    let text = outcome_text(&body);
    assert!(
        text.contains("ignored the search parameter(s) gender"),
        "{text}"
    );
}

#[test]
fn delete_and_refresh() {
    let upstream = upstream();
    let proxy = Proxy::start(&upstream, "");
    let status_url = create(
        &proxy.base,
        &cohort_group("males", &["Patient?gender=male"]),
        None,
    );
    let first = wait_group(&status_url, None);
    let id = id_of(&status_url);
    std::thread::sleep(Duration::from_millis(20));
    let refresh = client()
        .post(format!("{}/Group/{id}/$cohort-refresh", proxy.base))
        .send()
        .unwrap();
    assert_eq!(refresh.status(), 202);
    let second = wait_group(&status_url, None);
    assert_eq!(members_of(&second), members_of(&first));
    let refreshed = |g: &Value| {
        g["extension"][0]["valueDateTime"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(refreshed(&second) > refreshed(&first));
    let deleted = client()
        .delete(format!("{}/Group/{id}", proxy.base))
        .send()
        .unwrap();
    assert_eq!(deleted.status(), 204);
    for url in [format!("{}/Group/{id}", proxy.base), status_url] {
        let resp = client().get(&url).send().unwrap();
        assert_eq!(resp.status(), 404, "{url}");
    }
}

/// Ordinary Group traffic is the upstream's: without `Prefer: respond-async`, or without a
/// member-filter, the Group is created upstream as sent.
#[test]
fn other_group_posts_pass_through() {
    let upstream = upstream_rw();
    let proxy = Proxy::start(&upstream, "");
    let name = unique("plain-group");
    let plain = json!({"resourceType": "Group", "type": "person", "actual": true, "name": name});
    let with_filter = cohort_group(&name, &["Patient?gender=male"]);
    for (group, async_) in [(&plain, true), (&plain, false), (&with_filter, false)] {
        let (status, location, body) =
            status_header_body(post_group(&proxy.base, group, async_, None), "Location");
        assert_eq!(status, 201, "{body}");
        let location = location.unwrap();
        assert!(
            location.starts_with(&format!("{}/Group/", proxy.base)),
            "{location}"
        );
        let created: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(created["name"], name.as_str());
        let id = created["id"].as_str().unwrap();
        assert!(!id.starts_with("cohort-"));
        assert_eq!(
            get_json(&format!("{upstream}/Group/{id}"))["name"],
            name.as_str()
        );
    }
}

#[test]
fn scopes_and_ownership() {
    let upstream = upstream();
    let owner = BackendClient::new("cohort-owner");
    let other = BackendClient::new("cohort-other");
    let scopes = [
        "system/Group.cruds",
        "system/Patient.rs",
        "system/Group.read",
        "system/Group.write",
    ];
    let auth = format!(
        "{}\n{}",
        owner.auth_toml("", &scopes),
        other.client_toml(&scopes)
    );
    let proxy = Proxy::start(&upstream, &auth);
    let group = cohort_group("owned", &["Patient?gender=male"]);

    let read_only = owner.token(&proxy.base, "system/Group.rs system/Patient.rs");
    let resp = post_group(&proxy.base, &group, true, Some(&read_only));
    assert_eq!(resp.status(), 403, "creating with Group.rs only");
    let resp = post_group(&proxy.base, &group, true, None);
    assert_eq!(resp.status(), 401, "creating without a token");

    let v1_write = owner.token(&proxy.base, "system/Group.write");
    let status_url = create(&proxy.base, &group, Some(&v1_write));
    let create_only = owner.token(&proxy.base, "system/Group.cud");
    let resp = get_with_token(&status_url, Some(&create_only))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 403, "status with Group.cud only");

    let reader = owner.token(&proxy.base, "system/Group.read system/Patient.rs");
    let group = wait_group(&status_url, Some(&reader));
    let id = id_of(&status_url);
    assert!(!members_of(&group).is_empty());
    let exported = export_group(&proxy.base, &id, Some(&reader));
    assert_eq!(exported.keys().collect::<Vec<_>>(), ["Patient"]);

    let stranger = other.token(&proxy.base, "system/Group.cruds system/Patient.rs");
    for url in [status_url.clone(), format!("{}/Group/{id}", proxy.base)] {
        let resp = get_with_token(&url, Some(&stranger)).send().unwrap();
        assert_eq!(resp.status(), 404, "another client reads {url}");
    }
    let resp = kickoff_get(&proxy.base, &format!("Group/{id}/$export"), Some(&stranger));
    assert_eq!(resp.status(), 404, "another client exports the cohort");
    let resp = with_token(
        client().delete(format!("{}/Group/{id}", proxy.base)),
        Some(&stranger),
    )
    .send()
    .unwrap();
    assert_eq!(resp.status(), 404, "another client deletes the cohort");
    let found = get_with_token(&format!("{}/Group?_id={id}", proxy.base), Some(&stranger))
        .send()
        .unwrap();
    let found: Value = found.json().unwrap();
    assert_eq!(found["total"], 0, "{found}");
    let deleter = owner.token(&proxy.base, "system/Group.cruds");
    let resp = with_token(
        client().delete(format!("{}/Group/{id}", proxy.base)),
        Some(&deleter),
    )
    .send()
    .unwrap();
    assert_eq!(resp.status(), 204);
}

/// Group-level `_since` on a cohort: members who joined before `_since` get only what changed since,
/// a patient who joined at a later refresh gets its older resources too.
#[test]
fn since_gives_patients_who_joined_later_their_older_data() {
    let upstream = upstream_rw();
    let family = unique("cohort-since");
    let patient = |given: &str| {
        create_rw(
            &json!({"resourceType": "Patient", "name": [{"family": family, "given": [given]}]}),
        )
    };
    let (early, late) = (patient("early"), patient("late"));
    let code = unique("code");
    let observation = |subject: &Value| {
        create_rw(&json!({
            "resourceType": "Observation",
            "status": "final",
            "code": {"coding": [{"system": "http://example.org/cohort-test", "code": code}]},
            "subject": {"reference": format!("Patient/{}", subject["id"].as_str().unwrap())},
        }))
    };
    let early_observation = observation(&early);
    let proxy = Proxy::start(&upstream, "");
    let status_url = create(
        &proxy.base,
        &cohort_group(
            "joined later",
            &[&format!(
                "Observation?code={}",
                enc(&format!("http://example.org/cohort-test|{code}"))
            )],
        ),
        None,
    );
    let id_str = |r: &Value| r["id"].as_str().unwrap().to_owned();
    assert_eq!(
        members_of(&wait_group(&status_url, None)),
        [id_str(&early)].into()
    );
    std::thread::sleep(Duration::from_millis(1100));
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    std::thread::sleep(Duration::from_millis(1100));
    let late_observation = observation(&late);
    let id = id_of(&status_url);
    let refresh = client()
        .post(format!("{}/Group/{id}/$cohort-refresh", proxy.base))
        .send()
        .unwrap();
    assert_eq!(refresh.status(), 202);
    assert_eq!(
        members_of(&wait_group(&status_url, None)),
        [id_str(&early), id_str(&late)].into()
    );
    let exported = export(
        &proxy.base,
        &format!(
            "Group/{id}/$export?_type=Patient,Observation&_since={}",
            enc(&since)
        ),
        None,
    );
    let ids = |t: &str| -> BTreeSet<String> {
        exported.get(t).into_iter().flatten().map(id_str).collect()
    };
    // The early member's Patient and Observation predate `_since`: left out. The late one's Patient
    // predates it too, but the patient joined after it.
    assert_eq!(ids("Patient"), [id_str(&late)].into());
    assert_eq!(ids("Observation"), [id_str(&late_observation)].into());
    assert!(!ids("Observation").contains(&id_str(&early_observation)));
}
