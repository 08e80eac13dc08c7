//! Rooms through the client-server API: membership changes, state, aliases and the directory,
//! filters and lazy-loaded members, limited timelines, and token management — every response
//! validated against the spec by the proxy.

use lattice_e2e::proxy::ValidatingProxy;
use lattice_e2e::{Backend, Client, Homeserver, Options, enc};
use serde_json::{Value, json};

async fn start() -> Option<(Homeserver, ValidatingProxy)> {
    let hs = Homeserver::start(Options::new(Backend::Embedded)).await?;
    let proxy = ValidatingProxy::start(&hs.url).await;
    Some((hs, proxy))
}

fn login(user: &str, pw: &str) -> Value {
    json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": pw})
}

#[tokio::test(flavor = "multi_thread")]
async fn membership_state_aliases_and_directory() {
    let Some((hs, proxy)) = start().await else { return };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let bob_id = hs.user_id("bob");
    let alias = format!("#lobby:{}", hs.server_name);
    let r = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "public_chat", "visibility": "public", "room_alias_name": "lobby", "name": "Lobby",
                   "topic": "hello", "room_version": "11", "power_level_content_override": {"invite": 50}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let room = r.body["room_id"].as_str().expect("room").to_owned();
    assert!(room.ends_with(&format!(":{}", hs.server_name)), "room version 11 ids name the server");
    // The alias is taken now.
    let r = alice.post("/_matrix/client/v3/createRoom", json!({"room_alias_name": "lobby"})).await;
    assert_eq!((r.status, r.errcode()), (400, "M_ROOM_IN_USE"), "{:?}", r.body);

    // Directory: alias resolution, published rooms, visibility.
    let r = bob.get(&format!("/_matrix/client/v3/directory/room/{}", enc(&alias))).await;
    assert_eq!(r.body["room_id"], json!(room), "{:?}", r.body);
    let r = anon.get("/_matrix/client/v3/publicRooms").await;
    let entry =
        r.body["chunk"].as_array().and_then(|c| c.iter().find(|e| e["room_id"] == json!(room)).cloned());
    let entry = entry.expect("the room is published");
    assert_eq!((entry["name"].as_str(), entry["topic"].as_str()), (Some("Lobby"), Some("hello")));
    assert_eq!(entry["canonical_alias"], json!(alias));
    assert_eq!(entry["num_joined_members"], 1);
    assert_eq!(
        bob.get(&format!("/_matrix/client/v3/directory/list/room/{}", enc(&room))).await.body["visibility"],
        "public"
    );

    // Join by alias; state reads; the power level override applies (bob, 0, cannot invite).
    let r = bob.post(&format!("/_matrix/client/v3/join/{}", enc(&alias)), json!({})).await;
    assert_eq!(r.body["room_id"], json!(room), "{:?}", r.body);
    let r = bob.get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.power_levels", enc(&room))).await;
    assert_eq!(r.body["invite"], 50, "{:?}", r.body);
    let r = bob.get(&format!("/_matrix/client/v3/rooms/{}/state", enc(&room))).await;
    let types: Vec<&str> =
        r.body.as_array().expect("state").iter().filter_map(|e| e["type"].as_str()).collect();
    for t in [
        "m.room.create",
        "m.room.power_levels",
        "m.room.join_rules",
        "m.room.name",
        "m.room.topic",
        "m.room.canonical_alias",
    ] {
        assert!(types.contains(&t), "{t} missing from {types:?}");
    }
    anon.register("carol", "pw-carol").await;
    let carol_id = hs.user_id("carol");
    let r = bob
        .post(&format!("/_matrix/client/v3/rooms/{}/invite", enc(&room)), json!({"user_id": carol_id}))
        .await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);
    // State put: alice may, bob may not; a custom state event with a state key.
    let r = alice
        .put(&format!("/_matrix/client/v3/rooms/{}/state/org.example.thing/k1", enc(&room)), json!({"v": 1}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        bob.get(&format!("/_matrix/client/v3/rooms/{}/state/org.example.thing/k1", enc(&room))).await.body["v"],
        1
    );
    let r = bob
        .put(&format!("/_matrix/client/v3/rooms/{}/state/m.room.topic", enc(&room)), json!({"topic": "mine"}))
        .await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);
    let r = bob.get(&format!("/_matrix/client/v3/rooms/{}/state/org.example.none/", enc(&room))).await;
    assert_eq!((r.status, r.errcode()), (404, "M_NOT_FOUND"), "{:?}", r.body);

    // Kick, ban, unban, forget.
    let r = alice
        .post(
            &format!("/_matrix/client/v3/rooms/{}/kick", enc(&room)),
            json!({"user_id": bob_id, "reason": "out"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob.get("/_matrix/client/v3/joined_rooms").await;
    assert_eq!(r.body["joined_rooms"], json!([]), "{:?}", r.body);
    assert_eq!(bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);
    let r =
        alice.post(&format!("/_matrix/client/v3/rooms/{}/ban", enc(&room)), json!({"user_id": bob_id})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "a banned user joined: {:?}", r.body);
    let r = alice.get(&format!("/_matrix/client/v3/rooms/{}/members?membership=ban", enc(&room))).await;
    assert_eq!(r.body["chunk"].as_array().map(Vec::len), Some(1), "{:?}", r.body);
    let r = alice
        .post(&format!("/_matrix/client/v3/rooms/{}/unban", enc(&room)), json!({"user_id": bob_id}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob.post(&format!("/_matrix/client/v3/rooms/{}/forget", enc(&room)), json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = alice.post(&format!("/_matrix/client/v3/rooms/{}/forget", enc(&room)), json!({})).await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_STATE"), "forgetting a joined room: {:?}", r.body);
    assert_eq!(bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);

    // Aliases: add, list, delete by their creator only.
    let extra = format!("#other:{}", hs.server_name);
    assert_eq!(
        bob.put(&format!("/_matrix/client/v3/directory/room/{}", enc(&extra)), json!({"room_id": room}))
            .await
            .status,
        200
    );
    let r = alice.get(&format!("/_matrix/client/v3/rooms/{}/aliases", enc(&room))).await;
    assert_eq!(r.body["aliases"], json!([alias.clone(), extra.clone()]), "{:?}", r.body);
    let r = alice.raw("DELETE", &format!("/_matrix/client/v3/directory/room/{}", enc(&extra)), None).await;
    assert_eq!(r.status, 403, "{:?}", r.body);
    assert_eq!(
        bob.raw("DELETE", &format!("/_matrix/client/v3/directory/room/{}", enc(&extra)), None).await.status,
        200
    );
    let r = bob.get(&format!("/_matrix/client/v3/directory/room/{}", enc(&extra))).await;
    assert_eq!((r.status, r.errcode()), (404, "M_NOT_FOUND"));
    // Unpublish.
    assert_eq!(
        alice
            .put(
                &format!("/_matrix/client/v3/directory/list/room/{}", enc(&room)),
                json!({"visibility": "private"})
            )
            .await
            .status,
        200
    );
    let r = anon.get("/_matrix/client/v3/publicRooms").await;
    assert!(r.body["chunk"].as_array().is_some_and(|c| c.iter().all(|e| e["room_id"] != json!(room))));
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn filters_lazy_members_and_limited_timelines() {
    let Some((hs, proxy)) = start().await else { return };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let room =
        alice.post("/_matrix/client/v3/createRoom", json!({"preset": "public_chat"})).await.body["room_id"]
            .as_str()
            .expect("room")
            .to_owned();
    let mut members = Vec::new();
    for i in 0..4 {
        let c = anon.register(&format!("m{i}"), "pw-m").await;
        assert_eq!(c.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);
        members.push(c);
    }
    let mut sent = Vec::new();
    for n in 0..20 {
        let c = if n % 5 == 0 { &members[0] } else { &alice };
        let r = c
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t{n}", enc(&room)),
                json!({"msgtype": "m.text", "body": format!("{n}")}),
            )
            .await;
        sent.push(r.body["event_id"].as_str().expect("id").to_owned());
    }
    // A stored filter: 5 timeline events, lazy-loaded members.
    let alice_id = hs.user_id("alice");
    let r = alice
        .post(
            &format!("/_matrix/client/v3/user/{}/filter", enc(&alice_id)),
            json!({"room": {"timeline": {"limit": 5}, "state": {"lazy_load_members": true}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let filter_id = r.body["filter_id"].as_str().expect("filter_id").to_owned();
    assert_eq!(
        alice.get(&format!("/_matrix/client/v3/user/{}/filter/{filter_id}", enc(&alice_id))).await.body["room"]
            ["timeline"]["limit"],
        5
    );
    let r = alice.get(&format!("/_matrix/client/v3/sync?filter={filter_id}")).await;
    let joined = &r.body["rooms"]["join"][&room];
    let timeline = joined["timeline"]["events"].as_array().expect("timeline");
    assert_eq!(timeline.len(), 5);
    assert_eq!(joined["timeline"]["limited"], true);
    let last5: Vec<&str> = timeline.iter().filter_map(|e| e["event_id"].as_str()).collect();
    assert_eq!(last5, sent[15..].iter().map(String::as_str).collect::<Vec<_>>());
    // Lazy loading: only the timeline's senders (alice, m0) and the user herself.
    let member_keys: Vec<&str> = joined["state"]["events"]
        .as_array()
        .expect("state")
        .iter()
        .filter(|e| e["type"] == "m.room.member")
        .filter_map(|e| e["state_key"].as_str())
        .collect();
    let mut want = vec![alice_id.clone(), hs.user_id("m0")];
    want.sort();
    let mut got: Vec<String> = member_keys.iter().map(|s| s.to_string()).collect();
    got.sort();
    assert_eq!(got, want, "lazy-loaded members");
    // prev_batch continues where the timeline starts.
    let prev = joined["timeline"]["prev_batch"].as_str().expect("prev_batch");
    let r = alice
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&from={prev}&limit=15", enc(&room)))
        .await;
    let before: Vec<&str> =
        r.body["chunk"].as_array().expect("chunk").iter().filter_map(|e| e["event_id"].as_str()).collect();
    let mut want: Vec<&str> = sent[..15].iter().map(String::as_str).collect();
    want.reverse();
    assert_eq!(before, want);
    // A filter on types and senders for /messages.
    let f = enc(&json!({"types": ["m.room.message"], "senders": [hs.user_id("m0")]}).to_string());
    let r = alice
        .get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=30&filter={f}", enc(&room)))
        .await;
    let bodies: Vec<&str> = r.body["chunk"]
        .as_array()
        .expect("chunk")
        .iter()
        .filter_map(|e| e["content"]["body"].as_str())
        .collect();
    assert_eq!(bodies, vec!["15", "10", "5", "0"]);
    // full_state on an incremental sync gives the whole state again.
    let first = alice.get("/_matrix/client/v3/sync").await;
    let token = first.body["next_batch"].as_str().expect("next_batch");
    let r = alice.get(&format!("/_matrix/client/v3/sync?since={token}&full_state=true")).await;
    assert!(
        r.body["rooms"]["join"][&room]["state"]["events"].as_array().is_some_and(|s| s.len() >= 5),
        "{:?}",
        r.body
    );
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_refresh_login_tokens_logout_all_and_account_data() {
    let Some((hs, proxy)) = start().await else { return };
    let anon = Client::new(&proxy.url);
    anon.register("alice", "pw-alice").await;
    let alice_id = hs.user_id("alice");
    // Refresh tokens only for clients that ask; the refreshed pair replaces the old one.
    let mut body = login("alice", "pw-alice");
    body["refresh_token"] = json!(true);
    let r = anon.post("/_matrix/client/v3/login", body).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body["expires_in_ms"].as_u64().is_some());
    let refresh = r.body["refresh_token"].as_str().expect("refresh token").to_owned();
    let old = anon.with_token(r.body["access_token"].as_str().expect("token"));
    let r = anon.post("/_matrix/client/v3/refresh", json!({"refresh_token": refresh})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let fresh = anon.with_token(r.body["access_token"].as_str().expect("token"));
    assert_eq!(fresh.get("/_matrix/client/v3/account/whoami").await.status, 200);
    assert_eq!(old.get("/_matrix/client/v3/account/whoami").await.errcode(), "M_UNKNOWN_TOKEN");
    let r = anon.post("/_matrix/client/v3/refresh", json!({"refresh_token": refresh})).await;
    assert_eq!(
        (r.status, r.errcode()),
        (401, "M_UNKNOWN_TOKEN"),
        "a refresh token worked twice: {:?}",
        r.body
    );
    let plain = anon.post("/_matrix/client/v3/login", login("alice", "pw-alice")).await;
    assert!(plain.body.get("refresh_token").is_none());
    let plain = anon.with_token(plain.body["access_token"].as_str().expect("token"));

    // m.login.token: one use.
    let r = fresh.post("/_matrix/client/v1/login/get_token", json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let t = r.body["login_token"].as_str().expect("login_token").to_owned();
    let r = anon.post("/_matrix/client/v3/login", json!({"type": "m.login.token", "token": t})).await;
    assert_eq!(r.body["user_id"], json!(alice_id), "{:?}", r.body);
    let r = anon.post("/_matrix/client/v3/login", json!({"type": "m.login.token", "token": t})).await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);
    // Concurrent logins with one token: exactly one gets in.
    let r = fresh.post("/_matrix/client/v1/login/get_token", json!({})).await;
    let t = r.body["login_token"].as_str().expect("login_token").to_owned();
    let logins = (0..8).map(|_| {
        let (anon, t) = (anon.clone(), t.clone());
        tokio::spawn(async move {
            anon.post("/_matrix/client/v3/login", json!({"type": "m.login.token", "token": t})).await.status
        })
    });
    let statuses: Vec<u16> =
        futures::future::join_all(logins).await.into_iter().map(|r| r.expect("login")).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 403), "{statuses:?}");
    assert!(
        anon.get("/_matrix/client/v3/login").await.body["flows"].as_array().is_some_and(|f| f.len() == 2)
    );

    // Account data, global and per room, with the reserved types refused.
    let r = plain
        .put(
            &format!("/_matrix/client/v3/user/{}/account_data/org.example.prefs", enc(&alice_id)),
            json!({"dark": true}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        plain
            .get(&format!("/_matrix/client/v3/user/{}/account_data/org.example.prefs", enc(&alice_id)))
            .await
            .body["dark"],
        true
    );
    let r = plain
        .put(&format!("/_matrix/client/v3/user/{}/account_data/m.fully_read", enc(&alice_id)), json!({}))
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_JSON"), "{:?}", r.body);
    let r = plain.get("/_matrix/client/v3/sync").await;
    let types: Vec<&str> = r.body["account_data"]["events"]
        .as_array()
        .expect("account data")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(types.contains(&"org.example.prefs") && types.contains(&"m.push_rules"), "{types:?}");
    assert!(plain.get("/_matrix/client/v3/pushrules/").await.body["global"]["override"].is_array());
    let caps = plain.get("/_matrix/client/v3/capabilities").await;
    assert_eq!(caps.body["capabilities"]["m.room_versions"]["default"], "12", "{:?}", caps.body);

    // logout/all ends every session.
    assert_eq!(plain.post("/_matrix/client/v3/logout/all", json!({})).await.status, 200);
    for c in [&plain, &fresh] {
        assert_eq!(c.get("/_matrix/client/v3/account/whoami").await.errcode(), "M_UNKNOWN_TOKEN");
    }
    let wk = anon.get("/.well-known/matrix/client").await;
    assert!(wk.body["m.homeserver"]["base_url"].is_string(), "{:?}", wk.body);
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn history_visibility_hides_what_a_member_may_not_see() {
    let Some((_hs, proxy)) = start().await else { return };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    for (visibility, bob_sees_before_join) in
        [("joined", false), ("shared", true), ("invited", false), ("world_readable", true)]
    {
        let r = alice
            .post(
                "/_matrix/client/v3/createRoom",
                json!({"preset": "public_chat", "initial_state": [
                    {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": visibility}}]}),
            )
            .await;
        let room = r.body["room_id"].as_str().expect("room").to_owned();
        let send = async |txn: &str, body: &str| -> String {
            let r = alice
                .put(
                    &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room)),
                    json!({"msgtype": "m.text", "body": body}),
                )
                .await;
            r.body["event_id"].as_str().expect("id").to_owned()
        };
        let secret = send("s", "before bob").await;
        assert_eq!(bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);
        let hello = send("h", "after bob").await;

        let r = bob.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=50", enc(&room))).await;
        let ids: Vec<&str> = r.body["chunk"]
            .as_array()
            .expect("chunk")
            .iter()
            .filter_map(|e| e["event_id"].as_str())
            .collect();
        assert!(ids.contains(&hello.as_str()), "{visibility}: bob misses a message after his join");
        assert_eq!(ids.contains(&secret.as_str()), bob_sees_before_join, "{visibility}: /messages");
        let r = bob.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&secret))).await;
        assert_eq!(r.status == 200, bob_sees_before_join, "{visibility}: /event {:?}", r.body);
        let r = bob.get(&format!("/_matrix/client/v3/rooms/{}/context/{}", enc(&room), enc(&secret))).await;
        assert_eq!(r.status == 200, bob_sees_before_join, "{visibility}: /context {:?}", r.body);
        let f = enc(&json!({"room": {"rooms": [room], "timeline": {"limit": 50}}}).to_string());
        let r = bob.get(&format!("/_matrix/client/v3/sync?filter={f}")).await;
        let timeline: Vec<&str> = r.body["rooms"]["join"][&room]["timeline"]["events"]
            .as_array()
            .expect("timeline")
            .iter()
            .filter_map(|e| e["event_id"].as_str())
            .collect();
        assert!(timeline.contains(&hello.as_str()));
        assert_eq!(timeline.contains(&secret.as_str()), bob_sees_before_join, "{visibility}: sync timeline");
        // Alice, joined throughout, sees everything.
        let r = alice.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(&secret))).await;
        assert_eq!(r.status, 200);
    }
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn user_push_rules_change_notification_counts() {
    let Some((_hs, proxy)) = start().await else { return };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let room =
        alice.post("/_matrix/client/v3/createRoom", json!({"preset": "public_chat"})).await.body["room_id"]
            .as_str()
            .expect("room")
            .to_owned();
    assert_eq!(bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);
    // A content rule: "pizza" highlights.
    let r = bob
        .put(
            "/_matrix/client/v3/pushrules/global/content/pizza",
            json!({"pattern": "pizza", "actions": ["notify", {"set_tweak": "highlight"}]}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob.get("/_matrix/client/v3/pushrules/global/content/pizza").await;
    assert_eq!(r.body["pattern"], "pizza", "{:?}", r.body);
    assert_eq!(
        bob.get("/_matrix/client/v3/pushrules/global/content/pizza/enabled").await.body["enabled"],
        true
    );
    // Errors: unknown rules, reserved ids, unknown kinds.
    assert_eq!(bob.get("/_matrix/client/v3/pushrules/global/content/nope").await.errcode(), "M_NOT_FOUND");
    let r =
        bob.put("/_matrix/client/v3/pushrules/global/override/.m.rule.mine", json!({"actions": []})).await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let r = bob.put("/_matrix/client/v3/pushrules/global/sideways/x", json!({"actions": []})).await;
    assert_eq!(r.errcode(), "M_INVALID_PARAM", "{:?}", r.body);

    let send = async |txn: &str, body: &str| {
        let r = alice
            .put(
                &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room)),
                json!({"msgtype": "m.text", "body": body}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    };
    send("a", "pizza time").await;
    send("b", "salad time").await;
    let counts = async || {
        let r = bob.get("/_matrix/client/v3/sync").await;
        let n = r.body["rooms"]["join"][&room]["unread_notifications"].clone();
        (n["notification_count"].as_u64(), n["highlight_count"].as_u64())
    };
    assert_eq!(counts().await, (Some(2), Some(1)));
    // The master rule silences everything.
    let r = bob
        .put("/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled", json!({"enabled": true}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(counts().await, (Some(0), Some(0)));
    assert_eq!(
        bob.put(
            "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled",
            json!({"enabled": false})
        )
        .await
        .status,
        200
    );
    // Deleting the content rule removes the highlight.
    assert_eq!(
        bob.raw("DELETE", "/_matrix/client/v3/pushrules/global/content/pizza", None).await.status,
        200
    );
    assert_eq!(counts().await, (Some(2), Some(0)));
    // The rule set reaches the client as account data.
    let r = bob.get("/_matrix/client/v3/sync").await;
    let rules = r.body["account_data"]["events"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["type"] == "m.push_rules").cloned());
    assert!(rules.is_some_and(|r| r["content"]["global"]["override"].is_array()));
    proxy.assert_clean();
}

/// Sends a text message; its event id.
async fn say(c: &Client, room: &str, txn: &str, body: &str) -> String {
    let r = c
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(room)),
            json!({"msgtype": "m.text", "body": body}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["event_id"].as_str().expect("event_id").to_owned()
}

fn found(r: &Value) -> Vec<String> {
    r["search_categories"]["room_events"]["results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|x| x["result"]["content"]["body"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn search_finds_what_the_user_may_see() {
    let Some((_hs, proxy)) = start().await else { return };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let carol = anon.register("carol", "pw-carol").await;
    let create = |c: &Client, body: Value| {
        let c = c.clone();
        async move {
            let r = c.post("/_matrix/client/v3/createRoom", body).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.body["room_id"].as_str().expect("room").to_owned()
        }
    };
    let open = create(&alice, json!({"preset": "public_chat", "name": "Lunch planning"})).await;
    let private = create(&alice, json!({"preset": "private_chat"})).await;
    // A room whose history new members do not see.
    let joined_only = create(&alice, json!({"preset": "public_chat", "initial_state": [
        {"type": "m.room.history_visibility", "state_key": "", "content": {"history_visibility": "joined"}}]}))
    .await;
    say(&alice, &open, "o1", "Lunch at noon?").await;
    say(&alice, &open, "o2", "Dinner tonight").await;
    say(&alice, &open, "o3", "lunch LUNCH lunch, the Mensa").await;
    say(&alice, &private, "p1", "secret lunch plans").await;
    say(&alice, &joined_only, "j1", "lunch before bob joined").await;
    for room in [&open, &joined_only] {
        let r = bob.post(&format!("/_matrix/client/v3/join/{}", enc(room)), json!({})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    say(&alice, &joined_only, "j2", "lunch after bob joined").await;

    let search = |c: &Client, q: Value| {
        let c = c.clone();
        async move {
            let r =
                c.post("/_matrix/client/v3/search", json!({"search_categories": {"room_events": q}})).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.body
        }
    };
    // By default the room's name is searched too.
    let r = search(&bob, json!({"search_term": "lunch planning"})).await;
    assert_eq!(r["search_categories"]["room_events"]["results"][0]["result"]["type"], "m.room.name", "{r}");
    // Bob sees the open room's history and only what came after he joined the other; never the
    // private room. Rank order puts the message with most matches first.
    let r = search(&bob, json!({"search_term": "lunch", "keys": ["content.body"]})).await;
    let bodies = found(&r);
    assert_eq!(bodies.first().map(String::as_str), Some("lunch LUNCH lunch, the Mensa"), "{bodies:?}");
    let mut sorted = bodies.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["Lunch at noon?", "lunch LUNCH lunch, the Mensa", "lunch after bob joined"],
        "{r}"
    );
    assert_eq!(r["search_categories"]["room_events"]["highlights"], json!(["lunch"]));
    // Every word must occur; keys and rooms narrow the search; recent order is newest first.
    assert_eq!(found(&search(&bob, json!({"search_term": "lunch noon"})).await), vec!["Lunch at noon?"]);
    assert!(
        found(&search(&bob, json!({"search_term": "planning", "keys": ["content.body"]})).await).is_empty(),
        "the name is not a body"
    );
    let r = search(&bob, json!({"search_term": "planning", "keys": ["content.name"]})).await;
    assert_eq!(r["search_categories"]["room_events"]["results"][0]["result"]["type"], "m.room.name", "{r}");
    let r = search(&bob, json!({"search_term": "lunch", "keys": ["content.body"], "order_by": "recent", "filter": {"rooms": [open.clone()]}})).await;
    assert_eq!(found(&r), vec!["lunch LUNCH lunch, the Mensa", "Lunch at noon?"]);
    // Carol is in no room: nothing.
    assert!(found(&search(&carol, json!({"search_term": "lunch"})).await).is_empty());
    // Alice sees her private room too.
    assert_eq!(found(&search(&alice, json!({"search_term": "secret"})).await), vec!["secret lunch plans"]);

    // Pages: one result at a time, following next_batch, give every result once.
    let mut seen = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..10 {
        let path = match &next {
            Some(n) => format!("/_matrix/client/v3/search?next_batch={n}"),
            None => "/_matrix/client/v3/search".to_owned(),
        };
        let r = bob
            .post(&path, json!({"search_categories": {"room_events": {"search_term": "lunch", "keys": ["content.body"], "order_by": "recent", "filter": {"limit": 1}}}}))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        seen.extend(found(&r.body));
        next = r.body["search_categories"]["room_events"]["next_batch"].as_str().map(str::to_owned);
        if next.is_none() {
            break;
        }
    }
    assert_eq!(seen, vec!["lunch after bob joined", "lunch LUNCH lunch, the Mensa", "Lunch at noon?"]);

    // Context, profiles, state and groups.
    let r = search(
        &bob,
        json!({"search_term": "dinner", "event_context": {"before_limit": 1, "after_limit": 1, "include_profile": true},
               "include_state": true, "groupings": {"group_by": [{"key": "room_id"}]}}),
    )
    .await;
    let events = &r["search_categories"]["room_events"];
    let context = &events["results"][0]["context"];
    assert_eq!(context["events_before"][0]["content"]["body"], "Lunch at noon?", "{r}");
    assert_eq!(context["events_after"][0]["content"]["body"], "lunch LUNCH lunch, the Mensa", "{r}");
    assert!(context["profile_info"].as_object().is_some_and(|p| p.len() == 1), "{r}");
    assert!(
        events["state"][&open].as_array().is_some_and(|s| s.iter().any(|e| e["type"] == "m.room.create")),
        "{r}"
    );
    assert_eq!(events["groups"]["room_id"][&open]["results"].as_array().map(Vec::len), Some(1), "{r}");
    // Bad input gets Matrix errors.
    let r = bob
        .post(
            "/_matrix/client/v3/search",
            json!({"search_categories": {"room_events": {"search_term": "x", "keys": ["content.nope"]}}}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"), "{:?}", r.body);
    let r = bob.post("/_matrix/client/v3/search", json!({"search_categories": {"room_events": {}}})).await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_JSON"), "{:?}", r.body);
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn room_upgrade_moves_state_bans_aliases_and_members() {
    let Some((hs, proxy)) = start().await else { return };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    anon.register("carol", "pw-carol").await;
    let carol_id = hs.user_id("carol");
    let alias = format!("#town:{}", hs.server_name);
    let r = alice
        .post(
            "/_matrix/client/v3/createRoom",
            json!({"preset": "public_chat", "visibility": "public", "room_alias_name": "town", "name": "Town",
                   "topic": "the square", "room_version": "11"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let old = r.body["room_id"].as_str().expect("room").to_owned();
    let r = bob.post(&format!("/_matrix/client/v3/join/{}", enc(&old)), json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = alice
        .post(&format!("/_matrix/client/v3/rooms/{}/ban", enc(&old)), json!({"user_id": carol_id}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Bob (level 0) may not upgrade; unknown versions are refused.
    let upgrade = |c: &Client, v: &str| {
        let (c, path, v) =
            (c.clone(), format!("/_matrix/client/v3/rooms/{}/upgrade", enc(&old)), v.to_owned());
        async move { c.post(&path, json!({"new_version": v})).await }
    };
    let r = upgrade(&bob, "12").await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);
    let r = upgrade(&alice, "99").await;
    assert_eq!((r.status, r.errcode()), (400, "M_UNSUPPORTED_ROOM_VERSION"), "{:?}", r.body);

    let r = upgrade(&alice, "12").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let new = r.body["replacement_room"].as_str().expect("replacement_room").to_owned();
    assert_ne!(new, old);

    let state = |c: &Client, room: &str, kind: &str, key: &str| {
        let (c, path) =
            (c.clone(), format!("/_matrix/client/v3/rooms/{}/state/{kind}/{}", enc(room), enc(key)));
        async move { c.get(&path).await }
    };
    // The old room: tombstoned, quiet for ordinary members, its alias gone.
    let r = state(&bob, &old, "m.room.tombstone", "").await;
    assert_eq!(r.body["replacement_room"], json!(new), "{:?}", r.body);
    let r = bob
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t1", enc(&old)),
            json!({"msgtype": "m.text", "body": "hi"}),
        )
        .await;
    assert_eq!(
        (r.status, r.errcode()),
        (403, "M_FORBIDDEN"),
        "the old room is read-only for bob: {:?}",
        r.body
    );
    // The new room: version 12 with its predecessor, the copied state and bans, the alias.
    let r = state(&alice, &new, "m.room.create", "").await;
    assert_eq!(
        (r.body["room_version"].as_str(), r.body["predecessor"]["room_id"].as_str()),
        (Some("12"), Some(old.as_str())),
        "{:?}",
        r.body
    );
    assert_eq!(state(&alice, &new, "m.room.name", "").await.body["name"], "Town");
    assert_eq!(state(&alice, &new, "m.room.topic", "").await.body["topic"], "the square");
    assert_eq!(state(&alice, &new, "m.room.join_rules", "").await.body["join_rule"], "public");
    assert_eq!(state(&alice, &new, "m.room.member", &carol_id).await.body["membership"], "ban");
    let r = state(&alice, &new, "m.room.power_levels", "").await;
    assert!(r.body["users"].get(hs.user_id("alice")).is_none(), "v12 creators are not listed: {:?}", r.body);
    let r = anon.get(&format!("/_matrix/client/v3/directory/room/{}", enc(&alias))).await;
    assert_eq!(r.body["room_id"], json!(new), "the alias moved: {:?}", r.body);
    let r = anon.get("/_matrix/client/v3/publicRooms").await;
    let listed: Vec<&str> =
        r.body["chunk"].as_array().expect("chunk").iter().filter_map(|e| e["room_id"].as_str()).collect();
    assert!(listed.contains(&new.as_str()) && !listed.contains(&old.as_str()), "{listed:?}");
    // Bob follows the tombstone; carol stays out.
    let r = bob.post(&format!("/_matrix/client/v3/join/{}", enc(&new)), json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let carol = anon.with_token(
        anon.post("/_matrix/client/v3/login", login("carol", "pw-carol")).await.body["access_token"]
            .as_str()
            .expect("token"),
    );
    let r = carol.post(&format!("/_matrix/client/v3/join/{}", enc(&new)), json!({})).await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);
    proxy.assert_clean();
}
