"""Baseline: the schema of the first release with migrations (jobs, instances, deliveries,
audit trail, worker status).

Revision ID: 0001
Revises:
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("state_since", sa.DateTime, nullable=False),
        sa.Column("stage_seconds", sa.JSON, nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("calling_aet", sa.String(16), nullable=False),
        sa.Column("called_aet", sa.String(16), nullable=False),
        sa.Column("modality", sa.String(16)),
        sa.Column("study_date", sa.String(8)),
        sa.Column("series_description", sa.String(64)),
        sa.Column("body_part", sa.String(16)),
        sa.Column("patient_name", sa.String(64)),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("instances", sa.Integer, nullable=False),
        sa.Column("bytes_received", sa.Integer, nullable=False),
        sa.Column("last_instance_at", sa.DateTime, nullable=False),
        sa.Column("association_released", sa.Boolean, nullable=False),
        sa.Column("worker", sa.String(128)),
        sa.Column("heartbeat_at", sa.DateTime),
        sa.Column("result", sa.JSON),
        sa.Column("outputs_dir", sa.Text),
        sa.Column("instances_deleted", sa.Boolean, nullable=False),
    )
    for col in ("state", "study_uid", "series_uid"):
        op.create_index(f"ix_job_{col}", "job", [col])
    op.create_table(
        "instance",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("job.id"), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("position", sa.Float),
        sa.Column("slice_thickness", sa.Float),
        sa.Column("orientation", sa.String(128)),
        sa.Column("frames", sa.Integer, nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_instance_job_id", "instance", ["job_id"])
    op.create_index("ix_instance_sop_instance_uid", "instance", ["sop_instance_uid"])
    op.create_table(
        "delivery",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("job.id"), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("address", sa.String(300), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_try_at", sa.DateTime),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("sent_at", sa.DateTime),
        sa.Column("history", sa.JSON, nullable=False),
    )
    op.create_index("ix_delivery_job_id", "delivery", ["job_id"])
    op.create_index("ix_delivery_state", "delivery", ["state"])
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("job.id")),
        sa.Column("at", sa.DateTime, nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_audit_event_job_id", "audit_event", ["job_id"])
    op.create_table(
        "worker_status",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("last_seen", sa.DateTime, nullable=False),
        sa.Column("model", sa.String(128)),
        sa.Column("device", sa.String(64)),
        sa.Column("job_id", sa.Integer),
        sa.Column("stopped", sa.Boolean, nullable=False),
    )


def downgrade() -> None:
    for table in ("worker_status", "audit_event", "delivery", "instance", "job"):
        op.drop_table(table)
