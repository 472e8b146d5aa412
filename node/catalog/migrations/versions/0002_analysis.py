"""analysis: models, analyses, embeddings, study assessments

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


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("architecture", sa.String(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("clinical_use", sa.Boolean(), nullable=False),
        sa.Column("description", sa.JSON(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_id"),
    )
    op.create_table(
        "analyses",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("predicted_label", sa.String(), nullable=True),
        sa.Column("probabilities", sa.JSON(), nullable=True),
        sa.Column("frame_index", sa.Integer(), nullable=True),
        sa.Column("frames", sa.JSON(), nullable=True),
        sa.Column("crop", sa.JSON(), nullable=True),
        sa.Column("heatmap", sa.LargeBinary(), nullable=True),
        sa.Column("heatmap_size", sa.Integer(), nullable=True),
        sa.Column("heatmap_label", sa.String(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claim_token", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_pk"],
            ["instances.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("instance_pk", "model_id"),
    )
    with op.batch_alter_table("analyses", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_analyses_instance_pk"), ["instance_pk"], unique=False)
        batch_op.create_index(batch_op.f("ix_analyses_state"), ["state"], unique=False)
        batch_op.create_index("ix_analyses_state_published_at", ["state", "published_at"], unique=False)

    op.create_table(
        "embeddings",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("dimension", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_pk"],
            ["instances.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("instance_pk", "model_id"),
    )
    with op.batch_alter_table("embeddings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_embeddings_instance_pk"), ["instance_pk"], unique=False)
        batch_op.create_index("ix_embeddings_model_id_id", ["model_id", "id"], unique=False)

    op.create_table(
        "study_assessments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("finding", sa.String(), nullable=True),
        sa.Column("probability", sa.Float(), nullable=True),
        sa.Column("source_instance_pk", sa.Integer(), nullable=True),
        sa.Column("analysed_instances", sa.Integer(), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("claim_token", sa.String(length=64), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["source_instance_pk"],
            ["instances.id"],
        ),
        sa.ForeignKeyConstraint(
            ["study_pk"],
            ["studies.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("study_pk", "model_id", "revision"),
    )
    with op.batch_alter_table("study_assessments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_assessments_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_study_assessments_study_pk"), ["study_pk"], unique=False)

    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("assessment_due", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.create_index(batch_op.f("ix_studies_assessment_due"), ["assessment_due"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_studies_assessment_due"))
        batch_op.drop_column("assessment_due")

    with op.batch_alter_table("study_assessments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_assessments_study_pk"))
        batch_op.drop_index(batch_op.f("ix_study_assessments_state"))

    op.drop_table("study_assessments")
    with op.batch_alter_table("embeddings", schema=None) as batch_op:
        batch_op.drop_index("ix_embeddings_model_id_id")
        batch_op.drop_index(batch_op.f("ix_embeddings_instance_pk"))

    op.drop_table("embeddings")
    with op.batch_alter_table("analyses", schema=None) as batch_op:
        batch_op.drop_index("ix_analyses_state_published_at")
        batch_op.drop_index(batch_op.f("ix_analyses_state"))
        batch_op.drop_index(batch_op.f("ix_analyses_instance_pk"))

    op.drop_table("analyses")
    op.drop_table("models")
