//! The keys Secret (`<name>-keys`): generated once, kept, never rotated.
//!
//! It holds what cannot be regenerated without loss: the server's ed25519 signing key seed
//! (other servers pin it), the OAuth signing key, the Durable Object namespace's unique key
//! (object ids derive from it: losing it orphans every object's data), the secret the pods
//! authenticate to each other with, and the admin API token. The runtime reads each as a file
//! of the mounted Secret (`[secrets] dir`). The Secret has no owner reference, so deleting the
//! MatrixHomeserver leaves it (and the data it unlocks) in place; a MatrixHomeserver of the same
//! name picks it up again.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::ByteString;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};

/// The server's ed25519 signing key: a 32-byte seed (homeserver `SIGNING_KEY_SECRET`).
pub const SIGNING_KEY: &str = "signing_key";
/// Signs OAuth tokens (32 bytes).
pub const OAUTH_SIGNING_KEY: &str = "oauth_signing_key";
/// The ROOMS Durable Object namespace's unique key (32 bytes).
pub const ROOMS_KEY: &str = "rooms_key";
/// The USERS Durable Object namespace's unique key (32 bytes).
pub const USERS_KEY: &str = "users_key";
/// What the pods authenticate to each other with (32 bytes).
pub const PEER_SECRET: &str = "peer_secret";
/// The homeserver's admin API token (32 bytes; the bearer is their unpadded base64url, as
/// `lattice call --bearer-secret admin_token` sends it).
pub const ADMIN_TOKEN: &str = "admin_token";

/// Every key, in the order they are listed.
pub const KEYS: [&str; 6] = [SIGNING_KEY, OAUTH_SIGNING_KEY, ROOMS_KEY, USERS_KEY, PEER_SECRET, ADMIN_TOKEN];

/// Random bytes per key.
const KEY_BYTES: usize = 32;

/// Fresh values for the keys missing from `existing`; the keys present are never touched.
pub fn missing_keys(existing: &BTreeMap<String, ByteString>) -> BTreeMap<String, ByteString> {
    KEYS.iter()
        .filter(|k| existing.get(**k).is_none_or(|v| v.0.is_empty()))
        .map(|k| ((*k).to_owned(), ByteString(generate())))
        .collect()
}

/// 32 random bytes, as the runtime's own `[secrets] generate` makes them.
fn generate() -> Vec<u8> {
    let mut bytes = [0u8; KEY_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    bytes.to_vec()
}

/// The key id (`ed25519:<version>`) the homeserver derives from a signing key seed
/// (homeserver `SigningKey::from_seed`: the first six alphanumeric characters of the unpadded
/// base64 of SHA-256 over `"lattice signing key id\0" ‖ seed`).
pub fn signing_key_id(seed: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"lattice signing key id\0");
    hasher.update(seed);
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD.encode(hasher.finalize());
    let version: String = b64.chars().filter(char::is_ascii_alphanumeric).take(6).collect();
    format!("ed25519:{version}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_only_what_is_missing() {
        let mut existing = BTreeMap::new();
        existing.insert(ROOMS_KEY.to_owned(), ByteString(vec![7; 32]));
        let fresh = missing_keys(&existing);
        assert!(!fresh.contains_key(ROOMS_KEY), "an existing key is never replaced");
        assert_eq!(fresh.len(), KEYS.len() - 1);
        assert_eq!(fresh[SIGNING_KEY].0.len(), 32);
        assert!(fresh.values().all(|v| v.0.len() == 32));
        existing.extend(fresh);
        assert!(missing_keys(&existing).is_empty());
    }

    #[test]
    fn signing_key_id_matches_the_homeserver_derivation() {
        // Computed independently (Python: sha256, base64, first six alphanumerics).
        assert_eq!(signing_key_id(&[0u8; 32]), "ed25519:BolFiZ");
        assert_ne!(signing_key_id(&[0u8; 32]), signing_key_id(&[1u8; 32]));
    }
}
