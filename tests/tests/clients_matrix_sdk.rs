//! matrix-sdk (the Rust client SDK) against the homeserver: registration through
//! user-interactive auth, password login on a second client, a room with an invite, messages
//! both ways through `/sync`, back-pagination through `/messages`, and a leave seen by the other
//! user. Every request goes through the validating proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;

use lattice_e2e::proxy::ValidatingProxy;
use lattice_e2e::{Backend, Homeserver, Options};
use matrix_sdk::config::{RequestConfig, SyncSettings};
use matrix_sdk::room::MessagesOptions;
use matrix_sdk::ruma::api::client::account::register;
use matrix_sdk::ruma::api::client::dehydrated_device::{get_dehydrated_device, get_events};
use matrix_sdk::ruma::api::client::room::create_room;
use matrix_sdk::ruma::api::client::uiaa::{AuthData, AuthType, Dummy};
use matrix_sdk::ruma::events::room::encryption::RoomEncryptionEventContent;
use matrix_sdk::ruma::events::room::member::MembershipState;
use matrix_sdk::ruma::events::room::message::RoomMessageEventContent;
use matrix_sdk::ruma::events::{
    AnySyncMessageLikeEvent, AnySyncStateEvent, AnySyncTimelineEvent, EmptyStateKey, InitialStateEvent,
    SyncMessageLikeEvent, SyncStateEvent,
};
use matrix_sdk::ruma::serde::Raw;
use matrix_sdk::ruma::{OwnedUserId, RoomId, UInt, UserId};
use matrix_sdk::{Client, RoomState};
use matrix_sdk_crypto::store::types::DehydratedDeviceKey;
use matrix_sdk_crypto::{DecryptionSettings, TrustRequirement};

/// How long any one wait on the server may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(30);
/// The `/sync` long-poll timeout while waiting for something.
const POLL: Duration = Duration::from_secs(5);

/// What the test looks at in a timeline event.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Message { sender: OwnedUserId, body: String },
    Member { sender: OwnedUserId, target: String, membership: MembershipState },
    Other { kind: String },
}

fn seen(raw: &Raw<AnySyncTimelineEvent>) -> Seen {
    let ev = raw
        .deserialize()
        .unwrap_or_else(|e| panic!("a timeline event matrix-sdk cannot parse ({e}): {}", raw.json().get()));
    match ev {
        AnySyncTimelineEvent::MessageLike(AnySyncMessageLikeEvent::RoomMessage(
            SyncMessageLikeEvent::Original(m),
        )) => Seen::Message { sender: m.sender, body: m.content.body().to_owned() },
        AnySyncTimelineEvent::State(AnySyncStateEvent::RoomMember(SyncStateEvent::Original(m))) => {
            Seen::Member {
                sender: m.sender,
                target: m.state_key.to_string(),
                membership: m.content.membership,
            }
        }
        other => Seen::Other { kind: other.event_type().to_string() },
    }
}

fn message(sender: &UserId, body: &str) -> Seen {
    Seen::Message { sender: sender.to_owned(), body: body.to_owned() }
}

fn member(sender: &UserId, target: &UserId, membership: MembershipState) -> Seen {
    Seen::Member { sender: sender.to_owned(), target: target.to_string(), membership }
}

async fn client(url: &str) -> Client {
    Client::builder()
        .homeserver_url(url)
        // A failed request fails the test instead of being retried behind its back.
        .request_config(RequestConfig::new().disable_retry().timeout(DEADLINE))
        .build()
        .await
        .expect("build a matrix-sdk client")
}

/// Registers `local` through user-interactive auth: the first request is answered 401 with a
/// session and the flows; the dummy stage completes it. The client is then signed in.
async fn register(client: &Client, local: &str, password: &str) -> register::v3::Response {
    let mut request = register::v3::Request::new();
    request.username = Some(local.to_owned());
    request.password = Some(password.to_owned());
    request.initial_device_display_name = Some(format!("{local} (registration)"));
    let err =
        client.matrix_auth().register(request.clone()).await.expect_err("the first request asks for auth");
    let uiaa = err.as_uiaa_response().unwrap_or_else(|| panic!("401 with a UIA body, got {err:?}"));
    assert!(
        uiaa.flows.iter().any(|f| f.stages == [AuthType::Dummy]),
        "registration offers the m.login.dummy flow: {:?}",
        uiaa.flows
    );
    assert!(uiaa.completed.is_empty(), "nothing is completed yet: {:?}", uiaa.completed);
    let session = uiaa.session.clone().expect("a UIA session");
    let mut dummy = Dummy::new();
    dummy.session = Some(session);
    request.auth = Some(AuthData::Dummy(dummy));
    let response = client.matrix_auth().register(request).await.expect("register with the dummy stage");
    assert!(response.access_token.is_some(), "registration signs in");
    assert_eq!(client.user_id(), Some(&*response.user_id), "the client is signed in as the new user");
    response
}

/// A client's view of the sync stream: its `next_batch` token and everything seen so far.
struct Syncer {
    client: Client,
    token: String,
    /// Per room, every timeline event from `join` and `leave` updates.
    timelines: BTreeMap<String, Vec<Seen>>,
    invited: BTreeSet<String>,
    left: BTreeSet<String>,
    /// Bodies of messages that arrived encrypted and were decrypted.
    decrypted: Vec<String>,
}

impl Syncer {
    async fn start(client: Client) -> Self {
        let response =
            client.sync_once(SyncSettings::new().timeout(Duration::ZERO)).await.expect("initial sync");
        Self {
            client,
            token: response.next_batch,
            timelines: BTreeMap::new(),
            invited: BTreeSet::new(),
            left: BTreeSet::new(),
            decrypted: Vec::new(),
        }
    }

    /// Syncs from the last token until `done` holds (checked first), failing after [`DEADLINE`].
    async fn until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
        let started = Instant::now();
        while !done(self) {
            assert!(started.elapsed() < DEADLINE, "no {what} through /sync after {DEADLINE:?}");
            let response = self
                .client
                .sync_once(SyncSettings::new().token(self.token.clone()).timeout(POLL))
                .await
                .unwrap_or_else(|e| panic!("sync while waiting for {what}: {e:?}"));
            assert_ne!(response.next_batch, "", "a next_batch token");
            self.token = response.next_batch;
            let rooms = &response.rooms;
            let timelines = rooms
                .joined
                .iter()
                .map(|(id, r)| (id, &r.timeline))
                .chain(rooms.left.iter().map(|(id, r)| (id, &r.timeline)));
            for (id, timeline) in timelines {
                let events = self.timelines.entry(id.to_string()).or_default();
                for e in &timeline.events {
                    let s = seen(e.raw());
                    if let (Some(_), Seen::Message { body, .. }) = (e.encryption_info(), &s) {
                        self.decrypted.push(body.clone());
                    }
                    events.push(s);
                }
            }
            self.invited.extend(rooms.invited.keys().map(|id| id.to_string()));
            self.left.extend(rooms.left.keys().map(|id| id.to_string()));
        }
    }

    fn timeline(&self, room: &RoomId) -> &[Seen] {
        self.timelines.get(room.as_str()).map_or(&[], Vec::as_slice)
    }

    fn messages(&self, room: &RoomId) -> Vec<Seen> {
        self.timeline(room).iter().filter(|e| matches!(e, Seen::Message { .. })).cloned().collect()
    }
}

async fn flow(backend: Backend) {
    let Some(hs) = Homeserver::start(Options::new(backend)).await else { return };
    let started = Instant::now();
    let proxy = ValidatingProxy::start(&hs.url).await;
    let url = proxy.url.clone();
    let password = "correct horse battery staple";
    let (alice_local, bob_local) =
        (format!("alice{}", lattice_e2e::unique()), format!("bob{}", lattice_e2e::unique()));

    // Alice registers and stays signed in with the registration's device.
    let alice = client(&url).await;
    let alice_reg = register(&alice, &alice_local, password).await;
    let alice_id = alice_reg.user_id.clone();
    assert_eq!(alice_id.as_str(), hs.user_id(&alice_local));

    // Bob registers, then signs in with his password on a second client.
    let bob_registration = client(&url).await;
    let bob_reg = register(&bob_registration, &bob_local, password).await;
    let bob = client(&url).await;
    let login = bob
        .matrix_auth()
        .login_username(&bob_local, password)
        .initial_device_display_name("bob (login)")
        .send()
        .await
        .expect("password login");
    let bob_id = login.user_id.clone();
    assert_eq!(bob_id, bob_reg.user_id, "the login is the registered user");
    assert_ne!(Some(&login.device_id), bob_reg.device_id.as_ref(), "the login is a new device");
    let whoami = bob.whoami().await.expect("whoami");
    assert_eq!(whoami.user_id, bob_id);
    assert_eq!(whoami.device_id.as_ref(), Some(&login.device_id));
    let devices = bob.devices().await.expect("bob's devices").devices;
    let mut device_ids: Vec<_> = devices.iter().map(|d| d.device_id.to_string()).collect();
    device_ids.sort();
    let mut expected =
        vec![login.device_id.to_string(), bob_reg.device_id.clone().expect("a device").to_string()];
    expected.sort();
    assert_eq!(device_ids, expected, "bob's devices: registration and login");

    let mut alice_sync = Syncer::start(alice.clone()).await;
    let mut bob_sync = Syncer::start(bob.clone()).await;

    // Alice creates a room and invites Bob.
    let mut create = create_room::v3::Request::new();
    create.name = Some("matrix-sdk e2e".to_owned());
    let room = alice.create_room(create).await.expect("create a room");
    let room_id = room.room_id().to_owned();
    room.invite_user_by_id(&bob_id).await.expect("invite bob");

    // Bob sees the invite through /sync, with Alice as the inviter, and joins.
    bob_sync.until("the invite", |s| s.invited.contains(room_id.as_str())).await;
    let bob_room = bob.get_room(&room_id).expect("bob knows the invited room");
    assert_eq!(bob_room.state(), RoomState::Invited);
    let invite = bob_room.invite_details().await.expect("invite details");
    assert_eq!(invite.inviter_id, alice_id, "alice invited bob");
    bob_room.join().await.expect("bob joins");
    assert_eq!(bob_room.state(), RoomState::Joined);

    // Alice sees Bob's join through /sync (the invite's order is checked by pagination below: a
    // sync timeline may be limited).
    let bob_joined = member(&bob_id, &bob_id, MembershipState::Join);
    alice_sync.until("bob's join", |s| s.timeline(&room_id).contains(&bob_joined)).await;
    let invited = member(&alice_id, &bob_id, MembershipState::Invite);

    // Messages both ways, each received by the other side through /sync.
    let mut sent = Vec::new();
    for (room, sender, body) in [
        (&room, &alice_id, "hello bob"),
        (&bob_room, &bob_id, "hi alice"),
        (&room, &alice_id, "how is the new homeserver?"),
        (&bob_room, &bob_id, "it syncs"),
        (&room, &alice_id, "bye for now"),
    ] {
        let result = room.send(RoomMessageEventContent::text_plain(body)).await.expect("send a message");
        assert!(result.encryption_info.is_none(), "an unencrypted room");
        let expected = message(sender, body);
        let (receiver, name) =
            if *sender == alice_id { (&mut bob_sync, "bob") } else { (&mut alice_sync, "alice") };
        receiver.until(&format!("{body:?} at {name}"), |s| s.timeline(&room_id).contains(&expected)).await;
        sent.push((result.response.event_id, expected));
    }
    // Both timelines end up with every message, in the order they were sent.
    let expected: Vec<Seen> = sent.iter().map(|(_, s)| s.clone()).collect();
    for (name, sync) in [("alice", &mut alice_sync), ("bob", &mut bob_sync)] {
        sync.until(&format!("every message at {name}"), |s| s.messages(&room_id).len() >= expected.len())
            .await;
        assert_eq!(sync.messages(&room_id), expected, "{name}'s synced messages");
    }

    // Bob paginates back through /messages, two events a page, to the room's creation.
    let mut back = Vec::new();
    let mut event_ids = Vec::new();
    let mut from: Option<String> = None;
    let page_started = Instant::now();
    loop {
        let mut options = MessagesOptions::backward().from(from.as_deref());
        options.limit = UInt::from(2_u32);
        let page = bob_room.messages(options).await.expect("/messages");
        assert!(page.chunk.len() <= 2, "a page holds at most `limit` events: {}", page.chunk.len());
        for event in &page.chunk {
            back.push(seen(event.raw()));
            event_ids.push(event.event_id());
        }
        match page.end {
            Some(end) if !page.chunk.is_empty() => {
                assert_ne!(Some(&end), from.as_ref(), "pagination moves");
                from = Some(end);
            }
            _ => break,
        }
        assert!(page_started.elapsed() < DEADLINE, "pagination does not end: {back:?}");
    }
    back.reverse();
    event_ids.reverse();
    assert_eq!(
        back.first(),
        Some(&Seen::Other { kind: "m.room.create".to_owned() }),
        "pagination reaches the room's creation: {back:?}"
    );
    let messages: Vec<Seen> = back.iter().filter(|e| matches!(e, Seen::Message { .. })).cloned().collect();
    assert_eq!(messages, expected, "messages paginated backwards, in reverse order");
    let message_ids: Vec<_> = back
        .iter()
        .zip(&event_ids)
        .filter(|(e, _)| matches!(e, Seen::Message { .. }))
        .map(|(_, id)| id.clone().expect("an event id"))
        .collect();
    let sent_ids: Vec<_> = sent.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(message_ids, sent_ids, "the paginated events are the sent ones");
    let position = |e: &Seen| back.iter().position(|b| b == e).unwrap_or_else(|| panic!("{e:?} in {back:?}"));
    assert!(position(&member(&alice_id, &alice_id, MembershipState::Join)) < position(&invited));
    assert!(position(&invited) < position(&bob_joined));
    assert!(position(&bob_joined) < position(&expected[0]));

    // Bob leaves; Alice sees the leave, and Bob's own sync moves the room to `left`.
    bob_room.leave().await.expect("bob leaves");
    assert_eq!(bob_room.state(), RoomState::Left);
    let bob_left = member(&bob_id, &bob_id, MembershipState::Leave);
    alice_sync.until("bob's leave", |s| s.timeline(&room_id).contains(&bob_left)).await;
    let bob_member = room.get_member_no_sync(&bob_id).await.expect("members").expect("bob is a member");
    assert_eq!(*bob_member.membership(), MembershipState::Leave, "alice's view of bob");
    bob_sync.until("the room in `left`", |s| s.left.contains(room_id.as_str())).await;
    assert_eq!(bob.get_room(&room_id).expect("bob knows the room").state(), RoomState::Left);

    eprintln!(
        "{backend:?}: matrix-sdk flow took {:?}, {} responses validated",
        started.elapsed(),
        proxy.validated()
    );
    assert!(proxy.validated() > 0, "the responses went through the validating proxy");
    proxy.assert_clean();
}

/// The bodies of the messages `client` decrypts in the room's last 50 events (`/messages`).
async fn decrypted_history(client: &Client, room_id: &RoomId) -> Vec<String> {
    let history = client.get_room(room_id).expect("the device knows the room");
    let mut options = MessagesOptions::backward();
    options.limit = UInt::from(50_u32);
    let page = history.messages(options).await.expect("/messages on the device");
    page.chunk
        .iter()
        .filter(|e| e.encryption_info().is_some())
        .filter_map(|e| match seen(e.raw()) {
            Seen::Message { body, .. } => Some(body),
            _ => None,
        })
        .collect()
}

/// Alice and Bob, each signed in on a matrix-sdk client with crypto, in an encrypted room
/// Alice created and Bob joined; every request through the validating proxy.
struct EncryptedRoom {
    hs: Homeserver,
    proxy: ValidatingProxy,
    url: String,
    password: &'static str,
    alice: Client,
    alice_local: String,
    alice_id: OwnedUserId,
    bob: Client,
    bob_id: OwnedUserId,
    alice_sync: Syncer,
    bob_sync: Syncer,
    room: matrix_sdk::Room,
    bob_room: matrix_sdk::Room,
    room_id: matrix_sdk::ruma::OwnedRoomId,
}

impl EncryptedRoom {
    async fn start(backend: Backend) -> Option<Self> {
        let hs = Homeserver::start(Options::new(backend)).await?;
        let proxy = ValidatingProxy::start(&hs.url).await;
        let url = proxy.url.clone();
        let password = "correct horse battery staple";
        let alice = client(&url).await;
        let alice_local = format!("alice{}", lattice_e2e::unique());
        let alice_id = register(&alice, &alice_local, password).await.user_id;
        let bob = client(&url).await;
        let bob_id = register(&bob, &format!("bob{}", lattice_e2e::unique()), password).await.user_id;
        // The first syncs upload each device's keys.
        let mut alice_sync = Syncer::start(alice.clone()).await;
        let mut bob_sync = Syncer::start(bob.clone()).await;

        let mut create = create_room::v3::Request::new();
        create.invite = vec![bob_id.clone()];
        create.initial_state = vec![
            InitialStateEvent::new(EmptyStateKey, RoomEncryptionEventContent::with_recommended_defaults())
                .to_raw_any(),
        ];
        let room = alice.create_room(create).await.expect("create an encrypted room");
        let room_id = room.room_id().to_owned();
        bob_sync.until("the invite", |s| s.invited.contains(room_id.as_str())).await;
        let bob_room = bob.get_room(&room_id).expect("bob knows the room");
        bob_room.join().await.expect("bob joins");
        let bob_joined = member(&bob_id, &bob_id, MembershipState::Join);
        alice_sync.until("bob's join", |s| s.timeline(&room_id).contains(&bob_joined)).await;
        Some(Self {
            hs,
            proxy,
            url,
            password,
            alice,
            alice_local,
            alice_id,
            bob,
            bob_id,
            alice_sync,
            bob_sync,
            room,
            bob_room,
            room_id,
        })
    }
}

/// Two users on matrix-sdk's crypto (vodozemac) in an encrypted room: device and one-time keys
/// are uploaded, queried and claimed, Olm sessions carry the Megolm room keys as to-device
/// messages, and each side decrypts the other's messages.
async fn encrypted(backend: Backend) {
    let Some(EncryptedRoom {
        hs,
        proxy,
        url,
        password,
        alice,
        alice_local,
        alice_id,
        bob,
        bob_id,
        mut alice_sync,
        mut bob_sync,
        room,
        bob_room,
        room_id,
    }) = EncryptedRoom::start(backend).await
    else {
        return;
    };
    assert!(room.latest_encryption_state().await.expect("encryption state").is_encrypted());

    for (sending, sender, body) in [
        (&room, &alice_id, "a secret for bob"),
        (&bob_room, &bob_id, "a secret for alice"),
        (&room, &alice_id, "still secret"),
    ] {
        let result = sending.send(RoomMessageEventContent::text_plain(body)).await.expect("send encrypted");
        assert!(result.encryption_info.is_some(), "{body:?} was sent encrypted");
        let (receiver, name) =
            if *sender == alice_id { (&mut bob_sync, "bob") } else { (&mut alice_sync, "alice") };
        receiver
            .until(&format!("{body:?} decrypted at {name}"), |s| s.decrypted.iter().any(|b| b == body))
            .await;
    }
    // Cross-signing: both bootstrap (their own devices get signed by their self-signing keys),
    // then Alice verifies Bob's identity with her user-signing key, after which Bob's device
    // is verified for her. Every signature goes through the server's checks.
    alice.encryption().bootstrap_cross_signing(None).await.expect("alice bootstraps cross-signing");
    bob.encryption().bootstrap_cross_signing(None).await.expect("bob bootstraps cross-signing");
    let raw_alice =
        lattice_e2e::Client::new(&hs.url).with_token(alice.access_token().expect("token").as_str());
    let r = raw_alice
        .post("/_matrix/client/v3/keys/query", json!({"device_keys": {alice_id.as_str(): []}}))
        .await;
    let ssk = r.body["self_signing_keys"][alice_id.as_str()]["keys"]
        .as_object()
        .and_then(|k| k.keys().next().cloned());
    let ssk = ssk.unwrap_or_else(|| panic!("alice's self-signing key is published: {:?}", r.body));
    let alice_device = alice.device_id().expect("device").to_string();
    assert!(
        r.body["device_keys"][alice_id.as_str()][&alice_device]["signatures"][alice_id.as_str()][&ssk]
            .is_string(),
        "bootstrapping signed alice's device with her self-signing key: {:?}",
        r.body
    );
    assert!(
        r.body["user_signing_keys"][alice_id.as_str()].is_object(),
        "her user-signing key, to herself: {:?}",
        r.body
    );
    let started = Instant::now();
    let bob_identity = loop {
        if let Some(identity) = alice.encryption().request_user_identity(&bob_id).await.expect("/keys/query")
        {
            break identity;
        }
        assert!(started.elapsed() < DEADLINE, "alice never sees bob's cross-signing identity");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!bob_identity.is_verified(), "not verified yet");
    bob_identity.verify().await.expect("alice signs bob's master key");
    let bob_device = bob.device_id().expect("bob's device").to_owned();
    let started = Instant::now();
    loop {
        // Alice's client learns of the new signature from the device-list change in /sync.
        let response = alice
            .sync_once(
                SyncSettings::new().token(alice_sync.token.clone()).timeout(Duration::from_millis(500)),
            )
            .await
            .expect("sync");
        alice_sync.token = response.next_batch;
        let identity =
            alice.encryption().get_user_identity(&bob_id).await.expect("store").expect("bob's identity");
        let device =
            alice.encryption().get_device(&bob_id, &bob_device).await.expect("store").expect("bob's device");
        if identity.is_verified() && device.is_verified() {
            break;
        }
        assert!(started.elapsed() < DEADLINE, "bob's device never became verified for alice");
    }
    // And Bob verifies Alice.
    let alice_identity = bob
        .encryption()
        .request_user_identity(&alice_id)
        .await
        .expect("/keys/query")
        .expect("alice's identity");
    alice_identity.verify().await.expect("bob signs alice's master key");
    let again =
        bob.encryption().request_user_identity(&alice_id).await.expect("/keys/query").expect("identity");
    assert!(again.is_verified(), "bob has verified alice");
    // A forged signature is refused.
    let forged = json!({&*bob_id: {bob_device.as_str(): {"user_id": bob_id, "device_id": bob_device, "algorithms": [], "keys": {},
        "signatures": {bob_id.as_str(): {"ed25519:AAAA": "bm90IGEgc2lnbmF0dXJl"}}}}});
    let r = lattice_e2e::Client::new(&hs.url)
        .with_token(bob.access_token().expect("bob's token").as_str())
        .post("/_matrix/client/v3/keys/signatures/upload", forged)
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert!(r.body["failures"][bob_id.as_str()][bob_device.as_str()]["errcode"].is_string(), "{:?}", r.body);

    // Key backup: Alice enables recovery (secret storage in her account data, a backup
    // version, her room keys uploaded); a new device of hers recovers with the recovery key,
    // downloads the room's keys from the backup and decrypts the history.
    let recovery_key = alice
        .encryption()
        .recovery()
        .enable()
        .wait_for_backups_to_upload()
        .await
        .expect("alice enables recovery and backs up her keys");
    let alice2 = client(&url).await;
    alice2.matrix_auth().login_username(&alice_local, password).send().await.expect("alice logs in again");
    alice2
        .sync_once(SyncSettings::new().timeout(Duration::ZERO))
        .await
        .expect("first sync of the new device");
    alice2.encryption().recovery().recover(&recovery_key).await.expect("recover with the recovery key");
    alice2
        .encryption()
        .backups()
        .download_room_keys_for_room(&room_id)
        .await
        .expect("download the room's keys");
    let decrypted = decrypted_history(&alice2, &room_id).await;
    for body in ["a secret for bob", "a secret for alice", "still secret"] {
        assert!(
            decrypted.iter().any(|b| b == body),
            "the new device decrypts {body:?} from the backup: {decrypted:?}"
        );
    }

    // What the server stored is ciphertext.
    let raw = lattice_e2e::Client::new(&hs.url)
        .with_token(bob.access_token().expect("bob's token").as_str())
        .get(&format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=20",
            lattice_e2e::enc(room_id.as_str())
        ))
        .await;
    let chunk = raw.body["chunk"].as_array().expect("chunk");
    assert!(chunk.iter().any(|e| e["type"] == "m.room.encrypted"), "{:?}", raw.body);
    assert!(!raw.body.to_string().contains("a secret for"), "no plaintext on the server");
    proxy.assert_clean();
}

/// Device dehydration (MSC3814) with matrix-sdk's own crypto machine: Alice's device creates a
/// dehydrated device signed by her self-signing key and signs out. Bob, seeing only the
/// dehydrated device, sends an encrypted message, so its room key goes to that device alone,
/// through the server's to-device queue. Alice signs in on a new device, rehydrates the
/// dehydrated one with the pickle key, collects its to-device messages page by page through
/// `/events` and decrypts Bob's message. The server sees only ciphertext and opaque device data.
async fn dehydrated(backend: Backend) {
    // `_hs` keeps the server running to the end.
    let Some(EncryptedRoom {
        hs: _hs,
        proxy,
        url,
        password,
        alice,
        alice_local,
        alice_id,
        bob,
        mut bob_sync,
        bob_room,
        room_id,
        ..
    }) = EncryptedRoom::start(backend).await
    else {
        return;
    };

    // Alice's device creates the dehydrated device; its keys are signed by her self-signing
    // key, without which other clients would withhold room keys from it.
    alice.encryption().bootstrap_cross_signing(None).await.expect("alice bootstraps cross-signing");
    let pickle_key = DehydratedDeviceKey::new();
    let upload = {
        let machine = alice.olm_machine_for_testing().await;
        let machine = machine.as_ref().expect("alice's olm machine");
        let device = machine.dehydrated_devices().create().await.expect("create a dehydrated device");
        device.keys_for_upload("Dehydrated".to_owned(), &pickle_key).await.expect("its upload request")
    };
    let dehydrated_id = upload.device_id.clone();
    assert!(!upload.one_time_keys.is_empty(), "the dehydrated device brings one-time keys");
    let put = alice.send(upload).await.expect("PUT the dehydrated device");
    assert_eq!(put.device_id, dehydrated_id);
    let first_device = alice.device_id().expect("alice's device").to_owned();
    alice.logout().await.expect("alice signs out of her only device");

    // Bob's client follows Alice's device list until the dehydrated device is her only one.
    let started = Instant::now();
    loop {
        let response = bob
            .sync_once(SyncSettings::new().token(bob_sync.token.clone()).timeout(Duration::from_millis(500)))
            .await
            .expect("bob syncs");
        bob_sync.token = response.next_batch;
        let devices = bob.encryption().get_user_devices(&alice_id).await.expect("bob's crypto store");
        let ids: BTreeSet<String> = devices.devices().map(|d| d.device_id().to_string()).collect();
        let dehydrated = devices.get(&dehydrated_id);
        if ids.len() == 1 && dehydrated.as_ref().is_some_and(|d| d.is_dehydrated()) {
            break;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "bob never saw alice's devices become just the dehydrated one (he sees {ids:?}; \
             the first device was {first_device})"
        );
    }
    let body = "sent while alice was offline";
    let sent = bob_room.send(RoomMessageEventContent::text_plain(body)).await.expect("bob sends encrypted");
    assert!(sent.encryption_info.is_some(), "the message was sent encrypted");

    // Alice comes back on a new device and rehydrates.
    let alice2 = client(&url).await;
    alice2.matrix_auth().login_username(&alice_local, password).send().await.expect("alice logs in again");
    alice2
        .sync_once(SyncSettings::new().timeout(Duration::ZERO))
        .await
        .expect("first sync of the new device");
    let got = alice2
        .send(get_dehydrated_device::unstable::Request::new())
        .await
        .expect("GET the dehydrated device");
    assert_eq!(got.device_id, dehydrated_id, "the server returns the device Alice put");
    let settings = DecryptionSettings { sender_device_trust_requirement: TrustRequirement::Untrusted };
    let (mut events, mut pages, mut room_keys) = (0, 0, Vec::new());
    {
        let machine = alice2.olm_machine_for_testing().await;
        let machine = machine.as_ref().expect("the new device's olm machine");
        let rehydrated = machine
            .dehydrated_devices()
            .rehydrate(&pickle_key, &got.device_id, got.device_data)
            .await
            .expect("rehydrate with the pickle key");
        let mut next_batch: Option<String> = None;
        loop {
            let mut request = get_events::unstable::Request::new(dehydrated_id.clone());
            request.next_batch = next_batch.clone();
            let page = alice2.send(request).await.expect("POST .../events");
            if page.events.is_empty() {
                break;
            }
            pages += 1;
            assert!(pages < 100, "the events endpoint never ran dry");
            events += page.events.len();
            assert_ne!(page.next_batch, next_batch, "next_batch moves on");
            next_batch = page.next_batch;
            room_keys.extend(
                rehydrated
                    .receive_events(page.events, &settings)
                    .await
                    .expect("the rehydrated device decrypts"),
            );
        }
    }
    assert!(events >= 1, "the dehydrated device received to-device messages");
    assert!(
        room_keys.iter().any(|k| k.room_id == room_id),
        "a room key for the room came through the dehydrated device: {room_keys:?}"
    );
    let decrypted = decrypted_history(&alice2, &room_id).await;
    assert_eq!(decrypted, [body], "the new device decrypts bob's message with the rehydrated key");
    proxy.assert_clean();
}

#[tokio::test(flavor = "multi_thread")]
async fn matrix_sdk_encrypted_embedded() {
    encrypted(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn matrix_sdk_encrypted_production() {
    encrypted(Backend::Production).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn matrix_sdk_embedded() {
    flow(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn matrix_sdk_production() {
    flow(Backend::Production).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn matrix_sdk_dehydrated_embedded() {
    dehydrated(Backend::Embedded).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn matrix_sdk_dehydrated_production() {
    dehydrated(Backend::Production).await;
}
