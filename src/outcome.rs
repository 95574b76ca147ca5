//! FHIR OperationOutcome resources.

/// An OperationOutcome with one issue.
pub fn outcome(severity: &str, code: &str, diagnostics: &str) -> serde_json::Value {
    serde_json::json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}],
    })
}
