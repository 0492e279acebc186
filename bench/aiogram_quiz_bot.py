"""The baseline for ``bench/inbound.py``: the same quiz as ``flows/skin_quiz.yaml`` (and the
welcome greeting on /start) written the usual aiogram 3 way, with its own FSM, served by
aiogram's own webhook handler. It exists so the platform's figures have a "plain bot on
the same machine, same load, same fake" to be compared with.

Every answer goes out as a real HTTP call to the Bot API (``bot.send_message``,
``callback.answer()``), never as a method in the webhook response, so its latency is
measured the same way as the platform's (until the fake received the message).

    .venv/bin/python bench/aiogram_quiz_bot.py --port 8081 --api-base http://127.0.0.1:N \\
        --token 123456:ABC --secret s3cret [--storage memory | redis://127.0.0.1:6379/13]
"""

from __future__ import annotations

import argparse

from aiogram import Bot, Dispatcher, F, Router
from aiogram.client.default import DefaultBotProperties
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.telegram import TelegramAPIServer
from aiogram.filters import CommandStart
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.fsm.storage.base import BaseStorage
from aiogram.fsm.storage.memory import MemoryStorage
from aiogram.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message
from aiogram.webhook.aiohttp_server import SimpleRequestHandler, setup_application
from aiohttp import web

WEBHOOK_PATH = "/webhook"

# The English texts of locales/en/{welcome,quiz,common}.ftl, so messages weigh the same.
GREETING = ("Hi {name}! Welcome to Example Shop. Every day for three days we will send you "
            "something useful, and a gift at the end.")
Q_TYPE = "Let's find your routine. How does your skin feel by midday?"
Q_CONCERN = "What bothers you most?"
Q_AGE = "How old are you? (just the number)"
BAD_AGE = "Please send your age as a number, for example 29."
RESULTS = {
    "dry": "Your skin asks for moisture: a creamy cleanser, a rich moisturiser and an oil at "
           "night.",
    "oily": "Your skin likes it light: a gel cleanser, an oil-free moisturiser and a weekly "
            "clay mask.",
    "balanced": "Lucky you, your skin is balanced: a gentle cleanser and a light moisturiser "
                "will keep it so.",
}
NO_PRODUCTS = "We will send you products for your routine as soon as they are back in stock."
FALLBACK = "Sorry, I did not get that. Send /start to see the menu again."
TYPES = {"dry": ("Dry or tight", {"dry": 2}), "oily": ("Shiny all over", {"oily": 2}),
         "combination": ("Shiny only on the T-zone", {"dry": 1, "oily": 1})}
CONCERNS = {"shine": ("Shine and pores", {"oily": 1}),
            "tightness": ("Tightness and flaking", {"dry": 1}),
            "sensitivity": ("Redness and irritation", {})}


class Quiz(StatesGroup):
    skin_type = State()
    concern = State()
    age = State()


def keyboard(prefix: str, options: dict[str, tuple[str, dict[str, int]]]
             ) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(inline_keyboard=[
        [InlineKeyboardButton(text=title, callback_data=f"{prefix}:{key}")]
        for key, (title, _) in options.items()])


GREETING_KEYBOARD = InlineKeyboardMarkup(inline_keyboard=[
    [InlineKeyboardButton(text="Show me a tip", callback_data="welcome:tip")],
    [InlineKeyboardButton(text="Get news by email", callback_data="welcome:email")],
    [InlineKeyboardButton(text="Open the shop", url="https://shop.example.com/?utm_source=bot")],
])

router = Router()


@router.message(CommandStart())
async def start(message: Message, state: FSMContext) -> None:
    await state.clear()
    name = message.from_user.first_name if message.from_user else "there"
    await message.answer(GREETING.format(name=name), reply_markup=GREETING_KEYBOARD)


@router.message(F.text.casefold() == "quiz")
async def quiz(message: Message, state: FSMContext) -> None:
    await state.set_state(Quiz.skin_type)
    await state.set_data({"dry": 0, "oily": 0})
    await message.answer(Q_TYPE, reply_markup=keyboard("type", TYPES))


async def _score(state: FSMContext, scores: dict[str, int], **answer: str) -> None:
    data = await state.get_data()
    for key, points in scores.items():
        data[key] = data.get(key, 0) + points
    await state.set_data({**data, **answer})


@router.callback_query(Quiz.skin_type, F.data.startswith("type:"))
async def skin_type(callback: CallbackQuery, state: FSMContext, bot: Bot) -> None:
    await callback.answer()
    choice = (callback.data or "").partition(":")[2]
    await _score(state, TYPES.get(choice, ("", {}))[1], skin_type=choice)
    await state.set_state(Quiz.concern)
    if callback.message is not None:
        await bot.send_message(callback.message.chat.id, Q_CONCERN,
                               reply_markup=keyboard("concern", CONCERNS))


@router.callback_query(Quiz.concern, F.data.startswith("concern:"))
async def concern(callback: CallbackQuery, state: FSMContext, bot: Bot) -> None:
    await callback.answer()
    choice = (callback.data or "").partition(":")[2]
    await _score(state, CONCERNS.get(choice, ("", {}))[1], concern=choice)
    await state.set_state(Quiz.age)
    if callback.message is not None:
        await bot.send_message(callback.message.chat.id, Q_AGE)


@router.message(Quiz.age)
async def age(message: Message, state: FSMContext) -> None:
    text = (message.text or "").strip()
    if not text.isdigit() or not 12 <= int(text) <= 110:
        await message.answer(BAD_AGE)
        return
    data = await state.get_data()
    routine = ("dry" if data.get("dry", 0) >= 3 else "oily" if data.get("oily", 0) >= 3
               else "balanced")
    await state.clear()
    await message.answer(RESULTS[routine])
    await message.answer(NO_PRODUCTS)


@router.callback_query()
async def other_button(callback: CallbackQuery) -> None:
    await callback.answer()


@router.message()
async def other_text(message: Message) -> None:
    await message.answer(FALLBACK)


def storage_from(spec: str) -> BaseStorage:
    if spec == "memory":
        return MemoryStorage()
    from aiogram.fsm.storage.redis import RedisStorage
    from redis.asyncio import BlockingConnectionPool, Redis

    # redis-py 8's default pool fails at once beyond 100 connections (MaxConnectionsError:
    # every update beyond is a 500); the benchmark has more users in flight than that.
    # A pool of 100 that blocks instead halves the rate, so: room enough, never refused.
    pool = BlockingConnectionPool.from_url(spec, max_connections=1000, timeout=20)
    return RedisStorage(Redis(connection_pool=pool))


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api-base", required=True)
    parser.add_argument("--token", default="123456:ABC")
    parser.add_argument("--secret", default="s3cret")
    parser.add_argument("--storage", default="memory", help="memory or a redis:// URL")
    parser.add_argument("--background", action="store_true",
                        help="answer 200 at once and handle the update afterwards "
                             "(aiogram's default); without it the update is handled "
                             "before the 200, as the platform does")
    args = parser.parse_args()

    bot = Bot(args.token, session=AiohttpSession(api=TelegramAPIServer.from_base(args.api_base)),
              default=DefaultBotProperties(parse_mode="HTML"))
    dispatcher = Dispatcher(storage=storage_from(args.storage))
    dispatcher.include_router(router)
    app = web.Application()
    SimpleRequestHandler(dispatcher, bot, handle_in_background=args.background,
                         secret_token=args.secret).register(app, path=WEBHOOK_PATH)
    app.router.add_get("/healthz", healthz)
    setup_application(app, dispatcher, bot=bot)

    async def close_storage(app: web.Application) -> None:
        await dispatcher.storage.close()

    app.on_cleanup.append(close_storage)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None,
                handle_signals=True, shutdown_timeout=2)


if __name__ == "__main__":
    main()
