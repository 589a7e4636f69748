//! Validation as a whole: every problem of a file in one run, with key paths.

use super::*;
use std::time::Duration;

const PLAN: &str = "[[plans]]\nname = \"p\"\ndefault = true\n";

fn no_overrides() -> Overrides {
    Overrides::default()
}

fn check(text: &str, overrides: &Overrides) -> Result<ValidConfig, ConfigError> {
    Config::parse(text, "t.toml").and_then(|c| c.validate_with("t.toml", overrides))
}

/// Every problem, as `key: reason`.
fn problems(text: &str) -> Vec<ConfigProblem> {
    match check(text, &no_overrides()) {
        Ok(_) => vec![],
        Err(ConfigError::Invalid { problems, .. }) => problems,
        Err(e) => vec![ConfigProblem { key: "<not invalid>".into(), reason: e.to_string() }],
    }
}

fn keys(text: &str) -> Vec<String> {
    problems(text).into_iter().map(|p| p.key).collect()
}

fn valid(text: &str) -> ValidConfig {
    check(text, &no_overrides()).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn embedded_default_is_valid() {
    assert_eq!(keys(EMBEDDED_DEFAULT), Vec::<String>::new());
}

#[test]
fn shipped_examples_are_valid() {
    for name in ["interview-platform.toml", "several-instances.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples").join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(keys(&text), Vec::<String>::new(), "{name}");
    }
}

#[test]
fn a_bad_duration_hides_no_unknown_key() {
    let text = format!("[storage]\nflush_intervall = \"1s\"\ncolour = \"red\"\n[ingest]\nmax_lateness = \"3 weeks\"\n{PLAN}");
    let found = problems(&text);
    let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["ingest.max_lateness", "storage.colour", "storage.flush_intervall"], "grouped by key: {found:?}");
    assert!(found[0].reason.contains("\"3 weeks\" is not a duration"), "{found:?}");
    assert_eq!(found[1].reason, "unknown key in t.toml", "no suggestion for a stranger");
    assert_eq!(found[2].reason, "unknown key in t.toml (did you mean flush_interval?)");
    let message = check(&text, &no_overrides()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.starts_with("config file t.toml has 3 problem(s):"), "{message}");
}

#[test]
fn values_of_the_wrong_type_are_reported_with_the_rest() {
    let text = "[server]\nlisten = 8480\nmax_connections = \"many\"\nidle_timeout = 60\n[storage]\ndurability = \"sometimes\"\nwal_segment_bytes = 100\n\
                [redis]\nurls = [\"redis://a\", 7]\n[[meters]]\nname = \"m\"\nprecision = 1.5\n[[plans]]\nname = \"p\"\ndefault = \"yes\"\n\
                features = { sso = 1, audit = true }\n";
    let found = problems(text);
    let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "server.listen",
        "server.max_connections",
        "server.idle_timeout",
        "storage.durability",
        "storage.wal_segment_bytes",
        "redis.urls[1]",
        "meters.m.precision",
        "plans.p.default",
        "plans.p.features.sso",
        "plans",
    ] {
        assert!(keys.contains(&key), "missing {key} in {found:?}");
    }
    let reason = |key: &str| found.iter().find(|p| p.key == key).map(|p| p.reason.clone()).unwrap_or_default();
    assert_eq!(reason("server.listen"), "must be a string, not an integer 8480");
    assert_eq!(reason("server.idle_timeout"), "must be a duration string such as \"5s\" or \"200ms\", not an integer 60");
    assert_eq!(reason("storage.durability"), "\"sometimes\" must be one of fsync, buffered, none");
    assert_eq!(reason("storage.wal_segment_bytes"), "must be at least 4096");
}

#[test]
fn plans_meters_and_keys_are_named_by_name() {
    let text = r#"
[[meters]]
name = "interviews"
[[meters]]
name = "Bad Name"
aggregation = "avg"
[[plans]]
name = "starter"
default = true
[plans.limits]
interviews = [ { limit = 3, window = "day" }, { limit = 5, window = "fortnight" } ]
ghost = { limit = 1, window = "day" }
[[plans]]
name = "twice"
[[plans]]
name = "twice"
[[auth.keys]]
name = "app-servers"
key_sha256 = "abc"
scopes = ["ingest", "fly"]
colour = 1
"#;
    let keys = keys(text);
    for key in [
        "plans.starter.limits.interviews[1].window",
        "plans.starter.limits.ghost",
        "meters.\"Bad Name\".name",
        "meters.\"Bad Name\".aggregation",
        "plans[2].name",
        "auth.keys.app-servers.key_sha256",
        "auth.keys.app-servers.scopes",
        "auth.keys.app-servers.colour",
    ] {
        assert!(keys.iter().any(|k| k == key), "missing {key} in {keys:?}");
    }
}

#[test]
fn the_listen_refusal_blames_where_the_address_came_from() {
    let open = format!("[server]\nlisten = \"0.0.0.0:8480\"\n{PLAN}");
    let loopback = format!("[server]\nlisten = \"127.0.0.1:8480\"\n{PLAN}");
    let from_env = Overrides { listen: Some("0.0.0.0:9000".into()) };
    let blamed = |text: &str, o: &Overrides| match check(text, o) {
        Err(ConfigError::Invalid { problems, .. }) => problems,
        other => panic!("expected invalid, got {other:?}"),
    };
    assert_eq!(blamed(&open, &no_overrides()).iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["server.listen"]);
    let env = blamed(&loopback, &from_env);
    assert_eq!(env.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["METERD_LISTEN"], "{env:?}");
    assert!(env[0].reason.contains("0.0.0.0:9000"), "{env:?}");
    let bad = blamed(&loopback, &Overrides { listen: Some("nowhere".into()) });
    assert_eq!(bad.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["METERD_LISTEN"], "{bad:?}");
    // The variable wins over the file, in both directions.
    let ok = check(&open, &Overrides { listen: Some("127.0.0.1:9001".into()) }).map(|v| v.server.listen);
    assert_eq!(ok.ok(), Some("127.0.0.1:9001".parse().unwrap_or_else(|e| panic!("{e}"))));
}

#[test]
fn server_settings_have_defaults_and_are_checked() {
    let defaults = valid(PLAN).server;
    assert_eq!(
        (defaults.header_read_timeout, defaults.body_read_timeout, defaults.idle_timeout, defaults.max_connections),
        (Duration::from_secs(10), Duration::from_secs(30), Duration::from_secs(60), 10_000)
    );
    assert_eq!(defaults.shutdown_grace, Duration::from_secs(30));
    assert_eq!(defaults.connection_threads, None, "one per CPU unless set");
    let set = valid(&format!(
        "[server]\nheader_read_timeout = \"2s\"\nbody_read_timeout = \"5s\"\nidle_timeout = \"90s\"\nmax_connections = 64\nconnection_threads = 3\n{PLAN}"
    ))
    .server;
    assert_eq!(
        (set.header_read_timeout, set.body_read_timeout, set.idle_timeout, set.max_connections, set.connection_threads),
        (Duration::from_secs(2), Duration::from_secs(5), Duration::from_secs(90), 64, Some(3))
    );
    let bad = format!(
        "[server]\nheader_read_timeout = \"0s\"\nbody_read_timeout = \"soon\"\nidle_timeout = \"0ms\"\nmax_connections = 0\nconnection_threads = 0\n{PLAN}"
    );
    assert_eq!(
        keys(&bad),
        [
            "server.body_read_timeout",
            "server.connection_threads",
            "server.header_read_timeout",
            "server.idle_timeout",
            "server.max_connections"
        ]
    );
    for threads in ["257", "-1", "\"two\""] {
        assert_eq!(keys(&format!("[server]\nconnection_threads = {threads}\n{PLAN}")), ["server.connection_threads"], "{threads}");
    }
}

#[test]
fn wal_sync_spacing_takes_microseconds_up_to_ten_milliseconds() {
    let spacing = |text: &str| valid(&format!("[storage]\nwal_sync_spacing = \"{text}\"\n{PLAN}")).storage.wal_sync_spacing;
    assert_eq!(valid(PLAN).storage.wal_sync_spacing, Duration::ZERO, "off by default");
    assert_eq!(spacing("800us"), Duration::from_micros(800));
    assert_eq!(spacing("250us"), Duration::from_micros(250));
    assert_eq!(spacing("0us"), Duration::ZERO, "zero turns it off");
    assert_eq!(spacing("0ms"), Duration::ZERO);
    assert_eq!(spacing("10ms"), Duration::from_millis(10));
    for bad in ["11ms", "1s", "1.5ms", "800", "soon"] {
        let found = problems(&format!("[storage]\nwal_sync_spacing = \"{bad}\"\n{PLAN}"));
        assert_eq!(found.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["storage.wal_sync_spacing"], "{bad}: {found:?}");
    }
    let too_long = problems(&format!("[storage]\nwal_sync_spacing = \"20ms\"\n{PLAN}"));
    assert!(too_long[0].reason.starts_with("must be at most 10ms"), "{too_long:?}");
    let not_one = problems(&format!("[storage]\nwal_sync_spacing = \"1.5ms\"\n{PLAN}"));
    assert!(not_one[0].reason.contains("us, ms, s"), "the error names the units: {not_one:?}");
    // Elsewhere microseconds stay refused: no other duration takes them.
    assert_eq!(keys(&format!("[storage]\nflush_interval = \"500us\"\n{PLAN}")), ["storage.flush_interval"]);
}

#[test]
fn settings_are_resolved_to_types() {
    let v = valid(&format!(
        "[storage]\ndurability = \"buffered\"\nwal_sync_interval = \"20ms\"\n[ingest]\nmax_lateness = \"2d\"\n\
         [redis]\nurl = \"redis://127.0.0.1:6379/0\"\nstrict_when_unavailable = \"allow\"\n{PLAN}"
    ));
    assert_eq!(v.storage.durability, Durability::Buffered);
    assert_eq!(v.storage.wal_sync_interval, Duration::from_millis(20));
    assert_eq!(v.ingest.max_lateness, Duration::from_secs(2 * 86_400));
    let redis = v.redis.unwrap_or_else(|| panic!("redis settings"));
    assert_eq!(redis.strict_when_unavailable, StrictWhenUnavailable::Allow);
    assert_eq!((redis.urls.as_slice(), redis.key_prefix.as_str()), (["redis://127.0.0.1:6379/0".to_string()].as_slice(), "meterd:"));
    let default = valid(PLAN);
    assert_eq!(default.storage.durability, Durability::Fsync);
    assert!(default.redis.is_none() && default.clickhouse.is_none() && default.stripe.is_none());
}

#[test]
fn schema_and_raw_structs_agree() {
    // Every key the schema knows deserializes: a file setting all of them reads
    // without a problem (a key the structs lack would fail the read).
    let all = r#"
[server]
listen = "127.0.0.1:1"
instance_id = "a"
shutdown_grace = "1s"
header_read_timeout = "1s"
body_read_timeout = "1s"
idle_timeout = "1s"
max_connections = 5
portal_secret_env = "P"
[storage]
data_dir = "d"
durability = "none"
flush_interval = "1s"
wal_sync_interval = "10ms"
wal_segment_bytes = 4096
max_wal_bytes = 8192
[ingest]
max_body_bytes = 2048
max_batch_events = 1
max_lateness = "1d"
dedupe_window = "1h"
[redis]
url = "redis://x"
urls = ["redis://y"]
key_prefix = "k"
sync_interval = "1s"
timeout = "1s"
entitlements_ttl = "1m"
strict_when_unavailable = "allow"
[clickhouse]
url = "http://x"
database = "d"
flush_interval = "1s"
raw_events = true
[stripe]
api_key_env = "K"
api_base = "http://x"
meter_events_base = "http://y"
mode = "v1"
period = "hour"
grace = "1m"
interval = "1s"
max_requests_per_second = 1
request_timeout = "1s"
[stripe.webhooks]
secret_env = "W"
tolerance = "5m"
plans = { price_1 = "p" }
[metrics]
listen = "127.0.0.1:2"
[[meters]]
name = "m"
aggregation = "sum"
precision = 0
stripe_event_name = "m"
[[plans]]
name = "p"
default = true
features = { a = true }
limits = {}
[[auth.keys]]
name = "k"
key_env = "X"
scopes = ["read"]
rate_limit_per_second = 1
rate_limit_burst = 1
"#;
    let parsed = Config::parse(all, "all.toml");
    assert!(parsed.as_ref().is_ok_and(|c| c.problems.is_empty()), "{:?}", parsed.map(|c| c.problems));
}

#[test]
fn redis_settings_are_checked() {
    let ok = format!("[redis]\nurl = \"redis://127.0.0.1:6379/0\"\n{PLAN}");
    assert!(check(&ok, &no_overrides()).is_ok());
    let cluster = format!("[redis]\nurls = [\"redis://127.0.0.1:7000\", \"redis://127.0.0.1:7001\"]\n{PLAN}");
    assert_eq!(valid(&cluster).redis.map(|r| r.urls.len()), Some(2));
    let bad = format!(
        "[redis]\nurl = \"http://x\"\nurls = [\"redis://y\"]\nkey_prefix = \"{{x}}\"\nsync_interval = \"1ms\"\nstrict_when_unavailable = \"maybe\"\n{PLAN}"
    );
    let found = problems(&bad);
    for field in ["redis.urls", "redis.url", "redis.key_prefix", "redis.sync_interval", "redis.strict_when_unavailable"] {
        assert!(found.iter().any(|p| p.key == field), "{field} missing from {found:?}");
    }
    let reason = found.iter().find(|p| p.key == "redis.sync_interval").map(|p| p.reason.as_str());
    assert_eq!(reason, Some("must be at least 10ms"));
    assert_eq!(keys(&format!("[redis]\n{PLAN}")), ["redis"]);
}

#[test]
fn reports_every_problem_with_its_path() {
    let text = r#"
[server]
listen = "nowhere"
[[meters]]
name = "Bad Name"
aggregation = "avg"
[[meters]]
name = "ok"
precision = 12
[[plans]]
name = "a"
[plans.limits]
ok = { limit = 5, window = "week" }
ghost = { limit = 1, window = "day" }
[[auth.keys]]
name = "k"
key_sha256 = "abc"
scopes = ["ingest", "fly"]
"#;
    let keys = keys(text);
    for key in [
        "server.listen",
        "meters.\"Bad Name\".name",
        "meters.\"Bad Name\".aggregation",
        "meters.ok.precision",
        "plans.a.limits.ok.window",
        "plans.a.limits.ghost",
        "plans",
        "auth.keys.k.key_sha256",
        "auth.keys.k.scopes",
    ] {
        assert!(keys.iter().any(|k| k == key), "missing {key} in {keys:?}");
    }
}

#[test]
fn missing_required_keys_are_named() {
    let text =
        "[clickhouse]\ndatabase = \"x\"\n[[meters]]\naggregation = \"sum\"\n[[plans]]\ndefault = true\n[[auth.keys]]\nkey_env = \"X\"\n";
    let keys = keys(text);
    for key in ["clickhouse.url", "meters[0].name", "plans[0].name", "auth.keys[0].name", "auth.keys[0].scopes"] {
        assert!(keys.iter().any(|k| k == key), "missing {key} in {keys:?}");
    }
}

#[test]
fn stripe_is_validated_and_the_key_comes_from_the_environment() {
    std::env::set_var("METERD_TEST_STRIPE_KEY_OK", "sk_test_value_never_shown");
    let good = format!("[stripe]\napi_key_env = \"METERD_TEST_STRIPE_KEY_OK\"\nmode = \"v2\"\nperiod = \"minute\"\ngrace = \"0s\"\n{PLAN}");
    let v = valid(&good);
    let stripe = v.stripe.as_ref().unwrap_or_else(|| panic!("stripe settings"));
    assert_eq!(
        (stripe.mode, stripe.period, stripe.api_key.expose(), stripe.grace),
        (StripeMode::V2, StripePeriod::Minute, "sk_test_value_never_shown", Duration::ZERO)
    );
    assert_eq!(stripe.api_base, "https://api.stripe.com");
    let debug = format!("{v:?}");
    assert!(!debug.contains("sk_test_value_never_shown") && debug.contains("***"), "the key leaks through Debug");

    let bad = format!(
        "[stripe]\napi_key_env = \"METERD_TEST_STRIPE_KEY_UNSET\"\nmode = \"v3\"\nperiod = \"week\"\napi_base = \"ftp://x\"\ninterval = \"0s\"\nmax_requests_per_second = 0\n{PLAN}"
    );
    let keys = keys(&bad);
    for key in
        ["stripe.api_key_env", "stripe.mode", "stripe.period", "stripe.api_base", "stripe.interval", "stripe.max_requests_per_second"]
    {
        assert!(keys.iter().any(|k| k == key), "missing {key} in {keys:?}");
    }
    assert_eq!(self::keys(&format!("[stripe]\napi_key_env = \"NOT A NAME\"\n{PLAN}")), ["stripe.api_key_env"]);
}

#[test]
fn stripe_key_value_is_never_in_a_message() {
    std::env::set_var("METERD_TEST_STRIPE_KEY_MSG", "sk_live_do_not_print");
    let text = format!("[stripe]\napi_key_env = \"METERD_TEST_STRIPE_KEY_MSG\"\nmode = \"v9\"\n{PLAN}");
    let err = check(&text, &no_overrides()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("stripe.mode") && !err.contains("sk_live_do_not_print"), "{err}");
}

#[test]
fn raw_events_need_the_wal() {
    let ch = "[clickhouse]\nurl = \"http://127.0.0.1:8123\"\nraw_events = true\n";
    assert!(valid(&format!("{ch}{PLAN}")).clickhouse.is_some_and(|c| c.raw_events));
    assert_eq!(keys(&format!("[storage]\ndurability = \"buffered\"\n{ch}{PLAN}")), Vec::<String>::new());
    let none = format!("[storage]\ndurability = \"none\"\n{ch}{PLAN}");
    let found = problems(&none);
    assert_eq!(found.iter().map(|p| p.key.as_str()).collect::<Vec<_>>(), ["clickhouse.raw_events"]);
    assert!(found[0].reason.contains("durability"), "{found:?}");
    // Off by default.
    assert!(valid(&format!("[clickhouse]\nurl = \"http://x\"\n{PLAN}")).clickhouse.is_some_and(|c| !c.raw_events));
}

#[test]
fn a_syntax_error_is_a_parse_error_naming_the_file() {
    let err = Config::parse("[server\nlisten = 1", "broken.toml").err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.starts_with("config file broken.toml:"), "{err}");
}

// Stripe subscription sync and portal tokens (issue 20).

#[test]
fn stripe_webhooks_map_prices_to_plans_that_exist() {
    std::env::set_var("METERD_TEST_WHSEC_OK", "whsec_never_shown");
    let good = format!(
        "[stripe.webhooks]\nsecret_env = \"METERD_TEST_WHSEC_OK\"\ntolerance = \"2m\"\n[stripe.webhooks.plans]\nprice_1Pq = \"p\"\n\"pro_monthly\" = \"p\"\n{PLAN}"
    );
    let v = valid(&good);
    assert!(v.stripe.is_none(), "a [stripe] holding only webhooks reports nothing (and needs no API key)");
    let w = v.stripe_webhooks.as_ref().unwrap_or_else(|| panic!("webhook settings"));
    assert_eq!((w.secret.expose(), w.tolerance, w.plans.len()), ("whsec_never_shown", Duration::from_secs(120), 2));
    assert_eq!(w.plans.get("pro_monthly").map(String::as_str), Some("p"));
    assert!(!format!("{v:?}").contains("whsec_never_shown"), "the secret leaks through Debug");

    let bad = format!(
        "[stripe.webhooks]\nsecret_env = \"METERD_TEST_WHSEC_UNSET\"\ntolerance = \"0s\"\n[stripe.webhooks.plans]\nprice_a = \"gold\"\nprice_b = 3\n{PLAN}"
    );
    assert_eq!(
        keys(&bad),
        ["stripe.webhooks.plans.price_a", "stripe.webhooks.plans.price_b", "stripe.webhooks.secret_env", "stripe.webhooks.tolerance"]
    );
    let message = check(&bad, &no_overrides()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(message.contains("plan \"gold\" is not configured"), "{message}");
}

#[test]
fn the_portal_secret_comes_from_the_environment() {
    std::env::set_var("METERD_TEST_PORTAL_OK", "portal-key-never-shown");
    let v = valid(&format!("[server]\nportal_secret_env = \"METERD_TEST_PORTAL_OK\"\n{PLAN}"));
    assert_eq!(v.portal_secret.as_ref().map(|k| k.expose()), Some("portal-key-never-shown"));
    assert!(valid(PLAN).portal_secret.is_none());
    assert_eq!(keys(&format!("[server]\nportal_secret_env = \"METERD_TEST_PORTAL_UNSET\"\n{PLAN}")), ["server.portal_secret_env"]);
}

// --- Threshold notifications (issue 17) ---

/// A valid Standard Webhooks secret: `whsec_` + base64 of 32 bytes.
const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

#[test]
fn notifications_schema_and_raw_structs_agree() {
    let all = "[notifications]\nthresholds = [50]\nretry_for = \"1h\"\ntimeout = \"1s\"\n[[notifications.endpoints]]\nname = \"a\"\nurl = \"http://x\"\nsecret_env = \"S\"\ntypes = [\"credits.low\"]\n";
    let parsed = Config::parse(all, "all.toml");
    assert!(parsed.as_ref().is_ok_and(|c| c.problems.is_empty()), "{:?}", parsed.map(|c| c.problems));
}

#[test]
fn notifications_are_validated_and_secrets_come_from_the_environment() {
    std::env::set_var("METERD_TEST_WHSEC_OK", WHSEC);
    let good = format!(
        "[notifications]\nthresholds = [90, 75]\n[[notifications.endpoints]]\nname = \"app\"\nurl = \"https://a.example/wh\"\nsecret_env = \"METERD_TEST_WHSEC_OK\"\ntypes = [\"limit.threshold\"]\n{PLAN}"
    );
    let v = valid(&good);
    let n = v.notifications.as_ref().unwrap_or_else(|| panic!("notification settings"));
    assert_eq!(n.thresholds.as_slice(), &[75, 90]);
    assert_eq!((n.retry_for, n.timeout), (Duration::from_secs(72 * 3600), Duration::from_secs(10)));
    assert_eq!(n.endpoints.0.len(), 1);
    assert!(n.endpoints.0[0].wants("limit.threshold") && !n.endpoints.0[0].wants("credits.low"));
    assert_eq!(n.endpoints.0[0].secret.expose().len(), 24);
    assert!(!format!("{v:?}").contains("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), "the secret leaks through Debug");

    std::env::set_var("METERD_TEST_WHSEC_BAD", "not-a-secret");
    let bad = format!(
        "[notifications]\nthresholds = [0, 75]\nretry_for = \"0s\"\n[[notifications.endpoints]]\nname = \"App!\"\nurl = \"ftp://x\"\nsecret_env = \"METERD_TEST_WHSEC_BAD\"\ntypes = [\"nope\"]\n[[notifications.endpoints]]\nname = \"b\"\nurl = \"http://b\"\nsecret_env = \"METERD_TEST_WHSEC_UNSET_X\"\n{PLAN}"
    );
    let found = keys(&bad);
    for key in [
        "notifications.thresholds",
        "notifications.retry_for",
        "notifications.endpoints.\"App!\".name",
        "notifications.endpoints.\"App!\".url",
        "notifications.endpoints.\"App!\".secret_env",
        "notifications.endpoints.\"App!\".types[0]",
        "notifications.endpoints.b.secret_env",
    ] {
        assert!(found.iter().any(|k| k == key), "missing {key} in {found:?}");
    }
    let err = check(&bad, &no_overrides()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(!err.contains("not-a-secret"), "{err}");
}

#[test]
fn a_limit_may_set_its_own_thresholds() {
    let text = "[[meters]]\nname = \"m\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nm = { limit = 10, window = \"day\", notify = [50, 100] }\n";
    let v = valid(text);
    let plan = v.catalog.default_plan();
    let limit = plan.limits.values().next().map(|l| l[0]);
    assert_eq!(limit.and_then(|l| l.notify).map(|t| t.as_slice().to_vec()), Some(vec![50, 100]));
    let bad = "[[meters]]\nname = \"m\"\n[[plans]]\nname = \"p\"\ndefault = true\n[plans.limits]\nm = { limit = 10, window = \"day\", notify = [0] }\n";
    assert!(keys(bad).iter().any(|k| k.contains("notify")), "{:?}", keys(bad));
}
