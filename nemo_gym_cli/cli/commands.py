"""Console scripts: ng_run, ng_collect_rollouts, ng_reverify, ng_status, ng_dump_config (ng_init_env: init_env.py).

Arguments use Hydra's override grammar (`+key=value`, `++key=value`, `"+config_paths=[a,b]"`).
A config problem is reported in full with exit code 2, never as a traceback.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable

from nemo_gym_cli.config import ConfigError, Composed, compose, dump_yaml, secret_values
from nemo_gym_cli.config.paths import base_defaults, conf_defaults
from nemo_gym_cli.serving.logs import make_console, setup_logging
from nemo_gym_cli.serving.runtime import run_async

err = make_console(stderr=True)

DUMP_CONFIG_HELP = """usage: ng_dump_config "+config_paths=[a.yaml,b.yaml]" [+key=value ...]

Print the resolved config (secrets masked) exactly as ng_run would use it.
"""

# Where each command's --help text lives: beside its code. It names defaults as {key} (conf/<command>.yaml
# over conf/base.yaml), so the help never drifts from the conf.
HELP_OF = {
    "ng_run": "nemo_gym_cli.graph.launcher",
    "ng_status": "nemo_gym_cli.cli.status",
    "ng_collect_rollouts": "nemo_gym_cli.collect.collector",
    "ng_reverify": "nemo_gym_cli.collect.reverify",
}


def _help(command: str) -> str:
    if command not in HELP_OF:
        return DUMP_CONFIG_HELP
    template = importlib.import_module(HELP_OF[command]).HELP
    return template.format_map({**base_defaults(), **conf_defaults(command)})


def _args(command: str) -> list[str]:
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args):
        print(_help(command))
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
    from nemo_gym_cli.graph.build import as_the_servers_read_it

    # Composed with ng_run's defaults: it shows exactly what ng_run would use, URL lists as the servers split them.
    composed = _compose_or_exit("ng_run", _args("ng_dump_config"), shown_as="ng_dump_config")
    sys.stdout.write(dump_yaml(as_the_servers_read_it(composed.config, composed.servers)))


def ng_status() -> None:
    from nemo_gym_cli.cli.status import show_status

    watch = "--watch" in sys.argv[1:]
    if watch:
        sys.argv.remove("--watch")
    _main("ng_status", lambda c: run_async(show_status(c.config, watch=watch)), validate=False)


def ng_collect_rollouts() -> None:
    from nemo_gym_cli.collect.collector import collect

    _main("ng_collect_rollouts", lambda c: run_async(collect(c)), strict_cli=True, validate=False)


def ng_reverify() -> None:
    from nemo_gym_cli.collect.collector import collect
    from nemo_gym_cli.collect.reverify import Reverifier

    _main("ng_reverify", lambda c: run_async(collect(c, Reverifier)), strict_cli=True, validate=False)
