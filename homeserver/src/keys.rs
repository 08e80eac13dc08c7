//! The `User` Durable Object: the single writer of one user's one-time and fallback keys.
//!
//! Claims of one user's keys all go through this object, whose storage calls run under the
//! input gate, so of concurrent claims each one-time key goes to exactly one; the output gate
//! holds the answer until the key's deletion is durable. Storage:
//! - `o\0<device>\0<algorithm>\0<key id>`: an unclaimed one-time key (JSON);
//! - `n\0<device>`: the device's counts per algorithm;
//! - `f\0<device>\0<algorithm>`: the device's fallback key and whether it was handed out.
//!
//! After each change the object writes the device's counts to D1 (`e2e_key_counts`), where
//! `/sync` reads them without calling the object.

use std::collections::BTreeMap;

use lattice_worker::bindings::lattice::bindings::{durable_object, storage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::db::{self, Db, sql};
use crate::object::{Failure, fail, get_json, storage_fail};

pub const BINDING: &str = "USERS";
pub const CLASS: &str = "User";

/// What the front asks of a user's object.
#[derive(Debug, Serialize, Deserialize)]
pub enum UserRequest {
    /// Stores one-time keys (`<algorithm>:<key id>` → key) and fallback keys of a device.
    Upload {
        device: String,
        one_time_keys: serde_json::Map<String, Value>,
        fallback_keys: serde_json::Map<String, Value>,
    },
    /// Takes one key per `(device, algorithm)`: a one-time key, else the fallback key.
    Claim { claims: Vec<(String, String)> },
    /// Forgets a deleted device's keys.
    DropDevice { device: String },
}

/// The answer to `Upload` (the device's counts) and to `Claim` (one entry per claim).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct UserReply {
    pub one_time_key_counts: BTreeMap<String, u64>,
    pub claimed: Vec<Option<(String, Value)>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Fallback {
    key_id: String,
    key: Value,
    used: bool,
}

fn otk_prefix(device: &str, algorithm: &str) -> String {
    format!("o\0{device}\0{algorithm}\0")
}

/// Splits `<algorithm>:<key id>`.
fn split_key(k: &str) -> Result<(&str, &str), Failure> {
    k.split_once(':')
        .filter(|(a, id)| !a.is_empty() && !id.is_empty() && !a.contains('\0') && !id.contains('\0'))
        .ok_or_else(|| fail(400, "M_INVALID_PARAM", format!("key name {k:?} is not <algorithm>:<key id>")))
}

/// Up to `limit` entries whose keys start with `prefix`, in key order.
fn list_prefix(prefix: &str, limit: u32) -> Result<Vec<(String, Vec<u8>)>, Failure> {
    storage::list(&storage::ListOptions {
        start: None,
        start_after: None,
        end: None,
        prefix: Some(prefix.to_owned()),
        reverse: false,
        limit: Some(limit),
    })
    .map_err(storage_fail)
}

fn counts(device: &str) -> Result<BTreeMap<String, u64>, Failure> {
    Ok(get_json(&format!("n\0{device}"))?.unwrap_or_default())
}

/// The fallback algorithms whose key has not been handed out.
fn unused_fallbacks(device: &str) -> Result<Vec<String>, Failure> {
    let prefix = format!("f\0{device}\0");
    let page = list_prefix(&prefix, 64)?;
    let mut out = Vec::new();
    for (k, v) in page {
        let f: Fallback = serde_json::from_slice(&v).map_err(|e| fail(500, "M_UNKNOWN", e.to_string()))?;
        if !f.used {
            out.push(k[prefix.len()..].to_owned());
        }
    }
    Ok(out)
}

/// Writes the device's counts to D1 for `/sync`.
fn publish_counts(user: &str, device: &str, counts: &BTreeMap<String, u64>) -> Result<(), Failure> {
    let fallbacks = unused_fallbacks(device)?;
    let db = Db::open().map_err(|e| fail(503, "M_UNKNOWN", e.to_string()))?;
    db.execute(
        sql::E2E_COUNTS_UPSERT,
        vec![
            db::t(user),
            db::t(device),
            db::t(json!(counts).to_string()),
            db::t(json!(fallbacks).to_string()),
        ],
    )
    .map_err(|e| match e {
        db::DbError::Unavailable { .. } | db::DbError::Migrating => {
            fail(503, "M_UNKNOWN", "the database is unavailable")
        }
        other => fail(500, "M_UNKNOWN", other.to_string()),
    })?;
    Ok(())
}

fn upload(
    user: &str,
    device: &str,
    one_time_keys: &serde_json::Map<String, Value>,
    fallback_keys: &serde_json::Map<String, Value>,
) -> Result<UserReply, Failure> {
    let cap = crate::config::Settings::load().max_one_time_keys_per_device;
    let mut n = counts(device)?;
    let mut writes: Vec<(String, Vec<u8>)> = Vec::new();
    for (name, key) in one_time_keys {
        let (algorithm, id) = split_key(name)?;
        let storage_key = format!("{}{id}", otk_prefix(device, algorithm));
        match get_json::<Value>(&storage_key)? {
            Some(existing) if &existing == key => continue,
            Some(_) => {
                return Err(fail(
                    400,
                    "M_INVALID_PARAM",
                    format!("one-time key {name} already exists with other content"),
                ));
            }
            None => {}
        }
        let c = n.entry(algorithm.to_owned()).or_default();
        *c += 1;
        if *c > cap {
            return Err(fail(
                400,
                "M_INVALID_PARAM",
                format!(
                    "a device may store at most {cap} one-time keys per algorithm (max_one_time_keys_per_device)"
                ),
            ));
        }
        writes.push((storage_key, key.to_string().into_bytes()));
    }
    for (name, key) in fallback_keys {
        let (algorithm, id) = split_key(name)?;
        let storage_key = format!("f\0{device}\0{algorithm}");
        if let Some(existing) = get_json::<Fallback>(&storage_key)?
            && existing.key_id == id
            && &existing.key == key
        {
            continue;
        }
        let f = Fallback { key_id: id.to_owned(), key: key.clone(), used: false };
        writes.push((storage_key, json!(f).to_string().into_bytes()));
    }
    if !writes.is_empty() {
        writes.push((format!("n\0{device}"), json!(n).to_string().into_bytes()));
        storage::put(&writes).map_err(storage_fail)?;
    }
    publish_counts(user, device, &n)?;
    Ok(UserReply { one_time_key_counts: n, claimed: Vec::new() })
}

fn claim_one(device: &str, algorithm: &str) -> Result<Option<(String, Value)>, Failure> {
    let prefix = otk_prefix(device, algorithm);
    let first = list_prefix(&prefix, 1)?.into_iter().next();
    if let Some((k, v)) = first {
        let key: Value = serde_json::from_slice(&v).map_err(|e| fail(500, "M_UNKNOWN", e.to_string()))?;
        let mut n = counts(device)?;
        if let Some(c) = n.get_mut(algorithm) {
            *c = c.saturating_sub(1);
        }
        storage::delete(std::slice::from_ref(&k)).map_err(storage_fail)?;
        storage::put(&[(format!("n\0{device}"), json!(n).to_string().into_bytes())]).map_err(storage_fail)?;
        return Ok(Some((format!("{algorithm}:{}", &k[prefix.len()..]), key)));
    }
    let fkey = format!("f\0{device}\0{algorithm}");
    match get_json::<Fallback>(&fkey)? {
        Some(mut f) => {
            let out = (format!("{algorithm}:{}", f.key_id), f.key.clone());
            if !f.used {
                f.used = true;
                storage::put(&[(fkey, json!(f).to_string().into_bytes())]).map_err(storage_fail)?;
            }
            Ok(Some(out))
        }
        None => Ok(None),
    }
}

fn claim(user: &str, claims: &[(String, String)]) -> Result<UserReply, Failure> {
    let mut claimed = Vec::with_capacity(claims.len());
    let mut touched: Vec<&str> = Vec::new();
    for (device, algorithm) in claims {
        claimed.push(claim_one(device, algorithm)?);
        if !touched.contains(&device.as_str()) {
            touched.push(device);
        }
    }
    for device in touched {
        publish_counts(user, device, &counts(device)?)?;
    }
    Ok(UserReply { one_time_key_counts: BTreeMap::new(), claimed })
}

fn drop_device(user: &str, device: &str) -> Result<UserReply, Failure> {
    for prefix in [format!("o\0{device}\0"), format!("f\0{device}\0")] {
        loop {
            let page = list_prefix(&prefix, 512)?;
            if page.is_empty() {
                break;
            }
            let keys: Vec<String> = page.into_iter().map(|(k, _)| k).collect();
            storage::delete(&keys).map_err(storage_fail)?;
        }
    }
    storage::delete(&[format!("n\0{device}")]).map_err(storage_fail)?;
    let db = Db::open().map_err(|e| fail(503, "M_UNKNOWN", e.to_string()))?;
    db.execute(sql::E2E_COUNTS_DELETE, vec![db::t(user), db::t(device)])
        .map_err(|e| fail(503, "M_UNKNOWN", e.to_string()))?;
    Ok(UserReply::default())
}

/// Handles one request to a user's object; `user` is the object's name.
pub fn handle(request: &durable_object::Request) -> durable_object::Response {
    let user =
        request.headers.iter().find(|(k, _)| k == "lattice-user").map(|(_, v)| v.clone()).unwrap_or_default();
    crate::object::serve(request, |r: UserRequest| match r {
        UserRequest::Upload { device, one_time_keys, fallback_keys } => {
            upload(&user, &device, &one_time_keys, &fallback_keys)
        }
        UserRequest::Claim { claims } => claim(&user, &claims),
        UserRequest::DropDevice { device } => drop_device(&user, &device),
    })
}

/// Sends a request to a user's object and decodes its answer.
pub fn call(user_id: &str, request: &UserRequest) -> Result<UserReply, crate::error::Error> {
    crate::object::call(BINDING, user_id, vec![("lattice-user".into(), user_id.to_owned())], request)
}
