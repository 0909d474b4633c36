"""dashboard sessions (an opaque token's hash, never the key); the estimated cost of a job

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 18:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'dashboard_sessions',
        sa.Column('id', sa.String(length=64), nullable=False),
        sa.Column('tenant_id', sa.String(length=40), nullable=False),
        sa.Column('key_id', sa.String(length=40), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.Column('revoked_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['key_id'], ['api_keys.id']),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id']),
        sa.PrimaryKeyConstraint('id'),
    )
    with op.batch_alter_table('dashboard_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_dashboard_sessions_key_id'), ['key_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_dashboard_sessions_tenant_id'), ['tenant_id'], unique=False)
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('cost', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_column('cost')
    with op.batch_alter_table('dashboard_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_dashboard_sessions_tenant_id'))
        batch_op.drop_index(batch_op.f('ix_dashboard_sessions_key_id'))
    op.drop_table('dashboard_sessions')
