"""the outbox's interactive rows in due order

Revision ID: 0006_outbox_interactive_due
Revises: 0005_ai_budget
Create Date: 2026-11-30 09:00:00

Delivery found the interactive subscribers' oldest rows by grouping every unsent row
that is not a broadcast's: 100,000 waiting timer rows made each claim a 100,000-row
group-by. Walking this index in due order (``status``, ``next_attempt_at``, ``id``), a
claim reads about as many rows as it takes. It replaces ``ix_outbox_interactive``
(``status``, ``subscriber_id``), which only that group-by used. Its twin for broadcasts'
rows does the same for the bulk claim, which read every waiting interactive row
(SQLite, along ``ix_outbox_due``) or the whole table (PostgreSQL) to find none.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_outbox_interactive_due"
down_revision: str | None = "0005_ai_budget"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_outbox_interactive", table_name="outbox")
    op.create_index("ix_outbox_interactive_due", "outbox",
                    ["status", "next_attempt_at", "id"],
                    postgresql_where=sa.text("broadcast_id IS NULL"),
                    sqlite_where=sa.text("broadcast_id IS NULL"))
    op.create_index("ix_outbox_bulk_due", "outbox", ["status", "next_attempt_at", "id"],
                    postgresql_where=sa.text("broadcast_id IS NOT NULL"),
                    sqlite_where=sa.text("broadcast_id IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_outbox_bulk_due", table_name="outbox")
    op.drop_index("ix_outbox_interactive_due", table_name="outbox")
    op.create_index("ix_outbox_interactive", "outbox", ["status", "subscriber_id"],
                    postgresql_where=sa.text("broadcast_id IS NULL"),
                    sqlite_where=sa.text("broadcast_id IS NULL"))
