//! Server-side key backup: `/room_keys/version` and `/room_keys/keys` at all three levels.
//!
//! Versions are numbered per user, one more than any the user ever had. Only the current
//! (newest undeleted) version takes keys; a write naming another gets
//! `M_WRONG_ROOM_KEYS_VERSION` with the current one. A stored session is replaced only by a
//! better one (the spec's rule: verified beats unverified, then the lower first message index,
//! then the lower forwarded count). Every change moves the version's `etag` on.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Ctx, Reply, ok};
use crate::db::{self, Bound, Db, Row, bound, sql};
use crate::error::{Error, Result};

fn version_json(r: &Row) -> Value {
    json!({
        "version": r.int("version").unwrap_or(0).to_string(),
        "algorithm": r.str("algorithm"),
        "auth_data": serde_json::from_str::<Value>(&r.str("auth_data")).unwrap_or_else(|_| json!({})),
        "etag": r.int("etag").unwrap_or(0).to_string(),
        "count": r.int("count").unwrap_or(0),
    })
}

fn parse_version(v: &str) -> Result<i64> {
    v.parse().map_err(|_| Error::NotFound("unknown backup version".into()))
}

#[derive(Deserialize)]
struct VersionBody {
    algorithm: String,
    auth_data: Value,
    version: Option<String>,
}

/// # `POST /_matrix/client/v3/room_keys/version`
pub fn create_version_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let body: VersionBody = ctx.json()?;
    if !body.auth_data.is_object() {
        return Err(Error::BadJson("auth_data must be an object".into()));
    }
    let db = ctx.db()?;
    db.execute(
        sql::BACKUP_VERSION_CREATE,
        vec![
            db::t(s.user_id.clone()),
            db::t(s.user_id.clone()),
            db::t(body.algorithm),
            db::t(body.auth_data.to_string()),
        ],
    )?;
    let latest = db
        .first(sql::BACKUP_VERSION_LATEST, vec![db::t(s.user_id)])?
        .ok_or_else(|| Error::Internal("the new backup version is missing".into()))?;
    ok(json!({"version": latest.int("version").unwrap_or(0).to_string()}))
}

/// # `GET /_matrix/client/v3/room_keys/version[/{version}]`
pub fn get_version_route(ctx: &Ctx, version: Option<&str>) -> Result<Reply> {
    let s = ctx.session()?;
    let db = ctx.db()?;
    let row = match version {
        None => db.first(sql::BACKUP_VERSION_LATEST, vec![db::t(s.user_id)])?,
        Some(v) => db.first(sql::BACKUP_VERSION_GET, vec![db::t(s.user_id), db::i(parse_version(v)?)])?,
    };
    ok(version_json(&row.ok_or_else(|| Error::NotFound("no such backup version".into()))?))
}

/// # `PUT /_matrix/client/v3/room_keys/version/{version}`
pub fn update_version_route(ctx: &Ctx, version: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let body: VersionBody = ctx.json()?;
    let n = parse_version(version)?;
    if body.version.as_deref().is_some_and(|v| v != version) {
        return Err(Error::InvalidParam("the version in the body does not match the path".into()));
    }
    let db = ctx.db()?;
    let current = db
        .first(sql::BACKUP_VERSION_GET, vec![db::t(s.user_id.clone()), db::i(n)])?
        .ok_or_else(|| Error::NotFound("no such backup version".into()))?;
    if current.str("algorithm") != body.algorithm {
        return Err(Error::InvalidParam("the algorithm of a backup version cannot change".into()));
    }
    db.execute(
        sql::BACKUP_VERSION_UPDATE,
        vec![db::t(body.auth_data.to_string()), db::t(s.user_id), db::i(n)],
    )?;
    ok(json!({}))
}

/// # `DELETE /_matrix/client/v3/room_keys/version/{version}`
pub fn delete_version_route(ctx: &Ctx, version: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let n = parse_version(version)?;
    let changed = ctx.db()?.batch(&[
        bound(sql::BACKUP_VERSION_DELETE, vec![db::t(s.user_id.clone()), db::i(n)]),
        bound(sql::BACKUP_SESSIONS_DELETE_ALL, vec![db::t(s.user_id), db::i(n)]),
    ])?;
    if changed.first().copied().unwrap_or(0) == 0 {
        return Err(Error::NotFound("no such backup version".into()));
    }
    ok(json!({}))
}

/// The `version` query parameter, which must name an existing version.
fn version_param(ctx: &Ctx) -> Result<i64> {
    let v = ctx
        .param("version")
        .ok_or_else(|| Error::MissingParam("the version parameter is required".into()))?;
    parse_version(v)
}

/// Whether backup data `new` may replace `old`.
pub fn better(new: &Value, old: &Value) -> bool {
    let verified = |v: &Value| v["is_verified"].as_bool().unwrap_or(false);
    let index = |v: &Value| v["first_message_index"].as_u64().unwrap_or(u64::MAX);
    let forwarded = |v: &Value| v["forwarded_count"].as_u64().unwrap_or(u64::MAX);
    if verified(new) != verified(old) {
        return verified(new);
    }
    if index(new) != index(old) {
        return index(new) < index(old);
    }
    forwarded(new) < forwarded(old)
}

fn check_data(v: &Value) -> Result<()> {
    let ok = v["first_message_index"].is_u64()
        && v["forwarded_count"].is_u64()
        && v["is_verified"].is_boolean()
        && v["session_data"].is_object();
    if ok {
        Ok(())
    } else {
        Err(Error::BadJson(
            "key backup data needs first_message_index, forwarded_count, is_verified and session_data".into(),
        ))
    }
}

/// `{room: {session: data}}` from the body of a PUT at `level` (0: all rooms, 1: one room,
/// 2: one session).
fn put_sessions(
    ctx: &Ctx,
    room: Option<&str>,
    session: Option<&str>,
) -> Result<BTreeMap<String, BTreeMap<String, Value>>> {
    let body: Value = serde_json::from_slice(if ctx.req.body.is_empty() { b"{}" } else { &ctx.req.body })
        .map_err(|e| Error::NotJson(e.to_string()))?;
    let sessions_of = |v: &Value| -> Result<BTreeMap<String, Value>> {
        v["sessions"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .ok_or_else(|| Error::BadJson("sessions must be an object".into()))
    };
    let mut out = BTreeMap::new();
    match (room, session) {
        (Some(r), Some(sid)) => {
            out.insert(r.to_owned(), BTreeMap::from([(sid.to_owned(), body)]));
        }
        (Some(r), None) => {
            out.insert(r.to_owned(), sessions_of(&body)?);
        }
        _ => {
            for (r, v) in
                body["rooms"].as_object().ok_or_else(|| Error::BadJson("rooms must be an object".into()))?
            {
                out.insert(r.clone(), sessions_of(v)?);
            }
        }
    }
    for data in out.values().flat_map(BTreeMap::values) {
        check_data(data)?;
    }
    Ok(out)
}

fn counts(db: &Db, user: &str, version: i64) -> Result<Value> {
    let row = db
        .first(sql::BACKUP_VERSION_GET, vec![db::t(user), db::i(version)])?
        .ok_or_else(|| Error::NotFound("no such backup version".into()))?;
    Ok(json!({"count": row.int("count").unwrap_or(0), "etag": row.int("etag").unwrap_or(0).to_string()}))
}

/// # `PUT /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]`
pub fn put_keys_route(ctx: &Ctx, room: Option<&str>, session: Option<&str>) -> Result<Reply> {
    let s = ctx.session()?;
    let version = version_param(ctx)?;
    let incoming = put_sessions(ctx, room, session)?;
    let db = ctx.db()?;
    let current = db.first(sql::BACKUP_VERSION_LATEST, vec![db::t(s.user_id.clone())])?;
    let current_version = current.as_ref().and_then(|r| r.int("version"));
    if current_version != Some(version) {
        return match current_version {
            Some(c) => Err(Error::WrongRoomKeysVersion { current_version: c.to_string() }),
            None => Err(Error::NotFound("no backup version exists".into())),
        };
    }
    let mut batch: Vec<Bound> = Vec::new();
    for (room_id, sessions) in &incoming {
        for (session_id, data) in sessions {
            let old = db
                .first(
                    sql::BACKUP_SESSION_GET,
                    vec![
                        db::t(s.user_id.clone()),
                        db::i(version),
                        db::t(room_id.clone()),
                        db::t(session_id.clone()),
                    ],
                )?
                .and_then(|r| serde_json::from_str::<Value>(&r.str("json")).ok());
            if old.as_ref().is_some_and(|o| !better(data, o)) {
                continue;
            }
            batch.push(bound(
                sql::BACKUP_SESSION_UPSERT,
                vec![
                    db::t(s.user_id.clone()),
                    db::i(version),
                    db::t(room_id.clone()),
                    db::t(session_id.clone()),
                    db::t(data.to_string()),
                ],
            ));
        }
    }
    if !batch.is_empty() {
        batch.push(bound(sql::BACKUP_ETAG_BUMP, vec![db::t(s.user_id.clone()), db::i(version)]));
        db.batch(&batch)?;
    }
    ok(counts(db, &s.user_id, version)?)
}

/// # `GET /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]`
pub fn get_keys_route(ctx: &Ctx, room: Option<&str>, session: Option<&str>) -> Result<Reply> {
    let s = ctx.session()?;
    let version = version_param(ctx)?;
    let db = ctx.db()?;
    counts(db, &s.user_id, version)?;
    let mut rooms: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
    for r in db.query(sql::BACKUP_SESSIONS_ALL, vec![db::t(s.user_id.clone()), db::i(version)])? {
        let data = serde_json::from_str::<Value>(&r.str("json")).unwrap_or_else(|_| json!({}));
        rooms.entry(r.str("room_id")).or_default().insert(r.str("session_id"), data);
    }
    match (room, session) {
        (Some(r), Some(sid)) => {
            let data = rooms.get(r).and_then(|m| m.get(sid)).cloned();
            ok(data.ok_or_else(|| Error::NotFound("no such session in the backup".into()))?)
        }
        (Some(r), None) => ok(json!({"sessions": rooms.remove(r).unwrap_or_default()})),
        _ => {
            let all: serde_json::Map<String, Value> =
                rooms.into_iter().map(|(r, m)| (r, json!({"sessions": m}))).collect();
            ok(json!({"rooms": all}))
        }
    }
}

/// # `DELETE /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]`
pub fn delete_keys_route(ctx: &Ctx, room: Option<&str>, session: Option<&str>) -> Result<Reply> {
    let s = ctx.session()?;
    let version = version_param(ctx)?;
    let db = ctx.db()?;
    counts(db, &s.user_id, version)?;
    let (user, v) = (db::t(s.user_id.clone()), db::i(version));
    let delete = match (room, session) {
        (Some(r), Some(sid)) => bound(sql::BACKUP_SESSIONS_DELETE_ONE, vec![user, v, db::t(r), db::t(sid)]),
        (Some(r), None) => bound(sql::BACKUP_SESSIONS_DELETE_ROOM, vec![user, v, db::t(r)]),
        _ => bound(sql::BACKUP_SESSIONS_DELETE_ALL, vec![user, v]),
    };
    db.batch(&[delete, bound(sql::BACKUP_ETAG_BUMP, vec![db::t(s.user_id.clone()), db::i(version)])])?;
    ok(counts(db, &s.user_id, version)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(verified: bool, index: u64, forwarded: u64) -> Value {
        json!({"is_verified": verified, "first_message_index": index, "forwarded_count": forwarded, "session_data": {}})
    }

    #[test]
    fn a_worse_session_does_not_replace_a_better_one() {
        assert!(better(&data(true, 9, 9), &data(false, 0, 0)), "verified wins");
        assert!(!better(&data(false, 0, 0), &data(true, 9, 9)));
        assert!(better(&data(false, 1, 9), &data(false, 5, 0)), "then the lower first index");
        assert!(!better(&data(false, 5, 0), &data(false, 1, 9)));
        assert!(better(&data(false, 1, 0), &data(false, 1, 2)), "then fewer forwards");
        assert!(!better(&data(false, 1, 2), &data(false, 1, 2)), "equal is not better");
    }
}
