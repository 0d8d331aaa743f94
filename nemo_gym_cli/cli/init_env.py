"""ng_init_env NAME: write a new environment, resources_servers/NAME/, under the current folder.

It is a working one (a tool, /verify, a config wiring it to policy_model, example data, a README
and a test that passes as written), made from the files in env_template/: `$name` in a file (and
`__name__` in a file's name) becomes NAME, `$Class` its CamelCase form.
"""

from __future__ import annotations

import argparse
import keyword
import string
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent / "env_template"
SUFFIX = ".tmpl"

HELP = """Write a new environment, resources_servers/NAME/, under the current folder:
  app.py             the resources server (SimpleResourcesServer): one tool and /verify
  configs/NAME.yaml  the server instance NAME and the agent NAME_simple_agent (wired to policy_model)
  data/example.jsonl three rows to collect rollouts over
  README.md          what it does and how to run it
  tests/test_NAME.py its tool and /verify, and a collection through ng_run with a vLLM stand-in

NAME must be a Python identifier (it is the module resources_servers.NAME); an existing folder is
never overwritten. Exit code 2 for either."""


def class_name(name: str) -> str:
    """my_env -> MyEnv (the prefix of the generated class names)."""
    return "".join(part[:1].upper() + part[1:] for part in name.split("_")) or "Env"


def name_problem(name: str, target: Path) -> str | None:
    if not name.isidentifier() or keyword.iskeyword(name):
        return f"'{name}' is not a valid Python identifier (letters, digits and _, not starting with a digit; not a keyword)"
    if target.exists():
        return f"'{target}' already exists: choose another name, or remove it"
    return None


def write_env(name: str, root: Path) -> list[Path]:
    """resources_servers/<name>/ under root, from the template; returns the files written."""
    values = {"name": name, "Class": class_name(name)}
    target = root / "resources_servers" / name
    written = []
    for source in sorted(TEMPLATE.rglob(f"*{SUFFIX}")):
        relative = source.relative_to(TEMPLATE).with_suffix("")  # drops .tmpl
        path = target / str(relative).replace("__name__", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(string.Template(source.read_text()).substitute(values))
        written.append(path)
    return written


def ng_init_env() -> None:
    parser = argparse.ArgumentParser(prog="ng_init_env", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", metavar="NAME", help="the environment's name, e.g. my_env")
    name = parser.parse_args().name
    target = Path.cwd() / "resources_servers" / name
    problem = name_problem(name, target)
    if problem:
        print(f"ng_init_env: {problem}", file=sys.stderr)
        sys.exit(2)
    written = write_env(name, Path.cwd())
    print(f"Wrote {target}:")
    for path in written:
        print(f"  {path.relative_to(target)}")
    config = f"resources_servers/{name}/configs/{name}.yaml"
    print(f"\nNext: python -m pytest resources_servers/{name}/tests\n"
          f'      ng_run "+config_paths=[responses_api_models/vllm_model/configs/vllm_model.yaml,{config}]"')
