"""botp: the command line.

    botp run                 web (webhooks, admin API) + worker in one process
    botp web                 only the web process (scale-out: run several behind a balancer)
    botp worker              only the worker (timers and deliveries)
    botp chat                talk to the bot in this terminal (console channel)
    botp migrate             upgrade the database schema (or --downgrade REV)
    botp events send NAME    post a shop event (cart_updated, order_placed ...)
    botp events import F     post every event of a JSON-lines file
    botp codes import POOL F add promo codes (one per line) to a pool
    botp catalog import F    add or update products from a CSV or JSON file
    botp keys create         create an admin API key (the first admin's, typically)
    botp flows validate P    check flow files (a file or a folder)
    botp flows graph P       print a flow as a Mermaid state diagram
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bot_platform.config import Settings, get_settings
from bot_platform.errors import FlowValidationError

log = logging.getLogger("botp")


def _setup_logging(settings: Settings, quiet: bool = False) -> None:
    from bot_platform.channels import install_log_redaction
    from bot_platform.logs import handler

    logging.basicConfig(level=logging.WARNING if quiet else settings.log_level.upper(),
                        handlers=[handler(settings.log_format)])  # text, or JSON lines
    install_log_redaction()  # no bot secret in any log line (the bots add theirs)


def _settings(args: argparse.Namespace) -> Settings:
    settings = get_settings()
    updates: dict[str, Any] = {}
    if getattr(args, "skip_invalid_flows", False):
        updates["skip_invalid_flows"] = True
    if getattr(args, "database_url", None):
        updates["database_url"] = args.database_url
    return settings.model_copy(update=updates) if updates else settings


# ---- serving --------------------------------------------------------------------------


def _make_server_class() -> type:
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, minus its signal handling: ours stops the worker and closes the
        platform before the process exits (uvicorn would re-raise the signal first)."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[override]
            yield

    return Server


class PortInUse(Exception):
    """The web port cannot be had: said before anything claims to be serving."""


def _listen(host: str, port: int) -> Any:
    """The web socket, bound before the platform starts: a second ``botp run`` on the same
    port fails at once with a clear message instead of saying "serving" first."""
    import socket

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


async def _serve(settings: Settings, *, web: bool, worker: bool) -> None:
    import uvicorn

    from bot_platform.logs import uvicorn_log_config
    from bot_platform.platform import Platform

    _Server = _make_server_class()
    sock = _listen(settings.host, settings.port) if web else None
    platform = Platform(settings)
    await platform.start()
    # What start-up built (modules, schemas, compiled flows) lives as long as the process:
    # kept out of the collector, a full collection no longer stalls sending for ~120 ms.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    worker_task: asyncio.Task[Any] | None = None
    server: uvicorn.Server | None = None

    def shutdown() -> None:
        stop.set()
        platform.stopping.set()  # open live streams end, so the server can stop
        if server is not None:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown)
    try:
        if worker:
            worker_task = asyncio.create_task(platform.worker.run(
                stop, grace=settings.worker.shutdown_grace))
        # Every bot is checked (and, in a web process, polled or given its webhook); bots
        # registered or removed through the API anywhere are followed.
        tasks.append(asyncio.create_task(platform.serve_bots(receive=web)))
        if web:
            server = _Server(uvicorn.Config(
                platform.app(), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), lifespan="off",
                log_config=uvicorn_log_config(settings.log_format)))
            log.info("serving on http://%s:%s", settings.host, settings.port)
            await server.serve(sockets=[sock])  # returns once shutdown() asked it to
        elif settings.metrics_port:  # a worker: its send counters, for Prometheus
            from bot_platform.app import create_metrics_app

            server = _Server(uvicorn.Config(
                create_metrics_app(platform), host=settings.host, port=settings.metrics_port,
                log_level="warning", lifespan="off",
                log_config=uvicorn_log_config(settings.log_format)))
            await server.serve()
        else:
            await stop.wait()
    finally:
        stop.set()
        for task in tasks:  # pollers
            task.cancel()
        if worker_task is not None:
            # Sends in flight finish and are recorded; cut off, they would wait for their
            # lease to expire and go out again if the messenger had already taken them.
            await asyncio.wait([worker_task], timeout=settings.worker.shutdown_grace)
            worker_task.cancel()
            tasks.append(worker_task)
        await asyncio.gather(*tasks, return_exceptions=True)
        await platform.close()
        if sock is not None:
            sock.close()


def _run_server(main: Any) -> None:
    """Serve on uvloop where it is installed (a faster event loop, and uvicorn then parses
    HTTP with httptools); the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def cmd_run(args: argparse.Namespace, web: bool = True, worker: bool = True) -> int:
    from bot_platform.migrations import upgrade

    settings = _settings(args)
    _setup_logging(settings)
    if settings.database_url.startswith("sqlite") or args.migrate:
        upgrade(settings.database_url)
    try:
        _run_server(_serve(settings, web=web, worker=worker))
    except PortInUse as error:
        print(f"botp: {error}", file=sys.stderr)
        return 1
    except FlowValidationError as error:
        print(error, file=sys.stderr)
        print("refusing to start with invalid flows; fix them or pass --skip-invalid-flows",
              file=sys.stderr)
        return 2
    return 0


# ---- chat -----------------------------------------------------------------------------

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


async def _chat(settings: Settings, user: str, name: str | None, language: str | None,
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
                logging.getLogger(__name__).exception("console: delivery round failed")

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


def cmd_chat(args: argparse.Namespace) -> int:
    from bot_platform.migrations import upgrade

    settings = _settings(args)
    _setup_logging(settings, quiet=True)
    upgrade(settings.database_url)
    try:
        asyncio.run(_chat(settings, args.user, args.name, args.language))
    except FlowValidationError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


# ---- migrate and flows ----------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    from bot_platform.migrations import downgrade, upgrade

    settings = _settings(args)
    _setup_logging(settings)
    if args.downgrade:
        downgrade(settings.database_url, args.downgrade)
    else:
        upgrade(settings.database_url, args.to)
    print("database schema is at", args.downgrade or args.to)
    return 0


async def _ingest_events(settings: Settings, events: list[Any]) -> list[Any]:
    from bot_platform.events import ingest
    from bot_platform.platform import Platform

    platform = Platform(settings)
    await platform.start()
    try:
        return [await ingest(platform.engine, event) for event in events]
    finally:
        await platform.close()


def _one_line(error: BaseException) -> str:
    """An input error as one line (a pydantic error lists each problem on its own)."""
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}"
                         for e in error.errors())
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return " ".join(str(error).split())


def cmd_events(args: argparse.Namespace) -> int:
    import json

    from pydantic import ValidationError

    from bot_platform.events import EventIn
    from bot_platform.migrations import upgrade

    settings = _settings(args)
    _setup_logging(settings, quiet=True)
    try:
        if args.events_command == "send":
            customer: dict[str, Any] = {}
            if args.user:
                channel, bot_id, user_id = [*args.user.split(":", 2), "", ""][:3]
                customer = {"channel": channel, "bot_id": bot_id, "user_id": user_id}
            events = [EventIn(
                name=args.name, event_id=args.id, subscriber_id=args.subscriber,
                phone=args.phone, email=args.email, contact_id=args.contact,
                data=json.loads(args.data) if args.data else {}, **customer)]
        else:
            # utf-8-sig: a file saved with a byte-order mark (Excel, Notepad) reads as well.
            lines = Path(args.file).read_text(encoding="utf-8-sig").splitlines()
            events = []
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    try:
                        events.append(EventIn.model_validate_json(line))
                    except ValidationError as error:
                        raise ValueError(f"line {number}: {_one_line(error)}") from None
    except (ValidationError, ValueError, OSError, RecursionError) as error:
        print(f"invalid event: {_one_line(error)}", file=sys.stderr)
        return 2
    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)
    results = asyncio.run(_ingest_events(settings, events))
    for event, result in zip(events, results, strict=True):
        print(f"{event.name} {event.event_id or ''}: {result.status}".replace("  ", " "))
    return 0


def cmd_codes(args: argparse.Namespace) -> int:
    from bot_platform.clock import SystemClock
    from bot_platform.database import Database
    from bot_platform.migrations import upgrade
    from bot_platform.promo import import_codes, pool_counts

    settings = _settings(args)
    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)

    async def work(lines: list[str]) -> tuple[int, int, int]:
        db = Database(settings.database_url)
        try:
            added = 0
            if args.codes_command == "import":
                added = await import_codes(db, args.pool, lines, SystemClock().now())
            async with db.session() as session:
                total, free = await pool_counts(session, args.pool)
            return added, total, free
        finally:
            await db.close()

    try:
        lines = (Path(args.file).read_text(encoding="utf-8").splitlines()
                 if args.codes_command == "import" else [])
    except OSError as error:
        print(error, file=sys.stderr)
        return 2
    added, total, free = asyncio.run(work(lines))
    if args.codes_command == "import":
        print(f"{added} new code(s) in pool {args.pool!r}")
    print(f"pool {args.pool!r}: {total} code(s), {free} free")
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from bot_platform.catalog import parse_products, upsert_products
    from bot_platform.clock import SystemClock
    from bot_platform.database import Database
    from bot_platform.migrations import upgrade

    settings = _settings(args)
    try:
        text = Path(args.file).read_text(encoding="utf-8-sig")  # (a byte-order mark is fine)
        products, errors = parse_products(text, args.file)
    except (OSError, ValueError) as error:
        print(f"cannot read {args.file}: {_one_line(error)}", file=sys.stderr)
        return 2
    for error in errors:
        print(error, file=sys.stderr)
    if errors and not args.skip_invalid:
        print("nothing imported; fix the rows or pass --skip-invalid", file=sys.stderr)
        return 1
    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)

    async def work() -> int:
        db = Database(settings.database_url)
        try:
            return await upsert_products(db, products, SystemClock().now())
        finally:
            await db.close()

    print(f"{asyncio.run(work())} product(s) imported, {len(errors)} row(s) rejected")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from bot_platform.apikeys import create_key
    from bot_platform.clock import SystemClock
    from bot_platform.database import Database
    from bot_platform.migrations import upgrade

    settings = _settings(args)
    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)

    async def work() -> tuple[int, str]:
        db = Database(settings.database_url)
        try:
            return await create_key(db, name=args.name, role=args.role,
                                    now=SystemClock().now())
        finally:
            await db.close()

    key_id, key = asyncio.run(work())
    print(f"key {key_id} ({args.role}) for {args.name!r} — shown only now, store it safely:")
    print(key)
    return 0


def cmd_flows_validate(args: argparse.Namespace) -> int:
    from bot_platform.flows.loading import validate_paths
    from bot_platform.i18n import Catalogs

    settings = get_settings()
    catalogs = Catalogs.load(Path(args.locales or settings.locales_dir), settings.default_locale)
    specs, issues = validate_paths(Path(args.path), catalogs)
    # Every problem in one run, one line each: catalogs (file:line) first, then flows.
    issues = [*catalogs.issues, *issues]
    for issue in issues:
        print(issue)
    errors = sum(issue.severity == "error" for issue in issues)
    warnings = len(issues) - errors
    print(f"{len(specs)} valid flow(s), {errors} error(s), {warnings} warning(s) "
          f"[locales: {', '.join(catalogs.locales)}]")
    return 1 if errors else 0


def cmd_flows_graph(args: argparse.Namespace) -> int:
    from bot_platform.flows.graph import mermaid
    from bot_platform.flows.loading import validate_paths
    from bot_platform.i18n import Catalogs

    settings = get_settings()
    catalogs = Catalogs.load(Path(settings.locales_dir), settings.default_locale)
    specs, issues = validate_paths(Path(args.path), catalogs)
    if not specs:
        for issue in issues:
            print(issue, file=sys.stderr)
        return 1
    for spec, _ in specs.values():
        print(mermaid(spec))
        print()
    return 0


SERVE_EPILOG = """environment (or a .env file in the working directory):
  BOTP_HOST           address the web server listens on (default 127.0.0.1;
                      0.0.0.0 for every interface)
  BOTP_PORT           its port (default 8080)
  BOTP_DATABASE_URL   default sqlite+aiosqlite:///./data/botp.sqlite3
  BOTP_PUBLIC_URL     https://... the messengers reach this server at: webhooks are
                      registered there; unset, Telegram bots are polled instead
  BOTP_BOTS           the bots, as JSON (or register them: POST /api/bots)
  BOTP_REDIS_URL      shared rate limits for several workers (optional)
  BOTP_LOG_LEVEL      INFO (default), DEBUG, WARNING ...

At start every bot is checked and logged as "connected: NAME (channel, bot id ID)" or
"failed: ..." with the reason; see docs/channels/ for troubleshooting."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="botp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    for name, text in (("run", "web + worker in one process"), ("web", "only the web process"),
                       ("worker", "only the worker")):
        command = commands.add_parser(
            name, help=text, description=f"botp {name}: {text}.", epilog=SERVE_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_argument("--skip-invalid-flows", action="store_true",
                             help="start without invalid flow files (and say which)")
        command.add_argument("--migrate", action="store_true",
                             help="upgrade the schema first (always done on SQLite)")
        command.add_argument("--database-url")

    chat = commands.add_parser("chat", help="talk to the bot in this terminal")
    chat.add_argument("--user", default="console-user", help="who you are (a user id)")
    chat.add_argument("--name", default=None, help="your first name, as a messenger gives it")
    chat.add_argument("--language", default=None, help="your language code, e.g. uk")
    chat.add_argument("--skip-invalid-flows", action="store_true")
    chat.add_argument("--database-url")

    migrate = commands.add_parser("migrate", help="upgrade (or downgrade) the schema")
    migrate.add_argument("--to", default="head")
    migrate.add_argument("--downgrade", metavar="REV")
    migrate.add_argument("--database-url")

    events = commands.add_parser("events", help="post shop events")
    event_commands = events.add_subparsers(dest="events_command", required=True)
    send = event_commands.add_parser("send", help="post one event")
    send.add_argument("name")
    send.add_argument("--id", help="the shop's event id (posting it twice counts once)")
    send.add_argument("--user", help="CHANNEL:BOT:USER_ID of the subscriber")
    send.add_argument("--subscriber", type=int)
    send.add_argument("--contact", type=int)
    send.add_argument("--phone")
    send.add_argument("--email")
    send.add_argument("--data", help="JSON object")
    send.add_argument("--database-url")
    load = event_commands.add_parser("import", help="post a JSON-lines file of events")
    load.add_argument("file")
    load.add_argument("--database-url")

    codes = commands.add_parser("codes", help="promo code pools")
    code_commands = codes.add_subparsers(dest="codes_command", required=True)
    load_codes = code_commands.add_parser("import", help="add codes (one per line)")
    load_codes.add_argument("pool")
    load_codes.add_argument("file")
    load_codes.add_argument("--database-url")
    status = code_commands.add_parser("status", help="how many codes are left")
    status.add_argument("pool")
    status.add_argument("--database-url")

    catalog = commands.add_parser("catalog", help="the product catalog")
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True)
    load_catalog = catalog_commands.add_parser("import", help="add/update products")
    load_catalog.add_argument("file", help="CSV with a header row, or a JSON list")
    load_catalog.add_argument("--skip-invalid", action="store_true",
                              help="import the valid rows even if some are invalid")
    load_catalog.add_argument("--database-url")

    keys = commands.add_parser("keys", help="admin API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument("--role", choices=["admin", "marketer", "agent"], default="admin")
    create.add_argument("--database-url")

    flows = commands.add_parser("flows", help="flow files")
    flow_commands = flows.add_subparsers(dest="flows_command", required=True)
    validate = flow_commands.add_parser("validate", help="check flow files")
    validate.add_argument("path")
    validate.add_argument("--locales", help="catalog folder (default: settings)")
    graph = flow_commands.add_parser("graph", help="print Mermaid state diagrams")
    graph.add_argument("path")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "web":
        return cmd_run(args, worker=False)
    if args.command == "worker":
        return cmd_run(args, web=False)
    if args.command == "chat":
        return cmd_chat(args)
    if args.command == "migrate":
        return cmd_migrate(args)
    if args.command == "events":
        return cmd_events(args)
    if args.command == "codes":
        return cmd_codes(args)
    if args.command == "catalog":
        return cmd_catalog(args)
    if args.command == "keys":
        return cmd_keys(args)
    if args.flows_command == "validate":
        return cmd_flows_validate(args)
    return cmd_flows_graph(args)


if __name__ == "__main__":
    sys.exit(main())
