"""an index for the outbox's interactive rows

Revision ID: 0004_outbox_interactive_index
Revises: 0003_flow_version_texts
Create Date: 2026-11-30 02:40:00

Delivery claims rows that are not a broadcast's (replies, timers, agents' messages)
before a broadcast's, so a reply never waits behind a running broadcast; this partial
index finds them without reading the broadcast's rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_outbox_interactive_index"
down_revision: str | None = "0003_flow_version_texts"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_outbox_interactive", "outbox", ["status", "subscriber_id"],
                    postgresql_where=sa.text("broadcast_id IS NULL"),
                    sqlite_where=sa.text("broadcast_id IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_outbox_interactive", table_name="outbox")
