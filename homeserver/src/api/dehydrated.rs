//! Dehydrated devices (MSC3814, under `/_matrix/client/unstable/org.matrix.msc3814.v1`): a
//! device whose private keys the client stores encrypted on the server, so it can receive
//! to-device messages (room keys) while all of the user's devices are offline.
//!
//! A user has at most one: putting a new one deletes the old (its device, keys and queue). It
//! is an ordinary device row without access tokens, so `/keys/query` lists it and to-device
//! messages to `*` reach it; its queue is read and acknowledged through `/events`.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Ctx, Reply, ok};
use crate::db::{self, bound, sql};
use crate::error::{Error, Result};
use crate::keys::{self, UserRequest};

#[derive(Deserialize)]
struct PutBody {
    device_id: String,
    initial_device_display_name: Option<String>,
    device_data: Value,
    device_keys: Value,
    #[serde(default)]
    one_time_keys: serde_json::Map<String, Value>,
    #[serde(default)]
    fallback_keys: serde_json::Map<String, Value>,
}

/// Deletes the user's dehydrated device, if any; its id.
fn remove(ctx: &Ctx, user: &str) -> Result<Option<String>> {
    let db = ctx.db()?;
    let Some(row) = db.first(sql::DEHYDRATED_GET, vec![db::t(user)])? else { return Ok(None) };
    let device = row.str("device_id");
    db.batch(&[
        bound(sql::DEHYDRATED_DELETE, vec![db::t(user)]),
        bound(sql::DEVICE_DELETE, vec![db::t(user), db::t(device.clone())]),
    ])?;
    super::keys::forget_device(ctx, user, &device)?;
    Ok(Some(device))
}

/// # `PUT .../dehydrated_device`
pub fn put_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let body: PutBody = ctx.json()?;
    if body.device_id.is_empty() || body.device_id.len() > 255 {
        return Err(Error::InvalidParam("device_id must be 1 to 255 characters".into()));
    }
    if !body.device_data.is_object() {
        return Err(Error::BadJson("device_data must be an object".into()));
    }
    let dk = &body.device_keys;
    if dk["user_id"].as_str() != Some(s.user_id.as_str())
        || dk["device_id"].as_str() != Some(body.device_id.as_str())
    {
        return Err(Error::InvalidParam("device_keys must be for this user and device_id".into()));
    }
    if !dk["keys"].is_object() || !dk["algorithms"].is_array() {
        return Err(Error::BadJson("device_keys needs algorithms and keys".into()));
    }
    let db = ctx.db()?;
    if body.device_id != s.device_id
        && db.first(sql::DEVICE_GET, vec![db::t(s.user_id.clone()), db::t(body.device_id.clone())])?.is_some()
        && db
            .first(sql::DEHYDRATED_GET, vec![db::t(s.user_id.clone())])?
            .is_none_or(|r| r.str("device_id") != body.device_id)
    {
        return Err(Error::InvalidParam("a device with this id exists already".into()));
    }
    remove(ctx, &s.user_id)?;
    let now = crate::util::now_ms() as i64;
    db.batch(&[
        bound(
            sql::DEVICE_INSERT,
            vec![
                db::t(s.user_id.clone()),
                db::t(body.device_id.clone()),
                db::opt_t(body.initial_device_display_name.clone()),
                db::i(now),
                db::i(now),
            ],
        ),
        bound(
            sql::DEHYDRATED_UPSERT,
            vec![
                db::t(s.user_id.clone()),
                db::t(body.device_id.clone()),
                db::t(body.device_data.to_string()),
            ],
        ),
        bound(sql::STREAM_BUMP, vec![]),
        bound(
            sql::DEVICE_KEYS_UPSERT,
            vec![db::t(s.user_id.clone()), db::t(body.device_id.clone()), db::t(dk.to_string())],
        ),
    ])?;
    if !body.one_time_keys.is_empty() || !body.fallback_keys.is_empty() {
        keys::call(
            &s.user_id,
            &UserRequest::Upload {
                device: body.device_id.clone(),
                one_time_keys: body.one_time_keys,
                fallback_keys: body.fallback_keys,
            },
        )?;
    }
    super::keys::wake_watchers(ctx, &s.user_id)?;
    ok(json!({"device_id": body.device_id}))
}

/// # `GET .../dehydrated_device`
pub fn get_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let row = ctx
        .db()?
        .first(sql::DEHYDRATED_GET, vec![db::t(s.user_id)])?
        .ok_or_else(|| Error::NotFound("no dehydrated device".into()))?;
    ok(json!({
        "device_id": row.str("device_id"),
        "device_data": serde_json::from_str::<Value>(&row.str("device_data")).unwrap_or_else(|_| json!({})),
    }))
}

/// # `DELETE .../dehydrated_device`
pub fn delete_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let device = remove(ctx, &s.user_id)?.ok_or_else(|| Error::NotFound("no dehydrated device".into()))?;
    ok(json!({"device_id": device}))
}

#[derive(Deserialize)]
struct EventsBody {
    next_batch: Option<String>,
}

/// # `POST .../dehydrated_device/{deviceId}/events`
///
/// The dehydrated device's to-device messages, oldest first; `next_batch` of one answer,
/// passed to the next request, acknowledges (and deletes) what came before it.
pub fn events_route(ctx: &Ctx, device: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let body: EventsBody = ctx.json()?;
    let db = ctx.db()?;
    let current = db.first(sql::DEHYDRATED_GET, vec![db::t(s.user_id.clone())])?;
    if current.is_none_or(|r| r.str("device_id") != device) {
        return Err(Error::Forbidden("that is not your dehydrated device".into()));
    }
    let since = body
        .next_batch
        .as_deref()
        .map(|t| t.parse::<i64>().map_err(|_| Error::InvalidParam("malformed next_batch".into())))
        .transpose()?;
    let upto = db.first(sql::STREAM_MAX, vec![])?.and_then(|r| r.int("pos")).unwrap_or(0);
    let (events, positions) = super::keys::to_device_page(ctx, &s.user_id, device, since, upto)?;
    let next = positions.or(since).unwrap_or(0);
    ok(json!({"events": events, "next_batch": next.to_string()}))
}
