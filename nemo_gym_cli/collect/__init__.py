"""ng_collect_rollouts: stream rows through agents and write each finished rollout."""
