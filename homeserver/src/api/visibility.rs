//! History visibility: which events of a room a user may see (client-server API, "History
//! visibility"), decided per event from the state after it:
//! 1. `world_readable` at the event: yes;
//! 2. the user was joined at the event: yes;
//! 3. `shared` at the event and the user joined the room at some point after it: yes;
//! 4. `invited` at the event and the user was invited (or joined) at it: yes;
//! 5. otherwise no.
//!
//! "Joined at some point after" is read from the user's current membership: currently joined,
//! or left/banned at or after the event. Events about the user's own membership are always
//! visible to them. Fast path: a room whose visibility never changed from
//! `shared`/`world_readable` shows everything to its current members.

use std::collections::HashMap;

use serde_json::Value;

use super::Ctx;
use crate::db::{self, Row, sql};
use crate::error::Result;

/// Decides visibility for one user in one room, caching state lookups per state group.
pub struct Visibility {
    user: String,
    current: Option<(String, i64)>,
    everything: bool,
    by_group: HashMap<String, (String, String)>,
}

impl std::fmt::Debug for Visibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Visibility").field("user", &self.user).field("everything", &self.everything).finish()
    }
}

fn content_field(ctx: &Ctx, event_id: &str, field: &str) -> Result<Option<String>> {
    Ok(ctx
        .db()?
        .first(sql::EVENT_GET, vec![db::t(event_id)])?
        .and_then(|r| serde_json::from_str::<Value>(&r.str("json")).ok())
        .and_then(|v| v["content"][field].as_str().map(str::to_owned)))
}

impl Visibility {
    pub fn new(ctx: &Ctx, room: &str, user: &str) -> Result<Self> {
        let db = ctx.db()?;
        let membership = db.first(sql::MEMBERSHIP_GET, vec![db::t(room), db::t(user)])?;
        let settings = db.query(sql::HISTORY_VISIBILITY_EVENTS, vec![db::t(room)])?;
        Ok(Self::from_rows(user, membership.as_ref(), &settings))
    }

    /// From rows already read: the user's membership row (`membership`, `room_seq`) and the
    /// room's [`sql::HISTORY_VISIBILITY_EVENTS`].
    pub fn from_rows(user: &str, membership: Option<&Row>, settings: &[Row]) -> Self {
        let current = membership.map(|r| (r.str("membership"), r.int("room_seq").unwrap_or(0)));
        let open = |r: &Row| {
            serde_json::from_str::<Value>(&r.str("json")).is_ok_and(|v| {
                matches!(v["content"]["history_visibility"].as_str(), Some("shared" | "world_readable"))
            })
        };
        let everything = current.as_ref().is_some_and(|(m, _)| m == "join")
            && settings.len() <= 1
            && settings.iter().all(open);
        Self { user: user.to_owned(), current, everything, by_group: HashMap::new() }
    }

    /// `(history_visibility, the user's membership)` in the state after the event.
    fn at(&mut self, ctx: &Ctx, group: &str) -> Result<(String, String)> {
        if let Some(v) = self.by_group.get(group) {
            return Ok(v.clone());
        }
        let db = ctx.db()?;
        let lookup = |kind: &str, key: &str| -> Result<Option<String>> {
            Ok(db
                .first(sql::STATE_AT_KEY, vec![db::t(group), db::t(kind), db::t(key)])?
                .map(|r| r.str("event_id")))
        };
        let vis = match lookup("m.room.history_visibility", "")? {
            Some(id) => content_field(ctx, &id, "history_visibility")?.unwrap_or_else(|| "shared".into()),
            None => "shared".into(),
        };
        let membership = match lookup("m.room.member", &self.user)? {
            Some(id) => content_field(ctx, &id, "membership")?.unwrap_or_else(|| "leave".into()),
            None => "leave".into(),
        };
        self.by_group.insert(group.to_owned(), (vis.clone(), membership.clone()));
        Ok((vis, membership))
    }

    /// Whether the user may see this event row (`state_group`, `room_seq` columns).
    pub fn allows(&mut self, ctx: &Ctx, row: &Row) -> Result<bool> {
        if self.everything {
            return Ok(true);
        }
        let Some(group) = row.text("state_group") else { return Ok(false) };
        // Events about the user's own membership are always theirs to see.
        if let Ok(v) = serde_json::from_str::<Value>(&row.str("json"))
            && v["type"] == "m.room.member"
            && v["state_key"].as_str() == Some(self.user.as_str())
        {
            return Ok(true);
        }
        let (vis, membership) = self.at(ctx, &group)?;
        let seq = row.int("room_seq").unwrap_or(0);
        let joined_later = match &self.current {
            Some((m, _)) if m == "join" => true,
            // Up to and including the leave itself.
            Some((m, at)) if m == "leave" || m == "ban" => *at >= seq,
            _ => false,
        };
        Ok(match vis.as_str() {
            "world_readable" => true,
            _ if membership == "join" => true,
            "shared" => joined_later,
            "invited" => membership == "invite",
            _ => false,
        })
    }

    /// The rows the user may see, in order.
    pub fn filter<'a>(&mut self, ctx: &Ctx, rows: &'a [Row]) -> Result<Vec<&'a Row>> {
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            if self.allows(ctx, r)? {
                out.push(r);
            }
        }
        Ok(out)
    }
}
