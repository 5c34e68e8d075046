//! The source's import graph, read from the files: layers point one way (`http` → `infer` →
//! `model` / `pool` / `text`), and inside `infer` no module imports one that imports it back,
//! directly or around a loop (docs/architecture.md). A `use super::x` or a `super::x::` path
//! counts as an import of the sibling `x`; `crate::x` of the top-level module `x`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

fn src() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The code of a file without its comments and its `#[cfg(test)]` module (tests may reach
/// anywhere).
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = match text.find("#[cfg(all(test").or_else(|| text.find("#[cfg(test)]")) {
        Some(i) => &text[..i],
        None => &text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// Names that follow `prefix` in `code` (`super::` → `read`, `queue`, …).
fn after(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in code.match_indices(prefix) {
        let rest = &code[i + prefix.len()..];
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() {
            out.insert(name);
        }
        // `use super::{a, b::c}`: every name at the top of the braces.
        if let Some(inner) = rest.strip_prefix('{') {
            let (mut depth, mut cur) = (0, String::new());
            for c in inner.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 && (c == ',' || c == ':') {
                    let n = cur.trim().to_string();
                    if !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                        out.insert(n);
                    }
                    cur.clear();
                } else if depth == 0 {
                    cur.push(c);
                }
            }
            let n = cur.trim().to_string();
            if !n.is_empty() {
                out.insert(n);
            }
        }
    }
    out
}

/// `infer`'s modules and the siblings each imports.
fn infer_graph() -> BTreeMap<String, BTreeSet<String>> {
    let dir = src().join("infer");
    let modules: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".rs")).map(str::to_string))
        .filter(|n| n != "mod")
        .collect();
    modules
        .iter()
        .map(|m| {
            let c = code(&dir.join(format!("{m}.rs")));
            let mut deps: BTreeSet<String> = after(&c, "super::").into_iter().filter(|d| modules.contains(d) && d != m).collect();
            deps.extend(after(&c, "crate::infer::").into_iter().filter(|d| modules.contains(d) && d != m));
            (m.clone(), deps)
        })
        .collect()
}

#[test]
fn no_infer_module_imports_one_that_imports_it_back() {
    let graph = infer_graph();
    assert!(graph.len() >= 10, "infer's modules were not found: {graph:?}");
    assert!(graph["worker"].contains("read") && graph["handle"].contains("queue"), "the scan misses imports: {graph:?}");
    // Depth-first search for a cycle; report it as a path.
    fn visit(n: &str, g: &BTreeMap<String, BTreeSet<String>>, path: &mut Vec<String>, done: &mut BTreeSet<String>) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut cycle = path[i..].to_vec();
            cycle.push(n.to_string());
            return Some(cycle);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_string());
        for d in &g[n] {
            if let Some(c) = visit(d, g, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in graph.keys() {
        if let Some(cycle) = visit(n, &graph, &mut Vec::new(), &mut done) {
            panic!("infer modules import each other around a loop: {}", cycle.join(" → "));
        }
    }
    // `mod.rs` only names the rooms and re-exports: nothing else of infer lives there.
    let m = code(&src().join("infer/mod.rs"));
    for line in m.lines().map(str::trim).filter(|l| !l.is_empty()) {
        assert!(
            line.starts_with("pub mod ") || line.starts_with("mod ") || line.starts_with("pub use "),
            "infer/mod.rs holds more than module names and re-exports: {line}"
        );
    }
}

#[test]
fn layers_point_one_way() {
    let mut problems = Vec::new();
    let below = ["model", "pool", "text"];
    for room in below {
        let path = src().join(room);
        let files: Vec<std::path::PathBuf> = if path.is_dir() { walk(&path) } else { vec![path] };
        for f in files {
            let c = code(&f);
            for up in ["infer", "http", "serve", "offline"] {
                if after(&c, "crate::").contains(up) {
                    problems.push(format!("{} imports crate::{up}", f.display()));
                }
            }
        }
    }
    for f in walk(&src().join("infer")) {
        let c = code(&f);
        for up in ["http", "serve", "offline"] {
            if after(&c, "crate::").contains(up) {
                problems.push(format!("{} imports crate::{up}", f.display()));
            }
        }
    }
    assert!(problems.is_empty(), "imports against the layers:\n{}", problems.join("\n"));
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}
