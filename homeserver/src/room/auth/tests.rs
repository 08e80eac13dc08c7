//! Auth rules and state resolution on hand-built event graphs.

use std::collections::HashMap;

use ruma::OwnedEventId;
use serde_json::{Value, json};

use super::*;
use crate::room::pdu::{Position, SigningKey, Template, build, room_id_from_create_event_id};

const ALICE: &str = "@alice:example.org";
const BOB: &str = "@bob:example.org";
const CAROL: &str = "@carol:example.org";
const DAVE: &str = "@dave:example.org";

/// A room built event by event; `heads` lets a test fork the graph.
struct Room {
    version: String,
    room_id: String,
    key: SigningKey,
    events: HashMap<OwnedEventId, Pdu>,
    ts: u64,
}

type State = StateMap<OwnedEventId>;

impl Room {
    fn new(version: &str, creator: &str, create_extra: Value) -> (Self, State, OwnedEventId) {
        let key = SigningKey::from_seed(&[9u8; 32]).expect("key");
        let mut content = json!({"room_version": version});
        if version == "10" {
            content["creator"] = json!(creator);
        }
        if let (Some(c), Some(extra)) = (content.as_object_mut(), extra_fields(create_extra)) {
            c.extend(extra);
        }
        let v12 = version == "12";
        let room_id_field = (!v12).then(|| "!room:example.org".to_owned());
        let t =
            Template { kind: "m.room.create".into(), state_key: Some(String::new()), content, redacts: None };
        let at = Position {
            room_id: room_id_field.as_deref(),
            prev_events: &[],
            auth_events: &[],
            depth: 1,
            origin_server_ts: 1,
        };
        let (id, obj) = build(version, "example.org", &key, creator, &t, &at).expect("create");
        let room_id = room_id_field.unwrap_or_else(|| room_id_from_create_event_id(&id));
        let pdu = Pdu::from_json(&id, &serde_json::to_value(&obj).expect("json")).expect("pdu");
        check(version, &pdu, |_| None, |_, _| None).expect("the create event is valid");
        let eid = pdu.event_id.clone();
        let mut room = Room { version: version.into(), room_id, key, events: HashMap::new(), ts: 1 };
        room.events.insert(eid.clone(), pdu);
        let mut state = State::new();
        state.insert(("m.room.create".into(), String::new()), eid.clone());
        (room, state, eid)
    }

    /// Builds an event on `prev` with the auth events its type needs from `state`; checks it
    /// against `state` when `checked`. Returns the new state and event id, or the rule broken.
    #[expect(clippy::too_many_arguments, reason = "each test reads as one line per event")]
    fn append(
        &mut self,
        state: &State,
        prev: &OwnedEventId,
        sender: &str,
        kind: &str,
        state_key: Option<&str>,
        content: Value,
        checked: bool,
    ) -> Result<(State, OwnedEventId), String> {
        let types = auth_types(&self.version, kind, sender, state_key, &content)?;
        let mut auth: Vec<String> =
            types.iter().filter_map(|k| state.get(k).map(ToString::to_string)).collect();
        if self.version != "12" {
            let create = state[&("m.room.create".to_owned(), String::new())].to_string();
            if !auth.contains(&create) {
                auth.push(create);
            }
        }
        self.ts += 1;
        let depth = self.events[prev].depth + 1;
        let t =
            Template { kind: kind.into(), state_key: state_key.map(str::to_owned), content, redacts: None };
        let at = Position {
            room_id: Some(&self.room_id),
            prev_events: &[prev.to_string()],
            auth_events: &auth,
            depth,
            origin_server_ts: self.ts,
        };
        let (id, obj) =
            build(&self.version, "example.org", &self.key, sender, &t, &at).map_err(|e| e.to_string())?;
        let pdu = Pdu::from_json(&id, &serde_json::to_value(&obj).expect("json"))?;
        if checked {
            let events = &self.events;
            check(
                &self.version,
                &pdu,
                |id| events.get(id).cloned(),
                |t, k| state.get(&(t.to_owned(), k.to_owned())).and_then(|id| events.get(id).cloned()),
            )?;
        }
        let eid = pdu.event_id.clone();
        self.events.insert(eid.clone(), pdu);
        let mut next = state.clone();
        if let Some(k) = state_key {
            next.insert((kind.to_owned(), k.to_owned()), eid.clone());
        }
        Ok((next, eid))
    }
}

fn extra_fields(v: Value) -> Option<serde_json::Map<String, Value>> {
    v.as_object().cloned()
}

/// create, alice joins, power levels (alice 100 before v12), public join rules, bob and carol
/// join.
fn public_room(version: &str) -> (Room, State, OwnedEventId) {
    let (mut room, s, head) = Room::new(version, ALICE, json!({}));
    let (s, head) = room
        .append(&s, &head, ALICE, "m.room.member", Some(ALICE), json!({"membership": "join"}), true)
        .expect("alice joins");
    let users = if version == "12" { json!({}) } else { json!({ALICE: 100}) };
    let (s, head) = room
        .append(
            &s,
            &head,
            ALICE,
            "m.room.power_levels",
            Some(""),
            json!({"users": users, "users_default": 0, "state_default": 50, "ban": 50}),
            true,
        )
        .expect("power levels");
    let (s, head) = room
        .append(&s, &head, ALICE, "m.room.join_rules", Some(""), json!({"join_rule": "public"}), true)
        .expect("join rules");
    let (s, head) = room
        .append(&s, &head, BOB, "m.room.member", Some(BOB), json!({"membership": "join"}), true)
        .expect("bob joins");
    let (s, head) = room
        .append(&s, &head, CAROL, "m.room.member", Some(CAROL), json!({"membership": "join"}), true)
        .expect("carol joins");
    (room, s, head)
}

#[test]
fn members_may_talk_and_outsiders_may_not() {
    for v in SUPPORTED {
        let (mut room, s, head) = public_room(v);
        assert!(
            room.append(&s, &head, BOB, "m.room.message", None, json!({"body": "hi"}), true).is_ok(),
            "v{v}"
        );
        let err = room.append(&s, &head, DAVE, "m.room.message", None, json!({"body": "hi"}), true);
        assert!(err.is_err(), "v{v}: a non-member sent a message");
        // State needs power: bob (0) may not rename the room, alice may.
        assert!(
            room.append(&s, &head, BOB, "m.room.name", Some(""), json!({"name": "x"}), true).is_err(),
            "v{v}"
        );
        assert!(
            room.append(&s, &head, ALICE, "m.room.name", Some(""), json!({"name": "x"}), true).is_ok(),
            "v{v}"
        );
    }
}

const SUPPORTED: [&str; 3] = ["10", "11", "12"];

#[test]
fn invite_only_rooms_need_an_invite_and_bans_stick() {
    for v in SUPPORTED {
        let (mut room, s, head) = public_room(v);
        let (s, head) = room
            .append(&s, &head, ALICE, "m.room.join_rules", Some(""), json!({"join_rule": "invite"}), true)
            .expect("invite only");
        assert!(
            room.append(&s, &head, DAVE, "m.room.member", Some(DAVE), json!({"membership": "join"}), true)
                .is_err(),
            "v{v}"
        );
        let (s2, head2) = room
            .append(&s, &head, ALICE, "m.room.member", Some(DAVE), json!({"membership": "invite"}), true)
            .expect("invite");
        assert!(
            room.append(&s2, &head2, DAVE, "m.room.member", Some(DAVE), json!({"membership": "join"}), true)
                .is_ok(),
            "v{v}"
        );
        // Bob (power 0) may not ban; alice may, and the banned user cannot join.
        assert!(
            room.append(&s, &head, BOB, "m.room.member", Some(CAROL), json!({"membership": "ban"}), true)
                .is_err(),
            "v{v}"
        );
        let (s3, head3) = room
            .append(&s, &head, ALICE, "m.room.member", Some(DAVE), json!({"membership": "ban"}), true)
            .expect("ban");
        assert!(
            room.append(&s3, &head3, DAVE, "m.room.member", Some(DAVE), json!({"membership": "join"}), true)
                .is_err(),
            "v{v}"
        );
    }
}

#[test]
fn version_12_creators_have_infinite_power() {
    let (mut room, s, head) = public_room("12");
    // Naming the creator in power levels is refused.
    let listed =
        room.append(&s, &head, ALICE, "m.room.power_levels", Some(""), json!({"users": {ALICE: 100}}), true);
    assert!(listed.is_err(), "v12 refuses creators in power levels");
    // Bob gets 100 and still cannot ban or demote the creator.
    let (s, head) = room
        .append(
            &s,
            &head,
            ALICE,
            "m.room.power_levels",
            Some(""),
            json!({"users": {BOB: 100}, "ban": 50, "state_default": 50}),
            true,
        )
        .expect("alice promotes bob");
    assert!(
        room.append(&s, &head, BOB, "m.room.member", Some(ALICE), json!({"membership": "ban"}), true)
            .is_err()
    );
    assert!(
        room.append(&s, &head, BOB, "m.room.member", Some(CAROL), json!({"membership": "ban"}), true).is_ok()
    );
    // In version 11 the same shape gives bob (100) no power over alice (100) either, but an
    // explicit 100 for alice is accepted.
    let (mut r11, s11, h11) = public_room("11");
    assert!(
        r11.append(&s11, &h11, ALICE, "m.room.power_levels", Some(""), json!({"users": {ALICE: 100}}), true)
            .is_ok()
    );
    // additional_creators (v12) are creators too.
    let (mut r, s, head) = Room::new("12", ALICE, json!({"additional_creators": [BOB]}));
    let (s, head) = r
        .append(&s, &head, ALICE, "m.room.member", Some(ALICE), json!({"membership": "join"}), true)
        .expect("join");
    assert!(
        r.append(&s, &head, ALICE, "m.room.power_levels", Some(""), json!({"users": {BOB: 50}}), true)
            .is_err()
    );
}

#[test]
fn state_resolution_drops_an_unauthorized_power_change() {
    for v in SUPPORTED {
        let (mut room, s, head) = public_room(v);
        // Branch A: alice gives bob 50. Branch B (concurrent): bob, with no power, gives himself 100.
        let users_a = if v == "12" { json!({BOB: 50}) } else { json!({ALICE: 100, BOB: 50}) };
        let (sa, a) = room
            .append(&s, &head, ALICE, "m.room.power_levels", Some(""), json!({"users": users_a}), true)
            .expect("A");
        let (sb, b) = room
            .append(&s, &head, BOB, "m.room.power_levels", Some(""), json!({"users": {BOB: 100}}), false)
            .expect("B built");
        let resolved = resolve(v, &[sa, sb], &room.events).expect("resolves");
        assert_eq!(resolved[&("m.room.power_levels".to_owned(), String::new())], a, "v{v}");
        assert_ne!(resolved[&("m.room.power_levels".to_owned(), String::new())], b);
    }
}

#[test]
fn state_resolution_orders_conflicting_power_levels_deterministically() {
    for v in SUPPORTED {
        let (mut room, s, head) = public_room(v);
        let base = if v == "12" { json!({}) } else { json!({ALICE: 100}) };
        let mut ua = base.clone();
        ua[BOB] = json!(50);
        let mut ub = base;
        ub[CAROL] = json!(50);
        let (sa, _) = room
            .append(&s, &head, ALICE, "m.room.power_levels", Some(""), json!({"users": ua}), true)
            .expect("A");
        let (sb, b) = room
            .append(&s, &head, ALICE, "m.room.power_levels", Some(""), json!({"users": ub}), true)
            .expect("B");
        // Both authorized by the same sender: the later one (B) is applied last and wins,
        // whatever order the states come in.
        let one = resolve(v, &[sa.clone(), sb.clone()], &room.events).expect("resolves");
        let two = resolve(v, &[sb, sa], &room.events).expect("resolves");
        assert_eq!(one, two, "v{v}: resolution depends on input order");
        assert_eq!(one[&("m.room.power_levels".to_owned(), String::new())], b, "v{v}");
    }
}

#[test]
fn state_resolution_makes_a_ban_win_over_a_racing_join() {
    for v in SUPPORTED {
        let (mut room, s, head) = public_room(v);
        // Concurrently: dave joins the public room; alice bans dave.
        let (sa, _) = room
            .append(&s, &head, DAVE, "m.room.member", Some(DAVE), json!({"membership": "join"}), true)
            .expect("join");
        let (sb, ban) = room
            .append(&s, &head, ALICE, "m.room.member", Some(DAVE), json!({"membership": "ban"}), true)
            .expect("ban");
        let resolved = resolve(v, &[sa, sb], &room.events).expect("resolves");
        assert_eq!(resolved[&("m.room.member".to_owned(), DAVE.to_owned())], ban, "v{v}");
    }
}

#[test]
fn unconflicted_state_passes_through() {
    let (mut room, s, head) = public_room("12");
    let (s1, _) =
        room.append(&s, &head, ALICE, "m.room.name", Some(""), json!({"name": "n"}), true).expect("name");
    let resolved = resolve("12", &[s1.clone(), s1.clone()], &room.events).expect("resolves");
    assert_eq!(resolved, s1);
    // Missing auth events are an error, not a guess.
    let mut partial = room.events.clone();
    partial.retain(|_, p| p.kind.to_string() != "m.room.create");
    let (sa, _) =
        room.append(&s, &head, ALICE, "m.room.topic", Some(""), json!({"topic": "a"}), true).expect("a");
    let (sb, _) =
        room.append(&s, &head, ALICE, "m.room.topic", Some(""), json!({"topic": "b"}), true).expect("b");
    assert!(resolve("12", &[sa, sb], &partial).is_err());
}
