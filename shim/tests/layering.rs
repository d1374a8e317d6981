//! The shim's modules depend one way. This test reads every source file and fails when a
//! module uses one of its own layer or above (which is how cycles start), naming the file and
//! the import. The layer order is the one ARCHITECTURE.md draws.

use std::path::{Path, PathBuf};

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

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level modules named after each `crate::` in `text` (`crate::a::b`, and every item
/// of `crate::{a::x, b}`).
fn crate_imports(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: the identifier after `{` or a depth-0 comma.
            let mut depth = 0;
            let mut start = true;
            for (j, ch) in group.char_indices() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_alphanumeric() || c == '_') => {
                        let ident: String = group[j..]
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        found.push(ident);
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.push(ident);
        }
    }
    found
}

#[test]
fn modules_depend_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let module = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if module == "main" || module == "lib" {
            continue;
        }
        let own = layer_of(&module)
            .unwrap_or_else(|| panic!("module {module} ({}) has no layer", rel.display()));
        let text = std::fs::read_to_string(f).unwrap();
        for used in crate_imports(&text) {
            checked += 1;
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < own => {}
                _ => violations.push(format!("{} uses crate::{used}", rel.display())),
            }
        }
    }
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
fn the_scan_sees_grouped_and_nested_imports() {
    let found = crate_imports(
        "use crate::{error::{Error, Result}, runtime::X};\nlet x = crate::task::f();",
    );
    assert_eq!(found, ["error", "runtime", "task"]);
}
