//! The test harness's own promises, each checked across processes: this test
//! binary runs its own probe tests as child processes and reads the outcome.
//! `METERD_TEST_REQUIRE_SERVICES` really turns a missing service into a
//! failure (the probe needs the Redis of `scripts/test`; run with and without
//! the switch and the service); a port one test process was handed is not
//! handed to another while it lives. Needs no service itself.

mod common;

use common::require::{self, need};
use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};

const URL_VAR: &str = "METERD_TEST_REDIS_URL";

/// Not a test on its own (ignored): the child the test below runs.
#[test]
#[ignore = "run by switch_fails_a_test_whose_service_is_missing"]
fn probe_needs_redis() {
    let url = need!(require::redis_url());
    assert_eq!(url, "redis://probe.invalid:1/0", "the probe sees the URL it was given");
    println!("PROBE RAN");
}

/// Runs the probe with `switch` and `url` (None: unset) in its environment.
fn probe(switch: Option<&str>, url: Option<&str>) -> Output {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current test binary: {e}"));
    let mut cmd = Command::new(exe);
    cmd.args(["probe_needs_redis", "--exact", "--ignored", "--nocapture", "--test-threads=1"]);
    cmd.env_remove(require::SWITCH).env_remove(URL_VAR);
    if let Some(s) = switch {
        cmd.env(require::SWITCH, s);
    }
    if let Some(u) = url {
        cmd.env(URL_VAR, u);
    }
    cmd.output().unwrap_or_else(|e| panic!("run the probe: {e}"))
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn switch_fails_a_test_whose_service_is_missing() {
    // Switch on, service missing: the probe fails and says why and what to do.
    for on in ["1", "yes"] {
        let out = probe(Some(on), None);
        let said = text(&out);
        assert!(!out.status.success(), "switch {on:?}: the probe must fail without Redis:\n{said}");
        assert!(said.contains("METERD_TEST_REQUIRE_SERVICES is set but METERD_TEST_REDIS_URL is not set"), "{said}");
        assert!(said.contains("scripts/test"), "names the fix: {said}");
        assert!(!said.contains("PROBE RAN"), "{said}");
    }

    // Switch off (unset, empty or 0), service missing: skipped with a note, passes.
    for off in [None, Some(""), Some("0")] {
        let out = probe(off, None);
        let said = text(&out);
        assert!(out.status.success(), "switch {off:?}: a plain run skips:\n{said}");
        assert!(said.contains("SKIPPED: METERD_TEST_REDIS_URL is not set"), "{said}");
        assert!(said.contains("1 passed"), "the probe did run (and skip): {said}");
        assert!(!said.contains("PROBE RAN"), "{said}");
    }

    // Service there: the probe runs its body, with or without the switch.
    for switch in [Some("1"), None] {
        let out = probe(switch, Some("redis://probe.invalid:1/0"));
        let said = text(&out);
        assert!(out.status.success(), "switch {switch:?} with the service:\n{said}");
        assert!(said.contains("PROBE RAN") && !said.contains("SKIPPED"), "{said}");
    }
}

/// What the port probe does: `take` (claim a port, print it, hold it until
/// stdin closes) or `try:<port>` (print whether that port can be had).
const PORT_PROBE: &str = "METERD_TEST_PORT_PROBE";

/// Not a test on its own (ignored): the child the port test runs.
#[test]
#[ignore = "run by a_port_one_test_process_holds_is_not_handed_to_another"]
fn probe_ports() {
    let what = std::env::var(PORT_PROBE).unwrap_or_default();
    if what == "take" {
        // On a line of its own: libtest's "test probe_ports ... " precedes it.
        println!("\nHOLDING {}", common::ports::free_port());
        let _ = std::io::stdin().read_line(&mut String::new());
    } else if let Some(port) = what.strip_prefix("try:").and_then(|p| p.parse::<u16>().ok()) {
        match common::ports::free_ports_in(port..port + 1, &[0]) {
            Some(got) => println!("GOT {got}"),
            None => println!("NONE"),
        }
    } else {
        panic!("{PORT_PROBE} must be `take` or `try:<port>`, not {what:?}");
    }
}

fn port_probe(what: &str) -> Command {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current test binary: {e}"));
    let mut cmd = Command::new(exe);
    cmd.args(["probe_ports", "--exact", "--ignored", "--nocapture", "--test-threads=1"]).env(PORT_PROBE, what);
    cmd
}

fn tcp_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Two test processes starting servers at once must not pick the same port:
/// finding it free is not enough (both can, before either binds it), so each
/// port handed out is claimed for the life of the process that got it.
#[test]
fn a_port_one_test_process_holds_is_not_handed_to_another() {
    // This process's port, free for TCP, is refused to another process.
    let mine = common::ports::free_port();
    assert!(tcp_free(mine), "the port is still free for a server to bind");
    let out = port_probe(&format!("try:{mine}")).output().unwrap_or_else(|e| panic!("run the probe: {e}"));
    let said = text(&out);
    assert!(out.status.success() && said.contains("NONE") && !said.contains("GOT"), "another process got {mine}:\n{said}");

    // Another process's port is refused here while it lives, and free after.
    let mut child =
        port_probe("take").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("run the probe: {e}"));
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines().map_while(Result::ok);
    let theirs: u16 = lines
        .by_ref()
        .find_map(|l| l.split_once("HOLDING ").and_then(|(_, p)| p.trim().parse().ok()))
        .unwrap_or_else(|| panic!("the probe printed no port"));
    assert_ne!(theirs, mine);
    assert!(tcp_free(theirs), "the probe's port is free for a server to bind");
    assert_eq!(common::ports::free_ports_in(theirs..theirs + 1, &[0]), None, "got the port another process holds");
    drop(child.stdin.take());
    lines.for_each(drop);
    assert!(child.wait().expect("probe exits").success());
    assert_eq!(common::ports::free_ports_in(theirs..theirs + 1, &[0]), Some(theirs), "the port is free once its holder exited");
}
