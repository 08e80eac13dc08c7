//! Relations, threads and event context.

use serde_json::{Value, json};

use super::rooms::{boundary, client_event, require_member_ever};
use super::{Ctx, Reply, ok};
use crate::db::{self, sql};
use crate::error::{Error, Result};

/// Events one relations or threads page holds at most.
pub const MAX_PAGE: i64 = 100;
pub const DEFAULT_PAGE: i64 = 20;

fn limit(ctx: &Ctx, default: i64) -> Result<i64> {
    Ok(match ctx.param("limit") {
        Some(l) => l.parse::<i64>().map_err(|_| Error::InvalidParam("limit must be a number".into()))?,
        None => default,
    }
    .clamp(1, MAX_PAGE))
}

fn event_in_room(ctx: &Ctx, room: &str, event: &str) -> Result<db::Row> {
    ctx.db()?
        .first(sql::EVENT_GET, vec![db::t(event)])?
        .filter(|r| r.str("room_id") == room)
        .ok_or_else(|| Error::NotFound("no such event in this room".into()))
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}[/{relType}[/{eventType}]]`
pub fn relations_route(
    ctx: &Ctx,
    room: &str,
    event: &str,
    rel: Option<&str>,
    kind: Option<&str>,
) -> Result<Reply> {
    let s = ctx.session()?;
    require_member_ever(ctx, room, &s.user_id)?;
    event_in_room(ctx, room, event)?;
    let forward = match ctx.param("dir") {
        Some("f") => true,
        Some("b") | None => false,
        Some(_) => return Err(Error::InvalidParam("dir must be b or f".into())),
    };
    let limit = limit(ctx, DEFAULT_PAGE)?;
    let from = match ctx.param("from") {
        Some(t) => boundary(ctx, room, t)?,
        None if forward => 0,
        None => i64::MAX,
    };
    let to = ctx.param("to").map(|t| boundary(ctx, room, t)).transpose()?;
    let mut params = vec![db::t(event)];
    let stmt = match (rel, kind, forward) {
        (None, _, false) => sql::RELATIONS_BACK,
        (None, _, true) => sql::RELATIONS_FWD,
        (Some(r), None, f) => {
            params.push(db::t(r));
            if f { sql::RELATIONS_FWD_REL } else { sql::RELATIONS_BACK_REL }
        }
        (Some(r), Some(k), f) => {
            params.push(db::t(r));
            params.push(db::t(k));
            if f { sql::RELATIONS_FWD_REL_TYPE } else { sql::RELATIONS_BACK_REL_TYPE }
        }
    };
    params.push(db::i(from));
    params.push(db::i(limit + 1));
    let rows = ctx.db()?.query(stmt, params)?;
    let mut visibility = super::visibility::Visibility::new(ctx, room, &s.user_id)?;
    let mut chunk = Vec::new();
    let mut next = None;
    for r in &rows {
        let seq = r.int("room_seq").unwrap_or(0);
        if to.is_some_and(|t| if forward { seq >= t } else { seq < t }) {
            break;
        }
        if chunk.len() as i64 == limit {
            next = Some(if forward { format!("t{seq}") } else { format!("t{}", seq + 1) });
            break;
        }
        if visibility.allows(ctx, r)? {
            chunk.push(client_event(r, Some(&s), true));
        }
    }
    let mut out = json!({"chunk": chunk});
    if let Some(n) = next {
        out["next_batch"] = json!(n);
    }
    if ctx.param("from").is_some() {
        out["prev_batch"] = json!(ctx.param("from"));
    }
    ok(out)
}

/// # `GET /_matrix/client/v1/rooms/{roomId}/threads`
pub fn threads_route(ctx: &Ctx, room: &str) -> Result<Reply> {
    let s = ctx.session()?;
    require_member_ever(ctx, room, &s.user_id)?;
    let participated = match ctx.param("include") {
        Some("participated") => true,
        Some("all") | None => false,
        Some(_) => return Err(Error::InvalidParam("include must be all or participated".into())),
    };
    let limit = limit(ctx, DEFAULT_PAGE)?;
    let before = match ctx.param("from") {
        Some(t) => boundary(ctx, room, t)?,
        None => i64::MAX,
    };
    let db = ctx.db()?;
    let mut visibility = super::visibility::Visibility::new(ctx, room, &s.user_id)?;
    let mut chunk = Vec::new();
    let mut next = None;
    let mut cursor = before;
    // Participation filters after the query, so page until enough roots are found.
    'pages: loop {
        let roots = db.query(sql::THREAD_ROOTS, vec![db::t(room), db::i(cursor), db::i(limit + 1)])?;
        if roots.is_empty() {
            break;
        }
        for r in &roots {
            let latest_seq = r.int("latest_seq").unwrap_or(0);
            cursor = latest_seq;
            if chunk.len() as i64 == limit {
                next = Some(format!("t{}", latest_seq + 1));
                break 'pages;
            }
            let root_id = r.str("parent_id");
            let Ok(root) = event_in_room(ctx, room, &root_id) else { continue };
            if !visibility.allows(ctx, &root)? {
                continue;
            }
            let mine = db
                .first(sql::THREAD_REPLIES_BY, vec![db::t(root_id.clone()), db::t(s.user_id.clone())])?
                .and_then(|c| c.int("n"))
                .unwrap_or(0)
                > 0;
            let root_json = client_event(&root, Some(&s), true);
            let participated_here = mine || root_json["sender"].as_str() == Some(s.user_id.as_str());
            if participated && !participated_here {
                continue;
            }
            let latest = db
                .first(
                    sql::RELATIONS_BACK_REL,
                    vec![db::t(root_id.clone()), db::t("m.thread"), db::i(i64::MAX), db::i(1)],
                )?
                .map(|l| client_event(&l, Some(&s), true));
            let mut root_json = root_json;
            root_json["unsigned"]["m.relations"]["m.thread"] = json!({
                "latest_event": latest,
                "count": r.int("replies").unwrap_or(0),
                "current_user_participated": participated_here,
            });
            chunk.push(root_json);
        }
        if (roots.len() as i64) <= limit {
            break;
        }
    }
    let mut out = json!({"chunk": chunk});
    if let Some(n) = next {
        out["next_batch"] = json!(n);
    }
    ok(out)
}

/// # `GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}`
pub fn context_route(ctx: &Ctx, room: &str, event: &str) -> Result<Reply> {
    let s = ctx.session()?;
    require_member_ever(ctx, room, &s.user_id)?;
    let target = event_in_room(ctx, room, event)?;
    let mut visibility = super::visibility::Visibility::new(ctx, room, &s.user_id)?;
    if !visibility.allows(ctx, &target)? {
        return Err(Error::NotFound("no such event in this room".into()));
    }
    let seq = target.int("room_seq").unwrap_or(0);
    let limit = match ctx.param("limit") {
        Some(l) => l.parse::<i64>().map_err(|_| Error::InvalidParam("limit must be a number".into()))?,
        None => 10,
    }
    .clamp(0, MAX_PAGE);
    let filter = super::sync::RoomEventFilter::parse(ctx.param("filter"))?;
    let before_n = limit / 2;
    let after_n = limit - before_n;
    let db = ctx.db()?;
    let before = db.query(sql::EVENTS_BEFORE, vec![db::t(room), db::i(seq), db::i(before_n)])?;
    let after = db.query(sql::EVENTS_AFTER, vec![db::t(room), db::i(seq), db::i(after_n)])?;
    let events_before: Vec<Value> = visibility
        .filter(ctx, &before)?
        .into_iter()
        .map(|r| client_event(r, Some(&s), true))
        .filter(|e| filter.matches(e))
        .collect();
    let events_after: Vec<Value> = visibility
        .filter(ctx, &after)?
        .into_iter()
        .map(|r| client_event(r, Some(&s), true))
        .filter(|e| filter.matches(e))
        .collect();
    let start = before.last().and_then(|r| r.int("room_seq")).unwrap_or(seq);
    let end = after.last().and_then(|r| r.int("room_seq")).map_or(seq + 1, |n| n + 1);
    let all: Vec<Value> = events_before.iter().chain(&events_after).cloned().collect();
    let state = if filter.lazy_load_members {
        let mut with_target = all.clone();
        with_target.push(client_event(&target, Some(&s), true));
        super::rooms::member_events_for(ctx, room, &Value::Array(with_target))?
    } else {
        super::rooms::current_state(ctx, room)?
            .iter()
            .map(|r| {
                let p: Value = serde_json::from_str(&r.str("json")).unwrap_or(Value::Null);
                crate::room::pdu::client_event(&r.str("event_id"), &p, room, true)
            })
            .collect()
    };
    ok(json!({
        "start": format!("t{start}"),
        "end": format!("t{end}"),
        "events_before": events_before,
        "event": client_event(&target, Some(&s), true),
        "events_after": events_after,
        "state": state,
    }))
}
