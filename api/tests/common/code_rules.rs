//! Rules every crate's sources keep, read from the sources themselves: modules depend one
//! way (a module uses only modules of a lower layer, so no cycle can start), no production
//! file over 600 lines, no function over 100. Each crate's `tests/layering.rs` includes this
//! file with its own layer order.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub const MAX_FILE_LINES: usize = 600;
pub const MAX_FN_LINES: usize = 100;

pub fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// A file that holds only tests: `tests.rs`, `*_tests.rs`, or one below a `tests/` folder.
pub fn test_only(rel: &Path) -> bool {
    let name = rel.file_name().unwrap().to_string_lossy();
    name == "tests.rs"
        || name.ends_with("_tests.rs")
        || rel.components().any(|c| c.as_os_str() == "tests")
}

pub fn indent_of(line: &str) -> &str {
    &line[..line.len() - line.trim_start().len()]
}

/// Whether `line` starts a function item (`pub(crate) async fn x(`, `const fn`, …).
pub fn starts_fn(line: &str) -> bool {
    let mut rest = line.trim_start();
    loop {
        if let Some(r) = rest.strip_prefix("pub(") {
            rest = r.split_once(')').map_or("", |(_, r)| r).trim_start();
        } else if let Some(r) = ["pub ", "const ", "async ", "unsafe ", "extern \"C\" "]
            .iter()
            .find_map(|p| rest.strip_prefix(p))
        {
            rest = r.trim_start();
        } else {
            return rest.starts_with("fn ");
        }
    }
}

/// The line after the closing brace that matches the block opening at line `i` (indented
/// like it); `None` when there is none.
pub fn block_end(lines: &[&str], i: usize) -> Option<usize> {
    let indent = indent_of(lines[i]);
    let close = format!("{indent}}}");
    (i + 1..lines.len())
        .find(|&j| lines[j].starts_with(&close))
        .map(|j| j + 1)
}

/// Every function of `text` with a body, as (first line number, name, lines from its `fn`
/// line to its closing brace), leaving out `#[cfg(test)]` modules.
pub fn functions(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let test_module = line.trim() == "#[cfg(test)]"
            && lines.get(i + 1).is_some_and(|l| {
                let l = l.trim_start();
                (l.starts_with("mod ") || l.starts_with("pub mod ")) && l.ends_with('{')
            });
        if test_module {
            i = block_end(&lines, i + 1).unwrap_or(lines.len());
            continue;
        }
        if starts_fn(line) {
            let name: String = line
                .split("fn ")
                .nth(1)
                .unwrap_or("")
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            // The signature ends at the body's `{`, or at `;` for a declaration.
            let body = (i..lines.len())
                .find(|&j| lines[j].contains('{') || lines[j].trim_end().ends_with(';'));
            if let Some(b) = body.filter(|&b| lines[b].contains('{')) {
                let opened = lines[b].matches('{').count();
                let closed = lines[b].matches('}').count();
                let end = if opened == closed && lines[b].trim_end().ends_with('}') {
                    b + 1
                } else {
                    block_end(&lines, i).unwrap_or(lines.len())
                };
                found.push((i + 1, name, end - i));
            }
        }
        i += 1;
    }
    found
}

/// The top-level modules named after each `crate::` in `text` (`crate::a::b`, and every
/// item of `crate::{a::x, b}`).
pub fn crate_imports(text: &str) -> Vec<String> {
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

/// The sources of the crate whose manifest is in `manifest_dir`: (its `src`, every `.rs`).
pub fn sources(manifest_dir: &str) -> (PathBuf, Vec<PathBuf>) {
    let src = Path::new(manifest_dir).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    (src, files)
}

/// Imports against `layers` (bottom to top) in the crate at `manifest_dir`, and how many
/// imports were read. Panics on a module with no layer.
pub fn layer_violations(manifest_dir: &str, layers: &[&[&str]]) -> (Vec<String>, usize) {
    let layer_of = |m: &str| layers.iter().position(|l| l.contains(&m));
    let (src, files) = sources(manifest_dir);
    let (mut violations, mut checked) = (Vec::new(), 0);
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
            match layer_of(&used) {
                _ if used == module => {}
                Some(l) if l < own => {}
                _ => violations.push(format!("{} uses crate::{used}", rel.display())),
            }
        }
    }
    (violations, checked)
}

/// Files over `MAX_FILE_LINES` and functions over `MAX_FN_LINES` in the crate at
/// `manifest_dir` (test-only files left out), and how many functions were read.
pub fn size_violations(manifest_dir: &str) -> (Vec<String>, usize) {
    let (src, files) = sources(manifest_dir);
    let (mut over, mut counted) = (Vec::new(), 0);
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        if test_only(rel) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        let lines = text.lines().count();
        if lines > MAX_FILE_LINES {
            over.push(format!(
                "{}: {lines} lines (at most {MAX_FILE_LINES})",
                rel.display()
            ));
        }
        for (at, name, len) in functions(&text) {
            counted += 1;
            if len > MAX_FN_LINES {
                over.push(format!(
                    "{}:{at}: fn {name} has {len} lines (at most {MAX_FN_LINES})",
                    rel.display()
                ));
            }
        }
    }
    (over, counted)
}

/// Fails, naming each import, when the crate at `manifest_dir` breaks its layer order.
pub fn assert_layers(manifest_dir: &str, layers: &[&[&str]]) {
    let (violations, checked) = layer_violations(manifest_dir, layers);
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

/// Fails, naming each, when a file or function of the crate at `manifest_dir` is too long;
/// `min_functions` guards against a scan that reads nothing.
pub fn assert_small(manifest_dir: &str, min_functions: usize) {
    let (over, counted) = size_violations(manifest_dir);
    assert!(
        counted > min_functions,
        "the scan found only {counted} functions: is it reading the code?"
    );
    assert!(over.is_empty(), "too long:\n{}", over.join("\n"));
}

#[test]
fn the_rules_see_what_they_look_for() {
    assert_eq!(
        crate_imports("use crate::{ops::x, archive::{a, b}};\nlet y = crate::cli::run;"),
        ["ops", "archive", "cli"]
    );
    let long = format!(
        "    pub async fn big() {{\n{}    }}\n",
        "        x();\n".repeat(120)
    );
    assert_eq!(functions(&long), [(1, "big".to_string(), 122)]);
    let tests = format!("#[cfg(test)]\nmod tests {{\n{long}}}\n");
    assert!(functions(&tests).is_empty());
    assert!(test_only(Path::new("archive/tests.rs")));
    assert!(!test_only(Path::new("archive/write.rs")));
}
