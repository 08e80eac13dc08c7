//! Building, hashing, signing and redacting PDUs, with no I/O.
//!
//! An event's id is its reference hash (room versions 4 and later); its content hash covers
//! the unredacted event; this server's ed25519 signature covers the redacted form. Room version
//! 12 has no `room_id` in the create event: the room id is `!` + the create event's reference
//! hash.

use std::collections::BTreeMap;

use ed25519_dalek::hazmat::ExpandedSecretKey;
use ruma::canonical_json::{CanonicalJsonObject, CanonicalJsonValue, RedactedBecause, redact};
use ruma::events::TimelineEventType;
use ruma::room_version_rules::RoomVersionRules;
use ruma::signatures::KeyPair as _;
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UInt,
    UserId,
};
use serde_json::Value;
use serde_json::value::RawValue;

/// The size limit of a PDU, signatures included (server-server API, "Size limits").
pub const MAX_PDU_BYTES: usize = 65_536;

/// Room versions this server creates and joins.
pub const SUPPORTED_ROOM_VERSIONS: [&str; 3] = ["10", "11", "12"];

#[derive(Debug, thiserror::Error)]
pub enum PduError {
    #[error("unsupported room version {0}")]
    UnsupportedVersion(String),
    #[error("event is not valid JSON for signing: {0}")]
    Json(String),
    #[error("event is over the 65,536-byte PDU limit")]
    TooLarge,
    #[error("signing key: {0}")]
    Key(String),
}

/// The rules of a supported room version.
pub fn rules(version: &str) -> Result<RoomVersionRules, PduError> {
    if !SUPPORTED_ROOM_VERSIONS.contains(&version) {
        return Err(PduError::UnsupportedVersion(version.to_owned()));
    }
    RoomVersionId::try_from(version)
        .ok()
        .and_then(|v| v.rules())
        .ok_or_else(|| PduError::UnsupportedVersion(version.to_owned()))
}

/// The server's signing key: an ed25519 key from a 32-byte seed, with its key id.
pub struct SigningKey {
    pair: Pair,
    pub key_id: String,
}

/// An ed25519 key as ruma signs with it.
struct Pair {
    secret: Secret,
    version: String,
}

/// Where a [`Pair`]'s secret is.
enum Secret {
    /// Here, expanded, with its public key as a curve point.
    Local(Box<(ExpandedSecretKey, ed25519_dalek::VerifyingKey)>),
    /// In the host's secret store, by name: the host signs (`lattice:bindings/crypto`), natively
    /// and several times faster than this code compiled to WebAssembly.
    Hosted(&'static str),
}

impl ruma::signatures::KeyPair for Pair {
    fn sign(&self, message: &[u8]) -> ruma::signatures::Signature {
        let bytes = match &self.secret {
            Secret::Local(local) => {
                let (secret, public) = local.as_ref();
                ed25519_dalek::hazmat::raw_sign::<ed25519_dalek::Sha512>(secret, message, public)
                    .to_bytes()
                    .to_vec()
            }
            // The caller read this secret a moment ago and `hosted` checked that it holds a
            // seed; if it is gone now, no signature can be made and the request fails (a trap)
            // before anything is written.
            Secret::Hosted(name) => {
                lattice_worker::bindings::lattice::bindings::crypto::ed25519_sign(name, message)
                    .unwrap_or_else(|e| panic!("the host cannot sign with secret {name:?}: {e:?}"))
            }
        };
        ruma::signatures::Signature::new(
            ruma::SigningKeyId::from_parts(ruma::SigningKeyAlgorithm::Ed25519, self.version.as_str().into()),
            bytes,
        )
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

fn seed_bytes(seed: &[u8]) -> Result<[u8; 32], PduError> {
    seed.get(..32)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| PduError::Key("the seed must have 32 bytes".into()))
}

impl SigningKey {
    /// `seed` is the 32-byte secret; the key id's version is derived from it, so the same seed
    /// always gives the same id.
    pub fn from_seed(seed: &[u8]) -> Result<Self, PduError> {
        Self::from_seed_with_version(seed, &Self::version_of(seed))
    }

    /// The key id version (`ed25519:<version>`) of a seed: from a hash of the seed, not the
    /// public key, since deriving the public key is a scalar multiplication.
    pub fn version_of(seed: &[u8]) -> String {
        let mut material = b"lattice signing key id\0".to_vec();
        material.extend_from_slice(seed);
        crate::util::b64(&crate::util::sha256(&material))
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(6)
            .collect::<String>()
    }

    /// A key with a given key id version (`ed25519:<version>`); derives the public key.
    pub fn from_seed_with_version(seed: &[u8], version: &str) -> Result<Self, PduError> {
        let secret = ExpandedSecretKey::from(&seed_bytes(seed)?);
        let public = ed25519_dalek::VerifyingKey::from(&secret);
        Ok(Self::from_parts(secret, public, version))
    }

    /// The key in the host's secret `name` whose seed is `seed` (read by the caller for the key
    /// id's version): the host derives the key pair once and signs. Signing needs no public key,
    /// so none is asked for here (see [`SigningKey::public_key`]).
    pub fn hosted(name: &'static str, seed: &[u8]) -> Result<Self, PduError> {
        seed_bytes(seed)?;
        Ok(Self::with_secret(Secret::Hosted(name), &Self::version_of(seed)))
    }

    fn from_parts(secret: ExpandedSecretKey, public: ed25519_dalek::VerifyingKey, version: &str) -> Self {
        Self::with_secret(Secret::Local(Box::new((secret, public))), version)
    }

    fn with_secret(secret: Secret, version: &str) -> Self {
        Self { pair: Pair { secret, version: version.to_owned() }, key_id: format!("ed25519:{version}") }
    }

    /// The public key; a hosted key asks the host.
    pub fn public_key(&self) -> Result<[u8; 32], PduError> {
        match &self.pair.secret {
            Secret::Local(local) => Ok(local.1.to_bytes()),
            Secret::Hosted(name) => {
                lattice_worker::bindings::lattice::bindings::crypto::ed25519_public_key(name)
                    .map_err(|e| PduError::Key(format!("{e:?}")))?
                    .as_slice()
                    .try_into()
                    .map_err(|_| PduError::Key("a public key has 32 bytes".into()))
            }
        }
    }

    /// Signs arbitrary JSON (server keys, for example).
    pub fn sign_json(&self, server_name: &str, object: &mut CanonicalJsonObject) -> Result<(), PduError> {
        ruma::signatures::sign_json(server_name, &self.pair, object)
            .map_err(|e| PduError::Json(e.to_string()))
    }

    pub fn sign_bytes(&self, bytes: &[u8]) -> Vec<u8> {
        self.pair.sign(bytes).as_bytes().to_vec()
    }
}

/// What a client (or the server itself) asks to append: the rest is filled in by the room.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Template {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_key: Option<String>,
    pub content: Value,
    /// Only for `m.room.redaction`: placed per room version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redacts: Option<String>,
}

/// Where an event goes in the graph.
#[derive(Debug, Clone)]
pub struct Position<'a> {
    pub room_id: Option<&'a str>,
    pub prev_events: &'a [String],
    pub auth_events: &'a [String],
    pub depth: u64,
    pub origin_server_ts: u64,
}

/// Builds, hashes and signs an event. Returns its id and its full JSON.
pub fn build(
    version: &str,
    server_name: &str,
    key: &SigningKey,
    sender: &str,
    template: &Template,
    at: &Position<'_>,
) -> Result<(String, CanonicalJsonObject), PduError> {
    let rules = rules(version)?;
    let mut object = serde_json::Map::new();
    object.insert("type".into(), Value::String(template.kind.clone()));
    object.insert("sender".into(), Value::String(sender.to_owned()));
    object.insert("content".into(), template.content.clone());
    if let Some(sk) = &template.state_key {
        object.insert("state_key".into(), Value::String(sk.clone()));
    }
    if let Some(room_id) = at.room_id {
        object.insert("room_id".into(), Value::String(room_id.to_owned()));
    }
    if let Some(redacts) = &template.redacts {
        if rules.redaction.content_field_redacts {
            if let Some(c) = object.get_mut("content").and_then(Value::as_object_mut) {
                c.insert("redacts".into(), Value::String(redacts.clone()));
            }
        } else {
            object.insert("redacts".into(), Value::String(redacts.clone()));
        }
    }
    object.insert("prev_events".into(), serde_json::json!(at.prev_events));
    object.insert("auth_events".into(), serde_json::json!(at.auth_events));
    object.insert("depth".into(), serde_json::json!(at.depth));
    object.insert("origin_server_ts".into(), serde_json::json!(at.origin_server_ts));
    let mut canonical: CanonicalJsonObject =
        match ruma::canonical_json::to_canonical_value(Value::Object(object)) {
            Ok(CanonicalJsonValue::Object(o)) => o,
            Ok(_) => return Err(PduError::Json("not an object".into())),
            Err(e) => return Err(PduError::Json(e.to_string())),
        };
    ruma::signatures::hash_and_sign_event(server_name, &key.pair, &mut canonical, &rules.redaction).map_err(
        |e| match e {
            ruma::signatures::JsonError::PduTooLarge => PduError::TooLarge,
            other => PduError::Json(other.to_string()),
        },
    )?;
    let hash =
        ruma::signatures::reference_hash(&canonical, &rules).map_err(|e| PduError::Json(e.to_string()))?;
    Ok((format!("${hash}"), canonical))
}

/// Canonical JSON (appendices: signing JSON) of any JSON value.
pub fn canonical(value: &Value) -> Result<String, PduError> {
    ruma::canonical_json::to_canonical_value(value)
        .map(|v| v.to_string())
        .map_err(|e| PduError::Json(e.to_string()))
}

/// Adds the content hash and this server's signature to an event, by the rules of `version`.
pub fn hash_and_sign(
    version: &str,
    server_name: &str,
    key: &SigningKey,
    event: &mut CanonicalJsonObject,
) -> Result<(), PduError> {
    let rules = rules(version)?;
    ruma::signatures::hash_and_sign_event(server_name, &key.pair, event, &rules.redaction)
        .map_err(|e| PduError::Json(e.to_string()))
}

/// The public keys to verify events of this server with.
pub fn public_key_map(
    server_name: &str,
    key: &SigningKey,
) -> Result<ruma::signatures::PublicKeyMap, PduError> {
    let mut set = ruma::signatures::PublicKeySet::new();
    set.insert(key.key_id.clone(), ruma::serde::Base64::new(key.public_key()?.to_vec()));
    let mut map = ruma::signatures::PublicKeyMap::new();
    map.insert(server_name.to_owned(), set);
    Ok(map)
}

/// Room version 12: the room id of a room whose create event this is.
pub fn room_id_from_create_event_id(event_id: &str) -> String {
    format!("!{}", event_id.trim_start_matches('$'))
}

/// The redacted form of an event, for the room's version.
pub fn redacted(
    version: &str,
    event: &CanonicalJsonObject,
    because: Option<CanonicalJsonObject>,
) -> Result<CanonicalJsonObject, PduError> {
    let rules = rules(version)?;
    redact(event.clone(), &rules.redaction, because.map(RedactedBecause::from_json))
        .map_err(|e| PduError::Json(e.to_string()))
}

/// A stored PDU, in the shape ruma's auth rules and state resolution read.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub event_id: OwnedEventId,
    pub room_id: Option<OwnedRoomId>,
    pub sender: OwnedUserId,
    pub origin_server_ts: MilliSecondsSinceUnixEpoch,
    pub kind: TimelineEventType,
    pub content: Box<RawValue>,
    pub state_key: Option<String>,
    pub prev_events: Vec<OwnedEventId>,
    pub auth_events: Vec<OwnedEventId>,
    pub redacts: Option<OwnedEventId>,
    pub depth: u64,
}

impl Pdu {
    /// Reads a PDU (with its id, which is not part of the signed JSON).
    pub fn from_json(event_id: &str, json: &Value) -> Result<Self, String> {
        let s = |k: &str| json.get(k).and_then(Value::as_str);
        let ids = |k: &str| -> Result<Vec<OwnedEventId>, String> {
            json.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|v| {
                            v.as_str()
                                .ok_or_else(|| format!("{k} holds a non-string"))
                                .and_then(|s| EventId::parse(s).map_err(|e| e.to_string()))
                        })
                        .collect()
                })
                .unwrap_or_else(|| Ok(Vec::new()))
        };
        let content = json.get("content").cloned().unwrap_or(Value::Object(Default::default()));
        let redacts = s("redacts").or_else(|| content.get("redacts").and_then(Value::as_str));
        Ok(Self {
            event_id: EventId::parse(event_id).map_err(|e| e.to_string())?,
            room_id: s("room_id").map(RoomId::parse).transpose().map_err(|e| e.to_string())?,
            sender: UserId::parse(s("sender").ok_or("missing sender")?).map_err(|e| e.to_string())?,
            origin_server_ts: MilliSecondsSinceUnixEpoch(
                UInt::new(json.get("origin_server_ts").and_then(Value::as_u64).unwrap_or(0))
                    .unwrap_or_default(),
            ),
            kind: TimelineEventType::from(s("type").ok_or("missing type")?),
            content: serde_json::value::to_raw_value(&content).map_err(|e| e.to_string())?,
            state_key: s("state_key").map(str::to_owned),
            prev_events: ids("prev_events")?,
            auth_events: ids("auth_events")?,
            redacts: redacts.and_then(|r| EventId::parse(r).ok()),
            depth: json.get("depth").and_then(Value::as_u64).unwrap_or(0),
        })
    }
}

impl ruma::state_res::Event for Pdu {
    type Id = OwnedEventId;

    fn event_id(&self) -> &Self::Id {
        &self.event_id
    }
    fn room_id(&self) -> Option<&RoomId> {
        self.room_id.as_deref()
    }
    fn sender(&self) -> &UserId {
        &self.sender
    }
    fn origin_server_ts(&self) -> MilliSecondsSinceUnixEpoch {
        self.origin_server_ts
    }
    fn event_type(&self) -> &TimelineEventType {
        &self.kind
    }
    fn content(&self) -> &RawValue {
        &self.content
    }
    fn state_key(&self) -> Option<&str> {
        self.state_key.as_deref()
    }
    fn prev_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.prev_events.iter())
    }
    fn auth_events(&self) -> Box<dyn DoubleEndedIterator<Item = &Self::Id> + '_> {
        Box::new(self.auth_events.iter())
    }
    fn redacts(&self) -> Option<&Self::Id> {
        self.redacts.as_ref()
    }
    fn rejected(&self) -> bool {
        false
    }
}

/// `(type, state_key)` → value: a room state.
pub type StateMap<T> = BTreeMap<(String, String), T>;

/// The event as clients see it (client-server "ClientEvent" format).
pub fn client_event(event_id: &str, pdu: &Value, room_id: &str, with_room_id: bool) -> Value {
    let mut out = serde_json::Map::new();
    for k in ["type", "sender", "content", "state_key", "origin_server_ts", "redacts", "unsigned"] {
        if let Some(v) = pdu.get(k) {
            out.insert(k.into(), v.clone());
        }
    }
    out.insert("event_id".into(), Value::String(event_id.to_owned()));
    if with_room_id {
        out.insert("room_id".into(), Value::String(room_id.to_owned()));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests;
