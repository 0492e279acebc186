"""The test platform and process helpers every test module shares: the repository root,
settings for a test database, a platform with an in-process HTTP client, a killable
``botp worker`` and polling for a condition."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bot_platform.config import BotConfig, Settings, WorkerSettings
from bot_platform.platform import Platform

ROOT = Path(__file__).resolve().parents[2]


class TestPlatform(Platform):
    """A platform with test conveniences."""

    __test__ = False
    _test_app: Any = None

    def http_client(self) -> httpx.AsyncClient:
        """An HTTP client talking to the ASGI app in-process. The app is built once per
        platform, as a served process does: building it takes 0.2 s, and tests post
        hundreds of webhooks."""
        if self._test_app is None:
            self._test_app = self.app()
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self._test_app),
                                 base_url="http://testserver")


class WorkerProcess:
    """``botp worker`` (or another ``command``) in a child process, killable with
    SIGKILL. Its log goes to ``log`` when given (appended across restarts)."""

    def __init__(self, env: dict[str, str], log: Path | None = None,
                 command: str = "worker") -> None:
        self.env = env
        self.log = log
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        output = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bot_platform.cli", self.command], cwd=ROOT, env=self.env,
            stdout=output, stderr=output)
        if self.log:
            output.close()  # type: ignore[union-attr]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM (a graceful stop); returns the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()


async def answers_health(http: Any, base: str) -> bool:
    """Whether a served web process at ``base`` answers ``GET /healthz`` with 200 (an
    ``aiohttp.ClientSession`` asks; a refused connection is a no)."""
    import aiohttp

    try:
        async with http.get(f"{base}/healthz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def wait_for(predicate, limit: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def make_settings(database_url: str, bots: list[BotConfig] | None = None,
                  **overrides: Any) -> Settings:
    worker = overrides.pop("worker", None) or WorkerSettings(
        poll_interval=0.05, lease_seconds=30, backoff_base=1.0, max_attempts=5)
    values: dict[str, Any] = {
        "database_url": database_url, "bots": bots or [], "flows_dir": ROOT / "flows",
        "locales_dir": ROOT / "locales", "worker": worker, **overrides}
    return Settings(_env_file=None, **values)
