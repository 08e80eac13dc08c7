//! The client-server API beyond the real clients' flows: bad input gets the right Matrix error
//! and changes nothing; idempotent sends; redaction; registration modes; rate limits; and sync
//! positions that never skip an event while many rooms commit at once. Every response passes
//! through the validating proxy.

use std::collections::{HashMap, HashSet};

use lattice_e2e::proxy::ValidatingProxy;
use lattice_e2e::{Backend, Client, Homeserver, Options, enc};
use serde_json::{Value, json};

async fn start(options: Options) -> Option<(Homeserver, ValidatingProxy)> {
    let hs = Homeserver::start(options).await?;
    let proxy = ValidatingProxy::start(&hs.url).await;
    Some((hs, proxy))
}

async fn create_room(c: &Client, body: Value) -> String {
    let r = c.post("/_matrix/client/v3/createRoom", body).await;
    assert_eq!(r.status, 200, "createRoom: {:?}", r.body);
    r.body["room_id"].as_str().expect("room_id").to_owned()
}

async fn messages(c: &Client, room: &str) -> Vec<Value> {
    let r = c.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=b&limit=1000", enc(room))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["chunk"].as_array().cloned().unwrap_or_default()
}

async fn bad_input_gets_matrix_errors_and_changes_nothing(backend: Backend) {
    let Some((hs, proxy)) = start(Options::new(backend).var("max_json_body_bytes", "65536")).await else {
        return;
    };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "correct horse").await;
    let room = create_room(&alice, json!({"name": "bad input"})).await;
    let before = messages(&alice, &room).await.len();
    let send = |txn: &str| format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room));

    // Not JSON, wrong shapes, wrong types.
    let r = alice.raw("PUT", &send("t1"), Some(b"{not json".to_vec())).await;
    assert_eq!((r.status, r.errcode()), (400, "M_NOT_JSON"), "{:?}", r.body);
    let r = alice.raw("PUT", &send("t2"), Some(b"[1, 2]".to_vec())).await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_JSON"), "{:?}", r.body);
    let r = anon.raw("POST", "/_matrix/client/v3/login", Some(b"\xff\xfe".to_vec())).await;
    assert_eq!((r.status, r.errcode()), (400, "M_NOT_JSON"), "{:?}", r.body);
    let r = anon.post("/_matrix/client/v3/login", json!({"type": 5})).await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_JSON"), "{:?}", r.body);
    let r = alice.post("/_matrix/client/v3/createRoom", json!({"invite": "not-a-list"})).await;
    assert_eq!((r.status, r.errcode()), (400, "M_BAD_JSON"), "{:?}", r.body);
    let r = alice.post("/_matrix/client/v3/createRoom", json!({"room_version": "1"})).await;
    assert_eq!((r.status, r.errcode()), (400, "M_UNSUPPORTED_ROOM_VERSION"), "{:?}", r.body);
    let r = alice.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=x", enc(&room))).await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"), "{:?}", r.body);
    let r = alice.get("/_matrix/client/v3/sync?since=garbage").await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"), "{:?}", r.body);

    // Oversized: the body limit, and an event over the 64 KiB PDU limit inside it.
    let big = json!({"msgtype": "m.text", "body": "x".repeat(70_000)}).to_string().into_bytes();
    let r = alice.raw("PUT", &send("t3"), Some(big)).await;
    assert_eq!((r.status, r.errcode()), (413, "M_TOO_LARGE"), "{:?}", r.body);
    // Under the 65,536-byte body limit, but over the PDU limit once signed and hashed.
    let pdu_big = json!({"msgtype": "m.text", "body": "x".repeat(65_300)});
    let r = alice.put(&send("t4"), pdu_big).await;
    assert_eq!((r.status, r.errcode()), (413, "M_TOO_LARGE"), "{:?}", r.body);

    // Unknown endpoints and methods.
    for (m, p) in [
        ("GET", "/_matrix/client/v3/no_such_endpoint"),
        ("GET", "/_matrix/client/unstable/org.example.nothing"),
        ("DELETE", "/_matrix/client/v3/createRoom"),
        ("GET", "/_matrix/nothing"),
    ] {
        let r = alice.raw(m, p, None).await;
        assert_eq!(r.errcode(), "M_UNRECOGNIZED", "{m} {p}: {:?}", r.body);
        assert!(r.status == 404 || r.status == 405, "{m} {p}: {}", r.status);
    }

    // Missing and bad tokens.
    let r = anon.get("/_matrix/client/v3/account/whoami").await;
    assert_eq!((r.status, r.errcode()), (401, "M_MISSING_TOKEN"), "{:?}", r.body);
    let r = anon.with_token("nonsense").get("/_matrix/client/v3/account/whoami").await;
    assert_eq!((r.status, r.errcode()), (401, "M_UNKNOWN_TOKEN"), "{:?}", r.body);
    assert_eq!(r.body["soft_logout"], false);
    let r = anon.with_token("nonsense").put(&send("t5"), json!({"msgtype": "m.text", "body": "x"})).await;
    assert_eq!((r.status, r.errcode()), (401, "M_UNKNOWN_TOKEN"), "{:?}", r.body);

    // Someone else's room, and someone else's account data.
    let bob = anon.register("bob", "battery staple").await;
    let r = bob.put(&send("t6"), json!({"msgtype": "m.text", "body": "intruder"})).await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);
    let r = bob.get(&format!("/_matrix/client/v3/user/{}/account_data/x.y", enc(&hs.user_id("alice")))).await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);
    // Bad user names, taken user names.
    let r = anon
        .post(
            "/_matrix/client/v3/register",
            json!({"username": "Bad Name!", "password": "p", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_USERNAME"), "{:?}", r.body);
    let r = anon
        .post(
            "/_matrix/client/v3/register",
            json!({"username": "alice", "password": "p", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_USER_IN_USE"), "{:?}", r.body);
    let r = anon.post("/_matrix/client/v3/login", json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "wrong"})).await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);

    // Nothing of that reached the room, and alice's password still works.
    assert_eq!(messages(&alice, &room).await.len(), before, "a refused request changed the room");
    let r = anon.post("/_matrix/client/v3/login", json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "correct horse"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(proxy.validated() > 20);
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_embedded() {
    bad_input_gets_matrix_errors_and_changes_nothing(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_production() {
    bad_input_gets_matrix_errors_and_changes_nothing(Backend::Production).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sends_are_idempotent_and_redaction_strips_content() {
    let Some((hs, proxy)) = start(Options::new(Backend::Embedded)).await else { return };
    let alice = Client::new(&proxy.url).register("alice", "pw-alice").await;
    let room = create_room(&alice, json!({})).await;
    let path = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/same-txn", enc(&room));
    let a = alice.put(&path, json!({"msgtype": "m.text", "body": "once"})).await;
    let b = alice.put(&path, json!({"msgtype": "m.text", "body": "once"})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["event_id"], b.body["event_id"], "a retried transaction made a second event");
    let chunk = messages(&alice, &room).await;
    assert_eq!(chunk.iter().filter(|e| e["content"]["body"] == "once").count(), 1);
    // The sender's own device sees its transaction id.
    let mine = chunk.iter().find(|e| e["content"]["body"] == "once").expect("the message");
    assert_eq!(mine["unsigned"]["transaction_id"], "same-txn");

    // Many transactions (the room keeps a device's ids in several buckets), each retried after
    // all of them: every retry answers its first event, and none adds one.
    let mut first = Vec::new();
    for n in 0..40 {
        let p = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t{n}", enc(&room));
        let r = alice.put(&p, json!({"msgtype": "m.text", "body": format!("m{n}")})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        first.push(r.body["event_id"].clone());
    }
    for (n, id) in first.iter().enumerate() {
        let p = format!("/_matrix/client/v3/rooms/{}/send/m.room.message/t{n}", enc(&room));
        let r = alice.put(&p, json!({"msgtype": "m.text", "body": format!("m{n}")})).await;
        assert_eq!((r.status, &r.body["event_id"]), (200, id), "retry of t{n}");
    }
    let chunk = messages(&alice, &room).await;
    for n in 0..40 {
        let body = format!("m{n}");
        assert_eq!(chunk.iter().filter(|e| e["content"]["body"] == body.as_str()).count(), 1, "{body}");
    }
    // A room this server does not have: 404, for a send and for a join.
    let nowhere = format!("!nowhere:{}", hs.server_name);
    let r = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/x1", enc(&nowhere)),
            json!({"body": "x"}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (404, "M_NOT_FOUND"), "{:?}", r.body);
    let r = alice.post(&format!("/_matrix/client/v3/rooms/{}/join", enc(&nowhere)), json!({})).await;
    assert_eq!((r.status, r.errcode()), (404, "M_NOT_FOUND"), "{:?}", r.body);

    let id = a.body["event_id"].as_str().expect("event id");
    let r = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{}/redact/{}/r1", enc(&room), enc(id)),
            json!({"reason": "oops"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ev = alice.get(&format!("/_matrix/client/v3/rooms/{}/event/{}", enc(&room), enc(id))).await;
    assert_eq!(ev.status, 200, "{:?}", ev.body);
    assert_eq!(ev.body["content"], json!({}), "redacted content is gone");
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn registration_modes_and_rate_limits() {
    // Disabled (the default): refused.
    let Some((_hs, proxy)) = start(Options::new(Backend::Embedded).var("registration", "disabled")).await
    else {
        return;
    };
    let r = Client::new(&proxy.url)
        .post(
            "/_matrix/client/v3/register",
            json!({"username": "x", "password": "p", "auth": {"type": "m.login.dummy"}}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);
    proxy.assert_clean();

    // Token: the UIA flow names the token stage; a bad token is refused; an admin-made
    // single-use token works once.
    let Some((hs, proxy)) =
        start(Options::new(Backend::Embedded).var("registration", "token").var("login_per_minute", "3"))
            .await
    else {
        return;
    };
    let anon = Client::new(&proxy.url);
    let r = anon.post("/_matrix/client/v3/register", json!({"username": "carol", "password": "p"})).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(r.body["flows"][0]["stages"], json!(["m.login.registration_token"]));
    let session = r.body["session"].as_str().expect("session").to_owned();
    let with_token = |t: &str| json!({"username": "carol", "password": "p", "auth": {"type": "m.login.registration_token", "token": t, "session": session}});
    let r = anon.post("/_matrix/client/v3/register", with_token("nope")).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    let admin = Client::new(&hs.url).with_token(&hs.admin_token());
    let t = admin.post("/_lattice/admin/v1/registration_tokens", json!({"uses_allowed": 1})).await;
    assert_eq!(t.status, 200, "{:?}", t.body);
    let token = t.body["token"].as_str().expect("token");
    let r = anon
        .get(&format!("/_matrix/client/v1/register/m.login.registration_token/validity?token={token}"))
        .await;
    assert_eq!(r.body["valid"], true, "{:?}", r.body);
    let r = anon.post("/_matrix/client/v3/register", with_token(token)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let again = json!({"username": "dave", "password": "p", "auth": {"type": "m.login.registration_token", "token": token}});
    let r = anon.post("/_matrix/client/v3/register", again).await;
    assert_eq!(r.status, 401, "a single-use token worked twice: {:?}", r.body);
    // The admin API refuses a missing or wrong token.
    assert_eq!(Client::new(&hs.url).post("/_lattice/admin/v1/users", json!({})).await.status, 401);
    assert_eq!(
        Client::new(&hs.url).with_token("x").post("/_lattice/admin/v1/users", json!({})).await.status,
        403
    );

    // Login attempts per user per minute: the fourth is refused with retry_after_ms.
    let wrong = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "carol"}, "password": "wrong"});
    for _ in 0..3 {
        assert_eq!(anon.post("/_matrix/client/v3/login", wrong.clone()).await.status, 403);
    }
    let r = anon.post("/_matrix/client/v3/login", wrong).await;
    assert_eq!((r.status, r.errcode()), (429, "M_LIMIT_EXCEEDED"), "{:?}", r.body);
    assert!(r.body["retry_after_ms"].as_u64().is_some_and(|ms| ms <= 60_000));
    proxy.assert_clean();
}

/// Many rooms commit at once while a client syncs incrementally: every event arrives exactly
/// once, none skipped by a since token taken while another room's commit was in flight.
async fn sync_never_skips(backend: Backend) {
    const ROOMS: usize = 12;
    const PER_ROOM: usize = 15;
    let Some((_hs, proxy)) = start(Options::new(backend)).await else { return };
    let anon = Client::new(&proxy.url);
    let reader = anon.register("reader", "pw-reader").await;
    let mut rooms = Vec::new();
    let mut writers = Vec::new();
    for i in 0..ROOMS {
        let w = anon.register(&format!("writer{i}"), "pw-writer").await;
        let room = create_room(&w, json!({"preset": "public_chat"})).await;
        let r = reader.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        rooms.push(room);
        writers.push(w);
    }
    let filter = enc(&json!({"room": {"timeline": {"limit": 500}}}).to_string());
    let first = reader.get(&format!("/_matrix/client/v3/sync?filter={filter}")).await;
    let mut since = first.body["next_batch"].as_str().expect("next_batch").to_owned();

    let senders = writers.iter().zip(&rooms).map(|(w, room)| {
        let w = w.clone();
        let room = room.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..PER_ROOM {
                let r = w
                    .put(
                        &format!("/_matrix/client/v3/rooms/{}/send/m.room.message/m{n}", enc(&room)),
                        json!({"msgtype": "m.text", "body": format!("{n}")}),
                    )
                    .await;
                assert_eq!(r.status, 200, "{:?}", r.body);
                ids.push(r.body["event_id"].as_str().expect("id").to_owned());
            }
            ids
        })
    });
    let mut sent = Some(tokio::spawn(futures::future::join_all(senders)));
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut order: HashMap<String, Vec<String>> = HashMap::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    let mut expected: Option<HashSet<String>> = None;
    // Sync while the senders run, then until everything they sent has arrived.
    loop {
        if let Some(task) = sent.take_if(|t| t.is_finished()) {
            let all = task.await.expect("senders");
            expected = Some(all.into_iter().flat_map(|r| r.expect("sender task")).collect());
        }
        if expected.as_ref().is_some_and(|e| e.iter().all(|id| seen.contains_key(id))) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "events never arrived: {} seen", seen.len());
        let r =
            reader.get(&format!("/_matrix/client/v3/sync?since={since}&timeout=1000&filter={filter}")).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        for (room, data) in r.body["rooms"]["join"].as_object().cloned().unwrap_or_default() {
            assert_eq!(data["timeline"]["limited"], false, "the timeline limit is large enough");
            for e in data["timeline"]["events"].as_array().cloned().unwrap_or_default() {
                if e["type"] == "m.room.message" {
                    *seen.entry(e["event_id"].as_str().expect("id").to_owned()).or_default() += 1;
                    let body = e["content"]["body"].as_str().unwrap_or_default().to_owned();
                    order.entry(room.clone()).or_default().push(body);
                }
            }
        }
        since = r.body["next_batch"].as_str().expect("next_batch").to_owned();
    }
    let expected = expected.expect("senders finished");
    assert_eq!(expected.len(), ROOMS * PER_ROOM);
    for id in &expected {
        assert_eq!(seen.get(id), Some(&1), "{id} was delivered {:?} times", seen.get(id));
    }
    // Per room, in the order each sender sent them.
    for (room, bodies) in order {
        let want: Vec<String> = (0..PER_ROOM).map(|n| n.to_string()).collect();
        assert_eq!(bodies, want, "room {room}");
    }
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_never_skips_embedded() {
    sync_never_skips(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_never_skips_production() {
    sync_never_skips(Backend::Production).await;
}

async fn sync_once(c: &Client, since: &str) -> Value {
    let q = if since.is_empty() { String::new() } else { format!("?since={since}&timeout=5000") };
    let r = c.get(&format!("/_matrix/client/v3/sync{q}")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body
}

/// Syncs until `pred` holds for the response; returns it.
async fn sync_until(c: &Client, since: &mut String, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let body = sync_once(c, since).await;
        *since = body["next_batch"].as_str().expect("next_batch").to_owned();
        if pred(&body) {
            return body;
        }
        assert!(std::time::Instant::now() < deadline, "never saw {what}");
    }
}

/// A server with alice and bob, in a public room alice made.
struct Pair {
    hs: Homeserver,
    proxy: ValidatingProxy,
    anon: Client,
    alice: Client,
    bob: Client,
    room: String,
}

async fn alice_and_bob(backend: Backend) -> Option<Pair> {
    let (hs, proxy) = start(Options::new(backend)).await?;
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let room = create_room(&alice, json!({"preset": "public_chat"})).await;
    assert_eq!(bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);
    Some(Pair { hs, proxy, anon, alice, bob, room })
}

/// The number of requests parked at `hs`, from its metrics.
async fn parked(hs: &Homeserver) -> u64 {
    let text =
        reqwest::get(format!("{}/metrics", hs.admin_url)).await.expect("metrics").text().await.expect("text");
    text.lines()
        .find_map(|l| l.strip_prefix("lattice_parked_requests ").and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// A woken `/sync` takes its session, its stored filter and the rooms to read ahead from what
/// it parked with, and checks the token in the same read as its data:
/// - a stored filter still applies on the re-run (a filtered-out event parks it again);
/// - joining a room while parked (other rooms than the note's) still brings that room;
/// - a good token gets the event that woke it; one logged out while parked gets
///   `M_UNKNOWN_TOKEN` and none of it.
async fn woken_sync_keeps_what_it_parked_with(backend: Backend) {
    let Some(Pair { hs, proxy, anon, alice, bob, room }) = alice_and_bob(backend).await else {
        return;
    };
    let bob_id = hs.user_id("bob");
    let other = create_room(&alice, json!({"preset": "public_chat"})).await;
    let r = bob
        .post(
            &format!("/_matrix/client/v3/user/{}/filter", enc(&bob_id)),
            json!({"room": {"timeline": {"not_types": ["m.room.message"]}}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let filter_id = r.body["filter_id"].as_str().expect("filter_id").to_owned();
    // Starts a long poll and waits until it is parked; the task answers with its response.
    #[expect(clippy::async_yields_async, reason = "the poll is awaited after what should wake it")]
    let long_poll = async |query: String| -> tokio::task::JoinHandle<lattice_e2e::Response> {
        let since = sync_once(&bob, "").await["next_batch"].as_str().expect("next_batch").to_owned();
        let poll = {
            let bob = bob.clone();
            let url = format!("/_matrix/client/v3/sync?since={since}&timeout=20000{query}");
            tokio::spawn(async move { bob.get(&url).await })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while parked(&hs).await == 0 {
            assert!(std::time::Instant::now() < deadline, "the long poll never parked");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        poll
    };
    let send = async |kind: &str, n: &str| {
        let body = json!({"msgtype": "m.text", "body": format!("wake {n}")});
        let r = alice.put(&format!("/_matrix/client/v3/rooms/{}/send/{kind}/w{n}", enc(&room)), body).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    };
    let timeline = |r: &lattice_e2e::Response, room: &str| {
        r.body["rooms"]["join"][room]["timeline"]["events"].to_string()
    };

    // The stored filter: the message does not count, so the woken sync parks again; the next
    // event of another type ends it.
    let poll = long_poll(format!("&filter={filter_id}")).await;
    send("m.room.message", "filtered").await;
    send("org.lattice.test.ping", "ping").await;
    let r = poll.await.expect("poll task");
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(timeline(&r, &room).contains("wake ping"), "{:?}", r.body);
    assert!(!timeline(&r, &room).contains("wake filtered"), "{:?}", r.body);

    // Joining another room while parked: the re-run reads for the rooms the user is in now.
    let poll = long_poll(String::new()).await;
    let login = json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "bob"}, "password": "pw-bob"});
    let r = anon.post("/_matrix/client/v3/login", login).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let bob_again = anon.with_token(r.body["access_token"].as_str().expect("access_token"));
    assert_eq!(
        bob_again.post(&format!("/_matrix/client/v3/join/{}", enc(&other)), json!({})).await.status,
        200
    );
    let r = poll.await.expect("poll task");
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(timeline(&r, &other).contains("m.room.member"), "the joined room: {:?}", r.body);

    for (n, log_out) in [("1", false), ("2", true)] {
        let poll = long_poll(String::new()).await;
        if log_out {
            assert_eq!(bob.post("/_matrix/client/v3/logout", json!({})).await.status, 200);
        }
        send("m.room.message", n).await;
        let r = poll.await.expect("poll task");
        if log_out {
            assert_eq!(
                (r.status, r.body["errcode"].as_str()),
                (401, Some("M_UNKNOWN_TOKEN")),
                "{:?}",
                r.body
            );
            assert!(!r.body.to_string().contains("wake 2"), "{:?}", r.body);
        } else {
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert!(timeline(&r, &room).contains("wake 1"), "{:?}", r.body);
        }
    }
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn woken_sync_keeps_what_it_parked_with_embedded() {
    woken_sync_keeps_what_it_parked_with(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn woken_sync_keeps_what_it_parked_with_production() {
    woken_sync_keeps_what_it_parked_with(Backend::Production).await;
}

/// Unread counts kept by one sync and continued by the next stay equal to a count from
/// scratch: after more events, after a read receipt moves the start, and after the push rules
/// change (the kept counts were made under other rules).
async fn unread_counts_continue_across_syncs(backend: Backend) {
    let Some(Pair { hs, proxy, anon: _, alice, bob, room }) = alice_and_bob(backend).await else {
        return;
    };
    let bob_id = hs.user_id("bob");
    let mut since = sync_once(&bob, "").await["next_batch"].as_str().expect("next_batch").to_owned();
    let mut sent = Vec::new();
    let send = async |n: usize, mention: bool| {
        let mut content = json!({"msgtype": "m.text", "body": format!("message {n}")});
        if mention {
            content["m.mentions"] = json!({"user_ids": [bob_id]});
        }
        let r = alice
            .put(&format!("/_matrix/client/v3/rooms/{}/send/m.room.message/u{n}", enc(&room)), content)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["event_id"].as_str().expect("event id").to_owned()
    };
    let counts = |b: &Value| {
        let n = &b["rooms"]["join"][&room]["unread_notifications"];
        (n["notification_count"].as_u64(), n["highlight_count"].as_u64())
    };
    // What an initial sync says.
    let initial = async || counts(&sync_once(&bob, "").await);
    let expect = async |since: &mut String, want: (u64, u64), what: &str| {
        let want = (Some(want.0), Some(want.1));
        sync_until(&bob, since, what, |b| counts(b) == want).await;
        assert_eq!(initial().await, want, "{what}: an initial sync agrees");
    };

    // 20 events (more than a sync keeps counts after), the 5th mentioning bob.
    for n in 0..20 {
        sent.push(send(n, n == 4).await);
    }
    expect(&mut since, (20, 1), "20 unread").await;
    // Three more: the next sync counts only them on top of the kept counts.
    for n in 20..23 {
        sent.push(send(n, n == 21).await);
    }
    expect(&mut since, (23, 2), "23 unread").await;
    // A read receipt on the 10th event: counting starts after it.
    let r = bob
        .post(&format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&sent[9])), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    expect(&mut since, (13, 1), "13 unread after the receipt").await;
    for n in 23..43 {
        sent.push(send(n, false).await);
    }
    expect(&mut since, (33, 1), "33 unread").await;
    // The master rule silences everything, kept counts included.
    let master = "/_matrix/client/v3/pushrules/global/override/.m.rule.master/enabled";
    assert_eq!(bob.put(master, json!({"enabled": true})).await.status, 200);
    sent.push(send(43, false).await);
    expect(&mut since, (0, 0), "silenced").await;
    assert_eq!(bob.put(master, json!({"enabled": false})).await.status, 200);
    sent.push(send(44, true).await);
    expect(&mut since, (35, 2), "35 unread once the rules are back").await;
    // A rule on the member count: nothing notifies in a room of two (alice and bob).
    let r = bob
        .put(
            "/_matrix/client/v3/pushrules/global/override/two",
            json!({"conditions": [{"kind": "room_member_count", "is": "2"}], "actions": []}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    sent.push(send(45, false).await);
    expect(&mut since, (0, 0), "a room of two members is silenced").await;
    // In more rooms than get their read markers with the timelines, the counts are read later
    // in the sync, and come out the same.
    assert_eq!(bob.raw("DELETE", "/_matrix/client/v3/pushrules/global/override/two", None).await.status, 200);
    for _ in 0..8 {
        let other = create_room(&alice, json!({"preset": "public_chat"})).await;
        assert_eq!(
            bob.post(&format!("/_matrix/client/v3/join/{}", enc(&other)), json!({})).await.status,
            200
        );
    }
    sent.push(send(46, false).await);
    expect(&mut since, (37, 2), "37 unread, bob in nine rooms").await;
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn unread_counts_continue_across_syncs_embedded() {
    unread_counts_continue_across_syncs(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unread_counts_continue_across_syncs_production() {
    unread_counts_continue_across_syncs(Backend::Production).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn typing_receipts_presence_tags_pushers_and_unread_counts() {
    let Some((hs, proxy)) = start(Options::new(Backend::Embedded)).await else { return };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let bob_id = hs.user_id("bob");
    let alice_id = hs.user_id("alice");
    let room = create_room(&alice, json!({"preset": "public_chat"})).await;
    assert_eq!(bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);
    let mut since = sync_once(&bob, "").await["next_batch"].as_str().expect("next_batch").to_owned();

    // Three messages, one mentioning bob: three notifications, one highlight.
    let mut last = String::new();
    for (n, content) in [
        json!({"msgtype": "m.text", "body": "one"}),
        json!({"msgtype": "m.text", "body": "hey bob", "m.mentions": {"user_ids": [bob_id]}}),
        json!({"msgtype": "m.text", "body": "three"}),
    ]
    .into_iter()
    .enumerate()
    {
        let r = alice
            .put(&format!("/_matrix/client/v3/rooms/{}/send/m.room.message/n{n}", enc(&room)), content)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        last = r.body["event_id"].as_str().expect("id").to_owned();
    }
    let body = sync_until(&bob, &mut since, "the unread counts", |b| {
        b["rooms"]["join"][&room]["unread_notifications"]["notification_count"] == 3
    })
    .await;
    assert_eq!(body["rooms"]["join"][&room]["unread_notifications"]["highlight_count"], 1, "{body}");

    // A read receipt clears the counts and reaches alice.
    let r = bob
        .post(&format!("/_matrix/client/v3/rooms/{}/receipt/m.read/{}", enc(&room), enc(&last)), json!({}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    sync_until(&bob, &mut since, "cleared counts", |b| {
        b["rooms"]["join"][&room]["unread_notifications"]["notification_count"] == 0
    })
    .await;
    let mut a_since = String::new();
    let a = sync_until(&alice, &mut a_since, "bob's receipt", |b| {
        b["rooms"]["join"][&room]["ephemeral"]["events"].as_array().is_some_and(|es| {
            es.iter()
                .any(|e| e["type"] == "m.receipt" && e["content"][&last]["m.read"][&bob_id]["ts"].is_number())
        })
    })
    .await;
    assert!(a["next_batch"].is_string());

    // Private receipts are for their owner only.
    let r = bob
        .post(
            &format!("/_matrix/client/v3/rooms/{}/receipt/m.read.private/{}", enc(&room), enc(&last)),
            json!({}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // Typing: alice types, bob sees it; alice stops, bob sees the empty list.
    let r = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&alice_id)),
            json!({"typing": true, "timeout": 10000}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let typing_of = |b: &Value| -> Option<Value> {
        b["rooms"]["join"][&room]["ephemeral"]["events"].as_array().and_then(|es| {
            es.iter().find(|e| e["type"] == "m.typing").map(|e| e["content"]["user_ids"].clone())
        })
    };
    sync_until(&bob, &mut since, "alice typing", |b| typing_of(b) == Some(json!([alice_id]))).await;
    let r = alice
        .put(
            &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&alice_id)),
            json!({"typing": false}),
        )
        .await;
    assert_eq!(r.status, 200);
    sync_until(&bob, &mut since, "alice stopped typing", |b| typing_of(b) == Some(json!([]))).await;
    // Nobody types for someone else.
    let r = bob
        .put(
            &format!("/_matrix/client/v3/rooms/{}/typing/{}", enc(&room), enc(&alice_id)),
            json!({"typing": true}),
        )
        .await;
    assert_eq!(r.status, 403);

    // Presence.
    let r = alice
        .put(
            &format!("/_matrix/client/v3/presence/{}/status", enc(&alice_id)),
            json!({"presence": "online", "status_msg": "here"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    sync_until(&bob, &mut since, "alice's presence", |b| {
        b["presence"]["events"].as_array().is_some_and(|es| {
            es.iter().any(|e| e["sender"] == alice_id && e["content"]["status_msg"] == "here")
        })
    })
    .await;
    let r = bob.get(&format!("/_matrix/client/v3/presence/{}/status", enc(&alice_id))).await;
    assert_eq!(r.body["presence"], "online", "{:?}", r.body);
    let r = alice
        .put(
            &format!("/_matrix/client/v3/presence/{}/status", enc(&alice_id)),
            json!({"presence": "dancing"}),
        )
        .await;
    assert_eq!((r.status, r.errcode()), (400, "M_INVALID_PARAM"));

    // Tags are room account data.
    let r = bob
        .put(
            &format!("/_matrix/client/v3/user/{}/rooms/{}/tags/m.favourite", enc(&bob_id), enc(&room)),
            json!({"order": 0.5}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob.get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&bob_id), enc(&room))).await;
    assert_eq!(r.body["tags"]["m.favourite"]["order"], 0.5, "{:?}", r.body);
    sync_until(&bob, &mut since, "the m.tag account data", |b| {
        b["rooms"]["join"][&room]["account_data"]["events"].as_array().is_some_and(|es| {
            es.iter().any(|e| e["type"] == "m.tag" && e["content"]["tags"]["m.favourite"].is_object())
        })
    })
    .await;
    let r = bob
        .raw(
            "DELETE",
            &format!("/_matrix/client/v3/user/{}/rooms/{}/tags/m.favourite", enc(&bob_id), enc(&room)),
            None,
        )
        .await;
    assert_eq!(r.status, 200);
    let r = bob.get(&format!("/_matrix/client/v3/user/{}/rooms/{}/tags", enc(&bob_id), enc(&room))).await;
    assert_eq!(r.body["tags"], json!({}));

    // Read markers set m.fully_read.
    let r = bob
        .post(&format!("/_matrix/client/v3/rooms/{}/read_markers", enc(&room)), json!({"m.fully_read": last}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob
        .get(&format!(
            "/_matrix/client/v3/user/{}/rooms/{}/account_data/m.fully_read",
            enc(&bob_id),
            enc(&room)
        ))
        .await;
    assert_eq!(r.body["event_id"], json!(last));

    // Pushers are stored and listed, and removed with kind null.
    let pusher = json!({"pushkey": "k1", "kind": "http", "app_id": "org.example.app", "app_display_name": "App",
        "device_display_name": "Phone", "lang": "en", "data": {"url": "https://push.example.org/_matrix/push/v1/notify"}});
    assert_eq!(bob.post("/_matrix/client/v3/pushers/set", pusher).await.status, 200);
    let r = bob.get("/_matrix/client/v3/pushers").await;
    assert_eq!(r.body["pushers"][0]["pushkey"], "k1", "{:?}", r.body);
    let r = bob
        .post(
            "/_matrix/client/v3/pushers/set",
            json!({"pushkey": "k1", "app_id": "org.example.app", "kind": null}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(bob.get("/_matrix/client/v3/pushers").await.body["pushers"], json!([]));
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn relations_threads_context_and_knocking() {
    let Some((hs, proxy)) = start(Options::new(Backend::Embedded)).await else { return };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice").await;
    let bob = anon.register("bob", "pw-bob").await;
    let room = create_room(&alice, json!({"preset": "public_chat"})).await;
    assert_eq!(bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);
    let send = async |c: &Client, txn: &str, content: Value| -> String {
        let r = c
            .put(&format!("/_matrix/client/v3/rooms/{}/send/m.room.message/{txn}", enc(&room)), content)
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        r.body["event_id"].as_str().expect("id").to_owned()
    };
    let root = send(&alice, "root", json!({"msgtype": "m.text", "body": "root"})).await;
    let mut replies = Vec::new();
    for n in 0..5 {
        let c = if n % 2 == 0 { &bob } else { &alice };
        let content = json!({"msgtype": "m.text", "body": format!("reply {n}"),
            "m.relates_to": {"rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": {"event_id": root}}});
        replies.push(send(c, &format!("r{n}"), content).await);
    }
    let edit = send(&alice, "edit", json!({"msgtype": "m.text", "body": "* root2", "m.new_content": {"msgtype": "m.text", "body": "root2"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": root}})).await;
    let other = send(&alice, "other", json!({"msgtype": "m.text", "body": "unrelated"})).await;

    // All children, newest first, paged two at a time without gaps or repeats.
    let mut seen = Vec::new();
    let mut from: Option<String> = None;
    loop {
        let q = from.as_ref().map(|f| format!("&from={f}")).unwrap_or_default();
        let r = bob
            .get(&format!("/_matrix/client/v1/rooms/{}/relations/{}?limit=2{q}", enc(&room), enc(&root)))
            .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        for e in r.body["chunk"].as_array().expect("chunk") {
            seen.push(e["event_id"].as_str().expect("id").to_owned());
        }
        match r.body["next_batch"].as_str() {
            Some(n) => from = Some(n.to_owned()),
            None => break,
        }
    }
    let mut want: Vec<String> = replies.iter().cloned().chain([edit.clone()]).collect();
    want.reverse();
    assert_eq!(seen, want);
    // Only one relation type, and forward.
    let r =
        bob.get(&format!("/_matrix/client/v1/rooms/{}/relations/{}/m.replace", enc(&room), enc(&root))).await;
    assert_eq!(r.body["chunk"].as_array().map(Vec::len), Some(1), "{:?}", r.body);
    assert_eq!(r.body["chunk"][0]["event_id"], json!(edit));
    let r = bob
        .get(&format!(
            "/_matrix/client/v1/rooms/{}/relations/{}/m.thread/m.room.message?dir=f",
            enc(&room),
            enc(&root)
        ))
        .await;
    let ids: Vec<&str> =
        r.body["chunk"].as_array().expect("chunk").iter().filter_map(|e| e["event_id"].as_str()).collect();
    assert_eq!(ids, replies.iter().map(String::as_str).collect::<Vec<_>>());

    // Threads: one root, with its latest reply, count and participation.
    let r = bob.get(&format!("/_matrix/client/v1/rooms/{}/threads", enc(&room))).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let chunk = r.body["chunk"].as_array().expect("chunk");
    assert_eq!(chunk.len(), 1, "{:?}", r.body);
    let thread = &chunk[0]["unsigned"]["m.relations"]["m.thread"];
    assert_eq!(chunk[0]["event_id"], json!(root));
    assert_eq!(thread["count"], 5);
    assert_eq!(thread["latest_event"]["event_id"], json!(replies[4]));
    assert_eq!(thread["current_user_participated"], true);
    let carol = anon.register("carol", "pw-carol").await;
    assert_eq!(carol.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);
    let r = carol.get(&format!("/_matrix/client/v1/rooms/{}/threads?include=participated", enc(&room))).await;
    assert_eq!(r.body["chunk"], json!([]), "{:?}", r.body);

    // Context around a reply: events on both sides, in order.
    let r = bob
        .get(&format!("/_matrix/client/v3/rooms/{}/context/{}?limit=4", enc(&room), enc(&replies[2])))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["event"]["event_id"], json!(replies[2]));
    let before: Vec<&str> = r.body["events_before"]
        .as_array()
        .expect("before")
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    let after: Vec<&str> = r.body["events_after"]
        .as_array()
        .expect("after")
        .iter()
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(before, vec![replies[1].as_str(), replies[0].as_str()]);
    assert_eq!(after, vec![replies[3].as_str(), replies[4].as_str()]);
    // Paginating from `end` continues after the context.
    let end = r.body["end"].as_str().expect("end");
    let r =
        bob.get(&format!("/_matrix/client/v3/rooms/{}/messages?dir=f&from={end}&limit=2", enc(&room))).await;
    assert_eq!(r.body["chunk"][0]["event_id"], json!(edit), "{:?}", r.body);
    assert_eq!(r.body["chunk"][1]["event_id"], json!(other));

    // Knocking: refused on a public room's join rule, accepted where the join rule allows it,
    // and the knock shows in the knocker's sync and in the room.
    let dave = anon.register("dave", "pw-dave").await;
    let knock_room = create_room(&alice, json!({"initial_state": [{"type": "m.room.join_rules", "state_key": "", "content": {"join_rule": "knock"}}]})).await;
    let r = dave
        .post(&format!("/_matrix/client/v3/knock/{}", enc(&knock_room)), json!({"reason": "let me in"}))
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mut since = String::new();
    sync_until(&dave, &mut since, "the knock", |b| {
        b["rooms"]["knock"][&knock_room]["knock_state"]["events"].is_array()
    })
    .await;
    let r = alice
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/state/m.room.member/{}",
            enc(&knock_room),
            enc(&hs.user_id("dave"))
        ))
        .await;
    assert_eq!(r.body["membership"], "knock", "{:?}", r.body);
    let r = dave.post(&format!("/_matrix/client/v3/knock/{}", enc(&room)), json!({})).await;
    assert_eq!((r.status, r.errcode()), (403, "M_FORBIDDEN"), "{:?}", r.body);
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn account_management_devices_password_and_deactivation() {
    let Some((hs, proxy)) = start(Options::new(Backend::Embedded)).await else { return };
    let anon = Client::new(&proxy.url);
    let alice = anon.register("alice", "pw-alice-1").await;
    let bob = anon.register("bob", "pw-bob").await;
    let room = create_room(&alice, json!({"preset": "public_chat"})).await;
    assert_eq!(bob.post(&format!("/_matrix/client/v3/join/{}", enc(&room)), json!({})).await.status, 200);
    let login = |pw: &str| json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": pw});
    let second = anon.post("/_matrix/client/v3/login", login("pw-alice-1")).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    let second_device = second.body["device_id"].as_str().expect("device").to_owned();
    let second = anon.with_token(second.body["access_token"].as_str().expect("token"));

    // Devices: two; renaming one; deleting needs the password (UIA).
    let r = alice.get("/_matrix/client/v3/devices").await;
    assert_eq!(r.body["devices"].as_array().map(Vec::len), Some(2), "{:?}", r.body);
    let r = alice
        .put(&format!("/_matrix/client/v3/devices/{second_device}"), json!({"display_name": "laptop"}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        alice.get(&format!("/_matrix/client/v3/devices/{second_device}")).await.body["display_name"],
        "laptop"
    );
    let path = format!("/_matrix/client/v3/devices/{second_device}");
    let r = alice.raw("DELETE", &path, Some(b"{}".to_vec())).await;
    assert_eq!(r.status, 401, "{:?}", r.body);
    assert_eq!(r.body["flows"][0]["stages"], json!(["m.login.password"]));
    let auth = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "wrong", "session": r.body["session"]}});
    let r = alice.raw("DELETE", &path, Some(auth.to_string().into_bytes())).await;
    assert_eq!(r.status, 401, "a wrong password deleted a device: {:?}", r.body);
    let auth = json!({"auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "pw-alice-1"}});
    let r = alice.raw("DELETE", &path, Some(auth.to_string().into_bytes())).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(second.get("/_matrix/client/v3/account/whoami").await.errcode(), "M_UNKNOWN_TOKEN");

    // Password change: the old password stops working, the session that changed it stays.
    let r = alice.post("/_matrix/client/v3/account/password", json!({"new_password": "pw-alice-2",
        "auth": {"type": "m.login.password", "identifier": {"type": "m.id.user", "user": "alice"}, "password": "pw-alice-1"}})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(anon.post("/_matrix/client/v3/login", login("pw-alice-1")).await.status, 403);
    assert_eq!(anon.post("/_matrix/client/v3/login", login("pw-alice-2")).await.status, 200);
    assert_eq!(alice.get("/_matrix/client/v3/account/whoami").await.status, 200);

    // Profile.
    let alice_id = hs.user_id("alice");
    let r = alice
        .put(
            &format!("/_matrix/client/v3/profile/{}/displayname", enc(&alice_id)),
            json!({"displayname": "Alice"}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        bob.get(&format!("/_matrix/client/v3/profile/{}", enc(&alice_id))).await.body["displayname"],
        "Alice"
    );
    let r = bob.get(&format!("/_matrix/client/v3/rooms/{}/joined_members", enc(&room))).await;
    assert_eq!(r.body["joined"][&alice_id]["display_name"], "Alice", "{:?}", r.body);

    // The user directory finds her by name.
    let r =
        bob.post("/_matrix/client/v3/user_directory/search", json!({"search_term": "aLI", "limit": 5})).await;
    assert_eq!(r.body["results"][0]["user_id"], json!(alice_id), "{:?}", r.body);
    assert_eq!(r.body["limited"], false);

    // Deactivation leaves the rooms and ends every session.
    let r = alice
        .post(
            "/_matrix/client/v3/account/deactivate",
            json!({"auth": {"type": "m.login.password",
        "identifier": {"type": "m.id.user", "user": "alice"}, "password": "pw-alice-2"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let r = bob
        .get(&format!("/_matrix/client/v3/rooms/{}/state/m.room.member/{}", enc(&room), enc(&alice_id)))
        .await;
    assert_eq!(r.body["membership"], "leave", "{:?}", r.body);
    assert_eq!(alice.get("/_matrix/client/v3/account/whoami").await.errcode(), "M_UNKNOWN_TOKEN");
    assert_eq!(anon.post("/_matrix/client/v3/login", login("pw-alice-2")).await.status, 403);
    proxy.assert_clean();
}
