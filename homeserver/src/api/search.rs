//! # `POST /_matrix/client/v3/search` (room events)
//!
//! No full-text index yet: the statement registry holds only SQL that runs unchanged on SQLite
//! and PostgreSQL, and their text-search features differ. A search scans the searcher's rooms'
//! message, name and topic events newest first, in pages of [`SCAN_PAGE`] rows prefiltered in
//! SQL by the search's longest ASCII word (`LIKE` on the event JSON), at most [`MAX_SCANNED`]
//! rows per request; each candidate is then matched on the requested keys (every word of the
//! term, case-insensitively, as a substring) and on history visibility. `next_batch` is the
//! stream position the scan stopped at, so paging continues where it left off.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::{Value, json};

use super::rooms::client_event;
use super::sync::RoomEventFilter;
use super::visibility::Visibility;
use super::{Ctx, Reply, ok};
use crate::db::{self, Row, sql};
use crate::error::{Error, Result};

/// Candidate rows read per query.
pub const SCAN_PAGE: i64 = 200;
/// Candidate rows one request reads at most before answering with `next_batch`.
pub const MAX_SCANNED: usize = 2_000;
/// Results per request unless the filter says otherwise, and at most.
pub const DEFAULT_LIMIT: usize = 10;
pub const MAX_LIMIT: usize = 100;
/// Context events on each side at most.
pub const MAX_CONTEXT: i64 = 20;

#[derive(Debug, Deserialize)]
struct Body {
    search_categories: Categories,
}

#[derive(Debug, Deserialize)]
struct Categories {
    room_events: Option<RoomEvents>,
}

#[derive(Debug, Deserialize)]
struct RoomEvents {
    search_term: String,
    keys: Option<Vec<String>>,
    #[serde(default)]
    filter: Option<SearchFilter>,
    order_by: Option<String>,
    event_context: Option<EventContext>,
    #[serde(default)]
    include_state: bool,
    groupings: Option<Groupings>,
}

#[derive(Debug, Default, Deserialize)]
struct SearchFilter {
    rooms: Option<Vec<String>>,
    not_rooms: Option<Vec<String>>,
    #[serde(flatten)]
    events: RoomEventFilter,
}

#[derive(Debug, Deserialize)]
struct EventContext {
    before_limit: Option<i64>,
    after_limit: Option<i64>,
    #[serde(default)]
    include_profile: bool,
}

#[derive(Debug, Deserialize)]
struct Groupings {
    #[serde(default)]
    group_by: Vec<Group>,
}

#[derive(Debug, Deserialize)]
struct Group {
    key: String,
}

const KEYS: [&str; 3] = ["content.body", "content.name", "content.topic"];

/// The lower-cased words of a search term.
fn words(term: &str) -> Vec<String> {
    term.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// The `LIKE` pattern that prefilters candidates: the longest ASCII word, or everything when
/// the term has none (SQLite's `LOWER` folds ASCII only).
fn prefilter(words: &[String]) -> String {
    words
        .iter()
        .filter(|w| w.is_ascii())
        .max_by_key(|w| w.len())
        .map_or_else(|| "%".to_owned(), |w| format!("%{w}%"))
}

/// How often the words occur in the event's searched keys; 0 unless every word occurs.
fn score(event: &Value, keys: &[String], words: &[String]) -> usize {
    let texts: Vec<String> = keys
        .iter()
        .filter_map(|k| k.strip_prefix("content."))
        .filter_map(|field| event["content"][field].as_str())
        .map(str::to_lowercase)
        .collect();
    let mut total = 0;
    for w in words {
        let n: usize = texts.iter().map(|t| t.matches(w.as_str()).count()).sum();
        if n == 0 {
            return 0;
        }
        total += n;
    }
    total
}

struct Hit {
    row: Row,
    event: Value,
    rank: usize,
}

pub fn search_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let body: Body = ctx.json()?;
    let Some(q) = body.search_categories.room_events else {
        return ok(json!({"search_categories": {}}));
    };
    let keys = q.keys.unwrap_or_else(|| KEYS.iter().map(|k| (*k).to_owned()).collect());
    if let Some(bad) = keys.iter().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(Error::InvalidParam(format!("unknown search key {bad}")));
    }
    let rank_order = match q.order_by.as_deref() {
        None | Some("rank") => true,
        Some("recent") => false,
        Some(other) => return Err(Error::InvalidParam(format!("unknown order_by {other}"))),
    };
    let words = words(&q.search_term);
    if words.is_empty() {
        return Err(Error::InvalidParam("the search term has no words".into()));
    }
    let filter = q.filter.unwrap_or_default();
    let limit = filter.events.limit.map_or(DEFAULT_LIMIT, |l| usize::try_from(l).unwrap_or(0)).min(MAX_LIMIT);
    let before = match ctx.param("next_batch") {
        Some(t) => t.parse::<i64>().map_err(|_| Error::InvalidParam("malformed next_batch".into()))?,
        None => i64::MAX,
    };
    let wanted = |room: &str| {
        filter.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room))
            && filter.not_rooms.as_ref().is_none_or(|r| !r.iter().any(|x| x == room))
    };

    let db = ctx.db()?;
    let pattern = prefilter(&words);
    let mut visibility: HashMap<String, Visibility> = HashMap::new();
    let mut hits: Vec<Hit> = Vec::new();
    let mut cursor = before;
    let mut scanned = 0;
    let mut more = false;
    while hits.len() < limit {
        let rows = db.query(
            sql::SEARCH_EVENTS,
            vec![db::t(s.user_id.clone()), db::i(cursor), db::t(pattern.clone()), db::i(SCAN_PAGE)],
        )?;
        let page_full = rows.len() as i64 == SCAN_PAGE;
        for row in rows {
            cursor = row.int("stream_pos").unwrap_or(0);
            scanned += 1;
            let room = row.str("room_id");
            let event = client_event(&row, Some(&s), true);
            if !wanted(&room) || !filter.events.matches(&event) {
                continue;
            }
            let rank = score(&event, &keys, &words);
            if rank == 0 {
                continue;
            }
            let v = match visibility.entry(room.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(Visibility::new(ctx, &room, &s.user_id)?)
                }
            };
            if !v.allows(ctx, &row)? {
                continue;
            }
            hits.push(Hit { row, event, rank });
            if hits.len() == limit {
                break;
            }
        }
        if hits.len() == limit || (page_full && scanned >= MAX_SCANNED) {
            more = true;
            break;
        }
        if !page_full {
            break;
        }
    }
    // Every event has a stream position of its own, so the next page starts below the last.
    let next_batch = more.then(|| cursor.to_string());
    if rank_order {
        hits.sort_by_key(|h| std::cmp::Reverse(h.rank));
    }

    let context = q.event_context.map(|c| {
        (
            c.before_limit.unwrap_or(5).clamp(0, MAX_CONTEXT),
            c.after_limit.unwrap_or(5).clamp(0, MAX_CONTEXT),
            c.include_profile,
        )
    });
    let mut results = Vec::with_capacity(hits.len());
    for h in &hits {
        let mut result = json!({"rank": h.rank as f64, "result": h.event});
        if let Some((before_n, after_n, profile)) = context {
            let room = h.row.str("room_id");
            let seq = h.row.int("room_seq").unwrap_or(0);
            let v = visibility.get_mut(&room).ok_or_else(|| Error::Internal("visibility".into()))?;
            let mut before_events = Vec::new();
            for r in db.query(sql::EVENTS_BEFORE, vec![db::t(room.clone()), db::i(seq), db::i(before_n)])? {
                if v.allows(ctx, &r)? {
                    before_events.push(client_event(&r, Some(&s), true));
                }
            }
            let mut after_events = Vec::new();
            for r in db.query(sql::EVENTS_AFTER, vec![db::t(room.clone()), db::i(seq), db::i(after_n)])? {
                if v.allows(ctx, &r)? {
                    after_events.push(client_event(&r, Some(&s), true));
                }
            }
            let mut c = json!({
                "events_before": before_events,
                "events_after": after_events,
                "start": format!("t{}", (seq - before_n).max(1)),
                "end": format!("t{}", seq + after_n + 1),
            });
            if profile {
                let sender = h.row_sender();
                let member = db
                    .first(
                        sql::CURRENT_STATE_ONE,
                        vec![db::t(room.clone()), db::t("m.room.member"), db::t(sender.clone())],
                    )?
                    .and_then(|r| serde_json::from_str::<Value>(&r.str("json")).ok());
                let mut p = serde_json::Map::new();
                if let Some(m) = member {
                    for field in ["displayname", "avatar_url"] {
                        if let Some(v) = m["content"][field].as_str() {
                            p.insert(field.into(), json!(v));
                        }
                    }
                }
                c["profile_info"] = json!({ sender: p });
            }
            result["context"] = c;
        }
        results.push(result);
    }

    let mut out = json!({
        "count": hits.len() + usize::from(more),
        "highlights": words,
        "results": results,
    });
    if let Some(n) = next_batch {
        out["next_batch"] = json!(n);
    }
    if q.include_state {
        let mut state = serde_json::Map::new();
        for room in hits.iter().map(|h| h.row.str("room_id")) {
            if state.contains_key(&room) {
                continue;
            }
            let events: Vec<Value> = super::rooms::current_state(ctx, &room)?
                .iter()
                .map(|r| super::rooms::state_client_event(r, &room))
                .collect();
            state.insert(room, json!(events));
        }
        out["state"] = json!(state);
    }
    if let Some(g) = q.groupings {
        let mut groups = serde_json::Map::new();
        for group in &g.group_by {
            let key = match group.key.as_str() {
                "room_id" | "sender" => group.key.as_str(),
                other => return Err(Error::InvalidParam(format!("unknown group key {other}"))),
            };
            let mut by: serde_json::Map<String, Value> = serde_json::Map::new();
            for h in &hits {
                let value = h.event[key].as_str().unwrap_or_default().to_owned();
                let n = by.len();
                let entry = by.entry(value).or_insert_with(|| json!({"order": n, "results": []}));
                if let Some(list) = entry["results"].as_array_mut() {
                    list.push(h.event["event_id"].clone());
                }
            }
            groups.insert(key.to_owned(), Value::Object(by));
        }
        out["groups"] = Value::Object(groups);
    }
    ok(json!({"search_categories": {"room_events": out}}))
}

impl Hit {
    fn row_sender(&self) -> String {
        self.event["sender"].as_str().unwrap_or_default().to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_and_prefilter() {
        assert_eq!(words("Hello, wörld! 42"), vec!["hello", "wörld", "42"]);
        assert_eq!(prefilter(&words("a lunch-time")), "%lunch%");
        assert_eq!(prefilter(&words("wörld")), "%");
    }

    #[test]
    fn every_word_must_occur() {
        let ev = json!({"content": {"body": "Lunch at noon? lunch!", "name": "x"}});
        let keys = vec!["content.body".to_owned()];
        assert_eq!(score(&ev, &keys, &words("lunch")), 2);
        assert_eq!(score(&ev, &keys, &words("lunch noon")), 3);
        assert_eq!(score(&ev, &keys, &words("lunch dinner")), 0);
        assert_eq!(score(&ev, &["content.name".to_owned()], &words("lunch")), 0);
    }
}
