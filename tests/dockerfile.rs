//! The Dockerfile kept in step with the crate, checked without a container engine.
//! scripts/container-check.sh builds and runs the image for real, but it takes 11 to 16
//! minutes and is not part of the suite. These checks take milliseconds and catch the two
//! breakages that stopped the first build: a file the build reads was left out of the
//! context (`build.rs`), and a target declared in Cargo.toml had no stub in the
//! dependency layer (`benches/portmap.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What `.dockerignore` lets into the context: it ignores `*` and re-admits `!name`.
fn admitted() -> BTreeSet<String> {
    let ignore = read(".dockerignore");
    let lines: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert_eq!(
        lines.first(),
        Some(&"*"),
        ".dockerignore must start by ignoring all"
    );
    lines
        .iter()
        .filter_map(|l| l.strip_prefix('!'))
        .map(str::to_owned)
        .collect()
}

/// The top-level entry (file or directory) of the repository that `path` lies in.
fn top_level(path: &Path) -> String {
    let rel = path.strip_prefix(repo()).unwrap_or(path);
    let mut normal = Vec::new();
    for c in rel.components() {
        match c {
            Component::ParentDir => {
                normal.pop();
            }
            Component::Normal(n) => normal.push(n.to_string_lossy().into_owned()),
            _ => {}
        }
    }
    normal.first().cloned().unwrap_or_default()
}

/// Every file under `dir` ending in `.rs`.
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

/// The source files of the targets Cargo.toml declares (`[lib]`, `[[bin]]`, `[[bench]]`,
/// `[[test]]`, `[[example]]`), with cargo's default path where none is given.
fn declared_targets() -> Vec<String> {
    let manifest = read("Cargo.toml");
    let mut targets = Vec::new();
    let mut section = String::new();
    let mut name: Option<String> = None;
    let mut path: Option<String> = None;
    let mut flush = |section: &str, name: &mut Option<String>, path: &mut Option<String>| {
        let dir = match section {
            "[[bench]]" => "benches",
            "[[test]]" => "tests",
            "[[example]]" => "examples",
            "[lib]" | "[[bin]]" => "src",
            _ => return,
        };
        match (path.take(), name.take()) {
            (Some(p), _) => targets.push(p),
            (None, Some(n)) if dir != "src" => targets.push(format!("{dir}/{n}.rs")),
            _ => {}
        }
    };
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            flush(&section, &mut name, &mut path);
            section = line.to_owned();
        } else if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().trim_matches('"').to_owned();
            match k.trim() {
                "name" => name = Some(v),
                "path" => path = Some(v),
                _ => {}
            }
        }
    }
    flush(&section, &mut name, &mut path);
    targets
}

#[test]
fn every_file_the_build_reads_is_in_the_context_and_copied() {
    let admitted = admitted();
    let dockerfile = read("Dockerfile");
    let mut needed: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "src", "migrations"]
        .map(str::to_owned)
        .into();
    if repo().join("build.rs").exists() {
        needed.insert("build.rs".into());
    }
    // Files the sources take in at compile time (the migrations, test data).
    let include = regex::Regex::new(r#"include_(?:str|bytes)!\("([^"]+)"\)"#).unwrap();
    let mut files = Vec::new();
    rust_files(&repo().join("src"), &mut files);
    for f in &files {
        for cap in include.captures_iter(&std::fs::read_to_string(f).unwrap()) {
            let target = f.parent().unwrap().join(&cap[1]);
            assert!(
                target.exists(),
                "{}: {} does not exist",
                f.display(),
                &cap[1]
            );
            needed.insert(top_level(&target));
        }
    }
    for n in &needed {
        assert!(
            admitted.contains(n),
            "the build reads {n}, but .dockerignore keeps it out of the context"
        );
        assert!(
            dockerfile
                .lines()
                .any(|l| l.starts_with("COPY ") && l.split_whitespace().any(|w| w == n)),
            "the Dockerfile never COPYs {n}"
        );
    }
}

#[test]
fn the_dependency_layer_stubs_every_declared_target() {
    let dockerfile = read("Dockerfile");
    // The RUN that builds the dependencies before `COPY src src`.
    let stub = dockerfile
        .split("COPY src src")
        .next()
        .unwrap()
        .rsplit("RUN ")
        .next()
        .unwrap();
    assert!(stub.contains("cargo build --release --locked"), "{stub}");
    let targets = declared_targets();
    assert!(
        targets.contains(&"benches/portmap.rs".to_owned()),
        "{targets:?}"
    );
    for t in &targets {
        assert!(
            stub.contains(t.as_str()),
            "Cargo.toml declares {t}, which the dependency layer does not stub: cargo \
             refuses a manifest whose target file is missing\n{stub}"
        );
    }
}
