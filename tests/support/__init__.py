"""Helpers several test modules share. A test module imports them from here, never from
another test module, so each test file can move, split or go without breaking the others.

    telegram   the bot's token and secret, Update builders, posting to the webhook
    viber      the bot's token, the user, signed callbacks
    engine     a console ``Chat`` through the whole pipeline, a fixed wheel, a cart flow
    scripted   a channel whose send results are scripted, a second worker, the outbox rows

The Telegram ``fake`` and ``telegram`` fixtures live in ``tests/conftest.py``.
"""
