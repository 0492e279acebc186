"""jobs in claim order

Revision ID: 0007_jobs_due_order
Revises: 0006_outbox_interactive_due
Create Date: 2026-11-30 11:00:00

The scheduler claims due jobs in (``due_at``, ``id``) order. With ``ix_jobs_due`` on
(``status``, ``due_at``) PostgreSQL sorted every job due at the same instant to find the
first 200 (100,000 welcome timers due at once: a 100,000-row sort per claim); with ``id``
in the index a claim reads about as many rows as it takes. (SQLite's index entries end
with the rowid, which ``id`` is, so this changes nothing there but the definition.)
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007_jobs_due_order"
down_revision: str | None = "0006_outbox_interactive_due"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_index("ix_jobs_due", table_name="jobs")
    op.create_index("ix_jobs_due", "jobs", ["status", "due_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_due", table_name="jobs")
    op.create_index("ix_jobs_due", "jobs", ["status", "due_at"])
