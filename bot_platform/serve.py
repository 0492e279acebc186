"""Serving: what ``botp run``, ``botp web`` and ``botp worker`` do once the command line
has read its arguments.

    sock = listen(host, port)         # the web port, taken before anything starts
    platform.start()                  # flows validated, channels built (or refuse)
    uvicorn(create_app(platform))     # lifespan: serving(...) runs the bots and worker
    platform.close()                  # whoever started the platform closes it

``serving`` is the one place the pieces a process runs are started and stopped: every
bot checked (and, in a web process, polled or given its webhook, bots registered anywhere
followed), and the worker (or, in ``botp web`` on PostgreSQL, the sender of the web's own
turns' replies: ``own_replies``). The web app and the worker's metrics app run it as their
lifespan; a worker without a metrics port runs it around a wait for the stop signal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any

import uvicorn

from bot_platform.config import Settings
from bot_platform.platform import Platform

FULL_COLLECTION_EVERY = 100  # middle-generation collections (CPython's default: 10)
log = logging.getLogger("botp")


class Server(uvicorn.Server):
    """uvicorn, minus its signal handling: ours stops the worker and closes the platform
    before the process exits (uvicorn would re-raise the signal first)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class PortInUse(Exception):
    """The web port cannot be had: said before anything claims to be serving."""


def listen(host: str, port: int) -> socket.socket:
    """The web socket, bound before the platform starts: a second ``botp run`` on the same
    port fails at once with a clear message instead of saying "serving" first."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise PortInUse(
            f"cannot listen on {host}:{port}: {error.strerror or error}. Is another botp "
            f"(or another server) running there? Stop it, or choose another port: "
            f"BOTP_PORT={port + 1} (and BOTP_HOST for the address)") from None
    sock.set_inheritable(True)
    return sock


@contextlib.asynccontextmanager
async def serving(platform: Platform, *, receive: bool, worker: bool) -> AsyncIterator[None]:
    """Run the platform's pieces for as long as the block (an app's lifespan) lasts:
    the bots (checked; with ``receive``, polled or given their webhook) and, with
    ``worker``, the worker, which stops taking work when ``platform.stopping`` is set.
    On the way out sends in flight finish and are recorded (cut off, they would wait for
    their lease to expire and go out again if the messenger had already taken them)."""
    tasks = [asyncio.create_task(platform.serve_bots(receive=receive and platform.registers_bots),
                                 name="bots")]
    grace = platform.settings.worker.shutdown_grace
    senders = []
    if worker:
        senders.append(asyncio.create_task(platform.worker.run(platform.stopping, grace=grace),
                                           name="worker"))
    elif receive and not platform.db.is_sqlite:  # ``botp web``: its own turns' replies
        senders.append(asyncio.create_task(platform.replies.run(platform.stopping, grace),
                                           name="own replies"))
    try:
        yield
    finally:
        platform.stopping.set()
        for task in tasks:  # pollers
            task.cancel()
        if senders:
            await asyncio.wait(senders, timeout=grace)
            for task in senders:
                task.cancel()
            tasks.extend(senders)
        await asyncio.gather(*tasks, return_exceptions=True)


def _server(app: Any, settings: Settings, port: int, log_level: str) -> Server:
    from bot_platform.logs import uvicorn_log_config

    return Server(uvicorn.Config(app, host=settings.host, port=port, log_level=log_level,
                                 lifespan="on",
                                 log_config=uvicorn_log_config(settings.log_format)))


async def serve(settings: Settings, *, web: bool, worker: bool,
                sock: socket.socket | None = None, registers_bots: bool = True) -> None:
    """One process until SIGINT or SIGTERM: the web app (webhooks, admin API) and/or the
    worker. A taken port (``PortInUse``) or invalid flows (``FlowValidationError``) are
    raised before anything claims to be serving. ``sock``: the web socket, already
    bound (``web_processes``: shared by several processes, only the first of which
    ``registers_bots``)."""
    if web and sock is None:
        sock = listen(settings.host, settings.port)
    platform = Platform(settings)
    platform.registers_bots = registers_bots
    server: Server | None = None

    def shutdown() -> None:
        platform.stopping.set()  # the worker stops; open live streams end
        if server is not None:
            server.should_exit = True

    try:
        await platform.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, shutdown)
        if web:
            from bot_platform.app import create_app

            server = _server(create_app(platform, worker=worker), settings, settings.port,
                             settings.log_level.lower())
        elif settings.metrics_port:  # a worker: its send counters, for Prometheus
            # The web framework is imported by the processes that serve HTTP only.
            from bot_platform.app import create_metrics_app

            server = _server(create_metrics_app(platform), settings, settings.metrics_port,
                             "warning")
        _keep_out_of_the_collector()
        if server is None:
            async with serving(platform, receive=False, worker=True):
                await platform.stopping.wait()
            return
        server.should_exit = platform.stopping.is_set()
        if web:
            log.info("serving on http://%s:%s (pid %d)", settings.host, settings.port,
                     os.getpid())
            await server.serve(sockets=[sock])  # returns once shutdown() asked it to
        else:
            await server.serve()
    finally:
        await platform.close()
        if sock is not None:
            sock.close()


def _keep_out_of_the_collector() -> None:
    """Full garbage collections stall the event loop, and the live replies waiting on it:
    on the project's machine one costs ~0.8 us per tracked object and, with the default
    thresholds, one ran every ~2 s during a broadcast, each 40-100 ms long.

    What start-up built (modules, schemas, compiled flows, the web app) lives as long as
    the process: frozen, a full collection no longer walks it. And a full collection
    waits for 100 middle-generation collections instead of 10: a broadcast's sends in
    flight survive the younger generations and are freed by reference counting soon
    after, so they are no reason to walk the whole heap ten times as often."""
    gc.collect()
    gc.freeze()
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Serve on uvloop where it is installed (a faster event loop, and uvicorn then parses
    HTTP with httptools); the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
