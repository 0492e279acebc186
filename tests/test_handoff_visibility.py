"""Who reads a chat (one rule, everywhere chat text is returned) and the handoff's
compare-and-set status changes: a resolved chat is not reopened by a transfer, resolving
twice keeps the first ``resolved_at``, one claim wins among many, other agents hear of a
claim, a revoked key's live stream ends, and ``botp run`` stops with a stream open."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot_platform.apikeys import create_key
from bot_platform.config import BotConfig
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.platform import ROOT
from tests.support.telegram import SECRET, TOKEN, message_update, post


@pytest.fixture
async def desk(make_platform, db_url: str) -> Any:
    async with FakeTelegramServer() as fake:
        platform = await make_platform(database_url=db_url, bots=[BotConfig(
            id="shop", channel="telegram", token=TOKEN, secret=SECRET, api_base=fake.url)])
        keys = {}
        for name, role in (("ann", "agent"), ("bob", "agent"), ("boss", "admin"),
                           ("mark", "marketer")):
            key_id, key = await create_key(platform.db, name=name, role=role,
                                           now=platform.clock.now())
            keys[name] = (key_id, {"Authorization": f"Bearer {key}"})
        client = platform.http_client()
        yield platform, client, keys
        await client.aclose()


async def _escalated(platform: Any, client: Any, keys: dict, uid: int = 1111) -> str:
    await post(platform, message_update(uid * 10, "оператор", uid=uid))
    await post(platform, message_update(uid * 10 + 1, "my order 77 is late", uid=uid))
    chats = (await client.get("/api/conversations", headers=keys["ann"][1])).json()
    return f"/api/conversations/{chats[-1]['id']}"


async def test_profile_messages_follow_the_handoff_rule(desk) -> None:
    platform, client, keys = desk
    path = await _escalated(platform, client, keys)
    chat = (await client.get(path, headers=keys["ann"][1])).json()
    profile = f"/api/subscribers/{chat['subscriber_id']}"

    def texts(response: httpx.Response) -> list[str] | None:
        messages = response.json()["recent_messages"]
        return None if messages is None else [m["text"] for m in messages]

    # Waiting: every agent may pick it, so every agent may read it.
    assert "my order 77 is late" in texts(await client.get(profile, headers=keys["bob"][1]))
    assert texts(await client.get(profile, headers=keys["mark"][1])) is None
    await client.post(f"{path}/claim", headers=keys["ann"][1])
    await client.post(f"{path}/messages", headers=keys["ann"][1], json={"text": "Ann here"})
    for who in ("ann", "boss"):
        assert "Ann here" in texts(await client.get(profile, headers=keys[who][1]))
    for who in ("bob", "mark"):
        response = await client.get(profile, headers=keys[who][1])
        assert response.status_code == 200 and texts(response) is None
        assert "my order 77" not in response.text and "Ann here" not in response.text


async def test_another_agents_resolved_chat_stays_closed(desk) -> None:
    platform, client, keys = desk
    ann, bob = keys["ann"][1], keys["bob"][1]
    path = await _escalated(platform, client, keys)
    await client.post(f"{path}/claim", headers=ann)
    await client.post(f"{path}/notes", headers=ann, json={"text": "VIP, be gentle"})
    assert (await client.post(f"{path}/resolve", headers=ann, json={})).status_code == 200

    assert (await client.get(path, headers=bob)).status_code == 403
    assert (await client.post(f"{path}/notes", headers=bob,
                              json={"text": "peek"})).status_code == 403
    resolved = (await client.get("/api/conversations?status=resolved", headers=bob)).json()
    assert resolved == []
    mine = (await client.get(path, headers=ann)).json()
    assert [h["text"] for h in mine["history"] if h["direction"] == "note"] == [
        "VIP, be gentle"]
    assert (await client.post(f"{path}/notes", headers=ann,
                              json={"text": "follow-up"})).status_code == 201


async def test_resolved_chat_is_not_reopened_nor_resolved_again(desk) -> None:
    platform, client, keys = desk
    ann, (bob_id, _), boss = keys["ann"][1], keys["bob"], keys["boss"][1]
    path = await _escalated(platform, client, keys)
    await client.post(f"{path}/claim", headers=ann)
    first = (await client.post(f"{path}/resolve", headers=ann, json={})).json()
    platform.clock.advance(timedelta(minutes=5))

    again = await client.post(f"{path}/resolve", headers=ann, json={})
    assert again.status_code == 409 and "resolved" in again.json()["detail"]
    moved = await client.post(f"{path}/transfer", headers=boss, json={"agent_id": bob_id})
    assert moved.status_code == 409
    replied = await client.post(f"{path}/messages", headers=ann, json={"text": "hello?"})
    assert replied.status_code == 409
    now = (await client.get(path, headers=boss)).json()
    assert (now["status"], now["agent_id"]) == ("resolved", str(keys["ann"][0]))
    assert now["resolved_at"] == first["resolved_at"]


async def test_many_concurrent_claims_and_resolves_one_wins(desk) -> None:
    platform, client, keys = desk
    agents = []
    for n in range(8):
        _, key = await create_key(platform.db, name=f"agent{n}", role="agent",
                                  now=platform.clock.now())
        agents.append({"Authorization": f"Bearer {key}"})
    path = await _escalated(platform, client, keys)
    claims = await asyncio.gather(*(client.post(f"{path}/claim", headers=h)
                                    for h in agents))
    assert sorted(r.status_code for r in claims) == [200] + [409] * 7
    winner = agents[[r.status_code for r in claims].index(200)]
    boss = keys["boss"][1]
    resolves = await asyncio.gather(*(client.post(f"{path}/resolve", headers=h, json={})
                                      for h in (winner, boss) * 4))
    assert sorted(r.status_code for r in resolves) == [200] + [409] * 7
    [done] = [r.json() for r in resolves if r.status_code == 200]
    final = (await client.get(path, headers=boss)).json()
    assert (final["status"], final["resolved_at"]) == ("resolved", done["resolved_at"])


async def test_reply_button_without_a_title_is_422(desk) -> None:
    platform, client, keys = desk
    path = await _escalated(platform, client, keys)
    await client.post(f"{path}/claim", headers=keys["ann"][1])
    for button in ({"url": "https://shop.example.com"}, {"title": "", "url": "x"},
                   {"title": "Shop"}, {"title": 5, "url": "https://a.example"}):
        response = await client.post(f"{path}/messages", headers=keys["ann"][1],
                                     json={"text": "see", "buttons": [button]})
        assert response.status_code == 422, button
        assert isinstance(response.json()["detail"], list)
    ok = await client.post(f"{path}/messages", headers=keys["ann"][1], json={
        "text": "see", "buttons": [{"title": "Shop", "url": "https://shop.example.com"}]})
    assert ok.status_code == 202


# ---- the live stream, served for real (the in-process transport buffers responses) ------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def served(platform: Any) -> AsyncIterator[httpx.AsyncClient]:
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(platform.app(), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    serving = asyncio.create_task(server.serve())
    for _ in range(250):
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     timeout=30) as client:
            yield client
    finally:
        server.should_exit = True
        platform.stopping.set()
        await serving


class Listener:
    """Reads one agent's live stream into ``events`` until it ends."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        self.events: list[tuple[str, dict]] = []
        self.ended = asyncio.Event()
        self.task = asyncio.create_task(self._read(client, headers))

    async def _read(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        try:
            async with client.stream("GET", "/api/conversations/live/stream",
                                     headers=headers) as response:
                kind = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        kind = line.removeprefix("event: ")
                    elif line.startswith("data: "):
                        self.events.append((kind, json.loads(line.removeprefix("data: "))))
        finally:
            self.ended.set()

    async def until(self, predicate: Any, what: str) -> None:
        for _ in range(400):
            if any(predicate(kind, data) for kind, data in self.events):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {what} on the stream: {self.events}")


@pytest.fixture
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    import admin_api.conversations as conversations

    monkeypatch.setattr(conversations, "LIVE_POLL_SECONDS", 0.05)


async def test_other_agents_hear_of_a_claim_without_its_text(desk, fast_polls) -> None:
    platform, _, keys = desk
    async with served(platform) as client:
        ann, bob = Listener(client, keys["ann"][1]), Listener(client, keys["bob"][1])
        await bob.until(lambda k, d: k == "ready", "ready")
        await ann.until(lambda k, d: k == "ready", "ready")
        path = await _escalated(platform, client, keys)
        chat_id = int(path.rsplit("/", 1)[1])
        await bob.until(lambda k, d: k == "conversation" and d["id"] == chat_id, "escalation")
        await bob.until(lambda k, d: k == "message" and d["text"] == "my order 77 is late",
                        "customer message")
        await client.post(f"{path}/claim", headers=keys["ann"][1])
        await bob.until(lambda k, d: k == "gone" and d["id"] == chat_id, "gone")
        await ann.until(lambda k, d: k == "conversation" and d["status"] == "assigned",
                        "claim")
        await post(platform, message_update(11113, "second question, private", uid=1111))
        await ann.until(lambda k, d: k == "message" and d["text"].startswith("second"),
                        "message to the owner")
        await asyncio.sleep(0.3)  # several polls
        assert not [d for k, d in bob.events if "second question" in json.dumps(d)]
        assert [d for k, d in bob.events if k == "gone"] == [
            {"id": chat_id, "status": "assigned"}]
        for listener in (ann, bob):
            listener.task.cancel()
            await asyncio.gather(listener.task, return_exceptions=True)


async def test_a_revoked_keys_stream_ends(desk, fast_polls) -> None:
    platform, _, keys = desk
    async with served(platform) as client:
        bob = Listener(client, keys["bob"][1])
        await bob.until(lambda k, d: k == "ready", "ready")
        revoked = await client.delete(f"/api/keys/{keys['bob'][0]}", headers=keys["boss"][1])
        assert revoked.status_code == 204
        await asyncio.wait_for(bob.ended.wait(), timeout=20)  # a failure bound
        assert bob.events[-1] == ("end", {"reason": "key revoked"})
        await _escalated(platform, client, keys)  # nothing more reaches bob
        assert not [k for k, _ in bob.events if k in ("conversation", "message")]


@pytest.mark.slow
async def test_botp_run_stops_on_sigterm_with_a_stream_open(tmp_path: Path) -> None:
    from bot_platform.database import Database

    port = _free_port()
    url = f"sqlite+aiosqlite:///{tmp_path}/run.sqlite3"
    env = {**os.environ, "BOTP_DATABASE_URL": url, "BOTP_PORT": str(port),
           "BOTP_BOTS": "[]"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot_platform.cli", "run", cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}",
                                     timeout=30) as client:
            for _ in range(300):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            db = Database(url)
            from datetime import UTC, datetime

            _, key = await create_key(db, name="ann", role="agent", now=datetime.now(UTC))
            await db.close()
            opened = asyncio.Event()

            async def listen() -> None:
                async with client.stream("GET", "/api/conversations/live/stream",
                                         headers={"Authorization": f"Bearer {key}"}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("event: ready"):
                            opened.set()

            stream = asyncio.create_task(listen())
            await asyncio.wait_for(opened.wait(), timeout=20)
            process.send_signal(signal.SIGTERM)
            # 20 s is a failure bound, not a timing assertion.
            assert await asyncio.wait_for(process.wait(), timeout=20) == 0
            await asyncio.gather(stream, return_exceptions=True)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
