"""Driving the engine without a messenger: a console ``Chat`` through the whole pipeline,
a prize wheel that always stops at the same place, and a flow that waits for shop events."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from typing import Any

from bot_platform.types import Profile


class Chat:
    """Drive one console user through the pipeline and read what the bot said."""

    def __init__(self, platform: Any, user: str = "u1", profile: Profile | None = None) -> None:
        self.platform = platform
        self.console = platform.channel("console", "console")
        self.user = user
        self.profile = profile or Profile(first_name="Alex")
        self.seen = 0

    async def say(self, line: str) -> list:
        await self.platform.engine.handle(self.console.inbound(self.user, line, self.profile))
        await self.platform.drain()
        return self.new()

    async def wait(self, delta: timedelta) -> list:
        self.platform.clock.advance(delta)
        await self.platform.drain()
        return self.new()

    def new(self) -> list:
        mine = [m for user, m in self.console.sent if user == self.user]
        fresh, self.seen = mine[self.seen:], len(mine)
        return fresh


class LowestPoint:
    """A wheel that always stops at its first sector (the first prize in stock)."""

    def uniform(self, low: float, high: float) -> float:
        return low


# A shop's cart: an abandoned one is reminded after an hour, an order cancels the reminder.
# A flow that appends every typed text to the attribute ``log``: the result shows the
# order in which a subscriber's events were applied.
ECHO_FLOW = textwrap.dedent("""
        flow: echo
        triggers: [{on: start}]
        start: listen
        states:
          listen:
            capture: {attribute: last, type: text, retry: common-fallback, goto: append}
          append:
            actions:
              - set: {log: "{log},{last}"}
            goto: listen
""")


def echo_flows(folder: Any) -> Any:
    """A flows folder under ``folder`` holding only ``ECHO_FLOW``."""
    flows = folder / "flows"
    flows.mkdir()
    (flows / "echo.yaml").write_text(ECHO_FLOW)
    return flows


CART_FLOW = textwrap.dedent("""
    flow: cart
    triggers: [{on: event, event: cart_updated}]
    start: waiting
    states:
      waiting:
        after: {delay: 1h, goto: remind}
        on_event: {order_placed: done}
      remind:
        say: welcome-tip
        end: true
      done:
        end: true
""")
