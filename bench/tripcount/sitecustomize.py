"""Counts a process's PostgreSQL round trips (``bench/inbound_costs.py --trips``).

On ``PYTHONPATH`` with ``BOTP_BENCH_TRIPS_DIR`` set, every asyncpg connection's protocol
is wrapped: each call that sends a query and waits for its answer (simple query,
prepare, bind/execute, close of a statement) counts as one round trip. The counts go to
``DIR/<pid>.json`` every half second (read by the bench before and after its window)."""

from __future__ import annotations

import os

_DIR = os.environ.get("BOTP_BENCH_TRIPS_DIR")
if _DIR:
    import collections
    import json
    import sys
    import threading
    import time

    _TRIPS = frozenset({"query", "prepare", "bind_execute", "bind_execute_many", "bind",
                        "execute", "close_statement", "copy_in", "copy_out"})
    _counts: collections.Counter[str] = collections.Counter()
    _detail: collections.Counter[str] = collections.Counter()
    _DETAIL = int(os.environ.get("BOTP_BENCH_TRIPS_DETAIL", "0"))  # SQL characters kept

    class _Counted:
        """The protocol, with its round-trip methods counted."""

        __slots__ = ("_inner",)

        def __init__(self, inner: object) -> None:
            object.__setattr__(self, "_inner", inner)

        def __getattr__(self, name: str) -> object:
            found = getattr(self._inner, name)
            if name in _TRIPS:
                def counted(*args: object, **kwargs: object) -> object:
                    _counts[name] += 1
                    if _DETAIL:
                        first = args[0] if args else ""
                        sql = first if isinstance(first, str) else getattr(
                            first, "query", "?")
                        _detail[f"{name}: {' '.join(str(sql).split())[:_DETAIL]}"] += 1
                    return found(*args, **kwargs)  # type: ignore[operator]
                return counted
            return found

        def __setattr__(self, name: str, value: object) -> None:
            setattr(self._inner, name, value)

    def _install() -> None:
        import asyncpg.connection

        original = asyncpg.connection.Connection.__init__

        def init(self: object, protocol: object, *args: object, **kwargs: object) -> None:
            original(self, _Counted(protocol), *args, **kwargs)  # type: ignore[arg-type]

        asyncpg.connection.Connection.__init__ = init  # type: ignore[method-assign]

    def _dump() -> None:
        path = os.path.join(_DIR, f"{os.getpid()}.json")
        while True:
            try:
                with open(path + ".tmp", "w") as out:
                    json.dump({"argv": sys.argv, "counts": dict(_counts),
                               "detail": dict(_detail)}, out)
                os.replace(path + ".tmp", path)
            except OSError:
                pass
            time.sleep(0.5)

    try:
        _install()
    except ImportError:
        pass
    else:
        def _start() -> None:
            _counts.clear()  # a forked child (``botp web --processes``) counts its own
            _detail.clear()
            threading.Thread(target=_dump, daemon=True).start()

        _start()
        os.register_at_fork(after_in_child=_start)
