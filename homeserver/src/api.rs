//! The HTTP entry point: reads a request, routes it, and renders the reply or the Matrix error.

pub mod account;
pub mod admin;
pub mod backup;
pub mod cross_signing;
pub mod dehydrated;
pub mod discovery;
pub mod ephemeral;
pub mod keys;
pub mod relations;
pub mod rooms;
pub mod search;
pub mod sync;
pub mod upgrade;
pub mod visibility;

use std::cell::OnceCell;

use lattice_worker::bindings::lattice::bindings::{kv, signals};
use lattice_worker::http::{self, Request};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

use crate::config::Settings;
use crate::db::{self, Db, sql};
use crate::error::{Error, Result};
use crate::util;

/// What a handler answers.
#[derive(Debug)]
pub enum Reply {
    Json(u16, Value),
    /// Park this request until a key is signalled or the timeout passes, then run it again.
    Park {
        keys: Vec<String>,
        timeout_ms: u32,
        /// Kept by the host for the re-run ([`Ctx::noted_session`]).
        note: Option<Vec<u8>>,
    },
}

pub fn ok(v: Value) -> Result<Reply> {
    Ok(Reply::Json(200, v))
}

/// The signed-in user of a request.
#[derive(Debug, Clone)]
pub struct Session {
    pub user_id: String,
    pub device_id: String,
    pub token_hash: String,
}

impl Session {
    /// What a parked request keeps for its re-run ([`Ctx::noted_session`]), with the handler's
    /// own fields in `more` (an object).
    pub fn note(&self, mut more: Value) -> Vec<u8> {
        if let Some(m) = more.as_object_mut() {
            m.insert("token_hash".into(), json!(self.token_hash));
            m.insert("user_id".into(), json!(self.user_id));
            m.insert("device_id".into(), json!(self.device_id));
        }
        more.to_string().into_bytes()
    }
}

/// The session of a [`sql::TOKEN_LOOKUP_VERSIONED`] row (none: an unknown token).
fn session_of(row: Option<&db::Row>, token_hash: String) -> Result<Session> {
    let row =
        row.filter(|r| r.text("user_id").is_some()).ok_or(Error::UnknownToken { soft_logout: false })?;
    if row.int("deactivated").unwrap_or(0) != 0 {
        return Err(Error::UnknownToken { soft_logout: false });
    }
    if let Some(expires) = row.int("expires_ms")
        && expires <= util::now_ms() as i64
    {
        return Err(Error::UnknownToken { soft_logout: true });
    }
    Ok(Session { user_id: row.str("user_id"), device_id: row.str("device_id"), token_hash })
}

/// Everything a handler needs about its request.
pub struct Ctx {
    pub req: Request,
    pub settings: Settings,
    db: OnceCell<Db>,
    /// Path segments after the API prefix, percent-decoded.
    pub segments: Vec<String>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx").field("path", &self.req.path).finish_non_exhaustive()
    }
}

impl Ctx {
    /// The database, migrated to the newest schema.
    pub fn db(&self) -> Result<&Db> {
        if let Some(db) = self.db.get() {
            return Ok(db);
        }
        let db = Db::open()?;
        let holder = util::random_alpha(16);
        db.migrate(&holder, util::now_ms() as i64).map_err(|e| match e {
            db::DbError::Migrating => Error::Unavailable { retry_after_secs: 1 },
            other => other.into(),
        })?;
        Ok(self.db.get_or_init(|| db))
    }

    /// The body as JSON of type `T`: `M_NOT_JSON` when it is not JSON, `M_BAD_JSON` when it
    /// does not have the expected shape.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        let body: &[u8] =
            if self.req.body.iter().all(u8::is_ascii_whitespace) { b"{}" } else { &self.req.body };
        let value: Value = serde_json::from_slice(body).map_err(|e| Error::NotJson(e.to_string()))?;
        if !value.is_object() {
            return Err(Error::BadJson("the body must be a JSON object".into()));
        }
        serde_json::from_value(value).map_err(|e| Error::BadJson(e.to_string()))
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.req.param(name)
    }

    fn access_token(&self) -> Option<String> {
        self.req
            .header("authorization")
            .and_then(|h| h.strip_prefix("Bearer ").map(|t| t.trim().to_owned()))
            .or_else(|| self.param("access_token").map(str::to_owned))
    }

    /// The session of the request's access token.
    pub fn session(&self) -> Result<Session> {
        let token = self.access_token().ok_or(Error::MissingToken)?;
        let hash = util::token_hash(&token);
        let lookup = |db: &Db| db.first(sql::TOKEN_LOOKUP_VERSIONED, vec![db::t(hash.clone())]);
        let row = match self.db.get() {
            Some(db) => lookup(db)?,
            // The lookup also says whether the schema is current, which saves the separate
            // check `db()` makes; when it is not (or the tables are missing), migrate first.
            None => {
                let db = Db::open()?;
                match lookup(&db) {
                    Ok(Some(row)) if row.int("schema_version").unwrap_or(0) >= db::LATEST_SCHEMA => {
                        let _ = self.db.set(db);
                        Some(row)
                    }
                    _ => lookup(self.db()?)?,
                }
            }
        };
        session_of(row.as_ref(), hash)
    }

    /// On the re-run of a parked request, the session its earlier run resolved, from the note
    /// it parked with ([`Session::note`]) when that is for this request's token. Not checked
    /// yet: the caller reads [`sql::TOKEN_LOOKUP_VERSIONED`] in the same batch as its data and
    /// passes the row to [`Ctx::confirm_noted`], so a token revoked while the request was
    /// parked gets no data, and the re-run makes no round trip of its own for it.
    /// The whole note comes back too, for the handler's own fields.
    pub fn noted_session(&self) -> Option<(Session, Value)> {
        self.req.header("lattice-wake")?;
        let note: Value = serde_json::from_slice(&signals::note()?).ok()?;
        let hash = util::token_hash(&self.access_token()?);
        let field = |k: &str| note.get(k).and_then(Value::as_str).map(str::to_owned);
        let session = (field("token_hash")? == hash).then_some(Session {
            user_id: field("user_id")?,
            device_id: field("device_id")?,
            token_hash: hash,
        })?;
        Some((session, note))
    }

    /// Checks a [`Ctx::noted_session`] against its token's row, read with `db` in the caller's
    /// batch: true when the token still is that user's and device's (and `db` becomes this
    /// request's database), an error when it is not; false when the schema is not current,
    /// then the caller starts over the usual way (which migrates).
    pub fn confirm_noted(&self, db: Db, noted: &Session, row: Option<&db::Row>) -> Result<bool> {
        if row.and_then(|r| r.int("schema_version")).unwrap_or(0) < db::LATEST_SCHEMA {
            return Ok(false);
        }
        let s = session_of(row, noted.token_hash.clone())?;
        if (s.user_id.as_str(), s.device_id.as_str()) != (noted.user_id.as_str(), noted.device_id.as_str()) {
            return Err(Error::UnknownToken { soft_logout: false });
        }
        let _ = self.db.set(db);
        Ok(true)
    }

    /// A fixed-window rate limit over KV: `limit` hits per minute per `key`; 0 is off.
    pub fn rate_limit(&self, kind: &str, key: &str, limit: u64) -> Result<()> {
        if limit == 0 {
            return Ok(());
        }
        let now = util::now_ms();
        let window = now / 60_000;
        let k = format!("rl:{kind}:{key}:{window}");
        let Ok(ns) = kv::Namespace::open(KV_BINDING) else { return Ok(()) };
        let count = ns
            .get(&k)
            .ok()
            .flatten()
            .and_then(|v| String::from_utf8(v.value).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        if count >= limit {
            return Err(Error::LimitExceeded { retry_after_ms: 60_000 - now % 60_000 });
        }
        let options = kv::PutOptions { expiration: None, expiration_ttl: Some(120), metadata: None };
        // A KV outage must not lock users out: the limit then does not apply.
        let _ = ns.put(&k, (count + 1).to_string().as_bytes(), &options);
        Ok(())
    }
}

/// The longest note the host keeps for a parked request (`signals.park-with-note`).
const PARK_NOTE_MAX_BYTES: usize = 64 * 1024;

/// The KV binding's name.
pub const KV_BINDING: &str = "KV";

/// CORS headers on every response (browser clients).
const CORS: [(&str, &str); 3] = [
    ("access-control-allow-origin", "*"),
    ("access-control-allow-methods", "GET, POST, PUT, DELETE, OPTIONS"),
    ("access-control-allow-headers", "X-Requested-With, Content-Type, Authorization"),
];

pub fn serve(request: IncomingRequest, out: ResponseOutparam) {
    let req = match http::read(request) {
        Ok(r) => r,
        Err(e) => {
            let (status, body) = Error::BadJson(e).status_and_body();
            return respond(out, status, &body, None);
        }
    };
    let settings = Settings::load();
    match handle(req, settings) {
        Ok(Reply::Json(status, body)) => respond(out, status, &body, None),
        Ok(Reply::Park { keys, timeout_ms, note }) => {
            match note {
                // A longer note would trap; without one the re-run looks everything up again.
                Some(note) if note.len() <= PARK_NOTE_MAX_BYTES => {
                    signals::park_with_note(&keys, timeout_ms, &note)
                }
                _ => signals::park(&keys, timeout_ms),
            }
            // The host discards this answer and runs the request again when woken.
            respond(out, 200, &Value::Object(Default::default()), None);
        }
        Err(e) => {
            let (status, body) = e.status_and_body();
            respond(out, status, &body, e.retry_after_secs());
        }
    }
}

fn respond(out: ResponseOutparam, status: u16, body: &Value, retry_after: Option<u64>) {
    let retry = retry_after.map(|s| s.to_string());
    let mut headers: Vec<(&str, &str)> = CORS.to_vec();
    headers.push(("content-type", "application/json"));
    if let Some(r) = &retry {
        headers.push(("retry-after", r));
    }
    http::respond(out, status, &headers, body.to_string().as_bytes());
}

fn decode_segments(path: &str) -> Vec<String> {
    path.split('/').filter(|s| !s.is_empty()).map(percent_decode).collect()
}

/// Percent-decoding for path segments (`+` stays a plus).
fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_owned();
    }
    http::decode(&s.replace('+', "%2B"))
}

fn handle(req: Request, settings: Settings) -> Result<Reply> {
    if req.method == "OPTIONS" {
        return ok(Value::Object(Default::default()));
    }
    if req.body.len() > settings.max_json_body_bytes {
        return Err(Error::TooLarge);
    }
    let all = decode_segments(&req.path);
    let parts: Vec<&str> = all.iter().map(String::as_str).collect();
    let (prefix_len, area) = match parts.as_slice() {
        [".well-known", "matrix", ..] => (2, Area::WellKnown),
        ["_matrix", "client", "versions"] => (2, Area::Versions),
        ["_matrix", "client", "v3" | "r0" | "v1", ..] => (3, Area::Client),
        ["_matrix", "client", "unstable", "org.matrix.msc3814.v1", ..] => (4, Area::Dehydrated),
        ["_lattice", "admin", "v1", ..] => (3, Area::Admin),
        _ => return Err(Error::Unrecognized { method_not_allowed: false }),
    };
    let segments = all[prefix_len..].to_vec();
    let version = parts.get(2).copied().unwrap_or_default().to_owned();
    let ctx = Ctx { req, settings, db: OnceCell::new(), segments };
    match area {
        Area::WellKnown => discovery::well_known(&ctx),
        Area::Versions => discovery::versions(&ctx),
        Area::Admin => admin::route(&ctx),
        Area::Client => route_client(&ctx, &version),
        Area::Dehydrated => route_dehydrated(&ctx),
    }
}

enum Area {
    WellKnown,
    Versions,
    Client,
    /// MSC3814 under its unstable prefix.
    Dehydrated,
    Admin,
}

fn route_dehydrated(ctx: &Ctx) -> Result<Reply> {
    let s: Vec<&str> = ctx.segments.iter().map(String::as_str).collect();
    match (ctx.req.method.as_str(), s.as_slice()) {
        ("PUT", ["dehydrated_device"]) => dehydrated::put_route(ctx),
        ("GET", ["dehydrated_device"]) => dehydrated::get_route(ctx),
        ("DELETE", ["dehydrated_device"]) => dehydrated::delete_route(ctx),
        ("POST", ["dehydrated_device", device, "events"]) => dehydrated::events_route(ctx, device),
        _ => Err(unrecognized(ctx)),
    }
}

fn route_client(ctx: &Ctx, version: &str) -> Result<Reply> {
    let m = ctx.req.method.as_str();
    let s: Vec<&str> = ctx.segments.iter().map(String::as_str).collect();
    // Endpoints only defined under /v1.
    if version == "v1" {
        return match (m, s.as_slice()) {
            ("POST", ["login", "get_token"]) => account::get_login_token_route(ctx),
            ("GET", ["register", "m.login.registration_token", "validity"]) => {
                account::token_validity_route(ctx)
            }
            ("GET", ["rooms", room, "relations", event]) => {
                relations::relations_route(ctx, room, event, None, None)
            }
            ("GET", ["rooms", room, "relations", event, rel]) => {
                relations::relations_route(ctx, room, event, Some(rel), None)
            }
            ("GET", ["rooms", room, "relations", event, rel, kind]) => {
                relations::relations_route(ctx, room, event, Some(rel), Some(kind))
            }
            ("GET", ["rooms", room, "threads"]) => relations::threads_route(ctx, room),
            _ => Err(unrecognized(ctx)),
        };
    }
    match (m, s.as_slice()) {
        ("GET", ["capabilities"]) => discovery::capabilities_route(ctx),
        ("GET", ["login"]) => account::login_flows_route(ctx),
        ("POST", ["login"]) => account::login_route(ctx),
        ("POST", ["logout"]) => account::logout_route(ctx),
        ("POST", ["logout", "all"]) => account::logout_all_route(ctx),
        ("POST", ["refresh"]) => account::refresh_route(ctx),
        ("POST", ["register"]) => account::register_route(ctx),
        ("GET", ["register", "available"]) => account::register_available_route(ctx),
        ("GET", ["account", "whoami"]) => account::whoami_route(ctx),
        ("POST", ["account", "password"]) => account::change_password_route(ctx),
        ("POST", ["account", "deactivate"]) => account::deactivate_route(ctx),
        ("GET", ["devices"]) => account::devices_route(ctx),
        ("GET", ["devices", device]) => account::device_route(ctx, device),
        ("PUT", ["devices", device]) => account::update_device_route(ctx, device),
        ("DELETE", ["devices", device]) => account::delete_device_route(ctx, device),
        ("GET", ["profile", user]) => account::profile_route(ctx, user),
        ("GET", ["profile", user, field]) => account::profile_field_route(ctx, user, field),
        ("PUT", ["profile", user, field]) => account::set_profile_field_route(ctx, user, field),
        ("GET", ["user", user, "account_data", kind]) => account::account_data_route(ctx, user, None, kind),
        ("PUT", ["user", user, "account_data", kind]) => {
            account::set_account_data_route(ctx, user, None, kind)
        }
        ("GET", ["user", user, "rooms", room, "account_data", kind]) => {
            account::account_data_route(ctx, user, Some(room), kind)
        }
        ("PUT", ["user", user, "rooms", room, "account_data", kind]) => {
            account::set_account_data_route(ctx, user, Some(room), kind)
        }
        ("POST", ["user", user, "filter"]) => account::create_filter_route(ctx, user),
        ("GET", ["user", user, "filter", id]) => account::filter_route(ctx, user, id),
        ("GET" | "PUT" | "DELETE", ["pushrules", ..]) => account::push_rules_route(ctx, &s[1..]),
        ("POST", ["user_directory", "search"]) => account::user_directory_route(ctx),
        ("POST", ["search"]) => search::search_route(ctx),
        ("POST", ["keys", "upload"]) => keys::upload_route(ctx),
        ("POST", ["keys", "query"]) => keys::query_route(ctx),
        ("POST", ["keys", "claim"]) => keys::claim_route(ctx),
        ("GET", ["keys", "changes"]) => keys::changes_route(ctx),
        ("POST", ["keys", "device_signing", "upload"]) => cross_signing::device_signing_upload_route(ctx),
        ("POST", ["keys", "signatures", "upload"]) => cross_signing::signatures_upload_route(ctx),
        ("POST", ["room_keys", "version"]) => backup::create_version_route(ctx),
        ("GET", ["room_keys", "version"]) => backup::get_version_route(ctx, None),
        ("GET", ["room_keys", "version", v]) => backup::get_version_route(ctx, Some(v)),
        ("PUT", ["room_keys", "version", v]) => backup::update_version_route(ctx, v),
        ("DELETE", ["room_keys", "version", v]) => backup::delete_version_route(ctx, v),
        ("PUT", ["room_keys", "keys"]) => backup::put_keys_route(ctx, None, None),
        ("PUT", ["room_keys", "keys", room]) => backup::put_keys_route(ctx, Some(room), None),
        ("PUT", ["room_keys", "keys", room, session]) => {
            backup::put_keys_route(ctx, Some(room), Some(session))
        }
        ("GET", ["room_keys", "keys"]) => backup::get_keys_route(ctx, None, None),
        ("GET", ["room_keys", "keys", room]) => backup::get_keys_route(ctx, Some(room), None),
        ("GET", ["room_keys", "keys", room, session]) => {
            backup::get_keys_route(ctx, Some(room), Some(session))
        }
        ("DELETE", ["room_keys", "keys"]) => backup::delete_keys_route(ctx, None, None),
        ("DELETE", ["room_keys", "keys", room]) => backup::delete_keys_route(ctx, Some(room), None),
        ("DELETE", ["room_keys", "keys", room, session]) => {
            backup::delete_keys_route(ctx, Some(room), Some(session))
        }
        ("PUT", ["sendToDevice", kind, txn]) => keys::send_to_device_route(ctx, kind, txn),
        ("POST", ["createRoom"]) => rooms::create_room_route(ctx),
        ("GET", ["joined_rooms"]) => rooms::joined_rooms_route(ctx),
        ("POST", ["join", target]) => rooms::join_route(ctx, target),
        ("POST", ["knock", target]) => rooms::knock_route(ctx, target),
        ("POST", ["rooms", room, "join"]) => rooms::join_route(ctx, room),
        ("POST", ["rooms", room, action @ ("invite" | "leave" | "kick" | "ban" | "unban")]) => {
            rooms::membership_route(ctx, room, action)
        }
        ("POST", ["rooms", room, "forget"]) => rooms::forget_route(ctx, room),
        ("POST", ["rooms", room, "upgrade"]) => upgrade::upgrade_route(ctx, room),
        ("PUT", ["rooms", room, "send", kind, txn]) => rooms::send_route(ctx, room, kind, txn),
        ("PUT", ["rooms", room, "state", kind]) => rooms::put_state_route(ctx, room, kind, ""),
        ("PUT", ["rooms", room, "state", kind, key]) => rooms::put_state_route(ctx, room, kind, key),
        ("GET", ["rooms", room, "state"]) => rooms::state_route(ctx, room),
        ("GET", ["rooms", room, "state", kind]) => rooms::state_event_route(ctx, room, kind, ""),
        ("GET", ["rooms", room, "state", kind, key]) => rooms::state_event_route(ctx, room, kind, key),
        ("PUT", ["rooms", room, "redact", event, txn]) => rooms::redact_route(ctx, room, event, txn),
        ("GET", ["rooms", room, "messages"]) => rooms::messages_route(ctx, room),
        ("GET", ["rooms", room, "event", event]) => rooms::event_route(ctx, room, event),
        ("GET", ["rooms", room, "context", event]) => relations::context_route(ctx, room, event),
        ("GET", ["rooms", room, "members"]) => rooms::members_route(ctx, room),
        ("GET", ["rooms", room, "joined_members"]) => rooms::joined_members_route(ctx, room),
        ("GET", ["directory", "room", alias]) => rooms::resolve_alias_route(ctx, alias),
        ("PUT", ["directory", "room", alias]) => rooms::set_alias_route(ctx, alias),
        ("DELETE", ["directory", "room", alias]) => rooms::delete_alias_route(ctx, alias),
        ("GET", ["rooms", room, "aliases"]) => rooms::room_aliases_route(ctx, room),
        ("GET", ["directory", "list", "room", room]) => rooms::visibility_route(ctx, room),
        ("PUT", ["directory", "list", "room", room]) => rooms::set_visibility_route(ctx, room),
        ("GET" | "POST", ["publicRooms"]) => rooms::public_rooms_route(ctx),
        ("GET", ["sync"]) => sync::sync_route(ctx),
        ("PUT", ["rooms", room, "typing", user]) => ephemeral::typing_route(ctx, room, user),
        ("POST", ["rooms", room, "receipt", kind, event]) => ephemeral::receipt_route(ctx, room, kind, event),
        ("POST", ["rooms", room, "read_markers"]) => ephemeral::read_markers_route(ctx, room),
        ("PUT", ["presence", user, "status"]) => ephemeral::set_presence_route(ctx, user),
        ("GET", ["presence", user, "status"]) => ephemeral::presence_route(ctx, user),
        ("GET", ["user", user, "rooms", room, "tags"]) => ephemeral::tags_route(ctx, user, room),
        ("PUT", ["user", user, "rooms", room, "tags", tag]) => ephemeral::set_tag_route(ctx, user, room, tag),
        ("DELETE", ["user", user, "rooms", room, "tags", tag]) => {
            ephemeral::delete_tag_route(ctx, user, room, tag)
        }
        ("GET", ["pushers"]) => ephemeral::pushers_route(ctx),
        ("POST", ["pushers", "set"]) => ephemeral::set_pusher_route(ctx),
        _ => Err(unrecognized(ctx)),
    }
}

/// `M_UNRECOGNIZED`: 405 when the path exists with another method, 404 otherwise.
fn unrecognized(_ctx: &Ctx) -> Error {
    Error::Unrecognized { method_not_allowed: false }
}
