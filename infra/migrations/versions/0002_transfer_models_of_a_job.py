"""transfer models of a job

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 06:32:20.838278
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        # existing jobs have no transfer models
        batch_op.add_column(sa.Column('models', sa.JSON(), nullable=False, server_default=sa.text("'{}'")))


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_column('models')

