#!/usr/bin/env python3
"""End-to-end flow with matrix-nio (a real third-party client) against a Lattice homeserver.

Two users, alice and bob, drive it through nio's AsyncClient: register, a second login with the
password (checked with whoami), create a room, invite, join, messages both ways received through
/sync long-polls with since tokens, back and forward pagination with room_messages, leave, and
error paths (wrong password, sending to a room one is not in, a logged-out token). With
--e2ee-store, two more clients with encryption on exchange messages in an encrypted room and
decrypt each other's, then verify each other's devices interactively (SAS) through to-device
messages.

Every wait is a sync long-poll bounded by a deadline; nothing sleeps. Any failure prints
`FAIL [step]: reason` with the last HTTP exchange of the client involved and exits 1; success
prints `nio flow: OK` and exits 0.

Usage: nio_flow.py --homeserver URL --server-name NAME [--suffix S] [--deadline SECONDS]
                   [--e2ee-store DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import traceback
import uuid
from typing import Any, Callable, TypeVar

from nio import (
    AsyncClient,
    AsyncClientConfig,
    ErrorResponse,
    JoinResponse,
    KeyVerificationAccept,
    KeyVerificationKey,
    KeyVerificationMac,
    KeyVerificationStart,
    KeysQueryResponse,
    KeysUploadResponse,
    LoginResponse,
    LogoutResponse,
    MessageDirection,
    RegisterResponse,
    RoomCreateResponse,
    RoomInviteResponse,
    RoomLeaveResponse,
    RoomMemberEvent,
    RoomMessagesResponse,
    RoomMessageText,
    RoomSendResponse,
    SyncResponse,
    ToDeviceResponse,
    WhoamiResponse,
)
from nio.events.room_events import RoomCreateEvent

T = TypeVar("T")

# The long-poll timeout of each /sync (ms) and the deadline of one wait for a condition (s).
LONG_POLL_MS = 10_000
WAIT_DEADLINE_S = 30.0
# --trace: print every HTTP exchange to stderr.
TRACE = False


class FlowError(Exception):
    def __init__(self, step: str, message: str, client: "Client | None" = None) -> None:
        super().__init__(message)
        self.step = step
        self.client = client


class Client(AsyncClient):
    """An AsyncClient that keeps its last raw HTTP exchange, for failure reports."""

    # Responses received by all clients.
    exchanges = 0

    def __init__(self, homeserver: str, label: str, user: str = "", store: str | None = None) -> None:
        # Fail fast: no retries on 429 or on timeouts, so a server fault shows as a failure.
        # With a store directory the client does end-to-end encryption (vodozemac).
        config = AsyncClientConfig(
            max_limit_exceeded=0,
            max_timeouts=0,
            request_timeout=60,
            encryption_enabled=store is not None,
            store_sync_tokens=False,
        )
        super().__init__(homeserver, user=user, config=config, store_path=store or "")
        self.label = label
        self.last_exchange: str = "(none)"

    async def create_matrix_response(self, response_class, transport_response, data=None, save_to=None):
        try:
            body = (await transport_response.read()).decode("utf-8", "replace")
        except Exception as e:  # noqa: BLE001 - diagnostics only
            body = f"<unreadable body: {e}>"
        if len(body) > 4000:
            body = body[:4000] + "...(truncated)"
        req = transport_response.request_info
        Client.exchanges += 1
        self.last_exchange = f"{req.method} {req.url} -> {transport_response.status}\n{body}"
        if TRACE:
            print(f"trace {self.label}: {self.last_exchange}", file=sys.stderr, flush=True)
        return await super().create_matrix_response(response_class, transport_response, data, save_to)


def expect(step: str, resp: Any, cls: type[T], client: Client) -> T:
    """The response must be of the success class `cls`."""
    if not isinstance(resp, cls):
        raise FlowError(step, f"expected {cls.__name__}, got {resp!r}", client)
    return resp


def expect_error(step: str, resp: Any, errcode: str, client: Client) -> ErrorResponse:
    """The response must be an error with `errcode`."""
    if not isinstance(resp, ErrorResponse):
        raise FlowError(step, f"expected an error {errcode}, got success {resp!r}", client)
    if resp.status_code != errcode:
        raise FlowError(
            step, f"expected errcode {errcode}, got {resp.status_code!r} ({resp.message!r})", client
        )
    return resp


def check(step: str, cond: bool, message: str, client: Client | None = None) -> None:
    if not cond:
        raise FlowError(step, message, client)


async def sync_once(step: str, client: Client, timeout_ms: int) -> SyncResponse:
    """One /sync from the client's current since token (nio passes next_batch)."""
    # nio gives the HTTP request timeout_ms/1000 + 15 s; bound it ourselves too.
    try:
        resp = await asyncio.wait_for(client.sync(timeout=timeout_ms), timeout_ms / 1000 + 20)
    except asyncio.TimeoutError:
        raise FlowError(
            step, f"/sync with timeout={timeout_ms}ms did not answer within {timeout_ms / 1000 + 20}s", client
        ) from None
    return expect(step, resp, SyncResponse, client)


async def sync_until(step: str, client: Client, what: str, found: Callable[[SyncResponse], T | None]) -> T:
    """Long-polls /sync from the client's since token until `found` returns a value or the deadline
    passes."""
    deadline = time.monotonic() + WAIT_DEADLINE_S
    polls = 0
    while True:
        remaining_ms = int((deadline - time.monotonic()) * 1000)
        if remaining_ms <= 0:
            raise FlowError(
                step, f"{client.label}: no {what} in /sync after {WAIT_DEADLINE_S}s ({polls} polls)", client
            )
        polls += 1
        resp = await sync_once(step, client, min(LONG_POLL_MS, remaining_ms))
        value = found(resp)
        if value is not None:
            return value


def joined_timeline(resp: SyncResponse, room_id: str) -> list[Any]:
    room = resp.rooms.join.get(room_id)
    return list(room.timeline.events) if room else []


def member_event(events: list[Any], user_id: str, membership: str) -> RoomMemberEvent | None:
    for ev in events:
        if isinstance(ev, RoomMemberEvent) and ev.state_key == user_id and ev.membership == membership:
            return ev
    return None


def text_event(events: list[Any], event_id: str) -> RoomMessageText | None:
    for ev in events:
        if getattr(ev, "event_id", None) == event_id:
            return ev
    return None


_T0 = time.monotonic()


def begin(step: str) -> str:
    """Starts a step: prints it with the time since the start, so a hang shows where it was."""
    print(f"[{time.monotonic() - _T0:6.2f}s] {step}", flush=True)
    return step


def describe(ev: Any) -> str:
    src = getattr(ev, "source", None) or {}
    what = src.get("content", {}).get("body", src.get("state_key", ""))
    return f"{src.get('type')}({src.get('sender')}, {what!r})"


async def run(hs: str, server_name: str, suffix: str) -> None:
    alice_local = f"nio_alice_{suffix}"
    bob_local = f"nio_bob_{suffix}"
    alice_id = f"@{alice_local}:{server_name}"
    bob_id = f"@{bob_local}:{server_name}"
    alice_pw = f"alice-pw-{suffix}"
    bob_pw = f"bob-pw-{suffix}"

    clients: list[Client] = []

    def new_client(label: str, user: str = "") -> Client:
        c = Client(hs, label, user)
        clients.append(c)
        return c

    try:
        # --- Register both users (nio sends the m.login.dummy stage).
        step = begin("register")
        alice_reg = new_client("alice(register)")
        r = expect(
            step, await alice_reg.register(alice_local, alice_pw, "nio register"), RegisterResponse, alice_reg
        )
        check(
            step, r.user_id == alice_id, f"registered user_id {r.user_id!r}, wanted {alice_id!r}", alice_reg
        )
        check(
            step, bool(r.access_token) and bool(r.device_id), f"no access_token/device_id in {r!r}", alice_reg
        )
        alice_reg_device = r.device_id
        bob = new_client("bob")
        r = expect(step, await bob.register(bob_local, bob_pw, "nio bob"), RegisterResponse, bob)
        check(step, r.user_id == bob_id, f"registered user_id {r.user_id!r}, wanted {bob_id!r}", bob)

        step = begin("whoami after register")
        w = expect(step, await bob.whoami(), WhoamiResponse, bob)
        check(step, w.user_id == bob_id, f"whoami user_id {w.user_id!r}, wanted {bob_id!r}", bob)

        # --- Error path: a wrong password is M_FORBIDDEN.
        step = begin("login with a wrong password")
        wrong = new_client("alice(wrong password)", alice_id)
        expect_error(step, await wrong.login("not-the-password", "nio wrong"), "M_FORBIDDEN", wrong)

        # --- A second login with the password: a new device, seen by whoami.
        step = begin("login with the password")
        alice = new_client("alice", alice_id)
        r = expect(step, await alice.login(alice_pw, "nio second login"), LoginResponse, alice)
        check(step, r.user_id == alice_id, f"login user_id {r.user_id!r}, wanted {alice_id!r}", alice)
        check(
            step,
            r.device_id != alice_reg_device,
            f"the second login reused the registration device {alice_reg_device!r}",
            alice,
        )
        check(
            step, r.access_token != alice_reg.access_token, "the second login returned the same token", alice
        )
        step = begin("whoami after login")
        w = expect(step, await alice.whoami(), WhoamiResponse, alice)
        check(step, w.user_id == alice_id, f"whoami user_id {w.user_id!r}, wanted {alice_id!r}", alice)
        check(
            step,
            w.device_id == alice.device_id,
            f"whoami device_id {w.device_id!r}, wanted {alice.device_id!r}",
            alice,
        )

        # --- The registration session is still valid; log it out and check its token is dead.
        step = begin("logout of the registration device")
        expect(step, await alice_reg.whoami(), WhoamiResponse, alice_reg)
        old_token = alice_reg.access_token
        expect(step, await alice_reg.logout(), LogoutResponse, alice_reg)
        alice_reg.access_token = old_token
        expect_error(
            step + " (whoami with the old token)", await alice_reg.whoami(), "M_UNKNOWN_TOKEN", alice_reg
        )
        w = expect(step + " (the other session survives)", await alice.whoami(), WhoamiResponse, alice)

        # --- Initial syncs, so later syncs are incremental.
        step = begin("initial sync")
        for c in (alice, bob):
            await sync_once(step, c, 0)
            check(step, bool(c.next_batch), f"{c.label}: no next_batch", c)

        # --- Alice creates a room and invites bob.
        step = begin("create room")
        room_name = f"nio room {suffix}"
        r = expect(
            step,
            await alice.room_create(name=room_name, topic="matrix-nio end-to-end"),
            RoomCreateResponse,
            alice,
        )
        room_id = r.room_id
        # Room versions before 12 end room ids with ":server_name"; version 12 ids are a bare hash.
        check(
            step,
            room_id.startswith("!") and (":" not in room_id or room_id.endswith(":" + server_name)),
            f"room id {room_id!r}",
            alice,
        )

        step = begin("alice sees her room in /sync")
        await sync_until(
            step, alice, f"join of {room_id}", lambda s: True if room_id in s.rooms.join else None
        )
        room = alice.rooms.get(room_id)
        check(step, room is not None, f"nio has no room {room_id} after sync", alice)
        check(step, room.name == room_name, f"nio's room name is {room.name!r}, wanted {room_name!r}", alice)
        check(step, alice_id in room.users, f"nio's member list {list(room.users)} lacks alice", alice)

        step = begin("invite")
        expect(step, await alice.room_invite(room_id, bob_id), RoomInviteResponse, alice)

        step = begin("bob sees the invite in /sync")
        await sync_until(
            step, bob, f"invite to {room_id}", lambda s: True if room_id in s.rooms.invite else None
        )
        invited = bob.invited_rooms.get(room_id)
        check(step, invited is not None, f"nio has no invited room {room_id} for bob", bob)
        check(
            step,
            invited.inviter == alice_id,
            f"nio's inviter is {invited.inviter!r}, wanted {alice_id!r}",
            bob,
        )
        check(
            step,
            invited.name == room_name,
            f"the invite's room name is {invited.name!r}, wanted {room_name!r}",
            bob,
        )

        # --- Error path: invited but not joined, sending is M_FORBIDDEN.
        step = begin("send before joining")
        expect_error(
            step,
            await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "too early"}),
            "M_FORBIDDEN",
            bob,
        )

        step = begin("join")
        r = expect(step, await bob.join(room_id), JoinResponse, bob)
        check(step, r.room_id == room_id, f"join answered room_id {r.room_id!r}", bob)

        step = begin("bob sees his join in /sync")
        await sync_until(step, bob, f"join of {room_id}", lambda s: True if room_id in s.rooms.join else None)
        check(step, room_id in bob.rooms, f"nio has no joined room {room_id} for bob", bob)

        step = begin("alice sees bob's join in /sync")
        await sync_until(
            step,
            alice,
            f"join of {bob_id}",
            lambda s: member_event(joined_timeline(s, room_id), bob_id, "join"),
        )
        check(step, bob_id in alice.rooms[room_id].users, "nio's member list lacks bob", alice)

        # --- Messages both ways, each received by the other side through a /sync long-poll
        # started before the message is sent (the park/wake path).
        sent: list[tuple[str, str, str]] = []  # (event_id, sender, body), oldest first

        async def exchange(sender: Client, receiver: Client, body: str) -> None:
            step = begin(f"{sender.label} -> {receiver.label}: {body!r}")
            # The receiver catches up (its own last message is still pending for it), then its
            # long-poll goes out; the sender's whoami round trip lets the long-poll reach the
            # server (usually) before the send, so the send has to wake a parked /sync. The checks
            # below hold whichever of the two reaches the server first.
            await sync_once(step + " (catch up)", receiver, 0)
            poll = asyncio.create_task(sync_once(step + " (long-poll)", receiver, LONG_POLL_MS * 2))
            expect(step + " (whoami)", await sender.whoami(), WhoamiResponse, sender)
            started = time.monotonic()
            r = expect(
                step,
                await sender.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body}),
                RoomSendResponse,
                sender,
            )
            check(step, r.event_id.startswith("$"), f"event id {r.event_id!r}", sender)
            sent.append((r.event_id, sender.user_id, body))
            first = await poll
            elapsed = time.monotonic() - started
            events = joined_timeline(first, room_id)
            ev = text_event(events, r.event_id)
            if ev is None:
                # The long-poll answered early without the message; keep waiting.
                print(
                    f"note: {step}: the long-poll answered after {elapsed:.2f}s without the message: "
                    f"{[describe(e) for e in events]}",
                    file=sys.stderr,
                )
                ev = await sync_until(
                    step,
                    receiver,
                    f"event {r.event_id}",
                    lambda s: text_event(joined_timeline(s, room_id), r.event_id),
                )
            else:
                check(
                    step,
                    elapsed < LONG_POLL_MS * 2 / 1000,
                    f"the long-poll answered after {elapsed:.1f}s, its full timeout: not woken by the send",
                    receiver,
                )
            check(step, isinstance(ev, RoomMessageText), f"received {describe(ev)}, not m.text", receiver)
            check(
                step,
                ev.sender == sender.user_id,
                f"sender {ev.sender!r}, wanted {sender.user_id!r}",
                receiver,
            )
            check(step, ev.body == body, f"body {ev.body!r}, wanted {body!r}", receiver)

        await exchange(alice, bob, "hello bob, from alice (1)")
        await exchange(bob, alice, "hi alice, from bob (2)")
        await exchange(alice, bob, "how are you? (3)")
        await exchange(bob, alice, "fine, thanks (4)")
        await exchange(alice, bob, "unicode: ünïcødé ✓ 🎉 (5)")
        await exchange(bob, alice, "last one (6)")

        # A quiet long-poll: nothing happens, so it must answer with no new timeline events.
        step = begin("quiet long-poll")
        t0 = time.monotonic()
        quiet = await sync_once(step, alice, 1000)
        elapsed = time.monotonic() - t0
        new = joined_timeline(quiet, room_id)
        check(step, not new, f"unexpected events: {[describe(e) for e in new]}", alice)
        check(step, elapsed < 1 + 15, f"a 1s long-poll took {elapsed:.1f}s", alice)
        # With nothing to return, the server waits for the timeout (the spec's "If no events (or
        # other data) become available before this time elapses, the server will return a
        # response with empty fields").
        check(step, elapsed >= 0.9, f"a quiet 1s long-poll answered after {elapsed:.2f}s, not waiting", alice)

        # --- Pagination: back from the latest sync token in small pages, then forward again.
        step = begin("paginate back")
        from_token = alice.next_batch
        back: list[Any] = []
        token = from_token
        pages = 0
        tokens_seen = {token}
        while True:
            pages += 1
            check(step, pages <= 50, "more than 50 pages of 3 events: pagination does not end", alice)
            r = expect(
                step,
                await alice.room_messages(room_id, start=token, direction=MessageDirection.back, limit=3),
                RoomMessagesResponse,
                alice,
            )
            check(step, len(r.chunk) <= 3, f"a page of {len(r.chunk)} events with limit=3", alice)
            back.extend(r.chunk)
            if not r.chunk or r.end is None:
                break
            check(step, r.end not in tokens_seen, f"the end token {r.end!r} repeats: pagination loops", alice)
            tokens_seen.add(r.end)
            token = r.end
        check(step, pages >= 3, f"only {pages} pages with limit=3", alice)
        ids = [getattr(e, "event_id", None) for e in back]
        check(step, len(ids) == len(set(ids)), f"duplicate events across pages: {ids}", alice)
        check(
            step,
            bool(back) and isinstance(back[-1], RoomCreateEvent),
            f"the oldest event is {describe(back[-1]) if back else 'none'}, not m.room.create",
            alice,
        )
        msgs = [(e.event_id, e.sender, e.body) for e in back if isinstance(e, RoomMessageText)]
        wanted = list(reversed(sent))
        check(
            step,
            msgs == wanted,
            "messages paginating back (newest first):\n  got    "
            + json.dumps(msgs, ensure_ascii=False)
            + "\n  wanted "
            + json.dumps(wanted, ensure_ascii=False),
            alice,
        )
        join = member_event(back, bob_id, "join")
        check(step, join is not None, "bob's join is not in the history", alice)
        check(
            step,
            ids.index(join.event_id) > ids.index(sent[0][0]),
            "bob's join is not older than the first message",
            alice,
        )

        step = begin("paginate forward")
        fwd: list[Any] = []
        token = r.end if r.end is not None else r.start
        pages = 0
        while True:
            pages += 1
            check(step, pages <= 50, "more than 50 pages forward: pagination does not end", alice)
            r = expect(
                step,
                await alice.room_messages(room_id, start=token, direction=MessageDirection.front, limit=4),
                RoomMessagesResponse,
                alice,
            )
            fwd.extend(r.chunk)
            if not r.chunk or r.end is None:
                break
            token = r.end
        fwd_ids = [getattr(e, "event_id", None) for e in fwd]
        check(
            step,
            fwd_ids == list(reversed(ids)),
            f"forward pagination is not the reverse of back pagination:\n  fwd  {fwd_ids}\n  back {ids}",
            alice,
        )

        # --- Bob leaves; alice sees it, bob's sync moves the room to leave.
        step = begin("leave")
        expect(step, await bob.room_leave(room_id), RoomLeaveResponse, bob)

        step = begin("bob sees his leave in /sync")
        left = await sync_until(
            step, bob, f"{room_id} under rooms.leave", lambda s: s.rooms.leave.get(room_id)
        )
        # (nio keeps left rooms in `rooms`, so the check is on the sync response itself.)
        check(
            step,
            member_event(list(left.timeline.events), bob_id, "leave") is not None,
            f"rooms.leave has no leave of bob in its timeline: {[describe(e) for e in left.timeline.events]}",
            bob,
        )

        step = begin("alice sees bob's leave in /sync")
        ev = await sync_until(
            step,
            alice,
            f"leave of {bob_id}",
            lambda s: member_event(joined_timeline(s, room_id), bob_id, "leave"),
        )
        check(step, ev.sender == bob_id, f"the leave was sent by {ev.sender!r}", alice)
        check(step, bob_id not in alice.rooms[room_id].users, "nio's member list still has bob", alice)

        # --- Error path: after leaving, sending is M_FORBIDDEN.
        step = begin("send after leaving")
        expect_error(
            step,
            await bob.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "after leaving"}),
            "M_FORBIDDEN",
            bob,
        )

        # Alice can still talk in her room (the leave did not break it).
        step = begin("alice sends after bob left")
        r = expect(
            step,
            await alice.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "still here"}),
            RoomSendResponse,
            alice,
        )
        await sync_until(
            step, alice, f"event {r.event_id}", lambda s: text_event(joined_timeline(s, room_id), r.event_id)
        )
    finally:
        for c in clients:
            await c.close()


async def run_e2ee(hs: str, server_name: str, suffix: str, store: str) -> None:
    """Two nio clients with encryption on: an encrypted room, messages both ways, each
    decrypted by the other side (keys uploaded, queried and claimed, Olm sessions carrying the
    Megolm session keys as to-device messages)."""
    clients: list[Client] = []
    try:
        step = begin("e2ee: register")
        users = {}
        for name in ("alice", "bob"):
            c = Client(hs, f"{name}(e2ee)", store=f"{store}/{name}")
            clients.append(c)
            os.makedirs(f"{store}/{name}", exist_ok=True)
            local = f"nio_e2ee_{name}_{suffix}"
            r = expect(step, await c.register(local, f"{name}-pw-{suffix}", f"nio e2ee {name}"), RegisterResponse, c)
            users[name] = (c, r.user_id)
        (alice, alice_id), (bob, bob_id) = users["alice"], users["bob"]

        step = begin("e2ee: upload keys")
        for c in (alice, bob):
            await sync_once(step, c, 0)
            if c.should_upload_keys:
                expect(step, await c.keys_upload(), KeysUploadResponse, c)
            check(step, not c.should_upload_keys, f"{c.label} still has keys to upload", c)

        step = begin("e2ee: encrypted room")
        r = expect(
            step,
            await alice.room_create(
                name="nio e2ee",
                invite=[bob_id],
                initial_state=[{"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}],
            ),
            RoomCreateResponse,
            alice,
        )
        room_id = r.room_id
        await sync_until(step, bob, "the invite", lambda resp: True if room_id in resp.rooms.invite else None)
        expect(step, await bob.join(room_id), JoinResponse, bob)
        await sync_until(
            step, alice, "bob's join", lambda resp: member_event(joined_timeline(resp, room_id), bob_id, "join")
        )

        async def send_encrypted(sender: Client, receiver: Client, body: str) -> None:
            step = begin(f"e2ee: {sender.label} sends {body!r}")
            await sync_once(step, sender, 0)
            if sender.should_query_keys:
                expect(step, await sender.keys_query(), KeysQueryResponse, sender)
            resp = await sender.room_send(
                room_id, "m.room.message", {"msgtype": "m.text", "body": body}, ignore_unverified_devices=True
            )
            sent = expect(step, resp, RoomSendResponse, sender)

            def decrypted(resp: SyncResponse) -> RoomMessageText | None:
                for ev in joined_timeline(resp, room_id):
                    if getattr(ev, "event_id", None) == sent.event_id:
                        check(step, isinstance(ev, RoomMessageText), f"not decrypted: {describe(ev)}", receiver)
                        return ev
                return None

            ev = await sync_until(step, receiver, f"{body!r} decrypted", decrypted)
            check(step, ev.body == body, f"decrypted body {ev.body!r}, wanted {body!r}", receiver)
            check(step, ev.decrypted, f"{body!r} did not arrive encrypted", receiver)

        await send_encrypted(alice, bob, "a secret from nio alice")
        await send_encrypted(bob, alice, "a secret from nio bob")
        await send_encrypted(alice, bob, "and another")

        # Interactive verification (SAS, emoji), every step a to-device message through the
        # server: start, accept, both public keys, both MACs; then each has verified the other.
        step = begin("e2ee: SAS verification")
        alice_dev, bob_dev = alice.device_id, bob.device_id
        bob_device = alice.device_store[bob_id][bob_dev]
        check(step, not bob_device.verified, "bob's device is not verified yet", alice)
        expect(step, await alice.start_key_verification(bob_device), ToDeviceResponse, alice)
        active = alice.get_active_sas(bob_id, bob_dev)
        check(step, active is not None, "alice has an active verification", alice)
        txid = active.transaction_id

        def got(kind: type, txn: str) -> Callable[[SyncResponse], bool | None]:
            def found(resp: SyncResponse) -> bool | None:
                hits = [e for e in resp.to_device_events if isinstance(e, kind) and e.transaction_id == txn]
                return True if hits else None

            return found

        await sync_until(step, bob, "the verification start", got(KeyVerificationStart, txid))
        check(step, txid in bob.key_verifications, "bob knows the verification", bob)
        expect(step, await bob.accept_key_verification(txid), ToDeviceResponse, bob)
        await sync_until(step, alice, "bob's accept", got(KeyVerificationAccept, txid))
        await alice.send_to_device_messages()  # her public key, queued by nio on the accept
        await sync_until(step, bob, "alice's key", got(KeyVerificationKey, txid))
        await bob.send_to_device_messages()  # his public key
        await sync_until(step, alice, "bob's key", got(KeyVerificationKey, txid))
        alice_sas, bob_sas = alice.key_verifications[txid], bob.key_verifications[txid]
        check(step, alice_sas.get_emoji() == bob_sas.get_emoji(), "both sides show the same emoji", alice)
        expect(step, await alice.confirm_short_auth_string(txid), ToDeviceResponse, alice)
        expect(step, await bob.confirm_short_auth_string(txid), ToDeviceResponse, bob)
        await sync_until(step, bob, "alice's MAC", got(KeyVerificationMac, txid))
        await sync_until(step, alice, "bob's MAC", got(KeyVerificationMac, txid))
        check(step, alice_sas.verified and bob_sas.verified, "both verifications completed", alice)
        check(step, alice.device_store[bob_id][bob_dev].verified, "bob's device is verified for alice", alice)
        check(step, bob.device_store[alice_id][alice_dev].verified, "alice's device is verified for bob", bob)
        await send_encrypted(bob, alice, "after verification")
    finally:
        for c in clients:
            await c.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--homeserver", required=True, help="client API base URL, e.g. http://127.0.0.1:8008")
    ap.add_argument(
        "--server-name", required=True, help="the homeserver's server_name (user ids end with it)"
    )
    ap.add_argument("--suffix", default=uuid.uuid4().hex[:10], help="makes user names unique")
    ap.add_argument("--deadline", type=float, default=300.0, help="seconds for the whole flow")
    ap.add_argument("--trace", action="store_true", help="print every HTTP exchange to stderr")
    ap.add_argument("--e2ee-store", help="also run the encrypted flow, keeping the clients' stores here")
    args = ap.parse_args()
    global TRACE
    TRACE = args.trace
    logging.basicConfig(level=logging.WARNING, format="nio log (%(name)s %(levelname)s): %(message)s")
    t0 = time.monotonic()
    try:
        asyncio.run(
            asyncio.wait_for(run(args.homeserver.rstrip("/"), args.server_name, args.suffix), args.deadline)
        )
        if args.e2ee_store:
            asyncio.run(
                asyncio.wait_for(
                    run_e2ee(args.homeserver.rstrip("/"), args.server_name, args.suffix, args.e2ee_store),
                    args.deadline,
                )
            )
    except FlowError as e:
        print(f"FAIL [{e.step}]: {e}", file=sys.stderr)
        if e.client is not None:
            print(f"last exchange of {e.client.label}:\n{e.client.last_exchange}", file=sys.stderr)
        return 1
    except asyncio.TimeoutError:
        print(f"FAIL: the whole flow took longer than {args.deadline}s", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - any other failure is a failure too, with its traceback
        traceback.print_exc()
        print("FAIL: unexpected exception (above)", file=sys.stderr)
        return 1
    print(f"nio flow: OK in {time.monotonic() - t0:.2f}s ({Client.exchanges} requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
