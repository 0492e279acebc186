"""game wins carry their reserved code; game spins count prizes won

Revision ID: 0002_game_win_codes
Revises: 0001
Create Date: 2026-12-01 10:00:00

The prize wheel reserves a prize's code at spin time (``game_wins.code``) and allows one
prize per contact unless configured otherwise (``game_spins.wins``, checked by the spin's
compare-and-set).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002_game_win_codes"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("game_spins", schema=None) as batch_op:
        batch_op.add_column(sa.Column("wins", sa.Integer(), server_default="0",
                                      nullable=False))
    with op.batch_alter_table("game_wins", schema=None) as batch_op:
        batch_op.add_column(sa.Column("code", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("game_wins", schema=None) as batch_op:
        batch_op.drop_column("code")
    with op.batch_alter_table("game_spins", schema=None) as batch_op:
        batch_op.drop_column("wins")
