//! The crate's layering, checked: every `crate::…` path in `src/` must point
//! to a module of a lower layer than the file's own (see the table in
//! `src/lib.rs`, which this test reads), and no source file may grow past
//! ~800 lines outside its tests.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The layer table of `src/lib.rs`: module → layer.
fn layers() -> BTreeMap<String, u32> {
    let lib = fs::read_to_string(src().join("lib.rs")).expect("read src/lib.rs");
    let mut layers = BTreeMap::new();
    let mut in_table = false;
    for line in lib.lines() {
        let line = line.trim_start_matches("//!").trim();
        if line.starts_with("layer") && line.contains("modules") {
            in_table = true;
            continue;
        }
        if in_table && line.starts_with("```") {
            break;
        }
        if in_table {
            let mut words = line.split_whitespace();
            let layer: u32 = words
                .next()
                .and_then(|w| w.parse().ok())
                .unwrap_or_else(|| panic!("lib.rs layer table: bad row {line:?}"));
            for module in words {
                layers.insert(module.to_string(), layer);
            }
        }
    }
    assert!(!layers.is_empty(), "no layer table found in src/lib.rs");
    layers
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for the
/// crate root and the binary).
fn module_of(path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src()).expect("under src");
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "main").then(|| name.to_string())
}

/// Modules named by `crate::NAME` in code (comments are skipped), with
/// their line numbers; `use crate::{a, b}` groups count each name.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.push((n + 1, name));
                    }
                }
            } else {
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push((n + 1, name));
                }
            }
            rest = after;
        }
    }
    found
}

/// Every import of a module by another must point to a lower layer.
fn violations(layers: &BTreeMap<String, u32>) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    files.sort();
    let mut problems = Vec::new();
    for file in files {
        let Some(module) = module_of(&file) else {
            continue;
        };
        let rel = file.strip_prefix(src()).expect("under src").display();
        let Some(&own) = layers.get(&module) else {
            problems.push(format!(
                "src/{rel}: module `{module}` is not in the layer table of src/lib.rs"
            ));
            continue;
        };
        let text = fs::read_to_string(&file).expect("read source");
        for (line, target) in crate_paths(&text) {
            if target == module {
                continue;
            }
            match layers.get(&target) {
                None => problems.push(format!(
                    "src/{rel}:{line}: `crate::{target}` is not in the layer table of src/lib.rs"
                )),
                Some(&layer) if layer >= own => problems.push(format!(
                    "src/{rel}:{line}: `{module}` (layer {own}) uses `crate::{target}` (layer {layer}); \
                     modules may only use lower layers"
                )),
                Some(_) => {}
            }
        }
    }
    problems
}

#[test]
fn modules_only_use_lower_layers() {
    let problems = violations(&layers());
    assert!(
        problems.is_empty(),
        "layering violations:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn the_check_sees_an_upward_import() {
    // `state` (layer 0) naming `crate::proxy` must be reported.
    let layers = layers();
    assert_eq!(layers.get("state"), Some(&0));
    let paths = crate_paths("use crate::proxy::Proxy; // crate::admin in a comment\n");
    assert_eq!(paths, vec![(1, "proxy".to_string())]);
    let grouped = crate_paths("use crate::{lb::Host, state::Labels};\n");
    assert_eq!(
        grouped,
        vec![(1, "lb".to_string()), (1, "state".to_string())]
    );
}

/// Lines of a file before its `#[cfg(test)]` module.
fn code_lines(text: &str) -> usize {
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .count()
}

#[test]
fn no_source_file_over_800_lines_outside_tests() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut long = Vec::new();
    for file in files {
        if file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = fs::read_to_string(&file).expect("read source");
        let lines = code_lines(&text);
        if lines > 800 {
            long.push(format!("{} ({lines} lines)", file.display()));
        }
    }
    assert!(
        long.is_empty(),
        "split these by concern: {}",
        long.join(", ")
    );
}
