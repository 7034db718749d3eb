//! How long the functions that ship are, read from the source with `syn`.
//!
//! A function's length is its lines of code from `fn` to its closing brace, not
//! counting blank lines and lines that are only a comment (clippy's `too_many_lines`
//! counts the same way). A closure or a function nested in a body counts as part of
//! the function around it. What is compiled only for tests is left out, as in
//! `graph.rs`: test-only files, and items, modules, impls and impl items under
//! `#[cfg(test)]`.

use std::path::Path;

use syn::spanned::Spanned;
use syn::{ImplItem, Item, TraitItem};

use crate::graph::is_cfg_test as cfg_test;

/// A function that ships: where it starts and its lines of code.
#[derive(Debug)]
pub struct Function {
    pub file: String,
    pub name: String,
    pub line: usize,
    pub lines: usize,
}

/// Every shipping function of `files` (paths under `src`).
pub fn functions<'a>(src: &Path, files: impl IntoIterator<Item = &'a String>) -> Vec<Function> {
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(src.join(file)).unwrap();
        let parsed = syn::parse_file(&text).unwrap();
        if cfg_test(&parsed.attrs) {
            continue;
        }
        let lines: Vec<&str> = text.lines().collect();
        let mut reader = Reader {
            file,
            lines: &lines,
            out: &mut out,
        };
        reader.items(&parsed.items, "");
    }
    out
}

struct Reader<'a> {
    file: &'a str,
    lines: &'a [&'a str],
    out: &'a mut Vec<Function>,
}

impl Reader<'_> {
    fn items(&mut self, items: &[Item], owner: &str) {
        for item in items {
            match item {
                Item::Fn(f) if !cfg_test(&f.attrs) => {
                    self.function(&f.sig, f.block.span(), owner);
                }
                Item::Impl(i) if !cfg_test(&i.attrs) => {
                    let ty = i.self_ty.span().source_text().unwrap_or_default();
                    for it in &i.items {
                        if let ImplItem::Fn(f) = it
                            && !cfg_test(&f.attrs)
                        {
                            self.function(&f.sig, f.block.span(), &ty);
                        }
                    }
                }
                Item::Trait(t) if !cfg_test(&t.attrs) => {
                    for it in &t.items {
                        if let TraitItem::Fn(f) = it
                            && let Some(body) = &f.default
                            && !cfg_test(&f.attrs)
                        {
                            self.function(&f.sig, body.span(), &t.ident.to_string());
                        }
                    }
                }
                Item::Mod(m) if !cfg_test(&m.attrs) => {
                    if let Some((_, inner)) = &m.content {
                        self.items(inner, owner);
                    }
                }
                _ => {}
            }
        }
    }

    fn function(&mut self, sig: &syn::Signature, body: proc_macro2::Span, owner: &str) {
        let (first, last) = (sig.fn_token.span.start().line, body.end().line);
        let lines = self.lines[first - 1..last]
            .iter()
            .map(|l| l.trim())
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .count();
        let name = if owner.is_empty() {
            sig.ident.to_string()
        } else {
            format!("{owner}::{}", sig.ident)
        };
        self.out.push(Function {
            file: self.file.to_string(),
            name,
            line: first,
            lines,
        });
    }
}
