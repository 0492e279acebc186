"""``botp chat``: this terminal is one user of the console channel (``bots/console.py``),
talking to the engine in process, beside any ``botp run`` on the same database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bot_platform.config import Settings

log = logging.getLogger(__name__)

CHAT_HELP = """Type messages as a customer would. Commands:
  /start [ref]   start the bot (optionally with a deep-link ref, e.g. /start promo-spring)
  1, 2, ...      press a button of the last message
  /phone NUMBER  share a phone number
  /wait 1d       let time pass for you (1d, 3h, 30m...): your timers fire now
  /help          this text          /quit   leave
Only your messages show here: those of other chats wait for their own terminal."""
CHAT_POLL_SECONDS = 1.0  # how often messages that arrive while you type are shown


async def _read_line() -> str:
    return await asyncio.to_thread(input, "you> ")


async def chat(settings: Settings, user: str, name: str | None, language: str | None,
                read_line: Callable[[], Awaitable[str]] = _read_line) -> None:
    """The chat loop: this process is the terminal of ``user`` (see bots/console.py). It
    shows only that user's messages, and ``/wait`` moves only that user's timers: the
    clock stays real for every row it writes, so nothing another process reads is dated
    in the future."""
    from bot_platform.flows.base import parse_duration
    from bot_platform.platform import Platform
    from bot_platform.types import Profile
    from bots.console import ConsoleChannel, attach_terminal, fast_forward

    console = ConsoleChannel("console", terminal_user=user)
    platform = Platform(settings, channel_overrides={("console", "console"): console})
    await platform.start()
    await attach_terminal(platform.kv, console.bot_id, user)
    profile = Profile(first_name=name, language=language)
    print(CHAT_HELP, "\n", flush=True)
    lock = asyncio.Lock()  # one drain at a time: the loop's and the background one

    async def drain() -> None:
        async with lock:
            await platform.drain()

    async def keep_showing() -> None:
        """What arrives while the user types (an agent's answer, a timer another process
        fired) shows up without waiting for the next line."""
        while True:
            await asyncio.sleep(CHAT_POLL_SECONDS)
            try:
                await drain()
            except Exception:  # the next round tries again; the loop must not die
                log.exception("console: delivery round failed")

    background = asyncio.create_task(keep_showing())
    try:
        await drain()
        while True:
            try:
                line = (await read_line()).strip()
            except EOFError:
                break
            if not line:
                continue
            if line in ("/quit", "/exit"):
                break
            if line == "/help":
                print(CHAT_HELP, flush=True)
                continue
            if line.startswith("/wait"):
                try:
                    delta = parse_duration(line.removeprefix("/wait").strip() or "1d")
                except ValueError as error:
                    print(error, flush=True)
                    continue
                await fast_forward(platform.db, platform.clock, console.bot_id, user, delta)
                print(f"... {delta} later (for {user} only: their timers moved forward)",
                      flush=True)
            else:
                await platform.engine.handle(console.inbound(user, line, profile))
            await drain()
    finally:
        async with lock:  # never cancelled halfway through a delivery
            background.cancel()
        await asyncio.gather(background, return_exceptions=True)
        await platform.close()
