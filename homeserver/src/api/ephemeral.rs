//! Typing, receipts, read markers, presence, tags and pushers.

use lattice_worker::bindings::lattice::bindings::signals;
use serde::Deserialize;
use serde_json::{Value, json};

use super::rooms::require_joined;
use super::{Ctx, Reply, ok};
use crate::db::{self, sql};
use crate::error::{Error, Result};
use crate::util;

/// Longest typing notification; clients renew it while the user types.
pub const MAX_TYPING_MS: u64 = 30_000;
/// Presence states clients may set.
const PRESENCE_STATES: [&str; 3] = ["online", "offline", "unavailable"];

/// # `PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}`
pub fn typing_route(ctx: &Ctx, room: &str, user: &str) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        typing: bool,
        timeout: Option<u64>,
    }
    let s = ctx.session()?;
    if s.user_id != user {
        return Err(Error::Forbidden("you can only set your own typing state".into()));
    }
    let body: Body = ctx.json()?;
    require_joined(ctx, room, user)?;
    let expires = if body.typing {
        util::now_ms() + body.timeout.unwrap_or(MAX_TYPING_MS).min(MAX_TYPING_MS)
    } else {
        0
    };
    ctx.db()?.batch(&[
        db::bound(sql::STREAM_BUMP, vec![]),
        db::bound(sql::TYPING_UPSERT, vec![db::t(room), db::t(user), db::i(expires as i64)]),
    ])?;
    signals::signal(&format!("room:{room}"));
    ok(json!({}))
}

fn put_receipt(ctx: &Ctx, room: &str, user: &str, kind: &str, event: &str, thread: &str) -> Result<()> {
    let db = ctx.db()?;
    let row = db.first(sql::EVENT_GET, vec![db::t(event)])?;
    if row.as_ref().is_none_or(|r| r.str("room_id") != room) {
        return Err(Error::NotFound("no such event in this room".into()));
    }
    db.batch(&[
        db::bound(sql::STREAM_BUMP, vec![]),
        db::bound(
            sql::RECEIPT_UPSERT,
            vec![
                db::t(room),
                db::t(user),
                db::t(kind),
                db::t(thread),
                db::t(event),
                db::i(util::now_ms() as i64),
            ],
        ),
    ])?;
    signals::signal(&format!("room:{room}"));
    Ok(())
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}`
pub fn receipt_route(ctx: &Ctx, room: &str, kind: &str, event: &str) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        thread_id: Option<String>,
    }
    let s = ctx.session()?;
    let body: Body = ctx.json()?;
    require_joined(ctx, room, &s.user_id)?;
    match kind {
        "m.read" | "m.read.private" => {}
        "m.fully_read" => {
            super::account::set_account_data(
                ctx,
                &s.user_id,
                room,
                "m.fully_read",
                &json!({"event_id": event}),
            )?;
            return ok(json!({}));
        }
        other => return Err(Error::InvalidParam(format!("unknown receipt type {other}"))),
    }
    let thread = body.thread_id.unwrap_or_default();
    put_receipt(ctx, room, &s.user_id, kind, event, &thread)?;
    ok(json!({}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/read_markers`
pub fn read_markers_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let body: serde_json::Map<String, Value> = ctx.json()?;
    require_joined(ctx, room, &s.user_id)?;
    let field = |k: &str| -> Result<Option<String>> {
        match body.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(Error::BadJson(format!("{k} must be an event id"))),
        }
    };
    if let Some(e) = field("m.fully_read")? {
        super::account::set_account_data(ctx, &s.user_id, room, "m.fully_read", &json!({"event_id": e}))?;
    }
    for kind in ["m.read", "m.read.private"] {
        if let Some(e) = field(kind)? {
            put_receipt(ctx, room, &s.user_id, kind, &e, "")?;
        }
    }
    ok(json!({}))
}

/// # `PUT /_matrix/client/v3/presence/{userId}/status`
pub fn set_presence_route(ctx: &Ctx, user: &str) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        presence: String,
        status_msg: Option<String>,
    }
    let s = ctx.session()?;
    if s.user_id != user {
        return Err(Error::Forbidden("you can only set your own presence".into()));
    }
    let body: Body = ctx.json()?;
    if !PRESENCE_STATES.contains(&body.presence.as_str()) {
        return Err(Error::InvalidParam(format!("presence must be one of {PRESENCE_STATES:?}")));
    }
    set_presence(ctx, user, &body.presence, body.status_msg)?;
    ok(json!({}))
}

pub fn set_presence(ctx: &Ctx, user: &str, presence: &str, status_msg: Option<String>) -> Result<()> {
    let db = ctx.db()?;
    db.batch(&[
        db::bound(sql::STREAM_BUMP, vec![]),
        db::bound(
            sql::PRESENCE_UPSERT,
            vec![db::t(user), db::t(presence), db::opt_t(status_msg), db::i(util::now_ms() as i64)],
        ),
    ])?;
    // Wake whoever shares a room with the user.
    signals::signal(&format!("user:{user}"));
    for r in db.query(sql::USER_MEMBERSHIPS, vec![db::t(user)])? {
        if r.str("membership") == "join" {
            signals::signal(&format!("room:{}", r.str("room_id")));
        }
    }
    Ok(())
}

/// A presence row as the API and sync show it.
pub fn presence_content(r: &db::Row) -> Value {
    let last = r.int("last_active_ms").unwrap_or(0);
    let ago = (util::now_ms() as i64 - last).max(0);
    let presence = r.str("presence");
    let mut c = json!({"presence": presence, "last_active_ago": ago, "currently_active": presence == "online" && ago < 300_000});
    if let Some(m) = r.text("status_msg") {
        c["status_msg"] = json!(m);
    }
    c
}

/// # `GET /_matrix/client/v3/presence/{userId}/status`
pub fn presence_route(ctx: &Ctx, user: &str) -> Result<Reply> {
    ctx.session()?;
    let row = ctx
        .db()?
        .first(sql::PRESENCE_GET, vec![db::t(user)])?
        .ok_or_else(|| Error::NotFound("no presence for this user".into()))?;
    ok(presence_content(&row))
}

fn own(ctx: &Ctx, user: &str) -> Result<()> {
    if ctx.session()?.user_id != user {
        return Err(Error::Forbidden("you cannot access another user's data".into()));
    }
    Ok(())
}

fn tags(ctx: &Ctx, user: &str, room: &str) -> Result<serde_json::Map<String, Value>> {
    let row = ctx.db()?.first(sql::ACCOUNT_DATA_GET, vec![db::t(user), db::t(room), db::t("m.tag")])?;
    Ok(row
        .and_then(|r| serde_json::from_str::<Value>(&r.str("content")).ok())
        .and_then(|v| v["tags"].as_object().cloned())
        .unwrap_or_default())
}

/// # `GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags`
pub fn tags_route(ctx: &Ctx, user: &str, room: &str) -> Result<Reply> {
    own(ctx, user)?;
    ok(json!({"tags": tags(ctx, user, room)?}))
}

/// # `PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub fn set_tag_route(ctx: &Ctx, user: &str, room: &str, tag: &str) -> Result<Reply> {
    own(ctx, user)?;
    let body: serde_json::Map<String, Value> = ctx.json()?;
    if body.get("order").is_some_and(|o| !o.is_number()) {
        return Err(Error::BadJson("order must be a number".into()));
    }
    let mut t = tags(ctx, user, room)?;
    t.insert(tag.to_owned(), Value::Object(body));
    super::account::set_account_data(ctx, user, room, "m.tag", &json!({"tags": t}))?;
    ok(json!({}))
}

/// # `DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}`
pub fn delete_tag_route(ctx: &Ctx, user: &str, room: &str, tag: &str) -> Result<Reply> {
    own(ctx, user)?;
    let mut t = tags(ctx, user, room)?;
    t.remove(tag);
    super::account::set_account_data(ctx, user, room, "m.tag", &json!({"tags": t}))?;
    ok(json!({}))
}

/// # `GET /_matrix/client/v3/pushers`
pub fn pushers_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let rows = ctx.db()?.query(sql::PUSHERS_LIST, vec![db::t(s.user_id)])?;
    let pushers: Vec<Value> = rows.iter().filter_map(|r| serde_json::from_str(&r.str("json")).ok()).collect();
    ok(json!({"pushers": pushers}))
}

/// # `POST /_matrix/client/v3/pushers/set`
///
/// Pushers are stored and listed; sending to push gateways comes with a later change.
pub fn set_pusher_route(ctx: &Ctx) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        pushkey: String,
        kind: Option<String>,
        app_id: String,
        app_display_name: Option<String>,
        device_display_name: Option<String>,
        profile_tag: Option<String>,
        lang: Option<String>,
        data: Option<Value>,
    }
    let s = ctx.session()?;
    let body: Body = ctx.json()?;
    let db = ctx.db()?;
    match body.kind.as_deref() {
        None => {
            db.execute(sql::PUSHER_DELETE, vec![db::t(s.user_id), db::t(body.app_id), db::t(body.pushkey)])?;
        }
        Some(kind @ ("http" | "email")) => {
            let (Some(app_display_name), Some(device_display_name), Some(lang), Some(data)) =
                (body.app_display_name, body.device_display_name, body.lang, body.data)
            else {
                return Err(Error::MissingParam(
                    "app_display_name, device_display_name, lang and data are required".into(),
                ));
            };
            if kind == "http"
                && data["url"]
                    .as_str()
                    .is_none_or(|u| !u.starts_with("https://") && !u.starts_with("http://"))
            {
                return Err(Error::InvalidParam("an http pusher needs data.url".into()));
            }
            let mut p = json!({
                "pushkey": body.pushkey, "kind": kind, "app_id": body.app_id,
                "app_display_name": app_display_name, "device_display_name": device_display_name,
                "lang": lang, "data": data,
            });
            if let Some(t) = body.profile_tag {
                p["profile_tag"] = json!(t);
            }
            db.execute(
                sql::PUSHER_UPSERT,
                vec![db::t(s.user_id), db::t(body.app_id), db::t(body.pushkey), db::t(p.to_string())],
            )?;
        }
        Some(other) => return Err(Error::InvalidParam(format!("unknown pusher kind {other}"))),
    }
    ok(json!({}))
}
