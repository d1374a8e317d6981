//! The controller's modules depend one way, and stay small. This test reads every source
//! file and fails when a module uses one of its own layer or above (which is how cycles
//! start), when a production file grows over 600 lines, or a function over 100; it names
//! the file, the import or the function. The layer order is the one ARCHITECTURE.md draws.

use std::path::{Path, PathBuf};

/// Bottom to top; a module may use only modules of a lower layer.
const LAYERS: &[&[&str]] = &[
    // Plain helpers: sizes and times for people; private files and directories.
    &["display", "files"],
    // Typed clients and keys: containerd's CRI, the pod shim's Checkpoint service, seals.
    &["cri", "shim", "seal"],
    // What a restore may ask for.
    &["policy"],
    // The checkpoint format: layout, manifest, bounded reader, writer, summary.
    &["archive"],
    // Transports: checkpoint images in containerd's store, the migration stream.
    &["image", "stream"],
    // Operations: ls, checkpoint, restore, migrate, inspect (one module each); the pods the
    // bench and the end-to-end tests run.
    &["ops", "workload"],
    // The bench: the same workloads through several runtime handlers.
    &["bench"],
    // The command line: clap's definitions and printing.
    &["cli"],
];

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 100;

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

/// The top-level modules named after each `crate::` in `text` (`crate::a::b`, and every
/// item of `crate::{a::x, b}`).
fn crate_imports(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            found.push(ident(rest));
            continue;
        };
        // Top-level items of the group: the identifier after `{` or a depth-0 comma.
        let (mut depth, mut start) = (0, true);
        for (j, ch) in group.char_indices() {
            match ch {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => start = true,
                c if start && (c.is_alphanumeric() || c == '_') => {
                    found.push(ident(&group[j..]));
                    start = false;
                }
                _ => {}
            }
        }
    }
    found
}

/// A file that holds only tests.
fn is_test_file(rel: &Path) -> bool {
    rel.file_name().is_some_and(|n| n == "tests.rs")
}

/// The file's text without its trailing `#[cfg(test)] mod tests { … }`.
fn production_part(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests {") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// Functions longer than `MAX_FN_LINES`: from the `fn` line to the brace that closes it at
/// the same indentation.
fn long_functions(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let after_vis = trimmed
            .trim_start_matches("pub(crate) ")
            .trim_start_matches("pub(super) ")
            .trim_start_matches("pub ")
            .trim_start_matches("async ")
            .trim_start_matches("unsafe ");
        let Some(name) = after_vis.strip_prefix("fn ") else {
            continue;
        };
        if line.trim_end().ends_with(';') {
            continue;
        }
        let end = lines[i..]
            .iter()
            .position(|l| {
                l.len() > indent && l[..indent].trim().is_empty() && l[indent..].starts_with('}')
            })
            .map(|k| i + k);
        if let Some(end) = end {
            let n = end - i + 1;
            if n > MAX_FN_LINES {
                let name: String = name
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                out.push((i + 1, name, n));
            }
        }
    }
    out
}

fn sources() -> (PathBuf, Vec<PathBuf>) {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    (src, files)
}

#[test]
fn modules_depend_one_way() {
    let (src, files) = sources();
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
fn files_and_functions_stay_small() {
    let (src, files) = sources();
    let mut too_big = Vec::new();
    let mut functions = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        if is_test_file(rel) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let code = production_part(&text);
        let lines = code.lines().count();
        if lines > MAX_FILE_LINES {
            too_big.push(format!("{}: {lines} lines", rel.display()));
        }
        functions += code.matches("fn ").count();
        for (line, name, n) in long_functions(code) {
            too_big.push(format!("{}:{line}: fn {name} is {n} lines", rel.display()));
        }
    }
    assert!(
        functions > 200,
        "only {functions} functions found: is it reading the code?"
    );
    assert!(
        too_big.is_empty(),
        "over {MAX_FILE_LINES} lines a file or {MAX_FN_LINES} a function:\n{}",
        too_big.join("\n")
    );
}

#[test]
fn the_checks_see_what_they_look_for() {
    // The scanners themselves, on text that breaks each rule.
    assert_eq!(
        crate_imports("use crate::{ops::x, archive::{a, b}};\nlet y = crate::cli::run;"),
        ["ops", "archive", "cli"]
    );
    let long = format!(
        "    pub async fn big() {{\n{}    }}\n",
        "        x();\n".repeat(120)
    );
    assert_eq!(long_functions(&long), [(1, "big".to_string(), 122)]);
    assert!(long_functions("fn small() {\n}\n").is_empty());
    assert_eq!(
        production_part("fn a() {}\n#[cfg(test)]\nmod tests {\n}\n"),
        "fn a() {}\n"
    );
}
