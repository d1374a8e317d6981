//! The shim's sources keep the rules of `api/tests/common/code_rules.rs`: its modules
//! depend one way, in the layer order below (the one ARCHITECTURE.md draws), and no
//! production file or function grows past its limit. Each failure names the file and the
//! import or function.

#[path = "../../api/tests/common/code_rules.rs"]
mod code_rules;

/// Bottom to top; a module may use only modules of a lower layer.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["util"],
    &["spec", "events", "process", "cgroup"],
    &["fscapture"],
    &["runtime"],
    &["state"],
    &["checkpoint"],
    &["task"],
    &["sandbox"],
    &["service"],
    &["bootstrap"],
];

#[test]
fn modules_depend_one_way() {
    let (violations, checked) = code_rules::layer_violations(env!("CARGO_MANIFEST_DIR"), LAYERS);
    assert!(
        checked > 50,
        "the scan found only {checked} imports: is it reading the code?"
    );
    assert!(
        violations.is_empty(),
        "imports against the layer order:\n{}",
        violations.join("\n")
    );
}

#[test]
fn files_and_functions_stay_small() {
    let (over, counted) = code_rules::size_violations(env!("CARGO_MANIFEST_DIR"));
    assert!(
        counted > 300,
        "the scan found only {counted} functions: is it reading the code?"
    );
    assert!(over.is_empty(), "too long:\n{}", over.join("\n"));
}
