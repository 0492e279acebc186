"""``botp chat`` must not mislead (issue 14, item 10): numbers press buttons of the last
message only; ``/wait`` moves only the console user's own timers (no row is dated in the
future, support figures stay sane); each process shows only its own console user's
messages, and a ``botp run`` worker prints none. The chat loop runs in-process
(``terminal.chat`` with scripted lines) on one database with a server platform beside it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from bot_platform import terminal
from bot_platform.apikeys import create_key
from bot_platform.clock import SystemClock
from bot_platform.models import Answer, Conversation, FlowState, Job, Message, Subscriber
from bot_platform.types import Button, Outgoing
from tests.support.platform import make_settings


def script(*lines: str) -> Callable[[], Awaitable[str]]:
    """A terminal typing ``lines``, then end of input."""
    pending = list(lines)

    async def read_line() -> str:
        if not pending:
            raise EOFError
        return pending.pop(0)

    return read_line


async def chat(url: str, user: str, *lines: str) -> None:
    await terminal.chat(make_settings(url), user, "Alex", "en", read_line=script(*lines))


async def server(make_platform, url: str) -> Any:
    """A ``botp run`` on the same database (its console channel is the configured one)."""
    return await make_platform(database_url=url, clock=SystemClock())


async def answers_of(platform, user: str) -> list[tuple[str, str]]:
    async with platform.db.session() as session:
        rows = await session.execute(select(Answer.question, Answer.value).join(
            Subscriber, Subscriber.id == Answer.subscriber_id).where(
            Subscriber.user_id == user).order_by(Answer.id))
        return [tuple(row) for row in rows.all()]


async def test_a_number_at_a_free_text_question_is_an_answer_not_an_old_button(
        make_platform, db_url, capsys) -> None:
    platform = await server(make_platform, db_url)  # creates the schema
    # The quiz: dry (1), redness (3), then the age question, which has no buttons: "3"
    # is an age (too young, asked again), not the third button of the question before.
    await chat(db_url, "alice", "quiz", "1", "3", "3", "29")
    out = capsys.readouterr().out
    assert out.count("How old are you?") == 1
    assert "Please send your age as a number" in out
    assert await answers_of(platform, "alice") == [
        ("skin_type", "dry"), ("concern", "sensitivity"), ("age", "29")]

    # The welcome email capture: "1" is a (bad) email, not "Show me a tip" of the greeting.
    await chat(db_url, "bea", "/start", "2", "1")
    out = capsys.readouterr().out
    assert "What is your email address?" in out
    assert "That does not look like an email address." in out
    assert "Tip: a gentle cleanser" not in out
    async with platform.db.session() as session:
        state = await session.scalar(select(FlowState.state).join(
            Subscriber, Subscriber.id == FlowState.subscriber_id).where(
            Subscriber.user_id == "bea", FlowState.flow == "welcome"))
    assert state == "ask_email"


async def test_wait_moves_only_the_console_users_own_time(make_platform, db_url,
                                                           capsys) -> None:
    web = await server(make_platform, db_url)
    # Another customer's timer (a console user of the HTTP webhook, say) is due in a day.
    await web.engine.handle(web.channel("console", "console").inbound("other", "/start"))
    await chat(db_url, "alice", "/start", "/wait 3d", "operator")
    out = capsys.readouterr().out
    # alice's chain went on three days (tip, then the offer two days after it is not due).
    assert "Tip of the day" in out
    assert "Thanks! A member of our team will answer you here soon." in out

    now = datetime.now(UTC)
    async with web.db.session() as session:
        stamps = [*(await session.scalars(select(Conversation.created_at))).all(),
                  *(await session.scalars(select(Message.created_at))).all(),
                  *(await session.scalars(select(Subscriber.created_at))).all(),
                  *(await session.scalars(select(FlowState.updated_at))).all()]
        other = await session.scalar(select(Subscriber.id).where(Subscriber.user_id == "other"))
        other_due = (await session.scalars(select(Job.due_at).where(
            Job.subscriber_id == other, Job.status == "pending"))).all()
    assert stamps and max(stamps) <= now  # nothing is dated in the future
    assert other_due and min(other_due) > now  # the other customer's day did not pass

    # An agent answers alice's chat from the web process: the reply time is positive.
    _, key = await create_key(web.db, name="ann", role="agent", now=web.clock.now())
    headers = {"Authorization": f"Bearer {key}"}
    async with web.http_client() as client:
        [waiting] = (await client.get("/api/conversations", headers=headers)).json()
        path = f"/api/conversations/{waiting['id']}"
        assert (await client.post(f"{path}/claim", headers=headers)).status_code < 300
        assert (await client.post(f"{path}/messages", headers=headers,
                                  json={"text": "Hello!"})).status_code < 300
        [row] = (await client.get("/api/stats/support", headers=headers)).json()
    assert row["avg_first_reply_seconds"] >= 0


async def test_each_process_shows_only_its_own_console_users_messages(
        make_platform, db_url, capsys) -> None:
    run = await server(make_platform, db_url)
    await chat(db_url, "alice", "/start")
    assert "bot> Hi Alex! Welcome" in capsys.readouterr().out

    # While alice's terminal is closed, the server handles a message of hers (an agent's
    # reply or a timer would do the same) and one of a webhook console user, bob.
    console = run.channel("console", "console")
    await run.engine.handle(console.inbound("alice", "quiz"))
    await run.engine.handle(console.inbound("bob", "/start"))
    await run.drain()
    # The server delivered bob's greeting without printing it, and left alice's question.
    assert [user for user, _ in console.sent] == ["bob"]
    assert "bot>" not in capsys.readouterr().out

    # Another terminal (carol) shows only carol's messages; alice's still wait.
    await chat(db_url, "carol", "/start")
    out = capsys.readouterr().out
    assert out.count("bot> Hi Alex! Welcome") == 1 and "find your routine" not in out

    # alice's terminal shows hers when it runs again, and her "1" presses its first button.
    await chat(db_url, "alice", "1")
    out = capsys.readouterr().out
    assert "bot> Let's find your routine." in out
    assert "What bothers you most?" in out
    assert await answers_of(run, "alice") == [("skin_type", "dry")]


async def test_messages_that_arrive_while_the_user_types_are_shown(make_platform, db_url,
                                                                   capsys) -> None:
    """An answer produced by another process (here the server handles alice's message, as
    an agent's reply or a timer would) shows up in alice's terminal without a new line."""
    from bot_platform.models import Outbox

    run = await server(make_platform, db_url)
    typed = 0

    async def read_line() -> str:
        nonlocal typed
        typed += 1
        if typed == 1:
            return "/start"
        if typed == 2:
            await run.engine.handle(run.channel("console", "console").inbound("alice", "quiz"))
            for _ in range(200):  # the terminal's background round delivers it
                async with run.db.session() as session:
                    waiting = await session.scalar(select(Outbox.id).where(
                        Outbox.recipient == "alice", Outbox.status != "sent"))
                if waiting is None:
                    return "/quit"
                await asyncio.sleep(0.05)
        raise EOFError

    await terminal.chat(make_settings(db_url), "alice", "Alex", "en", read_line=read_line)
    assert "bot> Let's find your routine." in capsys.readouterr().out


async def test_wait_races_with_workers_and_each_timer_fires_once(make_platform,
                                                                 db_url) -> None:
    """``/wait`` moves a timer while several workers poll for due jobs: it fires once."""
    from datetime import timedelta

    from bots.console import fast_forward

    workers = [await server(make_platform, db_url) for _ in range(3)]
    first = workers[0]
    await first.engine.handle(first.channel("console", "console").inbound("alice", "/start"))
    await first.drain()

    async def drains() -> None:
        for _ in range(5):
            await asyncio.gather(*(w.drain() for w in workers))

    moved, _ = await asyncio.gather(
        fast_forward(first.db, first.clock, "console", "alice", timedelta(days=1)), drains())
    assert moved == 1
    await asyncio.gather(*(w.drain() for w in workers))
    async with first.db.session() as session:
        fired = (await session.scalars(select(Job.status).where(
            Job.kind == "flow_timer", Job.status == "done"))).all()
        tips = (await session.scalars(select(Message.id).where(
            Message.direction == "out", Message.text.like("Tip of the day%")))).all()
    assert (len(fired), len(tips)) == (1, 1)


async def test_a_console_bot_in_a_server_keeps_bounded_memory(monkeypatch) -> None:
    """A server's console bot (a relay, a benchmark) sends without end: it keeps the
    latest messages and recent users' choices, not all of them."""
    from bots import console as console_module

    monkeypatch.setattr(console_module, "KEEP", 10)
    channel = console_module.ConsoleChannel("console")
    buttons = (Button(title="Yes", payload="yes"),)
    for n in range(25):
        await channel.send(f"user{n}", Outgoing(text=f"hello {n}", buttons=buttons))
    assert len(channel.sent) <= 10
    assert channel.sent[-1][1].text == "hello 24"
    # The latest users still press their buttons by number; the oldest are forgotten.
    assert channel.inbound("user24", "1").payload == "yes"
    assert channel.inbound("user0", "1").kind == "text"
