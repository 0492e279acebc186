"""The apps' lifespan runs what a process serves (``bot_platform.serve.serving``): the
web app of ``botp run`` delivers through its own worker while it lives and stops it on the
way out; driven in-process without a lifespan (the tests' way), it runs nothing itself."""

from __future__ import annotations

import httpx

from bot_platform.app import create_app
from tests.support.platform import wait_for
from tests.test_cli_and_web import CONSOLE_AUTH, CONSOLE_SECRET

START = {"user_id": "w1", "text": "/start", "event_id": "evt-1", "first_name": "Kim"}


async def test_the_run_apps_lifespan_runs_the_worker_and_stops_it(make_platform) -> None:
    platform = await make_platform(console_secret=CONSOLE_SECRET)
    console = platform.channel("console", "console")
    app = create_app(platform, worker=True)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://testserver") as client:
            response = await client.post("/webhooks/console/console", json=START,
                                         headers=CONSOLE_AUTH)
        assert response.status_code == 200

        async def delivered() -> bool:
            return bool(console.sent)

        await wait_for(delivered, what="the lifespan's worker to deliver the greeting")
        assert not platform.stopping.is_set()
    assert platform.stopping.is_set()  # the worker and the bots' runners were told to stop
    assert platform.registry.runners == {}


async def test_without_a_lifespan_the_app_runs_no_worker(make_platform) -> None:
    platform = await make_platform(console_secret=CONSOLE_SECRET)
    async with platform.http_client() as client:
        response = await client.post("/webhooks/console/console", json=START,
                                     headers=CONSOLE_AUTH)
    assert response.status_code == 200
    assert platform.channel("console", "console").sent == []  # queued, for drain()
    await platform.drain()
    assert [user for user, _ in platform.channel("console", "console").sent] == ["w1"]
