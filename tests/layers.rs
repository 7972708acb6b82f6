//! The crate's layers point one way: no import cycle between the top-level modules of
//! `src/` (a top-level module is `src/NAME.rs` or `src/NAME/`; an import is a
//! `crate::NAME` path, or a name in `crate::{…}`, in code that is not a comment or a
//! `#[cfg(test)]` module). The map of the layers is in `src/lib.rs`.
//!
//! Reads the source files only: nothing is built or run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `from → to → where` (file:line of the first import seen).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

#[test]
fn no_import_cycle_between_top_level_modules() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.len() >= 5, "read too few modules from {}: {graph:?}", src.display());
    let cycles = cycles(&graph);
    let report: Vec<String> = cycles
        .iter()
        .map(|c| {
            let edges: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    graph[a]
                        .iter()
                        .filter(|(b, _)| c.contains(*b))
                        .map(move |(b, at)| format!("  {a} -> {b} ({at})"))
                })
                .collect();
            format!(
                "cycle {}:\n{}",
                c.iter().cloned().collect::<Vec<_>>().join(" <-> "),
                edges.join("\n")
            )
        })
        .collect();
    assert!(
        report.is_empty(),
        "imports between top-level modules form a cycle:\n{}",
        report.join("\n")
    );
}

/// The rows of the map in `src/lib.rs`, top first: a module imports only from rows below
/// its own. A module not listed here (a new one) is not checked by this test; add it.
const LAYERS: &[&[&str]] = &[
    &["gateway"],
    &["admin"],
    &["control", "dataplane"],
    &["telemetry"],
    &["config"],
    &["egress", "conntrack"],
    &["wire", "policy"],
    &["flow", "human_duration", "shutdown"],
];

#[test]
fn imports_point_down_the_documented_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let row = |m: &str| LAYERS.iter().position(|r| r.contains(&m));
    let mut upward = Vec::new();
    for (from, targets) in &module_graph(&src) {
        for (to, at) in targets {
            if let (Some(a), Some(b)) = (row(from), row(to))
                && b <= a
            {
                upward.push(format!("  {from} -> {to} ({at})"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that do not point down the layers of src/lib.rs:\n{}",
        upward.join("\n")
    );
}

/// The checker itself finds a cycle and ignores tests and comments.
#[test]
fn the_checker_sees_a_cycle_and_only_real_imports() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir(src.join("b")).unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::X;\n// crate::c in a comment\n").unwrap();
    std::fs::write(src.join("b/mod.rs"), "pub use crate::{\n    c::Y,\n    a,\n};\n").unwrap();
    std::fs::write(
        src.join("c.rs"),
        "fn f() {}\n#[cfg(test)]\nmod tests {\n    use crate::a;\n}\n",
    )
    .unwrap();
    let graph = module_graph(src);
    assert_eq!(cycles(&graph), vec![BTreeSet::from(["a".to_owned(), "b".to_owned()])]);
    assert!(!graph.contains_key("c"), "test-only import counted: {graph:?}");
    assert!(graph["b"].contains_key("c"), "grouped import missed: {graph:?}");
}

fn module_graph(src: &Path) -> Graph {
    let modules: BTreeSet<String> = std::fs::read_dir(src)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .map(|n| n.strip_suffix(".rs").map(str::to_owned).unwrap_or(n))
        .collect();
    let mut graph = Graph::new();
    for path in rust_files(src) {
        let rel = path.strip_prefix(src).unwrap();
        let parts: Vec<String> =
            rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        let first = parts[0].as_str();
        if matches!(first, "lib.rs" | "main.rs")
            || parts.iter().any(|p| p == "tests" || p == "tests.rs")
        {
            continue;
        }
        let module = first.strip_suffix(".rs").unwrap_or(first).to_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let code = code(&text);
        for (offset, target) in imports(&code) {
            if target != module && modules.contains(&target) {
                let line = code[..offset].matches('\n').count() + 1;
                graph
                    .entry(module.clone())
                    .or_default()
                    .entry(target)
                    .or_insert_with(|| format!("{}:{line}", rel.display()));
            }
        }
    }
    graph
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The file up to its `#[cfg(test)]` module, with `//` comments blanked (lines kept, so
/// offsets still give line numbers).
fn code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::with_capacity(text.len());
    for (i, line) in lines.iter().enumerate() {
        let next = lines.get(i + 1).map_or("", |l| l.trim_start());
        if line.trim() == "#[cfg(test)]"
            && (next.starts_with("mod ") || next.starts_with("pub mod "))
        {
            break;
        }
        out.push_str(line.split("//").next().unwrap_or(""));
        out.push('\n');
    }
    out
}

/// The top-level module names the code refers to through `crate::`, with the offset of
/// each reference.
fn imports(code: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::X, b}`: the first name of each item at the group's top level.
            let mut depth = 0;
            let mut item_start = true;
            let mut name = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && (c.is_alphanumeric() || c == '_') => name.push(c),
                    _ if item_start && !name.is_empty() => {
                        out.push((at, std::mem::take(&mut name)));
                        item_start = false;
                    }
                    _ => {}
                }
            }
            if !name.is_empty() {
                out.push((at, name));
            }
        } else {
            let name: String =
                rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.push((at, name));
            }
        }
    }
    out
}

/// The strongly connected components with more than one module (Tarjan).
fn cycles(graph: &Graph) -> Vec<BTreeSet<String>> {
    struct Walk<'g> {
        graph: &'g Graph,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        found: Vec<BTreeSet<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, v: &'g str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flat_map(|m| m.keys()) {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).unwrap();
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = BTreeSet::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.insert(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}
