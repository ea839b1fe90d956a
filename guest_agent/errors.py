"""The root of the agent's errors (the tree is drawn in :mod:`guest_agent`)."""

from __future__ import annotations


class AgentError(Exception):
    """Something the agent cannot do here; the message says why, for the logs and the attach facts."""
