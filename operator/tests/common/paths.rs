//! Where the repository's files are, for tests that read them.

/// This package's directory: where `cargo test` says it is when it runs the test (a test binary
/// reused from a build in another checkout of the same target directory keeps that checkout's
/// path in `env!`), else where it was built.
pub fn manifest_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), Into::into)
}
