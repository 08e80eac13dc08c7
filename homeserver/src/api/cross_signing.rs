//! Cross-signing: `/keys/device_signing/upload` and `/keys/signatures/upload`, and the
//! cross-signing keys `/keys/query` returns.
//!
//! Keys are D1 rows per `(user, kind)`, moved on the stream so device-list changes carry them.
//! Every signature the server accepts is verified: the self- and user-signing keys against the
//! master key; a signature upload against the uploader's own key that made it (their
//! self-signing key for their devices, a device key of theirs for their master key, their
//! user-signing key for someone else's master key). Accepted signatures are merged into the
//! stored object. Replacing existing cross-signing keys needs the password; the first upload
//! does not (spec v1.11).

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use super::account::{AuthData, require_password};
use super::{Ctx, Reply, ok};
use crate::db::{self, bound, sql};
use crate::error::{Error, Result};

const KINDS: [(&str, &str); 3] =
    [("master_key", "master"), ("self_signing_key", "self_signing"), ("user_signing_key", "user_signing")];

fn b64_decode(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// Whether `object` carries a valid ed25519 signature by `signer` under `key_id`
/// (`ed25519:<id>`) with the base64 public key `public_key`.
pub fn verify(object: &Value, signer: &str, key_id: &str, public_key: &str) -> bool {
    let Some(signature) = object["signatures"][signer][key_id].as_str().and_then(b64_decode) else {
        return false;
    };
    let Some(key) = b64_decode(public_key) else { return false };
    let mut unsigned = object.clone();
    if let Some(o) = unsigned.as_object_mut() {
        o.remove("signatures");
        o.remove("unsigned");
    }
    let Ok(canonical) = ruma::CanonicalJsonValue::try_from(unsigned) else { return false };
    ruma::signatures::verify_canonical_json_bytes(
        &ruma::SigningKeyAlgorithm::Ed25519,
        &key,
        &signature,
        canonical.to_string().as_bytes(),
    )
    .is_ok()
}

/// The single ed25519 public key of a cross-signing key object.
fn public_key(key: &Value) -> Option<String> {
    let keys = key["keys"].as_object()?;
    if keys.len() != 1 {
        return None;
    }
    keys.iter().next().and_then(|(id, v)| id.strip_prefix("ed25519:").and(v.as_str()).map(str::to_owned))
}

/// The object without its signatures, for comparing an upload with what is stored.
fn unsigned(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("signatures");
        o.remove("unsigned");
    }
    v
}

/// A user's cross-signing keys by kind (`master`, `self_signing`, `user_signing`).
pub fn keys_of(ctx: &Ctx, user: &str) -> Result<BTreeMap<String, Value>> {
    Ok(ctx
        .db()?
        .query(sql::CROSS_SIGNING_OF_USER, vec![db::t(user)])?
        .iter()
        .filter_map(|r| serde_json::from_str(&r.str("json")).ok().map(|v| (r.str("kind"), v)))
        .collect())
}

/// A key someone signs: the stored object, the device it belongs to (none for a master key),
/// and the signer's key (`ed25519:<id>`, base64 public key) the signature must verify with.
type Target = (Value, Option<String>, Option<(String, String)>);

#[derive(Deserialize)]
struct UploadBody {
    master_key: Option<Value>,
    self_signing_key: Option<Value>,
    user_signing_key: Option<Value>,
    auth: Option<AuthData>,
}

/// # `POST /_matrix/client/v3/keys/device_signing/upload`
pub fn device_signing_upload_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let body: UploadBody = ctx.json()?;
    let existing = keys_of(ctx, &s.user_id)?;
    let uploads = [&body.master_key, &body.self_signing_key, &body.user_signing_key];
    let changes = KINDS.iter().zip(uploads).any(|((_, kind), new)| {
        new.as_ref().is_some_and(|n| existing.get(*kind).is_none_or(|e| unsigned(e) != unsigned(n)))
    });
    if !changes {
        return ok(json!({}));
    }
    let master = body.master_key.as_ref().or(existing.get("master")).ok_or_else(|| {
        Error::InvalidParam("a master key is needed before self- or user-signing keys".into())
    })?;
    let master_pk = public_key(master)
        .ok_or_else(|| Error::InvalidParam("the master key needs exactly one ed25519 key".into()))?;
    let mut batch = Vec::new();
    for ((field, kind), new) in KINDS.iter().zip(uploads) {
        let Some(key) = new else { continue };
        if key["user_id"].as_str() != Some(s.user_id.as_str()) {
            return Err(Error::InvalidParam(format!("{field} is not this user's")));
        }
        if !key["usage"].as_array().is_some_and(|u| u.iter().any(|x| x == kind)) {
            return Err(Error::InvalidParam(format!("{field} must have usage {kind}")));
        }
        if public_key(key).is_none() {
            return Err(Error::InvalidParam(format!("{field} needs exactly one ed25519 key")));
        }
        if *kind != "master" && !verify(key, &s.user_id, &format!("ed25519:{master_pk}"), &master_pk) {
            return Err(Error::InvalidParam(format!("{field} is not signed by the master key")));
        }
        batch.push(bound(sql::STREAM_BUMP, vec![]));
        batch.push(bound(
            sql::CROSS_SIGNING_UPSERT,
            vec![db::t(s.user_id.clone()), db::t(*kind), db::t(key.to_string())],
        ));
    }
    // Checked after the keys, so a malformed upload gets its error without a password prompt.
    if existing.contains_key("master") {
        require_password(ctx, &s, body.auth)?;
    }
    ctx.db()?.batch(&batch)?;
    super::keys::wake_watchers(ctx, &s.user_id)?;
    ok(json!({}))
}

/// # `POST /_matrix/client/v3/keys/signatures/upload`
pub fn signatures_upload_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let body: BTreeMap<String, BTreeMap<String, Value>> = ctx.json()?;
    let db = ctx.db()?;
    let mine = keys_of(ctx, &s.user_id)?;
    let my_pk = |kind: &str| mine.get(kind).and_then(public_key);
    let mut failures = serde_json::Map::new();
    let mut changed_users = Vec::new();
    for (user, objects) in &body {
        let theirs = keys_of(ctx, user)?;
        for (key_id, object) in objects {
            let fail = |code: &str, msg: &str| json!({"errcode": code, "error": msg});
            // What is signed, where it is stored, and which of the uploader's keys must sign it.
            let target: Option<Target> =
                if theirs.get("master").and_then(public_key).as_deref() == Some(key_id.as_str()) {
                    let signer = if *user == s.user_id {
                        // One's own master key, signed by one's device.
                        let device = object["signatures"][&s.user_id].as_object().and_then(|m| {
                            m.keys().find_map(|k| {
                                k.strip_prefix("ed25519:").filter(|d| *d != key_id).map(str::to_owned)
                            })
                        });
                        device.and_then(|d| {
                            db.first(sql::DEVICE_KEYS_GET, vec![db::t(s.user_id.clone()), db::t(d.clone())])
                                .ok()
                                .flatten()
                                .and_then(|r| serde_json::from_str::<Value>(&r.str("json")).ok())
                                .and_then(|dk| dk["keys"][format!("ed25519:{d}")].as_str().map(str::to_owned))
                                .map(|pk| (format!("ed25519:{d}"), pk))
                        })
                    } else {
                        my_pk("user_signing").map(|pk| (format!("ed25519:{pk}"), pk))
                    };
                    theirs.get("master").map(|m| (m.clone(), None, signer))
                } else if *user == s.user_id {
                    // One's own device, signed by one's self-signing key.
                    db.first(sql::DEVICE_KEYS_GET, vec![db::t(s.user_id.clone()), db::t(key_id.clone())])?
                        .and_then(|r| serde_json::from_str::<Value>(&r.str("json")).ok())
                        .map(|dk| {
                            (
                                dk,
                                Some(key_id.clone()),
                                my_pk("self_signing").map(|pk| (format!("ed25519:{pk}"), pk)),
                            )
                        })
                } else {
                    None
                };
            let Some((stored, device, signer)) = target else {
                failures.entry(user.clone()).or_insert_with(|| json!({}))[key_id] =
                    fail("M_NOT_FOUND", "no such key, or not one you may sign");
                continue;
            };
            let Some((signer_id, signer_pk)) = signer else {
                failures.entry(user.clone()).or_insert_with(|| json!({}))[key_id] =
                    fail("M_MISSING_SIGNATURE", "you have no key that may sign this");
                continue;
            };
            if unsigned(&stored) != unsigned(object) || !verify(object, &s.user_id, &signer_id, &signer_pk) {
                failures.entry(user.clone()).or_insert_with(|| json!({}))[key_id] =
                    fail("M_INVALID_SIGNATURE", "the signature does not verify against the stored key");
                continue;
            }
            let mut merged = stored.clone();
            merged["signatures"][&s.user_id][&signer_id] =
                object["signatures"][&s.user_id][&signer_id].clone();
            let statement = match &device {
                Some(d) => bound(
                    sql::DEVICE_KEYS_UPSERT,
                    vec![db::t(user.clone()), db::t(d.clone()), db::t(merged.to_string())],
                ),
                None => bound(
                    sql::CROSS_SIGNING_UPSERT,
                    vec![db::t(user.clone()), db::t("master"), db::t(merged.to_string())],
                ),
            };
            db.batch(&[bound(sql::STREAM_BUMP, vec![]), statement])?;
            if !changed_users.contains(user) {
                changed_users.push(user.clone());
            }
        }
    }
    for user in changed_users {
        super::keys::wake_watchers(ctx, &user)?;
    }
    ok(json!({"failures": failures}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keypair() -> (ruma::signatures::Ed25519KeyPair, String) {
        let doc = ruma::signatures::Ed25519KeyPair::generate();
        let pair = ruma::signatures::Ed25519KeyPair::from_der(&doc, "X".into()).expect("key pair");
        let pk = base64::engine::general_purpose::STANDARD_NO_PAD.encode(pair.public_key());
        (pair, pk)
    }

    fn signed(mut v: Value, signer: &str, pair: &ruma::signatures::Ed25519KeyPair) -> Value {
        let mut object: ruma::CanonicalJsonObject =
            serde_json::from_value(v.clone()).expect("a canonical JSON object");
        ruma::signatures::sign_json(signer, pair, &mut object).expect("sign");
        v["signatures"] = serde_json::to_value(&object["signatures"]).expect("signatures");
        v
    }

    #[test]
    fn signatures_verify_only_with_the_right_key_and_content() {
        let (pair, pk) = keypair();
        let (_, other_pk) = keypair();
        let key = json!({"user_id": "@a:x", "usage": ["self_signing"], "keys": {"ed25519:abc": "abc"}});
        let s = signed(key, "@a:x", &pair);
        assert!(verify(&s, "@a:x", "ed25519:X", &pk));
        assert!(!verify(&s, "@a:x", "ed25519:X", &other_pk), "another key");
        assert!(!verify(&s, "@b:x", "ed25519:X", &pk), "another signer");
        let mut tampered = s.clone();
        tampered["usage"] = json!(["user_signing"]);
        assert!(!verify(&tampered, "@a:x", "ed25519:X", &pk), "changed content");
        let mut with_unsigned = s;
        with_unsigned["unsigned"] = json!({"device_display_name": "x"});
        assert!(verify(&with_unsigned, "@a:x", "ed25519:X", &pk), "unsigned is not signed");
    }

    #[test]
    fn one_ed25519_key() {
        assert_eq!(public_key(&json!({"keys": {"ed25519:abc": "abc"}})).as_deref(), Some("abc"));
        assert_eq!(public_key(&json!({"keys": {"ed25519:a": "a", "ed25519:b": "b"}})), None);
        assert_eq!(public_key(&json!({"keys": {"curve25519:a": "a"}})), None);
    }
}
