"""Bolt listeners, one kind per module; each module has ``register(app, deps)``."""

from __future__ import annotations

from slack_bolt.async_app import AsyncApp

from bots.slack.listeners import actions, commands, views
from bots.slack.listeners.deps import SlackDeps


def register_all(app: AsyncApp, deps: SlackDeps) -> None:
    actions.register(app, deps)
    views.register(app, deps)
    commands.register(app, deps)
