//! Accounts: registration, login, tokens, devices, profile, account data, filters, push rules.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Ctx, Reply, Session, ok};
use crate::config::Registration;
use crate::db::{self, sql};
use crate::error::{Error, Result};
use crate::util;

/// argon2id with 19 MiB, 2 passes, 1 lane (OWASP's first recommendation): well inside the
/// guest's 128 MiB instance limit, and ~0.1–0.3 s per hash in the guest on this machine.
pub const ARGON2_MEMORY_KIB: u32 = 19 * 1024;
pub const ARGON2_PASSES: u32 = 2;
pub const ARGON2_LANES: u32 = 1;
/// Longest password accepted (hashing cost is linear in it).
pub const MAX_PASSWORD_BYTES: usize = 512;
/// Lifetime of an `m.login.token`.
pub const LOGIN_TOKEN_TTL_SECS: u64 = 120;

fn argon2() -> argon2::Argon2<'static> {
    // The parameters are constants known to be valid.
    let params = argon2::Params::new(ARGON2_MEMORY_KIB, ARGON2_PASSES, ARGON2_LANES, None)
        .unwrap_or_else(|_| argon2::Params::default());
    argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
}

pub fn hash_password(password: &str) -> Result<String> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::InvalidParam(format!("passwords are at most {MAX_PASSWORD_BYTES} bytes")));
    }
    let salt =
        SaltString::encode_b64(&util::random_bytes::<16>()).map_err(|e| Error::Internal(e.to_string()))?;
    argon2()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| Error::Internal(format!("hashing the password: {e}")))
}

fn verify_password(password: &str, hash: &str) -> bool {
    password.len() <= MAX_PASSWORD_BYTES
        && PasswordHash::new(hash).is_ok_and(|h| argon2().verify_password(password.as_bytes(), &h).is_ok())
}

/// A user id of this server from a localpart or a full id.
fn qualify(ctx: &Ctx, user: &str) -> String {
    if user.starts_with('@') {
        user.to_owned()
    } else {
        format!("@{}:{}", user.to_lowercase(), ctx.settings.server_name)
    }
}

fn valid_localpart(l: &str) -> bool {
    !l.is_empty()
        && l.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'.' | b'_' | b'=' | b'-' | b'/' | b'+'))
}

/// A fresh device (or the given one) with an access token, and a refresh token if asked for.
fn new_session(
    ctx: &Ctx,
    user_id: &str,
    device_id: Option<String>,
    display: Option<String>,
    refresh: bool,
) -> Result<Value> {
    let db = ctx.db()?;
    let device_id = device_id.unwrap_or_else(|| util::random_alpha(10));
    let token = util::random_token();
    let refresh_token = refresh.then(util::random_token);
    let now = util::now_ms() as i64;
    let expires = refresh.then(|| now + ctx.settings.access_token_lifetime_ms as i64);
    db.batch(&[
        db::bound(sql::TOKEN_DELETE_DEVICE, vec![db::t(user_id), db::t(device_id.clone())]),
        db::bound(
            sql::DEVICE_INSERT,
            vec![db::t(user_id), db::t(device_id.clone()), db::opt_t(display), db::i(now), db::i(now)],
        ),
        db::bound(
            sql::TOKEN_INSERT,
            vec![
                db::t(util::token_hash(&token)),
                db::t(user_id),
                db::t(device_id.clone()),
                db::i(now),
                db::opt_i(expires),
                db::opt_t(refresh_token.as_deref().map(util::token_hash)),
            ],
        ),
    ])?;
    let mut out = json!({"user_id": user_id, "access_token": token, "device_id": device_id, "home_server": ctx.settings.server_name});
    if let Some(r) = refresh_token {
        out["refresh_token"] = json!(r);
        out["expires_in_ms"] = json!(ctx.settings.access_token_lifetime_ms);
    }
    Ok(out)
}

#[derive(Deserialize)]
pub(super) struct AuthData {
    #[serde(rename = "type")]
    kind: Option<String>,
    session: Option<String>,
    token: Option<String>,
    password: Option<String>,
    identifier: Option<Identifier>,
    user: Option<String>,
}

#[derive(Deserialize)]
struct Identifier {
    #[serde(rename = "type")]
    kind: String,
    user: Option<String>,
}

#[derive(Deserialize)]
struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    #[serde(default)]
    refresh_token: bool,
    auth: Option<AuthData>,
}

fn uia(flows: &[&[&str]], session: Option<String>, completed: &[&str], error: Option<(&str, &str)>) -> Error {
    let mut body = json!({
        "flows": flows.iter().map(|f| json!({"stages": f})).collect::<Vec<_>>(),
        "params": {},
        "session": session.unwrap_or_else(|| util::random_alpha(24)),
        "completed": completed,
    });
    if let Some((code, msg)) = error {
        body["errcode"] = json!(code);
        body["error"] = json!(msg);
    }
    Error::Uia(body)
}

/// # `POST /_matrix/client/v3/register`
pub fn register_route(ctx: &Ctx) -> Result<Reply> {
    if ctx.param("kind") == Some("guest") {
        return Err(Error::Forbidden("guest access is not enabled".into()));
    }
    let body: RegisterBody = ctx.json()?;
    let flow: &[&str] = match ctx.settings.registration {
        Registration::Disabled => return Err(Error::Forbidden("registration is disabled".into())),
        Registration::Open => &["m.login.dummy"],
        Registration::Token => &["m.login.registration_token"],
    };
    ctx.rate_limit("register", "all", ctx.settings.register_per_minute)?;
    let localpart = match &body.username {
        Some(u) => u.to_lowercase(),
        None => util::random_alpha(12).to_lowercase(),
    };
    if !valid_localpart(&localpart) {
        return Err(Error::InvalidUsername("user ids may contain only a-z, 0-9, and . _ = - / +".into()));
    }
    let user_id = format!("@{localpart}:{}", ctx.settings.server_name);
    if user_id.len() > 255 {
        return Err(Error::InvalidUsername("the user id is over 255 bytes".into()));
    }
    let db = ctx.db()?;
    if db.first(sql::USER_GET, vec![db::t(user_id.clone())])?.is_some() {
        return Err(Error::UserInUse);
    }
    let Some(auth) = body.auth else { return Err(uia(&[flow], None, &[], None)) };
    let password = body.password.ok_or_else(|| Error::MissingParam("a password is required".into()))?;
    let hash = hash_password(&password)?;
    match (ctx.settings.registration, auth.kind.as_deref()) {
        (Registration::Open, Some("m.login.dummy")) => {}
        (Registration::Token, Some("m.login.registration_token")) => {
            let token = auth.token.unwrap_or_default();
            if db.execute(sql::REG_TOKEN_USE, vec![db::t(token)])? == 0 {
                return Err(uia(
                    &[flow],
                    auth.session,
                    &[],
                    Some(("M_UNAUTHORIZED", "invalid registration token")),
                ));
            }
        }
        _ => {
            return Err(uia(
                &[flow],
                auth.session,
                &[],
                Some(("M_UNAUTHORIZED", "unsupported authentication stage")),
            ));
        }
    }
    let now = util::now_ms() as i64;
    if db.execute(sql::USER_INSERT, vec![db::t(user_id.clone()), db::t(hash), db::i(now)])? == 0 {
        return Err(Error::UserInUse);
    }
    if body.inhibit_login {
        return ok(json!({"user_id": user_id}));
    }
    ok(new_session(ctx, &user_id, body.device_id, body.initial_device_display_name, body.refresh_token)?)
}

/// # `GET /_matrix/client/v3/register/available`
pub fn register_available_route(ctx: &Ctx) -> Result<Reply> {
    let localpart = ctx.param("username").unwrap_or_default().to_lowercase();
    if !valid_localpart(&localpart) {
        return Err(Error::InvalidUsername("user ids may contain only a-z, 0-9, and . _ = - / +".into()));
    }
    let user_id = format!("@{localpart}:{}", ctx.settings.server_name);
    if ctx.db()?.first(sql::USER_GET, vec![db::t(user_id)])?.is_some() {
        return Err(Error::UserInUse);
    }
    ok(json!({"available": true}))
}

/// # `GET /_matrix/client/v1/register/m.login.registration_token/validity`
pub fn token_validity_route(ctx: &Ctx) -> Result<Reply> {
    let token = ctx.param("token").ok_or_else(|| Error::MissingParam("token is required".into()))?;
    let valid =
        ctx.db()?.first(sql::REG_TOKEN_VALID, vec![db::t(token), db::i(util::now_ms() as i64)])?.is_some();
    ok(json!({"valid": valid}))
}

/// # `GET /_matrix/client/v3/login`
pub fn login_flows_route(_ctx: &Ctx) -> Result<Reply> {
    ok(json!({"flows": [{"type": "m.login.password"}, {"type": "m.login.token", "get_login_token": true}]}))
}

#[derive(Deserialize)]
struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Identifier>,
    user: Option<String>,
    password: Option<String>,
    token: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    refresh_token: bool,
}

/// # `POST /_matrix/client/v3/login`
pub fn login_route(ctx: &Ctx) -> Result<Reply> {
    let body: LoginBody = ctx.json()?;
    let user_id = match body.kind.as_str() {
        "m.login.password" => {
            let user = match &body.identifier {
                Some(Identifier { kind, user: Some(u) }) if kind == "m.id.user" => u.clone(),
                Some(_) => return Err(Error::Unrecognized { method_not_allowed: false }),
                None => body.user.clone().ok_or_else(|| Error::BadJson("identifier is required".into()))?,
            };
            let user_id = qualify(ctx, &user);
            ctx.rate_limit("login", &user_id, ctx.settings.login_per_minute)?;
            let password = body.password.clone().unwrap_or_default();
            let row = ctx.db()?.first(sql::USER_GET, vec![db::t(user_id.clone())])?;
            let hash = row.as_ref().and_then(|r| r.text("password_hash"));
            let deactivated = row.as_ref().is_some_and(|r| r.int("deactivated").unwrap_or(0) != 0);
            if deactivated || !hash.is_some_and(|h| verify_password(&password, &h)) {
                return Err(Error::Forbidden("invalid user name or password".into()));
            }
            user_id
        }
        "m.login.token" => {
            // In D1, not KV: KV is eventually consistent, and a login token is good once.
            let token = body.token.clone().ok_or_else(|| Error::BadJson("token is required".into()))?;
            let hash = util::token_hash(&token);
            let db = ctx.db()?;
            let invalid = || Error::Forbidden("invalid or expired login token".into());
            let user = db.first(sql::LOGIN_TOKEN_GET, vec![db::t(hash.clone())])?.ok_or_else(invalid)?;
            if db.execute(sql::LOGIN_TOKEN_TAKE, vec![db::t(hash), db::i(util::now_ms() as i64)])? != 1 {
                return Err(invalid());
            }
            user.str("user_id")
        }
        other => return Err(Error::Unknown(format!("unsupported login type {other}"))),
    };
    ok(new_session(ctx, &user_id, body.device_id, body.initial_device_display_name, body.refresh_token)?)
}

/// # `POST /_matrix/client/v1/login/get_token`
pub fn get_login_token_route(ctx: &Ctx) -> Result<Reply> {
    let session = ctx.session()?;
    let token = util::random_token();
    let now = util::now_ms() as i64;
    let db = ctx.db()?;
    db.execute(sql::LOGIN_TOKENS_EXPIRE, vec![db::i(now)])?;
    db.execute(
        sql::LOGIN_TOKEN_INSERT,
        vec![
            db::t(util::token_hash(&token)),
            db::t(session.user_id),
            db::i(now + (LOGIN_TOKEN_TTL_SECS * 1000) as i64),
        ],
    )?;
    ok(json!({"login_token": token, "expires_in_ms": LOGIN_TOKEN_TTL_SECS * 1000}))
}

/// # `POST /_matrix/client/v3/logout`
pub fn logout_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    ctx.db()?.batch(&[
        db::bound(sql::TOKEN_DELETE_DEVICE, vec![db::t(s.user_id.clone()), db::t(s.device_id.clone())]),
        db::bound(sql::DEVICE_DELETE, vec![db::t(s.user_id.clone()), db::t(s.device_id.clone())]),
    ])?;
    super::keys::forget_device(ctx, &s.user_id, &s.device_id)?;
    ok(json!({}))
}

/// # `POST /_matrix/client/v3/logout/all`
pub fn logout_all_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    ctx.db()?.batch(&[
        db::bound(sql::TOKEN_DELETE_USER, vec![db::t(s.user_id.clone())]),
        db::bound(sql::DEVICE_DELETE_ALL, vec![db::t(s.user_id)]),
    ])?;
    ok(json!({}))
}

/// # `POST /_matrix/client/v3/refresh`
pub fn refresh_route(ctx: &Ctx) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        refresh_token: String,
    }
    let body: Body = ctx.json()?;
    let db = ctx.db()?;
    let row = db
        .first(sql::TOKEN_BY_REFRESH, vec![db::t(util::token_hash(&body.refresh_token))])?
        .ok_or(Error::UnknownToken { soft_logout: false })?;
    let (user_id, device_id) = (row.str("user_id"), row.str("device_id"));
    let out = new_session(ctx, &user_id, Some(device_id), None, true)?;
    ok(
        json!({"access_token": out["access_token"], "refresh_token": out["refresh_token"], "expires_in_ms": out["expires_in_ms"]}),
    )
}

/// # `GET /_matrix/client/v3/account/whoami`
pub fn whoami_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    ok(json!({"user_id": s.user_id, "device_id": s.device_id, "is_guest": false}))
}

/// User-interactive authentication with the account's password, for sensitive operations.
pub(super) fn require_password(ctx: &Ctx, s: &Session, auth: Option<AuthData>) -> Result<()> {
    let flows: &[&[&str]] = &[&["m.login.password"]];
    let Some(auth) = auth else { return Err(uia(flows, None, &[], None)) };
    if auth.kind.as_deref() != Some("m.login.password") {
        return Err(uia(
            flows,
            auth.session,
            &[],
            Some(("M_UNAUTHORIZED", "unsupported authentication stage")),
        ));
    }
    let claimed = auth.identifier.and_then(|i| i.user).or(auth.user).map(|u| qualify(ctx, &u));
    if claimed.is_some_and(|c| c != s.user_id) {
        return Err(Error::Forbidden("authentication is for another user".into()));
    }
    ctx.rate_limit("login", &s.user_id, ctx.settings.login_per_minute)?;
    let hash =
        ctx.db()?.first(sql::USER_GET, vec![db::t(s.user_id.clone())])?.and_then(|r| r.text("password_hash"));
    if !hash.is_some_and(|h| verify_password(auth.password.as_deref().unwrap_or_default(), &h)) {
        return Err(uia(flows, auth.session, &[], Some(("M_FORBIDDEN", "invalid password"))));
    }
    Ok(())
}

/// # `POST /_matrix/client/v3/account/password`
pub fn change_password_route(ctx: &Ctx) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        new_password: String,
        #[serde(default = "yes")]
        logout_devices: bool,
        auth: Option<AuthData>,
    }
    fn yes() -> bool {
        true
    }
    let s = ctx.session()?;
    let body: Body = ctx.json()?;
    require_password(ctx, &s, body.auth)?;
    let hash = hash_password(&body.new_password)?;
    let mut batch = vec![db::bound(sql::USER_SET_PASSWORD, vec![db::t(hash), db::t(s.user_id.clone())])];
    if body.logout_devices {
        batch.push(db::bound(
            sql::TOKEN_DELETE_USER_EXCEPT,
            vec![db::t(s.user_id.clone()), db::t(s.device_id.clone())],
        ));
    }
    ctx.db()?.batch(&batch)?;
    ok(json!({}))
}

/// # `POST /_matrix/client/v3/account/deactivate`
pub fn deactivate_route(ctx: &Ctx) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        auth: Option<AuthData>,
    }
    let s = ctx.session()?;
    let body: Body = ctx.json()?;
    require_password(ctx, &s, body.auth)?;
    super::rooms::leave_all(ctx, &s.user_id)?;
    ctx.db()?.batch(&[
        db::bound(sql::USER_DEACTIVATE, vec![db::t(s.user_id.clone())]),
        db::bound(sql::TOKEN_DELETE_USER, vec![db::t(s.user_id.clone())]),
        db::bound(sql::DEVICE_DELETE_ALL, vec![db::t(s.user_id)]),
    ])?;
    ok(json!({"id_server_unbind_result": "no-support"}))
}

fn device_json(r: &db::Row) -> Value {
    let mut d = json!({"device_id": r.str("device_id")});
    if let Some(name) = r.text("display_name") {
        d["display_name"] = json!(name);
    }
    if let Some(seen) = r.int("last_seen_ms") {
        d["last_seen_ts"] = json!(seen);
    }
    d
}

/// # `GET /_matrix/client/v3/devices`
pub fn devices_route(ctx: &Ctx) -> Result<Reply> {
    let s = ctx.session()?;
    let rows = ctx.db()?.query(sql::DEVICE_LIST, vec![db::t(s.user_id)])?;
    ok(json!({"devices": rows.iter().map(device_json).collect::<Vec<_>>()}))
}

/// # `GET /_matrix/client/v3/devices/{deviceId}`
pub fn device_route(ctx: &Ctx, device: &str) -> Result<Reply> {
    let s = ctx.session()?;
    let row = ctx
        .db()?
        .first(sql::DEVICE_GET, vec![db::t(s.user_id), db::t(device)])?
        .ok_or_else(|| Error::NotFound("no such device".into()))?;
    ok(device_json(&row))
}

/// # `PUT /_matrix/client/v3/devices/{deviceId}`
pub fn update_device_route(ctx: &Ctx, device: &str) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        display_name: Option<String>,
    }
    let s = ctx.session()?;
    let body: Body = ctx.json()?;
    if ctx
        .db()?
        .execute(sql::DEVICE_RENAME, vec![db::opt_t(body.display_name), db::t(s.user_id), db::t(device)])?
        == 0
    {
        return Err(Error::NotFound("no such device".into()));
    }
    ok(json!({}))
}

/// # `DELETE /_matrix/client/v3/devices/{deviceId}`
pub fn delete_device_route(ctx: &Ctx, device: &str) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        auth: Option<AuthData>,
    }
    let s = ctx.session()?;
    let body: Body = ctx.json()?;
    let db = ctx.db()?;
    if db.first(sql::DEVICE_GET, vec![db::t(s.user_id.clone()), db::t(device)])?.is_none() {
        return Err(Error::NotFound("no such device".into()));
    }
    require_password(ctx, &s, body.auth)?;
    db.batch(&[
        db::bound(sql::TOKEN_DELETE_DEVICE, vec![db::t(s.user_id.clone()), db::t(device)]),
        db::bound(sql::DEVICE_DELETE, vec![db::t(s.user_id.clone()), db::t(device)]),
    ])?;
    super::keys::forget_device(ctx, &s.user_id, device)?;
    ok(json!({}))
}

fn profile(ctx: &Ctx, user: &str) -> Result<db::Row> {
    ctx.db()?
        .first(sql::USER_GET, vec![db::t(user)])?
        .filter(|r| r.int("deactivated").unwrap_or(0) == 0)
        .ok_or_else(|| Error::NotFound("no such user".into()))
}

/// # `GET /_matrix/client/v3/profile/{userId}`
pub fn profile_route(ctx: &Ctx, user: &str) -> Result<Reply> {
    let r = profile(ctx, user)?;
    let mut out = serde_json::Map::new();
    if let Some(d) = r.text("displayname") {
        out.insert("displayname".into(), json!(d));
    }
    if let Some(a) = r.text("avatar_url") {
        out.insert("avatar_url".into(), json!(a));
    }
    ok(Value::Object(out))
}

/// # `GET /_matrix/client/v3/profile/{userId}/{keyName}`
pub fn profile_field_route(ctx: &Ctx, user: &str, field: &str) -> Result<Reply> {
    let r = profile(ctx, user)?;
    let value = match field {
        "displayname" => r.text("displayname"),
        "avatar_url" => r.text("avatar_url"),
        _ => None,
    };
    let v = value.ok_or_else(|| Error::NotFound(format!("{field} is not set")))?;
    ok(json!({ field: v }))
}

/// # `PUT /_matrix/client/v3/profile/{userId}/{keyName}`
///
/// Also updates the user's member event in every joined room, as clients expect.
pub fn set_profile_field_route(ctx: &Ctx, user: &str, field: &str) -> Result<Reply> {
    let s = ctx.session()?;
    if s.user_id != user {
        return Err(Error::Forbidden("you can only change your own profile".into()));
    }
    let body: serde_json::Map<String, Value> = ctx.json()?;
    let value = match body.get(field) {
        Some(Value::String(v)) => Some(v.clone()),
        Some(Value::Null) | None => None,
        Some(_) => return Err(Error::BadJson(format!("{field} must be a string"))),
    };
    let stmt = match field {
        "displayname" => sql::USER_SET_DISPLAYNAME,
        "avatar_url" => sql::USER_SET_AVATAR,
        _ => return Err(Error::InvalidParam(format!("unknown profile field {field}"))),
    };
    ctx.db()?.execute(stmt, vec![db::opt_t(value.clone()), db::t(user)])?;
    super::rooms::refresh_member_events(ctx, &s.user_id, field, value.as_deref())?;
    ok(json!({}))
}

fn own_user(ctx: &Ctx, user: &str) -> Result<Session> {
    let s = ctx.session()?;
    if s.user_id != user {
        return Err(Error::Forbidden("you cannot access another user's data".into()));
    }
    Ok(s)
}

/// # `GET /_matrix/client/v3/user/{userId}[/rooms/{roomId}]/account_data/{type}`
pub fn account_data_route(ctx: &Ctx, user: &str, room: Option<&str>, kind: &str) -> Result<Reply> {
    own_user(ctx, user)?;
    let row = ctx
        .db()?
        .first(sql::ACCOUNT_DATA_GET, vec![db::t(user), db::t(room.unwrap_or_default()), db::t(kind)])?
        .ok_or_else(|| Error::NotFound("no account data of this type".into()))?;
    ok(serde_json::from_str(&row.str("content")).map_err(|e| Error::Internal(e.to_string()))?)
}

/// # `PUT /_matrix/client/v3/user/{userId}[/rooms/{roomId}]/account_data/{type}`
pub fn set_account_data_route(ctx: &Ctx, user: &str, room: Option<&str>, kind: &str) -> Result<Reply> {
    own_user(ctx, user)?;
    let content: serde_json::Map<String, Value> = ctx.json()?;
    if matches!(kind, "m.fully_read" | "m.push_rules") {
        return Err(Error::BadJson(format!("{kind} cannot be set through account data")));
    }
    set_account_data(ctx, user, room.unwrap_or_default(), kind, &Value::Object(content))?;
    ok(json!({}))
}

pub fn set_account_data(ctx: &Ctx, user: &str, room: &str, kind: &str, content: &Value) -> Result<()> {
    ctx.db()?.batch(&[
        db::bound(sql::STREAM_BUMP, vec![]),
        db::bound(
            sql::ACCOUNT_DATA_UPSERT,
            vec![db::t(user), db::t(room), db::t(kind), db::t(content.to_string())],
        ),
    ])?;
    lattice_worker::bindings::lattice::bindings::signals::signal(&format!("user:{user}"));
    Ok(())
}

/// # `POST /_matrix/client/v3/user/{userId}/filter`
pub fn create_filter_route(ctx: &Ctx, user: &str) -> Result<Reply> {
    own_user(ctx, user)?;
    let filter: serde_json::Map<String, Value> = ctx.json()?;
    let text = Value::Object(filter).to_string();
    // Content-addressed: the same filter gets the same id.
    let id = util::b64url(&util::sha256(text.as_bytes())[..12]);
    ctx.db()?.execute(sql::FILTER_INSERT, vec![db::t(user), db::t(id.clone()), db::t(text)])?;
    ok(json!({"filter_id": id}))
}

/// # `GET /_matrix/client/v3/user/{userId}/filter/{filterId}`
pub fn filter_route(ctx: &Ctx, user: &str, id: &str) -> Result<Reply> {
    own_user(ctx, user)?;
    let row = ctx
        .db()?
        .first(sql::FILTER_GET, vec![db::t(user), db::t(id)])?
        .ok_or_else(|| Error::NotFound("no such filter".into()))?;
    ok(serde_json::from_str(&row.str("json")).map_err(|e| Error::Internal(e.to_string()))?)
}

/// The account data type push rules are kept (and delivered) as.
pub const PUSH_RULES_TYPE: &str = "m.push_rules";

/// The user's push rules: their stored rule set, or the spec's defaults.
pub fn ruleset(ctx: &Ctx, user_id: &str) -> Result<ruma::push::Ruleset> {
    let stored = ctx.db()?.first(sql::ACCOUNT_DATA_GET, ruleset_params(user_id))?;
    ruleset_from(user_id, stored.as_ref())
}

/// The parameters of [`sql::ACCOUNT_DATA_GET`] that read the user's push rules.
pub fn ruleset_params(user_id: &str) -> Vec<db::Param> {
    vec![db::t(user_id), db::t(""), db::t(PUSH_RULES_TYPE)]
}

/// The rule set stored in `row` (read with [`ruleset_params`]), or the default one.
pub fn ruleset_from(user_id: &str, row: Option<&db::Row>) -> Result<ruma::push::Ruleset> {
    let user = ruma::UserId::parse(user_id).map_err(|e| Error::Internal(e.to_string()))?;
    Ok(row
        .and_then(|r| serde_json::from_str::<Value>(&r.str("content")).ok())
        .and_then(|v| serde_json::from_value(v["global"].clone()).ok())
        .unwrap_or_else(|| ruma::push::Ruleset::server_default(&user)))
}

/// The rule set as JSON.
pub fn push_rules(ctx: &Ctx, user_id: &str) -> Result<Value> {
    serde_json::to_value(ruleset(ctx, user_id)?).map_err(|e| Error::Internal(e.to_string()))
}

fn save_ruleset(ctx: &Ctx, user_id: &str, rules: &ruma::push::Ruleset) -> Result<()> {
    let v = serde_json::to_value(rules).map_err(|e| Error::Internal(e.to_string()))?;
    set_account_data(ctx, user_id, "", PUSH_RULES_TYPE, &json!({"global": v}))
}

fn rule_kind(kind: &str) -> Result<ruma::push::RuleKind> {
    match kind {
        "override" | "underride" | "sender" | "room" | "content" => Ok(ruma::push::RuleKind::from(kind)),
        other => Err(Error::InvalidParam(format!("unknown push rule kind {other}"))),
    }
}

/// One rule as JSON, from the serialized rule set.
fn find_rule(rules: &Value, kind: &str, rule_id: &str) -> Result<Value> {
    rules[kind]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["rule_id"] == rule_id).cloned())
        .ok_or_else(|| Error::NotFound("no such push rule".into()))
}

/// # `GET|PUT|DELETE /_matrix/client/v3/pushrules/...`
pub fn push_rules_route(ctx: &Ctx, rest: &[&str]) -> Result<Reply> {
    let s = ctx.session()?;
    let method = ctx.req.method.as_str();
    match (method, rest) {
        ("GET", [] | [""]) => return ok(json!({"global": push_rules(ctx, &s.user_id)?})),
        ("GET", ["global"] | ["global", ""]) => return ok(push_rules(ctx, &s.user_id)?),
        _ => {}
    }
    let (kind, rule_id, attr) = match rest {
        ["global", kind, rule_id] => (*kind, *rule_id, None),
        ["global", kind, rule_id, attr @ ("enabled" | "actions")] => (*kind, *rule_id, Some(*attr)),
        _ => return Err(Error::Unrecognized { method_not_allowed: false }),
    };
    let rk = rule_kind(kind)?;
    let mut rules = ruleset(ctx, &s.user_id)?;
    let as_json =
        |r: &ruma::push::Ruleset| serde_json::to_value(r).map_err(|e| Error::Internal(e.to_string()));
    match (method, attr) {
        ("GET", None) => ok(find_rule(&as_json(&rules)?, kind, rule_id)?),
        ("GET", Some(a)) => {
            let rule = find_rule(&as_json(&rules)?, kind, rule_id)?;
            ok(json!({ a: rule[a] }))
        }
        ("PUT", Some("enabled")) => {
            #[derive(Deserialize)]
            struct Body {
                enabled: bool,
            }
            let body: Body = ctx.json()?;
            rules
                .set_enabled(rk, rule_id, body.enabled)
                .map_err(|_| Error::NotFound("no such push rule".into()))?;
            save_ruleset(ctx, &s.user_id, &rules)?;
            ok(json!({}))
        }
        ("PUT", Some(_)) => {
            #[derive(Deserialize)]
            struct Body {
                actions: Vec<ruma::push::Action>,
            }
            let body: Body = ctx.json()?;
            rules
                .set_actions(rk, rule_id, body.actions)
                .map_err(|_| Error::NotFound("no such push rule".into()))?;
            save_ruleset(ctx, &s.user_id, &rules)?;
            ok(json!({}))
        }
        ("PUT", None) => {
            #[derive(Deserialize)]
            struct Body {
                actions: Vec<ruma::push::Action>,
                #[serde(default)]
                conditions: Vec<ruma::push::PushCondition>,
                pattern: Option<String>,
            }
            let body: Body = ctx.json()?;
            use ruma::push::{NewConditionalPushRule, NewPatternedPushRule, NewPushRule, NewSimplePushRule};
            let new = match kind {
                "override" => NewPushRule::Override(NewConditionalPushRule::new(
                    rule_id.into(),
                    body.conditions,
                    body.actions,
                )),
                "underride" => NewPushRule::Underride(NewConditionalPushRule::new(
                    rule_id.into(),
                    body.conditions,
                    body.actions,
                )),
                "content" => {
                    let pattern = body
                        .pattern
                        .ok_or_else(|| Error::MissingParam("content rules need a pattern".into()))?;
                    NewPushRule::Content(NewPatternedPushRule::new(rule_id.into(), pattern, body.actions))
                }
                "room" => {
                    let room = ruma::RoomId::parse(rule_id)
                        .map_err(|_| Error::InvalidParam("room rules are named by a room id".into()))?;
                    NewPushRule::Room(NewSimplePushRule::new(room, body.actions))
                }
                _ => {
                    let user = ruma::UserId::parse(rule_id)
                        .map_err(|_| Error::InvalidParam("sender rules are named by a user id".into()))?;
                    NewPushRule::Sender(NewSimplePushRule::new(user, body.actions))
                }
            };
            rules.insert(new, ctx.param("after"), ctx.param("before")).map_err(|e| match e {
                ruma::push::InsertPushRuleError::UnknownRuleId => Error::NotFound(e.to_string()),
                other => Error::InvalidParam(other.to_string()),
            })?;
            save_ruleset(ctx, &s.user_id, &rules)?;
            ok(json!({}))
        }
        ("DELETE", None) => {
            rules.remove(rk, rule_id).map_err(|e| match e {
                ruma::push::RemovePushRuleError::NotFound => Error::NotFound("no such push rule".into()),
                other => Error::InvalidParam(other.to_string()),
            })?;
            save_ruleset(ctx, &s.user_id, &rules)?;
            ok(json!({}))
        }
        _ => Err(Error::Unrecognized { method_not_allowed: true }),
    }
}

/// # `POST /_matrix/client/v3/user_directory/search`
pub fn user_directory_route(ctx: &Ctx) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        search_term: String,
        limit: Option<u32>,
    }
    ctx.session()?;
    let body: Body = ctx.json()?;
    let limit = i64::from(body.limit.unwrap_or(10).min(50));
    // Case-insensitive on both engines (PostgreSQL's LIKE is case-sensitive).
    let pattern = format!("%{}%", body.search_term.replace(['%', '_'], "").to_lowercase());
    let rows =
        ctx.db()?.query(sql::USER_SEARCH, vec![db::t(pattern.clone()), db::t(pattern), db::i(limit + 1)])?;
    let limited = rows.len() as i64 > limit;
    let results: Vec<Value> = rows
        .iter()
        .take(limit as usize)
        .map(|r| {
            let mut u = json!({"user_id": r.str("user_id")});
            if let Some(d) = r.text("displayname") {
                u["display_name"] = json!(d);
            }
            if let Some(a) = r.text("avatar_url") {
                u["avatar_url"] = json!(a);
            }
            u
        })
        .collect();
    ok(json!({"results": results, "limited": limited}))
}
