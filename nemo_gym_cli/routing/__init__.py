"""Session routing across many vLLM backends (README: "Routing across vLLM servers")."""

from .backend import Backend
from .policies import POLICIES, Policy, make_policy
from .router import (UNAVAILABLE_STATUSES, BackendUnavailable, MalformedAnswer, NoHealthyBackend,
                     Router, RoutingSettings)
from .sessions import SessionTable

__all__ = [
    "POLICIES", "UNAVAILABLE_STATUSES", "Backend", "BackendUnavailable",
    "MalformedAnswer", "NoHealthyBackend", "Policy", "Router", "RoutingSettings", "SessionTable", "make_policy",
]
