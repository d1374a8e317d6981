//! The api crate's sources stay small (`api/tests/common/code_rules.rs`).

mod common {
    pub mod code_rules;
}
use common::code_rules;

#[test]
fn files_and_functions_stay_small() {
    let (over, counted) = code_rules::size_violations(env!("CARGO_MANIFEST_DIR"));
    assert!(
        counted > 20,
        "the scan found only {counted} functions: is it reading the code?"
    );
    assert!(over.is_empty(), "too long:\n{}", over.join("\n"));
}
