"""the upload a model was made from, where it is not stored as sent (a bundle, or a model sent
with its external data files): schemas.api.upload_digest

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 14:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_sha256', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_models_source_sha256'), ['source_sha256'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_models_source_sha256'))
        batch_op.drop_column('source_sha256')
