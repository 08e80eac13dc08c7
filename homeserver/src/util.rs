//! Small helpers: encodings, hashing, randomness and the clock.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// Unpadded standard base64, as Matrix uses for keys and hashes.
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
}

pub fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// FNV-1a: a hash that stays the same across builds (it names storage keys and tags stored
/// rows).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// Hex of the SHA-256 of a token: how tokens are stored at rest.
pub fn token_hash(token: &str) -> String {
    sha256(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The host's random source (wasi:random) does not fail; a zeroed buffer would be caught by
    // the uniqueness constraints on tokens.
    let _ = getrandom::fill(&mut b);
    b
}

/// A random string of `len` characters from `A-Za-z`.
pub fn random_alpha(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let bytes = random_bytes::<64>();
    bytes.iter().take(len).map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char).collect()
}

/// A secret token: 32 random bytes, URL-safe base64.
pub fn random_token() -> String {
    b64url(&random_bytes::<32>())
}

/// Milliseconds since the Unix epoch (wasi:clocks; the runtime may pin it in tests).
pub fn now_ms() -> u64 {
    let d = wasip2::clocks::wall_clock::now();
    d.seconds * 1000 + u64::from(d.nanoseconds / 1_000_000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a_never_changes() {
        // It names storage keys (the room object's transaction buckets) and tags stored rows,
        // so it must stay FNV-1a (its published test vectors) across builds and releases.
        assert_eq!(super::fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(super::fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }
}
