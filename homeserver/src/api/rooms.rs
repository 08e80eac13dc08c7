//! Rooms: creation, membership, sending, state, history, aliases and the directory.

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Ctx, Reply, Session, ok};
use crate::db::{self, Row, sql};
use crate::error::{Error, Result};
use crate::room::object::{self, RoomRequest};
use crate::room::pdu::{self, SUPPORTED_ROOM_VERSIONS, Template};
use crate::util;

/// Events one `/messages` call returns at most.
pub const MAX_MESSAGES_LIMIT: i64 = 1000;
pub const DEFAULT_MESSAGES_LIMIT: i64 = 10;

pub(super) fn template(kind: &str, state_key: Option<&str>, content: Value) -> Template {
    Template { kind: kind.to_owned(), state_key: state_key.map(str::to_owned), content, redacts: None }
}

/// A room known to this server: its version.
pub(super) fn room_version(ctx: &Ctx, room_id: &str) -> Result<String> {
    ctx.db()?
        .first(sql::ROOM_GET, vec![db::t(room_id)])?
        .map(|r| r.str("room_version"))
        .ok_or_else(|| Error::NotFound("no such room on this server".into()))
}

fn membership(ctx: &Ctx, room_id: &str, user: &str) -> Result<Option<Row>> {
    Ok(ctx.db()?.first(sql::MEMBERSHIP_GET, vec![db::t(room_id), db::t(user)])?)
}

/// The user is joined to the room now.
pub fn require_joined(ctx: &Ctx, room_id: &str, user: &str) -> Result<()> {
    match membership(ctx, room_id, user)? {
        Some(r) if r.str("membership") == "join" => Ok(()),
        _ => Err(Error::Forbidden("you are not joined to this room".into())),
    }
}

/// The user is or was in the room (history they may read).
pub fn require_member_ever(ctx: &Ctx, room_id: &str, user: &str) -> Result<Row> {
    room_version(ctx, room_id)?;
    membership(ctx, room_id, user)?
        .filter(|r| matches!(r.str("membership").as_str(), "join" | "leave" | "ban"))
        .ok_or_else(|| Error::Forbidden("you are not a member of this room".into()))
}

/// An event row as clients see it.
pub fn client_event(row: &Row, session: Option<&Session>, with_room_id: bool) -> Value {
    let pdu: Value = serde_json::from_str(&row.str("json")).unwrap_or(Value::Null);
    let room_id = row.str("room_id");
    let mut ev = pdu::client_event(&row.str("event_id"), &pdu, &room_id, with_room_id);
    if let (Some(s), Some(dev), Some(txn)) = (session, row.text("txn_device"), row.text("txn_id"))
        && dev == s.device_id
        && pdu.get("sender").and_then(Value::as_str) == Some(s.user_id.as_str())
    {
        ev["unsigned"] = json!({"transaction_id": txn});
    }
    ev
}

#[derive(Deserialize)]
struct CreateRoomBody {
    preset: Option<String>,
    visibility: Option<String>,
    room_alias_name: Option<String>,
    name: Option<String>,
    topic: Option<String>,
    #[serde(default)]
    invite: Vec<String>,
    #[serde(default)]
    initial_state: Vec<InitialState>,
    power_level_content_override: Option<serde_json::Map<String, Value>>,
    room_version: Option<String>,
    creation_content: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    is_direct: bool,
}

#[derive(Deserialize)]
struct InitialState {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    state_key: String,
    content: Value,
}

/// # `POST /_matrix/client/v3/createRoom`
pub fn create_room_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let body: CreateRoomBody = ctx.json()?;
    let version = body.room_version.clone().unwrap_or_else(|| ctx.settings.default_room_version.clone());
    if !SUPPORTED_ROOM_VERSIONS.contains(&version.as_str()) {
        return Err(Error::UnsupportedRoomVersion(version));
    }
    let rules = pdu::rules(&version).map_err(|e| Error::UnsupportedRoomVersion(e.to_string()))?;
    let server = ctx.settings.server_name.clone();
    let db = ctx.db()?;
    let alias = match &body.room_alias_name {
        Some(a) if a.is_empty() || a.contains(':') || a.contains(char::is_whitespace) => {
            return Err(Error::InvalidParam("room_alias_name must be a plain localpart".into()));
        }
        Some(a) => {
            let alias = format!("#{a}:{server}");
            if db.first(sql::ALIAS_GET, vec![db::t(alias.clone())])?.is_some() {
                return Err(Error::RoomInUse);
            }
            Some(alias)
        }
        None => None,
    };
    for user in &body.invite {
        if ruma::UserId::parse(user.as_str()).is_err() {
            return Err(Error::InvalidParam(format!("{user} is not a user id")));
        }
    }
    let preset = body.preset.clone().unwrap_or_else(|| {
        if body.visibility.as_deref() == Some("public") {
            "public_chat".into()
        } else {
            "private_chat".into()
        }
    });
    let (join_rule, guest_access) = match preset.as_str() {
        "public_chat" => ("public", "forbidden"),
        "private_chat" | "trusted_private_chat" => ("invite", "can_join"),
        other => return Err(Error::InvalidParam(format!("unknown preset {other}"))),
    };

    // Creators (version 12) have infinite power and may not be listed in power levels.
    let creators_exempt = rules.authorization.explicitly_privilege_room_creators;
    let mut users = serde_json::Map::new();
    if !creators_exempt {
        users.insert(s.user_id.clone(), json!(100));
    }
    if preset == "trusted_private_chat" {
        for u in &body.invite {
            users.insert(u.clone(), json!(100));
        }
    }
    let mut power = json!({
        "users": users, "users_default": 0,
        "events": {
            "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
            "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
            "m.room.server_acl": 100, "m.room.encryption": 100,
        },
        "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0,
        "notifications": {"room": 50},
    });
    if let Some(over) = body.power_level_content_override {
        for (k, v) in over {
            power[k] = v;
        }
    }
    let profile = db.first(sql::USER_GET, vec![db::t(s.user_id.clone())])?;
    let mut member = json!({"membership": "join"});
    if let Some(p) = &profile {
        if let Some(d) = p.text("displayname") {
            member["displayname"] = json!(d);
        }
        if let Some(a) = p.text("avatar_url") {
            member["avatar_url"] = json!(a);
        }
    }
    let mut then = vec![
        template("m.room.member", Some(&s.user_id), member),
        template("m.room.power_levels", Some(""), power),
    ];
    if let Some(a) = &alias {
        then.push(template("m.room.canonical_alias", Some(""), json!({"alias": a})));
    }
    then.push(template("m.room.join_rules", Some(""), json!({"join_rule": join_rule})));
    then.push(template("m.room.history_visibility", Some(""), json!({"history_visibility": "shared"})));
    then.push(template("m.room.guest_access", Some(""), json!({"guest_access": guest_access})));
    for st in body.initial_state {
        then.push(template(&st.kind, Some(&st.state_key), st.content));
    }
    if let Some(n) = body.name {
        then.push(template("m.room.name", Some(""), json!({"name": n})));
    }
    if let Some(t) = body.topic {
        then.push(template("m.room.topic", Some(""), json!({"topic": t})));
    }
    for u in &body.invite {
        let mut c = json!({"membership": "invite"});
        if body.is_direct {
            c["is_direct"] = json!(true);
        }
        then.push(template("m.room.member", Some(u), c));
    }
    let create_content = body.creation_content.clone().unwrap_or_default();
    let room_id = new_room(ctx, &s.user_id, &version, create_content, then)?;
    if let Some(a) = alias {
        db.execute(sql::ALIAS_INSERT, vec![db::t(a), db::t(room_id.clone()), db::t(s.user_id)])?;
    }
    if body.visibility.as_deref() == Some("public") {
        db.execute(sql::ROOM_SET_PUBLISHED, vec![db::i(1), db::t(room_id.clone())])?;
    }
    ok(json!({"room_id": room_id}))
}

/// Creates a room of `version` with `create_content` (the room version and, where the version
/// wants it, the creator are added) and the events `then` from `sender`; its room id.
pub fn new_room(
    ctx: &Ctx,
    sender: &str,
    version: &str,
    mut create_content: serde_json::Map<String, Value>,
    then: Vec<Template>,
) -> Result<String> {
    let rules = pdu::rules(version).map_err(|e| Error::UnsupportedRoomVersion(e.to_string()))?;
    let server = &ctx.settings.server_name;
    // The create event is built here because the room id of version 12 is its hash.
    create_content.insert("room_version".into(), json!(version));
    if !rules.authorization.use_room_create_sender {
        create_content.insert("creator".into(), json!(sender));
    }
    let room_id_field = (!rules.authorization.room_create_event_id_as_room_id)
        .then(|| format!("!{}:{server}", util::random_alpha(18)));
    let key = object::server_signing_key().map_err(Error::Internal)?;
    let (create_id, create_obj) = pdu::build(
        version,
        server,
        &key,
        sender,
        &template("m.room.create", Some(""), Value::Object(create_content)),
        &pdu::Position {
            room_id: room_id_field.as_deref(),
            prev_events: &[],
            auth_events: &[],
            depth: 1,
            origin_server_ts: util::now_ms(),
        },
    )
    .map_err(|e| Error::BadJson(e.to_string()))?;
    let room_id = room_id_field.unwrap_or_else(|| pdu::room_id_from_create_event_id(&create_id));
    let create_pdu = serde_json::to_value(&create_obj).map_err(|e| Error::Internal(e.to_string()))?;
    object::call(
        &room_id,
        &RoomRequest::Create {
            version: version.to_owned(),
            create_event_id: create_id,
            create_pdu,
            then,
            sender: sender.to_owned(),
        },
    )?;
    Ok(room_id)
}

/// # `GET /_matrix/client/v3/joined_rooms`
pub fn joined_rooms_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let rows = ctx.db()?.query(sql::USER_MEMBERSHIPS, vec![db::t(s.user_id)])?;
    let rooms: Vec<String> =
        rows.iter().filter(|r| r.str("membership") == "join").map(|r| r.str("room_id")).collect();
    ok(json!({"joined_rooms": rooms}))
}

fn resolve_room(ctx: &Ctx, target: &str) -> Result<String> {
    if target.starts_with('#') {
        return ctx
            .db()?
            .first(sql::ALIAS_GET, vec![db::t(target)])?
            .map(|r| r.str("room_id"))
            .ok_or_else(|| Error::NotFound("no room with this alias".into()));
    }
    if !target.starts_with('!') {
        return Err(Error::InvalidParam("not a room id or alias".into()));
    }
    Ok(target.to_owned())
}

pub(super) fn send_events(
    s: &Session,
    room_id: &str,
    templates: Vec<Template>,
    txn: Option<&str>,
) -> Result<Vec<String>> {
    // The room's object answers 404 for a room it does not hold, so no D1 lookup first.
    let reply = object::call(
        room_id,
        &RoomRequest::Send {
            sender: s.user_id.clone(),
            templates,
            txn: txn.map(|t| (s.device_id.clone(), t.to_owned())),
        },
    )?;
    Ok(reply.event_ids)
}

pub(super) fn member_content(
    ctx: &Ctx,
    user: &str,
    membership: &str,
    reason: Option<String>,
) -> Result<Value> {
    let mut c = json!({"membership": membership});
    if membership == "join"
        && let Some(p) = ctx.db()?.first(sql::USER_GET, vec![db::t(user)])?
    {
        if let Some(d) = p.text("displayname") {
            c["displayname"] = json!(d);
        }
        if let Some(a) = p.text("avatar_url") {
            c["avatar_url"] = json!(a);
        }
    }
    if let Some(r) = reason {
        c["reason"] = json!(r);
    }
    Ok(c)
}

#[derive(Deserialize, Default)]
struct MembershipBody {
    user_id: Option<String>,
    reason: Option<String>,
}

/// # `POST /_matrix/client/v3/join/{roomIdOrAlias}` and `/rooms/{roomId}/join`
pub fn join_route(ctx: &Ctx, target: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let body: MembershipBody = ctx.json()?;
    let room_id = resolve_room(ctx, target)?;
    if membership(ctx, &room_id, &s.user_id)?.is_some_and(|r| r.str("membership") == "join") {
        return ok(json!({"room_id": room_id}));
    }
    let content = member_content(ctx, &s.user_id, "join", body.reason)?;
    send_events(&s, &room_id, vec![template("m.room.member", Some(&s.user_id), content)], None)?;
    ok(json!({"room_id": room_id}))
}

/// # `POST /_matrix/client/v3/knock/{roomIdOrAlias}`
pub fn knock_route(ctx: &Ctx, target: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let body: MembershipBody = ctx.json()?;
    let room_id = resolve_room(ctx, target)?;
    let content = member_content(ctx, &s.user_id, "knock", body.reason)?;
    send_events(&s, &room_id, vec![template("m.room.member", Some(&s.user_id), content)], None)?;
    ok(json!({"room_id": room_id}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/{invite,leave,kick,ban,unban}`
pub fn membership_route(ctx: &Ctx, room: &str, action: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let body: MembershipBody = ctx.json()?;
    let (target, membership) = match action {
        "leave" => (s.user_id.clone(), "leave"),
        other => {
            let target =
                body.user_id.clone().ok_or_else(|| Error::MissingParam("user_id is required".into()))?;
            ruma::UserId::parse(target.as_str()).map_err(|e| Error::InvalidParam(e.to_string()))?;
            let m = match other {
                "invite" => "invite",
                "ban" => "ban",
                _ => "leave",
            };
            (target, m)
        }
    };
    if action == "invite" && !target.ends_with(&format!(":{}", ctx.settings.server_name)) {
        return Err(Error::Forbidden(
            "inviting users of other servers needs federation, which is not available yet".into(),
        ));
    }
    if action == "invite" && ctx.db()?.first(sql::USER_GET, vec![db::t(target.clone())])?.is_none() {
        return Err(Error::NotFound("no such user".into()));
    }
    let content = member_content(ctx, &target, membership, body.reason)?;
    send_events(&s, room, vec![template("m.room.member", Some(&target), content)], None)?;
    ok(json!({}))
}

/// # `POST /_matrix/client/v3/rooms/{roomId}/forget`
pub fn forget_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let s = ctx.session()?;
    if membership(ctx, room, &s.user_id)?
        .is_some_and(|r| matches!(r.str("membership").as_str(), "join" | "invite"))
    {
        return Err(Error::BadState("leave the room before forgetting it".into()));
    }
    ctx.db()?.execute(sql::MEMBERSHIP_FORGET, vec![db::t(room), db::t(s.user_id)])?;
    ok(json!({}))
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}`
pub fn send_route(ctx: &Ctx, room: &str, kind: &str, txn: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let content: serde_json::Map<String, Value> = ctx.json()?;
    ctx.rate_limit("send", &s.user_id, ctx.settings.send_per_minute)?;
    let ids = send_events(&s, room, vec![template(kind, None, Value::Object(content))], Some(txn))?;
    ok(json!({"event_id": ids.first()}))
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub fn put_state_route(ctx: &Ctx, room: &str, kind: &str, key: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let content: serde_json::Map<String, Value> = ctx.json()?;
    let ids = send_events(&s, room, vec![template(kind, Some(key), Value::Object(content))], None)?;
    ok(json!({"event_id": ids.first()}))
}

/// # `PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}`
pub fn redact_route(ctx: &Ctx, room: &str, event: &str, txn: &str) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        reason: Option<String>,
    }
    let s = ctx.session()?;
    let body: Body = ctx.json()?;
    let target = ctx.db()?.first(sql::EVENT_GET, vec![db::t(event)])?;
    if target.as_ref().is_none_or(|t| t.str("room_id") != room) {
        return Err(Error::NotFound("no such event in this room".into()));
    }
    let content = body.reason.map_or_else(|| json!({}), |r| json!({"reason": r}));
    let t = Template {
        kind: "m.room.redaction".into(),
        state_key: None,
        content,
        redacts: Some(event.to_owned()),
    };
    let ids = send_events(&s, room, vec![t], Some(txn))?;
    ok(json!({"event_id": ids.first()}))
}

/// Current state rows of a room (with event JSON).
pub fn current_state(ctx: &Ctx, room: &str) -> Result<Vec<Row>> {
    Ok(ctx.db()?.query(sql::CURRENT_STATE, vec![db::t(room)])?)
}

pub fn state_client_event(r: &Row, room: &str) -> Value {
    let pdu: Value = serde_json::from_str(&r.str("json")).unwrap_or(Value::Null);
    pdu::client_event(&r.str("event_id"), &pdu, room, true)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/state`
pub fn state_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let s = ctx.session()?;
    require_joined(ctx, room, &s.user_id)?;
    let rows = current_state(ctx, room)?;
    ok(Value::Array(rows.iter().map(|r| state_client_event(r, room)).collect()))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}`
pub fn state_event_route(ctx: &Ctx, room: &str, kind: &str, key: &str) -> Result<Reply> {
    let s = ctx.session()?;
    require_joined(ctx, room, &s.user_id)?;
    let row = ctx
        .db()?
        .first(sql::CURRENT_STATE_ONE, vec![db::t(room), db::t(kind), db::t(key)])?
        .ok_or_else(|| Error::NotFound("no such state event".into()))?;
    let pdu: Value = serde_json::from_str(&row.str("json")).unwrap_or(Value::Null);
    if ctx.param("format") == Some("event") {
        return ok(pdu::client_event(&row.str("event_id"), &pdu, room, true));
    }
    ok(pdu.get("content").cloned().unwrap_or_else(|| json!({})))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}`
pub fn event_route(ctx: &Ctx, room: &str, event: &str) -> Result<Reply> {
    let s = ctx.session()?;
    require_member_ever(ctx, room, &s.user_id)?;
    let row = ctx
        .db()?
        .first(sql::EVENT_GET, vec![db::t(event)])?
        .filter(|r| r.str("room_id") == room)
        .ok_or_else(|| Error::NotFound("no such event in this room".into()))?;
    if !super::visibility::Visibility::new(ctx, room, &s.user_id)?.allows(ctx, &row)? {
        return Err(Error::NotFound("no such event in this room".into()));
    }
    ok(client_event(&row, Some(&s), true))
}

/// A pagination token: `t<n>` is the boundary just before the room's event number `n`; a
/// sync token `s<pos>` is the boundary after everything committed at `pos`.
pub fn boundary(ctx: &Ctx, room: &str, token: &str) -> Result<i64> {
    if let Some(n) = token.strip_prefix('t') {
        return n.parse().map_err(|_| Error::InvalidParam("malformed pagination token".into()));
    }
    let pos = super::sync::parse_since(token)?;
    let seq = ctx
        .db()?
        .first(sql::ROOM_SEQ_AT, vec![db::t(room), db::i(pos)])?
        .and_then(|r| r.int("seq"))
        .unwrap_or(0);
    Ok(seq + 1)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/messages`
pub fn messages_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let member = require_member_ever(ctx, room, &s.user_id)?;
    let forward = match ctx.param("dir") {
        Some("f") => true,
        Some("b") => false,
        _ => return Err(Error::InvalidParam("dir must be b or f".into())),
    };
    let limit = match ctx.param("limit") {
        Some(l) => l.parse::<i64>().map_err(|_| Error::InvalidParam("limit must be a number".into()))?,
        None => DEFAULT_MESSAGES_LIMIT,
    }
    .clamp(0, MAX_MESSAGES_LIMIT);
    let filter = super::sync::RoomEventFilter::parse(ctx.param("filter"))?;
    // Someone who left sees history up to their leaving.
    let ceiling = (member.str("membership") != "join").then(|| member.int("room_seq").unwrap_or(0) + 1);
    let from = match ctx.param("from") {
        Some(t) => boundary(ctx, room, t)?,
        None if forward => 1,
        None => ceiling.unwrap_or(i64::MAX),
    };
    let db = ctx.db()?;
    let rows = if forward {
        db.query(sql::EVENTS_AFTER, vec![db::t(room), db::i(from - 1), db::i(limit * 2 + 1)])?
    } else {
        db.query(
            sql::EVENTS_BEFORE,
            vec![db::t(room), db::i(from.min(ceiling.unwrap_or(i64::MAX))), db::i(limit * 2 + 1)],
        )?
    };
    let mut visibility = super::visibility::Visibility::new(ctx, room, &s.user_id)?;
    let mut chunk = Vec::new();
    let mut last_seq = None;
    let mut exhausted = true;
    for r in &rows {
        let seq = r.int("room_seq").unwrap_or(0);
        if ceiling.is_some_and(|c| seq >= c) {
            break;
        }
        if chunk.len() as i64 >= limit {
            exhausted = false;
            break;
        }
        last_seq = Some(seq);
        let ev = client_event(r, Some(&s), true);
        if filter.matches(&ev) && visibility.allows(ctx, r)? {
            chunk.push(ev);
        }
    }
    if rows.len() as i64 > limit * 2 {
        exhausted = false;
    }
    let mut out = json!({"chunk": chunk, "start": format!("t{from}")});
    if let Some(seq) = last_seq.filter(|_| !exhausted || !chunk_is_empty(&out)) {
        out["end"] = json!(if forward { format!("t{}", seq + 1) } else { format!("t{seq}") });
    }
    if filter.lazy_load_members {
        out["state"] = json!(member_events_for(ctx, room, &out["chunk"])?);
    }
    ok(out)
}

fn chunk_is_empty(out: &Value) -> bool {
    out["chunk"].as_array().is_none_or(Vec::is_empty)
}

/// The current member events of the senders of `events` (lazy-loading members).
pub fn member_events_for(ctx: &Ctx, room: &str, events: &Value) -> Result<Vec<Value>> {
    let mut senders: Vec<&str> = events
        .as_array()
        .map(|a| a.iter().filter_map(|e| e["sender"].as_str()).collect())
        .unwrap_or_default();
    senders.sort_unstable();
    senders.dedup();
    let db = ctx.db()?;
    let mut out = Vec::new();
    for sender in senders {
        if let Some(r) =
            db.first(sql::CURRENT_STATE_ONE, vec![db::t(room), db::t("m.room.member"), db::t(sender)])?
        {
            let pdu: Value = serde_json::from_str(&r.str("json")).unwrap_or(Value::Null);
            out.push(pdu::client_event(&r.str("event_id"), &pdu, room, true));
        }
    }
    Ok(out)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/members`
pub fn members_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let s = ctx.session()?;
    require_member_ever(ctx, room, &s.user_id)?;
    let want = ctx.param("membership");
    let not = ctx.param("not_membership");
    let chunk: Vec<Value> = current_state(ctx, room)?
        .iter()
        .filter(|r| r.str("type") == "m.room.member")
        .map(|r| state_client_event(r, room))
        .filter(|e| {
            let m = e["content"]["membership"].as_str().unwrap_or_default();
            want.is_none_or(|w| w == m) && not.is_none_or(|n| n != m)
        })
        .collect();
    ok(json!({"chunk": chunk}))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/joined_members`
pub fn joined_members_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let s = ctx.session()?;
    require_joined(ctx, room, &s.user_id)?;
    let mut joined = serde_json::Map::new();
    for r in current_state(ctx, room)?.iter().filter(|r| r.str("type") == "m.room.member") {
        let e = state_client_event(r, room);
        if e["content"]["membership"] == "join" {
            let mut m = json!({});
            if let Some(d) = e["content"]["displayname"].as_str() {
                m["display_name"] = json!(d);
            }
            if let Some(a) = e["content"]["avatar_url"].as_str() {
                m["avatar_url"] = json!(a);
            }
            joined.insert(r.str("state_key"), m);
        }
    }
    ok(json!({"joined": joined}))
}

fn local_alias(ctx: &Ctx, alias: &str) -> Result<()> {
    if !alias.starts_with('#') || !alias.ends_with(&format!(":{}", ctx.settings.server_name)) {
        return Err(Error::InvalidParam("the alias must be #name:this.server".into()));
    }
    Ok(())
}

/// # `GET /_matrix/client/v3/directory/room/{roomAlias}`
pub fn resolve_alias_route(ctx: &Ctx, alias: &str) -> Result<Reply> {
    let room = resolve_room(ctx, alias)?;
    ok(json!({"room_id": room, "servers": [ctx.settings.server_name]}))
}

/// # `PUT /_matrix/client/v3/directory/room/{roomAlias}`
pub fn set_alias_route(ctx: &Ctx, alias: &str) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        room_id: String,
    }
    let s = ctx.session()?;
    local_alias(ctx, alias)?;
    let body: Body = ctx.json()?;
    require_joined(ctx, &body.room_id, &s.user_id)?;
    if ctx.db()?.execute(sql::ALIAS_INSERT, vec![db::t(alias), db::t(body.room_id), db::t(s.user_id)])? == 0 {
        return Err(Error::RoomInUse);
    }
    ok(json!({}))
}

/// # `DELETE /_matrix/client/v3/directory/room/{roomAlias}`
pub fn delete_alias_route(ctx: &Ctx, alias: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let row = ctx
        .db()?
        .first(sql::ALIAS_GET, vec![db::t(alias)])?
        .ok_or_else(|| Error::NotFound("no such alias".into()))?;
    if row.str("creator") != s.user_id {
        return Err(Error::Forbidden("only the alias's creator may delete it".into()));
    }
    ctx.db()?.execute(sql::ALIAS_DELETE, vec![db::t(alias)])?;
    ok(json!({}))
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/aliases`
pub fn room_aliases_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let s = ctx.session()?;
    require_joined(ctx, room, &s.user_id)?;
    let rows = ctx.db()?.query(sql::ALIASES_OF_ROOM, vec![db::t(room)])?;
    ok(json!({"aliases": rows.iter().map(|r| r.str("alias")).collect::<Vec<_>>()}))
}

/// # `GET /_matrix/client/v3/directory/list/room/{roomId}`
pub fn visibility_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let row = ctx
        .db()?
        .first(sql::ROOM_GET, vec![db::t(room)])?
        .ok_or_else(|| Error::NotFound("no such room".into()))?;
    let public = row.int("published").unwrap_or(0) == 1;
    ok(json!({"visibility": if public { "public" } else { "private" }}))
}

/// # `PUT /_matrix/client/v3/directory/list/room/{roomId}`
pub fn set_visibility_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        visibility: Option<String>,
    }
    let s = ctx.session()?;
    require_joined(ctx, room, &s.user_id)?;
    let body: Body = ctx.json()?;
    let public = match body.visibility.as_deref() {
        Some("public") => 1,
        Some("private") | None => 0,
        Some(other) => return Err(Error::InvalidParam(format!("unknown visibility {other}"))),
    };
    ctx.db()?.execute(sql::ROOM_SET_PUBLISHED, vec![db::i(public), db::t(room)])?;
    ok(json!({}))
}

/// # `GET|POST /_matrix/client/v3/publicRooms`
pub fn public_rooms_route(ctx: &Ctx) -> Result<Reply> {
    let limit = ctx.param("limit").and_then(|l| l.parse::<i64>().ok()).unwrap_or(100).clamp(1, 500);
    let since = ctx.param("since").unwrap_or_default();
    let rows = ctx.db()?.query(sql::ROOMS_PUBLISHED, vec![db::t(since), db::i(limit + 1)])?;
    let mut chunk = Vec::new();
    for r in rows.iter().take(limit as usize) {
        let room = r.str("room_id");
        let state = current_state(ctx, &room)?;
        let content = |t: &str, f: &str| {
            state.iter().find(|s| s.str("type") == t).and_then(|s| {
                serde_json::from_str::<Value>(&s.str("json"))
                    .ok()
                    .and_then(|p| p["content"][f].as_str().map(str::to_owned))
            })
        };
        let joined = state
            .iter()
            .filter(|s| {
                s.str("type") == "m.room.member"
                    && serde_json::from_str::<Value>(&s.str("json"))
                        .is_ok_and(|p| p["content"]["membership"] == "join")
            })
            .count();
        let mut e = json!({
            "room_id": room, "num_joined_members": joined,
            "world_readable": content("m.room.history_visibility", "history_visibility").as_deref() == Some("world_readable"),
            "guest_can_join": content("m.room.guest_access", "guest_access").as_deref() == Some("can_join"),
            "join_rule": content("m.room.join_rules", "join_rule").unwrap_or_else(|| "public".into()),
        });
        for (field, t, f) in [
            ("name", "m.room.name", "name"),
            ("topic", "m.room.topic", "topic"),
            ("canonical_alias", "m.room.canonical_alias", "alias"),
        ] {
            if let Some(v) = content(t, f) {
                e[field] = json!(v);
            }
        }
        chunk.push(e);
    }
    let mut out = json!({"chunk": chunk, "total_room_count_estimate": chunk.len()});
    if rows.len() as i64 > limit
        && let Some(last) = rows.get(limit as usize - 1)
    {
        out["next_batch"] = json!(last.str("room_id"));
    }
    ok(out)
}

/// Deactivation: the user leaves every room they are joined to, invited to or knocking on.
pub fn leave_all(ctx: &Ctx, user: &str) -> Result<()> {
    let s = Session { user_id: user.to_owned(), device_id: String::new(), token_hash: String::new() };
    let rows = ctx.db()?.query(sql::USER_MEMBERSHIPS, vec![db::t(user)])?;
    for r in rows.iter().filter(|r| matches!(r.str("membership").as_str(), "join" | "invite" | "knock")) {
        let room = r.str("room_id");
        send_events(
            &s,
            &room,
            vec![template("m.room.member", Some(user), json!({"membership": "leave"}))],
            None,
        )?;
    }
    Ok(())
}

/// After a profile change: a new member event in each joined room, as clients expect.
pub fn refresh_member_events(ctx: &Ctx, user: &str, field: &str, value: Option<&str>) -> Result<()> {
    let s = Session { user_id: user.to_owned(), device_id: String::new(), token_hash: String::new() };
    let rows = ctx.db()?.query(sql::USER_MEMBERSHIPS, vec![db::t(user)])?;
    for r in rows.iter().filter(|r| r.str("membership") == "join") {
        let room = r.str("room_id");
        let Some(cur) = ctx
            .db()?
            .first(sql::CURRENT_STATE_ONE, vec![db::t(room.clone()), db::t("m.room.member"), db::t(user)])?
        else {
            continue;
        };
        let mut content =
            serde_json::from_str::<Value>(&cur.str("json")).map(|p| p["content"].clone()).unwrap_or_default();
        match value {
            Some(v) => content[field] = json!(v),
            None => {
                if let Some(o) = content.as_object_mut() {
                    o.remove(field);
                }
            }
        }
        send_events(&s, &room, vec![template("m.room.member", Some(user), content)], None)?;
    }
    Ok(())
}
