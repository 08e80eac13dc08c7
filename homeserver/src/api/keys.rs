//! End-to-end encryption keys: `/keys/upload`, `/keys/query`, `/keys/claim`, `/keys/changes`.
//!
//! Device keys live in D1 (ordered on the stream, so device-list changes never skip); one-time
//! and fallback keys in each user's `User` Durable Object ([`crate::keys`]), which hands each
//! one-time key out exactly once. Users of other servers need federation: they are reported in
//! `failures`.

use std::collections::BTreeMap;

use lattice_worker::bindings::lattice::bindings::signals;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Ctx, Reply, ok};
use crate::db::{self, Bound, bound, sql};
use crate::error::{Error, Result};
use crate::keys::{self, UserRequest};

#[derive(Deserialize)]
struct UploadBody {
    device_keys: Option<Value>,
    #[serde(default)]
    one_time_keys: serde_json::Map<String, Value>,
    #[serde(default)]
    fallback_keys: serde_json::Map<String, Value>,
}

/// # `POST /_matrix/client/v3/keys/upload`
pub fn upload_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let body: UploadBody = ctx.json()?;
    // Everything is checked before anything is stored.
    for k in body.one_time_keys.values().chain(body.fallback_keys.values()) {
        let signed_object = k["key"].is_string() && k["signatures"].is_object();
        if !(k.is_string() || signed_object) {
            return Err(Error::BadJson("a key must be a string or an object with key and signatures".into()));
        }
    }
    if let Some(dk) = &body.device_keys {
        if dk["user_id"].as_str() != Some(s.user_id.as_str())
            || dk["device_id"].as_str() != Some(s.device_id.as_str())
        {
            return Err(Error::InvalidParam(
                "device_keys must be this device's (user_id and device_id)".into(),
            ));
        }
        if !dk["keys"].is_object() || !dk["algorithms"].is_array() {
            return Err(Error::BadJson("device_keys needs algorithms and keys".into()));
        }
    }
    // One-time keys first: the object refuses a reused key id with other content, and then
    // nothing is stored; storing the device keys again on a retry changes nothing.
    let reply = keys::call(
        &s.user_id,
        &UserRequest::Upload {
            device: s.device_id.clone(),
            one_time_keys: body.one_time_keys,
            fallback_keys: body.fallback_keys,
        },
    )?;
    if let Some(dk) = &body.device_keys {
        let json = dk.to_string();
        let db = ctx.db()?;
        let same = db
            .first(sql::DEVICE_KEYS_GET, vec![db::t(s.user_id.clone()), db::t(s.device_id.clone())])?
            .is_some_and(|r| r.str("json") == json);
        if !same {
            db.batch(&[
                bound(sql::STREAM_BUMP, vec![]),
                bound(
                    sql::DEVICE_KEYS_UPSERT,
                    vec![db::t(s.user_id.clone()), db::t(s.device_id.clone()), db::t(json)],
                ),
            ])?;
            wake_watchers(ctx, &s.user_id)?;
        }
    }
    ok(json!({"one_time_key_counts": reply.one_time_key_counts}))
}

#[derive(Deserialize)]
struct QueryBody {
    device_keys: BTreeMap<String, Vec<String>>,
}

fn is_local(ctx: &Ctx, user: &str) -> bool {
    user.rsplit_once(':').is_some_and(|(_, server)| server == ctx.settings.server_name)
}

/// # `POST /_matrix/client/v3/keys/query`
pub fn query_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let body: QueryBody = ctx.json()?;
    let db = ctx.db()?;
    let mut device_keys = serde_json::Map::new();
    let mut failures = serde_json::Map::new();
    for (user, devices) in &body.device_keys {
        if !is_local(ctx, user) {
            failures.insert(user.rsplit_once(':').map_or(user.clone(), |(_, s)| s.to_owned()), json!({
                "errcode": "M_UNRECOGNIZED", "error": "users of other servers need federation, which is not available yet"}));
            continue;
        }
        let mut found = serde_json::Map::new();
        for r in db.query(sql::DEVICE_KEYS_OF_USER, vec![db::t(user.clone())])? {
            let device = r.str("device_id");
            if !devices.is_empty() && !devices.contains(&device) {
                continue;
            }
            let Ok(mut keys) = serde_json::from_str::<Value>(&r.str("json")) else { continue };
            if let Some(name) = r.text("display_name") {
                keys["unsigned"] = json!({"device_display_name": name});
            }
            found.insert(device, keys);
        }
        device_keys.insert(user.clone(), Value::Object(found));
    }
    let (mut master_keys, mut self_signing_keys, mut user_signing_keys) =
        (serde_json::Map::new(), serde_json::Map::new(), serde_json::Map::new());
    for user in body.device_keys.keys().filter(|u| is_local(ctx, u)) {
        let keys = super::cross_signing::keys_of(ctx, user)?;
        if let Some(k) = keys.get("master") {
            master_keys.insert(user.clone(), k.clone());
        }
        if let Some(k) = keys.get("self_signing") {
            self_signing_keys.insert(user.clone(), k.clone());
        }
        // A user-signing key is shown to its owner only.
        if *user == s.user_id
            && let Some(k) = keys.get("user_signing")
        {
            user_signing_keys.insert(user.clone(), k.clone());
        }
    }
    ok(json!({"device_keys": device_keys, "failures": failures, "master_keys": master_keys,
              "self_signing_keys": self_signing_keys, "user_signing_keys": user_signing_keys}))
}

#[derive(Deserialize)]
struct ClaimBody {
    one_time_keys: BTreeMap<String, BTreeMap<String, String>>,
}

/// # `POST /_matrix/client/v3/keys/claim`
pub fn claim_route(ctx: &Ctx) -> Result<Reply> {
    ctx.session()?;
    let body: ClaimBody = ctx.json()?;
    let mut out = serde_json::Map::new();
    let mut failures = serde_json::Map::new();
    for (user, devices) in &body.one_time_keys {
        if !is_local(ctx, user) {
            failures.insert(user.rsplit_once(':').map_or(user.clone(), |(_, s)| s.to_owned()), json!({
                "errcode": "M_UNRECOGNIZED", "error": "users of other servers need federation, which is not available yet"}));
            continue;
        }
        let claims: Vec<(String, String)> = devices.iter().map(|(d, a)| (d.clone(), a.clone())).collect();
        let reply = keys::call(user, &UserRequest::Claim { claims: claims.clone() })?;
        let mut by_device = serde_json::Map::new();
        for ((device, _), got) in claims.into_iter().zip(reply.claimed) {
            if let Some((name, key)) = got {
                by_device.insert(device, json!({ name: key }));
            }
        }
        if !by_device.is_empty() {
            out.insert(user.clone(), Value::Object(by_device));
        }
    }
    ok(json!({"one_time_keys": out, "failures": failures}))
}

/// The parameters of [`sql::DEVICE_LIST_CHANGES`] (also part of [`sql::E2E_SYNC`]).
fn changes_params(user: &str, from: i64, to: i64) -> Vec<db::Param> {
    vec![db::i(from), db::i(to), db::t(user), db::t(user)]
}

/// The parameters of [`sql::DEVICE_LIST_LEFT`] (also part of [`sql::E2E_SYNC`]).
fn left_params(user: &str, from: i64, to: i64) -> Vec<db::Param> {
    vec![db::t(user), db::i(from), db::i(to), db::t(user), db::t(user), db::i(from), db::i(to), db::t(user)]
}

fn user_ids(rows: &[db::Row]) -> Vec<String> {
    rows.iter().map(|r| r.str("user_id")).collect()
}

/// Users whose device lists changed between two stream positions, as seen by `user`.
pub fn changed_users(ctx: &Ctx, user: &str, from: i64, to: i64) -> Result<Vec<String>> {
    Ok(user_ids(&ctx.db()?.query(sql::DEVICE_LIST_CHANGES, changes_params(user, from, to))?))
}

/// Users who stopped sharing a joined room with `user` between two stream positions.
pub fn left_users(ctx: &Ctx, user: &str, from: i64, to: i64) -> Result<Vec<String>> {
    Ok(user_ids(&ctx.db()?.query(sql::DEVICE_LIST_LEFT, left_params(user, from, to))?))
}

/// # `GET /_matrix/client/v3/keys/changes`
pub fn changes_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let from = super::sync::parse_since(
        ctx.param("from").ok_or_else(|| Error::MissingParam("from is required".into()))?,
    )?;
    let to = super::sync::parse_since(
        ctx.param("to").ok_or_else(|| Error::MissingParam("to is required".into()))?,
    )?;
    ok(
        json!({"changed": changed_users(ctx, &s.user_id, from, to)?, "left": left_users(ctx, &s.user_id, from, to)?}),
    )
}

/// Forgets a deleted device's keys: its device keys (moved on the stream, so others see the
/// change) and its one-time and fallback keys.
pub fn forget_device(ctx: &Ctx, user: &str, device: &str) -> Result<()> {
    ctx.db()?.batch(&[
        bound(sql::STREAM_BUMP, vec![]),
        bound(sql::DEVICE_KEYS_TOMBSTONE, vec![db::t(user), db::t(device)]),
    ])?;
    wake_watchers(ctx, user)?;
    keys::call(user, &UserRequest::DropDevice { device: device.to_owned() })?;
    Ok(())
}

/// Wakes the syncers who see `user`'s device list: the user's own and those of the rooms the
/// user is joined to.
pub(super) fn wake_watchers(ctx: &Ctx, user: &str) -> Result<()> {
    signals::signal(&format!("user:{user}"));
    for m in ctx.db()?.query(sql::USER_MEMBERSHIPS, vec![db::t(user)])? {
        if m.str("membership") == "join" {
            signals::signal(&format!("room:{}", m.str("room_id")));
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct ToDeviceBody {
    messages: BTreeMap<String, BTreeMap<String, Value>>,
}

/// Most to-device messages one `/sync` delivers; the rest come with the next.
pub const TO_DEVICE_PER_SYNC: i64 = 100;

/// # `PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}`
///
/// Each local recipient's share goes through that user's `User` object (the single writer of
/// the user's queues: order, the cap and the transaction id are decided there) into D1, on the
/// stream, so a device's queue is delivered in order and never skips. A repeated transaction
/// id adds nothing to a recipient that has it; after a failure part-way (a full queue, a
/// backend down) repeating the request completes the rest.
pub fn send_to_device_route(ctx: &Ctx, kind: &str, txn: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let body: ToDeviceBody = ctx.json()?;
    if body.messages.values().flat_map(BTreeMap::values).any(|content| !content.is_object()) {
        return Err(Error::BadJson("a to-device message's content must be an object".into()));
    }
    for (user, messages) in body.messages {
        if !is_local(ctx, &user) {
            // Other servers need federation; their messages are dropped, as the spec allows
            // for unknown devices.
            continue;
        }
        keys::call(
            &user,
            &UserRequest::Enqueue {
                sender: s.user_id.clone(),
                sender_device: s.device_id.clone(),
                txn: txn.to_owned(),
                kind: kind.to_owned(),
                messages,
            },
        )?;
        signals::signal(&format!("user:{user}"));
    }
    ok(json!({}))
}

/// The device's to-device messages up to `upto` (at most [`TO_DEVICE_PER_SYNC`]), after
/// deleting those `since` acknowledges; with the stream position of the last one.
pub fn to_device_page(
    ctx: &Ctx,
    user: &str,
    device: &str,
    since: Option<i64>,
    upto: i64,
) -> Result<(Vec<Value>, Option<i64>)> {
    let db = ctx.db()?;
    if let Some(since) = since {
        keys::call(user, &UserRequest::Ack { device: device.to_owned(), upto: since })?;
    }
    let rows = db.query(
        sql::TO_DEVICE_FOR_DEVICE,
        vec![db::t(user), db::t(device), db::i(upto), db::i(TO_DEVICE_PER_SYNC)],
    )?;
    let last = rows.last().and_then(|r| r.int("stream_pos"));
    let events = rows
        .iter()
        .map(|r| {
            json!({
                "sender": r.str("sender"),
                "type": r.str("type"),
                "content": serde_json::from_str::<Value>(&r.str("content")).unwrap_or_else(|_| json!({})),
            })
        })
        .collect();
    Ok((events, last))
}

/// What end-to-end encryption adds to one `/sync`.
#[derive(Debug, Default)]
pub struct SyncE2ee {
    pub to_device: Vec<Value>,
    /// When there are more to-device messages than one response carries: the stream position
    /// the whole response must stop at, so the next since token acknowledges only what came.
    pub stop: Option<i64>,
    pub one_time_key_counts: Value,
    pub unused_fallback_key_types: Value,
    pub changed: Vec<String>,
    pub left: Vec<String>,
}

/// The one query ([`sql::E2E_SYNC`]) with everything end-to-end encryption adds to a `/sync`;
/// its rows go to [`for_sync`]. Device-list changes only with a since token.
pub fn sync_query(user: &str, device: &str, since: Option<i64>, upto: i64) -> Bound {
    let after = since.unwrap_or(0);
    let (from, to) = if since.is_some() { (after, upto) } else { (upto, upto) };
    let mut params = vec![
        db::t(user),
        db::t(device),
        db::i(after),
        db::i(upto),
        db::i(TO_DEVICE_PER_SYNC),
        db::t(user),
        db::t(device),
        db::i(after),
        db::t(user),
        db::t(device),
    ];
    params.extend(changes_params(user, from, to));
    params.extend(left_params(user, from, to));
    bound(sql::E2E_SYNC, params)
}

/// Reads the rows of [`sync_query`], and deletes (through the user's object) the to-device
/// messages the since token acknowledges, when there are any.
pub fn for_sync(user: &str, device: &str, since: Option<i64>, rows: &[db::Row]) -> Result<SyncE2ee> {
    let mut out = SyncE2ee {
        one_time_key_counts: json!({}),
        unused_fallback_key_types: json!([]),
        ..SyncE2ee::default()
    };
    let mut last = None;
    let mut acknowledged = 0;
    for r in rows {
        match r.str("kind").as_str() {
            "d" => {
                last = r.int("d");
                out.to_device.push(json!({
                    "sender": r.str("a"),
                    "type": r.str("b"),
                    "content": serde_json::from_str::<Value>(&r.str("c")).unwrap_or_else(|_| json!({})),
                }));
            }
            "a" => acknowledged = r.int("d").unwrap_or(0),
            "n" => {
                out.one_time_key_counts = serde_json::from_str(&r.str("a")).unwrap_or_else(|_| json!({}));
                out.unused_fallback_key_types =
                    serde_json::from_str(&r.str("b")).unwrap_or_else(|_| json!([]));
            }
            "c" => out.changed.push(r.str("a")),
            "l" => out.left.push(r.str("a")),
            _ => {}
        }
    }
    if let Some(since) = since
        && acknowledged > 0
    {
        keys::call(user, &UserRequest::Ack { device: device.to_owned(), upto: since })?;
    }
    out.stop = (out.to_device.len() as i64 == TO_DEVICE_PER_SYNC).then_some(last).flatten();
    Ok(out)
}
