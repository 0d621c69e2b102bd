"""Accounts an admin has disabled (they keep their data; their sessions and keys stop working).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


# Plain ALTER TABLE (SQLite has ADD and, since 3.35, DROP COLUMN): a batch migration would copy and
# drop the users table, and with foreign keys on, dropping it deletes every conversation.


def upgrade() -> None:
    op.add_column("users", sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("users", "disabled")
