//! # `POST /_matrix/client/v3/rooms/{roomId}/upgrade`
//!
//! As the spec's room-upgrade module says: check the upgrader may send `m.room.tombstone`,
//! create the new room with a `predecessor` (the upgrader its creator, plus any
//! `additional_creators` in version 12), copy the state events clients rely on and the bans,
//! tombstone the old room, restrict who may speak or invite there, and move the local aliases
//! and the directory listing. The new room's power levels start as the old one's; in versions
//! without creator privileges the upgrader is raised to 100 while the state is copied and the
//! old levels are put back after.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Value, json};

use super::rooms::{member_content, new_room, require_joined, room_version, send_events, template};
use super::{Ctx, Reply, ok};
use crate::db::{self, sql};
use crate::error::{Error, Result};
use crate::room::pdu::{self, SUPPORTED_ROOM_VERSIONS, Template};

/// State copied into the new room (the spec's list).
const COPIED: [&str; 8] = [
    "m.room.server_acl",
    "m.room.encryption",
    "m.room.name",
    "m.room.avatar",
    "m.room.topic",
    "m.room.guest_access",
    "m.room.history_visibility",
    "m.room.join_rules",
];
/// The level the upgrader is raised to while the state is copied (versions before 12).
const COPY_LEVEL: i64 = 100;

#[derive(Deserialize)]
struct Body {
    new_version: String,
    #[serde(default)]
    additional_creators: Vec<String>,
}

fn int(v: &Value, default: i64) -> i64 {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())).unwrap_or(default)
}

/// A user's level under power-levels content `pl`; creators with privileges are above all.
pub fn user_level(pl: Option<&Value>, user: &str, privileged_creator: bool) -> i64 {
    if privileged_creator {
        return i64::MAX;
    }
    match pl {
        Some(pl) => int(&pl["users"][user], int(&pl["users_default"], 0)),
        None => 0,
    }
}

/// The level needed to send a state event of `kind` under `pl`.
pub fn state_level(pl: Option<&Value>, kind: &str) -> i64 {
    match pl {
        Some(pl) => int(&pl["events"][kind], int(&pl["state_default"], 50)),
        None => 0,
    }
}

/// The old room's power levels after the upgrade: speaking and inviting need at least 50, and
/// more than the default user level.
pub fn restricted(pl: &Value) -> Value {
    let mut out = pl.clone();
    let floor = 50.max(int(&pl["users_default"], 0) + 1);
    for key in ["events_default", "invite"] {
        out[key] = json!(int(&pl[key], 0).max(floor));
    }
    out
}

pub fn upgrade_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let body: Body = ctx.json()?;
    if !SUPPORTED_ROOM_VERSIONS.contains(&body.new_version.as_str()) {
        return Err(Error::UnsupportedRoomVersion(body.new_version));
    }
    let old_version = room_version(ctx, room)?;
    require_joined(ctx, room, &s.user_id)?;
    let old_rules = pdu::rules(&old_version).map_err(|e| Error::Internal(e.to_string()))?;
    let new_rules = pdu::rules(&body.new_version).map_err(|e| Error::Internal(e.to_string()))?;
    if !body.additional_creators.is_empty() && !new_rules.authorization.explicitly_privilege_room_creators {
        return Err(Error::InvalidParam(format!(
            "room version {} has no additional creators",
            body.new_version
        )));
    }
    for c in &body.additional_creators {
        ruma::UserId::parse(c.as_str()).map_err(|e| Error::InvalidParam(format!("{c}: {e}")))?;
    }

    // The old room's current state: full PDUs by (type, state_key).
    let mut state: HashMap<(String, String), Value> = HashMap::new();
    for r in super::rooms::current_state(ctx, room)? {
        if let Ok(p) = serde_json::from_str::<Value>(&r.str("json")) {
            state.insert((r.str("type"), r.str("state_key")), p);
        }
    }
    let content =
        |kind: &str, key: &str| state.get(&(kind.to_owned(), key.to_owned())).map(|p| &p["content"]);
    let create = state
        .get(&("m.room.create".to_owned(), String::new()))
        .ok_or_else(|| Error::Internal("the room has no create event".into()))?;
    let mut old_creators: Vec<String> = create["sender"].as_str().map(str::to_owned).into_iter().collect();
    if old_rules.authorization.explicitly_privilege_room_creators
        && let Some(extra) = create["content"]["additional_creators"].as_array()
    {
        old_creators.extend(extra.iter().filter_map(|v| v.as_str().map(str::to_owned)));
    }
    let pl = content("m.room.power_levels", "").cloned();
    let privileged =
        old_rules.authorization.explicitly_privilege_room_creators && old_creators.contains(&s.user_id);
    let needed = state_level(pl.as_ref(), "m.room.tombstone");
    if user_level(pl.as_ref(), &s.user_id, privileged) < needed {
        return Err(Error::Forbidden(format!(
            "upgrading needs power level {needed} in this room (to send m.room.tombstone)"
        )));
    }

    // The new room.
    let mut create_content = serde_json::Map::new();
    create_content.insert("predecessor".into(), json!({"room_id": room}));
    for key in ["type", "m.federate"] {
        if let Some(v) = create["content"].get(key) {
            create_content.insert(key.into(), v.clone());
        }
    }
    let exempt = new_rules.authorization.explicitly_privilege_room_creators;
    if exempt && !body.additional_creators.is_empty() {
        create_content.insert("additional_creators".into(), json!(body.additional_creators));
    }
    let mut new_pl = pl.clone().unwrap_or_else(|| json!({}));
    let mut restore: Option<Value> = None;
    if exempt {
        // Creators have infinite power and may not be listed.
        if let Some(users) = new_pl["users"].as_object_mut() {
            users.remove(&s.user_id);
            for c in &body.additional_creators {
                users.remove(c);
            }
        }
    } else if user_level(Some(&new_pl), &s.user_id, false) < COPY_LEVEL {
        restore = Some(new_pl.clone());
        new_pl["users"][&s.user_id] = json!(COPY_LEVEL);
    }
    let mut then: Vec<Template> = vec![
        template("m.room.member", Some(&s.user_id), member_content(ctx, &s.user_id, "join", None)?),
        template("m.room.power_levels", Some(""), new_pl),
    ];
    for kind in COPIED {
        if let Some(c) = content(kind, "") {
            then.push(template(kind, Some(""), c.clone()));
        }
    }
    if let Some(c) = content("m.room.canonical_alias", "") {
        then.push(template("m.room.canonical_alias", Some(""), c.clone()));
    }
    let mut banned: Vec<&String> = state
        .iter()
        .filter(|((t, _), p)| t == "m.room.member" && p["content"]["membership"] == "ban")
        .map(|((_, k), _)| k)
        .collect();
    banned.sort();
    for user in banned {
        then.push(template("m.room.member", Some(user), json!({"membership": "ban"})));
    }
    if let Some(original) = restore {
        then.push(template("m.room.power_levels", Some(""), original));
    }
    let new_room_id = new_room(ctx, &s.user_id, &body.new_version, create_content, then)?;

    // The old room points at the new one and goes quiet.
    send_events(
        &s,
        room,
        vec![template(
            "m.room.tombstone",
            Some(""),
            json!({"body": "This room has been replaced", "replacement_room": new_room_id}),
        )],
        None,
    )?;
    if let Some(pl) = &pl {
        let quiet = restricted(pl);
        if &quiet != pl {
            // The upgrader may lack the power to change levels; the tombstone is what matters.
            let _ = send_events(&s, room, vec![template("m.room.power_levels", Some(""), quiet)], None);
        }
    }
    let db = ctx.db()?;
    db.execute(sql::ALIASES_MOVE, vec![db::t(new_room_id.clone()), db::t(room)])?;
    if content("m.room.canonical_alias", "").is_some() {
        let _ = send_events(&s, room, vec![template("m.room.canonical_alias", Some(""), json!({}))], None);
    }
    let published = db.first(sql::ROOM_GET, vec![db::t(room)])?.and_then(|r| r.int("published")).unwrap_or(0);
    if published != 0 {
        db.execute(sql::ROOM_SET_PUBLISHED, vec![db::i(1), db::t(new_room_id.clone())])?;
        db.execute(sql::ROOM_SET_PUBLISHED, vec![db::i(0), db::t(room)])?;
    }
    ok(json!({"replacement_room": new_room_id}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels() {
        let pl = json!({"users": {"@a:x": 100, "@b:x": "30"}, "users_default": 5, "events": {"m.room.tombstone": 100}});
        assert_eq!(user_level(Some(&pl), "@a:x", false), 100);
        assert_eq!(user_level(Some(&pl), "@b:x", false), 30);
        assert_eq!(user_level(Some(&pl), "@c:x", false), 5);
        assert_eq!(user_level(Some(&pl), "@c:x", true), i64::MAX);
        assert_eq!(user_level(None, "@c:x", false), 0);
        assert_eq!(state_level(Some(&pl), "m.room.tombstone"), 100);
        assert_eq!(state_level(Some(&pl), "m.room.topic"), 50);
        assert_eq!(state_level(None, "m.room.topic"), 0);
    }

    #[test]
    fn the_old_room_goes_quiet() {
        let pl = json!({"users_default": 0, "events_default": 0, "invite": 0, "ban": 50});
        let r = restricted(&pl);
        assert_eq!(
            (r["events_default"].clone(), r["invite"].clone(), r["ban"].clone()),
            (json!(50), json!(50), json!(50))
        );
        let high = json!({"users_default": 60, "events_default": 70, "invite": 0});
        let r = restricted(&high);
        assert_eq!((r["events_default"].clone(), r["invite"].clone()), (json!(70), json!(61)));
    }
}
