"""The graph: ng_run (launcher), one server per child process (child), the head server (registry), building servers from specs (build)."""
