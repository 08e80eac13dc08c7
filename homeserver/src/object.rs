//! What the homeserver's Durable Object classes (`Room`, `User`) share: the failure a class
//! reports to the front, typed reads of the object's storage, encoding an answer, and calling
//! an object by name from the front with its failures mapped to Matrix errors.

use lattice_worker::bindings::lattice::bindings::{durable_object, storage, types};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// An error as an object reports it to the front: an HTTP status and a Matrix error.
#[derive(Debug, Serialize, Deserialize)]
pub struct Failure {
    pub status: u16,
    pub errcode: String,
    pub error: String,
}

pub fn fail(status: u16, errcode: &str, error: impl Into<String>) -> Failure {
    Failure { status, errcode: errcode.to_owned(), error: error.into() }
}

/// A failed call on the object's own storage: retryable when the backend is down or the
/// object lost its shard.
pub fn storage_fail(e: types::Error) -> Failure {
    match e {
        types::Error::Unavailable(_) | types::Error::Fenced => {
            fail(503, "M_UNKNOWN", "object storage is unavailable; retry")
        }
        other => fail(500, "M_UNKNOWN", format!("object storage: {other:?}")),
    }
}

/// A failed D1 call inside an object: retryable (503, with `unavailable` as the message) when
/// the database is down or migrating, else an internal error.
pub fn db_failure(e: crate::db::DbError, unavailable: &str) -> Failure {
    match e {
        crate::db::DbError::Unavailable { .. } | crate::db::DbError::Migrating => {
            fail(503, "M_UNKNOWN", unavailable)
        }
        other => fail(500, "M_UNKNOWN", other.to_string()),
    }
}

/// [`db_failure`] with the plain message.
pub fn db_fail(e: crate::db::DbError) -> Failure {
    db_failure(e, "the database is unavailable")
}

/// A value as JSON bytes, serialized directly (not through a `serde_json::Value` tree).
pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    // Serializing fails only for maps with non-string keys, which no stored type has; `json!`,
    // which this replaces, panics in the same case.
    serde_json::to_vec(value).expect("JSON-serializable value")
}

/// One JSON value of the object's storage.
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, Failure> {
    storage::get(&[key.to_owned()])
        .map_err(storage_fail)?
        .into_iter()
        .next()
        .map(|(_, v)| {
            serde_json::from_slice(&v).map_err(|e| fail(500, "M_UNKNOWN", format!("object storage: {e}")))
        })
        .transpose()
}

/// Decodes a request of type `Req`, runs `handler` and encodes its answer.
pub fn serve<Req: DeserializeOwned, Rep: Serialize>(
    request: &durable_object::Request,
    handler: impl FnOnce(Req) -> Result<Rep, Failure>,
) -> durable_object::Response {
    let out = serde_json::from_slice::<Req>(&request.body)
        .map_err(|e| fail(400, "M_BAD_JSON", format!("object request: {e}")))
        .and_then(handler);
    let (status, body) = match out {
        Ok(reply) => (200, to_bytes(&reply)),
        Err(f) => (f.status, to_bytes(&f)),
    };
    durable_object::Response { status, headers: vec![], body }
}

/// Calls the object named `name` of namespace `binding` and decodes its answer.
pub fn call<Req: Serialize, Rep: DeserializeOwned>(
    binding: &str,
    name: &str,
    headers: Vec<(String, String)>,
    request: &Req,
) -> Result<Rep, Error> {
    let ns = durable_object::Namespace::open(binding).map_err(|e| Error::Internal(format!("{e:?}")))?;
    let id = ns.id_from_name(name);
    let resp = ns
        .fetch(
            &id,
            &durable_object::Request {
                method: "POST".into(),
                path: "/".into(),
                headers,
                body: to_bytes(request),
            },
        )
        .map_err(|e| match e {
            types::Error::Unavailable(u) => {
                Error::Unavailable { retry_after_secs: u.retry_after_secs.max(1) }
            }
            other => Error::Internal(format!("{binding} object: {other:?}")),
        })?;
    if resp.status == 200 {
        return serde_json::from_slice(&resp.body)
            .map_err(|e| Error::Internal(format!("{binding} reply: {e}")));
    }
    let f: Failure = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|_| fail(500, "M_UNKNOWN", String::from_utf8_lossy(&resp.body).into_owned()));
    Err(match (f.status, f.errcode.as_str()) {
        (403, _) => Error::Forbidden(f.error),
        (404, _) => Error::NotFound(f.error),
        (413, _) => Error::TooLarge,
        (429, _) => Error::LimitExceeded { retry_after_ms: 10_000 },
        (503, _) => Error::Unavailable { retry_after_secs: 1 },
        (_, "M_UNSUPPORTED_ROOM_VERSION") => Error::UnsupportedRoomVersion(f.error),
        (_, "M_ROOM_IN_USE") => Error::RoomInUse,
        (400, "M_INVALID_PARAM") => Error::InvalidParam(f.error),
        (400, _) => Error::BadJson(f.error),
        _ => Error::Internal(f.error),
    })
}
