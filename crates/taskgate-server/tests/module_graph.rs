//! The module map of ARCHITECTURE.md, checked against the source: no cycle between the
//! server's top-level modules, and HTTP (axum) known only by `api`, `error` and `serve`.
//!
//! It reads `use crate::…` paths (and `crate::…` anywhere in code, comments left out), which is
//! how every module here names another; `lib.rs`, the root that wires them all, is left out.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Top-level module → the top-level modules its code names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let relative = path.strip_prefix(&src).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let deps = graph.entry(top.clone()).or_default();
        for line in text.lines() {
            let code = line.split("//").next().unwrap_or("");
            for (i, _) in code.match_indices("crate::") {
                let name: String = code[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                // `crate::{a, b}` names several at once.
                let named: Vec<String> = if name.is_empty() {
                    code[i + "crate::".len()..]
                        .trim_start_matches('{')
                        .split([',', '}'])
                        .map(|s| s.trim().split("::").next().unwrap_or("").to_owned())
                        .filter(|s| !s.is_empty())
                        .collect()
                } else {
                    vec![name]
                };
                for n in named {
                    if n != top && n.chars().next().is_some_and(|c| c.is_lowercase()) {
                        deps.insert(n);
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn the_server_modules_have_no_cycle() {
    let graph = module_graph();
    assert!(graph.len() >= 15, "only {} modules read", graph.len());
    for start in graph.keys() {
        // Every module reachable from `start`; reaching `start` again is a cycle.
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(String, Vec<String>)> = vec![(start.clone(), vec![start.clone()])];
        while let Some((at, path)) = stack.pop() {
            for next in graph.get(&at).into_iter().flatten() {
                let mut p = path.clone();
                p.push(next.clone());
                assert!(next != start, "module cycle: {}", p.join(" -> "));
                if seen.insert(next.clone()) {
                    stack.push((next.clone(), p));
                }
            }
        }
    }
}

#[test]
fn only_the_api_error_and_serve_modules_know_http() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut knowing = BTreeSet::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        } else if path.extension().is_some_and(|e| e == "rs")
            && std::fs::read_to_string(&path).unwrap().contains("axum::")
        {
            let relative = path
                .strip_prefix(&src)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            knowing.insert(relative.split('/').next().unwrap().to_owned());
        }
    }
    let allowed: BTreeSet<String> = ["api", "error.rs", "serve.rs", "lib.rs"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let outside: Vec<&String> = knowing.difference(&allowed).collect();
    assert!(
        outside.is_empty(),
        "axum used outside the HTTP layer: {outside:?}"
    );
    assert!(
        knowing.contains("api"),
        "the check found no axum use at all"
    );
}
