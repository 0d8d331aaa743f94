"""Faults in the graph and in the run itself: every scenario of issue 20's table, one command.

The weather graph at its defaults over stand-ins (1200 rollouts, concurrency 60, 3 x 100 ms);
each fault lands when a quarter of the rollouts is written: the model adapter SIGSTOPped for
20 s then continued, or for good; the agent frozen for good; ng_run SIGKILLed (started again,
run resumed), also while a child is frozen; the output's disk filling (a tmpfs shrunk to what it
holds: root only); rows of the wrong shape; odd input lines (10 MB, invalid UTF-8, a JSON array,
not JSON); SIGINT to the collector; a second collector on the same output, both +resume=true; a
backend answering 200 with 50 MB of garbage (`--garbage-rollouts`); a SIGKILLed collector's
progress entry. One table (written, failures, duplicates, time, notes), saved to
bench/results/graph_faults.json.

    python -m bench.graph_faults                                  # all, ~8 min on 2 cores
    python -m bench.graph_faults --only sigint,two_collectors --rollouts 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil
from rich.table import Table

from bench import common as C
from nemo_gym_cli.testing.harness import VLLM_MODEL, WEATHER, Graph, StandIn, http_json, wait_until, weather_env
from nemo_gym_cli.testing.harness.scenarios import (by_name, collect, collect_in_background, collect_through_fault,
                                                    garbage_backend, read_lines, resize_tmpfs, tmpfs, write_rows)

NAME = "graph_faults"
SECRET = "sk-BENCH-GRAPH-FAULTS-0123456789"  # the graph's policy_api_key: it must never be left on disk
WRONG_SHAPES = [{"input": 42}, {"input": "hi", "tools": "get_weather"}, {"input": [1, 2]},
                {"input": "hi", "temperature": "hot"}, {"input": "hi", "max_output_tokens": True}]


@dataclass
class Row:
    scenario: str
    written: str = "-"
    failures: str = "-"
    duplicates: str = "-"
    time: str = "-"
    notes: str = "-"
    details: dict = field(default_factory=dict)

    def cells(self) -> list[str]:
        return [self.scenario, self.written, self.failures, self.duplicates, self.time, self.notes]


class Bench:
    """One scenario's world: its folder, stand-ins and graphs, all stopped by close()."""

    def __init__(self, args, work: Path):
        self.args, self.work = args, work
        self.standins = [StandIn(work, "--latency-ms", f"{args.latency_ms:g}") for _ in range(args.standins)]
        self.graphs: list[Graph] = []
        # ng_run's state folders (leftovers.py) go here, not to /tmp: another ng_run on this machine
        # (any version) would otherwise find this bench's killed graphs and end (or lose) what they left.
        self.tmp = work / "tmp"
        self.tmp.mkdir()
        self.out = work / "out.jsonl"
        self.failures_path = work / "out_failures.jsonl"
        write_rows(work / "in.jsonl", args.rollouts)

    def graph(self, *extra_args: str, backends: list[str] | None = None, head_port: int | None = None) -> Graph:
        env = {**weather_env(backends or self.standins), "policy_api_key": SECRET}
        g = Graph(self.work, [VLLM_MODEL, WEATHER], env, extra_args, head_port=head_port,
                  process_env={**os.environ, "TMPDIR": str(self.tmp)})
        self.graphs.append(g)
        return g

    def collect(self, g: Graph, *args: str, out: Path | None = None):
        """One whole collection of in.jsonl: (the finished command, seconds it took)."""
        t0 = time.monotonic()
        done = collect(g, "+input_jsonl_fpath=in.jsonl", f"+output_jsonl_fpath={out or self.out}",
                       f"+concurrency={self.args.concurrency}", *args, timeout=900)
        return done, time.monotonic() - t0

    def through_fault(self, g: Graph, fault: Callable, *args: str):
        """Collect, `fault(collector)` once a quarter is written: (exit code, output, seconds from fault to end)."""
        return collect_through_fault(g, self.out, self.args.rollouts, fault,
                                     f"+concurrency={self.args.concurrency}", *args, timeout=900)

    def resume(self, g: Graph) -> str:
        done, took = self.collect(g, "+resume=true")
        return f"resume: exit {done.returncode}, {took:.1f} s"

    def short(self, text: str) -> str:
        """`text` without this run's temporary folder in its paths."""
        return text.replace(f"{self.work}/", "")

    def tally(self, row: Row, total: int | None = None, out: Path | None = None) -> Row:
        """The output's and failures file's state into the row: written (distinct), failures, duplicates."""
        out = out or self.out
        total = self.args.rollouts if total is None else total
        lines, pairs = output_pairs(out)
        row.written = f"{len(set(pairs))}/{total}"
        row.duplicates = str(len(pairs) - len(set(pairs)))
        row.failures = str(len(lines_of(out.with_name(out.stem + "_failures.jsonl"))))
        row.details.update(lines=lines, distinct=len(set(pairs)), whole_lines=whole_lines(out))
        return row

    def close(self) -> None:
        while self.graphs:
            g = self.graphs.pop()
            g.stop()
            g.kill_leftovers()
        while self.standins:
            self.standins.pop().stop()


def lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def whole_lines(path: Path) -> bool:
    raw = path.read_bytes() if path.exists() else b""
    return raw == b"" or raw.endswith(b"\n")


def output_pairs(out: Path) -> tuple[int, list[tuple[int, int]]]:
    rows = lines_of(out)
    return len(rows), [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows]


def stop_line(output: str) -> str:
    """The collector's closing message (what it says when it stops early)."""
    lines = [ln for ln in output.splitlines() if "stopped:" in ln or "ng_collect_rollouts:" in ln or "interrupted" in ln]
    return lines[-1] if lines else ""


def traceback_in(output: str) -> str:
    return "a traceback!" if "Traceback" in output else "no traceback"


# ------------------------------------------------------------------ the scenarios, one per row


def adapter_paused(b: Bench) -> Row:
    g = b.graph()
    proc = psutil.Process(by_name(g)["policy_model"]["pid"])
    continued: list[str] = []

    def cont() -> None:
        if proc.is_running():  # psutil checks the pid still names that process
            proc.resume()
            continued.append("continued it")
        else:
            continued.append("it was gone (killed by ng_run)")

    timer = threading.Timer(20, cont)

    def fault(_):
        proc.suspend()
        timer.start()

    code, _, took = b.through_fault(g, fault)
    timer.join()
    row = b.tally(Row("model adapter SIGSTOPped for 20 s, then SIGCONT"))
    row.time = f"ended {took:.1f} s after the stop"
    row.notes = (f"exit {code}, no resume; ng_run restarted it {by_name(g)['policy_model']['restarts']}x (its /health "
                 f"stopped answering); SIGCONT at 20 s: {continued[0]}")
    return row


def frozen_for_good(victim: str, what: str) -> Callable[[Bench], Row]:
    def scenario(b: Bench) -> Row:
        g = b.graph()
        pid = by_name(g)[victim]["pid"]
        code, _, took = b.through_fault(g, lambda _: os.kill(pid, signal.SIGSTOP))
        row = b.tally(Row(f"{what} SIGSTOPped for good"))
        row.time = f"ended {took:.1f} s after the freeze"
        row.notes = f"exit {code}, no resume; restarts: {by_name(g)[victim]['restarts']}"
        return row
    return scenario


def secret_on_disk(work: Path) -> list[str]:
    """Files holding the graph's API key in the run's folder (ng_run's TMPDIR is in it), but env.yaml."""
    return [str(path) for path in work.rglob("*") if path.is_file() and path.name != "env.yaml"
            and path.stat().st_size < 64 << 20 and SECRET.encode() in path.read_bytes()]


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ng_run_killed(freeze_child: bool) -> Callable[[Bench], Row]:
    def scenario(b: Bench) -> Row:
        g = b.graph()
        child = psutil.Process(by_name(g)["simple_weather"]["pid"])

        left: list[bool] = []

        def fault(_):
            if freeze_child:
                child.suspend()
            os.kill(g.proc.pid, signal.SIGKILL)
            g.proc.wait(10)
            left.append(alive(child) and child.status() == psutil.STATUS_STOPPED)

        code, output, ended = b.through_fault(g, fault)
        written, _ = output_pairs(b.out)
        failed = len(lines_of(b.failures_path))
        secrets = secret_on_disk(b.work)
        g2 = b.graph(head_port=g.head_port)
        resumed = b.resume(g2)
        said = f"'simple_weather' (pid {child.pid}, stopped" in g2.output()
        ender = "yes, and said so" if said and not alive(child) else "NO"
        what = "ng_run SIGKILLed" + (" while simple_weather is SIGSTOPped" if freeze_child else "") + ", restarted, resumed"
        row = b.tally(Row(what))
        row.failures = f"{failed} at the kill, {row.failures} after resume"
        row.time = f"collector ended {ended:.1f} s after the kill (exit {code}); {resumed}"
        row.notes = f"{written} written at the end of the first run; {traceback_in(output)}"
        if freeze_child:
            row.notes += (f"; stopped child outlived ng_run: {'yes' if left[0] else 'no'}, the next ng_run ended it: {ender}; "
                          f"files with the API key: {len(secrets)}")
        row.details.update(secret_files=secrets)
        return row
    return scenario


def full_disk(b: Bench) -> Row:
    row = Row("the output's disk fills (ENOSPC), then space freed, resumed")
    with contextlib.ExitStack() as stack:
        try:
            disk = stack.enter_context(tmpfs(b.work / "disk", "64m"))
        except OSError as e:
            row.notes = f"not run: {e}"
            return row
        stack.callback(b.close)  # the collector's files are on the disk: stop everything before unmounting
        out = disk / "out.jsonl"
        g = b.graph()
        cut_to: list[int] = []

        def fault(_):  # the disk now holds what it holds, plus a little: it fills within a few rollouts
            st = os.statvfs(disk)
            used_kib = (st.f_blocks - st.f_bfree) * st.f_frsize // 1024
            for spare in (16, 64, 256, 1024):
                if resize_tmpfs(disk, f"{used_kib + spare}k"):
                    cut_to.append(used_kib + spare)
                    return

        code, output, took = collect_through_fault(g, out, b.args.rollouts, fault, f"+concurrency={b.args.concurrency}",
                                                   timeout=900)
        stopped_at, _ = output_pairs(out)
        entry = {c["output"]: c for c in http_json(g.head + "/collections")[1]}.get(str(out), {})
        whole = whole_lines(out) and whole_lines(disk / "out_failures.jsonl")
        resize_tmpfs(disk, "64m")  # space freed
        done, resume_s = b.collect(g, "+resume=true", out=out)
        b.tally(row, out=out)
        row.time = (f"stopped {took:.1f} s after the disk was cut to {cut_to[0] if cut_to else '?'} KiB; resume: exit "
                    f"{done.returncode}, {resume_s:.1f} s")
        row.notes = (f"exit {code} at {stopped_at} written, whole lines: {'yes' if whole else 'NO'}, {traceback_in(output)}; "
                     f"its entry: {entry.get('state')}; \"{b.short(stop_line(output))[:200]}\"")
        row.details.update(entry=entry, message=stop_line(output))
        return row


def wrong_shapes(b: Bench) -> Row:
    rows = read_lines(b.work / "in.jsonl")
    bad = {i: WRONG_SHAPES[n % len(WRONG_SHAPES)] for n, i in enumerate(range(50, len(rows), 100))}
    rows = [{"responses_create_params": bad[i]} if i in bad else r for i, r in enumerate(rows)]
    (b.work / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    g = b.graph()
    done, took = b.collect(g)
    failures = lines_of(b.failures_path)
    metrics = json.loads((b.work / "out_metrics.json").read_text())
    row = b.tally(Row(f"{len(bad)} rows of {len(WRONG_SHAPES)} wrong shapes (input 42, tools a string, ...)"))
    statuses = sorted({f["status"] for f in failures})
    attempts = sorted({f["attempts"] for f in failures})
    example = next((f["error"] for f in failures if f["_ng_task_index"] == 50), "")
    row.time = f"{took:.1f} s (exit {done.returncode})"
    row.notes = f"status {statuses}, attempts {attempts}, retries {metrics['retries']}; \"{example[:110]}\""
    return row


def odd_lines(b: Bench) -> Row:
    raw = (b.work / "in.jsonl").read_bytes().splitlines(keepends=True)
    big = json.dumps({**json.loads(raw[0]), "padding": "x" * (10 << 20)}).encode() + b"\n"
    odd = {len(raw) // 4: big, len(raw) // 2: b'{"responses_create_params": {"input": "caf\xff"}}\n',
           3 * len(raw) // 4: b"[1, 2, 3]\n", len(raw) - 10: b"not json at all\n"}
    lines = []
    for i, line in enumerate(raw):
        lines += [odd[i], line] if i in odd else [line]
    (b.work / "in.jsonl").write_bytes(b"".join(lines))
    g = b.graph()
    done, took = b.collect(g)
    total = len(lines)
    row = b.tally(Row("odd input lines: a 10 MB row, invalid UTF-8, a JSON array, not JSON"), total=total)
    errors = [b.short(f["error"])[:60] for f in lines_of(b.failures_path)]
    biggest = max((len(line) for line in b.out.read_bytes().splitlines()), default=0)
    row.time = f"{took:.1f} s (exit {done.returncode})"
    row.notes = f"the 10 MB row written ({biggest / 2**20:.1f} MB line); failures: " + "; ".join(errors)
    return row


def sigint(b: Bench) -> Row:
    g = b.graph()
    code, output, took = b.through_fault(g, lambda proc: proc.send_signal(signal.SIGINT))
    stopped_at, _ = output_pairs(b.out)
    whole = whole_lines(b.out) and whole_lines(b.failures_path)
    resumed = b.resume(g)
    row = b.tally(Row("SIGINT to the collector, then resumed"))
    row.time = f"stopped {took:.1f} s after SIGINT (exit {code}); {resumed}"
    row.notes = f"{stopped_at} written at the stop, whole lines: {'yes' if whole else 'NO'}, {traceback_in(output)}"
    return row


def two_collectors(b: Bench) -> Row:
    g = b.graph()
    args = ("+resume=true", f"+concurrency={b.args.concurrency}")
    t0 = time.monotonic()
    both = [collect_in_background(g, b.out, *args) for _ in range(2)]  # started together: one must lose
    ended: list[tuple[int, float, str]] = []

    def wait(proc) -> None:  # each in its own thread: when each one ended
        out, _ = proc.communicate(timeout=900)
        ended.append((proc.returncode, time.monotonic() - t0, out))

    waiters = [threading.Thread(target=wait, args=(proc,)) for proc in both]
    try:
        for w in waiters:
            w.start()
        for w in waiters:
            w.join()
    finally:
        for proc in both:
            if proc.poll() is None:
                proc.kill()
    codes = sorted(code for code, _, _ in ended)
    refused = [(took, out) for code, took, out in ended if code == 2]
    said = next((ln for ln in refused[0][1].splitlines() if "ng_collect_rollouts:" in ln), "") if refused else ""
    row = b.tally(Row("two collectors on one output, both +resume=true, started together"))
    row.time = (f"one refused {refused[0][0]:.1f} s after the start; " if refused else "") + \
        f"the other done in {max(took for _, took, _ in ended):.1f} s"
    row.notes = f"exit codes {codes}; \"{b.short(said)[:150]}\""
    return row


def garbage(b: Bench) -> Row:
    n = b.args.garbage_rollouts
    write_rows(b.work / "in.jsonl", n)
    server = garbage_backend(b.args.garbage_mb << 20)
    try:
        bad_url = server.url + "/v1"
        g = b.graph("+preflight=false", backends=[*(s.url for s in b.standins), bad_url])
        adapter = by_name(g)["policy_model"]
        rss_before = psutil.Process(adapter["pid"]).memory_info().rss
        done, took = b.collect(g)
        rss_after = psutil.Process(adapter["pid"]).memory_info().rss
        hits = sum(1 for _, path, _ in server.requests if path.endswith("/chat/completions"))
        view = {x["url"]: x for x in http_json(adapter["url"] + "/backends")[1]["backends"]}[bad_url]
        metrics = json.loads((b.work / "out_metrics.json").read_text())
        shown = next((ln.strip() for ln in done.stderr.splitlines() if f"model requests {bad_url}" in ln), "")
    finally:
        server.close()
    row = b.tally(Row(f"a backend answering 200 with {b.args.garbage_mb} MB of garbage (/health fine), "
                      f"{n} rollouts"), total=n)
    row.time = f"{took:.1f} s (exit {done.returncode})"
    row.notes = (f"{hits} hits on it; adapter RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MB; /backends: "
                 f"{view['requests']}; summary errors_per_backend: {metrics.get('errors_per_backend')}; "
                 f"table row: \"{' '.join(shown.replace('│', ' ').split())}\"")
    return row


def killed_collector(b: Bench) -> Row:
    g = b.graph()
    killed_at: list[float] = []

    def fault(proc):
        proc.kill()
        killed_at.append(time.monotonic())

    b.through_fault(g, fault)
    stopped_at, _ = output_pairs(b.out)

    def lost():
        entry = {c["output"]: c for c in http_json(g.head + "/collections")[1]}.get(str(b.out))
        return entry if entry and entry["state"] == "lost" else None

    entry = wait_until(lost, 60, "the killed collector's entry shown lost", interval=0.2)
    lost_after = time.monotonic() - killed_at[0]
    resumed = b.resume(g)
    row = b.tally(Row("a collector SIGKILLed: its progress entry; then resumed"))
    row.time = f"shown lost {lost_after:.1f} s after the kill; {resumed}"
    row.notes = f"{stopped_at} written at the kill; entry: {entry['state']}, \"{entry['reason'][:90]}\""
    return row


SCENARIOS: dict[str, Callable[[Bench], Row]] = {
    "adapter_paused": adapter_paused,
    "adapter_frozen": frozen_for_good("policy_model", "model adapter"),
    "agent_frozen": frozen_for_good("simple_weather_simple_agent", "agent"),
    "ng_run_killed": ng_run_killed(False),
    "full_disk": full_disk,
    "wrong_shapes": wrong_shapes,
    "odd_lines": odd_lines,
    "sigint": sigint,
    "two_collectors": two_collectors,
    "garbage": garbage,
    "killed_collector": killed_collector,
    "ng_run_killed_frozen_child": ng_run_killed(True),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rollouts", type=int, default=1200)
    p.add_argument("--concurrency", type=int, default=60)
    p.add_argument("--standins", type=int, default=3)
    p.add_argument("--latency-ms", type=float, default=100)
    p.add_argument("--garbage-rollouts", type=int, default=300, help="rollouts of the garbage-backend scenario")
    p.add_argument("--garbage-mb", type=int, default=50, help="size of each garbage answer")
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios: " + ", ".join(SCENARIOS))
    p.add_argument("--keep-tmp", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    chosen = C.parse_str_list(args.only)
    if unknown := [s for s in chosen if s not in SCENARIOS]:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    command = C.repro_command(parser, args, __file__)
    C.print_header("bench/graph_faults.py", command)
    rows: list[Row] = []
    work = C.Workdir(f"ng_bench_{NAME}_", args.keep_tmp)
    C.install_signal_handlers()
    try:
        for name in chosen:
            folder = work.path / name
            folder.mkdir()
            t0 = time.monotonic()
            b = Bench(args, folder)
            try:
                row = SCENARIOS[name](b)
            except Exception as e:  # one scenario's failure is a row of the table, not the end of the bench
                row = Row(name, notes=f"FAILED: {type(e).__name__}: {str(e)[:300]}")
                C.fail(f"[red]{name}: {type(e).__name__}[/red]", str(e)[-2000:])
            finally:
                b.close()
            row.details.update(name=name, wall_s=round(time.monotonic() - t0, 1))
            C.console.print(" | ".join(row.cells()), markup=False)
            rows.append(row)
    finally:
        work.cleanup()
    C.begin_report()
    table = Table(title=f"Graph and run faults: {args.rollouts} weather rollouts, concurrency {args.concurrency}, "
                        f"{args.standins} stand-ins x {args.latency_ms:g} ms, each fault at 25% written (one run)",
                  title_justify="left", show_lines=True)
    for col in ("scenario", "written", "failures", "duplicates", "wall / time to end", "notes"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row.cells())
    C.console.print(table)
    report = C.end_report()
    path = C.write_results(NAME, {"machine": C.machine_info(), "args": vars(args), "command": command,
                                  "rows": [{"scenario": r.scenario, "written": r.written, "failures": r.failures,
                                            "duplicates": r.duplicates, "time": r.time, "notes": r.notes, **r.details}
                                           for r in rows], "report": report})
    C.print_footer(command, path)
    return C.exit_code()


if __name__ == "__main__":
    sys.exit(C.run_main(main))
