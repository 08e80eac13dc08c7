//! Against the specification's own test vectors (appendices: canonical JSON, signing).

use base64::Engine as _;
use serde_json::{Value, json};

use super::*;

/// appendices.md, "Signing Key": the seed, server name and key id of every test vector.
fn spec_key() -> SigningKey {
    // The spec's seed has non-zero trailing bits, which strict decoders refuse.
    let lenient = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let seed =
        lenient.decode("YJDBA9Xnr2sVqXD9Vj7XVUnmFZcZrlw8Md7kMW+3XA1").expect("the spec's seed is base64");
    SigningKey::from_seed_with_version(&seed, "1").expect("a valid seed")
}

fn object(v: Value) -> CanonicalJsonObject {
    match ruma::canonical_json::to_canonical_value(v).expect("canonical") {
        CanonicalJsonValue::Object(o) => o,
        other => panic!("not an object: {other:?}"),
    }
}

#[test]
fn canonical_json_matches_the_spec_examples() {
    let check = |input: &str, expected: &str| {
        let v: Value = serde_json::from_str(input).expect("example is JSON");
        assert_eq!(canonical(&v).expect("canonical"), expected, "for {input}");
    };
    check("{}", "{}");
    check(r#"{"one": 1, "two": "Two"}"#, r#"{"one":1,"two":"Two"}"#);
    check(r#"{"b": "2", "a": "1"}"#, r#"{"a":"1","b":"2"}"#);
    check(
        r#"{"auth": {"success": true, "mxid": "@john.doe:example.com", "profile": {"display_name": "John Doe",
            "three_pids": [{"medium": "email", "address": "john.doe@example.org"},
                           {"medium": "msisdn", "address": "123456789"}]}}}"#,
        r#"{"auth":{"mxid":"@john.doe:example.com","profile":{"display_name":"John Doe","three_pids":[{"address":"john.doe@example.org","medium":"email"},{"address":"123456789","medium":"msisdn"}]},"success":true}}"#,
    );
    check(r#"{"a": "日本語"}"#, r#"{"a":"日本語"}"#);
    check(r#"{"本": 2, "日": 1}"#, r#"{"日":1,"本":2}"#);
    check(r#"{"a": "\u65E5"}"#, r#"{"a":"日"}"#);
    check(r#"{"a": null}"#, r#"{"a":null}"#);
}

#[test]
fn json_signing_matches_the_spec_examples() {
    let key = spec_key();
    let check = |input: Value, expected: &str| {
        let mut o = object(input);
        key.sign_json("domain", &mut o).expect("sign");
        let sig = o["signatures"].as_object().and_then(|s| s.get("domain")).and_then(|d| d.as_object());
        let sig = sig.and_then(|d| d.get("ed25519:1")).and_then(|s| s.as_str()).expect("a signature");
        assert_eq!(sig, expected);
    };
    check(
        json!({}),
        "K8280/U9SSy9IVtjBuVeLr+HpOB4BQFWbg+UZaADMtTdGYI7Geitb76LTrr5QV/7Xg4ahLwYGYZzuHGZKM5ZAQ",
    );
    check(
        json!({"one": 1, "two": "Two"}),
        "KqmLSbO39/Bzb0QIYE82zqLwsA+PDzYIpIRA2sRQ4sL53+sN6/fpNSoqE7BP7vBZhG6kYdD13EIMJpvhJI+6Bw",
    );
}

#[test]
fn event_signing_matches_the_spec_example() {
    // appendices.md, "Event Signing": the minimal event. Its redaction keeps `origin`, which
    // room versions before 11 do.
    let mut event = object(json!({
        "room_id": "!x:domain", "sender": "@a:domain", "origin": "domain", "origin_server_ts": 1000000,
        "signatures": {}, "hashes": {}, "type": "X", "content": {}, "prev_events": [], "auth_events": [],
        "depth": 3, "unsigned": {"age_ts": 1000000}
    }));
    hash_and_sign("10", "domain", &spec_key(), &mut event).expect("sign");
    let v = serde_json::to_value(&event).expect("json");
    assert_eq!(v["hashes"]["sha256"], "5jM4wQpv6lnBo7CLIghJuHdW+s2CMBJPUOGOC89ncos");
    assert_eq!(
        v["signatures"]["domain"]["ed25519:1"],
        "KxwGjPSDEtvnFgU00fwFz+l6d2pJM6XBIaMEn81SXPTRl16AqLAYqfIReFGZlHi5KLjAWbOoMszkwsQma+lYAg"
    );
}

fn message(version: &str, key: &SigningKey) -> (String, CanonicalJsonObject) {
    let t = Template {
        kind: "m.room.message".into(),
        state_key: None,
        content: json!({"body": "hi", "msgtype": "m.text"}),
        redacts: None,
    };
    let at = Position {
        room_id: Some("!r:example.org"),
        prev_events: &["$prev".to_owned()],
        auth_events: &["$auth".to_owned()],
        depth: 7,
        origin_server_ts: 1_700_000_000_000,
    };
    build(version, "example.org", key, "@a:example.org", &t, &at).expect("build")
}

#[test]
fn built_events_have_reference_hash_ids_and_verify() {
    let key = SigningKey::from_seed(&[7u8; 32]).expect("key");
    for version in SUPPORTED_ROOM_VERSIONS {
        let (id, event) = message(version, &key);
        let rules = rules(version).expect("rules");
        let hash = ruma::signatures::reference_hash(&event, &rules).expect("hash");
        assert_eq!(id, format!("${hash}"), "room version {version}");
        // The id is not part of the event (room versions 3 and later).
        assert!(!event.contains_key("event_id"));
        let verified = ruma::signatures::verify_event(
            &public_key_map("example.org", &key).expect("keys"),
            &event,
            &rules,
        )
        .expect("verifies");
        assert_eq!(verified, ruma::signatures::Verified::All, "room version {version}");
        // Tampering with the content breaks the content hash, not the signature.
        let mut tampered = event.clone();
        tampered.insert("content".into(), object(json!({"body": "bye"})).into());
        let v = ruma::signatures::verify_event(
            &public_key_map("example.org", &key).expect("keys"),
            &tampered,
            &rules,
        )
        .expect("verifies");
        assert_eq!(v, ruma::signatures::Verified::Signatures);
        // A signature by another key does not verify.
        let other = SigningKey::from_seed(&[8u8; 32]).expect("key");
        let mut keys = public_key_map("example.org", &other).expect("keys");
        keys.get_mut("example.org")
            .expect("server")
            .insert(key.key_id.clone(), ruma::serde::Base64::new(vec![0; 32]));
        assert!(ruma::signatures::verify_event(&keys, &event, &rules).is_err());
    }
}

#[test]
fn the_same_seed_gives_the_same_key_id() {
    let a = SigningKey::from_seed(&[1u8; 32]).expect("key");
    let b = SigningKey::from_seed(&[1u8; 32]).expect("key");
    let c = SigningKey::from_seed(&[2u8; 32]).expect("key");
    assert_eq!(a.key_id, b.key_id);
    assert_ne!(a.key_id, c.key_id);
    assert!(SigningKey::from_seed(&[1u8; 16]).is_err());
}

#[test]
fn version_12_room_ids_are_the_create_event_hash() {
    let key = SigningKey::from_seed(&[3u8; 32]).expect("key");
    let t = Template {
        kind: "m.room.create".into(),
        state_key: Some(String::new()),
        content: json!({"room_version": "12"}),
        redacts: None,
    };
    let at = Position { room_id: None, prev_events: &[], auth_events: &[], depth: 1, origin_server_ts: 1 };
    let (id, event) = build("12", "example.org", &key, "@a:example.org", &t, &at).expect("build");
    assert!(!event.contains_key("room_id"));
    let room = room_id_from_create_event_id(&id);
    assert!(room.starts_with('!') && !room.contains(':'));
    assert_eq!(&room[1..], &id[1..]);
    assert!(ruma::RoomId::parse(room.as_str()).is_ok(), "{room} is a valid room id");
}

#[test]
fn redaction_follows_the_room_version() {
    let key = SigningKey::from_seed(&[4u8; 32]).expect("key");
    let member = Template {
        kind: "m.room.member".into(),
        state_key: Some("@a:example.org".into()),
        content: json!({"membership": "join", "displayname": "A", "join_authorised_via_users_server": "@b:example.org"}),
        redacts: None,
    };
    let at = Position {
        room_id: Some("!r:example.org"),
        prev_events: &[],
        auth_events: &[],
        depth: 2,
        origin_server_ts: 5,
    };
    for version in SUPPORTED_ROOM_VERSIONS {
        let (_, event) = build(version, "example.org", &key, "@a:example.org", &member, &at).expect("build");
        let r = serde_json::to_value(redacted(version, &event, None).expect("redact")).expect("json");
        assert_eq!(r["content"]["membership"], "join", "v{version}");
        assert!(r["content"].get("displayname").is_none(), "v{version}");
        // Kept since room version 9.
        assert_eq!(r["content"]["join_authorised_via_users_server"], "@b:example.org", "v{version}");
        assert!(r.get("signatures").is_some() && r.get("hashes").is_some());
    }
    // Version 11 keeps the whole create event content; version 10 does not.
    let create = Template {
        kind: "m.room.create".into(),
        state_key: Some(String::new()),
        content: json!({"creator": "@a:example.org", "m.federate": true, "extra": 1}),
        redacts: None,
    };
    let at = Position {
        room_id: Some("!r:example.org"),
        prev_events: &[],
        auth_events: &[],
        depth: 1,
        origin_server_ts: 1,
    };
    let (_, c10) = build("10", "example.org", &key, "@a:example.org", &create, &at).expect("build");
    let (_, c11) = build("11", "example.org", &key, "@a:example.org", &create, &at).expect("build");
    let r10 = serde_json::to_value(redacted("10", &c10, None).expect("redact")).expect("json");
    let r11 = serde_json::to_value(redacted("11", &c11, None).expect("redact")).expect("json");
    assert!(r10["content"].get("extra").is_none());
    assert_eq!(r11["content"]["extra"], 1);
}

#[test]
fn unsupported_room_versions_are_refused() {
    let key = SigningKey::from_seed(&[5u8; 32]).expect("key");
    for v in ["1", "9", "13", "x"] {
        assert!(matches!(rules(v), Err(PduError::UnsupportedVersion(_))), "{v}");
        let t =
            Template { kind: "m.room.message".into(), state_key: None, content: json!({}), redacts: None };
        let at = Position {
            room_id: Some("!r:e"),
            prev_events: &[],
            auth_events: &[],
            depth: 1,
            origin_server_ts: 1,
        };
        assert!(build(v, "e", &key, "@a:e", &t, &at).is_err());
    }
}

#[test]
fn oversized_events_are_refused() {
    let key = SigningKey::from_seed(&[6u8; 32]).expect("key");
    let t = Template {
        kind: "m.room.message".into(),
        state_key: None,
        content: json!({"body": "x".repeat(70_000)}),
        redacts: None,
    };
    let at =
        Position { room_id: Some("!r:e"), prev_events: &[], auth_events: &[], depth: 1, origin_server_ts: 1 };
    assert!(matches!(build("12", "e", &key, "@a:e", &t, &at), Err(PduError::TooLarge)));
}

#[test]
fn keys_sign_like_ruma_and_rfc_8032() {
    let seed = [7u8; 32];
    let derived = SigningKey::from_seed(&seed).expect("a valid seed");
    // What ruma's own key pair makes of the same seed.
    let mut der =
        vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    der.extend_from_slice(&seed);
    let ruma_pair = ruma::signatures::Ed25519KeyPair::from_der(&der, "x".into()).expect("ruma key pair");
    assert_eq!(ruma_pair.public_key(), derived.public_key().expect("public key"));
    assert_eq!(ruma_pair.sign(b"lattice").as_bytes(), derived.sign_bytes(b"lattice").as_slice());
    // RFC 8032 section 7.1, TEST 1, which the runtime's host-side signing is tested against too:
    // a seed gives the same public key whether the guest or the host holds it.
    let hex = |s: &str| {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect::<Vec<u8>>()
    };
    let rfc = SigningKey::from_seed(&hex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))
        .expect("seed");
    assert_eq!(
        rfc.public_key().expect("public key").to_vec(),
        hex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
    );
    assert_eq!(
        rfc.sign_bytes(b""),
        hex(
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        )
    );
}
