"""Inbound benchmark: Telegram webhook updates over real HTTP, through the whole platform,
to the fake Bot API server, beside a plain aiogram 3 bot doing the same quiz.

Why end to end: ``bench/engine.py`` times ``Engine.handle`` alone; a customer feels the
webhook's HTTP stack, the adapter, the engine's transaction, the hold/release of the reply,
the delivery worker's claim-send-record cycle and aiogram's client, one after the other.

Every process is real: the platform is started through its CLI (``botp run`` on SQLite;
``botp web --processes 2`` + 2 x ``botp worker`` on PostgreSQL with Redis, and the same
with one web process: ``postgres-1``), the fake Telegram server
(``tests/fakes/telegram_api.py``, plus a stream of what it received) runs in a child
process of its own, and so does the baseline (``bench/aiogram_quiz_bot.py``, with
``MemoryStorage`` and with ``RedisStorage``). The load generator is this process.

A simulated user sends /start, then "quiz" (the keyword of ``flows/skin_quiz.yaml``),
presses a button of each of the two questions (the ``callback_data`` the fake received in
the bot's inline keyboard for that chat) and sends an age: 5 updates, each sent once the
answer to the previous one reached the fake. Latency of an update = from the start of its
POST until the fake received the first message of the answer. Each user is a new chat.

- throughput: ``--users`` users at once, each starting a new quiz when one ends, for
  ``--duration`` seconds (the first ``--ramp`` seconds are not counted);
- latency: users arriving at a fixed pace so that updates come at half that throughput,
  for ``--latency-duration`` seconds: p50 / p99.

    .venv/bin/python bench/inbound.py [--users 160] [--duration 25] [--latency-duration 20]
        [--only sqlite,postgres,postgres-1,aiogram-memory,aiogram-redis] [--web-processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.engine import percentile  # noqa: E402
from bench.harness import (  # noqa: E402
    drop_postgres,
    free_port,
    peak_rss_mb,
    postgres_database,
    write_report,
)

TOKEN = "123456:ABC"
SECRET = "s3cret"
BOT_ID = "shop"
REDIS_BASE = os.environ.get("BOTP_BENCH_REDIS_URL", "redis://127.0.0.1:6379")
# One quiz: (kind, text). A "button" step presses one of the last inline keyboard's buttons.
STEPS: tuple[tuple[str, str], ...] = (
    ("text", "/start"), ("text", "quiz"), ("button", ""), ("button", ""), ("text", "30"))
SETUPS = ("sqlite", "postgres", "postgres-1", "aiogram-memory", "aiogram-redis")
PLATFORM = ("sqlite", "postgres", "postgres-1")
WEB_PROCESSES = 2  # ``botp web --processes``: one per core of the project's machine
LABELS = {
    "sqlite": "platform SQLite (botp run, 1 proc)",
    "postgres": "platform PostgreSQL (web xN + 2 workers)",
    "postgres-1": "platform PostgreSQL (web x1 + 2 workers)",
    "aiogram-memory": "aiogram 3, MemoryStorage",
    "aiogram-redis": "aiogram 3, RedisStorage",
}


class BenchError(Exception):
    """A setup did not behave (did not start, answered an update with an error...)."""


# ---- the fake Bot API, in a child process --------------------------------------------------


def serve_fake(limit: float | None = None) -> None:
    """The child process: the tests' fake, plus ``GET /bench/sends``, a never-ending stream
    of one JSON line per message it accepted (chat, arrival time, callback buttons), so the
    load generator learns of every answer at once without polling. ``limit``: sends/s
    beyond which it answers 429 (``bench/replies.py``; none here)."""
    from aiohttp import web

    from tests.fakes.telegram_api import Call, FakeTelegramServer

    class StreamingFake(FakeTelegramServer):
        shutdown_timeout = 1.0

        def __init__(self) -> None:
            super().__init__()
            self.listeners: list[asyncio.Queue[str]] = []
            self.methods: Counter[str] = Counter()

        async def _handle(self, request: web.Request) -> web.Response:
            self.methods[request.match_info["method"]] += 1
            response = await super()._handle(request)
            if len(self.calls) > 2000:  # nobody reads them here; keep memory flat
                del self.calls[:1000]
            return response

        async def _send(self, call: Call, **extra: Any) -> web.Response:
            response = await super()._send(call, **extra)
            if call.params.get("_ok"):
                markup = call.params.get("reply_markup")
                rows = markup.get("inline_keyboard", []) if isinstance(markup, dict) else []
                buttons = [b["callback_data"] for row in rows for b in row
                           if b.get("callback_data")]
                line = json.dumps({"chat": int(call.params["chat_id"]), "at": call.at,
                                   "buttons": buttons}) + "\n"
                for queue in self.listeners:
                    queue.put_nowait(line)
            return response

        async def _stream(self, request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            queue: asyncio.Queue[str] = asyncio.Queue()
            self.listeners.append(queue)
            try:
                while True:
                    lines = [await queue.get()]
                    while not queue.empty():
                        lines.append(queue.get_nowait())
                    await response.write("".join(lines).encode())
            finally:
                self.listeners.remove(queue)

        async def _stats(self, request: web.Request) -> web.Response:
            return web.json_response(dict(self.methods))

        def routes(self, app: web.Application) -> None:
            super().routes(app)
            app.router.add_get("/bench/sends", self._stream)
            app.router.add_get("/bench/stats", self._stats)

    async def main() -> None:
        fake = await StreamingFake().start()
        if limit:
            fake.rate_limit(per_second=limit, retry_after=1)
        print(fake.url, flush=True)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


# ---- child processes ------------------------------------------------------------------------


@dataclass
class Child:
    """A process this benchmark started (and must stop)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """The process and its children (``botp web --processes N`` forks N)."""
        try:
            found = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return [self.pid]
        return [self.pid, *map(int, found)]

    def cpu_seconds(self) -> float:
        """User + system CPU time so far of the process and its children (0 once gone)."""
        total = 0
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float | None:
        """VmHWM (of each child, summed, when it forked some): read before stopping it."""
        pids = self.pids()
        return sum(peak_rss_mb(pid) for pid in pids[1:] or pids) or None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: list[str], env: dict[str, str], folder: Path,
          stdout: int | None = None) -> Child:
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, env=env, cwd=folder, stdin=subprocess.DEVNULL,
                                 stdout=stdout if stdout is not None else out,
                                 stderr=out)
    return Child(name, popen, log)


def stop(children: list[Child]) -> None:
    """SIGTERM (the platform shuts down cleanly on it), then SIGKILL after 15 s."""
    for child in children:
        if child.popen.poll() is None:
            child.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for child in children:
        try:
            child.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.popen.kill()
            child.popen.wait()
        if child.popen.stdout is not None:
            child.popen.stdout.close()


def clean_env() -> dict[str, str]:
    """This environment without the platform's settings (they would leak into children)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("BOTP_") and k not in ("DATABASE_URL", "REDIS_URL")}


# ---- the load generator ---------------------------------------------------------------------


@dataclass
class Target:
    """Where updates go."""

    url: str
    secret: str = SECRET


@dataclass
class ChatLog:
    """What the fake received for one chat, in arrival order."""

    times: list[float] = field(default_factory=list)
    buttons: list[str] = field(default_factory=list)  # of the last message that had some
    event: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, at: float, buttons: list[str]) -> None:
        self.times.append(at)
        if buttons:
            self.buttons = buttons
        self.event.set()

    async def wait(self, count: int) -> None:
        while len(self.times) < count:
            self.event.clear()
            await self.event.wait()


@dataclass
class Phase:
    """One measured run: (POST start, first answer at the fake, answer complete) each."""

    records: list[tuple[float, float, float]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    started: float = 0.0
    seconds: float = 0.0
    dropped: int = 0

    def latencies_ms(self) -> list[float]:
        return [(first - start) * 1000 for start, first, _ in self.records]

    def summary(self) -> dict[str, Any]:
        latencies = self.latencies_ms()
        return {
            "updates": len(self.records), "seconds": round(self.seconds, 2),
            "p50_ms": statistics.median(latencies) if latencies else None,
            "p99_ms": percentile(latencies, 0.99) if latencies else None,
            "max_ms": max(latencies) if latencies else None,
            "errors": dict(self.errors), "dropped_users": self.dropped,
        }


class LoadGenerator:
    """Plays users against a target and learns of the answers from the fake's stream."""

    def __init__(self, http: aiohttp.ClientSession, fake_url: str, step_timeout: float,
                 seed: int = 7) -> None:
        self.http = http
        self.fake_url = fake_url
        self.step_timeout = step_timeout
        self.rng = random.Random(seed)
        self.chats: dict[int, ChatLog] = {}
        self.update_ids = itertools.count(1)
        self.chat_ids = itertools.count(10_000_001)
        self.message_ids = itertools.count(1)
        self.last_send = time.monotonic()
        self.sends = 0

    async def listen(self, ready: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with self.http.get(f"{self.fake_url}/bench/sends", timeout=timeout) as response:
            ready.set()
            async for line in response.content:
                item = json.loads(line)
                self.last_send = time.monotonic()
                self.sends += 1
                log = self.chats.get(item["chat"])
                if log is not None:
                    log.add(item["at"], item["buttons"])

    async def quiet(self, for_seconds: float = 1.0, at_most: float = 60.0) -> None:
        """Wait until the fake has received nothing for a while (the last run's tail)."""
        for _ in range(int(at_most * 10)):
            if time.monotonic() - self.last_send >= for_seconds:
                return
            await asyncio.sleep(0.1)

    # ---- updates ------------------------------------------------------------------------

    def _user(self, chat_id: int) -> dict[str, Any]:
        return {"id": chat_id, "is_bot": False, "first_name": f"User{chat_id % 1000}",
                "language_code": "en"}

    def _chat(self, chat_id: int) -> dict[str, Any]:
        return {"id": chat_id, "type": "private", "first_name": f"User{chat_id % 1000}"}

    def message(self, chat_id: int, text: str) -> bytes:
        message: dict[str, Any] = {
            "message_id": next(self.message_ids), "date": int(time.time()),
            "chat": self._chat(chat_id), "from": self._user(chat_id), "text": text}
        if text.startswith("/"):
            message["entities"] = [{"type": "bot_command", "offset": 0,
                                    "length": len(text.split()[0])}]
        return json.dumps({"update_id": next(self.update_ids), "message": message}).encode()

    def callback(self, chat_id: int, data: str) -> bytes:
        shown = {"message_id": next(self.message_ids), "date": int(time.time()),
                 "chat": self._chat(chat_id), "text": "...",
                 "from": {"id": 42, "is_bot": True, "first_name": "Example Shop"}}
        query = {"id": uuid.uuid4().hex, "from": self._user(chat_id),
                 "chat_instance": str(chat_id), "data": data, "message": shown}
        return json.dumps({"update_id": next(self.update_ids),
                           "callback_query": query}).encode()

    async def _post(self, target: Target, chat_id: int, log: ChatLog, kind: str,
                    text: str) -> float:
        """Send one step's update; returns when its POST started."""
        if kind == "button":
            if not log.buttons:
                raise BenchError("no inline keyboard to press")
            body = self.callback(chat_id, self.rng.choice(log.buttons))
        else:
            body = self.message(chat_id, text)
        headers = {"X-Telegram-Bot-Api-Secret-Token": target.secret,
                   "Content-Type": "application/json"}
        started = time.monotonic()
        async with self.http.post(target.url, data=body, headers=headers) as response:
            await response.read()
            if response.status != 200:
                raise BenchError(f"HTTP {response.status}")
        return started

    @contextlib.contextmanager
    def _new_chat(self) -> Iterator[tuple[int, ChatLog]]:
        chat_id = next(self.chat_ids)
        log = self.chats[chat_id] = ChatLog()
        try:
            yield chat_id, log
        finally:
            del self.chats[chat_id]

    async def user(self, target: Target, counts: tuple[int, ...], phase: Phase,
                   deadline: float | None = None) -> bool:
        """One quiz; each step waits for all ``counts[i]`` messages of its answer."""
        with self._new_chat() as (chat_id, log):
            try:
                for (kind, text), count in zip(STEPS, counts, strict=True):
                    if deadline is not None and time.monotonic() >= deadline:
                        return True
                    before = len(log.times)
                    started = await self._post(target, chat_id, log, kind, text)
                    async with asyncio.timeout(self.step_timeout):
                        await log.wait(before + count)
                    phase.records.append((started, log.times[before], time.monotonic()))
            except (BenchError, TimeoutError, aiohttp.ClientError) as error:
                phase.errors[f"{type(error).__name__}: {error}"[:80]] += 1
                return False
        return True

    async def calibrate(self, target: Target, users: int = 3,
                        settle: float = 0.7) -> tuple[int, ...]:
        """How many messages answer each step (so a user waits for all of them before its
        next update, and the next latency is not fooled by a late part of this answer).
        Also the warm-up: the first requests of a fresh process are slower."""

        async def one() -> list[int]:
            counts = []
            with self._new_chat() as (chat_id, log):
                for kind, text in STEPS:
                    before = len(log.times)
                    await self._post(target, chat_id, log, kind, text)
                    async with asyncio.timeout(self.step_timeout):
                        await log.wait(before + 1)
                    await asyncio.sleep(settle)
                    counts.append(len(log.times) - before)
            return counts

        try:
            seen = await asyncio.gather(*(one() for _ in range(users)))
        except (TimeoutError, aiohttp.ClientError) as error:
            raise BenchError(f"no answer while calibrating ({type(error).__name__})") from error
        counts = tuple(max(step) for step in zip(*seen, strict=True))
        if any(tuple(c) != counts for c in seen):
            print(f"  note: answers differ in length between users: {seen}", file=sys.stderr)
        return counts

    async def closed_loop(self, target: Target, counts: tuple[int, ...], users: int,
                          duration: float, ramp: float) -> Phase:
        """``users`` users at once, each starting a new quiz as soon as one ends."""
        phase = Phase(started=time.monotonic())
        deadline = phase.started + duration

        async def slot() -> None:
            while time.monotonic() < deadline:
                if not await self.user(target, counts, phase, deadline):
                    await asyncio.sleep(0.5)

        await asyncio.gather(*(slot() for _ in range(users)))
        counted = [r for r in phase.records if phase.started + ramp <= r[1] < deadline]
        phase.records = counted
        phase.seconds = duration - ramp
        return phase

    async def open_loop(self, target: Target, counts: tuple[int, ...], rate: float,
                        duration: float, max_users: int) -> Phase:
        """New users at a fixed pace, so that updates arrive at ``rate`` per second."""
        phase = Phase(started=time.monotonic())
        interval = len(STEPS) / rate
        tasks: set[asyncio.Task[bool]] = set()
        for n in itertools.count():
            at = phase.started + n * interval
            if at >= phase.started + duration:
                break
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            if len(tasks) >= max_users:
                phase.dropped += 1
                continue
            task = asyncio.create_task(self.user(target, counts, phase))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        phase.seconds = time.monotonic() - phase.started
        return phase


# ---- the setups -----------------------------------------------------------------------------


def platform_env(database_url: str, port: int, fake_url: str, redis_url: str | None,
                 extra: list[str]) -> dict[str, str]:
    """The platform's settings: one Telegram bot on the fake, limits out of the way
    (the fake does not rate-limit here; the limiter would only cap the benchmark)."""
    bot = {"id": BOT_ID, "channel": "telegram", "token": TOKEN, "secret": SECRET,
           "api_base": fake_url, "messages_per_second": 100000,
           "per_chat_per_second": 100000}
    env = {**clean_env(), "BOTP_DATABASE_URL": database_url, "BOTP_BOTS": json.dumps([bot]),
           "BOTP_FLOWS_DIR": str(ROOT / "flows"), "BOTP_LOCALES_DIR": str(ROOT / "locales"),
           "BOTP_HOST": "127.0.0.1", "BOTP_PORT": str(port), "BOTP_LOG_LEVEL": "WARNING",
           # A public URL means webhooks (setWebhook goes to the fake), not long polling.
           "BOTP_PUBLIC_URL": f"http://127.0.0.1:{port}"}
    if redis_url:
        env["BOTP_REDIS_URL"] = redis_url
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return env


async def flush_redis(url: str) -> None:
    import redis.asyncio as redis

    client = redis.Redis.from_url(url)
    try:
        await client.flushdb()
    finally:
        await client.aclose()


async def wait_ready(http: aiohttp.ClientSession, url: str, children: list[Child]) -> None:
    """Until ``url`` answers 200; a child that exits meanwhile fails the setup."""
    for _ in range(300):
        for child in children:
            if child.popen.poll() is not None:
                raise BenchError(f"{child.name} exited with {child.popen.returncode}:\n"
                                 f"{child.tail()}")
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
                if response.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise BenchError(f"{url} not ready after a minute")


async def fake_stats(http: aiohttp.ClientSession, fake_url: str) -> Counter[str]:
    async with http.get(f"{fake_url}/bench/stats") as response:
        return Counter(await response.json())


def platform_command(args: argparse.Namespace, name: str, *argv: str) -> list[str]:
    """``botp ARGV``, under cProfile with ``--profile``."""
    botp = str(Path(sys.executable).with_name("botp"))
    if not args.profile:
        return [botp, *argv]
    folder = Path(args.profile).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "cProfile", "-o", str(folder / f"{name}.prof"), botp, *argv]


async def start_platform(setup: str, args: argparse.Namespace, fake_url: str, port: int,
                         folder: Path, children: list[Child]) -> str | None:
    """Migrate and start ``botp run`` (SQLite) or ``botp web`` + 2 workers (PostgreSQL and
    Redis: ``postgres`` with ``args.web_processes`` web processes (1 when not given),
    ``postgres-1`` with one); returns the database URL (None: PostgreSQL is not
    reachable)."""
    if setup == "sqlite":
        database_url: str | None = f"sqlite+aiosqlite:///{folder}/botp.sqlite3"
        redis_url = None
    else:
        database_url = await postgres_database()
        if database_url is None:
            return None
        redis_url = f"{REDIS_BASE}/{args.redis_db}"
        await flush_redis(redis_url)
    env = platform_env(database_url, port, fake_url, redis_url, args.platform_env)
    botp = str(Path(sys.executable).with_name("botp"))
    try:
        migrate = await asyncio.to_thread(subprocess.run, [botp, "migrate"], env=env,
                                          cwd=folder, capture_output=True, check=False)
        if migrate.returncode:
            raise BenchError(f"botp migrate failed: {migrate.stderr.decode()[-2000:]}")
        if setup == "sqlite":
            children.append(spawn("sqlite-run", platform_command(args, "sqlite-run", "run"),
                                  env, folder))
        else:
            processes = getattr(args, "web_processes", 1) if setup == "postgres" else 1
            children.append(spawn("postgres-web", platform_command(
                args, "postgres-web", "web", "--processes", str(processes)), env, folder))
            for n in (1, 2):
                name = f"postgres-worker{n}"
                children.append(spawn(name, platform_command(args, name, "worker"), env,
                                      folder))
    except BaseException:
        if setup != "sqlite":
            await drop_postgres(database_url)
        raise
    return database_url


async def start_aiogram(setup: str, args: argparse.Namespace, fake_url: str, port: int,
                        folder: Path, children: list[Child]) -> None:
    storage = "memory"
    if setup == "aiogram-redis":
        storage = f"{REDIS_BASE}/{args.redis_db + 1}"
        await flush_redis(storage)
    children.append(spawn(setup, [
        sys.executable, str(ROOT / "bench" / "aiogram_quiz_bot.py"), "--port", str(port),
        "--api-base", fake_url, "--token", TOKEN, "--secret", SECRET, "--storage", storage,
        *(["--background"] if args.aiogram_background else [])], clean_env(), folder))


def log_problems(children: list[Child]) -> dict[str, int]:
    """Error lines in the children's logs; such logs are kept in bench/results/."""
    found = {}
    for child in children:
        text = child.tail(1_000_000)
        count = sum(1 for line in text.splitlines() if "Traceback" in line or " ERROR " in line)
        if count:
            found[child.name] = count
            kept = ROOT / "bench" / "results" / "inbound-logs" / child.log.name
            kept.parent.mkdir(parents=True, exist_ok=True)
            kept.write_text(text)
            print(f"  {child.name}: {count} error line(s), log kept in {kept}",
                  file=sys.stderr)
    return found


async def run_setup(setup: str, args: argparse.Namespace, http: aiohttp.ClientSession,
                    generator: LoadGenerator, fake: Child, folder: Path) -> dict[str, Any]:
    """Start the setup's processes, calibrate, measure max throughput then latency at half
    of it, and stop them (whatever happens)."""
    children: list[Child] = []
    database_url: str | None = None
    port = free_port()
    label = LABELS[setup].replace("xN", f"x{args.web_processes}")
    result: dict[str, Any] = {"setup": setup, "label": label}
    try:
        if setup in PLATFORM:
            database_url = await start_platform(setup, args, generator.fake_url, port, folder,
                                                children)
            if database_url is None:
                return {**result, "skipped": "PostgreSQL not reachable"}
            target = Target(f"http://127.0.0.1:{port}/webhooks/telegram/{BOT_ID}")
        else:
            await start_aiogram(setup, args, generator.fake_url, port, folder, children)
            target = Target(f"http://127.0.0.1:{port}/webhook")
        await wait_ready(http, f"http://127.0.0.1:{port}/healthz", children)

        counts = await generator.calibrate(target)
        await generator.quiet()
        methods_before = await fake_stats(http, generator.fake_url)
        watched = [*children, fake]
        cpu_before = [c.cpu_seconds() for c in watched]
        self_before = time.process_time()
        started = time.monotonic()
        closed = await generator.closed_loop(target, counts, args.users, args.duration,
                                             args.ramp)
        wall = time.monotonic() - started
        cpu = {c.name: round(100 * (c.cpu_seconds() - before) / wall, 1)
               for c, before in zip(watched, cpu_before, strict=True)}
        cpu["load-generator"] = round(100 * (time.process_time() - self_before) / wall, 1)
        methods = await fake_stats(http, generator.fake_url)
        methods.subtract(methods_before)
        rate = len(closed.records) / closed.seconds if closed.seconds else 0.0

        await generator.quiet()
        half = Phase()
        if rate > 0:
            half = await generator.open_loop(target, counts, rate / 2, args.latency_duration,
                                             args.max_open_users)
        await generator.quiet()
        for child in children:
            if child.popen.poll() is not None:
                raise BenchError(f"{child.name} died during the run:\n{child.tail()}")
        busy = sum(cpu[c.name] for c in children) / 100  # cores the bot's processes used
        result.update({
            "answers_per_step": list(counts), "users": args.users, "updates_per_s": rate,
            # Less sensitive to other work on a shared machine than updates/s (the
            # database and Redis servers' own CPU is not counted).
            "updates_per_cpu_s": rate / busy if busy else None,
            "max_load": closed.summary(),
            "half_load": {"offered_per_s": rate / 2,
                          "achieved_per_s": len(half.records) / args.latency_duration,
                          **half.summary()},
            "cpu_percent": cpu,
            "bot_api_calls_per_s": {k: round(v / wall, 1) for k, v in methods.items() if v},
            "peak_rss_mb": {c.name: c.peak_rss_mb() for c in children},
        })
        return result
    finally:
        stop(children)
        result["log_errors"] = log_problems(children)
        if database_url and setup != "sqlite":
            await drop_postgres(database_url)


def print_table(results: list[dict[str, Any]]) -> None:
    base = next((r["updates_per_s"] for r in results
                 if r.get("setup") == "aiogram-memory" and r.get("updates_per_s")), None)
    header = (f"{'setup':<38} {'updates/s':>9} {'vs aiogram':>10} {'per CPU-s':>9} "
              f"{'@ half/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} {'peak RSS MB':>11}")
    print(header)
    print("-" * len(header))
    for r in results:
        if "skipped" in r:
            print(f"{r.get('label', LABELS[r['setup']]):<38} skipped: {r['skipped']}")
            continue
        half = r["half_load"]
        ratio = f"{r['updates_per_s'] / base:.2f}" if base and r["setup"] in PLATFORM else ""
        errors = sum(r["max_load"]["errors"].values()) + sum(half["errors"].values())
        rss = "+".join(f"{v:.0f}" for v in r["peak_rss_mb"].values() if v is not None)
        p50 = f"{half['p50_ms']:.1f}" if half["p50_ms"] is not None else "-"
        p99 = f"{half['p99_ms']:.1f}" if half["p99_ms"] is not None else "-"
        per_cpu = f"{r['updates_per_cpu_s']:.0f}" if r["updates_per_cpu_s"] else "-"
        print(f"{r['label']:<38} {r['updates_per_s']:>9.0f} {ratio:>10} {per_cpu:>9} "
              f"{half['achieved_per_s']:>8.0f} {p50:>7} {p99:>7} {errors:>6} {rss:>11}")
    print()
    for r in results:
        if "skipped" not in r and r["max_load"]["updates"]:
            print(f"{r['setup']}: CPU % of one core at max load {r['cpu_percent']}; "
                  f"p50/p99 at max load {r['max_load']['p50_ms']:.0f}/"
                  f"{r['max_load']['p99_ms']:.0f} ms")


async def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=160,
                        help="users at once in the throughput run")
    parser.add_argument("--duration", type=float, default=25.0,
                        help="seconds of the throughput run")
    parser.add_argument("--ramp", type=float, default=5.0,
                        help="first seconds of the throughput run that are not counted")
    parser.add_argument("--latency-duration", type=float, default=20.0,
                        help="seconds of the half-load latency run")
    parser.add_argument("--max-open-users", type=int, default=1000,
                        help="users in flight at most in the latency run (beyond: dropped)")
    parser.add_argument("--step-timeout", type=float, default=30.0,
                        help="seconds to wait for an answer before giving a user up")
    parser.add_argument("--web-processes", type=int, default=WEB_PROCESSES,
                        help="botp web --processes N in the postgres setup")
    parser.add_argument("--only", default=",".join(SETUPS),
                        help=f"comma-separated setups among {', '.join(SETUPS)}")
    parser.add_argument("--redis-db", type=int, default=12,
                        help="Redis database for the platform (this + 1: aiogram); flushed")
    parser.add_argument("--aiogram-background", action="store_true",
                        help="aiogram answers 200 first and handles the update afterwards")
    parser.add_argument("--platform-env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for the platform (e.g. BOTP_WORKER__...)")
    parser.add_argument("--profile", metavar="DIR",
                        help="run the platform's processes under cProfile, into DIR/*.prof")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "inbound.json"))
    args = parser.parse_args()
    setups = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(setups) - set(SETUPS)
    if unknown:
        parser.error(f"unknown setups: {', '.join(sorted(unknown))}")

    began = time.monotonic()
    load_before = os.getloadavg()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="botp-inbound-") as name:
        folder = Path(name)
        fake = spawn("fake-telegram", [sys.executable, __file__, "--serve-fake"],
                     {**clean_env(), "PYTHONPATH": str(ROOT)}, folder, stdout=subprocess.PIPE)
        listener: asyncio.Task[None] | None = None
        # Idle connections are dropped before uvicorn's 5 s keep-alive ends, or a POST may
        # go out on a connection the server is closing (ServerDisconnectedError).
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=2.0)
        async with aiohttp.ClientSession(connector=connector) as http:
            try:
                assert fake.popen.stdout is not None
                line = await asyncio.wait_for(asyncio.to_thread(fake.popen.stdout.readline),
                                              timeout=30)
                fake_url = line.decode().strip()
                if not fake_url.startswith("http"):
                    raise BenchError(f"the fake did not start:\n{fake.tail()}")
                generator = LoadGenerator(http, fake_url, args.step_timeout)
                ready = asyncio.Event()
                listener = asyncio.create_task(generator.listen(ready))
                await asyncio.wait_for(ready.wait(), timeout=10)
                for setup in setups:
                    if listener.done():
                        raise BenchError("the fake's stream of sends ended")
                    print(f"{LABELS[setup]} ... ({time.monotonic() - began:.0f} s in)",
                          file=sys.stderr, flush=True)
                    try:
                        result = await run_setup(setup, args, http, generator, fake, folder)
                    except BenchError as error:
                        print(f"  failed: {error}", file=sys.stderr)
                        result = {"setup": setup, "skipped": f"failed: {str(error)[:200]}"}
                    results.append(result)
                    if "skipped" not in result:
                        half = result["half_load"]
                        print(f"  {result['updates_per_s']:.0f} updates/s; at half load p50 "
                              f"{half['p50_ms'] or 0:.1f} ms, p99 {half['p99_ms'] or 0:.1f} ms",
                              file=sys.stderr)
                fake_rss = fake.peak_rss_mb()
            finally:
                if listener is not None:
                    listener.cancel()
                    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                        await listener
                stop([fake])

    print_table(results)
    seconds = time.monotonic() - began
    print(f"{args.users} users at once for {args.duration:.0f} s (first {args.ramp:.0f} s not "
          f"counted), then users paced to half that rate for {args.latency_duration:.0f} s; "
          f"a user = /start, 'quiz', 2 buttons, an age; latency = POST start -> first "
          f"answer at the fake Bot API; per CPU-s = updates/s / cores used by the bot's "
          f"own processes at max load (not the database's). Fake peak RSS "
          f"{fake_rss or 0:.0f} MB. Took {seconds:.0f} s. Load average before: "
          f"{load_before[0]:.2f} (other work on this machine skews every figure).")
    return {"path": args.json, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": os.uname().nodename, "cpus": os.cpu_count(),
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "seconds": round(seconds, 1), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(), "fake_peak_rss_mb": fake_rss,
            "results": results}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--serve-fake"]:
        serve_fake(float(sys.argv[2]) if len(sys.argv) > 2 else None)
    else:
        # SIGTERM unwinds like Ctrl-C, so the finally blocks stop the child processes.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        write_report(asyncio.run(main()))
