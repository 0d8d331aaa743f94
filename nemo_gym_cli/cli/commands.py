"""Console scripts: ng_run, ng_collect_rollouts, ng_reverify, ng_status, ng_dump_config.

Arguments use Hydra's override grammar (`+key=value`, `++key=value`, `"+config_paths=[a,b]"`).
A config problem is reported in full with exit code 2, never as a traceback.
"""

from __future__ import annotations

import sys
from typing import Callable



from nemo_gym_cli.config import ConfigError, Composed, compose, dump_yaml, secret_values
from nemo_gym_cli.serving.logs import make_console, setup_logging
from nemo_gym_cli.serving.runtime import run_async

err = make_console(stderr=True)

HELP = {
    "ng_run": """usage: ng_run "+config_paths=[a.yaml,b.yaml]" [+key=value ...]

Start the server graph: a head server (registry) plus one process per server instance in the
config (or all in this process with +colocate=true). Prints a table of servers when all answer
/health; Ctrl-C or SIGTERM stops everything.

Config layers, lowest to highest: conf/ defaults < config_paths files < env.yaml < command line.
Common keys: +head_server.port=11000 +colocate=false +ready_timeout_s=60 +log_dir=logs
""",
    "ng_dump_config": """usage: ng_dump_config "+config_paths=[a.yaml,b.yaml]" [+key=value ...]

Print the resolved config (secrets masked) exactly as ng_run would use it.
""",
    "ng_status": """usage: ng_status [--watch] [+head_server.port=11000]

Ask the head server of a running ng_run for its servers and check that each answers now; show
every model adapter's backends (up/down, in flight, sessions, requests, failovers, and vLLM's
running, waiting, KV cache, prefix-cache hit rate, preemptions) and the collections in progress.
--watch redraws it in place every second until Ctrl-C.
""",
}


def _args(command: str) -> list[str]:
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        if command == "ng_collect_rollouts":
            from nemo_gym_cli.collect.cli import HELP as collect_help

            print(collect_help)
        elif command == "ng_reverify":
            from nemo_gym_cli.collect.reverify import HELP as reverify_help

            print(reverify_help)
        else:
            print(HELP[command])
        sys.exit(0)
    return args


def _compose_or_exit(command: str, args: list[str], shown_as: str | None = None, **kwargs) -> Composed:
    try:
        return compose(args, command=command, **kwargs)
    except ConfigError as e:
        err.print(f"{shown_as or command}: {e.render()}", markup=False)
        sys.exit(2)


def _main(command: str, body: Callable[[Composed], int], **compose_kwargs) -> None:
    composed = _compose_or_exit(command, _args(command), **compose_kwargs)
    setup_logging(secrets=secret_values(composed.config))
    sys.exit(body(composed))


def ng_run() -> None:
    from nemo_gym_cli.graph.build import config_problems
    from nemo_gym_cli.graph.launcher import run_graph

    composed = _compose_or_exit("ng_run", _args("ng_run"))
    problems = config_problems(composed.servers, composed.sources)  # every server's fields, before any starts
    if problems:
        err.print(f"ng_run: {ConfigError(problems).render()}", markup=False)
        sys.exit(2)
    setup_logging(secrets=secret_values(composed.config))
    sys.exit(run_async(run_graph(composed)))


def ng_dump_config() -> None:
    # Composed with ng_run's defaults: it shows exactly what ng_run would use.
    composed = _compose_or_exit("ng_run", _args("ng_dump_config"), shown_as="ng_dump_config")
    sys.stdout.write(dump_yaml(composed.config))


def ng_status() -> None:
    from nemo_gym_cli.cli.status import show_status

    watch = "--watch" in sys.argv[1:]
    if watch:
        sys.argv.remove("--watch")
    _main("ng_status", lambda c: run_async(show_status(c.config, watch=watch)), validate=False)


def ng_collect_rollouts() -> None:
    from nemo_gym_cli.collect.cli import collect

    _main("ng_collect_rollouts", lambda c: run_async(collect(c)), strict_cli=True, validate=False)


def ng_reverify() -> None:
    from nemo_gym_cli.collect.cli import collect
    from nemo_gym_cli.collect.reverify import Reverifier

    _main("ng_reverify", lambda c: run_async(collect(c, Reverifier)), strict_cli=True, validate=False)
