"""``botp web --processes N`` (bot_platform/web_processes.py): several web processes on
one port. Each serves webhooks (shown by freezing one at a time: the other takes every
new connection), a messenger's retry that lands on the other process is still processed
once and in order, only one registers the webhook, SIGTERM stops them all, a process
that dies stops the rest (the service manager restarts the whole), and SQLite, with its
one writer, is refused."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot_platform.migrations import upgrade
from bots.telegram import SECRET_HEADER
from tests.fakes.telegram_api import FakeTelegramServer
from tests.support.platform import ROOT, WorkerProcess, answers_health, wait_for
from tests.support.services import empty_redis, fresh_postgres_database

TOKEN = "123456:ABC-procs"
SECRET = "s3cret"


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def alive(pid: int) -> bool:
    """Running (a zombie waiting for whoever adopted it to reap it is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def start_update(uid: int) -> dict:
    return {"update_id": uid, "message": {
        "message_id": 1, "date": 0, "text": "/start", "chat": {"id": uid, "type": "private"},
        "from": {"id": uid, "is_bot": False, "first_name": f"N{uid}", "language_code": "en"}}}


def press_update(uid: int, data: str) -> dict:
    return {"update_id": 10_000_000 + uid, "callback_query": {
        "id": f"cb{uid}", "chat_instance": "c", "data": data,
        "from": {"id": uid, "is_bot": False, "first_name": f"N{uid}"},
        "message": {"message_id": 1, "date": 0, "chat": {"id": uid, "type": "private"}}}}


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.redis
async def test_web_processes_share_the_port_and_process_each_update_once(
        tmp_path: Path) -> None:
    import aiohttp

    async with fresh_postgres_database() as url, empty_redis() as redis_url, \
            FakeTelegramServer() as fake:
        await asyncio.to_thread(upgrade, url)
        port = free_port()
        bots = [{"id": "shop", "channel": "telegram", "token": TOKEN, "secret": SECRET,
                 "api_base": fake.url}]
        env = {**os.environ, "BOTP_DATABASE_URL": url, "BOTP_REDIS_URL": redis_url,
               "BOTP_FLOWS_DIR": str(ROOT / "flows"), "BOTP_LOCALES_DIR": str(ROOT / "locales"),
               "BOTP_BOTS": json.dumps(bots), "BOTP_PORT": str(port),
               "BOTP_PUBLIC_URL": f"http://127.0.0.1:{port}", "BOTP_WEB_PROCESSES": "2",
               "BOTP_LOG_LEVEL": "INFO"}
        web = WorkerProcess(env, tmp_path / "web.log", command="web")
        worker = WorkerProcess(env, tmp_path / "worker.log")
        base = f"http://127.0.0.1:{port}"
        users = range(700_001, 700_031)
        children: list[int] = []
        try:
            web.start()
            worker.start()
            assert web.process is not None
            # A connection of its own for every request: the kernel hands each to a
            # process that is accepting (a frozen one is not).
            connector = aiohttp.TCPConnector(force_close=True, limit=0)
            async with aiohttp.ClientSession(connector=connector) as http:
                async def post(update: dict) -> int:
                    async with http.post(f"{base}/webhooks/telegram/shop", json=update,
                                         headers={SECRET_HEADER: SECRET},
                                         timeout=aiohttp.ClientTimeout(total=20)) as response:
                        return response.status

                await wait_for(lambda: answers_health(http, base), limit=60,
                               what="the web processes")
                children = children_of(web.process.pid)
                assert len(children) == 2, children
                await wait_for(lambda: _true(fake.webhook is not None), limit=30,
                               what="the webhook registration")

                # Each process serves on its own while the other is frozen.
                for frozen, user in zip(children, (600_001, 600_002), strict=True):
                    os.kill(frozen, signal.SIGSTOP)
                    try:
                        assert await post(start_update(user)) == 200
                    finally:
                        os.kill(frozen, signal.SIGCONT)
                await wait_for(lambda: _true(all(fake.texts(u) for u in (600_001, 600_002))),
                               limit=30, what="both processes' greetings")

                # Every update delivered twice at once (a retrying messenger): the two
                # copies often land on different processes.
                statuses = await asyncio.gather(
                    *(post(start_update(u)) for u in users for _ in "xx"))
                assert set(statuses) == {200}
                await wait_for(lambda: _true(len(fake.sent()) >= len(users) + 2), limit=30,
                               what="the greetings")
                presses = []
                for uid in users:  # "Show me a tip": the first button of the greeting
                    markup = fake.sent(uid)[0].params["reply_markup"]
                    presses.append(press_update(
                        uid, markup["inline_keyboard"][0][0]["callback_data"]))
                statuses = await asyncio.gather(*(post(p) for p in presses for _ in "xx"))
                assert set(statuses) == {200}
                await wait_for(lambda: _true(len(fake.sent()) >= 2 * len(users) + 2),
                               limit=30, what="the tips")
            await asyncio.sleep(1)  # a duplicate would show now
            for uid in users:
                texts = [text[:12] for text in fake.texts(uid)]
                assert texts == [f"Hi N{uid}! Welcome"[:12], "Tip: a gentl"], texts
            # The first process registered the webhook, once (not again on each refresh
            # of the bots table); each process checked the bot once.
            assert len(fake.of("setWebhook")) == 1
            assert len(fake.of("getMe")) == 3  # two web processes and the worker
            assert web.terminate() == 0
            assert worker.terminate() == 0
            assert not any(alive(pid) for pid in children)
        finally:
            for pid in children:  # before their parent: orphans would not be found
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            web.stop()
            worker.stop()


@contextlib.asynccontextmanager
async def bare_web(processes: int) -> AsyncIterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """``botp web --processes N`` with no bots on a fresh database, once its N processes
    run: the parent (its output piped) and their pids. Every one is killed afterwards."""
    async with fresh_postgres_database() as url:
        await asyncio.to_thread(upgrade, url)
        env = {**os.environ, "BOTP_DATABASE_URL": url, "BOTP_PORT": str(free_port()),
               "BOTP_FLOWS_DIR": str(ROOT / "flows"), "BOTP_LOCALES_DIR": str(ROOT / "locales"),
               "BOTP_BOTS": "[]", "BOTP_LOG_LEVEL": "INFO"}
        web = subprocess.Popen(  # noqa: ASYNC220 (started once, not awaited on)
            [sys.executable, "-m", "bot_platform.cli", "web", "--processes", str(processes)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        children: list[int] = []
        try:
            await wait_for(lambda: _true(len(children_of(web.pid)) == processes), limit=30,
                           what=f"{processes} web processes")
            children = children_of(web.pid)
            yield web, children
        finally:
            for pid in children:  # before their parent: orphans would not be found
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
            if web.poll() is None:
                web.kill()
                web.wait()
            assert web.stdout is not None
            web.stdout.close()


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_web_process_that_dies_stops_the_others() -> None:
    async with bare_web(3) as (web, children):
        os.kill(children[1], signal.SIGKILL)
        code = await asyncio.to_thread(web.wait, 30)
        assert code == 128 + signal.SIGKILL
        assert not any(alive(pid) for pid in children)
        assert web.stdout is not None
        output = web.stdout.read().decode()
        assert "web process 2" in output and "stopping the others" in output, output


@pytest.mark.slow
@pytest.mark.postgres
async def test_web_processes_end_when_their_parent_is_killed() -> None:
    async with bare_web(2) as (web, children):
        web.kill()  # the supervisor killed outright: nothing passes signals on
        await asyncio.to_thread(web.wait, 10)
        await wait_for(lambda: _true(not any(alive(pid) for pid in children)), limit=30,
                       what="the orphaned web processes to end")


@pytest.mark.slow  # spawns botp
def test_sqlite_is_refused_with_more_than_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "BOTP_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/botp.db",
           "BOTP_PORT": str(free_port())}
    done = subprocess.run(
        [sys.executable, "-m", "bot_platform.cli", "web", "--processes", "2"], cwd=ROOT,
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "needs PostgreSQL" in done.stderr
    assert not (tmp_path / "botp.db").exists()  # refused before anything was done


async def _true(value: bool) -> bool:
    return value


@pytest.mark.slow  # spawns botp
def test_invalid_flows_are_refused_once_before_forking(tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "bad.yaml").write_text("flow: bad\nstart: nowhere\nstates: {}\n")
    env = {**os.environ, "BOTP_FLOWS_DIR": str(flows), "BOTP_PORT": str(free_port()),
           "BOTP_LOCALES_DIR": str(ROOT / "locales"),
           # Never reached: the flows are checked before any process connects.
           "BOTP_DATABASE_URL": "postgresql+asyncpg://nobody@127.0.0.1:9/none"}
    done = subprocess.run(
        [sys.executable, "-m", "bot_platform.cli", "web", "--processes", "3"], cwd=ROOT,
        env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("refusing to start with invalid flows") == 1, done.stderr
    assert "bad.yaml" in done.stderr
