"""Alembic environment: runs on the connection the node hands over (see database.upgrade_schema)."""

from alembic import context
from sqlalchemy import Connection

from node.catalog.models import Base

connection: Connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
