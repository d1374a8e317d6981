//! The api crate's sources stay small (`api/tests/common/code_rules.rs`).

mod common {
    pub mod code_rules;
}
use common::code_rules;

#[test]
fn files_and_functions_stay_small() {
    code_rules::assert_small(env!("CARGO_MANIFEST_DIR"), 20);
}
