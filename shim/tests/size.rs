//! Size limits of the shim's sources: no production file over 600 lines, no function over
//! 100. A long file or function is where unrelated steps pile up; this test names each one
//! that grows past its limit. Files and modules that only hold tests are not counted.

use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 100;

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

/// A file that holds only tests: `tests.rs`, `*_tests.rs`, or one below a `tests/` folder.
fn test_only(rel: &Path) -> bool {
    let name = rel.file_name().unwrap().to_string_lossy();
    name == "tests.rs"
        || name.ends_with("_tests.rs")
        || rel.components().any(|c| c.as_os_str() == "tests")
}

fn indent_of(line: &str) -> &str {
    &line[..line.len() - line.trim_start().len()]
}

/// Whether `line` starts a function item (`pub(crate) async fn x(`, `const fn`, …).
fn starts_fn(line: &str) -> bool {
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
fn block_end(lines: &[&str], i: usize) -> Option<usize> {
    let indent = indent_of(lines[i]);
    let close = format!("{indent}}}");
    (i + 1..lines.len())
        .find(|&j| lines[j].starts_with(&close))
        .map(|j| j + 1)
}

/// Every function of `text` with a body, as (first line number, name, lines from its `fn`
/// line to its closing brace), leaving out `#[cfg(test)]` modules.
fn functions(text: &str) -> Vec<(usize, String, usize)> {
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

#[test]
fn files_and_functions_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut over = Vec::new();
    let mut counted = 0;
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
    assert!(
        counted > 300,
        "the scan found only {counted} functions: is it reading the code?"
    );
    assert!(over.is_empty(), "too long:\n{}", over.join("\n"));
}

#[test]
fn the_scan_measures_functions_from_fn_to_their_brace() {
    let text = "\
pub(crate) async fn a(
    x: u32,
) -> u32 {
    if x > 0 {
        1
    } else {
        2
    }
}

trait T {
    fn declared(&self)
        -> u32;
    fn one(&self) -> u32 { 1 }
}

#[cfg(test)]
mod tests {
    fn skipped() {
    }
}

const fn b()
where
    u32: Copy,
{
}
";
    let found: Vec<(String, usize)> = functions(text)
        .into_iter()
        .map(|(_, n, l)| (n, l))
        .collect();
    assert_eq!(
        found,
        [("a".to_string(), 9), ("one".into(), 1), ("b".into(), 5)]
    );
    assert!(test_only(Path::new("task/tests.rs")));
    assert!(test_only(Path::new("runtime/images/tests.rs")));
    assert!(!test_only(Path::new("runtime/images.rs")));
}
