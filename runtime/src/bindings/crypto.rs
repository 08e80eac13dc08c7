//! `lattice:bindings/crypto`: Ed25519 signatures by keys from the secret store, computed by the
//! host. The key pair of a secret is derived once and kept while the secret's bytes stay the
//! same; a rotated secret (a new file) gives a new pair at its next use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair as _};

use super::GuestError;
use super::generated::lattice::bindings::crypto::Host;
use crate::runtime::Secrets;
use crate::state::{Gate, WorkerState};

/// The longest message `ed25519-sign` takes.
pub const MAX_SIGNED_MESSAGE_BYTES: usize = 1024 * 1024;
/// Seed bytes at the start of a signing secret.
const SEED_BYTES: usize = 32;

/// A key pair and the seed it was derived from.
type Derived = (Vec<u8>, Arc<Ed25519KeyPair>);

/// Key pairs derived from secrets, by secret name.
#[derive(Default)]
pub struct SigningKeys {
    pairs: Mutex<HashMap<String, Derived>>,
}

impl SigningKeys {
    /// The key pair of secret `name` as it is now.
    fn get(&self, secrets: &Secrets, name: &str) -> Result<Arc<Ed25519KeyPair>, GuestError> {
        let secret = secrets.get(name).map_err(|e| {
            tracing::error!(error = %e, "secret store failed");
            GuestError::Unavailable(super::Unavailable {
                retry_after_secs: super::UNAVAILABLE_RETRY_AFTER_SECS,
            })
        })?;
        let seed = secret.as_deref().and_then(|s| s.get(..SEED_BYTES)).ok_or_else(|| {
            GuestError::Invalid(format!("no secret {name:?} of at least {SEED_BYTES} bytes"))
        })?;
        let mut pairs = self.pairs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((kept, pair)) = pairs.get(name)
            && kept.as_slice() == seed
        {
            return Ok(pair.clone());
        }
        let pair = Arc::new(
            Ed25519KeyPair::from_seed_unchecked(seed)
                .map_err(|e| GuestError::Invalid(format!("secret {name:?} is not an Ed25519 seed: {e}")))?,
        );
        pairs.insert(name.to_owned(), (seed.to_vec(), pair.clone()));
        Ok(pair)
    }
}

impl Host for WorkerState {
    async fn ed25519_public_key(&mut self, key: String) -> wasmtime::Result<Result<Vec<u8>, GuestError>> {
        let shared = self.shared.clone();
        // Like a secret read: part of the environment, no I/O a Durable Object's gates see.
        self.waiting(Gate::Closed, async move {
            shared.signing_keys.get(&shared.secrets, &key).map(|p| p.public_key().as_ref().to_vec())
        })
        .await
    }

    async fn ed25519_sign(
        &mut self,
        key: String,
        message: Vec<u8>,
    ) -> wasmtime::Result<Result<Vec<u8>, GuestError>> {
        if message.len() > MAX_SIGNED_MESSAGE_BYTES {
            return Ok(Err(GuestError::TooLarge(format!(
                "a signed message is at most {MAX_SIGNED_MESSAGE_BYTES} bytes"
            ))));
        }
        let shared = self.shared.clone();
        self.waiting(Gate::Closed, async move {
            shared.signing_keys.get(&shared.secrets, &key).map(|p| p.sign(&message).as_ref().to_vec())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_verifiably_and_follows_a_rotated_secret() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = Secrets::in_dir(dir.path());
        let keys = SigningKeys::default();
        assert!(matches!(keys.get(&secrets, "signing_key"), Err(GuestError::Invalid(_))));
        std::fs::write(dir.path().join("signing_key"), [7u8; 16]).expect("write");
        assert!(matches!(keys.get(&secrets, "signing_key"), Err(GuestError::Invalid(_))), "too short");
        std::fs::write(dir.path().join("signing_key"), [7u8; 32]).expect("write");
        let first = keys.get(&secrets, "signing_key").expect("key");
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ED25519,
            first.public_key().as_ref().to_vec(),
        );
        let signature = first.sign(b"message");
        public.verify(b"message", signature.as_ref()).expect("verifies");
        assert!(public.verify(b"other", signature.as_ref()).is_err());
        assert!(Arc::ptr_eq(&first, &keys.get(&secrets, "signing_key").expect("key")), "kept");
        std::fs::write(dir.path().join("signing_key"), [8u8; 32]).expect("write");
        let rotated = keys.get(&secrets, "signing_key").expect("key");
        assert_ne!(rotated.public_key().as_ref(), first.public_key().as_ref(), "a rotated secret signs anew");
    }

    #[test]
    fn rfc_8032_test_vector() {
        // RFC 8032 section 7.1, TEST 1: the guest's keys (ed25519-dalek) derive the same.
        let hex = |s: &str| hex::decode(s).expect("hex");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("k"),
            hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"),
        )
        .expect("write");
        let secrets = Secrets::in_dir(dir.path());
        let pair = SigningKeys::default().get(&secrets, "k").expect("key");
        assert_eq!(
            pair.public_key().as_ref(),
            hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a").as_slice()
        );
        assert_eq!(
            pair.sign(b"").as_ref(),
            hex("e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b").as_slice()
        );
    }
}
