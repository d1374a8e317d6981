//! The controller's sources keep the rules of `api/tests/common/code_rules.rs`: its modules
//! depend one way, in the layer order below (the one ARCHITECTURE.md draws), and no
//! production file or function grows past its limit. Each failure names the file and the
//! import or function.

#[path = "../../api/tests/common/code_rules.rs"]
mod code_rules;

/// Bottom to top; a module may use only modules of a lower layer.
const LAYERS: &[&[&str]] = &[
    // Plain helpers: sizes and times for people; private files and directories; the log.
    &["display", "files", "logging"],
    // What long work reports while it runs.
    &["progress"],
    // Typed clients and keys: containerd's CRI, the pod shim's Checkpoint service, seals.
    &["cri", "shim", "seal"],
    // containerd's event service (on the CRI channel).
    &["events"],
    // What a restore may ask for.
    &["policy"],
    // The checkpoint format: layout, manifest, bounded reader, writer, summary.
    &["archive"],
    // Transports: checkpoint images in containerd's store, the migration stream.
    &["image", "stream"],
    // Operations: ls, checkpoint, restore, migrate, inspect (one module each); the pods the
    // bench and the end-to-end tests run; the metrics endpoint over the events.
    &["ops", "workload", "metrics"],
    // The bench: the same workloads through several runtime handlers.
    &["bench"],
    // The command line: clap's definitions and printing.
    &["cli"],
];

#[test]
fn modules_depend_one_way() {
    code_rules::assert_layers(env!("CARGO_MANIFEST_DIR"), LAYERS);
}

#[test]
fn files_and_functions_stay_small() {
    code_rules::assert_small(env!("CARGO_MANIFEST_DIR"), 200);
}
