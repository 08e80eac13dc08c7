//! Sync v2 (`GET /sync`): initial and incremental, with long-polling through park-and-signal.
//!
//! A since token is `s<pos>`, a position of the one stream that orders every event and
//! account-data change. Positions are taken inside the transaction that writes what they
//! order, under a row lock, so they become visible in order: once `pos` is visible, nothing at
//! or below it can still appear, and `next_batch` (the stream head read first) never skips.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{Value, json};

use super::{Ctx, Reply, Session};
use crate::db::{self, Bound, Db, Row, bound, sql};
use crate::error::{Error, Result};
use crate::room::pdu;

/// Unread events evaluated per room for notification counts; clients show "99+" anyway.
pub const MAX_COUNTED_UNREAD: i64 = 200;
/// A sync that evaluated at least this many unread events in a room keeps its counts
/// (`unread_counts`), so the next syncs evaluate only the events after them.
pub const KEEP_COUNTS_AFTER: i64 = 16;

/// Timeline events per room when the filter does not say.
pub const DEFAULT_TIMELINE_LIMIT: i64 = 10;
pub const MAX_TIMELINE_LIMIT: i64 = 500;

pub fn parse_since(token: &str) -> Result<i64> {
    token
        .strip_prefix('s')
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| Error::InvalidParam("malformed since token".into()))
}

/// The parts of a room event filter this server applies.
#[derive(Debug, Default, Deserialize)]
pub struct RoomEventFilter {
    pub limit: Option<i64>,
    pub types: Option<Vec<String>>,
    pub not_types: Option<Vec<String>>,
    pub senders: Option<Vec<String>>,
    pub not_senders: Option<Vec<String>>,
    #[serde(default)]
    pub lazy_load_members: bool,
}

fn type_matches(pattern: &str, kind: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => kind.starts_with(prefix),
        None => pattern == kind,
    }
}

impl RoomEventFilter {
    pub fn parse(text: Option<&str>) -> Result<Self> {
        match text {
            None => Ok(Self::default()),
            Some(t) => serde_json::from_str(t).map_err(|e| Error::BadJson(format!("filter: {e}"))),
        }
    }

    pub fn matches(&self, ev: &Value) -> bool {
        let kind = ev["type"].as_str().unwrap_or_default();
        let sender = ev["sender"].as_str().unwrap_or_default();
        self.types.as_ref().is_none_or(|t| t.iter().any(|p| type_matches(p, kind)))
            && self.not_types.as_ref().is_none_or(|t| !t.iter().any(|p| type_matches(p, kind)))
            && self.senders.as_ref().is_none_or(|s| s.iter().any(|x| x == sender))
            && self.not_senders.as_ref().is_none_or(|s| !s.iter().any(|x| x == sender))
    }
}

#[derive(Debug, Default, Deserialize)]
struct RoomFilter {
    #[serde(default)]
    timeline: RoomEventFilter,
    #[serde(default)]
    state: RoomEventFilter,
    rooms: Option<Vec<String>>,
    not_rooms: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct Filter {
    #[serde(default)]
    room: RoomFilter,
}

/// The `filter` parameter's id when it names a stored filter (not inline JSON): sync reads it
/// with the user's other data, in the same batch.
fn stored_filter_id(ctx: &Ctx) -> Option<&str> {
    ctx.param("filter").filter(|f| !f.trim_start().starts_with('{'))
}

/// The sync's filter: none, inline JSON, or the stored filter's [`sql::FILTER_GET`] rows.
fn parse_filter(ctx: &Ctx, stored: Option<&[Row]>) -> Result<Filter> {
    let text = match (ctx.param("filter"), stored) {
        (None, _) => return Ok(Filter::default()),
        (Some(_), Some(rows)) => {
            rows.first().map(|r| r.str("json")).ok_or_else(|| Error::NotFound("no such filter".into()))?
        }
        (Some(inline), None) => inline.to_owned(),
    };
    filter_from_json(&text)
}

fn filter_from_json(text: &str) -> Result<Filter> {
    serde_json::from_str(text).map_err(|e| Error::BadJson(format!("filter: {e}")))
}

/// A room state: `(type, state_key)` → (event id, PDU JSON).
type StateWithJson = BTreeMap<(String, String), (String, String)>;

/// The state of a room at a state group, with each event's JSON (one query).
fn state_at_group(ctx: &Ctx, group: &str) -> Result<StateWithJson> {
    let mut state = BTreeMap::new();
    for r in ctx.db()?.query(sql::STATE_AT, vec![db::t(group)])? {
        state.insert((r.str("type"), r.str("state_key")), (r.str("event_id"), r.str("json")));
    }
    Ok(state)
}

/// The room's state just before its event number `seq`.
fn state_before(ctx: &Ctx, room: &str, seq: i64) -> Result<StateWithJson> {
    let prev = ctx.db()?.first(sql::EVENT_AT_SEQ, vec![db::t(room), db::i(seq - 1)])?;
    match prev.and_then(|r| r.text("state_group")) {
        Some(g) => state_at_group(ctx, &g),
        None => Ok(BTreeMap::new()),
    }
}

struct RoomSync {
    timeline: Vec<Value>,
    limited: bool,
    prev_batch: String,
    state: Vec<Value>,
}

/// The timeline limit of a filter, within the server's bounds.
fn timeline_limit(filter: &RoomFilter) -> i64 {
    filter.timeline.limit.unwrap_or(DEFAULT_TIMELINE_LIMIT).clamp(1, MAX_TIMELINE_LIMIT)
}

/// The statement that reads a room's timeline for [`room_sync`].
fn events_since(room: &str, since: i64, upto: i64, filter: &RoomFilter) -> Bound {
    bound(sql::EVENTS_SINCE, vec![db::t(room), db::i(since), db::i(upto), db::i(timeline_limit(filter) + 1)])
}

/// What sync read about a joined room ahead, in batches for all rooms at once.
#[derive(Default)]
struct Prefetched {
    /// [`sql::HISTORY_VISIBILITY_EVENTS`], when the room had timeline events.
    visibility: Option<Vec<Row>>,
    /// What push rules need of the room ([`PushState`]), when another user's event may count
    /// as unread.
    push: Option<PushState>,
    /// [`sql::EVENTS_AFTER`] the counts kept by an earlier sync, or the user's read marker
    /// (or their join).
    unread: Vec<Row>,
    /// The counts kept for the events before `unread` (all zero when none were).
    kept: Counts,
}

/// What push rules need of a room's current state for one user: [`sql::PUSH_STATE`]'s rows and
/// [`sql::ROOM_JOINED_COUNT`].
#[derive(Default)]
struct PushState {
    rows: Vec<Row>,
    joined: u64,
}

impl PushState {
    fn statements(room: &str, user: &str) -> [Bound; 2] {
        [
            bound(sql::PUSH_STATE, vec![db::t(room), db::t(user)]),
            bound(sql::ROOM_JOINED_COUNT, vec![db::t(room)]),
        ]
    }

    fn from_rows(rows: Vec<Row>, count: &[Row]) -> Self {
        let joined = count.first().and_then(|r| r.int("n")).and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
        Self { rows, joined }
    }
}

/// Unread counts over the events after `from` (the read marker, or the join) up to `upto`:
/// `counted` events, under the push rules tagged `rules`.
#[derive(Default, Clone, PartialEq, Debug)]
struct Counts {
    from: i64,
    upto: i64,
    rules: String,
    counted: i64,
    notify: u64,
    highlight: u64,
}

impl Counts {
    /// A row of [`sql::UNREAD_COUNTS_GET`], when it still holds for `from` and `rules`.
    fn kept(row: Option<&Row>, from: i64, rules: &str) -> Option<Self> {
        let r = row?;
        let c = Self {
            from: r.int("from_seq")?,
            upto: r.int("upto_seq")?,
            rules: r.str("rules_tag"),
            counted: r.int("counted")?,
            notify: u64::try_from(r.int("notify")?).ok()?,
            highlight: u64::try_from(r.int("highlight")?).ok()?,
        };
        (c.from == from && c.rules == rules && c.upto >= from && c.counted <= MAX_COUNTED_UNREAD).then_some(c)
    }

    /// These counts and the outcome of the events after them, `rows` (in room order).
    fn then(&self, rows: &[Row], (notify, highlight): (u64, u64)) -> Self {
        Self {
            from: self.from,
            upto: rows.last().and_then(|r| r.int("room_seq")).unwrap_or(self.upto),
            rules: self.rules.clone(),
            counted: self.counted + rows.len() as i64,
            notify: self.notify + notify,
            highlight: self.highlight + highlight,
        }
    }
}

/// A tag of the user's push rules (their account data row): counts kept under other rules are
/// not reused.
fn rules_tag(row: Option<&Row>) -> String {
    format!("{:016x}", crate::util::fnv1a(row.map(|r| r.str("content")).unwrap_or_default().as_bytes()))
}

/// Timeline and state of one room from its [`events_since`] rows; the timeline ends at `upto`.
/// The room's history visibility rows are used when read ahead, else read here; `membership` is
/// the user's row of [`sql::USER_MEMBERSHIPS`].
#[allow(clippy::too_many_arguments, reason = "the reads sync made ahead, passed as they are")]
fn room_sync(
    ctx: &Ctx,
    s: &Session,
    room: &str,
    rows: Vec<Row>,
    upto: i64,
    filter: &RoomFilter,
    full_state: bool,
    (membership, visibility): (Option<&Row>, Option<&[Row]>),
) -> Result<RoomSync> {
    let limit = timeline_limit(filter);
    let limited = rows.len() as i64 > limit;
    let page: Vec<Row> = rows.into_iter().take(limit as usize).collect();
    let mut kept: Vec<&Row> = match visibility {
        _ if page.is_empty() => Vec::new(),
        Some(settings) => {
            super::visibility::Visibility::from_rows(&s.user_id, membership, settings).filter(ctx, &page)?
        }
        None => super::visibility::Visibility::new(ctx, room, &s.user_id)?.filter(ctx, &page)?,
    };
    kept.reverse();
    let first_seq = kept.first().and_then(|r| r.int("room_seq"));
    let timeline: Vec<Value> = kept
        .iter()
        .map(|r| super::rooms::client_event(r, Some(s), false))
        .filter(|e| filter.timeline.matches(e))
        .collect();
    // With no timeline, the sync position itself is the token (`/messages` accepts it).
    let prev_batch = first_seq.map_or_else(|| format!("s{upto}"), |seq| format!("t{seq}"));
    let mut state = Vec::new();
    if full_state || limited {
        let map = match first_seq {
            Some(seq) => state_before(ctx, room, seq)?,
            None => state_map(&super::rooms::current_state(ctx, room)?),
        };
        let in_timeline: std::collections::HashSet<&str> =
            timeline.iter().filter_map(|e| e["event_id"].as_str()).collect();
        let lazy = filter.state.lazy_load_members;
        let senders: std::collections::HashSet<&str> =
            timeline.iter().filter_map(|e| e["sender"].as_str()).chain([s.user_id.as_str()]).collect();
        state = map
            .into_iter()
            .filter(|((t, k), (id, _))| {
                !in_timeline.contains(id.as_str())
                    && (!lazy || t != "m.room.member" || senders.contains(k.as_str()))
            })
            .map(|(_, (id, json))| {
                let p: Value = serde_json::from_str(&json).unwrap_or(Value::Null);
                pdu::client_event(&id, &p, room, false)
            })
            .filter(|e| filter.state.matches(e))
            .collect();
    }
    Ok(RoomSync { timeline, limited, prev_batch, state })
}

fn state_map(rows: &[Row]) -> StateWithJson {
    rows.iter().map(|r| ((r.str("type"), r.str("state_key")), (r.str("event_id"), r.str("json")))).collect()
}

fn stripped_state(ctx: &Ctx, room: &str, invite_event: &str) -> Result<Vec<Value>> {
    const KEEP: [&str; 6] = [
        "m.room.create",
        "m.room.join_rules",
        "m.room.name",
        "m.room.canonical_alias",
        "m.room.avatar",
        "m.room.encryption",
    ];
    let mut out = Vec::new();
    for r in super::rooms::current_state(ctx, room)? {
        let kind = r.str("type");
        if KEEP.contains(&kind.as_str()) || r.str("event_id") == invite_event {
            let p: Value = serde_json::from_str(&r.str("json")).unwrap_or(Value::Null);
            out.push(json!({"type": kind, "state_key": r.str("state_key"), "sender": p["sender"], "content": p["content"]}));
        }
    }
    Ok(out)
}

/// Notification and highlight counts: of `rows`, the events after the user's read receipt (or
/// their join), those that the push rules say notify. What they need of the room's state is read
/// here unless it was read ahead.
fn unread_counts(
    ctx: &Ctx,
    s: &Session,
    rules: &ruma::push::Ruleset,
    room: &str,
    version: &str,
    rows: &[Row],
    push: Option<&PushState>,
) -> Result<(u64, u64)> {
    if rows.iter().all(|r| pdu_sender(r) == s.user_id) {
        return Ok((0, 0));
    }
    let read_here;
    let push = match push {
        Some(p) => p,
        None => {
            let mut read = ctx.db()?.read_batch(&PushState::statements(room, &s.user_id))?.into_iter();
            let rows = read.next().unwrap_or_default();
            read_here = PushState::from_rows(rows, &read.next().unwrap_or_default());
            &read_here
        }
    };
    let state = &push.rows;
    let content = |t: &str, k: &str| {
        state
            .iter()
            .find(|r| r.str("type") == t && r.str("state_key") == k)
            .and_then(|r| serde_json::from_str::<Value>(&r.str("json")).ok())
    };
    let member_count = push.joined;
    let display_name = content("m.room.member", &s.user_id)
        .and_then(|p| p["content"]["displayname"].as_str().map(str::to_owned))
        .unwrap_or_else(|| {
            s.user_id.trim_start_matches('@').split(':').next().unwrap_or_default().to_owned()
        });
    let create = content("m.room.create", "");
    let mut creators: Vec<String> =
        create.iter().filter_map(|c| c["sender"].as_str().map(str::to_owned)).collect();
    if let Some(extra) = create.as_ref().and_then(|c| c["content"]["additional_creators"].as_array()) {
        creators.extend(extra.iter().filter_map(|v| v.as_str().map(str::to_owned)));
    }
    let facts = crate::push::RoomFacts {
        room_id: room.to_owned(),
        member_count,
        display_name,
        power_levels: content("m.room.power_levels", "").map(|p| p["content"].clone()),
        version: version.to_owned(),
        creators,
    };
    let evaluator = crate::push::Evaluator::new(&s.user_id, &facts, rules.clone());
    let (mut notify, mut highlight) = (0, 0);
    for r in rows {
        let ev = super::rooms::client_event(r, None, true);
        let o = evaluator.evaluate(&ev);
        notify += u64::from(o.notify);
        highlight += u64::from(o.highlight);
    }
    Ok((notify, highlight))
}

fn pdu_sender(r: &Row) -> String {
    serde_json::from_str::<Value>(&r.str("json"))
        .ok()
        .and_then(|p| p["sender"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The `m.typing` and `m.receipt` events of one room for this sync.
fn ephemeral(s: &Session, room: &str, since: Option<i64>, typing: &[Row], receipts: &[Row]) -> Vec<Value> {
    let now = crate::util::now_ms() as i64;
    let mut out = Vec::new();
    let in_room: Vec<&Row> = typing.iter().filter(|r| r.str("room_id") == room).collect();
    let changed = in_room.iter().any(|r| since.is_none_or(|s| r.int("stream_pos").unwrap_or(0) > s));
    if changed {
        let users: Vec<String> = in_room
            .iter()
            .filter(|r| r.int("expires_ms").unwrap_or(0) > now)
            .map(|r| r.str("user_id"))
            .collect();
        if since.is_some() || !users.is_empty() {
            out.push(json!({"type": "m.typing", "content": {"user_ids": users}}));
        }
    }
    let mut content = serde_json::Map::new();
    for r in receipts.iter().filter(|r| r.str("room_id") == room) {
        let kind = r.str("receipt_type");
        let user = r.str("user_id");
        if kind == "m.read.private" && user != s.user_id {
            continue;
        }
        let mut receipt = json!({"ts": r.int("ts").unwrap_or(0)});
        let thread = r.str("thread_id");
        if !thread.is_empty() {
            receipt["thread_id"] = json!(thread);
        }
        let by_event = content.entry(r.str("event_id")).or_insert_with(|| json!({}));
        by_event[kind.as_str()][user.as_str()] = receipt;
    }
    if !content.is_empty() {
        out.push(json!({"type": "m.receipt", "content": content}));
    }
    out
}

/// Reads ahead what the joined rooms' sections need, in at most three batches whatever the
/// number of rooms (one round trip each on PostgreSQL, where a batch is pipelined): every
/// room's timeline; then, for the rooms with something to report, history visibility (when
/// there are timeline events), the read marker, the counts an earlier sync kept and, when
/// another user's event is in the timeline, what push rules need of the state; then the events
/// not counted yet after each read marker, for the unread counts (no batch when every count is
/// kept). A user in few rooms ([`EARLY_MARKERS_MAX_ROOMS`]) gets the read markers and kept
/// counts with the timelines and the events to count in the second batch: two batches.
struct ReadAhead<'a> {
    since: Option<i64>,
    since_pos: i64,
    upto: i64,
    full_state: bool,
    filter: &'a RoomFilter,
    /// [`rules_tag`] of the user's push rules.
    rules: &'a str,
}

type Timelines = std::collections::HashMap<String, Vec<Row>>;

/// A user in at most this many rooms gets the read markers and kept counts read with the
/// timelines, so the events to count are read in the second batch and no third is needed
/// (a woken `/sync` makes one D1 call fewer). With more rooms it would read them for rooms
/// with nothing to report; they are then read in the second batch for the rooms that report.
pub const EARLY_MARKERS_MAX_ROOMS: usize = 8;

/// Where one room's reads are in [`ReadAhead`]'s second batch.
struct SecondReads {
    visibility: Option<usize>,
    counts: CountsRead,
    /// [`PushState::statements`].
    push_state: Option<(usize, usize)>,
}

/// How a room's unread counts are read: the marker and kept counts came with the timelines
/// and the events to count are in the second batch, or all of it comes later.
enum CountsRead {
    Early { kept: Counts, unread: Option<usize> },
    Late { read: usize, kept: usize },
}

/// [`ReadAhead`]'s first batch: each room's timeline, and for few rooms the read markers and
/// kept counts too.
fn first_reads(user: &str, rooms: &[String], since_pos: i64, upto: i64, filter: &RoomFilter) -> Vec<Bound> {
    let mut statements: Vec<Bound> = rooms.iter().map(|r| events_since(r, since_pos, upto, filter)).collect();
    if rooms.len() <= EARLY_MARKERS_MAX_ROOMS {
        for r in rooms {
            statements.push(bound(sql::READ_UP_TO, vec![db::t(r.as_str()), db::t(user)]));
            statements.push(bound(sql::UNREAD_COUNTS_GET, vec![db::t(user), db::t(r.as_str())]));
        }
    }
    statements
}

impl ReadAhead<'_> {
    /// `room_rows`: account data, typing and receipt rows, each with a `room_id`: a room with
    /// one of these has something to report even without timeline events.
    /// `first`: the results of [`first_reads`] for exactly these rooms, when the caller read
    /// them ahead.
    fn run(
        &self,
        ctx: &Ctx,
        s: &Session,
        joined: &[&Row],
        room_rows: [&[Row]; 3],
        first: Option<Vec<Vec<Row>>>,
    ) -> Result<(Timelines, std::collections::HashMap<String, Prefetched>)> {
        let db = ctx.db()?;
        let user = s.user_id.as_str();
        let rooms: Vec<String> = joined.iter().map(|m| m.str("room_id")).collect();
        let early = rooms.len() <= EARLY_MARKERS_MAX_ROOMS;
        let mut first = match first {
            Some(rows) => rows,
            None => db.read_batch(&first_reads(user, &rooms, self.since_pos, self.upto, self.filter))?,
        }
        .into_iter();
        let timelines: Timelines = rooms.iter().cloned().zip(first.by_ref().take(rooms.len())).collect();
        let mut markers: std::collections::HashMap<&str, (Vec<Row>, Vec<Row>)> =
            std::collections::HashMap::new();
        if early {
            for r in &rooms {
                let read = first.next().unwrap_or_default();
                markers.insert(r.as_str(), (read, first.next().unwrap_or_default()));
            }
        }
        // The counts kept for a room, when they still hold for its read marker (or join) and
        // the push rules; else nothing counted yet.
        let counts_from = |m: &Row, read: &[Row], kept: &[Row]| {
            let marker = read.first().and_then(|r| r.int("seq")).unwrap_or(0);
            let from = marker.max(m.int("room_seq").unwrap_or(0));
            Counts::kept(kept.first(), from, self.rules).unwrap_or_else(|| Counts {
                from,
                upto: from,
                rules: self.rules.to_owned(),
                ..Counts::default()
            })
        };
        let events_after = |room: &str, kept: &Counts| {
            (kept.counted < MAX_COUNTED_UNREAD).then(|| {
                bound(
                    sql::EVENTS_AFTER,
                    vec![db::t(room), db::i(kept.upto), db::i(MAX_COUNTED_UNREAD - kept.counted)],
                )
            })
        };

        let reports = |m: &Row, room: &str| {
            self.since.is_none()
                || self.full_state
                || m.int("stream_pos").unwrap_or(0) > self.since_pos
                || timelines.get(room).is_some_and(|t| !t.is_empty())
                || room_rows.iter().any(|rows| rows.iter().any(|r| r.str("room_id") == room))
        };
        let candidates: Vec<(&Row, &String)> =
            joined.iter().zip(&rooms).filter(|(m, room)| reports(m, room)).map(|(m, r)| (*m, r)).collect();
        // Per candidate: which of its reads are in the batch, by position.
        let mut statements = Vec::new();
        let mut at: Vec<SecondReads> = Vec::new();
        for (m, room) in &candidates {
            let events = timelines.get(*room).map(Vec::as_slice).unwrap_or_default();
            let mut push = |b: Bound| {
                statements.push(b);
                statements.len() - 1
            };
            let visibility = (!events.is_empty())
                .then(|| push(bound(sql::HISTORY_VISIBILITY_EVENTS, vec![db::t(room.as_str())])));
            let counts = match markers.remove(room.as_str()) {
                Some((read, kept)) => {
                    let kept = counts_from(m, &read, &kept);
                    let unread = events_after(room, &kept).map(&mut push);
                    CountsRead::Early { kept, unread }
                }
                None => CountsRead::Late {
                    read: push(bound(sql::READ_UP_TO, vec![db::t(room.as_str()), db::t(user)])),
                    kept: push(bound(sql::UNREAD_COUNTS_GET, vec![db::t(user), db::t(room.as_str())])),
                },
            };
            let push_state = events.iter().any(|r| pdu_sender(r) != s.user_id).then(|| {
                let [rows, count] = PushState::statements(room, user);
                (push(rows), push(count))
            });
            at.push(SecondReads { visibility, counts, push_state });
        }
        let mut second: Vec<Option<Vec<Row>>> = db.read_batch(&statements)?.into_iter().map(Some).collect();
        let mut take = |i: usize| second.get_mut(i).and_then(Option::take).unwrap_or_default();
        let mut unread_reads = Vec::new();
        let mut unread_rooms = Vec::new();
        let mut prefetched = std::collections::HashMap::new();
        for ((m, room), SecondReads { visibility, counts, push_state }) in candidates.iter().zip(at) {
            let (kept, unread) = match counts {
                CountsRead::Early { kept, unread } => (kept, unread.map(&mut take).unwrap_or_default()),
                CountsRead::Late { read, kept } => {
                    let kept = counts_from(m, &take(read), &take(kept));
                    if let Some(b) = events_after(room, &kept) {
                        unread_reads.push(b);
                        unread_rooms.push((*room).clone());
                    }
                    (kept, Vec::new())
                }
            };
            let ahead = Prefetched {
                visibility: visibility.map(&mut take),
                push: push_state.map(|(rows, count)| PushState::from_rows(take(rows), &take(count))),
                unread,
                kept,
            };
            prefetched.insert((*room).clone(), ahead);
        }
        if !unread_reads.is_empty() {
            for (room, unread) in unread_rooms.iter().zip(db.read_batch(&unread_reads)?) {
                if let Some(p) = prefetched.get_mut(room) {
                    p.unread = unread;
                }
            }
        }
        Ok((timelines, prefetched))
    }
}

/// # `GET /_matrix/client/v3/sync`
pub fn sync_route(ctx: &Ctx) -> Result<Reply> {
    // Woken from a park: the session comes from the note and is confirmed in the user batch.
    if let Some(noted) = ctx.noted_session()
        && let Some(reply) = sync(ctx, Some(noted))?
    {
        return Ok(reply);
    }
    sync(ctx, None)?.ok_or_else(|| Error::Internal("a sync without a note did not answer".into()))
}

/// One `/sync`. With `noted` (see [`Ctx::noted_session`]) the token's row is read in the user
/// batch, and so are the timelines of the rooms the parked run saw (when few): a woken sync
/// makes two D1 calls fewer. `None` back means the schema was not current, and the caller
/// starts over without the note.
fn sync(ctx: &Ctx, noted: Option<(Session, Value)>) -> Result<Option<Reply>> {
    let (s, note, noted_db) = match noted {
        Some((s, note)) => (s, note, Some(Db::open()?)),
        None => (ctx.session()?, Value::Null, None),
    };
    let since = ctx.param("since").map(parse_since).transpose()?;
    let timeout = match ctx.param("timeout") {
        Some(t) => t.parse::<u64>().map_err(|_| Error::InvalidParam("timeout must be a number".into()))?,
        None => 0,
    }
    .min(ctx.settings.max_sync_timeout_ms);
    let full_state = ctx.param("full_state") == Some("true");
    let woken_by_timeout = ctx.req.header("lattice-wake").as_deref() == Some("timeout");
    let since_pos = since.unwrap_or(0);
    // The stream head and everything else this sync reads about the user, in one call. The
    // batch is one snapshot, and every row's position comes from the stream counter a writer
    // bumps in its own transaction (a later writer waits for the earlier one's commit), so no
    // row in the snapshot is past its head: reading "up to the end" reads up to the head.
    let user = s.user_id.as_str();
    let since_upto = |upto: i64| {
        vec![
            bound(sql::ACCOUNT_DATA_SINCE, vec![db::t(user), db::i(since_pos), db::i(upto)]),
            bound(sql::RECEIPTS_FOR_USER, vec![db::t(user), db::i(since_pos), db::i(upto)]),
            bound(sql::PRESENCE_FOR_USER, vec![db::t(user), db::t(user), db::i(since_pos), db::i(upto)]),
        ]
    };
    let mut statements = vec![
        bound(sql::STREAM_MAX, vec![]),
        super::keys::sync_query(user, &s.device_id, since, i64::MAX),
        bound(sql::USER_MEMBERSHIPS, vec![db::t(user)]),
        bound(sql::TYPING_FOR_USER, vec![db::t(user)]),
        bound(sql::ACCOUNT_DATA_GET, super::account::ruleset_params(user)),
    ];
    statements.extend(since_upto(i64::MAX));
    // A stored filter never changes, so the parked run's copy of its JSON serves the re-run.
    let stored_filter = stored_filter_id(ctx);
    let noted_filter = stored_filter
        .filter(|id| note.pointer("/filter/id").and_then(Value::as_str) == Some(id))
        .and_then(|_| note.pointer("/filter/json").and_then(Value::as_str).map(str::to_owned));
    let early_filter = match (stored_filter, &noted_filter) {
        (None, _) => Some(parse_filter(ctx, None)?),
        (Some(_), Some(text)) => Some(filter_from_json(text)?),
        (Some(id), None) => {
            statements.push(bound(sql::FILTER_GET, vec![db::t(user), db::t(id)]));
            None
        }
    };
    // The rooms the parked run saw: their first reads ride in this batch. They read "up to the
    // end", which in this snapshot is up to the head read with them.
    let noted_rooms: Option<Vec<String>> = note
        .get("rooms")
        .and_then(|r| serde_json::from_value(r.clone()).ok())
        .filter(|r: &Vec<String>| r.len() <= EARLY_MARKERS_MAX_ROOMS);
    let ahead_reads = match (&noted_rooms, &early_filter) {
        (Some(rooms), Some(f)) => first_reads(user, rooms, since_pos, i64::MAX, &f.room),
        _ => Vec::new(),
    };
    let ahead_count = ahead_reads.len();
    statements.extend(ahead_reads);
    let (mut results, mut ahead) = match noted_db {
        Some(db) => {
            statements.push(bound(sql::TOKEN_LOOKUP_VERSIONED, vec![db::t(s.token_hash.as_str())]));
            // An error here may be a schema that changed while the request was parked: the
            // usual path migrates, then says what is wrong.
            let Ok(mut results) = db.read_batch(&statements) else { return Ok(None) };
            let token = results.pop().unwrap_or_default();
            if !ctx.confirm_noted(db, &s, token.first())? {
                return Ok(None);
            }
            let ahead = results.split_off(results.len().saturating_sub(ahead_count));
            (results.into_iter(), (ahead_count > 0).then_some(ahead))
        }
        None => (ctx.db()?.read_batch(&statements)?.into_iter(), None),
    };
    let db = ctx.db()?;
    let mut next = || results.next().unwrap_or_default();
    let mut upto = next().first().and_then(|r| r.int("pos")).unwrap_or(0);
    let (e2ee_rows, memberships, typing, push_rules) = (next(), next(), next(), next());
    let (mut room_data, mut receipts, mut presence_rows) = (next(), next(), next());
    let stored_rows = early_filter.is_none().then(next);
    let filter_json = noted_filter.or_else(|| stored_rows.as_ref()?.first().map(|r| r.str("json")));
    let filter = match early_filter {
        Some(f) => f,
        None => parse_filter(ctx, stored_rows.as_deref())?,
    };
    // To-device messages first: when there are more than one sync carries, everything else
    // stops where they stop, so the next since token acknowledges only what was delivered.
    let e2ee = super::keys::for_sync(user, &s.device_id, since, &e2ee_rows)?;
    if let Some(stop) = e2ee.stop {
        upto = stop;
        // Read past the new end: read again.
        ahead = None;
        let mut again = db.read_batch(&since_upto(upto))?.into_iter();
        let mut next = || again.next().unwrap_or_default();
        (room_data, receipts, presence_rows) = (next(), next(), next());
    }
    let rules = super::account::ruleset_from(user, push_rules.first())?;
    let tag = rules_tag(push_rules.first());
    let presence: Vec<Value> = presence_rows
        .iter()
        .map(|r| json!({"type": "m.presence", "sender": r.str("user_id"), "content": super::ephemeral::presence_content(r)}))
        .collect();
    let wanted = |room: &str| {
        filter.room.rooms.as_ref().is_none_or(|r| r.iter().any(|x| x == room))
            && filter.room.not_rooms.as_ref().is_none_or(|r| !r.iter().any(|x| x == room))
    };
    let (mut join, mut invite, mut leave, mut knock) =
        (serde_json::Map::new(), serde_json::Map::new(), serde_json::Map::new(), serde_json::Map::new());
    let mut park_keys = vec![format!("user:{}", s.user_id)];
    let mut joined: Vec<&Row> =
        memberships.iter().filter(|m| m.str("membership") == "join" && wanted(&m.str("room_id"))).collect();
    // In one order from run to run, so a re-run can tell it reads for the same rooms.
    joined.sort_by_cached_key(|m| m.str("room_id"));
    let reads = ReadAhead { since, since_pos, upto, full_state, filter: &filter.room, rules: &tag };
    let mut keep = Vec::new();
    let joined_ids: Vec<String> = joined.iter().map(|m| m.str("room_id")).collect();
    // Read ahead for other rooms than the user is in now: read again.
    let ahead = ahead.filter(|_| noted_rooms.as_ref() == Some(&joined_ids));
    let (mut timelines, mut prefetched) =
        reads.run(ctx, &s, &joined, [room_data.as_slice(), typing.as_slice(), receipts.as_slice()], ahead)?;
    for m in &memberships {
        let room = m.str("room_id");
        if !wanted(&room) {
            continue;
        }
        let changed_at = m.int("stream_pos").unwrap_or(0);
        let membership = m.str("membership");
        match membership.as_str() {
            "join" => {
                park_keys.push(format!("room:{room}"));
                let newly = since.is_none() || changed_at > since_pos;
                let ahead = prefetched.remove(&room).unwrap_or_default();
                let rs = room_sync(
                    ctx,
                    &s,
                    &room,
                    timelines.remove(&room).unwrap_or_default(),
                    upto,
                    &filter.room,
                    full_state || newly,
                    (Some(m), ahead.visibility.as_deref()),
                )?;
                let account: Vec<Value> = room_data
                    .iter()
                    .filter(|r| r.str("room_id") == room)
                    .map(|r| json!({"type": r.str("type"), "content": serde_json::from_str::<Value>(&r.str("content")).unwrap_or_default()}))
                    .collect();
                let ephemeral = ephemeral(&s, &room, since.filter(|_| !newly), &typing, &receipts);
                if since.is_some()
                    && !newly
                    && rs.timeline.is_empty()
                    && rs.state.is_empty()
                    && account.is_empty()
                    && ephemeral.is_empty()
                    && !full_state
                {
                    continue;
                }
                let counts = ahead.kept.then(
                    &ahead.unread,
                    unread_counts(
                        ctx,
                        &s,
                        &rules,
                        &room,
                        &m.str("room_version"),
                        &ahead.unread,
                        ahead.push.as_ref(),
                    )?,
                );
                if counts.counted - ahead.kept.counted >= KEEP_COUNTS_AFTER {
                    keep.push(bound(
                        sql::UNREAD_COUNTS_PUT,
                        vec![
                            db::t(user),
                            db::t(room.as_str()),
                            db::i(counts.from),
                            db::i(counts.upto),
                            db::t(counts.rules.as_str()),
                            db::i(counts.counted),
                            db::i(i64::try_from(counts.notify).unwrap_or(i64::MAX)),
                            db::i(i64::try_from(counts.highlight).unwrap_or(i64::MAX)),
                        ],
                    ));
                }
                let (notes, highlights) = (counts.notify, counts.highlight);
                join.insert(
                    room.clone(),
                    json!({
                        "timeline": {"events": rs.timeline, "limited": rs.limited, "prev_batch": rs.prev_batch},
                        "state": {"events": rs.state},
                        "account_data": {"events": account},
                        "ephemeral": {"events": ephemeral},
                        "unread_notifications": {"notification_count": notes, "highlight_count": highlights},
                    }),
                );
            }
            "invite" if since.is_none() || changed_at > since_pos => {
                let events = stripped_state(ctx, &room, &m.str("event_id"))?;
                invite.insert(room, json!({"invite_state": {"events": events}}));
            }
            "knock" if since.is_none() || changed_at > since_pos => {
                let events = stripped_state(ctx, &room, &m.str("event_id"))?;
                knock.insert(room, json!({"knock_state": {"events": events}}));
            }
            "leave" | "ban" if since.is_some() && changed_at > since_pos => {
                let ceiling = changed_at.min(upto);
                let rows = db.read_batch(&[events_since(&room, since_pos, ceiling, &filter.room)])?;
                let rows = rows.into_iter().next().unwrap_or_default();
                let rs = room_sync(ctx, &s, &room, rows, ceiling, &filter.room, false, (Some(m), None))?;
                leave.insert(
                    room,
                    json!({
                        "timeline": {"events": rs.timeline, "limited": rs.limited, "prev_batch": rs.prev_batch},
                        "state": {"events": rs.state},
                    }),
                );
            }
            _ => {}
        }
    }
    let mut global: Vec<Value> = room_data
        .iter()
        .filter(|r| r.str("room_id").is_empty())
        .map(|r| json!({"type": r.str("type"), "content": serde_json::from_str::<Value>(&r.str("content")).unwrap_or_default()}))
        .collect();
    if since.is_none() && !global.iter().any(|e| e["type"] == super::account::PUSH_RULES_TYPE) {
        global.push(json!({"type": super::account::PUSH_RULES_TYPE, "content": {"global": super::account::push_rules(ctx, &s.user_id)?}}));
    }
    let empty = e2ee.changed.is_empty()
        && e2ee.left.is_empty()
        && e2ee.to_device.is_empty()
        && join.is_empty()
        && invite.is_empty()
        && leave.is_empty()
        && knock.is_empty()
        && global.is_empty()
        && presence.is_empty();
    if empty && since.is_some() && timeout > 0 && !woken_by_timeout {
        return Ok(Some(Reply::Park {
            keys: park_keys,
            timeout_ms: u32::try_from(timeout).unwrap_or(u32::MAX),
            note: Some(s.note(json!({
                "rooms": (joined_ids.len() <= EARLY_MARKERS_MAX_ROOMS).then_some(&joined_ids),
                "filter": stored_filter.zip(filter_json).map(|(id, json)| json!({"id": id, "json": json})),
            }))),
        }));
    }
    if !keep.is_empty() {
        // Only saves the next syncs work: when it fails, they count these events again.
        let _ = db.batch(&keep);
    }
    Ok(Some(Reply::Json(
        200,
        json!({
            "next_batch": format!("s{upto}"),
            "rooms": {"join": join, "invite": invite, "leave": leave, "knock": knock},
            "account_data": {"events": global},
            "presence": {"events": presence},
            "to_device": {"events": e2ee.to_device},
            "device_lists": {"changed": e2ee.changed, "left": e2ee.left},
            "device_one_time_keys_count": e2ee.one_time_key_counts,
            "device_unused_fallback_key_types": e2ee.unused_fallback_key_types,
        }),
    )))
}
