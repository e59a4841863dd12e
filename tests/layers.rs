//! The house rules of `src/`, checked from the code itself: every module sits in one layer of
//! `docs/architecture.md`, imports only point down (to its own layer or a lower one), and no
//! group of modules imports itself in a circle. A new module must be given a layer here.
//!
//! Imports are read from the source text: every `crate::a::b` path (grouped `crate::a::{b,
//! c}` too) and every `super::x` path, outside comments and `#[cfg(test)]` code, resolved to
//! the longest module path it names.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, lowest first (docs/architecture.md draws them).
const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundation",
        &[
            "units",
            "suggest",
            "hardware",
            "splitmix",
            "runio",
            "profile",
            "exact_f32",
        ],
    ),
    ("device", &["cuda", "dist"]),
    (
        "kernels",
        &[
            "kernel_choice",
            "kernel_check",
            "dropout_torch",
            "dropout",
            "quant::format",
            "quant::ffi",
            "quant::nf4_torch",
            "quant::blockwise8",
            "quant::nf4",
            "quant::bnb_format",
            "optim::ffi",
            "optim::adamw_torch",
            "optim::adamw8bit",
            "optim::schedule",
            "kernels",
        ],
    ),
    (
        "model",
        &[
            "lora_init",
            "lora",
            "quant::qlinear",
            "model::family",
            "model::hf_config",
            "model::loss",
            "model::checkpoint",
            "model::llama",
            "model::backward",
            "model::classifier",
        ],
    ),
    (
        "data",
        &[
            "labels",
            "data::formats",
            "data::table",
            "data::prompt",
            "data::long_text",
            "data::chat",
            "task",
            "data::examples",
            "data::batch",
            "metrics",
            "threshold",
            "calibration",
            "plot",
        ],
    ),
    ("config", &["config"]),
    (
        "loading",
        &[
            "adapter",
            "resume",
            "quantize",
            "loader",
            "splits",
            "eval",
            "scored",
            "demo_tasks",
            "demo",
        ],
    ),
    (
        "commands",
        &[
            "train",
            "train::memory",
            "train::progress",
            "train::report",
            "train::start",
            "train::step",
            "train::trainer",
            "merge",
            "serve",
            "serve::api",
            "serve::metrics",
            "serve::batcher",
            "doctor",
        ],
    ),
];

struct Module {
    name: String,
    code: String,
    /// Whether the file only declares submodules (a folder's `mod.rs`).
    folder_only: bool,
}

/// Every `.rs` file below `src`.
fn rust_files(src: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src/") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().and_then(|e| e.to_str()) == Some("rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn modules(src: &Path) -> Vec<Module> {
    let mut out = Vec::new();
    for path in rust_files(src) {
        let rel = path.strip_prefix(src).expect("under src/");
        let mut parts: Vec<String> = rel
            .iter()
            .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if parts.last().map(String::as_str) == Some("mod") {
            parts.pop();
        }
        let name = parts.join("::");
        if name == "lib" || name == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read a source file");
        let code = without_tests_and_comments(&text);
        let folder_only = code
            .lines()
            .map(str::trim)
            .all(|l| l.is_empty() || (l.starts_with("pub mod ") || l.starts_with("mod ")));
        out.push(Module {
            name,
            code,
            folder_only,
        });
    }
    out
}

/// The text before the first `#[cfg(test)]`, without `//` comments (string literals holding
/// `//`, as URLs do, lose their tail too, which removes no import).
fn without_tests_and_comments(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every path that follows `prefix` in `code` (`a::b`, and for `a::{b, c::d}` the paths
/// `a::b` and `a::c::d`).
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let end = rest.find(|c: char| !ident(c)).unwrap_or(rest.len());
        let head = rest[..end].trim_end_matches(':').to_string();
        if rest[end..].starts_with('{') && rest[..end].ends_with("::") {
            let close = rest[end..].find('}').map_or(rest.len(), |c| end + c);
            for item in rest[end + 1..close].split(',') {
                let item = item.split(" as ").next().unwrap_or("").trim();
                match item {
                    "" => {}
                    "self" => out.push(head.clone()),
                    _ => out.push(format!("{head}::{item}")),
                }
            }
        } else if !head.is_empty() {
            out.push(head);
        }
    }
    out
}

fn resolve<'a>(path: &str, names: &'a BTreeSet<String>) -> Option<&'a String> {
    let parts: Vec<&str> = path.split("::").collect();
    (1..=parts.len())
        .rev()
        .find_map(|n| names.get(&parts[..n].join("::")))
}

/// module → the modules it imports.
fn imports(mods: &[Module]) -> BTreeMap<String, BTreeSet<String>> {
    let names: BTreeSet<String> = mods.iter().map(|m| m.name.clone()).collect();
    let folders: BTreeSet<&str> = mods
        .iter()
        .filter(|m| m.folder_only)
        .map(|m| m.name.as_str())
        .collect();
    let mut edges = BTreeMap::new();
    for m in mods {
        let parent = m.name.rsplit_once("::").map_or("", |(p, _)| p);
        let mut to = BTreeSet::new();
        let crate_paths = paths_after(&m.code, "crate::");
        let super_paths = paths_after(&m.code, "super::").into_iter().map(|p| {
            if parent.is_empty() {
                p
            } else {
                format!("{parent}::{p}")
            }
        });
        for path in crate_paths.into_iter().chain(super_paths) {
            if let Some(t) = resolve(&path, &names) {
                let inside = m.name.starts_with(&format!("{t}::"));
                if *t != m.name && !inside && !folders.contains(t.as_str()) {
                    to.insert(t.clone());
                }
            }
        }
        edges.insert(m.name.clone(), to);
    }
    edges
}

/// The first circle found, as the modules along it.
fn find_circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for t in edges.get(n).into_iter().flatten() {
            match state.get(t.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == t).unwrap_or(0);
                    let mut c = path[start..].to_vec();
                    c.push(t.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(t, edges, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in edges.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, edges, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn src_modules() -> (Vec<Module>, BTreeMap<String, BTreeSet<String>>) {
    let mods = modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let edges = imports(&mods);
    (mods, edges)
}

#[test]
fn every_module_has_a_layer() {
    let (mods, _) = src_modules();
    let placed: BTreeSet<&str> = LAYERS.iter().flat_map(|(_, m)| m.iter().copied()).collect();
    let missing: Vec<&str> = mods
        .iter()
        .filter(|m| !m.folder_only && !placed.contains(m.name.as_str()))
        .map(|m| m.name.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "give these modules a layer in tests/layers.rs and docs/architecture.md: {missing:?}"
    );
    let names: BTreeSet<&str> = mods.iter().map(|m| m.name.as_str()).collect();
    let stale: Vec<&&str> = placed.iter().filter(|p| !names.contains(*p)).collect();
    assert!(
        stale.is_empty(),
        "layers name modules that are gone: {stale:?}"
    );
}

#[test]
fn imports_only_point_down() {
    let (_, edges) = src_modules();
    let layer_of: BTreeMap<&str, (usize, &str)> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, (layer, mods))| mods.iter().map(move |m| (*m, (i, *layer))))
        .collect();
    let mut upward = Vec::new();
    for (from, tos) in &edges {
        let Some(&(lf, nf)) = layer_of.get(from.as_str()) else {
            continue;
        };
        for to in tos {
            if let Some(&(lt, nt)) = layer_of.get(to.as_str()) {
                if lt > lf {
                    upward.push(format!("{from} ({nf}) -> {to} ({nt})"));
                }
            }
        }
    }
    assert!(
        upward.is_empty(),
        "imports that point up a layer:\n{}",
        upward.join("\n")
    );
}

#[test]
fn no_import_circle() {
    let (_, edges) = src_modules();
    if let Some(c) = find_circle(&edges) {
        panic!("import circle: {}", c.join(" -> "));
    }
}

#[test]
fn the_reader_sees_imports() {
    // The parser itself: grouped, renamed and `self` imports, and nothing from comments.
    let code = without_tests_and_comments(
        "use crate::a::{b, c::d as e, self};\n// crate::hidden\nlet x = crate::f::g(1);\n\
         #[cfg(test)]\nuse crate::test_only;",
    );
    let p = paths_after(&code, "crate::");
    assert_eq!(p, ["a::b", "a::c::d", "a", "f::g"]);
    let (_, edges) = src_modules();
    assert!(edges["loader"].contains("adapter"), "{:?}", edges["loader"]);
    assert!(edges["quant::nf4"].contains("quant::format"));
}

#[test]
fn every_file_says_what_it_owns_and_long_files_say_why() {
    // Each module opens with a `//!` comment; one over ~700 lines gives its reason there.
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut problems = Vec::new();
    for path in rust_files(&src) {
        let text = std::fs::read_to_string(&path).expect("read a source file");
        let opening: Vec<&str> = text.lines().take_while(|l| l.starts_with("//!")).collect();
        if opening.is_empty() {
            problems.push(format!("{}: no opening `//!` comment", path.display()));
        }
        let lines = text.lines().count();
        if lines > 720 && !opening.iter().any(|l| l.contains("Why one file")) {
            problems.push(format!(
                "{}: {lines} lines and no \"Why one file\" in its opening comment",
                path.display()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_architecture_picture_matches_the_layers() {
    // docs/architecture.md's ```text block: a layer name, then its modules (continuation lines
    // are indented); highest layer first.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md"))
            .expect("docs/architecture.md");
    let block = doc
        .split("```text\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a ```text block in docs/architecture.md");
    let mut drawn: Vec<(String, Vec<String>)> = Vec::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let mut words = line.split_whitespace().map(str::to_string);
        if line.starts_with(' ') {
            let last = drawn
                .last_mut()
                .expect("a layer line before its continuation");
            last.1.extend(words);
        } else {
            let name = words.next().expect("a layer name");
            drawn.push((name, words.collect()));
        }
    }
    drawn.reverse();
    let want: Vec<(String, Vec<String>)> = LAYERS
        .iter()
        .map(|(n, m)| (n.to_string(), m.iter().map(|s| s.to_string()).collect()))
        .collect();
    assert_eq!(
        drawn, want,
        "redraw docs/architecture.md's layers from tests/layers.rs"
    );
}
