"""Which prepared statements a PostgreSQL connection keeps.

SQLAlchemy's asyncpg adapter keeps the last 100 statements of each connection prepared (an
LRU keyed by the SQL). A list of ids renders one parameter per id (``IN ($1, ..., $500)``)
and a many-row insert one per value, so every length is a statement of its own: a worker
sending a broadcast filled its connections' caches with hundreds of one-off statements,
each holding its text and a codec per parameter (~45 MB of a worker's RSS with 6
connections, growing with the pool), and pushed out the per-event statements worth
keeping. A statement with more than ``MAX_CACHED_PARAMETERS`` parameters is now prepared
for its one execution and then closed, as asyncpg does without a cache: one more round
trip for a statement that carries a batch.

Statements ``pg_driver.merge_writes`` merged (``WITH w0 AS (...``) are kept whatever
their parameters: they are a fixed set of the hot path's statements put together (a
turn's deferred writes and the statement after them), the same few again for every
event; uncached, each cost a prepare and a close (two trips more, and the server's
parse and plan) per use.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.util import LRUCache

MAX_CACHED_PARAMETERS = 32
# asyncpg numbers parameters $1..$n: a statement with this one has more than the maximum.
_TOO_MANY = f"${MAX_CACHED_PARAMETERS + 1}"
MERGED_PREFIX = "WITH w0 AS ("  # how a statement of ``pg_driver.merge_writes`` begins


class SmallStatementCache(LRUCache):  # type: ignore[type-arg]
    """An LRU of prepared statements that leaves out those with many parameters."""

    def __setitem__(self, sql: Any, value: Any) -> None:
        if _TOO_MANY not in sql or sql.startswith(MERGED_PREFIX):
            super().__setitem__(sql, value)


def keep_small_statements(dbapi_connection: Any, _record: Any) -> None:
    """A ``connect`` listener: the new connection's statement cache keeps only statements
    of up to ``MAX_CACHED_PARAMETERS`` parameters (same capacity as before)."""
    cache = getattr(dbapi_connection, "_prepared_statement_cache", None)
    if isinstance(cache, LRUCache) and not isinstance(cache, SmallStatementCache):
        dbapi_connection._prepared_statement_cache = SmallStatementCache(cache.capacity)
