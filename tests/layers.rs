//! The layers of `src/` point one way, and no files import each other in a circle.
//!
//! [`LAYERS`] is the one statement of the layers (docs/architecture.md shows it, and a
//! test here keeps the two the same). A file may import from its own layer and the ones
//! below; an import from a layer above is refused unless [`ALLOWED_UPWARD`] lists it,
//! and an entry there that no longer exists is refused too, so the list only shrinks.
//! Any cycle between files (of two files or more) is refused. Pure file reading: no
//! root, milliseconds. `graph.rs` says what counts as an import.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "layers/graph.rs"]
mod graph;
#[path = "layers/lengths.rs"]
mod lengths;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use graph::{Edge, Graph};

/// The layers, bottom to top: a name, what lives there, and its files (paths under
/// `src/`; one ending in `/` is a directory). The longest matching path decides.
const LAYERS: &[(&str, &str, &[&str])] = &[
    (
        "model",
        "the domain types, each rule written once",
        &["model/"],
    ),
    ("config", "the settings as plain data (clap)", &["config/"]),
    (
        "infrastructure",
        "the log, memory, descriptors, intervals, systemd, locks, metrics, events",
        &[
            "logging.rs",
            "memory.rs",
            "fdlimit.rs",
            "periodic.rs",
            "notify.rs",
            "locks.rs",
            "metrics/",
            "events.rs",
        ],
    ),
    (
        "drivers",
        "the kernel (netlink, nftables, WireGuard), libvirt, /proc and the seed image",
        &["net/", "vm/driver/", "cloudinit/", "hoststats.rs"],
    ),
    ("store", "SQLite", &["store/"]),
    (
        "services",
        "port maps, the mesh, the VM service and what only it uses",
        &["portmap/", "mesh/", "join.rs", "keys.rs", "vm/"],
    ),
    ("api", "HTTP: the wire types, the routes", &["api/"]),
    (
        "agent",
        "startup checks, the conductor, the command line",
        &["preflight.rs", "agent/", "main.rs", "lib.rs"],
    ),
];

/// Imports from a lower layer to a higher one that are allowed for now: (from, to,
/// why). Each must still exist; remove it when it goes.
const ALLOWED_UPWARD: &[(&str, &str, &str)] = &[];

/// Cycles between files allowed for now: the files of each (exactly), and why. Each
/// must still exist as it is listed; remove it when it goes.
const ALLOWED_CYCLES: &[(&[&str], &str)] = &[];

/// The layer of a file, by the longest path of [`LAYERS`] that covers it.
fn layer_of(file: &str) -> Option<usize> {
    LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, (_, _, paths))| paths.iter().map(move |p| (i, *p)))
        .filter(|(_, p)| {
            if p.ends_with('/') {
                file.starts_with(p)
            } else {
                file == *p
            }
        })
        .max_by_key(|(_, p)| p.len())
        .map(|(i, _)| i)
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, relative to `base`.
fn rust_files(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(base, &p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(base).unwrap();
            out.insert(rel.to_string_lossy().into_owned());
        }
    }
}

/// The imports that go up, each with its layers.
fn upward(g: &Graph) -> Vec<(Edge, usize, usize)> {
    g.edges
        .iter()
        .filter_map(|e| {
            let (from, to) = (layer_of(&e.from)?, layer_of(&e.to)?);
            (from < to).then(|| (e.clone(), from, to))
        })
        .collect()
}

/// The groups of files that import each other in a circle (strongly connected
/// components of two files or more), by Tarjan's algorithm.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for e in &g.edges {
        next.entry(&e.from).or_default().push(&e.to);
    }
    struct Tarjan<'a> {
        next: &'a BTreeMap<&'a str, Vec<&'a str>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for &w in self.next.get(v).map(Vec::as_slice).unwrap_or_default() {
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
                let mut group = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    group.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.out.push(group);
                }
            }
        }
    }
    let mut t = Tarjan {
        next: &next,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in next.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out.sort();
    t.out
}

/// The imports inside one cycle, to say how it closes.
fn describe_cycle(g: &Graph, group: &[String]) -> String {
    let mut lines = vec![format!("  cycle of {} files:", group.len())];
    for e in &g.edges {
        if group.contains(&e.from) && group.contains(&e.to) {
            lines.push(format!("    {} -> {}  ({})", e.from, e.to, e.path));
        }
    }
    lines.join("\n")
}

/// What is wrong with the graph against the layers and the allow-lists; empty when all
/// is well.
fn check(
    g: &Graph,
    allowed: &[(&str, &str, &str)],
    allowed_cycles: &[(&[&str], &str)],
) -> Vec<String> {
    let mut problems = Vec::new();
    for f in &g.files {
        if layer_of(f).is_none() {
            problems.push(format!("{f} is in no layer: add it to LAYERS"));
        }
    }
    let up = upward(g);
    for (e, from, to) in &up {
        if !allowed.iter().any(|(f, t, _)| *f == e.from && *t == e.to) {
            problems.push(format!(
                "upward import: {} ({}) -> {} ({}) by `{}`",
                e.from, LAYERS[*from].0, e.to, LAYERS[*to].0, e.path
            ));
        }
    }
    for (f, t, _) in allowed {
        if !up.iter().any(|(e, _, _)| e.from == *f && e.to == *t) {
            problems.push(format!(
                "ALLOWED_UPWARD lists {f} -> {t}, which is gone: remove it from the list"
            ));
        }
    }
    let found = cycles(g);
    for group in &found {
        if !allowed_cycles
            .iter()
            .any(|(files, _)| *files == group.as_slice())
        {
            problems.push(describe_cycle(g, group));
        }
    }
    for (files, _) in allowed_cycles {
        if !found.iter().any(|group| group.as_slice() == *files) {
            problems.push(format!(
                "ALLOWED_CYCLES lists {files:?}, which is no longer a cycle as listed: \
                 remove it from the list (or list what is left)"
            ));
        }
    }
    problems
}

#[test]
fn imports_point_down_the_layers_and_no_files_import_each_other() {
    let g = graph::read(&src());
    let mut all = BTreeSet::new();
    rust_files(&src(), &src(), &mut all);
    let reached: BTreeSet<String> = g.files.union(&g.test_files).cloned().collect();
    let stray: Vec<&String> = all.difference(&reached).collect();
    assert!(stray.is_empty(), "files in no module: {stray:?}");
    let up = upward(&g);
    let cycles = cycles(&g);
    // Straight to stderr, past the test harness's capture: the counts show in every run.
    let _ = writeln!(
        std::io::stderr(),
        "layers: {} files ({} test-only files left out), {} imports between files; \
         upward imports {} ({} allow-listed), cycles between files {} ({} allow-listed)",
        g.files.len(),
        g.test_files.len(),
        g.edges.len(),
        up.len(),
        ALLOWED_UPWARD.len(),
        cycles.len(),
        ALLOWED_CYCLES.len()
    );
    for (e, from, to) in &up {
        println!(
            "  upward: {} ({}) -> {} ({}) by `{}`",
            e.from, LAYERS[*from].0, e.to, LAYERS[*to].0, e.path
        );
    }
    for group in &cycles {
        println!("  cycle: {}", group.join(" "));
    }
    let problems = check(&g, ALLOWED_UPWARD, ALLOWED_CYCLES);
    assert!(problems.is_empty(), "\n{}\n", problems.join("\n"));
}

/// The longest a function that ships may be, in lines of code.
const MAX_FUNCTION_LINES: usize = 80;

#[test]
fn no_function_that_ships_is_longer_than_80_lines() {
    let g = graph::read(&src());
    let all = lengths::functions(&src(), &g.files);
    let mut long: Vec<&lengths::Function> = all
        .iter()
        .filter(|f| f.lines > MAX_FUNCTION_LINES)
        .collect();
    long.sort_by_key(|f| std::cmp::Reverse(f.lines));
    let longest = all.iter().map(|f| f.lines).max().unwrap_or(0);
    let _ = writeln!(
        std::io::stderr(),
        "lengths: {} functions that ship, the longest {longest} lines of code; over \
         {MAX_FUNCTION_LINES}: {}",
        all.len(),
        long.len()
    );
    let named: Vec<String> = long
        .iter()
        .map(|f| format!("  {}:{} {} ({} lines)", f.file, f.line, f.name, f.lines))
        .collect();
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines of code: split them\n{}",
        named.join("\n")
    );
}

/// The table of docs/architecture.md between its markers, as [`LAYERS`] says it.
fn layers_table() -> String {
    let mut out = String::from("| Layer | What | Files under `src/` |\n|---|---|---|\n");
    for (i, (name, what, paths)) in LAYERS.iter().enumerate() {
        let files: Vec<String> = paths.iter().map(|p| format!("`{p}`")).collect();
        out.push_str(&format!("| {i} {name} | {what} | {} |\n", files.join(", ")));
    }
    out
}

const BEGIN: &str =
    "<!-- layers: generated by tests/layers.rs (UPDATE_DOCS=1 cargo test --test layers) -->\n";
const END: &str = "<!-- end of layers -->";

#[test]
fn the_architecture_page_shows_these_layers() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md");
    let text = std::fs::read_to_string(&path).unwrap();
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        panic!("docs/architecture.md lacks the markers {BEGIN:?} ... {END:?}");
    };
    let want = format!("{}{BEGIN}{}{}", &text[..b], layers_table(), &text[e..]);
    if std::env::var_os("UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).unwrap();
    } else {
        assert!(
            text == want,
            "docs/architecture.md's layer table differs from tests/layers.rs: \
             run UPDATE_DOCS=1 cargo test --test layers"
        );
    }
}

/// A small crate written to a temporary directory.
fn fixture(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    dir
}

#[test]
fn the_reader_finds_upward_imports_cycles_and_leaves_tests_out() {
    let dir = fixture(&[
        ("lib.rs", "pub mod model;\npub mod store;\npub mod api;\n"),
        // Down, through a re-export, in an attribute, and in a test (left out).
        (
            "model/mod.rs",
            "mod a;\nmod b;\npub use a::A;\n#[cfg(test)]\nmod tests;\n",
        ),
        ("model/a.rs", "pub struct A;\n"),
        (
            "model/b.rs",
            "#[cfg(test)]\nimpl super::A { fn t() { crate::store::S; } }\n",
        ),
        ("model/tests.rs", "use crate::api::X;\n"),
        (
            "store/mod.rs",
            "pub mod rows;\n#[derive(X)]\n#[x(with = crate::model::A)]\npub struct S;\n",
        ),
        // Up: model -> store in an expression, store -> api by a grouped use.
        (
            "store/rows.rs",
            "use crate::{api::{self}, model::A};\nfn f() { let _ = super::S; }\n",
        ),
        (
            "api/mod.rs",
            "pub struct X;\nfn g() { crate::store::rows::h(); }\n",
        ),
    ]);
    let g = graph::read(dir.path());
    let edges: BTreeSet<(String, String)> = g
        .edges
        .iter()
        .map(|e| (e.from.clone(), e.to.clone()))
        .collect();
    let has = |f: &str, t: &str| edges.contains(&(f.to_string(), t.to_string()));
    assert!(has("model/mod.rs", "model/a.rs"), "{edges:?}");
    assert!(has("store/mod.rs", "model/a.rs"), "{edges:?}");
    assert!(has("store/rows.rs", "model/a.rs"), "{edges:?}");
    assert!(has("store/rows.rs", "api/mod.rs"), "{edges:?}");
    assert!(has("store/rows.rs", "store/mod.rs"), "{edges:?}");
    assert!(has("api/mod.rs", "store/rows.rs"), "{edges:?}");
    assert!(!edges.iter().any(|(f, _)| f == "model/tests.rs"));
    assert!(!has("model/b.rs", "store/mod.rs"), "{edges:?}");
    assert!(g.test_files.contains("model/tests.rs"));
    assert_eq!(
        cycles(&g),
        vec![vec!["api/mod.rs".to_string(), "store/rows.rs".to_string()]]
    );
    let problems = check(&g, &[("model/a.rs", "api/mod.rs", "gone")], &[]).join("\n");
    assert!(
        problems.contains("upward import: store/rows.rs (store) -> api/mod.rs (api)"),
        "{problems}"
    );
    assert!(problems.contains("which is gone"), "{problems}");
    assert!(problems.contains("cycle of 2 files"), "{problems}");
}

#[test]
fn the_length_reader_counts_code_lines_and_leaves_tests_out() {
    let body = "    let x = 1;\n".repeat(90);
    let dir = fixture(&[
        ("lib.rs", "mod a;\n#[cfg(test)]\nmod tests;\n"),
        (
            "a.rs",
            &format!(
                "/// Doc lines are not counted.\n\
                 pub fn short(\n    x: u8,\n) -> u8 {{\n\n    // a comment\n    x\n}}\n\
                 struct S;\nimpl S {{\n    fn long() {{\n{body}    }}\n}}\n\
                 trait T {{\n    fn given(&self) {{}}\n    fn required(&self);\n}}\n\
                 #[cfg(test)]\nfn test_only() {{\n{body}}}\n"
            ),
        ),
        ("tests.rs", &format!("fn in_tests() {{\n{body}}}\n")),
    ]);
    let g = graph::read(dir.path());
    let found: Vec<(String, usize, usize)> = lengths::functions(dir.path(), &g.files)
        .into_iter()
        .map(|f| (f.name, f.line, f.lines))
        .collect();
    assert_eq!(
        found,
        vec![
            ("short".to_string(), 2, 5),
            ("S::long".to_string(), 11, 92),
            ("T::given".to_string(), 105, 1),
        ]
    );
}
