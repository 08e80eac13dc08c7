//! Discovery: `/versions`, `.well-known`, capabilities.

use serde_json::json;

use super::{Ctx, Reply, ok};
use crate::error::{Error, Result};
use crate::room::pdu::SUPPORTED_ROOM_VERSIONS;

/// # `GET /_matrix/client/versions`
pub fn versions(_ctx: &Ctx) -> Result<Reply> {
    ok(json!({
        "versions": ["v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11"],
        "unstable_features": {"org.matrix.msc3814": true},
    }))
}

/// # `GET /.well-known/matrix/{client,server}`
pub fn well_known(ctx: &Ctx) -> Result<Reply> {
    match ctx.segments.first().map(String::as_str) {
        Some("client") => {
            let base = ctx.settings.public_base_url.clone().unwrap_or_else(|| {
                let host = ctx.req.header("host").unwrap_or_else(|| ctx.settings.server_name.clone());
                format!("https://{host}")
            });
            ok(json!({"m.homeserver": {"base_url": base}}))
        }
        Some("server") => {
            let host = ctx.req.header("host").unwrap_or_else(|| ctx.settings.server_name.clone());
            ok(json!({"m.server": host}))
        }
        _ => Err(Error::NotFound("no such well-known document".into())),
    }
}

/// # `GET /_matrix/client/v3/capabilities`
pub fn capabilities_route(ctx: &Ctx) -> Result<Reply> {
    ctx.session()?;
    let available: serde_json::Map<String, serde_json::Value> =
        SUPPORTED_ROOM_VERSIONS.iter().map(|v| ((*v).to_owned(), json!("stable"))).collect();
    ok(json!({
        "capabilities": {
            "m.change_password": {"enabled": true},
            "m.room_versions": {"default": ctx.settings.default_room_version, "available": available},
            "m.set_displayname": {"enabled": true},
            "m.set_avatar_url": {"enabled": true},
            "m.3pid_changes": {"enabled": false},
            "m.get_login_token": {"enabled": true},
        }
    }))
}
