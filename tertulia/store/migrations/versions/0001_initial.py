"""Users, personas, conversations, messages (a tree) and feedback.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None

ID = sa.String(32)
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", ID, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(500)),
        sa.Column("is_admin", sa.Boolean, nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
    )
    op.create_table(
        "personas",
        sa.Column("id", ID, primary_key=True),
        sa.Column("user_id", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("instructions", sa.Text, nullable=False),
        sa.Column("model", sa.String(300)),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
    )
    op.create_index("ix_personas_user_id", "personas", ["user_id"])
    op.create_table(
        "conversations",
        sa.Column("id", ID, primary_key=True),
        sa.Column("user_id", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("title", sa.String(300), nullable=False),
        sa.Column("persona_id", ID, sa.ForeignKey("personas.id", ondelete="SET NULL")),
        sa.Column("system_prompt", sa.Text),
        sa.Column("model", sa.String(300)),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("current_leaf_id", ID),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("updated_at", WHEN, nullable=False),
    )
    op.create_index("ix_conversations_user_updated", "conversations", ["user_id", "updated_at"])
    op.create_table(
        "messages",
        sa.Column("id", ID, primary_key=True),
        sa.Column(
            "conversation_id", ID, sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("parent_id", ID, sa.ForeignKey("messages.id", ondelete="CASCADE")),
        sa.Column("role", sa.String(20), nullable=False),
        sa.Column("content", sa.Text, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("model", sa.String(300)),
        sa.Column("completion_tokens", sa.Integer),
        sa.Column("tokens_per_second", sa.Float),
        sa.Column("created_at", WHEN, nullable=False),
    )
    op.create_index("ix_messages_conversation_parent", "messages", ["conversation_id", "parent_id"])
    op.create_table(
        "feedback",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("message_id", ID, sa.ForeignKey("messages.id", ondelete="CASCADE"), nullable=False),
        sa.Column("user_id", ID, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("rating", sa.Integer, nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("created_at", WHEN, nullable=False),
        sa.UniqueConstraint("message_id", "user_id"),
    )
    op.create_index("ix_feedback_message_id", "feedback", ["message_id"])


def downgrade() -> None:
    for table in ("feedback", "messages", "conversations", "personas", "users"):
        op.drop_table(table)
