//! `METERD_TEST_REQUIRE_SERVICES` really turns a missing service into a failure:
//! this test binary runs its own probe test (which needs the Redis of
//! `scripts/test`) as a child process with and without the switch and the
//! service, and reads the outcome. Needs no service itself.

mod common;

use common::require::{self, need};
use std::process::{Command, Output};

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
