//! The workspace's layout holds: inside every crate, imports between modules point one way (no
//! module imports another that imports it back, directly or through others), and the library
//! crates depend only on what they may (`gantry-erofs` on no other Gantry crate, `gantry-api`
//! on `gantry-proto` at most).
//!
//! Modules are files. An edge is a path to another module in the code (`use crate::…`,
//! `use super::…`, `crate::a::b::f()` inline, grouped `use crate::{a::X, b::Y}`), resolved to the
//! longest module prefix. Re-exports (`pub use`) are facades, not dependencies, and test code
//! (`#[cfg(test)]` modules at the end of a file) is left out: neither can form a cycle that
//! matters for who depends on whom.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use gantry_e2e::workspace_root;

/// The crates whose modules are checked.
const CRATES: [&str; 7] = [
    "proto",
    "erofs",
    "oci",
    "api",
    "agent",
    "guest-shim",
    "containerd-shim",
];

type Module = Vec<String>;

fn module_of(src: &Path, file: &Path) -> Module {
    let relative = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().expect("a file name");
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_owned());
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The file's code without comments, string literals' contents, re-exports and trailing test
/// modules.
fn code_of(text: &str) -> String {
    let mut code = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") && !line.starts_with(' ') {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        let line = line.split(" //").next().unwrap_or("");
        code.push_str(line);
        code.push('\n');
    }
    // Drop `pub use …;` and `pub(crate) use …;` statements, which may span lines.
    let mut kept = String::new();
    let mut rest = code.as_str();
    while let Some(start) = ["pub use ", "pub(crate) use ", "pub(super) use "]
        .iter()
        .filter_map(|marker| rest.find(marker))
        .min()
    {
        kept.push_str(&rest[..start]);
        rest = match rest[start..].find(';') {
            Some(end) => &rest[start + end + 1..],
            None => "",
        };
    }
    kept.push_str(rest);
    kept
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Expands the path that starts at `text` (just after `crate::` or `super::`) into full paths,
/// following brace groups.
fn expand(text: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    let mut rest = text;
    loop {
        let ident: String = rest.chars().take_while(|&c| is_ident(c)).collect();
        if !ident.is_empty() {
            rest = &rest[ident.len()..];
            path.push(ident);
            if let Some(after) = rest.strip_prefix("::") {
                rest = after;
                continue;
            }
            out.push(path);
            return;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0usize;
            let mut item_start = 0usize;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        expand(group[item_start..i].trim(), path.clone(), out);
                        return;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(group[item_start..i].trim(), path.clone(), out);
                        item_start = i + 1;
                    }
                    _ => {}
                }
            }
        }
        if !path.is_empty() {
            out.push(path);
        }
        return;
    }
}

/// Every module path a file's code names.
fn references(module: &Module, code: &str) -> Vec<Vec<String>> {
    // `super` is the parent module, whether the file is `a/b.rs` (module `a::b`) or
    // `a/b/mod.rs` (module `a::b` too).
    let parent = module[..module.len().saturating_sub(1)].to_vec();
    let mut out = Vec::new();
    for (marker, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut from = 0;
        while let Some(found) = code[from..].find(marker) {
            let at = from + found;
            from = at + marker.len();
            // Only whole path starts: not `foo_crate::`.
            if code[..at].chars().next_back().is_some_and(is_ident) {
                continue;
            }
            let mut prefix = base.clone();
            let mut rest = &code[from..];
            // `super::super::` climbs further.
            while let Some(after) = rest.strip_prefix("super::") {
                prefix.pop();
                rest = after;
                from += "super::".len();
            }
            expand(rest, prefix, &mut out);
        }
    }
    out
}

fn resolve(modules: &BTreeSet<Module>, path: &[String]) -> Option<Module> {
    (0..=path.len())
        .rev()
        .map(|len| path[..len].to_vec())
        .find(|prefix| modules.contains(prefix))
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    struct State<'g> {
        graph: &'g BTreeMap<Module, BTreeSet<Module>>,
        index: BTreeMap<&'g Module, usize>,
        low: BTreeMap<&'g Module, usize>,
        stack: Vec<&'g Module>,
        on_stack: BTreeSet<&'g Module>,
        next: usize,
        found: Vec<Vec<Module>>,
    }
    fn visit<'g>(state: &mut State<'g>, node: &'g Module) {
        state.index.insert(node, state.next);
        state.low.insert(node, state.next);
        state.next += 1;
        state.stack.push(node);
        state.on_stack.insert(node);
        for next in state.graph.get(node).into_iter().flatten() {
            if !state.index.contains_key(next) {
                visit(state, next);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(member) = state.stack.pop() {
                state.on_stack.remove(member);
                component.push(member.clone());
                if member == node {
                    break;
                }
            }
            if component.len() > 1 {
                state.found.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for node in graph.keys() {
        if !state.index.contains_key(node) {
            visit(&mut state, node);
        }
    }
    state.found
}

fn module_graph(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(src, f)).collect();
    let mut graph = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let text = fs::read_to_string(file).expect("read source");
        let code = code_of(&text);
        let edges: &mut BTreeSet<Module> = graph.entry(module.clone()).or_default();
        for path in references(&module, &code) {
            if let Some(target) = resolve(&modules, &path)
                && target != module
            {
                edges.insert(target);
            }
        }
    }
    graph
}

fn name(module: &Module) -> String {
    if module.is_empty() {
        "crate".to_owned()
    } else {
        module.join("::")
    }
}

#[test]
fn no_crate_has_a_module_cycle() {
    let root = workspace_root();
    let mut problems = Vec::new();
    for krate in CRATES {
        let src = root.join(krate).join("src");
        let graph = module_graph(&src);
        assert!(
            graph.len() > 1,
            "{krate}: no modules found in {}",
            src.display()
        );
        for component in cycles(&graph) {
            let members: BTreeSet<&Module> = component.iter().collect();
            let edges: Vec<String> = component
                .iter()
                .flat_map(|from| {
                    graph[from]
                        .iter()
                        .filter(|to| members.contains(to))
                        .map(move |to| format!("{} -> {}", name(from), name(to)))
                })
                .collect();
            problems.push(format!("{krate}: {}", edges.join(", ")));
        }
    }
    assert!(
        problems.is_empty(),
        "module cycles:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_cycle_finder_finds_a_cycle() {
    let module = |path: &str| -> Module { path.split("::").map(str::to_owned).collect() };
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    fs::create_dir_all(src.join("a")).unwrap();
    fs::write(
        src.join("lib.rs"),
        "pub mod a;\npub mod c;\npub use a::X;\n",
    )
    .unwrap();
    fs::write(src.join("a/mod.rs"), "mod b;\nuse crate::c::{self, Y};\n").unwrap();
    fs::write(src.join("a/b.rs"), "use super::super::c::Z;\n").unwrap();
    fs::write(
        src.join("c.rs"),
        "// use crate::a::b; is a comment\nfn f() { crate::a::b::g(); }\n\
         #[cfg(test)]\nmod tests { use crate::a; }\n",
    )
    .unwrap();
    let graph = module_graph(src);
    assert_eq!(graph[&module("a")], BTreeSet::from([module("c")]));
    assert_eq!(graph[&module("a::b")], BTreeSet::from([module("c")]));
    assert_eq!(graph[&module("c")], BTreeSet::from([module("a::b")]));
    // The re-export in lib.rs is not an edge.
    assert!(graph[&Vec::new()].is_empty(), "{:?}", graph[&Vec::new()]);
    let found = cycles(&graph);
    assert_eq!(found.len(), 1, "{found:?}");
    let members: BTreeSet<Module> = found[0].iter().cloned().collect();
    assert_eq!(members, BTreeSet::from([module("a::b"), module("c")]));
}

/// The Gantry crates a crate's manifest depends on (normal dependencies).
fn gantry_dependencies(krate: &str) -> BTreeSet<String> {
    let manifest = fs::read_to_string(workspace_root().join(krate).join("Cargo.toml")).unwrap();
    let mut in_dependencies = false;
    let mut found = BTreeSet::new();
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_dependencies = line == "[dependencies]";
            continue;
        }
        if in_dependencies
            && let Some(name) = line.split(['=', '.', ' ']).next()
            && name.starts_with("gantry-")
        {
            found.insert(name.to_owned());
        }
    }
    found
}

#[test]
fn library_crates_depend_only_on_what_they_may() {
    assert_eq!(gantry_dependencies("erofs"), BTreeSet::new());
    let api = gantry_dependencies("api");
    assert!(
        api.is_subset(&BTreeSet::from(["gantry-proto".to_owned()])),
        "gantry-api depends on {api:?}"
    );
    let oci = gantry_dependencies("oci");
    assert_eq!(oci, BTreeSet::from(["gantry-erofs".to_owned()]));
    // The containerd shim is an API client: it never links the agent.
    let shim = gantry_dependencies("containerd-shim");
    assert_eq!(
        shim,
        BTreeSet::from(["gantry-api".to_owned(), "gantry-proto".to_owned()]),
        "containerd-shim-gantry depends on {shim:?}"
    );
    // And the agent does use them (the parser above reads real manifests).
    assert!(gantry_dependencies("agent").contains("gantry-oci"));
}

#[test]
fn the_erofs_crate_forbids_unsafe_code() {
    let lib = fs::read_to_string(workspace_root().join("erofs/src/lib.rs")).unwrap();
    assert!(lib.contains("#![forbid(unsafe_code)]"));
}

/// The long flags `gantry-agent ARGS --help` lists.
fn cli_flags(args: &[&str]) -> Vec<String> {
    let output = std::process::Command::new(gantry_e2e::agent_binary())
        .args(args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success(), "{args:?} --help");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let line = line
                .strip_prefix('-')
                .filter(|l| !l.starts_with('-'))
                .map_or(line, |l| l.split_once(", ").map_or(line, |(_, rest)| rest));
            let flag = line.strip_prefix("--")?;
            let name: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            (!name.is_empty()).then(|| format!("--{name}"))
        })
        .filter(|flag| flag != "--help" && flag != "--version" && flag != "--api-socket")
        .collect()
}

#[test]
fn the_readme_synopsis_names_every_flag() {
    let readme = fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let synopsis = readme
        .split("## Using it")
        .nth(1)
        .and_then(|rest| rest.split("## ").next())
        .expect("README has a 'Using it' section");
    let commands: &[&[&str]] = &[
        &["serve"],
        &["run"],
        &["ps"],
        &["logs"],
        &["exec"],
        &["kill"],
        &["rm"],
        &["stats"],
        &["images"],
        &["pull"],
        &["rmi"],
        &["cache", "gc"],
        &["cache", "images"],
        &["guest-info"],
        &["ping"],
        &["vm", "ls"],
        &["image", "convert"],
        &["image", "convert-layer"],
        &["image", "build-default"],
    ];
    let mut missing = Vec::new();
    for command in commands {
        let flags = cli_flags(command);
        assert!(
            !flags.is_empty() || command == &["stats"],
            "{command:?} lists no flags"
        );
        for flag in flags {
            if !synopsis.contains(&flag) {
                missing.push(format!("{} {flag}", command.join(" ")));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README's synopsis lacks: {}",
        missing.join(", ")
    );
}
