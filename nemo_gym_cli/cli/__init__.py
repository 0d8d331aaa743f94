"""The console scripts (commands.py), ng_status (status.py) and ng_init_env (init_env.py)."""
