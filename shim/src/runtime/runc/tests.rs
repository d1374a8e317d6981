use super::*;

#[test]
fn a_gone_process_is_recognised_in_each_runtime_wording() {
    assert!(is_finished("container not running"));
    assert!(is_finished(
        "unable to signal init: os: process already finished"
    ));
    assert!(is_finished("kill: No such process"));
    assert!(!is_finished("permission denied"));
}
