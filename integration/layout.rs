//! The layout of `src/`: no import cycle among the modules of any folder. Reads the source as
//! text, as a reviewer would: every `crate::…` and `super::…` path names the module it reaches
//! into. `cargo test --test layout -- --nocapture` prints the module graph and file sizes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module (`pipeline::sink`) and the source file that holds it.
struct Module {
    path: Vec<String>,
    file: PathBuf,
    lines: usize,
    /// The modules it reaches into, with the line that does, tests left out.
    uses: BTreeMap<Vec<String>, usize>,
}

fn crate_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn module_path(file: &Path, root: &Path) -> Option<Vec<String>> {
    let relative = file.strip_prefix(root).ok()?.with_extension("");
    let mut path: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    match path.last().map(String::as_str) {
        Some("main") if path.len() == 1 => return None,
        Some("lib") if path.len() == 1 => path.clear(),
        Some("mod") => {
            path.pop();
        }
        // A unit-test module kept in a file of its own.
        Some("tests") => return None,
        _ => {}
    }
    Some(path)
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

/// The source without its unit tests: by the crate's habit, `#[cfg(test)] mod tests` comes
/// last in a file.
fn without_tests(source: &str) -> &str {
    match source.find("#[cfg(test)]\nmod tests") {
        Some(at) => &source[..at],
        None => source,
    }
}

/// Every path written after `crate::` or `super::` (a group `{a, b::c}` gives each of its
/// paths), as segments relative to the crate's root.
fn referenced_paths(code: &str, module: &[String]) -> Vec<(Vec<String>, usize)> {
    let mut found = Vec::new();
    for (number, line) in code.lines().enumerate() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(at) = find_anchor(rest) {
            let (base, after) = match rest[at..].strip_prefix("crate::") {
                Some(after) => (Vec::new(), after),
                None => {
                    let mut base = module.to_vec();
                    let mut after = &rest[at..];
                    while let Some(next) = after.strip_prefix("super::") {
                        base.pop();
                        after = next;
                    }
                    (base, after)
                }
            };
            for path in expand(after) {
                let mut full = base.clone();
                full.extend(path);
                found.push((full, number + 1));
            }
            rest = &rest[at + 2..];
        }
    }
    found
}

fn find_anchor(text: &str) -> Option<usize> {
    let candidates = ["crate::", "super::"];
    candidates
        .iter()
        .filter_map(|anchor| {
            text.match_indices(anchor)
                .find(|(at, _)| {
                    !text[..*at]
                        .chars()
                        .last()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                })
                .map(|(at, _)| at)
        })
        .min()
}

/// `a::b::{c, d::e}` → `[a, b, c]`, `[a, b, d, e]`; stops at the first character that is not
/// part of a path.
fn expand(text: &str) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    let mut rest = text;
    loop {
        let word: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if word.is_empty() {
            if let Some(group) = rest.strip_prefix('{') {
                let inner = &group[..matching_brace(group)];
                return split_top_level(inner)
                    .into_iter()
                    .flat_map(|part| {
                        expand(part.trim()).into_iter().map(|tail| {
                            let mut path = prefix.clone();
                            path.extend(tail);
                            path
                        })
                    })
                    .collect();
            }
            return vec![prefix];
        }
        rest = &rest[word.len()..];
        if word != "self" {
            prefix.push(word);
        }
        match rest.strip_prefix("::") {
            Some(next) => rest = next,
            None => return vec![prefix],
        }
    }
}

fn matching_brace(text: &str) -> usize {
    let mut depth = 0;
    for (at, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return at,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0, 0);
    for (at, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn read_modules() -> Vec<Module> {
    let root = crate_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let mut modules: Vec<Module> = files
        .into_iter()
        .filter_map(|file| {
            let path = module_path(&file, &root)?;
            let source = std::fs::read_to_string(&file).ok()?;
            Some((path, file, source))
        })
        .map(|(path, file, source)| {
            Module {
                lines: source.lines().count(),
                uses: BTreeMap::new(),
                path,
                file,
            }
            .with_uses(without_tests(&source))
        })
        .collect();
    let known: BTreeSet<Vec<String>> = modules.iter().map(|m| m.path.clone()).collect();
    for module in &mut modules {
        module.uses = std::mem::take(&mut module.uses)
            .into_iter()
            .filter_map(|(path, line)| {
                // The longest prefix that is a module: `pipeline::sink::Sink` is in
                // `pipeline::sink`.
                (0..=path.len())
                    .rev()
                    .map(|n| path[..n].to_vec())
                    .find(|prefix| known.contains(prefix))
                    .map(|module| (module, line))
            })
            .collect();
    }
    modules.sort_by(|a, b| a.path.cmp(&b.path));
    modules
}

impl Module {
    fn with_uses(mut self, code: &str) -> Self {
        for (path, line) in referenced_paths(code, &self.path) {
            self.uses.entry(path).or_insert(line);
        }
        self
    }

    fn name(&self) -> String {
        display(&self.path)
    }
}

fn display(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_owned()
    } else {
        path.join("::")
    }
}

/// The child of `folder` that holds `module`, if `module` is inside `folder`.
fn child_of(folder: &[String], module: &[String]) -> Option<Vec<String>> {
    (module.len() > folder.len() && module.starts_with(folder))
        .then(|| module[..=folder.len()].to_vec())
}

/// For each folder, the import graph among its children (a child standing for everything
/// inside it), and any cycle in it.
fn cycles(modules: &[Module]) -> Vec<String> {
    let folders: BTreeSet<Vec<String>> = modules
        .iter()
        .filter(|m| {
            m.file
                .file_name()
                .is_some_and(|n| n == "mod.rs" || n == "lib.rs")
        })
        .map(|m| m.path.clone())
        .collect();
    let mut found = Vec::new();
    for folder in &folders {
        let mut edges: BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>> = BTreeMap::new();
        for module in modules {
            let Some(from) = child_of(folder, &module.path) else {
                continue;
            };
            for (used, line) in &module.uses {
                let Some(to) = child_of(folder, used) else {
                    continue;
                };
                if to != from {
                    let why = format!("{}:{line} uses {}", module.file.display(), display(used));
                    edges
                        .entry(from.clone())
                        .or_default()
                        .entry(to)
                        .or_insert(why);
                }
            }
        }
        if let Some(cycle) = find_cycle(&edges) {
            let steps: Vec<String> = cycle
                .windows(2)
                .map(|pair| edges[&pair[0]][&pair[1]].clone())
                .collect();
            found.push(format!(
                "in {}: {}\n    {}",
                display(folder),
                cycle
                    .iter()
                    .map(|m| display(m))
                    .collect::<Vec<_>>()
                    .join(" → "),
                steps.join("\n    ")
            ));
        }
    }
    found
}

type Graph = BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>>;

/// A cycle as its modules, the first repeated at the end.
fn find_cycle(edges: &Graph) -> Option<Vec<Vec<String>>> {
    fn visit(
        node: &Vec<String>,
        edges: &Graph,
        stack: &mut Vec<Vec<String>>,
        done: &mut BTreeSet<Vec<String>>,
    ) -> Option<Vec<Vec<String>>> {
        if let Some(at) = stack.iter().position(|n| n == node) {
            let mut cycle = stack[at..].to_vec();
            cycle.push(node.clone());
            return Some(cycle);
        }
        if !done.insert(node.clone()) {
            return None;
        }
        stack.push(node.clone());
        for next in edges.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(cycle) = visit(next, edges, stack, done) {
                return Some(cycle);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|start| visit(start, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let modules = read_modules();
    assert!(modules.len() > 20, "read {} modules of src/", modules.len());
    for module in &modules {
        let uses: Vec<String> = module
            .uses
            .keys()
            .filter(|used| **used != module.path && !used.starts_with(&module.path))
            .map(|used| display(used))
            .collect();
        println!(
            "{:<28} {:>5} lines  → {}",
            module.name(),
            module.lines,
            uses.join(", ")
        );
    }
    let cycles = cycles(&modules);
    assert!(
        cycles.is_empty(),
        "import cycles among modules (a module that imports another that imports it back):\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_checker_sees_a_cycle_and_group_imports() {
    let module = |path: &str| path.split("::").map(str::to_owned).collect::<Vec<_>>();
    assert_eq!(
        expand("pipeline::{sink::Sink, event}"),
        vec![module("pipeline::sink::Sink"), module("pipeline::event")]
    );
    let found = referenced_paths("use super::{Header, Kind};", &module("a::b"));
    assert_eq!(
        found,
        vec![(module("a::Header"), 1), (module("a::Kind"), 1)]
    );
    let found = referenced_paths("use super::super::x::Y;", &module("a::b::c"));
    assert_eq!(found, vec![(module("a::x::Y"), 1)]);
    let mut edges = Graph::new();
    edges
        .entry(module("a"))
        .or_default()
        .insert(module("b"), String::new());
    edges
        .entry(module("b"))
        .or_default()
        .insert(module("a"), String::new());
    assert_eq!(
        find_cycle(&edges),
        Some(vec![module("a"), module("b"), module("a")])
    );
}
