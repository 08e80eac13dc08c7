//! The homeserver's settings, read through the config binding (`[vars]` of the runtime's
//! config file). Every limit has a default here and a named setting to override it.

use lattice_worker::bindings::lattice::bindings::config;

/// Who may register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Registration {
    Disabled,
    /// With a registration token (`m.login.registration_token`).
    Token,
    Open,
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub server_name: String,
    /// `https://host[:port]` clients reach, for `/.well-known/matrix/client`.
    pub public_base_url: Option<String>,
    pub registration: Registration,
    pub default_room_version: String,
    pub max_json_body_bytes: usize,
    /// Attempts per minute; 0 turns the limit off.
    pub login_per_minute: u64,
    pub register_per_minute: u64,
    pub send_per_minute: u64,
    /// Access token lifetime for clients that ask for refresh tokens.
    pub access_token_lifetime_ms: u64,
    /// Longest `/sync` long-poll (clients ask for up to this).
    pub max_sync_timeout_ms: u64,
    /// One-time keys a device may have stored per algorithm.
    pub max_one_time_keys_per_device: u64,
    /// To-device messages waiting for one device before senders get `M_LIMIT_EXCEEDED`.
    pub max_to_device_queue: u64,
}

/// JSON request bodies above this are refused with `M_TOO_LARGE` before parsing; events are
/// 64 KiB at most, so this leaves room for big `initial_state` lists.
pub const DEFAULT_MAX_JSON_BODY: usize = 1024 * 1024;
/// Login attempts per minute per user id (password guessing).
pub const DEFAULT_LOGIN_PER_MINUTE: u64 = 30;
/// Registrations per minute, server-wide.
pub const DEFAULT_REGISTER_PER_MINUTE: u64 = 60;
/// Sends per minute per user; 0 (off) by default, as most deployments want their own numbers.
pub const DEFAULT_SEND_PER_MINUTE: u64 = 0;
/// One hour, Synapse's default for refreshable access tokens.
pub const DEFAULT_ACCESS_TOKEN_LIFETIME_MS: u64 = 60 * 60 * 1000;
/// Clients keep about 50 one-time keys uploaded; this stops a runaway client.
pub const DEFAULT_MAX_ONE_TIME_KEYS_PER_DEVICE: u64 = 1_000;
/// A device that never syncs stops receiving once this many messages wait for it.
pub const DEFAULT_MAX_TO_DEVICE_QUEUE: u64 = 10_000;
/// Clients commonly ask for 30 s; a little more is allowed.
pub const DEFAULT_MAX_SYNC_TIMEOUT_MS: u64 = 60_000;

fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
    config::get(name).and_then(|v| v.trim().parse().ok()).unwrap_or(default)
}

impl Settings {
    pub fn load() -> Self {
        let registration = match config::get("registration").as_deref().map(str::trim) {
            Some("open") => Registration::Open,
            Some("token") => Registration::Token,
            _ => Registration::Disabled,
        };
        Self {
            server_name: config::get("server_name").unwrap_or_else(|| "localhost".into()),
            public_base_url: config::get("public_base_url"),
            registration,
            default_room_version: config::get("default_room_version").unwrap_or_else(|| "12".into()),
            max_json_body_bytes: var("max_json_body_bytes", DEFAULT_MAX_JSON_BODY),
            login_per_minute: var("login_per_minute", DEFAULT_LOGIN_PER_MINUTE),
            register_per_minute: var("register_per_minute", DEFAULT_REGISTER_PER_MINUTE),
            send_per_minute: var("send_per_minute", DEFAULT_SEND_PER_MINUTE),
            access_token_lifetime_ms: var("access_token_lifetime_ms", DEFAULT_ACCESS_TOKEN_LIFETIME_MS),
            max_sync_timeout_ms: var("max_sync_timeout_ms", DEFAULT_MAX_SYNC_TIMEOUT_MS),
            max_one_time_keys_per_device: var(
                "max_one_time_keys_per_device",
                DEFAULT_MAX_ONE_TIME_KEYS_PER_DEVICE,
            ),
            max_to_device_queue: var("max_to_device_queue", DEFAULT_MAX_TO_DEVICE_QUEUE),
        }
    }
}
