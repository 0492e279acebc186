"""The engine through the console channel: whole conversations, dedupe, ordering,
timers, triggers. Every test goes webhook-free but otherwise through the real pipeline
(engine -> database -> outbox -> delivery worker -> channel)."""

from __future__ import annotations

import asyncio
import textwrap
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select

from bot_platform.events import dispatch
from bot_platform.models import FlowState, Job, Message, Outbox, Subscriber, SubscriberTag
from bot_platform.types import Inbound, InboundKind, Profile
from tests.support.engine import CART_FLOW, Chat, echo_flows
from tests.support.platform import ROOT


async def test_welcome_chain_greeting_buttons_and_timers(make_platform, db_url) -> None:
    platform = await make_platform(database_url=db_url)
    chat = Chat(platform)
    greeting = await chat.say("/start")
    assert len(greeting) == 1
    assert greeting[0].text.startswith("Hi Alex! Welcome to Example Shop.")
    titles = [b.title for b in greeting[0].buttons]
    assert titles == ["Show me a tip", "Get news by email", "Open the shop"]
    assert greeting[0].buttons[2].url.startswith("https://shop.example.com/")

    tip_now = await chat.say("1")  # press "Show me a tip"
    assert [m.text for m in tip_now] == [
        "Tip: a gentle cleanser in the morning and a richer one at night keeps your skin "
        "balanced."]

    assert await chat.wait(timedelta(hours=23)) == []  # not yet
    tip = await chat.wait(timedelta(hours=1))
    assert [m.text for m in tip] == [
        "Tip of the day: apply moisturiser to damp skin, it locks the water in."]
    offer = await chat.wait(timedelta(days=2))
    assert "WELCOME10" in offer[0].text
    assert await chat.wait(timedelta(days=20)) == []  # the chain has ended

    async with platform.db.session() as session:
        state = await session.scalar(select(FlowState))
        assert (state.flow, state.state, state.status) == ("welcome", "offer", "finished")
        tags = set((await session.scalars(select(SubscriberTag.tag))).all())
        assert tags == {"new-subscriber", "welcome-offer-sent"}
        jobs = (await session.scalars(select(Job).where(Job.kind == "flow_timer")
                                      .order_by(Job.id))).all()
        # greeting's timer was cancelled when the button moved on; the others fired.
        assert [(j.payload["state"], j.status, j.result) for j in jobs] == [
            ("greeting", "cancelled", "state-left"), ("tip_now", "done", "fired"),
            ("tip", "done", "fired")]


async def test_capture_validates_and_retries(make_platform) -> None:
    platform = await make_platform()
    chat = Chat(platform)
    await chat.say("/start")
    assert (await chat.say("2"))[0].text == "What is your email address?"
    retry = await chat.say("not an email")
    assert retry[0].text.startswith("That does not look like an email address.")
    saved = await chat.say("  Alex@Example.COM ")
    assert saved[0].text == "Thanks! We will write to alex@example.com."
    async with platform.db.session() as session:
        subscriber = await session.scalar(select(Subscriber))
        assert subscriber.attributes["email"] == "alex@example.com"


async def test_button_label_typed_as_text_presses_it(make_platform) -> None:
    platform = await make_platform()
    chat = Chat(platform)
    await chat.say("/start")
    assert (await chat.say("get news by EMAIL"))[0].text == "What is your email address?"


async def test_unknown_text_gets_the_localized_fallback(make_platform) -> None:
    platform = await make_platform()
    chat = Chat(platform, profile=Profile(first_name="Olena", language="uk-UA"))
    greeting = await chat.say("/start")
    assert greeting[0].text.startswith("Вітаємо, Olena!")
    await chat.say("1")
    fallback = await chat.say("що це?")
    assert fallback[0].text.startswith("Вибачте, я не зрозумів.")


async def test_first_name_falls_back_to_a_localized_word(make_platform) -> None:
    platform = await make_platform()
    chat = Chat(platform, profile=Profile(language="pl"))
    assert (await chat.say("/start"))[0].text.startswith("Cześć przyjacielu!")


async def test_deep_link_ref_starts_the_matching_flow_and_is_stored(make_platform, db_url) -> None:
    platform = await make_platform(database_url=db_url)
    chat = Chat(platform)
    hello = await chat.say("/start promo-spring")
    assert hello[0].text.startswith("Spring is here, Alex!")
    code = await chat.say("1")
    assert "SPRING15" in code[0].text
    async with platform.db.session() as session:
        subscriber = await session.scalar(select(Subscriber))
        assert subscriber.source_ref == "promo-spring"
        assert subscriber.attributes["campaign"] == "spring"
        flows = set((await session.scalars(select(FlowState.flow))).all())
        assert flows == {"spring_promo"}  # the welcome flow did not start as well


async def test_same_event_twice_or_concurrently_has_one_effect(make_platform, db_url) -> None:
    platform = await make_platform(database_url=db_url)
    console = platform.channel("console", "console")
    event = console.inbound("u1", "/start")
    first = await platform.engine.handle(event)
    again = await platform.engine.handle(event)
    assert (first.duplicate, again.duplicate) == (False, True)
    assert again.outbox_ids == ()

    second = console.inbound("u2", "/start")
    results = await asyncio.gather(*(platform.engine.handle(second) for _ in range(10)))
    assert sum(not r.duplicate for r in results) == 1
    await platform.drain()
    assert [user for user, _ in console.sent].count("u1") == 1
    assert [user for user, _ in console.sent].count("u2") == 1
    async with platform.db.session() as session:
        assert await session.scalar(select(func.count()).select_from(Outbox)) == 2
        assert await session.scalar(select(func.count()).where(Job.kind == "flow_timer")) == 2


async def test_hundred_concurrent_events_of_one_subscriber_apply_in_order(
        make_platform, tmp_path: Path, db_url: str) -> None:
    flows = echo_flows(tmp_path)
    platform = await make_platform(flows_dir=flows, database_url=db_url)
    console = platform.channel("console", "console")
    await platform.engine.handle(console.inbound("u1", "/start"))
    events = [console.inbound("u1", str(n)) for n in range(100)]
    await asyncio.gather(*(platform.engine.handle(e) for e in events))
    async with platform.db.session() as session:
        subscriber = await session.scalar(select(Subscriber))
        assert subscriber.attributes["log"] == "," + ",".join(str(n) for n in range(100))
        inbound = (await session.scalars(select(Message.text).where(
            Message.direction == "in", Message.kind == "text").order_by(Message.id))).all()
        assert inbound == [str(n) for n in range(100)]


async def test_timer_of_a_left_state_does_nothing(make_platform) -> None:
    platform = await make_platform()
    chat = Chat(platform)
    await chat.say("/start")
    async with platform.db.session() as session:
        job = await session.scalar(select(Job).where(Job.kind == "flow_timer"))
        # Simulate a worker that claimed the greeting timer before the user moved on.
        job.status = "running"
        job.locked_by = platform.worker_id
    await chat.say("1")  # leaves greeting: version moves on
    async with platform.db.session() as session:
        job = await session.get(Job, job.id)
        assert await platform.engine.timers.run_flow_timer(session, job) == "stale"


async def test_branches_conditions_scores_and_start_flow(make_platform, tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "quiz.yaml").write_text(textwrap.dedent("""
        flow: quiz
        triggers: [{on: keyword, keywords: [quiz, Quiz me]}]
        start: ask
        states:
          ask:
            say: welcome-ask-email
            buttons:
              - {label: welcome-btn-tip, goto: decide, actions: [{score: {points: 5}}]}
              - {label: welcome-btn-email, goto: decide, actions: [{score: {points: 1}}]}
          decide:
            branch:
              - when: {all: [{attribute: points, op: gte, value: 5}, {not: {tag: vip}}]}
                goto: high
              - goto: low
          high:
            actions: [{tag: high-scorer}, {start_flow: spring_promo}]
            say: welcome-tip
            end: true
          low:
            say: welcome-tip-now
            end: true
    """))
    for name in ("spring_promo.yaml",):
        (flows / name).write_text((ROOT / "flows" / name).read_text())
    platform = await make_platform(flows_dir=flows)
    chat = Chat(platform)
    assert (await chat.say("quiz me"))[0].text == "What is your email address?"
    result = await chat.say("1")
    assert [m.text[:14] for m in result] == ["Tip of the day", "Spring is here"]
    other = Chat(platform, user="u2")
    await other.say("QUIZ")
    assert (await other.say("2"))[0].text.startswith("Tip: a gentle cleanser")


async def test_shop_event_starts_flows_and_moves_waiting_ones(make_platform, tmp_path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "cart.yaml").write_text(CART_FLOW)
    platform = await make_platform(flows_dir=flows)
    chat = Chat(platform)
    await chat.say("hello")  # creates the subscriber (fallback reply)
    async with platform.db.session() as session:
        subscriber_id = await session.scalar(select(Subscriber.id))
    await dispatch(platform.engine, subscriber_id, "cart_updated", {"items": ["a"]})
    await dispatch(platform.engine, subscriber_id, "order_placed")
    stored, _ = await dispatch(platform.engine, subscriber_id, "order_placed",
                               external_id="o-1")
    again, _ = await dispatch(platform.engine, subscriber_id, "order_placed",
                              external_id="o-1")
    assert (stored, again) == (True, False)
    assert await chat.wait(timedelta(hours=2)) == []  # the order cancelled the reminder
    await dispatch(platform.engine, subscriber_id, "cart_updated")
    reminded = await chat.wait(timedelta(hours=1))
    assert [m.text.split(":")[0] for m in reminded] == ["Tip of the day"]


async def test_contact_links_channel_identities_by_phone(make_platform) -> None:
    platform = await make_platform()
    console = platform.channel("console", "console")
    await platform.engine.handle(console.inbound("u1", "/phone +380501112233"))
    await platform.engine.handle(console.inbound("u2", "/phone +380501112233"))
    async with platform.db.session() as session:
        contacts = (await session.scalars(select(Subscriber.contact_id))).all()
        assert len(contacts) == 2 and len(set(contacts)) == 1


async def test_unsubscribed_users_get_nothing_until_they_come_back(make_platform) -> None:
    platform = await make_platform()
    chat = Chat(platform)
    await chat.say("/start")
    await platform.engine.handle(Inbound(
        channel="console", bot_id="console", user_id="u1", event_id="gone",
        kind=InboundKind.UNSUBSCRIBED))
    assert await chat.wait(timedelta(days=5)) == []
    async with platform.db.session() as session:
        job = await session.scalar(select(Job).where(Job.kind == "flow_timer"))
        assert (job.status, job.result) == ("done", "unsubscribed")
    assert (await chat.say("/start"))[0].text.startswith("Hi Alex!")


async def test_escalation_hands_the_chat_to_humans(make_platform, tmp_path: Path) -> None:
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "support.yaml").write_text(textwrap.dedent("""
        flow: support
        triggers: [{on: keyword, keywords: [help]}]
        start: ask
        states:
          ask:
            say: welcome-ask-email
            capture: {attribute: problem, type: text, retry: common-fallback, goto: handoff}
            after: {delay: 1h, goto: reminder}
          reminder:
            say: welcome-tip
            end: true
          handoff:
            actions:
              - escalate: {reason: support, summary: "Problem: {problem}", attach: [problem]}
            after: {delay: 1h, goto: reminder}
    """))
    platform = await make_platform(flows_dir=flows)
    chat = Chat(platform)
    await chat.say("help")
    reply = await chat.say("my parcel is lost")
    assert [m.text for m in reply] == [
        "Thanks! A member of our team will answer you here soon."]
    assert await chat.say("hello? anyone?") == []  # goes to the conversation, not flows
    assert await chat.wait(timedelta(hours=2)) == []  # the flow's timer is suppressed
    async with platform.db.session() as session:
        from bot_platform.models import Conversation

        conversation = await session.scalar(select(Conversation))
        assert (conversation.status, conversation.reason, conversation.summary) == (
            "waiting", "support", "Problem: my parcel is lost")
        assert conversation.data == {"flow": "support", "problem": "my parcel is lost"}
        job = await session.scalar(select(Job).where(Job.status == "done"))
        assert job.result == "suppressed"
        texts = (await session.scalars(select(Message.text).where(
            Message.direction == "in").order_by(Message.id))).all()
        assert texts[-1] == "hello? anyone?"  # the customer's words are kept
