//! The shim's sources keep the rules of `api/tests/common/code_rules.rs`: its modules
//! depend one way, in the layer order below (the one ARCHITECTURE.md draws), and no
//! production file or function grows past its limit. Each failure names the file and the
//! import or function.

#[path = "../../api/tests/common/code_rules.rs"]
mod code_rules;

/// Bottom to top; a module may use only modules of a lower layer.
const LAYERS: &[&[&str]] = &[
    &["error", "logging"],
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
    code_rules::assert_layers(env!("CARGO_MANIFEST_DIR"), LAYERS);
}

#[test]
fn files_and_functions_stay_small() {
    code_rules::assert_small(env!("CARGO_MANIFEST_DIR"), 300);
}
