"""flow versions carry their catalog entries per locale

Revision ID: 0003_flow_version_texts
Revises: 0002_game_win_codes
Create Date: 2026-12-02 10:00:00

A flow uploaded through the admin API brings the texts it uses (``flow_versions.texts``:
locale -> Fluent text), in use in every process while the version is active.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_flow_version_texts"
down_revision: str | None = "0002_game_win_codes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("flow_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("texts", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("flow_versions", schema=None) as batch_op:
        batch_op.drop_column("texts")
