//! End-to-end encryption keys through the client-server API, every response validated
//! against the spec: device keys uploaded and queried, device-list changes in `/sync` and
//! `/keys/changes`, one-time key counts, and one-time keys handed out exactly once under
//! concurrent claims (the rest get the fallback key), on the embedded backend and on
//! PostgreSQL.

use std::collections::{HashMap, HashSet};

use lattice_e2e::proxy::ValidatingProxy;
use lattice_e2e::{Backend, Client, Homeserver, Options};
use serde_json::{Value, json};

const KEYS: usize = 20;
const CLAIMS: usize = 50;
const ALG: &str = "signed_curve25519";

fn device_keys(user: &str, device: &str, n: u8) -> Value {
    json!({
        "user_id": user, "device_id": device,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {format!("curve25519:{device}"): format!("curve{n}"), format!("ed25519:{device}"): format!("ed{n}")},
        "signatures": {user: {format!("ed25519:{device}"): format!("sig{n}")}},
    })
}

fn otk(id: usize) -> Value {
    json!({"key": format!("otk-{id}"), "signatures": {"@x:y": {"ed25519:D": "s"}}})
}

async fn whoami(c: &Client) -> (String, String) {
    let r = c.get("/_matrix/client/v3/account/whoami").await;
    (
        r.body["user_id"].as_str().expect("user_id").to_owned(),
        r.body["device_id"].as_str().expect("device_id").to_owned(),
    )
}

async fn sync(c: &Client, since: Option<&str>) -> Value {
    let path = match since {
        Some(s) => format!("/_matrix/client/v3/sync?since={s}&timeout=0"),
        None => "/_matrix/client/v3/sync".to_owned(),
    };
    let r = c.get(&path).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

async fn keys_end_to_end(backend: Backend) {
    let Some(hs) = Homeserver::start(Options::new(backend)).await else { return };
    let proxy = ValidatingProxy::start(&hs.url).await;
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let (alice_id, alice_dev) = whoami(&alice).await;
    let r = alice.post("/_matrix/client/v3/createRoom", json!({"preset": "public_chat"})).await;
    let room = r.body["room_id"].as_str().expect("room_id").to_owned();
    let r = bob.post(&format!("/_matrix/client/v3/join/{}", lattice_e2e::enc(&room)), json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let bob_since = sync(&bob, None).await["next_batch"].as_str().expect("next_batch").to_owned();

    // Upload: device keys, 20 one-time keys and a fallback key.
    let one_time: serde_json::Map<String, Value> =
        (0..KEYS).map(|i| (format!("{ALG}:K{i:03}"), otk(i))).collect();
    let r = alice
        .post(
            "/_matrix/client/v3/keys/upload",
            json!({"device_keys": device_keys(&alice_id, &alice_dev, 1), "one_time_keys": one_time,
                   "fallback_keys": {format!("{ALG}:F1"): {"key": "fallback-1", "fallback": true, "signatures": {"@x:y": {"ed25519:D": "s"}}}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["one_time_key_counts"][ALG], KEYS, "{:?}", r.body);
    // Uploading the same keys again changes nothing; one id with other content is refused.
    let r = alice
        .post("/_matrix/client/v3/keys/upload", json!({"one_time_keys": {format!("{ALG}:K000"): otk(0)}}))
        .await;
    assert_eq!(r.body["one_time_key_counts"][ALG], KEYS, "{:?}", r.body);
    let r = alice
        .post("/_matrix/client/v3/keys/upload", json!({"one_time_keys": {format!("{ALG}:K000"): otk(999)}}))
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"), "{:?}", r.body);
    // Keys must be strings or signed key objects.
    let r = alice
        .post(
            "/_matrix/client/v3/keys/upload",
            json!({"one_time_keys": {format!("{ALG}:BAD"): {"key": "x"}}}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_JSON"), "{:?}", r.body);
    // A bad key in an upload stores nothing of it, the device keys included.
    let (bob_id, bob_dev) = whoami(&bob).await;
    let r = bob
        .post(
            "/_matrix/client/v3/keys/upload",
            json!({"device_keys": device_keys(&bob_id, &bob_dev, 3), "one_time_keys": {format!("{ALG}:X"): 5}}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_JSON"), "{:?}", r.body);
    let r = alice.post("/_matrix/client/v3/keys/query", json!({"device_keys": {bob_id.clone(): []}})).await;
    assert_eq!(r.body["device_keys"][&bob_id], json!({}), "{:?}", r.body);
    // Another user's device keys are refused.
    let r = bob
        .post("/_matrix/client/v3/keys/upload", json!({"device_keys": device_keys(&alice_id, &alice_dev, 2)}))
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"), "{:?}", r.body);

    // Bob sees the change in sync and in /keys/changes, and queries the keys.
    let body = sync(&bob, Some(&bob_since)).await;
    assert!(
        body["device_lists"]["changed"].as_array().is_some_and(|c| c.contains(&json!(alice_id))),
        "{body}"
    );
    let r = bob
        .get(&format!(
            "/_matrix/client/v3/keys/changes?from={bob_since}&to={}",
            body["next_batch"].as_str().expect("nb")
        ))
        .await;
    assert!(r.body["changed"].as_array().is_some_and(|c| c.contains(&json!(alice_id))), "{:?}", r.body);
    let r = bob.post("/_matrix/client/v3/keys/query", json!({"device_keys": {alice_id.clone(): []}})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body["device_keys"][&alice_id][&alice_dev]["keys"][format!("ed25519:{alice_dev}")],
        "ed1",
        "{:?}",
        r.body
    );
    let r = bob
        .post("/_matrix/client/v3/keys/query", json!({"device_keys": {"@carol:elsewhere.example": []}}))
        .await;
    assert!(r.body["failures"]["elsewhere.example"].is_object(), "{:?}", r.body);

    // 50 concurrent claims: each one-time key goes out once, the rest get the fallback key.
    let claims = (0..CLAIMS).map(|_| {
        let (bob, alice_id, alice_dev) = (bob.clone(), alice_id.clone(), alice_dev.clone());
        tokio::spawn(async move {
            let r = bob
                .post(
                    "/_matrix/client/v3/keys/claim",
                    json!({"one_time_keys": {alice_id.clone(): {alice_dev.clone(): ALG}}}),
                )
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            let got = r.body["one_time_keys"][&alice_id][&alice_dev].as_object().cloned().unwrap_or_default();
            assert_eq!(got.len(), 1, "one key per claim: {:?}", r.body);
            got.into_iter().next().expect("a key")
        })
    });
    let results: Vec<(String, Value)> =
        futures::future::join_all(claims).await.into_iter().map(|r| r.expect("claim")).collect();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    for (id, _) in &results {
        *by_id.entry(id.as_str()).or_default() += 1;
    }
    let one_time_ids: HashSet<&str> = by_id.keys().copied().filter(|id| *id != format!("{ALG}:F1")).collect();
    assert_eq!(one_time_ids.len(), KEYS, "every one-time key went out: {by_id:?}");
    assert!(one_time_ids.iter().all(|id| by_id[id] == 1), "no one-time key twice: {by_id:?}");
    assert_eq!(
        by_id.get(format!("{ALG}:F1").as_str()),
        Some(&(CLAIMS - KEYS)),
        "the rest got the fallback key: {by_id:?}"
    );
    for (id, key) in &results {
        if id.ends_with(":F1") {
            assert_eq!(key["key"], "fallback-1");
        } else {
            let n: usize = id.trim_start_matches(&format!("{ALG}:K")).parse().expect("id");
            assert_eq!(key, &otk(n), "the key that was uploaded under {id}");
        }
    }

    // Alice's sync: no one-time keys left, the fallback key used.
    let body = sync(&alice, None).await;
    assert_eq!(body["device_one_time_keys_count"][ALG], 0, "{body}");
    assert_eq!(body["device_unused_fallback_key_types"], json!([]), "{body}");
    let r = alice.post("/_matrix/client/v3/keys/upload", json!({"fallback_keys": {format!("{ALG}:F2"): {"key": "fallback-2", "fallback": true, "signatures": {"@x:y": {"ed25519:D": "s"}}}}})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let body = sync(&alice, None).await;
    assert_eq!(body["device_unused_fallback_key_types"], json!([ALG]), "{body}");

    // Cross-signing: the first master key needs no password, replacing it does; a
    // self-signing key the master key did not sign is refused.
    let master =
        |k: &str| json!({"user_id": alice_id, "usage": ["master"], "keys": {format!("ed25519:{k}"): k}});
    let r = alice
        .post("/_matrix/client/v3/keys/device_signing/upload", json!({"master_key": master("AAAA")}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = alice
        .post("/_matrix/client/v3/keys/device_signing/upload", json!({"master_key": master("BBBB")}))
        .await;
    assert_eq!(r.status, 401, "replacing needs auth: {:?}", r.body);
    let r = alice
        .post(
            "/_matrix/client/v3/keys/device_signing/upload",
            json!({"master_key": master("BBBB"), "auth": {"type": "m.login.password", "password": "pw-alice",
                   "identifier": {"type": "m.id.user", "user": alice_id}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ssk = json!({"user_id": alice_id, "usage": ["self_signing"], "keys": {"ed25519:CCCC": "CCCC"}});
    let r =
        alice.post("/_matrix/client/v3/keys/device_signing/upload", json!({"self_signing_key": ssk})).await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"), "{:?}", r.body);
    let r = bob.post("/_matrix/client/v3/keys/query", json!({"device_keys": {alice_id.clone(): []}})).await;
    assert_eq!(r.body["master_keys"][&alice_id]["keys"]["ed25519:BBBB"], "BBBB", "{:?}", r.body);
    assert!(r.body["user_signing_keys"].get(&alice_id).is_none(), "{:?}", r.body);

    // Bob leaves the only room he shares with alice: her device list tracking drops him.
    let since_leave = sync(&alice, None).await["next_batch"].as_str().expect("nb").to_owned();
    let r = bob.post(&format!("/_matrix/client/v3/rooms/{}/leave", lattice_e2e::enc(&room)), json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let body = sync(&alice, Some(&since_leave)).await;
    assert_eq!(body["device_lists"]["left"], json!([hs.user_id("bob")]), "{body}");
    let r = alice
        .get(&format!(
            "/_matrix/client/v3/keys/changes?from={since_leave}&to={}",
            body["next_batch"].as_str().expect("nb")
        ))
        .await;
    assert_eq!(r.body["left"], json!([hs.user_id("bob")]), "{:?}", r.body);
    let r = bob.post(&format!("/_matrix/client/v3/join/{}", lattice_e2e::enc(&room)), json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Logging out forgets the device's keys, and bob hears of it.
    let since = sync(&bob, None).await["next_batch"].as_str().expect("nb").to_owned();
    let r = alice.post("/_matrix/client/v3/logout", json!({})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob.post("/_matrix/client/v3/keys/query", json!({"device_keys": {alice_id.clone(): []}})).await;
    assert_eq!(r.body["device_keys"][&alice_id], json!({}), "{:?}", r.body);
    let body = sync(&bob, Some(&since)).await;
    assert!(
        body["device_lists"]["changed"].as_array().is_some_and(|c| c.contains(&json!(alice_id))),
        "{body}"
    );
    let r = bob
        .post(
            "/_matrix/client/v3/keys/claim",
            json!({"one_time_keys": {alice_id.clone(): {alice_dev.clone(): ALG}}}),
        )
        .await;
    assert_eq!(r.body["one_time_keys"], json!({}), "{:?}", r.body);
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_embedded() {
    keys_end_to_end(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_production() {
    keys_end_to_end(Backend::Production).await;
}

const QUEUE_CAP: usize = 130;

async fn to_device_end_to_end(backend: Backend) {
    let options = Options::new(backend).var("max_to_device_queue", &QUEUE_CAP.to_string());
    let Some(hs) = Homeserver::start(options).await else { return };
    let proxy = ValidatingProxy::start(&hs.url).await;
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let (alice_id, alice_dev) = whoami(&alice).await;
    let mut since = sync(&alice, None).await["next_batch"].as_str().expect("nb").to_owned();
    let send = |txn: String, device: String, n: usize| {
        let (bob, alice_id) = (bob.clone(), alice_id.clone());
        async move {
            bob.put(
                &format!("/_matrix/client/v3/sendToDevice/org.example.ping/{txn}"),
                json!({"messages": {alice_id: {device: {"n": n}}}}),
            )
            .await
        }
    };
    // In order, once each (a retried transaction adds nothing), wildcard included; a long
    // queue comes over several syncs without a gap.
    for n in 0..QUEUE_CAP - 1 {
        let r = send(format!("t{n}"), alice_dev.clone(), n).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let r = send("t0".into(), alice_dev.clone(), 0).await;
    assert_eq!(r.status, 200, "a retry is accepted: {:?}", r.body);
    let r = send("star".into(), "*".into(), QUEUE_CAP - 1).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // The queue is full now.
    let r = send("full".into(), alice_dev.clone(), 999).await;
    assert_eq!((r.status, r.errcode()), (429, "M_LIMIT_EXCEEDED"), "{:?}", r.body);
    assert!(r.body["retry_after_ms"].is_u64(), "{:?}", r.body);

    let mut got = Vec::new();
    let mut syncs = 0;
    while got.len() < QUEUE_CAP {
        syncs += 1;
        assert!(syncs < 10, "the queue never drained: {got:?}");
        let body = sync(&alice, Some(&since)).await;
        since = body["next_batch"].as_str().expect("nb").to_owned();
        for e in body["to_device"]["events"].as_array().expect("to_device events") {
            assert_eq!(
                (e["sender"].as_str(), e["type"].as_str()),
                (Some(hs.user_id("bob").as_str()), Some("org.example.ping"))
            );
            got.push(e["content"]["n"].as_u64().expect("n") as usize);
        }
    }
    assert!(syncs >= 2, "more than one sync's worth came in several syncs");
    assert_eq!(got, (0..QUEUE_CAP).collect::<Vec<_>>(), "in order, each once");
    // Acknowledged messages are gone: the next sync has none, and there is room again.
    let body = sync(&alice, Some(&since)).await;
    assert_eq!(body["to_device"]["events"], json!([]), "{body}");
    let r = send("again".into(), alice_dev.clone(), 1000).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob
        .put(
            "/_matrix/client/v3/sendToDevice/x/bad",
            json!({"messages": {alice_id.clone(): {alice_dev.clone(): "nope"}}}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_JSON"), "{:?}", r.body);
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn to_device_embedded() {
    to_device_end_to_end(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn to_device_production() {
    to_device_end_to_end(Backend::Production).await;
}

const RACE_CAP: usize = 8;

/// Concurrent `/sendToDevice` requests to one device meet its queue cap exactly (the
/// recipient's `User` object decides each one in turn), and concurrent repeats of one
/// transaction id queue it once.
async fn to_device_race(backend: Backend) {
    let options = Options::new(backend).var("max_to_device_queue", &RACE_CAP.to_string());
    let Some(hs) = Homeserver::start(options).await else { return };
    let anon = Client::new(&hs.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let carol = anon.register("carol", "pw-carol").await;
    let (alice_id, alice_dev) = whoami(&alice).await;
    let since = sync(&alice, None).await["next_batch"].as_str().expect("nb").to_owned();
    let send = |who: &Client, txn: String, n: usize| {
        let (who, alice_id, alice_dev) = (who.clone(), alice_id.clone(), alice_dev.clone());
        async move {
            let r = who
                .put(
                    &format!("/_matrix/client/v3/sendToDevice/org.example.race/{txn}"),
                    json!({"messages": {alice_id: {alice_dev: {"n": n}}}}),
                )
                .await;
            (n, r.status, r.errcode().to_owned())
        }
    };
    // Six copies of one of Carol's transactions, racing 3 × RACE_CAP distinct ones of Bob's.
    let mut racing = Vec::new();
    for _ in 0..6 {
        racing.push(tokio::spawn(send(&carol, "same".into(), 1000)));
    }
    for n in 0..3 * RACE_CAP {
        racing.push(tokio::spawn(send(&bob, format!("t{n}"), n)));
    }
    let mut accepted = Vec::new();
    let mut refused = 0;
    for task in racing {
        let (n, status, errcode) = task.await.expect("a sender task");
        match status {
            200 => accepted.push(n),
            429 => {
                assert_eq!(errcode, "M_LIMIT_EXCEEDED");
                refused += 1;
            }
            other => panic!("unexpected status {other} ({errcode}) for message {n}"),
        }
    }
    let body = sync(&alice, Some(&since)).await;
    let mut got: Vec<usize> = body["to_device"]["events"]
        .as_array()
        .expect("to_device events")
        .iter()
        .map(|e| e["content"]["n"].as_u64().expect("n") as usize)
        .collect();
    assert_eq!(got.len(), RACE_CAP, "the queue holds exactly the cap: {got:?}");
    let carol_copies = got.iter().filter(|n| **n == 1000).count();
    assert!(carol_copies <= 1, "carol's transaction was queued {carol_copies} times: {got:?}");
    // Every message in the queue was answered 200, and every 200 of Bob's is in the queue.
    got.sort_unstable();
    let mut bob_accepted: Vec<usize> = accepted.iter().copied().filter(|n| *n != 1000).collect();
    bob_accepted.sort_unstable();
    let bob_got: Vec<usize> = got.iter().copied().filter(|n| *n != 1000).collect();
    assert_eq!(bob_got, bob_accepted, "bob's accepted messages are exactly those queued");
    let carol_accepted = accepted.len() - bob_accepted.len();
    if carol_copies == 1 {
        // Once queued, every copy of the transaction is answered as accepted, full queue or not.
        assert_eq!(carol_accepted, 6, "every copy of carol's queued transaction is accepted");
    } else {
        assert_eq!(carol_accepted, 0, "carol's transaction was accepted but not queued");
    }
    assert!(refused >= 2 * RACE_CAP, "at least {} were refused: {refused}", 2 * RACE_CAP);
}

#[tokio::test(flavor = "multi_thread")]
async fn to_device_race_embedded() {
    to_device_race(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn to_device_race_production() {
    to_device_race(Backend::Production).await;
}

fn backup_data(verified: bool, index: u64, forwarded: u64, tag: &str) -> Value {
    json!({"first_message_index": index, "forwarded_count": forwarded, "is_verified": verified,
           "session_data": {"ephemeral": tag, "ciphertext": tag, "mac": tag}})
}

async fn key_backup_end_to_end(backend: Backend) {
    let Some(hs) = Homeserver::start(Options::new(backend)).await else { return };
    let proxy = ValidatingProxy::start(&hs.url).await;
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let algorithm = "m.megolm_backup.v1.curve25519-aes-sha2";
    let r = alice.get("/_matrix/client/v3/room_keys/version").await;
    assert_eq!((r.status, r.errcode()), (404, "M_NOT_FOUND"), "{:?}", r.body);
    let create = json!({"algorithm": algorithm, "auth_data": {"public_key": "pk1", "signatures": {}}});
    let r = alice.post("/_matrix/client/v3/room_keys/version", create.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let v1 = r.body["version"].as_str().expect("version").to_owned();
    let r = alice.post("/_matrix/client/v3/room_keys/version", create).await;
    let v2 = r.body["version"].as_str().expect("version").to_owned();
    assert_ne!(v1, v2);
    let r = alice.get("/_matrix/client/v3/room_keys/version").await;
    assert_eq!(
        (r.body["version"].as_str(), r.body["count"].as_u64()),
        (Some(v2.as_str()), Some(0)),
        "{:?}",
        r.body
    );
    let etag0 = r.body["etag"].as_str().expect("etag").to_owned();
    // Bob sees none of it.
    assert_eq!(bob.get("/_matrix/client/v3/room_keys/version").await.status, 404);

    // Keys at all three levels, into the current version only.
    let room = "!r:example.org";
    let put = |path: String, body: Value| {
        let alice = alice.clone();
        async move { alice.put(&path, body).await }
    };
    let r = put(format!("/_matrix/client/v3/room_keys/keys?version={v1}"), json!({"rooms": {}})).await;
    assert_eq!((r.status, r.errcode()), (403, "M_WRONG_ROOM_KEYS_VERSION"), "{:?}", r.body);
    assert_eq!(r.body["current_version"], json!(v2));
    let r = put(
        format!("/_matrix/client/v3/room_keys/keys?version={v2}"),
        json!({"rooms": {room: {"sessions": {"s1": backup_data(false, 5, 1, "a"), "s2": backup_data(false, 0, 0, "b")}}}}),
    )
    .await;
    assert_eq!((r.status, r.body["count"].as_u64()), (200, Some(2)), "{:?}", r.body);
    assert_ne!(r.body["etag"].as_str(), Some(etag0.as_str()), "the etag moved");
    let enc_room = lattice_e2e::enc(room);
    let r = put(
        format!("/_matrix/client/v3/room_keys/keys/{enc_room}?version={v2}"),
        json!({"sessions": {"s3": backup_data(true, 0, 0, "c")}}),
    )
    .await;
    assert_eq!(r.body["count"], 3, "{:?}", r.body);
    // A worse session does not replace a better one; a better one does.
    let r = put(
        format!("/_matrix/client/v3/room_keys/keys/{enc_room}/s2?version={v2}"),
        backup_data(false, 3, 0, "worse"),
    )
    .await;
    let etag_before = r.body["etag"].clone();
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = alice.get(&format!("/_matrix/client/v3/room_keys/keys/{enc_room}/s2?version={v2}")).await;
    assert_eq!(r.body["session_data"]["ciphertext"], "b", "kept the better session: {:?}", r.body);
    let r = put(
        format!("/_matrix/client/v3/room_keys/keys/{enc_room}/s1?version={v2}"),
        backup_data(true, 5, 1, "verified"),
    )
    .await;
    assert_ne!(r.body["etag"], etag_before, "{:?}", r.body);
    let r = alice.get(&format!("/_matrix/client/v3/room_keys/keys?version={v2}")).await;
    assert_eq!(
        r.body["rooms"][room]["sessions"]["s1"]["session_data"]["ciphertext"], "verified",
        "{:?}",
        r.body
    );
    assert_eq!(r.body["rooms"][room]["sessions"].as_object().map(serde_json::Map::len), Some(3));
    let r = put(
        format!("/_matrix/client/v3/room_keys/keys/{enc_room}/s9?version={v2}"),
        json!({"first_message_index": 0}),
    )
    .await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_JSON"), "{:?}", r.body);

    // Delete one, then the room, then the version.
    let r = alice
        .raw("DELETE", &format!("/_matrix/client/v3/room_keys/keys/{enc_room}/s1?version={v2}"), None)
        .await;
    assert_eq!(r.body["count"], 2, "{:?}", r.body);
    let r = alice
        .raw("DELETE", &format!("/_matrix/client/v3/room_keys/keys/{enc_room}?version={v2}"), None)
        .await;
    assert_eq!(r.body["count"], 0, "{:?}", r.body);
    let r = alice
        .put(
            &format!("/_matrix/client/v3/room_keys/version/{v2}"),
            json!({"algorithm": "other", "auth_data": {}}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"), "{:?}", r.body);
    let r = alice
        .put(
            &format!("/_matrix/client/v3/room_keys/version/{v2}"),
            json!({"algorithm": algorithm, "auth_data": {"public_key": "pk2"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        alice.get(&format!("/_matrix/client/v3/room_keys/version/{v2}")).await.body["auth_data"]["public_key"],
        "pk2"
    );
    let r = alice.raw("DELETE", &format!("/_matrix/client/v3/room_keys/version/{v2}"), None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = alice.get("/_matrix/client/v3/room_keys/version").await;
    assert_eq!(r.body["version"], json!(v1), "the older version is current again: {:?}", r.body);
    let r = alice
        .post("/_matrix/client/v3/room_keys/version", json!({"algorithm": algorithm, "auth_data": {}}))
        .await;
    let v3: u64 = r.body["version"].as_str().expect("version").parse().expect("number");
    assert!(v3 > v2.parse::<u64>().expect("number"), "a deleted version's number is not reused");
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn key_backup_embedded() {
    key_backup_end_to_end(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn key_backup_production() {
    key_backup_end_to_end(Backend::Production).await;
}

const MSC3814: &str = "/_matrix/client/unstable/org.matrix.msc3814.v1";

async fn dehydrated_end_to_end(backend: Backend) {
    let Some(hs) = Homeserver::start(Options::new(backend)).await else { return };
    let proxy = ValidatingProxy::start(&hs.url).await;
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let (alice_id, _) = whoami(&alice).await;
    let r = anon.get("/_matrix/client/versions").await;
    assert_eq!(r.body["unstable_features"]["org.matrix.msc3814"], true, "{:?}", r.body);
    let r = alice.get(&format!("{MSC3814}/dehydrated_device")).await;
    assert_eq!((r.status, r.errcode()), (404, "M_NOT_FOUND"), "{:?}", r.body);

    let put = |device: &str, data: &str| {
        let (alice, alice_id, device, data) =
            (alice.clone(), alice_id.clone(), device.to_owned(), data.to_owned());
        async move {
            let mut keys = device_keys(&alice_id, &device, 7);
            keys["dehydrated"] = json!(true);
            alice
                .put(
                    &format!("{MSC3814}/dehydrated_device"),
                    json!({"device_id": device, "initial_device_display_name": "dehydrated", "device_data": {"algorithm": "x", "data": data},
                           "device_keys": keys, "one_time_keys": {format!("{ALG}:D1"): otk(1)}}),
                )
                .await
        }
    };
    let r = put("DEHY1", "first").await;
    assert_eq!((r.status, r.body["device_id"].as_str()), (200, Some("DEHY1")), "{:?}", r.body);
    let r = alice.get(&format!("{MSC3814}/dehydrated_device")).await;
    assert_eq!(r.body["device_data"]["data"], "first", "{:?}", r.body);
    // Others see it as a device with keys, and can claim its one-time key.
    let r = bob
        .post("/_matrix/client/v3/keys/query", json!({"device_keys": {alice_id.clone(): ["DEHY1"]}}))
        .await;
    assert_eq!(r.body["device_keys"][&alice_id]["DEHY1"]["dehydrated"], true, "{:?}", r.body);
    let r = bob
        .post("/_matrix/client/v3/keys/claim", json!({"one_time_keys": {alice_id.clone(): {"DEHY1": ALG}}}))
        .await;
    assert!(r.body["one_time_keys"][&alice_id]["DEHY1"][format!("{ALG}:D1")].is_object(), "{:?}", r.body);

    // While alice is offline, bob sends to all her devices; the dehydrated one collects them.
    for n in 0..3 {
        let r = bob
            .put(
                &format!("/_matrix/client/v3/sendToDevice/m.room.encrypted/d{n}"),
                json!({"messages": {alice_id.clone(): {"*": {"n": n}}}}),
            )
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let events = |next: Option<String>| {
        let alice = alice.clone();
        async move {
            let body = match next {
                Some(n) => json!({"next_batch": n}),
                None => json!({}),
            };
            alice.post(&format!("{MSC3814}/dehydrated_device/DEHY1/events"), body).await
        }
    };
    let r = events(None).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let got: Vec<u64> = r.body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["content"]["n"].as_u64().expect("n"))
        .collect();
    assert_eq!(got, vec![0, 1, 2], "{:?}", r.body);
    let next = r.body["next_batch"].as_str().expect("next_batch").to_owned();
    let r = events(Some(next.clone())).await;
    assert_eq!(r.body["events"], json!([]), "acknowledged messages are gone: {:?}", r.body);
    let r = alice.post(&format!("{MSC3814}/dehydrated_device/NOTMINE/events"), json!({})).await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);

    // A new dehydrated device replaces the old one, which disappears with its keys.
    let r = put("DEHY2", "second").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob.post("/_matrix/client/v3/keys/query", json!({"device_keys": {alice_id.clone(): []}})).await;
    let devices = r.body["device_keys"][&alice_id].as_object().cloned().unwrap_or_default();
    assert!(devices.contains_key("DEHY2") && !devices.contains_key("DEHY1"), "{:?}", r.body);
    let r = alice.raw("DELETE", &format!("{MSC3814}/dehydrated_device"), None).await;
    assert_eq!(r.body["device_id"], "DEHY2", "{:?}", r.body);
    assert_eq!(alice.get(&format!("{MSC3814}/dehydrated_device")).await.status, 404);
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn dehydrated_device_embedded() {
    dehydrated_end_to_end(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dehydrated_device_production() {
    dehydrated_end_to_end(Backend::Production).await;
}
