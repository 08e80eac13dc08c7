//! Bindings on the production backends (PostgreSQL, Redis, S3) started by scripts/services.sh.
#![allow(dead_code, reason = "each test binary uses a different part of this module")]

use std::process::Command;

use crate::support::{Setup, guest};

/// The production bindings, or `None` (skip) when the services are not configured.
pub fn production_setup(extra: &str) -> Option<Setup> {
    let vars = [
        "LATTICE_TEST_POSTGRES_URL",
        "LATTICE_TEST_REDIS_URL",
        "LATTICE_TEST_S3_ENDPOINT",
        "LATTICE_TEST_S3_REGION",
        "LATTICE_TEST_S3_BUCKET",
        "LATTICE_TEST_S3_ACCESS_KEY",
        "LATTICE_TEST_S3_SECRET_KEY",
    ];
    let missing: Vec<&str> = vars.iter().copied().filter(|v| std::env::var(v).is_err()).collect();
    if !missing.is_empty() {
        assert!(
            std::env::var("LATTICE_REQUIRE_SERVICES").as_deref() != Ok("1"),
            "LATTICE_REQUIRE_SERVICES=1 but {missing:?} are not set: start them with scripts/services.sh"
        );
        eprintln!("skipped: {missing:?} not set (run `cargo xtask ci`)");
        return None;
    }
    let var = |v: &str| std::env::var(v).unwrap_or_default();
    let mut s = Setup::new(guest("conformance"));
    s.bindings = Some(format!(
        r#"
[d1.DB]
backend = "postgres"
url_env = "LATTICE_TEST_POSTGRES_URL"

[kv.KV]
backend = "redis"
url_env = "LATTICE_TEST_REDIS_URL"

[r2.BUCKET]
backend = "s3"
endpoint = "{endpoint}"
region = "{region}"
bucket = "{bucket}"
access_key_env = "LATTICE_TEST_S3_ACCESS_KEY"
secret_key_env = "LATTICE_TEST_S3_SECRET_KEY"

[durable_objects.COUNTERS]
class = "Counter"
unique_key_secret = "counters_key"
shards = 8
storage = {{ backend = "postgres", url_env = "LATTICE_TEST_POSTGRES_URL" }}
"#,
        endpoint = var("LATTICE_TEST_S3_ENDPOINT"),
        region = var("LATTICE_TEST_S3_REGION"),
        bucket = var("LATTICE_TEST_S3_BUCKET"),
    ));
    s.extra = extra.to_owned();
    Some(s)
}

/// Stops or starts one service through scripts/services.sh (`stop-one` / `start-one`).
pub fn service(action: &str, name: &str) {
    let script =
        std::env::var("LATTICE_SERVICES_SCRIPT").expect("LATTICE_SERVICES_SCRIPT (set by cargo xtask ci)");
    let state =
        std::env::var("LATTICE_SERVICES_STATE").expect("LATTICE_SERVICES_STATE (set by cargo xtask ci)");
    let status =
        Command::new("bash").arg(script).arg(action).arg(name).arg(state).status().expect("services.sh runs");
    assert!(status.success(), "services.sh {action} {name} failed");
}
