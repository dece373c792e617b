"""index orders by account

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # CONCURRENTLY cannot run in a transaction: alembic's autocommit_block
    # commits around it. The runner's lock waiters poll, so they do not
    # deadlock with it the way a blocking pg_advisory_lock would.
    with op.get_context().autocommit_block():
        op.create_index("ix_orders_account_id", "orders", ["account_id"], postgresql_concurrently=True)


def downgrade() -> None:
    op.drop_index("ix_orders_account_id", table_name="orders")
