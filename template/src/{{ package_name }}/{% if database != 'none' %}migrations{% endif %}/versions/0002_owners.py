"""Give notes and idempotency keys an owner: the subject of the principal that wrote them.

Rows written before this revision get the owner '' (empty), which no principal has:
they stay in the table but no one sees them until an operator hands them to a
principal, e.g. `UPDATE notes SET owner = 'alice' WHERE owner = ''`.
Downgrading drops the owners and the stored idempotency keys (a 24-hour replay
cache), since keys of different owners may collide once owners are gone.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNOWNED = ""


def upgrade() -> None:
    # Batches: SQLite rebuilds the table; PostgreSQL runs plain ALTERs. The default only
    # fills existing rows, then goes: every new row names its owner.
    for table in ("notes", "idempotency_keys"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("owner", sa.String(length=255), nullable=False, server_default=UNOWNED)
            )
        with op.batch_alter_table(table) as batch:
            batch.alter_column("owner", server_default=None)
    op.create_index(op.f("ix_notes_owner_id"), "notes", ["owner", "id"], unique=False)
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_constraint("pk_idempotency_keys", type_="primary")
        batch.create_primary_key("pk_idempotency_keys", ["owner", "key"])


def downgrade() -> None:
    op.execute(sa.text("DELETE FROM idempotency_keys"))
    with op.batch_alter_table("idempotency_keys") as batch:
        batch.drop_constraint("pk_idempotency_keys", type_="primary")
        batch.create_primary_key("pk_idempotency_keys", ["key"])
        batch.drop_column("owner")
    op.drop_index(op.f("ix_notes_owner_id"), table_name="notes")
    with op.batch_alter_table("notes") as batch:
        batch.drop_column("owner")
