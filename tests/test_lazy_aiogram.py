"""``bots.lazy_aiogram`` defers building aiogram's pydantic models to their first use. The
models built that way must be the ones aiogram builds itself: same JSON schema, same
validation, for the types the Telegram adapter relies on."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.platform import ROOT

PROBE = """
import json, sys
if sys.argv[1] == "lazy":
    import bots.lazy_aiogram  # noqa: F401
from aiogram import methods, types
models = (types.Update, types.Message, types.CallbackQuery, types.InlineKeyboardMarkup,
          types.ReplyKeyboardMarkup, methods.SendMessage, methods.SendPhoto,
          methods.AnswerCallbackQuery)
update = types.Update.model_validate({"update_id": 7, "callback_query": {
    "id": "q", "from": {"id": 5, "is_bot": False, "first_name": "A"}, "chat_instance": "c",
    "data": "b:1", "message": {"message_id": 3, "date": 0, "chat": {"id": 5, "type": "private"},
    "text": "hi", "entities": [{"type": "bold", "offset": 0, "length": 2}],
    "reply_markup": {"inline_keyboard": [[{"text": "x", "callback_data": "b:1"}]]}}}})
print(json.dumps({"schemas": [m.model_json_schema() for m in models],
                  "update": update.model_dump(mode="json", exclude_none=True)}))
"""


def _probe(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, check=True,
                          capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout)


def test_lazily_built_models_are_aiogram_own() -> None:
    lazy, eager = _probe("lazy"), _probe("eager")
    assert lazy["update"]["callback_query"]["message"]["reply_markup"]["inline_keyboard"]
    assert lazy == eager
