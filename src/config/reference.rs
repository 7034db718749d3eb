//! The settings reference of docs/configuration.md, generated from the clap definitions
//! that `node-vm-agent serve --help` prints, so the page cannot drift from the binary: a
//! test compares the page's generated block with [`reference`], and
//! `UPDATE_DOCS=1 cargo test --lib config::reference` rewrites the block.

use std::path::PathBuf;

use clap::{Arg, Args};

use super::Settings;

/// The page that carries the reference, from the crate's root.
const PAGE: &str = "docs/configuration.md";
/// The generated block starts after the line that begins with this ...
const BEGIN: &str = "<!-- generated from the clap definitions:";
/// ... and ends before this line.
const END: &str = "<!-- end of generated reference -->";
/// What a failing comparison tells the reader to run.
const UPDATE: &str = "UPDATE_DOCS=1 cargo test --lib config::reference";

/// `serve`'s command as the binary builds it (`Command::Serve(Settings)` in main.rs).
fn serve() -> clap::Command {
    Settings::augment_args(clap::Command::new("serve"))
}

/// The settings `serve --help` shows, in its order, grouped under their headings.
fn shown_by_heading(cmd: &clap::Command) -> Vec<(String, Vec<&Arg>)> {
    let mut groups: Vec<(String, Vec<&Arg>)> = Vec::new();
    for arg in cmd.get_arguments() {
        if arg.is_hide_set() || arg.get_long().is_none_or(|l| l == "help" || l == "version") {
            continue;
        }
        let heading = arg.get_help_heading().unwrap_or("Options").to_string();
        match groups.iter_mut().find(|(h, _)| *h == heading) {
            Some((_, args)) => args.push(arg),
            None => groups.push((heading, vec![arg])),
        }
    }
    groups
}

/// A table cell: one line, and no `|` that would end the cell.
fn cell(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    one_line.replace('|', "\\|")
}

/// The arg's whole help (`--help`), as one line; clap drops the final period of a help
/// of one paragraph, which the table puts back.
fn meaning(arg: &Arg) -> String {
    let mut text = match (arg.get_long_help(), arg.get_help()) {
        (Some(long), _) => long.to_string(),
        (None, Some(short)) => short.to_string(),
        (None, None) => String::new(),
    };
    if !text.is_empty() && !text.ends_with('.') {
        text.push('.');
    }
    let values: Vec<String> = arg
        .get_possible_values()
        .iter()
        .filter(|v| !v.is_hide_set())
        .map(|v| match v.get_help() {
            Some(help) => format!("`{}`: {}", v.get_name(), lower_first(&help.to_string())),
            None => format!("`{}`", v.get_name()),
        })
        .collect();
    if !values.is_empty() {
        let described = arg
            .get_possible_values()
            .iter()
            .any(|v| v.get_help().is_some());
        let sep = if described { "; " } else { ", " };
        text.push_str(&format!(" Values: {}.", values.join(sep)));
    }
    cell(&text)
}

/// "The kernel module" as "the kernel module", inside a sentence.
fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    match (chars.next(), chars.clone().next()) {
        (Some(first), Some(second)) if first.is_uppercase() && second.is_lowercase() => {
            first.to_lowercase().chain(chars).collect()
        }
        _ => s.to_string(),
    }
}

fn default(arg: &Arg) -> String {
    let values: Vec<String> = arg
        .get_default_values()
        .iter()
        .map(|v| v.to_string_lossy().into_owned())
        .collect();
    match values.as_slice() {
        [] => "unset".to_string(),
        [v] if v.is_empty() => "empty".to_string(),
        _ => format!("`{}`", cell(&values.join(","))),
    }
}

/// The markdown reference: per help heading a `###` section with a table of its
/// settings.
pub fn reference() -> String {
    let cmd = serve();
    let mut out = String::new();
    for (heading, args) in shown_by_heading(&cmd) {
        out.push_str(&format!("\n### {heading}\n\n"));
        out.push_str("| Variable | Flag | Default | Meaning |\n|---|---|---|---|\n");
        for arg in args {
            let env = arg
                .get_env()
                .map(|e| format!("`{}`", e.to_string_lossy()))
                .unwrap_or_default();
            let flag = arg
                .get_long()
                .map(|l| format!("`--{l}`"))
                .unwrap_or_default();
            out.push_str(&format!(
                "| {env} | {flag} | {} | {} |\n",
                default(arg),
                meaning(arg)
            ));
        }
    }
    out.push('\n');
    out
}

fn page_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(PAGE)
}

/// The page split around its generated block: before (through the BEGIN line), the
/// block, after (from the END line).
fn split(page: &str) -> Option<(&str, &str, &str)> {
    let begin = page.find(BEGIN)?;
    let block_start = begin + page[begin..].find('\n')? + 1;
    let block_end = block_start + page[block_start..].find(END)?;
    Some((
        &page[..block_start],
        &page[block_start..block_end],
        &page[block_end..],
    ))
}

#[test]
fn the_configuration_page_lists_the_settings_as_serve_help_does() {
    let path = page_path();
    let page = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let Some((before, block, after)) = split(&page) else {
        panic!("{PAGE} has no `{BEGIN} ...` line followed by `{END}`");
    };
    let generated = reference();
    if block == generated {
        return;
    }
    if std::env::var_os("UPDATE_DOCS").is_some_and(|v| v == "1") {
        std::fs::write(&path, format!("{before}{generated}{after}"))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        eprintln!("{PAGE}: the generated reference was rewritten");
        return;
    }
    let (line, old, new) = block
        .lines()
        .zip(generated.lines())
        .enumerate()
        .find(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i + 1, a, b))
        .unwrap_or((
            block.lines().count().min(generated.lines().count()) + 1,
            "(end of block)",
            "(end of block)",
        ));
    panic!(
        "{PAGE} does not match the clap definitions (serve --help); run `{UPDATE}` to \
         rewrite its generated block.\nFirst difference, line {line} of the block:\n  \
         page: {old}\n  clap: {new}"
    );
}

#[test]
fn the_reference_holds_every_variable_serve_help_shows() {
    let help = serve().render_long_help().to_string();
    let mut in_help: Vec<&str> = help
        .match_indices("[env: ")
        .map(|(i, m)| {
            let rest = &help[i + m.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect();
    in_help.sort_unstable();
    let reference = reference();
    let mut in_reference: Vec<&str> = reference
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`').map(|(env, _)| env))
        .collect();
    in_reference.sort_unstable();
    assert!(!in_help.is_empty());
    assert_eq!(in_reference, in_help);
}

#[test]
fn serve_h_shows_one_short_sentence_per_setting() {
    // `serve -h` shows the first paragraph alone: one short sentence.
    for arg in serve().get_arguments() {
        if let Some(help) = arg.get_help() {
            let help = help.to_string();
            assert!(
                help.len() <= 100 && !help.contains(". "),
                "{}: the first paragraph of its doc comment should be one short sentence: {help}",
                arg.get_id()
            );
        }
    }
}
