"""initial schema

Revision ID: 0001
Revises: 
Create Date: 2026-11-22 19:22:51.324902
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_head',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('audit_records',
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('user', sa.String(length=64), nullable=True),
    sa.Column('connection', sa.String(length=128), nullable=True),
    sa.Column('session_id', sa.String(length=64), nullable=True),
    sa.Column('client_addr', sa.String(length=64), nullable=True),
    sa.Column('statement', sa.Text(), nullable=True),
    sa.Column('classification', sa.String(length=16), nullable=True),
    sa.Column('action', sa.String(length=16), nullable=True),
    sa.Column('rule', sa.String(length=128), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('ticket_id', sa.Integer(), nullable=True),
    sa.Column('outcome', sa.String(length=32), nullable=True),
    sa.Column('duration_ms', sa.Float(), nullable=True),
    sa.Column('rows', sa.Integer(), nullable=True),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('seq')
    )
    with op.batch_alter_table('audit_records', schema=None) as batch_op:
        batch_op.create_index('ix_audit_at', ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_records_session_id'), ['session_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_audit_records_user'), ['user'], unique=False)

    op.create_table('tickets',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('requester', sa.String(length=64), nullable=False),
    sa.Column('requester_groups', sa.JSON(), nullable=False),
    sa.Column('connection', sa.String(length=128), nullable=False),
    sa.Column('protocol', sa.String(length=16), nullable=False),
    sa.Column('client_addr', sa.String(length=64), nullable=False),
    sa.Column('application', sa.String(length=200), nullable=False),
    sa.Column('session_id', sa.String(length=64), nullable=False),
    sa.Column('statement', sa.Text(), nullable=False),
    sa.Column('params', sa.JSON(), nullable=True),
    sa.Column('binding', sa.String(length=64), nullable=False),
    sa.Column('classification', sa.String(length=16), nullable=False),
    sa.Column('tables', sa.JSON(), nullable=False),
    sa.Column('rule', sa.String(length=128), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('in_transaction', sa.Boolean(), nullable=False),
    sa.Column('row_estimate', sa.Integer(), nullable=True),
    sa.Column('approver_groups', sa.JSON(), nullable=False),
    sa.Column('min_approvals', sa.Integer(), nullable=False),
    sa.Column('mode', sa.String(length=8), nullable=False),
    sa.Column('gateway_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('decided_at', sa.Float(), nullable=True),
    sa.Column('decided_by', sa.String(length=64), nullable=True),
    sa.Column('decision_comment', sa.Text(), nullable=True),
    sa.Column('claimed_at', sa.Float(), nullable=True),
    sa.Column('executed_at', sa.Float(), nullable=True),
    sa.Column('result_rows', sa.Integer(), nullable=True),
    sa.Column('result_error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('tickets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tickets_binding'), ['binding'], unique=False)
        batch_op.create_index(batch_op.f('ix_tickets_connection'), ['connection'], unique=False)
        batch_op.create_index(batch_op.f('ix_tickets_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_tickets_requester'), ['requester'], unique=False)
        batch_op.create_index(batch_op.f('ix_tickets_status'), ['status'], unique=False)

    op.create_table('tokens',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('user', sa.String(length=64), nullable=False),
    sa.Column('description', sa.String(length=200), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('lookup_hash', sa.String(length=64), nullable=False),
    sa.Column('stored_key', sa.LargeBinary(), nullable=False),
    sa.Column('server_key', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('expires_at', sa.Float(), nullable=False),
    sa.Column('revoked_at', sa.Float(), nullable=True),
    sa.Column('last_used_at', sa.Float(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('lookup_hash')
    )
    with op.batch_alter_table('tokens', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tokens_user'), ['user'], unique=False)

    op.create_table('user_salts',
    sa.Column('user', sa.String(length=64), nullable=False),
    sa.Column('salt', sa.LargeBinary(), nullable=False),
    sa.Column('iterations', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('user')
    )
    op.create_table('ticket_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ticket_id', sa.Integer(), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('actor', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['ticket_id'], ['tickets.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('ticket_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ticket_events_ticket_id'), ['ticket_id'], unique=False)

    op.create_table('ticket_votes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('ticket_id', sa.Integer(), nullable=False),
    sa.Column('approver', sa.String(length=64), nullable=False),
    sa.Column('vote', sa.String(length=8), nullable=False),
    sa.Column('comment', sa.Text(), nullable=True),
    sa.Column('via', sa.String(length=16), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['ticket_id'], ['tickets.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('ticket_id', 'approver', name='uq_vote_once')
    )
    with op.batch_alter_table('ticket_votes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ticket_votes_ticket_id'), ['ticket_id'], unique=False)

    # ### end Alembic commands ###
    # The chain starts from a fixed genesis head so the first writers never race to create it.
    op.bulk_insert(sa.table('audit_head', sa.column('id', sa.Integer), sa.column('seq', sa.Integer),
                            sa.column('hash', sa.String)),
                   [{'id': 1, 'seq': 0, 'hash': '0' * 64}])


def downgrade() -> None:
    with op.batch_alter_table('ticket_votes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ticket_votes_ticket_id'))

    op.drop_table('ticket_votes')
    with op.batch_alter_table('ticket_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ticket_events_ticket_id'))

    op.drop_table('ticket_events')
    op.drop_table('user_salts')
    with op.batch_alter_table('tokens', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tokens_user'))

    op.drop_table('tokens')
    with op.batch_alter_table('tickets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tickets_status'))
        batch_op.drop_index(batch_op.f('ix_tickets_requester'))
        batch_op.drop_index(batch_op.f('ix_tickets_created_at'))
        batch_op.drop_index(batch_op.f('ix_tickets_connection'))
        batch_op.drop_index(batch_op.f('ix_tickets_binding'))

    op.drop_table('tickets')
    with op.batch_alter_table('audit_records', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_records_user'))
        batch_op.drop_index(batch_op.f('ix_audit_records_session_id'))
        batch_op.drop_index('ix_audit_at')

    op.drop_table('audit_records')
    op.drop_table('audit_head')
    # ### end Alembic commands ###
