//! The conformance flows against the production backends: D1 and Durable Object storage on
//! PostgreSQL, KV on Redis, R2 on an S3 server, all started by `scripts/services.sh`.
//!
//! Without the `LATTICE_TEST_*` variables these tests have nothing to run against: they fail
//! when `LATTICE_REQUIRE_SERVICES=1` (as in `cargo xtask ci`) and are skipped otherwise.

#[path = "common/flows.rs"]
mod flows;
#[path = "common/production.rs"]
mod production;
#[path = "common/support.rs"]
mod support;

use production::production_setup;
use support::start;

macro_rules! flow_test {
    ($name:ident, $flow:ident, $extra:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some(setup) = production_setup($extra) else { return };
            flows::$flow(&start(setup)).await;
        }
    };
}

flow_test!(d1_on_postgres, d1, "");
flow_test!(kv_on_redis, kv, "");
flow_test!(r2_on_s3, r2, "");
flow_test!(durable_objects_on_postgres, objects, "");
flow_test!(alarms_on_postgres, alarms, "[limits]\nalarm_poll_ms = 50\n");
