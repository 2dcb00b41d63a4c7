//! Names the source revision the `atelier` binary was built from (`atelier --version`, the
//! `atelier_build_info` series): `ATELIER_REVISION` when the builder sets it (a package built
//! from a tarball), else the git commit of the checkout, else "unknown".
//!
//! Cargo runs this again only when HEAD or the branch it points at moves (their files under
//! the git dir), not on every edit of a source file: a commit relinks the binary, nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What a build outside a git checkout, without `ATELIER_REVISION`, says.
const UNKNOWN: &str = "unknown";
/// Hex digits of the commit kept: enough to be unique in any repository of this size.
const REVISION_DIGITS: usize = 12;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=ATELIER_REVISION");
    let revision = match std::env::var("ATELIER_REVISION") {
        Ok(r) if !r.trim().is_empty() => r,
        _ => git_revision().unwrap_or_else(|| UNKNOWN.to_string()),
    };
    // A label value and a version line: keep it to characters that need no escaping.
    let revision: String =
        revision.trim().chars().filter(|c| c.is_ascii_alphanumeric() || "._-+".contains(*c)).collect();
    let revision = if revision.is_empty() { UNKNOWN.to_string() } else { revision };
    println!("cargo:rustc-env=ATELIER_REVISION={revision}");
}

/// The checkout's commit, and the files whose change means a new one.
fn git_revision() -> Option<String> {
    let git_dir = PathBuf::from(git(&["rev-parse", "--git-dir"])?);
    // A worktree keeps its HEAD in its own git dir and the branches in the common one.
    let common_dir = PathBuf::from(git(&["rev-parse", "--git-common-dir"])?);
    watch(&git_dir.join("HEAD"));
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch(&common_dir.join(branch));
    }
    // A branch packed by `git gc` lives here instead of in its own file.
    watch(&common_dir.join("packed-refs"));
    let full = git(&["rev-parse", "HEAD"])?;
    Some(full.chars().take(REVISION_DIGITS).collect())
}

/// Reruns this script when `path` changes. Only a file that exists: cargo reruns a script
/// that names a missing one on every build.
fn watch(path: &Path) {
    if path.is_file() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// `git ARGS` run in this package's dir: its trimmed output, or `None` when git is missing
/// or this is not a checkout.
fn git(args: &[&str]) -> Option<String> {
    let dir = std::env::var_os("CARGO_MANIFEST_DIR")?;
    let out = Command::new("git").arg("-C").arg(&dir).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    // `--git-dir` may answer relative to the dir it ran in.
    if args.first() == Some(&"rev-parse") && args.get(1).is_some_and(|a| a.starts_with("--git")) {
        return Some(Path::new(&dir).join(text).to_string_lossy().into_owned());
    }
    Some(text)
}
