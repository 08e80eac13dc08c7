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
//!
//! It is also the single writer of the user's to-device queues, which live in D1 (`to_device`)
//! where `/sync` reads them. A request's messages to this user are decided under the input
//! gate (storage calls only): the cap is checked against `q\0<device>`, the count of queued
//! messages (never below the rows in D1), which is raised at once, and the messages are kept in
//! the outbox `x\0<sender>\0<sender device>\0<txn id>`. The runtime makes that durable before
//! the D1 write (output gate), which carries the messages and a guard row in one transaction;
//! then the outbox entry gives way to a marker `y\0…` kept for 30 s. A repeated request finds
//! the guard in D1, the outbox entry or the marker, and adds nothing (the marker closes the gap
//! between reading the guard and deciding); an entry left by a failed write or a crash is
//! written by the alarm, which also drops old markers. Counts
//! drop when a device acknowledges messages (`Ack`) and are recounted from D1 then whenever no
//! write was in flight, so a count raised by a duplicate comes back down.

use std::collections::BTreeMap;

use lattice_worker::bindings::lattice::bindings::{durable_object, storage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::db::{self, Db, bound, sql};
use crate::object::{Failure, db_fail, db_failure, fail, get_json, storage_fail, to_bytes};

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
    /// Forgets a deleted device's keys and to-device queue.
    DropDevice { device: String },
    /// Queues one `/sendToDevice` request's messages to this user: `messages` maps a device id
    /// (or `*`, every device) to the content.
    Enqueue {
        sender: String,
        sender_device: String,
        txn: String,
        kind: String,
        messages: BTreeMap<String, Value>,
    },
    /// Deletes the device's to-device messages up to stream position `upto` (acknowledged).
    Ack { device: String, upto: i64 },
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
    let db = Db::open().map_err(db_fail)?;
    db.execute(
        sql::E2E_COUNTS_UPSERT,
        vec![
            db::t(user),
            db::t(device),
            db::t(json!(counts).to_string()),
            db::t(json!(fallbacks).to_string()),
        ],
    )
    .map_err(db_fail)?;
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
        writes.push((storage_key, to_bytes(&f)));
    }
    if !writes.is_empty() {
        writes.push((format!("n\0{device}"), to_bytes(&n)));
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
        storage::put(&[(format!("n\0{device}"), to_bytes(&n))]).map_err(storage_fail)?;
        return Ok(Some((format!("{algorithm}:{}", &k[prefix.len()..]), key)));
    }
    let fkey = format!("f\0{device}\0{algorithm}");
    match get_json::<Fallback>(&fkey)? {
        Some(mut f) => {
            let out = (format!("{algorithm}:{}", f.key_id), f.key.clone());
            if !f.used {
                f.used = true;
                storage::put(&[(fkey, to_bytes(&f))]).map_err(storage_fail)?;
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
    storage::delete(&[format!("n\0{device}"), queued_key(device), queue_version_key(device)])
        .map_err(storage_fail)?;
    let db = Db::open().map_err(db_fail)?;
    db.batch(&[
        bound(sql::E2E_COUNTS_DELETE, vec![db::t(user), db::t(device)]),
        bound(sql::TO_DEVICE_DROP_DEVICE, vec![db::t(user), db::t(device)]),
    ])
    .map_err(db_fail)?;
    Ok(UserReply::default())
}

// ---- To-device queues ------------------------------------------------------------------------

/// How long after a decision the alarm looks for outbox entries whose write did not happen.
const TO_DEVICE_ALARM_MS: u64 = 30_000;

fn queued_key(device: &str) -> String {
    format!("q\0{device}")
}

/// Bumped by every decision that raises the device's count (see [`ack`]).
fn queue_version_key(device: &str) -> String {
    format!("v\0{device}")
}

fn outbox_key(sender: &str, sender_device: &str, txn: &str) -> String {
    format!("x\0{sender}\0{sender_device}\0{txn}")
}

/// An outbox entry's marker once written, kept for [`TO_DEVICE_ALARM_MS`] (pruned by the
/// alarm) so that a repeat arriving meanwhile is recognised without D1.
fn done_key(outbox_key: &str) -> String {
    format!("y{}", &outbox_key[1..])
}

/// One request's messages to this user, decided and waiting for (or in) their D1 write.
#[derive(Debug, Serialize, Deserialize)]
struct Queued {
    user: String,
    sender: String,
    sender_device: String,
    txn: String,
    kind: String,
    /// As sent: device id or `*` → content.
    messages: BTreeMap<String, Value>,
    /// Each message to write: the target device and its key in `messages`.
    targets: Vec<(String, String)>,
    decided_ms: u64,
}

fn enqueue(
    user: &str,
    sender: &str,
    sender_device: &str,
    txn: &str,
    kind: &str,
    messages: BTreeMap<String, Value>,
) -> Result<UserReply, Failure> {
    let key = outbox_key(sender, sender_device, txn);
    if key.len() > 4096 {
        return Err(fail(400, "M_INVALID_PARAM", "the transaction id is too long"));
    }
    // The device list comes from D1, before the decision: the gate is open while it is read.
    let db = Db::open().map_err(db_fail)?;
    let devices: Vec<String> = db
        .query(sql::DEVICE_LIST, vec![db::t(user)])
        .map_err(db_fail)?
        .iter()
        .map(|r| r.str("device_id"))
        .collect();
    let mut targets = Vec::new();
    for name in messages.keys() {
        for d in devices.iter().filter(|d| name == "*" || *d == name) {
            targets.push((d.clone(), name.clone()));
        }
    }
    if targets.is_empty() || queued_before(user, sender, sender_device, txn)? {
        return Ok(UserReply::default());
    }
    // The decision: storage calls only, so no other event of this object runs in between.
    // A repeat finds the entry (decided, will be written) or its marker (written since the
    // guard was read above).
    if !storage::get(&[key.clone(), done_key(&key)]).map_err(storage_fail)?.is_empty() {
        return Ok(UserReply::default());
    }
    let cap = crate::config::Settings::load().max_to_device_queue;
    let mut adding: BTreeMap<&str, u64> = BTreeMap::new();
    for (d, _) in &targets {
        *adding.entry(d).or_default() += 1;
    }
    let mut writes = Vec::new();
    for (d, n) in &adding {
        let queued: u64 = get_json(&queued_key(d))?.unwrap_or(0);
        if queued + n > cap {
            return Err(fail(
                429,
                "M_LIMIT_EXCEEDED",
                format!(
                    "device {d} has {queued} undelivered to-device messages (max_to_device_queue is {cap})"
                ),
            ));
        }
        let version: u64 = get_json(&queue_version_key(d))?.unwrap_or(0);
        writes.push((queued_key(d), to_bytes(&(queued + n))));
        writes.push((queue_version_key(d), to_bytes(&(version + 1))));
    }
    let entry = Queued {
        user: user.to_owned(),
        sender: sender.to_owned(),
        sender_device: sender_device.to_owned(),
        txn: txn.to_owned(),
        kind: kind.to_owned(),
        messages,
        targets,
        decided_ms: crate::util::now_ms(),
    };
    writes.push((key.clone(), to_bytes(&entry)));
    storage::put(&writes).map_err(storage_fail)?;
    let due = entry.decided_ms + TO_DEVICE_ALARM_MS;
    if storage::get_alarm().map_err(storage_fail)?.is_none_or(|at| at > due) {
        storage::set_alarm(due).map_err(storage_fail)?;
    }
    // The runtime makes the decision durable before this D1 write (output gate). When the
    // write fails the entry stays, and the alarm writes it.
    write_queued(&key, &entry, true)?;
    Ok(UserReply::default())
}

/// Whether D1 has the guard of this request to this user.
fn queued_before(user: &str, sender: &str, sender_device: &str, txn: &str) -> Result<bool, Failure> {
    let db = Db::open().map_err(db_fail)?;
    Ok(db
        .first(sql::TO_DEVICE_GUARD_GET, vec![db::t(user), db::t(sender), db::t(sender_device), db::t(txn)])
        .map_err(db_fail)?
        .is_some())
}

/// Writes an outbox entry's messages with their guard in one D1 transaction, then deletes the
/// entry. Writing an entry twice adds nothing (the guard). `fresh`: the entry was decided by
/// this very event (not a replay).
fn write_queued(key: &str, q: &Queued, fresh: bool) -> Result<(), Failure> {
    let mut batch = Vec::with_capacity(q.targets.len() * 2 + 1);
    for (device, name) in &q.targets {
        let content = q.messages.get(name).map(Value::to_string).unwrap_or_else(|| "{}".into());
        batch.push(bound(sql::STREAM_BUMP, vec![]));
        batch.push(bound(
            sql::TO_DEVICE_INSERT,
            vec![
                db::t(q.user.clone()),
                db::t(device.clone()),
                db::t(q.sender.clone()),
                db::t(q.kind.clone()),
                db::t(content),
                db::t(q.user.clone()),
                db::t(q.sender.clone()),
                db::t(q.sender_device.clone()),
                db::t(q.txn.clone()),
                db::t(q.user.clone()),
                db::t(device.clone()),
            ],
        ));
    }
    batch.push(bound(
        sql::TO_DEVICE_GUARD_INSERT,
        vec![
            db::t(q.user.clone()),
            db::t(q.sender.clone()),
            db::t(q.sender_device.clone()),
            db::t(q.txn.clone()),
            db::i(q.decided_ms as i64),
        ],
    ));
    let db = Db::open().map_err(db_fail)?;
    let changes = db.batch(&batch).map_err(|e| {
        db_failure(e, "the database is unavailable; the messages are kept and will be queued")
    })?;
    if fresh {
        // Messages not written (the request was a repeat, or the device went away) give their
        // place in the count back. A replay does not: its first attempt may have written them.
        let mut unused: BTreeMap<&str, u64> = BTreeMap::new();
        for (i, (device, _)) in q.targets.iter().enumerate() {
            if changes.get(2 * i + 1).copied() == Some(0) {
                *unused.entry(device).or_default() += 1;
            }
        }
        let mut writes = Vec::new();
        for (device, n) in unused {
            let queued: u64 = get_json(&queued_key(device))?.unwrap_or(0);
            writes.push((queued_key(device), to_bytes(&queued.saturating_sub(n))));
        }
        if !writes.is_empty() {
            storage::put_unconfirmed(&writes).map_err(storage_fail)?;
        }
    }
    // Unconfirmed: the answer does not wait for the clean-up. Lost in a crash, the entry is
    // written again by the alarm (adding nothing) and a count stays high until recounted.
    storage::delete_unconfirmed(&[key.to_owned()]).map_err(storage_fail)?;
    storage::put_unconfirmed(&[(done_key(key), to_bytes(&crate::util::now_ms()))]).map_err(storage_fail)?;
    Ok(())
}

/// Deletes what the device acknowledged and lowers its count. When no write was in flight
/// while D1 was counted (no outbox entry before or after, no decision in between), the count
/// is set to D1's: exact again after duplicates or a crash raised it.
fn ack(user: &str, device: &str, upto: i64) -> Result<UserReply, Failure> {
    let db = Db::open().map_err(db_fail)?;
    let deleted =
        db.execute(sql::TO_DEVICE_ACK, vec![db::t(user), db::t(device), db::i(upto)]).map_err(db_fail)?;
    let idle = || -> Result<bool, Failure> { Ok(list_prefix("x\0", 1)?.is_empty()) };
    let version_before: u64 = get_json(&queue_version_key(device))?.unwrap_or(0);
    let idle_before = idle()?;
    let in_d1 = if idle_before {
        db.first(sql::TO_DEVICE_QUEUE_LEN, vec![db::t(user), db::t(device)])
            .map_err(db_fail)?
            .and_then(|r| r.int("n"))
            .map(|n| n.max(0) as u64)
    } else {
        None
    };
    let version_after: u64 = get_json(&queue_version_key(device))?.unwrap_or(0);
    let queued: u64 = get_json(&queued_key(device))?.unwrap_or(0);
    let next = match in_d1 {
        Some(n) if version_before == version_after && idle()? => n,
        _ => queued.saturating_sub(deleted),
    };
    if next != queued {
        storage::put(&[(queued_key(device), to_bytes(&next))]).map_err(storage_fail)?;
    }
    Ok(UserReply::default())
}

/// The object's alarm: writes outbox entries whose write failed or never happened, and drops
/// markers older than [`TO_DEVICE_ALARM_MS`]; re-armed while either remain.
pub fn alarm() -> Result<(), String> {
    const PAGE: u32 = 64;
    let now = crate::util::now_ms();
    let entries = list_prefix("x\0", PAGE).map_err(|f| f.error)?;
    let mut retry_at = None;
    for (key, value) in &entries {
        let q: Queued = serde_json::from_slice(value).map_err(|e| format!("outbox entry {key:?}: {e}"))?;
        if write_queued(key, &q, false).is_err() {
            retry_at = Some(now + TO_DEVICE_ALARM_MS);
        }
    }
    if entries.len() == PAGE as usize {
        retry_at = Some(now);
    }
    let markers = list_prefix("y\0", PAGE).map_err(|f| f.error)?;
    let mut stale = Vec::new();
    for (key, value) in &markers {
        let written: u64 = serde_json::from_slice(value).unwrap_or(0);
        if written + TO_DEVICE_ALARM_MS <= now {
            stale.push(key.clone());
        } else {
            let due = written + TO_DEVICE_ALARM_MS;
            retry_at = Some(retry_at.map_or(due, |r: u64| r.min(due)));
        }
    }
    if markers.len() == PAGE as usize && stale.len() == markers.len() {
        retry_at = Some(now);
    }
    if !stale.is_empty() {
        storage::delete(&stale).map_err(|e| format!("dropping markers: {e:?}"))?;
    }
    if let Some(at) = retry_at {
        storage::set_alarm(at).map_err(|e| format!("re-arming the alarm: {e:?}"))?;
    }
    Ok(())
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
        UserRequest::Enqueue { sender, sender_device, txn, kind, messages } => {
            enqueue(&user, &sender, &sender_device, &txn, &kind, messages)
        }
        UserRequest::Ack { device, upto } => ack(&user, &device, upto),
    })
}

/// Sends a request to a user's object and decodes its answer.
pub fn call(user_id: &str, request: &UserRequest) -> Result<UserReply, crate::error::Error> {
    crate::object::call(BINDING, user_id, vec![("lattice-user".into(), user_id.to_owned())], request)
}
