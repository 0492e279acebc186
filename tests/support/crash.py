"""A platform in this process plus a real ``botp worker`` to kill, on one SQLite file with
one flow and the console bot sending to a relay fake: what the crash tests share."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from bot_platform.clock import SystemClock
from bot_platform.migrations import upgrade
from tests.fakes.relay import FakeRelayServer
from tests.support.platform import ROOT, TestPlatform, WorkerProcess, make_settings


@dataclass
class CrashRun:
    platform: TestPlatform
    relay: FakeRelayServer
    worker: WorkerProcess
    url: str


@asynccontextmanager
async def crash_run(tmp_path: Path, flow_yaml: str) -> AsyncIterator[CrashRun]:
    """``flow_yaml`` as ``flows/crash.yaml``; leases of 2 s so a kill is noticed quickly."""
    relay = await FakeRelayServer().start()
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "crash.yaml").write_text(flow_yaml)
    url = f"sqlite+aiosqlite:///{tmp_path}/crash.sqlite3"
    await asyncio.to_thread(upgrade, url)
    bots = [{"id": "console", "channel": "console", "api_base": relay.url}]
    env = {**os.environ, "BOTP_DATABASE_URL": url, "BOTP_FLOWS_DIR": str(flows),
           "BOTP_LOCALES_DIR": str(ROOT / "locales"), "BOTP_BOTS": json.dumps(bots),
           "BOTP_WORKER__LEASE_SECONDS": "2", "BOTP_WORKER__POLL_INTERVAL": "0.1",
           "BOTP_LOG_LEVEL": "WARNING"}
    platform = TestPlatform(make_settings(url, flows_dir=flows), clock=SystemClock())
    await platform.start()
    worker = WorkerProcess(env)
    try:
        yield CrashRun(platform, relay, worker, url)
    finally:
        worker.stop()
        await platform.close()
        await relay.close()
