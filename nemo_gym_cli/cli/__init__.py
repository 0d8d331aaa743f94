"""Console scripts (commands) and ng_status (status)."""
