"""the AI token budget as a table of counters

Revision ID: 0005_ai_budget
Revises: 0004_outbox_interactive_index
Create Date: 2026-11-30 04:30:00

The monthly AI token budget was a read-then-write on a ``kv`` value, which lost updates
under concurrency. ``ai_budget`` keeps spent and reserved tokens per bot and month, changed
only by atomic compare-and-set updates. The months counted so far move over from ``kv``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_ai_budget"
down_revision: str | None = "0004_outbox_interactive_index"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PREFIX = "ai:tokens:"


def upgrade() -> None:
    budget = op.create_table(
        "ai_budget",
        sa.Column("bot_id", sa.String(length=128), nullable=False),
        sa.Column("month", sa.String(length=7), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("bot_id", "month", name=op.f("pk_ai_budget")),
    )
    kv = sa.table("kv", sa.column("key", sa.String), sa.column("value", sa.Text))
    connection = op.get_bind()
    rows = connection.execute(sa.select(kv.c.key, kv.c.value).where(
        kv.c.key.like(f"{PREFIX}%"))).all()
    moved = []
    for key, value in rows:
        bot_id, _, month = key[len(PREFIX):].rpartition(":")
        if bot_id and len(month) == 7 and str(value).isdigit():
            moved.append({"bot_id": bot_id[:128], "month": month, "spent": int(value),
                          "reserved": 0})
    if moved:
        op.bulk_insert(budget, moved)
    connection.execute(sa.delete(kv).where(kv.c.key.like(f"{PREFIX}%")))


def downgrade() -> None:
    op.drop_table("ai_budget")
