//! The one-way layer rule of a crate, checked on its sources (a test helper of the controller
//! and the agent; not part of either program).
//!
//! Every module path a file names (`use crate::…`, `crate::…`, `super::…`, and a child module
//! by its bare name; comments, strings and inline `#[cfg(test)]` modules left out) must lead to
//! the same top-level unit or to a lower layer, never up and never sideways to another unit of
//! the same layer; and the files must not import each other in a loop.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A source file as a module path: `src/reconcile/core/plan.rs` → `reconcile::core::plan`,
/// `src/kubernetes/mod.rs` → `kubernetes`, `src/lib.rs` → `` (the crate root).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and string literals (doc links and messages name
/// modules without depending on them).
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            i += 2;
            while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                i += 1;
            }
            i += 2;
        } else if b[i] == b'"' {
            // A string literal (raw strings of this crate hold no quotes before their end).
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal such as '"'.
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

/// The code without its inline test modules (`#[cfg(test)] mod tests { … }`): their
/// `use super::*` means the file itself, and test code may reach anywhere.
fn without_tests(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(at) = out.find("#[cfg(test)]") {
        let rest = &out[at..];
        let Some(open) = rest.find('{') else { break };
        if !rest[..open].contains("mod ") {
            // `#[cfg(test)]` on something else: keep it, look further.
            out.replace_range(at..at + "#[cfg(test)]".len(), "");
            continue;
        }
        let mut depth = 0;
        let mut end = rest.len();
        for (i, c) in rest[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(at..at + end, "");
    }
    out
}

/// Every module path the code names, as absolute paths (`["reconcile", "model", "Publish"]`).
fn referenced(module: &[String], code: &str, modules: &BTreeSet<Vec<String>>) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    let mut at_use = false;
    while i < chars.len() {
        if !ident(chars[i]) || (i > 0 && (ident(chars[i - 1]) || chars[i - 1] == ':')) {
            if chars[i] == ';' {
                at_use = false;
            }
            i += 1;
            continue;
        }
        // A path: idents joined by `::`, possibly ending in `{…}` groups.
        let start = i;
        let mut segs: Vec<String> = Vec::new();
        loop {
            let s = i;
            while i < chars.len() && ident(chars[i]) {
                i += 1;
            }
            segs.push(chars[s..i].iter().collect());
            if i + 2 < chars.len() && chars[i] == ':' && chars[i + 1] == ':' && ident(chars[i + 2])
            {
                i += 2;
            } else {
                break;
            }
        }
        let mut group: Vec<Vec<String>> = vec![segs.clone()];
        if i + 2 < chars.len() && chars[i] == ':' && chars[i + 1] == ':' && chars[i + 2] == '{' {
            // `prefix::{a, b::c, self}`: one path per entry (nested groups flattened by name).
            let mut depth = 0;
            let s = i + 2;
            let mut j = s;
            while j < chars.len() {
                match chars[j] {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            let inner: String = chars[s + 1..j].iter().collect();
            group = inner
                .split([',', '{', '}'])
                .map(|e| e.trim())
                .filter(|e| !e.is_empty())
                .map(|e| {
                    let mut p = segs.clone();
                    p.extend(
                        e.split(" as ")
                            .next()
                            .unwrap()
                            .split("::")
                            .map(|x| x.trim().to_string())
                            .filter(|x| !x.is_empty() && x != "self" && x != "*"),
                    );
                    p
                })
                .collect();
            i = j + 1;
        }
        let word: String = chars[start..].iter().take_while(|c| ident(**c)).collect();
        if word == "use" {
            at_use = true;
            continue;
        }
        for p in group {
            let abs = match p.first().map(String::as_str) {
                Some("crate") => Some(p[1..].to_vec()),
                Some("super") => {
                    let mut m = module.to_vec();
                    let mut rest = &p[..];
                    while rest.first().map(String::as_str) == Some("super") {
                        m.pop();
                        rest = &rest[1..];
                    }
                    m.extend(rest.iter().cloned());
                    Some(m)
                }
                Some("self") => {
                    let mut m = module.to_vec();
                    m.extend(p[1..].iter().cloned());
                    Some(m)
                }
                // A bare name is a child module when one exists by that name (`use plan::X`
                // in `core/mod.rs`); in a `use` it cannot be anything else of this crate.
                Some(first) if p.len() > 1 || at_use => {
                    let mut child = module.to_vec();
                    child.push(first.to_string());
                    modules.contains(&child).then(|| {
                        let mut m = module.to_vec();
                        m.extend(p.iter().cloned());
                        m
                    })
                }
                _ => None,
            };
            if let Some(a) = abs {
                out.push(a);
            }
        }
    }
    out
}

/// The module (a file) a path lands in: its longest prefix that is a module.
fn file_of(path: &[String], modules: &BTreeSet<Vec<String>>) -> Option<Vec<String>> {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Imports that go up a layer or sideways to another unit of the same layer (or to a unit
    /// the table does not list), one line each.
    pub upward: Vec<String>,
    /// Loops between files, one line each (`a -> b -> a`).
    pub loops: Vec<String>,
}

/// Checks the crate whose sources are under `src` against `layers` (each top-level module or
/// folder and its layer, lowest 0). `extra` appends code to modules (`("a::b", "use …;")`), so a
/// test can show the check catching a violation. `main.rs` and `bin/` are left out: programs use
/// the crate from outside.
pub fn check(src: &Path, layers: &[(&str, u8)], extra: &[(&str, &str)]) -> Report {
    let mut files: Vec<PathBuf> = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                // The programs use the crate from outside, like any other user.
                if p.file_name().is_some_and(|n| n != "bin") {
                    stack.push(p);
                }
            } else if p.extension().is_some_and(|x| x == "rs")
                && p.file_name().is_some_and(|n| n != "main.rs")
            {
                files.push(p);
            }
        }
    }
    let mut texts: BTreeMap<Vec<String>, String> = files
        .iter()
        .map(|f| (module_of(src, f), std::fs::read_to_string(f).unwrap()))
        .collect();
    for (module, text) in extra {
        let m: Vec<String> = module.split("::").map(str::to_string).collect();
        texts.entry(m).or_default().push_str(text);
    }
    let modules: BTreeSet<Vec<String>> = texts.keys().cloned().collect();
    let rank: BTreeMap<&str, u8> = layers.iter().copied().collect();
    let mut upward = Vec::new();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for (module, text) in &texts {
        let Some(unit) = module.first() else { continue };
        let Some(&own) = rank.get(unit.as_str()) else {
            upward.push(format!("{}: not in LAYERS", module.join("::")));
            continue;
        };
        let code = without_tests(&code_only(text))
            .replace("pub(super)", "pub")
            .replace("pub(crate)", "pub");
        for path in referenced(module, &code, &modules) {
            let Some(target) = file_of(&path, &modules) else {
                continue;
            };
            if target == *module {
                continue;
            }
            let Some(tunit) = target.first() else {
                continue;
            };
            if tunit != unit {
                match rank.get(tunit.as_str()) {
                    Some(&r) if r < own => {}
                    Some(&r) => upward.push(format!(
                        "{} (layer {own}) uses {} (layer {r}): {}",
                        module.join("::"),
                        target.join("::"),
                        path.join("::")
                    )),
                    None => upward.push(format!(
                        "{} uses {}, which is not in LAYERS",
                        module.join("::"),
                        target.join("::")
                    )),
                }
            }
            if std::env::var("LAYERS_DEBUG").is_ok() {
                eprintln!(
                    "{} -> {} ({})",
                    module.join("::"),
                    target.join("::"),
                    path.join("::")
                );
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    // Loops between files: a depth-first search that reports each cycle it closes.
    let mut loops = Vec::new();
    let mut state: BTreeMap<Vec<String>, u8> = BTreeMap::new();
    fn visit(
        m: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        state: &mut BTreeMap<Vec<String>, u8>,
        path: &mut Vec<Vec<String>>,
        loops: &mut Vec<String>,
    ) {
        state.insert(m.clone(), 1);
        path.push(m.clone());
        for t in edges.get(m).into_iter().flatten() {
            match state.get(t) {
                Some(1) => {
                    let at = path.iter().position(|p| p == t).unwrap_or(0);
                    let mut cycle: Vec<String> = path[at..].iter().map(|p| p.join("::")).collect();
                    cycle.push(t.join("::"));
                    loops.push(cycle.join(" -> "));
                }
                Some(_) => {}
                None => visit(t, edges, state, path, loops),
            }
        }
        path.pop();
        state.insert(m.clone(), 2);
    }
    for m in &modules {
        if !state.contains_key(m) {
            visit(m, &edges, &mut state, &mut Vec::new(), &mut loops);
        }
    }
    Report { upward, loops }
}
