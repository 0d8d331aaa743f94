"""Collecting rollouts: the in-process API (api.py) and ng_collect_rollouts on top of it (cli.py)."""
