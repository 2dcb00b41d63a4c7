//! End-to-end: the command line as a user meets it. `atelier --help`, `atelier help`, every
//! subcommand's `--help` and a mistyped subcommand, run against the real binary and kept as
//! snapshots, so a change to the help text is reviewed as a diff.

use std::path::Path;
use std::process::Command;

fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_atelier"))
}

/// What the user sees: the exit code, then stdout, then stderr.
fn run(args: &[&str]) -> String {
    let out = Command::new(exe())
        .args(args)
        // Plain text whatever the caller's terminal settings.
        .env_remove("CLICOLOR_FORCE")
        .env("NO_COLOR", "1")
        .output()
        .expect("run atelier");
    format!(
        "exit: {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every subcommand a user can name.
const SUBCOMMANDS: &[&str] =
    &["serve", "token", "secret", "replay", "export", "import", "submit", "watch", "status", "list"];

#[test]
fn top_level_help() {
    insta::assert_snapshot!("atelier_help_flag", run(&["--help"]));
    insta::assert_snapshot!("atelier_help_short_flag", run(&["-h"]));
    // `atelier help` and bare `atelier` print the same help and succeed.
    let help = run(&["help"]);
    assert_eq!(help, run(&["--help"]));
    assert_eq!(run(&[]), help);
    assert!(help.contains("ATELIER_LISTEN"), "the settings are listed: {help}");
}

/// README's settings table lists every variable `atelier help` does.
#[test]
fn readme_lists_every_setting_of_the_help() {
    let help = run(&["help"]);
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    // The table's rows: indented, a variable first.
    let settings = help.lines().filter_map(|l| l.strip_prefix("    ")?.split_whitespace().next());
    let names: Vec<&str> = settings.filter(|w| w.starts_with("ATELIER_")).collect();
    assert!(names.len() >= 15, "the help's settings table: {names:?}");
    for name in names {
        assert!(readme.contains(&format!("`{name}`")), "README's settings table lacks {name}");
    }
}

#[test]
fn every_subcommand_has_its_own_help() {
    for sub in SUBCOMMANDS {
        let text = run(&[sub, "--help"]);
        assert!(text.starts_with("exit: Some(0)"), "{sub}: {text}");
        assert_eq!(run(&["help", sub]), text, "`atelier help {sub}` is `atelier {sub} --help`");
        insta::assert_snapshot!(format!("{sub}_help"), text);
    }
    let text = run(&["secret", "rotate", "--help"]);
    assert!(text.starts_with("exit: Some(0)"), "{text}");
    insta::assert_snapshot!("secret_rotate_help", text);
}

#[test]
fn usage_errors_suggest_and_exit_2() {
    insta::assert_snapshot!("mistyped_subcommand", run(&["serv"]));
    insta::assert_snapshot!("mistyped_flag", run(&["submit", "--contxt", "{}"]));
    insta::assert_snapshot!("missing_required_flag", run(&["token"]));
    assert!(run(&["--version"]).contains(&format!("atelier {}", env!("CARGO_PKG_VERSION"))));
}

#[test]
fn runtime_errors_print_their_causes() {
    let dir = atelier_tests::temp_dir("cli-help");
    let missing = dir.path().join("missing.toml");
    let text = run(&["replay", "--check", "--config", missing.to_str().unwrap()]);
    assert!(text.starts_with("exit: Some(2)"), "{text}");
    assert!(text.contains(&format!("atelier: cannot read {}\n  caused by: ", missing.display())), "{text}");
    // A bad value names the variable it came from, whichever command reads it.
    let out = Command::new(exe())
        .args(["export", "--data-dir", dir.path().join("data").to_str().unwrap()])
        .env("ATELIER_DURABILITY", "often")
        .output()
        .expect("run atelier");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "atelier: setting 'ATELIER_DURABILITY': 'often' is not sync or periodic\n"
    );
}
