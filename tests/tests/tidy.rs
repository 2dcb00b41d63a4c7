//! Checks of the codebase itself: docs that must match code, and habits the style asks for.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    atelier_tests::workspace_root()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    atelier_tests::rust_sources(dir, out)
}

#[test]
fn architecture_md_shows_the_real_transition_table() {
    let doc = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    assert!(
        doc.contains(&atelier_engine::transitions_markdown()),
        "ARCHITECTURE.md's transition table differs from engine::TRANSITIONS; paste transitions_markdown() into it"
    );
}

#[test]
fn ci_runs_the_readme_test_command() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    let script = std::fs::read_to_string(root().join("scripts/test")).unwrap();
    assert!(readme.contains("\nscripts/test "), "README's test command is scripts/test");
    assert!(ci.contains("\nexec scripts/test\n"), ".ci/run runs the README's test command");
    assert!(script.contains("\ncargo test --workspace\n"), "scripts/test runs every workspace test");
}

#[test]
fn every_module_says_why_it_exists_and_no_debug_leftovers() {
    let mut files = Vec::new();
    for dir in ["config", "engine", "storage", "http", "workers", "src", "tests", "fuzz/fuzz_targets"] {
        rust_files(&root().join(dir), &mut files);
    }
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        if !first.starts_with("//!") {
            problems.push(format!("{}: does not start with a //! comment", f.display()));
        }
        for (needle, what) in
            [("dbg!(", "dbg!"), ("#[ignore", "#[ignore]"), ("FIXME", "FIXME"), ("todo!(", "todo!")]
        {
            // Split so this file does not flag itself.
            if text.contains(needle) && !f.ends_with("tidy.rs") {
                problems.push(format!("{}: contains {what}", f.display()));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
