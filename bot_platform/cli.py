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
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bot_platform.config import Settings, get_settings
from bot_platform.errors import FlowValidationError

if TYPE_CHECKING:
    import socket

    from bot_platform.database import Database

T = TypeVar("T")


def _setup_logging(settings: Settings, quiet: bool = False) -> None:
    from bot_platform.logs import handler
    from bot_platform.redaction import install_log_redaction

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


def _on_database(settings: Settings, work: Callable[[Database], Awaitable[T]]) -> T:
    """Run ``work`` on the settings' database (its schema upgraded first on SQLite, the
    embedded default; a server database is upgraded by ``botp migrate``)."""
    from bot_platform.database import Database
    from bot_platform.migrations import upgrade

    if settings.database_url.startswith("sqlite"):
        upgrade(settings.database_url)

    async def main() -> T:
        db = Database(settings.database_url)
        try:
            return await work(db)
        finally:
            await db.close()

    return asyncio.run(main())


# ---- serving (bot_platform.serve) ----------------------------------------------------


def cmd_run(args: argparse.Namespace, web: bool = True, worker: bool = True) -> int:
    from bot_platform.serve import PortInUse, serve

    settings = _settings(args)
    _setup_logging(settings)
    processes = (getattr(args, "processes", None) or settings.web_processes
                 if web and not worker else 1)
    sqlite = settings.database_url.startswith("sqlite")
    if processes > 1 and sqlite:
        print("botp: --processes above 1 needs PostgreSQL: SQLite has one writer, so more "
              "web processes would only wait for one another (run one `botp web`, or "
              "`botp run`)", file=sys.stderr)
        return 2
    if sqlite or args.migrate:
        # Imported only here: Alembic (and Mako) stay out of processes that do not
        # migrate (~8 MB of a worker's memory).
        from bot_platform.migrations import upgrade

        upgrade(settings.database_url)
    if processes > 1:
        from bot_platform.platform import check_flows
        from bot_platform.web_processes import serve_processes

        try:  # each process would refuse alike: said once, before forking
            check_flows(settings)
        except FlowValidationError as error:
            return _refuse_flows(error)

        def serve_one(sock: socket.socket, first: bool) -> int:
            return _serving(lambda: serve(settings, web=True, worker=False, sock=sock,
                                          registers_bots=first))
        try:
            return serve_processes(settings, processes, serve_one)
        except PortInUse as error:
            print(f"botp: {error}", file=sys.stderr)
            return 1
    return _serving(lambda: serve(settings, web=web, worker=worker))


def _serving(serve: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run one serving process; its exit code (1: the port is taken, 2: invalid flows)."""
    from bot_platform.serve import PortInUse, run

    try:
        run(serve())
    except PortInUse as error:
        print(f"botp: {error}", file=sys.stderr)
        return 1
    except FlowValidationError as error:
        return _refuse_flows(error)
    return 0


def _refuse_flows(error: FlowValidationError) -> int:
    print(error, file=sys.stderr)
    print("refusing to start with invalid flows; fix them or pass --skip-invalid-flows",
          file=sys.stderr)
    return 2


# ---- chat (bot_platform.terminal) ----------------------------------------------------


def cmd_chat(args: argparse.Namespace) -> int:
    from bot_platform.migrations import upgrade
    from bot_platform.terminal import chat

    settings = _settings(args)
    _setup_logging(settings, quiet=True)
    upgrade(settings.database_url)
    try:
        asyncio.run(chat(settings, args.user, args.name, args.language))
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
    from bot_platform.promo import import_codes, pool_counts

    try:
        lines = (Path(args.file).read_text(encoding="utf-8").splitlines()
                 if args.codes_command == "import" else [])
    except OSError as error:
        print(error, file=sys.stderr)
        return 2

    async def work(db: Database) -> tuple[int, int, int]:
        added = 0
        if args.codes_command == "import":
            added = await import_codes(db, args.pool, lines, SystemClock().now())
        async with db.session() as session:
            total, free = await pool_counts(session, args.pool)
        return added, total, free

    added, total, free = _on_database(_settings(args), work)
    if args.codes_command == "import":
        print(f"{added} new code(s) in pool {args.pool!r}")
    print(f"pool {args.pool!r}: {total} code(s), {free} free")
    return 0


def cmd_catalog(args: argparse.Namespace) -> int:
    from bot_platform.catalog import parse_products, upsert_products
    from bot_platform.clock import SystemClock

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
    imported = _on_database(_settings(args), lambda db: upsert_products(
        db, products, SystemClock().now()))
    print(f"{imported} product(s) imported, {len(errors)} row(s) rejected")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from bot_platform.apikeys import create_key
    from bot_platform.clock import SystemClock

    key_id, key = _on_database(_settings(args), lambda db: create_key(
        db, name=args.name, role=args.role, now=SystemClock().now()))
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
  BOTP_WEB_PROCESSES  botp web: processes sharing the port (PostgreSQL; default 1)
  BOTP_DATABASE_URL   default sqlite+aiosqlite:///./data/botp.sqlite3
  BOTP_PUBLIC_URL     https://... the messengers reach this server at: webhooks are
                      registered there; unset, Telegram bots are polled instead
  BOTP_BOTS           the bots, as JSON (or register them: POST /api/bots)
  BOTP_REDIS_URL      shared rate limits for several workers (optional)
  BOTP_LOG_LEVEL      INFO (default), DEBUG, WARNING ...

At start every bot is checked and logged as "connected: NAME (channel, bot id ID)" or
"failed: ..." with the reason; see docs/channels/ for troubleshooting."""


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


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
        if name == "web":
            command.add_argument(
                "--processes", type=_at_least_one, metavar="N",
                help="web processes sharing the port (PostgreSQL; default: "
                     "BOTP_WEB_PROCESSES or 1; one per core uses the machine)")

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
    commands: dict[str, Callable[[argparse.Namespace], int]] = {
        "run": cmd_run, "web": lambda a: cmd_run(a, worker=False),
        "worker": lambda a: cmd_run(a, web=False), "chat": cmd_chat, "migrate": cmd_migrate,
        "events": cmd_events, "codes": cmd_codes, "catalog": cmd_catalog, "keys": cmd_keys,
        "flows": lambda a: (cmd_flows_validate if a.flows_command == "validate"
                            else cmd_flows_graph)(a)}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
