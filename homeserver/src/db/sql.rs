//! Every SQL statement the homeserver issues, and nowhere else.
//!
//! SQLite's dialect (D1), restricted to what PostgreSQL also runs once the runtime rewrites
//! `?` placeholders and maps types: no `INSERT OR ...`, no `AUTOINCREMENT`, upserts through
//! `ON CONFLICT ... DO ...`. `params` names each `?` in order (`t` text, `i` integer, `b` blob,
//! `T`/`I` nullable), which the registry test uses to run every statement on both engines.

/// One statement.
#[derive(Debug, Clone, Copy)]
pub struct Sql {
    pub name: &'static str,
    pub text: &'static str,
    pub params: &'static str,
}

const fn sql(name: &'static str, params: &'static str, text: &'static str) -> Sql {
    Sql { name, text, params }
}

// ---- Schema, version 1 ----------------------------------------------------------------------
pub const V1_USERS: Sql = sql(
    "v1_users",
    "",
    "CREATE TABLE users (user_id TEXT PRIMARY KEY, password_hash TEXT, displayname TEXT, avatar_url TEXT, deactivated INTEGER NOT NULL DEFAULT 0, created_ms INTEGER NOT NULL)",
);
pub const V1_DEVICES: Sql = sql(
    "v1_devices",
    "",
    "CREATE TABLE devices (user_id TEXT NOT NULL, device_id TEXT NOT NULL, display_name TEXT, created_ms INTEGER NOT NULL, last_seen_ms INTEGER, PRIMARY KEY (user_id, device_id))",
);
pub const V1_TOKENS: Sql = sql(
    "v1_tokens",
    "",
    "CREATE TABLE access_tokens (token_hash TEXT PRIMARY KEY, user_id TEXT NOT NULL, device_id TEXT NOT NULL, created_ms INTEGER NOT NULL, expires_ms INTEGER, refresh_hash TEXT)",
);
pub const V1_TOKENS_DEVICE: Sql =
    sql("v1_tokens_device", "", "CREATE INDEX access_tokens_device ON access_tokens (user_id, device_id)");
pub const V1_TOKENS_REFRESH: Sql =
    sql("v1_tokens_refresh", "", "CREATE UNIQUE INDEX access_tokens_refresh ON access_tokens (refresh_hash)");
pub const V1_REG_TOKENS: Sql = sql(
    "v1_reg_tokens",
    "",
    "CREATE TABLE registration_tokens (token TEXT PRIMARY KEY, uses_allowed INTEGER, completed INTEGER NOT NULL DEFAULT 0, expiry_ms INTEGER, created_ms INTEGER NOT NULL)",
);
pub const V1_STREAM: Sql =
    sql("v1_stream", "", "CREATE TABLE stream_positions (name TEXT PRIMARY KEY, pos INTEGER NOT NULL)");
pub const V1_STREAM_SEED: Sql =
    sql("v1_stream_seed", "", "INSERT INTO stream_positions (name, pos) VALUES ('events', 0)");
pub const V1_ROOMS: Sql = sql(
    "v1_rooms",
    "",
    "CREATE TABLE rooms (room_id TEXT PRIMARY KEY, room_version TEXT NOT NULL, creator TEXT NOT NULL, created_ms INTEGER NOT NULL, published INTEGER NOT NULL DEFAULT 0)",
);
pub const V1_EVENTS: Sql = sql(
    "v1_events",
    "",
    "CREATE TABLE events (event_id TEXT PRIMARY KEY, room_id TEXT NOT NULL, room_seq INTEGER NOT NULL, stream_pos INTEGER NOT NULL, type TEXT NOT NULL, state_key TEXT, sender TEXT NOT NULL, origin_ms INTEGER NOT NULL, state_group TEXT, json TEXT NOT NULL, txn_device TEXT, txn_id TEXT, redacted_by TEXT)",
);
pub const V1_EVENTS_SEQ: Sql =
    sql("v1_events_seq", "", "CREATE UNIQUE INDEX events_room_seq ON events (room_id, room_seq)");
pub const V1_EVENTS_STREAM: Sql =
    sql("v1_events_stream", "", "CREATE INDEX events_room_stream ON events (room_id, stream_pos)");
pub const V1_STATE_GROUPS: Sql = sql(
    "v1_state_groups",
    "",
    "CREATE TABLE state_groups (group_id TEXT PRIMARY KEY, room_id TEXT NOT NULL, parent TEXT, chain_len INTEGER NOT NULL)",
);
pub const V1_STATE_ENTRIES: Sql = sql(
    "v1_state_entries",
    "",
    "CREATE TABLE state_group_entries (group_id TEXT NOT NULL, type TEXT NOT NULL, state_key TEXT NOT NULL, event_id TEXT NOT NULL, PRIMARY KEY (group_id, type, state_key))",
);
pub const V1_CURRENT_STATE: Sql = sql(
    "v1_current_state",
    "",
    "CREATE TABLE current_state (room_id TEXT NOT NULL, type TEXT NOT NULL, state_key TEXT NOT NULL, event_id TEXT NOT NULL, room_seq INTEGER NOT NULL, PRIMARY KEY (room_id, type, state_key))",
);
pub const V1_MEMBERSHIPS: Sql = sql(
    "v1_memberships",
    "",
    "CREATE TABLE memberships (room_id TEXT NOT NULL, user_id TEXT NOT NULL, membership TEXT NOT NULL, event_id TEXT NOT NULL, room_seq INTEGER NOT NULL, stream_pos INTEGER NOT NULL, PRIMARY KEY (room_id, user_id))",
);
pub const V1_MEMBERSHIPS_USER: Sql =
    sql("v1_memberships_user", "", "CREATE INDEX memberships_user ON memberships (user_id)");
pub const V1_ALIASES: Sql = sql(
    "v1_aliases",
    "",
    "CREATE TABLE room_aliases (alias TEXT PRIMARY KEY, room_id TEXT NOT NULL, creator TEXT NOT NULL)",
);
pub const V1_ACCOUNT_DATA: Sql = sql(
    "v1_account_data",
    "",
    "CREATE TABLE account_data (user_id TEXT NOT NULL, room_id TEXT NOT NULL, type TEXT NOT NULL, content TEXT NOT NULL, stream_pos INTEGER NOT NULL, PRIMARY KEY (user_id, room_id, type))",
);
pub const V1_FILTERS: Sql = sql(
    "v1_filters",
    "",
    "CREATE TABLE filters (user_id TEXT NOT NULL, filter_id TEXT NOT NULL, json TEXT NOT NULL, PRIMARY KEY (user_id, filter_id))",
);

// ---- Schema, version 2: ephemeral and per-user data ------------------------------------------
pub const V2_TYPING: Sql = sql(
    "v2_typing",
    "",
    "CREATE TABLE typing (room_id TEXT NOT NULL, user_id TEXT NOT NULL, expires_ms INTEGER NOT NULL, stream_pos INTEGER NOT NULL, PRIMARY KEY (room_id, user_id))",
);
pub const V2_RECEIPTS: Sql = sql(
    "v2_receipts",
    "",
    "CREATE TABLE receipts (room_id TEXT NOT NULL, user_id TEXT NOT NULL, receipt_type TEXT NOT NULL, thread_id TEXT NOT NULL, event_id TEXT NOT NULL, ts INTEGER NOT NULL, stream_pos INTEGER NOT NULL, PRIMARY KEY (room_id, user_id, receipt_type, thread_id))",
);
pub const V2_RECEIPTS_STREAM: Sql =
    sql("v2_receipts_stream", "", "CREATE INDEX receipts_room_stream ON receipts (room_id, stream_pos)");
pub const V2_PRESENCE: Sql = sql(
    "v2_presence",
    "",
    "CREATE TABLE presence (user_id TEXT PRIMARY KEY, presence TEXT NOT NULL, status_msg TEXT, last_active_ms INTEGER NOT NULL, stream_pos INTEGER NOT NULL)",
);
pub const V2_PUSHERS: Sql = sql(
    "v2_pushers",
    "",
    "CREATE TABLE pushers (user_id TEXT NOT NULL, app_id TEXT NOT NULL, pushkey TEXT NOT NULL, json TEXT NOT NULL, PRIMARY KEY (user_id, app_id, pushkey))",
);

// ---- Schema, version 3: relations ------------------------------------------------------------
pub const V3_RELATIONS: Sql = sql(
    "v3_relations",
    "",
    "CREATE TABLE relations (event_id TEXT PRIMARY KEY, room_id TEXT NOT NULL, parent_id TEXT NOT NULL, rel_type TEXT NOT NULL, event_type TEXT NOT NULL, sender TEXT NOT NULL, room_seq INTEGER NOT NULL)",
);
pub const V3_RELATIONS_PARENT: Sql =
    sql("v3_relations_parent", "", "CREATE INDEX relations_parent ON relations (parent_id, room_seq)");
pub const V3_RELATIONS_THREADS: Sql = sql(
    "v3_relations_threads",
    "",
    "CREATE INDEX relations_room_type ON relations (room_id, rel_type, room_seq)",
);

// ---- Schema, version 4: the outbox guard ----------------------------------------------------
pub const V4_OUTBOX_GUARD: Sql = sql(
    "v4_outbox_guard",
    "",
    "CREATE TABLE outbox_guard (room_id TEXT PRIMARY KEY, room_seq INTEGER NOT NULL)",
);

// ---- Schema, version 5: single-use login tokens ----------------------------------------------
pub const V5_LOGIN_TOKENS: Sql = sql(
    "v5_login_tokens",
    "",
    "CREATE TABLE login_tokens (token_hash TEXT PRIMARY KEY, user_id TEXT NOT NULL, expires_ms INTEGER NOT NULL)",
);

// ---- Schema, version 6: end-to-end encryption keys -------------------------------------------
pub const V6_DEVICE_KEYS: Sql = sql(
    "v6_device_keys",
    "",
    "CREATE TABLE device_keys (user_id TEXT NOT NULL, device_id TEXT NOT NULL, json TEXT NOT NULL, stream_pos INTEGER NOT NULL, PRIMARY KEY (user_id, device_id))",
);
pub const V6_DEVICE_KEYS_STREAM: Sql =
    sql("v6_device_keys_stream", "", "CREATE INDEX device_keys_stream ON device_keys (stream_pos)");
pub const V6_E2E_COUNTS: Sql = sql(
    "v6_e2e_counts",
    "",
    "CREATE TABLE e2e_key_counts (user_id TEXT NOT NULL, device_id TEXT NOT NULL, counts TEXT NOT NULL, fallback_unused TEXT NOT NULL, PRIMARY KEY (user_id, device_id))",
);

// ---- Schema, version 7: to-device messages ---------------------------------------------------
pub const V7_TO_DEVICE: Sql = sql(
    "v7_to_device",
    "",
    "CREATE TABLE to_device (user_id TEXT NOT NULL, device_id TEXT NOT NULL, stream_pos INTEGER NOT NULL, sender TEXT NOT NULL, type TEXT NOT NULL, content TEXT NOT NULL, PRIMARY KEY (user_id, device_id, stream_pos))",
);
pub const V7_TO_DEVICE_TXNS: Sql = sql(
    "v7_to_device_txns",
    "",
    "CREATE TABLE to_device_txns (sender TEXT NOT NULL, device_id TEXT NOT NULL, txn_id TEXT NOT NULL, created_ms INTEGER NOT NULL, PRIMARY KEY (sender, device_id, txn_id))",
);

// ---- Schema, version 8: cross-signing keys --------------------------------------------------
pub const V8_CROSS_SIGNING: Sql = sql(
    "v8_cross_signing",
    "",
    "CREATE TABLE cross_signing_keys (user_id TEXT NOT NULL, kind TEXT NOT NULL, json TEXT NOT NULL, stream_pos INTEGER NOT NULL, PRIMARY KEY (user_id, kind))",
);
pub const V8_CROSS_SIGNING_STREAM: Sql = sql(
    "v8_cross_signing_stream",
    "",
    "CREATE INDEX cross_signing_keys_stream ON cross_signing_keys (stream_pos)",
);

// ---- Schema, version 9: server-side key backup -----------------------------------------------
pub const V9_BACKUP_VERSIONS: Sql = sql(
    "v9_backup_versions",
    "",
    "CREATE TABLE key_backup_versions (user_id TEXT NOT NULL, version INTEGER NOT NULL, algorithm TEXT NOT NULL, auth_data TEXT NOT NULL, etag INTEGER NOT NULL, deleted INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user_id, version))",
);
pub const V9_BACKUP_SESSIONS: Sql = sql(
    "v9_backup_sessions",
    "",
    "CREATE TABLE key_backup_sessions (user_id TEXT NOT NULL, version INTEGER NOT NULL, room_id TEXT NOT NULL, session_id TEXT NOT NULL, json TEXT NOT NULL, PRIMARY KEY (user_id, version, room_id, session_id))",
);

// ---- Schema, version 10: dehydrated devices (MSC3814) ----------------------------------------
pub const V10_DEHYDRATED: Sql = sql(
    "v10_dehydrated",
    "",
    "CREATE TABLE dehydrated_devices (user_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, device_data TEXT NOT NULL)",
);

// ---- Schema, version 11: to-device transaction guards per recipient --------------------------
/// A request's messages to one recipient were queued: the recipient's `User` object writes
/// this row in the same transaction as the messages, so a repeated or replayed write adds
/// nothing. Per recipient, because each recipient's object writes its own share.
pub const V11_TO_DEVICE_GUARDS: Sql = sql(
    "v11_to_device_guards",
    "",
    "CREATE TABLE to_device_guards (user_id TEXT NOT NULL, sender TEXT NOT NULL, sender_device TEXT NOT NULL, txn_id TEXT NOT NULL, created_ms INTEGER NOT NULL, PRIMARY KEY (user_id, sender, sender_device, txn_id))",
);
/// The guards of version 7 were per sending device across all recipients.
pub const V11_DROP_TO_DEVICE_TXNS: Sql = sql("v11_drop_to_device_txns", "", "DROP TABLE to_device_txns");

// ---- Schema, version 12: unread counts computed by earlier syncs ------------------------------
/// A user's notification and highlight counts in a room over the events after `from_seq` (their
/// read marker or join) up to `upto_seq`, `counted` events in all, under the push rules whose
/// hash is `rules_tag`. A sync counts only the events after `upto_seq` when `from_seq` and the
/// tag still match (see `api::sync`).
pub const V12_UNREAD_COUNTS: Sql = sql(
    "v12_unread_counts",
    "",
    "CREATE TABLE unread_counts (user_id TEXT NOT NULL, room_id TEXT NOT NULL, from_seq INTEGER NOT NULL, upto_seq INTEGER NOT NULL, rules_tag TEXT NOT NULL, counted INTEGER NOT NULL, notify INTEGER NOT NULL, highlight INTEGER NOT NULL, PRIMARY KEY (user_id, room_id))",
);

// ---- Schema, version 13: state events by type -------------------------------------------------
/// A room's state events of one type without reading its messages: without it, finding a
/// room's history visibility events read every event of the room (~10 ms for 10 000 events,
/// on every sync that brought the room's timeline). Partial, so messages add nothing to it.
pub const V13_EVENTS_STATE_TYPE: Sql = sql(
    "v13_events_state_type",
    "",
    "CREATE INDEX events_state_type ON events (room_id, type) WHERE state_key IS NOT NULL",
);

/// The migration bookkeeping, created before anything else (idempotent).
pub const MIGRATIONS_TABLE: Sql = sql(
    "migrations_table",
    "",
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_ms INTEGER NOT NULL)",
);
pub const MIGRATION_LOCK_TABLE: Sql = sql(
    "migration_lock_table",
    "",
    "CREATE TABLE IF NOT EXISTS schema_lock (id INTEGER PRIMARY KEY, holder TEXT NOT NULL, expires_ms INTEGER NOT NULL)",
);
pub const SCHEMA_VERSION: Sql =
    sql("schema_version", "", "SELECT MAX(version) AS version FROM schema_migrations");
pub const MIGRATION_RECORD: Sql = sql(
    "migration_record",
    "iti",
    "INSERT INTO schema_migrations (version, name, applied_ms) VALUES (?, ?, ?)",
);
/// Takes the lock when it is free or its holder's lease ran out.
pub const LOCK_TAKE: Sql = sql(
    "lock_take",
    "tii",
    "INSERT INTO schema_lock (id, holder, expires_ms) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, expires_ms = excluded.expires_ms WHERE schema_lock.expires_ms < ?",
);
pub const LOCK_HOLDER: Sql = sql("lock_holder", "", "SELECT holder FROM schema_lock WHERE id = 1");
pub const LOCK_RELEASE: Sql = sql("lock_release", "t", "DELETE FROM schema_lock WHERE id = 1 AND holder = ?");

// ---- Accounts -------------------------------------------------------------------------------
pub const USER_INSERT: Sql = sql(
    "user_insert",
    "tTi",
    "INSERT INTO users (user_id, password_hash, created_ms) VALUES (?, ?, ?) ON CONFLICT (user_id) DO NOTHING",
);
pub const USER_GET: Sql = sql(
    "user_get",
    "t",
    "SELECT user_id, password_hash, displayname, avatar_url, deactivated FROM users WHERE user_id = ?",
);
pub const USER_SET_PASSWORD: Sql =
    sql("user_set_password", "tt", "UPDATE users SET password_hash = ? WHERE user_id = ?");
pub const USER_DEACTIVATE: Sql =
    sql("user_deactivate", "t", "UPDATE users SET deactivated = 1, password_hash = NULL WHERE user_id = ?");
pub const USER_SET_DISPLAYNAME: Sql =
    sql("user_set_displayname", "Tt", "UPDATE users SET displayname = ? WHERE user_id = ?");
pub const USER_SET_AVATAR: Sql =
    sql("user_set_avatar", "Tt", "UPDATE users SET avatar_url = ? WHERE user_id = ?");
pub const USER_SEARCH: Sql = sql(
    "user_search",
    "tti",
    "SELECT user_id, displayname, avatar_url FROM users WHERE deactivated = 0 AND (LOWER(user_id) LIKE ? OR LOWER(displayname) LIKE ?) ORDER BY user_id LIMIT ?",
);
pub const DEVICE_INSERT: Sql = sql(
    "device_insert",
    "ttTii",
    "INSERT INTO devices (user_id, device_id, display_name, created_ms, last_seen_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
);
pub const DEVICE_LIST: Sql = sql(
    "device_list",
    "t",
    "SELECT device_id, display_name, last_seen_ms FROM devices WHERE user_id = ? ORDER BY device_id",
);
pub const DEVICE_GET: Sql = sql(
    "device_get",
    "tt",
    "SELECT device_id, display_name, last_seen_ms FROM devices WHERE user_id = ? AND device_id = ?",
);
pub const DEVICE_RENAME: Sql =
    sql("device_rename", "Ttt", "UPDATE devices SET display_name = ? WHERE user_id = ? AND device_id = ?");
pub const DEVICE_DELETE: Sql =
    sql("device_delete", "tt", "DELETE FROM devices WHERE user_id = ? AND device_id = ?");
pub const DEVICE_DELETE_ALL: Sql = sql("device_delete_all", "t", "DELETE FROM devices WHERE user_id = ?");
pub const TOKEN_INSERT: Sql = sql(
    "token_insert",
    "tttiIT",
    "INSERT INTO access_tokens (token_hash, user_id, device_id, created_ms, expires_ms, refresh_hash) VALUES (?, ?, ?, ?, ?, ?)",
);
pub const TOKEN_LOOKUP: Sql = sql(
    "token_lookup",
    "t",
    "SELECT t.user_id, t.device_id, t.expires_ms, u.deactivated FROM access_tokens t JOIN users u ON u.user_id = t.user_id WHERE t.token_hash = ?",
);
/// [`TOKEN_LOOKUP`] plus the applied schema version, in one row even for an unknown token
/// (then `user_id` is NULL): an authenticated request learns the schema is current without a
/// query of its own.
pub const TOKEN_LOOKUP_VERSIONED: Sql = sql(
    "token_lookup_versioned",
    "t",
    "SELECT (SELECT MAX(version) FROM schema_migrations) AS schema_version, t.user_id, t.device_id, t.expires_ms, u.deactivated FROM (SELECT 1 AS one) o LEFT JOIN access_tokens t ON t.token_hash = ? LEFT JOIN users u ON u.user_id = t.user_id",
);
pub const LOGIN_TOKEN_INSERT: Sql = sql(
    "login_token_insert",
    "tti",
    "INSERT INTO login_tokens (token_hash, user_id, expires_ms) VALUES (?, ?, ?)",
);
pub const LOGIN_TOKEN_GET: Sql =
    sql("login_token_get", "t", "SELECT user_id, expires_ms FROM login_tokens WHERE token_hash = ?");
/// Uses a login token up: of concurrent logins with one token, exactly one deletes it.
pub const LOGIN_TOKEN_TAKE: Sql =
    sql("login_token_take", "ti", "DELETE FROM login_tokens WHERE token_hash = ? AND expires_ms > ?");
pub const LOGIN_TOKENS_EXPIRE: Sql =
    sql("login_tokens_expire", "i", "DELETE FROM login_tokens WHERE expires_ms <= ?");
pub const TOKEN_BY_REFRESH: Sql = sql(
    "token_by_refresh",
    "t",
    "SELECT token_hash, user_id, device_id FROM access_tokens WHERE refresh_hash = ?",
);
pub const TOKEN_DELETE: Sql = sql("token_delete", "t", "DELETE FROM access_tokens WHERE token_hash = ?");
pub const TOKEN_DELETE_DEVICE: Sql =
    sql("token_delete_device", "tt", "DELETE FROM access_tokens WHERE user_id = ? AND device_id = ?");
pub const TOKEN_DELETE_USER: Sql =
    sql("token_delete_user", "t", "DELETE FROM access_tokens WHERE user_id = ?");
pub const TOKEN_DELETE_USER_EXCEPT: Sql =
    sql("token_delete_user_except", "tt", "DELETE FROM access_tokens WHERE user_id = ? AND device_id <> ?");
pub const REG_TOKEN_INSERT: Sql = sql(
    "reg_token_insert",
    "tIIi",
    "INSERT INTO registration_tokens (token, uses_allowed, expiry_ms, created_ms) VALUES (?, ?, ?, ?)",
);
pub const REG_TOKEN_VALID: Sql = sql(
    "reg_token_valid",
    "ti",
    "SELECT token FROM registration_tokens WHERE token = ? AND (uses_allowed IS NULL OR completed < uses_allowed) AND (expiry_ms IS NULL OR expiry_ms > ?)",
);
/// Consumes one use; changes nothing (0 rows) when the token ran out meanwhile.
pub const REG_TOKEN_USE: Sql = sql(
    "reg_token_use",
    "t",
    "UPDATE registration_tokens SET completed = completed + 1 WHERE token = ? AND (uses_allowed IS NULL OR completed < uses_allowed)",
);
pub const REG_TOKEN_LIST: Sql = sql(
    "reg_token_list",
    "",
    "SELECT token, uses_allowed, completed, expiry_ms FROM registration_tokens ORDER BY token",
);

// ---- Rooms and events -----------------------------------------------------------------------
pub const ROOM_INSERT: Sql = sql(
    "room_insert",
    "ttti",
    "INSERT INTO rooms (room_id, room_version, creator, created_ms) VALUES (?, ?, ?, ?) ON CONFLICT (room_id) DO NOTHING",
);
pub const ROOM_GET: Sql =
    sql("room_get", "t", "SELECT room_id, room_version, creator, published FROM rooms WHERE room_id = ?");
pub const ROOM_SET_PUBLISHED: Sql =
    sql("room_set_published", "it", "UPDATE rooms SET published = ? WHERE room_id = ?");
pub const ROOMS_PUBLISHED: Sql = sql(
    "rooms_published",
    "ti",
    "SELECT room_id FROM rooms WHERE published = 1 AND room_id > ? ORDER BY room_id LIMIT ?",
);
/// The next stream position; in the same transaction as what it orders. The row lock it takes
/// makes positions commit in order (see ARCHITECTURE.md, "sync positions").
/// Fails (NOT NULL) unless D1 already has the room's event at `room_seq`: a flush that leaves
/// earlier outbox entries to a flush still in flight puts this first, so its events never land
/// before their predecessors.
pub const OUTBOX_GUARD: Sql = sql(
    "outbox_guard",
    "tti",
    "INSERT INTO outbox_guard (room_id, room_seq) VALUES (?, (SELECT room_seq FROM events WHERE room_id = ? AND room_seq = ?)) ON CONFLICT (room_id) DO UPDATE SET room_seq = excluded.room_seq",
);
pub const STREAM_BUMP: Sql =
    sql("stream_bump", "", "UPDATE stream_positions SET pos = pos + 1 WHERE name = 'events'");
pub const STREAM_MAX: Sql = sql("stream_max", "", "SELECT pos FROM stream_positions WHERE name = 'events'");
pub const EVENT_INSERT: Sql = sql(
    "event_insert",
    "ttitTtiTtTT",
    "INSERT INTO events (event_id, room_id, room_seq, stream_pos, type, state_key, sender, origin_ms, state_group, json, txn_device, txn_id) VALUES (?, ?, ?, (SELECT pos FROM stream_positions WHERE name = 'events'), ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
);
pub const EVENT_GET: Sql = sql(
    "event_get",
    "t",
    "SELECT event_id, room_id, room_seq, stream_pos, json, state_group, txn_device, txn_id FROM events WHERE event_id = ?",
);
pub const EVENT_REDACT: Sql = sql(
    "event_redact",
    "ttt",
    "UPDATE events SET json = ?, redacted_by = ? WHERE event_id = ? AND redacted_by IS NULL",
);
pub const EVENT_AT_SEQ: Sql =
    sql("event_at_seq", "ti", "SELECT event_id, state_group FROM events WHERE room_id = ? AND room_seq = ?");
pub const EVENTS_SINCE: Sql = sql(
    "events_since",
    "tiii",
    "SELECT event_id, room_id, room_seq, stream_pos, json, state_group, txn_device, txn_id FROM events WHERE room_id = ? AND stream_pos > ? AND stream_pos <= ? ORDER BY room_seq DESC LIMIT ?",
);
pub const EVENTS_BEFORE: Sql = sql(
    "events_before",
    "tii",
    "SELECT event_id, room_id, room_seq, stream_pos, json, state_group, txn_device, txn_id FROM events WHERE room_id = ? AND room_seq < ? ORDER BY room_seq DESC LIMIT ?",
);
pub const EVENTS_AFTER: Sql = sql(
    "events_after",
    "tii",
    "SELECT event_id, room_id, room_seq, stream_pos, json, state_group, txn_device, txn_id FROM events WHERE room_id = ? AND room_seq > ? ORDER BY room_seq ASC LIMIT ?",
);
/// Search candidates: the user's rooms' message, name and topic events below a stream
/// position, newest first, whose JSON contains a lower-case pattern.
pub const SEARCH_EVENTS: Sql = sql(
    "search_events",
    "titi",
    "SELECT e.event_id, e.room_id, e.room_seq, e.stream_pos, e.json, e.state_group, e.txn_device, e.txn_id FROM events e JOIN memberships m ON m.room_id = e.room_id WHERE m.user_id = ? AND e.stream_pos < ? AND e.type IN ('m.room.message', 'm.room.name', 'm.room.topic') AND e.redacted_by IS NULL AND LOWER(e.json) LIKE ? ORDER BY e.stream_pos DESC LIMIT ?",
);
pub const ROOM_SEQ_AT: Sql =
    sql("room_seq_at", "ti", "SELECT MAX(room_seq) AS seq FROM events WHERE room_id = ? AND stream_pos <= ?");
pub const STATE_GROUP_INSERT: Sql = sql(
    "state_group_insert",
    "ttTi",
    "INSERT INTO state_groups (group_id, room_id, parent, chain_len) VALUES (?, ?, ?, ?) ON CONFLICT (group_id) DO NOTHING",
);
pub const STATE_ENTRY_INSERT: Sql = sql(
    "state_entry_insert",
    "tttt",
    "INSERT INTO state_group_entries (group_id, type, state_key, event_id) VALUES (?, ?, ?, ?) ON CONFLICT (group_id, type, state_key) DO NOTHING",
);
/// The state of a group: its entries and its ancestors', nearest last (`depth` descending),
/// so applying the rows in order leaves the newest entry of each key.
pub const STATE_AT: Sql = sql(
    "state_at",
    "t",
    "WITH RECURSIVE chain (g, depth) AS (SELECT ?, 0 UNION ALL SELECT s.parent, chain.depth + 1 FROM state_groups s JOIN chain ON s.group_id = chain.g WHERE s.parent IS NOT NULL) SELECT e.type, e.state_key, e.event_id, chain.depth, ev.json FROM chain JOIN state_group_entries e ON e.group_id = chain.g JOIN events ev ON ev.event_id = e.event_id ORDER BY chain.depth DESC",
);
/// One entry of the state at a group: the nearest group in the chain that sets it.
pub const STATE_AT_KEY: Sql = sql(
    "state_at_key",
    "ttt",
    "WITH RECURSIVE chain (g, depth) AS (SELECT ?, 0 UNION ALL SELECT s.parent, chain.depth + 1 FROM state_groups s JOIN chain ON s.group_id = chain.g WHERE s.parent IS NOT NULL) SELECT e.event_id FROM chain JOIN state_group_entries e ON e.group_id = chain.g WHERE e.type = ? AND e.state_key = ? ORDER BY chain.depth ASC LIMIT 1",
);
/// The room's history visibility events (at most two: enough to know whether it ever changed).
pub const HISTORY_VISIBILITY_EVENTS: Sql = sql(
    "history_visibility_events",
    "t",
    "SELECT json FROM events WHERE room_id = ? AND type = 'm.room.history_visibility' AND state_key IS NOT NULL LIMIT 2",
);
pub const CURRENT_STATE_UPSERT: Sql = sql(
    "current_state_upsert",
    "tttti",
    "INSERT INTO current_state (room_id, type, state_key, event_id, room_seq) VALUES (?, ?, ?, ?, ?) ON CONFLICT (room_id, type, state_key) DO UPDATE SET event_id = excluded.event_id, room_seq = excluded.room_seq WHERE current_state.room_seq < excluded.room_seq",
);
pub const CURRENT_STATE: Sql = sql(
    "current_state",
    "t",
    "SELECT c.type, c.state_key, c.event_id, e.json FROM current_state c JOIN events e ON e.event_id = c.event_id WHERE c.room_id = ?",
);
/// What push rules need of a room's current state for one user: their own member event, the
/// power levels and the create event (not every member's event, as [`CURRENT_STATE`] reads).
pub const PUSH_STATE: Sql = sql(
    "push_state",
    "tt",
    "SELECT c.type, c.state_key, c.event_id, e.json FROM current_state c JOIN events e ON e.event_id = c.event_id WHERE c.room_id = ? AND ((c.type = 'm.room.member' AND c.state_key = ?) OR (c.type IN ('m.room.power_levels', 'm.room.create') AND c.state_key = ''))",
);
/// A room's joined members, counted from the membership table.
pub const ROOM_JOINED_COUNT: Sql = sql(
    "room_joined_count",
    "t",
    "SELECT COUNT(*) AS n FROM memberships WHERE room_id = ? AND membership = 'join'",
);
pub const CURRENT_STATE_ONE: Sql = sql(
    "current_state_one",
    "ttt",
    "SELECT c.event_id, e.json FROM current_state c JOIN events e ON e.event_id = c.event_id WHERE c.room_id = ? AND c.type = ? AND c.state_key = ?",
);
pub const MEMBERSHIP_UPSERT: Sql = sql(
    "membership_upsert",
    "tttti",
    "INSERT INTO memberships (room_id, user_id, membership, event_id, room_seq, stream_pos) VALUES (?, ?, ?, ?, ?, (SELECT pos FROM stream_positions WHERE name = 'events')) ON CONFLICT (room_id, user_id) DO UPDATE SET membership = excluded.membership, event_id = excluded.event_id, room_seq = excluded.room_seq, stream_pos = excluded.stream_pos WHERE memberships.room_seq < excluded.room_seq",
);
pub const USER_MEMBERSHIPS: Sql = sql(
    "user_memberships",
    "t",
    "SELECT m.room_id, m.membership, m.event_id, m.stream_pos, m.room_seq, r.room_version FROM memberships m JOIN rooms r ON r.room_id = m.room_id WHERE m.user_id = ?",
);
pub const ROOM_MEMBERS: Sql =
    sql("room_members", "t", "SELECT user_id, membership, event_id FROM memberships WHERE room_id = ?");
pub const MEMBERSHIP_GET: Sql = sql(
    "membership_get",
    "tt",
    "SELECT membership, event_id, stream_pos, room_seq FROM memberships WHERE room_id = ? AND user_id = ?",
);
pub const MEMBERSHIP_FORGET: Sql = sql(
    "membership_forget",
    "tt",
    "DELETE FROM memberships WHERE room_id = ? AND user_id = ? AND membership IN ('leave', 'ban')",
);
pub const ALIAS_INSERT: Sql = sql(
    "alias_insert",
    "ttt",
    "INSERT INTO room_aliases (alias, room_id, creator) VALUES (?, ?, ?) ON CONFLICT (alias) DO NOTHING",
);
pub const ALIAS_GET: Sql = sql("alias_get", "t", "SELECT room_id, creator FROM room_aliases WHERE alias = ?");
pub const ALIAS_DELETE: Sql = sql("alias_delete", "t", "DELETE FROM room_aliases WHERE alias = ?");
/// Points every alias of a room at another (room upgrades).
pub const ALIASES_MOVE: Sql =
    sql("aliases_move", "tt", "UPDATE room_aliases SET room_id = ? WHERE room_id = ?");
pub const ALIASES_OF_ROOM: Sql =
    sql("aliases_of_room", "t", "SELECT alias FROM room_aliases WHERE room_id = ? ORDER BY alias");

// ---- End-to-end encryption -------------------------------------------------------------------
// The device-list queries are used alone (`/keys/changes`) and inside `E2E_SYNC`; their text
// is written once, here.
macro_rules! device_list_changes {
    () => {
        "SELECT DISTINCT k.user_id FROM (SELECT user_id, stream_pos FROM device_keys UNION ALL SELECT user_id, stream_pos FROM cross_signing_keys) k WHERE k.stream_pos > ? AND k.stream_pos <= ? AND (k.user_id = ? OR k.user_id IN (SELECT m2.user_id FROM memberships m1 JOIN memberships m2 ON m2.room_id = m1.room_id WHERE m1.user_id = ? AND m1.membership = 'join' AND m2.membership = 'join'))"
    };
}
macro_rules! device_list_left {
    () => {
        "SELECT DISTINCT m.user_id FROM memberships m WHERE m.user_id <> ? AND ((m.stream_pos > ? AND m.stream_pos <= ? AND m.membership <> 'join' AND m.room_id IN (SELECT room_id FROM memberships WHERE user_id = ?)) OR m.room_id IN (SELECT room_id FROM memberships WHERE user_id = ? AND membership <> 'join' AND stream_pos > ? AND stream_pos <= ?)) AND NOT EXISTS (SELECT 1 FROM memberships a JOIN memberships b ON b.room_id = a.room_id WHERE a.user_id = ? AND a.membership = 'join' AND b.user_id = m.user_id AND b.membership = 'join')"
    };
}
/// A device's keys; ordered on the stream so device-list changes never skip.
pub const DEVICE_KEYS_UPSERT: Sql = sql(
    "device_keys_upsert",
    "ttt",
    "INSERT INTO device_keys (user_id, device_id, json, stream_pos) VALUES (?, ?, ?, (SELECT pos FROM stream_positions WHERE name = 'events')) ON CONFLICT (user_id, device_id) DO UPDATE SET json = excluded.json, stream_pos = excluded.stream_pos",
);
pub const DEVICE_KEYS_GET: Sql =
    sql("device_keys_get", "tt", "SELECT json FROM device_keys WHERE user_id = ? AND device_id = ?");
/// The keys of a user's existing devices, with their display names.
pub const DEVICE_KEYS_OF_USER: Sql = sql(
    "device_keys_of_user",
    "t",
    "SELECT k.device_id, k.json, d.display_name FROM device_keys k JOIN devices d ON d.user_id = k.user_id AND d.device_id = k.device_id WHERE k.user_id = ? AND k.json <> ''",
);
/// A deleted device's keys: emptied, and moved on the stream so others see the change.
pub const DEVICE_KEYS_TOMBSTONE: Sql = sql(
    "device_keys_tombstone",
    "tt",
    "UPDATE device_keys SET json = '', stream_pos = (SELECT pos FROM stream_positions WHERE name = 'events') WHERE user_id = ? AND device_id = ?",
);
/// Users (the user and those sharing a joined room) whose device or cross-signing keys
/// changed in a range.
pub const DEVICE_LIST_CHANGES: Sql = sql("device_list_changes", "iitt", device_list_changes!());
/// A cross-signing key (`master`, `self_signing`, `user_signing`), moved on the stream.
pub const CROSS_SIGNING_UPSERT: Sql = sql(
    "cross_signing_upsert",
    "ttt",
    "INSERT INTO cross_signing_keys (user_id, kind, json, stream_pos) VALUES (?, ?, ?, (SELECT pos FROM stream_positions WHERE name = 'events')) ON CONFLICT (user_id, kind) DO UPDATE SET json = excluded.json, stream_pos = excluded.stream_pos",
);
pub const CROSS_SIGNING_OF_USER: Sql =
    sql("cross_signing_of_user", "t", "SELECT kind, json FROM cross_signing_keys WHERE user_id = ?");
/// A new backup version: one more than any the user ever had (deleted ones included).
pub const BACKUP_VERSION_CREATE: Sql = sql(
    "backup_version_create",
    "tttt",
    "INSERT INTO key_backup_versions (user_id, version, algorithm, auth_data, etag) VALUES (?, (SELECT COALESCE(MAX(version), 0) + 1 FROM key_backup_versions WHERE user_id = ?), ?, ?, 0)",
);
pub const BACKUP_VERSION_LATEST: Sql = sql(
    "backup_version_latest",
    "t",
    "SELECT version, algorithm, auth_data, etag, (SELECT COUNT(*) FROM key_backup_sessions s WHERE s.user_id = v.user_id AND s.version = v.version) AS count FROM key_backup_versions v WHERE v.user_id = ? AND v.deleted = 0 ORDER BY v.version DESC LIMIT 1",
);
pub const BACKUP_VERSION_GET: Sql = sql(
    "backup_version_get",
    "ti",
    "SELECT version, algorithm, auth_data, etag, (SELECT COUNT(*) FROM key_backup_sessions s WHERE s.user_id = v.user_id AND s.version = v.version) AS count FROM key_backup_versions v WHERE v.user_id = ? AND v.version = ? AND v.deleted = 0",
);
pub const BACKUP_VERSION_UPDATE: Sql = sql(
    "backup_version_update",
    "tti",
    "UPDATE key_backup_versions SET auth_data = ? WHERE user_id = ? AND version = ? AND deleted = 0",
);
pub const BACKUP_VERSION_DELETE: Sql = sql(
    "backup_version_delete",
    "ti",
    "UPDATE key_backup_versions SET deleted = 1 WHERE user_id = ? AND version = ? AND deleted = 0",
);
/// Moves the version's etag on: its stored keys changed.
pub const BACKUP_ETAG_BUMP: Sql = sql(
    "backup_etag_bump",
    "ti",
    "UPDATE key_backup_versions SET etag = etag + 1 WHERE user_id = ? AND version = ?",
);
pub const BACKUP_SESSION_UPSERT: Sql = sql(
    "backup_session_upsert",
    "tittt",
    "INSERT INTO key_backup_sessions (user_id, version, room_id, session_id, json) VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, version, room_id, session_id) DO UPDATE SET json = excluded.json",
);
pub const BACKUP_SESSION_GET: Sql = sql(
    "backup_session_get",
    "titt",
    "SELECT json FROM key_backup_sessions WHERE user_id = ? AND version = ? AND room_id = ? AND session_id = ?",
);
pub const BACKUP_SESSIONS_ALL: Sql = sql(
    "backup_sessions_all",
    "ti",
    "SELECT room_id, session_id, json FROM key_backup_sessions WHERE user_id = ? AND version = ?",
);
pub const BACKUP_SESSIONS_DELETE_ALL: Sql = sql(
    "backup_sessions_delete_all",
    "ti",
    "DELETE FROM key_backup_sessions WHERE user_id = ? AND version = ?",
);
pub const BACKUP_SESSIONS_DELETE_ROOM: Sql = sql(
    "backup_sessions_delete_room",
    "tit",
    "DELETE FROM key_backup_sessions WHERE user_id = ? AND version = ? AND room_id = ?",
);
pub const BACKUP_SESSIONS_DELETE_ONE: Sql = sql(
    "backup_sessions_delete_one",
    "titt",
    "DELETE FROM key_backup_sessions WHERE user_id = ? AND version = ? AND room_id = ? AND session_id = ?",
);
pub const DEHYDRATED_UPSERT: Sql = sql(
    "dehydrated_upsert",
    "ttt",
    "INSERT INTO dehydrated_devices (user_id, device_id, device_data) VALUES (?, ?, ?) ON CONFLICT (user_id) DO UPDATE SET device_id = excluded.device_id, device_data = excluded.device_data",
);
pub const DEHYDRATED_GET: Sql =
    sql("dehydrated_get", "t", "SELECT device_id, device_data FROM dehydrated_devices WHERE user_id = ?");
pub const DEHYDRATED_DELETE: Sql =
    sql("dehydrated_delete", "t", "DELETE FROM dehydrated_devices WHERE user_id = ?");
/// Users who stopped sharing any joined room with the user in a range (`device_lists.left`):
/// those whose membership in one of the user's rooms moved off `join`, and the members of
/// rooms the user left, that share no joined room with the user now.
pub const DEVICE_LIST_LEFT: Sql = sql("device_list_left", "tiittiit", device_list_left!());
/// Everything end-to-end encryption adds to one `/sync`, in one round trip, as `(kind, a, b,
/// c, d)` rows: `d` the device's to-device messages in `(since, upto]` (sender, type, content,
/// position; at most `limit`), `a` how many messages at or before `since` wait to be deleted
/// (in `d`), `n` the one-time key counts and unused fallback types, `c` users whose keys
/// changed in `(from, to]` and `l` users who stopped sharing a room in it (as
/// [`DEVICE_LIST_CHANGES`] and [`DEVICE_LIST_LEFT`]).
pub const E2E_SYNC: Sql = sql(
    "e2e_sync",
    "ttiiittittiitttiittiit",
    concat!(
        "SELECT 'd' AS kind, td.sender AS a, td.type AS b, td.content AS c, td.stream_pos AS d FROM (SELECT sender, type, content, stream_pos FROM to_device WHERE user_id = ? AND device_id = ? AND stream_pos > ? AND stream_pos <= ? ORDER BY stream_pos LIMIT ?) td",
        " UNION ALL SELECT 'a', NULL, NULL, NULL, COUNT(*) FROM to_device WHERE user_id = ? AND device_id = ? AND stream_pos <= ?",
        " UNION ALL SELECT 'n', counts, fallback_unused, NULL, NULL FROM e2e_key_counts WHERE user_id = ? AND device_id = ?",
        " UNION ALL SELECT 'c', ch.user_id, NULL, NULL, NULL FROM (",
        device_list_changes!(),
        ") ch UNION ALL SELECT 'l', lf.user_id, NULL, NULL, NULL FROM (",
        device_list_left!(),
        ") lf"
    ),
);
pub const E2E_COUNTS_UPSERT: Sql = sql(
    "e2e_counts_upsert",
    "tttt",
    "INSERT INTO e2e_key_counts (user_id, device_id, counts, fallback_unused) VALUES (?, ?, ?, ?) ON CONFLICT (user_id, device_id) DO UPDATE SET counts = excluded.counts, fallback_unused = excluded.fallback_unused",
);
pub const E2E_COUNTS_DELETE: Sql =
    sql("e2e_counts_delete", "tt", "DELETE FROM e2e_key_counts WHERE user_id = ? AND device_id = ?");

/// A to-device message, unless this recipient already has the sender device's transaction id
/// (the guard, written by the same batch) or the device is gone; ordered on the stream (bumped
/// just before) so a device's queue never skips.
pub const TO_DEVICE_INSERT: Sql = sql(
    "to_device_insert",
    "ttttttttttt",
    "INSERT INTO to_device (user_id, device_id, stream_pos, sender, type, content) SELECT ?, ?, (SELECT pos FROM stream_positions WHERE name = 'events'), ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM to_device_guards WHERE user_id = ? AND sender = ? AND sender_device = ? AND txn_id = ?) AND EXISTS (SELECT 1 FROM devices WHERE user_id = ? AND device_id = ?)",
);
pub const TO_DEVICE_GUARD_INSERT: Sql = sql(
    "to_device_guard_insert",
    "tttti",
    "INSERT INTO to_device_guards (user_id, sender, sender_device, txn_id, created_ms) VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, sender, sender_device, txn_id) DO NOTHING",
);
pub const TO_DEVICE_GUARD_GET: Sql = sql(
    "to_device_guard_get",
    "tttt",
    "SELECT created_ms FROM to_device_guards WHERE user_id = ? AND sender = ? AND sender_device = ? AND txn_id = ?",
);
pub const TO_DEVICE_QUEUE_LEN: Sql = sql(
    "to_device_queue_len",
    "tt",
    "SELECT COUNT(*) AS n FROM to_device WHERE user_id = ? AND device_id = ?",
);
pub const TO_DEVICE_FOR_DEVICE: Sql = sql(
    "to_device_for_device",
    "ttii",
    "SELECT stream_pos, sender, type, content FROM to_device WHERE user_id = ? AND device_id = ? AND stream_pos <= ? ORDER BY stream_pos LIMIT ?",
);
/// Deletes what a device acknowledged by syncing with a later since token.
pub const TO_DEVICE_ACK: Sql = sql(
    "to_device_ack",
    "tti",
    "DELETE FROM to_device WHERE user_id = ? AND device_id = ? AND stream_pos <= ?",
);
pub const TO_DEVICE_DROP_DEVICE: Sql =
    sql("to_device_drop_device", "tt", "DELETE FROM to_device WHERE user_id = ? AND device_id = ?");

// ---- Typing, receipts, presence, pushers -----------------------------------------------------
pub const TYPING_UPSERT: Sql = sql(
    "typing_upsert",
    "tti",
    "INSERT INTO typing (room_id, user_id, expires_ms, stream_pos) VALUES (?, ?, ?, (SELECT pos FROM stream_positions WHERE name = 'events')) ON CONFLICT (room_id, user_id) DO UPDATE SET expires_ms = excluded.expires_ms, stream_pos = excluded.stream_pos",
);
/// Typing rows of every room the user is joined to.
pub const TYPING_FOR_USER: Sql = sql(
    "typing_for_user",
    "t",
    "SELECT t.room_id, t.user_id, t.expires_ms, t.stream_pos FROM typing t JOIN memberships m ON m.room_id = t.room_id WHERE m.user_id = ? AND m.membership = 'join'",
);
pub const RECEIPT_UPSERT: Sql = sql(
    "receipt_upsert",
    "ttttti",
    "INSERT INTO receipts (room_id, user_id, receipt_type, thread_id, event_id, ts, stream_pos) VALUES (?, ?, ?, ?, ?, ?, (SELECT pos FROM stream_positions WHERE name = 'events')) ON CONFLICT (room_id, user_id, receipt_type, thread_id) DO UPDATE SET event_id = excluded.event_id, ts = excluded.ts, stream_pos = excluded.stream_pos",
);
/// Receipts changed in `(since, upto]` in the user's joined rooms.
pub const RECEIPTS_FOR_USER: Sql = sql(
    "receipts_for_user",
    "tii",
    "SELECT r.room_id, r.user_id, r.receipt_type, r.thread_id, r.event_id, r.ts FROM receipts r JOIN memberships m ON m.room_id = r.room_id WHERE m.user_id = ? AND m.membership = 'join' AND r.stream_pos > ? AND r.stream_pos <= ?",
);
/// The room position of the user's newest read receipt (public or private, main timeline).
pub const UNREAD_COUNTS_GET: Sql = sql(
    "unread_counts_get",
    "tt",
    "SELECT from_seq, upto_seq, rules_tag, counted, notify, highlight FROM unread_counts WHERE user_id = ? AND room_id = ?",
);
/// Keeps the row that counted further when two syncs race (both are right).
pub const UNREAD_COUNTS_PUT: Sql = sql(
    "unread_counts_put",
    "ttiitiii",
    "INSERT INTO unread_counts (user_id, room_id, from_seq, upto_seq, rules_tag, counted, notify, highlight) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, room_id) DO UPDATE SET from_seq = excluded.from_seq, upto_seq = excluded.upto_seq, rules_tag = excluded.rules_tag, counted = excluded.counted, notify = excluded.notify, highlight = excluded.highlight WHERE unread_counts.from_seq <> excluded.from_seq OR unread_counts.rules_tag <> excluded.rules_tag OR unread_counts.upto_seq < excluded.upto_seq",
);
pub const READ_UP_TO: Sql = sql(
    "read_up_to",
    "tt",
    "SELECT MAX(e.room_seq) AS seq FROM receipts r JOIN events e ON e.event_id = r.event_id WHERE r.room_id = ? AND r.user_id = ? AND r.receipt_type IN ('m.read', 'm.read.private') AND r.thread_id IN ('', 'main')",
);
pub const PRESENCE_UPSERT: Sql = sql(
    "presence_upsert",
    "ttTi",
    "INSERT INTO presence (user_id, presence, status_msg, last_active_ms, stream_pos) VALUES (?, ?, ?, ?, (SELECT pos FROM stream_positions WHERE name = 'events')) ON CONFLICT (user_id) DO UPDATE SET presence = excluded.presence, status_msg = excluded.status_msg, last_active_ms = excluded.last_active_ms, stream_pos = excluded.stream_pos",
);
pub const PRESENCE_GET: Sql = sql(
    "presence_get",
    "t",
    "SELECT user_id, presence, status_msg, last_active_ms FROM presence WHERE user_id = ?",
);
/// Presence changed in `(since, upto]` of the user and of everyone sharing a joined room.
pub const PRESENCE_FOR_USER: Sql = sql(
    "presence_for_user",
    "ttii",
    "SELECT p.user_id, p.presence, p.status_msg, p.last_active_ms FROM presence p WHERE (p.user_id = ? OR p.user_id IN (SELECT m2.user_id FROM memberships m1 JOIN memberships m2 ON m2.room_id = m1.room_id WHERE m1.user_id = ? AND m1.membership = 'join' AND m2.membership = 'join')) AND p.stream_pos > ? AND p.stream_pos <= ?",
);
pub const PUSHER_UPSERT: Sql = sql(
    "pusher_upsert",
    "tttt",
    "INSERT INTO pushers (user_id, app_id, pushkey, json) VALUES (?, ?, ?, ?) ON CONFLICT (user_id, app_id, pushkey) DO UPDATE SET json = excluded.json",
);
pub const PUSHER_DELETE: Sql =
    sql("pusher_delete", "ttt", "DELETE FROM pushers WHERE user_id = ? AND app_id = ? AND pushkey = ?");
pub const PUSHERS_LIST: Sql =
    sql("pushers_list", "t", "SELECT json FROM pushers WHERE user_id = ? ORDER BY app_id, pushkey");

// ---- Relations and threads ------------------------------------------------------------------
pub const RELATION_INSERT: Sql = sql(
    "relation_insert",
    "tttttti",
    "INSERT INTO relations (event_id, room_id, parent_id, rel_type, event_type, sender, room_seq) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id) DO NOTHING",
);
/// Children of an event, newest first, before a room position.
pub const RELATIONS_BACK: Sql = sql(
    "relations_back",
    "tii",
    "SELECT e.event_id, e.room_id, e.room_seq, e.stream_pos, e.json, e.state_group, e.txn_device, e.txn_id FROM relations r JOIN events e ON e.event_id = r.event_id WHERE r.parent_id = ? AND r.room_seq < ? ORDER BY r.room_seq DESC LIMIT ?",
);
pub const RELATIONS_BACK_REL: Sql = sql(
    "relations_back_rel",
    "ttii",
    "SELECT e.event_id, e.room_id, e.room_seq, e.stream_pos, e.json, e.state_group, e.txn_device, e.txn_id FROM relations r JOIN events e ON e.event_id = r.event_id WHERE r.parent_id = ? AND r.rel_type = ? AND r.room_seq < ? ORDER BY r.room_seq DESC LIMIT ?",
);
pub const RELATIONS_BACK_REL_TYPE: Sql = sql(
    "relations_back_rel_type",
    "tttii",
    "SELECT e.event_id, e.room_id, e.room_seq, e.stream_pos, e.json, e.state_group, e.txn_device, e.txn_id FROM relations r JOIN events e ON e.event_id = r.event_id WHERE r.parent_id = ? AND r.rel_type = ? AND r.event_type = ? AND r.room_seq < ? ORDER BY r.room_seq DESC LIMIT ?",
);
/// Children of an event, oldest first, from a room position on.
pub const RELATIONS_FWD: Sql = sql(
    "relations_fwd",
    "tii",
    "SELECT e.event_id, e.room_id, e.room_seq, e.stream_pos, e.json, e.state_group, e.txn_device, e.txn_id FROM relations r JOIN events e ON e.event_id = r.event_id WHERE r.parent_id = ? AND r.room_seq >= ? ORDER BY r.room_seq ASC LIMIT ?",
);
pub const RELATIONS_FWD_REL: Sql = sql(
    "relations_fwd_rel",
    "ttii",
    "SELECT e.event_id, e.room_id, e.room_seq, e.stream_pos, e.json, e.state_group, e.txn_device, e.txn_id FROM relations r JOIN events e ON e.event_id = r.event_id WHERE r.parent_id = ? AND r.rel_type = ? AND r.room_seq >= ? ORDER BY r.room_seq ASC LIMIT ?",
);
pub const RELATIONS_FWD_REL_TYPE: Sql = sql(
    "relations_fwd_rel_type",
    "tttii",
    "SELECT e.event_id, e.room_id, e.room_seq, e.stream_pos, e.json, e.state_group, e.txn_device, e.txn_id FROM relations r JOIN events e ON e.event_id = r.event_id WHERE r.parent_id = ? AND r.rel_type = ? AND r.event_type = ? AND r.room_seq >= ? ORDER BY r.room_seq ASC LIMIT ?",
);
/// Thread roots of a room by latest activity, before a room position.
pub const THREAD_ROOTS: Sql = sql(
    "thread_roots",
    "tii",
    "SELECT parent_id, MAX(room_seq) AS latest_seq, COUNT(*) AS replies FROM relations WHERE room_id = ? AND rel_type = 'm.thread' GROUP BY parent_id HAVING MAX(room_seq) < ? ORDER BY latest_seq DESC LIMIT ?",
);
/// How many replies of a thread a user sent.
pub const THREAD_REPLIES_BY: Sql = sql(
    "thread_replies_by",
    "tt",
    "SELECT COUNT(*) AS n FROM relations WHERE parent_id = ? AND rel_type = 'm.thread' AND sender = ?",
);

// ---- Account data and filters ---------------------------------------------------------------
pub const ACCOUNT_DATA_UPSERT: Sql = sql(
    "account_data_upsert",
    "tttt",
    "INSERT INTO account_data (user_id, room_id, type, content, stream_pos) VALUES (?, ?, ?, ?, (SELECT pos FROM stream_positions WHERE name = 'events')) ON CONFLICT (user_id, room_id, type) DO UPDATE SET content = excluded.content, stream_pos = excluded.stream_pos",
);
pub const ACCOUNT_DATA_GET: Sql = sql(
    "account_data_get",
    "ttt",
    "SELECT content FROM account_data WHERE user_id = ? AND room_id = ? AND type = ?",
);
pub const ACCOUNT_DATA_SINCE: Sql = sql(
    "account_data_since",
    "tii",
    "SELECT room_id, type, content FROM account_data WHERE user_id = ? AND stream_pos > ? AND stream_pos <= ?",
);
pub const FILTER_INSERT: Sql = sql(
    "filter_insert",
    "ttt",
    "INSERT INTO filters (user_id, filter_id, json) VALUES (?, ?, ?) ON CONFLICT (user_id, filter_id) DO NOTHING",
);
pub const FILTER_GET: Sql =
    sql("filter_get", "tt", "SELECT json FROM filters WHERE user_id = ? AND filter_id = ?");

/// Every statement, for the registry test.
pub const ALL: &[Sql] = &[
    MIGRATIONS_TABLE,
    MIGRATION_LOCK_TABLE,
    SCHEMA_VERSION,
    MIGRATION_RECORD,
    LOCK_TAKE,
    LOCK_HOLDER,
    LOCK_RELEASE,
    USER_INSERT,
    USER_GET,
    USER_SET_PASSWORD,
    USER_DEACTIVATE,
    USER_SET_DISPLAYNAME,
    USER_SET_AVATAR,
    USER_SEARCH,
    DEVICE_INSERT,
    DEVICE_LIST,
    DEVICE_GET,
    DEVICE_RENAME,
    DEVICE_DELETE,
    DEVICE_DELETE_ALL,
    TOKEN_INSERT,
    TOKEN_LOOKUP,
    TOKEN_LOOKUP_VERSIONED,
    LOGIN_TOKEN_INSERT,
    LOGIN_TOKEN_GET,
    LOGIN_TOKEN_TAKE,
    LOGIN_TOKENS_EXPIRE,
    TOKEN_BY_REFRESH,
    TOKEN_DELETE,
    TOKEN_DELETE_DEVICE,
    TOKEN_DELETE_USER,
    TOKEN_DELETE_USER_EXCEPT,
    REG_TOKEN_INSERT,
    REG_TOKEN_VALID,
    REG_TOKEN_USE,
    REG_TOKEN_LIST,
    ROOM_INSERT,
    ROOM_GET,
    ROOM_SET_PUBLISHED,
    ROOMS_PUBLISHED,
    OUTBOX_GUARD,
    STREAM_BUMP,
    STREAM_MAX,
    EVENT_INSERT,
    EVENT_GET,
    EVENT_REDACT,
    EVENT_AT_SEQ,
    EVENTS_SINCE,
    EVENTS_BEFORE,
    EVENTS_AFTER,
    ROOM_SEQ_AT,
    SEARCH_EVENTS,
    STATE_GROUP_INSERT,
    STATE_ENTRY_INSERT,
    STATE_AT,
    CURRENT_STATE_UPSERT,
    CURRENT_STATE,
    PUSH_STATE,
    ROOM_JOINED_COUNT,
    CURRENT_STATE_ONE,
    MEMBERSHIP_UPSERT,
    USER_MEMBERSHIPS,
    ROOM_MEMBERS,
    MEMBERSHIP_GET,
    MEMBERSHIP_FORGET,
    ALIAS_INSERT,
    ALIAS_GET,
    ALIAS_DELETE,
    ALIASES_MOVE,
    DEVICE_KEYS_UPSERT,
    DEVICE_KEYS_GET,
    DEVICE_KEYS_OF_USER,
    DEVICE_KEYS_TOMBSTONE,
    DEVICE_LIST_CHANGES,
    CROSS_SIGNING_UPSERT,
    CROSS_SIGNING_OF_USER,
    BACKUP_VERSION_CREATE,
    BACKUP_VERSION_LATEST,
    BACKUP_VERSION_GET,
    BACKUP_VERSION_UPDATE,
    BACKUP_VERSION_DELETE,
    BACKUP_ETAG_BUMP,
    BACKUP_SESSION_UPSERT,
    BACKUP_SESSION_GET,
    BACKUP_SESSIONS_ALL,
    BACKUP_SESSIONS_DELETE_ALL,
    BACKUP_SESSIONS_DELETE_ROOM,
    BACKUP_SESSIONS_DELETE_ONE,
    DEHYDRATED_UPSERT,
    DEHYDRATED_GET,
    DEHYDRATED_DELETE,
    DEVICE_LIST_LEFT,
    E2E_SYNC,
    E2E_COUNTS_UPSERT,
    E2E_COUNTS_DELETE,
    TO_DEVICE_INSERT,
    TO_DEVICE_GUARD_INSERT,
    TO_DEVICE_GUARD_GET,
    TO_DEVICE_QUEUE_LEN,
    TO_DEVICE_FOR_DEVICE,
    TO_DEVICE_ACK,
    TO_DEVICE_DROP_DEVICE,
    ALIASES_OF_ROOM,
    ACCOUNT_DATA_UPSERT,
    ACCOUNT_DATA_GET,
    ACCOUNT_DATA_SINCE,
    FILTER_INSERT,
    FILTER_GET,
    TYPING_UPSERT,
    TYPING_FOR_USER,
    RECEIPT_UPSERT,
    RECEIPTS_FOR_USER,
    READ_UP_TO,
    UNREAD_COUNTS_GET,
    UNREAD_COUNTS_PUT,
    PRESENCE_UPSERT,
    PRESENCE_GET,
    PRESENCE_FOR_USER,
    PUSHER_UPSERT,
    PUSHER_DELETE,
    PUSHERS_LIST,
    STATE_AT_KEY,
    HISTORY_VISIBILITY_EVENTS,
    RELATION_INSERT,
    RELATIONS_BACK,
    RELATIONS_BACK_REL,
    RELATIONS_BACK_REL_TYPE,
    RELATIONS_FWD,
    RELATIONS_FWD_REL,
    RELATIONS_FWD_REL_TYPE,
    THREAD_ROOTS,
    THREAD_REPLIES_BY,
];

/// Versioned schema migrations: each runs once, in one transaction with its record.
pub const MIGRATIONS: &[(i64, &str, &[Sql])] = &[
    (
        1,
        "initial schema",
        &[
            V1_USERS,
            V1_DEVICES,
            V1_TOKENS,
            V1_TOKENS_DEVICE,
            V1_TOKENS_REFRESH,
            V1_REG_TOKENS,
            V1_STREAM,
            V1_STREAM_SEED,
            V1_ROOMS,
            V1_EVENTS,
            V1_EVENTS_SEQ,
            V1_EVENTS_STREAM,
            V1_STATE_GROUPS,
            V1_STATE_ENTRIES,
            V1_CURRENT_STATE,
            V1_MEMBERSHIPS,
            V1_MEMBERSHIPS_USER,
            V1_ALIASES,
            V1_ACCOUNT_DATA,
            V1_FILTERS,
        ],
    ),
    (
        2,
        "typing, receipts, presence, pushers",
        &[V2_TYPING, V2_RECEIPTS, V2_RECEIPTS_STREAM, V2_PRESENCE, V2_PUSHERS],
    ),
    (3, "relations", &[V3_RELATIONS, V3_RELATIONS_PARENT, V3_RELATIONS_THREADS]),
    (4, "outbox guard", &[V4_OUTBOX_GUARD]),
    (5, "login tokens", &[V5_LOGIN_TOKENS]),
    (6, "end-to-end encryption keys", &[V6_DEVICE_KEYS, V6_DEVICE_KEYS_STREAM, V6_E2E_COUNTS]),
    (7, "to-device messages", &[V7_TO_DEVICE, V7_TO_DEVICE_TXNS]),
    (8, "cross-signing keys", &[V8_CROSS_SIGNING, V8_CROSS_SIGNING_STREAM]),
    (9, "key backup", &[V9_BACKUP_VERSIONS, V9_BACKUP_SESSIONS]),
    (10, "dehydrated devices", &[V10_DEHYDRATED]),
    (11, "to-device guards per recipient", &[V11_TO_DEVICE_GUARDS, V11_DROP_TO_DEVICE_TXNS]),
    (12, "unread counts", &[V12_UNREAD_COUNTS]),
    (13, "state events by type", &[V13_EVENTS_STATE_TYPE]),
];
