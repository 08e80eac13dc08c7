//! The `Room` Durable Object: the single writer of one room.
//!
//! It decides each event's place (`room_seq`, `prev_events`, `depth`), checks the auth rules
//! against the room's current state (kept in the object's own storage), signs the event, and
//! persists it to D1. Its storage holds:
//! - `meta`: version, last `room_seq`, forward extremities, depth, current state group;
//! - `s\0<type>\0<state_key>`: the current state, event id and PDU;
//! - `t\0<user>\0<device>\0<bucket>`: the device's recent transaction ids (idempotent sends),
//!   spread over [`TXN_BUCKETS`] keys by a hash of the id so a send rewrites a small record;
//! - `p\0<seq>`: events decided but not yet in D1 (the outbox), and `o`, their index;
//! - `k\0<key version>`: the public key of the server's signing key.
//!
//! Ordering is decided under the input gate (storage calls only), so concurrent events of the
//! room chain one after another; the D1 write happens after, with the gate open. Each D1 write
//! carries every outbox entry up to its own, so D1 never holds an event without its
//! predecessors, and writes of concurrent sends travel together (group commit). An outbox entry
//! is deleted once D1 has it, by an unconfirmed write (the answer does not wait for it; a
//! replay after a crash is harmless); an alarm retries entries whose write failed.
//!
//! A flush claims what it writes (`c`, the newest `room_seq` taken), so a send that arrives
//! while an earlier flush is in flight writes only its own entries, guarded by
//! [`sql::OUTBOX_GUARD`]: the batch fails unless D1 already has the event before its first
//! one. When the guard fails (the earlier flush failed, or has not landed yet) the flush writes
//! everything from the start of the outbox instead; claims only save work, never decide
//! correctness.

use std::collections::HashMap;

use lattice_worker::bindings::lattice::bindings::{config, durable_object, signals, storage};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::auth;
use super::pdu::{self, Pdu, Position, SigningKey, Template};
use crate::db::{self, Bound, Db, bound, sql};
use crate::object::{Failure, fail, get_json, storage_fail, to_bytes};
use crate::util::now_ms;

/// The Durable Object namespace binding and class of rooms.
pub const BINDING: &str = "ROOMS";
pub const CLASS: &str = "Room";
/// The config secret holding the server's ed25519 seed.
pub const SIGNING_KEY_SECRET: &str = "signing_key";
/// A state group stores a full snapshot after this many deltas, so reading the state at an
/// event walks at most this many groups.
pub const STATE_SNAPSHOT_EVERY: i64 = 64;
/// Outbox entries one D1 write carries at most; the rest go in the next write.
pub const MAX_OUTBOX_PER_WRITE: u32 = 256;
/// Transaction ids remembered per device and room (clients retry recent ones only): the
/// newest [`TXNS_KEPT_PER_BUCKET`] of each of [`TXN_BUCKETS`] buckets.
pub const TXNS_KEPT_PER_DEVICE: usize = TXN_BUCKETS as usize * TXNS_KEPT_PER_BUCKET;
/// How many keys a device's transaction ids are spread over. A send reads and rewrites one
/// bucket (about 1 KiB), not the device's whole history; once a device has used every bucket
/// they are all in the object's cache, so a new id costs no storage read.
pub const TXN_BUCKETS: u64 = 16;
pub const TXNS_KEPT_PER_BUCKET: usize = 16;
/// The storage key of the outbox index: the `room_seq`s of the entries not yet in D1.
const OUTBOX_INDEX: &str = "o";
/// The storage key of the newest `room_seq` a flush has taken to write; later flushes leave
/// entries up to it to that flush instead of writing them again.
const OUTBOX_CLAIM: &str = "c";
/// When a D1 write fails, the alarm retries after this long.
pub const OUTBOX_RETRY_MS: u64 = 1_000;
/// While D1 stays down, the alarm tries again this often.
pub const OUTBOX_ALARM_RETRY_MS: u64 = 5_000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Meta {
    room_id: String,
    version: String,
    seq: i64,
    prev: Vec<String>,
    depth: u64,
    group: Option<String>,
    chain_len: i64,
    create_event_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateEntry {
    event_id: String,
    pdu: Value,
}

/// An event decided by the room, waiting to be written to D1.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Planned {
    event_id: String,
    room_id: String,
    version: String,
    seq: i64,
    kind: String,
    state_key: Option<String>,
    sender: String,
    origin_ms: i64,
    group: Option<String>,
    json: String,
    txn: Option<(String, String)>,
    new_group: Option<NewGroup>,
    membership: Option<(String, String)>,
    redact: Option<(String, String)>,
    creator: Option<String>,
    /// The event's `m.relates_to` (parent event id, rel_type), read when it was planned.
    /// Entries planned before this field existed have `relation_known` false and are read again.
    #[serde(default)]
    relation: Option<(String, String)>,
    #[serde(default)]
    relation_known: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NewGroup {
    parent: Option<String>,
    chain_len: i64,
    entries: Vec<(String, String, String)>,
}

/// What the front sends to a room.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum RoomRequest {
    /// A new room: its create event (built by the front, which needs its id first) and the
    /// events that follow it.
    Create {
        version: String,
        create_event_id: String,
        create_pdu: Value,
        then: Vec<Template>,
        sender: String,
    },
    /// Events from one sender, appended in order.
    Send { sender: String, templates: Vec<Template>, txn: Option<(String, String)> },
}

/// The room's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct RoomReply {
    pub event_ids: Vec<String>,
}

fn db_fail(e: db::DbError) -> Failure {
    crate::object::db_failure(e, "the database is unavailable; the event is kept and will be written")
}

fn state_key(kind: &str, key: &str) -> String {
    format!("s\0{kind}\0{key}")
}

fn outbox_key(seq: i64) -> String {
    format!("p\0{seq:020}")
}

/// The seed of the server's signing key, from the `signing_key` secret.
fn signing_seed() -> Result<Vec<u8>, String> {
    config::secret(SIGNING_KEY_SECRET)
        .map_err(|e| format!("the signing key secret: {e:?}"))?
        .ok_or_else(|| "the server has no signing key (secret `signing_key`)".to_owned())
}

/// The server's signing key, from the `signing_key` secret: the host keeps the key pair and
/// signs (`lattice:bindings/crypto`); the seed is read here only for the key id's version (a
/// hash of it).
pub fn server_signing_key() -> Result<SigningKey, String> {
    SigningKey::hosted(SIGNING_KEY_SECRET, &signing_seed()?).map_err(|e| e.to_string())
}

fn signing_key() -> Result<SigningKey, Failure> {
    server_signing_key().map_err(|e| fail(500, "M_UNKNOWN", e))
}

/// Handles one request to a room object.
pub fn handle(request: &durable_object::Request) -> durable_object::Response {
    crate::object::serve(request, |r: RoomRequest| match r {
        RoomRequest::Create { version, create_event_id, create_pdu, then, sender } => {
            create(&version, &create_event_id, create_pdu, &then, &sender)
        }
        RoomRequest::Send { sender, templates, txn } => send(&sender, &templates, txn),
    })
}

/// The alarm: writes outbox entries a failed D1 write left behind. While D1 keeps failing it
/// re-arms itself every [`OUTBOX_ALARM_RETRY_MS`] (instead of the runtime's bounded retries),
/// so a quiet room's events reach D1 whenever it is back.
pub fn alarm() -> Result<(), String> {
    match flush(i64::MAX, false) {
        Ok(()) => Ok(()),
        Err(f) => {
            storage::set_alarm(now_ms() + OUTBOX_ALARM_RETRY_MS)
                .map_err(|e| format!("{}; re-arming the alarm failed: {e:?}", f.error))?;
            Ok(())
        }
    }
}

fn create(
    version: &str,
    create_event_id: &str,
    create_pdu: Value,
    then: &[Template],
    sender: &str,
) -> Result<RoomReply, Failure> {
    let key = signing_key()?;
    let settings = crate::config::Settings::load();
    if get_json::<Meta>("meta")?.is_some() {
        return Err(fail(400, "M_ROOM_IN_USE", "the room exists already"));
    }
    let room_id = match create_pdu.get("room_id").and_then(Value::as_str) {
        Some(r) => r.to_owned(),
        None => pdu::room_id_from_create_event_id(create_event_id),
    };
    let create = Pdu::from_json(create_event_id, &create_pdu).map_err(|e| fail(400, "M_BAD_JSON", e))?;
    auth::check(version, &create, |_| None, |_, _| None).map_err(|e| fail(403, "M_FORBIDDEN", e))?;
    let mut meta = Meta {
        room_id: room_id.clone(),
        version: version.to_owned(),
        seq: 0,
        prev: vec![],
        depth: 0,
        group: None,
        chain_len: 0,
        create_event_id: create_event_id.to_owned(),
    };
    let mut ids = vec![create_event_id.to_owned()];
    let mut writes = Vec::new();
    let mut state: HashMap<String, StateEntry> = HashMap::new();
    let create_json = canonical_string(&create_pdu);
    let planned =
        plan(&mut meta, &mut state, create_event_id, &create_pdu, create_json, None, None, Some(sender))?;
    writes.push(planned);
    for template in then {
        let (id, p) = append(&settings.server_name, &key, &mut meta, &mut state, sender, template, None)?;
        ids.push(id);
        writes.push(p);
    }
    commit(&meta, &state, &writes, None)?;
    finish(&meta, &writes)?;
    Ok(RoomReply { event_ids: ids })
}

fn send(sender: &str, templates: &[Template], txn: Option<(String, String)>) -> Result<RoomReply, Failure> {
    // A room this object does not hold gets its 404 before anything is written here.
    if storage::get(&["meta".to_owned()]).map_err(storage_fail)?.is_empty() {
        return Err(fail(404, "M_NOT_FOUND", "no such room"));
    }
    // Everything that waits on other I/O happens before the room's head is read: the signing
    // key, and the event a redaction redacts.
    let key = signing_key()?;
    let settings = crate::config::Settings::load();
    let mut redacted_targets = HashMap::new();
    for t in templates {
        if t.kind == "m.room.redaction"
            && let Some(target) = &t.redacts
        {
            let db = Db::open().map_err(db_fail)?;
            if let Some(row) = db.first(sql::EVENT_GET, vec![db::t(target.clone())]).map_err(db_fail)? {
                redacted_targets.insert(target.clone(), row.str("json"));
            }
        }
    }
    // A device's recent transaction ids live in a few keys; the one for this id is usually a
    // cache hit, not a storage read while the input gate is closed. Rooms written before the
    // ids were bucketed keep the device's older ids under one key, read but no longer written.
    let txn_keys = txn.as_ref().map(|(device, id)| {
        (
            format!("t\0{sender}\0{device}\0{:02}", crate::util::fnv1a(id.as_bytes()) % TXN_BUCKETS),
            format!("t\0{sender}\0{device}"),
        )
    });
    let mut txns: Vec<(String, Vec<String>)> = Vec::new();
    if let (Some((bucket, legacy)), Some((_, id))) = (&txn_keys, &txn) {
        let mut found = None;
        for (k, v) in storage::get(&[bucket.clone(), legacy.clone()]).map_err(storage_fail)? {
            let list: Vec<(String, Vec<String>)> = serde_json::from_slice(&v)
                .map_err(|e| fail(500, "M_UNKNOWN", format!("transaction ids: {e}")))?;
            if found.is_none() {
                found = list.iter().find(|(t, _)| t == id).map(|(_, ids)| ids.clone());
            }
            if &k == bucket {
                txns = list;
            }
        }
        if let Some(ids) = found {
            // A retry: the events were decided, but their D1 write may have failed. Answer
            // only once D1 has them, like the first time.
            let up_to = get_json::<Meta>("meta")?.map_or(0, |m| m.seq);
            flush_or_retry_later(up_to)?;
            return Ok(RoomReply { event_ids: ids });
        }
    }
    let mut meta: Meta = get_json("meta")?.ok_or_else(|| fail(404, "M_NOT_FOUND", "no such room"))?;
    let mut state = HashMap::new();
    let mut ids = Vec::new();
    let mut writes = Vec::new();
    for (n, template) in templates.iter().enumerate() {
        let this_txn = if n == 0 { txn.clone() } else { None };
        let (id, mut p) =
            append(&settings.server_name, &key, &mut meta, &mut state, sender, template, this_txn)?;
        if let Some(target) = &template.redacts
            && let Some(target_json) = redacted_targets.get(target)
        {
            let target_pdu: ruma::CanonicalJsonObject =
                serde_json::from_str(target_json).map_err(|e| fail(500, "M_UNKNOWN", e.to_string()))?;
            let redacted = pdu::redacted(&meta.version, &target_pdu, None)
                .map_err(|e| fail(500, "M_UNKNOWN", e.to_string()))?;
            p.redact = Some((target.clone(), json!(redacted).to_string()));
        }
        ids.push(id);
        writes.push(p);
    }
    let txn_record = match (txn_keys, &txn) {
        (Some((bucket, _)), Some((_, id))) => {
            txns.push((id.clone(), ids.clone()));
            let excess = txns.len().saturating_sub(TXNS_KEPT_PER_BUCKET);
            txns.drain(..excess);
            Some((bucket, to_bytes(&txns)))
        }
        _ => None,
    };
    commit(&meta, &state, &writes, txn_record)?;
    finish(&meta, &writes)?;
    Ok(RoomReply { event_ids: ids })
}

fn canonical_string(v: &Value) -> String {
    // serde_json's maps are sorted (no `preserve_order`), which is what canonical JSON needs
    // for storage; signatures were computed by ruma on its own canonical form.
    v.to_string()
}

/// Builds, authorizes and signs one event on top of `meta`, and plans its write.
fn append(
    server_name: &str,
    key: &SigningKey,
    meta: &mut Meta,
    state: &mut HashMap<String, StateEntry>,
    sender: &str,
    template: &Template,
    txn: Option<(String, String)>,
) -> Result<(String, Planned), Failure> {
    let types = auth::auth_types(
        &meta.version,
        &template.kind,
        sender,
        template.state_key.as_deref(),
        &template.content,
    )
    .map_err(|e| fail(400, "M_BAD_JSON", e))?;
    // The current events of those types: from this request's own earlier events, else storage.
    let mut keys: Vec<String> = types.iter().map(|(t, k)| state_key(t, k)).collect();
    if let Some(sk) = &template.state_key {
        keys.push(state_key(&template.kind, sk));
    }
    keys.push(state_key("m.room.create", ""));
    let missing: Vec<String> = keys.iter().filter(|k| !state.contains_key(*k)).cloned().collect();
    if !missing.is_empty() {
        for (k, v) in storage::get(&missing).map_err(storage_fail)? {
            let entry: StateEntry =
                serde_json::from_slice(&v).map_err(|e| fail(500, "M_UNKNOWN", format!("room state: {e}")))?;
            state.insert(k, entry);
        }
    }
    let rules =
        pdu::rules(&meta.version).map_err(|e| fail(400, "M_UNSUPPORTED_ROOM_VERSION", e.to_string()))?;
    let mut auth_events: Vec<String> =
        types.iter().filter_map(|(t, k)| state.get(&state_key(t, k)).map(|e| e.event_id.clone())).collect();
    if !rules.authorization.room_create_event_id_as_room_id && !auth_events.contains(&meta.create_event_id) {
        auth_events.insert(0, meta.create_event_id.clone());
    }
    let room_id_field = Some(meta.room_id.as_str());
    let ts = now_ms();
    let (event_id, object) = pdu::build(
        &meta.version,
        server_name,
        key,
        sender,
        template,
        &Position {
            room_id: room_id_field,
            prev_events: &meta.prev,
            auth_events: &auth_events,
            depth: meta.depth + 1,
            origin_server_ts: ts,
        },
    )
    .map_err(|e| match e {
        pdu::PduError::TooLarge => fail(413, "M_TOO_LARGE", e.to_string()),
        other => fail(400, "M_BAD_JSON", other.to_string()),
    })?;
    let json_value = serde_json::to_value(&object).map_err(|e| fail(500, "M_UNKNOWN", e.to_string()))?;
    let event = Pdu::from_json(&event_id, &json_value).map_err(|e| fail(400, "M_BAD_JSON", e))?;
    let by_id: HashMap<&str, &StateEntry> = state.values().map(|e| (e.event_id.as_str(), e)).collect();
    let as_pdu = |e: &StateEntry| Pdu::from_json(&e.event_id, &e.pdu).ok();
    auth::check(
        &meta.version,
        &event,
        |id| by_id.get(id.as_str()).and_then(|e| as_pdu(e)),
        |t, k| state.get(&state_key(t, k)).and_then(as_pdu),
    )
    .map_err(|e| fail(403, "M_FORBIDDEN", e))?;
    let json_text = canonical_string(&json_value);
    let planned = plan(meta, state, &event_id, &json_value, json_text, txn, None, None)?;
    Ok((event_id, planned))
}

/// Moves the room's head past an authorized event and plans its D1 write.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site per kind of event; a struct would only rename them"
)]
fn plan(
    meta: &mut Meta,
    state: &mut HashMap<String, StateEntry>,
    event_id: &str,
    json_value: &Value,
    json_text: String,
    txn: Option<(String, String)>,
    redact: Option<(String, String)>,
    creator: Option<&str>,
) -> Result<Planned, Failure> {
    let s = |k: &str| json_value.get(k).and_then(Value::as_str).map(str::to_owned);
    let kind = s("type").unwrap_or_default();
    let sk = s("state_key");
    let sender = s("sender").unwrap_or_default();
    meta.seq += 1;
    meta.depth = json_value.get("depth").and_then(Value::as_u64).unwrap_or(meta.depth + 1);
    meta.prev = vec![event_id.to_owned()];
    let mut new_group = None;
    let mut membership = None;
    if let Some(sk) = &sk {
        let entry = (kind.clone(), sk.clone(), event_id.to_owned());
        let snapshot = meta.chain_len + 1 >= STATE_SNAPSHOT_EVERY;
        new_group = Some(if snapshot {
            let mut all: Vec<(String, String, String)> =
                full_state(state)?.into_iter().filter(|(t, k, _)| !(t == &kind && k == sk)).collect();
            all.push(entry);
            meta.chain_len = 0;
            NewGroup { parent: None, chain_len: 0, entries: all }
        } else {
            meta.chain_len += 1;
            NewGroup { parent: meta.group.clone(), chain_len: meta.chain_len, entries: vec![entry] }
        });
        meta.group = Some(event_id.to_owned());
        state.insert(
            state_key(&kind, sk),
            StateEntry { event_id: event_id.to_owned(), pdu: json_value.clone() },
        );
        if kind == "m.room.member" {
            let m = json_value.pointer("/content/membership").and_then(Value::as_str).unwrap_or("leave");
            membership = Some((sk.clone(), m.to_owned()));
        }
    }
    Ok(Planned {
        event_id: event_id.to_owned(),
        room_id: meta.room_id.clone(),
        version: meta.version.clone(),
        seq: meta.seq,
        kind,
        state_key: sk,
        sender,
        origin_ms: json_value.get("origin_server_ts").and_then(Value::as_i64).unwrap_or(0),
        group: meta.group.clone(),
        json: json_text,
        txn,
        new_group,
        membership,
        redact,
        creator: creator.map(str::to_owned),
        relation: relation_of(json_value),
        relation_known: true,
    })
}

/// An event's `m.relates_to`: the parent's event id and the relation type.
fn relation_of(event: &Value) -> Option<(String, String)> {
    let relates = event.pointer("/content/m.relates_to")?;
    Some((relates.get("event_id")?.as_str()?.to_owned(), relates.get("rel_type")?.as_str()?.to_owned()))
}

/// The whole current state as `(type, state_key, event_id)`, from storage overlaid with this
/// request's own changes.
fn full_state(pending: &HashMap<String, StateEntry>) -> Result<Vec<(String, String, String)>, Failure> {
    let mut all: HashMap<String, String> = HashMap::new();
    let mut start_after: Option<String> = None;
    loop {
        let page = storage::list(&storage::ListOptions {
            start: None,
            start_after: start_after.clone(),
            end: None,
            prefix: Some("s\0".into()),
            reverse: false,
            limit: Some(512),
        })
        .map_err(storage_fail)?;
        let Some((last, _)) = page.last() else { break };
        start_after = Some(last.clone());
        for (k, v) in page {
            let e: StateEntry =
                serde_json::from_slice(&v).map_err(|e| fail(500, "M_UNKNOWN", format!("room state: {e}")))?;
            all.insert(k, e.event_id);
        }
    }
    for (k, e) in pending {
        all.insert(k.clone(), e.event_id.clone());
    }
    Ok(all
        .into_iter()
        .filter_map(|(k, id)| {
            let mut parts = k.splitn(3, '\0');
            let (_, t, sk) = (parts.next()?, parts.next()?, parts.next()?);
            Some((t.to_owned(), sk.to_owned(), id))
        })
        .collect())
}

/// Stores the new head, state, transaction record and outbox entries in one storage write.
fn commit(
    meta: &Meta,
    state: &HashMap<String, StateEntry>,
    writes: &[Planned],
    txn: Option<(String, Vec<u8>)>,
) -> Result<(), Failure> {
    let mut entries: Vec<(String, Vec<u8>)> = vec![("meta".into(), to_bytes(&meta))];
    let mut index: Vec<i64> = get_json(OUTBOX_INDEX)?.unwrap_or_default();
    index.extend(writes.iter().map(|w| w.seq));
    entries.push((OUTBOX_INDEX.into(), to_bytes(&index)));
    for w in writes {
        if let Some(sk) = &w.state_key {
            let k = state_key(&w.kind, sk);
            if let Some(e) = state.get(&k) {
                entries.push((k, to_bytes(&e)));
            }
        }
        entries.push((outbox_key(w.seq), to_bytes(&w)));
    }
    if let Some(record) = txn {
        entries.push(record);
    }
    storage::put(&entries).map_err(storage_fail)
}

/// Writes the outbox to D1 up to this request's last event.
fn finish(meta: &Meta, writes: &[Planned]) -> Result<(), Failure> {
    flush_or_retry_later(writes.last().map_or(meta.seq, |w| w.seq))
}

/// [`flush`] up to `up_to`; when it fails, the events stay decided and kept, and the alarm
/// writes them once D1 is back.
fn flush_or_retry_later(up_to: i64) -> Result<(), Failure> {
    flush(up_to, true).inspect_err(|_| {
        let _ = storage::set_alarm(now_ms() + OUTBOX_RETRY_MS);
    })
}

/// Wakes the syncers of what was just written: the room's, and each membership's target.
fn wake(planned: &[Planned]) {
    if let Some(p) = planned.first() {
        signals::signal(&format!("room:{}", p.room_id));
    }
    for p in planned {
        if let Some((target, _)) = &p.membership {
            signals::signal(&format!("user:{target}"));
        }
    }
}

/// Writes outbox entries (oldest first, up to `up_to`, at most [`MAX_OUTBOX_PER_WRITE`] a
/// transaction) to D1, then removes them from the outbox. With `claims`, entries an earlier
/// flush has claimed are left to it (see the module's documentation).
fn flush(up_to: i64, claims: bool) -> Result<(), Failure> {
    let mut claims = claims;
    loop {
        // The index and the entries were written by this object, so they are in its cache.
        let index: Vec<i64> = get_json(OUTBOX_INDEX)?.unwrap_or_default();
        let Some(&oldest) = index.first() else { return Ok(()) };
        if oldest > up_to {
            return Ok(());
        }
        let claimed: i64 = if claims { get_json(OUTBOX_CLAIM)?.unwrap_or(0) } else { 0 };
        let take: Vec<i64> = index
            .iter()
            .copied()
            .filter(|s| *s > claimed && (*s <= up_to || !claims))
            .take(MAX_OUTBOX_PER_WRITE as usize)
            .collect();
        let Some(&first) = take.first() else {
            // Everything up to ours is another flush's; it can only be an entry of this very
            // request when that flush failed, so write from the start.
            claims = false;
            continue;
        };
        if claims {
            let last = take.last().copied().unwrap_or(first);
            storage::put(&[(OUTBOX_CLAIM.to_owned(), to_bytes(&last))]).map_err(storage_fail)?;
        }
        let keys: Vec<String> = take.iter().map(|s| outbox_key(*s)).collect();
        let mut planned = Vec::new();
        for (_, v) in storage::get(&keys).map_err(storage_fail)? {
            let p: Planned =
                serde_json::from_slice(&v).map_err(|e| fail(500, "M_UNKNOWN", format!("outbox: {e}")))?;
            planned.push(p);
        }
        planned.sort_by_key(|p| p.seq);
        let mut batch = Vec::new();
        if first != oldest
            && let Some(p) = planned.first()
        {
            batch.push(bound(
                sql::OUTBOX_GUARD,
                vec![db::t(p.room_id.clone()), db::t(p.room_id.clone()), db::i(first - 1)],
            ));
        }
        for p in &planned {
            batch.extend(bounds(p));
        }
        let db = Db::open().map_err(db_fail)?;
        if let Err(e) = db.batch(&batch) {
            if claims && first != oldest {
                // The guard (or the write) failed: the earlier entries are not in D1 yet.
                claims = false;
                continue;
            }
            return Err(db_fail(e));
        }
        wake(&planned);
        // Others may have added to the index meanwhile: remove only what was written (and
        // entries another flush already wrote and deleted).
        let written: std::collections::HashSet<i64> = take.iter().copied().collect();
        // Unconfirmed: the answer does not wait for this clean-up to be durable. Lost in a
        // crash, it only makes a later flush write these events again, which is harmless
        // (see `bounds`).
        let mut now: Vec<i64> = get_json(OUTBOX_INDEX)?.unwrap_or_default();
        now.retain(|s| !written.contains(s));
        storage::put_unconfirmed(&[(OUTBOX_INDEX.to_owned(), to_bytes(&now))]).map_err(storage_fail)?;
        let done: Vec<String> = written.iter().map(|s| outbox_key(*s)).collect();
        storage::delete_unconfirmed(&done).map_err(storage_fail)?;
        let covered = take.last().is_some_and(|s| *s >= up_to);
        if covered || take.len() < MAX_OUTBOX_PER_WRITE as usize && !claims {
            return Ok(());
        }
    }
}

/// The D1 statements that persist one event. Replaying them is harmless: inserts skip
/// existing rows and the upserts only move forward in `room_seq`.
fn bounds(p: &Planned) -> Vec<Bound> {
    let mut out = Vec::new();
    if let Some(creator) = &p.creator {
        out.push(bound(
            sql::ROOM_INSERT,
            vec![
                db::t(p.room_id.clone()),
                db::t(p.version.clone()),
                db::t(creator.clone()),
                db::i(p.origin_ms),
            ],
        ));
    }
    out.push(bound(sql::STREAM_BUMP, vec![]));
    let (txn_device, txn_id) = match &p.txn {
        Some((d, i)) => (Some(d.clone()), Some(i.clone())),
        None => (None, None),
    };
    out.push(bound(
        sql::EVENT_INSERT,
        vec![
            db::t(p.event_id.clone()),
            db::t(p.room_id.clone()),
            db::i(p.seq),
            db::t(p.kind.clone()),
            db::opt_t(p.state_key.clone()),
            db::t(p.sender.clone()),
            db::i(p.origin_ms),
            db::opt_t(p.group.clone()),
            db::t(p.json.clone()),
            db::opt_t(txn_device),
            db::opt_t(txn_id),
        ],
    ));
    if let Some(g) = &p.new_group {
        out.push(bound(
            sql::STATE_GROUP_INSERT,
            vec![
                db::t(p.event_id.clone()),
                db::t(p.room_id.clone()),
                db::opt_t(g.parent.clone()),
                db::i(g.chain_len),
            ],
        ));
        for (t, k, id) in &g.entries {
            out.push(bound(
                sql::STATE_ENTRY_INSERT,
                vec![db::t(p.event_id.clone()), db::t(t.clone()), db::t(k.clone()), db::t(id.clone())],
            ));
        }
    }
    if let Some(sk) = &p.state_key {
        out.push(bound(
            sql::CURRENT_STATE_UPSERT,
            vec![
                db::t(p.room_id.clone()),
                db::t(p.kind.clone()),
                db::t(sk.clone()),
                db::t(p.event_id.clone()),
                db::i(p.seq),
            ],
        ));
    }
    if let Some((target, membership)) = &p.membership {
        out.push(bound(
            sql::MEMBERSHIP_UPSERT,
            vec![
                db::t(p.room_id.clone()),
                db::t(target.clone()),
                db::t(membership.clone()),
                db::t(p.event_id.clone()),
                db::i(p.seq),
            ],
        ));
    }
    let relation = if p.relation_known {
        p.relation.clone()
    } else {
        serde_json::from_str::<Value>(&p.json).ok().as_ref().and_then(relation_of)
    };
    if let Some((parent, rel)) = relation {
        out.push(bound(
            sql::RELATION_INSERT,
            vec![
                db::t(p.event_id.clone()),
                db::t(p.room_id.clone()),
                db::t(parent),
                db::t(rel),
                db::t(p.kind.clone()),
                db::t(p.sender.clone()),
                db::i(p.seq),
            ],
        ));
    }
    if let Some((target, redacted)) = &p.redact {
        out.push(bound(
            sql::EVENT_REDACT,
            vec![db::t(redacted.clone()), db::t(p.event_id.clone()), db::t(target.clone())],
        ));
    }
    out
}

/// Sends a request to a room's object and decodes its answer.
pub fn call(room_id: &str, request: &RoomRequest) -> Result<RoomReply, crate::error::Error> {
    crate::object::call(BINDING, room_id, vec![], request)
}
