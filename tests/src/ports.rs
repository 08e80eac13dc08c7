//! Loopback ports for the processes the tests start. One file for every test crate (the
//! end-to-end tests, the runtime's and the operator's include it by path).

/// A free loopback port for a child process to listen on. Not port 0's pick: that comes from
/// the kernel's ephemeral range, where an outgoing connection (to PostgreSQL, Redis, ...) can
/// take it before the child binds it ("Address already in use"). From 10000-19999 instead,
/// below both the ephemeral range and the services' ports (`scripts/lib.sh`, 20000 and up).
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher as _, Hasher as _};
    for _ in 0..10_000 {
        // A fresh `RandomState` has fresh keys: a random number without a dependency.
        let r = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let port = 10_000 + u16::try_from(r % 10_000).unwrap_or(0);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 10000-19999")
}
