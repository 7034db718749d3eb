//! The crate's files and which file imports which, read from the source with `syn`.
//!
//! A file imports another when a path in it names a module or an item of the other: in
//! a `use` (groups, renames, `self` and globs included), and anywhere in its code, types
//! and attributes (`crate::`, `super::`, `self::`, a child module's name, and in
//! `main.rs` the library's name). A name brought in by a `use` is followed to the file
//! that defines it, so a `mod.rs` that re-exports a child's item is not mistaken for its
//! definer. Declaring a module (`mod x;`) is not an import.
//!
//! What is compiled only for tests is left out: an item or module under `#[cfg(test)]`
//! (a `mod tests;` file and everything below it), and an item of an `impl` or `trait`
//! under it. Tests may reach across layers to build their fixtures; the layers are a
//! property of what ships.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proc_macro2::{Spacing, TokenStream, TokenTree};
use quote::ToTokens;
use syn::{Attribute, Item, UseTree};

/// The library's name, as `main.rs` writes it.
const LIB: &str = "node_vm_agent";

/// An import of `to` by `from` (files relative to `src/`), with the first path that
/// made it.
#[derive(Clone, Debug)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub path: String,
}

/// What was read: every edge between two different files, the files that ship, and the
/// files compiled only for tests.
pub struct Graph {
    pub edges: Vec<Edge>,
    pub files: BTreeSet<String>,
    pub test_files: BTreeSet<String>,
}

/// A module: its file, where it sits, and the names its `use` items bring in.
struct Module {
    file: String,
    parent: Option<usize>,
    /// The crate root it belongs to (the library's or `main.rs`).
    root: usize,
    children: BTreeMap<String, usize>,
    /// Name -> the path a `use` gave it (as written, relative to this module).
    bindings: BTreeMap<String, Vec<String>>,
    /// Paths written in `use` items (an edge each).
    uses: Vec<Vec<String>>,
    /// Paths written in the code (an edge each when they start in this crate).
    paths: Vec<Vec<String>>,
}

struct Reader {
    src: PathBuf,
    modules: Vec<Module>,
    test_files: BTreeSet<String>,
}

/// Reads the crate under `src` (`lib.rs`, and `main.rs` when there is one).
pub fn read(src: &Path) -> Graph {
    let mut r = Reader {
        src: src.to_path_buf(),
        modules: Vec::new(),
        test_files: BTreeSet::new(),
    };
    let lib = r.new_module("lib.rs", None, None);
    r.load_file(lib, "lib.rs", "");
    if src.join("main.rs").exists() {
        let main = r.new_module("main.rs", None, None);
        r.load_file(main, "main.rs", "");
    }
    let mut found: BTreeMap<(String, String), String> = BTreeMap::new();
    for m in 0..r.modules.len() {
        let module = &r.modules[m];
        let written = module.uses.iter().chain(module.paths.iter());
        for path in written {
            let Some(target) = r.resolve(m, path, 0) else {
                continue;
            };
            let (from, to) = (module.file.clone(), r.modules[target].file.clone());
            if from != to {
                found.entry((from, to)).or_insert_with(|| path.join("::"));
            }
        }
    }
    Graph {
        edges: found
            .into_iter()
            .map(|((from, to), path)| Edge { from, to, path })
            .collect(),
        files: r.modules.iter().map(|m| m.file.clone()).collect(),
        test_files: r.test_files,
    }
}

/// Whether the attributes hold `#[cfg(test)]`.
pub fn is_cfg_test(attrs: &[Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.meta
                .require_list()
                .is_ok_and(|l| l.tokens.to_string() == "test")
    })
}

/// The `#[path = "..."]` of a module declaration.
fn path_attr(attrs: &[Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| match &a.meta {
        syn::Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    })
}

impl Reader {
    fn new_module(&mut self, file: &str, parent: Option<usize>, root: Option<usize>) -> usize {
        let id = self.modules.len();
        self.modules.push(Module {
            file: file.to_string(),
            parent,
            root: root.unwrap_or(id),
            children: BTreeMap::new(),
            bindings: BTreeMap::new(),
            uses: Vec::new(),
            paths: Vec::new(),
        });
        id
    }

    /// Parses `file` (relative to `src/`) as module `m`; `dir` is where its child
    /// modules' files are.
    fn load_file(&mut self, m: usize, file: &str, dir: &str) {
        let text =
            std::fs::read_to_string(self.src.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        let parsed = syn::parse_file(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        if is_cfg_test(&parsed.attrs) {
            return;
        }
        self.load_items(m, &parsed.items, file, dir);
    }

    fn load_items(&mut self, m: usize, items: &[Item], file: &str, dir: &str) {
        for item in items {
            match item {
                Item::Mod(md) if is_cfg_test(&md.attrs) => self.skip_tests(md, file, dir),
                Item::Mod(md) => self.load_mod(m, md, file, dir),
                Item::Use(u) if !is_cfg_test(&u.attrs) => {
                    let mut prefix = Vec::new();
                    self.load_use(m, &u.tree, &mut prefix);
                }
                Item::Impl(i) if !is_cfg_test(&i.attrs) => {
                    let mut tokens = TokenStream::new();
                    for a in &i.attrs {
                        a.to_tokens(&mut tokens);
                    }
                    i.generics.to_tokens(&mut tokens);
                    if let Some((_, t, _)) = &i.trait_ {
                        t.to_tokens(&mut tokens);
                    }
                    i.self_ty.to_tokens(&mut tokens);
                    for it in i.items.iter().filter(|it| !impl_item_is_test(it)) {
                        it.to_tokens(&mut tokens);
                    }
                    self.scan(m, tokens);
                }
                other if !item_is_test(other) => self.scan(m, other.to_token_stream()),
                _ => {}
            }
        }
    }

    /// The file of a `mod name;` declared in `file`, whose children live in `dir`.
    fn child_file(&self, md: &syn::ItemMod, file: &str, dir: &str) -> String {
        let name = md.ident.to_string();
        if let Some(p) = path_attr(&md.attrs) {
            let here = Path::new(file).parent().unwrap_or(Path::new(""));
            return here.join(p).to_string_lossy().into_owned();
        }
        let flat = format!("{dir}{name}.rs");
        if self.src.join(&flat).exists() {
            flat
        } else {
            format!("{dir}{name}/mod.rs")
        }
    }

    fn load_mod(&mut self, m: usize, md: &syn::ItemMod, file: &str, dir: &str) {
        let name = md.ident.to_string();
        let root = self.modules[m].root;
        match &md.content {
            Some((_, items)) => {
                let child = self.new_module(file, Some(m), Some(root));
                self.modules[m].children.insert(name.clone(), child);
                self.load_items(child, items, file, &format!("{dir}{name}/"));
            }
            None => {
                let child_file = self.child_file(md, file, dir);
                let child = self.new_module(&child_file, Some(m), Some(root));
                self.modules[m].children.insert(name, child);
                let child_dir = match child_file.strip_suffix("mod.rs") {
                    Some(d) => d.to_string(),
                    None => format!("{}/", child_file.trim_end_matches(".rs")),
                };
                self.load_file(child, &child_file, &child_dir);
            }
        }
    }

    /// A test-only module: left out, its files (if any) noted as tests.
    fn skip_tests(&mut self, md: &syn::ItemMod, file: &str, dir: &str) {
        if md.content.is_none() {
            let child = self.child_file(md, file, dir);
            self.mark_tests(&child);
        }
    }

    /// A test-only module's file and, below it, the files it declares.
    fn mark_tests(&mut self, file: &str) {
        self.test_files.insert(file.to_string());
        let Ok(text) = std::fs::read_to_string(self.src.join(file)) else {
            return;
        };
        let Ok(parsed) = syn::parse_file(&text) else {
            return;
        };
        let dir = match file.strip_suffix("mod.rs") {
            Some(d) => d.to_string(),
            None => format!("{}/", file.trim_end_matches(".rs")),
        };
        for item in &parsed.items {
            if let Item::Mod(md) = item
                && md.content.is_none()
            {
                let child = self.child_file(md, file, &dir);
                self.mark_tests(&child);
            }
        }
    }

    fn load_use(&mut self, m: usize, tree: &UseTree, prefix: &mut Vec<String>) {
        match tree {
            UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.load_use(m, &p.tree, prefix);
                prefix.pop();
            }
            UseTree::Name(n) => {
                let name = n.ident.to_string();
                let mut full = prefix.clone();
                if name != "self" {
                    full.push(name.clone());
                }
                let bound = if name == "self" {
                    prefix.last().cloned().unwrap_or_default()
                } else {
                    name
                };
                self.bind(m, bound, full);
            }
            UseTree::Rename(r) => {
                let mut full = prefix.clone();
                if r.ident != "self" {
                    full.push(r.ident.to_string());
                }
                self.bind(m, r.rename.to_string(), full);
            }
            UseTree::Glob(_) => self.modules[m].uses.push(prefix.clone()),
            UseTree::Group(g) => {
                for t in &g.items {
                    self.load_use(m, t, prefix);
                }
            }
        }
    }

    fn bind(&mut self, m: usize, name: String, full: Vec<String>) {
        let module = &mut self.modules[m];
        module.uses.push(full.clone());
        if name != "_" {
            module.bindings.insert(name, full);
        }
    }

    /// Records every path in `tokens` that may start in this crate.
    fn scan(&mut self, m: usize, tokens: TokenStream) {
        self.scan_nested(m, tokens, 0);
    }

    /// [`Reader::scan`] inside `nested` modules that a macro writes (`mod $name { .. }`
    /// in a `macro_rules!`): a path there that stays inside them is this file's own.
    fn scan_nested(&mut self, m: usize, tokens: TokenStream, nested: usize) {
        let trees: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < trees.len() {
            match &trees[i] {
                TokenTree::Group(g) => {
                    let inner = nested + usize::from(opens_module(&trees, i));
                    self.scan_nested(m, g.stream(), inner);
                    i += 1;
                }
                TokenTree::Ident(id) if !after_path_sep(&trees, i) => {
                    let (mut path, next) = path_at(&trees, i);
                    i = next.max(i + 1);
                    // A lone `crate` or `super` is a visibility (`pub(crate)`).
                    if path.len() < 2 {
                        continue;
                    }
                    if nested > 0 && *id != "crate" && *id != LIB {
                        let ups = path.iter().take_while(|s| *s == "super").count();
                        if ups <= nested {
                            continue;
                        }
                        path.drain(..nested);
                    }
                    self.modules[m].paths.push(path);
                }
                _ => i += 1,
            }
        }
    }

    /// The module `path`'s first segment names in module `m` (then the rest of the
    /// path is walked from it), or the path a `use` gave that name.
    fn start(&self, m: usize, first: &str) -> Option<Start> {
        let module = &self.modules[m];
        match first {
            "crate" => Some(Start::Module(module.root)),
            "self" => Some(Start::Module(m)),
            "super" => module.parent.map(Start::Module),
            LIB => Some(Start::Module(0)),
            name => match module.children.get(name) {
                Some(&c) => Some(Start::Module(c)),
                None => module.bindings.get(name).cloned().map(Start::Bound),
            },
        }
    }

    /// The module whose file defines what `path`, written in module `m`, names; `None`
    /// for a path into another crate, or to a name of `m`'s own.
    fn resolve(&self, m: usize, path: &[String], depth: usize) -> Option<usize> {
        if depth > 16 || path.is_empty() {
            return None;
        }
        let mut at = match self.start(m, &path[0])? {
            Start::Module(at) => at,
            Start::Bound(mut via) => {
                via.extend(path[1..].iter().cloned());
                return self.resolve(m, &via, depth + 1);
            }
        };
        let rest = &path[1..];
        for (i, seg) in rest.iter().enumerate() {
            let module = &self.modules[at];
            if seg == "super" {
                at = module.parent?;
            } else if seg == "self" {
                continue;
            } else if let Some(&c) = module.children.get(seg) {
                at = c;
            } else if let Some(target) = module.bindings.get(seg) {
                // A name another `use` brought in: what it names, then the rest.
                let mut via = target.clone();
                via.extend(rest[i + 1..].iter().cloned());
                return self.resolve(at, &via, depth + 1).or(Some(at));
            } else {
                return Some(at);
            }
        }
        Some(at)
    }
}

enum Start {
    Module(usize),
    Bound(Vec<String>),
}

fn item_is_test(item: &Item) -> bool {
    let attrs = match item {
        Item::Const(i) => &i.attrs,
        Item::Enum(i) => &i.attrs,
        Item::ExternCrate(i) => &i.attrs,
        Item::Fn(i) => &i.attrs,
        Item::ForeignMod(i) => &i.attrs,
        Item::Impl(i) => &i.attrs,
        Item::Macro(i) => &i.attrs,
        Item::Mod(i) => &i.attrs,
        Item::Static(i) => &i.attrs,
        Item::Struct(i) => &i.attrs,
        Item::Trait(i) => &i.attrs,
        Item::TraitAlias(i) => &i.attrs,
        Item::Type(i) => &i.attrs,
        Item::Union(i) => &i.attrs,
        Item::Use(i) => &i.attrs,
        _ => return false,
    };
    is_cfg_test(attrs)
}

fn impl_item_is_test(item: &syn::ImplItem) -> bool {
    match item {
        syn::ImplItem::Const(i) => is_cfg_test(&i.attrs),
        syn::ImplItem::Fn(i) => is_cfg_test(&i.attrs),
        syn::ImplItem::Type(i) => is_cfg_test(&i.attrs),
        _ => false,
    }
}

/// Whether the group at `i` is the body of a module: `mod name { .. }` or, in a macro,
/// `mod $name { .. }`.
fn opens_module(trees: &[TokenTree], i: usize) -> bool {
    let is_mod = |t: Option<&TokenTree>| matches!(t, Some(TokenTree::Ident(k)) if k == "mod");
    let is_name = |t: Option<&TokenTree>| matches!(t, Some(TokenTree::Ident(_)));
    let is_dollar =
        |t: Option<&TokenTree>| matches!(t, Some(TokenTree::Punct(p)) if p.as_char() == '$');
    let at = |k: usize| i.checked_sub(k).and_then(|j| trees.get(j));
    (is_name(at(1)) && is_mod(at(2))) || (is_name(at(1)) && is_dollar(at(2)) && is_mod(at(3)))
}

/// Whether the token at `i` follows a `::` (so it does not start a path).
fn after_path_sep(trees: &[TokenTree], i: usize) -> bool {
    i >= 2 && is_colon(&trees[i - 1], Spacing::Alone) && is_colon(&trees[i - 2], Spacing::Joint)
}

fn is_colon(t: &TokenTree, spacing: Spacing) -> bool {
    matches!(t, TokenTree::Punct(p) if p.as_char() == ':' && p.spacing() == spacing)
}

/// The path `a::b::c` starting at `i` (identifiers joined by `::`), and the index after it.
fn path_at(trees: &[TokenTree], i: usize) -> (Vec<String>, usize) {
    let mut path = Vec::new();
    let mut j = i;
    while let Some(TokenTree::Ident(id)) = trees.get(j) {
        path.push(id.to_string());
        let sep = trees
            .get(j + 1)
            .is_some_and(|t| is_colon(t, Spacing::Joint))
            && trees
                .get(j + 2)
                .is_some_and(|t| is_colon(t, Spacing::Alone));
        if !sep {
            return (path, j + 1);
        }
        j += 3;
    }
    (path, j)
}
