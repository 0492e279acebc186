"""broadcasts' unsent outbox rows in id order

Revision ID: 0008_outbox_bulk_unsent
Revises: 0007_jobs_due_order
Create Date: 2026-11-30 11:20:00

The bulk claim on PostgreSQL takes broadcasts' rows in id order. It read them along the
primary key past every row already sent, or (statistics taken while the outbox was
nearly empty) read and sorted every waiting row and anti-joined them with every unsent
row: 40-80 ms a claim, some of 3-17 s when three workers claimed at once. This index
holds only broadcasts' rows still to send (waiting or in a worker's hand), so a claim
walks it in id order and stops after the rows it takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_outbox_bulk_unsent"
down_revision: str | None = "0007_jobs_due_order"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNSENT = "broadcast_id IS NOT NULL AND status IN ('pending', 'sending')"


def upgrade() -> None:
    op.create_index("ix_outbox_bulk_unsent", "outbox", ["id"],
                    postgresql_where=sa.text(_UNSENT), sqlite_where=sa.text(_UNSENT))


def downgrade() -> None:
    op.drop_index("ix_outbox_bulk_unsent", table_name="outbox")
