"""A lean, fast, fault-tolerant NeMo Gym compatible rollout stack."""

__version__ = "0.1.0"
