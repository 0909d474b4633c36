"""the upload a processed dataset (an image zip stored as a uint8 .npz) was made from

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 21:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_sha256', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_datasets_source_sha256'), ['source_sha256'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_datasets_source_sha256'))
        batch_op.drop_column('source_sha256')
