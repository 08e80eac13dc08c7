//! The homeserver's admin API (`/_lattice/admin/v1`), used by `lattice admin`: create users and
//! registration tokens on a running server. Authenticated with the `admin_token` secret.

use serde::Deserialize;
use serde_json::json;

use super::{Ctx, Reply, ok};
use crate::db::{self, sql};
use crate::error::{Error, Result};
use crate::util;

/// The config secret whose value (UTF-8, trimmed) is the admin bearer token.
pub const ADMIN_TOKEN_SECRET: &str = "admin_token";

fn authorize(ctx: &Ctx) -> Result<()> {
    let secret = lattice_worker::bindings::lattice::bindings::config::secret(ADMIN_TOKEN_SECRET)
        .map_err(|e| Error::Internal(format!("{e:?}")))?
        .ok_or_else(|| Error::Forbidden("the admin API is off: no `admin_token` secret".into()))?;
    let expected = util::b64url(&secret);
    let given =
        ctx.req.header("authorization").and_then(|h| h.strip_prefix("Bearer ").map(|t| t.trim().to_owned()));
    match given {
        None => Err(Error::MissingToken),
        Some(g) if util::token_hash(&g) == util::token_hash(&expected) => Ok(()),
        Some(_) => Err(Error::Forbidden("bad admin token".into())),
    }
}

pub fn route(ctx: &Ctx) -> Result<Reply> {
    authorize(ctx)?;
    let s: Vec<&str> = ctx.segments.iter().map(String::as_str).collect();
    match (ctx.req.method.as_str(), s.as_slice()) {
        ("POST", ["users"]) => create_user(ctx),
        ("POST", ["registration_tokens"]) => create_registration_token(ctx),
        ("GET", ["registration_tokens"]) => list_registration_tokens(ctx),
        _ => Err(Error::Unrecognized { method_not_allowed: false }),
    }
}

/// # `POST /_lattice/admin/v1/users`
fn create_user(ctx: &Ctx) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        username: String,
        password: String,
    }
    let body: Body = ctx.json()?;
    let localpart = body.username.to_lowercase();
    let user_id = format!("@{localpart}:{}", ctx.settings.server_name);
    if ruma::UserId::parse(user_id.as_str()).is_err() || localpart.is_empty() {
        return Err(Error::InvalidUsername(format!("{user_id} is not a valid user id")));
    }
    let hash = super::account::hash_password(&body.password)?;
    if ctx
        .db()?
        .execute(sql::USER_INSERT, vec![db::t(user_id.clone()), db::t(hash), db::i(util::now_ms() as i64)])?
        == 0
    {
        return Err(Error::UserInUse);
    }
    ok(json!({"user_id": user_id}))
}

/// # `POST /_lattice/admin/v1/registration_tokens`
fn create_registration_token(ctx: &Ctx) -> Result<Reply> {
    #[derive(Deserialize)]
    struct Body {
        token: Option<String>,
        uses_allowed: Option<i64>,
        expiry_time: Option<i64>,
    }
    let body: Body = ctx.json()?;
    let token = body.token.unwrap_or_else(|| util::random_alpha(16));
    if token.is_empty()
        || token.len() > 64
        || !token.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~-".contains(&b))
    {
        return Err(Error::InvalidParam("tokens are 1–64 characters of A-Z a-z 0-9 . _ ~ -".into()));
    }
    ctx.db()?.execute(
        sql::REG_TOKEN_INSERT,
        vec![
            db::t(token.clone()),
            db::opt_i(body.uses_allowed),
            db::opt_i(body.expiry_time),
            db::i(util::now_ms() as i64),
        ],
    )?;
    ok(
        json!({"token": token, "uses_allowed": body.uses_allowed, "expiry_time": body.expiry_time, "completed": 0}),
    )
}

/// # `GET /_lattice/admin/v1/registration_tokens`
fn list_registration_tokens(ctx: &Ctx) -> Result<Reply> {
    let rows = ctx.db()?.query(sql::REG_TOKEN_LIST, vec![])?;
    let tokens: Vec<_> = rows
        .iter()
        .map(|r| json!({"token": r.str("token"), "uses_allowed": r.int("uses_allowed"), "completed": r.int("completed"), "expiry_time": r.int("expiry_ms")}))
        .collect();
    ok(json!({"registration_tokens": tokens}))
}
