//! The `meterd` binary's command line: version, help per subcommand, and
//! `check-config` reporting every problem of a file once, with exit codes.

use std::path::Path;
use std::process::{Command, Output};

fn meterd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_meterd"))
        .args(args)
        .env_remove("METERD_CONFIG")
        .env_remove("METERD_LISTEN")
        .output()
        .expect("run meterd")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_and_help() {
    let version = meterd(&["--version"]);
    assert!(version.status.success());
    assert_eq!(text(&version.stdout).trim(), format!("meterd {}", env!("CARGO_PKG_VERSION")));

    let help = meterd(&["--help"]);
    assert!(help.status.success());
    for needle in ["serve", "check-config", "wal", "--config", "METERD_CONFIG", "METERD_LISTEN"] {
        assert!(text(&help.stdout).contains(needle), "{needle} missing from:\n{}", text(&help.stdout));
    }
    for (sub, needle) in [("serve", "Run the daemon"), ("check-config", "print every problem"), ("wal", "verify")] {
        let out = meterd(&[sub, "--help"]);
        assert!(out.status.success(), "{sub} --help: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains(&format!("Usage: meterd {sub}")) && stdout.contains(needle), "{sub} --help:\n{stdout}");
        assert!(stdout.contains("--config"), "{sub} --help lists --config:\n{stdout}");
    }
    // Backup, restore and reload (issue 23).
    for (sub, needle) in [("backup", "--to <DIR>"), ("restore", "--from <DIR>"), ("reload", "SIGHUP")] {
        let out = meterd(&[sub, "--help"]);
        let stdout = text(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&format!("Usage: meterd {sub}")) && stdout.contains(needle),
            "{sub} --help:\n{stdout}"
        );
    }
    let wrong = meterd(&["frobnicate"]);
    assert_eq!(wrong.status.code(), Some(2), "a usage error exits 2");
}

#[test]
fn check_config_lists_every_problem_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    let bad = r#"
[storage]
flush_intervall = "1s"
colour = "red"
[ingest]
max_lateness = "3 weeks"
[[meters]]
name = "interviews"
[[plans]]
name = "starter"
default = true
[plans.limits]
interviews = [ { limit = 3, window = "day" }, { limit = 5, window = "fortnight" } ]
"#;
    std::fs::write(&path, bad).expect("write config");
    let path_text = path.display().to_string();
    for args in [vec!["check-config", "--config", path_text.as_str()], vec!["--config", path_text.as_str()]] {
        let out = meterd(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(&format!("config file {path_text} has 4 problem(s)")), "{args:?}:\n{stderr}");
        for line in [
            "- storage.flush_intervall: unknown key in",
            "(did you mean flush_interval?)",
            "- storage.colour: unknown key in",
            "- ingest.max_lateness: \"3 weeks\" is not a duration",
            "- plans.starter.limits.interviews[1].window:",
        ] {
            assert_eq!(stderr.matches(line).count(), 1, "{args:?}: {line:?} not exactly once in:\n{stderr}");
        }
        assert_eq!(stderr.matches("problem(s)").count(), 1, "the config is printed once:\n{stderr}");
    }
    // METERD_CONFIG names the file like --config.
    let out = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .arg("check-config")
        .env("METERD_CONFIG", &path)
        .env_remove("METERD_LISTEN")
        .output()
        .expect("run meterd");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("storage.colour"));
}

#[test]
fn shipped_configs_pass_check_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files = vec![root.join("meterd.toml")];
    let examples = std::fs::read_dir(root.join("examples")).expect("config/examples");
    files.extend(examples.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.extension().is_some_and(|x| x == "toml")));
    assert!(files.len() >= 3, "{files:?}");
    for file in files {
        let out = meterd(&["check-config", "--config", &file.display().to_string()]);
        assert!(out.status.success(), "{}: {}", file.display(), text(&out.stderr));
        assert!(text(&out.stdout).contains(": ok ("), "{}", text(&out.stdout));
    }
    // No file: the embedded default.
    let out = meterd(&["check-config"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("<embedded default>: ok"), "{}", text(&out.stdout));
}

/// Logs written to a file (not a terminal) carry no ANSI colour codes.
#[test]
fn logs_to_a_file_have_no_colour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("meterd.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_meterd"))
        .arg("serve")
        .current_dir(dir.path())
        .env_remove("METERD_CONFIG")
        .env_remove("METERD_LOG_FORMAT")
        .env("METERD_LISTEN", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn meterd");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut text = String::new();
    while std::time::Instant::now() < deadline && !text.contains("meterd listening") {
        std::thread::sleep(std::time::Duration::from_millis(50));
        text = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(text.contains("meterd listening"), "meterd did not start:\n{text}");
    assert!(!text.contains('\u{1b}'), "escape codes in a log file:\n{text:?}");
}
