"""Alembic environment: migrations run on a connection the store hands over (see database.py)."""

from alembic import context

from tertulia.store.schema import Base

connection = context.config.attributes["connection"]
# Batch mode lets later migrations alter SQLite tables (it recreates them, as SQLite requires).
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
