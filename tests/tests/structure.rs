//! Checks of the code's shape that a reviewer would otherwise have to remember: files import one
//! way (no file uses a file that uses it back) and no function grows past a screenful without a
//! comment that says why.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Above this many lines a function needs a `// Long because …` comment above it.
const FUNCTION_LINES_MAX: usize = 100;

/// The crates whose library and binary sources are checked (tests and benchmarks may be long).
const CRATE_SOURCES: &[&str] = &["engine/src", "config/src", "storage/src", "http/src", "workers/src", "src"];

fn root() -> PathBuf {
    atelier_tests::workspace_root()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    atelier_tests::rust_sources(dir, out)
}

/// Source with comments, string and char literals blanked out (same length, same line breaks),
/// so braces and paths can be read off it.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to.min(b.len())] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    while i < b.len() {
        match b[i] {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                let end = text[i..].find('\n').map_or(b.len(), |n| i + n);
                blank(&mut out, i, end);
                i = end;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let end = text[i + 2..].find("*/").map_or(b.len(), |n| i + 2 + n + 2);
                blank(&mut out, i, end);
                i = end;
            }
            b'r' if (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
                && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')) =>
            {
                let hashes = b[i + 1..].iter().take_while(|c| **c == b'#').count();
                if b.get(i + 1 + hashes) != Some(&b'"') {
                    i += 1;
                    continue;
                }
                let close = format!("\"{}", "#".repeat(hashes));
                let start = i + 2 + hashes;
                let end = text[start..].find(&close).map_or(b.len(), |n| start + n + close.len());
                blank(&mut out, i, end);
                i = end;
            }
            b'"' => {
                let mut j = i + 1;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                blank(&mut out, i, j + 1);
                i = j + 1;
            }
            b'\'' => {
                // A char literal ('x', '\n', '{'); otherwise a lifetime.
                let len = if b.get(i + 1) == Some(&b'\\') {
                    text[i + 2..].find('\'').map(|n| n + 3)
                } else {
                    let ch = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                    (b.get(i + 1 + ch) == Some(&b'\'')).then_some(ch + 2)
                };
                match len {
                    Some(n) => {
                        blank(&mut out, i, i + n);
                        i += n;
                    }
                    None => i += 1,
                }
            }
            _ => i += 1,
        }
    }
    String::from_utf8(out).expect("invariant: only ASCII bytes were replaced")
}

/// The index of the brace that closes the one at `open`.
fn matching_brace(code: &[u8], open: usize) -> usize {
    let mut depth = 0usize;
    for (i, c) in code.iter().enumerate().skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// `#[cfg(test)]` items blanked out: test modules may use their parent freely.
fn without_test_items(code: &str) -> String {
    let mut out = code.as_bytes().to_vec();
    let mut from = 0;
    while let Some(n) = code[from..].find("#[cfg(test)]") {
        let at = from + n;
        let Some(open) = code[at..].find(['{', ';']).map(|k| at + k) else { break };
        let end = if code.as_bytes()[open] == b'{' { matching_brace(code.as_bytes(), open) } else { open };
        for c in &mut out[at..=end.min(code.len() - 1)] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
        from = end.min(code.len() - 1) + 1;
    }
    String::from_utf8(out).expect("invariant: only ASCII bytes were replaced")
}

fn line_of(code: &str, at: usize) -> usize {
    code[..at].bytes().filter(|b| *b == b'\n').count() + 1
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Functions longer than the limit without a `// Long because` comment in the lines above them.
fn long_functions(path: &Path, text: &str) -> Vec<String> {
    let code = without_test_items(&code_only(text));
    let bytes = code.as_bytes();
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(n) = code[from..].find("fn ") {
        let at = from + n;
        from = at + 3;
        if at > 0 && is_ident(bytes[at - 1]) {
            continue;
        }
        let name: String =
            code[at + 3..].trim_start().bytes().take_while(|c| is_ident(*c)).map(char::from).collect();
        if name.is_empty() {
            continue;
        }
        let Some(k) = code[at..].find(['{', ';']) else { break };
        if bytes[at + k] == b';' {
            continue;
        }
        let open = at + k;
        let close = matching_brace(bytes, open);
        let (first, last) = (line_of(&code, at), line_of(&code, close));
        let length = last - first + 1;
        if length <= FUNCTION_LINES_MAX {
            continue;
        }
        // The comment block and attributes right above the signature.
        let reason = lines[..first - 1]
            .iter()
            .rev()
            .take_while(|l| {
                let t = l.trim_start();
                t.starts_with("//") || t.starts_with("#[")
            })
            .any(|l| l.contains("Long because"));
        if !reason {
            found.push(format!(
                "{}:{first}: fn {name} is {} lines; split it, or say why above it (`// Long because …`)",
                path.display(),
                length
            ));
        }
    }
    found
}

/// The module path of a source file inside its crate's `src` dir: `a/b.rs` and `a/b/mod.rs` are
/// `["a", "b"]`; `lib.rs`, `main.rs` are the root. Binaries in `src/bin` are roots of their own.
fn module_of(src: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(src).ok()?;
    if rel.starts_with("bin") {
        return None;
    }
    let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let last = parts.pop()?;
    match last.as_str() {
        "lib.rs" | "main.rs" | "mod.rs" => {}
        other => parts.push(other.trim_end_matches(".rs").to_string()),
    }
    Some(parts)
}

/// The full paths a `use` tree names, braces expanded: `a::{b, c::d}` → `a::b`, `a::c::d`.
fn expand_use(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(open) = tree.find('{') else { return vec![tree.to_string()] };
    let prefix = &tree[..open];
    let close = matching_brace(tree.as_bytes(), open);
    let inner = &tree[open + 1..close];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(|p| expand_use(p).into_iter().map(move |q| format!("{prefix}{q}")))
        .collect()
}

/// The paths a file refers to inside its own crate, as module paths from the crate root.
fn references(module: &[String], code: &str, children: &BTreeSet<String>) -> Vec<Vec<String>> {
    let mut paths = Vec::new();
    let resolve = |p: &str| -> Option<Vec<String>> {
        let segs: Vec<String> = p
            .split("::")
            .map(|s| s.split_whitespace().next().unwrap_or("").to_string())
            .filter(|s| !s.is_empty())
            .collect();
        let mut base: Vec<String> = match segs.first()?.as_str() {
            "crate" => Vec::new(),
            "super" | "self" => module.to_vec(),
            first if children.contains(first) => {
                let mut m = module.to_vec();
                m.push(first.to_string());
                return Some([m, segs[1..].to_vec()].concat());
            }
            _ => return None,
        };
        let mut rest = &segs[..];
        while let Some(s) = rest.first() {
            match s.as_str() {
                "crate" | "self" => {}
                "super" => {
                    base.pop();
                }
                _ => break,
            }
            rest = &rest[1..];
        }
        base.extend(rest.iter().cloned());
        Some(base)
    };
    let bytes = code.as_bytes();
    let mut from = 0;
    while let Some(n) = code[from..].find("use ") {
        let at = from + n;
        from = at + 4;
        if at > 0 && is_ident(bytes[at - 1]) {
            continue;
        }
        let Some(end) = code[at..].find(';').map(|k| at + k) else { break };
        for p in expand_use(&code[at + 4..end]) {
            paths.extend(resolve(&p));
        }
    }
    let child_paths: Vec<String> = children.iter().map(|c| format!("{c}::")).collect();
    for key in ["crate::", "super::"].into_iter().chain(child_paths.iter().map(String::as_str)) {
        let mut from = 0;
        while let Some(n) = code[from..].find(key) {
            let at = from + n;
            from = at + key.len();
            if at > 0 && (is_ident(bytes[at - 1]) || bytes[at - 1] == b':') {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |k| at + k);
            paths.extend(resolve(&code[at..end]));
        }
    }
    paths
}

/// Pairs of files in one crate that each import from the other.
fn import_rings(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> =
        files.iter().filter_map(|f| Some((module_of(src, f)?, f.clone()))).collect();
    let mut edges: BTreeSet<(PathBuf, PathBuf)> = BTreeSet::new();
    for (module, file) in &modules {
        let code = without_test_items(&code_only(&std::fs::read_to_string(file).unwrap()));
        let children: BTreeSet<String> = modules
            .keys()
            .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
            .map(|m| m[module.len()].clone())
            .collect();
        for path in references(module, &code, &children) {
            // The longest prefix that is a file of its own is the file the path reaches into.
            let target = (0..=path.len()).rev().find_map(|k| modules.get(&path[..k]));
            if let Some(target) = target.filter(|t| *t != file) {
                edges.insert((file.clone(), target.clone()));
            }
        }
    }
    edges
        .iter()
        .filter(|(a, b)| a < b && edges.contains(&(b.clone(), a.clone())))
        .map(|(a, b)| format!("{} and {} import each other", a.display(), b.display()))
        .collect()
}

#[test]
fn no_function_over_the_limit_without_a_reason() {
    let mut problems = Vec::new();
    for dir in CRATE_SOURCES {
        let mut files = Vec::new();
        rust_files(&root().join(dir), &mut files);
        for f in files {
            problems.extend(long_functions(&f, &std::fs::read_to_string(&f).unwrap()));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn files_import_one_way() {
    let mut problems = Vec::new();
    for dir in CRATE_SOURCES {
        problems.extend(import_rings(&root().join(dir)));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

/// The checks themselves must be able to fail.
#[test]
fn the_checks_see_what_they_look_for() {
    let long = format!("fn big() {{\n{}}}\n", "    let s = \"}}{{\";\n".repeat(FUNCTION_LINES_MAX));
    assert_eq!(long_functions(Path::new("x.rs"), &long).len(), 1, "a long function is found");
    let excused = format!("// Long because one table reads best in one place.\n{long}");
    assert!(long_functions(Path::new("x.rs"), &excused).is_empty(), "a reason is heard");
    let short = "fn small() { let c = '{'; let r = r#\"{{\"#; }\n// fn not_code() {\n";
    assert!(long_functions(Path::new("x.rs"), short).is_empty());

    let scratch = atelier_tests::temp_dir("tidy");
    let dir = scratch.path();
    std::fs::create_dir_all(dir.join("a")).unwrap();
    std::fs::write(dir.join("lib.rs"), "//! x\nmod a;\nmod b;\n").unwrap();
    std::fs::write(dir.join("a/mod.rs"), "//! x\nmod c;\nuse crate::{b::B, a::c::C};\n").unwrap();
    std::fs::write(dir.join("a/c.rs"), "//! x\npub struct C;\n").unwrap();
    std::fs::write(dir.join("b.rs"), "//! x\npub struct B;\nfn f() { crate::a::thing(); }\n").unwrap();
    let rings = import_rings(dir);
    assert_eq!(rings.len(), 1, "{rings:?}");
    assert!(rings[0].contains("a/mod.rs") && rings[0].contains("b.rs"), "{rings:?}");
    std::fs::write(dir.join("b.rs"), "//! x\npub struct B;\n#[cfg(test)]\nmod t { use crate::a::X; }\n")
        .unwrap();
    assert!(import_rings(dir).is_empty(), "test modules do not count");
    std::fs::write(dir.join("a/c.rs"), "//! x\nuse super::D;\n").unwrap();
    let rings = import_rings(dir);
    assert!(
        rings.len() == 1 && rings[0].contains("c.rs"),
        "a child using its parent that uses it: {rings:?}"
    );
}
