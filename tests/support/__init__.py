"""Helpers several test modules share. A test module imports them from here, never from
another test module, so each test file can move, split or go without breaking the others.

    telegram   the bot's token and secret, Update builders, posting to the webhook
    viber      the bot's token, the user, signed callbacks
    engine     a console ``Chat`` through the whole pipeline, a fixed wheel, a cart flow
    scripted   a channel whose send results are scripted, a second worker, the outbox rows
    platform   ROOT, make_settings, TestPlatform, WorkerProcess (``botp worker`` in a
               child process), wait_for
    services   the machine's PostgreSQL and Redis: a fresh database, an empty Redis,
               skip on a laptop or fail in CI when absent
    ai, crash  the fake LLM's settings; a platform and a killable worker on one file

The fixtures (``make_platform``, ``db_url``, the Telegram ``fake`` ...) live in
``tests/conftest.py``; no test module imports from it.
"""
