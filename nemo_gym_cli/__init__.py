"""A lean, fast, fault-tolerant NeMo Gym compatible rollout stack."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import nemo_gym_cli` stays cheap (servers and children import it too).
    if name == "collect_rollouts":
        from nemo_gym_cli.collect.api import collect_rollouts

        return collect_rollouts
    if name == "ConcurrencyLimit":
        from nemo_gym_cli.collect.limit import ConcurrencyLimit

        return ConcurrencyLimit
    raise AttributeError(f"module 'nemo_gym_cli' has no attribute {name!r}")


__all__ = ["collect_rollouts", "ConcurrencyLimit", "__version__"]
