"""Radiologists' corrected SEGs kept as labelled cases (``labelled_case``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "labelled_case",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("seg_job_id", sa.Integer, sa.ForeignKey("job.id"), nullable=False),
        sa.Column("analysed_job_id", sa.Integer, sa.ForeignKey("job.id"), nullable=False),
        sa.Column("study_uid", sa.String(64), nullable=False),
        sa.Column("series_uid", sa.String(64), nullable=False),
        sa.Column("seg_sop_uid", sa.String(64), nullable=False),
        sa.Column("patient_id", sa.String(64)),
        sa.Column("folder", sa.Text, nullable=False),
        sa.Column("levels", sa.JSON, nullable=False),
        sa.Column("problems", sa.JSON, nullable=False),
    )
    op.create_index("ix_labelled_case_seg_job_id", "labelled_case", ["seg_job_id"])
    op.create_index("ix_labelled_case_analysed_job_id", "labelled_case", ["analysed_job_id"])
    op.create_index("ix_labelled_case_study_uid", "labelled_case", ["study_uid"])


def downgrade() -> None:
    op.drop_table("labelled_case")
