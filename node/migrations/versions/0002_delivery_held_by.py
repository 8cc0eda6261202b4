"""The sender holding a delivery for a try is a column (``delivery.held_by``), not an entry
in the delivery's history.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

delivery = sa.table(
    "delivery",
    sa.column("id", sa.Integer),
    sa.column("state", sa.String),
    sa.column("history", sa.JSON),
    sa.column("held_by", sa.String),
)


def upgrade() -> None:
    with op.batch_alter_table("delivery") as batch:
        batch.add_column(sa.Column("held_by", sa.String(128)))
    conn = op.get_bind()
    for row in conn.execute(sa.select(delivery.c.id, delivery.c.state, delivery.c.history)).all():
        history = list(row.history or [])
        holds = [h for h in history if isinstance(h, dict) and "held_by" in h]
        if not holds:
            continue
        kept = [h for h in history if not (isinstance(h, dict) and "held_by" in h)]
        # only the last entry of a PENDING delivery was a hold in progress
        last = history[-1] if history else {}
        held_by = last.get("held_by") if row.state == "PENDING" and isinstance(last, dict) else None
        conn.execute(
            sa.update(delivery).where(delivery.c.id == row.id).values(history=kept, held_by=held_by)
        )


def downgrade() -> None:
    conn = op.get_bind()
    for row in conn.execute(
        sa.select(delivery.c.id, delivery.c.history, delivery.c.held_by).where(
            delivery.c.held_by.is_not(None)
        )
    ).all():
        conn.execute(
            sa.update(delivery)
            .where(delivery.c.id == row.id)
            .values(history=[*(row.history or []), {"held_by": row.held_by}])
        )
    with op.batch_alter_table("delivery") as batch:
        batch.drop_column("held_by")
