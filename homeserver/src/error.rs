//! The one place where failures become Matrix error bodies (`errcode` + HTTP status).

use serde_json::{Value, json};

use crate::db::DbError;

/// A failure a client sees. Every handler returns this; [`Error::into_response`] renders it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Forbidden(String),
    #[error("unknown or expired access token")]
    UnknownToken { soft_logout: bool },
    #[error("missing access token")]
    MissingToken,
    #[error("request body is not JSON: {0}")]
    NotJson(String),
    #[error("malformed request: {0}")]
    BadJson(String),
    #[error("{0}")]
    InvalidParam(String),
    #[error("{0}")]
    MissingParam(String),
    #[error("{0}")]
    NotFound(String),
    #[error("unrecognized request")]
    Unrecognized { method_not_allowed: bool },
    #[error("too many requests")]
    LimitExceeded { retry_after_ms: u64 },
    #[error("request body too large")]
    TooLarge,
    #[error("user id already taken")]
    UserInUse,
    #[error("{0}")]
    InvalidUsername(String),
    #[error("{0}")]
    Exclusive(String),
    #[error("room alias already in use")]
    RoomInUse,
    #[error("unsupported room version {0}")]
    UnsupportedRoomVersion(String),
    #[error("{0}")]
    BadState(String),
    #[error("{0}")]
    Unauthorized(String),
    /// User-interactive authentication: the 401 body carries the flows and session.
    #[error("additional authentication required")]
    Uia(Value),
    #[error("storage is unavailable")]
    Unavailable { retry_after_secs: u32 },
    /// A key-backup write names a version that is not the current one.
    #[error("wrong backup version; the current one is {current_version}")]
    WrongRoomKeysVersion { current_version: String },
    #[error("{0}")]
    Unknown(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Unavailable { retry_after_secs } => Error::Unavailable { retry_after_secs },
            other => Error::Internal(other.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn status_and_body(&self) -> (u16, Value) {
        let msg = self.to_string();
        let (status, errcode) = match self {
            Error::Forbidden(_) => (403, "M_FORBIDDEN"),
            Error::UnknownToken { soft_logout } => {
                return (
                    401,
                    json!({"errcode": "M_UNKNOWN_TOKEN", "error": msg, "soft_logout": soft_logout}),
                );
            }
            Error::MissingToken => (401, "M_MISSING_TOKEN"),
            Error::WrongRoomKeysVersion { current_version } => {
                return (
                    403,
                    json!({"errcode": "M_WRONG_ROOM_KEYS_VERSION", "error": msg, "current_version": current_version}),
                );
            }
            Error::NotJson(_) => (400, "M_NOT_JSON"),
            Error::BadJson(_) => (400, "M_BAD_JSON"),
            Error::InvalidParam(_) => (400, "M_INVALID_PARAM"),
            Error::MissingParam(_) => (400, "M_MISSING_PARAM"),
            Error::NotFound(_) => (404, "M_NOT_FOUND"),
            Error::Unrecognized { method_not_allowed } => {
                (if *method_not_allowed { 405 } else { 404 }, "M_UNRECOGNIZED")
            }
            Error::LimitExceeded { retry_after_ms } => {
                return (
                    429,
                    json!({"errcode": "M_LIMIT_EXCEEDED", "error": msg, "retry_after_ms": retry_after_ms}),
                );
            }
            Error::TooLarge => (413, "M_TOO_LARGE"),
            Error::UserInUse => (400, "M_USER_IN_USE"),
            Error::InvalidUsername(_) => (400, "M_INVALID_USERNAME"),
            Error::Exclusive(_) => (400, "M_EXCLUSIVE"),
            Error::RoomInUse => (400, "M_ROOM_IN_USE"),
            Error::UnsupportedRoomVersion(_) => (400, "M_UNSUPPORTED_ROOM_VERSION"),
            Error::BadState(_) => (400, "M_BAD_STATE"),
            Error::Unauthorized(_) => (401, "M_UNAUTHORIZED"),
            Error::Uia(body) => return (401, body.clone()),
            Error::Unavailable { .. } => (503, "M_UNKNOWN"),
            Error::Unknown(_) => (400, "M_UNKNOWN"),
            Error::Internal(_) => (500, "M_UNKNOWN"),
        };
        (status, json!({"errcode": errcode, "error": msg}))
    }

    /// `Retry-After` for errors that have one.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Error::Unavailable { retry_after_secs } => Some(u64::from(*retry_after_secs)),
            Error::LimitExceeded { retry_after_ms } => Some(retry_after_ms.div_ceil(1000)),
            _ => None,
        }
    }
}
