"""The graph: ng_run (launcher), its supervisors and restart policy (supervisor), child processes (processes, child),
hosting servers in a process (host), the head server (registry), building servers from specs (build)."""
