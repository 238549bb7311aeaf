"""Chat surfaces: Slack (slack-bolt) and Teams (Bot Framework protocol).

The bots read ticket changes from the store (``ticket_events``), deliver them
through a persistent outbox, and turn button clicks into votes through
``keyturn.approvals``. They never write ticket rows themselves.
"""
