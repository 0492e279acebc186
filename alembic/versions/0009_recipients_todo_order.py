"""broadcasts' pending recipients in id order

Revision ID: 0009_recipients_todo_order
Revises: 0008_outbox_bulk_unsent
Create Date: 2026-11-30 14:30:00

A send job takes a broadcast's pending recipients in id order, a batch at a time. On
PostgreSQL the index on (broadcast, status) holds them in no useful order, so every
batch read all of the broadcast's pending recipients and sorted them: 12 ms a batch
with 30,000 pending, on the database's core. With the id last the batch is a walk of
the index that stops after its rows (SQLite's index already ended in the row id).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009_recipients_todo_order"
down_revision: str | None = "0008_outbox_bulk_unsent"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_broadcast_recipients_todo", table_name="broadcast_recipients")
    op.create_index("ix_broadcast_recipients_todo", "broadcast_recipients",
                    ["broadcast_id", "status", "id"])


def downgrade() -> None:
    op.drop_index("ix_broadcast_recipients_todo", table_name="broadcast_recipients")
    op.create_index("ix_broadcast_recipients_todo", "broadcast_recipients",
                    ["broadcast_id", "status"])
