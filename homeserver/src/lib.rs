//! Lattice's Matrix homeserver: a `wasm32-wasip2` component doing all its I/O through the
//! `lattice:bindings` imports (D1, KV, Durable Objects, signals, config).
//!
//! # Layout
//! - [`api`]: the HTTP entry point, routing, request context, and handlers per area
//!   (`api/account.rs`, `api/rooms.rs`, `api/sync.rs`, `api/discovery.rs`, `api/admin.rs`).
//! - [`room`]: the room model. `room/pdu.rs` (building, hashing, signing, redacting events) and
//!   `room/auth.rs` (auth rules and state resolution) are pure; `room/object.rs` is the `Room`
//!   Durable Object, the single writer of each room's event graph.
//! - [`db`]: D1 access; `db/sql.rs` holds every SQL statement and the schema migrations.
//! - [`push`]: push rules evaluated for unread counts.
//! - [`config`]: settings from the config binding. [`error`]: Matrix error bodies.

pub mod api;
pub mod config;
pub mod db;
pub mod error;
pub mod keys;
pub mod object;
pub mod push;
pub mod room;
pub mod util;

/// The component's exports. Only for wasm: a native build (unit tests) has no host to call it,
/// and the export symbols are not valid native linker names.
#[cfg(target_arch = "wasm32")]
mod component {
    use lattice_worker::bindings::exports::lattice::bindings::object_handler::Guest as ObjectGuest;
    use lattice_worker::bindings::lattice::bindings::durable_object;
    use wasip2::http::types::{IncomingRequest, ResponseOutparam};

    use crate::{api, room};

    struct Homeserver;

    wasip2::http::proxy::export!(Homeserver);
    lattice_worker::bindings::export!(Homeserver);

    impl wasip2::exports::http::incoming_handler::Guest for Homeserver {
        fn handle(request: IncomingRequest, out: ResponseOutparam) {
            api::serve(request, out);
        }
    }

    impl ObjectGuest for Homeserver {
        fn fetch(class: String, _id: String, request: durable_object::Request) -> durable_object::Response {
            match class.as_str() {
                room::object::CLASS => room::object::handle(&request),
                crate::keys::CLASS => crate::keys::handle(&request),
                other => durable_object::Response {
                    status: 404,
                    headers: vec![],
                    body: format!("no Durable Object class {other}").into_bytes(),
                },
            }
        }

        fn alarm(class: String, _id: String, _retry_count: u32) -> Result<(), String> {
            match class.as_str() {
                room::object::CLASS => room::object::alarm(),
                crate::keys::CLASS => crate::keys::alarm(),
                _ => Ok(()),
            }
        }
    }
}
