"""alembic environment: runs on the connection ``server.audit.migrate`` hands it."""

from __future__ import annotations

from alembic import context

from server.audit.partitions import include_name
from server.audit.store import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    include_name=include_name,  # the days' partitions are made at run time
)
with context.begin_transaction():
    context.run_migrations()
