"""Run every benchmark with its defaults (or --quick sizes), then print all their tables.

    python bench/run_all.py                 # throughput, backend_bound, routing, memory, frozen_backend (~10 min on 2 quiet cores)
    python bench/run_all.py --quick         # small sizes: a smoke run in ~3 min
    python bench/run_all.py --only throughput,routing

Each benchmark runs as its own command (the same one you can run by hand), one after the
other, never in parallel (they would steal each other's CPU). Their results are in
bench/results/<name>.json; the tables are printed again together at the end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402

BENCHMARKS = ("throughput", "backend_bound", "routing", "memory", "frozen_backend")
QUICK = {
    "throughput": ["--rollouts", "1000", "--concurrency", "10,100", "--rounds", "1", "--warmup", "100"],
    "backend_bound": ["--rollouts", "1500", "--rounds", "1"],
    "routing": ["--rollouts", "400", "--rounds", "1"],
    "memory": ["--rows", "1000,10000", "--concurrency", "100,1000"],
    "frozen_backend": [],  # one clean and one frozen run, about 20 s
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset, in this order")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, numbers are rougher)")
    args = p.parse_args(argv)
    names = [n for n in C.parse_str_list(args.only) if n in BENCHMARKS]
    codes: dict[str, int] = {}
    times: dict[str, float] = {}
    for name in names:
        cmd = [C.PY, str(C.BENCH_DIR / f"{name}.py"), *(QUICK[name] if args.quick else [])]
        results = C.RESULTS_DIR / f"{name}.json"
        stamp = results.stat().st_mtime if results.exists() else None
        t0 = time.monotonic()
        codes[name] = subprocess.call(cmd)  # its output goes straight to ours
        times[name] = time.monotonic() - t0
        if results.exists() and results.stat().st_mtime == stamp:
            codes[name] = codes[name] or 1  # did not write new results
    C.console.rule("[bold]All benchmark tables")
    for name in names:
        path = C.RESULTS_DIR / f"{name}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            C.console.print(f"{name}: no results ({path})")
            continue
        C.console.rule(f"{name} ({times[name]:.0f} s, exit {codes[name]})")
        C.console.print(f"command: {data.get('command')}", markup=False, soft_wrap=True)
        C.console.print(data.get("report", ""), markup=False, highlight=False, end="")
    failed = [n for n, c in codes.items() if c]
    if failed:
        C.console.print(f"[red]failed: {', '.join(failed)}[/red]")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the running benchmark got the Ctrl-C too and stopped its processes
        sys.exit(130)
